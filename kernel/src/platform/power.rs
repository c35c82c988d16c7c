//! Powering off with an exit status, and resetting.
//!
//! First the other CPUs are stopped (an NMI each, `smp::stop_others`; their
//! NMI handler halts once the machine is going down). Then the kernel
//! prints `dioxide: power off status=<n>
//! method=<m>` on the console (the host CLI takes the status from the last
//! such line, and accepts QEMU's exit code by the method), then:
//!
//! - `debugexit`: writes the status to QEMU's `isa-debug-exit` device (port
//!   0xf4), which ends the emulator with `(status << 1) | 1`. The default
//!   under a hypervisor (CPUID leaf 0x40000000 names one: "TCGTCGTCGTCG",
//!   "KVMKVMKVM", ...). If the machine still runs afterwards (no such device)
//!   it goes on with `acpi`, printing a second line.
//! - `acpi`: ACPI S5 (soft off). If SCI_EN is clear in PM1a_CNT and the FADT
//!   has an SMI command port and ACPI_ENABLE value, writes ACPI_ENABLE there
//!   and polls SCI_EN for up to 300 ms. Then writes SLP_TYPa (from `\_S5_`)
//!   into PM1a_CNT bits 12:10 and SLP_TYPb into PM1b_CNT if there is one,
//!   then the same with SLP_EN (bit 13). A hardware-reduced machine writes
//!   `SLP_TYP << 2 | SLP_EN (1 << 5)` to the sleep control register instead.
//!   QEMU exits with code 0. The default on bare metal after success
//!   (status 0: a self-test passed, a benchmark finished).
//! - `halt`: stops the CPU (also what `acpi` ends in when S5 did not happen
//!   within 100 ms, after saying so). The default on bare metal after a
//!   failure (status other than 0): the error stays on the screen and the
//!   serial console for the person at the BMC, instead of a dark machine.
//!
//! `power=debugexit|acpi|halt` forces the method (a forced `debugexit` that
//! does nothing halts).
//!
//! Reset ([`reboot`]): the line `dioxide: reset status=<n> method=<m>`, then
//! the FADT reset register when RESET_REG_SUP is set (`acpi`; q35: I/O 0xcf9
//! ← 0x0f), else or if still running the PCI reset control register
//! (`cf9`: 0xcf9 ← 0x02, then 0x0e), then the 8042 keyboard controller
//! (`kbd`: 0x64 ← 0xfe), then a triple fault. Each attempt prints its line
//! first. `panic=reboot` makes panics and CPU exceptions reset instead of
//! powering off ([`fatal`]); QEMU runs with `-no-reboot`, so a reset ends it
//! with code 0.

use crate::platform::{acpi, serial, time};
use core::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use dioxide_firmware::s5;
use dioxide_firmware::tables::{Gas, Space};
use x86_64::instructions::port::Port;

pub const EXIT_OK: u8 = 0;
/// A self-test ran and failed (mismatch).
pub const EXIT_TEST_FAILED: u8 = 1;
/// Bad kernel arguments or missing hardware.
pub const EXIT_CONFIG: u8 = 2;
/// A device error (NVMe init failure, command error or timeout).
pub const EXIT_DEVICE: u8 = 3;
/// A CPU exception.
pub const EXIT_EXCEPTION: u8 = 4;
/// A kernel panic.
pub const EXIT_PANIC: u8 = 5;

/// How the machine is powered off.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    DebugExit,
    Acpi,
    Halt,
}

impl Method {
    pub fn key(self) -> &'static str {
        match self {
            Method::DebugExit => "debugexit",
            Method::Acpi => "acpi",
            Method::Halt => "halt",
        }
    }

    fn from_key(k: &str) -> Option<Method> {
        [Method::DebugExit, Method::Acpi, Method::Halt]
            .into_iter()
            .find(|m| m.key() == k)
    }
}

/// 0: chosen at power-off; else 1 + the forced method's index.
static FORCED: AtomicU8 = AtomicU8::new(0);
/// 1: panics and exceptions reset ([`fatal`]).
static PANIC_REBOOT: AtomicU8 = AtomicU8::new(0);

/// A bad `power=` or `panic=` value.
#[derive(Clone, Copy, Debug)]
pub struct ArgError<'a> {
    key: &'static str,
    value: &'a str,
    expected: &'static str,
}

