//! The Intel igb NIC bound to this kernel: the `dioxide-igb` driver's HAL
//! on identity-mapped heap memory and BAR0, the PCI IDs it takes, and one
//! queue pair per serving core with its MSI-X entry aimed at that core.
//!
//! Matched: the copper 82576 parts (QEMU's `-device igb` is 8086:10C9);
//! only QEMU's 82576 has run it. Not matched: 82576 fiber/serdes (no copper
//! PHY behind MDIC for the link bring-up) and the I350 family (its IVAR
//! layout differs from the 82576's: queue causes would reach the wrong
//! vectors). Each core polls its queue while it serves; each queue's MSI-X
//! entry is routed to its core and its vector unmasked only while that
//! core sleeps (`NetPort::arm_wakeup` in `net::stack`).

use crate::drivers::pci::{self, Function, MsiX};
use crate::platform::{smp, time};
use alloc::vec::Vec;
use core::alloc::Layout;
use core::ptr::NonNull;
use dioxide_igb::{Config, Dma, Igb, Queue};
use dioxide_nic::phy::NicDevice;

/// PCI device IDs (vendor 8086) of the copper 82576 parts: 82576,
/// quad copper, NS, quad copper ET2.
pub const DEVICE_IDS: [u16; 4] = [0x10C9, 0x10E8, 0x150A, 0x1526];

/// Every queue's MSI-X entry was routed to its core (else a sleeping core
/// would wake only on its tick: its port then never sleeps).
static WAKE_ROUTED: core::sync::atomic::AtomicBool = core::sync::atomic::AtomicBool::new(false);

/// Whether a queue's interrupt can wake its core.
pub fn can_wake() -> bool {
    WAKE_ROUTED.load(core::sync::atomic::Ordering::Relaxed)
}

/// Receive descriptors (and 2 KiB buffers) per queue.
const RX_DESCS: usize = 1024;

/// The IDT vector of the queues' MSI-X entries (each aimed at its core).
pub const NET_VECTOR: u8 = 0x41;

/// An igb function.
pub fn matches(f: &Function) -> bool {
    f.vendor == 0x8086 && DEVICE_IDS.contains(&f.device)
}

/// The driver's HAL: heap memory is identity mapped (physical ==
/// virtual), the TSC is the clock.
#[derive(Clone, Copy)]
pub struct IgbHal;

// SAFETY: allocations are zeroed, page aligned and contiguous (the heap is
// identity mapped, cacheable and coherent with DMA on x86); `now_ns` is the
// monotonic TSC clock.
unsafe impl dioxide_igb::Hal for IgbHal {
    fn dma_alloc(&self, len: usize) -> Option<Dma> {
        let len = len.div_ceil(4096).max(1) * 4096;
        let layout = Layout::from_size_align(len, 4096).ok()?;
        // SAFETY: non-zero size.
        let p = NonNull::new(unsafe { alloc::alloc::alloc_zeroed(layout) })?;
        Some(Dma {
            phys: p.as_ptr() as u64,
            virt: p,
            len,
        })
    }

    unsafe fn dma_free(&self, dma: &Dma) {
        if let Ok(layout) = Layout::from_size_align(dma.len, 4096) {
            // SAFETY: the region came from dma_alloc with this layout and
            // the caller says the device no longer reaches it.
            unsafe { alloc::alloc::dealloc(dma.virt.as_ptr(), layout) };
        }
    }

    fn now_ns(&self) -> u64 {
        time::now_ns()
    }
}

/// BAR0, mapped uncached.
#[derive(Clone, Copy)]
pub struct IgbBar {
    base: usize,
    size: usize,
}

