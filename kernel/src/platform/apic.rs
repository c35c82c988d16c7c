//! Local APIC (x2APIC when the CPU has it, else xAPIC through MMIO), the
//! legacy 8259 PICs (remapped and masked), the APIC timer used as a wake-up
//! tick while the run loop halts, and inter-processor interrupts.
//!
//! The boot CPU chooses the mode ([`init`]); every application processor
//! uses the same one ([`init_ap`]), so that one set of register accessors
//! (and [`eoi`]) works everywhere. Each CPU has its own tick: the boot
//! CPU's (vector [`TIMER_VECTOR`]) counts [`ticks`]; the others' (vector
//! [`AP_TIMER_VECTOR`]) only bound their `hlt`.

use crate::mm;
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use x86_64::instructions::port::Port;
use x86_64::registers::model_specific::Msr;

const IA32_APIC_BASE: u32 = 0x1b;
const X2APIC_MSR_BASE: u32 = 0x800;

const REG_ID: u32 = 0x20;
const REG_TPR: u32 = 0x80;
const REG_EOI: u32 = 0xb0;
const REG_SVR: u32 = 0xf0;
const REG_LVT_TIMER: u32 = 0x320;
const REG_TIMER_INIT: u32 = 0x380;
const REG_TIMER_CUR: u32 = 0x390;
const REG_TIMER_DIV: u32 = 0x3e0;
/// Interrupt command register: xAPIC low half at 0x300 (writing it sends),
/// destination in 0x310 bits 31:24; x2APIC one 64-bit MSR (0x830),
/// destination in bits 63:32.
const REG_ICR: u32 = 0x300;
const REG_ICR_HIGH: u32 = 0x310;

const IA32_APIC_BASE_EN: u64 = 1 << 11;
const IA32_APIC_BASE_EXTD: u64 = 1 << 10;

pub const SPURIOUS_VECTOR: u8 = 0xff;
/// The boot CPU's timer tick (counted in [`ticks`]).
pub const TIMER_VECTOR: u8 = 0x30;
/// The application processors' timer tick (wakes `hlt`, counts nothing).
pub const AP_TIMER_VECTOR: u8 = 0x31;

static X2APIC: AtomicBool = AtomicBool::new(false);
static XAPIC_BASE: AtomicU64 = AtomicU64::new(0);
static TICKS: AtomicU64 = AtomicU64::new(0);
/// The timer's initial count for one tick, as the boot CPU measured it
/// (0: not started): the application processors' timers use it too.
static TICK_COUNT: AtomicU32 = AtomicU32::new(0);

fn read(reg: u32) -> u32 {
    if X2APIC.load(Ordering::Relaxed) {
        // SAFETY: x2APIC registers are MSRs 0x800 + reg/16; reading has no
        // side effect on memory.
        unsafe { Msr::new(X2APIC_MSR_BASE + reg / 16).read() as u32 }
    } else {
        let base = XAPIC_BASE.load(Ordering::Relaxed);
        // SAFETY: the xAPIC page is mapped uncached by init().
        unsafe { core::ptr::read_volatile((base + reg as u64) as *const u32) }
    }
}

fn write(reg: u32, v: u32) {
    if X2APIC.load(Ordering::Relaxed) {
        // SAFETY: as in read(); writes go to the local APIC only.
        unsafe { Msr::new(X2APIC_MSR_BASE + reg / 16).write(v as u64) }
    } else {
        let base = XAPIC_BASE.load(Ordering::Relaxed);
        // SAFETY: as in read().
        unsafe { core::ptr::write_volatile((base + reg as u64) as *mut u32, v) }
    }
}

/// Remaps the 8259 PICs to vectors 0x20..0x30 (off the exception vectors,
/// where the BIOS leaves them) and masks every line.
pub fn disable_pic() {
    // SAFETY: standard 8259 initialisation sequence on its fixed ports.
    unsafe {
        let mut m_cmd = Port::<u8>::new(0x20);
        let mut m_data = Port::<u8>::new(0x21);
        let mut s_cmd = Port::<u8>::new(0xa0);
        let mut s_data = Port::<u8>::new(0xa1);
        m_cmd.write(0x11);
        s_cmd.write(0x11);
        m_data.write(0x20);
        s_data.write(0x28);
        m_data.write(4);
        s_data.write(2);
        m_data.write(1);
        s_data.write(1);
        m_data.write(0xff);
        s_data.write(0xff);
    }
}

