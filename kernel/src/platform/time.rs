//! Time from the TSC, calibrated against a reference the firmware describes.
//!
//! Sources, in order (the first that measures wins):
//!
//! 1. the HPET (its base from the ACPI HPET table; read through the boot
//!    identity map, which covers 0xfed00000, or through `mm::map_mmio` once
//!    memory is set up; the boot map is write-back, which QEMU ignores and
//!    on hardware the MTRRs override to uncached): GCAP_ID's period (fs, valid when 0 < p <= 100 ns),
//!    the main counter enabled with ENABLE_CNF if it was not (LEG_RT_CNF is
//!    never set), 32- or 64-bit per GCAP_ID bit 13;
//! 2. the ACPI PM timer (the FADT's port; 3,579,545 Hz; 24 bits unless
//!    TMR_VAL_EXT);
//! 3. the PIT (channel 2, gate through port 0x61, OUT2 polled);
//! 4. CPUID leaf 0x15 (and 0x16 only to derive a missing crystal), when no
//!    timer measures.
//!
//! Each measurement is 3 rounds of at least 10 ms and their median, every
//! wait bounded by the TSC and by a "counter moved" check (the loop and its
//! bounds are `dioxide_firmware::calib`, host-tested). A CPUID figure, when
//! there is one, cross-checks the measurement (both logged, a warning past
//! 1 %). `time.source=hpet|pmtimer|pit|cpuid` forces one source.

use core::fmt;
use core::sync::atomic::{AtomicU64, Ordering};
use dioxide_firmware::acpi::Facts;
use dioxide_firmware::calib::{
    self, Counter, CrossCheck, MeasureError, Mhz, Percent, RefClock, Source,
};
use dioxide_firmware::tables::Space;
use x86_64::instructions::port::Port;

static TSC_HZ: AtomicU64 = AtomicU64::new(0);
/// ns = (tsc * MULT) >> 32
static MULT: AtomicU64 = AtomicU64::new(0);
static BOOT_TSC: AtomicU64 = AtomicU64::new(0);

/// The rate assumed when nothing measures and CPUID says nothing.
const FALLBACK_HZ: u64 = 2_000_000_000;

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

/// Spins for `ns` nanoseconds (the TSC at its calibrated rate, or at
/// [`FALLBACK_HZ`] before calibration). For the power-off and reset paths.
pub fn spin_ns(ns: u64) {
    let hz = match tsc_hz() {
        0 => FALLBACK_HZ,
        hz => hz,
    };
    let cycles = (ns as u128 * hz as u128 / 1_000_000_000) as u64;
    let t0 = rdtsc();
    while rdtsc().wrapping_sub(t0) < cycles {
        core::hint::spin_loop();
    }
}

fn set(hz: u64) {
    TSC_HZ.store(hz, Ordering::Relaxed);
    MULT.store(
        ((1_000_000_000u128 << 32) / hz.max(1) as u128) as u64,
        Ordering::Relaxed,
    );
}

/// Why a source gave no rate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SourceError {
    /// The firmware describes no such hardware (the reason).
    Absent(&'static str),
    /// Described, but not in a form this kernel reads.
    Unsupported(&'static str),
    /// Present, but its counter did not measure.
    Measure(MeasureError),
}

impl fmt::Display for SourceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SourceError::Absent(why) | SourceError::Unsupported(why) => f.write_str(why),
            SourceError::Measure(e) => write!(f, "{e}"),
        }
    }
}

impl From<MeasureError> for SourceError {
    fn from(e: MeasureError) -> Self {
        SourceError::Measure(e)
    }
}

// HPET registers (IA-PC HPET 1.0a §2.3).
const HPET_GCAP_ID: u64 = 0x000;
const HPET_GEN_CONF: u64 = 0x010;
const HPET_MAIN_COUNTER: u64 = 0x0f0;
const HPET_ENABLE_CNF: u64 = 1 << 0;
const HPET_COUNT_SIZE_CAP: u64 = 1 << 13;

struct HpetClock {
    base: u64,
}

