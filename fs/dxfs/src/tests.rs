//! Round trips through mkfs, targeted damage, and random corruption.

use crate::dev::{BlockDevice, MemDevice};
use crate::format::*;
use crate::fs::{Fs, Mapping};
use crate::mkfs::{self, Node, NodeKind, Options, Source, Tree};
use crate::{fsck, DevCode, Error, Why};
use dioxide_testkit::Rng;
use std::cell::Cell;
use std::collections::BTreeMap;

/// File contents by source id (holes are zero in the vectors).
struct Mem(Vec<Vec<u8>>);
impl Source for Mem {
    fn read(&mut self, id: u64, offset: u64, buf: &mut [u8]) -> Result<(), String> {
        let f = &self.0[id as usize];
        let o = offset as usize;
        buf.copy_from_slice(f.get(o..o + buf.len()).ok_or("read past end of source")?);
        Ok(())
    }
}

/// A tree plus the expected contents of every path.
struct Sample {
    tree: Tree,
    src: Mem,
    files: BTreeMap<String, Vec<u8>>,
    dirs: Vec<String>,
}

impl Sample {
    fn new() -> Sample {
        Sample {
            tree: Tree {
                nodes: vec![Node::dir(vec![])],
            },
            src: Mem(vec![]),
            files: BTreeMap::new(),
            dirs: vec![],
        }
    }
    fn add_dir(&mut self, parent: usize, path: &str, name: &str) -> usize {
        let i = self.tree.nodes.len();
        self.tree.nodes.push(Node::dir(vec![]));
        if let NodeKind::Dir(c) = &mut self.tree.nodes[parent].kind {
            c.push((name.into(), i));
        }
        self.dirs.push(format!("{path}/{name}"));
        i
    }
    /// A file with data ranges `segs` (the rest is holes).
    fn add_file(
        &mut self,
        parent: usize,
        path: &str,
        name: &str,
        size: u64,
        segs: Vec<(u64, u64)>,
        rng: &mut Rng,
    ) -> usize {
        let mut data = vec![0u8; size as usize];
        for &(o, l) in &segs {
            for b in &mut data[o as usize..(o + l) as usize] {
                *b = (rng.next_u64() >> 56) as u8 | 1;
            }
        }
        let id = self.src.0.len() as u64;
        self.src.0.push(data.clone());
        let i = self.tree.nodes.len();
        self.tree.nodes.push(Node::file(size, segs, id));
        if let NodeKind::Dir(c) = &mut self.tree.nodes[parent].kind {
            c.push((name.into(), i));
        }
        self.files.insert(format!("{path}/{name}"), data);
        i
    }
    fn dense(&mut self, parent: usize, path: &str, name: &str, size: u64, rng: &mut Rng) -> usize {
        self.add_file(
            parent,
            path,
            name,
            size,
            if size > 0 { vec![(0, size)] } else { vec![] },
            rng,
        )
    }
    fn image(&mut self, opts: &Options) -> MemDevice {
        let plan = mkfs::plan(&self.tree, opts).unwrap();
        let mut dev = MemDevice::new(plan.image_bytes() as usize, 512);
        mkfs::write(
            &self.tree,
            &plan,
            opts,
            &mut self.src,
            &mut dev,
            &mut |_, _| {},
        )
        .unwrap();
        dev
    }
}

