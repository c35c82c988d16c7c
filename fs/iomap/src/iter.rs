//! Walking a file range mapping by mapping (upstream `iomap_iter`).
//!
//! Every successful `iomap_begin` must be followed by exactly one
//! `iomap_end` saying how much of the mapping was used — on success, on
//! every error and on every early exit. Placing those calls by hand on each
//! exit of a long function is how one gets forgotten, so [`IomapIter`] owns
//! the pairing: [`IomapIter::next`] ends the previous mapping (with what the
//! caller reported through [`IomapIter::advance`]) before it begins the
//! next, and dropping the iterator ends the last one. The caller's loop body
//! only processes one [`IomapStep`] and reports progress:
//!
//! ```ignore
//! let mut it = IomapIter::new(ops, pos, len, flags);
//! while let Some(step) = it.next() {
//!     let step = step?;            // iomap_begin failed: nothing is owed
//!     let done = process(&step)?;  // an early return drops `it`: iomap_end runs
//!     it.advance(done);
//! }
//! ```
//!
//! As upstream, a step that processed nothing ends the walk.

use crate::{Iomap, IomapError, IomapFlags, IomapOps};

/// One step of a walk: the mapping, and the part of it the request covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IomapStep {
    pub map: Iomap,
    /// File offset where this step starts (inside `map`).
    pub pos: u64,
    /// Bytes of the request in this mapping (> 0).
    pub len: u64,
}

impl IomapStep {
    /// The device (or, for inline data, CPU) address of `pos`.
    #[inline]
    pub fn addr(&self) -> u64 {
        self.map.addr + (self.pos - self.map.offset)
    }
}

/// Walks `[pos, pos + len)` of a file, pairing each `iomap_begin` with its
/// `iomap_end` (see the module docs).
pub struct IomapIter<'a, O: IomapOps + ?Sized> {
    ops: &'a O,
    /// Start of what is not processed yet.
    pos: u64,
    end: u64,
    flags: IomapFlags,
    /// The step handed out by the last `next`, whose `iomap_end` is owed.
    cur: Option<IomapStep>,
    /// What the caller reported done of `cur`.
    processed: u64,
    /// The walk is over (range done, nothing processed, or an error).
    stopped: bool,
}

impl<'a, O: IomapOps + ?Sized> IomapIter<'a, O> {
    pub fn new(ops: &'a O, pos: u64, len: u64, flags: IomapFlags) -> Self {
        IomapIter {
            ops,
            pos,
            end: pos.saturating_add(len),
            flags,
            cur: None,
            processed: 0,
            stopped: false,
        }
    }

    /// Where the walk is: the start of the current step, or of what comes
    /// after the last one ended.
    pub fn pos(&self) -> u64 {
        self.pos
    }

    /// Reports `n` bytes of the current step done (at most its length; the
    /// last report counts).
    #[inline]
    pub fn advance(&mut self, n: u64) {
        self.processed = self.cur.map_or(0, |s| n.min(s.len));
    }

    /// Ends the current step, if any; whether the walk goes on.
    fn end_current(&mut self) -> bool {
        let Some(s) = self.cur.take() else {
            return true;
        };
        let done = core::mem::take(&mut self.processed);
        self.ops.iomap_end(s.pos, s.len, done, self.flags, &s.map);
        self.pos += done;
        done > 0
    }

    /// Ends the previous step and maps the next part of the range: `None`
    /// when the walk is over, `Some(Err)` when the filesystem could not map
    /// it (nothing is owed then; the walk is over too). A mapping that does
    /// not contain the position asked for is ended at once (nothing done)
    /// and reported as `Corrupt`.
    // Not `Iterator`: a step must be reported (`advance`) before the next,
    // which `Iterator::next`'s contract does not express.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> Option<Result<IomapStep, IomapError>> {
        if !self.end_current() {
            self.stopped = true;
        }
        if self.stopped || self.pos >= self.end {
            self.stopped = true;
            return None;
        }
        let (pos, left) = (self.pos, self.end - self.pos);
        let map = match self.ops.iomap_begin(pos, left, self.flags) {
            Ok(m) => m,
            Err(e) => {
                self.stopped = true;
                return Some(Err(e));
            }
        };
        let map_end = map.offset.saturating_add(map.length);
        if map.offset > pos || map_end <= pos {
            self.ops.iomap_end(pos, left, 0, self.flags, &map);
            self.stopped = true;
            return Some(Err(IomapError::Corrupt));
        }
        let step = IomapStep {
            map,
            pos,
            len: (map_end - pos).min(left),
        };
        self.cur = Some(step);
        Some(Ok(step))
    }

    /// Ends the walk now (what dropping it does; a name for the reader).
    pub fn finish(self) {}
}

