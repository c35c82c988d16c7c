//! Kernel page tables, built with the `x86_64` crate.
//!
//! All RAM (and the ACPI regions) up to the highest such address is identity
//! mapped write-back with 2 MiB pages, except the first 2 MiB, which use 4 KiB
//! pages with page 0 left out. MMIO ranges are identity mapped on demand,
//! uncached (PCD | PWT).

use super::frame;
use dioxide_boot::{BootInfo, MemoryKind};
use spin::Mutex;
use x86_64::registers::control::{Cr3, Cr3Flags};
use x86_64::structures::paging::mapper::MapToError;
use x86_64::structures::paging::{
    FrameAllocator, Mapper, OffsetPageTable, Page, PageTable, PageTableFlags as F, PhysFrame,
    Size2MiB, Size4KiB,
};
use x86_64::{PhysAddr, VirtAddr};

struct Frames;

// SAFETY: frames from frame::alloc are unused, zeroed and identity mapped.
unsafe impl FrameAllocator<Size4KiB> for Frames {
    fn allocate_frame(&mut self) -> Option<PhysFrame<Size4KiB>> {
        frame::alloc().map(|a| PhysFrame::containing_address(PhysAddr::new(a)))
    }
}

static MAPPER: Mutex<Option<OffsetPageTable<'static>>> = Mutex::new(None);

const HUGE: u64 = 0x20_0000;

pub fn init(boot: &BootInfo) -> Result<(), &'static str> {
    let pml4_frame = frame::alloc().ok_or("no frame for the page table root")?;
    // SAFETY: a fresh zeroed frame, identity mapped (by the boot tables and by
    // the tables built here), used only as this page table root.
    let pml4 = unsafe { &mut *(pml4_frame as *mut PageTable) };
    // SAFETY: physical memory is identity mapped (offset 0) in the boot tables
    // and in the new ones alike.
    let mut mapper = unsafe { OffsetPageTable::new(pml4, VirtAddr::new(0)) };
    let top = boot
        .memory_map()
        .iter()
        .filter(|r| {
            matches!(
                r.kind,
                MemoryKind::Usable | MemoryKind::AcpiReclaimable | MemoryKind::AcpiNvs
            )
        })
        .map(|r| r.start + r.len)
        .max()
        .ok_or("memory map has no RAM")?;
    let top = top.div_ceil(HUGE) * HUGE;
    let rw = F::PRESENT | F::WRITABLE;
    // First 2 MiB: 4 KiB pages, page 0 unmapped.
    for a in (0x1000..HUGE).step_by(0x1000) {
        let p = Page::<Size4KiB>::containing_address(VirtAddr::new(a));
        let f = PhysFrame::containing_address(PhysAddr::new(a));
        // SAFETY: identity mapping of RAM below 2 MiB.
        unsafe { mapper.map_to(p, f, rw, &mut Frames) }
            .map_err(|_| "map low memory")?
            .ignore();
    }
    // Every 2 MiB region that holds RAM or ACPI data.
    let mut a = HUGE;
    while a < top {
        let holds = boot.memory_map().iter().any(|r| {
            matches!(
                r.kind,
                MemoryKind::Usable | MemoryKind::AcpiReclaimable | MemoryKind::AcpiNvs
            ) && r.start < a + HUGE
                && r.start + r.len > a
        });
        if holds {
            let p = Page::<Size2MiB>::containing_address(VirtAddr::new(a));
            let f = PhysFrame::<Size2MiB>::containing_address(PhysAddr::new(a));
            // SAFETY: identity mapping of RAM.
            unsafe { mapper.map_to(p, f, rw | F::HUGE_PAGE, &mut Frames) }
                .map_err(|_| "map RAM")?
                .ignore();
        }
        a += HUGE;
    }
    // SAFETY: the new tables map the kernel image, its stack, the boot info
    // and all RAM exactly as the boot tables did (identity), so execution
    // continues unchanged after the switch.
    unsafe {
        Cr3::write(
            PhysFrame::containing_address(PhysAddr::new(pml4_frame)),
            Cr3Flags::empty(),
        )
    };
    *MAPPER.lock() = Some(mapper);
    log::info!(target: "mm", "identity mapped RAM up to {:#x}", top);
    Ok(())
}

/// The largest range [`map_mmio`] maps at once: a PCIe ECAM of 256 buses
/// is 256 MiB and a server GPU's BAR can reach tens of GiB; one more than
/// this is a damaged table, not a device.
const MAX_MMIO_RANGE: u64 = 64 << 30;

/// Identity maps `[phys, phys + len)` uncached. Ranges already mapped that
/// way are left as they are.
pub fn map_mmio(phys: u64, len: u64) -> Result<(), &'static str> {
    let mut guard = MAPPER.lock();
    let mapper = guard.as_mut().ok_or("page tables not set up")?;
    let flags = F::PRESENT | F::WRITABLE | F::NO_CACHE | F::WRITE_THROUGH;
    let end = phys.checked_add(len).ok_or("MMIO range overflows")?;
    // Addresses come from firmware tables and devices: refuse what the
    // identity map cannot hold (beyond 2^47, the canonical lower half)
    // rather than let the address types panic, and ranges past the bound
    // below, which would take the spare frames as page tables.
    if end > 1 << 47 {
        return Err("MMIO range beyond the identity map (2^47)");
    }
    if len > MAX_MMIO_RANGE {
        return Err("MMIO range larger than 64 GiB");
    }
    let mut a = phys & !0xfff;
    while a < end {
        // 2 MiB pages where the range allows (ECAM regions are large).
        if a.is_multiple_of(HUGE) && a + HUGE <= end.div_ceil(HUGE) * HUGE && end - a >= HUGE {
            let p = Page::<Size2MiB>::containing_address(VirtAddr::new(a));
            let f = PhysFrame::<Size2MiB>::containing_address(PhysAddr::new(a));
            // SAFETY: identity mapping of device memory, uncached.
            match unsafe { mapper.map_to(p, f, flags | F::HUGE_PAGE, &mut Frames) } {
                Ok(fl) => fl.flush(),
                Err(MapToError::PageAlreadyMapped(_)) => {}
                Err(_) => return Err("cannot map MMIO (2 MiB)"),
            }
            a += HUGE;
        } else {
            let p = Page::<Size4KiB>::containing_address(VirtAddr::new(a));
            let f = PhysFrame::<Size4KiB>::containing_address(PhysAddr::new(a));
            // SAFETY: identity mapping of device memory, uncached.
            match unsafe { mapper.map_to(p, f, flags, &mut Frames) } {
                Ok(fl) => fl.flush(),
                Err(MapToError::PageAlreadyMapped(_)) => {}
                Err(MapToError::ParentEntryHugePage) => {
                    return Err("MMIO range inside a RAM mapping")
                }
                Err(_) => return Err("cannot map MMIO"),
            }
            a += 0x1000;
        }
    }
    Ok(())
}
