//! The NVMe driver wired to this kernel: its HAL (heap memory as DMA memory,
//! identity mapped; TSC time), BAR0 as its register block, MSI-X routing, and
//! one I/O queue pair reaped either by polling or from its MSI-X interrupt
//! handler.
//!
//! Completions are recorded per caller tag in a fixed table ([`MAX_TAGS`]
//! entries), so reaping a completion allocates nothing, in the poll loop and
//! in the interrupt handler alike.

use crate::arch::{apic, idt};
use crate::pci::{self, Function, MsiX};
use crate::time;
use core::alloc::Layout;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicU8, Ordering};
use dioxide_nvme::{
    Completion, Config, Controller, DataBuf, Dma, Hal, Mmio, Namespace, NvmeError, QueuePair,
    SubmissionEntry,
};
use spin::Mutex;
use x86_64::instructions::interrupts;

/// Identity-mapped kernel memory as DMA memory.
#[derive(Clone, Copy)]
pub struct KernelHal;

// SAFETY: heap memory is identity mapped (virtual == physical), so a
// page-aligned heap allocation is physically contiguous and its address is
// the device address; the TSC-based clock is monotonic.
unsafe impl Hal for KernelHal {
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
            // SAFETY: the region came from dma_alloc with this layout.
            unsafe { alloc::alloc::dealloc(dma.virt.as_ptr(), layout) };
        }
    }

    fn virt_to_phys(&self, virt: usize) -> u64 {
        virt as u64
    }

    fn now_ns(&self) -> u64 {
        time::now_ns()
    }
}

/// BAR0 of the controller, mapped uncached.
#[derive(Clone, Copy)]
pub struct Bar0 {
    base: usize,
    size: usize,
}

impl Mmio for Bar0 {
    fn read32(&self, off: usize) -> u32 {
        if off + 4 > self.size {
            return u32::MAX;
        }
        // SAFETY: within the mapped BAR, 4-byte aligned register.
        unsafe { core::ptr::read_volatile((self.base + off) as *const u32) }
    }
    fn write32(&self, off: usize, v: u32) {
        if off + 4 > self.size {
            return;
        }
        // SAFETY: within the mapped BAR, 4-byte aligned register.
        unsafe { core::ptr::write_volatile((self.base + off) as *mut u32, v) }
    }
}

pub type Queue = QueuePair<KernelHal, Bar0>;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Poll,
    Irq,
}

pub const MAX_TAGS: usize = 1024;
pub const IO_VECTOR: u8 = 0x40;

const IDLE: u8 = 0;
const PENDING: u8 = 1;
const OK: u8 = 2;
const FAILED: u8 = 3;

static QUEUE: Mutex<Option<Queue>> = Mutex::new(None);
static RESULTS: [AtomicU8; MAX_TAGS] = [const { AtomicU8::new(IDLE) }; MAX_TAGS];
static LAST_ERROR: Mutex<Option<NvmeError>> = Mutex::new(None);
static MODE: Mutex<Mode> = Mutex::new(Mode::Poll);

pub struct Nvme {
    pub ctrl: Controller<KernelHal, Bar0>,
    pub ns: Namespace,
    pub mode: Mode,
    pub max_transfer: usize,
}

#[derive(Debug)]
pub enum InitError {
    NoBar,
    Map(&'static str),
    NoMsiX,
    Nvme(NvmeError),
}

impl core::fmt::Display for InitError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            InitError::NoBar => write!(f, "NVMe controller has no memory BAR0"),
            InitError::Map(e) => write!(f, "cannot map NVMe BAR0: {e}"),
            InitError::NoMsiX => write!(
                f,
                "NVMe controller has no usable MSI-X (needed for nvme.completion=irq)"
            ),
            InitError::Nvme(e) => write!(f, "{e}"),
        }
    }
}

impl From<NvmeError> for InitError {
    fn from(e: NvmeError) -> Self {
        InitError::Nvme(e)
    }
}

