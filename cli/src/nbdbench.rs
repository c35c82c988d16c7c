//! `dioxide bench nbd`: fio's `nbd` engine, 4K random reads at each queue
//! depth, against the appliance's file export (`bench.bin`, read through
//! the DIO layer), its raw export (`nvme0n1`), its `null` export (zeros
//! without device I/O: the network path alone), and, in the same run,
//! `qemu-nbd` serving the same image file on the host (no virtualization:
//! the ceiling).
//!
//! Per network mode (`--net user`, `--net tap`) the appliance boots once; at
//! each queue depth the targets take turns for `--rounds` rounds (IOPS and
//! latency percentiles are the mean over rounds), and while qemu-nbd runs
//! the guest is paused (SIGSTOP: under TCG its busy-polling vCPU would otherwise
//! take a host core from qemu-nbd and fio) and qemu-nbd runs. Each row also
//! records the server process's host CPU time per I/O (`/proc/PID/stat`).

use crate::accel::Accel;
use crate::bench::{config_title, fmt_iops, plot_panels, Row};
use crate::qemu::{Config, Guest, NbdReady, GUEST_NBD_PORT};
use crate::tap::Tap;
use crate::{io_err, kernel, Error};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NetMode {
    /// QEMU user networking with a forwarded port (works anywhere).
    User,
    /// A host tap device (needs root).
    Tap,
}

impl NetMode {
    pub fn name(self) -> &'static str {
        match self {
            NetMode::User => "user",
            NetMode::Tap => "tap",
        }
    }
    pub fn parse(s: &str) -> Result<NetMode, Error> {
        match s {
            "user" => Ok(NetMode::User),
            "tap" => Ok(NetMode::Tap),
            _ => Err(Error::Usage(format!("--net {s}: expected user or tap"))),
        }
    }
}

pub struct NbdOpts {
    pub qds: Vec<usize>,
    pub jobs: usize,
    pub secs: u64,
    pub out: PathBuf,
    pub file_size: u64,
    pub accel: Accel,
    pub mem: u32,
    pub nets: Vec<NetMode>,
    /// One boot per virtio-net offload set and MTU (`None`: no `host_mtu=`).
    pub offloads: Vec<crate::offload::Offloads>,
    pub mtus: Vec<Option<u16>>,
    /// Of [`TARGETS`]' names.
    pub targets: Vec<&'static str>,
    pub completion: String,
    /// Each row's time is split into this many rounds, the targets taking
    /// turns, so that drift on a shared machine hits them alike.
    pub rounds: u64,
    /// How the kernel boots (PVH, or GRUB under SeaBIOS or OVMF).
    pub boot: crate::qemu::Boot,
    /// One boot per network mode and variant (CPUs, shadow doorbells,
    /// ioeventfd).
    pub sweep: crate::bench::Sweep,
    /// Reads per row of the host benchmark of the whole request path
    /// (`host_rows`); 0 leaves it out.
    pub host_ios: u64,
}

/// The booted appliance (QEMU killed on drop, then its tap device deleted).
pub struct Appliance {
    pub guest: Guest,
    pub url: String,
    /// The TCP port of `url`.
    pub port: u16,
    _tap: Option<Tap>,
}

pub use crate::qemu::free_port;

