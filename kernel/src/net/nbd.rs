//! The NBD service: every regular file of a dxfs filesystem is an export
//! named by its path (without the leading slash; one is accepted): files of
//! `nvme0n1` by their path alone, files of any other namespace as
//! `<namespace>/<path>` (`nvme1n1/data/a.bin`); and every namespace is
//! exported raw under its name (`nvme0n1`, `nvme0n2`, `nvme1n1`, ...). Up to [`CONNS`] connections are
//! served at once on TCP port [`PORT`], each by a sans-IO
//! [`dioxide_nbd::Conn`]; file reads go through the DIO layer
//! (`dio_rw`: 4 KiB reads take the simple path), raw reads straight to the
//! queue.
//!
//! Reads are asynchronous: each decoded read becomes a [`Req`] in the
//! service's own slab (its [`ReqId`] is what the DIO engine hands back) and
//! owns a DMA buffer; it is submitted with its id as owner, and the engine
//! delivers `(id, result)` for each of its parts from `nvme::service` in
//! the run loop (process context; the MSI-X handler only finishes requests
//! inside the engine). The part that ends a read queues its id on the
//! `ready` ring, and the run loop replies, so up to [`PER_CONN`] reads per
//! connection are in flight and replies leave in completion order. No
//! state is shared with the interrupt handler here. Requests not aligned to the device
//! block read the covering aligned range into the buffer and reply from the
//! middle of it.
//!
//! A connection that goes away with reads in flight leaves their requests
//! and buffers owned here until the device answers (the device may still
//! write into them); the late completions are then dropped, since the
//! request's connection generation no longer matches.
//!
//! Buffers come from two small pools (8 KiB and 256 KiB) so the 4 KiB hot
//! path does not allocate; larger reads allocate exactly (fallibly: a read
//! whose buffer cannot be had is answered ENOMEM).
//!
//! ## Bounds (what one client, or all of them, can make the service hold)
//!
//! - Sockets: [`CONNS`] connections; their TCP buffers ([`SOCKET_BUF`] each
//!   way) are allocated once at start.
//! - Input and control replies: per connection, see `dioxide_nbd`
//!   (at most 64 KiB of buffered input, no decoding while 256 KiB of
//!   replies wait). Input is read from a socket only as the connection has
//!   room for it, and from no socket while the global budget is spent: the
//!   rest stays in the socket's receive buffer and TCP flow control holds
//!   the client.
//! - Reads: at most [`PER_CONN`] per connection are decoded and not yet
//!   answered; a read is started only while its connection holds (read
//!   buffers + its heap) less than [`HELD_CONN`] and all connections
//!   together less than [`HELD_TOTAL`] (one read is always allowed when
//!   nothing is in flight and no output waits, so a 32 MiB read goes
//!   through), and only while the
//!   device queue has room for all its commands: reads in flight never
//!   exceed what the queue takes, the rest wait in their connection (the
//!   engine never waits for queue space inside the interrupts-off lock).
//! - Time: a connection whose replies wait (in it or in its socket) and
//!   fewer than [`STALL_MIN_BYTES`] are taken in [`STALL_NS`] (kernel
//!   argument `nbd.stall_s`) is
//!   dropped, and so is a closing socket not closed by then: a client that
//!   stops reading does not keep a socket and its output for ever.
//! - Budgets count the heap really held (buffer capacities, not bytes
//!   waiting), and the buffer pools are capped.
//! - So the heap the service can hold beyond its fixed start-up allocations
//!   is at most [`heap_bound`] (each term explained there; 144.5 MiB with
//!   512-byte blocks), logged at start (`nbd: listening ... bound N more`);
//!   the soak test checks its high-water mark against it.
//!
//! When the last connection is gone and nothing is in flight, the pools are
//! emptied and the heap use is logged (`nbd: idle: heap N bytes in use, peak
//! P bytes`, the peak since boot), which must equal the level logged at
//! start: the bad-input test and the soak check that.

use crate::drivers::nvme::{self, DmaBuf};
use crate::mm;
use crate::net::stack::Net;
use crate::net::storage;
use alloc::collections::BTreeMap;
use alloc::string::String;
use alloc::vec::Vec;
use dioxide_dxfs::File;
use dioxide_iomap::{
    BlockQueue, DioError, DioRequest, DioResult, IoBuf, Kiocb, Op, ReqId, Ring, Slab,
};
use dioxide_nbd::{memory_bound, Conn, Errno, Event, ExportInfo, Exports, MAX_REQUEST};
use smoltcp::iface::SocketHandle;
use smoltcp::socket::tcp;

