//! The DIO engine: one per queue (per core), used from one context at a time
//! (the kernel holds it under a lock with interrupts off; the MSI-X handler
//! takes the same lock to run completions).
//!
//! Tags of device commands: a simple or raw request carries the index of its
//! preallocated slot; a generic request carries `TAG_GENERIC`, the index of
//! the command within its dio object, and the dio object's address.

use crate::*;
use crate::{BlkError, BlockQueue, IoBuf, Op};
use alloc::boxed::Box;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU32, Ordering};

const TAG_GENERIC: u64 = 1 << 63;
const PTR_BITS: u32 = 48;
const PTR_MASK: u64 = (1 << PTR_BITS) - 1;
const MAX_GENERIC_CMDS: usize = (1 << 15) - 1;

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
    /// Completed; a synchronous waiter will take the result.
    Done,
    /// Failed; waiting in the deferred queue.
    Failed,
}

/// The preallocated request of the simple path (and of raw commands): all a
/// completion needs, so that nothing is allocated per request.
#[derive(Clone, Copy, Debug)]
struct Slot {
    state: SlotState,
    raw: bool,
    cb: Option<Callback>,
    pos: u64,
    size: u32,
    err: BlkError,
    result: Result<usize, DioError>,
}

const EMPTY_SLOT: Slot = Slot {
    state: SlotState::Free,
    raw: false,
    cb: None,
    pos: 0,
    size: 0,
    err: BlkError::Invalid,
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

/// The dio object of a generic request.
struct GenericDio {
    /// Outstanding commands plus one while still submitting.
    remaining: AtomicU32,
    op: Op,
    pos: u64,
    size: usize,
    done_before: usize,
    partial: bool,
    cb: Option<Callback>,
    dops: Option<&'static dyn DioOps>,
    /// The first error (in time) and the lowest failing file offset.
    first_error: Option<DioError>,
    fail_pos: u64,
    cmds: Vec<Cmd>,
    done: bool,
    result: Result<usize, DioError>,
}

struct State {
    slots: Box<[Slot]>,
    free: Box<[u32]>,
    nfree: usize,
    deferred: Box<[u32]>,
    d_head: usize,
    d_len: usize,
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
    fn alloc_slot(&mut self) -> Option<usize> {
        if self.nfree == 0 {
            return None;
        }
        self.nfree -= 1;
        Some(self.free[self.nfree] as usize)
    }

    fn free_slot(&mut self, idx: usize) {
        self.slots[idx].state = SlotState::Free;
        self.free[self.nfree] = idx as u32;
        self.nfree += 1;
    }

    /// Runs one completion: inline for success, deferred for errors.
    #[inline]
    fn complete(&mut self, tag: u64, res: Result<(), BlkError>) {
        if tag & TAG_GENERIC != 0 {
            self.complete_generic(tag, res);
            return;
        }
        let idx = tag as usize;
        let Some(slot) = self.slots.get_mut(idx) else {
            self.stats.spurious += 1;
            return;
        };
        if slot.state != SlotState::InFlight {
            self.stats.spurious += 1;
            return;
        }
        match res {
            Ok(()) => {
                let n = slot.size as usize;
                self.stats.completed += 1;
                match slot.cb {
                    Some(cb) => {
                        self.free_slot(idx);
                        cb.call(Ok(n));
                    }
                    None => {
                        slot.state = SlotState::Done;
                        slot.result = Ok(n);
                    }
                }
            }
            Err(e) => {
                slot.state = SlotState::Failed;
                slot.err = e;
                // At most one entry per slot: the ring cannot overflow.
                let at = (self.d_head + self.d_len) % self.deferred.len();
                self.deferred[at] = idx as u32;
                self.d_len += 1;
            }
        }
    }

    fn complete_generic(&mut self, tag: u64, res: Result<(), BlkError>) {
        let ptr = (tag & PTR_MASK) as *mut GenericDio;
        let idx = ((tag >> PTR_BITS) & 0x7fff) as usize;
        // SAFETY: generic tags carry the address of a live dio object from
        // Box::into_raw; it stays alive while commands are outstanding.
        let dio = unsafe { &mut *ptr };
        let Some(cmd) = dio.cmds.get(idx) else {
            self.stats.spurious += 1;
            return;
        };
        let (cpos, clen, dest, bounce) = (cmd.pos, cmd.len, cmd.dest, cmd.bounce);
        match res {
            Ok(()) => {
                if let Some((b, _)) = bounce {
                    if dio.op == Op::Read {
                        // SAFETY: the bounce buffer holds at least `clen`
                        // bytes the device wrote; `dest` is the caller's
                        // buffer for this command, valid until completion.
                        unsafe {
                            core::ptr::copy_nonoverlapping(b as *const u8, dest as *mut u8, clen)
                        };
                    }
                }
            }
            Err(e) => {
                let err = DioError::Io { pos: cpos, err: e };
                dio.first_error.get_or_insert(err);
                dio.fail_pos = dio.fail_pos.min(cpos);
            }
        }
        if let Some((b, size)) = bounce {
            // SAFETY: allocated in `generic` with this layout; the device is
            // done with it.
            unsafe { alloc::alloc::dealloc(b as *mut u8, bounce_layout(size)) };
            dio.cmds[idx].bounce = None;
        }
        if dio.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.finish_generic(ptr);
        }
    }

    /// The last reference is gone: compute the result and complete.
    fn finish_generic(&mut self, ptr: *mut GenericDio) {
        // SAFETY: as in complete_generic; we hold the last reference.
        let dio = unsafe { &mut *ptr };
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
        if let Err(e) = &result {
            self.stats.errors += 1;
            // As in `run_deferred`: the owner of an asynchronous request
            // reports it.
            let level = if dio.cb.is_some() {
                log::Level::Debug
            } else {
                log::Level::Error
            };
            log::log!(target: "iomap", level, "direct I/O at {} ({} bytes) failed: {e}", dio.pos, dio.size);
        } else {
            self.stats.completed += 1;
        }
        dio.result = result;
        dio.done = true;
        if let Some(d) = dio.dops {
            d.end_io(dio.pos, dio.size, &result);
        }
        if let Some(cb) = dio.cb {
            // SAFETY: pointer from Box::into_raw, last reference: reclaimed
            // once, here.
            drop(unsafe { Box::from_raw(ptr) });
            cb.call(result);
        }
    }
}

