//! A register-level software 82576, for tests and host tests of the layers
//! above, written from the datasheet and QEMU 10's `hw/net/igb_core.c`.
//!
//! [`Model`] implements [`Mmio`]: register reads and writes take effect at
//! once, as on the device:
//!
//! - CTRL.RST resets every register (the station address reloaded into
//!   RAL0/RAH0 with AV, EECD.AUTO_RD set) and reads back set for
//!   [`ModelConfig::reset_ns`] of model time (forever with
//!   [`ModelConfig::reset_never_completes`]); STATUS.LU is clear after
//!   reset, as on QEMU.
//! - MDIC reaches a clause-22 PHY at address 1 (other addresses: MDIC.E);
//!   writing BMCR with ANENABLE|ANRESTART takes the link down and brings it
//!   up [`ModelConfig::autoneg_ns`] later (QEMU: 500 ms) if the cable is
//!   in ([`Model::set_cable`]), with ICR.LSC.
//! - Interrupts: queue causes go through IVAR to EICR bits, the "other"
//!   causes (ICR & IMS) through IVAR_MISC; a vector fires when its EICR
//!   bit is set and unmasked in EIMS, then EIAC clears the cause and EIAM
//!   (with GPIE.EIAME) masks it; [`Model::fired`] counts. IVAR writes made
//!   before GPIE.MSIX_MODE are refused ([`Model::ivar_refused`]), as the
//!   82576 is said to lose them (Linux's igb: "or our settings won't
//!   stick"); QEMU itself keeps them (see the crate's text).
//! - Statistics registers (GPRC, GPTC, GORC, GOTC, MPC, RNBC, TPR, TPT,
//!   TSCTC) count and clear on read.
//!
//! The model owns the DMA side: [`Model::step`] transmits what the
//! transmit rings hold (context and data descriptors, checksum insertion,
//! TSO segmentation as the datasheet describes: see `offload.rs`) into
//! [`Model::take_wire`], and receives the frames given to
//! [`Model::inject`] into the receive rings (queue chosen by the Toeplitz
//! hash and RETA when MRQC enables RSS and RXCSUM.PCSD is set, as on QEMU;
//! advanced write-backs with length, RSS hash and type, DD/EOP and the
//! checksum verdict when RXCSUM asks). Every DMA access is checked against
//! the regions [`ModelHal`] handed out; a driver mistake the model notices
//! (DMA outside them, a PAYLEN that disagrees with the frame, a
//! descriptor of unknown type) is recorded in [`Model::errors`].
//!
//! Faults ([`Fault`]) make the next received frame's write-back malformed.

mod hal;
mod rx;
mod tx;

pub use hal::{ModelHal, PHYS_OFFSET};

use crate::hal::Mmio;
use crate::regs::{self, ctrl, gpie, mdic, phy, status};
use hal::DmaPort;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

/// Register space: 128 KiB.
const REG_WORDS: usize = 0x8000;

/// How the model behaves.
#[derive(Clone, Copy, Debug)]
pub struct ModelConfig {
    /// The station address loaded at reset.
    pub mac: [u8; 6],
    /// Model time CTRL.RST stays set.
    pub reset_ns: u64,
    pub reset_never_completes: bool,
    /// Model time from an auto-negotiation restart to link up.
    pub autoneg_ns: u64,
    /// RAH0.AV after reset (false: an unprogrammed EEPROM).
    pub mac_valid: bool,
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig {
            mac: [0x52, 0x54, 0x00, 0x12, 0x34, 0x56],
            reset_ns: 1_000_000,
            reset_never_completes: false,
            autoneg_ns: 500_000_000,
            mac_valid: true,
        }
    }
}

/// A malformed receive write-back, applied to the next injected frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Length 0 written back (DD, EOP).
    ZeroLength,
    /// A length beyond the receive buffer.
    TooLong,
    /// The frame's first descriptor written without EOP, the rest of it
    /// in the next descriptor (a frame spanning buffers).
    SplitFrame,
    /// The frame written into one descriptor without EOP: the next
    /// frame's descriptor then reads as its end.
    NoEop,
    /// The frame written back normally, and DD|EOP also written into the
    /// slot at RDT, which the driver has not given.
    DdOnGap,
    /// The frame written back with RXE (receive error).
    RxError,
}

/// Per transmit queue: the two context slots and a frame being gathered.
#[derive(Clone, Default)]
pub(crate) struct TxState {
    pub(crate) ctx: [[u8; 16]; 2],
    pub(crate) frags: Vec<u8>,
    pub(crate) first: Option<[u8; 16]>,
}

