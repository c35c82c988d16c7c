//! The DMA buffer descriptor, and the owned heap buffer that backs one.

use core::alloc::Layout;
use core::ptr::NonNull;

/// A data buffer for one device command, named by CPU address: a non-null
/// pointer and a length. The device layer translates the address (the
/// kernel's heap is identity mapped; the simulated controller offsets it).
///
/// `IoBuf` is only a description; holding one grants nothing. The contract
/// lies with whoever submits it ([`crate::BlockQueue::submit`] is `unsafe`):
/// the memory stays valid, and untouched by the CPU, until the command's
/// completion is delivered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IoBuf {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: an `IoBuf` is a plain (address, length) pair; it is never
// dereferenced through `&self` — every access to the memory it names is an
// `unsafe` operation whose caller states the memory's validity. Moving the
// description between contexts (the run loop and the interrupt handler
// share the engine that holds them) is therefore sound.
unsafe impl Send for IoBuf {}

impl IoBuf {
    /// The buffer of `len` bytes at `ptr`.
    pub const fn new(ptr: NonNull<u8>, len: usize) -> Self {
        IoBuf { ptr, len }
    }
    /// No data (flush): a dangling, well-aligned pointer and length 0.
    pub const fn empty() -> Self {
        IoBuf {
            ptr: NonNull::<u64>::dangling().cast(),
            len: 0,
        }
    }
    /// The buffer at address `addr`, or `None` for address 0.
    pub fn from_addr(addr: usize, len: usize) -> Option<Self> {
        NonNull::new(addr as *mut u8).map(|ptr| IoBuf { ptr, len })
    }
    pub fn from_mut_slice(b: &mut [u8]) -> Self {
        let len = b.len();
        IoBuf {
            // A slice's pointer is never null.
            ptr: NonNull::from(b).cast(),
            len,
        }
    }
    /// For commands that only read the buffer (writes to the device).
    pub fn from_slice(b: &[u8]) -> Self {
        IoBuf {
            ptr: NonNull::from(b).cast(),
            len: b.len(),
        }
    }
    pub fn as_ptr(self) -> *mut u8 {
        self.ptr.as_ptr()
    }
    pub fn addr(self) -> usize {
        self.ptr.as_ptr() as usize
    }
    pub fn len(self) -> usize {
        self.len
    }
    pub fn is_empty(self) -> bool {
        self.len == 0
    }
    /// `[off, off + len)` of this buffer, or `None` if it does not lie
    /// within it.
    pub fn part(self, off: usize, len: usize) -> Option<IoBuf> {
        if off.checked_add(len)? > self.len {
            return None;
        }
        // Within the described range, so not null (the range does not wrap:
        // it is a real allocation or a slice).
        NonNull::new(self.ptr.as_ptr().wrapping_add(off)).map(|ptr| IoBuf { ptr, len })
    }
}

/// An owned, zeroed, page-aligned heap buffer a device can read or write:
/// the kernel's heap is identity mapped (its address is the device
/// address), and the host's simulated controllers take CPU addresses. It
/// hands out [`IoBuf`] views of its parts ([`DmaBuf::part`]); who submits
/// one keeps the buffer alive until the command's completion.
pub struct DmaBuf {
    ptr: NonNull<u8>,
    len: usize,
}

#[allow(clippy::len_without_is_empty)]
impl DmaBuf {
    /// `len` zeroed bytes, or `None` when the heap cannot give them.
    pub fn new(len: usize) -> Option<Self> {
        let layout = Layout::from_size_align(len.max(1), 4096).ok()?;
        // SAFETY: non-zero size.
        let p = NonNull::new(unsafe { alloc::alloc::alloc_zeroed(layout) })?;
        Some(DmaBuf { ptr: p, len })
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: owned allocation of len bytes, initialised (zeroed).
        unsafe { core::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: owned allocation of len bytes, initialised (zeroed);
        // `&mut self` makes the borrow unique.
        unsafe { core::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
    /// The device view of `[off, off + len)`.
    pub fn part(&mut self, off: usize, len: usize) -> IoBuf {
        assert!(off + len <= self.len);
        IoBuf::new(self.ptr, self.len)
            .part(off, len)
            .unwrap_or(IoBuf::new(self.ptr, 0))
    }
}

impl Drop for DmaBuf {
    fn drop(&mut self) {
        if let Ok(layout) = Layout::from_size_align(self.len.max(1), 4096) {
            // SAFETY: allocated in new() with this layout.
            unsafe { alloc::alloc::dealloc(self.ptr.as_ptr(), layout) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_part_must_lie_within_the_buffer() {
        let mut v = [0u8; 16];
        let b = IoBuf::from_mut_slice(&mut v);
        assert_eq!(b.part(4, 12).map(|p| p.addr()), Some(b.addr() + 4));
        assert_eq!(b.part(4, 13), None);
        assert_eq!(b.part(usize::MAX, 2), None);
    }

    #[test]
    fn address_zero_is_no_buffer() {
        assert_eq!(IoBuf::from_addr(0, 4096), None);
        assert!(IoBuf::empty().is_empty());
    }
}
