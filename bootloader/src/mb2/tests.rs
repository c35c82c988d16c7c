//! Golden multiboot2 information from GRUB 2.06 (Debian 2.06-13+deb12u2,
//! QEMU 7.2 q35), and malformed variants.
//!
//! The captured bytes (docs/plans/server-boot.md §B) are written out as hex
//! below: the command line, the BIOS memory map, the framebuffer tags, the
//! ACPI and EFI64 tags, and each tag's offset and the total sizes. Tags whose
//! contents were not kept (21 load base, 2 boot loader name, 10 APM, 9 ELF
//! sections, 4 basic meminfo, 5 boot device, the UEFI E820 map's other
//! entries, the 127 EFI descriptors after the first) are rebuilt with their
//! sizes and plausible contents, so that every captured tag sits at the
//! offset GRUB put it.

use super::*;
use crate::info::{MemoryRegion, MAX_CMDLINE, MAX_REGIONS};
use dioxide_testkit::Rng;

/// Builds an MBI tag by tag, padding each to 8 bytes as GRUB does.
struct Mbi(Vec<u8>);

impl Mbi {
    fn new() -> Mbi {
        Mbi(vec![0; 8])
    }

    /// Appends a tag with `body` after its {type, size} header; returns
    /// its offset.
    fn tag(&mut self, ty: u32, body: &[u8]) -> usize {
        let at = self.0.len();
        self.0.extend_from_slice(&ty.to_le_bytes());
        self.0
            .extend_from_slice(&(8 + body.len() as u32).to_le_bytes());
        self.0.extend_from_slice(body);
        while !self.0.len().is_multiple_of(8) {
            self.0.push(0);
        }
        at
    }

    /// Appends a whole tag given as hex (header included).
    fn raw(&mut self, hex: &str) -> usize {
        let at = self.0.len();
        self.0.extend_from_slice(&unhex(hex));
        while !self.0.len().is_multiple_of(8) {
            self.0.push(0);
        }
        at
    }

    fn end(mut self) -> Vec<u8> {
        self.tag(0, &[]);
        let n = self.0.len() as u32;
        self.0[..4].copy_from_slice(&n.to_le_bytes());
        self.0
    }
}

/// Hex digits, with spaces and `|` ignored and `"..."` taken as ASCII.
fn unhex(s: &str) -> Vec<u8> {
    let mut out = Vec::new();
    let mut parts = s.split('"');
    let mut quoted = false;
    for p in parts.by_ref() {
        if quoted {
            out.extend_from_slice(p.as_bytes());
        } else {
            let digits: Vec<u8> = p.bytes().filter(|b| b.is_ascii_hexdigit()).collect();
            assert!(digits.len().is_multiple_of(2), "odd hex in {p:?}");
            for d in digits.chunks(2) {
                let h = std::str::from_utf8(d).unwrap();
                out.push(u8::from_str_radix(h, 16).unwrap());
            }
        }
        quoted = !quoted;
    }
    out
}

fn le32(v: u32) -> [u8; 4] {
    v.to_le_bytes()
}

fn mmap_body(entries: &[(u64, u64, u32)]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&le32(24));
    b.extend_from_slice(&le32(0));
    for &(base, len, t) in entries {
        b.extend_from_slice(&base.to_le_bytes());
        b.extend_from_slice(&len.to_le_bytes());
        b.extend_from_slice(&le32(t));
        b.extend_from_slice(&le32(0));
    }
    b
}

const CMDLINE_TAG: &str = "01000000 14000000 613d3120 22623d78 207922 00";

/// The BIOS memory map GRUB gave under SeaBIOS, q35, -m 256 (9 entries).
const BIOS_MMAP: [(u64, u64, u32); 9] = [
    (0, 0x9fc00, 1),
    (0x9fc00, 0x400, 2),
    (0xf0000, 0x10000, 2),
    (0x100000, 0xfedf000, 1),
    (0xffdf000, 0x21000, 2),
    (0xb0000000, 0x10000000, 2),
    (0xfed1c000, 0x4000, 2),
    (0xfffc0000, 0x40000, 2),
    (0xfd00000000, 0x300000000, 2),
];

