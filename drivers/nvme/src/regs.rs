//! Controller registers (NVMe base specification 2.0, section 3.1).
//!
//! ```text
//! offset  size  name   use here
//! 0x00    8     CAP    MQES 15:0 (0-based), CQR 16, TO 31:24 (500 ms units),
//!                      DSTRD 35:32, CSS 44:37 (bit 37 = NVM), MPSMIN 51:48, MPSMAX 55:52
//! 0x08    4     VS     major 31:16, minor 15:8
//! 0x14    4     CC     EN 0, CSS 6:4, MPS 10:7, AMS 13:11, SHN 15:14,
//!                      IOSQES 19:16, IOCQES 23:20
//! 0x1c    4     CSTS   RDY 0, CFS 1, SHST 3:2
//! 0x24    4     AQA    ASQS 11:0, ACQS 27:16 (both 0-based)
//! 0x28    8     ASQ    admin submission queue base
//! 0x30    8     ACQ    admin completion queue base
//! 0x1000  4     SQ0TDBL, then CQ0HDBL, SQ1TDBL ... spaced (4 << DSTRD) bytes
//! ```
//!
//! The Shadow Doorbell and EventIdx buffers of Doorbell Buffer Config (one
//! memory page each) are laid out like the doorbells from 0x1000: the slot of
//! queue `qid`'s SQ tail at byte `(2 * qid) * (4 << DSTRD)`, its CQ head at
//! `(2 * qid + 1) * (4 << DSTRD)`, each a 32-bit little-endian value of which
//! the low 16 bits are used ([`shadow_sq_offset`], [`shadow_cq_offset`]).

pub const CAP: usize = 0x00;
pub const VS: usize = 0x08;
pub const INTMS: usize = 0x0c;
pub const INTMC: usize = 0x10;
pub const CC: usize = 0x14;
pub const CSTS: usize = 0x1c;
pub const AQA: usize = 0x24;
pub const ASQ: usize = 0x28;
pub const ACQ: usize = 0x30;
pub const DOORBELL_BASE: usize = 0x1000;

pub const CC_EN: u32 = 1 << 0;
pub const CC_IOSQES_64: u32 = 6 << 16;
pub const CC_IOCQES_16: u32 = 4 << 20;
pub const CC_SHN_NORMAL: u32 = 1 << 14;

pub const CSTS_RDY: u32 = 1 << 0;
pub const CSTS_CFS: u32 = 1 << 1;
pub const CSTS_SHST_MASK: u32 = 3 << 2;
pub const CSTS_SHST_DONE: u32 = 2 << 2;

/// Decoded controller capabilities.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cap(pub u64);

impl Cap {
    /// Maximum queue entries supported (1-based).
    pub fn max_queue_entries(self) -> u32 {
        (self.0 & 0xffff) as u32 + 1
    }
    /// Whether queues must be physically contiguous.
    pub fn contiguous_queues_required(self) -> bool {
        self.0 & (1 << 16) != 0
    }
    /// Worst-case time for CSTS.RDY to follow CC.EN, in milliseconds.
    pub fn timeout_ms(self) -> u64 {
        ((self.0 >> 24) & 0xff) * 500
    }
    /// Doorbell stride in bytes.
    pub fn doorbell_stride(self) -> usize {
        4 << ((self.0 >> 32) & 0xf)
    }
    /// Whether the NVM command set is supported.
    pub fn nvm_command_set(self) -> bool {
        (self.0 >> 37) & 1 != 0
    }
    /// Minimum memory page size in bytes.
    pub fn min_page_size(self) -> usize {
        1 << (12 + ((self.0 >> 48) & 0xf))
    }
    /// Maximum memory page size in bytes.
    pub fn max_page_size(self) -> usize {
        1 << (12 + ((self.0 >> 52) & 0xf))
    }
}

/// Offset of the submission queue tail doorbell of queue `qid`.
pub fn sq_doorbell(qid: u16, stride: usize) -> usize {
    DOORBELL_BASE + (2 * qid as usize) * stride
}

/// Offset of the completion queue head doorbell of queue `qid`.
pub fn cq_doorbell(qid: u16, stride: usize) -> usize {
    DOORBELL_BASE + (2 * qid as usize + 1) * stride
}

/// Byte offset of queue `qid`'s SQ tail slot in the Shadow Doorbell and
/// EventIdx buffers (module docs).
pub fn shadow_sq_offset(qid: u16, stride: usize) -> usize {
    sq_doorbell(qid, stride) - DOORBELL_BASE
}

/// Byte offset of queue `qid`'s CQ head slot in the Shadow Doorbell and
/// EventIdx buffers.
pub fn shadow_cq_offset(qid: u16, stride: usize) -> usize {
    cq_doorbell(qid, stride) - DOORBELL_BASE
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cap_fields_of_qemu_value() {
        // CAP as QEMU 7.2's emulated controller reports it (logged by the kernel).
        let cap = Cap(0x0040_1820_0f01_07ff);
        assert_eq!(cap.max_queue_entries(), 2048);
        assert!(cap.contiguous_queues_required());
        assert_eq!(cap.timeout_ms(), 7500);
        assert_eq!(cap.doorbell_stride(), 4);
        assert!(cap.nvm_command_set());
        assert_eq!(cap.min_page_size(), 4096);
        assert_eq!(cap.max_page_size(), 4096 << 4);
        assert_eq!(sq_doorbell(1, 4), 0x1008);
        assert_eq!(cq_doorbell(1, 4), 0x100c);
        // QEMU 10.0's: CAP.CSS 0x41 where 7.2 has 0xc1 (no "no I/O command
        // set" bit 44); every field the driver reads is the same.
        let cap10 = Cap(0x0040_0820_0f01_07ff);
        assert_eq!(cap10.0 ^ cap.0, 1 << 44);
        assert!(cap10.nvm_command_set());
        assert_eq!(cap10.max_queue_entries(), 2048);
        assert_eq!(cap10.timeout_ms(), 7500);
        assert_eq!(cap10.doorbell_stride(), 4);
        assert_eq!(cap10.min_page_size(), 4096);
    }

    #[test]
    fn shadow_slots_follow_the_doorbell_layout() {
        // DSTRD 0 (QEMU): queue i at 8 * i, its CQ head 4 bytes further, as
        // QEMU's `(i << 3)` and `(i << 3) + (1 << 2)`.
        assert_eq!((shadow_sq_offset(0, 4), shadow_cq_offset(0, 4)), (0, 4));
        assert_eq!((shadow_sq_offset(1, 4), shadow_cq_offset(1, 4)), (8, 12));
        assert_eq!(
            (shadow_sq_offset(64, 4), shadow_cq_offset(64, 4)),
            (512, 516)
        );
        // DSTRD 2: 16-byte stride.
        assert_eq!(
            (shadow_sq_offset(3, 16), shadow_cq_offset(3, 16)),
            (96, 112)
        );
        // The last queue whose CQ slot fits a 4 KiB page with DSTRD 0.
        assert_eq!(shadow_cq_offset(511, 4) + 4, 4096);
    }
}
