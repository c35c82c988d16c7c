//! Finding and validating the ACPI tables, and the facts dioxide keeps from
//! them ([`Facts`]), read once at boot with no heap.
//!
//! Physical memory is read through [`PhysMem`]: the kernel's implementation
//! reads the boot loader's identity map of the first 4 GiB (before `mm::init`;
//! a table above 4 GiB is [`TableError::Unreadable`] and skipped), and the host
//! tests' ([`Regions`]) reads byte buffers placed at physical addresses.
//!
//! Layouts (ACPI 6.5 §5.2.5): the RSDP is `"RSD PTR "`, a checksum over its
//! first 20 bytes, OEM id at 9, revision at 15, the RSDT's address (u32) at 16;
//! from revision 2 its length (u32) at 20, the XSDT's address (u64) at 24 and
//! an extended checksum over `length` (36) bytes. The RSDT and XSDT are a
//! table header followed by 4-byte (RSDT) or 8-byte (XSDT) table addresses.
//! Every table has a 36-byte header (see [`crate::tables`]) whose length is
//! bounded here (36 ..= [`MAX_TABLE_LEN`]) and whose bytes must sum to 0; a
//! table that fails is skipped and recorded in [`Facts::issues`].
//!
//! Where the RSDP comes from, in this order: the address the boot loader gave
//! (PVH), the copy it gave (multiboot2 tags 15/14), and only when the caller
//! allows it (`may_scan_bios_areas`: a BIOS machine, not UEFI, where the BIOS
//! areas hold nothing meaningful) the scan of the EBDA's first KiB and of
//! 0xE0000..0x100000 on 16-byte boundaries.
//!
//! # Why not the `acpi` crate
//!
//! The project's habit is to use the field's well-kept crate, here rust-osdev
//! `acpi`. It was evaluated and is not used, for these reasons:
//!
//! - `acpi` 6.1.1 (the newest release) does not build on the stable
//!   toolchain this project pins: its `lib.rs` has an unconditional
//!   `#![feature(allocator_api)]`, also with `default-features = false`
//!   (measured: `error[E0554]: #![feature] may not be used on the stable
//!   release channel`). `7.0.0-pre1` builds without `alloc`, but is a
//!   pre-release.
//! - Both read a table as a `&Fadt` (a packed struct of the newest revision,
//!   276 bytes) and gate the extended fields by *revision*, not by the table's
//!   *length*: `Fadt::reset_register` reads bytes 116..129 of a revision-1
//!   FADT, which is 116 bytes long (QEMU's `pc`), and
//!   `Fadt::sleep_control_register` reads bytes 244..256 of a revision-3 FADT,
//!   which is 244 bytes long (QEMU's `q35`): reads past the end of the table,
//!   which in host tests over a byte buffer are out of bounds. Here a field
//!   past `length` is absent.
//! - `find_tables` hands out tables without checking their checksums or
//!   bounding their lengths, and `from_rsdp` continues past a bad RSDP
//!   checksum; here both are refused and recorded. 6.1.1 also reads XSDT
//!   entries through a misaligned `*const u64` (UB; fixed in 7.0.0-pre1).
//! - What dioxide needs is small: 6 tables, ~20 fields, bounded reads over a
//!   `&[u8]`, which test directly against tables dumped from QEMU 7.2 and 10.0
//!   (`testdata/`), instead of a 20-method `Handler` with mapping, port,
//!   PCI and sleep callbacks.
//!
//! The `_S5_` values come from a bounded byte scan ([`crate::s5`]), not an AML
//! interpreter; see there why.

use crate::bytes::{array, sum, u32_at, u64_at};
use crate::s5::{self, S5Error, SleepType};
use crate::tables::{self, EcamRegion, Fadt, Hpet, Madt, Mcfg, Sig, Spcr, TableError, HEADER_LEN};
use core::fmt;

/// Tables longer than this are refused (the largest DSDTs of real servers are
/// a few hundred KiB).
pub const MAX_TABLE_LEN: u32 = 4 << 20;
/// At most this many RSDT/XSDT entries are looked at.
pub const MAX_ENTRIES: usize = 256;
/// At most this many SSDTs are scanned for `_S5_`.
pub const MAX_SSDTS: usize = 32;
/// At most this many problems are kept; the others are only counted.
pub const MAX_ISSUES: usize = 8;

