//! The in-guest benchmark (`selftest=bench`) and the no-allocation proof
//! (`selftest=noalloc`).
//!
//! Each row keeps `qd` 4 KiB random reads (or writes, `bench.op=`; see
//! [`Rw`]) in flight for a while against one target — the raw namespace, the file through the generic path (simple path
//! off), the file through the simple path — on one device (the NVMe queue or
//! the null device) with one completion mode. Results are JSON lines, one
//! object per line, on every console, so that a bare-metal run (where no host
//! CLI reads the console) gives the same data as `dioxide bench local`:
//!
//! ```text
//! {"bench":"file","bytes":..,"extents":..,"namespace_bytes":..,"tsc_mhz":..,"protocol":"multiboot2","firmware":"uefi"}
//! {"bench":"running","op":"read","dev":"nvme","completion":"poll","qd":16}
//! {"bench":"row","target":"simple","op":"read","dev":"nvme","completion":"poll","qd":16,"ios":..,"errors":..,
//!  "simple_path":..,"generic_path":..,"fell_back":..,"iops":..,"lat_mean_us":..,"lat_p99_us":..,
//!  "cycles_per_io":..,"allocs_per_io":..}          (on one line)
//! {"bench":"skip","dev":"null","completion":"irq","why":".."}
//! {"bench":"error","message":".."}
//! {"bench":"done"}
//! ```
//!
//! `dioxide bench local` parses these lines from the console of the guest it
//! booted; `dioxide bench local --from-log FILE` parses a console captured
//! from a server (a BMC's serial-over-LAN log, a screen transcript).
//!
//! The three targets of one (device, completion, queue depth) run
//! interleaved — raw, generic, simple, raw, ... in slices of a quarter of the
//! row time — so that noise from a shared host (other guests, QEMU's own
//! threads) falls on all three alike rather than on whichever ran during a
//! slow second.
//!
//! **Reading `lat_p99_us`.** Each target gets a quarter of the row time in
//! each slice, so a stall of the host (QEMU's NVMe emulation on io_uring
//! with `cache=none`, other processes on a shared machine) lands on the
//! target whose slice it falls in: at QD64 and 8,000 IOPS one 20 ms stall
//! holds all 64 reads in flight, about 1 % of a one-second slice, which is
//! exactly what a p99 shows. So on the emulated NVMe device the three
//! targets' p99 move together from run to run and one of them can be
//! several times the others in a single run (an early run: simple
//! 21,441 µs against raw 4,931 µs at equal mean IOPS). Measured again
//! (2 runs, QD64, 1 CPU, TCG): p99 raw / generic / simple 24.9 / 24.9 /
//! 23.2 ms and 18.9 / 17.2 / 18.0 ms, while the means were 13.2 / 14.2 /
//! 7.8 ms and 6.8 / 5.1 / 4.0 ms. On the null device, where no host I/O
//! intervenes, the tail is the engines' own: p99 30 µs raw, 54-57 µs simple
//! (means 18-19 and 23 µs), no stall. Compare p99 across targets only over
//! several runs, or on the null device.
//!
//! Completions record their latency inline (TSC at completion minus TSC at
//! submission) into a fixed histogram and push the request's context onto a
//! ring the submit loop drains: nothing is allocated per request by the
//! harness itself, so `allocs_per_io` is the layers' own. Each row also
//! counts the requests the engine sent down the simple and the generic path
//! and the simple-path attempts that fell back (`fell_back`): a `simple` row
//! is only the simple path's figure when `fell_back=0`.

use crate::drivers::nvme::{self, DmaBuf, Mode};
use crate::platform::{power, smp, time};
use crate::{mm, outln};
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt::Write;
use core::sync::atomic::{AtomicUsize, Ordering};
use crossbeam_utils::CachePadded;
use dioxide_dxfs::File;
use dioxide_iomap::null::NullQueue;
use dioxide_iomap::{
    BlockQueue, DioError, DioRequest, DioResult, Engine, IoBuf, Kiocb, Op, ReqId, Ring, Stats,
};
use dioxide_testkit::Rng;
use x86_64::instructions::interrupts;

