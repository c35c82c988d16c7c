//! Controller bring-up, admin commands, and recovery (Abort, reset).
//!
//! Recovery from a command that does not complete, as the owner of the
//! controller and its queues runs it (see the state machine in
//! [`crate::queue`]):
//!
//! ```text
//! loop (timer, e.g. once a millisecond):
//!     while let Some(x) = qp.expire(now):
//!         Expiry::Abort { qid, cid, .. }  => ctrl.abort(qid, cid)   (answer is advisory)
//!         Expiry::ResetNeeded { .. }      => reset = true
//!     if reset || ctrl.needs_reset() || qp.needs_reset():
//!         ctrl.reset(&mut [&mut qp], |c| deliver(c))
//! ```
//!
//! With queue pairs on several cores, each core's queue recovers through a
//! [`crate::SharedController`] (see [`crate::shared`]): a reset names only
//! the resetting core's queue, bumps the controller's [`Controller::epoch`],
//! and every other queue notices that on its next poll and
//! [`Controller::rejoin`]s.
//!
//! # Doorbell Buffer Config
//!
//! With [`Config::dbbuf`] and OACS bit 8 (Identify Controller), `init`
//! allocates two DMA pages, the Shadow Doorbell buffer and the EventIdx
//! buffer, and issues Doorbell Buffer Config (admin opcode 7Ch, PRP1 and
//! PRP2) after Identify, before any I/O queue exists; every I/O queue pair
//! created afterwards rings its doorbells through its slots there (see
//! [`crate::queue`]). The admin queue keeps MMIO doorbells (QEMU copies them
//! into its shadow slots itself). A controller reset forgets the buffer:
//! [`Controller::reset`] issues the command again before re-creating queues,
//! and every queue zeroes its own four slots before it is created on the
//! device (at creation and at every re-creation), so the controller never
//! reads a stale tail. The pages are zeroed per queue rather than whole
//! because queues on other cores may still write their own slots until they
//! notice the reset. The pages are never freed once the controller took
//! them (nothing disables the controller when a `Controller` is dropped).
//! One line is logged at `init`: `doorbell buffer: on`, or `doorbell buffer:
//! off (not supported)`, `off (disabled)`, `off (refused: <status>)`.
//!
//! # Limits of QEMU's emulated controller (7.2 and 10.0)
//!
//! `max_ioqpairs` defaults to 64 I/O queue pairs (Set Features Number of
//! Queues grants 64 whatever is asked), `msix_qsize` to 65 MSI-X vectors
//! (entry 0 for the admin queue, one per I/O queue), CAP.MQES 0x7ff (2048
//! entries per queue), CAP.DSTRD 0, MDTS 7 (512 KiB). It supports Doorbell
//! Buffer Config (10.0: unless `dbcs=off`); it answers Abort with "not
//! aborted" (10.0 still cancels the command's I/O, which then completes
//! with an error; see [`crate::sim`], "QEMU 7.2 and QEMU 10.0").

use crate::cmd::{cns, SubmissionEntry};
use crate::error::NvmeError;
use crate::hal::{Dma, Hal, Mmio, PAGE_SIZE};
use crate::identify::{ControllerInfo, Namespace};
use crate::queue::{Completion, DataBuf, QueuePair, Shadow};
use crate::regs::{self, Cap};
use alloc::vec::Vec;

/// How the driver sets up a controller.
#[derive(Clone, Copy, Debug)]
pub struct Config {
    /// Admin queue entries.
    pub admin_entries: u16,
    /// Deadline of admin commands.
    pub admin_timeout_ms: u64,
    /// Deadline of I/O commands.
    pub io_timeout_ms: u64,
    /// How long an I/O command that passed its deadline may take to complete
    /// after it was aborted, before the queue asks for a controller reset.
    pub abort_grace_ms: u64,
    /// Use shadow doorbells (Doorbell Buffer Config) when the controller
    /// supports them (module docs).
    pub dbbuf: bool,
    /// Keep trusting the shadow doorbells' event index after the controller
    /// lost an update (a kick recovered a queue, [`QueuePair::watch`]);
    /// by default every queue then writes every doorbell through MMIO.
    pub dbbuf_keep: bool,
    /// How long an I/O queue with commands in flight may complete nothing
    /// before its doorbells are written again through MMIO; 0 never.
    pub kick_ms: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            admin_entries: 32,
            admin_timeout_ms: 5_000,
            io_timeout_ms: 5_000,
            abort_grace_ms: 5_000,
            dbbuf: true,
            dbbuf_keep: false,
            kick_ms: crate::queue::DEFAULT_KICK_NS / 1_000_000,
        }
    }
}

