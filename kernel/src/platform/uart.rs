//! 16550 UARTs, at I/O ports (COM1 at 0x3f8) or memory-mapped (as ACPI's
//! SPCR may describe them), for the console in [`super::serial`].
//!
//! Registers (offset x stride): 0 data / divisor low (DLAB), 1 interrupt
//! enable / divisor high (DLAB), 2 FIFO control, 3 line control (bit 7
//! DLAB), 4 modem control, 5 line status (bit 5 transmit holding register
//! empty), 7 scratch. The divisor is 115200 / baud (1.8432 MHz clock / 16).
//!
//! Every wait is bounded, so a UART that is not there costs time but never
//! hangs the kernel.

use x86_64::instructions::port::Port;

/// Where a 16550's registers are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UartIo {
    /// I/O ports `base .. base + 8`.
    Port(u16),
    /// Memory-mapped at physical `base`, one register every `stride` bytes
    /// (1: byte registers; 4: 32-bit registers, read and written as 32-bit
    /// words).
    Mmio { base: u64, stride: u8 },
}

impl core::fmt::Display for UartIo {
    fn fmt(&self, f: &mut core::fmt::Formatter) -> core::fmt::Result {
        match *self {
            UartIo::Port(0x3f8) => write!(f, "COM1"),
            UartIo::Port(0x2f8) => write!(f, "COM2 (I/O 0x2f8)"),
            UartIo::Port(p) => write!(f, "I/O {p:#x}"),
            UartIo::Mmio { base, stride } => write!(f, "MMIO {base:#x} stride {stride}"),
        }
    }
}

const DATA: u8 = 0;
const IER: u8 = 1;
const FCR: u8 = 2;
const LCR: u8 = 3;
const MCR: u8 = 4;
const LSR: u8 = 5;
const SCRATCH: u8 = 7;

/// Line status polls before a byte is written anyway (a few ms at most).
const TX_POLLS: u32 = 100_000;

/// A 16550 whose registers are reachable: I/O ports, or MMIO that
/// [`super::serial::add_uart`] mapped before making one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Uart {
    io: UartIo,
}

impl Uart {
    /// # Safety
    /// For [`UartIo::Mmio`], `[base, base + 8 * stride)` is mapped
    /// (uncached) and holds a 16550's registers for the rest of the
    /// kernel's life; `stride` is 1 or 4. I/O ports need nothing: a port
    /// with no device behind it reads 0xff and ignores writes.
    pub const unsafe fn new(io: UartIo) -> Uart {
        Uart { io }
    }

    /// COM1 at I/O port 0x3f8.
    pub const fn com1() -> Uart {
        Uart {
            io: UartIo::Port(0x3f8),
        }
    }

    pub fn io(&self) -> UartIo {
        self.io
    }

    fn read(&self, reg: u8) -> u8 {
        match self.io {
            // SAFETY: a read of a 16550 register port has no effect on
            // memory (at worst it clears the UART's own status).
            UartIo::Port(p) => unsafe { Port::<u8>::new(p + reg as u16).read() },
            UartIo::Mmio { base, stride } => {
                let at = base + reg as u64 * stride as u64;
                if stride == 4 {
                    // SAFETY: Uart::new's contract: register `reg` is
                    // mapped at `at`, 4-byte aligned (base is, stride 4).
                    unsafe { core::ptr::read_volatile(at as *const u32) as u8 }
                } else {
                    // SAFETY: as above, byte registers.
                    unsafe { core::ptr::read_volatile(at as *const u8) }
                }
            }
        }
    }

    fn write(&self, reg: u8, v: u8) {
        match self.io {
            // SAFETY: a write of a 16550 register port affects only the
            // UART.
            UartIo::Port(p) => unsafe { Port::<u8>::new(p + reg as u16).write(v) },
            UartIo::Mmio { base, stride } => {
                let at = base + reg as u64 * stride as u64;
                if stride == 4 {
                    // SAFETY: Uart::new's contract: register `reg` is
                    // mapped at `at`, 4-byte aligned.
                    unsafe { core::ptr::write_volatile(at as *mut u32, v as u32) }
                } else {
                    // SAFETY: as above, byte registers.
                    unsafe { core::ptr::write_volatile(at as *mut u8, v) }
                }
            }
        }
    }

    /// Whether a UART answers: its scratch register keeps two patterns
    /// (an absent port reads 0xff). The scratch register is the UART's
    /// own; nothing else uses it.
    pub fn probe(&self) -> bool {
        [0x5a, 0xa5].iter().all(|&v| {
            self.write(SCRATCH, v);
            self.read(SCRATCH) == v
        })
    }

    /// Programs 8N1 at `baud` with FIFOs on and interrupts off, or, with
    /// `None`, only turns interrupts off and keeps the firmware's line
    /// settings (SPCR's "as is").
    pub fn init(&self, baud: Option<u32>) {
        self.write(IER, 0);
        let Some(baud) = baud else { return };
        let div = (115_200 + baud / 2)
            .checked_div(baud)
            .unwrap_or(1)
            .clamp(1, 0xffff);
        self.write(LCR, 0x80); // DLAB
        self.write(DATA, div as u8);
        self.write(IER, (div >> 8) as u8);
        self.write(LCR, 0x03); // 8N1, DLAB off
        self.write(FCR, 0xc7); // FIFO on, cleared, 14-byte trigger
        self.write(MCR, 0x03); // DTR, RTS
    }

    /// Writes one byte once the transmitter has room; `false` if it had
    /// none after a bounded wait (the byte is not written).
    pub fn put(&self, b: u8) -> bool {
        for _ in 0..TX_POLLS {
            if self.read(LSR) & 0x20 != 0 {
                self.write(DATA, b);
                return true;
            }
            core::hint::spin_loop();
        }
        false
    }

    /// Writes `s` with `\n` as `\r\n`; `false` (and the rest not
    /// written) if the transmitter did not take a byte.
    pub fn write_bytes(&self, s: &[u8]) -> bool {
        for &b in s {
            if (b == b'\n' && !self.put(b'\r')) || !self.put(b) {
                return false;
            }
        }
        true
    }
}
