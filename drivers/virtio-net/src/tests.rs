//! Golden bytes: the frames and sums were computed independently (a
//! Python script with the RFC 1071 sum), not by this crate.
use super::*;
use std::vec::Vec;

/// 52:54:00:ab:cd:ef -> 52:54:00:12:34:56, IPv4 10.0.2.15 -> 10.0.2.2
/// (header checksum 0x1081), TCP 10809 -> 40000 PSH|ACK, payload
/// "hello world" (odd length), TCP checksum field 0 (as smoltcp leaves it
/// when it does not compute it).
const TCP_FRAME: &str = "525400123456525400abcdef08004500003312344000400610810a00020f0a0002022a399c40010203040a0b0c0d5018ffff0000000068656c6c6f20776f726c64";
/// Its pseudo-header sum, folded, and the complete TCP checksum.
const TCP_PSEUDO: u16 = 0x1836;
const TCP_CSUM: u16 = 0x254b;
/// A DHCP-like UDP frame with its correct checksum 0x2278.
const UDP_FRAME: &str =
    "525400123456525400abcdef08004500002000010000401162bc0a00020f0a00020200440043000c227861626364";

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

#[test]
fn header_encoding_is_the_virtio_layout() {
    let h = Hdr {
        flags: Hdr::NEEDS_CSUM,
        gso_type: Hdr::GSO_TCPV4,
        hdr_len: 54,
        gso_size: 1448,
        csum_start: 34,
        csum_offset: 16,
        num_buffers: 3,
    };
    let b = h.encode();
    assert_eq!(
        b,
        [0x01, 0x01, 0x36, 0x00, 0xa8, 0x05, 0x22, 0x00, 0x10, 0x00, 0x03, 0x00]
    );
    assert_eq!(Hdr::decode(&b), Some(h));
    assert_eq!(Hdr::decode(&b[..11]), None);
    assert_eq!(Hdr::default().encode(), [0; 12]);
}

#[test]
fn tcp_goes_with_the_pseudo_header_sum_and_needs_csum() {
    let mut f = hex(TCP_FRAME);
    let h = prepare_tx(&mut f, true, None);
    assert_eq!(
        h,
        Hdr {
            flags: Hdr::NEEDS_CSUM,
            csum_start: 34,
            csum_offset: 16,
            ..Hdr::default()
        }
    );
    assert_eq!(f[50..52], TCP_PSEUDO.to_be_bytes());
    // The device's part gives the checksum a full computation gives.
    assert!(complete_csum(&mut f, &h));
    assert_eq!(f[50..52], TCP_CSUM.to_be_bytes());
    assert!(verify_rx(&f, 0, true));
    // Without the offload nothing changes.
    let mut g = hex(TCP_FRAME);
    assert_eq!(prepare_tx(&mut g, false, Some(1448)), Hdr::default());
    assert_eq!(g, hex(TCP_FRAME));
}

#[test]
fn ethernet_padding_is_not_summed() {
    let mut f = hex(TCP_FRAME);
    f.extend_from_slice(&[0xaa; 7]);
    let h = prepare_tx(&mut f, true, None);
    assert!(complete_csum(&mut f, &h));
    assert_eq!(f[50..52], TCP_CSUM.to_be_bytes());
}

#[test]
fn tso_only_for_segments_above_the_segment_size() {
    let mut f = hex(TCP_FRAME);
    // 11 bytes of payload: not above 11, above 10.
    assert_eq!(prepare_tx(&mut f, true, Some(11)).gso_type, Hdr::GSO_NONE);
    let h = prepare_tx(&mut f, true, Some(10));
    assert_eq!(
        (h.gso_type, h.gso_size, h.hdr_len, h.flags),
        (Hdr::GSO_TCPV4, 10, 54, Hdr::NEEDS_CSUM)
    );
}

#[test]
fn other_frames_get_a_plain_header() {
    let mut u = hex(UDP_FRAME);
    assert_eq!(prepare_tx(&mut u, true, None), Hdr::default());
    assert_eq!(u, hex(UDP_FRAME));
    // ARP, a truncated frame, an IPv4 fragment.
    let mut arp = hex(TCP_FRAME);
    arp[12..14].copy_from_slice(&[0x08, 0x06]);
    assert_eq!(prepare_tx(&mut arp, true, None), Hdr::default());
    let mut short = hex(TCP_FRAME)[..40].to_vec();
    assert_eq!(prepare_tx(&mut short, true, None), Hdr::default());
    let mut frag = hex(TCP_FRAME);
    frag[20] = 0x20; // more fragments
    assert_eq!(prepare_tx(&mut frag, true, None), Hdr::default());
}

