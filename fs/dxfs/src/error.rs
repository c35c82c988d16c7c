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
}

impl fmt::Display for Structure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Structure::Superblock => write!(f, "superblock"),
            Structure::Bitmap => write!(f, "block bitmap"),
            Structure::Inode(i) => write!(f, "inode {i}"),
            Structure::ExtentTree(i) => write!(f, "extent tree of inode {i}"),
            Structure::Directory(i) => write!(f, "directory inode {i}"),
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
