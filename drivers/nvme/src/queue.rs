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
//!
//! # Buffer ownership and timeouts
//!
//! A command's data buffer belongs to the device from [`QueuePair::submit`]
//! until its owner receives the command's [`Completion`], and the driver hands
//! that completion over only once the device is done with the buffer: when
//! the controller posted the command's completion entry
//! ([`QueuePair::process_completions`]), or when the controller was stopped
//! (CC.EN = 0 and CSTS.RDY = 0) by [`crate::Controller::reset`]. A deadline
//! passing is *not* such a moment — the device may still write into the
//! buffer — so a timeout only starts the state machine below:
//!
//! ```text
//!          submit                    completion entry: delivered (Ok / error)
//!   Free ─────────▶ InFlight ───────────────────────────────────────────▶ Free
//!                      │ deadline passed: expire() returns Expiry::Abort;
//!                      ▼ the caller sends Controller::abort(qid, cid)
//!                   Aborting ───── completion entry: delivered; status
//!                      │           Command Abort Requested → NvmeError::Aborted ──▶ Free
//!                      │ abort grace passed: expire() returns Expiry::ResetNeeded
//!                      ▼
//!                AwaitingReset ─── completion entry: delivered ─────────────────▶ Free
//!                      │ Controller::reset: device stopped, then delivered as
//!                      ▼ NvmeError::Timeout (InFlight ones as NvmeError::Cancelled)
//!                    Free
//!
//!   InFlight ── wait()/execute() deadline passed: Err(Timeout) returned at once ──▶ Abandoned
//!   Abandoned ── late completion entry (not delivered again) ──▶ Free
//!   Abandoned ── Controller::reset (nothing delivered) ──▶ Free
//! ```
//!
//! Each command reaches its owner exactly once. While a slot is
//! `AwaitingReset` or `Abandoned` the queue is *wedged*: [`QueuePair::submit`]
//! refuses new commands with [`NvmeError::ResetRequired`] (see
//! [`QueuePair::needs_reset`]). After a reset that could not bring the
//! controller back the queue is *down* and refuses with
//! [`NvmeError::ControllerDown`] until a later reset succeeds.
//!
//! The synchronous [`QueuePair::wait`] (and [`QueuePair::execute`]) cannot keep
//! its caller waiting for a reset, so it returns `Err(Timeout)` while the device
//! may still own the buffer: after that error the caller must leave the buffer
//! alone until the controller was reset, or until `needs_reset()` turned false
//! again (a late completion freed the slot).
//!
//! The hot path (`submit`, `process_completions`) is unchanged by all this: one
//! extra comparison in `submit`, and the timeout states are only looked at in
//! the (rare) branches of a completion for a slot that is not `InFlight`.
//!
//! # Shadow doorbells
//!
//! An I/O queue pair created after Doorbell Buffer Config
//! ([`crate::Config::dbbuf`]) has four slots in the controller's Shadow
//! Doorbell and EventIdx pages (layout in [`crate::regs`]). Ringing a
//! doorbell is then (as Linux's `nvme_dbbuf_update_and_check_event`):
//!
//! ```text
//! write the new value to the shadow slot (volatile)
//! full fence (the controller writes the event index, then reads the shadow)
//! event_idx = the EventIdx slot (volatile: the controller writes it)
//! if need_event(event_idx, new, old): write the MMIO doorbell with `new`
//! need_event(e, new, old) = (u16)(new - e - 1) < (u16)(new - old)
//! ```
//!
//! The controller sets the SQ event index to the tail it has consumed up to
//! (QEMU: after each command, then it reads the shadow tail again), so the
//! MMIO write happens when it is idle at `old`, and is skipped while it is
//! still working through the queue and will see the new tail itself. For the
//! CQ it sets the event index to the head it last knew before reading the
//! shadow head. The formula errs only towards an extra MMIO write (also
//! across the ring's wrap, indices being taken modulo 2^16 while the ring
//! wraps at `entries`). The admin queue never uses shadow doorbells.
//!
//! The fence between the shadow store and the event index load is an
//! `mfence` instruction on x86_64, not `fence(SeqCst)` (which compiles to
//! `lock or`): QEMU's TCG with one virtual CPU translates a locked
//! instruction without any host barrier, while QEMU 8.1 and later keep
//! `mfence` as one. QEMU 7.2 drops both; there only the kick below helps.
//!
//! # Lost doorbells
//!
//! A doorbell can be lost: the shadow protocol above fails when the host
//! reorders the driver's shadow store after its event index load while the
//! controller, at the same moment, stores the event index and loads the
//! shadow tail (store buffering: both loads stale, see [`crate::sim`],
//! "Lost shadow doorbell updates"). The controller then stops at the old
//! tail with its event index there too, and the driver, whose later tails
//! lie beyond that event index, never writes MMIO again: the queue stalls
//! until a command's 5 s deadline. [`QueuePair::watch`], run once a
//! millisecond, looks for a queue that has commands in flight and completed
//! none for [`DEFAULT_KICK_NS`] (10 ms, over at least three looks), and writes its
//! SQ tail and CQ head through the MMIO doorbells once per stall (a *kick*):
//! the trap drains the store buffer and the controller re-reads the shadow
//! tail. A kick that found the controller's event index behind our tail and
//! is followed by completions *recovered* a lost doorbell: the controller is
//! told ([`crate::Controller::doorbell_lost`]) and, unless configured to
//! keep them, every queue of it writes every doorbell through MMIO from then
//! on (the shadow slots are still written: the controller reads them). A
//! command that is merely slow is kicked once, harmlessly (the controller
//! knows the values already), and the event index stays trusted. Only a
//! command that still does not complete reaches its deadline, the abort and
//! the reset.

