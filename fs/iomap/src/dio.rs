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
//! bounce buffer belongs to its generic command and is freed when that
//! command completes — which the queue reports only once the device can no
//! longer touch it (after the command's completion or a controller reset).

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
    /// A bounce buffer (address, layout size) used instead of `dest`.
    bounce: Option<(usize, usize)>,
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

fn bounce_layout(len: usize) -> core::alloc::Layout {
    // 4 KiB aligned: any device can DMA to it.
    core::alloc::Layout::from_size_align(len.max(1), 4096)
        .unwrap_or(core::alloc::Layout::new::<u64>())
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
        let (cpos, clen, dest, bounce) = (c.pos, c.len, c.dest, c.bounce.take());
        match res {
            Ok(()) => {
                if let Some((b, _)) = bounce {
                    if dio.op == Op::Read {
                        // SAFETY: the bounce buffer holds at least `clen`
                        // bytes the device wrote and no longer touches (this
                        // is its completion); `dest` is the caller's buffer
                        // for this command, valid until the request's
                        // completion is delivered (dio_rw's contract).
                        unsafe {
                            core::ptr::copy_nonoverlapping(b as *const u8, dest as *mut u8, clen)
                        };
                    }
                }
            }
            Err(e) => dio.record(cpos, DioError::Io { pos: cpos, err: e }),
        }
        if let Some((b, size)) = bounce {
            // SAFETY: allocated in `generic` with this layout and taken out
            // of its command above (so freed once); the device is done with
            // it: this is its command's completion.
            unsafe { alloc::alloc::dealloc(b as *mut u8, bounce_layout(size)) };
        }
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
        self.st.finished.len()
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
        while let Some(f) = self.st.finished.pop() {
            n += 1;
            match f {
                Finished::Slot(i) => {
                    let i = i as usize;
                    let slot = self.st.slots[i];
                    self.st.free_slot(i);
                    if let Err(e) = &slot.result {
                        self.st.stats.errors += 1;
                        log::debug!(
                            target: "iomap",
                            "{} read at {} ({} bytes) failed: {e}",
                            if slot.raw { "raw" } else { "direct" },
                            slot.pos,
                            slot.size
                        );
                    }
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
        let slot = self.st.slots[idx];
        self.st.free_slot(idx);
        if let Err(e) = &slot.result {
            self.st.stats.errors += 1;
            log::error!(
                target: "iomap",
                "{} read at {} ({} bytes) failed: {e}",
                if slot.raw { "raw" } else { "direct" },
                slot.pos,
                slot.size
            );
        }
        slot.result
    }

    /// A free slot, polling for one when all are busy (unless `nowait`).
    /// Slots held by finished requests are freed only by
    /// [`Engine::complete`], which this cannot run for their owner: when
    /// every slot is such, the answer is `Again`.
    fn get_slot(&mut self, nowait: bool) -> Result<usize, DioError> {
        loop {
            if let Some(i) = self.st.free.take() {
                return Ok(i as usize);
            }
            if nowait || self.st.slots_in_flight == 0 {
                return Err(DioError::Again);
            }
            self.wait_until(|e| e.st.free.available() > 0 || e.st.slots_in_flight == 0);
        }
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

    /// Reads or writes `buf` at `iocb.pos` of the file `ops` maps: the one
    /// entry point of the layer.
    ///
    /// Returns `Done(bytes)` for completed requests (always for synchronous
    /// kiocbs), or `Queued` when the kiocb's owner will receive the result
    /// from [`Engine::complete`]. `done_before` is added to the result (bytes
    /// the caller already transferred).
    ///
    /// # Safety
    /// `buf` stays valid, and is not accessed by the CPU, until the request
    /// completes: until this returns `Done` or an error, or, after `Queued`,
    /// until its completion is delivered by [`Engine::complete`].
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn dio_rw<O: IomapOps + ?Sized>(
        &mut self,
        iocb: &Kiocb,
        op: Op,
        buf: IoBuf,
        ops: &O,
        dops: Option<&'static dyn DioOps>,
        flags: u32,
        done_before: usize,
    ) -> Result<DioResult, DioError> {
        if self.simple_enabled
            && dops.is_none()
            && done_before == 0
            && self.simple_supported(iocb, op, buf, ops, flags)
        {
            // SAFETY: `simple` has this function's contract on `buf`, which
            // our caller guarantees.
            match unsafe { self.simple(iocb, buf, ops, flags) } {
                Ok(r) => return Ok(r),
                Err(Simple::Err(e)) => return Err(e),
                Err(Simple::NotSimple) => self.st.stats.fell_back += 1,
            }
        }
        // SAFETY: `generic` has this function's contract on `buf`, which our
        // caller guarantees.
        unsafe { self.generic(iocb, op, buf, ops, dops, flags, done_before) }
    }

    #[inline]
    fn simple_supported<O: IomapOps + ?Sized>(
        &self,
        iocb: &Kiocb,
        op: Op,
        buf: IoBuf,
        ops: &O,
        flags: u32,
    ) -> bool {
        let count = buf.len() as u64;
        op == Op::Read
            && count != 0
            && count <= ops.block_size() as u64
            && flags & (dio_flags::FORCE_WAIT | dio_flags::PARTIAL | dio_flags::BOUNCE) == 0
            && iocb
                .pos
                .checked_add(count)
                .is_some_and(|end| end <= ops.size())
    }

    fn alignment<O: IomapOps + ?Sized>(&self, ops: &O, flags: u32) -> u64 {
        if flags & dio_flags::FSBLOCK_ALIGNED != 0 {
            ops.block_size() as u64
        } else {
            1 << self.queue.lba_shift()
        }
    }

    /// The simple path: one block, one mapping, one command, one slot.
    #[inline]
    unsafe fn simple<O: IomapOps + ?Sized>(
        &mut self,
        iocb: &Kiocb,
        buf: IoBuf,
        ops: &O,
        flags: u32,
    ) -> Result<DioResult, Simple> {
        let pos = iocb.pos;
        let count = buf.len() as u64;
        let nowait = iocb.flags & kiocb_flags::NOWAIT != 0;
        let bflags = iomap_flags::DIRECT | if nowait { iomap_flags::NOWAIT } else { 0 };
        let map = ops.iomap_begin(pos, count, bflags).map_err(|e| {
            Simple::Err(if e == IomapError::Again {
                DioError::Again
            } else {
                DioError::Fs(e)
            })
        })?;
        if map.kind != IomapType::Mapped
            || !map.covers(pos, count)
            || map.flags & iomap_f::INTEGRITY != 0
        {
            ops.iomap_end(pos, count, 0, bflags, &map);
            return Err(Simple::NotSimple);
        }
        let align = self.alignment(ops, flags);
        let dev = map.addr + (pos - map.offset);
        if (pos | count | dev) & (align - 1) != 0 || !buf.addr().is_multiple_of(4) {
            ops.iomap_end(pos, count, 0, bflags, &map);
            return Err(Simple::Err(DioError::Invalid(
                "position, length or buffer not aligned",
            )));
        }
        let idx = match self.get_slot(nowait) {
            Ok(i) => i,
            Err(e) => {
                ops.iomap_end(pos, count, 0, bflags, &map);
                return Err(Simple::Err(e));
            }
        };
        self.start_slot(idx, false, iocb.owner, pos, count as u32);
        ops.iomap_end(pos, count, count, bflags, &map);
        let lba = dev >> self.queue.lba_shift();
        let tag = Tag::Slot(idx as u16).encode();
        // SAFETY: the caller keeps `buf` valid until completion (this
        // function's contract).
        if let Err(e) = unsafe { self.submit(Op::Read, lba, buf, tag, nowait) } {
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

    /// The generic path.
    #[allow(clippy::too_many_arguments)]
    unsafe fn generic<O: IomapOps + ?Sized>(
        &mut self,
        iocb: &Kiocb,
        op: Op,
        buf: IoBuf,
        ops: &O,
        dops: Option<&'static dyn DioOps>,
        flags: u32,
        done_before: usize,
    ) -> Result<DioResult, DioError> {
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
        let lbs = 1u64 << self.queue.lba_shift();
        let max = (self.queue.max_transfer() as u64 / lbs * lbs).max(lbs);
        if count.div_ceil(max) as usize > MAX_GENERIC_CMDS {
            return Err(DioError::Invalid("request too large"));
        }
        let nowait = iocb.flags & kiocb_flags::NOWAIT != 0;
        let mut bflags = iomap_flags::DIRECT;
        if op == Op::Write {
            bflags |= iomap_flags::WRITE;
        }
        if nowait {
            bflags |= iomap_flags::NOWAIT;
        }
        let wait = iocb.owner.is_none() || flags & dio_flags::FORCE_WAIT != 0;
        let id = self.new_dio(
            GenericDio {
                remaining: 1,
                op,
                pos,
                size: count as usize,
                done_before,
                partial: flags & dio_flags::PARTIAL != 0,
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
        let end = pos + count;
        let mut cur = pos;
        // The dio of this request: present until this function (a waiter)
        // or `complete` (an owner) removes it, so the lookups cannot fail.
        macro_rules! dio {
            ($s:expr) => {
                match $s.st.generic.get_mut(id) {
                    Some(d) => d,
                    None => return Err(DioError::Invalid("generic dio vanished")),
                }
            };
        }
        'map: while cur < end {
            let map = match ops.iomap_begin(cur, end - cur, bflags) {
                Ok(m) => m,
                Err(e) => {
                    let e = if e == IomapError::Again {
                        DioError::Again
                    } else {
                        DioError::Fs(e)
                    };
                    dio!(self).record(cur, e);
                    break;
                }
            };
            if map.offset > cur || map.offset.saturating_add(map.length) <= cur {
                dio!(self).record(cur, DioError::Fs(IomapError::Corrupt));
                ops.iomap_end(cur, end - cur, 0, bflags, &map);
                break;
            }
            let piece = (map.offset.saturating_add(map.length) - cur).min(end - cur);
            let boff = (cur - pos) as usize;
            match (op, map.kind) {
                (Op::Read, IomapType::Hole | IomapType::Unwritten) => {
                    // SAFETY: [boff, boff + piece) lies in the caller's buffer
                    // (piece <= end - cur and count <= buf.len()), which the
                    // caller lets us write until completion.
                    unsafe { core::ptr::write_bytes(buf.as_ptr().add(boff), 0, piece as usize) };
                }
                (Op::Read, IomapType::Inline) => {
                    let src = map.addr + (cur - map.offset);
                    // SAFETY: the filesystem guarantees inline data at `addr`
                    // for the mapping's length (IomapOps contract); the
                    // destination [boff, boff + piece) lies in the caller's
                    // buffer as above.
                    unsafe {
                        core::ptr::copy_nonoverlapping(
                            src as *const u8,
                            buf.as_ptr().add(boff),
                            piece as usize,
                        )
                    };
                }
                (_, IomapType::Hole | IomapType::Unwritten | IomapType::Inline) => {
                    dio!(self).record(
                        cur,
                        DioError::Unsupported("write needing allocation or conversion"),
                    );
                    ops.iomap_end(cur, piece, 0, bflags, &map);
                    break;
                }
                (_, IomapType::Mapped) => {
                    let dev = map.addr + (cur - map.offset);
                    if dev & (lbs - 1) != 0 {
                        dio!(self).record(cur, DioError::Fs(IomapError::Corrupt));
                        ops.iomap_end(cur, piece, 0, bflags, &map);
                        break;
                    }
                    let mut done = 0u64;
                    while done < piece {
                        let clen = (piece - done).min(max) as usize;
                        let at = cur + done;
                        let boff = boff + done as usize;
                        // A tail shorter than a block (end of file) or BOUNCE
                        // goes through a bounce buffer of whole blocks.
                        let dev_len = (clen as u64).div_ceil(lbs) as usize * lbs as usize;
                        let (iob, bounced) = if flags & dio_flags::BOUNCE != 0 || dev_len != clen {
                            let l = bounce_layout(dev_len);
                            // SAFETY: non-zero size (dev_len >= one block).
                            let b = unsafe { alloc::alloc::alloc_zeroed(l) };
                            let Some(b) = core::ptr::NonNull::new(b) else {
                                dio!(self).record(at, DioError::NoMemory);
                                ops.iomap_end(cur, piece, done, bflags, &map);
                                break 'map;
                            };
                            if op == Op::Write {
                                // SAFETY: the source is the caller's buffer at
                                // [boff, boff + clen), within it; the bounce
                                // buffer holds dev_len >= clen bytes.
                                unsafe {
                                    core::ptr::copy_nonoverlapping(
                                        buf.as_ptr().add(boff),
                                        b.as_ptr(),
                                        clen,
                                    )
                                };
                            }
                            (IoBuf::new(b, dev_len), true)
                        } else {
                            match buf.part(boff, clen) {
                                Some(p) => (p, false),
                                None => {
                                    dio!(self).record(at, DioError::Invalid("buffer too short"));
                                    ops.iomap_end(cur, piece, done, bflags, &map);
                                    break 'map;
                                }
                            }
                        };
                        if let Some(d) = dops {
                            d.submit_io(at, clen);
                        }
                        let d = dio!(self);
                        if d.cmds.try_reserve(1).is_err() {
                            if bounced {
                                // SAFETY: allocated above with this layout,
                                // never submitted.
                                unsafe {
                                    alloc::alloc::dealloc(iob.as_ptr(), bounce_layout(iob.len()))
                                };
                            }
                            d.record(at, DioError::NoMemory);
                            ops.iomap_end(cur, piece, done, bflags, &map);
                            break 'map;
                        }
                        let cmd = d.cmds.len() as u32;
                        d.cmds.push(Cmd {
                            pos: at,
                            len: clen,
                            dest: buf.addr() + boff,
                            bounce: bounced.then_some((iob.addr(), iob.len())),
                        });
                        d.remaining += 1;
                        let tag = Tag::Generic { dio: id, cmd }.encode();
                        // SAFETY: the caller's buffer (our contract) or our
                        // bounce buffer (freed only by this command's
                        // completion) stays valid until the completion.
                        let r = unsafe {
                            self.submit(
                                op,
                                (dev + done) >> self.queue.lba_shift(),
                                iob,
                                tag,
                                nowait,
                            )
                        };
                        if let Err(e) = r {
                            let d = dio!(self);
                            d.remaining -= 1;
                            if let Some((b, l)) = d.cmds[cmd as usize].bounce.take() {
                                // SAFETY: allocated above with this layout,
                                // never submitted, freed once (taken out).
                                unsafe { alloc::alloc::dealloc(b as *mut u8, bounce_layout(l)) };
                            }
                            let e = if e == BlkError::QueueFull {
                                DioError::Again
                            } else {
                                DioError::Io { pos: at, err: e }
                            };
                            d.record(at, e);
                            ops.iomap_end(cur, piece, done, bflags, &map);
                            break 'map;
                        }
                        done += clen as u64;
                    }
                }
            }
            ops.iomap_end(cur, piece, piece, bflags, &map);
            cur += piece;
        }
        // Drop the submission reference.
        let d = dio!(self);
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
}
