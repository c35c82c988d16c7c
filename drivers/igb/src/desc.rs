//! Descriptor formats (82576 datasheet 7.1.5 and 7.2.2), 16 bytes each,
//! little-endian.
//!
//! Advanced receive descriptor, read format (driver to device):
//!
//! ```text
//! bytes 0..8   packet buffer address
//! bytes 8..16  header buffer address (0: no header split; its low bit
//!              sits where the write-back's DD bit lands, so 0 also
//!              clears DD)
//! ```
//!
//! Advanced receive descriptor, write-back format (device to driver):
//!
//! ```text
//! bytes 0..2   packet info: RSS type (bits 3:0), packet type (bits 15:4)
//! bytes 2..4   header info (header split only)
//! bytes 4..8   RSS hash (RXCSUM.PCSD set), else IP id and checksum
//! bytes 8..12  extended status (bits 19:0) and errors (bits 31:20)
//! bytes 12..14 packet length
//! bytes 14..16 VLAN tag
//! ```
//!
//! Advanced transmit context descriptor (driver to device):
//!
//! ```text
//! bytes 0..4   IPLEN (bits 8:0), MACLEN (15:9), VLAN (31:16)
//! bytes 4..8   reserved (0)
//! bytes 8..12  TUCMD (bits 19:9: IPV4 bit 10, L4T bits 12:11, 00 UDP,
//!              01 TCP), DTYP 0010b (bits 23:20), DEXT (bit 29)
//! bytes 12..16 IDX (bits 6:4), L4LEN (15:8), MSS (31:16)
//! ```
//!
//! Advanced transmit data descriptor, read format:
//!
//! ```text
//! bytes 0..8   buffer address
//! bytes 8..12  DTALEN (bits 15:0), DTYP 0011b (23:20), DCMD (31:24: EOP
//!              24, IFCS 25, RS 27, DEXT 29, VLE 30, TSE 31)
//! bytes 12..16 STA (bits 3:0; DD is bit 0 in the write-back), IDX (6:4),
//!              POPTS (13:8: IXSM 8, TXSM 9), PAYLEN (31:14)
//! ```

/// Bytes of one descriptor, receive or transmit.
pub const DESC_LEN: usize = 16;

/// Receive write-back status and error bits.
pub mod rx {
    /// Descriptor done.
    pub const DD: u32 = 1 << 0;
    /// End of packet.
    pub const EOP: u32 = 1 << 1;
    /// UDP checksum computed (with L4I).
    pub const UDPCS: u32 = 1 << 4;
    /// L4 (TCP/UDP) checksum checked.
    pub const L4I: u32 = 1 << 5;
    /// IPv4 header checksum checked.
    pub const IPCS: u32 = 1 << 6;
    /// L4 checksum error.
    pub const L4E: u32 = 1 << 29;
    /// IPv4 checksum error.
    pub const IPE: u32 = 1 << 30;
    /// Receive data error (CRC, symbol, ...).
    pub const RXE: u32 = 1 << 31;
    /// RSS type field of packet info (0: no hash).
    pub const RSS_TYPE_MASK: u16 = 0xf;
    /// RSS types.
    pub const RSS_TCP_IPV4: u16 = 1;
    pub const RSS_IPV4: u16 = 2;
}

/// Transmit descriptor bits.
pub mod tx {
    /// Descriptor types (bits 23:20 of the second dword).
    pub const DTYP_CTXT: u32 = 0x2 << 20;
    pub const DTYP_DATA: u32 = 0x3 << 20;
    pub const DTYP_MASK: u32 = 0xf << 20;
    /// DCMD bits.
    pub const EOP: u32 = 1 << 24;
    pub const IFCS: u32 = 1 << 25;
    pub const RS: u32 = 1 << 27;
    pub const DEXT: u32 = 1 << 29;
    pub const TSE: u32 = 1 << 31;
    /// DTALEN bits.
    pub const LEN_MASK: u32 = 0xffff;
    /// Write-back: descriptor done.
    pub const DD: u32 = 1 << 0;
    /// POPTS (olinfo).
    pub const IXSM: u32 = 1 << 8;
    pub const TXSM: u32 = 1 << 9;
    pub const IDX_SHIFT: u32 = 4;
    pub const PAYLEN_SHIFT: u32 = 14;
    /// Context TUCMD.
    pub const TUCMD_IPV4: u32 = 1 << 10;
    pub const TUCMD_L4T_UDP: u32 = 0;
    pub const TUCMD_L4T_TCP: u32 = 1 << 11;
    pub const TUCMD_L4T_MASK: u32 = 3 << 11;
    pub const MACLEN_SHIFT: u32 = 9;
    pub const IPLEN_MASK: u32 = 0x1ff;
    pub const L4LEN_SHIFT: u32 = 8;
    pub const MSS_SHIFT: u32 = 16;
}

