//! Power cuts under dxfs writes (issue 22's crash suite, its dxfs half).
//!
//! A device with a volatile write cache records every write, FUA write and
//! flush. A generated workload runs on dxfs over it: overwrites of written
//! blocks, allocating writes into a sparse volume and into a file's holes,
//! writes into unwritten extents, commits while a write's data is still in
//! flight (mapped and written but not yet ended), FUA writes and flushes
//! (commits). Then power is cut at every point of the device's record, as
//! dm-log-writes replay and CrashMonkey do: for each prefix of the record,
//! the writes a flush made durable are kept, and of the writes still in
//! the cache none, all, or random subsets (kept in their order). After each
//! cut:
//!
//! - fsck is clean, read through the log's committed transaction, and
//!   again after a writable mount wrote that transaction home;
//! - every block acknowledged as durable (its FUA write returned, or a
//!   commit returned after it) holds that write or a later one of its
//!   block;
//! - no block of a file holds bytes that were never written to that file
//!   block (stale bytes of another file, of a freed block or of the
//!   block's earlier life read as zeroes or not at all).
//!
//! Seeds are printed on failure (`CRASH_SEEDS=a..b` to run others).
//!
//! Free blocks start with random bytes (a drive's old life), so that a
//! block exposed before its data landed is seen. Mutations tried, each
//! failing at seed 0: extents allocated written instead of unwritten; no
//! flush before the commit block; no flush after the checkpoint. The first
//! run found the log's checksum blind to changed inodes (crc32c over
//! blocks holding crc32c-sealed inodes; now CRC-64).

use dioxide_dxfs::mkfs::{self, Node, NodeKind, Options, Source, Tree};
use dioxide_dxfs::{fsck, BlockDevice, BlockDeviceMut, DevError, Fs, MemDevice, WritableFs};
use dioxide_testkit::Rng;
use std::collections::HashMap;

const BS: u64 = 4096;
const IMAGE_BLOCKS: u64 = 640;

/// One thing the device was asked to do.
#[derive(Clone)]
enum Op {
    Write(u64, Vec<u8>),
    Fua(u64, Vec<u8>),
    Flush,
}

/// A device with a volatile write cache: reads see every write; `ops`
/// records what a power cut may keep.
struct CacheDev {
    now: MemDevice,
    base: Vec<u8>,
    ops: Vec<Op>,
}

impl BlockDevice for CacheDev {
    fn sector_size(&self) -> u32 {
        512
    }
    fn size(&self) -> u64 {
        self.now.size()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), DevError> {
        self.now.read_at(offset, buf)
    }
}

impl BlockDeviceMut for CacheDev {
    fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<(), DevError> {
        self.now.write_at(offset, buf)?;
        self.ops.push(Op::Write(offset, buf.to_vec()));
        Ok(())
    }
    fn flush(&mut self) -> Result<(), DevError> {
        self.ops.push(Op::Flush);
        Ok(())
    }
    fn write_fua(&mut self, offset: u64, buf: &[u8]) -> Result<(), DevError> {
        self.now.write_at(offset, buf)?;
        self.ops.push(Op::Fua(offset, buf.to_vec()));
        Ok(())
    }
}

impl CacheDev {
    /// What the medium holds after a power cut once the first `cut` ops
    /// were done: every write a later flush (before the cut) covered, every
    /// FUA write, and the cached writes `keep` chooses, all in their order.
    fn after_cut(&self, cut: usize, keep: &mut dyn FnMut(usize) -> bool) -> MemDevice {
        let ops = &self.ops[..cut];
        let last_flush = ops.iter().rposition(|o| matches!(o, Op::Flush));
        let mut m = MemDevice::from_vec(self.base.clone(), 512);
        for (i, op) in ops.iter().enumerate() {
            match op {
                Op::Write(off, d) if last_flush.is_some_and(|f| i < f) || keep(i) => {
                    m.write_at(*off, d).expect("in range")
                }
                Op::Fua(off, d) => m.write_at(*off, d).expect("in range"),
                _ => {}
            }
        }
        m
    }
}

