//! Soak: one appliance, many kinds of clients at once for about a minute.
//!
//! Over a random tree (and two larger files), concurrently:
//!
//! - [`READERS`] verifying readers: pipelined reads of random ranges (1 byte
//!   to 1 MiB; unaligned, 4 KiB aligned, any) of every file and of the raw
//!   namespace `nvme0n1`, some over structured replies, each reply compared
//!   with the source file or the image;
//! - [`FLOODERS`] flooders that never read: NBD_OPT_LIST (and other options)
//!   during negotiation, or FLUSH, READ, refused and unknown commands in
//!   transmission, written as fast as the socket takes them (until TCP flow
//!   control closes the window; writes time out, so that a held flooder
//!   still sees the soak end); at the end each holds its connection until
//!   the server drops it (see [`flood`]);
//! - [`VANISHERS`] clients that connect and vanish in every phase, with
//!   large reads in flight (32 MiB of `nvme0n1`, 1 MiB reads), half of them
//!   resetting the connection (SO_LINGER 0);
//! - [`GARBAGE`] clients that send random bytes after the greeting, during
//!   options and during transmission (and random requests with a valid
//!   magic).
//!
//! Connections: every client thread holds at most one connection at a
//! time, so at most 12 are open; the other 4 of the server's 16 sockets
//! absorb connections a thread has just dropped and the guest has not yet
//! recycled, so readers are not refused. Refusals are still possible and
//! are retried and counted: behind QEMU's user networking a refused
//! connection is accepted on the host and closed before the greeting, and
//! the server recycles a flooded connection only when it drops it for
//! replies not taken (its stall time, `nbd.stall_s`, [`STALL_S`] here).
//! Flooders whose connection is dropped flood again on a new one.
//!
//! Checked: every read correct; each reader completed reads while all the
//! flooders were held by flow control; after the clients are gone the
//! server reports idle with the heap at its level from start; every one of
//! its sockets accepts and serves again; the heap's high-water mark (the
//! `peak` of the idle line) stayed within the bound the service states
//! (`dioxide-service`, "Bounds", `heap_bound`), logged at start.

use dioxide_qemu::Guest;
use dioxide_testkit::Rng;
use dioxide_tests::nbdraw::{self as raw, Client};
use dioxide_tests::*;
use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const READERS: usize = 4;
const FLOODERS: usize = 4;
const VANISHERS: usize = 2;
const GARBAGE: usize = 2;
/// How long the flooders and the other misbehaving clients run.
const SOAK: Duration = Duration::from_secs(40);
/// The server's stall time (`nbd.stall_s`; 30 s by default): connections
/// whose replies are not taken are dropped after it.
const STALL_S: u64 = 10;
/// How long after the soak's end the server may take to drop a flooded
/// connection: its stall time, counted from when the replies stopped being
/// taken (the host's socket buffers, megabytes, fill first), and a margin.
const FLOOD_HOLD: Duration = Duration::from_secs(3 * STALL_S + 10);
const MIB: u64 = 1 << 20;

/// What an export must read as.
struct Export {
    name: String,
    data: Vec<u8>,
}

#[derive(Default)]
struct Shared {
    /// Flooders and churners stop.
    stop: AtomicBool,
    /// Readers stop (later).
    stop_readers: AtomicBool,
    /// A thread panicked: everyone stops.
    failed: AtomicBool,
    /// Every flooder is held by flow control (its writes time out).
    flooding: AtomicBool,
    saturated: AtomicUsize,
    flood_bytes: AtomicU64,
    /// Flooding connections the server ended (replies not taken for
    /// its stall time).
    flood_drops: AtomicU64,
    /// Flooders that left at the soak's end without seeing the server drop
    /// their connection within [`FLOOD_HOLD`].
    flood_left: AtomicU64,
    /// Connections opened by all clients, reader and flooder connections
    /// refused, and connections lost before the guest saw them (see
    /// [`greeted`]).
    connections: AtomicU64,
    refused: AtomicU64,
    lost: AtomicU64,
}

impl Shared {
    fn stopping(&self) -> bool {
        self.stop.load(Relaxed) || self.failed.load(Relaxed)
    }
}

fn spawn<T: Send + 'static>(
    sh: &Arc<Shared>,
    name: String,
    f: impl FnOnce() -> T + Send + 'static,
) -> (String, JoinHandle<T>) {
    struct StopAllOnPanic(Arc<Shared>);
    impl Drop for StopAllOnPanic {
        fn drop(&mut self) {
            if std::thread::panicking() {
                self.0.failed.store(true, Relaxed);
            }
        }
    }
    let guard = StopAllOnPanic(sh.clone());
    let h = std::thread::Builder::new()
        .name(name.clone())
        .spawn(move || {
            let _g = guard;
            f()
        })
        .expect("spawn");
    (name, h)
}

