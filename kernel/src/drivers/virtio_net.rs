//! virtio-net as a smoltcp device ([`NetDevice`]); the stack on it is
//! `net::stack`. The `virtio-drivers` crate gives the PCI transport and the
//! virtqueues (its HAL on the kernel's identity-mapped memory); the device
//! itself is ours, because the crate's `VirtIONetRaw` negotiates a fixed
//! feature set without offloads. Which offloads are negotiated, the header
//! and the per-frame checksum work are the `dioxide-virtio-net` crate's
//! (host-tested); the kernel arguments `net.csum=`, `net.guest_csum=`,
//! `net.mrg_rxbuf=`, `net.tso=` and `net.mtu=` choose ([`configure`]).

use crate::drivers::pci::{self, Bdf, Function};
use crate::platform::time;
use alloc::boxed::Box;
use alloc::vec;
use alloc::vec::Vec;
use core::cell::RefCell;
use core::ptr::NonNull;
use dioxide_virtio_net::{self as vn, feature, Choice, Hdr, Wanted};
use smoltcp::phy::{Checksum, Device, DeviceCapabilities, Medium, RxToken, TxToken};
use smoltcp::time::Instant;
use virtio_drivers::queue::VirtQueue;
use virtio_drivers::transport::pci::bus::{ConfigurationAccess, DeviceFunction, PciRoot};
use virtio_drivers::transport::pci::PciTransport;
use virtio_drivers::transport::{DeviceStatus, Transport};
use virtio_drivers::{BufferDirection, PhysAddr};

/// virtio-drivers' HAL: heap memory is identity mapped, so physical ==
/// virtual and sharing a buffer is a no-op.
pub struct VirtioHal;

// SAFETY: allocations are zeroed, page aligned and contiguous (identity
// mapping of the heap); MMIO is mapped uncached before its address is handed
// out; shared buffers are device-visible at their own address.
unsafe impl virtio_drivers::Hal for VirtioHal {
    fn dma_alloc(pages: usize, _dir: BufferDirection) -> (PhysAddr, NonNull<u8>) {
        let layout = core::alloc::Layout::from_size_align(pages.max(1) * 4096, 4096)
            .unwrap_or(core::alloc::Layout::new::<[u8; 4096]>());
        // SAFETY: non-zero size.
        let p = unsafe { alloc::alloc::alloc_zeroed(layout) };
        match NonNull::new(p) {
            Some(nn) => (p as PhysAddr, nn),
            None => panic!("out of memory for virtio DMA ({pages} pages)"),
        }
    }

    unsafe fn dma_dealloc(_paddr: PhysAddr, vaddr: NonNull<u8>, pages: usize) -> i32 {
        if LIVE.load(core::sync::atomic::Ordering::SeqCst) {
            // A device that runs (or did not reset) may still access it
            // (Nic::drop).
            return 0;
        }
        if let Ok(layout) = core::alloc::Layout::from_size_align(pages.max(1) * 4096, 4096) {
            // SAFETY: allocated by dma_alloc with this layout.
            unsafe { alloc::alloc::dealloc(vaddr.as_ptr(), layout) };
        }
        0
    }

    unsafe fn mmio_phys_to_virt(paddr: PhysAddr, size: usize) -> NonNull<u8> {
        if let Err(e) = crate::mm::map_mmio(paddr, size as u64) {
            log::error!(target: "net", "cannot map virtio MMIO at {paddr:#x}: {e}");
        }
        NonNull::new(paddr as *mut u8).unwrap_or(NonNull::dangling())
    }

    unsafe fn share(buffer: NonNull<[u8]>, _dir: BufferDirection) -> PhysAddr {
        buffer.as_ptr() as *mut u8 as PhysAddr
    }

    unsafe fn unshare(_paddr: PhysAddr, _buffer: NonNull<[u8]>, _dir: BufferDirection) {}
}

/// PCI configuration access for virtio-drivers, through the kernel's.
struct PciAccess;

impl ConfigurationAccess for PciAccess {
    fn read_word(&self, df: DeviceFunction, off: u8) -> u32 {
        pci::read32(
            Bdf {
                bus: df.bus,
                dev: df.device,
                func: df.function,
            },
            off as u16,
        )
    }
    fn write_word(&mut self, df: DeviceFunction, off: u8, data: u32) {
        pci::write32(
            Bdf {
                bus: df.bus,
                dev: df.device,
                func: df.function,
            },
            off as u16,
            data,
        )
    }
    unsafe fn unsafe_clone(&self) -> Self {
        PciAccess
    }
}

/// Descriptors per virtqueue (QEMU's virtio-net queues have 256).
const QUEUE: usize = 128;
/// A receive buffer with mergeable receive buffers (a frame of a larger
/// MTU spans several), and the least one without.
const RX_BUF: usize = 2048;
/// How long the control queue may take to answer.
const CTRL_WAIT_NS: u64 = 1_000_000_000;
const HDR: usize = Hdr::LEN;
type Queue = VirtQueue<VirtioHal, QUEUE>;
/// The control queue: one command at a time (QEMU's has 64 entries; a
/// queue may not be larger than the device's).
type CtrlQueue = VirtQueue<VirtioHal, 4>;

