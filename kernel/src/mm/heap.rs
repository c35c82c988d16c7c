//! The kernel heap: `linked_list_allocator` behind a counting wrapper.
//!
//! Allocations, frees and bytes in use are counted at all times and can be
//! read at run time ([`stats`]): a path that must not allocate (the NVMe
//! submission/completion path, later the iomap simple path) is proven so by
//! reading the counters before and after. Interrupts are off while the heap
//! lock is held, so an interrupt handler can never deadlock on it (handlers
//! are still expected not to allocate).

use core::alloc::{GlobalAlloc, Layout};
use core::ptr::NonNull;
use core::sync::atomic::{AtomicU64, Ordering};
use linked_list_allocator::Heap;
use spin::Mutex;

pub struct CountingHeap {
    heap: Mutex<Heap>,
    allocs: AtomicU64,
    frees: AtomicU64,
    in_use: AtomicU64,
    peak: AtomicU64,
    failures: AtomicU64,
}

#[global_allocator]
static HEAP: CountingHeap = CountingHeap {
    heap: Mutex::new(Heap::empty()),
    allocs: AtomicU64::new(0),
    frees: AtomicU64::new(0),
    in_use: AtomicU64::new(0),
    peak: AtomicU64::new(0),
    failures: AtomicU64::new(0),
};

/// Heap counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeapStats {
    pub allocs: u64,
    pub frees: u64,
    pub bytes_in_use: u64,
    pub peak_bytes: u64,
    pub failures: u64,
    pub size: u64,
}

pub fn stats() -> HeapStats {
    HeapStats {
        allocs: HEAP.allocs.load(Ordering::Relaxed),
        frees: HEAP.frees.load(Ordering::Relaxed),
        bytes_in_use: HEAP.in_use.load(Ordering::Relaxed),
        peak_bytes: HEAP.peak.load(Ordering::Relaxed),
        failures: HEAP.failures.load(Ordering::Relaxed),
        size: x86_64::instructions::interrupts::without_interrupts(|| {
            HEAP.heap.lock().size() as u64
        }),
    }
}

// SAFETY: forwards to linked_list_allocator under a lock; counters do not
// affect the memory handed out.
unsafe impl GlobalAlloc for CountingHeap {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = x86_64::instructions::interrupts::without_interrupts(|| {
            self.heap.lock().allocate_first_fit(layout)
        });
        match p {
            Ok(p) => {
                self.allocs.fetch_add(1, Ordering::Relaxed);
                let now = self
                    .in_use
                    .fetch_add(layout.size() as u64, Ordering::Relaxed)
                    + layout.size() as u64;
                self.peak.fetch_max(now, Ordering::Relaxed);
                p.as_ptr()
            }
            Err(()) => {
                self.failures.fetch_add(1, Ordering::Relaxed);
                core::ptr::null_mut()
            }
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if let Some(p) = NonNull::new(ptr) {
            x86_64::instructions::interrupts::without_interrupts(|| {
                // SAFETY: the caller passes a pointer from alloc with `layout`.
                unsafe { self.heap.lock().deallocate(p, layout) }
            });
            self.frees.fetch_add(1, Ordering::Relaxed);
            self.in_use
                .fetch_sub(layout.size() as u64, Ordering::Relaxed);
        }
    }
}

/// Gives the heap the largest contiguous free memory, keeping 8 MiB of frames
/// for page tables.
pub fn init() -> Result<usize, &'static str> {
    const KEEP: u64 = 8 << 20;
    let avail = super::frame::largest_free();
    if avail < KEEP + (16 << 20) {
        return Err("less than 24 MiB of contiguous RAM");
    }
    let size = (avail - KEEP) & !0x1f_ffff;
    let start = super::frame::alloc_contiguous(size / 4096, true).ok_or("heap frames")?;
    // SAFETY: [start, start + size) is RAM given to the heap alone, identity
    // mapped write-back.
    unsafe { HEAP.heap.lock().init(start as *mut u8, size as usize) };
    log::info!(target: "mm", "heap {} MiB at {:#x}", size >> 20, start);
    Ok(size as usize)
}
