//! One controller shared by several I/O queue pairs, each owned by one core.
//!
//! The kernel creates one queue pair per core ([`Controller::create_io_queues`]:
//! queue `qid` with MSI-X table entry `qid`), gives each to that core's DIO
//! engine as an [`crate::blk::NvmeQueue`] with the same
//! `Arc<SharedController>` ([`crate::blk::NvmeQueue::with_controller`]), and
//! polls or interrupts each queue on its own core only.
//!
//! # Protocol
//!
//! - The hot path takes no lock: submitting and reaping touch only the
//!   core's own queue pair (its rings, its doorbells, its shadow doorbell
//!   slots). `NvmeQueue::poll` adds one atomic load, of the controller's
//!   reset *epoch*.
//! - The controller (admin queue, registers, reset) sits behind a spin lock,
//!   taken only on the slow path: Abort of a command past its deadline, a
//!   reset, a queue's rejoin, set-up and shutdown. [`SharedController::lock`]
//!   returns a guard that publishes the controller's epoch and state to the
//!   atomics when dropped, so whatever is done under the lock is seen by the
//!   other queues.
//! - A reset is made by the queue that needs it (a command past its
//!   deadline whose abort went unanswered, a failed Abort, a wedged admin
//!   queue), once, under the lock: [`Controller::reset`] with only that
//!   queue. It disables the controller (CC.EN = 0, CSTS.RDY = 0 within
//!   CAP.TO), fails that queue's waiting commands exactly once, re-enables
//!   the controller, gives it the doorbell buffer again, re-creates that
//!   queue, and increments the epoch.
//! - Every other queue notices the new epoch on its next `poll` (one atomic
//!   load; the rejoin there uses `try_lock`, so an interrupt handler never
//!   spins) or `expire` (locks): under the lock it fails its waiting
//!   commands exactly once and re-creates itself ([`Controller::rejoin`]).
//!   That is safe without asking the device: the epoch moves only after the
//!   controller was seen stopped, so the device dropped the old queue and
//!   every command in it, and nobody but the queue's owner creates it
//!   again. Commands submitted between the reset and the rejoin were never
//!   seen by the device (its queue did not exist) and fail as cancelled.
//! - A queue that wants a reset checks the epoch under the lock first: if
//!   another queue reset the controller meanwhile, it rejoins instead (its
//!   own overdue commands are failed by that), and resets only if the
//!   controller still needs it.
//! - If a reset cannot stop the controller, nothing is failed (the device
//!   may still write into every buffer): the controller is *halted*, and
//!   every queue refuses new commands ([`NvmeError::ControllerDown`]) from
//!   its next `expire` on, keeping its commands until a later reset stops
//!   the controller.
//! - Lock order: a core's engine lock (interrupts off in the kernel), then
//!   this lock; nothing else is taken under it. Whoever takes it outside an
//!   engine (set-up, shutdown) must do so with interrupts off on that core,
//!   or before the queues' interrupts are routed: a handler's `poll` only
//!   tries the lock, but a spinning holder must not be interrupted for long.

use crate::ctrl::Controller;
use crate::error::NvmeError;
use crate::hal::{Hal, Mmio};
use crate::queue::{Completion, QueuePair};
use core::ops::{Deref, DerefMut};
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// A controller shared by the queue pairs of several cores (module docs).
pub struct SharedController<H: Hal, M: Mmio> {
    ctrl: spin::Mutex<Controller<H, M>>,
    /// [`Controller::epoch`] as of the last unlock.
    epoch: AtomicU64,
    /// [`Controller::needs_reset`] as of the last unlock.
    needs_reset: AtomicBool,
    /// [`Controller::is_halted`] as of the last unlock.
    halted: AtomicBool,
    /// [`Controller::event_idx_distrusted`] as of the last unlock.
    event_idx_distrusted: AtomicBool,
}

/// The locked controller; publishes its epoch and state when dropped.
pub struct ControllerGuard<'a, H: Hal, M: Mmio> {
    guard: spin::MutexGuard<'a, Controller<H, M>>,
    shared: &'a SharedController<H, M>,
}

impl<H: Hal, M: Mmio> Deref for ControllerGuard<'_, H, M> {
    type Target = Controller<H, M>;
    fn deref(&self) -> &Controller<H, M> {
        &self.guard
    }
}

impl<H: Hal, M: Mmio> DerefMut for ControllerGuard<'_, H, M> {
    fn deref_mut(&mut self) -> &mut Controller<H, M> {
        &mut self.guard
    }
}

impl<H: Hal, M: Mmio> Drop for ControllerGuard<'_, H, M> {
    fn drop(&mut self) {
        self.shared.publish(&self.guard);
    }
}