/// Mounts, walks and reads everything; compares with the sample.
fn verify(s: &Sample, dev: &MemDevice) {
    let fs = Fs::mount(dev).unwrap();
    let walk = fs.walk().unwrap();
    let mut files = BTreeMap::new();
    let mut dirs = vec![];
    for e in &walk {
        if e.inode.is_dir() {
            dirs.push(e.path.clone());
        } else {
            let f = fs.open(e.ino).unwrap();
            let mut buf = vec![0xeeu8; f.size() as usize + 100];
            let n = fs.read(&f, 0, &mut buf).unwrap();
            assert_eq!(n as u64, f.size());
            buf.truncate(n);
            files.insert(e.path.clone(), buf);
        }
    }
    dirs.sort();
    let mut want_dirs = s.dirs.clone();
    want_dirs.sort();
    assert_eq!(dirs, want_dirs);
    assert_eq!(files.len(), s.files.len());
    for (p, data) in &s.files {
        assert!(files.get(p) == Some(data), "content of {p}");
        // Unaligned reads at a few offsets.
        let f = fs.open(fs.resolve(p).unwrap()).unwrap();
        for off in [1u64, 4095, 4097, data.len() as u64 / 2] {
            if off < data.len() as u64 {
                let mut b = vec![0u8; 5000];
                let n = fs.read(&f, off, &mut b).unwrap();
                assert_eq!(
                    &b[..n],
                    &data[off as usize..(off as usize + n)],
                    "{p} at {off}"
                );
            }
        }
    }
    let rep = fsck::check(dev);
    assert!(rep.clean(), "fsck: {:#?}", rep.problems);
}

fn random_sample(seed: u64) -> Sample {
    let mut rng = Rng::new(seed | 1);
    let mut s = Sample::new();
    let mut dirs: Vec<(usize, String)> = vec![(0, String::new())];
    let n = 1 + rng.below(40);
    for k in 0..n {
        let (parent, path) = dirs[rng.below(dirs.len() as u64) as usize].clone();
        let name = match rng.below(6) {
            0 => format!("é-ü-{k}"),
            1 => format!("{}{k}", "x".repeat(rng.below(200) as usize)),
            _ => format!("f{k}"),
        };
        match rng.below(10) {
            0..=2 => {
                let i = s.add_dir(parent, &path, &name);
                dirs.push((i, format!("{path}/{name}")));
            }
            3 => {
                s.dense(parent, &path, &name, 0, &mut rng);
            }
            4 => {
                s.dense(parent, &path, &name, 1, &mut rng);
            }
            5 => {
                // Sparse: several data ranges with holes between.
                let size = 4096 * (1 + rng.below(64)) + rng.below(4096);
                let mut segs = vec![];
                let mut o = rng.below(8192);
                while o < size {
                    let l = (1 + rng.below(9000)).min(size - o);
                    segs.push((o, l));
                    o += l + 1 + rng.below(20000);
                }
                s.add_file(parent, &path, &name, size, segs, &mut rng);
            }
            _ => {
                let size = rng.below(300_000);
                s.dense(parent, &path, &name, size, &mut rng);
            }
        }
    }
    s
}

#[test]
fn random_trees_round_trip() {
    for seed in 1..=40u64 {
        let mut s = random_sample(seed * 7919);
        let bs = [4096u32, 8192, 65536][(seed % 3) as usize];
        let dev = s.image(&Options {
            block_size: bs,
            ..Default::default()
        });
        verify(&s, &dev);
    }
}

#[test]
fn empty_tree_and_empty_files() {
    let mut s = Sample::new();
    let dev = s.image(&Options::default());
    verify(&s, &dev);
    let mut rng = Rng::new(5);
    s.dense(0, "", "empty", 0, &mut rng);
    s.dense(0, "", "one", 1, &mut rng);
    s.dense(0, "", "block", 4096, &mut rng);
    s.dense(0, "", "block+1", 4097, &mut rng);
    let dev = s.image(&Options::default());
    verify(&s, &dev);
    let fs = Fs::mount(&dev).unwrap();
    let f = fs.open(fs.resolve("/empty").unwrap()).unwrap();
    assert_eq!((f.size(), f.extents().len(), f.inode.blocks), (0, 0, 0));
}

