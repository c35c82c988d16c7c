//! Building the kernel ELF.

use crate::{workspace_root, Error};
use std::path::PathBuf;
use std::process::Command;

/// A `cargo` command in the workspace, without the settings of an outer cargo
/// (when run from `cargo test`), which are not ours.
pub fn cargo() -> Command {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(workspace_root());
    for v in [
        "CARGO_TARGET_DIR",
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_BUILD_TARGET",
        "CARGO_BUILD_RUSTFLAGS",
        "CARGO_MAKEFLAGS",
        "MAKEFLAGS",
        "MFLAGS",
    ] {
        cmd.env_remove(v);
    }
    cmd
}

/// Runs a cargo command from [`cargo`]; its output, or its stderr as the
/// error when it fails.
pub fn run(cmd: &mut Command) -> Result<std::process::Output, Error> {
    let out = cmd.output().map_err(|source| Error::Spawn {
        program: "cargo".into(),
        hint: "rustup",
        source,
    })?;
    if !out.status.success() {
        return Err(Error::Build(
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ));
    }
    Ok(out)
}

/// Builds the kernel (release) and returns the path of the ELF.
///
/// The kernel gets its own target directory, so that this works while an
/// outer `cargo test` holds the lock of the workspace's. `DIOXIDE_KERNEL`
/// names a prebuilt kernel instead.
pub fn build() -> Result<PathBuf, Error> {
    if let Some(p) = std::env::var_os("DIOXIDE_KERNEL") {
        let p = PathBuf::from(p);
        if !p.is_file() {
            return Err(Error::Usage(format!(
                "DIOXIDE_KERNEL={} is not a file",
                p.display()
            )));
        }
        return Ok(p);
    }
    let root = workspace_root();
    let target_dir = root.join("target").join("kernel");
    let mut cmd = cargo();
    cmd.args([
        "build",
        "--release",
        "-p",
        "dioxide-kernel",
        "--target",
        "x86_64-unknown-none",
    ])
    .arg("--target-dir")
    .arg(&target_dir);
    run(&mut cmd)?;
    Ok(target_dir
        .join("x86_64-unknown-none")
        .join("release")
        .join("dioxide-kernel"))
}