fn record(c: Completion) {
    let tag = c.tag as usize;
    if tag >= MAX_TAGS {
        return;
    }
    match c.result {
        Ok(_) => RESULTS[tag].store(OK, Ordering::Release),
        Err(e) => {
            *LAST_ERROR.lock() = Some(e);
            RESULTS[tag].store(FAILED, Ordering::Release);
        }
    }
}

/// The MSI-X handler of the I/O queue: runs the completions.
fn irq_handler(_: &mut idt::TrapFrame) {
    // The main line only holds the queue lock with interrupts off, so it is
    // free here.
    if let Some(q) = QUEUE.lock().as_mut() {
        q.process_completions(record);
    }
}

/// Brings up the controller of PCI function `f`, namespace 1 and I/O queue 1.
pub fn init(f: &Function, mode: Mode, timeout_ms: u64) -> Result<Nvme, InitError> {
    let bar = pci::memory_bar(f.bdf, 0).ok_or(InitError::NoBar)?;
    crate::mm::map_mmio(bar.base, bar.size).map_err(InitError::Map)?;
    pci::enable_device(f.bdf);
    log::info!(target: "nvme", "{} BAR0 {:#x} ({} KiB)", f.bdf, bar.base, bar.size / 1024);
    let regs = Bar0 {
        base: bar.base as usize,
        size: bar.size as usize,
    };
    let config = Config {
        io_timeout_ms: timeout_ms,
        admin_timeout_ms: timeout_ms.max(1000),
        ..Config::default()
    };
    let mut ctrl = Controller::init(KernelHal, regs, config)?;
    let ns = ctrl.namespace(1)?;
    let granted = ctrl.set_queue_count(1)?;
    log::debug!(target: "nvme", "{granted} I/O queue pair(s) granted");
    let vector = match mode {
        Mode::Poll => None,
        Mode::Irq => {
            let msix = MsiX::new(f.bdf).ok_or(InitError::NoMsiX)?;
            // Entry 0 serves the admin queue (polled here, left masked off by
            // not routing it); entry 1 the I/O queue.
            msix.route(1, apic::id(), IO_VECTOR);
            msix.enable();
            idt::register(IO_VECTOR, irq_handler);
            Some(1)
        }
    };
    let entries = ctrl.cap().max_queue_entries().min(1024) as u16;
    let q = ctrl.create_io_queue(1, entries, vector)?;
    let max_transfer = q.max_transfer();
    log::info!(
        target: "nvme",
        "I/O queue 1: {} entries, {} completion, max transfer {} KiB",
        entries,
        if mode == Mode::Irq { "MSI-X interrupt" } else { "polled" },
        max_transfer / 1024
    );
    *QUEUE.lock() = Some(q);
    *MODE.lock() = mode;
    Ok(Nvme {
        ctrl,
        ns,
        mode,
        max_transfer,
    })
}

/// Submits `cmd` with `tag` (< MAX_TAGS).
///
/// # Safety
///
/// `buf`, when given, stays valid and untouched until the tag is done (or the
/// kernel powers off).
pub unsafe fn submit(
    cmd: SubmissionEntry,
    buf: Option<DataBuf>,
    tag: u16,
) -> Result<(), NvmeError> {
    RESULTS[tag as usize].store(PENDING, Ordering::Release);
    let r = interrupts::without_interrupts(|| {
        let mut g = QUEUE.lock();
        let q = g.as_mut().ok_or(NvmeError::DeviceGone)?;
        // SAFETY: forwarded to the caller.
        unsafe { q.submit(cmd, buf, tag as u64) }
    });
    if r.is_err() {
        RESULTS[tag as usize].store(IDLE, Ordering::Release);
    }
    r.map(|_| ())
}

