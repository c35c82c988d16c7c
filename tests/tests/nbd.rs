//! The appliance over the network: real NBD clients against the kernel's
//! NBD server (virtio-net, smoltcp, sans-IO NBD).

use dioxide_qemu::Guest;
use dioxide_tests::*;
use std::process::Command;
use std::time::{Duration, Instant};

/// Every virtio-net offload asked for (each used where the device offers it).
const ALL_OFFLOADS: [&str; 4] = [
    "net.csum=1",
    "net.guest_csum=1",
    "net.mrg_rxbuf=1",
    "net.tso=1",
];

/// Boots the appliance on `img` with its NBD port forwarded (user
/// networking); returns the guest (killed on drop) and the `nbd://` URL, once
/// DHCP is done.
fn serve(img: &std::path::Path, args: &[&str]) -> (Guest, String) {
    serve_mtu(img, args, None)
}

/// The same with QEMU's `host_mtu=` on the NIC.
fn serve_mtu(img: &std::path::Path, args: &[&str], mtu: Option<u16>) -> (Guest, String) {
    let mut cfg = config(Some(img), args);
    cfg.net_mtu = mtu;
    cfg.timeout = Some(Duration::from_secs(600));
    match dioxide::nbdbench::boot(cfg, dioxide::nbdbench::NetMode::User) {
        Ok(app) => (app.guest, app.url),
        Err(e) => panic!("{e}"),
    }
}

