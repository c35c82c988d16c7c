//! A software model of an NVMe controller, for tests and host benchmarks.
//!
//! [`Sim`] implements [`Mmio`]: register writes take effect at once, and a
//! submission queue doorbell makes the model fetch the new entries from host
//! memory, execute them against an in-memory namespace (moving data through the
//! PRPs it is given), and post completion entries with the phase bit; a vector
//! is "raised" (counted) for interrupt-enabled completion queues. [`SimHal`]
//! hands out host memory as DMA memory at device addresses offset by
//! [`PHYS_OFFSET`], so a driver that passes a CPU address to the device is
//! caught (the model answers Data Transfer Error).
//!
//! Faults can be injected: a controller that never becomes ready, one that
//! reports fatal status, commands that fail with a given status or never
//! complete, completions held back and released in any order, bogus
//! completions, a controller that ignores Abort (answers "not aborted", as
//! QEMU 7.2 does), one that stops answering altogether until it is reset, and
//! one that cannot be stopped (CSTS.RDY stays 1 after CC.EN = 0). The model is
//! checked against the specification independently of the driver (its PRP
//! walk is its own).
//!
//! Buffer ownership is checkable: a command that was fetched and has not
//! completed is *stalled* and keeps its PRPs; [`Sim::may_access`] says whether
//! such a command could still move data into (or out of) a host range, and
//! [`Sim::finish_stalled`] really does so. Disabling the controller (CC.EN
//! 1 → 0) forgets the stalled commands, as a real controller reset does.

use crate::cmd::{admin, io, CompletionEntry, Status, SubmissionEntry};
use crate::hal::{Dma, Hal, Mmio, PAGE_SIZE};
use crate::regs;
use std::collections::VecDeque;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

/// Device addresses are CPU addresses plus this offset: above every user-space
/// address of x86_64 Linux (47 bits), so that a CPU address is never mistaken
/// for a device address.
pub const PHYS_OFFSET: u64 = 0x8000_0000_0000;

const MAX_QUEUES: usize = 65;

/// Host memory and a virtual clock.
#[derive(Clone, Default)]
pub struct SimHal {
    clock: Arc<AtomicU64>,
    live: Arc<AtomicUsize>,
}

impl SimHal {
    pub fn new() -> Self {
        Self::default()
    }
    /// Virtual time in nanoseconds.
    pub fn now(&self) -> u64 {
        self.clock.load(Ordering::Relaxed)
    }
    pub fn advance(&self, ns: u64) {
        self.clock.fetch_add(ns, Ordering::Relaxed);
    }
    /// DMA regions allocated and not freed.
    pub fn live_regions(&self) -> usize {
        self.live.load(Ordering::Relaxed)
    }
}

// SAFETY: regions come from the global allocator, zeroed, page aligned, and are
// contiguous in the (offset) device address space; the clock only moves forward.
unsafe impl Hal for SimHal {
    fn dma_alloc(&self, len: usize) -> Option<Dma> {
        let len = len.div_ceil(PAGE_SIZE).max(1) * PAGE_SIZE;
        let layout = std::alloc::Layout::from_size_align(len, PAGE_SIZE).ok()?;
        // SAFETY: layout has non-zero size.
        let virt = NonNull::new(unsafe { std::alloc::alloc_zeroed(layout) })?;
        self.live.fetch_add(1, Ordering::Relaxed);
        Some(Dma {
            phys: virt.as_ptr() as u64 + PHYS_OFFSET,
            virt,
            len,
        })
    }

    unsafe fn dma_free(&self, dma: &Dma) {
        let layout = std::alloc::Layout::from_size_align(dma.len, PAGE_SIZE).unwrap();
        self.live.fetch_sub(1, Ordering::Relaxed);
        // SAFETY: the caller passes a region from dma_alloc with the same layout.
        unsafe { std::alloc::dealloc(dma.virt.as_ptr(), layout) };
    }

    fn virt_to_phys(&self, virt: usize) -> u64 {
        virt as u64 + PHYS_OFFSET
    }