/// What the kernel arguments asked for; set once, before [`probe`].
static WANTED: spin::Once<Wanted> = spin::Once::new();

/// Sets the offloads [`probe`] asks the device for (kernel arguments).
pub fn configure(w: Wanted) {
    WANTED.call_once(|| w);
}

/// A received frame's bytes: in its posted receive buffer (given back to
/// the device when done), or assembled from several merged ones.
enum RxBuf {
    Posted(Box<[u8]>),
    Merged(Vec<u8>),
}

/// The device: its transport, its queue pairs until they are handed out,
/// and the control queue. Dropped (a failed bring-up), it resets the
/// device and waits for the reset before anything is freed.
struct Nic {
    transport: OwnedTransport,
    pairs: Vec<Pair>,
    /// The control queue, with VIRTIO_NET_F_CTRL_VQ (for
    /// VIRTIO_NET_CTRL_MQ); its index.
    ctrl: Option<(CtrlQueue, u16)>,
    /// Virtqueues made (receive and transmit of every pair, control).
    queues: u16,
    choice: Choice,
}

/// Where the driver tells the device a queue has new buffers: the notify
/// capability's region at `queue_notify_off` × `notify_off_multiplier`
/// (VIRTIO 1.2 4.1.4.4), found once at start, so that each core rings its
/// own queues without touching the common configuration's shared
/// `queue_select` (which virtio-drivers' `PciTransport::notify` writes).
#[derive(Clone, Copy, Debug)]
struct Doorbell {
    addr: u64,
    queue: u16,
}

impl Doorbell {
    /// Tells the device about `q`'s new buffers if it wants to be told.
    /// The full fence orders the ring's update (virtio-drivers' `add`: a
    /// release store of the available index) before the read of the
    /// device's notification suppression (`should_notify`): a store then a
    /// load, which x86 may otherwise swap, losing a notification the device
    /// waits for (Linux's `virtqueue_kick_prepare` has `virtio_mb` there).
    fn kick<const N: usize>(self, q: &mut VirtQueue<VirtioHal, N>) {
        core::sync::atomic::fence(core::sync::atomic::Ordering::SeqCst);
        if q.should_notify() {
            self.ring();
        }
    }

    fn ring(self) {
        // SAFETY: `addr` lies in the notify region of a BAR mapped
        // uncached at start, bounds checked against the capability's
        // length (`doorbells`); a 16-bit write of the queue's index is the
        // notification (no VIRTIO_F_NOTIFICATION_DATA).
        unsafe { core::ptr::write_volatile(self.addr as *mut u16, self.queue) }
    }
}

/// One receive/transmit queue pair with its buffers. Receive buffers stay
/// posted until a frame arrives and are handed to smoltcp in place (no
/// copy, unless a frame spans several); transmissions are not waited for:
/// a frame's buffer returns to the free list when the device reports it
/// used.
struct Pair {
    index: u16,
    rxq: Queue,
    txq: Queue,
    rx_bell: Doorbell,
    tx_bell: Doorbell,
    choice: Choice,
    /// Bytes per receive buffer.
    rx_len: usize,
    /// Bytes per pooled transmit buffer (header and largest frame).
    tx_len: usize,
    /// Posted receive buffers by descriptor token (one descriptor each).
    rx: Vec<Option<Box<[u8]>>>,
    /// Frames in flight by token: the buffer and the length given.
    tx_busy: Vec<Option<(Box<[u8]>, usize)>>,
    tx_free: Vec<Box<[u8]>>,
    /// Buffers for TSO frames (larger than the MTU, up to `TSO_MAX`):
    /// [`TSO_KEEP`] made at start when TSO is on; one is made when none is
    /// free and freed again when it comes back to a full pool.
    tso_free: Vec<Box<[u8]>>,
    /// Where a frame goes when no transmit buffer is free (dropped; TCP
    /// retransmits).
    scratch: Box<[u8]>,
    /// Frames received and sent on this pair since start, and whether
    /// they are reported per core (several pairs: each core's own).
    rx_frames: u64,
    tx_frames: u64,
    per_core: bool,
}

/// TSO frame buffers kept for reuse (64 KiB each).
const TSO_KEEP: usize = 32;
/// Bytes of a TSO frame buffer: the header and the largest packet.
const TSO_LEN: usize = HDR + vn::TSO_MAX;

fn buffer(len: usize) -> Box<[u8]> {
    vec![0u8; len].into_boxed_slice()
}

#[derive(Debug)]
enum InitError {
    Virtio(virtio_drivers::Error),
    FeaturesRefused(u64),
    NoMac,
    /// No notify capability, or none for this queue.
    NoDoorbell(u16),
    NoCtrl,
    CtrlTimeout,
    CtrlRefused,
}

impl core::fmt::Display for InitError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            InitError::Virtio(e) => write!(f, "{e}"),
            InitError::FeaturesRefused(b) => write!(f, "the device refused features {b:#x}"),
            InitError::NoMac => f.write_str("the device has no MAC address"),
            InitError::NoDoorbell(q) => write!(f, "no notify address for queue {q}"),
            InitError::NoCtrl => f.write_str("no control queue"),
            InitError::CtrlTimeout => f.write_str("the control queue did not answer in 1 s"),
            InitError::CtrlRefused => f.write_str("the device answered VIRTIO_NET_ERR"),
        }
    }
}