#[test]
fn hard_links_share_an_inode() {
    let mut s = Sample::new();
    let mut rng = Rng::new(3);
    let f = s.dense(0, "", "a", 5000, &mut rng);
    let d = s.add_dir(0, "", "d");
    if let NodeKind::Dir(c) = &mut s.tree.nodes[d].kind {
        c.push(("b".into(), f));
    }
    let data = s.files["/a"].clone();
    s.files.insert("/d/b".into(), data);
    let dev = s.image(&Options::default());
    verify(&s, &dev);
    let fs = Fs::mount(&dev).unwrap();
    let (a, b) = (fs.resolve("a").unwrap(), fs.resolve("/d/b").unwrap());
    assert_eq!(a, b);
    assert_eq!(fs.inode(a).unwrap().links, 2);
}

#[test]
fn fragmented_files_use_extent_trees() {
    // Every other block is a hole: n extents for 2n blocks.
    for (n, depth) in [(6u64, 0u16), (7, 1), (1000, 1), (1100, 2)] {
        let mut s = Sample::new();
        let mut rng = Rng::new(n);
        let segs: Vec<(u64, u64)> = (0..n).map(|i| (i * 8192, 4096)).collect();
        s.add_file(0, "", "frag", n * 8192 - 4096, segs, &mut rng);
        let dev = s.image(&Options::default());
        verify(&s, &dev);
        let fs = Fs::mount(&dev).unwrap();
        let f = fs.open(fs.resolve("frag").unwrap()).unwrap();
        assert_eq!(f.extents().len() as u64, n);
        assert_eq!(f.inode.depth, depth, "{n} extents");
        // Mapping: block 2i mapped, 2i+1 a hole.
        for i in [0, n / 2, n - 1] {
            assert!(matches!(f.map(2 * i), Mapping::Mapped { blocks: 1, .. }));
            if i < n - 1 {
                assert_eq!(f.map(2 * i + 1), Mapping::Hole { blocks: 1 });
            }
        }
        assert_eq!(f.map(2 * n), Mapping::Hole { blocks: u64::MAX });
    }
}

#[test]
fn deep_directories_and_long_utf8_names() {
    let mut s = Sample::new();
    let mut rng = Rng::new(11);
    let mut parent = 0;
    let mut path = String::new();
    for i in 0..200 {
        let name = format!("d{i}");
        parent = s.add_dir(parent, &path, &name);
        path = format!("{path}/{name}");
    }
    // 255 bytes of UTF-8: 85 three-byte characters.
    let long: String = "€".repeat(85);
    assert_eq!(long.len(), 255);
    s.dense(parent, &path, &long, 3, &mut rng);
    let dev = s.image(&Options::default());
    verify(&s, &dev);
    let fs = Fs::mount(&dev).unwrap();
    assert!(fs.resolve(&format!("{path}/{long}")).is_ok());
}

/// Counts device reads.
struct Counting<'a>(&'a MemDevice, Cell<u64>);
impl BlockDevice for Counting<'_> {
    fn sector_size(&self) -> u32 {
        self.0.sector_size()
    }
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn read_at(&self, o: u64, b: &mut [u8]) -> Result<(), crate::DevError> {
        self.1.set(self.1.get() + 1);
        self.0.read_at(o, b)
    }
}

#[test]
fn directory_of_100000_names_is_looked_up_in_log_n_blocks() {
    let mut s = Sample::new();
    let mut rng = Rng::new(17);
    let n = 100_000;
    for i in 0..n {
        // Names up to 60 bytes: ~1000 leaves, a two-level index.
        let name = format!("file-{i:06}-{}", "n".repeat(i * 7 % 48));
        s.dense(0, "", &name, (i % 3) as u64, &mut rng);
    }
    let dev = s.image(&Options::default());
    let fs = Fs::mount(Counting(&dev, Cell::new(0))).unwrap();
    let root = fs.open(ROOT_INO).unwrap();
    let dir_blocks = root.size() / 4096;
    assert!(dir_blocks > 500, "{dir_blocks} directory blocks");
    for i in (0..n).step_by(997) {
        let name = format!("file-{i:06}-{}", "n".repeat(i * 7 % 48));
        let before = fs.device().1.get();
        let e = fs.lookup(&root, &name).unwrap().expect("found");
        let reads = fs.device().1.get() - before;
        assert!(
            reads <= 4,
            "{reads} block reads for one lookup in {dir_blocks} blocks"
        );
        assert_eq!(fs.inode(e.ino).unwrap().size, (i % 3) as u64);
    }
    assert_eq!(fs.lookup(&root, "missing").unwrap(), None);
    assert_eq!(fs.readdir(&root).unwrap().len(), n);
    assert!(fsck::check(&dev).clean());
}