impl core::fmt::Display for ArgError<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "{}={:?}: expected {}",
            self.key, self.value, self.expected
        )
    }
}

/// Takes `power=` and `panic=` (what a later power-off or panic does).
pub fn configure<'a>(power: Option<&'a str>, panic: Option<&'a str>) -> Result<(), ArgError<'a>> {
    if let Some(p) = power {
        let m = Method::from_key(p).ok_or(ArgError {
            key: "power",
            value: p,
            expected: "debugexit, acpi or halt",
        })?;
        FORCED.store(m as u8 + 1, Ordering::Relaxed);
    }
    match panic {
        None | Some("off") => PANIC_REBOOT.store(0, Ordering::Relaxed),
        Some("reboot") => PANIC_REBOOT.store(1, Ordering::Relaxed),
        Some(v) => {
            return Err(ArgError {
                key: "panic",
                value: v,
                expected: "reboot or off",
            })
        }
    }
    Ok(())
}

fn forced() -> Option<Method> {
    match FORCED.load(Ordering::Relaxed) {
        1 => Some(Method::DebugExit),
        2 => Some(Method::Acpi),
        3 => Some(Method::Halt),
        _ => None,
    }
}

/// CPUID leaf 0x40000000 names a hypervisor (with CPUID.1:ECX bit 31 set).
pub fn hypervisor() -> Option<raw_cpuid::Hypervisor> {
    raw_cpuid::CpuId::new()
        .get_hypervisor_info()
        .map(|h| h.identify())
}

/// Maps the memory-space power and reset registers (after `mm::init`, when
/// the boot identity map is gone), so that the power-off and panic paths
/// never take the page-table lock.
pub fn map_registers() {
    let Some(f) = acpi::facts().and_then(|f| f.fadt) else {
        return;
    };
    let regs = [
        f.reset.map(|r| r.reg),
        f.sleep_control,
        f.pm1a_cnt,
        f.pm1b_cnt,
    ];
    for g in regs.into_iter().flatten() {
        if g.space == Space::Memory {
            if let Err(e) = crate::mm::map_mmio(g.address, 8) {
                log::warn!(target: "power", "cannot map the register at {:#x}: {e}", g.address);
            }
        }
    }
}

/// Reads a register (I/O or memory) `bytes` wide (1, 2 or 4).
fn gas_read(g: Gas, bytes: u8) -> Result<u32, &'static str> {
    match g.space {
        Space::Io => {
            let port = u16::try_from(g.address).map_err(|_| "I/O port above 0xffff")?;
            // SAFETY: a fixed-hardware register port named by the FADT;
            // reading PM1 control or a reset register has no side effect.
            Ok(unsafe {
                match bytes {
                    1 => Port::<u8>::new(port).read() as u32,
                    2 => Port::<u16>::new(port).read() as u32,
                    _ => Port::<u32>::new(port).read(),
                }
            })
        }
        Space::Memory if g.address < 1 << 32 => {
            let a = g.address;
            // SAFETY: a fixed-hardware register the FADT places in memory
            // below 4 GiB: identity mapped by the boot map before mm::init and
            // by `map_registers` after; aligned to its width by the spec.
            Ok(unsafe {
                match bytes {
                    1 => core::ptr::read_volatile(a as *const u8) as u32,
                    2 => core::ptr::read_volatile(a as *const u16) as u32,
                    _ => core::ptr::read_volatile(a as *const u32),
                }
            })
        }
        _ => Err("register neither in I/O space nor in memory below 4 GiB"),
    }
}

/// Writes a register (I/O or memory) `bytes` wide (1, 2 or 4).
fn gas_write(g: Gas, v: u32, bytes: u8) -> Result<(), &'static str> {
    match g.space {
        Space::Io => {
            let port = u16::try_from(g.address).map_err(|_| "I/O port above 0xffff")?;
            // SAFETY: a power-off or reset register the FADT names: writing
            // it is the point (the machine is going down).
            unsafe {
                match bytes {
                    1 => Port::<u8>::new(port).write(v as u8),
                    2 => Port::<u16>::new(port).write(v as u16),
                    _ => Port::<u32>::new(port).write(v),
                }
            }
            Ok(())
        }
        Space::Memory if g.address < 1 << 32 => {
            let a = g.address;
            // SAFETY: as in `gas_read`; the write is the power-off or reset.
            unsafe {
                match bytes {
                    1 => core::ptr::write_volatile(a as *mut u8, v as u8),
                    2 => core::ptr::write_volatile(a as *mut u16, v as u16),
                    _ => core::ptr::write_volatile(a as *mut u32, v),
                }
            }
            Ok(())
        }
        _ => Err("register neither in I/O space nor in memory below 4 GiB"),
    }
}

