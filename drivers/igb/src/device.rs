//! Bring-up and the device-wide part of the driver (82576 datasheet 4.5,
//! 4.6): reset, station address, link, interrupts, RSS, and the start of
//! every queue pair.
//!
//! Order, as the datasheet's initialization sequence and Linux's igb have
//! it: interrupts masked; CTRL.RST and wait for it to clear; interrupts
//! masked again (reset unmasks nothing, but the cause registers are
//! cleared); EEPROM auto-read done (EECD.AUTO_RD; QEMU never sets it, so
//! its absence is only logged, as Linux does); station address from
//! RAL0/RAH0; link (CTRL.SLU, then PHY auto-negotiation restarted through
//! MDIC, then STATUS.LU awaited: QEMU's reset clears STATUS.LU and only a
//! restart of auto-negotiation brings it back, 500 ms of virtual time
//! later); GPIE before any IVAR; queues; RSS; receive and transmit enabled.

use crate::hal::{Hal, Mmio};
use crate::queue::{Irq, Queue};
use crate::regs::{self, ctrl, gpie, ivar, mdic, phy, rctl, rxcsum, status};
use crate::rss;
use crate::rx::RxQueue;
use crate::tx::{TxQueue, TxSetup, MAX_FRAME};
use crate::Error;
use alloc::vec::Vec;
use dioxide_nic::{Caps, Link, ETH_HLEN};

/// Queue pairs the driver sets up at most: one MSI-X vector each plus one
/// for link changes fits the 82576's 10 vectors (Linux's igb takes 8 too;
/// the device has 16 queues, which only VMDq pools reach).
pub const MAX_QUEUES: usize = 8;

/// Waits until `done` or `deadline_ns` from now; `None` on timeout.
pub(crate) fn wait<H: Hal>(hal: &H, timeout_ns: u64, mut done: impl FnMut() -> bool) -> Option<()> {
    let end = hal.now_ns().saturating_add(timeout_ns);
    loop {
        if done() {
            return Some(());
        }
        if hal.now_ns() > end {
            return None;
        }
        hal.relax();
    }
}

/// How to set the device up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// Queue pairs (1 to [`MAX_QUEUES`]; more is clamped, with a warning).
    pub queues: usize,
    /// Descriptors per receive / transmit ring (8 to 4096, multiples of 8).
    pub rx_descs: usize,
    pub tx_descs: usize,
    /// Receive buffer bytes (a multiple of 1024, at least the largest
    /// frame: MTU + 18).
    pub rx_buf: usize,
    /// IP MTU (1500; up to 9216 with jumbo frames).
    pub mtu: usize,
    /// Transmit checksum offload.
    pub csum: bool,
    /// TCP segmentation offload (needs `csum`).
    pub tso: bool,
    /// 64 KiB TSO buffers per transmit queue.
    pub tso_bufs: usize,
    /// Receive checksum offload (RXCSUM.IPOFLD, TUOFLD).
    pub rx_csum: bool,
    /// Interrupt moderation interval in µs (EITR; 0: none).
    pub itr_us: u32,
    /// How long to wait for the link after restarting auto-negotiation;
    /// the driver comes up with the link down if it takes longer.
    pub link_timeout_ns: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            queues: 1,
            rx_descs: 256,
            tx_descs: 256,
            rx_buf: 2048,
            mtu: 1500,
            csum: true,
            tso: true,
            tso_bufs: 16,
            rx_csum: true,
            itr_us: 50,
            link_timeout_ns: 5_000_000_000,
        }
    }
}

/// Reset must complete within this (the datasheet: about 1 ms after
/// CTRL.RST; QEMU at once).
const RESET_TIMEOUT_NS: u64 = 100_000_000;
/// EEPROM auto-read: Linux waits 10 ms.
const AUTO_RD_TIMEOUT_NS: u64 = 10_000_000;
/// One MDIC access (Linux polls 1,920 times 50 µs).
const MDIC_TIMEOUT_NS: u64 = 100_000_000;
/// A queue's ENABLE bit to read back (Linux: 10 ms).
const QUEUE_TIMEOUT_NS: u64 = 10_000_000;

