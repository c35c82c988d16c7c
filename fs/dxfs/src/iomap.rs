//! dxfs as an iomap filesystem: an open [`File`] maps file ranges for the DIO
//! layer. `iomap_begin` is a binary search in the cached extent list: O(log
//! extents), no I/O, no allocation.

use crate::fs::{File, Mapping};
use dioxide_iomap::{Iomap, IomapError, IomapOps, IomapType};

impl IomapOps for File {
    #[inline]
    fn iomap_begin(&self, pos: u64, _len: u64, _flags: u32) -> Result<Iomap, IomapError> {
        let bs = self.block_size() as u64;
        let fb = pos / bs;
        let offset = fb * bs;
        Ok(match self.map(fb) {
            Mapping::Mapped { disk_block, blocks } => Iomap {
                kind: IomapType::Mapped,
                offset,
                length: blocks.saturating_mul(bs),
                addr: disk_block * bs,
                flags: 0,
            },
            Mapping::Unwritten { disk_block, blocks } => Iomap {
                kind: IomapType::Unwritten,
                offset,
                length: blocks.saturating_mul(bs),
                addr: disk_block * bs,
                flags: 0,
            },
            Mapping::Hole { blocks } => Iomap {
                kind: IomapType::Hole,
                offset,
                length: blocks.saturating_mul(bs),
                addr: 0,
                flags: 0,
            },
        })
    }

    fn size(&self) -> u64 {
        self.inode.size
    }

    fn block_size(&self) -> u32 {
        File::block_size(self)
    }
}
