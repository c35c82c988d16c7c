//! The reader against QEMU 7.2's own tables, placed at the addresses SeaBIOS
//! put them (dumped from guest RAM with QMP `pmemsave`), and against
//! synthetic tables for what QEMU does not make (XSDT, SPCR, SSDT, broken
//! tables).

use super::*;
use crate::tables::{Gas, ResetRegister, UartRegs};
use std::vec::Vec;

macro_rules! q35 {
    ($t:literal) => {
        include_bytes!(concat!("../../testdata/qemu-7.2-q35/", $t, ".bin"))
    };
}
macro_rules! pc {
    ($t:literal) => {
        include_bytes!(concat!("../../testdata/qemu-7.2-pc/", $t, ".bin"))
    };
}

/// The q35 tables where SeaBIOS put them (`-m 128`).
fn q35_regions() -> Vec<(u64, &'static [u8])> {
    vec![
        (0xf59e0, &q35!("RSDP")[..]),
        (0x7fe223c, &q35!("RSDT")[..]),
        (0x7fe2034, &q35!("FACP")[..]),
        (0x7fe2128, &q35!("APIC")[..]),
        (0x7fe21a0, &q35!("HPET")[..]),
        (0x7fe21d8, &q35!("MCFG")[..]),
        (0x7fe2214, &q35!("WAET")[..]),
        (0x7fe0040, &q35!("DSDT")[..]),
    ]
}

fn pc_regions() -> Vec<(u64, &'static [u8])> {
    vec![
        (0xf59d0, &pc!("RSDP")[..]),
        (0x7fe1a49, &pc!("RSDT")[..]),
        (0x7fe18fd, &pc!("FACP")[..]),
        (0x7fe1971, &pc!("APIC")[..]),
        (0x7fe19e9, &pc!("HPET")[..]),
        (0x7fe1a21, &pc!("WAET")[..]),
        (0x7fe0040, &pc!("DSDT")[..]),
    ]
}

fn rsdp_copy(b: &[u8]) -> [u8; 36] {
    let mut c = [0u8; 36];
    c[..b.len()].copy_from_slice(b);
    c
}

#[test]
fn qemu_q35_from_the_pvh_address() {
    let r = q35_regions();
    let f = read_facts(&Regions(&r), Some(0xf59e0), None, false).unwrap();
    assert_eq!(f.revision, 0);
    assert_eq!(&f.oem_id, b"BOCHS ");
    assert_eq!(f.rsdp, RsdpSource::BootAddress(0xf59e0));
    assert_eq!(f.root, Root::Rsdt(0x7fe223c));
    assert_eq!(f.tables, 5);
    assert_eq!(f.cpus(), 1);
    assert!(f.has_8259());
    assert_eq!(
        f.ecam().map(|e| (e.base, e.bus_end)),
        Some((0xb000_0000, 0xff))
    );
    let fadt = f.fadt.unwrap();
    assert_eq!(fadt.pm_timer, Some(Gas::io(0x608, 32)));
    assert_eq!(fadt.pm_timer_bits(), 24);
    assert_eq!(
        fadt.reset,
        Some(ResetRegister {
            reg: Gas::io(0xcf9, 8),
            value: 0x0f
        })
    );
    assert_eq!(f.hpet.map(|h| h.base), Some(0xfed0_0000));
    assert_eq!(f.spcr, None);
    assert_eq!(f.s5, Ok(SleepType { a: 0, b: 0 }));
    assert_eq!(f.iommu, None);
    assert!(f.issues.is_empty(), "{:?}", f.issues);
}

#[test]
fn qemu_q35_from_a_multiboot2_copy() {
    let r = q35_regions();
    let copy = rsdp_copy(q35!("RSDP"));
    let f = read_facts(&Regions(&r), None, Some(&copy), false).unwrap();
    assert_eq!(f.rsdp, RsdpSource::BootCopy);
    assert_eq!(f.s5, Ok(SleepType { a: 0, b: 0 }));
}