/// The result of `tag` if it is done; the tag becomes idle again.
pub fn take(tag: u16) -> Option<Result<(), NvmeError>> {
    match RESULTS[tag as usize].load(Ordering::Acquire) {
        OK => {
            RESULTS[tag as usize].store(IDLE, Ordering::Release);
            Some(Ok(()))
        }
        FAILED => {
            RESULTS[tag as usize].store(IDLE, Ordering::Release);
            Some(Err(LAST_ERROR.lock().unwrap_or(NvmeError::DeviceGone)))
        }
        _ => None,
    }
}

pub fn is_done(tag: u16) -> bool {
    matches!(RESULTS[tag as usize].load(Ordering::Acquire), OK | FAILED)
}

/// Reaps completions (poll mode) and expires overdue commands.
fn service(check_expiry: bool) {
    interrupts::without_interrupts(|| {
        if let Some(q) = QUEUE.lock().as_mut() {
            if *MODE.lock() == Mode::Poll {
                q.process_completions(record);
            }
            if check_expiry {
                let now = time::now_ns();
                while let Some(c) = q.expire(now) {
                    record(c);
                }
            }
        }
    });
}

/// Waits until `done()` holds. Polls the queue, or halts until the next
/// interrupt (the completion's MSI-X or the APIC tick) in irq mode; every
/// command has a deadline, so this always ends.
pub fn wait_until(mut done: impl FnMut() -> bool) {
    let mode = *MODE.lock();
    let mut next_expiry = time::now_ns() + 1_000_000;
    loop {
        let now = time::now_ns();
        let check = now >= next_expiry;
        if check {
            next_expiry = now + 1_000_000;
        }
        match mode {
            Mode::Poll => {
                service(check);
                if done() {
                    return;
                }
                core::hint::spin_loop();
            }
            Mode::Irq => {
                if check {
                    service(true);
                }
                interrupts::disable();
                if done() {
                    interrupts::enable();
                    return;
                }
                // sti; hlt: an interrupt between the check and the halt
                // still wakes us.
                interrupts::enable_and_hlt();
            }
        }
    }
}

/// Submits one command and waits for it (tag `MAX_TAGS - 1`).
///
/// # Safety
///
/// As [`submit`]; the buffer is released when this returns.
pub unsafe fn execute(cmd: SubmissionEntry, buf: Option<DataBuf>) -> Result<(), NvmeError> {
    let tag = (MAX_TAGS - 1) as u16;
    // SAFETY: forwarded; we wait for the tag before returning.
    unsafe { submit(cmd, buf, tag)? };
    wait_until(|| is_done(tag));
    take(tag).unwrap_or(Err(NvmeError::DeviceGone))
}

/// Queue counters.
pub fn stats() -> Option<dioxide_nvme::QueueStats> {
    interrupts::without_interrupts(|| QUEUE.lock().as_ref().map(|q| q.stats()))
}

/// A page-aligned heap buffer for DMA.
pub struct DmaBuf {
    ptr: NonNull<u8>,
    len: usize,
}

impl DmaBuf {
    pub fn new(len: usize) -> Option<Self> {
        let layout = Layout::from_size_align(len.max(1), 4096).ok()?;
        // SAFETY: non-zero size.
        let p = NonNull::new(unsafe { alloc::alloc::alloc_zeroed(layout) })?;
        Some(DmaBuf { ptr: p, len })
    }
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: owned allocation of len bytes, initialised (zeroed).
        unsafe { core::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, uniquely borrowed.
        unsafe { core::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
    /// The device view of `[off, off + len)`.
    pub fn part(&mut self, off: usize, len: usize) -> DataBuf {
        assert!(off + len <= self.len);
        DataBuf {
            addr: self.ptr.as_ptr() as usize + off,
            len,
        }
    }
}

impl Drop for DmaBuf {
    fn drop(&mut self) {
        if let Ok(layout) = Layout::from_size_align(self.len.max(1), 4096) {
            // SAFETY: allocated in new() with this layout.
            unsafe { alloc::alloc::dealloc(self.ptr.as_ptr(), layout) };
        }
    }
}
