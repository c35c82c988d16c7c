//! Reading a dxfs image: mount, inodes, extent maps, directories, file data.

use crate::dev::{BlockDevice, DevError};
use crate::error::{Error, Result, Structure, Why};
use crate::format::*;
use alloc::collections::{BTreeMap, BTreeSet};
use alloc::string::{String, ToString};
use alloc::vec;
use alloc::vec::Vec;

/// A mounted filesystem, read side. A committed transaction in the commit
/// log is laid over the home blocks it changes (`overlay`), so that an
/// image whose last checkpoint a crash cut short reads as committed without
/// writing to the device; [`crate::write::WritableFs`] writes it home.
pub struct Fs<D: BlockDevice> {
    pub(crate) dev: D,
    pub(crate) sb: Superblock,
    bs: usize,
    pub(crate) overlay: BTreeMap<u64, Vec<u8>>,
    /// The sequence number of the log's committed transaction, if any.
    pub(crate) log_seq: Option<u64>,
}

/// An open inode with its extent list cached: mapping a file offset is a
/// binary search and allocates nothing.
#[derive(Clone, Debug)]
pub struct File {
    pub ino: u64,
    pub inode: Inode,
    extents: Vec<Extent>,
    block_size: u32,
    block_shift: u32,
    /// The filesystem's write path when the file takes writes: its holes
    /// and unwritten extents are asked there again (they may have filled
    /// since this snapshot; written blocks never change).
    writer: Option<Writer>,
}

/// A file's shared write path.
#[derive(Clone)]
pub struct Writer(pub alloc::sync::Arc<dyn crate::write::FileWriter>);

impl core::fmt::Debug for Writer {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("Writer")
    }
}

/// Where a file block lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mapping {
    /// `blocks` blocks from `disk_block` hold the data.
    Mapped { disk_block: u64, blocks: u64 },
    /// Allocated but unwritten: reads as zeroes.
    Unwritten { disk_block: u64, blocks: u64 },
    /// Not allocated: reads as zeroes. `blocks` up to the next extent (or
    /// past EOF: `u64::MAX`).
    Hole { blocks: u64 },
}

impl File {
    /// An open file from its inode and its (validated, sorted) extents.
    pub(crate) fn from_parts(
        ino: u64,
        inode: Inode,
        extents: Vec<Extent>,
        block_size: u32,
    ) -> File {
        File {
            ino,
            inode,
            extents,
            block_size,
            block_shift: block_size.trailing_zeros(),
            writer: None,
        }
    }

    /// The file with the filesystem's write path: writes that allocate go
    /// there, and reads of its holes and unwritten extents ask it.
    pub fn with_writer(mut self, w: Writer) -> File {
        self.writer = Some(w);
        self
    }

    /// The filesystem's write path, when the file has one.
    pub fn writer(&self) -> Option<&dyn crate::write::FileWriter> {
        self.writer.as_ref().map(|w| &*w.0)
    }

    /// The mapping of file block `fb` as the file is now: the snapshot's,
    /// or for its holes and unwritten extents the write path's.
    #[inline]
    pub fn map_now(&self, fb: u64) -> Mapping {
        match self.map(fb) {
            m @ Mapping::Mapped { .. } => m,
            m => self.map_again(fb, m),
        }
    }

    /// A hole or unwritten extent of the snapshot, asked again: out of the
    /// read path's line (the simple path maps written blocks only).
    #[cold]
    #[inline(never)]
    fn map_again(&self, fb: u64, snapshot: Mapping) -> Mapping {
        self.writer()
            .and_then(|w| w.map(self.ino, fb))
            .unwrap_or(snapshot)
    }

    pub fn size(&self) -> u64 {
        self.inode.size
    }
    pub fn extents(&self) -> &[Extent] {
        &self.extents
    }
    pub fn block_size(&self) -> u32 {
        self.block_size
    }
    /// log2 of the block size.
    pub fn block_shift(&self) -> u32 {
        self.block_shift
    }