/// Enables the local APIC of this CPU. Returns whether x2APIC mode is used.
pub fn init() -> bool {
    let cpuid = raw_cpuid::CpuId::new();
    let x2 = cpuid.get_feature_info().is_some_and(|f| f.has_x2apic());
    let mut msr = Msr::new(IA32_APIC_BASE);
    // SAFETY: IA32_APIC_BASE exists on every x86_64 CPU.
    let base = unsafe { msr.read() };
    let mut v = base | IA32_APIC_BASE_EN;
    if x2 {
        v |= IA32_APIC_BASE_EXTD;
    }
    // SAFETY: enabling the APIC (and x2APIC mode) is what the kernel wants.
    unsafe { msr.write(v) };
    X2APIC.store(x2, Ordering::Relaxed);
    if !x2 {
        let phys = base & 0xffff_f000;
        mm::map_mmio(phys, 4096).expect("map local APIC");
        XAPIC_BASE.store(phys, Ordering::Relaxed);
    }
    write(REG_TPR, 0);
    write(REG_SVR, 0x100 | SPURIOUS_VECTOR as u32);
    crate::platform::idt::register(TIMER_VECTOR, |_| {
        TICKS.fetch_add(1, Ordering::Relaxed);
    });
    log::info!(target: "apic", "local APIC id {} ({})", id(), if x2 { "x2APIC" } else { "xAPIC" });
    x2
}

/// This CPU's APIC id.
pub fn id() -> u32 {
    if X2APIC.load(Ordering::Relaxed) {
        read(REG_ID)
    } else {
        read(REG_ID) >> 24
    }
}

pub fn eoi() {
    write(REG_EOI, 0);
}

/// The APIC timer's count rate (divide by 1) when it cannot be measured:
/// QEMU's, 1 GHz. Real bus or crystal clocks are 25-200 MHz, which is why
/// it is measured.
const FALLBACK_APIC_HZ: u64 = 1_000_000_000;

/// Measures the APIC timer's count rate against the (calibrated) TSC: a
/// masked one-shot count from 2^32-1 for 10 ms. `None` when the count did
/// not move (no usable timer) or would wrap.
fn measure_timer_hz() -> Option<u64> {
    const WINDOW_NS: u64 = 10_000_000;
    write(REG_TIMER_DIV, 0b1011); // divide by 1
    write(REG_LVT_TIMER, (1 << 16) | TIMER_VECTOR as u32); // masked, one-shot
    write(REG_TIMER_INIT, u32::MAX);
    let t0 = crate::platform::time::now_ns();
    crate::platform::time::spin_ns(WINDOW_NS);
    let cur = read(REG_TIMER_CUR);
    let ns = crate::platform::time::now_ns().saturating_sub(t0);
    write(REG_TIMER_INIT, 0); // stop
    let counted = (u32::MAX - cur) as u64;
    if cur == 0 || counted == 0 || ns == 0 {
        return None;
    }
    Some(counted * 1_000_000_000 / ns)
}

/// Starts the periodic APIC timer, one tick every `period_ms`: a wake-up
/// for halted waits, so that every wait re-checks its deadline even when
/// the awaited interrupt never comes. The timer's rate is measured against
/// the TSC first (a fixed count would tick every 10 ms under QEMU and every
/// 50-400 ms on servers, whose APIC timers count a slower bus or crystal
/// clock); logs the rate.
pub fn start_tick(period_ms: u64) {
    let hz = match measure_timer_hz() {
        Some(hz) => {
            log::info!(target: "apic", "timer {}.{:03} MHz (measured against the TSC), tick {period_ms} ms", hz / 1_000_000, hz / 1000 % 1000);
            hz
        }
        None => {
            log::warn!(target: "apic", "timer rate not measurable; assuming {} MHz", FALLBACK_APIC_HZ / 1_000_000);
            FALLBACK_APIC_HZ
        }
    };
    let count = (hz * period_ms / 1000).clamp(1, u32::MAX as u64) as u32;
    TICK_COUNT.store(count, Ordering::Relaxed);
    periodic(TIMER_VECTOR, count);
}

fn periodic(vector: u8, count: u32) {
    write(REG_TIMER_DIV, 0b1011); // divide by 1
    write(REG_LVT_TIMER, (1 << 17) | vector as u32);
    write(REG_TIMER_INIT, count);
}

/// Whether the local APICs run in x2APIC mode (the boot CPU's choice).
pub fn x2apic() -> bool {
    X2APIC.load(Ordering::Relaxed)
}

