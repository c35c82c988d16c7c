//! The PVH start info, read through a [`PhysMem`].
//!
//! `hvm_start_info` (xen/include/public/arch-x86/hvm/start_info.h,
//! little-endian):
//!
//! ```text
//! 0   u32 magic 0x336ec578      24  u64 cmdline_paddr
//! 4   u32 version               32  u64 rsdp_paddr
//! 8   u32 flags                 40  u64 memmap_paddr    (version >= 1)
//! 12  u32 nr_modules            48  u32 memmap_entries  (version >= 1)
//! 16  u64 modlist_paddr         52  u32 reserved
//! ```
//!
//! The structure points into other physical memory (command line, RSDP,
//! memory map), so the parser reads through a [`PhysMem`] instead of a slice:
//! in the kernel that is the boot identity map, in tests a few byte arrays at
//! chosen addresses. Memory map entries are `{u64 addr, u64 size, u32 type
//! (E820), u32 reserved}`.

use crate::info::{BootError, BootInfo, Firmware, MemoryKind, Protocol, MAX_CMDLINE};
use crate::mb2::{u32_at, u64_at};

pub const PVH_MAGIC: u32 = 0x336e_c578;
/// Memory map entries read at most; the rest count as dropped. Bounds the
/// work for a corrupt entry count.
pub const PVH_MAX_ENTRIES: u32 = 1024;

/// Physical memory as the boot code sees it.
pub trait PhysMem {
    /// Copies the `buf.len()` bytes at physical address `addr` into `buf`;
    /// `false` (and `buf` unspecified) if that memory cannot be read. The
    /// parser never asks for address 0; addresses it computes saturate at
    /// `u64::MAX` instead of wrapping, so an implementation must refuse a
    /// range that does not fit below 2^64.
    fn read(&self, addr: u64, buf: &mut [u8]) -> bool;
}

fn read<M: PhysMem, const N: usize>(mem: &M, addr: u64) -> Result<[u8; N], BootError> {
    let mut b = [0u8; N];
    if addr == 0 || !mem.read(addr, &mut b) {
        return Err(BootError::PvhUnreadable(addr));
    }
    Ok(b)
}

