//! `dioxide`: run the appliance in QEMU.
//!
//! ```text
//! dioxide run [--disk IMG[,lbs=512|4096][,ms=BYTES][,ctrl=N]]... | [--from DIR]
//!             [--nvme-lbs 512|4096] [--nvme-ioeventfd] [--mem MIB] [--smp N]
//!             [--accel auto|kvm|tcg] [--timeout SECS] [--selftest NAME]
//!             [--completion poll|irq] [--log LEVEL] [--net user|tap] [--nbd-port P]
//!             [--nic virtio|igb] [--offload default|none|all|csum+mrg_rxbuf+...] [--mtu N]
//!             [--inject-eio SECTOR]... [--boot pvh|bios|uefi] [--iso ISO]
//!             [--machine OPTS] [--writable] [-- KERNEL-ARGS...]
//! dioxide image [--out dioxide.iso] [--cmdline "KERNEL-ARGS"] [--menu-timeout SECS]
//! dioxide build-kernel
//! dioxide mkfs IMG [--from DIR] [--volume NAME:SIZE]... [--size SIZE] [--block-size B] [--label L]
//! dioxide fsck IMG
//! dioxide ls IMG [PATH]
//! dioxide cat IMG PATH
//! dioxide bench local [--qd 1,16,64,128,256] [--dev nvme,null] [--completion poll,irq]
//!                     [--secs N] [--out DIR] [--file-size 1G] [--boot pvh|bios|uefi]
//!                     [--smp 1,2,4] [--dbbuf 0,1] [--ioeventfd 0,1] [--host-threads 1,2]
//! dioxide bench nbd [--qd 1,16,64,128] [--jobs N] [--secs N] [--net user,tap]
//!                   [--nic virtio,igb] [--offload none,all,...] [--mtu 1500,9000] [--targets file,null]
//!                   [--out DIR] [--file-size 1G] [--boot pvh|bios|uefi]
//!                   [--smp 1,2] [--dbbuf 0,1] [--ioeventfd 0,1]
//! dioxide bench nbd --remote nbd://HOST[:PORT] [--peer URI]... [--qd ...] [--jobs N]
//!                   [--secs N] [--rounds N] [--targets file,raw,null] [--out DIR]
//! dioxide bench boot [--boot pvh,bios,uefi] [--runs 3]
//! ```
//!
//! Exit status: the guest's (0 success, 1 self-test failed, 2 bad arguments or
//! missing hardware, 3 device error, 4 CPU exception, 5 kernel panic); 2 for
//! bad input on the host side, 124 on timeout, 125 when QEMU or the build
//! fails.

use clap::{Parser, Subcommand, ValueEnum};
use dioxide::accel::{self, Accel};
use dioxide::nbdbench::NetMode;
use dioxide::qemu::Boot;
use dioxide::{image, iso, kernel, qemu, Error};
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[derive(Parser)]
#[command(
    name = "dioxide",
    version,
    about = "dioxide unikernel storage appliance: host tools"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum AccelArg {
    Auto,
    Kvm,
    Tcg,
}

#[derive(Clone, Copy, ValueEnum)]
enum Completion {
    Poll,
    Irq,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build the kernel and boot it in QEMU with an emulated NVMe controller.
    Run(RunArgs),
    /// Make a bootable ISO for a server: GRUB for BIOS and UEFI loading the
    /// kernel (multiboot2), console on COM1 (115200) and the screen; a hybrid
    /// image for a CD-ROM, BMC virtual media or `dd` to a USB stick.
    Image {
        /// The ISO file to write.
        #[arg(long, default_value = "dioxide.iso")]
        out: PathBuf,
        /// The kernel command line, e.g. "net.ip=192.168.1.20/24
        /// net.gw=192.168.1.1" (default: none, so the address comes from
        /// DHCP).
        #[arg(long, default_value = "")]
        cmdline: String,
        /// Seconds GRUB shows its menu before booting (0: at once).
        #[arg(long, default_value_t = 5)]
        menu_timeout: u32,
        /// Use this kernel ELF instead of building one.
        #[arg(long)]
        kernel: Option<PathBuf>,
    },
    /// Build the kernel and print the path of its ELF.
    BuildKernel,
    /// Make a dxfs image from a directory tree (like `mke2fs -d`), with
    /// volumes to serve writable.
    Mkfs {
        /// The image file to write.
        img: PathBuf,
        /// The directory whose contents become the filesystem.
        #[arg(long, required_unless_present = "volume")]
        from: Option<PathBuf>,
        /// A sparse file of SIZE bytes at the root (blocks are allocated
        /// as they are first written; the image leaves room for them), for
        /// the appliance to serve writable (`nbd.rw=files`); repeatable.
        #[arg(long, value_name = "NAME:SIZE", value_parser = dioxide::fstool::parse_volume)]
        volume: Vec<(String, u64)>,
        /// Image size (e.g. 512M, 2G); default: what the tree needs plus slack.
        #[arg(long, value_parser = dioxide::fstool::parse_size)]
        size: Option<u64>,
        /// Filesystem block size: a power of two from 4096 to 65536.
        #[arg(long, default_value_t = 4096)]
        block_size: u32,
        /// Volume label.
        #[arg(long, default_value = "")]
        label: String,
    },
    /// Check a dxfs image: exit 0 clean, 4 problems found, 8 cannot check.
    /// A committed transaction in the commit log (a crash before its
    /// checkpoint) is checked as the image reads; `--repair` writes it home.
    Fsck {
        img: PathBuf,
        /// Write a committed transaction found in the commit log home
        /// (what a writable mount does), then check.
        #[arg(long)]
        repair: bool,
    },
    /// List a directory (or one file) of a dxfs image.
    Ls {
        img: PathBuf,
        #[arg(default_value = "/")]
        path: String,
    },
    /// Write a file of a dxfs image to standard output.
    Cat { img: PathBuf, path: String },
    /// Benchmarks.
    Bench {
        #[command(subcommand)]
        which: BenchCmd,
    },
}

