//! The DIO engine: one per queue (per core), used from one context at a time
//! (the kernel holds it in an `IrqMutex`; the MSI-X handler takes the same
//! lock to reap completions).
//!
//! # Requests, tags and completions
//!
//! Every request is an entry of one of the engine's two tables, and every
//! device command's tag names such an entry by index (never by address):
//!
//! - a simple or raw request is a preallocated [`Slot`] (one per command the
//!   queue holds, taken from a [`FreeList`]); its tag is the slot index;
//! - a generic request is a [`GenericDio`] in a [`Slab`]; its commands'
//!   tags carry [`TAG_GENERIC`], the dio's [`ReqId`] (index and generation)
//!   and the command's index in it ([`Tag`] encodes and decodes them).
//!
//! An asynchronous request names its owner's request with a [`ReqId`] in
//! its [`Kiocb`] (or the `owner` of [`Engine::raw`]). [`Engine::poll`] (the
//! poll loop or the MSI-X handler) only reaps: it finishes requests and
//! queues the finished ones on a [`Ring`]; [`Engine::complete`] (the run
//! loop, process context) delivers each as `(owner id, result)` to the sink
//! its caller passes, logs and counts failures there, and only then frees
//! the slot or dio. So no owner code runs in interrupt context, nothing is
//! found through a pointer or a global table, and the ring cannot overflow:
//! it holds at most one entry per slot and per dio.
//!
//! A synchronous request (no owner) is waited for by its caller, which takes
//! the result from its slot or dio and frees it.
//!
//! Buffers: the caller's buffer belongs to the device from submission until
//! the request's completion is delivered (or returned, for a waiter); a
//! bounce buffer is a [`Lent`] held by its generic command and reclaimed (and
//! freed) when that command completes — which the queue reports only once
//! the device can no longer touch it (after the command's completion or a
//! controller reset). See `bounce.rs`.
//!
//! # The generic path
//!
//! Shaped like upstream `__iomap_dio_rw`: [`Engine::generic`] sets up the
//! dio, then walks the range with an [`IomapIter`] — which pairs every
//! `iomap_begin` with its `iomap_end`, so no exit of the loop can skip one —
//! and hands each mapping to the helper for its type: [`zero_fill`] (holes
//! and unwritten extents), [`copy_inline`] (inline data) and
//! [`Engine::dio_mapped`] (split at the device's maximum transfer, bounce
//! where needed, submit). A helper that fails says how far it got
//! ([`Stop`]); the loop reports that to the iterator and records the error
//! in the dio (first error wins). The simple path keeps its single mapping
//! and its single `iomap_end` call inline: it is the hot path.

use crate::bounce::{Bounce, Lent};
use crate::iter::{IomapIter, IomapStep};
use crate::*;
use crate::{BlkError, BlockQueue, IoBuf, Op};
use alloc::vec::Vec;
use dioxide_blk::{FreeList, ReqId, Ring, Slab};

const TAG_GENERIC: u64 = 1 << 63;
const MAX_GENERIC_CMDS: usize = (1 << 15) - 1;

/// What a command's tag names. A generic tag: bit 63 set, the dio's
/// generation in bits 31..47, its index in bits 15..31, the command's index
/// (below [`MAX_GENERIC_CMDS`]) in bits 0..15.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Tag {
    /// A simple or raw request's slot.
    Slot(u16),
    /// Command `cmd` of the generic dio `dio`.
    Generic { dio: ReqId, cmd: u32 },
}

impl Tag {
    #[inline]
    fn encode(self) -> u64 {
        match self {
            Tag::Slot(i) => i as u64,
            Tag::Generic { dio, cmd } => {
                TAG_GENERIC
                    | (dio.generation() as u64) << 31
                    | (dio.index() as u64) << 15
                    | (cmd as u64 & 0x7fff)
            }
        }
    }
    #[inline]
    fn decode(tag: u64) -> Tag {
        if tag & TAG_GENERIC == 0 {
            return Tag::Slot(tag as u16);
        }
        Tag::Generic {
            dio: ReqId::new((tag >> 15) as u16, (tag >> 31) as u16),
            cmd: (tag & 0x7fff) as u32,
        }
    }
}

/// A finished asynchronous request waiting for [`Engine::complete`].
#[derive(Clone, Copy, Debug)]
enum Finished {
    Slot(u16),
    Generic(ReqId),
}

/// Counters, readable at any time.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Requests that took the simple path.
    pub simple: u64,
    /// Requests that took the generic path.
    pub generic: u64,
    /// Simple-path attempts that returned the not-simple sentinel after
    /// `iomap_begin` (the mapping did not qualify) and fell back.
    pub fell_back: u64,
    /// Raw (namespace) commands.
    pub raw: u64,
    /// Requests completed successfully.
    pub completed: u64,
    /// Errors reported (each failed request once).
    pub errors: u64,
    /// Completions naming nothing in flight.
    pub spurious: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SlotState {
    Free,
    InFlight,
    /// Finished with `result`; a waiter takes it, or (for an owner) it is
    /// queued for [`Engine::complete`].
    Done,
}