impl From<virtio_drivers::Error> for InitError {
    fn from(e: virtio_drivers::Error) -> Self {
        InitError::Virtio(e)
    }
}

impl Nic {
    /// VIRTIO 3.1.1: reset, acknowledge, negotiate (the choice from the
    /// offered features, the arguments and the device's MTU), queues,
    /// DRIVER_OK, the number of queue pairs in use (VIRTIO_NET_CTRL_MQ),
    /// then the receive buffers. `want_pairs`: queue pairs wanted (one per
    /// serving core); the device's `max_virtqueue_pairs` bounds them.
    fn new(t: PciTransport, wanted: &Wanted, bdf: Bdf, want_pairs: u16) -> Result<Nic, InitError> {
        let mut t = OwnedTransport::new(t);
        t.set_status(DeviceStatus::empty());
        t.set_status(DeviceStatus::ACKNOWLEDGE | DeviceStatus::DRIVER);
        let offered = t.read_device_features();
        // The driver may read the configuration before accepting features.
        let device_mtu = if offered & feature::MTU != 0 {
            t.read_config_space::<u16>(10).ok()
        } else {
            None
        };
        // `max_virtqueue_pairs` (offset 8) exists only with VIRTIO_NET_F_MQ.
        let wanted = &Wanted {
            queue_pairs: want_pairs.max(1),
            ..*wanted
        };
        let device_max_pairs = if offered & feature::MQ != 0 {
            t.read_config_space::<u16>(8).ok()
        } else {
            None
        };
        let choice = vn::choose(offered, wanted, device_mtu, device_max_pairs);
        log::debug!(
            target: "net",
            "virtio-net features: offered {offered:#018x}, negotiated {:#018x}",
            choice.features
        );
        t.write_driver_features(choice.features);
        let ok = DeviceStatus::ACKNOWLEDGE | DeviceStatus::DRIVER | DeviceStatus::FEATURES_OK;
        t.set_status(ok);
        if !t.get_status().contains(DeviceStatus::FEATURES_OK) {
            t.set_status(DeviceStatus::FAILED);
            return Err(InitError::FeaturesRefused(choice.features));
        }
        if choice.features & feature::MAC == 0 {
            t.set_status(DeviceStatus::FAILED);
            return Err(InitError::NoMac);
        }
        let indirect = choice.features & feature::RING_INDIRECT_DESC != 0;
        let event_idx = choice.features & feature::RING_EVENT_IDX != 0;
        // With MQ the device has max_virtqueue_pairs pairs and the control
        // queue after all of them (VIRTIO 1.2 5.1.2).
        let pairs = choice.queue_pairs.max(1);
        let ctrl_index = choice.ctrl_queue();
        let queues = ctrl_index.map_or(2 * pairs, |c| c + 1);
        let needed: Vec<u16> = (0..2 * pairs).chain(ctrl_index).collect();
        let bells = doorbells(bdf, &needed)?;
        let bell = |q: u16| {
            bells
                .iter()
                .find(|b| b.queue == q)
                .copied()
                .ok_or(InitError::NoDoorbell(q))
        };
        let mut made = Vec::with_capacity(usize::from(pairs));
        for i in 0..pairs {
            let rxq = Queue::new(&mut *t, 2 * i, indirect, event_idx)?;
            let txq = Queue::new(&mut *t, 2 * i + 1, indirect, event_idx)?;
            made.push(Pair::new(
                i,
                rxq,
                txq,
                bell(2 * i)?,
                bell(2 * i + 1)?,
                choice,
            ));
        }
        let ctrl = match ctrl_index {
            Some(c) => Some((CtrlQueue::new(&mut *t, c, false, false)?, c)),
            None => None,
        };
        t.set_status(ok | DeviceStatus::DRIVER_OK);
        LIVE.store(true, core::sync::atomic::Ordering::SeqCst);
        let mut nic = Nic {
            transport: t,
            pairs: made,
            ctrl,
            queues,
            choice,
        };
        if pairs > 1 {
            let ctrl_bell = ctrl_index.map(bell).transpose()?;
            if let Err(e) = nic.set_pairs(pairs, ctrl_bell) {
                log::warn!(target: "net", "virtio-net: {pairs} queue pairs refused ({e}): serving on one");
                nic.pairs.truncate(1);
                nic.choice.queue_pairs = 1;
            }
        }
        for p in &mut nic.pairs {
            for _ in 0..QUEUE {
                p.post(buffer(p.rx_len))?;
            }
            p.rx_bell.ring();
        }
        Ok(nic)
    }

    fn mac(&self) -> Result<[u8; 6], virtio_drivers::Error> {
        self.transport.read_config_space::<[u8; 6]>(0)
    }

