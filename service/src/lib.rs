//! dioxide's NBD service: TCP connections (smoltcp sockets), the NBD
//! protocol ([`dioxide_nbd::Conn`]) and reads through the DIO layer
//! ([`dioxide_iomap::Engine`]) on dxfs files and raw namespaces. It is
//! generic over the [`Platform`] (buffers, engines, clocks, other cores):
//! the kernel serves it on virtio-net and its NVMe queues, the host
//! benchmark (`dioxide-hostbench`) and the loopback self-test serve the
//! same code on an in-memory frame device ([`loopback`]) and measure what
//! one request costs on a real CPU.
//!
//! ## Exports
//!
//! The [`Table`] is built once at start by the platform (the kernel: every
//! regular file of every dxfs filesystem, every namespace raw, `null` on
//! request) and never changes; it is shared with other cores. A `null`
//! export answers zeros without touching a device: the network path alone.
//!
//! ## The journey of a read
//!
//! Each decoded read becomes a [`Req`] in the service's own slab (its
//! [`ReqId`] is what the DIO engine hands back) and owns a DMA buffer; it
//! is issued with its id as owner ([`issue`], here or on a storage core
//! through [`Platform::send`]), and the engine delivers `(id, result)` for
//! each of its parts from [`Platform::service`] (process context). The part
//! that ends a read queues its id on the `ready` ring, and the next poll
//! replies, so up to [`PER_CONN`] reads per connection are in flight and
//! replies leave in completion order. Requests not aligned to the device
//! block read the covering aligned range into the buffer and reply from the
//! middle of it.
//!
//! **One copy.** A finished read whose connection has nothing queued
//! before it is written straight from its DMA buffer into the socket's
//! send buffer: the reply header, then the data
//! ([`Conn::reply_read_direct`]). Only when output already waits (or the
//! socket is full) is the reply queued in the connection's output first
//! (a second copy). smoltcp then builds frames from the send buffer, as
//! TCP must keep the bytes until they are acknowledged.
//!
//! **No allocation per read.** Buffers come from two small pools (8 KiB
//! and 256 KiB), requests from a slab and the ready ring made at start,
//! connection buffers keep their capacity; larger reads allocate exactly
//! (fallibly: a read whose buffer cannot be had is answered ENOMEM). The
//! loopback self-test and the host benchmark count allocations per read.
//!
//! A connection that goes away with reads in flight leaves their requests
//! and buffers owned here until the device answers (the device may still
//! write into them); the late completions are then dropped, since the
//! request's connection generation no longer matches.
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
//!   through), and only while the device queue has room for all its
//!   commands: reads in flight never exceed what the queue takes, the rest
//!   wait in their connection (the engine never waits for queue space
//!   inside the interrupts-off lock).
//! - Time: a connection whose replies wait (in it or in its socket) and
//!   fewer than [`STALL_MIN_BYTES`] are taken in the stall time
//!   ([`STALL_NS`] by default) is dropped, and so is a closing socket not
//!   closed by then: a client that stops reading does not keep a socket and
//!   its output for ever. A peer silent for half the stall time gets a TCP
//!   keep-alive probe and one that answers nothing for the peer timeout
//!   (5 minutes by default) is dropped ([`peer_timers`]): a client whose
//!   RST or FIN never reached us does not keep its socket either.
//! - Budgets count the heap really held (buffer capacities, not bytes
//!   waiting), and the buffer pools are capped.
//! - So the heap the service can hold beyond its fixed start-up allocations
//!   is at most [`heap_bound`] (each term explained there; 144.5 MiB with
//!   512-byte blocks).
//!
//! When the last connection is gone and nothing is in flight, the pools are
//! emptied and [`Platform::on_idle`] is told (the kernel logs its heap use
//! then, which must equal the level at start).
//!
//! ## Writes (raw namespaces)
//!
//! An export takes writes when the platform made it writable
//! ([`Table::set_writable`]: raw namespaces that hold no mounted
//! filesystem) and its client's address is in the write list ([`Access`]);
//! every other client sees it read-only. A WRITE is admitted like a read
//! (the same budgets for its buffer, the same device-command budget) and
//! becomes a request whose buffer the payload is taken into straight from
//! the socket ([`Conn::take_payload`]: one copy, nothing decoded
//! meanwhile, and no more input read until the payload is whole); then it
//! is issued as device writes (with FUA when the client asked for it) and
//! answered when the last one completed. A payload cut short (the client
//! left) is never written: its request and buffer are released at once,
//! since no device ever saw them. FLUSH becomes a device Flush of the
//! namespace, which commits every write completed before it on any queue,
//! so a FLUSH on one connection covers every write any connection had
//! replied to (the exports say CAN_MULTI_CONN). WRITE_ZEROES writes zeroes
//! from one zeroed buffer of at most one command's size, in rounds of at
//! most [`ZERO_ROUND`] commands until the range is done (so `NO_HOLE` is
//! always honoured). TRIM is advisory and answered at once without
//! touching the device (as `qemu-nbd` does by default, `--discard=ignore`):
//! the protocol lets the range read as before.
#![cfg_attr(not(test), no_std)]

extern crate alloc;

pub mod access;
pub mod loopback;
pub mod percore;
#[cfg(test)]
mod percore_tests;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod write_tests;

use alloc::collections::BTreeMap;
use alloc::string::String;
use alloc::vec::Vec;
use dioxide_dxfs::File;
use dioxide_iomap::{
    BlockQueue, DioError, DioRequest, DioResult, Engine, IoBuf, Kiocb, Op, ReqId, Ring, Slab,
};
use dioxide_nbd::{
    memory_bound, Conn, Errno, Event, ExportInfo, Exports, MAX_REQUEST, READ_REPLY_HEADER_MAX,
};
use smoltcp::iface::{SocketHandle, SocketSet};
use smoltcp::socket::tcp;
use smoltcp::wire::IpEndpoint;

pub use access::Access;

pub const PORT: u16 = 10809;
pub const CONNS: usize = 16;
/// Reads in flight per connection.
pub const PER_CONN: usize = 128;
/// Request slots: enough for every connection's maximum.
pub const MAX_REQS: usize = CONNS * PER_CONN;
pub const SOCKET_BUF: usize = 256 * 1024;
/// smoltcp's default delayed-ACK time, restored once a connection leaves
/// negotiation (ACKs are immediate while it negotiates).
const ACK_DELAY: smoltcp::time::Duration = smoltcp::time::Duration::from_millis(10);
/// While a connection negotiates, a bare ACK this long after a reply if
/// the client sent nothing since (and one more twice that later, see
/// smoltcp's `Socket::set_idle_ack`): libnbd 1.14 writes every piece of
/// NBD_OPT_LIST_META_CONTEXT with MSG_MORE, and Linux holds the option
/// until its 200 ms probe timer or an ACK from us (`nbdinfo --list`: 0.2 s
/// per export without, about 1.5 ms with).
const IDLE_ACK: smoltcp::time::Duration = smoltcp::time::Duration::from_millis(1);
/// Memory budgets: a connection starts no new read while its buffers
/// (input, output, read buffers in flight: [`Conn::memory`] and `held`)
/// hold this much, and no connection does while all of them together hold
/// [`HELD_TOTAL`]. (A read is always allowed when no read is in flight and
/// no output waits, so a 32 MiB read still goes through.)
pub const HELD_CONN: usize = 8 << 20;
pub const HELD_TOTAL: usize = 48 << 20;
/// A connection whose replies wait and fewer than [`STALL_MIN_BYTES`] of
/// them (or all that waited) are taken in this long, or a closing socket
/// not closed after it, is dropped (aborted); the kernel argument
/// `nbd.stall_s` overrides it. Without it a client that stops reading would
/// hold its socket and its output for as long as its side of TCP answers
/// window probes: forever when a NAT or proxy stands in for a client that
/// has gone (QEMU's user networking does, as the soak test found). Counting
/// bytes, not any progress at all, keeps a peer that takes a byte now and
/// then (a window probe's worth) from holding its socket and output for
/// ever too (the soak saw one hold 8 MB for 38 s). A peer that takes more
/// is served however slowly: behind QEMU's user networking that can be
/// slirp standing in for a client that left with requests unread (it takes
/// the replies, drops them, and passes the client's FIN only after the
/// requests before it are read); the busy report (`log=debug`) shows it.
pub const STALL_NS: u64 = 30_000_000_000;
/// TCP keep-alive and timeout of every connection: a probe after half the
/// stall time without a packet (at least 1 s), and the connection aborted
/// when the peer has sent nothing for `peer_timeout_ns` (at least twice
/// the keep-alive interval). A peer that vanished without its RST or FIN
/// reaching us (a lost RST is never sent again; the soak test lost one on
/// igb, whose full receive ring drops frames) would otherwise hold its
/// socket and buffers for ever while nothing of ours waits to be sent: the
/// probe draws an RST from a host that no longer knows the connection, and
/// the timeout ends one that answers nothing (a host gone, a cable cut).
/// A live client answers the probes and is kept however long it is quiet;
/// one that answers nothing for the peer timeout ([`PEER_TIMEOUT_NS`] by
/// default, `nbd.peer_timeout_s`: a paused VM, a suspended laptop) is
/// dropped. Returns (keep-alive interval, timeout).
pub fn peer_timers(
    stall_ns: u64,
    peer_timeout_ns: u64,
) -> (smoltcp::time::Duration, smoltcp::time::Duration) {
    let keep_ms = (stall_ns / 2_000_000).max(1_000);
    let timeout_ms = (peer_timeout_ns / 1_000_000).max(keep_ms.saturating_mul(2));
    (
        smoltcp::time::Duration::from_millis(keep_ms),
        smoltcp::time::Duration::from_millis(timeout_ms),
    )
}

/// See [`peer_timers`]: how long a peer may send nothing at all (not even
/// an answer to a keep-alive probe) before its connection is dropped.
pub const PEER_TIMEOUT_NS: u64 = 300_000_000_000;

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

