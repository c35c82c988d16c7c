//! The hardware boundary of the driver.
//!
//! The driver never touches hardware directly: registers are reached
//! through [`Mmio`] (BAR0, the 128 KiB register block) and memory the
//! device reads or writes comes from [`Hal`]. The kernel implements both on
//! real MMIO and identity-mapped RAM; tests implement them on the software
//! 82576 in [`crate::model`] and host memory.
//!
//! Every ring and every buffer is allocated once, when the driver starts
//! ([`crate::Igb::new`]); nothing is allocated per frame.

use core::ptr::NonNull;

/// Size of a page as the driver allocates DMA memory.
pub const PAGE_SIZE: usize = 4096;

/// A physically contiguous, zero-filled region of memory that the device
/// may access by DMA.
#[derive(Debug)]
pub struct Dma {
    /// Device-visible (physical) address of the first byte.
    pub phys: u64,
    /// CPU-visible address of the first byte.
    pub virt: NonNull<u8>,
    /// Length in bytes (at least what was asked).
    pub len: usize,
}

// SAFETY: `Dma` is a plain description of memory; whoever owns it (one
// ring, one queue) decides who touches the memory. Queues are moved to
// the core that uses them and used there only.
unsafe impl Send for Dma {}

/// Memory and time services the driver needs.
///
/// # Safety
///
/// Implementers guarantee that:
/// - [`Hal::dma_alloc`] returns memory that is zeroed, aligned to
///   [`PAGE_SIZE`], physically contiguous over `len` bytes, mapped at
///   `virt` for the CPU (cacheable and coherent with device DMA, as x86
///   RAM is), not used by anything else until passed to [`Hal::dma_free`],
///   and whose `phys` is the address the device must use;
/// - [`Hal::now_ns`] is monotonic.
pub unsafe trait Hal {
    /// Allocates `len` bytes of DMA memory.
    fn dma_alloc(&self, len: usize) -> Option<Dma>;

    /// Returns a region to the allocator.
    ///
    /// # Safety
    ///
    /// `dma` came from [`Hal::dma_alloc`] of this HAL and the device no
    /// longer accesses it (it was reset).
    unsafe fn dma_free(&self, dma: &Dma);

    /// Monotonic time in nanoseconds, used for every deadline.
    fn now_ns(&self) -> u64;

    /// Called in every busy-wait loop (a pause instruction on hardware;
    /// the model advances its clock here).
    fn relax(&self) {
        core::hint::spin_loop();
    }
}

/// Access to the device's register block (BAR0).
///
/// Implementations perform each access as one volatile 32-bit access at
/// `base + offset` of an uncached mapping. Queues take a clone each (to
/// write their tail registers and interrupt masks from their own core), so
/// clones must reach the same registers; `Send` lets a queue move to its
/// core.
pub trait Mmio: Clone + Send {
    /// Reads the 32-bit register at `offset`.
    fn read32(&self, offset: usize) -> u32;
    /// Writes the 32-bit register at `offset`.
    fn write32(&self, offset: usize, value: u32);
}