/// An advanced receive descriptor in read format.
pub fn rx_read(pkt_addr: u64) -> [u8; DESC_LEN] {
    let mut d = [0u8; DESC_LEN];
    d[..8].copy_from_slice(&pkt_addr.to_le_bytes());
    d
}

/// What the driver takes from a receive write-back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RxWb {
    pub pkt_info: u16,
    pub rss_hash: u32,
    pub status_error: u32,
    pub length: u16,
}

impl RxWb {
    pub fn decode(d: &[u8; DESC_LEN]) -> RxWb {
        let u16_at = |i: usize| u16::from_le_bytes([d[i], d[i + 1]]);
        let u32_at = |i: usize| u32::from_le_bytes([d[i], d[i + 1], d[i + 2], d[i + 3]]);
        RxWb {
            pkt_info: u16_at(0),
            rss_hash: u32_at(4),
            status_error: u32_at(8),
            length: u16_at(12),
        }
    }

    /// The write-back as the device lays it out (the model writes it).
    pub fn encode(&self) -> [u8; DESC_LEN] {
        let mut d = [0u8; DESC_LEN];
        d[0..2].copy_from_slice(&self.pkt_info.to_le_bytes());
        d[4..8].copy_from_slice(&self.rss_hash.to_le_bytes());
        d[8..12].copy_from_slice(&self.status_error.to_le_bytes());
        d[12..14].copy_from_slice(&self.length.to_le_bytes());
        d
    }
}

/// An advanced transmit context descriptor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TxContext {
    pub maclen: u32,
    pub iplen: u32,
    /// TUCMD_IPV4 | TUCMD_L4T_*.
    pub tucmd: u32,
    pub l4len: u32,
    pub mss: u32,
    /// Context slot (0 or 1).
    pub idx: u32,
}

impl TxContext {
    pub fn encode(&self) -> [u8; DESC_LEN] {
        let w0 = (self.iplen & tx::IPLEN_MASK) | self.maclen << tx::MACLEN_SHIFT;
        let w2 = self.tucmd | tx::DTYP_CTXT | tx::DEXT;
        let w3 = (self.idx & 7) << tx::IDX_SHIFT
            | (self.l4len & 0xff) << tx::L4LEN_SHIFT
            | (self.mss & 0xffff) << tx::MSS_SHIFT;
        words([w0, 0, w2, w3])
    }

    pub fn decode(d: &[u8; DESC_LEN]) -> TxContext {
        let [w0, _, w2, w3] = dwords(d);
        TxContext {
            iplen: w0 & tx::IPLEN_MASK,
            maclen: (w0 >> tx::MACLEN_SHIFT) & 0x7f,
            tucmd: w2 & 0x000f_fe00,
            l4len: (w3 >> tx::L4LEN_SHIFT) & 0xff,
            mss: w3 >> tx::MSS_SHIFT,
            idx: (w3 >> tx::IDX_SHIFT) & 7,
        }
    }
}

/// An advanced transmit data descriptor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TxData {
    pub addr: u64,
    pub len: u32,
    /// DCMD bits (EOP, IFCS, RS, TSE; DEXT and DTYP are added).
    pub dcmd: u32,
    /// POPTS bits (IXSM, TXSM).
    pub popts: u32,
    pub idx: u32,
    pub paylen: u32,
}

impl TxData {
    pub fn encode(&self) -> [u8; DESC_LEN] {
        let w2 = (self.len & tx::LEN_MASK) | tx::DTYP_DATA | tx::DEXT | self.dcmd;
        let w3 = (self.idx & 7) << tx::IDX_SHIFT | self.popts | self.paylen << tx::PAYLEN_SHIFT;
        let mut d = words([0, 0, w2, w3]);
        d[..8].copy_from_slice(&self.addr.to_le_bytes());
        d
    }

