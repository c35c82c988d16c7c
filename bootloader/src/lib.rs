//! Boot entry of the dioxide kernel.
//!
//! The kernel ELF carries a PVH entry note (QEMU `-kernel`, Xen) and a
//! multiboot2 header (GRUB under a BIOS or UEFI). Both enter 32-bit code in
//! `entry.S`, which switches to long mode with identity-mapped page tables for
//! the first 4 GiB and calls `dioxide_boot_entry`. That function copies what
//! the kernel needs out of the boot loader's structures into a [`BootInfo`]
//! (memory map, command line, ACPI RSDP, framebuffer, firmware) and calls the
//! kernel's entry, declared with [`entry_point!`].
//!
//! The parsers ([`parse_multiboot2`], [`parse_pvh`]) read from a byte slice
//! and through a [`PhysMem`], not from raw pointers, so they are tested on
//! the host with golden bytes captured from GRUB and QEMU. Sizes and counts
//! are bounded, so a broken boot loader yields a message on COM1, not a hang
//! or a read out of bounds. The entry code (assembly, the raw pointers to
//! the boot loader's memory, the kernel's extern entry) builds only for the
//! kernel's target (`target_os = "none"`).
#![cfg_attr(not(test), no_std)]
#![deny(clippy::undocumented_unsafe_blocks)]

mod info;
mod mb2;
mod pvh;

pub use info::{
    BootError, BootInfo, Firmware, Framebuffer, FramebufferFormat, MemoryKind, MemoryRegion,
    Protocol, MAX_CMDLINE, MAX_REGIONS,
};
pub use mb2::{parse_multiboot2, MB2_BOOT_MAGIC, MB2_MAX_SIZE};
pub use pvh::{parse_pvh, PhysMem, PVH_MAGIC, PVH_MAX_ENTRIES};

#[cfg(target_os = "none")]
mod entry;
#[cfg(target_os = "none")]
pub use entry::{early_print, halt};

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
