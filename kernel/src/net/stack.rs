//! TCP/IP through `smoltcp` on the virtio-net device
//! (`drivers::virtio_net`), with DHCP by default or a static address from
//! the command line (`net.ip=A.B.C.D/N net.gw=A.B.C.D`). Serviced (polled)
//! from the run loop.

use crate::drivers::pci::Function;
use crate::drivers::virtio_net::{self, NetDevice};
use crate::platform::time;
use alloc::vec;
use dioxide_service::StackTimer;
use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::socket::dhcpv4;
use smoltcp::time::Instant;
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpCidr, Ipv4Address, Ipv4Cidr};

/// The network stack of this core.
pub struct Net {
    pub dev: NetDevice,
    pub iface: Interface,
    pub sockets: SocketSet<'static>,
    dhcp: Option<SocketHandle>,
    pub configured: bool,
    /// When the stack's next timer is due.
    timer: StackTimer,
}

pub fn now() -> Instant {
    Instant::from_micros((time::now_ns() / 1000) as i64)
}

/// Static configuration from the command line.
pub struct StaticIp {
    pub cidr: Ipv4Cidr,
    pub gateway: Option<Ipv4Address>,
}

/// Brings up the first virtio-net function and the stack on it.
pub fn init(functions: &[Function], static_ip: Option<StaticIp>) -> Option<Net> {
    let (mut dev, mac) = virtio_net::probe(functions)?;
    let config = Config::new(HardwareAddress::Ethernet(EthernetAddress(mac)));
    let mut iface = Interface::new(config, &mut dev, now());
    let mut sockets = SocketSet::new(vec![]);
    let mut dhcp = None;
    let mut configured = false;
    match static_ip {
        Some(s) => {
            iface.update_ip_addrs(|a| {
                let _ = a.push(IpCidr::Ipv4(s.cidr));
            });
            if let Some(gw) = s.gateway {
                let _ = iface.routes_mut().add_default_ipv4_route(gw);
            }
            log::info!(target: "net", "static address {} {}", s.cidr, Via("gateway", s.gateway));
            configured = true;
        }
        None => dhcp = Some(sockets.add(dhcpv4::Socket::new())),
    }
    Some(Net {
        dev,
        iface,
        sockets,
        dhcp,
        configured,
        timer: StackTimer::new(now()),
    })
}

impl Net {
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

    /// Moves packets and runs timers; applies DHCP results.
    pub fn poll(&mut self) {
        self.iface.poll(now(), &mut self.dev, &mut self.sockets);
        self.timer.polled(&mut self.iface, &self.sockets, now());
        if let Some(h) = self.dhcp {
            let event = self.sockets.get_mut::<dhcpv4::Socket>(h).poll();
            match event {
                Some(dhcpv4::Event::Configured(c)) => {
                    self.iface.update_ip_addrs(|a| {
                        a.clear();
                        let _ = a.push(IpCidr::Ipv4(c.address));
                    });
                    match c.router {
                        Some(r) => {
                            let _ = self.iface.routes_mut().add_default_ipv4_route(r);
                        }
                        None => {
                            self.iface.routes_mut().remove_default_ipv4_route();
                        }
                    }
                    log::info!(target: "net", "DHCP: address {} {}", c.address, Via("router", c.router));
                    self.configured = true;
                }
                Some(dhcpv4::Event::Deconfigured) => {
                    self.iface.update_ip_addrs(|a| a.clear());
                    self.iface.routes_mut().remove_default_ipv4_route();
                    if self.configured {
                        log::warn!(target: "net", "DHCP: lease lost");
                    }
                    self.configured = false;
                }
                None => {}
            }
        }
    }
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