/// Counters of one controller.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ControllerStats {
    /// Abort commands sent.
    pub aborts_sent: u64,
    /// Abort commands the controller answered with "not aborted" (DW0 bit 0).
    pub aborts_declined: u64,
    /// Controller resets attempted.
    pub resets: u64,
    /// Resets after which the controller did not come back.
    pub failed_resets: u64,
    /// I/O queue pairs re-created by their owners after a reset made by
    /// another queue ([`Controller::rejoin`]).
    pub rejoins: u64,
    /// Lost doorbells recovered by a queue's kick ([`Controller::doorbell_lost`]).
    pub lost_doorbells: u64,
}

/// The Shadow Doorbell and EventIdx pages given to the controller.
struct DoorbellBuffer {
    shadow: Dma,
    event_idx: Dma,
}

/// An enabled controller with its admin queue.
///
/// After an admin command times out, the admin queue refuses further commands
/// ([`NvmeError::ResetRequired`]) until [`Controller::reset`] succeeded: the
/// timed-out command may still write into its buffer (for Identify, the
/// controller's scratch page, which is therefore not reused before the reset).
pub struct Controller<H: Hal, M: Mmio> {
    hal: H,
    mmio: M,
    cap: Cap,
    version: u32,
    config: Config,
    admin: QueuePair<H, M>,
    info: ControllerInfo,
    /// Identify's data buffer. Owned by the device while an Identify is in
    /// flight or abandoned after a timeout (then the admin queue is wedged and
    /// nothing is submitted with it until a reset).
    scratch: Dma,
    /// I/O queue pairs asked for with Set Features, asked again after a reset.
    queue_count: Option<u16>,
    /// Ids of the I/O queues created and not deleted (also those waiting to
    /// [`Controller::rejoin`] after a reset).
    io_qids: Vec<u16>,
    /// Shadow doorbells, when the controller took them.
    dbbuf: Option<DoorbellBuffer>,
    /// Incremented each time a reset saw the controller stop (CSTS.RDY = 0
    /// after CC.EN = 0): queues created before no longer exist on it.
    epoch: u64,
    /// The last reset could not stop the controller: it may still access
    /// every queue and buffer.
    halted: bool,
    /// The controller lost a shadow doorbell update: every queue writes
    /// every doorbell through MMIO ([`Controller::doorbell_lost`]).
    event_idx_distrusted: bool,
    stats: ControllerStats,
}

/// Namespaces scanned at most when the controller has no active namespace
/// list ([`Controller::active_namespaces`]).
pub const MAX_SCANNED_NAMESPACES: u32 = 1024;

/// CC as the driver enables the controller: NVM command set, 4 KiB pages,
/// round robin, 64/16-byte entries.
const CC_ENABLE: u32 = regs::CC_EN | regs::CC_IOSQES_64 | regs::CC_IOCQES_16;

/// Polls `CSTS` until `RDY == want`, bounded by CAP.TO.
fn wait_ready<H: Hal, M: Mmio>(hal: &H, mmio: &M, cap: Cap, want: bool) -> Result<(), NvmeError> {
    let timeout_ms = cap.timeout_ms().max(500);
    let start = hal.now_ns();
    let deadline = start.saturating_add(timeout_ms * 1_000_000);
    loop {
        let csts = mmio.read32(regs::CSTS);
        if csts == u32::MAX {
            return Err(NvmeError::DeviceGone);
        }
        if want && csts & regs::CSTS_CFS != 0 {
            return Err(NvmeError::ControllerFatal);
        }
        if (csts & regs::CSTS_RDY != 0) == want {
            return Ok(());
        }
        if hal.now_ns() >= deadline {
            return Err(NvmeError::NotReady {
                enable: want,
                waited_ms: timeout_ms,
            });
        }
        hal.relax();
    }
}

/// Programs the admin queue registers and enables the controller (same
/// settings at init and after a reset), bounded by CAP.TO.
fn enable<H: Hal, M: Mmio>(
    hal: &H,
    mmio: &M,
    cap: Cap,
    admin: &QueuePair<H, M>,
) -> Result<(), NvmeError> {
    let q = (admin.entries() - 1) as u32;
    mmio.write32(regs::AQA, (q << 16) | q);
    mmio.write64(regs::ASQ, admin.sq_phys());
    mmio.write64(regs::ACQ, admin.cq_phys());
    mmio.write32(regs::CC, CC_ENABLE);
    wait_ready(hal, mmio, cap, true)
}