    fn now_ns(&self) -> u64 {
        // Every look at the clock costs a little virtual time, so that loops
        // which only read the clock still reach their deadline.
        self.clock.fetch_add(100, Ordering::Relaxed) + 100
    }

    fn relax(&self) {
        self.clock.fetch_add(1_000, Ordering::Relaxed);
    }
}

/// What an injected fault does to a matching command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultAction {
    /// Complete with this status.
    Fail(Status),
    /// Fetch the command and hold it (stalled): it completes only when
    /// aborted or run by [`Sim::finish_stalled`]; a controller reset forgets
    /// it.
    Drop,
}

/// A command the device fetched and has not completed: it may still access
/// the host memory its PRPs name.
#[derive(Clone, Copy, Debug)]
struct Stalled {
    sqid: u16,
    cqid: u16,
    cmd: SubmissionEntry,
}

/// An I/O queue pair as the device knows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SimQueueInfo {
    pub sq_base: u64,
    pub cq_base: u64,
    pub sq_entries: u16,
    pub cq_entries: u16,
    /// MSI-X vector of the completion queue, when interrupts are enabled.
    pub vector: Option<u16>,
}

/// A fault for commands with `opcode` on I/O queues (`admin == false`) or the
/// admin queue, optionally only those touching logical block `lba`.
#[derive(Clone, Copy, Debug)]
pub struct Fault {
    pub admin: bool,
    pub opcode: u8,
    pub lba: Option<u64>,
    pub action: FaultAction,
    /// How many commands it hits; `u32::MAX` for all.
    pub count: u32,
}

#[derive(Clone, Copy, Debug)]
struct SimSq {
    base: u64,
    entries: u16,
    head: u16,
    tail: u16,
    cqid: u16,
}

#[derive(Clone, Copy, Debug)]
struct SimCq {
    base: u64,
    entries: u16,
    head: u16,
    tail: u16,
    phase: bool,
    vector: Option<u16>,
}

impl SimCq {
    fn full(&self) -> bool {
        (self.tail + 1) % self.entries == self.head
    }
}

/// Model configuration.
#[derive(Clone, Debug)]
pub struct SimConfig {
    pub block_size: u32,
    pub blocks: u64,
    /// MDTS in units of 4 KiB pages, log2 (QEMU: 7 = 512 KiB); 0 = no limit.
    pub mdts: u8,
    /// Maximum queue entries (CAP.MQES + 1).
    pub max_queue_entries: u32,
    /// Report this namespace size instead of the real one (0: an empty
    /// namespace).
    pub reported_blocks: Option<u64>,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            block_size: 512,
            blocks: 2048,
            mdts: 7,
            max_queue_entries: 1024,
            reported_blocks: None,
        }
    }
}

struct State {
    cfg: SimConfig,
    disk: Vec<u8>,
    cap: u64,
    cc: u32,
    csts: u32,
    aqa: u32,
    asq: u64,
    acq: u64,
    sqs: [Option<SimSq>; MAX_QUEUES],
    cqs: [Option<SimCq>; MAX_QUEUES],
    never_ready: bool,
    fatal_on_enable: bool,
    /// CSTS.RDY stays 1 after CC.EN = 0 and nothing stops.
    never_disable: bool,
    /// Every command fetched stalls, until the controller is enabled again.
    hung: bool,
    /// Abort answers "not aborted" and leaves the command alone.
    ignore_aborts: bool,
    stalled: Vec<Stalled>,
    /// CC.EN 1 -> 0 transitions that took effect.
    disables: u64,
    faults: Vec<Fault>,
    hold: bool,
    held: Vec<(u16, CompletionEntry)>,
    overflow: VecDeque<(u16, CompletionEntry)>,
    interrupts: [u64; 2048],
    commands: u64,
}

/// The simulated controller; clones share one device.
#[derive(Clone)]
pub struct Sim(Arc<Mutex<State>>);

