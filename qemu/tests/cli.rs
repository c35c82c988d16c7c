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
