//! On-disk structures (see FORMAT.md): parse from and emit to bytes.
//!
//! `parse` checks lengths and checksums once; the returned structs are plain
//! values that cannot panic on access. `emit` writes the exact bytes,
//! checksums included.

use crate::error::Why;

/// crc32c (Castagnoli), slice-by-16.
pub const CRC32C: crc::Crc<u32, crc::Table<16>> =
    crc::Crc::<u32, crc::Table<16>>::new(&crc::CRC_32_ISCSI);

pub const MAGIC: [u8; 8] = *b"dioxidFS";
pub const VERSION: u32 = 1;
pub const SUPERBLOCK_SIZE: usize = 512;
pub const INODE_SIZE: usize = 256;
pub const HEADER_SIZE: usize = 32;
pub const ENTRY_SIZE: usize = 24;
pub const INLINE_ENTRIES: usize = 6;
pub const INLINE_OFFSET: usize = 88;
pub const MIN_BLOCK_SIZE: u32 = 4096;
pub const MAX_BLOCK_SIZE: u32 = 65536;
pub const MAX_EXTENT_DEPTH: u16 = 4;
pub const MAX_DIR_DEPTH: u16 = 8;
pub const MAX_NAME: usize = 255;
pub const ROOT_INO: u64 = 1;
pub const DIR_HASH_FNV1A64: u32 = 1;

pub const S_IFMT: u16 = 0o170000;
pub const S_IFREG: u16 = 0o100000;
pub const S_IFDIR: u16 = 0o040000;

pub const BLOCK_MAGIC: [u8; 4] = *b"DXMB";
pub const KIND_BITMAP: u16 = 1;
pub const KIND_EXTENT: u16 = 2;
pub const KIND_DIR: u16 = 3;
/// The commit log's descriptor block (see `journal`).
pub const KIND_LOG_DESC: u16 = 4;
/// The commit log's commit block.
pub const KIND_LOG_COMMIT: u16 = 5;

pub const EXTENT_UNWRITTEN: u32 = 1;

/// Incompat feature bits this reader knows (none yet).
pub const INCOMPAT_KNOWN: u64 = INCOMPAT_LOG;
/// The image has a commit log (`log_start`, `log_blocks`): metadata changes
/// go through it, and a mount must replay it.
pub const INCOMPAT_LOG: u64 = 1;
/// The smallest commit log: a descriptor, one block, a commit block.
pub const MIN_LOG_BLOCKS: u64 = 3;

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}
fn put16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_le_bytes());
}
fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}
fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

/// crc32c of `b` with the 4 bytes at `crc_at` taken as zero.
pub fn crc_with_hole(b: &[u8], crc_at: usize) -> u32 {
    let mut d = CRC32C.digest();
    d.update(&b[..crc_at]);
    d.update(&[0; 4]);
    d.update(&b[crc_at + 4..]);
    d.finalize()
}

