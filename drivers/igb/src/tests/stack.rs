//! Two smoltcp interfaces over two model devices wired back to back,
//! through `dioxide_nic::phy::NicDevice`.

use super::*;
use crate::model::ModelConfig;
use dioxide_nic::phy::NicDevice;
use dioxide_testkit::Rng;
use smoltcp::iface::{Config as IfConfig, Interface, SocketSet};
use smoltcp::socket::tcp;
use smoltcp::time::Instant;
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpAddress, IpCidr, Ipv4Address};

struct End {
    model: Model,
    hal: ModelHal,
    dev: Dev,
    nic: NicDevice<Queue<Model>>,
    iface: Interface,
}

fn end(mac: [u8; 6], ip: [u8; 4], cfg: Config) -> End {
    let mc = ModelConfig {
        mac,
        ..quick_model()
    };
    let (model, hal, dev, mut queues) = up_with(mc, cfg);
    let queue = queues.remove(0);
    let mut nic = NicDevice::new(queue, dev.caps());
    let hw = HardwareAddress::Ethernet(EthernetAddress(mac));
    let mut iface = Interface::new(IfConfig::new(hw), &mut nic, Instant::ZERO);
    iface.update_ip_addrs(|a| {
        let [x, y, z, w] = ip;
        a.push(IpCidr::new(IpAddress::v4(x, y, z, w), 24))
            .expect("one address");
    });
    End {
        model,
        hal,
        dev,
        nic,
        iface,
    }
}

/// Frames one model sent, received by the other.
fn carry(from: &End, to: &End) -> usize {
    from.model.step();
    let frames = from.model.take_wire();
    for f in &frames {
        to.model.inject(f);
    }
    to.model.step();
    frames.len()
}

fn socket(len: usize) -> tcp::Socket<'static> {
    tcp::Socket::new(
        tcp::SocketBuffer::new(vec![0; len]),
        tcp::SocketBuffer::new(vec![0; len]),
    )
}

/// Streams `data` from a to b over TCP and returns what b read, and the
/// frames that crossed the wire.
fn stream(a: &mut End, b: &mut End, data: &[u8]) -> (Vec<u8>, usize) {
    let mut sockets_a = SocketSet::new(vec![]);
    let mut sockets_b = SocketSet::new(vec![]);
    let ha = sockets_a.add(socket(256 * 1024));
    let hb = sockets_b.add(socket(256 * 1024));
    sockets_b
        .get_mut::<tcp::Socket>(hb)
        .listen(7000)
        .expect("listen");
    let cx = a.iface.context();
    sockets_a
        .get_mut::<tcp::Socket>(ha)
        .connect(cx, (Ipv4Address::new(10, 0, 0, 2), 7000), 49152)
        .expect("connect");
    let (mut sent, mut got, mut frames) = (0, Vec::new(), 0);
    for ms in 0..200_000u64 {
        let now = Instant::from_millis(ms as i64);
        a.iface.poll(now, &mut a.nic, &mut sockets_a);
        let sa = sockets_a.get_mut::<tcp::Socket>(ha);
        if sa.can_send() && sent < data.len() {
            sent += sa.send_slice(&data[sent..]).expect("send");
        }
        if sent == data.len() && sa.send_queue() == 0 {
            sa.close();
        }
        a.iface.poll(now, &mut a.nic, &mut sockets_a);
        frames += carry(a, b);
        b.iface.poll(now, &mut b.nic, &mut sockets_b);
        let sb = sockets_b.get_mut::<tcp::Socket>(hb);
        while sb.can_recv() {
            sb.recv(|d| {
                got.extend_from_slice(d);
                (d.len(), ())
            })
            .expect("recv");
        }
        b.iface.poll(now, &mut b.nic, &mut sockets_b);
        frames += carry(b, a);
        a.hal.advance(1_000_000);
        b.hal.advance(1_000_000);
        let sb = sockets_b.get_mut::<tcp::Socket>(hb);
        if got.len() == data.len() && !sb.may_recv() {
            break;
        }
    }
    (got, frames)
}

#[test]
fn two_smoltcp_stacks_exchange_a_tcp_stream_with_tso_over_two_models() {
    let cfg = Config {
        rx_descs: 256,
        tx_descs: 64,
        tso_bufs: 4,
        ..Config::default()
    };
    let mut a = end([0x52, 0x54, 0, 0, 0, 1], [10, 0, 0, 1], cfg);
    let mut b = end([0x52, 0x54, 0, 0, 0, 2], [10, 0, 0, 2], cfg);
    let mut data = vec![0u8; 2 * 1024 * 1024];
    Rng::new(42).fill(&mut data);
    let (got, frames) = stream(&mut a, &mut b, &data);
    assert_eq!(got.len(), data.len());
    assert!(got == data, "the stream arrives intact");
    // TSO was used: the device cut large segments, so far fewer
    // transmissions than wire frames.
    let sa = a.dev.stats();
    assert!(sa.tsctc > 0, "no TSO context used: {sa:?}");
    let ca = dioxide_nic::QueuePair::counters(a.nic.queue());
    assert!(
        ca.tx_frames < sa.gptc / 2,
        "{} sends, {} frames",
        ca.tx_frames,
        sa.gptc
    );
    assert!(frames as u64 >= sa.gptc);
    for e in [&a, &b] {
        assert!(e.model.errors().is_empty(), "{:?}", e.model.errors());
        let c = dioxide_nic::QueuePair::counters(e.nic.queue());
        assert_eq!(
            (c.malformed, c.rx_dropped, c.rx_bad_csum, c.tx_dropped),
            (0, 0, 0, 0)
        );
        let s = e.nic.stats();
        assert_eq!((s.rx.hw_bad, s.rx.sw_bad, s.tx_lost), (0, 0, 0), "{s:?}");
    }
}

#[test]
fn without_offloads_the_stacks_compute_every_checksum_themselves() {
    let cfg = Config {
        rx_descs: 256,
        tx_descs: 64,
        csum: false,
        tso: false,
        rx_csum: false,
        ..Config::default()
    };
    let mut a = end([0x52, 0x54, 0, 0, 0, 3], [10, 0, 0, 1], cfg);
    let mut b = end([0x52, 0x54, 0, 0, 0, 4], [10, 0, 0, 2], cfg);
    let mut data = vec![0u8; 256 * 1024];
    Rng::new(5).fill(&mut data);
    let (got, _) = stream(&mut a, &mut b, &data);
    assert!(got == data);
    assert_eq!(a.dev.stats().tsctc, 0);
}
