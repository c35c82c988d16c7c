//! An NVMe I/O queue pair as a [`BlockQueue`].

use crate::queue::{BlkError, BlockQueue, IoBuf, Op};
use dioxide_nvme::{DataBuf, Hal, Mmio, NvmeError, QueuePair, SubmissionEntry};

pub struct NvmeQueue<H: Hal, M: Mmio> {
    pub qp: QueuePair<H, M>,
    hal: H,
    nsid: u32,
    lba_shift: u32,
    blocks: u64,
}

impl<H: Hal, M: Mmio> NvmeQueue<H, M> {
    pub fn new(qp: QueuePair<H, M>, hal: H, ns: dioxide_nvme::Namespace) -> Self {
        NvmeQueue {
            qp,
            hal,
            nsid: ns.nsid,
            lba_shift: ns.block_size.trailing_zeros(),
            blocks: ns.blocks,
        }
    }
}

fn blk_err(e: NvmeError) -> BlkError {
    match e {
        NvmeError::Command { status, .. } => BlkError::Status {
            sct: status.sct(),
            sc: status.sc(),
        },
        NvmeError::Timeout { .. } => BlkError::Timeout,
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
            // SAFETY: no data buffer.
            return unsafe { self.qp.submit(SubmissionEntry::flush(self.nsid), None, tag) }
                .map(|_| ())
                .map_err(blk_err);
        }
        let blocks = (buf.len >> self.lba_shift) as u32;
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
        // SAFETY: forwarded to our caller (buffer valid until completion).
        unsafe {
            self.qp.submit(
                cmd,
                Some(DataBuf {
                    addr: buf.addr,
                    len: buf.len,
                }),
                tag,
            )
        }
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
        while let Some(c) = self.qp.expire(now) {
            on_done(c.tag, Err(BlkError::Timeout));
        }
    }
    fn now_ns(&self) -> u64 {
        self.hal.now_ns()
    }
    fn relax(&self) {
        self.hal.relax()
    }
}