/// One JSON object written field by field and printed as one console line.
/// Strings are escaped (RFC 8259 §7); numbers that are not finite print as 0
/// (JSON has no NaN).
struct JsonLine(String);

impl JsonLine {
    fn new(kind: &str) -> Self {
        let mut j = JsonLine(String::with_capacity(256));
        j.0.push('{');
        j.str("bench", kind);
        j
    }
    fn key(&mut self, k: &str) {
        if self.0.len() > 1 {
            self.0.push(',');
        }
        self.quoted(k);
        self.0.push(':');
    }
    fn quoted(&mut self, v: &str) {
        self.0.push('"');
        for c in v.chars() {
            match c {
                '"' => self.0.push_str("\\\""),
                '\\' => self.0.push_str("\\\\"),
                c if (c as u32) < 0x20 => {
                    let _ = write!(self.0, "\\u{:04x}", c as u32);
                }
                c => self.0.push(c),
            }
        }
        self.0.push('"');
    }
    fn str(&mut self, k: &str, v: &str) -> &mut Self {
        self.key(k);
        self.quoted(v);
        self
    }
    fn int(&mut self, k: &str, v: u64) -> &mut Self {
        self.key(k);
        let _ = write!(self.0, "{v}");
        self
    }
    fn num(&mut self, k: &str, v: f64, decimals: usize) -> &mut Self {
        self.key(k);
        let v = if v.is_finite() { v } else { 0.0 };
        let _ = write!(self.0, "{v:.decimals$}");
        self
    }
    fn print(&mut self) {
        self.0.push('}');
        outln!("{}", self.0);
    }
}

/// Prints `{"bench":"error","message":...}`.
fn error(message: core::fmt::Arguments) {
    JsonLine::new("error")
        .str("message", &alloc::format!("{message}"))
        .print();
}

const MAX_QD: usize = 1024;
const BUCKETS: usize = 64 * 16;

const ROUNDS: u64 = 4;

/// What one core's run of a row records: per target (raw, generic, simple)
/// the latency histogram, sum, count and errors; each context's submission
/// time; the contexts whose request completed (a FIFO the submit loop
/// drains). One per core, allocated before the row starts: nothing is
/// shared between cores, and nothing is allocated per request. (Aligned so
/// that two cores' states, allocated one after the other, share no cache
/// line.)
#[repr(align(128))]
struct State {
    start: [u64; MAX_QD],
    hist: [[u64; BUCKETS]; 3],
    lat_sum: [u64; 3],
    done: [u64; 3],
    errors: [u64; 3],
    /// The target whose requests are in flight (slices drain before
    /// switching).
    cur: usize,
    ready: Ring<usize>,
}

impl State {
    fn new() -> alloc::boxed::Box<State> {
        alloc::boxed::Box::new(State {
            start: [0; MAX_QD],
            hist: [[0; BUCKETS]; 3],
            lat_sum: [0; 3],
            done: [0; 3],
            errors: [0; 3],
            cur: 0,
            ready: Ring::new(MAX_QD + 1, 0),
        })
    }

    /// The completion of every benchmark request, delivered by
    /// `Engine::complete` in the loop of [`run`] (its id's index is the
    /// context).
    fn on_done(&mut self, ctx: usize, r: Result<usize, DioError>) {
        let lat = time::rdtsc().wrapping_sub(self.start[ctx]);
        let t = self.cur;
        self.hist[t][bucket(lat)] += 1;
        self.lat_sum[t] += lat;
        self.done[t] += 1;
        if r.is_err() {
            self.errors[t] += 1;
        }
        let _ = self.ready.push(ctx);
    }

    /// Adds another core's figures into these.
    fn merge(&mut self, o: &State) {
        for t in 0..3 {
            for (a, b) in self.hist[t].iter_mut().zip(o.hist[t].iter()) {
                *a += b;
            }
            self.lat_sum[t] += o.lat_sum[t];
            self.done[t] += o.done[t];
            self.errors[t] += o.errors[t];
        }
    }

    fn p99_cycles(&self, t: usize, n: u64) -> u64 {
        let want = (n * 99).div_ceil(100);
        let mut seen = 0;
        for (i, h) in self.hist[t].iter().enumerate() {
            seen += h;
            if seen >= want {
                return bucket_value(i);
            }
        }
        0
    }
}

