//! virtio-net through the `virtio-drivers` crate (PCI transport, its HAL on
//! the kernel's identity-mapped memory), as a smoltcp device
//! ([`NetDevice`]); the stack on it is `net::stack`.

use crate::drivers::pci::{self, Bdf, Function};
use crate::platform::time;
use alloc::boxed::Box;
use alloc::vec;
use alloc::vec::Vec;
use core::cell::RefCell;
use core::ptr::NonNull;
use smoltcp::phy::{Checksum, Device, DeviceCapabilities, Medium, RxToken, TxToken};
use smoltcp::time::Instant;
use virtio_drivers::device::net::VirtIONetRaw;
use virtio_drivers::transport::pci::bus::{ConfigurationAccess, DeviceFunction, PciRoot};
use virtio_drivers::transport::pci::PciTransport;
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
/// A buffer: the virtio-net header and one Ethernet frame.
const BUF_LEN: usize = 2048;
type Raw = VirtIONetRaw<VirtioHal, PciTransport, QUEUE>;

/// The NIC with its buffers. Receive buffers stay posted until a frame
/// arrives and are handed to smoltcp in place (no copy); transmissions are
/// not waited for: a frame's buffer returns to the free list when the device
/// reports it used. (virtio-drivers' `VirtIONet::send` spins until the device
/// has taken each frame: one host round trip per frame.)
struct Nic {
    raw: Raw,
    /// Posted receive buffers by descriptor token (one descriptor each).
    rx: Vec<Option<Box<[u8]>>>,
    /// Frames in flight by token: the buffer and the length given.
    tx_busy: Vec<Option<(Box<[u8]>, usize)>>,
    tx_free: Vec<Box<[u8]>>,
    /// Where a frame goes when no transmit buffer is free (dropped; TCP
    /// retransmits).
    scratch: Box<[u8]>,
    pub dropped: u64,
}

fn buffer() -> Box<[u8]> {
    vec![0u8; BUF_LEN].into_boxed_slice()
}

impl Nic {
    fn new(mut raw: Raw) -> Result<Nic, virtio_drivers::Error> {
        let mut rx: Vec<Option<Box<[u8]>>> = (0..QUEUE).map(|_| None).collect();
        for _ in 0..QUEUE {
            let mut b = buffer();
            // SAFETY: the buffer is kept in `rx` (a stable heap address) and
            // not touched until the device returns it.
            let t = unsafe { raw.receive_begin(&mut b)? } as usize;
            match rx.get_mut(t) {
                Some(slot) => *slot = Some(b),
                None => return Err(virtio_drivers::Error::WrongToken),
            }
        }
        Ok(Nic {
            raw,
            rx,
            tx_busy: (0..QUEUE).map(|_| None).collect(),
            tx_free: (0..QUEUE).map(|_| buffer()).collect(),
            scratch: buffer(),
            dropped: 0,
        })
    }

    /// Takes back the buffers of frames the device has sent.
    fn reap_tx(&mut self) {
        while let Some(t) = self.raw.poll_transmit() {
            let Some((b, len)) = self.tx_busy.get_mut(t as usize).and_then(Option::take) else {
                log::error!(target: "net", "transmit completion for unknown token {t}");
                return;
            };
            // SAFETY: the same buffer and length as given to transmit_begin.
            if let Err(e) = unsafe { self.raw.transmit_complete(t, &b[..len]) } {
                log::warn!(target: "net", "transmit completion: {e:?}");
            }
            self.tx_free.push(b);
        }
    }

    /// Lets smoltcp build a frame that is then dropped (no transmit buffer
    /// or descriptor free; TCP retransmits).
    fn drop_frame<R>(&mut self, len: usize, f: impl FnOnce(&mut [u8]) -> R) -> R {
        self.dropped += 1;
        let n = len.min(self.scratch.len());
        f(&mut self.scratch[..n])
    }

    fn can_send(&self) -> bool {
        !self.tx_free.is_empty() && self.raw.can_send()
    }

    /// Posts a receive buffer again.
    fn repost(&mut self, mut b: Box<[u8]>) {
        // SAFETY: as in `new`.
        match unsafe { self.raw.receive_begin(&mut b) } {
            Ok(t) => {
                if let Some(slot) = self.rx.get_mut(t as usize) {
                    *slot = Some(b);
                }
            }
            Err(e) => log::warn!(target: "net", "receive buffer lost: {e:?}"),
        }
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
    pub fn add(c: &AtomicU64, v: u64) {
        c.fetch_add(v, Ordering::Relaxed);
    }
    /// (tx frames, build, kick, rx frames, process), and resets them.
    pub fn take() -> [u64; 5] {
        [&TX_FRAMES, &TX_BUILD, &TX_KICK, &RX_FRAMES, &RX_PROCESS]
            .map(|c| c.swap(0, Ordering::Relaxed))
    }
}

/// The NIC as a smoltcp device.
pub struct NetDevice {
    nic: RefCell<Nic>,
}

/// A received frame, in its receive buffer; the buffer is posted again
/// when the token is dropped.
pub struct Rx<'a> {
    nic: &'a RefCell<Nic>,
    buf: Option<Box<[u8]>>,
    start: usize,
    len: usize,
}
pub struct Tx<'a>(&'a RefCell<Nic>);