/// The bytes of version `v` (from 1) of file block `fb` of inode `ino`.
fn pattern(ino: u64, fb: u64, v: u64) -> Vec<u8> {
    let mut b = vec![0u8; BS as usize];
    for (i, c) in b.chunks_mut(8).enumerate() {
        let w = (ino << 56) ^ (fb << 32) ^ (v << 12) ^ i as u64 ^ 0xd10c_5eed;
        c.copy_from_slice(&w.to_le_bytes());
    }
    b
}

/// Version 0 is mkfs's bytes (`Fill`) for a block with data, zeroes for a
/// hole.
struct Fill;
impl Source for Fill {
    fn read(&mut self, id: u64, offset: u64, buf: &mut [u8]) -> Result<(), String> {
        for (k, c) in buf.chunks_mut(BS as usize).enumerate() {
            c.copy_from_slice(&pattern(id + 2, offset / BS + k as u64, 0)[..c.len()]);
        }
        Ok(())
    }
}

/// The files: (size in blocks, blocks mkfs writes).
const FILES: [(u64, &[(u64, u64)]); 3] = [
    (160, &[]),                // inode 2: a sparse volume
    (48, &[(0, 16), (30, 6)]), // inode 3: data and holes
    (24, &[(0, 24)]),          // inode 4: dense, overwrites only
];

fn base_image() -> MemDevice {
    let mut tree = Tree {
        nodes: vec![Node::dir(vec![])],
    };
    for (i, (blocks, data)) in FILES.iter().enumerate() {
        let data = data.iter().map(|&(o, l)| (o * BS, l * BS)).collect();
        tree.nodes.push(Node::file(blocks * BS, data, i as u64));
        if let NodeKind::Dir(c) = &mut tree.nodes[0].kind {
            c.push((format!("f{i}"), i + 1));
        }
    }
    let opts = Options {
        size: Some(IMAGE_BLOCKS * BS),
        uuid: [0xc7; 16],
        log_blocks: Some(64),
        ..Default::default()
    };
    let plan = mkfs::plan(&tree, &opts).expect("plan");
    // The device's old life: every block mkfs leaves alone (free blocks,
    // the log past its first block) holds bytes no file ever had, so that
    // a block exposed before its data landed shows them.
    let mut stale = vec![0u8; plan.image_bytes() as usize];
    Rng::new(0x57a1e).fill(&mut stale);
    let mut dev = MemDevice::from_vec(stale, 512);
    mkfs::write(&tree, &plan, &opts, &mut Fill, &mut dev, &mut |_, _| {}).expect("mkfs");
    dev
}

/// What one file block may hold.
#[derive(Clone, Default)]
struct Block {
    /// Versions whose data write was issued, with the op index it was at.
    written: Vec<(u64, usize)>,
    /// (version, op index from which it is durable).
    durable: Vec<(u64, usize)>,
}

/// A write whose data is on the device but not yet ended.
struct InFlight {
    ino: u64,
    fb: u64,
    blocks: u64,
}

struct Workload {
    blocks: HashMap<(u64, u64), Block>,
    /// Writes ended (or overwrites) since the last commit, as (ino, fb, v).
    unflushed: Vec<(u64, u64, u64)>,
    version: u64,
}

impl Workload {
    fn new() -> Workload {
        let mut blocks = HashMap::new();
        for (i, (n, data)) in FILES.iter().enumerate() {
            for fb in 0..*n {
                let mut b = Block::default();
                if data.iter().any(|&(o, l)| (o..o + l).contains(&fb)) {
                    b.written.push((0, 0));
                    b.durable.push((0, 0));
                }
                blocks.insert((i as u64 + 2, fb), b);
            }
        }
        Workload {
            blocks,
            unflushed: Vec::new(),
            version: 0,
        }
    }

