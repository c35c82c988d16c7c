//! Writing dxfs: overwrites, allocating writes with unwritten-extent
//! conversion at completion, and metadata made atomic by the commit log
//! (`journal`).
//!
//! A write is three steps, so that its data can be in flight while other
//! requests go on (the iomap shape: `iomap_begin`, the I/O, `end_io`):
//!
//! 1. [`WritableFs::map_write`] maps a block range for writing. Written
//!    blocks are returned as they are (an overwrite changes no metadata).
//!    Holes get blocks from the in-memory bitmap, near the file's
//!    neighbouring extents, and an `UNWRITTEN` extent; unwritten extents are
//!    returned as they are. Nothing is written to the device: the changes
//!    wait in memory for the next commit.
//! 2. The caller writes the data to the disk blocks returned.
//! 3. [`WritableFs::end_write`] converts the range's unwritten extents to
//!    written, in memory, once the data write completed.
//!
//! [`WritableFs::commit`] writes every change since the last commit as one
//! transaction: the changed inode table blocks, extent tree nodes, bitmap
//! blocks and the superblock, whole, first to the log, then (after a flush
//! and the commit block with FUA) home. A transaction can commit while a
//! write's data is still in flight: it then holds that write's extent as
//! unwritten, which reads as zeroes after a crash, never as the bytes the
//! block held before. A conversion is only ever made after its data write
//! completed, and the flush before the commit block makes that data durable
//! before the conversion is.
//!
//! Blocks freed by a transaction (extent tree nodes replaced) are not
//! reused before it committed and checkpointed; dxfs frees no data blocks
//! (files keep their size and TRIM does not punch holes).
//!
//! A failed device write or flush during a commit leaves the in-memory
//! state ahead of the medium: the filesystem refuses every further change
//! ([`Error::Failed`]) until it is mounted again, which replays the last
//! committed transaction.

use crate::dev::{BlockDeviceMut, DevError};
use crate::error::{Error, Result, Structure, Why};
use crate::format::*;
use crate::fs::{File, Fs, Mapping};
use crate::journal;
use alloc::collections::{BTreeMap, BTreeSet};
use alloc::vec;
use alloc::vec::Vec;

/// The write path of a mounted filesystem as the cores serving its files
/// share it ([`SharedFs`]).
///
/// The read side keeps its lock-free snapshot of each file's extents
/// ([`File`]): a block mapped written never moves and is never freed (files
/// keep their size; nothing punches holes), so a snapshot's written blocks
/// stay true, and only its holes and unwritten extents may have filled
/// since: those, and only those, are asked again ([`FileWriter::map`]).
/// That question may come with a driver lock held (the read path maps
/// inside the engine): it takes only a short lock that is never held
/// across I/O, and does no I/O itself.
pub trait FileWriter: Send + Sync {
    /// The mapping of block `fb` of file `ino` now, when the write path
    /// changed the file since it was opened (`None`: the caller's snapshot
    /// holds).
    fn map(&self, ino: u64, fb: u64) -> Option<Mapping>;
    /// Whether blocks `fb..end` of file `ino` were mapped or converted
    /// since the last commit: a FUA write to them must commit, not only
    /// reach the medium.
    fn uncommitted(&self, ino: u64, fb: u64, end: u64) -> bool;
    /// Writes whole blocks `data` at `offset` of file `ino`, allocating
    /// what is not written yet; durable on return with `fua`.
    fn write(&self, ino: u64, offset: u64, data: &[u8], fua: bool) -> Result<()>;
    /// Zeroes whole blocks `len` bytes at `offset`: written blocks are
    /// written with zeroes; holes and unwritten extents read as zeroes
    /// already and are left as they are.
    fn zero(&self, ino: u64, offset: u64, len: u64, fua: bool) -> Result<()>;
    /// Commits the running transaction and flushes the device.
    fn commit(&self) -> Result<()>;
    /// Commits when a change waits for it and nobody holds the filesystem
    /// now (another core in the write path is not waited for: the caller
    /// asks again later); whether it committed. A write path stopped by a
    /// failed commit is left alone (that failure was reported when it
    /// happened).
    fn commit_if_dirty(&self) -> Result<bool>;
}

/// What readers see of a file the write path changed: its extents as they
/// are in memory, and the block ranges changed since the last commit.
#[derive(Clone, Default)]
struct Published {
    extents: alloc::sync::Arc<Vec<Extent>>,
    fresh: Vec<(u64, u64)>,
}

/// A [`WritableFs`] behind a lock, for every core; readers see the files
/// it changed through `published`, a second lock held only to look up or
/// replace one entry.
pub struct SharedFs<D: BlockDeviceMut> {
    fs: spin::Mutex<WritableFs<D>>,
    published: spin::Mutex<BTreeMap<u64, Published>>,
}

impl<D: BlockDeviceMut> SharedFs<D> {
    pub fn new(w: WritableFs<D>) -> Self {
        SharedFs {
            fs: spin::Mutex::new(w),
            published: spin::Mutex::new(BTreeMap::new()),
        }
    }
    /// Runs `f` with the filesystem locked, then publishes what it changed.
    pub fn with<R>(&self, f: impl FnOnce(&mut WritableFs<D>) -> R) -> R {
        let mut w = self.fs.lock();
        let r = f(&mut w);
        self.publish(&mut w);
        r
    }

    /// Publishes every file `w` changed since the last call (the fs lock is
    /// held by the caller).
    fn publish(&self, w: &mut WritableFs<D>) {
        let changed = core::mem::take(&mut w.changed);
        let committed = core::mem::take(&mut w.committed);
        if changed.is_empty() && !committed {
            return;
        }
        let snapshots: Vec<(u64, Published)> = changed
            .iter()
            .filter_map(|ino| {
                let f = w.files.get(ino)?;
                Some((
                    *ino,
                    Published {
                        extents: alloc::sync::Arc::new(f.extents.clone()),
                        fresh: f.fresh.clone(),
                    },
                ))
            })
            .collect();
        let mut p = self.published.lock();
        if committed {
            for e in p.values_mut() {
                e.fresh.clear();
            }
        }
        for (ino, snap) in snapshots {
            p.insert(ino, snap);
        }
    }
}

