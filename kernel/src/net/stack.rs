//! TCP/IP through `smoltcp`, one stack per core that serves: on a NIC
//! port ([`NetPort`]: virtio-net's device, an igb queue pair), with DHCP
//! by default or a static address from the command line (`net.ip=A.B.C.D/N
//! net.gw=A.B.C.D`). With one stack per core the primary core's runs DHCP
//! and the others take its address ([`ADDRESS`]). Serviced (polled) from
//! each core's run loop.

use crate::drivers::virtio_net::NetDevice;
use crate::platform::time;
use alloc::vec;
use dioxide_service::percore::{Address, Fanout, SharedAddress};
use dioxide_service::StackTimer;
use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::Device;
use smoltcp::socket::dhcpv4;
use smoltcp::time::Instant;
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpCidr, Ipv4Address, Ipv4Cidr};

/// What a core's stack runs over: a smoltcp device (received and sent
/// frames, offload capabilities in its `DeviceCapabilities`) that can say
/// whether a frame waits without taking it. virtio-net's device, an igb
/// queue pair and the per-core [`Fanout`] over either implement it.
pub trait NetPort: Device {
    /// A received frame waits.
    fn has_rx(&self) -> bool;
    /// This port's own frame counters (received, sent) since start, when
    /// it keeps its own (a queue pair of a multi-queue NIC); single-queue
    /// virtio-net counts for the whole device (`virtio_net::stats`).
    fn frames(&self) -> Option<(u64, u64)>;
    /// Unmasks the interrupt that wakes this core when a frame arrives;
    /// false when the port has none (its core keeps polling).
    fn arm_wakeup(&mut self) -> bool {
        false
    }
    /// Masks it again (the core polls while it is awake).
    fn disarm_wakeup(&mut self) {}
}

impl NetPort for NetDevice {
    fn has_rx(&self) -> bool {
        NetDevice::has_rx(self)
    }
    fn frames(&self) -> Option<(u64, u64)> {
        NetDevice::frames(self)
    }
}

impl NetPort for crate::drivers::igb::Port {
    fn has_rx(&self) -> bool {
        self.queue().has_frame()
    }
    fn frames(&self) -> Option<(u64, u64)> {
        let c = dioxide_nic::QueuePair::counters(self.queue());
        Some((c.rx_frames, c.tx_frames))
    }
    fn arm_wakeup(&mut self) -> bool {
        // The queue's MSI-X entry points at this core (drivers::igb).
        if !crate::drivers::igb::can_wake() {
            return false;
        }
        self.queue().enable_irq();
        true
    }
    fn disarm_wakeup(&mut self) {
        self.queue().disable_irq();
    }
}

impl<D: NetPort> NetPort for Fanout<'static, D> {
    fn has_rx(&self) -> bool {
        self.has_side() || self.inner.has_rx()
    }
    fn frames(&self) -> Option<(u64, u64)> {
        self.inner.frames()
    }
    fn arm_wakeup(&mut self) -> bool {
        // A frame copied to this core's inbox while it sleeps waits for
        // the next interrupt or tick (ARP: within 10 ms).
        self.inner.arm_wakeup()
    }
    fn disarm_wakeup(&mut self) {
        self.inner.disarm_wakeup()
    }
}

/// The address the primary core's stack has (DHCP or `net.ip=`), for the
/// other cores' stacks (`dioxide_service::percore`).
pub static ADDRESS: SharedAddress = SharedAddress::new();

/// The network stack of one core.
pub struct Net<D: NetPort> {
    pub dev: D,
    pub iface: Interface,
    pub sockets: SocketSet<'static>,
    dhcp: Option<SocketHandle>,
    /// Another core's stack: the generation of [`ADDRESS`] applied.
    follows: Option<u32>,
    pub configured: bool,
    /// When the stack's next timer is due.
    timer: StackTimer,
}

pub fn now() -> Instant {
    Instant::from_micros((time::now_ns() / 1000) as i64)
}

/// Static configuration from the command line.
#[derive(Clone, Copy)]
pub struct StaticIp {
    pub cidr: Ipv4Cidr,
    pub gateway: Option<Ipv4Address>,
}

/// Where a stack's address comes from.
#[derive(Clone, Copy)]
pub enum Addressing {
    /// DHCP on this stack; each lease is published in [`ADDRESS`].
    Dhcp,
    /// `net.ip=`, also published.
    Static(StaticIp),
    /// Whatever the primary core's stack publishes.
    Follow,
}

