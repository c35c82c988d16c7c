//! PCI configuration access (PCIe ECAM from ACPI MCFG, else the legacy
//! 0xcf8/0xcfc ports), enumeration, BARs and MSI-X.

use crate::platform::acpi::EcamRegion;
use alloc::vec::Vec;
use spin::Once;
use x86_64::instructions::port::Port;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bdf {
    pub bus: u8,
    pub dev: u8,
    pub func: u8,
}

impl core::fmt::Display for Bdf {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "0000:{:02x}:{:02x}.{}", self.bus, self.dev, self.func)
    }
}

enum Access {
    Ecam(EcamRegion),
    Legacy,
}

static ACCESS: Once<Access> = Once::new();

pub fn init(ecam: Option<EcamRegion>) {
    ACCESS.call_once(|| match ecam {
        Some(r) => {
            let buses = r.bus_end as u64 - r.bus_start as u64 + 1;
            match crate::mm::map_mmio(r.base + ((r.bus_start as u64) << 20), buses << 20) {
                Ok(()) => Access::Ecam(r),
                Err(e) => {
                    log::warn!(target: "pci", "ECAM unusable ({e}); using legacy ports");
                    Access::Legacy
                }
            }
        }
        None => Access::Legacy,
    });
}

/// Address of register `off` of function `b` in the ECAM window `r`.
fn ecam_addr(r: &EcamRegion, b: Bdf, off: u16) -> u64 {
    r.base + ((b.bus as u64) << 20) + ((b.dev as u64) << 15) + ((b.func as u64) << 12) + off as u64
}

pub fn read32(b: Bdf, off: u16) -> u32 {
    let off = off & 0xffc;
    match ACCESS.get() {
        Some(Access::Ecam(r)) if (r.bus_start..=r.bus_end).contains(&b.bus) => {
            // SAFETY: the ECAM window of this bus range is mapped uncached.
            unsafe { core::ptr::read_volatile(ecam_addr(r, b, off) as *const u32) }
        }
        _ => {
            if off >= 256 {
                return u32::MAX;
            }
            // SAFETY: legacy configuration mechanism #1.
            unsafe {
                Port::<u32>::new(0xcf8).write(legacy_addr(b, off));
                Port::<u32>::new(0xcfc).read()
            }
        }
    }
}

pub fn write32(b: Bdf, off: u16, v: u32) {
    let off = off & 0xffc;
    match ACCESS.get() {
        Some(Access::Ecam(r)) if (r.bus_start..=r.bus_end).contains(&b.bus) => {
            // SAFETY: as in read32.
            unsafe { core::ptr::write_volatile(ecam_addr(r, b, off) as *mut u32, v) }
        }
        _ => {
            if off >= 256 {
                return;
            }
            // SAFETY: legacy configuration mechanism #1.
            unsafe {
                Port::<u32>::new(0xcf8).write(legacy_addr(b, off));
                Port::<u32>::new(0xcfc).write(v);
            }
        }
    }
}

fn legacy_addr(b: Bdf, off: u16) -> u32 {
    0x8000_0000 | (b.bus as u32) << 16 | (b.dev as u32) << 11 | (b.func as u32) << 8 | off as u32
}

#[derive(Clone, Copy, Debug)]
pub struct Function {
    pub bdf: Bdf,
    pub vendor: u16,
    pub device: u16,
    pub class: u8,
    pub subclass: u8,
    pub prog_if: u8,
}

fn class_name(c: u8, s: u8, p: u8) -> &'static str {
    match (c, s, p) {
        (0x01, 0x08, 0x02) => "NVMe controller",
        (0x01, 0x06, _) => "SATA controller",
        (0x02, 0x00, _) => "Ethernet controller",
        (0x03, _, _) => "display controller",
        (0x06, 0x00, _) => "host bridge",
        (0x06, 0x01, _) => "ISA bridge",
        (0x06, 0x04, _) => "PCI bridge",
        (0x0c, 0x05, _) => "SMBus controller",
        (0x08, _, _) => "system peripheral",
        _ => "device",
    }
}

/// Finds every function on every bus and logs it.
pub fn enumerate() -> Vec<Function> {
    let buses = match ACCESS.get() {
        Some(Access::Ecam(r)) => r.bus_start..=r.bus_end,
        _ => 0..=255,
    };
    let mut found = Vec::new();
    for bus in buses {
        for dev in 0..32 {
            let f0 = Bdf { bus, dev, func: 0 };
            if read32(f0, 0) & 0xffff == 0xffff {
                continue;
            }
            let multi = (read32(f0, 0x0c) >> 16) & 0x80 != 0;
            for func in 0..if multi { 8 } else { 1 } {
                let bdf = Bdf { bus, dev, func };
                let id = read32(bdf, 0);
                if id & 0xffff == 0xffff {
                    continue;
                }
                let class = read32(bdf, 0x08);
                let f = Function {
                    bdf,
                    vendor: id as u16,
                    device: (id >> 16) as u16,
                    class: (class >> 24) as u8,
                    subclass: (class >> 16) as u8,
                    prog_if: (class >> 8) as u8,
                };
                log::info!(
                    target: "pci",
                    "{} [{:04x}:{:04x}] class {:02x}.{:02x}.{:02x} {}",
                    bdf,
                    f.vendor,
                    f.device,
                    f.class,
                    f.subclass,
                    f.prog_if,
                    class_name(f.class, f.subclass, f.prog_if)
                );
                found.push(f);
            }
        }
    }
    found
}

