//! ACPI, read first in `kmain`: before the TSC is calibrated (which needs the
//! HPET's address and the PM timer's port) and before `mm::init`, on the boot
//! loader's identity map of 0..4 GiB, with no heap.
//!
//! The reading and every table layout live in `dioxide-firmware`
//! (`firmware/src/acpi.rs`, `tables.rs`, `s5.rs`; host-tested). This module
//! supplies the physical memory ([`BootMap`]), keeps the [`Facts`] for the rest
//! of the kernel ([`facts`]: time, power, PCI, the 8259) and logs them.
//!
//! Tables above 4 GiB are outside the boot map and are skipped (recorded as
//! issues): reading them would need `mm::map_mmio`, which needs `mm::init`,
//! which comes later.

use core::fmt;
use dioxide_boot::BootInfo;
use dioxide_firmware::acpi::{self as fw, AcpiError, Facts, PhysMem, RsdpSource};
use dioxide_firmware::s5::SleepType;
pub use dioxide_firmware::tables::EcamRegion;
use dioxide_firmware::tables::{Gas, Space};

/// The end of the boot loader's identity map (`bootloader/src/entry.S`: 0..4
/// GiB in 2 MiB pages).
const BOOT_MAP_END: u64 = 1 << 32;

/// Physical memory through the boot loader's identity map. Only used inside
/// [`early`], which runs before `mm::init` replaces that map.
struct BootMap;

impl PhysMem for BootMap {
    fn bytes(&self, addr: u64, len: usize) -> Option<&[u8]> {
        let end = addr.checked_add(len as u64)?;
        if addr == 0 || end > BOOT_MAP_END {
            return None;
        }
        // SAFETY: [addr, end) is below 4 GiB, which the boot loader's page
        // tables map 1:1 (present, readable) until `mm::init`, and `early`
        // (the only user) runs before `mm::init`; `addr` is not null. What
        // the firmware left there (tables in ACPI/reserved RAM, the BIOS
        // areas) is not written by anyone while the slice lives (inside
        // `read_facts`; the facts are copies). A bogus table pointer into
        // MMIO could make these loads touch a device: the same risk as any
        // ACPI reader, bounded by the header's length check.
        Some(unsafe { core::slice::from_raw_parts(addr as *const u8, len) })
    }
}

static FACTS: spin::Once<Result<Facts, AcpiError>> = spin::Once::new();

/// Reads the ACPI facts (once). `may_scan_bios_areas`: the BIOS areas may be
/// scanned for the RSDP when the boot loader gave none (a BIOS machine, not
/// UEFI). Must run before `mm::init` (see [`BootMap`]).
pub fn early(boot: &BootInfo, may_scan_bios_areas: bool) -> Result<&'static Facts, AcpiError> {
    FACTS
        .call_once(|| {
            fw::read_facts(
                &BootMap,
                boot.rsdp_addr,
                boot.rsdp.as_ref(),
                may_scan_bios_areas,
            )
        })
        .as_ref()
        .map_err(|e| *e)
}

/// The facts [`early`] read, if it found any.
pub fn facts() -> Option<&'static Facts> {
    FACTS.get()?.as_ref().ok()
}

/// A register for the log: `io 0x604`, `mem 0xfed00000`.
struct Reg(Option<Gas>);

impl fmt::Display for Reg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            None => f.write_str("none"),
            Some(g) => match g.space {
                Space::Io => write!(f, "io {:#x}", g.address),
                Space::Memory => write!(f, "mem {:#x}", g.address),
                Space::PciConfig => write!(f, "pci {:#x}", g.address),
                Space::Other(s) => write!(f, "space {s} {:#x}", g.address),
            },
        }
    }
}

struct Ecam(Option<EcamRegion>);

impl fmt::Display for Ecam {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(r) => write!(f, "{:#x} buses {}..={}", r.base, r.bus_start, r.bus_end),
            None => f.write_str("none (legacy PCI config ports)"),
        }
    }
}

