//! Every drive, every namespace: two NVMe controllers, the second with a
//! 512-byte namespace, a 4096-byte namespace and one formatted with
//! metadata (which the driver must refuse by name and leave out), on two
//! CPUs. The self-tests cover each namespace, and the NBD service exports
//! each raw and the files of each filesystem, with reads issued on the
//! storage core.

use dioxide_qemu::{Config, Namespace};
use dioxide_tests::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

struct Disks {
    _dir: TempDir,
    /// nvme0n1: dxfs (`a.txt`, `sub/big.bin`).
    fs0: PathBuf,
    /// nvme1n1: dxfs (`b.bin`).
    fs1: PathBuf,
    /// nvme1n2: raw random bytes, 4096-byte blocks.
    raw4k: PathBuf,
    src0: PathBuf,
    src1: PathBuf,
    metadata: PathBuf,
}

fn disks(name: &str) -> Disks {
    let dir = TempDir::new(name);
    let src0 = dir.path().join("src0");
    let src1 = dir.path().join("src1");
    std::fs::create_dir_all(src0.join("sub")).unwrap();
    std::fs::create_dir_all(&src1).unwrap();
    std::fs::write(src0.join("a.txt"), b"nvme0n1's own file\n").unwrap();
    let mut rng = dioxide_testkit::Rng::new(7);
    let big: Vec<u8> = (0..300_000).map(|_| rng.next_u64() as u8).collect();
    std::fs::write(src0.join("sub/big.bin"), &big).unwrap();
    let b: Vec<u8> = (0..123_457).map(|_| rng.next_u64() as u8).collect();
    std::fs::write(src1.join("b.bin"), &b).unwrap();
    let fs0 = dir.path().join("fs0.img");
    let fs1 = dir.path().join("fs1.img");
    dioxide::fstool::mkfs(&fs0, &src0, Some(8 << 20), 4096, "zero").unwrap();
    dioxide::fstool::mkfs(&fs1, &src1, Some(8 << 20), 4096, "one").unwrap();
    let raw4k = dir.path().join("raw4k.img");
    random_image(&raw4k, 4 << 20, 99);
    let metadata = dir.path().join("md.img");
    random_image(&metadata, 1 << 20, 5);
    Disks {
        _dir: dir,
        fs0,
        fs1,
        raw4k,
        src0,
        src1,
        metadata,
    }
}

/// nvme0n1 = fs0; nvme1n1 = fs1, nvme1n2 = raw4k (4K blocks), nvme1n3 =
/// metadata (8 bytes per block: refused); two CPUs.
fn two_controllers(d: &Disks, args: &[&str]) -> Config {
    let mut cfg = config(Some(&d.fs0), args);
    cfg.add_disk(&d.fs1);
    let mut ns = Namespace::new(&d.raw4k);
    ns.lbs = 4096;
    cfg.nvme[1].namespaces.push(ns);
    let mut md = Namespace::new(&d.metadata);
    md.ms = 8;
    cfg.nvme[1].namespaces.push(md);
    cfg.smp = 2;
    cfg
}

fn assert_refused_metadata(console: &str) {
    assert!(
        console.contains("nvme1n3: namespace 3: 8 bytes of metadata per block"),
        "no refusal of the metadata namespace:\n{console}"
    );
}

#[test]
fn digest_of_every_namespace_on_two_controllers() {
    let d = disks("disks-digest");
    for completion in ["poll", "irq"] {
        let cfg = two_controllers(
            &d,
            &["selftest=digest", &format!("nvme.completion={completion}")],
        );
        let out = boot(&cfg);
        assert_eq!(out.status, 0, "console:\n{}", out.console);
        let lines: Vec<&str> = out
            .result_lines()
            .filter(|l| l.starts_with("digest "))
            .collect();
        let want = |name: &str, img: &Path| {
            format!(
                "digest {name} bytes={} sha256={}",
                std::fs::metadata(img).unwrap().len(),
                sha256_file(img)
            )
        };
        // One line per namespace, in controller then namespace order; the
        // refused one has none.
        assert_eq!(
            lines,
            [
                want("nvme0n1", &d.fs0),
                want("nvme1n1", &d.fs1),
                want("nvme1n2", &d.raw4k)
            ],
            "console:\n{}",
            out.console
        );
        assert_refused_metadata(&out.console);
        assert!(out
            .console
            .contains("nvme1n2: 4 MiB (4096-byte blocks), 2 I/O queue(s)"));
        assert!(out.console.contains("smp: 2 of 2 CPUs online"));
    }
}

