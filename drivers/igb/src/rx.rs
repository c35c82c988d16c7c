//! A receive queue.
//!
//! Slot `i` of the ring always uses buffer `i`. Of the `n` slots, `n - 1`
//! belong to the device and one (the gap, at RDT) to the driver: the
//! device fills slots in order from RDH and stops before RDT. The driver
//! reads only `next`, the oldest slot it gave; when its write-back has DD,
//! the frame is lent to the caller, and afterwards the previous gap is
//! rewritten in read format and handed over by moving RDT onto the slot
//! just consumed, which becomes the new gap. A descriptor is rewritten
//! just before it is handed over, so anything the device wrote into a
//! slot it did not own is erased before the driver could read it.
//!
//! Write-backs are validated: a length of 0 or beyond the buffer, a
//! frame spanning buffers (no EOP; the driver's buffers hold any frame the
//! device accepts), and errored frames are dropped and counted.

use crate::desc::{self, rx, RxWb};
use crate::hal::{Hal, Mmio};
use crate::regs;
use crate::ring::{Buffers, DescRing};
use crate::Error;
use core::sync::atomic::{fence, Ordering};
use dioxide_nic::{Counters, RxCsum, RxFrame, RxRing};

/// One receive queue, owned by one core.
pub struct RxQueue<M: Mmio> {
    mmio: M,
    index: usize,
    ring: DescRing,
    bufs: Buffers,
    /// The oldest slot given to the device.
    next: usize,
    /// Skipping the rest of a frame that spans buffers (until its EOP).
    skipping: bool,
    counters: Counters,
}

impl<M: Mmio> RxQueue<M> {
    /// Allocates the ring and its buffers.
    pub(crate) fn new<H: Hal>(
        mmio: M,
        hal: &H,
        index: usize,
        n: usize,
        buf_size: usize,
    ) -> Result<Self, Error> {
        Ok(RxQueue {
            mmio,
            index,
            ring: DescRing::new(hal, n)?,
            bufs: Buffers::new(hal, n, buf_size)?,
            next: 0,
            skipping: false,
            counters: Counters::default(),
        })
    }

    /// Programs the queue's registers and enables it (RXDCTL.ENABLE read
    /// back within `deadline_ns`), then gives `n - 1` slots to the device.
    pub(crate) fn start<H: Hal>(&mut self, hal: &H, deadline_ns: u64) -> Result<(), Error> {
        let (q, n) = (self.index, self.ring.len());
        let m = &self.mmio;
        m.write32(regs::rxdctl(q), 0);
        m.write32(regs::rdbal(q), self.ring.phys() as u32);
        m.write32(regs::rdbah(q), (self.ring.phys() >> 32) as u32);
        m.write32(regs::rdlen(q), (n * desc::DESC_LEN) as u32);
        let bsize = (self.bufs.size() >> regs::srrctl::BSIZEPKT_SHIFT) as u32;
        let srrctl = (bsize & regs::srrctl::BSIZEPKT_MASK)
            | regs::srrctl::DESCTYPE_ADV_ONEBUF
            | regs::srrctl::DROP_EN;
        m.write32(regs::srrctl(q), srrctl);
        m.write32(regs::rdh(q), 0);
        m.write32(regs::rdt(q), 0);
        let enable = regs::dctl::ENABLE | regs::dctl::thresholds(8, 8, 4);
        m.write32(regs::rxdctl(q), enable);
        crate::device::wait(hal, deadline_ns, || {
            m.read32(regs::rxdctl(q)) & regs::dctl::ENABLE != 0
        })
        .ok_or(Error::QueueEnableTimeout { queue: q, rx: true })?;
        for i in 0..n - 1 {
            self.ring.write(i, &desc::rx_read(self.bufs.phys(i)));
        }
        fence(Ordering::SeqCst);
        m.write32(regs::rdt(q), (n - 1) as u32);
        Ok(())
    }

    pub fn index(&self) -> usize {
        self.index
    }

    pub fn counters(&self) -> Counters {
        self.counters
    }

    pub(crate) fn dma_regions(&self) -> [&crate::hal::Dma; 2] {
        [self.ring.dma(), self.bufs.dma()]
    }

    /// The status dword of slot `next`, DD set, or `None`.
    fn done(&self) -> Option<RxWb> {
        let status = self.ring.read_word(self.next, 2);
        if status & rx::DD == 0 {
            return None;
        }
        // The rest of the write-back is read after DD was seen set.
        fence(Ordering::Acquire);
        Some(RxWb::decode(&self.ring.read(self.next)))
    }

    /// Hands slot `next` back: the previous gap is rewritten and given,
    /// `next` becomes the gap (RDT points at it).
    fn give_back(&mut self) {
        let n = self.ring.len();
        let gap = (self.next + n - 1) % n;
        self.ring.write(gap, &desc::rx_read(self.bufs.phys(gap)));
        // Descriptor writes reach memory before the device sees the tail.
        fence(Ordering::SeqCst);
        self.mmio.write32(regs::rdt(self.index), self.next as u32);
        self.next = (self.next + 1) % n;
    }

    /// What to do with a write-back: `Some(len)` to show the frame.
    fn accept(&mut self, wb: &RxWb) -> Option<usize> {
        let eop = wb.status_error & rx::EOP != 0;
        if self.skipping || !eop {
            // A frame spanning buffers: dropped whole, counted once.
            if !self.skipping {
                self.counters.malformed += 1;
            }
            self.skipping = !eop;
            return None;
        }
        let len = usize::from(wb.length);
        if len == 0 || len > self.bufs.size() {
            self.counters.malformed += 1;
            return None;
        }
        if wb.status_error & rx::RXE != 0 {
            self.counters.rx_dropped += 1;
            return None;
        }
        Some(len)
    }
}

/// The device's checksum verdict from a write-back.
pub fn csum_of(status_error: u32) -> RxCsum {
    let ip_checked = status_error & rx::IPCS != 0;
    let l4_checked = status_error & rx::L4I != 0;
    let ip_bad = ip_checked && status_error & rx::IPE != 0;
    let l4_bad = l4_checked && status_error & rx::L4E != 0;
    match (ip_bad || l4_bad, ip_checked && l4_checked) {
        (true, _) => RxCsum::Bad,
        (false, true) => RxCsum::Good,
        (false, false) => RxCsum::Unchecked,
    }
}

/// The RSS hash, when the device computed one (RSS type not 0).
pub fn rss_of(wb: &RxWb) -> Option<u32> {
    (wb.pkt_info & rx::RSS_TYPE_MASK != 0).then_some(wb.rss_hash)
}

impl<M: Mmio> RxRing for RxQueue<M> {
    fn has_frame(&self) -> bool {
        self.ring.read_word(self.next, 2) & rx::DD != 0
    }

    fn receive<R>(&mut self, f: impl FnOnce(RxFrame<'_>) -> R) -> Option<R> {
        loop {
            let wb = self.done()?;
            let Some(len) = self.accept(&wb) else {
                self.give_back();
                continue;
            };
            let csum = csum_of(wb.status_error);
            if csum == RxCsum::Bad {
                self.counters.rx_bad_csum += 1;
            }
            // SAFETY: slot `next` has DD: the device is done with it and
            // gets it back only in `give_back`, after `f` returns.
            let data = unsafe { self.bufs.get(self.next, len) };
            let r = f(RxFrame {
                data,
                csum,
                rss_hash: rss_of(&wb),
            });
            self.counters.rx_frames += 1;
            self.counters.rx_bytes += len as u64;
            self.give_back();
            return Some(r);
        }
    }
}
