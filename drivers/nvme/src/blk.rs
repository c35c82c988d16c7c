//! An NVMe I/O queue pair as the block layer's [`BlockQueue`].
//!
//! It lives in the driver (not in the DIO layer above it) so that the
//! dependency points one way: the DIO layer knows only `dioxide-blk`, and
//! host tools that build it (mkfs, fsck) never build this driver. The one
//! conversion from driver errors to block errors is here too
//! (`From<NvmeError> for BlkError`), carrying the status name so that the
//! block error prints without the driver's tables.
//!
//! With its controller ([`NvmeQueue::with_controller`], an
//! `Arc<SharedController>` that the queues of every core share) the queue
//! recovers from commands past their deadline by itself, from
//! [`BlockQueue::expire`]: it sends an NVMe Abort for each; if a command is
//! still not answered after the abort grace period (or an admin command
//! timed out), it resets the controller (CC.EN=0, CSTS.RDY=0 within CAP.TO,
//! its own waiting commands failed once, its queue re-created) and carries
//! on. A timed-out command's owner hears of it only then, so its buffer is
//! never reused while the device may still write into it. The queues of
//! other cores notice the reset on their next `poll` or `expire` and rejoin
//! (their commands failed once, their queues re-created): the protocol is
//! in [`crate::shared`]. Without a controller (host benchmarks, tests of
//! the DIO layer) overdue commands simply stay in flight.

use crate::shared::{catch_up_locked, SharedController};
use crate::{Expiry, Hal, Mmio, Namespace, NvmeError, QueuePair, SubmissionEntry, Watched};
use alloc::sync::Arc;
use dioxide_blk::{BlkError, BlockQueue, IoBuf, Op};

pub struct NvmeQueue<H: Hal, M: Mmio> {
    pub qp: QueuePair<H, M>,
    /// The controller, shared with the other cores' queues, for aborts and
    /// resets (see the module docs).
    pub ctrl: Option<Arc<SharedController<H, M>>>,
    hal: H,
    nsid: u32,
    lba_shift: u32,
    blocks: u64,
}

impl<H: Hal, M: Mmio> NvmeQueue<H, M> {
    pub fn new(qp: QueuePair<H, M>, hal: H, ns: Namespace) -> Self {
        NvmeQueue {
            qp,
            ctrl: None,
            hal,
            nsid: ns.nsid,
            lba_shift: ns.block_size.trailing_zeros(),
            blocks: ns.blocks,
        }
    }

    /// The queue recovers from timeouts through `ctrl`, which every queue
    /// pair created on that controller shares (module docs).
    pub fn with_controller(mut self, ctrl: Arc<SharedController<H, M>>) -> Self {
        self.ctrl = Some(ctrl);
        self
    }

    /// The shared controller, if any.
    pub fn controller(&self) -> Option<&Arc<SharedController<H, M>>> {
        self.ctrl.as_ref()
    }

    /// The namespace id this queue reads and writes.
    pub fn nsid(&self) -> u32 {
        self.nsid
    }
}

/// Kicks `qp` when it makes no progress, and tells the controller when a
/// kick recovered a lost doorbell; follows the controller's verdict on its
/// event indexes ([`QueuePair::watch`]).
fn watch_progress<H: Hal, M: Mmio>(
    shared: &SharedController<H, M>,
    qp: &mut QueuePair<H, M>,
    now: u64,
) {
    if let Some(Watched::Recovered(_)) = watch(qp, now) {
        let mut ctrl = shared.lock();
        if ctrl.doorbell_lost() {
            log::warn!(
                target: "nvme",
                "queue {}: the controller lost a shadow doorbell update: shadow doorbells off for the rest of its life (every doorbell through MMIO; nvme.dbbuf=keep keeps them)",
                qp.qid()
            );
        } else if ctrl.keeps_dbbuf() {
            log::warn!(target: "nvme", "queue {}: shadow doorbells kept (nvme.dbbuf=keep)", qp.qid());
        }
    }
    if shared.event_idx_distrusted() && !qp.event_idx_distrusted() {
        qp.distrust_event_idx();
    }
}

/// An event index for a log line, `?` without shadow doorbells (no
/// allocation: the kick runs on the read path).
struct EventIdx(Option<u16>);

