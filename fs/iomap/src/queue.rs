//! The block-queue interface the DIO layer submits to.

use core::fmt;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Read,
    Write,
    /// Commit the device's volatile cache (no data).
    Flush,
}

/// A data buffer named by CPU address (the device layer translates it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IoBuf {
    pub addr: usize,
    pub len: usize,
}

impl IoBuf {
    pub fn from_mut_slice(b: &mut [u8]) -> Self {
        IoBuf {
            addr: b.as_mut_ptr() as usize,
            len: b.len(),
        }
    }
    pub fn from_slice(b: &[u8]) -> Self {
        IoBuf {
            addr: b.as_ptr() as usize,
            len: b.len(),
        }
    }
    pub fn offset(self, off: usize, len: usize) -> IoBuf {
        IoBuf {
            addr: self.addr + off,
            len,
        }
    }
}

/// A device error, as the DIO layer sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlkError {
    /// The device completed the command with an error status (NVMe: status
    /// code type and code).
    Status { sct: u8, sc: u8 },
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

impl fmt::Display for BlkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BlkError::Status { sct, sc } => {
                write!(f, "{}", dioxide_nvme::Status::new(*sct, *sc))
            }
            BlkError::Timeout => write!(f, "command timed out"),
            BlkError::Aborted => write!(f, "command timed out and was aborted"),
            BlkError::Cancelled => write!(f, "command cancelled by a controller reset"),
            BlkError::Unavailable => write!(f, "device unavailable (controller reset failed)"),
            BlkError::QueueFull => write!(f, "queue full"),
            BlkError::Invalid => write!(f, "invalid command"),
        }
    }
}

/// One hardware (or null) submission/completion queue.
///
/// Completions are only reported from [`BlockQueue::poll`] and
/// [`BlockQueue::expire`], never from inside `submit`, so a submitter never
/// sees its own completion before `submit` returns.
pub trait BlockQueue {
    /// log2 of the logical block size.
    fn lba_shift(&self) -> u32;
    /// Largest transfer of one command, bytes.
    fn max_transfer(&self) -> usize;
    /// Commands that can be in flight at once.
    fn depth(&self) -> usize;
    /// Commands in flight now.
    fn in_flight(&self) -> usize;
    /// Size in logical blocks.
    fn capacity(&self) -> u64;
    /// Submits one command; `tag` comes back with its completion.
    ///
    /// # Safety
    /// `buf` stays valid, and untouched by the CPU, until the completion.
    unsafe fn submit(&mut self, op: Op, lba: u64, buf: IoBuf, tag: u64) -> Result<(), BlkError>;
    /// Reaps completions, calling `on_done(tag, result)` for each.
    fn poll<F: FnMut(u64, Result<(), BlkError>)>(&mut self, on_done: F) -> usize;
    /// Deals with commands past their deadline (an NVMe queue aborts them
    /// and, when the controller does not answer, resets it). A timed-out
    /// command completes through `on_done` only once the device can no
    /// longer access its buffer, never at the deadline itself.
    fn expire<F: FnMut(u64, Result<(), BlkError>)>(&mut self, _on_done: F) {}
    /// Monotonic time, ns.
    fn now_ns(&self) -> u64;
    /// Called in busy-wait loops.
    fn relax(&self) {
        core::hint::spin_loop();
    }
}
