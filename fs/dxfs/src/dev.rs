//! Where dxfs reads and writes: a device of fixed-size logical blocks.
//!
//! The device boundary has its own error type, [`DevError`], so that dxfs
//! (and its host tools) need no driver crate: an implementor maps its own
//! failure into it — the kernel its `DioError`/`BlkError` (the status's
//! name as the reason, its code as the code), the host tools an
//! `std::io::Error` (its kind as the reason, the OS error number as the
//! code). Only `&'static str` and numbers cross the boundary: no
//! allocation on an error path, and the variants stay comparable in tests.

use alloc::vec::Vec;
use core::fmt;

/// Why a device read or write failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DevError {
    /// Offset or length not a multiple of the sector size.
    Unaligned { offset: u64, len: usize },
    /// The access does not lie inside the device.
    OutOfRange { offset: u64, len: usize, size: u64 },
    /// No memory for the transfer (a bounce or DMA buffer).
    NoMemory,
    /// The device failed the transfer at byte `offset`: what failed, in the
    /// implementor's words, and the device's or OS's code when it has one.
    Io {
        offset: u64,
        reason: &'static str,
        code: Option<DevCode>,
    },
}

/// A device's or OS's own code for a failure, printed as its world writes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DevCode {
    /// An NVMe status: status code type and status code.
    Nvme { sct: u8, sc: u8 },
    /// An operating system's error number (the host tools).
    Errno(i32),
}

impl fmt::Display for DevCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DevCode::Nvme { sct, sc } => write!(f, "sct {sct:#x} sc {sc:#x}"),
            DevCode::Errno(e) => write!(f, "errno {e}"),
        }
    }
}

impl fmt::Display for DevError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DevError::Unaligned { offset, len } => {
                write!(f, "unaligned access at {offset} length {len}")
            }
            DevError::OutOfRange { offset, len, size } => {
                write!(f, "access at {offset} length {len} past the end ({size})")
            }
            DevError::NoMemory => write!(f, "out of memory for the transfer"),
            DevError::Io {
                offset,
                reason,
                code,
            } => {
                write!(f, "I/O error at byte {offset}: {reason}")?;
                match code {
                    Some(c) => write!(f, " ({c})"),
                    None => Ok(()),
                }
            }
        }
    }
}

impl core::error::Error for DevError {}

/// A readable block device. Offsets and lengths are multiples of
/// [`BlockDevice::sector_size`].
pub trait BlockDevice {
    /// Logical block size in bytes.
    fn sector_size(&self) -> u32;
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Reads `buf.len()` bytes at byte `offset`.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), DevError>;
}

/// A writable block device (mkfs, the write path).
pub trait BlockDeviceMut: BlockDevice {
    /// Writes `buf` at byte `offset`. On a device with a volatile write
    /// cache the data may be lost by a power cut until the next
    /// [`BlockDeviceMut::flush`].
    fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<(), DevError>;
    /// Makes every write completed so far durable (NVMe Flush, `fsync`). A
    /// device without a volatile cache has nothing to do.
    fn flush(&mut self) -> Result<(), DevError> {
        Ok(())
    }
    /// Writes `buf` durably before returning (NVMe's FUA bit), without
    /// making other writes durable.
    fn write_fua(&mut self, offset: u64, buf: &[u8]) -> Result<(), DevError> {
        self.write_at(offset, buf)?;
        self.flush()
    }
}

/// A device in memory.
#[derive(Clone, Debug)]
pub struct MemDevice {
    pub data: Vec<u8>,
    pub sector: u32,
}

impl MemDevice {
    pub fn new(size: usize, sector: u32) -> Self {
        MemDevice {
            data: alloc::vec![0; size],
            sector,
        }
    }
    pub fn from_vec(data: Vec<u8>, sector: u32) -> Self {
        MemDevice { data, sector }
    }
}

/// The checks every device makes: whole sectors, inside the device.
pub fn check_access(
    dev: &(impl BlockDevice + ?Sized),
    offset: u64,
    len: usize,
) -> Result<(usize, usize), DevError> {
    let s = dev.sector_size() as u64;
    if !offset.is_multiple_of(s) || !(len as u64).is_multiple_of(s) {
        return Err(DevError::Unaligned { offset, len });
    }
    let size = dev.size();
    match offset.checked_add(len as u64) {
        Some(end) if end <= size => Ok((offset as usize, end as usize)),
        _ => Err(DevError::OutOfRange { offset, len, size }),
    }
}

impl BlockDevice for MemDevice {
    fn sector_size(&self) -> u32 {
        self.sector
    }
    fn size(&self) -> u64 {
        // Whole sectors only, as a real device has.
        (self.data.len() as u64 / self.sector as u64) * self.sector as u64
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), DevError> {
        let (a, b) = check_access(self, offset, buf.len())?;
        buf.copy_from_slice(&self.data[a..b]);
        Ok(())
    }
}

impl BlockDeviceMut for MemDevice {
    fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<(), DevError> {
        let (a, b) = check_access(self, offset, buf.len())?;
        self.data[a..b].copy_from_slice(buf);
        Ok(())
    }
}

impl<T: BlockDevice + ?Sized> BlockDevice for &mut T {
    fn sector_size(&self) -> u32 {
        (**self).sector_size()
    }
    fn size(&self) -> u64 {
        (**self).size()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), DevError> {
        (**self).read_at(offset, buf)
    }
}

impl<T: BlockDeviceMut + ?Sized> BlockDeviceMut for &mut T {
    fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<(), DevError> {
        (**self).write_at(offset, buf)
    }
    fn flush(&mut self) -> Result<(), DevError> {
        (**self).flush()
    }
    fn write_fua(&mut self, offset: u64, buf: &[u8]) -> Result<(), DevError> {
        (**self).write_fua(offset, buf)
    }
}

impl<T: BlockDevice + ?Sized> BlockDevice for &T {
    fn sector_size(&self) -> u32 {
        (**self).sector_size()
    }
    fn size(&self) -> u64 {
        (**self).size()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), DevError> {
        (**self).read_at(offset, buf)
    }
}
