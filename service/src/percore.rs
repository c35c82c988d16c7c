//! One network stack per core: what the stacks share.
//!
//! With a multi-queue NIC every core owns one receive/transmit queue pair
//! and its own smoltcp interface and sockets, all with one MAC and one IP
//! address. Receive-side scaling (RSS) sends each TCP connection's frames
//! to one queue, so a connection lives on one core from its SYN to its
//! FIN and nothing on the request path is shared. Two things are:
//!
//! - **What RSS cannot hash.** igb hashes TCP over IPv4 only; every other
//!   frame (ARP, ICMP, DHCP's UDP, IP fragments) arrives on queue 0, the
//!   primary core's (with virtio-net multiqueue the host's steering may put
//!   them on any queue). The core that receives them answers for the
//!   appliance (its interface has the same address), but the other cores
//!   must learn their peers' link addresses too: a core that answers a SYN
//!   from a host it has no neighbour entry for sends an ARP request, and
//!   the reply may come back on another core's queue. So a core whose
//!   queue may receive them copies every ARP reply (and DHCP message to
//!   the client port, for the primary core's DHCP) it receives into each
//!   other core's [`Inboxes`] (bounded; a full inbox drops the copy and
//!   counts it, ARP asks again), and each core's [`Fanout`] device hands
//!   its inbox's frames to its stack before the wire's. IPv4 fragments are not reassembled by our smoltcp build, on
//!   any core (as before: TCP peers send with DF set).
//! - **The address.** DHCP runs on the primary core; [`SharedAddress`]
//!   publishes each lease (or the static `net.ip=`) and the other cores
//!   apply it when its generation changes (one relaxed load per poll).

use alloc::vec::Vec;
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use crossbeam_queue::ArrayQueue;
use smoltcp::phy::{Device, DeviceCapabilities, RxToken};
use smoltcp::time::Instant;
use smoltcp::wire::{Ipv4Address, Ipv4Cidr};

/// The largest frame an inbox carries: an ARP frame over Ethernet is 42
/// bytes, 60 with the minimum frame's padding; a DHCP reply may fill the
/// MTU (smoltcp tells the server it takes MTU - 28 bytes): a 1,500-byte
/// MTU's frame.
pub const SIDE_MAX: usize = 1514;
/// Frames each core's inbox holds.
pub const INBOX_DEPTH: usize = 64;
/// Ethernet's type of ARP.
const ETHERTYPE_ARP: u16 = 0x0806;
/// ARP's operation code of a reply.
const ARP_REPLY: u16 = 2;
const ETHERTYPE_IPV4: u16 = 0x0800;
const UDP: u8 = 17;
/// Where DHCP servers send to.
const DHCP_CLIENT_PORT: u16 = 68;

/// A copied frame.
#[derive(Clone, Copy)]
pub struct SideFrame {
    len: u16,
    bytes: [u8; SIDE_MAX],
}

impl SideFrame {
    fn new(frame: &[u8]) -> Option<SideFrame> {
        let mut bytes = [0u8; SIDE_MAX];
        bytes.get_mut(..frame.len())?.copy_from_slice(frame);
        Some(SideFrame {
            len: frame.len() as u16,
            bytes,
        })
    }

    pub fn bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }
}

/// Where a received frame must also go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Share {
    /// Only to the core that received it.
    No,
    /// To every other core: an ARP reply (the answer to a request another
    /// core may have made). ARP requests are answered by the core that
    /// receives them (copied, each core would answer again).
    All,
    /// To the primary core (core 0), which runs DHCP: a DHCP message to the
    /// client port (with virtio-net multiqueue the host's steering may put
    /// it on any queue). The receiving core's stack has no socket for it.
    Primary,
}

/// Where frame `frame` must also go ([`Share`]).
pub fn share_of(frame: &[u8]) -> Share {
    let ethertype = |f: &[u8]| f.get(12..14).map(|t| u16::from_be_bytes([t[0], t[1]]));
    match ethertype(frame) {
        Some(ETHERTYPE_ARP)
            if frame.len() >= 22 && u16::from_be_bytes([frame[20], frame[21]]) == ARP_REPLY =>
        {
            Share::All
        }
        Some(ETHERTYPE_IPV4) if udp_dst_port(frame) == Some(DHCP_CLIENT_PORT) => Share::Primary,
        _ => Share::No,
    }
}

/// Whether a frame goes to other cores too ([`share_of`]).
pub fn is_shared(frame: &[u8]) -> bool {
    share_of(frame) != Share::No
}

