//! `selftest=nbd-noalloc`: the NBD service serves 100,000 4 KiB reads of a
//! file with the heap counters unchanged — the same service code as on
//! the network (`dioxide-service`), over its loopback wire to a client
//! inside the guest (a second smoltcp stack and a sans-IO NBD client,
//! asking for structured replies as libnbd does), reading through dxfs,
//! the DIO engine's simple path and this machine's NVMe queue. The heap
//! counters are global, so the client's work is counted too: the whole
//! round trip allocates nothing per read.
//!
//! Then the same for the raw namespace and the null export (10,000 reads
//! each). One line per target:
//! `nbd-noalloc target=file export=NAME reads=100000 qd=16 errors=0 allocs=0 frees=0 cycles_per_io=N frames_sent_per_io=F frames_received_per_io=F`,
//! then `nbd-noalloc ok` (exit 0) or `nbd-noalloc failed` (exit 1).

use crate::block::disk::Mounted;
use crate::drivers::nvme;
use crate::net::nbd::{self, KernelPlatform};
use crate::platform::{power, time};
use crate::{mm, outln};
use dioxide_service::loopback::{Link, Loopback};
use dioxide_service::{Server, Table, STALL_NS};

/// Reads of the file export (the raw and null exports get a tenth).
pub const READS: u64 = 100_000;
const QD: usize = 16;

pub fn noalloc(mounts: &[Mounted]) -> ! {
    let table: &'static Table =
        alloc::boxed::Box::leak(alloc::boxed::Box::new(nbd::exports(mounts, true)));
    // The largest file of nvme0n1, the namespace, null.
    let file = table
        .files()
        .filter(|&(_, size, disk)| disk == 0 && size >= 4096)
        .max_by_key(|&(_, size, _)| size)
        .map(|(name, _, _)| name);
    let Some(file) = file else {
        outln!("nbd-noalloc error: nvme0n1 holds no dxfs file of at least 4 KiB");
        nvme::power_off(power::EXIT_TEST_FAILED);
    };
    let raw = nvme::disks()
        .first()
        .map(|d| d.name.as_str())
        .unwrap_or("nvme0n1");
    let mut ok = true;
    for (target, export, reads) in [
        ("file", file, READS),
        ("raw", raw, READS / 10),
        ("null", "null", READS / 10),
    ] {
        ok &= one(table, target, export, reads);
    }
    if ok {
        outln!("nbd-noalloc ok");
        nvme::power_off(power::EXIT_OK)
    }
    outln!("nbd-noalloc failed");
    nvme::power_off(power::EXIT_TEST_FAILED)
}

/// `reads` reads of `export` after a warm-up, on a server and connection
/// of their own; whether they all succeeded without a heap operation.
fn one(table: &'static Table, target: &str, export: &str, reads: u64) -> bool {
    let (mut side, mut lb) =
        Loopback::new(export, true, QD, time::now_ns, time::rdtsc, Link::default());
    let mut server = Server::new(
        KernelPlatform,
        &mut side.sockets,
        table,
        &nbd::disk_limits(),
        STALL_NS,
    );
    let run = |lb: &mut Loopback, side: &mut _, server: &mut _, n| {
        lb.run(side, server, n, QD)
            .map_err(|e| alloc::format!("{e}"))
    };
    let r = lb
        .connect(&mut side, &mut server)
        .map_err(|e| alloc::format!("{e}"))
        // Warm-up: buffers pooled, connection buffers at their size.
        .and_then(|_| run(&mut lb, &mut side, &mut server, 2 * QD as u64 * 16));
    if let Err(e) = r {
        outln!("nbd-noalloc error: {target} ({export}): {e}");
        return false;
    }
    let h0 = mm::heap::stats();
    let r = run(&mut lb, &mut side, &mut server, reads);
    let h1 = mm::heap::stats();
    lb.close(&mut side, &mut server);
    let f = match r {
        Ok(f) => f,
        Err(e) => {
            outln!("nbd-noalloc error: {target} ({export}): {e}");
            return false;
        }
    };
    let (allocs, frees) = (h1.allocs - h0.allocs, h1.frees - h0.frees);
    let n = f.reads.max(1);
    outln!(
        "nbd-noalloc target={target} export={export} reads={} qd={QD} errors={} allocs={allocs} frees={frees} cycles_per_io={} frames_sent_per_io={:.2} frames_received_per_io={:.2}",
        f.reads,
        f.failed,
        f.cycles / n,
        f.frames.sent as f64 / n as f64,
        f.frames.received as f64 / n as f64,
    );
    f.reads == reads && f.failed == 0 && allocs == 0 && frees == 0
}
