//! Booting like a server: the kernel on a GRUB ISO (made per run, the
//! kernel arguments in its grub.cfg) under QEMU's SeaBIOS and under OVMF
//! (UEFI), on the same NVMe and virtio-net devices as the PVH boots. Each
//! firmware runs the digest self-test (the sha256 of the namespace equals
//! the image's), the files self-test (every file of the dxfs tree read by
//! the kernel equals the host's) and serves NBD (files read with nbdcopy, a
//! range of the raw namespace with the raw protocol, bytes compared).
//!
//! Each test boots three times, one after the other; OVMF takes 7-8 s
//! under TCG to reach GRUB, so the UEFI boots get their own deadline.

use dioxide::nbdbench::NetMode;
use dioxide_qemu::Boot;
use dioxide_tests::nbdraw::Client;
use dioxide_tests::*;
use sha2::Digest;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// A boot's deadline: firmware, GRUB and the kernel, under TCG on a machine
/// running other tests.
fn deadline(boot: Boot) -> Duration {
    match boot {
        Boot::Uefi => Duration::from_secs(240),
        _ => Duration::from_secs(180),
    }
}

/// The kernel came through GRUB (multiboot2), and under UEFI OVMF's boot
/// manager loaded GRUB from the CD-ROM.
fn assert_booted_by(boot: Boot, console: &str) {
    assert!(
        console.contains("via Multiboot2, cmdline "),
        "{}: not a multiboot2 boot:\n{console}",
        boot.name()
    );
    let ovmf = console.contains("BdsDxe: starting Boot0001 \"UEFI QEMU DVD-ROM");
    assert_eq!(
        ovmf,
        boot == Boot::Uefi,
        "{}: OVMF's boot manager line:\n{console}",
        boot.name()
    );
}

/// A dxfs image of a random tree: (image, source directory, file paths).
fn tree_image(dir: &Path, seed: u64) -> (std::path::PathBuf, std::path::PathBuf, Vec<String>) {
    let src = dir.join("src");
    std::fs::create_dir_all(&src).unwrap();
    let paths = random_tree(&src, seed, 30);
    let img = dir.join("fs.img");
    assert_eq!(
        dioxide::fstool::mkfs(&img, &src, None, 4096, "server").unwrap(),
        0
    );
    (img, src, paths)
}

fn boot_config(boot: Boot, img: &Path, args: &[&str]) -> dioxide_qemu::Config {
    let mut cfg = config(Some(img), args);
    cfg.boot = boot;
    cfg.timeout = Some(deadline(boot));
    cfg
}

/// `selftest=digest`: the namespace's sha256 is the image's.
///
/// The UEFI digest boot runs on a machine without legacy timers (`q35,
/// pit=off,hpet=off`), as a modern server may be: the TSC is calibrated
/// against the ACPI PM timer, and the RSDP comes from GRUB's tag (no BIOS
/// area scan on UEFI).
fn digest(boot: Boot, img: &Path) {
    let want = sha256_file(img);
    let bytes = std::fs::metadata(img).unwrap().len();
    let mut cfg = boot_config(boot, img, &["selftest=digest"]);
    if boot == Boot::Uefi {
        cfg.machine = "q35,pit=off,hpet=off".into();
    }
    let out = dioxide_tests::boot(&cfg);
    assert_eq!(out.status, 0, "console:\n{}", out.console);
    assert_booted_by(boot, &out.console);
    if boot == Boot::Uefi {
        assert!(
            out.console
                .contains("MHz (calibrated against ACPI PM timer)"),
            "console:\n{}",
            out.console
        );
    }
    assert!(
        out.console.contains("cmdline \"selftest=digest\""),
        "the run's arguments in grub.cfg:\n{}",
        out.console
    );
    assert_digest(&out, bytes, &want);
}

/// `selftest=files`: every file the kernel reads equals the host's.
fn files(boot: Boot, img: &Path, src: &Path, paths: &[String]) {
    let out = dioxide_tests::boot(&boot_config(boot, img, &["selftest=files"]));
    assert_eq!(out.status, 0, "console:\n{}", out.console);
    assert_booted_by(boot, &out.console);
    let got: std::collections::BTreeMap<String, String> = out
        .result_lines()
        .filter_map(|l| l.strip_prefix("file "))
        .filter_map(|r| r.split_once(" bytes="))
        .map(|(p, i)| (p.to_string(), i.to_string()))
        .collect();
    let want: std::collections::BTreeMap<String, String> = paths
        .iter()
        .map(|p| {
            let data = std::fs::read(src.join(p)).unwrap();
            (
                format!("/{p}"),
                format!(
                    "{} sha256={}",
                    data.len(),
                    hex(&sha2::Sha256::digest(&data))
                ),
            )
        })
        .collect();
    assert_eq!(got, want, "console:\n{}", out.console);
    assert!(
        out.console
            .contains(&format!("files done count={}", paths.len())),
        "{}",
        out.console
    );
}

