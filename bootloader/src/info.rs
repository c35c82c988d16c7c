//! [`BootInfo`] and the parsers of the two boot protocols.
//!
//! PVH `hvm_start_info` (xen/include/public/arch-x86/hvm/start_info.h):
//!
//! ```text
//! 0   u32 magic 0x336ec578      24  u64 cmdline_paddr
//! 4   u32 version               32  u64 rsdp_paddr
//! 8   u32 flags                 40  u64 memmap_paddr    (version >= 1)
//! 12  u32 nr_modules            48  u32 memmap_entries  (version >= 1)
//! 16  u64 modlist_paddr         52  u32 reserved
//! ```
//!
//! Memory map entries are `{u64 addr, u64 size, u32 type (E820), u32
//! reserved}`.
//!
//! Multiboot2 boot information: `u32 total_size, u32 reserved`, then 8-byte
//! aligned tags `{u32 type, u32 size, ...}` ending with type 0. Used tags:
//! 1 command line, 6 memory map (`u32 entry_size, u32 entry_version`, entries
//! `{u64 base, u64 length, u32 type, u32 reserved}`), 14/15 copy of the ACPI
//! RSDP (1.0 / 2.0+).

use core::ptr;

pub const MAX_REGIONS: usize = 128;
pub const MAX_CMDLINE: usize = 2048;

