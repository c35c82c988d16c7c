//! The `\_S5_` sleep type values, found by a bounded byte scan of the AML.
//!
//! Powering off through ACPI (S5, "soft off") writes SLP_TYPa (and SLP_TYPb)
//! from the `_S5_` object into the PM1 control registers. `_S5_` lives in the
//! DSDT (sometimes an SSDT) as AML. Evaluating it properly takes an AML
//! interpreter (the `acpi` crate's is 5,600 lines, needs a heap, a 30-method
//! handler and runs all of the DSDT's and SSDTs' definition blocks at boot).
//! Every firmware dioxide targets (QEMU, and the servers seen in Linux and
//! small-kernel practice) declares it as a plain named package, so dioxide
//! does what most small kernels do and scans the bytes instead:
//!
//! ```text
//! NameOp 0x08, optional RootChar '\' 0x5C, NameSeg "_S5_",
//! PackageOp 0x12, PkgLength (1..4 bytes), NumElements (u8), elements:
//!   0x00 Zero | 0x01 One | 0xFF Ones | 0x0A u8 BytePrefix
//!   | 0x0B u16 WordPrefix | 0x0C u32 DWordPrefix | 0x0E u64 QWordPrefix
//! PkgLength: lead byte bits 7:6 = how many bytes follow; with none, bits
//!   5:0 are the length; else bits 3:0 are its low nibble and each byte that
//!   follows gives the next 8 bits. The length counts itself and the rest of
//!   the package, and must stay within the table.
//! ```
//!
//! QEMU 7.2 and 10.0 (q35 and pc) have `08 5F 53 35 5F 12 06 04 00 00 00 00`:
//! `Name (_S5, Package (4) {Zero, Zero, Zero, Zero})`, so SLP_TYPa = SLP_TYPb
//! = 0. SLP_TYPa is element 0 and SLP_TYPb element 1; a package of one element
//! holds both in its low two bytes (what Linux's ACPICA accepts).
//!
//! Limits, on purpose: `_S5_` defined by a Method, under an `If`, or through
//! a named constant is not found (the scan reports [`S5Error::NotAPackage`] or
//! [`S5Error::NotFound`] and the kernel falls back to halting). Requiring the
//! NameOp before and the PackageOp after the name makes matching `_S5_` inside
//! a string or a buffer very unlikely.

use core::fmt;

/// SLP_TYPa and SLP_TYPb of the S5 state (3 bits each when written).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SleepType {
    pub a: u8,
    pub b: u8,
}

/// Why no sleep type came out of the scan.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum S5Error {
    /// No `_S5_` name anywhere.
    NotFound,
    /// `_S5_` appears, but not as `Name (_S5_, Package ...)` (e.g. a Method).
    NotAPackage,
    /// The package's PkgLength runs past the table or is shorter than its
    /// own encoding.
    BadLength,
    /// A package with no elements.
    Empty,
    /// An element that is not an integer constant (the opcode).
    Element(u8),
    /// No DSDT to scan (no FADT, or its DSDT was unusable).
    NoDsdt,
}

impl fmt::Display for S5Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            S5Error::NotFound => f.write_str("no _S5_ in the DSDT or SSDTs"),
            S5Error::NotAPackage => f.write_str("_S5_ is not a plain Name(_S5_, Package)"),
            S5Error::BadLength => f.write_str("_S5_ package length runs past its table"),
            S5Error::Empty => f.write_str("_S5_ package is empty"),
            S5Error::Element(op) => {
                write!(f, "_S5_ element with opcode {op:#04x} is not a constant")
            }
            S5Error::NoDsdt => f.write_str("no usable DSDT"),
        }
    }
}

const NAME_OP: u8 = 0x08;
const ROOT_CHAR: u8 = 0x5c;
const PACKAGE_OP: u8 = 0x12;

/// Decodes a PkgLength at `b[0..]`: (length, bytes it took).
pub fn pkg_length(b: &[u8]) -> Option<(usize, usize)> {
    let lead = *b.first()?;
    let follow = (lead >> 6) as usize;
    if follow == 0 {
        return Some(((lead & 0x3f) as usize, 1));
    }
    let mut len = (lead & 0x0f) as usize;
    for i in 0..follow {
        len |= (*b.get(1 + i)? as usize) << (4 + 8 * i);
    }
    Some((len, 1 + follow))
}

/// One integer constant at `b[0..]`: (value, bytes it took).
fn integer(b: &[u8]) -> Result<(u64, usize), S5Error> {
    let op = *b.first().ok_or(S5Error::BadLength)?;
    let le = |n: usize| -> Result<(u64, usize), S5Error> {
        let bytes = b.get(1..1 + n).ok_or(S5Error::BadLength)?;
        let v = bytes
            .iter()
            .rev()
            .fold(0u64, |acc, x| (acc << 8) | *x as u64);
        Ok((v, 1 + n))
    };
    match op {
        0x00 => Ok((0, 1)),
        0x01 => Ok((1, 1)),
        0xff => Ok((u64::MAX, 1)),
        0x0a => le(1),
        0x0b => le(2),
        0x0c => le(4),
        0x0e => le(8),
        other => Err(S5Error::Element(other)),
    }
}

