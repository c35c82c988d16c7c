//! The service over an in-memory wire, with a client on the other end: the
//! host benchmark of the whole request path and the kernel's no-allocation
//! self-test (`selftest=nbd-noalloc`) run the real [`Server`] this way.
//!
//! - [`Wire`]: two smoltcp Ethernet devices joined back to back, each
//!   frame a fixed buffer taken from a pool made at start (no allocation
//!   per frame). Like virtio-net: by default without offloads (1514-byte
//!   frames, checksums computed on transmit and not verified on receive:
//!   the kernel's NIC skips verification too, the host checked them);
//!   [`Link`] turns on checksum offload and a jumbo MTU. Each end
//!   counts its frames and the TSC cycles spent building them (inside the
//!   transmit token, as the kernel's NIC does) and processing received
//!   ones (inside the receive token).
//! - [`Loopback`]: the server's interface and sockets (10.0.0.1) and a
//!   client's (10.0.0.2) with one TCP socket and a sans-IO NBD client
//!   ([`dioxide_nbd::client::Client`]), which reads 4 KiB blocks at random
//!   4 KiB-aligned offsets with a given number in flight.
//!
//! One [`Loopback::step`] moves the client (send requests, take replies),
//! then the server as the kernel's run loop does: the stack
//! (`Interface::poll`), [`Server::poll`], and the stack again when a socket
//! was touched. Only the server's part is timed ([`Figures`]).

use crate::{Platform, Profile, Server, StackTimer, PORT};
use alloc::collections::VecDeque;
use alloc::rc::Rc;
use alloc::vec;
use alloc::vec::Vec;
use core::cell::RefCell;
use dioxide_iomap::{BlockQueue, DioError, DmaBuf, Engine, ReqId};
use dioxide_nbd::client::{Client, ClientError};
use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{Checksum, Device, DeviceCapabilities, Medium, RxToken, TxToken};
use smoltcp::socket::tcp;
use smoltcp::time::Instant;
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpAddress, IpCidr, Ipv4Address};

/// What the wire's ends offer, as virtio-net would with its offloads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Link {
    /// Transmit checksum offload (VIRTIO_NET_F_CSUM): smoltcp computes no
    /// TCP checksums (nothing on this wire checks them).
    pub csum: bool,
    /// IP MTU: 1500, or a jumbo MTU (9000) as on a tap device set up for
    /// it; the client's MSS follows it.
    pub mtu: usize,
    /// TCP segmentation offload (virtio-net's HOST_TSO4, smoltcp as patched
    /// in `third_party/smoltcp`): the server's end takes IP packets of up
    /// to 64 KiB, each carried whole to the client (the segmenting device
    /// and a receiver that coalesces, as Linux's GRO does, in one).
    pub tso: bool,
}

impl Default for Link {
    fn default() -> Link {
        Link {
            csum: false,
            mtu: 1500,
            tso: false,
        }
    }
}
/// Frames each direction holds.
const FRAMES: usize = 1024;
/// Time without anything moving after which a run gives up.
pub const STUCK_NS: u64 = 10_000_000_000;
/// The client's socket buffers: room for 128 replies of 4 KiB in flight.
const CLIENT_BUF: usize = 1 << 20;

/// A platform of one namespace (number 0) whose engine lives on this
/// thread, with heap DMA buffers and the given clocks (`now`: nanoseconds,
/// `rdtsc`: the cycles the profile counts): what the host benchmark and the
/// service's tests serve from.
pub struct OneEngine<Q: BlockQueue> {
    engine: RefCell<Engine<Q>>,
    now: fn() -> u64,
    rdtsc: fn() -> u64,
}

impl<Q: BlockQueue> OneEngine<Q> {
    pub fn new(engine: Engine<Q>, now: fn() -> u64, rdtsc: fn() -> u64) -> OneEngine<Q> {
        OneEngine {
            engine: RefCell::new(engine),
            now,
            rdtsc,
        }
    }
}

