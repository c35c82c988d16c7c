//! The block layer's contracts, shared by the layers above and below it.
//!
//! - [`BlockQueue`], [`Op`]: what the direct-I/O layer (`dioxide-iomap`)
//!   submits to. The NVMe driver implements it (`dioxide_nvme::blk`), and so
//!   does the [`null`] device here.
//! - [`IoBuf`]: the one description of a DMA data buffer (a non-null CPU
//!   pointer and a length), taken unchanged from the DIO layer down to the
//!   NVMe driver's PRP builder; [`DmaBuf`], an owned page-aligned heap
//!   buffer that hands them out (the kernel's and the host benchmark's).
//! - [`BlkError`]: a device error as the layers above see it. It carries what
//!   its message needs (the NVMe status name is a `&'static str` filled in by
//!   the driver), so a crate printing it does not depend on the driver.
//! - [`FreeList`], [`Slab`], [`ReqId`], [`Ring`]: the small fixed-capacity
//!   structures every layer needs for its requests (a table of slots with a
//!   stack of free indices; a FIFO of indices from a completion path to a run
//!   loop). Written once here; they allocate only in their constructors.
//!
//! Why a crate of its own: the dependency arrow points one way, kernel ->
//! (nbd, iomap, dxfs, nvme) -> blk. Host tools (mkfs, fsck, the CLI) build
//! dxfs and iomap and must not build a device driver to do so.
#![cfg_attr(not(test), no_std)]
#![deny(clippy::undocumented_unsafe_blocks)]

extern crate alloc;

mod buf;
mod error;
pub mod null;
mod queue;
mod ring;
mod slab;

pub use buf::{DmaBuf, IoBuf};
pub use error::BlkError;
pub use queue::{BlockQueue, Op};
pub use ring::Ring;
pub use slab::{FreeList, ReqId, Slab};
