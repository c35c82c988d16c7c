use super::screen::{PpmError, Screen};
use super::*;

/// 'A' in font8x8 (rows 0x0C 0x1E 0x33 0x33 0x3F 0x33 0x33 0x00, bit 0
/// leftmost), each row twice.
const A: [&str; 16] = [
    "..##....", "..##....", ".####...", ".####...", "##..##..", "##..##..", "##..##..", "##..##..",
    "######..", "######..", "##..##..", "##..##..", "##..##..", "##..##..", "........", "........",
];

/// The pixels of an 8x16 cell as `#` (FG) and `.` (BG), for a buffer of
/// `n` bytes per pixel holding `fg` or `bg`.
fn art(buf: &[u8], pitch: usize, n: usize, fg: &[u8], bg: &[u8]) -> Vec<String> {
    (0..16)
        .map(|y| {
            (0..8)
                .map(|x| {
                    let p = &buf[y * pitch + x * n..y * pitch + x * n + n];
                    if p == fg {
                        '#'
                    } else if p == bg {
                        '.'
                    } else {
                        '?'
                    }
                })
                .collect()
        })
        .collect()
}

#[test]
fn glyph_a_at_32_bpp_is_these_bytes() {
    let mut fb = vec![0x55u8; 8 * 4 * 16];
    let mut s = Surface::new(&mut fb, 8, 16, 32, Format::XRGB8888).unwrap();
    s.draw_cell(0, 0, b'A');
    let g = [0xaa, 0xaa, 0xaa, 0x00];
    let k = [0u8; 4];
    // Row 0: ..##....
    assert_eq!(
        fb[..32],
        [k, k, g, g, k, k, k, k].concat()[..],
        "row 0 of 'A' in XRGB8888"
    );
    // Row 8: ######..
    assert_eq!(fb[8 * 32..9 * 32], [g, g, g, g, g, g, k, k].concat()[..]);
    assert_eq!(art(&fb, 32, 4, &g, &k), A);
}

#[test]
fn glyph_a_at_24_bpp_with_a_pitch_wider_than_the_line() {
    // Pitch 30 = 8 pixels x 3 + 6 bytes of padding, which stay untouched.
    let mut fb = vec![0x55u8; 30 * 16];
    let mut s = Surface::new(&mut fb, 8, 16, 30, Format::RGB888).unwrap();
    s.draw_cell(0, 0, b'A');
    let g = [0xaa, 0xaa, 0xaa];
    let k = [0u8; 3];
    assert_eq!(
        fb[..30],
        [&[k, k, g, g, k, k, k, k].concat()[..], &[0x55; 6]].concat()[..]
    );
    assert_eq!(
        fb[8 * 30..8 * 30 + 24],
        [g, g, g, g, g, g, k, k].concat()[..]
    );
    assert_eq!(art(&fb, 30, 3, &g, &k), A);
    assert!(fb.chunks(30).all(|l| l[24..] == [0x55; 6]));
}

#[test]
fn colours_go_to_the_reported_positions_and_sizes() {
    // Blue, green, red in memory (GOP's BGRX, red at bit 16).
    assert_eq!(
        pixel(Format::XRGB8888, [0x11, 0x22, 0x33]),
        [0x33, 0x22, 0x11, 0]
    );
    // Red, green, blue in memory (GOP's RGBX, red at bit 0).
    let rgbx = Format::Rgb {
        bytes_per_pixel: 4,
        red: Channel { pos: 0, size: 8 },
        green: Channel { pos: 8, size: 8 },
        blue: Channel { pos: 16, size: 8 },
    };
    assert_eq!(pixel(rgbx, [0x11, 0x22, 0x33]), [0x11, 0x22, 0x33, 0]);
    // 5:6:5 fields inside 24 bits are scaled: 0xaa -> 21/31, 42/63.
    let f565 = Format::Rgb {
        bytes_per_pixel: 3,
        red: Channel { pos: 11, size: 5 },
        green: Channel { pos: 5, size: 6 },
        blue: Channel { pos: 0, size: 5 },
    };
    let v = u32::from_le_bytes(pixel(f565, FG));
    assert_eq!((v >> 11, (v >> 5) & 63, v & 31), (21, 42, 21));
    // 10-bit channels (x2r10g10b10).
    let f10 = Format::Rgb {
        bytes_per_pixel: 4,
        red: Channel { pos: 20, size: 10 },
        green: Channel { pos: 10, size: 10 },
        blue: Channel { pos: 0, size: 10 },
    };
    assert_eq!(u32::from_le_bytes(pixel(f10, [0xff, 0, 0])), 0x3ff << 20);
}