/// A memory BAR: base address and size.
#[derive(Clone, Copy, Debug)]
pub struct Bar {
    pub base: u64,
    pub size: u64,
}

/// Decodes memory BAR `index` (sizing it with decoding off).
pub fn memory_bar(b: Bdf, index: u8) -> Option<Bar> {
    let off = 0x10 + 4 * index as u16;
    let lo = read32(b, off);
    if lo & 1 != 0 {
        return None; // I/O BAR
    }
    let is64 = (lo >> 1) & 3 == 2;
    let cmd = read32(b, 0x04);
    write32(b, 0x04, cmd & !0x3); // decoding off while sizing
    write32(b, off, u32::MAX);
    let size_lo = read32(b, off) & !0xf;
    write32(b, off, lo);
    let (base, mask) = if is64 {
        let hi = read32(b, off + 4);
        write32(b, off + 4, u32::MAX);
        let size_hi = read32(b, off + 4);
        write32(b, off + 4, hi);
        (
            ((hi as u64) << 32) | (lo & !0xf) as u64,
            ((size_hi as u64) << 32) | size_lo as u64,
        )
    } else {
        ((lo & !0xf) as u64, 0xffff_ffff_0000_0000 | size_lo as u64)
    };
    write32(b, 0x04, cmd);
    if mask == 0 || base == 0 {
        return None;
    }
    Some(Bar {
        base,
        size: (!mask).wrapping_add(1),
    })
}

/// Enables memory decoding and bus mastering; disables legacy INTx.
pub fn enable_device(b: Bdf) {
    let cmd = read32(b, 0x04) & 0xffff;
    write32(b, 0x04, cmd | 0x2 | 0x4 | 0x400);
}

/// Every capability of `b`: (id, offset), in list order (at most 48).
pub fn capabilities(b: Bdf) -> impl Iterator<Item = (u8, u16)> {
    let has = (read32(b, 0x04) >> 16) & 0x10 != 0;
    let mut p = if has {
        (read32(b, 0x34) & 0xfc) as u16
    } else {
        0
    };
    let mut left = 48;
    core::iter::from_fn(move || {
        if p < 0x40 || left == 0 {
            return None;
        }
        left -= 1;
        let h = read32(b, p);
        let here = (h as u8, p);
        p = ((h >> 8) & 0xfc) as u16;
        Some(here)
    })
}

/// The address memory BAR `index` decodes (without sizing it: the device
/// may be running), or `None` for an I/O BAR, an index past the last or an
/// unassigned one.
pub fn bar_address(b: Bdf, index: u8) -> Option<u64> {
    if index > 5 {
        return None;
    }
    let off = 0x10 + 4 * index as u16;
    let lo = read32(b, off);
    if lo & 1 != 0 {
        return None;
    }
    let base = if (lo >> 1) & 3 == 2 && index < 5 {
        ((read32(b, off + 4) as u64) << 32) | (lo & !0xf) as u64
    } else {
        (lo & !0xf) as u64
    };
    (base != 0).then_some(base)
}

/// Walks the capability list for capability `id`; returns its offset.
pub fn find_capability(b: Bdf, id: u8) -> Option<u16> {
    if (read32(b, 0x04) >> 16) & 0x10 == 0 {
        return None;
    }
    let mut p = (read32(b, 0x34) & 0xfc) as u16;
    for _ in 0..48 {
        if p < 0x40 {
            return None;
        }
        let h = read32(b, p);
        if h as u8 == id {
            return Some(p);
        }
        p = ((h >> 8) & 0xfc) as u16;
    }
    None
}

/// MSI-X of one function: its table, mapped.
pub struct MsiX {
    bdf: Bdf,
    cap: u16,
    table: u64,
    pub size: u16,
}

impl MsiX {
    pub fn new(b: Bdf) -> Option<MsiX> {
        let cap = find_capability(b, 0x11)?;
        let ctl = read32(b, cap) >> 16;
        let size = (ctl & 0x7ff) as u16 + 1;
        let t = read32(b, cap + 4);
        let bar = memory_bar(b, (t & 7) as u8)?;
        let table = bar.base + (t & !7) as u64;
        crate::mm::map_mmio(table, size as u64 * 16).ok()?;
        Some(MsiX {
            bdf: b,
            cap,
            table,
            size,
        })
    }

    /// Points entry `index` at `vector` on the CPU with local APIC `apic_id`
    /// (fixed delivery, edge) and unmasks it.
    pub fn route(&self, index: u16, apic_id: u32, vector: u8) {
        if index >= self.size {
            return;
        }
        let e = (self.table + index as u64 * 16) as *mut u32;
        // SAFETY: the table is mapped uncached and index < size.
        unsafe {
            core::ptr::write_volatile(e, 0xfee0_0000 | ((apic_id & 0xff) << 12));
            core::ptr::write_volatile(e.add(1), 0);
            core::ptr::write_volatile(e.add(2), vector as u32);
            core::ptr::write_volatile(e.add(3), 0);
        }
    }

    /// Enables MSI-X on the function (function mask off).
    pub fn enable(&self) {
        let v = read32(self.bdf, self.cap);
        let ctl = ((v >> 16) | 0x8000) & !0x4000;
        write32(self.bdf, self.cap, (v & 0xffff) | (ctl << 16));
    }
}
