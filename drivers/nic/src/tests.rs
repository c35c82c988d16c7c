//! The contract's arithmetic and the smoltcp adapter over an in-memory
//! queue pair.

use crate::csum::{self, fold, sum};
use crate::phy::{checksum_caps, device_caps, NicDevice};
use crate::{Caps, Counters, QueuePair, RxCsum, RxFrame, RxRing, TxMeta, TxRing};
use smoltcp::phy::{Checksum, Device, PacketMeta, RxToken, TxToken};
use smoltcp::time::Instant;
use std::collections::VecDeque;
use std::vec;
use std::vec::Vec;

/// A TCP/IPv4 frame 10.0.0.1:1000 -> 10.0.0.2:80 with `payload`, both
/// checksums filled.
pub(crate) fn tcp_frame(payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0u8; 14 + 20 + 20 + payload.len()];
    f[12..14].copy_from_slice(&[0x08, 0x00]);
    let ip = &mut f[14..34];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&((40 + payload.len()) as u16).to_be_bytes());
    ip[8] = 64;
    ip[9] = csum::PROTO_TCP;
    ip[12..16].copy_from_slice(&[10, 0, 0, 1]);
    ip[16..20].copy_from_slice(&[10, 0, 0, 2]);
    let tcp = &mut f[34..54];
    tcp[0..2].copy_from_slice(&1000u16.to_be_bytes());
    tcp[2..4].copy_from_slice(&80u16.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = 0x18;
    f[54..].copy_from_slice(payload);
    csum::fill_ipv4_header(&mut f, 20);
    let p = csum::parse_ipv4_l4(&f).expect("tcp frame");
    csum::fill_l4(&mut f, &p);
    f
}

#[test]
fn the_internet_checksum_matches_rfc_1071s_example() {
    // RFC 1071, 3: 00 01 f2 03 f4 f5 f6 f7 sums to 2ddf0, folds to ddf2.
    let d = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
    assert_eq!(sum(&d, 0), 0x2_ddf0);
    assert_eq!(fold(sum(&d, 0)), 0xddf2);
    // An odd byte is the high half of a word.
    assert_eq!(sum(&[0xab], 0), 0xab00);
}

#[test]
fn a_filled_frame_verifies_and_a_flipped_bit_does_not() {
    let mut f = tcp_frame(b"hello, world");
    assert!(csum::verify(&f));
    let p = csum::parse_ipv4_l4(&f).unwrap();
    assert_eq!(
        (p.ip_len, p.l4_hlen, p.proto, p.fragment),
        (20, 20, 6, false)
    );
    assert_eq!(p.headers(), 54);
    f[60] ^= 1;
    assert!(!csum::verify(&f));
    f[60] ^= 1;
    f[24] ^= 1; // in the IPv4 header
    assert!(!csum::verify(&f));
    // Not IPv4: nothing to check.
    assert!(csum::verify(&[0u8; 60]));
    // Too short for its own headers: not parsed, not verified.
    assert!(csum::parse_ipv4_l4(&f[..40]).is_none());
    assert!(!csum::verify(&f[..20]));
}

#[test]
fn smoltcp_is_told_what_the_device_checks_and_fills() {
    let caps = |csum, rx_csum| Caps {
        csum,
        tso: csum,
        rx_csum,
        mtu: 1500,
        max_frame: 65535 + 14,
        queues: 1,
    };
    let c = checksum_caps(&caps(false, false));
    assert!(matches!(
        (c.ipv4, c.tcp, c.udp),
        (Checksum::Both, Checksum::Both, Checksum::Both)
    ));
    let c = checksum_caps(&caps(true, false));
    assert!(matches!(
        (c.ipv4, c.tcp, c.udp),
        (Checksum::Both, Checksum::Rx, Checksum::Rx)
    ));
    let c = checksum_caps(&caps(false, true));
    assert!(matches!(
        (c.ipv4, c.tcp, c.udp),
        (Checksum::Tx, Checksum::Tx, Checksum::Tx)
    ));
    let c = checksum_caps(&caps(true, true));
    assert!(matches!(
        (c.ipv4, c.tcp, c.udp, c.icmpv4),
        (Checksum::Tx, Checksum::None, Checksum::None, Checksum::Both)
    ));
    let d = device_caps(&caps(true, true));
    assert_eq!((d.max_transmission_unit, d.max_tso_size), (1514, 65535));
    assert_eq!(device_caps(&caps(false, false)).max_tso_size, 0);
}

/// Frames in, frames out, in memory.
#[derive(Default)]
struct MemRx {
    frames: VecDeque<(Vec<u8>, RxCsum)>,
}

struct MemTx {
    sent: Vec<(Vec<u8>, TxMeta)>,
    room: usize,
    buf: Vec<u8>,
}

struct MemPair {
    rx: MemRx,
    tx: MemTx,
}

