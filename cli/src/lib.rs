//! Host side of dioxide: build the kernel, disk images, benchmarks; booting
//! it in QEMU is the `dioxide-qemu` crate's (re-exported below). Used by the
//! `dioxide` CLI and by the integration tests.

pub mod bench;
pub mod boottime;
pub mod fstool;
pub mod image;
pub mod kernel;
pub mod linuxguest;
pub mod nbdbench;
pub mod offload;
pub mod remotebench;

// The QEMU runner is its own crate (`qemu/`); its modules keep their
// `crate::qemu`, `crate::accel`, `crate::iso`, `crate::tap` paths here.
pub use dioxide_qemu as qemu;
pub use dioxide_qemu::{accel, io_err, iso, tap, Error};

use std::path::PathBuf;

/// The repository root (this crate lives in `cli/`).
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."))
}