/// The preallocated request of the simple path (and of raw commands): all a
/// completion needs, so that nothing is allocated per request.
#[derive(Clone, Copy, Debug)]
struct Slot {
    state: SlotState,
    raw: bool,
    owner: Option<ReqId>,
    pos: u64,
    size: u32,
    result: Result<usize, DioError>,
}

const EMPTY_SLOT: Slot = Slot {
    state: SlotState::Free,
    raw: false,
    owner: None,
    pos: 0,
    size: 0,
    result: Ok(0),
};

/// One device command of a generic request.
struct Cmd {
    pos: u64,
    len: usize,
    /// Where the data goes in the caller's buffer.
    dest: usize,
    /// The bounce buffer the device transfers to instead of `dest`, lent
    /// until this command's completion reclaims it.
    bounce: Option<Lent>,
}

/// The dio object of a generic request (an entry of the engine's slab).
struct GenericDio {
    /// Outstanding commands plus one while still submitting.
    remaining: u32,
    op: Op,
    pos: u64,
    size: usize,
    done_before: usize,
    partial: bool,
    owner: Option<ReqId>,
    dops: Option<&'static dyn DioOps>,
    /// The first error (in time) and the lowest failing file offset.
    first_error: Option<DioError>,
    fail_pos: u64,
    cmds: Vec<Cmd>,
    done: bool,
    result: Result<usize, DioError>,
}

impl GenericDio {
    fn record(&mut self, at: u64, e: DioError) {
        self.first_error.get_or_insert(e);
        self.fail_pos = self.fail_pos.min(at);
    }
}

struct State {
    slots: alloc::boxed::Box<[Slot]>,
    free: FreeList,
    /// Simple/raw slots whose command is on the device.
    slots_in_flight: usize,
    generic: Slab<GenericDio>,
    /// Generic dios with commands on the device.
    generic_in_flight: usize,
    /// Finished asynchronous requests, oldest first (one entry at most per
    /// slot and per dio: it cannot overflow).
    finished: Ring<Finished>,
    /// Results of finished slot requests whose slots were freed before
    /// their owners took them ([`Engine::park_one`]), for
    /// [`Engine::complete`] to hand over (one at most per slot).
    parked: Ring<(ReqId, Result<usize, DioError>)>,
    stats: Stats,
}

pub struct Engine<Q: BlockQueue> {
    queue: Q,
    st: State,
    simple_enabled: bool,
}

enum Simple {
    /// The private sentinel: take the generic path (upstream -ENOTBLK).
    NotSimple,
    Err(DioError),
}

/// Where a generic-path helper stopped: `done` bytes of its step were
/// handled (submitted or filled) before `err` at file offset `at`.
struct Stop {
    done: u64,
    at: u64,
    err: DioError,
}

/// What every step of one generic request shares.
#[derive(Clone, Copy)]
struct GenericCtx {
    id: ReqId,
    op: Op,
    /// The caller's buffer and the file offset of its first byte.
    buf: IoBuf,
    pos: u64,
    flags: DioFlags,
    dops: Option<&'static dyn DioOps>,
    nowait: bool,
    /// The device's maximum transfer in whole logical blocks.
    max: u64,
}

/// The error a failed `iomap_begin` means for the request.
fn fs_error(e: IomapError) -> DioError {
    if e == IomapError::Again {
        DioError::Again
    } else {
        DioError::Fs(e)
    }
}

/// A write may only overwrite: every byte of `[pos, pos + count)` inside
/// the file and in written (mapped) extents. Checked before the first
/// command, so that a write over a hole changes nothing at all (the walk
/// itself would have written the mapped part before meeting the hole).
pub fn check_overwrite<O: IomapOps + ?Sized>(
    ops: &O,
    pos: u64,
    count: u64,
) -> Result<(), DioError> {
    let end = pos
        .checked_add(count)
        .filter(|&e| e <= ops.size())
        .ok_or(DioError::Invalid("write past the end of the file"))?;
    let flags = IomapFlags::DIRECT | IomapFlags::WRITE;
    let mut at = pos;
    while at < end {
        let map = ops.iomap_begin(at, end - at, flags).map_err(fs_error)?;
        let mapped = map.kind == IomapType::Mapped;
        let next = map.offset.saturating_add(map.length);
        ops.iomap_end(at, end - at, 0, flags, &map);
        if !mapped {
            return Err(DioError::Unallocated { pos: at });
        }
        if map.offset > at || next <= at {
            return Err(DioError::Invalid("mapping does not cover its position"));
        }
        at = next;
    }
    Ok(())
}

/// A read of a hole or unwritten extent: `len` zeroes at `off` of `buf`.
///
/// # Safety
/// `[off, off + len)` lies in `buf`, which the CPU may write (the caller's
/// buffer during its request: `dio_rw`'s contract).
unsafe fn zero_fill(buf: IoBuf, off: usize, len: usize) {
    // SAFETY: the range lies in `buf` and may be written (this function's
    // contract).
    unsafe { core::ptr::write_bytes(buf.as_ptr().add(off), 0, len) };
}

