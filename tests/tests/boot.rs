//! Boots the kernel in QEMU and checks what it does with an NVMe namespace.

use dioxide_tests::*;

fn digest_matches(lbs: u32, completion: &str, seed: u64) {
    let dir = TempDir::new(&format!("digest-{lbs}-{completion}"));
    let img = dir.path().join("disk.img");
    let want = random_image(&img, 64 << 20, seed);
    let mut cfg = config(
        Some(&img),
        &["selftest=digest", &format!("nvme.completion={completion}")],
    );
    cfg.nvme[0].namespaces[0].lbs = lbs;
    let out = boot(&cfg);
    assert_eq!(out.status, 0, "console:\n{}", out.console);
    assert_digest(&out, 64 << 20, &want);
    assert!(
        out.console.contains(&format!("blocks of {lbs} bytes")),
        "{}",
        out.console
    );
}

#[test]
fn digest_of_64mib_image_with_512_byte_blocks() {
    digest_matches(512, "poll", 1);
}

#[test]
fn digest_of_64mib_image_with_4096_byte_blocks() {
    digest_matches(4096, "poll", 2);
}

#[test]
fn digest_with_msix_interrupt_completion() {
    digest_matches(4096, "irq", 3);
}

fn rw_selftest(lbs: u32, completion: &str) {
    let dir = TempDir::new(&format!("rw-{lbs}-{completion}"));
    let img = dir.path().join("disk.img");
    let before = random_image(&img, 16 << 20, 7);
    let mut cfg = config(
        Some(&img),
        &["selftest=rw", &format!("nvme.completion={completion}")],
    );
    cfg.nvme[0].namespaces[0].lbs = lbs;
    let out = boot(&cfg);
    assert_eq!(out.status, 0, "console:\n{}", out.console);
    assert!(
        out.result_lines().any(|l| l == "rw ok"),
        "console:\n{}",
        out.console
    );
    for qd in [1, 4, 32] {
        assert!(out
            .console
            .contains(&format!("pass at queue depth {qd} verified")));
    }
    // The scratch range was restored: the image is unchanged.
    assert_eq!(sha256_file(&img), before);
}

#[test]
fn rw_selftest_polled_512() {
    rw_selftest(512, "poll");
}

#[test]
fn rw_selftest_interrupts_4096() {
    rw_selftest(4096, "irq");
}

#[test]
fn deliberate_fault_is_reported_and_exits_nonzero() {
    let out = boot(&config(None, &["selftest=fault"]));
    assert_eq!(out.status, 4, "console:\n{}", out.console);
    assert!(
        out.console
            .contains("EXCEPTION vector 14 (#PF page fault) error_code=0x0 rip=0x"),
        "console:\n{}",
        out.console
    );
    assert!(
        out.console.contains(" cr2=0x0 "),
        "console:\n{}",
        out.console
    );
}

#[test]
fn no_nvme_controller_is_a_clear_error() {
    let out = boot(&config(None, &[]));
    assert_eq!(out.status, 2, "console:\n{}", out.console);
    assert!(
        out.console.contains("no NVMe controller found on PCI"),
        "{}",
        out.console
    );
}

#[test]
fn unknown_selftest_and_bad_arguments_are_refused() {
    let out = boot(&config(None, &["selftest=bogus"]));
    assert_eq!(out.status, 2);
    assert!(
        out.console.contains("unknown self-test \"bogus\""),
        "{}",
        out.console
    );
    let out = boot(&config(None, &["nvme.completion=sometimes"]));
    assert_eq!(out.status, 2);
    assert!(
        out.console.contains("expected poll or irq"),
        "{}",
        out.console
    );
}

