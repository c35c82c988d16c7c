//! Device errors as the layers above the driver see them.

use core::fmt;

/// A device error, as the DIO layer sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlkError {
    /// The device completed the command with an error status. For NVMe:
    /// status code type and code, and the status's name from the driver's
    /// table (so that printing it needs no driver code).
    Status { sct: u8, sc: u8, name: &'static str },
    /// No completion before the deadline (reported once the device can no
    /// longer touch the buffer: after an abort or a controller reset).
    Timeout,
    /// Aborted by the driver after its deadline passed.
    Aborted,
    /// Cancelled by a controller reset (another command timed out); the
    /// request itself may be retried.
    Cancelled,
    /// The device is being reset or did not come back from a reset.
    Unavailable,
    /// No free command slot.
    QueueFull,
    /// A buffer or range the device cannot take.
    Invalid,
}

impl BlkError {
    /// What failed, in a few words (for an NVMe status, its name): what
    /// layers that cannot depend on this crate (dxfs's device boundary)
    /// carry as the reason.
    pub fn reason(&self) -> &'static str {
        match self {
            BlkError::Status { name, .. } => name,
            BlkError::Timeout => "command timed out",
            BlkError::Aborted => "command timed out and was aborted",
            BlkError::Cancelled => "command cancelled by a controller reset",
            BlkError::Unavailable => "device unavailable (controller reset failed)",
            BlkError::QueueFull => "queue full",
            BlkError::Invalid => "invalid command",
        }
    }
}

impl fmt::Display for BlkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BlkError::Status { sct, sc, name } => {
                write!(f, "{name} (sct {sct:#x} sc {sc:#04x})")
            }
            other => f.write_str(other.reason()),
        }
    }
}

impl core::error::Error for BlkError {}
