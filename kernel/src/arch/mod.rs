//! x86_64-specific parts: descriptor tables, interrupts, the local APIC.
pub mod apic;
pub mod gdt;
pub mod idt;
