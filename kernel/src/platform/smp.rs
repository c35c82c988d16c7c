//! Symmetric multiprocessing: starting the application processors (APs)
//! and handing them work.
//!
//! # Start-up ([`init`], on the boot CPU)
//!
//! The CPUs are the enabled local APIC and x2APIC entries of the ACPI MADT
//! (at most [`MAX_CPUS`], the MADT reader's limit, and at most `smp=N`).
//! Every AP is sent an INIT IPI (those beyond the cap too: INIT parks a
//! CPU in wait-for-SIPI, where it stays whatever happens to the memory its
//! firmware left it looping in); after 10 ms each AP to start is sent a
//! startup IPI, 200 µs later a second one (Intel SDM vol. 3A, "Typical BSP
//! Initialization Sequence";
//! a CPU that is already running ignores the second), and the boot CPU
//! waits (halted, woken by the AP's IPI or its tick) up to
//! [`START_TIMEOUT_NS`] for it to come online. One AP at a time: they share
//! the start-up page.
//!
//! The start-up page ([`crate::mm::frame::trampoline_page`]: usable RAM
//! below 1 MiB, which the frame allocator never hands out) gets a copy of
//! the trampoline below. A startup IPI starts the AP in real mode at its
//! first byte; the trampoline loads its own small GDT, enters 32-bit
//! protected mode, turns on PAE, the boot CPU's page tables (CR3, which
//! must be below 4 GiB: the kernel's root is its first frame), long mode
//! (EFER.LME, and NXE if the boot CPU has it) and paging (the boot CPU's
//! CR0), far-returns into 64-bit code, takes the stack the boot CPU left in
//! the page and calls [`ap_entry`] with the AP's [`Launch`].
//!
//! `ap_entry` first claims its launch (a compare-and-swap on its state: a
//! CPU the boot CPU has given up on must not run, since its stack and
//! per-CPU slot may go to the next one), then points GS at its [`PerCpu`],
//! loads its own GDT and TSS (`gdt::CpuTables`, with its own IST stacks)
//! and the shared IDT (see `idt.rs` for why one table serves every CPU),
//! sets CR4, XCR0 and the PAT as the boot CPU has them, enables its local
//! APIC in the boot CPU's mode and starts its tick (`apic::init_ap`), says
//! it is online and IPIs the boot CPU. A CPU that does not come online in
//! time is logged (`smp: cpu N (apic id X) did not start`), sent INIT again
//! and left out; its stack and tables are not reused.
//!
//! # Per-CPU data
//!
//! [`PerCpu`] slots in a static array, one per CPU index (0 = the boot CPU,
//! then the APs in the order they came online: dense, 0..[`cpu_count`]).
//! Each CPU's GS base points at its slot, whose first field is the index:
//! [`cpu_index`] is one `mov` from `gs:[0]`. Before `init` only the boot
//! CPU runs and `cpu_index` is 0.
//!
//! # Work ([`run_on`], [`on_each_cpu`])
//!
//! Each AP, once online, runs jobs from its queue in order, and when the
//! queue is empty halts with interrupts on (it never spins: under QEMU many
//! vCPUs share few host cores). [`run_on`] queues a job and wakes the AP
//! with a fixed IPI ([`WAKE_VECTOR`]); its tick bounds every sleep anyway.
//! A job that never returns makes that AP a dedicated core (a per-core
//! loop); later jobs for it then never run. [`on_each_cpu`] runs a closure
//! on every CPU at once, the caller's included, and returns the results
//! when all are done. The boot CPU takes no jobs: it runs `kmain`.
//!
//! # Time
//!
//! Every CPU reads the same TSC rate ([`crate::platform::time`]): the TSCs
//! of one machine count at one invariant rate from the same reset (QEMU
//! gives all vCPUs one offset), so `time::now_ns` means the same on every
//! CPU.
//!
//! # Page tables
//!
//! One set, shared. After `init` mappings are only ever added (MMIO,
//! `mm::map_mmio`), never changed or removed, so no other CPU can hold a
//! stale translation (a not-present entry is never cached) and no TLB
//! shootdown is needed.

use crate::platform::irq_mutex::IrqMutex;
use crate::platform::{acpi, apic, gdt, idt, time};
use alloc::alloc::{alloc, Layout};
use alloc::boxed::Box;
use alloc::collections::VecDeque;
use alloc::vec::Vec;
use core::fmt;
use core::sync::atomic::{
    fence, AtomicBool, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering,
};
use x86_64::instructions::interrupts;
use x86_64::registers::model_specific::Msr;

