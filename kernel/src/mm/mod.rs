//! Memory: physical frames, page tables, the heap.
//!
//! dioxide runs in one address space with physical memory identity mapped
//! (virtual address == physical address), which makes every heap buffer
//! directly usable for DMA. RAM is mapped write-back; MMIO is mapped on demand,
//! uncached, with [`map_mmio`]. Page 0 is left unmapped so that null pointer
//! accesses fault.

pub mod frame;
pub mod heap;
pub mod paging;

pub use paging::map_mmio;

use dioxide_boot::BootInfo;

/// Sets up frames, page tables and the heap. Returns the heap size in bytes.
pub fn init(boot: &BootInfo) -> Result<usize, &'static str> {
    if boot.regions_dropped() != 0 {
        log::warn!(
            target: "mm",
            "memory map: {} entries beyond the {} kept were dropped ({} MiB of usable RAM not used)",
            boot.regions_dropped(),
            dioxide_boot::MAX_REGIONS,
            boot.usable_bytes_dropped() >> 20
        );
    }
    frame::init(boot);
    paging::init(boot)?;
    heap::init()
}
