//! The error type of the runner, shared with the CLI (which re-exports it).

use std::path::PathBuf;

/// Errors of the host tools.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("disk image {path}: {why}")]
    Disk { path: PathBuf, why: String },
    #[error("building the kernel failed:\n{0}")]
    Build(String),
    #[error("cannot start {program}: {source} (install it: {hint})")]
    Spawn {
        program: String,
        hint: &'static str,
        source: std::io::Error,
    },
    #[error("qemu failed (exit status {status}){stderr}")]
    Qemu { status: String, stderr: String },
    #[error("the guest reset or stopped without powering off (triple fault?){0}")]
    NoPowerOff(String),
    /// The guest's power-off line and QEMU's exit code disagree: the status
    /// read from the console cannot be trusted.
    #[error("the guest powered off with status {guest} (QEMU should exit with {expected}) but QEMU's exit status was {qemu}{stderr}")]
    ExitMismatch {
        guest: u8,
        expected: i32,
        qemu: String,
        stderr: String,
    },
    /// `--net tap` cannot work on this machine or account (not root, no
    /// CAP_NET_ADMIN, no /dev/net/tun): a reason to use `--net user`, and
    /// for tests to skip.
    #[error("--net tap: {0}; use --net user instead")]
    TapUnavailable(String),
    /// Making the tap device failed for another reason (`ip` missing, ...).
    #[error("--net tap: {0}")]
    Tap(String),
    /// A host tool or file that a boot or an ISO needs is not installed.
    #[error("{what} is missing: install the Debian package {package} (./dx setup installs it)")]
    Missing { what: String, package: &'static str },
    /// Making the bootable ISO failed (grub-mkrescue's message).
    #[error("making the ISO: {0}")]
    Iso(String),
    #[error("timed out after {0} s; QEMU killed")]
    Timeout(u64),
    #[error("{0}")]
    Usage(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
}

impl Error {
    /// Exit status of the CLI for this error: 2 for bad input, 124 for a
    /// timeout, 125 for failures of the host tools.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Disk { .. } | Error::Usage(_) | Error::TapUnavailable(_) => 2,
            Error::Timeout(_) => 124,
            _ => 125,
        }
    }
}

pub fn io_err(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let context = context.into();
    move |source| Error::Io { context, source }
}
