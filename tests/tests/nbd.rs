//! The appliance over the network: real NBD clients against the kernel's
//! NBD server (virtio-net, smoltcp, sans-IO NBD).

use dioxide::qemu::Guest;
use dioxide_tests::*;
use std::process::Command;
use std::time::{Duration, Instant};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_for(guest: &Guest, what: &str, secs: u64) -> String {
    let t0 = Instant::now();
    loop {
        let c = guest.console();
        if c.contains(what) {
            return c;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(secs),
            "no {what:?} after {secs} s:\n{c}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Percent-encodes an export name for an NBD URI (RFC 3986 path).
fn uri_path(name: &str) -> String {
    name.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' | b'/' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
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
    let port = free_port();
    let mut cfg = config(Some(&img), &[]);
    cfg.nbd_port = Some(port);
    cfg.timeout = Some(Duration::from_secs(300));
    let guest = Guest::spawn(&cfg).expect("spawn");
    wait_for(&guest, "nbd: listening on port 10809", 60);
    wait_for(&guest, "DHCP: address", 60);
    let url = format!("nbd://127.0.0.1:{port}");
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