/// The tags GRUB puts before the memory map: 21 (load base 1 MiB), 1, 2
/// ("GRUB 2.06-13+deb12u2").
fn head(m: &mut Mbi) {
    assert_eq!(m.tag(21, &le32(0x100000)), 8);
    assert_eq!(m.raw(CMDLINE_TAG), 24);
    assert_eq!(m.tag(2, b"GRUB 2.06-13+deb12u2\0"), 48);
}

/// SeaBIOS, no framebuffer request: tags 21,1,2,10,6,9,4,5,8,14,0; 760 bytes.
fn bios_mbi() -> Vec<u8> {
    let mut m = Mbi::new();
    head(&mut m);
    assert_eq!(m.tag(10, &[0; 20]), 80);
    assert_eq!(m.tag(6, &mmap_body(&BIOS_MMAP)), 112);
    assert_eq!(&m.0[112..128], unhex("06000000 e8000000 18000000 00000000"));
    assert_eq!(m.tag(9, &[0; 296]), 344);
    m.tag(4, &[0; 8]);
    m.tag(5, &[0; 12]);
    assert_eq!(
        m.raw("08000000 20000000 00800b00 00000000 a0000000 50000000 19000000 10 02 0000"),
        688
    );
    assert_eq!(
        m.raw("0e000000 1c000000 \"RSD PTR \" 87 \"BOCHS \" 00 9c22fe0f"),
        720
    );
    let b = m.end();
    assert_eq!(b.len(), 760);
    b
}

/// The UEFI sample's E820 map (tag 6, 18 entries): the three entries the
/// notes kept, the others rebuilt around the EFI map below.
const UEFI_MMAP: [(u64, u64, u32); 18] = [
    (0, 0xa0000, 1),
    (0x100000, 0x706000, 1),
    (0x806000, 0x2000, 4),
    (0x808000, 0x3000, 1),
    (0x80b000, 0xf5000, 4),
    (0x900000, 0xee6c000, 1),
    (0xf76c000, 0x12000, 3),
    (0xf77e000, 0x80000, 4),
    (0xf7fe000, 0x2000, 20),
    (0xf800000, 0x800000, 1),
    (0xe0000000, 0x10000000, 2),
    (0xfec00000, 0x1000, 2),
    (0xfed00000, 0x1000, 2),
    (0xfed1c000, 0x4000, 2),
    (0xfee00000, 0x1000, 2),
    (0xfeffc000, 0x4000, 2),
    (0xffc00000, 0x400000, 2),
    (0xfd00000000, 0x300000000, 2),
];

/// The UEFI sample's 127 EFI descriptors (phys, pages, type): the first as
/// captured (type 3, phys 0, 1 page), then OVMF's kind of map, with the
/// space between 9 MiB and the ACPI tables cut into 114 boot-services and
/// conventional pieces the way OVMF's map is.
fn efi_descriptors() -> Vec<(u64, u64, u32)> {
    let mut d = vec![
        (0, 1, 3),
        (0x1000, 0x9f, 7),
        (0x100000, 0x706, 7),
        (0x806000, 0x2, 10),
        (0x808000, 0x3, 7),
        (0x80b000, 0x1, 10),
        (0x80c000, 0x4, 10),
        (0x810000, 0xf0, 10),
    ];
    let mut at = 0x900000u64;
    let types = [7, 4, 3, 2, 1];
    for i in 0..114 {
        let pages = if i < 113 {
            0x100
        } else {
            (0xf76c000 - at) / 4096
        };
        d.push((at, pages, types[i % types.len()]));
        at += pages * 4096;
    }
    assert_eq!(at, 0xf76c000);
    d.extend_from_slice(&[
        (0xf76c000, 0x12, 9),
        (0xf77e000, 0x80, 10),
        (0xf7fe000, 0x2, 6),
        (0xf800000, 0x800, 4),
        (0xffc00000, 0x400, 11),
    ]);
    assert_eq!(d.len(), 127);
    d
}

