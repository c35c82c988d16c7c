//! The Internet checksum (RFC 1071) over IPv4, TCP and UDP, for drivers
//! (the pseudo-header sum a checksum-offloading device starts from), device
//! models, and frames the device did not check.
//!
//! Offsets follow an untagged Ethernet frame: the IPv4 header at
//! [`ETH_HLEN`], its length from IHL.

use crate::ETH_HLEN;

pub const ETHERTYPE_IPV4: u16 = 0x0800;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// Adds `data` as big-endian 16-bit words (an odd last byte padded with
/// zero) to `sum`, without folding.
pub fn sum(data: &[u8], mut sum: u32) -> u32 {
    let mut words = data.chunks_exact(2);
    for w in &mut words {
        sum = sum.wrapping_add(u32::from(u16::from_be_bytes([w[0], w[1]])));
        // Fold early so that a 64 KiB frame never overflows.
        if sum > 0xffff_0000 {
            sum = (sum & 0xffff) + (sum >> 16);
        }
    }
    if let [last] = words.remainder() {
        sum = sum.wrapping_add(u32::from(*last) << 8);
    }
    sum
}

/// Folds a sum into 16 bits (ones' complement addition of the halves).
pub fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// The IPv4 pseudo-header sum (addresses, protocol, and `l4_len` when
/// given), unfolded.
pub fn pseudo(src: [u8; 4], dst: [u8; 4], proto: u8, l4_len: Option<u16>) -> u32 {
    let s = sum(&src, sum(&dst, u32::from(proto)));
    s + u32::from(l4_len.unwrap_or(0))
}

/// The parts of an IPv4 TCP/UDP frame an offload needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipv4L4 {
    /// IPv4 header bytes.
    pub ip_len: usize,
    /// IPv4 total length field.
    pub total_len: usize,
    pub proto: u8,
    /// TCP header bytes (data offset), or 8 for UDP.
    pub l4_hlen: usize,
    /// The frame is a fragment (MF set or an offset).
    pub fragment: bool,
}

impl Ipv4L4 {
    /// Offset of the L4 header in the frame.
    pub fn l4_off(&self) -> usize {
        ETH_HLEN + self.ip_len
    }
    /// Offset of the L4 checksum field.
    pub fn csum_off(&self) -> usize {
        self.l4_off() + if self.proto == PROTO_TCP { 16 } else { 6 }
    }
    /// Ethernet, IPv4 and TCP/UDP header bytes together.
    pub fn headers(&self) -> usize {
        self.l4_off() + self.l4_hlen
    }
}

/// Parses an untagged Ethernet frame carrying IPv4 TCP or UDP; `None` for
/// anything else or a frame too short for what its headers claim.
pub fn parse_ipv4_l4(frame: &[u8]) -> Option<Ipv4L4> {
    let ethertype = u16::from_be_bytes([*frame.get(12)?, *frame.get(13)?]);
    let vihl = *frame.get(ETH_HLEN)?;
    if ethertype != ETHERTYPE_IPV4 || vihl >> 4 != 4 {
        return None;
    }
    let ip_len = usize::from(vihl & 0xf) * 4;
    let ip = frame.get(ETH_HLEN..ETH_HLEN + ip_len.max(20))?;
    let total_len = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    let frag = u16::from_be_bytes([ip[6], ip[7]]);
    let proto = ip[9];
    let l4_off = ETH_HLEN + ip_len;
    let l4_hlen = match proto {
        PROTO_TCP => usize::from(*frame.get(l4_off + 12)? >> 4) * 4,
        PROTO_UDP => 8,
        _ => return None,
    };
    if ip_len < 20 || l4_hlen < 8 || frame.len() < l4_off + l4_hlen {
        return None;
    }
    Some(Ipv4L4 {
        ip_len,
        total_len,
        proto,
        l4_hlen,
        fragment: frag & 0x3fff != 0,
    })
}

/// The IPv4 header's checksum is right.
pub fn ipv4_header_ok(frame: &[u8], ip_len: usize) -> bool {
    frame
        .get(ETH_HLEN..ETH_HLEN + ip_len)
        .is_some_and(|h| fold(sum(h, 0)) == 0xffff)
}

/// Source and destination addresses of the IPv4 header (`frame` long
/// enough: parsed by [`parse_ipv4_l4`]).
pub fn addrs(frame: &[u8]) -> Option<([u8; 4], [u8; 4])> {
    let src = frame.get(ETH_HLEN + 12..ETH_HLEN + 16)?.try_into().ok()?;
    let dst = frame.get(ETH_HLEN + 16..ETH_HLEN + 20)?.try_into().ok()?;
    Some((src, dst))
}

/// The TCP/UDP checksum over the pseudo-header and `l4` (header and
/// payload, checksum field included) is right; a UDP checksum of 0 means
/// none was sent.
pub fn l4_ok(frame: &[u8], p: &Ipv4L4) -> bool {
    let Some((src, dst)) = addrs(frame) else {
        return false;
    };
    let end = ETH_HLEN + p.total_len;
    let Some(l4) = frame.get(p.l4_off()..end) else {
        return false;
    };
    if p.proto == PROTO_UDP && l4.get(6..8) == Some(&[0, 0]) {
        return true;
    }
    let Ok(len) = u16::try_from(l4.len()) else {
        return false;
    };
    fold(sum(l4, pseudo(src, dst, p.proto, Some(len)))) == 0xffff
}

/// Checks what a device did not: the IPv4 header checksum and, for an
/// unfragmented TCP or UDP packet, its checksum. Frames that are not IPv4
/// pass (nothing to check here); IPv4 frames of other protocols pass on
/// their header (their own checksums are the stack's).
pub fn verify(frame: &[u8]) -> bool {
    let is_ipv4 = frame.get(12..14) == Some(&[0x08, 0x00]);
    if !is_ipv4 {
        return true;
    }
    let Some(&vihl) = frame.get(ETH_HLEN) else {
        return false;
    };
    let ip_len = usize::from(vihl & 0xf) * 4;
    if !ipv4_header_ok(frame, ip_len) {
        return false;
    }
    match parse_ipv4_l4(frame) {
        Some(p) if !p.fragment => l4_ok(frame, &p),
        _ => true,
    }
}

/// Fills the IPv4 header checksum (the field zeroed first).
pub fn fill_ipv4_header(frame: &mut [u8], ip_len: usize) {
    let Some(h) = frame.get_mut(ETH_HLEN..ETH_HLEN + ip_len) else {
        return;
    };
    h[10..12].copy_from_slice(&[0, 0]);
    let c = !fold(sum(h, 0));
    h[10..12].copy_from_slice(&c.to_be_bytes());
}

/// Fills the TCP/UDP checksum of an IPv4 frame completely (the field zeroed
/// first), as a device that offloads it would.
pub fn fill_l4(frame: &mut [u8], p: &Ipv4L4) {
    let Some((src, dst)) = addrs(frame) else {
        return;
    };
    let (off, end) = (p.l4_off(), ETH_HLEN + p.total_len);
    let csum_off = p.csum_off();
    if end > frame.len() || csum_off + 2 > end {
        return;
    }
    frame[csum_off..csum_off + 2].copy_from_slice(&[0, 0]);
    let len = (end - off) as u16;
    let mut c = !fold(sum(&frame[off..end], pseudo(src, dst, p.proto, Some(len))));
    if c == 0 && p.proto == PROTO_UDP {
        c = 0xffff;
    }
    frame[csum_off..csum_off + 2].copy_from_slice(&c.to_be_bytes());
}
