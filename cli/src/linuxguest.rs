//! `bench nbd --targets linux`: a Linux guest under the same QEMU as the
//! appliance (same accelerator, memory, CPUs, NVMe controller and drive
//! options, NIC), running `qemu-nbd` on its emulated NVMe namespace: Linux
//! on the same emulated device, to compare the appliance's NBD figures
//! with.
//!
//! Prepared once under `target/dioxide/linux/` ([`prepare`]): Debian's
//! kernel (the package `linux-image-amd64` depends on, fetched with
//! `apt-get download` and unpacked with `dpkg-deb -x`, never installed),
//! the kernel modules the guest needs (NVMe, virtio-net, virtio-pci and
//! their dependencies, read from each module's `.modinfo`; the package
//! carries no `modules.dep`, depmod makes it at install time), busybox
//! (`busybox-static`), and an initramfs (cpio newc, written here) holding
//! busybox, the modules, the host's `/usr/bin/qemu-nbd` with every library
//! `ldd` names, and [`init_script`]. A stamp file says what the initramfs
//! was made from (the kernel package, qemu-nbd's version and file); it is
//! made again when that changes, and the kernel fetched again only when
//! the package does.

use crate::qemu::{Config, Guest, LinuxBoot, NbdReady};
use crate::{io_err, workspace_root, Error};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// The console line the guest prints once qemu-nbd listens, followed by
/// the options it runs with in parentheses.
pub const READY: &str = "linux-guest: serving /dev/nvme0n1";

/// The console line the guest prints when qemu-nbd would not start with
/// any options.
pub const FAILED: &str = "linux-guest: qemu-nbd would not start";

/// The disk the guest serves.
pub const DEVICE: &str = "/dev/nvme0n1";

/// What the initramfs is made of changes with this number (bump it when
/// [`init_script`] or [`initramfs`] change), so a cached one is made again.
const FORMAT: u32 = 1;

/// qemu-nbd's cache and AIO options, best first: the same as the host's
/// qemu-nbd ([`crate::nbdbench::HostNbd`]).
pub const QEMU_NBD_OPTIONS: [&str; 4] = [
    "--cache=none --aio=io_uring",
    "--cache=none --aio=native",
    "--cache=none --aio=threads",
    "--cache=writethrough --aio=threads",
];

/// The modules the guest loads (with their dependencies, unless the
/// kernel has them built in): the NVMe driver, virtio-net on virtio-pci,
/// igb (for `--nic igb`).
pub const MODULES: [&str; 4] = ["nvme", "virtio_pci", "virtio_net", "igb"];

/// Loaded first where the kernel has them as modules, so that the CRC
/// libraries NVMe's protection information needs (t10-pi) find their
/// crypto drivers instead of asking for a modprobe the guest does not
/// run.
pub const OPTIONAL_MODULES: [&str; 2] = ["crc64_rocksoft_generic", "crct10dif_generic"];

/// The busybox applets the init script uses, linked in /bin.
const APPLETS: [&str; 12] = [
    "sh", "mount", "insmod", "ip", "sleep", "cat", "echo", "mkdir", "ls", "dmesg", "true", "[",
];

/// The kernel command line: serial console, few kernel messages (every
/// console byte is an emulated UART write under TCG), a panic stops QEMU
/// (`-no-reboot`), no soft-lockup watchdog (the guest is paused with
/// SIGSTOP while the other targets run), and `dx_shared` (handed to init
/// as an environment variable): qemu-nbd's `--shared`.
pub fn cmdline(shared: usize) -> String {
    format!("console=ttyS0 loglevel=4 panic=-1 nowatchdog rdinit=/init dx_shared={shared}")
}

/// What [`prepare`] made.
#[derive(Clone, Debug)]
pub struct Prepared {
    /// The kernel (bzImage).
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// The kernel package (`linux-image-6.1.0-N-amd64`).
    pub package: String,
}

/// One module: its path under `/lib/modules/RELEASE/` and the names of
/// the modules it depends on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Module {
    pub path: String,
    pub deps: Vec<String>,
}

/// A module's name as the kernel knows it: its file name without `.ko`
/// (and a compression suffix), `-` as `_`.
pub fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let stem = file.split(".ko").next().unwrap_or(file);
    stem.replace('-', "_")
}

/// Parses `modules.dep` (`kernel/a/b.ko: kernel/c.ko kernel/d.ko`) into
/// modules by name.
pub fn parse_modules_dep(text: &str) -> BTreeMap<String, Module> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let Some((path, deps)) = line.split_once(':') else {
            continue;
        };
        let path = path.trim();
        if path.is_empty() {
            continue;
        }
        out.insert(
            module_name(path),
            Module {
                path: path.to_string(),
                deps: deps.split_whitespace().map(module_name).collect(),
            },
        );
    }
    out
}