/// The appliance serving NBD: the tree's dense 2.5 MiB file with nbdcopy,
/// and 1 MiB of the raw namespace at an odd sector with the raw protocol,
/// compared with the host's bytes.
fn nbd(boot: Boot, img: &Path, src: &Path) {
    // A second QMP monitor, for the screenshot (the CLI's own one belongs to
    // its console reader).
    let qmp_dir = dioxide_qemu::monitor::MonitorDir::new().unwrap();
    let mut cfg = boot_config(boot, img, &[]);
    cfg.extra.push("-qmp".into());
    cfg.extra
        .push(qmp_dir.qemu_arg().to_string_lossy().into_owned());
    let app = dioxide::nbdbench::boot(cfg, NetMode::User)
        .unwrap_or_else(|e| panic!("{}: {e}", boot.name()));
    let console = app.guest.console();
    assert_booted_by(boot, &console);
    screen_shows_the_log(boot, &qmp_dir, &console);
    let big = "large-random.bin";
    let want = std::fs::read(src.join(big)).unwrap();
    let url = format!("{}/{big}", app.url);
    let (ok, got, err) = run_within(
        Command::new("nbdcopy").args([&url, "-"]),
        Duration::from_secs(120),
    );
    assert!(ok, "nbdcopy {url}: {err}");
    assert!(
        got == want,
        "{big}: {} bytes read, {} expected",
        got.len(),
        want.len()
    );
    let image = std::fs::read(img).unwrap();
    let (mut c, size) = Client::open(app.port, "nvme0n1");
    assert_eq!(size, image.len() as u64);
    let at = 512 * 77;
    let len = (1u32 << 20).min((image.len() - at) as u32);
    let got = c
        .read_at(at as u64, len)
        .unwrap_or_else(|e| panic!("read nvme0n1: error {e}"));
    assert!(
        got == image[at..at + len as usize],
        "nvme0n1 at {at}: bytes differ"
    );
    c.disconnect();
}

/// The screen (QEMU's `screendump` of the VGA device: OVMF's GOP, SeaBIOS's
/// VBE mode) shows what the serial console shows: the boot line and the NBD
/// service's line, rendered by the kernel's framebuffer console. The check
/// renders the expected text with the console crate's own font and compares
/// pixels, so no OCR is involved.
fn screen_shows_the_log(boot: Boot, qmp_dir: &dioxide_qemu::monitor::MonitorDir, console: &str) {
    let mut qmp = dioxide_qemu::monitor::Qmp::connect(&qmp_dir.socket())
        .unwrap_or_else(|e| panic!("{}: QMP: {e}", boot.name()));
    let ppm = qmp_dir.path().join("screen.ppm");
    let out = qmp
        .hmp(&format!("screendump {}", ppm.display()))
        .unwrap_or_else(|e| panic!("{}: screendump: {e}", boot.name()));
    assert!(out.is_empty(), "{}: screendump: {out}", boot.name());
    let bytes = std::fs::read(&ppm).unwrap();
    let screen = dioxide_console::screen::Screen::from_ppm(&bytes)
        .unwrap_or_else(|e| panic!("{}: {}: {e:?}", boot.name(), ppm.display()));
    let (cols, _) = screen.text_size();
    assert!(
        console.contains("console: framebuffer"),
        "{}: no framebuffer console:\n{console}",
        boot.name()
    );
    for key in ["via Multiboot2, cmdline", "nbd: listening on port"] {
        let line = console
            .lines()
            .find(|l| l.contains(key))
            .unwrap_or_else(|| panic!("{}: no {key:?} line:\n{console}", boot.name()));
        // The screen wraps lines longer than its width: check the first row.
        let first: String = line.chars().take(cols).collect();
        assert!(
            screen.find_text(&first).is_some(),
            "{}: the screen ({}) does not show {first:?}",
            boot.name(),
            ppm.display()
        );
    }
}

