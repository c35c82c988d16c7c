//! A queue pair: one core's receive and transmit queues and their MSI-X
//! vector.
//!
//! Receive queue `i` and transmit queue `i` raise vector `i` (IVAR). The
//! vector auto-clears its cause (EIAC) and auto-masks itself (EIAM with
//! GPIE.EIAME) when it fires, so the handler's core polls the pair with the
//! interrupt off and calls [`Queue::enable_irq`] when the rings are empty;
//! [`Queue::disable_irq`] masks it for a core that polls all the time.
//! EIMS/EIMC are write-one-to-set/clear registers, so cores enabling and
//! disabling their own vectors never race on a read-modify-write.

use crate::hal::{Dma, Mmio};
use crate::regs;
use crate::rx::RxQueue;
use crate::tx::TxQueue;
use dioxide_nic::{Counters, QueuePair};

/// The interrupt of one queue pair.
pub struct Irq<M: Mmio> {
    mmio: M,
    vector: usize,
}

impl<M: Mmio> Irq<M> {
    pub(crate) fn new(mmio: M, vector: usize) -> Self {
        Irq { mmio, vector }
    }
}

/// One core's queue pair.
pub struct Queue<M: Mmio> {
    rx: RxQueue<M>,
    tx: TxQueue<M>,
    irq: Irq<M>,
}

impl<M: Mmio> Queue<M> {
    pub(crate) fn new(rx: RxQueue<M>, tx: TxQueue<M>, irq: Irq<M>) -> Self {
        Queue { rx, tx, irq }
    }

    /// The queue index (and RSS redirection target).
    pub fn index(&self) -> usize {
        self.rx.index()
    }

    /// The MSI-X table entry this pair's interrupt uses.
    pub fn vector(&self) -> usize {
        self.irq.vector
    }

    /// Unmasks the pair's vector (EIMS).
    pub fn enable_irq(&self) {
        self.irq.mmio.write32(regs::EIMS, 1 << self.irq.vector);
    }

    /// Masks the pair's vector (EIMC).
    pub fn disable_irq(&self) {
        self.irq.mmio.write32(regs::EIMC, 1 << self.irq.vector);
    }

    /// A received frame waits (see [`dioxide_nic::RxRing::has_frame`]).
    pub fn has_frame(&self) -> bool {
        dioxide_nic::RxRing::has_frame(&self.rx)
    }

    pub fn rx(&mut self) -> &mut RxQueue<M> {
        &mut self.rx
    }

    pub fn tx(&mut self) -> &mut TxQueue<M> {
        &mut self.tx
    }

    pub(crate) fn dma_regions(&self) -> impl Iterator<Item = &Dma> {
        self.rx
            .dma_regions()
            .into_iter()
            .chain(self.tx.dma_regions())
    }
}

impl<M: Mmio> QueuePair for Queue<M> {
    type Rx = RxQueue<M>;
    type Tx = TxQueue<M>;

    fn split(&mut self) -> (&mut RxQueue<M>, &mut TxQueue<M>) {
        (&mut self.rx, &mut self.tx)
    }

    fn counters(&self) -> Counters {
        self.rx.counters() + self.tx.counters()
    }
}
