//! A null block device (like Linux `null_blk`): every command completes on
//! the next poll, successfully, without moving data. Behind the same queue
//! interface as NVMe, it measures the software cost of the layers above.

use crate::{BlkError, BlockQueue, IoBuf, Op, Ring};

pub struct NullQueue<C: Fn() -> u64> {
    /// Tags of submitted commands, in order.
    ring: Ring<u64>,
    lba_shift: u32,
    capacity: u64,
    clock: C,
}

impl<C: Fn() -> u64> NullQueue<C> {
    /// A device of `capacity` blocks of `1 << lba_shift` bytes with `depth`
    /// command slots; `clock` gives nanoseconds.
    pub fn new(depth: usize, lba_shift: u32, capacity: u64, clock: C) -> Self {
        NullQueue {
            ring: Ring::new(depth.max(1), 0),
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
        self.ring.capacity()
    }
    fn in_flight(&self) -> usize {
        self.ring.len()
    }
    fn capacity(&self) -> u64 {
        self.capacity
    }
    unsafe fn submit(&mut self, op: Op, lba: u64, buf: IoBuf, tag: u64) -> Result<(), BlkError> {
        if self.ring.is_full() {
            return Err(BlkError::QueueFull);
        }
        let blocks = (buf.len() as u64) >> self.lba_shift;
        if op != Op::Flush
            && (buf.is_empty() || lba.checked_add(blocks).is_none_or(|e| e > self.capacity))
        {
            return Err(BlkError::Invalid);
        }
        self.ring.push(tag).map_err(|_| BlkError::QueueFull)
    }
    fn poll<F: FnMut(u64, Result<(), BlkError>)>(&mut self, mut on_done: F) -> usize {
        let n = self.ring.len();
        for _ in 0..n {
            if let Some(tag) = self.ring.pop() {
                on_done(tag, Ok(()));
            }
        }
        n
    }
    fn now_ns(&self) -> u64 {
        (self.clock)()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_complete_in_order_on_the_next_poll() {
        let mut q = NullQueue::new(2, 9, 100, || 0);
        let mut v = [0u8; 512];
        let b = IoBuf::from_mut_slice(&mut v);
        // SAFETY: the null device never touches the buffer.
        unsafe {
            q.submit(Op::Read, 0, b, 7).unwrap();
            q.submit(Op::Read, 1, b, 8).unwrap();
            assert_eq!(q.submit(Op::Read, 2, b, 9), Err(BlkError::QueueFull));
        }
        let mut got = alloc::vec::Vec::new();
        assert_eq!(q.poll(|t, r| got.push((t, r))), 2);
        assert_eq!(got, [(7, Ok(())), (8, Ok(()))]);
        // SAFETY: the null device never touches the buffer (and refuses this range).
        let past = unsafe { q.submit(Op::Read, 100, b, 1) };
        assert_eq!(past, Err(BlkError::Invalid));
    }
}