/// Identify through `admin` into the DMA page `scratch`.
fn identify_raw<H: Hal, M: Mmio>(
    admin: &mut QueuePair<H, M>,
    scratch: &Dma,
    cns: u32,
    nsid: u32,
) -> Result<[u8; 4096], NvmeError> {
    let buf = DataBuf::new(scratch.virt, PAGE_SIZE);
    // SAFETY: `scratch` is a DMA page owned by the caller that the CPU does not
    // touch until `execute` returns Ok. After Err(Timeout) the admin queue is
    // wedged (refuses every command) until a reset stopped the controller, so
    // the page is not handed to the device or read again before that.
    unsafe { admin.execute(SubmissionEntry::identify(cns, nsid), Some(buf))? };
    let mut out = [0u8; 4096];
    // SAFETY: the command completed; `scratch` is one readable page. The device
    // wrote it, so it is read volatile.
    unsafe {
        let src = scratch.virt.as_ptr();
        for (i, b) in out.iter_mut().enumerate() {
            *b = core::ptr::read_volatile(src.add(i));
        }
    }
    Ok(out)
}

impl<H: Hal, M: Mmio> Controller<H, M> {
    /// Resets the controller, sets up the admin queue, enables it and reads
    /// Identify Controller. Every wait is bounded (CAP.TO, command deadlines).
    pub fn init(hal: H, mmio: M, config: Config) -> Result<Self, NvmeError> {
        let cap = Cap(mmio.read64(regs::CAP));
        if cap.0 == u64::MAX {
            return Err(NvmeError::DeviceGone);
        }
        let version = mmio.read32(regs::VS);
        if !cap.nvm_command_set() {
            return Err(NvmeError::Unsupported("NVM command set not in CAP.CSS"));
        }
        if cap.min_page_size() > PAGE_SIZE || cap.max_page_size() < PAGE_SIZE {
            return Err(NvmeError::Unsupported("4 KiB memory pages"));
        }
        log::debug!(target: "nvme", "CAP {:#018x} VS {:#010x}", cap.0, version);

        // Disable first: firmware or a previous run may have left it enabled.
        let cc = mmio.read32(regs::CC);
        if cc & regs::CC_EN != 0 {
            mmio.write32(regs::CC, cc & !regs::CC_EN);
        }
        wait_ready(&hal, &mmio, cap, false)?;

        let admin_entries = config
            .admin_entries
            .clamp(2, cap.max_queue_entries().min(4096) as u16);
        let admin = QueuePair::new(
            hal.clone(),
            mmio.clone(),
            0,
            admin_entries,
            cap.doorbell_stride(),
            config.admin_timeout_ms * 1_000_000,
            PAGE_SIZE,
            None,
        )?;
        enable(&hal, &mmio, cap, &admin)?;

        let scratch = hal.dma_alloc(PAGE_SIZE).ok_or(NvmeError::NoMemory)?;
        let mut admin = admin;
        let data = identify_raw(&mut admin, &scratch, cns::CONTROLLER, 0)?;
        let info = ControllerInfo::parse(&data, cap.min_page_size())?;
        let mut ctrl = Controller {
            hal,
            mmio,
            cap,
            version,
            config,
            admin,
            info,
            scratch,
            queue_count: None,
            io_qids: Vec::new(),
            dbbuf: None,
            event_idx_distrusted: false,
            epoch: 0,
            halted: false,
            stats: ControllerStats::default(),
        };
        log::info!(
            target: "nvme",
            "controller {:04x} model {:?} serial {:?} fw {:?} version {}.{} mdts {} namespaces {}",
            ctrl.info.vendor,
            ctrl.info.model.as_str(),
            ctrl.info.serial.as_str(),
            ctrl.info.firmware.as_str(),
            version >> 16,
            (version >> 8) & 0xff,
            ctrl.info.mdts_bytes.map_or(0, |b| b / 1024),
            ctrl.info.namespaces
        );
        ctrl.setup_dbbuf()?;
        Ok(ctrl)
    }

    /// Gives the controller a doorbell buffer when configured and supported
    /// (module docs). Errors only when the admin queue broke (timeout).
    fn setup_dbbuf(&mut self) -> Result<(), NvmeError> {
        if !self.config.dbbuf {
            log::info!(target: "nvme", "doorbell buffer: off (disabled)");
            return Ok(());
        }
        if !self.info.doorbell_buffer_config {
            log::info!(target: "nvme", "doorbell buffer: off (not supported)");
            return Ok(());
        }
        let shadow = self.hal.dma_alloc(PAGE_SIZE).ok_or(NvmeError::NoMemory)?;
        let Some(event_idx) = self.hal.dma_alloc(PAGE_SIZE) else {
            // SAFETY: never given to the device.
            unsafe { self.hal.dma_free(&shadow) };
            return Err(NvmeError::NoMemory);
        };
        self.dbbuf = Some(DoorbellBuffer { shadow, event_idx });
        match self.configure_dbbuf() {
            Ok(()) => {
                log::info!(target: "nvme", "doorbell buffer: on");
                Ok(())
            }
            Err(NvmeError::Command { status, .. }) => {
                log::info!(target: "nvme", "doorbell buffer: off (refused: {status})");
                if let Some(b) = self.dbbuf.take() {
                    // SAFETY: the controller refused the command: it did not
                    // take the pages.
                    unsafe {
                        self.hal.dma_free(&b.shadow);
                        self.hal.dma_free(&b.event_idx);
                    }
                }
                Ok(())
            }
            // The pages stay allocated: a timed-out command may still have
            // been taken.
            Err(e) => Err(e),
        }
    }

