//! Register offsets and bits of the 82576 (Intel 82576EB GbE Controller
//! Datasheet, chapter 8), as the driver and the model use them. Names are
//! the datasheet's; per-queue registers take the queue index (queues 0-15
//! at `base + 0x40 * n`; the datasheet's aliases for queues 0-3 at
//! 0x2800/0x3800 are not used).

/// Device Control.
pub const CTRL: usize = 0x0000;
/// Device Status (read only).
pub const STATUS: usize = 0x0008;
/// EEPROM/Flash Control.
pub const EECD: usize = 0x0010;
/// Extended Device Control.
pub const CTRL_EXT: usize = 0x0018;
/// MDI Control: PHY register access.
pub const MDIC: usize = 0x0020;
/// Receive Control.
pub const RCTL: usize = 0x0100;
/// Transmit Control.
pub const TCTL: usize = 0x0400;
/// Interrupt Cause Read (clears on read with GPIE.NSICR).
pub const ICR: usize = 0x1500;
/// Interrupt Mask Set/Read.
pub const IMS: usize = 0x1508;
/// Interrupt Mask Clear.
pub const IMC: usize = 0x150c;
/// General Purpose Interrupt Enable.
pub const GPIE: usize = 0x1514;
/// Extended Interrupt Cause Set.
pub const EICS: usize = 0x1520;
/// Extended Interrupt Mask Set/Read.
pub const EIMS: usize = 0x1524;
/// Extended Interrupt Mask Clear.
pub const EIMC: usize = 0x1528;
/// Extended Interrupt Auto Clear.
pub const EIAC: usize = 0x152c;
/// Extended Interrupt Auto Mask.
pub const EIAM: usize = 0x1530;
/// Extended Interrupt Cause Read.
pub const EICR: usize = 0x1580;
/// Interrupt Vector Allocation, 8 registers (4 entries of 8 bits each).
pub const IVAR0: usize = 0x1700;
/// Interrupt Vector Allocation for causes other than queues.
pub const IVAR_MISC: usize = 0x1740;
/// Receive Checksum Control.
pub const RXCSUM: usize = 0x5000;
/// Receive Long Packet Maximum Length.
pub const RLPML: usize = 0x5004;
/// Multicast Table Array, 128 registers.
pub const MTA: usize = 0x5200;
/// Receive Address Low/High, entry 0 (the station address).
pub const RAL0: usize = 0x5400;
pub const RAH0: usize = 0x5404;
/// Multiple Receive Queues Command.
pub const MRQC: usize = 0x5818;
/// Redirection Table, 32 registers of 4 one-byte entries.
pub const RETA: usize = 0x5c00;
/// RSS Random Key, 10 registers (40 bytes, byte 0 in bits 7:0 of RSSRK0).
pub const RSSRK: usize = 0x5c80;

/// Interrupt Throttle of MSI-X vector `v`.
pub const fn eitr(v: usize) -> usize {
    0x1680 + 4 * v
}
pub const fn ivar(n: usize) -> usize {
    IVAR0 + 4 * n
}
pub const fn rdbal(q: usize) -> usize {
    0xc000 + 0x40 * q
}
pub const fn rdbah(q: usize) -> usize {
    0xc004 + 0x40 * q
}
pub const fn rdlen(q: usize) -> usize {
    0xc008 + 0x40 * q
}
/// Split and Replication Receive Control.
pub const fn srrctl(q: usize) -> usize {
    0xc00c + 0x40 * q
}
pub const fn rdh(q: usize) -> usize {
    0xc010 + 0x40 * q
}
pub const fn rdt(q: usize) -> usize {
    0xc018 + 0x40 * q
}
pub const fn rxdctl(q: usize) -> usize {
    0xc028 + 0x40 * q
}
pub const fn tdbal(q: usize) -> usize {
    0xe000 + 0x40 * q
}
pub const fn tdbah(q: usize) -> usize {
    0xe004 + 0x40 * q
}
pub const fn tdlen(q: usize) -> usize {
    0xe008 + 0x40 * q
}
pub const fn tdh(q: usize) -> usize {
    0xe010 + 0x40 * q
}
pub const fn tdt(q: usize) -> usize {
    0xe018 + 0x40 * q
}
pub const fn txdctl(q: usize) -> usize {
    0xe028 + 0x40 * q
}