impl Sim {
    pub fn new(cfg: SimConfig) -> Self {
        let disk = vec![0u8; (cfg.blocks * cfg.block_size as u64) as usize];
        let mqes = (cfg.max_queue_entries - 1) as u64 & 0xffff;
        // CQR, TO = 2 (1 s), DSTRD 0, CSS = NVM, MPSMIN 0, MPSMAX 4.
        let cap = mqes | (1 << 16) | (2 << 24) | (1 << 37) | (4 << 52);
        Sim(Arc::new(Mutex::new(State {
            cfg,
            disk,
            cap,
            cc: 0,
            csts: 0,
            aqa: 0,
            asq: 0,
            acq: 0,
            sqs: [None; MAX_QUEUES],
            cqs: [None; MAX_QUEUES],
            never_ready: false,
            fatal_on_enable: false,
            never_disable: false,
            hung: false,
            ignore_aborts: false,
            stalled: Vec::new(),
            disables: 0,
            faults: Vec::new(),
            hold: false,
            held: Vec::new(),
            overflow: VecDeque::new(),
            interrupts: [0; 2048],
            commands: 0,
        })))
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The namespace contents.
    pub fn disk(&self) -> Vec<u8> {
        self.state().disk.clone()
    }
    pub fn write_disk(&self, offset: usize, data: &[u8]) {
        self.state().disk[offset..offset + data.len()].copy_from_slice(data);
    }
    pub fn set_never_ready(&self, v: bool) {
        self.state().never_ready = v;
    }
    pub fn set_fatal_on_enable(&self, v: bool) {
        self.state().fatal_on_enable = v;
    }
    /// CSTS.RDY stays 1 after CC.EN is cleared: the controller cannot be
    /// stopped and keeps its stalled commands.
    pub fn set_never_disable(&self, v: bool) {
        self.state().never_disable = v;
    }
    /// Stop answering: every command fetched from now on (admin too) stalls,
    /// until CC.EN goes 0 -> 1 and the controller is ready again.
    pub fn set_hung(&self, v: bool) {
        self.state().hung = v;
    }
    /// Answer Abort with "not aborted" (DW0 bit 0 = 1) and leave the command
    /// alone, as QEMU 7.2 does.
    pub fn set_ignore_aborts(&self, v: bool) {
        self.state().ignore_aborts = v;
    }
    /// Commands fetched and not completed.
    pub fn stalled(&self) -> usize {
        self.state().stalled.len()
    }
    /// Whether a stalled command may still read or write any byte of the host
    /// range `[addr, addr + len)` (CPU addresses): its buffer belongs to the
    /// device.
    pub fn may_access(&self, addr: usize, len: usize) -> bool {
        let s = self.state();
        let (start, end) = (addr as u64 + PHYS_OFFSET, (addr + len) as u64 + PHYS_OFFSET);
        s.stalled.iter().any(|st| {
            let mut hit = false;
            let _ = walk_prps(&st.cmd, s.transfer_len(st), |phys, n| {
                hit |= phys < end && phys + n as u64 > start;
                Ok(())
            });
            hit
        })
    }
    /// Runs every stalled command now (moving its data) and posts its
    /// completion, as a slow device finally would.
    pub fn finish_stalled(&self) {
        let mut s = self.state();
        let stalled = std::mem::take(&mut s.stalled);
        for st in stalled {
            let (status, dw0) = if st.sqid == 0 {
                s.admin(&st.cmd)
            } else {
                s.io(&st.cmd)
            };
            s.complete(st.sqid, st.cqid, st.cmd.cid(), status, dw0);
        }
    }
    /// Times CC.EN went from 1 to 0 (controller resets).
    pub fn disables(&self) -> u64 {
        self.state().disables
    }
    /// I/O queue pair `qid` as the device knows it.
    pub fn io_queue(&self, qid: u16) -> Option<SimQueueInfo> {
        let s = self.state();
        let sq = s.sqs.get(qid as usize).copied().flatten()?;
        let cq = s.cqs.get(qid as usize).copied().flatten()?;
        Some(SimQueueInfo {
            sq_base: sq.base,
            cq_base: cq.base,
            sq_entries: sq.entries,
            cq_entries: cq.entries,
            vector: cq.vector,
        })
    }
    pub fn inject(&self, fault: Fault) {
        self.state().faults.push(fault);
    }
    /// Hold completions back instead of posting them.
    pub fn set_hold(&self, v: bool) {
        self.state().hold = v;
    }
    /// Posts the held completions in the order given by `order` (indices into
    /// the held list), then any others in arrival order.
    pub fn release(&self, order: &[usize]) {
        let mut s = self.state();
        let held = std::mem::take(&mut s.held);
        let mut posted = vec![false; held.len()];
        for &i in order {
            if i < held.len() && !posted[i] {
                posted[i] = true;
                let (cq, e) = held[i];
                s.post(cq, e);
            }
        }
        for (i, &(cq, e)) in held.iter().enumerate() {
            if !posted[i] {
                s.post(cq, e);
            }
        }
    }
    pub fn held(&self) -> usize {
        self.state().held.len()
    }
    /// Posts a completion for a command id that was never submitted.
    pub fn post_bogus(&self, qid: u16, cid: u16) {
        let mut s = self.state();
        let e = CompletionEntry {
            sq_id: qid,
            cid,
            ..Default::default()
        };
        s.post(qid, e);
    }
    /// Interrupts raised on MSI-X vector `v`.
    pub fn interrupts(&self, v: u16) -> u64 {
        self.state().interrupts[v as usize]
    }
    /// Commands executed so far.
    pub fn commands(&self) -> u64 {
        self.state().commands
    }
    /// Whether I/O queue `qid` exists on the device.
    pub fn has_io_queue(&self, qid: u16) -> bool {
        let s = self.state();
        s.sqs[qid as usize].is_some() && s.cqs[qid as usize].is_some()
    }
}

impl Mmio for Sim {
    fn read32(&self, offset: usize) -> u32 {
        let s = self.state();
        match offset {
            regs::CAP => s.cap as u32,
            o if o == regs::CAP + 4 => (s.cap >> 32) as u32,
            regs::VS => 0x0001_0400,
            regs::CC => s.cc,
            regs::CSTS => s.csts,
            regs::AQA => s.aqa,
            _ => 0,
        }
    }

