//! A text console on a framebuffer, for the kernel's log on a screen.
//!
//! - [`Surface`]: the framebuffer as a byte slice with its geometry and
//!   [`Format`]: direct RGB at 24 or 32 bits per pixel with the colour
//!   positions and sizes the boot loader reported (GOP under UEFI, VBE under
//!   a BIOS), or EGA text mode (two bytes per cell at 0xb8000).
//! - [`TextConsole`]: a character grid over a surface. Bytes go in; `\n`
//!   starts a line, a line longer than the screen wraps, `\r` and `\t` do
//!   what a terminal does, other control bytes are dropped, and a UTF-8
//!   character shows as one `?`.
//! - [`screen`]: the check of a screenshot (a PPM as QEMU's `screendump`
//!   writes it) against what this renderer draws for a text.
//!
//! ## Cost, and why it jump-scrolls
//!
//! The framebuffer is device memory: mapped uncached, slow to write on real
//! hardware and slow to emulate under TCG, and never read back (reads of
//! uncached memory are slower still). A terminal that moves the screen up by
//! one line per line of log would rewrite the whole screen every line (3 MiB
//! at 1024x768x32). Instead the console keeps two character grids, what the
//! text is and what the screen shows, and draws only the cells that differ.
//! When a line is written past the bottom row, the text moves up by half the
//! screen at once ("jump scroll", as VT100s could): one redraw of the
//! changed cells per `rows / 2` lines, and between jumps each line costs
//! only its own cells. The newest line is always on screen, and the text
//! reads top to bottom in order.
//!
//! No allocation; no `unsafe`. The grids are fixed arrays
//! ([`MAX_COLS`] x [`MAX_ROWS`] cells; a larger screen uses its top-left
//! part), so a `TextConsole` lives in a `static`.
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]

pub mod font;
pub mod screen;

use core::fmt;
use font::{glyph, GLYPH_H, GLYPH_W};

/// Columns and rows of text the console keeps (2048x2048 pixels).
pub const MAX_COLS: usize = 256;
pub const MAX_ROWS: usize = 128;
const MAX_CELLS: usize = MAX_COLS * MAX_ROWS;

/// The text colour (VGA light grey) and the background (black), as 8-bit
/// red, green, blue.
pub const FG: [u8; 3] = [0xaa, 0xaa, 0xaa];
pub const BG: [u8; 3] = [0, 0, 0];
/// EGA attribute byte: light grey on black.
const EGA_ATTR: u8 = 0x07;

/// One colour field of a direct-colour pixel: `size` bits at bit `pos` of
/// the little-endian pixel value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Channel {
    pub pos: u8,
    pub size: u8,
}

/// How the framebuffer's bytes make a picture.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// Direct colour, `bytes_per_pixel` 3 or 4.
    Rgb {
        bytes_per_pixel: u8,
        red: Channel,
        green: Channel,
        blue: Channel,
    },
    /// EGA/VGA text mode: width x height cells of (character, attribute).
    EgaText,
}

impl Format {
    /// 32 bpp, `0x00RRGGBB` (GOP's BGRX and VBE's usual layout).
    pub const XRGB8888: Format = Format::Rgb {
        bytes_per_pixel: 4,
        red: Channel { pos: 16, size: 8 },
        green: Channel { pos: 8, size: 8 },
        blue: Channel { pos: 0, size: 8 },
    };
    /// 24 bpp, blue, green, red in memory (OVMF's 800x600x24 GRUB mode).
    pub const RGB888: Format = Format::Rgb {
        bytes_per_pixel: 3,
        red: Channel { pos: 16, size: 8 },
        green: Channel { pos: 8, size: 8 },
        blue: Channel { pos: 0, size: 8 },
    };
    /// 24 bpp, red, green, blue in memory: a PPM's pixels.
    pub const PPM: Format = Format::Rgb {
        bytes_per_pixel: 3,
        red: Channel { pos: 0, size: 8 },
        green: Channel { pos: 8, size: 8 },
        blue: Channel { pos: 16, size: 8 },
    };
}