/// The UDP destination port of an Ethernet/IPv4/UDP frame (first fragment
/// or whole), if it is one.
fn udp_dst_port(f: &[u8]) -> Option<u16> {
    let ver_ihl = *f.get(14)?;
    let ihl = usize::from(ver_ihl & 0x0f) * 4;
    let frag = u16::from_be_bytes([*f.get(20)?, *f.get(21)?]) & 0x1fff;
    if ver_ihl >> 4 != 4 || ihl < 20 || *f.get(23)? != UDP || frag != 0 {
        return None;
    }
    let p = f.get(14 + ihl + 2..14 + ihl + 4)?;
    Some(u16::from_be_bytes([p[0], p[1]]))
}

/// One bounded inbox per core for the frames the other cores copy to it.
pub struct Inboxes {
    boxes: Vec<ArrayQueue<SideFrame>>,
    /// Copies dropped: the inbox was full or the frame larger than
    /// [`SIDE_MAX`].
    dropped: AtomicU64,
    /// Copies delivered into inboxes.
    copied: AtomicU64,
}

impl Inboxes {
    pub fn new(cores: usize) -> Inboxes {
        Inboxes {
            boxes: (0..cores).map(|_| ArrayQueue::new(INBOX_DEPTH)).collect(),
            dropped: AtomicU64::new(0),
            copied: AtomicU64::new(0),
        }
    }

    /// Copies `frame` into every inbox but core `from`'s.
    pub fn publish(&self, from: usize, frame: &[u8]) {
        self.copy(frame, |core| core != from)
    }

    /// Copies `frame` into core `to`'s inbox.
    pub fn send(&self, to: usize, frame: &[u8]) {
        self.copy(frame, |core| core == to)
    }

    fn copy(&self, frame: &[u8], to: impl Fn(usize) -> bool) {
        let Some(f) = SideFrame::new(frame) else {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        };
        for (core, b) in self.boxes.iter().enumerate() {
            if !to(core) {
                continue;
            }
            match b.push(f) {
                Ok(()) => self.copied.fetch_add(1, Ordering::Relaxed),
                Err(_) => self.dropped.fetch_add(1, Ordering::Relaxed),
            };
        }
    }

    /// The next frame copied to core `core`.
    pub fn take(&self, core: usize) -> Option<SideFrame> {
        self.boxes.get(core)?.pop()
    }

    /// A frame waits in core `core`'s inbox.
    pub fn has(&self, core: usize) -> bool {
        self.boxes.get(core).is_some_and(|b| !b.is_empty())
    }

    /// (copies delivered, copies dropped) since start.
    pub fn counts(&self) -> (u64, u64) {
        (
            self.copied.load(Ordering::Relaxed),
            self.dropped.load(Ordering::Relaxed),
        )
    }
}

/// A core's NIC queue pair as its stack's device: the frames copied to
/// this core first (unless the wire has one too: a copy's turn needs a
/// transmit token, and with the transmit ring full the wire's frames would
/// wait behind it while the receive ring fills and drops), then the
/// wire's. On a publishing core every shared frame received is also copied to
/// the other cores.
pub struct Fanout<'i, D> {
    pub inner: D,
    /// Whether the wire has a frame waiting (without taking it).
    rx_ready: fn(&D) -> bool,
    core: usize,
    publish: bool,
    inboxes: &'i Inboxes,
    /// A copied frame taken from the inbox while no transmit token was
    /// free (smoltcp wants one with every received frame).
    pending: Option<SideFrame>,
}

impl<'i, D: Device> Fanout<'i, D> {
    /// Core `core`'s device; `publish`: its queue may receive frames every
    /// core must see ([`is_shared`]; igb: queue 0 only, what RSS cannot
    /// hash; virtio-net multiqueue: any queue), which it copies; `rx_ready` says whether `inner` has a received
    /// frame waiting.
    pub fn new(
        inner: D,
        rx_ready: fn(&D) -> bool,
        core: usize,
        publish: bool,
        inboxes: &'i Inboxes,
    ) -> Fanout<'i, D> {
        Fanout {
            inner,
            rx_ready,
            core,
            publish,
            inboxes,
            pending: None,
        }
    }

    /// Copied frames wait for this core's stack.
    pub fn has_side(&self) -> bool {
        self.pending.is_some() || self.inboxes.has(self.core)
    }
}

