//! dxfs images made by `dioxide mkfs`, read by the kernel through its NVMe
//! driver.

use dioxide::fstool;
use dioxide_tests::*;
use std::collections::BTreeMap;

fn kernel_files(img: &std::path::Path, lbs: u32) -> (u8, BTreeMap<String, String>, String) {
    let mut cfg = config(Some(img), &["selftest=files"]);
    cfg.nvme[0].namespaces[0].lbs = lbs;
    let out = boot(&cfg);
    let mut files = BTreeMap::new();
    for l in out.result_lines() {
        if let Some(rest) = l.strip_prefix("file ") {
            let (path, info) = match rest.split_once(" bytes=") {
                Some((p, i)) => (p, i.to_string()),
                None => match rest.split_once(" error=") {
                    Some((p, e)) => (p, format!("error={e}")),
                    None => (rest, String::new()),
                },
            };
            files.insert(path.to_string(), info);
        }
    }
    (out.status, files, out.console)
}

#[test]
fn random_tree_through_mkfs_and_the_kernel() {
    for (seed, lbs, bs) in [(1u64, 512u32, 4096u32), (2, 4096, 4096), (3, 4096, 16384)] {
        let dir = TempDir::new(&format!("files-{seed}"));
        let src = dir.path().join("src");
        std::fs::create_dir_all(&src).unwrap();
        let paths = random_tree(&src, seed, 60);
        let img = dir.path().join("fs.img");
        assert_eq!(fstool::mkfs(&img, &src, None, bs, "test").unwrap(), 0);
        let (status, got, console) = kernel_files(&img, lbs);
        assert_eq!(status, 0, "console:\n{console}");
        assert!(console.contains(&format!("block size {bs}")), "{console}");
        let mut want = BTreeMap::new();
        for p in &paths {
            let data = std::fs::read(src.join(p)).unwrap();
            want.insert(
                format!("/{p}"),
                format!(
                    "{} sha256={}",
                    data.len(),
                    hex(&sha2::Sha256::digest_bytes(&data))
                ),
            );
        }
        assert_eq!(got, want);
        assert!(console.contains(&format!("files done count={}", paths.len())));
        // Files of at least a block were also read with a 4 KiB request:
        // through the simple path, or back to the generic path where the
        // first block is a hole (sparse files).
        let big = paths
            .iter()
            .filter(|p| std::fs::metadata(src.join(p)).unwrap().len() >= 4096)
            .count() as u64;
        let line = console
            .lines()
            .find(|l| l.starts_with("files iomap "))
            .expect("iomap line");
        let field = |k: &str| -> u64 {
            line.split_whitespace()
                .find_map(|w| {
                    w.strip_prefix(&format!("{k}="))
                        .and_then(|v| v.parse().ok())
                })
                .unwrap_or(u64::MAX)
        };
        assert_eq!(field("simple") + field("fell_back"), big, "{line}");
        assert!(field("simple") > 0, "{line}");
    }
}