#[test]
fn received_checksums() {
    let mut good = hex(TCP_FRAME);
    good[50..52].copy_from_slice(&TCP_CSUM.to_be_bytes());
    let mut bad = good.clone();
    bad[60] ^= 1;
    // Without GUEST_CSUM the host's frames are taken as they come.
    assert!(verify_rx(&bad, 0, false));
    // With it, the flags vouch; otherwise the sum is checked.
    assert!(verify_rx(&good, 0, true));
    assert!(!verify_rx(&bad, 0, true));
    assert!(verify_rx(&bad, Hdr::DATA_VALID, true));
    assert!(verify_rx(&hex(TCP_FRAME), Hdr::NEEDS_CSUM, true));
    assert!(verify_rx(&hex(UDP_FRAME), 0, true));
    let mut udp_bad = hex(UDP_FRAME);
    udp_bad[45] ^= 1;
    assert!(!verify_rx(&udp_bad, 0, true));
    // UDP without a checksum.
    udp_bad[40..42].copy_from_slice(&[0, 0]);
    assert!(verify_rx(&udp_bad, 0, true));
}

#[test]
fn feature_choice_and_its_account() {
    use feature::*;
    // QEMU virtio-net on user networking: no CSUM/TSO (no vnet header).
    let user = MAC | STATUS | MRG_RXBUF | RING_INDIRECT_DESC | VERSION_1 | (1 << 17);
    let c = choose(user, &Wanted::default(), None, None);
    assert_eq!(
        c.features,
        MAC | STATUS | MRG_RXBUF | RING_INDIRECT_DESC | VERSION_1
    );
    assert_eq!(
        std::format!("{c}"),
        "csum off (not offered), guest_csum off (not offered), mrg_rxbuf on, mtu 1500 (default), tso off (not offered)"
    );
    // On tap with host_mtu=9000, everything wanted.
    let tap = user | CSUM | GUEST_CSUM | HOST_TSO4 | HOST_TSO6 | MTU;
    let all = Wanted {
        csum: true,
        guest_csum: true,
        mrg_rxbuf: true,
        tso: true,
        mtu: None,
        queue_pairs: 1,
    };
    let c = choose(tap, &all, Some(9000), None);
    assert_eq!(c.features, tap & !(1 << 17));
    assert_eq!((c.mtu, c.mtu_from), (9000, MtuFrom::Device));
    assert_eq!(
        std::format!("{c}"),
        "csum on, guest_csum on, mrg_rxbuf on, mtu 9000 (the device's), tso on"
    );
    // TSO without CSUM; an MTU above the device's.
    let c = choose(
        tap,
        &Wanted {
            csum: false,
            mtu: Some(9500),
            ..all
        },
        Some(9000),
        None,
    );
    assert_eq!(c.tso, State::Needs("csum"));
    assert_eq!(c.features & (CSUM | HOST_TSO4 | HOST_TSO6), 0);
    assert_eq!(
        (c.mtu, c.mtu_from),
        (9000, MtuFrom::Clamped { asked: 9500 })
    );
    assert!(std::format!("{c}").contains("csum off (switched off)"));
    // An MTU without VIRTIO_NET_F_MTU: the argument's; the config field is
    // not believed when the feature is not offered.
    let c = choose(
        user,
        &Wanted {
            mtu: Some(4000),
            ..all
        },
        Some(1234),
        None,
    );
    assert_eq!((c.mtu, c.mtu_from), (4000, MtuFrom::Argument));
    assert_eq!(c.features & MTU, 0);
}

/// The feature words QEMU's virtio-net-pci offers (`event_idx=off`, as
/// `dioxide-qemu` sets it), logged by the kernel at `log=debug`: QEMU 7.2.22
/// and 10.0.2 on user networking, and on a tap device (vnet header) of a
/// Linux 6.18 host, where 10.0 adds the UDP segmentation offloads
/// (`peer_has_uso`: GUEST_USO4, GUEST_USO6, HOST_USO).
const QEMU_7_2_USER: u64 = 0x0000_0101_10bf_8024;
const QEMU_10_0_USER: u64 = 0x0000_0101_10bf_8024;
const QEMU_7_2_TAP: u64 = 0x0000_0101_10bf_ffa7;
const QEMU_10_0_TAP: u64 = 0x01c0_0101_10bf_ffa7;

