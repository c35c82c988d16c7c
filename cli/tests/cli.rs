//! The `dioxide` command line: bad input gets a clear message and a non-zero
//! exit before anything boots.

use std::path::Path;
use std::process::Command;

fn dioxide(args: &[&str]) -> (i32, String) {
    let (code, _, err) = dioxide_out(args);
    (code, err)
}

fn temp(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("dioxide-cli-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn missing_disk_image() {
    let (code, err) = dioxide(&["run", "--disk", "/nonexistent/disk.img", "--accel", "tcg"]);
    assert_eq!(code, 2);
    assert!(
        err.contains("disk image /nonexistent/disk.img: No such file or directory"),
        "{err}"
    );
}

#[test]
fn empty_disk_image() {
    let d = temp("empty");
    let img = d.join("empty.img");
    std::fs::write(&img, b"").unwrap();
    let (code, err) = dioxide(&["run", "--disk", img.to_str().unwrap(), "--accel", "tcg"]);
    assert_eq!(code, 2);
    assert!(err.contains("is empty (0 bytes)"), "{err}");
    let _ = std::fs::remove_dir_all(d);
}

#[test]
fn image_not_a_multiple_of_the_block_size() {
    let d = temp("odd");
    let img = d.join("odd.img");
    std::fs::write(&img, vec![0u8; 4096 + 512]).unwrap();
    let (code, err) = dioxide(&[
        "run",
        "--disk",
        img.to_str().unwrap(),
        "--nvme-lbs",
        "4096",
        "--accel",
        "tcg",
    ]);
    assert_eq!(code, 2);
    assert!(
        err.contains("is not a multiple of the 4096-byte logical block size"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(d);
}

#[test]
fn bad_block_size_option() {
    let (code, err) = dioxide(&["run", "--nvme-lbs", "1000"]);
    assert_eq!(code, 2);
    assert!(err.contains("must be 512 or 4096"), "{err}");
}

/// Bad sweep lists of the benchmarks are refused before anything is built
/// or booted.
#[test]
fn bad_bench_lists() {
    for (args, want) in [
        (
            &["bench", "local", "--smp", "1,0"][..],
            "--smp 1,0: CPU counts from 1 to 64",
        ),
        (&["bench", "local", "--dbbuf", "2"], "--dbbuf 2: 0 and/or 1"),
        (
            &["bench", "nbd", "--ioeventfd", "maybe"],
            "--ioeventfd maybe: 0 and/or 1",
        ),
        (
            &["bench", "nbd", "--smp", "x"],
            "--smp x: CPU counts from 1 to 64",
        ),
        (
            &["bench", "nbd", "--nic", "igb,e1000"],
            "--nic igb,e1000: virtio and/or igb, comma-separated",
        ),
        (
            &["bench", "nbd", "--nic", "virtio,igb", "--mtu", "1500,9000"],
            "--mtu 9000 with --nic igb: the kernel's igb driver runs at MTU 1500",
        ),
        (
            &["bench", "local", "--host-threads", "0"],
            "--host-threads 0: thread counts from 1 to 64, auto or none",
        ),
    ] {
        let (code, err) = dioxide(args);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: {err}");
    }
}

/// `bench nbd --remote`: an address nobody answers at, a URI that is not
/// the appliance's address, and options that only shape a boot are refused
/// at once, in words, with exit status 2 (nothing booted, no fio run).
#[test]
fn bench_nbd_remote_refuses_what_it_cannot_reach_or_read() {
    // A port that was free a moment ago: nothing listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let remote = format!("nbd://127.0.0.1:{port}");
    let refused = format!(
        "--remote {remote}: cannot connect to 127.0.0.1:{port}: connection refused: nothing listens on that port"
    );
    for (args, want) in [
        (&["bench", "nbd", "--remote", &remote][..], refused.as_str()),
        (
            &["bench", "nbd", "--remote", "192.168.1.20"],
            "--remote 192.168.1.20: not an nbd:// URI; expected nbd://HOST[:PORT]",
        ),
        (
            &["bench", "nbd", "--remote", "nbd://host:99999"],
            "port \"99999\" is not a port number",
        ),
        (
            &["bench", "nbd", "--remote", "nbd://host/bench.bin"],
            "--remote nbd://host/bench.bin: it names an export",
        ),
        (
            &["bench", "nbd", "--remote", &remote, "--peer", "ftp://x"],
            "--peer ftp://x: not an NBD URI",
        ),
        (
            &[
                "bench",
                "nbd",
                "--remote",
                &remote,
                "--targets",
                "file,qemu-nbd",
            ],
            "--targets qemu-nbd: with --remote there is no local image to serve",
        ),
        (
            &["bench", "nbd", "--remote", &remote, "--smp", "2"],
            "--smp configures a boot: with --remote nothing is booted",
        ),
        (
            &["bench", "nbd", "--remote", &remote, "--net", "tap"],
            "'--remote <URI>' cannot be used with '--net <NET>'",
        ),
        (
            &["bench", "nbd", "--remote", &remote, "--nic", "igb"],
            "'--remote <URI>' cannot be used with '--nic <LIST>'",
        ),
        (
            &["bench", "nbd", "--peer", "nbd://h/x"],
            "required arguments were not provided",
        ),
    ] {
        let (code, err) = dioxide(args);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: {err}");
    }
}

/// How long one command may take: a `dioxide run` that should fail before
/// booting but boots instead (serving until killed), or a client waiting on
/// a stuck appliance, fails the test rather than hanging it.
const COMMAND_LIMIT: std::time::Duration = std::time::Duration::from_secs(600);

/// Runs `cmd` (killed after [`COMMAND_LIMIT`], failing the test): exit
/// code, stdout, stderr.
fn output_within(mut cmd: Command) -> (i32, Vec<u8>, String) {
    let (status, out, err) = dioxide_testkit::run_within(&mut cmd, COMMAND_LIMIT);
    (status.code().unwrap_or(-1), out, err)
}

/// Runs `dioxide` (bounded): exit code, stdout, stderr.
fn dioxide_out(args: &[&str]) -> (i32, Vec<u8>, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_dioxide"));
    cmd.args(args);
    output_within(cmd)
}

/// Runs `dioxide mkfs IMG --from SRC` and then `extra` (bounded): exit
/// code, stdout, stderr.
fn mkfs_from(img: &Path, src: &Path, extra: &[&str]) -> (i32, Vec<u8>, String) {
    let mut args = vec![
        "mkfs",
        img.to_str().unwrap(),
        "--from",
        src.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    dioxide_out(&args)
}

#[test]
fn mkfs_fsck_ls_cat_round_trip() {
    let d = temp("mkfs");
    let src = d.join("src");
    std::fs::create_dir_all(src.join("sub/deeper")).unwrap();
    std::fs::write(src.join("a.txt"), b"hello\n").unwrap();
    std::fs::write(src.join("sub/empty"), b"").unwrap();
    let big: Vec<u8> = (0..1_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(src.join("sub/deeper/big.bin"), &big).unwrap();
    let sparse = std::fs::File::create(src.join("sparse")).unwrap();
    sparse.set_len(50 << 20).unwrap();
    drop(sparse);
    let img = d.join("fs.img");
    let (code, _, err) = mkfs_from(&img, &src, &[]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("4 files, 3 directories"), "{err}");
    // The 50 MiB hole is not stored.
    assert!(std::fs::metadata(&img).unwrap().len() < 4 << 20);
    let (code, out, _) = dioxide_out(&["fsck", img.to_str().unwrap()]);
    assert_eq!(code, 0, "{}", String::from_utf8_lossy(&out));
    assert!(String::from_utf8_lossy(&out).contains("clean"));
    let (code, out, _) = dioxide_out(&["ls", img.to_str().unwrap(), "/"]);
    assert_eq!(code, 0);
    let ls = String::from_utf8_lossy(&out);
    assert!(
        ls.contains(" a.txt") && ls.contains(" sparse") && ls.contains(" sub/"),
        "{ls}"
    );
    assert!(ls.contains("52428800 sparse"), "{ls}");
    let (code, out, _) = dioxide_out(&["cat", img.to_str().unwrap(), "/sub/deeper/big.bin"]);
    assert_eq!(code, 0);
    assert!(out == big);
    let (code, out, _) = dioxide_out(&["cat", img.to_str().unwrap(), "sparse"]);
    assert_eq!(code, 0);
    assert_eq!(out.len(), 50 << 20);
    assert!(out.iter().all(|&b| b == 0));
    let (code, _, err) = dioxide_out(&["cat", img.to_str().unwrap(), "/nope"]);
    assert_eq!(code, 2);
    assert!(err.contains("/nope: no such file or directory"), "{err}");
    // Damage: fsck finds it and exits 4.
    let mut bytes = std::fs::read(&img).unwrap();
    bytes[4096 + 40] ^= 0xff; // inside the bitmap block
    std::fs::write(&img, &bytes).unwrap();
    let (code, out, _) = dioxide_out(&["fsck", img.to_str().unwrap()]);
    assert_eq!(code, 4, "{}", String::from_utf8_lossy(&out));
    assert!(String::from_utf8_lossy(&out).contains("corrupt block bitmap at block 1: bad checksum"));
    let (code, _, _) = dioxide_out(&["fsck", "/nonexistent.img"]);
    assert_eq!(code, 8);
    let _ = std::fs::remove_dir_all(d);
}

/// `mkfs --volume NAME:SIZE`: sparse files with room for them in the
/// image (which is itself sparse on the host); the write path fills them
/// (the volume takes allocating writes and fsck stays clean); refusals
/// named.
#[test]
fn mkfs_makes_sparse_volumes_with_room_to_fill_them() {
    let d = temp("mkfs-volume");
    let src = d.join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("a.txt"), b"hello\n").unwrap();
    let img = d.join("fs.img");
    let (code, _, err) = mkfs_from(&img, &src, &["--volume", "vol:64M", "--volume", "small:8K"]);
    assert_eq!(code, 0, "{err}");
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(&img).unwrap();
    assert!(
        meta.len() > 64 << 20,
        "the image has room for the volume's blocks"
    );
    assert!(
        meta.blocks() * 512 < 16 << 20,
        "{} bytes allocated on the host: the free space is a hole",
        meta.blocks() * 512
    );
    let (code, out, _) = dioxide_out(&["fsck", img.to_str().unwrap()]);
    assert_eq!(code, 0, "{}", String::from_utf8_lossy(&out));
    let (code, out, _) = dioxide_out(&["ls", img.to_str().unwrap(), "/"]);
    assert_eq!(code, 0);
    let ls = String::from_utf8_lossy(&out);
    assert!(
        ls.contains("67108864 vol") && ls.contains("8192 small") && ls.contains(" a.txt"),
        "{ls}"
    );
    let (code, out, _) = dioxide_out(&["cat", img.to_str().unwrap(), "/small"]);
    assert_eq!((code, out), (0, vec![0u8; 8192]));
    // A hole, and the write path fills all of it: the image has the room.
    {
        let dev = dioxide::fstool::FileDevice::open_with(&img, true).unwrap();
        let mut w = dioxide_dxfs::WritableFs::mount(dev).unwrap();
        let ino = w.fs().resolve("/vol").unwrap();
        assert!(matches!(
            w.file(ino).unwrap().map(0),
            dioxide_dxfs::Mapping::Hole { .. }
        ));
        let chunk = vec![0x5au8; 1 << 20];
        for k in 0..64u64 {
            w.write(ino, k << 20, &chunk, false).unwrap();
        }
        w.commit().unwrap();
    }
    let (code, out, _) = dioxide_out(&["fsck", img.to_str().unwrap()]);
    assert_eq!(code, 0, "{}", String::from_utf8_lossy(&out));
    let (_, out, _) = dioxide_out(&["cat", img.to_str().unwrap(), "/vol"]);
    assert!(out.len() == 64 << 20 && out.iter().all(|&b| b == 0x5a));
    // Only volumes: no --from.
    let img2 = d.join("vols.img");
    let (code, _, err) = dioxide_out(&["mkfs", img2.to_str().unwrap(), "--volume", "v:1M"]);
    assert_eq!(code, 0, "{err}");
    // Refusals.
    for (extra, why) in [
        (vec!["--volume", "vol:1000"], "multiple of 4 KiB"),
        (vec!["--volume", "a/b:1M"], "one path component"),
        (vec!["--volume", "novalue"], "NAME:SIZE"),
        (vec!["--volume", "a.txt:1M"], "already has an entry"),
        (
            vec!["--volume", "v:1M", "--volume", "v:2M"],
            "already has an entry",
        ),
        (
            vec!["--block-size", "65536", "--volume", "v:4K"],
            "not a multiple of the block size (65536)",
        ),
    ] {
        let (code, _, err) = mkfs_from(&d.join("bad.img"), &src, &extra);
        assert_eq!(code, 2, "{extra:?}: {err}");
        assert!(err.contains(why), "{extra:?}: {err}");
    }
    let (code, _, err) = dioxide_out(&["mkfs", d.join("none.img").to_str().unwrap()]);
    assert_eq!(code, 2, "{err}");
    let _ = std::fs::remove_dir_all(d);
}

#[test]
fn mkfs_refuses_a_size_too_small_and_bad_block_sizes() {
    let d = temp("mkfs-small");
    let src = d.join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("f"), vec![1u8; 3 << 20]).unwrap();
    let img = d.join("fs.img");
    let (code, _, err) = mkfs_from(&img, &src, &["--size", "1M"]);
    assert_eq!(code, 2);
    assert!(err.contains("blocks but the image has 256"), "{err}");
    let (code, _, err) = mkfs_from(&img, &src, &["--block-size", "2048"]);
    assert_eq!(code, 2);
    assert!(err.contains("block size 2048"), "{err}");
    let (code, _, err) = mkfs_from(&img, Path::new("/nonexistent-dir"), &[]);
    assert_ne!(code, 0);
    assert!(err.contains("/nonexistent-dir"), "{err}");
    let _ = std::fs::remove_dir_all(d);
}

/// `dioxide run` started the way a user starts it, killed by the test (its
/// QEMU dies with it: PR_SET_PDEATHSIG).
struct Running {
    child: std::process::Child,
    out: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Running {
    fn start(args: &[&str]) -> Running {
        use std::io::Read;
        let mut child = Command::new(env!("CARGO_BIN_EXE_dioxide"))
            .args(["run", "--accel", "tcg", "--mem", "256", "--timeout", "600"])
            .args(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run dioxide");
        let out = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        for mut pipe in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let out = out.clone();
            std::thread::spawn(move || {
                let mut b = [0u8; 4096];
                while let Ok(n) = pipe.read(&mut b) {
                    if n == 0 {
                        break;
                    }
                    out.lock()
                        .unwrap()
                        .push_str(&String::from_utf8_lossy(&b[..n]));
                }
            });
        }
        Running { child, out }
    }

    fn wait_for(&mut self, what: &str) {
        let t0 = std::time::Instant::now();
        loop {
            let o = self.out.lock().unwrap().clone();
            if o.contains(what) {
                return;
            }
            let exited = self.child.try_wait().ok().flatten();
            assert!(
                exited.is_none() && t0.elapsed().as_secs() < 300,
                "no {what:?} (exit {exited:?}):\n{o}"
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }
}

fn free_port() -> u16 {
    dioxide_qemu::free_port().expect("a free port")
}

/// An NBD client command (bounded); its stdout, which must succeed.
/// (`./dx test` installs libnbd-bin.)
fn nbd(args: &[&str]) -> Vec<u8> {
    let mut cmd = Command::new(args[0]);
    cmd.args(&args[1..]);
    let (code, out, err) = output_within(cmd);
    assert_eq!(code, 0, "{args:?}: {err}");
    out
}

#[test]
fn run_serves_the_sample_tree_without_a_disk() {
    let port = free_port().to_string();
    let mut r = Running::start(&["--nbd-port", &port]);
    r.wait_for("dioxide: NBD exports at");
    let url = format!("nbd://127.0.0.1:{port}");
    let list = String::from_utf8(nbd(&["nbdinfo", "--list", &url])).unwrap();
    for name in [
        "README.txt",
        "hello.txt",
        "data/random-8m.bin",
        "data/odd-size.bin",
        "data/sparse-16m.bin",
        "nvme0n1",
    ] {
        assert!(
            list.contains(&format!("export=\"{name}\"")),
            "{name}:\n{list}"
        );
    }
    assert_eq!(
        nbd(&["nbdcopy", &format!("{url}/hello.txt"), "-"]),
        b"hello from dioxide\n"
    );
    let readme = nbd(&["nbdcopy", &format!("{url}/README.txt"), "-"]);
    assert!(String::from_utf8_lossy(&readme).contains("dioxide run --from DIR"));
    assert_eq!(
        nbd(&["nbdcopy", &format!("{url}/data/odd-size.bin"), "-"]).len(),
        100_003
    );
}

#[test]
fn run_from_a_directory_serves_its_files() {
    let d = temp("from");
    let src = d.join("tree");
    std::fs::create_dir_all(src.join("sub dir")).unwrap();
    std::fs::write(src.join("a.txt"), b"first file\n").unwrap();
    let big: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(src.join("sub dir/b.bin"), &big).unwrap();
    let port = free_port().to_string();
    let mut r = Running::start(&["--nbd-port", &port, "--from", src.to_str().unwrap()]);
    r.wait_for("dioxide: NBD exports at");
    let url = format!("nbd://127.0.0.1:{port}");
    assert_eq!(
        nbd(&["nbdcopy", &format!("{url}/a.txt"), "-"]),
        b"first file\n"
    );
    assert!(nbd(&["nbdcopy", &format!("{url}/sub%20dir/b.bin"), "-"]) == big);
    let (code, err) = dioxide(&["run", "--from", "/nonexistent/dir", "--accel", "tcg"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("not a directory"), "{err}");
    let (code, err) = dioxide(&["run", "--from", "/tmp", "--disk", "/tmp/x.img"]);
    assert_eq!(code, 2, "{err}");
    let _ = std::fs::remove_dir_all(&d);
}

/// The kernel ELF, built once per test binary.
fn kernel() -> std::path::PathBuf {
    static K: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    K.get_or_init(|| dioxide::kernel::build().unwrap_or_else(|e| panic!("{e}")))
        .clone()
}

/// A directory with a small random disk image in it: (image, directory).
fn small_disk(name: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let d = temp(name);
    let img = d.join("disk.img");
    dioxide::image::write_random(&img, 4 << 20, 5).unwrap();
    (img, d)
}

/// `dioxide run` with the given kernel and disk on TCG, NBD on a free port
/// (10809 may be taken); exit code, stdout (the console), stderr, and how
/// long it took.
fn run_status(
    kernel: &std::path::Path,
    img: &std::path::Path,
    args: &[&str],
) -> (i32, String, String, std::time::Duration) {
    let port = free_port().to_string();
    let t0 = std::time::Instant::now();
    let (code, out, err) = dioxide_out(
        &[
            &[
                "run",
                "--accel",
                "tcg",
                "--mem",
                "256",
                "--nbd-port",
                &port,
                "--kernel",
                kernel.to_str().unwrap(),
                "--disk",
                img.to_str().unwrap(),
            ],
            args,
        ]
        .concat(),
    );
    (
        code,
        String::from_utf8_lossy(&out).into_owned(),
        err,
        t0.elapsed(),
    )
}

/// Exit 124: a guest that does not finish (the appliance serving forever)
/// is killed at `--timeout`.
#[test]
fn exit_124_when_the_guest_outlives_the_timeout() {
    let (img, d) = small_disk("timeout");
    let (code, _, err, took) = run_status(&kernel(), &img, &["--timeout", "1"]);
    assert_eq!(code, 124, "{err}");
    assert!(err.contains("timed out after 1 s; QEMU killed"), "{err}");
    assert!(took.as_secs() < 60, "took {took:?}");
    let _ = std::fs::remove_dir_all(d);
}

/// Bad `--disk` options are refused before anything boots, naming the
/// value; every image is checked against its own block size.
#[test]
fn bad_disk_specs_are_refused() {
    let (img, d) = small_disk("specs");
    let i = img.to_str().unwrap();
    for (spec, want) in [
        (format!("{i},lbs=1024"), "lbs=1024: 512 or 4096"),
        (
            format!("{i},ctrl=1"),
            "ctrl=1, but only 0 controller(s) so far",
        ),
        (format!("{i},size=1"), "unknown option \"size\""),
    ] {
        let (code, err) = dioxide(&["run", "--accel", "tcg", "--disk", &spec]);
        assert_eq!(code, 2, "{spec}: {err}");
        assert!(err.contains(&format!("--disk {spec}: {want}")), "{err}");
    }
    let odd = d.join("odd.img");
    std::fs::write(&odd, vec![0u8; 4096 + 512]).unwrap();
    let odd_spec = format!("{},ctrl=0,lbs=4096", odd.to_str().unwrap());
    let (code, err) = dioxide(&["run", "--accel", "tcg", "--disk", i, "--disk", &odd_spec]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("is not a multiple of the 4096-byte logical block size"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(d);
}

/// Two controllers, the second with three namespaces (one with 4096-byte
/// blocks, one with 8 metadata bytes per block), ioeventfd on: QEMU takes
/// the devices and the kernel boots (the calibration self-test ends before
/// the NVMe driver starts, so this holds whatever the driver makes of them).
#[test]
fn several_controllers_and_namespaces_boot() {
    let (img, d) = small_disk("multi");
    let (b, c, m) = (d.join("b.img"), d.join("c.img"), d.join("m.img"));
    for p in [&b, &c, &m] {
        dioxide::image::write_random(p, 1 << 20, 6).unwrap();
    }
    let c_spec = format!("{},ctrl=1,lbs=4096", c.to_str().unwrap());
    let m_spec = format!("{},ctrl=1,ms=8", m.to_str().unwrap());
    let (code, out, err, _) = run_status(
        &kernel(),
        &img,
        &[
            "--disk",
            b.to_str().unwrap(),
            "--disk",
            &c_spec,
            "--disk",
            &m_spec,
            "--nvme-ioeventfd",
            "--timeout",
            "120",
            "--selftest",
            "calibrate",
        ],
    );
    assert_eq!(code, 0, "{out}\n{err}");
    for name in [
        "nvme0n1 ",
        "nvme1n1 ",
        "nvme1n2 ",
        "nvme1n3 ",
        "(1 MiB, 4096-byte blocks, aio=",
        "(1 MiB, 512-byte blocks + 8 metadata bytes, aio=",
        "NVMe ioeventfd on",
    ] {
        assert!(err.contains(name), "{name}: {err}");
    }
    let _ = std::fs::remove_dir_all(d);
}

/// Exit 125: QEMU refuses to start (here: the "kernel" is not a kernel);
/// QEMU's message is passed on.
#[test]
fn exit_125_when_qemu_fails() {
    let (img, d) = small_disk("qemu-fails");
    let not_a_kernel = d.join("not-a-kernel");
    std::fs::write(&not_a_kernel, b"hello\n").unwrap();
    let (code, _, err, _) = run_status(&not_a_kernel, &img, &["--timeout", "60"]);
    assert_eq!(code, 125, "{err}");
    assert!(err.contains("qemu failed (exit status 1)"), "{err}");
    assert!(err.contains("invalid kernel header"), "{err}");
    let _ = std::fs::remove_dir_all(d);
}

/// Exit 5: a kernel panic (`--selftest panic`) is reported on the console
/// and is the CLI's exit status.
#[test]
fn exit_5_on_a_kernel_panic() {
    let (img, d) = small_disk("panic");
    let (code, out, err, _) = run_status(
        &kernel(),
        &img,
        &["--timeout", "120", "--selftest", "panic"],
    );
    assert_eq!(code, 5, "{out}\n{err}");
    assert!(
        out.contains("PANIC: panicked at") && out.contains("selftest=panic: deliberate panic"),
        "{out}"
    );
    assert!(out.contains("dioxide: power off status=5"), "{out}");
    let _ = std::fs::remove_dir_all(d);
}

/// `dioxide image`: a hybrid ISO (El Torito BIOS and UEFI entries, MBR and
/// GPT) whose command line reaches the kernel under SeaBIOS and under OVMF
/// (booted with `run --iso`), characters with meaning to GRUB's script
/// parser (`$ ; { } #`) unchanged, quotes and backslashes as GRUB passes
/// them. Without grub-mkrescue on the PATH the message names its package.
#[test]
fn image_is_a_hybrid_iso_whose_cmdline_reaches_the_kernel() {
    let (img, d) = small_disk("image");
    let iso = d.join("dioxide.iso");
    let (iso_s, k) = (iso.to_str().unwrap(), kernel());
    let k = k.to_str().unwrap();
    let cmdline = r#"selftest=calibrate log=info x=$HOME;y {c} #d 'q="a\b' ünï"#;
    let (code, _, err) = dioxide_out(&[
        "image",
        "--out",
        iso_s,
        "--kernel",
        k,
        "--menu-timeout",
        "0",
        "--cmdline",
        cmdline,
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains(&format!("wrote {iso_s}")), "{err}");
    assert!(err.contains("do not reach the kernel as written"), "{err}");

    let mut cmd = Command::new("xorriso");
    cmd.args(["-indev", iso_s, "-report_el_torito", "plain"]);
    let (code, out, err) = output_within(cmd);
    let report = format!("{}{err}", String::from_utf8_lossy(&out));
    assert_eq!(code, 0, "{report}");
    let has = |prefix: &str, words: &[&str]| {
        report
            .lines()
            .any(|l| l.starts_with(prefix) && words.iter().all(|w| l.contains(w)))
    };
    assert!(
        has("El Torito boot img :", &[" BIOS ", " none "]),
        "{report}"
    );
    assert!(
        has("El Torito boot img :", &[" UEFI ", " none "]),
        "{report}"
    );
    assert!(has("El Torito img path :", &["/efi.img"]), "{report}");
    assert!(
        has("Boot record  :", &["El Torito", "MBR", "GPT"]),
        "{report}"
    );
    assert!(has("Volume id    :", &["'DIOXIDE'"]), "{report}");

    let want = format!(
        "via Multiboot2, cmdline {:?}",
        dioxide_qemu::iso::kernel_view(&dioxide_qemu::iso::words(cmdline))
    );
    for boot in ["bios", "uefi"] {
        let (code, out, err, _) = run_status(
            std::path::Path::new(k),
            &img,
            &["--boot", boot, "--iso", iso_s, "--timeout", "240"],
        );
        assert_eq!(code, 0, "{boot}: {out}\n{err}");
        assert!(out.contains(&want), "{boot}: no {want:?} in\n{out}");
        assert!(out.contains(r#" x=$HOME;y {c} #d "#), "{boot}: {out}");
        assert!(out.contains("calibrate iterations="), "{boot}: {out}");
    }

    // An ISO's arguments are its own; --iso boots with bios or uefi.
    let (code, err) = dioxide(&[
        "run",
        "--boot",
        "bios",
        "--iso",
        iso_s,
        "--selftest",
        "digest",
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("the kernel arguments are the ISO's"), "{err}");
    let (code, err) = dioxide(&["run", "--iso", iso_s]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("boots with --boot bios or --boot uefi"),
        "{err}"
    );

    let mut cmd = Command::new(env!("CARGO_BIN_EXE_dioxide"));
    cmd.env("PATH", "/nonexistent")
        .args(["image", "--out", iso_s, "--kernel", k]);
    let (code, _, err) = output_within(cmd);
    assert_eq!(code, 125, "{err}");
    assert!(
        err.contains(
            "grub-mkrescue (not on PATH) is missing: install the Debian package grub-common"
        ),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(d);
}

/// An image file as a dxfs device that drops every plain write after the
/// first FUA write: a power cut right after a commit block, before the
/// checkpoint reached home.
struct CutAfterCommit {
    file: std::fs::File,
    size: u64,
    committed: bool,
}

impl dioxide_dxfs::BlockDevice for CutAfterCommit {
    fn sector_size(&self) -> u32 {
        512
    }
    fn size(&self) -> u64 {
        self.size
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), dioxide_dxfs::DevError> {
        use std::os::unix::fs::FileExt;
        self.file
            .read_exact_at(buf, offset)
            .map_err(|_| dioxide_dxfs::DevError::NoMemory)
    }
}

impl dioxide_dxfs::BlockDeviceMut for CutAfterCommit {
    fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<(), dioxide_dxfs::DevError> {
        use std::os::unix::fs::FileExt;
        if !self.committed {
            self.file
                .write_all_at(buf, offset)
                .map_err(|_| dioxide_dxfs::DevError::NoMemory)?;
        }
        Ok(())
    }
    fn write_fua(&mut self, offset: u64, buf: &[u8]) -> Result<(), dioxide_dxfs::DevError> {
        self.write_at(offset, buf)?;
        self.committed = true;
        Ok(())
    }
}

/// `fsck` checks an image through a committed transaction its log holds;
/// `fsck --repair` writes it home. The control: without the log, the home
/// blocks alone do not show the write.
#[test]
fn fsck_reads_through_a_committed_log_and_repair_writes_it_home() {
    let d = temp("repair");
    let src = d.join("src");
    std::fs::create_dir_all(&src).unwrap();
    // A sparse file: one hole of 256 KiB.
    std::fs::File::create(src.join("vol"))
        .unwrap()
        .set_len(256 << 10)
        .unwrap();
    let img = d.join("r.img");
    let (code, _, err) = mkfs_from(&img, &src, &[]);
    assert_eq!(code, 0, "{err}");
    let data = vec![0x6bu8; 8192];
    let log_start = {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&img)
            .unwrap();
        let size = file.metadata().unwrap().len();
        let mut dev = CutAfterCommit {
            file,
            size,
            committed: false,
        };
        let mut w = dioxide_dxfs::WritableFs::mount(&mut dev).unwrap();
        let ino = w.fs().resolve("/vol").unwrap();
        w.write(ino, 16384, &data, false).unwrap();
        w.commit().unwrap();
        w.fs().superblock().log_start
    };
    assert!(dev_committed(&img));
    let cat = || dioxide_out(&["cat", img.to_str().unwrap(), "/vol"]).1;
    let want = {
        let mut v = vec![0u8; 256 << 10];
        v[16384..16384 + 8192].copy_from_slice(&data);
        v
    };
    let (code, out, _) = dioxide_out(&["fsck", img.to_str().unwrap()]);
    let out = String::from_utf8_lossy(&out).to_string();
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("transaction 1 committed") && out.contains("--repair writes them home"),
        "{out}"
    );
    assert!(cat() == want, "read through the log");
    // The control: the log's descriptor gone, home alone has no write.
    let without_log = d.join("nolog.img");
    std::fs::copy(&img, &without_log).unwrap();
    zero_block(&without_log, log_start);
    let (_, stale, _) = dioxide_out(&["cat", without_log.to_str().unwrap(), "/vol"]);
    assert!(
        stale.iter().all(|&b| b == 0),
        "home blocks do not hold the change yet"
    );
    // Repaired: home holds it, with or without the log.
    let (code, out, _) = dioxide_out(&["fsck", "--repair", img.to_str().unwrap()]);
    let out = String::from_utf8_lossy(&out).to_string();
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("replayed") && out.contains("clean"), "{out}");
    zero_block(&img, log_start);
    let (code, out, _) = dioxide_out(&["fsck", img.to_str().unwrap()]);
    assert_eq!(code, 0, "{}", String::from_utf8_lossy(&out));
    assert!(cat() == want, "home after repair");
    let _ = std::fs::remove_dir_all(d);
}

/// Whether the image's log holds a committed transaction.
fn dev_committed(img: &Path) -> bool {
    let f = std::fs::File::open(img).unwrap();
    let dev = CutAfterCommit {
        size: f.metadata().unwrap().len(),
        file: f,
        committed: true,
    };
    dioxide_dxfs::Fs::mount(&dev).unwrap().log_seq().is_some()
}

fn zero_block(img: &Path, block: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(img).unwrap();
    f.write_all_at(&[0u8; 4096], block * 4096).unwrap();
}
