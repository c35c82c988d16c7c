//! An I/O (or admin) queue pair: one submission queue, one completion queue,
//! and a fixed table of command slots.
//!
//! The command id of every command is the index of its slot. A slot carries what
//! the completion needs (the caller's `tag`, the deadline, the opcode) and its
//! own preallocated PRP list page, so submitting and completing a command
//! allocates nothing. Free slots are kept on a stack of ids.
//!
//! There are `entries - 1` slots for `entries` queue entries: the submission
//! queue can then never overflow (every unfetched entry belongs to an in-flight
//! slot) and neither can the completion queue.

use crate::cmd::{CompletionEntry, Status, SubmissionEntry};
use crate::error::NvmeError;
use crate::hal::{Dma, Hal, Mmio, PAGE_SIZE};
use alloc::boxed::Box;
use alloc::vec::Vec;
use core::ptr;
use core::sync::atomic::{fence, Ordering};

/// PRP entries in one list page; one page per slot bounds a transfer to
/// `(PRP_LIST_ENTRIES + 1)` pages less the first page's offset.
const PRP_LIST_ENTRIES: usize = PAGE_SIZE / 8;

/// Largest transfer a slot's single PRP list page can describe for any buffer
/// alignment: PRP1 covers the (partial) first page, the list 512 more pages.
pub const MAX_TRANSFER_PRP_LIST: usize = PRP_LIST_ENTRIES * PAGE_SIZE;

/// A data buffer for one command.
///
/// The buffer must stay valid and must not be touched by the CPU from
/// submission until the command completes (or the controller is disabled).
#[derive(Clone, Copy, Debug)]
pub struct DataBuf {
    pub addr: usize,
    pub len: usize,
}

impl DataBuf {
    pub fn from_slice(buf: &[u8]) -> Self {
        DataBuf {
            addr: buf.as_ptr() as usize,
            len: buf.len(),
        }
    }
    pub fn from_mut_slice(buf: &mut [u8]) -> Self {
        DataBuf {
            addr: buf.as_mut_ptr() as usize,
            len: buf.len(),
        }
    }
}

/// The outcome of one command, handed to the completion callback.
#[derive(Clone, Copy, Debug)]
pub struct Completion {
    pub cid: u16,
    /// The caller's tag given at submission.
    pub tag: u64,
    pub opcode: u8,
    /// `Ok(dw0)` or the error status.
    pub result: Result<u32, NvmeError>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SlotState {
    Free,
    InFlight,
    /// Timed out: the id stays reserved until the controller completes it or
    /// is reset, because the device may still access the buffer.
    Abandoned,
}

struct Slot {
    state: SlotState,
    opcode: u8,
    tag: u64,
    deadline: u64,
    prp_list: Dma,
}

/// Counters of one queue.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueStats {
    pub submitted: u64,
    pub completed: u64,
    pub errors: u64,
    pub timeouts: u64,
    /// Completions naming a command id that was not in flight.
    pub spurious: u64,
    /// Completions of commands that had timed out before.
    pub late: u64,
}

pub struct QueuePair<H: Hal, M: Mmio> {
    hal: H,
    mmio: M,
    qid: u16,
    entries: u16,
    sq: Dma,
    cq: Dma,
    sq_tail: u16,
    sq_head: u16,
    cq_head: u16,
    phase: bool,
    sq_doorbell: usize,
    cq_doorbell: usize,
    slots: Box<[Slot]>,
    free: Box<[u16]>,
    nfree: usize,
    timeout_ns: u64,
    max_transfer: usize,
    vector: Option<u16>,
    stats: QueueStats,
}