/// Brings up the stack of one core on `dev` with MAC address `mac`.
pub fn init<D: NetPort>(mut dev: D, mac: [u8; 6], addressing: Addressing) -> Net<D> {
    let config = Config::new(HardwareAddress::Ethernet(EthernetAddress(mac)));
    let iface = Interface::new(config, &mut dev, now());
    let mut net = Net {
        dev,
        iface,
        sockets: SocketSet::new(vec![]),
        dhcp: None,
        follows: None,
        configured: false,
        timer: StackTimer::new(now()),
    };
    match addressing {
        Addressing::Static(s) => {
            net.apply(Address {
                cidr: Some(s.cidr),
                router: s.gateway,
            });
            log::info!(target: "net", "static address {} {}", s.cidr, Via("gateway", s.gateway));
            ADDRESS.set(Address {
                cidr: Some(s.cidr),
                router: s.gateway,
            });
        }
        Addressing::Dhcp => net.dhcp = Some(net.sockets.add(dhcpv4::Socket::new())),
        Addressing::Follow => net.follows = Some(0),
    }
    net
}

/// `router 10.0.2.2` or `no router` (and the same for `gateway`).
struct Via(&'static str, Option<Ipv4Address>);

impl core::fmt::Display for Via {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self.1 {
            Some(a) => write!(f, "{} {a}", self.0),
            None => write!(f, "no {}", self.0),
        }
    }
}

impl<D: NetPort> Net<D> {
    /// Polls the stack only when it has work: a frame arrived, a socket
    /// was used (`dirty`), or a timer is due. An idle `Interface::poll`
    /// still visits every socket, which under TCG cost more guest time per
    /// request than everything else together.
    /// Returns whether it polled.
    pub fn poll_if_needed(&mut self, dirty: bool) -> bool {
        let t = now();
        let rx = self.dev.has_rx();
        let poll = dirty || rx || self.timer.due(t);
        if poll {
            self.poll();
        }
        poll
    }

    /// The address of this stack (and its router), replacing the old.
    fn apply(&mut self, a: Address) {
        self.iface.update_ip_addrs(|addrs| {
            addrs.clear();
            if let Some(c) = a.cidr {
                let _ = addrs.push(IpCidr::Ipv4(c));
            }
        });
        match a.router {
            Some(r) => {
                let _ = self.iface.routes_mut().add_default_ipv4_route(r);
            }
            None => {
                self.iface.routes_mut().remove_default_ipv4_route();
            }
        }
        self.configured = a.cidr.is_some();
    }

    /// Moves packets and runs timers; applies DHCP results (the primary
    /// core) or the published address (the others).
    pub fn poll(&mut self) {
        if let Some(seen) = self.follows {
            if ADDRESS.generation() != seen {
                let (g, a) = ADDRESS.get();
                self.apply(a);
                self.follows = Some(g);
            }
        }
        self.iface.poll(now(), &mut self.dev, &mut self.sockets);
        self.timer.polled(&mut self.iface, &self.sockets, now());
        if let Some(h) = self.dhcp {
            // The event borrows the socket: its values are copied out first.
            let lease = match self.sockets.get_mut::<dhcpv4::Socket>(h).poll() {
                Some(dhcpv4::Event::Configured(c)) => Some(Some(Address {
                    cidr: Some(c.address),
                    router: c.router,
                })),
                Some(dhcpv4::Event::Deconfigured) => Some(None),
                None => None,
            };
            match lease {
                Some(Some(a)) => {
                    self.apply(a);
                    ADDRESS.set(a);
                    if let Some(c) = a.cidr {
                        log::info!(target: "net", "DHCP: address {c} {}", Via("router", a.router));
                    }
                }
                Some(None) => {
                    let was = self.configured;
                    let none = Address {
                        cidr: None,
                        router: None,
                    };
                    self.apply(none);
                    ADDRESS.set(none);
                    if was {
                        log::warn!(target: "net", "DHCP: lease lost");
                    }
                }
                None => {}
            }
        }
    }
}

/// Parses `A.B.C.D/N`.
pub fn parse_cidr(s: &str) -> Option<Ipv4Cidr> {
    let (ip, len) = s.split_once('/')?;
    Some(Ipv4Cidr::new(
        parse_ip(ip)?,
        len.parse().ok().filter(|&l: &u8| l <= 32)?,
    ))
}

pub fn parse_ip(s: &str) -> Option<Ipv4Address> {
    let mut o = [0u8; 4];
    let mut parts = s.split('.');
    for b in o.iter_mut() {
        *b = parts.next()?.parse().ok()?;
    }
    if parts.next().is_some() {
        return None;
    }
    Some(Ipv4Address::new(o[0], o[1], o[2], o[3]))
}
