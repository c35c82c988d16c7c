//! Disk images given to the emulated NVMe controller.

use crate::{io_err, Error};
use dioxide_testkit::Rng;
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

/// Writes `size` bytes of pseudo-random data from `seed` to `path`.
pub fn write_random(path: &Path, size: u64, seed: u64) -> Result<(), Error> {
    let mut f = std::io::BufWriter::new(
        std::fs::File::create(path).map_err(io_err(format!("create {}", path.display())))?,
    );
    let mut rng = Rng::new(seed);
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

/// What the sample tree's README says.
const SAMPLE_README: &str = "\
This is dioxide's built-in sample filesystem, served because `dioxide run`
was given neither --disk nor --from.

Every regular file is an NBD export named by its path; nvme0n1 is the raw
namespace. Try, while the appliance runs:

  nbdinfo --list nbd://127.0.0.1:10809
  nbdcopy nbd://127.0.0.1:10809/hello.txt -
  nbdcopy nbd://127.0.0.1:10809/data/random-8m.bin /tmp/random-8m.bin
  fio --name=r --ioengine=nbd --uri=nbd://127.0.0.1:10809/data/random-8m.bin \\
      --rw=randread --bs=4k --iodepth=16 --runtime=10 --time_based

Serve your own files with `dioxide run --from DIR` (or make an image with
`dioxide mkfs IMG --from DIR` and run it with --disk IMG).
";

const SAMPLE_HELLO: &str = "hello from dioxide\n";

/// Contents of the sample tree's files, by source id: text, or
/// position-derived pseudo-random bytes (same bytes however read).
struct SampleSource;

impl dioxide_dxfs::mkfs::Source for SampleSource {
    fn read(&mut self, id: u64, offset: u64, buf: &mut [u8]) -> Result<(), String> {
        let text = match id {
            0 => SAMPLE_README.as_bytes(),
            1 => SAMPLE_HELLO.as_bytes(),
            _ => {
                position_random(id, offset, buf);
                return Ok(());
            }
        };
        let at = offset as usize;
        let src = text
            .get(at..at + buf.len())
            .ok_or_else(|| format!("sample source {id}: range past the end"))?;
        buf.copy_from_slice(src);
        Ok(())
    }
}

/// Pseudo-random bytes that are a function of (`seed`, position): any range
/// reads the same bytes however it is split.
pub fn position_random(seed: u64, offset: u64, buf: &mut [u8]) {
    for (at, b) in (offset..).zip(buf.iter_mut()) {
        let w = (at / 8).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ seed;
        *b = (w.rotate_left(17).wrapping_mul(0xbf58_476d_1ce4_e5b9) >> ((at % 8) * 8)) as u8;
    }
}

/// True when `path` is a dxfs image holding `file`.
pub fn has_file(path: &Path, file: &str) -> bool {
    check(path, 4096).is_ok()
        && crate::fstool::FileDevice::open(path)
            .ok()
            .is_some_and(|dev| {
                dioxide_dxfs::Fs::mount(&dev)
                    .and_then(|fs| fs.resolve(file))
                    .is_ok()
            })
}

/// Writes the dxfs image of an in-memory `tree` to `path` (through a
/// temporary file renamed at the end, so that a half-made image is never
/// taken for a made one).
pub fn write_tree<S: dioxide_dxfs::mkfs::Source>(
    path: &Path,
    tree: &dioxide_dxfs::mkfs::Tree,
    opts: &dioxide_dxfs::mkfs::Options,
    source: &mut S,
) -> Result<(), Error> {
    use dioxide_dxfs::mkfs;
    let what = |e: &dyn std::fmt::Display| Error::Usage(format!("image {}: {e}", path.display()));
    let plan = mkfs::plan(tree, opts).map_err(|e| what(&e))?;
    let tmp = path.with_extension("tmp");
    let mut dev = crate::fstool::FileDevice::create(&tmp, plan.image_bytes())?;
    mkfs::write(tree, &plan, opts, source, &mut dev, &mut |_, _| {}).map_err(|e| what(&e))?;
    drop(dev);
    std::fs::rename(&tmp, path).map_err(io_err(format!("rename {}", tmp.display())))
}

/// The sample image `dioxide run` serves when given neither a disk nor a
/// directory: a small dxfs tree (a README, text, random, odd-sized and
/// sparse files) under target/dioxide/, made once.
pub fn sample() -> Result<PathBuf, Error> {
    use dioxide_dxfs::mkfs::{Node, Options, Tree};
    let dir = crate::workspace_root().join("target").join("dioxide");
    std::fs::create_dir_all(&dir).map_err(io_err(format!("create {}", dir.display())))?;
    let path = dir.join("sample-tree.img");
    if has_file(&path, "/README.txt") {
        return Ok(path);
    }
    let file = |size: u64, source: u64| Node::file(size, vec![(0, size)], source);
    let readme = SAMPLE_README.len() as u64;
    let hello = SAMPLE_HELLO.len() as u64;
    let sparse = 16u64 << 20;
    let tree = Tree {
        nodes: vec![
            // 0: /
            Node::dir(vec![
                ("README.txt".into(), 1),
                ("hello.txt".into(), 2),
                ("data".into(), 3),
            ]),
            file(readme, 0),
            file(hello, 1),
            // 3: /data
            Node::dir(vec![
                ("random-8m.bin".into(), 4),
                ("odd-size.bin".into(), 5),
                ("sparse-16m.bin".into(), 6),
            ]),
            file(8 << 20, 2),
            file(100_003, 3),
            // Data at the start, the middle and the end; holes between.
            Node::file(
                sparse,
                vec![(0, 65536), (sparse / 2, 4096), (sparse - 12_345, 12_345)],
                4,
            ),
        ],
    };
    let opts = Options {
        label: "sample".into(),
        ..Default::default()
    };
    write_tree(&path, &tree, &opts, &mut SampleSource)?;
    Ok(path)
}
