//! Submission and completion queue entries and the commands the driver issues.
//!
//! Submission queue entry, 64 bytes (NVMe base spec 2.0, figure 88):
//!
//! ```text
//! bytes   field
//! 0..4    CDW0: opcode 7:0, FUSE 9:8, PSDT 15:14 (0 = PRPs), CID 31:16
//! 4..8    NSID
//! 8..16   reserved
//! 16..24  MPTR (metadata pointer)
//! 24..32  PRP1 (DPTR)
//! 32..40  PRP2
//! 40..64  CDW10..CDW15, command specific
//! ```
//!
//! Completion queue entry, 16 bytes (figure 90):
//!
//! ```text
//! bytes   field
//! 0..4    DW0, command specific result
//! 4..8    DW1, reserved
//! 8..10   SQHD, submission queue head
//! 10..12  SQID
//! 12..14  CID
//! 14..16  status: phase 0, SC 8:1, SCT 11:9, CRD 13:12, M 14, DNR 15
//! ```

use core::fmt;

/// Admin command opcodes.
pub mod admin {
    pub const DELETE_IO_SQ: u8 = 0x00;
    pub const CREATE_IO_SQ: u8 = 0x01;
    pub const DELETE_IO_CQ: u8 = 0x04;
    pub const CREATE_IO_CQ: u8 = 0x05;
    pub const IDENTIFY: u8 = 0x06;
    pub const ABORT: u8 = 0x08;
    pub const SET_FEATURES: u8 = 0x09;
    pub const GET_FEATURES: u8 = 0x0a;
    /// Doorbell Buffer Config (NVMe 1.3): shadow doorbells for emulated
    /// controllers.
    pub const DOORBELL_BUFFER_CONFIG: u8 = 0x7c;
}

/// NVM command set opcodes.
/// Force Unit Access, CDW12 bit 30 of Read and Write.
pub const FUA: u32 = 1 << 30;

pub mod io {
    pub const FLUSH: u8 = 0x00;
    pub const WRITE: u8 = 0x01;
    pub const READ: u8 = 0x02;
}

/// Identify CNS values.
pub mod cns {
    pub const NAMESPACE: u32 = 0x00;
    pub const CONTROLLER: u32 = 0x01;
    pub const ACTIVE_NAMESPACES: u32 = 0x02;
}

/// Feature identifiers.
pub mod feature {
    pub const NUMBER_OF_QUEUES: u32 = 0x07;
}

/// A submission queue entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SubmissionEntry {
    pub cdw0: u32,
    pub nsid: u32,
    pub cdw2: u32,
    pub cdw3: u32,
    pub mptr: u64,
    pub prp1: u64,
    pub prp2: u64,
    pub cdw10: u32,
    pub cdw11: u32,
    pub cdw12: u32,
    pub cdw13: u32,
    pub cdw14: u32,
    pub cdw15: u32,
}

const _: () = assert!(core::mem::size_of::<SubmissionEntry>() == 64);

impl SubmissionEntry {
    fn with_opcode(opcode: u8) -> Self {
        SubmissionEntry {
            cdw0: opcode as u32,
            ..Default::default()
        }
    }

    pub fn opcode(&self) -> u8 {
        self.cdw0 as u8
    }

    pub fn cid(&self) -> u16 {
        (self.cdw0 >> 16) as u16
    }

    pub fn set_cid(&mut self, cid: u16) {
        self.cdw0 = (self.cdw0 & 0xffff) | ((cid as u32) << 16);
    }

    /// Identify with the given CNS; the 4 KiB result goes to the data buffer.
    pub fn identify(cns: u32, nsid: u32) -> Self {
        let mut c = Self::with_opcode(admin::IDENTIFY);
        c.nsid = nsid;
        c.cdw10 = cns;
        c
    }

    /// Set Features / Number of Queues, both counts 1-based here.
    pub fn set_num_queues(sq: u16, cq: u16) -> Self {
        let mut c = Self::with_opcode(admin::SET_FEATURES);
        c.cdw10 = feature::NUMBER_OF_QUEUES;
        c.cdw11 = ((cq as u32 - 1) << 16) | (sq as u32 - 1);
        c
    }