impl Config {
    /// Checks the configuration; the queue count clamped.
    fn checked(mut self) -> Result<Config, Error> {
        let ring_ok = |n: usize| (8..=4096).contains(&n) && n.is_multiple_of(8);
        if self.queues == 0 {
            return Err(Error::BadConfig("no queues"));
        }
        if self.queues > MAX_QUEUES {
            log::warn!(target: "igb", "{} queues asked, {MAX_QUEUES} set up", self.queues);
            self.queues = MAX_QUEUES;
        }
        if !ring_ok(self.rx_descs) || !ring_ok(self.tx_descs) {
            return Err(Error::BadConfig("ring sizes: 8 to 4096, multiples of 8"));
        }
        if !(68..=9216).contains(&self.mtu) {
            return Err(Error::BadConfig("MTU: 68 to 9216"));
        }
        let kib = self.rx_buf / 1024;
        if !self.rx_buf.is_multiple_of(1024)
            || !(1..=16).contains(&kib)
            || self.rx_buf < self.max_plain() + 4
        {
            return Err(Error::BadConfig(
                "receive buffer: KiB multiple holding MTU + 18 bytes",
            ));
        }
        if self.tso && !self.csum {
            return Err(Error::BadConfig("TSO needs checksum offload"));
        }
        if self.itr_us > regs::eitr::INTERVAL_MAX_US {
            return Err(Error::BadConfig("interrupt interval above 8191 µs"));
        }
        Ok(self)
    }

    /// The largest frame sent or taken without TSO.
    fn max_plain(&self) -> usize {
        self.mtu + ETH_HLEN
    }

    fn tso_on(&self) -> bool {
        self.tso && self.tso_bufs > 0
    }
}

/// Device statistics, accumulated from the clear-on-read registers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub gprc: u64,
    pub gptc: u64,
    pub gorc: u64,
    pub gotc: u64,
    pub mpc: u64,
    pub rnbc: u64,
    pub crcerrs: u64,
    pub roc: u64,
    pub tpr: u64,
    pub tpt: u64,
    pub tsctc: u64,
}

/// The device: what is shared by the queues, kept by the core that sets it
/// up (link state, statistics, the "other" interrupt).
pub struct Igb<M: Mmio, H: Hal> {
    mmio: M,
    hal: H,
    config: Config,
    mac: [u8; 6],
    link: Link,
    stats: Stats,
}

impl<M: Mmio, H: Hal> Igb<M, H> {
    /// Resets and sets up the device; returns it and its queue pairs
    /// (queue `i` on MSI-X vector `i`, link changes on vector
    /// `config.queues`; every queue's interrupt masked, the link's
    /// enabled).
    pub fn new(mmio: M, hal: H, config: Config) -> Result<(Self, Vec<Queue<M>>), Error> {
        let config = config.checked()?;
        let mut dev = Igb {
            mmio,
            hal,
            config,
            mac: [0; 6],
            link: Link::default(),
            stats: Stats::default(),
        };
        dev.reset()?;
        dev.mac = dev.read_mac()?;
        dev.link = dev.bring_link_up()?;
        dev.setup_interrupts();
        let queues = dev.make_queues()?;
        dev.setup_rss();
        dev.enable_rx_tx();
        // The kernel logs the device's line (MAC, link, queues, offloads).
        log::debug!(
            target: "igb",
            "up: {} queue pairs, link {}",
            dev.config.queues,
            if dev.link.up { "up" } else { "down" }
        );
        Ok((dev, queues))
    }

    fn r(&self, off: usize) -> u32 {
        self.mmio.read32(off)
    }

    fn w(&self, off: usize, v: u32) {
        self.mmio.write32(off, v)
    }

