//! The write path against a RAM device: allocation, conversion, the tree
//! growing and shrinking, the log's replay, and the refusals.

use crate::dev::{BlockDevice, BlockDeviceMut, DevError, MemDevice};
use crate::fs::Fs;
use crate::mkfs::{self, Node, NodeKind, Options, Source, Tree};
use crate::write::WritableFs;
use crate::{fsck, Error};
use dioxide_testkit::Rng;

const BS: u64 = 4096;

/// Every file's bytes come from its source id as `id + 1` repeated.
struct Fill;
impl Source for Fill {
    fn read(&mut self, id: u64, _offset: u64, buf: &mut [u8]) -> Result<(), String> {
        buf.fill(id as u8 + 1);
        Ok(())
    }
}

/// A file of an image: name, size, data ranges (offset, length).
type FileSpec<'a> = (&'a str, u64, Vec<(u64, u64)>);

/// An image of `blocks` blocks with `files` at the root; inode numbers
/// follow the list from 2.
fn image(blocks: u64, files: &[FileSpec], log: Option<u64>) -> MemDevice {
    let mut tree = Tree {
        nodes: vec![Node::dir(vec![])],
    };
    for (i, (name, size, data)) in files.iter().enumerate() {
        tree.nodes.push(Node::file(*size, data.clone(), i as u64));
        if let NodeKind::Dir(c) = &mut tree.nodes[0].kind {
            c.push((name.to_string(), i + 1));
        }
    }
    let opts = Options {
        size: Some(blocks * BS),
        uuid: [0x5a; 16],
        log_blocks: log,
        ..Default::default()
    };
    let plan = mkfs::plan(&tree, &opts).unwrap();
    let mut dev = MemDevice::new(plan.image_bytes() as usize, 512);
    mkfs::write(&tree, &plan, &opts, &mut Fill, &mut dev, &mut |_, _| {}).unwrap();
    dev
}

fn assert_clean(dev: &MemDevice, when: &str) {
    let r = fsck::check(dev);
    assert!(r.clean(), "{when}: fsck: {:#?}", r.problems);
}

/// A block of bytes naming its file block and a version.
fn pattern(fb: u64, v: u64) -> Vec<u8> {
    let mut b = vec![0u8; BS as usize];
    for (i, c) in b.chunks_mut(8).enumerate() {
        c.copy_from_slice(&(fb << 32 | v << 12 | i as u64).to_le_bytes());
    }
    b
}

fn read_all(dev: &MemDevice, ino: u64) -> Vec<u8> {
    let fs = Fs::mount(dev).unwrap();
    let f = fs.open(ino).unwrap();
    let mut buf = vec![0u8; f.size() as usize];
    fs.read(&f, 0, &mut buf).unwrap();
    buf
}

#[test]
fn allocating_writes_read_back_after_every_commit_and_a_remount() {
    // Inode 2: a sparse volume; 3: a file with data and holes.
    let files = [
        ("vol", 300 * BS, vec![]),
        ("holes", 40 * BS, vec![(0, 5 * BS), (20 * BS, 3 * BS)]),
    ];
    let mut dev = image(1024, &files, None);
    let mut model = [vec![0u8; 300 * BS as usize], read_all(&dev, 3)];
    let mut rng = Rng::new(11);
    for round in 0..8 {
        let mut w = WritableFs::mount(&mut dev).unwrap();
        for v in 0..40 {
            let which = rng.below(2) as usize;
            let blocks = model[which].len() as u64 / BS;
            let n = 1 + rng.below(6).min(blocks - 1);
            let fb = rng.below(blocks - n + 1);
            let mut data = Vec::new();
            for k in 0..n {
                data.extend(pattern(fb + k, round * 100 + v));
            }
            let fua = rng.below(4) == 0;
            w.write(2 + which as u64, fb * BS, &data, fua).unwrap();
            let at = (fb * BS) as usize;
            model[which][at..at + data.len()].copy_from_slice(&data);
            // What the write path reads now is the model.
            let mut got = vec![0u8; data.len()];
            w.read(2 + which as u64, fb * BS, &mut got).unwrap();
            assert_eq!(got, data);
        }
        w.commit().unwrap();
        assert!(w.stats().commits > 0 && w.stats().allocated_blocks > 0);
        drop(w);
        assert_clean(&dev, &format!("round {round}"));
        for (i, m) in model.iter().enumerate() {
            assert!(
                read_all(&dev, 2 + i as u64) == *m,
                "round {round} inode {}",
                2 + i
            );
        }
    }
}