#[derive(Subcommand)]
enum BenchCmd {
    /// In-guest 4K random reads (raw namespace, file through the generic
    /// path, file through the simple path), with the host benchmark beside.
    Local(LocalArgs),
    /// fio's nbd engine, 4K random reads, against the appliance's file, raw
    /// and null exports and against qemu-nbd serving the same image on the
    /// host; with --remote, against an appliance running elsewhere and any
    /// --peer servers.
    Nbd(NbdArgs),
    /// Boot-to-serving time: from spawning QEMU to the appliance answering
    /// an NBD handshake on its forwarded port, per boot method.
    Boot {
        /// Boot methods, comma-separated: pvh, bios, uefi.
        #[arg(long, default_value = "pvh,bios,uefi")]
        boot: String,
        /// Boots per method.
        #[arg(long, default_value_t = 3)]
        runs: usize,
        #[arg(long, value_enum, default_value_t = AccelArg::Auto)]
        accel: AccelArg,
    },
}

/// `dioxide run`: the guest, its disks, network and kernel arguments.
#[derive(clap::Args)]
struct RunArgs {
    /// Raw disk image backing an NVMe namespace; repeatable. Each
    /// --disk is namespace 1 of its own controller (nvme0n1, nvme1n1,
    /// ...) unless it says `ctrl=N`: then it is the next namespace of
    /// controller N (nvme1n2, ...). Options: `lbs=512|4096` (default
    /// --nvme-lbs), `ms=BYTES` (metadata per block), `ctrl=N`; commas
    /// in PATH doubled. Default: the image --from builds, else a small
    /// built-in sample tree.
    #[arg(
        long,
        conflicts_with = "from",
        value_name = "PATH[,lbs=512|4096][,ms=BYTES][,ctrl=N]"
    )]
    disk: Vec<String>,
    /// Serve this directory: build a dxfs image of it first (under
    /// target/dioxide/run-from.img).
    #[arg(long)]
    from: Option<PathBuf>,
    /// Logical block size of the namespaces that do not give `lbs=`.
    #[arg(long, default_value_t = 512, value_parser = parse_lbs)]
    nvme_lbs: u32,
    /// QEMU's ioeventfd=on on the NVMe controllers (QEMU 7.2 uses it
    /// for I/O queues with shadow doorbells only).
    #[arg(long)]
    nvme_ioeventfd: bool,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 512)]
    mem: u32,
    /// Guest CPUs (the kernel starts them all; `-- smp=N` caps it).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    smp: u32,
    /// Accelerator; `auto` uses KVM only where it measures fast.
    #[arg(long, value_enum, default_value_t = AccelArg::Auto)]
    accel: AccelArg,
    /// Kill QEMU and fail after this many seconds.
    #[arg(long)]
    timeout: Option<u64>,
    /// Run a kernel self-test and exit: digest, rw, files, noalloc,
    /// nbd-noalloc, fault, panic, calibrate, smp, ap-panic.
    #[arg(long)]
    selftest: Option<String>,
    /// How the kernel reaps NVMe completions.
    #[arg(long, value_enum)]
    completion: Option<Completion>,
    /// Kernel log level (error, warn, info, debug, trace).
    #[arg(long)]
    log: Option<String>,
    /// Use this kernel ELF instead of building one.
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Host port (127.0.0.1) forwarded to the appliance's NBD server
    /// (with --net user).
    #[arg(long, default_value_t = 10809)]
    nbd_port: u16,
    /// Network: `user` (QEMU user networking, port forwarded on
    /// 127.0.0.1) or `tap` (a host tap device, faster; needs root).
    #[arg(long, default_value = "user")]
    net: String,
    /// virtio-net offloads: `default`, `none`, `all`, or names joined
    /// with + (csum, guest_csum, mrg_rxbuf, tso): those on, the others
    /// off (kernel arguments net.NAME=0|1; each used only where the
    /// device offers it, as the boot log says).
    #[arg(long, value_name = "SET", value_parser = dioxide::offload::Offloads::parse)]
    offload: Option<dioxide::offload::Offloads>,
    /// The NIC's MTU (jumbo frames, e.g. 9000): QEMU's host_mtu= on
    /// the virtio-net device and, with --net tap, the tap device's.
    /// Under --net user QEMU's user network stays at 1500.
    #[arg(long, value_parser = dioxide::offload::parse_mtu)]
    mtu: Option<u16>,
    /// The guest's NIC: `virtio` (virtio-net, one queue pair, served by
    /// the boot core) or `igb` (Intel 82576, QEMU 8 and later: one queue
    /// pair and network stack per guest CPU, connections spread by RSS).
    #[arg(long, default_value = "virtio", value_parser = parse_nic)]
    nic: dioxide::qemu::Nic,
    /// Make reads of this 512-byte sector of the (first) disk image
    /// fail with an I/O error (QEMU blkdebug; repeatable): to see how
    /// the appliance reports a device error on nvme0n1.
    #[arg(long, value_name = "SECTOR")]
    inject_eio: Vec<u64>,
    /// How the kernel boots: `pvh` (QEMU loads it), `bios` (GRUB from an
    /// ISO under SeaBIOS) or `uefi` (the same under OVMF), as a server
    /// boots.
    #[arg(long, default_value = "pvh", value_parser = parse_boot)]
    boot: Boot,
    /// With --boot bios|uefi: boot this ISO (from `dioxide image`; the
    /// kernel arguments are those of its grub.cfg) instead of one made
    /// for the run.
    #[arg(long)]
    iso: Option<PathBuf>,
    /// QEMU's machine and its options (`-machine`), e.g.
    /// `q35,pit=off,hpet=off` or `pc`.
    #[arg(long, default_value = "q35", value_name = "OPTS")]
    machine: String,
    /// Take writes: every namespace that holds no dxfs filesystem is
    /// exported writable (`nbd.rw=all`), to the host side of QEMU's
    /// network only (`nbd.rw_from=10.0.2.2/32` with --net user, the tap's
    /// host address with --net tap); other clients see it read-only.
    /// Writes go to the --disk image itself. Kernel arguments after `--`
    /// override either.
    #[arg(long)]
    writable: bool,
    /// More kernel arguments (key=value).
    #[arg(last = true)]
    kernel_args: Vec<String>,
}