use crate::cmd::{CompletionEntry, Status, SubmissionEntry};
use crate::error::NvmeError;
use crate::hal::{Dma, Hal, Mmio, PAGE_SIZE};
use alloc::boxed::Box;
use alloc::vec::Vec;
use core::ptr::{self, NonNull};
use core::sync::atomic::{fence, Ordering};
use dioxide_blk::FreeList;

/// PRP entries in one list page; one page per slot bounds a transfer to
/// `(PRP_LIST_ENTRIES + 1)` pages less the first page's offset.
const PRP_LIST_ENTRIES: usize = PAGE_SIZE / 8;

/// How long a queue with commands in flight may make no progress before
/// its doorbells are written again through MMIO ([`QueuePair::watch`]).
///
/// Measured under QEMU 7.2 TCG on a 2-core AMD EPYC guest host, 100,000 4K
/// reads at QD16 with shadow doorbells off (nothing can be lost): 3 ms
/// without a completion happened about 30 times, 20 ms twice (the emulator's
/// own stalls). A kick in such a stall is harmless; 10 ms keeps them rare
/// and still ends a real loss 500 times sooner than the command deadline.
pub const DEFAULT_KICK_NS: u64 = 10_000_000;

/// Looks in a row without progress before a kick: the time alone is not
/// enough when the CPU running the driver was itself not running (a
/// virtual CPU descheduled by its host sees its clock jump).
const KICK_LOOKS: u32 = 3;

/// Largest transfer a slot's single PRP list page can describe for any buffer
/// alignment: PRP1 covers the (partial) first page, the list 512 more pages.
pub const MAX_TRANSFER_PRP_LIST: usize = PRP_LIST_ENTRIES * PAGE_SIZE;

/// A data buffer for one command: the block layer's [`IoBuf`], taken as is
/// (no conversion between the DIO layer and the PRP builder).
///
/// The buffer must stay valid and must not be touched by the CPU from
/// submission until the command completes (or the controller is disabled).
pub use dioxide_blk::IoBuf as DataBuf;

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

/// What [`QueuePair::expire`] asks the caller to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expiry {
    /// Command `cid` passed its deadline and is now being aborted: send
    /// [`crate::Controller::abort`]`(qid, cid)`. Its owner hears nothing yet.
    Abort { qid: u16, cid: u16, opcode: u8 },
    /// Command `cid` was being aborted and passed the abort grace period too:
    /// the controller is not answering. Call [`crate::Controller::reset`] with
    /// this queue; until then the queue refuses new commands.
    ResetNeeded { qid: u16, cid: u16, opcode: u8 },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SlotState {
    Free,
    InFlight,
    /// Past its deadline, an abort requested; the owner waits on.
    Aborting,
    /// Past the abort grace period too; only a completion or a reset ends it.
    AwaitingReset,
    /// Timed out in [`QueuePair::wait`], whose caller already has its error:
    /// the id stays reserved until the controller completes it or is reset,
    /// because the device may still access the buffer.
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
    /// Commands that passed their deadline and were put to abort (`expire`).
    pub aborts: u64,
    /// Completions with status Command Abort Requested.
    pub aborted: u64,
    /// Commands failed by a controller reset (timed out or cancelled).
    pub reset_failed: u64,
    /// Controller resets that stopped this queue.
    pub resets: u64,
    /// MMIO doorbell writes (SQ tail and CQ head).
    pub doorbell_writes: u64,
    /// Doorbells given through the shadow doorbell slot only: the event
    /// index said the controller would see the new value by itself.
    pub doorbells_skipped: u64,
    /// Doorbells written again through MMIO because the queue's oldest
    /// command made no progress ([`QueuePair::watch`]).
    pub kicks: u64,
    /// Kicks after which the queue moved again although the controller had
    /// not fetched every submitted command before: a lost doorbell.
    pub recoveries: u64,
}

