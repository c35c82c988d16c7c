//! Two "cores" with one MAC and one IP address behind an RSS-like switch:
//! TCP frames go to the core the client's port picks, everything else to
//! core 0. A connection that lands on core 1 is established only when core
//! 0 copies ARP to core 1 (the control: without the copy it never is).

use crate::percore::{is_shared, Address, Fanout, Inboxes, SharedAddress};
use alloc::collections::VecDeque;
use alloc::rc::Rc;
use alloc::vec;
use alloc::vec::Vec;
use core::cell::RefCell;
use smoltcp::iface::{Config, Interface, SocketSet};
use smoltcp::phy::{Device, DeviceCapabilities, Medium, RxToken, TxToken};
use smoltcp::socket::tcp;
use smoltcp::time::Instant;
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpAddress, IpCidr, Ipv4Address, Ipv4Cidr};

type Frames = Rc<RefCell<VecDeque<Vec<u8>>>>;

/// A device receiving from `rx` and sending into `tx`.
struct Port {
    rx: Frames,
    tx: Frames,
}

impl Port {
    fn rx_ready(&self) -> bool {
        !self.rx.borrow().is_empty()
    }
}

/// A [`Port`] whose transmit ring is full: no transmit token.
struct FullTx(Port);

impl Device for FullTx {
    type RxToken<'a> = PRx;
    type TxToken<'a> = PTx;
    fn receive(&mut self, t: Instant) -> Option<(PRx, PTx)> {
        self.0.receive(t)
    }
    fn transmit(&mut self, _: Instant) -> Option<PTx> {
        None
    }
    fn capabilities(&self) -> DeviceCapabilities {
        self.0.capabilities()
    }
}

struct PRx(Vec<u8>);
struct PTx(Frames);

impl RxToken for PRx {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl TxToken for PTx {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut b = vec![0u8; len];
        let r = f(&mut b);
        self.0.borrow_mut().push_back(b);
        r
    }
}

impl Device for Port {
    type RxToken<'a> = PRx;
    type TxToken<'a> = PTx;
    fn receive(&mut self, _: Instant) -> Option<(PRx, PTx)> {
        let f = self.rx.borrow_mut().pop_front()?;
        Some((PRx(f), PTx(self.tx.clone())))
    }
    fn transmit(&mut self, _: Instant) -> Option<PTx> {
        Some(PTx(self.tx.clone()))
    }
    fn capabilities(&self) -> DeviceCapabilities {
        let mut c = DeviceCapabilities::default();
        c.medium = Medium::Ethernet;
        c.max_transmission_unit = 1514;
        c
    }
}

fn frames() -> Frames {
    Rc::new(RefCell::new(VecDeque::new()))
}

const SERVER_MAC: [u8; 6] = [2, 0, 0, 0, 0, 1];
const CLIENT_MAC: [u8; 6] = [2, 0, 0, 0, 0, 2];
const SERVER: Ipv4Address = Ipv4Address::new(10, 0, 0, 1);
const CLIENT: Ipv4Address = Ipv4Address::new(10, 0, 0, 2);

fn iface(mac: [u8; 6], ip: Ipv4Address, dev: &mut impl Device) -> Interface {
    let mut i = Interface::new(
        Config::new(HardwareAddress::Ethernet(EthernetAddress(mac))),
        dev,
        Instant::ZERO,
    );
    i.update_ip_addrs(|a| {
        let _ = a.push(IpCidr::new(IpAddress::Ipv4(ip), 24));
    });
    i
}

/// The TCP source port of an IPv4/TCP frame, if it is one.
fn tcp_src_port(f: &[u8]) -> Option<u16> {
    let eth = f.get(12..14)?;
    if eth != [0x08, 0x00] || *f.get(23)? != 6 {
        return None;
    }
    let ihl = usize::from(f.get(14)? & 0x0f) * 4;
    let p = f.get(14 + ihl..14 + ihl + 2)?;
    Some(u16::from_be_bytes([p[0], p[1]]))
}