impl<D: BlockDeviceMut + Send> FileWriter for SharedFs<D> {
    fn map(&self, ino: u64, fb: u64) -> Option<Mapping> {
        let extents = self.published.lock().get(&ino)?.extents.clone();
        Some(map_extents(&extents, fb))
    }
    fn uncommitted(&self, ino: u64, fb: u64, end: u64) -> bool {
        self.published
            .lock()
            .get(&ino)
            .is_some_and(|p| p.fresh.iter().any(|&(a, b)| a < end && fb < b))
    }
    fn write(&self, ino: u64, offset: u64, data: &[u8], fua: bool) -> Result<()> {
        self.with(|w| w.write(ino, offset, data, fua))
    }
    fn zero(&self, ino: u64, offset: u64, len: u64, fua: bool) -> Result<()> {
        self.with(|w| w.zero(ino, offset, len, fua))
    }
    fn commit(&self) -> Result<()> {
        self.with(|w| w.commit())
    }
    fn commit_if_dirty(&self) -> Result<bool> {
        let Some(mut w) = self.fs.try_lock() else {
            return Ok(false);
        };
        if w.failed || !w.dirty() {
            return Ok(false);
        }
        let r = w.commit();
        self.publish(&mut w);
        r.map(|()| true)
    }
}

/// Largest extent the write path makes (blocks), as mkfs.
const MAX_EXTENT: u64 = 1 << 30;

/// One piece of a mapped write: `blocks` blocks from `file_block` go to
/// `disk_block`; `fresh` when they are unwritten (the write must be ended
/// with [`WritableFs::end_write`] to expose its data).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WriteSeg {
    pub file_block: u64,
    pub disk_block: u64,
    pub blocks: u64,
    pub fresh: bool,
}

/// What commits did, for tests and the boot log.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub commits: u64,
    pub logged_blocks: u64,
    pub allocated_blocks: u64,
}

/// A leaf of an extent tree: its node block and the first file block of its
/// key range (the first leaf's range starts at 0). A leaf holds the extents
/// whose `file_block` lies in its range.
#[derive(Clone, Copy, Debug)]
struct Leaf {
    key: u64,
    block: u64,
    dirty: bool,
}

/// A file open for writing.
struct WFile {
    inode: Inode,
    extents: Vec<Extent>,
    /// Empty while the extents are inline in the inode.
    leaves: Vec<Leaf>,
    /// The tree's nodes above the leaves.
    index_blocks: Vec<u64>,
    /// The leaf set or a key changed: the index levels are rebuilt.
    index_dirty: bool,
    /// The inode (or its inline area) changed.
    dirty: bool,
    /// Block ranges mapped or converted since the last commit.
    fresh: Vec<(u64, u64)>,
    /// Extents added since the last commit (the transaction's size
    /// estimate).
    added: usize,
}

/// A filesystem mounted for writing over a synchronous device.
pub struct WritableFs<D: BlockDeviceMut> {
    fs: Fs<D>,
    /// One bit per block, 1 = in use; what the bitmap blocks say after the
    /// running transaction commits.
    bitmap: Vec<u64>,
    bitmap_dirty: BTreeSet<u64>,
    /// Blocks the running transaction frees: still set in `bitmap` (so not
    /// reused) until the commit clears them.
    freeing: Vec<u64>,
    files: BTreeMap<u64, WFile>,
    sb_dirty: bool,
    /// Where the last allocation ended: the goal of a file with no extent.
    cursor: u64,
    seq: u64,
    failed: bool,
    stats: Stats,
    /// Blocks the mount wrote home from the log.
    replayed: usize,
    /// Files changed since [`SharedFs`] last published them.
    changed: BTreeSet<u64>,
    /// A commit happened since then.
    committed: bool,
}

/// Free blocks kept for extent tree nodes: data allocation stops short of
/// them, so that a commit can always lay out its trees.
const NODE_RESERVE: u64 = 64;

fn dev_err(block: u64) -> impl Fn(DevError) -> Error {
    move |err| Error::Device { block, err }
}

impl<D: BlockDeviceMut> WritableFs<D> {
    /// Mounts for writing: a committed transaction left in the log is
    /// written home (and flushed) first, then the bitmap is read.
    pub fn mount(dev: D) -> Result<Self> {
        let mut fs = Fs::mount(dev)?;
        let replayed = core::mem::take(&mut fs.overlay);
        let bs = fs.sb.block_size as u64;
        for (home, data) in &replayed {
            fs.dev.write_at(home * bs, data).map_err(dev_err(*home))?;
        }
        if !replayed.is_empty() {
            fs.dev.flush().map_err(dev_err(0))?;
        }
        let bitmap = read_bitmap(&fs)?;
        check_bitmap(&fs.sb, &bitmap)?;
        let seq = fs.log_seq.map_or(1, |s| s.wrapping_add(1));
        let cursor = fs.sb.data_start;
        Ok(WritableFs {
            fs,
            bitmap,
            bitmap_dirty: BTreeSet::new(),
            freeing: Vec::new(),
            files: BTreeMap::new(),
            sb_dirty: false,
            cursor,
            seq,
            failed: false,
            stats: Stats::default(),
            replayed: replayed.len(),
            changed: BTreeSet::new(),
            committed: false,
        })
    }

