//! Building an image from a tree of directories and files.
//!
//! The caller describes the tree ([`Tree`]) and supplies file contents through
//! a [`Source`]; [`plan`] computes the layout and the size needed, [`write`]
//! writes the image. Every file is laid out contiguously (its data ranges
//! back to back; the holes of sparse files stay holes), directories before
//! files, metadata at the front.

use crate::dev::{BlockDeviceMut, DevError};
use crate::error::{Error, Result};
use crate::format::*;
use alloc::collections::VecDeque;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;

/// Largest extent mkfs writes (blocks).
pub const MAX_EXTENT_LEN: u64 = 1 << 30;

#[derive(Clone, Debug)]
pub enum NodeKind {
    /// Children: (name, node index).
    Dir(Vec<(String, usize)>),
    /// A regular file of `size` bytes whose non-hole byte ranges are `data`
    /// (offset, length), read from the source with id `source`.
    File {
        size: u64,
        data: Vec<(u64, u64)>,
        source: u64,
    },
}

#[derive(Clone, Debug)]
pub struct Node {
    pub kind: NodeKind,
    /// Permission bits (the file type is added).
    pub perm: u16,
    pub mtime: i64,
    pub mtime_nsec: u32,
    pub uid: u32,
    pub gid: u32,
}

impl Node {
    pub fn dir(children: Vec<(String, usize)>) -> Node {
        Node {
            kind: NodeKind::Dir(children),
            perm: 0o755,
            mtime: 0,
            mtime_nsec: 0,
            uid: 0,
            gid: 0,
        }
    }
    pub fn file(size: u64, data: Vec<(u64, u64)>, source: u64) -> Node {
        Node {
            kind: NodeKind::File { size, data, source },
            perm: 0o644,
            mtime: 0,
            mtime_nsec: 0,
            uid: 0,
            gid: 0,
        }
    }
}

/// A tree; `nodes[0]` is the root directory. A file node referenced from
/// several directories is a hard link; a directory is referenced once.
#[derive(Clone, Debug, Default)]
pub struct Tree {
    pub nodes: Vec<Node>,
}

/// File contents.
pub trait Source {
    /// Fills `buf` with the bytes of source `id` at `offset`.
    fn read(&mut self, id: u64, offset: u64, buf: &mut [u8]) -> core::result::Result<(), String>;
}

#[derive(Clone, Debug)]
pub struct Options {
    pub block_size: u32,
    /// Image size in bytes; `None`: what the tree needs plus slack.
    pub size: Option<u64>,
    pub label: String,
    pub uuid: [u8; 16],
    /// Creation time, seconds since the epoch.
    pub now: i64,
    /// Blocks of the commit log; `None`: 1 MiB (at least 16 blocks);
    /// `Some(0)`: none (an image that takes overwrites only).
    pub log_blocks: Option<u64>,
}

impl Options {
    /// The commit log's size in blocks.
    pub fn log_blocks(&self) -> u64 {
        self.log_blocks
            .unwrap_or(((1 << 20) / self.block_size.max(1) as u64).max(16))
    }
}

impl Default for Options {
    fn default() -> Self {
        Options {
            block_size: 4096,
            size: None,
            label: String::new(),
            uuid: [0; 16],
            now: 0,
            log_blocks: None,
        }
    }
}

/// A directory's B+tree, nodes in logical block order (root first).
struct DirPlan {
    /// (level, entries payload, count)
    nodes: Vec<(u16, Vec<u8>, u32)>,
}

/// The layout of an image.
pub struct Plan {
    pub block_size: u32,
    pub block_count: u64,
    pub inode_count: u64,
    pub bitmap_blocks: u64,
    pub itable_blocks: u64,
    pub data_start: u64,
    /// Blocks the tree and the commit log occupy in the data region.
    pub data_blocks: u64,
    /// Blocks of the commit log (after the tree's).
    pub log_blocks: u64,
    /// inode number of each node (0: unreferenced).
    ino_of: Vec<u64>,
    /// nodes in inode order
    order: Vec<usize>,
    links: Vec<u32>,
    parent: Vec<u64>,
    dirs: Vec<Option<DirPlan>>,
    /// Block ranges (file block, count) of each file.
    ranges: Vec<Vec<(u64, u64)>>,
}

