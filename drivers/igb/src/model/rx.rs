//! Reception: address filter, queue choice (RSS), buffers, write-backs.

use super::hal::DmaPort;
use super::{Fault, State};
use crate::desc::{rx, RxWb, DESC_LEN};
use crate::regs::{self, mrqc, rctl, rxcsum, srrctl};
use crate::rss;
use dioxide_nic::csum::{self, PROTO_TCP, PROTO_UDP};

/// Receives one frame (without FCS) into the rings.
pub(super) fn receive(st: &mut State, dma: &DmaPort, frame: &[u8]) {
    if st.r(regs::STATUS) & regs::status::LU == 0 || st.r(regs::RCTL) & rctl::EN == 0 {
        return;
    }
    if !accepted(st, frame) {
        return;
    }
    let (q, rss_type, hash) = choose_queue(st, frame);
    st.add(regs::stats::TPR, 1);
    if st.r(regs::rxdctl(q)) & regs::dctl::ENABLE == 0 || st.r(regs::rdlen(q)) == 0 {
        st.add(regs::stats::MPC, 1);
        return;
    }
    let fault = st.faults.pop_front();
    let wb = RxWb {
        pkt_info: rss_type,
        rss_hash: hash,
        status_error: rx::DD | rx::EOP | csum_status(st, frame),
        length: frame.len() as u16,
    };
    if write_frame(st, dma, q, frame, wb, fault) {
        st.delivered.push(q);
        st.add(regs::stats::GPRC, 1);
        st.add64(
            regs::stats::GORCL,
            regs::stats::GORCH,
            frame.len() as u64 + 4,
        );
        st.raise_queue(q, false);
    }
}

/// Unicast to RAL0/RAH0 (AV), or broadcast with RCTL.BAM.
fn accepted(st: &State, frame: &[u8]) -> bool {
    let Some(dst) = frame.get(..6) else {
        return false;
    };
    if dst == [0xff; 6] {
        return st.r(regs::RCTL) & rctl::BAM != 0;
    }
    let (lo, hi) = (st.r(regs::RAL0), st.r(regs::RAH0));
    let [a, b, c, d] = lo.to_le_bytes();
    let [e, f, _, _] = hi.to_le_bytes();
    hi & regs::rah::AV != 0 && dst == [a, b, c, d, e, f]
}

/// Queue, RSS type and hash: RSS when MRQC enables it and RXCSUM.PCSD is
/// set (as QEMU's `igb_rss_enabled`), else queue 0.
fn choose_queue(st: &State, frame: &[u8]) -> (usize, u16, u32) {
    let m = st.r(regs::MRQC);
    let on = m & mrqc::ENABLE_MASK == mrqc::ENABLE_RSS && st.r(regs::RXCSUM) & rxcsum::PCSD != 0;
    let Some((ty, input)) = on.then(|| rss_input(m, frame)).flatten() else {
        return (0, 0, 0);
    };
    let key: Vec<u8> = (0..10)
        .flat_map(|n| st.r(regs::RSSRK + 4 * n).to_le_bytes())
        .collect();
    let hash = rss::toeplitz(&key, &input);
    let mut table = [0u8; rss::RETA_LEN];
    for (n, c) in table.chunks_mut(4).enumerate() {
        c.copy_from_slice(&st.r(regs::RETA + 4 * n).to_le_bytes());
    }
    (rss::queue_of(&table, hash), ty, hash)
}

/// The RSS type and hash input of an IPv4 frame the enabled fields cover.
fn rss_input(m: u32, frame: &[u8]) -> Option<(u16, Vec<u8>)> {
    let (src, dst) = csum::addrs(frame)?;
    if frame.get(12..14)? != [0x08, 0x00] {
        return None;
    }
    let l4 = csum::parse_ipv4_l4(frame).filter(|p| !p.fragment);
    if let Some(p) = l4.filter(|p| p.proto == PROTO_TCP && m & mrqc::FIELD_IPV4_TCP != 0) {
        let o = p.l4_off();
        let sport = u16::from_be_bytes([frame[o], frame[o + 1]]);
        let dport = u16::from_be_bytes([frame[o + 2], frame[o + 3]]);
        let input = rss::ipv4_tcp_input(src, dst, sport, dport);
        return Some((rx::RSS_TCP_IPV4, input.to_vec()));
    }
    (m & mrqc::FIELD_IPV4 != 0).then(|| (rx::RSS_IPV4, rss::ipv4_input(src, dst).to_vec()))
}

/// The checksum bits RXCSUM asks for (QEMU's `igb_verify_csum_in_sw`).
fn csum_status(st: &State, frame: &[u8]) -> u32 {
    let c = st.r(regs::RXCSUM);
    let mut s = 0;
    let ipv4 = frame.get(12..14) == Some(&[0x08, 0x00]);
    let ihl = frame.get(14).map_or(0, |b| usize::from(b & 0xf) * 4);
    if c & rxcsum::IPOFLD != 0 && ipv4 && ihl >= 20 {
        s |= rx::IPCS;
        if !csum::ipv4_header_ok(frame, ihl) {
            s |= rx::IPE;
        }
    }
    let l4 = csum::parse_ipv4_l4(frame).filter(|p| !p.fragment);
    if let Some(p) = l4.filter(|_| c & rxcsum::TUOFLD != 0) {
        s |= rx::L4I;
        if p.proto == PROTO_UDP {
            s |= rx::UDPCS;
        }
        if !csum::l4_ok(frame, &p) {
            s |= rx::L4E;
        }
    }
    s
}

