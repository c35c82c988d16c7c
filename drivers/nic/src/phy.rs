//! A smoltcp `phy::Device` over any [`QueuePair`].
//!
//! The receive token borrows the pair's receive ring and the transmit
//! token its transmit ring ([`QueuePair::split`]), so smoltcp can answer a
//! frame from inside the receive closure while the frame stays in its DMA
//! buffer.
//!
//! Offloads, from [`Caps`] (the kernel's virtio-net device,
//! `kernel/src/drivers/virtio_net.rs`, does the same with its own):
//!
//! - transmit checksum offload: smoltcp is told not to compute TCP and UDP
//!   checksums (`Checksum::Rx` or `None`); every frame goes out with
//!   [`TxMeta::csum`], the driver and the device fill them. IPv4 header
//!   checksums are still smoltcp's (cheap, and needed for frames the
//!   device does not segment).
//! - TSO (`third_party/smoltcp/DIOXIDE.md`): `max_tso_size` is the largest
//!   IP packet [`Caps::max_frame`] allows, and a packet's
//!   `PacketMeta::gso_size` becomes [`TxMeta::tso_mss`].
//! - receive checksum offload: smoltcp verifies no IPv4, TCP or UDP
//!   checksums (`Checksum::Tx` or `None`); this adapter does instead, per
//!   frame: [`RxCsum::Good`] passes, [`RxCsum::Bad`] is dropped, and
//!   [`RxCsum::Unchecked`] is checked in software ([`csum::verify`]).
//!   ICMP checksums stay smoltcp's.
//!
//! A dropped frame is handed to smoltcp as an empty slice (smoltcp drops
//! it as malformed), because a token must call its closure. A transmit
//! token that finds no room after all (the ring filled, or a frame larger
//! than the device takes) lets smoltcp write into a scratch buffer made at
//! start and drops it.

use crate::{csum, Caps, QueuePair, RxCsum, RxRing, TxMeta, TxRing, ETH_HLEN};
use alloc::vec;
use alloc::vec::Vec;
use smoltcp::phy::{self, Checksum, DeviceCapabilities, Medium, PacketMeta};
use smoltcp::time::Instant;

/// What the adapter itself dropped or checked on receive.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RxStats {
    /// Frames the device flagged bad, dropped.
    pub hw_bad: u64,
    /// Frames checked here (the device did not).
    pub sw_checked: u64,
    /// Of those, found bad and dropped.
    pub sw_bad: u64,
}

/// What the adapter itself dropped or checked.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AdapterStats {
    pub rx: RxStats,
    /// Frames smoltcp wrote that the ring did not take.
    pub tx_lost: u64,
}

/// A [`QueuePair`] as a smoltcp device.
pub struct NicDevice<Q: QueuePair> {
    queue: Q,
    caps: Caps,
    rx_stats: RxStats,
    tx_lost: u64,
    scratch: Vec<u8>,
}

impl<Q: QueuePair> NicDevice<Q> {
    /// The device over `queue`, with the NIC's capabilities; the scratch
    /// buffer (`caps.max_frame` bytes) is made here.
    pub fn new(queue: Q, caps: Caps) -> Self {
        NicDevice {
            queue,
            caps,
            rx_stats: RxStats::default(),
            tx_lost: 0,
            scratch: vec![0; caps.max_frame.max(ETH_HLEN)],
        }
    }

    pub fn queue(&self) -> &Q {
        &self.queue
    }

    pub fn queue_mut(&mut self) -> &mut Q {
        &mut self.queue
    }

    pub fn stats(&self) -> AdapterStats {
        AdapterStats {
            rx: self.rx_stats,
            tx_lost: self.tx_lost,
        }
    }

    /// The queue pair back.
    pub fn into_inner(self) -> Q {
        self.queue
    }
}

/// The checksum behaviour smoltcp is told about (see the module's text).
pub fn checksum_caps(caps: &Caps) -> phy::ChecksumCapabilities {
    let mut c = phy::ChecksumCapabilities::default();
    let tx = caps.csum;
    let rx = caps.rx_csum;
    let l4 = match (tx, rx) {
        (true, true) => Checksum::None,
        (true, false) => Checksum::Rx,
        (false, true) => Checksum::Tx,
        (false, false) => Checksum::Both,
    };
    c.ipv4 = if rx { Checksum::Tx } else { Checksum::Both };
    c.tcp = l4;
    c.udp = l4;
    c.icmpv4 = Checksum::Both;
    c
}