#[test]
fn forged_entry_hashes_are_rejected_not_followed() {
    // A directory whose leaves all claim one hash value (an index of equal
    // keys, leaves of forged hashes) with valid checksums: the reader must
    // report the bad hash, not miss, loop or panic.
    let mut entries: Vec<DirEntry> = (0..2000)
        .map(|i| DirEntry {
            hash: 42,
            ino: 2 + i,
            kind: DT_REG,
            name: format!("same-hash-{i:05}"),
        })
        .collect();
    let mut s = Sample::new();
    let mut rng = Rng::new(1);
    for e in &entries {
        s.dense(0, "", &e.name, 0, &mut rng);
    }
    let mut dev = s.image(&Options::default());
    // Rewrite the root directory's blocks with forged hashes, then fix up.
    let fs = Fs::mount(&dev).unwrap();
    let root = fs.open(ROOT_INO).unwrap();
    let real: Vec<DirEntry> = fs.readdir(&root).unwrap();
    let by_name: BTreeMap<String, u64> = real.iter().map(|e| (e.name.clone(), e.ino)).collect();
    for e in entries.iter_mut() {
        e.ino = by_name[&e.name];
    }
    let disk = root.extents()[0].disk_block;
    let nblocks = root.extents()[0].len as u64;
    // Pack forged leaves and a one-level index into the same blocks.
    let bs = 4096usize;
    let mut leaves: Vec<(u64, Vec<u8>, u32)> = vec![];
    let mut cur = vec![];
    let mut c = 0;
    for e in &entries {
        let len = DirEntry::encoded_len(e.name.len());
        if cur.len() + len > bs - HEADER_SIZE {
            leaves.push((42, std::mem::take(&mut cur), c));
            c = 0;
        }
        let at = cur.len();
        cur.resize(at + len, 0);
        e.emit(&mut cur[at..]);
        c += 1;
    }
    leaves.push((42, cur, c));
    assert!((leaves.len() as u64) < nblocks && leaves.len() > 2);
    let mut root_blk = vec![0u8; bs];
    for (i, _) in leaves.iter().enumerate() {
        emit_dir_index_entry(&mut root_blk[HEADER_SIZE + i * 16..], 42, 1 + i as u64);
    }
    BlockHeader {
        kind: KIND_DIR,
        level: 1,
        blockno: disk,
        count: leaves.len() as u32,
        owner: 1,
    }
    .emit(&mut root_blk);
    dev.data[disk as usize * bs..][..bs].copy_from_slice(&root_blk);
    for (i, (_, payload, c)) in leaves.iter().enumerate() {
        let blk = disk + 1 + i as u64;
        let mut b = vec![0u8; bs];
        b[HEADER_SIZE..HEADER_SIZE + payload.len()].copy_from_slice(payload);
        BlockHeader {
            kind: KIND_DIR,
            level: 0,
            blockno: blk,
            count: *c,
            owner: 1,
        }
        .emit(&mut b);
        dev.data[blk as usize * bs..][..bs].copy_from_slice(&b);
    }
    let fs = Fs::mount(&dev).unwrap();
    let root = fs.open(ROOT_INO).unwrap();
    match fs.lookup(&root, "same-hash-01999") {
        Err(Error::Corrupt {
            why: Why::Field("entry hash"),
            ..
        }) => {}
        other => panic!("{other:?}"),
    }
}

// ---- targeted damage ----