    /// One generated step.
    fn step(
        &mut self,
        w: &mut WritableFs<&mut CacheDev>,
        rng: &mut Rng,
        flight: &mut Vec<InFlight>,
    ) {
        match rng.below(10) {
            0 => self.commit(w),
            1 if !flight.is_empty() => {
                let f = flight.remove(rng.below(flight.len() as u64) as usize);
                w.end_write(f.ino, f.fb, f.blocks).expect("end_write");
                for k in 0..f.blocks {
                    let v = self.latest(f.ino, f.fb + k);
                    self.unflushed.push((f.ino, f.fb + k, v));
                }
            }
            _ => {
                let i = rng.below(3) as usize;
                let ino = i as u64 + 2;
                let (n, _) = FILES[i];
                let len = 1 + rng.below(3).min(n - 1);
                let fb = rng.below(n - len + 1);
                // Never two writes in flight on one block (the service
                // orders them the same way: a client that does it gets
                // either).
                if flight
                    .iter()
                    .any(|f| f.ino == ino && f.fb < fb + len && fb < f.fb + f.blocks)
                {
                    return;
                }
                let fua = rng.below(5) == 0;
                let hold = !fua && rng.below(3) == 0;
                self.write(w, ino, fb, len, fua, hold, flight);
            }
        }
    }

    fn latest(&self, ino: u64, fb: u64) -> u64 {
        self.blocks[&(ino, fb)].written.last().map_or(0, |x| x.0)
    }

    #[allow(clippy::too_many_arguments)]
    fn write(
        &mut self,
        w: &mut WritableFs<&mut CacheDev>,
        ino: u64,
        fb: u64,
        len: u64,
        fua: bool,
        hold: bool,
        flight: &mut Vec<InFlight>,
    ) {
        // Blocks whose mapping is not committed: a FUA write to them
        // commits, as `WritableFs::write` does.
        let unc = w.uncommitted(ino, fb, fb + len);
        let segs = w.map_write(ino, fb, len).expect("map_write");
        let mut fresh = false;
        for s in &segs {
            for k in 0..s.blocks {
                self.version += 1;
                let v = self.version;
                let at = w.device_mut().ops.len();
                let data = pattern(ino, s.file_block + k, v);
                let d = w.device_mut();
                if fua && !s.fresh {
                    d.write_fua((s.disk_block + k) * BS, &data)
                } else {
                    d.write_at((s.disk_block + k) * BS, &data)
                }
                .expect("data write");
                let b = self
                    .blocks
                    .get_mut(&(ino, s.file_block + k))
                    .expect("block");
                b.written.push((v, at));
                if fua && !s.fresh && !unc {
                    b.durable.push((v, at + 1));
                } else if !s.fresh || !hold {
                    self.unflushed.push((ino, s.file_block + k, v));
                }
            }
            fresh |= s.fresh;
            if s.fresh && hold {
                flight.push(InFlight {
                    ino,
                    fb: s.file_block,
                    blocks: s.blocks,
                });
            } else if s.fresh {
                w.end_write(ino, s.file_block, s.blocks).expect("end_write");
            }
        }
        if fua && (fresh || unc) {
            self.commit(w);
        }
    }

    /// A commit: every write ended (or overwritten) before it is durable
    /// from the op after its last.
    fn commit(&mut self, w: &mut WritableFs<&mut CacheDev>) {
        w.commit().expect("commit");
        let at = w.device_mut().ops.len();
        for (ino, fb, v) in self.unflushed.drain(..) {
            let b = self.blocks.get_mut(&(ino, fb)).expect("block");
            b.durable.push((v, at));
        }
    }
}

/// Reads every file of `dev` and checks each block against `work` at cut
/// point `cut`; `Err` names the first block that breaks a rule.
fn check_blocks(dev: &MemDevice, work: &Workload, cut: usize) -> Result<(), String> {
    let fs = Fs::mount(dev).map_err(|e| format!("mount: {e}"))?;
    for (i, (n, _)) in FILES.iter().enumerate() {
        let ino = i as u64 + 2;
        let f = fs.open(ino).map_err(|e| format!("open {ino}: {e}"))?;
        let mut all = vec![0u8; (n * BS) as usize];
        fs.read(&f, 0, &mut all)
            .map_err(|e| format!("read {ino}: {e}"))?;
        for fb in 0..*n {
            let got = &all[(fb * BS) as usize..((fb + 1) * BS) as usize];
            let b = &work.blocks[&(ino, fb)];
            let durable = b.durable.iter().filter(|d| d.1 <= cut).map(|d| d.0).max();
            let issued = b
                .written
                .iter()
                .filter(|x| x.0 == 0 || x.1 < cut)
                .map(|x| x.0);
            let mut held = None;
            for v in issued {
                if got == pattern(ino, fb, v) {
                    held = Some(v);
                }
            }
            let zero = got.iter().all(|&x| x == 0);
            match (held, durable) {
                (None, None) if zero => {}
                (None, _) => {
                    return Err(format!(
                        "inode {ino} block {fb}: bytes never written to it (zero: {zero}, durable: {durable:?})"
                    ))
                }
                (Some(v), Some(d)) if v < d => {
                    return Err(format!(
                        "inode {ino} block {fb}: version {v}, but {d} was durable"
                    ))
                }
                _ => {}
            }
        }
    }
    Ok(())
}