/// Why a framebuffer cannot carry the console.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConsoleError {
    /// Not 24 or 32 bpp RGB with colour fields inside the pixel, nor EGA
    /// text.
    UnsupportedFormat,
    /// The pitch is smaller than a line, or the sizes overflow.
    BadGeometry,
    /// The buffer holds fewer bytes than `pitch * height`.
    BufferTooSmall,
    /// Smaller than one character cell.
    TooSmall,
}

impl fmt::Display for ConsoleError {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(match self {
            ConsoleError::UnsupportedFormat => {
                "unsupported pixel format (24 or 32 bpp RGB, or EGA text)"
            }
            ConsoleError::BadGeometry => "pitch smaller than a line, or sizes overflow",
            ConsoleError::BufferTooSmall => "buffer smaller than pitch x height",
            ConsoleError::TooSmall => "smaller than one character",
        })
    }
}

/// A framebuffer: `buf` holds `height` lines of `pitch` bytes (the last
/// may stop after its `width` pixels). Width and height count pixels, or
/// characters in EGA text mode.
pub struct Surface<'a> {
    buf: &'a mut [u8],
    width: usize,
    height: usize,
    pitch: usize,
    format: Format,
    /// FG and BG as pixel bytes (the first `bytes_per_pixel` are used).
    fg: [u8; 4],
    bg: [u8; 4],
}

/// `value` (8 bits) scaled to the channel's size and put at its position.
fn channel(c: Channel, value: u8) -> u32 {
    let max = (1u32 << c.size) - 1;
    ((value as u32 * max + 127) / 255) << c.pos
}

fn pixel(format: Format, rgb: [u8; 3]) -> [u8; 4] {
    match format {
        Format::Rgb {
            red, green, blue, ..
        } => (channel(red, rgb[0]) | channel(green, rgb[1]) | channel(blue, rgb[2])).to_le_bytes(),
        Format::EgaText => [0; 4],
    }
}

impl<'a> Surface<'a> {
    /// Checks the geometry and format against `buf`.
    pub fn new(
        buf: &'a mut [u8],
        width: usize,
        height: usize,
        pitch: usize,
        format: Format,
    ) -> Result<Self, ConsoleError> {
        let (unit, cell_w, cell_h) = match format {
            Format::Rgb {
                bytes_per_pixel,
                red,
                green,
                blue,
            } => {
                if !(3..=4).contains(&bytes_per_pixel) {
                    return Err(ConsoleError::UnsupportedFormat);
                }
                for c in [red, green, blue] {
                    if c.size == 0
                        || c.size > 16
                        || c.pos as u32 + c.size as u32 > bytes_per_pixel as u32 * 8
                    {
                        return Err(ConsoleError::UnsupportedFormat);
                    }
                }
                (bytes_per_pixel as usize, GLYPH_W, GLYPH_H)
            }
            Format::EgaText => (2, 1, 1),
        };
        if width < cell_w || height < cell_h {
            return Err(ConsoleError::TooSmall);
        }
        let line = width.checked_mul(unit).ok_or(ConsoleError::BadGeometry)?;
        if pitch < line {
            return Err(ConsoleError::BadGeometry);
        }
        let need = pitch
            .checked_mul(height - 1)
            .and_then(|n| n.checked_add(line))
            .ok_or(ConsoleError::BadGeometry)?;
        if buf.len() < need {
            return Err(ConsoleError::BufferTooSmall);
        }
        Ok(Surface {
            buf,
            width,
            height,
            pitch,
            format,
            fg: pixel(format, FG),
            bg: pixel(format, BG),
        })
    }

    pub fn width(&self) -> usize {
        self.width
    }

    pub fn height(&self) -> usize {
        self.height
    }

    pub fn format(&self) -> Format {
        self.format
    }

    /// Columns and rows of text that fit.
    pub fn text_size(&self) -> (usize, usize) {
        match self.format {
            Format::Rgb { .. } => (self.width / GLYPH_W, self.height / GLYPH_H),
            Format::EgaText => (self.width, self.height),
        }
    }