impl Plan {
    pub fn image_bytes(&self) -> u64 {
        self.block_count * self.block_size as u64
    }
    pub fn used_inodes(&self) -> u64 {
        self.order.len() as u64
    }
}

fn tree_blocks(extents: u64, per_node: u64) -> u64 {
    let mut n = extents;
    let mut blocks = 0;
    while n > INLINE_ENTRIES as u64 {
        let nodes = n.div_ceil(per_node);
        blocks += nodes;
        n = nodes;
    }
    blocks
}

fn extent_count(ranges: &[(u64, u64)]) -> u64 {
    ranges
        .iter()
        .map(|&(_, n)| n.div_ceil(MAX_EXTENT_LEN))
        .sum()
}

fn build_dir(entries: &mut [DirEntry], bs: usize) -> DirPlan {
    entries.sort_by(|a, b| (a.hash, a.name.as_str()).cmp(&(b.hash, b.name.as_str())));
    let cap = bs - HEADER_SIZE;
    // Leaves: (first hash, payload, count)
    let mut level: Vec<(u64, Vec<u8>, u32)> = Vec::new();
    let mut cur: Vec<u8> = Vec::new();
    let mut count = 0u32;
    let mut first = 0u64;
    for e in entries.iter() {
        let len = DirEntry::encoded_len(e.name.len());
        if cur.len() + len > cap {
            level.push((first, core::mem::take(&mut cur), count));
            count = 0;
        }
        if count == 0 {
            first = e.hash;
        }
        let at = cur.len();
        cur.resize(at + len, 0);
        e.emit(&mut cur[at..]);
        count += 1;
    }
    level.push((first, cur, count));
    // All nodes bottom-up; children referenced by index into `all`.
    let mut all: Vec<(u16, Vec<u8>, u32)> = Vec::new();
    let mut lvl = 0u16;
    let mut current: Vec<(u64, usize)> = Vec::new();
    for (k, payload, c) in level {
        current.push((k, all.len()));
        all.push((0, payload, c));
    }
    let fanout = cap / 16;
    // Index payloads reference children by `all` index for now.
    let mut index_children: Vec<Vec<(u64, usize)>> = vec![Vec::new(); all.len()];
    while current.len() > 1 {
        lvl += 1;
        let mut next = Vec::new();
        for group in current.chunks(fanout) {
            let g: Vec<(u64, usize)> = group.to_vec();
            next.push((group[0].0, all.len()));
            all.push((lvl, Vec::new(), g.len() as u32));
            index_children.push(g);
        }
        current = next;
    }
    // Logical numbering: root (the last node) is block 0, then the rest.
    let root = all.len() - 1;
    let logical = |i: usize| if i == root { 0u64 } else { i as u64 + 1 };
    let mut nodes = Vec::with_capacity(all.len());
    let mut order: Vec<usize> = vec![root];
    order.extend(0..root);
    for i in order {
        let (l, payload, c) = &all[i];
        if *l == 0 {
            nodes.push((0, payload.clone(), *c));
        } else {
            let mut p = vec![0u8; index_children[i].len() * 16];
            for (j, &(k, child)) in index_children[i].iter().enumerate() {
                emit_dir_index_entry(&mut p[j * 16..], k, logical(child));
            }
            nodes.push((*l, p, *c));
        }
    }
    DirPlan { nodes }
}

