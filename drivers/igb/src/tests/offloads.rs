//! RSS, checksum offload both ways, TSO.

use super::*;
use crate::regs;
use crate::rss::{self, MS_KEY};
use crate::{Mmio, RxCsum, RxRing, TxMeta, TxRing};
use dioxide_nic::csum::{PROTO_TCP, PROTO_UDP};
use dioxide_testkit::Rng;

/// What queue `q` received: (frame, verdict, hash).
fn take(q: &mut Queue<Model>) -> Vec<(Vec<u8>, RxCsum, Option<u32>)> {
    let mut v = Vec::new();
    while let Some(x) = q.rx().receive(|f| (f.data.to_vec(), f.csum, f.rss_hash)) {
        v.push(x);
    }
    v
}

#[test]
fn flows_land_on_the_queue_the_redirection_table_names_with_their_hash() {
    let cfg = Config {
        rx_descs: 64,
        ..small(4)
    };
    let (model, _hal, _dev, mut queues) = up(cfg);
    let table = rss::reta(4);
    let mut rng = Rng::new(11);
    let mut seen = [0usize; 4];
    for _ in 0..300 {
        let src = (rng.next_u64() as u32).to_be_bytes();
        let (sport, dport) = (rng.below(65536) as u16, rng.below(65536) as u16);
        let dst = [10, 0, 0, 1];
        let f = ipv4_frame(
            src,
            dst,
            PROTO_TCP,
            &tcp(sport, dport, 0, 0x10, b"rss"),
            true,
        );
        let hash = rss::toeplitz(&MS_KEY, &rss::ipv4_tcp_input(src, dst, sport, dport));
        let want = rss::queue_of(&table, hash);
        model.inject(&f);
        model.step();
        for (i, q) in queues.iter_mut().enumerate() {
            let got = take(q);
            if i == want {
                assert_eq!(got.len(), 1, "flow {src:?}:{sport} on queue {i}");
                assert_eq!(got[0].2, Some(hash));
                assert_eq!(got[0].0, f);
                seen[i] += 1;
            } else {
                assert!(
                    got.is_empty(),
                    "flow {src:?}:{sport} on queue {i}, wanted {want}"
                );
            }
        }
    }
    assert!(seen.iter().all(|&n| n > 40), "spread: {seen:?}");
}

#[test]
fn the_hash_of_microsofts_first_vector_arrives_in_the_descriptor() {
    let (model, _hal, _dev, mut queues) = up(small(1));
    let seg = tcp(2794, 1766, 0, 0x10, b"");
    let f = ipv4_frame(
        [66, 9, 149, 187],
        [161, 142, 100, 80],
        PROTO_TCP,
        &seg,
        true,
    );
    let u = ipv4_frame(
        [66, 9, 149, 187],
        [161, 142, 100, 80],
        PROTO_UDP,
        &udp(1, 2, b"u"),
        true,
    );
    let mut arp = f.clone();
    arp[12..14].copy_from_slice(&[0x08, 0x06]);
    for x in [&f, &u, &arp] {
        model.inject(x);
    }
    model.step();
    let got: Vec<Option<u32>> = take(&mut queues[0]).into_iter().map(|x| x.2).collect();
    // TCP/IPv4: 4-tuple; UDP and not IPv4: no hash (the driver hashes
    // TCP/IPv4 only, so that the rest reaches queue 0).
    assert_eq!(got, [Some(0x51cc_c178), None, None]);
}

#[test]
fn without_rxcsum_pcsd_there_is_no_rss_as_on_qemu() {
    let cfg = Config {
        rx_descs: 64,
        ..small(4)
    };
    let (model, _hal, _dev, mut queues) = up(cfg);
    model.write32(regs::RXCSUM, regs::rxcsum::IPOFLD | regs::rxcsum::TUOFLD);
    for sport in 0..40 {
        model.inject(&tcp_frame(sport, b"x"));
    }
    model.step();
    let got = take(&mut queues[0]);
    assert_eq!(got.len(), 40, "all on queue 0");
    assert!(got.iter().all(|x| x.2.is_none()));
}

#[test]
fn received_checksums_come_with_the_devices_verdict() {
    let (model, _hal, _dev, mut queues) = up(small(1));
    let good = tcp_frame(1, b"checked");
    let mut bad_l4 = good.clone();
    bad_l4[60] ^= 0x55;
    let mut bad_ip = good.clone();
    bad_ip[22] ^= 1; // TTL, under the header checksum
    let mut arp = good.clone();
    arp[12..14].copy_from_slice(&[0x08, 0x06]);
    let u = ipv4_frame(
        [10, 0, 0, 2],
        [10, 0, 0, 1],
        PROTO_UDP,
        &udp(5, 6, b"d"),
        true,
    );
    for f in [&good, &bad_l4, &bad_ip, &arp, &u] {
        model.inject(f);
    }
    model.step();
    let verdicts: Vec<RxCsum> = take(&mut queues[0]).into_iter().map(|x| x.1).collect();
    use RxCsum::*;
    assert_eq!(verdicts, [Good, Bad, Bad, Unchecked, Good]);
    assert_eq!(queues[0].rx().counters().rx_bad_csum, 2);
}