    fn mask_interrupts(&self) {
        self.w(regs::EIMC, u32::MAX);
        self.w(regs::IMC, u32::MAX);
        let _ = self.r(regs::ICR);
        let _ = self.r(regs::EICR);
    }

    /// Global reset, waited for with a deadline.
    fn reset(&self) -> Result<(), Error> {
        self.mask_interrupts();
        self.w(regs::RCTL, 0);
        self.w(regs::TCTL, regs::tctl::PSP);
        self.w(regs::CTRL, self.r(regs::CTRL) | ctrl::RST);
        wait(&self.hal, RESET_TIMEOUT_NS, || {
            self.r(regs::CTRL) & ctrl::RST == 0
        })
        .ok_or(Error::ResetTimeout)?;
        self.mask_interrupts();
        let auto_rd = wait(&self.hal, AUTO_RD_TIMEOUT_NS, || {
            self.r(regs::EECD) & regs::eecd::AUTO_RD != 0
        });
        if auto_rd.is_none() {
            log::debug!(target: "igb", "EEPROM auto-read not reported done (QEMU never does)");
        }
        let ext = self.r(regs::CTRL_EXT);
        self.w(regs::CTRL_EXT, ext | regs::ctrl_ext::DRV_LOAD);
        Ok(())
    }

    fn read_mac(&self) -> Result<[u8; 6], Error> {
        let (lo, hi) = (self.r(regs::RAL0), self.r(regs::RAH0));
        if hi & regs::rah::AV == 0 {
            return Err(Error::NoMacAddress);
        }
        let [a, b, c, d] = lo.to_le_bytes();
        let [e, f, _, _] = hi.to_le_bytes();
        let mac = [a, b, c, d, e, f];
        if mac == [0; 6] || a & 1 != 0 {
            return Err(Error::BadMacAddress(mac));
        }
        Ok(mac)
    }

    /// One PHY register access; `data` for a write, `None` to read.
    fn mdic(&self, reg: u32, data: Option<u16>) -> Result<u16, Error> {
        let op = match data {
            Some(_) => mdic::OP_WRITE,
            None => mdic::OP_READ,
        };
        let cmd = u32::from(data.unwrap_or(0))
            | reg << mdic::REG_SHIFT
            | mdic::PHY_ADDR << mdic::PHY_SHIFT
            | op;
        self.w(regs::MDIC, cmd);
        let mut v = 0;
        wait(&self.hal, MDIC_TIMEOUT_NS, || {
            v = self.r(regs::MDIC);
            v & mdic::READY != 0
        })
        .ok_or(Error::MdicTimeout { reg })?;
        if v & mdic::ERROR != 0 {
            return Err(Error::MdicError { reg });
        }
        Ok((v & mdic::DATA_MASK) as u16)
    }

    /// Link: MAC side up (SLU, speed and duplex from the PHY), the PHY
    /// advertising everything and auto-negotiating again, then STATUS.LU
    /// awaited for `link_timeout_ns` (a link still down is not an error).
    fn bring_link_up(&self) -> Result<Link, Error> {
        let c = self.r(regs::CTRL) & !(ctrl::FRCSPD | ctrl::FRCDPX | ctrl::PHY_RST);
        self.w(regs::CTRL, c | ctrl::SLU);
        let id = (u32::from(self.mdic(phy::PHYID1, None)?) << 16)
            | u32::from(self.mdic(phy::PHYID2, None)?);
        log::debug!(target: "igb", "PHY id {id:#010x}");
        self.mdic(phy::ANAR, Some(phy::ANAR_ALL))?;
        self.mdic(phy::CTRL1000, Some(phy::CTRL1000_ALL))?;
        self.mdic(phy::BMCR, Some(phy::BMCR_ANENABLE | phy::BMCR_ANRESTART))?;
        let up = wait(&self.hal, self.config.link_timeout_ns, || {
            self.r(regs::STATUS) & status::LU != 0
        });
        if up.is_none() {
            log::warn!(target: "igb", "link still down after auto-negotiation");
        }
        Ok(self.link())
    }

