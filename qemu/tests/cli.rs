//! The `dioxide` command line: bad input gets a clear message and a non-zero
//! exit before anything boots.

use std::process::Command;

fn dioxide(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_dioxide"))
        .args(args)
        .output()
        .expect("run dioxide");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
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

fn dioxide_out(args: &[&str]) -> (i32, Vec<u8>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_dioxide"))
        .args(args)
        .output()
        .expect("run dioxide");
    (
        out.status.code().unwrap_or(-1),
        out.stdout,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
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
    let (code, _, err) = dioxide_out(&[
        "mkfs",
        img.to_str().unwrap(),
        "--from",
        src.to_str().unwrap(),
    ]);
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

#[test]
fn mkfs_refuses_a_size_too_small_and_bad_block_sizes() {
    let d = temp("mkfs-small");
    let src = d.join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("f"), vec![1u8; 3 << 20]).unwrap();
    let img = d.join("fs.img");
    let (code, _, err) = dioxide_out(&[
        "mkfs",
        img.to_str().unwrap(),
        "--from",
        src.to_str().unwrap(),
        "--size",
        "1M",
    ]);
    assert_eq!(code, 2);
    assert!(err.contains("blocks but the image has 256"), "{err}");
    let (code, _, err) = dioxide_out(&[
        "mkfs",
        img.to_str().unwrap(),
        "--from",
        src.to_str().unwrap(),
        "--block-size",
        "2048",
    ]);
    assert_eq!(code, 2);
    assert!(err.contains("block size 2048"), "{err}");
    let (code, _, err) =
        dioxide_out(&["mkfs", img.to_str().unwrap(), "--from", "/nonexistent-dir"]);
    assert_ne!(code, 0);
    assert!(err.contains("/nonexistent-dir"), "{err}");
    let _ = std::fs::remove_dir_all(d);
}