pub(crate) struct State {
    pub(crate) cfg: ModelConfig,
    pub(crate) regs: Vec<u32>,
    pub(crate) phy: [u16; 32],
    reset_until: u64,
    autoneg_at: Option<u64>,
    cable: bool,
    pub(crate) tx: Vec<TxState>,
    pub(crate) pending: VecDeque<Vec<u8>>,
    pub(crate) wire: VecDeque<Vec<u8>>,
    pub(crate) faults: VecDeque<Fault>,
    pub(crate) fired: [u64; 32],
    pub(crate) ivar_refused: u64,
    pub(crate) errors: Vec<String>,
    /// Queue each received frame went to, in order.
    pub(crate) delivered: Vec<usize>,
}

/// The software 82576; clones reach the same device.
#[derive(Clone)]
pub struct Model {
    state: Arc<Mutex<State>>,
    hal: ModelHal,
    dma: DmaPort,
}

impl Model {
    /// A powered-on device (registers as after a reset, the cable in, the
    /// link down until auto-negotiation) and the HAL whose memory it reads.
    pub fn new(cfg: ModelConfig) -> (Model, ModelHal) {
        let hal = ModelHal::default();
        let mut st = State {
            cfg,
            regs: vec![0; REG_WORDS],
            phy: [0; 32],
            reset_until: 0,
            autoneg_at: None,
            cable: true,
            tx: vec![TxState::default(); regs::DEVICE_QUEUES],
            pending: VecDeque::new(),
            wire: VecDeque::new(),
            faults: VecDeque::new(),
            fired: [0; 32],
            ivar_refused: 0,
            errors: Vec::new(),
            delivered: Vec::new(),
        };
        st.reset(0);
        let dma = DmaPort {
            regions: hal.regions.clone(),
        };
        let model = Model {
            state: Arc::new(Mutex::new(st)),
            hal: hal.clone(),
            dma,
        };
        (model, hal)
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        // A test that panicked while holding the lock poisons it; the state
        // is still what it was, which is what the next look wants.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn now(&self) -> u64 {
        self.hal.now()
    }

    /// A register's value without a read's side effects.
    pub fn reg(&self, off: usize) -> u32 {
        self.lock().regs[off / 4 % REG_WORDS]
    }

    /// Queues a frame (an Ethernet frame without FCS) for reception.
    pub fn inject(&self, frame: &[u8]) {
        self.lock().pending.push_back(frame.to_vec());
    }

    /// Frames transmitted so far, oldest first.
    pub fn take_wire(&self) -> Vec<Vec<u8>> {
        self.lock().wire.drain(..).collect()
    }

    /// Makes the next received frame's write-back malformed.
    pub fn fault(&self, f: Fault) {
        self.lock().faults.push_back(f);
    }

    /// Times MSI-X vector `v` fired.
    pub fn fired(&self, v: usize) -> u64 {
        self.lock().fired.get(v).copied().unwrap_or(0)
    }

    /// IVAR writes refused for coming before GPIE.MSIX_MODE.
    pub fn ivar_refused(&self) -> u64 {
        self.lock().ivar_refused
    }

    /// Driver mistakes the model noticed.
    pub fn errors(&self) -> Vec<String> {
        self.lock().errors.clone()
    }

    /// The queue each received frame went to, in order (drained).
    pub fn take_delivered(&self) -> Vec<usize> {
        std::mem::take(&mut self.lock().delivered)
    }

    /// Plugs the cable in or out: the link follows at once (a plug-in
    /// with auto-negotiation enabled comes up after it completes).
    pub fn set_cable(&self, plugged: bool) {
        let now = self.now();
        let mut st = self.lock();
        st.cable = plugged;
        if plugged {
            st.autoneg_at = Some(now + st.cfg.autoneg_ns);
        } else {
            st.autoneg_at = None;
            st.set_link(false);
        }
    }

    /// Runs the device: the link timer, every transmit ring, then every
    /// frame waiting for reception.
    pub fn step(&self) {
        let now = self.now();
        let mut st = self.lock();
        st.tick(now);
        for q in 0..regs::DEVICE_QUEUES {
            tx::run(&mut st, &self.dma, q);
        }
        while let Some(frame) = st.pending.pop_front() {
            rx::receive(&mut st, &self.dma, &frame);
        }
    }
}

