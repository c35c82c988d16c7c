//! virtio-net offloads for dioxide's driver (`kernel/src/drivers/virtio_net.rs`),
//! as pure logic the host can test: which features to negotiate from what
//! the device offers and what the kernel arguments ask ([`choose`]), the
//! boot log's account of it ([`Choice`]'s `Display`), the virtio-net header
//! ([`Hdr`], VIRTIO 1.x layout, 12 bytes), and the per-frame work of the
//! offloads: a transmitted TCP segment handed over with a partial checksum
//! (and, with TSO, a segment size) ([`prepare_tx`]), and a received frame's
//! checksum checked when the device did not vouch for it ([`verify_rx`]).
//! For several queue pairs (VIRTIO_NET_F_MQ): their virtqueue indexes
//! ([`rx_queue`], [`tx_queue`], [`Choice::ctrl_queue`]) and the control
//! queue's command that turns them on ([`ctrl`]).
#![no_std]
#![forbid(unsafe_code)]

#[cfg(test)]
extern crate std;

use core::fmt;

/// Feature bits (VIRTIO 1.2, 5.1.3 and 6).
pub mod feature {
    /// The device completes partial checksums of transmitted frames.
    pub const CSUM: u64 = 1 << 0;
    /// The driver takes frames with partial checksums (and DATA_VALID).
    pub const GUEST_CSUM: u64 = 1 << 1;
    /// The device reports its maximum MTU in `mtu`.
    pub const MTU: u64 = 1 << 3;
    pub const MAC: u64 = 1 << 5;
    /// The device segments large TCP/IPv4 (IPv6) frames.
    pub const HOST_TSO4: u64 = 1 << 11;
    pub const HOST_TSO6: u64 = 1 << 12;
    /// A received frame may span several receive buffers (`num_buffers`).
    pub const MRG_RXBUF: u64 = 1 << 15;
    pub const STATUS: u64 = 1 << 16;
    /// The control virtqueue exists (its commands: [`ctrl`](crate::ctrl)).
    pub const CTRL_VQ: u64 = 1 << 17;
    /// Several receive/transmit queue pairs with automatic receive
    /// steering (`max_virtqueue_pairs`; requires CTRL_VQ).
    pub const MQ: u64 = 1 << 22;
    pub const RING_INDIRECT_DESC: u64 = 1 << 28;
    pub const RING_EVENT_IDX: u64 = 1 << 29;
    pub const VERSION_1: u64 = 1 << 32;
}

/// Negotiated whenever offered, as virtio-drivers' own `VirtIONetRaw` does.
pub const BASE: u64 = feature::MAC
    | feature::STATUS
    | feature::RING_EVENT_IDX
    | feature::RING_INDIRECT_DESC
    | feature::VERSION_1;

/// The standard Ethernet MTU (IP packet bytes).
pub const DEFAULT_MTU: u16 = 1500;
/// Ethernet header bytes (no VLAN tag).
pub const ETH_HLEN: usize = 14;
/// The largest frame the device takes with TSO (VIRTIO: 64 KiB minus the
/// header; smoltcp's IPv4 total length is 16 bits too).
pub const TSO_MAX: usize = 65535;

/// What the kernel arguments ask for (`net.csum=`, `net.guest_csum=`,
/// `net.mrg_rxbuf=`, `net.tso=`, `net.mtu=`), and how many queue pairs the
/// kernel can serve.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Wanted {
    pub csum: bool,
    pub guest_csum: bool,
    pub mrg_rxbuf: bool,
    pub tso: bool,
    /// IP MTU; `None`: the device's (`VIRTIO_NET_F_MTU`) or 1500.
    pub mtu: Option<u16>,
    /// Receive/transmit queue pairs wished for (one per core that serves):
    /// above 1, VIRTIO_NET_F_MQ and its control queue are negotiated where
    /// offered. 0 or 1: multiqueue off (nothing said in the boot log).
    pub queue_pairs: u16,
}

