//! The way in from `entry.S`: reads the boot loader's structure through the
//! boot identity map, fills the one [`BootInfo`] and calls the kernel.

use crate::info::{BootError, BootInfo};
use crate::{mb2, pvh};
use core::fmt::{self, Write};

core::arch::global_asm!(include_str!("entry.S"));

extern "Rust" {
    fn dioxide_kernel_main(info: &'static BootInfo) -> !;
}

static mut BOOT_INFO: BootInfo = BootInfo::empty();

extern "C" {
    static __kernel_start: u8;
    static __kernel_end: u8;
    static boot_stack_bottom: u8;
    static boot_stack_top: u8;
}

/// The first 4 GiB, identity mapped by entry.S (2 MiB pages, all present).
const BOOT_MAP_END: u64 = 1 << 32;

/// Physical memory through the boot identity map: reads below 4 GiB only.
struct BootMem;

impl pvh::PhysMem for BootMem {
    fn read(&self, addr: u64, buf: &mut [u8]) -> bool {
        match addr.checked_add(buf.len() as u64) {
            Some(end) if addr != 0 && end <= BOOT_MAP_END => {
                // SAFETY: [addr, end) lies in the first 4 GiB, which entry.S
                // identity maps; the boot loader's structures there are not
                // written while we read them (one CPU, nothing else runs),
                // and byte copies need no alignment.
                unsafe {
                    core::ptr::copy_nonoverlapping(addr as *const u8, buf.as_mut_ptr(), buf.len())
                };
                true
            }
            _ => false,
        }
    }
}

/// The multiboot2 information at `info` as a slice of its `total_size`
/// bytes, or of its first 8 bytes when that size is implausible or the
/// structure would reach past the boot map (the parser then reports it).
fn mbi_bytes(info: u32) -> &'static [u8] {
    let addr = info as u64;
    let mut head = [0u8; 8];
    let total = if pvh::PhysMem::read(&BootMem, addr, &mut head) {
        u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as u64
    } else {
        return &[];
    };
    let len = if (16..=mb2::MB2_MAX_SIZE as u64).contains(&total) && addr + total <= BOOT_MAP_END {
        total
    } else {
        8
    };
    // SAFETY: addr != 0 and [addr, addr + len) lies below 4 GiB (checked by
    // BootMem::read for 8 bytes and above for `total`), identity mapped by
    // entry.S; GRUB's information stays untouched until the kernel has
    // copied it (BOOT_INFO is filled before the kernel runs).
    unsafe { core::slice::from_raw_parts(addr as *const u8, len as usize) }
}

/// Called by `entry.S` in long mode: `protocol` 1 = PVH, 2 = multiboot2;
/// `magic` is EAX at entry (multiboot2); `info` the physical address of the
/// boot loader's information structure.
#[no_mangle]
extern "C" fn dioxide_boot_entry(protocol: u32, magic: u32, info: u32) -> ! {
    // SAFETY: runs once, on the boot CPU, before anything else reads BOOT_INFO.
    let boot = unsafe { &mut *core::ptr::addr_of_mut!(BOOT_INFO) };
    // Linker-script symbols: only their addresses are taken.
    boot.kernel_start = core::ptr::addr_of!(__kernel_start) as u64;
    boot.kernel_end = core::ptr::addr_of!(__kernel_end) as u64;
    boot.stack_bottom = core::ptr::addr_of!(boot_stack_bottom) as u64;
    boot.stack_top = core::ptr::addr_of!(boot_stack_top) as u64;
    let parsed = match protocol {
        1 => pvh::parse_pvh(&BootMem, info as u64, boot),
        2 => mb2::parse_multiboot2(mbi_bytes(info), magic, boot),
        _ => Err(BootError::UnknownProtocol(protocol)),
    };
    if let Err(why) = parsed {
        let _ = write!(Com1, "dioxide: bad boot information: {why}\r\n");
        halt();
    }
    // SAFETY: BOOT_INFO is complete and never written again.
    unsafe { dioxide_kernel_main(&*core::ptr::addr_of!(BOOT_INFO)) }
}

struct Com1;

impl Write for Com1 {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        early_print(s);
        Ok(())
    }
}

/// Writes to COM1 without any set-up (QEMU accepts it; real UARTs keep the
/// firmware's settings). For failures before the kernel's console exists.
/// Each byte waits for the transmitter (a real 16550 drops bytes written
/// while it is busy), bounded so that a machine without COM1 (the line
/// status register then reads 0xff or never shows "empty") does not hang.
pub fn early_print(s: &str) {
    for b in s.bytes() {
        for _ in 0..100_000 {
            let lsr: u8;
            // SAFETY: port 0x3fd is COM1's line status register; reading it
            // has no effect on memory or on the UART's state.
            unsafe {
                core::arch::asm!("in al, dx", in("dx") 0x3fdu16, out("al") lsr, options(nomem, nostack))
            };
            if lsr & 0x20 != 0 {
                break;
            }
            core::hint::spin_loop();
        }
        // SAFETY: port 0x3f8 is COM1's data register; writing it has no effect
        // on memory.
        unsafe {
            core::arch::asm!("out dx, al", in("dx") 0x3f8u16, in("al") b, options(nomem, nostack))
        };
    }
}

/// Stops this CPU for good.
pub fn halt() -> ! {
    loop {
        // SAFETY: cli; hlt only stops the CPU.
        unsafe { core::arch::asm!("cli; hlt", options(nomem, nostack)) };
    }
}
