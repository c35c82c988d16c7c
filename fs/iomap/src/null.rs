//! A null block device (like Linux `null_blk`): every command completes on
//! the next poll, successfully, without moving data. Behind the same queue
//! interface as NVMe, it measures the software cost of the layers above.

use crate::queue::{BlkError, BlockQueue, IoBuf, Op};
use alloc::vec;
use alloc::vec::Vec;

pub struct NullQueue<C: Fn() -> u64> {
    ring: Vec<u64>,
    head: usize,
    len: usize,
    lba_shift: u32,
    capacity: u64,
    clock: C,
}

impl<C: Fn() -> u64> NullQueue<C> {
    /// A device of `capacity` blocks of `1 << lba_shift` bytes with `depth`
    /// command slots; `clock` gives nanoseconds.
    pub fn new(depth: usize, lba_shift: u32, capacity: u64, clock: C) -> Self {
        NullQueue {
            ring: vec![0; depth.max(1)],
            head: 0,
            len: 0,
            lba_shift,
            capacity,
            clock,
        }
    }
}

impl<C: Fn() -> u64> BlockQueue for NullQueue<C> {
    fn lba_shift(&self) -> u32 {
        self.lba_shift
    }
    fn max_transfer(&self) -> usize {
        512 * 1024
    }
    fn depth(&self) -> usize {
        self.ring.len()
    }
    fn in_flight(&self) -> usize {
        self.len
    }
    fn capacity(&self) -> u64 {
        self.capacity
    }
    unsafe fn submit(&mut self, _op: Op, lba: u64, buf: IoBuf, tag: u64) -> Result<(), BlkError> {
        if self.len == self.ring.len() {
            return Err(BlkError::QueueFull);
        }
        let blocks = (buf.len as u64) >> self.lba_shift;
        if _op == Op::Flush {
            let at = (self.head + self.len) % self.ring.len();
            self.ring[at] = tag;
            self.len += 1;
            return Ok(());
        }
        if buf.len == 0 || lba.checked_add(blocks).is_none_or(|e| e > self.capacity) {
            return Err(BlkError::Invalid);
        }
        let at = (self.head + self.len) % self.ring.len();
        self.ring[at] = tag;
        self.len += 1;
        Ok(())
    }
    fn poll<F: FnMut(u64, Result<(), BlkError>)>(&mut self, mut on_done: F) -> usize {
        let n = self.len;
        for _ in 0..n {
            let tag = self.ring[self.head];
            self.head = (self.head + 1) % self.ring.len();
            self.len -= 1;
            on_done(tag, Ok(()));
        }
        n
    }
    fn now_ns(&self) -> u64 {
        (self.clock)()
    }
}