/// Bits this crate does not name (VIRTIO 1.2, 5.1.3 and 6; 1.3 for USO).
mod unnamed {
    pub const CTRL_GUEST_OFFLOADS: u64 = 1 << 2;
    pub const GUEST_TSO4: u64 = 1 << 7;
    pub const GUEST_TSO6: u64 = 1 << 8;
    pub const GUEST_ECN: u64 = 1 << 9;
    pub const GUEST_UFO: u64 = 1 << 10;
    pub const HOST_ECN: u64 = 1 << 13;
    pub const HOST_UFO: u64 = 1 << 14;
    pub const CTRL_RX: u64 = 1 << 18;
    pub const CTRL_VLAN: u64 = 1 << 19;
    pub const CTRL_RX_EXTRA: u64 = 1 << 20;
    pub const GUEST_ANNOUNCE: u64 = 1 << 21;
    pub const CTRL_MAC_ADDR: u64 = 1 << 23;
    pub const RING_RESET: u64 = 1 << 40;
    pub const GUEST_USO4: u64 = 1 << 54;
    pub const GUEST_USO6: u64 = 1 << 55;
    pub const HOST_USO: u64 = 1 << 56;
    /// Not offered by QEMU without `hash=on` / `rss=on`; a 20-byte header.
    pub const HASH_REPORT: u64 = 1 << 57;
    pub const RSS: u64 = 1 << 60;
}

/// What `choose` may ever negotiate: the bits the driver implements.
const IMPLEMENTED: u64 = BASE
    | feature::CSUM
    | feature::GUEST_CSUM
    | feature::MTU
    | feature::HOST_TSO4
    | feature::HOST_TSO6
    | feature::MRG_RXBUF;

#[test]
fn qemu_7_2_and_10_0_offered_words_golden() {
    use feature::*;
    use unnamed::*;
    let user = CTRL_GUEST_OFFLOADS
        | MAC
        | MRG_RXBUF
        | STATUS
        | CTRL_VQ
        | CTRL_RX
        | CTRL_VLAN
        | CTRL_RX_EXTRA
        | GUEST_ANNOUNCE
        | CTRL_MAC_ADDR
        | RING_INDIRECT_DESC
        | VERSION_1
        | RING_RESET;
    assert_eq!((QEMU_7_2_USER, QEMU_10_0_USER), (user, user));
    let tap = user
        | CSUM
        | GUEST_CSUM
        | GUEST_TSO4
        | GUEST_TSO6
        | GUEST_ECN
        | GUEST_UFO
        | HOST_TSO4
        | HOST_TSO6
        | HOST_ECN
        | HOST_UFO;
    assert_eq!(QEMU_7_2_TAP, tap);
    assert_eq!(QEMU_10_0_TAP, tap | GUEST_USO4 | GUEST_USO6 | HOST_USO);
}

#[test]
fn qemu_10_0s_new_bits_are_never_negotiated() {
    let all = Wanted {
        csum: true,
        guest_csum: true,
        mrg_rxbuf: true,
        tso: true,
        mtu: None,
        queue_pairs: 1,
    };
    // The same choice on both versions, as the kernel logged it: 0x110018020
    // on user networking, 0x110019821 on tap (defaults), and with every
    // offload asked for.
    for (offered, want) in [
        (QEMU_7_2_USER, 0x1_1001_8020),
        (QEMU_10_0_USER, 0x1_1001_8020),
        (QEMU_7_2_TAP, 0x1_1001_9821),
        (QEMU_10_0_TAP, 0x1_1001_9821),
    ] {
        let c = choose(offered, &Wanted::default(), None, None);
        assert_eq!(c.features, want, "{offered:#x}");
        assert_eq!(c.features & !offered, 0);
        let c = choose(offered, &all, None, None);
        assert_eq!(c.features & !(offered & IMPLEMENTED), 0, "{offered:#x}");
        assert_eq!(c.features & (unnamed::GUEST_USO4 | unnamed::HOST_USO), 0);
    }
    assert_eq!(
        choose(QEMU_10_0_TAP, &all, None, None),
        choose(QEMU_7_2_TAP, &all, None, None)
    );
    assert_eq!(
        std::format!("{}", choose(QEMU_10_0_TAP, &Wanted::default(), None, None)),
        "csum on, guest_csum off (switched off), mrg_rxbuf on, mtu 1500 (default), tso on"
    );
    // Every bit offered, hash reporting and RSS too (whose 20-byte header
    // this driver does not speak): only what it implements.
    let c = choose(u64::MAX, &all, Some(9000), Some(4));
    assert_eq!(c.features, IMPLEMENTED);
    assert_eq!(c.features & (unnamed::HASH_REPORT | unnamed::RSS), 0);
}

