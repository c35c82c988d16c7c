//! Booting the kernel in QEMU and reading what it says: the QEMU runner the
//! `dioxide` CLI and the integration tests use. Launch configuration
//! ([`Config`]), the console reader, the monitor ([`monitor`]), the
//! accelerator choice ([`accel`]), tap devices ([`tap`]) and the bootable
//! ISO ([`iso`]).
//!
//! The guest's serial console is QEMU's stdout; it is read line by line (and
//! echoed when asked). The guest ends by printing `dioxide: power off
//! status=<n> method=<m>` and, with `method=debugexit`, writing to the
//! `isa-debug-exit` device, which makes QEMU exit with `2n + 1`; with
//! `method=acpi` (ACPI S5) QEMU exits with 0, and so it does after `dioxide:
//! reset status=<n> method=<m>` (a reset under `-no-reboot`). The status is
//! taken from the last such line and must agree with QEMU's exit code (see
//! [`decide`]). QEMU is killed when the
//! [`Guest`] handle is dropped, so no emulator outlives its caller.
//!
//! The kernel boots one of three ways ([`Boot`]): QEMU loads the ELF itself
//! (PVH, no firmware), or a per-run GRUB ISO ([`crate::iso`]) boots it
//! through multiboot2 under SeaBIOS or under OVMF (UEFI), as on a server.
//! The console reader drops the firmware's and GRUB's terminal control
//! sequences ([`console_text`]), so their screen drawing on COM1 does not
//! mix with the kernel's lines.
//!
//! With user networking the NBD port is forwarded only once the kernel's
//! server listens (its `nbd: listening on port` line): until then a client
//! is refused at once, instead of having its connection accepted by QEMU and
//! its SYN to a guest without an address lost (slirp retries after 6 s).

pub mod accel;
mod error;
pub mod iso;
pub mod monitor;
pub mod tap;

pub use error::{io_err, Error};

use crate::accel::Accel;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// The guest's address on QEMU user networking (its default network
/// 10.0.2.0/24, the host at 10.0.2.2), given to the kernel on its command
/// line: it serves from its first instant, without a DHCP exchange.
pub const USER_NET_ARGS: [&str; 2] = ["net.ip=10.0.2.15/24", "net.gw=10.0.2.2"];

/// The host's address on QEMU's user network: every client connecting
/// through a forwarded port comes from it.
pub const USER_NET_HOST: &str = "10.0.2.2";

/// The guest's NBD port.
pub const GUEST_NBD_PORT: u16 = 10809;

/// The kernel's line once its NBD server listens.
const NBD_LISTENING: &str = "nbd: listening on port";

/// OVMF's UEFI firmware (code, read-only) and the template of its variable
/// store (copied per run): the 4 MiB pair QEMU's firmware descriptor
/// names, without Secure Boot keys (grub-mkrescue's EFI image is unsigned).
pub const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
pub const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";

/// How QEMU boots the kernel.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Boot {
    /// QEMU loads the ELF itself (`-kernel`, PVH entry): no firmware, the
    /// fastest.
    #[default]
    Pvh,
    /// A GRUB ISO on a CD-ROM under SeaBIOS: GRUB loads the kernel through
    /// multiboot2, as a BIOS server would.
    Bios,
    /// The same ISO under OVMF (UEFI), with a VGA device for GOP.
    Uefi,
}

impl Boot {
    pub const ALL: [Boot; 3] = [Boot::Pvh, Boot::Bios, Boot::Uefi];

    pub fn name(self) -> &'static str {
        match self {
            Boot::Pvh => "pvh",
            Boot::Bios => "bios",
            Boot::Uefi => "uefi",
        }
    }

    pub fn parse(s: &str) -> Result<Boot, Error> {
        Boot::ALL
            .into_iter()
            .find(|b| b.name() == s)
            .ok_or_else(|| Error::Usage(format!("--boot {s}: expected pvh, bios or uefi")))
    }
}

/// What a boot needs besides the kernel: for `bios` and `uefi` the ISO
/// (made per run unless [`Config::iso`] names one) and, for `uefi`, a copy
/// of OVMF's variable store; in a temporary directory removed on drop
/// (after QEMU is killed: [`Guest`] holds it).
pub struct BootMedia {
    _dir: Option<tempfile::TempDir>,
    iso: Option<PathBuf>,
    vars: Option<PathBuf>,
}

impl BootMedia {
    /// Makes the media `cfg` boots from. For a per-run ISO GRUB boots at
    /// once (menu timeout 0) with [`Config::kernel_args`].
    pub fn prepare(cfg: &Config) -> Result<BootMedia, Error> {
        let none = BootMedia {
            _dir: None,
            iso: None,
            vars: None,
        };
        if cfg.linux.is_some() && (cfg.boot != Boot::Pvh || cfg.iso.is_some()) {
            return Err(Error::Usage(
                "a Linux guest boots with -kernel (boot pvh), not from an ISO".into(),
            ));
        }
        if cfg.boot == Boot::Pvh {
            return match &cfg.iso {
                Some(iso) => Err(Error::Usage(format!(
                    "{}: an ISO boots with --boot bios or --boot uefi, not pvh",
                    iso.display()
                ))),
                None => Ok(none),
            };
        }
        if cfg.boot == Boot::Uefi {
            crate::iso::need_file(OVMF_CODE, "OVMF's UEFI firmware", "ovmf")?;
            crate::iso::need_file(OVMF_VARS, "OVMF's variable store template", "ovmf")?;
        }
        let dir = tempfile::Builder::new()
            .prefix("dioxide-boot-")
            .tempdir()
            .map_err(crate::io_err(
                "create a temporary directory for the boot media",
            ))?;
        let iso = match &cfg.iso {
            Some(iso) if iso.is_file() => iso.clone(),
            Some(iso) => return Err(Error::Usage(format!("ISO {}: not a file", iso.display()))),
            None => {
                let iso = dir.path().join("dioxide.iso");
                crate::iso::build(&cfg.kernel, &cfg.kernel_args(), 0, &iso)?;
                iso
            }
        };
        let vars = if cfg.boot == Boot::Uefi {
            let vars = dir.path().join("OVMF_VARS.fd");
            std::fs::copy(OVMF_VARS, &vars).map_err(crate::io_err(format!(
                "copy {OVMF_VARS} to {}",
                vars.display()
            )))?;
            Some(vars)
        } else {
            None
        };
        Ok(BootMedia {
            _dir: Some(dir),
            iso: Some(iso),
            vars,
        })
    }
}

/// A path in QEMU option syntax (commas doubled).
fn qemu_path(p: &std::path::Path) -> String {
    p.to_string_lossy().replace(',', ",,")
}

/// Most NVMe controllers a boot takes, and namespaces per controller.
pub const MAX_CONTROLLERS: usize = 16;
pub const MAX_NAMESPACES: usize = 16;

/// One namespace of an emulated NVMe controller, backed by a raw image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Namespace {
    pub image: PathBuf,
    /// Logical (and physical) block size in bytes: 512 or 4096.
    pub lbs: u32,
    /// Metadata bytes per logical block (QEMU `nvme-ns` `ms=`, in a
    /// separate buffer: `mset=0`); 0 for none.
    pub ms: u16,
    /// 512-byte sectors of the image whose reads fail with EIO (QEMU's
    /// `blkdebug` driver between the device and the image): a device error
    /// the kernel must report for the request that hit it.
    pub inject_eio: Vec<u64>,
    /// The same for writes: a write covering one of these sectors fails.
    pub inject_write_eio: Vec<u64>,
}

impl Namespace {
    /// A namespace of `image` with 512-byte blocks, no metadata.
    pub fn new(image: impl Into<PathBuf>) -> Namespace {
        Namespace {
            image: image.into(),
            lbs: 512,
            ms: 0,
            inject_eio: Vec::new(),
            inject_write_eio: Vec::new(),
        }
    }