#[test]
fn surfaces_are_checked() {
    let mut b = vec![0u8; 1024 * 768 * 4];
    assert!(Surface::new(&mut b, 1024, 768, 4096, Format::XRGB8888).is_ok());
    assert_eq!(
        Surface::new(&mut b, 1024, 768, 4000, Format::XRGB8888).err(),
        Some(ConsoleError::BadGeometry)
    );
    assert_eq!(
        Surface::new(&mut b, 1024, 769, 4096, Format::XRGB8888).err(),
        Some(ConsoleError::BufferTooSmall)
    );
    assert_eq!(
        Surface::new(&mut b, 7, 768, 4096, Format::XRGB8888).err(),
        Some(ConsoleError::TooSmall)
    );
    assert_eq!(
        Surface::new(&mut b, usize::MAX / 2, 16, usize::MAX, Format::XRGB8888).err(),
        Some(ConsoleError::BadGeometry)
    );
    let f16 = Format::Rgb {
        bytes_per_pixel: 2,
        red: Channel { pos: 11, size: 5 },
        green: Channel { pos: 5, size: 6 },
        blue: Channel { pos: 0, size: 5 },
    };
    assert_eq!(
        Surface::new(&mut b, 1024, 768, 2048, f16).err(),
        Some(ConsoleError::UnsupportedFormat)
    );
    let outside = Format::Rgb {
        bytes_per_pixel: 3,
        red: Channel { pos: 20, size: 8 },
        green: Channel { pos: 8, size: 8 },
        blue: Channel { pos: 0, size: 8 },
    };
    assert_eq!(
        Surface::new(&mut b, 1024, 768, 3072, outside).err(),
        Some(ConsoleError::UnsupportedFormat)
    );
    // The last line need only hold its pixels, not a whole pitch.
    let mut b = vec![0u8; 4096 * 15 + 32];
    assert!(Surface::new(&mut b, 8, 16, 4096, Format::XRGB8888).is_ok());
}

/// A 24-bit RGB screen of `cols` x `rows` cells with a console on it.
struct Term {
    fb: Vec<u8>,
    w: usize,
    h: usize,
}

impl Term {
    fn new(cols: usize, rows: usize) -> Term {
        Term {
            fb: vec![0xee; cols * 8 * rows * 16 * 3],
            w: cols * 8,
            h: rows * 16,
        }
    }

    fn console(&mut self) -> TextConsole<'_> {
        let s = Surface::new(&mut self.fb, self.w, self.h, self.w * 3, Format::PPM).unwrap();
        let mut c = TextConsole::new();
        c.attach(s);
        c
    }

    fn screen(&self) -> Screen<'_> {
        Screen {
            width: self.w,
            height: self.h,
            rgb: &self.fb,
        }
    }
}

fn rows(c: &TextConsole) -> Vec<String> {
    (0..c.size().1)
        .map(|r| String::from_utf8(c.row_text(r).to_vec()).unwrap())
        .collect()
}

#[test]
fn attach_clears_the_screen() {
    let mut t = Term::new(4, 3);
    let c = t.console();
    assert_eq!(c.size(), (4, 3));
    assert!(t.fb.iter().all(|&b| b == 0));
    assert!(t.screen().text_at(2, 0, "    "));
}

#[test]
fn long_lines_wrap_and_the_bottom_line_moves_the_text_up() {
    let mut t = Term::new(4, 3);
    let mut c = t.console();
    c.write_bytes(b"abcdefgh\n");
    assert_eq!(rows(&c), ["abcd", "efgh", "    "]);
    assert_eq!(
        c.cursor(),
        (2, 0),
        "a full line then \\n makes no empty line"
    );
    c.write_bytes(b"ij\n");
    assert_eq!(rows(&c), ["abcd", "efgh", "ij  "]);
    assert_eq!(
        c.cursor(),
        (3, 0),
        "nothing moves until there is text to show"
    );
    c.write_bytes(b"kl");
    // 3 rows: the jump is 1 line.
    assert_eq!(rows(&c), ["efgh", "ij  ", "kl  "]);
    let s = t.screen();
    assert!(s.text_at(0, 0, "efgh"));
    assert!(s.text_at(1, 0, "ij  "));
    assert!(s.text_at(2, 0, "kl  "));
    assert!(!s.text_at(0, 0, "abcd"));
}