/// `dioxide image`: a bootable ISO (BIOS and UEFI) for a server.
fn make_image(
    out: PathBuf,
    cmdline: String,
    menu_timeout: u32,
    kernel_path: Option<PathBuf>,
) -> Result<i32, Error> {
    let words = iso::words(&cmdline);
    iso::check_tools()?;
    let kernel = match kernel_path {
        Some(k) => k,
        None => {
            eprintln!("dioxide: building the kernel (release)");
            kernel::build()?
        }
    };
    let built = iso::build(&kernel, &words, menu_timeout, &out)?;
    if let Err(why) = &built.strip {
        eprintln!("dioxide: note: the kernel keeps its debug information: {why}");
    }
    let altered = iso::altered_words(&words);
    if !altered.is_empty() {
        eprintln!(
            "dioxide: warning: GRUB puts a backslash before each \\, ' and \" and double-quotes words with spaces: {altered:?} do not reach the kernel as written"
        );
    }
    eprintln!(
        "dioxide: wrote {} ({:.1} MiB): BIOS and UEFI boot (GRUB, multiboot2), menu {} s; console on COM1 (115200 8N1) and the screen; the kernel's command line: {:?}{}",
        out.display(),
        built.bytes as f64 / (1 << 20) as f64,
        menu_timeout,
        iso::kernel_view(&words),
        if words.iter().any(|w| w.starts_with("net.ip=")) {
            ""
        } else {
            " (no net.ip=: the address comes from DHCP)"
        }
    );
    eprintln!(
        "dioxide: try it in QEMU: ./dx run --boot uefi --iso {0}; or write it to a USB stick (erases the whole device): dd if={0} of=/dev/sdX bs=4M conv=fsync",
        out.display()
    );
    Ok(0)
}

/// `dioxide bench local`.
#[derive(clap::Args)]
struct LocalArgs {
    /// Queue depths.
    #[arg(long, default_value = "1,16,64,128,256")]
    qd: String,
    /// Devices: nvme, null.
    #[arg(long, default_value = "nvme,null")]
    dev: String,
    /// Completion modes: poll, irq.
    #[arg(long, default_value = "poll")]
    completion: String,
    /// What the requests do: read, write (overwrites of the file's
    /// blocks), write-fua (each durable when it completes).
    #[arg(long, default_value = "read,write,write-fua")]
    op: String,
    /// Seconds per row.
    #[arg(long, default_value_t = 2)]
    secs: u64,
    /// Output directory (results.json, plot.svg).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Size of the benchmark file (default 1G).
    #[arg(long, default_value = "1G", value_parser = dioxide::fstool::parse_size)]
    file_size: u64,
    #[arg(long, value_enum, default_value_t = AccelArg::Auto)]
    accel: AccelArg,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 512)]
    mem: u32,
    /// Reads per target of the host benchmark (0 skips it).
    #[arg(long, default_value_t = 2_000_000)]
    host_ios: u64,
    /// The host benchmark again on T threads side by side, each with
    /// its own engine, queue and controller model, for each T of this
    /// list; `auto`: 1 and this machine's parallelism (at most 8);
    /// `none`: not.
    #[arg(long, default_value = "auto", value_name = "LIST")]
    host_threads: String,
    /// Do not boot: make the table and results.json from the console of
    /// a kernel that ran the benchmark elsewhere (a server booted with
    /// `bench.*` arguments; its JSON lines), e.g. a saved serial log.
    #[arg(long, value_name = "FILE")]
    from_log: Option<PathBuf>,
    /// How the kernel boots: pvh, bios or uefi.
    #[arg(long, default_value = "pvh", value_parser = parse_boot)]
    boot: Boot,
    #[command(flatten)]
    sweep: SweepArgs,
}