    /// The read side (metadata as last committed, not the changes in
    /// memory).
    pub fn fs(&self) -> &Fs<D> {
        &self.fs
    }
    pub fn stats(&self) -> Stats {
        self.stats
    }
    /// How many blocks the mount wrote home from a committed transaction
    /// the log held (0: the last checkpoint was complete, or no log).
    pub fn replayed(&self) -> usize {
        self.replayed
    }
    /// The device, for data writes.
    pub fn device_mut(&mut self) -> &mut D {
        &mut self.fs.dev
    }
    /// Gives the device back.
    pub fn into_device(self) -> D {
        self.fs.dev
    }
    /// Whether a change waits for a commit.
    pub fn dirty(&self) -> bool {
        self.sb_dirty || !self.bitmap_dirty.is_empty() || self.files.values().any(|f| f.dirty)
    }

    /// File `ino` as the write path sees it now (its extents with every
    /// change in memory), for reads and for mapping.
    pub fn file(&mut self, ino: u64) -> Result<File> {
        let bs = self.fs.sb.block_size;
        let f = self.open(ino)?;
        Ok(File::from_parts(
            ino,
            f.inode.clone(),
            f.extents.clone(),
            bs,
        ))
    }

    /// Reads file `ino` at `offset` as the write path sees it now.
    pub fn read(&mut self, ino: u64, offset: u64, buf: &mut [u8]) -> Result<usize> {
        let f = self.file(ino)?;
        self.fs.read(&f, offset, buf)
    }

    /// Opens `ino` for writing (once; later calls find it open).
    fn open(&mut self, ino: u64) -> Result<&mut WFile> {
        if !self.files.contains_key(&ino) {
            let f = load(&self.fs, ino)?;
            self.files.insert(ino, f);
        }
        self.files.get_mut(&ino).ok_or(Error::BadInode(ino))
    }

    fn usable(&self) -> Result<()> {
        if self.failed {
            return Err(Error::Failed);
        }
        Ok(())
    }

    /// Maps `count` blocks from `file_block` of file `ino` for writing,
    /// allocating the holes (see the module's text). Commits first when the
    /// running transaction is half the log's capacity, and stops early
    /// (the segments cover a first part of the range, never nothing) when
    /// its allocations bring the transaction there: the caller writes and
    /// ends that part and maps the rest, so that however many extents one
    /// write needs, each transaction fits the log.
    pub fn map_write(&mut self, ino: u64, file_block: u64, count: u64) -> Result<Vec<WriteSeg>> {
        self.usable()?;
        let bs = self.fs.sb.block_size as u64;
        let f = self.open(ino)?;
        let end = file_block.checked_add(count);
        if end.is_none_or(|e| e > f.inode.size.div_ceil(bs)) {
            return Err(Error::PastEnd {
                ino,
                block: file_block.saturating_add(count),
            });
        }
        if self.half_full(0) {
            self.commit()?;
        }
        let mut out = Vec::new();
        let mut fb = file_block;
        let end = file_block + count;
        while fb < end {
            let mapping = map_extents(&self.open(ino)?.extents, fb);
            let seg = match mapping {
                Mapping::Mapped { disk_block, blocks } => WriteSeg {
                    file_block: fb,
                    disk_block,
                    blocks: blocks.min(end - fb),
                    fresh: false,
                },
                Mapping::Unwritten { disk_block, blocks } => {
                    if !self.fs.sb.has_log() {
                        return Err(Error::NoLog);
                    }
                    if self.full_for(&out) {
                        break;
                    }
                    WriteSeg {
                        file_block: fb,
                        disk_block,
                        blocks: blocks.min(end - fb),
                        fresh: true,
                    }
                }
                Mapping::Hole { blocks } => {
                    if !self.fs.sb.has_log() {
                        return Err(Error::NoLog);
                    }
                    if self.full_for(&out) {
                        break;
                    }
                    self.allocate(ino, fb, blocks.min(end - fb))?
                }
            };
            fb += seg.blocks;
            out.push(seg);
        }
        Ok(out)
    }

    /// Allocates up to `want` blocks for the hole at `fb` of `ino` and maps
    /// them unwritten.
    fn allocate(&mut self, ino: u64, fb: u64, want: u64) -> Result<WriteSeg> {
        let goal = {
            let f = self.open(ino)?;
            goal_for(&f.extents, fb)
        }
        .unwrap_or(self.cursor);
        // Data stops short of the blocks kept for tree nodes.
        let spare = self.fs.sb.free_blocks.saturating_sub(NODE_RESERVE);
        if spare == 0 {
            return Err(Error::Full { ino });
        }
        let (disk, len) = self
            .find_free(goal, want.min(MAX_EXTENT).min(spare))
            .ok_or(Error::Full { ino })?;
        self.mark(disk, len, true);
        self.cursor = disk + len;
        self.stats.allocated_blocks += len;
        self.changed.insert(ino);
        let f = self.open(ino)?;
        f.inode.blocks += len;
        f.fresh.push((fb, fb + len));
        f.added += 1;
        insert_extent(
            f,
            Extent {
                file_block: fb,
                disk_block: disk,
                len: len as u32,
                flags: EXTENT_UNWRITTEN,
            },
        );
        Ok(WriteSeg {
            file_block: fb,
            disk_block: disk,
            blocks: len,
            fresh: true,
        })
    }

    /// The write of `count` blocks from `file_block` of `ino` completed:
    /// its unwritten extents become written (in memory; durable at the next
    /// commit).
    pub fn end_write(&mut self, ino: u64, file_block: u64, count: u64) -> Result<()> {
        self.usable()?;
        self.changed.insert(ino);
        let f = self.open(ino)?;
        let end = file_block.saturating_add(count);
        f.fresh.push((file_block, end));
        f.added += 2;
        convert_written(f, file_block, end);
        Ok(())
    }

    /// Whether blocks `fb..end` of `ino` were mapped or converted since the
    /// last commit (a FUA write to them must commit).
    pub fn uncommitted(&self, ino: u64, fb: u64, end: u64) -> bool {
        self.files
            .get(&ino)
            .is_some_and(|f| f.fresh.iter().any(|&(a, b)| a < end && fb < b))
    }