/// `modules.dep` for `mods` (each module's direct dependencies; busybox
/// modprobe follows them).
pub fn render_modules_dep(mods: &BTreeMap<String, Module>, order: &[String]) -> String {
    let mut s = String::new();
    for name in order {
        let Some(m) = mods.get(name) else { continue };
        let deps: Vec<&str> = m
            .deps
            .iter()
            .filter_map(|d| mods.get(d).map(|m| m.path.as_str()))
            .collect();
        s += &format!("{}: {}\n", m.path, deps.join(" "));
    }
    s
}

/// The modules to load for `wanted`, each after those it depends on.
/// Names in `builtin` are skipped (the kernel has them); a wanted name or
/// a dependency found nowhere is an error, unless it is in `optional`.
pub fn resolve(
    mods: &BTreeMap<String, Module>,
    builtin: &BTreeSet<String>,
    wanted: &[&str],
    optional: &[&str],
) -> Result<Vec<String>, Error> {
    fn visit(
        name: &str,
        mods: &BTreeMap<String, Module>,
        builtin: &BTreeSet<String>,
        out: &mut Vec<String>,
        path: &mut Vec<String>,
    ) -> Result<(), Error> {
        let name = name.replace('-', "_");
        if builtin.contains(&name) || out.contains(&name) {
            return Ok(());
        }
        if path.contains(&name) {
            return Err(Error::Usage(format!(
                "kernel modules: dependency cycle {} -> {name}",
                path.join(" -> ")
            )));
        }
        let m = mods.get(&name).ok_or_else(|| {
            Error::Usage(format!(
                "kernel module {name} (needed by {}) is neither built in nor in the kernel package",
                path.last().map_or("the Linux guest", |p| p.as_str())
            ))
        })?;
        path.push(name.clone());
        for d in &m.deps {
            visit(d, mods, builtin, out, path)?;
        }
        path.pop();
        out.push(name);
        Ok(())
    }
    let mut out = Vec::new();
    for w in optional {
        if mods.contains_key(*w) {
            visit(w, mods, builtin, &mut out, &mut Vec::new())?;
        }
    }
    for w in wanted {
        visit(w, mods, builtin, &mut out, &mut Vec::new())?;
    }
    Ok(out)
}

/// A field of a module's `.modinfo` section (`depends=a,b`), found in the
/// module file's bytes: the first `NUL name=` string.
pub fn modinfo_field(ko: &[u8], field: &str) -> Option<String> {
    let key = format!("\0{field}=");
    let key = key.as_bytes();
    let at = ko.windows(key.len()).position(|w| w == key)? + key.len();
    let end = ko[at..].iter().position(|&b| b == 0)? + at;
    String::from_utf8(ko[at..end].to_vec()).ok()
}

/// The libraries `ldd` lists (and the dynamic loader), as absolute paths;
/// an error for a library it could not find.
pub fn parse_ldd(text: &str) -> Result<Vec<String>, Error> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.contains("not found") {
            return Err(Error::Usage(format!("ldd /usr/bin/qemu-nbd: {line}")));
        }
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next().unwrap_or(""),
            None => line.split_whitespace().next().unwrap_or(""),
        };
        if path.starts_with('/') && !out.iter().any(|p| p == path) {
            out.push(path.to_string());
        }
    }
    Ok(out)
}

/// The guest's /init: mounts, loads `modules` (paths under `/`) in order,
/// gives eth0 user networking's static address, waits for the NVMe
/// namespace, starts qemu-nbd (writable, `--fork`: the parent returns once
/// the server listens or failed) with the first options of
/// [`QEMU_NBD_OPTIONS`] that work, says which on the console ([`READY`]
/// or [`FAILED`]), and stays (PID 1 must not exit).
pub fn init_script(modules: &[String]) -> String {
    let (ip, gw) = user_net_address();
    let mut s = String::from(
        "#!/bin/sh\n\
         # dioxide's Linux guest (bench nbd --targets linux): qemu-nbd on the\n\
         # emulated NVMe namespace. Made by cli/src/linuxguest.rs.\n\
         export PATH=/bin:/usr/bin\n\
         mount -t proc proc /proc\n\
         mount -t sysfs sysfs /sys\n\
         mount -t devtmpfs devtmpfs /dev\n\
         mkdir -p /tmp /run\n\
         echo \"linux-guest: $(cat /proc/version)\"\n",
    );
    for m in modules {
        s += &format!("insmod {m} || echo \"linux-guest: insmod {m} failed\"\n");
    }
    s += &format!(
        "i=0\n\
         while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done\n\
         ip link set lo up\n\
         ip link set eth0 up\n\
         ip addr add {ip} dev eth0\n\
         ip route add default via {gw}\n\
         echo \"linux-guest: eth0 {ip} gw {gw}\"\n\
         i=0\n\
         while [ ! -b {DEVICE} ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i + 1)); done\n\
         if [ -b {DEVICE} ]; then\n\
         \x20 shared=${{dx_shared:-2}}\n\
         \x20 for opts in"
    );
    for o in QEMU_NBD_OPTIONS {
        s += &format!(" \"{o}\"");
    }
    s += &format!(
        "; do\n\
         \x20   if qemu-nbd --fork --persistent --shared=$shared --format=raw $opts --bind=0.0.0.0 --port={port} {DEVICE}; then\n\
         \x20     echo \"{READY} ($opts, --shared=$shared, port {port})\"\n\
         \x20     break\n\
         \x20   fi\n\
         \x20   echo \"linux-guest: qemu-nbd $opts failed\"\n\
         \x20   opts=\n\
         \x20 done\n\
         \x20 [ -n \"$opts\" ] || echo \"{FAILED}\"\n\
         else\n\
         \x20 echo \"linux-guest: no {DEVICE}\"\n\
         \x20 echo \"{FAILED}\"\n\
         fi\n\
         while true; do sleep 3600; done\n",
        port = crate::qemu::GUEST_NBD_PORT
    );
    s
}

