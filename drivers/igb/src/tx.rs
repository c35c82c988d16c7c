//! A transmit queue.
//!
//! A frame takes one data descriptor, preceded by a context descriptor
//! when an offload is asked for; `n - 1` descriptors at most are in use
//! (a full ring would look empty to the device). The frame is written by
//! the caller into the buffer of its first descriptor's slot (one buffer of
//! MTU size per slot), or, when larger (TSO), into one of a few 64 KiB
//! buffers set aside at start. Every data descriptor asks for a write-back
//! (RS); a frame's descriptors and buffer are taken back when its data
//! descriptor shows DD.

use crate::desc::{self, tx, TxData};
use crate::hal::{Hal, Mmio};
use crate::offload::{self, Prepared};
use crate::regs;
use crate::ring::{Buffers, DescRing};
use crate::Error;
use alloc::vec;
use alloc::vec::Vec;
use core::sync::atomic::{fence, Ordering};
use dioxide_nic::{Counters, TxMeta, TxRing};

/// Bytes of a TSO buffer.
pub const TSO_BUF: usize = 64 * 1024;

/// The largest frame the driver takes with TSO: one data descriptor's
/// DTALEN is 16 bits (a 65,536-byte frame would be written as length 0;
/// the model caught that). Its IPv4 packet, 65,521 bytes, fits IPv4's
/// 65,535.
pub const MAX_FRAME: usize = 0xffff;

/// Marks a slot's packet as using no TSO buffer.
const NO_TSO: u16 = u16::MAX;

/// What the queue was configured to do.
#[derive(Clone, Copy, Debug)]
pub(crate) struct TxSetup {
    pub index: usize,
    pub descs: usize,
    /// Buffer per slot: the largest frame without TSO.
    pub buf_size: usize,
    pub max_plain: usize,
    pub tso_bufs: usize,
}

/// One transmit queue, owned by one core.
pub struct TxQueue<M: Mmio> {
    mmio: M,
    setup: TxSetup,
    ring: DescRing,
    bufs: Buffers,
    tso: Option<Buffers>,
    tso_free: Vec<u16>,
    /// Per first slot of an in-flight frame: its data descriptor's slot,
    /// and its TSO buffer (or `NO_TSO`).
    frames: Vec<(u16, u16)>,
    /// Next slot to fill, oldest slot in flight, slots in flight.
    next: usize,
    clean: usize,
    used: usize,
    counters: Counters,
}

impl<M: Mmio> TxQueue<M> {
    pub(crate) fn new<H: Hal>(mmio: M, hal: &H, setup: TxSetup) -> Result<Self, Error> {
        let tso = match setup.tso_bufs {
            0 => None,
            k => Some(Buffers::new(hal, k, TSO_BUF)?),
        };
        Ok(TxQueue {
            mmio,
            ring: DescRing::new(hal, setup.descs)?,
            bufs: Buffers::new(hal, setup.descs, setup.buf_size)?,
            tso,
            tso_free: (0..setup.tso_bufs as u16).collect(),
            frames: vec![(0, NO_TSO); setup.descs],
            next: 0,
            clean: 0,
            used: 0,
            counters: Counters::default(),
            setup,
        })
    }

    /// Programs the queue's registers and enables it (TXDCTL.ENABLE read
    /// back within `deadline_ns`).
    pub(crate) fn start<H: Hal>(&mut self, hal: &H, deadline_ns: u64) -> Result<(), Error> {
        let q = self.setup.index;
        let m = &self.mmio;
        m.write32(regs::txdctl(q), 0);
        m.write32(regs::tdbal(q), self.ring.phys() as u32);
        m.write32(regs::tdbah(q), (self.ring.phys() >> 32) as u32);
        m.write32(regs::tdlen(q), (self.ring.len() * desc::DESC_LEN) as u32);
        m.write32(regs::tdh(q), 0);
        m.write32(regs::tdt(q), 0);
        // Write-back threshold 1: every RS descriptor is written back.
        m.write32(
            regs::txdctl(q),
            regs::dctl::ENABLE | regs::dctl::thresholds(8, 1, 1),
        );
        crate::device::wait(hal, deadline_ns, || {
            m.read32(regs::txdctl(q)) & regs::dctl::ENABLE != 0
        })
        .ok_or(Error::QueueEnableTimeout {
            queue: q,
            rx: false,
        })
    }

    pub fn index(&self) -> usize {
        self.setup.index
    }

    pub fn counters(&self) -> Counters {
        self.counters
    }

    /// Free descriptors.
    pub fn free(&self) -> usize {
        self.ring.len() - 1 - self.used
    }