    /// Metadata blocks the running transaction would log now, estimated
    /// from above: per dirty file its inode block, its dirty leaves, the
    /// leaves its added extents could split into, and its index levels.
    fn pending_blocks(&self) -> usize {
        let ipb = Superblock::inodes_per_block(self.fs.sb.block_size);
        let per_node = (self.fs.sb.block_size as usize - HEADER_SIZE) / ENTRY_SIZE;
        let mut itable = BTreeSet::new();
        let mut tree = 0usize;
        for (&ino, f) in &self.files {
            if f.dirty {
                itable.insert((ino - 1) / ipb);
                if f.extents.len() > INLINE_ENTRIES {
                    let leaves = f.leaves.len().max(1);
                    let dirty = f.leaves.iter().filter(|l| l.dirty).count();
                    let split = f.added.div_ceil(per_node / 4) + 1;
                    let index = (leaves + split).div_ceil(per_node) * MAX_EXTENT_DEPTH as usize;
                    tree += dirty + split + index;
                }
            }
        }
        itable.len() + tree + self.bitmap_dirty.len() + 2 + 1
    }

    /// Whether the running transaction, estimated, plus `extra` blocks
    /// passes half the log's capacity: time to commit before it grows.
    fn half_full(&self, extra: usize) -> bool {
        (self.pending_blocks() + extra) * 2 > journal::capacity(&self.fs.sb)
    }

    /// Whether `map_write` must stop before another fresh segment (a hole
    /// to allocate or an unwritten extent): with `out` mapped so far, the
    /// running transaction plus a leaf for each fresh segment's conversion
    /// (at `end_write`) would pass half the log. Never before the first
    /// segment (after the commit at its start there is room for one).
    fn full_for(&self, out: &[WriteSeg]) -> bool {
        !out.is_empty() && self.half_full(out.iter().filter(|s| s.fresh).count())
    }

    /// Writes whole blocks of `data` at `offset` of file `ino` (both
    /// multiples of the block size): map, write, end. With `fua` the data
    /// is durable when this returns (an allocating write commits).
    pub fn write(&mut self, ino: u64, offset: u64, data: &[u8], fua: bool) -> Result<()> {
        let bs = self.fs.sb.block_size as u64;
        if !offset.is_multiple_of(bs) || !(data.len() as u64).is_multiple_of(bs) {
            return Err(Error::Input("writes are whole filesystem blocks".into()));
        }
        let (first, end) = (offset / bs, (offset + data.len() as u64) / bs);
        let mut fresh = false;
        let mut fb = first;
        // Part by part as `map_write` maps them (each part's conversions in
        // the transaction its allocations started).
        while fb < end {
            let segs = self.map_write(ino, fb, end - fb)?;
            for s in &segs {
                let at = ((s.file_block - first) * bs) as usize;
                let buf = &data[at..at + (s.blocks * bs) as usize];
                let d = self.device_mut();
                if fua && !s.fresh {
                    d.write_fua(s.disk_block * bs, buf)
                } else {
                    d.write_at(s.disk_block * bs, buf)
                }
                .map_err(dev_err(s.disk_block))?;
                fresh |= s.fresh;
            }
            for s in &segs {
                if s.fresh {
                    self.end_write(ino, s.file_block, s.blocks)?;
                }
            }
            fb += segs_len(&segs);
        }
        if fua && (fresh || self.uncommitted(ino, first, end)) {
            self.commit()?;
        }
        Ok(())
    }

    /// Zeroes `len` bytes at `offset` of file `ino` (whole blocks): the
    /// written blocks get zeroes; holes and unwritten extents already read
    /// as zeroes and stay as they are (nothing is allocated). With `fua`
    /// the zeroes are durable when this returns.
    pub fn zero(&mut self, ino: u64, offset: u64, len: u64, fua: bool) -> Result<()> {
        self.usable()?;
        let bs = self.fs.sb.block_size as u64;
        if !offset.is_multiple_of(bs) || !len.is_multiple_of(bs) {
            return Err(Error::Input("writes are whole filesystem blocks".into()));
        }
        let (first, end) = (offset / bs, (offset + len) / bs);
        let f = self.open(ino)?;
        if end > f.inode.size.div_ceil(bs) {
            return Err(Error::PastEnd { ino, block: end });
        }
        let zeroes = vec![0u8; (64 * 1024).max(bs as usize)];
        let per = zeroes.len() as u64 / bs;
        let mut fb = first;
        let mut wrote = false;
        while fb < end {
            let m = map_extents(&self.open(ino)?.extents, fb);
            match m {
                Mapping::Mapped { disk_block, blocks } => {
                    let n = blocks.min(end - fb).min(per);
                    self.fs
                        .dev
                        .write_at(disk_block * bs, &zeroes[..(n * bs) as usize])
                        .map_err(dev_err(disk_block))?;
                    wrote = true;
                    fb += n;
                }
                Mapping::Unwritten { blocks, .. } | Mapping::Hole { blocks } => {
                    fb += blocks.min(end - fb);
                }
            }
        }
        if fua && wrote {
            self.fs.dev.flush().map_err(dev_err(0))?;
        }
        Ok(())
    }

    /// Commits the running transaction (see the module's text) and flushes
    /// the device: when it returns, every write completed before it and
    /// every change to the metadata is durable. With nothing to log it is a
    /// device flush.
    pub fn commit(&mut self) -> Result<()> {
        self.usable()?;
        let r = self.try_commit();
        if r.is_err() {
            self.failed = true;
        }
        r
    }