impl<H: Hal, M: Mmio> QueuePair<H, M> {
    /// Allocates the memory of a queue pair; the caller creates it on the
    /// controller (admin registers or Create I/O queue commands).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        hal: H,
        mmio: M,
        qid: u16,
        entries: u16,
        doorbell_stride: usize,
        timeout_ns: u64,
        max_transfer: usize,
        vector: Option<u16>,
    ) -> Result<Self, NvmeError> {
        if entries < 2 {
            return Err(NvmeError::BadQueue {
                qid,
                entries: entries as u32,
            });
        }
        let sq = hal
            .dma_alloc(entries as usize * core::mem::size_of::<SubmissionEntry>())
            .ok_or(NvmeError::NoMemory)?;
        let cq = hal
            .dma_alloc(entries as usize * core::mem::size_of::<CompletionEntry>())
            .ok_or(NvmeError::NoMemory)?;
        let nslots = entries as usize - 1;
        let mut slots = Vec::with_capacity(nslots);
        for _ in 0..nslots {
            let prp_list = hal.dma_alloc(PAGE_SIZE).ok_or(NvmeError::NoMemory)?;
            slots.push(Slot {
                state: SlotState::Free,
                opcode: 0,
                tag: 0,
                deadline: 0,
                prp_list,
            });
        }
        // Hand out low ids first (the stack pops from the end).
        let free: Vec<u16> = (0..nslots as u16).rev().collect();
        Ok(QueuePair {
            hal,
            mmio,
            qid,
            entries,
            sq,
            cq,
            sq_tail: 0,
            sq_head: 0,
            cq_head: 0,
            phase: true,
            sq_doorbell: crate::regs::sq_doorbell(qid, doorbell_stride),
            cq_doorbell: crate::regs::cq_doorbell(qid, doorbell_stride),
            slots: slots.into_boxed_slice(),
            free: free.into_boxed_slice(),
            nfree: nslots,
            timeout_ns,
            max_transfer: max_transfer.min(MAX_TRANSFER_PRP_LIST),
            vector,
            stats: QueueStats::default(),
        })
    }

    pub fn qid(&self) -> u16 {
        self.qid
    }
    pub fn entries(&self) -> u16 {
        self.entries
    }
    /// Commands that can be in flight at once.
    pub fn depth(&self) -> usize {
        self.slots.len()
    }
    pub fn in_flight(&self) -> usize {
        self.slots.len() - self.nfree
    }
    pub fn max_transfer(&self) -> usize {
        self.max_transfer
    }
    pub fn vector(&self) -> Option<u16> {
        self.vector
    }
    pub fn stats(&self) -> QueueStats {
        self.stats
    }
    pub fn sq_phys(&self) -> u64 {
        self.sq.phys
    }
    pub fn cq_phys(&self) -> u64 {
        self.cq.phys
    }
    /// The deadline given to each command, in nanoseconds after submission.
    pub fn set_timeout_ns(&mut self, ns: u64) {
        self.timeout_ns = ns;
    }
    /// Whether `cid` is in flight (submitted, not completed, not timed out).
    pub fn is_in_flight(&self, cid: u16) -> bool {
        matches!(self.slots.get(cid as usize), Some(s) if s.state == SlotState::InFlight)
    }

    /// Submits one command and rings the doorbell.
    ///
    /// `tag` comes back in the [`Completion`]. Returns the command id.
    ///
    /// # Safety
    ///
    /// When `data` is given, the memory it names must stay valid, and must not
    /// be accessed by the CPU (reads: not at all; writes: not written) until the
    /// command has completed, or has timed out and the controller was disabled.
    pub unsafe fn submit(
        &mut self,
        mut cmd: SubmissionEntry,
        data: Option<DataBuf>,
        tag: u64,
    ) -> Result<u16, NvmeError> {
        if self.nfree == 0 {
            return Err(NvmeError::QueueFull);
        }
        let cid = self.free[self.nfree - 1];
        // Without a data buffer the command's own PRP1 stands (queue creation
        // carries the queue's base address there).
        if let Some(buf) = data {
            self.build_prps(&mut cmd, buf, cid)?;
        }
        self.nfree -= 1;
        cmd.set_cid(cid);
        let deadline = self.hal.now_ns().saturating_add(self.timeout_ns);
        let slot = &mut self.slots[cid as usize];
        slot.state = SlotState::InFlight;
        slot.opcode = cmd.opcode();
        slot.tag = tag;
        slot.deadline = deadline;

        let sqe = self.sq.virt.as_ptr() as *mut SubmissionEntry;
        // SAFETY: sq_tail < entries and the SQ region holds `entries` entries;
        // the slot invariant (module docs) guarantees the entry is not one the
        // controller has yet to fetch.
        unsafe { ptr::write_volatile(sqe.add(self.sq_tail as usize), cmd) };
        self.sq_tail = (self.sq_tail + 1) % self.entries;
        // The entry (and the PRP list) must be visible to the device before the
        // doorbell write that tells it to fetch them.
        fence(Ordering::SeqCst);
        self.mmio.write32(self.sq_doorbell, self.sq_tail as u32);
        self.stats.submitted += 1;
        Ok(cid)
    }

    fn build_prps(
        &mut self,
        cmd: &mut SubmissionEntry,
        buf: DataBuf,
        cid: u16,
    ) -> Result<(), NvmeError> {
        if buf.len == 0 || buf.len > self.max_transfer || !buf.addr.is_multiple_of(4) {
            return Err(NvmeError::BadBuffer {
                len: buf.len,
                max: self.max_transfer,
            });
        }
        let offset = buf.addr % PAGE_SIZE;
        let first = buf.len.min(PAGE_SIZE - offset);
        cmd.prp1 = self.hal.virt_to_phys(buf.addr);
        let rest = buf.len - first;
        let next = buf.addr + first;
        cmd.prp2 = if rest == 0 {
            0
        } else if rest <= PAGE_SIZE {
            self.hal.virt_to_phys(next)
        } else {
            let pages = rest.div_ceil(PAGE_SIZE);
            // max_transfer <= MAX_TRANSFER_PRP_LIST keeps this within one page.
            debug_assert!(pages <= PRP_LIST_ENTRIES);
            let list = &self.slots[cid as usize].prp_list;
            let entries = list.virt.as_ptr() as *mut u64;
            for i in 0..pages.min(PRP_LIST_ENTRIES) {
                let phys = self.hal.virt_to_phys(next + i * PAGE_SIZE);
                // SAFETY: i < PRP_LIST_ENTRIES and the list is one page owned
                // by this free slot, which the device does not read now.
                unsafe { ptr::write_volatile(entries.add(i), phys) };
            }
            list.phys
        };
        Ok(())
    }

    /// Consumes every new completion entry, frees its slot and calls `on_done`
    /// for it, then moves the completion queue head once. Returns how many
    /// entries were consumed. This is what the poll loop and the MSI-X handler
    /// run.
    pub fn process_completions(&mut self, mut on_done: impl FnMut(Completion)) -> usize {
        let base = self.cq.virt.as_ptr() as *const CompletionEntry;
        let mut n = 0;
        loop {
            // SAFETY: cq_head < entries; the CQ region holds `entries` entries.
            let entry = unsafe { base.add(self.cq_head as usize) };
            // SAFETY: as above; the status word is read first, volatile,
            // because the device writes it.
            let status = unsafe { ptr::read_volatile(ptr::addr_of!((*entry).status)) };
            if (status & 1 != 0) != self.phase {
                break;
            }
            // The rest of the entry was written before the phase bit.
            fence(Ordering::Acquire);
            // SAFETY: as above.
            let cqe = unsafe { ptr::read_volatile(entry) };
            self.cq_head += 1;
            if self.cq_head == self.entries {
                self.cq_head = 0;
                self.phase = !self.phase;
            }
            self.sq_head = cqe.sq_head;
            n += 1;
            self.complete_one(cqe, &mut on_done);
        }
        if n > 0 {
            self.mmio.write32(self.cq_doorbell, self.cq_head as u32);
        }
        n
    }

    fn complete_one(&mut self, cqe: CompletionEntry, on_done: &mut impl FnMut(Completion)) {
        let cid = cqe.cid;
        let Some(slot) = self.slots.get_mut(cid as usize) else {
            self.stats.spurious += 1;
            log::warn!(target: "nvme", "queue {}: completion for unknown cid {}", self.qid, cid);
            return;
        };
        match slot.state {
            SlotState::InFlight => {}
            SlotState::Abandoned => {
                slot.state = SlotState::Free;
                self.free[self.nfree] = cid;
                self.nfree += 1;
                self.stats.late += 1;
                log::warn!(target: "nvme", "queue {}: late completion of timed-out cid {}", self.qid, cid);
                return;
            }
            SlotState::Free => {
                self.stats.spurious += 1;
                log::warn!(target: "nvme", "queue {}: completion for idle cid {}", self.qid, cid);
                return;
            }
        }
        slot.state = SlotState::Free;
        let (tag, opcode) = (slot.tag, slot.opcode);
        self.free[self.nfree] = cid;
        self.nfree += 1;
        self.stats.completed += 1;
        let status: Status = cqe.status();
        let result = if status.is_success() {
            Ok(cqe.dw0)
        } else {
            self.stats.errors += 1;
            Err(NvmeError::Command {
                qid: self.qid,
                opcode,
                status,
            })
        };
        on_done(Completion {
            cid,
            tag,
            opcode,
            result,
        });
    }

    /// Finds one in-flight command past its deadline at time `now`, marks it
    /// abandoned and reports it as a completion with a timeout error.
    pub fn expire(&mut self, now: u64) -> Option<Completion> {
        let qid = self.qid;
        let slot_index = self
            .slots
            .iter()
            .position(|s| s.state == SlotState::InFlight && s.deadline <= now)?;
        let slot = &mut self.slots[slot_index];
        slot.state = SlotState::Abandoned;
        self.stats.timeouts += 1;
        let cid = slot_index as u16;
        log::error!(target: "nvme", "queue {qid}: cid {cid} opcode {:#04x} timed out", slot.opcode);
        Some(Completion {
            cid,
            tag: slot.tag,
            opcode: slot.opcode,
            result: Err(NvmeError::Timeout {
                qid,
                cid,
                opcode: slot.opcode,
            }),
        })
    }

    /// The earliest deadline of the commands in flight.
    pub fn next_deadline(&self) -> Option<u64> {
        self.slots
            .iter()
            .filter(|s| s.state == SlotState::InFlight)
            .map(|s| s.deadline)
            .min()
    }

    /// Polls until command `cid` completes or passes its deadline. Completions
    /// of other commands found meanwhile go to `others`.
    pub fn wait(&mut self, cid: u16, mut others: impl FnMut(Completion)) -> Result<u32, NvmeError> {
        let deadline = match self.slots.get(cid as usize) {
            Some(s) if s.state == SlotState::InFlight => s.deadline,
            _ => {
                return Err(NvmeError::BadQueue {
                    qid: self.qid,
                    entries: cid as u32,
                })
            }
        };
        loop {
            let mut mine = None;
            self.process_completions(|c| {
                if c.cid == cid {
                    mine = Some(c.result);
                } else {
                    others(c)
                }
            });
            if let Some(result) = mine {
                return result;
            }
            if self.hal.now_ns() >= deadline {
                let slot = &mut self.slots[cid as usize];
                slot.state = SlotState::Abandoned;
                self.stats.timeouts += 1;
                log::error!(target: "nvme", "queue {}: cid {cid} opcode {:#04x} timed out", self.qid, slot.opcode);
                return Err(NvmeError::Timeout {
                    qid: self.qid,
                    cid,
                    opcode: slot.opcode,
                });
            }
            self.hal.relax();
        }
    }

    /// Submits one command and polls for its completion. Only for callers that
    /// own the queue with nothing else in flight (set-up, admin commands,
    /// self-tests): other completions are counted as spurious.
    ///
    /// # Safety
    ///
    /// As [`QueuePair::submit`].
    pub unsafe fn execute(
        &mut self,
        cmd: SubmissionEntry,
        data: Option<DataBuf>,
    ) -> Result<u32, NvmeError> {
        // SAFETY: forwarded to the caller.
        let cid = unsafe { self.submit(cmd, data, 0)? };
        let qid = self.qid;
        self.wait(
            cid,
            |c| log::warn!(target: "nvme", "queue {qid}: unexpected completion of cid {}", c.cid),
        )
    }

    /// Forgets every command and rewinds the rings, after the controller was
    /// reset or the queue deleted (the device no longer uses them).
    pub(crate) fn reset_rings(&mut self) {
        self.sq_tail = 0;
        self.sq_head = 0;
        self.cq_head = 0;
        self.phase = true;
        // SAFETY: the controller no longer accesses the rings (see caller).
        unsafe { ptr::write_bytes(self.cq.virt.as_ptr(), 0, self.cq.len) };
        self.nfree = 0;
        for i in (0..self.slots.len()).rev() {
            self.slots[i].state = SlotState::Free;
            self.free[self.nfree] = i as u16;
            self.nfree += 1;
        }
    }
}
