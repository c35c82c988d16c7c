//! Time from the TSC, calibrated against the PIT (channel 2, 10 ms).
//!
//! On machines without a working PIT gate the calibration loop is bounded and
//! CPUID leaf 0x15/0x16 is used instead.

use core::sync::atomic::{AtomicU64, Ordering};
use x86_64::instructions::port::Port;

static TSC_HZ: AtomicU64 = AtomicU64::new(0);
/// ns = (tsc * MULT) >> 32
static MULT: AtomicU64 = AtomicU64::new(0);
static BOOT_TSC: AtomicU64 = AtomicU64::new(0);

#[inline(always)]
pub fn rdtsc() -> u64 {
    // SAFETY: RDTSC only reads the time-stamp counter.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// Nanoseconds since calibration.
#[inline]
pub fn now_ns() -> u64 {
    let t = rdtsc().wrapping_sub(BOOT_TSC.load(Ordering::Relaxed));
    ((t as u128 * MULT.load(Ordering::Relaxed) as u128) >> 32) as u64
}

pub fn tsc_hz() -> u64 {
    TSC_HZ.load(Ordering::Relaxed)
}

fn pit_calibrate() -> Option<u64> {
    const PIT_HZ: u64 = 1_193_182;
    const TICKS: u64 = PIT_HZ / 100; // 10 ms
                                     // SAFETY: PIT and port 0x61 (speaker/gate) programming; affects only the
                                     // PIT's channel 2, which nothing else uses.
    unsafe {
        let mut gate = Port::<u8>::new(0x61);
        let v = gate.read();
        gate.write((v & !0x02) | 0x01); // gate on, speaker off
        Port::<u8>::new(0x43).write(0b1011_0000); // ch2, lo/hi, mode 0, binary
        Port::<u8>::new(0x42).write(TICKS as u8);
        Port::<u8>::new(0x42).write((TICKS >> 8) as u8);
        // Restart the count by toggling the gate.
        let v = gate.read();
        gate.write(v & !0x01);
        gate.write(v | 0x01);
        let start = rdtsc();
        // OUT2 goes high when the count reaches zero. Bound the wait to ~5 s
        // of a 10 GHz clock.
        while gate.read() & 0x20 == 0 {
            if rdtsc().wrapping_sub(start) > 50_000_000_000 {
                return None;
            }
        }
        let cycles = rdtsc() - start;
        Some(cycles * PIT_HZ / TICKS)
    }
}

fn cpuid_hz() -> Option<u64> {
    let c = raw_cpuid::CpuId::new();
    if let Some(t) = c.get_tsc_info() {
        if let Some(hz) = t.tsc_frequency() {
            return Some(hz);
        }
    }
    c.get_processor_frequency_info()
        .map(|f| f.processor_base_frequency() as u64 * 1_000_000)
        .filter(|&hz| hz > 0)
}

/// Measures the TSC frequency. Returns it and whether the PIT was used.
pub fn calibrate() -> (u64, bool) {
    BOOT_TSC.store(rdtsc(), Ordering::Relaxed);
    let (hz, pit) = match pit_calibrate() {
        Some(hz) if hz > 10_000_000 => (hz, true),
        _ => (cpuid_hz().unwrap_or(2_000_000_000), false),
    };
    TSC_HZ.store(hz, Ordering::Relaxed);
    MULT.store(
        ((1_000_000_000u128 << 32) / hz as u128) as u64,
        Ordering::Relaxed,
    );
    (hz, pit)
}
