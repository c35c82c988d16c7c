//! Choosing the accelerator.
//!
//! `auto` uses KVM only where it is measured to be fast. On some machines
//! /dev/kvm exists but runs guest code about a thousand times slower than TCG
//! (nested virtualization without hardware support), and `-cpu host` can abort.
//! So `auto` boots the kernel's `calibrate` self-test (a fixed amount of CPU
//! work) under KVM with a deadline and under TCG, and picks the faster. The
//! decision is remembered per machine (host name, kernel release, CPU model,
//! QEMU version) in `$XDG_CACHE_HOME/dioxide/accel` (or `~/.cache/...`).

use crate::{Config, Error};
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    pub fn name(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// The outcome of `auto`, with the reason.
#[derive(Clone, Debug)]
pub struct Choice {
    pub accel: Accel,
    pub reason: String,
}

fn read_trim(p: &str) -> String {
    std::fs::read_to_string(p)
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

fn fingerprint() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let qemu = std::process::Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .to_string()
        })
        .unwrap_or_default();
    format!(
        "{}|{}|{}|{}",
        read_trim("/proc/sys/kernel/hostname"),
        read_trim("/proc/sys/kernel/osrelease"),
        cpu,
        qemu
    )
}

fn cache_file() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("dioxide").join("accel"))
}

fn kvm_usable() -> Result<(), String> {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => Ok(()),
        Err(e) => Err(format!("/dev/kvm: {e}")),
    }
}

/// Boots the calibration under `accel`; the wall time, or why it failed.
fn measure(kernel: &Path, accel: Accel, deadline: Duration) -> Result<Duration, String> {
    let mut cfg = Config::new(kernel.to_path_buf());
    cfg.accel = accel;
    cfg.mem_mib = 128;
    cfg.args = vec!["selftest=calibrate".into(), "log=warn".into()];
    cfg.timeout = Some(deadline);
    match crate::run(&cfg) {
        Ok(o) if o.status == 0 => Ok(o.elapsed),
        Ok(o) => Err(format!("calibration exited with status {}", o.status)),
        Err(Error::Timeout(s)) => Err(format!("did not finish within {s} s")),
        Err(e) => Err(e.to_string().lines().next().unwrap_or("failed").to_string()),
    }
}

/// Decides between KVM and TCG by measurement, using the cache when it is for
/// this machine.
pub fn auto(kernel: &Path) -> Choice {
    if let Err(why) = kvm_usable() {
        return Choice {
            accel: Accel::Tcg,
            reason: format!("KVM unavailable ({why})"),
        };
    }
    let fp = fingerprint();
    let cache = cache_file();
    if let Some(c) = &cache {
        if let Ok(text) = std::fs::read_to_string(c) {
            let mut lines = text.lines();
            if lines.next() == Some(fp.as_str()) {
                if let Some(line) = lines.next() {
                    let accel = if line.starts_with("kvm") {
                        Accel::Kvm
                    } else {
                        Accel::Tcg
                    };
                    return Choice {
                        accel,
                        reason: format!("measured earlier: {} (cached in {})", line, c.display()),
                    };
                }
            }
        }
    }
    let kvm = measure(kernel, Accel::Kvm, Duration::from_secs(10));
    let tcg = measure(kernel, Accel::Tcg, Duration::from_secs(60));
    let show = |r: &Result<Duration, String>| match r {
        Ok(d) => format!("{} ms", d.as_millis()),
        Err(e) => e.clone(),
    };
    let accel = match (&kvm, &tcg) {
        (Ok(k), Ok(t)) if k < t => Accel::Kvm,
        (Ok(_), Err(_)) => Accel::Kvm,
        _ => Accel::Tcg,
    };
    let line = format!(
        "{} (calibration boot: kvm {}, tcg {})",
        accel.name(),
        show(&kvm),
        show(&tcg)
    );
    if let Some(c) = &cache {
        if let Some(dir) = c.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let _ = std::fs::write(c, format!("{fp}\n{line}\n"));
    }
    Choice {
        accel,
        reason: format!("measured: {line}"),
    }
}
