//! Physical frame allocator: a bump allocator over the usable regions of the
//! memory map (above 1 MiB and outside the kernel image), with a free list of
//! returned 4 KiB frames.
//!
//! Memory below 1 MiB is never handed out. One usable page there is kept
//! for the application processors' start-up code ([`trampoline_page`]: a
//! SIPI starts a CPU in real mode at a page below 1 MiB).

use core::sync::atomic::{AtomicU64, Ordering};
use dioxide_boot::{BootInfo, MemoryKind};
use spin::Mutex;

pub const FRAME: u64 = 4096;
const MAX: usize = 64;

struct Frames {
    ranges: [(u64, u64); MAX],
    n: usize,
    cur: usize,
    next: u64,
    free_list: u64,
    total: u64,
    used: u64,
}

static FRAMES: Mutex<Frames> = Mutex::new(Frames {
    ranges: [(0, 0); MAX],
    n: 0,
    cur: 0,
    next: 0,
    free_list: 0,
    total: 0,
    used: 0,
});

/// The page kept for [`trampoline_page`] (0: none).
static TRAMPOLINE: AtomicU64 = AtomicU64::new(0);

/// The highest 4 KiB page of usable RAM in `[0x1000, 0xa0000)`: the range
/// a startup IPI's vector can name (vectors 0xa0-0xbf are reserved, and
/// page 0 holds the real-mode interrupt table and stays unmapped).
fn pick_trampoline(boot: &BootInfo) -> Option<u64> {
    boot.memory_map()
        .iter()
        .filter(|r| r.kind == MemoryKind::Usable)
        .filter_map(|r| {
            let start = r.start.max(FRAME).div_ceil(FRAME) * FRAME;
            let end = (r.start.saturating_add(r.len)).min(0xa_0000) / FRAME * FRAME;
            (end > start).then(|| end - FRAME)
        })
        .max()
}

/// A page of usable RAM below 1 MiB (4 KiB aligned, never handed out by
/// this allocator, identity mapped) for the AP start-up code, if the
/// memory map has one.
pub fn trampoline_page() -> Option<u64> {
    match TRAMPOLINE.load(Ordering::Relaxed) {
        0 => None,
        p => Some(p),
    }
}

pub fn init(boot: &BootInfo) {
    if let Some(p) = pick_trampoline(boot) {
        TRAMPOLINE.store(p, Ordering::Relaxed);
    }
    let mut f = FRAMES.lock();
    let (ks, ke) = (boot.kernel_start, boot.kernel_end);
    for r in boot.memory_map() {
        if r.kind != MemoryKind::Usable {
            continue;
        }
        let mut start = r.start.max(0x10_0000).div_ceil(FRAME) * FRAME;
        let mut end = (r.start + r.len) / FRAME * FRAME;
        // Cut the kernel image out.
        if start < ke && end > ks {
            if start >= ks {
                start = start.max(ke);
            } else {
                // The part above the kernel becomes its own range.
                if end > ke && f.n < MAX {
                    let n = f.n;
                    f.ranges[n] = (ke, end);
                    f.n += 1;
                    f.total += end - ke;
                }
                end = ks;
            }
        }
        if end > start && f.n < MAX {
            let n = f.n;
            f.ranges[n] = (start, end);
            f.n += 1;
            f.total += end - start;
        }
    }
    let n = f.n;
    f.ranges[..n].sort_unstable_by_key(|r| r.0);
    f.next = f.ranges.first().map_or(0, |r| r.0);
}

/// One zeroed 4 KiB frame.
pub fn alloc() -> Option<u64> {
    let mut f = FRAMES.lock();
    let frame = if f.free_list != 0 {
        let fr = f.free_list;
        // SAFETY: free frames are identity mapped and hold the next pointer.
        f.free_list = unsafe { core::ptr::read(fr as *const u64) };
        fr
    } else {
        bump(&mut f, 1)?
    };
    f.used += FRAME;
    // SAFETY: the frame is RAM owned by nobody else now, identity mapped.
    unsafe { core::ptr::write_bytes(frame as *mut u8, 0, FRAME as usize) };
    Some(frame)
}

/// `count` physically contiguous frames (not zeroed), 2 MiB aligned when
/// `huge_align`.
pub fn alloc_contiguous(count: u64, huge_align: bool) -> Option<u64> {
    let mut f = FRAMES.lock();
    if huge_align {
        let aligned = f.next.div_ceil(0x20_0000) * 0x20_0000;
        let cur = f.cur;
        if cur < f.n && aligned + count * FRAME <= f.ranges[cur].1 {
            f.next = aligned;
        }
    }
    let r = bump(&mut f, count)?;
    f.used += count * FRAME;
    Some(r)
}

fn bump(f: &mut Frames, count: u64) -> Option<u64> {
    while f.cur < f.n {
        let (_, end) = f.ranges[f.cur];
        if f.next + count * FRAME <= end {
            let r = f.next;
            f.next += count * FRAME;
            return Some(r);
        }
        f.cur += 1;
        if f.cur < f.n {
            f.next = f.ranges[f.cur].0;
        }
    }
    None
}

/// Bytes still available in the largest remaining contiguous range.
pub fn largest_free() -> u64 {
    let f = FRAMES.lock();
    let mut best = 0;
    for i in f.cur..f.n {
        let start = if i == f.cur { f.next } else { f.ranges[i].0 };
        best = best.max(f.ranges[i].1.saturating_sub(start));
    }
    best
}

/// (usable bytes, bytes handed out)
pub fn stats() -> (u64, u64) {
    let f = FRAMES.lock();
    (f.total, f.used)
}