impl core::ops::AddAssign for QueueStats {
    /// Sums the counters of several queues (one namespace's, one per core).
    fn add_assign(&mut self, o: QueueStats) {
        let QueueStats {
            submitted,
            completed,
            errors,
            timeouts,
            spurious,
            late,
            aborts,
            aborted,
            reset_failed,
            resets,
            doorbell_writes,
            doorbells_skipped,
            kicks,
            recoveries,
        } = o;
        self.submitted += submitted;
        self.completed += completed;
        self.errors += errors;
        self.timeouts += timeouts;
        self.spurious += spurious;
        self.late += late;
        self.aborts += aborts;
        self.aborted += aborted;
        self.reset_failed += reset_failed;
        self.resets += resets;
        self.doorbell_writes += doorbell_writes;
        self.doorbells_skipped += doorbells_skipped;
        self.kicks += kicks;
        self.recoveries += recoveries;
    }
}

/// The progress watch of one queue ([`QueuePair::watch`]).
#[derive(Clone, Copy, Debug, Default)]
struct Watch {
    /// `stats.completed` at the last look.
    completed: u64,
    /// When the queue was last seen making progress (or idle).
    since: u64,
    /// Looks in a row that saw commands in flight and no completion.
    still: u32,
    /// The kick made in this stall, if any.
    kicked: Option<Kick>,
}

/// What a kick found ([`QueuePair::watch`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Kick {
    pub qid: u16,
    /// Commands in flight.
    pub in_flight: usize,
    /// How long the queue had made no progress, in nanoseconds.
    pub stalled_ns: u64,
    /// Our SQ tail, rewritten through MMIO.
    pub sq_tail: u16,
    /// The controller's SQ event index (the tail it consumed up to) with
    /// shadow doorbells; `None` without.
    pub sq_event_idx: Option<u16>,
    /// Our CQ head, rewritten through MMIO.
    pub cq_head: u16,
}

impl Kick {
    /// Whether the controller had not consumed every submitted command: it
    /// missed a tail update (a lost shadow doorbell).
    pub fn sq_lagged(&self) -> bool {
        self.sq_event_idx.is_some_and(|e| e != self.sq_tail)
    }
}

/// What [`QueuePair::watch`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Watched {
    /// The doorbells were written through MMIO: the queue had commands in
    /// flight and made no progress for the kick time.
    Kicked(Kick),
    /// The queue completed commands again after `Kick`, which found the
    /// controller behind our tail: a lost doorbell was recovered.
    Recovered(Kick),
}

/// Orders a store before a later load (module docs, "Shadow doorbells"):
/// `mfence` on x86_64, which QEMU's TCG (8.1 and later) keeps as a host
/// barrier where it drops the `lock or` of `fence(SeqCst)`.
#[inline(always)]
fn store_load_fence() {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `mfence` only orders memory accesses; it touches no memory,
    // stack or flags.
    unsafe {
        core::arch::asm!("mfence", options(nostack, preserves_flags));
    }
    #[cfg(not(target_arch = "x86_64"))]
    fence(Ordering::SeqCst);
}

/// Whether a doorbell must be written through MMIO after the shadow slot
/// moved from `old` to `new`, given the controller's event index (module
/// docs): the virtio/NVMe `need_event` test.
#[inline(always)]
pub fn need_event(event_idx: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event_idx).wrapping_sub(1) < new.wrapping_sub(old)
}

/// One queue pair's slots in the Shadow Doorbell and EventIdx pages.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Shadow {
    sq_db: NonNull<u32>,
    sq_ei: NonNull<u32>,
    cq_db: NonNull<u32>,
    cq_ei: NonNull<u32>,
}

// SAFETY: the slots point into the controller's doorbell buffer pages, which
// are never freed while the controller may use them (see `ctrl.rs`); each
// queue pair writes only its own slots, so moving it to another core moves
// the only writer.
unsafe impl Send for Shadow {}

