//! Host memory as DMA memory, and a virtual clock.

use crate::hal::{Dma, Hal, PAGE_SIZE};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Device addresses are CPU addresses plus this offset (above every
/// user-space address of x86_64 Linux), so a CPU address handed to the
/// device is caught.
pub const PHYS_OFFSET: u64 = 0x8000_0000_0000;

/// The live regions (device address, length), which the model checks
/// every DMA access against.
pub(crate) type Regions = Arc<Mutex<Vec<(u64, usize)>>>;

/// Host memory and a virtual clock shared with the model.
#[derive(Clone, Default)]
pub struct ModelHal {
    pub(crate) clock: Arc<AtomicU64>,
    pub(crate) regions: Regions,
}

impl ModelHal {
    /// Virtual time in nanoseconds.
    pub fn now(&self) -> u64 {
        self.clock.load(Ordering::Relaxed)
    }

    pub fn advance(&self, ns: u64) {
        self.clock.fetch_add(ns, Ordering::Relaxed);
    }

    /// DMA regions allocated and not freed.
    pub fn live_regions(&self) -> usize {
        self.regions.lock().map(|r| r.len()).unwrap_or(0)
    }
}

// SAFETY: regions come from the global allocator, zeroed and page aligned,
// contiguous in the (offset) device address space, and are recorded until
// freed; the clock only moves forward.
unsafe impl Hal for ModelHal {
    fn dma_alloc(&self, len: usize) -> Option<Dma> {
        let len = len.div_ceil(PAGE_SIZE).max(1) * PAGE_SIZE;
        let layout = std::alloc::Layout::from_size_align(len, PAGE_SIZE).ok()?;
        // SAFETY: the layout has a non-zero size.
        let virt = NonNull::new(unsafe { std::alloc::alloc_zeroed(layout) })?;
        let phys = virt.as_ptr() as u64 + PHYS_OFFSET;
        self.regions.lock().ok()?.push((phys, len));
        Some(Dma { phys, virt, len })
    }

    unsafe fn dma_free(&self, dma: &Dma) {
        if let Ok(mut r) = self.regions.lock() {
            r.retain(|&(p, _)| p != dma.phys);
        }
        let Ok(layout) = std::alloc::Layout::from_size_align(dma.len, PAGE_SIZE) else {
            return;
        };
        // SAFETY: the caller passes a region from dma_alloc, whose layout
        // this is.
        unsafe { std::alloc::dealloc(dma.virt.as_ptr(), layout) };
    }

    fn now_ns(&self) -> u64 {
        // Every look at the clock costs a little virtual time, so that
        // loops which only read the clock still reach their deadline.
        self.clock.fetch_add(100, Ordering::Relaxed) + 100
    }

    fn relax(&self) {
        self.clock.fetch_add(1_000, Ordering::Relaxed);
    }
}

/// The model's side of DMA: reads and writes of device addresses, checked
/// against the live regions.
#[derive(Clone)]
pub(crate) struct DmaPort {
    pub(crate) regions: Regions,
}

impl DmaPort {
    fn host_ptr(&self, phys: u64, len: usize) -> Option<*mut u8> {
        let regions = self.regions.lock().ok()?;
        let end = phys.checked_add(len as u64)?;
        regions
            .iter()
            .any(|&(p, l)| phys >= p && end <= p + l as u64)
            .then(|| (phys - PHYS_OFFSET) as usize as *mut u8)
    }

    /// `len` bytes at device address `phys`; `None` outside every region.
    pub(crate) fn read(&self, phys: u64, len: usize) -> Option<Vec<u8>> {
        let p = self.host_ptr(phys, len)?;
        let mut v = vec![0u8; len];
        // SAFETY: `p..p+len` lies in a live region allocated by ModelHal
        // (checked above); the driver does not write it meanwhile (the
        // model runs on the test's thread between driver calls).
        unsafe { std::ptr::copy_nonoverlapping(p, v.as_mut_ptr(), len) };
        Some(v)
    }

    /// Writes `data` at device address `phys`; false outside every region.
    pub(crate) fn write(&self, phys: u64, data: &[u8]) -> bool {
        let Some(p) = self.host_ptr(phys, data.len()) else {
            return false;
        };
        // SAFETY: as in `read`: in a live region, not accessed by the
        // driver while the model runs.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), p, data.len()) };
        true
    }
}