pub const PORT: u16 = 10809;
pub const CONNS: usize = 16;
/// Reads in flight per connection.
pub const PER_CONN: usize = 128;
/// Request slots: enough for every connection's maximum.
const MAX_REQS: usize = CONNS * PER_CONN;
pub const SOCKET_BUF: usize = 256 * 1024;
/// smoltcp's default delayed-ACK time, restored once a connection leaves
/// negotiation (ACKs are immediate while it negotiates).
const ACK_DELAY: smoltcp::time::Duration = smoltcp::time::Duration::from_millis(10);
/// Memory budgets: a connection starts no new read while its buffers
/// (input, output, read buffers in flight: [`Conn::memory`] and `held`)
/// hold this much, and no connection does while all of them together hold
/// [`HELD_TOTAL`]. (A read is always allowed when no read is in flight and
/// no output waits, so a 32 MiB read still goes through.)
pub const HELD_CONN: usize = 8 << 20;
pub const HELD_TOTAL: usize = 48 << 20;
/// A connection whose replies wait and fewer than [`STALL_MIN_BYTES`] of
/// them (or all that waited) are taken in this long, or a closing socket
/// not closed after it, is dropped (aborted); kernel argument `nbd.stall_s`
/// overrides it. Without it a client that stops reading would hold its
/// socket and its output for as long as its side of TCP answers window
/// probes: forever when a NAT or proxy stands in for a client that has gone
/// (QEMU's user networking does, as the soak test found). Counting bytes,
/// not any progress at all, keeps a peer that takes a byte now and then
/// (a window probe's worth) from holding its socket and output for ever
/// too (the soak saw one hold 8 MB for 38 s).
pub const STALL_NS: u64 = 30_000_000_000;
/// See [`STALL_NS`]: the least a client must take of waiting replies per
/// stall time (64 KiB per 30 s by default, about 2 KiB/s).
pub const STALL_MIN_BYTES: usize = 64 * 1024;
const SMALL: usize = 8 * 1024;
const LARGE: usize = 256 * 1024;
/// Buffers kept for reuse (each pool at most 4 MiB): enough for the reads
/// of several connections at full queue depth; beyond them a buffer is
/// allocated per read and freed after it.
const KEEP_SMALL: usize = 512;
const KEEP_LARGE: usize = 16;

/// The most heap the service holds beyond its level at start (the idle
/// level, which the idle report must return to), given the device's
/// logical block size `lbs`. By construction:
///
/// - A read starts only while all connections' buffers plus the read
///   buffers in flight stay within [`HELD_TOTAL`], or when nothing is in
///   flight and no output waits (one read of at most [`MAX_REQUEST`],
///   rounded out to blocks). When it completes, its data is copied into
///   the connection's output while its buffer is still alive: one more
///   read's size, at most. Read replies in shared output segments take up
///   to 1/7 more than their bytes ([`OutQueue::bound`](dioxide_nbd::outq::OutQueue::bound)) and each carries a
///   header of at most 32 bytes.
/// - Per connection, what does not wait for a budget: its input, control
///   replies and the output queue's slack and request queue, at most
///   [`memory_bound`]`(PER_CONN, 0)`.
/// - The buffer pools: `KEEP_SMALL` small and `KEEP_LARGE` large buffers.
pub const fn heap_bound(lbs: usize) -> usize {
    let read = MAX_REQUEST as usize + 2 * lbs;
    let reads = HELD_TOTAL + HELD_TOTAL / 7 + read + CONNS * PER_CONN * 32;
    let conns = CONNS * memory_bound(PER_CONN, 0);
    let pools = KEEP_SMALL * (SMALL + 16) + KEEP_LARGE * (LARGE + 16);
    reads + read + conns + pools
}

enum Target {
    File(alloc::boxed::Box<File>),
    Raw,
    /// `null` (kernel argument `nbd.null=1`, for `dioxide bench nbd`):
    /// zeros without touching the device, to measure the network path alone.
    Null,
}

const NULL_MAX: usize = 64 * 1024;
static ZEROS: [u8; NULL_MAX] = [0; NULL_MAX];

struct Export {
    name: String,
    info: ExportInfo,
    target: Target,
    /// The namespace it reads (index in `nvme::disks()`; the null export
    /// names the first) and its logical block size.
    disk: usize,
    lbs: u64,
}

/// The device commands of one namespace's queue that reads may take.
#[derive(Clone, Copy)]
struct Budget {
    /// Commands reserved by reads in flight, and how many the queue takes:
    /// a read starts only when all its commands fit.
    cmds: usize,
    max_cmds: usize,
    /// Largest transfer of one command (bytes, whole blocks).
    max_transfer: usize,
}

/// The export table, built at start.
pub struct Table {
    exports: Vec<Export>,
    by_name: BTreeMap<String, u32>,
}

impl Exports for Table {
    fn lookup(&self, name: &str) -> Option<(u32, ExportInfo)> {
        let name = name.strip_prefix('/').unwrap_or(name);
        let id = *self.by_name.get(name)?;
        Some((id, self.exports[id as usize].info))
    }
    fn name(&self, index: usize) -> Option<&str> {
        self.exports.get(index).map(|e| e.name.as_str())
    }
}

/// Why a read failed, kept until its reply is sent.
#[derive(Clone, Copy, Debug)]
enum Failure {
    Dio(DioError),
    /// The layer reported fewer bytes than the request covers.
    Short {
        got: usize,
        need: usize,
    },
    NoEngine,
}

impl Failure {
    /// The NBD error a client gets.
    fn errno(&self) -> Errno {
        match self {
            Failure::Dio(DioError::Invalid(_)) => Errno::Inval,
            _ => Errno::Io,
        }
    }
}

/// A fixed buffer for an error message (no allocation on the error path).
struct MsgBuf {
    buf: [u8; 256],
    len: usize,
}

impl MsgBuf {
    fn new() -> Self {
        MsgBuf {
            buf: [0; 256],
            len: 0,
        }
    }
    fn as_str(&self) -> &str {
        // Only whole `&str`s are copied in, and truncation (below) backs off
        // to a character boundary.
        core::str::from_utf8(&self.buf[..self.len]).unwrap_or("read failed")
    }
}