    fn try_commit(&mut self) -> Result<()> {
        let dirty: Vec<u64> = self
            .files
            .iter()
            .filter(|(_, f)| f.dirty)
            .map(|(&i, _)| i)
            .collect();
        let mut blocks: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
        for ino in &dirty {
            self.emit_tree(*ino, &mut blocks)?;
        }
        for b in core::mem::take(&mut self.freeing) {
            self.mark(b, 1, false);
        }
        self.emit_inodes(&dirty, &mut blocks)?;
        self.emit_bitmap(&mut blocks);
        if self.sb_dirty {
            let mut b0 = vec![0u8; self.fs.sb.block_size as usize];
            self.fs.sb.emit(&mut b0);
            blocks.insert(0, b0);
        }
        if blocks.is_empty() {
            self.fs.dev.flush().map_err(dev_err(0))?;
            self.committed = true;
            for f in self.files.values_mut() {
                f.fresh.clear();
                f.added = 0;
            }
            return Ok(());
        }
        let blocks: Vec<(u64, Vec<u8>)> = blocks.into_iter().collect();
        let cap = journal::capacity(&self.fs.sb);
        if blocks.len() > cap {
            return Err(Error::TxnTooBig {
                blocks: blocks.len(),
                capacity: cap,
            });
        }
        self.write_log(&blocks)?;
        self.checkpoint(&blocks)?;
        self.stats.commits += 1;
        self.stats.logged_blocks += blocks.len() as u64;
        self.seq = self.seq.wrapping_add(1);
        self.committed = true;
        for f in self.files.values_mut() {
            f.fresh.clear();
            f.added = 0;
            f.dirty = false;
            f.index_dirty = false;
            for l in &mut f.leaves {
                l.dirty = false;
            }
        }
        self.bitmap_dirty.clear();
        self.sb_dirty = false;
        Ok(())
    }

    /// Descriptor and blocks, a flush, the commit block with FUA.
    fn write_log(&mut self, blocks: &[(u64, Vec<u8>)]) -> Result<()> {
        let sb = &self.fs.sb;
        let bs = sb.block_size as u64;
        let start = sb.log_start;
        let (desc, commit) = journal::encode(sb, self.seq, blocks);
        let d = &mut self.fs.dev;
        d.write_at(start * bs, &desc).map_err(dev_err(start))?;
        for (i, (_, b)) in blocks.iter().enumerate() {
            let at = start + 1 + i as u64;
            d.write_at(at * bs, b).map_err(dev_err(at))?;
        }
        d.flush().map_err(dev_err(start))?;
        let at = start + 1 + blocks.len() as u64;
        d.write_fua(at * bs, &commit).map_err(dev_err(at))
    }

    /// The committed blocks written home, then a flush: the log may be
    /// overwritten after this.
    fn checkpoint(&mut self, blocks: &[(u64, Vec<u8>)]) -> Result<()> {
        let bs = self.fs.sb.block_size as u64;
        let d = &mut self.fs.dev;
        for (home, b) in blocks {
            d.write_at(home * bs, b).map_err(dev_err(*home))?;
        }
        d.flush().map_err(dev_err(0))
    }

    /// Sets (`used`) or clears `len` bits from `start`, keeping the free
    /// count and the dirty bitmap blocks.
    fn mark(&mut self, start: u64, len: u64, used: bool) {
        let bpb = Superblock::bits_per_bitmap_block(self.fs.sb.block_size);
        for b in start..start + len {
            let (w, bit) = ((b / 64) as usize, b % 64);
            let was = self.bitmap[w] & (1 << bit) != 0;
            if was == used {
                continue;
            }
            self.bitmap[w] ^= 1 << bit;
            // (The count was checked against the bitmap at mount.)
            if used {
                self.fs.sb.free_blocks = self.fs.sb.free_blocks.saturating_sub(1);
            } else {
                self.fs.sb.free_blocks += 1;
            }
            self.bitmap_dirty.insert(b / bpb);
        }
        self.sb_dirty = true;
    }

    fn used(&self, b: u64) -> bool {
        self.bitmap[(b / 64) as usize] & (1 << (b % 64)) != 0
    }

    /// The first free run at or after `goal` (wrapping to the data region's
    /// start), at most `max` blocks long.
    fn find_free(&self, goal: u64, max: u64) -> Option<(u64, u64)> {
        let sb = &self.fs.sb;
        let (lo, hi) = (sb.data_start, sb.block_count);
        let goal = goal.clamp(lo, hi - 1);
        let start = (goal..hi).chain(lo..goal).find(|&b| !self.used(b))?;
        let mut len = 1;
        while len < max && start + len < hi && !self.used(start + len) {
            len += 1;
        }
        Some((start, len))
    }

    /// Allocates one block for an extent tree node of `ino`: the last free
    /// block of the device, so that tree nodes do not take the blocks that
    /// would continue a file's extents (the holes between its extents,
    /// which fill as a volume is written).
    fn alloc_node(&mut self, ino: u64) -> Result<u64> {
        let sb = &self.fs.sb;
        let b = (sb.data_start..sb.block_count)
            .rev()
            .find(|&b| !self.used(b))
            .ok_or(Error::Full { ino })?;
        self.mark(b, 1, true);
        Ok(b)
    }

    /// Lays out the extent tree of dirty file `ino`: leaves split or
    /// dropped, the index rebuilt when it changed; adds the changed nodes to
    /// `out` and sets the inode's entry area.
    fn emit_tree(&mut self, ino: u64, out: &mut BTreeMap<u64, Vec<u8>>) -> Result<()> {
        let bs = self.fs.sb.block_size as usize;
        let per_node = (bs - HEADER_SIZE) / ENTRY_SIZE;
        let Some(mut f) = self.files.remove(&ino) else {
            return Ok(());
        };
        let r = self.layout_tree(ino, &mut f, per_node, out);
        self.files.insert(ino, f);
        r
    }

