//! Power cuts under NBD writes to a raw namespace (issue 22's crash suite,
//! its raw half; dxfs's comes with its writes). Two services (two cores,
//! each its own NVMe I/O queue of one simulated controller with a volatile
//! write cache, its own stack and client) take a generated workload of
//! writes, FUA writes and flushes, several in flight at once, on either
//! connection. After every batch of answered requests the media (what a
//! power cut cannot take) is checked: every write answered as durable (its
//! own FUA, or any FLUSH answered after it was) is there, or a later write
//! of its block; no block holds bytes never written to it. Then power is
//! cut keeping a random subset of the cached blocks, and every block reads
//! back, through the service, as exactly its last durable write or, if the
//! cut kept it, its last write. Seeds are printed on failure
//! (`CRASH_SEEDS=a..b` to run others).

mod common;

use common::LBS;
use dioxide_nbd::client::{fnv1a, FNV_START};
use dioxide_nbd::{cflag, cmd};
use dioxide_nvme::sim::Sim;
use dioxide_testkit::Rng;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Media checks (each what a cut keeping nothing cached would leave) and
/// cuts made.
static CHECKS: AtomicU64 = AtomicU64::new(0);
static CUTS: AtomicU64 = AtomicU64::new(0);

const BLOCKS: u64 = 32;

/// The bytes of write number `w` (0: never written) of block `b`.
fn data(seed: u64, b: u64, w: u64) -> Vec<u8> {
    if w == 0 {
        return vec![0; LBS];
    }
    let mut r = Rng::new(seed ^ (b << 32) ^ (w << 8) ^ 0x5eed);
    let mut v = vec![0u8; LBS];
    r.fill(&mut v);
    v
}

/// What a block may hold: its last durable write and every write after it.
#[derive(Clone, Default)]
struct Block {
    durable: u64,
    /// Writes answered since `durable`, in order.
    since: Vec<u64>,
}

impl Block {
    fn last(&self) -> u64 {
        self.since.last().copied().unwrap_or(self.durable)
    }
    /// Write `w` (and every one before it) is durable.
    fn make_durable(&mut self, w: u64) {
        if w > self.durable {
            self.durable = w;
            self.since.retain(|&x| x > w);
        }
    }
}

