//! Cost of one 4 KiB NBD read on a real CPU: the whole request path the
//! kernel runs — smoltcp (TCP/IP), the NBD service (`dioxide-service`:
//! connections, decoding, budgets, replies), the DIO engine, dxfs's extent
//! map and the NVMe driver — on the host, against the instant controller
//! model ([`crate::instant_engine`]) and an in-memory frame device with a
//! client on its other end ([`dioxide_service::loopback`]: a second
//! smoltcp stack and a sans-IO NBD client asking for structured replies,
//! as libnbd does).
//!
//! Per target (`file`: a dxfs file, `raw`: the namespace, `null`: zeros
//! without the device) and queue depth it reports the server's TSC cycles
//! and ns per read (its stack and service loop; the client's work is not
//! counted), heap allocations per read (everything on the thread, client
//! included), frames per read, and the cycles by phase:
//!
//! - `receive`: smoltcp processing received frames (inside the device's
//!   receive token: Ethernet, IP, TCP, into the socket);
//! - `decode`: socket input into the connections and NBD decoding;
//! - `submit`: budgets, buffer, dxfs mapping, DIO engine, NVMe submission;
//! - `complete`: reaping the queue and delivering results;
//! - `reply`: reply headers and data into the sockets;
//! - `transmit`: smoltcp building frames (inside the transmit token) and
//!   the service's output and stall checks;
//! - `stack`: the rest of the stack's polls (timers, socket scans).
//!
//! Each row warms up (a tenth of its reads, at least 16 per read in flight) on
//! the same connection first. Every reply's data is checked (4 KiB of zeros:
//! [`zero_sum`]); a read that fails, comes back short or with other bytes
//! fails the run.
//!
//! [`run_threads`] runs the same rows on T threads side by side, each
//! thread pinned to a CPU and with everything of its own — export table,
//! engine, controller and instant model, loopback wire, both smoltcp
//! stacks, NBD client, [`Server`] — as each core of the appliance has its
//! own stack and queues: per-request cycles (mean and slowest thread), the
//! requests all threads completed per second and its ratio to one thread,
//! allocations per request (each thread's own counter) beside the set-up's
//! count. Nothing on the request path is shared between the threads: the
//! `Rc`/`RefCell`s (wire, platform, instant model) and the simulated
//! controller's atomics are each thread's own, the allocation counter is a
//! thread-local, and what all threads read (the TSC calibration, the
//! expected sum) is written once before the measured rounds.

use crate::{bench_file, instant_engine, rdtsc, thread_cpu_ns, BenchMmio};
use dioxide_iomap::BlockQueue;
use dioxide_nbd::client::{fnv1a, FNV_START};
use dioxide_nvme::blk::NvmeQueue;
use dioxide_nvme::sim::SimHal;
use dioxide_service::loopback::{Figures, Link, LoopError, Loopback, OneEngine, ServerSide};
use dioxide_service::{DiskLimits, Server, Table};
use std::sync::{Barrier, OnceLock};
use std::time::Instant;

/// The TSC against the system clock, measured once: a TSC reading and
/// nanoseconds per cycle.
fn calibration() -> (u64, f64) {
    static CAL: OnceLock<(u64, f64)> = OnceLock::new();
    *CAL.get_or_init(|| {
        let (t0, c0) = (Instant::now(), rdtsc());
        std::thread::sleep(std::time::Duration::from_millis(20));
        let (t1, c1) = (Instant::now(), rdtsc());
        (c0, (t1 - t0).as_nanos() as f64 / (c1 - c0).max(1) as f64)
    })
}

/// Nanoseconds from the TSC (as the kernel's clock is), calibrated once
/// against the system clock: `Instant::now` on every poll would cost a
/// system clock read, which the kernel does not pay.
fn now_ns() -> u64 {
    let (c0, ns_per_cycle) = calibration();
    ((rdtsc() - c0) as f64 * ns_per_cycle) as u64
}

fn ns_per_cycle() -> f64 {
    calibration().1
}