impl<O: IomapOps + ?Sized> Drop for IomapIter<'_, O> {
    fn drop(&mut self) {
        self.end_current();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{IomapType, MappingFlags};
    use core::cell::RefCell;
    use std::vec::Vec;

    /// 4 KiB mappings; records (begin pos) and (end pos, len, done).
    #[derive(Default)]
    struct Rec {
        begins: RefCell<Vec<u64>>,
        ends: RefCell<Vec<(u64, u64, u64)>>,
        fail_at: Option<u64>,
        bad_at: Option<u64>,
    }
    impl IomapOps for Rec {
        fn iomap_begin(&self, pos: u64, _: u64, _: IomapFlags) -> Result<Iomap, IomapError> {
            self.begins.borrow_mut().push(pos);
            if self.fail_at == Some(pos) {
                return Err(IomapError::Corrupt);
            }
            let offset = if self.bad_at == Some(pos) {
                pos + 4096
            } else {
                pos / 4096 * 4096
            };
            Ok(Iomap {
                kind: IomapType::Mapped,
                offset,
                length: 4096,
                addr: 0,
                flags: MappingFlags::empty(),
            })
        }
        fn iomap_end(&self, pos: u64, len: u64, done: u64, _: IomapFlags, _: &Iomap) {
            self.ends.borrow_mut().push((pos, len, done));
        }
        fn size(&self) -> u64 {
            1 << 20
        }
        fn block_size(&self) -> u32 {
            4096
        }
    }

    #[test]
    fn every_begin_is_ended_once_with_what_was_done() {
        let f = Rec::default();
        let mut it = IomapIter::new(&f, 2048, 8192, IomapFlags::DIRECT);
        while let Some(s) = it.next() {
            let s = s.unwrap();
            it.advance(s.len);
        }
        drop(it);
        assert_eq!(*f.begins.borrow(), [2048, 4096, 8192]);
        assert_eq!(
            *f.ends.borrow(),
            [(2048, 2048, 2048), (4096, 4096, 4096), (8192, 2048, 2048)]
        );
    }

    #[test]
    fn an_early_exit_ends_the_current_mapping_with_the_bytes_reported() {
        let f = Rec::default();
        let walk = || -> Result<(), ()> {
            let mut it = IomapIter::new(&f, 0, 16384, IomapFlags::DIRECT);
            while let Some(s) = it.next() {
                let s = s.map_err(|_| ())?;
                if s.pos == 4096 {
                    it.advance(512);
                    return Err(());
                }
                it.advance(s.len);
            }
            Ok(())
        };
        assert_eq!(walk(), Err(()));
        assert_eq!(*f.ends.borrow(), [(0, 4096, 4096), (4096, 4096, 512)]);
    }

    #[test]
    fn a_step_with_nothing_done_ends_the_walk() {
        let f = Rec::default();
        let mut it = IomapIter::new(&f, 0, 16384, IomapFlags::DIRECT);
        let mut n = 0;
        while let Some(s) = it.next() {
            s.unwrap();
            n += 1;
        }
        assert_eq!(n, 1);
        drop(it);
        assert_eq!(*f.ends.borrow(), [(0, 4096, 0)]);
    }

    #[test]
    fn a_failed_begin_owes_no_end_and_a_bad_mapping_is_ended_at_once() {
        let f = Rec {
            fail_at: Some(4096),
            ..Rec::default()
        };
        let mut it = IomapIter::new(&f, 0, 16384, IomapFlags::DIRECT);
        let mut got = Vec::new();
        while let Some(s) = it.next() {
            got.push(s.map(|s| s.pos));
            if let Ok(p) = got[got.len() - 1] {
                it.advance(4096 - p % 4096);
            }
        }
        assert_eq!(got, [Ok(0), Err(IomapError::Corrupt)]);
        assert_eq!(it.pos(), 4096);
        drop(it);
        assert_eq!(*f.ends.borrow(), [(0, 4096, 4096)]);

        let f = Rec {
            bad_at: Some(0),
            ..Rec::default()
        };
        let mut it = IomapIter::new(&f, 0, 8192, IomapFlags::DIRECT);
        assert_eq!(it.next(), Some(Err(IomapError::Corrupt)));
        assert_eq!(it.next(), None);
        drop(it);
        assert_eq!(*f.ends.borrow(), [(0, 8192, 0)]);
    }
}
