//! The commit log: metadata changes made atomic by a redo journal.
//!
//! An image with [`INCOMPAT_LOG`] has a log of `log_blocks` blocks at
//! `log_start`, inside the data region and marked in use in the bitmap. It
//! holds at most one transaction, always at the start of the log:
//!
//! | log block | contents |
//! |-----------|----------|
//! | 0 | descriptor (header kind 4, `blockno` its own block, `count` = n) |
//! | 1 ..= n | the new contents of n metadata blocks, whole, in descriptor order |
//! | n + 1 | commit (header kind 5, `blockno` its own block, `count` = n) |
//!
//! Descriptor payload, after the 32-byte header: `u64 seq`, `[u8; 16] uuid`
//! (the superblock's), then n `u64` home block numbers, each below
//! `block_count` and outside the log, no block twice. Commit payload: `u64
//! seq`, `[u8; 16] uuid`, `u64` CRC-64/NVMe over the whole descriptor block
//! followed by the n logged blocks.
//!
//! Why not crc32c, as everywhere else: the logged blocks hold structures
//! sealed with crc32c (an inode ends with the crc32c of its bytes), and a
//! CRC over a message followed by its own CRC is a constant (the residue).
//! A crc32c over an inode table block therefore does not change when an
//! inode in it does — the crash suite found a torn log passing such a
//! check. A different polynomial has no such blind spot. A transaction is *committed* when its
//! commit block is on the medium and checks out; anything less (a torn
//! write, a descriptor of another image, a commit of an older transaction
//! left behind) is no transaction and is ignored.
//!
//! Writing one ([`crate::write::WritableFs::commit`]): descriptor and
//! blocks; a device flush (the data writes the transaction exposes, and the
//! log, are now durable); the commit block written with FUA; then the blocks
//! are written home (the checkpoint) and flushed, and only then may the log
//! be overwritten by the next transaction. So the log always holds the last
//! committed transaction, whose home copies are either already written
//! (replaying it again writes the same bytes: replay is idempotent) or not
//! yet (replaying finishes the checkpoint). A mount reads the committed
//! transaction and lays it over the home blocks ([`crate::Fs::mount`]); a
//! writable mount and `fsck --repair` write it home.
//!
//! The rule that keeps idempotent replay safe: a block the log may hold is
//! metadata until a later transaction has replaced the log's contents.
//! dxfs never turns a logged block into file data before then: blocks freed
//! by a transaction (extent tree nodes) are not reused before it committed
//! and checkpointed.

use crate::error::{Error, Result, Structure, Why};
use crate::format::*;
use alloc::collections::BTreeSet;
use alloc::vec;
use alloc::vec::Vec;

/// Where the descriptor's payload starts: after the header.
const SEQ_AT: usize = HEADER_SIZE;
const UUID_AT: usize = HEADER_SIZE + 8;
const HOMES_AT: usize = HEADER_SIZE + 24;
/// Where the commit block's checksum is.
const SUM_AT: usize = HEADER_SIZE + 24;

/// A committed transaction: each home block and its new contents.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Txn {
    pub seq: u64,
    pub blocks: Vec<(u64, Vec<u8>)>,
}

/// The most blocks one transaction may log on this image.
pub fn capacity(sb: &Superblock) -> usize {
    let by_descriptor = (sb.block_size as usize - HOMES_AT) / 8;
    let by_log = sb.log_blocks.saturating_sub(2) as usize;
    by_descriptor.min(by_log)
}

/// The commit block's checksum (CRC-64/NVMe, `crc` crate).
const CRC64: crc::Crc<u64> = crc::Crc::<u64>::new(&crc::CRC_64_NVME);

fn checksum(desc: &[u8], blocks: &[(u64, Vec<u8>)]) -> u64 {
    let mut d = CRC64.digest();
    d.update(desc);
    for (_, b) in blocks {
        d.update(b);
    }
    d.finalize()
}