impl<Q: BlockQueue> Platform for OneEngine<Q> {
    type Queue = Q;
    type Buf = DmaBuf;
    fn alloc_buf(&self, len: usize) -> Option<DmaBuf> {
        DmaBuf::new(len)
    }
    fn with_engine<R>(&self, disk: usize, f: impl FnOnce(&mut Engine<Q>) -> R) -> Option<R> {
        (disk == 0).then(|| f(&mut self.engine.borrow_mut()))
    }
    fn service(&self, sink: &mut dyn FnMut(ReqId, Result<usize, DioError>)) {
        let mut e = self.engine.borrow_mut();
        e.poll();
        e.complete(sink);
    }
    fn now_ns(&self) -> u64 {
        (self.now)()
    }
    fn rdtsc(&self) -> u64 {
        (self.rdtsc)()
    }
}

/// Frame and cycle counts of one end.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Frames {
    pub sent: u64,
    pub received: u64,
    /// TSC cycles building sent frames (inside the transmit token).
    pub build: u64,
    /// TSC cycles processing received frames (inside the receive token).
    pub process: u64,
}

/// A frame buffer: moved (a pointer), never copied, between the free list,
/// a direction's queue and the token that fills or reads it.
type Buf = alloc::boxed::Box<[u8]>;

/// The shared state of both directions: a free list of frame buffers and
/// a queue of frames (buffer, length) per direction, all made at start.
pub struct Wire {
    free: Vec<Buf>,
    queues: [VecDeque<(Buf, usize)>; 2],
    stats: [Frames; 2],
    rdtsc: fn() -> u64,
    link: Link,
}

impl Wire {
    /// Both ends of a new wire offering `link`; `rdtsc` times the frames.
    pub fn pair(rdtsc: fn() -> u64, link: Link) -> (End, End) {
        let frame = Wire::frame(link);
        let wire = Rc::new(RefCell::new(Wire {
            free: (0..FRAMES)
                .map(|_| vec![0u8; frame].into_boxed_slice())
                .collect(),
            queues: [
                VecDeque::with_capacity(FRAMES),
                VecDeque::with_capacity(FRAMES),
            ],
            stats: [Frames::default(); 2],
            rdtsc,
            link,
        }));
        (
            End {
                wire: wire.clone(),
                side: 0,
            },
            End { wire, side: 1 },
        )
    }
}

impl Wire {
    /// The largest frame on a wire offering `link`.
    fn frame(link: Link) -> usize {
        if link.tso {
            TSO_MAX + 14
        } else {
            link.mtu + 14
        }
    }
}

/// Largest IP packet a TSO end takes.
pub const TSO_MAX: usize = 65535;

/// One end of a [`Wire`]: a smoltcp device.
pub struct End {
    wire: Rc<RefCell<Wire>>,
    side: usize,
}

impl End {
    /// This end's counts.
    pub fn frames(&self) -> Frames {
        self.wire.borrow().stats[self.side]
    }

    /// A frame waits for this end.
    pub fn has_rx(&self) -> bool {
        !self.wire.borrow().queues[self.side].is_empty()
    }

    /// Loses every frame waiting for this end (their buffers go back to
    /// the free list); returns how many.
    pub fn lose_rx(&self) -> usize {
        let mut w = self.wire.borrow_mut();
        let w = &mut *w;
        let n = w.queues[self.side].len();
        w.free
            .extend(w.queues[self.side].drain(..).map(|(buf, _)| buf));
        n
    }
}

pub struct Rx<'a> {
    end: &'a End,
    buf: Buf,
    len: usize,
}

pub struct Tx<'a> {
    end: &'a End,
}

impl RxToken for Rx<'_> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        // The token owns its buffer: no borrow of the wire is held while
        // `f` runs (smoltcp may transmit from inside it).
        let rdtsc = self.end.wire.borrow().rdtsc;
        let t0 = rdtsc();
        let r = f(&self.buf[..self.len]);
        let dt = rdtsc() - t0;
        let mut w = self.end.wire.borrow_mut();
        w.free.push(self.buf);
        let s = &mut w.stats[self.end.side];
        s.received += 1;
        s.process += dt;
        r
    }
}