    /// Paints everything with the background (blank cells in text mode).
    pub fn clear(&mut self) {
        let width = self.width;
        match self.format {
            Format::Rgb {
                bytes_per_pixel, ..
            } => {
                // Copied a run of 64 pixels at a time: few, large stores.
                let n = bytes_per_pixel as usize;
                let mut run = [0u8; 64 * 4];
                for p in run.chunks_exact_mut(n) {
                    p.copy_from_slice(&self.bg[..n]);
                }
                let run = &run[..64 * n];
                for line in self.buf.chunks_mut(self.pitch).take(self.height) {
                    for part in line[..width * n].chunks_mut(run.len()) {
                        part.copy_from_slice(&run[..part.len()]);
                    }
                }
            }
            Format::EgaText => {
                for line in self.buf.chunks_mut(self.pitch).take(self.height) {
                    for c in line[..width * 2].chunks_exact_mut(2) {
                        c.copy_from_slice(&[b' ', EGA_ATTR]);
                    }
                }
            }
        }
    }

    /// Draws character `c` in the cell at text `row`, `col` (which must be
    /// inside [`Surface::text_size`]; cells outside are ignored).
    pub fn draw_cell(&mut self, row: usize, col: usize, c: u8) {
        let (cols, rows) = self.text_size();
        if row >= rows || col >= cols {
            return;
        }
        match self.format {
            Format::Rgb {
                bytes_per_pixel, ..
            } => {
                let n = bytes_per_pixel as usize;
                let (fg, bg) = (self.fg, self.bg);
                let g = glyph(c);
                // Each glyph row is composed here and stored with one copy.
                let mut px = [0u8; GLYPH_W * 4];
                let px = &mut px[..GLYPH_W * n];
                for (y, bits) in g.iter().enumerate() {
                    for (x, p) in px.chunks_exact_mut(n).enumerate() {
                        let on = bits & (1 << x) != 0;
                        p.copy_from_slice(&(if on { fg } else { bg })[..n]);
                    }
                    let at = (row * GLYPH_H + y) * self.pitch + col * GLYPH_W * n;
                    // In bounds: Surface::new checked pitch * (height - 1)
                    // + width * n <= len, and the cell lies inside.
                    self.buf[at..at + GLYPH_W * n].copy_from_slice(px);
                }
            }
            Format::EgaText => {
                let at = row * self.pitch + col * 2;
                self.buf[at] = if (0x20..0x7f).contains(&c) { c } else { b'?' };
                self.buf[at + 1] = EGA_ATTR;
            }
        }
    }
}

/// The state of a text console: the text, what the screen shows, the
/// cursor. Writes before [`TextConsole::attach`] are dropped.
pub struct TextConsole<'a> {
    surface: Option<Surface<'a>>,
    cols: usize,
    rows: usize,
    /// The text, `rows` lines of `cols` bytes.
    text: [u8; MAX_CELLS],
    /// What the screen shows, in the same layout.
    shown: [u8; MAX_CELLS],
    row: usize,
    col: usize,
    /// Lines moved up when the text reaches past the bottom row.
    jump: usize,
    /// Inside a UTF-8 sequence whose `?` was drawn.
    in_utf8: bool,
    /// Drawing waits for the end of a [`TextConsole::write_batch`].
    deferred: bool,
    drawn: u64,
}

impl Default for TextConsole<'_> {
    fn default() -> Self {
        Self::new()
    }
}

impl<'a> TextConsole<'a> {
    /// A console with no screen yet.
    pub const fn new() -> Self {
        TextConsole {
            surface: None,
            cols: 0,
            rows: 0,
            text: [b' '; MAX_CELLS],
            shown: [b' '; MAX_CELLS],
            row: 0,
            col: 0,
            jump: 1,
            in_utf8: false,
            deferred: false,
            drawn: 0,
        }
    }

    /// Takes over `surface`: clears it, and puts the cursor at the top
    /// left. The text area is the surface's, cut at [`MAX_COLS`] x
    /// [`MAX_ROWS`].
    pub fn attach(&mut self, mut surface: Surface<'a>) {
        let (cols, rows) = surface.text_size();
        self.cols = cols.min(MAX_COLS);
        self.rows = rows.min(MAX_ROWS);
        self.jump = (self.rows / 2).max(1);
        self.text.fill(b' ');
        self.shown.fill(b' ');
        self.row = 0;
        self.col = 0;
        self.in_utf8 = false;
        surface.clear();
        self.surface = Some(surface);
    }