#[test]
fn without_receive_offload_nothing_is_vouched_for() {
    let cfg = Config {
        rx_csum: false,
        ..small(1)
    };
    let (model, _hal, dev, mut queues) = up(cfg);
    assert!(!dev.caps().rx_csum);
    model.inject(&tcp_frame(1, b"x"));
    model.step();
    let got = take(&mut queues[0]);
    assert_eq!((got[0].1, got[0].2.is_some()), (RxCsum::Unchecked, true));
}

/// Sends `f` with `meta` on queue 0 and returns what reached the wire.
fn send(model: &Model, q: &mut Queue<Model>, f: &[u8], meta: TxMeta) -> Vec<Vec<u8>> {
    q.tx()
        .transmit(f.len(), meta, |b| b.copy_from_slice(f))
        .expect("room");
    model.step();
    model.take_wire()
}

#[test]
fn transmit_checksum_offload_fills_tcp_and_udp_checksums() {
    let (model, _hal, _dev, mut queues) = up(small(1));
    let q = &mut queues[0];
    let csum = TxMeta {
        csum: true,
        tso_mss: None,
    };
    // As smoltcp leaves them with offload: IPv4 checksum right, L4 zero.
    let t = ipv4_frame(
        [10, 0, 0, 1],
        [10, 0, 0, 2],
        PROTO_TCP,
        &tcp(1, 2, 3, 0x18, b"tcp data"),
        false,
    );
    let u = ipv4_frame(
        [10, 0, 0, 1],
        [10, 0, 0, 2],
        PROTO_UDP,
        &udp(1, 2, b"udp data!"),
        false,
    );
    assert!(!csum::verify(&t));
    assert_eq!(&u[40..42], &[0, 0], "UDP without a checksum");
    for f in [&t, &u] {
        let wire = send(&model, q, f, csum);
        assert_eq!(wire.len(), 1);
        assert!(csum::verify(&wire[0]), "{:02x?}", wire[0]);
        let p = csum::parse_ipv4_l4(&wire[0]).expect("l4");
        assert_ne!(&wire[0][p.csum_off()..p.csum_off() + 2], &[0, 0]);
        assert_eq!(wire[0].len(), f.len());
    }
    // Without offload the frame goes out as written.
    let plain = send(&model, q, &t, TxMeta::default());
    assert_eq!(plain, std::slice::from_ref(&t));
    // Offload asked for a frame it does not apply to: sent as it is.
    let mut arp = t.clone();
    arp[12..14].copy_from_slice(&[0x08, 0x06]);
    assert_eq!(send(&model, q, &arp, csum), [arp]);
    assert!(model.errors().is_empty(), "{:?}", model.errors());
}

#[test]
fn tso_cuts_a_large_segment_into_correct_segments() {
    let (model, _hal, mut dev, mut queues) = up(small(1));
    let mut payload = vec![0u8; 10_000];
    Rng::new(3).fill(&mut payload);
    let (seq0, mss) = (0x1234_5678u32, 1448usize);
    // FIN|PSH|ACK|CWR: FIN and PSH belong on the last segment, CWR on the
    // first.
    let flags = 0x01 | 0x08 | 0x10 | 0x80;
    let f = ipv4_frame(
        [10, 0, 0, 1],
        [10, 0, 0, 2],
        PROTO_TCP,
        &tcp(4000, 80, seq0, flags, &payload),
        false,
    );
    let meta = TxMeta {
        csum: true,
        tso_mss: Some(mss as u16),
    };
    let wire = send(&model, &mut queues[0], &f, meta);
    assert!(model.errors().is_empty(), "{:?}", model.errors());
    assert_eq!(wire.len(), payload.len().div_ceil(mss));
    let mut joined = Vec::new();
    for (k, s) in wire.iter().enumerate() {
        let last = k + 1 == wire.len();
        let body = &s[54..];
        assert_eq!(body.len(), if last { 10_000 - 6 * mss } else { mss });
        assert_eq!(&s[..12], &f[..12], "Ethernet addresses copied");
        let total = u16::from_be_bytes([s[16], s[17]]) as usize;
        assert_eq!(total, 40 + body.len(), "IPv4 total length");
        assert_eq!(
            u16::from_be_bytes([s[18], s[19]]),
            0x1234 + k as u16,
            "IPv4 id"
        );
        let seq = u32::from_be_bytes([s[38], s[39], s[40], s[41]]);
        assert_eq!(seq, seq0 + (k * mss) as u32);
        let fl = s[47];
        assert_eq!(fl & 0x09 != 0, last, "FIN/PSH only on the last: {fl:#x}");
        assert_eq!(fl & 0x80 != 0, k == 0, "CWR only on the first: {fl:#x}");
        assert_eq!(fl & 0x10, 0x10, "ACK on all");
        // Both checksums, recomputed here from scratch.
        assert!(csum::ipv4_header_ok(s, 20), "segment {k} IPv4 checksum");
        let p = csum::parse_ipv4_l4(s).expect("tcp");
        assert!(csum::l4_ok(s, &p), "segment {k} TCP checksum");
        joined.extend_from_slice(body);
    }
    assert_eq!(joined, payload);
    let st = dev.stats();
    assert_eq!((st.tsctc, st.gptc), (1, 7), "one TSO context, seven frames");
}