fn serves_and_self_tests(boot: Boot, seed: u64) {
    let dir = TempDir::new(&format!("server-boot-{}", boot.name()));
    let (img, src, paths) = tree_image(dir.path(), seed);
    assert!(paths.iter().any(|p| p == "large-random.bin"));
    nbd(boot, &img, &src);
    digest(boot, &img);
    files(boot, &img, &src, &paths);
}

#[test]
fn bios_boot_serves_nbd_and_passes_the_digest_and_files_self_tests() {
    serves_and_self_tests(Boot::Bios, 31);
}

#[test]
fn uefi_boot_serves_nbd_and_passes_the_digest_and_files_self_tests() {
    serves_and_self_tests(Boot::Uefi, 32);
}

/// An ISO made without kernel arguments (`dioxide image`, no `--cmdline`),
/// as a server boots it: the address comes from DHCP (QEMU's user network
/// leases 10.0.2.15, router 10.0.2.2), and the screen's last lines say the
/// lease in words (`router 10.0.2.2`, not Rust's `Some(..)`) and where to
/// connect; a file is then read through the forwarded port.
#[test]
fn an_iso_without_arguments_takes_dhcp_and_says_where_to_connect() {
    let dir = TempDir::new("server-boot-dhcp");
    let (img, src, paths) = tree_image(dir.path(), 33);
    let iso = dir.path().join("dhcp.iso");
    dioxide_qemu::iso::build(&kernel(), &[], 0, &iso).unwrap_or_else(|e| panic!("{e}"));
    let mut cfg = boot_config(Boot::Bios, &img, &[]);
    cfg.iso = Some(iso);
    let mut app = dioxide::nbdbench::boot(cfg, NetMode::User).unwrap_or_else(|e| panic!("{e}"));
    let serving = format!(
        "nbd: serving {} exports at nbd://10.0.2.15:10809/",
        paths.len() + 1
    );
    let console = wait_for_console(&mut app.guest, &serving, Duration::from_secs(60));
    assert!(console.contains("cmdline \"\""), "{console}");
    assert!(
        console.contains("net: DHCP: address 10.0.2.15/24 router 10.0.2.2\n"),
        "{console}"
    );
    // A name that needs no percent-encoding in the URI.
    let file = paths
        .iter()
        .find(|p| {
            p.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._/".contains(&b))
        })
        .expect("a plain file name");
    let (ok, got, err) = run_within(
        Command::new("nbdcopy").args([&format!("{}/{file}", app.url), "-"]),
        Duration::from_secs(120),
    );
    assert!(ok, "nbdcopy {file}: {err}");
    assert!(got == std::fs::read(src.join(file)).unwrap(), "{file}");
}

/// `dioxide bench local --boot uefi`: the in-guest benchmark booted by
/// OVMF and GRUB, in its smallest form (one device, one queue depth, 1 s
/// rows, no host benchmark); every row did reads.
#[test]
fn bench_local_under_uefi() {
    let dir = TempDir::new("server-boot-bench");
    let opts = dioxide::bench::LocalOpts {
        qds: vec![4],
        devs: vec!["null".into()],
        completions: vec!["poll".into()],
        ops: vec!["read".into()],
        secs: 1,
        out: dir.path().to_path_buf(),
        file_size: 8 << 20,
        accel: dioxide_qemu::accel::Accel::Tcg,
        mem: 256,
        host_ios: 0,
        host_threads: String::new(),
        from_log: None,
        boot: Boot::Uefi,
        sweep: Default::default(),
    };
    assert_eq!(dioxide::bench::local(&opts).unwrap(), 0);
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("results.json")).unwrap()).unwrap();
    assert_eq!(json["config"]["boot"], "uefi", "{json:#}");
    // What the guest itself said about its boot (its boot information, on
    // the benchmark's `file` line), not the CLI's copy of its option.
    let boots = json["config"]["boots"].as_array().expect("boots");
    assert_eq!(boots.len(), 1, "{json:#}");
    assert_eq!(boots[0]["guest_firmware"], "uefi", "{json:#}");
    assert_eq!(boots[0]["guest_protocol"], "multiboot2", "{json:#}");
    let rows = json["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 3, "{json:#}");
    for r in rows {
        assert!(r["ios"].as_u64().unwrap_or(0) > 0, "{r}");
    }
}