impl Mmio for Model {
    fn read32(&self, off: usize) -> u32 {
        let now = self.now();
        self.lock().read(off, now)
    }

    fn write32(&self, off: usize, v: u32) {
        let now = self.now();
        self.lock().write(off, v, now)
    }
}

/// Registers that clear when read.
const CLEAR_ON_READ: [usize; 14] = [
    regs::ICR,
    regs::EICR,
    regs::stats::CRCERRS,
    regs::stats::MPC,
    regs::stats::RNBC,
    regs::stats::GPRC,
    regs::stats::GPTC,
    regs::stats::GORCL,
    regs::stats::GORCH,
    regs::stats::GOTCL,
    regs::stats::GOTCH,
    regs::stats::TPR,
    regs::stats::TPT,
    regs::stats::TSCTC,
];

impl State {
    pub(crate) fn r(&self, off: usize) -> u32 {
        self.regs[off / 4 % REG_WORDS]
    }

    pub(crate) fn set(&mut self, off: usize, v: u32) {
        self.regs[off / 4 % REG_WORDS] = v;
    }

    pub(crate) fn add(&mut self, off: usize, n: u32) {
        let v = self.r(off).saturating_add(n);
        self.set(off, v);
    }

    /// Adds to a 64-bit counter kept in two registers.
    pub(crate) fn add64(&mut self, lo: usize, hi: usize, n: u64) {
        let v = (u64::from(self.r(hi)) << 32 | u64::from(self.r(lo))).saturating_add(n);
        self.set(lo, v as u32);
        self.set(hi, (v >> 32) as u32);
    }

    fn reset(&mut self, now: u64) {
        self.regs.iter_mut().for_each(|r| *r = 0);
        self.tx.iter_mut().for_each(|t| *t = TxState::default());
        let m = self.cfg.mac;
        self.set(regs::RAL0, u32::from_le_bytes([m[0], m[1], m[2], m[3]]));
        let av = if self.cfg.mac_valid { regs::rah::AV } else { 0 };
        self.set(regs::RAH0, u32::from(m[4]) | u32::from(m[5]) << 8 | av);
        self.set(regs::CTRL, ctrl::FD | 2 << 8);
        self.set(regs::EECD, regs::eecd::AUTO_RD | 1 << 8);
        self.set(regs::RXCSUM, regs::rxcsum::IPOFLD | regs::rxcsum::TUOFLD);
        self.set(regs::rxdctl(0), regs::dctl::ENABLE);
        self.set(regs::txdctl(0), regs::dctl::ENABLE);
        self.phy = [0; 32];
        self.phy[phy::BMCR as usize] = phy::BMCR_ANENABLE | 0x0140;
        self.phy[phy::BMSR as usize] = 0x7949;
        self.phy[phy::PHYID1 as usize] = 0x02a8;
        self.phy[phy::PHYID2 as usize] = 0x0391;
        self.autoneg_at = None;
        self.reset_until = if self.cfg.reset_never_completes {
            u64::MAX
        } else {
            now + self.cfg.reset_ns
        };
    }

    /// Link timer: auto-negotiation completes.
    fn tick(&mut self, now: u64) {
        if let Some(at) = self.autoneg_at {
            if now >= at && self.cable {
                self.autoneg_at = None;
                self.set_link(true);
            }
        }
    }

    fn set_link(&mut self, up: bool) {
        let old = self.r(regs::STATUS);
        let s = if up {
            status::LU | status::FD | 2 << status::SPEED_SHIFT
        } else {
            0
        };
        self.set(regs::STATUS, s);
        let bmsr = &mut self.phy[phy::BMSR as usize];
        let bits = phy::BMSR_LSTATUS | phy::BMSR_ANEGCOMPLETE;
        *bmsr = if up { *bmsr | bits } else { *bmsr & !bits };
        if old != s {
            self.raise_other(regs::icr::LSC);
        }
    }

    fn read(&mut self, off: usize, now: u64) -> u32 {
        self.tick(now);
        let v = self.r(off);
        match off {
            regs::CTRL if now < self.reset_until => v | ctrl::RST,
            o if CLEAR_ON_READ.contains(&o) => {
                self.set(o, 0);
                v
            }
            _ => v,
        }
    }

