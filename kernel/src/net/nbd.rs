//! The NBD service on this machine: the kernel's side of `dioxide-service`
//! (which holds the service itself: connections, budgets, bounds, the
//! journey of a read; see its crate docs).
//!
//! Here: the export table built from the mounted filesystems and the
//! namespaces — every regular file of a dxfs filesystem is an export named
//! by its path (without the leading slash; one is accepted): files of
//! `nvme0n1` by their path alone, files of any other namespace as
//! `<namespace>/<path>` (`nvme1n1/data/a.bin`); every namespace is exported
//! raw under its name (`nvme0n1`, `nvme0n2`, `nvme1n1`, ...), and `null`
//! with `nbd.null=1` — and the [`KernelPlatform`]: DMA buffers from the
//! heap, this core's NVMe engines, the storage cores' lanes
//! (`net::storage`), the TSC, and the idle report (`nbd: idle: N requests
//! served, heap N bytes in use, peak P bytes`, the run-loop profile and
//! the frames per request), whose heap level must equal the one logged at
//! start: the bad-input test and the soak check that.
//!
//! Writes: `nbd.rw=` names the exports that take them (`all`;
//! `namespaces`: every namespace raw; `files`: every file; or export names
//! separated by commas); a namespace that holds a mounted dxfs filesystem
//! stays read-only (its raw writes would change the filesystem under the
//! file exports), and files take overwrites of their written blocks only
//! (allocation is not built yet). Who may write is
//! `nbd.rw_from=` (`dioxide_service::Access`); the boot log and the screen
//! say which exports are writable and from where (`writable`).

use crate::drivers::nvme::{self, DmaBuf};
use crate::mm;
use crate::net::stack::{Net, NetPort};
use crate::net::storage;
use crate::platform::time;
use dioxide_iomap::{DioError, Engine, ReqId};
pub use dioxide_service::{heap_bound, PEER_TIMEOUT_NS, STALL_NS};
use dioxide_service::{DiskLimits, Done, Idle, Job, Platform, Server, Table};

/// The service as the run loop holds it.
pub type Service = Server<KernelPlatform>;

/// The kernel as the service's platform (all of it static: any core may
/// make one, as the storage cores do).
#[derive(Clone, Copy, Default)]
pub struct KernelPlatform;

impl Platform for KernelPlatform {
    type Queue = dioxide_nvme::blk::NvmeQueue<nvme::KernelHal, nvme::Bar0>;
    type Buf = DmaBuf;
    fn alloc_buf(&self, len: usize) -> Option<DmaBuf> {
        DmaBuf::new(len)
    }
    fn with_engine<R>(
        &self,
        disk: usize,
        f: impl FnOnce(&mut Engine<Self::Queue>) -> R,
    ) -> Option<R> {
        nvme::with_engine(disk, f)
    }
    fn service(&self, sink: &mut dyn FnMut(ReqId, Result<usize, DioError>)) {
        nvme::service(sink);
    }
    fn send(&self, sock: usize, job: Job) -> Result<(), Job> {
        storage::send(storage::core_for(sock), job)
    }
    fn collect(&self, f: &mut dyn FnMut(Done)) {
        storage::collect(f);
    }
    fn now_ns(&self) -> u64 {
        time::now_ns()
    }
    fn rdtsc(&self) -> u64 {
        time::rdtsc()
    }
    fn on_idle(&self, idle: &Idle) {
        let heap = mm::heap::stats();
        log::info!(
            target: "nbd",
            "idle: {} requests served, heap {} bytes in use, peak {} bytes, at most {} reads in flight on one connection",
            idle.served,
            heap.bytes_in_use,
            heap.peak_bytes,
            idle.peak_in_flight
        );
        let p = idle.profile;
        let n = idle.requests.max(1);
        let total = p.total().max(1);
        let pct = |x: u64| x * 100 / total;
        log::info!(
            target: "nbd",
            "run loop since the last idle: {} requests, {} loops, cycles per request {}: net {} ({}%), complete {} ({}%), reply {} ({}%), decode {} ({}%), submit {} ({}%), send {} ({}%)",
            n, p.loops, total / n,
            p.net / n, pct(p.net), p.complete / n, pct(p.complete), p.reply / n, pct(p.reply),
            p.decode / n, pct(p.decode), p.submit / n, pct(p.submit), p.send / n, pct(p.send)
        );
        let (handed, handoff, wakes) = storage::take_stats();
        if handed > 0 {
            log::info!(
                target: "nbd",
                "storage cores: {handed} reads handed over, {} us from queueing to taken (mean), {wakes} wake-ups",
                handoff * 1_000_000 / time::tsc_hz().max(1)
            );
        }
        if !crate::drivers::virtio_net::in_use() {
            // igb: each core's frames are in its own line (`nbd: core N:`).
            return;
        }
        let [txf, txb, txk, rxf, rxp] = crate::drivers::virtio_net::stats::take();
        log::info!(
            target: "nbd",
            "frames per request: {:.2} sent ({} cycles to build, {} to hand over, each), {:.2} received ({} cycles to process each)",
            txf as f64 / n as f64, txb / txf.max(1), txk / txf.max(1), rxf as f64 / n as f64, rxp / rxf.max(1)
        );
    }
}

