//! The reader against QEMU 7.2's and QEMU 10.0's own tables, placed at the
//! addresses SeaBIOS put them (dumped from guest RAM with QMP `pmemsave`; see
//! `testdata/README.md`), and against synthetic tables for what QEMU does not
//! make (XSDT, SPCR, SSDT, broken tables).
//!
//! What the reader keeps is the same on both versions: 7.2 → 10.0 moved the
//! tables (and SeaBIOS 1.16.2 → 1.16.3 the RSDP), raised the MADT's revision
//! from 1 to 3 with the same entries, and grew the DSDT (see `crate::s5`);
//! the FADT, HPET and MCFG are byte for byte the same.

use super::*;
use crate::tables::{Gas, ResetRegister, UartRegs};
use std::vec::Vec;

/// One dumped table: `t!("7.2", "q35", "FACP")`.
macro_rules! t {
    ($v:literal, $m:literal, $t:literal) => {
        &include_bytes!(concat!(
            "../../testdata/qemu-",
            $v,
            "-",
            $m,
            "/",
            $t,
            ".bin"
        ))[..]
    };
}
macro_rules! q35 {
    ($t:literal) => {
        t!("7.2", "q35", $t)
    };
}
macro_rules! pc {
    ($t:literal) => {
        t!("7.2", "pc", $t)
    };
}

/// One QEMU version's tables of one machine where SeaBIOS put them
/// (`-m 128`): the RSDP's and the RSDT's addresses and every table.
struct Dump {
    qemu: &'static str,
    rsdp: u64,
    rsdt: u64,
    regions: Vec<(u64, &'static [u8])>,
}

/// q35 on QEMU 7.2 (SeaBIOS 1.16.2) and 10.0 (SeaBIOS 1.16.3).
fn q35_dumps() -> [Dump; 2] {
    [
        Dump {
            qemu: "7.2",
            rsdp: 0xf59e0,
            rsdt: 0x7fe223c,
            regions: vec![
                (0xf59e0, t!("7.2", "q35", "RSDP")),
                (0x7fe223c, t!("7.2", "q35", "RSDT")),
                (0x7fe2034, t!("7.2", "q35", "FACP")),
                (0x7fe2128, t!("7.2", "q35", "APIC")),
                (0x7fe21a0, t!("7.2", "q35", "HPET")),
                (0x7fe21d8, t!("7.2", "q35", "MCFG")),
                (0x7fe2214, t!("7.2", "q35", "WAET")),
                (0x7fe0040, t!("7.2", "q35", "DSDT")),
            ],
        },
        // The DSDT grew by 112 bytes, so every table after it moved.
        Dump {
            qemu: "10.0",
            rsdp: 0xf5250,
            rsdt: 0x7fe22ac,
            regions: vec![
                (0xf5250, t!("10.0", "q35", "RSDP")),
                (0x7fe22ac, t!("10.0", "q35", "RSDT")),
                (0x7fe20a4, t!("10.0", "q35", "FACP")),
                (0x7fe2198, t!("10.0", "q35", "APIC")),
                (0x7fe2210, t!("10.0", "q35", "HPET")),
                (0x7fe2248, t!("10.0", "q35", "MCFG")),
                (0x7fe2284, t!("10.0", "q35", "WAET")),
                (0x7fe0040, t!("10.0", "q35", "DSDT")),
            ],
        },
    ]
}

/// pc (i440FX) on QEMU 7.2 and 10.0.
fn pc_dumps() -> [Dump; 2] {
    [
        Dump {
            qemu: "7.2",
            rsdp: 0xf59d0,
            rsdt: 0x7fe1a49,
            regions: vec![
                (0xf59d0, t!("7.2", "pc", "RSDP")),
                (0x7fe1a49, t!("7.2", "pc", "RSDT")),
                (0x7fe18fd, t!("7.2", "pc", "FACP")),
                (0x7fe1971, t!("7.2", "pc", "APIC")),
                (0x7fe19e9, t!("7.2", "pc", "HPET")),
                (0x7fe1a21, t!("7.2", "pc", "WAET")),
                (0x7fe0040, t!("7.2", "pc", "DSDT")),
            ],
        },
        // A DSDT 2185 bytes longer (the _PRT a precomputed package).
        Dump {
            qemu: "10.0",
            rsdp: 0xf5250,
            rsdt: 0x7fe22d2,
            regions: vec![
                (0xf5250, t!("10.0", "pc", "RSDP")),
                (0x7fe22d2, t!("10.0", "pc", "RSDT")),
                (0x7fe2186, t!("10.0", "pc", "FACP")),
                (0x7fe21fa, t!("10.0", "pc", "APIC")),
                (0x7fe2272, t!("10.0", "pc", "HPET")),
                (0x7fe22aa, t!("10.0", "pc", "WAET")),
                (0x7fe0040, t!("10.0", "pc", "DSDT")),
            ],
        },
    ]
}

impl Dump {
    /// The RSDP's bytes (the region at its address).
    fn rsdp_bytes(&self) -> &'static [u8] {
        self.regions
            .iter()
            .find(|(a, _)| *a == self.rsdp)
            .unwrap()
            .1
    }
}

fn rsdp_copy(b: &[u8]) -> [u8; 36] {
    let mut c = [0u8; 36];
    c[..b.len()].copy_from_slice(b);
    c
}