#[test]
fn files_and_rw_on_every_namespace() {
    let d = disks("disks-files");
    let out = boot(&two_controllers(&d, &["selftest=files"]));
    assert_eq!(out.status, 0, "console:\n{}", out.console);
    let file = |prefix: &str, src: &Path, rel: &str| {
        let path = src.join(rel);
        format!(
            "file {prefix}/{rel} bytes={} sha256={}",
            std::fs::metadata(&path).unwrap().len(),
            sha256_file(&path)
        )
    };
    for want in [
        file("", &d.src0, "a.txt"),
        file("", &d.src0, "sub/big.bin"),
        file("/nvme1n1", &d.src1, "b.bin"),
    ] {
        assert!(
            out.console.lines().any(|l| l == want),
            "no {want:?}:\n{}",
            out.console
        );
    }
    assert!(out.console.contains("files done count=3"));
    assert!(out.console.contains("nvme1n2 holds no usable dxfs"));
    // The write test on every namespace, 512 and 4096-byte blocks, restores
    // what it overwrote.
    let out = boot(&two_controllers(
        &d,
        &["selftest=rw", "nvme.completion=irq", "rw.blocks=64"],
    ));
    assert_eq!(out.status, 0, "console:\n{}", out.console);
    assert!(out.result_lines().any(|l| l == "rw ok"));
    for name in ["nvme0n1", "nvme1n1", "nvme1n2"] {
        assert!(
            out.console
                .contains(&format!("rw: {name}: original contents restored")),
            "{name}:\n{}",
            out.console
        );
    }
}

