//! The hardware boundary of the driver.
//!
//! The driver never touches hardware directly: registers are reached through
//! [`Mmio`] and memory the device reads or writes comes from [`Hal`]. The kernel
//! implements both on real MMIO and identity-mapped RAM; tests implement them on a
//! simulated controller and host memory (see [`crate::sim`]).

use core::ptr::NonNull;

/// Size of a memory page as the driver programs it (CC.MPS = 0).
pub const PAGE_SIZE: usize = 4096;

/// A physically contiguous, page-aligned, zero-filled region of memory that the
/// device may access by DMA.
#[derive(Debug)]
pub struct Dma {
    /// Device-visible (physical) address of the first byte.
    pub phys: u64,
    /// CPU-visible address of the first byte.
    pub virt: NonNull<u8>,
    /// Length in bytes, a multiple of [`PAGE_SIZE`].
    pub len: usize,
}

// SAFETY: `Dma` is a plain description of memory; whoever owns it decides who
// touches the memory. Queues move between cores at set-up time only.
unsafe impl Send for Dma {}

/// Memory and time services the driver needs.
///
/// # Safety
///
/// Implementers guarantee that:
/// - [`Hal::dma_alloc`] returns memory that is zeroed, page aligned, physically
///   contiguous over `len` bytes, not used by anything else until passed to
///   [`Hal::dma_free`], and whose `phys` is the address the device must use;
/// - [`Hal::virt_to_phys`] returns the device address of a byte of memory that the
///   caller owns (data buffers), and that consecutive bytes within one page are
///   consecutive in device address space;
/// - [`Hal::now_ns`] is monotonic.
pub unsafe trait Hal: Clone {
    /// Allocates `len` bytes (rounded up to pages) of DMA memory.
    fn dma_alloc(&self, len: usize) -> Option<Dma>;

    /// Returns a region to the allocator.
    ///
    /// # Safety
    ///
    /// `dma` came from [`Hal::dma_alloc`] of this HAL and the device no longer
    /// accesses it (its queue was deleted or the controller disabled).
    unsafe fn dma_free(&self, dma: &Dma);

    /// Device address of the byte at CPU address `virt`.
    fn virt_to_phys(&self, virt: usize) -> u64;

    /// Monotonic time in nanoseconds, used for every deadline.
    fn now_ns(&self) -> u64;

    /// Called in every busy-wait loop (a pause instruction on hardware; the
    /// simulation advances its clock here).
    fn relax(&self) {
        core::hint::spin_loop();
    }
}

/// Access to the controller's register block (BAR0).
///
/// Implementations must perform each access as a single volatile access of the
/// given width at `base + offset`.
pub trait Mmio: Clone {
    /// Reads the 32-bit register at `offset`.
    fn read32(&self, offset: usize) -> u32;
    /// Writes the 32-bit register at `offset`.
    fn write32(&self, offset: usize, value: u32);

    /// Reads a 64-bit register as two 32-bit halves (low first), which every
    /// controller accepts.
    fn read64(&self, offset: usize) -> u64 {
        let lo = self.read32(offset) as u64;
        let hi = self.read32(offset + 4) as u64;
        lo | (hi << 32)
    }

    /// Writes a 64-bit register as two 32-bit halves (low first).
    fn write64(&self, offset: usize, value: u64) {
        self.write32(offset, value as u32);
        self.write32(offset + 4, (value >> 32) as u32);
    }
}