impl TxToken for Tx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let (buf, rdtsc, frame) = {
            let mut w = self.end.wire.borrow_mut();
            (w.free.pop(), w.rdtsc, Wire::frame(w.link))
        };
        let len = len.min(frame);
        // `transmit` handed out this token only with a buffer free; were
        // there none, a buffer is made (the pool grows by one).
        let mut buf = buf.unwrap_or_else(|| vec![0u8; frame].into_boxed_slice());
        let t0 = rdtsc();
        let r = f(&mut buf[..len]);
        let dt = rdtsc() - t0;
        let mut w = self.end.wire.borrow_mut();
        let peer = 1 - self.end.side;
        w.queues[peer].push_back((buf, len));
        let s = &mut w.stats[self.end.side];
        s.sent += 1;
        s.build += dt;
        r
    }
}

impl Device for End {
    type RxToken<'a> = Rx<'a>;
    type TxToken<'a> = Tx<'a>;

    fn receive(&mut self, _ts: Instant) -> Option<(Rx<'_>, Tx<'_>)> {
        let (buf, len) = self.wire.borrow_mut().queues[self.side].pop_front()?;
        Some((
            Rx {
                end: self,
                buf,
                len,
            },
            Tx { end: self },
        ))
    }

    fn transmit(&mut self, _ts: Instant) -> Option<Tx<'_>> {
        if self.wire.borrow().free.is_empty() {
            None
        } else {
            Some(Tx { end: self })
        }
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let link = self.wire.borrow().link;
        let mut c = DeviceCapabilities::default();
        c.medium = Medium::Ethernet;
        c.max_transmission_unit = link.mtu + 14;
        c.max_burst_size = Some(64);
        let tx = if link.csum {
            Checksum::None
        } else {
            Checksum::Tx
        };
        c.checksum.ipv4 = Checksum::Tx;
        c.checksum.tcp = tx;
        c.checksum.udp = tx;
        // The server's end (side 0) segments; TSO goes with checksum
        // offload, as in the kernel's driver.
        if link.tso && link.csum && self.side == 0 {
            c.max_tso_size = TSO_MAX;
        }
        c
    }
}

/// The server's side of a loopback: its interface, device and sockets
/// (give `sockets` to [`Server::new`]).
pub struct ServerSide {
    pub iface: Interface,
    pub dev: End,
    pub sockets: SocketSet<'static>,
    /// When the stack's next timer is due (as the kernel's run loop keeps it).
    timer: StackTimer,
}

impl ServerSide {
    /// Runs the stack and notes when its next timer is due.
    fn poll(&mut self, now: fn() -> u64) {
        self.iface
            .poll(instant(now), &mut self.dev, &mut self.sockets);
        self.timer
            .polled(&mut self.iface, &self.sockets, instant(now));
    }
}

/// What the server spent on the reads of one [`Loopback::run`].
#[derive(Clone, Copy, Debug, Default)]
pub struct Figures {
    pub reads: u64,
    /// Replies with an error, with fewer bytes than asked, or (with
    /// [`Loopback::check`]) with other data.
    pub failed: u64,
    /// TSC cycles of the server's loop (stack and [`Server::poll`]).
    pub cycles: u64,
    /// Nanoseconds of the server's loop.
    pub ns: u64,
    /// The server's profile over the run (`net` included).
    pub profile: Profile,
    /// The server end's frames over the run.
    pub frames: Frames,
}

/// Why a loopback run stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoopError {
    Client(ClientError),
    /// Nothing moved for [`STUCK_NS`]: the server, the stack or the device
    /// is stuck (reads in flight then).
    Stuck(usize),
}

impl core::fmt::Display for LoopError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            LoopError::Client(e) => write!(f, "NBD client: {e}"),
            LoopError::Stuck(n) => write!(
                f,
                "no progress in {} s ({n} reads in flight)",
                STUCK_NS / 1_000_000_000
            ),
        }
    }
}

