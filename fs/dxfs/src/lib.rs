//! dxfs: the extent filesystem dioxide serves files from.
//!
//! `no_std` + `alloc`; the same code mounts images in the kernel (over the
//! NVMe driver) and in the host tools (over files), builds images ([`mkfs`])
//! and checks them ([`fsck`]). The format is in `FORMAT.md`. No byte of an
//! image is believed without a check: a damaged image yields an [`Error`] that
//! names the structure and block, never a panic or an endless loop. Damage
//! costs only what depends on it: [`Fs::scan`] walks the tree and returns
//! every file whose own metadata and path check out, with one [`Damage`] per
//! damaged inode, extent tree or directory block; only a damaged superblock
//! or root directory leaves no file at all.
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]

extern crate alloc;

pub mod dev;
pub mod error;
pub mod format;
pub mod fs;
pub mod fsck;
pub mod iomap;
pub mod journal;
pub mod mkfs;
#[cfg(test)]
mod tests;
pub mod write;
#[cfg(test)]
mod write_tests;

pub use dev::{check_access, BlockDevice, BlockDeviceMut, DevCode, DevError, MemDevice};
pub use error::{Error, Result, Structure, Why};
pub use fs::{Damage, File, Found, Fs, Kind, Lost, Mapping, Scan, WalkEntry, Writer};
pub use write::{FileWriter, SharedFs, Stats as WriteStats, WritableFs, WriteSeg};