fn bucket(c: u64) -> usize {
    if c < 16 {
        return c as usize;
    }
    let e = 63 - c.leading_zeros() as usize;
    ((e - 3) * 16 + ((c >> (e - 4)) & 15) as usize).min(BUCKETS - 1)
}

fn bucket_value(i: usize) -> u64 {
    if i < 16 {
        return i as u64;
    }
    let e = i / 16 + 3;
    (16 + (i % 16) as u64) << (e - 4)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    Raw,
    Generic,
    Simple,
}

impl Target {
    fn index(self) -> usize {
        match self {
            Target::Raw => 0,
            Target::Generic => 1,
            Target::Simple => 2,
        }
    }
    fn name(self) -> &'static str {
        match self {
            Target::Raw => "raw",
            Target::Generic => "generic",
            Target::Simple => "simple",
        }
    }
}

/// What a row's requests do (`bench.op=read,write,write-fua`): 4 KiB
/// reads, 4 KiB writes, or 4 KiB writes with Force Unit Access (each durable
/// when it completes). Writes overwrite: the file's written blocks (on the
/// file targets the simple path's case, an overwrite changes no metadata)
/// and, on the raw target, blocks inside the file's largest extent, so that
/// a write benchmark never touches the filesystem's metadata. The bytes
/// written are whatever the buffers hold (the image's file is random data;
/// it stays data, and the benchmark never checks it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rw {
    Read,
    Write,
    WriteFua,
}

impl Rw {
    pub fn parse(s: &str) -> Option<Rw> {
        match s {
            "read" => Some(Rw::Read),
            "write" => Some(Rw::Write),
            "write-fua" => Some(Rw::WriteFua),
            _ => None,
        }
    }
    fn name(self) -> &'static str {
        match self {
            Rw::Read => "read",
            Rw::Write => "write",
            Rw::WriteFua => "write-fua",
        }
    }
    fn op(self) -> Op {
        match self {
            Rw::Read => Op::Read,
            Rw::Write => Op::Write,
            Rw::WriteFua => Op::WriteFua,
        }
    }
}

/// Where a row's raw requests go, in 4 KiB blocks of the namespace: reads
/// anywhere; writes inside the file's largest written extent.
#[derive(Clone, Copy)]
struct RawSpan {
    first: u64,
    blocks: u64,
}

/// How long a row runs.
#[derive(Clone, Copy)]
pub enum Limit {
    Millis(u64),
    Ios(u64),
}

#[derive(Default)]
pub struct Row {
    pub ios: u64,
    pub errors: u64,
    pub cycles: u64,
    pub allocs: u64,
    pub frees: u64,
    /// Requests the engine sent down the simple path, the generic path, and
    /// simple-path attempts that fell back to the generic path (engine
    /// [`Stats`]), so that a row shows which path served it.
    pub simple: u64,
    pub generic: u64,
    pub fell_back: u64,
}

impl Row {
    /// One slice run on every core at once: I/Os and path counters add up;
    /// the time is the longest core's (wall time); the heap counters are
    /// global, so each core's delta already saw every core's allocations:
    /// the largest is the slice's.
    fn of_cores(rows: &[Row]) -> Row {
        let mut r = Row::default();
        for x in rows {
            r.ios += x.ios;
            r.errors += x.errors;
            r.cycles = r.cycles.max(x.cycles);
            r.allocs = r.allocs.max(x.allocs);
            r.frees = r.frees.max(x.frees);
            r.simple += x.simple;
            r.generic += x.generic;
            r.fell_back += x.fell_back;
        }
        r
    }

    fn add(&mut self, r: &Row) {
        self.ios += r.ios;
        self.errors += r.errors;
        self.cycles += r.cycles;
        self.allocs += r.allocs;
        self.frees += r.frees;
        self.simple += r.simple;
        self.generic += r.generic;
        self.fell_back += r.fell_back;
    }
}

/// One core's part of a row, on cache lines of its own (no core writes a
/// line another core's run uses); only its core takes the lock.
type PerCore<T> = CachePadded<spin::Mutex<T>>;
/// The in-kernel null device behind its own engine.
type NullEngine = Engine<NullQueue<fn() -> u64>>;