/// One write that needs far more extents than one transaction of the log
/// can hold (2,000 one-block holes between written blocks, a 16-block log:
/// 14 blocks a transaction) goes in parts, each committed when half the
/// log is used; nothing fails, and everything reads back after a remount.
#[test]
fn a_write_needing_more_extents_than_the_log_holds_commits_in_parts() {
    let n = 2000u64;
    let data: Vec<(u64, u64)> = (0..n).map(|k| (2 * k * BS, BS)).collect();
    let mut dev = image(8192, &[("frag", 2 * n * BS, data)], Some(16));
    let mut want = read_all(&dev, 2);
    let mut buf = Vec::new();
    for fb in 0..2 * n {
        buf.extend(pattern(fb, 1));
    }
    let mut w = WritableFs::mount(&mut dev).unwrap();
    w.write(2, 0, &buf, false).unwrap();
    w.commit().unwrap();
    let commits = w.stats().commits;
    assert!(commits > 10, "{commits} commits: the write went in parts");
    drop(w);
    assert_clean(&dev, "after the write");
    want.copy_from_slice(&buf);
    assert!(read_all(&dev, 2) == want);
}

/// The sibling over unwritten extents: 2,000 one-block unwritten extents
/// between written blocks (writes mapped and never ended, as a failed data
/// write leaves them), then one write over all of them: their conversions
/// go in parts too, each transaction within the 16-block log.
#[test]
fn a_write_over_more_unwritten_extents_than_the_log_holds_converts_in_parts() {
    let n = 2000u64;
    let data: Vec<(u64, u64)> = (0..n).map(|k| (2 * k * BS, BS)).collect();
    let mut dev = image(8192, &[("frag", 2 * n * BS, data)], Some(16));
    let mut w = WritableFs::mount(&mut dev).unwrap();
    for k in 0..n {
        let segs = w.map_write(2, 2 * k + 1, 1).unwrap();
        assert!(segs.len() == 1 && segs[0].fresh);
    }
    w.commit().unwrap();
    drop(w);
    assert_clean(&dev, "unwritten extents committed");
    let mut buf = Vec::new();
    for fb in 0..2 * n {
        buf.extend(pattern(fb, 2));
    }
    let mut w = WritableFs::mount(&mut dev).unwrap();
    w.write(2, 0, &buf, false).unwrap();
    w.commit().unwrap();
    assert!(w.stats().commits > 10, "{} commits", w.stats().commits);
    drop(w);
    assert_clean(&dev, "after the write");
    assert!(read_all(&dev, 2) == buf);
}

/// An image copied again onto the drive it lived on by a tool that skips
/// zero blocks (`dd conv=sparse`): the transaction its earlier life
/// committed there must not be replayed over the fresh metadata. mkfs's
/// empty-log marker is not zeroes, so the copy overwrites it. The control:
/// an image whose log starts with a zero block (as mkfs wrote them before)
/// gets that stale transaction replayed.
#[test]
fn a_sparse_copy_of_an_image_over_its_old_self_replays_nothing_stale() {
    let fresh = image(1024, &[("vol", 16 * BS, vec![])], None);
    let log_start = Fs::mount(&fresh).unwrap().superblock().log_start;
    for marker in [true, false] {
        let mut pristine = fresh.data.clone();
        if !marker {
            pristine[(log_start * BS) as usize..][..BS as usize].fill(0);
        }
        // The earlier life: a committed allocating write, checkpointed.
        let mut dev = MemDevice::from_vec(pristine.clone(), 512);
        let mut w = WritableFs::mount(&mut dev).unwrap();
        w.write(2, 0, &pattern(0, 1), true).unwrap();
        drop(w);
        assert!(read_all(&dev, 2)[..BS as usize] == pattern(0, 1)[..]);
        // The copy: every block of the image that is not all zeroes.
        for (k, blk) in pristine.chunks(BS as usize).enumerate() {
            if blk.iter().any(|&b| b != 0) {
                dev.data[k * BS as usize..][..BS as usize].copy_from_slice(blk);
            }
        }
        let w = WritableFs::mount(&mut dev).unwrap();
        assert_eq!(w.replayed() > 0, !marker, "marker {marker}: replayed");
        drop(w);
        if marker {
            assert_clean(&dev, "after the copy");
            assert!(
                read_all(&dev, 2).iter().all(|&b| b == 0),
                "the fresh volume"
            );
        }
    }
}