    /// The mapping of file block `fb`: O(log extents), no allocation.
    #[inline]
    pub fn map(&self, fb: u64) -> Mapping {
        let i = self.extents.partition_point(|e| e.end() <= fb);
        match self.extents.get(i) {
            Some(e) if e.file_block <= fb => {
                let skip = fb - e.file_block;
                let disk_block = e.disk_block + skip;
                let blocks = e.len as u64 - skip;
                if e.unwritten() {
                    Mapping::Unwritten { disk_block, blocks }
                } else {
                    Mapping::Mapped { disk_block, blocks }
                }
            }
            Some(e) => Mapping::Hole {
                blocks: e.file_block - fb,
            },
            None => Mapping::Hole { blocks: u64::MAX },
        }
    }
}

/// The state of one [`Fs::readdir`]: the entries so far, the blocks
/// visited, one block's buffer, and where a damaged block below the first
/// is reported (`None`: it is an error).
struct Readdir<'a> {
    out: Vec<DirEntry>,
    seen: BTreeSet<u64>,
    buf: Vec<u8>,
    damaged: Option<&'a mut Vec<Error>>,
}

/// One entry of a recursive walk.
#[derive(Clone, Debug)]
pub struct WalkEntry {
    pub path: String,
    pub ino: u64,
    pub inode: Inode,
}

impl<D: BlockDevice> Fs<D> {
    /// Reads and validates the superblock and the root directory.
    pub fn mount(dev: D) -> Result<Self> {
        let sector = dev.sector_size().max(1) as usize;
        let first = 4096usize.max(sector);
        if dev.size() < first as u64 {
            return Err(Error::corrupt(Structure::Superblock, 0, Why::Truncated));
        }
        let mut buf = vec![0u8; first];
        dev.read_at(0, &mut buf)
            .map_err(|err| Error::Device { block: 0, err })?;
        let sb =
            Superblock::parse(&buf).map_err(|w| Error::corrupt(Structure::Superblock, 0, w))?;
        if sb.block_size < dev.sector_size() {
            return Err(Error::BlockSize {
                fs: sb.block_size,
                device: dev.sector_size(),
            });
        }
        let dev_blocks = dev.size() / sb.block_size as u64;
        if sb.block_count > dev_blocks {
            return Err(Error::corrupt(
                Structure::Superblock,
                0,
                Why::OutOfRange("block count (image truncated?)"),
            ));
        }
        let mut fs = Fs {
            bs: sb.block_size as usize,
            dev,
            sb,
            overlay: BTreeMap::new(),
            log_seq: None,
        };
        fs.lay_over_log()?;
        let root = fs.inode(ROOT_INO)?;
        if !root.is_dir() {
            return Err(Error::corrupt(
                Structure::Inode(ROOT_INO),
                fs.inode_block(ROOT_INO),
                Why::Field("root is not a directory"),
            ));
        }
        Ok(fs)
    }

    /// Reads the commit log; a committed transaction's blocks are laid
    /// over their home blocks (the superblock among them: it is parsed
    /// again and must keep its log).
    fn lay_over_log(&mut self) -> Result<()> {
        let bs = self.bs as u64;
        let dev = &self.dev;
        let txn = crate::journal::read(&self.sb, &mut |blk, buf| {
            dev.read_at(blk * bs, buf)
                .map_err(|err| Error::Device { block: blk, err })
        })?;
        let Some(txn) = txn else {
            return Ok(());
        };
        if let Some((_, b0)) = txn.blocks.iter().find(|(home, _)| *home == 0) {
            let sb = Superblock::parse(b0)
                .map_err(|w| Error::corrupt(Structure::Log, self.sb.log_start, w))?;
            if sb.block_size != self.sb.block_size
                || sb.block_count != self.sb.block_count
                || sb.log_start != self.sb.log_start
                || sb.log_blocks != self.sb.log_blocks
            {
                return Err(Error::corrupt(
                    Structure::Log,
                    self.sb.log_start,
                    Why::Field("logged superblock's geometry"),
                ));
            }
            self.sb = sb;
        }
        self.log_seq = Some(txn.seq);
        self.overlay = txn.blocks.into_iter().collect();
        Ok(())
    }

    pub fn superblock(&self) -> &Superblock {
        &self.sb
    }

