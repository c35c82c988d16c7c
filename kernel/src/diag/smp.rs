//! `selftest=smp`: every CPU at work at once.
//!
//! Runs a job on every online CPU with `smp::on_each_cpu` (the boot CPU
//! included). Each counts to [`COUNT`], checks that `smp::cpu_index` is the
//! index it was started for, that its APIC id is the one the start-up
//! recorded, that it runs on its own stack and with its own TSS loaded, and
//! that a `hlt` with interrupts on returns (its own APIC tick wakes it).
//! Then a job queued on each AP with `smp::run_on` must have run by the
//! time an empty `on_each_cpu` returns (jobs run in order). Prints
//! `smp: cpu I apic J ok` per CPU (or `smp: cpu I apic J error: ...`), the
//! round trip of an empty `on_each_cpu`, and `smp: N cpus ok`; powers off
//! with status 0, or 1 when a check failed.

use crate::outln;
use crate::platform::power::{self, EXIT_OK, EXIT_TEST_FAILED};
use crate::platform::{apic, gdt, smp, time};
use alloc::string::String;
use core::fmt::Write;
use core::sync::atomic::{AtomicUsize, Ordering};
use x86_64::instructions::interrupts;

/// Each CPU counts this far.
const COUNT: u64 = 2_000_000;
/// A halt must end within this long (the tick is 10 ms). Measured with 16
/// vCPUs under TCG on a 2-core host shared with another QEMU and both cores
/// kept busy by two shell loops: at most 81 ms (the summary line's `longest
/// hlt`), a twelfth of the bound.
const HLT_BOUND_NS: u64 = 1_000_000_000;

struct Report {
    index: usize,
    apic: u32,
    stack_addr: u64,
    tss: u64,
    sum: u64,
    hlt_ns: u64,
}

/// One CPU's share.
fn work(_cpu: usize) -> Report {
    let local = 0u8;
    let stack_addr = core::hint::black_box(&local) as *const u8 as u64;
    let mut sum = 0u64;
    for i in 0..COUNT {
        sum = core::hint::black_box(sum + i);
    }
    let were = interrupts::are_enabled();
    let t = time::now_ns();
    interrupts::enable_and_hlt();
    let hlt_ns = time::now_ns() - t;
    if !were {
        interrupts::disable();
    }
    Report {
        index: smp::cpu_index(),
        apic: apic::id(),
        stack_addr,
        tss: gdt::current_tss(),
        sum,
        hlt_ns,
    }
}

/// Set by the `run_on` jobs: slot `cpu` holds `cpu_index() + 1` of the CPU
/// that ran the job for `cpu`.
static RAN: [AtomicUsize; smp::MAX_CPUS] = [const { AtomicUsize::new(0) }; smp::MAX_CPUS];