impl core::fmt::Write for MsgBuf {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        let room = self.buf.len() - self.len;
        let mut n = s.len().min(room);
        while !s.is_char_boundary(n) {
            n -= 1;
        }
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}

impl core::fmt::Display for Failure {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Failure::Dio(e) => write!(f, "{e}"),
            Failure::Short { got, need } => write!(f, "short read: {got} of {need} bytes"),
            Failure::NoEngine => f.write_str("no NVMe engine"),
        }
    }
}

impl core::error::Error for Failure {
    fn source(&self) -> Option<&(dyn core::error::Error + 'static)> {
        match self {
            Failure::Dio(e) => Some(e),
            _ => None,
        }
    }
}

/// A read in flight: owns its buffer until the device is done with it.
struct Req {
    sock: u16,
    gen: u32,
    handle: u64,
    export: u32,
    offset: u64,
    skew: u32,
    len: u32,
    /// Device commands reserved for it (see `Server::cmds`).
    cmds: u32,
    /// Parts (device requests) outstanding, plus one while submitting.
    parts: u32,
    /// Bytes a part must deliver (a file read may end at end of file; raw
    /// parts always deliver their whole length: 0).
    need: usize,
    /// The first failure of a part.
    failure: Option<Failure>,
    buf: DmaBuf,
}

impl Req {
    fn fail(&mut self, f: Failure) {
        self.failure.get_or_insert(f);
    }
}

/// One part of request `id` ended with `r` (from the engine's delivery or
/// at once from the submission).
fn part_done(reqs: &mut Slab<Req>, ready: &mut Ring<ReqId>, id: ReqId, r: Result<usize, DioError>) {
    apply(reqs, ready, id, Some(r), 1);
}

/// What became of request `id`'s parts, from this core or a storage core:
/// a part's result (if any) is recorded, then `refs` of its references are
/// dropped (one per part ended, plus the submission's own).
fn apply(
    reqs: &mut Slab<Req>,
    ready: &mut Ring<ReqId>,
    id: ReqId,
    r: Option<Result<usize, DioError>>,
    refs: u32,
) {
    let Some(req) = reqs.get_mut(id) else {
        return;
    };
    match r {
        None => {}
        Some(Ok(got)) if got >= req.need => {}
        Some(Ok(got)) => req.fail(Failure::Short {
            got,
            need: req.need,
        }),
        Some(Err(e)) => req.fail(Failure::Dio(e)),
    }
    put(reqs, ready, id, refs);
}

/// Drops `n` references of request `id`; the last queues it for its reply.
fn put(reqs: &mut Slab<Req>, ready: &mut Ring<ReqId>, id: ReqId, n: u32) {
    let Some(req) = reqs.get_mut(id) else {
        return;
    };
    let Some(left) = req.parts.checked_sub(n) else {
        return;
    };
    req.parts = left;
    if left == 0 {
        // Each request is queued once and the ring holds one entry per
        // slab entry: it cannot be full.
        let _ = ready.push(id);
    }
}

// Sixteen of these live in a vector made at start: the size of the largest
// variant costs nothing, and boxing it would allocate per connection.
#[allow(clippy::large_enum_variant)]
enum Slot {
    Listening,
    Serving(Conn),
    /// Closed by us; waiting for the socket to finish before listening again.
    Closing,
}

struct Sock {
    handle: SocketHandle,
    slot: Slot,
    /// Bumped for every new connection: completions of an earlier one are
    /// not replied on this one.
    gen: u32,
    /// When the connection last had no reply waiting or took
    /// [`STALL_MIN_BYTES`] of them, or when closing began
    /// (`time::now_ns`), for [`Server::stall_ns`]; the socket's send queue
    /// at the last look, and the bytes taken (acknowledged) since
    /// `progress`.
    progress: u64,
    queued: usize,
    taken: usize,
}

pub struct Server {
    /// Built at start and never changed: shared with the storage cores.
    table: &'static Table,
    sockets: Vec<Sock>,
    /// Reads in flight (or finished, waiting for their reply).
    reqs: Slab<Req>,
    /// Reads whose last part finished, in order.
    ready: Ring<ReqId>,
    small: Vec<DmaBuf>,
    large: Vec<DmaBuf>,
    /// Read buffer bytes in flight per socket (current connection only),
    /// and in all (stale requests of closed connections too).
    held: Vec<usize>,
    held_total: usize,
    /// Per namespace: device commands reserved and available.
    budgets: Vec<Budget>,
    /// Heap held by all connections ([`Conn::memory`]) and output waiting
    /// on them, updated each poll.
    conn_memory: usize,
    output_total: usize,
    /// A connection was served since the last idle report.
    busy: bool,
    pub served: u64,
    /// A socket was read, written, opened or closed in this poll: the
    /// network stack has work (see `Net::poll_if_needed`).
    touched: bool,
    /// Where the run loop's time went since the last idle report.
    pub prof: Profile,
    /// See [`STALL_NS`].
    stall_ns: u64,
}