    /// Create I/O Completion Queue at `base` with `entries` entries, physically
    /// contiguous, interrupts to MSI-X vector `vector` when given.
    pub fn create_io_cq(qid: u16, entries: u16, base: u64, vector: Option<u16>) -> Self {
        let mut c = Self::with_opcode(admin::CREATE_IO_CQ);
        c.prp1 = base;
        c.cdw10 = ((entries as u32 - 1) << 16) | qid as u32;
        c.cdw11 = match vector {
            Some(v) => ((v as u32) << 16) | 0b11,
            None => 0b01,
        };
        c
    }

    /// Create I/O Submission Queue bound to completion queue `cqid`.
    pub fn create_io_sq(qid: u16, entries: u16, base: u64, cqid: u16) -> Self {
        let mut c = Self::with_opcode(admin::CREATE_IO_SQ);
        c.prp1 = base;
        c.cdw10 = ((entries as u32 - 1) << 16) | qid as u32;
        c.cdw11 = ((cqid as u32) << 16) | 0b01;
        c
    }

    pub fn delete_io_sq(qid: u16) -> Self {
        let mut c = Self::with_opcode(admin::DELETE_IO_SQ);
        c.cdw10 = qid as u32;
        c
    }

    pub fn delete_io_cq(qid: u16) -> Self {
        let mut c = Self::with_opcode(admin::DELETE_IO_CQ);
        c.cdw10 = qid as u32;
        c
    }

    /// Abort command `cid` of submission queue `sqid` (CDW10: SQID 15:0, CID
    /// 31:16). The controller answers DW0 bit 0 = 0 when it aborted the
    /// command (which then completes with Command Abort Requested), 1 when it
    /// did not.
    pub fn abort(sqid: u16, cid: u16) -> Self {
        let mut c = Self::with_opcode(admin::ABORT);
        c.cdw10 = ((cid as u32) << 16) | sqid as u32;
        c
    }

    /// Doorbell Buffer Config (NVMe base spec 2.0, section 5.8): PRP1 is the
    /// Shadow Doorbell buffer, PRP2 the EventIdx buffer, each one memory page
    /// (4 KiB here), page aligned; no other field is used. The controller
    /// answers Invalid Field for addresses that are not page aligned.
    pub fn doorbell_buffer_config(shadow: u64, event_idx: u64) -> Self {
        let mut c = Self::with_opcode(admin::DOORBELL_BUFFER_CONFIG);
        c.prp1 = shadow;
        c.prp2 = event_idx;
        c
    }

    /// Read `blocks` (1-based, at most 65536) logical blocks from `lba`.
    pub fn read(nsid: u32, lba: u64, blocks: u32) -> Self {
        Self::rw(io::READ, nsid, lba, blocks)
    }

    /// Write `blocks` (1-based, at most 65536) logical blocks at `lba`.
    pub fn write(nsid: u32, lba: u64, blocks: u32) -> Self {
        Self::rw(io::WRITE, nsid, lba, blocks)
    }

    /// The same write with Force Unit Access (CDW12 bit 30): completed
    /// only once its data is on non-volatile media, whatever the volatile
    /// write cache.
    pub fn with_fua(mut self) -> Self {
        self.cdw12 |= FUA;
        self
    }

    fn rw(opcode: u8, nsid: u32, lba: u64, blocks: u32) -> Self {
        debug_assert!((1..=65536).contains(&blocks));
        let mut c = Self::with_opcode(opcode);
        c.nsid = nsid;
        c.cdw10 = lba as u32;
        c.cdw11 = (lba >> 32) as u32;
        c.cdw12 = (blocks - 1) & 0xffff;
        c
    }

    /// Commits the volatile write cache: every write the controller
    /// completed before this command was submitted is on non-volatile
    /// media when it completes (NVMe base specification, Flush).
    pub fn flush(nsid: u32) -> Self {
        let mut c = Self::with_opcode(io::FLUSH);
        c.nsid = nsid;
        c
    }

    /// Whether the command moves data from host memory to the device.
    pub fn is_write(&self) -> bool {
        self.opcode() == io::WRITE
    }
}