/// CPUs at most: the MADT reader keeps this many (`dioxide_firmware`).
pub const MAX_CPUS: usize = dioxide_firmware::tables::MAX_CPUS;

/// Each AP's stack: as large as the boot CPU's (`bootloader/src/entry.S`),
/// so that code runs the same on any CPU. From the heap; no guard page.
pub const AP_STACK: usize = 256 * 1024;

/// The IPI that wakes a halted CPU (a job for it, a job of its finished).
/// Its handler does nothing: leaving `hlt` is the point.
pub const WAKE_VECTOR: u8 = 0x32;

/// How long the boot CPU waits for an AP to come online after its second
/// startup IPI. Hardware takes microseconds; QEMU under TCG, with many
/// vCPUs on a busy host, can take tens of milliseconds.
pub const START_TIMEOUT_NS: u64 = 1_000_000_000;

/// A job for [`run_on`].
pub type Job = Box<dyn FnOnce() + Send + 'static>;

/// One CPU's slot. `index` must stay the first field: [`cpu_index`] reads
/// it at `gs:[0]`.
#[repr(C)]
struct PerCpu {
    index: AtomicUsize,
    apic_id: AtomicU32,
    /// The stack the CPU runs on: `[bottom, top)`.
    stack_bottom: AtomicU64,
    stack_top: AtomicU64,
    /// Its TSS (as it was set up; [`gdt::current_tss`] reads the loaded
    /// one).
    tss: AtomicU64,
    /// Jobs queued for it, in order.
    jobs: IrqMutex<VecDeque<Job>>,
    /// Jobs queued or running.
    pending: AtomicUsize,
}

impl PerCpu {
    const fn new() -> PerCpu {
        PerCpu {
            index: AtomicUsize::new(0),
            apic_id: AtomicU32::new(0),
            stack_bottom: AtomicU64::new(0),
            stack_top: AtomicU64::new(0),
            tss: AtomicU64::new(0),
            jobs: IrqMutex::new(VecDeque::new()),
            pending: AtomicUsize::new(0),
        }
    }
}

static CPUS: [PerCpu; MAX_CPUS] = [const { PerCpu::new() }; MAX_CPUS];
/// CPUs online: slots `0..ONLINE` are in use.
static ONLINE: AtomicUsize = AtomicUsize::new(1);
/// Every running CPU's GS base points at its slot.
static GS_READY: AtomicBool = AtomicBool::new(false);

/// This CPU's index: 0 for the boot CPU, then 1.. in the order the APs came
/// online (dense: always below [`cpu_count`]).
#[inline]
pub fn cpu_index() -> usize {
    if !GS_READY.load(Ordering::Relaxed) {
        return 0;
    }
    let i: usize;
    // SAFETY: once GS_READY is set, every CPU that runs kernel code has its
    // GS base on its `PerCpu` slot (the boot CPU set it before setting the
    // flag; an AP sets it before anything else in `ap_entry`), a static
    // whose first field (repr(C)) is the index; an aligned 8-byte read.
    unsafe {
        core::arch::asm!("mov {}, gs:[0]", out(reg) i, options(nostack, readonly, preserves_flags))
    };
    i
}

/// CPUs online (1 until [`init`] started others; fixed after it).
pub fn cpu_count() -> usize {
    ONLINE.load(Ordering::Acquire)
}

/// The APIC id of CPU `cpu` (`cpu < cpu_count()`; panics otherwise, a
/// caller's bug).
pub fn apic_id_of(cpu: usize) -> u32 {
    assert!(cpu < cpu_count(), "cpu {cpu} is not online");
    CPUS[cpu].apic_id.load(Ordering::Relaxed)
}

/// The stack CPU `cpu` runs on, `[bottom, top)` (`cpu < cpu_count()`).
pub fn stack_of(cpu: usize) -> core::ops::Range<u64> {
    assert!(cpu < cpu_count(), "cpu {cpu} is not online");
    let c = &CPUS[cpu];
    c.stack_bottom.load(Ordering::Relaxed)..c.stack_top.load(Ordering::Relaxed)
}

/// The TSS CPU `cpu` was given (`cpu < cpu_count()`).
pub fn tss_of(cpu: usize) -> u64 {
    assert!(cpu < cpu_count(), "cpu {cpu} is not online");
    CPUS[cpu].tss.load(Ordering::Relaxed)
}

/// The calling CPU, for reports: `cpu 2 (apic id 2)`.
pub struct Here;