/// TSC cycles of the run loop by phase (reported when the server goes idle;
/// under TCG these are emulated cycles, i.e. guest wall time).
#[derive(Default, Clone, Copy)]
pub struct Profile {
    /// smoltcp and virtio-net (`Net::poll`).
    pub net: u64,
    /// NVMe completion path (`nvme::service`: reaping, delivery).
    pub nvme: u64,
    /// Replies to finished reads (copying data into connection output).
    pub replies: u64,
    /// Sockets: receiving, decoding, submitting, sending.
    pub sockets: u64,
    pub loops: u64,
    served_at_start: u64,
}

impl Server {
    /// Builds the export table and opens the listening sockets.
    pub fn new(
        net: &mut Net,
        mounts: &[crate::block::disk::Mounted],
        null_export: bool,
        stall_ns: u64,
        storage_cores: bool,
    ) -> Server {
        let disks = nvme::disks();
        let mut exports = Vec::new();
        for m in mounts {
            let Some(d) = disks.get(m.disk) else {
                continue;
            };
            // Named as `Mounted::root` says, without the leading slash.
            let root = m.root();
            let fs = &m.fs;
            match fs.walk() {
                Ok(entries) => {
                    for e in entries.into_iter().filter(|e| e.inode.is_file()) {
                        match fs.open(e.ino) {
                            Ok(f) => exports.push(Export {
                                name: alloc::format!("{root}{}", e.path)[1..].into(),
                                // Any alignment is served (through the
                                // covering aligned range), and file sizes
                                // need not be block multiples.
                                info: ExportInfo {
                                    size: f.size(),
                                    min_block: 1,
                                    preferred_block: fs.block_size(),
                                    max_block: MAX_REQUEST,
                                },
                                target: Target::File(alloc::boxed::Box::new(f)),
                                disk: m.disk,
                                lbs: d.ns.block_size as u64,
                            }),
                            Err(err) => {
                                log::warn!(target: "nbd", "{}: {} not exported: {err}", d.name, e.path)
                            }
                        }
                    }
                }
                Err(err) => {
                    log::warn!(target: "nbd", "{}: file exports unavailable: {err}", d.name)
                }
            }
        }
        let files = exports.len();
        for (i, d) in disks.iter().enumerate() {
            let lbs = d.ns.block_size;
            exports.push(Export {
                name: d.name.clone(),
                info: ExportInfo {
                    size: d.bytes(),
                    min_block: lbs,
                    preferred_block: 4096.max(lbs),
                    max_block: MAX_REQUEST,
                },
                target: Target::Raw,
                disk: i,
                lbs: lbs as u64,
            });
        }
        if null_export {
            exports.push(Export {
                name: "null".into(),
                info: ExportInfo {
                    size: disks.first().map_or(1 << 30, |d| d.bytes()),
                    min_block: 1,
                    preferred_block: 4096,
                    max_block: NULL_MAX as u32,
                },
                target: Target::Null,
                disk: 0,
                lbs: 1,
            });
        }
        let by_name = exports
            .iter()
            .enumerate()
            .map(|(i, e)| (e.name.clone(), i as u32))
            .collect();
        let mut sockets = Vec::with_capacity(CONNS);
        for _ in 0..CONNS {
            let mut s = tcp::Socket::new(
                tcp::SocketBuffer::new(alloc::vec![0u8; SOCKET_BUF]),
                tcp::SocketBuffer::new(alloc::vec![0u8; SOCKET_BUF]),
            );
            s.set_nagle_enabled(false);
            let _ = s.listen(PORT);
            sockets.push(Sock {
                handle: net.sockets.add(s),
                slot: Slot::Listening,
                gen: 0,
                progress: 0,
                queued: 0,
                taken: 0,
            });
        }
        let budgets = disks
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let lbs = d.ns.block_size as usize;
                Budget {
                    cmds: 0,
                    max_cmds: nvme::with_engine(i, |e| e.queue().depth()).unwrap_or(0),
                    max_transfer: d.max_transfer / lbs * lbs,
                }
            })
            .collect();
        let lbs = disks
            .iter()
            .map(|d| d.ns.block_size as usize)
            .max()
            .unwrap_or(512);
        let server = Server {
            table: alloc::boxed::Box::leak(alloc::boxed::Box::new(Table { exports, by_name })),
            sockets,
            reqs: Slab::new(MAX_REQS),
            ready: Ring::new(MAX_REQS, ReqId::new(0, 0)),
            small: Vec::new(),
            large: Vec::new(),
            held: alloc::vec![0; CONNS],
            held_total: 0,
            budgets,
            conn_memory: 0,
            output_total: 0,
            busy: false,
            served: 0,
            touched: true,
            prof: Profile::default(),
            stall_ns,
        };
        storage::start(server.table, MAX_REQS, storage_cores);
        let n = server.table.exports.len();
        log::info!(
            target: "nbd",
            "listening on port {PORT}: {n} exports ({files} files, {} namespace(s){}); heap {} bytes in use, bound {} more",
            disks.len(),
            if null_export { ", null" } else { "" },
            mm::heap::stats().bytes_in_use,
            heap_bound(lbs)
        );
        server
    }

    /// Logs the state of busy connections (debugging aid, `log=trace`).
    pub fn trace(&self, net: &mut Net) {
        for s in &self.sockets {
            if let Slot::Serving(c) = &s.slot {
                let t = net.sockets.get_mut::<tcp::Socket>(s.handle);
                log::trace!(
                    target: "nbd",
                    "conn: state {:?} out {} send_queue {} recv_queue {} in_flight {}",
                    t.state(), c.output().len(), t.send_queue(), t.recv_queue(), c.in_flight()
                );
            }
        }
    }

    /// Serves every connection as far as it can go without waiting: runs
    /// the NVMe completion path, replies to finished reads, reads requests,
    /// submits them, and sends what is ready.
    /// Returns whether any socket was touched (the network stack then has
    /// work to do). `net_polled`: the stack ran since the last call; only
    /// then can a listening or closing socket have changed, so otherwise
    /// only the connections are visited.
    pub fn poll(&mut self, net: &mut Net, net_polled: bool) -> bool {
        self.touched = false;
        let t0 = crate::platform::time::rdtsc();
        let (reqs, ready) = (&mut self.reqs, &mut self.ready);
        nvme::service(|id, r| part_done(reqs, ready, id, r));
        storage::collect(|d| apply(reqs, ready, d.id, d.result, d.refs));
        let t1 = crate::platform::time::rdtsc();
        self.reply_completed();
        let t2 = crate::platform::time::rdtsc();
        (self.conn_memory, self.output_total) = self
            .sockets
            .iter()
            .map(|s| match &s.slot {
                Slot::Serving(c) => (c.memory(), c.output_pending()),
                _ => (0, 0),
            })
            .fold((0, 0), |(m, o), (a, b)| (m + a, o + b));
        for i in 0..self.sockets.len() {
            if net_polled || matches!(self.sockets[i].slot, Slot::Serving(_)) {
                self.poll_socket(net, i);
            }
        }
        let t3 = crate::platform::time::rdtsc();
        self.prof.nvme += t1 - t0;
        self.prof.replies += t2 - t1;
        self.prof.sockets += t3 - t2;
        self.prof.loops += 1;
        let serving = || {
            self.sockets
                .iter()
                .any(|s| matches!(s.slot, Slot::Serving(_)))
        };
        if self.busy && self.reqs.is_empty() && !serving() {
            self.busy = false;
            // Give the buffer pools back: the heap returns to its level at start.
            self.small = Vec::new();
            self.large = Vec::new();
            let heap = mm::heap::stats();
            log::info!(
                target: "nbd",
                "idle: {} requests served, heap {} bytes in use, peak {} bytes",
                self.served,
                heap.bytes_in_use,
                heap.peak_bytes
            );
            let p = self.prof;
            let n = (self.served - p.served_at_start).max(1);
            let total = (p.net + p.nvme + p.replies + p.sockets).max(1);
            let pct = |x: u64| x * 100 / total;
            log::info!(
                target: "nbd",
                "run loop since the last idle: {} requests, {} loops, cycles per request {}: net {} ({}%), nvme {} ({}%), replies {} ({}%), sockets {} ({}%)",
                n, p.loops, total / n,
                p.net / n, pct(p.net), p.nvme / n, pct(p.nvme),
                p.replies / n, pct(p.replies), p.sockets / n, pct(p.sockets)
            );
            let (handed, handoff, wakes) = storage::take_stats();
            if handed > 0 {
                log::info!(
                    target: "nbd",
                    "storage cores: {handed} reads handed over, {} us from queueing to taken (mean), {wakes} wake-ups",
                    handoff * 1_000_000 / crate::platform::time::tsc_hz().max(1)
                );
            }
            let [txf, txb, txk, rxf, rxp] = crate::drivers::virtio_net::stats::take();
            log::info!(
                target: "nbd",
                "frames per request: {} sent ({} cycles to build, {} to hand over, each), {} received ({} cycles to process each)",
                txf / n, txb / txf.max(1), txk / txf.max(1), rxf / n, rxp / rxf.max(1)
            );
            self.prof = Profile {
                served_at_start: self.served,
                ..Profile::default()
            };
        }
        self.touched
    }

    /// Replies to the reads whose last part completed.
    fn reply_completed(&mut self) {
        while let Some(id) = self.ready.pop() {
            let Some(req) = self.reqs.remove(id) else {
                continue;
            };
            let failure = req.failure;
            self.served += 1;
            self.held_total -= req.buf.len();
            if let Some(b) = self
                .table
                .exports
                .get(req.export as usize)
                .and_then(|e| self.budgets.get_mut(e.disk))
            {
                b.cmds -= req.cmds as usize;
            }
            let s = &mut self.sockets[req.sock as usize];
            if s.gen == req.gen {
                self.held[req.sock as usize] -= req.buf.len();
            }
            if let (true, Slot::Serving(conn)) = (s.gen == req.gen, &mut s.slot) {
                match failure {
                    None => {
                        let (a, n) = (req.skew as usize, req.len as usize);
                        conn.reply_read(
                            self.table,
                            req.handle,
                            req.offset,
                            Ok(&req.buf.as_slice()[a..a + n]),
                        );
                    }
                    Some(f) => {
                        // The one report of this failure (the layers below
                        // leave it to the owner): the request and its cause.
                        let name = self
                            .table
                            .exports
                            .get(req.export as usize)
                            .map_or("?", |e| e.name.as_str());
                        log::error!(
                            target: "nbd",
                            "read of {name} at {} ({} bytes, handle {:#x}) failed: {f}",
                            req.offset, req.len, req.handle
                        );
                        let mut msg = MsgBuf::new();
                        let _ = core::fmt::write(
                            &mut msg,
                            format_args!(
                                "read of {name} at {} ({} bytes) failed: {f}",
                                req.offset, req.len
                            ),
                        );
                        let errno = f.errno();
                        conn.reply_read_error(self.table, req.handle, errno, msg.as_str());
                    }
                }
            }
            self.recycle(req.buf);
        }
    }

    fn poll_socket(&mut self, net: &mut Net, i: usize) {
        let sock = net.sockets.get_mut::<tcp::Socket>(self.sockets[i].handle);
        let s = &mut self.sockets[i];
        match s.slot {
            Slot::Listening => {
                if sock.is_active() {
                    log::debug!(target: "nbd", "connection from {:?}", sock.remote_endpoint());
                    s.gen = s.gen.wrapping_add(1);
                    s.progress = crate::platform::time::now_ns();
                    s.queued = 0;
                    s.taken = 0;
                    self.held[i] = 0;
                    s.slot = Slot::Serving(Conn::new(PER_CONN));
                    // Negotiation is a series of small round trips: a client
                    // that writes an option in pieces waits for our ACK of
                    // the first before sending the rest (Nagle).
                    sock.set_ack_delay(None);
                    self.touched = true;
                    self.busy = true;
                } else if !sock.is_open() {
                    let _ = sock.listen(PORT);
                    self.touched = true;
                }
            }
            Slot::Closing => {
                // Once our FIN is acknowledged everything we sent has
                // arrived. FIN-WAIT-2 (a peer that never closes its side)
                // and TIME-WAIT (10 s in smoltcp) would each hold one of
                // the few sockets: recycle it at once.
                // A peer that takes nothing (zero window) would hold it in
                // FIN-WAIT-1 or CLOSING: abort after the stall time.
                if matches!(sock.state(), tcp::State::FinWait2 | tcp::State::TimeWait)
                    || crate::platform::time::now_ns().saturating_sub(s.progress) > self.stall_ns
                {
                    sock.abort();
                }
                if !sock.is_open() {
                    let _ = sock.listen(PORT);
                    self.touched = true;
                    s.slot = Slot::Listening;
                }
            }
            Slot::Serving(_) => {}
        }
        let gen = s.gen;
        let Slot::Serving(conn) = &mut s.slot else {
            return;
        };
        // Input only as the connection has room for it, and none while all
        // connections together hold the global budget: what is not taken
        // stays in the socket and TCP flow control holds the client.
        // This connection's share of the totals taken at the poll's start
        // (its own figures change below; the others' do not). A connection
        // accepted just now was not in them: hence the saturation.
        let (m0, o0) = (conn.memory(), conn.output_pending());
        let global_full = self.held_total + self.conn_memory >= HELD_TOTAL;
        loop {
            let room = if global_full { 0 } else { conn.input_room() };
            if room == 0 || !sock.can_recv() {
                break;
            }
            let table = self.table;
            match sock.recv(|b| {
                let n = conn.receive(table, &b[..b.len().min(room)]);
                (n, n)
            }) {
                Ok(0) | Err(_) => break,
                Ok(_) => self.touched = true,
            }
        }
        if conn.in_transmission() && sock.ack_delay().is_none() {
            sock.set_ack_delay(Some(ACK_DELAY));
        }
        // The peer finished sending (FIN received) or the connection is
        // gone. (Before Established, may_recv() is false too: not that.)
        let peer_done = matches!(
            sock.state(),
            tcp::State::CloseWait
                | tcp::State::LastAck
                | tcp::State::Closing
                | tcp::State::TimeWait
                | tcp::State::Closed
        );
        if peer_done && !sock.can_recv() && !conn.is_closed() {
            // A client that closes without NBD_CMD_DISC (or before the
            // replies to its requests) made a hard disconnect: drop the
            // connection now rather than push replies nobody reads. Reads
            // in flight keep their buffers until the device is done; their
            // completions are then dropped (the slot is no longer serving).
            conn.peer_closed();
            log::debug!(target: "nbd", "hard disconnect with {} reads in flight", conn.in_flight());
            sock.abort();
            s.slot = Slot::Closing;
            s.progress = crate::platform::time::now_ns();
            self.touched = true;
            return;
        }
        while let Some(&Event::Read {
            len,
            export: peek_export,
            ..
        }) = conn.peek_event()
        {
            // Budgets count the heap really held (capacities, not bytes
            // waiting); a read always goes when nothing is in flight and
            // no output waits.
            let (mem, pending) = (conn.memory(), conn.output_pending());
            let mine_idle = self.held[i] == 0 && pending == 0;
            let all_idle =
                self.held_total == 0 && self.output_total.saturating_sub(o0) + pending == 0;
            let mine = mem + self.held[i];
            let all = self.held_total + self.conn_memory.saturating_sub(m0) + mem;
            let fits = |idle: bool, held: usize, limit: usize| idle || held + len as usize <= limit;
            if !fits(mine_idle, mine, HELD_CONN)
                || !fits(all_idle, all, HELD_TOTAL)
                || self.reqs.is_full()
            {
                break;
            }
            let peeked = self.table.exports.get(peek_export as usize);
            let null = matches!(
                peeked,
                Some(Export {
                    target: Target::Null,
                    ..
                })
            );
            let (disk, lbs) = peeked.map_or((0, 512), |e| (e.disk, e.lbs));
            // Device commands the read may take: one per maximal transfer,
            // plus one where the range crosses an extent or ends in a
            // partial block. Reads wait here while the namespace's queue is
            // full.
            let budget = self.budgets.get(disk).copied().unwrap_or(Budget {
                cmds: 0,
                max_cmds: 0,
                max_transfer: 0,
            });
            let need = if null || budget.max_transfer == 0 {
                0
            } else {
                (len as usize + 2 * lbs as usize).div_ceil(budget.max_transfer) + 1
            };
            if budget.cmds > 0 && budget.cmds + need > budget.max_cmds {
                break;
            }
            let Some(Event::Read {
                handle,
                export,
                offset,
                len,
            }) = conn.next_event()
            else {
                break;
            };
            log::trace!(target: "nbd", "read export {export} at {offset} len {len}");
            if let Some(Export {
                target: Target::Null,
                ..
            }) = self.table.exports.get(export as usize)
            {
                let data = ZEROS.get(..len as usize).ok_or(Errno::Inval);
                conn.reply_read(self.table, handle, offset, data);
                self.served += 1;
                continue;
            }
            let mut r = Submit {
                table: self.table,
                small: &mut self.small,
                large: &mut self.large,
            };
            match r.start(export, offset, len) {
                Ok((buf, skew)) => {
                    let held = buf.len();
                    // The request owns its buffer from here until its reply
                    // (or, its connection gone, until its last completion).
                    let req = Req {
                        sock: i as u16,
                        gen,
                        handle,
                        export,
                        offset,
                        skew,
                        len,
                        cmds: need as u32,
                        parts: 0,
                        need: 0,
                        failure: None,
                        buf,
                    };
                    let Ok(id) = self.reqs.insert(req) else {
                        // Checked not full above.
                        break;
                    };
                    self.held[i] += held;
                    self.held_total += held;
                    if let Some(b) = self.budgets.get_mut(disk) {
                        b.cmds += need;
                    }
                    let core = storage::core_for(i);
                    submit(
                        self.table,
                        &self.budgets,
                        &mut self.reqs,
                        &mut self.ready,
                        id,
                        core,
                    );
                }
                Err(e) => {
                    conn.reply_read(self.table, handle, offset, Err(e));
                }
            }
        }
        let mut sent = 0;
        for _ in 0..2 {
            while !conn.output().is_empty() && sock.can_send() {
                match sock.send_slice(conn.output()) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        self.touched = true;
                        sent += n;
                        conn.consume_output(n)
                    }
                }
            }
            // Output drained below the high-water mark: decode what was
            // held back (more of a list, buffered requests).
            let before = conn.output_pending();
            conn.resume(self.table);
            if conn.output_pending() == before {
                break;
            }
        }
        // Replies wait (in the connection or the socket) and fewer than
        // STALL_MIN_BYTES were taken (acknowledged by the peer) in the
        // stall time: drop.
        let now = crate::platform::time::now_ns();
        let queued = sock.send_queue();
        let waiting = conn.output_pending() + queued;
        s.taken += (s.queued + sent).saturating_sub(queued);
        s.queued = queued;
        if waiting == 0 || s.taken >= STALL_MIN_BYTES {
            s.progress = now;
            s.taken = 0;
        } else if now.saturating_sub(s.progress) > self.stall_ns {
            log::info!(
                target: "nbd",
                "connection dropped: replies not taken ({} bytes waiting, {} taken in {} s)",
                waiting,
                s.taken,
                self.stall_ns / 1_000_000_000
            );
            conn.peer_closed();
            sock.abort();
            s.slot = Slot::Closing;
            s.progress = now;
            self.touched = true;
            return;
        }
        if (conn.is_closed() || !sock.is_open()) && (conn.output().is_empty() || !sock.may_send()) {
            if let Some(why) = conn.close_reason() {
                log::debug!(target: "nbd", "connection closed: {why:?}");
            }
            sock.close();
            s.slot = Slot::Closing;
            s.progress = now;
            self.touched = true;
        }
    }

    fn recycle(&mut self, buf: DmaBuf) {
        match buf.len() {
            SMALL if self.small.len() < KEEP_SMALL => self.small.push(buf),
            LARGE if self.large.len() < KEEP_LARGE => self.large.push(buf),
            _ => drop(buf),
        }
    }
}