/// How the kernel was entered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    None,
    Pvh,
    Multiboot2,
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
    fn from_e820(t: u32) -> Self {
        match t {
            1 => MemoryKind::Usable,
            3 => MemoryKind::AcpiReclaimable,
            4 => MemoryKind::AcpiNvs,
            5 => MemoryKind::Bad,
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

/// What the kernel learns from the boot loader, copied out of its structures.
pub struct BootInfo {
    pub protocol: Protocol,
    regions: [MemoryRegion; MAX_REGIONS],
    nregions: usize,
    cmdline: [u8; MAX_CMDLINE],
    cmdline_len: usize,
    /// A copy of the ACPI RSDP (36 bytes, 20 of them for revision 0), when
    /// the boot loader gave one.
    pub rsdp: Option<[u8; 36]>,
    /// Physical address of the RSDP when known (PVH).
    pub rsdp_addr: Option<u64>,
    pub kernel_start: u64,
    pub kernel_end: u64,
    pub stack_bottom: u64,
    pub stack_top: u64,
}

impl BootInfo {
    pub(crate) const fn empty() -> Self {
        BootInfo {
            protocol: Protocol::None,
            regions: [MemoryRegion {
                start: 0,
                len: 0,
                kind: MemoryKind::Reserved,
            }; MAX_REGIONS],
            nregions: 0,
            cmdline: [0; MAX_CMDLINE],
            cmdline_len: 0,
            rsdp: None,
            rsdp_addr: None,
            kernel_start: 0,
            kernel_end: 0,
            stack_bottom: 0,
            stack_top: 0,
        }
    }

    /// The physical memory map, as the boot loader reported it.
    pub fn memory_map(&self) -> &[MemoryRegion] {
        &self.regions[..self.nregions]
    }

    /// The kernel command line (invalid UTF-8 is cut at the first bad byte).
    pub fn cmdline(&self) -> &str {
        let b = &self.cmdline[..self.cmdline_len];
        match core::str::from_utf8(b) {
            Ok(s) => s,
            Err(e) => core::str::from_utf8(&b[..e.valid_up_to()]).unwrap_or(""),
        }
    }

    fn push_region(&mut self, start: u64, len: u64, kind: MemoryKind) {
        if len != 0 && self.nregions < MAX_REGIONS {
            self.regions[self.nregions] = MemoryRegion { start, len, kind };
            self.nregions += 1;
        }
    }

    /// Copies a NUL-terminated string at `addr`, bounded by MAX_CMDLINE.
    ///
    /// # Safety
    /// `addr` is readable memory holding a NUL-terminated string or at least
    /// MAX_CMDLINE bytes.
    unsafe fn set_cmdline(&mut self, addr: u64) {
        let p = addr as *const u8;
        let mut n = 0;
        while n < MAX_CMDLINE {
            // SAFETY: caller's contract.
            let b = unsafe { ptr::read(p.add(n)) };
            if b == 0 {
                break;
            }
            self.cmdline[n] = b;
            n += 1;
        }
        self.cmdline_len = n;
    }
}

/// # Safety
/// `at` is the address of readable memory of `size_of::<T>()` bytes.
unsafe fn read<T: Copy>(at: u64) -> T {
    // SAFETY: caller's contract; boot structures need not be aligned.
    unsafe { ptr::read_unaligned(at as *const T) }
}

const PVH_MAGIC: u32 = 0x336e_c578;

/// # Safety
/// `info` is the address the PVH loader passed in EBX.
pub(crate) unsafe fn parse_pvh(boot: &mut BootInfo, info: u64) -> Result<(), &'static str> {
    boot.protocol = Protocol::Pvh;
    // SAFETY: (all reads below) the loader's structure and what it points to
    // are in identity-mapped low memory; counts are bounded before use.
    unsafe {
        if read::<u32>(info) != PVH_MAGIC {
            return Err("PVH start info has the wrong magic");
        }
        let version = read::<u32>(info + 4);
        let cmdline = read::<u64>(info + 24);
        let rsdp = read::<u64>(info + 32);
        if cmdline != 0 {
            boot.set_cmdline(cmdline);
        }
        if rsdp != 0 {
            boot.rsdp_addr = Some(rsdp);
            boot.rsdp = Some(read::<[u8; 36]>(rsdp));
        }
        if version < 1 {
            return Err("PVH start info version 0 has no memory map");
        }
        let map = read::<u64>(info + 40);
        let entries = read::<u32>(info + 48) as u64;
        if map == 0 || entries == 0 {
            return Err("PVH start info has an empty memory map");
        }
        for i in 0..entries.min(MAX_REGIONS as u64) {
            let e = map + i * 24;
            boot.push_region(
                read::<u64>(e),
                read::<u64>(e + 8),
                MemoryKind::from_e820(read::<u32>(e + 16)),
            );
        }
    }
    Ok(())
}

const MB2_BOOT_MAGIC: u32 = 0x36d7_6289;

/// # Safety
/// `info` is the address GRUB passed in EBX.
pub(crate) unsafe fn parse_multiboot2(
    boot: &mut BootInfo,
    magic: u32,
    info: u64,
) -> Result<(), &'static str> {
    boot.protocol = Protocol::Multiboot2;
    if magic != MB2_BOOT_MAGIC {
        return Err("multiboot2 entry without the boot magic in EAX");
    }
    // SAFETY: (all reads below) GRUB's boot information is identity mapped;
    // every tag is bounded by total_size and has size >= 8.
    unsafe {
        let total = read::<u32>(info) as u64;
        if !(16..=1 << 20).contains(&total) {
            return Err("multiboot2 information has an implausible size");
        }
        let end = info + total;
        let mut tag = info + 8;
        while tag + 8 <= end {
            let ty = read::<u32>(tag);
            let size = read::<u32>(tag + 4) as u64;
            if ty == 0 {
                break;
            }
            if size < 8 || tag + size > end {
                return Err("multiboot2 tag overruns the information");
            }
            match ty {
                1 => boot.set_cmdline(tag + 8),
                6 => {
                    let esize = read::<u32>(tag + 8) as u64;
                    if esize < 24 {
                        return Err("multiboot2 memory map entries too small");
                    }
                    let mut e = tag + 16;
                    while e + 24 <= tag + size {
                        boot.push_region(
                            read::<u64>(e),
                            read::<u64>(e + 8),
                            MemoryKind::from_e820(read::<u32>(e + 16)),
                        );
                        e += esize;
                    }
                }
                14 | 15 if size >= 8 + 20 => {
                    let mut copy = [0u8; 36];
                    let n = ((size - 8) as usize).min(36);
                    for (i, b) in copy.iter_mut().enumerate().take(n) {
                        *b = read::<u8>(tag + 8 + i as u64);
                    }
                    // Prefer the 2.0 copy (tag 15) over the 1.0 one.
                    if ty == 15 || boot.rsdp.is_none() {
                        boot.rsdp = Some(copy);
                    }
                }
                _ => {}
            }
            tag += (size + 7) & !7;
        }
    }
    if boot.nregions == 0 {
        return Err("multiboot2 information has no memory map");
    }
    Ok(())
}
