//! Powering off with an exit status.
//!
//! Under QEMU the `isa-debug-exit` device (port 0xf4) ends the emulator with
//! status `(value << 1) | 1`. Because QEMU's own failures also exit 1, the
//! kernel first prints the line `dioxide: power off status=<n>` on the console;
//! the host CLI takes the status from that line and checks it against QEMU's.
//! Elsewhere (bare metal) the CPU halts after printing the line.

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

pub fn exit(status: u8) -> ! {
    crate::platform::serial::emergency(format_args!("dioxide: power off status={status}\n"));
    // SAFETY: port 0xf4 is the isa-debug-exit device under QEMU; on other
    // machines the write goes nowhere.
    unsafe { x86_64::instructions::port::Port::<u32>::new(0xf4).write(status as u32) };
    loop {
        x86_64::instructions::interrupts::disable();
        x86_64::instructions::hlt();
    }
}