/// Tag 17 with 48-byte descriptors (OVMF's size).
fn efi_mmap_tag(desc_size: u32, descs: &[(u64, u64, u32)]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&le32(desc_size));
    b.extend_from_slice(&le32(1));
    for &(phys, pages, t) in descs {
        let mut d = vec![0u8; desc_size as usize];
        d[..4].copy_from_slice(&le32(t));
        d[8..16].copy_from_slice(&phys.to_le_bytes());
        d[24..32].copy_from_slice(&pages.to_le_bytes());
        if let Some(attr) = d.get_mut(32..40) {
            attr.copy_from_slice(&0xfu64.to_le_bytes()); // UC|WC|WT|WB
        }
        b.extend_from_slice(&d);
    }
    b
}

const UEFI_FB: &str =
    "08000000 26000000 000000c0 00000000 00100000 00040000 00030000 20 01 0000 10 08 08 08 00 08";
const UEFI_EFI64: &str = "0c000000 10000000 18b05e0f 00000000";
const UEFI_ACPI_NEW: &str =
    "0f000000 2c000000 \"RSD PTR \" 96 \"BOCHS \" 02 74c0770f 24000000 e8c0770f00000000 ae 000000";

/// OVMF, -device VGA, fb request 1024x768x32, `insmod all_video`: tags
/// 21,1,2,6,9,4,8,12,14,15,17,0; 7104 bytes. `with_mmap` false leaves tag 6
/// out (the EFI map is then the only one).
fn uefi_mbi(with_mmap: bool) -> Vec<u8> {
    let mut m = Mbi::new();
    head(&mut m);
    if with_mmap {
        assert_eq!(m.tag(6, &mmap_body(&UEFI_MMAP)), 80);
        assert_eq!(m.tag(9, &[0; 296]), 528);
        m.tag(4, &[0; 8]);
    }
    let fb = m.raw(UEFI_FB);
    let efi = m.raw(UEFI_EFI64);
    // RSDP 1.0 copy: rebuilt (same OEM and RSDT as tag 15, checksum fixed).
    let mut old = unhex("\"RSD PTR \" 00 \"BOCHS \" 00 74c0770f");
    old[8] = 0u8.wrapping_sub(old.iter().fold(0u8, |s, b| s.wrapping_add(*b)));
    m.tag(14, &old);
    let new = m.raw(UEFI_ACPI_NEW);
    let emap = m.tag(17, &efi_mmap_tag(48, &efi_descriptors()));
    if with_mmap {
        assert_eq!((fb, efi, new, emap), (848, 888, 936, 984));
        assert_eq!(&m.0[984..992], unhex("11000000 e0170000"));
    }
    let b = m.end();
    if with_mmap {
        assert_eq!(b.len(), 7104);
    }
    b
}

fn parse(bytes: &[u8]) -> Result<Box<BootInfo>, BootError> {
    let mut b = Box::new(BootInfo::empty());
    parse_multiboot2(bytes, MB2_BOOT_MAGIC, &mut b)?;
    Ok(b)
}

fn region(start: u64, len: u64, kind: MemoryKind) -> MemoryRegion {
    MemoryRegion { start, len, kind }
}

fn rsdp_sum(r: &[u8]) -> u8 {
    r.iter().fold(0u8, |s, b| s.wrapping_add(*b))
}

