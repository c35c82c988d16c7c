//! The service over its loopback wire against a device model that fills
//! every read with bytes derived from the block address: data, flow
//! control and allocations.

use super::loopback::{Link, Loopback, OneEngine};
use super::*;
use dioxide_iomap::{BlkError, Op};
use dioxide_nbd::client::{fnv1a, FNV_START};

#[global_allocator]
static A: dioxide_testkit::CountingAlloc = dioxide_testkit::CountingAlloc;

/// Byte `i` of the device: a function of its address.
fn byte(i: u64) -> u8 {
    (i.wrapping_mul(0x9e37_79b9) >> 7) as u8
}

fn sum(offset: u64) -> u64 {
    let mut h = FNV_START;
    for i in offset..offset + 4096 {
        h = fnv1a(h, &[byte(i)]);
    }
    h
}

/// Completes every command on the next poll, having written the device's
/// bytes into its buffer.
struct PatternQueue {
    done: Vec<u64>,
}

const BLOCKS: u64 = 4096;

impl BlockQueue for PatternQueue {
    fn lba_shift(&self) -> u32 {
        12
    }
    fn max_transfer(&self) -> usize {
        128 * 1024
    }
    fn depth(&self) -> usize {
        256
    }
    fn in_flight(&self) -> usize {
        self.done.len()
    }
    fn capacity(&self) -> u64 {
        BLOCKS
    }
    fn now_ns(&self) -> u64 {
        now()
    }
    unsafe fn submit(&mut self, op: Op, lba: u64, buf: IoBuf, tag: u64) -> Result<(), BlkError> {
        if self.done.len() == self.done.capacity() {
            return Err(BlkError::QueueFull);
        }
        if op != Op::Read || lba + (buf.len() as u64 >> 12) > BLOCKS {
            return Err(BlkError::Invalid);
        }
        // SAFETY: the caller hands the device `buf` until the completion.
        let data = unsafe { std::slice::from_raw_parts_mut(buf.as_ptr(), buf.len()) };
        for (k, b) in data.iter_mut().enumerate() {
            *b = byte(lba * 4096 + k as u64);
        }
        self.done.push(tag);
        Ok(())
    }
    fn poll<F: FnMut(u64, Result<(), BlkError>)>(&mut self, mut on_done: F) -> usize {
        let n = self.done.len();
        for tag in self.done.drain(..) {
            on_done(tag, Ok(()));
        }
        n
    }
}

fn now() -> u64 {
    static T0: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    T0.get_or_init(std::time::Instant::now).elapsed().as_nanos() as u64
}

fn rdtsc() -> u64 {
    now()
}

fn table() -> &'static Table {
    static T: std::sync::OnceLock<&'static Table> = std::sync::OnceLock::new();
    T.get_or_init(|| {
        let mut t = Table::new();
        t.add_raw("nvme0n1".into(), BLOCKS * 4096, 0, 4096);
        t.add_null(1 << 20);
        Box::leak(Box::new(t))
    })
}

fn server(side: &mut loopback::ServerSide) -> Server<OneEngine<PatternQueue>> {
    let engine = Engine::new(PatternQueue {
        done: Vec::with_capacity(256),
    });
    let p = OneEngine::new(engine, now, rdtsc);
    let disks = [DiskLimits {
        depth: 256,
        max_transfer: 128 * 1024,
        lbs: 4096,
    }];
    Server::new(p, &mut side.sockets, table(), &disks, STALL_NS)
}

#[test]
fn reads_over_the_loopback_carry_the_device_bytes_and_allocate_nothing() {
    for link in [
        Link::default(),
        Link {
            csum: true,
            mtu: 9000,
            tso: false,
        },
        Link {
            csum: true,
            mtu: 1500,
            tso: true,
        },
    ] {
        // QD 128 fills the server's socket buffer (128 replies of 4 KiB are
        // twice its size): replies then wait in their buffers.
        for qd in [1, 16, 128] {
            let s0 = dioxide_testkit::thread_allocs();
            let (mut side, mut lb) = Loopback::new("nvme0n1", true, qd, now, rdtsc, link);
            let mut server = server(&mut side);
            lb.check(sum);
            assert_eq!(lb.connect(&mut side, &mut server).unwrap(), BLOCKS * 4096);
            let warm = lb.run(&mut side, &mut server, 1_000, qd).unwrap();
            assert_eq!((warm.reads, warm.failed), (1_000, 0));
            let a0 = dioxide_testkit::thread_allocs();
            // The control: the same counter saw the setup allocate (socket
            // buffers, the server's tables, the pools' first buffers), so
            // the 0 below is not a counter that never counts.
            assert!(a0 - s0 > 0, "{link:?} qd {qd}: setup counted no allocation");
            let f = lb.run(&mut side, &mut server, 5_000, qd).unwrap();
            let allocs = dioxide_testkit::thread_allocs() - a0;
            assert_eq!((f.reads, f.failed), (5_000, 0), "{link:?} qd {qd}");
            assert_eq!(allocs, 0, "{link:?} qd {qd}: allocations");
            assert!(f.frames.sent > 0 && f.frames.received > 0);
            lb.close(&mut side, &mut server);
            assert_eq!(server.in_flight(), 0);
            assert_eq!(server.served(), 6_000);
        }
    }
}