/// The descriptor and commit blocks of transaction `seq` logging `blocks`
/// (each a whole block), to be written at `log_start` and at `log_start + 1
/// + blocks.len()`. The caller keeps `blocks.len()` within [`capacity`].
pub fn encode(sb: &Superblock, seq: u64, blocks: &[(u64, Vec<u8>)]) -> (Vec<u8>, Vec<u8>) {
    let bs = sb.block_size as usize;
    let n = blocks.len();
    let mut desc = vec![0u8; bs];
    desc[SEQ_AT..SEQ_AT + 8].copy_from_slice(&seq.to_le_bytes());
    desc[UUID_AT..UUID_AT + 16].copy_from_slice(&sb.uuid);
    for (i, (home, _)) in blocks.iter().enumerate() {
        desc[HOMES_AT + i * 8..HOMES_AT + i * 8 + 8].copy_from_slice(&home.to_le_bytes());
    }
    BlockHeader {
        kind: KIND_LOG_DESC,
        level: 0,
        blockno: sb.log_start,
        count: n as u32,
        owner: 0,
    }
    .emit(&mut desc);
    let mut commit = vec![0u8; bs];
    commit[SEQ_AT..SEQ_AT + 8].copy_from_slice(&seq.to_le_bytes());
    commit[UUID_AT..UUID_AT + 16].copy_from_slice(&sb.uuid);
    let sum = checksum(&desc, blocks);
    commit[SUM_AT..SUM_AT + 8].copy_from_slice(&sum.to_le_bytes());
    BlockHeader {
        kind: KIND_LOG_COMMIT,
        level: 0,
        blockno: sb.log_start + 1 + n as u64,
        count: n as u32,
        owner: 0,
    }
    .emit(&mut commit);
    (desc, commit)
}

/// The log's first block as mkfs writes it: a descriptor of no blocks
/// (sequence 0, this image's uuid), which is no transaction. Not zeroes: a
/// copy of the image onto a drive by a tool that skips zero blocks (`dd
/// conv=sparse`, `cp --sparse`, a deduplicating copy) would leave the
/// drive's old first log block in place, and a transaction the same image
/// committed in an earlier life on that drive (same uuid) would be taken
/// for this one's and replayed over the fresh metadata. (Such a copy is safe
/// only over the same image or a zeroed drive: other metadata blocks mkfs
/// writes as zeroes would keep what the drive had.)
pub fn empty(sb: &Superblock) -> Vec<u8> {
    encode(sb, 0, &[]).0
}

/// Reads the log of an image whose superblock is `sb` through `read` (one
/// whole block at a block number): the committed transaction, or `None` when
/// the log holds none (empty, torn, or another image's). A transaction that
/// checks out but names home blocks it may not is an error: the image is
/// damaged, and replaying it would damage it more.
pub fn read(
    sb: &Superblock,
    read: &mut dyn FnMut(u64, &mut [u8]) -> Result<()>,
) -> Result<Option<Txn>> {
    if !sb.has_log() {
        return Ok(None);
    }
    let bs = sb.block_size as usize;
    let mut desc = vec![0u8; bs];
    read(sb.log_start, &mut desc)?;
    let Ok(h) = BlockHeader::parse(&desc, KIND_LOG_DESC, sb.log_start) else {
        return Ok(None);
    };
    let n = h.count as usize;
    // A descriptor of no blocks is an empty log ([`empty`]); no transaction
    // is ever committed empty.
    if n == 0 || desc[UUID_AT..UUID_AT + 16] != sb.uuid || n > capacity(sb) {
        return Ok(None);
    }
    let seq = u64::from_le_bytes(desc[SEQ_AT..SEQ_AT + 8].try_into().unwrap_or_default());
    let mut commit = vec![0u8; bs];
    let commit_at = sb.log_start + 1 + n as u64;
    read(commit_at, &mut commit)?;
    let Ok(ch) = BlockHeader::parse(&commit, KIND_LOG_COMMIT, commit_at) else {
        return Ok(None);
    };
    if ch.count as usize != n
        || commit[SEQ_AT..SEQ_AT + 8] != desc[SEQ_AT..SEQ_AT + 8]
        || commit[UUID_AT..UUID_AT + 16] != sb.uuid
    {
        return Ok(None);
    }
    let mut blocks = Vec::with_capacity(n);
    for i in 0..n {
        let at = HOMES_AT + i * 8;
        let home = u64::from_le_bytes(desc[at..at + 8].try_into().unwrap_or_default());
        let mut b = vec![0u8; bs];
        read(sb.log_start + 1 + i as u64, &mut b)?;
        blocks.push((home, b));
    }
    let sum = u64::from_le_bytes(commit[SUM_AT..SUM_AT + 8].try_into().unwrap_or_default());
    if sum != checksum(&desc, &blocks) {
        return Ok(None);
    }
    check_homes(sb, &blocks)?;
    Ok(Some(Txn { seq, blocks }))
}