/// Waits until the console shows every one of `what`.
pub fn wait_console(guest: &Guest, what: &[&str], secs: u64) -> Result<(), Error> {
    let t0 = Instant::now();
    loop {
        let c = guest.console();
        if what.iter().all(|w| c.contains(w)) {
            return Ok(());
        }
        if c.contains("dioxide: power off") || t0.elapsed() > Duration::from_secs(secs) {
            return Err(Error::Usage(format!(
                "the appliance did not come up (waiting for {what:?}):\n{c}"
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Boots the appliance on `img` and returns once its NBD service is
/// reachable from the host (with user networking: once its port forward is
/// open, which happens when the server listens).
pub fn boot(mut cfg: Config, net: NetMode) -> Result<Appliance, Error> {
    let tap = match net {
        NetMode::User => {
            // Any free port, picked when the forward opens.
            cfg.nbd_port = Some(0);
            None
        }
        NetMode::Tap => {
            let tap = Tap::create()?;
            if let Some(m) = cfg.net_mtu {
                tap.set_mtu(m)?;
            }
            cfg.netdev = Some(tap.netdev());
            cfg.args.extend(tap.guest_args());
            Some(tap)
        }
    };
    let guest = Guest::spawn(&cfg)?;
    let (url, port) = match (guest.wait_nbd(Duration::from_secs(120))?, &tap) {
        (NbdReady::Listening(Some(addr)), _) => (format!("nbd://{addr}"), addr.port()),
        (NbdReady::Listening(None), Some(tap)) => (
            format!("nbd://{}:{GUEST_NBD_PORT}", tap.guest),
            GUEST_NBD_PORT,
        ),
        _ => {
            return Err(Error::Usage(format!(
                "the appliance did not come up (no NBD server listening):\n{}",
                guest.console()
            )))
        }
    };
    Ok(Appliance {
        guest,
        url,
        port,
        _tap: tap,
    })
}

/// `qemu-nbd` serving an image read-only on 127.0.0.1 (killed on drop).
pub struct HostNbd {
    child: Child,
    pub url: String,
    /// The cache and AIO options it runs with.
    pub options: String,
}

impl Drop for HostNbd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl HostNbd {
    /// Starts qemu-nbd with the best options this host takes: O_DIRECT with
    /// io_uring, else native AIO, else threads, else the page cache.
    pub fn start(img: &Path, clients: usize) -> Result<HostNbd, Error> {
        let mut last = String::new();
        for opts in [
            ["--cache=none", "--aio=io_uring"],
            ["--cache=none", "--aio=native"],
            ["--cache=none", "--aio=threads"],
            ["--cache=writethrough", "--aio=threads"],
        ] {
            let port = free_port()?;
            let mut cmd = Command::new("qemu-nbd");
            crate::qemu::die_with_parent(&mut cmd);
            let mut child = cmd
                .args([
                    "--read-only",
                    "--persistent",
                    "--format=raw",
                    "--bind=127.0.0.1",
                ])
                .arg(format!("--port={port}"))
                .arg(format!("--shared={}", clients.max(1) + 1))
                .args(opts)
                .arg(img)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .map_err(|source| Error::Spawn {
                    program: "qemu-nbd".into(),
                    hint: "apt-get install qemu-utils",
                    source,
                })?;
            let t0 = Instant::now();
            loop {
                if let Ok(Some(_)) = child.try_wait() {
                    let mut err = String::new();
                    if let Some(mut e) = child.stderr.take() {
                        use std::io::Read;
                        let _ = e.read_to_string(&mut err);
                    }
                    last = format!("{}: {}", opts.join(" "), err.trim());
                    break;
                }
                if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return Ok(HostNbd {
                        child,
                        url: format!("nbd://127.0.0.1:{port}"),
                        options: opts.join(" "),
                    });
                }
                if t0.elapsed() > Duration::from_secs(10) {
                    let _ = child.kill();
                    let _ = child.wait();
                    last = format!("{}: not listening after 10 s", opts.join(" "));
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Err(Error::Usage(format!("qemu-nbd would not start: {last}")))
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

/// What one fio run measured.
#[derive(Clone, Debug)]
pub struct FioResult {
    pub iops: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub mean_us: f64,
    pub ios: u64,
}

/// fio's `--output-format=json` report in its standard output (the nbd
/// engine prints a line before it).
pub fn fio_report(stdout: &str) -> Option<Value> {
    stdout
        .find('{')
        .and_then(|i| serde_json::from_str(&stdout[i..]).ok())
}

/// fio, nbd engine, 4K random reads of the first `size` bytes of `uri`.
pub fn fio(uri: &str, qd: usize, jobs: usize, secs: u64, size: u64) -> Result<FioResult, Error> {
    let out = Command::new("fio")
        .args([
            "--name=bench",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randread",
            "--bs=4k",
            &format!("--iodepth={qd}"),
            &format!("--numjobs={jobs}"),
            "--group_reporting",
            "--time_based",
            &format!("--runtime={secs}"),
            &format!("--size={size}"),
            "--norandommap",
            "--randrepeat=0",
            "--output-format=json",
        ])
        .output()
        .map_err(|source| Error::Spawn {
            program: "fio".into(),
            hint: "apt-get install fio",
            source,
        })?;
    let text = String::from_utf8_lossy(&out.stdout);
    let fail = |why: &str| {
        Error::Usage(format!(
            "fio against {uri} (qd {qd}): {why}\n{}{}",
            text,
            String::from_utf8_lossy(&out.stderr)
        ))
    };
    // fio reports a failed connection (no such export, say) with `error`
    // 0 in its JSON but exits non-zero: both count, and so do zero reads.
    if !out.status.success() {
        return Err(fail(&format!("fio exited with {}", out.status)));
    }
    let json = fio_report(&text).ok_or_else(|| fail("no JSON report"))?;
    let job = &json["jobs"][0];
    if job["error"].as_i64() != Some(0) {
        return Err(fail("the job failed"));
    }
    let r = &job["read"];
    if r["total_ios"].as_u64().unwrap_or(0) == 0 {
        return Err(fail("no reads completed"));
    }
    let pct = |p: &str| r["clat_ns"]["percentile"][p].as_f64().unwrap_or(0.0) / 1000.0;
    Ok(FioResult {
        iops: r["iops"].as_f64().unwrap_or(0.0),
        p50_us: pct("50.000000"),
        p99_us: pct("99.000000"),
        mean_us: r["clat_ns"]["mean"].as_f64().unwrap_or(0.0) / 1000.0,
        ios: r["total_ios"].as_u64().unwrap_or(0),
    })
}

/// The mean of several rounds' results (IOPS and latencies), with their
/// reads added up.
pub fn mean_of(rs: &[FioResult]) -> FioResult {
    let n = rs.len().max(1) as f64;
    let avg = |f: &dyn Fn(&FioResult) -> f64| rs.iter().map(f).sum::<f64>() / n;
    FioResult {
        iops: avg(&|r| r.iops),
        p50_us: avg(&|r| r.p50_us),
        p99_us: avg(&|r| r.p99_us),
        mean_us: avg(&|r| r.mean_us),
        ios: rs.iter().map(|r| r.ios).sum(),
    }
}

/// User plus system CPU time of a process and its threads, seconds.
fn cpu_secs(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command name (which may hold spaces) in parentheses.
    let Some(rest) = stat.rfind(')').map(|i| &stat[i + 2..]) else {
        return 0.0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|x| x.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 of the whole line.
    (ticks(11) + ticks(12)) / 100.0
}

fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill").args([sig, &pid.to_string()]).status();
}

/// The first line `cmd arg` prints (a tool's version), empty when it cannot run.
pub fn version(cmd: &str, arg: &str) -> String {
    Command::new(cmd)
        .arg(arg)
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(str::to_string)
        })
        .unwrap_or_default()
}

/// The targets of a booted appliance: name, plot colour, legend.
pub const TARGETS: [(&str, &str, &str); 4] = [
    ("file", "#1f77b4", "file export"),
    ("raw", "#444444", "raw export"),
    ("null", "#2ca02c", "null export"),
    ("qemu-nbd", "#d62728", "qemu-nbd (host)"),
];

/// `--targets`: names of [`TARGETS`], comma-separated.
pub fn parse_targets(s: &str) -> Result<Vec<&'static str>, Error> {
    let v = crate::bench::parse_list(s)
        .iter()
        .map(|t| {
            TARGETS
                .iter()
                .find(|(n, _, _)| n == t)
                .map(|(n, _, _)| *n)
                .ok_or_else(|| {
                    Error::Usage(format!(
                        "--targets {s}: file, raw, null and/or qemu-nbd, comma-separated"
                    ))
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    if v.is_empty() {
        return Err(Error::Usage(format!("--targets {s}: empty")));
    }
    Ok(v)
}

/// A row's virtio-net configuration for titles: ` offload=csum mtu=9000`,
/// empty where the row has neither.
fn nic_title(r: &Row) -> String {
    let mut s = String::new();
    for k in ["offload", "mtu"] {
        if !r.s(k).is_empty() {
            s += &format!(" {k}={}", r.s(k));
        }
    }
    s
}

/// Frames per request of the guest, sent and received (`-` where the
/// console gave none).
fn frames_cell(r: &Row) -> String {
    if r.s("tx_frames_per_req").is_empty() {
        return "-".into();
    }
    format!("{}/{}", r.s("tx_frames_per_req"), r.s("rx_frames_per_req"))
}

/// The columns of a table section: the appliance's three exports, then
/// `qemu-nbd` (a booted appliance) or the peers `peer1`, `peer2`, ... in
/// order (`--remote`, rows with `net=remote`).
fn columns(section: &[&Row]) -> Vec<String> {
    if !section.iter().any(|r| r.s("net") == "remote") {
        return TARGETS.iter().map(|(t, _, _)| t.to_string()).collect();
    }
    let mut peers: Vec<&str> = section
        .iter()
        .map(|r| r.s("target"))
        .filter(|t| t.starts_with("peer"))
        .collect();
    peers.sort_by_key(|t| t[4..].parse::<usize>().unwrap_or(usize::MAX));
    peers.dedup();
    let mut cols: Vec<String> = TARGETS[..3].iter().map(|(t, _, _)| t.to_string()).collect();
    cols.extend(peers.into_iter().map(String::from));
    cols
}

/// The table: per network mode, and per configuration (CPUs, shadow
/// doorbells, ioeventfd) when the rows hold several, a line per queue
/// depth. The last ratio is the file export against the fourth column
/// (qemu-nbd, or the first peer).
pub fn table(rows: &[Row], jobs: usize, secs: u64) -> String {
    let mut by_net: BTreeMap<String, BTreeMap<usize, BTreeMap<String, &Row>>> = BTreeMap::new();
    let config = config_title(rows);
    let group = |r: &Row| format!("{}{}{}", r.s("net"), nic_title(r), config(r));
    for r in rows {
        by_net
            .entry(group(r))
            .or_default()
            .entry(r.f("qd") as usize)
            .or_default()
            .insert(r.s("target").into(), r);
    }
    let mut s = String::new();
    for (net, by_qd) in by_net {
        let section: Vec<&Row> = rows.iter().filter(|r| group(r) == net).collect();
        let cols = columns(&section);
        let reference = cols.get(3).cloned();
        s += &format!(
            "\nnet={net}: fio --ioengine=nbd, 4K random reads, {jobs} job(s), {secs} s per row; IOPS (p50/p99 latency us)\n"
        );
        s += &format!("{:>4}", "qd");
        for c in &cols {
            s += &format!(" {c:>24}");
        }
        s += &format!(" {:>9}", "file/raw");
        if let Some(r) = &reference {
            s += &format!(" {:>14}", format!("file/{r}"));
        }
        s += "\n";
        for (qd, t) in by_qd {
            let g = |k: &str, f: &str| t.get(k).map(|r| r.f(f)).unwrap_or(0.0);
            let cell = |k: &str| {
                if t.contains_key(k) {
                    format!(
                        "{} ({:.0}/{:.0})",
                        fmt_iops(g(k, "iops")),
                        g(k, "lat_p50_us"),
                        g(k, "lat_p99_us")
                    )
                } else {
                    "-".into()
                }
            };
            let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
            s += &format!("{qd:>4}");
            for c in &cols {
                s += &format!(" {:>24}", cell(c));
            }
            s += &format!(" {:>9.3}", ratio(g("file", "iops"), g("raw", "iops")));
            if let Some(r) = &reference {
                s += &format!(" {:>14.3}", ratio(g("file", "iops"), g(r, "iops")));
            }
            s += "\n";
        }
        // What each column read, where the rows say (`--remote`).
        let uris: Vec<String> = cols
            .iter()
            .filter_map(|c| {
                let r = section.iter().find(|r| r.s("target") == c)?;
                (!r.s("uri").is_empty()).then(|| format!("{c} {}", r.s("uri")))
            })
            .collect();
        if !uris.is_empty() {
            s += &format!("read: {}\n", uris.join(", "));
        }
        let mut cpu: BTreeMap<String, Vec<f64>> = BTreeMap::new();
        for r in section
            .iter()
            .filter(|r| !r.s("server_cpu_us_per_io").is_empty())
        {
            cpu.entry(r.s("target").into())
                .or_default()
                .push(r.f("server_cpu_us_per_io"));
        }
        if !cpu.is_empty() {
            s += "host CPU per I/O (us, server process incl. its vCPU thread): ";
            let parts: Vec<String> = TARGETS
                .iter()
                .filter_map(|(t, _, _)| {
                    let v = cpu.get(*t)?;
                    let list: Vec<String> = v.iter().map(|x| format!("{x:.0}")).collect();
                    Some(format!("{t} {}", list.join("/")))
                })
                .collect();
            s += &parts.join(", ");
            s += " (by qd)\n";
        }
        let frames: Vec<String> = section
            .iter()
            .filter(|r| !r.s("tx_frames_per_req").is_empty())
            .map(|r| format!("{} qd{} {}", r.s("target"), r.s("qd"), frames_cell(r)))
            .collect();
        if !frames.is_empty() {
            s += "guest frames per request (sent/received): ";
            s += &frames.join(", ");
            s += "\n";
        }
    }
    s
}

pub fn nbd(opts: &NbdOpts) -> Result<i32, Error> {
    std::fs::create_dir_all(&opts.out).map_err(io_err(format!("create {}", opts.out.display())))?;
    let fio_version = version("fio", "--version");
    if fio_version.is_empty() {
        return Err(Error::Usage(
            "fio not found: apt-get install fio (./dx installs it)".into(),
        ));
    }
    let img = crate::bench::image(opts.file_size)?;
    eprintln!("dioxide bench: building the kernel (release)");
    let kernel = kernel::build()?;
    let mut rows = Vec::new();
    let mut runs = Vec::new();
    let variants = opts.sweep.variants();
    let mut boots = Vec::new();
    for &net in &opts.nets {
        for &offload in &opts.offloads {
            for &mtu in &opts.mtus {
                for &variant in &variants {
                    boots.push((net, offload, mtu, variant));
                }
            }
        }
    }
    let nic_fields = opts.offloads.len() > 1
        || opts.mtus.len() > 1
        || opts.offloads[0].0.is_some()
        || opts.mtus[0].is_some();
    for (net, offload, mtu, variant) in boots {
        let mut cfg = Config::new(kernel.clone());
        cfg.add_disk(&img);
        cfg.accel = opts.accel;
        cfg.mem_mib = opts.mem;
        cfg.boot = opts.boot;
        cfg.args = vec![
            "log=info".into(),
            "nbd.null=1".into(),
            format!("nvme.completion={}", opts.completion),
        ];
        variant.apply(&mut cfg);
        cfg.args.extend(offload.kernel_args());
        cfg.net_mtu = mtu;
        let mtu_label = mtu.map_or("default".to_string(), |m| m.to_string());
        eprintln!(
            "dioxide bench: booting the appliance (accel {}, boot {}, net {}, offload {}, mtu {}, completion {}, {})",
            opts.accel.name(),
            opts.boot.name(),
            net.name(),
            offload.label(),
            mtu_label,
            opts.completion,
            variant.label()
        );
        let app = boot(cfg, net)?;
        let qemu_pid = app.guest.pid().unwrap_or(0);
        let nic_line = app
            .guest
            .console()
            .lines()
            .find_map(|l| l.find("virtio-net: ").map(|i| l[i..].trim().to_string()))
            .unwrap_or_default();
        eprintln!("dioxide bench: guest: {nic_line}");
        let host = HostNbd::start(&img, opts.jobs)?;
        eprintln!(
            "dioxide bench: appliance at {}, qemu-nbd ({}) at {}",
            app.url, host.options, host.url
        );
        for &qd in &opts.qds {
            // Per target: fio results of each round and the server CPU time.
            let mut acc: BTreeMap<&str, (Vec<FioResult>, f64, f64)> = BTreeMap::new();
            // Per target: requests, frames sent and received (the guest's
            // count after each fio run, when its service goes idle).
            let mut frames: BTreeMap<&str, (u64, u64, u64)> = BTreeMap::new();
            let slice = (opts.secs / opts.rounds).max(1);
            for _ in 0..opts.rounds {
                for &target in &opts.targets {
                    let (uri, pid) = match target {
                        "file" => (format!("{}/bench.bin", app.url), qemu_pid),
                        "raw" => (format!("{}/nvme0n1", app.url), qemu_pid),
                        "null" => (format!("{}/null", app.url), qemu_pid),
                        _ => (host.url.clone(), host.pid()),
                    };
                    let paused = target == "qemu-nbd";
                    if paused {
                        signal(qemu_pid, "-STOP");
                    }
                    let counted = crate::offload::frame_counts(&app.guest.console()).len();
                    let c0 = cpu_secs(pid);
                    let t0 = Instant::now();
                    let r = fio(&uri, qd, opts.jobs, slice, opts.file_size);
                    let wall = t0.elapsed().as_secs_f64();
                    let cpu = cpu_secs(pid) - c0;
                    if paused {
                        signal(qemu_pid, "-CONT");
                    } else {
                        // The service logs its counts once the client left.
                        let t = Instant::now();
                        while t.elapsed() < Duration::from_secs(5) {
                            let c = crate::offload::frame_counts(&app.guest.console());
                            if c.len() > counted {
                                let e = frames.entry(target).or_default();
                                for (n, tx, rx) in &c[counted..] {
                                    e.0 += n;
                                    e.1 += tx;
                                    e.2 += rx;
                                }
                                break;
                            }
                            std::thread::sleep(Duration::from_millis(50));
                        }
                    }
                    let e = acc.entry(target).or_default();
                    e.0.push(r?);
                    e.1 += cpu;
                    e.2 += wall;
                }
            }
            for (target, _, _) in TARGETS {
                let Some((rs, cpu, wall)) = acc.get(target) else {
                    continue;
                };
                let r = mean_of(rs);
                let ios = r.ios;
                let per_req = frames
                    .get(target)
                    .filter(|f| f.0 > 0)
                    .map(|&(n, tx, rx)| (tx as f64 / n as f64, rx as f64 / n as f64));
                eprintln!(
                    "  net={} offload={} mtu={mtu_label} {} qd={qd:<4} {target:<9} {:>9} IOPS  p50 {:>7.0} us  p99 {:>7.0} us{}",
                    net.name(),
                    offload.label(),
                    variant.label(),
                    fmt_iops(r.iops),
                    r.p50_us,
                    r.p99_us,
                    per_req.map_or(String::new(), |(t, x)| format!("  frames/req {t:.2} sent {x:.2} received"))
                );
                let cpu_per_io = if ios > 0 { cpu / ios as f64 * 1e6 } else { 0.0 };
                let mut row = Row::new(&[
                    ("target", target.into()),
                    ("net", net.name().into()),
                    ("qd", qd.to_string()),
                    ("jobs", opts.jobs.to_string()),
                    ("rounds", opts.rounds.to_string()),
                    ("iops", format!("{:.1}", r.iops)),
                    ("lat_p50_us", format!("{:.1}", r.p50_us)),
                    ("lat_p99_us", format!("{:.1}", r.p99_us)),
                    ("lat_mean_us", format!("{:.1}", r.mean_us)),
                    ("ios", ios.to_string()),
                    ("server_cpu_us_per_io", format!("{cpu_per_io:.1}")),
                    ("wall_secs", format!("{wall:.2}")),
                ]);
                variant.fill(&mut row);
                if nic_fields {
                    row.fields.insert("offload".into(), offload.label());
                    row.fields.insert("mtu".into(), mtu_label.clone());
                }
                if let Some((t, x)) = per_req {
                    row.fields
                        .insert("tx_frames_per_req".into(), format!("{t:.2}"));
                    row.fields
                        .insert("rx_frames_per_req".into(), format!("{x:.2}"));
                }
                rows.push(row);
            }
        }
        let console = app.guest.console();
        runs.push(json!({
            "net": net.name(),
            "offload": offload.label(),
            "mtu": mtu,
            "virtio_net": nic_line,
            "frame_counts": crate::offload::frame_counts(&console),
            "cpus": variant.cpus(),
            "dbbuf": variant.dbbuf,
            "ioeventfd": u8::from(variant.ioeventfd.unwrap_or(false)),
            "appliance_url": app.url,
            "qemu_nbd_options": host.options,
            "guest_warnings": console.lines().filter(|l| l.contains(" WARN ") || l.contains(" ERROR ")).collect::<Vec<_>>(),
        }));
    }
    print!("{}", table(&rows, opts.jobs, opts.secs));
    if opts.accel == Accel::Tcg {
        println!("(the appliance runs under TCG: every guest instruction is emulated; qemu-nbd runs natively)");
    }
    // The same service code on the host's real CPU: the figure the TCG
    // rows follow.
    let host_rows = if opts.host_ios > 0 {
        eprintln!(
            "dioxide bench: host benchmark of the NBD request path ({} reads per row)",
            opts.host_ios
        );
        let h = crate::bench::host_nbd_bench(opts.host_ios)?;
        let rows = h["host_rows"].as_array().cloned().unwrap_or_default();
        print!("\n{}", crate::bench::host_nbd_table(&rows));
        rows
    } else {
        Vec::new()
    };
    let results = json!({
        "rows": rows.iter().map(Row::json).collect::<Vec<_>>(),
        "host_rows": host_rows,
        "config": {
            "accel": opts.accel.name(),
            "boot": opts.boot.name(),
            "completion": opts.completion,
            "file_bytes": opts.file_size,
            "secs_per_row": opts.secs,
            "rounds": opts.rounds,
            "jobs": opts.jobs,
            "qds": opts.qds,
            "sweep": opts.sweep.json(),
            "image": img.display().to_string(),
            "fio": fio_version,
            "qemu_nbd": version("qemu-nbd", "--version"),
            "qemu": version("qemu-system-x86_64", "--version"),
            "runs": runs,
        }
    });
    let json_path = opts.out.join("results.json");
    let text = serde_json::to_string_pretty(&results).map_err(|e| Error::Usage(e.to_string()))?;
    std::fs::write(&json_path, text).map_err(io_err(format!("write {}", json_path.display())))?;
    let svg = opts.out.join("plot.svg");
    let config = config_title(&rows);
    let plot = plot_panels(
        &rows,
        &|r| format!("NBD, net={}{}{}", r.s("net"), nic_title(r), config(r)),
        &TARGETS,
    );
    std::fs::write(&svg, plot).map_err(io_err(format!("write {}", svg.display())))?;
    println!("\nwrote {} and {}", json_path.display(), svg.display());
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::Variant;

    #[test]
    fn the_table_has_a_section_per_network_and_configuration() {
        let row = |target: &str, cpus: u32, dbbuf: Option<u8>, iops: f64| {
            let mut r = Row::new(&[
                ("target", target.into()),
                ("net", "user".into()),
                ("qd", "16".into()),
                ("iops", format!("{iops:.1}")),
                ("server_cpu_us_per_io", "12.0".into()),
            ]);
            Variant {
                smp: Some(cpus),
                dbbuf,
                ioeventfd: None,
            }
            .fill(&mut r);
            r
        };
        let rows = [
            row("file", 1, Some(0), 1000.0),
            row("file", 2, Some(1), 1900.0),
            row("raw", 2, Some(1), 2000.0),
        ];
        let t = table(&rows, 1, 5);
        let heads: Vec<&str> = t.lines().filter(|l| l.starts_with("net=")).collect();
        assert_eq!(heads.len(), 2, "{t}");
        assert!(
            heads[0].starts_with("net=user cpus=1 dbbuf=0 ioeventfd=0: fio"),
            "{t}"
        );
        assert!(
            heads[1].starts_with("net=user cpus=2 dbbuf=1 ioeventfd=0: fio"),
            "{t}"
        );
        assert!(t.contains("0.950"), "file/raw at 2 CPUs: {t}");
        // One configuration: the section is the network mode's alone.
        let t = table(&rows[..1], 1, 5);
        assert!(t.contains("\nnet=user: fio --ioengine=nbd"), "{t}");
        let j = rows[1].json();
        assert_eq!(
            (&j["cpus"], &j["dbbuf"], &j["qd"]),
            (&json!(2), &json!(1), &json!(16))
        );
    }
}
