//! T10 protection information (PI) as NVMe namespaces carry it: the tuple
//! stored with each logical block, its guard (a CRC of the block's data),
//! how a writer generates it and how a reader checks it.
//!
//! Two tuple formats (the namespace's Protection Information Format):
//!
//! | format | bytes | layout (all big-endian) |
//! |--------|-------|-------------------------|
//! | 16-bit guard | 8 | guard `u16` at 0, application tag `u16` at 2, reference tag `u32` at 4 |
//! | 64-bit guard | 16 | guard `u64` at 0, application tag `u16` at 8, reference tag 48 bits at 10 (no storage tag) |
//!
//! Guards: CRC-16/T10-DIF (polynomial 0x8BB7, initial value 0, not
//! reflected, no final XOR) and CRC-64/NVMe (reflected polynomial
//! 0x9A6C9329AC4BC9B5, initial value and final XOR all ones), both from the
//! `crc` crate's catalogue, table-driven (16 tables: slice-by-16).
//!
//! Types: 1 (the reference tag is the block's LBA, truncated), 2 (the
//! reference tag is an initial tag given per command plus the block's
//! index), 3 (the reference tag is opaque and never checked). Blocks never
//! written carry the escape: an application tag of all ones disables every
//! check of the block for types 1 and 2; type 3 needs the reference tag of
//! all ones too (as Linux's `t10_pi_verify` and the NVMe specification
//! read it).
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]

use crc::{Crc, Table};

/// The guard's size: the namespace's Protection Information Format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuardSize {
    /// 16-bit guard (CRC-16/T10-DIF), 8-byte tuple (NVMe PIF 0).
    Crc16,
    /// 64-bit guard (CRC-64/NVMe), 16-byte tuple (NVMe PIF 2).
    Crc64,
}

impl GuardSize {
    /// Bytes of one tuple.
    pub const fn tuple_len(self) -> usize {
        match self {
            GuardSize::Crc16 => 8,
            GuardSize::Crc64 => 16,
        }
    }
    /// The reference tag's bits: 32 or 48.
    pub const fn reftag_mask(self) -> u64 {
        match self {
            GuardSize::Crc16 => 0xffff_ffff,
            GuardSize::Crc64 => 0xffff_ffff_ffff,
        }
    }
}

/// The protection type the namespace is formatted with (1 to 3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PiType {
    Type1,
    Type2,
    Type3,
}

bitflags::bitflags! {
    /// What a reader checks (NVMe PRCHK: guard, application tag,
    /// reference tag).
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct Checks: u8 {
        const REF = 1 << 0;
        const APP = 1 << 1;
        const GUARD = 1 << 2;
    }
}

/// One block's protection information.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tuple {
    pub guard: u64,
    pub app: u16,
    /// 32 or 48 bits ([`GuardSize::reftag_mask`]).
    pub reftag: u64,
}

const CRC16: Crc<u16, Table<16>> = Crc::<u16, Table<16>>::new(&crc::CRC_16_T10_DIF);
const CRC64: Crc<u64, Table<16>> = Crc::<u64, Table<16>>::new(&crc::CRC_64_NVME);

/// The guard of a block's data.
pub fn guard(size: GuardSize, data: &[u8]) -> u64 {
    match size {
        GuardSize::Crc16 => CRC16.checksum(data) as u64,
        GuardSize::Crc64 => CRC64.checksum(data),
    }
}

impl Tuple {
    /// The tuple at the start of `bytes`; `None` when `bytes` is shorter
    /// than one tuple.
    pub fn parse(size: GuardSize, bytes: &[u8]) -> Option<Tuple> {
        let b = bytes.get(..size.tuple_len())?;
        let be = |r: core::ops::Range<usize>| b[r].iter().fold(0u64, |v, &x| v << 8 | x as u64);
        Some(match size {
            GuardSize::Crc16 => Tuple {
                guard: be(0..2),
                app: be(2..4) as u16,
                reftag: be(4..8),
            },
            GuardSize::Crc64 => Tuple {
                guard: be(0..8),
                app: be(8..10) as u16,
                reftag: be(10..16),
            },
        })
    }