/// A buffer the device can write into (page aligned), owned by a read
/// until the device is done with it.
#[allow(clippy::len_without_is_empty)]
pub trait DmaBuffer {
    fn len(&self) -> usize;
    fn as_slice(&self) -> &[u8];
    /// The CPU's view, to fill a write's buffer (never while the device
    /// may read or write it).
    fn as_mut_slice(&mut self) -> &mut [u8];
    /// The device's view of `[off, off + len)` (within the buffer).
    fn part(&mut self, off: usize, len: usize) -> IoBuf;
}

impl DmaBuffer for dioxide_iomap::DmaBuf {
    fn len(&self) -> usize {
        dioxide_iomap::DmaBuf::len(self)
    }
    fn as_slice(&self) -> &[u8] {
        dioxide_iomap::DmaBuf::as_slice(self)
    }
    fn as_mut_slice(&mut self) -> &mut [u8] {
        dioxide_iomap::DmaBuf::as_mut_slice(self)
    }
    fn part(&mut self, off: usize, len: usize) -> IoBuf {
        dioxide_iomap::DmaBuf::part(self, off, len)
    }
}

/// What the service needs of the machine it runs on.
pub trait Platform {
    type Queue: BlockQueue;
    type Buf: DmaBuffer;
    /// A zeroed DMA buffer of `len` bytes, or `None` when memory is short.
    fn alloc_buf(&self, len: usize) -> Option<Self::Buf>;
    /// Runs `f` on this core's DIO engine of namespace `disk` (`None`:
    /// no queue of it here).
    fn with_engine<R>(
        &self,
        disk: usize,
        f: impl FnOnce(&mut Engine<Self::Queue>) -> R,
    ) -> Option<R>;
    /// Reaps this core's queues and delivers every finished asynchronous
    /// request to `sink(owner id, result)` (process context; the sink only
    /// records).
    fn service(&self, sink: &mut dyn FnMut(ReqId, Result<usize, DioError>));
    /// Hands `job` (a read of the connection on socket `sock`) to the core
    /// that serves that connection's storage; gives it back to be issued
    /// here ([`issue`]) when that is this core.
    fn send(&self, _sock: usize, job: Job) -> Result<(), Job> {
        Err(job)
    }
    /// Every result other cores sent back since the last call.
    fn collect(&self, _f: &mut dyn FnMut(Done)) {}
    /// Monotonic nanoseconds.
    fn now_ns(&self) -> u64;
    /// The time-stamp counter, for the profile.
    fn rdtsc(&self) -> u64;
    /// The service went idle (no connection, nothing in flight): what it
    /// did since the last time.
    fn on_idle(&self, _idle: &Idle) {}
}

/// What the service did between two idle times.
#[derive(Clone, Copy, Debug, Default)]
pub struct Idle {
    /// Reads answered since boot.
    pub served: u64,
    /// Connections accepted since boot.
    pub connections: u64,
    /// Reads answered since the last idle report.
    pub requests: u64,
    /// The most reads one connection had in flight at once since the last
    /// idle report (at most [`PER_CONN`]).
    pub peak_in_flight: usize,
    /// Where the time went.
    pub profile: Profile,
}

/// TSC cycles of the service's loop by phase (under TCG emulated cycles,
/// i.e. guest wall time). The caller adds the network stack's time
/// (`net`); the rest is [`Server::poll`]'s.
#[derive(Default, Clone, Copy, Debug)]
pub struct Profile {
    /// The TCP/IP stack and the NIC (the caller's `Interface::poll`).
    pub net: u64,
    /// Completions: reaping the queues, delivering results, collecting
    /// other cores' results.
    pub complete: u64,
    /// Replies to finished reads: the header and the data into the socket
    /// (or the connection's output).
    pub reply: u64,
    /// Requests: socket input into the connections and decoding.
    pub decode: u64,
    /// Starting reads: budgets, buffers, the DIO engine and the doorbell
    /// (or the hand-over to a storage core).
    pub submit: u64,
    /// Output queued in connections into the sockets, stall and close
    /// checks.
    pub send: u64,
    pub loops: u64,
}

impl Profile {
    /// All cycles counted.
    pub fn total(&self) -> u64 {
        self.net + self.complete + self.reply + self.decode + self.submit + self.send
    }
}

/// When a run loop must poll the TCP/IP stack although no frame arrived
/// and no socket was touched: when one of its timers (retransmission,
/// delayed ACK, keep-alive, TIME-WAIT) is due. `Interface::poll_at` walks
/// every socket to find the next one, which after every poll cost more
/// than a fifth of the stack's cycles per request (host benchmark, 16
/// sockets); so it is asked at most once per [`TIMER_CHECK`], and in
/// between the loop polls again no later than `TIMER_CHECK` after its last
/// poll. A timer is then late by at most that much (TCP's are tens of
/// milliseconds or more).
pub struct StackTimer {
    next: smoltcp::time::Instant,
    checked: smoltcp::time::Instant,
}

/// See [`StackTimer`].
pub const TIMER_CHECK: smoltcp::time::Duration = smoltcp::time::Duration::from_millis(1);

impl StackTimer {
    pub fn new(now: smoltcp::time::Instant) -> StackTimer {
        StackTimer {
            next: now,
            checked: now - TIMER_CHECK,
        }
    }

    /// A timer may be due.
    pub fn due(&self, now: smoltcp::time::Instant) -> bool {
        now >= self.next
    }

    /// The stack was polled at `now`.
    pub fn polled(
        &mut self,
        iface: &mut smoltcp::iface::Interface,
        sockets: &SocketSet<'_>,
        now: smoltcp::time::Instant,
    ) {
        if now >= self.checked + TIMER_CHECK {
            self.checked = now;
            self.next = iface
                .poll_at(now, sockets)
                .unwrap_or(now + smoltcp::time::Duration::from_millis(100));
        } else {
            self.next = self.next.min(now + TIMER_CHECK);
        }
    }
}

enum Target {
    File(alloc::boxed::Box<File>),
    Raw,
    /// `null`: zeros without touching the device, to measure the network
    /// path alone.
    Null,
}

const NULL_MAX: usize = 64 * 1024;
static ZEROS: [u8; NULL_MAX] = [0; NULL_MAX];

struct Export {
    name: String,
    info: ExportInfo,
    target: Target,
    /// The namespace it reads (the platform's index; the null export names
    /// the first) and its logical block size.
    disk: usize,
    lbs: u64,
}

/// The export table, built at start and shared with other cores.
#[derive(Default)]
pub struct Table {
    exports: Vec<Export>,
    by_name: BTreeMap<String, u32>,
    /// The filesystems' write paths, one per namespace.
    writers: Vec<dioxide_dxfs::Writer>,
    /// How often changes the write paths hold are committed without a
    /// client asking ([`Table::set_commit_interval`]; 0: never), and when
    /// next (the platform's clock; the first core to see it due takes it).
    commit_ns: u64,
    next_commit: core::sync::atomic::AtomicU64,
}

impl Table {
    pub fn new() -> Table {
        Table::default()
    }

    fn push(&mut self, e: Export) {
        self.by_name
            .insert(e.name.clone(), self.exports.len() as u32);
        self.exports.push(e);
    }

    /// Exports `file` as `name` (no leading slash): it lives on namespace
    /// `disk` of `lbs`-byte blocks in a filesystem of `fs_block`-byte
    /// blocks. Any alignment is served (through the covering aligned
    /// range), and file sizes need not be block multiples.
    pub fn add_file(&mut self, name: String, file: File, fs_block: u32, disk: usize, lbs: u32) {
        self.push(Export {
            name,
            info: ExportInfo {
                size: file.size(),
                min_block: 1,
                preferred_block: fs_block,
                max_block: MAX_REQUEST,
                writable: false,
                write_block: 0,
            },
            target: Target::File(alloc::boxed::Box::new(file)),
            disk,
            lbs: lbs as u64,
        });
    }

    /// Exports namespace `disk` (`bytes` long, `lbs`-byte blocks) raw as
    /// `name`.
    pub fn add_raw(&mut self, name: String, bytes: u64, disk: usize, lbs: u32) {
        self.push(Export {
            name,
            info: ExportInfo {
                size: bytes,
                min_block: lbs,
                preferred_block: 4096.max(lbs),
                max_block: MAX_REQUEST,
                writable: false,
                write_block: 0,
            },
            target: Target::Raw,
            disk,
            lbs: lbs as u64,
        });
    }

    /// The `null` export of `size` bytes.
    pub fn add_null(&mut self, size: u64) {
        self.push(Export {
            name: "null".into(),
            info: ExportInfo {
                size,
                min_block: 1,
                preferred_block: 4096,
                max_block: NULL_MAX as u32,
                writable: false,
                write_block: 0,
            },
            target: Target::Null,
            disk: 0,
            lbs: 1,
        });
    }

    /// Lets export `name` take writes (from clients the [`Access`] lists
    /// allow): a raw namespace (the platform makes one writable only when
    /// no mounted filesystem lives on it) or a file. A file takes
    /// overwrites of its written blocks (the simple write path: no
    /// metadata changes, so nothing a crash can leave half done); a write
    /// into a hole or an unwritten extent goes to its filesystem's write
    /// path ([`Table::attach_writer`]), and without one is answered
    /// `ENOTSUP`. Its writes must be whole filesystem blocks
    /// ([`ExportInfo::write_block`]); reads stay at any byte.
    pub fn set_writable(&mut self, name: &str) -> Result<(), NotWritable> {
        let id = *self.by_name.get(name).ok_or(NotWritable::NoSuchExport)?;
        let e = &mut self.exports[id as usize];
        match e.target {
            Target::Raw => {
                e.info.writable = true;
                Ok(())
            }
            Target::File(_) => {
                e.info.writable = true;
                e.info.write_block = e.info.preferred_block;
                Ok(())
            }
            Target::Null => Err(NotWritable::Null),
        }
    }