const SCI_EN: u32 = 1;
/// PM1 control registers are 16 bits wide (ACPI 6.5 §4.8.3.2.1), whatever
/// access size a firmware's X_PM1x_CNT_BLK declares: a byte write would
/// drop SLP_TYP and SLP_EN (bits 10-13). ACPICA accesses them the same way.
const PM1_BYTES: u8 = 2;

/// ACPI S5. Returns only when it could not be attempted (the reason) or did
/// not take effect within 100 ms.
fn acpi_s5() -> Result<(), &'static str> {
    let facts = acpi::facts().ok_or("no ACPI tables")?;
    let fadt = facts.fadt.ok_or("no FADT")?;
    let typ = facts.s5.map_err(|_| "no usable \\_S5_ sleep type")?;
    if fadt.hw_reduced() {
        let reg = fadt
            .sleep_control
            .ok_or("hardware-reduced, but no sleep control register")?;
        gas_write(
            reg,
            s5::sleep_control_value(typ.a) as u32,
            reg.access_bytes(),
        )?;
    } else {
        let a = fadt.pm1a_cnt.ok_or("no PM1a control block")?;
        let mut cur = gas_read(a, PM1_BYTES)?;
        if cur & SCI_EN == 0 && fadt.smi_cmd != 0 && fadt.acpi_enable != 0 {
            let smi = u16::try_from(fadt.smi_cmd).map_err(|_| "SMI_CMD above 0xffff")?;
            // SAFETY: the SMI command port from the FADT; ACPI_ENABLE asks
            // the firmware to hand the ACPI registers over, as ACPI requires
            // before they are used.
            unsafe { Port::<u8>::new(smi).write(fadt.acpi_enable) };
            let t0 = time::now_ns();
            while cur & SCI_EN == 0 && time::now_ns() - t0 < 300_000_000 {
                time::spin_ns(1_000_000);
                cur = gas_read(a, PM1_BYTES)?;
            }
            if cur & SCI_EN == 0 {
                serial::emergency(format_args!(
                    "dioxide: ACPI enable (SMI_CMD {:#x} <- {:#x}) did not set SCI_EN; trying S5 anyway\n",
                    fadt.smi_cmd, fadt.acpi_enable
                ));
            }
        }
        let (a1, a2) = s5::pm1_cnt_values(cur as u16, typ.a);
        let b = match fadt.pm1b_cnt {
            Some(b) => Some((b, s5::pm1_cnt_values(gas_read(b, PM1_BYTES)? as u16, typ.b))),
            None => None,
        };
        gas_write(a, a1 as u32, PM1_BYTES)?;
        if let Some((b, (b1, _))) = b {
            gas_write(b, b1 as u32, PM1_BYTES)?;
        }
        gas_write(a, a2 as u32, PM1_BYTES)?;
        if let Some((b, (_, b2))) = b {
            gas_write(b, b2 as u32, PM1_BYTES)?;
        }
    }
    time::spin_ns(100_000_000);
    Err("the machine is still running 100 ms after SLP_EN")
}

/// Stops the calling CPU for good (interrupts off, `hlt`; an NMI that
/// still arrives returns to the loop).
pub fn halt_forever() -> ! {
    loop {
        x86_64::instructions::interrupts::disable();
        x86_64::instructions::hlt();
    }
}

/// Set by the first [`exit`] or [`reboot`] (to the index of the CPU going
/// down, plus 1): a fault on the way down (a register that cannot be
/// reached, a bug) must not recurse through the exception handler into
/// another power-off until the CPU triple-faults, and a second CPU failing
/// at the same time must not race the first.
static GOING_DOWN: AtomicUsize = AtomicUsize::new(0);