/// Joins a thread; a panic becomes the message.
fn join<T>((name, h): (String, JoinHandle<T>)) -> Result<T, String> {
    h.join().map_err(|e| {
        let msg = e
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        format!("{name}: {msg}")
    })
}

/// Prints the guest's console when the test fails: the lines above debug
/// level, then the last 150 lines (and all of it to the file named by
/// `SOAK_CONSOLE`, if set).
struct ConsoleOnPanic<'a>(&'a Guest);

impl Drop for ConsoleOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            std::thread::sleep(Duration::from_secs(1));
            let c = self.0.console();
            if let Some(p) = std::env::var_os("SOAK_CONSOLE") {
                let _ = std::fs::write(p, &c);
            }
            let lines: Vec<&str> = c.lines().collect();
            let important: Vec<&str> = lines
                .iter()
                .copied()
                .filter(|l| !l.contains(" DEBUG ") && !l.contains(" TRACE "))
                .collect();
            eprintln!(
                "--- guest console, above debug ---\n{}\n--- guest console, last 150 lines ---\n{}",
                important.join("\n"),
                lines[lines.len().saturating_sub(150)..].join("\n")
            );
        }
    }
}

/// The first number after `what` on the console lines holding `line`.
fn figures(console: &str, line: &str, what: &str) -> Vec<u64> {
    console
        .lines()
        .filter(|l| l.contains("nbd: ") && l.contains(line))
        .filter_map(|l| {
            let i = l.find(what)? + what.len();
            l[i..].split_whitespace().next()?.parse().ok()
        })
        .collect()
}