    /// The `-drive` value of this namespace's image, with id `id`.
    fn drive(&self, id: &str) -> std::ffi::OsString {
        let path = qemu_path(&self.image);
        let aio = drive_aio(&self.image);
        let mut drive = std::ffi::OsString::new();
        if self.inject_eio.is_empty() && self.inject_write_eio.is_empty() {
            drive.push(format!(
                "file={path},if=none,id={id},format=raw,cache=none,aio={aio}"
            ));
        } else {
            // raw <- blkdebug (inject-error rules) <- file
            drive.push(format!(
                "if=none,id={id},format=raw,cache=none,file.driver=blkdebug"
            ));
            let rules = self
                .inject_eio
                .iter()
                .map(|s| ("read", s))
                .chain(self.inject_write_eio.iter().map(|s| ("write", s)));
            // A rule is armed by its event (the raw format raises read_aio
            // or write_aio before each request) and then fails requests of
            // its `iotype` only (by default every type: a write rule would
            // fail reads of its sector too).
            for (i, (io, sector)) in rules.enumerate() {
                drive.push(format!(
                    ",file.inject-error.{i}.event={io}_aio,file.inject-error.{i}.iotype={io},file.inject-error.{i}.errno=5,file.inject-error.{i}.sector={sector}"
                ));
            }
            drive.push(format!(
                ",file.image.driver=file,file.image.filename={path},file.image.aio={aio}"
            ));
        }
        drive
    }
}

/// One emulated NVMe controller (a PCI function) and its namespaces, whose
/// NSIDs are 1, 2, ... in this order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NvmeController {
    pub namespaces: Vec<Namespace>,
}

impl NvmeController {
    /// QEMU's arguments for this controller, the `index`-th: serial
    /// `dioxide<index>`. One namespace without metadata is the
    /// controller's own drive (`-device nvme,drive=nvm<index>,...`, as
    /// before several disks existed); otherwise each namespace is an
    /// `nvme-ns` device on the controller's bus (drive `nvm<index>n<nsid>`).
    pub fn qemu_args(&self, index: usize, ioeventfd: bool) -> Vec<std::ffi::OsString> {
        let mut a: Vec<std::ffi::OsString> = Vec::new();
        let ioeventfd = if ioeventfd { ",ioeventfd=on" } else { "" };
        match self.namespaces.as_slice() {
            [ns] if ns.ms == 0 => {
                let id = format!("nvm{index}");
                a.push("-drive".into());
                a.push(ns.drive(&id));
                a.push("-device".into());
                a.push(
                    format!(
                        "nvme,drive={id},serial=dioxide{index},logical_block_size={0},physical_block_size={0}{ioeventfd}",
                        ns.lbs
                    )
                    .into(),
                );
            }
            namespaces => {
                for (i, ns) in namespaces.iter().enumerate() {
                    a.push("-drive".into());
                    a.push(ns.drive(&format!("nvm{index}n{}", i + 1)));
                }
                a.push("-device".into());
                a.push(format!("nvme,id=nvme{index},serial=dioxide{index}{ioeventfd}").into());
                for (i, ns) in namespaces.iter().enumerate() {
                    let nsid = i + 1;
                    let ms = if ns.ms > 0 {
                        format!(",ms={}", ns.ms)
                    } else {
                        String::new()
                    };
                    a.push("-device".into());
                    a.push(
                        format!(
                            "nvme-ns,drive=nvm{index}n{nsid},bus=nvme{index},nsid={nsid},logical_block_size={0},physical_block_size={0}{ms}",
                            ns.lbs
                        )
                        .into(),
                    );
                }
            }
        }
        a
    }
}

/// One `--disk` value: `PATH[,lbs=512|4096][,ms=BYTES][,ctrl=N]`, commas
/// in PATH doubled (as in QEMU's options). Without `ctrl=` the image is
/// namespace 1 of a new controller; with `ctrl=N` it is the next namespace
/// of controller N (0-based, in the order the controllers were made; N may
/// also be the next index, making that controller). `lbs` defaults to
/// `default_lbs`. Returns the controller asked for and the namespace.
pub fn parse_disk(spec: &str, default_lbs: u32) -> Result<(Option<usize>, Namespace), Error> {
    let bad = |why: String| Error::Usage(format!("--disk {spec}: {why}"));
    // Split at single commas; ",," is a comma of the path.
    let mut parts = vec![String::new()];
    let mut chars = spec.chars().peekable();
    while let Some(ch) = chars.next() {
        match ch {
            ',' if chars.peek() == Some(&',') => {
                chars.next();
                if let Some(p) = parts.last_mut() {
                    p.push(',');
                }
            }
            ',' => parts.push(String::new()),
            _ => {
                if let Some(p) = parts.last_mut() {
                    p.push(ch);
                }
            }
        }
    }
    let path = parts.remove(0);
    if path.is_empty() {
        return Err(bad("no image path".into()));
    }
    let mut ns = Namespace::new(path);
    ns.lbs = default_lbs;
    let mut ctrl = None;
    let mut seen: Vec<String> = Vec::new();
    for p in &parts {
        let (k, v) = p
            .split_once('=')
            .ok_or_else(|| bad(format!("{p:?}: expected KEY=VALUE (lbs, ms, ctrl)")))?;
        if seen.iter().any(|s| s == k) {
            return Err(bad(format!("{k}= given twice")));
        }
        seen.push(k.to_string());
        match k {
            "lbs" => {
                ns.lbs = match v {
                    "512" => 512,
                    "4096" => 4096,
                    _ => return Err(bad(format!("lbs={v}: 512 or 4096"))),
                }
            }
            "ms" => {
                ns.ms = v
                    .parse()
                    .map_err(|_| bad(format!("ms={v}: metadata bytes per block, 0 to 65535")))?
            }
            "ctrl" => {
                ctrl =
                    Some(v.parse().map_err(|_| {
                        bad(format!("ctrl={v}: a controller index (0 is the first)"))
                    })?)
            }
            _ => {
                return Err(bad(format!(
                    "unknown option {k:?} (lbs=512|4096, ms=BYTES, ctrl=N)"
                )))
            }
        }
    }
    Ok((ctrl, ns))
}

/// The controllers the `--disk` values make, in order (see [`parse_disk`]).
pub fn parse_disks(specs: &[String], default_lbs: u32) -> Result<Vec<NvmeController>, Error> {
    let mut ctrls: Vec<NvmeController> = Vec::new();
    for spec in specs {
        let (ctrl, ns) = parse_disk(spec, default_lbs)?;
        let at = ctrl.unwrap_or(ctrls.len());
        if at > ctrls.len() {
            return Err(Error::Usage(format!(
                "--disk {spec}: ctrl={at}, but only {} controller(s) so far (0-based; ctrl={} makes the next)",
                ctrls.len(),
                ctrls.len()
            )));
        }
        if at == ctrls.len() {
            if ctrls.len() == MAX_CONTROLLERS {
                return Err(Error::Usage(format!(
                    "--disk {spec}: at most {MAX_CONTROLLERS} NVMe controllers"
                )));
            }
            ctrls.push(NvmeController::default());
        }
        let c = &mut ctrls[at];
        if c.namespaces.len() == MAX_NAMESPACES {
            return Err(Error::Usage(format!(
                "--disk {spec}: at most {MAX_NAMESPACES} namespaces per controller"
            )));
        }
        c.namespaces.push(ns);
    }
    Ok(ctrls)
}