fn run(cmd: &mut Command) -> (bool, Vec<u8>, String) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e} (the test command installs libnbd-bin)"));
    (
        out.status.success(),
        out.stdout,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn nbd_exports_every_namespace_from_two_cores() {
    let d = disks("disks-nbd");
    // Interrupt completion: the storage core serves the reads (by default
    // it does only then; see kernel/src/net/storage.rs).
    let mut cfg = two_controllers(&d, &["nvme.completion=irq"]);
    cfg.timeout = Some(Duration::from_secs(600));
    let app = dioxide::nbdbench::boot(cfg, dioxide::nbdbench::NetMode::User)
        .unwrap_or_else(|e| panic!("{e}"));
    let url = app.url.clone();
    let (ok, out, err) = run(Command::new("nbdinfo").args(["--list", &url]));
    assert!(ok, "{err}");
    let list = String::from_utf8_lossy(&out);
    for e in [
        "a.txt",
        "sub/big.bin",
        "nvme1n1/b.bin",
        "nvme0n1",
        "nvme1n1",
        "nvme1n2",
    ] {
        assert!(
            list.contains(&format!("export=\"{e}\"")),
            "{e} missing:\n{list}"
        );
    }
    assert!(!list.contains("export=\"nvme1n3\""), "{list}");
    // Every raw namespace and every file, byte for byte.
    let cases: [(&str, Vec<u8>); 6] = [
        ("nvme0n1", std::fs::read(&d.fs0).unwrap()),
        ("nvme1n1", std::fs::read(&d.fs1).unwrap()),
        ("nvme1n2", std::fs::read(&d.raw4k).unwrap()),
        ("a.txt", std::fs::read(d.src0.join("a.txt")).unwrap()),
        (
            "sub/big.bin",
            std::fs::read(d.src0.join("sub/big.bin")).unwrap(),
        ),
        (
            "nvme1n1/b.bin",
            std::fs::read(d.src1.join("b.bin")).unwrap(),
        ),
    ];
    for (name, want) in &cases {
        let (ok, got, err) = run(Command::new("nbdcopy").args([&format!("{url}/{name}"), "-"]));
        assert!(ok, "{name}: {err}");
        assert!(
            &got == want,
            "{name}: {} bytes differ from {}",
            got.len(),
            want.len()
        );
    }
    // The 4K namespace announces its block size.
    let (ok, out, err) = run(Command::new("nbdinfo").arg(format!("{url}/nvme1n2")));
    assert!(ok, "{err}");
    let info = String::from_utf8_lossy(&out);
    assert!(info.contains("block_size_minimum: 4096"), "{info}");
    let console = app.guest.console();
    assert!(
        console.contains("reads issued on storage cores 1..1"),
        "{console}"
    );
    assert_refused_metadata(&console);
    assert_reads_handed_over(&app.guest);
}

/// Waits for the storage cores' report (`nbd: storage cores: N reads handed
/// over, ...`, logged when the service goes idle after the clients left)
/// and checks that reads were handed over (N > 0 in all): the start-up line
/// `reads issued on storage cores` says only that they could be.
fn assert_reads_handed_over(guest: &dioxide_qemu::Guest) {
    let t0 = std::time::Instant::now();
    loop {
        let c = guest.console();
        let handed: u64 = c
            .lines()
            .filter_map(|l| {
                let rest = &l[l.find("storage cores: ")? + "storage cores: ".len()..];
                rest.split_once(" reads handed over")?.0.parse::<u64>().ok()
            })
            .sum();
        if handed > 0 {
            eprintln!("storage cores: {handed} reads handed over");
            return;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "no reads handed over to a storage core:\n{c}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A controller that grants fewer I/O queues than there are cores (QEMU
/// `max_ioqpairs=1`, two CPUs): the cores share the one queue; the
/// no-allocation test runs on the core that owns it, and the NBD service's
/// storage core reads through the shared queue.
#[test]
fn fewer_queues_than_cores_are_shared() {
    let d = disks("disks-shared");
    let shared = |args: &[&str]| {
        let mut cfg = config(None, args);
        cfg.smp = 2;
        cfg.timeout = Some(Duration::from_secs(600));
        cfg.extra = [
            "-drive".to_string(),
            format!(
                "file={},if=none,id=nvm0,format=raw,readonly=on",
                d.fs0.to_string_lossy().replace(',', ",,")
            ),
            "-device".to_string(),
            "nvme,drive=nvm0,serial=shared0,max_ioqpairs=1".to_string(),
        ]
        .to_vec();
        cfg
    };
    let out = boot(&shared(&["selftest=noalloc", "nvme.completion=irq"]));
    assert_eq!(out.status, 0, "console:\n{}", out.console);
    assert!(
        out.console.contains("cores share queues"),
        "{}",
        out.console
    );
    assert!(out
        .result_lines()
        .any(|l| l == "noalloc on 1 of 2 cores: the controller granted 1 queue(s)"));
    assert!(out.result_lines().any(|l| l == "noalloc ok"));
    let app = dioxide::nbdbench::boot(
        shared(&["nvme.completion=irq"]),
        dioxide::nbdbench::NetMode::User,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    for (name, want) in [
        ("nvme0n1", std::fs::read(&d.fs0).unwrap()),
        (
            "sub/big.bin",
            std::fs::read(d.src0.join("sub/big.bin")).unwrap(),
        ),
    ] {
        let (ok, got, err) =
            run(Command::new("nbdcopy").args([&format!("{}/{name}", app.url), "-"]));
        assert!(ok, "{name}: {err}");
        assert!(got == want, "{name}: bytes differ");
    }
    assert!(app
        .guest
        .console()
        .contains("reads issued on storage cores 1..1"));
    assert_reads_handed_over(&app.guest);
}