/// Checks the tree and computes the layout.
pub fn plan(tree: &Tree, opts: &Options) -> Result<Plan> {
    let bs = opts.block_size;
    if !bs.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&bs) {
        return Err(Error::Input(alloc::format!(
            "block size {bs}: a power of two from {MIN_BLOCK_SIZE} to {MAX_BLOCK_SIZE}"
        )));
    }
    let n = tree.nodes.len();
    if n == 0 || !matches!(tree.nodes[0].kind, NodeKind::Dir(_)) {
        return Err(Error::Input("the root must be a directory".into()));
    }
    // Inode numbers in breadth-first order; link counts; parents.
    let mut ino_of = vec![0u64; n];
    let mut links = vec![0u32; n];
    let mut parent = vec![0u64; n];
    let mut order = vec![0usize];
    ino_of[0] = ROOT_INO;
    parent[0] = ROOT_INO;
    let mut queue = VecDeque::from([0usize]);
    while let Some(d) = queue.pop_front() {
        let NodeKind::Dir(children) = &tree.nodes[d].kind else {
            continue;
        };
        let mut names: Vec<&str> = Vec::with_capacity(children.len());
        for (name, c) in children {
            if !valid_name(name.as_bytes()) {
                return Err(Error::Input(alloc::format!("invalid name {name:?}")));
            }
            names.push(name);
            let c = *c;
            if c >= n || c == 0 {
                return Err(Error::Input(alloc::format!(
                    "entry {name:?} refers to node {c}"
                )));
            }
            match tree.nodes[c].kind {
                NodeKind::Dir(_) => {
                    if ino_of[c] != 0 {
                        return Err(Error::Input(alloc::format!(
                            "directory {name:?} is linked twice"
                        )));
                    }
                    parent[c] = ino_of[d];
                    links[d] += 1; // the child's ".."
                    queue.push_back(c);
                }
                NodeKind::File { .. } => links[c] += 1,
            }
            if ino_of[c] == 0 {
                ino_of[c] = order.len() as u64 + 1;
                order.push(c);
            }
        }
        names.sort_unstable();
        if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
            return Err(Error::Input(alloc::format!("duplicate name {:?}", w[0])));
        }
        links[d] += 2;
    }
    let mut dirs: Vec<Option<DirPlan>> = (0..n).map(|_| None).collect();
    let mut ranges: Vec<Vec<(u64, u64)>> = vec![Vec::new(); n];
    let per_node = ((bs as usize - HEADER_SIZE) / ENTRY_SIZE) as u64;
    let mut data_blocks = 0u64;
    for &i in &order {
        match &tree.nodes[i].kind {
            NodeKind::Dir(children) => {
                let mut entries: Vec<DirEntry> = children
                    .iter()
                    .map(|(name, c)| DirEntry {
                        hash: name_hash(name.as_bytes()),
                        ino: ino_of[*c],
                        kind: if matches!(tree.nodes[*c].kind, NodeKind::Dir(_)) {
                            DT_DIR
                        } else {
                            DT_REG
                        },
                        name: name.clone(),
                    })
                    .collect();
                let dp = build_dir(&mut entries, bs as usize);
                data_blocks += dp.nodes.len() as u64;
                dirs[i] = Some(dp);
            }
            NodeKind::File { size, data, .. } => {
                let b = bs as u64;
                let mut r: Vec<(u64, u64)> = Vec::new();
                let mut segs: Vec<(u64, u64)> = data
                    .iter()
                    .filter(|&&(o, l)| l > 0 && o < *size)
                    .map(|&(o, l)| (o, (o + l).min(*size)))
                    .collect();
                segs.sort_unstable();
                for (s, e) in segs {
                    let (fs, fe) = (s / b, e.div_ceil(b));
                    match r.last_mut() {
                        Some((ls, ln)) if *ls + *ln >= fs => *ln = (*ln).max(fe - *ls),
                        _ => r.push((fs, fe - fs)),
                    }
                }
                let blocks: u64 = r.iter().map(|&(_, c)| c).sum();
                data_blocks += blocks + tree_blocks(extent_count(&r), per_node);
                ranges[i] = r;
            }
        }
    }
    let log_blocks = opts.log_blocks();
    if log_blocks != 0 && log_blocks < MIN_LOG_BLOCKS {
        return Err(Error::Input(alloc::format!(
            "a commit log of {log_blocks} blocks: at least {MIN_LOG_BLOCKS}, or 0 for none"
        )));
    }
    data_blocks += log_blocks;
    let used_inodes = order.len() as u64;
    let ipb = Superblock::inodes_per_block(bs);
    let bpb = Superblock::bits_per_bitmap_block(bs);
    let min_blocks = |inodes: u64| {
        // Fixed point: the bitmap depends on the total.
        let itable = inodes.div_ceil(ipb);
        let mut total = 1 + itable + data_blocks + 1;
        loop {
            let t = 1 + total.div_ceil(bpb) + itable + data_blocks;
            if t == total {
                return total;
            }
            total = t;
        }
    };
    let slack_inodes = |blocks: u64| (used_inodes + used_inodes / 10 + 64).max(blocks / 64);
    let (block_count, inode_count) = match opts.size {
        Some(bytes) => {
            let blocks = bytes / bs as u64;
            let mut inodes = slack_inodes(blocks);
            if min_blocks(inodes) > blocks {
                inodes = used_inodes + 1;
            }
            let need = min_blocks(inodes);
            if need > blocks {
                return Err(Error::NoSpace {
                    need_blocks: need,
                    have_blocks: blocks,
                });
            }
            (blocks, inodes)
        }
        None => {
            let need = min_blocks(used_inodes + used_inodes / 10 + 64);
            let blocks = need + (need / 20).max(256);
            (blocks, slack_inodes(blocks))
        }
    };
    let itable_blocks = inode_count.div_ceil(ipb);
    let bitmap_blocks = block_count.div_ceil(bpb);
    Ok(Plan {
        block_size: bs,
        block_count,
        inode_count,
        bitmap_blocks,
        itable_blocks,
        data_start: 1 + bitmap_blocks + itable_blocks,
        data_blocks,
        log_blocks,
        ino_of,
        order,
        links,
        parent,
        dirs,
        ranges,
    })
}

