//! Decoders of the ACPI tables dioxide reads, each over the bytes of one table
//! whose length and checksum [`crate::acpi`] already checked. Every field is
//! read with a bounded read: a field past the table's `length` is absent, never
//! read from whatever follows the table (a FADT revision 1 is 116 bytes long
//! and has no reset register; QEMU's FADT revision 3 is 244 bytes long and has
//! no sleep registers).
//!
//! Layouts (little-endian; offsets from the table's start; ACPI 6.5 unless
//! said otherwise):
//!
//! ```text
//! header (36)  +0 signature[4] +4 u32 length +8 u8 revision +9 u8 checksum
//!              +10 oem_id[6] +16 oem_table_id[8] +24 u32 oem_revision
//!              +28 creator_id[4] +32 u32 creator_revision
//! GAS (12)     +0 u8 space (0 memory, 1 I/O, 2 PCI config) +1 u8 bit_width
//!              +2 u8 bit_offset +3 u8 access_size (0 legacy, 1 byte .. 4 qword)
//!              +4 u64 address
//! FADT §5.2.9  +36 u32 FIRMWARE_CTRL +40 u32 DSDT +46 u16 SCI_INT
//!              +48 u32 SMI_CMD +52 u8 ACPI_ENABLE +64 u32 PM1a_CNT_BLK
//!              +68 u32 PM1b_CNT_BLK +76 u32 PM_TMR_BLK +89 u8 PM1_CNT_LEN
//!              +91 u8 PM_TMR_LEN (4 when there is a PM timer)
//!              +109 u16 IAPC_BOOT_ARCH (bit0 LEGACY_DEVICES, bit1 8042,
//!                   bit5 CMOS RTC not present) +112 u32 flags (bit8
//!                   TMR_VAL_EXT, bit10 RESET_REG_SUP, bit20 HW_REDUCED_ACPI)
//!              -- 116 bytes: the end of revision 1 --
//!              +116 GAS RESET_REG +128 u8 RESET_VALUE +140 u64 X_DSDT
//!              +172 GAS X_PM1a_CNT_BLK +184 GAS X_PM1b_CNT_BLK
//!              +208 GAS X_PM_TMR_BLK
//!              -- 244 bytes: the end of revisions 3 and 4 (QEMU 7.2, 10.0) --
//!              +244 GAS SLEEP_CONTROL_REG +256 GAS SLEEP_STATUS_REG
//! MADT §5.2.12 +36 u32 local APIC address +40 u32 flags (bit0 PCAT_COMPAT:
//!              the machine also has 8259 PICs); entries from +44
//!              {u8 type, u8 length, ...}: type 0 processor local APIC
//!              {u8 uid, u8 apic id, u32 flags}, type 5 local APIC address
//!              override {u16 reserved, u64 address}, type 9 local x2APIC
//!              {u16 reserved, u32 x2apic id, u32 flags, u32 uid}; flags bit0
//!              enabled, bit1 online capable
//! MCFG         +36 8 reserved, then 16-byte entries {u64 base, u16 segment,
//!              u8 start bus, u8 end bus, u32 reserved} (PCI Firmware 3.2 §4.1.2)
//! HPET         +36 u32 event timer block id (IA-PC HPET 1.0a §3.2.4: bits 7:0
//!              hardware revision, 12:8 comparators - 1, bit13 64-bit
//!              counter, bit15 legacy replacement capable, 31:16 PCI vendor)
//!              +40 GAS base address (memory) +52 u8 HPET number
//!              +53 u16 minimum clock tick +55 u8 page protection; 56 bytes
//! SPCR (80; Microsoft "Serial Port Console Redirection Table", rev 2 .. 4)
//!              +36 u8 interface type (0 16550, 1 16450, 0x12 16550 with the
//!              GAS describing the registers) +40 GAS base address
//!              +52 u8 interrupt type (bit0 8259 IRQ, bit1 I/O APIC GSI)
//!              +53 u8 IRQ +54 u32 GSI +58 u8 baud (0 as the firmware left
//!              it, 3 9600, 4 19200, 6 57600, 7 115200) +59 parity
//!              +60 stop bits +61 flow control +62 terminal type
//!              +64 u16 PCI device id (0xffff: not PCI)
//!              +76 u32 UART clock in Hz (revision >= 3; 0 unknown)
//!              +80 u32 precise baud rate (revision >= 4; 0: use +58)
//! ```

use crate::bytes::{array, u16_at, u32_at, u64_at, u8_at};
use core::fmt;

/// Length of the common table header.
pub const HEADER_LEN: usize = 36;

/// Why a table (or the RSDP) was not used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TableError {
    /// Its bytes are not readable (e.g. above 4 GiB, outside the boot map).
    Unreadable { addr: u64 },
    /// The header's length is below 36 or above [`crate::acpi::MAX_TABLE_LEN`].
    Length(u32),
    /// The bytes do not sum to 0.
    Checksum,
    /// Another signature than the one its pointer promised.
    Signature([u8; 4]),
    /// Shorter than this table type's minimum.
    TooShort { len: usize, need: usize },
    /// Well-formed but unusable, with the reason.
    Invalid(&'static str),
}

