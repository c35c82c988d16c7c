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
//! Doorbell Buffer Config is modelled on QEMU 7.2, whose code 10.0 keeps
//! (`hw/nvme/ctrl.c`: `nvme_dbbuf_config`, `nvme_process_sq`, `nvme_post_cqes`,
//! `nvme_process_db`): OACS bit 8 is set; the command takes PRP1 (shadow
//! doorbells) and PRP2 (event indexes), page aligned, and writes the current
//! tail/head of every existing queue (the admin queue's too) into its shadow
//! slot; slot of queue `i` at `8 * i` (SQ) and `8 * i + 4` (CQ), CAP.DSTRD
//! being 0. From then on: an MMIO doorbell write of an SQ schedules its
//! processing, which takes the tail from the shadow slot, and after each
//! command writes the event index (= the tail consumed up to) and reads the
//! shadow tail again; before posting a completion the model writes the CQ event
//! index (= the head it knows) and reads the shadow head (7.2.x stable and
//! later; [`SimConfig::cq_eventidx`] off models 7.2.0, which never writes it).
//! MMIO writes of the admin queue's doorbells are copied into its shadow slots,
//! as QEMU does. A controller reset forgets the buffer. MMIO doorbell writes
//! are counted per queue ([`Sim::doorbell_writes`]). With
//! [`Sim::set_deferred`], an I/O SQ doorbell only schedules the queue (as
//! QEMU's bottom half does) and [`Sim::run_pending`] processes it later, so the
//! driver can submit several commands while the device is "busy".
//!
//! Lost shadow doorbell updates ([`SimConfig::stale_shadow_tail`]), as
//! they happen under QEMU's TCG with one virtual CPU (QEMU 7.2 and 10.0;
//! seen on AMD EPYC hosts): the driver stores the shadow tail, fences and
//! loads the event index; QEMU's device thread stores the event index,
//! fences (`smp_mb` in its DMA helpers) and loads the shadow tail. The
//! driver's fence (`lock or`, or `mfence` on 7.2) is translated without a
//! host barrier when TCG runs one vCPU (no `CF_PARALLEL`), so both loads can
//! be stale at once: the driver sees the old event index and skips the MMIO
//! write, the device sees the old tail and stops there, with head = event
//! index = the old tail. Nothing re-reads the tail after that: the commands
//! behind it wait until the next MMIO write of the SQ tail (whose trap
//! drains the store buffer), which a driver that trusts the event index
//! never makes. The model's shadow tail reads then return the tail of the
//! last MMIO write only; the driver's kick ([`crate::QueuePair::watch`])
//! recovers it.
//!
//! Namespaces: namespace 1 is the one with data; more can be described
//! ([`SimConfig::extra_namespaces`], Identify only: I/O to them fails with
//! Invalid Namespace), namespace 1 can be detached, Identify Controller's NN
//! and the VS register can be set, and the Active Namespace ID list (CNS 2)
//! can be refused as a controller older than NVMe 1.1 would.
//!
//! Buffer ownership is checkable: a command that was fetched and has not
//! completed is *stalled* and keeps its PRPs; [`Sim::may_access`] says whether
//! such a command could still move data into (or out of) a host range, and
//! [`Sim::finish_stalled`] really does so. Disabling the controller (CC.EN
//! 1 → 0) forgets the stalled commands, as a real controller reset does.
//!
//! # QEMU 7.2 and QEMU 10.0
//!
//! Read in `hw/nvme/ctrl.c` and `ns.c` of QEMU 7.2.22 (Debian's 7.2 with the
//! stable patches) and 10.0.2 (Debian's source packages), and seen in the
//! kernel's log booting both (`selftest=digest`, `log=debug`). What differs
//! for this driver, and is modelled ([`SimConfig::qemu`], [`Qemu`]):
//!
//! - CAP.CSS: 0xc1 on 7.2 (NVM, I/O command sets, "no I/O command set"),
//!   0x41 on 10.0 (CAP 0x004018200f0107ff and 0x004008200f0107ff). The
//!   driver needs bit 0 only.
//! - CC.IOSQES/IOCQES: 7.2's `nvme_start_ctrl` refuses sizes other than 64
//!   and 16 bytes at enable (CSTS.CFS); 10.0 enables and its
//!   `nvme_create_cq` refuses them (Invalid Queue Size, DNR). The driver
//!   sets both at every enable.
//! - Abort: both answer "not aborted" (DW0 bit 0 = 1). 7.2's `nvme_abort`
//!   does nothing else; 10.0's cancels an I/O command's request
//!   (`blk_aio_cancel_async`) after setting its status to Command Abort
//!   Requested. When the cancel takes, `nvme_rw_complete_cb` overwrites
//!   that with the I/O error (Unrecovered Read Error for a read, Write
//!   Fault for a write), which is what the model posts
//!   ([`Sim::set_ignore_aborts`]); when the I/O finishes anyway the command
//!   completes with its data moved and Command Abort Requested. Either way
//!   a command the controller said it did not abort completes with an
//!   error, which the driver hands to its owner (no reset). 10.0 also
//!   aborts an outstanding Asynchronous Event Request (DW0 0); the driver
//!   sends none.
//! - Doorbell Buffer Config: 10.0's `dbcs` property (default on) can turn
//!   it off: OACS bit 8 clear, the command Invalid Opcode, as
//!   [`SimConfig::dbbuf`] off answers.
//!
//! Checked and the same on both: the shadow doorbell protocol
//! (`nvme_dbbuf_config` writes every existing queue's tail/head into its
//! shadow slot; `nvme_process_sq` reads the shadow tail first, then after
//! each command writes the SQ event index and reads the tail again;
//! `nvme_post_cqes` writes the CQ event index, then reads the shadow head;
//! `nvme_process_db` copies MMIO doorbell writes of the admin queue into its
//! slots; 10.0 only uses `stl_le_pci_dma`/`ldl_le_pci_dma` where 7.2 had
//! `pci_dma_write`/`read` of a little-endian word), SQs and CQs processed
//! by bottom halves, `nvme_create_sq`, completion posting
//! (`nvme_post_cqes`, `nvme_enqueue_req_completion`; MSI-X or INTx), the
//! Identify Controller fields the driver reads (VID 1b36, MN "QEMU NVMe
//! Ctrl", FR the QEMU version "7.2.22" or "10.0.2", MDTS 7, VER and VS 1.4,
//! SQES 0x66, CQES 0x44, NN 256, VWC present; OACS bit 8; 10.0 adds OACS
//! Directives, ONCS copy bits, SGLS metadata-pointer SGLs, CMIC
//! multi-controller and endurance groups, none read), CAP.MQES 0x7ff (10.0:
//! the `mqes` property), 64 I/O queue pairs and 65 MSI-X vectors, the
//! namespace formats (8 LBA formats: 512 and 4096 bytes with 0, 8, 16 or 64
//! metadata bytes, FLBAS the one matching `logical_block_size` and `ms`, the
//! same DPS/PI fields), and Interrupt Coalescing (stored and reported, no
//! effect; not used by the driver). Atomic write limits (10.0: `awun`,
//! `awupf`, default 0) and FDP change nothing by default.