impl HpetClock {
    fn read(&self, reg: u64) -> u64 {
        // SAFETY: `base` is the HPET's register block from the ACPI table,
        // below 4 GiB (checked in `measure_hpet`) and therefore mapped: by
        // the boot identity map before `mm::init`, by `mm::map_mmio` after.
        // GCAP_ID, GEN_CONF and the main counter are 64-bit registers,
        // 8-aligned, whose reads have no side effect.
        unsafe { core::ptr::read_volatile((self.base + reg) as *const u64) }
    }

    fn write(&self, reg: u64, v: u64) {
        // SAFETY: as `read`; GEN_CONF is only written with ENABLE_CNF added
        // to what it held, which starts the main counter and nothing else.
        unsafe { core::ptr::write_volatile((self.base + reg) as *mut u64, v) }
    }
}

impl RefClock for HpetClock {
    fn tsc(&mut self) -> u64 {
        rdtsc()
    }
    fn counter(&mut self) -> u64 {
        self.read(HPET_MAIN_COUNTER)
    }
}

fn measure_hpet(facts: Option<&Facts>) -> Result<u64, SourceError> {
    let h = facts
        .and_then(|f| f.hpet)
        .ok_or(SourceError::Absent("no ACPI HPET table"))?;
    if h.base >= 1 << 32 || h.base % 8 != 0 {
        return Err(SourceError::Unsupported(
            "HPET base above 4 GiB or misaligned",
        ));
    }
    // Before mm::init this fails (the boot map covers the HPET); after, it
    // maps the block uncached.
    let _ = crate::mm::map_mmio(h.base, 0x400);
    let clock = HpetClock { base: h.base };
    let gcap = clock.read(HPET_GCAP_ID);
    if gcap == u64::MAX {
        return Err(MeasureError::AllOnes.into());
    }
    let hz =
        calib::hpet_hz(gcap).ok_or(SourceError::Unsupported("HPET counter period out of range"))?;
    let bits = if gcap & HPET_COUNT_SIZE_CAP != 0 {
        64
    } else {
        32
    };
    let conf = clock.read(HPET_GEN_CONF);
    if conf & HPET_ENABLE_CNF == 0 {
        clock.write(HPET_GEN_CONF, conf | HPET_ENABLE_CNF);
    }
    log::debug!(target: "time", "HPET at {:#x}: {} Hz, {}-bit counter", h.base, hz, bits);
    let mut clock = clock;
    Ok(calib::measure(&mut clock, Counter { hz, bits })?)
}

struct PmTimerClock {
    port: Port<u32>,
}

impl RefClock for PmTimerClock {
    fn tsc(&mut self) -> u64 {
        rdtsc()
    }
    fn counter(&mut self) -> u64 {
        // SAFETY: the PM timer's I/O port from the FADT; reading it has no
        // side effect.
        unsafe { self.port.read() as u64 }
    }
}

fn measure_pm_timer(facts: Option<&Facts>) -> Result<u64, SourceError> {
    let fadt = facts
        .and_then(|f| f.fadt)
        .ok_or(SourceError::Absent("no ACPI FADT"))?;
    let g = fadt
        .pm_timer
        .ok_or(SourceError::Absent("no PM timer in the FADT"))?;
    if g.space != Space::Io {
        return Err(SourceError::Unsupported("PM timer not in I/O space"));
    }
    let port = u16::try_from(g.address)
        .map_err(|_| SourceError::Unsupported("PM timer port above 0xffff"))?;
    let mut clock = PmTimerClock {
        port: Port::new(port),
    };
    let c = Counter {
        hz: calib::PM_TIMER_HZ,
        bits: fadt.pm_timer_bits(),
    };
    Ok(calib::measure(&mut clock, c)?)
}