/// `dioxide bench nbd`.
#[derive(clap::Args)]
struct NbdArgs {
    /// Benchmark an appliance already running elsewhere, at
    /// nbd://HOST[:PORT] (port 10809 by default), instead of booting one:
    /// its file, raw and null exports, picked from its export list.
    #[arg(long, value_name = "URI")]
    remote: Option<String>,
    /// With --remote: another NBD server to run the same rows against, as
    /// an NBD URI with its export (e.g. nbd://10.0.0.5:10809/disk, a
    /// qemu-nbd or nbd-server on that network); repeatable.
    #[arg(long = "peer", value_name = "URI", requires = "remote")]
    peers: Vec<String>,
    /// Queue depths.
    #[arg(long, default_value = "1,16,64,128")]
    qd: String,
    /// fio jobs (each with its own connection).
    #[arg(long, default_value_t = 1)]
    jobs: usize,
    /// Seconds per row.
    #[arg(long, default_value_t = 5)]
    secs: u64,
    /// Output directory (results.json, plot.svg).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Network modes, comma-separated: user, tap (tap needs root).
    #[arg(long, default_value = "user", conflicts_with = "remote")]
    net: String,
    /// The guest's NICs, comma-separated, one boot each: virtio
    /// (virtio-net, one queue, the boot core's stack), igb (Intel 82576:
    /// a queue pair and network stack per guest CPU, RSS).
    #[arg(
        long,
        value_name = "LIST",
        default_value = "virtio",
        conflicts_with = "remote"
    )]
    nic: String,
    /// virtio-net offload sets to compare, comma-separated, one boot
    /// each: `default`, `none`, `all`, or names joined with + (csum,
    /// guest_csum, mrg_rxbuf, tso), e.g. `none,csum+mrg_rxbuf`. igb
    /// boots once, with its driver's offloads (csum, tso, rx csum).
    #[arg(long, value_name = "LIST", conflicts_with = "remote")]
    offload: Option<String>,
    /// NIC MTUs to compare, comma-separated, one boot each (e.g.
    /// 1500,9000; see `dioxide run --mtu`). igb runs at 1500 only:
    /// another MTU with --nic igb is refused.
    #[arg(long, value_name = "LIST", conflicts_with = "remote")]
    mtu: Option<String>,
    /// Targets, comma-separated: file, raw, null, qemu-nbd, linux (a Linux
    /// guest under the same QEMU running qemu-nbd on its emulated NVMe
    /// namespace; user networking only) (default: file, raw, null,
    /// qemu-nbd; with --remote: file, raw, null).
    #[arg(long)]
    targets: Option<String>,
    /// What fio does: read, write (4K random writes; see README). With
    /// --remote: read only (writes would overwrite the server's data).
    #[arg(long)]
    op: Option<String>,
    /// Size of the benchmark file (default 1G).
    #[arg(long, default_value = "1G", value_parser = dioxide::fstool::parse_size, conflicts_with = "remote")]
    file_size: u64,
    #[arg(long, value_enum, default_value_t = AccelArg::Auto, conflicts_with = "remote")]
    accel: AccelArg,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 512, conflicts_with = "remote")]
    mem: u32,
    /// NVMe completion mode of the appliance: poll or irq.
    #[arg(long, default_value = "poll", conflicts_with = "remote")]
    completion: String,
    /// Rounds per row: the targets take turns, each for secs/rounds.
    #[arg(long, default_value_t = 2)]
    rounds: u64,
    /// Reads per row of the host benchmark of the whole NBD request
    /// path (TCP/IP, NBD, DIO, dxfs on the host's CPU; `host_rows` in
    /// results.json); 0 skips it. Default 100000, and 0 with --remote
    /// (it measures this machine's CPU, not the appliance's).
    #[arg(long)]
    host_ios: Option<u64>,
    /// How the kernel boots: pvh, bios or uefi.
    #[arg(long, default_value = "pvh", value_parser = parse_boot, conflicts_with = "remote")]
    boot: Boot,
    #[command(flatten)]
    sweep: SweepArgs,
}

/// The configurations a benchmark sweeps: one boot per combination.
#[derive(clap::Args)]
struct SweepArgs {
    /// Guest CPUs, comma-separated (e.g. 1,2,4): QEMU -smp N and kernel
    /// argument smp=N (default: one CPU, no argument).
    #[arg(long, value_name = "LIST")]
    smp: Option<String>,
    /// Shadow doorbells, comma-separated 0 and/or 1: kernel argument
    /// nvme.dbbuf=V (default: not given, the kernel's default).
    #[arg(long, value_name = "LIST")]
    dbbuf: Option<String>,
    /// QEMU ioeventfd on the NVMe controller, comma-separated 0 and/or 1
    /// (default: off).
    #[arg(long, value_name = "LIST")]
    ioeventfd: Option<String>,
}

impl SweepArgs {
    fn parse(&self) -> Result<dioxide::bench::Sweep, Error> {
        dioxide::bench::Sweep::parse(
            self.smp.as_deref(),
            self.dbbuf.as_deref(),
            self.ioeventfd.as_deref(),
        )
    }
}