/// Re-computes the checksum of a metadata block after a patch.
fn seal(blk: &mut [u8]) {
    let crc = crc_with_hole(blk, 20);
    blk[20..24].copy_from_slice(&crc.to_le_bytes());
}

fn base_image() -> (Sample, MemDevice) {
    let mut s = Sample::new();
    let mut rng = Rng::new(99);
    let d = s.add_dir(0, "", "dir");
    s.dense(d, "/dir", "a", 10_000, &mut rng);
    let segs: Vec<(u64, u64)> = (0..20).map(|i| (i * 8192, 4096)).collect();
    s.add_file(0, "", "frag", 20 * 8192, segs, &mut rng);
    s.dense(0, "", "b", 3, &mut rng);
    let dev = s.image(&Options::default());
    (s, dev)
}

fn inode_offset(dev: &MemDevice, ino: u64) -> usize {
    let sb = Superblock::parse(&dev.data).unwrap();
    sb.itable_start as usize * 4096 + (ino as usize - 1) * INODE_SIZE
}

/// Applies `f` to inode `ino` and re-seals its checksum.
fn patch_inode(dev: &mut MemDevice, ino: u64, f: impl FnOnce(&mut Inode)) {
    let off = inode_offset(dev, ino);
    let mut i = Inode::parse(ino, &dev.data[off..]).unwrap().unwrap();
    f(&mut i);
    i.emit(ino, &mut dev.data[off..off + INODE_SIZE]);
}

#[test]
fn wrong_magic_bad_checksum_truncation() {
    let (_, dev) = base_image();
    let mut d = dev.clone();
    d.data[0] ^= 0xff;
    assert_eq!(
        Fs::mount(&d).err().unwrap().to_string(),
        "corrupt superblock at block 0: bad magic"
    );
    let mut d = dev.clone();
    d.data[100] ^= 1;
    assert_eq!(
        Fs::mount(&d).err().unwrap().to_string(),
        "corrupt superblock at block 0: bad checksum"
    );
    let mut d = dev.clone();
    d.data.truncate(dev.data.len() / 2);
    assert_eq!(
        Fs::mount(&d).err().unwrap().to_string(),
        "corrupt superblock at block 0: block count (image truncated?) out of range"
    );
    let mut d = dev.clone();
    d.data.truncate(1000);
    assert!(Fs::mount(&d).is_err());
    // A damaged inode: named with its block; other files stay readable.
    let mut d = dev.clone();
    let fs = Fs::mount(&dev).unwrap();
    let a = fs.resolve("/dir/a").unwrap();
    let off = inode_offset(&d, a);
    d.data[off + 8] ^= 0x40;
    let fs = Fs::mount(&d).unwrap();
    let e = fs.resolve("/dir/a").and_then(|i| fs.open(i)).unwrap_err();
    assert!(
        e.to_string()
            .starts_with(&format!("corrupt inode {a} at block ")),
        "{e}"
    );
    assert!(e.to_string().ends_with("bad checksum"));
    let b = fs.open(fs.resolve("/b").unwrap()).unwrap();
    let mut buf = [0u8; 3];
    assert_eq!(fs.read(&b, 0, &mut buf).unwrap(), 3);
    assert!(!fsck::check(&d).clean());
}

#[test]
fn extents_past_the_device_or_overlapping() {
    let (_, dev) = base_image();
    let fs = Fs::mount(&dev).unwrap();
    let a = fs.resolve("/dir/a").unwrap();
    let b = fs.resolve("/b").unwrap();
    let b_disk = fs.open(b).unwrap().extents()[0].disk_block;
    let mut d = dev.clone();
    patch_inode(&mut d, a, |i| {
        let mut e = Extent::parse(i.inline_entry(0));
        e.disk_block = 1 << 40;
        e.emit(&mut i.inline[0..24]);
    });
    let fs = Fs::mount(&d).unwrap();
    let e = fs.open(a).unwrap_err();
    assert!(
        e.to_string().contains("extent disk blocks out of range"),
        "{e}"
    );
    // Overlap with another file: the reader cannot see it, fsck does.
    let mut d = dev.clone();
    patch_inode(&mut d, a, |i| {
        let mut e = Extent::parse(i.inline_entry(0));
        e.disk_block = b_disk;
        e.emit(&mut i.inline[0..24]);
    });
    let rep = fsck::check(&d);
    assert!(
        rep.problems
            .iter()
            .any(|p| p.contains(&format!("block {b_disk} claimed by inode"))),
        "{:?}",
        rep.problems
    );
    // Extent mapping past the end of the file.
    let mut d = dev.clone();
    patch_inode(&mut d, a, |i| i.size = 10);
    let e = Fs::mount(&d).unwrap().open(a).unwrap_err();
    assert!(e.to_string().contains("extent past end of file"), "{e}");
}

