//! The machine under the appliance: boot arguments, ACPI tables,
//! descriptor tables and interrupts, the local APIC, the other CPUs
//! (`smp`), time, the serial console and power-off. Everything here is set
//! up once, at boot.
pub mod acpi;
pub mod apic;
pub mod cmdline;
pub mod gdt;
pub mod idt;
pub mod irq_mutex;
pub mod power;
pub mod serial;
pub mod smp;
pub mod time;
pub mod uart;