    /// The sequence number of the committed transaction found in the
    /// commit log at mount, if any; its blocks are read in place of their
    /// home copies.
    pub fn log_seq(&self) -> Option<u64> {
        self.log_seq
    }

    /// How many home blocks the commit log's transaction replaces.
    pub fn logged_blocks(&self) -> usize {
        self.overlay.len()
    }
    pub fn block_size(&self) -> u32 {
        self.sb.block_size
    }
    pub fn device(&self) -> &D {
        &self.dev
    }

    /// Reads whole blocks starting at `block` into `buf`.
    pub fn read_blocks(&self, block: u64, buf: &mut [u8]) -> Result<()> {
        let n = (buf.len() / self.bs) as u64;
        if block
            .checked_add(n)
            .is_none_or(|end| end > self.sb.block_count)
        {
            // Past the filesystem (which may be smaller than the device).
            return Err(Error::Device {
                block,
                err: DevError::OutOfRange {
                    offset: block.saturating_mul(self.bs as u64),
                    len: buf.len(),
                    size: self.sb.block_count.saturating_mul(self.bs as u64),
                },
            });
        }
        self.dev
            .read_at(block * self.bs as u64, buf)
            .map_err(|err| Error::Device { block, err })?;
        for (&b, data) in self.overlay.range(block..block + n) {
            let at = (b - block) as usize * self.bs;
            buf[at..at + self.bs].copy_from_slice(data);
        }
        Ok(())
    }

    pub(crate) fn inode_block(&self, ino: u64) -> u64 {
        self.sb.itable_start + (ino - 1) / Superblock::inodes_per_block(self.sb.block_size)
    }

    /// Reads inode `ino`; an error when it is out of range, free or damaged.
    pub fn inode(&self, ino: u64) -> Result<Inode> {
        self.inode_opt(ino)?.ok_or(Error::BadInode(ino))
    }

    /// Reads inode slot `ino`: `None` when free.
    pub fn inode_opt(&self, ino: u64) -> Result<Option<Inode>> {
        if ino == 0 || ino > self.sb.inode_count {
            return Err(Error::BadInode(ino));
        }
        let blk = self.inode_block(ino);
        let per = Superblock::inodes_per_block(self.sb.block_size);
        let off = ((ino - 1) % per) as usize * INODE_SIZE;
        // Read just the sector holding the inode.
        let sector = self.dev.sector_size() as usize;
        let sec_off = off / sector * sector;
        let mut buf = vec![0u8; sector.max(INODE_SIZE)];
        let len = sector.max(INODE_SIZE);
        self.dev
            .read_at(blk * self.bs as u64 + sec_off as u64, &mut buf[..len])
            .map_err(|err| Error::Device { block: blk, err })?;
        if let Some(logged) = self.overlay.get(&blk) {
            buf[..len].copy_from_slice(&logged[sec_off..sec_off + len]);
        }
        Inode::parse(ino, &buf[off - sec_off..])
            .map_err(|w| Error::corrupt(Structure::Inode(ino), blk, w))
    }

    /// Opens inode `ino`: reads it and its extent tree.
    pub fn open(&self, ino: u64) -> Result<File> {
        let inode = self.inode(ino)?;
        self.open_inode(ino, inode)
    }

    /// Opens inode `ino`, already read as `inode`: reads its extent tree.
    fn open_inode(&self, ino: u64, inode: Inode) -> Result<File> {
        let extents = self.extents(ino, &inode)?;
        Ok(File::from_parts(ino, inode, extents, self.sb.block_size))
    }

    /// Every extent of inode `ino`, validated: sorted, not overlapping in the
    /// file, on disk within the data region, not past the end of the file.
    pub fn extents(&self, ino: u64, inode: &Inode) -> Result<Vec<Extent>> {
        let mut out = Vec::new();
        let mut tree_blocks = Vec::new();
        self.extents_with_tree(ino, inode, &mut out, &mut tree_blocks)?;
        Ok(out)
    }

