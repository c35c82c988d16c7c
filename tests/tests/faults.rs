//! Device faults reach the client of the request that hit them, and only it:
//! QEMU's `blkdebug` driver makes reads of one sector of the disk image fail
//! with EIO (`dioxide run --inject-eio SECTOR`).

use dioxide_tests::nbdraw::Client;
use dioxide_tests::*;
use std::time::Duration;

/// Reads a whole export in `chunk`-byte reads over structured replies:
/// per chunk, its offset and the data or the error.
type Chunks = Vec<(u64, Result<Vec<u8>, (u32, String)>)>;

fn read_all(port: u16, name: &str, chunk: u32) -> Chunks {
    let mut c = Client::greeted(port);
    assert!(c.structured(), "structured replies refused");
    let size = c.go(name).unwrap_or_else(|t| panic!("GO {name}: {t:#x}"));
    let mut out = Vec::new();
    let mut at = 0u64;
    let mut handle = 1;
    while at < size {
        let n = (size - at).min(chunk as u64) as u32;
        out.push((at, c.read_structured(handle, at, n)));
        handle += 1;
        at += n as u64;
    }
    out
}

#[test]
fn injected_eio_fails_only_the_reads_that_cover_it() {
    let dir = TempDir::new("fault-eio");
    let src = dir.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    let others = random_tree(&src, 91, 12);
    // The victim: 256 KiB of random data, found in the image by its bytes.
    let mut victim = vec![0u8; 256 << 10];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for b in victim.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    std::fs::write(src.join("victim.bin"), &victim).unwrap();
    let img = dir.path().join("fs.img");
    dioxide::fstool::mkfs(&img, &src, None, 4096, "").unwrap();
    let image = std::fs::read(&img).unwrap();
    let start = image
        .windows(64)
        .position(|w| w == &victim[..64])
        .expect("victim data in the image");
    assert_eq!(start % 4096, 0, "file data is block aligned");
    // The sector 64 KiB into the file.
    let bad = (start as u64 + (64 << 10)) / 512;

    let mut cfg = config(Some(&img), &[]);
    cfg.timeout = Some(Duration::from_secs(600));
    cfg.nvme[0].namespaces[0].inject_eio = vec![bad];
    let app = dioxide::nbdbench::boot(cfg, dioxide::nbdbench::NetMode::User)
        .unwrap_or_else(|e| panic!("{e}"));
    let port = app.port;
    let console = || app.guest.console();

    // 4 KiB reads (the simple path) of the victim: only the one covering
    // the bad sector fails, with EIO and a message naming the request.
    let chunks = read_all(port, "victim.bin", 4096);
    for (at, r) in &chunks {
        if *at == 64 << 10 {
            let (errno, msg) = r
                .clone()
                .expect_err("the read covering the bad sector failed");
            assert_eq!(errno, 5, "EIO");
            eprintln!("a client reading the bad sector sees: EIO, {msg:?}");
            assert!(
                msg.contains("victim.bin") && msg.contains("at 65536"),
                "message names the request: {msg}"
            );
        } else {
            let data = r
                .as_ref()
                .unwrap_or_else(|e| panic!("read at {at}: {e:?}\n{}", console()));
            assert_eq!(
                data[..],
                victim[*at as usize..*at as usize + 4096],
                "at {at}"
            );
        }
    }
    // A larger read spanning it (the generic path) fails too; the
    // connection goes on serving.
    let mut c = Client::greeted(port);
    assert!(c.structured());
    c.go("victim.bin").unwrap();
    let (errno, msg) = c
        .read_structured(7, 60 << 10, 16 << 10)
        .expect_err("a read spanning the bad sector");
    assert_eq!(errno, 5, "{msg}");
    assert!(msg.contains("at 61440"), "{msg}");
    assert_eq!(c.read_structured(8, 0, 8192).unwrap(), victim[..8192]);

    // Every other file is served byte-identical.
    for p in &others {
        let want = std::fs::read(src.join(p)).unwrap();
        let got: Vec<u8> = read_all(port, p, 1 << 20)
            .into_iter()
            .flat_map(|(at, r)| r.unwrap_or_else(|e| panic!("{p} at {at}: {e:?}")))
            .collect();
        assert!(got == want, "{p} differs");
    }
    // The raw namespace: byte-identical but for the 64 KiB chunk holding
    // the bad sector, which fails.
    let bad_chunk = bad * 512 / (64 << 10) * (64 << 10);
    for (at, r) in read_all(port, "nvme0n1", 64 << 10) {
        if at == bad_chunk {
            let (errno, msg) = r.expect_err("the raw chunk holding the bad sector");
            assert_eq!(errno, 5, "{msg}");
            assert!(msg.contains("nvme0n1"), "{msg}");
        } else {
            let data = r.unwrap_or_else(|e| panic!("nvme0n1 at {at}: {e:?}"));
            assert!(
                data[..] == image[at as usize..at as usize + data.len()],
                "nvme0n1 at {at}"
            );
        }
    }
    // Each failure is logged once, with its request. The guest logs a
    // failure before it answers, but the console reaches the host through
    // QEMU's serial thread: wait for the three lines (a fixed 200 ms sleep
    // was a bet on the host's scheduling), then give a fourth a moment.
    let t0 = std::time::Instant::now();
    while console().lines().filter(|l| l.contains("failed")).count() < 3
        && t0.elapsed() < Duration::from_secs(30)
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!(
        "the three failure lines were on the console after {:?}",
        t0.elapsed()
    );
    std::thread::sleep(Duration::from_millis(200));
    let log = console();
    let lines = |needle: &str| log.lines().filter(|l| l.contains(needle)).count();
    assert_eq!(lines("read of victim.bin at 65536 "), 1, "{log}");
    assert_eq!(lines("read of victim.bin at 61440 "), 1, "{log}");
    assert_eq!(
        lines(&format!("read of nvme0n1 at {bad_chunk} ")),
        1,
        "{log}"
    );
    assert_eq!(lines("failed"), 3, "one line per failed request:\n{log}");
    for l in log.lines().filter(|l| l.contains("failed")) {
        eprintln!("logged: {l}");
    }
}