    /// Issues Doorbell Buffer Config with the pages in `self.dbbuf`.
    fn configure_dbbuf(&mut self) -> Result<(), NvmeError> {
        let Some(b) = &self.dbbuf else {
            return Ok(());
        };
        let cmd = SubmissionEntry::doorbell_buffer_config(b.shadow.phys, b.event_idx.phys);
        // SAFETY: no data buffer; the pages named by PRP1/PRP2 are owned by
        // the controller object and never freed once the device took them.
        unsafe { self.admin.execute(cmd, None) }.map(|_| ())
    }

    /// Whether I/O queues use shadow doorbells (module docs).
    pub fn doorbell_buffer(&self) -> bool {
        self.dbbuf.is_some()
    }

    /// A queue's kick recovered a lost doorbell ([`QueuePair::watch`]):
    /// unless [`Config::dbbuf_keep`], the controller's event indexes are not
    /// trusted for the rest of its life (every doorbell also goes through
    /// MMIO; the queues learn it from [`Controller::event_idx_distrusted`]).
    /// Returns whether that is new.
    pub fn doorbell_lost(&mut self) -> bool {
        self.stats.lost_doorbells += 1;
        if self.config.dbbuf_keep || self.event_idx_distrusted || self.dbbuf.is_none() {
            return false;
        }
        self.event_idx_distrusted = true;
        true
    }

    /// Whether the queues must write every doorbell through MMIO
    /// ([`Controller::doorbell_lost`]).
    pub fn event_idx_distrusted(&self) -> bool {
        self.event_idx_distrusted
    }

    /// Whether the event index stays trusted after a lost update
    /// ([`Config::dbbuf_keep`]).
    pub fn keeps_dbbuf(&self) -> bool {
        self.config.dbbuf_keep
    }

