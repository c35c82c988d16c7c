//! Bounce buffers of the generic path, with their ownership in the types.
//!
//! A bounce buffer is kernel memory the device transfers to or from instead
//! of the caller's buffer: for `DioFlags::BOUNCE` (stable pages) and for a
//! tail shorter than a device block at end of file. It has two owners in
//! turn, and each is a type:
//!
//! - [`Bounce`]: the CPU's. Filled (for a write) and read (after a read) by
//!   the engine; freed when dropped.
//! - [`Lent`]: the device's, from [`Bounce::lend`] until the command that
//!   carries it has completed — or the queue has reported it failed after a
//!   controller reset, which is the same thing for the memory: the device can
//!   no longer touch it. Only [`Lent::reclaim`], `unsafe` with exactly that
//!   argument, turns it back into a [`Bounce`]. A `Lent` dropped without
//!   being reclaimed (an engine torn down with commands in flight) *leaks*
//!   its memory rather than free what the device may still write.
//!
//! In the engine a `Lent` belongs to its command in the generic dio, and the
//! dio leaves its slab only after its last command completed, so the
//! completion is the one place that reclaims it.

use crate::IoBuf;
use core::alloc::Layout;
use core::ptr::NonNull;

/// Alignment of every bounce buffer: a page, which any device can DMA to.
const ALIGN: usize = 4096;

fn layout(len: usize) -> Option<Layout> {
    Layout::from_size_align(len.max(1), ALIGN).ok()
}

/// A zeroed, page-aligned buffer owned by the CPU; freed on drop.
pub struct Bounce {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: a `Bounce` owns its allocation exclusively (like a `Box<[u8]>`),
// and the global allocator may free memory from any context; moving it
// between the run loop and the interrupt handler (which share the engine
// holding it) is therefore sound.
unsafe impl Send for Bounce {}

impl Bounce {
    /// `len` zeroed bytes, page-aligned; `None` when the allocator has none.
    pub fn zeroed(len: usize) -> Option<Bounce> {
        let l = layout(len)?;
        // SAFETY: the layout's size is non-zero (`len.max(1)`).
        let p = unsafe { alloc::alloc::alloc_zeroed(l) };
        NonNull::new(p).map(|ptr| Bounce { ptr, len })
    }

    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` is our allocation of `len` initialised (zeroed at
        // allocation) bytes, owned by this value and not lent to a device
        // (a lent buffer is a `Lent`, not a `Bounce`).
        unsafe { core::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`, and `&mut self` makes the access
        // exclusive.
        unsafe { core::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    /// Hands the buffer to the device: the description to submit and the
    /// token that keeps the memory allocated until [`Lent::reclaim`].
    pub fn lend(self) -> (IoBuf, Lent) {
        let this = core::mem::ManuallyDrop::new(self);
        (
            IoBuf::new(this.ptr, this.len),
            Lent {
                ptr: this.ptr,
                len: this.len,
            },
        )
    }
}

impl Drop for Bounce {
    fn drop(&mut self) {
        if let Some(l) = layout(self.len) {
            // SAFETY: allocated in `zeroed` with this layout; a `Bounce` is
            // dropped once, and the device does not hold it (lending consumes
            // the `Bounce` without running this).
            unsafe { alloc::alloc::dealloc(self.ptr.as_ptr(), l) };
        }
    }
}

/// A bounce buffer the device may be using (see the module docs).
#[must_use = "a lent bounce buffer must be reclaimed after its command completes, or it leaks"]
pub struct Lent {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: a `Lent` is an owning token for an allocation (no access to the
// memory goes through it until `reclaim`, which is `unsafe`); moving it
// between contexts is as sound as moving the `Bounce` it came from.
unsafe impl Send for Lent {}

impl Lent {
    /// The buffer back in the CPU's hands.
    ///
    /// # Safety
    /// The device no longer accesses the memory: the command it was lent to
    /// has completed, was reported failed after a controller reset, or was
    /// never submitted.
    pub unsafe fn reclaim(self) -> Bounce {
        let this = core::mem::ManuallyDrop::new(self);
        Bounce {
            ptr: this.ptr,
            len: this.len,
        }
    }
}

impl Drop for Lent {
    fn drop(&mut self) {
        // Not freed: the device may still write into it.
        log::warn!(
            target: "iomap",
            "bounce buffer of {} bytes dropped while lent to the device: leaked",
            self.len
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bounce_buffer_is_zeroed_page_aligned_and_survives_a_loan() {
        let mut b = Bounce::zeroed(5000).unwrap();
        assert!(b.as_slice().iter().all(|&x| x == 0));
        b.as_mut_slice()[4999] = 7;
        let (io, lent) = b.lend();
        assert_eq!(io.len(), 5000);
        assert_eq!(io.addr() % ALIGN, 0);
        // SAFETY: never submitted to a device.
        let b = unsafe { lent.reclaim() };
        assert_eq!(b.as_slice()[4999], 7);
    }
}