/// A `--host-threads` value as dioxide-hostbench's `--threads` takes it:
/// `auto`, or thread counts from 1 to 64; empty for `none`.
fn host_threads_list(t: &str) -> Result<String, Error> {
    if t == "auto" || t == "none" {
        return Ok(if t == "auto" { t.into() } else { String::new() });
    }
    let list = dioxide::bench::parse_list(t);
    if list.is_empty()
        || !list
            .iter()
            .all(|x| x.parse::<usize>().is_ok_and(|n| (1..=64).contains(&n)))
    {
        return Err(Error::Usage(format!(
            "--host-threads {t}: thread counts from 1 to 64, auto or none"
        )));
    }
    Ok(list.join(","))
}

fn parse_boot(s: &str) -> Result<Boot, String> {
    Boot::parse(s).map_err(|e| e.to_string())
}

/// A `--qd` list: queue depths from 1 to 1024.
fn parse_qds(qd: &str) -> Result<Vec<usize>, Error> {
    let qds: Vec<usize> = dioxide::bench::parse_list(qd)
        .iter()
        .filter_map(|q| q.parse().ok())
        .collect();
    if qds.is_empty() || qds.iter().any(|&q| q == 0 || q > 1024) {
        return Err(Error::Usage(format!(
            "--qd {qd}: queue depths from 1 to 1024"
        )));
    }
    Ok(qds)
}

/// Checks the benchmark file size and resolves the accelerator.
fn bench_setup(file_size: u64, accel: AccelArg) -> Result<Accel, Error> {
    if file_size < 1 << 20 {
        return Err(Error::Usage("--file-size: at least 1M".into()));
    }
    resolve_accel(accel)
}

/// The accelerator to use (`auto` measures, once per machine).
fn resolve_accel(a: AccelArg) -> Result<Accel, Error> {
    Ok(match a {
        AccelArg::Kvm => Accel::Kvm,
        AccelArg::Tcg => Accel::Tcg,
        AccelArg::Auto => {
            let k = kernel::build()?;
            let c = accel::auto(&k);
            eprintln!("dioxide: accelerator {} ({})", c.accel.name(), c.reason);
            c.accel
        }
    })
}

fn parse_lbs(s: &str) -> Result<u32, String> {
    match s {
        "512" => Ok(512),
        "4096" => Ok(4096),
        _ => Err(format!("{s}: the logical block size must be 512 or 4096")),
    }
}

fn main() {
    let cli = Cli::parse();
    let code = match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("dioxide: {e}");
            e.exit_code()
        }
    };
    std::process::exit(code);
}

fn run(cli: Cli) -> Result<i32, Error> {
    match cli.cmd {
        Cmd::Mkfs {
            img,
            from,
            volume,
            size,
            block_size,
            label,
        } => dioxide::fstool::mkfs_with(&img, from.as_deref(), &volume, size, block_size, &label),
        Cmd::Fsck { img, repair } => dioxide::fstool::fsck(&img, repair),
        Cmd::Bench {
            which: BenchCmd::Local(a),
        } => bench_local(a),
        Cmd::Bench {
            which: BenchCmd::Nbd(a),
        } => bench_nbd(a),
        Cmd::Bench {
            which: BenchCmd::Boot { boot, runs, accel },
        } => {
            let boots = dioxide::bench::parse_list(&boot)
                .iter()
                .map(|b| Boot::parse(b))
                .collect::<Result<Vec<_>, _>>()?;
            if boots.is_empty() || !(1..=20).contains(&runs) {
                return Err(Error::Usage(
                    "bench boot: at least one --boot method, --runs from 1 to 20".into(),
                ));
            }
            let accel = resolve_accel(accel)?;
            dioxide::boottime::run(&boots, runs, accel)
        }
        Cmd::Image {
            out,
            cmdline,
            menu_timeout,
            kernel,
        } => make_image(out, cmdline, menu_timeout, kernel),
        Cmd::Ls { img, path } => dioxide::fstool::ls(&img, &path),
        Cmd::Cat { img, path } => dioxide::fstool::cat(&img, &path),
        Cmd::BuildKernel => {
            println!("{}", kernel::build()?.display());
            Ok(0)
        }
        Cmd::Run(a) => run_guest(a),
    }
}

/// `dioxide bench local`.
fn bench_local(a: LocalArgs) -> Result<i32, Error> {
    let LocalArgs {
        qd,
        dev,
        completion,
        op,
        secs,
        out,
        file_size,
        accel,
        mem,
        host_ios,
        host_threads,
        from_log,
        boot,
        sweep,
    } = a;
    let qds = parse_qds(&qd)?;
    let sweep = sweep.parse()?;
    let host_threads = host_threads_list(&host_threads)?;
    let devs = dioxide::bench::parse_list(&dev);
    let completions = dioxide::bench::parse_list(&completion);
    let ops = dioxide::bench::parse_list(&op);
    if ops.is_empty()
        || ops
            .iter()
            .any(|o| !dioxide::bench::OPS.contains(&o.as_str()))
    {
        return Err(Error::Usage(format!(
            "--op {op}: read, write and/or write-fua"
        )));
    }
    if devs.iter().any(|d| d != "nvme" && d != "null") {
        return Err(Error::Usage(format!("--dev {dev}: nvme and/or null")));
    }
    if completions.iter().any(|c| c != "poll" && c != "irq") {
        return Err(Error::Usage(format!(
            "--completion {completion}: poll and/or irq"
        )));
    }
    let accel = if from_log.is_some() {
        Accel::Tcg // not used: nothing boots
    } else {
        bench_setup(file_size, accel)?
    };
    let opts = dioxide::bench::LocalOpts {
        qds,
        devs,
        completions,
        ops,
        secs: secs.max(1),
        out: out.unwrap_or_else(dioxide::bench::default_out),
        file_size,
        accel,
        mem,
        host_ios,
        host_threads,
        from_log,
        boot,
        sweep,
    };
    dioxide::bench::local(&opts)
}