impl Shadow {
    /// The slots of queue `qid` in the pages `shadow` and `event_idx`, or
    /// `None` when they do not fit one page.
    pub(crate) fn new(shadow: &Dma, event_idx: &Dma, qid: u16, stride: usize) -> Option<Self> {
        let sq = crate::regs::shadow_sq_offset(qid, stride);
        let cq = crate::regs::shadow_cq_offset(qid, stride);
        if cq + 4 > PAGE_SIZE.min(shadow.len).min(event_idx.len) {
            return None;
        }
        let at = |d: &Dma, off: usize| {
            // SAFETY: off + 4 <= the region's length (checked above), and the
            // offsets are multiples of 4 within page-aligned memory.
            NonNull::new(unsafe { d.virt.as_ptr().add(off) } as *mut u32)
        };
        Some(Shadow {
            sq_db: at(shadow, sq)?,
            sq_ei: at(event_idx, sq)?,
            cq_db: at(shadow, cq)?,
            cq_ei: at(event_idx, cq)?,
        })
    }
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
    /// Free command ids (the blk crate's stack of indices: low ids first).
    free: FreeList,
    timeout_ns: u64,
    /// How long an aborted command may take to complete before a reset.
    abort_grace_ns: u64,
    /// Slots `AwaitingReset` or `Abandoned`; submissions are refused while
    /// non-zero.
    wedged: u16,
    /// The controller is stopped or did not come back after a reset.
    down: bool,
    max_transfer: usize,
    vector: Option<u16>,
    /// Shadow doorbell slots, when the controller took a doorbell buffer.
    shadow: Option<Shadow>,
    /// The controller lost a shadow doorbell update once: the slots are
    /// still written (the controller reads them) but every doorbell also
    /// goes through MMIO, whatever the event index says.
    event_idx_distrusted: bool,
    /// No progress for this long with commands in flight: kick
    /// ([`QueuePair::watch`]); 0 never kicks.
    kick_after_ns: u64,
    watch: Watch,
    /// The controller's reset epoch when this queue was last created on it
    /// ([`crate::Controller::epoch`]).
    epoch: u64,
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
            free: FreeList::new(nslots),
            timeout_ns,
            abort_grace_ns: timeout_ns,
            wedged: 0,
            down: false,
            max_transfer: max_transfer.min(MAX_TRANSFER_PRP_LIST),
            vector,
            shadow: None,
            event_idx_distrusted: false,
            kick_after_ns: DEFAULT_KICK_NS,
            watch: Watch::default(),
            epoch: 0,
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
        self.free.used()
    }
    pub fn max_transfer(&self) -> usize {
        self.max_transfer
    }
    pub fn vector(&self) -> Option<u16> {
        self.vector
    }
    /// Whether doorbells go through the shadow doorbell buffer.
    pub fn shadow_doorbells(&self) -> bool {
        self.shadow.is_some()
    }
    /// The controller's reset epoch when this queue was last created on the
    /// device: when [`crate::Controller::epoch`] differs, the controller was
    /// stopped since and the queue no longer exists there
    /// ([`crate::Controller::rejoin`]).
    pub fn epoch(&self) -> u64 {
        self.epoch
    }
    pub(crate) fn set_epoch(&mut self, epoch: u64) {
        self.epoch = epoch;
    }
    pub(crate) fn set_shadow(&mut self, shadow: Option<Shadow>) {
        self.shadow = shadow;
    }
    /// Zeroes this queue's shadow doorbell and event index slots, so that
    /// the controller finds tail and head 0 when the queue is created.
    ///
    /// # Safety
    ///
    /// The queue does not exist on the controller (not created yet, deleted,
    /// or the controller was disabled since): nothing else writes these slots.
    pub(crate) unsafe fn clear_shadow(&mut self) {
        if let Some(s) = self.shadow {
            for p in [s.sq_db, s.sq_ei, s.cq_db, s.cq_ei] {
                // SAFETY: the slots lie within the live doorbell buffer pages
                // (Shadow::new), and by this function's contract nobody else
                // accesses them now.
                unsafe { ptr::write_volatile(p.as_ptr(), 0) };
            }
        }
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
    /// How long a command past its deadline may take to complete after
    /// [`Expiry::Abort`] before [`Expiry::ResetNeeded`], in nanoseconds.
    pub fn set_abort_grace_ns(&mut self, ns: u64) {
        self.abort_grace_ns = ns;
    }
    /// Whether the owner of `cid` still waits for its completion: in flight,
    /// being aborted, or awaiting a reset.
    pub fn is_in_flight(&self, cid: u16) -> bool {
        matches!(
            self.slots.get(cid as usize),
            Some(s) if matches!(
                s.state,
                SlotState::InFlight | SlotState::Aborting | SlotState::AwaitingReset
            )
        )
    }
    /// Whether the queue refuses new commands until a controller reset: a
    /// timed-out command may still own its buffer, or the controller is down.
    pub fn needs_reset(&self) -> bool {
        self.wedged != 0 || self.down
    }
    /// Whether the controller is stopped or did not come back after a reset.
    pub fn is_down(&self) -> bool {
        self.down
    }

    /// Submits one command and rings the doorbell.
    ///
    /// `tag` comes back in the [`Completion`]. Returns the command id.
    ///
    /// # Safety
    ///
    /// When `data` is given, the memory it names must stay valid, and must not
    /// be accessed by the CPU (reads: not at all; writes: not written) until the
    /// command's [`Completion`] was delivered (module docs), or — after
    /// `Err(Timeout)` from [`QueuePair::wait`] — until the controller was reset.
    pub unsafe fn submit(
        &mut self,
        mut cmd: SubmissionEntry,
        data: Option<DataBuf>,
        tag: u64,
    ) -> Result<u16, NvmeError> {
        if self.wedged != 0 || self.down {
            return Err(self.refusal());
        }
        let Some(cid) = self.free.take() else {
            return Err(NvmeError::QueueFull);
        };
        // Without a data buffer the command's own PRP1 stands (queue creation
        // carries the queue's base address there).
        if let Some(buf) = data {
            if let Err(e) = self.build_prps(&mut cmd, buf, cid) {
                // Back on top of the stack: the next command gets the same id.
                self.free.give(cid);
                return Err(e);
            }
        }
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
        let old = self.sq_tail;
        self.sq_tail = (self.sq_tail + 1) % self.entries;
        // The entry (and the PRP list) must be visible to the device before the
        // doorbell write (shadow or MMIO) that tells it to fetch them.
        fence(Ordering::SeqCst);
        self.ring_sq(old);
        self.stats.submitted += 1;
        Ok(cid)
    }

    /// Tells the controller of the new SQ tail (was `old`): through the
    /// shadow slot, and MMIO when the event index asks for it (module docs).
    #[inline(always)]
    fn ring_sq(&mut self, old: u16) {
        let new = self.sq_tail;
        if let Some(s) = self.shadow {
            // SAFETY: our own slots in the live doorbell buffer pages
            // (Shadow); the controller writes the event index concurrently,
            // hence volatile accesses of whole aligned dwords.
            let event_idx = unsafe {
                ptr::write_volatile(s.sq_db.as_ptr(), new as u32);
                // The shadow tail must be visible before the event index is
                // read: the controller writes the event index, then reads the
                // shadow tail; one of us sees the other's write.
                store_load_fence();
                ptr::read_volatile(s.sq_ei.as_ptr())
            };
            if !self.event_idx_distrusted && !need_event(event_idx as u16, new, old) {
                self.stats.doorbells_skipped += 1;
                return;
            }
        }
        self.mmio.write32(self.sq_doorbell, new as u32);
        self.stats.doorbell_writes += 1;
    }

    /// Tells the controller of the new CQ head (was `old`), as
    /// [`QueuePair::ring_sq`].
    #[inline(always)]
    fn ring_cq(&mut self, old: u16) {
        let new = self.cq_head;
        if let Some(s) = self.shadow {
            // The completion entries were read before the head that frees
            // them is published.
            fence(Ordering::Release);
            // SAFETY: as in ring_sq.
            let event_idx = unsafe {
                ptr::write_volatile(s.cq_db.as_ptr(), new as u32);
                store_load_fence();
                ptr::read_volatile(s.cq_ei.as_ptr())
            };
            if !self.event_idx_distrusted && !need_event(event_idx as u16, new, old) {
                self.stats.doorbells_skipped += 1;
                return;
            }
        }
        self.mmio.write32(self.cq_doorbell, new as u32);
        self.stats.doorbell_writes += 1;
    }

    #[cold]
    fn refusal(&self) -> NvmeError {
        if self.down {
            NvmeError::ControllerDown { qid: self.qid }
        } else {
            NvmeError::ResetRequired { qid: self.qid }
        }
    }

    fn build_prps(
        &mut self,
        cmd: &mut SubmissionEntry,
        buf: DataBuf,
        cid: u16,
    ) -> Result<(), NvmeError> {
        if buf.is_empty() || buf.len() > self.max_transfer || !buf.addr().is_multiple_of(4) {
            return Err(NvmeError::BadBuffer {
                len: buf.len(),
                max: self.max_transfer,
            });
        }
        let offset = buf.addr() % PAGE_SIZE;
        let first = buf.len().min(PAGE_SIZE - offset);
        cmd.prp1 = self.hal.virt_to_phys(buf.addr());
        let rest = buf.len() - first;
        let next = buf.addr() + first;
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
        let old = self.cq_head;
        let n = self.reap(&mut on_done);
        if n > 0 {
            self.ring_cq(old);
        }
        n
    }

    /// Consumes the new completion entries without telling the controller.
    #[inline(always)]
    fn reap(&mut self, on_done: &mut impl FnMut(Completion)) -> usize {
        let base = self.cq.virt.as_ptr() as *const CompletionEntry;
        let mut n = 0;
        loop {
            // SAFETY: cq_head < entries; the CQ region holds `entries` entries.
            let entry = unsafe { base.add(self.cq_head as usize) };
            // SAFETY: `entry` points at entry cq_head < entries of the CQ
            // region, which this queue owns for its life; the status word is
            // read first, volatile, because the device writes it.
            let status = unsafe { ptr::read_volatile(ptr::addr_of!((*entry).status)) };
            if (status & 1 != 0) != self.phase {
                break;
            }
            // The rest of the entry was written before the phase bit.
            fence(Ordering::Acquire);
            // SAFETY: the same in-bounds entry, complete now (its phase bit
            // matched and the fence orders the rest after it); volatile
            // because the device wrote it.
            let cqe = unsafe { ptr::read_volatile(entry) };
            self.cq_head += 1;
            if self.cq_head == self.entries {
                self.cq_head = 0;
                self.phase = !self.phase;
            }
            self.sq_head = cqe.sq_head;
            n += 1;
            self.complete_one(cqe, on_done);
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
            SlotState::Aborting | SlotState::AwaitingReset => {
                // The device is done with the buffer: the owner gets the
                // outcome now, whatever it is.
                if slot.state == SlotState::AwaitingReset {
                    self.wedged -= 1;
                }
                self.stats.late += 1;
                log::warn!(target: "nvme", "queue {}: cid {} completed after its deadline", self.qid, cid);
            }
            SlotState::Abandoned => {
                slot.state = SlotState::Free;
                self.free.give(cid);
                self.wedged -= 1;
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
        self.free.give(cid);
        self.stats.completed += 1;
        let status: Status = cqe.status();
        let result = if status.is_success() {
            Ok(cqe.dw0)
        } else {
            Err(self.command_error(cid, opcode, status))
        };
        on_done(Completion {
            cid,
            tag,
            opcode,
            result,
        });
    }

    #[cold]
    fn command_error(&mut self, cid: u16, opcode: u8, status: Status) -> NvmeError {
        self.stats.errors += 1;
        let qid = self.qid;
        if status.is_abort_requested() {
            self.stats.aborted += 1;
            NvmeError::Aborted { qid, cid, opcode }
        } else {
            NvmeError::Command {
                qid,
                opcode,
                status,
            }
        }
    }

    /// Advances the timeout state machine (module docs) of one command whose
    /// deadline is `<= now`, and says what the caller must do about it; `None`
    /// when no command is overdue. Call it until it returns `None`:
    ///
    /// - [`Expiry::Abort`]: the command is now `Aborting` with a new deadline
    ///   `now + abort grace`; send [`crate::Controller::abort`]. Its owner
    ///   gets its completion later, from `process_completions` or a reset.
    /// - [`Expiry::ResetNeeded`] (once per command): the controller did not
    ///   answer; the queue refuses new commands until
    ///   [`crate::Controller::reset`] ran.
    ///
    /// Never delivers a completion. Looks at every slot: for the slow path
    /// (a timer), not for every completion.
    pub fn expire(&mut self, now: u64) -> Option<Expiry> {
        let qid = self.qid;
        let (index, slot) = self.slots.iter_mut().enumerate().find(|(_, s)| {
            matches!(s.state, SlotState::InFlight | SlotState::Aborting) && s.deadline <= now
        })?;
        let (cid, opcode) = (index as u16, slot.opcode);
        if slot.state == SlotState::InFlight {
            slot.state = SlotState::Aborting;
            slot.deadline = now.saturating_add(self.abort_grace_ns);
            self.stats.timeouts += 1;
            self.stats.aborts += 1;
            log::error!(target: "nvme", "queue {qid}: cid {cid} opcode {opcode:#04x} timed out, aborting");
            Some(Expiry::Abort { qid, cid, opcode })
        } else {
            slot.state = SlotState::AwaitingReset;
            self.wedged += 1;
            log::error!(target: "nvme", "queue {qid}: cid {cid} opcode {opcode:#04x} not aborted in time, controller reset needed");
            Some(Expiry::ResetNeeded { qid, cid, opcode })
        }
    }

    /// The earliest deadline of the commands in flight or being aborted: when
    /// [`QueuePair::expire`] has something to do next.
    pub fn next_deadline(&self) -> Option<u64> {
        self.slots
            .iter()
            .filter(|s| matches!(s.state, SlotState::InFlight | SlotState::Aborting))
            .map(|s| s.deadline)
            .min()
    }

    /// Watches the queue's progress; call it at a steady pace (the kernel:
    /// once a millisecond, with [`QueuePair::expire`]). When commands are in
    /// flight and none completed for the kick time (and
    /// [`KICK_LOOKS`] looks in a row), writes the SQ tail and the CQ head
    /// through the MMIO doorbells, once per stall: a controller that missed
    /// a doorbell (a lost shadow doorbell update, a lost MMIO write) then
    /// fetches what it missed. A write of values the controller already
    /// knows changes nothing. When the queue completes commands again after
    /// a kick that found the controller behind our tail, the kick recovered
    /// a lost doorbell ([`Watched::Recovered`]): the caller should stop
    /// trusting the event index ([`QueuePair::distrust_event_idx`]). Module
    /// docs, "Lost doorbells".
    pub fn watch(&mut self, now: u64) -> Option<Watched> {
        let completed = self.stats.completed;
        if completed != self.watch.completed || self.in_flight() == 0 {
            let kicked = self.watch.kicked.take();
            let moved = completed != self.watch.completed;
            self.watch = Watch {
                completed,
                since: now,
                still: 0,
                kicked: None,
            };
            return match kicked {
                Some(k) if moved && k.sq_lagged() => {
                    self.stats.recoveries += 1;
                    Some(Watched::Recovered(k))
                }
                _ => None,
            };
        }
        if self.watch.since == 0 {
            // The first look since the queue was made.
            self.watch.since = now;
        }
        self.watch.still = self.watch.still.saturating_add(1);
        let stalled_ns = now.saturating_sub(self.watch.since);
        if self.kick_after_ns == 0
            || self.watch.kicked.is_some()
            || self.watch.still < KICK_LOOKS
            || stalled_ns < self.kick_after_ns
        {
            return None;
        }
        let kick = self.kick(stalled_ns);
        self.watch.kicked = Some(kick);
        Some(Watched::Kicked(kick))
    }

    /// Writes the SQ tail and the CQ head through MMIO ([`QueuePair::watch`]).
    #[cold]
    fn kick(&mut self, stalled_ns: u64) -> Kick {
        let sq_event_idx = self.shadow.map(|s| {
            // SAFETY: our own slot in the live event index page (Shadow);
            // the controller writes it, hence volatile.
            unsafe { ptr::read_volatile(s.sq_ei.as_ptr()) as u16 }
        });
        // Whatever the shadow slots hold was written before (ring_sq's
        // fence); the MMIO writes follow it.
        fence(Ordering::SeqCst);
        self.mmio.write32(self.sq_doorbell, self.sq_tail as u32);
        self.mmio.write32(self.cq_doorbell, self.cq_head as u32);
        self.stats.doorbell_writes += 2;
        self.stats.kicks += 1;
        Kick {
            qid: self.qid,
            in_flight: self.in_flight(),
            stalled_ns,
            sq_tail: self.sq_tail,
            sq_event_idx,
            cq_head: self.cq_head,
        }
    }

    /// Sets how long the queue may make no progress before
    /// [`QueuePair::watch`] kicks it; 0 never kicks.
    pub fn set_kick_after_ns(&mut self, ns: u64) {
        self.kick_after_ns = ns;
    }

    /// From now on every doorbell also goes through MMIO, whatever the
    /// controller's event index says (it lost an update once). The shadow
    /// slots are still written: the controller reads them.
    pub fn distrust_event_idx(&mut self) {
        self.event_idx_distrusted = true;
    }

    /// Whether [`QueuePair::distrust_event_idx`] was called.
    pub fn event_idx_distrusted(&self) -> bool {
        self.event_idx_distrusted
    }

    /// Polls until command `cid` completes or passes its deadline. Completions
    /// of other commands found meanwhile go to `others`.
    ///
    /// On `Err(Timeout)` the command is `Abandoned`: the device may still
    /// access its buffer, so the caller must not touch or free that buffer
    /// until the controller was reset ([`crate::Controller::reset`]) or until
    /// [`QueuePair::needs_reset`] is false again (a late completion came). The
    /// queue refuses new commands meanwhile.
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
                self.wedged += 1;
                self.stats.timeouts += 1;
                log::error!(target: "nvme", "queue {}: cid {cid} opcode {:#04x} timed out, controller reset needed", self.qid, slot.opcode);
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
    /// self-tests): other completions are logged and dropped.
    ///
    /// # Safety
    ///
    /// As [`QueuePair::submit`]; in particular after `Err(Timeout)` the buffer
    /// still belongs to the device (see [`QueuePair::wait`]).
    pub unsafe fn execute(
        &mut self,
        cmd: SubmissionEntry,
        data: Option<DataBuf>,
    ) -> Result<u32, NvmeError> {
        // SAFETY: our caller guarantees what `submit` needs (`data` valid
        // and untouched until the completion, or the reset after a
        // timeout); we wait for that completion below.
        let cid = unsafe { self.submit(cmd, data, 0)? };
        let qid = self.qid;
        self.wait(
            cid,
            |c| log::warn!(target: "nvme", "queue {qid}: unexpected completion of cid {}", c.cid),
        )
    }

    /// Delivers every command whose owner still waits, exactly once, then
    /// rewinds the rings and leaves the queue *down* (refusing new commands)
    /// until it is created on the controller again. Completion entries the
    /// controller posted before it stopped are delivered with their real
    /// outcome; every other command fails with [`NvmeError::Timeout`] when it
    /// was past its deadline, else with [`NvmeError::Cancelled`]. `Abandoned`
    /// commands (whose caller already has its error) are freed silently.
    /// Returns how many completions were delivered.
    ///
    /// [`crate::Controller::reset`] calls this; call it directly only when
    /// the controller cannot be reset but is known to be quiet.
    ///
    /// # Safety
    ///
    /// The controller no longer accesses this queue's rings or any of its
    /// commands' buffers: CSTS.RDY was seen 0 after CC.EN was cleared, or bus
    /// mastering of the device was turned off in its PCI command register.
    pub unsafe fn cancel_all(&mut self, mut on_done: impl FnMut(Completion)) -> usize {
        // No doorbell: the controller is stopped.
        let mut n = self.reap(&mut on_done);
        let now = self.hal.now_ns();
        let qid = self.qid;
        for (index, slot) in self.slots.iter_mut().enumerate() {
            let overdue = match slot.state {
                SlotState::Free => continue,
                SlotState::Abandoned => {
                    slot.state = SlotState::Free;
                    continue;
                }
                SlotState::InFlight => slot.deadline <= now,
                SlotState::Aborting | SlotState::AwaitingReset => true,
            };
            slot.state = SlotState::Free;
            let (cid, opcode) = (index as u16, slot.opcode);
            let error = if overdue {
                NvmeError::Timeout { qid, cid, opcode }
            } else {
                NvmeError::Cancelled { qid, cid, opcode }
            };
            self.stats.reset_failed += 1;
            n += 1;
            on_done(Completion {
                cid,
                tag: slot.tag,
                opcode,
                result: Err(error),
            });
        }
        self.stats.resets += 1;
        // SAFETY: as this function's contract: the controller is quiet.
        unsafe { self.reset_rings() };
        self.down = true;
        n
    }

    /// Marks the queue down: the controller is stopped or gone.
    pub(crate) fn set_down(&mut self) {
        self.down = true;
    }

    /// Marks the queue usable again: it exists on an enabled controller.
    pub(crate) fn set_up(&mut self) {
        self.down = false;
    }

    /// Forgets every command and rewinds the rings.
    ///
    /// # Safety
    ///
    /// The controller no longer accesses the rings or the commands' buffers
    /// (it was disabled, or the queue deleted).
    pub(crate) unsafe fn reset_rings(&mut self) {
        self.sq_tail = 0;
        self.sq_head = 0;
        self.cq_head = 0;
        self.phase = true;
        // SAFETY: the CQ region is `cq.len` bytes of our DMA memory, and by
        // this function's contract the controller no longer writes it.
        unsafe { ptr::write_bytes(self.cq.virt.as_ptr(), 0, self.cq.len) };
        for slot in self.slots.iter_mut() {
            slot.state = SlotState::Free;
        }
        self.free.reset();
        self.wedged = 0;
    }
}