/// CTRL bits.
pub mod ctrl {
    /// Full duplex.
    pub const FD: u32 = 1 << 0;
    /// Set link up (MAC-PHY link enabled).
    pub const SLU: u32 = 1 << 6;
    /// Force speed / force duplex (cleared: the PHY's resolution is used).
    pub const FRCSPD: u32 = 1 << 11;
    pub const FRCDPX: u32 = 1 << 12;
    /// Device reset; self-clearing.
    pub const RST: u32 = 1 << 26;
    /// PHY reset.
    pub const PHY_RST: u32 = 1 << 31;
}

/// STATUS bits.
pub mod status {
    pub const FD: u32 = 1 << 0;
    /// Link up.
    pub const LU: u32 = 1 << 1;
    /// Speed: 00 10 Mb/s, 01 100 Mb/s, 1x 1000 Mb/s.
    pub const SPEED_SHIFT: u32 = 6;
    pub const SPEED_MASK: u32 = 3 << 6;
}

/// EECD bits.
pub mod eecd {
    /// The EEPROM was read into the registers after reset (the MAC
    /// address among them).
    pub const AUTO_RD: u32 = 1 << 9;
}

/// CTRL_EXT bits.
pub mod ctrl_ext {
    /// Driver loaded (firmware stops managing the port).
    pub const DRV_LOAD: u32 = 1 << 28;
}

/// RAH bits.
pub mod rah {
    /// Address valid.
    pub const AV: u32 = 1 << 31;
}

/// MDIC fields.
pub mod mdic {
    pub const DATA_MASK: u32 = 0xffff;
    pub const REG_SHIFT: u32 = 16;
    pub const PHY_SHIFT: u32 = 21;
    pub const OP_WRITE: u32 = 1 << 26;
    pub const OP_READ: u32 = 2 << 26;
    /// The access completed.
    pub const READY: u32 = 1 << 28;
    /// The access failed.
    pub const ERROR: u32 = 1 << 30;
    /// The 82576's internal PHY answers at address 1.
    pub const PHY_ADDR: u32 = 1;
}

/// PHY registers (IEEE 802.3 clause 22) and bits.
pub mod phy {
    pub const BMCR: u32 = 0;
    pub const BMSR: u32 = 1;
    pub const PHYID1: u32 = 2;
    pub const PHYID2: u32 = 3;
    /// Auto-negotiation advertisement.
    pub const ANAR: u32 = 4;
    /// 1000BASE-T control (advertisement).
    pub const CTRL1000: u32 = 9;
    pub const BMCR_ANRESTART: u16 = 1 << 9;
    pub const BMCR_ANENABLE: u16 = 1 << 12;
    pub const BMCR_RESET: u16 = 1 << 15;
    pub const BMSR_LSTATUS: u16 = 1 << 2;
    pub const BMSR_ANEGCOMPLETE: u16 = 1 << 5;
    /// Selector 802.3, 10/100 half and full, pause and asymmetric pause.
    pub const ANAR_ALL: u16 = 0x0de1;
    /// 1000BASE-T full and half duplex.
    pub const CTRL1000_ALL: u16 = 0x0300;
}

/// RCTL bits.
pub mod rctl {
    pub const EN: u32 = 1 << 1;
    /// Long packet enable (frames above 1522 bytes, up to RLPML).
    pub const LPE: u32 = 1 << 5;
    /// Broadcast accept.
    pub const BAM: u32 = 1 << 15;
    /// Strip the Ethernet CRC (FCS) from received frames.
    pub const SECRC: u32 = 1 << 26;
}

/// TCTL bits.
pub mod tctl {
    pub const EN: u32 = 1 << 1;
    /// Pad short packets.
    pub const PSP: u32 = 1 << 3;
    /// Collision threshold (bits 11:4) and distance (21:12), the
    /// datasheet's full-duplex values.
    pub const CT_15: u32 = 15 << 4;
    pub const COLD_63: u32 = 63 << 12;
    /// Retransmit on late collision.
    pub const RTLC: u32 = 1 << 24;
}

/// SRRCTL fields.
pub mod srrctl {
    /// Receive buffer size in 1 KiB units, bits 6:0.
    pub const BSIZEPKT_SHIFT: u32 = 10;
    pub const BSIZEPKT_MASK: u32 = 0x7f;
    /// Descriptor type: advanced, one buffer.
    pub const DESCTYPE_ADV_ONEBUF: u32 = 1 << 25;
    pub const DESCTYPE_MASK: u32 = 7 << 25;
    /// Drop frames when the queue has no descriptors (instead of
    /// stalling the other queues).
    pub const DROP_EN: u32 = 1 << 31;
}