/// Everything that describes one boot.
#[derive(Clone, Debug)]
pub struct Config {
    pub kernel: PathBuf,
    /// The emulated NVMe controllers, in PCI order: the guest names their
    /// namespaces `nvme<index>n<nsid>`. None: no NVMe device.
    pub nvme: Vec<NvmeController>,
    /// QEMU's `ioeventfd=on` on every NVMe controller: a doorbell write
    /// wakes QEMU's main loop through an eventfd instead of being handled
    /// in the vCPU thread's MMIO exit. QEMU 7.2 does this only for I/O
    /// queues with shadow doorbells (the guest's Doorbell Buffer Config).
    pub nvme_ioeventfd: bool,
    pub mem_mib: u32,
    pub smp: u32,
    pub accel: Accel,
    /// Kernel command line words.
    pub args: Vec<String>,
    pub timeout: Option<Duration>,
    /// Copy the console to this process's stdout.
    pub echo: bool,
    /// With `echo`: copy only lines starting with this prefix.
    pub echo_prefix: Option<&'static str>,
    /// Extra QEMU arguments.
    pub extra: Vec<String>,
    /// Give the guest a virtio-net NIC on QEMU user networking, with its
    /// address on the command line ([`USER_NET_ARGS`], unless `args` has a
    /// `net.ip=`), and forward this host port (on 127.0.0.1) to the guest's
    /// NBD port 10809 once the kernel's NBD server listens (through QEMU's
    /// monitor; see [`Guest::wait_nbd`]). Port 0: a free port picked at that
    /// moment (no window between picking it and QEMU taking it).
    pub nbd_port: Option<u16>,
    /// Instead: a virtio-net NIC on this QEMU `-netdev` (a tap device, see
    /// [`crate::tap`]).
    pub netdev: Option<String>,
    /// The NIC's MTU: QEMU's `host_mtu=N` on the virtio-net device
    /// (VIRTIO_NET_F_MTU: the kernel takes it as its MTU unless `net.mtu=`
    /// says less). With a tap device its host side gets the same MTU
    /// ([`crate::tap::Tap::set_mtu`], done by whoever makes the tap).
    pub net_mtu: Option<u16>,
    /// virtio-net queue pairs (multiqueue above 1): set, with a tap of as
    /// many queues, by whoever makes the tap ([`Config::tap_queues`]);
    /// leave it 1 otherwise (user networking has one queue).
    pub net_queues: u16,
    /// Which NIC the guest gets on that network (virtio-net by default).
    pub nic: Nic,
    /// How the kernel boots: PVH (`-kernel`), or GRUB from an ISO under
    /// SeaBIOS or OVMF.
    pub boot: Boot,
    /// With `bios`/`uefi`: boot this ISO (made by `dioxide image`; its
    /// grub.cfg holds the kernel arguments, `args` are not used) instead of
    /// one made for the run.
    pub iso: Option<PathBuf>,
    /// QEMU's `-machine` value: `q35` (default), or e.g. `q35,pit=off,hpet=off`
    /// or `pc` (i440FX: no MCFG, a revision-1 FADT).
    pub machine: String,
    /// Boot a Linux kernel instead of dioxide's (`bench nbd --targets
    /// linux`): `kernel` is then a bzImage, booted with `-kernel`,
    /// `-initrd` and `-append` (PVH boot only), on the same machine,
    /// NVMe controllers and NIC as the appliance would get.
    pub linux: Option<LinuxBoot>,
}

/// A Linux guest's boot ([`Config::linux`]): its initramfs, its command
/// line (instead of [`Config::kernel_args`]: `args` are not used) and the
/// console line that says its NBD server listens, in place of the
/// kernel's `nbd: listening on port` (with user networking the port is
/// forwarded when it comes; see [`Guest::wait_nbd`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinuxBoot {
    pub initrd: PathBuf,
    pub cmdline: String,
    pub ready: String,
}

/// The guest's NIC.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Nic {
    /// virtio-net (`virtio-net-pci`): one queue pair; offloads on a tap.
    #[default]
    Virtio,
    /// Intel 82576 (`igb`, QEMU 8 and later): 16 queue pairs with RSS, the
    /// server NIC the kernel serves on with one stack per core.
    Igb,
}

impl Nic {
    /// The names `run --nic` and `bench nbd --nic` take.
    pub const NAMES: [&'static str; 2] = ["virtio", "igb"];

    pub fn parse(s: &str) -> Option<Nic> {
        match s {
            "virtio" => Some(Nic::Virtio),
            "igb" => Some(Nic::Igb),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Nic::Virtio => "virtio",
            Nic::Igb => "igb",
        }
    }

    /// QEMU's `-device` value on netdev `net0`. virtio-net goes without
    /// EVENT_IDX (see `Config::command`), with `host_mtu` when `mtu` is
    /// set, and with multiqueue (`mq=on` and an MSI-X vector per queue,
    /// the control queue's and the configuration's) for `queues` above 1
    /// (its netdev then has as many: a multi-queue tap); the 82576 has no
    /// MTU to announce (its frame size is the driver's choice) and steers
    /// by RSS over its own queues.
    pub fn device(self, mtu: Option<u16>, queues: u16) -> String {
        match self {
            Nic::Virtio => {
                let mut dev = "virtio-net-pci,netdev=net0,event_idx=off".to_string();
                if let Some(m) = mtu {
                    dev += &format!(",host_mtu={m}");
                }
                if queues > 1 {
                    dev += &format!(",mq=on,vectors={}", 2 * u32::from(queues) + 2);
                }
                dev
            }
            Nic::Igb => "igb,netdev=net0".to_string(),
        }
    }
}

impl Config {
    /// The queues a tap for this guest gets: one per CPU (at most 8, the
    /// kernel's most stacks) with virtio-net, which then serves with one
    /// network stack per core (VIRTIO_NET_F_MQ); one with igb, whose RSS
    /// steers over its own queues.
    pub fn tap_queues(&self) -> u16 {
        match self.nic {
            Nic::Virtio => self.smp.clamp(1, 8) as u16,
            Nic::Igb => 1,
        }
    }

    pub fn new(kernel: PathBuf) -> Self {
        Config {
            kernel,
            nvme: Vec::new(),
            nvme_ioeventfd: false,
            mem_mib: 512,
            smp: 1,
            accel: Accel::Tcg,
            args: Vec::new(),
            timeout: None,
            echo: false,
            echo_prefix: None,
            extra: Vec::new(),
            nbd_port: None,
            netdev: None,
            net_mtu: None,
            net_queues: 1,
            nic: Nic::Virtio,
            boot: Boot::Pvh,
            iso: None,
            machine: "q35".into(),
            linux: None,
        }
    }

    /// Adds a controller with one namespace of `image` (512-byte blocks)
    /// and returns the namespace, e.g. to set its block size.
    pub fn add_disk(&mut self, image: impl Into<PathBuf>) -> &mut Namespace {
        self.nvme.push(NvmeController {
            namespaces: vec![Namespace::new(image)],
        });
        let c = self.nvme.len() - 1;
        &mut self.nvme[c].namespaces[0]
    }

    /// Every namespace with the name the guest gives it (`nvme0n1`, ...).
    pub fn namespaces(&self) -> impl Iterator<Item = (String, &Namespace)> {
        self.nvme.iter().enumerate().flat_map(|(c, ctrl)| {
            ctrl.namespaces
                .iter()
                .enumerate()
                .map(move |(i, ns)| (format!("nvme{c}n{}", i + 1), ns))
        })
    }

    /// The kernel's command line words: `args`, and with user networking
    /// the guest's address ([`USER_NET_ARGS`]) unless `args` has one.
    pub fn kernel_args(&self) -> Vec<String> {
        let mut args = self.args.clone();
        if self.user_net() && !args.iter().any(|a| a.starts_with("net.ip=")) {
            args.extend(USER_NET_ARGS.map(String::from));
        }
        args
    }