impl core::error::Error for LoopError {}

/// A client connected over a [`Wire`] to a server's [`ServerSide`].
pub struct Loopback {
    iface: Interface,
    dev: End,
    sockets: SocketSet<'static>,
    handle: SocketHandle,
    client: Client,
    rng: dioxide_testkit::Rng,
    now: fn() -> u64,
    rdtsc: fn() -> u64,
    /// The server's stack ran since its last poll.
    polled: bool,
    dirty: bool,
    /// With [`Loopback::check`]: the sum each read's data must have, from
    /// its offset; and the offset of each handle in flight.
    expect: Option<fn(u64) -> u64>,
    offsets: Vec<u64>,
}

const SERVER_IP: Ipv4Address = Ipv4Address::new(10, 0, 0, 1);
const CLIENT_IP: Ipv4Address = Ipv4Address::new(10, 0, 0, 2);

fn instant(now: fn() -> u64) -> Instant {
    Instant::from_micros((now() / 1000) as i64)
}

fn iface(dev: &mut End, mac: [u8; 6], ip: Ipv4Address, now: fn() -> u64) -> Interface {
    let config = Config::new(HardwareAddress::Ethernet(EthernetAddress(mac)));
    let mut iface = Interface::new(config, dev, instant(now));
    iface.update_ip_addrs(|a| {
        let _ = a.push(IpCidr::new(IpAddress::Ipv4(ip), 24));
    });
    iface
}