//!
//! # Volatile write cache and power cuts
//!
//! With [`SimConfig::volatile_cache`] the controller reports a volatile
//! write cache (Identify Controller VWC bit 0, as QEMU does) and behaves
//! like one: a completed Write is readable at once but reaches the media
//! only at a Flush (which commits every write completed before it) or with
//! its own FUA bit; a later write of a block replaces the cached one.
//! [`Sim::power_cut`] keeps any chosen subset of the cached blocks and loses
//! the rest (a device may have destaged any part of its cache, in any
//! order), and reads then see the media: the crash tests cut the power at
//! every point of a workload and check what survived. [`Sim::media`] and
//! [`Sim::cached_blocks`] show both sides.

use crate::cmd::{admin, io, CompletionEntry, Status, SubmissionEntry, FUA};
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

/// QEMU's default (7.2 and 10.0): `max_ioqpairs` 64, plus the admin queue.
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

/// A namespace besides namespace 1, for Identify.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SimNamespace {
    pub nsid: u32,
    pub block_size: u32,
    pub blocks: u64,
    /// Metadata bytes per logical block of its format (0: none).
    pub metadata: u16,
    /// Metadata at the end of each block (FLBAS bit 4).
    pub extended: bool,
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
    /// Doorbell Buffer Config supported (QEMU 7.2: yes; 10.0: unless
    /// `dbcs=off`).
    pub dbbuf: bool,
    /// The CQ event index is written before the shadow head is read (QEMU
    /// 7.2.x stable releases and later; 7.2.0 did not).
    pub cq_eventidx: bool,
    /// Namespace 1 is attached (active); when not, it is missing from the
    /// active list and identifies as zeroes.
    pub ns1_active: bool,
    /// More namespaces (Identify only).
    pub extra_namespaces: Vec<SimNamespace>,
    /// Identify Controller NN; `None`: 256, as QEMU (NVME_MAX_NAMESPACES).
    pub nn: Option<u32>,
    /// The VS register.
    pub version: u32,
    /// Identify CNS 2 (Active Namespace ID list) answered; when not, it
    /// fails with Invalid Field.
    pub active_list: bool,
    /// The controller's reads of an I/O queue's shadow SQ tail return the
    /// value as of the queue's last MMIO doorbell write, never a newer one
    /// (module docs, "Lost shadow doorbell updates").
    pub stale_shadow_tail: bool,
    /// Which QEMU the model plays where 7.2 and 10.0 differ (module docs,
    /// "QEMU 7.2 and QEMU 10.0").
    pub qemu: Qemu,
    /// A volatile write cache (Identify Controller VWC bit 0; module docs,
    /// "Volatile write cache and power cuts").
    pub volatile_cache: bool,
}