    /// As [`Fs::extents`], also listing the tree's own blocks.
    pub fn extents_with_tree(
        &self,
        ino: u64,
        inode: &Inode,
        out: &mut Vec<Extent>,
        tree_blocks: &mut Vec<u64>,
    ) -> Result<()> {
        let what = Structure::ExtentTree(ino);
        let iblk = self.inode_block(ino);
        let entries: Vec<&[u8]> = (0..inode.extent_count as usize)
            .map(|i| inode.inline_entry(i))
            .collect();
        self.collect(ino, &entries, inode.depth, out, tree_blocks, iblk)?;
        let file_blocks = inode.size.div_ceil(self.bs as u64);
        let mut prev_end = 0u64;
        for (i, e) in out.iter().enumerate() {
            if i > 0 && e.file_block < prev_end {
                return Err(Error::corrupt(what, iblk, Why::Order("extents")));
            }
            if e.end() > file_blocks {
                return Err(Error::corrupt(
                    what,
                    iblk,
                    Why::OutOfRange("extent past end of file"),
                ));
            }
            prev_end = e.end();
        }
        Ok(())
    }

    fn data_range_ok(&self, start: u64, len: u64) -> bool {
        start >= self.sb.data_start
            && start
                .checked_add(len)
                .is_some_and(|e| e <= self.sb.block_count)
    }

    fn collect(
        &self,
        ino: u64,
        entries: &[&[u8]],
        depth: u16,
        out: &mut Vec<Extent>,
        tree_blocks: &mut Vec<u64>,
        at_block: u64,
    ) -> Result<()> {
        let what = Structure::ExtentTree(ino);
        if depth == 0 {
            for raw in entries {
                let e = Extent::parse(raw);
                if e.len == 0 || e.flags & !EXTENT_UNWRITTEN != 0 {
                    return Err(Error::corrupt(what, at_block, Why::Field("extent")));
                }
                if !self.data_range_ok(e.disk_block, e.len as u64) {
                    return Err(Error::corrupt(
                        what,
                        at_block,
                        Why::OutOfRange("extent disk blocks"),
                    ));
                }
                if e.file_block.checked_add(e.len as u64).is_none() {
                    return Err(Error::corrupt(
                        what,
                        at_block,
                        Why::OutOfRange("extent file blocks"),
                    ));
                }
                out.push(e);
                // Extents cannot outnumber the blocks of the device.
                if out.len() as u64 > self.sb.block_count {
                    return Err(Error::corrupt(
                        what,
                        at_block,
                        Why::Loop("extent tree node"),
                    ));
                }
            }
            return Ok(());
        }
        let per_node = (self.bs - HEADER_SIZE) / ENTRY_SIZE;
        let mut node = vec![0u8; self.bs];
        for raw in entries {
            let ix = IndexEntry::parse(raw).map_err(|w| Error::corrupt(what, at_block, w))?;
            if !self.data_range_ok(ix.child, 1) {
                return Err(Error::corrupt(
                    what,
                    at_block,
                    Why::OutOfRange("extent tree child"),
                ));
            }
            if tree_blocks.len() as u64 >= self.sb.block_count || tree_blocks.contains(&ix.child) {
                return Err(Error::corrupt(
                    what,
                    ix.child,
                    Why::Loop("extent tree node"),
                ));
            }
            tree_blocks.push(ix.child);
            self.read_blocks(ix.child, &mut node)?;
            let h = BlockHeader::parse(&node, KIND_EXTENT, ix.child)
                .map_err(|w| Error::corrupt(what, ix.child, w))?;
            if h.owner != ino || h.level != depth - 1 || h.count as usize > per_node || h.count == 0
            {
                return Err(Error::corrupt(
                    what,
                    ix.child,
                    Why::Field("extent node header"),
                ));
            }
            let before = out.len();
            let children: Vec<&[u8]> = (0..h.count as usize)
                .map(|i| &node[HEADER_SIZE + i * ENTRY_SIZE..HEADER_SIZE + (i + 1) * ENTRY_SIZE])
                .collect();
            self.collect(ino, &children, depth - 1, out, tree_blocks, ix.child)?;
            if out
                .get(before)
                .is_some_and(|e| e.file_block < ix.file_block)
            {
                return Err(Error::corrupt(what, ix.child, Why::Order("index key")));
            }
        }
        Ok(())
    }