/// Physical memory as the ACPI reader sees it.
pub trait PhysMem {
    /// The `len` bytes at physical address `addr`, or `None` when they are not
    /// all readable (outside what is mapped).
    fn bytes(&self, addr: u64, len: usize) -> Option<&[u8]>;
}

/// Byte buffers at physical addresses (host tests, or a copy of firmware
/// memory): reads must fall inside one region.
pub struct Regions<'a>(pub &'a [(u64, &'a [u8])]);

impl PhysMem for Regions<'_> {
    fn bytes(&self, addr: u64, len: usize) -> Option<&[u8]> {
        self.0.iter().find_map(|(base, b)| {
            let off = usize::try_from(addr.checked_sub(*base)?).ok()?;
            b.get(off..off.checked_add(len)?)
        })
    }
}

/// Where the RSDP was found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RsdpSource {
    /// At the address the boot loader gave (PVH).
    BootAddress(u64),
    /// The boot loader's copy (multiboot2).
    BootCopy,
    /// Found by the BIOS-area scan, at this address.
    BiosScan(u64),
}

/// Why there are no ACPI facts at all.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AcpiError {
    /// No valid RSDP: none given, and the scan was not allowed or found none.
    NoRsdp { scanned: bool },
    /// An RSDP was given but is not one.
    BadRsdp(&'static str),
    /// Neither the XSDT nor the RSDT is usable.
    Root(TableError),
}

impl fmt::Display for AcpiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AcpiError::NoRsdp { scanned: true } => {
                f.write_str("no ACPI RSDP (none from the boot loader, none in the BIOS areas)")
            }
            AcpiError::NoRsdp { scanned: false } => f.write_str(
                "no ACPI RSDP from the boot loader (BIOS areas not scanned on this firmware)",
            ),
            AcpiError::BadRsdp(why) => write!(f, "ACPI RSDP unusable: {why}"),
            AcpiError::Root(e) => write!(f, "ACPI root table (RSDT/XSDT) unusable: {e}"),
        }
    }
}

/// A problem that did not stop the reading.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Issue {
    /// A table (by signature when its header was readable) was skipped.
    Table {
        sig: Sig,
        addr: u64,
        error: TableError,
    },
    /// The XSDT was unusable; the RSDT was used instead.
    XsdtFallback(TableError),
    /// A second table of a kind of which only the first is used.
    Duplicate(Sig),
    /// The root table has more entries than [`MAX_ENTRIES`].
    TooManyEntries(usize),
}

impl fmt::Display for Issue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Issue::Table { sig, addr, error } => {
                write!(f, "table {sig} at {addr:#x} skipped: {error}")
            }
            Issue::XsdtFallback(e) => write!(f, "XSDT unusable ({e}); using the RSDT"),
            Issue::Duplicate(s) => write!(f, "second {s} table ignored"),
            Issue::TooManyEntries(n) => {
                write!(
                    f,
                    "root table lists {n} tables; only the first {MAX_ENTRIES} read"
                )
            }
        }
    }
}

/// A bounded list of [`Issue`]s.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Issues {
    list: [Option<Issue>; MAX_ISSUES],
    n: usize,
    /// Issues beyond [`MAX_ISSUES`], not kept.
    pub dropped: usize,
}

impl Issues {
    const fn new() -> Self {
        Issues {
            list: [None; MAX_ISSUES],
            n: 0,
            dropped: 0,
        }
    }

    fn push(&mut self, i: Issue) {
        match self.list.get_mut(self.n) {
            Some(slot) => {
                *slot = Some(i);
                self.n += 1;
            }
            None => self.dropped += 1,
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = &Issue> {
        self.list[..self.n].iter().flatten()
    }

    pub fn is_empty(&self) -> bool {
        self.n == 0
    }
}

/// Which root table the facts came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Root {
    Rsdt(u64),
    Xsdt(u64),
}

impl fmt::Display for Root {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Root::Rsdt(a) => write!(f, "RSDT at {a:#x}"),
            Root::Xsdt(a) => write!(f, "XSDT at {a:#x}"),
        }
    }
}