/// Runs a client connecting from `port` to two cores; returns whether the
/// connection reached Established on the core the port picks within 2,000
/// steps, and which core that was.
fn connect(port: u16, fan_out: bool) -> (bool, usize) {
    let inboxes = Inboxes::new(2);
    let (rx0, rx1, from_cores, to_client, from_client) =
        (frames(), frames(), frames(), frames(), frames());
    let mut d0 = Fanout::new(
        Port {
            rx: rx0.clone(),
            tx: from_cores.clone(),
        },
        Port::rx_ready,
        0,
        fan_out,
        &inboxes,
    );
    let mut d1 = Fanout::new(
        Port {
            rx: rx1.clone(),
            tx: from_cores.clone(),
        },
        Port::rx_ready,
        1,
        false,
        &inboxes,
    );
    let mut dc = Port {
        rx: to_client.clone(),
        tx: from_client.clone(),
    };
    let mut i0 = iface(SERVER_MAC, SERVER, &mut d0);
    let mut i1 = iface(SERVER_MAC, SERVER, &mut d1);
    let mut ic = iface(CLIENT_MAC, CLIENT, &mut dc);
    let sock = || {
        tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; 4096]),
            tcp::SocketBuffer::new(vec![0; 4096]),
        )
    };
    let (mut s0, mut s1, mut sc) = (
        SocketSet::new(vec![]),
        SocketSet::new(vec![]),
        SocketSet::new(vec![]),
    );
    let l0 = s0.add(sock());
    let l1 = s1.add(sock());
    s0.get_mut::<tcp::Socket>(l0).listen(10809).unwrap();
    s1.get_mut::<tcp::Socket>(l1).listen(10809).unwrap();
    let c = sc.add(sock());
    sc.get_mut::<tcp::Socket>(c)
        .connect(ic.context(), (IpAddress::Ipv4(SERVER), 10809), port)
        .unwrap();
    let core = usize::from(port & 1);
    for step in 0..2000i64 {
        let t = Instant::from_millis(step * 10);
        ic.poll(t, &mut dc, &mut sc);
        // The switch: TCP by the client's port, the rest to core 0.
        while let Some(f) = from_client.borrow_mut().pop_front() {
            match tcp_src_port(&f) {
                Some(p) if p & 1 == 1 => rx1.borrow_mut().push_back(f),
                _ => rx0.borrow_mut().push_back(f),
            }
        }
        i0.poll(t, &mut d0, &mut s0);
        i1.poll(t, &mut d1, &mut s1);
        while let Some(f) = from_cores.borrow_mut().pop_front() {
            to_client.borrow_mut().push_back(f);
        }
        let owner = if core == 0 { &s0 } else { &s1 };
        let l = if core == 0 { l0 } else { l1 };
        if owner.get::<tcp::Socket>(l).state() == tcp::State::Established
            && sc.get::<tcp::Socket>(c).state() == tcp::State::Established
        {
            return (true, core);
        }
    }
    (false, core)
}

#[test]
fn a_connection_on_core_0_needs_no_copies() {
    assert_eq!(connect(50000, false), (true, 0));
    assert_eq!(connect(50000, true), (true, 0));
}

#[test]
fn a_connection_on_another_core_is_established_only_with_arp_copied_to_it() {
    assert_eq!(connect(50001, true), (true, 1));
    // Control: core 1 asks for the client's address; the answer goes to
    // core 0 and, not copied, never reaches core 1.
    assert_eq!(connect(50001, false), (false, 1));
}