/// A read of inline data: `step.len` bytes from the CPU address the
/// filesystem gave, to `off` of `buf`.
///
/// # Safety
/// `[off, off + step.len)` lies in `buf`, which the CPU may write; the
/// mapping is an inline one from `iomap_begin`, whose contract puts the
/// mapping's data at its address for its whole length.
unsafe fn copy_inline(buf: IoBuf, off: usize, step: &IomapStep) {
    // SAFETY: the source is inside the inline mapping (step.pos..+len lies
    // in the mapping, so step.addr()..+len in its data), the destination in
    // `buf` (this function's contract); the two do not overlap (filesystem
    // metadata is not the caller's I/O buffer).
    unsafe {
        core::ptr::copy_nonoverlapping(
            step.addr() as *const u8,
            buf.as_ptr().add(off),
            step.len as usize,
        )
    };
}

impl State {
    fn free_slot(&mut self, idx: usize) {
        self.slots[idx].state = SlotState::Free;
        self.free.give(idx as u16);
    }

    /// Runs one completion (completion context: the poll loop or the MSI-X
    /// handler). Finishes the request; an owner's goes on `finished`.
    #[inline]
    fn complete(&mut self, tag: u64, res: Result<(), BlkError>) {
        let idx = match Tag::decode(tag) {
            Tag::Slot(i) => i as usize,
            Tag::Generic { dio, cmd } => return self.complete_generic(dio, cmd, res),
        };
        let Some(slot) = self.slots.get_mut(idx) else {
            self.stats.spurious += 1;
            return;
        };
        if slot.state != SlotState::InFlight {
            self.stats.spurious += 1;
            return;
        }
        slot.state = SlotState::Done;
        self.slots_in_flight -= 1;
        slot.result = match res {
            Ok(()) => {
                self.stats.completed += 1;
                Ok(slot.size as usize)
            }
            Err(err) => Err(DioError::Io { pos: slot.pos, err }),
        };
        if slot.owner.is_some() {
            // At most one entry per slot: cannot be full.
            let _ = self.finished.push(Finished::Slot(idx as u16));
        }
    }

    fn complete_generic(&mut self, id: ReqId, cmd: u32, res: Result<(), BlkError>) {
        let Some(dio) = self.generic.get_mut(id) else {
            self.stats.spurious += 1;
            return;
        };
        let Some(c) = dio.cmds.get_mut(cmd as usize) else {
            self.stats.spurious += 1;
            return;
        };
        let (cpos, clen, dest) = (c.pos, c.len, c.dest);
        // SAFETY: this is the completion of the command the buffer was lent
        // to (or its failure after a reset): the device no longer touches it.
        let bounce: Option<Bounce> = c.bounce.take().map(|l| unsafe { l.reclaim() });
        match res {
            Ok(()) => {
                if let (Some(b), Op::Read) = (&bounce, dio.op) {
                    let src = &b.as_slice()[..clen.min(b.len())];
                    // SAFETY: `dest` is the caller's buffer for this command
                    // (`clen` bytes), valid and ours to write until the
                    // request's completion is delivered (dio_rw's contract);
                    // it is not the bounce buffer.
                    unsafe {
                        core::ptr::copy_nonoverlapping(src.as_ptr(), dest as *mut u8, src.len())
                    };
                }
            }
            Err(e) => dio.record(cpos, DioError::Io { pos: cpos, err: e }),
        }
        // The bounce buffer (if any) is freed here.
        drop(bounce);
        dio.remaining -= 1;
        if dio.remaining == 0 {
            self.generic_in_flight -= 1;
            self.finish_generic(id);
        }
    }

    /// The last reference is gone: compute the result; a waiter takes it,
    /// an owner's request is queued for delivery.
    fn finish_generic(&mut self, id: ReqId) {
        let Some(dio) = self.generic.get_mut(id) else {
            return;
        };
        let result = match dio.first_error {
            None => Ok(dio.size + dio.done_before),
            Some(e) => {
                if dio.partial && dio.fail_pos > dio.pos {
                    Ok((dio.fail_pos - dio.pos) as usize + dio.done_before)
                } else {
                    Err(e)
                }
            }
        };
        if result.is_err() {
            self.stats.errors += 1;
        } else {
            self.stats.completed += 1;
        }
        dio.result = result;
        dio.done = true;
        if let Some(d) = dio.dops {
            d.end_io(dio.pos, dio.size, &result);
        }
        if dio.owner.is_some() {
            // At most one entry per dio: cannot be full.
            let _ = self.finished.push(Finished::Generic(id));
        }
    }
}

impl<Q: BlockQueue> Engine<Q> {
    /// An engine with one simple-path slot per command the queue can hold,
    /// and as many generic dios.
    pub fn new(queue: Q) -> Self {
        let n = queue.depth().clamp(1, 1 << 15);
        let slots = alloc::vec![EMPTY_SLOT; n].into_boxed_slice();
        Engine {
            queue,
            st: State {
                slots,
                free: FreeList::new(n),
                slots_in_flight: 0,
                generic: Slab::new(n),
                generic_in_flight: 0,
                finished: Ring::new(2 * n, Finished::Slot(0)),
                parked: Ring::new(n, (ReqId::new(0, 0), Ok(0))),
                stats: Stats::default(),
            },
            simple_enabled: true,
        }
    }