impl Default for Wanted {
    /// The kernel's defaults (see README, "virtio-net offloads").
    fn default() -> Self {
        Wanted {
            csum: true,
            guest_csum: false,
            mrg_rxbuf: true,
            tso: true,
            mtu: None,
            queue_pairs: 1,
        }
    }
}

/// Why an offload is on or off.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    On,
    /// The kernel argument turned it off.
    SwitchedOff,
    /// The device does not offer it.
    NotOffered,
    /// It needs another offload that is off (TSO needs CSUM).
    Needs(&'static str),
}

impl State {
    pub fn on(self) -> bool {
        self == State::On
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            State::On => f.write_str("on"),
            State::SwitchedOff => f.write_str("off (switched off)"),
            State::NotOffered => f.write_str("off (not offered)"),
            State::Needs(what) => write!(f, "off (needs {what})"),
        }
    }
}

/// Where the MTU came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MtuFrom {
    /// 1500: neither the device nor an argument said otherwise.
    Default,
    /// The device's `mtu` (VIRTIO_NET_F_MTU).
    Device,
    /// `net.mtu=`, within the device's maximum (or none reported).
    Argument,
    /// `net.mtu=` asked for more than the device's maximum: clamped.
    Clamped { asked: u16 },
}

/// The negotiated features and what they mean for the driver.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Choice {
    /// The feature bits to write (a subset of the offered ones).
    pub features: u64,
    pub csum: State,
    pub guest_csum: State,
    pub mrg_rxbuf: State,
    pub tso: State,
    /// IP MTU in use.
    pub mtu: u16,
    pub mtu_from: MtuFrom,
    /// Multiqueue (VIRTIO_NET_F_MQ with VIRTIO_NET_F_CTRL_VQ). `SwitchedOff`
    /// whenever at most one pair is wanted, offered or not.
    pub mq: State,
    /// Queue pairs to use: 1 without MQ, else the pairs wanted within the
    /// device's maximum. Pairs beyond the first carry frames only once the
    /// device has acknowledged [`ctrl::mq_vq_pairs_set`] with this number.
    pub queue_pairs: u16,
    /// The device's `max_virtqueue_pairs` with MQ, else 1: the number of
    /// pairs the virtqueue layout has (the control queue comes after them
    /// all, [`Choice::ctrl_queue`]).
    pub max_queue_pairs: u16,
    /// The pairs wanted (for the boot log when the device has fewer).
    pub queue_pairs_asked: u16,
}

/// The most queue pairs this driver uses: the control queue's index,
/// twice the device's `max_virtqueue_pairs`, must fit PCI's 16-bit
/// `queue_select` (the specification allows up to 0x8000 pairs).
pub const MAX_QUEUE_PAIRS: u16 = 0x7fff;

/// The virtqueue index of queue pair `pair`'s receive queue (receiveq
/// `pair + 1` in VIRTIO 1.2, 5.1.2).
pub const fn rx_queue(pair: u16) -> u16 {
    2 * pair
}

/// The virtqueue index of queue pair `pair`'s transmit queue.
pub const fn tx_queue(pair: u16) -> u16 {
    2 * pair + 1
}

impl Choice {
    /// The control queue's virtqueue index when CTRL_VQ is negotiated:
    /// `2 * max_virtqueue_pairs` with MQ, however few pairs are used, else
    /// 2 (VIRTIO 1.2, 5.1.2).
    pub fn ctrl_queue(&self) -> Option<u16> {
        (self.features & feature::CTRL_VQ != 0).then(|| 2 * self.max_queue_pairs)
    }
}