impl fmt::Display for Here {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !GS_READY.load(Ordering::Relaxed) {
            return f.write_str("cpu 0");
        }
        let i = cpu_index();
        write!(
            f,
            "cpu {i} (apic id {})",
            CPUS[i].apic_id.load(Ordering::Relaxed)
        )
    }
}

/// Why [`run_on`] did not take a job.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunOnError {
    /// No such CPU online.
    NoSuchCpu(usize),
    /// CPU 0, the boot CPU, runs `kmain` and takes no jobs.
    BootCpu,
}

impl fmt::Display for RunOnError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RunOnError::NoSuchCpu(c) => write!(f, "cpu {c} is not online"),
            RunOnError::BootCpu => f.write_str("cpu 0 (the boot CPU) takes no jobs"),
        }
    }
}

/// Ends CPU `cpu`'s `hlt` (the wake-up IPI), e.g. after queueing work for
/// a loop it runs; nothing for a CPU that is not online.
pub fn wake(cpu: usize) {
    if cpu < cpu_count() {
        apic::send_ipi(apic_id_of(cpu), WAKE_VECTOR);
    }
}

/// Queues `job` on AP `cpu` (`1 <= cpu < cpu_count()`) and wakes it; jobs
/// of one CPU run one after the other, in the order queued. Returns at
/// once; on an error the job is dropped, not run. A job that never returns
/// keeps its CPU for good (a per-core loop). Callable from any CPU,
/// including from a job (a job queued on its own CPU runs after it); not
/// from an interrupt handler (queueing may allocate).
pub fn run_on(cpu: usize, job: Job) -> Result<(), RunOnError> {
    if cpu == 0 {
        return Err(RunOnError::BootCpu);
    }
    if cpu >= cpu_count() {
        return Err(RunOnError::NoSuchCpu(cpu));
    }
    let c = &CPUS[cpu];
    c.pending.fetch_add(1, Ordering::AcqRel);
    c.jobs.lock().push_back(job);
    // If the IPI cannot be sent (an xAPIC whose previous IPI is stuck), the
    // AP's tick wakes it within one period and it finds the job then.
    apic::send_ipi(c.apic_id.load(Ordering::Relaxed), WAKE_VECTOR);
    Ok(())
}

/// AP `cpu` has no job queued or running (always true of CPU 0 and of CPUs
/// not online).
pub fn is_idle(cpu: usize) -> bool {
    cpu >= MAX_CPUS || CPUS[cpu].pending.load(Ordering::Acquire) == 0
}

