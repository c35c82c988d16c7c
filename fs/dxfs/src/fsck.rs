//! Checking an image: every checksum, the bitmap against what the inodes
//! claim, overlapping or out-of-range extents, link counts, directory
//! structure and reachability. Problems are collected, not fatal, so one run
//! reports everything it can see.

use crate::dev::BlockDevice;
use crate::format::*;
use crate::fs::Fs;
use alloc::collections::BTreeSet;
use alloc::format;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;

/// The result of a check.
#[derive(Clone, Debug, Default)]
pub struct Report {
    pub problems: Vec<String>,
    pub files: u64,
    pub dirs: u64,
    pub used_blocks: u64,
    pub block_count: u64,
    pub used_inodes: u64,
    pub inode_count: u64,
}

impl Report {
    pub fn clean(&self) -> bool {
        self.problems.is_empty()
    }
    fn problem(&mut self, p: String) {
        const MAX: usize = 1000;
        if self.problems.len() < MAX {
            self.problems.push(p);
        } else if self.problems.len() == MAX {
            self.problems.push("... more problems not listed".into());
        }
    }
}

const META: u32 = u32::MAX;

/// Checks the image on `dev`.
pub fn check<D: BlockDevice>(dev: D) -> Report {
    let mut r = Report::default();
    let fs = match Fs::mount(dev) {
        Ok(fs) => fs,
        Err(e) => {
            r.problem(format!("cannot mount: {e}"));
            return r;
        }
    };
    let sb = fs.superblock().clone();
    let bs = sb.block_size as usize;
    r.block_count = sb.block_count;
    r.inode_count = sb.inode_count;
    let nblocks = sb.block_count as usize;

    // The bitmap as written.
    let mut bitmap = vec![false; nblocks];
    let bpb = Superblock::bits_per_bitmap_block(sb.block_size);
    let mut buf = vec![0u8; bs];
    for i in 0..sb.bitmap_blocks {
        let blk = sb.bitmap_start + i;
        if let Err(e) = fs.read_blocks(blk, &mut buf) {
            r.problem(format!("bitmap block {blk}: {e}"));
            continue;
        }
        match BlockHeader::parse(&buf, KIND_BITMAP, blk) {
            Err(w) => {
                r.problem(format!("corrupt block bitmap at block {blk}: {w}"));
                continue;
            }
            Ok(h) => {
                let mut set = 0u32;
                for bit in 0..bpb {
                    if buf[HEADER_SIZE + (bit / 8) as usize] & (1 << (bit % 8)) != 0 {
                        set += 1;
                        let b = i * bpb + bit;
                        if b < sb.block_count {
                            bitmap[b as usize] = true;
                        } else {
                            r.problem(format!(
                                "bitmap block {blk}: bit set for block {b} past the end"
                            ));
                        }
                    }
                }
                if set != h.count {
                    r.problem(format!(
                        "bitmap block {blk}: header counts {} bits, {set} are set",
                        h.count
                    ));
                }
            }
        }
    }

    // What the inodes claim.
    let mut owner = vec![0u32; nblocks];
    for o in owner.iter_mut().take(sb.data_start as usize) {
        *o = META;
    }
    // The commit log is metadata too (its region was checked at mount).
    for o in owner
        .iter_mut()
        .skip(sb.log_start as usize)
        .take(sb.log_blocks as usize)
    {
        *o = META;
    }
    let mut used: BTreeSet<u64> = BTreeSet::new();
    let mut inodes: alloc::collections::BTreeMap<u64, Inode> = alloc::collections::BTreeMap::new();
    for ino in 1..=sb.inode_count {
        match fs.inode_opt(ino) {
            Ok(None) => {}
            Err(e) => {
                r.problem(format!("{e}"));
                used.insert(ino);
            }
            Ok(Some(inode)) => {
                used.insert(ino);
                let mut extents = Vec::new();
                let mut tree = Vec::new();
                if let Err(e) = fs.extents_with_tree(ino, &inode, &mut extents, &mut tree) {
                    r.problem(format!("{e}"));
                } else {
                    let mut owned = 0u64;
                    let claim = |blk: u64, r: &mut Report, owner: &mut Vec<u32>| {
                        let o = &mut owner[blk as usize];
                        if *o != 0 {
                            let other = if *o == META {
                                "metadata".into()
                            } else {
                                format!("inode {}", *o)
                            };
                            r.problem(format!("block {blk} claimed by inode {ino} and {other}"));
                        } else {
                            *o = ino as u32;
                        }
                    };
                    for e in &extents {
                        for b in e.disk_block..e.disk_block + e.len as u64 {
                            claim(b, &mut r, &mut owner);
                        }
                        owned += e.len as u64;
                    }
                    for &b in &tree {
                        claim(b, &mut r, &mut owner);
                    }
                    owned += tree.len() as u64;
                    if owned != inode.blocks {
                        r.problem(format!(
                            "inode {ino}: owns {owned} blocks, records {}",
                            inode.blocks
                        ));
                    }
                }
                if inode.is_dir() {
                    if inode.size % bs as u64 != 0 {
                        r.problem(format!(
                            "directory inode {ino}: size {} is not whole blocks",
                            inode.size
                        ));
                    }
                } else if inode.parent != 0 {
                    r.problem(format!("inode {ino}: a file with a parent field"));
                }
                inodes.insert(ino, inode);
            }
        }
    }
    r.used_inodes = used.len() as u64;

    // Directory structure from the root.
    let mut refs: alloc::collections::BTreeMap<u64, u32> = alloc::collections::BTreeMap::new();
    let mut subdirs: alloc::collections::BTreeMap<u64, u32> = alloc::collections::BTreeMap::new();
    let mut visited = BTreeSet::new();
    visited.insert(ROOT_INO);
    let mut stack = vec![(String::from("/"), ROOT_INO)];
    if inodes.get(&ROOT_INO).is_some_and(|i| i.parent != ROOT_INO) {
        r.problem("root directory: parent is not itself".into());
    }
    while let Some((path, ino)) = stack.pop() {
        r.dirs += 1;
        // A damaged block costs the entries below it, as when serving: the
        // other blocks' entries are still checked.
        let mut lost = Vec::new();
        let entries = match fs.open(ino).and_then(|d| fs.readdir_partial(&d, &mut lost)) {
            Ok(e) => e,
            Err(e) => {
                r.problem(format!("directory {path}: {e}"));
                continue;
            }
        };
        for e in lost {
            r.problem(format!("directory {path}: {e}"));
        }
        for e in entries {
            let child_path = if path == "/" {
                format!("/{}", e.name)
            } else {
                format!("{path}/{}", e.name)
            };
            let Some(inode) = inodes.get(&e.ino) else {
                r.problem(format!(
                    "{child_path}: refers to unused or damaged inode {}",
                    e.ino
                ));
                continue;
            };
            let kind = if inode.is_dir() { DT_DIR } else { DT_REG };
            if kind != e.kind {
                r.problem(format!(
                    "{child_path}: entry type {} but inode {} is {}",
                    e.kind,
                    e.ino,
                    if inode.is_dir() {
                        "a directory"
                    } else {
                        "a file"
                    }
                ));
            }
            *refs.entry(e.ino).or_default() += 1;
            if inode.is_dir() {
                *subdirs.entry(ino).or_default() += 1;
                if inode.parent != ino {
                    r.problem(format!(
                        "{child_path}: parent field {} but found in inode {ino}",
                        inode.parent
                    ));
                }
                if !visited.insert(e.ino) {
                    r.problem(format!(
                        "{child_path}: directory inode {} reached twice (cycle or hard link)",
                        e.ino
                    ));
                    continue;
                }
                stack.push((child_path, e.ino));
            } else {
                r.files += 1;
            }
        }
    }
    for (ino, inode) in &inodes {
        let n = refs.get(ino).copied().unwrap_or(0);
        if *ino != ROOT_INO && n == 0 {
            r.problem(format!("inode {ino}: in use but in no directory"));
            continue;
        }
        let want = if inode.is_dir() {
            2 + subdirs.get(ino).copied().unwrap_or(0)
        } else {
            n
        };
        if inode.links != want {
            r.problem(format!(
                "inode {ino}: link count {} should be {want}",
                inode.links
            ));
        }
    }

    // Bitmap against claims.
    let mut unmarked = Vec::new();
    let mut leaked = Vec::new();
    let mut in_use = 0u64;
    for b in 0..nblocks {
        let claimed = owner[b] != 0;
        if claimed {
            in_use += 1;
        }
        match (claimed, bitmap[b]) {
            (true, false) => unmarked.push(b),
            (false, true) => leaked.push(b),
            _ => {}
        }
    }
    r.used_blocks = in_use;
    let show = |v: &[usize]| {
        let mut s: String = v.iter().take(8).map(|b| format!(" {b}")).collect();
        if v.len() > 8 {
            s.push_str(" ...");
        }
        s
    };
    if !unmarked.is_empty() {
        r.problem(format!(
            "{} blocks in use but free in the bitmap:{}",
            unmarked.len(),
            show(&unmarked)
        ));
    }
    if !leaked.is_empty() {
        r.problem(format!(
            "{} blocks marked in the bitmap but unused:{}",
            leaked.len(),
            show(&leaked)
        ));
    }
    let free = sb.block_count - in_use;
    if free != sb.free_blocks {
        r.problem(format!(
            "superblock: {} free blocks recorded, {free} counted",
            sb.free_blocks
        ));
    }
    let free_inodes = sb.inode_count - r.used_inodes;
    if free_inodes != sb.free_inodes {
        r.problem(format!(
            "superblock: {} free inodes recorded, {free_inodes} counted",
            sb.free_inodes
        ));
    }
    r
}
