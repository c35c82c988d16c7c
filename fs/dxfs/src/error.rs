//! Errors. A corrupt structure is named with the block it was found in.

use crate::dev::DevError;
use alloc::string::String;
use core::fmt;

/// What is wrong with a structure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Why {
    Truncated,
    BadMagic,
    BadChecksum,
    /// A field with an impossible value.
    Field(&'static str),
    /// Something valid that this implementation does not support.
    Unsupported(&'static str),
    /// A reference past the end of its region or the device.
    OutOfRange(&'static str),
    /// A structure reached twice where it may be reached once (a cycle).
    Loop(&'static str),
    /// Entries out of order or overlapping.
    Order(&'static str),
}

impl fmt::Display for Why {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Why::Truncated => write!(f, "truncated"),
            Why::BadMagic => write!(f, "bad magic"),
            Why::BadChecksum => write!(f, "bad checksum"),
            Why::Field(s) => write!(f, "bad {s}"),
            Why::Unsupported(s) => write!(f, "unsupported {s}"),
            Why::OutOfRange(s) => write!(f, "{s} out of range"),
            Why::Loop(s) => write!(f, "{s} reached twice (cycle)"),
            Why::Order(s) => write!(f, "{s} out of order or overlapping"),
        }
    }
}

/// Which structure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Structure {
    Superblock,
    Bitmap,
    Inode(u64),
    ExtentTree(u64),
    Directory(u64),
    /// The commit log.
    Log,
}

impl fmt::Display for Structure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Structure::Superblock => write!(f, "superblock"),
            Structure::Bitmap => write!(f, "block bitmap"),
            Structure::Inode(i) => write!(f, "inode {i}"),
            Structure::ExtentTree(i) => write!(f, "extent tree of inode {i}"),
            Structure::Directory(i) => write!(f, "directory inode {i}"),
            Structure::Log => write!(f, "commit log"),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Error {
    /// The block device failed.
    Device {
        block: u64,
        err: DevError,
    },
    /// A structure on disk is damaged.
    Corrupt {
        what: Structure,
        block: u64,
        why: Why,
    },
    /// No such file or directory.
    NotFound(String),
    NotADirectory(String),
    IsADirectory(String),
    /// A path component that can never name an entry (`.`, `..`, NUL, too long).
    InvalidPath(String),
    /// An inode number outside the inode table or not in use.
    BadInode(u64),
    /// The filesystem block size is below the device's logical block size.
    BlockSize {
        fs: u32,
        device: u32,
    },
    /// mkfs: the tree does not fit.
    NoSpace {
        need_blocks: u64,
        have_blocks: u64,
    },
    /// mkfs: an input that cannot be stored.
    Input(String),
    /// A write needs a block and none is free.
    Full {
        ino: u64,
    },
    /// A write that would allocate, on an image without a commit log (made
    /// before dxfs took writes): only overwrites of written blocks are safe.
    NoLog,
    /// A write past the end of the file (files keep their size).
    PastEnd {
        ino: u64,
        block: u64,
    },
    /// A change bigger than one transaction may log.
    TxnTooBig {
        blocks: usize,
        capacity: usize,
    },
    /// Not a regular file.
    NotAFile(u64),
    /// An earlier commit failed on the device: the filesystem takes no more
    /// changes until it is mounted again (which replays the last committed
    /// transaction).
    Failed,
}

pub type Result<T> = core::result::Result<T, Error>;

impl Error {
    pub fn corrupt(what: Structure, block: u64, why: Why) -> Error {
        Error::Corrupt { what, block, why }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Device { block, err } => write!(f, "device error at block {block}: {err}"),
            Error::Corrupt { what, block, why } => {
                write!(f, "corrupt {what} at block {block}: {why}")
            }
            Error::NotFound(p) => write!(f, "{p}: no such file or directory"),
            Error::NotADirectory(p) => write!(f, "{p}: not a directory"),
            Error::IsADirectory(p) => write!(f, "{p}: is a directory"),
            Error::InvalidPath(p) => write!(f, "{p}: invalid path"),
            Error::BadInode(i) => write!(f, "inode {i} out of range or not in use"),
            Error::BlockSize { fs, device } => write!(
                f,
                "filesystem block size {fs} is below the device's logical block size {device}"
            ),
            Error::NoSpace {
                need_blocks,
                have_blocks,
            } => write!(
                f,
                "the tree needs {need_blocks} blocks but the image has {have_blocks}"
            ),
            Error::Input(s) => write!(f, "{s}"),
            Error::Full { ino } => write!(f, "inode {ino}: no free block left"),
            Error::NoLog => write!(
                f,
                "the image has no commit log (made before dxfs took writes): \
                 only overwrites of written blocks are possible"
            ),
            Error::PastEnd { ino, block } => {
                write!(f, "inode {ino}: block {block} is past the end of the file")
            }
            Error::TxnTooBig { blocks, capacity } => write!(
                f,
                "a change of {blocks} metadata blocks is more than the commit log's \
                 {capacity} per transaction"
            ),
            Error::NotAFile(i) => write!(f, "inode {i} is not a regular file"),
            Error::Failed => write!(
                f,
                "an earlier commit failed: no more changes until the filesystem is mounted again"
            ),
        }
    }
}

impl core::error::Error for Error {
    fn source(&self) -> Option<&(dyn core::error::Error + 'static)> {
        match self {
            Error::Device { err, .. } => Some(err),
            _ => None,
        }
    }
}