/// Runs `f(cpu)` on every online CPU at once — on the caller (the boot
/// CPU) and, as a job, on each AP — and returns the results in CPU order
/// when all have finished. An AP runs it after the jobs queued before it,
/// so this is also the way to wait for those (`on_each_cpu(|_| ())`); an
/// AP that runs a job that never returns makes this wait for ever. Call it
/// from the boot CPU (panics elsewhere: the boot CPU takes no jobs, so an
/// AP could never have it run its share). The caller halts (interrupts on)
/// while it waits, and is woken by the last AP to finish: never call it
/// holding an `IrqMutex` (its interrupts would come on under the lock).
pub fn on_each_cpu<T, F>(f: F) -> Vec<T>
where
    T: Send,
    F: Fn(usize) -> T + Sync,
{
    assert_eq!(cpu_index(), 0, "on_each_cpu runs from the boot CPU");
    let n = cpu_count();
    let results: Vec<spin::Mutex<Option<T>>> = (0..n).map(|_| spin::Mutex::new(None)).collect();
    let left = AtomicUsize::new(n - 1);
    let caller = CPUS[0].apic_id.load(Ordering::Relaxed);
    {
        let (f, left) = (&f, &left);
        for (cpu, slot) in results.iter().enumerate().skip(1) {
            let job = move || {
                let r = f(cpu);
                *slot.lock() = Some(r);
                // The last access to the caller's frame: once `left` is 0
                // the caller may return. `caller` is a copy.
                if left.fetch_sub(1, Ordering::AcqRel) == 1 {
                    apic::send_ipi(caller, WAKE_VECTOR);
                }
            };
            let job: Box<dyn FnOnce() + Send + '_> = Box::new(job);
            // SAFETY: only the lifetime changes (same fat pointer). The job
            // borrows `f`, `results` and `left` from this frame, and this
            // function does not return before `left` reaches 0, which each
            // job does as its last use of them; a job is never dropped
            // unrun (`run_on` with 1 <= cpu < n accepts it), and nothing
            // unwinds (a panic powers the machine off).
            let job: Job =
                unsafe { core::mem::transmute::<Box<dyn FnOnce() + Send + '_>, Job>(job) };
            let queued = run_on(cpu, job);
            debug_assert!(queued.is_ok());
        }
        let r = f(0);
        *results[0].lock() = Some(r);
        wait_until(|| left.load(Ordering::Acquire) == 0);
    }
    results
        .into_iter()
        .map(|m| m.into_inner().expect("every CPU stored its result"))
        .collect()
}

/// Halts (interrupts on) until `done()`; restores the caller's interrupt
/// flag. The check runs with interrupts off and the halt is `sti; hlt`,
/// so a wake-up between the two is not lost.
fn wait_until(mut done: impl FnMut() -> bool) {
    let were = interrupts::are_enabled();
    loop {
        interrupts::disable();
        if done() {
            break;
        }
        interrupts::enable_and_hlt();
    }
    if were {
        interrupts::enable();
    }
}

/// Stops every other online CPU with an NMI (for power-off and reset: see
/// `power::exit`; the NMI handler halts when the machine is going down).
/// One IPI per CPU rather than the all-but-self shorthand, which would also
/// reach CPUs that were never started. Takes no lock.
pub fn stop_others() {
    let (me, n) = (cpu_index(), cpu_count());
    if n == 1 {
        return;
    }
    for (cpu, c) in CPUS.iter().enumerate().take(n) {
        if cpu != me {
            apic::send_nmi(c.apic_id.load(Ordering::Relaxed));
        }
    }
}

// ---------------------------------------------------------------------
// Start-up
// ---------------------------------------------------------------------

// The trampoline, copied to the start-up page. Position independent:
// real-mode code addresses it through CS (= page >> 4) and DS, the rest
// through EBX/RBX (= the page's address, computed from CS). Fields named
// `smp_tr_*` are written by the boot CPU (`prepare`) before any startup
// IPI; the far-jump target and the GDT base are absolute addresses.
core::arch::global_asm!(
    ".pushsection .text.smp_trampoline, \"ax\"",
    ".global smp_trampoline_start",
    ".global smp_trampoline_end",
    ".global smp_tr_far32",
    ".global smp_tr_32",
    ".global smp_tr_gdt",
    ".global smp_tr_gdtr_base",
    ".global smp_tr_cr3",
    ".global smp_tr_efer",
    ".global smp_tr_cr0",
    ".global smp_tr_stack",
    ".global smp_tr_arg",
    ".global smp_tr_entry",
    ".balign 16",
    ".code16",
    "smp_trampoline_start:",
    "cli",
    "cld",
    // EBX = the page's address; DS = CS for the real-mode operands.
    "xor ebx, ebx",
    "mov bx, cs",
    "mov ds, bx",
    "shl ebx, 4",
    "lgdt [O_gdtr]",
    "mov eax, cr0",
    "or eax, 1",
    "mov cr0, eax",
    // ljmp 0x08:smp_tr_32 with a 32-bit offset (66 EA imm32 imm16); the
    // offset is patched to the page's copy.
    ".byte 0x66, 0xea",
    "smp_tr_far32:",
    ".long 0",
    ".short 0x08",
    ".code32",
    "smp_tr_32:",
    "mov ax, 0x10",
    "mov ds, ax",
    "mov es, ax",
    "mov ss, ax",
    "mov fs, ax",
    "mov gs, ax",
    // A few bytes of stack for the far return: the top of the page.
    "lea esp, [ebx + 4096]",
    // CR4: PAE (5), OSFXSR (9), OSXMMEXCPT (10); the rest in ap_entry.
    "mov eax, cr4",
    "or eax, (1 << 5) | (1 << 9) | (1 << 10)",
    "mov cr4, eax",
    "mov eax, [ebx + O_cr3]",
    "mov cr3, eax",
    "mov ecx, 0xc0000080",
    "rdmsr",
    "or eax, [ebx + O_efer]",
    "wrmsr",
    // The boot CPU's CR0: PG and PE, caches on (INIT left CD and NW set).
    "mov eax, [ebx + O_cr0]",
    "mov cr0, eax",
    "push 0x18",
    "lea eax, [ebx + O_64]",
    "push eax",
    "retf",
    ".code64",
    "smp_tr_64:",
    "mov ax, 0x10",
    "mov ds, ax",
    "mov es, ax",
    "mov ss, ax",
    // The upper halves of 64-bit registers are undefined after the switch.
    "mov ebx, ebx",
    "mov rsp, [rbx + O_stack]",
    "mov rdi, [rbx + O_arg]",
    "mov rax, [rbx + O_entry]",
    "xor ebp, ebp",
    "call rax",
    "2:",
    "cli",
    "hlt",
    "jmp 2b",
    ".balign 16",
    // null, 32-bit code (0x08), data (0x10), 64-bit code (0x18)
    "smp_tr_gdt:",
    ".quad 0",
    ".quad 0x00cf9a000000ffff",
    ".quad 0x00cf92000000ffff",
    ".quad 0x00af9a000000ffff",
    "smp_tr_gdtr:",
    ".short 31",
    "smp_tr_gdtr_base:",
    ".long 0",
    ".balign 8",
    "smp_tr_cr3:",
    ".quad 0",
    "smp_tr_efer:",
    ".quad 0",
    "smp_tr_cr0:",
    ".quad 0",
    "smp_tr_stack:",
    ".quad 0",
    "smp_tr_arg:",
    ".quad 0",
    "smp_tr_entry:",
    ".quad 0",
    "smp_trampoline_end:",
    // Offsets from the start (one symbol per memory operand).
    ".set O_64, smp_tr_64 - smp_trampoline_start",
    ".set O_arg, smp_tr_arg - smp_trampoline_start",
    ".set O_cr0, smp_tr_cr0 - smp_trampoline_start",
    ".set O_cr3, smp_tr_cr3 - smp_trampoline_start",
    ".set O_efer, smp_tr_efer - smp_trampoline_start",
    ".set O_entry, smp_tr_entry - smp_trampoline_start",
    ".set O_gdtr, smp_tr_gdtr - smp_trampoline_start",
    ".set O_stack, smp_tr_stack - smp_trampoline_start",
    ".code64",
    ".popsection",
);

extern "C" {
    static smp_trampoline_start: u8;
    static smp_trampoline_end: u8;
    static smp_tr_far32: u8;
    static smp_tr_32: u8;
    static smp_tr_gdt: u8;
    static smp_tr_gdtr_base: u8;
    static smp_tr_cr3: u8;
    static smp_tr_efer: u8;
    static smp_tr_cr0: u8;
    static smp_tr_stack: u8;
    static smp_tr_arg: u8;
    static smp_tr_entry: u8;
    // The boot CPU's stack (bootloader/src/entry.S).
    static boot_stack_bottom: u8;
    static boot_stack_top: u8;
}

/// The start-up page with the trampoline copied in.
struct Trampoline {
    page: u64,
}

/// The offset of a trampoline symbol from its start.
fn tr_offset(sym: *const u8) -> u64 {
    sym as u64 - core::ptr::addr_of!(smp_trampoline_start) as u64
}

impl Trampoline {
    /// Copies the trampoline to `page` and fills in what is the same for
    /// every AP.
    ///
    /// # Safety
    /// `page` is a 4 KiB page of RAM below 1 MiB, identity mapped, that
    /// nothing else uses (`frame::trampoline_page`).
    unsafe fn prepare(page: u64, cr3: u64, efer: u64, cr0: u64) -> Trampoline {
        let start = core::ptr::addr_of!(smp_trampoline_start);
        let len = tr_offset(core::ptr::addr_of!(smp_trampoline_end)) as usize;
        assert!(
            len <= 4096 - 64,
            "the trampoline and its stack fit one page"
        );
        // SAFETY: the caller gives the page; `len` bytes of code from the
        // kernel image into it.
        unsafe { core::ptr::copy_nonoverlapping(start, page as *mut u8, len) };
        let t = Trampoline { page };
        t.put32(
            core::ptr::addr_of!(smp_tr_far32),
            (page + tr_offset(core::ptr::addr_of!(smp_tr_32))) as u32,
        );
        t.put32(
            core::ptr::addr_of!(smp_tr_gdtr_base),
            (page + tr_offset(core::ptr::addr_of!(smp_tr_gdt))) as u32,
        );
        t.put64(core::ptr::addr_of!(smp_tr_cr3), cr3);
        t.put64(core::ptr::addr_of!(smp_tr_efer), efer);
        t.put64(core::ptr::addr_of!(smp_tr_cr0), cr0);
        t.put64(
            core::ptr::addr_of!(smp_tr_entry),
            ap_entry as *const () as u64,
        );
        t
    }

    fn put32(&self, field: *const u8, v: u32) {
        // SAFETY: `field` is a symbol inside the trampoline, so the address
        // is inside the page `prepare` was given (which only this CPU
        // writes, while no AP runs the trampoline); unaligned is fine.
        unsafe { core::ptr::write_unaligned((self.page + tr_offset(field)) as *mut u32, v) }
    }

    fn put64(&self, field: *const u8, v: u64) {
        // SAFETY: as in `put32`.
        unsafe { core::ptr::write_unaligned((self.page + tr_offset(field)) as *mut u64, v) }
    }

    /// The stack and argument of the next AP. Only while no AP runs the
    /// trampoline (the previous one has claimed its launch, or was sent
    /// INIT).
    fn set_launch(&self, stack_top: u64, launch: &'static Launch) {
        self.put64(core::ptr::addr_of!(smp_tr_stack), stack_top);
        self.put64(
            core::ptr::addr_of!(smp_tr_arg),
            launch as *const Launch as u64,
        );
        // The page before the startup IPI (x2APIC ICR writes are not
        // serializing).
        fence(Ordering::SeqCst);
    }
}

const WAITING: u8 = 0;
const CLAIMED: u8 = 1;
const ONLINE_STATE: u8 = 2;
const ABANDONED: u8 = 3;

/// What the boot CPU hands one AP (leaked: an AP given up on may still
/// read it).
struct Launch {
    index: usize,
    state: AtomicU8,
    tables: &'static gdt::CpuTables,
    boot: BootCpu,
}

/// The boot CPU's settings every AP copies: CR4 (without LA57, which
/// cannot change in long mode), the PAT and, with CR4.OSXSAVE, XCR0; and
/// its APIC id, to say "online" to.
#[derive(Clone, Copy)]
struct BootCpu {
    cr4: u64,
    pat: u64,
    xcr0: Option<u64>,
    apic_id: u32,
}

const IA32_PAT: u32 = 0x277;
const IA32_EFER: u32 = 0xc000_0080;
const IA32_GS_BASE: u32 = 0xc000_0101;
const EFER_LME: u64 = 1 << 8;
const EFER_NXE: u64 = 1 << 11;
const CR4_LA57: u64 = 1 << 12;
const CR4_OSXSAVE: u64 = 1 << 18;

fn set_gs_base(slot: &'static PerCpu) {
    // SAFETY: IA32_GS_BASE only sets where `gs:` operands point; nothing
    // but `cpu_index` uses GS, and it expects this slot.
    unsafe { Msr::new(IA32_GS_BASE).write(slot as *const PerCpu as u64) };
}

fn read_cr(n: u8) -> u64 {
    let v: u64;
    // SAFETY: reading a control register has no side effect.
    unsafe {
        match n {
            0 => {
                core::arch::asm!("mov {}, cr0", out(reg) v, options(nomem, nostack, preserves_flags))
            }
            3 => {
                core::arch::asm!("mov {}, cr3", out(reg) v, options(nomem, nostack, preserves_flags))
            }
            _ => {
                core::arch::asm!("mov {}, cr4", out(reg) v, options(nomem, nostack, preserves_flags))
            }
        }
    }
    v
}

fn xgetbv0() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: only called with CR4.OSXSAVE set, where XGETBV(0) is valid.
    unsafe {
        core::arch::asm!("xgetbv", in("ecx") 0, out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags))
    };
    (hi as u64) << 32 | lo as u64
}

