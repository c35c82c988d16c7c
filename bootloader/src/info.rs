//! [`BootInfo`]: what the kernel learns from the boot loader, copied out of
//! the boot loader's structures (the parsers are in `mb2.rs` and `pvh.rs`).
//!
//! Everything is held by value in fixed-size arrays: the kernel reads it
//! after it has replaced the boot page tables, when the boot loader's memory
//! may already be reused.

use core::fmt;

/// Entries the memory map holds. Regions beyond it are merged into an
/// adjacent region of the same kind when there is one, else dropped and
/// counted ([`BootInfo::regions_dropped`]).
pub const MAX_REGIONS: usize = 128;
/// Bytes of the command line kept; the rest is cut.
pub const MAX_CMDLINE: usize = 2048;

/// How the kernel was entered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    None,
    Pvh,
    Multiboot2,
}

/// The firmware under the boot loader, as far as the boot information tells.
///
/// - Multiboot2 with an EFI system table tag (11 or 12), an EFI memory map
///   tag (17) or an EFI image handle tag (19 or 20): [`Firmware::Uefi`].
/// - Any other multiboot2 boot: [`Firmware::Bios`] (GRUB on a PC BIOS).
/// - PVH: [`Firmware::Unknown`]. The PVH start info says nothing about the
///   firmware; under QEMU `-kernel` it is SeaBIOS, but the kernel must not
///   rely on that (e.g. for the RSDP scan of the BIOS area).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Firmware {
    Unknown,
    Bios,
    Uefi,
}

/// Kind of a physical memory range (E820 numbering).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemoryKind {
    Usable,
    Reserved,
    AcpiReclaimable,
    AcpiNvs,
    Bad,
}

impl MemoryKind {
    /// E820 / multiboot2 memory map type: 1 usable, 3 ACPI reclaimable, 4
    /// ACPI NVS, 5 bad; everything else (2, and e.g. 20 that GRUB passes on
    /// for EFI runtime code) is reserved.
    pub fn from_e820(t: u32) -> Self {
        match t {
            1 => MemoryKind::Usable,
            3 => MemoryKind::AcpiReclaimable,
            4 => MemoryKind::AcpiNvs,
            5 => MemoryKind::Bad,
            _ => MemoryKind::Reserved,
        }
    }

