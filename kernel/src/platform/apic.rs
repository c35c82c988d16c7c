//! Local APIC (x2APIC when the CPU has it, else xAPIC through MMIO), the
//! legacy 8259 PICs (remapped and masked), and the APIC timer used as a wake-up
//! tick while the run loop halts.

use crate::mm;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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

pub const SPURIOUS_VECTOR: u8 = 0xff;
pub const TIMER_VECTOR: u8 = 0x30;

static X2APIC: AtomicBool = AtomicBool::new(false);
static XAPIC_BASE: AtomicU64 = AtomicU64::new(0);
static TICKS: AtomicU64 = AtomicU64::new(0);

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
    let mut v = base | (1 << 11);
    if x2 {
        v |= 1 << 10;
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
    write(REG_TIMER_DIV, 0b1011); // divide by 1
    write(REG_LVT_TIMER, (1 << 17) | TIMER_VECTOR as u32);
    write(REG_TIMER_INIT, count);
}

/// Timer ticks so far.
pub fn ticks() -> u64 {
    TICKS.load(Ordering::Relaxed)
}