/// The features to negotiate. `device_mtu`: the `mtu` config field, read
/// only when the device offers VIRTIO_NET_F_MTU (pass `None` otherwise);
/// `device_max_pairs`: the `max_virtqueue_pairs` config field (offset 8,
/// le16), read only when it offers VIRTIO_NET_F_MQ (VIRTIO 1.2, 5.1.4: 1 to
/// 0x8000). MQ is negotiated, with CTRL_VQ, only when both are offered,
/// more than one pair is wanted and the device has from 2 to
/// [`MAX_QUEUE_PAIRS`].
pub fn choose(
    offered: u64,
    wanted: &Wanted,
    device_mtu: Option<u16>,
    device_max_pairs: Option<u16>,
) -> Choice {
    let state = |bit: u64, want: bool| {
        if offered & bit == 0 {
            State::NotOffered
        } else if !want {
            State::SwitchedOff
        } else {
            State::On
        }
    };
    let csum = state(feature::CSUM, wanted.csum);
    let guest_csum = state(feature::GUEST_CSUM, wanted.guest_csum);
    let mrg_rxbuf = state(feature::MRG_RXBUF, wanted.mrg_rxbuf);
    let mut tso = state(feature::HOST_TSO4, wanted.tso);
    if tso.on() && !csum.on() {
        tso = State::Needs("csum");
    }
    let mut features = offered & BASE;
    for (s, bit) in [
        (csum, feature::CSUM),
        (guest_csum, feature::GUEST_CSUM),
        (mrg_rxbuf, feature::MRG_RXBUF),
    ] {
        if s.on() {
            features |= bit;
        }
    }
    if tso.on() {
        features |= offered & (feature::HOST_TSO4 | feature::HOST_TSO6);
    }
    let device_mtu = device_mtu.filter(|_| offered & feature::MTU != 0);
    if device_mtu.is_some() {
        features |= feature::MTU;
    }
    // At least 68 (RFC 791); at most what a 16-bit frame length holds.
    let (mtu, mtu_from) = match (wanted.mtu, device_mtu) {
        (Some(a), Some(d)) if a > d => (d, MtuFrom::Clamped { asked: a }),
        (Some(a), _) => (a, MtuFrom::Argument),
        (None, Some(d)) => (d, MtuFrom::Device),
        (None, None) => (DEFAULT_MTU, MtuFrom::Default),
    };
    let device_max_pairs = device_max_pairs.filter(|_| offered & feature::MQ != 0);
    let mq = if wanted.queue_pairs <= 1 {
        State::SwitchedOff
    } else if offered & feature::MQ == 0 {
        State::NotOffered
    } else if offered & feature::CTRL_VQ == 0 {
        State::Needs("ctrl_vq")
    } else if !device_max_pairs.is_some_and(|m| (2..=MAX_QUEUE_PAIRS).contains(&m)) {
        State::Needs("max_virtqueue_pairs from 2 to 32767")
    } else {
        State::On
    };
    let (queue_pairs, max_queue_pairs) = match (mq, device_max_pairs) {
        (State::On, Some(max)) => {
            features |= feature::CTRL_VQ | feature::MQ;
            (wanted.queue_pairs.min(max), max)
        }
        _ => (1, 1),
    };
    Choice {
        features,
        csum,
        guest_csum,
        mrg_rxbuf,
        tso,
        mtu: mtu.clamp(68, 65535 - ETH_HLEN as u16),
        mtu_from,
        mq,
        queue_pairs,
        max_queue_pairs,
        queue_pairs_asked: wanted.queue_pairs.max(1),
    }
}