/// Waits (bounded: the server's stall time and 30 s) for its idle report
/// after the last connection it accepted and after console position
/// `after`; returns the console.
fn wait_idle(guest: &Guest, after: usize, start_heap: u64) -> String {
    let t0 = Instant::now();
    let limit = Duration::from_secs(STALL_S + 30);
    loop {
        let c = guest.console();
        if let Some(idle) = c.rfind("nbd: idle:") {
            // With a stack per core, a core goes idle while another may
            // still serve (its heap above the start level): every core is
            // idle once the last report is back at the start level.
            let heap = figures(&c[idle..], "idle:", "heap ").last().copied();
            if idle >= after
                && idle > c.rfind("connection from").unwrap_or(0)
                && heap == Some(start_heap)
            {
                return c;
            }
        }
        assert!(
            t0.elapsed() < limit,
            "no idle report with the heap back at its start level ({start_heap} bytes) within {limit:?} of the last client leaving; idle heap figures: {:?}; each core's last report: {:?}; what the server holds (its last busy reports): {:#?}",
            figures(&c, "idle:", "heap "),
            last_core_reports(&c),
            last_busy_reports(&c)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The last `nbd: core N: ...` line of each core (a core missing here
/// never went idle).
fn last_core_reports(console: &str) -> Vec<&str> {
    let mut last: Vec<(&str, &str)> = Vec::new();
    for l in console.lines() {
        let Some(i) = l.find("nbd: core ") else {
            continue;
        };
        let core = l[i..].split(':').nth(1).unwrap_or("");
        match last.iter_mut().find(|(c, _)| *c == core) {
            Some(e) => e.1 = &l[i..],
            None => last.push((core, &l[i..])),
        }
    }
    last.into_iter().map(|(_, l)| l).collect()
}

/// The server's last busy reports (`nbd: busy:` lines, every 10 s while it
/// serves): the reads in flight and each connection it holds. With a stack
/// per core, each core's reports; the last 12 lines.
fn last_busy_reports(console: &str) -> Vec<&str> {
    let busy: Vec<&str> = console
        .lines()
        .filter_map(|l| l.find("nbd: busy:").map(|i| &l[i..]))
        .collect();
    busy[busy.len().saturating_sub(12)..].to_vec()
}

/// How long a client waits for the greeting.
const GREETING: Duration = Duration::from_secs(5);

/// A greeted connection, or the server refusing it (closed before the
/// greeting: no free socket). Behind QEMU's user networking a connection
/// can also be lost before the guest sees it: QEMU's host-side listener has
/// a backlog of 1, and while its accept queue is full Linux drops the
/// client's handshake ACK, so the client is connected while QEMU has not
/// accepted it (it may at a SYN-ACK retransmission, up to 31 s later). Such
/// a connection gets no greeting: it is counted as lost and another made.
fn greeted(port: u16, sh: &Shared) -> std::io::Result<Client> {
    for _ in 0..10 {
        sh.connections.fetch_add(1, Relaxed);
        match Client::try_greeting(port, GREETING) {
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                sh.lost.fetch_add(1, Relaxed);
                if sh.failed.load(Relaxed) {
                    return Err(e);
                }
            }
            r => return r,
        }
    }
    panic!("no greeting on 10 connections in a row ({GREETING:?} each)")
}

fn pick<'a>(rng: &mut Rng, exports: &'a [Export]) -> &'a Export {
    // The raw namespace (last) a quarter of the time.
    if rng.next_u64().is_multiple_of(4) {
        exports.last().unwrap()
    } else {
        &exports[(rng.next_u64() % (exports.len() as u64 - 1)) as usize]
    }
}

/// A random range of an export of `size` bytes: 1 byte to 1 MiB,
/// unaligned, 4 KiB aligned, or anywhere.
fn range(rng: &mut Rng, size: u64) -> (u64, u64) {
    let r = |rng: &mut Rng, n: u64| rng.next_u64() % n.max(1);
    let (off, len) = match r(rng, 3) {
        0 => {
            let len = 1 + r(rng, 4096);
            (r(rng, size), len)
        }
        1 => {
            let len = 4096 * (1 + r(rng, 256));
            (r(rng, size.div_ceil(4096)) * 4096, len)
        }
        _ => {
            let len = 1 + r(rng, MIB);
            (r(rng, size), len)
        }
    };
    let off = off.min(size - 1);
    (off, len.min(size - off))
}

struct ReaderStats {
    reads: u64,
    bytes: u64,
    during_flood: u64,
    connections: u64,
    slowest_batch: Duration,
}

/// Reads random ranges of random exports, a few pipelined at a time, and
/// checks every reply; a new connection (and export) every few batches.
fn reader(id: usize, port: u16, exports: Arc<Vec<Export>>, sh: Arc<Shared>) -> ReaderStats {
    let mut rng = Rng::new(1000 + id as u64);
    let mut st = ReaderStats {
        reads: 0,
        bytes: 0,
        during_flood: 0,
        connections: 0,
        slowest_batch: Duration::ZERO,
    };
    let mut handle = 0u64;
    while !sh.stop_readers.load(Relaxed) && !sh.failed.load(Relaxed) {
        let e = pick(&mut rng, &exports);
        let size = e.data.len() as u64;
        let mut tries = 0;
        let mut c = loop {
            match greeted(port, &sh) {
                Ok(c) => break c,
                Err(err) => {
                    sh.refused.fetch_add(1, Relaxed);
                    tries += 1;
                    assert!(tries < 50, "reader {id}: refused 50 times: {err}");
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        };
        st.connections += 1;
        c.s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let structured = id % 2 == 1 && rng.next_u64().is_multiple_of(2);
        if structured {
            assert!(c.structured(), "structured replies refused");
        }
        assert_eq!(c.go(&e.name), Ok(size), "GO {}", e.name);
        for _ in 0..1 + rng.next_u64() % 8 {
            let t0 = Instant::now();
            let depth = 1 + rng.next_u64() % 8;
            let mut want = HashMap::new();
            let mut m = Vec::new();
            for _ in 0..depth {
                let (off, len) = range(&mut rng, size);
                handle += 1;
                m.extend(raw::request_bytes(raw::READ, 0, handle, off, len as u32));
                want.insert(handle, (off, len as usize));
            }
            c.send(&m);
            for _ in 0..depth {
                let (h, data) = if structured {
                    let (flags, ty, h, p) = c.chunk();
                    assert_eq!(
                        ty,
                        1,
                        "reader {id}: {} handle {h}: chunk type {ty:#x}: {}",
                        e.name,
                        String::from_utf8_lossy(p.get(6..).unwrap_or(&[]))
                    );
                    assert_eq!(flags & 1, 1, "one chunk per read");
                    let off = u64::from_be_bytes(p[..8].try_into().unwrap());
                    let w = want.get(&h).expect("reply to a request not made");
                    assert_eq!(off, w.0, "reader {id}: {}: offset of handle {h}", e.name);
                    (h, p[8..].to_vec())
                } else {
                    let hdr = c.read_n(16);
                    assert_eq!(hdr[..4], 0x6744_6698u32.to_be_bytes(), "reply magic");
                    let err = u32::from_be_bytes(hdr[4..8].try_into().unwrap());
                    let h = u64::from_be_bytes(hdr[8..16].try_into().unwrap());
                    let w = *want.get(&h).expect("reply to a request not made");
                    assert_eq!(err, 0, "reader {id}: {} at {}+{}: error", e.name, w.0, w.1);
                    (h, c.read_n(w.1))
                };
                let (off, len) = want.remove(&h).unwrap();
                let good = &e.data[off as usize..off as usize + len];
                if data != good {
                    let at = data.iter().zip(good).position(|(a, b)| a != b);
                    panic!(
                        "reader {id}: {} at {off}+{len}: wrong data ({} bytes, first difference at {at:?})",
                        e.name,
                        data.len()
                    );
                }
                st.reads += 1;
                st.bytes += len as u64;
                if sh.flooding.load(Relaxed) {
                    st.during_flood += 1;
                }
            }
            st.slowest_batch = st.slowest_batch.max(t0.elapsed());
        }
        c.request(raw::DISC, 0, 0, 0, 0);
        assert!(c.closed(), "reader {id}: not closed after DISC");
    }
    st
}

/// Writes `block` over and over and never reads, until the server drops
/// the connection (its replies not taken for the stall time). When the
/// soak stops, the flooder does not leave: it holds the connection, still
/// unread, until the server drops it (within [`FLOOD_HOLD`]). A flooded
/// connection its client abandoned could outlive the client behind QEMU's
/// user networking: slirp, its host socket gone, goes on acknowledging the
/// server's replies (and drops them) while the client's FIN waits behind
/// the requests the server has not read — for as long as replies flow, so
/// the stall time never ends it (a run caught one taking 64 KiB a second
/// 40 s after its client left). On a tap or a real network the client's
/// RST ends it at once.
fn flood(s: &mut std::net::TcpStream, block: &[u8], sh: &Shared, held: &mut bool) {
    s.set_write_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut at = 0;
    let mut stopped = None;
    loop {
        if sh.failed.load(Relaxed) {
            return;
        }
        if sh.stop.load(Relaxed) {
            // Past the hold the flooder leaves without having seen the drop
            // (counted): the guest's RST may not have come through slirp
            // yet; if the guest still holds the connection, the idle check
            // fails and prints what it holds.
            let t = *stopped.get_or_insert_with(Instant::now);
            if t.elapsed() >= FLOOD_HOLD {
                sh.flood_left.fetch_add(1, Relaxed);
                return;
            }
        }
        match s.write(&block[at..]) {
            Ok(n) => {
                sh.flood_bytes.fetch_add(n as u64, Relaxed);
                at = (at + n) % block.len();
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                if !*held {
                    *held = true;
                    if sh.saturated.fetch_add(1, Relaxed) + 1 == FLOODERS {
                        sh.flooding.store(true, Relaxed);
                    }
                }
            }
            Err(e) => {
                assert!(
                    matches!(e.kind(), ErrorKind::BrokenPipe | ErrorKind::ConnectionReset),
                    "flooding: {e}"
                );
                sh.flood_drops.fetch_add(1, Relaxed);
                return;
            }
        }
    }
}

/// A client that never reads: kind 0 floods NBD_OPT_LIST (and other
/// options) during negotiation; the others open an export (without
/// reading the GO reply) and flood requests, kind 2 over structured
/// replies. When the server drops the connection (its replies not taken)
/// it floods again on a new one.
fn flooder(id: usize, port: u16, exports: Arc<Vec<Export>>, sh: Arc<Shared>) {
    let mut rng = Rng::new(2000 + id as u64);
    let mut held = false;
    while !sh.stopping() {
        flood_once(id, port, &exports, &sh, &mut rng, &mut held);
    }
}

fn flood_once(
    id: usize,
    port: u16,
    exports: &[Export],
    sh: &Shared,
    rng: &mut Rng,
    held: &mut bool,
) {
    let Ok(mut c) = greeted(port, sh) else {
        // Refused (no free socket): the connection budget should prevent it.
        sh.refused.fetch_add(1, Relaxed);
        std::thread::sleep(Duration::from_millis(200));
        return;
    };
    let mut block = Vec::new();
    if id == 0 {
        while block.len() < 64 << 10 {
            block.extend(raw::option_bytes(raw::OPT_LIST, &[]));
            block.extend(raw::option_bytes(77, b"unknown option"));
            block.extend(raw::option_bytes(raw::OPT_LIST, b"data"));
            block.extend(raw::option_bytes(6, &raw::go_data("no/such/export")));
        }
    } else {
        let e = if id == 1 {
            exports.last().unwrap()
        } else {
            pick(rng, exports)
        };
        let size = e.data.len() as u64;
        let mut pre = Vec::new();
        if id == 2 {
            pre.extend(raw::option_bytes(raw::OPT_STRUCTURED_REPLY, &[]));
        }
        pre.extend(raw::option_bytes(raw::OPT_GO, &raw::go_data(&e.name)));
        c.send(&pre);
        let mut h = 0u64;
        while block.len() < 64 << 10 {
            h += 1;
            let r = match rng.next_u64() % 8 {
                0 | 1 => raw::request_bytes(raw::FLUSH, 0, h, 0, 0),
                2 | 3 => {
                    let (off, len) = range(rng, size);
                    raw::request_bytes(raw::READ, 0, h, off, len as u32)
                }
                4 => raw::request_bytes(99, 0, h, 0, 512),
                5 => raw::request_bytes(0xffff, 0, h, 0, 0),
                6 => raw::request_bytes(raw::TRIM, 0, h, 0, 4096),
                _ => raw::request_bytes(raw::READ, 0, h, size, 1), // past the end
            };
            block.extend(r);
        }
    }
    flood(&mut c.s, &block, sh, held);
    if rng.next_u64().is_multiple_of(2) {
        c.reset_on_drop();
    }
}

/// Connects and vanishes, in every phase, often with large reads in flight.
fn vanisher(id: usize, port: u16, exports: Arc<Vec<Export>>, sh: Arc<Shared>) -> u64 {
    let mut rng = Rng::new(3000 + id as u64);
    let mut n = 0;
    while !sh.stopping() {
        n += 1;
        let rst = rng.next_u64().is_multiple_of(2);
        let c = match rng.next_u64() % 6 {
            0 => {
                sh.connections.fetch_add(1, Relaxed);
                Some(Client::connect(port))
            }
            1 => {
                sh.connections.fetch_add(1, Relaxed);
                let mut c = Client::connect(port);
                c.s.set_read_timeout(Some(GREETING)).unwrap();
                let mut g = [0u8; 18];
                let _ = c.s.read_exact(&mut g);
                let _ = c.s.write_all(&[0, 0]); // half the client flags
                Some(c)
            }
            2 => {
                // 32 MiB of the raw namespace and two 1 MiB reads, then gone
                // (after reading a little of the replies, or nothing).
                let e = exports.last().unwrap();
                let size = e.data.len() as u64;
                greeted(port, &sh).ok().map(|mut c| {
                    let _ =
                        c.s.write_all(&raw::option_bytes(raw::OPT_GO, &raw::go_data(&e.name)));
                    let big = (32 * MIB).min(size);
                    let mut m = raw::request_bytes(raw::READ, 0, 1, 0, big as u32).to_vec();
                    for h in 2..4 {
                        let off = rng.next_u64() % (size - MIB);
                        m.extend(raw::request_bytes(raw::READ, 0, h, off, MIB as u32));
                    }
                    let _ = c.s.write_all(&m);
                    let mut b = vec![0u8; (rng.next_u64() % (256 << 10)) as usize];
                    c.s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                    let _ = c.s.read_exact(&mut b);
                    c
                })
            }
            3 | 4 => {
                // 1 MiB reads of a file, the last request cut in half.
                let e = pick(&mut rng, &exports);
                let size = e.data.len() as u64;
                greeted(port, &sh).ok().map(|mut c| {
                    let _ =
                        c.s.write_all(&raw::option_bytes(raw::OPT_GO, &raw::go_data(&e.name)));
                    let mut m = Vec::new();
                    for h in 0..1 + rng.next_u64() % 16 {
                        let len = MIB.min(size);
                        let off = rng.next_u64() % (size - len + 1);
                        m.extend(raw::request_bytes(raw::READ, 0, h, off, len as u32));
                    }
                    m.extend(&raw::request_bytes(raw::READ, 0, 99, 0, 1)[..14]);
                    let _ = c.s.write_all(&m);
                    std::thread::sleep(Duration::from_millis(rng.next_u64() % 100));
                    c
                })
            }
            _ => {
                // In the middle of a list.
                greeted(port, &sh).ok().map(|mut c| {
                    let _ = c.s.write_all(&raw::option_bytes(raw::OPT_LIST, &[]));
                    let mut b = [0u8; 100];
                    c.s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                    let _ = c.s.read_exact(&mut b);
                    c
                })
            }
        };
        if let Some(c) = c {
            if rst {
                c.reset_on_drop();
            }
        }
        std::thread::sleep(Duration::from_millis(10 + rng.next_u64() % 40));
    }
    n
}

/// Sends random bytes after the greeting, during options and during
/// transmission; where the bytes cannot be a valid message the server must
/// close the connection.
fn garbage(id: usize, port: u16, exports: Arc<Vec<Export>>, sh: Arc<Shared>) -> u64 {
    let mut rng = Rng::new(4000 + id as u64);
    let mut n = 0;
    let junk = |rng: &mut Rng, min: usize| {
        let mut b = vec![0u8; min + (rng.next_u64() % 300) as usize];
        rng.fill(&mut b);
        b
    };
    while !sh.stopping() {
        n += 1;
        if rng.next_u64().is_multiple_of(6) {
            // Instead of the client flags (unknown flag bits set).
            sh.connections.fetch_add(1, Relaxed);
            let mut c = Client::connect(port);
            c.s.set_read_timeout(Some(GREETING)).unwrap();
            let mut g = [0u8; 18];
            if c.s.read_exact(&mut g).is_ok() {
                c.s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                let mut b = junk(&mut rng, 20);
                b[0] |= 0x80;
                let _ = c.s.write_all(&b);
                assert!(c.closed(), "garbage client flags: not closed");
            }
            continue;
        }
        let Ok(mut c) = greeted(port, &sh) else {
            continue;
        };
        c.s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut must_close = true;
        let what = rng.next_u64() % 5;
        match what {
            0 => {
                // Options: not starting with IHAVEOPT.
                let mut b = junk(&mut rng, 16);
                b[0] = !b'I';
                let _ = c.s.write_all(&b);
            }
            1 => {
                // One option with a random number, length and data, then
                // random bytes: no closing is required of the server.
                let len = (rng.next_u64() % (200 << 10)) as u32;
                let mut m = raw::IHAVEOPT.to_be_bytes().to_vec();
                m.extend((rng.next_u64() as u32).to_be_bytes());
                m.extend(len.to_be_bytes());
                let mut d = vec![0u8; (rng.next_u64() % (len as u64 + 1)) as usize];
                rng.fill(&mut d);
                m.extend(d);
                m.extend(junk(&mut rng, 0));
                let _ = c.s.write_all(&m);
                must_close = false;
            }
            _ => {
                let e = pick(&mut rng, &exports);
                let size = c.go(&e.name).expect("GO");
                if what == 2 {
                    // Requests: not starting with the request magic.
                    let mut b = junk(&mut rng, 28);
                    b[0] = 0;
                    let _ = c.s.write_all(&b);
                } else {
                    // Requests with the magic and random fields (random
                    // commands, flags, ranges, often valid reads), then
                    // random bytes.
                    let mut m = Vec::new();
                    for h in 0..1 + rng.next_u64() % 8 {
                        let ty = match rng.next_u64() % 4 {
                            0 => rng.next_u64() as u16,
                            _ => (rng.next_u64() % 9) as u16,
                        };
                        let flags = if rng.next_u64().is_multiple_of(2) {
                            0
                        } else {
                            rng.next_u64() as u16
                        };
                        let (off, len) = if rng.next_u64().is_multiple_of(2) {
                            range(&mut rng, size)
                        } else {
                            (rng.next_u64() % (2 * size), rng.next_u64() % (40 * MIB))
                        };
                        m.extend(raw::request_bytes(ty, flags, h, off, len as u32));
                    }
                    m.extend(junk(&mut rng, 0));
                    let _ = c.s.write_all(&m);
                    must_close = false;
                }
            }
        }
        if must_close {
            assert!(c.closed(), "garbage ({what}) did not close the connection");
        } else {
            // Read what comes for a moment, then go.
            c.s.set_read_timeout(Some(Duration::from_millis(300)))
                .unwrap();
            let mut b = vec![0u8; 64 << 10];
            while let Ok(1..) = c.s.read(&mut b) {}
            if rng.next_u64().is_multiple_of(2) {
                c.reset_on_drop();
            }
        }
    }
    n
}

/// On virtio-net (one stack), then on igb with a network stack per core:
/// the clients' connections spread over both cores by RSS, each core with
/// its own sockets, budgets and bounds (so the heap bound is the stated one
/// per core). One after the other: two soaks at once on a 2-core host
/// starve both guests.
#[test]
fn soak_many_misbehaving_clients_at_once() {
    soak(dioxide_qemu::Nic::Virtio, 1);
    soak(dioxide_qemu::Nic::Igb, 2);
}

fn soak(nic: dioxide_qemu::Nic, smp: u32) {
    let t_test = Instant::now();
    let dir = TempDir::new(&format!("soak-{}", nic.name()));
    let src = dir.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    let mut paths = random_tree(&src, 2024, 30);
    let mut rng = Rng::new(77);
    std::fs::create_dir_all(src.join("big")).unwrap();
    for (name, size) in [("big/dense.bin", 24 * MIB), ("big/odd.bin", 3 * MIB + 777)] {
        let mut b = vec![0u8; size as usize];
        rng.fill(&mut b);
        std::fs::write(src.join(name), &b).unwrap();
        paths.push(name.into());
    }
    let img = dir.path().join("fs.img");
    dioxide::fstool::mkfs(&img, &src, None, 4096, "").unwrap();
    let mut exports: Vec<Export> = paths
        .iter()
        .map(|p| Export {
            name: p.clone(),
            data: std::fs::read(src.join(p)).unwrap(),
        })
        .filter(|e| !e.data.is_empty())
        .collect();
    exports.push(Export {
        name: "nvme0n1".into(),
        data: std::fs::read(&img).unwrap(),
    });
    assert!(
        exports.last().unwrap().data.len() as u64 > 32 * MIB,
        "the image holds a 32 MiB read"
    );
    let exports = Arc::new(exports);

    // Debug logs: connections are logged ("connection from").
    let stall = format!("nbd.stall_s={STALL_S}");
    let mut cfg = config(Some(&img), &["log=debug", &stall]);
    cfg.timeout = Some(Duration::from_secs(600));
    cfg.nic = nic;
    cfg.smp = smp;
    if smp > 1 {
        cfg.mem_mib = 512;
    }
    let app = dioxide::nbdbench::boot(cfg, dioxide::nbdbench::NetMode::User)
        .unwrap_or_else(|e| panic!("{e}"));
    let guest = &app.guest;
    let _show = ConsoleOnPanic(guest);
    let port: u16 = app.url.rsplit(':').next().unwrap().parse().unwrap();
    let start_heap = figures(&guest.console(), "listening", "heap ")[0];
    let booted = t_test.elapsed();

    let sh = Arc::new(Shared::default());
    let readers: Vec<_> = (0..READERS)
        .map(|i| {
            let (e, s) = (exports.clone(), sh.clone());
            spawn(&sh, format!("reader {i}"), move || reader(i, port, e, s))
        })
        .collect();
    std::thread::sleep(Duration::from_secs(2));
    let t_flood = Instant::now();
    let flooders: Vec<_> = (0..FLOODERS)
        .map(|i| {
            let (e, s) = (exports.clone(), sh.clone());
            spawn(&sh, format!("flooder {i}"), move || flooder(i, port, e, s))
        })
        .collect();
    let mut churners: Vec<_> = (0..VANISHERS)
        .map(|i| {
            let (e, s) = (exports.clone(), sh.clone());
            spawn(&sh, format!("vanisher {i}"), move || {
                vanisher(i, port, e, s)
            })
        })
        .collect();
    churners.extend((0..GARBAGE).map(|i| {
        let (e, s) = (exports.clone(), sh.clone());
        spawn(&sh, format!("garbage {i}"), move || garbage(i, port, e, s))
    }));
    while t_flood.elapsed() < SOAK && !sh.failed.load(Relaxed) {
        std::thread::sleep(Duration::from_millis(100));
    }
    let held_by_flow_control = sh.flooding.load(Relaxed);
    sh.stop.store(true, Relaxed);
    sh.flooding.store(false, Relaxed);
    let flooded: Vec<_> = flooders.into_iter().map(join).collect();
    let churned: Vec<_> = churners.into_iter().map(join).collect();
    // The readers go on a little after the flood.
    std::thread::sleep(Duration::from_secs(2));
    sh.stop_readers.store(true, Relaxed);
    let read: Vec<_> = readers.into_iter().map(join).collect();
    let soak_time = t_flood.elapsed();
    let failures: Vec<&String> = flooded
        .iter()
        .filter_map(|r| r.as_ref().err())
        .chain(churned.iter().filter_map(|r| r.as_ref().err()))
        .chain(read.iter().filter_map(|r| r.as_ref().err()))
        .collect();
    assert!(failures.is_empty(), "client failures: {failures:#?}");
    let read: Vec<ReaderStats> = read.into_iter().map(Result::unwrap).collect();
    let flood_bytes = sh.flood_bytes.load(Relaxed);
    let flood_drops = sh.flood_drops.load(Relaxed);
    let churns: u64 = churned.into_iter().map(Result::unwrap).sum();

    // Every read was checked when it arrived; each reader got on while the
    // flooders were held.
    assert!(
        held_by_flow_control,
        "not every flooder was held by flow control ({} of {FLOODERS})",
        sh.saturated.load(Relaxed)
    );
    let reads: u64 = read.iter().map(|r| r.reads).sum();
    for (i, r) in read.iter().enumerate() {
        eprintln!(
            "soak: reader {i}: {} reads ({} MiB) on {} connections, {} during the flood, slowest batch {:?}",
            r.reads,
            r.bytes >> 20,
            r.connections,
            r.during_flood,
            r.slowest_batch
        );
        assert!(
            r.during_flood > 0,
            "reader {i} made no progress during the flood"
        );
    }
    assert!(reads >= 200, "only {reads} verified reads");

    // All clients gone: the server goes idle with the heap at its level
    // from start. (Flooding connections end when the server drops them for
    // replies not taken; their clients hold them until it does, see
    // `flood`. A client's RST that igb dropped with its receive ring full
    // is never sent again: that connection ends at the server's keep-alive
    // probe.)
    let t_gone = Instant::now();
    let console = wait_idle(guest, 0, start_heap);
    let idle_after = t_gone.elapsed();
    let stalled = console.matches("replies not taken").count();
    for bad in ["PANIC", "panicked", "power off", "out of memory", "failed"] {
        assert!(!console.contains(bad), "the console shows {bad:?}");
    }
    let end_heap = *figures(&console, "idle:", "heap ").last().unwrap();
    let peak = *figures(&console, "idle:", "peak ").last().unwrap();
    assert_eq!(
        end_heap, start_heap,
        "heap in use after the soak vs at start"
    );
    let accepted = console.matches("connection from").count();

    // No socket left behind: every one accepts a connection at once, and
    // each serves a read.
    let conns = dioxide_service::CONNS;
    let mark = console.len();
    let mut open = Vec::new();
    for k in 0..conns {
        let e = &exports[k % exports.len()];
        let mut c = greeted(port, &sh)
            .unwrap_or_else(|e| panic!("connection {k} of {conns} refused after the soak: {e}"));
        assert_eq!(c.go(&e.name), Ok(e.data.len() as u64));
        let len = e.data.len().min(4096);
        assert!(
            c.read_at(0, len as u32).unwrap() == e.data[..len],
            "{}",
            e.name
        );
        open.push(c);
    }
    for mut c in open {
        c.request(raw::DISC, 0, 0, 0, 0);
        assert!(c.closed());
    }
    let console = wait_idle(guest, mark, start_heap);
    let after = *figures(&console, "idle:", "heap ").last().unwrap();
    assert_eq!(
        after, start_heap,
        "heap in use after the last check vs at start"
    );

    // The high-water mark within the bound the service states at start
    // (`dioxide_service::heap_bound`: its budgets, one maximal read and its copy,
    // per connection what needs no budget, the buffer pools; the socket
    // buffers are allocated before the start figure).
    // With a stack per core, each core's service holds its own bound.
    let bound = figures(&guest.console(), "listening", "bound ")[0] as usize * smp as usize;
    assert!(bound > 0 && bound < 1 << 30, "stated bound {bound}");
    eprintln!(
        "soak: {:?} of clients ({:?} boot, idle {:?} after the last client, {:?} in all); {} connections made, {} accepted by the guest, {} lost before it (QEMU's accept queue), {} reader and flooder connections refused; {churns} churning connections; {stalled} connections dropped for replies not taken ({flood_drops} seen by flooders, {} flooders left at the end without seeing theirs)",
        soak_time,
        booted,
        idle_after,
        t_test.elapsed(),
        sh.connections.load(Relaxed),
        accepted,
        sh.lost.load(Relaxed),
        sh.refused.load(Relaxed),
        sh.flood_left.load(Relaxed)
    );
    eprintln!(
        "soak: heap start {start_heap}, peak {peak}, end {end_heap}; verified reads {reads}; flood bytes sent {flood_bytes}; bound on peak - start {bound}"
    );
    assert!(
        peak - start_heap <= bound as u64,
        "heap peak {peak} is {} bytes over the start {start_heap}, beyond the stated bound {bound}",
        peak - start_heap
    );
}
