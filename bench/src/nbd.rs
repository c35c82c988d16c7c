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
//! the same connection first.

use crate::{bench_file, instant_engine, rdtsc};
use dioxide_iomap::BlockQueue;
use dioxide_service::loopback::{Link, Loopback, OneEngine};
use dioxide_service::{DiskLimits, Server, Table};
use std::sync::OnceLock;
use std::time::Instant;

/// Nanoseconds from the TSC (as the kernel's clock is), calibrated once
/// against the system clock: `Instant::now` on every poll would cost a
/// system clock read, which the kernel does not pay.
fn now_ns() -> u64 {
    static CAL: OnceLock<(u64, f64)> = OnceLock::new();
    let (c0, ns_per_cycle) = *CAL.get_or_init(|| {
        let (t0, c0) = (Instant::now(), rdtsc());
        std::thread::sleep(std::time::Duration::from_millis(20));
        let (t1, c1) = (Instant::now(), rdtsc());
        (c0, (t1 - t0).as_nanos() as f64 / (c1 - c0).max(1) as f64)
    });
    ((rdtsc() - c0) as f64 * ns_per_cycle) as u64
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

/// The exports: the bench file, the namespace raw, null (made once, as
/// the kernel's table is).
fn table() -> &'static Table {
    static T: OnceLock<&'static Table> = OnceLock::new();
    T.get_or_init(|| {
        let file = bench_file();
        let mut t = Table::new();
        let bs = file.block_size();
        t.add_file("bench.bin".into(), file, bs, 0, 4096);
        t.add_raw("nvme0n1".into(), 20_000 * 4096, 0, 4096);
        t.add_null(64 << 20);
        Box::leak(Box::new(t))
    })
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
    for &link in links {
        for &target in targets {
            for &qd in qds {
                rows.push(row(target, qd, link, reads)?);
            }
        }
    }
    Ok(rows)
}

fn row(target: &'static str, qd: usize, link: Link, reads: u64) -> Result<NbdRow, String> {
    let export = match target {
        "file" => "bench.bin",
        "raw" => "nvme0n1",
        "null" => "null",
        t => return Err(format!("unknown target {t:?} (file, raw, null)")),
    };
    let s0 = dioxide_testkit::thread_allocs();
    let engine = instant_engine(0);
    let depth = engine.queue().depth();
    let p = OneEngine::new(engine, now_ns, rdtsc);
    let (mut side, mut lb) = Loopback::new(export, true, qd, now_ns, rdtsc, link);
    let disks = [DiskLimits {
        depth,
        max_transfer: 512 * 1024,
        lbs: 4096,
    }];
    let mut server = Server::new(p, &mut side.sockets, table(), &disks, u64::MAX);
    let fail = |e: dioxide_service::loopback::LoopError| format!("{target} qd {qd}: {e}");
    lb.connect(&mut side, &mut server).map_err(fail)?;
    // Warm-up: the pools and connection buffers reach the sizes this depth
    // needs (they keep them).
    lb.run(&mut side, &mut server, (reads / 10).max(16 * qd as u64), qd)
        .map_err(fail)?;
    let a0 = dioxide_testkit::thread_allocs();
    let setup_allocs = a0 - s0;
    let f = lb.run(&mut side, &mut server, reads, qd).map_err(fail)?;
    let allocs = dioxide_testkit::thread_allocs() - a0;
    lb.close(&mut side, &mut server);
    if f.failed > 0 {
        return Err(format!(
            "{target} qd {qd}: {} of {} reads failed",
            f.failed, f.reads
        ));
    }
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
        allocs_per_io: allocs as f64 / n,
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
