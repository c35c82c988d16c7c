//! Checking a screenshot: does the screen show this text at this place?
//!
//! A test takes a screenshot (QEMU's `screendump` writes a binary PPM:
//! `P6\n<width> <height>\n255\n` then 8-bit R, G, B per pixel, top row
//! first), reads it with [`Screen::from_ppm`], and asks [`Screen::text_at`]
//! or [`Screen::find_text`]. The expected pixels are what this crate's
//! renderer draws for the text ([`crate::Surface::draw_cell`] into a 24-bit
//! surface), so the check holds exactly when the guest used this console
//! with 8-bit colour channels (24 or 32 bpp), at the cell grid's origin
//! (the top-left pixel).

use crate::font::{GLYPH_H, GLYPH_W};
use crate::{Format, Surface};

/// A screenshot's pixels: `width` x `height`, 3 bytes (R, G, B) each, rows
/// top to bottom.
#[derive(Clone, Copy, Debug)]
pub struct Screen<'a> {
    pub width: usize,
    pub height: usize,
    pub rgb: &'a [u8],
}

/// Why a PPM was not read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PpmError {
    /// Not `P6` (binary RGB).
    NotP6,
    /// Width, height or maximum value missing or not a number.
    BadHeader,
    /// Maximum value other than 255 (two bytes per channel).
    Not8Bit,
    /// Fewer pixel bytes than width x height x 3.
    Truncated,
}

impl core::fmt::Display for PpmError {
    fn fmt(&self, f: &mut core::fmt::Formatter) -> core::fmt::Result {
        f.write_str(match self {
            PpmError::NotP6 => "not a binary PPM (P6)",
            PpmError::BadHeader => "PPM header without width, height and maximum value",
            PpmError::Not8Bit => "PPM with a maximum value other than 255",
            PpmError::Truncated => "PPM with fewer pixels than its header says",
        })
    }
}

/// Reads the next header number, skipping whitespace and `#` comments.
fn number(b: &[u8], at: &mut usize) -> Result<usize, PpmError> {
    loop {
        match b.get(*at) {
            Some(c) if c.is_ascii_whitespace() => *at += 1,
            Some(b'#') => {
                while b.get(*at).is_some_and(|&c| c != b'\n') {
                    *at += 1;
                }
            }
            _ => break,
        }
    }
    let start = *at;
    let mut v: usize = 0;
    while let Some(&c) = b.get(*at).filter(|c| c.is_ascii_digit()) {
        v = v
            .checked_mul(10)
            .and_then(|v| v.checked_add((c - b'0') as usize))
            .ok_or(PpmError::BadHeader)?;
        *at += 1;
    }
    if *at == start {
        return Err(PpmError::BadHeader);
    }
    Ok(v)
}

impl<'a> Screen<'a> {
    /// Reads a binary PPM (`P6`, maximum value 255).
    pub fn from_ppm(ppm: &'a [u8]) -> Result<Screen<'a>, PpmError> {
        if !ppm.starts_with(b"P6") {
            return Err(PpmError::NotP6);
        }
        let mut at = 2;
        let width = number(ppm, &mut at)?;
        let height = number(ppm, &mut at)?;
        if number(ppm, &mut at)? != 255 {
            return Err(PpmError::Not8Bit);
        }
        // Exactly one whitespace byte before the pixels.
        if !ppm.get(at).is_some_and(|c| c.is_ascii_whitespace()) {
            return Err(PpmError::BadHeader);
        }
        let n = width
            .checked_mul(height)
            .and_then(|n| n.checked_mul(3))
            .ok_or(PpmError::BadHeader)?;
        let rgb = ppm.get(at + 1..at + 1 + n).ok_or(PpmError::Truncated)?;
        Ok(Screen { width, height, rgb })
    }

    /// Text columns and rows of the console on this screen.
    pub fn text_size(&self) -> (usize, usize) {
        (self.width / GLYPH_W, self.height / GLYPH_H)
    }

    /// Whether the cell at text `row`, `col` shows exactly what the
    /// console draws for `c`.
    pub fn cell_is(&self, row: usize, col: usize, c: u8) -> bool {
        let (cols, rows) = self.text_size();
        if row >= rows || col >= cols || self.rgb.len() < self.width * self.height * 3 {
            return false;
        }
        let mut want = [0u8; GLYPH_W * GLYPH_H * 3];
        // 8x16 RGB, tightly packed: always a valid surface.
        let Ok(mut cell) = Surface::new(&mut want, GLYPH_W, GLYPH_H, GLYPH_W * 3, Format::PPM)
        else {
            return false;
        };
        cell.draw_cell(0, 0, c);
        let line = GLYPH_W * 3;
        (0..GLYPH_H).all(|y| {
            let at = ((row * GLYPH_H + y) * self.width + col * GLYPH_W) * 3;
            self.rgb[at..at + line] == want[y * line..(y + 1) * line]
        })
    }

    /// Whether `text` (ASCII; other bytes are drawn as `?`) is shown
    /// starting at text `row`, `col`. An empty text is shown anywhere on
    /// the screen.
    pub fn text_at(&self, row: usize, col: usize, text: &str) -> bool {
        text.bytes()
            .enumerate()
            .all(|(i, c)| self.cell_is(row, col + i, c))
    }

    /// The first column of text `row` where `text` is shown.
    pub fn find_in_row(&self, row: usize, text: &str) -> Option<usize> {
        let (cols, _) = self.text_size();
        (0..=cols.checked_sub(text.len())?).find(|&col| self.text_at(row, col, text))
    }

    /// The first (row, column) where `text` is shown, top to bottom.
    pub fn find_text(&self, text: &str) -> Option<(usize, usize)> {
        let (_, rows) = self.text_size();
        (0..rows).find_map(|r| Some((r, self.find_in_row(r, text)?)))
    }
}