#[test]
fn the_extent_tree_grows_to_depth_two_and_shrinks_back_inline() {
    let n = 2200u64;
    let mut dev = image(4096, &[("vol", n * BS, vec![])], None);
    let free0 = Fs::mount(&dev).unwrap().superblock().free_blocks;
    let mut w = WritableFs::mount(&mut dev).unwrap();
    // Every other block: 1,100 extents, more than 6 leaves of 169.
    for fb in (0..n).step_by(2) {
        w.write(2, fb * BS, &pattern(fb, 1), false).unwrap();
        if fb % 400 == 0 {
            w.commit().unwrap();
        }
    }
    w.commit().unwrap();
    let inode = w.fs().inode(2).unwrap();
    assert_eq!(inode.depth, 2, "1,100 extents need two levels");
    drop(w);
    assert_clean(&dev, "grown");
    // The gaps: every extent merges with both neighbours.
    let mut w = WritableFs::mount(&mut dev).unwrap();
    for fb in (1..n).step_by(2) {
        w.write(2, fb * BS, &pattern(fb, 2), fb % 7 == 0).unwrap();
    }
    w.commit().unwrap();
    let inode = w.fs().inode(2).unwrap();
    assert_eq!(
        (inode.depth, inode.extent_count),
        (0, 1),
        "one extent again"
    );
    let sb = w.fs().superblock().clone();
    drop(w);
    assert_clean(&dev, "shrunk");
    // Every tree node was given back: only the data is used.
    assert_eq!(free0 - sb.free_blocks, n);
    let all = read_all(&dev, 2);
    for fb in 0..n {
        let want = pattern(fb, if fb % 2 == 0 { 1 } else { 2 });
        assert!(
            all[(fb * BS) as usize..][..BS as usize] == want[..],
            "block {fb}"
        );
    }
}

#[test]
fn a_write_not_ended_stays_unwritten_and_reads_as_zeroes() {
    let mut dev = image(512, &[("vol", 16 * BS, vec![])], None);
    let mut w = WritableFs::mount(&mut dev).unwrap();
    let segs = w.map_write(2, 3, 2).unwrap();
    assert_eq!(segs.len(), 1);
    assert!(segs[0].fresh);
    let disk = segs[0].disk_block;
    w.device_mut()
        .write_at(disk * BS, &[pattern(3, 1), pattern(4, 1)].concat())
        .unwrap();
    // Committed while the write is "in flight": the extent is unwritten.
    w.commit().unwrap();
    let mut got = vec![1u8; 2 * BS as usize];
    w.read(2, 3 * BS, &mut got).unwrap();
    assert!(got.iter().all(|&b| b == 0));
    drop(w);
    assert_clean(&dev, "unwritten committed");
    assert!(read_all(&dev, 2).iter().all(|&b| b == 0), "never the data");
    // Ended and committed: the data shows; a second write into the
    // unwritten extent is fresh, not allocated again.
    let mut w = WritableFs::mount(&mut dev).unwrap();
    let again = w.map_write(2, 4, 1).unwrap();
    assert_eq!(again[0].disk_block, disk + 1);
    assert!(again[0].fresh);
    w.end_write(2, 3, 2).unwrap();
    w.commit().unwrap();
    drop(w);
    assert_clean(&dev, "converted");
    let all = read_all(&dev, 2);
    assert!(all[3 * BS as usize..5 * BS as usize] == [pattern(3, 1), pattern(4, 1)].concat()[..]);
}

#[test]
fn refusals_are_named_and_leave_a_clean_image() {
    // Without a log: overwrites only.
    let mut dev = image(512, &[("d", 8 * BS, vec![(0, 4 * BS)])], Some(0));
    let mut w = WritableFs::mount(&mut dev).unwrap();
    w.write(2, 0, &pattern(0, 1), true).unwrap();
    assert_eq!(w.write(2, 5 * BS, &pattern(5, 1), false), Err(Error::NoLog));
    assert_eq!(
        w.write(2, 8 * BS, &pattern(8, 1), false),
        Err(Error::PastEnd { ino: 2, block: 9 })
    );
    assert!(matches!(
        w.write(2, 100, &pattern(0, 1), false),
        Err(Error::Input(_))
    ));
    drop(w);
    assert_clean(&dev, "no log");
    assert!(read_all(&dev, 2)[..BS as usize] == pattern(0, 1)[..]);
    // Full: a volume bigger than the free space.
    let mut dev = image(400, &[("big", 1000 * BS, vec![])], None);
    let free = Fs::mount(&dev).unwrap().superblock().free_blocks;
    let mut w = WritableFs::mount(&mut dev).unwrap();
    let mut full = None;
    for fb in 0..1000 {
        if let Err(e) = w.write(2, fb * BS, &pattern(fb, 1), false) {
            full = Some((fb, e));
            break;
        }
    }
    // Data stops 64 blocks short: those are kept for extent tree nodes.
    assert_eq!(full, Some((free - 64, Error::Full { ino: 2 })));
    w.commit().unwrap();
    drop(w);
    assert_clean(&dev, "full");
    assert_eq!(Fs::mount(&dev).unwrap().superblock().free_blocks, 64);
}