impl core::fmt::Display for EventIdx {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self.0 {
            Some(e) => write!(f, "{e}"),
            None => f.write_str("?"),
        }
    }
}

/// [`QueuePair::watch`], logged.
fn watch<H: Hal, M: Mmio>(qp: &mut QueuePair<H, M>, now: u64) -> Option<Watched> {
    let w = qp.watch(now)?;
    match w {
        Watched::Kicked(k) => log::warn!(
            target: "nvme",
            "queue {}: {} command(s) in flight, none completed for {} us: doorbells written again through MMIO (SQ tail {}, controller consumed to {}, CQ head {})",
            k.qid,
            k.in_flight,
            k.stalled_ns / 1_000,
            k.sq_tail,
            EventIdx(k.sq_event_idx),
            k.cq_head
        ),
        Watched::Recovered(k) => log::warn!(
            target: "nvme",
            "queue {}: recovered a lost doorbell: the controller had consumed to {} of tail {} and completed commands again after the kick",
            k.qid,
            k.sq_event_idx.unwrap_or(0),
            k.sq_tail
        ),
    }
    Some(w)
}

/// Fails `qp`'s commands and re-creates it if the controller was reset by
/// another queue, or marks it down if the controller is halted
/// (`blocking`: wait for the lock, else give up if it is taken).
#[cold]
fn catch_up<H: Hal, M: Mmio, F: FnMut(u64, Result<(), BlkError>)>(
    shared: &SharedController<H, M>,
    qp: &mut QueuePair<H, M>,
    blocking: bool,
    on_done: &mut F,
) {
    let _ = shared.catch_up(qp, blocking, |c| {
        on_done(c.tag, c.result.map(|_| ()).map_err(blk_err))
    });
}

/// Resets the controller for `qp` (unless another queue did meanwhile: then
/// `qp` rejoins, and the controller is reset only if it still needs it),
/// failing `qp`'s waiting commands through `on_done` once the device no
/// longer touches memory.
#[cold]
fn reset<H: Hal, M: Mmio, F: FnMut(u64, Result<(), BlkError>)>(
    shared: &SharedController<H, M>,
    qp: &mut QueuePair<H, M>,
    on_done: &mut F,
) {
    let mut deliver = |c: crate::Completion| on_done(c.tag, c.result.map(|_| ()).map_err(blk_err));
    let mut ctrl = shared.lock();
    if qp.epoch() != ctrl.epoch() {
        // Another queue reset the controller: that stopped the device, which
        // fails our overdue commands too.
        let _ = catch_up_locked(&mut ctrl, qp, &mut deliver);
        if !ctrl.needs_reset() {
            return;
        }
    }
    log::error!(target: "nvme", "controller not answering: resetting it");
    let mut failed = 0usize;
    let r = ctrl.reset(&mut [&mut *qp], |c| {
        failed += 1;
        deliver(c)
    });
    match r {
        Ok(()) => log::warn!(
            target: "nvme",
            "controller reset: {failed} command(s) failed, I/O queue {} re-created, serving again",
            qp.qid()
        ),
        Err(e) => log::error!(
            target: "nvme",
            "controller reset failed: {e}; the namespace is unavailable"
        ),
    }
}

impl From<NvmeError> for BlkError {
    fn from(e: NvmeError) -> BlkError {
        blk_err(e)
    }
}

fn blk_err(e: NvmeError) -> BlkError {
    match e {
        NvmeError::Command { status, .. } => BlkError::Status {
            sct: status.sct(),
            sc: status.sc(),
            name: status.name(),
        },
        NvmeError::Timeout { .. } => BlkError::Timeout,
        NvmeError::Aborted { .. } => BlkError::Aborted,
        NvmeError::Cancelled { .. } => BlkError::Cancelled,
        NvmeError::ResetRequired { .. } | NvmeError::ControllerDown { .. } => BlkError::Unavailable,
        NvmeError::QueueFull => BlkError::QueueFull,
        _ => BlkError::Invalid,
    }
}