/// FNV-1a 64 of a directory entry name.
pub fn name_hash(name: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in name {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Whether `name` may be a directory entry.
pub fn valid_name(name: &[u8]) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME
        && name != b"."
        && name != b".."
        && !name.iter().any(|&c| c == b'/' || c == 0)
        && core::str::from_utf8(name).is_ok()
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Superblock {
    pub block_size: u32,
    pub block_count: u64,
    pub free_blocks: u64,
    pub inode_count: u64,
    pub free_inodes: u64,
    pub bitmap_start: u64,
    pub bitmap_blocks: u64,
    pub itable_start: u64,
    pub itable_blocks: u64,
    pub data_start: u64,
    pub root_inode: u64,
    pub feature_compat: u64,
    pub feature_incompat: u64,
    pub feature_ro_compat: u64,
    pub uuid: [u8; 16],
    pub created: i64,
    pub written: i64,
    /// First block of the commit log (0 without [`INCOMPAT_LOG`]).
    pub log_start: u64,
    /// Blocks of the commit log (0 without [`INCOMPAT_LOG`]).
    pub log_blocks: u64,
    pub label: [u8; 64],
}

impl Superblock {
    /// Bits one bitmap block holds.
    pub fn bits_per_bitmap_block(block_size: u32) -> u64 {
        (block_size as u64 - HEADER_SIZE as u64) * 8
    }
    pub fn inodes_per_block(block_size: u32) -> u64 {
        block_size as u64 / INODE_SIZE as u64
    }

    /// Parses and checks the superblock's own consistency (not against the
    /// device).
    pub fn parse(b: &[u8]) -> Result<Superblock, Why> {
        if b.len() < SUPERBLOCK_SIZE {
            return Err(Why::Truncated);
        }
        let b = &b[..SUPERBLOCK_SIZE];
        if b[0..8] != MAGIC {
            return Err(Why::BadMagic);
        }
        if u32_at(b, 508) != crc_with_hole(b, 508) {
            return Err(Why::BadChecksum);
        }
        if u32_at(b, 8) != VERSION {
            return Err(Why::Unsupported("format version"));
        }
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&b[120..136]);
        let mut label = [0u8; 64];
        label.copy_from_slice(&b[176..240]);
        let sb = Superblock {
            block_size: u32_at(b, 12),
            block_count: u64_at(b, 16),
            free_blocks: u64_at(b, 24),
            inode_count: u64_at(b, 32),
            free_inodes: u64_at(b, 40),
            bitmap_start: u64_at(b, 48),
            bitmap_blocks: u64_at(b, 56),
            itable_start: u64_at(b, 64),
            itable_blocks: u64_at(b, 72),
            data_start: u64_at(b, 80),
            root_inode: u64_at(b, 88),
            feature_compat: u64_at(b, 96),
            feature_incompat: u64_at(b, 104),
            feature_ro_compat: u64_at(b, 112),
            uuid,
            created: u64_at(b, 136) as i64,
            written: u64_at(b, 144) as i64,
            log_start: u64_at(b, 152),
            log_blocks: u64_at(b, 160),
            label,
        };
        if u32_at(b, 168) != INODE_SIZE as u32 {
            return Err(Why::Unsupported("inode size"));
        }
        if u32_at(b, 172) != DIR_HASH_FNV1A64 {
            return Err(Why::Unsupported("directory hash"));
        }
        if sb.feature_incompat & !INCOMPAT_KNOWN != 0 {
            return Err(Why::Unsupported("incompatible feature bits"));
        }
        sb.check_geometry()?;
        sb.check_log()?;
        Ok(sb)
    }

    /// Whether the image has a commit log.
    pub fn has_log(&self) -> bool {
        self.feature_incompat & INCOMPAT_LOG != 0
    }

    /// The commit log lies in the data region, or is absent (both fields 0).
    fn check_log(&self) -> Result<(), Why> {
        if !self.has_log() {
            if self.log_start != 0 || self.log_blocks != 0 {
                return Err(Why::Field("commit log without its feature bit"));
            }
            return Ok(());
        }
        let end = self.log_start.checked_add(self.log_blocks);
        if self.log_start < self.data_start
            || self.log_blocks < MIN_LOG_BLOCKS
            || end.is_none_or(|e| e > self.block_count)
        {
            return Err(Why::Field("commit log region"));
        }
        Ok(())
    }

    fn check_geometry(&self) -> Result<(), Why> {
        let bs = self.block_size;
        if !bs.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&bs) {
            return Err(Why::Field("block size"));
        }
        let need_bitmap = self.block_count.div_ceil(Self::bits_per_bitmap_block(bs));
        let need_itable = self.inode_count.div_ceil(Self::inodes_per_block(bs));
        if self.block_count < 4 || self.inode_count == 0 || self.inode_count > 1 << 40 {
            return Err(Why::Field("block or inode count"));
        }
        if self.bitmap_start != 1
            || self.bitmap_blocks != need_bitmap
            || self.itable_start != self.bitmap_start + self.bitmap_blocks
            || self.itable_blocks != need_itable
            || self.data_start != self.itable_start + self.itable_blocks
            || self.data_start >= self.block_count
        {
            return Err(Why::Field("region layout"));
        }
        if self.free_blocks > self.block_count - self.data_start
            || self.free_inodes >= self.inode_count
        {
            return Err(Why::Field("free counts"));
        }
        if self.root_inode != ROOT_INO {
            return Err(Why::Field("root inode"));
        }
        Ok(())
    }

    pub fn emit(&self, b: &mut [u8]) {
        let b = &mut b[..SUPERBLOCK_SIZE];
        b.fill(0);
        b[0..8].copy_from_slice(&MAGIC);
        put32(b, 8, VERSION);
        put32(b, 12, self.block_size);
        put64(b, 16, self.block_count);
        put64(b, 24, self.free_blocks);
        put64(b, 32, self.inode_count);
        put64(b, 40, self.free_inodes);
        put64(b, 48, self.bitmap_start);
        put64(b, 56, self.bitmap_blocks);
        put64(b, 64, self.itable_start);
        put64(b, 72, self.itable_blocks);
        put64(b, 80, self.data_start);
        put64(b, 88, self.root_inode);
        put64(b, 96, self.feature_compat);
        put64(b, 104, self.feature_incompat);
        put64(b, 112, self.feature_ro_compat);
        b[120..136].copy_from_slice(&self.uuid);
        put64(b, 136, self.created as u64);
        put64(b, 144, self.written as u64);
        put64(b, 152, self.log_start);
        put64(b, 160, self.log_blocks);
        put32(b, 168, INODE_SIZE as u32);
        put32(b, 172, DIR_HASH_FNV1A64);
        b[176..240].copy_from_slice(&self.label);
        let crc = crc_with_hole(b, 508);
        put32(b, 508, crc);
    }

    /// The label as text.
    pub fn label_str(&self) -> &str {
        let end = self.label.iter().position(|&c| c == 0).unwrap_or(64);
        core::str::from_utf8(&self.label[..end]).unwrap_or("")
    }
}