/// A CPU is powering off or resetting the machine.
pub fn going_down() -> bool {
    GOING_DOWN.load(Ordering::Acquire) != 0
}

fn once_going_down(status: u8) {
    let me = crate::platform::smp::cpu_index();
    match GOING_DOWN.compare_exchange(0, me + 1, Ordering::AcqRel, Ordering::Acquire) {
        Ok(_) => {
            // The other CPUs stop where they are (an NMI, see
            // `smp::stop_others`): nothing runs on while the machine goes
            // down, and on bare metal a halted machine is quiet.
            crate::platform::smp::stop_others();
        }
        Err(cpu) if cpu == me + 1 => {
            serial::emergency(format_args!(
                "dioxide: fault while powering off or resetting (status {status}); halting\n"
            ));
            halt_forever();
        }
        // Another CPU is taking the machine down; its line is the one that
        // counts.
        Err(_) => halt_forever(),
    }
}

/// Powers off with `status` (see the module documentation).
pub fn exit(status: u8) -> ! {
    once_going_down(status);
    let mut method = forced().unwrap_or(if hypervisor().is_some() {
        Method::DebugExit
    } else if status == 0 {
        Method::Acpi
    } else {
        Method::Halt
    });
    loop {
        serial::emergency(format_args!(
            "dioxide: power off status={status} method={}\n",
            method.key()
        ));
        match method {
            Method::DebugExit => {
                // SAFETY: port 0xf4 is the isa-debug-exit device under QEMU;
                // on other machines the write goes nowhere.
                unsafe { Port::<u32>::new(0xf4).write(status as u32) };
                time::spin_ns(10_000_000);
                if forced() == Some(Method::DebugExit) {
                    serial::emergency(format_args!(
                        "dioxide: still running after isa-debug-exit; halting\n"
                    ));
                    halt_forever();
                }
                method = Method::Acpi;
            }
            Method::Acpi => {
                if let Err(why) = acpi_s5() {
                    serial::emergency(format_args!("dioxide: ACPI power-off failed: {why}\n"));
                }
                method = Method::Halt;
            }
            Method::Halt => {
                serial::emergency(format_args!(
                    "dioxide: halted (status {status}); power=acpi powers off instead, panic=reboot resets\n"
                ));
                halt_forever()
            }
        }
    }
}

/// Ends a panic or a CPU exception: powers off with `status`, or resets when
/// `panic=reboot`.
pub fn fatal(status: u8) -> ! {
    if PANIC_REBOOT.load(Ordering::Relaxed) == 1 {
        reboot(status)
    }
    exit(status)
}

/// Resets the machine, after the line `dioxide: reset status=<n> method=<m>`
/// for each attempt (see the module documentation).
pub fn reboot(status: u8) -> ! {
    x86_64::instructions::interrupts::disable();
    once_going_down(status);
    let line =
        |m: &str| serial::emergency(format_args!("dioxide: reset status={status} method={m}\n"));
    if let Some(r) = acpi::facts().and_then(|f| f.fadt).and_then(|f| f.reset) {
        line("acpi");
        match gas_write(r.reg, r.value as u32, r.reg.access_bytes()) {
            Ok(()) => time::spin_ns(50_000_000),
            Err(why) => serial::emergency(format_args!("dioxide: ACPI reset register: {why}\n")),
        }
    }
    line("cf9");
    // SAFETY: the PCI reset control register (0xcf9) of PC chipsets: 0x02
    // selects a hard reset, 0x0e (with bit 2) starts a full one. The machine
    // is going down.
    unsafe {
        let mut cf9 = Port::<u8>::new(0xcf9);
        cf9.write(0x02);
        time::spin_ns(50_000);
        cf9.write(0x0e);
    }
    time::spin_ns(50_000_000);
    line("kbd");
    // SAFETY: the 8042 keyboard controller: wait (bounded) until its input
    // buffer is empty, then command 0xfe pulses the CPU reset line.
    unsafe {
        let mut status_port = Port::<u8>::new(0x64);
        for _ in 0..100_000 {
            if status_port.read() & 0x02 == 0 {
                break;
            }
            core::hint::spin_loop();
        }
        status_port.write(0xfe);
    }
    time::spin_ns(50_000_000);
    line("triplefault");
    crate::platform::idt::triple_fault()
}
