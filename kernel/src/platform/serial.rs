//! The console (the module keeps its first name, from when it was COM1
//! only): every line goes to every sink, and the `log` backend.
//!
//! Sinks:
//! - COM1, when a UART answers at 0x3f8 ([`init`] probes it);
//! - up to [`MAX_UARTS`] - 1 more 16550s, I/O or MMIO, that ACPI's SPCR
//!   names ([`add_uart`]);
//! - the screen: a text console ([`dioxide_console`]) on the framebuffer
//!   the boot loader set up (GOP under UEFI, VBE or EGA text under a
//!   BIOS), attached by [`attach_screen`] once memory is set up. Lines
//!   written before that are kept in a fixed buffer ([`EARLY_BYTES`]) and
//!   shown when it attaches, so the screen starts with the boot line.
//!
//! Log lines are `[seconds.micros] LEVEL target: message`, timestamped from
//! the TSC; [`println`] (`outln!`) prints a result line exactly as given.
//! Writes happen with interrupts off and the console lock held, so lines
//! never interleave and a handler that logs cannot deadlock against the
//! code it interrupted. Nothing allocates.
//!
//! Several CPUs log at once: the console lock (a spin lock, taken with
//! interrupts off) orders their lines; one line is written whole under it.
//!
//! [`emergency`] (exception and panic reports, power-off) never waits
//! long for a lock that may be held: the UART table is read lock-free, the
//! console lock is waited for a bounded time (so that another CPU's line
//! is not cut), and without it the screen is left out.

use super::uart::Uart;
pub use super::uart::UartIo;
use core::fmt::{self, Write};
use core::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use dioxide_boot::{BootInfo, Framebuffer, FramebufferFormat, MemoryKind};
use dioxide_console::{Channel, Format, Surface, TextConsole};
use dioxide_firmware::tables::UartRegs;
use spin::Mutex;

/// UART sinks at most (COM1 and two more).
pub const MAX_UARTS: usize = 3;
/// Bytes of early log kept for the screen.
pub const EARLY_BYTES: usize = 8192;

/// One UART sink, readable without a lock: `kind` (0 empty, 1 I/O port,
/// 2 MMIO, 3 stopped) is written last, with release ordering, when the slot
/// is filled. A UART whose transmitter does not take a byte within the
/// bounded wait (~100 ms) is stopped for good: it is broken or not there
/// (an MMIO UART reading 0), and waiting on it for every byte would stall
/// the kernel.
struct Slot {
    kind: AtomicU8,
    base: AtomicU64,
    stride: AtomicU8,
}

impl Slot {
    const fn empty() -> Slot {
        Slot {
            kind: AtomicU8::new(0),
            base: AtomicU64::new(0),
            stride: AtomicU8::new(0),
        }
    }

    fn get(&self) -> Option<Uart> {
        let io = match self.kind.load(Ordering::Acquire) {
            1 => UartIo::Port(self.base.load(Ordering::Relaxed) as u16),
            2 => UartIo::Mmio {
                base: self.base.load(Ordering::Relaxed),
                stride: self.stride.load(Ordering::Relaxed),
            },
            _ => return None,
        };
        // SAFETY: a slot is filled only by `set` with a UART whose MMIO
        // range was mapped for good (add_uart), or with I/O ports.
        Some(unsafe { Uart::new(io) })
    }

    /// Writes to the UART, stopping it if it does not take the bytes.
    fn write(&self, s: &[u8]) {
        if let Some(u) = self.get() {
            if !u.write_bytes(s) {
                self.kind.store(STOPPED, Ordering::Release);
            }
        }
    }

    fn stopped(&self) -> bool {
        self.kind.load(Ordering::Acquire) == STOPPED
    }

    /// Fills an empty slot (under the console lock, so never two at once).
    fn set(&self, u: Uart) {
        let (kind, base, stride) = match u.io() {
            UartIo::Port(p) => (1, p as u64, 1),
            UartIo::Mmio { base, stride } => (2, base, stride),
        };
        self.base.store(base, Ordering::Relaxed);
        self.stride.store(stride, Ordering::Relaxed);
        self.kind.store(kind, Ordering::Release);
    }
}

const STOPPED: u8 = 3;

static UARTS: [Slot; MAX_UARTS] = [Slot::empty(), Slot::empty(), Slot::empty()];

fn uarts() -> impl Iterator<Item = Uart> {
    UARTS.iter().filter_map(Slot::get)
}

/// Early lines for the screen, until it attaches (or turns out absent).
/// The first lines are kept (the boot line comes first); once the buffer
/// is full, the line that did not fit is taken out again and later lines
/// are counted.
struct Early {
    buf: [u8; EARLY_BYTES],
    len: usize,
    full: bool,
    lost_lines: usize,
    open: bool,
}

