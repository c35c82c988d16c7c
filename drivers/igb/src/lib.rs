//! The Intel igb Ethernet driver for dioxide: the 82576 as QEMU emulates it
//! (`-device igb`, PCI 8086:10C9) and the 82576/I350 class on servers.
//!
//! `no_std` + `alloc`; hardware is reached only through [`hal::Hal`] (DMA
//! memory, time) and [`hal::Mmio`] (BAR0), so the same code runs in the
//! kernel and, on the host, against the register-level software 82576 in
//! [`model`].
//!
//! - [`Igb::new`]: global reset with a deadline, station address
//!   (RAL0/RAH0), link (SLU, PHY auto-negotiation through MDIC, STATUS),
//!   MSI-X (GPIE before IVAR; queue pair `i` on vector `i`, link on vector
//!   `queues`; EIAC/EIAM auto-clear and auto-mask; EITR moderation), queue
//!   pairs, RSS (MRQC, RETA over the queues, Microsoft's key in RSSRK,
//!   RXCSUM.PCSD), receive checksum offload; returns the device and one
//!   [`Queue`] per core.
//! - [`Queue`]: a receive ring ([`rx::RxQueue`], advanced one-buffer
//!   descriptors, frames lent in place) and a transmit ring
//!   ([`tx::TxQueue`], context + data descriptors, checksum offload and
//!   TSO from 64 KiB buffers set aside at start), implementing
//!   `dioxide_nic::QueuePair`; `Send`, so each moves to its core; its
//!   interrupt unmasked and masked by [`Queue::enable_irq`] and
//!   [`Queue::disable_irq`].
//! - [`rss::toeplitz`], [`desc`] (descriptor layouts with golden bytes),
//!   [`regs`] (the datasheet's names).
//!
//! Facts checked while writing it (QEMU 10's `hw/net/igb_core.c`,
//! `igb_core.h`, `igb_regs.h`, `e1000x_common.c`; Linux's igb):
//!
//! - QEMU's igb has 16 queues (`IGB_NUM_QUEUES`) and 10 MSI-X vectors
//!   (`IGB_MSIX_VEC_NUM`): held. This driver sets up at most 8 queue
//!   pairs ([`MAX_QUEUES`]): 8 + 1 link vector fit in 10, as in Linux.
//! - QEMU writes receive descriptors back only in the advanced format:
//!   held (`igb_rx_use_legacy_descriptor` returns false, with a TODO for
//!   SRRCTL.DESCTYPE 000b); header-split types are honoured, other
//!   replication types fall back to one buffer.
//! - QEMU computes RSS only with RXCSUM.PCSD set: held (`igb_rss_enabled`
//!   needs MRQC bits 2:0 = 010b, PCSD, and advanced descriptors); the hash
//!   lands in the descriptor only with PCSD too. With PCSD the checksum
//!   status bits (IPCS, L4I, UDPCS, IPE, L4E) are still written.
//! - Linux's igb writes GPIE (MSI-X mode) before IVAR "or our settings
//!   won't stick": held for Linux (`igb_configure_msix`), and this driver
//!   does the same; but QEMU stores IVAR whatever GPIE holds (a plain
//!   register write) and reads it when a queue raises its cause. What QEMU
//!   does drop without MSI-X mode are EIAC writes (`igb_set_eiac`), and
//!   EIMS/EIMC/EICS/EICR writes are masked to the legacy bits; so the order
//!   matters on QEMU too, for EIAC. The [`model`] refuses IVAR writes
//!   before GPIE.MSIX_MODE, as the datasheet's hardware is said to.
//! - Also found: QEMU's software reset clears STATUS.LU and the link comes
//!   back only 500 ms (virtual) after the PHY's auto-negotiation is
//!   restarted through MDIC (BMCR.ANRESTART): CTRL.SLU alone does nothing
//!   there, so the MDIC restart is needed, not just tolerated. QEMU
//!   receives nothing while STATUS.LU is clear. QEMU never sets
//!   EECD.AUTO_RD. QEMU's CTRL.RST completes at once. Without RCTL.SECRC
//!   QEMU appends 4 zero bytes for the FCS. QEMU recomputes transmitted
//!   TCP/UDP checksums from scratch (the pseudo-header sum the datasheet
//!   asks the driver for is ignored there).
#![cfg_attr(not(any(test, feature = "model")), no_std)]
#![deny(clippy::undocumented_unsafe_blocks)]

extern crate alloc;

pub mod desc;
pub mod device;
pub mod error;
pub mod hal;
#[cfg(any(test, feature = "model"))]
pub mod model;
pub mod offload;
pub mod queue;
pub mod regs;
mod ring;
pub mod rss;
pub mod rx;
#[cfg(test)]
mod tests;
pub mod tx;

pub use device::{Config, Igb, Stats, MAX_QUEUES};
pub use dioxide_nic::{Caps, Counters, Link, QueuePair, RxCsum, RxFrame, RxRing, TxMeta, TxRing};
pub use error::Error;
pub use hal::{Dma, Hal, Mmio, PAGE_SIZE};
pub use queue::Queue;