/// The busy report says what a server that is not idle holds: a line for
/// the reads in flight and one per connection with its peer and state; an
/// idle server reports nothing.
#[test]
fn the_busy_report_names_each_connection_held_and_is_silent_when_idle() {
    let (mut side, mut lb) = Loopback::new("nvme0n1", true, 4, now, rdtsc, Link::default());
    let mut server = server(&mut side);
    let _ = dioxide_testkit::logged("nbd");
    // Idle before any connection: nothing said.
    assert!(!server.report_busy(&mut side.sockets, 0));
    assert_eq!(dioxide_testkit::logged("nbd"), Vec::<String>::new());
    lb.connect(&mut side, &mut server).unwrap();
    let f = lb.run(&mut side, &mut server, 50, 4).unwrap();
    assert_eq!((f.reads, f.failed), (50, 0));
    let _ = dioxide_testkit::logged("nbd");
    assert!(server.report_busy(&mut side.sockets, 0));
    let lines = dioxide_testkit::logged("nbd");
    assert_eq!(lines.len(), 2, "{lines:#?}");
    assert!(
        lines[0].starts_with("busy: core 0: 0 reads in flight"),
        "{lines:#?}"
    );
    assert!(
        lines[1].starts_with("busy: core 0: connection ")
            && lines[1].contains(": ESTABLISHED, 0 reads in flight"),
        "{lines:#?}"
    );
    lb.close(&mut side, &mut server);
    let _ = dioxide_testkit::logged("nbd");
    assert!(
        !server.report_busy(&mut side.sockets, 0),
        "idle after the close"
    );
    assert_eq!(dioxide_testkit::logged("nbd"), Vec::<String>::new());
}

#[test]
fn the_null_export_answers_zeros_without_allocating() {
    let s0 = dioxide_testkit::thread_allocs();
    let (mut side, mut lb) = Loopback::new("null", false, 128, now, rdtsc, Link::default());
    let mut server = server(&mut side);
    lb.check(|_| fnv1a(FNV_START, &[0u8; 4096]));
    lb.connect(&mut side, &mut server).unwrap();
    lb.run(&mut side, &mut server, 1_000, 128).unwrap();
    let a0 = dioxide_testkit::thread_allocs();
    // The control, as above: the setup was counted.
    assert!(a0 - s0 > 0, "setup counted no allocation");
    let f = lb.run(&mut side, &mut server, 5_000, 128).unwrap();
    assert_eq!(dioxide_testkit::thread_allocs() - a0, 0);
    assert_eq!((f.reads, f.failed), (5_000, 0));
}

#[test]
fn stack_timer_asks_for_the_next_timer_at_most_once_per_check_time() {
    use smoltcp::time::{Duration, Instant};
    let mut side = Loopback::new("null", false, 1, now, rdtsc, Link::default()).0;
    let t0 = Instant::from_millis(1_000);
    let mut t = StackTimer::new(t0);
    assert!(t.due(t0));
    // No socket has a timer: the next poll is 100 ms away.
    t.polled(&mut side.iface, &side.sockets, t0);
    assert!(!t.due(t0 + Duration::from_millis(50)));
    assert!(t.due(t0 + Duration::from_millis(100)));
    // Within the check time the timer is not looked up: a poll then asks
    // for another one no later than TIMER_CHECK after it.
    t.polled(
        &mut side.iface,
        &side.sockets,
        t0 + Duration::from_micros(500),
    );
    assert!(!t.due(t0 + Duration::from_micros(1_400)));
    assert!(t.due(t0 + Duration::from_micros(1_500)));
}

thread_local! {
    /// This thread's clock for the tests that let time pass (ns).
    static CLOCK: std::cell::Cell<u64> = const { std::cell::Cell::new(1_000_000_000) };
}

/// Moves on 10 µs per look (so that the stack's timers, such as its
/// delayed ACKs, fire while the client and server step), and by as much as
/// a test adds.
fn test_clock() -> u64 {
    CLOCK.with(|c| {
        c.set(c.get() + 10_000);
        c.get()
    })
}