/// User networking's guest address (with its prefix) and gateway, as the
/// appliance gets them ([`crate::qemu::USER_NET_ARGS`]).
fn user_net_address() -> (&'static str, &'static str) {
    let [ip, gw] = crate::qemu::USER_NET_ARGS;
    (
        ip.strip_prefix("net.ip=").unwrap_or("10.0.2.15/24"),
        gw.strip_prefix("net.gw=").unwrap_or("10.0.2.2"),
    )
}

/// One member of a cpio archive.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Entry {
    Dir(String),
    File {
        path: String,
        mode: u32,
        data: Vec<u8>,
    },
    Symlink {
        path: String,
        target: String,
    },
    /// A character device node (`/dev/console`, which the kernel opens for
    /// init before devtmpfs is mounted).
    CharDev {
        path: String,
        major: u32,
        minor: u32,
    },
}

impl Entry {
    fn path(&self) -> &str {
        match self {
            Entry::Dir(p)
            | Entry::File { path: p, .. }
            | Entry::Symlink { path: p, .. }
            | Entry::CharDev { path: p, .. } => p,
        }
    }
}

/// A cpio archive in the `newc` format (what the kernel unpacks as an
/// initramfs): every entry's parent directories first, owner root, time 0.
/// Paths are relative (`bin/busybox`). Written with the `cpio` crate.
pub fn cpio(entries: &[Entry]) -> std::io::Result<Vec<u8>> {
    use std::io::Write;
    let mut dirs: BTreeSet<String> = BTreeSet::new();
    for e in entries {
        let mut p = e.path();
        while let Some((parent, _)) = p.rsplit_once('/') {
            dirs.insert(parent.to_string());
            p = parent;
        }
        if let Entry::Dir(d) = e {
            dirs.insert(d.clone());
        }
    }
    let mut ino = 0u32;
    let mut put = |out: Vec<u8>, name: &str, mode: u32, data: &[u8], rdev: (u32, u32)| {
        ino += 1;
        let nlink = if mode & 0o170000 == 0o040000 { 2 } else { 1 };
        let size = u32::try_from(data.len()).map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("{name}: over 4 GiB"),
            )
        })?;
        let mut w = cpio::newc::Builder::new(name)
            .ino(ino)
            .mode(mode)
            .nlink(nlink)
            .rdev_major(rdev.0)
            .rdev_minor(rdev.1)
            .write(out, size);
        w.write_all(data)?;
        w.finish()
    };
    let mut out = Vec::new();
    for d in &dirs {
        out = put(out, d, 0o040755, &[], (0, 0))?;
    }
    for e in entries {
        out = match e {
            Entry::Dir(_) => out,
            Entry::File { path, mode, data } => put(out, path, 0o100000 | mode, data, (0, 0))?,
            Entry::Symlink { path, target } => put(out, path, 0o120777, target.as_bytes(), (0, 0))?,
            Entry::CharDev { path, major, minor } => {
                put(out, path, 0o020600, &[], (*major, *minor))?
            }
        };
    }
    cpio::newc::trailer(out)
}

/// The initramfs's entries: busybox and its applets, the modules (under
/// `lib/modules/RELEASE/`, with a `modules.dep`), qemu-nbd and its
/// libraries at the paths ldd gave, /dev/console and /init.
pub fn initramfs(
    busybox: Vec<u8>,
    release: &str,
    modules: &[(String, Vec<u8>)],
    modules_dep: &str,
    binaries: Vec<(String, Vec<u8>)>,
) -> Vec<Entry> {
    let mut e = vec![
        Entry::Dir("proc".into()),
        Entry::Dir("sys".into()),
        Entry::Dir("tmp".into()),
        Entry::Dir("usr/bin".into()),
        Entry::CharDev {
            path: "dev/console".into(),
            major: 5,
            minor: 1,
        },
        Entry::File {
            path: "bin/busybox".into(),
            mode: 0o755,
            data: busybox,
        },
    ];
    for a in APPLETS {
        e.push(Entry::Symlink {
            path: format!("bin/{a}"),
            target: "busybox".into(),
        });
    }
    let mut paths = Vec::new();
    for (path, data) in modules {
        let p = format!("lib/modules/{release}/{path}");
        paths.push(format!("/{p}"));
        e.push(Entry::File {
            path: p,
            mode: 0o644,
            data: data.clone(),
        });
    }
    e.push(Entry::File {
        path: format!("lib/modules/{release}/modules.dep"),
        mode: 0o644,
        data: modules_dep.as_bytes().to_vec(),
    });
    for (path, data) in binaries {
        e.push(Entry::File {
            path: path.trim_start_matches('/').to_string(),
            mode: 0o755,
            data,
        });
    }
    e.push(Entry::File {
        path: "init".into(),
        mode: 0o755,
        data: init_script(&paths).into_bytes(),
    });
    e
}

