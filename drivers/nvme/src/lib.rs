//! A native NVMe driver for dioxide.
//!
//! `no_std` + `alloc`; hardware is reached only through [`hal::Hal`] (DMA
//! memory, time) and [`hal::Mmio`] (the register block), so the same code runs
//! in the kernel and against the simulated controller in [`sim`] on the host.
//!
//! - [`ctrl::Controller`]: reset/enable bounded by CAP.TO, admin queue,
//!   Identify (controller, active namespaces with a scan fallback,
//!   namespaces without metadata), Set Features (number of queues), I/O
//!   queue creation, Doorbell Buffer Config (shadow doorbells).
//! - [`queue::QueuePair`]: submission with PRP1/PRP2/PRP lists, command ids
//!   indexing a fixed slot table (no allocation per command), phase-bit
//!   completion processing usable from a poll loop or an interrupt handler,
//!   per-command deadlines with a timeout state machine (abort, then reset)
//!   that never hands a buffer back while the device may still use it.
//! - [`ctrl::Controller`] also runs Abort and controller reset.
//! - [`shared::SharedController`]: one controller shared by the I/O queue
//!   pairs of several cores (a lock for the slow path, an atomic reset epoch
//!   that each queue checks when it polls); resets and rejoins.
//! - [`blk::NvmeQueue`]: an I/O queue pair (with the shared controller, for
//!   aborts and resets) as the block layer's `BlockQueue`.
//! - [`cmd`]: entry layouts, command builders, status codes with names.
#![cfg_attr(not(any(test, feature = "sim")), no_std)]
#![deny(clippy::undocumented_unsafe_blocks)]

extern crate alloc;

pub mod blk;
pub mod cmd;
pub mod ctrl;
#[cfg(test)]
mod dio_tests;
pub mod error;
pub mod hal;
pub mod identify;
#[cfg(test)]
mod mq_tests;
pub mod queue;
pub mod regs;
pub mod shared;
#[cfg(any(test, feature = "sim"))]
pub mod sim;
#[cfg(test)]
mod tests;

pub use cmd::{Status, SubmissionEntry};
pub use ctrl::{Config, Controller, ControllerStats};
pub use error::NvmeError;
pub use hal::{Dma, Hal, Mmio, PAGE_SIZE};
pub use identify::{ControllerInfo, Namespace};
pub use queue::{
    Completion, DataBuf, Expiry, Kick, QueuePair, QueueStats, Watched, DEFAULT_KICK_NS,
};
pub use shared::{ControllerGuard, SharedController};