/// Keeps the cores of one slice in step: none starts measuring before all
/// are ready, and none leaves (freeing what the slice's job held) before all
/// are done, so that the global heap counters each core reads see only the
/// slice's own requests.
struct Step {
    cpus: usize,
    ready: AtomicUsize,
    done: AtomicUsize,
    read: AtomicUsize,
}

impl Step {
    fn new(cpus: usize) -> Step {
        Step {
            cpus,
            ready: AtomicUsize::new(0),
            done: AtomicUsize::new(0),
            read: AtomicUsize::new(0),
        }
    }
    /// A core without work in this slice still keeps step, so that it
    /// frees nothing while the others measure.
    fn sit_out(&self) {
        self.meet(&self.ready);
        self.meet(&self.done);
        self.meet(&self.read);
    }

    fn meet(&self, at: &AtomicUsize) {
        at.fetch_add(1, Ordering::AcqRel);
        while at.load(Ordering::Acquire) < self.cpus {
            core::hint::spin_loop();
        }
    }
}

struct Load<'a> {
    state: &'a mut State,
    /// With several cores at once: their meeting points.
    step: Option<&'a Step>,
    target: Target,
    op: Op,
    file: &'a File,
    file_blocks: u64,
    raw: RawSpan,
    bufs: usize,
    rng: Rng,
}

impl Load<'_> {
    /// Submits the request of context `ctx`.
    fn submit<Q: BlockQueue>(&mut self, e: &mut Engine<Q>, ctx: usize) {
        let Some(buf) = IoBuf::from_addr(self.bufs + ctx * 4096, 4096) else {
            return;
        };
        // The benchmark's own request id: the context's index.
        let owner = ReqId::new(ctx as u16, 0);
        self.state.start[ctx] = time::rdtsc();
        let r = match self.target {
            Target::Raw => {
                let shift = e.queue().lba_shift();
                let block = self.raw.first + self.rng.next_u64() % self.raw.blocks;
                // SAFETY: the buffers live for the whole benchmark.
                unsafe { e.raw(self.op, block << (12 - shift), buf, Some(owner)) }
            }
            Target::Generic | Target::Simple => {
                let pos = (self.rng.next_u64() % self.file_blocks) * 4096;
                // SAFETY: the buffers live for the whole benchmark, past every completion.
                unsafe {
                    e.dio_rw(DioRequest::new(
                        Kiocb::with_owner(pos, owner),
                        self.op,
                        buf,
                        self.file,
                    ))
                }
            }
        };
        match r {
            Ok(DioResult::Queued) => {}
            Ok(DioResult::Done(n)) => self.state.on_done(ctx, Ok(n)),
            Err(err) => self.state.on_done(ctx, Err(err)),
        }
    }
}

/// Gives the engine of a row to a closure (under its lock where it has one).
type WithEngine<'a, Q> = &'a mut dyn FnMut(&mut dyn FnMut(&mut Engine<Q>));