    /// The link as STATUS says now.
    pub fn link(&self) -> Link {
        let s = self.r(regs::STATUS);
        let up = s & status::LU != 0;
        let speed = match (s & status::SPEED_MASK) >> status::SPEED_SHIFT {
            0 => 10,
            1 => 100,
            _ => 1000,
        };
        Link {
            up,
            speed_mbps: if up { speed } else { 0 },
            full_duplex: up && s & status::FD != 0,
        }
    }

    /// MSI-X: GPIE first (IVAR written before MSI-X mode does not stick on
    /// the 82576, as Linux's igb notes), then the "other" vector, each
    /// queue pair's vector and its moderation, auto-clear and auto-mask of
    /// the queue vectors, and the link interrupt enabled.
    fn setup_interrupts(&self) {
        let nq = self.config.queues;
        self.w(
            regs::GPIE,
            gpie::MSIX_MODE | gpie::EIAME | gpie::PBA_SUPPORT | gpie::NSICR,
        );
        let other = nq as u32;
        self.w(
            regs::IVAR_MISC,
            (other | ivar::VALID) << ivar::MISC_OTHER_SHIFT,
        );
        for n in 0..8 {
            self.w(regs::ivar(n), 0);
        }
        for q in 0..nq {
            let v = q as u32 | ivar::VALID;
            let (rn, rs) = ivar::rx(q);
            let (tn, ts) = ivar::tx(q);
            self.w(regs::ivar(rn), self.r(regs::ivar(rn)) | v << rs);
            self.w(regs::ivar(tn), self.r(regs::ivar(tn)) | v << ts);
        }
        let itr = (self.config.itr_us << regs::eitr::INTERVAL_SHIFT) | regs::eitr::CNT_IGNR;
        for v in 0..=nq {
            self.w(regs::eitr(v), itr);
        }
        let queue_bits = (1u32 << nq) - 1;
        self.w(regs::EIAC, queue_bits);
        self.w(regs::EIAM, queue_bits);
        self.w(regs::IMS, regs::icr::LSC);
        self.w(regs::EIMS, 1 << other);
    }

    fn make_queues(&self) -> Result<Vec<Queue<M>>, Error> {
        let c = &self.config;
        let tx_buf = c.max_plain().div_ceil(1024) * 1024;
        let mut queues = Vec::with_capacity(c.queues);
        for q in 0..c.queues {
            let mut rx = RxQueue::new(self.mmio.clone(), &self.hal, q, c.rx_descs, c.rx_buf)?;
            let setup = TxSetup {
                index: q,
                descs: c.tx_descs,
                buf_size: tx_buf,
                max_plain: c.max_plain(),
                tso_bufs: if c.tso_on() { c.tso_bufs } else { 0 },
            };
            let mut tx = TxQueue::new(self.mmio.clone(), &self.hal, setup)?;
            rx.start(&self.hal, QUEUE_TIMEOUT_NS)?;
            tx.start(&self.hal, QUEUE_TIMEOUT_NS)?;
            queues.push(Queue::new(rx, tx, Irq::new(self.mmio.clone(), q)));
        }
        Ok(queues)
    }