/// A device whose writes start failing after `ok` more writes.
struct Failing {
    dev: MemDevice,
    ok: usize,
}
impl BlockDevice for Failing {
    fn sector_size(&self) -> u32 {
        self.dev.sector_size()
    }
    fn size(&self) -> u64 {
        self.dev.size()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), DevError> {
        self.dev.read_at(offset, buf)
    }
}
impl BlockDeviceMut for Failing {
    fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<(), DevError> {
        if self.ok == 0 {
            return Err(DevError::Io {
                offset,
                reason: "injected",
                code: None,
            });
        }
        self.ok -= 1;
        self.dev.write_at(offset, buf)
    }
}

#[test]
fn a_failed_commit_refuses_changes_until_the_next_mount_replays() {
    for ok in 0..12 {
        let dev = image(512, &[("vol", 32 * BS, vec![])], None);
        let mut f = Failing {
            dev,
            ok: usize::MAX,
        };
        let mut w = WritableFs::mount(&mut f).unwrap();
        w.write(2, 0, &pattern(0, 1), false).unwrap();
        w.commit().unwrap();
        for fb in 1..10 {
            w.write(2, fb * BS, &pattern(fb, 1), false).unwrap();
        }
        w.device_mut().ok = ok;
        let r = w.commit();
        if r.is_ok() {
            // Enough writes for the whole commit: the control.
            assert!(ok >= 5, "a commit of {ok} writes cannot be whole");
            continue;
        }
        assert!(matches!(r, Err(Error::Device { .. })), "{r:?}");
        assert_eq!(
            w.write(2, 20 * BS, &pattern(20, 1), false),
            Err(Error::Failed)
        );
        drop(w);
        assert_clean(&f.dev, &format!("failed after {ok} writes"));
        let all = read_all(&f.dev, 2);
        assert!(
            all[..BS as usize] == pattern(0, 1)[..],
            "the first commit stays"
        );
    }
}

/// A device that drops every write after the first `keep`: a power cut at
/// that point of a commit, with nothing cached.
struct Cut {
    dev: MemDevice,
    keep: usize,
}
impl BlockDevice for Cut {
    fn sector_size(&self) -> u32 {
        self.dev.sector_size()
    }
    fn size(&self) -> u64 {
        self.dev.size()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), DevError> {
        self.dev.read_at(offset, buf)
    }
}
impl BlockDeviceMut for Cut {
    fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<(), DevError> {
        if self.keep > 0 {
            self.keep -= 1;
            self.dev.write_at(offset, buf)?;
        }
        Ok(())
    }
}

#[test]
fn a_commit_cut_at_every_write_is_all_or_nothing_and_replayed() {
    let base = image(512, &[("vol", 64 * BS, vec![])], None);
    // The writes of one commit of 8 allocating writes.
    let mut probe = Cut {
        dev: base.clone(),
        keep: usize::MAX,
    };
    let mut w = WritableFs::mount(&mut probe).unwrap();
    for fb in 0..8 {
        w.write(2, fb * 3 * BS, &pattern(fb * 3, 1), false).unwrap();
    }
    let before = usize::MAX - w.device_mut().keep;
    w.commit().unwrap();
    let commit_writes = usize::MAX - w.device_mut().keep - before;
    let logged = w.stats().logged_blocks as usize;
    drop(w);
    assert_eq!(commit_writes, 2 + 2 * logged, "log, commit block, home");
    let want = read_all(&probe.dev, 2);
    let mut replays = 0;
    for keep in 0..=commit_writes {
        let mut c = Cut {
            dev: base.clone(),
            keep: usize::MAX,
        };
        let mut w = WritableFs::mount(&mut c).unwrap();
        for fb in 0..8 {
            w.write(2, fb * 3 * BS, &pattern(fb * 3, 1), false).unwrap();
        }
        w.device_mut().keep = keep;
        w.commit().unwrap();
        drop(w);
        assert_clean(&c.dev, &format!("cut after {keep} commit writes"));
        let got = read_all(&c.dev, 2);
        // Before the commit block: nothing of it; after: all of it.
        let committed = keep > 1 + logged;
        if committed {
            assert!(got == want, "cut after {keep}: committed");
        } else {
            assert!(
                got.iter().all(|&b| b == 0),
                "cut after {keep}: not committed"
            );
        }
        let fs = Fs::mount(&c.dev).unwrap();
        if committed && keep < commit_writes {
            assert!(
                fs.logged_blocks() > 0,
                "cut after {keep}: read through the log"
            );
        }
        drop(fs);
        let w = WritableFs::mount(&mut c.dev).unwrap();
        if w.replayed() > 0 {
            replays += 1;
        }
        drop(w);
        // Written home: the same without the log.
        let mut home = c.dev.clone();
        let sb = Fs::mount(&home).unwrap().superblock().clone();
        home.write_at(sb.log_start * BS, &vec![0u8; BS as usize])
            .unwrap();
        assert!(read_all(&home, 2) == got, "cut after {keep}: home copy");
        assert_clean(&home, &format!("cut after {keep}: home"));
    }
    assert!(replays >= logged, "{replays} replays");
}