/// Everything dioxide keeps from the ACPI tables (a plain copy: no pointer
/// into firmware memory).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Facts {
    /// The RSDP's revision (0: ACPI 1.0, RSDT only; 2: XSDT too).
    pub revision: u8,
    pub oem_id: [u8; 6],
    pub rsdp: RsdpSource,
    pub root: Root,
    /// How many tables the root lists (up to [`MAX_ENTRIES`]).
    pub tables: usize,
    pub madt: Option<Madt>,
    pub mcfg: Option<Mcfg>,
    pub fadt: Option<Fadt>,
    pub hpet: Option<Hpet>,
    pub spcr: Option<Spcr>,
    /// The `\_S5_` sleep type values, or why there are none.
    pub s5: Result<SleepType, S5Error>,
    /// Whether a DMAR (Intel VT-d) or IVRS (AMD-Vi) table is present: an
    /// IOMMU the firmware may have left on.
    pub iommu: Option<Sig>,
    pub issues: Issues,
}

impl Facts {
    /// The PCIe ECAM region of segment 0.
    pub fn ecam(&self) -> Option<EcamRegion> {
        self.mcfg.and_then(|m| m.ecam)
    }

    /// Whether the machine has 8259 PICs to mask: what the MADT's
    /// PCAT_COMPAT flag says; with no MADT, assume a PC (yes).
    pub fn has_8259(&self) -> bool {
        self.madt.is_none_or(|m| m.pcat_compat())
    }

    pub fn cpus(&self) -> usize {
        self.madt.map_or(0, |m| m.apic_ids().len())
    }
}

/// A validated table: its address and bytes (all `length` of them).
struct Table<'m> {
    addr: u64,
    sig: [u8; 4],
    bytes: &'m [u8],
}

/// Reads and validates the table at `addr`.
fn table<'m>(mem: &'m impl PhysMem, addr: u64) -> Result<Table<'m>, (Sig, TableError)> {
    let unknown = Sig(*b"????");
    let head = mem
        .bytes(addr, HEADER_LEN)
        .ok_or((unknown, TableError::Unreadable { addr }))?;
    let sig: [u8; 4] = array(head, 0).ok_or((unknown, TableError::Unreadable { addr }))?;
    let len = u32_at(head, 4).unwrap_or(0);
    if !(HEADER_LEN as u32..=MAX_TABLE_LEN).contains(&len) {
        return Err((Sig(sig), TableError::Length(len)));
    }
    let bytes = mem
        .bytes(addr, len as usize)
        .ok_or((Sig(sig), TableError::Unreadable { addr }))?;
    if sum(bytes) != 0 {
        return Err((Sig(sig), TableError::Checksum));
    }
    Ok(Table { addr, sig, bytes })
}

/// Checks an RSDP's signature and checksums; returns (revision, RSDT, XSDT).
fn check_rsdp(b: &[u8]) -> Result<(u8, u32, Option<u64>), &'static str> {
    if b.get(..8) != Some(b"RSD PTR ") {
        return Err("bad signature");
    }
    let v1 = b.get(..20).ok_or("truncated")?;
    if sum(v1) != 0 {
        return Err("bad checksum");
    }
    let revision = b[15];
    let rsdt = u32_at(b, 16).unwrap_or(0);
    let mut xsdt = None;
    if revision >= 2 {
        let len = u32_at(b, 20).unwrap_or(0) as usize;
        let ext = b.get(..len).filter(|_| len >= 36).ok_or("bad length")?;
        if sum(ext) != 0 {
            return Err("bad extended checksum");
        }
        xsdt = u64_at(b, 24).filter(|&x| x != 0);
    }
    Ok((revision, rsdt, xsdt))
}