    pub fn decode(d: &[u8; DESC_LEN]) -> TxData {
        let [lo, hi, w2, w3] = dwords(d);
        TxData {
            addr: u64::from(lo) | u64::from(hi) << 32,
            len: w2 & tx::LEN_MASK,
            dcmd: w2 & (tx::EOP | tx::IFCS | tx::RS | tx::TSE),
            popts: w3 & (tx::IXSM | tx::TXSM),
            idx: (w3 >> tx::IDX_SHIFT) & 7,
            paylen: w3 >> tx::PAYLEN_SHIFT,
        }
    }
}

/// The type of a transmit descriptor: context, data, or neither (legacy or
/// garbage).
pub fn tx_kind(d: &[u8; DESC_LEN]) -> Option<u32> {
    let w2 = dwords(d)[2];
    (w2 & tx::DEXT != 0).then_some(w2 & tx::DTYP_MASK)
}

fn words(w: [u32; 4]) -> [u8; DESC_LEN] {
    let mut d = [0u8; DESC_LEN];
    for (c, v) in d.chunks_exact_mut(4).zip(w) {
        c.copy_from_slice(&v.to_le_bytes());
    }
    d
}

fn dwords(d: &[u8; DESC_LEN]) -> [u32; 4] {
    let w = |i: usize| u32::from_le_bytes([d[i], d[i + 1], d[i + 2], d[i + 3]]);
    [w(0), w(4), w(8), w(12)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_receive_read_descriptor_is_the_buffer_address_and_zeros() {
        assert_eq!(
            rx_read(0x0000_8000_1234_5000),
            [0x00, 0x50, 0x34, 0x12, 0x00, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
        );
    }

    #[test]
    fn a_receive_write_back_decodes_from_its_bytes() {
        // RSS type TCP/IPv4, packet type IPv4+TCP (0x011 << 4), hash
        // 0x51ccc178, DD|EOP|L4I|IPCS, length 1514.
        let bytes = [
            0x11, 0x11, 0x00, 0x00, 0x78, 0xc1, 0xcc, 0x51, 0x63, 0x00, 0x00, 0x00, 0xea, 0x05,
            0x00, 0x00,
        ];
        let wb = RxWb::decode(&bytes);
        assert_eq!(
            wb,
            RxWb {
                pkt_info: 0x1111,
                rss_hash: 0x51cc_c178,
                status_error: rx::DD | rx::EOP | rx::L4I | rx::IPCS,
                length: 1514,
            }
        );
        assert_eq!(wb.pkt_info & rx::RSS_TYPE_MASK, rx::RSS_TCP_IPV4);
        assert_eq!(wb.encode(), bytes);
    }

    #[test]
    fn a_tso_context_descriptor_has_its_golden_bytes() {
        let c = TxContext {
            maclen: 14,
            iplen: 20,
            tucmd: tx::TUCMD_IPV4 | tx::TUCMD_L4T_TCP,
            l4len: 20,
            mss: 1448,
            idx: 0,
        };
        // w0 = 20 | 14 << 9 = 0x1c14; w2 = 0x0c00 | 0x0020_0000 | 0x2000_0000;
        // w3 = 20 << 8 | 1448 << 16 = 0x05a8_1400.
        assert_eq!(
            c.encode(),
            [0x14, 0x1c, 0x00, 0x00, 0, 0, 0, 0, 0x00, 0x0c, 0x20, 0x20, 0x00, 0x14, 0xa8, 0x05]
        );
        assert_eq!(TxContext::decode(&c.encode()), c);
        assert_eq!(tx_kind(&c.encode()), Some(tx::DTYP_CTXT));
    }

    #[test]
    fn a_tso_data_descriptor_has_its_golden_bytes() {
        let d = TxData {
            addr: 0x1122_3344_5566_7788,
            len: 3014,
            dcmd: tx::EOP | tx::IFCS | tx::RS | tx::TSE,
            popts: tx::IXSM | tx::TXSM,
            idx: 0,
            paylen: 2960,
        };
        // w2 = 3014 (0x0bc6) | 0x0030_0000 | DEXT | EOP | IFCS | RS | TSE
        //    = 0xab30_0bc6; w3 = 0x300 | 2960 << 14 = 0x02e4_0300.
        assert_eq!(
            d.encode(),
            [
                0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11, 0xc6, 0x0b, 0x30, 0xab, 0x00, 0x03,
                0xe4, 0x02
            ]
        );
        assert_eq!(TxData::decode(&d.encode()), d);
        assert_eq!(tx_kind(&d.encode()), Some(tx::DTYP_DATA));
        assert_eq!(tx_kind(&[0; 16]), None);
    }
}
