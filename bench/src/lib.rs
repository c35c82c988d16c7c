//! Software cost of one 4 KiB read on a real CPU.
//!
//! The guest runs under TCG on the project's build machines, so in-guest
//! cycle counts are emulated. This benchmark drives the same crates — the
//! NVMe driver, the iomap DIO engine, a dxfs file's extent map — on the host,
//! against a controller model that completes every command the moment its
//! doorbell is written (like `null_blk` behind an NVMe queue): the controller
//! is brought up by the full simulated controller (`dioxide_nvme::sim`), then
//! I/O queue 1's doorbells are served by the instant model, which only writes
//! a completion entry per command.
//!
//! Per target (raw namespace, generic path, simple path) it reports ns and
//! TSC cycles per I/O, and heap allocations per I/O, with 32 reads in
//! flight. The model's own work (reading the command id, writing the
//! completion entry) is measured alone, through the same doorbell calls, and
//! subtracted.
//!
//! [`run_threads`] runs the same on T threads side by side, each with
//! everything of its own (file image, controller, instant model, queue,
//! engine): the per-core design's claim that a core added is a queue added,
//! not contention. Its rows give each thread's CPU time per read (robust on
//! a machine shared with other work) and TSC cycles per read, and the reads
//! all threads completed per second. Nothing the threads touch per read is
//! shared: the allocation counter is per thread (`dioxide_testkit`), the
//! harness's completion queues are thread-locals.
//!
//! A read that fails or moves fewer than 4096 bytes is counted, in every
//! build, and fails the run: [`run`] returns an error naming the target, the
//! count and the first error, rather than figures for work not done.

use dioxide_dxfs::mkfs::{self, Node, Options, Source, Tree};
use dioxide_dxfs::{File, Fs, MemDevice};
use dioxide_iomap::{DioError, DioRequest, DioResult, Engine, IoBuf, Kiocb, Op, ReqId};
use dioxide_nvme::blk::NvmeQueue;
use dioxide_nvme::cmd::{CompletionEntry, SubmissionEntry};
use dioxide_nvme::sim::{Sim, SimConfig, SimHal, PHYS_OFFSET};
use dioxide_nvme::{Controller, Mmio};
use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::Barrier;

use std::time::Instant;

/// Counts heap allocations (the benchmark binaries install it).
pub use dioxide_testkit::CountingAlloc;

pub mod nbd;

