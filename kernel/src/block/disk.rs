//! The namespace as a block device for dxfs, and mounting it at boot.

use crate::drivers::nvme::{self, DmaBuf};
use alloc::string::String;
use dioxide_dxfs::{BlockDevice, Fs};
use dioxide_iomap::{IoBuf, Op};
use dioxide_nvme::Namespace;

/// nvme0n1 as a dxfs block device: reads go to the I/O queue, split at the
/// maximum transfer; buffers the controller cannot address directly
/// (not dword aligned) go through a bounce buffer.
pub struct NvmeDisk {
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

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), String> {
        let bs = self.ns.block_size as u64;
        if !offset.is_multiple_of(bs) || !(buf.len() as u64).is_multiple_of(bs) {
            return Err(alloc::format!(
                "unaligned read at {offset} of {} bytes",
                buf.len()
            ));
        }
        if offset
            .checked_add(buf.len() as u64)
            .is_none_or(|e| e > self.size())
        {
            return Err(alloc::format!(
                "read at {offset} of {} bytes past the end",
                buf.len()
            ));
        }
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
                unsafe { nvme::execute(Op::Read, lba, IoBuf::from_mut_slice(part)) }
                    .map_err(|e| alloc::format!("{e}"))?;
            } else {
                if bounce.is_none() {
                    bounce = Some(DmaBuf::new(chunk).ok_or("out of memory for a bounce buffer")?);
                }
                let Some(b) = bounce.as_mut() else {
                    return Err("no bounce buffer".into());
                };
                let view = b.part(0, n);
                // SAFETY: the bounce buffer is owned here until execute returns.
                unsafe { nvme::execute(Op::Read, lba, view) }.map_err(|e| alloc::format!("{e}"))?;
                part.copy_from_slice(&b.as_slice()[..n]);
            }
            done += n;
        }
        Ok(())
    }
}

/// Mounts dxfs from the namespace; logs one summary line either way.
pub fn mount(dev: &nvme::Nvme) -> Option<Fs<NvmeDisk>> {
    let disk = NvmeDisk {
        ns: dev.ns,
        max_transfer: dev.max_transfer,
    };
    match Fs::mount(disk) {
        Ok(fs) => {
            let sb = fs.superblock();
            log::info!(
                target: "dxfs",
                "mounted nvme0n1: label {:?}, block size {}, {} blocks ({} MiB free), {} inodes ({} in use)",
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
            log::warn!(target: "dxfs", "nvme0n1 holds no usable dxfs: {e}");
            None
        }
    }
}
