//! 16550 UART console on COM1 and the `log` backend.
//!
//! Every line is `[seconds.micros] LEVEL target: message`, timestamped from the
//! TSC. Writes happen with interrupts off so that an interrupt handler that
//! logs cannot deadlock against the code it interrupted.

use core::fmt::{self, Write};
use core::sync::atomic::{AtomicBool, Ordering};
use spin::Mutex;
use x86_64::instructions::port::Port;

const COM1: u16 = 0x3f8;

pub struct Uart {
    base: u16,
}

impl Uart {
    const fn new(base: u16) -> Self {
        Uart { base }
    }

    fn init(&mut self) {
        // SAFETY: COM1's registers; programming them affects only the UART.
        unsafe {
            Port::<u8>::new(self.base + 1).write(0x00); // no UART interrupts
            Port::<u8>::new(self.base + 3).write(0x80); // DLAB
            Port::<u8>::new(self.base).write(0x01); // 115200 baud
            Port::<u8>::new(self.base + 1).write(0x00);
            Port::<u8>::new(self.base + 3).write(0x03); // 8N1
            Port::<u8>::new(self.base + 2).write(0xc7); // FIFO on, cleared
            Port::<u8>::new(self.base + 4).write(0x03); // DTR, RTS
        }
    }

    fn put(&mut self, b: u8) {
        // Wait for the transmit holding register, bounded so that a missing
        // UART (bare metal without COM1) cannot hang the kernel.
        for _ in 0..100_000 {
            // SAFETY: line status register read has no side effect on memory.
            if unsafe { Port::<u8>::new(self.base + 5).read() } & 0x20 != 0 {
                break;
            }
            core::hint::spin_loop();
        }
        // SAFETY: data register write.
        unsafe { Port::<u8>::new(self.base).write(b) };
    }
}

impl Write for Uart {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for b in s.bytes() {
            if b == b'\n' {
                self.put(b'\r');
            }
            self.put(b);
        }
        Ok(())
    }
}

static UART: Mutex<Uart> = Mutex::new(Uart::new(COM1));
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
        x86_64::instructions::interrupts::without_interrupts(|| {
            let mut u = UART.lock();
            let _ = writeln!(
                u,
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

/// Sets up COM1 and installs the logger.
pub fn init(level: log::LevelFilter) {
    UART.lock().init();
    if !READY.swap(true, Ordering::AcqRel) {
        let _ = log::set_logger(&LOGGER);
    }
    log::set_max_level(level);
}

/// Prints a line for programs on the host to read (results of self-tests):
/// exactly the text given, no prefix.
pub fn println(args: fmt::Arguments) {
    x86_64::instructions::interrupts::without_interrupts(|| {
        let mut u = UART.lock();
        let _ = u.write_fmt(args);
        let _ = u.write_str("\n");
    });
}

/// Writes without taking the console lock: for exception and panic reports,
/// which may happen while the lock is held.
pub fn emergency(args: fmt::Arguments) {
    let mut u = Uart::new(COM1);
    let _ = u.write_fmt(args);
}

#[macro_export]
macro_rules! outln {
    ($($t:tt)*) => { $crate::platform::serial::println(format_args!($($t)*)) };
}