    /// The QEMU command line, booting from `media` (see [`BootMedia`]).
    pub fn command(&self, media: &BootMedia) -> Command {
        let mut c = Command::new("qemu-system-x86_64");
        c.args(["-machine", &self.machine, "-nodefaults", "-no-reboot"]);
        match self.accel {
            Accel::Kvm => c.args(["-accel", "kvm", "-cpu", "host"]),
            Accel::Tcg => c.args(["-accel", "tcg", "-cpu", "max"]),
        };
        c.arg("-m").arg(self.mem_mib.to_string());
        c.arg("-smp").arg(self.smp.to_string());
        c.args(["-display", "none", "-serial", "stdio", "-monitor", "none"]);
        c.args(["-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"]);
        for (index, ctrl) in self.nvme.iter().enumerate() {
            c.args(ctrl.qemu_args(index, self.nvme_ioeventfd));
        }
        // event_idx=off: virtio-drivers 0.13 decides whether to notify the
        // device with `avail_idx >= avail_event + 1` instead of the
        // wrap-safe "crossed avail_event" test, so with EVENT_IDX every frame
        // sent while QEMU has notifications off still notifies (a QEMU
        // device-model round trip each). With the flags protocol QEMU's
        // NO_NOTIFY is honoured: 4K reads of the null export went from
        // ~8,900 to ~17,600 IOPS at QD16 under TCG.
        let netdev = self.netdev.clone().or_else(|| {
            // No hostfwd here: `Guest::spawn` adds it once the server listens.
            self.nbd_port
                .map(|_| "user,id=net0,net=10.0.2.0/24,host=10.0.2.2".to_string())
        });
        if let Some(netdev) = netdev {
            c.arg("-netdev").arg(netdev);
            c.arg("-device")
                .arg(self.nic.device(self.net_mtu, self.net_queues));
        }
        match (&media.iso, self.boot) {
            (Some(iso), Boot::Bios | Boot::Uefi) => {
                if let (Boot::Uefi, Some(vars)) = (self.boot, &media.vars) {
                    c.arg("-drive").arg(format!(
                        "if=pflash,format=raw,unit=0,readonly=on,file={}",
                        qemu_path(std::path::Path::new(OVMF_CODE))
                    ));
                    c.arg("-drive").arg(format!(
                        "if=pflash,format=raw,unit=1,file={}",
                        qemu_path(vars)
                    ));
                }
                // A display, as a server has: GOP under OVMF, VBE under
                // SeaBIOS. With none GRUB has no framebuffer to hand over
                // and the kernel's screen console stays off.
                c.args(["-device", "VGA"]);
                c.arg("-drive").arg(format!(
                    "file={},if=none,id=cd0,media=cdrom,readonly=on",
                    qemu_path(iso)
                ));
                c.args(["-device", "ide-cd,drive=cd0,bootindex=0"]);
            }
            _ => {
                c.arg("-kernel").arg(&self.kernel);
                match &self.linux {
                    Some(l) => {
                        c.arg("-initrd").arg(&l.initrd);
                        c.arg("-append").arg(&l.cmdline);
                    }
                    None => {
                        c.arg("-append").arg(self.kernel_args().join(" "));
                    }
                }
            }
        }
        c.args(&self.extra);
        c
    }

    /// The NIC is on QEMU user networking (a forwarded NBD port).
    fn user_net(&self) -> bool {
        self.netdev.is_none() && self.nbd_port.is_some()
    }
}

/// Where the guest's NBD service stands, as its console and the port
/// forward tell.
enum Service {
    Starting,
    /// Listening; with user networking, forwarded from this host address.
    Listening(Option<SocketAddr>),
    /// Listening, but the port forward could not be added.
    Unforwarded(String),
    /// The console closed (QEMU exited) before the server listened.
    Gone,
}

/// [`Service`] with a condition variable, shared with the console reader.
struct ServiceState {
    state: Mutex<Service>,
    changed: Condvar,
}

impl ServiceState {
    fn set(&self, s: Service) {
        *self.state.lock().unwrap_or_else(|e| e.into_inner()) = s;
        self.changed.notify_all();
    }
}

/// The NBD port forward of user networking, as the console reader sees it:
/// QMP is connected when the guest first prints (its socket directory is
/// then removed), and the forward added when the server listens.
enum Forward {
    /// Not connected yet: the monitor directory.
    Pending {
        dir: PathBuf,
        port: u16,
        guest_ip: String,
    },
    Connected {
        qmp: monitor::Qmp,
        port: u16,
        guest_ip: String,
    },
    Failed {
        why: String,
        port: u16,
    },
}

impl Forward {
    fn connect(&mut self) {
        let Forward::Pending {
            dir,
            port,
            guest_ip,
        } = self
        else {
            return;
        };
        let (dir, port, guest_ip) = (dir.clone(), *port, std::mem::take(guest_ip));
        *self = match monitor::Qmp::connect(&dir.join(monitor::SOCKET)) {
            Ok(qmp) => {
                // Connected: the socket file is no longer needed.
                let _ = std::fs::remove_dir_all(&dir);
                Forward::Connected {
                    qmp,
                    port,
                    guest_ip,
                }
            }
            Err(why) => Forward::Failed { why, port },
        };
    }

    fn open(&mut self) -> Service {
        self.connect();
        let (r, port) = match self {
            Forward::Connected {
                qmp,
                port: 0,
                guest_ip,
            } => {
                // A free port; another process may take it before QEMU
                // does: then try another.
                let mut last = (Err("no free port".to_string()), 0);
                for _ in 0..5 {
                    let Ok(p) = free_port() else {
                        continue;
                    };
                    last = (qmp.hostfwd_add(p, guest_ip, GUEST_NBD_PORT), p);
                    if last.0.is_ok() {
                        break;
                    }
                }
                last
            }
            Forward::Connected {
                qmp,
                port,
                guest_ip,
            } => (qmp.hostfwd_add(*port, guest_ip, GUEST_NBD_PORT), *port),
            Forward::Failed { why, port } => (Err(why.clone()), *port),
            Forward::Pending { port, .. } => (Err("no monitor".into()), *port),
        };
        match r {
            Ok(()) => Service::Listening(Some(SocketAddr::from((Ipv4Addr::LOCALHOST, port)))),
            Err(e) => Service::Unforwarded(format!(
                "cannot forward 127.0.0.1:{port} to the guest's NBD port: {e}"
            )),
        }
    }
}

/// What [`Guest::wait_nbd`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NbdReady {
    /// The NBD server listens; with user networking, clients reach it at
    /// this host address (forwarded by QEMU).
    Listening(Option<SocketAddr>),
    /// The guest stopped, or the time ran out, before the server listened.
    NotListening,
}

/// What a finished boot left behind.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// The guest's exit status (from its power-off line).
    pub status: u8,
    /// Everything the guest printed.
    pub console: String,
    /// Time from spawning QEMU to the first kernel log line.
    pub first_line: Option<Duration>,
    /// Time from spawning QEMU to its exit.
    pub elapsed: Duration,
}

impl Outcome {
    /// Console lines without a log prefix (self-test results).
    pub fn result_lines(&self) -> impl Iterator<Item = &str> {
        self.console
            .lines()
            .filter(|l| !l.starts_with('[') && !l.trim().is_empty())
    }
}

/// A running QEMU; killed when dropped.
pub struct Guest {
    child: Option<Child>,
    console: Arc<Mutex<String>>,
    first_line: Arc<Mutex<Option<Duration>>>,
    stderr: Arc<Mutex<String>>,
    readers: Vec<std::thread::JoinHandle<()>>,
    started: Instant,
    timeout: Option<Duration>,
    service: Arc<ServiceState>,
    /// QMP socket directory (user networking), removed on drop.
    _monitor: Option<monitor::MonitorDir>,
    /// The ISO and firmware variables of a bios/uefi boot, removed on drop
    /// (after QEMU is killed, in `Drop`).
    _media: BootMedia,
}

impl Drop for Guest {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> Result<u16, Error> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(io_err("bind a free port"))?;
    Ok(l.local_addr().map_err(io_err("local address"))?.port())
}

