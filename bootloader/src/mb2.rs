//! The multiboot2 boot information (MBI), read from a byte slice.
//!
//! Layout (Multiboot2 spec 2.0 §3.6, little-endian; offsets from the start
//! of each tag; every tag starts 8-byte aligned):
//!
//! ```text
//! header      u32 total_size, u32 reserved; then tags {u32 type, u32 size, ...}
//!             ending with the end tag {0, 8}
//! 1  cmdline  +8 NUL-terminated UTF-8 (GRUB passes only the arguments)
//! 6  mmap     +8 u32 entry_size (24), +12 u32 entry_version (0), +16 entries
//!             {u64 base, u64 length, u32 type (E820), u32 reserved},
//!             stepped by entry_size
//! 8  fb       +8 u64 addr, +16 u32 pitch, +20 u32 width, +24 u32 height,
//!             +28 u8 bpp, +29 u8 type, +30 u16 reserved (GRUB writes a u16;
//!             the spec text says u8 + padding), +32 colour info:
//!             type 0 indexed: u16 ncolors, then 3-byte RGB entries
//!             type 1 RGB: u8 red_pos, red_size, green_pos, green_size,
//!                         blue_pos, blue_size (tag size 38)
//!             type 2 EGA text: nothing (tag size 32)
//! 11 efi32    +8 u32 system table        12 efi64  +8 u64 system table
//! 14 acpi old +8 RSDP 1.0 (20 bytes)     15 acpi new +8 RSDP 2.0+ (36 bytes)
//! 17 efi mmap +8 u32 desc_size (OVMF: 48, not 40), +12 u32 desc_version (1),
//!             +16 descriptors {u32 type, u32 pad, u64 phys, u64 virt,
//!             u64 pages, u64 attr}, stepped by desc_size
//! 18          EFI boot services not terminated (no payload)
//! 19/20       EFI 32/64-bit image handle (only with boot services)
//! ```
//!
//! Every other tag (21 load base, 2 boot loader name, 4 basic meminfo, 5 boot
//! device, 9 ELF sections, 10 APM, ...) is skipped. The EFI memory map is used
//! only when there is no tag 6 (GRUB gives both under UEFI).

use crate::info::{
    BootError, BootInfo, Firmware, Framebuffer, FramebufferFormat, MemoryKind, Protocol,
};

/// EAX at the multiboot2 entry.
pub const MB2_BOOT_MAGIC: u32 = 0x36d7_6289;
/// Largest MBI accepted (GRUB's are a few KiB; 127 EFI descriptors of 48
/// bytes make 7 KiB).
pub const MB2_MAX_SIZE: u32 = 1 << 20;

const TAG_END: u32 = 0;
const TAG_CMDLINE: u32 = 1;
const TAG_MMAP: u32 = 6;
const TAG_FRAMEBUFFER: u32 = 8;
const TAG_EFI32: u32 = 11;
const TAG_EFI64: u32 = 12;
const TAG_ACPI_OLD: u32 = 14;
const TAG_ACPI_NEW: u32 = 15;
const TAG_EFI_MMAP: u32 = 17;
const TAG_EFI_BS: u32 = 18;
const TAG_EFI32_IH: u32 = 19;
const TAG_EFI64_IH: u32 = 20;

pub(crate) fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    let s = b.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

pub(crate) fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    let s = b.get(at..at.checked_add(8)?)?;
    let mut a = [0u8; 8];
    a.copy_from_slice(s);
    Some(u64::from_le_bytes(a))
}