impl fmt::Display for TableError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TableError::Unreadable { addr } => write!(f, "not readable at {addr:#x}"),
            TableError::Length(l) => write!(f, "implausible length {l}"),
            TableError::Checksum => write!(f, "bad checksum"),
            TableError::Signature(s) => write!(f, "unexpected signature {}", Sig(*s)),
            TableError::TooShort { len, need } => {
                write!(f, "{len} bytes long, needs at least {need}")
            }
            TableError::Invalid(why) => f.write_str(why),
        }
    }
}

/// A table signature, printed as text (`?` for bytes that are not printable).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Sig(pub [u8; 4]);

impl fmt::Display for Sig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            let c = if b.is_ascii_graphic() { b as char } else { '?' };
            write!(f, "{c}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Sig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "\"{self}\"")
    }
}

fn need(t: &[u8], n: usize) -> Result<(), TableError> {
    if t.len() < n {
        Err(TableError::TooShort {
            len: t.len(),
            need: n,
        })
    } else {
        Ok(())
    }
}

/// The address space of a [`Gas`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Space {
    Memory,
    Io,
    PciConfig,
    Other(u8),
}

/// A Generic Address Structure: where a register is and how wide.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Gas {
    pub space: Space,
    pub bit_width: u8,
    pub bit_offset: u8,
    /// 0 legacy (use `bit_width`), 1 byte, 2 word, 3 dword, 4 qword.
    pub access_size: u8,
    pub address: u64,
}

impl Gas {
    pub const LEN: usize = 12;

    /// The GAS at `off`, if the table holds all of it.
    pub fn at(t: &[u8], off: usize) -> Option<Gas> {
        let raw: [u8; 12] = array(t, off)?;
        Some(Gas::from_bytes(&raw))
    }

    pub fn from_bytes(b: &[u8; 12]) -> Gas {
        Gas {
            space: match b[0] {
                0 => Space::Memory,
                1 => Space::Io,
                2 => Space::PciConfig,
                s => Space::Other(s),
            },
            bit_width: b[1],
            bit_offset: b[2],
            access_size: b[3],
            address: u64::from_le_bytes([b[4], b[5], b[6], b[7], b[8], b[9], b[10], b[11]]),
        }
    }

    /// An I/O port register `bits` wide (what a FADT 1.0 block means).
    pub fn io(port: u32, bits: u8) -> Gas {
        Gas {
            space: Space::Io,
            bit_width: bits,
            bit_offset: 0,
            access_size: 0,
            address: port as u64,
        }
    }

    /// The access width in bytes (1, 2, 4 or 8): from `access_size`, or for
    /// the legacy 0 from `bit_width` (rounded up; 1 when that is 0 too).
    pub fn access_bytes(&self) -> u8 {
        match self.access_size {
            1 => 1,
            2 => 2,
            3 => 4,
            4 => 8,
            _ => match self.bit_width {
                0..=8 => 1,
                9..=16 => 2,
                17..=32 => 4,
                _ => 8,
            },
        }
    }
}

/// The fixed hardware the FADT describes, as far as dioxide uses it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fadt {
    pub revision: u8,
    pub length: u32,
    /// The DSDT's physical address (X_DSDT when present and not 0).
    pub dsdt: u64,
    pub sci_int: u16,
    /// The SMI command port (0: no SMM, ACPI is always enabled).
    pub smi_cmd: u32,
    /// The value written to `smi_cmd` to hand the ACPI registers to the OS.
    pub acpi_enable: u8,
    /// PM1a control block (X_PM1a_CNT_BLK when present, else PM1a_CNT_BLK as
    /// I/O); none on a hardware-reduced machine.
    pub pm1a_cnt: Option<Gas>,
    pub pm1b_cnt: Option<Gas>,
    /// The ACPI PM timer (X_PM_TMR_BLK, else PM_TMR_BLK when PM_TMR_LEN is
    /// 4); its width is in the flags ([`Fadt::pm_timer_32bit`]), not here.
    pub pm_timer: Option<Gas>,
    /// IA-PC boot architecture flags (0 in a revision-1 FADT, where the
    /// field is reserved).
    pub iapc_boot_arch: u16,
    pub flags: u32,
    /// The reset register and value, when RESET_REG_SUP is set and the
    /// table holds them.
    pub reset: Option<ResetRegister>,
    /// Hardware-reduced sleep control and status registers.
    pub sleep_control: Option<Gas>,
    pub sleep_status: Option<Gas>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResetRegister {
    pub reg: Gas,
    pub value: u8,
}

impl Fadt {
    pub const FLAG_TMR_VAL_EXT: u32 = 1 << 8;
    pub const FLAG_RESET_REG_SUP: u32 = 1 << 10;
    pub const FLAG_HW_REDUCED_ACPI: u32 = 1 << 20;
    pub const BOOT_ARCH_LEGACY_DEVICES: u16 = 1 << 0;
    pub const BOOT_ARCH_8042: u16 = 1 << 1;
    pub const BOOT_ARCH_NO_CMOS_RTC: u16 = 1 << 5;
    /// A FADT revision 1 ends after the flags.
    pub const MIN_LEN: usize = 116;

    /// The PM timer counts 32 bits (TMR_VAL_EXT), else 24.
    pub fn pm_timer_32bit(&self) -> bool {
        self.flags & Self::FLAG_TMR_VAL_EXT != 0
    }

