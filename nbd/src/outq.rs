//! A connection's output: replies waiting to be sent, in segments.
//!
//! One growing `Vec` (the first design) keeps already sent bytes until it
//! compacts and doubles its capacity as it grows, and a doubling `realloc`
//! of a buffer holding several MiB of read replies briefly holds the old
//! and the new copy: the soak measured 82.5 MB of output capacity for
//! 50 MB waiting. Here nothing is ever reallocated:
//!
//! - replies of at most [`SMALL_ITEM`] bytes (headers, control replies,
//!   4 KiB and 8 KiB reads) are appended to shared segments of exactly
//!   [`SEG`] bytes, a new one when the open one has no room (its unused
//!   tail, less than `SMALL_ITEM`, is the only waste);
//! - a larger reply gets a segment of exactly its size;
//! - a segment is freed as soon as its last byte is sent, except that one
//!   shared segment is kept as a spare, so a connection that keeps up with
//!   its replies allocates nothing per reply.
//!
//! So the memory held is at most `held + held / 7 + 2 * SEG` plus the ring
//! of segment pointers, where `held` counts the bytes waiting and the front
//! segment's sent part (see [`OutQueue::bound`]).

use alloc::collections::VecDeque;
use alloc::vec::Vec;

/// Size of a shared segment.
pub const SEG: usize = 128 * 1024;
/// Largest reply appended to a shared segment (header included); larger
/// ones get a segment of their own. `SEG / 8`, so a shared segment that is
/// given up is at least 7/8 full.
pub const SMALL_ITEM: usize = SEG / 8;

/// The allocation for a reply failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OutOfMemory;

#[derive(Default)]
pub struct OutQueue {
    segs: VecDeque<Vec<u8>>,
    /// Bytes of the front segment already sent.
    sent: usize,
    /// Bytes waiting in all segments.
    pending: usize,
    /// The back segment is shared (more small replies may be appended).
    back_shared: bool,
    spare: Option<Vec<u8>>,
}

impl OutQueue {
    pub const fn new() -> OutQueue {
        OutQueue {
            segs: VecDeque::new(),
            sent: 0,
            pending: 0,
            back_shared: false,
            spare: None,
        }
    }

    /// Appends the concatenation of `parts` (all or nothing).
    pub fn push(&mut self, parts: &[&[u8]]) -> Result<(), OutOfMemory> {
        let n: usize = parts.iter().map(|p| p.len()).sum();
        if n == 0 {
            return Ok(());
        }
        self.segs.try_reserve(1).map_err(|_| OutOfMemory)?;
        let room = match self.segs.back() {
            Some(b) if self.back_shared => b.capacity() - b.len(),
            _ => 0,
        };
        if n > SMALL_ITEM {
            if self.back_shared && room > SMALL_ITEM {
                self.trim_back()?;
            }
            let mut v = Vec::new();
            v.try_reserve_exact(n).map_err(|_| OutOfMemory)?;
            self.segs.push_back(v);
            self.back_shared = false;
        } else if n > room {
            let v = match self.spare.take() {
                Some(v) => v,
                None => {
                    let mut v = Vec::new();
                    v.try_reserve_exact(SEG).map_err(|_| OutOfMemory)?;
                    v
                }
            };
            self.segs.push_back(v);
            self.back_shared = true;
        }
        // The back segment has room for all of it: no reallocation.
        let Some(back) = self.segs.back_mut() else {
            return Err(OutOfMemory);
        };
        for p in parts {
            back.extend_from_slice(p);
        }
        self.pending += n;
        Ok(())
    }

    /// Closes the open shared segment, less than 7/8 full, before a large
    /// reply: its unsent bytes move to a segment of exactly their size (a
    /// copy of less than `SEG`), and the shared one becomes the spare. So
    /// replies of alternating sizes do not leave mostly empty segments.
    fn trim_back(&mut self) -> Result<(), OutOfMemory> {
        let from = if self.segs.len() == 1 { self.sent } else { 0 };
        let Some(back) = self.segs.back_mut() else {
            return Ok(());
        };
        let mut v = Vec::new();
        v.try_reserve_exact(back.len() - from)
            .map_err(|_| OutOfMemory)?;
        v.extend_from_slice(&back[from..]);
        let mut old = core::mem::replace(back, v);
        if self.segs.len() == 1 {
            self.sent = 0;
        }
        self.back_shared = false;
        if self.spare.is_none() {
            old.clear();
            self.spare = Some(old);
        }
        Ok(())
    }

    /// The bytes to send next (the rest of the front segment; empty when
    /// nothing waits).
    pub fn front(&self) -> &[u8] {
        self.segs.front().map_or(&[], |s| &s[self.sent..])
    }