#[test]
fn directory_cycle_is_detected() {
    let (_, dev) = base_image();
    let fs = Fs::mount(&dev).unwrap();
    let dir = fs.open(fs.resolve("/dir").unwrap()).unwrap();
    let disk = dir.extents()[0].disk_block as usize;
    // Point /dir/a at the root directory (inode 1) and re-seal the block.
    let mut d = dev.clone();
    let blk = &mut d.data[disk * 4096..(disk + 1) * 4096];
    blk[HEADER_SIZE + 8..HEADER_SIZE + 16].copy_from_slice(&1u64.to_le_bytes());
    blk[HEADER_SIZE + 17] = DT_DIR;
    seal(blk);
    let fs = Fs::mount(&d).unwrap();
    let e = fs.walk().unwrap_err();
    assert!(
        e.to_string().contains("directory reached twice (cycle)"),
        "{e}"
    );
    let rep = fsck::check(&d);
    assert!(
        rep.problems.iter().any(|p| p.contains("reached twice")),
        "{:?}",
        rep.problems
    );
}

#[test]
fn bad_names_and_inode_numbers() {
    let (_, dev) = base_image();
    let fs = Fs::mount(&dev).unwrap();
    let dir = fs.open(fs.resolve("/dir").unwrap()).unwrap();
    let disk = dir.extents()[0].disk_block as usize;
    for (patch, want) in [(b'/', "bad entry name"), (0u8, "bad entry name")] {
        let mut d = dev.clone();
        let blk = &mut d.data[disk * 4096..(disk + 1) * 4096];
        blk[HEADER_SIZE + 18] = patch; // first byte of the name "a"
        seal(blk);
        let fs = Fs::mount(&d).unwrap();
        let e = fs
            .readdir(&fs.open(fs.resolve("/dir").unwrap()).unwrap())
            .unwrap_err();
        assert!(e.to_string().contains(want), "{e}");
    }
    let mut d = dev.clone();
    let blk = &mut d.data[disk * 4096..(disk + 1) * 4096];
    blk[HEADER_SIZE + 8..HEADER_SIZE + 16].copy_from_slice(&(u64::MAX).to_le_bytes());
    seal(blk);
    let fs = Fs::mount(&d).unwrap();
    assert_eq!(
        fs.resolve("/dir/a").and_then(|i| fs.inode(i)),
        Err(Error::BadInode(u64::MAX))
    );
    assert!(fs.resolve("/dir/../b").is_err());
    assert!(matches!(fs.resolve("/nope"), Err(Error::NotFound(_))));
}

#[test]
fn unwritten_extents_read_as_zeroes() {
    let (_, dev) = base_image();
    let fs = Fs::mount(&dev).unwrap();
    let a = fs.resolve("/dir/a").unwrap();
    let mut d = dev.clone();
    patch_inode(&mut d, a, |i| {
        let mut e = Extent::parse(i.inline_entry(0));
        e.flags = EXTENT_UNWRITTEN;
        e.emit(&mut i.inline[0..24]);
    });
    let fs = Fs::mount(&d).unwrap();
    let f = fs.open(a).unwrap();
    assert!(matches!(f.map(0), Mapping::Unwritten { .. }));
    let mut buf = vec![1u8; 10_000];
    assert_eq!(fs.read(&f, 0, &mut buf).unwrap(), 10_000);
    assert!(buf.iter().all(|&b| b == 0));
}

