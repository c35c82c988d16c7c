//! TSC calibration: the arithmetic and the measuring loop, over a
//! [`RefClock`] (the kernel's reads the TSC and the HPET's or the PM timer's
//! counter; the tests' is simulated).
//!
//! One measurement is [`ROUNDS`] rounds; each waits for the reference counter
//! to tick (its edge), then for at least [`WINDOW_NS`] worth of its ticks, and
//! divides the TSC cycles by the counter ticks; the result is the median of
//! the rounds. Every wait is bounded by the TSC: a counter that does not move
//! within [`MOVE_BUDGET`] cycles is absent (all ones: nothing decodes the
//! address; anything else: frozen, e.g. an HPET left disabled), one that does
//! not cover the window within [`WINDOW_BUDGET`] cycles has stopped. The
//! counter is read between two TSC reads, and a read during which the CPU was
//! away ([`QUIET_READ`]) is not used for the window's ends. The
//! budgets assume a TSC between 1 and 10 GHz: the 10 ms window is 10..100 M
//! cycles, far inside 2 G.
//!
//! Counters wrap: the PM timer has 24 bits (32 with the FADT's TMR_VAL_EXT)
//! and wraps every 4.7 s at 3.579545 MHz; a 32-bit HPET wraps every 43 s at
//! 100 MHz. Deltas are taken modulo the width ([`counter_delta`]), which is
//! right as long as a round is shorter than a wrap (it is bounded far below).
//!
//! CPUID (leaf 0x15, "TSC/crystal ratio", with leaf 0x16's base frequency
//! only to derive a missing crystal frequency, as Linux's
//! `native_calibrate_tsc` does) is the last resort: under TCG it is not the
//! host's TSC rate (QEMU `-cpu max` says 2000 MHz where the TSC runs at 2445).
//! When both exist the measurement is used and CPUID cross-checks it
//! ([`decide`]): more than 1 % apart is worth a warning.

use core::fmt;

/// The ACPI PM timer's rate (ACPI 6.5 §4.8.3.3).
pub const PM_TIMER_HZ: u64 = 3_579_545;
/// The 8254 PIT's input clock.
pub const PIT_HZ: u64 = 1_193_182;
/// The shortest measuring window.
pub const WINDOW_NS: u64 = 10_000_000;
/// Rounds per measurement; the median is kept.
pub const ROUNDS: usize = 3;
/// TSC cycles within which the counter must tick at all.
pub const MOVE_BUDGET: u64 = 200_000_000;
/// TSC cycles within which a round's window must be covered.
pub const WINDOW_BUDGET: u64 = 2_000_000_000;
/// A counter read whose two surrounding TSC reads are further apart than this
/// many cycles is not used: the CPU was away in between (an SMI on hardware,
/// the vCPU thread preempted on a busy host), and the time it was away would
/// count as window time on one side only. Linux's `tsc_read_refs` uses the
/// same bound (`SMI_TRESHOLD`, 50,000 cycles).
pub const QUIET_READ: u64 = 50_000;
/// TSC rates outside this range are measurement errors.
pub const PLAUSIBLE_HZ: core::ops::RangeInclusive<u64> = 100_000_000..=20_000_000_000;
/// Largest HPET period (100 ns, i.e. at least 10 MHz), in femtoseconds.
pub const HPET_MAX_PERIOD_FS: u64 = 0x05F5_E100;
/// Measurement and CPUID figure agree when within this many parts per
/// million (1 %).
pub const AGREE_PPM: u64 = 10_000;

/// Where the TSC rate came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    Hpet,
    PmTimer,
    Pit,
    Cpuid,
}

impl Source {
    /// In order of preference.
    pub const ALL: [Source; 4] = [Source::Hpet, Source::PmTimer, Source::Pit, Source::Cpuid];

    /// The `time.source=` value and the self-test's `source=` key.
    pub fn key(self) -> &'static str {
        match self {
            Source::Hpet => "hpet",
            Source::PmTimer => "pmtimer",
            Source::Pit => "pit",
            Source::Cpuid => "cpuid",
        }
    }

    /// How the log names it.
    pub fn name(self) -> &'static str {
        match self {
            Source::Hpet => "HPET",
            Source::PmTimer => "ACPI PM timer",
            Source::Pit => "PIT",
            Source::Cpuid => "CPUID 0x15",
        }
    }

    pub fn from_key(k: &str) -> Option<Source> {
        Source::ALL.into_iter().find(|s| s.key() == k)
    }
}

