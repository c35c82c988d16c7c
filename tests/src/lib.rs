//! Harness of the integration tests: builds the kernel once, makes random
//! images in a temporary directory, boots QEMU (always with a timeout; the
//! `Guest` handle kills QEMU when dropped).

pub mod nbdraw;

use dioxide_qemu::accel::Accel;
use dioxide_qemu::{self as qemu, Config, Guest, Outcome};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The kernel ELF, built once per test binary.
pub fn kernel() -> PathBuf {
    static K: OnceLock<PathBuf> = OnceLock::new();
    K.get_or_init(|| match dioxide::kernel::build() {
        Ok(p) => p,
        Err(e) => panic!("{e}"),
    })
    .clone()
}

/// A directory under target/test-tmp removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(name: &str) -> TempDir {
        let p = dioxide::workspace_root()
            .join("target")
            .join("test-tmp")
            .join(format!("{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("create temp dir");
        TempDir(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn sha256_file(path: &Path) -> String {
    let data = std::fs::read(path).expect("read image");
    hex(&Sha256::digest(&data))
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Writes a random image and returns its sha256.
pub fn random_image(path: &Path, size: u64, seed: u64) -> String {
    dioxide::image::write_random(path, size, seed).expect("write image");
    sha256_file(path)
}

/// A boot configuration: TCG, 256 MiB, 180 s timeout, console not echoed.
pub fn config(disk: Option<&Path>, args: &[&str]) -> Config {
    let mut c = Config::new(kernel());
    if let Some(d) = disk {
        c.add_disk(d);
    }
    c.accel = Accel::Tcg;
    c.mem_mib = 256;
    c.args = args.iter().map(|s| s.to_string()).collect();
    c.timeout = Some(Duration::from_secs(180));
    c
}

/// Asserts that the digest self-test printed exactly one result line and
/// that it is the namespace's `bytes` and `sha256` (hex).
pub fn assert_digest(out: &Outcome, bytes: u64, sha256: &str) {
    let lines: Vec<&str> = out
        .result_lines()
        .filter(|l| l.starts_with("digest "))
        .collect();
    assert_eq!(
        lines,
        vec![format!("digest nvme0n1 bytes={bytes} sha256={sha256}")],
        "console:\n{}",
        out.console
    );
}

/// Boots and returns the outcome; panics with the console on host errors.
pub fn boot(cfg: &Config) -> Outcome {
    match qemu::run(cfg) {
        Ok(o) => o,
        Err(e) => panic!("boot failed: {e}"),
    }
}

/// Says that `test` is skipped and why, as a line starting with `SKIPPED:`
/// written straight to the process's stderr: the test harness captures
/// `eprintln!` of passing tests, and a skip must be seen.
pub fn skipped(test: &str, why: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "SKIPPED: {test}: {why}");
}

/// Whether the guest's console shows `what` within `within` (polled): for
/// a line the guest logs around the time it answers a request, which may
/// reach the console after the answer reaches the test.
pub fn console_shows(guest: &Guest, what: &str, within: Duration) -> bool {
    let t0 = Instant::now();
    loop {
        if guest.console().contains(what) {
            return true;
        }
        if t0.elapsed() > within {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until the guest's console contains `what` and returns the console.
/// Panics, with the console, when QEMU exits first or `within` passes: a
/// guest that dies early or never gets there fails the test instead of
/// hanging it.
pub fn wait_for_console(guest: &mut Guest, what: &str, within: Duration) -> String {
    let t0 = Instant::now();
    loop {
        let c = guest.console();
        if c.contains(what) {
            return c;
        }
        if !guest.is_running() {
            // Let the console readers take the last lines.
            std::thread::sleep(Duration::from_millis(200));
            let c = guest.console();
            if c.contains(what) {
                return c;
            }
            panic!("QEMU exited before the console showed {what:?}:\n{c}");
        }
        if t0.elapsed() > within {
            panic!("no {what:?} on the console after {within:?}:\n{c}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Prints the guest's console when the test fails: held across a test's
/// body (`let _show = ConsoleOnPanic(&guest);`), it waits a second for the
/// last lines to arrive and prints the console if dropped while the thread
/// panics.
pub struct ConsoleOnPanic<'a>(pub &'a Guest);

impl Drop for ConsoleOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // Let the last lines arrive.
            std::thread::sleep(Duration::from_secs(1));
            eprintln!("--- guest console ---\n{}", self.0.console());
        }
    }
}

/// Runs `cmd` (a client of the appliance): whether it succeeded, its
/// stdout and stderr. Killed after `limit`, failing the test: a client
/// waiting on a stuck appliance must not hang it.
pub fn run_within(cmd: &mut std::process::Command, limit: Duration) -> (bool, Vec<u8>, String) {
    let (status, out, err) = dioxide_testkit::run_within(cmd, limit);
    (status.success(), out, err)
}

/// Writes a random tree under `root`: nested directories, empty, 1-byte,
/// large and sparse files, UTF-8 names, and one dense file over 1 MiB. Returns the relative paths of the
/// regular files.
pub fn random_tree(root: &Path, seed: u64, files: usize) -> Vec<String> {
    use std::io::{Seek, SeekFrom, Write};
    let mut rng = dioxide_testkit::Rng::new(seed);
    let mut dirs = vec![String::new()];
    let mut out = Vec::new();
    for k in 0..files {
        let parent = dirs[(rng.next_u64() % dirs.len() as u64) as usize].clone();
        if rng.next_u64().is_multiple_of(5) {
            let d = format!("{parent}/dir-{k}-é");
            std::fs::create_dir_all(root.join(&d[1..])).expect("mkdir");
            dirs.push(d);
            continue;
        }
        let name = format!(
            "{parent}/file-{k}{}",
            if k % 7 == 0 { "-ünïcødé" } else { ".bin" }
        );
        let path = root.join(&name[1..]);
        let mut f = std::fs::File::create(&path).expect("create");
        match rng.next_u64() % 6 {
            0 => {}
            1 => f.write_all(b"x").expect("write"),
            2 => {
                // Sparse: a few islands of data in a large file.
                let size = 1 << 22;
                f.set_len(size).expect("truncate");
                for _ in 0..4 {
                    let at = rng.next_u64() % size;
                    let mut b = vec![0u8; 1 + (rng.next_u64() % 10000) as usize];
                    rng.fill(&mut b);
                    f.seek(SeekFrom::Start(at)).expect("seek");
                    f.write_all(&b[..b.len().min((size - at) as usize)])
                        .expect("write");
                }
            }
            _ => {
                let mut b = vec![0u8; (rng.next_u64() % 400_000) as usize];
                rng.fill(&mut b);
                f.write_all(&b).expect("write");
            }
        }
        out.push(name[1..].to_string());
    }
    // One dense file over 1 MiB: reads of it span several 1 MiB requests.
    let mut b = vec![0u8; (5 << 19) + 123];
    rng.fill(&mut b);
    std::fs::write(root.join("large-random.bin"), &b).expect("write");
    out.push("large-random.bin".into());
    out
}

/// Percent-encodes an export name for an NBD URI (RFC 3986 path).
pub fn uri_path(name: &str) -> String {
    name.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' | b'/' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