    fn layout_tree(
        &mut self,
        ino: u64,
        f: &mut WFile,
        per_node: usize,
        out: &mut BTreeMap<u64, Vec<u8>>,
    ) -> Result<()> {
        let bs = self.fs.sb.block_size as usize;
        if f.extents.len() <= INLINE_ENTRIES {
            // Inline: every tree node goes.
            for l in f.leaves.drain(..) {
                self.freeing.push(l.block);
            }
            self.freeing.append(&mut f.index_blocks);
            let mut inline = [0u8; INLINE_ENTRIES * ENTRY_SIZE];
            for (i, e) in f.extents.iter().enumerate() {
                e.emit(&mut inline[i * ENTRY_SIZE..]);
            }
            f.inode.inline = inline;
            f.inode.extent_count = f.extents.len() as u16;
            f.inode.depth = 0;
            f.inode.blocks = data_blocks(&f.extents);
            return Ok(());
        }
        if f.leaves.is_empty() {
            let b = self.alloc_node(ino)?;
            f.leaves.push(Leaf {
                key: 0,
                block: b,
                dirty: true,
            });
            f.index_dirty = true;
        }
        self.balance_leaves(ino, f, per_node)?;
        for l in f.leaves.iter().filter(|l| l.dirty) {
            let r = leaf_range(&f.extents, &f.leaves, l.key);
            let mut b = vec![0u8; bs];
            for (i, e) in f.extents[r.clone()].iter().enumerate() {
                e.emit(&mut b[HEADER_SIZE + i * ENTRY_SIZE..]);
            }
            BlockHeader {
                kind: KIND_EXTENT,
                level: 0,
                blockno: l.block,
                count: r.len() as u32,
                owner: ino,
            }
            .emit(&mut b);
            out.insert(l.block, b);
        }
        if f.index_dirty || f.inode.depth == 0 {
            self.build_index(ino, f, per_node, out)?;
        }
        f.inode.blocks =
            data_blocks(&f.extents) + f.leaves.len() as u64 + f.index_blocks.len() as u64;
        Ok(())
    }

    /// Drops empty leaves and splits full ones (new leaves three quarters
    /// full), keeping the first leaf's key 0.
    fn balance_leaves(&mut self, ino: u64, f: &mut WFile, per_node: usize) -> Result<()> {
        let mut i = 0;
        while i < f.leaves.len() {
            let r = leaf_range(&f.extents, &f.leaves, f.leaves[i].key);
            if r.is_empty() {
                self.freeing.push(f.leaves[i].block);
                f.leaves.remove(i);
                f.index_dirty = true;
                continue;
            }
            if r.len() > per_node {
                let fill = (per_node * 3 / 4).max(1);
                let mut at = r.start + fill;
                let mut new = Vec::new();
                while at < r.end {
                    let b = self.alloc_node(ino)?;
                    new.push(Leaf {
                        key: f.extents[at].file_block,
                        block: b,
                        dirty: true,
                    });
                    at += fill;
                }
                f.leaves[i].dirty = true;
                let n = new.len();
                f.leaves.splice(i + 1..i + 1, new);
                f.index_dirty = true;
                i += n;
            }
            i += 1;
        }
        if let Some(first) = f.leaves.first_mut() {
            if first.key != 0 {
                first.key = 0;
                f.index_dirty = true;
            }
        }
        Ok(())
    }

    /// Rebuilds the index levels above the leaves in new blocks (the old
    /// ones are freed) and the inode's entry area.
    fn build_index(
        &mut self,
        ino: u64,
        f: &mut WFile,
        per_node: usize,
        out: &mut BTreeMap<u64, Vec<u8>>,
    ) -> Result<()> {
        let bs = self.fs.sb.block_size as usize;
        self.freeing.append(&mut f.index_blocks);
        let mut level: Vec<IndexEntry> = f
            .leaves
            .iter()
            .map(|l| IndexEntry {
                file_block: l.key,
                child: l.block,
            })
            .collect();
        let mut depth = 1u16;
        while level.len() > INLINE_ENTRIES {
            let mut up = Vec::new();
            for group in level.chunks(per_node) {
                let blk = self.alloc_node(ino)?;
                let mut b = vec![0u8; bs];
                for (i, e) in group.iter().enumerate() {
                    e.emit(&mut b[HEADER_SIZE + i * ENTRY_SIZE..]);
                }
                BlockHeader {
                    kind: KIND_EXTENT,
                    level: depth,
                    blockno: blk,
                    count: group.len() as u32,
                    owner: ino,
                }
                .emit(&mut b);
                out.insert(blk, b);
                f.index_blocks.push(blk);
                up.push(IndexEntry {
                    file_block: group[0].file_block,
                    child: blk,
                });
            }
            level = up;
            depth += 1;
        }
        if depth > MAX_EXTENT_DEPTH {
            return Err(Error::corrupt(
                Structure::ExtentTree(ino),
                0,
                Why::Unsupported("extent tree deeper than 4"),
            ));
        }
        let mut inline = [0u8; INLINE_ENTRIES * ENTRY_SIZE];
        for (i, e) in level.iter().enumerate() {
            e.emit(&mut inline[i * ENTRY_SIZE..]);
        }
        f.inode.inline = inline;
        f.inode.extent_count = level.len() as u16;
        f.inode.depth = depth;
        Ok(())
    }

    /// The inode table blocks of the dirty inodes, as they are now.
    fn emit_inodes(&mut self, dirty: &[u64], out: &mut BTreeMap<u64, Vec<u8>>) -> Result<()> {
        let bs = self.fs.sb.block_size as usize;
        let per = Superblock::inodes_per_block(self.fs.sb.block_size);
        for &ino in dirty {
            let blk = self.fs.inode_block(ino);
            if let alloc::collections::btree_map::Entry::Vacant(v) = out.entry(blk) {
                let mut b = vec![0u8; bs];
                self.fs.read_blocks(blk, &mut b)?;
                v.insert(b);
            }
            let (Some(b), Some(f)) = (out.get_mut(&blk), self.files.get(&ino)) else {
                continue;
            };
            let at = ((ino - 1) % per) as usize * INODE_SIZE;
            f.inode.emit(ino, &mut b[at..at + INODE_SIZE]);
        }
        Ok(())
    }