/// QEMU's virtio-net on a tap with `queues=N` and `mq=on` (its `mq`
/// property sets bit 22; CTRL_VQ is on by default): the tap word with MQ.
/// Made up from the bits, not logged by the kernel.
const QEMU_10_0_TAP_MQ: u64 = QEMU_10_0_TAP | feature::MQ;

#[test]
fn queue_indexes_put_the_control_queue_after_every_pair() {
    assert_eq!((rx_queue(0), tx_queue(0)), (0, 1));
    assert_eq!((rx_queue(3), tx_queue(3)), (6, 7));
    let mq = Wanted {
        queue_pairs: 2,
        ..Wanted::default()
    };
    // Two pairs used of the device's 4: the control queue is 8, not 4.
    let c = choose(QEMU_10_0_TAP_MQ, &mq, None, Some(4));
    assert_eq!((c.queue_pairs, c.max_queue_pairs), (2, 4));
    assert_eq!(c.ctrl_queue(), Some(8));
    // Without MQ there is no control queue negotiated (CTRL_VQ is only
    // taken for MQ).
    let c = choose(QEMU_10_0_TAP_MQ, &Wanted::default(), None, Some(4));
    assert_eq!(c.ctrl_queue(), None);
    assert_eq!((c.queue_pairs, c.max_queue_pairs), (1, 1));
}

#[test]
fn multiqueue_only_when_offered_wanted_and_usable() {
    use feature::{CTRL_VQ, MQ};
    let want = |n: u16| Wanted {
        queue_pairs: n,
        ..Wanted::default()
    };
    let tap_default =
        "csum on, guest_csum off (switched off), mrg_rxbuf on, mtu 1500 (default), tso on";
    // On: CTRL_VQ and MQ negotiated, the pairs wanted within the device's.
    let c = choose(QEMU_10_0_TAP_MQ, &want(2), None, Some(4));
    assert_eq!(c.mq, State::On);
    assert_eq!(c.features, 0x1_1001_9821 | CTRL_VQ | MQ);
    assert_eq!(
        std::format!("{c}"),
        std::format!("{tap_default}, mq on, queue pairs 2 of 4")
    );
    // More wanted than the device has: its maximum.
    let c = choose(QEMU_10_0_TAP_MQ, &want(8), None, Some(4));
    assert_eq!((c.queue_pairs, c.max_queue_pairs), (4, 4));
    assert!(std::format!("{c}").ends_with("mq on, queue pairs 4 of 4 (8 asked)"));
    // One pair wanted (the default; 0 counts as 1): nothing negotiated,
    // nothing said, whatever the device offers.
    for n in [0, 1] {
        let c = choose(QEMU_10_0_TAP_MQ, &want(n), None, Some(4));
        assert_eq!(c.mq, State::SwitchedOff);
        assert_eq!(c.features & (CTRL_VQ | MQ), 0);
        assert_eq!(std::format!("{c}"), tap_default);
    }
    // Not offered (QEMU without mq=on): one pair, and the line of a
    // single-queue device as it always was.
    let c = choose(QEMU_10_0_TAP, &want(2), None, Some(4));
    assert_eq!(c.mq, State::NotOffered);
    assert_eq!(c.features & (CTRL_VQ | MQ), 0);
    assert_eq!(std::format!("{c}"), tap_default);
    // MQ without the control queue it needs (a device that breaks the
    // specification's rule).
    let c = choose(QEMU_10_0_TAP_MQ & !CTRL_VQ, &want(2), None, Some(4));
    assert_eq!(c.mq, State::Needs("ctrl_vq"));
    assert_eq!(c.features & (CTRL_VQ | MQ), 0);
    // A maximum that gives no second pair, is out of the specification's
    // range, is beyond a 16-bit control queue index, or was not read.
    for max in [None, Some(0), Some(1), Some(0x8000), Some(0xffff)] {
        let c = choose(QEMU_10_0_TAP_MQ, &want(2), None, max);
        assert_eq!(
            c.mq,
            State::Needs("max_virtqueue_pairs from 2 to 32767"),
            "{max:?}"
        );
        assert_eq!(c.features & (CTRL_VQ | MQ), 0);
        assert_eq!(
            (c.queue_pairs, c.max_queue_pairs, c.ctrl_queue()),
            (1, 1, None)
        );
    }
    let c = choose(QEMU_10_0_TAP_MQ, &want(2), None, Some(MAX_QUEUE_PAIRS));
    assert_eq!(c.ctrl_queue(), Some(0xfffe));
    // The config field is not believed when MQ is not offered.
    let c = choose(QEMU_10_0_TAP, &want(2), None, Some(4));
    assert_eq!((c.queue_pairs, c.max_queue_pairs), (1, 1));
    // Every bit offered: only what the driver implements, with MQ.
    let all = Wanted {
        guest_csum: true,
        ..want(2)
    };
    let c = choose(u64::MAX, &all, Some(9000), Some(2));
    assert_eq!(c.features, IMPLEMENTED | CTRL_VQ | MQ);
}

