//! The direct-I/O layer of dioxide, modelled on Linux `fs/iomap`.
//!
//! A filesystem answers one question — where does this byte range live — by
//! implementing [`IomapOps`]; this crate does everything else: it walks the
//! mappings of a request, issues device commands through a [`BlockQueue`]
//! (the NVMe driver or the null device), zero-fills holes, and completes the
//! caller's [`Kiocb`] synchronously or, for an asynchronous request, by
//! delivering `(owner's request id, result)` from [`Engine::complete`].
//!
//! This crate depends on the block layer's contracts (`dioxide-blk`) only,
//! never on a driver: the filesystem and its host tools build without one.
//!
//! [`Engine::dio_rw`] has two paths:
//!
//! - the *simple path* for reads of at most one filesystem block that lie in
//!   one mapped extent: one preallocated request slot per device command (the
//!   analogue of upstream's bioset `front_pad`), no heap allocation, the
//!   request finished in the completion handler (poll loop or MSI-X
//!   handler) and handed to its owner, with errors logged and counted, by
//!   the run loop ([`Engine::complete`], the deferred context);
//! - the *generic path* for everything else: multi-block and multi-extent
//!   I/O split at the device's maximum transfer, holes and unwritten extents
//!   read as zeroes, short reads at end of file, bounce buffering, `PARTIAL`
//!   results; it allocates one dio object per call whose count of
//!   outstanding commands completes it (first error wins).
//!
//! The eligibility check, the private "not simple" sentinel that falls back
//! to the generic path, and the runtime switch mirror the upstream v5 patch
//! (see `../shared/reference/` of the project).
#![cfg_attr(not(test), no_std)]
#![deny(clippy::undocumented_unsafe_blocks)]

extern crate alloc;

mod dio;
#[cfg(test)]
mod tests;

pub use dio::{Engine, Stats};
/// The block layer this one submits to (re-exported: callers of the DIO
/// layer name buffers and queues without another dependency).
pub use dioxide_blk::{null, BlkError, BlockQueue, FreeList, IoBuf, Op, ReqId, Ring, Slab};

use core::fmt;

/// What a mapping is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IomapType {
    /// No blocks allocated: reads return zeroes.
    Hole,
    /// Blocks at `addr` on the device hold the data.
    Mapped,
    /// Blocks allocated but not written: reads return zeroes.
    Unwritten,
    /// The data lives in filesystem metadata, at CPU address `addr`.
    Inline,
}

/// `iomap_begin` flags (what the caller is about to do).
pub mod iomap_flags {
    pub const WRITE: u32 = 1 << 0;
    pub const DIRECT: u32 = 1 << 4;
    pub const NOWAIT: u32 = 1 << 5;
}

/// Mapping flags set by the filesystem.
pub mod iomap_f {
    /// The mapping needs integrity (protection information) handling: never
    /// the simple path.
    pub const INTEGRITY: u32 = 1 << 0;
}

/// One mapping of a file range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Iomap {
    pub kind: IomapType,
    /// File offset (bytes) where the mapping starts.
    pub offset: u64,
    /// Length in bytes.
    pub length: u64,
    /// Device byte address of `offset` (Mapped, Unwritten) or CPU address of
    /// inline data (Inline).
    pub addr: u64,
    pub flags: u32,
}

impl Iomap {
    /// Whether the mapping covers `[pos, pos + len)`.
    pub fn covers(&self, pos: u64, len: u64) -> bool {
        self.offset <= pos && self.offset.saturating_add(self.length) >= pos + len
    }
}

/// Why a filesystem could not map a range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IomapError {
    /// The filesystem metadata for the range is damaged.
    Corrupt,
    /// The request would block and NOWAIT was given.
    Again,
    /// The filesystem cannot do this (e.g. allocate for a write).
    Unsupported,
    /// A range past what the file can hold.
    Range,
}

/// The filesystem side: where does a range live.
pub trait IomapOps {
    /// Maps the range starting at `pos` (up to `len` bytes; the mapping may be
    /// shorter or longer).
    fn iomap_begin(&self, pos: u64, len: u64, flags: u32) -> Result<Iomap, IomapError>;
    /// Called after the range was used; `done` bytes of it were.
    fn iomap_end(&self, _pos: u64, _len: u64, _done: u64, _flags: u32, _iomap: &Iomap) {}
    /// The file size (`i_size`).
    fn size(&self) -> u64;
    /// The filesystem block size.
    fn block_size(&self) -> u32;
}