/// A drive slower than the command deadline (QEMU `null-co` with
/// `latency-ns`): each read passes its deadline, is aborted (QEMU declines),
/// and the controller is reset; the client gets an error, not a hang, and
/// the appliance goes on serving (listing, other exports, new connections).
/// The latency is 20 times the deadline: a guest starved of CPU long enough
/// could otherwise see the completion before it checks the deadline (and
/// rightly serve the read).
#[test]
fn a_drive_slower_than_the_deadline_gives_errors_not_hangs() {
    slow_drive(1);
}

/// The same on two CPUs: the reads time out on the storage core's queue,
/// whose reset the boot core's queue of the controller catches up with:
/// one reset per timed-out read, each followed by one rejoin line of the
/// other queue (`queue N: controller was reset (epoch E)`), which the
/// one-CPU run never prints.
#[test]
fn a_slow_drive_on_two_cpus_is_reset_once_and_serves_on() {
    slow_drive(2);
}

fn slow_drive(smp: u32) {
    // (Polled completion, with the storage core asked for explicitly.)
    let mut cfg = config(
        None,
        &["nvme.timeout_ms=200", "nbd.null=1", "nbd.storage_cores=1"],
    );
    cfg.timeout = Some(Duration::from_secs(600));
    cfg.smp = smp;
    cfg.extra = [
        "-drive",
        "driver=null-co,size=67108864,latency-ns=4000000000,read-zeroes=on,if=none,id=nvm0",
        "-device",
        "nvme,drive=nvm0,serial=slow0",
    ]
    .map(String::from)
    .to_vec();
    let t0 = std::time::Instant::now();
    let app = dioxide::nbdbench::boot(cfg, dioxide::nbdbench::NetMode::User)
        .unwrap_or_else(|e| panic!("{e}"));
    eprintln!("booted and serving after {:?}", t0.elapsed());
    let port = app.port;
    let mut c = Client::greeted(port);
    assert!(c.structured());
    c.go("nvme0n1").expect("the raw export");
    for round in 0..2 {
        let t0 = std::time::Instant::now();
        let (errno, msg) = c
            .read_structured(round + 1, 4096 * round, 4096)
            .expect_err("a read of the slow drive fails");
        eprintln!(
            "a client reading the slow drive sees after {:?}: errno {errno}, {msg:?}",
            t0.elapsed()
        );
        assert_eq!(errno, 5, "{msg}");
        assert!(msg.contains("timed out"), "{msg}\n{}", app.guest.console());
    }
    // The appliance serves on: another export, a new connection.
    let mut n = Client::greeted(port);
    n.go("null").expect("the null export");
    assert_eq!(n.read_at(0, 4096).unwrap(), vec![0u8; 4096]);
    assert!(
        console_shows(&app.guest, "serving again", Duration::from_secs(10)),
        "{}",
        app.guest.console()
    );
    let log = app.guest.console();
    assert!(!log.contains("panic"), "{log}");
    // One controller reset per read that timed out: dxfs's mount read of
    // block 0 at boot and the client's two. Two resets for one read (each
    // queue resetting on its own) would show as more.
    assert!(
        log.contains("nvme0n1 holds no usable dxfs: device error at block 0")
            && log.contains("command timed out"),
        "{log}"
    );
    let count = |what: &str| log.lines().filter(|l| l.contains(what)).count();
    assert_eq!(count("controller not answering: resetting it"), 3, "{log}");
    for epoch in 1..=3 {
        assert_eq!(
            count(&format!("nvme: controller reset done (epoch {epoch})")),
            1,
            "epoch {epoch}:\n{log}"
        );
        // The queue that reset re-created itself; on two CPUs the other
        // queue of the controller (the other core's) rejoins, once.
        let rejoined: Vec<&str> = log
            .lines()
            .filter(|l| l.contains(&format!(": controller was reset (epoch {epoch}):")))
            .collect();
        assert_eq!(
            rejoined.len(),
            smp as usize - 1,
            "epoch {epoch}: rejoin lines {rejoined:?}\n{log}"
        );
        let reset_by = log
            .lines()
            .skip_while(|l| !l.contains(&format!("reset done (epoch {epoch})")))
            .find(|l| l.contains("nvme: controller reset: ") && l.contains("re-created"))
            .and_then(|l| l.split("I/O queue ").nth(1))
            .and_then(|r| r.split_whitespace().next())
            .unwrap_or_else(|| panic!("no re-created queue:\n{log}"));
        assert!(
            rejoined
                .iter()
                .all(|l| !l.contains(&format!("queue {reset_by}: "))),
            "epoch {epoch}: the queue that reset rejoined too:\n{log}"
        );
    }
    assert_eq!(count("nvme: controller reset done (epoch 4)"), 0, "{log}");
    for l in log
        .lines()
        .filter(|l| l.contains("nvme") || l.contains("dxfs") || l.contains("nbd"))
    {
        eprintln!("{l}");
    }
}