    /// RSS over the queues with Microsoft's key, hashing IPv4 and
    /// TCP/IPv4; RXCSUM.PCSD so that descriptors carry the hash (QEMU
    /// computes RSS only with PCSD set), plus checksum offload if asked.
    fn setup_rss(&self) {
        let table = rss::reta(self.config.queues);
        for (n, chunk) in table.chunks(4).enumerate() {
            self.w(regs::RETA + 4 * n, rss::reg_word(chunk));
        }
        for (n, chunk) in rss::MS_KEY.chunks(4).enumerate() {
            self.w(regs::RSSRK + 4 * n, rss::reg_word(chunk));
        }
        let offload = if self.config.rx_csum {
            rxcsum::IPOFLD | rxcsum::TUOFLD
        } else {
            0
        };
        self.w(regs::RXCSUM, rxcsum::PCSD | offload);
        // TCP/IPv4 only: everything else (ARP, ICMP, DHCP's UDP, fragments)
        // goes to queue 0, whose core answers for the appliance and runs
        // DHCP (hashing all IPv4 by addresses would send a DHCP offer to
        // any queue).
        self.w(
            regs::MRQC,
            regs::mrqc::ENABLE_RSS | regs::mrqc::FIELD_IPV4_TCP,
        );
    }

    fn enable_rx_tx(&self) {
        for n in 0..128 {
            self.w(regs::MTA + 4 * n, 0);
        }
        let jumbo = self.config.mtu > 1500;
        self.w(regs::RLPML, (self.config.max_plain() + 4) as u32);
        let lpe = if jumbo { rctl::LPE } else { 0 };
        self.w(regs::RCTL, rctl::EN | rctl::BAM | rctl::SECRC | lpe);
        let t = regs::tctl::EN
            | regs::tctl::PSP
            | regs::tctl::CT_15
            | regs::tctl::COLD_63
            | regs::tctl::RTLC;
        self.w(regs::TCTL, t);
    }

    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// What the NIC offers, for the stack.
    pub fn caps(&self) -> Caps {
        let c = &self.config;
        Caps {
            csum: c.csum,
            tso: c.tso_on(),
            rx_csum: c.rx_csum,
            mtu: c.mtu,
            max_frame: if c.tso_on() { MAX_FRAME } else { c.max_plain() },
            queues: c.queues,
        }
    }

    /// The MSI-X vector of link changes and other causes.
    pub fn other_vector(&self) -> usize {
        self.config.queues
    }

    /// The "other" interrupt: reads (and so clears) ICR and returns the
    /// link if it changed; unmasks the vector again.
    pub fn handle_other(&mut self) -> Option<Link> {
        let icr = self.r(regs::ICR);
        self.w(regs::EIMS, 1 << self.other_vector());
        let now = self.link();
        let changed = icr & regs::icr::LSC != 0 || now != self.link;
        self.link = now;
        changed.then_some(now)
    }

    /// Statistics since the driver started (the registers clear on read).
    pub fn stats(&mut self) -> Stats {
        use regs::stats as s;
        let m = &self.mmio;
        let r = |o| u64::from(m.read32(o));
        let wide = |lo, hi| {
            let l = r(lo);
            l | r(hi) << 32
        };
        let t = &mut self.stats;
        t.gprc += r(s::GPRC);
        t.gptc += r(s::GPTC);
        t.gorc += wide(s::GORCL, s::GORCH);
        t.gotc += wide(s::GOTCL, s::GOTCH);
        t.mpc += r(s::MPC);
        t.rnbc += r(s::RNBC);
        t.crcerrs += r(s::CRCERRS);
        t.roc += r(s::ROC);
        t.tpr += r(s::TPR);
        t.tpt += r(s::TPT);
        t.tsctc += r(s::TSCTC);
        *t
    }

    /// Stops the device (a reset, so it no longer touches memory) and
    /// frees every ring and buffer of `queues`.
    pub fn shutdown(self, queues: Vec<Queue<M>>) -> Result<(), Error> {
        self.reset()?;
        for q in &queues {
            for d in q.dma_regions() {
                // SAFETY: the region came from this HAL (make_queues), and
                // the reset above stopped the device's DMA.
                unsafe { self.hal.dma_free(d) };
            }
        }
        Ok(())
    }
}

impl<M: Mmio, H: Hal> core::fmt::Debug for Igb<M, H> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Igb")
            .field("mac", &self.mac)
            .field("link", &self.link)
            .field("config", &self.config)
            .finish()
    }
}