/// A completion queue entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CompletionEntry {
    pub dw0: u32,
    pub dw1: u32,
    pub sq_head: u16,
    pub sq_id: u16,
    pub cid: u16,
    pub status: u16,
}

const _: () = assert!(core::mem::size_of::<CompletionEntry>() == 16);

impl CompletionEntry {
    pub fn phase(&self) -> bool {
        self.status & 1 != 0
    }

    /// The status field without the phase bit.
    pub fn status(&self) -> Status {
        Status(self.status >> 1)
    }
}

/// Status field of a completion (phase bit removed): SC 7:0, SCT 10:8, CRD
/// 12:11, M 13, DNR 14.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Status(pub u16);

/// Status code types.
pub mod sct {
    pub const GENERIC: u8 = 0;
    pub const COMMAND_SPECIFIC: u8 = 1;
    pub const MEDIA: u8 = 2;
    pub const PATH: u8 = 3;
}

impl Status {
    pub const SUCCESS: Status = Status(0);

    pub fn new(sct: u8, sc: u8) -> Self {
        Status(((sct as u16 & 7) << 8) | sc as u16)
    }
    pub fn with_dnr(self) -> Self {
        Status(self.0 | 1 << 14)
    }
    pub fn sc(self) -> u8 {
        self.0 as u8
    }
    pub fn sct(self) -> u8 {
        ((self.0 >> 8) & 7) as u8
    }
    pub fn dnr(self) -> bool {
        self.0 & (1 << 14) != 0
    }
    pub fn is_success(self) -> bool {
        self.sct() == 0 && self.sc() == 0
    }
    /// Command Abort Requested: the command was aborted by an Abort command.
    pub fn is_abort_requested(self) -> bool {
        self.sct() == sct::GENERIC && self.sc() == 0x07
    }

    /// The specification's name of this status, when the driver knows it.
    pub fn name(self) -> &'static str {
        match (self.sct(), self.sc()) {
            (0, 0x00) => "Successful Completion",
            (0, 0x01) => "Invalid Command Opcode",
            (0, 0x02) => "Invalid Field in Command",
            (0, 0x03) => "Command ID Conflict",
            (0, 0x04) => "Data Transfer Error",
            (0, 0x05) => "Commands Aborted due to Power Loss Notification",
            (0, 0x06) => "Internal Error",
            (0, 0x07) => "Command Abort Requested",
            (0, 0x08) => "Command Aborted due to SQ Deletion",
            (0, 0x0b) => "Invalid Namespace or Format",
            (0, 0x0d) => "Invalid SGL Segment Descriptor",
            (0, 0x13) => "PRP Offset Invalid",
            (0, 0x80) => "LBA Out of Range",
            (0, 0x81) => "Capacity Exceeded",
            (0, 0x82) => "Namespace Not Ready",
            (1, 0x00) => "Completion Queue Invalid",
            (1, 0x01) => "Invalid Queue Identifier",
            (1, 0x02) => "Invalid Queue Size",
            (1, 0x03) => "Abort Command Limit Exceeded",
            (1, 0x08) => "Invalid Interrupt Vector",
            (1, 0x0d) => "Feature Identifier Not Saveable",
            (1, 0x80) => "Conflicting Attributes",
            (1, 0x82) => "Attempted Write to Read Only Range",
            (2, 0x80) => "Write Fault",
            (2, 0x81) => "Unrecovered Read Error",
            (2, 0x82) => "End-to-end Guard Check Error",
            (2, 0x83) => "End-to-end Application Tag Check Error",
            (2, 0x84) => "End-to-end Reference Tag Check Error",
            (2, 0x85) => "Compare Failure",
            (2, 0x86) => "Access Denied",
            (2, 0x87) => "Deallocated or Unwritten Logical Block",
            _ => "unknown status",
        }
    }
}