/// One PIT round: channel 2 in mode 0 counts 10 ms down from the gate's
/// rising edge; OUT2 (port 0x61 bit 5) goes high at zero. `Ok(None)`: the
/// CPU was away at the start or the end (see `calib::QUIET_READ`); retry.
fn pit_round() -> Result<Option<u64>, SourceError> {
    let ticks = calib::ticks_for(calib::WINDOW_NS, calib::PIT_HZ);
    let mut gate = Port::<u8>::new(0x61);
    // SAFETY: the PIT's channel 2 and its gate (port 0x61, speaker off):
    // nothing else in this kernel uses them.
    let (t1, t2, out2_at_start, t3) = unsafe {
        let v = gate.read();
        gate.write((v & !0x02) | 0x01); // gate on, speaker off
        Port::<u8>::new(0x43).write(0b1011_0000); // ch2, lo/hi, mode 0, binary
        Port::<u8>::new(0x42).write(ticks as u8);
        Port::<u8>::new(0x42).write((ticks >> 8) as u8);
        // Restart the count by toggling the gate; the count starts at the
        // rising edge, between t1 and t2.
        let v = gate.read();
        gate.write(v & !0x01);
        let t1 = rdtsc();
        gate.write(v | 0x01);
        let t2 = rdtsc();
        let high = gate.read() & 0x20 != 0;
        (t1, t2, high, rdtsc())
    };
    // In mode 0 OUT2 is low until the count reaches 0; high at once means
    // no PIT (QEMU `pit=off`), or no gate — but only if the CPU was here
    // the whole time: a vCPU away for the 10 ms of the count (a busy host)
    // finds it run out, and that round is retried.
    if out2_at_start {
        if t3.wrapping_sub(t1) > 2 * calib::QUIET_READ {
            return Ok(None);
        }
        return Err(SourceError::Absent(
            "PIT channel 2 output high at the start of its count",
        ));
    }
    if t2.wrapping_sub(t1) > calib::QUIET_READ {
        return Ok(None);
    }
    let start = t1.wrapping_add(t2.wrapping_sub(t1) / 2);
    // OUT2 is polled: its edge came after the last read that saw it low
    // began and before the read that sees it high ended. A CPU away
    // between those two reads (not only during the last one) moves the
    // end late by as long as it was away: on a loaded host (three QEMUs
    // and two busy loops on 2 cores) that gave a PIT rate twice the
    // HPET's. So the edge must be bracketed by two quiet reads in a row.
    let mut low_at = t1;
    let end = loop {
        let t1 = rdtsc();
        // SAFETY: reading port 0x61 has no side effect.
        let high = unsafe { gate.read() } & 0x20 != 0;
        let t2 = rdtsc();
        if high {
            if t2.wrapping_sub(low_at) > 2 * calib::QUIET_READ {
                return Ok(None);
            }
            break low_at.wrapping_add(t2.wrapping_sub(low_at) / 2);
        }
        low_at = t1;
        if t2.wrapping_sub(start) > calib::WINDOW_BUDGET {
            return Err(MeasureError::Stopped.into());
        }
    };
    let hz = calib::tsc_hz(end.wrapping_sub(start), ticks, calib::PIT_HZ).unwrap_or(0);
    if calib::PLAUSIBLE_HZ.contains(&hz) {
        Ok(Some(hz))
    } else {
        Err(MeasureError::Implausible(hz).into())
    }
}

fn measure_pit() -> Result<u64, SourceError> {
    let mut rates = [0u64; calib::ROUNDS];
    for r in rates.iter_mut() {
        let mut tries = 0;
        *r = loop {
            match pit_round()? {
                Some(hz) => break hz,
                None if tries < 5 => tries += 1,
                None => return Err(MeasureError::NoQuietRead.into()),
            }
        };
    }
    calib::median(&mut rates).ok_or(SourceError::Absent("no PIT rounds"))
}

/// CPUID's TSC rate (leaf 0x15, with 0x16 for a missing crystal).
fn cpuid_hz() -> Option<u64> {
    let c = raw_cpuid::CpuId::new();
    let t = c.get_tsc_info()?;
    let base_mhz = c
        .get_processor_frequency_info()
        .map_or(0, |f| f.processor_base_frequency() as u32);
    calib::cpuid_tsc_hz(
        [t.denominator(), t.numerator(), t.nominal_frequency()],
        base_mhz,
    )
}

/// Measures the TSC against `source` (CPUID: reads it).
pub fn measure(source: Source, facts: Option<&Facts>) -> Result<u64, SourceError> {
    match source {
        Source::Hpet => measure_hpet(facts),
        Source::PmTimer => measure_pm_timer(facts),
        Source::Pit => measure_pit(),
        Source::Cpuid => cpuid_hz().ok_or(SourceError::Absent(
            "CPUID leaf 0x15 gives no TSC/crystal ratio",
        )),
    }
}