/// One cut: fsck through the log, the blocks, a writable mount's replay,
/// fsck and the blocks again.
fn check_cut(img: MemDevice, work: &Workload, cut: usize) -> Result<(), String> {
    let r = fsck::check(&img);
    if !r.clean() {
        return Err(format!("fsck: {:?}", r.problems));
    }
    check_blocks(&img, work, cut)?;
    let mut img = img;
    WritableFs::mount(&mut img).map_err(|e| format!("writable mount: {e}"))?;
    let r = fsck::check(&img);
    if !r.clean() {
        return Err(format!("fsck after replay: {:?}", r.problems));
    }
    check_blocks(&img, work, cut)
}

/// Runs seed `seed`'s workload and every cut; returns the cuts checked.
fn run_seed(seed: u64, base: &MemDevice) -> Result<u64, String> {
    let mut rng = Rng::new(seed.wrapping_mul(0x9e37_79b9) | 1);
    let mut dev = CacheDev {
        now: base.clone(),
        base: base.data.clone(),
        ops: Vec::new(),
    };
    let mut work = Workload::new();
    {
        let mut w = WritableFs::mount(&mut dev).map_err(|e| format!("mount: {e}"))?;
        let mut flight = Vec::new();
        for _ in 0..40 + rng.below(40) {
            work.step(&mut w, &mut rng, &mut flight);
        }
    }
    let mut cuts = 0;
    let n = dev.ops.len();
    for cut in 0..=n {
        let pending: Vec<usize> = {
            let last_flush = dev.ops[..cut].iter().rposition(|o| matches!(o, Op::Flush));
            (last_flush.map_or(0, |f| f + 1)..cut)
                .filter(|&i| matches!(dev.ops[i], Op::Write(..)))
                .collect()
        };
        let mut choices: Vec<Box<dyn FnMut(usize) -> bool>> =
            vec![Box::new(|_| false), Box::new(|_| true)];
        if pending.len() > 1 {
            for k in 0..3u64 {
                let mut r = Rng::new(seed ^ (cut as u64) << 16 ^ k << 40 | 1);
                choices.push(Box::new(move |_| r.below(2) == 0));
            }
        }
        for keep in &mut choices {
            let img = dev.after_cut(cut, keep);
            check_cut(img, &work, cut)
                .map_err(|e| format!("seed {seed}, cut after op {cut} of {n}: {e}"))?;
            cuts += 1;
        }
    }
    Ok(cuts)
}

fn seeds() -> std::ops::Range<u64> {
    match std::env::var("CRASH_SEEDS") {
        Ok(s) => {
            let (a, b) = s.split_once("..").expect("CRASH_SEEDS=a..b");
            a.parse().expect("a")..b.parse().expect("b")
        }
        Err(_) => 0..12,
    }
}

#[test]
fn power_cuts_at_every_point_of_dxfs_writes_lose_nothing_acknowledged() {
    let base = base_image();
    let mut cuts = 0;
    for seed in seeds() {
        cuts += run_seed(seed, &base).unwrap_or_else(|e| panic!("{e}"));
    }
    eprintln!(
        "dxfs crash suite: seeds {:?}: {cuts} power cuts checked",
        seeds()
    );
    assert!(cuts > 1000, "{cuts} cuts");
}
