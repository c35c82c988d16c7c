//! Slot tables: a stack of free indices ([`FreeList`]) and a table of
//! values named by generation-checked ids ([`Slab`], [`ReqId`]).
//!
//! A request in flight is an entry of its owner's slab. Its [`ReqId`] is
//! what travels with the command and comes back with the completion, so the
//! completion reaches the owner's entry by index, not through a pointer or a
//! global table. The generation makes a stale id (a completion for an entry
//! freed and reused since) miss instead of hitting the new occupant.

use alloc::boxed::Box;
use alloc::vec::Vec;

/// A stack of free slot indices `0..capacity` (capacity at most 65 536).
/// Allocates only in [`FreeList::new`]: taking and giving back an index is
/// two array accesses.
pub struct FreeList {
    free: Box<[u16]>,
    n: usize,
}

impl FreeList {
    /// All of `0..capacity` free; index 0 is taken first.
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.min(1 << 16);
        let free: Vec<u16> = (0..capacity).rev().map(|i| i as u16).collect();
        FreeList {
            n: free.len(),
            free: free.into_boxed_slice(),
        }
    }
    pub fn capacity(&self) -> usize {
        self.free.len()
    }
    /// Free indices.
    pub fn available(&self) -> usize {
        self.n
    }
    /// Indices taken.
    pub fn used(&self) -> usize {
        self.free.len() - self.n
    }
    #[inline]
    pub fn take(&mut self) -> Option<u16> {
        if self.n == 0 {
            return None;
        }
        self.n -= 1;
        Some(self.free[self.n])
    }
    /// Gives `i` back. The caller gives back only what it took, once; a
    /// surplus give-back (a bug) is ignored rather than overflowing.
    #[inline]
    pub fn give(&mut self, i: u16) {
        if self.n < self.free.len() {
            self.free[self.n] = i;
            self.n += 1;
        }
    }
    /// Everything free again (after a reset).
    pub fn reset(&mut self) {
        for (k, i) in (0..self.free.len()).rev().enumerate() {
            self.free[k] = i as u16;
        }
        self.n = self.free.len();
    }
}

/// The id of a slab entry: its index and the generation it was taken in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ReqId {
    index: u16,
    gen: u16,
}

impl ReqId {
    pub const fn new(index: u16, gen: u16) -> Self {
        ReqId { index, gen }
    }
    pub fn index(self) -> usize {
        self.index as usize
    }
    pub fn generation(self) -> u16 {
        self.gen
    }
}

/// A fixed-capacity table of `T`, each entry named by a [`ReqId`].
pub struct Slab<T> {
    entries: Box<[(u16, Option<T>)]>,
    free: FreeList,
}

impl<T> Slab<T> {
    /// A slab of `capacity` entries (at most 65 536), all free.
    pub fn new(capacity: usize) -> Self {
        let free = FreeList::new(capacity);
        let mut entries = Vec::with_capacity(free.capacity());
        entries.resize_with(free.capacity(), || (0u16, None));
        Slab {
            entries: entries.into_boxed_slice(),
            free,
        }
    }
    pub fn capacity(&self) -> usize {
        self.entries.len()
    }
    pub fn len(&self) -> usize {
        self.free.used()
    }
    pub fn is_empty(&self) -> bool {
        self.free.used() == 0
    }
    pub fn is_full(&self) -> bool {
        self.free.available() == 0
    }
    /// Stores `v`, or gives it back when the slab is full.
    pub fn insert(&mut self, v: T) -> Result<ReqId, T> {
        let Some(i) = self.free.take() else {
            return Err(v);
        };
        let e = &mut self.entries[i as usize];
        e.0 = e.0.wrapping_add(1);
        e.1 = Some(v);
        Ok(ReqId::new(i, e.0))
    }
    pub fn get(&self, id: ReqId) -> Option<&T> {
        match self.entries.get(id.index())? {
            (gen, Some(v)) if *gen == id.gen => Some(v),
            _ => None,
        }
    }
    pub fn get_mut(&mut self, id: ReqId) -> Option<&mut T> {
        match self.entries.get_mut(id.index())? {
            (gen, Some(v)) if *gen == id.gen => Some(v),
            _ => None,
        }
    }
    /// Takes the entry out; its index becomes free.
    pub fn remove(&mut self, id: ReqId) -> Option<T> {
        let e = self.entries.get_mut(id.index())?;
        if e.0 != id.gen {
            return None;
        }
        let v = e.1.take()?;
        self.free.give(id.index);
        Some(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_free_list_hands_out_each_index_once() {
        let mut f = FreeList::new(3);
        let mut got = [f.take(), f.take(), f.take()];
        got.sort();
        assert_eq!(got, [Some(0), Some(1), Some(2)]);
        assert_eq!(f.take(), None);
        f.give(1);
        assert_eq!((f.available(), f.take()), (1, Some(1)));
        f.reset();
        assert_eq!(f.available(), 3);
    }

    #[test]
    fn a_stale_id_misses_the_reused_entry() {
        let mut s = Slab::new(1);
        let a = s.insert("a").unwrap();
        assert_eq!(s.insert("b"), Err("b"));
        assert_eq!(s.remove(a), Some("a"));
        let b = s.insert("b").unwrap();
        assert_eq!(a.index(), b.index());
        assert_eq!(s.get(a), None);
        assert_eq!(s.remove(a), None);
        assert_eq!(s.get(b), Some(&"b"));
        assert_eq!(s.len(), 1);
    }
}