#[test]
fn boot_logs_pci_functions_and_devices() {
    let dir = TempDir::new("boot-log");
    let img = dir.path().join("disk.img");
    random_image(&img, 1 << 20, 9);
    // No self-test: the appliance comes up and stays in its run loop until the
    // host's timeout kills QEMU.
    let mut cfg = config(Some(&img), &[]);
    cfg.timeout = Some(std::time::Duration::from_secs(8));
    let mut guest = dioxide_qemu::Guest::spawn(&cfg).expect("spawn");
    let pid = guest.pid().expect("pid");
    // (QEMU is killed at 8 s only in wait(): a slow boot may take longer.)
    let console = wait_for_console(
        &mut guest,
        "run loop started",
        std::time::Duration::from_secs(120),
    );
    assert!(
        console.contains("[1b36:0010] class 01.08.02 NVMe controller"),
        "{console}"
    );
    assert!(
        console.contains("namespace 1: 2048 blocks of 512 bytes"),
        "{console}"
    );
    assert!(console.contains("TSC "), "{console}");
    assert!(console.contains("heap "), "{console}");
    // The timeout kills QEMU and says so.
    match guest.wait() {
        Err(dioxide_qemu::Error::Timeout(8)) => {}
        other => panic!("expected a timeout, got {other:?}"),
    }
    // wait() killed and reaped QEMU: its process is gone (not even a
    // zombie), or the pid was reused by another program.
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    assert!(
        !stat.contains("(qemu-system-x86)"),
        "QEMU {pid} still there: {stat}"
    );
}

#[test]
fn legacy_pci_config_ports_when_there_is_no_mcfg() {
    // i440fx ("pc") has no PCIe ECAM: PCI config goes through ports 0xcf8/0xcfc.
    let dir = TempDir::new("legacy-pci");
    let img = dir.path().join("disk.img");
    let want = random_image(&img, 4 << 20, 11);
    let mut cfg = config(Some(&img), &["selftest=digest"]);
    cfg.extra = vec!["-machine".into(), "pc".into()];
    let out = boot(&cfg);
    assert_eq!(out.status, 0, "console:\n{}", out.console);
    assert!(
        out.console.contains("ECAM none (legacy PCI config ports)"),
        "{}",
        out.console
    );
    assert!(out
        .result_lines()
        .any(|l| l == format!("digest nvme0n1 bytes={} sha256={want}", 4 << 20)));
}

#[test]
fn deliberate_panic_is_reported_with_status_5() {
    let out = boot(&config(None, &["selftest=panic"]));
    assert_eq!(out.status, 5, "console:\n{}", out.console);
    assert!(
        out.console
            .contains("PANIC: panicked at kernel/src/diag/selftest.rs"),
        "console:\n{}",
        out.console
    );
    assert!(
        out.console.contains("selftest=panic: deliberate panic"),
        "console:\n{}",
        out.console
    );
}

/// A device that fails a read: QEMU's blkdebug driver under the NVMe drive
/// injects EIO at sector 4096 (byte 2 MiB). The digest self-test reports
/// the failed read and the guest exits 3 (device error).
#[test]
fn read_error_of_the_device_is_status_3() {
    let dir = TempDir::new("device-error");
    let img = dir.path().join("disk.img");
    random_image(&img, 4 << 20, 13);
    let rules = dir.path().join("blkdebug.conf");
    std::fs::write(
        &rules,
        "[inject-error]\nevent = \"read_aio\"\nerrno = \"5\"\nsector = \"4096\"\n",
    )
    .unwrap();
    let opt = |p: &std::path::Path| p.to_str().unwrap().replace(',', ",,");
    let mut cfg = config(None, &["selftest=digest"]);
    // raw over blkdebug: the raw driver emits the read_aio event.
    cfg.extra = vec![
        "-drive".into(),
        format!(
            "driver=raw,if=none,id=nvm0,file.driver=blkdebug,file.config={},file.image.driver=file,file.image.filename={}",
            opt(&rules),
            opt(&img)
        ),
        "-device".into(),
        "nvme,drive=nvm0,serial=dioxide0,logical_block_size=512,physical_block_size=512".into(),
    ];
    let out = boot(&cfg);
    assert_eq!(out.status, 3, "console:\n{}", out.console);
    assert!(
        out.result_lines()
            .any(|l| l.starts_with("error digest read at byte 2097152: ")
                && l.contains("Unrecovered Read Error")),
        "console:\n{}",
        out.console
    );
    assert!(
        !out.result_lines().any(|l| l.starts_with("digest nvme0n1")),
        "a digest despite the error:\n{}",
        out.console
    );
}