/// What [`write`] made.
#[derive(Clone, Copy, Debug)]
pub struct Summary {
    pub block_size: u32,
    pub blocks: u64,
    pub used_blocks: u64,
    pub inodes: u64,
    pub used_inodes: u64,
    pub files: u64,
    pub dirs: u64,
    pub data_bytes: u64,
}

fn dev_err(block: u64) -> impl Fn(DevError) -> Error {
    move |err| Error::Device { block, err }
}

/// An inode's inline extent area, entry count, depth, and the tree nodes
/// (block, contents) to write.
type ExtentTree = (
    [u8; INLINE_ENTRIES * ENTRY_SIZE],
    u16,
    u16,
    Vec<(u64, Vec<u8>)>,
);

/// Builds the extent tree of `extents` whose nodes go to `blocks`; returns
/// the inline area, entry count and depth, and the node blocks to write.
fn extent_tree(ino: u64, extents: &[Extent], blocks: &[u64], bs: usize) -> ExtentTree {
    let per_node = (bs - HEADER_SIZE) / ENTRY_SIZE;
    let mut inline = [0u8; INLINE_ENTRIES * ENTRY_SIZE];
    if extents.len() <= INLINE_ENTRIES {
        for (i, e) in extents.iter().enumerate() {
            e.emit(&mut inline[i * ENTRY_SIZE..]);
        }
        return (inline, extents.len() as u16, 0, Vec::new());
    }
    let mut out = Vec::new();
    let mut next_block = blocks.iter();
    // (first file block, raw entry) of the current level
    let mut level: Vec<(u64, [u8; ENTRY_SIZE])> = extents
        .iter()
        .map(|e| {
            let mut r = [0u8; ENTRY_SIZE];
            e.emit(&mut r);
            (e.file_block, r)
        })
        .collect();
    let mut depth = 0u16;
    while level.len() > INLINE_ENTRIES {
        let mut up = Vec::new();
        for group in level.chunks(per_node) {
            let blk = *next_block.next().expect("tree blocks planned");
            let mut b = vec![0u8; bs];
            for (i, (_, raw)) in group.iter().enumerate() {
                b[HEADER_SIZE + i * ENTRY_SIZE..HEADER_SIZE + (i + 1) * ENTRY_SIZE]
                    .copy_from_slice(raw);
            }
            BlockHeader {
                kind: KIND_EXTENT,
                level: depth,
                blockno: blk,
                count: group.len() as u32,
                owner: ino,
            }
            .emit(&mut b);
            out.push((blk, b));
            let mut r = [0u8; ENTRY_SIZE];
            IndexEntry {
                file_block: group[0].0,
                child: blk,
            }
            .emit(&mut r);
            up.push((group[0].0, r));
        }
        level = up;
        depth += 1;
    }
    for (i, (_, raw)) in level.iter().enumerate() {
        inline[i * ENTRY_SIZE..(i + 1) * ENTRY_SIZE].copy_from_slice(raw);
    }
    (inline, level.len() as u16, depth, out)
}

