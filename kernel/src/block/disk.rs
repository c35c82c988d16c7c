//! A namespace as a block device for dxfs, and mounting every namespace
//! that holds one at boot.

use crate::drivers::nvme::{self, DmaBuf};
use alloc::string::String;
use alloc::vec::Vec;
use dioxide_dxfs::{check_access, BlockDevice, BlockDeviceMut, DevCode, DevError, Fs};
use dioxide_iomap::{BlkError, DioError, IoBuf, Op};
use dioxide_nvme::Namespace;

/// A namespace (`nvme::disks()[disk]`) as a dxfs block device: reads go to
/// this core's I/O queue of it, split at the maximum transfer; buffers the
/// controller cannot address directly (not dword aligned) go through a
/// bounce buffer.
pub struct NvmeDisk {
    pub disk: usize,
    pub ns: Namespace,
    pub max_transfer: usize,
}

impl BlockDevice for NvmeDisk {
    fn sector_size(&self) -> u32 {
        self.ns.block_size
    }

    fn size(&self) -> u64 {
        self.ns.bytes()
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), DevError> {
        let bs = self.ns.block_size as u64;
        check_access(self, offset, buf.len())?;
        let chunk = (self.max_transfer as u64 / bs * bs).max(bs) as usize;
        let mut bounce: Option<DmaBuf> = None;
        let mut done = 0usize;
        while done < buf.len() {
            let n = (buf.len() - done).min(chunk);
            let lba = (offset + done as u64) / bs;
            let part = &mut buf[done..done + n];
            if (part.as_ptr() as usize).is_multiple_of(4) {
                // SAFETY: `part` is borrowed until execute returns, after the
                // command completed.
                unsafe { nvme::execute(self.disk, Op::Read, lba, IoBuf::from_mut_slice(part)) }
                    .map_err(|e| dev_error(lba * bs, e))?;
            } else {
                if bounce.is_none() {
                    bounce = Some(DmaBuf::new(chunk).ok_or(DevError::NoMemory)?);
                }
                let Some(b) = bounce.as_mut() else {
                    return Err(DevError::NoMemory);
                };
                let view = b.part(0, n);
                // SAFETY: the bounce buffer is owned here until execute returns.
                unsafe { nvme::execute(self.disk, Op::Read, lba, view) }
                    .map_err(|e| dev_error(lba * bs, e))?;
                part.copy_from_slice(&b.as_slice()[..n]);
            }
            done += n;
        }
        Ok(())
    }
}

impl NvmeDisk {
    /// Writes `buf` at byte `offset` with `op` (a write, with or without
    /// FUA), split at the maximum transfer; a buffer the controller cannot
    /// address directly goes through a bounce buffer.
    fn write_with(&self, op: Op, offset: u64, buf: &[u8]) -> Result<(), DevError> {
        let bs = self.ns.block_size as u64;
        check_access(self, offset, buf.len())?;
        let chunk = (self.max_transfer as u64 / bs * bs).max(bs) as usize;
        let mut bounce: Option<DmaBuf> = None;
        let mut done = 0usize;
        while done < buf.len() {
            let n = (buf.len() - done).min(chunk);
            let lba = (offset + done as u64) / bs;
            let part = &buf[done..done + n];
            if (part.as_ptr() as usize).is_multiple_of(4) {
                // SAFETY: `part` is borrowed until execute returns, after
                // the command completed; the device only reads it.
                unsafe { nvme::execute(self.disk, op, lba, IoBuf::from_slice(part)) }
                    .map_err(|e| dev_error(lba * bs, e))?;
            } else {
                if bounce.is_none() {
                    bounce = Some(DmaBuf::new(chunk).ok_or(DevError::NoMemory)?);
                }
                let Some(b) = bounce.as_mut() else {
                    return Err(DevError::NoMemory);
                };
                b.as_mut_slice()[..n].copy_from_slice(part);
                let view = b.part(0, n);
                // SAFETY: the bounce buffer is owned here until execute returns.
                unsafe { nvme::execute(self.disk, op, lba, view) }
                    .map_err(|e| dev_error(lba * bs, e))?;
            }
            done += n;
        }
        Ok(())
    }
}

/// dxfs's write path on a namespace: the same synchronous commands on this
/// core's queue (NVMe Write, Write with FUA, Flush).
impl BlockDeviceMut for NvmeDisk {
    fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<(), DevError> {
        self.write_with(Op::Write, offset, buf)
    }
    fn write_fua(&mut self, offset: u64, buf: &[u8]) -> Result<(), DevError> {
        self.write_with(Op::WriteFua, offset, buf)
    }
    fn flush(&mut self) -> Result<(), DevError> {
        // SAFETY: a flush has no buffer.
        unsafe { nvme::execute(self.disk, Op::Flush, 0, IoBuf::empty()) }
            .map_err(|e| dev_error(0, e))
    }
}

/// A failed raw read at device byte `offset` as dxfs's device error: an
/// NVMe status keeps its name as the reason and its type and code as the code;
/// other failures their description.
fn dev_error(offset: u64, e: DioError) -> DevError {
    let (reason, code) = match e {
        DioError::NoMemory => return DevError::NoMemory,
        DioError::Io {
            err: BlkError::Status { sct, sc, name },
            ..
        } => (name, Some(DevCode::Nvme { sct, sc })),
        DioError::Io { err, .. } => (err.reason(), None),
        DioError::Invalid(w) | DioError::Unsupported(w) => (w, None),
        DioError::Again => ("would block", None),
        DioError::Fs(_) | DioError::Unallocated { .. } => ("filesystem error on a raw read", None),
    };
    DevError::Io {
        offset,
        reason,
        code,
    }
}

/// A dxfs filesystem on namespace `disk` (index in [`nvme::disks`]).
pub struct Mounted {
    pub disk: usize,
    pub fs: Fs<NvmeDisk>,
}

impl Mounted {
    /// Where the filesystem's files stand in the names the appliance gives
    /// them (NBD exports, the files self-test): `""` on `nvme0n1`, whose
    /// files keep their paths alone, `"/nvme1n1"` on any other namespace.
    pub fn root(&self) -> String {
        match nvme::disks().get(self.disk) {
            Some(d) if d.name != "nvme0n1" => alloc::format!("/{}", d.name),
            _ => String::new(),
        }
    }
}

/// Mounts dxfs from every namespace that holds one; logs one line per
/// namespace either way.
pub fn mount_all() -> Vec<Mounted> {
    (0..nvme::disks().len())
        .filter_map(|disk| mount(disk).map(|fs| Mounted { disk, fs }))
        .collect()
}

/// Mounts dxfs from namespace `disk`; logs one summary line either way.
pub fn mount(disk: usize) -> Option<Fs<NvmeDisk>> {
    let d = nvme::disks().get(disk)?;
    let dev = NvmeDisk {
        disk,
        ns: d.ns,
        max_transfer: d.max_transfer,
    };
    match Fs::mount(dev) {
        Ok(fs) => {
            let sb = fs.superblock();
            log::info!(
                target: "dxfs",
                "mounted {}: label {:?}, block size {}, {} blocks ({} MiB free), {} inodes ({} in use)",
                d.name,
                sb.label_str(),
                sb.block_size,
                sb.block_count,
                (sb.free_blocks * sb.block_size as u64) >> 20,
                sb.inode_count,
                sb.inode_count - sb.free_inodes
            );
            Some(fs)
        }
        Err(e) => {
            log::warn!(target: "dxfs", "{} holds no usable dxfs: {e}", d.name);
            None
        }
    }
}
