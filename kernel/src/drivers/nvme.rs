//! The NVMe driver wired to this kernel: its HAL (heap memory as DMA memory,
//! identity mapped; TSC time), BAR0 as its register block, MSI-X routing,
//! and every controller and namespace on PCI ([`init`], [`disks`]).
//!
//! Each active namespace is a [`Disk`] named `nvme<C>n<N>` (C: the
//! controller's index in PCI order, N: the namespace id) with one I/O queue
//! pair per core, owned by that core's DIO engine (`dioxide_iomap::Engine`)
//! and reaped either by polling or from its MSI-X interrupt handler, which
//! finishes the requests there. Each queue has its own MSI-X entry, pointed
//! at its core; a controller that grants fewer queues than namespaces times
//! cores gets fewer per namespace, and cores then share a queue (core `c`
//! uses queue `c % n`).
//!
//! An engine is shared with the MSI-X handler, so it lives in an
//! [`IrqMutex`] (interrupts off while held); only its core takes that lock
//! (and the cores sharing it, when queues are short). The handler only reaps
//! (`Engine::poll`); owners of asynchronous requests (the NBD service, a
//! self-test) receive `(their request id, result)` from [`service`], which
//! the run loop calls in process context. There are no global result
//! tables: each owner keeps its requests in its own slab. The completion
//! mode is fixed at boot and kept as plain data ([`mode`]).

use crate::drivers::pci::{self, Function, MsiX};
use crate::platform::irq_mutex::IrqMutex;
use crate::platform::time;
use crate::platform::{idt, smp};
use alloc::string::String;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::alloc::Layout;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use crossbeam_utils::CachePadded;
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

/// An I/O queue pair owned by its DIO engine: raw commands, metadata reads
/// and file I/O of one namespace on one core all go through it.
pub type Dio = Engine<NvmeQueue<KernelHal, Bar0>>;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Poll,
    Irq,
}

/// The IDT vector of every I/O queue's MSI-X entry. Each queue has its own
/// MSI-X entry, pointed at the core that owns the queue; the vector is the
/// same on every core, and the handler reaps that core's queues.
pub const IO_VECTOR: u8 = 0x40;

/// The most namespaces brought up (all controllers together).
pub const MAX_DISKS: usize = 32;

/// One active namespace of one controller: `nvme<C>n<N>`, C the
/// controller's index in PCI order (from 0), N the namespace id.
pub struct Disk {
    pub name: String,
    /// Index of its controller (in PCI order, among those brought up).
    pub ctrl: usize,
    pub ns: Namespace,
    /// Largest transfer of one command (bytes).
    pub max_transfer: usize,
    /// The namespace's I/O queue pairs, one per core (see [`engine_of`]);
    /// fewer when the controller grants fewer queues than there are
    /// cores, and then cores share. Each on cache lines of its own, so
    /// that cores never write a line another core's engine uses.
    engines: Vec<CachePadded<IrqMutex<Dio>>>,
    /// Its controller, which every queue of it holds too.
    controller: Arc<SharedController<KernelHal, Bar0>>,
}

impl Disk {
    /// Bytes of the namespace.
    pub fn bytes(&self) -> u64 {
        self.ns.bytes()
    }
}

/// The namespaces, in controller order then namespace id order: set once by
/// [`init`], read without a lock afterwards.
static DISKS: spin::Once<Vec<Disk>> = spin::Once::new();
/// The completion mode, set once by [`init`] (0: poll, 1: irq).
static MODE: AtomicU8 = AtomicU8::new(0);

/// The namespaces brought up (empty before [`init`]).
pub fn disks() -> &'static [Disk] {
    DISKS.get().map_or(&[], |d| d.as_slice())
}