#[inline(always)]
pub(crate) fn rdtsc() -> u64 {
    // SAFETY: reads the time-stamp counter.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// The instant controller model for one I/O queue.
#[derive(Default)]
pub struct Instant0 {
    on: Cell<bool>,
    sq: Cell<usize>,
    cq: Cell<usize>,
    entries: Cell<u16>,
    head: Cell<u16>,
    tail: Cell<u16>,
    phase: Cell<bool>,
    /// Status field (without the phase bit) of every completion: 0, success,
    /// except where a test makes the model fail commands.
    status: Cell<u16>,
}

impl Instant0 {
    /// Serves a submission queue doorbell: one completion per new entry.
    #[inline]
    fn sq_doorbell(&self, new_tail: u16) {
        let (sq, cq, n) = (self.sq.get(), self.cq.get(), self.entries.get());
        let mut head = self.head.get();
        let mut tail = self.tail.get();
        let mut phase = self.phase.get();
        let status = self.status.get() << 1;
        while head != new_tail {
            // SAFETY: the queue memory given to configure() is live; head < n.
            let cid =
                unsafe { std::ptr::read_volatile((sq + head as usize * 64 + 2) as *const u16) };
            head = (head + 1) % n;
            let e = CompletionEntry {
                dw0: 0,
                dw1: 0,
                sq_head: head,
                sq_id: 1,
                cid,
                status: status | phase as u16,
            };
            // SAFETY: the queue memory given to configure() is live and holds `n` 16-byte entries; tail < n.
            unsafe {
                std::ptr::write_volatile((cq + tail as usize * 16) as *mut CompletionEntry, e)
            };
            tail += 1;
            if tail == n {
                tail = 0;
                phase = !phase;
            }
        }
        self.head.set(head);
        self.tail.set(tail);
        self.phase.set(phase);
    }

    fn configure(&self, sq: usize, cq: usize, entries: u16) {
        self.sq.set(sq);
        self.cq.set(cq);
        self.entries.set(entries);
        self.head.set(0);
        self.tail.set(0);
        self.phase.set(true);
        self.on.set(true);
    }
}

/// Registers: the full simulation for set-up, the instant model for I/O
/// queue 1's doorbells.
#[derive(Clone)]
pub struct BenchMmio {
    sim: Sim,
    fast: Rc<Instant0>,
}

const SQ1_DB: usize = 0x1008;
const CQ1_DB: usize = 0x100c;

impl Mmio for BenchMmio {
    fn read32(&self, off: usize) -> u32 {
        self.sim.read32(off)
    }
    #[inline]
    fn write32(&self, off: usize, v: u32) {
        if self.fast.on.get() {
            if off == SQ1_DB {
                self.fast.sq_doorbell(v as u16);
                return;
            }
            if off == CQ1_DB {
                return;
            }
        }
        self.sim.write32(off, v)
    }
}

struct ZeroSource;
impl Source for ZeroSource {
    fn read(&mut self, _id: u64, _off: u64, buf: &mut [u8]) -> Result<(), String> {
        buf.fill(0x5a);
        Ok(())
    }
}

/// A dxfs image in memory with one 64 MiB file; returns it opened.
pub(crate) fn bench_file() -> File {
    let tree = Tree {
        nodes: vec![
            Node::dir(vec![("bench.bin".into(), 1)]),
            Node::file(64 << 20, vec![(0, 64 << 20)], 0),
        ],
    };
    let opts = Options::default();
    let plan = mkfs::plan(&tree, &opts).expect("plan");
    let mut dev = MemDevice::new(plan.image_bytes() as usize, 512);
    mkfs::write(
        &tree,
        &plan,
        &opts,
        &mut ZeroSource,
        &mut dev,
        &mut |_, _| {},
    )
    .expect("mkfs");
    let fs = Fs::mount(dev).expect("mount");
    let ino = fs.resolve("/bench.bin").expect("resolve");
    fs.open(ino).expect("open")
}

/// The engine on a simulated controller (4 KiB blocks, 20,000 of them,
/// 512 KiB transfers) whose I/O queue 1 is served by the instant model:
/// every command completes (with `status`) the moment its doorbell is
/// written, without moving data.
pub(crate) fn instant_engine(status: u16) -> Engine<NvmeQueue<SimHal, BenchMmio>> {
    let hal = SimHal::new();
    let sim = Sim::new(SimConfig {
        block_size: 4096,
        blocks: 20_000,
        mdts: 7,
        max_queue_entries: 1024,
        reported_blocks: None,
        // The instant model serves queue 1's MMIO doorbells: no shadow
        // doorbells, which it would not read.
        dbbuf: false,
        ..Default::default()
    });
    let mmio = BenchMmio {
        sim,
        fast: Rc::new(Instant0::default()),
    };
    let mut ctrl =
        Controller::init(hal.clone(), mmio.clone(), Default::default()).expect("controller");
    let ns = ctrl.namespace(1).expect("namespace");
    let qp = ctrl.create_io_queue(1, 1024, None).expect("queue");
    mmio.fast.configure(
        (qp.sq_phys() - PHYS_OFFSET) as usize,
        (qp.cq_phys() - PHYS_OFFSET) as usize,
        1024,
    );
    mmio.fast.status.set(status);
    Engine::new(NvmeQueue::new(qp, hal, ns))
}

#[derive(Clone, Debug)]
pub struct HostRow {
    pub target: &'static str,
    pub ns_per_io: f64,
    pub cycles_per_io: f64,
    pub allocs_per_io: f64,
    /// Before subtracting the model.
    pub raw_ns_per_io: f64,
    pub raw_cycles_per_io: f64,
    /// Requests the engine sent down the simple path and the generic path,
    /// and simple-path attempts that fell back, in the measured round: a
    /// `simple` row is the simple path's figure only with `fell_back` 0.
    pub simple_path: u64,
    pub generic_path: u64,
    pub fell_back: u64,
}

#[derive(Clone, Debug)]
pub struct Report {
    pub rows: Vec<HostRow>,
    pub model_ns_per_io: f64,
    pub model_cycles_per_io: f64,
    pub tsc_ghz: f64,
    pub qd: usize,
    pub ios: u64,
    /// Runs on several threads at once ([`run_threads`]), when asked for.
    pub threads_rows: Vec<ThreadsRow>,
}

thread_local! {
    static READY: RefCell<Vec<usize>> = RefCell::new(Vec::with_capacity(1024));
    /// Reads that failed or came back short, and the first such result.
    static FAILED: Cell<u64> = const { Cell::new(0) };
    static FIRST_FAILURE: Cell<Option<Result<usize, DioError>>> = const { Cell::new(None) };
}
fn done(ctx: usize, r: Result<usize, DioError>) {
    if r != Ok(4096) {
        FAILED.with(|n| n.set(n.get() + 1));
        FIRST_FAILURE.with(|f| {
            if f.get().is_none() {
                f.set(Some(r));
            }
        });
    }
    READY.with(|q| q.borrow_mut().push(ctx));
}

/// CPU time this thread has run, in nanoseconds (not the time it waited
/// for a CPU: on a shared machine, what the reads cost this thread).
pub(crate) fn thread_cpu_ns() -> u64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `t` is a valid timespec for the call to fill.
    let r = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) };
    if r != 0 {
        return 0;
    }
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