/// `dioxide bench nbd`.
fn bench_nbd(a: NbdArgs) -> Result<i32, Error> {
    if a.remote.is_some() {
        return bench_nbd_remote(a);
    }
    let NbdArgs {
        remote: _,
        peers: _,
        qd,
        jobs,
        secs,
        out,
        net,
        nic,
        offload,
        mtu,
        targets,
        op,
        file_size,
        accel,
        mem,
        completion,
        rounds,
        host_ios,
        boot,
        sweep,
    } = a;
    let ops = dioxide::bench::parse_list(op.as_deref().unwrap_or("read,write"));
    if ops.is_empty() || ops.iter().any(|o| o != "read" && o != "write") {
        return Err(Error::Usage(format!(
            "--op {}: read and/or write",
            op.unwrap_or_default()
        )));
    }
    let offloads = match &offload {
        Some(l) => dioxide::offload::Offloads::parse_list(l)?,
        None => vec![dioxide::offload::Offloads(None)],
    };
    let mtus: Vec<Option<u16>> = match &mtu {
        Some(l) => dioxide::offload::parse_mtus(l)?
            .into_iter()
            .map(Some)
            .collect(),
        None => vec![None],
    };
    let nics = dioxide::nbdbench::parse_nics(&nic)?;
    dioxide::nbdbench::check_nics(&nics, &mtus)?;
    let targets =
        dioxide::nbdbench::parse_targets(targets.as_deref().unwrap_or("file,raw,null,qemu-nbd"))?;
    let qds = parse_qds(&qd)?;
    let sweep = sweep.parse()?;
    if jobs == 0 || jobs > 8 {
        return Err(Error::Usage(format!("--jobs {jobs}: from 1 to 8")));
    }
    let nets = dioxide::bench::parse_list(&net)
        .iter()
        .map(|n| NetMode::parse(n))
        .collect::<Result<Vec<_>, _>>()?;
    if completion != "poll" && completion != "irq" {
        return Err(Error::Usage(format!(
            "--completion {completion}: poll or irq"
        )));
    }
    let accel = bench_setup(file_size, accel)?;
    let opts = dioxide::nbdbench::NbdOpts {
        qds,
        jobs,
        secs: secs.max(1),
        out: out.unwrap_or_else(|| {
            dioxide::workspace_root()
                .join("target")
                .join("dioxide")
                .join("bench-nbd")
        }),
        file_size,
        accel,
        mem,
        nets,
        nics,
        offloads,
        mtus,
        targets,
        ops,
        completion,
        rounds: rounds.clamp(1, secs.max(1)),
        boot,
        sweep,
        host_ios: host_ios.unwrap_or(100_000),
    };
    dioxide::nbdbench::nbd(&opts)
}

/// `dioxide bench nbd --remote URI`: the same rows against an appliance
/// running elsewhere (and `--peer` servers); nothing is booted, so the
/// options that shape a boot are refused (clap refuses the others).
fn bench_nbd_remote(a: NbdArgs) -> Result<i32, Error> {
    for (given, name) in [
        (a.sweep.smp.is_some(), "--smp"),
        (a.sweep.dbbuf.is_some(), "--dbbuf"),
        (a.sweep.ioeventfd.is_some(), "--ioeventfd"),
    ] {
        if given {
            return Err(Error::Usage(format!(
                "{name} configures a boot: with --remote nothing is booted"
            )));
        }
    }
    let targets =
        dioxide::nbdbench::parse_targets(a.targets.as_deref().unwrap_or("file,raw,null"))?;
    if targets.contains(&"qemu-nbd") {
        return Err(Error::Usage(
            "--targets qemu-nbd: with --remote there is no local image to serve; name another server with --peer URI".into(),
        ));
    }
    if targets.contains(&"linux") {
        return Err(Error::Usage(
            "--targets linux: with --remote nothing is booted; name another server with --peer URI"
                .into(),
        ));
    }
    if a.jobs == 0 || a.jobs > 8 {
        return Err(Error::Usage(format!("--jobs {}: from 1 to 8", a.jobs)));
    }
    if a.op.as_deref().is_some_and(|o| o != "read") {
        return Err(Error::Usage(
            "--op: only read with --remote (writes would overwrite the server's data)".into(),
        ));
    }
    let secs = a.secs.max(1);
    let opts = dioxide::remotebench::RemoteOpts {
        remote: a.remote.unwrap_or_default(),
        peers: a.peers,
        qds: parse_qds(&a.qd)?,
        jobs: a.jobs,
        secs,
        rounds: a.rounds.clamp(1, secs),
        targets,
        out: a.out.unwrap_or_else(|| {
            dioxide::workspace_root()
                .join("target")
                .join("dioxide")
                .join("bench-nbd-remote")
        }),
        host_ios: a.host_ios.unwrap_or(0),
    };
    dioxide::remotebench::remote(&opts)
}

