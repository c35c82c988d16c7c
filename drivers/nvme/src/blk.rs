//! An NVMe I/O queue pair as the block layer's [`BlockQueue`].
//!
//! It lives in the driver (not in the DIO layer above it) so that the
//! dependency points one way: the DIO layer knows only `dioxide-blk`, and
//! host tools that build it (mkfs, fsck) never build this driver. The one
//! conversion from driver errors to block errors is here too
//! (`From<NvmeError> for BlkError`), carrying the status name so that the
//! block error prints without the driver's tables.
//!
//! With its controller ([`NvmeQueue::with_controller`]) the queue recovers
//! from commands past their deadline by itself, from [`BlockQueue::expire`]:
//! it sends an NVMe Abort for each; if a command is still not answered
//! after the abort grace period (or an admin command timed out), it resets
//! the controller (CC.EN=0, CSTS.RDY=0 within CAP.TO, every waiting command
//! failed once, queues re-created) and carries on. A timed-out command's
//! owner hears of it only then, so its buffer is never reused while the
//! device may still write into it. Without a controller (host benchmarks,
//! tests of the DIO layer) overdue commands simply stay in flight.

use crate::{Controller, Expiry, Hal, Mmio, Namespace, NvmeError, QueuePair, SubmissionEntry};
use dioxide_blk::{BlkError, BlockQueue, IoBuf, Op};

pub struct NvmeQueue<H: Hal, M: Mmio> {
    pub qp: QueuePair<H, M>,
    /// The controller, for aborts and resets (see the module docs).
    pub ctrl: Option<Controller<H, M>>,
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
}

impl<H: Hal, M: Mmio> NvmeQueue<H, M> {
    /// The queue recovers from timeouts through `ctrl` (module docs).
    pub fn with_controller(mut self, ctrl: Controller<H, M>) -> Self {
        self.ctrl = Some(ctrl);
        self
    }

    /// Resets the controller, failing every waiting command through
    /// `on_done` once the device no longer touches memory.
    fn reset<F: FnMut(u64, Result<(), BlkError>)>(&mut self, on_done: &mut F) {
        let Some(ctrl) = self.ctrl.as_mut() else {
            return;
        };
        log::error!(target: "nvme", "controller not answering: resetting it");
        let mut failed = 0usize;
        let r = ctrl.reset(&mut [&mut self.qp], |c| {
            failed += 1;
            on_done(c.tag, c.result.map(|_| ()).map_err(blk_err))
        });
        match r {
            Ok(()) => log::warn!(
                target: "nvme",
                "controller reset: {failed} command(s) failed, I/O queue {} re-created, serving again",
                self.qp.qid()
            ),
            Err(e) => log::error!(
                target: "nvme",
                "controller reset failed: {e}; the namespace is unavailable"
            ),
        }
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
        self.qp
            .process_completions(|c| on_done(c.tag, c.result.map(|_| ()).map_err(blk_err)))
    }
    fn expire<F: FnMut(u64, Result<(), BlkError>)>(&mut self, mut on_done: F) {
        let now = self.hal.now_ns();
        let mut reset = false;
        while let Some(x) = self.qp.expire(now) {
            match x {
                Expiry::Abort { qid, cid, opcode } => {
                    let Some(ctrl) = self.ctrl.as_mut() else {
                        continue;
                    };
                    match ctrl.abort(qid, cid) {
                        Ok(true) => {
                            log::warn!(target: "nvme", "queue {qid}: cid {cid} (opcode {opcode:#04x}) timed out: aborted")
                        }
                        Ok(false) => {
                            log::warn!(target: "nvme", "queue {qid}: cid {cid} (opcode {opcode:#04x}) timed out: abort declined, waiting for the grace period")
                        }
                        Err(e) => {
                            log::error!(target: "nvme", "queue {qid}: abort of cid {cid} failed: {e}");
                            reset = true;
                        }
                    }
                }
                Expiry::ResetNeeded { .. } => reset = true,
            }
        }
        let wedged = self.qp.needs_reset() && !self.qp.is_down();
        let admin = self.ctrl.as_ref().is_some_and(|c| c.needs_reset());
        if reset || wedged || admin {
            self.reset(&mut on_done);
        }
    }
    fn now_ns(&self) -> u64 {
        self.hal.now_ns()
    }
    fn relax(&self) {
        self.hal.relax()
    }
}