    /// `n` bytes of [`OutQueue::front`] were sent.
    pub fn consume(&mut self, n: usize) {
        let Some(front) = self.segs.front() else {
            return;
        };
        let n = n.min(front.len() - self.sent);
        self.sent += n;
        self.pending -= n;
        if self.sent < front.len() {
            return;
        }
        self.sent = 0;
        let Some(mut seg) = self.segs.pop_front() else {
            return;
        };
        if self.segs.is_empty() {
            self.back_shared = false;
            // The ring grew with the most segments ever waiting: give it
            // back when that was many.
            if self.segs.capacity() > 16 {
                self.segs = VecDeque::new();
            }
        }
        if seg.capacity() == SEG && self.spare.is_none() {
            seg.clear();
            self.spare = Some(seg);
        }
    }

    /// Bytes waiting to be sent.
    pub fn pending(&self) -> usize {
        self.pending
    }

    pub fn is_empty(&self) -> bool {
        self.pending == 0
    }

    /// Heap bytes held (segments, the spare, the ring of segments).
    pub fn memory(&self) -> usize {
        self.segs.iter().map(Vec::capacity).sum::<usize>()
            + self.spare.as_ref().map_or(0, Vec::capacity)
            + self.segs.capacity() * core::mem::size_of::<Vec<u8>>()
    }

    /// Drops everything, the spare too.
    pub fn clear(&mut self) {
        *self = OutQueue::new();
    }

    /// Upper bound of [`OutQueue::memory`] while at most `held` bytes wait
    /// or sit sent in the front segment, and at most `peak` did since the
    /// queue was last empty, for replies of every size: shared segments
    /// given up are at least 7/8 full, the open one and the spare are at
    /// most one `SEG` each, a segment of its own is exactly its reply; the
    /// ring has a pointer per segment (each but two holds more than
    /// `SMALL_ITEM` bytes) and grows by doubling, up to the most segments
    /// since it was last emptied.
    pub const fn bound(held: usize, peak: usize) -> usize {
        let ring = 2 * (peak / SMALL_ITEM + 2) + 16;
        held + held / 7 + 2 * SEG + ring * core::mem::size_of::<Vec<u8>>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dioxide_testkit::Rng;

    #[test]
    fn bytes_come_out_in_order_and_memory_stays_under_the_bound() {
        for seed in 1..60u64 {
            let mut r = Rng::new(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
            let mut q = OutQueue::new();
            let mut sent_all = Vec::new();
            let mut pushed_all = Vec::new();
            let mut k = 0u8;
            let mut peak = 0;
            for _ in 0..300 {
                if r.below(3) > 0 {
                    let n = match r.below(4) {
                        0 => 1 + r.below(40) as usize,
                        1 => 4096 + 16,
                        2 => 1 + r.below(SMALL_ITEM as u64 + 100) as usize,
                        _ => 1 + r.below(300_000) as usize,
                    };
                    let split = r.below(n as u64 + 1) as usize;
                    k = k.wrapping_add(1);
                    let mut data = vec![k; n];
                    data[0] = k.wrapping_mul(7);
                    data[n - 1] = k.wrapping_mul(13);
                    q.push(&[&data[..split], &data[split..]]).unwrap();
                    pushed_all.extend_from_slice(&data);
                } else {
                    let n = r.below(200_000) as usize;
                    let f = q.front();
                    let n = n.min(f.len());
                    sent_all.extend_from_slice(&f[..n]);
                    q.consume(n);
                }
                let held = q.pending() + q.sent;
                peak = if q.is_empty() { 0 } else { peak.max(held) };
                assert!(
                    q.memory() <= OutQueue::bound(held, peak),
                    "seed {seed}: memory {} above bound {} for {held}",
                    q.memory(),
                    OutQueue::bound(held, peak)
                );
            }
            while !q.is_empty() {
                let f = q.front().to_vec();
                assert!(!f.is_empty());
                sent_all.extend_from_slice(&f);
                q.consume(f.len());
            }
            assert_eq!(sent_all, pushed_all, "seed {seed}");
            assert!(q.memory() <= SEG + 16 * core::mem::size_of::<Vec<u8>>());
        }
    }

    #[test]
    fn a_connection_that_keeps_up_reuses_its_segment() {
        let mut q = OutQueue::new();
        q.push(&[&[1u8; 4112]]).unwrap();
        let first = q.front().as_ptr();
        q.consume(4112);
        assert!(q.is_empty());
        q.push(&[&[2u8; 4112]]).unwrap();
        assert_eq!(q.front().as_ptr(), first, "the spare segment is reused");
        assert_eq!(
            q.memory(),
            SEG + q.segs.capacity() * core::mem::size_of::<Vec<u8>>()
        );
    }

    #[test]
    fn a_large_reply_gets_a_segment_of_its_own_freed_when_sent() {
        let mut q = OutQueue::new();
        q.push(&[&[0u8; 16], &vec![7u8; 1 << 20]]).unwrap();
        assert_eq!(q.front().len(), (1 << 20) + 16);
        let before = q.memory();
        assert!(before >= (1 << 20) + 16);
        q.consume((1 << 20) + 16);
        assert!(q.memory() < 1024, "{}", q.memory());
    }
}
