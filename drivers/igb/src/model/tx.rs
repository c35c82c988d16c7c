//! Transmission: descriptors from TDH to TDT, offloads as the datasheet
//! describes them (7.2.4 TSO, 7.2.5 checksums), write-backs.

use super::hal::DmaPort;
use super::State;
use crate::desc::{self, tx, TxContext, TxData, DESC_LEN};
use crate::regs;
use dioxide_nic::csum::{fold, sum};

/// TCP flags the device clears: FIN and PSH on every segment but the
/// last, CWR on every segment but the first (the datasheet's default
/// DTXTCPFLGL/H masks).
const FIN: u8 = 0x01;
const PSH: u8 = 0x08;
const CWR: u8 = 0x80;

/// Sends what queue `q`'s ring holds.
pub(super) fn run(st: &mut State, dma: &DmaPort, q: usize) {
    let on =
        st.r(regs::TCTL) & regs::tctl::EN != 0 && st.r(regs::txdctl(q)) & regs::dctl::ENABLE != 0;
    let n = st.r(regs::tdlen(q)) / DESC_LEN as u32;
    if !on || n == 0 {
        return;
    }
    let base = u64::from(st.r(regs::tdbah(q))) << 32 | u64::from(st.r(regs::tdbal(q)));
    let mut wrote = false;
    while st.r(regs::tdh(q)) != st.r(regs::tdt(q)) && st.r(regs::tdt(q)) < n {
        let h = st.r(regs::tdh(q));
        let addr = base + u64::from(h) * DESC_LEN as u64;
        let Some(d) = dma
            .read(addr, DESC_LEN)
            .and_then(|v| <[u8; 16]>::try_from(v).ok())
        else {
            st.errors
                .push(format!("tx queue {q}: descriptor {h} outside DMA memory"));
            return;
        };
        wrote |= process(st, dma, q, &d);
        if TxData::decode(&d).dcmd & tx::RS != 0 && desc::tx_kind(&d) == Some(tx::DTYP_DATA) {
            let mut wb = [0u8; 8];
            wb[4..].copy_from_slice(&tx::DD.to_le_bytes());
            dma.write(addr + 8, &wb);
        }
        st.set(regs::tdh(q), (h + 1) % n);
    }
    if wrote {
        st.raise_queue(q, true);
    }
}

/// One descriptor; true when a frame went out.
fn process(st: &mut State, dma: &DmaPort, q: usize, d: &[u8; 16]) -> bool {
    match desc::tx_kind(d) {
        Some(tx::DTYP_CTXT) => {
            let idx = (TxContext::decode(d).idx & 1) as usize;
            st.tx[q].ctx[idx] = *d;
            false
        }
        Some(tx::DTYP_DATA) => data(st, dma, q, d),
        _ => {
            st.errors
                .push(format!("tx queue {q}: descriptor of unknown type"));
            false
        }
    }
}

fn data(st: &mut State, dma: &DmaPort, q: usize, d: &[u8; 16]) -> bool {
    let dd = TxData::decode(d);
    let Some(bytes) = dma.read(dd.addr, dd.len as usize) else {
        st.errors.push(format!(
            "tx queue {q}: buffer {:#x} outside DMA memory",
            dd.addr
        ));
        return false;
    };
    let t = &mut st.tx[q];
    t.first.get_or_insert(*d);
    t.frags.extend_from_slice(&bytes);
    if dd.dcmd & tx::EOP == 0 {
        return false;
    }
    let frame = std::mem::take(&mut t.frags);
    let Some(first) = t.first.take().map(|f| TxData::decode(&f)) else {
        return false;
    };
    let ctx = TxContext::decode(&t.ctx[(first.idx & 1) as usize]);
    let frames = if first.dcmd & tx::TSE != 0 {
        st.add(regs::stats::TSCTC, 1);
        segment(st, &frame, &first, &ctx)
    } else {
        vec![checksums(st, frame, &first, &ctx)]
    };
    for f in frames {
        st.add(regs::stats::GPTC, 1);
        st.add(regs::stats::TPT, 1);
        st.add64(regs::stats::GOTCL, regs::stats::GOTCH, f.len() as u64 + 4);
        st.wire.push_back(f);
    }
    true
}