/// VIRTIO 1.2, 5.1.6.5: `u8 class; u8 command; u8 data[]` then the
/// device-writable `u8 ack`; VIRTIO_NET_CTRL_MQ is 4, its
/// VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET 0 with `le16 virtqueue_pairs`
/// (5.1.6.5.5); VIRTIO_NET_OK 0, VIRTIO_NET_ERR 1. The bytes are written
/// out by hand from that layout.
#[test]
fn vq_pairs_set_command_golden() {
    assert_eq!(ctrl::mq_vq_pairs_set(2), Some([0x04, 0x00, 0x02, 0x00]));
    assert_eq!(
        ctrl::mq_vq_pairs_set(0x0102),
        Some([0x04, 0x00, 0x02, 0x01])
    );
    assert_eq!(ctrl::mq_vq_pairs_set(1), Some([0x04, 0x00, 0x01, 0x00]));
    assert_eq!(
        ctrl::mq_vq_pairs_set(0x8000),
        Some([0x04, 0x00, 0x00, 0x80])
    );
    // The driver must not ask for 0 pairs or more than 0x8000.
    assert_eq!(ctrl::mq_vq_pairs_set(0), None);
    assert_eq!(ctrl::mq_vq_pairs_set(0x8001), None);
    // The general encoder: any class and command, and a buffer too small.
    let mut b = [0xaau8; 8];
    assert_eq!(
        ctrl::encode(1, 1, &[0x52, 0x54, 0, 1, 2, 3], &mut b),
        Some(8)
    );
    assert_eq!(b, [0x01, 0x01, 0x52, 0x54, 0x00, 0x01, 0x02, 0x03]);
    assert_eq!(ctrl::encode(4, 0, &[2, 0], &mut [0u8; 3]), None);
    assert_eq!(ctrl::encode(3, 0, &[], &mut [0u8; 2]), Some(2));
}

#[test]
fn acks_decode() {
    use ctrl::Ack;
    assert_eq!(Ack::decode(&[0x00]), Some(Ack::Ok));
    assert_eq!(Ack::decode(&[0x01]), Some(Ack::Err));
    // The driver's mark, left as it was: not an answer to take as OK.
    assert_eq!(Ack::decode(&[ctrl::ACK_UNSET]), Some(Ack::Other(0xff)));
    assert_eq!(Ack::decode(&[0x02]), Some(Ack::Other(2)));
    // Nothing written; a command's result after the ack.
    assert_eq!(Ack::decode(&[]), None);
    assert_eq!(Ack::decode(&[0x00, 0x09, 0x09]), Some(Ack::Ok));
}

#[test]
fn sums_fold_like_rfc1071() {
    // RFC 1071's example: 00 01 f2 03 f4 f5 f6 f7 sums to 0xddf2.
    assert_eq!(
        fold(sum(&[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7], 0)),
        0xddf2
    );
    // Large inputs do not overflow.
    let big = std::vec![0xffu8; 70_000];
    assert_eq!(fold(sum(&big, 0)), 0xffff);
}
