//! A descriptor ring and a block of equal buffers in DMA memory, and the
//! volatile accesses to them.
//!
//! Descriptors are read and written with volatile 32-bit accesses: the
//! device writes them behind the compiler's back. Buffers are indexed by
//! slot; who may touch a slot's buffer is the ring owner's business
//! (rx.rs, tx.rs say when).

use crate::desc::DESC_LEN;
use crate::hal::{Dma, Hal};
use crate::Error;
use core::ptr;

/// Allocates `len` bytes of DMA memory or says how many were missing.
pub(crate) fn alloc<H: Hal>(hal: &H, len: usize) -> Result<Dma, Error> {
    match hal.dma_alloc(len) {
        Some(d) if d.len >= len => Ok(d),
        Some(d) => {
            // SAFETY: just allocated by this HAL; the device never saw it.
            unsafe { hal.dma_free(&d) };
            Err(Error::NoDmaMemory { bytes: len })
        }
        None => Err(Error::NoDmaMemory { bytes: len }),
    }
}

/// `n` descriptors.
pub(crate) struct DescRing {
    dma: Dma,
    n: usize,
}

impl DescRing {
    pub(crate) fn new<H: Hal>(hal: &H, n: usize) -> Result<Self, Error> {
        Ok(DescRing {
            dma: alloc(hal, n * DESC_LEN)?,
            n,
        })
    }

    pub(crate) fn len(&self) -> usize {
        self.n
    }

    pub(crate) fn phys(&self) -> u64 {
        self.dma.phys
    }

    pub(crate) fn dma(&self) -> &Dma {
        &self.dma
    }

    fn word_ptr(&self, i: usize, word: usize) -> *mut u32 {
        debug_assert!(i < self.n && word < 4);
        let off = (i % self.n) * DESC_LEN + 4 * (word % 4);
        // SAFETY: `off + 4 <= n * DESC_LEN <= dma.len` (indices reduced
        // modulo their bounds), so the pointer stays inside the region.
        unsafe { self.dma.virt.as_ptr().add(off).cast::<u32>() }
    }

    /// Dword `word` (0-3) of descriptor `i`.
    pub(crate) fn read_word(&self, i: usize, word: usize) -> u32 {
        // SAFETY: in bounds (word_ptr), 4-byte aligned (the region is page
        // aligned and descriptors are 16 bytes); the device may write it
        // concurrently, which a volatile read of an aligned u32 tolerates.
        u32::from_le(unsafe { ptr::read_volatile(self.word_ptr(i, word)) })
    }

    /// Descriptor `i`, all 16 bytes.
    pub(crate) fn read(&self, i: usize) -> [u8; DESC_LEN] {
        let mut d = [0u8; DESC_LEN];
        for (w, c) in d.chunks_exact_mut(4).enumerate() {
            c.copy_from_slice(&self.read_word(i, w).to_le_bytes());
        }
        d
    }

    /// Writes descriptor `i`.
    pub(crate) fn write(&self, i: usize, d: &[u8; DESC_LEN]) {
        for (w, c) in d.chunks_exact(4).enumerate() {
            let v = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            // SAFETY: in bounds and aligned as in `read_word`; the slot is
            // the driver's (not handed to the device) when it is written.
            unsafe { ptr::write_volatile(self.word_ptr(i, w), v.to_le()) };
        }
    }
}

/// `n` buffers of `size` bytes each, in one region.
pub(crate) struct Buffers {
    dma: Dma,
    n: usize,
    size: usize,
}

impl Buffers {
    pub(crate) fn new<H: Hal>(hal: &H, n: usize, size: usize) -> Result<Self, Error> {
        Ok(Buffers {
            dma: alloc(hal, n * size)?,
            n,
            size,
        })
    }

    pub(crate) fn size(&self) -> usize {
        self.size
    }

    pub(crate) fn dma(&self) -> &Dma {
        &self.dma
    }

    /// Device address of buffer `i`.
    pub(crate) fn phys(&self, i: usize) -> u64 {
        self.dma.phys + ((i % self.n) * self.size) as u64
    }

    /// The first `len` bytes (at most the buffer) of buffer `i`.
    ///
    /// # Safety
    ///
    /// The device does not write buffer `i` while the slice lives (the
    /// slot is not handed to it).
    pub(crate) unsafe fn get(&self, i: usize, len: usize) -> &[u8] {
        let off = (i % self.n) * self.size;
        // SAFETY: `off + min(len, size) <= n * size <= dma.len`; the
        // caller guarantees the device leaves the bytes alone meanwhile.
        unsafe { core::slice::from_raw_parts(self.dma.virt.as_ptr().add(off), len.min(self.size)) }
    }

    /// Buffer `i`, `len` bytes (at most the buffer), to write.
    ///
    /// # Safety
    ///
    /// The device does not access buffer `i` while the slice lives, and no
    /// other slice of it exists.
    #[allow(clippy::mut_from_ref)]
    pub(crate) unsafe fn get_mut(&self, i: usize, len: usize) -> &mut [u8] {
        let off = (i % self.n) * self.size;
        // SAFETY: in bounds as in `get`; exclusivity is the caller's.
        unsafe {
            core::slice::from_raw_parts_mut(self.dma.virt.as_ptr().add(off), len.min(self.size))
        }
    }
}