    /// Writes the tuple to the start of `out`; false (nothing written) when
    /// `out` is shorter than one tuple. Bits above the format's widths are
    /// dropped.
    pub fn emit(&self, size: GuardSize, out: &mut [u8]) -> bool {
        let Some(b) = out.get_mut(..size.tuple_len()) else {
            return false;
        };
        let mut put = |r: core::ops::Range<usize>, v: u64| {
            let n = r.len();
            for (i, x) in b[r].iter_mut().enumerate() {
                *x = (v >> (8 * (n - 1 - i))) as u8;
            }
        };
        match size {
            GuardSize::Crc16 => {
                put(0..2, self.guard);
                put(2..4, self.app as u64);
                put(4..8, self.reftag);
            }
            GuardSize::Crc64 => {
                put(0..8, self.guard);
                put(8..10, self.app as u64);
                put(10..16, self.reftag);
            }
        }
        true
    }
}

/// The tuple a writer stores with `data`: its guard, application tag `app`
/// and reference tag `reftag` (type 1: the block's LBA; type 2: the
/// command's initial tag plus the block's index; type 3: any value),
/// truncated to the format's width.
pub fn generate(size: GuardSize, data: &[u8], reftag: u64, app: u16) -> Tuple {
    Tuple {
        guard: guard(size, data),
        app,
        reftag: reftag & size.reftag_mask(),
    }
}

/// What a reader expects of a block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Expect {
    pub checks: Checks,
    /// The block's reference tag (types 1 and 2), before truncation.
    pub reftag: u64,
    /// The application tag, compared under `app_mask` (bits set: compared).
    pub app: u16,
    pub app_mask: u16,
}

/// Which tag of a block did not match, with what was expected and found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mismatch {
    Guard { expected: u64, found: u64 },
    App { expected: u16, found: u16 },
    Ref { expected: u64, found: u64 },
}

impl core::fmt::Display for Mismatch {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Mismatch::Guard { expected, found } => {
                write!(f, "guard tag {found:#x}, expected {expected:#x}")
            }
            Mismatch::App { expected, found } => {
                write!(f, "application tag {found:#06x}, expected {expected:#06x}")
            }
            Mismatch::Ref { expected, found } => {
                write!(f, "reference tag {found:#x}, expected {expected:#x}")
            }
        }
    }
}

/// How a block passed [`verify`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verified {
    /// Every asked check held.
    Checked,
    /// The block carries the escape (never written with protection): no
    /// check applies.
    Escaped,
}

/// Checks `data` against its stored `tuple`: the escape first, then the
/// guard, the application tag under its mask and (types 1 and 2) the
/// reference tag, each only when `expect.checks` asks for it.
pub fn verify(
    size: GuardSize,
    ty: PiType,
    data: &[u8],
    tuple: &Tuple,
    expect: &Expect,
) -> Result<Verified, Mismatch> {
    let mask = size.reftag_mask();
    let escaped = match ty {
        PiType::Type1 | PiType::Type2 => tuple.app == 0xffff,
        PiType::Type3 => tuple.app == 0xffff && tuple.reftag & mask == mask,
    };
    if escaped {
        return Ok(Verified::Escaped);
    }
    if expect.checks.contains(Checks::GUARD) {
        let g = guard(size, data);
        if g != tuple.guard {
            return Err(Mismatch::Guard {
                expected: g,
                found: tuple.guard,
            });
        }
    }
    if expect.checks.contains(Checks::APP) && (tuple.app ^ expect.app) & expect.app_mask != 0 {
        return Err(Mismatch::App {
            expected: expect.app,
            found: tuple.app,
        });
    }
    if expect.checks.contains(Checks::REF)
        && ty != PiType::Type3
        && tuple.reftag & mask != expect.reftag & mask
    {
        return Err(Mismatch::Ref {
            expected: expect.reftag & mask,
            found: tuple.reftag & mask,
        });
    }
    Ok(Verified::Checked)
}

#[cfg(test)]
mod tests;