/// Submission of one read: picks its buffer, then hands its parts to the
/// DIO engine.
struct Submit<'a> {
    table: &'a Table,
    small: &'a mut Vec<DmaBuf>,
    large: &'a mut Vec<DmaBuf>,
}

impl Submit<'_> {
    /// A buffer for the request and where its data starts in it.
    fn start(&mut self, export: u32, offset: u64, len: u32) -> Result<(DmaBuf, u32), Errno> {
        let Some(e) = self.table.exports.get(export as usize) else {
            return Err(Errno::Inval);
        };
        let (a0, a1) = range(e.lbs, offset, len);
        let n = (a1 - a0) as usize;
        let buf = if n <= SMALL {
            self.small.pop().or_else(|| DmaBuf::new(SMALL))
        } else if n <= LARGE {
            self.large.pop().or_else(|| DmaBuf::new(LARGE))
        } else {
            DmaBuf::new(n)
        };
        Ok((buf.ok_or(Errno::NoMem)?, (offset - a0) as u32))
    }
}

/// Submits request `id`'s parts; failures are recorded on the request,
/// which is queued for its reply like any completion.
/// The range `[a0, a1)` of whole blocks of `lbs` bytes covering `len` bytes
/// at `offset`.
fn range(lbs: u64, offset: u64, len: u32) -> (u64, u64) {
    let a0 = offset / lbs * lbs;
    let a1 = (offset + len as u64).div_ceil(lbs) * lbs;
    (a0, a1)
}