/// One row of `--guard`: the protection-information guard of `block`-byte
/// blocks (`dioxide-pi`), `blocks` of them, on this CPU.
pub struct GuardRow {
    pub guard: &'static str,
    pub block: usize,
    pub ns_per_byte: f64,
    pub cycles_per_byte: f64,
}

/// The guard's cost per byte for each size over 4 KiB blocks (a 64 KiB set
/// of blocks that stays in the cache, as a block just received or read
/// does), `blocks` guards per size.
pub fn guard_rows(blocks: u64) -> Vec<GuardRow> {
    use dioxide_pi::GuardSize;
    let data: Vec<u8> = (0..64 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
        .collect();
    let mut rows = Vec::new();
    for (name, size) in [("crc16", GuardSize::Crc16), ("crc64", GuardSize::Crc64)] {
        let mut sink = 0u64;
        let t0 = Instant::now();
        let c0 = rdtsc();
        for k in 0..blocks as usize {
            let at = (k % 16) * 4096;
            sink ^= dioxide_pi::guard(size, std::hint::black_box(&data[at..at + 4096]));
        }
        let cycles = rdtsc() - c0;
        let ns = t0.elapsed().as_nanos() as f64;
        std::hint::black_box(sink);
        let bytes = (blocks * 4096).max(1) as f64;
        rows.push(GuardRow {
            guard: name,
            block: 4096,
            ns_per_byte: ns / bytes,
            cycles_per_byte: cycles as f64 / bytes,
        });
    }
    rows
}

fn tsc_ghz() -> f64 {
    let t0 = Instant::now();
    let c0 = rdtsc();
    while t0.elapsed().as_millis() < 100 {}
    (rdtsc() - c0) as f64 / t0.elapsed().as_nanos() as f64
}

/// The model alone: the same doorbell writes, with the driver's work replaced
/// by writing command ids into the submission queue directly.
fn model_alone(ios: u64) -> (f64, f64) {
    let entries = 1024u16;
    let sq = vec![SubmissionEntry::default(); entries as usize];
    let cq = vec![CompletionEntry::default(); entries as usize];
    let m = BenchMmio {
        sim: Sim::new(SimConfig::default()),
        fast: Rc::new(Instant0::default()),
    };
    m.fast
        .configure(sq.as_ptr() as usize, cq.as_ptr() as usize, entries);
    let t0 = Instant::now();
    let c0 = rdtsc();
    let mut tail = 0u16;
    for _ in 0..ios {
        tail = (tail + 1) % entries;
        m.write32(SQ1_DB, tail as u32);
        m.write32(CQ1_DB, tail as u32);
    }
    let c = (rdtsc() - c0) as f64 / ios as f64;
    let ns = t0.elapsed().as_nanos() as f64 / ios as f64;
    std::hint::black_box(&cq);
    (ns, c)
}

/// Runs the benchmark: `ios` reads per target, `qd` in flight. Fails if any
/// read failed or came back short.
pub fn run(ios: u64, qd: usize) -> Result<Report, String> {
    run_targets(ios, qd, &["raw", "generic", "simple"])
}

/// As [`run`], for some targets only (for instruction counting under
/// callgrind: one target per run).
pub fn run_targets(ios: u64, qd: usize, targets: &[&'static str]) -> Result<Report, String> {
    run_with_status(ios, qd, targets, 0)
}

/// As [`run_targets`], with the controller model completing every I/O
/// command with `status` (the completion's status field without the phase
/// bit; 0 is success): how the tests make reads fail.
#[doc(hidden)]
pub fn run_with_status(
    ios: u64,
    qd: usize,
    targets: &[&'static str],
    status: u16,
) -> Result<Report, String> {
    // Under callgrind (instruction counting) timing loops only add noise.
    let counting = std::env::var_os("DIOXIDE_HOSTBENCH_COUNT").is_some();
    let out = one_thread(ios, qd, targets, status, !counting, None);
    if let Some(e) = out.failure {
        return Err(e);
    }
    let tsc_ghz = if counting { 0.0 } else { tsc_ghz() };
    Ok(Report {
        rows: out.rows,
        model_ns_per_io: out.model_ns,
        model_cycles_per_io: out.model_cycles,
        tsc_ghz,
        qd,
        ios,
        threads_rows: Vec::new(),
    })
}

/// One target of a run with `threads` threads side by side, each with its
/// own engine, I/O queue and instant controller model (the per-core path:
/// nothing shared): per-thread cost, each thread's own model cost
/// subtracted, and the reads all threads completed per second together
/// (model included: the harness's throughput).
///
/// `cpu_cycles_per_io` is the thread's CPU time (`CLOCK_THREAD_CPUTIME_ID`)
/// per read in TSC cycles: what a read costs the thread, not counting time
/// it waited for a CPU, so it stays meaningful on a machine shared with
/// other work; `cycles_per_io` (TSC, wall clock) counts that wait too.
#[derive(Clone, Debug)]
pub struct ThreadsRow {
    pub threads: usize,
    pub target: &'static str,
    /// Mean over threads of CPU time per read, in TSC cycles.
    pub cpu_cycles_per_io: f64,
    /// The same for the thread with the highest figure.
    pub cpu_cycles_per_io_max: f64,
    /// Mean over threads of TSC cycles (wall clock) per read.
    pub cycles_per_io: f64,
    pub cycles_per_io_max: f64,
    pub ns_per_io: f64,
    pub allocs_per_io: f64,
    pub model_cycles_per_io: f64,
    /// All threads' reads over the time from the first thread's start to
    /// the last one's end.
    pub iops: f64,
    /// The mean thread's reads per second.
    pub iops_per_thread: f64,
}

/// Runs the benchmark on `threads` threads at once (`ios` reads per target
/// and thread, `qd` in flight on each): one [`ThreadsRow`] per target. Fails
/// if any read failed.
pub fn run_threads(
    ios: u64,
    qd: usize,
    targets: &[&'static str],
    threads: usize,
) -> Result<Vec<ThreadsRow>, String> {
    run_threads_with_status(ios, qd, targets, threads, 0)
}

/// As [`run_threads`], every I/O command completing with `status` (see
/// [`run_with_status`]).
#[doc(hidden)]
pub fn run_threads_with_status(
    ios: u64,
    qd: usize,
    targets: &[&'static str],
    threads: usize,
    status: u16,
) -> Result<Vec<ThreadsRow>, String> {
    let threads = threads.max(1);
    let barrier = Barrier::new(threads);
    let outs: Vec<ThreadOut> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|_| s.spawn(|| one_thread(ios, qd, targets, status, true, Some(&barrier))))
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .map_err(|_| "a benchmark thread panicked".to_string())
            })
            .collect::<Result<_, _>>()
    })?;
    if let Some(e) = outs.iter().find_map(|o| o.failure.clone()) {
        return Err(e);
    }
    let n = threads as f64;
    let ghz = tsc_ghz();
    let mut rows = Vec::new();
    for (i, &target) in targets.iter().enumerate() {
        let row = |o: &ThreadOut| o.rows.get(i).cloned();
        let per: Vec<HostRow> = outs.iter().filter_map(row).collect();
        // CPU time per read less the thread's model, in TSC cycles.
        let cpu: Vec<f64> = outs
            .iter()
            .filter_map(|o| Some(((o.cpu_ns.get(i)? - o.model_ns) * ghz).max(0.0)))
            .collect();
        let spans: Vec<(Instant, Instant)> = outs
            .iter()
            .filter_map(|o| o.spans.get(i).copied())
            .collect();
        let (Some(start), Some(end)) = (
            spans.iter().map(|s| s.0).min(),
            spans.iter().map(|s| s.1).max(),
        ) else {
            continue;
        };
        let wall = (end - start).as_secs_f64();
        let mean = |f: &dyn Fn(&HostRow) -> f64| per.iter().map(f).sum::<f64>() / n;
        rows.push(ThreadsRow {
            threads,
            target,
            cpu_cycles_per_io: cpu.iter().sum::<f64>() / n,
            cpu_cycles_per_io_max: cpu.iter().copied().fold(0.0, f64::max),
            cycles_per_io: mean(&|r| r.cycles_per_io),
            cycles_per_io_max: per.iter().map(|r| r.cycles_per_io).fold(0.0, f64::max),
            ns_per_io: mean(&|r| r.ns_per_io),
            allocs_per_io: mean(&|r| r.allocs_per_io),
            model_cycles_per_io: outs.iter().map(|o| o.model_cycles).sum::<f64>() / n,
            iops: if wall > 0.0 {
                (ios * threads as u64) as f64 / wall
            } else {
                0.0
            },
            iops_per_thread: mean(&|r| {
                if r.raw_ns_per_io > 0.0 {
                    1e9 / r.raw_ns_per_io
                } else {
                    0.0
                }
            }),
        });
    }
    Ok(rows)
}