#[test]
fn qemu_pc_found_by_the_bios_scan() {
    // The BIOS data area (EBDA segment 0x9fc0 at 0x40e), an empty EBDA and
    // the 0xe0000 area with the RSDP in it.
    let mut bda = vec![0u8; 0x100];
    bda[0x0e..0x10].copy_from_slice(&0x9fc0u16.to_le_bytes());
    let ebda = vec![0u8; 1024];
    let mut area = vec![0u8; 0x20000];
    let off = 0xf59d0 - 0xe0000;
    area[off..off + 20].copy_from_slice(pc!("RSDP"));
    let mut r = pc_regions();
    r.retain(|(a, _)| *a != 0xf59d0);
    r.extend([
        (0x400, &bda[..]),
        (0x9fc00, &ebda[..]),
        (0xe0000, &area[..]),
    ]);
    let f = read_facts(&Regions(&r), None, None, true).unwrap();
    assert_eq!(f.rsdp, RsdpSource::BiosScan(0xf59d0));
    // pc: no MCFG, FADT revision 1 without a reset register, still an HPET.
    assert_eq!(f.ecam(), None);
    let fadt = f.fadt.unwrap();
    assert_eq!((fadt.revision, fadt.reset), (1, None));
    assert_eq!(fadt.pm1a_cnt, Some(Gas::io(0x604, 16)));
    assert_eq!(f.hpet.map(|h| h.base), Some(0xfed0_0000));
    assert_eq!(f.s5, Ok(SleepType { a: 0, b: 0 }));
    // Not allowed to scan (UEFI): nothing.
    assert_eq!(
        read_facts(&Regions(&r), None, None, false),
        Err(AcpiError::NoRsdp { scanned: false })
    );
}

#[test]
fn no_rsdp_anywhere() {
    let bda = [0u8; 0x100];
    let area = vec![0u8; 0x20000];
    let r = [(0x400, &bda[..]), (0xe0000, &area[..])];
    assert_eq!(
        read_facts(&Regions(&r), None, None, true),
        Err(AcpiError::NoRsdp { scanned: true })
    );
}

#[test]
fn bad_rsdp_checksum_is_refused_then_the_copy_is_tried() {
    let mut bad = q35!("RSDP").to_vec();
    bad[8] ^= 1;
    let mut r = q35_regions();
    r[0] = (0xf59e0, &bad[..]);
    assert_eq!(
        read_facts(&Regions(&r), Some(0xf59e0), None, false),
        Err(AcpiError::BadRsdp("bad checksum"))
    );
    let good = rsdp_copy(q35!("RSDP"));
    let f = read_facts(&Regions(&r), Some(0xf59e0), Some(&good), false).unwrap();
    assert_eq!(f.rsdp, RsdpSource::BootCopy);
    let mut sig = rsdp_copy(q35!("RSDP"));
    sig[0] = b'X';
    assert_eq!(
        read_facts(&Regions(&r), None, Some(&sig), false),
        Err(AcpiError::BadRsdp("bad signature"))
    );
}

/// Synthetic tables: `table` from the tables tests.
use crate::tables::tests::{spcr, table};

/// A revision-2 RSDP pointing at `xsdt` (and `rsdt`).
fn rsdp2(rsdt: u32, xsdt: u64) -> [u8; 36] {
    let mut r = [0u8; 36];
    r[..8].copy_from_slice(b"RSD PTR ");
    r[9..15].copy_from_slice(b"DXTEST");
    r[15] = 2;
    r[16..20].copy_from_slice(&rsdt.to_le_bytes());
    r[20..24].copy_from_slice(&36u32.to_le_bytes());
    r[24..32].copy_from_slice(&xsdt.to_le_bytes());
    r[8] = 0u8.wrapping_sub(crate::bytes::sum(&r[..20]));
    r[32] = 0u8.wrapping_sub(crate::bytes::sum(&r));
    r
}

fn xsdt(entries: &[u64]) -> Vec<u8> {
    let b: Vec<u8> = entries.iter().flat_map(|e| e.to_le_bytes()).collect();
    table(b"XSDT", 1, &b)
}

fn rsdt(entries: &[u32]) -> Vec<u8> {
    let b: Vec<u8> = entries.iter().flat_map(|e| e.to_le_bytes()).collect();
    table(b"RSDT", 1, &b)
}

/// A FADT revision 1 (QEMU pc's) pointing at `dsdt`.
fn fadt_with_dsdt(dsdt: u32) -> Vec<u8> {
    let mut t = pc!("FACP").to_vec();
    t[40..44].copy_from_slice(&dsdt.to_le_bytes());
    t[9] = 0;
    t[9] = 0u8.wrapping_sub(crate::bytes::sum(&t));
    t
}

fn gas_io(port: u64) -> [u8; 12] {
    let mut g = [0u8; 12];
    g[0] = 1;
    g[1] = 8;
    g[3] = 1;
    g[4..].copy_from_slice(&port.to_le_bytes());
    g
}