/// `dioxide run`: checks the options, builds what is missing, boots the
/// guest and reports its outcome.
fn run_guest(a: RunArgs) -> Result<i32, Error> {
    let t0 = Instant::now();
    check_iso(&a)?;
    let net = NetMode::parse(&a.net)?;
    // Ctrl-C reaches QEMU too (same process group), which exits; this
    // process stays to report and clean up (the tap device).
    // SAFETY: setting a signal disposition; no handler runs.
    unsafe { libc::signal(libc::SIGINT, libc::SIG_IGN) };
    let mut nvme = guest_disks(&a)?;
    // Sizes, checked before anything is built.
    let mut sizes = Vec::new();
    for ns in nvme.iter().flat_map(|c| c.namespaces.iter()) {
        sizes.push(image::check(&ns.image, ns.lbs)?);
    }
    let size = sizes[0];
    if a.mem < 64 {
        return Err(Error::Usage(format!(
            "--mem {}: the kernel needs at least 64 MiB",
            a.mem
        )));
    }
    if let Some(s) = a.inject_eio.iter().find(|&&s| s >= size / 512) {
        return Err(Error::Usage(format!(
            "--inject-eio {s}: beyond the image ({} sectors)",
            size / 512
        )));
    }
    let kernel = match &a.kernel {
        Some(k) => k.clone(),
        None => {
            eprintln!("dioxide: building the kernel (release)");
            kernel::build()?
        }
    };
    let accel = match a.accel {
        AccelArg::Kvm => Accel::Kvm,
        AccelArg::Tcg => Accel::Tcg,
        AccelArg::Auto => {
            let c = accel::auto(&kernel);
            eprintln!("dioxide: accelerator {} ({})", c.accel.name(), c.reason);
            c.accel
        }
    };
    let mut cfg = qemu::Config::new(kernel);
    cfg.mem_mib = a.mem;
    cfg.smp = a.smp;
    cfg.accel = accel;
    cfg.args = guest_kernel_args(&a);
    cfg.timeout = a.timeout.map(Duration::from_secs);
    cfg.echo = true;
    cfg.boot = a.boot;
    cfg.iso = a.iso.clone();
    cfg.machine = a.machine.clone();
    if matches!(cfg.boot, qemu::Boot::Bios | qemu::Boot::Uefi) && cfg.iso.is_none() {
        let altered = iso::altered_words(&cfg.args);
        if !altered.is_empty() {
            eprintln!(
                "dioxide: warning: GRUB puts a backslash before each \\, ' and \" and double-quotes words with spaces: {altered:?} do not reach the kernel as written"
            );
        }
    }
    nvme[0].namespaces[0].inject_eio = a.inject_eio.clone();
    cfg.nvme = nvme;
    cfg.nvme_ioeventfd = a.nvme_ioeventfd;
    cfg.net_mtu = a.mtu;
    cfg.nic = a.nic;
    let tap = guest_network(net, a.nbd_port, a.mtu, &mut cfg)?;
    writable_from(&a, tap.as_ref(), &mut cfg.args);
    announce_boot(&cfg, &sizes, accel);
    boot_and_report(&cfg, tap.as_ref(), t0)
}

/// `--nic NAME`.
fn parse_nic(s: &str) -> Result<dioxide::qemu::Nic, String> {
    dioxide::qemu::Nic::parse(s).ok_or_else(|| {
        format!(
            "unknown NIC {s:?}: expected one of {}",
            dioxide::qemu::Nic::NAMES.join(", ")
        )
    })
}

/// `--iso` boots through the firmware, with the ISO's own kernel
/// arguments.
fn check_iso(a: &RunArgs) -> Result<(), Error> {
    let Some(iso) = &a.iso else {
        return Ok(());
    };
    if a.boot == Boot::Pvh {
        return Err(Error::Usage(format!(
            "--iso {}: boots with --boot bios or --boot uefi",
            iso.display()
        )));
    }
    if a.selftest.is_some()
        || a.completion.is_some()
        || a.log.is_some()
        || !a.kernel_args.is_empty()
    {
        return Err(Error::Usage(format!(
            "--iso {}: the kernel arguments are the ISO's (its grub.cfg); --selftest, --completion, --log and -- ARGS cannot be added (make the ISO with dioxide image --cmdline)",
            iso.display()
        )));
    }
    if !iso.is_file() {
        return Err(Error::Usage(format!("--iso {}: not a file", iso.display())));
    }
    Ok(())
}

/// The guest's NVMe controllers: the `--disk`s, else an image built from
/// `--from`, else the built-in sample tree.
fn guest_disks(a: &RunArgs) -> Result<Vec<qemu::NvmeController>, Error> {
    if !a.disk.is_empty() {
        return qemu::parse_disks(&a.disk, a.nvme_lbs);
    }
    let image = match &a.from {
        Some(dir) => {
            if !dir.is_dir() {
                return Err(Error::Usage(format!(
                    "--from {}: not a directory",
                    dir.display()
                )));
            }
            let out = dioxide::workspace_root().join("target").join("dioxide");
            std::fs::create_dir_all(&out)
                .map_err(dioxide::io_err(format!("create {}", out.display())))?;
            let img = out.join("run-from.img");
            eprintln!("dioxide: building {} from {}", img.display(), dir.display());
            dioxide::fstool::mkfs(&img, dir, None, 4096, "")?;
            img
        }
        None => {
            let p = image::sample()?;
            eprintln!(
                "dioxide: no --disk or --from given; serving the built-in sample tree {}",
                p.display()
            );
            p
        }
    };
    let mut ns = qemu::Namespace::new(image);
    ns.lbs = a.nvme_lbs;
    Ok(vec![qemu::NvmeController {
        namespaces: vec![ns],
    }])
}