impl ThreadsRow {
    pub fn json(&self) -> String {
        format!(
            "{{\"threads\":{},\"target\":\"{}\",\"cpu_cycles_per_io\":{:.1},\"cpu_cycles_per_io_max\":{:.1},\"cycles_per_io\":{:.1},\"cycles_per_io_max\":{:.1},\"ns_per_io\":{:.1},\"allocs_per_io\":{:.3},\"model_cycles_per_io\":{:.1},\"iops\":{:.0},\"iops_per_thread\":{:.0}}}",
            self.threads,
            self.target,
            self.cpu_cycles_per_io,
            self.cpu_cycles_per_io_max,
            self.cycles_per_io,
            self.cycles_per_io_max,
            self.ns_per_io,
            self.allocs_per_io,
            self.model_cycles_per_io,
            self.iops,
            self.iops_per_thread
        )
    }

    /// A table of rows (a header line, then a line per row).
    pub fn table(rows: &[ThreadsRow]) -> String {
        let mut s = "threads target   CPU cycles/io: mean  worst | TSC cycles/io: mean  worst |  ns/io  allocs/io  IOPS (all threads)  IOPS per thread\n".to_string();
        for r in rows {
            s += &format!(
                "{:7} {:8} {:19.0} {:6.0} | {:19.0} {:6.0} | {:6.1} {:10.3} {:19} {:16}\n",
                r.threads,
                r.target,
                r.cpu_cycles_per_io,
                r.cpu_cycles_per_io_max,
                r.cycles_per_io,
                r.cycles_per_io_max,
                r.ns_per_io,
                r.allocs_per_io,
                r.iops.round() as u64,
                r.iops_per_thread.round() as u64
            );
        }
        s
    }
}