#[test]
fn grub_bios_information_decodes_exactly() {
    let b = parse(&bios_mbi()).unwrap();
    assert_eq!(b.protocol, Protocol::Multiboot2);
    assert_eq!(b.firmware, Firmware::Bios);
    assert_eq!(b.cmdline(), "a=1 \"b=x y\"");
    let want: Vec<_> = BIOS_MMAP
        .iter()
        .map(|&(s, l, t)| region(s, l, MemoryKind::from_e820(t)))
        .collect();
    assert_eq!(b.memory_map(), &want[..]);
    assert_eq!(b.regions_dropped(), 0);
    assert_eq!(
        b.framebuffer,
        Some(Framebuffer {
            addr: 0xb8000,
            pitch: 160,
            width: 80,
            height: 25,
            bpp: 16,
            format: FramebufferFormat::EgaText,
        })
    );
    let rsdp = b.rsdp.unwrap();
    assert_eq!(&rsdp[..8], b"RSD PTR ");
    assert_eq!(rsdp[15], 0, "revision 0");
    assert_eq!(
        u32::from_le_bytes(rsdp[16..20].try_into().unwrap()),
        0x0ffe229c
    );
    assert_eq!(rsdp_sum(&rsdp[..20]), 0, "GRUB's copy has a valid checksum");
    assert_eq!(&rsdp[20..], &[0; 16], "20 bytes copied, the rest zero");
    assert_eq!(b.efi_system_table, None);
}

#[test]
fn grub_uefi_information_decodes_exactly() {
    let b = parse(&uefi_mbi(true)).unwrap();
    assert_eq!(b.firmware, Firmware::Uefi);
    assert_eq!(b.cmdline(), "a=1 \"b=x y\"");
    assert_eq!(b.memory_map().len(), 18, "tag 6 wins over the EFI map");
    assert_eq!(
        b.memory_map()[1],
        region(0x100000, 0x706000, MemoryKind::Usable)
    );
    assert_eq!(
        b.memory_map()[6],
        region(0xf76c000, 0x12000, MemoryKind::AcpiReclaimable)
    );
    assert_eq!(
        b.memory_map()[7],
        region(0xf77e000, 0x80000, MemoryKind::AcpiNvs)
    );
    assert_eq!(b.memory_map()[8].kind, MemoryKind::Reserved, "type 20");
    assert_eq!(
        b.framebuffer,
        Some(Framebuffer {
            addr: 0xc000_0000,
            pitch: 4096,
            width: 1024,
            height: 768,
            bpp: 32,
            format: FramebufferFormat::Rgb {
                red_pos: 16,
                red_size: 8,
                green_pos: 8,
                green_size: 8,
                blue_pos: 0,
                blue_size: 8,
            },
        })
    );
    assert_eq!(b.efi_system_table, Some(0x0f5e_b018));
    let rsdp = b.rsdp.unwrap();
    assert_eq!(rsdp[15], 2, "tag 15 (RSDP 2.0) preferred over tag 14");
    assert_eq!(u32::from_le_bytes(rsdp[20..24].try_into().unwrap()), 36);
    assert_eq!(
        u64::from_le_bytes(rsdp[24..32].try_into().unwrap()),
        0x0f77_c0e8,
        "XSDT"
    );
    assert_eq!(rsdp_sum(&rsdp[..20]), 0);
    assert_eq!(rsdp_sum(&rsdp), 0, "extended checksum");
}

#[test]
fn the_efi_memory_map_stands_in_for_a_missing_tag_6_merged() {
    let b = parse(&uefi_mbi(false)).unwrap();
    assert_eq!(b.firmware, Firmware::Uefi);
    use MemoryKind::*;
    assert_eq!(
        b.memory_map(),
        &[
            region(0, 0xa0000, Usable),
            region(0x100000, 0x706000, Usable),
            region(0x806000, 0x2000, AcpiNvs),
            region(0x808000, 0x3000, Usable),
            region(0x80b000, 0xf5000, AcpiNvs),
            region(0x900000, 0xf76c000 - 0x900000, Usable),
            region(0xf76c000, 0x12000, AcpiReclaimable),
            region(0xf77e000, 0x80000, AcpiNvs),
            region(0xf7fe000, 0x2000, Reserved),
            region(0xf800000, 0x800000, Usable),
            region(0xffc00000, 0x400000, Reserved),
        ][..]
    );
    // The same usable bytes as the E820 map GRUB derived from it.
    let usable =
        |m: &[MemoryRegion]| -> u64 { m.iter().filter(|r| r.kind == Usable).map(|r| r.len).sum() };
    let e820 = parse(&uefi_mbi(true)).unwrap();
    assert_eq!(usable(b.memory_map()), usable(e820.memory_map()));
}