impl RxRing for MemRx {
    fn has_frame(&self) -> bool {
        !self.frames.is_empty()
    }
    fn receive<R>(&mut self, f: impl FnOnce(RxFrame<'_>) -> R) -> Option<R> {
        let (data, csum) = self.frames.pop_front()?;
        Some(f(RxFrame {
            data: &data,
            csum,
            rss_hash: None,
        }))
    }
}

impl TxRing for MemTx {
    fn can_transmit(&mut self) -> bool {
        self.room > 0
    }
    fn transmit<R>(
        &mut self,
        len: usize,
        meta: TxMeta,
        f: impl FnOnce(&mut [u8]) -> R,
    ) -> Option<R> {
        if self.room == 0 || len > self.buf.len() {
            return None;
        }
        self.room -= 1;
        let r = f(&mut self.buf[..len]);
        self.sent.push((self.buf[..len].to_vec(), meta));
        Some(r)
    }
    fn reclaim(&mut self) {}
}

impl QueuePair for MemPair {
    type Rx = MemRx;
    type Tx = MemTx;
    fn split(&mut self) -> (&mut MemRx, &mut MemTx) {
        (&mut self.rx, &mut self.tx)
    }
    fn counters(&self) -> Counters {
        Counters::default()
    }
}

fn device(rx_csum: bool, room: usize) -> NicDevice<MemPair> {
    let pair = MemPair {
        rx: MemRx::default(),
        tx: MemTx {
            sent: Vec::new(),
            room,
            buf: vec![0; 9000],
        },
    };
    let caps = Caps {
        csum: true,
        tso: true,
        rx_csum,
        mtu: 1500,
        max_frame: 9000,
        queues: 1,
    };
    NicDevice::new(pair, caps)
}

fn seen(dev: &mut NicDevice<MemPair>) -> usize {
    let (rx, _tx) = dev.receive(Instant::ZERO).expect("a frame");
    rx.consume(|d| d.len())
}

#[test]
fn with_receive_offload_good_frames_pass_bad_ones_are_dropped_and_unchecked_ones_are_checked_here()
{
    let mut dev = device(true, 4);
    let good = tcp_frame(b"payload");
    let mut broken = good.clone();
    broken[56] ^= 0xff;
    let q = &mut dev.queue_mut().rx.frames;
    q.push_back((good.clone(), RxCsum::Good));
    q.push_back((good.clone(), RxCsum::Bad));
    q.push_back((good.clone(), RxCsum::Unchecked));
    q.push_back((broken.clone(), RxCsum::Unchecked));
    // The device vouched for it: not checked again, even if broken.
    q.push_back((broken.clone(), RxCsum::Good));
    let lens: Vec<usize> = (0..5).map(|_| seen(&mut dev)).collect();
    assert_eq!(lens, [good.len(), 0, good.len(), 0, broken.len()]);
    let s = dev.stats().rx;
    assert_eq!((s.hw_bad, s.sw_checked, s.sw_bad), (1, 2, 1));
    assert!(dev.receive(Instant::ZERO).is_none());
}

#[test]
fn without_receive_offload_every_frame_goes_to_smoltcp_which_checks_it() {
    let mut dev = device(false, 4);
    let f = tcp_frame(b"x");
    dev.queue_mut()
        .rx
        .frames
        .push_back((f.clone(), RxCsum::Bad));
    assert_eq!(seen(&mut dev), f.len());
    assert_eq!(dev.stats().rx.sw_checked, 0);
}

#[test]
fn the_transmit_token_passes_the_segment_size_as_tso_mss() {
    let mut dev = device(true, 4);
    let mut tx = dev.transmit(Instant::ZERO).expect("room");
    let mut meta = PacketMeta::default();
    meta.gso_size = 1460;
    tx.set_meta(meta);
    tx.consume(3000, |b| b.fill(7));
    dev.transmit(Instant::ZERO)
        .unwrap()
        .consume(60, |b| b.fill(1));
    let sent = &dev.queue().tx.sent;
    assert_eq!(sent.len(), 2);
    assert_eq!(
        sent[0].1,
        TxMeta {
            csum: true,
            tso_mss: Some(1460)
        }
    );
    assert_eq!(
        sent[1].1,
        TxMeta {
            csum: true,
            tso_mss: None
        }
    );
    assert!(sent[0].0.iter().all(|&b| b == 7) && sent[0].0.len() == 3000);
}

#[test]
fn a_frame_the_ring_refuses_is_written_to_scratch_and_counted_lost() {
    let mut dev = device(true, 1);
    // Larger than the ring's buffers: refused, smoltcp still gets a buffer.
    let tx = dev.transmit(Instant::ZERO).expect("room");
    assert_eq!(tx.consume(9001, |b| b.len()), 9000);
    assert_eq!(dev.stats().tx_lost, 1);
    dev.transmit(Instant::ZERO).unwrap().consume(60, |_| ());
    assert!(dev.transmit(Instant::ZERO).is_none(), "ring full");
}