/// Why a reference counter gave no rate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MeasureError {
    /// It reads all ones and never moves: nothing answers at its address.
    AllOnes,
    /// It never moved.
    Frozen,
    /// It moved, but did not cover the window in [`WINDOW_BUDGET`] cycles.
    Stopped,
    /// It moved, but no read of it was quiet ([`QUIET_READ`]).
    NoQuietRead,
    /// The rate it gave is outside [`PLAUSIBLE_HZ`].
    Implausible(u64),
}

impl fmt::Display for MeasureError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MeasureError::AllOnes => f.write_str("counter reads all ones (absent)"),
            MeasureError::Frozen => f.write_str("counter does not move"),
            MeasureError::Stopped => f.write_str("counter stopped during the window"),
            MeasureError::NoQuietRead => f.write_str("every read of the counter took too long"),
            MeasureError::Implausible(hz) => write!(f, "implausible TSC rate {hz} Hz"),
        }
    }
}

/// The TSC and one reference counter.
pub trait RefClock {
    fn tsc(&mut self) -> u64;
    /// The reference counter (bits above its width are ignored).
    fn counter(&mut self) -> u64;
}

/// A reference counter's rate and width.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Counter {
    pub hz: u64,
    pub bits: u32,
}

fn mask(bits: u32) -> u64 {
    if bits >= 64 {
        u64::MAX
    } else {
        (1u64 << bits) - 1
    }
}

/// Ticks from `then` to `now` of a `bits`-wide counter that may have wrapped
/// (once).
pub fn counter_delta(then: u64, now: u64, bits: u32) -> u64 {
    now.wrapping_sub(then) & mask(bits)
}

/// Ticks of a `hz` counter in `ns` (rounded up).
pub fn ticks_for(ns: u64, hz: u64) -> u64 {
    ((ns as u128 * hz as u128).div_ceil(1_000_000_000)) as u64
}

/// The TSC rate from `cycles` during `ticks` of a `hz` counter.
pub fn tsc_hz(cycles: u64, ticks: u64, hz: u64) -> Option<u64> {
    if ticks == 0 {
        return None;
    }
    u64::try_from(cycles as u128 * hz as u128 / ticks as u128).ok()
}

/// The HPET counter's rate from GCAP_ID (bits 63:32: the period in
/// femtoseconds, valid when 0 < p <= 100 ns).
pub fn hpet_hz(gcap_id: u64) -> Option<u64> {
    let period = gcap_id >> 32;
    if period == 0 || period > HPET_MAX_PERIOD_FS {
        return None;
    }
    Some(1_000_000_000_000_000 / period)
}

/// The median of `v` (the upper one for an even count); `None` when empty.
pub fn median(v: &mut [u64]) -> Option<u64> {
    v.sort_unstable();
    v.get(v.len() / 2).copied()
}

/// A counter read between two TSC reads: the counter's value, the TSC at the
/// middle, and whether the two TSC reads are at most [`QUIET_READ`] cycles
/// apart (else the CPU was away in between, and the pair is not used).
fn sample(clock: &mut impl RefClock, m: u64) -> (u64, u64, bool) {
    let t1 = clock.tsc();
    let v = clock.counter() & m;
    let t2 = clock.tsc();
    let spread = t2.wrapping_sub(t1);
    (v, t1.wrapping_add(spread / 2), spread <= QUIET_READ)
}

/// One round: the TSC rate over at least [`WINDOW_NS`] of the counter, from
/// an edge of the counter to the first read past the window, each taken
/// from a quiet read (see [`QUIET_READ`]).
pub fn measure_round(clock: &mut impl RefClock, c: Counter) -> Result<u64, MeasureError> {
    let m = mask(c.bits);
    let t0 = clock.tsc();
    let (mut last, _, _) = sample(clock, m);
    let mut moved = false;
    // Start at an edge of the counter.
    let (c0, s0) = loop {
        let (v, t, quiet) = sample(clock, m);
        if v != last {
            moved = true;
            if quiet {
                break (v, t);
            }
            last = v;
        }
        if t.wrapping_sub(t0) > MOVE_BUDGET {
            return Err(match (moved, last == m) {
                (true, _) => MeasureError::NoQuietRead,
                (false, true) => MeasureError::AllOnes,
                (false, false) => MeasureError::Frozen,
            });
        }
    };
    let target = ticks_for(WINDOW_NS, c.hz).max(1);
    loop {
        let (v, t, quiet) = sample(clock, m);
        let d = counter_delta(c0, v, c.bits);
        if d >= target && quiet {
            let hz = tsc_hz(t.wrapping_sub(s0), d, c.hz).unwrap_or(0);
            return if PLAUSIBLE_HZ.contains(&hz) {
                Ok(hz)
            } else {
                Err(MeasureError::Implausible(hz))
            };
        }
        if t.wrapping_sub(s0) > WINDOW_BUDGET {
            return Err(MeasureError::Stopped);
        }
    }
}