#[test]
fn efi_types_map_to_kinds_as_after_exit_boot_services() {
    use MemoryKind::*;
    let want = [
        (0, Reserved),
        (1, Usable),
        (2, Usable),
        (3, Usable),
        (4, Usable),
        (5, Reserved),
        (6, Reserved),
        (7, Usable),
        (8, Bad),
        (9, AcpiReclaimable),
        (10, AcpiNvs),
        (11, Reserved),
        (12, Reserved),
        (13, Reserved),
        (14, Reserved),
        (0x8000_0000, Reserved),
    ];
    for (t, k) in want {
        assert_eq!(MemoryKind::from_efi(t), k, "EFI type {t}");
    }
}

#[test]
fn efi_descriptors_of_40_bytes_step_by_their_size() {
    let mut m = Mbi::new();
    m.tag(
        17,
        &efi_mmap_tag(40, &[(0x100000, 0x100, 7), (0x300000, 1, 9)]),
    );
    let b = parse(&m.end()).unwrap();
    assert_eq!(
        b.memory_map(),
        &[
            region(0x100000, 0x100000, MemoryKind::Usable),
            region(0x300000, 0x1000, MemoryKind::AcpiReclaimable)
        ][..]
    );
}

#[test]
fn tag_18_boot_services_not_terminated_is_refused() {
    let mut m = Mbi::new();
    m.tag(6, &mmap_body(&BIOS_MMAP));
    m.tag(18, &[]);
    assert_eq!(
        parse(&m.end()).err(),
        Some(BootError::EfiBootServicesActive)
    );
}

#[test]
fn efi32_system_table_is_taken_when_there_is_no_efi64() {
    let mut m = Mbi::new();
    m.tag(11, &le32(0x7fe0_1000));
    m.tag(6, &mmap_body(&BIOS_MMAP));
    let b = parse(&m.end()).unwrap();
    assert_eq!(b.efi_system_table, Some(0x7fe0_1000));
    assert_eq!(b.firmware, Firmware::Uefi);
}

#[test]
fn seabios_with_the_framebuffer_request_gives_vbe_rgb() {
    // SeaBIOS + the header's 1024x768x32 request: VBE framebuffer at
    // 0xfd000000 (notes §A.5).
    let mut m = Mbi::new();
    m.tag(6, &mmap_body(&BIOS_MMAP));
    let mut fb = Vec::new();
    fb.extend_from_slice(&0xfd00_0000u64.to_le_bytes());
    for v in [4096u32, 1024, 768] {
        fb.extend_from_slice(&le32(v));
    }
    fb.extend_from_slice(&[32, 1, 0, 0, 16, 8, 8, 8, 0, 8]);
    m.tag(8, &fb);
    let b = parse(&m.end()).unwrap();
    let f = b.framebuffer.unwrap();
    assert_eq!(
        (f.addr, f.width, f.height, f.pitch, f.bpp),
        (0xfd00_0000, 1024, 768, 4096, 32)
    );
    assert_eq!(b.firmware, Firmware::Bios);
}

#[test]
fn indexed_framebuffer_is_recorded() {
    let mut m = Mbi::new();
    m.tag(6, &mmap_body(&BIOS_MMAP));
    let mut fb = unhex("00000a00 00000000 40010000 40010000 c8000000 08 00 0000");
    fb.extend_from_slice(&[16, 0]);
    fb.extend_from_slice(&[0; 48]);
    m.tag(8, &fb);
    let f = parse(&m.end()).unwrap().framebuffer.unwrap();
    assert_eq!(f.format, FramebufferFormat::Indexed { colors: 16 });
    assert_eq!((f.width, f.height, f.bpp), (320, 200, 8));
}

