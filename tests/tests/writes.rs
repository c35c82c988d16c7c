//! Writes over NBD (issue 22): a raw namespace and a dxfs file taken
//! writable, written by real clients (nbdcopy, fio with crc32c
//! verification), read back identical after the appliance restarts on the
//! same images; who may write and who may connect; a device write error
//! failing only the request that hit it.

use dioxide_qemu::Guest;
use dioxide_tests::nbdraw::{self as raw, Client};
use dioxide_tests::*;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// The volume's size and the 512-byte sector whose writes fail (QEMU
/// blkdebug), far from what the clients write.
const VOL: u64 = 64 << 20;
/// The writable file's size, and the volume's.
const FILE: u64 = 4 << 20;
const VOLUME: u64 = 8 << 20;
const BAD_SECTOR: u64 = (60 << 20) / 512;

/// Boots on `fs` (nvme0n1, a dxfs image) and `vol` (nvme1n1, raw) with
/// `args`; the guest (killed on drop) and the `nbd://` URL.
fn serve(fs: &Path, vol: &Path, args: &[&str]) -> (Guest, String) {
    let mut cfg = config(Some(fs), args);
    cfg.add_disk(vol).inject_write_eio = vec![BAD_SECTOR];
    cfg.timeout = Some(Duration::from_secs(600));
    match dioxide::nbdbench::boot(cfg, dioxide::nbdbench::NetMode::User) {
        Ok(app) => (app.guest, app.url),
        Err(e) => panic!("{e}"),
    }
}

fn run(cmd: &mut Command) -> (bool, Vec<u8>, String) {
    run_within(cmd, Duration::from_secs(300))
}

/// Prints the guest's console when the test fails.
struct ConsoleOnPanic<'a>(&'a Guest);

impl Drop for ConsoleOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            std::thread::sleep(Duration::from_secs(1));
            eprintln!("--- guest console ---\n{}", self.0.console());
        }
    }
}

/// A dxfs image of a small file, a 4 MiB one (`vol.bin`, every block
/// written) and an 8 MiB volume (`vol`, `mkfs --volume`), and a zeroed
/// (sparse) image for a raw namespace.
fn images(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let src = dir.join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("hello.txt"), b"hello\n").unwrap();
    let mut vol = vec![0u8; FILE as usize];
    dioxide_testkit::Rng::new(5).fill(&mut vol);
    std::fs::write(src.join("vol.bin"), &vol).unwrap();
    let fs = dir.join("fs.img");
    dioxide::fstool::mkfs_with(&fs, Some(&src), &[("vol".into(), VOLUME)], None, 4096, "").unwrap();
    let vol = dir.join("vol.img");
    std::fs::File::create(&vol).unwrap().set_len(VOL).unwrap();
    (fs, vol)
}