    /// Reads up to `buf.len()` bytes at `offset`; returns the count (short at
    /// end of file). Holes and unwritten extents read as zeroes.
    pub fn read(&self, f: &File, offset: u64, buf: &mut [u8]) -> Result<usize> {
        if offset >= f.size() {
            return Ok(0);
        }
        let n = (buf.len() as u64).min(f.size() - offset) as usize;
        let bs = self.bs as u64;
        let mut done = 0usize;
        let mut bounce: Vec<u8> = Vec::new();
        while done < n {
            let pos = offset + done as u64;
            let fb = pos / bs;
            let within = (pos % bs) as usize;
            let left = n - done;
            match f.map(fb) {
                Mapping::Hole { blocks } | Mapping::Unwritten { blocks, .. } => {
                    let span =
                        (blocks.saturating_mul(bs) - within as u64).min(left as u64) as usize;
                    buf[done..done + span].fill(0);
                    done += span;
                }
                Mapping::Mapped { disk_block, blocks } => {
                    if within == 0 && left >= self.bs {
                        let whole = (left / self.bs).min(blocks as usize);
                        self.read_blocks(disk_block, &mut buf[done..done + whole * self.bs])?;
                        done += whole * self.bs;
                    } else {
                        if bounce.is_empty() {
                            bounce = vec![0u8; self.bs];
                        }
                        self.read_blocks(disk_block, &mut bounce)?;
                        let span = (self.bs - within).min(left);
                        buf[done..done + span].copy_from_slice(&bounce[within..within + span]);
                        done += span;
                    }
                }
            }
        }
        Ok(n)
    }

    /// Reads directory block `lblock` of `dir` and checks its header.
    fn dir_node(&self, dir: &File, lblock: u64, buf: &mut [u8]) -> Result<BlockHeader> {
        let what = Structure::Directory(dir.ino);
        let disk = match dir.map(lblock) {
            Mapping::Mapped { disk_block, .. } => disk_block,
            _ => {
                return Err(Error::corrupt(
                    what,
                    self.inode_block(dir.ino),
                    Why::OutOfRange("directory block (hole)"),
                ))
            }
        };
        self.read_blocks(disk, buf)?;
        let h =
            BlockHeader::parse(buf, KIND_DIR, disk).map_err(|w| Error::corrupt(what, disk, w))?;
        if h.owner != dir.ino || h.level > MAX_DIR_DEPTH {
            return Err(Error::corrupt(
                what,
                disk,
                Why::Field("directory node header"),
            ));
        }
        if h.level > 0 && (h.count as usize * 16 > self.bs - HEADER_SIZE || h.count == 0) {
            return Err(Error::corrupt(
                what,
                disk,
                Why::Field("directory index count"),
            ));
        }
        Ok(h)
    }

    fn dir_leaf_entries(&self, dir: &File, h: &BlockHeader, buf: &[u8]) -> Result<Vec<DirEntry>> {
        let what = Structure::Directory(dir.ino);
        let mut at = HEADER_SIZE;
        let mut out = Vec::with_capacity(h.count as usize);
        for _ in 0..h.count {
            let (e, len) =
                DirEntry::parse(&buf[at..]).map_err(|w| Error::corrupt(what, h.blockno, w))?;
            if e.hash != name_hash(e.name.as_bytes()) {
                return Err(Error::corrupt(what, h.blockno, Why::Field("entry hash")));
            }
            if let Some(p) = out.last() {
                let p: &DirEntry = p;
                if (p.hash, p.name.as_str()) >= (e.hash, e.name.as_str()) {
                    return Err(Error::corrupt(
                        what,
                        h.blockno,
                        Why::Order("directory entries"),
                    ));
                }
            }
            at += len;
            out.push(e);
        }
        Ok(out)
    }

    fn dir_index(&self, dir: &File, h: &BlockHeader, buf: &[u8]) -> Result<Vec<(u64, u64)>> {
        let what = Structure::Directory(dir.ino);
        let dir_blocks = dir.size().div_ceil(self.bs as u64);
        let mut out: Vec<(u64, u64)> = Vec::with_capacity(h.count as usize);
        for i in 0..h.count as usize {
            let (k, c) = dir_index_entry(&buf[HEADER_SIZE + i * 16..]);
            if c == 0 || c >= dir_blocks {
                return Err(Error::corrupt(
                    what,
                    h.blockno,
                    Why::OutOfRange("directory child block"),
                ));
            }
            if out.last().is_some_and(|&(pk, _)| pk > k) {
                return Err(Error::corrupt(
                    what,
                    h.blockno,
                    Why::Order("directory index keys"),
                ));
            }
            out.push((k, c));
        }
        Ok(out)
    }