    pub fn pm_timer_bits(&self) -> u32 {
        if self.pm_timer_32bit() {
            32
        } else {
            24
        }
    }

    pub fn hw_reduced(&self) -> bool {
        self.flags & Self::FLAG_HW_REDUCED_ACPI != 0
    }

    pub fn reset_reg_sup(&self) -> bool {
        self.flags & Self::FLAG_RESET_REG_SUP != 0
    }
}

/// The register a FADT names twice: the 64-bit X_ GAS when the table holds
/// it and its address is not 0, else the 32-bit I/O block when not 0.
fn fadt_reg(t: &[u8], x_off: usize, legacy_off: usize, bits: u8) -> Option<Gas> {
    if let Some(g) = Gas::at(t, x_off).filter(|g| g.address != 0) {
        return Some(g);
    }
    u32_at(t, legacy_off)
        .filter(|&p| p != 0)
        .map(|p| Gas::io(p, bits))
}

/// Decodes a FADT (`"FACP"`), at least 116 bytes (revision 1).
pub fn parse_fadt(t: &[u8]) -> Result<Fadt, TableError> {
    need(t, Fadt::MIN_LEN)?;
    let rd32 = |off| u32_at(t, off).unwrap_or(0);
    let rd8 = |off| u8_at(t, off).unwrap_or(0);
    let revision = rd8(8);
    let flags = rd32(112);
    let hw_reduced = flags & Fadt::FLAG_HW_REDUCED_ACPI != 0;
    let dsdt = u64_at(t, 140)
        .filter(|&a| a != 0)
        .unwrap_or(rd32(40) as u64);
    if dsdt == 0 {
        return Err(TableError::Invalid("FADT names no DSDT"));
    }
    let cnt_bits = rd8(89).saturating_mul(8);
    // Hardware-reduced machines have no fixed PM1/PM timer hardware; the
    // fields are to be ignored (ACPI 6.5 §4.1).
    let (pm1a_cnt, pm1b_cnt, pm_timer) = if hw_reduced {
        (None, None, None)
    } else {
        let tmr = if Gas::at(t, 208).is_some_and(|g| g.address != 0) || rd8(91) == 4 {
            fadt_reg(t, 208, 76, 32)
        } else {
            None
        };
        (
            fadt_reg(t, 172, 64, cnt_bits),
            fadt_reg(t, 184, 68, cnt_bits),
            tmr,
        )
    };
    let reset = match (Gas::at(t, 116), u8_at(t, 128)) {
        (Some(reg), Some(value)) if flags & Fadt::FLAG_RESET_REG_SUP != 0 && reg.address != 0 => {
            Some(ResetRegister { reg, value })
        }
        _ => None,
    };
    let nonzero = |g: Gas| g.address != 0;
    Ok(Fadt {
        revision,
        length: t.len() as u32,
        dsdt,
        sci_int: u16_at(t, 46).unwrap_or(0),
        smi_cmd: rd32(48),
        acpi_enable: rd8(52),
        pm1a_cnt,
        pm1b_cnt,
        pm_timer,
        iapc_boot_arch: if revision >= 2 {
            u16_at(t, 109).unwrap_or(0)
        } else {
            0
        },
        flags,
        reset,
        sleep_control: Gas::at(t, 244).filter(|g| nonzero(*g)),
        sleep_status: Gas::at(t, 256).filter(|g| nonzero(*g)),
    })
}

/// The HPET table: where the event timer block is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hpet {
    /// The event timer block id (a copy of the low half of GCAP_ID).
    pub block_id: u32,
    /// Physical address of the register block (memory space).
    pub base: u64,
    pub number: u8,
    pub min_tick: u16,
}

impl Hpet {
    pub const LEN: usize = 56;

    pub fn comparators(&self) -> u32 {
        ((self.block_id >> 8) & 0x1f) + 1
    }

    pub fn counter_64bit(&self) -> bool {
        self.block_id & (1 << 13) != 0
    }

    pub fn vendor(&self) -> u16 {
        (self.block_id >> 16) as u16
    }
}

/// Decodes an HPET table; its base must be in memory space and not 0.
pub fn parse_hpet(t: &[u8]) -> Result<Hpet, TableError> {
    need(t, Hpet::LEN)?;
    let base = Gas::at(t, 40).ok_or(TableError::TooShort {
        len: t.len(),
        need: Hpet::LEN,
    })?;
    if base.space != Space::Memory {
        return Err(TableError::Invalid("HPET base is not in memory space"));
    }
    if base.address == 0 {
        return Err(TableError::Invalid("HPET base address is 0"));
    }
    Ok(Hpet {
        block_id: u32_at(t, 36).unwrap_or(0),
        base: base.address,
        number: u8_at(t, 52).unwrap_or(0),
        min_tick: u16_at(t, 53).unwrap_or(0),
    })
}

/// How the SPCR console UART's registers are reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UartRegs {
    /// 16550 registers at consecutive I/O ports from `port`.
    Io { port: u16 },
    /// Memory-mapped 16550 registers at `base`, each `width` bytes wide and
    /// `width` bytes apart (the GAS access size; 1 when it is 0).
    Mmio { base: u64, width: u8 },
}