/// Fills `out` from the PVH start info at physical address `info`.
///
/// [`Firmware::Unknown`]: PVH does not tell the firmware.
pub fn parse_pvh<M: PhysMem>(mem: &M, info: u64, out: &mut BootInfo) -> Result<(), BootError> {
    out.protocol = Protocol::Pvh;
    out.firmware = Firmware::Unknown;
    let head: [u8; 40] = read(mem, info)?;
    // In bounds of the 40 bytes just read.
    let field32 = |at| u32_at(&head, at).unwrap_or(0);
    let field64 = |at| u64_at(&head, at).unwrap_or(0);
    let magic = field32(0);
    if magic != PVH_MAGIC {
        return Err(BootError::PvhMagic(magic));
    }
    let version = field32(4);
    let cmdline = field64(24);
    let rsdp = field64(32);
    if cmdline != 0 {
        let mut s = [0u8; MAX_CMDLINE];
        let mut n = 0;
        while n < MAX_CMDLINE {
            let [b]: [u8; 1] = read(mem, cmdline.saturating_add(n as u64))?;
            if b == 0 {
                break;
            }
            s[n] = b;
            n += 1;
        }
        out.set_cmdline(&s[..n]);
    }
    if rsdp != 0 {
        out.rsdp_addr = Some(rsdp);
        out.rsdp = Some(read(mem, rsdp)?);
    }
    if version < 1 {
        return Err(BootError::PvhVersion0);
    }
    let tail: [u8; 16] = read(mem, info.saturating_add(40))?;
    let map = u64_at(&tail, 0).unwrap_or(0);
    let entries = u32_at(&tail, 8).unwrap_or(0);
    if map == 0 || entries == 0 {
        return Err(BootError::PvhEmptyMemoryMap);
    }
    for i in 0..entries.min(PVH_MAX_ENTRIES) as u64 {
        let e: [u8; 24] = read(mem, map.saturating_add(i * 24))?;
        out.push_region(
            u64_at(&e, 0).unwrap_or(0),
            u64_at(&e, 8).unwrap_or(0),
            MemoryKind::from_e820(u32_at(&e, 16).unwrap_or(0)),
        );
    }
    out.count_dropped(entries.saturating_sub(PVH_MAX_ENTRIES) as usize);
    if out.memory_map().is_empty() {
        return Err(BootError::NoMemoryMap);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::info::MemoryRegion;

    /// Byte arrays at physical addresses; everything else is unreadable.
    struct Mem(Vec<(u64, Vec<u8>)>);

    impl PhysMem for Mem {
        fn read(&self, addr: u64, buf: &mut [u8]) -> bool {
            for (at, bytes) in &self.0 {
                let Some(off) = addr.checked_sub(*at) else {
                    continue;
                };
                let Some(src) = usize::try_from(off)
                    .ok()
                    .and_then(|o| bytes.get(o..o.checked_add(buf.len())?))
                else {
                    continue;
                };
                buf.copy_from_slice(src);
                return true;
            }
            false
        }
    }

    fn start_info(version: u32, cmdline: u64, rsdp: u64, map: u64, entries: u32) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&PVH_MAGIC.to_le_bytes());
        b.extend_from_slice(&version.to_le_bytes());
        b.extend_from_slice(&[0; 16]);
        b.extend_from_slice(&cmdline.to_le_bytes());
        b.extend_from_slice(&rsdp.to_le_bytes());
        b.extend_from_slice(&map.to_le_bytes());
        b.extend_from_slice(&entries.to_le_bytes());
        b.extend_from_slice(&[0; 4]);
        b
    }

    fn e820(entries: &[(u64, u64, u32)]) -> Vec<u8> {
        let mut b = Vec::new();
        for &(a, l, t) in entries {
            b.extend_from_slice(&a.to_le_bytes());
            b.extend_from_slice(&l.to_le_bytes());
            b.extend_from_slice(&t.to_le_bytes());
            b.extend_from_slice(&[0; 4]);
        }
        b
    }

    /// What QEMU 7.2's PVH loader hands over for `-m 256` (q35).
    fn qemu() -> Mem {
        Mem(vec![
            (0x6000, start_info(1, 0x7000, 0xf5ad0, 0x8000, 5)),
            (0x7000, b"selftest=digest log=debug\0".to_vec()),
            (0xf5ad0, {
                let mut r = b"RSD PTR \x42BOCHS \x00".to_vec();
                r.extend_from_slice(&[0xe0, 0x1a, 0xfe, 0x0f]);
                r.resize(36, 0);
                r
            }),
            (
                0x8000,
                e820(&[
                    (0, 0x9fc00, 1),
                    (0x9fc00, 0x400, 2),
                    (0xf0000, 0x10000, 2),
                    (0x100000, 0xfedf000, 1),
                    (0xffdf000, 0x21000, 2),
                ]),
            ),
        ])
    }

    #[test]
    fn qemu_start_info_gives_cmdline_rsdp_and_map() {
        let mut b = BootInfo::empty();
        parse_pvh(&qemu(), 0x6000, &mut b).unwrap();
        assert_eq!(b.protocol, Protocol::Pvh);
        assert_eq!(b.firmware, Firmware::Unknown);
        assert_eq!(b.cmdline(), "selftest=digest log=debug");
        assert_eq!(b.rsdp_addr, Some(0xf5ad0));
        assert_eq!(&b.rsdp.unwrap()[..8], b"RSD PTR ");
        assert_eq!(b.memory_map().len(), 5);
        assert_eq!(
            b.memory_map()[3],
            MemoryRegion {
                start: 0x100000,
                len: 0xfedf000,
                kind: MemoryKind::Usable
            }
        );
        assert_eq!(b.framebuffer, None);
        assert_eq!(b.regions_dropped(), 0);
    }

    #[test]
    fn wrong_magic_and_version_0_are_refused() {
        let mut m = qemu();
        m.0[0].1[0] ^= 1;
        let mut b = BootInfo::empty();
        assert!(matches!(
            parse_pvh(&m, 0x6000, &mut b),
            Err(BootError::PvhMagic(_))
        ));
        let mut m = qemu();
        m.0[0].1[4] = 0;
        let mut b = BootInfo::empty();
        assert_eq!(parse_pvh(&m, 0x6000, &mut b), Err(BootError::PvhVersion0));
    }

    #[test]
    fn unreadable_pointers_are_errors() {
        let mut b = BootInfo::empty();
        assert_eq!(
            parse_pvh(&qemu(), 0x5000, &mut b),
            Err(BootError::PvhUnreadable(0x5000))
        );
        let m = Mem(vec![(0x6000, start_info(1, 0, 0, 0x9000, 1))]);
        let mut b = BootInfo::empty();
        assert_eq!(
            parse_pvh(&m, 0x6000, &mut b),
            Err(BootError::PvhUnreadable(0x9000))
        );
        let m = Mem(vec![(0x6000, start_info(1, 0, 0, 0, 1))]);
        let mut b = BootInfo::empty();
        assert_eq!(
            parse_pvh(&m, 0x6000, &mut b),
            Err(BootError::PvhEmptyMemoryMap)
        );
    }

    #[test]
    fn cmdline_without_nul_is_cut_at_max_cmdline() {
        let m = Mem(vec![
            (0x6000, start_info(1, 0x10000, 0, 0x8000, 1)),
            (0x10000, vec![b'x'; MAX_CMDLINE + 100]),
            (0x8000, e820(&[(0x100000, 0x1000000, 1)])),
        ]);
        let mut b = BootInfo::empty();
        parse_pvh(&m, 0x6000, &mut b).unwrap();
        assert_eq!(b.cmdline().len(), MAX_CMDLINE);
    }

    #[test]
    fn an_overflowing_entry_count_reads_a_bounded_number_and_counts_the_rest() {
        // 0xffffffff entries claimed, PVH_MAX_ENTRIES of them present, each
        // apart from the others (not mergeable).
        let entries: Vec<_> = (0..PVH_MAX_ENTRIES as u64)
            .map(|i| (i * 0x20_0000, 0x1000, 1))
            .collect();
        let m = Mem(vec![
            (0x6000, start_info(1, 0, 0, 0x10_0000, u32::MAX)),
            (0x10_0000, e820(&entries)),
        ]);
        let mut b = BootInfo::empty();
        parse_pvh(&m, 0x6000, &mut b).unwrap();
        assert_eq!(b.memory_map().len(), crate::MAX_REGIONS);
        assert_eq!(
            b.regions_dropped(),
            (u32::MAX - crate::MAX_REGIONS as u32) as usize
        );
        assert_eq!(
            b.usable_bytes_dropped(),
            (PVH_MAX_ENTRIES as u64 - crate::MAX_REGIONS as u64) * 0x1000
        );
    }
}