    /// Looks `name` up in directory `dir`: O(depth) blocks.
    pub fn lookup(&self, dir: &File, name: &str) -> Result<Option<DirEntry>> {
        if !dir.inode.is_dir() {
            return Err(Error::NotADirectory(dir.ino.to_string()));
        }
        if !valid_name(name.as_bytes()) {
            return Ok(None);
        }
        let h = name_hash(name.as_bytes());
        let mut buf = vec![0u8; self.bs];
        self.lookup_in(dir, 0, None, h, name, &mut buf)
    }

    fn lookup_in(
        &self,
        dir: &File,
        lblock: u64,
        want_level: Option<u16>,
        h: u64,
        name: &str,
        buf: &mut Vec<u8>,
    ) -> Result<Option<DirEntry>> {
        let hdr = self.dir_node(dir, lblock, buf)?;
        if want_level.is_some_and(|l| l != hdr.level) {
            return Err(Error::corrupt(
                Structure::Directory(dir.ino),
                hdr.blockno,
                Why::Field("directory node level"),
            ));
        }
        if hdr.level == 0 {
            let entries = self.dir_leaf_entries(dir, &hdr, buf)?;
            return Ok(entries.into_iter().find(|e| e.hash == h && e.name == name));
        }
        let index = self.dir_index(dir, &hdr, buf)?;
        // The leftmost child that may hold `h`; equal hashes may continue
        // into the following children.
        let start = index.partition_point(|&(k, _)| k < h).saturating_sub(1);
        for (j, &(k, child)) in index.iter().enumerate().skip(start) {
            if j > start && k > h {
                break;
            }
            if let Some(e) = self.lookup_in(dir, child, Some(hdr.level - 1), h, name, buf)? {
                return Ok(Some(e));
            }
        }
        Ok(None)
    }

    /// Every entry of directory `dir`, in hash order.
    pub fn readdir(&self, dir: &File) -> Result<Vec<DirEntry>> {
        self.readdir_with(dir, None)
    }

    /// As [`Fs::readdir`], but a damaged block below the directory's first
    /// (the root of its tree) costs only the entries below it: its error is
    /// pushed on `damaged` and the other blocks are read. An error only when
    /// the first block itself is damaged.
    pub fn readdir_partial(&self, dir: &File, damaged: &mut Vec<Error>) -> Result<Vec<DirEntry>> {
        self.readdir_with(dir, Some(damaged))
    }

    fn readdir_with(&self, dir: &File, damaged: Option<&mut Vec<Error>>) -> Result<Vec<DirEntry>> {
        if !dir.inode.is_dir() {
            return Err(Error::NotADirectory(dir.ino.to_string()));
        }
        let mut r = Readdir {
            out: Vec::new(),
            seen: BTreeSet::new(),
            buf: vec![0u8; self.bs],
            damaged,
        };
        self.readdir_in(dir, 0, None, &mut r)?;
        Ok(r.out)
    }

    fn readdir_in(
        &self,
        dir: &File,
        lblock: u64,
        want_level: Option<u16>,
        r: &mut Readdir<'_>,
    ) -> Result<()> {
        let what = Structure::Directory(dir.ino);
        if !r.seen.insert(lblock) {
            return Err(Error::corrupt(what, lblock, Why::Loop("directory block")));
        }
        let hdr = self.dir_node(dir, lblock, &mut r.buf)?;
        if want_level.is_some_and(|l| l != hdr.level) {
            return Err(Error::corrupt(
                what,
                hdr.blockno,
                Why::Field("directory node level"),
            ));
        }
        if hdr.level == 0 {
            let entries = self.dir_leaf_entries(dir, &hdr, &r.buf)?;
            if let (Some(p), Some(f)) = (r.out.last(), entries.first()) {
                let p: &DirEntry = p;
                if (p.hash, p.name.as_str()) >= (f.hash, f.name.as_str()) {
                    return Err(Error::corrupt(
                        what,
                        hdr.blockno,
                        Why::Order("directory leaves"),
                    ));
                }
            }
            r.out.extend(entries);
            return Ok(());
        }
        let index = self.dir_index(dir, &hdr, &r.buf)?;
        for (_, child) in index {
            let res = self.readdir_in(dir, child, Some(hdr.level - 1), r);
            match (res, r.damaged.as_deref_mut()) {
                (Ok(()), _) => {}
                (Err(e), Some(d)) => d.push(e),
                (Err(e), None) => return Err(e),
            }
        }
        Ok(())
    }