impl fmt::Display for Choice {
    /// `csum on, guest_csum off (switched off), mrg_rxbuf on, mtu 1500, tso off (not offered)`,
    /// then, when more than one queue pair was wanted, `, mq on, queue pairs 2 of 4`
    /// (`(8 asked)` when the device has fewer) or `, mq off (not offered), queue pairs 1`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "csum {}, guest_csum {}, mrg_rxbuf {}, mtu {}",
            self.csum, self.guest_csum, self.mrg_rxbuf, self.mtu
        )?;
        match self.mtu_from {
            MtuFrom::Default => f.write_str(" (default)")?,
            MtuFrom::Device => f.write_str(" (the device's)")?,
            MtuFrom::Argument => f.write_str(" (net.mtu)")?,
            MtuFrom::Clamped { asked } => {
                write!(f, " (net.mtu={asked} above the device's maximum)")?
            }
        }
        write!(f, ", tso {}", self.tso)?;
        // Said only when the device offers multiqueue: a single-queue
        // device's line stays as it was.
        if matches!(self.mq, State::SwitchedOff | State::NotOffered) {
            return Ok(());
        }
        write!(f, ", mq {}, queue pairs {}", self.mq, self.queue_pairs)?;
        if self.mq.on() {
            write!(f, " of {}", self.max_queue_pairs)?;
            if self.queue_pairs_asked > self.queue_pairs {
                write!(f, " ({} asked)", self.queue_pairs_asked)?;
            }
        }
        Ok(())
    }
}

/// The control virtqueue (VIRTIO_NET_F_CTRL_VQ; VIRTIO 1.2, 5.1.6.5): a
/// command is a device-readable part (`class`, `command`, the command's
/// data) followed by a device-writable `ack` byte, which the device sets to
/// [`OK`](ctrl::OK) or [`ERR`](ctrl::ERR).
pub mod ctrl {
    /// Class VIRTIO_NET_CTRL_MQ.
    pub const CLASS_MQ: u8 = 4;
    /// Its command VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET (automatic receive
    /// steering over `virtqueue_pairs` pairs; 5.1.6.5.5).
    pub const MQ_VQ_PAIRS_SET: u8 = 0;
    /// The `virtqueue_pairs` a driver may ask for (and at most the
    /// device's `max_virtqueue_pairs`).
    pub const MQ_VQ_PAIRS_MIN: u16 = 1;
    pub const MQ_VQ_PAIRS_MAX: u16 = 0x8000;
    /// `ack` values.
    pub const OK: u8 = 0;
    pub const ERR: u8 = 1;
    /// What the driver puts in the `ack` byte before posting a command:
    /// neither OK nor ERR, so that a byte the device never wrote does not
    /// read as OK.
    pub const ACK_UNSET: u8 = 0xff;

    /// Writes a command's device-readable part into `out`: `class`,
    /// `command`, then `data` (little-endian fields, as the command
    /// defines them). Its length, or `None` when `out` is too small.
    pub fn encode(class: u8, command: u8, data: &[u8], out: &mut [u8]) -> Option<usize> {
        let len = 2 + data.len();
        let out = out.get_mut(..len)?;
        out[0] = class;
        out[1] = command;
        out[2..].copy_from_slice(data);
        Some(len)
    }

    /// VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET for `pairs` (le16 `virtqueue_pairs`);
    /// `None` outside [`MQ_VQ_PAIRS_MIN`]..=[`MQ_VQ_PAIRS_MAX`]. The caller
    /// keeps it within the device's maximum ([`Choice::queue_pairs`](crate::Choice::queue_pairs)).
    pub fn mq_vq_pairs_set(pairs: u16) -> Option<[u8; 4]> {
        if !(MQ_VQ_PAIRS_MIN..=MQ_VQ_PAIRS_MAX).contains(&pairs) {
            return None;
        }
        let mut b = [0u8; 4];
        encode(CLASS_MQ, MQ_VQ_PAIRS_SET, &pairs.to_le_bytes(), &mut b)?;
        Some(b)
    }

    /// The device's answer to a command.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Ack {
        Ok,
        Err,
        /// Neither (e.g. [`ACK_UNSET`]: the device did not write it).
        Other(u8),
    }

    impl Ack {
        /// Reads the `ack` from the bytes the device wrote into the
        /// device-writable part (the used ring's length of it); `None` when
        /// it wrote none. Bytes after the first are a command's result.
        pub fn decode(written: &[u8]) -> Option<Ack> {
            Some(match *written.first()? {
                OK => Ack::Ok,
                ERR => Ack::Err,
                b => Ack::Other(b),
            })
        }
    }
}