impl Early {
    fn push(&mut self, s: &[u8]) {
        if !self.full && s.len() <= EARLY_BYTES - self.len {
            self.buf[self.len..self.len + s.len()].copy_from_slice(s);
            self.len += s.len();
            return;
        }
        if !self.full {
            // Back to the end of the last whole line.
            self.full = true;
            self.len = self.buf[..self.len]
                .iter()
                .rposition(|&b| b == b'\n')
                .map_or(0, |i| i + 1);
            self.lost_lines += 1;
        }
        self.lost_lines += s.iter().filter(|&&b| b == b'\n').count();
    }
}

struct Screen {
    text: TextConsole<'static>,
    early: Early,
}

static SCREEN: Mutex<Screen> = Mutex::new(Screen {
    text: TextConsole::new(),
    early: Early {
        buf: [0; EARLY_BYTES],
        len: 0,
        full: false,
        lost_lines: 0,
        open: true,
    },
});

/// Writes to every UART and, when given, the screen (or its early
/// buffer).
struct Sinks<'a> {
    screen: Option<&'a mut Screen>,
}

impl Write for Sinks<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for slot in &UARTS {
            slot.write(s.as_bytes());
        }
        if let Some(sc) = self.screen.as_deref_mut() {
            if sc.text.is_attached() {
                sc.text.write_bytes(s.as_bytes());
            } else if sc.early.open {
                sc.early.push(s.as_bytes());
            }
        }
        Ok(())
    }
}

/// Runs `f` on all sinks with interrupts off and the console locked.
fn with_sinks(f: impl FnOnce(&mut Sinks)) {
    x86_64::instructions::interrupts::without_interrupts(|| {
        let mut screen = SCREEN.lock();
        f(&mut Sinks {
            screen: Some(&mut screen),
        });
    });
}

static LOGGER: Logger = Logger;
static READY: AtomicBool = AtomicBool::new(false);

struct Logger;

impl log::Log for Logger {
    fn enabled(&self, m: &log::Metadata) -> bool {
        m.level() <= log::max_level()
    }

    fn log(&self, r: &log::Record) {
        if !self.enabled(r.metadata()) {
            return;
        }
        let us = crate::platform::time::now_ns() / 1000;
        with_sinks(|s| {
            let _ = writeln!(
                s,
                "[{:5}.{:06}] {:5} {}: {}",
                us / 1_000_000,
                us % 1_000_000,
                r.level(),
                r.target(),
                r.args()
            );
        });
    }

    fn flush(&self) {}
}

/// Sets up COM1 if a UART answers there, and installs the logger. COM1
/// runs at 115200 baud 8N1, unless the ACPI SPCR names COM1 itself: then
/// at the SPCR's rate, or as the firmware left it when the SPCR says so (a
/// BMC's serial-over-LAN expects its own setting).
pub fn init(level: log::LevelFilter, spcr: Option<&dioxide_firmware::tables::Spcr>) {
    let baud = match spcr {
        Some(s) if s.is_16550() && s.regs == UartRegs::Io { port: 0x3f8 } => spcr_rate(s),
        _ => Some(115_200),
    };
    x86_64::instructions::interrupts::without_interrupts(|| {
        let _screen = SCREEN.lock();
        let com1 = Uart::com1();
        if UARTS[0].get().is_none() && !UARTS[0].stopped() && com1.probe() {
            com1.init(baud);
            UARTS[0].set(com1);
        }
    });
    if !READY.swap(true, Ordering::AcqRel) {
        let _ = log::set_logger(&LOGGER);
    }
    log::set_max_level(level);
}

/// Why [`add_uart`] did not add a sink.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UartError {
    /// That UART is a sink already (e.g. SPCR names COM1).
    AlreadyPresent,
    /// [`MAX_UARTS`] sinks already.
    Full,
    /// MMIO stride other than 1 or 4.
    BadStride(u8),
    /// MMIO at address 0 or not 4-byte aligned for stride 4.
    BadAddress(u64),
    /// Its registers could not be mapped.
    Map(&'static str),
}

impl fmt::Display for UartError {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            UartError::AlreadyPresent => write!(f, "already a console sink"),
            UartError::Full => write!(f, "{MAX_UARTS} UART sinks already"),
            UartError::BadStride(s) => write!(f, "register stride {s} (1 or 4)"),
            UartError::BadAddress(a) => write!(f, "register address {a:#x}"),
            UartError::Map(e) => write!(f, "cannot map its registers: {e}"),
        }
    }
}