#[test]
fn truncated_framebuffer_tags_are_skipped() {
    let full = unhex(&UEFI_FB[18..]);
    assert_eq!(full.len(), 30);
    // 31 bytes (no type 1 colour info), type 1 at 32 and 37, EGA at 29 (no
    // type byte), an unknown type 3.
    let mut ega = full.clone();
    ega[21] = 2;
    let mut unknown = full.clone();
    unknown[21] = 3;
    for body in [
        &full[..23],
        &full[..24],
        &full[..29],
        &ega[..21],
        &unknown[..],
    ] {
        let mut m = Mbi::new();
        m.tag(6, &mmap_body(&BIOS_MMAP));
        m.tag(8, body);
        let b = parse(&m.end()).unwrap();
        assert_eq!(b.framebuffer, None, "tag body of {} bytes", body.len());
    }
    let mut m = Mbi::new();
    m.tag(6, &mmap_body(&BIOS_MMAP));
    m.tag(8, &ega[..22]);
    assert_eq!(
        parse(&m.end()).unwrap().framebuffer.unwrap().format,
        FramebufferFormat::EgaText,
        "EGA needs no colour info (30 bytes)"
    );
}

#[test]
fn cmdline_is_bounded_by_its_tag_not_by_a_nul() {
    let mut m = Mbi::new();
    // "abc" with no NUL, followed by the memory map tag: the 'a' of the
    // next tag must not leak in.
    m.tag(1, b"abc");
    m.tag(6, &mmap_body(&BIOS_MMAP));
    let b = parse(&m.end()).unwrap();
    assert_eq!(b.cmdline(), "abc");

    let mut m = Mbi::new();
    m.tag(1, &vec![b'y'; MAX_CMDLINE + 10]);
    m.tag(6, &mmap_body(&BIOS_MMAP));
    assert_eq!(parse(&m.end()).unwrap().cmdline().len(), MAX_CMDLINE);

    let mut m = Mbi::new();
    m.tag(1, b"a=\xff\xfeb\0");
    m.tag(6, &mmap_body(&BIOS_MMAP));
    assert_eq!(parse(&m.end()).unwrap().cmdline(), "a=", "cut at bad UTF-8");
}

#[test]
fn wrong_magic_is_refused() {
    let mut b = BootInfo::empty();
    assert_eq!(
        parse_multiboot2(&bios_mbi(), 0x2badb002, &mut b),
        Err(BootError::Mb2Magic(0x2badb002))
    );
}

#[test]
fn implausible_total_sizes_are_refused() {
    let good = bios_mbi();
    for total in [0u32, 8, 15, MB2_MAX_SIZE + 1, u32::MAX] {
        let mut b = good.clone();
        b[..4].copy_from_slice(&le32(total));
        assert_eq!(parse(&b).err(), Some(BootError::Mb2TotalSize(total)));
    }
    // Larger than the bytes handed over.
    let mut b = good.clone();
    b[..4].copy_from_slice(&le32(761));
    assert_eq!(parse(&b).err(), Some(BootError::Mb2TotalSize(761)));
    assert_eq!(parse(&good[..4]).err(), Some(BootError::Mb2TotalSize(760)));
    assert_eq!(parse(&[]).err(), Some(BootError::Mb2TotalSize(0)));
}

#[test]
fn a_total_size_that_cuts_the_tags_short_has_no_end_tag() {
    let mut b = bios_mbi();
    // Ends inside the memory map tag.
    b[..4].copy_from_slice(&le32(200));
    assert_eq!(
        parse(&b).err(),
        Some(BootError::Mb2TagOverrun {
            offset: 112,
            size: 232
        })
    );
    // Ends right after the ACPI tag: no end tag.
    b[..4].copy_from_slice(&le32(752));
    assert_eq!(parse(&b).err(), Some(BootError::Mb2NoEndTag));
}