    pub fn queue(&self) -> &Q {
        &self.queue
    }
    pub fn queue_mut(&mut self) -> &mut Q {
        &mut self.queue
    }
    pub fn into_queue(self) -> Q {
        self.queue
    }
    pub fn stats(&self) -> Stats {
        self.st.stats
    }
    /// The runtime switch (upstream `/sys/kernel/iomap/simple_read`).
    pub fn set_simple(&mut self, on: bool) {
        self.simple_enabled = on;
    }
    pub fn simple_enabled(&self) -> bool {
        self.simple_enabled
    }
    /// Free simple/raw slots.
    pub fn free_slots(&self) -> usize {
        self.st.free.available()
    }
    /// Finished asynchronous requests not yet delivered by
    /// [`Engine::complete`].
    pub fn pending_completions(&self) -> usize {
        self.st.finished.len() + self.st.parked.len()
    }

    /// Reaps device completions and finishes their requests. What the poll
    /// loop and the MSI-X handler call; it runs no owner code (see the
    /// module docs and [`Engine::complete`]).
    #[inline]
    pub fn poll(&mut self) -> usize {
        let st = &mut self.st;
        self.queue.poll(|tag, res| st.complete(tag, res))
    }

    /// Reports commands past their deadline as failed (through the queue's
    /// abort and reset, see [`BlockQueue::expire`]).
    pub fn expire(&mut self) {
        let st = &mut self.st;
        self.queue.expire(|tag, res| st.complete(tag, res));
    }

    /// Delivers every finished asynchronous request to its owner as
    /// `sink(owner id, result)`, oldest first, and frees its slot or dio
    /// (the owner has its buffer back). Failures are counted and logged
    /// here, once, at debug level: the owner reports them with its own
    /// context. Run from the run loop (process context), never from the
    /// interrupt handler. Returns the number delivered.
    pub fn complete(&mut self, mut sink: impl FnMut(ReqId, Result<usize, DioError>)) -> usize {
        let mut n = 0;
        while let Some((owner, result)) = self.st.parked.pop() {
            n += 1;
            sink(owner, result);
        }
        while let Some(f) = self.st.finished.pop() {
            n += 1;
            match f {
                Finished::Slot(i) => {
                    let slot = self.take_slot(i as usize, log::Level::Debug);
                    if let Some(owner) = slot.owner {
                        sink(owner, slot.result);
                    }
                }
                Finished::Generic(id) => {
                    let Some(dio) = self.st.generic.remove(id) else {
                        continue;
                    };
                    if let Err(e) = &dio.result {
                        log::debug!(target: "iomap", "direct I/O at {} ({} bytes) failed: {e}", dio.pos, dio.size);
                    }
                    if let Some(owner) = dio.owner {
                        sink(owner, dio.result);
                    }
                }
            }
        }
        n
    }

    /// Polls until `done` holds (synchronous callers).
    fn wait_until(&mut self, mut done: impl FnMut(&Self) -> bool) {
        let mut spins = 0u32;
        while !done(self) {
            self.poll();
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(1024) {
                self.expire();
            }
            self.queue.relax();
        }
    }

    /// Waits for a synchronous slot request and frees its slot; a failure is
    /// counted and reported here (the waiter has no other reporter).
    fn wait_slot(&mut self, idx: usize) -> Result<usize, DioError> {
        self.wait_until(|e| e.st.slots[idx].state == SlotState::Done);
        self.take_slot(idx, log::Level::Error).result
    }

    /// Frees the finished slot `idx` and returns what it held; a failure is
    /// counted and logged at `level` (debug when an owner reports it with
    /// its own context, error when nobody else will). Inlined, so that the
    /// level is a constant at each call.
    #[inline]
    fn take_slot(&mut self, idx: usize, level: log::Level) -> Slot {
        let slot = self.st.slots[idx];
        self.st.free_slot(idx);
        if let Err(e) = &slot.result {
            self.st.stats.errors += 1;
            log::log!(
                target: "iomap",
                level,
                "{} read at {} ({} bytes) failed: {e}",
                if slot.raw { "raw" } else { "direct" },
                slot.pos,
                slot.size
            );
        }
        slot
    }

    /// A free slot, polling for one when all are busy (unless `nowait`).
    /// A slot held by a finished request whose owner has not taken the
    /// result yet is freed here, its result parked for
    /// [`Engine::complete`] ([`Engine::park_one`]): a synchronous caller on
    /// the core whose owner would take it (a filesystem's commit inside the
    /// NBD service's loop) never waits on itself. `Again` only when every
    /// slot is in flight and `nowait`, or none is and none can be freed.
    fn get_slot(&mut self, nowait: bool) -> Result<usize, DioError> {
        loop {
            if let Some(i) = self.st.free.take() {
                return Ok(i as usize);
            }
            if self.park_one() {
                continue;
            }
            if nowait || self.st.slots_in_flight == 0 {
                return Err(DioError::Again);
            }
            // Until a slot completes (its request can then be parked).
            let before = self.st.slots_in_flight;
            self.wait_until(|e| e.st.free.available() > 0 || e.st.slots_in_flight < before);
        }
    }