#[test]
fn the_text_jumps_up_by_half_a_screen() {
    let mut t = Term::new(10, 6);
    let mut c = t.console();
    for i in 0..6 {
        c.write_bytes(format!("line {i}\n").as_bytes());
    }
    assert_eq!(rows(&c)[5], "line 5    ");
    c.write_bytes(b"line 6\n");
    // Up by 3: lines 3, 4, 5, 6 and two empty rows.
    assert_eq!(
        rows(&c),
        [
            "line 3    ",
            "line 4    ",
            "line 5    ",
            "line 6    ",
            "          ",
            "          "
        ]
    );
    for i in 7..9 {
        c.write_bytes(format!("line {i}\n").as_bytes());
    }
    assert_eq!(rows(&c)[5], "line 8    ");
    let s = t.screen();
    for (r, i) in (3..9).enumerate() {
        assert!(s.text_at(r, 0, &format!("line {i}")), "row {r}");
    }
}

#[test]
fn many_newlines_at_the_bottom_move_the_text_far_enough() {
    let mut t = Term::new(4, 4);
    let mut c = t.console();
    c.write_bytes(b"a\nb\nc\nd\n\n\n\n\n\ne");
    assert_eq!(rows(&c), ["    ", "    ", "    ", "e   "]);
}

#[test]
fn only_cells_that_change_are_drawn() {
    let mut t = Term::new(10, 4);
    let mut c = t.console();
    c.write_bytes(b"one\ntwo\nthree\nfour");
    assert_eq!(c.cells_drawn(), 3 + 3 + 5 + 4);
    // Past the bottom: up by 2, to "three", "four", "", "". Row 0 changes
    // in 5 cells (one -> three), row 1 in 4 (two -> four), rows 2 and 3
    // are cleared (5 + 4), then "five" is drawn: 22 cells, not 40 + 4.
    c.write_bytes(b"\nfive");
    assert_eq!(
        rows(&c),
        ["three     ", "four      ", "five      ", "          "]
    );
    assert_eq!(c.cells_drawn(), 15 + 5 + 4 + 5 + 4 + 4);
}

#[test]
fn a_batch_draws_only_what_stays_on_screen() {
    let mut t = Term::new(10, 4);
    let mut c = t.console();
    let text: String = (0..20).map(|i| format!("line {i}\n")).collect();
    c.write_batch(text.as_bytes());
    // The last jump (by 2) came with "line 18".
    assert_eq!(
        rows(&c),
        ["line 16   ", "line 17   ", "line 18   ", "line 19   "]
    );
    // Each visible character once (the blank in "line" is not drawn).
    assert_eq!(c.cells_drawn(), 4 * 6);
    let s = t.screen();
    for r in 0..4 {
        assert!(s.text_at(r, 0, &format!("line {}", 16 + r)));
    }
}

#[test]
fn control_bytes_tabs_and_utf8() {
    let mut t = Term::new(20, 2);
    let mut c = t.console();
    c.write_bytes("a\tb\x07c\u{e9}t\u{1f600}!\n".as_bytes());
    assert_eq!(rows(&c)[0], "a       bc?t?!      ");
    c.write_bytes(b"xyz\rA");
    assert_eq!(rows(&c)[1], "Ayz                 ");
}

#[test]
fn ega_text_mode_writes_character_and_attribute() {
    let mut fb = vec![0u8; 80 * 25 * 2];
    let s = Surface::new(&mut fb, 80, 25, 160, Format::EgaText).unwrap();
    assert_eq!(s.text_size(), (80, 25));
    let mut c = TextConsole::new();
    c.attach(s);
    c.write_bytes(b"hi\nok\xc3\xa9");
    assert_eq!(fb[..6], [b'h', 7, b'i', 7, b' ', 7]);
    assert_eq!(fb[160..166], [b'o', 7, b'k', 7, b'?', 7]);
    assert!(fb[4000 - 2..] == [b' ', 7]);
}