/// One 24-byte entry of an extent tree: an extent at level 0, an index entry
/// above.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Extent {
    pub file_block: u64,
    pub disk_block: u64,
    pub len: u32,
    pub flags: u32,
}

impl Extent {
    pub fn unwritten(&self) -> bool {
        self.flags & EXTENT_UNWRITTEN != 0
    }
    pub fn end(&self) -> u64 {
        self.file_block + self.len as u64
    }
    pub fn parse(b: &[u8]) -> Extent {
        Extent {
            file_block: u64_at(b, 0),
            disk_block: u64_at(b, 8),
            len: u32_at(b, 16),
            flags: u32_at(b, 20),
        }
    }
    pub fn emit(&self, b: &mut [u8]) {
        put64(b, 0, self.file_block);
        put64(b, 8, self.disk_block);
        put32(b, 16, self.len);
        put32(b, 20, self.flags);
    }
}

/// An index entry of an extent tree node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct IndexEntry {
    pub file_block: u64,
    pub child: u64,
}

impl IndexEntry {
    pub fn parse(b: &[u8]) -> Result<IndexEntry, Why> {
        if u64_at(b, 16) != 0 {
            return Err(Why::Field("index entry reserved bytes"));
        }
        Ok(IndexEntry {
            file_block: u64_at(b, 0),
            child: u64_at(b, 8),
        })
    }
    pub fn emit(&self, b: &mut [u8]) {
        put64(b, 0, self.file_block);
        put64(b, 8, self.child);
        put64(b, 16, 0);
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Inode {
    pub mode: u16,
    pub links: u32,
    pub size: u64,
    pub blocks: u64,
    pub mtime: i64,
    pub mtime_nsec: u32,
    pub ctime: i64,
    pub ctime_nsec: u32,
    pub uid: u32,
    pub gid: u32,
    pub parent: u64,
    pub extent_count: u16,
    pub depth: u16,
    pub generation: u32,
    /// The inline area, raw: extents when `depth == 0`, index entries above.
    pub inline: [u8; INLINE_ENTRIES * ENTRY_SIZE],
}

impl Inode {
    pub fn is_dir(&self) -> bool {
        self.mode & S_IFMT == S_IFDIR
    }
    pub fn is_file(&self) -> bool {
        self.mode & S_IFMT == S_IFREG
    }

    /// Parses inode `ino`. `Ok(None)` for a free (all-zero) slot.
    pub fn parse(ino: u64, b: &[u8]) -> Result<Option<Inode>, Why> {
        if b.len() < INODE_SIZE {
            return Err(Why::Truncated);
        }
        let b = &b[..INODE_SIZE];
        if b.iter().all(|&x| x == 0) {
            return Ok(None);
        }
        if u32_at(b, 252) != Self::checksum(ino, b) {
            return Err(Why::BadChecksum);
        }
        let mode = u16_at(b, 0);
        if mode & S_IFMT != S_IFREG && mode & S_IFMT != S_IFDIR {
            return Err(Why::Field("file type"));
        }
        let extent_count = u16_at(b, 64);
        let depth = u16_at(b, 66);
        if extent_count as usize > INLINE_ENTRIES {
            return Err(Why::Field("inline extent count"));
        }
        if depth > MAX_EXTENT_DEPTH {
            return Err(Why::Field("extent tree depth"));
        }
        let links = u32_at(b, 4);
        if links == 0 {
            return Err(Why::Field("link count 0 in a used inode"));
        }
        let mut inline = [0u8; INLINE_ENTRIES * ENTRY_SIZE];
        inline.copy_from_slice(&b[INLINE_OFFSET..INLINE_OFFSET + INLINE_ENTRIES * ENTRY_SIZE]);
        Ok(Some(Inode {
            mode,
            links,
            size: u64_at(b, 8),
            blocks: u64_at(b, 16),
            mtime: u64_at(b, 24) as i64,
            ctime: u64_at(b, 32) as i64,
            mtime_nsec: u32_at(b, 40),
            ctime_nsec: u32_at(b, 44),
            uid: u32_at(b, 48),
            gid: u32_at(b, 52),
            parent: u64_at(b, 56),
            extent_count,
            depth,
            generation: u32_at(b, 68),
            inline,
        }))
    }

    fn checksum(ino: u64, b: &[u8]) -> u32 {
        let mut d = CRC32C.digest();
        d.update(&ino.to_le_bytes());
        d.update(&b[..252]);
        d.finalize()
    }

    pub fn emit(&self, ino: u64, b: &mut [u8]) {
        let b = &mut b[..INODE_SIZE];
        b.fill(0);
        put16(b, 0, self.mode);
        put32(b, 4, self.links);
        put64(b, 8, self.size);
        put64(b, 16, self.blocks);
        put64(b, 24, self.mtime as u64);
        put64(b, 32, self.ctime as u64);
        put32(b, 40, self.mtime_nsec);
        put32(b, 44, self.ctime_nsec);
        put32(b, 48, self.uid);
        put32(b, 52, self.gid);
        put64(b, 56, self.parent);
        put16(b, 64, self.extent_count);
        put16(b, 66, self.depth);
        put32(b, 68, self.generation);
        b[INLINE_OFFSET..INLINE_OFFSET + INLINE_ENTRIES * ENTRY_SIZE].copy_from_slice(&self.inline);
        let crc = Self::checksum(ino, b);
        put32(b, 252, crc);
    }

    /// Inline entry `i` as raw bytes.
    pub fn inline_entry(&self, i: usize) -> &[u8] {
        &self.inline[i * ENTRY_SIZE..(i + 1) * ENTRY_SIZE]
    }
}

/// The header of a metadata block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockHeader {
    pub kind: u16,
    pub level: u16,
    pub blockno: u64,
    pub count: u32,
    pub owner: u64,
}

impl BlockHeader {
    /// Parses and checks the header of metadata block `blockno` of `kind`.
    pub fn parse(b: &[u8], kind: u16, blockno: u64) -> Result<BlockHeader, Why> {
        if b.len() < HEADER_SIZE {
            return Err(Why::Truncated);
        }
        if b[0..4] != BLOCK_MAGIC {
            return Err(Why::BadMagic);
        }
        if u32_at(b, 20) != crc_with_hole(b, 20) {
            return Err(Why::BadChecksum);
        }
        let h = BlockHeader {
            kind: u16_at(b, 4),
            level: u16_at(b, 6),
            blockno: u64_at(b, 8),
            count: u32_at(b, 16),
            owner: u64_at(b, 24),
        };
        if h.kind != kind {
            return Err(Why::Field("block kind"));
        }
        if h.blockno != blockno {
            return Err(Why::Field("block number (misplaced block)"));
        }
        Ok(h)
    }