/// Every home block lies in the filesystem, outside the log, once.
fn check_homes(sb: &Superblock, blocks: &[(u64, Vec<u8>)]) -> Result<()> {
    let log = sb.log_start..sb.log_start + sb.log_blocks;
    let mut seen = BTreeSet::new();
    for (home, _) in blocks {
        if *home >= sb.block_count || log.contains(home) || !seen.insert(*home) {
            return Err(Error::corrupt(
                Structure::Log,
                sb.log_start,
                Why::OutOfRange("logged block's home"),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sb() -> Superblock {
        Superblock {
            block_size: 4096,
            block_count: 64,
            free_blocks: 0,
            inode_count: 16,
            free_inodes: 0,
            bitmap_start: 1,
            bitmap_blocks: 1,
            itable_start: 2,
            itable_blocks: 1,
            data_start: 3,
            root_inode: 1,
            feature_compat: 0,
            feature_incompat: INCOMPAT_LOG,
            feature_ro_compat: 0,
            uuid: [7; 16],
            created: 0,
            written: 0,
            log_start: 40,
            log_blocks: 8,
            label: [0; 64],
        }
    }

    /// A log in memory: block number → contents.
    fn image(sb: &Superblock, seq: u64, blocks: &[(u64, Vec<u8>)]) -> Vec<Vec<u8>> {
        let mut img = vec![vec![0u8; 4096]; 64];
        let (d, c) = encode(sb, seq, blocks);
        img[sb.log_start as usize] = d;
        for (i, (_, b)) in blocks.iter().enumerate() {
            img[sb.log_start as usize + 1 + i] = b.clone();
        }
        img[sb.log_start as usize + 1 + blocks.len()] = c;
        img
    }

    fn read_img(sb: &Superblock, img: &[Vec<u8>]) -> Result<Option<Txn>> {
        read(sb, &mut |b, buf| {
            buf.copy_from_slice(&img[b as usize]);
            Ok(())
        })
    }

    #[test]
    fn golden_descriptor_and_commit() {
        let sb = sb();
        let blocks = vec![(2u64, vec![0xaau8; 4096]), (0, vec![0x55; 4096])];
        let (d, c) = encode(&sb, 9, &blocks);
        assert_eq!(&d[0..4], b"DXMB");
        assert_eq!(u16::from_le_bytes([d[4], d[5]]), 4);
        assert_eq!(u64::from_le_bytes(d[8..16].try_into().unwrap()), 40);
        assert_eq!(u32::from_le_bytes(d[16..20].try_into().unwrap()), 2);
        assert_eq!(u64::from_le_bytes(d[32..40].try_into().unwrap()), 9);
        assert_eq!(&d[40..56], &[7u8; 16]);
        assert_eq!(u64::from_le_bytes(d[56..64].try_into().unwrap()), 2);
        assert_eq!(u64::from_le_bytes(d[64..72].try_into().unwrap()), 0);
        assert!(d[72..].iter().all(|&x| x == 0));
        assert_eq!(u16::from_le_bytes([c[4], c[5]]), 5);
        assert_eq!(u64::from_le_bytes(c[8..16].try_into().unwrap()), 43);
        let mut all = d.clone();
        all.extend_from_slice(&blocks[0].1);
        all.extend_from_slice(&blocks[1].1);
        let sum = crc::Crc::<u64>::new(&crc::CRC_64_NVME).checksum(&all);
        assert_eq!(u64::from_le_bytes(c[56..64].try_into().unwrap()), sum);
        // The known check value of CRC-64/NVMe.
        assert_eq!(CRC64.checksum(b"123456789"), 0xae8b_1486_0a79_9888);
        let txn = read_img(&sb, &image(&sb, 9, &blocks)).unwrap().unwrap();
        assert_eq!(txn, Txn { seq: 9, blocks });
    }

    #[test]
    fn golden_empty_log() {
        let sb = sb();
        let e = empty(&sb);
        assert_eq!(e.len(), 4096);
        assert_eq!(&e[0..4], b"DXMB");
        assert_eq!(u16::from_le_bytes([e[4], e[5]]), 4, "a descriptor");
        assert_eq!(u64::from_le_bytes(e[8..16].try_into().unwrap()), 40);
        assert_eq!(u32::from_le_bytes(e[16..20].try_into().unwrap()), 0);
        assert_eq!(u64::from_le_bytes(e[32..40].try_into().unwrap()), 0);
        assert_eq!(&e[40..56], &[7u8; 16]);
        assert!(e[56..].iter().all(|&x| x == 0));
        // No transaction, whatever follows it (here an older transaction's
        // commit block of no blocks, which never exists, at log block 1).
        let mut img = vec![vec![0u8; 4096]; 64];
        img[40] = e;
        img[41] = encode(&sb, 0, &[]).1;
        assert_eq!(read_img(&sb, &img).unwrap(), None);
        // Over a committed transaction of the same image: it is gone.
        let mut old = image(&sb, 5, &[(2u64, vec![3u8; 4096])]);
        assert!(read_img(&sb, &old).unwrap().is_some());
        old[40] = empty(&sb);
        assert_eq!(read_img(&sb, &old).unwrap(), None);
    }

    #[test]
    fn torn_or_foreign_logs_are_no_transaction() {
        let sb = sb();
        let blocks = vec![(2u64, vec![1u8; 4096]), (5, vec![2; 4096])];
        let good = image(&sb, 3, &blocks);
        // Control: the whole transaction reads back.
        assert!(read_img(&sb, &good).unwrap().is_some());
        // Empty log.
        assert_eq!(read_img(&sb, &vec![vec![0u8; 4096]; 64]).unwrap(), None);
        // The commit block never written.
        let mut torn = good.clone();
        torn[43] = vec![0; 4096];
        assert_eq!(read_img(&sb, &torn).unwrap(), None);
        // A logged block torn.
        let mut torn = good.clone();
        torn[42][100] ^= 1;
        assert_eq!(read_img(&sb, &torn).unwrap(), None);
        // Another image's log (other uuid).
        let mut other = sb.clone();
        other.uuid = [8; 16];
        assert_eq!(read_img(&sb, &image(&other, 3, &blocks)).unwrap(), None);
        // An inode table block of another transaction: its inodes end in
        // their own crc32c, which a crc32c over the block would not see.
        let mut inodes = vec![0u8; 4096];
        let mut other = vec![0u8; 4096];
        for (k, b) in [&mut inodes, &mut other].into_iter().enumerate() {
            let mut inode = Inode {
                mode: S_IFREG | 0o644,
                links: 1,
                size: 4096 * (k as u64 + 1),
                blocks: 0,
                mtime: 0,
                mtime_nsec: 0,
                ctime: 0,
                ctime_nsec: 0,
                uid: 0,
                gid: 0,
                parent: 0,
                extent_count: 0,
                depth: 0,
                generation: 1,
                inline: [0; 144],
            };
            inode.blocks = k as u64;
            inode.emit(2, &mut b[256..512]);
        }
        assert_eq!(
            CRC32C.checksum(&inodes),
            CRC32C.checksum(&other),
            "the blind spot"
        );
        let logged = vec![(2u64, inodes)];
        let mut swapped = image(&sb, 3, &logged);
        swapped[41] = other;
        assert!(read_img(&sb, &image(&sb, 3, &logged)).unwrap().is_some());
        assert_eq!(read_img(&sb, &swapped).unwrap(), None);
        // A new descriptor over an older transaction's commit block.
        let mut mixed = good.clone();
        let (d, _) = encode(&sb, 4, &blocks);
        mixed[40] = d;
        assert_eq!(read_img(&sb, &mixed).unwrap(), None);
    }

    #[test]
    fn homes_outside_the_filesystem_or_in_the_log_are_damage() {
        let sb = sb();
        for home in [64u64, 41, 47] {
            let img = image(&sb, 1, &[(home, vec![0u8; 4096])]);
            assert!(read_img(&sb, &img).is_err(), "home {home}");
        }
        let img = image(&sb, 1, &[(3, vec![0u8; 4096]), (3, vec![1u8; 4096])]);
        assert!(read_img(&sb, &img).is_err(), "a block twice");
    }
}