    fn write32(&self, offset: usize, value: u32) {
        let mut s = self.state();
        match offset {
            regs::CC => s.write_cc(value),
            regs::AQA => s.aqa = value,
            regs::ASQ => s.asq = (s.asq & !0xffff_ffff) | value as u64,
            o if o == regs::ASQ + 4 => s.asq = (s.asq & 0xffff_ffff) | (value as u64) << 32,
            regs::ACQ => s.acq = (s.acq & !0xffff_ffff) | value as u64,
            o if o == regs::ACQ + 4 => s.acq = (s.acq & 0xffff_ffff) | (value as u64) << 32,
            o if o >= regs::DOORBELL_BASE => {
                let index = (o - regs::DOORBELL_BASE) / 4;
                let qid = index / 2;
                if s.csts & regs::CSTS_RDY == 0 || qid >= MAX_QUEUES {
                    return;
                }
                if index.is_multiple_of(2) {
                    s.sq_doorbell(qid as u16, value as u16);
                } else {
                    s.cq_doorbell(qid as u16, value as u16);
                }
            }
            _ => {}
        }
    }
}

/// Converts a device address to a host pointer, rejecting CPU addresses.
fn host_ptr(phys: u64) -> Option<*mut u8> {
    if phys < PHYS_OFFSET {
        None
    } else {
        Some((phys - PHYS_OFFSET) as usize as *mut u8)
    }
}

const DATA_TRANSFER_ERROR: (u8, u8) = (0, 0x04);
const PRP_OFFSET_INVALID: (u8, u8) = (0, 0x13);
const INVALID_FIELD: (u8, u8) = (0, 0x02);

fn status((sct, sc): (u8, u8)) -> Status {
    Status::new(sct, sc)
}

impl State {
    fn write_cc(&mut self, value: u32) {
        let was = self.cc & regs::CC_EN != 0;
        let now = value & regs::CC_EN != 0;
        self.cc = value;
        if value & regs::CC_SHN_NORMAL != 0 {
            self.csts = (self.csts & !regs::CSTS_SHST_MASK) | regs::CSTS_SHST_DONE;
        }
        if was && !now {
            if self.never_disable {
                return;
            }
            // A controller reset: queues and every command in them are gone.
            self.sqs = [None; MAX_QUEUES];
            self.cqs = [None; MAX_QUEUES];
            self.held.clear();
            self.overflow.clear();
            self.stalled.clear();
            self.csts = 0;
            self.disables += 1;
        } else if !was && now {
            if self.fatal_on_enable {
                self.csts = regs::CSTS_CFS;
                return;
            }
            if self.never_ready {
                return;
            }
            let asqs = (self.aqa & 0xfff) as u16 + 1;
            let acqs = ((self.aqa >> 16) & 0xfff) as u16 + 1;
            self.sqs[0] = Some(SimSq {
                base: self.asq,
                entries: asqs,
                head: 0,
                tail: 0,
                cqid: 0,
            });
            self.cqs[0] = Some(SimCq {
                base: self.acq,
                entries: acqs,
                head: 0,
                tail: 0,
                phase: true,
                vector: None,
            });
            self.hung = false;
            self.csts = regs::CSTS_RDY;
        }
    }

