//! The block-queue interface the DIO layer submits to.

use crate::{BlkError, IoBuf};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Read,
    Write,
    /// A write that is durable when it completes (NVMe Force Unit Access:
    /// it does not wait in the device's volatile cache for a flush).
    WriteFua,
    /// Commit the device's volatile cache (no data).
    Flush,
}

impl Op {
    /// The command moves data to the device ([`Op::Write`] or
    /// [`Op::WriteFua`]).
    pub fn is_write(self) -> bool {
        matches!(self, Op::Write | Op::WriteFua)
    }
}

/// One hardware (or null) submission/completion queue.
///
/// A command carries a `tag` chosen by the submitter, which comes back with
/// its completion. A tag names an entry of the submitter's own tables (an
/// index, with whatever kind bits the submitter decodes); it is never a
/// pointer, so a late or repeated completion can be checked against the
/// table rather than trusted.
///
/// Completions are only reported from [`BlockQueue::poll`] and
/// [`BlockQueue::expire`], never from inside `submit`, so a submitter never
/// sees its own completion before `submit` returns.
pub trait BlockQueue {
    /// log2 of the logical block size.
    fn lba_shift(&self) -> u32;
    /// Largest transfer of one command, bytes.
    fn max_transfer(&self) -> usize;
    /// Commands that can be in flight at once.
    fn depth(&self) -> usize;
    /// Commands in flight now.
    fn in_flight(&self) -> usize;
    /// Size in logical blocks.
    fn capacity(&self) -> u64;
    /// Submits one command; `tag` comes back with its completion.
    ///
    /// # Safety
    /// `buf` stays valid, and untouched by the CPU, until the completion.
    unsafe fn submit(&mut self, op: Op, lba: u64, buf: IoBuf, tag: u64) -> Result<(), BlkError>;
    /// Reaps completions, calling `on_done(tag, result)` for each.
    fn poll<F: FnMut(u64, Result<(), BlkError>)>(&mut self, on_done: F) -> usize;
    /// Deals with commands past their deadline (an NVMe queue aborts them
    /// and, when the controller does not answer, resets it). A timed-out
    /// command completes through `on_done` only once the device can no
    /// longer access its buffer, never at the deadline itself.
    fn expire<F: FnMut(u64, Result<(), BlkError>)>(&mut self, _on_done: F) {}
    /// Monotonic time, ns.
    fn now_ns(&self) -> u64;
    /// Called in busy-wait loops.
    fn relax(&self) {
        core::hint::spin_loop();
    }
}