#[test]
fn xsdt_with_spcr_and_s5_in_an_ssdt() {
    // DSDT without _S5_; an SSDT with Name (\_S5, Package (2) {0x05, 0x05}).
    let dsdt = table(b"DSDT", 2, &[0x10, 0x03, 0x5c, 0x00]);
    let ssdt = table(
        b"SSDT",
        2,
        &[
            0x08, 0x5c, b'_', b'S', b'5', b'_', 0x12, 0x06, 0x02, 0x0a, 0x05, 0x0a, 0x05,
        ],
    );
    let fadt = fadt_with_dsdt(0x5000);
    let spcr = spcr(2, gas_io(0x2f8), 7, &[]);
    let madt = table(
        b"APIC",
        4,
        &[0, 0, 0xe0, 0xfe, 0, 0, 0, 0, 0, 8, 0, 0, 1, 0, 0, 0],
    );
    let dmar = table(b"DMAR", 1, &[0; 12]);
    let x = xsdt(&[0x1000, 0x2000, 0x3000, 0x4000, 0x6000]);
    let rsdp = rsdp2(0xdead_0000, 0x100);
    let r = [
        (0x80u64, &rsdp[..]),
        (0x100, &x[..]),
        (0x1000, &fadt[..]),
        (0x2000, &spcr[..]),
        (0x3000, &madt[..]),
        (0x4000, &ssdt[..]),
        (0x5000, &dsdt[..]),
        (0x6000, &dmar[..]),
    ];
    let f = read_facts(&Regions(&r), Some(0x80), None, false).unwrap();
    assert_eq!((f.revision, f.root), (2, Root::Xsdt(0x100)));
    assert_eq!(&f.oem_id, b"DXTEST");
    assert_eq!(f.tables, 5);
    let s = f.spcr.unwrap();
    assert_eq!(
        (s.regs, s.baud),
        (UartRegs::Io { port: 0x2f8 }, Some(115200))
    );
    // MADT flags 0: no 8259s to mask.
    assert!(!f.has_8259());
    assert_eq!(f.cpus(), 1);
    assert_eq!(f.s5, Ok(SleepType { a: 5, b: 5 }));
    assert_eq!(f.iommu, Some(Sig(*b"DMAR")));
    assert!(f.issues.is_empty(), "{:?}", f.issues);
}

#[test]
fn s5_absent_everywhere() {
    let dsdt = table(b"DSDT", 2, &[0x10, 0x03, 0x5c, 0x00]);
    let fadt = fadt_with_dsdt(0x5000);
    let x = xsdt(&[0x1000]);
    let rsdp = rsdp2(0, 0x100);
    let r = [
        (0x80u64, &rsdp[..]),
        (0x100, &x[..]),
        (0x1000, &fadt[..]),
        (0x5000, &dsdt[..]),
    ];
    let f = read_facts(&Regions(&r), Some(0x80), None, false).unwrap();
    assert_eq!(f.s5, Err(S5Error::NotFound));
    // No FADT: no DSDT to look in.
    let x = xsdt(&[]);
    let r = [(0x80u64, &rsdp[..]), (0x100, &x[..])];
    let f = read_facts(&Regions(&r), Some(0x80), None, false).unwrap();
    assert_eq!((f.s5, f.fadt, f.madt), (Err(S5Error::NoDsdt), None, None));
    // No MADT: assume a PC, mask the 8259s.
    assert!(f.has_8259());
}

#[test]
fn bad_checksum_and_truncated_tables_are_skipped_and_recorded() {
    let mut hpet = q35!("HPET").to_vec();
    hpet[50] ^= 0x40;
    let fadt = q35!("FACP");
    // A table whose header says 244 bytes, of which 100 are readable.
    let cut = &fadt[..100];
    let short_madt = table(b"APIC", 1, &[0, 0]);
    let x = xsdt(&[0x1000, 0x2000, 0x3000, 0x1_0000_0000, 0x4000]);
    let rsdp = rsdp2(0, 0x100);
    let r = [
        (0x80u64, &rsdp[..]),
        (0x100, &x[..]),
        (0x1000, &hpet[..]),
        (0x2000, cut),
        (0x3000, &short_madt[..]),
    ];
    let f = read_facts(&Regions(&r), Some(0x80), None, false).unwrap();
    assert_eq!((f.hpet, f.fadt, f.madt), (None, None, None));
    let issues: Vec<Issue> = f.issues.iter().copied().collect();
    assert_eq!(
        issues,
        vec![
            Issue::Table {
                sig: Sig(*b"HPET"),
                addr: 0x1000,
                error: TableError::Checksum
            },
            Issue::Table {
                sig: Sig(*b"FACP"),
                addr: 0x2000,
                error: TableError::Unreadable { addr: 0x2000 }
            },
            Issue::Table {
                sig: Sig(*b"APIC"),
                addr: 0x3000,
                error: TableError::TooShort { len: 38, need: 44 }
            },
            // Above 4 GiB (not in the regions): its header is unreadable.
            Issue::Table {
                sig: Sig(*b"????"),
                addr: 0x1_0000_0000,
                error: TableError::Unreadable {
                    addr: 0x1_0000_0000
                }
            },
            Issue::Table {
                sig: Sig(*b"????"),
                addr: 0x4000,
                error: TableError::Unreadable { addr: 0x4000 }
            },
        ]
    );
    assert_eq!(
        format!("{}", issues[0]),
        "table HPET at 0x1000 skipped: bad checksum"
    );
}