fn run(cmd: &mut Command) -> (bool, Vec<u8>, String) {
    let out = cmd.output().unwrap_or_else(|e| {
        panic!("{cmd:?}: {e} (the test command installs libnbd-bin and qemu-utils)")
    });
    (
        out.status.success(),
        out.stdout,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn real_clients_list_and_copy_every_export() {
    let dir = TempDir::new("nbd-clients");
    let src = dir.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    let paths = random_tree(&src, 21, 25);
    let img = dir.path().join("fs.img");
    dioxide::fstool::mkfs(&img, &src, None, 4096, "").unwrap();
    // Every offload asked for and a jumbo MTU: under user networking QEMU
    // offers no checksum or segmentation offload (no vnet header) and its
    // user stack keeps 1,500-byte segments, so this is merged receive
    // buffers, the device's MTU and the offloads' refusal; the tap test
    // below has them all at work.
    let (mut guest, url) = serve_mtu(&img, &ALL_OFFLOADS, Some(9000));
    assert!(
        guest.console().contains(
            "virtio-net: csum off (not offered), guest_csum off (not offered), mrg_rxbuf on, mtu 9000 (the device's), tso off (not offered)"
        ),
        "{}",
        guest.console()
    );
    // The line for the person at the screen: where to connect, with the
    // export count (every file and the raw namespace).
    let serving = format!(
        "nbd: serving {} exports at nbd://10.0.2.15:10809/",
        paths.len() + 1
    );
    wait_for_console(&mut guest, &serving, Duration::from_secs(30));
    // nbdinfo --list shows every file and the raw namespace.
    let (ok, out, err) = run(Command::new("nbdinfo").args(["--list", &url]));
    assert!(ok, "{err}");
    let list = String::from_utf8_lossy(&out);
    for p in &paths {
        assert!(
            list.contains(&format!("export=\"{p}\"")),
            "{p} missing:\n{list}"
        );
    }
    assert!(list.contains("export=\"nvme0n1\""));
    // nbdcopy of every file: byte-identical.
    for p in &paths {
        let want = std::fs::read(src.join(p)).unwrap();
        let (ok, got, err) =
            run(Command::new("nbdcopy").args([&format!("{url}/{}", uri_path(p)), "-"]));
        assert!(ok, "{p}: {err}");
        assert!(
            got == want,
            "{p}: {} bytes differ from {}",
            got.len(),
            want.len()
        );
    }
    // qemu-img as the client of a file whose size is not a multiple of 512
    // (QEMU rounds sizes up to sectors: the copy is the file, zero-padded).
    let odd = paths
        .iter()
        .find(|p| {
            let n = std::fs::metadata(src.join(p)).unwrap().len();
            n > 1 && !n.is_multiple_of(512)
        })
        .expect("a file of odd size");
    let out = dir.path().join("odd.out");
    let (ok, _, err) = run(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw"])
        .arg(format!("{url}/{}", uri_path(odd)))
        .arg(&out));
    assert!(ok, "{odd}: {err}");
    let mut want = std::fs::read(src.join(odd)).unwrap();
    want.resize(want.len().div_ceil(512) * 512, 0);
    assert!(
        std::fs::read(&out).unwrap() == want,
        "{odd}: qemu-img copy differs"
    );
    // The raw export equals the image (qemu-img as the client).
    let raw = dir.path().join("raw.out");
    let (ok, _, err) = run(Command::new("qemu-img")
        .args([
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &format!("{url}/nvme0n1"),
        ])
        .arg(&raw));
    assert!(ok, "{err}");
    assert_eq!(sha256_file(&raw), sha256_file(&img));
    // An export that does not exist.
    let (ok, _, _) = run(Command::new("nbdinfo").arg(format!("{url}/no/such/file")));
    assert!(!ok);
    let (ok, _, _) = run(Command::new("nbdinfo").arg(format!("{url}/../etc/passwd")));
    assert!(!ok);
    // Still serving.
    let (ok, _, err) = run(Command::new("nbdinfo").arg(format!("{url}/nvme0n1")));
    assert!(ok, "{err}");
}

/// fio's own data verification through its NBD engine: a file written by
/// fio (with crc32c verify headers) on the host is put into the image by
/// mkfs and read back at random through the file export. A copy with one
/// damaged block must fail the same check (the test can fail).
#[test]
fn fio_verifies_a_file_written_by_mkfs() {
    // fio saves its verify state (`local-write-0-verify.state`) in its
    // working directory: it runs in the test's directory, told not to, and
    // the source tree must be as it was (ignored files included: *.state
    // is in .gitignore).
    let tree = || {
        let out = Command::new("git")
            .args([
                "status",
                "--porcelain",
                "--ignored",
                "--untracked-files=all",
                "--",
                ".",
            ])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .expect("git");
        assert!(out.status.success(), "git status: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let before = tree();
    let dir = TempDir::new("nbd-fio");
    let src = dir.path().join("src");
    std::fs::create_dir_all(src.join("fio")).unwrap();
    let good = src.join("fio/verify.dat");
    let (ok, _, err) = run(Command::new("fio")
        .args([
            "--name=write",
            "--ioengine=psync",
            "--rw=write",
            "--bs=4k",
            "--size=8M",
            "--verify=crc32c",
            "--do_verify=0",
            "--verify_state_save=0",
            &format!("--filename={}", good.display()),
        ])
        .current_dir(dir.path()));
    assert!(ok, "fio write: {err}");
    let mut bad = std::fs::read(&good).unwrap();
    bad[5 * 4096 + 100] ^= 0xff;
    std::fs::write(src.join("fio/damaged.dat"), &bad).unwrap();
    let img = dir.path().join("fs.img");
    dioxide::fstool::mkfs(&img, &src, None, 4096, "").unwrap();
    let (_guest, url) = serve(&img, &[]);
    let fio = |export: &str| {
        let out = Command::new("fio")
            .args([
                "--name=verify",
                "--ioengine=nbd",
                &format!("--uri={url}/{export}"),
                "--rw=randread",
                "--bs=4k",
                "--size=8M",
                "--iodepth=16",
                "--verify=crc32c",
                "--output-format=json",
            ])
            .current_dir(dir.path())
            .output()
            .expect("fio (the test command installs it)");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let json = dioxide::nbdbench::fio_report(&text).unwrap_or_else(|| {
            panic!(
                "fio printed no JSON: {text}\n{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
        let job = &json["jobs"][0];
        (
            job["error"].as_i64().unwrap_or(-1),
            job["read"]["total_ios"].as_u64().unwrap_or(0),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (error, ios, err) = fio("fio/verify.dat");
    assert_eq!(error, 0, "fio verify failed: {err}");
    assert_eq!(ios, 2048, "every block read once");
    let (error, _, err) = fio("fio/damaged.dat");
    assert_ne!(error, 0, "the damaged copy passed verification");
    assert!(err.contains("verify failed"), "{err}");
    assert_eq!(tree(), before, "fio left files in the source tree");
}

use dioxide_tests::nbdraw as raw;

/// The console's `nbd: ... heap N bytes in use` figures, in order.
fn heap_figures(console: &str, what: &str) -> Vec<u64> {
    console
        .lines()
        .filter(|l| l.contains("nbd: ") && l.contains(what))
        .filter_map(|l| {
            let i = l.find("heap ")? + 5;
            l[i..].split_whitespace().next()?.parse().ok()
        })
        .collect()
}

/// Bad input from the network: every case gets the protocol's error or a
/// closed connection, while a well-behaved client keeps reading and checking
/// data throughout; afterwards the heap is back at its level from start.
#[test]
fn bad_input_from_the_network() {
    use raw::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let dir = TempDir::new("nbd-bad");
    let src = dir.path().join("src/data");
    std::fs::create_dir_all(&src).unwrap();
    let mut rng = dioxide_testkit::Rng::new(99);
    let mut a = vec![0u8; 4 << 20];
    rng.fill(&mut a);
    std::fs::write(src.join("a.bin"), &a).unwrap();
    let mut odd = vec![0u8; 1001];
    rng.fill(&mut odd);
    std::fs::write(src.join("odd.bin"), &odd).unwrap();
    let img = dir.path().join("fs.img");
    dioxide::fstool::mkfs(&img, &dir.path().join("src"), None, 4096, "").unwrap();
    let image = std::fs::read(&img).unwrap();
    // Debug logs: connection starts are logged ("connection from").
    let (guest, url) = serve(&img, &["log=debug"]);
    let _show = ConsoleOnPanic(&guest);
    let port: u16 = url.rsplit(':').next().unwrap().parse().unwrap();
    let start_heap = heap_figures(&guest.console(), "listening")[0];

    // The well-behaved client: pipelined reads of random ranges, each checked.
    let stop = Arc::new(AtomicBool::new(false));
    let good = {
        let (stop, a) = (stop.clone(), a.clone());
        std::thread::spawn(move || {
            let (mut c, size) = Client::open(port, "data/a.bin");
            assert_eq!(size, a.len() as u64);
            let mut rng = dioxide_testkit::Rng::new(7);
            let mut reads = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let mut want = Vec::new();
                for h in 0..8u64 {
                    let len = 1 + rng.next_u64() % 65536;
                    let off = rng.next_u64() % (size - len);
                    c.request(READ, 0, h, off, len as u32);
                    want.push((off as usize, len as usize));
                }
                for _ in 0..8 {
                    let hdr = c.read_n(16);
                    assert_eq!(
                        &hdr[..8],
                        &[0x67, 0x44, 0x66, 0x98, 0, 0, 0, 0],
                        "good client: error reply"
                    );
                    let h = u64::from_be_bytes(hdr[8..16].try_into().unwrap()) as usize;
                    let (off, len) = want[h];
                    let data = c.read_n(len);
                    assert!(
                        data == a[off..off + len],
                        "good client: wrong data at {off}+{len}"
                    );
                    reads += 1;
                }
            }
            c.request(DISC, 0, 0, 0, 0);
            assert!(c.closed());
            reads
        })
    };

    // Each case in its own block: its connection is dropped at the end.
    {
        // Garbage instead of the handshake, and after the client flags.
        let mut c = Client::connect(port);
        c.read_n(18);
        c.send(b"GET / HTTP/1.1\r\nHost: dioxide\r\n\r\n");
        assert!(c.closed(), "garbage handshake: not closed");
        let mut c = Client::greeted(port);
        c.send(&[0x5a; 64]);
        assert!(c.closed(), "garbage option: not closed");
    }

    {
        // Unknown options, unknown and escaping export names.
        let mut c = Client::greeted(port);
        assert_eq!(c.option(77, b"whatever")[0].0, ERR_UNSUP);
        assert_eq!(c.option(0xffff_fff0, &[])[0].0, ERR_UNSUP);
        for name in [
            "no/such/file",
            "../data/a.bin",
            "data/../data/a.bin",
            "data/a.bin/..",
            "",
            "data",
        ] {
            assert_eq!(c.go(name), Err(ERR_UNKNOWN), "{name:?}");
        }
        assert_eq!(c.go("/data/a.bin"), Ok(a.len() as u64), "leading slash");
        // Requests in transmission.
        let size = a.len() as u64;
        const EINVAL: u32 = 22;
        const EPERM: u32 = 1;
        assert_eq!(c.read_at(size - 10, 20), Err(EINVAL), "past the end");
        assert_eq!(c.read_at(u64::MAX - 5, 10), Err(EINVAL), "offset overflow");
        assert_eq!(c.read_at(0, 0), Err(EINVAL), "zero length");
        assert_eq!(c.read_at(0, u32::MAX), Err(EINVAL), "4 GiB");
        assert_eq!(c.read_at(size, 1), Err(EINVAL), "at the end");
        assert_eq!(c.read_at(1, 4095).unwrap(), a[1..4096], "misaligned");
        assert_eq!(c.read_at(size - 3, 3).unwrap(), a[a.len() - 3..], "tail");
        for ty in [99u16, BLOCK_STATUS, 0xffff] {
            c.request(ty, 0, 5, 0, 512);
            assert_eq!(c.reply(0).1, EINVAL, "command {ty}");
        }
        c.request(READ, 0x8000, 6, 0, 512);
        assert_eq!(c.reply(0).1, EINVAL, "unknown read flag");
        c.request(WRITE, 0, 7, 0, 3000);
        c.send(&[1u8; 3000]);
        assert_eq!(c.reply(0), (7, EPERM, vec![]), "write");
        c.request(TRIM, 0, 8, 0, 4096);
        assert_eq!(c.reply(0).1, EPERM, "trim");
        c.request(WRITE_ZEROES, 0, 9, 0, 4096);
        assert_eq!(c.reply(0).1, EPERM, "write zeroes");
        c.request(FLUSH, 0, 10, 0, 0);
        assert_eq!(c.reply(0), (10, 0, vec![]), "flush");
        assert_eq!(
            c.read_at(4096, 4096).unwrap(),
            a[4096..8192],
            "after refused writes"
        );
        // A bad request magic closes.
        c.send(&[0u8; 28]);
        assert!(c.closed(), "bad request magic: not closed");
        // The raw namespace, misaligned, and a short file.
        let (mut c, n) = Client::open(port, "nvme0n1");
        assert_eq!(n, image.len() as u64);
        assert_eq!(c.read_at(100, 1000).unwrap(), image[100..1100]);
        assert_eq!(c.read_at(n - 1, 1).unwrap(), image[image.len() - 1..]);
        let (mut c, n) = Client::open(port, "data/odd.bin");
        assert_eq!(n, 1001);
        assert_eq!(c.read_at(0, 1001).unwrap(), odd);
        assert_eq!(c.read_at(1000, 2), Err(EINVAL));
        // EXPORT_NAME of an unknown export: the protocol has no error, it closes.
        let mut c = Client::greeted(port);
        let mut m = IHAVEOPT.to_be_bytes().to_vec();
        m.extend(1u32.to_be_bytes());
        m.extend(7u32.to_be_bytes());
        m.extend(b"missing");
        c.send(&m);
        assert!(c.closed(), "EXPORT_NAME unknown: not closed");
    }
    // Disconnects in the middle of requests, with large reads in flight.
    for k in 0..5 {
        let (mut c, size) = Client::open(port, if k % 2 == 0 { "data/a.bin" } else { "nvme0n1" });
        for h in 0..64u64 {
            c.request(READ, 0, h, (h * 65536) % (size - 262_144), 262_144);
        }
        c.send(&0x2560_9513u32.to_be_bytes()[..3]);
        drop(c);
    }
    // 100 connections opened and dropped, ten at a time, in every phase.
    for batch in 0..10 {
        let mut held = Vec::new();
        for k in 0..10 {
            match (batch + k) % 4 {
                0 => held.push(Client::connect(port)),
                1 => {
                    let mut c = Client::connect(port);
                    c.read_n(18);
                    held.push(c);
                }
                2 => {
                    let mut c = Client::greeted(port);
                    c.send(&IHAVEOPT.to_be_bytes()[..5]);
                    held.push(c);
                }
                _ => {
                    let (mut c, _) = Client::open(port, "data/a.bin");
                    for h in 0..4 {
                        c.request(READ, 0, h, h * 4096, 4096);
                    }
                    held.push(c);
                }
            }
        }
        drop(held);
    }

    stop.store(true, Ordering::Relaxed);
    let reads = good.join().expect("the good client failed");
    assert!(reads > 0);
    // Still serving: a fresh client reads the whole file.
    let (ok, got, err) = run(Command::new("nbdcopy").args([&format!("{url}/data/a.bin"), "-"]));
    assert!(ok, "{err}");
    assert!(got == a, "nbdcopy after the bad input: data differs");
    // Every connection gone: the heap is back at its level from start.
    let t0 = Instant::now();
    let console = loop {
        let c = guest.console();
        let idle = c.rfind("nbd: idle:").unwrap_or(0);
        let after_copy = idle > c.rfind("connection from").unwrap_or(0);
        if after_copy && idle > 0 {
            break c;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "no idle report:\n{c}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        !console.contains("PANIC") && !console.contains("power off"),
        "{console}"
    );
    let last = *heap_figures(&console, "idle:").last().unwrap();
    assert_eq!(
        last, start_heap,
        "heap bytes in use after the clients left vs at start"
    );
    eprintln!("good client: {reads} checked reads; heap {start_heap} bytes at start and after");
}

/// `--net tap`: the guest on a host tap device with a static address, the
/// exports reached directly at 172.30.N.2, with every virtio-net offload
/// on and jumbo frames (MTU 9000 on both sides): transmit checksums
/// completed by the device, large frames, merged receive buffers (ICMP
/// echoes of 8,000 bytes: a frame over four 2 KiB buffers, answered with
/// the same bytes). Needs root (CAP_NET_ADMIN) and /dev/net/tun; only where
/// those are missing is the test skipped, with a `SKIPPED:` line on stderr.
/// Any other failure to make the device (`ip` missing, ...) fails it.
#[test]
fn tap_network_serves_the_exports() {
    use dioxide::nbdbench::{boot, NetMode};
    let dir = TempDir::new("nbd-tap");
    let src = dir.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("hello.txt"), b"over tap\n").unwrap();
    let mut rng = dioxide_testkit::Rng::new(77);
    let mut big = vec![0u8; (3 << 20) + 123];
    rng.fill(&mut big);
    std::fs::write(src.join("big.bin"), &big).unwrap();
    let img = dir.path().join("fs.img");
    dioxide::fstool::mkfs(&img, &src, None, 4096, "").unwrap();
    // Jumbo frames, then the standard MTU (TSO's segments at 1,448 bytes).
    for mtu in [Some(9000), None] {
        let mut cfg = config(Some(&img), &ALL_OFFLOADS);
        cfg.net_mtu = mtu;
        cfg.timeout = Some(Duration::from_secs(300));
        let app = match boot(cfg, NetMode::Tap) {
            Ok(a) => a,
            Err(dioxide_qemu::Error::TapUnavailable(why)) => {
                skipped("tap_network_serves_the_exports", &why);
                return;
            }
            Err(e) => panic!("{e}"),
        };
        tap_checks(&app, mtu, &big);
    }
}

fn tap_checks(app: &dioxide::nbdbench::Appliance, mtu: Option<u16>, big: &[u8]) {
    assert!(app.url.starts_with("nbd://172.30."), "{}", app.url);
    let console = app.guest.console();
    let tap_ip = app.url["nbd://".len()..].split(':').next().unwrap();
    assert!(
        console.contains(&format!("net: static address {tap_ip}/24 gateway ")),
        "{console}"
    );
    // Said once the address is set, after the service listens.
    let said = format!("nbd: serving 3 exports at nbd://{tap_ip}:10809/");
    let t0 = Instant::now();
    while !app.guest.console().contains(&said) {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "no {said:?}:\n{}",
            app.guest.console()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let limit = Duration::from_secs(300);
    let (ok, got, err) = run_within(
        Command::new("nbdcopy").args([&format!("{}/hello.txt", app.url), "-"]),
        limit,
    );
    assert!(ok, "{err}");
    assert_eq!(got, b"over tap\n");
    let console = app.guest.console();
    let mtu_said = match mtu {
        Some(m) => format!("mtu {m} (the device's)"),
        None => "mtu 1500 (default)".into(),
    };
    assert!(
        console.contains(&format!(
            "virtio-net: csum on, guest_csum on, mrg_rxbuf on, {mtu_said}, tso on"
        )),
        "{console}"
    );
    // Large replies: TSO packets of up to 64 KiB, TCP checksums completed
    // by the device, frames of up to the MTU on the wire.
    let (ok, got, err) = run_within(
        Command::new("nbdcopy").args([&format!("{}/big.bin", app.url), "-"]),
        limit,
    );
    assert!(ok, "{err}");
    assert!(got == big, "big.bin: {} bytes differ", got.len());
    let (ok, list, err) = run_within(Command::new("nbdinfo").args(["--list", &app.url]), limit);
    assert!(ok, "{err}");
    assert!(String::from_utf8_lossy(&list).contains("export=\"nvme0n1\""));
    let guest_ip = app.url["nbd://".len()..].split(':').next().unwrap_or("");
    if mtu.is_some() {
        // Jumbo echoes (-M do: not fragmented): a frame over four receive
        // buffers; ping checks the reply's bytes ("wrong data byte").
        let (ok, out, err) = run_within(
            Command::new("ping").args([
                "-c", "3", "-i", "0.2", "-W", "5", "-s", "8000", "-M", "do", guest_ip,
            ]),
            limit,
        );
        let out = String::from_utf8_lossy(&out);
        assert!(
            ok && out.contains("3 received") && !out.contains("wrong data"),
            "{out}{err}"
        );
    }
    // The guest's own count (logged when the NBD service idles): frames
    // sent with partial checksums and as TSO packets; frames over several
    // receive buffers (the pings).
    let t0 = Instant::now();
    let (n, _, _) = run_within(
        Command::new("nbdinfo").arg(format!("{}/hello.txt", app.url)),
        limit,
    );
    assert!(n);
    let (merged, csum, gso, c) = loop {
        let c = app.guest.console();
        let lines: Vec<String> = c
            .lines()
            .filter(|l| l.contains("virtio-net since the last count: "))
            .map(String::from)
            .collect();
        let merged = lines.iter().any(|l| !l.contains("(0 merged"));
        let csum = lines
            .iter()
            .any(|l| !l.contains("(0 with partial checksum"));
        let gso = lines.iter().any(|l| !l.contains("checksum, 0 GSO"));
        if (merged == mtu.is_some() && csum && gso) || t0.elapsed() > Duration::from_secs(30) {
            break (merged, csum, gso, c);
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        merged == mtu.is_some() && csum && gso,
        "merged {merged}, partial checksum {csum}, GSO {gso}: {c}"
    );
}

/// `bench nbd` in its smallest form (user networking, virtio-net, QD 4,
/// 1 s rows, one round, reads and writes) against `targets`, with a file of
/// `file_size` bytes and `host_ios` reads per host row (0: none), writing
/// to `out`. The benchmark's images are named by the file's size: tests
/// that run at the same time take different sizes, or the second QEMU
/// would find the first one's writable images locked.
fn small_bench(
    out: &std::path::Path,
    targets: &[&'static str],
    file_size: u64,
    host_ios: u64,
) -> dioxide::nbdbench::NbdOpts {
    dioxide::nbdbench::NbdOpts {
        qds: vec![4],
        jobs: 1,
        secs: 1,
        out: out.to_path_buf(),
        file_size,
        accel: dioxide_qemu::accel::Accel::Tcg,
        mem: 256,
        nets: vec![dioxide::nbdbench::NetMode::User],
        nics: vec![dioxide_qemu::Nic::Virtio],
        offloads: vec![dioxide::offload::Offloads(None)],
        mtus: vec![None],
        targets: targets.to_vec(),
        ops: vec!["read".into(), "write".into()],
        completion: "poll".into(),
        rounds: 1,
        boot: dioxide_qemu::Boot::Pvh,
        sweep: Default::default(),
        host_ios,
    }
}

/// `dioxide bench nbd`: the TCG rows (fio against the appliance and
/// qemu-nbd) and the host rows of the whole request path (the same
/// service code on the host's CPU) in one results.json.
#[test]
fn bench_nbd_writes_tcg_rows_and_host_rows() {
    let dir = TempDir::new("bench-nbd");
    let opts = small_bench(
        dir.path(),
        &["file", "raw", "null", "qemu-nbd"],
        8 << 20,
        2_000,
    );
    assert_eq!(dioxide::nbdbench::nbd(&opts).unwrap(), 0);
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("results.json")).unwrap()).unwrap();
    let rows = json["rows"].as_array().unwrap();
    for t in ["file", "raw", "null", "qemu-nbd"] {
        let r = rows
            .iter()
            .find(|r| r["target"] == t && r["op"] == "read")
            .unwrap_or_else(|| panic!("{t}: {json:#}"));
        assert!(r["iops"].as_f64().unwrap() > 0.0, "{r}");
    }
    // Write rows (fio randwrite: writes completed, or fio's failure fails
    // the run) for the writable targets; the null export takes none.
    for t in ["file", "raw", "qemu-nbd"] {
        let r = rows
            .iter()
            .find(|r| r["target"] == t && r["op"] == "write")
            .unwrap_or_else(|| panic!("{t}: {json:#}"));
        assert!(r["iops"].as_f64().unwrap() > 0.0, "{r}");
    }
    assert!(
        !rows
            .iter()
            .any(|r| r["target"] == "null" && r["op"] == "write"),
        "{json:#}"
    );
    // The appliance served the writes without a logged error (a write it
    // refused or failed logs one).
    for run in json["config"]["runs"].as_array().unwrap() {
        let warnings = run["guest_warnings"].as_array().unwrap();
        assert!(
            !warnings
                .iter()
                .any(|w| w.as_str().is_some_and(|w| w.contains(" ERROR "))),
            "{warnings:?}"
        );
    }
    let host = json["host_rows"].as_array().unwrap();
    // 3 targets, QD 1/16/128; checksum offload off/on at MTU 1500 and
    // 9000, and TSO with checksum offload at 1500.
    assert_eq!(host.len(), 45, "{json:#}");
    for r in host {
        for k in [
            "cycles_per_io",
            "ns_per_io",
            "receive_cycles",
            "decode_cycles",
            "submit_cycles",
            "complete_cycles",
            "reply_cycles",
            "transmit_cycles",
        ] {
            assert!(r[k].as_f64().is_some_and(|v| v >= 0.0), "{k}: {r}");
        }
        assert!(r["cycles_per_io"].as_f64().unwrap() > 0.0, "{r}");
        // The NBD read path allocates nothing per read, client included;
        // the same counter counted the row's setup (socket buffers, the
        // server's tables), so the 0 is not a counter that never counts.
        assert_eq!(r["allocs_per_io"].as_f64(), Some(0.0), "{r}");
        assert!(r["setup_allocs"].as_u64().is_some_and(|n| n > 0), "{r}");
        assert!(["file", "raw", "null"].contains(&r["target"].as_str().unwrap()));
        assert!([1, 16, 128].contains(&r["qd"].as_u64().unwrap()));
    }
}

/// `bench nbd --targets linux`: a Linux guest (Debian's kernel, prepared
/// once under target/dioxide/linux/) under the same QEMU runs qemu-nbd on
/// its emulated NVMe namespace, and fio's reads and writes against it give
/// rows with IOPS, while the appliance booted beside it is paused.
#[test]
fn bench_nbd_linux_guest_rows() {
    let t0 = Instant::now();
    let dir = TempDir::new("bench-nbd-linux");
    let opts = small_bench(dir.path(), &["linux"], 6 << 20, 0);
    assert_eq!(dioxide::nbdbench::nbd(&opts).unwrap(), 0);
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("results.json")).unwrap()).unwrap();
    let rows = json["rows"].as_array().unwrap();
    for op in ["read", "write"] {
        let r = rows
            .iter()
            .find(|r| r["target"] == "linux" && r["op"] == op)
            .unwrap_or_else(|| panic!("linux {op}: {json:#}"));
        assert!(r["iops"].as_f64().unwrap() > 0.0, "{r}");
    }
    assert_eq!(rows.len(), 2, "{json:#}");
    let lg = &json["config"]["runs"][0]["linux_guest"];
    assert!(
        lg["qemu_nbd_options"]
            .as_str()
            .is_some_and(|o| o.starts_with("--cache=")),
        "{json:#}"
    );
    eprintln!(
        "bench_nbd_linux_guest_rows: {:.1} s (Linux guest up after {} s)",
        t0.elapsed().as_secs_f64(),
        lg["boot_secs"]
    );
}

/// Damage costs only what is damaged (issue 20): a file whose inode fails
/// its checksum and a directory whose block does are left out, each named in
/// one log line, and every other file is exported; a damaged root directory
/// leaves no file export. The raw namespace is served either way.
#[test]
fn a_damaged_image_exports_every_file_that_checks_out() {
    use raw::*;
    let dir = TempDir::new("nbd-damaged");
    let src = dir.path().join("src");
    std::fs::create_dir_all(src.join("sub")).unwrap();
    let mut rng = dioxide_testkit::Rng::new(20);
    let mut good = Vec::new();
    for i in 0..10 {
        let mut data = vec![0u8; 1 + rng.below(20_000) as usize];
        rng.fill(&mut data);
        std::fs::write(src.join(format!("good-{i}")), &data).unwrap();
        good.push((format!("good-{i}"), data));
    }
    std::fs::write(src.join("bad"), vec![8u8; 10_000]).unwrap();
    std::fs::write(src.join("sub/s1"), b"below a damaged block").unwrap();
    std::fs::write(src.join("sub/s2"), vec![9u8; 5000]).unwrap();
    let img = dir.path().join("fs.img");
    dioxide::fstool::mkfs(&img, &src, None, 4096, "").unwrap();
    let image = std::fs::read(&img).unwrap();
    let (bad, bad_blk, bad_at, sub, sub_blk, root_blk) = {
        let dev = dioxide::fstool::FileDevice::open(&img).unwrap();
        let fs = dioxide_dxfs::Fs::mount(&dev).unwrap();
        let sb = fs.superblock().clone();
        let bad = fs.resolve("/bad").unwrap();
        let sub = fs.resolve("/sub").unwrap();
        let first_block = |ino| fs.open(ino).unwrap().extents()[0].disk_block as usize;
        (
            bad,
            sb.itable_start + (bad - 1) / 16,
            sb.itable_start as usize * 4096 + (bad as usize - 1) * 256 + 8,
            sub,
            first_block(sub),
            first_block(1),
        )
    };

    // One file's inode and one directory's block.
    let mut damaged = image.clone();
    damaged[bad_at] ^= 0x10;
    damaged[sub_blk * 4096 + 100] ^= 0x01;
    std::fs::write(&img, &damaged).unwrap();
    let bad_line = format!(
        "nbd: nvme0n1: /bad: file left out: corrupt inode {bad} at block {bad_blk}: bad checksum"
    );
    let sub_line = format!(
        "nbd: nvme0n1: /sub: directory left out with everything below it: corrupt directory inode {sub} at block {sub_blk}: bad checksum"
    );
    // fsck names both with the same words.
    let rep = dioxide_dxfs::fsck::check(dioxide::fstool::FileDevice::open(&img).unwrap());
    for line in [&bad_line, &sub_line] {
        let e = &line[line.find("corrupt").unwrap()..];
        assert!(
            rep.problems.iter().any(|p| p.contains(e)),
            "fsck: {:?}",
            rep.problems
        );
    }
    let app = dioxide::nbdbench::boot(config(Some(&img), &[]), dioxide::nbdbench::NetMode::User)
        .unwrap_or_else(|e| panic!("{e}"));
    let show = ConsoleOnPanic(&app.guest);
    let console = app.guest.console();
    assert!(console.contains(&bad_line), "{console}");
    assert!(console.contains(&sub_line), "{console}");
    assert!(
        console.contains(": 11 exports (10 files, 1 namespace(s)); heap"),
        "{console}"
    );
    for (name, data) in &good {
        let (mut c, size) = Client::open(app.port, name);
        assert_eq!(size, data.len() as u64, "{name}");
        assert!(c.read_at(0, data.len() as u32).unwrap() == *data, "{name}");
        c.disconnect();
    }
    for name in ["bad", "sub/s1"] {
        let mut c = Client::greeted_within(app.port, Duration::from_secs(30));
        assert!(c.go(name).is_err(), "{name} exported");
    }
    drop(show);
    drop(app);

    // What every path goes through: the root directory's block, the
    // superblock. No file is exported; the namespace still is.
    for (at, line) in [
        (
            root_blk * 4096 + 100,
            format!("nbd: nvme0n1: file exports unavailable: corrupt directory inode 1 at block {root_blk}: bad checksum"),
        ),
        (
            100,
            "dxfs: nvme0n1 holds no usable dxfs: corrupt superblock at block 0: bad checksum".into(),
        ),
    ] {
        let mut damaged = image.clone();
        damaged[at] ^= 0x01;
        std::fs::write(&img, &damaged).unwrap();
        let app =
            dioxide::nbdbench::boot(config(Some(&img), &[]), dioxide::nbdbench::NetMode::User)
                .unwrap_or_else(|e| panic!("{e}"));
        let _show = ConsoleOnPanic(&app.guest);
        let console = app.guest.console();
        assert!(console.contains(&line), "{console}");
        assert!(
            console.contains(": 1 exports (0 files, 1 namespace(s)); heap"),
            "{console}"
        );
        let (mut c, size) = Client::open(app.port, "nvme0n1");
        assert_eq!(size, damaged.len() as u64);
        let blk = at / 4096 * 4096;
        assert!(c.read_at(blk as u64, 4096).unwrap() == damaged[blk..blk + 4096]);
        c.disconnect();
    }
}