    fn sq_doorbell(&mut self, qid: u16, tail: u16) {
        let Some(mut sq) = self.sqs[qid as usize] else {
            return;
        };
        if tail >= sq.entries {
            return; // invalid doorbell write: ignored (a real device posts an async event)
        }
        sq.tail = tail;
        while sq.head != sq.tail {
            let Some(ptr) = host_ptr(sq.base + sq.head as u64 * 64) else {
                break;
            };
            // SAFETY: the driver gave this queue's base from SimHal memory that
            // it keeps alive while the queue exists; head < entries.
            let cmd: SubmissionEntry = unsafe { std::ptr::read_volatile(ptr as *const _) };
            sq.head = (sq.head + 1) % sq.entries;
            self.sqs[qid as usize] = Some(sq);
            self.commands += 1;
            match self.execute(qid, &cmd) {
                Some((st, dw0)) => {
                    let e = CompletionEntry {
                        dw0,
                        dw1: 0,
                        sq_head: sq.head,
                        sq_id: qid,
                        cid: cmd.cid(),
                        status: st.0 << 1,
                    };
                    if self.hold {
                        self.held.push((sq.cqid, e));
                    } else {
                        self.post(sq.cqid, e);
                    }
                }
                None => self.stalled.push(Stalled {
                    sqid: qid,
                    cqid: sq.cqid,
                    cmd,
                }),
            }
            // Queues may have been created or deleted by the command.
            match self.sqs[qid as usize] {
                Some(s) => sq = Self::merged(s, sq),
                None => return,
            }
        }
        self.sqs[qid as usize] = Some(sq);
    }

    fn merged(current: SimSq, ours: SimSq) -> SimSq {
        SimSq {
            head: ours.head,
            tail: ours.tail,
            ..current
        }
    }

    fn cq_doorbell(&mut self, qid: u16, head: u16) {
        let Some(cq) = self.cqs[qid as usize].as_mut() else {
            return;
        };
        if head >= cq.entries {
            return;
        }
        cq.head = head;
        while let Some(&(q, e)) = self.overflow.front() {
            let full = self.cqs[q as usize].is_some_and(|c| c.full());
            if full {
                break;
            }
            self.overflow.pop_front();
            self.post(q, e);
        }
    }

    /// Completes command `cid` of `sqid` now (held back when holding).
    fn complete(&mut self, sqid: u16, cqid: u16, cid: u16, st: Status, dw0: u32) {
        let sq_head = self.sqs[sqid as usize].map_or(0, |sq| sq.head);
        let e = CompletionEntry {
            dw0,
            dw1: 0,
            sq_head,
            sq_id: sqid,
            cid,
            status: st.0 << 1,
        };
        if self.hold {
            self.held.push((cqid, e));
        } else {
            self.post(cqid, e);
        }
    }

