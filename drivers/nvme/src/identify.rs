//! Parsing of Identify data structures (NVMe base spec 2.0, figures 275 and
//! NVM command set spec 1.0, figure 97). Only the fields the driver uses.
//!
//! Identify Controller (4096 bytes):
//!
//! ```text
//! bytes     field
//! 0..2      VID  PCI vendor id
//! 4..24     SN   serial number, ASCII, space padded
//! 24..64    MN   model number
//! 64..72    FR   firmware revision
//! 77        MDTS maximum data transfer size, 2^n * CAP.MPSMIN, 0 = no limit
//! 256..258  OACS bit 8 = Doorbell Buffer Config
//! 512       SQES required 3:0 / maximum 7:4, log2 bytes
//! 513       CQES likewise
//! 516..520  NN   number of namespaces
//! 525       VWC  bit 0 = volatile write cache present
//! ```
//!
//! Identify Namespace (4096 bytes):
//!
//! ```text
//! bytes     field
//! 0..8      NSZE namespace size in logical blocks
//! 8..16     NCAP capacity
//! 25        NLBAF number of LBA formats, 0-based
//! 26        FLBAS format index 3:0 (+ 6:5 as bits 5:4), metadata at end of LBA 4
//! 128..     LBAF[i], 4 bytes each: MS 15:0, LBADS 23:16 (log2), RP 25:24
//! ```
//!
//! Only formats without metadata (MS = 0) are accepted
//! ([`NvmeError::MetadataFormat`] otherwise).
//!
//! Active Namespace ID list (Identify CNS 02h, NVMe 1.1): up to 1024 32-bit
//! namespace ids greater than the command's NSID, ascending, ended by 0.

use crate::error::NvmeError;

fn le16(b: &[u8; 4096], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn le32(b: &[u8; 4096], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn le64(b: &[u8; 4096], at: usize) -> u64 {
    le32(b, at) as u64 | (le32(b, at + 4) as u64) << 32
}

/// A fixed-size ASCII field with trailing spaces and NULs removed.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct AsciiField<const N: usize> {
    bytes: [u8; N],
}

impl<const N: usize> AsciiField<N> {
    fn from(b: &[u8]) -> Self {
        let mut bytes = [0u8; N];
        bytes.copy_from_slice(&b[..N]);
        AsciiField { bytes }
    }
    pub fn as_str(&self) -> &str {
        let mut end = N;
        while end > 0 && (self.bytes[end - 1] == b' ' || self.bytes[end - 1] == 0) {
            end -= 1;
        }
        core::str::from_utf8(&self.bytes[..end]).unwrap_or("<non-ascii>")
    }
}

impl<const N: usize> core::fmt::Debug for AsciiField<N> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{:?}", self.as_str())
    }
}

/// What the driver keeps of Identify Controller.
#[derive(Clone, Copy, Debug)]
pub struct ControllerInfo {
    pub vendor: u16,
    pub serial: AsciiField<20>,
    pub model: AsciiField<40>,
    pub firmware: AsciiField<8>,
    /// Maximum data transfer in bytes, `None` when the controller sets no limit.
    pub mdts_bytes: Option<usize>,
    pub namespaces: u32,
    pub doorbell_buffer_config: bool,
    pub volatile_write_cache: bool,
}

impl ControllerInfo {
    pub fn parse(b: &[u8; 4096], min_page_size: usize) -> Result<Self, NvmeError> {
        let sqes = b[512];
        let cqes = b[513];
        // The driver uses 64-byte SQ and 16-byte CQ entries: they must lie
        // between the required (3:0) and maximum (7:4) sizes.
        if (sqes & 0xf) > 6 || (sqes >> 4) < 6 {
            return Err(NvmeError::BadIdentify(
                "SQES does not allow 64-byte entries",
            ));
        }
        if (cqes & 0xf) > 4 || (cqes >> 4) < 4 {
            return Err(NvmeError::BadIdentify(
                "CQES does not allow 16-byte entries",
            ));
        }
        let mdts = b[77];
        let mdts_bytes = if mdts == 0 {
            None
        } else if mdts >= 20 {
            // Beyond 4 GiB: no practical limit for this driver.
            None
        } else {
            Some(min_page_size << mdts)
        };
        Ok(ControllerInfo {
            vendor: le16(b, 0),
            serial: AsciiField::from(&b[4..24]),
            model: AsciiField::from(&b[24..64]),
            firmware: AsciiField::from(&b[64..72]),
            mdts_bytes,
            namespaces: le32(b, 516),
            doorbell_buffer_config: le16(b, 256) & (1 << 8) != 0,
            volatile_write_cache: b[525] & 1 != 0,
        })
    }
}

/// A namespace as the driver uses it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Namespace {
    pub nsid: u32,
    /// Logical block size in bytes (512 or 4096 on most devices).
    pub block_size: u32,
    /// Size in logical blocks.
    pub blocks: u64,
}

