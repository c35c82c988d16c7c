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

mod bounce;
mod dio;
mod iter;
#[cfg(test)]
mod tests;

pub use bounce::{Bounce, Lent};
pub use dio::{check_overwrite, Engine, Stats};
/// The block layer this one submits to (re-exported: callers of the DIO
/// layer name buffers and queues without another dependency).
pub use dioxide_blk::{null, BlkError, BlockQueue, DmaBuf, FreeList, IoBuf, Op, ReqId, Ring, Slab};
pub use iter::{IomapIter, IomapStep};

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

// The four flag sets are typed (`bitflags`), so that a kiocb flag cannot be
// passed where a dio flag is meant; the bit values are upstream's where
// upstream has the flag.

bitflags::bitflags! {
    /// `iomap_begin` flags: what the caller is about to do (upstream
    /// `IOMAP_*`).
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct IomapFlags: u32 {
        const WRITE = 1 << 0;
        const DIRECT = 1 << 4;
        const NOWAIT = 1 << 5;
    }
}

bitflags::bitflags! {
    /// Mapping flags set by the filesystem (upstream `IOMAP_F_*`).
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct MappingFlags: u32 {
        /// The mapping needs integrity (protection information) handling:
        /// never the simple path.
        const INTEGRITY = 1 << 0;
    }
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
    pub flags: MappingFlags,
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
    /// No free block for an allocating write.
    NoSpace,
}

/// The filesystem side: where does a range live.
pub trait IomapOps {
    /// Maps the range starting at `pos` (up to `len` bytes; the mapping may be
    /// shorter or longer).
    fn iomap_begin(&self, pos: u64, len: u64, flags: IomapFlags) -> Result<Iomap, IomapError>;
    /// Called after the range was used; `done` bytes of it were. The DIO
    /// layer calls it exactly once per successful `iomap_begin` (an
    /// [`IomapIter`] pairs them).
    fn iomap_end(&self, _pos: u64, _len: u64, _done: u64, _flags: IomapFlags, _iomap: &Iomap) {}
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

bitflags::bitflags! {
    /// `Kiocb` flags (upstream `IOCB_*`).
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct KiocbFlags: u32 {
        /// Fail with `Again` instead of waiting for resources.
        const NOWAIT = 1 << 0;
        /// The caller polls for completion (upstream IOCB_HIPRI).
        const POLLED = 1 << 1;
    }
}

/// A request: position, flags, and who is told of its completion: `owner:
/// None` is a synchronous caller (it waits); `Some(id)` names the owner's
/// request (an entry of its own slab), which [`Engine::complete`] hands back
/// with the result. The engine never looks inside the id.
#[derive(Clone, Copy, Debug)]
pub struct Kiocb {
    pub pos: u64,
    pub flags: KiocbFlags,
    pub owner: Option<ReqId>,
}

impl Kiocb {
    pub fn sync(pos: u64) -> Self {
        Kiocb {
            pos,
            flags: KiocbFlags::empty(),
            owner: None,
        }
    }
    pub fn with_owner(pos: u64, owner: ReqId) -> Self {
        Kiocb {
            pos,
            flags: KiocbFlags::empty(),
            owner: Some(owner),
        }
    }
    pub fn is_sync(&self) -> bool {
        self.owner.is_none()
    }
}

bitflags::bitflags! {
    /// `dio_rw` flags (upstream `IOMAP_DIO_*`).
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct DioFlags: u32 {
        /// Wait for completion even for an asynchronous kiocb.
        const FORCE_WAIT = 1 << 0;
        /// On error, return the bytes done before it (if any) instead.
        const PARTIAL = 1 << 1;
        /// Transfer through kernel bounce buffers (stable pages for the
        /// device).
        const BOUNCE = 1 << 2;
        /// Require alignment to the filesystem block size rather than the
        /// device's logical block size.
        const FSBLOCK_ALIGNED = 1 << 3;
    }
}

/// One direct I/O, as [`Engine::dio_rw`] takes it: upstream's
/// `iomap_dio_rw(iocb, iter, ops, dops, flags, private, done_before)` as
/// named fields, so that a call says what each value is. Most callers build
/// it with [`DioRequest::read`] (no hooks, no flags, nothing done before)
/// and change what they need with the `with_*` methods.
pub struct DioRequest<'a, O: IomapOps + ?Sized> {
    /// Position, kiocb flags and owner.
    pub iocb: Kiocb,
    pub op: Op,
    /// The caller's memory (see the safety contract of [`Engine::dio_rw`]).
    pub buf: IoBuf,
    /// The file: where its ranges live.
    pub ops: &'a O,
    /// Optional filesystem hooks (their presence alone means the generic
    /// path).
    pub dops: Option<&'static dyn DioOps>,
    pub flags: DioFlags,
    /// Bytes the caller already transferred, added to the result.
    pub done_before: usize,
}

// Not derived: a derive would require `O: Clone`, and `O` is only borrowed.
impl<O: IomapOps + ?Sized> Clone for DioRequest<'_, O> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<O: IomapOps + ?Sized> Copy for DioRequest<'_, O> {}

impl<'a, O: IomapOps + ?Sized> DioRequest<'a, O> {
    /// `op` of `buf` at `iocb.pos` of `ops`: no hooks, no flags.
    #[inline]
    pub fn new(iocb: Kiocb, op: Op, buf: IoBuf, ops: &'a O) -> Self {
        DioRequest {
            iocb,
            op,
            buf,
            ops,
            dops: None,
            flags: DioFlags::empty(),
            done_before: 0,
        }
    }
    /// A read into `buf`.
    #[inline]
    pub fn read(iocb: Kiocb, buf: IoBuf, ops: &'a O) -> Self {
        Self::new(iocb, Op::Read, buf, ops)
    }
    /// A write from `buf`.
    #[inline]
    pub fn write(iocb: Kiocb, buf: IoBuf, ops: &'a O) -> Self {
        Self::new(iocb, Op::Write, buf, ops)
    }
    #[inline]
    pub fn with_flags(mut self, flags: DioFlags) -> Self {
        self.flags = flags;
        self
    }
    #[inline]
    pub fn with_dops(mut self, dops: Option<&'static dyn DioOps>) -> Self {
        self.dops = dops;
        self
    }
    #[inline]
    pub fn with_done_before(mut self, done_before: usize) -> Self {
        self.done_before = done_before;
        self
    }
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
    /// A write into a hole or an unwritten extent: it needs allocation or
    /// conversion, which the filesystem does not do (yet). Nothing was
    /// written.
    Unallocated { pos: u64 },
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
            DioError::Unallocated { pos } => write!(
                f,
                "write at file offset {pos} needs allocation, not built yet (a hole or an unwritten extent)"
            ),
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
            IomapError::NoSpace => "no free block left",
            IomapError::Again => "would block",
            IomapError::Unsupported => "not supported by the filesystem",
            IomapError::Range => "range past what the file can hold",
        })
    }
}

impl core::error::Error for IomapError {}