/// At most this many lines name damaged structures of one filesystem at
/// start; a summary line counts the rest.
pub const DAMAGE_LINES: usize = 64;

/// The export table of the mounted filesystems and the namespaces (and
/// `null` when `null_export`). A damaged filesystem costs only what depends
/// on the damage: every file whose own metadata and path check out is
/// exported, each damaged structure gets one line (at most
/// [`DAMAGE_LINES`] per filesystem); only a damaged root directory leaves
/// no file of it. Every namespace is exported raw either way.
pub fn exports(mounts: &[crate::block::disk::Mounted], null_export: bool) -> Table {
    let disks = nvme::disks();
    let mut table = Table::new();
    for m in mounts {
        let Some(d) = disks.get(m.disk) else {
            continue;
        };
        // Named as `Mounted::root` says, without the leading slash.
        let root = m.root();
        let fs = &m.fs;
        let scan = match fs.scan() {
            Ok(scan) => scan,
            Err(err) => {
                log::warn!(target: "nbd", "{}: file exports unavailable: {err}", d.name);
                continue;
            }
        };
        for dmg in scan.damage.iter().take(DAMAGE_LINES) {
            log::warn!(target: "nbd", "{}: {dmg}", d.name);
        }
        if scan.damage.len() > DAMAGE_LINES {
            log::warn!(
                target: "nbd",
                "{}: {} more damaged structures not listed (`dioxide fsck` lists them)",
                d.name,
                scan.damage.len() - DAMAGE_LINES
            );
        }
        for (path, f) in scan.into_files() {
            table.add_file(
                alloc::format!("{root}{path}")[1..].into(),
                f,
                fs.block_size(),
                m.disk,
                d.ns.block_size,
            );
        }
    }
    for (i, d) in disks.iter().enumerate() {
        table.add_raw(d.name.clone(), d.bytes(), i, d.ns.block_size);
    }
    if null_export {
        table.add_null(disks.first().map_or(1 << 30, |d| d.bytes()));
    }
    table
}

/// What each namespace's queue on this core gives the service.
pub fn disk_limits() -> alloc::vec::Vec<DiskLimits> {
    nvme::disks()
        .iter()
        .enumerate()
        .map(|(i, d)| DiskLimits {
            depth: nvme::with_engine(i, |e| {
                use dioxide_iomap::BlockQueue;
                e.queue().depth()
            })
            .unwrap_or(0),
            max_transfer: d.max_transfer,
            lbs: d.ns.block_size as usize,
        })
        .collect()
}

/// Builds the export table (once, for every core's service), with the
/// exports `nbd.rw=` names writable.
pub fn table(mounts: &[crate::block::disk::Mounted], args: &crate::ServiceArgs) -> &'static Table {
    let mut t = exports(mounts, args.null);
    writable(&mut t, mounts, args);
    alloc::boxed::Box::leak(alloc::boxed::Box::new(t))
}

/// Makes the exports `nbd.rw=` names writable and says so: one line per
/// export left read-only and why, then which take writes and from where.
/// A name that is no export is a configuration error (the boot fails).
pub fn writable(t: &mut Table, mounts: &[crate::block::disk::Mounted], args: &crate::ServiceArgs) {
    use alloc::string::String;
    use alloc::vec::Vec;
    let Some(rw) = args.rw else {
        log::info!(target: "nbd", "read-only: every export (nbd.rw= not given)");
        return;
    };
    let mounted = |disk: usize| mounts.iter().any(|m| m.disk == disk);
    let raws: Vec<(String, usize)> = t.raws().map(|(n, d)| (n.into(), d)).collect();
    let files: alloc::collections::BTreeSet<String> = t.files().map(|(n, _, _)| n.into()).collect();
    let names: Vec<String> = match rw {
        "all" => raws
            .iter()
            .map(|r| r.0.clone())
            .chain(files.iter().cloned())
            .collect(),
        "namespaces" => raws.iter().map(|r| r.0.clone()).collect(),
        "files" => files.iter().cloned().collect(),
        list => list
            .split(',')
            .filter(|n| !n.is_empty())
            .map(|n| n.strip_prefix('/').unwrap_or(n).into())
            .collect(),
    };
    for name in &names {
        if let Some((_, disk)) = raws.iter().find(|(n, _)| n == name) {
            if mounted(*disk) {
                log::warn!(target: "nbd", "{name} stays read-only: it holds a mounted dxfs filesystem (its files can take writes: nbd.rw=files)");
                continue;
            }
        }
        match t.set_writable(name) {
            Ok(()) => {}
            Err(dioxide_service::NotWritable::NoSuchExport) => crate::fail(
                crate::platform::power::EXIT_CONFIG,
                format_args!("nbd.rw={rw:?}: no export is called {name:?}"),
            ),
            Err(e) => log::warn!(target: "nbd", "{name} stays read-only: {e}"),
        }
    }
    // Namespaces by name, files by count (there may be thousands).
    let mut list = String::new();
    let mut nfiles = 0usize;
    for n in t.writable() {
        if files.contains(n) {
            nfiles += 1;
            continue;
        }
        if !list.is_empty() {
            list.push_str(", ");
        }
        list.push_str(n);
    }
    if nfiles > 0 {
        if !list.is_empty() {
            list.push_str(", ");
        }
        let _ = core::fmt::write(&mut list, format_args!("{nfiles} file(s)"));
    }
    if list.is_empty() {
        log::warn!(target: "nbd", "read-only: nbd.rw={rw} leaves no export writable");
        return;
    }
    log::info!(target: "nbd", "writable: {list}; {}", args.access.describe());
    if nfiles > 0 {
        attach_writers(t, mounts);
        t.set_commit_interval(args.commit_ns);
    }
    if !args.access.any_writer() {
        log::warn!(target: "nbd", "no client may write: nbd.rw_from= not given (run --writable allows the host)");
    }
}