/// The console the SPCR names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Spcr {
    pub revision: u8,
    /// 0 full 16550, 1 16450, 0x12 16550-compatible with GAS-described
    /// registers; others are not 16550s (ARM PL011, ...).
    pub interface_type: u8,
    pub regs: UartRegs,
    /// The baud rate; `None`: keep what the firmware set.
    pub baud: Option<u32>,
    /// bit0: `irq` is an 8259 IRQ; bit1: `gsi` is an I/O APIC GSI.
    pub interrupt_type: u8,
    pub irq: u8,
    pub gsi: u32,
    /// The UART's input clock (revision >= 3), for the divisor.
    pub clock_hz: Option<u32>,
    /// 0xffff when the UART is not a PCI device.
    pub pci_device_id: u16,
}

impl Spcr {
    pub const MIN_LEN: usize = 80;

    /// A 16550 (or compatible) that dioxide's UART driver can drive.
    pub fn is_16550(&self) -> bool {
        matches!(self.interface_type, 0 | 1 | 0x12)
    }
}

/// The SPCR baud-rate code as a rate; `None` for 0 ("as is") and for codes
/// the table does not define.
pub fn spcr_baud(code: u8) -> Option<u32> {
    match code {
        3 => Some(9600),
        4 => Some(19200),
        6 => Some(57600),
        7 => Some(115200),
        _ => None,
    }
}

/// Decodes an SPCR (at least 80 bytes, revision 2).
pub fn parse_spcr(t: &[u8]) -> Result<Spcr, TableError> {
    need(t, Spcr::MIN_LEN)?;
    let revision = u8_at(t, 8).unwrap_or(0);
    let gas = Gas::at(t, 40).ok_or(TableError::TooShort {
        len: t.len(),
        need: Spcr::MIN_LEN,
    })?;
    if gas.address == 0 {
        return Err(TableError::Invalid(
            "SPCR base address is 0 (console redirection disabled)",
        ));
    }
    let regs = match gas.space {
        Space::Io => UartRegs::Io {
            port: u16::try_from(gas.address)
                .map_err(|_| TableError::Invalid("SPCR I/O port above 0xffff"))?,
        },
        Space::Memory => UartRegs::Mmio {
            base: gas.address,
            width: match gas.access_size {
                0 => 1,
                _ => gas.access_bytes(),
            },
        },
        _ => {
            return Err(TableError::Invalid(
                "SPCR registers neither in memory nor in I/O space",
            ))
        }
    };
    let precise = if revision >= 4 {
        u32_at(t, 80).filter(|&b| b != 0)
    } else {
        None
    };
    Ok(Spcr {
        revision,
        interface_type: u8_at(t, 36).unwrap_or(0),
        regs,
        baud: precise.or_else(|| spcr_baud(u8_at(t, 58).unwrap_or(0))),
        interrupt_type: u8_at(t, 52).unwrap_or(0),
        irq: u8_at(t, 53).unwrap_or(0),
        gsi: u32_at(t, 54).unwrap_or(0),
        clock_hz: if revision >= 3 {
            u32_at(t, 76).filter(|&c| c != 0)
        } else {
            None
        },
        pci_device_id: u16_at(t, 64).unwrap_or(0xffff),
    })
}

/// At most this many CPUs are kept from the MADT.
pub const MAX_CPUS: usize = 64;

/// The MADT facts: local APICs and whether there are 8259s.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Madt {
    /// The local APIC's physical address (the type-5 override when present).
    pub lapic_addr: u64,
    pub flags: u32,
    /// APIC ids (xAPIC or x2APIC) of the enabled or online-capable CPUs.
    apic_ids: [u32; MAX_CPUS],
    /// Bit i: `apic_ids[i]` is enabled (flags bit 0), i.e. present and
    /// usable now; clear for a CPU that is only online capable (one the
    /// firmware may hot-add later, which must not be started).
    enabled: u64,
    cpus: usize,
    /// CPUs beyond [`MAX_CPUS`], not kept.
    pub cpus_dropped: usize,
    /// The offset of an entry that overran the table (the walk stopped there).
    pub overrun_at: Option<usize>,
}

impl Madt {
    pub const FLAG_PCAT_COMPAT: u32 = 1;

    /// The machine also has dual 8259 PICs (which then must be masked).
    pub fn pcat_compat(&self) -> bool {
        self.flags & Self::FLAG_PCAT_COMPAT != 0
    }

    pub fn apic_ids(&self) -> &[u32] {
        &self.apic_ids[..self.cpus]
    }

    /// The APIC ids of the enabled CPUs (the ones to start), in table
    /// order: [`Madt::apic_ids`] without the merely online-capable ones.
    pub fn enabled_apic_ids(&self) -> impl Iterator<Item = u32> + '_ {
        self.apic_ids()
            .iter()
            .enumerate()
            .filter(|(i, _)| self.enabled & (1 << i) != 0)
            .map(|(_, &id)| id)
    }
}

// One bit per kept CPU in `Madt::enabled`.
const _: () = assert!(MAX_CPUS <= 64);