    /// VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET on the control queue: the device
    /// then spreads received flows over `pairs` receive queues (VIRTIO 1.2
    /// 5.1.6.5.5). Waits for the answer (at most [`CTRL_WAIT_NS`]).
    fn set_pairs(&mut self, pairs: u16, bell: Option<Doorbell>) -> Result<(), InitError> {
        let (Some((q, _)), Some(bell)) = (self.ctrl.as_mut(), bell) else {
            return Err(InitError::NoCtrl);
        };
        let cmd = Box::new(vn::ctrl::mq_vq_pairs_set(pairs).ok_or(InitError::CtrlRefused)?);
        let mut ack = Box::new([vn::ctrl::ACK_UNSET; 1]);
        // SAFETY: both buffers stay allocated until the device has
        // returned them (waited for below) or, if it does not answer in
        // time, for ever (leaked: it may still write the answer).
        let token = unsafe { q.add(&[&cmd[..]], &mut [&mut ack[..]])? };
        bell.kick(q);
        let start = time::now_ns();
        while !q.can_pop() {
            if time::now_ns().saturating_sub(start) > CTRL_WAIT_NS {
                Box::leak(cmd);
                Box::leak(ack);
                return Err(InitError::CtrlTimeout);
            }
            core::hint::spin_loop();
        }
        // SAFETY: the same buffers as given to `add`.
        let written = unsafe { q.pop_used(token, &[&cmd[..]], &mut [&mut ack[..]])? };
        let written = ack.get(..written as usize).unwrap_or(&ack[..]);
        match vn::ctrl::Ack::decode(written) {
            Some(vn::ctrl::Ack::Ok) => Ok(()),
            _ => Err(InitError::CtrlRefused),
        }
    }
}

impl Pair {
    fn new(
        index: u16,
        rxq: Queue,
        txq: Queue,
        rx_bell: Doorbell,
        tx_bell: Doorbell,
        choice: Choice,
    ) -> Pair {
        let frame = usize::from(choice.mtu) + vn::ETH_HLEN;
        // Without merging, a buffer holds a whole frame (VIRTIO 5.1.6.3.1).
        let rx_len = if choice.mrg_rxbuf.on() {
            RX_BUF
        } else {
            (HDR + frame).max(RX_BUF)
        };
        let tx_len = (HDR + frame).max(RX_BUF);
        Pair {
            index,
            rxq,
            txq,
            rx_bell,
            tx_bell,
            choice,
            rx_len,
            tx_len,
            rx: (0..QUEUE).map(|_| None).collect(),
            tx_busy: (0..QUEUE).map(|_| None).collect(),
            tx_free: (0..QUEUE).map(|_| buffer(tx_len)).collect(),
            // Made at start (part of the heap level the idle report must
            // return to): up to TSO_KEEP TSO frames in flight allocate
            // nothing.
            tso_free: if choice.tso.on() {
                (0..TSO_KEEP).map(|_| buffer(TSO_LEN)).collect()
            } else {
                Vec::new()
            },
            scratch: buffer(tx_len),
            rx_frames: 0,
            tx_frames: 0,
            per_core: false,
        }
    }

    /// Posts a receive buffer (no notification).
    fn post(&mut self, mut b: Box<[u8]>) -> Result<(), virtio_drivers::Error> {
        // SAFETY: the buffer is kept in `rx` (a stable heap address) and not
        // touched until the device returns it (`take_rx`).
        let t = unsafe { self.rxq.add(&[], &mut [&mut b[..]])? } as usize;
        match self.rx.get_mut(t) {
            Some(slot) => {
                *slot = Some(b);
                Ok(())
            }
            None => {
                // The device owns the buffer now: it may still write it,
                // so it is never freed.
                Box::leak(b);
                Err(virtio_drivers::Error::WrongToken)
            }
        }
    }

    /// Posts a receive buffer again and tells the device if it waits.
    fn repost(&mut self, b: Box<[u8]>) {
        match self.post(b) {
            Ok(()) => {
                self.rx_bell.kick(&mut self.rxq);
            }
            Err(e) => log::warn!(target: "net", "receive buffer lost: {e:?}"),
        }
    }

    /// The next used receive buffer and the bytes the device wrote.
    fn take_rx(&mut self) -> Option<(Box<[u8]>, usize)> {
        let t = self.rxq.peek_used()?;
        let Some(mut b) = self.rx.get_mut(usize::from(t)).and_then(Option::take) else {
            log::error!(target: "net", "receive completion for unknown token {t}");
            return None;
        };
        // SAFETY: the buffer given to `add` for this token.
        match unsafe { self.rxq.pop_used(t, &[], &mut [&mut b[..]]) } {
            Ok(len) => {
                let len = (len as usize).min(b.len());
                Some((b, len))
            }
            Err(e) => {
                log::warn!(target: "net", "bad receive completion: {e:?}");
                self.repost(b);
                None
            }
        }
    }