/// Writes the image planned by `plan` to `dev` (at least `plan.image_bytes()`
/// long). `progress(done, total)` is called as file data is copied.
pub fn write<D: BlockDeviceMut, S: Source>(
    tree: &Tree,
    plan: &Plan,
    opts: &Options,
    src: &mut S,
    dev: &mut D,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Summary> {
    let bs = plan.block_size as usize;
    let b = bs as u64;
    if dev.size() < plan.image_bytes() {
        return Err(Error::Input(alloc::format!(
            "device of {} bytes is smaller than the image ({} bytes)",
            dev.size(),
            plan.image_bytes()
        )));
    }
    if dev.sector_size() > plan.block_size {
        return Err(Error::BlockSize {
            fs: plan.block_size,
            device: dev.sector_size(),
        });
    }
    let total_data: u64 = plan
        .order
        .iter()
        .map(|&i| match &tree.nodes[i].kind {
            NodeKind::File { data, size, .. } => data
                .iter()
                .map(|&(o, l)| l.min(size.saturating_sub(o)))
                .sum(),
            _ => 0,
        })
        .sum();
    let per_node = ((bs - HEADER_SIZE) / ENTRY_SIZE) as u64;
    let mut next = plan.data_start;
    let mut itable = vec![0u8; plan.itable_blocks as usize * bs];
    let mut copied = 0u64;
    let (mut files, mut dirs) = (0u64, 0u64);
    let mut buf = vec![0u8; (256 * 1024).max(bs)];
    for (k, &i) in plan.order.iter().enumerate() {
        let ino = k as u64 + 1;
        debug_assert_eq!(plan.ino_of[i], ino);
        let node = &tree.nodes[i];
        let (mode, size, extents, owned, depth_inline) = match &node.kind {
            NodeKind::Dir(_) => {
                dirs += 1;
                let dp = plan.dirs[i]
                    .as_ref()
                    .ok_or(Error::Input("unplanned directory".into()))?;
                let start = next;
                for (l, (level, payload, count)) in dp.nodes.iter().enumerate() {
                    let blk = start + l as u64;
                    let mut blkbuf = vec![0u8; bs];
                    blkbuf[HEADER_SIZE..HEADER_SIZE + payload.len()].copy_from_slice(payload);
                    BlockHeader {
                        kind: KIND_DIR,
                        level: *level,
                        blockno: blk,
                        count: *count,
                        owner: ino,
                    }
                    .emit(&mut blkbuf);
                    dev.write_at(blk * b, &blkbuf).map_err(dev_err(blk))?;
                }
                let n = dp.nodes.len() as u64;
                next += n;
                let extents = vec![Extent {
                    file_block: 0,
                    disk_block: start,
                    len: n as u32,
                    flags: 0,
                }];
                (S_IFDIR | (node.perm & 0o7777), n * b, extents, n, None)
            }
            NodeKind::File { size, data, source } => {
                files += 1;
                let mut extents = Vec::new();
                let mut owned = 0u64;
                for &(fb, count) in &plan.ranges[i] {
                    let disk = next;
                    next += count;
                    owned += count;
                    let mut done = 0u64;
                    while done < count {
                        let n = (count - done).min(MAX_EXTENT_LEN);
                        extents.push(Extent {
                            file_block: fb + done,
                            disk_block: disk + done,
                            len: n as u32,
                            flags: 0,
                        });
                        done += n;
                    }
                    // Copy the data of this range in chunks.
                    let chunk_blocks = (buf.len() / bs) as u64;
                    let mut c = 0u64;
                    while c < count {
                        let nblk = (count - c).min(chunk_blocks);
                        let lo = (fb + c) * b;
                        let hi = lo + nblk * b;
                        let out = &mut buf[..(nblk * b) as usize];
                        out.fill(0);
                        for &(o, l) in data {
                            let (s, e) = (o.max(lo), (o + l).min(hi).min(*size));
                            if s < e {
                                src.read(
                                    *source,
                                    s,
                                    &mut out[(s - lo) as usize..(e - lo) as usize],
                                )
                                .map_err(Error::Input)?;
                                copied += e - s;
                            }
                        }
                        dev.write_at((disk + c) * b, out)
                            .map_err(dev_err(disk + c))?;
                        progress(copied, total_data);
                        c += nblk;
                    }
                }
                let tb = tree_blocks(extents.len() as u64, per_node);
                let tree_blks: Vec<u64> = (next..next + tb).collect();
                next += tb;
                owned += tb;
                (
                    S_IFREG | (node.perm & 0o7777),
                    *size,
                    extents,
                    owned,
                    Some(tree_blks),
                )
            }
        };
        let tree_blks = depth_inline.unwrap_or_default();
        let (inline, count, depth, nodes) = extent_tree(ino, &extents, &tree_blks, bs);
        for (blk, data) in nodes {
            dev.write_at(blk * b, &data).map_err(dev_err(blk))?;
        }
        let inode = Inode {
            mode,
            links: plan.links[i],
            size,
            blocks: owned,
            mtime: node.mtime,
            mtime_nsec: node.mtime_nsec,
            ctime: opts.now,
            ctime_nsec: 0,
            uid: node.uid,
            gid: node.gid,
            parent: if mode & S_IFMT == S_IFDIR {
                plan.parent[i]
            } else {
                0
            },
            extent_count: count,
            depth,
            generation: 1,
            inline,
        };
        inode.emit(ino, &mut itable[(ino as usize - 1) * INODE_SIZE..]);
    }
    // The commit log, empty: its first block written with the empty-log
    // marker (below, once the superblock is known), so that no transaction
    // left on the device can be taken for ours.
    let log_start = if plan.log_blocks > 0 { next } else { 0 };
    next += plan.log_blocks;
    let used = next;
    // Inode table.
    dev.write_at(
        plan.data_start.saturating_sub(plan.itable_blocks) * b,
        &itable,
    )
    .map_err(dev_err(1 + plan.bitmap_blocks))?;
    // Bitmap: blocks [0, used) are in use.
    let bpb = Superblock::bits_per_bitmap_block(plan.block_size);
    for i in 0..plan.bitmap_blocks {
        let mut blk = vec![0u8; bs];
        let first = i * bpb;
        let mut set = 0u32;
        for bit in 0..bpb {
            let blockno = first + bit;
            if blockno >= used {
                break;
            }
            blk[HEADER_SIZE + (bit / 8) as usize] |= 1 << (bit % 8);
            set += 1;
        }
        BlockHeader {
            kind: KIND_BITMAP,
            level: 0,
            blockno: 1 + i,
            count: set,
            owner: 0,
        }
        .emit(&mut blk);
        dev.write_at((1 + i) * b, &blk).map_err(dev_err(1 + i))?;
    }
    let mut label = [0u8; 64];
    let l = opts.label.as_bytes();
    label[..l.len().min(63)].copy_from_slice(&l[..l.len().min(63)]);
    let sb = Superblock {
        block_size: plan.block_size,
        block_count: plan.block_count,
        free_blocks: plan.block_count - used,
        inode_count: plan.inode_count,
        free_inodes: plan.inode_count - plan.used_inodes(),
        bitmap_start: 1,
        bitmap_blocks: plan.bitmap_blocks,
        itable_start: 1 + plan.bitmap_blocks,
        itable_blocks: plan.itable_blocks,
        data_start: plan.data_start,
        root_inode: ROOT_INO,
        feature_compat: 0,
        feature_incompat: if plan.log_blocks > 0 { INCOMPAT_LOG } else { 0 },
        feature_ro_compat: 0,
        uuid: opts.uuid,
        created: opts.now,
        written: opts.now,
        log_start,
        log_blocks: plan.log_blocks,
        label,
    };
    if sb.has_log() {
        dev.write_at(log_start * b, &crate::journal::empty(&sb))
            .map_err(dev_err(log_start))?;
    }
    let mut block0 = vec![0u8; bs];
    sb.emit(&mut block0);
    dev.write_at(0, &block0).map_err(dev_err(0))?;
    Ok(Summary {
        block_size: plan.block_size,
        blocks: plan.block_count,
        used_blocks: used,
        inodes: plan.inode_count,
        used_inodes: plan.used_inodes(),
        files,
        dirs,
        data_bytes: copied,
    })
}