    /// Resolves an absolute or root-relative path (`/a/b`, `a/b`) to an inode.
    pub fn resolve(&self, path: &str) -> Result<u64> {
        let mut ino = ROOT_INO;
        for comp in path.split('/').filter(|c| !c.is_empty()) {
            if !valid_name(comp.as_bytes()) {
                return Err(Error::InvalidPath(path.into()));
            }
            let dir = self.open(ino)?;
            if !dir.inode.is_dir() {
                return Err(Error::NotADirectory(path.into()));
            }
            match self.lookup(&dir, comp)? {
                Some(e) => ino = e.ino,
                None => return Err(Error::NotFound(path.into())),
            }
        }
        Ok(ino)
    }

    /// Every file and directory below the root, depth first, sorted by name
    /// within a directory: [`Fs::scan`], with its first damage an error.
    pub fn walk(&self) -> Result<Vec<WalkEntry>> {
        let scan = self.scan()?;
        if let Some(d) = scan.damage.into_iter().next() {
            return Err(d.error);
        }
        Ok(scan
            .found
            .into_iter()
            .map(|f| {
                let inode = match f.kind {
                    Kind::Dir(inode) => inode,
                    Kind::File(file) => file.inode,
                };
                WalkEntry {
                    path: f.path,
                    ino: f.ino,
                    inode,
                }
            })
            .collect())
    }

    /// Walks the tree as far as it checks out: every directory and regular
    /// file whose own metadata (inode, extent tree) and path (the directory
    /// blocks that lead to it) are sound, each file opened, and one
    /// [`Damage`] per damaged structure met on the way, which costs only
    /// what lies behind it (the file, the directory's subtree, the entries
    /// of one directory block). A damaged inode reached by several paths
    /// (hard links) is reported once. An error only when the root
    /// directory, which every path goes through, cannot be read (its inode,
    /// extent tree or first block).
    pub fn scan(&self) -> Result<Scan> {
        let root = self.open(ROOT_INO)?;
        if !root.inode.is_dir() {
            return Err(Error::corrupt(
                Structure::Inode(ROOT_INO),
                self.inode_block(ROOT_INO),
                Why::Field("root is not a directory"),
            ));
        }
        let mut scan = Scan::default();
        let mut seen = BTreeSet::new();
        seen.insert(ROOT_INO);
        // Inodes found damaged: a second path to one adds no finding.
        let mut bad = BTreeSet::new();
        let mut stack = vec![(String::new(), root)];
        while let Some((path, dir)) = stack.pop() {
            let mut bad_blocks = Vec::new();
            let mut entries = match self.readdir_partial(&dir, &mut bad_blocks) {
                Ok(e) => e,
                Err(e) if dir.ino == ROOT_INO => return Err(e),
                Err(error) => {
                    scan.damage.push(Damage {
                        path,
                        error,
                        lost: Lost::Directory,
                    });
                    continue;
                }
            };
            scan.damage
                .extend(bad_blocks.into_iter().map(|error| Damage {
                    path: path.clone(),
                    error,
                    lost: Lost::Entries,
                }));
            entries.sort_by(|a, b| a.name.cmp(&b.name));
            let mut subdirs = Vec::new();
            for e in entries {
                if bad.contains(&e.ino) {
                    continue;
                }
                let p = alloc::format!("{path}/{}", e.name);
                match self.scan_entry(dir.ino, &e, &mut seen) {
                    Ok(f) if f.inode.is_dir() => {
                        scan.found.push(Found {
                            path: p.clone(),
                            ino: e.ino,
                            kind: Kind::Dir(f.inode.clone()),
                        });
                        subdirs.push((p, f));
                    }
                    Ok(f) => scan.found.push(Found {
                        path: p,
                        ino: e.ino,
                        kind: Kind::File(f),
                    }),
                    Err((error, lost, damaged_inode)) => {
                        if damaged_inode {
                            bad.insert(e.ino);
                        }
                        scan.damage.push(Damage {
                            path: p,
                            error,
                            lost,
                        });
                    }
                }
            }
            stack.extend(subdirs.into_iter().rev());
        }
        Ok(scan)
    }