/// One read handed to the device, as [`issue`] needs it: on this core, or
/// on a storage core (`storage`), which gets it over its lane.
#[derive(Clone, Copy)]
pub struct Job {
    pub id: ReqId,
    export: u32,
    /// The block-aligned byte range `[a0, a0 + buf.len())` to read into
    /// `buf`, which the request owns until its last reference is dropped.
    a0: u64,
    buf: IoBuf,
    /// Largest transfer of one command (whole blocks; raw exports).
    max: usize,
}

/// The error of a read whose namespace has no queue on this core.
const NO_QUEUE: DioError = DioError::Unsupported("no NVMe queue for this namespace");

/// Prepares request `id` (its references: its parts plus one for the
/// submission) and issues it on `core`: here when that is this core,
/// else over the core's lane. Failures are recorded on the request, which
/// is queued for its reply like any completion.
fn submit(
    table: &'static Table,
    budgets: &[Budget],
    reqs: &mut Slab<Req>,
    ready: &mut Ring<ReqId>,
    id: ReqId,
    core: usize,
) {
    let Some(req) = reqs.get_mut(id) else {
        return;
    };
    let (export, offset, len) = (req.export, req.offset, req.len);
    let Some(e) = table.exports.get(export as usize) else {
        req.fail(Failure::NoEngine);
        req.parts = 1;
        put(reqs, ready, id, 1);
        return;
    };
    let (a0, a1) = range(e.lbs, offset, len);
    let n = (a1 - a0) as usize;
    let max = budgets.get(e.disk).map_or(0, |b| b.max_transfer);
    req.parts = match &e.target {
        // Answered without a request (see `poll_socket`).
        Target::Null => 1,
        Target::File(_) => {
            // Bytes the part must deliver: a file read may end at end of file.
            req.need = (offset + len as u64 - a0) as usize;
            2
        }
        Target::Raw if max == 0 => {
            req.fail(Failure::NoEngine);
            1
        }
        Target::Raw => n.div_ceil(max) as u32 + 1,
    };
    let job = Job {
        id,
        export,
        a0,
        buf: req.buf.part(0, n),
        max,
    };
    let job = match storage::send(core, job) {
        Ok(()) => return,
        // This core's own, or its lane is full: issued here.
        Err(job) => job,
    };
    issue(table, &job, &mut |id, r, refs| {
        apply(reqs, ready, id, r, refs)
    });
}

