//! The NVMe driver wired to this kernel: its HAL (heap memory as DMA memory,
//! identity mapped; TSC time), BAR0 as its register block, MSI-X routing, and
//! one I/O queue pair per core, owned by that core's DIO engine
//! (`dioxide_iomap::Engine`) and reaped either by polling or from its MSI-X
//! interrupt handler, which finishes the requests there.
//!
//! The engine is shared with the MSI-X handler, so it lives in an
//! [`IrqMutex`] (interrupts off while held). The handler only reaps
//! (`Engine::poll`); owners of asynchronous requests (the NBD service, a
//! self-test) receive `(their request id, result)` from [`service`], which
//! the run loop calls in process context. There are no global result
//! tables: each owner keeps its requests in its own slab. The completion
//! mode is fixed at boot and kept as plain data ([`mode`]).

use crate::drivers::pci::{self, Function, MsiX};
use crate::platform::irq_mutex::IrqMutex;
use crate::platform::time;
use crate::platform::{apic, idt};
use alloc::sync::Arc;
use core::alloc::Layout;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use dioxide_iomap::{DioError, Engine, IoBuf, Op, ReqId};
use dioxide_nvme::blk::NvmeQueue;
use dioxide_nvme::{Config, Controller, Dma, Hal, Mmio, Namespace, NvmeError, SharedController};
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

/// The I/O queue pair of this core, owned by its DIO engine: raw commands,
/// metadata reads and file I/O all go through it.
pub type Dio = Engine<NvmeQueue<KernelHal, Bar0>>;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Poll,
    Irq,
}

pub const IO_VECTOR: u8 = 0x40;

static ENGINE: IrqMutex<Option<Dio>> = IrqMutex::new(None);
/// The completion mode, set once by [`init`] (0: poll, 1: irq).
static MODE: AtomicU8 = AtomicU8::new(0);