/// The Rust entry of an AP, called by the trampoline on the AP's own stack.
extern "C" fn ap_entry(launch: &'static Launch) -> ! {
    if launch
        .state
        .compare_exchange(WAITING, CLAIMED, Ordering::AcqRel, Ordering::Acquire)
        .is_err()
    {
        // Given up on (too late): its slot and stack are not ours.
        crate::platform::power::halt_forever();
    }
    let slot = &CPUS[launch.index];
    set_gs_base(slot);
    launch.tables.load();
    idt::load();
    // SAFETY: the boot CPU's CR4 (less LA57), valid on this CPU of the
    // same machine: the same features, paging already in the same mode.
    unsafe {
        core::arch::asm!("mov cr4, {}", in(reg) launch.boot.cr4, options(nostack, preserves_flags))
    };
    if let Some(x) = launch.boot.xcr0 {
        // SAFETY: CR4.OSXSAVE is set (it was on the boot CPU); the boot
        // CPU's XCR0 is valid here too.
        unsafe {
            core::arch::asm!("xsetbv", in("ecx") 0, in("eax") x as u32, in("edx") (x >> 32) as u32, options(nomem, nostack, preserves_flags))
        };
    }
    // SAFETY: the boot CPU's PAT: the memory types its page tables (now
    // ours) were written for.
    unsafe { Msr::new(IA32_PAT).write(launch.boot.pat) };
    apic::init_ap();
    slot.apic_id.store(apic::id(), Ordering::Relaxed);
    slot.tss.store(gdt::current_tss(), Ordering::Relaxed);
    launch.state.store(ONLINE_STATE, Ordering::Release);
    apic::send_ipi(launch.boot.apic_id, WAKE_VECTOR);
    idle_loop(slot)
}