    /// Frees the slot of the oldest finished slot request, keeping its
    /// result (and owner) in `parked` for [`Engine::complete`]; whether
    /// there was one. (Finished generic dios met on the way keep their
    /// turn after it: `complete` hands parked results over first.)
    #[cold]
    fn park_one(&mut self) -> bool {
        for _ in 0..self.st.finished.len() {
            let Some(f) = self.st.finished.pop() else {
                return false;
            };
            match f {
                Finished::Slot(i) => {
                    let slot = self.take_slot(i as usize, log::Level::Debug);
                    if let Some(owner) = slot.owner {
                        // At most one parked result per slot: cannot be full.
                        let _ = self.st.parked.push((owner, slot.result));
                    }
                    return true;
                }
                // At most one entry per dio, one just taken: cannot be full.
                generic => {
                    let _ = self.st.finished.push(generic);
                }
            }
        }
        false
    }

    /// Marks slot `idx` in flight for a request.
    #[inline]
    fn start_slot(&mut self, idx: usize, raw: bool, owner: Option<ReqId>, pos: u64, size: u32) {
        // Only what the completion reads; `result` is written when it
        // completes.
        let slot = &mut self.st.slots[idx];
        slot.state = SlotState::InFlight;
        slot.raw = raw;
        slot.owner = owner;
        slot.pos = pos;
        slot.size = size;
        self.st.slots_in_flight += 1;
    }

    /// Takes back a slot whose command was never submitted.
    fn unstart_slot(&mut self, idx: usize) {
        self.st.slots_in_flight -= 1;
        self.st.free_slot(idx);
    }

    /// Submits, waiting for queue space unless `nowait`.
    ///
    /// # Safety
    /// As [`BlockQueue::submit`].
    unsafe fn submit(
        &mut self,
        op: Op,
        lba: u64,
        buf: IoBuf,
        tag: u64,
        nowait: bool,
    ) -> Result<(), BlkError> {
        loop {
            // SAFETY: this function's contract is `BlockQueue::submit`'s
            // (buf valid and untouched until the completion).
            match unsafe { self.queue.submit(op, lba, buf, tag) } {
                Err(BlkError::QueueFull) if !nowait => {
                    self.wait_until(|e| e.queue.in_flight() < e.queue.depth());
                }
                r => return r,
            }
        }
    }

    /// Reads or writes `req.buf` at `req.iocb.pos` of the file `req.ops`
    /// maps: the one entry point of the layer.
    ///
    /// Returns `Done(bytes)` for completed requests (always for synchronous
    /// kiocbs), or `Queued` when the kiocb's owner will receive the result
    /// from [`Engine::complete`]. `req.done_before` is added to the result
    /// (bytes the caller already transferred).
    ///
    /// # Safety
    /// `req.buf` stays valid, and is not accessed by the CPU, until the
    /// request completes: until this returns `Done` or an error, or, after
    /// `Queued`, until its completion is delivered by [`Engine::complete`].
    #[inline]
    pub unsafe fn dio_rw<O: IomapOps + ?Sized>(
        &mut self,
        req: DioRequest<'_, O>,
    ) -> Result<DioResult, DioError> {
        if self.simple_enabled
            && req.dops.is_none()
            && req.done_before == 0
            && self.simple_supported(&req)
        {
            // SAFETY: `simple` has this function's contract on `buf`, which
            // our caller guarantees.
            match unsafe { self.simple(&req.iocb, req.op, req.buf, req.ops, req.flags) } {
                Ok(r) => return Ok(r),
                Err(Simple::Err(e)) => return Err(e),
                Err(Simple::NotSimple) => self.st.stats.fell_back += 1,
            }
        }
        // SAFETY: `generic` has this function's contract on `buf`, which our
        // caller guarantees.
        unsafe { self.generic(req) }
    }

    #[inline]
    fn simple_supported<O: IomapOps + ?Sized>(&self, req: &DioRequest<'_, O>) -> bool {
        let count = req.buf.len() as u64;
        req.op != Op::Flush
            && count != 0
            && count <= req.ops.block_size() as u64
            && !req
                .flags
                .intersects(DioFlags::FORCE_WAIT | DioFlags::PARTIAL | DioFlags::BOUNCE)
            && req
                .iocb
                .pos
                .checked_add(count)
                .is_some_and(|end| end <= req.ops.size())
    }

    fn alignment<O: IomapOps + ?Sized>(&self, ops: &O, flags: DioFlags) -> u64 {
        if flags.contains(DioFlags::FSBLOCK_ALIGNED) {
            ops.block_size() as u64
        } else {
            1 << self.queue.lba_shift()
        }
    }