impl Loopback {
    /// A wire, the server's side of it (for [`Server::new`]) and a client
    /// side for export `export`, not yet connected. `now` gives
    /// nanoseconds, `rdtsc` the cycles the figures count; the wire offers
    /// `link`.
    pub fn new(
        export: &str,
        structured: bool,
        max_in_flight: usize,
        now: fn() -> u64,
        rdtsc: fn() -> u64,
        link: Link,
    ) -> (ServerSide, Loopback) {
        let (mut sdev, mut cdev) = Wire::pair(rdtsc, link);
        let siface = iface(&mut sdev, [2, 0, 0, 0, 0, 1], SERVER_IP, now);
        let ciface = iface(&mut cdev, [2, 0, 0, 0, 0, 2], CLIENT_IP, now);
        let mut csockets = SocketSet::new(vec![]);
        let mut sock = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0u8; CLIENT_BUF]),
            tcp::SocketBuffer::new(vec![0u8; CLIENT_BUF]),
        );
        sock.set_nagle_enabled(false);
        let handle = csockets.add(sock);
        (
            ServerSide {
                iface: siface,
                dev: sdev,
                sockets: SocketSet::new(vec![]),
                timer: StackTimer::new(instant(now)),
            },
            Loopback {
                iface: ciface,
                dev: cdev,
                sockets: csockets,
                handle,
                client: Client::new(export, structured, max_in_flight, 4096),
                rng: dioxide_testkit::Rng::new(0x5eed_0000_0000_0001),
                now,
                rdtsc,
                polled: true,
                dirty: true,
                expect: None,
                offsets: vec![0; max_in_flight.max(1)],
            },
        )
    }

    /// Checks every read's data from now on: `sum(offset)` is the
    /// FNV-1a ([`dioxide_nbd::client::fnv1a`]) of the 4 KiB at `offset`; a
    /// read whose data differs counts as failed.
    pub fn check(&mut self, sum: fn(u64) -> u64) {
        self.expect = Some(sum);
    }

    /// The NBD client, to send requests of any kind ([`Client::command`]);
    /// [`Loopback::settle`] runs both sides until they are answered.
    pub fn client(&mut self) -> &mut Client {
        &mut self.client
    }

    /// Runs both sides until the client has nothing in flight; appends
    /// the replies to `out` in arrival order (no allocation while `out`
    /// has room).
    pub fn settle<P: Platform>(
        &mut self,
        side: &mut ServerSide,
        server: &mut Server<P>,
        out: &mut Vec<dioxide_nbd::client::Reply>,
    ) -> Result<(), LoopError> {
        let mut last = (self.now)();
        self.dirty = true;
        while self.client.in_flight() > 0 {
            if let Some(e) = self.client.error() {
                return Err(LoopError::Client(e));
            }
            if self.step(side, server) {
                last = (self.now)();
            } else if (self.now)() - last > STUCK_NS {
                return Err(LoopError::Stuck(self.client.in_flight()));
            }
            out.extend(self.client.replies());
        }
        out.extend(self.client.replies());
        Ok(())
    }

    /// Writes `bytes` to the client's socket as they are, past the NBD
    /// client (a test's malformed or cut-short request); false when the
    /// socket took fewer.
    pub fn send_raw(&mut self, bytes: &[u8]) -> bool {
        let sock = self.sockets.get_mut::<tcp::Socket>(self.handle);
        let n = sock.send_slice(bytes).unwrap_or(0);
        self.dirty = true;
        self.iface
            .poll(instant(self.now), &mut self.dev, &mut self.sockets);
        n == bytes.len()
    }

    /// Runs both sides `n` steps.
    pub fn steps<P: Platform>(&mut self, side: &mut ServerSide, server: &mut Server<P>, n: usize) {
        for _ in 0..n {
            self.step(side, server);
        }
    }

    /// Sends the client's SYN (the handshake goes on in [`Loopback::connect`]).
    pub fn send_syn(&mut self) {
        let now = instant(self.now);
        let sock = self.sockets.get_mut::<tcp::Socket>(self.handle);
        if sock.is_open() {
            return;
        }
        // Connecting a fresh socket to a fixed address cannot fail.
        let _ = sock.connect(
            self.iface.context(),
            (IpAddress::Ipv4(SERVER_IP), PORT),
            49152 + (now.total_millis() % 10_000) as u16,
        );
        self.iface.poll(now, &mut self.dev, &mut self.sockets);
    }

    /// Connects (unless [`Loopback::send_syn`] began it) and negotiates:
    /// returns the export's size.
    pub fn connect<P: Platform>(
        &mut self,
        side: &mut ServerSide,
        server: &mut Server<P>,
    ) -> Result<u64, LoopError> {
        self.send_syn();
        let mut last = (self.now)();
        while !self.client.is_ready() {
            if let Some(e) = self.client.error() {
                return Err(LoopError::Client(e));
            }
            if self.step(side, server) {
                last = (self.now)();
            } else if (self.now)() - last > STUCK_NS {
                return Err(LoopError::Stuck(0));
            }
        }
        Ok(self.client.size())
    }

    /// Reads `n` blocks of 4 KiB at random offsets below `size` with
    /// `qd` in flight; the server's figures for them.
    pub fn run<P: Platform>(
        &mut self,
        side: &mut ServerSide,
        server: &mut Server<P>,
        n: u64,
        qd: usize,
    ) -> Result<Figures, LoopError> {
        let blocks = (self.client.size() / 4096).max(1);
        let mut f = Figures::default();
        let prof0 = server.prof;
        let frames0 = side.dev.frames();
        let (mut issued, mut done) = (0u64, 0u64);
        let mut last = (self.now)();
        while done < n {
            while issued < n && self.client.in_flight() < qd {
                let off = self.rng.below(blocks) * 4096;
                let h = self.client.read(off, 4096).map_err(LoopError::Client)?;
                if let Some(o) = self.offsets.get_mut(h as usize) {
                    *o = off;
                }
                issued += 1;
                self.dirty = true;
            }
            let (c0, t0) = ((self.rdtsc)(), (self.now)());
            let moved_server = self.serve(side, server);
            f.cycles += (self.rdtsc)() - c0;
            f.ns += (self.now)() - t0;
            let moved_client = self.client_step();
            for r in self.client.replies() {
                done += 1;
                let off = self.offsets.get(r.handle as usize).copied().unwrap_or(0);
                let wrong = self.expect.is_some_and(|sum| sum(off) != r.sum);
                if r.error != 0 || r.len != 4096 || wrong {
                    f.failed += 1;
                }
            }
            if let Some(e) = self.client.error() {
                return Err(LoopError::Client(e));
            }
            if moved_server || moved_client {
                last = (self.now)();
            } else if (self.now)() - last > STUCK_NS {
                return Err(LoopError::Stuck(self.client.in_flight()));
            }
        }
        f.reads = done;
        let p = server.prof;
        f.profile = Profile {
            net: p.net - prof0.net,
            complete: p.complete - prof0.complete,
            reply: p.reply - prof0.reply,
            decode: p.decode - prof0.decode,
            submit: p.submit - prof0.submit,
            send: p.send - prof0.send,
            loops: p.loops - prof0.loops,
        };
        let fr = side.dev.frames();
        f.frames = Frames {
            sent: fr.sent - frames0.sent,
            received: fr.received - frames0.received,
            build: fr.build - frames0.build,
            process: fr.process - frames0.process,
        };
        Ok(f)
    }

    /// Closes the client's side (a hard disconnect) and runs both sides
    /// until the server has let the connection go.
    pub fn close<P: Platform>(&mut self, side: &mut ServerSide, server: &mut Server<P>) {
        self.sockets.get_mut::<tcp::Socket>(self.handle).abort();
        for _ in 0..10_000 {
            self.step(side, server);
            if server.in_flight() == 0 && !server.busy {
                break;
            }
        }
    }

    /// One step with no request made: the server's side runs, and the
    /// client's answers what reaches it (`answers`) or has vanished, every
    /// frame sent to it lost (as after a lost RST). Returns the frames
    /// lost.
    pub fn idle_step<P: Platform>(
        &mut self,
        side: &mut ServerSide,
        server: &mut Server<P>,
        answers: bool,
    ) -> usize {
        self.serve(side, server);
        if answers {
            self.client_step();
            0
        } else {
            self.dev.lose_rx()
        }
    }

    /// One step of both sides; whether anything moved.
    fn step<P: Platform>(&mut self, side: &mut ServerSide, server: &mut Server<P>) -> bool {
        let a = self.serve(side, server);
        let b = self.client_step();
        a || b
    }

    /// The server's part of a step, as the kernel's run loop does it.
    pub fn serve<P: Platform>(&mut self, side: &mut ServerSide, server: &mut Server<P>) -> bool {
        let now = self.now;
        let t0 = (self.rdtsc)();
        let rx = side.dev.has_rx();
        if rx || self.dirty || side.timer.due(instant(now)) {
            side.poll(now);
            self.polled = true;
        }
        let t1 = (self.rdtsc)();
        let touched = server.poll(&mut side.sockets, self.polled);
        let t2 = (self.rdtsc)();
        self.polled = false;
        if touched {
            side.poll(now);
            self.polled = true;
        }
        self.dirty = touched;
        server.prof.net += (t1 - t0) + ((self.rdtsc)() - t2);
        rx || touched
    }

    /// The client's part: its stack, its socket and the NBD client.
    pub fn client_step(&mut self) -> bool {
        let now = instant(self.now);
        let mut moved = self.dev.has_rx();
        self.iface.poll(now, &mut self.dev, &mut self.sockets);
        let sock = self.sockets.get_mut::<tcp::Socket>(self.handle);
        let client = &mut self.client;
        while sock.can_recv() {
            match sock.recv(|b| {
                client.receive(b);
                (b.len(), b.len())
            }) {
                Ok(0) | Err(_) => break,
                Ok(_) => moved = true,
            }
        }
        let mut sent = false;
        while !client.output().is_empty() && sock.can_send() {
            match sock.send_slice(client.output()) {
                Ok(0) | Err(_) => break,
                Ok(k) => {
                    client.consume_output(k);
                    sent = true;
                }
            }
        }
        if sent {
            self.iface.poll(now, &mut self.dev, &mut self.sockets);
            moved = true;
        }
        moved
    }
}