    /// The dirty bitmap blocks, from the in-memory bitmap.
    fn emit_bitmap(&mut self, out: &mut BTreeMap<u64, Vec<u8>>) {
        let sb = &self.fs.sb;
        let bs = sb.block_size as usize;
        let bpb = Superblock::bits_per_bitmap_block(sb.block_size);
        for &i in &self.bitmap_dirty {
            let mut b = vec![0u8; bs];
            let mut set = 0u32;
            let first = i * bpb;
            for bit in 0..bpb.min(sb.block_count.saturating_sub(first)) {
                if self.used(first + bit) {
                    b[HEADER_SIZE + (bit / 8) as usize] |= 1 << (bit % 8);
                    set += 1;
                }
            }
            let blockno = sb.bitmap_start + i;
            BlockHeader {
                kind: KIND_BITMAP,
                level: 0,
                blockno,
                count: set,
                owner: 0,
            }
            .emit(&mut b);
            out.insert(blockno, b);
        }
    }
}

/// Blocks the segments of a write cover.
fn segs_len(segs: &[WriteSeg]) -> u64 {
    segs.iter().map(|s| s.blocks).sum()
}

/// Data blocks mapped by `extents`.
fn data_blocks(extents: &[Extent]) -> u64 {
    extents.iter().map(|e| e.len as u64).sum()
}