/// Runs one row: `with` gives the engine (under its lock); `irq` means
/// completions arrive from the interrupt handler.
fn run<Q: BlockQueue>(
    with: WithEngine<Q>,
    irq: bool,
    load: &mut Load,
    qd: usize,
    limit: Limit,
) -> Row {
    let target = load.target;
    let t = target.index();
    load.state.cur = t;
    let (done0, err0) = (load.state.done[t], load.state.errors[t]);
    let mut s0 = Stats::default();
    with(&mut |e| {
        e.set_simple(target == Target::Simple);
        s0 = e.stats();
    });
    if let Some(s) = load.step {
        s.meet(&s.ready);
    }
    let h0 = mm::heap::stats();
    let hz = time::tsc_hz();
    let t0 = time::rdtsc();
    let (deadline, max_ios) = match limit {
        Limit::Millis(ms) => (t0 + ms * hz / 1000, u64::MAX),
        Limit::Ios(n) => (u64::MAX, n),
    };
    let mut submitted = 0u64;
    let mut outstanding = 0usize;
    with(&mut |e| {
        for ctx in 0..qd {
            if submitted < max_ios {
                load.submit(e, ctx);
                submitted += 1;
                outstanding += 1;
            }
        }
    });
    while outstanding > 0 {
        if irq {
            interrupts::disable();
            let mut pending = 0;
            with(&mut |e| pending = e.pending_completions());
            if pending == 0 && load.state.ready.is_empty() {
                interrupts::enable_and_hlt();
            } else {
                interrupts::enable();
            }
        }
        with(&mut |e| {
            if !irq {
                e.poll();
            }
            e.complete(|id, r| load.state.on_done(id.index(), r));
            let now = time::rdtsc();
            while let Some(ctx) = load.state.ready.pop() {
                if now < deadline && submitted < max_ios {
                    load.submit(e, ctx);
                    submitted += 1;
                } else {
                    outstanding -= 1;
                }
            }
        });
    }
    let cycles = time::rdtsc() - t0;
    if let Some(s) = load.step {
        s.meet(&s.done);
    }
    let h1 = mm::heap::stats();
    if let Some(s) = load.step {
        // Every core has read the counters: now they may free.
        s.meet(&s.read);
    }
    let mut s1 = Stats::default();
    with(&mut |e| s1 = e.stats());
    Row {
        ios: load.state.done[t] - done0,
        errors: load.state.errors[t] - err0,
        cycles,
        allocs: h1.allocs - h0.allocs,
        frees: h1.frees - h0.frees,
        simple: s1.simple - s0.simple,
        generic: s1.generic - s0.generic,
        fell_back: s1.fell_back - s0.fell_back,
    }
}

fn us(cycles: f64) -> f64 {
    cycles * 1e6 / time::tsc_hz() as f64
}

/// What a row measured, as its line names it: `qd` per core on `cpus`
/// cores.
struct RowOf<'a> {
    rw: Rw,
    dev: &'a str,
    completion: &'a str,
    qd: usize,
    cpus: usize,
}

/// Prints one row: `qd` is per core, `iops` all cores together, and
/// `cycles_per_io` the CPU time per I/O (wall time times cores over I/Os).
fn report(state: &State, target: Target, of: &RowOf, r: &Row) {
    let RowOf {
        rw,
        dev,
        completion,
        qd,
        cpus,
    } = *of;
    let n = r.ios.max(1) as f64;
    let secs = r.cycles as f64 / time::tsc_hz() as f64;
    JsonLine::new("row")
        .str("target", target.name())
        .str("op", rw.name())
        .str("dev", dev)
        .str("completion", completion)
        .int("qd", qd as u64)
        .int("cpus", cpus as u64)
        .int("ios", r.ios)
        .int("errors", r.errors)
        .int("simple_path", r.simple)
        .int("generic_path", r.generic)
        .int("fell_back", r.fell_back)
        .num("iops", r.ios as f64 / secs, 0)
        .num(
            "lat_mean_us",
            us(state.lat_sum[target.index()] as f64 / n),
            2,
        )
        .num(
            "lat_p99_us",
            us(state.p99_cycles(target.index(), r.ios) as f64),
            2,
        )
        .num("cycles_per_io", r.cycles as f64 * cpus as f64 / n, 0)
        .num("allocs_per_io", r.allocs as f64 / n, 3)
        .print();
}

/// The file to read: `path`, or the largest regular file.
fn pick_file(
    fs: &dioxide_dxfs::Fs<crate::block::disk::NvmeDisk>,
    path: Option<&str>,
) -> Result<File, alloc::string::String> {
    let ino = match path {
        Some(p) => fs.resolve(p).map_err(|e| alloc::format!("{e}"))?,
        None => {
            let all = fs.walk().map_err(|e| alloc::format!("{e}"))?;
            all.iter()
                .filter(|e| e.inode.is_file())
                .max_by_key(|e| e.inode.size)
                .map(|e| e.ino)
                .ok_or_else(|| alloc::string::String::from("no regular file"))?
        }
    };
    let f = fs.open(ino).map_err(|e| alloc::format!("{e}"))?;
    if f.size() < 4096 || !f.inode.is_file() {
        return Err(alloc::format!(
            "file of {} bytes: need a regular file of at least 4 KiB",
            f.size()
        ));
    }
    Ok(f)
}