/// Mounts the write path of every filesystem with writable files (a
/// committed transaction its log holds is written home first) and gives it
/// to those files; one line per filesystem says what its files can take.
fn attach_writers(t: &mut Table, mounts: &[crate::block::disk::Mounted]) {
    use crate::block::disk::NvmeDisk;
    let disks = nvme::disks();
    for m in mounts {
        let Some(d) = disks.get(m.disk) else {
            continue;
        };
        if !t
            .files()
            .any(|(n, _, disk)| disk == m.disk && t.writable().any(|w| w == n))
        {
            continue;
        }
        let dev = NvmeDisk {
            disk: m.disk,
            ns: d.ns,
            max_transfer: d.max_transfer,
        };
        let w = match dioxide_dxfs::WritableFs::mount(dev) {
            Ok(w) => w,
            Err(e) => {
                log::warn!(target: "dxfs", "{}: no write path ({e}): its files take overwrites of written blocks only", d.name);
                continue;
            }
        };
        if w.replayed() > 0 {
            log::info!(target: "dxfs", "{}: commit log replayed: {} block(s) written home", d.name, w.replayed());
        }
        let sb = w.fs().superblock();
        if sb.has_log() {
            log::info!(target: "dxfs", "{}: files take allocating writes (holes and unwritten extents; commit log of {} blocks, committed on FLUSH and FUA, at a connection's end and every dxfs.commit_s)", d.name, sb.log_blocks);
        } else {
            log::info!(target: "dxfs", "{}: files take overwrites of written blocks only: no commit log (image made before dxfs took writes); a write into a hole gets ENOTSUP", d.name);
        }
        let w = dioxide_dxfs::Writer(alloc::sync::Arc::new(dioxide_dxfs::SharedFs::new(w)));
        t.attach_writer(m.disk, &w);
    }
}

/// A service on `net`'s sockets (this core's stack) serving `table`,
/// with the time limits of `args`.
pub fn server<D: NetPort>(
    net: &mut Net<D>,
    table: &'static Table,
    args: &crate::ServiceArgs,
) -> Service {
    let mut s = Server::new(
        KernelPlatform,
        &mut net.sockets,
        table,
        &disk_limits(),
        args.stall_ns,
    );
    s.set_peer_timeout(&mut net.sockets, args.peer_timeout_ns);
    s.set_access(args.access.clone());
    s
}

/// Logs what the service offers (once, whatever the number of stacks).
pub fn announce(table: &Table, null_export: bool) {
    let files = table.files().count();
    let lbs = nvme::disks()
        .iter()
        .map(|d| d.ns.block_size as usize)
        .max()
        .unwrap_or(512);
    log::info!(
        target: "nbd",
        "listening on port {}: {} exports ({files} files, {} namespace(s){}); heap {} bytes in use, bound {} more",
        dioxide_service::PORT,
        table.len(),
        nvme::disks().len(),
        if null_export { ", null" } else { "" },
        mm::heap::stats().bytes_in_use,
        heap_bound(lbs)
    );
}

/// Builds the export table, opens the listening sockets on `net` (the one
/// stack) and starts the storage cores (`nbd.storage_cores`).
pub fn start<D: NetPort>(
    net: &mut Net<D>,
    mounts: &[crate::block::disk::Mounted],
    args: &crate::ServiceArgs,
) -> Service {
    let table = table(mounts, args);
    let server = server(net, table, args);
    storage::start(table, dioxide_service::MAX_REQS, args.storage_cores);
    announce(table, args.null);
    server
}