/// Decodes a MADT (`"APIC"`).
pub fn parse_madt(t: &[u8]) -> Result<Madt, TableError> {
    need(t, 44)?;
    let mut m = Madt {
        lapic_addr: u32_at(t, 36).unwrap_or(0) as u64,
        flags: u32_at(t, 40).unwrap_or(0),
        apic_ids: [0; MAX_CPUS],
        enabled: 0,
        cpus: 0,
        cpus_dropped: 0,
        overrun_at: None,
    };
    let mut e = 44;
    while e + 2 <= t.len() {
        let ty = t[e];
        let l = t[e + 1] as usize;
        if l < 2 || e + l > t.len() {
            m.overrun_at = Some(e);
            break;
        }
        let entry = &t[e..e + l];
        let id_flags = match ty {
            0 if l >= 8 => u8_at(entry, 3)
                .zip(u32_at(entry, 4))
                .map(|(i, f)| (i as u32, f)),
            9 if l >= 16 => u32_at(entry, 4).zip(u32_at(entry, 8)),
            _ => None,
        };
        if ty == 5 && l >= 12 {
            if let Some(a) = u64_at(entry, 4) {
                m.lapic_addr = a;
            }
        }
        if let Some((id, flags)) = id_flags {
            // Enabled, or online capable.
            if flags & 3 != 0 {
                if m.cpus < MAX_CPUS {
                    m.apic_ids[m.cpus] = id;
                    if flags & 1 != 0 {
                        m.enabled |= 1 << m.cpus;
                    }
                    m.cpus += 1;
                } else {
                    m.cpus_dropped += 1;
                }
            }
        }
        e += l;
    }
    Ok(m)
}

/// A PCIe ECAM region from the MCFG.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EcamRegion {
    pub base: u64,
    pub segment: u16,
    pub bus_start: u8,
    pub bus_end: u8,
}

/// The MCFG: the first region of segment 0 (the one dioxide uses) and how
/// many regions there are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mcfg {
    pub ecam: Option<EcamRegion>,
    pub entries: usize,
}