    /// Bytes a stalled command moves (0 for commands without data).
    fn transfer_len(&self, st: &Stalled) -> usize {
        let cmd = &st.cmd;
        match (st.sqid, cmd.opcode()) {
            (0, admin::IDENTIFY) => PAGE_SIZE,
            (0, _) => 0,
            (_, io::READ | io::WRITE) => {
                ((cmd.cdw12 & 0xffff) as usize + 1) * self.cfg.block_size as usize
            }
            _ => 0,
        }
    }

    fn post(&mut self, cqid: u16, mut e: CompletionEntry) {
        let Some(cq) = self.cqs[cqid as usize].as_mut() else {
            return;
        };
        if cq.full() {
            self.overflow.push_back((cqid, e));
            return;
        }
        e.status = (e.status & !1) | cq.phase as u16;
        if let Some(p) = host_ptr(cq.base + cq.tail as u64 * 16) {
            // SAFETY: the CQ base is SimHal memory the driver keeps alive;
            // tail < entries.
            unsafe { std::ptr::write_volatile(p as *mut CompletionEntry, e) };
        }
        cq.tail += 1;
        if cq.tail == cq.entries {
            cq.tail = 0;
            cq.phase = !cq.phase;
        }
        if let Some(v) = cq.vector {
            self.interrupts[v as usize % 2048] += 1;
        }
    }

    fn fault_for(&mut self, admin_queue: bool, cmd: &SubmissionEntry) -> Option<FaultAction> {
        let (lba, blocks) = (
            cmd.cdw10 as u64 | (cmd.cdw11 as u64) << 32,
            (cmd.cdw12 & 0xffff) as u64 + 1,
        );
        let f = self.faults.iter_mut().find(|f| {
            f.count > 0
                && f.admin == admin_queue
                && f.opcode == cmd.opcode()
                && f.lba.is_none_or(|l| l >= lba && l < lba + blocks)
        })?;
        if f.count != u32::MAX {
            f.count -= 1;
        }
        Some(f.action)
    }

    fn reported_blocks(&self) -> u64 {
        self.cfg.reported_blocks.unwrap_or(self.cfg.blocks)
    }

    /// Executes one command: `None` when it is never to complete.
    fn execute(&mut self, qid: u16, cmd: &SubmissionEntry) -> Option<(Status, u32)> {
        if self.hung {
            return None;
        }
        match self.fault_for(qid == 0, cmd) {
            Some(FaultAction::Drop) => return None,
            Some(FaultAction::Fail(st)) => return Some((st, 0)),
            None => {}
        }
        Some(if qid == 0 {
            self.admin(cmd)
        } else {
            self.io(cmd)
        })
    }