/// What the rest of the kernel knows of the controller (which itself
/// belongs to the engine's queue, for timeouts and resets).
pub struct Nvme {
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

impl core::error::Error for InitError {}

impl From<NvmeError> for InitError {
    fn from(e: NvmeError) -> Self {
        InitError::Nvme(e)
    }
}

/// The MSI-X handler of the I/O queue: reaps completions and finishes
/// their requests (interrupt context: no owner code runs here).
fn irq_handler(_: &mut idt::TrapFrame) {
    // The main line only holds the engine with interrupts off (IrqMutex),
    // so on this core it is free.
    if let Some(e) = ENGINE.lock().as_mut() {
        e.poll();
    }
}

/// Runs `f` on this core's DIO engine, with interrupts off.
pub fn with_engine<R>(f: impl FnOnce(&mut Dio) -> R) -> Option<R> {
    ENGINE.lock().as_mut().map(f)
}

pub fn mode() -> Mode {
    match MODE.load(Ordering::Relaxed) {
        1 => Mode::Irq,
        _ => Mode::Poll,
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
        // How long an aborted command may take to answer before the
        // controller is reset.
        abort_grace_ms: timeout_ms.clamp(100, 5000),
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
            // Entry 0 would serve the admin queue (polled, not routed);
            // entry 1 the I/O queue.
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
    let queue =
        NvmeQueue::new(q, KernelHal, ns).with_controller(Arc::new(SharedController::new(ctrl)));
    *ENGINE.lock() = Some(Engine::new(queue));
    MODE.store(
        match mode {
            Mode::Poll => 0,
            Mode::Irq => 1,
        },
        Ordering::Relaxed,
    );
    Ok(Nvme {
        ns,
        mode,
        max_transfer,
    })
}

/// Submits a raw command on the namespace for `owner` (the caller's request
/// id); its completion is delivered by [`service`].
///
/// # Safety
///
/// `buf` stays valid and untouched until that completion is delivered (or
/// the kernel powers off).
pub unsafe fn submit(op: Op, lba: u64, buf: IoBuf, owner: ReqId) -> Result<(), DioError> {
    // SAFETY: our caller keeps `buf` valid and untouched until the
    // completion is delivered, which is `Engine::raw`'s contract.
    with_engine(|e| unsafe { e.raw(op, lba, buf, Some(owner)) })
        .unwrap_or(Err(DioError::Unsupported("no NVMe engine")))
        .map(|_| ())
}

/// Waits until `done()` holds. Polls the queue, or halts until the next
/// interrupt (the completion's MSI-X or the APIC tick) in irq mode. Deferred
/// work (error completions) runs here, in process context. Every command has
/// a deadline, so this always ends.
pub fn wait_until(mut done: impl FnMut() -> bool) {
    let mode = mode();
    loop {
        reap(mode);
        match mode {
            Mode::Poll => {
                if done() {
                    return;
                }
                core::hint::spin_loop();
            }
            Mode::Irq => {
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

/// What the completion path owes a run loop (see [`reap`]), then the
/// delivery of every finished asynchronous request to `sink(owner id,
/// result)`, in process context (with the engine's lock held: the sink
/// should only record).
pub fn service(sink: impl FnMut(ReqId, Result<usize, DioError>)) {
    reap(mode());
    with_engine(|e| e.complete(sink));
}

/// Waits for the next completion or interrupt: spins once (poll mode), or
/// halts unless completions wait for delivery (irq mode).
pub fn idle() {
    match mode() {
        Mode::Poll => core::hint::spin_loop(),
        Mode::Irq => {
            interrupts::disable();
            if with_engine(|e| e.pending_completions()).unwrap_or(0) > 0 {
                interrupts::enable();
            } else {
                // sti; hlt: an interrupt between the check and the halt
                // still wakes us.
                interrupts::enable_and_hlt();
            }
        }
    }
}

/// Polls the queue (poll mode) and reports commands past their deadline (at
/// most once a millisecond): one step of [`wait_until`] and of the network
/// run loop.
fn reap(mode: Mode) {
    static NEXT_EXPIRY: AtomicU64 = AtomicU64::new(0);
    let now = time::now_ns();
    let check = now >= NEXT_EXPIRY.load(Ordering::Relaxed);
    if check {
        NEXT_EXPIRY.store(now + 1_000_000, Ordering::Relaxed);
    }
    with_engine(|e| {
        if mode == Mode::Poll {
            e.poll();
        }
        if check {
            e.expire();
        }
    });
}

/// A raw command, waited for (polls the queue with interrupts off).
///
/// # Safety
///
/// `buf` is valid for the duration of the call.
pub unsafe fn execute(op: Op, lba: u64, buf: IoBuf) -> Result<(), DioError> {
    // SAFETY: `buf` is valid for the duration of the call (our contract),
    // and a raw command without an owner is waited for inside it.
    with_engine(|e| unsafe { e.raw(op, lba, buf, None) })
        .unwrap_or(Err(DioError::Unsupported("no NVMe engine")))
        .map(|_| ())
}

/// Shuts the controller down (normal shutdown notification), before power-off.
pub fn shutdown() -> Result<(), NvmeError> {
    with_engine(|e| match e.queue().controller() {
        Some(c) => c.shutdown(),
        None => Ok(()),
    })
    .unwrap_or(Ok(()))
}

/// Ends an orderly run (a self-test, the benchmark, a failure at boot):
/// tells the controller of the shutdown first when it is up (CC.SHN, so that
/// a volatile cache is committed and the drive does not count an unsafe
/// shutdown; nothing to do before it is brought up), then powers off with
/// `status`. Not for panics and exceptions, which may hold the engine's lock.
pub fn power_off(status: u8) -> ! {
    if let Err(e) = shutdown() {
        log::warn!(target: "nvme", "controller shutdown: {e}");
    }
    crate::platform::power::exit(status)
}

/// Queue counters.
pub fn stats() -> Option<dioxide_nvme::QueueStats> {
    with_engine(|e| e.queue().qp.stats())
}

/// A page-aligned heap buffer for DMA.
pub struct DmaBuf {
    ptr: NonNull<u8>,
    len: usize,
}

#[allow(clippy::len_without_is_empty)]
impl DmaBuf {
    pub fn new(len: usize) -> Option<Self> {
        let layout = Layout::from_size_align(len.max(1), 4096).ok()?;
        // SAFETY: non-zero size.
        let p = NonNull::new(unsafe { alloc::alloc::alloc_zeroed(layout) })?;
        Some(DmaBuf { ptr: p, len })
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: owned allocation of len bytes, initialised (zeroed).
        unsafe { core::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: owned allocation of len bytes, initialised (zeroed);
        // `&mut self` makes the borrow unique.
        unsafe { core::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
    /// The device view of `[off, off + len)`.
    pub fn part(&mut self, off: usize, len: usize) -> IoBuf {
        assert!(off + len <= self.len);
        IoBuf::new(self.ptr, self.len)
            .part(off, len)
            .unwrap_or(IoBuf::new(self.ptr, 0))
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