impl<Q: BlockQueue> Engine<Q> {
    /// An engine with one simple-path slot per command the queue can hold.
    pub fn new(queue: Q) -> Self {
        let n = queue.depth().max(1);
        let slots = alloc::vec![EMPTY_SLOT; n].into_boxed_slice();
        let free: Vec<u32> = (0..n as u32).rev().collect();
        Engine {
            queue,
            st: State {
                slots,
                free: free.into_boxed_slice(),
                nfree: n,
                deferred: alloc::vec![0; n].into_boxed_slice(),
                d_head: 0,
                d_len: 0,
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
        self.st.nfree
    }

    /// Reaps device completions and runs them (inline). What the poll loop
    /// and the MSI-X handler call.
    #[inline]
    pub fn poll(&mut self) -> usize {
        let st = &mut self.st;
        self.queue.poll(|tag, res| st.complete(tag, res))
    }

    /// Reports commands past their deadline as failed.
    pub fn expire(&mut self) {
        let st = &mut self.st;
        self.queue.expire(|tag, res| st.complete(tag, res));
    }

    /// The deferred work queue: reports each failed simple/raw request once,
    /// counts it, and completes it with the error. Run from the run loop
    /// (process context), never from the interrupt handler.
    pub fn run_deferred(&mut self) -> usize {
        let mut n = 0;
        while self.st.d_len > 0 {
            let idx = self.st.deferred[self.st.d_head] as usize;
            self.st.d_head = (self.st.d_head + 1) % self.st.deferred.len();
            self.st.d_len -= 1;
            n += 1;
            let slot = self.st.slots[idx];
            let err = DioError::Io {
                pos: slot.pos,
                err: slot.err,
            };
            self.st.stats.errors += 1;
            // An asynchronous request's owner reports its failure, with its
            // own context (once); a waiter's is reported here.
            let level = if slot.cb.is_some() {
                log::Level::Debug
            } else {
                log::Level::Error
            };
            log::log!(
                target: "iomap",
                level,
                "{} read at {} ({} bytes) failed: {}",
                if slot.raw { "raw" } else { "direct" },
                slot.pos,
                slot.size,
                slot.err
            );
            match slot.cb {
                Some(cb) => {
                    self.st.free_slot(idx);
                    cb.call(Err(err));
                }
                None => {
                    self.st.slots[idx].state = SlotState::Done;
                    self.st.slots[idx].result = Err(err);
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
            self.run_deferred();
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(1024) {
                self.expire();
            }
            self.queue.relax();
        }
    }

    fn wait_slot(&mut self, idx: usize) -> Result<usize, DioError> {
        self.wait_until(|e| e.st.slots[idx].state == SlotState::Done);
        let r = self.st.slots[idx].result;
        self.st.free_slot(idx);
        r
    }

    /// A free slot, polling for one when all are busy (unless `nowait`).
    fn get_slot(&mut self, nowait: bool) -> Result<usize, DioError> {
        loop {
            if let Some(i) = self.st.alloc_slot() {
                return Ok(i);
            }
            if nowait {
                return Err(DioError::Again);
            }
            self.wait_until(|e| e.st.nfree > 0);
        }
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
            // SAFETY: forwarded.
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
    /// kiocbs), or `Queued` when the kiocb's callback will be called from the
    /// completion path. `done_before` is added to the result (bytes the caller
    /// already transferred).
    ///
    /// # Safety
    /// `buf` stays valid, and is not accessed by the CPU, until the request
    /// completes.
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
            // SAFETY: forwarded.
            match unsafe { self.simple(iocb, buf, ops, flags) } {
                Ok(r) => return Ok(r),
                Err(Simple::Err(e)) => return Err(e),
                Err(Simple::NotSimple) => self.st.stats.fell_back += 1,
            }
        }
        // SAFETY: forwarded.
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
        // Only what the completion reads; `err`/`result` are written when
        // the request fails or completes.
        let slot = &mut self.st.slots[idx];
        slot.state = SlotState::InFlight;
        slot.raw = false;
        slot.cb = iocb.complete;
        slot.pos = pos;
        slot.size = count as u32;
        ops.iomap_end(pos, count, count, bflags, &map);
        let lba = dev >> self.queue.lba_shift();
        // SAFETY: the caller keeps `buf` valid until completion.
        if let Err(e) = unsafe { self.submit(Op::Read, lba, buf, idx as u64, nowait) } {
            self.st.free_slot(idx);
            return Err(Simple::Err(if e == BlkError::QueueFull {
                DioError::Again
            } else {
                DioError::Io { pos, err: e }
            }));
        }
        self.st.stats.simple += 1;
        if iocb.complete.is_none() {
            return self
                .wait_slot(idx)
                .map(DioResult::Done)
                .map_err(Simple::Err);
        }
        Ok(DioResult::Queued)
    }

    /// A command on the raw namespace (no filesystem): `lba` and `buf` in the
    /// device's logical blocks. With a callback it completes like the simple
    /// path; without, it waits.
    ///
    /// # Safety
    /// As [`Engine::dio_rw`].
    pub unsafe fn raw(
        &mut self,
        op: Op,
        lba: u64,
        buf: IoBuf,
        cb: Option<Callback>,
    ) -> Result<DioResult, DioError> {
        let shift = self.queue.lba_shift();
        let flush = op == Op::Flush;
        if (!flush && buf.len() == 0)
            || buf.len() & ((1 << shift) - 1) != 0
            || !buf.addr().is_multiple_of(4)
            || buf.len() > self.queue.max_transfer()
        {
            return Err(DioError::Invalid(
                "raw transfer not whole blocks, misaligned or too large",
            ));
        }
        let idx = self.get_slot(false)?;
        let slot = &mut self.st.slots[idx];
        slot.state = SlotState::InFlight;
        slot.raw = true;
        slot.cb = cb;
        slot.pos = lba << shift;
        slot.size = buf.len() as u32;
        // SAFETY: forwarded.
        if let Err(e) = unsafe { self.submit(op, lba, buf, idx as u64, false) } {
            self.st.free_slot(idx);
            return Err(DioError::Io {
                pos: lba << shift,
                err: e,
            });
        }
        self.st.stats.raw += 1;
        if cb.is_none() {
            return self.wait_slot(idx).map(DioResult::Done);
        }
        Ok(DioResult::Queued)
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
        let wait = iocb.complete.is_none() || flags & dio_flags::FORCE_WAIT != 0;
        let dio = Box::new(GenericDio {
            remaining: AtomicU32::new(1),
            op,
            pos,
            size: count as usize,
            done_before,
            partial: flags & dio_flags::PARTIAL != 0,
            cb: if wait { None } else { iocb.complete },
            dops,
            first_error: None,
            fail_pos: u64::MAX,
            cmds: Vec::new(),
            done: false,
            result: Ok(0),
        });
        let ptr = Box::into_raw(dio);
        if ptr as u64 & !PTR_MASK != 0 {
            // SAFETY: just made by Box::into_raw, nothing else holds it.
            drop(unsafe { Box::from_raw(ptr) });
            return Err(DioError::Unsupported("dio object above 2^48"));
        }
        let end = pos + count;
        let mut cur = pos;
        let record = |ptr: *mut GenericDio, at: u64, e: DioError| {
            // SAFETY: we hold the submission reference.
            let dio = unsafe { &mut *ptr };
            dio.first_error.get_or_insert(e);
            dio.fail_pos = dio.fail_pos.min(at);
        };
        'map: while cur < end {
            let map = match ops.iomap_begin(cur, end - cur, bflags) {
                Ok(m) => m,
                Err(e) => {
                    record(
                        ptr,
                        cur,
                        if e == IomapError::Again {
                            DioError::Again
                        } else {
                            DioError::Fs(e)
                        },
                    );
                    break;
                }
            };
            if map.offset > cur || map.offset.saturating_add(map.length) <= cur {
                record(ptr, cur, DioError::Fs(IomapError::Corrupt));
                ops.iomap_end(cur, end - cur, 0, bflags, &map);
                break;
            }
            let piece = (map.offset.saturating_add(map.length) - cur).min(end - cur);
            let boff = (cur - pos) as usize;
            match (op, map.kind) {
                (Op::Read, IomapType::Hole | IomapType::Unwritten) => {
                    // SAFETY: [boff, boff + piece) lies in the caller's buffer.
                    unsafe {
                        core::ptr::write_bytes((buf.addr() + boff) as *mut u8, 0, piece as usize)
                    };
                }
                (Op::Read, IomapType::Inline) => {
                    let src = map.addr + (cur - map.offset);
                    // SAFETY: the filesystem guarantees inline data at `addr`
                    // for the mapping's length; the destination is ours.
                    unsafe {
                        core::ptr::copy_nonoverlapping(
                            src as *const u8,
                            (buf.addr() + boff) as *mut u8,
                            piece as usize,
                        )
                    };
                }
                (_, IomapType::Hole | IomapType::Unwritten | IomapType::Inline) => {
                    record(
                        ptr,
                        cur,
                        DioError::Unsupported("write needing allocation or conversion"),
                    );
                    ops.iomap_end(cur, piece, 0, bflags, &map);
                    break;
                }
                (_, IomapType::Mapped) => {
                    let dev = map.addr + (cur - map.offset);
                    if dev & (lbs - 1) != 0 {
                        record(ptr, cur, DioError::Fs(IomapError::Corrupt));
                        ops.iomap_end(cur, piece, 0, bflags, &map);
                        break;
                    }
                    let mut done = 0u64;
                    while done < piece {
                        let clen = (piece - done).min(max) as usize;
                        let at = cur + done;
                        let dest = buf.addr() + boff + done as usize;
                        // A tail shorter than a block (end of file) or BOUNCE
                        // goes through a bounce buffer of whole blocks.
                        let dev_len = (clen as u64).div_ceil(lbs) as usize * lbs as usize;
                        let bounce = if flags & dio_flags::BOUNCE != 0 || dev_len != clen {
                            let l = bounce_layout(dev_len);
                            // SAFETY: non-zero size.
                            let b = unsafe { alloc::alloc::alloc_zeroed(l) };
                            if b.is_null() {
                                record(
                                    ptr,
                                    at,
                                    DioError::Unsupported("out of memory for a bounce buffer"),
                                );
                                ops.iomap_end(cur, piece, done, bflags, &map);
                                break 'map;
                            }
                            if op == Op::Write {
                                // SAFETY: source is the caller's buffer, the
                                // bounce buffer holds dev_len >= clen bytes.
                                unsafe {
                                    core::ptr::copy_nonoverlapping(dest as *const u8, b, clen)
                                };
                            }
                            Some((b as usize, dev_len))
                        } else {
                            None
                        };
                        let iob = match bounce {
                            Some((b, l)) => IoBuf::from_addr(b, l),
                            None => IoBuf::from_addr(dest, clen),
                        };
                        // Both addresses lie in live allocations: never 0.
                        let Some(iob) = iob else {
                            record(ptr, at, DioError::Invalid("null buffer"));
                            ops.iomap_end(cur, piece, done, bflags, &map);
                            break 'map;
                        };
                        if let Some(d) = dops {
                            d.submit_io(at, clen);
                        }
                        // SAFETY: we hold the submission reference.
                        let d = unsafe { &mut *ptr };
                        let idx = d.cmds.len();
                        d.cmds.push(Cmd {
                            pos: at,
                            len: clen,
                            dest,
                            bounce,
                        });
                        d.remaining.fetch_add(1, Ordering::AcqRel);
                        let tag = TAG_GENERIC | ((idx as u64) << PTR_BITS) | ptr as u64;
                        // SAFETY: the caller's buffer (or our bounce buffer)
                        // stays valid until the completion.
                        if let Err(e) = unsafe {
                            self.submit(
                                op,
                                (dev + done) >> self.queue.lba_shift(),
                                iob,
                                tag,
                                nowait,
                            )
                        } {
                            // SAFETY: we hold the submission reference.
                            let d = unsafe { &mut *ptr };
                            d.remaining.fetch_sub(1, Ordering::AcqRel);
                            if let Some((b, l)) = d.cmds[idx].bounce.take() {
                                // SAFETY: allocated above, never submitted.
                                unsafe { alloc::alloc::dealloc(b as *mut u8, bounce_layout(l)) };
                            }
                            record(
                                ptr,
                                at,
                                if e == BlkError::QueueFull {
                                    DioError::Again
                                } else {
                                    DioError::Io { pos: at, err: e }
                                },
                            );
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
        // SAFETY: we hold it.
        let last = unsafe { (*ptr).remaining.fetch_sub(1, Ordering::AcqRel) } == 1;
        if last {
            // Nothing in flight (holes only, or failed before any command):
            // complete here, even for an asynchronous caller.
            // SAFETY: we hold the only reference.
            unsafe { (*ptr).cb = None };
            self.st.finish_generic(ptr);
        } else if !wait {
            return Ok(DioResult::Queued);
        } else {
            // SAFETY: the dio stays alive until we reclaim it below.
            self.wait_until(|_| unsafe { (*ptr).done });
        }
        // SAFETY: done, no commands outstanding, not reclaimed by a callback
        // (cb is None for waiters): reclaim it once, here.
        let dio = unsafe { Box::from_raw(ptr) };
        dio.result.map(DioResult::Done)
    }
}
