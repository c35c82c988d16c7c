//! Just enough ACPI: the RSDP, the RSDT/XSDT, MCFG (PCIe ECAM regions) and MADT
//! (local APICs). Every table's length is bounded and its checksum verified
//! before use; a bad table is skipped with a warning.
//!
//! Layouts (ACPI 6.5): RSDP `"RSD PTR "`, checksum over 20 bytes, revision at
//! 15, RSDT address (u32) at 16, length at 20, XSDT address (u64) at 24,
//! extended checksum over `length` bytes. Every other table starts with a
//! 36-byte header: signature, u32 length at 4, checksum over `length`. MCFG:
//! 8 reserved bytes after the header, then 16-byte entries {u64 base, u16
//! segment, u8 start bus, u8 end bus, u32 reserved}. MADT: u32 local APIC
//! address at 36, flags at 40, entries from 44 {u8 type, u8 length, ...}: type
//! 0 = processor local APIC {u8 uid, u8 apic id, u32 flags}, type 9 = local
//! x2APIC {u16 reserved, u32 x2apic id, u32 flags, u32 uid}.

use core::ptr;

#[derive(Clone, Copy, Debug, Default)]
pub struct EcamRegion {
    pub base: u64,
    pub segment: u16,
    pub bus_start: u8,
    pub bus_end: u8,
}

#[derive(Debug)]
pub struct AcpiInfo {
    pub revision: u8,
    pub ecam: Option<EcamRegion>,
    pub cpus: usize,
    pub apic_ids: [u32; 64],
    pub lapic_addr: u64,
}

impl Default for AcpiInfo {
    fn default() -> Self {
        AcpiInfo {
            revision: 0,
            ecam: None,
            cpus: 0,
            apic_ids: [0; 64],
            lapic_addr: 0xfee0_0000,
        }
    }
}

fn read<T: Copy>(at: u64) -> T {
    // SAFETY: ACPI tables are in RAM (reserved or ACPI regions), identity
    // mapped; callers bound every offset by the table's checked length.
    unsafe { ptr::read_unaligned(at as *const T) }
}

fn sum(at: u64, len: u64) -> u8 {
    (0..len).fold(0u8, |s, i| s.wrapping_add(read::<u8>(at + i)))
}

/// Finds the RSDP in the BIOS areas (EBDA first KiB, 0xe0000..0x100000).
fn scan_rsdp() -> Option<u64> {
    let ebda = (read::<u16>(0x40e) as u64) << 4;
    let areas = [(ebda, ebda + 1024), (0xe0000, 0x100000)];
    for (start, end) in areas {
        if start == 0 {
            continue;
        }
        let mut a = start;
        while a + 20 <= end {
            if read::<[u8; 8]>(a) == *b"RSD PTR " && sum(a, 20) == 0 {
                return Some(a);
            }
            a += 16;
        }
    }
    None
}

/// Validates a table header at `at`; returns its length.
fn table(at: u64) -> Option<(u64, [u8; 4])> {
    if at == 0 {
        return None;
    }
    let sig = read::<[u8; 4]>(at);
    let len = read::<u32>(at + 4) as u64;
    if !(36..=1 << 20).contains(&len) {
        log::warn!(target: "acpi", "table at {at:#x} has implausible length {len}");
        return None;
    }
    if sum(at, len) != 0 {
        log::warn!(target: "acpi", "table {} at {at:#x}: bad checksum", core::str::from_utf8(&sig).unwrap_or("????"));
        return None;
    }
    Some((len, sig))
}

pub fn init(boot: &dioxide_boot::BootInfo) -> Result<AcpiInfo, &'static str> {
    let mut info = AcpiInfo::default();
    // The RSDP: given by the boot loader (PVH address, multiboot2 copy), or
    // found in the BIOS areas.
    let rsdp_copy: [u8; 36] = match (boot.rsdp_addr, boot.rsdp) {
        (Some(a), _) if read::<[u8; 8]>(a) == *b"RSD PTR " => read(a),
        (_, Some(copy)) if &copy[..8] == b"RSD PTR " => copy,
        _ => read(scan_rsdp().ok_or("no ACPI RSDP")?),
    };
    if rsdp_copy[..20].iter().fold(0u8, |s, b| s.wrapping_add(*b)) != 0 {
        return Err("ACPI RSDP checksum mismatch");
    }
    info.revision = rsdp_copy[15];
    let rsdt =
        u32::from_le_bytes([rsdp_copy[16], rsdp_copy[17], rsdp_copy[18], rsdp_copy[19]]) as u64;
    let xsdt = if info.revision >= 2 {
        u64::from_le_bytes(rsdp_copy[24..32].try_into().unwrap_or([0; 8]))
    } else {
        0
    };
    let (root, entry_size) = if xsdt != 0 { (xsdt, 8) } else { (rsdt, 4) };
    let (root_len, _) = table(root).ok_or("ACPI root table unusable")?;
    let entries = (root_len - 36) / entry_size;
    for i in 0..entries.min(256) {
        let at = root + 36 + i * entry_size;
        let t = if entry_size == 8 {
            read::<u64>(at)
        } else {
            read::<u32>(at) as u64
        };
        let Some((len, sig)) = table(t) else { continue };
        match &sig {
            b"MCFG" => {
                let n = (len.saturating_sub(44)) / 16;
                for j in 0..n {
                    let e = t + 44 + j * 16;
                    let r = EcamRegion {
                        base: read(e),
                        segment: read(e + 8),
                        bus_start: read(e + 10),
                        bus_end: read(e + 11),
                    };
                    if r.segment == 0 && info.ecam.is_none() {
                        info.ecam = Some(r);
                    }
                }
            }
            b"APIC" => {
                info.lapic_addr = read::<u32>(t + 36) as u64;
                let mut e = t + 44;
                while e + 2 <= t + len {
                    let ty = read::<u8>(e);
                    let l = read::<u8>(e + 1) as u64;
                    if l < 2 || e + l > t + len {
                        log::warn!(target: "acpi", "MADT entry at {e:#x} overruns the table");
                        break;
                    }
                    let id_flags = match ty {
                        0 if l >= 8 => Some((read::<u8>(e + 3) as u32, read::<u32>(e + 4))),
                        9 if l >= 16 => Some((read::<u32>(e + 4), read::<u32>(e + 8))),
                        _ => None,
                    };
                    if let Some((id, flags)) = id_flags {
                        // Enabled, or online capable.
                        if flags & 3 != 0 && info.cpus < info.apic_ids.len() {
                            info.apic_ids[info.cpus] = id;
                            info.cpus += 1;
                        }
                    }
                    e += l;
                }
            }
            _ => {}
        }
    }
    log::info!(
        target: "acpi",
        "ACPI rev {}: {} CPU(s), ECAM {}",
        info.revision,
        info.cpus,
        match info.ecam {
            Some(r) => alloc::format!("{:#x} buses {}..={}", r.base, r.bus_start, r.bus_end),
            None => "none (legacy PCI config ports)".into(),
        }
    );
    Ok(info)
}