    /// The simple path: one block, one mapping, one command, one slot.
    /// Reads, and writes that overwrite a written extent (a write into a
    /// hole or an unwritten extent needs allocation or conversion: the
    /// mapping is not simple and the generic path takes it); either way no
    /// metadata changes and nothing is allocated.
    ///
    /// No [`IomapIter`] here: there is one mapping, and its one `iomap_end`
    /// call sits after the checks that may reject it (`checked`), so every
    /// exit after `iomap_begin` passes it.
    #[inline]
    unsafe fn simple<O: IomapOps + ?Sized>(
        &mut self,
        iocb: &Kiocb,
        op: Op,
        buf: IoBuf,
        ops: &O,
        flags: DioFlags,
    ) -> Result<DioResult, Simple> {
        let pos = iocb.pos;
        let count = buf.len() as u64;
        let nowait = iocb.flags.contains(KiocbFlags::NOWAIT);
        let mut bflags = if nowait {
            IomapFlags::DIRECT | IomapFlags::NOWAIT
        } else {
            IomapFlags::DIRECT
        };
        if op != Op::Read {
            bflags |= IomapFlags::WRITE;
        }
        let map = ops
            .iomap_begin(pos, count, bflags)
            .map_err(|e| Simple::Err(fs_error(e)))?;
        let checked = self.simple_slot(iocb, buf, ops, flags, &map, nowait);
        let done = if checked.is_ok() { count } else { 0 };
        ops.iomap_end(pos, count, done, bflags, &map);
        let (idx, dev) = checked?;
        let lba = dev >> self.queue.lba_shift();
        let tag = Tag::Slot(idx as u16).encode();
        // SAFETY: the caller keeps `buf` valid until completion (this
        // function's contract).
        if let Err(e) = unsafe { self.submit(op, lba, buf, tag, nowait) } {
            self.unstart_slot(idx);
            return Err(Simple::Err(if e == BlkError::QueueFull {
                DioError::Again
            } else {
                DioError::Io { pos, err: e }
            }));
        }
        self.st.stats.simple += 1;
        if iocb.owner.is_none() {
            return self
                .wait_slot(idx)
                .map(DioResult::Done)
                .map_err(Simple::Err);
        }
        Ok(DioResult::Queued)
    }

    /// A command on the raw namespace (no filesystem): `lba` and `buf` in the
    /// device's logical blocks. With an owner it completes like the simple
    /// path (delivered by [`Engine::complete`]); without, it waits.
    ///
    /// # Safety
    /// As [`Engine::dio_rw`].
    pub unsafe fn raw(
        &mut self,
        op: Op,
        lba: u64,
        buf: IoBuf,
        owner: Option<ReqId>,
    ) -> Result<DioResult, DioError> {
        let shift = self.queue.lba_shift();
        let flush = op == Op::Flush;
        if (!flush && buf.is_empty())
            || buf.len() & ((1 << shift) - 1) != 0
            || !buf.addr().is_multiple_of(4)
            || buf.len() > self.queue.max_transfer()
        {
            return Err(DioError::Invalid(
                "raw transfer not whole blocks, misaligned or too large",
            ));
        }
        let idx = self.get_slot(false)?;
        self.start_slot(idx, true, owner, lba << shift, buf.len() as u32);
        let tag = Tag::Slot(idx as u16).encode();
        // SAFETY: our caller keeps `buf` valid and untouched until the
        // completion (this function's contract).
        if let Err(e) = unsafe { self.submit(op, lba, buf, tag, false) } {
            self.unstart_slot(idx);
            return Err(DioError::Io {
                pos: lba << shift,
                err: e,
            });
        }
        self.st.stats.raw += 1;
        if owner.is_none() {
            return self.wait_slot(idx).map(DioResult::Done);
        }
        Ok(DioResult::Queued)
    }

    /// A free generic dio entry, polling for one while others are in
    /// flight (unless `nowait`); `Again` when every entry is held by a
    /// finished request not yet delivered (see [`Engine::get_slot`]).
    fn new_dio(&mut self, mut dio: GenericDio, nowait: bool) -> Result<ReqId, DioError> {
        loop {
            match self.st.generic.insert(dio) {
                Ok(id) => return Ok(id),
                Err(d) => dio = d,
            }
            if nowait || self.st.generic_in_flight == 0 {
                return Err(DioError::Again);
            }
            self.wait_until(|e| !e.st.generic.is_full() || e.st.generic_in_flight == 0);
        }
    }