/// [`ROUNDS`] rounds and their median; the first failing round fails it.
pub fn measure(clock: &mut impl RefClock, c: Counter) -> Result<u64, MeasureError> {
    let mut rates = [0u64; ROUNDS];
    for r in rates.iter_mut() {
        *r = measure_round(clock, c)?;
    }
    median(&mut rates).ok_or(MeasureError::Frozen)
}

/// The TSC rate from CPUID leaf 0x15 (`eax` denominator, `ebx` numerator,
/// `ecx` crystal Hz) and, only when the crystal is not given, leaf 0x16's
/// base frequency (`base_mhz`, 0 when the leaf is absent) to derive it; in
/// kHz steps, as Linux's `native_calibrate_tsc`. `None` when the ratio is
/// not given or neither gives the crystal.
pub fn cpuid_tsc_hz(leaf15: [u32; 3], base_mhz: u32) -> Option<u64> {
    let [den, num, crystal_hz] = leaf15.map(u64::from);
    if den == 0 || num == 0 {
        return None;
    }
    let crystal_khz = if crystal_hz != 0 {
        crystal_hz / 1000
    } else {
        base_mhz as u64 * 1000 * den / num
    };
    if crystal_khz == 0 {
        return None;
    }
    Some(crystal_khz * num / den * 1000)
}

/// How far a measured rate is from CPUID's figure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CrossCheck {
    pub cpuid_hz: u64,
    /// |measured - cpuid| / cpuid, in parts per million.
    pub ppm: u64,
}

impl CrossCheck {
    pub fn agrees(&self) -> bool {
        self.ppm <= AGREE_PPM
    }
}

pub fn cross_check(measured: u64, cpuid_hz: u64) -> CrossCheck {
    let diff = measured.abs_diff(cpuid_hz) as u128;
    CrossCheck {
        cpuid_hz,
        ppm: (diff * 1_000_000)
            .checked_div(cpuid_hz as u128)
            .map_or(u64::MAX, |p| p.min(u64::MAX as u128) as u64),
    }
}

/// The rate the kernel uses and why.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    pub hz: u64,
    pub source: Source,
    /// CPUID's figure next to a measurement.
    pub cross: Option<CrossCheck>,
}

/// A measurement wins (with CPUID as its cross-check); else CPUID; else
/// nothing.
pub fn decide(measured: Option<(Source, u64)>, cpuid_hz: Option<u64>) -> Option<Decision> {
    match (measured, cpuid_hz) {
        (Some((source, hz)), c) => Some(Decision {
            hz,
            source,
            cross: c.map(|c| cross_check(hz, c)),
        }),
        (None, Some(hz)) => Some(Decision {
            hz,
            source: Source::Cpuid,
            cross: None,
        }),
        (None, None) => None,
    }
}

/// `hz` as `MHz` with three decimals (`2445.123`).
pub struct Mhz(pub u64);

impl fmt::Display for Mhz {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{:03}", self.0 / 1_000_000, self.0 / 1000 % 1000)
    }
}

/// Parts per million as a percentage with three decimals (`0.012`).
pub struct Percent(pub u64);

