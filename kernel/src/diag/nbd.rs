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
//! each). Every reply's data is checked against a sum per 4 KiB block
//! computed before from another path (the file through the DIO generic
//! path in 1 MiB reads, the namespace through raw NVMe commands, zeroes for
//! null): a wrong byte counts as an error. The file's reads must all take
//! the simple path (the engine's counters). One line per target:
//! `nbd-noalloc target=file export=NAME reads=100000 qd=16 errors=0 allocs=0 frees=0 cycles_per_io=N frames_sent_per_io=F frames_received_per_io=F simple_path=N`,
//! then the control, which must count allocations: the file again with the
//! simple path off, each read allocating its generic dio object,
//! `nbd-noalloc control target=file simple=0 reads=N errors=0 allocs=A frees=F`
//! (A >= N), then `nbd-noalloc ok` (exit 0) or `nbd-noalloc failed` (exit 1).
//!
//! A target whose client gives up (an error, a stuck wire) leaves its
//! server behind, leaked: reads still in flight keep their DMA buffers,
//! which the NVMe controller may still fill.

use crate::block::disk::Mounted;
use crate::drivers::nvme::{self, DmaBuf};
use crate::net::nbd::{self, KernelPlatform};
use crate::platform::{power, time};
use crate::{mm, outln};
use alloc::string::String;
use alloc::vec::Vec;
use dioxide_iomap::{DioError, DioRequest, DioResult, Kiocb, Op};
use dioxide_nbd::client::{fnv1a, FNV_START};
use dioxide_service::loopback::{Link, LoopError, Loopback, ServerSide};
use dioxide_service::{Server, Table, STALL_NS};

/// Reads of the file export (the raw and null exports get a tenth).
pub const READS: u64 = 100_000;
/// Reads of the control run (simple path off).
const CONTROL_READS: u64 = 2_000;
const QD: usize = 16;
/// Bytes per reference read.
const CHUNK: usize = 1 << 20;

/// The sum of each 4 KiB block of the target being read
/// ([`Loopback::check`] takes a plain function).
/// With one sum only, every block has it (null).
static SUMS: spin::Mutex<Vec<u64>> = spin::Mutex::new(Vec::new());

fn expected(off: u64) -> u64 {
    let sums = SUMS.lock();
    match sums.len() {
        1 => sums[0],
        _ => sums.get((off / 4096) as usize).copied().unwrap_or(0),
    }
}

/// Fills [`SUMS`] with the sums of `blocks` 4 KiB blocks, `read(off, buf)`
/// giving the `chunk` bytes at `off` (fewer at the end).
fn reference(
    blocks: u64,
    chunk: usize,
    mut read: impl FnMut(u64, &mut DmaBuf) -> Result<(), String>,
) -> Result<(), String> {
    let mut buf = DmaBuf::new(CHUNK).ok_or_else(|| String::from("no memory"))?;
    let mut sums = Vec::with_capacity(blocks as usize);
    let mut off = 0u64;
    while (sums.len() as u64) < blocks {
        read(off, &mut buf)?;
        for b in buf.as_slice()[..chunk].chunks_exact(4096) {
            if sums.len() as u64 == blocks {
                break;
            }
            sums.push(fnv1a(FNV_START, b));
        }
        off += chunk as u64;
    }
    *SUMS.lock() = sums;
    Ok(())
}

/// The sums of file `export` of `mounts`' nvme0n1, read through the DIO
/// engine's generic path (1 MiB requests never take the simple one).
fn file_reference(mounts: &[Mounted], export: &str) -> Result<(), String> {
    let m = mounts
        .iter()
        .find(|m| m.disk == 0)
        .ok_or_else(|| String::from("nvme0n1 holds no filesystem"))?;
    let scan = m.fs.scan().map_err(|e| alloc::format!("{e}"))?;
    let (_, f) = scan
        .files()
        .find(|(path, _)| path.trim_start_matches('/') == export)
        .ok_or_else(|| alloc::format!("no file {export}"))?;
    let size = f.size();
    reference(size / 4096, CHUNK, |off, buf| {
        let want = (size - off).min(CHUNK as u64) as usize;
        let iob = buf.part(0, CHUNK);
        // SAFETY: `buf` is owned here and the call is synchronous.
        let r = nvme::with_engine(0, |e| unsafe {
            e.dio_rw(DioRequest::read(Kiocb::sync(off), iob, f))
        })
        .unwrap_or(Err(DioError::Unsupported("no NVMe engine")));
        match r {
            Ok(DioResult::Done(n)) if n == want => Ok(()),
            Ok(other) => Err(alloc::format!("reference read at {off}: {other:?}")),
            Err(e) => Err(alloc::format!("reference read at {off}: {e}")),
        }
    })
}

/// The sums of namespace nvme0n1, read with raw NVMe commands.
fn raw_reference() -> Result<(), String> {
    let d = nvme::disks()
        .first()
        .ok_or_else(|| String::from("no namespace"))?;
    let (bytes, bs) = (d.bytes(), d.ns.block_size as u64);
    let chunk = CHUNK.min(d.max_transfer) as u64;
    reference(bytes / 4096, chunk as usize, |off, buf| {
        let len = (bytes - off).min(chunk) as usize;
        // SAFETY: `buf` is owned here and the command is waited for.
        unsafe { nvme::execute(0, Op::Read, off / bs, buf.part(0, len)) }
            .map_err(|e| alloc::format!("raw read at {off}: {e}"))
    })
}