/// A received frame: a copy from the inbox (lent in place from the
/// device's pending slot, which consuming empties; a token dropped unused
/// leaves it for the next turn) or the wire's.
pub enum FanRx<'a, R> {
    Side(&'a mut Option<SideFrame>),
    Wire {
        rx: R,
        /// Set on a publishing core: where shared frames are copied to.
        publish: Option<(&'a Inboxes, usize)>,
    },
}

impl<R: RxToken> RxToken for FanRx<'_, R> {
    fn consume<T, F: FnOnce(&[u8]) -> T>(self, f: F) -> T {
        match self {
            FanRx::Side(slot) => {
                let side = slot.take();
                f(side.as_ref().map_or(&[][..], SideFrame::bytes))
            }
            FanRx::Wire { rx, publish } => rx.consume(|frame| {
                if let Some((boxes, core)) = publish {
                    match share_of(frame) {
                        Share::No => {}
                        Share::All => boxes.publish(core, frame),
                        Share::Primary if core != 0 => boxes.send(0, frame),
                        Share::Primary => {}
                    }
                }
                f(frame)
            }),
        }
    }

    fn meta(&self) -> smoltcp::phy::PacketMeta {
        match self {
            FanRx::Side(_) => smoltcp::phy::PacketMeta::default(),
            FanRx::Wire { rx, .. } => rx.meta(),
        }
    }
}

impl<'i, D: Device> Device for Fanout<'i, D> {
    type RxToken<'a>
        = FanRx<'a, D::RxToken<'a>>
    where
        Self: 'a;
    type TxToken<'a>
        = D::TxToken<'a>
    where
        Self: 'a;

    fn receive(&mut self, ts: Instant) -> Option<(Self::RxToken<'_>, Self::TxToken<'_>)> {
        if self.pending.is_none() {
            self.pending = self.inboxes.take(self.core);
        }
        // A copied frame goes first unless the wire has one too (see the
        // type).
        if self.pending.is_some() && !(self.rx_ready)(&self.inner) {
            let Fanout { inner, pending, .. } = self;
            let tx = inner.transmit(ts)?;
            return Some((FanRx::Side(pending), tx));
        }
        let publish = self.publish.then_some((self.inboxes, self.core));
        let (rx, tx) = self.inner.receive(ts)?;
        Some((FanRx::Wire { rx, publish }, tx))
    }

    fn transmit(&mut self, ts: Instant) -> Option<Self::TxToken<'_>> {
        self.inner.transmit(ts)
    }

    fn capabilities(&self) -> DeviceCapabilities {
        self.inner.capabilities()
    }
}

/// The appliance's address as the primary core learned it (DHCP or
/// `net.ip=`), for the other cores. A seqlock: the writer makes the
/// generation odd, stores, makes it even; a reader retries while it is odd
/// or changed under it. Written a few times per lease, read once per poll.
pub struct SharedAddress {
    gen: AtomicU32,
    /// Address (high 32 bits) and prefix length (bits 0..8); bit 8: set.
    addr: AtomicU64,
    /// Router (high 32 bits); bit 0: set.
    router: AtomicU64,
}

/// An address and its router, as the other cores apply it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Address {
    pub cidr: Option<Ipv4Cidr>,
    pub router: Option<Ipv4Address>,
}

impl Default for SharedAddress {
    fn default() -> Self {
        SharedAddress::new()
    }
}

impl SharedAddress {
    pub const fn new() -> SharedAddress {
        SharedAddress {
            gen: AtomicU32::new(0),
            addr: AtomicU64::new(0),
            router: AtomicU64::new(0),
        }
    }

    /// Publishes a new address (`None`: the lease was lost).
    pub fn set(&self, a: Address) {
        let g = self.gen.load(Ordering::Relaxed);
        self.gen.store(g.wrapping_add(1) | 1, Ordering::Relaxed);
        core::sync::atomic::fence(Ordering::Release);
        let addr = a.cidr.map_or(0, |c| {
            (u64::from(u32::from(c.address())) << 32) | 1 << 8 | u64::from(c.prefix_len())
        });
        let router = a.router.map_or(0, |r| (u64::from(u32::from(r)) << 32) | 1);
        self.addr.store(addr, Ordering::Relaxed);
        self.router.store(router, Ordering::Relaxed);
        self.gen
            .store((g.wrapping_add(1) | 1).wrapping_add(1), Ordering::Release);
    }

    /// The current generation: changes with every [`set`](Self::set).
    pub fn generation(&self) -> u32 {
        self.gen.load(Ordering::Acquire)
    }

    /// The address and the generation it belongs to.
    pub fn get(&self) -> (u32, Address) {
        loop {
            let g = self.gen.load(Ordering::Acquire);
            if g & 1 == 1 {
                core::hint::spin_loop();
                continue;
            }
            let addr = self.addr.load(Ordering::Relaxed);
            let router = self.router.load(Ordering::Relaxed);
            core::sync::atomic::fence(Ordering::Acquire);
            if self.gen.load(Ordering::Relaxed) != g {
                continue;
            }
            let cidr = (addr & 1 << 8 != 0)
                .then(|| Ipv4Cidr::new(Ipv4Address::from((addr >> 32) as u32), addr as u8));
            let router = (router & 1 != 0).then(|| Ipv4Address::from((router >> 32) as u32));
            return (g, Address { cidr, router });
        }
    }
}