/// Scans the BIOS areas for an RSDP: the EBDA's first KiB (its segment is
/// the u16 at 0x40E), then 0xE0000..0x100000.
fn scan_bios_areas(mem: &impl PhysMem) -> Option<(u64, [u8; 36])> {
    let ebda = mem
        .bytes(0x40e, 2)
        .and_then(|b| array::<2>(b, 0))
        .map_or(0, |s| (u16::from_le_bytes(s) as u64) << 4);
    let areas = [(ebda, ebda + 1024), (0xe0000, 0x100000)];
    for (start, end) in areas {
        if start == 0 {
            continue;
        }
        let mut a = start;
        while a + 20 <= end {
            if let Some(b) = mem.bytes(a, 20) {
                if b.starts_with(b"RSD PTR ") && sum(b) == 0 {
                    // Up to 36 bytes (a revision-2 RSDP), if readable.
                    let mut copy = [0u8; 36];
                    let n = if mem.bytes(a, 36).is_some() { 36 } else { 20 };
                    if let Some(all) = mem.bytes(a, n) {
                        copy[..n].copy_from_slice(all);
                    }
                    if check_rsdp(&copy[..n]).is_ok() {
                        return Some((a, copy));
                    }
                }
            }
            a += 16;
        }
    }
    None
}

/// Finds the RSDP; returns where, and its 36 bytes.
fn find_rsdp(
    mem: &impl PhysMem,
    boot_addr: Option<u64>,
    boot_copy: Option<&[u8; 36]>,
    may_scan_bios_areas: bool,
) -> Result<(RsdpSource, [u8; 36]), AcpiError> {
    let mut bad = None;
    if let Some(a) = boot_addr {
        let b = mem.bytes(a, 36).or_else(|| mem.bytes(a, 20)).unwrap_or(&[]);
        match check_rsdp(b) {
            Ok(_) => {
                let mut copy = [0u8; 36];
                copy[..b.len()].copy_from_slice(b);
                return Ok((RsdpSource::BootAddress(a), copy));
            }
            Err(e) => bad = Some(e),
        }
    }
    if let Some(c) = boot_copy {
        match check_rsdp(c) {
            Ok(_) => return Ok((RsdpSource::BootCopy, *c)),
            Err(e) => bad = Some(e),
        }
    }
    if may_scan_bios_areas {
        if let Some((a, copy)) = scan_bios_areas(mem) {
            return Ok((RsdpSource::BiosScan(a), copy));
        }
    }
    Err(match bad {
        Some(why) => AcpiError::BadRsdp(why),
        None => AcpiError::NoRsdp {
            scanned: may_scan_bios_areas,
        },
    })
}