#[test]
fn a_screen_larger_than_the_grid_uses_its_top_left() {
    let (w, h) = (MAX_COLS * 8 + 64, MAX_ROWS * 16 + 32);
    let mut fb = vec![0u8; w * h * 4];
    let s = Surface::new(&mut fb, w, h, w * 4, Format::XRGB8888).unwrap();
    let mut c = TextConsole::new();
    c.attach(s);
    assert_eq!(c.size(), (MAX_COLS, MAX_ROWS));
    c.write_bytes(&[b'x'; MAX_COLS + 1]);
    assert_eq!(c.cursor(), (1, 1));
}

#[test]
fn writes_before_attach_are_dropped() {
    let mut c = TextConsole::new();
    c.write_bytes(b"lost");
    assert_eq!(c.size(), (0, 0));
    assert!(!c.is_attached());
}

/// A PPM of `text` written on a console `cols` x `rows`, drawn at 32 bpp
/// and converted to RGB the way QEMU's screendump does.
fn screenshot(cols: usize, rows: usize, text: &str) -> Vec<u8> {
    let (w, h) = (cols * 8, rows * 16);
    let mut fb = vec![0u8; w * h * 4];
    {
        let s = Surface::new(&mut fb, w, h, w * 4, Format::XRGB8888).unwrap();
        let mut c = TextConsole::new();
        c.attach(s);
        c.write_bytes(text.as_bytes());
    }
    let mut ppm = format!("P6\n# made by a test\n{w} {h}\n255\n").into_bytes();
    for p in fb.chunks(4) {
        ppm.extend_from_slice(&[p[2], p[1], p[0]]);
    }
    ppm
}

#[test]
fn a_screenshot_shows_text_at_its_row() {
    let ppm = screenshot(
        40,
        5,
        "[    0.000123] INFO  boot: dioxide 0.1.0\nconsole: COM1\n",
    );
    let s = Screen::from_ppm(&ppm).unwrap();
    assert_eq!((s.width, s.height, s.text_size()), (320, 80, (40, 5)));
    assert!(s.text_at(0, 0, "[    0.000123] INFO"));
    assert!(s.text_at(0, 27, "dioxide 0.1.0"));
    assert!(s.text_at(1, 0, "console: COM1"));
    assert!(!s.text_at(0, 0, "console: COM1"), "another row");
    assert!(!s.text_at(1, 1, "console: COM1"), "another column");
    assert!(!s.text_at(1, 0, "console: COM2"), "another text");
    assert_eq!(s.find_in_row(0, "dioxide"), Some(27));
    assert_eq!(s.find_text("COM1"), Some((1, 9)));
    assert_eq!(s.find_text("COM2"), None);
    assert!(s.text_at(2, 0, "    "), "blank rows");
    assert!(!s.text_at(4, 38, "abc"), "past the right edge");
    assert!(!s.text_at(5, 0, "a"), "past the bottom");
}

#[test]
fn one_wrong_pixel_fails_the_check() {
    let mut ppm = screenshot(10, 2, "Hello");
    let header = ppm.len() - 80 * 32 * 3;
    let s = Screen::from_ppm(&ppm).unwrap();
    assert!(s.text_at(0, 0, "Hello"));
    // The last pixel row of 'o' (cell 4) is background; colour one pixel.
    let at = header + ((15 * 80) + 4 * 8 + 3) * 3;
    ppm[at + 1] = 0x01;
    let s = Screen::from_ppm(&ppm).unwrap();
    assert!(!s.text_at(0, 0, "Hello"));
    assert!(s.text_at(0, 0, "Hell"));
}

#[test]
fn ppm_headers_are_checked() {
    assert_eq!(
        Screen::from_ppm(b"P3\n1 1\n255\n").err(),
        Some(PpmError::NotP6)
    );
    assert_eq!(
        Screen::from_ppm(b"P6\n1\n").err(),
        Some(PpmError::BadHeader)
    );
    assert_eq!(
        Screen::from_ppm(b"P6\n1 1\n65535\n\0\0\0\0\0\0").err(),
        Some(PpmError::Not8Bit)
    );
    assert_eq!(
        Screen::from_ppm(b"P6\n2 1\n255\n\0\0\0").err(),
        Some(PpmError::Truncated)
    );
    assert_eq!(
        Screen::from_ppm(b"P6\n99999999999999999999999 1\n255\n").err(),
        Some(PpmError::BadHeader)
    );
    let s = Screen::from_ppm(b"P6 1 1 255 \x01\x02\x03").unwrap();
    assert_eq!(s.rgb, &[1, 2, 3]);
}
