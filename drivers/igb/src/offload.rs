//! What a frame to send needs from the device, and what the driver writes
//! into it first (82576 datasheet 7.2.5 and 7.2.4):
//!
//! - TCP/UDP checksum (POPTS.TXSM): the device sums the L4 header and
//!   payload, checksum field included, and stores the complement; so the
//!   driver leaves the pseudo-header sum (with the L4 length) in the
//!   field.
//! - TSO (DCMD.TSE, POPTS.IXSM|TXSM): the device copies the headers
//!   (MACLEN + IPLEN + L4LEN bytes) before every MSS bytes of payload,
//!   and per segment sets the IPv4 total length, identification (+1 per
//!   segment) and header checksum, the TCP sequence number and flags, and
//!   the TCP checksum from the pseudo-header sum in the field, to which it
//!   adds the segment's length: so the driver leaves the pseudo-header sum
//!   without the length there, and zeroes the IPv4 checksum. PAYLEN is the
//!   payload (without headers) then, the whole frame otherwise.
//!
//! QEMU's igb (hw/net/igb_core.c, net_tx_pkt.c) recomputes both checksums
//! from scratch whatever the field holds; the model in this crate does
//! what the datasheet says, so a driver that forgets the pseudo-header
//! fails there.

use crate::desc::{tx, TxContext};
use dioxide_nic::csum::{self, Ipv4L4, PROTO_TCP};
use dioxide_nic::{TxMeta, ETH_HLEN};

/// What to put in the descriptors of one frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Prepared {
    pub ctx: Option<TxContext>,
    /// TSE, or nothing.
    pub dcmd: u32,
    /// IXSM, TXSM.
    pub popts: u32,
    pub paylen: u32,
}

/// Why a frame cannot be sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// Larger than the MTU and not a TCP/IPv4 frame the device can cut.
    Oversized,
}

/// Prepares `frame` (the driver's transmit buffer, written by the caller)
/// for `meta`; `max_plain` is the largest frame sent without TSO.
pub fn prepare(frame: &mut [u8], meta: TxMeta, max_plain: usize) -> Result<Prepared, Refused> {
    let len = frame.len() as u32;
    let plain = Prepared {
        ctx: None,
        dcmd: 0,
        popts: 0,
        paylen: len,
    };
    let parsed = (meta.csum || meta.tso_mss.is_some())
        .then(|| csum::parse_ipv4_l4(frame))
        .flatten()
        .filter(|p| !p.fragment && ETH_HLEN + p.total_len == frame.len());
    let Some(p) = parsed else {
        return if frame.len() > max_plain {
            Err(Refused::Oversized)
        } else {
            Ok(plain)
        };
    };
    let payload = frame.len() - p.headers();
    match meta.tso_mss {
        Some(mss) if p.proto == PROTO_TCP && mss > 0 && payload > usize::from(mss) => {
            Ok(tso(frame, &p, mss))
        }
        _ if frame.len() > max_plain => Err(Refused::Oversized),
        _ => Ok(checksum(frame, &p)),
    }
}

fn context(p: &Ipv4L4, mss: u16) -> TxContext {
    let l4t = if p.proto == PROTO_TCP {
        tx::TUCMD_L4T_TCP
    } else {
        tx::TUCMD_L4T_UDP
    };
    TxContext {
        maclen: ETH_HLEN as u32,
        iplen: p.ip_len as u32,
        tucmd: tx::TUCMD_IPV4 | l4t,
        l4len: p.l4_hlen as u32,
        mss: u32::from(mss),
        idx: 0,
    }
}

fn put_pseudo(frame: &mut [u8], p: &Ipv4L4, l4_len: Option<u16>) {
    let Some((src, dst)) = csum::addrs(frame) else {
        return;
    };
    let sum = csum::fold(csum::pseudo(src, dst, p.proto, l4_len));
    let off = p.csum_off();
    frame[off..off + 2].copy_from_slice(&sum.to_be_bytes());
}

fn checksum(frame: &mut [u8], p: &Ipv4L4) -> Prepared {
    let l4_len = (p.total_len - p.ip_len) as u16;
    put_pseudo(frame, p, Some(l4_len));
    Prepared {
        ctx: Some(context(p, 0)),
        dcmd: 0,
        popts: tx::TXSM,
        paylen: frame.len() as u32,
    }
}

fn tso(frame: &mut [u8], p: &Ipv4L4, mss: u16) -> Prepared {
    put_pseudo(frame, p, None);
    frame[ETH_HLEN + 10..ETH_HLEN + 12].copy_from_slice(&[0, 0]);
    Prepared {
        ctx: Some(context(p, mss)),
        dcmd: tx::TSE,
        popts: tx::IXSM | tx::TXSM,
        paylen: (frame.len() - p.headers()) as u32,
    }
}
