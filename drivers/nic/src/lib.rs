//! The NIC contract dioxide's network stack runs over.
//!
//! A NIC driver hands the kernel one [`QueuePair`] per core: a receive ring
//! ([`RxRing`]) and a transmit ring ([`TxRing`]) that only that core
//! touches, so the stack on each core runs without locks. Frames are seen
//! in place, in the driver's DMA buffers: a received frame is lent to a
//! closure and its buffer given back to the device when the closure
//! returns; a frame to send is written by a closure straight into a
//! transmit buffer. Nothing here allocates per frame.
//!
//! What each side promises:
//!
//! - [`RxRing::receive`] calls its closure at most once, with the next good
//!   frame (malformed descriptors are dropped and counted by the driver,
//!   never shown); it returns `None`, without calling it, when no frame is
//!   waiting. [`RxFrame::csum`] says what the device checked
//!   ([`RxCsum`]); a frame the device found bad is still shown (flagged
//!   [`RxCsum::Bad`]) so that the caller decides, and counted.
//! - [`TxRing::transmit`] calls its closure once, with a buffer of exactly
//!   `len` bytes, when it has room (a descriptor and a buffer), and returns
//!   `None` without calling it otherwise (ring full, or a frame larger than
//!   [`Caps::max_frame`]). With [`TxMeta::csum`] the frame's TCP or UDP
//!   checksum field may hold anything: the driver and the device fill it
//!   (IPv4 only); with [`TxMeta::tso_mss`] a TCP/IPv4 frame larger than the
//!   MTU is cut by the device into segments of that many payload bytes
//!   (the IPv4 total length, identification and checksum of each segment
//!   are the device's work too).
//! - [`TxRing::reclaim`] takes back the buffers of frames the device has
//!   sent; `transmit` and `can_transmit` reclaim too, so a caller that only
//!   transmits never stalls.
//!
//! [`phy::NicDevice`] is a smoltcp `phy::Device` over any [`QueuePair`].
//! [`csum`] holds the Internet checksum arithmetic drivers and tests share.
#![no_std]
#![forbid(unsafe_code)]

extern crate alloc;
#[cfg(test)]
extern crate std;

pub mod csum;
pub mod phy;
#[cfg(test)]
mod tests;

/// Ethernet header bytes (no VLAN tag).
pub const ETH_HLEN: usize = 14;

/// What the device says about a received frame's checksums.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RxCsum {
    /// The device did not check the frame (not IPv4 TCP/UDP, a fragment,
    /// or receive checksum offload off).
    Unchecked,
    /// The device checked the IPv4 header checksum and the TCP or UDP
    /// checksum, and both were right.
    Good,
    /// The device found a wrong IPv4 header or TCP/UDP checksum.
    Bad,
}

/// A received frame, in the driver's receive buffer.
#[derive(Clone, Copy, Debug)]
pub struct RxFrame<'a> {
    /// The Ethernet frame (no FCS).
    pub data: &'a [u8],
    pub csum: RxCsum,
    /// The receive-side-scaling hash the device computed, when it did.
    pub rss_hash: Option<u32>,
}

/// What the device is asked to do to a frame being sent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TxMeta {
    /// Fill the TCP or UDP checksum of an IPv4 frame.
    pub csum: bool,
    /// Cut a TCP/IPv4 frame into segments of this many payload bytes
    /// (implies `csum`).
    pub tso_mss: Option<u16>,
}

/// What a NIC offers; fixed once the driver is up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Caps {
    /// Transmit checksum offload (TCP and UDP over IPv4).
    pub csum: bool,
    /// TCP segmentation offload (IPv4).
    pub tso: bool,
    /// Received frames carry the device's checksum verdict ([`RxCsum`]).
    pub rx_csum: bool,
    /// IP MTU.
    pub mtu: usize,
    /// Largest frame [`TxRing::transmit`] takes, Ethernet header included
    /// (`mtu + ETH_HLEN` without TSO).
    pub max_frame: usize,
    /// Queue pairs.
    pub queues: usize,
}

/// The link as the device reports it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Link {
    pub up: bool,
    /// 10, 100 or 1000; 0 when down.
    pub speed_mbps: u32,
    pub full_duplex: bool,
}

/// Per-queue counters, since the queue was made.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub rx_frames: u64,
    pub tx_frames: u64,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    /// Frames the device flagged as errored (and not shown).
    pub rx_dropped: u64,
    /// Frames shown with [`RxCsum::Bad`].
    pub rx_bad_csum: u64,
    /// Frames taken by `transmit` and not sent (offload asked for a frame
    /// it does not apply to and the frame is too large without it).
    pub tx_dropped: u64,
    /// Descriptors the device wrote back in a way the driver refuses
    /// (length 0 or larger than the buffer, a frame spanning buffers):
    /// dropped.
    pub malformed: u64,
}

impl core::ops::Add for Counters {
    type Output = Counters;
    fn add(self, o: Counters) -> Counters {
        Counters {
            rx_frames: self.rx_frames + o.rx_frames,
            tx_frames: self.tx_frames + o.tx_frames,
            rx_bytes: self.rx_bytes + o.rx_bytes,
            tx_bytes: self.tx_bytes + o.tx_bytes,
            rx_dropped: self.rx_dropped + o.rx_dropped,
            rx_bad_csum: self.rx_bad_csum + o.rx_bad_csum,
            tx_dropped: self.tx_dropped + o.tx_dropped,
            malformed: self.malformed + o.malformed,
        }
    }
}

/// A receive ring (one core's).
pub trait RxRing {
    /// A frame is waiting (it may still turn out malformed and be dropped).
    fn has_frame(&self) -> bool;
    /// Lends the next frame to `f`, then gives its buffer back to the
    /// device; `None` (and `f` not called) when no frame is waiting.
    fn receive<R>(&mut self, f: impl FnOnce(RxFrame<'_>) -> R) -> Option<R>;
}

/// A transmit ring (one core's).
pub trait TxRing {
    /// A frame of MTU size could be sent now (reclaims first).
    fn can_transmit(&mut self) -> bool;
    /// Lets `f` write a frame of `len` bytes and sends it; `None` (and `f`
    /// not called) when there is no room or `len` is out of range.
    fn transmit<R>(
        &mut self,
        len: usize,
        meta: TxMeta,
        f: impl FnOnce(&mut [u8]) -> R,
    ) -> Option<R>;
    /// Takes back the buffers of frames the device has sent.
    fn reclaim(&mut self);
}

/// One core's share of a NIC: a receive ring and a transmit ring.
pub trait QueuePair {
    type Rx: RxRing;
    type Tx: TxRing;
    /// Both rings at once (smoltcp answers a received frame from inside
    /// the receive closure).
    fn split(&mut self) -> (&mut Self::Rx, &mut Self::Tx);
    /// Receive and transmit counters together.
    fn counters(&self) -> Counters;
}