/// Sums of zeroes: the null export.
fn null_reference() {
    let zero = fnv1a(FNV_START, &[0u8; 4096]);
    let mut sums = SUMS.lock();
    sums.clear();
    sums.resize(1, zero);
}

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
        let r = match target {
            "file" => file_reference(mounts, export),
            "raw" => raw_reference(),
            _ => {
                null_reference();
                Ok(())
            }
        };
        if let Err(e) = r {
            outln!("nbd-noalloc error: {target} ({export}): {e}");
            ok = false;
            continue;
        }
        ok &= one(table, target, export, reads);
    }
    ok &= control(mounts, table, file);
    if ok {
        outln!("nbd-noalloc ok");
        nvme::power_off(power::EXIT_OK)
    }
    outln!("nbd-noalloc failed");
    nvme::power_off(power::EXIT_TEST_FAILED)
}

/// The control: the file with the simple path off, so that every read
/// allocates its generic dio object; the counters must see them.
fn control(mounts: &[Mounted], table: &'static Table, file: &str) -> bool {
    if let Err(e) = file_reference(mounts, file) {
        outln!("nbd-noalloc error: control: {e}");
        return false;
    }
    let _ = nvme::with_engine(0, |e| e.set_simple(false));
    let r = run_target(table, file, CONTROL_READS);
    let _ = nvme::with_engine(0, |e| e.set_simple(true));
    let Some(r) = r else {
        return false;
    };
    outln!(
        "nbd-noalloc control target=file simple=0 reads={} errors={} allocs={} frees={}",
        r.figures.reads,
        r.figures.failed,
        r.allocs,
        r.frees
    );
    r.figures.reads == CONTROL_READS
        && r.figures.failed == 0
        && r.allocs >= CONTROL_READS
        && r.frees >= CONTROL_READS
}

/// What one measured run gave.
struct Run {
    figures: dioxide_service::loopback::Figures,
    allocs: u64,
    frees: u64,
    /// Reads the engine took on the simple path meanwhile.
    simple: u64,
}

/// `reads` reads of `export` after a warm-up, on a server and connection
/// of their own, every reply checked against [`SUMS`]; whether they all
/// succeeded, without a heap operation (and on the simple path for a
/// file).
fn one(table: &'static Table, target: &str, export: &str, reads: u64) -> bool {
    let Some(r) = run_target(table, export, reads) else {
        return false;
    };
    let (f, allocs, frees) = (&r.figures, r.allocs, r.frees);
    let n = f.reads.max(1);
    outln!(
        "nbd-noalloc target={target} export={export} reads={} qd={QD} errors={} allocs={allocs} frees={frees} cycles_per_io={} frames_sent_per_io={:.2} frames_received_per_io={:.2} simple_path={}",
        f.reads,
        f.failed,
        f.cycles / n,
        f.frames.sent as f64 / n as f64,
        f.frames.received as f64 / n as f64,
        r.simple,
    );
    let simple_ok = target != "file" || r.simple == reads;
    f.reads == reads && f.failed == 0 && allocs == 0 && frees == 0 && simple_ok
}

/// Connects, warms up and measures `reads` checked reads of `export`;
/// `None` (reported) when the client gave up.
fn run_target(table: &'static Table, export: &str, reads: u64) -> Option<Run> {
    let (mut side, mut lb) =
        Loopback::new(export, true, QD, time::now_ns, time::rdtsc, Link::default());
    let mut server = Server::new(
        KernelPlatform,
        &mut side.sockets,
        table,
        &nbd::disk_limits(),
        STALL_NS,
    );
    lb.check(expected);
    let r = lb
        .connect(&mut side, &mut server)
        // Warm-up: buffers pooled, connection buffers at their size.
        .and_then(|_| lb.run(&mut side, &mut server, 2 * QD as u64 * 16, QD));
    if let Err(e) = r {
        give_up(export, e, side, server);
        return None;
    }
    let simple0 = engine_simple();
    let h0 = mm::heap::stats();
    let r = lb.run(&mut side, &mut server, reads, QD);
    let h1 = mm::heap::stats();
    let simple = engine_simple() - simple0;
    let figures = match r {
        Ok(f) => f,
        Err(e) => {
            give_up(export, e, side, server);
            return None;
        }
    };
    lb.close(&mut side, &mut server);
    if server.in_flight() > 0 {
        // The server did not let its reads go: their buffers stay.
        give_up(export, LoopError::Stuck(server.in_flight()), side, server);
    }
    Some(Run {
        figures,
        allocs: h1.allocs - h0.allocs,
        frees: h1.frees - h0.frees,
        simple,
    })
}

/// Reads this core's engine of nvme0n1 took on the simple path so far.
fn engine_simple() -> u64 {
    nvme::with_engine(0, |e| e.stats().simple).unwrap_or(0)
}

/// Reports a client that gave up and leaks its server and wire: reads
/// still in flight keep their DMA buffers, which the controller may still
/// fill (never freed while a device may write them).
fn give_up(export: &str, e: LoopError, side: ServerSide, server: Server<KernelPlatform>) {
    let held = server.in_flight();
    outln!(
        "nbd-noalloc error: {export}: {e} ({held} read(s) still in flight: their buffers are kept)"
    );
    core::mem::forget(server);
    core::mem::forget(side);
}
