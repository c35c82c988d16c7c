//! The driver against the model.

mod bringup;
mod offloads;
mod rings;
mod stack;

use crate::model::{Model, ModelConfig, ModelHal};
use crate::{Config, Igb, Queue};
use dioxide_nic::csum;

#[global_allocator]
static GLOBAL: dioxide_testkit::CountingAlloc = dioxide_testkit::CountingAlloc;

pub(crate) type Dev = Igb<Model, ModelHal>;

/// The model's station address, and the peer's.
pub(crate) const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
pub(crate) const PEER: [u8; 6] = [0x52, 0x54, 0x00, 0xaa, 0xbb, 0xcc];

/// A model whose auto-negotiation takes 1 ms (QEMU's 500 ms is tested on
/// its own).
pub(crate) fn quick_model() -> ModelConfig {
    ModelConfig {
        autoneg_ns: 1_000_000,
        ..ModelConfig::default()
    }
}

/// Small rings, one queue.
pub(crate) fn small(queues: usize) -> Config {
    Config {
        queues,
        rx_descs: 8,
        tx_descs: 8,
        tso_bufs: 2,
        ..Config::default()
    }
}

pub(crate) fn up_with(mc: ModelConfig, cfg: Config) -> (Model, ModelHal, Dev, Vec<Queue<Model>>) {
    let (model, hal) = Model::new(mc);
    let (dev, queues) = Igb::new(model.clone(), hal.clone(), cfg).expect("device comes up");
    assert!(model.errors().is_empty(), "{:?}", model.errors());
    (model, hal, dev, queues)
}

pub(crate) fn up(cfg: Config) -> (Model, ModelHal, Dev, Vec<Queue<Model>>) {
    up_with(quick_model(), cfg)
}

/// An Ethernet + IPv4 frame carrying `proto` with `l4` (header and
/// payload) from `src` to `dst`, IPv4 checksum filled, L4 checksum filled
/// when `fill_l4`.
pub(crate) fn ipv4_frame(
    src: [u8; 4],
    dst: [u8; 4],
    proto: u8,
    l4: &[u8],
    fill_l4: bool,
) -> Vec<u8> {
    let mut f = Vec::with_capacity(34 + l4.len());
    f.extend_from_slice(&MAC);
    f.extend_from_slice(&PEER);
    f.extend_from_slice(&[0x08, 0x00]);
    let total = (20 + l4.len()) as u16;
    f.extend_from_slice(&[0x45, 0, 0, 0, 0x12, 0x34, 0x40, 0, 64, proto, 0, 0]);
    f[16..18].copy_from_slice(&total.to_be_bytes());
    f.extend_from_slice(&src);
    f.extend_from_slice(&dst);
    f.extend_from_slice(l4);
    csum::fill_ipv4_header(&mut f, 20);
    if fill_l4 {
        let p = csum::parse_ipv4_l4(&f).expect("l4");
        csum::fill_l4(&mut f, &p);
    }
    f
}

/// A TCP segment: ports, sequence number, flags, payload.
pub(crate) fn tcp(sport: u16, dport: u16, seq: u32, flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut t = vec![0u8; 20];
    t[0..2].copy_from_slice(&sport.to_be_bytes());
    t[2..4].copy_from_slice(&dport.to_be_bytes());
    t[4..8].copy_from_slice(&seq.to_be_bytes());
    t[12] = 5 << 4;
    t[13] = flags;
    t[14..16].copy_from_slice(&8192u16.to_be_bytes());
    t.extend_from_slice(payload);
    t
}

/// A UDP datagram.
pub(crate) fn udp(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut u = vec![0u8; 8];
    u[0..2].copy_from_slice(&sport.to_be_bytes());
    u[2..4].copy_from_slice(&dport.to_be_bytes());
    u[4..6].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    u.extend_from_slice(payload);
    u
}

/// A TCP/IPv4 frame 10.0.0.2:sport -> 10.0.0.1:80 with checksums.
pub(crate) fn tcp_frame(sport: u16, payload: &[u8]) -> Vec<u8> {
    let seg = tcp(sport, 80, 1, 0x18, payload);
    ipv4_frame([10, 0, 0, 2], [10, 0, 0, 1], csum::PROTO_TCP, &seg, true)
}