#[test]
fn tags_smaller_than_their_header_or_past_the_end_are_refused() {
    let mut b = bios_mbi();
    b[28..32].copy_from_slice(&le32(4)); // the cmdline tag at 24
    assert_eq!(
        parse(&b).err(),
        Some(BootError::Mb2TagSize {
            offset: 24,
            size: 4
        })
    );
    let mut b = bios_mbi();
    b[724..728].copy_from_slice(&le32(0x1000)); // the ACPI tag at 720
    assert_eq!(
        parse(&b).err(),
        Some(BootError::Mb2TagOverrun {
            offset: 720,
            size: 0x1000
        })
    );
    let mut b = bios_mbi();
    b[724..728].copy_from_slice(&le32(u32::MAX));
    assert!(matches!(parse(&b), Err(BootError::Mb2TagOverrun { .. })));
}

#[test]
fn memory_map_entries_smaller_than_24_bytes_are_refused() {
    for esize in [0u32, 8, 16, 23] {
        let mut b = bios_mbi();
        b[120..124].copy_from_slice(&le32(esize));
        assert_eq!(parse(&b).err(), Some(BootError::Mb2MmapEntrySize(esize)));
    }
    // A memory map tag with no room for entry_size.
    let mut m = Mbi::new();
    m.tag(6, &[]);
    assert_eq!(
        parse(&m.end()).err(),
        Some(BootError::Mb2TagTooShort { tag: 6, size: 8 })
    );
}

#[test]
fn larger_memory_map_entries_are_stepped_by_entry_size() {
    let mut body = Vec::new();
    body.extend_from_slice(&le32(32));
    body.extend_from_slice(&le32(0));
    for (base, len) in [(0x100000u64, 0x100000u64), (0x400000, 0x1000)] {
        body.extend_from_slice(&base.to_le_bytes());
        body.extend_from_slice(&len.to_le_bytes());
        body.extend_from_slice(&le32(1));
        body.extend_from_slice(&[0xee; 12]);
    }
    let mut m = Mbi::new();
    m.tag(6, &body);
    let b = parse(&m.end()).unwrap();
    assert_eq!(
        b.memory_map(),
        &[
            region(0x100000, 0x100000, MemoryKind::Usable),
            region(0x400000, 0x1000, MemoryKind::Usable)
        ][..]
    );
}

#[test]
fn efi_descriptors_smaller_than_40_bytes_are_refused_when_used() {
    let mut m = Mbi::new();
    m.tag(17, &efi_mmap_tag(32, &[(0x100000, 0x100, 7)]));
    assert_eq!(parse(&m.end()).err(), Some(BootError::EfiDescSize(32)));
    // With tag 6 present the EFI map is not read.
    let mut m = Mbi::new();
    m.tag(6, &mmap_body(&BIOS_MMAP));
    m.tag(17, &efi_mmap_tag(32, &[(0x100000, 0x100, 7)]));
    assert_eq!(parse(&m.end()).unwrap().memory_map().len(), 9);
}

#[test]
fn no_memory_map_is_an_error() {
    let mut m = Mbi::new();
    m.raw(CMDLINE_TAG);
    assert_eq!(parse(&m.end()).err(), Some(BootError::NoMemoryMap));
    let mut m = Mbi::new();
    m.tag(6, &mmap_body(&[(0x100000, 0, 1)]));
    assert_eq!(parse(&m.end()).err(), Some(BootError::NoMemoryMap));
}