/// The virtio-net header before every frame (VIRTIO 1.x: `num_buffers`
/// is always there, 12 bytes, little-endian).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Hdr {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
    pub num_buffers: u16,
}

impl Hdr {
    pub const LEN: usize = 12;
    /// `flags`: the checksum from `csum_start` on is partial (to be completed).
    pub const NEEDS_CSUM: u8 = 1;
    /// `flags` (received frames, with GUEST_CSUM): the checksums were checked.
    pub const DATA_VALID: u8 = 2;
    pub const GSO_NONE: u8 = 0;
    pub const GSO_TCPV4: u8 = 1;
    pub const GSO_TCPV6: u8 = 4;

    pub fn encode(&self) -> [u8; Hdr::LEN] {
        let mut b = [0u8; Hdr::LEN];
        b[0] = self.flags;
        b[1] = self.gso_type;
        for (i, v) in [
            self.hdr_len,
            self.gso_size,
            self.csum_start,
            self.csum_offset,
            self.num_buffers,
        ]
        .into_iter()
        .enumerate()
        {
            b[2 + 2 * i..4 + 2 * i].copy_from_slice(&v.to_le_bytes());
        }
        b
    }

    pub fn decode(b: &[u8]) -> Option<Hdr> {
        let b = b.get(..Hdr::LEN)?;
        let w = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        Some(Hdr {
            flags: b[0],
            gso_type: b[1],
            hdr_len: w(2),
            gso_size: w(4),
            csum_start: w(6),
            csum_offset: w(8),
            num_buffers: w(10),
        })
    }
}

/// The one's-complement sum of `data` (big-endian 16-bit words, an odd last
/// byte padded with zero) added to `sum`, not folded.
pub fn sum(data: &[u8], mut sum: u32) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum = sum.wrapping_add(u32::from(u16::from_be_bytes([c[0], c[1]])));
        // Fold early: a u32 cannot overflow within 65,535 words.
        if sum >= 0x8000_0000 {
            sum = (sum & 0xffff) + (sum >> 16);
        }
    }
    if let [b] = chunks.remainder() {
        sum = sum.wrapping_add(u32::from(*b) << 8);
    }
    sum
}

/// Folds a sum to 16 bits (not complemented).
pub fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// An IPv4 TCP or UDP packet inside an Ethernet frame.
struct L4 {
    /// Offset of the TCP/UDP header in the frame.
    start: usize,
    /// Offset of the IP packet's end (Ethernet padding excluded).
    end: usize,
    proto: u8,
    /// The pseudo-header sum (addresses, protocol, length), not folded.
    pseudo: u32,
}

const ETHERTYPE_IPV4: u16 = 0x0800;
const PROTO_TCP: u8 = 6;
const PROTO_UDP: u8 = 17;

fn l4_ipv4(frame: &[u8]) -> Option<L4> {
    let ethertype = u16::from_be_bytes([*frame.get(12)?, *frame.get(13)?]);
    if ethertype != ETHERTYPE_IPV4 {
        return None;
    }
    let ip = frame.get(ETH_HLEN..)?;
    let vihl = *ip.first()?;
    let ihl = usize::from(vihl & 0xf) * 4;
    if vihl >> 4 != 4 || ihl < 20 || ip.len() < ihl {
        return None;
    }
    // Fragments have no whole L4 header or sum.
    let frag = u16::from_be_bytes([ip[6], ip[7]]);
    if frag & 0x3fff != 0 {
        return None;
    }
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    if total < ihl || total > ip.len() {
        return None;
    }
    let proto = ip[9];
    let l4_len = total - ihl;
    let min = match proto {
        PROTO_TCP => 20,
        PROTO_UDP => 8,
        _ => return None,
    };
    if l4_len < min {
        return None;
    }
    let pseudo = sum(&ip[12..20], u32::from(proto) + l4_len as u32);
    Some(L4 {
        start: ETH_HLEN + ihl,
        end: ETH_HLEN + total,
        proto,
        pseudo,
    })
}

