//! Boot entry of the dioxide kernel.
//!
//! The kernel ELF carries a PVH entry note (QEMU `-kernel`, Xen) and a
//! multiboot2 header (GRUB on bare metal). Both enter 32-bit code in
//! `entry.S`, which switches to long mode with identity-mapped page tables for
//! the first 4 GiB and calls [`dioxide_boot_entry`]. That function copies what
//! the kernel needs out of the boot loader's structures into a [`BootInfo`]
//! (memory map, command line, ACPI RSDP) and calls the kernel's entry, declared
//! with [`entry_point!`].
//!
//! Boot structures are read defensively: sizes and counts are bounded, so a
//! broken boot loader yields a message on COM1, not a hang in a parser.
#![no_std]
#![deny(clippy::undocumented_unsafe_blocks)]

mod info;
pub use info::{BootInfo, MemoryKind, MemoryRegion, Protocol, MAX_CMDLINE, MAX_REGIONS};

core::arch::global_asm!(include_str!("entry.S"));

extern "Rust" {
    fn dioxide_kernel_main(info: &'static BootInfo) -> !;
}

/// Declares the kernel's entry function, `fn(&'static BootInfo) -> !`.
#[macro_export]
macro_rules! entry_point {
    ($f:path) => {
        #[no_mangle]
        pub fn dioxide_kernel_main(info: &'static $crate::BootInfo) -> ! {
            let f: fn(&'static $crate::BootInfo) -> ! = $f;
            f(info)
        }
    };
}

static mut BOOT_INFO: BootInfo = BootInfo::empty();

extern "C" {
    static __kernel_start: u8;
    static __kernel_end: u8;
    static boot_stack_bottom: u8;
    static boot_stack_top: u8;
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
    // SAFETY: the boot loader passed `info` as the address of its structure,
    // identity mapped by entry.S.
    let parsed = unsafe {
        match protocol {
            1 => info::parse_pvh(boot, info as u64),
            2 => info::parse_multiboot2(boot, magic, info as u64),
            _ => Err("unknown boot protocol"),
        }
    };
    if let Err(why) = parsed {
        early_print("dioxide: bad boot information: ");
        early_print(why);
        early_print("\r\n");
        halt();
    }
    // SAFETY: BOOT_INFO is complete and never written again.
    unsafe { dioxide_kernel_main(&*core::ptr::addr_of!(BOOT_INFO)) }
}

/// Writes to COM1 without any set-up (QEMU accepts it; real UARTs keep the
/// firmware's settings). For failures before the kernel's console exists.
pub fn early_print(s: &str) {
    for b in s.bytes() {
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