pub fn parse_mcfg(t: &[u8]) -> Result<Mcfg, TableError> {
    need(t, 44)?;
    let mut m = Mcfg {
        ecam: None,
        entries: 0,
    };
    for e in t[44..].chunks_exact(16) {
        m.entries += 1;
        let r = EcamRegion {
            base: u64_at(e, 0).unwrap_or(0),
            segment: u16_at(e, 8).unwrap_or(0),
            bus_start: e[10],
            bus_end: e[11],
        };
        if r.segment == 0 && r.bus_end >= r.bus_start && m.ecam.is_none() {
            m.ecam = Some(r);
        }
    }
    Ok(m)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    const Q35_FADT: &[u8] = include_bytes!("../testdata/qemu-7.2-q35/FACP.bin");
    const PC_FADT: &[u8] = include_bytes!("../testdata/qemu-7.2-pc/FACP.bin");
    const Q35_HPET: &[u8] = include_bytes!("../testdata/qemu-7.2-q35/HPET.bin");
    const Q35_MADT: &[u8] = include_bytes!("../testdata/qemu-7.2-q35/APIC.bin");
    const Q35_MCFG: &[u8] = include_bytes!("../testdata/qemu-7.2-q35/MCFG.bin");

    /// The same tables from QEMU 7.2 and QEMU 10.0 (`testdata/README.md`).
    /// The FADT, HPET and MCFG are byte for byte the same; the MADT's
    /// revision went from 1 to 3 with the same entries (`hw/i386/acpi-common.c`:
    /// `.rev = 1` in 7.2, `.rev = 3` in 10.0).
    const Q35_FADTS: [(&str, &[u8]); 2] = [
        ("7.2", Q35_FADT),
        ("10.0", include_bytes!("../testdata/qemu-10.0-q35/FACP.bin")),
    ];
    const PC_FADTS: [(&str, &[u8]); 2] = [
        ("7.2", PC_FADT),
        ("10.0", include_bytes!("../testdata/qemu-10.0-pc/FACP.bin")),
    ];
    const HPETS: [(&str, &[u8]); 4] = [
        ("7.2 q35", Q35_HPET),
        ("7.2 pc", include_bytes!("../testdata/qemu-7.2-pc/HPET.bin")),
        (
            "10.0 q35",
            include_bytes!("../testdata/qemu-10.0-q35/HPET.bin"),
        ),
        (
            "10.0 pc",
            include_bytes!("../testdata/qemu-10.0-pc/HPET.bin"),
        ),
    ];
    /// With each one's revision.
    const MADTS: [(&str, &[u8], u8); 4] = [
        ("7.2 q35", Q35_MADT, 1),
        (
            "7.2 pc",
            include_bytes!("../testdata/qemu-7.2-pc/APIC.bin"),
            1,
        ),
        (
            "10.0 q35",
            include_bytes!("../testdata/qemu-10.0-q35/APIC.bin"),
            3,
        ),
        (
            "10.0 pc",
            include_bytes!("../testdata/qemu-10.0-pc/APIC.bin"),
            3,
        ),
    ];
    const MCFGS: [(&str, &[u8]); 2] = [
        ("7.2", Q35_MCFG),
        ("10.0", include_bytes!("../testdata/qemu-10.0-q35/MCFG.bin")),
    ];

    /// A table with a header and `body`, length and checksum filled in.
    pub(crate) fn table(sig: &[u8; 4], revision: u8, body: &[u8]) -> std::vec::Vec<u8> {
        let mut t = std::vec::Vec::new();
        t.extend_from_slice(sig);
        t.extend_from_slice(&((HEADER_LEN + body.len()) as u32).to_le_bytes());
        t.push(revision);
        t.push(0);
        t.extend_from_slice(b"DIOXID");
        t.extend_from_slice(b"TESTTABL");
        t.extend_from_slice(&1u32.to_le_bytes());
        t.extend_from_slice(b"DXFW");
        t.extend_from_slice(&1u32.to_le_bytes());
        t.extend_from_slice(body);
        let s = crate::bytes::sum(&t);
        t[9] = 0u8.wrapping_sub(s);
        t
    }

    fn gas(space: u8, width: u8, access: u8, addr: u64) -> [u8; 12] {
        let mut g = [0u8; 12];
        g[0] = space;
        g[1] = width;
        g[3] = access;
        g[4..].copy_from_slice(&addr.to_le_bytes());
        g
    }

    #[test]
    fn qemu_q35_fadt_revision_3() {
        for (v, t) in Q35_FADTS {
            let f = parse_fadt(t).unwrap();
            assert_eq!((f.revision, f.length), (3, 244), "{v}");
            assert_eq!(f.dsdt, 0x07fe_0040, "{v}");
            assert_eq!(
                (f.sci_int, f.smi_cmd, f.acpi_enable),
                (9, 0xb2, 0x02),
                "{v}"
            );
            // From the X_ fields (I/O, 16 and 32 bits wide).
            assert_eq!(f.pm1a_cnt, Some(Gas::io(0x604, 16)), "{v}");
            assert_eq!(f.pm1b_cnt, None, "{v}");
            assert_eq!(f.pm_timer, Some(Gas::io(0x608, 32)), "{v}");
            assert_eq!(f.flags, 0x84a5, "{v}");
            // The X_PM_TMR_BLK says 32 bits wide; the counter is 24 (TMR_VAL_EXT clear).
            assert!(!f.pm_timer_32bit(), "{v}");
            assert_eq!(f.pm_timer_bits(), 24, "{v}");
            assert!(!f.hw_reduced(), "{v}");
            assert_eq!(
                f.reset,
                Some(ResetRegister {
                    reg: Gas::io(0xcf9, 8),
                    value: 0x0f
                }),
                "{v}"
            );
            assert_eq!(f.iapc_boot_arch, Fadt::BOOT_ARCH_8042, "{v}");
            // 244 bytes: no sleep registers (not read past the table).
            assert_eq!((f.sleep_control, f.sleep_status), (None, None), "{v}");
        }
    }

    #[test]
    fn qemu_pc_fadt_revision_1_has_no_reset_register() {
        for (v, t) in PC_FADTS {
            let f = parse_fadt(t).unwrap();
            assert_eq!((f.revision, f.length), (1, 116), "{v}");
            assert_eq!(f.dsdt, 0x07fe_0040, "{v}");
            assert_eq!((f.smi_cmd, f.acpi_enable), (0xb2, 0xf1), "{v}");
            // From the 32-bit blocks: PM1_CNT_LEN 2, PM_TMR_LEN 4.
            assert_eq!(f.pm1a_cnt, Some(Gas::io(0x604, 16)), "{v}");
            assert_eq!(f.pm_timer, Some(Gas::io(0x608, 32)), "{v}");
            assert_eq!(f.flags, 0x80a5, "{v}");
            assert_eq!(f.reset, None, "{v}");
            assert_eq!(f.iapc_boot_arch, 0, "{v}");
        }
    }

    /// A revision-6 FADT (276 bytes) of a hardware-reduced machine with a
    /// 32-bit PM timer flag, an MMIO reset register and sleep registers.
    fn fadt_rev6(flags: u32) -> std::vec::Vec<u8> {
        let mut b = [0u8; 276 - HEADER_LEN];
        let at = |off: usize| off - HEADER_LEN;
        b[at(40)..at(44)].copy_from_slice(&0x1000u32.to_le_bytes());
        b[at(48)..at(52)].copy_from_slice(&0xb2u32.to_le_bytes());
        b[at(64)..at(68)].copy_from_slice(&0x404u32.to_le_bytes());
        b[at(76)..at(80)].copy_from_slice(&0x408u32.to_le_bytes());
        b[at(89)] = 2;
        b[at(91)] = 4;
        b[at(109)..at(111)].copy_from_slice(&0x21u16.to_le_bytes());
        b[at(112)..at(116)].copy_from_slice(&flags.to_le_bytes());
        b[at(116)..at(128)].copy_from_slice(&gas(0, 8, 1, 0xfed0_3000));
        b[at(128)] = 0x06;
        b[at(140)..at(148)].copy_from_slice(&0x7000_0000u64.to_le_bytes());
        b[at(172)..at(184)].copy_from_slice(&gas(1, 16, 2, 0x1804));
        b[at(208)..at(220)].copy_from_slice(&gas(1, 32, 3, 0x1808));
        b[at(244)..at(256)].copy_from_slice(&gas(0, 8, 1, 0xfe00_0010));
        b[at(256)..at(268)].copy_from_slice(&gas(0, 8, 1, 0xfe00_0014));
        table(b"FACP", 6, &b)
    }

    #[test]
    fn x_fields_win_over_the_32_bit_blocks() {
        let f = parse_fadt(&fadt_rev6(
            Fadt::FLAG_TMR_VAL_EXT | Fadt::FLAG_RESET_REG_SUP,
        ))
        .unwrap();
        assert_eq!(f.dsdt, 0x7000_0000);
        assert_eq!(f.pm1a_cnt.map(|g| g.address), Some(0x1804));
        assert_eq!(f.pm_timer.map(|g| g.address), Some(0x1808));
        assert!(f.pm_timer_32bit());
        assert_eq!(
            f.reset.map(|r| (r.reg.space, r.reg.address, r.value)),
            Some((Space::Memory, 0xfed0_3000, 6))
        );
        assert_eq!(f.sleep_control.map(|g| g.address), Some(0xfe00_0010));
        assert_eq!(f.sleep_status.map(|g| g.address), Some(0xfe00_0014));
        assert_eq!(f.iapc_boot_arch, 0x21);
    }

    #[test]
    fn hardware_reduced_fadt_has_no_pm1_or_pm_timer() {
        let f = parse_fadt(&fadt_rev6(Fadt::FLAG_HW_REDUCED_ACPI)).unwrap();
        assert!(f.hw_reduced());
        assert_eq!((f.pm1a_cnt, f.pm_timer), (None, None));
        // RESET_REG_SUP clear: no reset register even though the bytes are there.
        assert_eq!(f.reset, None);
        assert!(f.sleep_control.is_some());
    }

    #[test]
    fn fadt_shorter_than_revision_1_is_refused() {
        assert_eq!(
            parse_fadt(&PC_FADT[..115]),
            Err(TableError::TooShort {
                len: 115,
                need: 116
            })
        );
        let mut no_dsdt = PC_FADT.to_vec();
        no_dsdt[40..44].fill(0);
        assert_eq!(
            parse_fadt(&no_dsdt),
            Err(TableError::Invalid("FADT names no DSDT"))
        );
    }

    #[test]
    fn pm_timer_absent_when_pm_tmr_len_is_not_4() {
        let mut t = PC_FADT.to_vec();
        t[91] = 0;
        assert_eq!(parse_fadt(&t).unwrap().pm_timer, None);
    }

    #[test]
    fn qemu_hpet_table() {
        for (v, t) in HPETS {
            let h = parse_hpet(t).unwrap();
            assert_eq!(h.block_id, 0x8086_a201, "{v}");
            assert_eq!(h.base, 0xfed0_0000, "{v}");
            assert_eq!(h.comparators(), 3, "{v}");
            assert!(h.counter_64bit(), "{v}");
            assert_eq!(h.vendor(), 0x8086, "{v}");
            assert_eq!((h.number, h.min_tick), (0, 0), "{v}");
        }
        assert!(matches!(
            parse_hpet(&Q35_HPET[..55]),
            Err(TableError::TooShort { .. })
        ));
        let mut io = Q35_HPET.to_vec();
        io[40] = 1;
        assert!(matches!(parse_hpet(&io), Err(TableError::Invalid(_))));
    }

    /// An SPCR: interface type 0, the given GAS, IRQ 3, baud code `baud`.
    pub(crate) fn spcr(revision: u8, g: [u8; 12], baud: u8, tail: &[u8]) -> std::vec::Vec<u8> {
        let mut b = std::vec::Vec::from([0u8; 80 - HEADER_LEN]);
        let at = |off: usize| off - HEADER_LEN;
        b[at(40)..at(52)].copy_from_slice(&g);
        b[at(52)] = 1;
        b[at(53)] = 3;
        b[at(58)] = baud;
        b[at(60)] = 1;
        b[at(64)..at(66)].copy_from_slice(&0xffffu16.to_le_bytes());
        b[at(76)..at(80)].copy_from_slice(&1_843_200u32.to_le_bytes());
        b.extend_from_slice(tail);
        table(b"SPCR", revision, &b)
    }

    #[test]
    fn spcr_com2_io_115200() {
        let s = parse_spcr(&spcr(2, gas(1, 8, 1, 0x2f8), 7, &[])).unwrap();
        assert_eq!(s.regs, UartRegs::Io { port: 0x2f8 });
        assert_eq!(s.baud, Some(115200));
        assert_eq!((s.interrupt_type, s.irq, s.pci_device_id), (1, 3, 0xffff));
        assert!(s.is_16550());
        // Revision 2: +76 is reserved, not a clock.
        assert_eq!(s.clock_hz, None);
    }

    #[test]
    fn spcr_mmio_with_32_bit_registers_clock_and_precise_baud() {
        let t = spcr(
            4,
            gas(0, 32, 3, 0xfe03_2000),
            0,
            &1_500_000u32.to_le_bytes(),
        );
        let mut t = t;
        t[36] = 0x12;
        let s = crate::bytes::sum(&t);
        t[9] = t[9].wrapping_sub(s);
        let s = parse_spcr(&t).unwrap();
        assert_eq!(
            s.regs,
            UartRegs::Mmio {
                base: 0xfe03_2000,
                width: 4
            }
        );
        assert_eq!(s.baud, Some(1_500_000));
        assert_eq!(s.clock_hz, Some(1_843_200));
        assert!(s.is_16550());
    }

    #[test]
    fn spcr_baud_0_keeps_the_firmware_setting_and_bad_tables_are_refused() {
        let s = parse_spcr(&spcr(2, gas(1, 8, 1, 0x3f8), 0, &[])).unwrap();
        assert_eq!(s.baud, None);
        assert!(matches!(
            parse_spcr(&spcr(2, gas(1, 8, 1, 0), 7, &[])),
            Err(TableError::Invalid(_))
        ));
        assert!(matches!(
            parse_spcr(&spcr(2, gas(1, 8, 1, 0x1_0000), 7, &[])),
            Err(TableError::Invalid("SPCR I/O port above 0xffff"))
        ));
        assert!(matches!(
            parse_spcr(&spcr(2, gas(2, 8, 1, 0x3f8), 7, &[])),
            Err(TableError::Invalid(_))
        ));
        let t = spcr(2, gas(1, 8, 1, 0x3f8), 7, &[]);
        assert!(matches!(
            parse_spcr(&t[..79]),
            Err(TableError::TooShort { len: 79, need: 80 })
        ));
        assert_eq!((spcr_baud(5), spcr_baud(0)), (None, None));
    }

    #[test]
    fn qemu_madt_one_cpu_with_8259s() {
        for (v, t, revision) in MADTS {
            // Revision 1 (ACPI 1.0) on 7.2, 3 (ACPI 2.0) on 10.0: the same
            // entries (local APIC 0, I/O APIC, 5 overrides, LINT1 NMI).
            assert_eq!(t[8], revision, "{v}");
            let m = parse_madt(t).unwrap();
            assert_eq!(m.apic_ids(), &[0], "{v}");
            let enabled: std::vec::Vec<_> = m.enabled_apic_ids().collect();
            assert_eq!(enabled, [0], "{v}");
            assert_eq!(m.lapic_addr, 0xfee0_0000, "{v}");
            assert!(m.pcat_compat(), "{v}");
            assert_eq!((m.cpus_dropped, m.overrun_at), (0, None), "{v}");
        }
        assert_eq!(MADTS[0].1[36..], MADTS[2].1[36..]);
    }

    #[test]
    fn madt_x2apic_override_and_no_pcat() {
        let mut b = std::vec::Vec::new();
        b.extend_from_slice(&0xfee0_0000u32.to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes()); // no 8259
        b.extend_from_slice(&[0, 8, 0, 1, 1, 0, 0, 0]); // lapic id 1, enabled
        b.extend_from_slice(&[0, 8, 1, 2, 0, 0, 0, 0]); // lapic id 2, disabled
        b.extend_from_slice(&[9, 16, 0, 0]); // x2apic
        b.extend_from_slice(&300u32.to_le_bytes());
        b.extend_from_slice(&2u32.to_le_bytes()); // online capable
        b.extend_from_slice(&7u32.to_le_bytes());
        b.extend_from_slice(&[5, 12, 0, 0]);
        b.extend_from_slice(&0xfee1_0000u64.to_le_bytes());
        b.extend_from_slice(&[0, 9]); // overruns the table
        let m = parse_madt(&table(b"APIC", 5, &b)).unwrap();
        assert_eq!(m.apic_ids(), &[1, 300]);
        // 300 is online capable only: listed, not to be started.
        assert_eq!(m.enabled_apic_ids().collect::<std::vec::Vec<_>>(), [1]);
        assert!(!m.pcat_compat());
        assert_eq!(m.lapic_addr, 0xfee1_0000);
        assert_eq!(m.overrun_at, Some(HEADER_LEN + b.len() - 2));
    }

    #[test]
    fn madt_keeps_64_cpus() {
        let mut b = std::vec::Vec::from([0u8; 8]);
        for i in 0..70u8 {
            b.extend_from_slice(&[0, 8, i, i, 1, 0, 0, 0]);
        }
        let m = parse_madt(&table(b"APIC", 5, &b)).unwrap();
        assert_eq!(m.apic_ids().len(), MAX_CPUS);
        assert_eq!(m.enabled_apic_ids().count(), MAX_CPUS);
        assert_eq!(m.enabled_apic_ids().last(), Some(63));
        assert_eq!(m.cpus_dropped, 6);
    }

    #[test]
    fn qemu_mcfg() {
        for (v, t) in MCFGS {
            let m = parse_mcfg(t).unwrap();
            assert_eq!(m.entries, 1, "{v}");
            assert_eq!(
                m.ecam,
                Some(EcamRegion {
                    base: 0xb000_0000,
                    segment: 0,
                    bus_start: 0,
                    bus_end: 0xff
                }),
                "{v}"
            );
        }
    }

    #[test]
    fn gas_access_width() {
        assert_eq!(Gas::io(0x608, 32).access_bytes(), 4);
        assert_eq!(Gas::io(0x604, 16).access_bytes(), 2);
        assert_eq!(Gas::from_bytes(&gas(0, 8, 4, 0)).access_bytes(), 8);
        assert_eq!(Gas::from_bytes(&gas(0, 0, 0, 0)).access_bytes(), 1);
        assert_eq!(format!("{}", Sig(*b"FA\0P")), "FA?P");
    }
}