/// A connection whose client went quiet: kept while the client answers
/// the keep-alive probes, dropped (the socket listens again, the server
/// goes idle with its buffers given back) when everything sent to it is
/// lost, as when its RST never reached us.
#[test]
fn a_client_gone_unheard_is_dropped_and_a_quiet_one_that_answers_is_kept() {
    const STALL: u64 = 2_000_000_000;
    const PEER: u64 = 4_000_000_000;
    // The default: a probe after 15 s of silence, dropped after 5 min.
    let (k, t) = peer_timers(STALL_NS, PEER_TIMEOUT_NS);
    assert_eq!((k.total_millis(), t.total_millis()), (15_000, 300_000));
    // The timeout is at least two keep-alive intervals.
    let (k, t) = peer_timers(STALL_NS, 1_000_000_000);
    assert_eq!((k.total_millis(), t.total_millis()), (15_000, 30_000));
    let (keep_alive, timeout) = peer_timers(STALL, PEER);
    assert_eq!(
        (keep_alive.total_millis(), timeout.total_millis()),
        (1_000, 4_000)
    );
    for answers in [true, false] {
        let (mut side, mut lb) =
            Loopback::new("nvme0n1", true, 4, test_clock, rdtsc, Link::default());
        let engine = Engine::new(PatternQueue {
            done: Vec::with_capacity(256),
        });
        let disks = [DiskLimits {
            depth: 256,
            max_transfer: 128 * 1024,
            lbs: 4096,
        }];
        let p = OneEngine::new(engine, test_clock, rdtsc);
        let mut server = Server::new(p, &mut side.sockets, table(), &disks, STALL);
        server.set_peer_timeout(&mut side.sockets, PEER);
        lb.connect(&mut side, &mut server).unwrap();
        let f = lb.run(&mut side, &mut server, 100, 4).unwrap();
        assert_eq!((f.reads, f.failed), (100, 0));
        let serving = |s: &Server<_>| {
            s.sockets
                .iter()
                .filter(|k| matches!(k.slot, Slot::Serving(_)))
                .count()
        };
        assert_eq!(serving(&server), 1);
        let (idle0, frames0) = (server.idle_reports, side.dev.frames().sent);
        // Three times the timeout passes without a request.
        let mut lost = 0;
        let end = test_clock() + 3 * timeout.total_millis() * 1_000_000;
        while test_clock() < end {
            CLOCK.with(|c| c.set(c.get() + 50_000_000));
            lost += lb.idle_step(&mut side, &mut server, answers);
        }
        let probes = side.dev.frames().sent - frames0;
        if answers {
            assert_eq!(serving(&server), 1, "a client that answers is kept");
            assert_eq!(server.idle_reports, idle0);
            // The control: the server did probe it, about once per
            // keep-alive interval.
            assert!(probes >= 6, "{probes} keep-alive probes in 12 s");
        } else {
            assert_eq!(serving(&server), 0, "a vanished client is dropped");
            assert_eq!(server.idle_reports, idle0 + 1, "the server went idle");
            assert!(server.small.is_empty() && server.large.is_empty());
            assert!(lost >= 3, "{lost} frames lost: probes before the timeout");
        }
    }
}

/// A connection is served (counted, greeted, given a slot's state) only
/// once its handshake is done: in SYN-RECEIVED an RST puts smoltcp's socket
/// back to LISTEN, which a serving slot would not notice.
#[test]
fn a_half_open_connection_is_not_served_until_its_handshake_completes() {
    let (mut side, mut lb) = Loopback::new("nvme0n1", true, 1, now, rdtsc, Link::default());
    let mut server = server(&mut side);
    let serving = |s: &Server<_>| {
        s.sockets
            .iter()
            .filter(|k| matches!(k.slot, Slot::Serving(_)))
            .count()
    };
    let half_open = |side: &loopback::ServerSide| {
        side.sockets
            .iter()
            .filter(|(_, s)| {
                matches!(s, smoltcp::socket::Socket::Tcp(t) if t.state() == tcp::State::SynReceived)
            })
            .count()
    };
    // ARP, then the SYN: the server takes it and answers; the client has
    // not answered yet.
    lb.send_syn();
    for _ in 0..100 {
        lb.serve(&mut side, &mut server);
        if half_open(&side) > 0 {
            break;
        }
        lb.client_step();
    }
    assert_eq!(half_open(&side), 1, "the SYN reached a listening socket");
    assert_eq!((serving(&server), server.connections()), (0, 0));
    // The control: the handshake done, it is served.
    assert_eq!(lb.connect(&mut side, &mut server).unwrap(), BLOCKS * 4096);
    assert_eq!((serving(&server), server.connections()), (1, 1));
}