    /// Writes the header into `b` (a whole block whose payload is already in
    /// place) and seals the block's checksum.
    pub fn emit(&self, b: &mut [u8]) {
        b[0..4].copy_from_slice(&BLOCK_MAGIC);
        put16(b, 4, self.kind);
        put16(b, 6, self.level);
        put64(b, 8, self.blockno);
        put32(b, 16, self.count);
        put32(b, 20, 0);
        put64(b, 24, self.owner);
        let crc = crc_with_hole(b, 20);
        put32(b, 20, crc);
    }
}

/// A directory leaf entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirEntry {
    pub hash: u64,
    pub ino: u64,
    pub kind: u8,
    pub name: alloc::string::String,
}

pub const DT_REG: u8 = 1;
pub const DT_DIR: u8 = 2;
pub const DIR_ENTRY_FIXED: usize = 18;

impl DirEntry {
    pub fn encoded_len(name_len: usize) -> usize {
        DIR_ENTRY_FIXED + name_len
    }
    /// Parses the entry at the start of `b`; returns it and its length.
    pub fn parse(b: &[u8]) -> Result<(DirEntry, usize), Why> {
        if b.len() < DIR_ENTRY_FIXED {
            return Err(Why::Truncated);
        }
        let n = b[16] as usize;
        if b.len() < DIR_ENTRY_FIXED + n {
            return Err(Why::Truncated);
        }
        let name = &b[DIR_ENTRY_FIXED..DIR_ENTRY_FIXED + n];
        if !valid_name(name) {
            return Err(Why::Field("entry name"));
        }
        let name = core::str::from_utf8(name).map_err(|_| Why::Field("entry name"))?;
        Ok((
            DirEntry {
                hash: u64_at(b, 0),
                ino: u64_at(b, 8),
                kind: b[17],
                name: name.into(),
            },
            DIR_ENTRY_FIXED + n,
        ))
    }
    pub fn emit(&self, b: &mut [u8]) -> usize {
        put64(b, 0, self.hash);
        put64(b, 8, self.ino);
        b[16] = self.name.len() as u8;
        b[17] = self.kind;
        b[DIR_ENTRY_FIXED..DIR_ENTRY_FIXED + self.name.len()].copy_from_slice(self.name.as_bytes());
        DIR_ENTRY_FIXED + self.name.len()
    }
}