impl RxToken for Rx<'_> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        // No borrow of the NIC is held here: smoltcp transmits the answer
        // from inside `f`.
        let frame = self
            .buf
            .as_deref()
            .and_then(|b| b.get(self.start..self.start + self.len))
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
        if let Some(b) = self.buf.take() {
            self.nic.borrow_mut().repost(b);
        }
    }
}

impl TxToken for Tx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut nic = self.0.borrow_mut();
        nic.reap_tx();
        let b = if nic.raw.can_send() {
            nic.tx_free.pop()
        } else {
            None
        };
        let Some(mut b) = b else {
            return nic.drop_frame(len, f);
        };
        let hdr = nic.raw.fill_buffer_header(&mut b).unwrap_or(b.len());
        let total = hdr + len;
        if total > b.len() {
            nic.tx_free.push(b);
            return nic.drop_frame(len, f);
        }
        let t0 = time::rdtsc();
        let r = f(&mut b[hdr..total]);
        let t1 = time::rdtsc();
        stats::add(&stats::TX_FRAMES, 1);
        stats::add(&stats::TX_BUILD, t1 - t0);
        // SAFETY: the buffer is kept in `tx_busy` until the device returns it.
        match unsafe { nic.raw.transmit_begin(&b[..total]) } {
            Ok(t) => match nic.tx_busy.get_mut(t as usize) {
                Some(slot) => *slot = Some((b, total)),
                None => log::error!(target: "net", "transmit token {t} out of range"),
            },
            Err(e) => {
                log::warn!(target: "net", "send failed: {e:?}");
                nic.tx_free.push(b);
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
        let t = nic.raw.poll_receive()?;
        let Some(mut b) = nic.rx.get_mut(t as usize).and_then(Option::take) else {
            log::error!(target: "net", "receive completion for unknown token {t}");
            return None;
        };
        // SAFETY: the buffer given to receive_begin for this token.
        let (start, len) = match unsafe { nic.raw.receive_complete(t, &mut b) } {
            Ok((hdr, len)) => (hdr, len),
            Err(e) => {
                log::warn!(target: "net", "bad receive completion: {e:?}");
                (0, 0)
            }
        };
        drop(nic);
        Some((
            Rx {
                nic: &self.nic,
                buf: Some(b),
                start,
                len: len.min(BUF_LEN - start),
            },
            Tx(&self.nic),
        ))
    }

    fn transmit(&mut self, _ts: Instant) -> Option<Tx<'_>> {
        let mut nic = self.nic.borrow_mut();
        nic.reap_tx();
        if nic.can_send() {
            Some(Tx(&self.nic))
        } else {
            None
        }
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut c = DeviceCapabilities::default();
        c.medium = Medium::Ethernet;
        c.max_transmission_unit = 1514;
        c.max_burst_size = Some(QUEUE / 2);
        // Frames from virtio-net carry complete, host-checked checksums
        // (no VIRTIO_NET_F_GUEST_CSUM is negotiated, so the host never hands
        // over partial ones): verifying them again cost guest time on every
        // frame. Transmitted frames still get theirs computed here.
        c.checksum.ipv4 = Checksum::Tx;
        c.checksum.tcp = Checksum::Tx;
        c.checksum.udp = Checksum::Tx;
        c
    }
}

/// Finds the first virtio-net function and brings it up: the device and
/// its MAC address.
pub fn probe(functions: &[Function]) -> Option<(NetDevice, [u8; 6])> {
    let f = functions
        .iter()
        .find(|f| f.vendor == 0x1af4 && (f.device == 0x1000 || f.device == 0x1041))?;
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
    let nic = match Raw::new(transport).and_then(Nic::new) {
        Ok(n) => n,
        Err(e) => {
            log::error!(target: "net", "{}: virtio-net: {e:?}", f.bdf);
            return None;
        }
    };
    let mac = nic.raw.mac_address();
    log::info!(
        target: "net",
        "{} virtio-net MAC {:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        f.bdf, mac[0], mac[1], mac[2], mac[3], mac[4], mac[5]
    );
    let dev = NetDevice {
        nic: RefCell::new(nic),
    };
    Some((dev, mac))
}

impl NetDevice {
    /// A received frame waits.
    pub fn has_rx(&self) -> bool {
        self.nic.borrow().raw.poll_receive().is_some()
    }
}