#[test]
fn only_arp_replies_and_dhcp_to_the_client_are_shared_and_inboxes_are_bounded() {
    // DHCP: Ethernet, IPv4 (IHL 5, UDP), UDP 67 -> 68.
    let mut dhcp = [0u8; 342];
    dhcp[12..14].copy_from_slice(&[0x08, 0x00]);
    dhcp[14] = 0x45;
    dhcp[23] = 17;
    dhcp[34..36].copy_from_slice(&67u16.to_be_bytes());
    dhcp[36..38].copy_from_slice(&68u16.to_be_bytes());
    assert!(is_shared(&dhcp));
    let mut to_server = dhcp;
    to_server[36..38].copy_from_slice(&67u16.to_be_bytes());
    let mut tcp = dhcp;
    tcp[23] = 6;
    let mut later_fragment = dhcp;
    later_fragment[21] = 1;
    for (f, what) in [
        (&to_server, "to the server"),
        (&tcp, "TCP"),
        (&later_fragment, "fragment"),
    ] {
        assert!(!is_shared(f), "{what}");
    }
    assert!(!is_shared(&dhcp[..37]));
    assert_eq!(
        crate::percore::share_of(&dhcp),
        crate::percore::Share::Primary
    );
    // A DHCP reply as large as the MTU allows goes to core 0 only.
    let mut full = vec![0u8; crate::percore::SIDE_MAX];
    full[..dhcp.len()].copy_from_slice(&dhcp);
    let big = Inboxes::new(3);
    big.send(0, &full);
    assert_eq!(big.take(0).map(|f| f.bytes().len()), Some(full.len()));
    assert!(big.take(1).is_none() && big.take(2).is_none());

    let mut arp = [0u8; 42];
    arp[12] = 0x08;
    arp[13] = 0x06;
    arp[21] = 2; // reply
    let mut request = arp;
    request[21] = 1;
    let mut ip = arp;
    ip[13] = 0x00;
    assert!(is_shared(&arp));
    assert_eq!(crate::percore::share_of(&arp), crate::percore::Share::All);
    assert!(!is_shared(&request));
    assert!(!is_shared(&ip));
    assert!(!is_shared(&arp[..21]));
    let b = Inboxes::new(3);
    for _ in 0..crate::percore::INBOX_DEPTH + 5 {
        b.publish(0, &arp);
    }
    // Core 0 (the sender) gets none; 1 and 2 hold INBOX_DEPTH each.
    assert!(b.take(0).is_none());
    let depth = crate::percore::INBOX_DEPTH as u64;
    assert_eq!(b.counts(), (2 * depth, 10));
    let f = b.take(2).unwrap();
    assert_eq!(f.bytes(), &arp[..]);
    // Larger than an inbox frame: dropped and counted once.
    b.publish(0, &[0u8; crate::percore::SIDE_MAX + 1]);
    assert_eq!(b.counts().1, 11);
    assert!(b.take(7).is_none());
}

#[test]
fn the_shared_address_round_trips_and_its_generation_moves() {
    let s = SharedAddress::new();
    let (g0, a0) = s.get();
    assert_eq!(
        a0,
        Address {
            cidr: None,
            router: None
        }
    );
    let a = Address {
        cidr: Some(Ipv4Cidr::new(Ipv4Address::new(10, 0, 2, 15), 24)),
        router: Some(Ipv4Address::new(10, 0, 2, 2)),
    };
    s.set(a);
    let (g1, a1) = s.get();
    assert_eq!(a1, a);
    assert_ne!(g0, g1);
    assert_eq!(g1, s.generation());
    s.set(Address {
        cidr: None,
        router: None,
    });
    let (g2, a2) = s.get();
    assert_eq!(a2.cidr, None);
    assert_ne!(g1, g2);
}

/// A copied ARP frame waiting while the transmit ring is full does not
/// hold up the wire's frames; once the wire is drained it waits for a
/// transmit token (the control: with one, a copy is delivered).
#[test]
fn a_copied_frame_does_not_hold_up_the_wire_while_transmit_is_full() {
    let inboxes = Inboxes::new(2);
    let (rx1, tx1) = (frames(), frames());
    // An ARP reply as core 0 copies it to core 1's inbox.
    let mut arp = vec![0u8; 42];
    arp[..6].copy_from_slice(&SERVER_MAC);
    arp[6..12].copy_from_slice(&CLIENT_MAC);
    arp[12..14].copy_from_slice(&[0x08, 0x06]);
    arp[14..22].copy_from_slice(&[0, 1, 8, 0, 6, 4, 0, 2]);
    assert!(is_shared(&arp));
    inboxes.publish(0, &arp);
    let wire = vec![0xabu8; 60];
    rx1.borrow_mut().push_back(wire.clone());
    let port = FullTx(Port {
        rx: rx1.clone(),
        tx: tx1.clone(),
    });
    let mut d1 = Fanout::new(port, |p: &FullTx| p.0.rx_ready(), 1, false, &inboxes);
    assert!(d1.inner.0.rx_ready() && d1.has_side());
    let got = d1
        .receive(Instant::ZERO)
        .map(|(rx, _)| rx.consume(|f| f.to_vec()));
    assert_eq!(got.as_deref(), Some(&wire[..]), "the wire's frame first");
    // The wire is drained: the copy waits for a transmit token.
    assert!(d1.receive(Instant::ZERO).is_none());
    assert!(d1.has_side());
    let mut d1 = Fanout::new(
        Port {
            rx: rx1.clone(),
            tx: tx1.clone(),
        },
        Port::rx_ready,
        1,
        false,
        &inboxes,
    );
    inboxes.publish(0, &arp);
    let got = d1
        .receive(Instant::ZERO)
        .map(|(rx, _)| rx.consume(|f| f.to_vec()));
    assert_eq!(got.as_deref(), Some(&arp[..]), "then the copy");
}
