//! Driver errors.

use crate::cmd::Status;
use core::fmt;

/// Everything that can go wrong between the driver and a controller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NvmeError {
    /// CSTS.RDY did not follow CC.EN within the controller's CAP.TO.
    NotReady { enable: bool, waited_ms: u64 },
    /// The controller reported a fatal status (CSTS.CFS).
    ControllerFatal,
    /// Register reads return all ones: the device is gone or not decoding.
    DeviceGone,
    /// The controller lacks something the driver needs.
    Unsupported(&'static str),
    /// A command did not complete before its deadline. From
    /// `QueuePair::wait` at once (the device may still own the buffer, see
    /// there); from a controller reset once the device stopped.
    Timeout { qid: u16, cid: u16, opcode: u8 },
    /// A command passed its deadline, the driver asked the controller to abort
    /// it, and it completed with status Command Abort Requested.
    Aborted { qid: u16, cid: u16, opcode: u8 },
    /// A command that had not passed its deadline was failed by a controller
    /// reset (the reset was made for another command); it may be retried.
    Cancelled { qid: u16, cid: u16, opcode: u8 },
    /// The queue refuses new commands: a timed-out command may still own its
    /// buffer, and only a controller reset (or its late completion) ends that.
    ResetRequired { qid: u16 },
    /// The queue refuses new commands: the controller did not come back after
    /// a reset (or could not be stopped). A later successful reset lifts this.
    ControllerDown { qid: u16 },
    /// The controller completed a command with an error status.
    Command {
        qid: u16,
        opcode: u8,
        status: Status,
    },
    /// Every slot of the queue is in use.
    QueueFull,
    /// DMA memory could not be allocated.
    NoMemory,
    /// A data buffer the controller cannot address: not dword aligned, empty,
    /// or larger than the maximum transfer.
    BadBuffer { len: usize, max: usize },
    /// A transfer that is not a whole number of logical blocks or lies past the
    /// end of the namespace.
    OutOfRange {
        lba: u64,
        blocks: u64,
        namespace_blocks: u64,
    },
    /// The namespace does not exist or is inactive (identify returned size 0).
    NamespaceEmpty { nsid: u32 },
    /// The namespace is formatted with metadata (`metadata_bytes` per logical
    /// block, LBA format `lba_format`, interleaved with the data when
    /// `extended`): the driver sends no metadata pointer, so it refuses it.
    MetadataFormat {
        nsid: u32,
        metadata_bytes: u16,
        lba_format: u8,
        extended: bool,
    },
    /// Identify data that the driver cannot use.
    BadIdentify(&'static str),
    /// A queue identifier or size that the controller does not allow.
    BadQueue { qid: u16, entries: u32 },
}

impl fmt::Display for NvmeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            NvmeError::NotReady { enable, waited_ms } => write!(
                f,
                "controller did not become {} within {waited_ms} ms (CAP.TO)",
                if enable { "ready" } else { "disabled" }
            ),
            NvmeError::ControllerFatal => write!(f, "controller fatal status (CSTS.CFS)"),
            NvmeError::DeviceGone => write!(f, "controller registers read all ones"),
            NvmeError::Unsupported(what) => write!(f, "controller unsupported: {what}"),
            NvmeError::Timeout { qid, cid, opcode } => {
                write!(
                    f,
                    "command timed out (queue {qid}, cid {cid}, opcode {opcode:#04x})"
                )
            }
            NvmeError::Aborted { qid, cid, opcode } => write!(
                f,
                "command aborted after timing out (queue {qid}, cid {cid}, opcode {opcode:#04x})"
            ),
            NvmeError::Cancelled { qid, cid, opcode } => write!(
                f,
                "command cancelled by a controller reset (queue {qid}, cid {cid}, opcode {opcode:#04x})"
            ),
            NvmeError::ResetRequired { qid } => write!(
                f,
                "queue {qid} refuses commands until the controller is reset (a timed-out command still owns its buffer)"
            ),
            NvmeError::ControllerDown { qid } => write!(
                f,
                "queue {qid} refuses commands: the controller did not come back after a reset"
            ),
            NvmeError::Command {
                qid,
                opcode,
                status,
            } => {
                write!(
                    f,
                    "command failed (queue {qid}, opcode {opcode:#04x}): {status}"
                )
            }
            NvmeError::QueueFull => write!(f, "submission queue full"),
            NvmeError::NoMemory => write!(f, "out of DMA memory"),
            NvmeError::BadBuffer { len, max } => write!(
                f,
                "data buffer of {len} bytes unusable (dword aligned, 1..={max} bytes)"
            ),
            NvmeError::OutOfRange {
                lba,
                blocks,
                namespace_blocks,
            } => write!(
                f,
                "{blocks} blocks at LBA {lba} outside namespace of {namespace_blocks} blocks"
            ),
            NvmeError::NamespaceEmpty { nsid } => {
                write!(f, "namespace {nsid} has size 0 (inactive or absent)")
            }
            NvmeError::MetadataFormat {
                nsid,
                metadata_bytes,
                lba_format,
                extended,
            } => write!(
                f,
                "namespace {nsid}: {metadata_bytes} bytes of metadata per block (LBA format {lba_format}{}): unsupported, format it without metadata",
                if extended { ", extended LBA" } else { "" }
            ),
            NvmeError::BadIdentify(what) => write!(f, "bad identify data: {what}"),
            NvmeError::BadQueue { qid, entries } => {
                write!(f, "queue {qid} with {entries} entries not allowed")
            }
        }
    }
}

impl core::error::Error for NvmeError {}
