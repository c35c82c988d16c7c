//! The glyphs: `font8x8`'s 8x8 ASCII table (public domain, after Daniel
//! Hepper's `font8x8_basic.h`), each row drawn twice, so a cell is 8x16
//! pixels: 128 columns and 48 rows on 1024x768, 100x37 on 800x600.

/// Pixels per cell.
pub const GLYPH_W: usize = 8;
pub const GLYPH_H: usize = 16;

/// The 16 rows of the glyph for the byte `c` (bit 0 of a row is its
/// leftmost pixel). Bytes outside printable ASCII show as `?`.
pub fn glyph(c: u8) -> [u8; GLYPH_H] {
    let c = if (0x20..0x7f).contains(&c) { c } else { b'?' };
    let g = font8x8::legacy::BASIC_LEGACY[c as usize];
    let mut out = [0u8; GLYPH_H];
    for (y, row) in out.iter_mut().enumerate() {
        *row = g[y / 2];
    }
    out
}