/// Which of a disk's `n` queues core `cpu` uses: its own while there are
/// as many as cores, else `cpu % n` (shared, behind the same lock).
fn engine_of(cpu: usize, n: usize) -> usize {
    cpu % n.max(1)
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

/// The MSI-X handler of the I/O queues: reaps this core's queues and
/// finishes their requests (interrupt context: no owner code runs here).
fn irq_handler(_: &mut idt::TrapFrame) {
    let c = smp::cpu_index();
    for d in disks() {
        // Only the queue whose MSI-X entry points here: the core that
        // owns it (a shared queue's entry points at its first core).
        if c < d.engines.len() {
            // The main line only holds an engine with interrupts off
            // (IrqMutex), so on this core it is free; another core sharing
            // it holds it briefly.
            d.engines[c].lock().poll();
        }
    }
}

/// How many I/O queues disk `disk` has (one per core unless the controller
/// granted fewer; 0 for no such disk).
pub fn queue_count(disk: usize) -> usize {
    disks().get(disk).map_or(0, |d| d.engines.len())
}

/// Runs `f` on disk `disk`'s engine of this core, with interrupts off.
/// `None` when there is no such disk.
pub fn with_engine<R>(disk: usize, f: impl FnOnce(&mut Dio) -> R) -> Option<R> {
    let d = disks().get(disk)?;
    let i = engine_of(smp::cpu_index(), d.engines.len());
    Some(f(&mut d.engines.get(i)?.lock()))
}

pub fn mode() -> Mode {
    match MODE.load(Ordering::Relaxed) {
        1 => Mode::Irq,
        _ => Mode::Poll,
    }
}

/// An NVMe controller: PCI class 01 (storage), subclass 08 (NVM), interface
/// 02 (NVMe).
pub fn is_nvme(f: &Function) -> bool {
    (f.class, f.subclass, f.prog_if) == (0x01, 0x08, 0x02)
}

/// How the controllers are brought up (kernel arguments `nvme.*`).
#[derive(Clone, Copy, Debug)]
pub struct Options {
    pub mode: Mode,
    pub timeout_ms: u64,
    /// Shadow doorbells (Doorbell Buffer Config) when the controller has
    /// them (`nvme.dbbuf=0` turns them off, to compare).
    pub dbbuf: bool,
    /// Keep trusting the shadow doorbells after a lost update was recovered
    /// (`nvme.dbbuf=keep`); by default every doorbell then goes through MMIO.
    pub dbbuf_keep: bool,
    /// Kick a queue that completed nothing for this long (`nvme.kick_ms`).
    pub kick_ms: u64,
    /// The DIO engines' simple path (`dio.simple=0` turns it off on every
    /// core's engine).
    pub simple: bool,
}

/// Brings up every NVMe controller in `functions` (PCI class 01:08:02) and
/// every active namespace on each, with one I/O queue pair per namespace
/// and core. A controller or namespace that fails is logged and left out;
/// the error of the first failure is returned when none at all came up.
pub fn init(functions: &[Function], opts: Options) -> Result<&'static [Disk], InitError> {
    MODE.store(
        match opts.mode {
            Mode::Poll => 0,
            Mode::Irq => 1,
        },
        Ordering::Relaxed,
    );
    let mut disks = Vec::new();
    let mut first_error = None;
    // Named by position in PCI order, whether or not the ones before came
    // up: a controller's name does not change when another fails.
    for (index, f) in functions.iter().filter(|f| is_nvme(f)).enumerate() {
        let name = alloc::format!("nvme{index}");
        match init_controller(f, index, &name, opts, &mut disks) {
            Ok(()) => {}
            Err(e) => {
                log::error!(target: "nvme", "{name} ({}): {e}; left out", f.bdf);
                first_error.get_or_insert(e);
            }
        }
    }
    if disks.is_empty() {
        if let Some(e) = first_error {
            return Err(e);
        }
    }
    if opts.mode == Mode::Irq {
        idt::register(IO_VECTOR, irq_handler);
    }
    Ok(DISKS.call_once(|| disks).as_slice())
}