/// fio through its NBD engine on `uri`: 4 KiB random writes over `size`
/// bytes from `offset`, each block with a crc32c header, then read back
/// and verified (`verify_only`: only the reading and verifying, of what an
/// earlier run wrote: fio's offsets and data come from its fixed seed).
/// Returns fio's error and the blocks written and read.
fn fio(dir: &Path, uri: &str, range: (&str, &str), verify_only: bool) -> (i64, u64, u64, String) {
    let mut cmd = Command::new("fio");
    cmd.args([
        "--name=writes",
        "--ioengine=nbd",
        &format!("--uri={uri}"),
        "--rw=randwrite",
        "--bs=4k",
        &format!("--offset={}", range.0),
        &format!("--size={}", range.1),
        "--iodepth=16",
        "--verify=crc32c",
        "--verify_state_save=0",
        "--output-format=json",
    ])
    .current_dir(dir);
    if verify_only {
        cmd.arg("--verify_only");
    }
    let out = cmd.output().expect("fio (the test command installs it)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    let json = dioxide::nbdbench::fio_report(&text)
        .unwrap_or_else(|| panic!("fio printed no JSON: {text}\n{err}"));
    let job = &json["jobs"][0];
    (
        job["error"].as_i64().unwrap_or(-1),
        job["write"]["total_ios"].as_u64().unwrap_or(0),
        job["read"]["total_ios"].as_u64().unwrap_or(0),
        err,
    )
}

#[test]
fn a_raw_namespace_takes_writes_that_read_back_after_a_restart() {
    let dir = TempDir::new("writes");
    let (fs, vol) = images(dir.path());
    let mut data = vec![0u8; 16 << 20];
    dioxide_testkit::Rng::new(22).fill(&mut data);
    let file = dir.path().join("data.bin");
    std::fs::write(&file, &data).unwrap();
    let rw = ["nbd.rw=all", "nbd.rw_from=10.0.2.2/32"];

    let (guest, url) = serve(&fs, &vol, &rw);
    let show = ConsoleOnPanic(&guest);
    let console = guest.console();
    assert!(
        console.contains("nbd: nvme0n1 stays read-only: it holds a mounted dxfs filesystem (its files can take writes: nbd.rw=files)"),
        "{console}"
    );
    assert!(
        console.contains(
            "nbd: writable: nvme1n1, 3 file(s); writes from 10.0.2.2/32; connections from any address"
        ),
        "{console}"
    );
    // What the clients are told.
    let (ok, out, err) = run(Command::new("nbdinfo").arg(format!("{url}/nvme1n1")));
    assert!(ok, "{err}");
    let info = String::from_utf8_lossy(&out);
    assert!(info.contains("is_read_only: false"), "{info}");
    assert!(info.contains("can_multi_conn: true"), "{info}");
    assert!(info.contains("can_fua: true"), "{info}");
    let (ok, out, _) = run(Command::new("nbdinfo").arg(format!("{url}/nvme0n1")));
    assert!(ok && String::from_utf8_lossy(&out).contains("is_read_only: true"));

    // nbdcopy of a file into the volume, and back.
    let (ok, _, err) = run(Command::new("nbdcopy")
        .arg(&file)
        .arg(format!("{url}/nvme1n1")));
    assert!(ok, "nbdcopy into the volume: {err}");
    let (ok, got, err) = run(Command::new("nbdcopy").args([&format!("{url}/nvme1n1"), "-"]));
    assert!(ok, "{err}");
    assert_eq!(got.len() as u64, VOL);
    assert!(
        got[..data.len()] == data[..],
        "the volume differs from the file"
    );

    // fio: random writes with crc32c headers, read back and verified.
    let (error, written, read, err) =
        fio(dir.path(), &format!("{url}/nvme1n1"), ("32M", "16M"), false);
    assert_eq!(error, 0, "fio: {err}");
    assert_eq!((written, read), (4096, 4096), "fio: {err}");

    // The file: its written blocks overwritten by nbdcopy and by fio.
    let (ok, out, err) = run(Command::new("nbdinfo").arg(format!("{url}/vol.bin")));
    assert!(ok, "{err}");
    let info = String::from_utf8_lossy(&out);
    assert!(info.contains("is_read_only: false"), "{info}");
    // Reads stay at any byte (libnbd refuses requests not aligned to the
    // minimum it is told): a writable file of 6 bytes still reads.
    assert!(info.contains("block_size_minimum: 1"), "{info}");
    let (ok, got, err) = run(Command::new("nbdcopy").args([&format!("{url}/hello.txt"), "-"]));
    assert!(ok && got == b"hello\n", "{err}");
    let mut fresh = vec![0u8; FILE as usize];
    dioxide_testkit::Rng::new(6).fill(&mut fresh);
    let fresh_file = dir.path().join("fresh.bin");
    std::fs::write(&fresh_file, &fresh).unwrap();
    let (ok, _, err) = run(Command::new("nbdcopy")
        .arg(&fresh_file)
        .arg(format!("{url}/vol.bin")));
    assert!(ok, "nbdcopy into the file: {err}");
    let (ok, got, err) = run(Command::new("nbdcopy").args([&format!("{url}/vol.bin"), "-"]));
    assert!(ok, "{err}");
    assert!(got == fresh, "the file differs from what nbdcopy wrote");
    let (error, written, read, err) =
        fio(dir.path(), &format!("{url}/vol.bin"), ("0", "4M"), false);
    assert_eq!(error, 0, "fio on the file: {err}");
    assert_eq!((written, read), (1024, 1024), "fio: {err}");

    // The volume: nbdcopy of the 16 MiB file's first 8 MiB into it.
    let vol_data = &data[..VOLUME as usize];
    let vol_file = dir.path().join("vol-data.bin");
    std::fs::write(&vol_file, vol_data).unwrap();
    let (ok, _, err) = run(Command::new("nbdcopy")
        .arg(&vol_file)
        .arg(format!("{url}/vol")));
    assert!(ok, "nbdcopy into the volume: {err}");

    // The read-only namespace refuses writes (EPERM: nbdcopy fails).
    let (ok, _, _) = run(Command::new("nbdcopy")
        .arg(&file)
        .arg(format!("{url}/nvme0n1")));
    assert!(!ok, "a write to the mounted namespace succeeded");

    // A device write error fails the write that hit it and no other.
    let port: u16 = url.rsplit(':').next().unwrap().parse().unwrap();
    let (mut c, _) = Client::open(port, "nvme1n1");
    let block = vec![0x5au8; 4096];
    for (h, off) in [(1u64, BAD_SECTOR * 512), (2, BAD_SECTOR * 512 + 8192)] {
        c.request(raw::WRITE, 0, h, off, 4096);
        c.send(&block);
    }
    let mut replies = [c.reply_header(), c.reply_header()];
    replies.sort();
    assert_eq!(replies, [(1, 5), (2, 0)], "EIO for the bad sector only");
    assert!(
        guest
            .console()
            .contains(&format!("write of nvme1n1 at {}", BAD_SECTOR * 512)),
        "the failed write is not logged"
    );
    // FLUSH is answered.
    c.request(raw::FLUSH, 0, 3, 0, 0);
    assert_eq!(c.reply_header(), (3, 0));
    c.disconnect();
    drop(show);
    drop(guest);

    // What reached the image is what the clients wrote.
    let image = std::fs::read(&vol).unwrap();
    assert!(image[..data.len()] == data[..]);
    assert!(image[BAD_SECTOR as usize * 512 + 8192..][..4096] == block[..]);

    // Restarted on the same images, read-only (the default): the volume
    // reads back identical, and fio verifies every block it wrote (it
    // counts the writes it skips; a write would fail with EPERM here).
    let (guest, url) = serve(&fs, &vol, &[]);
    let _show = ConsoleOnPanic(&guest);
    let (ok, got, err) = run(Command::new("nbdcopy").args([&format!("{url}/nvme1n1"), "-"]));
    assert!(ok, "{err}");
    assert!(got == image, "the volume after the restart differs");
    let (ok, got, err) = run(Command::new("nbdcopy").args([&format!("{url}/vol"), "-"]));
    assert!(ok, "{err}");
    assert!(got == vol_data, "the dxfs volume after the restart differs");
    let (error, _, read, err) = fio(dir.path(), &format!("{url}/nvme1n1"), ("32M", "16M"), true);
    assert_eq!(error, 0, "fio verify after the restart: {err}");
    assert_eq!(read, 4096, "fio: {err}");
    let (error, _, read, err) = fio(dir.path(), &format!("{url}/vol.bin"), ("0", "4M"), true);
    assert_eq!(error, 0, "fio verify of the file after the restart: {err}");
    assert_eq!(read, 1024, "fio: {err}");
    assert!(
        std::fs::read(&vol).unwrap() == image,
        "the read-only run changed the volume"
    );
    // The control: one byte of a block fio wrote changed behind the
    // appliance's back (QEMU reads the image with O_DIRECT: it sees it)
    // fails fio's verification.
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut f = std::fs::OpenOptions::new().write(true).open(&vol).unwrap();
        let at = (32 << 20) + 77 * 4096 + 1000;
        f.seek(SeekFrom::Start(at)).unwrap();
        f.write_all(&[image[at as usize] ^ 0xff]).unwrap();
        f.sync_all().unwrap();
    }
    let (error, _, _, err) = fio(dir.path(), &format!("{url}/nvme1n1"), ("32M", "16M"), true);
    assert_ne!(error, 0, "fio verified a damaged block");
    assert!(err.contains("verify"), "{err}");
}

