//! A lock for data shared with an interrupt handler.
//!
//! [`IrqMutex::lock`] turns interrupts off before taking the lock and its
//! guard restores them (if they were on) only after releasing it. So while
//! the main line holds the lock no interrupt handler can run on this core,
//! and a handler that takes the same lock cannot spin for ever on a holder
//! it interrupted. The type says it, rather than each call site
//! remembering to wrap the lock in `without_interrupts` (hermit's
//! `InterruptTicketMutex` is the model).
//!
//! With several CPUs (`smp`) the lock is also a spin lock between them:
//! a CPU that wants it while another holds it spins, with its own
//! interrupts off, until the holder releases it. That cannot deadlock
//! either: the holder runs with interrupts off too, so nothing on its CPU
//! can stop it from finishing (as long as no holder waits for another CPU
//! while holding it, and locks nested inside each other are always taken
//! in the same order). Keep critical sections short: they delay interrupts
//! on two CPUs. Data used by one CPU only (one engine per core) makes the
//! lock uncontended again.

use core::mem::ManuallyDrop;
use core::ops::{Deref, DerefMut};
use x86_64::instructions::interrupts;

pub struct IrqMutex<T> {
    inner: spin::Mutex<T>,
}

pub struct IrqMutexGuard<'a, T> {
    guard: ManuallyDrop<spin::MutexGuard<'a, T>>,
    /// Interrupts were on when the lock was taken: turn them back on after
    /// releasing it.
    were_enabled: bool,
}

impl<T> IrqMutex<T> {
    pub const fn new(v: T) -> Self {
        IrqMutex {
            inner: spin::Mutex::new(v),
        }
    }

    /// Turns interrupts off, then takes the lock; both last as long as the
    /// guard.
    pub fn lock(&self) -> IrqMutexGuard<'_, T> {
        let were_enabled = interrupts::are_enabled();
        interrupts::disable();
        IrqMutexGuard {
            guard: ManuallyDrop::new(self.inner.lock()),
            were_enabled,
        }
    }
}

impl<T> Deref for IrqMutexGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.guard
    }
}

impl<T> DerefMut for IrqMutexGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.guard
    }
}

impl<T> Drop for IrqMutexGuard<'_, T> {
    fn drop(&mut self) {
        // SAFETY: `guard` is dropped exactly once, here, and never used
        // after (this is the guard's own drop).
        unsafe { ManuallyDrop::drop(&mut self.guard) };
        // Only after the lock is released: an interrupt taken now finds it
        // free.
        if self.were_enabled {
            interrupts::enable();
        }
    }
}