pub fn selftest() -> ! {
    let n = smp::cpu_count();
    let reports = smp::on_each_cpu(work);
    for (cpu, ran) in RAN.iter().enumerate().take(n).skip(1) {
        let queued = smp::run_on(
            cpu,
            alloc::boxed::Box::new(move || {
                ran.store(smp::cpu_index() + 1, Ordering::Release);
            }),
        );
        if let Err(e) = queued {
            outln!("smp: run_on({cpu}) refused: {e}");
            power::exit(EXIT_TEST_FAILED);
        }
    }
    let rounds = 20u64;
    let t0 = time::now_ns();
    for _ in 0..rounds {
        smp::on_each_cpu(|_| ());
    }
    let round_us = (time::now_ns() - t0) / rounds / 1000;

    let mut failed = 0;
    let mut idle_wait_max = 0;
    let want_sum = COUNT * (COUNT - 1) / 2;
    for (cpu, r) in reports.iter().enumerate() {
        let mut errors = String::new();
        let mut err = |s: core::fmt::Arguments| {
            let _ = write!(errors, "{}{s}", if errors.is_empty() { "" } else { "; " });
        };
        if r.index != cpu {
            err(format_args!("cpu_index() says {}", r.index));
        }
        if r.apic != smp::apic_id_of(cpu) {
            err(format_args!(
                "APIC id {} but started as {}",
                r.apic,
                smp::apic_id_of(cpu)
            ));
        }
        let stack = smp::stack_of(cpu);
        if !stack.contains(&r.stack_addr) {
            err(format_args!(
                "running on {:#x}, outside its stack {:#x}..{:#x}",
                r.stack_addr, stack.start, stack.end
            ));
        }
        if r.tss != smp::tss_of(cpu) {
            err(format_args!(
                "TSS {:#x} loaded, {:#x} given",
                r.tss,
                smp::tss_of(cpu)
            ));
        }
        if let Some(other) = reports[..cpu].iter().position(|o| o.tss == r.tss) {
            err(format_args!("same TSS as cpu {other}"));
        }
        if let Some(other) = (0..cpu).find(|&o| {
            let s = smp::stack_of(o);
            s.start < stack.end && stack.start < s.end
        }) {
            err(format_args!("stack overlaps cpu {other}'s"));
        }
        if r.sum != want_sum {
            err(format_args!("counted {} instead of {want_sum}", r.sum));
        }
        if r.hlt_ns > HLT_BOUND_NS {
            err(format_args!("hlt lasted {} ms", r.hlt_ns / 1_000_000));
        }
        // The AP marks its job done just after the job's last store (the
        // one on_each_cpu waits for): allow it a moment to get there. The
        // longest wait is reported (16 vCPUs, 2 busy host cores: 48 us).
        let t0 = time::now_ns();
        while !smp::is_idle(cpu) && time::now_ns() - t0 < 100_000_000 {
            core::hint::spin_loop();
        }
        idle_wait_max = idle_wait_max.max(time::now_ns() - t0);
        if !smp::is_idle(cpu) {
            err(format_args!(
                "jobs still pending 100 ms after on_each_cpu returned"
            ));
        }
        if cpu > 0 && RAN[cpu].load(Ordering::Acquire) != cpu + 1 {
            err(format_args!(
                "run_on job not run by it before on_each_cpu returned ({})",
                RAN[cpu].load(Ordering::Acquire)
            ));
        }
        if errors.is_empty() {
            outln!("smp: cpu {cpu} apic {} ok", r.apic);
        } else {
            failed += 1;
            outln!("smp: cpu {cpu} apic {} error: {errors}", r.apic);
        }
    }
    let hlt_max_us = reports.iter().map(|r| r.hlt_ns).max().unwrap_or(0) / 1000;
    outln!(
        "smp: on_each_cpu round trip {round_us} us, longest hlt {hlt_max_us} us, longest wait for an idle cpu {} us",
        idle_wait_max / 1000
    );
    if failed > 0 {
        outln!("smp: {failed} of {n} cpus failed");
        power::exit(EXIT_TEST_FAILED);
    }
    outln!("smp: {n} cpus ok");
    power::exit(EXIT_OK)
}

/// `selftest=ap-panic`: CPU 1 panics in a job, to show that a panic on an
/// application processor is reported with its CPU (`PANIC: ...` then `on
/// cpu 1 (apic id N)`) and powers the machine off with status 5 as on the
/// boot CPU (the other CPUs stopped first). The boot CPU waits; if the
/// machine still runs after 10 s, says so and fails.
pub fn ap_panic() -> ! {
    if smp::cpu_count() < 2 {
        outln!("ap-panic: needs 2 CPUs online, {} are", smp::cpu_count());
        power::exit(power::EXIT_CONFIG);
    }
    log::info!(target: "selftest", "cpu 1 panics on purpose: expect a panic report");
    let queued = smp::run_on(
        1,
        alloc::boxed::Box::new(|| panic!("selftest=ap-panic: deliberate panic on an AP")),
    );
    if let Err(e) = queued {
        outln!("ap-panic: run_on(1) refused: {e}");
        power::exit(EXIT_TEST_FAILED);
    }
    let t0 = time::now_ns();
    while time::now_ns() - t0 < 10_000_000_000 {
        interrupts::enable_and_hlt();
    }
    outln!("ap-panic: still running 10 s after the panic");
    power::exit(EXIT_TEST_FAILED)
}