/// Logs what [`early`] found: the line about revision, CPUs and ECAM, one
/// line with the new facts (FADT, HPET, SPCR, `_S5_`, the 8259), and the
/// problems met on the way.
pub fn log_summary(r: Result<&Facts, AcpiError>) {
    let f = match r {
        Ok(f) => f,
        Err(e) => {
            log::warn!(target: "acpi", "{e}; continuing without ACPI (legacy PCI config, no HPET or PM timer, power-off by halting)");
            return;
        }
    };
    log::info!(
        target: "acpi",
        "ACPI rev {}: {} CPU(s), ECAM {}",
        f.revision,
        f.cpus(),
        Ecam(f.ecam())
    );
    let src = match f.rsdp {
        RsdpSource::BootAddress(a) => ("boot loader address", a),
        RsdpSource::BootCopy => ("boot loader copy", 0),
        RsdpSource::BiosScan(a) => ("BIOS area scan", a),
    };
    log::debug!(target: "acpi", "RSDP from the {} {:#x}, OEM {:?}, {}, {} tables", src.0, src.1, core::str::from_utf8(&f.oem_id).unwrap_or("?"), f.root, f.tables);
    match &f.fadt {
        Some(d) => log::info!(
            target: "acpi",
            "FADT rev {}: PM timer {} {}-bit, PM1a_CNT {}, PM1b_CNT {}, SMI_CMD {:#x} enable {:#x}, reset {}{}, {}boot arch {:#x}; HPET {}; SPCR {}; _S5_ {}; 8259 {}",
            d.revision,
            Reg(d.pm_timer),
            d.pm_timer_bits(),
            Reg(d.pm1a_cnt),
            Reg(d.pm1b_cnt),
            d.smi_cmd,
            d.acpi_enable,
            Reg(d.reset.map(|r| r.reg)),
            ResetValue(d.reset.map(|r| r.value)),
            if d.hw_reduced() {
                SleepReg(d.sleep_control)
            } else {
                SleepReg(None)
            },
            d.iapc_boot_arch,
            Hpet(f.hpet.map(|h| h.base)),
            Spcr(f),
            S5(f.s5),
            if f.has_8259() { "present" } else { "absent" },
        ),
        None => log::info!(
            target: "acpi",
            "no FADT; HPET {}; SPCR {}; _S5_ {}; 8259 {}",
            Hpet(f.hpet.map(|h| h.base)),
            Spcr(f),
            S5(f.s5),
            if f.has_8259() { "present" } else { "absent" },
        ),
    }
    if let Some(sig) = f.iommu {
        log::warn!(target: "acpi", "{sig} table present: an IOMMU may be active; DMA assumes none");
    }
    for i in f.issues.iter() {
        log::warn!(target: "acpi", "{i}");
    }
    if f.issues.dropped > 0 {
        log::warn!(target: "acpi", "{} more problems not kept", f.issues.dropped);
    }
}

struct ResetValue(Option<u8>);

impl fmt::Display for ResetValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(v) => write!(f, "={v:#04x}"),
            None => Ok(()),
        }
    }
}

struct SleepReg(Option<Gas>);

impl fmt::Display for SleepReg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(g) => write!(f, "hardware-reduced, sleep control {}, ", Reg(Some(g))),
            None => Ok(()),
        }
    }
}

struct Hpet(Option<u64>);

impl fmt::Display for Hpet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(b) => write!(f, "{b:#x}"),
            None => f.write_str("none"),
        }
    }
}

struct Spcr<'a>(&'a Facts);

impl fmt::Display for Spcr<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use dioxide_firmware::tables::UartRegs;
        let Some(s) = self.0.spcr else {
            return f.write_str("none");
        };
        match s.regs {
            UartRegs::Io { port } => write!(f, "type {:#x} io {port:#x}", s.interface_type)?,
            UartRegs::Mmio { base, width } => write!(
                f,
                "type {:#x} mmio {base:#x} ({width}-byte registers)",
                s.interface_type
            )?,
        }
        match s.baud {
            Some(b) => write!(f, " {b} baud"),
            None => f.write_str(" (baud as set)"),
        }
    }
}

struct S5(Result<SleepType, dioxide_firmware::s5::S5Error>);

impl fmt::Display for S5 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Ok(t) => write!(f, "SLP_TYPa={} SLP_TYPb={}", t.a & 7, t.b & 7),
            Err(e) => write!(f, "none ({e})"),
        }
    }
}
