//! Where dxfs reads and writes: a device of fixed-size logical blocks.

use alloc::string::String;
use alloc::vec::Vec;

/// A readable block device. Offsets and lengths are multiples of
/// [`BlockDevice::sector_size`].
pub trait BlockDevice {
    /// Logical block size in bytes.
    fn sector_size(&self) -> u32;
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Reads `buf.len()` bytes at byte `offset`.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), String>;
}

/// A writable block device (mkfs).
pub trait BlockDeviceMut: BlockDevice {
    fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<(), String>;
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

fn check(dev: &impl BlockDevice, offset: u64, len: usize) -> Result<(usize, usize), String> {
    let s = dev.sector_size() as u64;
    if !offset.is_multiple_of(s) || !(len as u64).is_multiple_of(s) {
        return Err(alloc::format!("unaligned access at {offset} length {len}"));
    }
    let end = offset.checked_add(len as u64).ok_or("offset overflow")?;
    if end > dev.size() {
        return Err(alloc::format!(
            "access at {offset} length {len} past the end ({})",
            dev.size()
        ));
    }
    Ok((offset as usize, end as usize))
}

impl BlockDevice for MemDevice {
    fn sector_size(&self) -> u32 {
        self.sector
    }
    fn size(&self) -> u64 {
        // Whole sectors only, as a real device has.
        (self.data.len() as u64 / self.sector as u64) * self.sector as u64
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), String> {
        let (a, b) = check(self, offset, buf.len())?;
        buf.copy_from_slice(&self.data[a..b]);
        Ok(())
    }
}

impl BlockDeviceMut for MemDevice {
    fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<(), String> {
        let (a, b) = check(self, offset, buf.len())?;
        self.data[a..b].copy_from_slice(buf);
        Ok(())
    }
}

impl<T: BlockDevice + ?Sized> BlockDevice for &T {
    fn sector_size(&self) -> u32 {
        (**self).sector_size()
    }
    fn size(&self) -> u64 {
        (**self).size()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), String> {
        (**self).read_at(offset, buf)
    }
}