/// A QEMU version whose NVMe controller the model plays (module docs, "QEMU
/// 7.2 and QEMU 10.0").
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Qemu {
    /// 7.2: the I/O queue entry sizes in CC are checked when the controller
    /// is enabled (CSTS.CFS); CAP.CSS 0xc1; a declined Abort leaves the
    /// command alone.
    #[default]
    V7_2,
    /// 10.0: the entry sizes are checked by Create I/O Completion Queue
    /// (Invalid Queue Size); CAP.CSS 0x41; a declined Abort still cancels
    /// the command's I/O, which completes with that I/O's error.
    V10_0,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            block_size: 512,
            blocks: 2048,
            mdts: 7,
            max_queue_entries: 1024,
            reported_blocks: None,
            dbbuf: true,
            cq_eventidx: true,
            ns1_active: true,
            extra_namespaces: Vec::new(),
            nn: None,
            version: 0x0001_0400,
            active_list: true,
            stale_shadow_tail: false,
            qemu: Qemu::V7_2,
            volatile_cache: false,
        }
    }
}

struct State {
    cfg: SimConfig,
    /// What reads return: the media with the cached writes over it.
    disk: Vec<u8>,
    /// With a volatile cache: what survives a power cut, and the blocks
    /// written since their last Flush (block → the order of the write that
    /// put it there; its data is in `disk`).
    media: Vec<u8>,
    cached: std::collections::BTreeMap<u64, u64>,
    writes: u64,
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
    /// Shadow doorbell and event index pages (device addresses), when
    /// Doorbell Buffer Config was accepted since the last enable.
    dbbuf: Option<(u64, u64)>,
    dbbuf_configs: u64,
    /// I/O SQ doorbells only schedule their queue (QEMU's bottom half).
    deferred: bool,
    kicked: [bool; MAX_QUEUES],
    /// MMIO doorbell writes per queue: (SQ tail, CQ head).
    doorbells: [(u64, u64); MAX_QUEUES],
    /// Shadow values out of range, ignored.
    bad_shadow: u64,
    /// Per I/O SQ: the tail of its last MMIO doorbell write, all its shadow
    /// tail reads return with [`SimConfig::stale_shadow_tail`].
    mmio_tail: [u16; MAX_QUEUES],
}

/// The simulated controller; clones share one device.
#[derive(Clone)]
pub struct Sim(Arc<Mutex<State>>);