pub struct Params<'a> {
    pub qds: &'a [usize],
    pub ops: &'a [Rw],
    pub devs: &'a [&'a str],
    pub completions: &'a [&'a str],
    pub secs: u64,
    pub file: Option<&'a str>,
    /// How the kernel was booted, as its boot information says
    /// (`pvh`/`multiboot2`, `bios`/`uefi`/`unknown`): on the `file` line.
    pub protocol: &'a str,
    pub firmware: &'a str,
}

fn nvme_with(disk: usize) -> impl FnMut(&mut dyn FnMut(&mut nvme::Dio)) {
    move |f: &mut dyn FnMut(&mut nvme::Dio)| {
        nvme::with_engine(disk, |e| f(e));
    }
}

/// The largest written extent of `file`, in 4 KiB blocks of the
/// namespace: where raw writes go (see [`Rw`]).
fn write_span(file: &File) -> RawSpan {
    let bs = file.block_size() as u64;
    file.extents()
        .iter()
        .filter(|x| !x.unwritten())
        .map(|x| {
            // Whole 4 KiB blocks inside the extent only.
            let first = (x.disk_block * bs).div_ceil(4096);
            let end = (x.disk_block + x.len as u64) * bs / 4096;
            RawSpan {
                first,
                blocks: end.saturating_sub(first),
            }
        })
        .max_by_key(|r| r.blocks)
        .unwrap_or(RawSpan {
            first: 0,
            blocks: 0,
        })
}

/// What every row of one benchmark shares.
struct Setup<'a> {
    disk: usize,
    block_shift: u32,
    blocks: u64,
    file: &'a File,
    /// The DMA buffers: `maxqd` of 4 KiB per core.
    base: usize,
    maxqd: usize,
    cpus: usize,
    slice: Limit,
    read_span: RawSpan,
    write_span: RawSpan,
}

impl Setup<'_> {
    /// One row: raw, generic and simple interleaved at queue depth `qd`
    /// per core, on device `d` with completion `c`; prints the three.
    fn row(&self, d: &str, c: &str, rw: Rw, qd: usize) {
        let cpus = self.cpus;
        // The cores that run: all of them, but on the NVMe device only
        // those with a queue of their own when the controller granted
        // fewer than there are cores (two cores on one engine would
        // take each other's completions).
        let active = if d == "nvme" {
            cpus.min(nvme::queue_count(self.disk)).max(1)
        } else {
            cpus
        };
        JsonLine::new("running")
            .str("op", rw.name())
            .str("dev", d)
            .str("completion", c)
            .int("qd", qd as u64)
            .int("cpus", active as u64)
            .print();
        let targets = [Target::Raw, Target::Generic, Target::Simple];
        let mut rows: [Row; 3] = Default::default();
        // Per core: its figures and its null device, kept across the slices
        // of the row (each core takes only its own). (Each on cache lines
        // of its own: no core writes a line another core's run uses.)
        let states: Vec<PerCore<alloc::boxed::Box<State>>> = (0..cpus)
            .map(|_| CachePadded::new(spin::Mutex::new(State::new())))
            .collect();
        let nulls: Vec<PerCore<NullEngine>> = (0..cpus)
            .map(|_| {
                CachePadded::new(spin::Mutex::new(Engine::new(NullQueue::new(
                    MAX_QD,
                    self.block_shift,
                    self.blocks,
                    time::now_ns as fn() -> u64,
                ))))
            })
            .collect();
        let irq = c == "irq";
        for round in 0..ROUNDS {
            for target in targets {
                // Every core runs the slice on its own queue (or null
                // device) at the same time (see `active`).
                let step = Step::new(cpus);
                let per_core = smp::on_each_cpu(|cpu| {
                    if cpu >= active {
                        step.sit_out();
                        return Row::default();
                    }
                    let mut st = states[cpu].lock();
                    let mut load = Load {
                        state: &mut st,
                        step: Some(&step),
                        target,
                        op: rw.op(),
                        file: self.file,
                        file_blocks: self.file.size() / 4096,
                        raw: if rw == Rw::Read {
                            self.read_span
                        } else {
                            self.write_span
                        },
                        bufs: self.base + cpu * self.maxqd * 4096,
                        rng: Rng::new(0x9e37_79b9 ^ (qd as u64) << 8 ^ round ^ (cpu as u64) << 32),
                    };
                    if d == "nvme" {
                        run(&mut nvme_with(self.disk), irq, &mut load, qd, self.slice)
                    } else {
                        let mut null = nulls[cpu].lock();
                        run(
                            &mut |f: &mut dyn FnMut(&mut Engine<_>)| f(&mut null),
                            false,
                            &mut load,
                            qd,
                            self.slice,
                        )
                    }
                });
                rows[target.index()].add(&Row::of_cores(&per_core));
            }
        }
        let mut all = State::new();
        for st in &states {
            all.merge(&st.lock());
        }
        let of = RowOf {
            rw,
            dev: d,
            completion: c,
            qd,
            cpus: active,
        };
        for target in targets {
            report(&all, target, &of, &rows[target.index()]);
        }
    }
}