    /// The simple path's checks of its mapping, and its slot (started):
    /// the slot index and the device address.
    #[inline]
    fn simple_slot<O: IomapOps + ?Sized>(
        &mut self,
        iocb: &Kiocb,
        buf: IoBuf,
        ops: &O,
        flags: DioFlags,
        map: &Iomap,
        nowait: bool,
    ) -> Result<(usize, u64), Simple> {
        let (pos, count) = (iocb.pos, buf.len() as u64);
        if map.kind != IomapType::Mapped
            || !map.covers(pos, count)
            || map.flags.contains(MappingFlags::INTEGRITY)
        {
            return Err(Simple::NotSimple);
        }
        let align = self.alignment(ops, flags);
        let dev = map.addr + (pos - map.offset);
        if (pos | count | dev) & (align - 1) != 0 || !buf.addr().is_multiple_of(4) {
            return Err(Simple::Err(DioError::Invalid(
                "position, length or buffer not aligned",
            )));
        }
        let idx = self.get_slot(nowait).map_err(Simple::Err)?;
        self.start_slot(idx, false, iocb.owner, pos, count as u32);
        Ok((idx, dev))
    }
    /// The generic path (upstream `__iomap_dio_rw`): set up the dio, walk
    /// the mappings (see the module docs), drop the submission reference,
    /// then wait or return `Queued`.
    unsafe fn generic<O: IomapOps + ?Sized>(
        &mut self,
        req: DioRequest<'_, O>,
    ) -> Result<DioResult, DioError> {
        let DioRequest {
            iocb,
            op,
            buf,
            ops,
            dops,
            flags,
            done_before,
        } = req;
        let pos = iocb.pos;
        self.st.stats.generic += 1;
        if op == Op::Flush {
            return Err(DioError::Invalid("flush is not a data transfer"));
        }
        let align = self.alignment(ops, flags);
        if (pos | buf.len() as u64) & (align - 1) != 0 || !buf.addr().is_multiple_of(4) {
            return Err(DioError::Invalid("position, length or buffer not aligned"));
        }
        let mut count = buf.len() as u64;
        if op == Op::Read {
            let size = ops.size();
            if pos >= size {
                return Ok(DioResult::Done(done_before));
            }
            count = count.min(size - pos);
        }
        if count == 0 {
            return Ok(DioResult::Done(done_before));
        }
        if op.is_write() {
            check_overwrite(ops, pos, count)?;
        }
        let lbs = 1u64 << self.queue.lba_shift();
        let max = (self.queue.max_transfer() as u64 / lbs * lbs).max(lbs);
        if count.div_ceil(max) as usize > MAX_GENERIC_CMDS {
            return Err(DioError::Invalid("request too large"));
        }
        let nowait = iocb.flags.contains(KiocbFlags::NOWAIT);
        let mut bflags = IomapFlags::DIRECT;
        bflags.set(IomapFlags::WRITE, op.is_write());
        bflags.set(IomapFlags::NOWAIT, nowait);
        let wait = iocb.owner.is_none() || flags.contains(DioFlags::FORCE_WAIT);
        let id = self.new_dio(
            GenericDio {
                remaining: 1,
                op,
                pos,
                size: count as usize,
                done_before,
                partial: flags.contains(DioFlags::PARTIAL),
                owner: if wait { None } else { iocb.owner },
                dops,
                first_error: None,
                fail_pos: u64::MAX,
                cmds: Vec::new(),
                done: false,
                result: Ok(0),
            },
            nowait,
        )?;
        self.st.generic_in_flight += 1;
        let ctx = GenericCtx {
            id,
            op,
            buf,
            pos,
            flags,
            dops,
            nowait,
            max,
        };
        let mut iter = IomapIter::new(ops, pos, count, bflags);
        let stop = loop {
            let step = match iter.next() {
                None => break None,
                Some(Ok(step)) => step,
                Some(Err(e)) => {
                    break Some(Stop {
                        done: 0,
                        at: iter.pos(),
                        err: fs_error(e),
                    })
                }
            };
            // `step` lies in [pos, pos + count) and count <= buf.len(): the
            // helpers' ranges of the caller's buffer are inside it.
            let off = (step.pos - pos) as usize;
            let r = match (op, step.map.kind) {
                (Op::Read, IomapType::Hole | IomapType::Unwritten) => {
                    // SAFETY: [off, off + step.len) lies in the caller's
                    // buffer (above), which the caller lets us write until
                    // completion (our contract).
                    unsafe { zero_fill(buf, off, step.len as usize) };
                    Ok(step.len)
                }
                (Op::Read, IomapType::Inline) => {
                    // SAFETY: the destination lies in the caller's buffer,
                    // ours to write (as above); the mapping is an inline one
                    // from `iomap_begin`.
                    unsafe { copy_inline(buf, off, &step) };
                    Ok(step.len)
                }
                // (Refused before the walk: `check_overwrite`.)
                (_, IomapType::Hole | IomapType::Unwritten | IomapType::Inline) => Err(Stop {
                    done: 0,
                    at: step.pos,
                    err: DioError::Unallocated { pos: step.pos },
                }),
                // SAFETY: the caller's buffer stays valid and untouched until
                // completion (our contract, which `dio_mapped` has).
                (_, IomapType::Mapped) => unsafe { self.dio_mapped(&ctx, &step) },
            };
            match r {
                Ok(n) => iter.advance(n),
                Err(s) => {
                    iter.advance(s.done);
                    break Some(s);
                }
            }
        };
        // The last mapping's `iomap_end`, before the request may complete.
        iter.finish();
        // The dio of this request: present until this function (a waiter)
        // or `complete` (an owner) removes it, so the lookups cannot fail.
        let Some(d) = self.st.generic.get_mut(id) else {
            return Err(DioError::Invalid("generic dio vanished"));
        };
        if let Some(s) = stop {
            d.record(s.at, s.err);
        }
        // Drop the submission reference.
        d.remaining -= 1;
        if d.remaining == 0 {
            // Nothing in flight (holes only, or failed before any command):
            // complete here, even for an asynchronous caller.
            d.owner = None;
            self.st.generic_in_flight -= 1;
            self.st.finish_generic(id);
        } else if !wait {
            return Ok(DioResult::Queued);
        } else {
            self.wait_until(|e| e.st.generic.get(id).is_none_or(|d| d.done));
        }
        // Done, nothing outstanding, no owner (waiters have none): this
        // function removes it, once.
        let dio = self
            .st
            .generic
            .remove(id)
            .ok_or(DioError::Invalid("generic dio vanished"))?;
        if let Err(e) = &dio.result {
            log::error!(target: "iomap", "direct I/O at {} ({} bytes) failed: {e}", dio.pos, dio.size);
        }
        dio.result.map(DioResult::Done)
    }