/// Hands `job`'s parts to this core's queue of its namespace and reports
/// what ended at once to `report(id, part result, references dropped)`,
/// finally dropping the submission's reference. Completions that come later
/// are delivered by `nvme::service` on this core.
pub fn issue(
    table: &Table,
    job: &Job,
    report: &mut dyn FnMut(ReqId, Option<Result<usize, DioError>>, u32),
) {
    let id = job.id;
    let Some(e) = table.exports.get(job.export as usize) else {
        report(id, None, 1);
        return;
    };
    let (disk, lbs, n) = (e.disk, e.lbs, job.buf.len());
    match &e.target {
        Target::Null => {}
        Target::File(f) => {
            let iocb = Kiocb::with_owner(job.a0, id);
            // SAFETY: the buffer belongs to request `id`, which is removed
            // from the slab (and its buffer reused or freed) only after its
            // last reference was dropped, i.e. after this part's completion
            // was delivered.
            let r = nvme::with_engine(disk, |eng| unsafe {
                eng.dio_rw(DioRequest::read(iocb, job.buf, &**f))
            });
            match r {
                Some(Ok(DioResult::Queued)) => {}
                Some(Ok(DioResult::Done(got))) => report(id, Some(Ok(got)), 1),
                Some(Err(err)) => report(id, Some(Err(err)), 1),
                None => report(id, Some(Err(NO_QUEUE)), 1),
            }
        }
        Target::Raw if job.max == 0 => {}
        Target::Raw => {
            let max = job.max;
            let parts = n.div_ceil(max) as u32;
            let ran = nvme::with_engine(disk, |eng| {
                let mut at = 0usize;
                let mut left = parts;
                while at < n {
                    let c = (n - at).min(max);
                    let Some(iob) = job.buf.part(at, c) else {
                        report(id, Some(Err(DioError::Invalid("read range"))), left);
                        break;
                    };
                    let lba = (job.a0 + at as u64) / lbs;
                    // SAFETY: as for files: the buffer belongs to the
                    // request until its last part's completion.
                    let r = unsafe { eng.raw(Op::Read, lba, iob, Some(id)) };
                    left -= 1;
                    match r {
                        Ok(DioResult::Queued) => {}
                        Ok(DioResult::Done(got)) => report(id, Some(Ok(got)), 1),
                        Err(err) => {
                            // This part and the ones never submitted.
                            report(id, Some(Err(err)), 1 + left);
                            break;
                        }
                    }
                    at += c;
                }
            });
            if ran.is_none() {
                report(id, Some(Err(NO_QUEUE)), parts);
            }
        }
    }
    // Drop the submission reference.
    report(id, None, 1);
}