impl Namespace {
    pub fn parse(nsid: u32, b: &[u8; 4096]) -> Result<Self, NvmeError> {
        let nsze = le64(b, 0);
        if nsze == 0 {
            return Err(NvmeError::NamespaceEmpty { nsid });
        }
        let nlbaf = b[25] as usize + 1;
        let flbas = b[26];
        let index = (flbas & 0xf) as usize | (((flbas >> 5) & 3) as usize) << 4;
        if index >= nlbaf || index >= 64 {
            return Err(NvmeError::BadIdentify("FLBAS selects a format past NLBAF"));
        }
        let lbaf = le32(b, 128 + 4 * index);
        let ms = lbaf & 0xffff;
        let lbads = (lbaf >> 16) & 0xff;
        if !(9..=16).contains(&lbads) {
            return Err(NvmeError::BadIdentify(
                "LBA data size outside 512 B..64 KiB",
            ));
        }
        // Metadata, separate or at the end of each block (extended LBA):
        // without a metadata pointer a read of a separate-metadata format is
        // not safe (the controller may transfer metadata anyway, or fail), and
        // an extended format changes the transfer size of every command.
        if ms != 0 {
            return Err(NvmeError::MetadataFormat {
                nsid,
                metadata_bytes: ms as u16,
                lba_format: index as u8,
                extended: flbas & (1 << 4) != 0,
            });
        }
        Ok(Namespace {
            nsid,
            block_size: 1 << lbads,
            blocks: nsze,
        })
    }

    /// Size in bytes.
    pub fn bytes(&self) -> u64 {
        self.blocks * self.block_size as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespace_golden() {
        let mut b = [0u8; 4096];
        b[0..8].copy_from_slice(&131072u64.to_le_bytes());
        b[25] = 1; // two formats
        b[26] = 1; // format 1
        b[128..132].copy_from_slice(&(9u32 << 16).to_le_bytes());
        b[132..136].copy_from_slice(&(12u32 << 16).to_le_bytes());
        let ns = Namespace::parse(1, &b).unwrap();
        assert_eq!(
            ns,
            Namespace {
                nsid: 1,
                block_size: 4096,
                blocks: 131072
            }
        );
        assert_eq!(ns.bytes(), 512 << 20);
        b[26] = 2;
        assert_eq!(
            Namespace::parse(1, &b),
            Err(NvmeError::BadIdentify("FLBAS selects a format past NLBAF"))
        );
        b[0..8].fill(0);
        assert_eq!(
            Namespace::parse(3, &b),
            Err(NvmeError::NamespaceEmpty { nsid: 3 })
        );
    }

    #[test]
    fn namespaces_with_metadata_are_refused_by_name() {
        let mut b = [0u8; 4096];
        b[0..8].copy_from_slice(&1000u64.to_le_bytes());
        b[25] = 1; // two formats
        b[26] = 1; // format 1: 512 + 8 bytes of separate metadata
        b[128..132].copy_from_slice(&(9u32 << 16).to_le_bytes());
        b[132..136].copy_from_slice(&((9u32 << 16) | 8).to_le_bytes());
        let e = Namespace::parse(2, &b).unwrap_err();
        assert_eq!(
            e,
            NvmeError::MetadataFormat {
                nsid: 2,
                metadata_bytes: 8,
                lba_format: 1,
                extended: false
            }
        );
        assert_eq!(
            e.to_string(),
            "namespace 2: 8 bytes of metadata per block (LBA format 1): unsupported, format it without metadata"
        );
        // The same format with the metadata at the end of each block.
        b[26] = 1 | 1 << 4;
        let e = Namespace::parse(2, &b).unwrap_err();
        assert_eq!(
            e.to_string(),
            "namespace 2: 8 bytes of metadata per block (LBA format 1, extended LBA): unsupported, format it without metadata"
        );
        // Format 0 of the same namespace has none: accepted.
        b[26] = 0;
        assert_eq!(Namespace::parse(2, &b).unwrap().block_size, 512);
        // A format index above 15 (FLBAS bits 6:5).
        b[25] = 16;
        b[26] = 1 << 5; // format 16
        b[128 + 64..132 + 64].copy_from_slice(&((12u32 << 16) | 64).to_le_bytes());
        assert!(matches!(
            Namespace::parse(7, &b),
            Err(NvmeError::MetadataFormat {
                nsid: 7,
                metadata_bytes: 64,
                lba_format: 16,
                ..
            })
        ));
    }

    #[test]
    fn controller_golden() {
        let mut b = [0u8; 4096];
        b[0..2].copy_from_slice(&0x1b36u16.to_le_bytes());
        b[4..24].copy_from_slice(b"deadbeef            ");
        b[24..64].copy_from_slice(b"QEMU NVMe Ctrl                          ");
        b[77] = 7;
        b[256] = 0;
        b[257] = 1; // OACS bit 8
        b[512] = 0x66;
        b[513] = 0x44;
        b[516..520].copy_from_slice(&256u32.to_le_bytes());
        let c = ControllerInfo::parse(&b, 4096).unwrap();
        assert_eq!(c.vendor, 0x1b36);
        assert_eq!(c.serial.as_str(), "deadbeef");
        assert_eq!(c.model.as_str(), "QEMU NVMe Ctrl");
        assert_eq!(c.mdts_bytes, Some(512 * 1024));
        assert_eq!(c.namespaces, 256);
        assert!(c.doorbell_buffer_config);
        b[512] = 0x55;
        assert!(ControllerInfo::parse(&b, 4096).is_err());
    }
}