/// One controller: bring-up, its namespaces, their queues.
fn init_controller(
    f: &Function,
    index: usize,
    name: &str,
    opts: Options,
    disks: &mut Vec<Disk>,
) -> Result<(), InitError> {
    let bar = pci::memory_bar(f.bdf, 0).ok_or(InitError::NoBar)?;
    crate::mm::map_mmio(bar.base, bar.size).map_err(InitError::Map)?;
    pci::enable_device(f.bdf);
    log::info!(target: "nvme", "{name}: {} BAR0 {:#x} ({} KiB)", f.bdf, bar.base, bar.size / 1024);
    let regs = Bar0 {
        base: bar.base as usize,
        size: bar.size as usize,
    };
    let timeout_ms = opts.timeout_ms;
    let config = Config {
        io_timeout_ms: timeout_ms,
        admin_timeout_ms: timeout_ms.max(1000),
        // How long an aborted command may take to answer before the
        // controller is reset.
        abort_grace_ms: timeout_ms.clamp(100, 5000),
        dbbuf: opts.dbbuf,
        dbbuf_keep: opts.dbbuf_keep,
        kick_ms: opts.kick_ms,
        ..Config::default()
    };
    let mut ctrl = Controller::init(KernelHal, regs, config)?;
    let ids = ctrl.active_namespaces()?;
    let mut namespaces = Vec::new();
    for nsid in ids {
        if disks.len() + namespaces.len() >= MAX_DISKS {
            log::warn!(target: "nvme", "{name}n{nsid}: past {MAX_DISKS} namespaces: left out");
            continue;
        }
        match ctrl.namespace(nsid) {
            Ok(ns) => namespaces.push(ns),
            Err(e) => log::error!(target: "nvme", "{name}n{nsid}: {e}; not used"),
        }
    }
    if namespaces.is_empty() {
        log::warn!(target: "nvme", "{name}: no usable namespace");
        return Ok(());
    }
    // One queue per namespace and core; what the controller (and, for
    // interrupts, its MSI-X table: entry 0 is the admin queue's) grants.
    let cores = smp::cpu_count();
    let nns = namespaces.len();
    // MSI-X on before any queue names a vector (the controller refuses a
    // vector while it is off); entries stay masked until routed.
    let msix = match opts.mode {
        Mode::Poll => None,
        Mode::Irq => {
            let m = MsiX::new(f.bdf).ok_or(InitError::NoMsiX)?;
            m.enable();
            Some(m)
        }
    };
    let mut wanted = nns * cores;
    if let Some(m) = &msix {
        wanted = wanted.min(m.size.saturating_sub(1) as usize);
    }
    let mut queues =
        ctrl.create_io_queues(wanted.min(u16::MAX as usize) as u16, 1024, msix.is_some())?;
    let per_ns = (queues.len() / nns).min(cores);
    // Queues that make no whole share go back (none unless the controller
    // granted an uneven number).
    for q in queues.drain(per_ns * nns..) {
        if let Err(e) = ctrl.delete_io_queue(q) {
            log::warn!(target: "nvme", "{name}: deleting a spare I/O queue: {e}");
        }
    }
    if per_ns == 0 {
        return Err(InitError::Nvme(NvmeError::Unsupported(
            "fewer I/O queues than namespaces",
        )));
    }
    if per_ns < cores {
        log::warn!(
            target: "nvme",
            "{name}: {} I/O queues for {nns} namespace(s) on {cores} cores: cores share queues",
            queues.len()
        );
    }
    // Queue `1 + n * per_ns + c` is namespace n's on core c; its MSI-X entry
    // (= its queue id) points at that core.
    if let Some(m) = &msix {
        for (i, q) in queues.iter().enumerate() {
            m.route(q.qid(), smp::apic_id_of(i % per_ns), IO_VECTOR);
        }
    }
    let mut queues = queues.into_iter();
    let made: Vec<_> = namespaces
        .into_iter()
        .map(|ns| {
            let qs: Vec<_> = queues
                .by_ref()
                .take(per_ns)
                .map(|q| NvmeQueue::new(q, KernelHal, ns))
                .collect();
            (ns, qs)
        })
        .collect();
    // Every queue shares the controller, for aborts and resets (a reset by
    // one queue is caught up with by the others: `dioxide_nvme::shared`).
    let shared = Arc::new(SharedController::new(ctrl));
    for (ns, queues) in made {
        let max_transfer = queues.first().map_or(0, |q| q.qp.max_transfer());
        let entries = queues.first().map_or(0, |q| q.qp.entries());
        let engines = queues
            .into_iter()
            .map(|q| {
                let mut e = Engine::new(q.with_controller(shared.clone()));
                e.set_simple(opts.simple);
                CachePadded::new(IrqMutex::new(e))
            })
            .collect::<Vec<_>>();
        let disk = Disk {
            name: alloc::format!("{name}n{}", ns.nsid),
            ctrl: index,
            ns,
            max_transfer,
            engines,
            controller: shared.clone(),
        };
        log::info!(
            target: "nvme",
            "{}: {} MiB ({}-byte blocks), {} I/O queue(s) of {} entries, {} completion, max transfer {} KiB",
            disk.name,
            ns.bytes() >> 20,
            ns.block_size,
            disk.engines.len(),
            entries,
            if opts.mode == Mode::Irq { "MSI-X interrupt" } else { "polled" },
            max_transfer / 1024
        );
        disks.push(disk);
    }
    Ok(())
}

/// Submits a raw command on disk `disk` for `owner` (the caller's request
/// id); its completion is delivered by [`service`].
///
/// # Safety
///
/// `buf` stays valid and untouched until that completion is delivered (or
/// the kernel powers off).
pub unsafe fn submit(
    disk: usize,
    op: Op,
    lba: u64,
    buf: IoBuf,
    owner: ReqId,
) -> Result<(), DioError> {
    // SAFETY: our caller keeps `buf` valid and untouched until the
    // completion is delivered, which is `Engine::raw`'s contract.
    with_engine(disk, |e| unsafe { e.raw(op, lba, buf, Some(owner)) })
        .unwrap_or(Err(DioError::Unsupported("no such NVMe namespace")))
        .map(|_| ())
}

/// Waits until `done()` holds. Polls the queues, or halts until the next
/// interrupt (a completion's MSI-X or the APIC tick) in irq mode. Deferred
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

/// This core's engines, one per disk.
fn each_engine(mut f: impl FnMut(&mut Dio)) {
    let c = smp::cpu_index();
    for d in disks() {
        let i = engine_of(c, d.engines.len());
        if let Some(e) = d.engines.get(i) {
            f(&mut e.lock());
        }
    }
}