/// The ring of queue `q` as registers describe it.
struct Ring {
    q: usize,
    base: u64,
    n: u32,
    buf: usize,
}

impl Ring {
    fn of(st: &State, q: usize) -> Ring {
        let base = u64::from(st.r(regs::rdbah(q))) << 32 | u64::from(st.r(regs::rdbal(q)));
        let kib = (st.r(regs::srrctl(q)) & srrctl::BSIZEPKT_MASK) as usize;
        Ring {
            q,
            base,
            n: st.r(regs::rdlen(q)) / DESC_LEN as u32,
            buf: if kib == 0 { 2048 } else { kib * 1024 },
        }
    }

    /// Descriptors the device owns (RDH up to RDT).
    fn owned(&self, st: &State) -> u32 {
        let (h, t) = (st.r(regs::rdh(self.q)), st.r(regs::rdt(self.q)));
        if self.n == 0 || t >= self.n {
            return 0;
        }
        (t + self.n - h) % self.n
    }

    fn desc_addr(&self, i: u32) -> u64 {
        self.base + u64::from(i % self.n.max(1)) * DESC_LEN as u64
    }
}

/// The descriptors one frame takes, with `fault` applied: (bytes of the
/// frame, write-back) per descriptor.
fn plan(frame: &[u8], wb: RxWb, buf: usize, fault: Option<Fault>) -> Vec<(Vec<u8>, RxWb)> {
    let with = |len: usize, status_error: u32| RxWb {
        length: len as u16,
        status_error,
        ..wb
    };
    let last = wb.status_error;
    let middle = rx::DD;
    let chunks: Vec<&[u8]> = frame.chunks(buf.max(1)).collect();
    match fault {
        Some(Fault::ZeroLength) => vec![(frame[..0].to_vec(), with(0, last))],
        Some(Fault::TooLong) => vec![(frame.to_vec(), with(buf + 1, last))],
        Some(Fault::RxError) => vec![(frame.to_vec(), with(frame.len(), last | rx::RXE))],
        Some(Fault::SplitFrame) => {
            let half = frame.len() / 2;
            vec![
                (frame[..half].to_vec(), with(half, middle)),
                (frame[half..].to_vec(), with(frame.len() - half, last)),
            ]
        }
        Some(Fault::NoEop) => vec![(frame.to_vec(), with(frame.len(), middle))],
        _ if chunks.len() > 1 => {
            let n = chunks.len();
            let status = |i: usize| if i + 1 == n { last } else { middle };
            chunks
                .iter()
                .enumerate()
                .map(|(i, c)| (c.to_vec(), with(c.len(), status(i))))
                .collect()
        }
        _ => vec![(frame.to_vec(), wb)],
    }
}

/// Writes the frame into as many descriptors as it takes; false (MPC,
/// RNBC) when the ring has too few.
fn write_frame(
    st: &mut State,
    dma: &DmaPort,
    q: usize,
    frame: &[u8],
    wb: RxWb,
    fault: Option<Fault>,
) -> bool {
    let ring = Ring::of(st, q);
    let parts = plan(frame, wb, ring.buf, fault);
    if ring.owned(st) < parts.len() as u32 {
        st.add(regs::stats::MPC, 1);
        st.add(regs::stats::RNBC, 1);
        return false;
    }
    for (bytes, wb) in parts {
        let head = st.r(regs::rdh(q));
        let addr = ring.desc_addr(head);
        let Some(read) = dma.read(addr, DESC_LEN) else {
            st.errors.push(format!(
                "rx queue {q}: descriptor {head} outside DMA memory"
            ));
            return false;
        };
        let pkt = u64::from_le_bytes(read[..8].try_into().unwrap_or_default());
        if !bytes.is_empty() && !dma.write(pkt, &bytes) {
            st.errors
                .push(format!("rx queue {q}: buffer {pkt:#x} outside DMA memory"));
            return false;
        }
        write_back(st, dma, addr, &wb);
        st.set(regs::rdh(q), (head + 1) % ring.n);
    }
    if fault == Some(Fault::DdOnGap) {
        let gap = ring.desc_addr(st.r(regs::rdt(q)));
        write_back(st, dma, gap, &RxWb { length: 64, ..wb });
    }
    true
}

/// The write-back, DD's dword last (as QEMU writes it).
fn write_back(st: &mut State, dma: &DmaPort, addr: u64, wb: &RxWb) {
    let bytes = wb.encode();
    let mut first = bytes;
    first[8..12].copy_from_slice(&(wb.status_error & !rx::DD).to_le_bytes());
    if !dma.write(addr, &first) || !dma.write(addr + 8, &bytes[8..12]) {
        st.errors
            .push(format!("rx write-back at {addr:#x} outside DMA memory"));
    }
}