/// The AIO backend of the emulated NVMe drive: `io_uring` where this QEMU
/// and host take it for the image (it doubled the in-guest 4K random read
/// IOPS at QD16 over `threads` under TCG here), else `threads`. Probed once
/// per image directory and process: QEMU opens the drive, stopped (`-S`),
/// and quits.
pub fn drive_aio(disk: &std::path::Path) -> &'static str {
    use std::collections::HashMap;
    static CACHE: Mutex<Option<HashMap<PathBuf, &'static str>>> = Mutex::new(None);
    match std::env::var("DIOXIDE_NVME_AIO").as_deref() {
        Ok("threads") => return "threads",
        Ok("io_uring") => return "io_uring",
        Ok("native") => return "native",
        _ => {}
    }
    let dir = disk.parent().map(PathBuf::from).unwrap_or_default();
    let mut cache = CACHE.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(a) = cache.get_or_insert_with(HashMap::new).get(&dir) {
        return a;
    }
    let mut drive = std::ffi::OsString::from("file=");
    drive.push(disk.to_string_lossy().replace(',', ",,"));
    drive.push(",if=none,id=probe,format=raw,cache=none,aio=io_uring,readonly=on,file.locking=off");
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args([
        "-machine",
        "none",
        "-nodefaults",
        "-display",
        "none",
        "-S",
        "-monitor",
        "stdio",
    ])
    .arg("-drive")
    .arg(drive)
    .stdin(Stdio::piped())
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    die_with_parent(&mut cmd);
    let ok = match cmd.spawn() {
        Ok(mut child) => {
            if let Some(mut i) = child.stdin.take() {
                let _ = i.write_all(b"quit\n");
            }
            let t0 = Instant::now();
            loop {
                match child.try_wait() {
                    Ok(Some(st)) => break st.success(),
                    Ok(None) if t0.elapsed() < Duration::from_secs(10) => {
                        std::thread::sleep(Duration::from_millis(10))
                    }
                    _ => {
                        let _ = child.kill();
                        let _ = child.wait();
                        break false;
                    }
                }
            }
        }
        Err(_) => false,
    };
    let aio = if ok { "io_uring" } else { "threads" };
    cache.get_or_insert_with(HashMap::new).insert(dir, aio);
    aio
}

/// The child gets SIGKILL when the thread that started it dies, so that a
/// QEMU (or qemu-nbd) never outlives `dioxide` killed by a signal (Ctrl-C,
/// a test harness's kill), when destructors do not run.
pub fn die_with_parent(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl is async-signal-safe and touches no memory of ours.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

const POWER_OFF: &str = "dioxide: power off status=";
const RESET: &str = "dioxide: reset status=";

/// How the guest said it ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ending {
    /// Powered off through isa-debug-exit (also a line without `method=`,
    /// from kernels before it): QEMU exits with `2n + 1`.
    DebugExit,
    /// Powered off through ACPI S5: QEMU exits with 0.
    Acpi,
    /// Halted (or an unknown method): QEMU does not exit by itself.
    Halt,
    /// Reset: under `-no-reboot` QEMU exits with 0.
    Reset,
}

/// The guest's last power-off or reset line: its status and how it ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestEnd {
    pub status: u8,
    pub ending: Ending,
    /// An earlier line with the same status said `method=debugexit`: QEMU
    /// may be exiting through isa-debug-exit (`2n + 1`) while another vCPU
    /// thread runs the guest on to its next method and its line (seen
    /// under QEMU 10 TCG on a loaded host: the guest's 10 ms wait ended
    /// before QEMU did).
    pub after_debug_exit: bool,
}

impl GuestEnd {
    /// QEMU's exit code for this ending.
    pub fn expected_code(&self) -> i32 {
        match self.ending {
            Ending::Acpi | Ending::Reset => 0,
            Ending::DebugExit | Ending::Halt => debug_exit_code(self.status),
        }
    }
}

/// Finds the last `dioxide: power off status=<n> [method=<m>]` or `dioxide:
/// reset status=<n> method=<m>` line of the console.
pub fn guest_end(console: &str) -> Option<GuestEnd> {
    console
        .lines()
        .rev()
        .find_map(|l| {
            let (rest, reset) = match (l.strip_prefix(POWER_OFF), l.strip_prefix(RESET)) {
                (Some(r), _) => (r, false),
                (None, Some(r)) => (r, true),
                (None, None) => return None,
            };
            let mut words = rest.split_whitespace();
            let status = words.next()?.parse::<u8>().ok()?;
            let method = words.find_map(|w| w.strip_prefix("method="));
            let ending = match (reset, method) {
                (true, _) => Ending::Reset,
                (false, None | Some("debugexit")) => Ending::DebugExit,
                (false, Some("acpi")) => Ending::Acpi,
                (false, Some(_)) => Ending::Halt,
            };
            Some(GuestEnd {
                status,
                ending,
                after_debug_exit: false,
            })
        })
        .map(|mut g| {
            let tried = format!("{POWER_OFF}{} method=debugexit", g.status);
            g.after_debug_exit =
                g.ending == Ending::Acpi && console.lines().any(|l| l.starts_with(&tried));
            g
        })
}

/// One console line as text: bytes that are not UTF-8 replaced, terminal
/// control sequences removed (SeaBIOS, OVMF and GRUB draw their screens on
/// COM1 with VT100 escapes, e.g. `ESC[2J ESC[01;01H`), and control
/// characters but the newline (the kernel's `\r\n` ends a line with `\n`).
pub fn console_text(line: &[u8]) -> String {
    strip_ansi_escapes::strip_str(String::from_utf8_lossy(line))
}