impl<H: Hal, M: Mmio> SharedController<H, M> {
    pub fn new(ctrl: Controller<H, M>) -> Self {
        SharedController {
            epoch: AtomicU64::new(ctrl.epoch()),
            needs_reset: AtomicBool::new(ctrl.needs_reset()),
            halted: AtomicBool::new(ctrl.is_halted()),
            event_idx_distrusted: AtomicBool::new(ctrl.event_idx_distrusted()),
            ctrl: spin::Mutex::new(ctrl),
        }
    }

    fn publish(&self, ctrl: &Controller<H, M>) {
        self.needs_reset
            .store(ctrl.needs_reset(), Ordering::Relaxed);
        self.halted.store(ctrl.is_halted(), Ordering::Relaxed);
        self.event_idx_distrusted
            .store(ctrl.event_idx_distrusted(), Ordering::Relaxed);
        // Release: a queue that sees the new epoch sees the rest too.
        self.epoch.store(ctrl.epoch(), Ordering::Release);
    }

    /// Locks the controller (spins). For set-up (namespaces, queue
    /// creation), statistics and shutdown; queues use it for Abort, reset
    /// and rejoin.
    pub fn lock(&self) -> ControllerGuard<'_, H, M> {
        ControllerGuard {
            guard: self.ctrl.lock(),
            shared: self,
        }
    }

    /// Locks the controller if nobody holds it.
    pub fn try_lock(&self) -> Option<ControllerGuard<'_, H, M>> {
        Some(ControllerGuard {
            guard: self.ctrl.try_lock()?,
            shared: self,
        })
    }

    /// The controller's reset epoch: a queue whose [`QueuePair::epoch`]
    /// differs must rejoin. One atomic load.
    #[inline(always)]
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// Whether the admin queue refuses commands until a reset.
    pub fn needs_reset(&self) -> bool {
        self.needs_reset.load(Ordering::Relaxed)
    }

    /// Whether the last reset could not stop the controller.
    pub fn is_halted(&self) -> bool {
        self.halted.load(Ordering::Relaxed)
    }

    /// Whether the queues must write every doorbell through MMIO: the
    /// controller lost a shadow doorbell update ([`Controller::doorbell_lost`]).
    pub fn event_idx_distrusted(&self) -> bool {
        self.event_idx_distrusted.load(Ordering::Relaxed)
    }

    /// Creates I/O queue pair `qid` (see [`Controller::create_io_queue`]).
    pub fn create_io_queue(
        &self,
        qid: u16,
        entries: u16,
        vector: Option<u16>,
    ) -> Result<QueuePair<H, M>, NvmeError> {
        self.lock().create_io_queue(qid, entries, vector)
    }

    /// Normal shutdown (CC.SHN), then disable: before power-off. Other
    /// cores' queues must not be used afterwards.
    pub fn shutdown(&self) -> Result<(), NvmeError> {
        self.lock().shutdown()
    }

    /// Rejoins `qp` if the controller was reset since it was created
    /// ([`Controller::rejoin`]), or marks it down if the controller is
    /// halted; `blocking == false` gives up (returns `None`) when the lock
    /// is taken. Returns how many commands were failed.
    pub fn catch_up(
        &self,
        qp: &mut QueuePair<H, M>,
        blocking: bool,
        on_done: impl FnMut(Completion),
    ) -> Option<Result<usize, NvmeError>> {
        let mut ctrl = if blocking {
            self.lock()
        } else {
            self.try_lock()?
        };
        Some(catch_up_locked(&mut ctrl, qp, on_done))
    }
}

/// [`SharedController::catch_up`] with the lock held.
pub(crate) fn catch_up_locked<H: Hal, M: Mmio>(
    ctrl: &mut Controller<H, M>,
    qp: &mut QueuePair<H, M>,
    on_done: impl FnMut(Completion),
) -> Result<usize, NvmeError> {
    let qid = qp.qid();
    if qp.epoch() == ctrl.epoch() {
        if ctrl.is_halted() && !qp.is_down() {
            // The controller could not be stopped: keep every command with
            // it, refuse new ones.
            qp.set_down();
            log::error!(target: "nvme", "queue {qid}: controller could not be stopped, refusing commands");
        }
        return Ok(0);
    }
    let r = ctrl.rejoin(qp, on_done);
    match r {
        Ok(n) => log::warn!(
            target: "nvme",
            "queue {qid}: controller was reset (epoch {}): {n} command(s) failed, queue re-created, serving again",
            ctrl.epoch()
        ),
        Err(e) => {
            log::error!(target: "nvme", "queue {qid}: not re-created after the controller reset: {e}")
        }
    }
    r
}