/// RXDCTL / TXDCTL bits.
pub mod dctl {
    /// Queue enable; reads back 1 once the queue is running.
    pub const ENABLE: u32 = 1 << 25;
    /// Prefetch, host and write-back thresholds (bits 4:0, 12:8, 20:16).
    pub const fn thresholds(p: u32, h: u32, w: u32) -> u32 {
        (p & 0x1f) | (h & 0x1f) << 8 | (w & 0x1f) << 16
    }
}

/// RXCSUM bits.
pub mod rxcsum {
    /// IPv4 header checksum offload.
    pub const IPOFLD: u32 = 1 << 8;
    /// TCP/UDP checksum offload.
    pub const TUOFLD: u32 = 1 << 9;
    /// Packet checksum disable: the descriptor carries the RSS hash instead
    /// of the IP identification and packet checksum. Needed for RSS.
    pub const PCSD: u32 = 1 << 13;
}

/// MRQC fields.
pub mod mrqc {
    /// Multiple receive queues: RSS only (bits 2:0 = 010b).
    pub const ENABLE_RSS: u32 = 0b010;
    pub const ENABLE_MASK: u32 = 0b111;
    /// Hash TCP/IPv4 (addresses and ports).
    pub const FIELD_IPV4_TCP: u32 = 1 << 16;
    /// Hash IPv4 (addresses).
    pub const FIELD_IPV4: u32 = 1 << 17;
}

/// GPIE bits.
pub mod gpie {
    /// Clear ICR on read regardless of the mask.
    pub const NSICR: u32 = 1 << 0;
    /// MSI-X mode: causes go through IVAR to EICR bits, one per vector.
    pub const MSIX_MODE: u32 = 1 << 4;
    /// Extended interrupt auto-mask enable (EIAM applies).
    pub const EIAME: u32 = 1 << 30;
    /// Pending bit array support.
    pub const PBA_SUPPORT: u32 = 1 << 31;
}

/// IVAR entries.
pub mod ivar {
    /// An entry is valid (bits 4:0 the vector).
    pub const VALID: u32 = 0x80;

    /// Register and bit shift of queue `q`'s receive entry: IVAR[q % 8],
    /// byte 0 for queues 0-7 and byte 2 for queues 8-15.
    pub const fn rx(q: usize) -> (usize, u32) {
        (q % 8, if q < 8 { 0 } else { 16 })
    }

    /// Register and shift of queue `q`'s transmit entry: bytes 1 and 3.
    pub const fn tx(q: usize) -> (usize, u32) {
        (q % 8, if q < 8 { 8 } else { 24 })
    }

    /// IVAR_MISC: byte 1 maps the "other" causes (link and the rest of
    /// ICR); byte 0 the TCP timer.
    pub const MISC_OTHER_SHIFT: u32 = 8;
}

/// ICR / IMS bits.
pub mod icr {
    /// Link status change.
    pub const LSC: u32 = 1 << 2;
}

/// EITR fields: the interval in 1 µs units at bits 14:2.
pub mod eitr {
    pub const INTERVAL_SHIFT: u32 = 2;
    pub const INTERVAL_MAX_US: u32 = 0x1fff;
    /// Do not reset the counters on this write.
    pub const CNT_IGNR: u32 = 1 << 31;
}

/// Statistics registers (clear on read).
pub mod stats {
    /// CRC errors.
    pub const CRCERRS: usize = 0x4000;
    /// Missed packets (no descriptor, or the FIFO was full).
    pub const MPC: usize = 0x4010;
    /// Receive no buffers (frames dropped for want of a descriptor).
    pub const RNBC: usize = 0x40a0;
    /// Good packets received / transmitted.
    pub const GPRC: usize = 0x4074;
    pub const GPTC: usize = 0x4080;
    /// Good octets received / transmitted (low, then high).
    pub const GORCL: usize = 0x4088;
    pub const GORCH: usize = 0x408c;
    pub const GOTCL: usize = 0x4090;
    pub const GOTCH: usize = 0x4094;
    /// Receive oversize count.
    pub const ROC: usize = 0x40ac;
    /// Total packets received / transmitted.
    pub const TPR: usize = 0x40d0;
    pub const TPT: usize = 0x40d4;
    /// TCP segmentation contexts transmitted.
    pub const TSCTC: usize = 0x40f8;
}

/// The most queues of an 82576 (QEMU: `IGB_NUM_QUEUES`).
pub const DEVICE_QUEUES: usize = 16;
/// MSI-X vectors of an 82576 (QEMU: `IGB_MSIX_VEC_NUM`).
pub const DEVICE_VECTORS: usize = 10;