#[test]
fn the_simple_path_switch_sends_every_read_to_the_generic_path() {
    let dir = TempDir::new("files-nosimple");
    let src = dir.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    let paths = random_tree(&src, 9, 30);
    let img = dir.path().join("fs.img");
    fstool::mkfs(&img, &src, None, 4096, "").unwrap();
    let on = boot(&config(Some(&img), &["selftest=files"]));
    let off = boot(&config(Some(&img), &["selftest=files", "dio.simple=0"]));
    assert_eq!(
        (on.status, off.status),
        (0, 0),
        "{}\n{}",
        on.console,
        off.console
    );
    let files = |c: &str| {
        c.lines()
            .filter(|l| l.starts_with("file "))
            .map(String::from)
            .collect::<Vec<_>>()
    };
    // Against hashes the host computes from the source files, not only one
    // run of the kernel against the other.
    let mut want: Vec<String> = paths
        .iter()
        .map(|p| {
            let data = std::fs::read(src.join(p)).unwrap();
            format!(
                "file /{p} bytes={} sha256={}",
                data.len(),
                hex(&sha2::Sha256::digest_bytes(&data))
            )
        })
        .collect();
    want.sort();
    for run in [&on, &off] {
        let mut got = files(&run.console);
        got.sort();
        assert_eq!(got, want, "{}", run.console);
    }
    // And each run took the path it names: with the switch on some 4 KiB
    // reads went the simple path; with it off none did and the generic
    // path read them all.
    let iomap = |c: &str, k: &str| -> u64 {
        let line = c
            .lines()
            .find(|l| l.starts_with("files iomap "))
            .unwrap_or_else(|| panic!("no iomap line:\n{c}"));
        line.split_whitespace()
            .find_map(|w| {
                w.strip_prefix(&format!("{k}="))
                    .and_then(|v| v.parse().ok())
            })
            .unwrap_or_else(|| panic!("no {k}= in {line}"))
    };
    for (name, run) in [("on", &on), ("off", &off)] {
        let line = run.console.lines().find(|l| l.starts_with("files iomap "));
        eprintln!("simple path {name}: {}", line.unwrap_or("-"));
    }
    assert!(iomap(&on.console, "simple") > 0, "{}", on.console);
    assert_eq!(iomap(&off.console, "simple"), 0, "{}", off.console);
    // The same reads: every one the simple path took went generic instead
    // (a fallback counts as generic in both runs).
    assert_eq!(
        iomap(&off.console, "generic"),
        iomap(&on.console, "generic") + iomap(&on.console, "simple"),
        "{}\n{}",
        on.console,
        off.console
    );
    assert!(off.console.contains("simple path off (dio.simple=0)"));
    let bad = boot(&config(Some(&img), &["selftest=files", "dio.simple=2"]));
    assert_eq!(bad.status, 2);
}

#[test]
fn a_damaged_file_is_reported_and_the_others_stay_readable() {
    let dir = TempDir::new("files-damaged");
    let src = dir.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("good-1"), vec![7u8; 10_000]).unwrap();
    std::fs::write(src.join("bad"), vec![8u8; 10_000]).unwrap();
    std::fs::write(src.join("good-2"), b"hello").unwrap();
    let img = dir.path().join("fs.img");
    fstool::mkfs(&img, &src, None, 4096, "").unwrap();
    // Flip a byte in the inode of /bad (its checksum then fails).
    let dev = fstool::FileDevice::open(&img).unwrap();
    let fs = dioxide_dxfs::Fs::mount(&dev).unwrap();
    let ino = fs.resolve("/bad").unwrap();
    let sb = fs.superblock().clone();
    let mut bytes = std::fs::read(&img).unwrap();
    let off = sb.itable_start as usize * 4096 + (ino as usize - 1) * 256 + 8;
    bytes[off] ^= 0x10;
    std::fs::write(&img, &bytes).unwrap();
    let (status, got, console) = kernel_files(&img, 512);
    assert_eq!(status, 1, "console:\n{console}");
    assert!(got["/bad"].contains("error=corrupt inode"), "{got:?}");
    assert!(got["/good-1"].starts_with("10000 sha256="), "{got:?}");
    assert!(got["/good-2"].starts_with("5 sha256="), "{got:?}");
    assert!(console.contains("files done count=2 errors=1"));
}

#[test]
fn a_namespace_without_dxfs_is_a_clear_error() {
    let dir = TempDir::new("files-nofs");
    let img = dir.path().join("random.img");
    random_image(&img, 1 << 20, 5);
    let (status, _, console) = kernel_files(&img, 512);
    assert_eq!(status, 1);
    assert!(
        console.contains("nvme0n1 holds no usable dxfs: corrupt superblock at block 0: bad magic"),
        "{console}"
    );
}

trait DigestBytes {
    fn digest_bytes(d: &[u8]) -> Vec<u8>;
}
impl DigestBytes for sha2::Sha256 {
    fn digest_bytes(d: &[u8]) -> Vec<u8> {
        use sha2::Digest;
        sha2::Sha256::digest(d).to_vec()
    }
}
