//! `dioxide`: run the appliance in QEMU.
//!
//! ```text
//! dioxide run [--disk IMG] [--nvme-lbs 512|4096] [--mem MIB] [--smp N]
//!             [--accel auto|kvm|tcg] [--timeout SECS] [--selftest NAME]
//!             [--completion poll|irq] [--log LEVEL] [-- KERNEL-ARGS...]
//! dioxide build-kernel
//! dioxide mkfs IMG --from DIR [--size SIZE] [--block-size B] [--label L]
//! dioxide fsck IMG
//! dioxide ls IMG [PATH]
//! dioxide cat IMG PATH
//! dioxide bench local [--qd 1,16,64,128,256] [--dev nvme,null] [--completion poll,irq]
//!                     [--secs N] [--out DIR] [--file-size 1G]
//! ```
//!
//! Exit status: the guest's (0 success, 1 self-test failed, 2 bad arguments or
//! missing hardware, 3 device error, 4 CPU exception, 5 kernel panic); 2 for
//! bad input on the host side, 124 on timeout, 125 when QEMU or the build
//! fails.

use clap::{Parser, Subcommand, ValueEnum};
use dioxide::accel::{self, Accel};
use dioxide::{image, kernel, qemu, Error};
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
    Run {
        /// Raw disk image backing the NVMe namespace (default: a 64 MiB sample
        /// image made under target/dioxide/).
        #[arg(long)]
        disk: Option<PathBuf>,
        /// Logical block size of the namespace.
        #[arg(long, default_value_t = 512, value_parser = parse_lbs)]
        nvme_lbs: u32,
        /// Guest memory in MiB.
        #[arg(long, default_value_t = 512)]
        mem: u32,
        /// Guest CPUs.
        #[arg(long, default_value_t = 1)]
        smp: u32,
        /// Accelerator; `auto` uses KVM only where it measures fast.
        #[arg(long, value_enum, default_value_t = AccelArg::Auto)]
        accel: AccelArg,
        /// Kill QEMU and fail after this many seconds.
        #[arg(long)]
        timeout: Option<u64>,
        /// Run a kernel self-test and exit: digest, rw, fault, calibrate.
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
        /// Host port (127.0.0.1) forwarded to the appliance's NBD server.
        #[arg(long, default_value_t = 10809)]
        nbd_port: u16,
        /// More kernel arguments (key=value).
        #[arg(last = true)]
        kernel_args: Vec<String>,
    },
    /// Build the kernel and print the path of its ELF.
    BuildKernel,
    /// Make a dxfs image from a directory tree (like `mke2fs -d`).
    Mkfs {
        /// The image file to write.
        img: PathBuf,
        /// The directory whose contents become the filesystem.
        #[arg(long)]
        from: PathBuf,
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
    Fsck { img: PathBuf },
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
    Local {
        /// Queue depths.
        #[arg(long, default_value = "1,16,64,128,256")]
        qd: String,
        /// Devices: nvme, null.
        #[arg(long, default_value = "nvme,null")]
        dev: String,
        /// Completion modes: poll, irq.
        #[arg(long, default_value = "poll")]
        completion: String,
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
    },
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
            size,
            block_size,
            label,
        } => dioxide::fstool::mkfs(&img, &from, size, block_size, &label),
        Cmd::Fsck { img } => dioxide::fstool::fsck(&img),
        Cmd::Bench {
            which:
                BenchCmd::Local {
                    qd,
                    dev,
                    completion,
                    secs,
                    out,
                    file_size,
                    accel,
                    mem,
                    host_ios,
                },
        } => {
            let qds: Vec<usize> = dioxide::bench::parse_list(&qd)
                .iter()
                .filter_map(|q| q.parse().ok())
                .collect();
            let devs = dioxide::bench::parse_list(&dev);
            let completions = dioxide::bench::parse_list(&completion);
            if qds.is_empty() || qds.iter().any(|&q| q == 0 || q > 1024) {
                return Err(Error::Usage(format!(
                    "--qd {qd}: queue depths from 1 to 1024"
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
            if file_size < 1 << 20 {
                return Err(Error::Usage("--file-size: at least 1M".into()));
            }
            let accel = match accel {
                AccelArg::Kvm => Accel::Kvm,
                AccelArg::Tcg => Accel::Tcg,
                AccelArg::Auto => {
                    let k = kernel::build()?;
                    let c = accel::auto(&k);
                    eprintln!("dioxide: accelerator {} ({})", c.accel.name(), c.reason);
                    c.accel
                }
            };
            let opts = dioxide::bench::LocalOpts {
                qds,
                devs,
                completions,
                secs: secs.max(1),
                out: out.unwrap_or_else(dioxide::bench::default_out),
                file_size,
                accel,
                mem,
                host_ios,
            };
            dioxide::bench::local(&opts)
        }
        Cmd::Ls { img, path } => dioxide::fstool::ls(&img, &path),
        Cmd::Cat { img, path } => dioxide::fstool::cat(&img, &path),
        Cmd::BuildKernel => {
            println!("{}", kernel::build()?.display());
            Ok(0)
        }
        Cmd::Run {
            disk,
            nvme_lbs,
            mem,
            smp,
            accel,
            timeout,
            selftest,
            completion,
            log,
            kernel: kernel_path,
            nbd_port,
            kernel_args,
        } => {
            let t0 = Instant::now();
            let disk = match disk {
                Some(d) => d,
                None => {
                    let p = image::sample()?;
                    eprintln!(
                        "dioxide: no --disk given; using the sample image {}",
                        p.display()
                    );
                    p
                }
            };
            let size = image::check(&disk, nvme_lbs)?;
            if mem < 64 {
                return Err(Error::Usage(format!(
                    "--mem {mem}: the kernel needs at least 64 MiB"
                )));
            }
            let kernel = match kernel_path {
                Some(k) => k,
                None => {
                    eprintln!("dioxide: building the kernel (release)");
                    kernel::build()?
                }
            };
            let accel = match accel {
                AccelArg::Kvm => Accel::Kvm,
                AccelArg::Tcg => Accel::Tcg,
                AccelArg::Auto => {
                    let c = accel::auto(&kernel);
                    eprintln!("dioxide: accelerator {} ({})", c.accel.name(), c.reason);
                    c.accel
                }
            };
            let mut args = Vec::new();
            if let Some(s) = selftest {
                args.push(format!("selftest={s}"));
            }
            if let Some(c) = completion {
                args.push(format!(
                    "nvme.completion={}",
                    match c {
                        Completion::Poll => "poll",
                        Completion::Irq => "irq",
                    }
                ));
            }
            if let Some(l) = log {
                args.push(format!("log={l}"));
            }
            args.extend(kernel_args);
            let mut cfg = qemu::Config::new(kernel);
            cfg.disk = Some(disk.clone());
            cfg.nvme_lbs = nvme_lbs;
            cfg.mem_mib = mem;
            cfg.smp = smp;
            cfg.accel = accel;
            cfg.args = args;
            cfg.timeout = timeout.map(Duration::from_secs);
            cfg.echo = true;
            cfg.nbd_port = Some(nbd_port);
            eprintln!("dioxide: NBD exports at nbd://127.0.0.1:{nbd_port}/<path> (try: nbdinfo --list nbd://127.0.0.1:{nbd_port})");
            eprintln!(
                "dioxide: booting with {} ({} MiB, {}-byte blocks), accel {}; kernel args {:?}",
                disk.display(),
                size >> 20,
                nvme_lbs,
                accel.name(),
                cfg.args.join(" ")
            );
            let boot = Instant::now();
            let outcome = qemu::run(&cfg)?;
            eprintln!(
                "dioxide: guest status {}; first kernel line {} ms after boot start, power-off after {} ms ({} ms including build and checks)",
                outcome.status,
                outcome.first_line.map_or("-".to_string(), |d| d.as_millis().to_string()),
                outcome.elapsed.as_millis(),
                boot.duration_since(t0).as_millis() + outcome.elapsed.as_millis()
            );
            let _ = boot;
            Ok(outcome.status as i32)
        }
    }
}