/// What the completion path owes a run loop (see [`reap`]), then the
/// delivery of every finished asynchronous request of this core's queues
/// to `sink(owner id, result)`, in process context (with the engine's lock
/// held: the sink should only record).
pub fn service(mut sink: impl FnMut(ReqId, Result<usize, DioError>)) {
    reap(mode());
    each_engine(|e| {
        e.complete(&mut sink);
    });
}

/// Commands in flight or completions waiting for delivery on this core's
/// queues.
pub fn busy() -> bool {
    let mut busy = false;
    each_engine(|e| busy |= e.queue().qp.in_flight() > 0 || e.pending_completions() > 0);
    busy
}

/// Completions reaped on this core's queues and waiting for delivery
/// ([`service`]).
pub fn has_deliveries() -> bool {
    let mut any = false;
    each_engine(|e| any |= e.pending_completions() > 0);
    any
}

/// Waits for the next completion or interrupt: spins once (poll mode), or
/// halts unless completions wait for delivery (irq mode).
pub fn idle() {
    match mode() {
        Mode::Poll => core::hint::spin_loop(),
        Mode::Irq => {
            interrupts::disable();
            let mut pending = 0;
            each_engine(|e| pending += e.pending_completions());
            if pending > 0 {
                interrupts::enable();
            } else {
                // sti; hlt: an interrupt between the check and the halt
                // still wakes us.
                interrupts::enable_and_hlt();
            }
        }
    }
}

/// Polls this core's queues (poll mode) and reports commands past their
/// deadline (at most once a millisecond): one step of [`wait_until`] and of
/// the network run loop.
fn reap(mode: Mode) {
    // Per core: each core expires its own queues.
    static NEXT_EXPIRY: [AtomicU64; smp::MAX_CPUS] = [const { AtomicU64::new(0) }; smp::MAX_CPUS];
    let next = &NEXT_EXPIRY[smp::cpu_index() % smp::MAX_CPUS];
    let now = time::now_ns();
    let check = now >= next.load(Ordering::Relaxed);
    if check {
        next.store(now + 1_000_000, Ordering::Relaxed);
    }
    each_engine(|e| {
        if mode == Mode::Poll {
            e.poll();
        }
        if check {
            e.expire();
        }
    });
}

/// A raw command on disk `disk`, waited for (polls the queue with
/// interrupts off).
///
/// # Safety
///
/// `buf` is valid for the duration of the call.
pub unsafe fn execute(disk: usize, op: Op, lba: u64, buf: IoBuf) -> Result<(), DioError> {
    // SAFETY: `buf` is valid for the duration of the call (our contract),
    // and a raw command without an owner is waited for inside it.
    with_engine(disk, |e| unsafe { e.raw(op, lba, buf, None) })
        .unwrap_or(Err(DioError::Unsupported("no such NVMe namespace")))
        .map(|_| ())
}

/// Shuts every controller down (normal shutdown notification), before
/// power-off. The first error is returned; every controller is tried.
pub fn shutdown() -> Result<(), NvmeError> {
    let mut r = Ok(());
    let mut done: Option<usize> = None;
    for d in disks() {
        // Once per controller: its namespaces follow one another.
        if done == Some(d.ctrl) {
            continue;
        }
        done = Some(d.ctrl);
        // The controller's lock is only taken with interrupts off.
        if let Err(err) = interrupts::without_interrupts(|| d.controller.shutdown()) {
            log::warn!(target: "nvme", "nvme{}: shutdown: {err}", d.ctrl);
            if r.is_ok() {
                r = Err(err);
            }
        }
    }
    r
}

/// Ends an orderly run (a self-test, the benchmark, a failure at boot):
/// tells every controller of the shutdown first when it is up (CC.SHN, so
/// that a volatile cache is committed and the drive does not count an
/// unsafe shutdown; nothing to do before it is brought up), then powers
/// off with `status`. Not for panics and exceptions, which may hold an
/// engine's lock.
pub fn power_off(status: u8) -> ! {
    if let Err(e) = shutdown() {
        log::warn!(target: "nvme", "controller shutdown: {e}");
    }
    crate::platform::power::exit(status)
}

/// Counters of disk `disk`'s queues, summed over cores.
pub fn stats(disk: usize) -> Option<dioxide_nvme::QueueStats> {
    let d = disks().get(disk)?;
    let mut sum = dioxide_nvme::QueueStats::default();
    for e in &d.engines {
        sum += e.lock().queue().qp.stats();
    }
    Some(sum)
}

/// Read buffers: page-aligned heap memory, whose address is the device
/// address here (identity-mapped heap).
pub use dioxide_iomap::DmaBuf;