    /// A mapped step: split at the device's maximum transfer, one command
    /// each. `Ok(bytes submitted)` is the whole step.
    ///
    /// # Safety
    /// The caller's buffer (`ctx.buf`) stays valid, and untouched by the
    /// CPU, until the request completes (`dio_rw`'s contract).
    unsafe fn dio_mapped(&mut self, ctx: &GenericCtx, step: &IomapStep) -> Result<u64, Stop> {
        let lbs = 1u64 << self.queue.lba_shift();
        let dev = step.addr();
        if dev & (lbs - 1) != 0 {
            return Err(Stop {
                done: 0,
                at: step.pos,
                err: DioError::Fs(IomapError::Corrupt),
            });
        }
        let mut done = 0u64;
        while done < step.len {
            let clen = (step.len - done).min(ctx.max) as usize;
            let at = step.pos + done;
            // SAFETY: as this function's contract.
            if let Err(err) = unsafe { self.submit_generic(ctx, at, clen, dev + done) } {
                return Err(Stop { done, at, err });
            }
            done += clen as u64;
        }
        Ok(done)
    }

    /// One command of a generic request: `clen` bytes at file offset `at`,
    /// device byte address `dev`; through a bounce buffer for `BOUNCE` or a
    /// tail shorter than a device block (end of file).
    ///
    /// # Safety
    /// As [`Engine::dio_mapped`]; `[at, at + clen)` lies in the request.
    unsafe fn submit_generic(
        &mut self,
        ctx: &GenericCtx,
        at: u64,
        clen: usize,
        dev: u64,
    ) -> Result<(), DioError> {
        let lbs = 1usize << self.queue.lba_shift();
        let boff = (at - ctx.pos) as usize;
        let dev_len = clen.div_ceil(lbs) * lbs;
        let (iob, lent) = if ctx.flags.contains(DioFlags::BOUNCE) || dev_len != clen {
            let mut b = Bounce::zeroed(dev_len).ok_or(DioError::NoMemory)?;
            if ctx.op.is_write() {
                let src = ctx
                    .buf
                    .part(boff, clen)
                    .ok_or(DioError::Invalid("buffer too short"))?;
                // SAFETY: `src` lies in the caller's buffer, valid for the
                // request (our contract) and only read here; the bounce
                // buffer holds dev_len >= clen bytes and is a distinct
                // allocation.
                unsafe {
                    core::ptr::copy_nonoverlapping(
                        src.as_ptr(),
                        b.as_mut_slice().as_mut_ptr(),
                        clen,
                    )
                };
            }
            let (iob, lent) = b.lend();
            (iob, Some(lent))
        } else {
            let p = ctx
                .buf
                .part(boff, clen)
                .ok_or(DioError::Invalid("buffer too short"))?;
            (p, None)
        };
        if let Some(d) = ctx.dops {
            d.submit_io(at, clen);
        }
        let Some(d) = self.st.generic.get_mut(ctx.id) else {
            // SAFETY: never submitted.
            drop(lent.map(|l| unsafe { l.reclaim() }));
            return Err(DioError::Invalid("generic dio vanished"));
        };
        if d.cmds.try_reserve(1).is_err() {
            // SAFETY: never submitted.
            drop(lent.map(|l| unsafe { l.reclaim() }));
            return Err(DioError::NoMemory);
        }
        let cmd = d.cmds.len() as u32;
        d.cmds.push(Cmd {
            pos: at,
            len: clen,
            dest: ctx.buf.addr() + boff,
            bounce: lent,
        });
        d.remaining += 1;
        let tag = Tag::Generic { dio: ctx.id, cmd }.encode();
        // SAFETY: `iob` is the caller's buffer (valid and untouched until
        // completion: our contract) or a bounce buffer lent to this command,
        // which only its completion reclaims.
        let r = unsafe { self.submit(ctx.op, dev >> self.queue.lba_shift(), iob, tag, ctx.nowait) };
        if let Err(e) = r {
            if let Some(d) = self.st.generic.get_mut(ctx.id) {
                d.remaining -= 1;
                if let Some(c) = d.cmds.get_mut(cmd as usize) {
                    // SAFETY: the submission failed: the device never saw it.
                    drop(c.bounce.take().map(|l| unsafe { l.reclaim() }));
                }
            }
            return Err(if e == BlkError::QueueFull {
                DioError::Again
            } else {
                DioError::Io { pos: at, err: e }
            });
        }
        Ok(())
    }
}