/// Reads the `u64` pair of a directory index entry.
pub fn dir_index_entry(b: &[u8]) -> (u64, u64) {
    (u64_at(b, 0), u64_at(b, 8))
}
pub fn emit_dir_index_entry(b: &mut [u8], key: u64, child: u64) {
    put64(b, 0, key);
    put64(b, 8, child);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_sb() -> Superblock {
        let mut label = [0u8; 64];
        label[..4].copy_from_slice(b"test");
        Superblock {
            block_size: 4096,
            block_count: 256,
            free_blocks: 100,
            inode_count: 32,
            free_inodes: 20,
            bitmap_start: 1,
            bitmap_blocks: 1,
            itable_start: 2,
            itable_blocks: 2,
            data_start: 4,
            root_inode: 1,
            feature_compat: 0,
            feature_incompat: 0,
            feature_ro_compat: 0,
            uuid: [0xab; 16],
            created: 1_700_000_000,
            written: 1_700_000_001,
            log_start: 0,
            log_blocks: 0,
            label,
        }
    }

    #[test]
    fn superblock_golden_bytes() {
        let mut b = [0u8; 512];
        sample_sb().emit(&mut b);
        let mut want = [0u8; 512];
        want[0..8].copy_from_slice(b"dioxidFS");
        want[8] = 1;
        want[12..16].copy_from_slice(&4096u32.to_le_bytes());
        want[16] = 0x00;
        want[17] = 0x01; // 256 blocks
        want[24] = 100;
        want[32] = 32;
        want[40] = 20;
        want[48] = 1;
        want[56] = 1;
        want[64] = 2;
        want[72] = 2;
        want[80] = 4;
        want[88] = 1;
        want[120..136].fill(0xab);
        want[136..144].copy_from_slice(&1_700_000_000u64.to_le_bytes());
        want[144..152].copy_from_slice(&1_700_000_001u64.to_le_bytes());
        want[168..172].copy_from_slice(&256u32.to_le_bytes());
        want[172] = 1;
        want[176..180].copy_from_slice(b"test");
        // crc32c over the 512 bytes with the crc field zero.
        let crc = CRC32C.checksum(&want);
        want[508..512].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(b[..], want[..]);
        assert_eq!(Superblock::parse(&b).unwrap(), sample_sb());
        // The known crc32c check value of the algorithm.
        assert_eq!(CRC32C.checksum(b"123456789"), 0xe306_9283);
    }

    #[test]
    fn superblock_rejections() {
        let mut b = [0u8; 512];
        sample_sb().emit(&mut b);
        let mut bad = b;
        bad[0] = b'X';
        assert_eq!(Superblock::parse(&bad), Err(Why::BadMagic));
        let mut bad = b;
        bad[300] = 1;
        assert_eq!(Superblock::parse(&bad), Err(Why::BadChecksum));
        let mut sb = sample_sb();
        sb.block_size = 2048;
        sb.emit(&mut bad);
        assert_eq!(Superblock::parse(&bad), Err(Why::Field("block size")));
        let mut sb = sample_sb();
        sb.itable_blocks = 3;
        sb.emit(&mut bad);
        assert_eq!(Superblock::parse(&bad), Err(Why::Field("region layout")));
        let mut sb = sample_sb();
        sb.feature_incompat = 1 << 5;
        sb.emit(&mut bad);
        assert_eq!(
            Superblock::parse(&bad),
            Err(Why::Unsupported("incompatible feature bits"))
        );
        assert_eq!(Superblock::parse(&b[..100]), Err(Why::Truncated));
        // The commit log: its bit and its region go together.
        let mut sb = sample_sb();
        sb.log_start = 200;
        sb.log_blocks = 16;
        sb.emit(&mut bad);
        assert_eq!(
            Superblock::parse(&bad),
            Err(Why::Field("commit log without its feature bit"))
        );
        for (start, blocks) in [(3, 16), (250, 16), (200, 2), (u64::MAX, 2)] {
            let mut sb = sample_sb();
            sb.feature_incompat = INCOMPAT_LOG;
            (sb.log_start, sb.log_blocks) = (start, blocks);
            sb.emit(&mut bad);
            assert_eq!(
                Superblock::parse(&bad),
                Err(Why::Field("commit log region")),
                "{start} {blocks}"
            );
        }
    }

    #[test]
    fn superblock_with_a_log_golden_bytes() {
        let mut sb = sample_sb();
        sb.feature_incompat = INCOMPAT_LOG;
        sb.log_start = 200;
        sb.log_blocks = 16;
        let mut b = [0u8; 512];
        sb.emit(&mut b);
        assert_eq!(b[104], 1);
        assert_eq!(b[152..160], 200u64.to_le_bytes());
        assert_eq!(b[160..168], 16u64.to_le_bytes());
        assert_eq!(Superblock::parse(&b).unwrap(), sb);
        assert!(sb.has_log());
    }

    #[test]
    fn inode_golden_bytes() {
        let mut inline = [0u8; 144];
        Extent {
            file_block: 0,
            disk_block: 0x40,
            len: 3,
            flags: 0,
        }
        .emit(&mut inline[0..24]);
        let ino = Inode {
            mode: S_IFREG | 0o644,
            links: 1,
            size: 10_000,
            blocks: 3,
            mtime: 1_600_000_000,
            mtime_nsec: 5,
            ctime: 1_600_000_001,
            ctime_nsec: 6,
            uid: 1000,
            gid: 100,
            parent: 0,
            extent_count: 1,
            depth: 0,
            generation: 7,
            inline,
        };
        let mut b = [0u8; 256];
        ino.emit(9, &mut b);
        let mut want = [0u8; 256];
        want[0..2].copy_from_slice(&0o100644u16.to_le_bytes());
        want[4] = 1;
        want[8..16].copy_from_slice(&10_000u64.to_le_bytes());
        want[16] = 3;
        want[24..32].copy_from_slice(&1_600_000_000u64.to_le_bytes());
        want[32..40].copy_from_slice(&1_600_000_001u64.to_le_bytes());
        want[40] = 5;
        want[44] = 6;
        want[48..52].copy_from_slice(&1000u32.to_le_bytes());
        want[52] = 100;
        want[64] = 1;
        want[68] = 7;
        want[96] = 0x40; // extent 0: disk block
        want[104] = 3; // extent 0: len
        let mut d = CRC32C.digest();
        d.update(&9u64.to_le_bytes());
        d.update(&want[..252]);
        want[252..256].copy_from_slice(&d.finalize().to_le_bytes());
        assert_eq!(b[..], want[..]);
        assert_eq!(Inode::parse(9, &b).unwrap(), Some(ino));
        // The inode number is part of the checksum: a misplaced inode fails.
        assert_eq!(Inode::parse(10, &b), Err(Why::BadChecksum));
        assert_eq!(Inode::parse(3, &[0u8; 256]), Ok(None));
    }

    #[test]
    fn block_header_and_dir_entry_golden() {
        let mut blk = [0u8; 4096];
        let e = DirEntry {
            hash: name_hash(b"a.bin"),
            ino: 5,
            kind: DT_REG,
            name: "a.bin".into(),
        };
        assert_eq!(e.emit(&mut blk[32..]), 23);
        BlockHeader {
            kind: KIND_DIR,
            level: 0,
            blockno: 77,
            count: 1,
            owner: 2,
        }
        .emit(&mut blk);
        assert_eq!(&blk[0..4], b"DXMB");
        assert_eq!(&blk[4..8], &[3, 0, 0, 0]);
        assert_eq!(blk[8], 77);
        assert_eq!(blk[16], 1);
        assert_eq!(blk[24], 2);
        let h = BlockHeader::parse(&blk, KIND_DIR, 77).unwrap();
        assert_eq!(h.count, 1);
        assert_eq!(
            BlockHeader::parse(&blk, KIND_DIR, 78),
            Err(Why::Field("block number (misplaced block)"))
        );
        assert_eq!(DirEntry::parse(&blk[32..]).unwrap(), (e, 23));
        // FNV-1a 64 reference values.
        assert_eq!(name_hash(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(name_hash(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert!(valid_name("é".as_bytes()));
        for bad in [&b""[..], b".", b"..", b"a/b", b"a\0b", &[0xff, 0xfe]] {
            assert!(!valid_name(bad), "{bad:?}");
        }
        assert!(!valid_name(&[b'x'; 256]));
    }
}