    /// The next received frame: its bytes and where the frame lies in them.
    /// Frames whose checksum fails the GUEST_CSUM rule are dropped here.
    fn next_frame(&mut self) -> Option<(RxBuf, usize, usize)> {
        loop {
            let (b, len) = self.take_rx()?;
            let Some(h) = Hdr::decode(&b[..len]) else {
                log::warn!(target: "net", "receive buffer of {len} bytes without a header");
                self.repost(b);
                continue;
            };
            let n = if self.choice.mrg_rxbuf.on() {
                h.num_buffers.max(1)
            } else {
                1
            };
            let (buf, start, flen) = if n == 1 {
                (RxBuf::Posted(b), HDR, len - HDR)
            } else {
                // The device uses all of a frame's buffers before it
                // publishes them: the rest are there (else: Linux's "rx
                // error: buffers missing", the frame is dropped).
                let mut v = Vec::with_capacity(usize::from(n) * self.rx_len);
                v.extend_from_slice(&b[HDR..len]);
                self.repost(b);
                let mut whole = true;
                for _ in 1..n {
                    match self.take_rx() {
                        Some((b, len)) => {
                            v.extend_from_slice(&b[..len]);
                            self.repost(b);
                        }
                        None => {
                            whole = false;
                            break;
                        }
                    }
                }
                if !whole {
                    log::warn!(target: "net", "frame of {n} buffers arrived incomplete: dropped");
                    continue;
                }
                stats::add(&stats::RX_MERGED, 1);
                let l = v.len();
                (RxBuf::Merged(v), 0, l)
            };
            let bytes = match &buf {
                RxBuf::Posted(b) => &b[start..start + flen],
                RxBuf::Merged(v) => &v[..],
            };
            if vn::verify_rx(bytes, h.flags, self.choice.guest_csum.on()) {
                return Some((buf, start, flen));
            }
            stats::add(&stats::RX_BAD_CSUM, 1);
            if let RxBuf::Posted(b) = buf {
                self.repost(b);
            }
        }
    }

    /// Takes back the buffers of frames the device has sent.
    fn reap_tx(&mut self) {
        while let Some(t) = self.txq.peek_used() {
            let Some((b, len)) = self.tx_busy.get_mut(usize::from(t)).and_then(Option::take) else {
                log::error!(target: "net", "transmit completion for unknown token {t}");
                return;
            };
            // SAFETY: the same buffer and length as given to `add`.
            if let Err(e) = unsafe { self.txq.pop_used(t, &[&b[..len]], &mut []) } {
                log::warn!(target: "net", "transmit completion: {e:?}");
            }
            self.recycle(b);
        }
    }

    /// Gives a transmit buffer back to its pool (a TSO buffer beyond
    /// [`TSO_KEEP`] is freed).
    fn recycle(&mut self, b: Box<[u8]>) {
        if b.len() == self.tx_len {
            self.tx_free.push(b);
        } else if b.len() == TSO_LEN && self.tso_free.len() < TSO_KEEP {
            self.tso_free.push(b);
        }
    }

    /// Lets smoltcp build a frame that is then dropped (no transmit buffer
    /// or descriptor free; TCP retransmits).
    fn drop_frame<R>(&mut self, len: usize, f: impl FnOnce(&mut [u8]) -> R) -> R {
        stats::add(&stats::TX_DROPPED, 1);
        if self.scratch.len() < len {
            self.scratch = buffer(len);
        }
        f(&mut self.scratch[..len])
    }

    fn can_send(&self) -> bool {
        !self.tx_free.is_empty() && self.txq.available_desc() >= 1
    }
}

/// Frame counters and the TSC cycles spent on them (for the run loop's
/// profile): smoltcp building a frame (headers, checksums, copying the
/// payload), handing it to the device (virtqueue and notification), and
/// smoltcp processing a received one.
pub mod stats {
    use core::sync::atomic::{AtomicU64, Ordering};
    pub static TX_FRAMES: AtomicU64 = AtomicU64::new(0);
    pub static TX_BUILD: AtomicU64 = AtomicU64::new(0);
    pub static TX_KICK: AtomicU64 = AtomicU64::new(0);
    pub static RX_FRAMES: AtomicU64 = AtomicU64::new(0);
    pub static RX_PROCESS: AtomicU64 = AtomicU64::new(0);
    /// Frames handed over with a partial checksum, with GSO.
    pub static TX_CSUM: AtomicU64 = AtomicU64::new(0);
    pub static TX_GSO: AtomicU64 = AtomicU64::new(0);
    /// Frames dropped for want of a transmit buffer.
    pub static TX_DROPPED: AtomicU64 = AtomicU64::new(0);
    /// Frames that spanned several receive buffers; dropped for a bad
    /// checksum (GUEST_CSUM, neither flag set).
    pub static RX_MERGED: AtomicU64 = AtomicU64::new(0);
    pub static RX_BAD_CSUM: AtomicU64 = AtomicU64::new(0);
    pub fn add(c: &AtomicU64, v: u64) {
        c.fetch_add(v, Ordering::Relaxed);
    }
    /// (tx frames, build, kick, rx frames, process), and resets them.
    /// Also logs the exact frame counts and the offload counters since the
    /// last call (`virtio-net since the last count: ...`), which the
    /// caller's per-request figures round down.
    pub fn take() -> [u64; 5] {
        let r = [&TX_FRAMES, &TX_BUILD, &TX_KICK, &RX_FRAMES, &RX_PROCESS]
            .map(|c| c.swap(0, Ordering::Relaxed));
        let [csum, gso, dropped, merged, bad] =
            [&TX_CSUM, &TX_GSO, &TX_DROPPED, &RX_MERGED, &RX_BAD_CSUM]
                .map(|c| c.swap(0, Ordering::Relaxed));
        log::info!(
            target: "net",
            "virtio-net since the last count: {} frames sent ({csum} with partial checksum, {gso} GSO, {dropped} dropped), {} received ({merged} merged, {bad} bad checksum)",
            r[0], r[3]
        );
        r
    }
}