    /// Gives every writable file export on namespace `disk` its
    /// filesystem's write path (allocating writes, reads of filled holes,
    /// FLUSH as a commit); returns how many.
    pub fn attach_writer(&mut self, disk: usize, w: &dioxide_dxfs::Writer) -> usize {
        let mut n = 0;
        for e in self
            .exports
            .iter_mut()
            .filter(|e| e.disk == disk && e.info.writable)
        {
            if let Target::File(f) = &mut e.target {
                **f = (**f).clone().with_writer(w.clone());
                n += 1;
            }
        }
        if n > 0 {
            self.writers.push(w.clone());
        }
        n
    }

    /// Commits what the write paths hold every `ns` nanoseconds (0: never),
    /// as ext4 commits its journal every 5 s: an allocating write that no
    /// FLUSH or FUA followed is durable that long after it was answered at
    /// the latest, not only when its client disconnects.
    pub fn set_commit_interval(&mut self, ns: u64) {
        self.commit_ns = ns;
    }

    /// The periodic commit ([`Table::set_commit_interval`]), when it is
    /// due at `now`: one core takes it; a write path that some core holds,
    /// or that has nothing to commit, is skipped until the next time.
    /// Returns how many write paths committed.
    fn commit_due(&self, now: u64) -> usize {
        use core::sync::atomic::Ordering;
        if self.commit_ns == 0 || self.writers.is_empty() {
            return 0;
        }
        let next = self.next_commit.load(Ordering::Relaxed);
        if next == 0 {
            // The first look starts the clock.
            let _ = self.next_commit.compare_exchange(
                0,
                now + self.commit_ns,
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
            return 0;
        }
        if now < next
            || self
                .next_commit
                .compare_exchange(
                    next,
                    now + self.commit_ns,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_err()
        {
            return 0;
        }
        let mut n = 0;
        for w in &self.writers {
            match w.0.commit_if_dirty() {
                Ok(c) => n += c as usize,
                Err(e) => log::warn!(target: "dxfs", "periodic commit: {e}"),
            }
        }
        n
    }

    /// Commits every filesystem's write path (a device flush when nothing
    /// changed); the first error is logged.
    fn commit_writers(&self) {
        for w in &self.writers {
            if let Err(e) = w.0.commit() {
                log::warn!(target: "dxfs", "commit at a connection's end: {e}");
            }
        }
    }

    /// The exports that take writes.
    pub fn writable(&self) -> impl Iterator<Item = &str> + '_ {
        self.exports
            .iter()
            .filter(|e| e.info.writable)
            .map(|e| e.name.as_str())
    }

    /// The raw exports: name and namespace of each.
    pub fn raws(&self) -> impl Iterator<Item = (&str, usize)> + '_ {
        self.exports
            .iter()
            .filter(|e| matches!(e.target, Target::Raw))
            .map(|e| (e.name.as_str(), e.disk))
    }

    pub fn len(&self) -> usize {
        self.exports.len()
    }

    /// The file exports: name, size and namespace of each.
    pub fn files(&self) -> impl Iterator<Item = (&str, u64, usize)> + '_ {
        self.exports
            .iter()
            .filter(|e| matches!(e.target, Target::File(_)))
            .map(|e| (e.name.as_str(), e.info.size, e.disk))
    }

    pub fn is_empty(&self) -> bool {
        self.exports.is_empty()
    }
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

/// Why [`Table::set_writable`] refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NotWritable {
    NoSuchExport,
    /// The `null` export has nothing to write to.
    Null,
}

impl core::fmt::Display for NotWritable {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            NotWritable::NoSuchExport => "no such export",
            NotWritable::Null => "the null export takes no writes",
        })
    }
}

impl core::error::Error for NotWritable {}

/// What a namespace's queue gives the service's reads.
#[derive(Clone, Copy, Debug)]
pub struct DiskLimits {
    /// Commands the queue holds.
    pub depth: usize,
    /// Largest transfer of one command, bytes.
    pub max_transfer: usize,
    /// Logical block size.
    pub lbs: usize,
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
            // A write needing allocation on a file without a write path
            // (its filesystem has no commit log).
            Failure::Dio(DioError::Unallocated { .. }) => Errno::NotSup,
            Failure::Dio(DioError::Fs(dioxide_iomap::IomapError::NoSpace)) => Errno::NoSpc,
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

/// What a request does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Read,
    /// Its payload is taken into the buffer first ([`Fill`]); `fua`: each
    /// device write with FUA.
    Write {
        fua: bool,
    },
    /// A device Flush of the namespace.
    Flush,
    /// Zeroes written from the zeroed buffer, in rounds of at most
    /// [`ZERO_ROUND`] commands; `issued`: bytes handed to the device so far.
    Zero {
        fua: bool,
        issued: u32,
    },
}

impl Kind {
    fn what(self) -> &'static str {
        match self {
            Kind::Read => "read",
            Kind::Write { .. } => "write",
            Kind::Flush => "flush",
            Kind::Zero { .. } => "write-zeroes",
        }
    }
}

/// Device commands of one round of a WRITE_ZEROES: its zeroed buffer is
/// written this many times at once, then again until the range is done.
pub const ZERO_ROUND: usize = 8;

/// A write whose payload is arriving: into request `id`'s buffer (`got`
/// bytes so far), or, when the write was refused after its admission (no
/// buffer could be had), discarded and answered `err`. A payload of which
/// fewer than [`STALL_MIN_BYTES`] (or the rest) arrive in the stall time
/// ends the connection, as replies not taken do: a client must not hold a
/// write's buffer by sending half of it, or a byte now and then.
#[derive(Clone, Copy, Debug)]
struct Fill {
    to: FillTo,
    /// When the payload last had [`STALL_MIN_BYTES`] arrive (or began),
    /// and what arrived since: a payload must keep at least that rate.
    since: u64,
    moved: usize,
}

#[derive(Clone, Copy, Debug)]
enum FillTo {
    Req { id: ReqId, got: u32 },
    Discard { handle: u64, err: Errno },
}

/// A request in flight: owns its buffer until the device is done with it.
struct Req<B> {
    kind: Kind,
    sock: u16,
    gen: u32,
    handle: u64,
    export: u32,
    offset: u64,
    skew: u32,
    len: u32,
    /// Device commands reserved for it (see [`Budget`]).
    cmds: u32,
    /// Parts (device requests) outstanding, plus one while submitting.
    parts: u32,
    /// Bytes a part must deliver (a file read may end at end of file; raw
    /// parts always deliver their whole length: 0).
    need: usize,
    /// The first failure of a part.
    failure: Option<Failure>,
    /// Flushes have none.
    buf: Option<B>,
}

impl<B> Req<B> {
    fn fail(&mut self, f: Failure) {
        self.failure.get_or_insert(f);
    }
}

impl<B: DmaBuffer> Req<B> {
    /// Buffer bytes it holds (its share of the budgets).
    fn held(&self) -> usize {
        self.buf.as_ref().map_or(0, |b| b.len())
    }
}

/// A part's result (or `None`) and the request references it drops, as a
/// storage core sends it back.
#[derive(Clone, Copy, Debug)]
pub struct Done {
    pub id: ReqId,
    pub result: Option<Result<usize, DioError>>,
    pub refs: u32,
}