/// The mapping of file block `fb` in sorted `extents`.
fn map_extents(extents: &[Extent], fb: u64) -> Mapping {
    let i = extents.partition_point(|e| e.end() <= fb);
    match extents.get(i) {
        Some(e) if e.file_block <= fb => {
            let skip = fb - e.file_block;
            let (disk_block, blocks) = (e.disk_block + skip, e.len as u64 - skip);
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

/// Where a hole at `fb` would continue its neighbours on disk: after the
/// extent before it, or before the extent after it.
fn goal_for(extents: &[Extent], fb: u64) -> Option<u64> {
    let i = extents.partition_point(|e| e.end() <= fb);
    if i > 0 {
        let p = &extents[i - 1];
        return Some(p.disk_block + (fb - p.file_block));
    }
    let n = extents.get(i)?;
    n.disk_block.checked_sub(n.file_block - fb)
}

/// The extents (indices) leaf `key` holds: those whose `file_block` lies
/// from `key` up to the next leaf's key.
fn leaf_range(extents: &[Extent], leaves: &[Leaf], key: u64) -> core::ops::Range<usize> {
    let next = leaves
        .iter()
        .map(|l| l.key)
        .find(|&k| k > key)
        .unwrap_or(u64::MAX);
    let a = extents.partition_point(|e| e.file_block < key);
    let b = extents.partition_point(|e| e.file_block < next);
    a..b
}

/// Marks the leaves holding file blocks `lo..hi` dirty, and the inode.
fn touch(f: &mut WFile, lo: u64, hi: u64) {
    f.dirty = true;
    let n = f.leaves.len();
    for i in 0..n {
        let start = f.leaves[i].key;
        let end = f.leaves.get(i + 1).map_or(u64::MAX, |l| l.key);
        if start < hi.max(lo + 1) && lo < end {
            f.leaves[i].dirty = true;
        }
    }
}

/// Inserts `e` (into a hole) and merges it with contiguous neighbours of
/// the same state.
fn insert_extent(f: &mut WFile, e: Extent) {
    let i = f.extents.partition_point(|x| x.file_block < e.file_block);
    f.extents.insert(i, e);
    let (lo, hi) = merge_around(&mut f.extents, i);
    touch(f, lo, hi);
}

/// Converts the unwritten extents' blocks in `lo..hi` to written,
/// splitting extents at the range's edges and merging afterwards.
fn convert_written(f: &mut WFile, lo: u64, hi: u64) {
    let mut i = f.extents.partition_point(|e| e.end() <= lo);
    let mut changed = false;
    // The file blocks of every extent split (its pieces may fall in other
    // leaves' key ranges).
    let (mut first, mut last) = (lo, hi);
    while i < f.extents.len() && f.extents[i].file_block < hi {
        let e = f.extents[i];
        if !e.unwritten() {
            i += 1;
            continue;
        }
        let (a, b) = (e.file_block.max(lo), e.end().min(hi));
        first = first.min(e.file_block);
        last = last.max(e.end());
        let mut parts = Vec::with_capacity(3);
        if e.file_block < a {
            parts.push(Extent {
                len: (a - e.file_block) as u32,
                ..e
            });
        }
        parts.push(Extent {
            file_block: a,
            disk_block: e.disk_block + (a - e.file_block),
            len: (b - a) as u32,
            flags: 0,
        });
        if b < e.end() {
            parts.push(Extent {
                file_block: b,
                disk_block: e.disk_block + (b - e.file_block),
                len: (e.end() - b) as u32,
                flags: EXTENT_UNWRITTEN,
            });
        }
        let n = parts.len();
        f.extents.splice(i..i + 1, parts);
        i += n;
        changed = true;
    }
    if !changed {
        return;
    }
    // Merge everything the conversion touched with its neighbours: one
    // pass over the window, staying on an extent while it absorbs the next.
    let joins = |a: &Extent, b: &Extent| {
        a.end() == b.file_block
            && a.disk_block + a.len as u64 == b.disk_block
            && a.flags == b.flags
            && a.len as u64 + b.len as u64 <= MAX_EXTENT
    };
    let mut j = f
        .extents
        .partition_point(|e| e.end() <= lo)
        .saturating_sub(1);
    let mut span = (lo.min(first), hi.max(last));
    while j + 1 < f.extents.len() && f.extents[j].file_block <= hi {
        if joins(&f.extents[j], &f.extents[j + 1]) {
            let next = f.extents.remove(j + 1);
            f.extents[j].len += next.len;
            span = (span.0.min(f.extents[j].file_block), span.1.max(next.end()));
        } else {
            j += 1;
        }
    }
    touch(f, span.0, span.1);
}

/// Merges extent `i` with its neighbours when they continue it in the file
/// and on disk with the same flags; returns the file blocks covered.
fn merge_around(ex: &mut Vec<Extent>, mut i: usize) -> (u64, u64) {
    let joins = |a: &Extent, b: &Extent| {
        a.end() == b.file_block
            && a.disk_block + a.len as u64 == b.disk_block
            && a.flags == b.flags
            && a.len as u64 + b.len as u64 <= MAX_EXTENT
    };
    let (mut lo, mut hi) = (ex[i].file_block, ex[i].end());
    if i > 0 && joins(&ex[i - 1], &ex[i]) {
        lo = ex[i - 1].file_block;
        ex[i - 1].len += ex[i].len;
        ex.remove(i);
        i -= 1;
    }
    if i + 1 < ex.len() && joins(&ex[i], &ex[i + 1]) {
        hi = ex[i + 1].end();
        ex[i].len += ex[i + 1].len;
        ex.remove(i + 1);
    }
    (lo, hi)
}

/// Reads file `ino`'s inode, extents and tree shape.
fn load<D: BlockDeviceMut>(fs: &Fs<D>, ino: u64) -> Result<WFile> {
    let inode = fs.inode(ino)?;
    if !inode.is_file() {
        return Err(Error::NotAFile(ino));
    }
    let mut extents = Vec::new();
    let mut tree = Vec::new();
    fs.extents_with_tree(ino, &inode, &mut extents, &mut tree)?;
    let mut leaves = Vec::new();
    if inode.depth > 0 {
        let top: Vec<IndexEntry> = (0..inode.extent_count as usize)
            .map(|i| IndexEntry::parse(inode.inline_entry(i)))
            .collect::<core::result::Result<_, _>>()
            .map_err(|w| Error::corrupt(Structure::ExtentTree(ino), 0, w))?;
        find_leaves(fs, &top, inode.depth, &mut leaves)?;
    }
    let index_blocks = tree
        .into_iter()
        .filter(|b| !leaves.iter().any(|l: &Leaf| l.block == *b))
        .collect();
    // The first leaf's range starts at 0 (mkfs keys it at its first
    // extent): the index is written again at the next commit when it said
    // otherwise.
    let first_key = leaves.first().map_or(0, |l| l.key);
    if let Some(l) = leaves.first_mut() {
        l.key = 0;
    }
    Ok(WFile {
        inode,
        extents,
        leaves,
        index_blocks,
        index_dirty: first_key != 0,
        dirty: false,
        fresh: Vec::new(),
        added: 0,
    })
}

/// The leaves below index entries `entries` at `depth` (already validated
/// by `extents_with_tree`).
fn find_leaves<D: BlockDeviceMut>(
    fs: &Fs<D>,
    entries: &[IndexEntry],
    depth: u16,
    out: &mut Vec<Leaf>,
) -> Result<()> {
    if depth == 1 {
        out.extend(entries.iter().map(|e| Leaf {
            key: e.file_block,
            block: e.child,
            dirty: false,
        }));
        return Ok(());
    }
    let bs = fs.block_size() as usize;
    let mut node = vec![0u8; bs];
    for e in entries {
        fs.read_blocks(e.child, &mut node)?;
        let h = BlockHeader::parse(&node, KIND_EXTENT, e.child)
            .map_err(|w| Error::corrupt(Structure::ExtentTree(0), e.child, w))?;
        let below: Vec<IndexEntry> = (0..h.count as usize)
            .map(|i| IndexEntry::parse(&node[HEADER_SIZE + i * ENTRY_SIZE..]))
            .collect::<core::result::Result<_, _>>()
            .map_err(|w| Error::corrupt(Structure::ExtentTree(0), e.child, w))?;
        find_leaves(fs, &below, depth - 1, out)?;
    }
    Ok(())
}

/// What the write path trusts the bitmap with: the metadata regions and
/// the log are in use, and the free count is what the bits say (a damaged
/// bitmap would hand out blocks that hold metadata).
fn check_bitmap(sb: &Superblock, bits: &[u64]) -> Result<()> {
    let used = |b: u64| bits[(b / 64) as usize] & (1 << (b % 64)) != 0;
    let meta = (0..sb.data_start).chain(sb.log_start..sb.log_start + sb.log_blocks);
    if let Some(b) = meta.clone().find(|&b| !used(b)) {
        return Err(Error::corrupt(
            Structure::Bitmap,
            sb.bitmap_start,
            Why::Field(if b < sb.data_start {
                "metadata block marked free"
            } else {
                "commit log block marked free"
            }),
        ));
    }
    let set: u64 = bits.iter().map(|w| w.count_ones() as u64).sum();
    if sb.block_count - set != sb.free_blocks {
        return Err(Error::corrupt(
            Structure::Superblock,
            0,
            Why::Field("free block count (does not match the bitmap; fsck)"),
        ));
    }
    Ok(())
}

/// The bitmap as the bitmap blocks say, one bit per block.
fn read_bitmap<D: BlockDeviceMut>(fs: &Fs<D>) -> Result<Vec<u64>> {
    let sb = fs.superblock();
    let bs = sb.block_size as usize;
    let bpb = Superblock::bits_per_bitmap_block(sb.block_size);
    let mut bits = vec![0u64; sb.block_count.div_ceil(64) as usize];
    let mut buf = vec![0u8; bs];
    for i in 0..sb.bitmap_blocks {
        let blk = sb.bitmap_start + i;
        fs.read_blocks(blk, &mut buf)?;
        BlockHeader::parse(&buf, KIND_BITMAP, blk)
            .map_err(|w| Error::corrupt(Structure::Bitmap, blk, w))?;
        for bit in 0..bpb.min(sb.block_count.saturating_sub(i * bpb)) {
            if buf[HEADER_SIZE + (bit / 8) as usize] & (1 << (bit % 8)) != 0 {
                let b = i * bpb + bit;
                bits[(b / 64) as usize] |= 1 << (b % 64);
            }
        }
    }
    Ok(bits)
}