/// What one thread of the benchmark measured.
struct ThreadOut {
    rows: Vec<HostRow>,
    model_ns: f64,
    model_cycles: f64,
    /// Per row: when its measured round started and ended.
    spans: Vec<(Instant, Instant)>,
    /// Per row: this thread's CPU time per read in the measured round.
    cpu_ns: Vec<f64>,
    /// The first target whose reads failed, as [`run`] reports it.
    failure: Option<String>,
}

/// The benchmark on this thread, with everything of its own: the file
/// image, the simulated controller and its instant model, the I/O queue,
/// the engine, the buffers. With `sync`, every measured round (and the
/// model's) starts when all threads reach it, so that they run side by
/// side; a failed target is recorded and the run goes on, so that no
/// thread leaves the others waiting.
fn one_thread(
    ios: u64,
    qd: usize,
    targets: &[&'static str],
    status: u16,
    model: bool,
    sync: Option<&Barrier>,
) -> ThreadOut {
    let wait = || {
        if let Some(b) = sync {
            b.wait();
        }
    };
    let file = bench_file();
    let mut engine = instant_engine(status);
    let mut bufs = vec![0u8; (qd + 1) * 4096];
    let base = (bufs.as_mut_ptr() as usize).div_ceil(4096) * 4096;
    let blocks = file.size() / 4096;
    wait();
    let (model_ns, model_cycles) = if model { model_alone(ios) } else { (0.0, 0.0) };
    let mut rows = Vec::new();
    let mut spans = Vec::new();
    let mut cpu_ns = Vec::new();
    let mut failure = None;
    for &target in targets {
        // `simple-write`, `raw-write`: 4 KiB writes the same way (the
        // simple path overwrites the file's written blocks).
        engine.set_simple(target.starts_with("simple"));
        let op = if target.ends_with("-write") {
            Op::Write
        } else {
            Op::Read
        };
        let mut rng = dioxide_testkit::Rng::new(0x1234_5678_9abc_def1);
        let mut submit = |e: &mut Engine<_>, ctx: usize| {
            let r = rng.next_u64() % blocks;
            let Some(buf) = IoBuf::from_addr(base + ctx * 4096, 4096) else {
                return;
            };
            // The harness's request id: the context's index.
            let owner = ReqId::new(ctx as u16, 0);
            // SAFETY: `bufs` outlives the engine's use of it in this loop.
            let res = unsafe {
                if target.starts_with("raw") {
                    e.raw(op, r, buf, Some(owner))
                } else {
                    let iocb = Kiocb::with_owner(r * 4096, owner);
                    if op == Op::Write {
                        e.dio_rw(DioRequest::write(iocb, buf, &file))
                    } else {
                        e.dio_rw(DioRequest::read(iocb, buf, &file))
                    }
                }
            };
            assert_eq!(res, Ok(DioResult::Queued));
        };
        // Allocated before the counters are read: the harness's own
        // allocations are not the read path's.
        let mut ready: Vec<usize> = Vec::with_capacity(qd);
        // Warm up, then measure.
        for round in 0..2 {
            let n = if round == 0 { ios / 10 } else { ios };
            FAILED.with(|n| n.set(0));
            FIRST_FAILURE.with(|f| f.set(None));
            if round == 1 {
                wait();
            }
            let s0 = engine.stats();
            // This thread's allocations: a count shared by threads would
            // be counted in by each.
            let a0 = dioxide_testkit::thread_allocs();
            let cpu0 = thread_cpu_ns();
            let t0 = Instant::now();
            let c0 = rdtsc();
            let mut submitted = 0u64;
            for ctx in 0..qd {
                submit(&mut engine, ctx);
                submitted += 1;
            }
            let mut completed = 0u64;
            while completed < submitted {
                engine.poll();
                // Every read reaches its owner here, as in the run loop.
                engine.complete(|id, r| done(id.index(), r));
                READY.with(|q| std::mem::swap(&mut *q.borrow_mut(), &mut ready));
                for &ctx in &ready {
                    completed += 1;
                    if submitted < n {
                        submit(&mut engine, ctx);
                        submitted += 1;
                    }
                }
                ready.clear();
            }
            let cycles = (rdtsc() - c0) as f64 / n as f64;
            let t1 = Instant::now();
            let cpu = (thread_cpu_ns() - cpu0) as f64 / n as f64;
            let ns = (t1 - t0).as_nanos() as f64 / n as f64;
            let allocs = (dioxide_testkit::thread_allocs() - a0) as f64 / n as f64;
            let s1 = engine.stats();
            let failed = FAILED.with(Cell::get);
            if failed > 0 {
                let first = match FIRST_FAILURE.with(Cell::get) {
                    Some(Err(e)) => format!("{e}"),
                    Some(Ok(b)) => format!("{b} bytes instead of 4096"),
                    None => String::new(),
                };
                failure.get_or_insert(format!(
                    "host benchmark, target {target}: {failed} of {completed} reads failed (first: {first})"
                ));
            }
            if round == 1 {
                spans.push((t0, t1));
                cpu_ns.push(cpu);
                rows.push(HostRow {
                    target,
                    ns_per_io: (ns - model_ns).max(0.0),
                    cycles_per_io: (cycles - model_cycles).max(0.0),
                    allocs_per_io: allocs,
                    raw_ns_per_io: ns,
                    raw_cycles_per_io: cycles,
                    simple_path: s1.simple - s0.simple,
                    generic_path: s1.generic - s0.generic,
                    fell_back: s1.fell_back - s0.fell_back,
                });
            }
        }
    }
    drop(bufs);
    ThreadOut {
        rows,
        model_ns,
        model_cycles,
        spans,
        cpu_ns,
        failure,
    }
}

impl Report {
    pub fn json(&self) -> String {
        let rows: Vec<String> = self
            .rows
            .iter()
            .map(|r| {
                format!(
                    "{{\"target\":\"{}\",\"ns_per_io\":{:.1},\"cycles_per_io\":{:.1},\"allocs_per_io\":{:.3},\"ns_per_io_with_model\":{:.1},\"cycles_per_io_with_model\":{:.1},\"simple_path\":{},\"generic_path\":{},\"fell_back\":{}}}",
                    r.target, r.ns_per_io, r.cycles_per_io, r.allocs_per_io, r.raw_ns_per_io, r.raw_cycles_per_io, r.simple_path, r.generic_path, r.fell_back
                )
            })
            .collect();
        format!(
            "{{\"host_rows\":[{}],\"host_threads_rows\":[{}],\"model_ns_per_io\":{:.1},\"model_cycles_per_io\":{:.1},\"tsc_ghz\":{:.3},\"qd\":{},\"ios\":{}}}",
            rows.join(","),
            self.threads_rows
                .iter()
                .map(ThreadsRow::json)
                .collect::<Vec<_>>()
                .join(","),
            self.model_ns_per_io,
            self.model_cycles_per_io,
            self.tsc_ghz,
            self.qd,
            self.ios
        )
    }

    pub fn table(&self) -> String {
        let mut s = format!(
            "host: 4K reads, {} in flight, instant controller model ({:.1} ns / {:.0} TSC cycles per I/O, subtracted); TSC {:.2} GHz\n",
            self.qd, self.model_ns_per_io, self.model_cycles_per_io, self.tsc_ghz
        );
        s += "target     ns/io   cycles/io   allocs/io  simple_path generic_path fell_back\n";
        for r in &self.rows {
            s += &format!(
                "{:8} {:7.1} {:11.0} {:11.3} {:12} {:12} {:9}\n",
                r.target,
                r.ns_per_io,
                r.cycles_per_io,
                r.allocs_per_io,
                r.simple_path,
                r.generic_path,
                r.fell_back
            );
        }
        if !self.threads_rows.is_empty() {
            s += &format!(
                "\nthreads side by side, each with its own engine, queue and model ({} reads per target and thread):\n",
                self.ios
            );
            s += &ThreadsRow::table(&self.threads_rows);
        }
        s
    }
}

/// CPUs online on this machine (`sysconf(_SC_NPROCESSORS_ONLN)`; 0 if it
/// cannot say).
pub fn online_cpus() -> usize {
    // SAFETY: sysconf reads a system value; no memory is passed.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    n.max(0) as usize
}

/// The CPUs this thread may run on (its affinity mask: `taskset -c 0,1`
/// narrows it), in order; empty if the mask cannot be read.
pub fn allowed_cpus() -> Vec<usize> {
    // SAFETY: cpu_set_t is a plain bit mask; all zeros is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a cpu_set_t of the size passed, for the call to fill
    // (pid 0: the calling thread).
    let r = unsafe { libc::sched_getaffinity(0, std::mem::size_of_val(&set), &mut set) };
    if r != 0 {
        return Vec::new();
    }
    (0..libc::CPU_SETSIZE as usize)
        // SAFETY: `c` is below CPU_SETSIZE, inside `set`.
        .filter(|&c| unsafe { libc::CPU_ISSET(c, &set) })
        .collect()
}

/// Pins the calling thread to `cpu`; whether that worked.
pub(crate) fn pin_to(cpu: usize) -> bool {
    if cpu >= libc::CPU_SETSIZE as usize {
        return false;
    }
    // SAFETY: cpu_set_t is a plain bit mask; all zeros is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `cpu` is below CPU_SETSIZE, inside `set`.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: `set` is a cpu_set_t of the size passed (pid 0: the calling
    // thread).
    unsafe { libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set) == 0 }
}

/// The thread counts of `--threads`: a comma-separated list, or `auto`: 1
/// and this machine's parallelism (at most 8).
pub fn parse_threads(s: &str) -> Result<Vec<usize>, String> {
    if s == "auto" {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get().min(8));
        return Ok(if n > 1 { vec![1, n] } else { vec![1] });
    }
    let v: Vec<usize> = s
        .split(',')
        .map(|x| x.trim().parse::<usize>())
        .collect::<Result<_, _>>()
        .map_err(|_| format!("--threads {s}: thread counts from 1 to 64, or auto"))?;
    if v.is_empty() || v.iter().any(|&t| t == 0 || t > 64) {
        return Err(format!(
            "--threads {s}: thread counts from 1 to 64, or auto"
        ));
    }
    Ok(v)
}