/// `selftest=bench`.
pub fn bench(
    disk: usize,
    fs: Option<dioxide_dxfs::Fs<crate::block::disk::NvmeDisk>>,
    p: &Params,
) -> ! {
    let Some(dev) = nvme::disks().get(disk) else {
        error(format_args!("no NVMe namespace"));
        nvme::power_off(power::EXIT_TEST_FAILED);
    };
    let Some(fs) = fs else {
        error(format_args!("nvme0n1 holds no usable dxfs"));
        nvme::power_off(power::EXIT_TEST_FAILED);
    };
    let file = match pick_file(&fs, p.file) {
        Ok(f) => f,
        Err(e) => {
            error(format_args!("{e}"));
            nvme::power_off(power::EXIT_TEST_FAILED);
        }
    };
    let maxqd = p.qds.iter().copied().max().unwrap_or(1).min(MAX_QD);
    let cpus = smp::cpu_count();
    let Some(mut bufs) = DmaBuf::new(cpus * maxqd * 4096) else {
        error(format_args!("out of memory"));
        nvme::power_off(power::EXIT_TEST_FAILED);
    };
    let base = bufs.part(0, 4096).addr();
    JsonLine::new("file")
        .int("bytes", file.size())
        .int("extents", file.extents().len() as u64)
        .int("namespace_bytes", dev.ns.bytes())
        .int("tsc_mhz", time::tsc_hz() / 1_000_000)
        .str("protocol", p.protocol)
        .str("firmware", p.firmware)
        .print();
    let setup = Setup {
        disk,
        block_shift: dev.ns.block_size.trailing_zeros(),
        blocks: dev.ns.blocks,
        file: &file,
        base,
        maxqd,
        cpus,
        slice: Limit::Millis((p.secs * 1000 / ROUNDS).max(1)),
        read_span: RawSpan {
            first: 0,
            blocks: dev.ns.bytes() / 4096,
        },
        write_span: write_span(&file),
    };
    if p.ops.iter().any(|&rw| rw != Rw::Read) && setup.write_span.blocks == 0 {
        error(format_args!(
            "the file has no written extent of whole 4 KiB blocks to overwrite"
        ));
        nvme::power_off(power::EXIT_TEST_FAILED);
    }
    let mode = nvme::mode();
    for d in p.devs {
        for c in p.completions {
            let irq = *c == "irq";
            if *d == "nvme" && irq != (mode == Mode::Irq) {
                JsonLine::new("skip")
                    .str("dev", d)
                    .str("completion", c)
                    .str(
                        "why",
                        &alloc::format!("the kernel runs nvme.completion={mode:?}"),
                    )
                    .print();
                continue;
            }
            if *d == "null" && irq {
                JsonLine::new("skip")
                    .str("dev", d)
                    .str("completion", c)
                    .str("why", "the null device completes on the next poll")
                    .print();
                continue;
            }
            for &rw in p.ops {
                for &qd in p.qds {
                    setup.row(d, c, rw, qd.clamp(1, MAX_QD));
                }
            }
        }
    }
    JsonLine::new("done").print();
    nvme::power_off(power::EXIT_OK)
}

/// Reads per half of `selftest=noalloc`.
const NOALLOC_READS: u64 = 100_000;

