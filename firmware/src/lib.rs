//! What the firmware tells dioxide, read at the very start of `kmain`: on the
//! boot loader's identity map, before the TSC is calibrated and before there
//! is a heap.
//!
//! - [`acpi`]: finds the RSDP and the RSDT/XSDT, validates every table
//!   (length bounded, checksum) and copies out the facts the kernel needs
//!   ([`acpi::Facts`]): PCIe ECAM (MCFG), local APIC ids and the 8259's
//!   presence (MADT), the fixed hardware (FADT: PM timer, PM1 control blocks,
//!   SMI command, reset register, hardware-reduced sleep registers, boot
//!   architecture flags), the HPET's base, the SPCR console UART and the
//!   `_S5_` sleep type values from the DSDT/SSDTs.
//! - [`tables`]: the decoders of the individual tables, over the table's
//!   bytes (host-tested against tables dumped from QEMU 7.2 and 10.0 and synthetic
//!   ones).
//! - [`s5`]: the bounded byte scan for `Name (_S5_, Package () {...})` in AML.
//! - [`calib`]: the arithmetic of TSC calibration (counter deltas that wrap,
//!   rounds and their median, the HPET period, CPUID leaf 0x15/0x16, the
//!   cross-check) and the measuring loop itself over a [`calib::RefClock`],
//!   so that its bounds (a frozen or all-ones counter, a counter that never
//!   gets there) are tested on the host.
//!
//! Nothing here touches hardware: physical memory is read through
//! [`acpi::PhysMem`] and the clocks through [`calib::RefClock`], which the
//! kernel implements over the identity map and the real counters.
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]

pub mod acpi;
pub mod calib;
pub mod s5;
pub mod tables;

mod bytes;