/// One row: a target at a queue depth.
#[derive(Clone, Debug)]
pub struct NbdRow {
    pub target: &'static str,
    pub qd: usize,
    /// What the wire offered: transmit checksum offload (virtio-net's
    /// VIRTIO_NET_F_CSUM: smoltcp computes no TCP checksums) and the MTU.
    pub link: Link,
    pub reads: u64,
    pub cycles_per_io: f64,
    pub ns_per_io: f64,
    pub allocs_per_io: f64,
    /// Allocations the same counter saw while the row was set up (engine,
    /// loopback, server, connection, warm-up): the control that shows it
    /// counts, beside an `allocs_per_io` of 0.
    pub setup_allocs: u64,
    pub frames_sent_per_io: f64,
    pub frames_received_per_io: f64,
    /// (phase, cycles per read), in the order of the module doc.
    pub phases: Vec<(&'static str, f64)>,
}

/// Threads a run may have (as `--threads` takes them).
pub const MAX_THREADS: usize = 64;

/// The exports of thread `i`: the bench file, the namespace raw, null
/// (made once per thread index, as the kernel makes its table once; each
/// thread of a threaded run reads its own).
fn table(i: usize) -> &'static Table {
    static T: [OnceLock<&'static Table>; MAX_THREADS] = [const { OnceLock::new() }; MAX_THREADS];
    T[i].get_or_init(|| {
        let file = bench_file();
        let mut t = Table::new();
        let bs = file.block_size();
        t.add_file("bench.bin".into(), file, bs, 0, 4096);
        t.add_raw("nvme0n1".into(), 20_000 * 4096, 0, 4096);
        t.add_null(64 << 20);
        Box::leak(Box::new(t))
    })
}

/// The sum every reply's data must have: 4 KiB of zeros. The instant
/// model moves no data, so a read's DMA buffer keeps the zeros it was
/// made with, and the null export answers zeros: a reply with other bytes
/// (or fewer) was garbled on its way through the service and the stacks.
fn zero_sum(_offset: u64) -> u64 {
    static S: OnceLock<u64> = OnceLock::new();
    *S.get_or_init(|| fnv1a(FNV_START, &[0u8; 4096]))
}

/// Runs `reads` reads (and a tenth as warm-up) of each target at each
/// queue depth over each of `links`, each row on a fresh server and
/// connection.
pub fn run(
    reads: u64,
    targets: &[&'static str],
    qds: &[usize],
    links: &[Link],
) -> Result<Vec<NbdRow>, String> {
    let mut rows = Vec::new();
    for (target, qd, link) in combos(targets, qds, links) {
        rows.push(row(target, qd, link, reads)?);
    }
    Ok(rows)
}

/// Every (target, queue depth, link) of a run, in the order of its rows.
fn combos(
    targets: &[&'static str],
    qds: &[usize],
    links: &[Link],
) -> Vec<(&'static str, usize, Link)> {
    let mut v = Vec::new();
    for &link in links {
        for &target in targets {
            for &qd in qds {
                v.push((target, qd, link));
            }
        }
    }
    v
}

type BenchServer = Server<OneEngine<NvmeQueue<SimHal, BenchMmio>>>;

/// A row's connection, set up and warmed up: everything of its own
/// (engine, controller and instant model, loopback, client, server).
struct Session {
    side: ServerSide,
    lb: Loopback,
    server: BenchServer,
    /// Allocations the thread's counter saw while it was set up.
    setup_allocs: u64,
}

/// What one measured round took on its thread.
struct Round {
    figures: Figures,
    allocs: u64,
    /// The thread's CPU time over the round (server and client).
    cpu_ns: u64,
    start: Instant,
    end: Instant,
}

fn export(target: &str) -> Result<&'static str, String> {
    match target {
        "file" => Ok("bench.bin"),
        "raw" => Ok("nvme0n1"),
        "null" => Ok("null"),
        t => Err(format!("unknown target {t:?} (file, raw, null)")),
    }
}

impl Session {
    /// Engine, loopback, server, connection and warm-up for `target` at
    /// `qd` over `link`, serving from `table`; every reply's data checked
    /// against `sum` (the sum of the 4 KiB at an offset: [`zero_sum`]).
    fn new(
        target: &'static str,
        qd: usize,
        link: Link,
        reads: u64,
        table: &'static Table,
        sum: fn(u64) -> u64,
    ) -> Result<Session, String> {
        let export = export(target)?;
        let s0 = dioxide_testkit::thread_allocs();
        let engine = instant_engine(0);
        let depth = engine.queue().depth();
        let p = OneEngine::new(engine, now_ns, rdtsc);
        let (mut side, mut lb) = Loopback::new(export, true, qd, now_ns, rdtsc, link);
        lb.check(sum);
        let disks = [DiskLimits {
            depth,
            max_transfer: 512 * 1024,
            lbs: 4096,
        }];
        let mut server = Server::new(p, &mut side.sockets, table, &disks, u64::MAX);
        let fail = |e: LoopError| format!("{target} qd {qd}: {e}");
        lb.connect(&mut side, &mut server).map_err(fail)?;
        // Warm-up: the pools and connection buffers reach the sizes this
        // depth needs (they keep them).
        let warm = lb
            .run(&mut side, &mut server, (reads / 10).max(16 * qd as u64), qd)
            .map_err(fail)?;
        failed(target, qd, &warm)?;
        Ok(Session {
            side,
            lb,
            server,
            setup_allocs: dioxide_testkit::thread_allocs() - s0,
        })
    }

    /// The measured round: `reads` reads with `qd` in flight.
    fn measure(&mut self, reads: u64, qd: usize) -> Result<Round, LoopError> {
        let a0 = dioxide_testkit::thread_allocs();
        // The CPU time is read inside the wall-clock span.
        let start = Instant::now();
        let cpu0 = thread_cpu_ns();
        let figures = self.lb.run(&mut self.side, &mut self.server, reads, qd)?;
        let cpu_ns = thread_cpu_ns() - cpu0;
        let end = Instant::now();
        let allocs = dioxide_testkit::thread_allocs() - a0;
        Ok(Round {
            figures,
            allocs,
            cpu_ns,
            start,
            end,
        })
    }

    /// Closes the client's side and lets the server drop the connection.
    fn close(mut self) {
        self.lb.close(&mut self.side, &mut self.server);
    }
}

/// An error naming the reads that failed (error, short, other data), if any.
fn failed(target: &str, qd: usize, f: &Figures) -> Result<(), String> {
    if f.failed > 0 {
        return Err(format!(
            "{target} qd {qd}: {} of {} reads failed",
            f.failed, f.reads
        ));
    }
    Ok(())
}

fn row(target: &'static str, qd: usize, link: Link, reads: u64) -> Result<NbdRow, String> {
    let mut s = Session::new(target, qd, link, reads, table(0), zero_sum)?;
    let r = s
        .measure(reads, qd)
        .map_err(|e| format!("{target} qd {qd}: {e}"))?;
    let setup_allocs = s.setup_allocs;
    s.close();
    failed(target, qd, &r.figures)?;
    let f = r.figures;
    let n = f.reads.max(1) as f64;
    let p = f.profile;
    let (rx, tx) = (f.frames.process, f.frames.build);
    let stack = p.net.saturating_sub(rx + tx);
    let per = |c: u64| c as f64 / n;
    Ok(NbdRow {
        target,
        qd,
        link,
        reads: f.reads,
        cycles_per_io: per(f.cycles),
        ns_per_io: f.ns as f64 / n,
        allocs_per_io: r.allocs as f64 / n,
        setup_allocs,
        frames_sent_per_io: f.frames.sent as f64 / n,
        frames_received_per_io: f.frames.received as f64 / n,
        phases: vec![
            ("receive", per(rx)),
            ("decode", per(p.decode)),
            ("submit", per(p.submit)),
            ("complete", per(p.complete)),
            ("reply", per(p.reply)),
            ("transmit", per(tx + p.send)),
            ("stack", per(stack)),
        ],
    })
}

impl NbdRow {
    pub fn json(&self) -> String {
        let mut s = format!(
            "{{\"target\": \"{}\", \"qd\": {}, \"csum_offload\": {}, \"mtu\": {}, \"tso\": {}, \"reads\": {}, \"cycles_per_io\": {:.1}, \"ns_per_io\": {:.1}, \"allocs_per_io\": {:.4}, \"setup_allocs\": {}, \"frames_sent_per_io\": {:.2}, \"frames_received_per_io\": {:.2}",
            self.target, self.qd, self.link.csum, self.link.mtu, self.link.tso, self.reads, self.cycles_per_io, self.ns_per_io, self.allocs_per_io, self.setup_allocs,
            self.frames_sent_per_io, self.frames_received_per_io
        );
        for (k, v) in &self.phases {
            s += &format!(", \"{k}_cycles\": {v:.1}");
        }
        s + "}"
    }

    /// The rows as a table.
    pub fn table(rows: &[NbdRow]) -> String {
        let mut s = String::from(
            "host NBD path (real CPU, server side): target qd csum mtu  tso cycles/io  ns/io  allocs/io  frames out/in  | receive decode submit complete reply transmit stack\n",
        );
        for r in rows {
            s += &format!(
                "  {:<6} {:>4} {:<4} {:<4} {:<3} {:>9.0} {:>7.0} {:>9.3} {:>6.2}/{:<5.2} |",
                r.target,
                r.qd,
                if r.link.csum { "on" } else { "off" },
                r.link.mtu,
                if r.link.tso { "on" } else { "off" },
                r.cycles_per_io,
                r.ns_per_io,
                r.allocs_per_io,
                r.frames_sent_per_io,
                r.frames_received_per_io
            );
            for (_, v) in &r.phases {
                s += &format!(" {v:>7.0}");
            }
            s += "\n";
        }
        s
    }
}

/// One (target, queue depth, link) on `threads` threads side by side, each
/// with everything of its own: export table, engine, controller and instant
/// model, loopback wire, both stacks, client and [`Server`] (the per-core
/// design: nothing shared on the request path). Each thread is pinned to a
/// CPU of those this process may use, in turn; the measured rounds start
/// together (behind a barrier) and no thread sets up its next row before
/// all finished this one.
#[derive(Clone, Debug)]
pub struct NbdThreadsRow {
    pub threads: usize,
    pub target: &'static str,
    pub qd: usize,
    pub link: Link,
    /// Reads per thread in the measured round.
    pub reads: u64,
    /// The server's TSC cycles per read ([`NbdRow::cycles_per_io`]), mean
    /// over threads.
    pub cycles_per_io: f64,
    /// The same for the slowest thread.
    pub cycles_per_io_max: f64,
    /// The thread's CPU time per read (server and client: all the thread
    /// does), in TSC cycles, mean over threads: unlike the TSC figures it
    /// does not count time the thread waited for a CPU.
    pub cpu_cycles_per_io: f64,
    pub cpu_cycles_per_io_max: f64,
    /// All threads' reads over the wall-clock time from the first thread's
    /// start to the last one's end (client and server: the loopback's
    /// throughput).
    pub iops: f64,
    /// `iops` over the 1-thread row's of the same target, depth and link,
    /// when the run had one.
    pub iops_ratio: Option<f64>,
    /// The CPUs the threads had: their CPU time together over that wall
    /// clock. Below the thread count, other work took CPUs from them (or
    /// they shared CPUs): `iops` then cannot scale with threads.
    pub cpus_busy: f64,
    /// Allocations per read of the thread with the most (each thread's
    /// own counter, client included).
    pub allocs_per_io: f64,
    /// Allocations the thread with the fewest counted while its session was
    /// set up: the control beside `allocs_per_io`.
    pub setup_allocs: u64,
    /// The CPU each thread was pinned to (empty: pinning failed).
    pub cpus: Vec<usize>,
}

/// Runs every (target, queue depth, link) on T threads side by side for
/// each T of `counts` (`reads` reads per thread and row, after a warm-up of
/// a tenth): one [`NbdThreadsRow`] per count and combination, in that
/// order. Fails if any read failed on any thread.
pub fn run_threads(
    reads: u64,
    targets: &[&'static str],
    qds: &[usize],
    links: &[Link],
    counts: &[usize],
) -> Result<Vec<NbdThreadsRow>, String> {
    run_threads_checked(reads, targets, qds, links, counts, zero_sum)
}

/// As [`run_threads`], every reply checked against `sum` instead of
/// [`zero_sum`]: how the tests show that the check fails a run.
#[doc(hidden)]
pub fn run_threads_checked(
    reads: u64,
    targets: &[&'static str],
    qds: &[usize],
    links: &[Link],
    counts: &[usize],
    sum: fn(u64) -> u64,
) -> Result<Vec<NbdThreadsRow>, String> {
    let combos = combos(targets, qds, links);
    for &(t, _, _) in &combos {
        export(t)?;
    }
    let mut rows = Vec::new();
    for &threads in counts {
        rows.extend(threads_rows(
            reads,
            &combos,
            threads.clamp(1, MAX_THREADS),
            sum,
        )?);
    }
    let base: Vec<(&'static str, usize, Link, f64)> = rows
        .iter()
        .filter(|r| r.threads == 1)
        .map(|r| (r.target, r.qd, r.link, r.iops))
        .collect();
    for r in &mut rows {
        r.iops_ratio = base
            .iter()
            .find(|b| (b.0, b.1, b.2) == (r.target, r.qd, r.link))
            .filter(|b| b.3 > 0.0)
            .map(|b| r.iops / b.3);
    }
    Ok(rows)
}

/// What one thread measured of one row.
struct ThreadRound {
    round: Round,
    setup_allocs: u64,
}

/// What one thread of a threaded run did: the CPU it was pinned to, and
/// each row's round.
struct ThreadRows {
    pinned: Option<usize>,
    rounds: Vec<Result<ThreadRound, String>>,
}

/// Every combination on `threads` threads at once.
fn threads_rows(
    reads: u64,
    combos: &[(&'static str, usize, Link)],
    threads: usize,
    sum: fn(u64) -> u64,
) -> Result<Vec<NbdThreadsRow>, String> {
    let allowed = crate::allowed_cpus();
    let barrier = Barrier::new(threads);
    let outs: Vec<ThreadRows> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|i| {
                let cpu = (!allowed.is_empty()).then(|| allowed[i % allowed.len()]);
                let barrier = &barrier;
                s.spawn(move || {
                    let pinned = cpu.filter(|&c| crate::pin_to(c));
                    let table = table(i);
                    let rounds = combos
                        .iter()
                        .map(|&(target, qd, link)| {
                            one_thread_row(target, qd, link, reads, table, sum, barrier)
                        })
                        .collect();
                    ThreadRows { pinned, rounds }
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .map_err(|_| "an NBD benchmark thread panicked".to_string())
            })
            .collect::<Result<_, _>>()
    })?;
    let cycles_per_ns = 1.0 / ns_per_cycle();
    let cpus: Vec<usize> = outs.iter().filter_map(|o| o.pinned).collect();
    let cpus = if cpus.len() == threads {
        cpus
    } else {
        Vec::new()
    };
    let mut rows = Vec::new();
    for (k, &(target, qd, link)) in combos.iter().enumerate() {
        let mut per = Vec::new();
        for o in &outs {
            match &o.rounds[k] {
                Ok(r) => per.push(r),
                Err(e) => return Err(format!("{threads} threads: {e}")),
            }
        }
        let n = threads as f64;
        let io = |r: &ThreadRound| r.round.figures.reads.max(1) as f64;
        let cycles: Vec<f64> = per
            .iter()
            .map(|r| r.round.figures.cycles as f64 / io(r))
            .collect();
        let cpu: Vec<f64> = per
            .iter()
            .map(|r| r.round.cpu_ns as f64 * cycles_per_ns / io(r))
            .collect();
        let start = per.iter().map(|r| r.round.start).min();
        let end = per.iter().map(|r| r.round.end).max();
        let wall = match (start, end) {
            (Some(s), Some(e)) => (e - s).as_secs_f64(),
            _ => 0.0,
        };
        let total: u64 = per.iter().map(|r| r.round.figures.reads).sum();
        let cpu_ns: u64 = per.iter().map(|r| r.round.cpu_ns).sum();
        rows.push(NbdThreadsRow {
            threads,
            target,
            qd,
            link,
            reads,
            cycles_per_io: cycles.iter().sum::<f64>() / n,
            cycles_per_io_max: cycles.iter().copied().fold(0.0, f64::max),
            cpu_cycles_per_io: cpu.iter().sum::<f64>() / n,
            cpu_cycles_per_io_max: cpu.iter().copied().fold(0.0, f64::max),
            iops: if wall > 0.0 { total as f64 / wall } else { 0.0 },
            iops_ratio: None,
            cpus_busy: if wall > 0.0 {
                cpu_ns as f64 / 1e9 / wall
            } else {
                0.0
            },
            allocs_per_io: per
                .iter()
                .map(|r| r.round.allocs as f64 / io(r))
                .fold(0.0, f64::max),
            setup_allocs: per.iter().map(|r| r.setup_allocs).min().unwrap_or(0),
            cpus: cpus.clone(),
        });
    }
    Ok(rows)
}

/// One row on this thread of a threaded run. Every thread waits at the
/// barrier twice per row whatever happens (a failed set-up too), so that
/// no thread leaves the others waiting: before the measured round, and
/// after it (before the next row's set-up).
fn one_thread_row(
    target: &'static str,
    qd: usize,
    link: Link,
    reads: u64,
    table: &'static Table,
    sum: fn(u64) -> u64,
    barrier: &Barrier,
) -> Result<ThreadRound, String> {
    let session = Session::new(target, qd, link, reads, table, sum);
    barrier.wait();
    let measured = session.and_then(|mut s| {
        let r = s.measure(reads, qd);
        let setup_allocs = s.setup_allocs;
        s.close();
        r.map(|round| ThreadRound {
            round,
            setup_allocs,
        })
        .map_err(|e| format!("{target} qd {qd}: {e}"))
    });
    barrier.wait();
    let r = measured?;
    failed(target, qd, &r.round.figures)?;
    Ok(r)
}

impl NbdThreadsRow {
    pub fn json(&self) -> String {
        let ratio = self
            .iops_ratio
            .map_or("null".to_string(), |r| format!("{r:.3}"));
        let cpus: Vec<String> = self.cpus.iter().map(usize::to_string).collect();
        format!(
            "{{\"threads\": {}, \"target\": \"{}\", \"qd\": {}, \"csum_offload\": {}, \"mtu\": {}, \"tso\": {}, \"reads\": {}, \"cycles_per_io\": {:.1}, \"cycles_per_io_max\": {:.1}, \"cpu_cycles_per_io\": {:.1}, \"cpu_cycles_per_io_max\": {:.1}, \"iops\": {:.0}, \"iops_ratio\": {}, \"cpus_busy\": {:.2}, \"allocs_per_io\": {:.4}, \"setup_allocs\": {}, \"cpus\": [{}]}}",
            self.threads,
            self.target,
            self.qd,
            self.link.csum,
            self.link.mtu,
            self.link.tso,
            self.reads,
            self.cycles_per_io,
            self.cycles_per_io_max,
            self.cpu_cycles_per_io,
            self.cpu_cycles_per_io_max,
            self.iops,
            ratio,
            self.cpus_busy,
            self.allocs_per_io,
            self.setup_allocs,
            cpus.join(", ")
        )
    }

    /// The rows as a table, under a line naming the CPUs: `online` on the
    /// machine, `allowed` to this process. Rows with more threads than
    /// CPUs are marked: threads that share a CPU do not scale.
    pub fn table(rows: &[NbdThreadsRow], online: usize, allowed: &[usize]) -> String {
        let list: Vec<String> = allowed.iter().map(usize::to_string).collect();
        let mut s = format!(
            "host NBD path on threads side by side (each its own table, engine, model, loopback, stacks, client and server; pinned to CPUs in turn): {online} CPUs online, {} allowed ({})\n",
            allowed.len(),
            list.join(",")
        );
        s += "  threads target   qd csum mtu  tso  cycles/io: mean  slowest | CPU cycles/io: mean slowest | requests/s (all)  x 1 thread  CPUs busy  allocs/io  setup allocs\n";
        for r in rows {
            let ratio = r.iops_ratio.map_or("-".to_string(), |x| format!("{x:.2}"));
            s += &format!(
                "  {:>7} {:<6} {:>4} {:<4} {:<4} {:<3} {:>10.0} {:>8.0} | {:>13.0} {:>7.0} | {:>17.0} {:>11} {:>10.2} {:>10.3} {:>13}",
                r.threads,
                r.target,
                r.qd,
                if r.link.csum { "on" } else { "off" },
                r.link.mtu,
                if r.link.tso { "on" } else { "off" },
                r.cycles_per_io,
                r.cycles_per_io_max,
                r.cpu_cycles_per_io,
                r.cpu_cycles_per_io_max,
                r.iops,
                ratio,
                r.cpus_busy,
                r.allocs_per_io,
                r.setup_allocs
            );
            if !allowed.is_empty() && r.threads > allowed.len() {
                s += &format!(
                    "  ({} threads on {} CPUs: they share CPUs, no scaling expected)",
                    r.threads,
                    allowed.len()
                );
            }
            s += "\n";
        }
        s
    }
}