/// What calibration found, for the log (taken after the console is up).
#[derive(Clone, Copy, Debug)]
pub struct Calibration {
    pub hz: u64,
    /// `None`: nothing measured and CPUID said nothing; [`FALLBACK_HZ`].
    pub source: Option<Source>,
    /// CPUID's figure next to the measurement.
    pub cross: Option<CrossCheck>,
    /// The sources tried before the one used, and why they failed.
    pub failed: [Option<(Source, SourceError)>; 3],
    pub forced: bool,
}

/// A `time.source=` that cannot be had.
#[derive(Clone, Copy, Debug)]
pub enum ForcedError<'a> {
    Unknown(&'a str),
    Unavailable(Source, SourceError),
}

impl fmt::Display for ForcedError<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ForcedError::Unknown(v) => {
                write!(f, "time.source={v:?}: expected hpet, pmtimer, pit or cpuid")
            }
            ForcedError::Unavailable(s, e) => {
                write!(
                    f,
                    "time.source={}: the {} is not usable: {e}",
                    s.key(),
                    s.name()
                )
            }
        }
    }
}

/// Calibrates the TSC: `force` is the `time.source=` argument. Always sets a
/// rate (on failure [`FALLBACK_HZ`], so that time goes on for the error
/// report); the caller logs the result with [`log_calibration`].
pub fn calibrate<'a>(
    facts: Option<&Facts>,
    force: Option<&'a str>,
) -> Result<Calibration, ForcedError<'a>> {
    BOOT_TSC.store(rdtsc(), Ordering::Relaxed);
    let mut c = Calibration {
        hz: FALLBACK_HZ,
        source: None,
        cross: None,
        failed: [None; 3],
        forced: force.is_some(),
    };
    let measured = match force {
        Some(k) => {
            let Some(s) = Source::from_key(k) else {
                set(FALLBACK_HZ);
                return Err(ForcedError::Unknown(k));
            };
            match measure(s, facts) {
                Ok(hz) => Some((s, hz)),
                Err(e) => {
                    set(FALLBACK_HZ);
                    return Err(ForcedError::Unavailable(s, e));
                }
            }
        }
        None => {
            let mut found = None;
            for (i, s) in [Source::Hpet, Source::PmTimer, Source::Pit]
                .into_iter()
                .enumerate()
            {
                match measure(s, facts) {
                    Ok(hz) => {
                        found = Some((s, hz));
                        break;
                    }
                    Err(e) => c.failed[i] = Some((s, e)),
                }
            }
            found
        }
    };
    let cpuid = match measured {
        Some((Source::Cpuid, _)) => None,
        _ => cpuid_hz(),
    };
    if let Some(d) = calib::decide(measured, cpuid) {
        c.hz = d.hz;
        c.source = Some(d.source);
        c.cross = d.cross;
    }
    set(c.hz);
    Ok(c)
}

/// Logs a [`Calibration`]: `TSC 2445.123 MHz (calibrated against HPET)`.
pub fn log_calibration(c: &Calibration) {
    for (s, e) in c.failed.iter().flatten() {
        log::info!(target: "time", "{} not used: {e}", s.name());
    }
    match c.source {
        Some(s) => log::info!(
            target: "time",
            "TSC {} MHz (calibrated against {}{})",
            Mhz(c.hz),
            s.name(),
            if c.forced { ", forced by time.source" } else { "" }
        ),
        None => log::error!(
            target: "time",
            "TSC rate unknown (no HPET, PM timer, PIT or CPUID 0x15): assuming {} MHz",
            Mhz(c.hz)
        ),
    }
    if let Some(x) = c.cross {
        if x.agrees() {
            log::info!(
                target: "time",
                "CPUID 0x15 says {} MHz: agrees ({} % apart)",
                Mhz(x.cpuid_hz),
                Percent(x.ppm)
            );
        } else {
            log::warn!(
                target: "time",
                "CPUID 0x15 says {} MHz, {} % from the measured {} MHz (more than 1 %): using the measurement",
                Mhz(x.cpuid_hz),
                Percent(x.ppm),
                Mhz(c.hz)
            );
        }
    }
}