// ---- random corruption ----

/// Re-seals the checksum of whatever structure holds byte `at`, so that the
/// damage reaches the semantic checks behind the checksums.
fn reseal(d: &mut MemDevice, at: usize) {
    let Ok(sb) = Superblock::parse(&d.data) else {
        if at < 512 {
            let crc = crc_with_hole(&d.data[..512], 508);
            d.data[508..512].copy_from_slice(&crc.to_le_bytes());
        }
        return;
    };
    let bs = sb.block_size as usize;
    let blk = at / bs;
    if at < 512 {
        let crc = crc_with_hole(&d.data[..512], 508);
        d.data[508..512].copy_from_slice(&crc.to_le_bytes());
    } else if (sb.itable_start as usize..(sb.itable_start + sb.itable_blocks) as usize)
        .contains(&blk)
    {
        let slot = (at - sb.itable_start as usize * bs) / INODE_SIZE;
        let off = sb.itable_start as usize * bs + slot * INODE_SIZE;
        let ino = slot as u64 + 1;
        let mut d2 = [0u8; 4];
        let mut digest = CRC32C.digest();
        digest.update(&ino.to_le_bytes());
        digest.update(&d.data[off..off + 252]);
        d2.copy_from_slice(&digest.finalize().to_le_bytes());
        d.data[off + 252..off + 256].copy_from_slice(&d2);
    } else if (blk + 1) * bs <= d.data.len() && d.data[blk * bs..blk * bs + 4] == BLOCK_MAGIC {
        let b = &mut d.data[blk * bs..(blk + 1) * bs];
        let crc = crc_with_hole(b, 20);
        b[20..24].copy_from_slice(&crc.to_le_bytes());
    }
}

/// Mounts, walks and reads everything, ignoring errors: must not panic or
/// hang.
fn exercise(d: &MemDevice) {
    let Ok(fs) = Fs::mount(d) else { return };
    if let Ok(entries) = fs.walk() {
        for e in entries {
            if let Ok(f) = fs.open(e.ino) {
                let mut buf = vec![0u8; (f.size() as usize).min(1 << 20)];
                let _ = fs.read(&f, 0, &mut buf);
            }
        }
    }
    for p in ["/dir/a", "/frag", "/b", "/dir", "/x/y"] {
        if let Ok(i) = fs.resolve(p) {
            let _ = fs.open(i);
        }
    }
}

#[test]
fn ten_thousand_corrupted_images_never_panic() {
    let (_, base) = base_image();
    let used = {
        let sb = Superblock::parse(&base.data).unwrap();
        ((sb.block_count - sb.free_blocks) * 4096) as usize
    };
    let mut rng = Rng::new(0xc0ffee);
    let mut mounted = 0;
    for round in 0..10_000u32 {
        let mut d = base.clone();
        let at = rng.below(used as u64) as usize;
        match rng.below(6) {
            0 => d.data[at] ^= 1 << rng.below(8),
            1 => {
                for _ in 0..1 + rng.below(16) {
                    let a = rng.below(used as u64) as usize;
                    d.data[a] = rng.next_u64() as u8;
                }
            }
            2 => {
                let blk = at / 4096;
                d.data[blk * 4096..(blk + 1) * 4096].fill(0);
            }
            3 => d.data.truncate(at & !511),
            _ => {
                // Semantic damage behind a valid checksum: a random byte or
                // a random 8-byte field, then re-seal.
                if rng.below(2) == 0 {
                    d.data[at] = rng.next_u64() as u8;
                } else {
                    let a = at & !7;
                    let v = match rng.below(4) {
                        0 => 0,
                        1 => u64::MAX,
                        2 => rng.below(64),
                        _ => rng.next_u64(),
                    };
                    d.data[a..a + 8].copy_from_slice(&v.to_le_bytes());
                }
                reseal(&mut d, at);
            }
        }
        exercise(&d);
        if Fs::mount(&d).is_ok() {
            mounted += 1;
        }
        if round % 10 == 0 {
            let _ = fsck::check(&d);
        }
    }
    // Most damage lands in blocks the mount does not need; the checks behind
    // the checksums were reached.
    assert!(mounted > 1000, "{mounted}");
}