/// The NIC as a smoltcp device.
pub struct NetDevice {
    nic: RefCell<Pair>,
}

/// A received frame, in its receive buffer; the buffer is posted again
/// when the token is dropped.
pub struct Rx<'a> {
    nic: &'a RefCell<Pair>,
    buf: Option<RxBuf>,
    start: usize,
    len: usize,
}
/// A transmit opportunity; smoltcp's metadata gives a TCP packet larger
/// than its MSS its segment size (TSO, third_party/smoltcp).
pub struct Tx<'a> {
    nic: &'a RefCell<Pair>,
    gso_size: u16,
}

impl RxToken for Rx<'_> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        // No borrow of the NIC is held here: smoltcp transmits the answer
        // from inside `f`.
        let frame = match &self.buf {
            Some(RxBuf::Posted(b)) => b.get(self.start..self.start + self.len),
            Some(RxBuf::Merged(v)) => v.get(self.start..self.start + self.len),
            None => None,
        }
        .unwrap_or(&[]);
        let t0 = time::rdtsc();
        let r = f(frame);
        stats::add(&stats::RX_FRAMES, 1);
        stats::add(&stats::RX_PROCESS, time::rdtsc() - t0);
        r
    }
}

impl Drop for Rx<'_> {
    fn drop(&mut self) {
        if let Some(RxBuf::Posted(b)) = self.buf.take() {
            self.nic.borrow_mut().repost(b);
        }
    }
}

impl TxToken for Tx<'_> {
    fn set_meta(&mut self, meta: smoltcp::phy::PacketMeta) {
        self.gso_size = meta.gso_size;
    }

    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut nic = self.nic.borrow_mut();
        nic.reap_tx();
        let total = HDR + len;
        if total > HDR + vn::TSO_MAX || nic.txq.available_desc() == 0 {
            return nic.drop_frame(len, f);
        }
        let b = if total <= nic.tx_len {
            nic.tx_free.pop()
        } else {
            // Larger than the MTU: a TSO frame.
            Some(nic.tso_free.pop().unwrap_or_else(|| buffer(TSO_LEN)))
        };
        let Some(mut b) = b else {
            return nic.drop_frame(len, f);
        };
        let t0 = time::rdtsc();
        let r = f(&mut b[HDR..total]);
        let gso = (nic.choice.tso.on() && self.gso_size > 0).then_some(self.gso_size);
        let h = vn::prepare_tx(&mut b[HDR..total], nic.choice.csum.on(), gso);
        b[..HDR].copy_from_slice(&h.encode());
        let t1 = time::rdtsc();
        stats::add(&stats::TX_FRAMES, 1);
        nic.tx_frames += 1;
        stats::add(&stats::TX_BUILD, t1 - t0);
        if h.flags & Hdr::NEEDS_CSUM != 0 {
            stats::add(&stats::TX_CSUM, 1);
        }
        if h.gso_type != Hdr::GSO_NONE {
            stats::add(&stats::TX_GSO, 1);
        }
        // SAFETY: the buffer is kept in `tx_busy` until the device returns it.
        match unsafe { nic.txq.add(&[&b[..total]], &mut []) } {
            Ok(t) => {
                let bell = nic.tx_bell;
                bell.kick(&mut nic.txq);
                match nic.tx_busy.get_mut(usize::from(t)) {
                    Some(slot) => *slot = Some((b, total)),
                    None => {
                        // The device may still read the buffer: never freed.
                        log::error!(target: "net", "transmit token {t} out of range: its buffer is leaked");
                        Box::leak(b);
                    }
                }
            }
            Err(e) => {
                log::warn!(target: "net", "send failed: {e:?}");
                nic.recycle(b);
            }
        }
        stats::add(&stats::TX_KICK, time::rdtsc() - t1);
        r
    }
}

impl Device for NetDevice {
    type RxToken<'a> = Rx<'a>;
    type TxToken<'a> = Tx<'a>;

    fn receive(&mut self, _ts: Instant) -> Option<(Rx<'_>, Tx<'_>)> {
        let mut nic = self.nic.borrow_mut();
        nic.reap_tx();
        let (buf, start, len) = nic.next_frame()?;
        nic.rx_frames += 1;
        drop(nic);
        Some((
            Rx {
                nic: &self.nic,
                buf: Some(buf),
                start,
                len,
            },
            Tx {
                nic: &self.nic,
                gso_size: 0,
            },
        ))
    }