/// What became of request `id`'s parts, from this core or a storage core:
/// a part's result (if any) is recorded, then `refs` of its references are
/// dropped (one per part ended, plus the submission's own).
fn apply<B>(
    reqs: &mut Slab<Req<B>>,
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
fn put<B>(reqs: &mut Slab<Req<B>>, ready: &mut Ring<ReqId>, id: ReqId, n: u32) {
    let Some(req) = reqs.get_mut(id) else {
        return;
    };
    let Some(left) = req.parts.checked_sub(n) else {
        // Cannot happen (each command part is counted once); were it to,
        // the request would never be replied to: say so.
        log::error!(target: "nbd", "request {id:?}: {n} parts completed of {} outstanding", req.parts);
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
    flow: Flow,
}

/// A connection's peer for the logs: its endpoint, or `?` once its socket
/// was reset.
struct Peer(Option<IpEndpoint>);

impl core::fmt::Display for Peer {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self.0 {
            Some(e) => write!(f, "{e}"),
            None => f.write_str("?"),
        }
    }
}

/// How a connection's replies leave, for the stall time.
#[derive(Clone, Copy, Debug, Default)]
struct Flow {
    /// When the connection last had no reply waiting or took
    /// [`STALL_MIN_BYTES`] of them, or when closing began
    /// ([`Platform::now_ns`]); the socket's send queue at the last look,
    /// and the bytes taken (acknowledged) since `progress`.
    progress: u64,
    queued: usize,
    taken: usize,
    /// Bytes written to the socket by replies since the last look.
    sent: usize,
}

/// A decoded request about to start ([`Server::start_request`]).
struct NewRead {
    kind: Kind,
    sock: usize,
    gen: u32,
    handle: u64,
    export: u32,
    offset: u64,
    len: u32,
    disk: usize,
    /// Device commands reserved for it.
    need: usize,
}

/// Whether the peer finished sending (FIN received) or the connection is
/// gone. (Before Established, `may_recv()` is false too: not that.)
fn peer_done(sock: &tcp::Socket) -> bool {
    matches!(
        sock.state(),
        tcp::State::CloseWait
            | tcp::State::LastAck
            | tcp::State::Closing
            | tcp::State::TimeWait
            | tcp::State::Closed
    )
}

/// The service: its sockets, the reads in flight, buffers and budgets.
pub struct Server<P: Platform> {
    p: P,
    /// Built at start and never changed: shared with the storage cores.
    table: &'static Table,
    sockets: Vec<Sock>,
    /// Reads in flight (or finished, waiting for their reply).
    reqs: Slab<Req<P::Buf>>,
    /// Reads whose last part finished, in order.
    ready: Ring<ReqId>,
    /// Finished reads whose replies wait for room in their socket, in order.
    waiting: Ring<ReqId>,
    small: Vec<P::Buf>,
    large: Vec<P::Buf>,
    /// Read buffer bytes in flight per socket (current connection only),
    /// and in all (stale requests of closed connections too).
    held: Vec<usize>,
    held_total: usize,
    /// Per namespace: device commands reserved and available.
    budgets: Vec<Budget>,
    /// Per socket: the write whose payload is arriving.
    fills: Vec<Option<Fill>>,
    /// Who may connect and who may write.
    access: Access,
    /// Heap held by all connections ([`Conn::memory`]) and output waiting
    /// on them, updated each poll.
    conn_memory: usize,
    output_total: usize,
    /// A connection was served since the last idle report.
    busy: bool,
    served: u64,
    served_at_idle: u64,
    /// Connections accepted since start.
    connections: u64,
    /// Idle reports made ([`Platform::on_idle`] calls) since start: the
    /// caller's cue for reports of its own (the kernel's per-core line).
    pub idle_reports: u64,
    /// The most reads one connection had in flight since the last idle
    /// report.
    peak_in_flight: usize,
    /// A socket was read, written, opened or closed in this poll: the
    /// network stack has work.
    touched: bool,
    /// Where the loop's time went since the last idle report; the caller
    /// adds the network stack's (`net`).
    pub prof: Profile,
    stall_ns: u64,
}

impl<P: Platform> Server<P> {
    /// Opens [`CONNS`] listening sockets on [`PORT`] in `sockets` (their
    /// buffers allocated now) and serves `table`'s exports, whose
    /// namespaces' queues are `disks` (by index). A connection whose
    /// replies are not taken is dropped after `stall_ns`.
    pub fn new(
        p: P,
        sockets: &mut SocketSet<'static>,
        table: &'static Table,
        disks: &[DiskLimits],
        stall_ns: u64,
    ) -> Server<P> {
        let mut socks = Vec::with_capacity(CONNS);
        for _ in 0..CONNS {
            let mut s = tcp::Socket::new(
                tcp::SocketBuffer::new(alloc::vec![0u8; SOCKET_BUF]),
                tcp::SocketBuffer::new(alloc::vec![0u8; SOCKET_BUF]),
            );
            s.set_nagle_enabled(false);
            // Kept across listen() and reset(): every connection has them.
            let (keep_alive, timeout) = peer_timers(stall_ns, PEER_TIMEOUT_NS);
            s.set_keep_alive(Some(keep_alive));
            s.set_timeout(Some(timeout));
            let _ = s.listen(PORT);
            socks.push(Sock {
                handle: sockets.add(s),
                slot: Slot::Listening,
                gen: 0,
                flow: Flow::default(),
            });
        }
        let budgets = disks
            .iter()
            .map(|d| {
                let lbs = d.lbs.max(1);
                Budget {
                    cmds: 0,
                    max_cmds: d.depth,
                    max_transfer: d.max_transfer / lbs * lbs,
                }
            })
            .collect();
        Server {
            p,
            table,
            sockets: socks,
            reqs: Slab::new(MAX_REQS),
            ready: Ring::new(MAX_REQS, ReqId::new(0, 0)),
            waiting: Ring::new(MAX_REQS, ReqId::new(0, 0)),
            small: Vec::new(),
            large: Vec::new(),
            held: alloc::vec![0; CONNS],
            held_total: 0,
            budgets,
            fills: alloc::vec![None; CONNS],
            access: Access::default(),
            conn_memory: 0,
            output_total: 0,
            busy: false,
            served: 0,
            served_at_idle: 0,
            connections: 0,
            idle_reports: 0,
            peak_in_flight: 0,
            touched: true,
            prof: Profile::default(),
            stall_ns,
        }
    }

    /// Sets how long a peer may send nothing before its connection is
    /// dropped ([`peer_timers`]; [`PEER_TIMEOUT_NS`] by default).
    pub fn set_peer_timeout(&mut self, sockets: &mut SocketSet<'_>, peer_timeout_ns: u64) {
        let (keep_alive, timeout) = peer_timers(self.stall_ns, peer_timeout_ns);
        for s in &self.sockets {
            let sock = sockets.get_mut::<tcp::Socket>(s.handle);
            sock.set_keep_alive(Some(keep_alive));
            sock.set_timeout(Some(timeout));
        }
    }

    /// Sets who may connect and who may write (by default anyone
    /// connects and nobody writes); connections already accepted keep
    /// what they were told.
    pub fn set_access(&mut self, access: Access) {
        self.access = access;
    }

    pub fn platform(&self) -> &P {
        &self.p
    }

    pub fn table(&self) -> &'static Table {
        self.table
    }

    /// Reads answered since start.
    pub fn served(&self) -> u64 {
        self.served
    }

    /// Connections accepted since start.
    pub fn connections(&self) -> u64 {
        self.connections
    }

    /// Reads in flight (or finished and not yet answered).
    pub fn in_flight(&self) -> usize {
        self.reqs.len()
    }

    /// The busy report of core `core` (`log=debug`; the run loop asks for
    /// it every 10 s while anything is served): what the server holds and
    /// why it is not idle — the reads in flight (and how many of them are
    /// answered and wait for room in their socket), then a line per
    /// connection with its peer (`?` once its socket was reset), TCP
    /// state, reads in flight, bytes waiting to be sent (queued replies and
    /// the socket's send queue), request bytes it has not read, and how
    /// long ago it last made progress (took [`STALL_MIN_BYTES`] of its
    /// replies, or had none waiting: [`STALL_NS`] counts from there).
    /// Returns whether it reported (not when idle).
    pub fn report_busy(&self, sockets: &mut SocketSet<'_>, core: usize) -> bool {
        if !self.busy {
            return false;
        }
        let now = self.p.now_ns();
        log::debug!(
            target: "nbd",
            "busy: core {core}: {} reads in flight, {} of them answered and waiting for room",
            self.reqs.len(),
            self.waiting.len()
        );
        for s in &self.sockets {
            let Slot::Serving(c) = &s.slot else {
                continue;
            };
            let t = sockets.get_mut::<tcp::Socket>(s.handle);
            let peer = Peer(t.remote_endpoint());
            log::debug!(
                target: "nbd",
                "busy: core {core}: connection {peer}: {}, {} reads in flight, {} bytes waiting to be sent ({} in the socket), {} bytes of requests unread, last progress {} ms ago",
                t.state(),
                c.in_flight(),
                c.output_pending() + t.send_queue(),
                t.send_queue(),
                t.recv_queue(),
                now.saturating_sub(s.flow.progress) / 1_000_000
            );
        }
        true
    }

    /// Serves every connection as far as it can go without waiting: runs
    /// the completion path, replies to finished reads, reads requests,
    /// submits them, and sends what is ready.
    /// Returns whether any socket was touched (the network stack then has
    /// work to do). `net_polled`: the stack ran since the last call; only
    /// then can a listening or closing socket have changed, so otherwise
    /// only the connections are visited.
    pub fn poll(&mut self, sockets: &mut SocketSet<'_>, net_polled: bool) -> bool {
        self.touched = false;
        let t0 = self.p.rdtsc();
        let (reqs, ready) = (&mut self.reqs, &mut self.ready);
        self.p
            .service(&mut |id, r| apply(reqs, ready, id, Some(r), 1));
        self.p
            .collect(&mut |d| apply(reqs, ready, d.id, d.result, d.refs));
        let t1 = self.p.rdtsc();
        self.reply_completed(sockets);
        let t2 = self.p.rdtsc();
        self.prof.complete += t1 - t0;
        self.prof.reply += t2 - t1;
        (self.conn_memory, self.output_total) = self
            .sockets
            .iter()
            .map(|s| match &s.slot {
                Slot::Serving(c) => (c.memory(), c.output_pending()),
                _ => (0, 0),
            })
            .fold((0, 0), |(m, o), (a, b)| (m + a, o + b));
        // The sockets' states leave `self` while they are polled (the
        // vector is moved, nothing copied), so that each step borrows its
        // socket and the server's other fields at once.
        let mut socks = core::mem::take(&mut self.sockets);
        for (i, s) in socks.iter_mut().enumerate() {
            if net_polled || matches!(s.slot, Slot::Serving(_)) {
                self.poll_socket(sockets, i, s);
            }
        }
        self.sockets = socks;
        if self.table.commit_ns != 0 {
            // (The clock read only where a write path commits by time.)
            self.table.commit_due(self.p.now_ns());
        }
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
            let idle = Idle {
                served: self.served,
                connections: self.connections,
                requests: self.served - self.served_at_idle,
                peak_in_flight: self.peak_in_flight,
                profile: self.prof,
            };
            self.p.on_idle(&idle);
            self.idle_reports += 1;
            self.served_at_idle = self.served;
            self.peak_in_flight = 0;
            self.prof = Profile::default();
        }
        self.touched
    }

    /// Replies to the reads whose last part completed — those that waited
    /// for room first, in order, then the new ones.
    fn reply_completed(&mut self, sockets: &mut SocketSet<'_>) {
        for _ in 0..self.waiting.len() {
            let Some(id) = self.waiting.pop() else {
                break;
            };
            if !self.reply(id, sockets) {
                // Each request is in one ring at a time and each ring holds
                // one entry per slab entry: it cannot be full.
                let _ = self.waiting.push(id);
            }
        }
        while let Some(id) = self.ready.pop() {
            if !self.reply(id, sockets) {
                let _ = self.waiting.push(id);
            }
        }
    }

    /// Replies to request `id` and frees it; or, when its reply must wait
    /// for room in the socket, changes nothing and returns false. A
    /// write-zeroes whose range is not done yet is issued again instead.
    ///
    /// A read's reply goes from its DMA buffer straight into the socket
    /// (the one copy) when its connection has nothing queued before it and
    /// the socket has room for the header and the data. When the socket is
    /// short of room, or control replies wait in the connection's output,
    /// the reply waits in its buffer, still counted in the budgets (which
    /// hold back new reads) and in the connection's reads in flight (which
    /// hold back decoding): flow control without a copy or an allocation.
    /// Only a reply larger than the whole socket buffer, a failed read, or
    /// a connection that is closing goes through the connection's output
    /// queue. Other requests' replies (16 bytes) go through the output.
    fn reply(&mut self, id: ReqId, sockets: &mut SocketSet<'_>) -> bool {
        let Some(req) = self.reqs.get(id) else {
            return true;
        };
        let (kind, len, failed, sock) = (req.kind, req.len, req.failure.is_some(), req.sock);
        // A write-zeroes goes on while its client is there to be answered.
        let s = &self.sockets[sock as usize];
        let current = s.gen == req.gen && matches!(s.slot, Slot::Serving(_));
        match kind {
            Kind::Read if !self.send_read(id, sockets) => return false,
            Kind::Zero { issued, .. } if issued < len && !failed && current => {
                let sock = sock as usize;
                submit(
                    &self.p,
                    self.table,
                    &self.budgets,
                    &mut self.reqs,
                    &mut self.ready,
                    id,
                    sock,
                );
                return true;
            }
            _ => {}
        }
        let Some(req) = self.reqs.remove(id) else {
            return true;
        };
        self.served += 1;
        let current = self.sockets[req.sock as usize].gen == req.gen;
        self.release(&req, current);
        let s = &mut self.sockets[req.sock as usize];
        if let (true, Slot::Serving(conn)) = (s.gen == req.gen, &mut s.slot) {
            match req.failure {
                Some(f) => {
                    // The one report of this failure (the layers below
                    // leave it to the owner): the request and its cause.
                    let name = self
                        .table
                        .exports
                        .get(req.export as usize)
                        .map_or("?", |e| e.name.as_str());
                    let what = req.kind.what();
                    // A write into a hole is the client's doing, as often
                    // as it likes: not an error of the appliance's.
                    let level = match f {
                        Failure::Dio(DioError::Unallocated { .. }) => log::Level::Debug,
                        _ => log::Level::Error,
                    };
                    log::log!(
                        target: "nbd",
                        level,
                        "{what} of {name} at {} ({} bytes, handle {:#x}) failed: {f}",
                        req.offset, req.len, req.handle
                    );
                    if req.kind == Kind::Read {
                        let mut msg = MsgBuf::new();
                        let _ = core::fmt::write(
                            &mut msg,
                            format_args!(
                                "read of {name} at {} ({} bytes) failed: {f}",
                                req.offset, req.len
                            ),
                        );
                        conn.reply_read_error(self.table, req.handle, f.errno(), msg.as_str());
                    } else {
                        conn.reply(self.table, req.handle, Err(f.errno()));
                    }
                }
                None if req.kind == Kind::Read => {}
                None => conn.reply(self.table, req.handle, Ok(())),
            }
        }
        if let Some(buf) = req.buf {
            self.recycle(buf);
        }
        true
    }

    /// Sends finished read `id`'s data when it succeeded and its
    /// connection is still there (see [`Server::reply`]); false when the
    /// reply must wait for room.
    fn send_read(&mut self, id: ReqId, sockets: &mut SocketSet<'_>) -> bool {
        let Some(req) = self.reqs.get(id) else {
            return true;
        };
        let s = &mut self.sockets[req.sock as usize];
        if let (true, Slot::Serving(conn), None, Some(buf)) =
            (s.gen == req.gen, &mut s.slot, req.failure, &req.buf)
        {
            let (a, n) = (req.skew as usize, req.len as usize);
            let data = &buf.as_slice()[a..a + n];
            let sock = sockets.get_mut::<tcp::Socket>(s.handle);
            let fits_socket = n + READ_REPLY_HEADER_MAX <= sock.send_capacity();
            if conn.in_transmission() && fits_socket {
                let mut wrote = 0;
                let sent = conn.reply_read_direct(self.table, req.handle, req.offset, n, |h| {
                    send_whole(sock, h, data).map(|w| wrote = w).is_some()
                });
                if !sent {
                    return false;
                }
                s.flow.sent += wrote;
                self.touched = true;
            } else {
                conn.reply_read(self.table, req.handle, req.offset, Ok(data));
            }
        }
        true
    }

    /// Gives back what request `req` (just removed) held of the budgets;
    /// `current`: its connection is the one on its socket now.
    fn release(&mut self, req: &Req<P::Buf>, current: bool) {
        self.held_total -= req.held();
        if let Some(b) = self
            .table
            .exports
            .get(req.export as usize)
            .and_then(|e| self.budgets.get_mut(e.disk))
        {
            b.cmds -= req.cmds as usize;
        }
        if current {
            self.held[req.sock as usize] -= req.held();
        }
    }

    /// One socket's turn of the run loop, in named steps: accept or recycle
    /// the socket; take the input its budgets allow; end a hard disconnect;
    /// start the reads that fit the budgets; send what is ready and account
    /// for a stall.
    fn poll_socket(&mut self, sockets: &mut SocketSet<'_>, i: usize, s: &mut Sock) {
        let t0 = self.p.rdtsc();
        let sock = sockets.get_mut::<tcp::Socket>(s.handle);
        self.tend_socket(sock, s, i);
        let Slot::Serving(conn) = &mut s.slot else {
            return;
        };
        // This connection's share of the totals taken at the poll's start
        // (its own figures change below; the others' do not). A connection
        // accepted just now was not in them: hence the saturation.
        let (m0, o0) = (conn.memory(), conn.output_pending());
        let payload_stalled = !self.take_input(sock, conn, i);
        if payload_stalled || (peer_done(sock) && !sock.can_recv() && !conn.is_closed()) {
            // A client that closes without NBD_CMD_DISC (or before the
            // replies to its requests) made a hard disconnect: drop the
            // connection now rather than push replies nobody reads. Reads
            // in flight keep their buffers until the device is done; their
            // completions are then dropped (the slot is no longer serving).
            // A write whose payload stopped coming ends the same way.
            conn.peer_closed();
            log::debug!(target: "nbd", "hard disconnect with {} requests in flight{}", conn.in_flight(),
                if payload_stalled { " (a write's payload stalled)" } else { "" });
            sock.abort();
            s.slot = Slot::Closing;
            s.flow.progress = self.p.now_ns();
            self.end_fill(i);
            // What a client wrote without FLUSH is committed when it goes.
            self.table.commit_writers();
            self.touched = true;
            return;
        }
        let t1 = self.p.rdtsc();
        let direct = self.start_requests(sock, conn, i, s.gen, (m0, o0));
        let t2 = self.p.rdtsc();
        if self.send_output(sock, conn, &mut s.flow, direct) {
            s.slot = Slot::Closing;
            self.end_fill(i);
            self.table.commit_writers();
        }
        let t3 = self.p.rdtsc();
        self.prof.decode += t1 - t0;
        self.prof.submit += t2 - t1;
        self.prof.send += t3 - t2;
    }

    /// A listening socket that got a connection starts serving it; a
    /// closing one listens again once its peer let go (or stalled).
    fn tend_socket(&mut self, sock: &mut tcp::Socket, s: &mut Sock, i: usize) {
        match s.slot {
            Slot::Listening => {
                // Past SYN-RECEIVED only: an RST then (or a lost handshake
                // ACK and the client's RST) puts smoltcp's socket back to
                // LISTEN, which a serving slot would not notice. A
                // handshake that never completes is bounded by the peer
                // timeout (smoltcp aborts it), then listens again below.
                if sock.is_active() && sock.state() != tcp::State::SynReceived {
                    let peer = sock.remote_endpoint();
                    if !peer.is_some_and(|e| self.access.may_connect(e.addr)) {
                        // Not in the connect list: reset before the
                        // greeting, nothing given to it.
                        log::info!(target: "nbd", "connection from {} refused: not in nbd.allow", Peer(peer));
                        sock.abort();
                        self.touched = true;
                        return;
                    }
                    let writer = peer.is_some_and(|e| self.access.may_write(e.addr));
                    log::debug!(target: "nbd", "connection from {}{}", Peer(peer), if writer { " (may write)" } else { "" });
                    s.gen = s.gen.wrapping_add(1);
                    s.flow = Flow {
                        progress: self.p.now_ns(),
                        ..Flow::default()
                    };
                    self.end_fill(i);
                    self.held[i] = 0;
                    let mut conn = Conn::new(PER_CONN);
                    conn.allow_writes(writer);
                    s.slot = Slot::Serving(conn);
                    self.connections += 1;
                    // Negotiation is a series of small round trips: a client
                    // that writes an option in pieces waits for our ACK of
                    // the first before sending the rest (Nagle).
                    sock.set_ack_delay(None);
                    sock.set_idle_ack(Some(IDLE_ACK));
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
                    || self.p.now_ns().saturating_sub(s.flow.progress) > self.stall_ns
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
    }

    /// Input only as the connection has room for it, and none while all
    /// connections together hold the global budget: what is not taken
    /// stays in the socket and TCP flow control holds the client. A
    /// write's payload goes first, into its own buffer (its memory was
    /// admitted with it), and nothing else is read until it is whole. Once
    /// in transmission, ACKs are delayed again and idle ACKs stop. Returns
    /// false when a payload stopped coming for the stall time (the caller
    /// drops the connection).
    fn take_input(&mut self, sock: &mut tcp::Socket, conn: &mut Conn, i: usize) -> bool {
        if self.fills[i].is_some() {
            self.fill_payload(sock, conn, i);
            if let Some(f) = self.fills[i] {
                return self.p.now_ns().saturating_sub(f.since) <= self.stall_ns;
            }
        }
        let global_full = self.held_total + self.conn_memory >= HELD_TOTAL;
        loop {
            let room = if global_full { 0 } else { conn.input_room() };
            // A write's payload waits for its buffer (`fill_payload`).
            if room == 0 || !sock.can_recv() || conn.payload_pending() > 0 {
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
            sock.set_idle_ack(None);
        }
        true
    }

    /// Moves the arriving write's payload of socket `i` into its buffer:
    /// what the connection holds of it, then what the socket has. A whole
    /// payload's write is submitted (a discarded one answered) and the
    /// requests after it decoded ([`Conn::resume`]).
    fn fill_payload(&mut self, sock: &mut tcp::Socket, conn: &mut Conn, i: usize) {
        let Some(mut fill) = self.fills[i] else {
            return;
        };
        if conn.payload_pending() == 0 {
            // The connection ended (closed itself) before the payload was
            // whole: it will never be.
            self.end_fill(i);
            return;
        }
        let mut scratch = [0u8; 2048];
        let done = loop {
            let dst: &mut [u8] = match fill.to {
                FillTo::Req { id, got } => {
                    match self.reqs.get_mut(id).and_then(|r| {
                        let len = r.len as usize;
                        r.buf
                            .as_mut()
                            .map(|b| &mut b.as_mut_slice()[got as usize..len])
                    }) {
                        Some(d) => d,
                        // Cannot happen (the request is removed only with
                        // its fill); were it to, the payload is dropped.
                        None => &mut scratch,
                    }
                }
                FillTo::Discard { .. } => &mut scratch,
            };
            // Bytes that arrived with the request first, then the socket's.
            let mut step = conn.take_payload(&[], dst);
            if step.written == 0 && sock.can_recv() {
                step = match sock.recv(|b| {
                    let p = conn.take_payload(b, dst);
                    (p.from_data, p)
                }) {
                    Ok(p) => p,
                    Err(_) => break false,
                };
            }
            if step.written == 0 {
                break false;
            }
            self.touched = true;
            fill.moved += step.written;
            if fill.moved >= STALL_MIN_BYTES {
                fill.since = self.p.now_ns();
                fill.moved = 0;
            }
            if let FillTo::Req { got, .. } = &mut fill.to {
                *got += step.written as u32;
            }
            if step.done {
                break true;
            }
        };
        if !done {
            self.fills[i] = Some(fill);
            return;
        }
        self.fills[i] = None;
        match fill.to {
            FillTo::Req { id, .. } => submit(
                &self.p,
                self.table,
                &self.budgets,
                &mut self.reqs,
                &mut self.ready,
                id,
                i,
            ),
            FillTo::Discard { handle, err } => conn.reply(self.table, handle, Err(err)),
        }
        conn.resume(self.table);
    }

    /// Socket `i`'s connection ended (or a new one begins): the write whose
    /// payload was arriving is never issued; its request and buffer (no
    /// device saw them) are released now.
    fn end_fill(&mut self, i: usize) {
        let Some(Fill {
            to: FillTo::Req { id, .. },
            ..
        }) = self.fills[i].take()
        else {
            return;
        };
        if let Some(req) = self.reqs.remove(id) {
            self.release(&req, true);
            if let Some(buf) = req.buf {
                self.recycle(buf);
            }
        }
    }

    /// Starts the decoded requests of socket `i` (connection `gen`) while
    /// they fit the budgets and the device queue; null reads and trims are
    /// answered at once, a write starts taking its payload. `at_start`:
    /// the connection's memory and output at the poll's start. Returns the
    /// bytes of null replies written straight into the socket.
    fn start_requests(
        &mut self,
        sock: &mut tcp::Socket,
        conn: &mut Conn,
        i: usize,
        gen: u32,
        at_start: (usize, usize),
    ) -> usize {
        let (m0, o0) = at_start;
        let mut direct = 0;
        while let Some(&ev) = conn.peek_event() {
            if self.fills[i].is_some() {
                // Nothing after a write is decoded before its payload.
                break;
            }
            let (export, span) = match ev {
                Event::Read { export, len, .. }
                | Event::Write { export, len, .. }
                | Event::Trim { export, len, .. }
                | Event::WriteZeroes { export, len, .. } => (export, len),
                Event::Flush { export, .. } => (export, 0),
            };
            let peeked = self.table.exports.get(export as usize);
            let (disk, lbs) = peeked.map_or((0, 512), |e| (e.disk, e.lbs));
            let null = matches!(
                peeked,
                Some(Export {
                    target: Target::Null,
                    ..
                })
            );
            let max_t = self.budgets.get(disk).map_or(0, |b| b.max_transfer);
            // Buffer bytes the request will hold.
            let hold = match ev {
                Event::Read { len, .. } | Event::Write { len, .. } => len as usize,
                Event::WriteZeroes { len, .. } => zero_chunk(len, max_t),
                Event::Flush { .. } | Event::Trim { .. } => 0,
            };
            // Budgets count the heap really held (capacities, not bytes
            // waiting); a request always goes when nothing is in flight
            // and no output waits.
            let (mem, pending) = (conn.memory(), conn.output_pending());
            let mine_idle = self.held[i] == 0 && pending == 0;
            let all_idle =
                self.held_total == 0 && self.output_total.saturating_sub(o0) + pending == 0;
            let mine = mem + self.held[i];
            let all = self.held_total + self.conn_memory.saturating_sub(m0) + mem;
            let fits = |idle: bool, held: usize, limit: usize| idle || held + hold <= limit;
            if !fits(mine_idle, mine, HELD_CONN)
                || !fits(all_idle, all, HELD_TOTAL)
                || self.reqs.is_full()
            {
                break;
            }
            // Device commands: a write-zeroes reserves one round's.
            let (cmd_span, per_cmd) = match ev {
                Event::WriteZeroes { len, .. } => {
                    let chunk = zero_chunk(len, max_t);
                    ((len as usize).min(ZERO_ROUND * chunk) as u32, Some(chunk))
                }
                _ => (span, None),
            };
            let trim = matches!(ev, Event::Trim { .. });
            let Some(need) = self.commands_free(disk, lbs, cmd_span, null || trim, per_cmd) else {
                break;
            };
            // A null read is answered at once, straight into the socket: it
            // waits (in the connection, undecoded reads behind it) until
            // the socket has room and nothing is queued before it.
            let null_direct = null && conn.in_transmission() && span as usize <= NULL_MAX;
            if null_direct
                && (conn.output_pending() > 0
                    || !has_room(sock, span as usize + READ_REPLY_HEADER_MAX))
            {
                break;
            }
            let Some(ev) = conn.next_event() else {
                break;
            };
            self.peak_in_flight = self.peak_in_flight.max(conn.in_flight());
            log::trace!(target: "nbd", "{ev:?}");
            let (kind, handle, offset, len) = match ev {
                Event::Read {
                    handle,
                    offset,
                    len,
                    ..
                } if null => {
                    direct +=
                        self.answer_null(sock, conn, handle, offset, len as usize, null_direct);
                    continue;
                }
                Event::Trim { handle, .. } => {
                    // Advisory: the range may read as before (module docs).
                    conn.reply(self.table, handle, Ok(()));
                    self.served += 1;
                    continue;
                }
                Event::Read {
                    handle,
                    offset,
                    len,
                    ..
                } => (Kind::Read, handle, offset, len),
                Event::Write {
                    handle,
                    offset,
                    len,
                    fua,
                    ..
                } => (Kind::Write { fua }, handle, offset, len),
                Event::Flush { handle, .. } => (Kind::Flush, handle, 0, 0),
                Event::WriteZeroes {
                    handle,
                    offset,
                    len,
                    fua,
                    ..
                } => (Kind::Zero { fua, issued: 0 }, handle, offset, len),
            };
            let read = NewRead {
                kind,
                sock: i,
                gen,
                handle,
                export,
                offset,
                len,
                disk,
                need,
            };
            match (self.start_request(read, hold), kind) {
                (Ok(()), _) => {}
                (Err(err), Kind::Read) => conn.reply_read(self.table, handle, offset, Err(err)),
                (Err(err), Kind::Write { .. }) => {
                    // Its payload follows all the same: discarded, then
                    // the error.
                    self.fills[i] = Some(Fill {
                        to: FillTo::Discard { handle, err },
                        since: self.p.now_ns(),
                        moved: 0,
                    });
                }
                (Err(err), _) => conn.reply(self.table, handle, Err(err)),
            }
            if matches!(kind, Kind::Write { .. }) {
                self.fill_payload(sock, conn, i);
            }
        }
        direct
    }

    /// Device commands a read of `len` bytes on `disk` (logical block
    /// `lbs`) may take — one per maximal transfer (or per `per_cmd` bytes:
    /// a write-zeroes round's commands are one zeroed buffer long), plus
    /// one where the range crosses an extent or ends in a partial block —
    /// when the namespace's queue has room for them; `None`: the request
    /// waits while the queue is full. Null reads and trims take none.
    fn commands_free(
        &self,
        disk: usize,
        lbs: u64,
        len: u32,
        null: bool,
        per_cmd: Option<usize>,
    ) -> Option<usize> {
        let budget = self.budgets.get(disk).copied().unwrap_or(Budget {
            cmds: 0,
            max_cmds: 0,
            max_transfer: 0,
        });
        let per = per_cmd.unwrap_or(budget.max_transfer);
        let need = if null || per == 0 {
            0
        } else {
            (len as usize + 2 * lbs as usize).div_ceil(per) + 1
        };
        if budget.cmds > 0 && budget.cmds + need > budget.max_cmds {
            return None;
        }
        Some(need)
    }

    /// Answers a null read: straight into the socket when `direct` (room
    /// was checked), else through the connection's output. Returns the
    /// bytes written to the socket.
    fn answer_null(
        &mut self,
        sock: &mut tcp::Socket,
        conn: &mut Conn,
        handle: u64,
        offset: u64,
        n: usize,
        direct: bool,
    ) -> usize {
        let mut wrote = 0;
        let sent = direct
            && conn.reply_read_direct(self.table, handle, offset, n, |h| {
                send_whole(sock, h, &ZEROS[..n])
                    .map(|w| wrote = w)
                    .is_some()
            });
        if sent {
            self.touched = true;
        } else {
            let data = ZEROS.get(..n).ok_or(Errno::Inval);
            conn.reply_read(self.table, handle, offset, data);
        }
        self.served += 1;
        wrote
    }

    /// Takes a buffer for `read` (`hold` bytes; a flush none), records
    /// the request (which owns the buffer from here until its reply or,
    /// its connection gone, until its last completion), reserves its
    /// device commands and submits it — or, for a write, starts taking its
    /// payload (submitted once whole, [`Server::fill_payload`]).
    fn start_request(&mut self, read: NewRead, hold: usize) -> Result<(), Errno> {
        let (buf, skew) = match read.kind {
            Kind::Read => {
                let (buf, skew) = start(
                    &self.p,
                    self.table,
                    &mut self.small,
                    &mut self.large,
                    read.export,
                    read.offset,
                    read.len,
                )?;
                (Some(buf), skew)
            }
            Kind::Flush => (None, 0),
            Kind::Zero { .. } => {
                // A file's range is refused whole, before any of it is
                // written, when a part needs allocation.
                if let Some(Export {
                    target: Target::File(f),
                    ..
                }) = self.table.exports.get(read.export as usize)
                {
                    // (With a write path, holes are left as they are.)
                    let checked = match f.writer() {
                        Some(_) => Ok(()),
                        None => dioxide_iomap::check_overwrite(&**f, read.offset, read.len as u64),
                    };
                    if let Err(e) = checked {
                        log::debug!(target: "nbd", "write-zeroes refused: {e}");
                        return Err(Errno::NotSup);
                    }
                }
                let mut buf = take_buf(&self.p, &mut self.small, &mut self.large, hold)
                    .ok_or(Errno::NoMem)?;
                // Pool buffers hold an earlier request's bytes.
                buf.as_mut_slice()[..hold].fill(0);
                (Some(buf), 0)
            }
            Kind::Write { .. } => {
                let buf = take_buf(&self.p, &mut self.small, &mut self.large, hold)
                    .ok_or(Errno::NoMem)?;
                (Some(buf), 0)
            }
        };
        let req = Req {
            kind: read.kind,
            sock: read.sock as u16,
            gen: read.gen,
            handle: read.handle,
            export: read.export,
            offset: read.offset,
            skew,
            len: read.len,
            cmds: read.need as u32,
            parts: 0,
            need: 0,
            failure: None,
            buf,
        };
        let held = req.held();
        let Ok(id) = self.reqs.insert(req) else {
            // Checked not full by the caller.
            log::error!(target: "nbd", "request table full after the check");
            return Err(Errno::NoMem);
        };
        self.held[read.sock] += held;
        self.held_total += held;
        if let Some(b) = self.budgets.get_mut(read.disk) {
            b.cmds += read.need;
        }
        if let Kind::Write { .. } = read.kind {
            self.fills[read.sock] = Some(Fill {
                to: FillTo::Req { id, got: 0 },
                since: self.p.now_ns(),
                moved: 0,
            });
            return Ok(());
        }
        submit(
            &self.p,
            self.table,
            &self.budgets,
            &mut self.reqs,
            &mut self.ready,
            id,
            read.sock,
        );
        Ok(())
    }

    /// Sends the connection's queued output (and decodes what its
    /// high-water mark held back), then drops a connection whose replies
    /// are not taken (the stall time) and closes one that is done. Returns
    /// whether the socket is now closing.
    fn send_output(
        &mut self,
        sock: &mut tcp::Socket,
        conn: &mut Conn,
        flow: &mut Flow,
        direct: usize,
    ) -> bool {
        let mut sent = core::mem::take(&mut flow.sent) + direct;
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
        let now = self.p.now_ns();
        let queued = sock.send_queue();
        let waiting = conn.output_pending() + queued;
        flow.taken += (flow.queued + sent).saturating_sub(queued);
        flow.queued = queued;
        if waiting == 0 || flow.taken >= STALL_MIN_BYTES {
            flow.progress = now;
            flow.taken = 0;
        } else if now.saturating_sub(flow.progress) > self.stall_ns {
            log::info!(
                target: "nbd",
                "connection dropped: replies not taken ({} bytes waiting, {} taken in {} s)",
                waiting,
                flow.taken,
                self.stall_ns / 1_000_000_000
            );
            conn.peer_closed();
            sock.abort();
            flow.progress = now;
            self.touched = true;
            return true;
        }
        if (conn.is_closed() || !sock.is_open()) && (conn.output().is_empty() || !sock.may_send()) {
            if let Some(why) = conn.close_reason() {
                log::debug!(target: "nbd", "connection closed: {why:?}");
            }
            sock.close();
            flow.progress = now;
            self.touched = true;
            return true;
        }
        false
    }

    fn recycle(&mut self, buf: P::Buf) {
        match buf.len() {
            SMALL if self.small.len() < KEEP_SMALL => self.small.push(buf),
            LARGE if self.large.len() < KEEP_LARGE => self.large.push(buf),
            _ => drop(buf),
        }
    }
}

/// Room for `n` more bytes in `sock`'s send buffer.
fn has_room(sock: &tcp::Socket, n: usize) -> bool {
    sock.may_send() && sock.send_capacity() - sock.send_queue() >= n
}

/// Writes a reply's header and data into `sock` when both fit: the bytes
/// written, or `None` with nothing written.
fn send_whole(sock: &mut tcp::Socket, header: &[u8], data: &[u8]) -> Option<usize> {
    if !has_room(sock, header.len() + data.len()) {
        return None;
    }
    // Both fit: send_slice takes all of each.
    Some(sock.send_slice(header).unwrap_or(0) + sock.send_slice(data).unwrap_or(0))
}

/// A buffer for a read of `len` bytes at `offset` of `export` and where
/// its data starts in it: from a pool when it fits one.
fn start<P: Platform>(
    p: &P,
    table: &Table,
    small: &mut Vec<P::Buf>,
    large: &mut Vec<P::Buf>,
    export: u32,
    offset: u64,
    len: u32,
) -> Result<(P::Buf, u32), Errno> {
    let Some(e) = table.exports.get(export as usize) else {
        return Err(Errno::Inval);
    };
    let (a0, a1) = range(e.lbs, offset, len);
    let buf = take_buf(p, small, large, (a1 - a0) as usize).ok_or(Errno::NoMem)?;
    Ok((buf, (offset - a0) as u32))
}

/// A buffer of at least `n` bytes: from a pool when it fits one, else
/// exactly `n` (fallibly).
fn take_buf<P: Platform>(
    p: &P,
    small: &mut Vec<P::Buf>,
    large: &mut Vec<P::Buf>,
    n: usize,
) -> Option<P::Buf> {
    if n <= SMALL {
        small.pop().or_else(|| p.alloc_buf(SMALL))
    } else if n <= LARGE {
        large.pop().or_else(|| p.alloc_buf(LARGE))
    } else {
        p.alloc_buf(n)
    }
}

/// The zeroed buffer of a WRITE_ZEROES of `len` bytes on a queue whose
/// largest transfer is `max_transfer`: one command's worth, at most a
/// large pool buffer.
fn zero_chunk(len: u32, max_transfer: usize) -> usize {
    (len as usize).min(LARGE.min(max_transfer))
}

/// The range `[a0, a1)` of whole blocks of `lbs` bytes covering `len` bytes
/// at `offset`.
fn range(lbs: u64, offset: u64, len: u32) -> (u64, u64) {
    let a0 = offset / lbs * lbs;
    let a1 = (offset + len as u64).div_ceil(lbs) * lbs;
    (a0, a1)
}

/// One request handed to the device, as [`issue`] needs it: on this
/// core, or on a storage core, which gets it over its lane.
#[derive(Clone, Copy, Debug)]
pub struct Job {
    pub id: ReqId,
    export: u32,
    op: Op,
    /// The block-aligned byte range `[a0, a0 + len)` to read into `buf` or
    /// write from it, which the request owns until its last reference is
    /// dropped. A flush has neither.
    a0: u64,
    len: usize,
    buf: IoBuf,
    /// `buf` (one command long) is the source of every command: a
    /// write-zeroes round.
    repeat: bool,
    /// Largest transfer of one command (whole blocks; raw exports).
    max: usize,
}

/// The error of a request whose namespace has no queue on this core.
const NO_QUEUE: DioError = DioError::Unsupported("no NVMe queue for this namespace");

/// Prepares request `id` (its references: its parts plus one for the
/// submission) and issues it on the core serving socket `sock`: here when
/// that is this core, else over that core's lane. Failures are recorded on
/// the request, which is queued for its reply like any completion. A
/// write-zeroes is issued a round at a time ([`ZERO_ROUND`] commands from
/// its zeroed buffer); [`Server::reply`] issues the next round.
fn submit<P: Platform>(
    p: &P,
    table: &'static Table,
    budgets: &[Budget],
    reqs: &mut Slab<Req<P::Buf>>,
    ready: &mut Ring<ReqId>,
    id: ReqId,
    sock: usize,
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
    let max = budgets.get(e.disk).map_or(0, |b| b.max_transfer);
    // A raw transfer, or a write-side request of a file, cut at the
    // queue's largest transfer: none without a queue.
    let raw = matches!(e.target, Target::Raw);
    if max == 0 && (raw || req.kind != Kind::Read) {
        req.fail(Failure::NoEngine);
        req.parts = 1;
        put(reqs, ready, id, 1);
        return;
    }
    let buf_len = req.held();
    // The operation, its range and the largest command.
    let (op, a0, n, max) = match req.kind {
        Kind::Read => {
            let (a0, a1) = range(e.lbs, offset, len);
            (Op::Read, a0, (a1 - a0) as usize, max)
        }
        Kind::Write { fua } => (write_op(fua), offset, len as usize, max),
        Kind::Flush => (Op::Flush, 0, 0, max),
        Kind::Zero { fua, issued } => {
            // The buffer (a pool's) may be longer than one command.
            let chunk = zero_chunk(len, max);
            let round = ((len - issued) as usize).min(ZERO_ROUND * chunk);
            req.kind = Kind::Zero {
                fua,
                issued: issued + round as u32,
            };
            (write_op(fua), offset + issued as u64, round, chunk)
        }
    };
    // A file write is one dio (the layer splits it); a write-zeroes
    // round one per zeroed buffer, as on a raw namespace.
    let max = match (&e.target, req.kind) {
        (Target::File(_), Kind::Write { .. }) => n.max(1),
        _ => max,
    };
    req.parts = match &e.target {
        // Answered without a request (see `poll_socket`).
        Target::Null => 1,
        Target::File(_) if op == Op::Read => {
            // Bytes the part must deliver: a file read may end at end of file.
            req.need = (offset + len as u64 - a0) as usize;
            2
        }
        _ if op == Op::Flush => 2,
        _ => n.div_ceil(max) as u32 + 1,
    };
    // A write-zeroes round's commands all read the zeroed first `max`
    // bytes (the rest of a pool buffer holds an earlier request's bytes).
    let repeat = matches!(req.kind, Kind::Zero { .. });
    let buf = match req.buf.as_mut() {
        Some(b) if repeat => b.part(0, max.min(buf_len)),
        Some(b) => b.part(0, n.min(buf_len)),
        None => IoBuf::empty(),
    };
    let job = Job {
        id,
        export,
        op,
        a0,
        len: n,
        buf,
        repeat,
        max,
    };
    let job = match p.send(sock, job) {
        Ok(()) => return,
        // This core's own, or its lane is full: issued here.
        Err(job) => job,
    };
    issue(p, table, &job, &mut |id, r, refs| {
        apply(reqs, ready, id, r, refs)
    });
}

fn write_op(fua: bool) -> Op {
    if fua {
        Op::WriteFua
    } else {
        Op::Write
    }
}

/// Hands `job`'s parts to this core's queue of its namespace and reports
/// what ended at once to `report(id, part result, references dropped)`,
/// finally dropping the submission's reference. Completions that come later
/// are delivered by [`Platform::service`] on this core.
pub fn issue<P: Platform>(
    p: &P,
    table: &Table,
    job: &Job,
    report: &mut dyn FnMut(ReqId, Option<Result<usize, DioError>>, u32),
) {
    let id = job.id;
    let Some(e) = table.exports.get(job.export as usize) else {
        report(id, None, 1);
        return;
    };
    match &e.target {
        Target::Null => {}
        // A file's write path commits its filesystem (the device flush
        // included).
        Target::File(f) if job.op == Op::Flush && f.writer().is_some() => {
            let r = f.writer().map_or(Ok(()), |w| w.commit());
            report(id, Some(r.map(|()| 0).map_err(fs_error)), 1);
        }
        Target::File(_) | Target::Raw if job.op == Op::Flush => issue_raw(p, e, job, report),
        // (Refused in `submit`.)
        Target::Raw if job.max == 0 => {}
        Target::File(f) if job.op != Op::Read => issue_file_writes(p, e, f, job, report),
        Target::File(f) => {
            let iocb = Kiocb::with_owner(job.a0, id);
            // SAFETY: the buffer belongs to request `id`, which is removed
            // from the slab (and its buffer reused or freed) only after its
            // last reference was dropped, i.e. after this part's completion
            // was delivered.
            let r = p.with_engine(e.disk, |eng| unsafe {
                eng.dio_rw(DioRequest::read(iocb, job.buf, &**f))
            });
            match r {
                Some(Ok(DioResult::Queued)) => {}
                Some(Ok(DioResult::Done(got))) => report(id, Some(Ok(got)), 1),
                Some(Err(err)) => report(id, Some(Err(err)), 1),
                None => report(id, Some(Err(NO_QUEUE)), 1),
            }
        }
        Target::Raw => issue_raw(p, e, job, report),
    }
    // Drop the submission reference.
    report(id, None, 1);
}

/// A file job's writes: one dio per `job.max` bytes of its range (a
/// WRITE: one; a write-zeroes round: one per zeroed buffer), each reported
/// as a part. Overwrites of written blocks go down the simple path (one
/// block) or the generic one; a range needing allocation fails whole
/// (`DioError::Unallocated`, nothing written). (`submit` never makes a
/// file write job without a queue: `job.max` is not 0.)
fn issue_file_writes<P: Platform>(
    p: &P,
    e: &Export,
    f: &File,
    job: &Job,
    report: &mut dyn FnMut(ReqId, Option<Result<usize, DioError>>, u32),
) {
    let (id, n, max) = (job.id, job.len, job.max.max(1));
    let parts = n.div_ceil(max) as u32;
    if let Some(w) = f.writer() {
        // A range needing allocation, or a FUA write to blocks whose
        // mapping is not committed yet (FUA must make the write reachable
        // after a power cut, so its metadata too): the write path.
        let bs = f.block_size() as u64;
        let (fb, end) = (job.a0 / bs, (job.a0 + n as u64).div_ceil(bs));
        let unallocated = matches!(
            dioxide_iomap::check_overwrite(f, job.a0, n as u64),
            Err(DioError::Unallocated { .. })
        );
        if unallocated || (job.op == Op::WriteFua && w.uncommitted(f.ino, fb, end)) {
            let r = allocating_write(w, f.ino, job);
            report(id, Some(r.map(|()| n).map_err(fs_error)), parts);
            return;
        }
    }
    let ran = p.with_engine(e.disk, |eng| {
        let mut at = 0usize;
        let mut left = parts;
        while at < n {
            let c = (n - at).min(max);
            let Some(iob) = job.buf.part(if job.repeat { 0 } else { at }, c) else {
                report(id, Some(Err(DioError::Invalid("request range"))), left);
                break;
            };
            let req = DioRequest {
                op: job.op,
                ..DioRequest::write(Kiocb::with_owner(job.a0 + at as u64, id), iob, f)
            };
            left -= 1;
            // SAFETY: the buffer belongs to the request until its last
            // part's completion (as for reads).
            match unsafe { eng.dio_rw(req) } {
                Ok(DioResult::Queued) => {}
                Ok(DioResult::Done(got)) => report(id, Some(Ok(got)), 1),
                Err(err) => {
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

/// A file write (or write-zeroes round) that needs allocation, through the
/// filesystem's write path, here and now: it maps, writes and commits
/// with the device's synchronous commands, holding the filesystem's lock
/// (allocating writes are a volume's first fill; its overwrites stay on
/// the asynchronous simple path).
fn allocating_write(
    w: &dyn dioxide_dxfs::FileWriter,
    ino: u64,
    job: &Job,
) -> Result<(), dioxide_dxfs::Error> {
    let fua = job.op == Op::WriteFua;
    if job.repeat {
        return w.zero(ino, job.a0, job.len as u64, fua);
    }
    if job.buf.len() != job.len {
        return Err(dioxide_dxfs::Error::Input(
            "write buffer shorter than its request".into(),
        ));
    }
    // SAFETY: the request owns `job.buf` (its payload, whole, `job.len`
    // bytes as checked) until its last part's completion, which this call
    // reports after it returns; nothing writes to it meanwhile.
    let data = unsafe { core::slice::from_raw_parts(job.buf.as_ptr().cast_const(), job.len) };
    w.write(ino, job.a0, data, fua)
}

/// A filesystem write path's error as the service reports it: no space,
/// no commit log (allocation impossible: `ENOTSUP` as before), or an I/O
/// error (logged).
fn fs_error(e: dioxide_dxfs::Error) -> DioError {
    use dioxide_dxfs::Error as E;
    match e {
        E::Full { .. } => DioError::Fs(dioxide_iomap::IomapError::NoSpace),
        E::NoLog => DioError::Unallocated { pos: 0 },
        e => {
            log::warn!(target: "dxfs", "write path: {e}");
            DioError::Fs(dioxide_iomap::IomapError::Corrupt)
        }
    }
}

/// A raw job's device commands: one per `job.max` bytes of its range (a
/// flush: one), each reported as a part.
fn issue_raw<P: Platform>(
    p: &P,
    e: &Export,
    job: &Job,
    report: &mut dyn FnMut(ReqId, Option<Result<usize, DioError>>, u32),
) {
    let (id, n, max) = (job.id, job.len, job.max);
    let parts = if job.op == Op::Flush {
        1
    } else {
        n.div_ceil(max) as u32
    };
    let ran = p.with_engine(e.disk, |eng| {
        if job.op == Op::Flush {
            // SAFETY: no data buffer.
            let r = unsafe { eng.raw(Op::Flush, 0, IoBuf::empty(), Some(id)) };
            match r {
                Ok(DioResult::Queued) => {}
                Ok(DioResult::Done(got)) => report(id, Some(Ok(got)), 1),
                Err(err) => report(id, Some(Err(err)), 1),
            }
            return;
        }
        let repeat = job.repeat;
        let mut at = 0usize;
        let mut left = parts;
        while at < n {
            let c = (n - at).min(max);
            let Some(iob) = job.buf.part(if repeat { 0 } else { at }, c) else {
                report(id, Some(Err(DioError::Invalid("request range"))), left);
                break;
            };
            let lba = (job.a0 + at as u64) / e.lbs;
            // SAFETY: as for files: the buffer belongs to the request
            // until its last part's completion.
            let r = unsafe { eng.raw(job.op, lba, iob, Some(id)) };
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