/// Non-TSO offloads: TXSM sums the L4 bytes as given (the driver left the
/// pseudo-header sum in the field); IXSM fills the IPv4 header checksum.
fn checksums(st: &mut State, mut f: Vec<u8>, d: &TxData, ctx: &TxContext) -> Vec<u8> {
    if d.paylen as usize != f.len() {
        st.errors
            .push(format!("PAYLEN {} for a frame of {}", d.paylen, f.len()));
    }
    let ip = ctx.maclen as usize;
    let l4 = ip + ctx.iplen as usize;
    if d.popts & tx::IXSM != 0 {
        fill_ip(&mut f, ip, ctx.iplen as usize);
    }
    if d.popts & tx::TXSM != 0 && l4 < f.len() {
        let field = l4 + csum_field(ctx);
        let s = sum(&f[l4..], 0);
        put_l4(&mut f, field, s, ctx);
    }
    f
}

fn csum_field(ctx: &TxContext) -> usize {
    if ctx.tucmd & tx::TUCMD_L4T_MASK == tx::TUCMD_L4T_TCP {
        16
    } else {
        6
    }
}

fn put_l4(f: &mut [u8], field: usize, s: u32, ctx: &TxContext) {
    let mut c = !fold(s);
    if c == 0 && csum_field(ctx) == 6 {
        c = 0xffff;
    }
    if let Some(b) = f.get_mut(field..field + 2) {
        b.copy_from_slice(&c.to_be_bytes());
    }
}

fn fill_ip(f: &mut [u8], ip: usize, iplen: usize) {
    let Some(h) = f.get_mut(ip..ip + iplen) else {
        return;
    };
    h[10..12].copy_from_slice(&[0, 0]);
    let c = !fold(sum(h, 0));
    h[10..12].copy_from_slice(&c.to_be_bytes());
}

/// TSO: the headers copied before every MSS bytes of payload; per
/// segment, the IPv4 total length, identification (+1) and checksum, the
/// TCP sequence number and flags, and the TCP checksum from the field's
/// pseudo-header sum plus the segment's TCP length.
fn segment(st: &mut State, f: &[u8], d: &TxData, ctx: &TxContext) -> Vec<Vec<u8>> {
    let (ip, iplen, l4len) = (ctx.maclen as usize, ctx.iplen as usize, ctx.l4len as usize);
    let hdr = ip + iplen + l4len;
    let mss = ctx.mss as usize;
    if hdr > f.len() || mss == 0 || d.paylen as usize != f.len() - hdr {
        st.errors.push(format!(
            "TSO: headers {hdr}, MSS {mss}, PAYLEN {} for {} bytes",
            d.paylen,
            f.len()
        ));
        return Vec::new();
    }
    let l4 = ip + iplen;
    let id = u16::from_be_bytes([f[ip + 4], f[ip + 5]]);
    let seq = u32::from_be_bytes([f[l4 + 4], f[l4 + 5], f[l4 + 6], f[l4 + 7]]);
    let chunks: Vec<&[u8]> = f[hdr..].chunks(mss).collect();
    let last = chunks.len().saturating_sub(1);
    let mut out = Vec::new();
    for (k, chunk) in chunks.iter().enumerate() {
        let mut s = f[..hdr].to_vec();
        s.extend_from_slice(chunk);
        let total = (iplen + l4len + chunk.len()) as u16;
        s[ip + 2..ip + 4].copy_from_slice(&total.to_be_bytes());
        s[ip + 4..ip + 6].copy_from_slice(&id.wrapping_add(k as u16).to_be_bytes());
        fill_ip(&mut s, ip, iplen);
        let sq = seq.wrapping_add((k * mss) as u32);
        s[l4 + 4..l4 + 8].copy_from_slice(&sq.to_be_bytes());
        let mut flags = s[l4 + 13];
        if k != last {
            flags &= !(FIN | PSH);
        }
        if k != 0 {
            flags &= !CWR;
        }
        s[l4 + 13] = flags;
        let seg_len = (l4len + chunk.len()) as u32;
        let partial = sum(&s[l4..], 0) + seg_len;
        put_l4(&mut s, l4 + 16, partial, ctx);
        out.push(s);
    }
    out
}