/// Reads the ACPI facts.
///
/// `boot_addr` and `boot_copy` are what the boot loader handed over;
/// `may_scan_bios_areas` allows the BIOS-area scan (pass false on UEFI).
pub fn read_facts(
    mem: &impl PhysMem,
    boot_addr: Option<u64>,
    boot_copy: Option<&[u8; 36]>,
    may_scan_bios_areas: bool,
) -> Result<Facts, AcpiError> {
    let (source, rsdp) = find_rsdp(mem, boot_addr, boot_copy, may_scan_bios_areas)?;
    // `find_rsdp` only returns checked RSDPs.
    let (revision, rsdt, xsdt) = check_rsdp(&rsdp).map_err(AcpiError::BadRsdp)?;
    let mut issues = Issues::new();
    let (root, entry_size, root_table) = match xsdt.map(|x| (x, table(mem, x))) {
        Some((x, Ok(t))) if &t.sig == b"XSDT" => (Root::Xsdt(x), 8, t),
        other => {
            match other {
                Some((_, Ok(t))) => issues.push(Issue::XsdtFallback(TableError::Signature(t.sig))),
                Some((_, Err((_, e)))) => issues.push(Issue::XsdtFallback(e)),
                None => {}
            }
            let t = table(mem, rsdt as u64).map_err(|(_, e)| AcpiError::Root(e))?;
            if &t.sig != b"RSDT" {
                return Err(AcpiError::Root(TableError::Signature(t.sig)));
            }
            (Root::Rsdt(rsdt as u64), 4, t)
        }
    };
    let mut facts = Facts {
        revision,
        oem_id: array(&rsdp, 9).unwrap_or([0; 6]),
        rsdp: source,
        root,
        tables: 0,
        madt: None,
        mcfg: None,
        fadt: None,
        hpet: None,
        spcr: None,
        s5: Err(S5Error::NoDsdt),
        iommu: None,
        issues,
    };
    let entries = root_table.bytes[HEADER_LEN..].chunks_exact(entry_size);
    if entries.len() > MAX_ENTRIES {
        facts.issues.push(Issue::TooManyEntries(entries.len()));
    }
    let mut ssdts = [0u64; MAX_SSDTS];
    let mut nssdt = 0;
    for e in entries.take(MAX_ENTRIES) {
        let addr = if entry_size == 8 {
            u64_at(e, 0).unwrap_or(0)
        } else {
            u32_at(e, 0).unwrap_or(0) as u64
        };
        if addr == 0 {
            continue;
        }
        facts.tables += 1;
        let t = match table(mem, addr) {
            Ok(t) => t,
            Err((sig, error)) => {
                facts.issues.push(Issue::Table { sig, addr, error });
                continue;
            }
        };
        let sig = Sig(t.sig);
        let skip = |facts: &mut Facts, error| facts.issues.push(Issue::Table { sig, addr, error });
        match &t.sig {
            b"FACP" if facts.fadt.is_some() => facts.issues.push(Issue::Duplicate(sig)),
            b"FACP" => match tables::parse_fadt(t.bytes) {
                Ok(f) => facts.fadt = Some(f),
                Err(e) => skip(&mut facts, e),
            },
            b"APIC" if facts.madt.is_some() => facts.issues.push(Issue::Duplicate(sig)),
            b"APIC" => match tables::parse_madt(t.bytes) {
                Ok(m) => facts.madt = Some(m),
                Err(e) => skip(&mut facts, e),
            },
            b"MCFG" if facts.mcfg.is_some() => facts.issues.push(Issue::Duplicate(sig)),
            b"MCFG" => match tables::parse_mcfg(t.bytes) {
                Ok(m) => facts.mcfg = Some(m),
                Err(e) => skip(&mut facts, e),
            },
            b"HPET" if facts.hpet.is_some() => facts.issues.push(Issue::Duplicate(sig)),
            b"HPET" => match tables::parse_hpet(t.bytes) {
                Ok(h) => facts.hpet = Some(h),
                Err(e) => skip(&mut facts, e),
            },
            b"SPCR" if facts.spcr.is_some() => facts.issues.push(Issue::Duplicate(sig)),
            b"SPCR" => match tables::parse_spcr(t.bytes) {
                Ok(s) => facts.spcr = Some(s),
                Err(e) => skip(&mut facts, e),
            },
            b"SSDT" if nssdt < MAX_SSDTS => {
                ssdts[nssdt] = t.addr;
                nssdt += 1;
            }
            b"DMAR" | b"IVRS" => facts.iommu = Some(sig),
            _ => {}
        }
    }
    facts.s5 = find_s5(mem, facts.fadt.as_ref(), &ssdts[..nssdt], &mut facts.issues);
    Ok(facts)
}

/// `_S5_` from the DSDT, then the SSDTs in root-table order.
fn find_s5(
    mem: &impl PhysMem,
    fadt: Option<&Fadt>,
    ssdts: &[u64],
    issues: &mut Issues,
) -> Result<SleepType, S5Error> {
    let mut result = Err(S5Error::NoDsdt);
    if let Some(f) = fadt {
        match table(mem, f.dsdt) {
            Ok(t) if &t.sig == b"DSDT" => result = s5::find_s5(&t.bytes[HEADER_LEN..]),
            Ok(t) => issues.push(Issue::Table {
                sig: Sig(t.sig),
                addr: f.dsdt,
                error: TableError::Signature(t.sig),
            }),
            Err((sig, error)) => issues.push(Issue::Table {
                sig,
                addr: f.dsdt,
                error,
            }),
        }
    }
    for &a in ssdts {
        if result.is_ok() {
            break;
        }
        // SSDTs were validated when the root was walked.
        if let Ok(t) = table(mem, a) {
            match s5::find_s5(&t.bytes[HEADER_LEN..]) {
                Ok(s) => result = Ok(s),
                // Keep the DSDT's reason unless this one says more.
                Err(S5Error::NotFound) if result == Err(S5Error::NoDsdt) => {
                    result = Err(S5Error::NotFound)
                }
                Err(S5Error::NotFound) => {}
                Err(e) if matches!(result, Err(S5Error::NotFound | S5Error::NoDsdt)) => {
                    result = Err(e)
                }
                Err(_) => {}
            }
        }
    }
    result
}

#[cfg(test)]
mod tests;