/// `selftest=noalloc`: 100 000 simple-path 4 KiB reads (32 in flight) on the
/// NVMe queue; fails unless the heap counters did not move. Then the control:
/// as many reads through the generic path (simple path off), each of which
/// allocates its dio object; fails unless the counters saw them, so that a
/// counter which never counts cannot pass for a path that never allocates.
pub fn noalloc(fs: Option<dioxide_dxfs::Fs<crate::block::disk::NvmeDisk>>) -> ! {
    let Some(fs) = fs else {
        outln!("noalloc error: nvme0n1 holds no usable dxfs");
        nvme::power_off(power::EXIT_TEST_FAILED);
    };
    let file = match pick_file(&fs, None) {
        Ok(f) => f,
        Err(e) => {
            outln!("noalloc error: {e}");
            nvme::power_off(power::EXIT_TEST_FAILED);
        }
    };
    let cpus = smp::cpu_count();
    let Some(mut bufs) = DmaBuf::new(cpus * 32 * 4096) else {
        outln!("noalloc error: out of memory");
        nvme::power_off(power::EXIT_TEST_FAILED);
    };
    let base = bufs.part(0, 4096).addr();
    let irq = nvme::mode() == Mode::Irq;
    let n = NOALLOC_READS;
    let mut ok = true;
    // Every core at once, each on its own queue: the simple half on all of
    // them, then the control on all of them (the heap counters are global,
    // so no core's generic reads can fall in another's simple half). With
    // fewer queues than cores, the cores that own one.
    let active = cpus.min(nvme::queue_count(0)).max(1);
    if active < cpus {
        outln!("noalloc on {active} of {cpus} cores: the controller granted {active} queue(s)");
    }
    for target in [Target::Simple, Target::Generic] {
        let states: Vec<PerCore<alloc::boxed::Box<State>>> = (0..cpus)
            .map(|_| CachePadded::new(spin::Mutex::new(State::new())))
            .collect();
        let step = Step::new(cpus);
        let rows = smp::on_each_cpu(|cpu| {
            if cpu >= active {
                step.sit_out();
                return None;
            }
            let mut state = states[cpu].lock();
            let mut load = Load {
                state: &mut state,
                step: Some(&step),
                target,
                op: Op::Read,
                file: &file,
                file_blocks: file.size() / 4096,
                raw: RawSpan {
                    first: 0,
                    blocks: 1,
                },
                bufs: base + cpu * 32 * 4096,
                rng: Rng::new(42 ^ cpu as u64),
            };
            let s0 = nvme::with_engine(0, |e| e.stats()).unwrap_or_default();
            let row = run(&mut nvme_with(0), irq, &mut load, 32, Limit::Ios(n));
            let s1 = nvme::with_engine(0, |e| e.stats()).unwrap_or_default();
            Some((row, s0, s1))
        });
        for (cpu, (row, s0, s1)) in rows
            .iter()
            .enumerate()
            .filter_map(|(c, r)| Some((c, r.as_ref()?)))
        {
            let (simple, generic, fell_back) = (
                s1.simple - s0.simple,
                s1.generic - s0.generic,
                s1.fell_back - s0.fell_back,
            );
            let sound = row.ios == n && row.errors == 0 && fell_back == 0;
            ok &= match target {
                // Every read on the simple path, and not one allocation.
                Target::Simple => sound && simple == n && row.allocs == 0 && row.frees == 0,
                // The control: every read on the generic path, and counted.
                _ => sound && generic == n && row.allocs > 0 && row.frees > 0,
            };
            outln!(
                "noalloc {} reads={} simple_path={} generic_path={} fell_back={} errors={} allocs={} frees={} allocs_per_io={:.2} cycles_per_io={} cpu={}",
                target.name(),
                row.ios,
                simple,
                generic,
                fell_back,
                row.errors,
                row.allocs,
                row.frees,
                row.allocs as f64 / row.ios.max(1) as f64,
                row.cycles / row.ios.max(1),
                cpu
            );
        }
    }
    if ok {
        outln!("noalloc ok");
        nvme::power_off(power::EXIT_OK)
    }
    outln!("noalloc failed");
    nvme::power_off(power::EXIT_TEST_FAILED)
}