    fn transmit(&mut self, _ts: Instant) -> Option<Tx<'_>> {
        let mut nic = self.nic.borrow_mut();
        nic.reap_tx();
        if nic.can_send() {
            Some(Tx {
                nic: &self.nic,
                gso_size: 0,
            })
        } else {
            None
        }
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let nic = self.nic.borrow();
        let mut c = DeviceCapabilities::default();
        c.medium = Medium::Ethernet;
        c.max_transmission_unit = usize::from(nic.choice.mtu) + vn::ETH_HLEN;
        c.max_burst_size = Some(QUEUE / 2);
        // TSO: smoltcp (third_party/smoltcp) sends up to a 64 KiB packet
        // at once, its segment size in the packet's metadata; the device
        // cuts it (HOST_TSO4 is negotiated only with CSUM).
        if nic.choice.tso.on() {
            c.max_tso_size = vn::TSO_MAX - vn::ETH_HLEN;
        }
        // Received frames are not verified by smoltcp. Without GUEST_CSUM
        // the device hands over complete checksums of frames its host side
        // made or checked; with GUEST_CSUM, frames with DATA_VALID or
        // NEEDS_CSUM (partial: made on the host) pass and the others are
        // checked in `Nic::next_frame` (dioxide_virtio_net::verify_rx).
        // Verifying everything again cost guest time on every frame.
        // Transmitted IPv4 and UDP checksums are computed here; TCP's too,
        // unless the device completes them (CSUM: `prepare_tx`).
        c.checksum.ipv4 = Checksum::Tx;
        c.checksum.udp = Checksum::Tx;
        c.checksum.tcp = if nic.choice.csum.on() {
            Checksum::None
        } else {
            Checksum::Tx
        };
        c
    }
}

/// Set once a virtio-net device serves (its counters mean something).
static IN_USE: core::sync::atomic::AtomicBool = core::sync::atomic::AtomicBool::new(false);

/// A virtio-net device was brought up (the frame counters are its).
pub fn in_use() -> bool {
    IN_USE.load(core::sync::atomic::Ordering::Relaxed)
}

/// A virtio-net function (transitional or modern).
pub fn matches(f: &Function) -> bool {
    f.vendor == 0x1af4 && (f.device == 0x1000 || f.device == 0x1041)
}

/// Brings virtio-net function `f` up with up to `want_pairs` queue pairs
/// (VIRTIO_NET_F_MQ; one without it): a device per pair, and the MAC
/// address. The device itself (transport, control queue) stays for the
/// life of the appliance.
pub fn bring_up(f: &Function, want_pairs: u16) -> Option<(Vec<NetDevice>, [u8; 6])> {
    pci::enable_device(f.bdf);
    let mut root = PciRoot::new(PciAccess);
    let df = DeviceFunction {
        bus: f.bdf.bus,
        device: f.bdf.dev,
        function: f.bdf.func,
    };
    let transport = match PciTransport::new::<VirtioHal, _>(&mut root, df) {
        Ok(t) => t,
        Err(e) => {
            log::error!(target: "net", "{}: virtio PCI transport: {e:?}", f.bdf);
            return None;
        }
    };
    let wanted = WANTED.get().copied().unwrap_or_default();
    let mut nic = match Nic::new(transport, &wanted, f.bdf, want_pairs) {
        Ok(n) => n,
        Err(e) => {
            log::error!(target: "net", "{}: virtio-net: {e}", f.bdf);
            return None;
        }
    };
    let mac = match nic.mac() {
        Ok(m) => m,
        Err(e) => {
            log::error!(target: "net", "{}: virtio-net MAC: {e:?}", f.bdf);
            return None;
        }
    };
    log::info!(
        target: "net",
        "{} virtio-net MAC {:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}, {} queue pair(s){}",
        f.bdf, mac[0], mac[1], mac[2], mac[3], mac[4], mac[5],
        nic.pairs.len(),
        if nic.pairs.len() > 1 { " (multiqueue)" } else { "" }
    );
    log::info!(target: "net", "virtio-net: {}", nic.choice);
    IN_USE.store(true, core::sync::atomic::Ordering::Relaxed);
    let per_core = nic.pairs.len() > 1;
    let devs = core::mem::take(&mut nic.pairs)
        .into_iter()
        .map(|mut p| {
            p.per_core = per_core;
            NetDevice {
                nic: RefCell::new(p),
            }
        })
        .collect();
    // Serving from now on: the device is never reset, so its transport
    // and control queue are kept (not dropped, which would reset it).
    core::mem::forget(nic);
    Some((devs, mac))
}

/// The notify address of each virtqueue in `queues` of virtio function
/// `bdf`: from its notify capability (VIRTIO 1.2 4.1.4.4: BAR, offset,
/// length, `notify_off_multiplier`) and each queue's `queue_notify_off`
/// (read through the common configuration's `queue_select`, here, once,
/// before the queues are shared between cores); each checked to lie in the
/// capability's region.
fn doorbells(bdf: Bdf, queues: &[u16]) -> Result<Vec<Doorbell>, InitError> {
    const VENDOR: u8 = 0x09;
    const COMMON: u8 = 1;
    const NOTIFY: u8 = 2;
    let mut common = None;
    let mut notify = None;
    for cap in pci::capabilities(bdf).filter(|&(id, _)| id == VENDOR) {
        let off = cap.1;
        let cfg_type = (pci::read32(bdf, off) >> 24) as u8;
        let bar = pci::read32(bdf, off + 4) as u8;
        let offset = pci::read32(bdf, off + 8);
        let length = pci::read32(bdf, off + 12);
        match cfg_type {
            COMMON if common.is_none() => common = Some((bar, offset)),
            NOTIFY if notify.is_none() => {
                notify = Some((bar, offset, length, pci::read32(bdf, off + 16)))
            }
            _ => {}
        }
    }
    let (Some((cbar, coff)), Some((nbar, noff, nlen, mult))) = (common, notify) else {
        return Err(InitError::NoDoorbell(0));
    };
    let base = |bar: u8| pci::bar_address(bdf, bar).ok_or(InitError::NoDoorbell(0));
    let common = base(cbar)? + u64::from(coff);
    let notify = base(nbar)? + u64::from(noff);
    // Both regions were mapped by the transport; again here (idempotent)
    // so that this does not depend on it.
    for (a, len) in [(common, 0x40u64), (notify, u64::from(nlen).max(2))] {
        crate::mm::map_mmio(a, len).map_err(|_| InitError::NoDoorbell(0))?;
    }
    const QUEUE_SELECT: u64 = 0x16;
    const QUEUE_NOTIFY_OFF: u64 = 0x1e;
    queues
        .iter()
        .map(|&q| {
            // SAFETY: the common configuration structure, mapped uncached
            // above; only this core uses it while the device is set up.
            let off = unsafe {
                core::ptr::write_volatile((common + QUEUE_SELECT) as *mut u16, q);
                core::ptr::read_volatile((common + QUEUE_NOTIFY_OFF) as *const u16)
            };
            let at = u64::from(off) * u64::from(mult);
            if at + 2 > u64::from(nlen) {
                return Err(InitError::NoDoorbell(q));
            }
            Ok(Doorbell {
                addr: notify + at,
                queue: q,
            })
        })
        .collect()
}

