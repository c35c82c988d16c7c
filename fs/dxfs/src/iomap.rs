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
        // A written block is the snapshot's, always (written blocks never
        // move): the read path's case, kept in line. The rest is asked
        // again out of line (`map_now`). Measured with callgrind on the
        // host benchmark's simple read: matching `map_now`'s result here
        // cost 53 instructions per read more than before files had a
        // write path, this form 13.
        match self.map(fb) {
            Mapping::Mapped { disk_block, blocks } => Ok(Iomap {
                kind: IomapType::Mapped,
                offset: fb << shift,
                length: bytes(blocks, shift),
                addr: disk_block << shift,
                flags: MappingFlags::empty(),
            }),
            _ => Ok(self.iomap_again(fb)),
        }
    }

    fn size(&self) -> u64 {
        self.inode.size
    }

    fn block_size(&self) -> u32 {
        File::block_size(self)
    }
}

impl File {
    /// The iomap of a block the snapshot has as a hole or unwritten.
    #[cold]
    #[inline(never)]
    fn iomap_again(&self, fb: u64) -> Iomap {
        iomap(fb, self.block_shift(), self.map_now(fb))
    }
}

/// The iomap of file block `fb` mapped as `m`, with `shift` = log2 of the
/// block size.
#[inline(always)]
fn iomap(fb: u64, shift: u32, m: Mapping) -> Iomap {
    let offset = fb << shift;
    let (kind, blocks, addr) = match m {
        Mapping::Mapped { disk_block, blocks } => (IomapType::Mapped, blocks, disk_block << shift),
        Mapping::Unwritten { disk_block, blocks } => {
            (IomapType::Unwritten, blocks, disk_block << shift)
        }
        Mapping::Hole { blocks } => (IomapType::Hole, blocks, 0),
    };
    Iomap {
        kind,
        offset,
        length: bytes(blocks, shift),
        addr,
        flags: MappingFlags::empty(),
    }
}

/// `blocks` blocks in bytes (saturating: a hole past the last extent is
/// `u64::MAX` blocks long).
#[inline(always)]
fn bytes(blocks: u64, shift: u32) -> u64 {
    if blocks > (u64::MAX >> shift) {
        u64::MAX
    } else {
        blocks << shift
    }
}