/// Fills `out` from the multiboot2 information `bytes` (at least
/// `total_size` bytes; the rest is ignored) handed over with `magic` in EAX.
/// `out` is expected to be [`BootInfo::empty`] apart from the kernel's
/// addresses.
///
/// Every read is bounded by the tag it belongs to and by `total_size`; a
/// malformed MBI gives an error, never a read out of bounds or a panic.
pub fn parse_multiboot2(bytes: &[u8], magic: u32, out: &mut BootInfo) -> Result<(), BootError> {
    out.protocol = Protocol::Multiboot2;
    out.firmware = Firmware::Bios;
    if magic != MB2_BOOT_MAGIC {
        return Err(BootError::Mb2Magic(magic));
    }
    let total = u32_at(bytes, 0).ok_or(BootError::Mb2TotalSize(0))?;
    if !(16..=MB2_MAX_SIZE).contains(&total) {
        return Err(BootError::Mb2TotalSize(total));
    }
    let mbi = bytes
        .get(..total as usize)
        .ok_or(BootError::Mb2TotalSize(total))?;

    let mut saw_mmap = false;
    let mut efi_mmap: Option<&[u8]> = None;
    let mut efi32: Option<u64> = None;
    let mut ended = false;
    let mut off = 8usize;
    while off + 8 <= mbi.len() {
        // Both reads are in bounds: off + 8 <= len.
        let ty = u32_at(mbi, off).unwrap_or(TAG_END);
        let size = u32_at(mbi, off + 4).unwrap_or(0);
        if ty == TAG_END {
            ended = true;
            break;
        }
        if size < 8 {
            return Err(BootError::Mb2TagSize { offset: off, size });
        }
        let tag = off
            .checked_add(size as usize)
            .and_then(|end| mbi.get(off..end))
            .ok_or(BootError::Mb2TagOverrun { offset: off, size })?;
        let short = BootError::Mb2TagTooShort { tag: ty, size };
        match ty {
            TAG_CMDLINE => {
                let text = &tag[8..];
                let n = text.iter().position(|&b| b == 0).unwrap_or(text.len());
                out.set_cmdline(&text[..n]);
            }
            TAG_MMAP => {
                let esize = u32_at(tag, 8).ok_or(short)?;
                if esize < 24 {
                    return Err(BootError::Mb2MmapEntrySize(esize));
                }
                saw_mmap = true;
                for e in tag.get(16..).unwrap_or(&[]).chunks(esize as usize) {
                    let (Some(base), Some(len), Some(t)) =
                        (u64_at(e, 0), u64_at(e, 8), u32_at(e, 16))
                    else {
                        break;
                    };
                    out.push_region(base, len, MemoryKind::from_e820(t));
                }
            }
            // A framebuffer tag too short for its type is skipped: the
            // kernel runs without a screen rather than not at all.
            TAG_FRAMEBUFFER => out.framebuffer = framebuffer(tag),
            TAG_EFI32 => {
                out.firmware = Firmware::Uefi;
                efi32 = Some(u32_at(tag, 8).ok_or(short)? as u64);
            }
            TAG_EFI64 => {
                out.firmware = Firmware::Uefi;
                out.efi_system_table = Some(u64_at(tag, 8).ok_or(short)?);
            }
            TAG_ACPI_OLD | TAG_ACPI_NEW => {
                let rsdp = &tag[8..];
                if rsdp.len() < 20 {
                    return Err(short);
                }
                // Prefer the 2.0 copy (tag 15) over the 1.0 one.
                if ty == TAG_ACPI_NEW || out.rsdp.is_none() {
                    let mut copy = [0u8; 36];
                    let n = rsdp.len().min(36);
                    copy[..n].copy_from_slice(&rsdp[..n]);
                    out.rsdp = Some(copy);
                }
            }
            TAG_EFI_MMAP => {
                out.firmware = Firmware::Uefi;
                efi_mmap = Some(tag);
            }
            TAG_EFI_BS => return Err(BootError::EfiBootServicesActive),
            TAG_EFI32_IH | TAG_EFI64_IH => out.firmware = Firmware::Uefi,
            _ => {}
        }
        off += (size as usize).next_multiple_of(8);
    }
    if !ended {
        return Err(BootError::Mb2NoEndTag);
    }
    if out.efi_system_table.is_none() {
        out.efi_system_table = efi32;
    }
    if !saw_mmap {
        if let Some(tag) = efi_mmap {
            parse_efi_mmap(tag, out)?;
        }
    }
    if out.memory_map().is_empty() {
        return Err(BootError::NoMemoryMap);
    }
    Ok(())
}

/// EFI memory map (tag 17): descriptors stepped by `desc_size`.
fn parse_efi_mmap(tag: &[u8], out: &mut BootInfo) -> Result<(), BootError> {
    let size = tag.len() as u32;
    let dsize = u32_at(tag, 8).ok_or(BootError::Mb2TagTooShort {
        tag: TAG_EFI_MMAP,
        size,
    })?;
    if dsize < 40 {
        return Err(BootError::EfiDescSize(dsize));
    }
    for d in tag.get(16..).unwrap_or(&[]).chunks(dsize as usize) {
        let (Some(t), Some(phys), Some(pages)) = (u32_at(d, 0), u64_at(d, 8), u64_at(d, 24)) else {
            break;
        };
        out.push_region(phys, pages.saturating_mul(4096), MemoryKind::from_efi(t));
    }
    Ok(())
}

/// Tag 8, or `None` when the tag is too short for its type.
fn framebuffer(tag: &[u8]) -> Option<Framebuffer> {
    let addr = u64_at(tag, 8)?;
    let pitch = u32_at(tag, 16)?;
    let width = u32_at(tag, 20)?;
    let height = u32_at(tag, 24)?;
    let bpp = *tag.get(28)?;
    let format = match *tag.get(29)? {
        0 => {
            let lo = *tag.get(32)?;
            let hi = *tag.get(33)?;
            FramebufferFormat::Indexed {
                colors: u16::from_le_bytes([lo, hi]),
            }
        }
        1 => {
            let c = tag.get(32..38)?;
            FramebufferFormat::Rgb {
                red_pos: c[0],
                red_size: c[1],
                green_pos: c[2],
                green_size: c[3],
                blue_pos: c[4],
                blue_size: c[5],
            }
        }
        2 => FramebufferFormat::EgaText,
        _ => return None,
    };
    Some(Framebuffer {
        addr,
        pitch,
        width,
        height,
        bpp,
        format,
    })
}

#[cfg(test)]
mod tests;