/// Adds a 16550 as a console sink (for ACPI SPCR). `baud` `None` keeps the
/// firmware's line settings (SPCR baud 0); otherwise the UART is set to
/// 8N1 at that rate. MMIO registers are mapped here, so memory must be set
/// up. Logs `console: <uart>` when added.
pub fn add_uart(io: UartIo, baud: Option<u32>) -> Result<(), UartError> {
    if let UartIo::Mmio { base, stride } = io {
        if stride != 1 && stride != 4 {
            return Err(UartError::BadStride(stride));
        }
        if base == 0 || base % stride as u64 != 0 {
            return Err(UartError::BadAddress(base));
        }
        crate::mm::map_mmio(base, 8 * stride as u64).map_err(UartError::Map)?;
    }
    // SAFETY: an MMIO range was checked (stride 1 or 4, aligned) and
    // mapped just above, for good; I/O ports need nothing.
    let uart = unsafe { Uart::new(io) };
    x86_64::instructions::interrupts::without_interrupts(|| {
        let _screen = SCREEN.lock();
        if uarts().any(|u| u.io() == io) {
            return Err(UartError::AlreadyPresent);
        }
        let slot = UARTS
            .iter()
            .find(|s| s.get().is_none() && !s.stopped())
            .ok_or(UartError::Full)?;
        uart.init(baud);
        // What was logged before this UART was known (the boot line, ACPI,
        // the TSC), as the screen gets it, so that a BMC's serial-over-LAN
        // shows the whole boot.
        let screen = &*_screen;
        let _ = uart.write_bytes(&screen.early.buf[..screen.early.len]);
        slot.set(uart);
        Ok(())
    })?;
    match baud {
        Some(b) => log::info!(target: "console", "{io}, {b} baud"),
        None => log::info!(target: "console", "{io}, line settings as the firmware left them"),
    }
    Ok(())
}

/// Adds the UART that the ACPI SPCR table names (the port a BMC redirects
/// for serial-over-LAN), when it is a 16550 this driver can drive. The
/// divisor assumes the PC's 1.8432 MHz UART clock: when the table gives
/// another clock, the firmware's line settings are kept instead. Logs what
/// it did; COM1 named again is not added twice.
pub fn add_spcr(spcr: &dioxide_firmware::tables::Spcr) {
    if !spcr.is_16550() {
        log::info!(
            target: "console",
            "SPCR names a UART of interface type {:#x}, not a 16550: not used",
            spcr.interface_type
        );
        return;
    }
    let io = match spcr.regs {
        UartRegs::Io { port } => UartIo::Port(port),
        UartRegs::Mmio { base, width } => UartIo::Mmio {
            base,
            stride: width,
        },
    };
    match add_uart(io, spcr_rate(spcr)) {
        Ok(()) | Err(UartError::AlreadyPresent) => {}
        Err(e) => log::warn!(target: "console", "SPCR UART {io}: {e}"),
    }
}

/// The rate to program for the SPCR's UART: its baud rate, or `None` (keep
/// the firmware's setting) when it gives none or names a UART clock other
/// than the PC's 1.8432 MHz, which the divisor assumes.
fn spcr_rate(spcr: &dioxide_firmware::tables::Spcr) -> Option<u32> {
    match spcr.clock_hz {
        Some(hz) if hz != 0 && hz != 1_843_200 => None,
        _ => spcr.baud,
    }
}

/// The console format of a framebuffer, if it can draw on it.
fn format(fb: &Framebuffer) -> Option<Format> {
    match fb.format {
        FramebufferFormat::Rgb {
            red_pos,
            red_size,
            green_pos,
            green_size,
            blue_pos,
            blue_size,
        } if fb.bpp == 24 || fb.bpp == 32 => Some(Format::Rgb {
            bytes_per_pixel: fb.bpp / 8,
            red: Channel {
                pos: red_pos,
                size: red_size,
            },
            green: Channel {
                pos: green_pos,
                size: green_size,
            },
            blue: Channel {
                pos: blue_pos,
                size: blue_size,
            },
        }),
        FramebufferFormat::EgaText => Some(Format::EgaText),
        _ => None,
    }
}