    pub fn is_attached(&self) -> bool {
        self.surface.is_some()
    }

    /// Columns and rows of text (0, 0 before attach).
    pub fn size(&self) -> (usize, usize) {
        (self.cols, self.rows)
    }

    /// Sets how many lines the text moves up when it reaches past the
    /// bottom (1 ..= rows; half the rows by default).
    pub fn set_jump(&mut self, lines: usize) {
        self.jump = lines.clamp(1, self.rows.max(1));
    }

    /// The text of row `r` (spaces where nothing was written).
    pub fn row_text(&self, r: usize) -> &[u8] {
        if r >= self.rows {
            return &[];
        }
        &self.text[r * self.cols..(r + 1) * self.cols]
    }

    /// Cells drawn since [`TextConsole::new`] (a measure of the cost).
    pub fn cells_drawn(&self) -> u64 {
        self.drawn
    }

    /// Row and column where the next character goes (the row may equal
    /// the number of rows: the text moves up when something is written
    /// there).
    pub fn cursor(&self) -> (usize, usize) {
        (self.row, self.col)
    }

    /// Writes `bytes` into the grid and draws only the end result: for a
    /// replay of many lines at once, which would otherwise draw lines that
    /// a later jump moves off the screen.
    pub fn write_batch(&mut self, bytes: &[u8]) {
        self.deferred = true;
        self.write_bytes(bytes);
        self.deferred = false;
        for i in 0..self.cols * self.rows {
            self.sync(i);
        }
    }

    pub fn write_bytes(&mut self, bytes: &[u8]) {
        if self.surface.is_none() {
            return;
        }
        for &b in bytes {
            match b {
                b'\n' => {
                    self.in_utf8 = false;
                    self.row += 1;
                    self.col = 0;
                }
                b'\r' => self.col = 0,
                b'\t' => {
                    let stop = (self.col / 8 + 1) * 8;
                    while self.col < stop && self.col < self.cols {
                        self.put(b' ');
                    }
                }
                0x20..=0x7e => {
                    self.in_utf8 = false;
                    self.put(b);
                }
                // A UTF-8 continuation byte: its character has its `?`.
                0x80..=0xbf if self.in_utf8 => {}
                // A UTF-8 lead byte (or a stray continuation byte).
                0x80..=0xff => {
                    self.in_utf8 = true;
                    self.put(b'?');
                }
                _ => {}
            }
        }
    }

    /// Writes one printable byte at the cursor, wrapping and scrolling
    /// first when the cursor is past the end of the line or the screen.
    fn put(&mut self, c: u8) {
        if self.col >= self.cols {
            self.row += 1;
            self.col = 0;
        }
        if self.row >= self.rows {
            self.scroll();
        }
        let i = self.row * self.cols + self.col;
        self.text[i] = c;
        self.sync(i);
        self.col += 1;
    }

    /// Moves the text up by `jump` lines (or all the way, if the cursor
    /// went further down) and redraws the cells that changed.
    fn scroll(&mut self) {
        let by = (self.row + 1 - self.rows).max(self.jump).min(self.rows);
        let (cols, cells) = (self.cols, self.cols * self.rows);
        self.text.copy_within(by * cols..cells, 0);
        self.text[cells - by * cols..cells].fill(b' ');
        self.row = (self.row - by).min(self.rows - 1);
        for i in 0..cells {
            self.sync(i);
        }
    }

    /// Draws cell `i` if the screen shows something else there.
    fn sync(&mut self, i: usize) {
        if self.deferred || self.text[i] == self.shown[i] {
            return;
        }
        if let Some(s) = self.surface.as_mut() {
            s.draw_cell(i / self.cols, i % self.cols, self.text[i]);
            self.drawn += 1;
        }
        self.shown[i] = self.text[i];
    }
}

impl fmt::Write for TextConsole<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.write_bytes(s.as_bytes());
        Ok(())
    }
}

#[cfg(test)]
mod tests;