impl Guest {
    /// Starts QEMU.
    pub fn spawn(cfg: &Config) -> Result<Guest, Error> {
        let media = BootMedia::prepare(cfg)?;
        let mut cmd = cfg.command(&media);
        // User networking: a QMP monitor through which the console reader
        // adds the NBD port forward once the server listens.
        let monitor = match cfg.nbd_port {
            Some(port) if cfg.user_net() => Some((monitor::MonitorDir::new()?, port)),
            _ => None,
        };
        if let Some((m, _)) = &monitor {
            cmd.arg("-qmp").arg(m.qemu_arg());
        }
        // The guest's address: its `net.ip=` (given or ours), without the
        // prefix length.
        let guest_ip = cfg
            .args
            .iter()
            .find_map(|a| a.strip_prefix("net.ip="))
            .or_else(|| USER_NET_ARGS[0].strip_prefix("net.ip="))
            .and_then(|c| c.split('/').next())
            .unwrap_or_default()
            .to_string();
        // The console line that says the server listens.
        let ready = cfg.linux.as_ref().map(|l| l.ready.clone());
        let mut forward = monitor.as_ref().map(|(m, port)| Forward::Pending {
            dir: m.path().to_path_buf(),
            port: *port,
            guest_ip: guest_ip.clone(),
        });
        let service = Arc::new(ServiceState {
            state: Mutex::new(Service::Starting),
            changed: Condvar::new(),
        });
        die_with_parent(&mut cmd);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let started = Instant::now();
        let mut child = cmd.spawn().map_err(|source| Error::Spawn {
            program: "qemu-system-x86_64".into(),
            hint: "apt-get install qemu-system-x86",
            source,
        })?;
        let console = Arc::new(Mutex::new(String::new()));
        let first_line = Arc::new(Mutex::new(None));
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut readers = Vec::new();
        if let Some(out) = child.stdout.take() {
            let (console, first_line, echo) = (console.clone(), first_line.clone(), cfg.echo);
            let prefix = cfg.echo_prefix;
            let service = service.clone();
            let mut forward = forward.take();
            readers.push(std::thread::spawn(move || {
                let mut r = BufReader::new(out);
                let mut line = Vec::new();
                loop {
                    line.clear();
                    match r.read_until(b'\n', &mut line) {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {}
                    }
                    let text = console_text(&line);
                    if text.starts_with('[') {
                        let mut f = first_line.lock().unwrap_or_else(|e| e.into_inner());
                        f.get_or_insert(started.elapsed());
                    }
                    // The guest runs, so QEMU made its monitor socket.
                    if let Some(f) = forward.as_mut() {
                        f.connect();
                    }
                    // The server listens: open the port (before the line
                    // reaches the console, so that whoever sees it there
                    // finds the port open).
                    let listening = match &ready {
                        Some(r) => text.contains(r.as_str()),
                        None => text.starts_with('[') && text.contains(NBD_LISTENING),
                    };
                    let now_serving = listening.then(|| match forward.as_mut() {
                        None => Service::Listening(None),
                        Some(f) => f.open(),
                    });
                    if echo && prefix.is_none_or(|p| text.starts_with(p)) {
                        let mut so = std::io::stdout().lock();
                        let _ = so.write_all(text.as_bytes());
                        let _ = so.flush();
                    }
                    console
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push_str(&text);
                    if let Some(s) = now_serving {
                        service.set(s);
                    }
                }
                let mut s = service.state.lock().unwrap_or_else(|e| e.into_inner());
                if matches!(*s, Service::Starting) {
                    *s = Service::Gone;
                    service.changed.notify_all();
                }
            }));
        }
        if let Some(mut err) = child.stderr.take() {
            let (stderr, echo) = (stderr.clone(), cfg.echo);
            readers.push(std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = err.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    if echo {
                        let _ = std::io::stderr().write_all(&buf[..n]);
                    }
                    stderr
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push_str(&String::from_utf8_lossy(&buf[..n]));
                }
            }));
        }
        Ok(Guest {
            child: Some(child),
            console,
            first_line,
            stderr,
            readers,
            started,
            timeout: cfg.timeout,
            service,
            _monitor: monitor.map(|(m, _)| m),
            _media: media,
        })
    }

    /// Waits up to `timeout` for the kernel's NBD server to listen (and, with
    /// user networking, for its port forward to be open). An error when the
    /// forward could not be added (QEMU's message).
    pub fn wait_nbd(&self, timeout: Duration) -> Result<NbdReady, Error> {
        // (A timeout too long for an Instant waits without one.)
        let deadline = Instant::now().checked_add(timeout);
        let mut s = self.service.state.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            match &*s {
                Service::Listening(a) => return Ok(NbdReady::Listening(*a)),
                Service::Unforwarded(e) => return Err(Error::Usage(e.clone())),
                Service::Gone => return Ok(NbdReady::NotListening),
                Service::Starting => {}
            }
            let cv = &self.service.changed;
            s = match deadline {
                None => cv.wait(s).unwrap_or_else(|e| e.into_inner()),
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Ok(NbdReady::NotListening);
                    }
                    cv.wait_timeout(s, left)
                        .unwrap_or_else(|e| e.into_inner())
                        .0
                }
            };
        }
    }

    /// What the guest printed so far.
    pub fn console(&self) -> String {
        self.console
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// When QEMU was spawned (after its boot media were made).
    pub fn started(&self) -> Instant {
        self.started
    }

    /// Time from spawning QEMU to the kernel's first log line, once it came.
    pub fn first_line(&self) -> Option<Duration> {
        *self.first_line.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// QEMU's process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Waits for QEMU to exit (bounded by the timeout) and interprets it.
    pub fn wait(mut self) -> Result<Outcome, Error> {
        let Some(mut child) = self.child.take() else {
            return Err(Error::NoPowerOff(String::new()));
        };
        let status = loop {
            match child.try_wait() {
                Ok(Some(s)) => break s,
                Ok(None) => {}
                Err(e) => {
                    return Err(Error::Io {
                        context: "waiting for qemu".into(),
                        source: e,
                    })
                }
            }
            if let Some(t) = self.timeout {
                if self.started.elapsed() >= t {
                    let _ = child.kill();
                    let _ = child.wait();
                    for r in self.readers.drain(..) {
                        let _ = r.join();
                    }
                    return Err(Error::Timeout(t.as_secs()));
                }
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let elapsed = self.started.elapsed();
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
        let console = self.console();
        let stderr = self
            .stderr
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let first_line = *self.first_line.lock().unwrap_or_else(|e| e.into_inner());
        let guest_status = guest_end(&console);
        let tail = if stderr.trim().is_empty() {
            String::new()
        } else {
            format!(": {}", stderr.trim())
        };
        let status = decide(guest_status, status.code(), tail)?;
        Ok(Outcome {
            status,
            console,
            first_line,
            elapsed,
        })
    }

    /// Whether QEMU is still running (false once it exited, zombie or not:
    /// the child is reaped here and [`Guest::wait`] then reports its status).
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut().map(Child::try_wait) {
            Some(Ok(None)) => true,
            Some(Ok(Some(_)) | Err(_)) | None => false,
        }
    }
}

/// QEMU's exit code for a guest that powered off with `status` through
/// isa-debug-exit: `(status << 1) | 1`, as a process exit code (8 bits).
pub fn debug_exit_code(status: u8) -> i32 {
    ((status as i32) << 1 | 1) & 0xff
}

/// What a finished QEMU means: the guest's status from its power-off or
/// reset line (`guest`, see [`guest_end`]) checked against QEMU's exit code
/// (`code`, `None` when killed by a signal): `2n + 1` after isa-debug-exit,
/// 0 after ACPI S5 or a reset. `stderr` is appended to errors (empty or
/// `": ..."`).
pub fn decide(guest: Option<GuestEnd>, code: Option<i32>, stderr: String) -> Result<u8, Error> {
    match (guest, code) {
        (Some(g), Some(c)) if c == g.expected_code() => Ok(g.status),
        (Some(g), Some(c)) if g.after_debug_exit && c == debug_exit_code(g.status) => Ok(g.status),
        (Some(g), code) => Err(Error::ExitMismatch {
            guest: g.status,
            expected: g.expected_code(),
            qemu: code.map_or("killed by a signal".to_string(), |c| c.to_string()),
            stderr,
        }),
        (None, Some(0)) => Err(Error::NoPowerOff(stderr)),
        (None, code) => Err(Error::Qemu {
            status: code.map_or("killed by a signal".to_string(), |c| c.to_string()),
            stderr,
        }),
    }
}

/// Boots once and waits for the outcome.
pub fn run(cfg: &Config) -> Result<Outcome, Error> {
    Guest::spawn(cfg)?.wait()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A power-off through isa-debug-exit with status `n`.
    fn dx(n: u8) -> Option<GuestEnd> {
        Some(GuestEnd {
            status: n,
            ending: Ending::DebugExit,
            after_debug_exit: false,
        })
    }

    #[test]
    fn status_is_taken_when_qemu_agrees() {
        for n in [0u8, 1, 2, 3, 4, 5] {
            let code = 2 * n as i32 + 1;
            assert_eq!(decide(dx(n), Some(code), String::new()).unwrap(), n);
        }
        // Exit codes are 8 bits: status 200 gives (401 & 0xff).
        assert_eq!(debug_exit_code(200), 401 & 0xff);
        assert_eq!(decide(dx(200), Some(145), String::new()).unwrap(), 200);
    }

    #[test]
    fn a_mismatch_is_an_error_naming_both() {
        let e = decide(dx(0), Some(3), String::new()).unwrap_err();
        match &e {
            Error::ExitMismatch {
                guest: 0,
                expected: 1,
                qemu,
                ..
            } if qemu == "3" => {}
            other => panic!("{other:?}"),
        }
        let msg = e.to_string();
        assert!(
            msg.contains("status 0") && msg.contains("exit status was 3"),
            "{msg}"
        );
        assert_eq!(e.exit_code(), 125);
        // QEMU's own failure (exit 1) after a line with another status than 0.
        assert!(matches!(
            decide(dx(1), Some(1), String::new()),
            Err(Error::ExitMismatch { guest: 1, .. })
        ));
        assert!(matches!(
            decide(dx(5), Some(0), String::new()),
            Err(Error::ExitMismatch { guest: 5, .. })
        ));
        let e = decide(dx(2), None, String::new()).unwrap_err();
        assert!(e.to_string().contains("killed by a signal"), "{e}");
    }

    #[test]
    fn console_lines_lose_the_firmware_screen_drawing() {
        // As OVMF and GRUB wrote them on COM1 (captured).
        let ovmf = b"\x1b[2J\x1b[01;01H\x1b[=3h\x1b[2J\x1b[01;01HBdsDxe: loading Boot0001 \"UEFI QEMU DVD-ROM QM00011 \" from PciRoot(0x0)\r\n";
        assert_eq!(
            console_text(ovmf),
            "BdsDxe: loading Boot0001 \"UEFI QEMU DVD-ROM QM00011 \" from PciRoot(0x0)\n"
        );
        let grub = b"\x1b[H\x1b[J\x1b[1;1H\x1b[0m\x1b[30m\x1b[40m    Booting `dioxide'\n";
        assert_eq!(console_text(grub), "    Booting `dioxide'\n");
        // A kernel line right after GRUB's drawing starts with its '['.
        let kernel = b"\r\x1b[0m[    0.010431] INFO  boot: dioxide 0.1.0 via Multiboot2, cmdline \"x=$HOME;y\"\r\n";
        assert_eq!(
            console_text(kernel),
            "[    0.010431] INFO  boot: dioxide 0.1.0 via Multiboot2, cmdline \"x=$HOME;y\"\n"
        );
        // Kernel lines are unchanged: UTF-8 names, brackets, no newline at
        // the end of the stream.
        let file = "file /dir-1-é/file-7-ünïcødé bytes=12 sha256=ab [x]".as_bytes();
        assert_eq!(console_text(file), String::from_utf8_lossy(file));
        assert_eq!(console_text(b"\xff ok\n"), "\u{fffd} ok\n");
    }

    #[test]
    fn boot_names() {
        for b in Boot::ALL {
            assert_eq!(Boot::parse(b.name()).unwrap(), b);
        }
        assert_eq!(Boot::default(), Boot::Pvh);
        let e = Boot::parse("coreboot").unwrap_err();
        assert_eq!(e.to_string(), "--boot coreboot: expected pvh, bios or uefi");
    }

    fn args_of(c: &Command) -> Vec<String> {
        c.get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }

    /// The arguments from the first `-drive` of an NVMe image up to, not
    /// including, `-kernel` (images under a directory that does not exist:
    /// the io_uring probe fails, so aio=threads).
    fn nvme_args(cfg: &Config) -> Vec<String> {
        let a = args_of(&cfg.command(&BootMedia::prepare(cfg).unwrap()));
        let from = a.iter().position(|x| x == "-drive").unwrap();
        let to = a.iter().position(|x| x == "-kernel").unwrap();
        a[from..to].to_vec()
    }

    const NO_DIR: &str = "/nonexistent-dioxide-dir";

    #[test]
    fn one_disk_is_the_controllers_own_drive_as_before() {
        let mut cfg = Config::new(PathBuf::from("/k/dioxide-kernel"));
        cfg.add_disk(format!("{NO_DIR}/a,b.img")).lbs = 4096;
        assert_eq!(
            nvme_args(&cfg),
            [
                "-drive",
                "file=/nonexistent-dioxide-dir/a,,b.img,if=none,id=nvm0,format=raw,cache=none,aio=threads",
                "-device",
                "nvme,drive=nvm0,serial=dioxide0,logical_block_size=4096,physical_block_size=4096",
            ]
        );
        // blkdebug between the device and the image.
        cfg.nvme[0].namespaces[0].inject_eio = vec![8, 9];
        cfg.nvme_ioeventfd = true;
        assert_eq!(
            nvme_args(&cfg),
            [
                "-drive",
                "if=none,id=nvm0,format=raw,cache=none,file.driver=blkdebug,file.inject-error.0.event=read_aio,file.inject-error.0.iotype=read,file.inject-error.0.errno=5,file.inject-error.0.sector=8,file.inject-error.1.event=read_aio,file.inject-error.1.iotype=read,file.inject-error.1.errno=5,file.inject-error.1.sector=9,file.image.driver=file,file.image.filename=/nonexistent-dioxide-dir/a,,b.img,file.image.aio=threads",
                "-device",
                "nvme,drive=nvm0,serial=dioxide0,logical_block_size=4096,physical_block_size=4096,ioeventfd=on",
            ]
        );
        // No disk: no NVMe device.
        let cfg = Config::new(PathBuf::from("/k/dioxide-kernel"));
        let a = args_of(&cfg.command(&BootMedia::prepare(&cfg).unwrap()));
        assert!(!a.iter().any(|x| x.contains("nvme")), "{a:?}");
    }

    #[test]
    fn a_controller_with_several_namespaces_has_nvme_ns_devices() {
        let specs: Vec<String> = [
            "a.img",
            "b.img",
            "c.img,ctrl=1,lbs=4096",
            "d.img,ms=8,ctrl=1",
        ]
        .iter()
        .map(|s| format!("{NO_DIR}/{s}"))
        .collect();
        let mut cfg = Config::new(PathBuf::from("/k/dioxide-kernel"));
        cfg.nvme = parse_disks(&specs, 512).unwrap();
        let names: Vec<(String, u32, u16)> =
            cfg.namespaces().map(|(n, ns)| (n, ns.lbs, ns.ms)).collect();
        assert_eq!(
            names,
            [
                ("nvme0n1".to_string(), 512, 0),
                ("nvme1n1".to_string(), 512, 0),
                ("nvme1n2".to_string(), 4096, 0),
                ("nvme1n3".to_string(), 512, 8),
            ]
        );
        let drive = |id: &str, img: &str| {
            format!("file={NO_DIR}/{img},if=none,id={id},format=raw,cache=none,aio=threads")
        };
        assert_eq!(
            nvme_args(&cfg),
            [
                "-drive".to_string(),
                drive("nvm0", "a.img"),
                "-device".into(),
                "nvme,drive=nvm0,serial=dioxide0,logical_block_size=512,physical_block_size=512".into(),
                "-drive".into(),
                drive("nvm1n1", "b.img"),
                "-drive".into(),
                drive("nvm1n2", "c.img"),
                "-drive".into(),
                drive("nvm1n3", "d.img"),
                "-device".into(),
                "nvme,id=nvme1,serial=dioxide1".into(),
                "-device".into(),
                "nvme-ns,drive=nvm1n1,bus=nvme1,nsid=1,logical_block_size=512,physical_block_size=512".into(),
                "-device".into(),
                "nvme-ns,drive=nvm1n2,bus=nvme1,nsid=2,logical_block_size=4096,physical_block_size=4096".into(),
                "-device".into(),
                "nvme-ns,drive=nvm1n3,bus=nvme1,nsid=3,logical_block_size=512,physical_block_size=512,ms=8".into(),
            ]
        );
        // A lone namespace with metadata is an nvme-ns device too.
        let mut cfg = Config::new(PathBuf::from("/k/dioxide-kernel"));
        cfg.add_disk(format!("{NO_DIR}/m.img")).ms = 16;
        cfg.nvme_ioeventfd = true;
        assert_eq!(
            nvme_args(&cfg)[2..],
            [
                "-device",
                "nvme,id=nvme0,serial=dioxide0,ioeventfd=on",
                "-device",
                "nvme-ns,drive=nvm0n1,bus=nvme0,nsid=1,logical_block_size=512,physical_block_size=512,ms=16",
            ]
        );
    }

    #[test]
    fn disk_specs() {
        let (ctrl, ns) = parse_disk("x.img", 4096).unwrap();
        assert_eq!(
            (ctrl, ns),
            (None, {
                let mut n = Namespace::new("x.img");
                n.lbs = 4096;
                n
            })
        );
        let (ctrl, ns) = parse_disk("a,,b.img,lbs=512,ms=64,ctrl=2", 4096).unwrap();
        assert_eq!(ctrl, Some(2));
        assert_eq!(
            (ns.image, ns.lbs, ns.ms),
            (PathBuf::from("a,b.img"), 512, 64)
        );
        let err = |s: &str| parse_disk(s, 512).unwrap_err().to_string();
        assert_eq!(err(",lbs=512"), "--disk ,lbs=512: no image path");
        assert_eq!(
            err("x,lbs=1024"),
            "--disk x,lbs=1024: lbs=1024: 512 or 4096"
        );
        assert_eq!(
            err("x,ms=-1"),
            "--disk x,ms=-1: ms=-1: metadata bytes per block, 0 to 65535"
        );
        assert_eq!(
            err("x,nsid=2"),
            "--disk x,nsid=2: unknown option \"nsid\" (lbs=512|4096, ms=BYTES, ctrl=N)"
        );
        assert_eq!(
            err("x,4096"),
            "--disk x,4096: \"4096\": expected KEY=VALUE (lbs, ms, ctrl)"
        );
        assert_eq!(
            err("x,lbs=512,lbs=4096"),
            "--disk x,lbs=512,lbs=4096: lbs= given twice"
        );
        // ctrl= names a controller made so far, or the next one.
        let specs = |s: &[&str]| s.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        let c = parse_disks(&specs(&["a,ctrl=0", "b,ctrl=0", "c"]), 512).unwrap();
        assert_eq!(c.len(), 2);
        assert_eq!(c[0].namespaces.len(), 2);
        assert_eq!(c[1].namespaces[0].image, PathBuf::from("c"));
        let e = parse_disks(&specs(&["a", "b,ctrl=2"]), 512).unwrap_err();
        assert_eq!(
            e.to_string(),
            "--disk b,ctrl=2: ctrl=2, but only 1 controller(s) so far (0-based; ctrl=1 makes the next)"
        );
        let many: Vec<String> = (0..=MAX_CONTROLLERS).map(|i| format!("d{i}")).collect();
        assert!(parse_disks(&many, 512)
            .unwrap_err()
            .to_string()
            .contains("at most 16 NVMe controllers"));
        let many: Vec<String> = (0..=MAX_NAMESPACES)
            .map(|i| format!("d{i},ctrl=0"))
            .collect();
        assert!(parse_disks(&many, 512)
            .unwrap_err()
            .to_string()
            .contains("at most 16 namespaces per controller"));
    }

    #[test]
    fn the_command_line_of_each_boot() {
        let mut cfg = Config::new(PathBuf::from("/k/dioxide-kernel"));
        cfg.args = vec!["selftest=digest".into()];
        cfg.nbd_port = Some(0);
        let pvh = args_of(&cfg.command(&BootMedia::prepare(&cfg).unwrap()));
        let at = pvh.iter().position(|a| a == "-append").unwrap();
        assert_eq!(
            pvh[at + 1],
            "selftest=digest net.ip=10.0.2.15/24 net.gw=10.0.2.2"
        );
        assert!(pvh.contains(&"-kernel".to_string()));
        // An ISO given: no per-run ISO is made (the kernel need not exist).
        let dir = tempfile::tempdir().unwrap();
        let iso = dir.path().join("a,b.iso");
        std::fs::write(&iso, b"iso").unwrap();
        cfg.iso = Some(iso.clone());
        assert!(BootMedia::prepare(&cfg).is_err(), "an ISO with pvh");
        cfg.boot = Boot::Bios;
        let bios = args_of(&cfg.command(&BootMedia::prepare(&cfg).unwrap()));
        assert!(!bios.contains(&"-kernel".to_string()), "{bios:?}");
        assert!(!bios.iter().any(|a| a.contains("pflash")), "{bios:?}");
        let cd = format!(
            "file={},if=none,id=cd0,media=cdrom,readonly=on",
            iso.to_string_lossy().replace(',', ",,")
        );
        assert!(bios.contains(&cd), "{bios:?}");
        assert!(bios.contains(&"ide-cd,drive=cd0,bootindex=0".to_string()));
        if std::path::Path::new(OVMF_VARS).is_file() {
            cfg.boot = Boot::Uefi;
            let media = BootMedia::prepare(&cfg).unwrap();
            let vars = media.vars.clone().unwrap();
            assert!(vars.is_file());
            let uefi = args_of(&cfg.command(&media));
            assert!(uefi.contains(&format!(
                "if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}"
            )));
            assert!(uefi.contains(&format!(
                "if=pflash,format=raw,unit=1,file={}",
                vars.display()
            )));
            assert!(uefi.contains(&"VGA".to_string()) && uefi.contains(&cd));
            // The per-run copy of the variables goes with the media.
            drop(media);
            assert!(!vars.exists());
        }
        cfg.iso = Some(dir.path().join("missing.iso"));
        cfg.boot = Boot::Bios;
        assert!(BootMedia::prepare(&cfg).is_err());
    }

    #[test]
    fn a_linux_guest_boots_with_its_initrd_and_command_line() {
        let mut cfg = Config::new(PathBuf::from("/l/vmlinuz"));
        cfg.args = vec!["selftest=digest".into()];
        cfg.nbd_port = Some(0);
        cfg.linux = Some(LinuxBoot {
            initrd: PathBuf::from("/l/initramfs.cpio"),
            cmdline: "console=ttyS0".into(),
            ready: "serving".into(),
        });
        let a = args_of(&cfg.command(&BootMedia::prepare(&cfg).unwrap()));
        let at = |w: &str| a.iter().position(|x| x == w).unwrap();
        assert_eq!(a[at("-kernel") + 1], "/l/vmlinuz");
        assert_eq!(a[at("-initrd") + 1], "/l/initramfs.cpio");
        // Its own command line: not the appliance's arguments.
        assert_eq!(a[at("-append") + 1], "console=ttyS0");
        // The same NIC as the appliance's.
        assert!(a.contains(&Nic::Virtio.device(None, 1)), "{a:?}");
        // Only through -kernel.
        cfg.boot = Boot::Bios;
        assert!(BootMedia::prepare(&cfg).is_err());
    }

    #[test]
    fn lines_are_read_with_their_method() {
        let end = |c: &str| guest_end(c);
        assert_eq!(end("dioxide: power off status=3\n"), dx(3));
        assert_eq!(end("dioxide: power off status=0 method=debugexit\n"), dx(0));
        // The last line wins: isa-debug-exit did nothing, then ACPI S5.
        assert_eq!(
            end("dioxide: power off status=0 method=debugexit\ndioxide: power off status=0 method=acpi\n"),
            Some(GuestEnd {
                status: 0,
                ending: Ending::Acpi,
                after_debug_exit: true,
            })
        );
        // QEMU still exiting through isa-debug-exit when the ACPI line
        // came: its code is taken, as is ACPI's; another code is not.
        let g = end("dioxide: power off status=0 method=debugexit\ndioxide: power off status=0 method=acpi\n");
        assert_eq!(decide(g, Some(1), String::new()).unwrap(), 0);
        assert_eq!(decide(g, Some(0), String::new()).unwrap(), 0);
        assert!(decide(g, Some(3), String::new()).is_err());
        // Without the earlier debug-exit line, ACPI's code only.
        let g = end("dioxide: power off status=0 method=acpi\n");
        assert!(decide(g, Some(1), String::new()).is_err());
        assert_eq!(
            end("PANIC: x\ndioxide: reset status=5 method=cf9\n"),
            Some(GuestEnd {
                status: 5,
                ending: Ending::Reset,
                after_debug_exit: false,
            })
        );
        assert_eq!(
            end("dioxide: power off status=1 method=halt\n").map(|g| g.ending),
            Some(Ending::Halt)
        );
        assert_eq!(end("dioxide: power off status=x method=acpi\n"), None);
        assert_eq!(end("[  0.1] INFO boot: hello\n"), None);
    }

    #[test]
    fn acpi_power_off_and_reset_are_accepted_with_exit_code_0() {
        let acpi = |n| {
            Some(GuestEnd {
                status: n,
                ending: Ending::Acpi,
                after_debug_exit: false,
            })
        };
        let reset = |n| {
            Some(GuestEnd {
                status: n,
                ending: Ending::Reset,
                after_debug_exit: false,
            })
        };
        assert_eq!(decide(acpi(0), Some(0), String::new()).unwrap(), 0);
        assert_eq!(decide(acpi(3), Some(0), String::new()).unwrap(), 3);
        assert_eq!(decide(reset(5), Some(0), String::new()).unwrap(), 5);
        // S5 does not give isa-debug-exit's code, and QEMU failing is not S5.
        assert!(matches!(
            decide(acpi(0), Some(1), String::new()),
            Err(Error::ExitMismatch {
                guest: 0,
                expected: 0,
                ..
            })
        ));
        assert!(matches!(
            decide(reset(5), Some(11), String::new()),
            Err(Error::ExitMismatch { guest: 5, .. })
        ));
        // A debug-exit line still needs 2n + 1, not 0.
        assert!(matches!(
            decide(dx(0), Some(0), String::new()),
            Err(Error::ExitMismatch { .. })
        ));
    }

    #[test]
    fn no_power_off_line() {
        assert!(matches!(
            decide(None, Some(0), String::new()),
            Err(Error::NoPowerOff(_))
        ));
        match decide(None, Some(1), ": boom".into()) {
            Err(Error::Qemu { status, stderr }) => {
                assert_eq!((status.as_str(), stderr.as_str()), ("1", ": boom"))
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            decide(None, None, String::new()),
            Err(Error::Qemu { .. })
        ));
    }
}