    fn write(&mut self, off: usize, v: u32, now: u64) {
        match off {
            regs::CTRL => {
                self.set(regs::CTRL, v & !ctrl::RST);
                if v & ctrl::RST != 0 {
                    self.reset(now);
                }
            }
            regs::MDIC => self.mdic(v, now),
            regs::STATUS | regs::EECD => {}
            o if (regs::IVAR0..regs::IVAR0 + 32).contains(&o) => {
                if self.r(regs::GPIE) & gpie::MSIX_MODE == 0 {
                    self.ivar_refused += 1;
                } else {
                    self.set(o, v);
                }
            }
            regs::EIMS => {
                let m = self.r(regs::EIMS) | v;
                self.set(regs::EIMS, m);
                self.deliver();
            }
            regs::EIMC => {
                let m = self.r(regs::EIMS) & !v;
                self.set(regs::EIMS, m);
            }
            regs::EICS => self.raise(v),
            regs::EICR => {
                let c = self.r(regs::EICR) & !v;
                self.set(regs::EICR, c);
            }
            regs::IMS => {
                let m = self.r(regs::IMS) | v;
                self.set(regs::IMS, m);
            }
            regs::IMC => {
                let m = self.r(regs::IMS) & !v;
                self.set(regs::IMS, m);
            }
            _ => self.set(off, v),
        }
    }

    /// One MDIC access, completed at once.
    fn mdic(&mut self, v: u32, now: u64) {
        let reg = ((v >> mdic::REG_SHIFT) & 0x1f) as usize;
        let addr = (v >> mdic::PHY_SHIFT) & 0x1f;
        let data = (v & mdic::DATA_MASK) as u16;
        let mut out = v & !(mdic::DATA_MASK | mdic::ERROR);
        if addr != mdic::PHY_ADDR {
            out |= mdic::ERROR;
        } else if v & mdic::OP_READ != 0 {
            out |= u32::from(self.phy[reg]);
        } else if v & mdic::OP_WRITE != 0 {
            self.phy_write(reg, data, now);
            out |= u32::from(data);
        }
        self.set(regs::MDIC, out | mdic::READY);
    }

    fn phy_write(&mut self, reg: usize, data: u16, now: u64) {
        if reg != phy::BMCR as usize {
            self.phy[reg] = data;
            return;
        }
        self.phy[reg] = data & !(phy::BMCR_ANRESTART | phy::BMCR_RESET);
        let restart = data & phy::BMCR_ANRESTART != 0 && data & phy::BMCR_ANENABLE != 0;
        if restart {
            self.set_link(false);
            self.autoneg_at = Some(now + self.cfg.autoneg_ns);
        }
    }

    /// The EICR bit of an IVAR entry (`None` if not valid).
    fn ivar_bit(entry: u32) -> Option<u32> {
        (entry & regs::ivar::VALID != 0).then(|| 1 << (entry & 0x1f))
    }

    /// A queue's cause: receive (`tx` false) or transmit of queue `q`.
    pub(crate) fn raise_queue(&mut self, q: usize, tx: bool) {
        let (n, shift) = if tx {
            regs::ivar::tx(q)
        } else {
            regs::ivar::rx(q)
        };
        let entry = (self.r(regs::ivar(n)) >> shift) & 0xff;
        if let Some(bit) = Self::ivar_bit(entry) {
            self.raise(bit);
        }
    }

    fn raise_other(&mut self, cause: u32) {
        let icr = self.r(regs::ICR) | cause;
        self.set(regs::ICR, icr);
        if icr & self.r(regs::IMS) == 0 || self.r(regs::GPIE) & gpie::MSIX_MODE == 0 {
            return;
        }
        let entry = (self.r(regs::IVAR_MISC) >> regs::ivar::MISC_OTHER_SHIFT) & 0xff;
        if let Some(bit) = Self::ivar_bit(entry) {
            self.raise(bit);
        }
    }

    fn raise(&mut self, bits: u32) {
        let c = self.r(regs::EICR) | bits;
        self.set(regs::EICR, c);
        self.deliver();
    }

    /// Fires every vector whose cause is set and unmasked.
    fn deliver(&mut self) {
        let due = self.r(regs::EICR) & self.r(regs::EIMS);
        for v in (0..32).filter(|v| due & 1 << v != 0) {
            self.fired[v] += 1;
        }
        let clear = due & self.r(regs::EIAC);
        let c = self.r(regs::EICR) & !clear;
        self.set(regs::EICR, c);
        if self.r(regs::GPIE) & gpie::EIAME != 0 {
            let m = self.r(regs::EIMS) & !(due & self.r(regs::EIAM));
            self.set(regs::EIMS, m);
        }
    }
}