/// Optional filesystem hooks on the generic path (upstream `iomap_dio_ops`,
/// likewise static). Their presence alone sends a request to the generic
/// path. `Sync`: the engine holding a request's hooks is shared with the
/// interrupt handler.
pub trait DioOps: Sync {
    /// Before each device command is submitted.
    fn submit_io(&self, _pos: u64, _len: usize) {}
    /// When the whole request completes, with its result.
    fn end_io(&self, _pos: u64, _size: usize, _result: &Result<usize, DioError>) {}
}

/// `Kiocb` flags.
pub mod kiocb_flags {
    /// Fail with `Again` instead of waiting for resources.
    pub const NOWAIT: u32 = 1 << 0;
    /// The caller polls for completion (upstream IOCB_HIPRI).
    pub const POLLED: u32 = 1 << 1;
}

/// A request: position, flags, and who is told of its completion: `owner:
/// None` is a synchronous caller (it waits); `Some(id)` names the owner's
/// request (an entry of its own slab), which [`Engine::complete`] hands back
/// with the result. The engine never looks inside the id.
#[derive(Clone, Copy, Debug)]
pub struct Kiocb {
    pub pos: u64,
    pub flags: u32,
    pub owner: Option<ReqId>,
}

impl Kiocb {
    pub fn sync(pos: u64) -> Self {
        Kiocb {
            pos,
            flags: 0,
            owner: None,
        }
    }
    pub fn with_owner(pos: u64, owner: ReqId) -> Self {
        Kiocb {
            pos,
            flags: 0,
            owner: Some(owner),
        }
    }
    pub fn is_sync(&self) -> bool {
        self.owner.is_none()
    }
}

/// `dio_rw` flags.
pub mod dio_flags {
    /// Wait for completion even for an asynchronous kiocb.
    pub const FORCE_WAIT: u32 = 1 << 0;
    /// On error, return the bytes done before it (if any) instead.
    pub const PARTIAL: u32 = 1 << 1;
    /// Transfer through kernel bounce buffers (stable pages for the device).
    pub const BOUNCE: u32 = 1 << 2;
    /// Require alignment to the filesystem block size rather than the
    /// device's logical block size.
    pub const FSBLOCK_ALIGNED: u32 = 1 << 3;
}

/// What `dio_rw` did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DioResult {
    /// Completed: this many bytes.
    Done(usize),
    /// Queued: the kiocb's owner will receive the result from
    /// [`Engine::complete`] (upstream -EIOCBQUEUED).
    Queued,
}

/// Errors of a direct I/O.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DioError {
    /// Misaligned position, length or buffer (EINVAL).
    Invalid(&'static str),
    /// Would block and NOWAIT was given (EAGAIN).
    Again,
    /// The device failed the command covering file offset `pos`.
    Io { pos: u64, err: BlkError },
    /// The filesystem could not map the range.
    Fs(IomapError),
    /// Not supported by this path or filesystem.
    Unsupported(&'static str),
    /// A bounce buffer or the dio object could not be allocated (ENOMEM).
    NoMemory,
}

impl fmt::Display for DioError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DioError::Invalid(w) => write!(f, "invalid request: {w}"),
            DioError::Again => write!(f, "would block"),
            DioError::Io { pos, err } => write!(f, "I/O error at file offset {pos}: {err}"),
            DioError::Fs(e) => write!(f, "filesystem error: {e:?}"),
            DioError::Unsupported(w) => write!(f, "unsupported: {w}"),
            DioError::NoMemory => write!(f, "out of memory"),
        }
    }
}

impl core::error::Error for DioError {
    fn source(&self) -> Option<&(dyn core::error::Error + 'static)> {
        match self {
            DioError::Io { err, .. } => Some(err),
            DioError::Fs(e) => Some(e),
            _ => None,
        }
    }
}

impl fmt::Display for IomapError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            IomapError::Corrupt => "filesystem metadata damaged",
            IomapError::Again => "would block",
            IomapError::Unsupported => "not supported by the filesystem",
            IomapError::Range => "range past what the file can hold",
        })
    }
}

impl core::error::Error for IomapError {}
