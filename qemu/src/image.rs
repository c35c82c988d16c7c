//! Disk images given to the emulated NVMe controller.

use crate::{io_err, Error};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Checks that `path` can back a namespace with `lbs`-byte logical blocks;
/// returns its size.
pub fn check(path: &Path, lbs: u32) -> Result<u64, Error> {
    let err = |why: String| Error::Disk {
        path: path.to_path_buf(),
        why,
    };
    let meta = std::fs::metadata(path).map_err(|e| err(e.to_string()))?;
    if !meta.is_file() {
        return Err(err("not a regular file".into()));
    }
    let len = meta.len();
    if len == 0 {
        return Err(err(
            "is empty (0 bytes): an NVMe namespace needs at least one logical block".into(),
        ));
    }
    if len % lbs as u64 != 0 {
        return Err(err(format!(
            "size {len} is not a multiple of the {lbs}-byte logical block size"
        )));
    }
    std::fs::File::open(path).map_err(|e| err(format!("cannot be opened: {e}")))?;
    Ok(len)
}

/// Deterministic pseudo-random bytes (xorshift64*), for test images.
pub struct Xorshift(u64);

impl Xorshift {
    pub fn new(seed: u64) -> Self {
        Xorshift(seed.max(1))
    }
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

/// Writes `size` bytes of pseudo-random data from `seed` to `path`.
pub fn write_random(path: &Path, size: u64, seed: u64) -> Result<(), Error> {
    let mut f = std::io::BufWriter::new(
        std::fs::File::create(path).map_err(io_err(format!("create {}", path.display())))?,
    );
    let mut rng = Xorshift::new(seed);
    let mut buf = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        rng.fill(&mut buf[..n]);
        f.write_all(&buf[..n])
            .map_err(io_err(format!("write {}", path.display())))?;
        left -= n as u64;
    }
    f.flush()
        .map_err(io_err(format!("write {}", path.display())))
}

/// The sample image `dioxide run` uses when no disk is given: 64 MiB of
/// pseudo-random data under target/dioxide/, made once.
pub fn sample() -> Result<PathBuf, Error> {
    let dir = crate::workspace_root().join("target").join("dioxide");
    std::fs::create_dir_all(&dir).map_err(io_err(format!("create {}", dir.display())))?;
    let path = dir.join("sample-64m.img");
    if std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0) != 64 << 20 {
        write_random(&path, 64 << 20, 0xd10_c1de)?;
    }
    Ok(path)
}