    /// One entry of directory `dir` for [`Fs::scan`]: its file opened (inode
    /// and extent tree checked), or the damage with what it costs and
    /// whether the inode itself is damaged (then no other path to it is
    /// reported again). A directory met a second time is a loop.
    fn scan_entry(
        &self,
        dir: u64,
        e: &DirEntry,
        seen: &mut BTreeSet<u64>,
    ) -> core::result::Result<File, (Error, Lost, bool)> {
        let lost = |is_dir: bool| if is_dir { Lost::Directory } else { Lost::File };
        let inode = self
            .inode(e.ino)
            .map_err(|error| (error, lost(e.kind == DT_DIR), true))?;
        let is_dir = inode.is_dir();
        if is_dir && !seen.insert(e.ino) {
            let error = Error::corrupt(
                Structure::Directory(dir),
                self.inode_block(e.ino),
                Why::Loop("directory"),
            );
            return Err((error, Lost::Directory, false));
        }
        self.open_inode(e.ino, inode)
            .map_err(|error| (error, lost(is_dir), true))
    }
}

/// What [`Fs::scan`] found.
#[derive(Clone, Debug, Default)]
pub struct Scan {
    /// Every regular file that checks out and every directory whose inode
    /// and extent tree do, depth first, sorted by name within a directory.
    pub found: Vec<Found>,
    /// Every damaged structure met, in the order met.
    pub damage: Vec<Damage>,
}

impl Scan {
    /// The regular files found, by path.
    pub fn files(&self) -> impl Iterator<Item = (&str, &File)> {
        self.found.iter().filter_map(|f| match &f.kind {
            Kind::File(file) => Some((f.path.as_str(), file)),
            Kind::Dir(_) => None,
        })
    }

    /// The regular files found, by path, owned.
    pub fn into_files(self) -> impl Iterator<Item = (String, File)> {
        self.found.into_iter().filter_map(|f| match f.kind {
            Kind::File(file) => Some((f.path, file)),
            Kind::Dir(_) => None,
        })
    }
}

/// A directory or regular file [`Fs::scan`] found sound.
#[derive(Clone, Debug)]
pub struct Found {
    /// From the root, `/` first.
    pub path: String,
    pub ino: u64,
    pub kind: Kind,
}

#[derive(Clone, Debug)]
pub enum Kind {
    Dir(Inode),
    /// Opened: its extents read and checked.
    File(File),
}

/// One damaged structure [`Fs::scan`] met, and what it cost.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Damage {
    /// Where the walk met it: the path of the file or directory left out, or
    /// of the directory whose entries were (`""`: the root).
    pub path: String,
    /// Which structure (inode, extent tree, directory and its block) and why.
    pub error: Error,
    pub lost: Lost,
}

/// What a [`Damage`] cost.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lost {
    /// The file at the path.
    File,
    /// The directory at the path and everything below it.
    Directory,
    /// The entries of one block of the directory at the path (with what lies
    /// below them).
    Entries,
}

impl core::fmt::Display for Damage {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let dir = if self.path.is_empty() {
            "/"
        } else {
            &self.path
        };
        match self.lost {
            Lost::File => write!(f, "{}: file left out: {}", self.path, self.error),
            Lost::Directory => write!(
                f,
                "{dir}: directory left out with everything below it: {}",
                self.error
            ),
            Lost::Entries => write!(
                f,
                "{dir}: the entries of one directory block left out: {}",
                self.error
            ),
        }
    }
}