/// An AP's life once online: run queued jobs, halt when there are none.
fn idle_loop(slot: &'static PerCpu) -> ! {
    loop {
        interrupts::disable();
        // (The guard restores "interrupts off" on release.)
        let job = slot.jobs.lock().pop_front();
        match job {
            Some(job) => {
                interrupts::enable();
                job();
                slot.pending.fetch_sub(1, Ordering::AcqRel);
            }
            // `sti; hlt`: an IPI sent after the queue was found empty is
            // taken when the halt begins, and ends it.
            None => interrupts::enable_and_hlt(),
        }
    }
}

/// How one AP's start went.
enum Started {
    Online,
    /// It never claimed its launch (no sign of life): sent INIT, left out.
    NoResponse,
    /// It claimed its launch but did not finish its set-up: its slot may
    /// be in use, so no more CPUs are started.
    Stuck,
    /// No memory for its stack or tables.
    NoMemory,
}

/// Starts the AP with APIC id `apic_id` as CPU `index` (INIT was sent at
/// least 10 ms ago).
fn start_one(t: &Trampoline, index: usize, apic_id: u32, boot: BootCpu) -> Started {
    let Some(tables) = gdt::CpuTables::new() else {
        return Started::NoMemory;
    };
    let Ok(layout) = Layout::from_size_align(AP_STACK, 16) else {
        return Started::NoMemory;
    };
    // SAFETY: a non-zero size. The stack is never freed: a CPU given up on
    // may still be using it.
    let bottom = unsafe { alloc(layout) };
    if bottom.is_null() {
        return Started::NoMemory;
    }
    let (bottom, top) = (bottom as u64, bottom as u64 + AP_STACK as u64);
    let slot = &CPUS[index];
    slot.index.store(index, Ordering::Relaxed);
    slot.apic_id.store(apic_id, Ordering::Relaxed);
    slot.stack_bottom.store(bottom, Ordering::Relaxed);
    slot.stack_top.store(top, Ordering::Relaxed);
    slot.tss.store(tables.tss_addr(), Ordering::Relaxed);
    let launch: &'static Launch = Box::leak(Box::new(Launch {
        index,
        state: AtomicU8::new(WAITING),
        tables,
        boot,
    }));
    t.set_launch(top, launch);
    apic::send_startup(apic_id, t.page);
    time::spin_ns(200_000);
    apic::send_startup(apic_id, t.page);
    time::spin_ns(200_000);
    let t0 = time::now_ns();
    let online = || launch.state.load(Ordering::Acquire) == ONLINE_STATE;
    wait_until(|| online() || time::now_ns() - t0 > START_TIMEOUT_NS);
    if online() {
        return Started::Online;
    }
    match launch
        .state
        .compare_exchange(WAITING, ABANDONED, Ordering::AcqRel, Ordering::Acquire)
    {
        Ok(_) => {
            // Back to wait-for-SIPI, so that it cannot wake later and run
            // the trampoline set up for the next CPU.
            apic::send_init(apic_id);
            time::spin_ns(1_000_000);
            Started::NoResponse
        }
        Err(_) => {
            // Claimed: it runs; give it as long again to finish.
            let t1 = time::now_ns();
            wait_until(|| online() || time::now_ns() - t1 > START_TIMEOUT_NS);
            if online() {
                Started::Online
            } else {
                Started::Stuck
            }
        }
    }
}