    /// Incremented by every reset that stopped the controller; a queue pair
    /// whose [`QueuePair::epoch`] differs no longer exists on the device and
    /// must [`Controller::rejoin`].
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Whether the last reset could not stop the controller (it may still
    /// access every queue and buffer); a later successful reset clears it.
    pub fn is_halted(&self) -> bool {
        self.halted
    }

    pub fn cap(&self) -> Cap {
        self.cap
    }
    pub fn version(&self) -> u32 {
        self.version
    }
    pub fn info(&self) -> &ControllerInfo {
        &self.info
    }
    pub fn admin(&mut self) -> &mut QueuePair<H, M> {
        &mut self.admin
    }
    pub fn stats(&self) -> ControllerStats {
        self.stats
    }
    /// Whether admin commands are refused until [`Controller::reset`]: an
    /// admin command timed out, or the controller did not come back.
    pub fn needs_reset(&self) -> bool {
        self.admin.needs_reset()
    }

    /// Largest transfer of one command: MDTS, bounded by one PRP list page.
    pub fn max_transfer(&self) -> usize {
        self.info
            .mdts_bytes
            .unwrap_or(usize::MAX)
            .min(crate::queue::MAX_TRANSFER_PRP_LIST)
    }

    /// Runs Identify with `cns` and returns the 4 KiB data structure.
    pub fn identify(&mut self, cns: u32, nsid: u32) -> Result<[u8; 4096], NvmeError> {
        identify_raw(&mut self.admin, &self.scratch, cns, nsid)
    }

    /// The active namespace ids, ascending; empty when no namespace is
    /// attached (not an error).
    ///
    /// From the Active Namespace ID list (Identify CNS 2, NVMe 1.1), asked
    /// again from the last id while a list comes back full (1024 ids). A
    /// controller older than 1.1 (VS), or one that refuses CNS 2 with an
    /// error status, is scanned instead: Identify Namespace for each nsid in
    /// 1..=NN (Identify Controller; at most [`MAX_SCANNED_NAMESPACES`]), those
    /// of non-zero size being active.
    pub fn active_namespaces(&mut self) -> Result<Vec<u32>, NvmeError> {
        if self.version >= 0x0001_0100 {
            match self.active_namespace_list() {
                Ok(ids) => return Ok(ids),
                Err(NvmeError::Command { status, .. }) => log::info!(
                    target: "nvme",
                    "active namespace list refused ({status}): scanning namespaces 1..={}",
                    self.info.namespaces.min(MAX_SCANNED_NAMESPACES)
                ),
                Err(e) => return Err(e),
            }
        }
        self.scan_namespaces()
    }

    fn active_namespace_list(&mut self) -> Result<Vec<u32>, NvmeError> {
        let mut ids: Vec<u32> = Vec::new();
        let mut after = 0u32;
        // 64 lists of 1024: far more namespaces than any controller has.
        for _ in 0..64 {
            let data = self.identify(cns::ACTIVE_NAMESPACES, after)?;
            let mut n = 0;
            for c in data.chunks_exact(4) {
                let id = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                // Ascending ids above `after`; anything else ends the list.
                if id == 0 || id <= after || id == u32::MAX {
                    break;
                }
                ids.push(id);
                after = id;
                n += 1;
            }
            if n < 1024 {
                break;
            }
        }
        Ok(ids)
    }

    fn scan_namespaces(&mut self) -> Result<Vec<u32>, NvmeError> {
        let nn = self.info.namespaces;
        if nn > MAX_SCANNED_NAMESPACES {
            log::warn!(target: "nvme", "{nn} namespaces: scanning the first {MAX_SCANNED_NAMESPACES} only");
        }
        let mut ids = Vec::new();
        for nsid in 1..=nn.min(MAX_SCANNED_NAMESPACES) {
            match self.identify(cns::NAMESPACE, nsid) {
                Ok(data) => {
                    if data[0..8].iter().any(|&b| b != 0) {
                        ids.push(nsid);
                    }
                }
                // Invalid Namespace or Format and the like: not active.
                Err(NvmeError::Command { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(ids)
    }

    /// Identify Namespace `nsid`.
    pub fn namespace(&mut self, nsid: u32) -> Result<Namespace, NvmeError> {
        let data = self.identify(cns::NAMESPACE, nsid)?;
        let ns = Namespace::parse(nsid, &data)?;
        log::info!(
            target: "nvme",
            "namespace {nsid}: {} blocks of {} bytes ({} MiB)",
            ns.blocks,
            ns.block_size,
            ns.bytes() >> 20
        );
        Ok(ns)
    }

    /// Set Features / Number of Queues. Returns the I/O queue pairs granted
    /// and usable: with a doorbell buffer, at most as many as its shadow
    /// page holds slots for (an SQ tail and a CQ head per queue, the admin
    /// queue's included, at the doorbell stride: 511 I/O queues with a
    /// 4-byte stride).
    pub fn set_queue_count(&mut self, wanted: u16) -> Result<u16, NvmeError> {
        let mut wanted = wanted.max(1);
        if self.dbbuf.is_some() {
            let pairs = PAGE_SIZE / (2 * self.cap.doorbell_stride());
            wanted = wanted.min(pairs.saturating_sub(1).max(1) as u16);
        }
        self.queue_count = Some(wanted);
        // SAFETY: no data buffer.
        let dw0 = unsafe {
            self.admin
                .execute(SubmissionEntry::set_num_queues(wanted, wanted), None)?
        };
        let sq = (dw0 & 0xffff) as u16 + 1;
        let cq = (dw0 >> 16) as u16 + 1;
        Ok(sq.min(cq).min(wanted))
    }

    /// Creates I/O queue pair `qid` with `entries` entries; completions signal
    /// MSI-X `vector` when given, else the queue is polled. With a doorbell
    /// buffer the queue rings through its shadow slots. A `qid` that exists
    /// already (or waits to rejoin after a reset) is refused.
    pub fn create_io_queue(
        &mut self,
        qid: u16,
        entries: u16,
        vector: Option<u16>,
    ) -> Result<QueuePair<H, M>, NvmeError> {
        let max = self.cap.max_queue_entries().min(4096);
        let bad = NvmeError::BadQueue {
            qid,
            entries: entries as u32,
        };
        if qid == 0 || entries < 2 || entries as u32 > max || self.io_qids.contains(&qid) {
            return Err(bad);
        }
        let shadow = match &self.dbbuf {
            None => None,
            Some(b) => Some(
                Shadow::new(&b.shadow, &b.event_idx, qid, self.cap.doorbell_stride()).ok_or(bad)?,
            ),
        };
        let mut qp = QueuePair::new(
            self.hal.clone(),
            self.mmio.clone(),
            qid,
            entries,
            self.cap.doorbell_stride(),
            self.config.io_timeout_ms * 1_000_000,
            self.max_transfer(),
            vector,
        )?;
        qp.set_abort_grace_ns(self.config.abort_grace_ms * 1_000_000);
        qp.set_kick_after_ns(self.config.kick_ms.saturating_mul(1_000_000));
        qp.set_shadow(shadow);
        if self.event_idx_distrusted {
            qp.distrust_event_idx();
        }
        self.create_on_device(&mut qp)?;
        self.io_qids.push(qid);
        log::debug!(target: "nvme", "I/O queue {qid}: {entries} entries, vector {vector:?}, shadow doorbells {}", qp.shadow_doorbells());
        Ok(qp)
    }

    /// Asks for `wanted` I/O queue pairs (Set Features Number of Queues) and
    /// creates queue pairs 1..=n, n = what the controller granted (at most
    /// `wanted`), with `entries` entries each (at most CAP.MQES + 1). With
    /// `msix`, queue `qid` signals MSI-X table entry `qid` (entry 0 belongs
    /// to the admin queue, which the driver polls): the caller routes each
    /// entry to the core that owns the queue. On an error the queues already
    /// created are deleted again.
    pub fn create_io_queues(
        &mut self,
        wanted: u16,
        entries: u16,
        msix: bool,
    ) -> Result<Vec<QueuePair<H, M>>, NvmeError> {
        let n = self.set_queue_count(wanted)?;
        let entries = entries.min(self.cap.max_queue_entries().min(4096) as u16);
        let mut queues = Vec::with_capacity(n as usize);
        for qid in 1..=n {
            match self.create_io_queue(qid, entries, msix.then_some(qid)) {
                Ok(q) => queues.push(q),
                Err(e) => {
                    for q in queues.drain(..) {
                        let _ = self.delete_io_queue(q);
                    }
                    return Err(e);
                }
            }
        }
        log::info!(
            target: "nvme",
            "{n} I/O queue pair(s) of {entries} entries ({} asked), {}",
            wanted,
            if msix { "MSI-X entry = queue id" } else { "polled" }
        );
        Ok(queues)
    }

    /// Create I/O CQ then SQ for `qp` with its memory, size and vector,
    /// after zeroing its shadow doorbell slots; stamps the queue with the
    /// current epoch and marks it up.
    fn create_on_device(&mut self, qp: &mut QueuePair<H, M>) -> Result<(), NvmeError> {
        let (qid, entries) = (qp.qid(), qp.entries());
        // SAFETY: the queue does not exist on the controller now (new, or
        // the controller was stopped since it was created), and only its
        // owner, who lent it to us, writes its slots.
        unsafe { qp.clear_shadow() };
        // SAFETY: no data buffer; the queue memory lives in `qp`, which the
        // caller keeps and never frees while the queue exists.
        unsafe {
            self.admin.execute(
                SubmissionEntry::create_io_cq(qid, entries, qp.cq_phys(), qp.vector()),
                None,
            )?;
            if let Err(e) = self.admin.execute(
                SubmissionEntry::create_io_sq(qid, entries, qp.sq_phys(), qid),
                None,
            ) {
                let _ = self.admin.execute(SubmissionEntry::delete_io_cq(qid), None);
                return Err(e);
            }
        }
        qp.set_epoch(self.epoch);
        qp.set_up();
        Ok(())
    }

    /// Deletes I/O queue pair `qp` on the controller. Its memory is leaked on
    /// purpose when deletion fails (the device may still use it).
    pub fn delete_io_queue(&mut self, mut qp: QueuePair<H, M>) -> Result<(), NvmeError> {
        let qid = qp.qid();
        // SAFETY: no data buffers.
        unsafe {
            self.admin
                .execute(SubmissionEntry::delete_io_sq(qid), None)?;
            self.admin
                .execute(SubmissionEntry::delete_io_cq(qid), None)?;
        }
        self.io_qids.retain(|&q| q != qid);
        // SAFETY: both queues were deleted: the controller no longer uses them.
        unsafe { qp.reset_rings() };
        Ok(())
    }

    /// Asks the controller to abort command `cid` of submission queue `sqid`
    /// (Abort, admin opcode 0x08) and waits for its answer, bounded by the
    /// admin deadline. `Ok(true)`: the controller aborted the command, whose
    /// completion (status Command Abort Requested, [`NvmeError::Aborted`])
    /// comes on its own queue; `Ok(false)`: it did not (the command may still
    /// complete; QEMU 7.2 and 10.0 always answer this, and 10.0 may complete
    /// it with an error all the same). The answer is advisory: the
    /// command's slot stays `Aborting` until its completion, or its grace
    /// period passes and the queue asks for a reset.
    ///
    /// If the Abort itself times out, the admin queue is wedged and
    /// [`Controller::needs_reset`] turns true.
    pub fn abort(&mut self, sqid: u16, cid: u16) -> Result<bool, NvmeError> {
        // SAFETY: no data buffer.
        let dw0 = unsafe {
            self.admin
                .execute(SubmissionEntry::abort(sqid, cid), None)?
        };
        self.stats.aborts_sent += 1;
        let aborted = dw0 & 1 == 0;
        if !aborted {
            self.stats.aborts_declined += 1;
        }
        log::warn!(
            target: "nvme",
            "abort of queue {sqid} cid {cid}: {}",
            if aborted { "aborted" } else { "not aborted" }
        );
        Ok(aborted)
    }

    /// Resets the controller and brings `queues` back, with the same memory,
    /// sizes and interrupt vectors, so their owners' `QueuePair` objects stay
    /// valid. A reset destroys every I/O queue on the device: the queues not
    /// in `queues` (other cores' queues) are re-created by their owners with
    /// [`Controller::rejoin`], which they know to do because their
    /// [`QueuePair::epoch`] no longer matches [`Controller::epoch`]. (With a
    /// single owner, pass every queue.)
    ///
    /// 1. CC.EN = 0, then wait for CSTS.RDY = 0 (bounded by CAP.TO). From
    ///    then on the device no longer accesses any queue or buffer; the
    ///    epoch is incremented.
    /// 2. Every command of `queues` whose owner still waits is handed to
    ///    `on_done` exactly once ([`QueuePair::cancel_all`]): with its real
    ///    outcome if the controller had posted it, else
    ///    [`NvmeError::Timeout`] (past its deadline) or
    ///    [`NvmeError::Cancelled`]. Timed-out admin commands are forgotten
    ///    (their callers had their error).
    /// 3. The admin queue registers and CC as at init; wait for RDY = 1.
    /// 4. Doorbell Buffer Config again (when in use: the controller forgot
    ///    it), Set Features Number of Queues again (if it was set), then for
    ///    each queue: zero its shadow slots, Create I/O CQ (same vector,
    ///    interrupts enabled as before) and Create I/O SQ.
    ///
    /// Errors: if the controller cannot be stopped (step 1), nothing is
    /// delivered — the device may still write into the buffers — and every
    /// queue refuses new commands with [`NvmeError::ControllerDown`]; the
    /// commands stay with the device (the caller may turn off bus mastering
    /// and then call [`QueuePair::cancel_all`]); [`Controller::is_halted`]
    /// turns true. If it does not come back (step 3: RDY timeout, CFS,
    /// registers all ones) or refuses step 4's admin commands, step 2 has
    /// run and the queues refuse new commands with `ControllerDown`. If
    /// re-creating a queue fails, that queue stays down and the first error
    /// is returned. A later call may succeed; the queues work again after it
    /// did.
    ///
    /// MSI-X: toggling CC.EN does not touch PCI configuration space, so the
    /// MSI-X table and enable bit stay as the kernel set them; if the kernel
    /// reset the function some other way (FLR, D3), re-enabling MSI-X is its
    /// job before calling this.
    pub fn reset(
        &mut self,
        queues: &mut [&mut QueuePair<H, M>],
        mut on_done: impl FnMut(Completion),
    ) -> Result<(), NvmeError> {
        if let Some(q) = queues.iter().find(|q| q.qid() == 0) {
            return Err(NvmeError::BadQueue {
                qid: q.qid(),
                entries: q.entries() as u32,
            });
        }
        self.stats.resets += 1;
        let others = self
            .io_qids
            .iter()
            .filter(|&&qid| !queues.iter().any(|q| q.qid() == qid))
            .count();
        log::warn!(
            target: "nvme",
            "controller reset ({} I/O queue(s) here, {others} other(s) rejoin on their next poll)",
            queues.len()
        );
        let cc = self.mmio.read32(regs::CC);
        self.mmio.write32(regs::CC, cc & !regs::CC_EN);
        if let Err(e) = wait_ready(&self.hal, &self.mmio, self.cap, false) {
            // The device may still access memory: keep every buffer with it.
            self.halted = true;
            self.admin.set_down();
            for q in queues.iter_mut() {
                q.set_down();
            }
            return Err(self.failed_reset(e));
        }
        self.halted = false;
        self.epoch += 1;
        // SAFETY: CSTS.RDY = 0 after CC.EN = 0: the controller no longer
        // accesses any queue or buffer.
        unsafe {
            self.admin.cancel_all(|c| {
                log::warn!(target: "nvme", "reset: admin cid {} opcode {:#04x} failed", c.cid, c.opcode)
            });
            for q in queues.iter_mut() {
                q.cancel_all(&mut on_done);
            }
        }
        if let Err(e) = enable(&self.hal, &self.mmio, self.cap, &self.admin) {
            return Err(self.failed_reset(e));
        }
        self.admin.set_up();
        if let Err(e) = self.configure_dbbuf() {
            // Queues ring through shadow slots that the controller would not
            // read: none may come back.
            self.admin.set_down();
            return Err(self.failed_reset(e));
        }
        if let Some(n) = self.queue_count {
            // SAFETY: no data buffer.
            let r = unsafe {
                self.admin
                    .execute(SubmissionEntry::set_num_queues(n, n), None)
            };
            if let Err(e) = r {
                return Err(self.failed_reset(e));
            }
        }
        let mut first_error = None;
        for q in queues.iter_mut() {
            if let Err(e) = self.create_on_device(q) {
                log::error!(target: "nvme", "reset: I/O queue {} not re-created: {e}", q.qid());
                first_error.get_or_insert(e);
            }
        }
        match first_error {
            None => {
                log::info!(target: "nvme", "controller reset done (epoch {})", self.epoch);
                Ok(())
            }
            Some(e) => Err(self.failed_reset(e)),
        }
    }

    /// Brings back queue pair `qp` after a reset made without it (by another
    /// core's queue): when `qp.epoch()` differs from [`Controller::epoch`],
    /// the controller was stopped after `qp` was created and `qp` no longer
    /// exists on it, so its waiting commands are failed to `on_done` exactly
    /// once ([`QueuePair::cancel_all`]: real outcomes for entries posted
    /// before the stop, else [`NvmeError::Timeout`] or
    /// [`NvmeError::Cancelled`]) and it is created again (shadow slots
    /// zeroed, same memory, size and vector). Returns how many commands
    /// were failed; `Ok(0)` and nothing done when the epochs match.
    ///
    /// If the controller is down (its last reset failed) the queue stays
    /// down ([`NvmeError::ControllerDown`]) with its commands failed; a
    /// later successful reset bumps the epoch again and the next call
    /// re-creates it.
    pub fn rejoin(
        &mut self,
        qp: &mut QueuePair<H, M>,
        on_done: impl FnMut(Completion),
    ) -> Result<usize, NvmeError> {
        let qid = qp.qid();
        if qp.epoch() == self.epoch {
            return Ok(0);
        }
        if qid == 0 || !self.io_qids.contains(&qid) {
            return Err(NvmeError::BadQueue {
                qid,
                entries: qp.entries() as u32,
            });
        }
        // SAFETY: the epoch moved on only after a reset saw CSTS.RDY = 0
        // following CC.EN = 0, after `qp` was last created on the device;
        // only its owner (our caller) creates it again, here, so the device
        // has not accessed its rings or buffers since that stop.
        let failed = unsafe { qp.cancel_all(on_done) };
        qp.set_epoch(self.epoch);
        if self.admin.is_down() {
            return Err(NvmeError::ControllerDown { qid });
        }
        self.create_on_device(qp)?;
        self.stats.rejoins += 1;
        Ok(failed)
    }

    #[cold]
    fn failed_reset(&mut self, e: NvmeError) -> NvmeError {
        self.stats.failed_resets += 1;
        log::error!(target: "nvme", "controller reset failed: {e}");
        e
    }

    /// Normal shutdown (CC.SHN), bounded by CAP.TO; then disable.
    pub fn shutdown(&mut self) -> Result<(), NvmeError> {
        let cc = self.mmio.read32(regs::CC);
        self.mmio.write32(regs::CC, cc | regs::CC_SHN_NORMAL);
        let deadline = self
            .hal
            .now_ns()
            .saturating_add(self.cap.timeout_ms().max(500) * 1_000_000);
        loop {
            let csts = self.mmio.read32(regs::CSTS);
            if csts & regs::CSTS_SHST_MASK == regs::CSTS_SHST_DONE {
                break;
            }
            if self.hal.now_ns() >= deadline {
                break;
            }
            self.hal.relax();
        }
        self.disable()
    }

    /// Clears CC.EN and waits for CSTS.RDY to drop: afterwards the device no
    /// longer accesses any queue or buffer.
    pub fn disable(&mut self) -> Result<(), NvmeError> {
        let cc = self.mmio.read32(regs::CC);
        self.mmio.write32(regs::CC, cc & !regs::CC_EN);
        wait_ready(&self.hal, &self.mmio, self.cap, false)
    }
}