impl fmt::Debug for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} (sct {:#x} sc {:#04x}{})",
            self.name(),
            self.sct(),
            self.sc(),
            if self.dnr() { ", do not retry" } else { "" }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes<T: Copy>(v: &T) -> &[u8] {
        // SAFETY: T is a repr(C) plain-old-data entry without padding.
        unsafe {
            core::slice::from_raw_parts(v as *const T as *const u8, core::mem::size_of::<T>())
        }
    }

    #[test]
    fn read_command_golden_bytes() {
        let mut c = SubmissionEntry::read(1, 0x1_2345_6789, 8);
        c.set_cid(0x0102);
        c.prp1 = 0x1000;
        c.prp2 = 0x2000;
        let mut want = [0u8; 64];
        want[0] = 0x02; // opcode READ
        want[2..4].copy_from_slice(&[0x02, 0x01]); // CID
        want[4] = 1; // NSID
        want[24..32].copy_from_slice(&0x1000u64.to_le_bytes());
        want[32..40].copy_from_slice(&0x2000u64.to_le_bytes());
        want[40..44].copy_from_slice(&0x2345_6789u32.to_le_bytes()); // SLBA low
        want[44..48].copy_from_slice(&1u32.to_le_bytes()); // SLBA high
        want[48] = 7; // NLB, 0-based
        assert_eq!(bytes(&c), &want[..]);
    }

    #[test]
    fn create_queue_golden_bytes() {
        let cq = SubmissionEntry::create_io_cq(1, 256, 0xabc000, Some(1));
        assert_eq!(cq.opcode(), 0x05);
        assert_eq!(cq.cdw10, 0x00ff_0001);
        assert_eq!(cq.cdw11, 0x0001_0003);
        let sq = SubmissionEntry::create_io_sq(1, 256, 0xdef000, 1);
        assert_eq!(sq.cdw10, 0x00ff_0001);
        assert_eq!(sq.cdw11, 0x0001_0001);
        let nq = SubmissionEntry::set_num_queues(4, 4);
        assert_eq!((nq.cdw10, nq.cdw11), (7, 0x0003_0003));
    }

    #[test]
    fn abort_command_golden_bytes() {
        let mut c = SubmissionEntry::abort(3, 0x0102);
        c.set_cid(5);
        let mut want = [0u8; 64];
        want[0] = 0x08; // opcode ABORT
        want[2..4].copy_from_slice(&5u16.to_le_bytes()); // CID of the Abort itself
        want[40..42].copy_from_slice(&3u16.to_le_bytes()); // SQID
        want[42..44].copy_from_slice(&0x0102u16.to_le_bytes()); // CID to abort
        assert_eq!(bytes(&c), &want[..]);
        let st = Status::new(0, 0x07);
        assert!(st.is_abort_requested());
        assert_eq!(st.name(), "Command Abort Requested");
        assert!(!Status::new(1, 0x07).is_abort_requested());
    }

    #[test]
    fn doorbell_buffer_config_golden_bytes() {
        let mut c = SubmissionEntry::doorbell_buffer_config(0x1234_5000, 0x0009_8765_4000);
        c.set_cid(3);
        let mut want = [0u8; 64];
        want[0] = 0x7c; // opcode Doorbell Buffer Config
        want[2..4].copy_from_slice(&3u16.to_le_bytes()); // CID
        want[24..32].copy_from_slice(&0x1234_5000u64.to_le_bytes()); // PRP1: shadow doorbells
        want[32..40].copy_from_slice(&0x0009_8765_4000u64.to_le_bytes()); // PRP2: event indexes
        assert_eq!(bytes(&c), &want[..]);
    }

    #[test]
    fn completion_status_decoding() {
        let mut raw = [0u8; 16];
        raw[12..14].copy_from_slice(&7u16.to_le_bytes());
        // phase 1, SCT 2, SC 0x81, DNR
        let status: u16 = 1 | (0x81 << 1) | (2 << 9) | (1 << 15);
        raw[14..16].copy_from_slice(&status.to_le_bytes());
        // SAFETY: CompletionEntry is repr(C), 16 bytes, any bit pattern is valid.
        let e: CompletionEntry = unsafe { core::ptr::read_unaligned(raw.as_ptr() as *const _) };
        assert_eq!(e.cid, 7);
        assert!(e.phase());
        let s = e.status();
        assert_eq!((s.sct(), s.sc(), s.dnr()), (2, 0x81, true));
        assert_eq!(s.name(), "Unrecovered Read Error");
        assert_eq!(
            s.to_string(),
            "Unrecovered Read Error (sct 0x2 sc 0x81, do not retry)"
        );
    }
}