    /// UEFI memory descriptor type, as it stands after ExitBootServices
    /// (UEFI 2.10 §7.2, table "Memory Type Usage after ExitBootServices"):
    /// loader code/data (1, 2), boot services code/data (3, 4) and
    /// conventional memory (7) are usable; 9 is ACPI reclaimable, 10 ACPI
    /// NVS, 8 unusable (bad); everything else (0 reserved, 5/6 runtime
    /// services, 11/12 MMIO, 13 PAL code, 14 persistent memory, unknown
    /// types) is reserved.
    pub fn from_efi(t: u32) -> Self {
        match t {
            1 | 2 | 3 | 4 | 7 => MemoryKind::Usable,
            8 => MemoryKind::Bad,
            9 => MemoryKind::AcpiReclaimable,
            10 => MemoryKind::AcpiNvs,
            _ => MemoryKind::Reserved,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryRegion {
    pub start: u64,
    pub len: u64,
    pub kind: MemoryKind,
}

/// How the framebuffer's pixels are laid out (multiboot2 tag 8's
/// `framebuffer_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FramebufferFormat {
    /// Type 1, direct RGB: each colour is `size` bits at bit `pos` of the
    /// little-endian pixel value.
    Rgb {
        red_pos: u8,
        red_size: u8,
        green_pos: u8,
        green_size: u8,
        blue_pos: u8,
        blue_size: u8,
    },
    /// Type 2, EGA text mode: `width` x `height` cells of two bytes
    /// (character, attribute), usually at 0xb8000. Width and height count
    /// characters.
    EgaText,
    /// Type 0, indexed colour with a palette of `colors` entries. Recorded,
    /// not used by the console.
    Indexed { colors: u16 },
}

/// A linear framebuffer the boot loader set up (GOP under UEFI, VBE under a
/// BIOS), as multiboot2 tag 8 describes it. The values are the boot
/// loader's; the console checks them before drawing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Framebuffer {
    /// Physical address.
    pub addr: u64,
    /// Bytes from one line to the next.
    pub pitch: u32,
    pub width: u32,
    pub height: u32,
    /// Bits per pixel (16 for EGA text: one cell).
    pub bpp: u8,
    pub format: FramebufferFormat,
}

/// What the kernel learns from the boot loader, copied out of its structures.
pub struct BootInfo {
    pub protocol: Protocol,
    /// See [`Firmware`] for how it is decided.
    pub firmware: Firmware,
    regions: [MemoryRegion; MAX_REGIONS],
    nregions: usize,
    dropped: usize,
    dropped_usable: u64,
    cmdline: [u8; MAX_CMDLINE],
    cmdline_len: usize,
    /// A copy of the ACPI RSDP (36 bytes, 20 of them for revision 0), when
    /// the boot loader gave one.
    pub rsdp: Option<[u8; 36]>,
    /// Physical address of the RSDP when known (PVH).
    pub rsdp_addr: Option<u64>,
    /// The framebuffer, when the boot loader set one up (multiboot2 tag 8).
    pub framebuffer: Option<Framebuffer>,
    /// Physical address of the EFI system table (multiboot2 tag 12, or tag
    /// 11 of a 32-bit firmware when there is no tag 12). Boot services have
    /// been exited; only runtime services are left.
    pub efi_system_table: Option<u64>,
    pub kernel_start: u64,
    pub kernel_end: u64,
    pub stack_bottom: u64,
    pub stack_top: u64,
}

impl BootInfo {
    /// Nothing known yet; the parsers fill it in.
    pub const fn empty() -> Self {
        BootInfo {
            protocol: Protocol::None,
            firmware: Firmware::Unknown,
            regions: [MemoryRegion {
                start: 0,
                len: 0,
                kind: MemoryKind::Reserved,
            }; MAX_REGIONS],
            nregions: 0,
            dropped: 0,
            dropped_usable: 0,
            cmdline: [0; MAX_CMDLINE],
            cmdline_len: 0,
            rsdp: None,
            rsdp_addr: None,
            framebuffer: None,
            efi_system_table: None,
            kernel_start: 0,
            kernel_end: 0,
            stack_bottom: 0,
            stack_top: 0,
        }
    }

    /// The physical memory map, as the boot loader reported it, with
    /// adjacent entries of the same kind merged.
    pub fn memory_map(&self) -> &[MemoryRegion] {
        &self.regions[..self.nregions]
    }

    /// Memory map entries that found no room (more than [`MAX_REGIONS`]
    /// regions after merging). The kernel logs a warning when it is not 0.
    pub fn regions_dropped(&self) -> usize {
        self.dropped
    }

    /// Bytes of usable memory in the dropped entries (lost to the kernel).
    pub fn usable_bytes_dropped(&self) -> u64 {
        self.dropped_usable
    }

    /// The kernel command line (invalid UTF-8 is cut at the first bad byte).
    pub fn cmdline(&self) -> &str {
        let b = &self.cmdline[..self.cmdline_len];
        match core::str::from_utf8(b) {
            Ok(s) => s,
            Err(e) => core::str::from_utf8(&b[..e.valid_up_to()]).unwrap_or(""),
        }
    }

    /// Adds a region to the memory map: merged into a region of the same
    /// kind that it touches, else appended, else (map full) counted as
    /// dropped. Empty regions are skipped; a region reaching past 2^64 is
    /// cut there.
    pub(crate) fn push_region(&mut self, start: u64, len: u64, kind: MemoryKind) {
        let len = len.min(u64::MAX - start);
        if len == 0 {
            return;
        }
        let end = start + len;
        for r in self.regions[..self.nregions].iter_mut() {
            if r.kind != kind {
                continue;
            }
            // r.start + r.len cannot overflow: every stored region was cut
            // at 2^64 - 1 when it was added or merged.
            if r.start + r.len == start || end == r.start {
                r.start = r.start.min(start);
                r.len += len;
                return;
            }
        }
        if self.nregions < MAX_REGIONS {
            self.regions[self.nregions] = MemoryRegion { start, len, kind };
            self.nregions += 1;
        } else {
            self.dropped += 1;
            if kind == MemoryKind::Usable {
                self.dropped_usable = self.dropped_usable.saturating_add(len);
            }
        }
    }

    /// Counts `n` regions dropped without reading them (a memory map with
    /// more entries than a parser reads).
    pub(crate) fn count_dropped(&mut self, n: usize) {
        self.dropped = self.dropped.saturating_add(n);
    }