#[test]
fn a_fua_write_to_a_block_converted_since_the_last_commit_commits() {
    let mut dev = image(512, &[("vol", 16 * BS, vec![])], None);
    {
        let mut w = WritableFs::mount(&mut dev).unwrap();
        w.write(2, 3 * BS, &pattern(3, 1), false).unwrap();
        let commits = w.stats().commits;
        assert!(w.uncommitted(2, 3, 4));
        // An overwrite now, with FUA: its block is written in memory only.
        w.write(2, 3 * BS, &pattern(3, 2), true).unwrap();
        assert_eq!(w.stats().commits, commits + 1, "FUA committed the mapping");
        assert!(!w.uncommitted(2, 3, 4));
        // The control: a FUA overwrite of a committed block commits nothing.
        w.write(2, 3 * BS, &pattern(3, 3), true).unwrap();
        assert_eq!(w.stats().commits, commits + 1);
    }
    assert_clean(&dev, "fua");
    assert!(read_all(&dev, 2)[3 * BS as usize..4 * BS as usize] == pattern(3, 3)[..]);
}

#[test]
fn a_tree_mkfs_keyed_above_zero_takes_a_write_below_its_first_extent() {
    // Eight data ranges from block 10: an extent tree whose first key is 10.
    let data: Vec<(u64, u64)> = (0..8).map(|k| ((10 + 4 * k) * BS, BS)).collect();
    let mut dev = image(512, &[("f", 64 * BS, data)], None);
    {
        let fs = Fs::mount(&dev).unwrap();
        assert_eq!(fs.inode(2).unwrap().depth, 1);
    }
    let mut w = WritableFs::mount(&mut dev).unwrap();
    w.write(2, 0, &pattern(0, 1), false).unwrap();
    w.commit().unwrap();
    drop(w);
    assert_clean(&dev, "write below the first key");
    assert!(read_all(&dev, 2)[..BS as usize] == pattern(0, 1)[..]);
}

#[test]
fn a_bitmap_that_disagrees_with_the_free_count_or_frees_metadata_is_refused() {
    let dev = image(512, &[("vol", 16 * BS, vec![])], None);
    let sb = Fs::mount(&dev).unwrap().superblock().clone();
    // The free count off by one.
    let mut bad = dev.clone();
    let mut sb2 = sb.clone();
    sb2.free_blocks -= 1;
    sb2.emit(&mut bad.data[..512]);
    assert!(matches!(
        WritableFs::mount(&mut bad),
        Err(Error::Corrupt { .. })
    ));
    // A log block marked free (the bitmap block resealed).
    let mut bad = dev.clone();
    let at = (sb.bitmap_start * BS) as usize;
    let bit = sb.log_start as usize;
    bad.data[at + 32 + bit / 8] &= !(1 << (bit % 8));
    let mut blk = bad.data[at..at + BS as usize].to_vec();
    let h = crate::format::BlockHeader::parse(
        &dev.data[at..at + BS as usize],
        crate::format::KIND_BITMAP,
        sb.bitmap_start,
    )
    .unwrap();
    crate::format::BlockHeader {
        count: h.count - 1,
        ..h
    }
    .emit(&mut blk);
    bad.data[at..at + BS as usize].copy_from_slice(&blk);
    let mut sb3 = sb.clone();
    sb3.free_blocks += 1;
    sb3.emit(&mut bad.data[..512]);
    assert!(matches!(
        WritableFs::mount(&mut bad),
        Err(Error::Corrupt { .. })
    ));
    // The control: the image as made mounts.
    let mut good = dev.clone();
    assert!(WritableFs::mount(&mut good).is_ok());
}