#[test]
fn implausible_lengths_are_refused() {
    let mut t = table(b"HPET", 1, &[0; 20]);
    t[4..8].copy_from_slice(&(MAX_TABLE_LEN + 1).to_le_bytes());
    let mut tiny = table(b"HPET", 1, &[]);
    tiny[4..8].copy_from_slice(&35u32.to_le_bytes());
    let x = xsdt(&[0x1000, 0x2000]);
    let rsdp = rsdp2(0, 0x100);
    let r = [
        (0x80u64, &rsdp[..]),
        (0x100, &x[..]),
        (0x1000, &t[..]),
        (0x2000, &tiny[..]),
    ];
    let f = read_facts(&Regions(&r), Some(0x80), None, false).unwrap();
    let errors: Vec<TableError> = f
        .issues
        .iter()
        .map(|i| match i {
            Issue::Table { error, .. } => *error,
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(
        errors,
        vec![
            TableError::Length(MAX_TABLE_LEN + 1),
            TableError::Length(35)
        ]
    );
}

#[test]
fn a_bad_xsdt_falls_back_to_the_rsdt() {
    let mut x = xsdt(&[0x1000]);
    x[20] ^= 1;
    let rs = rsdt(&[0x1000]);
    let hpet = q35!("HPET");
    let rsdp = rsdp2(0x200, 0x100);
    let r = [
        (0x80u64, &rsdp[..]),
        (0x100, &x[..]),
        (0x200, &rs[..]),
        (0x1000, &hpet[..]),
    ];
    let f = read_facts(&Regions(&r), Some(0x80), None, false).unwrap();
    assert_eq!(f.root, Root::Rsdt(0x200));
    assert!(f.hpet.is_some());
    assert_eq!(
        f.issues.iter().copied().collect::<Vec<_>>(),
        vec![Issue::XsdtFallback(TableError::Checksum)]
    );
    // And with neither usable, no facts.
    let mut bad_rsdt = rs.clone();
    bad_rsdt[0] = b'X';
    let r = [
        (0x80u64, &rsdp[..]),
        (0x100, &x[..]),
        (0x200, &bad_rsdt[..]),
    ];
    assert_eq!(
        read_facts(&Regions(&r), Some(0x80), None, false),
        Err(AcpiError::Root(TableError::Checksum))
    );
}

#[test]
fn duplicates_are_ignored_and_issues_are_bounded() {
    let hpet = q35!("HPET");
    let mut entries = vec![0x1000u64, 0x1000];
    // 10 unreadable tables: 8 kept, the rest counted.
    entries.extend((0..10).map(|i| 0x9000 + i * 0x100));
    let x = xsdt(&entries);
    let rsdp = rsdp2(0, 0x100);
    let r = [(0x80u64, &rsdp[..]), (0x100, &x[..]), (0x1000, &hpet[..])];
    let f = read_facts(&Regions(&r), Some(0x80), None, false).unwrap();
    assert_eq!(
        f.issues.iter().next(),
        Some(&Issue::Duplicate(Sig(*b"HPET")))
    );
    assert_eq!(f.issues.iter().count(), MAX_ISSUES);
    assert_eq!(f.issues.dropped, 3);
}

#[test]
fn errors_read_as_sentences() {
    assert_eq!(
        AcpiError::NoRsdp { scanned: false }.to_string(),
        "no ACPI RSDP from the boot loader (BIOS areas not scanned on this firmware)"
    );
    assert_eq!(
        Issue::XsdtFallback(TableError::Length(12)).to_string(),
        "XSDT unusable (implausible length 12); using the RSDT"
    );
}