impl NetDevice {
    /// A received frame waits.
    pub fn has_rx(&self) -> bool {
        self.nic.borrow().rxq.can_pop()
    }

    /// This queue pair's frames (received, sent) since start, when it is
    /// one of several (each core's own); `None` for a single pair, whose
    /// counts are the device's ([`stats`]).
    pub fn frames(&self) -> Option<(u64, u64)> {
        let p = self.nic.borrow();
        p.per_core.then_some((p.rx_frames, p.tx_frames))
    }
}

/// How long a device reset may take before its memory is given up.
const RESET_WAIT_NS: u64 = 1_000_000_000;

/// Set while a device may access its memory (from DRIVER_OK until a
/// reset completes): DMA memory handed back by virtio-drivers (the queues'
/// rings) and a pair's buffers are then leaked instead of freed.
static LIVE: core::sync::atomic::AtomicBool = core::sync::atomic::AtomicBool::new(false);

/// The PCI transport, reset with a bounded wait when dropped, and never
/// dropped itself: virtio-drivers' `PciTransport::drop` resets the device
/// again and waits for the reset without end, so a device that never
/// finishes it would hang the boot. The transport holds only MMIO
/// addresses, no memory: leaking it costs nothing.
struct OwnedTransport {
    t: core::mem::ManuallyDrop<PciTransport>,
    /// The outcome of the reset done so far (one reset, however many
    /// drops ask).
    reset: Option<bool>,
}

impl OwnedTransport {
    fn new(t: PciTransport) -> OwnedTransport {
        OwnedTransport {
            t: core::mem::ManuallyDrop::new(t),
            reset: None,
        }
    }

    /// Resets the device, once, and waits until it says the reset is done
    /// (VIRTIO 1.2 4.1.4.3.2: the status reads 0 again), at most
    /// [`RESET_WAIT_NS`]; whether it did.
    fn reset(&mut self) -> bool {
        if let Some(done) = self.reset {
            return done;
        }
        self.t.set_status(DeviceStatus::empty());
        let start = time::now_ns();
        let mut done = true;
        while !self.t.get_status().is_empty() {
            if time::now_ns().saturating_sub(start) > RESET_WAIT_NS {
                done = false;
                break;
            }
            core::hint::spin_loop();
        }
        self.reset = Some(done);
        done
    }
}

impl core::ops::Deref for OwnedTransport {
    type Target = PciTransport;
    fn deref(&self) -> &PciTransport {
        &self.t
    }
}

impl core::ops::DerefMut for OwnedTransport {
    fn deref_mut(&mut self) -> &mut PciTransport {
        &mut self.t
    }
}

impl Drop for OwnedTransport {
    fn drop(&mut self) {
        if !self.reset() {
            log::error!(target: "net", "virtio-net did not finish its reset within 1 s");
        }
        // The transport itself is left undropped (see the type).
    }
}

impl Drop for Nic {
    fn drop(&mut self) {
        // The device must not reach buffers about to be freed: reset it and
        // wait until it says the reset is done.
        if !self.transport.reset() {
            log::error!(target: "net", "virtio-net did not finish its reset: its buffers and rings are leaked, not freed");
            // LIVE stays set: the pairs' buffers and the rings are kept.
            return;
        }
        for q in 0..self.queues {
            self.transport.queue_unset(q);
        }
        LIVE.store(false, core::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        let posted =
            self.rx.iter().any(Option::is_some) || self.tx_busy.iter().any(Option::is_some);
        if LIVE.load(core::sync::atomic::Ordering::SeqCst) && posted {
            // The device may still write the posted buffers and read the
            // frames in flight: never freed (the rings are kept by
            // `VirtioHal::dma_dealloc`).
            log::error!(target: "net", "virtio-net queue pair {} dropped while the device runs: its buffers are leaked", self.index);
            core::mem::forget(core::mem::take(&mut self.rx));
            core::mem::forget(core::mem::take(&mut self.tx_busy));
        }
    }
}