impl Sim {
    pub fn new(cfg: SimConfig) -> Self {
        let disk = vec![0u8; (cfg.blocks * cfg.block_size as u64) as usize];
        let mqes = (cfg.max_queue_entries - 1) as u64 & 0xffff;
        // CAP.CSS: the NVM command set (bit 0) and I/O command sets (bit 6)
        // on both; 7.2 also sets bit 7 ("no I/O command set", admin only).
        let css: u64 = match cfg.qemu {
            Qemu::V7_2 => 0xc1,
            Qemu::V10_0 => 0x41,
        };
        // CQR, TO = 2 (1 s), DSTRD 0, CSS, MPSMIN 0, MPSMAX 4.
        let cap = mqes | (1 << 16) | (2 << 24) | (css << 37) | (4 << 52);
        Sim(Arc::new(Mutex::new(State {
            cfg,
            media: disk.clone(),
            disk,
            cached: std::collections::BTreeMap::new(),
            writes: 0,
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
            dbbuf: None,
            dbbuf_configs: 0,
            deferred: false,
            kicked: [false; MAX_QUEUES],
            doorbells: [(0, 0); MAX_QUEUES],
            bad_shadow: 0,
            mmio_tail: [0; MAX_QUEUES],
        })))
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The namespace contents as reads see them (the volatile cache's
    /// blocks included).
    pub fn disk(&self) -> Vec<u8> {
        self.state().disk.clone()
    }
    /// Writes `data` at byte `offset`, on the media (not through the cache).
    pub fn write_disk(&self, offset: usize, data: &[u8]) {
        let mut st = self.state();
        st.disk[offset..offset + data.len()].copy_from_slice(data);
        st.media[offset..offset + data.len()].copy_from_slice(data);
    }
    /// What survives a power cut now: the media, without the cache.
    pub fn media(&self) -> Vec<u8> {
        self.state().media.clone()
    }
    /// The blocks in the volatile cache (written, not yet flushed), with
    /// the order of the write that put each there (1 for the first write
    /// since start).
    pub fn cached_blocks(&self) -> Vec<(u64, u64)> {
        self.state().cached.iter().map(|(&b, &o)| (b, o)).collect()
    }
    /// Cuts the power: of the cached blocks, those `keep(block, write
    /// order)` chooses reach the media (a device may have written any
    /// subset of its cache, in any order, before the power went), the rest
    /// are lost; reads then see the media. The controller's queues are
    /// left as they were: the caller starts a new controller (driver) on
    /// the same model, as after a reboot.
    pub fn power_cut(&self, keep: impl FnMut(u64, u64) -> bool) {
        let mut st = self.state();
        st.persist_cached(keep);
        st.disk = st.media.clone();
    }
    pub fn set_never_ready(&self, v: bool) {
        self.state().never_ready = v;
    }
    pub fn set_fatal_on_enable(&self, v: bool) {
        self.state().fatal_on_enable = v;
    }
    /// CSTS.RDY stays 1 after CC.EN is cleared: the controller cannot be
    /// stopped and keeps its stalled commands.
    /// Turning it off lets a CC.EN = 0 written meanwhile take effect.
    pub fn set_never_disable(&self, v: bool) {
        let mut s = self.state();
        s.never_disable = v;
        if !v && s.cc & regs::CC_EN == 0 && s.csts & regs::CSTS_RDY != 0 {
            s.stop();
        }
    }
    /// Stop answering: every command fetched from now on (admin too) stalls,
    /// until CC.EN goes 0 -> 1 and the controller is ready again.
    pub fn set_hung(&self, v: bool) {
        self.state().hung = v;
    }
    /// Answer Abort with "not aborted" (DW0 bit 0 = 1), as QEMU 7.2 and
    /// 10.0 do. [`Qemu::V7_2`] then leaves the command alone; [`Qemu::V10_0`]
    /// cancels a stalled I/O command, which completes at once with the
    /// cancelled I/O's error (Unrecovered Read Error for a read, Write Fault
    /// for a write).
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
    /// MMIO doorbell writes of queue `qid` so far: (SQ tail, CQ head).
    pub fn doorbell_writes(&self, qid: u16) -> (u64, u64) {
        self.state().doorbells[qid as usize]
    }
    /// Whether the controller uses a doorbell buffer now.
    pub fn dbbuf_enabled(&self) -> bool {
        self.state().dbbuf.is_some()
    }
    /// Doorbell Buffer Config commands accepted so far.
    pub fn dbbuf_configs(&self) -> u64 {
        self.state().dbbuf_configs
    }
    /// Shadow doorbell values outside their queue (ignored).
    pub fn bad_shadow_values(&self) -> u64 {
        self.state().bad_shadow
    }
    /// I/O SQ doorbells only schedule their queue until [`Sim::run_pending`]
    /// (QEMU processes a queue from a bottom half after its doorbell write).
    pub fn set_deferred(&self, v: bool) {
        self.state().deferred = v;
    }
    /// Processes the queues whose doorbell was written since the last call.
    pub fn run_pending(&self) {
        let mut s = self.state();
        for qid in 1..MAX_QUEUES {
            if std::mem::take(&mut s.kicked[qid]) {
                s.process_sq(qid as u16);
            }
        }
    }
}

impl Mmio for Sim {
    fn read32(&self, offset: usize) -> u32 {
        let s = self.state();
        match offset {
            regs::CAP => s.cap as u32,
            o if o == regs::CAP + 4 => (s.cap >> 32) as u32,
            regs::VS => s.cfg.version,
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
                    s.doorbells[qid].0 += 1;
                    s.sq_doorbell(qid as u16, value as u16);
                } else {
                    s.doorbells[qid].1 += 1;
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
            self.stop();
        } else if !was && now {
            if self.fatal_on_enable {
                self.csts = regs::CSTS_CFS;
                return;
            }
            if self.never_ready {
                return;
            }
            if self.cfg.qemu == Qemu::V7_2 && !self.entry_sizes_ok() {
                // nvme_start_ctrl refuses I/O queue entry sizes outside
                // Identify's SQES/CQES (64 and 16 bytes only).
                self.csts = regs::CSTS_CFS;
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

    /// CC.IOSQES is 6 (64-byte entries) and CC.IOCQES 4 (16 bytes), the
    /// only sizes QEMU's SQES/CQES allow.
    fn entry_sizes_ok(&self) -> bool {
        (self.cc >> 16) & 0xf == 6 && (self.cc >> 20) & 0xf == 4
    }

    /// A controller reset (CC.EN 1 -> 0 taking effect): queues and every
    /// command in them are gone.
    fn stop(&mut self) {
        self.sqs = [None; MAX_QUEUES];
        self.cqs = [None; MAX_QUEUES];
        self.held.clear();
        self.overflow.clear();
        self.stalled.clear();
        self.dbbuf = None;
        self.kicked = [false; MAX_QUEUES];
        self.csts = 0;
        self.disables += 1;
    }

    /// Slot `index` (2 * qid for an SQ tail, 2 * qid + 1 for a CQ head) of
    /// the shadow doorbell page (`event == false`) or the event index page.
    fn dbbuf_slot(&self, index: usize, event: bool) -> Option<*mut u32> {
        let (db, ei) = self.dbbuf?;
        host_ptr(if event { ei } else { db } + 4 * index as u64).map(|p| p as *mut u32)
    }

    fn read_slot(&self, index: usize) -> Option<u32> {
        let p = self.dbbuf_slot(index, false)?;
        // SAFETY: the page given with Doorbell Buffer Config, which the
        // driver keeps alive while the controller uses it; index < 130.
        Some(unsafe { std::ptr::read_volatile(p) })
    }

    fn write_slot(&self, index: usize, event: bool, v: u32) {
        if let Some(p) = self.dbbuf_slot(index, event) {
            // SAFETY: as in read_slot.
            unsafe { std::ptr::write_volatile(p, v) };
        }
    }

    /// The SQ tail from the shadow slot, when a doorbell buffer is in use
    /// (`nvme_update_sq_tail`); out-of-range values are ignored.
    fn shadow_tail(&mut self, qid: u16, sq: &mut SimSq) {
        if qid != 0 && self.cfg.stale_shadow_tail {
            // The driver's later stores are still in its CPU's store buffer
            // (module docs): what is read is what the MMIO write drained.
            sq.tail = self.mmio_tail[qid as usize];
            return;
        }
        if let Some(v) = self.read_slot(2 * qid as usize) {
            if v < sq.entries as u32 {
                sq.tail = v as u16;
            } else {
                self.bad_shadow += 1;
            }
        }
    }

    /// An MMIO write of SQ `qid`'s tail doorbell.
    fn sq_doorbell(&mut self, qid: u16, tail: u16) {
        let Some(mut sq) = self.sqs[qid as usize] else {
            return;
        };
        if tail >= sq.entries {
            return; // invalid doorbell write: ignored (a real device posts an async event)
        }
        sq.tail = tail;
        self.mmio_tail[qid as usize] = tail;
        self.sqs[qid as usize] = Some(sq);
        if qid == 0 {
            // QEMU keeps the admin queue's shadow slot in step with MMIO.
            self.write_slot(0, false, tail as u32);
        } else if self.deferred {
            self.kicked[qid as usize] = true;
            return;
        }
        self.process_sq(qid);
    }

    /// Fetches and executes the new entries of SQ `qid` (`nvme_process_sq`).
    fn process_sq(&mut self, qid: u16) {
        let Some(mut sq) = self.sqs[qid as usize] else {
            return;
        };
        if self.dbbuf.is_some() {
            self.shadow_tail(qid, &mut sq);
        }
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
            // Queues may have been created or deleted by the command, and
            // the controller reset.
            match self.sqs[qid as usize] {
                Some(s) => sq = Self::merged(s, sq),
                None => return,
            }
            if self.dbbuf.is_some() {
                // The event index says how far the controller got; then it
                // looks for more (nvme_update_sq_eventidx, _tail).
                self.write_slot(2 * qid as usize, true, sq.tail as u32);
                self.shadow_tail(qid, &mut sq);
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
        if qid == 0 {
            self.write_slot(1, false, head as u32);
        }
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
        let Some(known) = self.cqs[cqid as usize].map(|c| c.head) else {
            return;
        };
        if self.dbbuf.is_some() {
            let slot = 2 * cqid as usize + 1;
            if self.cfg.cq_eventidx {
                self.write_slot(slot, true, known as u32);
            }
            let shadow = self.read_slot(slot);
            let bad = &mut self.bad_shadow;
            if let (Some(cq), Some(v)) = (self.cqs[cqid as usize].as_mut(), shadow) {
                if v < cq.entries as u32 {
                    cq.head = v as u16;
                } else {
                    *bad += 1;
                }
            }
        }
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

    /// The attached namespaces, ascending.
    fn active_ids(&self) -> Vec<u32> {
        let mut ids: Vec<u32> = self.cfg.extra_namespaces.iter().map(|n| n.nsid).collect();
        if self.cfg.ns1_active {
            ids.push(1);
        }
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    fn nn(&self) -> u32 {
        self.cfg.nn.unwrap_or(256)
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
                        if self.cfg.dbbuf {
                            d[257] |= 1; // OACS bit 8: Doorbell Buffer Config
                        }
                        if self.cfg.volatile_cache {
                            d[525] = 1; // VWC: a volatile write cache
                        }
                        d[512] = 0x66;
                        d[513] = 0x44;
                        d[516..520].copy_from_slice(&self.nn().to_le_bytes());
                    }
                    0x00 => {
                        if cmd.nsid == 0 || cmd.nsid == u32::MAX {
                            return (Status::new(0, 0x0b), 0);
                        }
                        if cmd.nsid == 1 && self.cfg.ns1_active {
                            d[0..8].copy_from_slice(&self.reported_blocks().to_le_bytes());
                            d[8..16].copy_from_slice(&self.reported_blocks().to_le_bytes());
                            let lbads = self.cfg.block_size.trailing_zeros();
                            d[128..132].copy_from_slice(&(lbads << 16).to_le_bytes());
                        } else if let Some(ns) = self
                            .cfg
                            .extra_namespaces
                            .iter()
                            .find(|n| n.nsid == cmd.nsid)
                        {
                            d[0..8].copy_from_slice(&ns.blocks.to_le_bytes());
                            d[8..16].copy_from_slice(&ns.blocks.to_le_bytes());
                            // Two formats: 0 without metadata, 1 the one in use.
                            d[25] = 1;
                            d[26] = 1 | if ns.extended { 1 << 4 } else { 0 };
                            let lbads = ns.block_size.trailing_zeros();
                            d[128..132].copy_from_slice(&(9u32 << 16).to_le_bytes());
                            d[132..136].copy_from_slice(
                                &((lbads << 16) | ns.metadata as u32).to_le_bytes(),
                            );
                        } else if cmd.nsid > self.nn() {
                            return (Status::new(0, 0x0b).with_dnr(), 0);
                        }
                    }
                    0x02 if self.cfg.active_list => {
                        let mut ids: Vec<u32> = self.active_ids();
                        ids.retain(|&id| id > cmd.nsid);
                        for (i, id) in ids.iter().take(1024).enumerate() {
                            d[4 * i..4 * i + 4].copy_from_slice(&id.to_le_bytes());
                        }
                    }
                    _ => return (status(INVALID_FIELD).with_dnr(), 0),
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
                    Some(i) if self.cfg.qemu == Qemu::V10_0 && sqid != 0 => {
                        // "Not aborted", and yet nvme_abort cancels the
                        // request's I/O (blk_aio_cancel_async), whose
                        // callback then sets the I/O error's status
                        // (nvme_rw_complete_cb): the command completes.
                        let st = self.stalled.remove(i);
                        let error = match st.cmd.opcode() {
                            io::READ => Status::new(2, 0x81),  // Unrecovered Read Error
                            io::WRITE => Status::new(2, 0x80), // Write Fault
                            _ => Status::new(0, 0x06),         // Internal Error
                        };
                        self.complete(st.sqid, st.cqid, cid, error, 0);
                        (Status::SUCCESS, 1)
                    }
                    _ => (Status::SUCCESS, 1),
                }
            }
            admin::DOORBELL_BUFFER_CONFIG if self.cfg.dbbuf => {
                let (db, ei) = (cmd.prp1, cmd.prp2);
                let page = PAGE_SIZE as u64;
                if !db.is_multiple_of(page) || !ei.is_multiple_of(page) {
                    return (status(INVALID_FIELD).with_dnr(), 0);
                }
                self.dbbuf = Some((db, ei));
                self.dbbuf_configs += 1;
                // Existing queues (the admin queue at least) start from their
                // current values.
                for q in 0..MAX_QUEUES {
                    if let Some(sq) = self.sqs[q] {
                        self.write_slot(2 * q, false, sq.tail as u32);
                    }
                    if let Some(cq) = self.cqs[q] {
                        self.write_slot(2 * q + 1, false, cq.head as u32);
                    }
                }
                (Status::SUCCESS, 0)
            }
            admin::SET_FEATURES if cmd.cdw10 & 0xff == 0x07 => {
                let nsq = (cmd.cdw11 & 0xffff).min(63);
                let ncq = (cmd.cdw11 >> 16).min(63);
                (Status::SUCCESS, (ncq << 16) | nsq)
            }
            admin::CREATE_IO_CQ => {
                let qid = (cmd.cdw10 & 0xffff) as usize;
                let entries = (cmd.cdw10 >> 16) + 1;
                if self.cfg.qemu == Qemu::V10_0 && !self.entry_sizes_ok() {
                    // 10.0 checks CC's entry sizes here, not at enable.
                    return (Status::new(1, 0x02).with_dnr(), 0);
                }
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

    /// A write of `blocks` blocks at `lba` completed (its data is in
    /// `disk`): without a volatile cache, or with FUA, it is on the media at
    /// once; otherwise its blocks are cached (a later write of a block
    /// replaces the earlier one in the cache, as a device's cache does).
    fn wrote(&mut self, lba: u64, blocks: u64, fua: bool) {
        let bs = self.cfg.block_size as usize;
        let range = lba as usize * bs..(lba + blocks) as usize * bs;
        self.writes += 1;
        if !self.cfg.volatile_cache || fua {
            self.media[range.clone()].copy_from_slice(&self.disk[range]);
            for b in lba..lba + blocks {
                self.cached.remove(&b);
            }
        } else {
            for b in lba..lba + blocks {
                self.cached.insert(b, self.writes);
            }
        }
    }

    /// Writes the cached blocks `keep(block, write order)` chooses to the
    /// media and forgets every cached block.
    fn persist_cached(&mut self, mut keep: impl FnMut(u64, u64) -> bool) {
        let bs = self.cfg.block_size as usize;
        for (b, order) in core::mem::take(&mut self.cached) {
            if keep(b, order) {
                let r = b as usize * bs..(b as usize + 1) * bs;
                self.media[r.clone()].copy_from_slice(&self.disk[r]);
            }
        }
    }

    fn io(&mut self, cmd: &SubmissionEntry) -> (Status, u32) {
        if cmd.nsid != 1 || !self.cfg.ns1_active {
            return (Status::new(0, 0x0b).with_dnr(), 0);
        }
        match cmd.opcode() {
            io::FLUSH => {
                self.persist_cached(|_, _| true);
                (Status::SUCCESS, 0)
            }
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
                let read = cmd.opcode() == io::READ;
                let r = self.copy(cmd, &mut data[start..start + len], read);
                self.disk = data;
                match r {
                    Ok(()) => {
                        if !read {
                            let fua = cmd.cdw12 & FUA != 0;
                            self.wrote(lba, blocks, fua);
                        }
                        (Status::SUCCESS, 0)
                    }
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