#[test]
fn a_frame_too_large_without_tso_is_dropped_and_counted() {
    let (model, _hal, _dev, mut queues) = up(small(1));
    let q = &mut queues[0];
    let big_udp = ipv4_frame(
        [1, 1, 1, 1],
        [2, 2, 2, 2],
        PROTO_UDP,
        &udp(1, 2, &[0; 3000]),
        false,
    );
    let meta = TxMeta {
        csum: true,
        tso_mss: Some(1448),
    };
    // TSO of UDP is not offered: the closure ran, nothing was sent.
    assert_eq!(
        q.tx()
            .transmit(big_udp.len(), meta, |b| b.copy_from_slice(&big_udp)),
        Some(())
    );
    let big_tcp = ipv4_frame(
        [1, 1, 1, 1],
        [2, 2, 2, 2],
        PROTO_TCP,
        &tcp(1, 2, 0, 0x10, &[0; 3000]),
        false,
    );
    q.tx().transmit(big_tcp.len(), TxMeta::default(), |b| {
        b.copy_from_slice(&big_tcp)
    });
    model.step();
    assert!(model.take_wire().is_empty());
    assert_eq!(q.tx().counters().tx_dropped, 2);
    // Beyond DTALEN's 16 bits: refused before the closure.
    assert_eq!(q.tx().transmit(65_536, meta, |_| ()), None);
    assert!(q.tx().can_transmit(), "the TSO buffers came back");
}

#[test]
fn the_driver_leaves_the_pseudo_header_sums_the_datasheet_asks_for() {
    use crate::desc::tx;
    use crate::offload::prepare;
    let seg = tcp(1, 2, 3, 0x18, &[9; 3000]);
    let f = ipv4_frame([10, 0, 0, 1], [10, 0, 0, 2], PROTO_TCP, &seg, false);
    let (src, dst) = ([10, 0, 0, 1], [10, 0, 0, 2]);
    let field = |b: &[u8]| u16::from_be_bytes([b[50], b[51]]);
    // Checksum only: the pseudo-header sum with the TCP length.
    let mut c = f[..1514].to_vec();
    c[16..18].copy_from_slice(&1500u16.to_be_bytes());
    let p = prepare(
        &mut c,
        TxMeta {
            csum: true,
            tso_mss: None,
        },
        1514,
    )
    .expect("ok");
    assert_eq!(field(&c), csum::fold(csum::pseudo(src, dst, 6, Some(1480))));
    assert_eq!((p.dcmd, p.popts, p.paylen), (0, tx::TXSM, 1514));
    // TSO: without the length, IPv4 checksum zeroed, PAYLEN the payload.
    let mut t = f.clone();
    let meta = TxMeta {
        csum: true,
        tso_mss: Some(1000),
    };
    let p = prepare(&mut t, meta, 1514).expect("ok");
    assert_eq!(field(&t), csum::fold(csum::pseudo(src, dst, 6, None)));
    assert_eq!(&t[24..26], &[0, 0]);
    assert_eq!(
        (p.dcmd, p.popts, p.paylen),
        (tx::TSE, tx::IXSM | tx::TXSM, 3000)
    );
    let ctx = p.ctx.expect("context");
    assert_eq!(
        (ctx.maclen, ctx.iplen, ctx.l4len, ctx.mss),
        (14, 20, 20, 1000)
    );
    // A payload within one MSS needs no TSO.
    let mut small = f[..1000].to_vec();
    small[16..18].copy_from_slice(&986u16.to_be_bytes());
    assert_eq!(prepare(&mut small, meta, 1514).expect("ok").dcmd, 0);
}

/// On hardware the device sends after the tail write, not at it: while
/// every TSO buffer is in flight the ring says it cannot transmit (the
/// smoltcp adapter then holds the frame back) instead of taking a large
/// frame it would have to drop; once the device is done it can again.
#[test]
fn with_every_tso_buffer_in_flight_the_ring_takes_no_frame() {
    let (model, _hal, _dev, mut queues) = up(small(1));
    let f = ipv4_frame(
        [10, 0, 0, 1],
        [10, 0, 0, 2],
        PROTO_TCP,
        &tcp(4000, 80, 1, 0x10, &vec![7u8; 4000]),
        false,
    );
    let meta = TxMeta {
        csum: true,
        tso_mss: Some(1448),
    };
    let tx = queues[0].tx();
    // small(): 2 TSO buffers; the model has not run (nothing sent yet).
    for _ in 0..2 {
        assert!(tx.can_transmit());
        tx.transmit(f.len(), meta, |b| b.copy_from_slice(&f))
            .expect("room");
    }
    assert!(!tx.can_transmit(), "both TSO buffers in flight");
    model.step();
    assert!(tx.can_transmit(), "the device sent them: buffers back");
    assert!(model.errors().is_empty(), "{:?}", model.errors());
}
