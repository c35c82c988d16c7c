//! dxfs as an iomap filesystem: an open [`File`] maps file ranges for the DIO
//! layer. `iomap_begin` is a binary search in the cached extent list: O(log
//! extents), no I/O, no allocation.

use crate::fs::{File, Mapping};
use dioxide_iomap::{Iomap, IomapError, IomapFlags, IomapOps, IomapType, MappingFlags};

impl IomapOps for File {
    #[inline]
    fn iomap_begin(&self, pos: u64, _len: u64, _flags: IomapFlags) -> Result<Iomap, IomapError> {
        // Block sizes are powers of two: shifts, not divisions, on the hot
        // path.
        let shift = self.block_shift();
        let fb = pos >> shift;
        let offset = fb << shift;
        let bytes = |blocks: u64| {
            if blocks > (u64::MAX >> shift) {
                u64::MAX
            } else {
                blocks << shift
            }
        };
        Ok(match self.map_now(fb) {
            Mapping::Mapped { disk_block, blocks } => Iomap {
                kind: IomapType::Mapped,
                offset,
                length: bytes(blocks),
                addr: disk_block << shift,
                flags: MappingFlags::empty(),
            },
            Mapping::Unwritten { disk_block, blocks } => Iomap {
                kind: IomapType::Unwritten,
                offset,
                length: bytes(blocks),
                addr: disk_block << shift,
                flags: MappingFlags::empty(),
            },
            Mapping::Hole { blocks } => Iomap {
                kind: IomapType::Hole,
                offset,
                length: bytes(blocks),
                addr: 0,
                flags: MappingFlags::empty(),
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