#[test]
fn only_the_listed_clients_write_and_only_the_allowed_ones_connect() {
    let dir = TempDir::new("writes-access");
    let (fs, vol) = images(dir.path());
    // QEMU's user network: every client comes from 10.0.2.2, here not
    // in the write list.
    let (guest, url) = serve(&fs, &vol, &["nbd.rw=nvme1n1", "nbd.rw_from=10.0.2.99/32"]);
    let show = ConsoleOnPanic(&guest);
    let (ok, out, err) = run(Command::new("nbdinfo").arg(format!("{url}/nvme1n1")));
    assert!(ok, "{err}");
    assert!(String::from_utf8_lossy(&out).contains("is_read_only: true"));
    let port: u16 = url.rsplit(':').next().unwrap().parse().unwrap();
    let (mut c, _) = Client::open(port, "nvme1n1");
    c.request(raw::WRITE, 0, 1, 0, 4096);
    c.send(&[1u8; 4096]);
    assert_eq!(c.reply_header(), (1, 1), "EPERM");
    // Served on: a read after the refused write.
    assert_eq!(c.read_at(0, 4096), Ok(vec![0u8; 4096]));
    c.disconnect();
    drop(show);
    drop(guest);
    assert!(std::fs::read(&vol).unwrap().iter().all(|&b| b == 0));

    // Not in the connect list: reset before the greeting.
    let (guest, url) = serve(&fs, &vol, &["nbd.allow=10.0.2.99/32"]);
    let _show = ConsoleOnPanic(&guest);
    let port: u16 = url.rsplit(':').next().unwrap().parse().unwrap();
    assert!(
        raw::Client::try_greeting(port, Duration::from_secs(10)).is_err(),
        "a client outside nbd.allow was greeted"
    );
    let said = "nbd: connection from 10.0.2.2";
    let t0 = std::time::Instant::now();
    while !guest.console().contains(said) && t0.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(100));
    }
    let console = guest.console();
    assert!(
        console.contains(said) && console.contains("refused: not in nbd.allow"),
        "{console}"
    );
}