/// smoltcp's view of a NIC with these capabilities.
pub fn device_caps(caps: &Caps) -> DeviceCapabilities {
    let mut c = DeviceCapabilities::default();
    c.medium = Medium::Ethernet;
    c.max_transmission_unit = caps.mtu + ETH_HLEN;
    if caps.tso && caps.csum {
        c.max_tso_size = caps.max_frame.saturating_sub(ETH_HLEN);
    }
    c.checksum = checksum_caps(caps);
    c
}

/// Lends a received frame to smoltcp.
pub struct RxToken<'a, R: RxRing> {
    rx: &'a mut R,
    rx_csum: bool,
    stats: &'a mut RxStats,
}

/// Sends one frame.
pub struct TxToken<'a, T: TxRing> {
    tx: &'a mut T,
    meta: TxMeta,
    tso: bool,
    lost: &'a mut u64,
    scratch: &'a mut [u8],
}

impl<Q: QueuePair> phy::Device for NicDevice<Q> {
    type RxToken<'a>
        = RxToken<'a, Q::Rx>
    where
        Q: 'a;
    type TxToken<'a>
        = TxToken<'a, Q::Tx>
    where
        Q: 'a;

    fn receive(&mut self, _ts: Instant) -> Option<(Self::RxToken<'_>, Self::TxToken<'_>)> {
        let (rx, tx) = self.queue.split();
        if !rx.has_frame() {
            return None;
        }
        Some((
            RxToken {
                rx,
                rx_csum: self.caps.rx_csum,
                stats: &mut self.rx_stats,
            },
            tx_token(tx, &self.caps, &mut self.tx_lost, &mut self.scratch),
        ))
    }

    fn transmit(&mut self, _ts: Instant) -> Option<Self::TxToken<'_>> {
        let (_, tx) = self.queue.split();
        if !tx.can_transmit() {
            return None;
        }
        Some(tx_token(
            tx,
            &self.caps,
            &mut self.tx_lost,
            &mut self.scratch,
        ))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        device_caps(&self.caps)
    }
}

fn tx_token<'a, T: TxRing>(
    tx: &'a mut T,
    caps: &Caps,
    lost: &'a mut u64,
    scratch: &'a mut [u8],
) -> TxToken<'a, T> {
    TxToken {
        tx,
        meta: TxMeta {
            csum: caps.csum,
            tso_mss: None,
        },
        tso: caps.tso && caps.csum,
        lost,
        scratch,
    }
}

impl<R: RxRing> phy::RxToken for RxToken<'_, R> {
    fn consume<T, F>(self, f: F) -> T
    where
        F: FnOnce(&[u8]) -> T,
    {
        let (rx_csum, stats) = (self.rx_csum, self.stats);
        let mut f = Some(f);
        let got = self.rx.receive(|frame| {
            let data = if !rx_csum {
                frame.data
            } else {
                checked(frame.data, frame.csum, stats)
            };
            f.take().map(|f| f(data))
        });
        match (got.flatten(), f) {
            (Some(r), _) => r,
            (None, Some(f)) => f(&[]),
            // The ring called the closure, which took `f` and returned
            // its result: `got` was `Some(Some(_))`.
            (None, None) => unreachable!("receive closure ran without a result"),
        }
    }
}

/// The frame if it passes the checksum rules of the module's text; an
/// empty slice (dropped by smoltcp) if not.
fn checked<'a>(data: &'a [u8], verdict: RxCsum, stats: &mut RxStats) -> &'a [u8] {
    match verdict {
        RxCsum::Good => data,
        RxCsum::Bad => {
            stats.hw_bad += 1;
            &[]
        }
        RxCsum::Unchecked => {
            stats.sw_checked += 1;
            if csum::verify(data) {
                data
            } else {
                stats.sw_bad += 1;
                &[]
            }
        }
    }
}

impl<T: TxRing> phy::TxToken for TxToken<'_, T> {
    fn consume<R, F>(self, len: usize, f: F) -> R
    where
        F: FnOnce(&mut [u8]) -> R,
    {
        let mut f = Some(f);
        let got = self
            .tx
            .transmit(len, self.meta, |buf| f.take().map(|f| f(buf)));
        match (got.flatten(), f) {
            (Some(r), _) => r,
            (None, Some(f)) => {
                *self.lost += 1;
                let n = len.min(self.scratch.len());
                f(&mut self.scratch[..n])
            }
            (None, None) => unreachable!("transmit closure ran without a result"),
        }
    }

    fn set_meta(&mut self, meta: PacketMeta) {
        if self.tso && meta.gso_size > 0 {
            self.meta.tso_mss = Some(meta.gso_size);
        }
    }
}