    fn admin(&mut self, cmd: &SubmissionEntry) -> (Status, u32) {
        match cmd.opcode() {
            admin::IDENTIFY => {
                let mut d = [0u8; 4096];
                match cmd.cdw10 & 0xff {
                    0x01 => {
                        d[0..2].copy_from_slice(&0xd10du16.to_le_bytes());
                        d[4..24].copy_from_slice(b"SIM0001             ");
                        d[24..64].copy_from_slice(b"dioxide simulated NVMe                  ");
                        d[64..72].copy_from_slice(b"1.0     ");
                        d[77] = self.cfg.mdts;
                        d[512] = 0x66;
                        d[513] = 0x44;
                        d[516..520].copy_from_slice(&1u32.to_le_bytes());
                    }
                    0x00 => {
                        if cmd.nsid == 0 || cmd.nsid == u32::MAX {
                            return (Status::new(0, 0x0b), 0);
                        }
                        if cmd.nsid == 1 {
                            d[0..8].copy_from_slice(&self.reported_blocks().to_le_bytes());
                            d[8..16].copy_from_slice(&self.reported_blocks().to_le_bytes());
                            let lbads = self.cfg.block_size.trailing_zeros();
                            d[128..132].copy_from_slice(&(lbads << 16).to_le_bytes());
                        }
                    }
                    0x02 => d[0..4].copy_from_slice(&1u32.to_le_bytes()),
                    _ => return (status(INVALID_FIELD), 0),
                }
                match self.copy(cmd, &mut d, true) {
                    Ok(()) => (Status::SUCCESS, 0),
                    Err(st) => (st, 0),
                }
            }
            admin::ABORT => {
                let (sqid, cid) = ((cmd.cdw10 & 0xffff) as u16, (cmd.cdw10 >> 16) as u16);
                let found = self
                    .stalled
                    .iter()
                    .position(|st| st.sqid == sqid && st.cmd.cid() == cid);
                match found {
                    Some(i) if !self.ignore_aborts => {
                        // The aborted command completes first, then the Abort.
                        let st = self.stalled.remove(i);
                        self.complete(st.sqid, st.cqid, cid, Status::new(0, 0x07), 0);
                        (Status::SUCCESS, 0)
                    }
                    _ => (Status::SUCCESS, 1),
                }
            }
            admin::SET_FEATURES if cmd.cdw10 & 0xff == 0x07 => {
                let nsq = (cmd.cdw11 & 0xffff).min(63);
                let ncq = (cmd.cdw11 >> 16).min(63);
                (Status::SUCCESS, (ncq << 16) | nsq)
            }
            admin::CREATE_IO_CQ => {
                let qid = (cmd.cdw10 & 0xffff) as usize;
                let entries = (cmd.cdw10 >> 16) + 1;
                if qid == 0 || qid >= MAX_QUEUES || self.cqs[qid].is_some() {
                    return (Status::new(1, 0x01).with_dnr(), 0);
                }
                if entries < 2 || entries > self.cfg.max_queue_entries {
                    return (Status::new(1, 0x02).with_dnr(), 0);
                }
                if cmd.cdw11 & 1 == 0 || !cmd.prp1.is_multiple_of(PAGE_SIZE as u64) {
                    return (status(INVALID_FIELD).with_dnr(), 0);
                }
                let vector = (cmd.cdw11 & 2 != 0).then_some((cmd.cdw11 >> 16) as u16);
                self.cqs[qid] = Some(SimCq {
                    base: cmd.prp1,
                    entries: entries as u16,
                    head: 0,
                    tail: 0,
                    phase: true,
                    vector,
                });
                (Status::SUCCESS, 0)
            }
            admin::CREATE_IO_SQ => {
                let qid = (cmd.cdw10 & 0xffff) as usize;
                let entries = (cmd.cdw10 >> 16) + 1;
                let cqid = (cmd.cdw11 >> 16) as usize;
                if qid == 0 || qid >= MAX_QUEUES || self.sqs[qid].is_some() {
                    return (Status::new(1, 0x01).with_dnr(), 0);
                }
                if cqid == 0 || cqid >= MAX_QUEUES || self.cqs[cqid].is_none() {
                    return (Status::new(1, 0x00).with_dnr(), 0);
                }
                if entries < 2 || entries > self.cfg.max_queue_entries {
                    return (Status::new(1, 0x02).with_dnr(), 0);
                }
                self.sqs[qid] = Some(SimSq {
                    base: cmd.prp1,
                    entries: entries as u16,
                    head: 0,
                    tail: 0,
                    cqid: cqid as u16,
                });
                (Status::SUCCESS, 0)
            }
            admin::DELETE_IO_SQ => {
                let qid = (cmd.cdw10 & 0xffff) as usize;
                if qid == 0 || qid >= MAX_QUEUES || self.sqs[qid].take().is_none() {
                    return (Status::new(1, 0x01).with_dnr(), 0);
                }
                (Status::SUCCESS, 0)
            }
            admin::DELETE_IO_CQ => {
                let qid = (cmd.cdw10 & 0xffff) as usize;
                if qid == 0 || qid >= MAX_QUEUES || self.cqs[qid].take().is_none() {
                    return (Status::new(1, 0x01).with_dnr(), 0);
                }
                (Status::SUCCESS, 0)
            }
            _ => (Status::new(0, 0x01).with_dnr(), 0),
        }
    }