    pub(crate) fn dma_regions(&self) -> impl Iterator<Item = &crate::hal::Dma> {
        [self.ring.dma(), self.bufs.dma()]
            .into_iter()
            .chain(self.tso.as_ref().map(|t| t.dma()))
    }

    /// The buffer for a frame of `len` bytes starting at slot `next`:
    /// `(TSO buffer or NO_TSO)`, `None` when none is free.
    fn pick_buffer(&mut self, len: usize) -> Option<u16> {
        if len <= self.bufs.size() {
            return Some(NO_TSO);
        }
        if len > MAX_FRAME {
            return None;
        }
        self.tso_free.pop()
    }

    /// The caller's frame, `len` bytes of its buffer.
    ///
    /// # Safety
    ///
    /// Slot `next` (and TSO buffer `t`) is not in flight.
    #[allow(clippy::mut_from_ref)]
    unsafe fn frame_mut(&self, t: u16, len: usize) -> &mut [u8] {
        match (&self.tso, t) {
            // SAFETY: the TSO buffer was just taken from the free list.
            (Some(b), t) if t != NO_TSO => unsafe { b.get_mut(usize::from(t), len) },
            // SAFETY: slot `next` is free (the caller checked `free()`).
            _ => unsafe { self.bufs.get_mut(self.next, len) },
        }
    }

    fn buffer_phys(&self, t: u16) -> u64 {
        match (&self.tso, t) {
            (Some(b), t) if t != NO_TSO => b.phys(usize::from(t)),
            _ => self.bufs.phys(self.next),
        }
    }

    fn release(&mut self, t: u16) {
        if t != NO_TSO {
            self.tso_free.push(t);
        }
    }

    /// Writes the frame's descriptors from slot `next` and moves the tail.
    fn post(&mut self, t: u16, len: usize, p: &Prepared) {
        let n = self.ring.len();
        let first = self.next;
        let mut i = first;
        if let Some(ctx) = p.ctx {
            self.ring.write(i, &ctx.encode());
            i = (i + 1) % n;
        }
        let data = TxData {
            addr: self.buffer_phys(t),
            len: len as u32,
            dcmd: tx::EOP | tx::IFCS | tx::RS | p.dcmd,
            popts: p.popts,
            idx: 0,
            paylen: p.paylen,
        };
        self.ring.write(i, &data.encode());
        self.frames[first] = (i as u16, t);
        self.used += (i + n - first) % n + 1;
        self.next = (i + 1) % n;
        // Descriptors and the frame reach memory before the device sees
        // the tail.
        fence(Ordering::SeqCst);
        self.mmio
            .write32(regs::tdt(self.setup.index), self.next as u32);
    }
}

impl<M: Mmio> TxRing for TxQueue<M> {
    fn can_transmit(&mut self) -> bool {
        self.reclaim();
        // With TSO the next frame may be a large one: while every TSO
        // buffer is in flight, say no rather than let the frame be written
        // and lost (smoltcp would count it sent); the device hands buffers
        // back as it sends.
        self.free() >= 2 && (self.tso.is_none() || !self.tso_free.is_empty())
    }

    fn transmit<R>(
        &mut self,
        len: usize,
        meta: TxMeta,
        f: impl FnOnce(&mut [u8]) -> R,
    ) -> Option<R> {
        self.reclaim();
        if len == 0 || self.free() < 2 {
            return None;
        }
        let t = self.pick_buffer(len)?;
        // SAFETY: slot `next` is free (free() >= 2) and `t` was free.
        let frame = unsafe { self.frame_mut(t, len) };
        let r = f(frame);
        match offload::prepare(frame, meta, self.setup.max_plain) {
            Ok(p) => {
                self.post(t, len, &p);
                self.counters.tx_frames += 1;
                self.counters.tx_bytes += len as u64;
            }
            Err(why) => {
                log::debug!(target: "igb", "queue {}: frame of {len} bytes not sent: {why:?}", self.setup.index);
                self.release(t);
                self.counters.tx_dropped += 1;
            }
        }
        Some(r)
    }

    fn reclaim(&mut self) {
        let n = self.ring.len();
        while self.used > 0 {
            let (end, t) = self.frames[self.clean];
            let end = usize::from(end) % n;
            if self.ring.read_word(end, 3) & tx::DD == 0 {
                break;
            }
            fence(Ordering::Acquire);
            self.release(t);
            self.used -= ((end + n - self.clean) % n + 1).min(self.used);
            self.clean = (end + 1) % n;
        }
    }
}