#[test]
fn a_thousand_entries_fill_the_map_and_the_rest_is_counted() {
    // Every other 2 MiB holds 4 KiB of RAM: no two entries touch.
    let entries: Vec<_> = (0..1000u64)
        .map(|i| (i * 0x20_0000, 0x1000, if i % 2 == 0 { 1 } else { 2 }))
        .collect();
    let mut m = Mbi::new();
    m.tag(6, &mmap_body(&entries));
    let b = parse(&m.end()).unwrap();
    assert_eq!(b.memory_map().len(), MAX_REGIONS);
    assert_eq!(b.regions_dropped(), 1000 - MAX_REGIONS);
    assert_eq!(
        b.usable_bytes_dropped(),
        (1000 - MAX_REGIONS as u64) / 2 * 0x1000
    );
}

#[test]
fn touching_entries_of_one_kind_are_merged_so_nothing_is_dropped() {
    // 1000 touching entries, alternating usable and loader (both usable).
    let mut descs = Vec::new();
    for i in 0..1000u64 {
        descs.push((0x100000 + i * 0x1000, 1, if i % 2 == 0 { 7 } else { 2 }));
    }
    let mut m = Mbi::new();
    m.tag(17, &efi_mmap_tag(48, &descs));
    let b = parse(&m.end()).unwrap();
    assert_eq!(
        b.memory_map(),
        &[region(0x100000, 1000 * 0x1000, MemoryKind::Usable)][..]
    );
    assert_eq!(b.regions_dropped(), 0);
}

#[test]
fn regions_reaching_past_2_to_the_64_are_cut() {
    let mut m = Mbi::new();
    m.tag(
        6,
        &mmap_body(&[(u64::MAX - 0xfff, u64::MAX, 1), (0x1000, 0x1000, 1)]),
    );
    let b = parse(&m.end()).unwrap();
    assert_eq!(
        b.memory_map()[0],
        region(u64::MAX - 0xfff, 0xfff, MemoryKind::Usable)
    );
    assert_eq!(b.memory_map().len(), 2);
}

/// Checks what must hold of any parse result.
fn check(bytes: &[u8]) {
    let mut b = Box::new(BootInfo::empty());
    let r = parse_multiboot2(bytes, MB2_BOOT_MAGIC, &mut b);
    assert!(b.memory_map().len() <= MAX_REGIONS);
    assert!(b.cmdline().len() <= MAX_CMDLINE);
    if r.is_ok() {
        assert!(!b.memory_map().is_empty());
        for r in b.memory_map() {
            assert!(r.len > 0 && r.start.checked_add(r.len).is_some());
        }
    }
}

#[test]
fn random_and_mutated_information_never_panics() {
    let mut rng = Rng::new(0x6d62_3269);
    let goldens = [bios_mbi(), uefi_mbi(true), uefi_mbi(false)];
    for i in 0..20_000 {
        let mut b = if i % 4 == 0 {
            // Random bytes with a total_size that often matches.
            let n = rng.below(600) as usize + 8;
            let mut b = vec![0u8; n];
            rng.fill(&mut b);
            if rng.below(2) == 0 {
                b[..4].copy_from_slice(&le32(n as u32));
            }
            b
        } else {
            goldens[i % goldens.len()].clone()
        };
        // Corrupt a few bytes or whole words, often tag headers.
        for _ in 0..rng.below(6) + 1 {
            let n = b.len() as u64;
            let at = rng.below(n) as usize;
            match rng.below(3) {
                0 => b[at] = rng.next_u64() as u8,
                1 => {
                    let at = at & !3;
                    let v = match rng.below(4) {
                        0 => 0,
                        1 => rng.below(64) as u32,
                        2 => u32::MAX - rng.below(8) as u32,
                        _ => rng.next_u64() as u32,
                    };
                    if at + 4 <= b.len() {
                        b[at..at + 4].copy_from_slice(&le32(v));
                    }
                }
                _ => {
                    let cut = rng.below(n + 1) as usize;
                    b.truncate(cut);
                }
            }
            if b.is_empty() {
                break;
            }
        }
        check(&b);
    }
}