impl<H: Hal, M: Mmio> BlockQueue for NvmeQueue<H, M> {
    fn lba_shift(&self) -> u32 {
        self.lba_shift
    }
    fn max_transfer(&self) -> usize {
        self.qp.max_transfer()
    }
    fn depth(&self) -> usize {
        self.qp.depth()
    }
    fn in_flight(&self) -> usize {
        self.qp.in_flight()
    }
    fn capacity(&self) -> u64 {
        self.blocks
    }
    #[inline]
    unsafe fn submit(&mut self, op: Op, lba: u64, buf: IoBuf, tag: u64) -> Result<(), BlkError> {
        if op == Op::Flush {
            // SAFETY: a flush has no data buffer, so nothing must outlive
            // the call.
            return unsafe { self.qp.submit(SubmissionEntry::flush(self.nsid), None, tag) }
                .map(|_| ())
                .map_err(blk_err);
        }
        let blocks = (buf.len() >> self.lba_shift) as u32;
        if blocks == 0
            || lba
                .checked_add(blocks as u64)
                .is_none_or(|e| e > self.blocks)
        {
            return Err(BlkError::Invalid);
        }
        let cmd = match op {
            Op::Read => SubmissionEntry::read(self.nsid, lba, blocks),
            Op::Write => SubmissionEntry::write(self.nsid, lba, blocks),
            Op::WriteFua => SubmissionEntry::write(self.nsid, lba, blocks).with_fua(),
            Op::Flush => SubmissionEntry::flush(self.nsid),
        };
        // SAFETY: our caller guarantees (this function's contract) that `buf`
        // stays valid and untouched by the CPU until the completion, which
        // is exactly `QueuePair::submit`'s requirement.
        unsafe { self.qp.submit(cmd, Some(buf), tag) }
            .map(|_| ())
            .map_err(blk_err)
    }
    #[inline]
    fn poll<F: FnMut(u64, Result<(), BlkError>)>(&mut self, mut on_done: F) -> usize {
        let n = self
            .qp
            .process_completions(|c| on_done(c.tag, c.result.map(|_| ()).map_err(blk_err)));
        // One atomic load: did another queue reset the controller?
        if let Some(shared) = self.ctrl.as_deref() {
            if shared.epoch() != self.qp.epoch() {
                catch_up(shared, &mut self.qp, false, &mut on_done);
            }
        }
        n
    }
    fn expire<F: FnMut(u64, Result<(), BlkError>)>(&mut self, mut on_done: F) {
        let Some(shared) = self.ctrl.as_deref() else {
            // No controller to abort or reset with: overdue commands stay
            // in flight (the queue wedges once one passes its grace period).
            let now = self.hal.now_ns();
            if let Some(Watched::Recovered(_)) = watch(&mut self.qp, now) {
                self.qp.distrust_event_idx();
            }
            while self.qp.expire(now).is_some() {}
            return;
        };
        watch_progress(shared, &mut self.qp, self.hal.now_ns());
        if shared.epoch() != self.qp.epoch() || (shared.is_halted() && !self.qp.is_down()) {
            catch_up(shared, &mut self.qp, true, &mut on_done);
        }
        let now = self.hal.now_ns();
        let mut reset_needed = false;
        while let Some(x) = self.qp.expire(now) {
            match x {
                Expiry::Abort { qid, cid, opcode } => match shared.lock().abort(qid, cid) {
                    Ok(true) => {
                        log::warn!(target: "nvme", "queue {qid}: cid {cid} (opcode {opcode:#04x}) timed out: aborted")
                    }
                    Ok(false) => {
                        log::warn!(target: "nvme", "queue {qid}: cid {cid} (opcode {opcode:#04x}) timed out: abort declined, waiting for the grace period")
                    }
                    Err(e) => {
                        log::error!(target: "nvme", "queue {qid}: abort of cid {cid} failed: {e}");
                        reset_needed = true;
                    }
                },
                Expiry::ResetNeeded { .. } => reset_needed = true,
            }
        }
        let wedged = self.qp.needs_reset() && !self.qp.is_down();
        if reset_needed || wedged || shared.needs_reset() {
            reset(shared, &mut self.qp, &mut on_done);
        }
    }
    fn now_ns(&self) -> u64 {
        self.hal.now_ns()
    }
    fn relax(&self) {
        self.hal.relax()
    }
}
