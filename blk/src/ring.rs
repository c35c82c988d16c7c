//! A fixed-capacity FIFO (ring buffer) of small `Copy` values.
//!
//! Used wherever one context hands indices to another in order: completions
//! from the interrupt handler (or the poll loop) to the run loop, commands to
//! the null device. The storage is allocated once, in [`Ring::new`]; `push`
//! and `pop` never allocate, and a full ring refuses rather than grows — its
//! owner sizes it so that it cannot fill (e.g. one entry per slot that can be
//! queued at most once).

use alloc::boxed::Box;
use alloc::vec;

pub struct Ring<T: Copy> {
    buf: Box<[T]>,
    head: usize,
    len: usize,
}

impl<T: Copy> Ring<T> {
    /// A ring of `capacity` entries (at least one), storage filled with `fill`.
    pub fn new(capacity: usize, fill: T) -> Self {
        Ring {
            buf: vec![fill; capacity.max(1)].into_boxed_slice(),
            head: 0,
            len: 0,
        }
    }
    pub fn capacity(&self) -> usize {
        self.buf.len()
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn is_full(&self) -> bool {
        self.len == self.buf.len()
    }
    /// Appends `v`, or gives it back when the ring is full.
    #[inline]
    pub fn push(&mut self, v: T) -> Result<(), T> {
        if self.is_full() {
            return Err(v);
        }
        let mut at = self.head + self.len;
        if at >= self.buf.len() {
            at -= self.buf.len();
        }
        self.buf[at] = v;
        self.len += 1;
        Ok(())
    }
    /// Takes the oldest entry.
    #[inline]
    pub fn pop(&mut self) -> Option<T> {
        if self.len == 0 {
            return None;
        }
        let v = self.buf[self.head];
        self.head += 1;
        if self.head == self.buf.len() {
            self.head = 0;
        }
        self.len -= 1;
        Some(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ring_is_first_in_first_out_across_the_wrap() {
        let mut r = Ring::new(3, 0u16);
        for round in 0..5u16 {
            assert_eq!(r.push(round), Ok(()));
            assert_eq!(r.push(round + 100), Ok(()));
            assert_eq!(r.pop(), Some(round));
            assert_eq!(r.pop(), Some(round + 100));
        }
        assert_eq!(r.pop(), None);
    }

    #[test]
    fn a_full_ring_refuses_and_keeps_its_entries() {
        let mut r = Ring::new(2, 0u8);
        r.push(1).unwrap();
        r.push(2).unwrap();
        assert!(r.is_full());
        assert_eq!(r.push(3), Err(3));
        assert_eq!((r.pop(), r.pop(), r.pop()), (Some(1), Some(2), None));
    }
}