/// Decodes the package that follows `_S5_` at `b[0..]` (the PackageOp).
fn package(b: &[u8]) -> Result<SleepType, S5Error> {
    if b.first() != Some(&PACKAGE_OP) {
        return Err(S5Error::NotAPackage);
    }
    let rest = &b[1..];
    let (len, took) = pkg_length(rest).ok_or(S5Error::BadLength)?;
    if len < took + 1 || len > rest.len() {
        return Err(S5Error::BadLength);
    }
    // The package: its PkgLength, NumElements, elements; all within `len`.
    let pkg = &rest[..len];
    let count = pkg[took];
    if count == 0 {
        return Err(S5Error::Empty);
    }
    let mut at = took + 1;
    let mut values = [0u64; 2];
    for v in values.iter_mut().take(count.min(2) as usize) {
        let (x, n) = integer(&pkg[at..])?;
        *v = x;
        at += n;
    }
    Ok(if count == 1 {
        SleepType {
            a: values[0] as u8,
            b: (values[0] >> 8) as u8,
        }
    } else {
        SleepType {
            a: values[0] as u8,
            b: values[1] as u8,
        }
    })
}

/// Scans AML (a definition block's bytes after its header) for
/// `Name (_S5_, Package ...)`. The first well-formed one wins; a `_S5_`
/// that is not followed by a package is remembered only for the error.
pub fn find_s5(aml: &[u8]) -> Result<SleepType, S5Error> {
    let mut seen = S5Error::NotFound;
    let mut i = 0;
    while let Some(off) = aml[i..].windows(4).position(|w| w == b"_S5_") {
        let at = i + off;
        i = at + 1;
        let named = match at {
            0 => false,
            1 => aml[0] == NAME_OP,
            _ => aml[at - 1] == NAME_OP || (aml[at - 1] == ROOT_CHAR && aml[at - 2] == NAME_OP),
        };
        if !named {
            seen = S5Error::NotAPackage;
            continue;
        }
        match package(&aml[at + 4..]) {
            Ok(t) => return Ok(t),
            Err(e) => seen = e,
        }
    }
    Err(seen)
}

/// The PM1 control register values of the S5 sequence, from its current
/// value: SLP_TYP (bits 12:10) set with SLP_EN (bit 13) clear, then the same
/// with SLP_EN set. Other bits (SCI_EN) are kept.
pub fn pm1_cnt_values(current: u16, slp_typ: u8) -> (u16, u16) {
    const SLP_TYP_MASK: u16 = 7 << 10;
    const SLP_EN: u16 = 1 << 13;
    let v = (current & !(SLP_TYP_MASK | SLP_EN)) | (((slp_typ & 7) as u16) << 10);
    (v, v | SLP_EN)
}

/// The hardware-reduced SLEEP_CONTROL_REG value: SLP_TYPx (bits 4:2) and
/// SLP_EN (bit 5).
pub fn sleep_control_value(slp_typ: u8) -> u8 {
    ((slp_typ & 7) << 2) | (1 << 5)
}

#[cfg(test)]
mod tests {
    use super::*;

    const QEMU: [u8; 12] = [0x08, 0x5f, 0x53, 0x35, 0x5f, 0x12, 0x06, 0x04, 0, 0, 0, 0];

    #[test]
    fn qemu_fragment_gives_zero_zero() {
        assert_eq!(find_s5(&QEMU), Ok(SleepType { a: 0, b: 0 }));
    }

    /// QEMU's DSDTs with where `_S5_` is in each (from the table's start).
    /// QEMU 10.0's are longer (q35 8292 bytes, 7.2's 8180; pc 8518, 7.2's
    /// 6333): a PCI `EDSM` method and CPU hot-unplug changes in both, and in
    /// pc the PCI0 `_PRT` a precomputed package where 7.2 had a loop
    /// building it, so `_S5_` moved; its package is the same.
    const QEMU_DSDTS: [(&str, &[u8], usize); 4] = [
        (
            "7.2 q35",
            include_bytes!("../testdata/qemu-7.2-q35/DSDT.bin"),
            7765,
        ),
        (
            "7.2 pc",
            include_bytes!("../testdata/qemu-7.2-pc/DSDT.bin"),
            2891,
        ),
        (
            "10.0 q35",
            include_bytes!("../testdata/qemu-10.0-q35/DSDT.bin"),
            7918,
        ),
        (
            "10.0 pc",
            include_bytes!("../testdata/qemu-10.0-pc/DSDT.bin"),
            4742,
        ),
    ];

    #[test]
    fn qemu_dsdts_q35_and_pc() {
        for (v, dsdt, at) in QEMU_DSDTS {
            assert_eq!(&dsdt[at - 1..at + 11], &QEMU, "{v}");
            let mut found = dsdt.windows(4).enumerate().filter(|(_, w)| w == b"_S5_");
            assert_eq!(found.next().map(|(i, _)| i), Some(at), "{v}");
            assert!(found.next().is_none(), "{v}: one _S5_ only");
            assert_eq!(find_s5(&dsdt[36..]), Ok(SleepType { a: 0, b: 0 }), "{v}");
        }
    }