impl fmt::Display for Percent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{:03}", self.0 / 10_000, self.0 / 10 % 1000)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A TSC at `tsc_hz` that advances `step` cycles per read of either
    /// clock, and a counter at `c.hz` derived from it (plus `offset`), or
    /// stuck at `stuck`, or frozen after `stop_after` cycles.
    struct Sim {
        tsc: u64,
        step: u64,
        tsc_hz: u64,
        c: Counter,
        offset: u64,
        stuck: Option<u64>,
        stop_after: Option<u64>,
        /// Every `.0`th counter read, the CPU is away for `.1` cycles right
        /// after it (preempted between the counter and the TSC read).
        away: Option<(u64, u64)>,
        reads: u64,
    }

    impl Sim {
        fn new(tsc_hz: u64, c: Counter) -> Sim {
            Sim {
                tsc: 1_000_000,
                step: 500,
                tsc_hz,
                c,
                offset: 0,
                stuck: None,
                stop_after: None,
                away: None,
                reads: 0,
            }
        }
    }

    impl RefClock for Sim {
        fn tsc(&mut self) -> u64 {
            self.tsc += self.step;
            self.tsc
        }
        fn counter(&mut self) -> u64 {
            self.tsc += self.step;
            if let Some(v) = self.stuck {
                return v;
            }
            let t = self.stop_after.map_or(self.tsc, |s| self.tsc.min(s));
            let ticks = (t as u128 * self.c.hz as u128 / self.tsc_hz as u128) as u64;
            self.reads += 1;
            if let Some((n, cycles)) = self.away {
                if self.reads.is_multiple_of(n) {
                    self.tsc += cycles;
                }
            }
            // Garbage above the width must be ignored.
            (ticks + self.offset) | (0xdead << 48)
        }
    }

    const HPET: Counter = Counter {
        hz: 100_000_000,
        bits: 64,
    };
    const PM24: Counter = Counter {
        hz: PM_TIMER_HZ,
        bits: 24,
    };

    fn within(hz: u64, want: u64, ppm: u64) -> bool {
        cross_check(hz, want).ppm <= ppm
    }

    #[test]
    fn hpet_measures_the_tsc() {
        let mut s = Sim::new(2_445_123_000, HPET);
        let hz = measure(&mut s, HPET).unwrap();
        assert!(within(hz, 2_445_123_000, 100), "{hz}");
    }

    #[test]
    fn pm_timer_24_bit_wraps_inside_the_window() {
        let mut s = Sim::new(3_000_000_000, PM24);
        // 1000 ticks before the 24-bit wrap.
        s.offset = (1 << 24) - 1000 - (s.tsc as u128 * PM_TIMER_HZ as u128 / 3_000_000_000) as u64;
        let hz = measure(&mut s, PM24).unwrap();
        assert!(within(hz, 3_000_000_000, 500), "{hz}");
    }

    #[test]
    fn a_32_bit_hpet_wraps() {
        let c = Counter {
            hz: 14_318_180,
            bits: 32,
        };
        let mut s = Sim::new(1_800_000_000, c);
        s.offset = u32::MAX as u64 - 50 - (s.tsc as u128 * c.hz as u128 / 1_800_000_000) as u64;
        let hz = measure(&mut s, c).unwrap();
        assert!(within(hz, 1_800_000_000, 500), "{hz}");
    }

    #[test]
    fn absent_frozen_and_stopped_counters_end_within_their_budgets() {
        let mut s = Sim::new(2_000_000_000, PM24);
        s.stuck = Some(0xff_ffff);
        assert_eq!(measure(&mut s, PM24), Err(MeasureError::AllOnes));
        assert!(s.tsc < 1_000_000 + MOVE_BUDGET + 10_000);
        let mut s = Sim::new(2_000_000_000, HPET);
        s.stuck = Some(0x1234);
        assert_eq!(measure(&mut s, HPET), Err(MeasureError::Frozen));
        let mut s = Sim::new(2_000_000_000, HPET);
        s.stop_after = Some(2_000_000);
        let t0 = s.tsc;
        assert_eq!(measure(&mut s, HPET), Err(MeasureError::Stopped));
        assert!(s.tsc - t0 < MOVE_BUDGET + WINDOW_BUDGET + 10_000);
    }

    #[test]
    fn reads_during_which_the_cpu_was_away_are_not_used() {
        // Away for 2 ms (a preempted vCPU) every 997th read: without the
        // quiet-read check a round ending on such a read is 20 % off.
        let mut s = Sim::new(2_445_000_000, HPET);
        s.away = Some((997, 4_890_000));
        let hz = measure(&mut s, HPET).unwrap();
        assert!(within(hz, 2_445_000_000, 100), "{hz}");
        let mut s = Sim::new(2_445_000_000, PM24);
        s.away = Some((3, 4_890_000));
        let hz = measure(&mut s, PM24).unwrap();
        assert!(within(hz, 2_445_000_000, 100), "{hz}");
        // Every read slow: the counter moves, no read is quiet.
        let mut s = Sim::new(2_445_000_000, HPET);
        s.step = QUIET_READ;
        assert_eq!(measure(&mut s, HPET), Err(MeasureError::NoQuietRead));
    }

    #[test]
    fn an_implausible_rate_is_an_error() {
        // A counter that claims 100 MHz but runs 100 times too slowly.
        let mut s = Sim::new(
            2_000_000_000,
            Counter {
                hz: 1_000_000,
                bits: 64,
            },
        );
        assert!(matches!(
            measure(&mut s, HPET),
            Err(MeasureError::Implausible(_)) | Err(MeasureError::Stopped)
        ));
        let mut s = Sim::new(
            2_000_000_000,
            Counter {
                hz: 10_000_000_000,
                bits: 64,
            },
        );
        s.step = 10;
        assert!(matches!(
            measure(
                &mut s,
                Counter {
                    hz: 1_000_000,
                    bits: 64
                }
            ),
            Err(MeasureError::Implausible(_))
        ));
    }

    #[test]
    fn median_of_rounds() {
        assert_eq!(median(&mut [3, 1, 2]), Some(2));
        assert_eq!(median(&mut [10, 900, 11]), Some(11));
        assert_eq!(median(&mut [5]), Some(5));
        assert_eq!(median(&mut []), None);
    }

    #[test]
    fn arithmetic() {
        assert_eq!(counter_delta(0xff_fff0, 0x10, 24), 0x20);
        assert_eq!(counter_delta(5, 3, 64), u64::MAX - 1);
        assert_eq!(ticks_for(WINDOW_NS, PM_TIMER_HZ), 35_796);
        assert_eq!(ticks_for(WINDOW_NS, 100_000_000), 1_000_000);
        assert_eq!(
            tsc_hz(24_451_230, 1_000_000, 100_000_000),
            Some(2_445_123_000)
        );
        assert_eq!(tsc_hz(1, 0, 1), None);
    }

    #[test]
    fn hpet_period() {
        // QEMU: 10 ns.
        assert_eq!(
            hpet_hz(10_000_000u64 << 32 | 0x8086_a201),
            Some(100_000_000)
        );
        // 69.841279 ns: the common 14.31818 MHz.
        assert_eq!(hpet_hz(69_841_279u64 << 32), Some(14_318_179));
        assert_eq!(hpet_hz(HPET_MAX_PERIOD_FS << 32), Some(10_000_000));
        assert_eq!(hpet_hz((HPET_MAX_PERIOD_FS + 1) << 32), None);
        assert_eq!(hpet_hz(0x8086_a201), None);
        assert_eq!(hpet_hz(u64::MAX), None);
    }

    #[test]
    fn cpuid_leaf_15_and_16() {
        // Crystal given: 24 MHz × 188/2 = 2256 MHz.
        assert_eq!(cpuid_tsc_hz([2, 188, 24_000_000], 0), Some(2_256_000_000));
        // No crystal: derived from the base frequency (2400 MHz, ratio 200/2).
        assert_eq!(cpuid_tsc_hz([2, 200, 0], 2400), Some(2_400_000_000));
        // No ratio: leaf 0x16 alone is not used.
        assert_eq!(cpuid_tsc_hz([0, 0, 0], 2000), None);
        assert_eq!(cpuid_tsc_hz([2, 200, 0], 0), None);
    }

    #[test]
    fn decision_and_cross_check() {
        let d = decide(Some((Source::Hpet, 2_445_000_000)), Some(2_000_000_000)).unwrap();
        assert_eq!((d.hz, d.source), (2_445_000_000, Source::Hpet));
        let c = d.cross.unwrap();
        assert!(!c.agrees());
        assert_eq!(c.ppm, 222_500);
        assert_eq!(Percent(c.ppm).to_string(), "22.250");
        let d = decide(Some((Source::Pit, 2_010_000_000)), Some(2_000_000_000)).unwrap();
        assert!(d.cross.unwrap().agrees());
        assert_eq!(
            decide(None, Some(2_000_000_000)),
            Some(Decision {
                hz: 2_000_000_000,
                source: Source::Cpuid,
                cross: None
            })
        );
        assert_eq!(decide(None, None), None);
        assert_eq!(Mhz(2_445_123_456).to_string(), "2445.123");
    }

    #[test]
    fn source_keys() {
        for s in Source::ALL {
            assert_eq!(Source::from_key(s.key()), Some(s));
        }
        assert_eq!(Source::from_key("tsc"), None);
        assert_eq!(Source::PmTimer.name(), "ACPI PM timer");
    }
}