/// TCP's checksum field, from the start of its header.
pub const TCP_CSUM_OFFSET: u16 = 16;

/// Prepares a frame smoltcp built for the device and returns its header.
/// With `csum` (VIRTIO_NET_F_CSUM negotiated, smoltcp not computing TCP
/// checksums) an IPv4 TCP segment goes as Linux's CHECKSUM_PARTIAL: the
/// pseudo-header sum (folded, not complemented) in the checksum field,
/// NEEDS_CSUM, `csum_start` at the TCP header, `csum_offset` 16; the device
/// sums from `csum_start` to the end and stores the complement. With
/// `gso_size` (TSO negotiated) a segment whose payload is larger goes as
/// GSO_TCPV4 with that segment size. Anything else: a plain header.
pub fn prepare_tx(frame: &mut [u8], csum: bool, gso_size: Option<u16>) -> Hdr {
    let mut h = Hdr::default();
    if !csum {
        return h;
    }
    let Some(l4) = l4_ipv4(frame) else {
        return h;
    };
    if l4.proto != PROTO_TCP {
        return h;
    }
    let Ok(start) = u16::try_from(l4.start) else {
        return h;
    };
    let at = l4.start + usize::from(TCP_CSUM_OFFSET);
    frame[at..at + 2].copy_from_slice(&fold(l4.pseudo).to_be_bytes());
    h.flags = Hdr::NEEDS_CSUM;
    h.csum_start = start;
    h.csum_offset = TCP_CSUM_OFFSET;
    if let Some(mss) = gso_size.filter(|&m| m > 0) {
        let data_off = usize::from(frame[l4.start + 12] >> 4) * 4;
        let hdrs = l4.start + data_off;
        if data_off >= 20 && hdrs <= l4.end && l4.end - hdrs > usize::from(mss) {
            h.gso_type = Hdr::GSO_TCPV4;
            h.gso_size = mss;
            h.hdr_len = hdrs as u16;
        }
    }
    h
}

/// Completes a partial checksum as the device would (for tests and for a
/// driver that must do it itself): the one's complement of the sum from
/// `csum_start` to the end of the IP packet, at `csum_start + csum_offset`.
/// False when the header's offsets do not fit the frame.
pub fn complete_csum(frame: &mut [u8], h: &Hdr) -> bool {
    let start = usize::from(h.csum_start);
    let at = start + usize::from(h.csum_offset);
    let end = l4_ipv4(frame).map_or(frame.len(), |l| l.end);
    if at + 2 > end || end > frame.len() {
        return false;
    }
    let c = !fold(sum(&frame[start..end], 0));
    frame[at..at + 2].copy_from_slice(&c.to_be_bytes());
    true
}

/// Whether a received frame may go to the stack without checking its
/// TCP/UDP checksum here. Without GUEST_CSUM the device hands over complete
/// checksums of frames its host side made or checked (the stack skips
/// verifying them). With GUEST_CSUM: DATA_VALID (the host checked it) or
/// NEEDS_CSUM (made on the host, its checksum not yet filled in) frames pass
/// as they are; any other IPv4 TCP/UDP frame has its checksum checked here
/// (false: drop it). A UDP checksum of 0 is "none".
pub fn verify_rx(frame: &[u8], flags: u8, guest_csum: bool) -> bool {
    if !guest_csum || flags & (Hdr::NEEDS_CSUM | Hdr::DATA_VALID) != 0 {
        return true;
    }
    let Some(l4) = l4_ipv4(frame) else {
        return true;
    };
    if l4.proto == PROTO_UDP && frame[l4.start + 6..l4.start + 8] == [0, 0] {
        return true;
    }
    fold(sum(&frame[l4.start..l4.end], l4.pseudo)) == 0xffff
}

#[cfg(test)]
mod tests;