    /// Sets the command line to `s`, cut at [`MAX_CMDLINE`] bytes.
    pub(crate) fn set_cmdline(&mut self, s: &[u8]) {
        let n = s.len().min(MAX_CMDLINE);
        self.cmdline[..n].copy_from_slice(&s[..n]);
        self.cmdline_len = n;
    }
}

/// Why the boot information was refused. The entry code prints it on COM1
/// and halts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootError {
    /// `dioxide_boot_entry` was called with a protocol number it does not
    /// know (a bug in entry.S).
    UnknownProtocol(u32),
    /// EAX at the multiboot2 entry was not 0x36d76289.
    Mb2Magic(u32),
    /// The multiboot2 `total_size` is below 16, above 1 MiB, or larger than
    /// the bytes handed to the parser.
    Mb2TotalSize(u32),
    /// A tag's size is below 8 (the tag header).
    Mb2TagSize { offset: usize, size: u32 },
    /// A tag reaches past `total_size`.
    Mb2TagOverrun { offset: usize, size: u32 },
    /// The tags end before an end tag (type 0).
    Mb2NoEndTag,
    /// A tag is too short for the fields its type has.
    Mb2TagTooShort { tag: u32, size: u32 },
    /// Memory map (tag 6) entries smaller than 24 bytes.
    Mb2MmapEntrySize(u32),
    /// EFI memory map (tag 17) descriptors smaller than 40 bytes.
    EfiDescSize(u32),
    /// Tag 18: the boot loader did not call ExitBootServices. This kernel
    /// takes over all memory and cannot live with boot services.
    EfiBootServicesActive,
    /// Neither a memory map (tag 6) nor an EFI memory map (tag 17), or no
    /// non-empty entry in them.
    NoMemoryMap,
    /// The PVH start info's magic is not 0x336ec578.
    PvhMagic(u32),
    /// PVH start info version 0 has no memory map.
    PvhVersion0,
    /// The PVH memory map pointer or count is 0.
    PvhEmptyMemoryMap,
    /// A PVH structure lies in memory that cannot be read (address 0, or
    /// beyond the boot identity map).
    PvhUnreadable(u64),
}

impl fmt::Display for BootError {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match *self {
            BootError::UnknownProtocol(p) => write!(f, "unknown boot protocol {p}"),
            BootError::Mb2Magic(m) => {
                write!(
                    f,
                    "multiboot2 entry with EAX {m:#x}, not the boot magic 0x36d76289"
                )
            }
            BootError::Mb2TotalSize(n) => write!(
                f,
                "multiboot2 information has an implausible total size {n} (16 bytes .. 1 MiB)"
            ),
            BootError::Mb2TagSize { offset, size } => {
                write!(f, "multiboot2 tag at offset {offset} has size {size} (< 8)")
            }
            BootError::Mb2TagOverrun { offset, size } => write!(
                f,
                "multiboot2 tag at offset {offset} (size {size}) overruns the information"
            ),
            BootError::Mb2NoEndTag => write!(f, "multiboot2 information has no end tag"),
            BootError::Mb2TagTooShort { tag, size } => {
                write!(f, "multiboot2 tag {tag} is too short ({size} bytes)")
            }
            BootError::Mb2MmapEntrySize(n) => {
                write!(f, "multiboot2 memory map entries of {n} bytes (< 24)")
            }
            BootError::EfiDescSize(n) => {
                write!(
                    f,
                    "multiboot2 EFI memory map descriptors of {n} bytes (< 40)"
                )
            }
            BootError::EfiBootServicesActive => write!(
                f,
                "EFI boot services were not terminated (multiboot2 tag 18); \
                 the boot loader must call ExitBootServices"
            ),
            BootError::NoMemoryMap => write!(f, "boot information has no memory map"),
            BootError::PvhMagic(m) => {
                write!(f, "PVH start info has the magic {m:#x}, not 0x336ec578")
            }
            BootError::PvhVersion0 => write!(f, "PVH start info version 0 has no memory map"),
            BootError::PvhEmptyMemoryMap => write!(f, "PVH start info has an empty memory map"),
            BootError::PvhUnreadable(a) => {
                write!(f, "PVH boot structure at {a:#x} is not readable")
            }
        }
    }
}