fn run(seed: u64) {
    let (sim, _ctrl, mut cores) = common::two_cores(BLOCKS, 16 * 1024);
    let mut rng = Rng::new(seed);
    let mut blocks = vec![Block::default(); BLOCKS as usize];
    let mut next_write = vec![1u64; BLOCKS as usize];
    for _batch in 0..12 {
        // A batch: up to 6 requests in flight at once on random
        // connections, no block written twice (the order of two writes
        // of one block in flight together is the device's to choose).
        let before: Vec<u64> = blocks.iter().map(Block::last).collect();
        let mut busy = vec![false; BLOCKS as usize];
        let mut fua_writes: [HashMap<u64, (u64, u64)>; 2] = Default::default();
        let mut flushes: [Vec<u64>; 2] = Default::default();
        for _ in 0..1 + rng.below(6) {
            let c = rng.below(2) as usize;
            if rng.below(5) == 0 {
                let h = cores[c]
                    .lo
                    .client()
                    .command(cmd::FLUSH, 0, 0, 0, &[])
                    .unwrap();
                flushes[c].push(h);
                continue;
            }
            // One to three blocks, each with its next write's bytes.
            let b0 = rng.below(BLOCKS - 2);
            let n = 1 + rng.below(3);
            if (b0..b0 + n).any(|b| busy[b as usize]) {
                continue;
            }
            let mut payload = Vec::new();
            for b in b0..b0 + n {
                let w = next_write[b as usize];
                next_write[b as usize] += 1;
                busy[b as usize] = true;
                blocks[b as usize].since.push(w);
                payload.extend(data(seed, b, w));
            }
            let fua = rng.below(4) == 0;
            let flags = if fua { cflag::FUA } else { 0 };
            let h = cores[c]
                .lo
                .client()
                .command(cmd::WRITE, flags, b0 * LBS as u64, 0, &payload)
                .unwrap();
            if fua {
                fua_writes[c].insert(h, (b0, n));
            }
        }
        let mut flushed = false;
        for c in 0..2 {
            for r in cores[c].settle() {
                assert_eq!(r.error, 0, "seed {seed}: {r:?}");
                flushed |= flushes[c].contains(&r.handle);
                // A FUA write is durable once answered.
                if let Some(&(b0, n)) = fua_writes[c].get(&r.handle) {
                    for b in b0..b0 + n {
                        let blk = &mut blocks[b as usize];
                        let w = blk.last();
                        blk.make_durable(w);
                    }
                }
            }
        }
        if flushed {
            // A flush of this batch covers the writes answered before it
            // was sent: every earlier batch's.
            for (blk, &w) in blocks.iter_mut().zip(&before) {
                blk.make_durable(w);
            }
        }
        check_media(seed, &sim, &blocks);
        // Sometimes a flush on its own: every write so far durable.
        if rng.below(3) == 0 {
            let c = rng.below(2) as usize;
            cores[c]
                .lo
                .client()
                .command(cmd::FLUSH, 0, 0, 0, &[])
                .unwrap();
            assert!(cores[c].settle().iter().all(|r| r.error == 0));
            for blk in blocks.iter_mut() {
                let w = blk.last();
                blk.make_durable(w);
            }
            assert!(
                sim.cached_blocks().is_empty(),
                "seed {seed}: a flush left blocks cached"
            );
            check_media(seed, &sim, &blocks);
        }
    }
    // The cut: each cached block kept or lost at random.
    let mut kept = HashMap::new();
    let cached: HashMap<u64, u64> = sim.cached_blocks().into_iter().collect();
    sim.power_cut(|b, _| {
        let k = rng.below(2) == 0;
        kept.insert(b, k);
        k
    });
    CUTS.fetch_add(1, Relaxed);
    let disk = sim.disk();
    for (b, blk) in blocks.iter().enumerate() {
        let last = blk.last();
        let want = match (cached.contains_key(&(b as u64)), kept.get(&(b as u64))) {
            // Cached at the cut: its last write if kept, else the media's.
            (true, Some(true)) => last,
            (true, _) => media_write(seed, b as u64, &disk, blk).unwrap_or_else(|| {
                panic!("seed {seed}: block {b} lost at the cut holds bytes never written")
            }),
            // Not cached: on the media already, its last write.
            (false, _) => last,
        };
        assert!(
            disk[b * LBS..(b + 1) * LBS] == data(seed, b as u64, want)[..],
            "seed {seed}: block {b} after the cut is not write {want}"
        );
        if cached.contains_key(&(b as u64)) && kept.get(&(b as u64)) != Some(&true) {
            assert!(
                want == blk.durable || blk.since.contains(&want),
                "seed {seed}: block {b} lost its durable write {}",
                blk.durable
            );
        }
    }
    // And the service reads them back so (the first core, after the cut).
    for b in 0..BLOCKS {
        let h = cores[0]
            .lo
            .client()
            .read(b * LBS as u64, LBS as u32)
            .unwrap();
        let r = cores[0].settle();
        assert_eq!((r[0].handle, r[0].error), (h, 0));
        assert_eq!(
            r[0].sum,
            fnv1a(FNV_START, &disk[b as usize * LBS..(b as usize + 1) * LBS]),
            "seed {seed}: block {b} read back differs from the media"
        );
    }
}

/// Which write of block `b` the media holds (it must be its durable one or
/// one after it).
fn media_write(seed: u64, b: u64, media: &[u8], blk: &Block) -> Option<u64> {
    let got = &media[b as usize * LBS..(b as usize + 1) * LBS];
    std::iter::once(blk.durable)
        .chain(blk.since.iter().copied())
        .find(|&w| data(seed, b, w)[..] == got[..])
}

/// The media now (a power cut keeping nothing cached): each block holds
/// its durable write or a later one, never bytes not written to it.
fn check_media(seed: u64, sim: &Sim, blocks: &[Block]) {
    CHECKS.fetch_add(1, Relaxed);
    let media = sim.media();
    for (b, blk) in blocks.iter().enumerate() {
        assert!(
            media_write(seed, b as u64, &media, blk).is_some(),
            "seed {seed}: block {b}: the media holds neither its durable write {} nor a later one",
            blk.durable
        );
    }
}

#[test]
fn power_cuts_keep_every_durable_write_and_show_no_bytes_never_written() {
    let (a, b) = match std::env::var("CRASH_SEEDS") {
        Ok(s) => {
            let (a, b) = s.split_once("..").expect("CRASH_SEEDS=a..b");
            (a.parse().unwrap(), b.parse().unwrap())
        }
        Err(_) => (0u64, 200u64),
    };
    for seed in a..b {
        run(seed);
    }
    let (checks, cuts) = (CHECKS.load(Relaxed), CUTS.load(Relaxed));
    eprintln!("crash_raw: seeds {a}..{b}: {checks} media checks, {cuts} power cuts keeping random subsets");
    // Every workload checked at least once per batch.
    assert!(checks >= 12 * (b - a) && cuts == b - a);
}