/// Puts the console on `fb`: checks it, maps it, attaches the text
/// console and shows the early lines.
fn attach(boot: &BootInfo, fb: &Framebuffer) -> Result<(), &'static str> {
    let format = format(fb).ok_or("unsupported format")?;
    let len = fb.pitch as u64 * fb.height as u64;
    // Check the geometry before mapping anything: a damaged tag must not
    // make the kernel map (and spend page tables on) gigabytes.
    let bytes_pp = match format {
        Format::Rgb {
            bytes_per_pixel, ..
        } => bytes_per_pixel as u64,
        Format::EgaText => 2,
    };
    if fb.width == 0
        || fb.height == 0
        || fb.width > 16384
        || fb.height > 16384
        || (fb.pitch as u64) < fb.width as u64 * bytes_pp
        || len > 1 << 30
    {
        return Err("its geometry is implausible");
    }
    let end = fb.addr.checked_add(len).ok_or("bad address")?;
    if fb.addr == 0 {
        return Err("bad address");
    }
    let ram = boot
        .memory_map()
        .iter()
        .any(|r| r.kind == MemoryKind::Usable && r.start < end && fb.addr < r.start + r.len);
    if ram {
        return Err("it overlaps usable RAM");
    }
    crate::mm::map_mmio(fb.addr, len)?;
    x86_64::instructions::interrupts::without_interrupts(|| {
        let mut screen = SCREEN.lock();
        let sc = &mut *screen;
        if sc.text.is_attached() {
            return Err("already attached");
        }
        // SAFETY: [addr, addr + len) is the boot loader's framebuffer:
        // device memory outside every usable RAM region (checked above),
        // so neither the frame allocator nor the heap hands it out, and
        // identity mapped just above, for good. Nothing else in the kernel
        // writes it, and this runs once (the console was not attached,
        // checked under the lock), so the console owns it from here on.
        let buf = unsafe { core::slice::from_raw_parts_mut(fb.addr as *mut u8, len as usize) };
        let surface = Surface::new(
            buf,
            fb.width as usize,
            fb.height as usize,
            fb.pitch as usize,
            format,
        )
        .map_err(|_| "its geometry does not fit its size")?;
        sc.text.attach(surface);
        sc.text.write_batch(&sc.early.buf[..sc.early.len]);
        if sc.early.full {
            let _ = writeln!(
                sc.text,
                "(about {} more lines of early log are on the serial console only)",
                sc.early.lost_lines
            );
        }
        Ok(())
    })
}

/// Logs the UART sinks, then puts the console on the boot loader's
/// framebuffer, if there is one it can use, and shows the lines logged so
/// far there. Call once, when memory is set up (the framebuffer is mapped
/// here); logs one line per sink (`console: COM1`, `console: framebuffer
/// 1024x768 32bpp at 0xc0000000`).
pub fn attach_screen(boot: &BootInfo) {
    for u in uarts() {
        log::info!(target: "console", "{}", u.io());
    }
    let attached = match &boot.framebuffer {
        Some(fb) => attach(boot, fb),
        None => Err("no framebuffer from the boot loader"),
    };
    // Whatever happened, the early buffer has served.
    x86_64::instructions::interrupts::without_interrupts(|| SCREEN.lock().early.open = false);
    match (attached, &boot.framebuffer) {
        (Ok(()), Some(fb)) if fb.format == FramebufferFormat::EgaText => log::info!(
            target: "console",
            "EGA text {}x{} at {:#x}",
            fb.width,
            fb.height,
            fb.addr
        ),
        (Ok(()), Some(fb)) => log::info!(
            target: "console",
            "framebuffer {}x{} {}bpp at {:#x}",
            fb.width,
            fb.height,
            fb.bpp,
            fb.addr
        ),
        (Err(e), Some(fb)) => log::warn!(
            target: "console",
            "framebuffer {}x{} {}bpp {:?} at {:#x} not used: {e}",
            fb.width,
            fb.height,
            fb.bpp,
            fb.format,
            fb.addr
        ),
        (r, None) => log::info!(target: "console", "{}", r.err().unwrap_or("")),
    }
}

/// Prints a line for programs on the host to read (results of self-tests):
/// exactly the text given, no prefix.
pub fn println(args: fmt::Arguments) {
    with_sinks(|s| {
        let _ = s.write_fmt(args);
        let _ = s.write_str("\n");
    });
}

/// How long [`emergency`] waits for the console lock.
const EMERGENCY_WAIT_NS: u64 = 20_000_000;

/// Writes without waiting long for the console lock: for exception and
/// panic reports, which may happen while it is held (by this CPU, or by
/// another CPU that is stopped or as broken). The lock is waited for up to
/// [`EMERGENCY_WAIT_NS`] — another CPU's line finishes and this report
/// does not cut into it — and then the UARTs get the text without it, and
/// the screen not at all.
pub fn emergency(args: fmt::Arguments) {
    x86_64::instructions::interrupts::without_interrupts(|| {
        // In TSC cycles, at 2 GHz when the rate is not known yet (the
        // clock `now_ns` stands still before calibration).
        let hz = match crate::platform::time::tsc_hz() {
            0 => 2_000_000_000,
            hz => hz,
        };
        let budget = EMERGENCY_WAIT_NS * (hz / 1_000_000) / 1000;
        let t0 = crate::platform::time::rdtsc();
        let mut screen = loop {
            if let Some(g) = SCREEN.try_lock() {
                break Some(g);
            }
            if crate::platform::time::rdtsc().wrapping_sub(t0) > budget {
                break None;
            }
            core::hint::spin_loop();
        };
        let mut s = Sinks {
            screen: screen.as_deref_mut(),
        };
        let _ = s.write_fmt(args);
    });
}

#[macro_export]
macro_rules! outln {
    ($($t:tt)*) => { $crate::platform::serial::println(format_args!($($t)*)) };
}