impl dioxide_igb::Mmio for IgbBar {
    fn read32(&self, off: usize) -> u32 {
        if off + 4 > self.size {
            return u32::MAX;
        }
        // SAFETY: within the mapped BAR, a 4-byte aligned register.
        unsafe { core::ptr::read_volatile((self.base + off) as *const u32) }
    }
    fn write32(&self, off: usize, v: u32) {
        if off + 4 > self.size {
            return;
        }
        // SAFETY: within the mapped BAR, a 4-byte aligned register.
        unsafe { core::ptr::write_volatile((self.base + off) as *mut u32, v) }
    }
}

/// One core's queue pair as its stack's smoltcp device.
pub type Port = NicDevice<Queue<IgbBar>>;

/// The NIC up: the device (kept for its link and statistics) and one port
/// per serving core.
pub struct Nic {
    pub dev: Igb<IgbBar, IgbHal>,
    pub ports: Vec<Port>,
}

impl Nic {
    pub fn mac(&self) -> [u8; 6] {
        self.dev.mac()
    }
}

/// Brings igb function `f` up with one queue pair per online core (at
/// most the driver's [`dioxide_igb::MAX_QUEUES`]), RSS over them, each
/// queue's MSI-X entry aimed at its core (masked: the cores poll).
pub fn bring_up(f: &Function) -> Option<Nic> {
    let bar = pci::memory_bar(f.bdf, 0)?;
    if let Err(e) = crate::mm::map_mmio(bar.base, bar.size) {
        log::error!(target: "net", "{}: igb BAR0: {e}", f.bdf);
        return None;
    }
    pci::enable_device(f.bdf);
    let mmio = IgbBar {
        base: bar.base as usize,
        size: bar.size as usize,
    };
    let msix = MsiX::new(f.bdf);
    if let Some(m) = &msix {
        m.enable();
    }
    let queues =
        crate::net::nic::stacks_wanted(&alloc::format!("{} igb", f.bdf), dioxide_igb::MAX_QUEUES);
    // 1,024 receive descriptors per queue (the driver's default is Linux's
    // 256): the device drops what arrives while a queue's ring is full
    // (QEMU traced 8 drops in one soak run with 256), and each drop costs
    // its connection a retransmission timeout — or, for an RST, is never
    // sent again. 2 MiB of buffers per queue.
    let config = Config {
        queues,
        rx_descs: RX_DESCS,
        ..Config::default()
    };
    let (dev, qs) = match Igb::new(mmio, IgbHal, config) {
        Ok(x) => x,
        Err(e) => {
            log::error!(target: "net", "{}: igb: {e}", f.bdf);
            return None;
        }
    };
    crate::platform::idt::register(NET_VECTOR, |_| {});
    let mut routed = msix.is_some();
    for q in &qs {
        q.disable_irq();
        match &msix {
            Some(m) if (q.vector() as u16) < m.size => {
                m.route(q.vector() as u16, smp::apic_id_of(q.index()), NET_VECTOR)
            }
            _ => routed = false,
        }
    }
    WAKE_ROUTED.store(routed, core::sync::atomic::Ordering::Relaxed);
    if !routed {
        log::warn!(target: "net", "{}: igb: no MSI-X entry for every queue: its cores poll and never sleep", f.bdf);
    }
    let caps = dev.caps();
    let mac = dev.mac();
    let link = dev.link();
    log::info!(
        target: "net",
        "{} igb MAC {:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}, link {}, {} queue pair(s) with RSS, csum {}, tso {}, rx csum {}, mtu {}",
        f.bdf, mac[0], mac[1], mac[2], mac[3], mac[4], mac[5],
        if link.up {
            alloc::format!("up {} Mb/s {} duplex", link.speed_mbps, if link.full_duplex { "full" } else { "half" })
        } else {
            "down".into()
        },
        qs.len(),
        on(caps.csum), on(caps.tso), on(caps.rx_csum), caps.mtu
    );
    let ports = qs.into_iter().map(|q| NicDevice::new(q, caps)).collect();
    Some(Nic { dev, ports })
}

fn on(b: bool) -> &'static str {
    if b {
        "on"
    } else {
        "off"
    }
}