    fn io(&mut self, cmd: &SubmissionEntry) -> (Status, u32) {
        if cmd.nsid != 1 {
            return (Status::new(0, 0x0b).with_dnr(), 0);
        }
        match cmd.opcode() {
            io::FLUSH => (Status::SUCCESS, 0),
            io::READ | io::WRITE => {
                let lba = cmd.cdw10 as u64 | (cmd.cdw11 as u64) << 32;
                let blocks = (cmd.cdw12 & 0xffff) as u64 + 1;
                if lba
                    .checked_add(blocks)
                    .is_none_or(|end| end > self.cfg.blocks)
                {
                    return (Status::new(0, 0x80).with_dnr(), 0);
                }
                let bs = self.cfg.block_size as u64;
                let len = (blocks * bs) as usize;
                if self.cfg.mdts != 0 && len > PAGE_SIZE << self.cfg.mdts {
                    return (status(INVALID_FIELD).with_dnr(), 0);
                }
                let start = (lba * bs) as usize;
                let mut data = std::mem::take(&mut self.disk);
                let r = self.copy(cmd, &mut data[start..start + len], cmd.opcode() == io::READ);
                self.disk = data;
                match r {
                    Ok(()) => (Status::SUCCESS, 0),
                    Err(st) => (st, 0),
                }
            }
            _ => (Status::new(0, 0x01).with_dnr(), 0),
        }
    }

    /// Moves `data.len()` bytes between `data` and the host memory the
    /// command's PRPs describe: to the host when `to_host`.
    fn copy(&self, cmd: &SubmissionEntry, data: &mut [u8], to_host: bool) -> Result<(), Status> {
        let mut done = 0usize;
        walk_prps(cmd, data.len(), |phys, len| {
            let p = host_ptr(phys).ok_or(status(DATA_TRANSFER_ERROR))?;
            // SAFETY: the driver guarantees (Hal/submit contracts) that PRPs name
            // live host memory of at least `len` bytes for this command.
            unsafe {
                if to_host {
                    std::ptr::copy_nonoverlapping(data[done..].as_ptr(), p, len);
                } else {
                    std::ptr::copy_nonoverlapping(p, data[done..].as_mut_ptr(), len);
                }
            }
            done += len;
            Ok(())
        })
    }
}

/// Calls `seg(device address, bytes)` for each piece of host memory that the
/// PRPs of `cmd` name for a transfer of `total` bytes, in order.
fn walk_prps(
    cmd: &SubmissionEntry,
    total: usize,
    mut seg: impl FnMut(u64, usize) -> Result<(), Status>,
) -> Result<(), Status> {
    if total == 0 {
        return Ok(());
    }
    let page = PAGE_SIZE as u64;
    if !cmd.prp1.is_multiple_of(4) {
        return Err(status(PRP_OFFSET_INVALID));
    }
    let first = total.min(PAGE_SIZE - (cmd.prp1 % page) as usize);
    seg(cmd.prp1, first)?;
    let mut rest = total - first;
    if rest == 0 {
        return Ok(());
    }
    if rest <= PAGE_SIZE {
        if !cmd.prp2.is_multiple_of(page) {
            return Err(status(PRP_OFFSET_INVALID));
        }
        return seg(cmd.prp2, rest);
    }
    // PRP list: entries are page aligned; the last entry of a list page
    // points to the next list page when more than one entry remains.
    if !cmd.prp2.is_multiple_of(8) {
        return Err(status(PRP_OFFSET_INVALID));
    }
    let mut list = cmd.prp2;
    loop {
        let lp = host_ptr(list).ok_or(status(DATA_TRANSFER_ERROR))? as *const u64;
        let index = ((list % page) / 8) as usize;
        let slots = PAGE_SIZE / 8 - index;
        for i in 0..slots {
            // SAFETY: list page memory supplied by the driver; i < entries
            // left in the page.
            let entry = unsafe { std::ptr::read_volatile(lp.add(i)) };
            if i == slots - 1 && rest > PAGE_SIZE {
                list = entry;
                break;
            }
            if entry % page != 0 {
                return Err(status(PRP_OFFSET_INVALID));
            }
            let n = rest.min(PAGE_SIZE);
            seg(entry, n)?;
            rest -= n;
            if rest == 0 {
                return Ok(());
            }
        }
    }
}