#[test]
fn iomap_begin_maps_extents_holes_and_eof() {
    use dioxide_iomap::{IomapFlags, IomapOps, IomapType};
    let mut s = Sample::new();
    let mut rng = Rng::new(21);
    // Data at blocks 0 and 2, a hole at block 1, size 3 blocks + 10 bytes.
    s.add_file(
        0,
        "",
        "f",
        3 * 4096 + 10,
        vec![(0, 4096), (8192, 4096 + 10)],
        &mut rng,
    );
    let dev = s.image(&Options::default());
    let fs = Fs::mount(&dev).unwrap();
    let f = fs.open(fs.resolve("f").unwrap()).unwrap();
    let m0 = f.iomap_begin(100, 4096, IomapFlags::DIRECT).unwrap();
    assert_eq!(
        (m0.kind, m0.offset, m0.length),
        (IomapType::Mapped, 0, 4096)
    );
    assert_eq!(m0.addr, f.extents()[0].disk_block * 4096);
    let m1 = f.iomap_begin(4096, 4096, IomapFlags::DIRECT).unwrap();
    assert_eq!(
        (m1.kind, m1.offset, m1.length),
        (IomapType::Hole, 4096, 4096)
    );
    let m2 = f.iomap_begin(3 * 4096, 10, IomapFlags::DIRECT).unwrap();
    assert_eq!(
        (m2.kind, m2.offset, m2.length),
        (IomapType::Mapped, 8192 + 4096, 4096)
    );
    assert_eq!(IomapOps::size(&f), 3 * 4096 + 10);
    let past = f.iomap_begin(1 << 30, 4096, IomapFlags::DIRECT).unwrap();
    assert_eq!(past.kind, IomapType::Hole);
}

/// A device that fails every read with an NVMe-like status.
struct Failing;
impl BlockDevice for Failing {
    fn sector_size(&self) -> u32 {
        512
    }
    fn size(&self) -> u64 {
        1 << 20
    }
    fn read_at(&self, offset: u64, _: &mut [u8]) -> Result<(), crate::DevError> {
        Err(crate::DevError::Io {
            offset,
            reason: "Unrecovered Read Error",
            code: Some(DevCode::Nvme { sct: 0x2, sc: 0x81 }),
        })
    }
}

#[test]
fn a_device_error_keeps_its_reason_code_and_block_up_to_the_message() {
    let e = Fs::mount(Failing).err().unwrap();
    let want = crate::DevError::Io {
        offset: 0,
        reason: "Unrecovered Read Error",
        code: Some(DevCode::Nvme { sct: 0x2, sc: 0x81 }),
    };
    assert_eq!(
        e,
        Error::Device {
            block: 0,
            err: want
        }
    );
    assert_eq!(
        e.to_string(),
        "device error at block 0: I/O error at byte 0: Unrecovered Read Error (sct 0x2 sc 0x81)"
    );
    let src = core::error::Error::source(&e).map(|s| s.to_string());
    assert_eq!(src, Some(want.to_string()));
    // The in-memory device's own checks are typed too.
    let dev = MemDevice::new(4096, 512);
    let mut b = [0u8; 512];
    assert_eq!(
        dev.read_at(100, &mut b),
        Err(crate::DevError::Unaligned {
            offset: 100,
            len: 512
        })
    );
    assert_eq!(
        dev.read_at(4096, &mut b),
        Err(crate::DevError::OutOfRange {
            offset: 4096,
            len: 512,
            size: 4096
        })
    );
}
