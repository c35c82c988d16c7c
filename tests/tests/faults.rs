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
    cfg.inject_eio = vec![bad];
    let app = dioxide::nbdbench::boot(cfg, dioxide::nbdbench::NetMode::User)
        .unwrap_or_else(|e| panic!("{e}"));
    let port: u16 = app
        .url
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("port in the URL");
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
    // Each failure is logged once, with its request.
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