/// Enables the calling application processor's local APIC in the boot
/// CPU's mode (x2APIC or xAPIC, at the boot CPU's xAPIC address) and starts
/// its tick at the boot CPU's rate ([`AP_TIMER_VECTOR`]; no tick when the
/// boot CPU started none). Call after the boot CPU's [`init`] and
/// [`start_tick`]. Logs nothing (it runs on the new CPU during start-up).
pub fn init_ap() {
    let mut msr = Msr::new(IA32_APIC_BASE);
    // SAFETY: IA32_APIC_BASE exists on every x86_64 CPU.
    let cur = unsafe { msr.read() };
    let x2 = x2apic();
    let v = if x2 {
        cur | IA32_APIC_BASE_EN | IA32_APIC_BASE_EXTD
    } else {
        // The boot CPU's base: the page `init` mapped (the reset default,
        // 0xfee00000, on every CPU unless firmware moved it).
        let base = XAPIC_BASE.load(Ordering::Relaxed);
        (cur & 0xfff & !IA32_APIC_BASE_EXTD) | base | IA32_APIC_BASE_EN
    };
    // SAFETY: enables this CPU's local APIC in the mode the rest of the
    // kernel drives all APICs in; a CPU in x2APIC mode is only ever asked
    // for x2APIC here (the boot CPU chose it, so the CPUs have it).
    unsafe { msr.write(v) };
    write(REG_TPR, 0);
    write(REG_SVR, 0x100 | SPURIOUS_VECTOR as u32);
    match TICK_COUNT.load(Ordering::Relaxed) {
        0 => {}
        count => periodic(AP_TIMER_VECTOR, count),
    }
}

/// Delivery modes of an IPI (ICR bits 10:8), with the level bit (14) set
/// where the mode needs it.
const ICR_FIXED: u32 = 0b000 << 8;
const ICR_NMI: u32 = 0b100 << 8;
const ICR_INIT: u32 = (0b101 << 8) | (1 << 14);
const ICR_STARTUP: u32 = 0b110 << 8;
/// xAPIC delivery status (ICR bit 12): the previous IPI is still pending.
const ICR_PENDING: u32 = 1 << 12;

/// Sends an IPI: `low` is the ICR's low half (vector, delivery mode,
/// level, shorthand), `dest` the APIC id. In xAPIC mode waits (bounded,
/// ~1 ms) for the previous IPI to leave first; returns false when it did
/// not (the send is not made).
fn send(dest: u32, low: u32) -> bool {
    x86_64::instructions::interrupts::without_interrupts(|| {
        if x2apic() {
            // A WRMSR to the x2APIC ICR is not serializing: what the
            // target is to read must be visible first.
            core::sync::atomic::fence(Ordering::SeqCst);
            // SAFETY: the x2APIC ICR (MSR 0x830), one write sends; the
            // IPI's effect is what the caller asked for.
            unsafe {
                Msr::new(X2APIC_MSR_BASE + REG_ICR / 16).write(((dest as u64) << 32) | low as u64)
            };
            return true;
        }
        let t0 = crate::platform::time::now_ns();
        while read(REG_ICR) & ICR_PENDING != 0 {
            if crate::platform::time::now_ns() - t0 > 1_000_000 {
                return false;
            }
            core::hint::spin_loop();
        }
        // Interrupts are off: no handler on this CPU writes the ICR
        // between the two halves.
        write(REG_ICR_HIGH, dest << 24);
        write(REG_ICR, low);
        true
    })
}

/// A fixed interrupt with `vector` to the CPU with APIC id `dest`.
pub fn send_ipi(dest: u32, vector: u8) -> bool {
    send(dest, ICR_FIXED | vector as u32)
}

/// An INIT IPI (assert) to `dest`: the CPU resets and waits for a startup
/// IPI.
pub fn send_init(dest: u32) -> bool {
    send(dest, ICR_INIT)
}

/// A startup IPI to `dest`: a CPU waiting for one starts in real mode at
/// `page` (4 KiB aligned, below 1 MiB: the vector is `page >> 12`).
pub fn send_startup(dest: u32, page: u64) -> bool {
    send(dest, ICR_STARTUP | (page >> 12) as u32)
}

/// An NMI to the CPU with APIC id `dest`.
pub fn send_nmi(dest: u32) -> bool {
    send(dest, ICR_NMI)
}

/// Timer ticks so far.
pub fn ticks() -> u64 {
    TICKS.load(Ordering::Relaxed)
}
