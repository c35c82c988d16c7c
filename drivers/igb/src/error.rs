//! The driver's errors.

use core::fmt;

/// What can go wrong bringing the device up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Error {
    /// CTRL.RST did not clear within the deadline.
    ResetTimeout,
    /// RAH0.AV is clear: no station address was loaded.
    NoMacAddress,
    /// The station address is not a unicast address (all zeros, or
    /// multicast).
    BadMacAddress([u8; 6]),
    /// A PHY register access through MDIC did not complete.
    MdicTimeout { reg: u32 },
    /// A PHY register access through MDIC failed (MDIC.E).
    MdicError { reg: u32 },
    /// A queue's RXDCTL/TXDCTL.ENABLE did not read back 1.
    QueueEnableTimeout { queue: usize, rx: bool },
    /// The configuration is out of the device's range.
    BadConfig(&'static str),
    /// The HAL had no DMA memory for a ring or its buffers.
    NoDmaMemory { bytes: usize },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::ResetTimeout => f.write_str("device reset did not complete"),
            Error::NoMacAddress => f.write_str("no MAC address (RAH0.AV clear)"),
            Error::BadMacAddress(m) => write!(f, "MAC address {m:02x?} is not unicast"),
            Error::MdicTimeout { reg } => write!(f, "PHY register {reg}: MDIC access timed out"),
            Error::MdicError { reg } => write!(f, "PHY register {reg}: MDIC access failed"),
            Error::QueueEnableTimeout { queue, rx } => {
                let dir = if *rx { "receive" } else { "transmit" };
                write!(f, "{dir} queue {queue} did not enable")
            }
            Error::BadConfig(why) => write!(f, "configuration: {why}"),
            Error::NoDmaMemory { bytes } => write!(f, "no DMA memory for {bytes} bytes"),
        }
    }
}