/// Sets up the boot CPU's per-CPU slot and starts the APs the MADT lists
/// (at most `cap` CPUs in all, the boot CPU included: `smp=N`; `None`: all,
/// up to [`MAX_CPUS`]). Call once, on the boot CPU, after `apic::init` and
/// `apic::start_tick` and with the heap up. Logs `smp: N of M CPUs
/// online`, and one line per CPU that did not start.
pub fn init(cap: Option<u64>) {
    let boot_apic_id = apic::id();
    let slot = &CPUS[0];
    slot.index.store(0, Ordering::Relaxed);
    slot.apic_id.store(boot_apic_id, Ordering::Relaxed);
    slot.stack_bottom.store(
        core::ptr::addr_of!(boot_stack_bottom) as u64,
        Ordering::Relaxed,
    );
    slot.stack_top.store(
        core::ptr::addr_of!(boot_stack_top) as u64,
        Ordering::Relaxed,
    );
    slot.tss.store(gdt::current_tss(), Ordering::Relaxed);
    set_gs_base(slot);
    GS_READY.store(true, Ordering::Release);
    idt::register(WAKE_VECTOR, |_| {});
    idt::register(apic::AP_TIMER_VECTOR, |_| {});

    let cap = cap.map_or(MAX_CPUS, |c| c.clamp(1, MAX_CPUS as u64) as usize);
    let capped = if cap < MAX_CPUS {
        alloc::format!(", smp={cap}")
    } else {
        alloc::string::String::new()
    };
    let Some(madt) = acpi::facts().and_then(|f| f.madt) else {
        log::info!(target: "smp", "no MADT: 1 of 1 CPUs online");
        return;
    };
    if madt.cpus_dropped > 0 {
        log::warn!(target: "smp", "the MADT lists {} CPUs beyond the {MAX_CPUS} this kernel uses", madt.cpus_dropped);
    }
    let aps: Vec<u32> = madt
        .enabled_apic_ids()
        .filter(|&id| id != boot_apic_id)
        .collect();
    let total = aps.len() + 1;
    if aps.is_empty() {
        log::info!(target: "smp", "1 of 1 CPUs online");
        return;
    }
    let x2 = apic::x2apic();
    let Some(page) = crate::mm::frame::trampoline_page() else {
        log::warn!(target: "smp", "no usable page below 1 MiB for the start-up code: 1 of {total} CPUs online");
        return;
    };
    let cr3 = read_cr(3) & !0xfff;
    if cr3 >= 1 << 32 {
        log::warn!(target: "smp", "page tables at {cr3:#x}, above 4 GiB (out of the start-up code's reach): 1 of {total} CPUs online");
        return;
    }
    // SAFETY: IA32_EFER and IA32_PAT exist on every x86_64 CPU; reads only.
    let (efer, pat) = unsafe { (Msr::new(IA32_EFER).read(), Msr::new(IA32_PAT).read()) };
    let cr4 = read_cr(4);
    let boot = BootCpu {
        cr4: cr4 & !CR4_LA57,
        pat,
        xcr0: (cr4 & CR4_OSXSAVE != 0).then(xgetbv0),
        apic_id: boot_apic_id,
    };
    // SAFETY: the frame allocator keeps this page (usable RAM below 1 MiB,
    // identity mapped) for this code alone.
    let t = unsafe {
        Trampoline::prepare(
            page,
            cr3,
            EFER_LME | (efer & EFER_NXE),
            read_cr(0) & 0xffff_ffff,
        )
    };
    log::debug!(target: "smp", "start-up code at {page:#x}; {} APs listed", aps.len());

    let t0 = time::now_ns();
    // INIT every AP: those to start, and the others, to park them.
    let mut reachable = Vec::with_capacity(aps.len());
    for &id in &aps {
        if !x2 && id >= 0xff {
            log::warn!(target: "smp", "apic id {id} cannot be reached in xAPIC mode: not started");
            continue;
        }
        if apic::send_init(id) {
            reachable.push(id);
        } else {
            log::warn!(target: "smp", "INIT to apic id {id} not sent (ICR busy): not started");
        }
    }
    time::spin_ns(10_000_000);
    for &id in reachable.iter().take(cap - 1) {
        let index = cpu_count();
        match start_one(&t, index, id, boot) {
            Started::Online => {
                ONLINE.store(index + 1, Ordering::Release);
                log::debug!(target: "smp", "cpu {index} (apic id {id}) online");
            }
            Started::NoResponse => {
                log::warn!(target: "smp", "cpu {index} (apic id {id}) did not start");
            }
            Started::Stuck => {
                log::error!(target: "smp", "cpu {index} (apic id {id}) started but did not finish its set-up: no more CPUs started");
                break;
            }
            Started::NoMemory => {
                log::error!(target: "smp", "no memory for cpu {index}'s stack and tables: no more CPUs started");
                break;
            }
        }
    }
    log::info!(
        target: "smp",
        "{} of {total} CPUs online ({}, {} ms{capped})",
        cpu_count(),
        if x2 { "x2APIC" } else { "xAPIC" },
        (time::now_ns() - t0) / 1_000_000
    );
}