    #[test]
    fn byte_prefix_values_and_root_prefix() {
        // Name (\_S5, Package (2) {0x05, 0x07}) after some other AML.
        let aml = [
            0x10, 0x05, 0x5c, 0x00, 0x08, 0x5c, b'_', b'S', b'5', b'_', 0x12, 0x06, 0x02, 0x0a,
            0x05, 0x0a, 0x07,
        ];
        assert_eq!(find_s5(&aml), Ok(SleepType { a: 5, b: 7 }));
    }

    #[test]
    fn word_dword_ones_and_one_element_forms() {
        let pkg = |elems: &[u8], n: u8| {
            let mut v = std::vec![
                0x08,
                b'_',
                b'S',
                b'5',
                b'_',
                0x12,
                (elems.len() + 2) as u8,
                n
            ];
            v.extend_from_slice(elems);
            v
        };
        assert_eq!(
            find_s5(&pkg(&[0x0b, 0x06, 0x00, 0x0c, 0x03, 0, 0, 0], 2)),
            Ok(SleepType { a: 6, b: 3 })
        );
        assert_eq!(
            find_s5(&pkg(&[0x01, 0xff], 2)),
            Ok(SleepType { a: 1, b: 0xff })
        );
        // One element: a in its low byte, b in the next.
        assert_eq!(
            find_s5(&pkg(&[0x0b, 0x05, 0x07], 1)),
            Ok(SleepType { a: 5, b: 7 })
        );
        assert_eq!(find_s5(&pkg(&[], 0)), Err(S5Error::Empty));
        assert_eq!(find_s5(&pkg(&[0x70, 0x00], 2)), Err(S5Error::Element(0x70)));
    }

    #[test]
    fn absent_or_not_a_package() {
        assert_eq!(find_s5(&[]), Err(S5Error::NotFound));
        assert_eq!(
            find_s5(b"\x08_S4_\x12\x06\x04\x00\x00\x00\x00"),
            Err(S5Error::NotFound)
        );
        // Method (_S5) {...}: MethodOp 0x14 PkgLength NameSeg.
        assert_eq!(
            find_s5(b"\x14\x08_S5_\x00\xa4\x00"),
            Err(S5Error::NotAPackage)
        );
        // In a string: no NameOp before it.
        assert_eq!(find_s5(b"\x0dabc_S5_\x00"), Err(S5Error::NotAPackage));
        // `_S5_` at the very start has no NameOp.
        assert_eq!(
            find_s5(b"_S5_\x12\x06\x04\x00\x00\x00\x00"),
            Err(S5Error::NotAPackage)
        );
    }

    #[test]
    fn a_bad_first_match_does_not_hide_a_good_one() {
        let mut aml = b"\x0d_S5_\x00".to_vec();
        aml.extend_from_slice(&QEMU);
        assert_eq!(find_s5(&aml), Ok(SleepType { a: 0, b: 0 }));
    }

    #[test]
    fn truncated_packages_are_refused() {
        for cut in 6..QEMU.len() {
            assert!(find_s5(&QEMU[..cut]).is_err(), "cut at {cut}");
        }
        // PkgLength says 0x3f bytes but the table ends.
        assert_eq!(
            find_s5(b"\x08_S5_\x12\x3f\x02\x00\x00"),
            Err(S5Error::BadLength)
        );
        // A PkgLength lead byte announcing 3 more bytes that are not there.
        assert_eq!(find_s5(b"\x08_S5_\x12\xc0\x01"), Err(S5Error::BadLength));
        // A length shorter than its own encoding plus NumElements.
        assert_eq!(
            find_s5(b"\x08_S5_\x12\x01\x02\x00\x00"),
            Err(S5Error::BadLength)
        );
        // Elements that run past the package's length.
        assert_eq!(
            find_s5(b"\x08_S5_\x12\x04\x02\x0a\x05\x0a\x07"),
            Err(S5Error::BadLength)
        );
    }

    #[test]
    fn pkg_length_encodings() {
        assert_eq!(pkg_length(&[0x06]), Some((6, 1)));
        assert_eq!(pkg_length(&[0x45, 0x12]), Some((0x125, 2)));
        assert_eq!(pkg_length(&[0x81, 0x23, 0x45]), Some((0x45231, 3)));
        assert_eq!(pkg_length(&[0xc1, 0x23, 0x45, 0x67]), Some((0x6745231, 4)));
        assert_eq!(pkg_length(&[0x81, 0x23]), None);
        assert_eq!(pkg_length(&[]), None);
    }

    #[test]
    fn register_values() {
        // SCI_EN (bit 0) kept; old SLP_TYP and SLP_EN cleared.
        assert_eq!(pm1_cnt_values(0x0001, 0), (0x0001, 0x2001));
        assert_eq!(pm1_cnt_values(0x3c01, 5), (0x1401, 0x3401));
        assert_eq!(pm1_cnt_values(0, 0xff), (0x1c00, 0x3c00));
        assert_eq!(sleep_control_value(5), 0x34);
        assert_eq!(sleep_control_value(0), 0x20);
    }
}