#[test]
fn qemu_q35_from_the_pvh_address() {
    for d in q35_dumps() {
        let r = &d.regions;
        let f = read_facts(&Regions(r), Some(d.rsdp), None, false).unwrap();
        let v = d.qemu;
        assert_eq!(f.revision, 0, "{v}");
        assert_eq!(&f.oem_id, b"BOCHS ", "{v}");
        assert_eq!(f.rsdp, RsdpSource::BootAddress(d.rsdp), "{v}");
        assert_eq!(f.root, Root::Rsdt(d.rsdt), "{v}");
        assert_eq!(f.tables, 5, "{v}");
        // QEMU 10's MADT is revision 3 (7.2's 1) with the same entries.
        assert_eq!(f.cpus(), 1, "{v}");
        assert!(f.has_8259(), "{v}");
        assert_eq!(
            f.ecam().map(|e| (e.base, e.bus_end)),
            Some((0xb000_0000, 0xff)),
            "{v}"
        );
        let fadt = f.fadt.unwrap();
        assert_eq!(fadt.pm_timer, Some(Gas::io(0x608, 32)), "{v}");
        assert_eq!(fadt.pm_timer_bits(), 24, "{v}");
        assert_eq!(
            fadt.reset,
            Some(ResetRegister {
                reg: Gas::io(0xcf9, 8),
                value: 0x0f
            }),
            "{v}"
        );
        assert_eq!(f.hpet.map(|h| h.base), Some(0xfed0_0000), "{v}");
        assert_eq!(f.spcr, None, "{v}");
        assert_eq!(f.s5, Ok(SleepType { a: 0, b: 0 }), "{v}");
        assert_eq!(f.iommu, None, "{v}");
        assert!(f.issues.is_empty(), "{v}: {:?}", f.issues);
    }
}

#[test]
fn qemu_q35_from_a_multiboot2_copy() {
    for d in q35_dumps() {
        let copy = rsdp_copy(d.rsdp_bytes());
        let f = read_facts(&Regions(&d.regions), None, Some(&copy), false).unwrap();
        assert_eq!(f.rsdp, RsdpSource::BootCopy, "{}", d.qemu);
        assert_eq!(f.root, Root::Rsdt(d.rsdt), "{}", d.qemu);
        assert_eq!(f.s5, Ok(SleepType { a: 0, b: 0 }), "{}", d.qemu);
    }
}

#[test]
fn qemu_pc_found_by_the_bios_scan() {
    for d in pc_dumps() {
        let v = d.qemu;
        // The BIOS data area (EBDA segment 0x9fc0 at 0x40e), an empty EBDA and
        // the 0xe0000 area with the RSDP in it.
        let mut bda = vec![0u8; 0x100];
        bda[0x0e..0x10].copy_from_slice(&0x9fc0u16.to_le_bytes());
        let ebda = vec![0u8; 1024];
        let mut area = vec![0u8; 0x20000];
        let off = (d.rsdp - 0xe0000) as usize;
        area[off..off + 20].copy_from_slice(d.rsdp_bytes());
        let mut r = d.regions.clone();
        r.retain(|(a, _)| *a != d.rsdp);
        r.extend([
            (0x400, &bda[..]),
            (0x9fc00, &ebda[..]),
            (0xe0000, &area[..]),
        ]);
        let f = read_facts(&Regions(&r), None, None, true).unwrap();
        assert_eq!(f.rsdp, RsdpSource::BiosScan(d.rsdp), "{v}");
        assert_eq!(f.root, Root::Rsdt(d.rsdt), "{v}");
        assert_eq!((f.tables, f.cpus()), (4, 1), "{v}");
        // pc: no MCFG, FADT revision 1 without a reset register, still an HPET.
        assert_eq!(f.ecam(), None, "{v}");
        let fadt = f.fadt.unwrap();
        assert_eq!((fadt.revision, fadt.reset), (1, None), "{v}");
        assert_eq!(fadt.pm1a_cnt, Some(Gas::io(0x604, 16)), "{v}");
        assert_eq!(f.hpet.map(|h| h.base), Some(0xfed0_0000), "{v}");
        assert_eq!(f.s5, Ok(SleepType { a: 0, b: 0 }), "{v}");
        assert!(f.issues.is_empty(), "{v}: {:?}", f.issues);
        // Not allowed to scan (UEFI): nothing.
        assert_eq!(
            read_facts(&Regions(&r), None, None, false),
            Err(AcpiError::NoRsdp { scanned: false }),
            "{v}"
        );
    }
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
    for d in q35_dumps() {
        let v = d.qemu;
        let mut bad = d.rsdp_bytes().to_vec();
        bad[8] ^= 1;
        let mut r = d.regions.clone();
        r[0] = (d.rsdp, &bad[..]);
        assert_eq!(
            read_facts(&Regions(&r), Some(d.rsdp), None, false),
            Err(AcpiError::BadRsdp("bad checksum")),
            "{v}"
        );
        let good = rsdp_copy(d.rsdp_bytes());
        let f = read_facts(&Regions(&r), Some(d.rsdp), Some(&good), false).unwrap();
        assert_eq!(f.rsdp, RsdpSource::BootCopy, "{v}");
        let mut sig = rsdp_copy(d.rsdp_bytes());
        sig[0] = b'X';
        assert_eq!(
            read_facts(&Regions(&r), None, Some(&sig), false),
            Err(AcpiError::BadRsdp("bad signature")),
            "{v}"
        );
    }
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
        (0x1000, hpet),
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
    let r = [(0x80u64, &rsdp[..]), (0x100, &x[..]), (0x1000, hpet)];
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