/// The kernel arguments the options ask for, then those after `--`.
fn guest_kernel_args(a: &RunArgs) -> Vec<String> {
    let mut args = Vec::new();
    if let Some(s) = &a.selftest {
        args.push(format!("selftest={s}"));
    }
    if let Some(c) = a.completion {
        args.push(format!(
            "nvme.completion={}",
            match c {
                Completion::Poll => "poll",
                Completion::Irq => "irq",
            }
        ));
    }
    if let Some(l) = &a.log {
        args.push(format!("log={l}"));
    }
    if let Some(o) = &a.offload {
        args.extend(o.kernel_args());
    }
    if a.writable {
        args.push("nbd.rw=all".into());
        // The host's address under user networking; a tap's replaces it
        // (`writable_from`).
        args.push(format!("nbd.rw_from={}/32", qemu::USER_NET_HOST));
    }
    args.extend(a.kernel_args.iter().cloned());
    args
}

/// With `--writable --net tap`: writes from the tap's host address (put
/// before the user's own arguments, which win).
fn writable_from(a: &RunArgs, tap: Option<&dioxide::tap::Tap>, args: &mut Vec<String>) {
    if let (true, Some(t)) = (a.writable, tap) {
        let user = format!("nbd.rw_from={}/32", qemu::USER_NET_HOST);
        args.retain(|w| *w != user);
        args.insert(0, format!("nbd.rw_from={}/32", t.host));
    }
}

/// User networking with the NBD port forwarded (checked free now: the
/// forward is added once the guest listens), or a tap device.
fn guest_network(
    net: NetMode,
    nbd_port: u16,
    mtu: Option<u16>,
    cfg: &mut qemu::Config,
) -> Result<Option<dioxide::tap::Tap>, Error> {
    match net {
        NetMode::User => {
            if let Err(e) = std::net::TcpListener::bind(("127.0.0.1", nbd_port)) {
                return Err(Error::Usage(format!(
                    "--nbd-port {nbd_port}: cannot listen on 127.0.0.1:{nbd_port}: {e}"
                )));
            }
            cfg.nbd_port = Some(nbd_port);
            Ok(None)
        }
        NetMode::Tap => {
            cfg.net_queues = cfg.tap_queues();
            let tap = dioxide::tap::Tap::with_queues(cfg.net_queues)?;
            if let Some(m) = mtu {
                tap.set_mtu(m)?;
            }
            cfg.netdev = Some(tap.netdev());
            cfg.args.extend(tap.guest_args());
            eprintln!("dioxide: tap {} (host {})", tap.ifname, tap.host);
            Ok(Some(tap))
        }
    }
}

/// The line that says what boots: disks, accelerator, boot method and
/// kernel arguments.
fn announce_boot(cfg: &qemu::Config, sizes: &[u64], accel: Accel) {
    let disks: Vec<String> = cfg
        .namespaces()
        .zip(sizes)
        .map(|((name, ns), size)| {
            format!(
                "{name} {} ({} MiB, {}-byte blocks{}, aio={})",
                ns.image.display(),
                size >> 20,
                ns.lbs,
                if ns.ms > 0 {
                    format!(" + {} metadata bytes", ns.ms)
                } else {
                    String::new()
                },
                qemu::drive_aio(&ns.image)
            )
        })
        .collect();
    eprintln!(
        "dioxide: booting with {}{}, accel {}, boot {}; kernel args {:?}",
        disks.join(", "),
        if cfg.nvme_ioeventfd {
            ", NVMe ioeventfd on"
        } else {
            ""
        },
        accel.name(),
        cfg.boot.name(),
        match &cfg.iso {
            Some(iso) => format!("those of {}", iso.display()),
            None => cfg.kernel_args().join(" "),
        }
    );
}

/// Boots the guest, announces the exports once they are reachable (not
/// for a self-test, which powers off without serving), waits for the end
/// and reports it; the guest's status.
fn boot_and_report(
    cfg: &qemu::Config,
    tap: Option<&dioxide::tap::Tap>,
    t0: Instant,
) -> Result<i32, Error> {
    let boot = Instant::now();
    let guest = qemu::Guest::spawn(cfg)?;
    if let qemu::NbdReady::Listening(addr) = guest.wait_nbd(cfg.timeout.unwrap_or(Duration::MAX))? {
        let at = match (addr, tap) {
            (Some(a), _) => a.to_string(),
            (None, Some(t)) => format!("{}:{}", t.guest, qemu::GUEST_NBD_PORT),
            (None, None) => String::new(),
        };
        if !at.is_empty() {
            eprintln!(
                "dioxide: NBD exports at nbd://{at}/<path>, {} ms after boot start (try: nbdinfo --list nbd://{at})",
                boot.elapsed().as_millis()
            );
        }
    }
    let outcome = guest.wait()?;
    eprintln!(
        "dioxide: guest status {}; first kernel line {} ms after boot start, power-off after {} ms ({} ms including build and checks)",
        outcome.status,
        outcome.first_line.map_or("-".to_string(), |d| d.as_millis().to_string()),
        outcome.elapsed.as_millis(),
        boot.duration_since(t0).as_millis() + outcome.elapsed.as_millis()
    );
    Ok(outcome.status as i32)
}