/// Runs a command, its standard output; [`Error::Usage`] with `what_to_do`
/// when it cannot run or fails.
fn run(cmd: &mut Command, what_to_do: &str) -> Result<String, Error> {
    let shown = format!("{cmd:?}");
    let out = cmd
        .output()
        .map_err(|e| Error::Usage(format!("{shown}: {e}; {what_to_do}")))?;
    if !out.status.success() {
        return Err(Error::Usage(format!(
            "{shown} failed ({}): {}; {what_to_do}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

const APT_HINT: &str = "the Linux guest's kernel and busybox come from Debian's archive: run `apt-get update` (as root) and check that Debian's mirror is reachable";

/// The kernel package `linux-image-amd64` depends on
/// (`linux-image-6.1.0-N-amd64`), from `apt-cache depends`' output.
pub fn kernel_package(apt_cache_depends: &str) -> Option<String> {
    apt_cache_depends.lines().find_map(|l| {
        let p = l.trim().strip_prefix("Depends:")?.trim();
        (p.starts_with("linux-image-") && p != "linux-image-amd64").then(|| p.to_string())
    })
}

/// `apt-get update`, as root only (whether it ran and succeeded).
fn apt_update() -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return false;
    }
    eprintln!("dioxide bench: linux guest: apt-get update");
    Command::new("apt-get")
        .args(["update", "-qq"])
        .status()
        .is_ok_and(|s| s.success())
}

/// A directory removed on drop.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `apt-get download PKG` into a new directory under `dir`, unpacked
/// there with `dpkg-deb -x`; the directory (removed on drop).
fn fetch_deb(dir: &Path, pkg: &str) -> Result<TempDir, Error> {
    let tmp = TempDir(dir.join(format!("tmp-{pkg}-{}", std::process::id())));
    let _ = std::fs::remove_dir_all(&tmp.0);
    std::fs::create_dir_all(&tmp.0).map_err(io_err(format!("create {}", tmp.0.display())))?;
    eprintln!("dioxide bench: linux guest: apt-get download {pkg}");
    let download = || {
        run(
            Command::new("apt-get")
                .args(["download", "-q", pkg])
                .current_dir(&tmp.0),
            APT_HINT,
        )
    };
    if let Err(e) = download() {
        // Package lists older than the mirror name files it no longer
        // has: as root, refresh them once and try again.
        if !apt_update() {
            return Err(e);
        }
        download()?;
    }
    let deb = std::fs::read_dir(&tmp.0)
        .map_err(io_err(format!("read {}", tmp.0.display())))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .ok_or_else(|| {
            Error::Usage(format!(
                "apt-get download {pkg} left no .deb in {}; {APT_HINT}",
                tmp.0.display()
            ))
        })?;
    let root = tmp.0.join("root");
    run(
        Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root),
        "dpkg-deb comes with dpkg (Debian)",
    )?;
    Ok(tmp)
}

fn read(p: &Path) -> Result<Vec<u8>, Error> {
    std::fs::read(p).map_err(io_err(format!("read {}", p.display())))
}

fn write(p: &Path, data: &[u8]) -> Result<(), Error> {
    if let Some(d) = p.parent() {
        std::fs::create_dir_all(d).map_err(io_err(format!("create {}", d.display())))?;
    }
    let tmp = p.with_extension("part");
    std::fs::write(&tmp, data).map_err(io_err(format!("write {}", tmp.display())))?;
    std::fs::rename(&tmp, p).map_err(io_err(format!("rename {}", tmp.display())))
}

/// Every `.ko` file under `dir` (relative paths).
fn ko_files(dir: &Path, rel: &str, out: &mut Vec<String>) -> Result<(), Error> {
    for e in std::fs::read_dir(dir).map_err(io_err(format!("read {}", dir.display())))? {
        let e = e.map_err(io_err(format!("read {}", dir.display())))?;
        let name = e.file_name().to_string_lossy().into_owned();
        let rel = if rel.is_empty() {
            name.clone()
        } else {
            format!("{rel}/{name}")
        };
        let ft = e
            .file_type()
            .map_err(io_err(format!("stat {}", e.path().display())))?;
        if ft.is_dir() {
            ko_files(&e.path(), &rel, out)?;
        } else if name.ends_with(".ko") {
            out.push(rel);
        }
    }
    Ok(())
}

/// Fetches the kernel package and keeps, under `dest`, its kernel
/// (`vmlinuz`), its config, the modules [`resolve`] picks (with a
/// `modules.dep` and `order`, the load order) and `release`.
fn fetch_kernel(dir: &Path, pkg: &str, dest: &Path) -> Result<(), Error> {
    let tmp = fetch_deb(dir, pkg)?;
    let root = tmp.0.join("root");
    let boot = root.join("boot");
    let vmlinuz = std::fs::read_dir(&boot)
        .map_err(io_err(format!("read {}", boot.display())))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
        .ok_or_else(|| Error::Usage(format!("{pkg}: no boot/vmlinuz-* in the package")))?;
    let release = vmlinuz
        .file_name()
        .map(|n| {
            n.to_string_lossy()
                .trim_start_matches("vmlinuz-")
                .to_string()
        })
        .unwrap_or_default();
    let mdir = root.join("lib/modules").join(&release);
    let mut kos = Vec::new();
    ko_files(&mdir.join("kernel"), "kernel", &mut kos)?;
    let mut mods = BTreeMap::new();
    for path in kos {
        let data = read(&mdir.join(&path))?;
        let deps = modinfo_field(&data, "depends").unwrap_or_default();
        mods.insert(
            module_name(&path),
            Module {
                path,
                deps: deps
                    .split(',')
                    .filter(|d| !d.is_empty())
                    .map(|d| d.replace('-', "_"))
                    .collect(),
            },
        );
    }
    let builtin: BTreeSet<String> = std::fs::read_to_string(mdir.join("modules.builtin"))
        .unwrap_or_default()
        .lines()
        .map(module_name)
        .collect();
    let order = resolve(&mods, &builtin, &MODULES, &OPTIONAL_MODULES)?;
    let _ = std::fs::remove_dir_all(dest);
    let part = dest.with_extension("part");
    let _ = std::fs::remove_dir_all(&part);
    for name in &order {
        if let Some(m) = mods.get(name) {
            write(
                &part.join("modules").join(&m.path),
                &read(&mdir.join(&m.path))?,
            )?;
        }
    }
    write(
        &part.join("modules/modules.dep"),
        render_modules_dep(&mods, &order).as_bytes(),
    )?;
    write(&part.join("order"), order.join("\n").as_bytes())?;
    write(&part.join("release"), release.as_bytes())?;
    write(&part.join("vmlinuz"), &read(&vmlinuz)?)?;
    let config = boot.join(format!("config-{release}"));
    if config.is_file() {
        write(&part.join("config"), &read(&config)?)?;
    }
    std::fs::rename(&part, dest).map_err(io_err(format!("rename {}", part.display())))?;
    Ok(())
}

/// What the initramfs is made from, besides the kernel package: the
/// host's qemu-nbd (its version and file).
fn qemu_nbd_stamp() -> String {
    let meta = std::fs::metadata("/usr/bin/qemu-nbd")
        .map(|m| {
            use std::os::unix::fs::MetadataExt;
            format!("{} {}", m.len(), m.mtime())
        })
        .unwrap_or_default();
    format!(
        "{} {meta}",
        crate::nbdbench::version("qemu-nbd", "--version")
    )
}

/// Prepares (once) the Linux guest's kernel and initramfs under
/// `target/dioxide/linux/`.
pub fn prepare() -> Result<Prepared, Error> {
    let t0 = Instant::now();
    let dir = workspace_root()
        .join("target")
        .join("dioxide")
        .join("linux");
    std::fs::create_dir_all(&dir).map_err(io_err(format!("create {}", dir.display())))?;
    // The kernel package of the moment; offline, the one prepared last.
    let last = dir.join("package");
    let depends = || match Command::new("apt-cache")
        .args(["depends", "linux-image-amd64"])
        .output()
    {
        Ok(o) if o.status.success() => kernel_package(&String::from_utf8_lossy(&o.stdout)),
        _ => None,
    };
    let cached = std::fs::read_to_string(&last).is_ok();
    let pkg = match depends() {
        None if !cached && apt_update() => depends(),
        p => p,
    };
    let pkg = match pkg {
        Some(p) => p,
        None => std::fs::read_to_string(&last)
            .ok()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .ok_or_else(|| {
                Error::Usage(format!(
                    "apt-cache depends linux-image-amd64 named no kernel package; {APT_HINT}"
                ))
            })?,
    };
    let kdir = dir.join(&pkg);
    if !kdir.join("vmlinuz").is_file() {
        fetch_kernel(&dir, &pkg, &kdir)?;
    }
    write(&last, pkg.as_bytes())?;
    let busybox = dir.join("busybox");
    if !busybox.is_file() {
        let tmp = fetch_deb(&dir, "busybox-static")?;
        write(&busybox, &read(&tmp.0.join("root/bin/busybox"))?)?;
    }
    let initrd = dir.join("initramfs.cpio");
    let stamp_path = dir.join("initramfs.stamp");
    let stamp = format!(
        "format {FORMAT}\nkernel {pkg}\nqemu-nbd {}\n",
        qemu_nbd_stamp()
    );
    if !initrd.is_file() || std::fs::read_to_string(&stamp_path).ok().as_deref() != Some(&stamp) {
        eprintln!("dioxide bench: linux guest: making {}", initrd.display());
        let release = std::fs::read_to_string(kdir.join("release"))
            .map_err(io_err(format!("read {}", kdir.join("release").display())))?;
        let order = std::fs::read_to_string(kdir.join("order"))
            .map_err(io_err(format!("read {}", kdir.join("order").display())))?;
        let dep = std::fs::read_to_string(kdir.join("modules/modules.dep"))
            .map_err(io_err("read modules.dep"))?;
        let mods = parse_modules_dep(&dep);
        let mut modules = Vec::new();
        for name in order.lines().filter(|l| !l.is_empty()) {
            let m = mods.get(name).ok_or_else(|| {
                Error::Usage(format!(
                    "{}: {name} is not in modules.dep (remove {} to fetch it again)",
                    kdir.display(),
                    kdir.display()
                ))
            })?;
            modules.push((m.path.clone(), read(&kdir.join("modules").join(&m.path))?));
        }
        let ldd = run(
            Command::new("ldd").arg("/usr/bin/qemu-nbd"),
            "qemu-nbd comes with qemu-utils (./dx installs it)",
        )?;
        let mut binaries = vec![(
            "/usr/bin/qemu-nbd".to_string(),
            read(Path::new("/usr/bin/qemu-nbd"))?,
        )];
        for lib in parse_ldd(&ldd)? {
            // fs::read follows symbolic links: the library's own bytes, at
            // the path the loader looks for.
            let data = read(Path::new(&lib))?;
            binaries.push((lib, data));
        }
        let entries = initramfs(read(&busybox)?, release.trim(), &modules, &dep, binaries);
        let archive = cpio(&entries)
            .map_err(|e| Error::Usage(format!("linux guest: the initramfs archive: {e}")))?;
        write(&initrd, &archive)?;
        write(&stamp_path, stamp.as_bytes())?;
        eprintln!(
            "dioxide bench: linux guest: prepared in {:.1} s",
            t0.elapsed().as_secs_f64()
        );
    }
    Ok(Prepared {
        kernel: kdir.join("vmlinuz"),
        initrd,
        package: pkg,
    })
}

/// A booted Linux guest serving its NVMe namespace (QEMU killed on drop).
pub struct LinuxGuest {
    pub guest: Guest,
    /// `nbd://127.0.0.1:PORT` (user networking's forwarded port).
    pub url: String,
    /// qemu-nbd's options in the guest, as it said.
    pub options: String,
    /// From spawning QEMU to qemu-nbd listening.
    pub boot_secs: f64,
}

/// The options the guest's ready line names (`--cache=none --aio=io_uring,
/// --shared=2, port 10809`).
pub fn ready_options(console: &str) -> Option<String> {
    let l = console.lines().find(|l| l.contains(READY))?;
    let rest = &l[l.find(READY)? + READY.len()..];
    Some(
        rest.trim()
            .trim_start_matches('(')
            .trim_end_matches(')')
            .to_string(),
    )
}

/// Boots the Linux guest like the appliance `base` (accelerator, memory,
/// CPUs, machine, NIC and its MTU, NVMe ioeventfd), with one NVMe
/// controller on `image` (the same drive options as the appliance's
/// namespaces) and user networking, qemu-nbd taking `clients`
/// connections; returns once its port is forwarded.
pub fn boot(
    p: &Prepared,
    base: &Config,
    image: &Path,
    clients: usize,
) -> Result<LinuxGuest, Error> {
    let mut cfg = base.clone();
    cfg.kernel = p.kernel.clone();
    cfg.nvme = Vec::new();
    cfg.add_disk(image);
    cfg.args = Vec::new();
    cfg.boot = crate::qemu::Boot::Pvh;
    cfg.iso = None;
    cfg.netdev = None;
    cfg.net_queues = 1;
    cfg.nbd_port = Some(0);
    cfg.echo = false;
    cfg.timeout = None;
    cfg.linux = Some(LinuxBoot {
        initrd: p.initrd.clone(),
        cmdline: cmdline(clients.max(1) + 1),
        ready: READY.into(),
    });
    let mut guest = Guest::spawn(&cfg)?;
    let t0 = guest.started();
    let limit = Duration::from_secs(300);
    loop {
        match guest.wait_nbd(Duration::from_millis(250))? {
            NbdReady::Listening(Some(addr)) => {
                let console = guest.console();
                return Ok(LinuxGuest {
                    url: format!("nbd://{addr}"),
                    options: ready_options(&console).unwrap_or_default(),
                    boot_secs: t0.elapsed().as_secs_f64(),
                    guest,
                });
            }
            NbdReady::Listening(None) => {
                return Err(Error::Usage(
                    "the Linux guest listens but its port was not forwarded".into(),
                ))
            }
            NbdReady::NotListening => {}
        }
        let console = guest.console();
        if !guest.is_running() {
            return Err(Error::Usage(format!(
                "the Linux guest's QEMU exited before it served {DEVICE}:\n{console}"
            )));
        }
        if console.contains(FAILED) || t0.elapsed() > limit {
            return Err(Error::Usage(format!(
                "the Linux guest did not serve {DEVICE} (after {:.0} s):\n{console}",
                t0.elapsed().as_secs_f64()
            )));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MODULES_DEP: &str = "\
kernel/drivers/nvme/host/nvme.ko: kernel/drivers/nvme/host/nvme-core.ko kernel/block/t10-pi.ko kernel/lib/crc64-rocksoft.ko kernel/lib/crc-t10dif.ko kernel/lib/crc64.ko
kernel/drivers/nvme/host/nvme-core.ko: kernel/block/t10-pi.ko kernel/lib/crc64-rocksoft.ko kernel/lib/crc-t10dif.ko kernel/lib/crc64.ko
kernel/block/t10-pi.ko: kernel/lib/crc64-rocksoft.ko kernel/lib/crc-t10dif.ko kernel/lib/crc64.ko
kernel/lib/crc64-rocksoft.ko: kernel/lib/crc64.ko
kernel/lib/crc64.ko:
kernel/lib/crc-t10dif.ko:
kernel/crypto/crc64_rocksoft_generic.ko: kernel/lib/crc64.ko
kernel/drivers/net/virtio_net.ko: kernel/drivers/net/net_failover.ko kernel/net/core/failover.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/net/net_failover.ko: kernel/net/core/failover.ko
kernel/net/core/failover.ko:
kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_pci_modern_dev.ko kernel/drivers/virtio/virtio_pci_legacy_dev.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_pci_modern_dev.ko:
kernel/drivers/virtio/virtio_pci_legacy_dev.ko:
";

    #[test]
    fn modules_resolve_in_dependency_order_without_the_builtin_ones() {
        let mods = parse_modules_dep(MODULES_DEP);
        assert_eq!(
            mods["nvme_core"].path,
            "kernel/drivers/nvme/host/nvme-core.ko"
        );
        assert_eq!(mods["crc64_rocksoft"].deps, ["crc64"]);
        // crc-t10dif built in, igb not wanted here.
        let builtin: BTreeSet<String> = ["crc_t10dif".to_string()].into();
        let order = resolve(
            &mods,
            &builtin,
            &["nvme", "virtio_pci", "virtio_net"],
            &OPTIONAL_MODULES,
        )
        .unwrap();
        // Every module after its dependencies, each once.
        let pos = |n: &str| order.iter().position(|m| m == n).unwrap();
        for (name, m) in &mods {
            if let Some(i) = order.iter().position(|o| o == name) {
                for d in m.deps.iter().filter(|d| !builtin.contains(*d)) {
                    assert!(pos(d) < i, "{d} before {name}: {order:?}");
                }
            }
        }
        assert_eq!(order[..2], ["crc64", "crc64_rocksoft_generic"], "{order:?}");
        assert!(!order.contains(&"crc_t10dif".to_string()));
        assert_eq!(order.len(), 14, "{order:?}");
        assert_eq!(order.last().map(String::as_str), Some("virtio_net"));
        // A missing module is an error that names it; an optional one is not.
        let e = resolve(&mods, &builtin, &["igb"], &[]).unwrap_err();
        assert!(e.to_string().contains("igb"), "{e}");
        assert_eq!(
            resolve(&mods, &builtin, &[], &["igb"]).unwrap(),
            Vec::<String>::new()
        );
        // modules.dep for the modules shipped.
        let dep = render_modules_dep(&mods, &order);
        assert!(
            dep.contains("kernel/drivers/net/net_failover.ko: kernel/net/core/failover.ko\n"),
            "{dep}"
        );
        assert_eq!(parse_modules_dep(&dep)["nvme"].deps.len(), 5);
    }

    #[test]
    fn modinfo_fields_come_from_the_module_bytes() {
        let ko = b"\x7fELF....\0license=GPL\0depends=nvme-core,t10-pi\0name=nvme\0vermagic=6.1\0";
        assert_eq!(
            modinfo_field(ko, "depends").as_deref(),
            Some("nvme-core,t10-pi")
        );
        assert_eq!(modinfo_field(ko, "name").as_deref(), Some("nvme"));
        assert_eq!(
            modinfo_field(b"\0depends=\0", "depends").as_deref(),
            Some("")
        );
        assert_eq!(modinfo_field(ko, "softdep"), None);
        assert_eq!(
            module_name("kernel/drivers/nvme/host/nvme-core.ko"),
            "nvme_core"
        );
        assert_eq!(module_name("kernel/lib/crc64.ko.xz"), "crc64");
    }

    #[test]
    fn ldd_gives_every_library_and_the_loader() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                    \tlibglib-2.0.so.0 => /lib/x86_64-linux-gnu/libglib-2.0.so.0 (0x00007f)\n\
                    \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f)\n\
                    \t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n";
        assert_eq!(
            parse_ldd(text).unwrap(),
            [
                "/lib/x86_64-linux-gnu/libglib-2.0.so.0",
                "/lib/x86_64-linux-gnu/libc.so.6",
                "/lib64/ld-linux-x86-64.so.2"
            ]
        );
        let e = parse_ldd("\tlibfoo.so.1 => not found\n").unwrap_err();
        assert!(e.to_string().contains("libfoo"), "{e}");
    }

    #[test]
    fn the_kernel_package_is_what_the_metapackage_depends_on() {
        let out = "linux-image-amd64\n  Depends: linux-image-6.1.0-57-amd64\n";
        assert_eq!(
            kernel_package(out).as_deref(),
            Some("linux-image-6.1.0-57-amd64")
        );
        assert_eq!(kernel_package("linux-image-amd64\n"), None);
    }

    #[test]
    fn the_init_script_loads_the_modules_and_serves_the_namespace_writable() {
        let mods = [
            "/lib/modules/6.1.0-57-amd64/kernel/lib/crc64.ko".to_string(),
            "/lib/modules/6.1.0-57-amd64/kernel/drivers/nvme/host/nvme.ko".to_string(),
        ];
        let s = init_script(&mods);
        assert!(s.starts_with("#!/bin/sh\n"), "{s}");
        for want in [
            "mount -t devtmpfs devtmpfs /dev\n",
            "insmod /lib/modules/6.1.0-57-amd64/kernel/lib/crc64.ko || echo",
            "ip addr add 10.0.2.15/24 dev eth0\n",
            "ip route add default via 10.0.2.2\n",
            "[ ! -b /dev/nvme0n1 ]",
            "qemu-nbd --fork --persistent --shared=$shared --format=raw $opts --bind=0.0.0.0 --port=10809 /dev/nvme0n1",
            "\"--cache=none --aio=io_uring\" \"--cache=none --aio=native\" \"--cache=none --aio=threads\" \"--cache=writethrough --aio=threads\"; do",
            "echo \"linux-guest: serving /dev/nvme0n1 ($opts, --shared=$shared, port 10809)\"",
            "echo \"linux-guest: qemu-nbd would not start\"",
            "while true; do sleep 3600; done\n",
        ] {
            assert!(s.contains(want), "{want} in\n{s}");
        }
        // crc64 before nvme, as given; writable.
        assert!(s.find("crc64.ko").unwrap() < s.find("nvme.ko").unwrap());
        assert!(!s.contains("--read-only"));
        assert_eq!(
            ready_options("x\nlinux-guest: serving /dev/nvme0n1 (--cache=none --aio=io_uring, --shared=2, port 10809)\n")
                .as_deref(),
            Some("--cache=none --aio=io_uring, --shared=2, port 10809")
        );
        assert!(cmdline(2).ends_with(" dx_shared=2"));
    }

    #[test]
    fn cpio_newc_golden_bytes() {
        let a = cpio(&[
            Entry::File {
                path: "bin/hi".into(),
                mode: 0o755,
                data: b"hey".to_vec(),
            },
            Entry::Symlink {
                path: "bin/sh".into(),
                target: "hi".into(),
            },
            Entry::CharDev {
                path: "dev/console".into(),
                major: 5,
                minor: 1,
            },
        ])
        .unwrap();
        // Magic, then inode, mode, uid, gid, nlink, mtime, size, dev
        // major/minor, rdev major/minor, name size, checksum (8 hex digits
        // each), the name and its NUL padded to 4 bytes, the data padded to
        // 4 bytes. Checked with busybox cpio -tv (bin, dev, bin/hi, bin/sh
        // -> hi, dev/console 5,1) and the kernel's unpacking (the guest's
        // initramfs).
        let want: &[u8] = b"\
070701 00000001 000041ed 00000000 00000000 00000002 00000000 00000000 00000000 00000000 00000000 00000000 00000004 00000000 bin\0\0\0\
070701 00000002 000041ed 00000000 00000000 00000002 00000000 00000000 00000000 00000000 00000000 00000000 00000004 00000000 dev\0\0\0\
070701 00000003 000081ed 00000000 00000000 00000001 00000000 00000003 00000000 00000000 00000000 00000000 00000007 00000000 bin/hi\0\0\0\0hey\0\
070701 00000004 0000a1ff 00000000 00000000 00000001 00000000 00000002 00000000 00000000 00000000 00000000 00000007 00000000 bin/sh\0\0\0\0hi\0\0\
070701 00000005 00002180 00000000 00000000 00000001 00000000 00000000 00000000 00000000 00000005 00000001 0000000c 00000000 dev/console\0\0\0\
070701 00000000 00000000 00000000 00000000 00000001 00000000 00000000 00000000 00000000 00000000 00000000 0000000b 00000000 TRAILER!!!\0\0\0\0";
        // (the spaces are for reading)
        let want: Vec<u8> = want.iter().copied().filter(|&b| b != b' ').collect();
        assert_eq!(String::from_utf8_lossy(&a), String::from_utf8_lossy(&want));
        assert_eq!(a.len() % 4, 0);
    }
}
