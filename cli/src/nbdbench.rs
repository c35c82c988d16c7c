//! `dioxide bench nbd`: fio's `nbd` engine, 4K random reads at each queue
//! depth, against the appliance's file export (`bench.bin`, read through
//! the DIO layer), its raw export (`nvme0n1`), its `null` export (zeros
//! without device I/O: the network path alone), and, in the same run,
//! `qemu-nbd` serving the same image file on the host (no virtualization:
//! the ceiling).
//!
//! Per network mode (`--net user`, `--net tap`), NIC (`--nic virtio,igb`)
//! and configuration the appliance boots once; at
//! each queue depth the targets take turns for `--rounds` rounds (IOPS and
//! latency percentiles are the mean over rounds), and while qemu-nbd runs
//! the guest is paused (SIGSTOP: under TCG its busy-polling vCPU would otherwise
//! take a host core from qemu-nbd and fio) and qemu-nbd runs. Each row also
//! records the server process's host CPU time per I/O (`/proc/PID/stat`)
//! and what the guest counted while it was served: frames per request and,
//! on igb (a network stack per core), the connections and requests each
//! core served, from the cores' run-loop reports before and after it.

use crate::accel::Accel;
use crate::bench::{config_title, fmt_iops, plot_panels, Row};
use crate::qemu::{Config, Guest, NbdReady, Nic, GUEST_NBD_PORT};
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
    /// One boot per NIC (the guest's `-device`).
    pub nics: Vec<Nic>,
    /// One boot per virtio-net offload set and MTU (`None`: no `host_mtu=`);
    /// igb boots once, with its driver's offloads, at [`IGB_MTU`].
    pub offloads: Vec<crate::offload::Offloads>,
    pub mtus: Vec<Option<u16>>,
    /// Of [`TARGETS`]' names.
    pub targets: Vec<&'static str>,
    /// What fio does: `read` (4K random reads), `write` (4K random writes:
    /// see [`WRITES`]).
    pub ops: Vec<String>,
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
            cfg.net_queues = cfg.tap_queues();
            let tap = Tap::with_queues(cfg.net_queues)?;
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

/// Where `--op write` writes. The file export `bench.bin` is writable
/// (`nbd.rw=all`, from any client: the benchmark's own appliance); the raw
/// export would be `nvme0n1`, but a namespace holding a mounted filesystem
/// takes no writes, so the writes' raw target is a second namespace,
/// `nvme1n1`, on a scratch image of the file's size; qemu-nbd writes to a
/// scratch image of its own (QEMU holds the first one's write lock), both
/// written with zeroes once so that no write lands in a hole of the host
/// file. The `null` export takes no writes: it has no write row.
pub const WRITES: &str = "writes: file = bench.bin (writable), raw = nvme1n1 (a scratch namespace: nvme0n1 holds the filesystem), qemu-nbd = a scratch image, linux = the Linux guest's scratch namespace; null takes no writes";

/// What the `linux` target serves, for reads and writes alike: a scratch
/// image of its own (the appliance's QEMU holds the write lock of its
/// images), of the file's size, written with zeroes once like the raw
/// write target's, as the guest's nvme0n1 on the same emulated NVMe
/// controller and drive options.
pub const LINUX: &str = "linux = a Linux guest under the same QEMU (same accel, memory, CPUs, NVMe device and drive options, NIC) running qemu-nbd on its nvme0n1, a zero-filled scratch image of the file's size (reads and writes)";

/// `qemu-nbd` serving an image on 127.0.0.1 (killed on drop): read-only,
/// or writable for the write rows.
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
        Self::start_with(img, clients, false)
    }

    /// [`HostNbd::start`], writable when `writable`.
    pub fn start_with(img: &Path, clients: usize, writable: bool) -> Result<HostNbd, Error> {
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
                .args((!writable).then_some("--read-only"))
                .args(["--persistent", "--format=raw", "--bind=127.0.0.1"])
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

impl FioResult {
    /// The row fields every fio result gives: IOPS, latencies, I/Os.
    pub fn fields(&self) -> [(&'static str, String); 5] {
        [
            ("iops", format!("{:.1}", self.iops)),
            ("lat_p50_us", format!("{:.1}", self.p50_us)),
            ("lat_p99_us", format!("{:.1}", self.p99_us)),
            ("lat_mean_us", format!("{:.1}", self.mean_us)),
            ("ios", self.ios.to_string()),
        ]
    }
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
    fio_op(uri, "read", qd, jobs, secs, size)
}

/// [`fio`] with `op` `read` or `write` (4K random writes).
pub fn fio_op(
    uri: &str,
    op: &str,
    qd: usize,
    jobs: usize,
    secs: u64,
    size: u64,
) -> Result<FioResult, Error> {
    let out = Command::new("fio")
        .args([
            "--name=bench",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            &format!("--rw=rand{op}"),
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
    let r = &job[if op == "write" { "write" } else { "read" }];
    if r["total_ios"].as_u64().unwrap_or(0) == 0 {
        return Err(fail(&format!("no {op}s completed")));
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

/// Sends `sig` to process `pid` (0, an unknown process, is skipped: `kill
/// -STOP 0` would stop our own process group).
fn signal(pid: u32, sig: &str) {
    if pid == 0 {
        return;
    }
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

/// The targets of a booted appliance: name, plot colour, legend. `linux`
/// (only when asked for) is a Linux guest under the same QEMU running
/// qemu-nbd on its emulated NVMe namespace ([`crate::linuxguest`]).
pub const TARGETS: [(&str, &str, &str); 5] = [
    ("file", "#1f77b4", "file export"),
    ("raw", "#444444", "raw export"),
    ("null", "#2ca02c", "null export"),
    ("qemu-nbd", "#d62728", "qemu-nbd (host)"),
    ("linux", "#9467bd", "qemu-nbd (Linux guest)"),
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
                        "--targets {s}: file, raw, null, qemu-nbd and/or linux, comma-separated"
                    ))
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    if v.is_empty() {
        return Err(Error::Usage(format!("--targets {s}: empty")));
    }
    Ok(v)
}

/// `--nic`: NIC names (`virtio`, `igb`), comma-separated, each once.
pub fn parse_nics(s: &str) -> Result<Vec<Nic>, Error> {
    let mut v = Vec::new();
    for n in crate::bench::parse_list(s) {
        let nic = Nic::parse(&n).ok_or_else(|| {
            Error::Usage(format!(
                "--nic {s}: {}, comma-separated",
                Nic::NAMES.join(" and/or ")
            ))
        })?;
        if !v.contains(&nic) {
            v.push(nic);
        }
    }
    if v.is_empty() {
        return Err(Error::Usage(format!("--nic {s}: empty")));
    }
    Ok(v)
}

/// The MTU igb's rows run at: the kernel's igb driver sets 1500, and
/// QEMU's igb, unlike virtio-net, announces none (`host_mtu=`).
pub const IGB_MTU: u16 = 1500;

/// Refuses what igb cannot be booted with: an MTU other than
/// [`IGB_MTU`]. (`--offload` sets are virtio-net's switches: igb runs
/// once per network mode and configuration with its driver's offloads,
/// [`IGB_OFFLOADS`], whatever the sets.)
pub fn check_nics(nics: &[Nic], mtus: &[Option<u16>]) -> Result<(), Error> {
    if let Some(m) = mtus.iter().flatten().find(|&&m| m != IGB_MTU) {
        if nics.contains(&Nic::Igb) {
            return Err(Error::Usage(format!(
                "--mtu {m} with --nic igb: the kernel's igb driver runs at MTU {IGB_MTU} and QEMU's igb takes no host_mtu; benchmark other MTUs on virtio-net alone (--nic virtio)"
            )));
        }
    }
    Ok(())
}

/// What igb's rows carry as their `offload`: the driver's own choice
/// (transmit checksum and TSO, receive checksum: [`IGB_OFFLOADS`]).
pub const IGB_OFFLOAD_LABEL: &str = "driver";

/// igb's offloads as the kernel's igb driver sets them.
pub const IGB_OFFLOADS: &str = "csum, tso, rx csum on";

/// The NIC configuration part of the rows' titles: ` nic=igb` when the
/// rows were served by another NIC than virtio-net or by several, then
/// ` offload=csum mtu=9000` where a row has those (empty for rows of
/// neither, `--remote`'s among them).
pub fn nic_title(rows: &[Row]) -> impl Fn(&Row) -> String {
    let mut nics: Vec<&str> = rows
        .iter()
        .map(|r| r.s("nic"))
        .filter(|n| !n.is_empty())
        .collect();
    nics.sort_unstable();
    nics.dedup();
    let show_nic = nics.len() > 1 || nics.iter().any(|&n| n != Nic::Virtio.name());
    move |r: &Row| {
        let mut s = String::new();
        let keys: &[&str] = if show_nic {
            &["nic", "offload", "mtu"]
        } else {
            &["offload", "mtu"]
        };
        for &k in keys {
            if !r.s(k).is_empty() {
                s += &format!(" {k}={}", r.s(k));
            }
        }
        s
    }
}

/// One core's counts from its run-loop report, since boot (or, as a
/// difference, over a row).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CoreCount {
    pub connections: u64,
    pub requests: u64,
    pub frames_received: u64,
    pub frames_sent: u64,
}

impl CoreCount {
    fn add(&mut self, o: &CoreCount) {
        self.connections += o.connections;
        self.requests += o.requests;
        self.frames_received += o.frames_received;
        self.frames_sent += o.frames_sent;
    }

    /// `self` less an earlier count of the same core.
    fn since(&self, earlier: &CoreCount) -> CoreCount {
        CoreCount {
            connections: self.connections.saturating_sub(earlier.connections),
            requests: self.requests.saturating_sub(earlier.requests),
            frames_received: self.frames_received.saturating_sub(earlier.frames_received),
            frames_sent: self.frames_sent.saturating_sub(earlier.frames_sent),
        }
    }
}

/// The last count of each core in a console transcript, from the run-loop
/// reports a core with a network stack of its own (igb) logs each time
/// its service goes idle: `nbd: core N: C connections, R requests served,
/// F frames received, T sent since start` (`report_core` in
/// kernel/src/main.rs). Empty for a console without such lines
/// (virtio-net).
pub fn core_counts(console: &str) -> BTreeMap<u32, CoreCount> {
    const AT: &str = "nbd: core ";
    let mut out = BTreeMap::new();
    for l in console.lines() {
        let Some(i) = l.find(AT) else {
            continue;
        };
        let rest = &l[i + AT.len()..];
        let num = |s: &str| s.trim().parse::<u64>().ok();
        let parse = || -> Option<(u32, CoreCount)> {
            let (core, rest) = rest.split_once(": ")?;
            let (conns, rest) = rest.split_once(" connections, ")?;
            let (reqs, rest) = rest.split_once(" requests served, ")?;
            let (rx, rest) = rest.split_once(" frames received, ")?;
            let tx = rest.strip_suffix(" sent since start")?;
            Some((
                core.parse().ok()?,
                CoreCount {
                    connections: num(conns)?,
                    requests: num(reqs)?,
                    frames_received: num(rx)?,
                    frames_sent: num(tx.trim_end())?,
                },
            ))
        };
        if let Some((core, c)) = parse() {
            out.insert(core, c);
        }
    }
    out
}

/// What each core served between two [`core_counts`]: every core of
/// `0..cpus` (zero where it reported nothing new) and any other that
/// reported.
pub fn core_deltas(
    before: &BTreeMap<u32, CoreCount>,
    after: &BTreeMap<u32, CoreCount>,
    cpus: u32,
) -> BTreeMap<u32, CoreCount> {
    let mut out: BTreeMap<u32, CoreCount> = (0..cpus).map(|c| (c, CoreCount::default())).collect();
    for (&core, a) in after {
        let b = before.get(&core).copied().unwrap_or_default();
        out.insert(core, a.since(&b));
    }
    out
}

/// The per-core counts as results.json holds them (`per_core`).
pub fn per_core_json(cores: &BTreeMap<u32, CoreCount>) -> Value {
    Value::Array(
        cores
            .iter()
            .map(|(core, c)| {
                json!({
                    "core": core,
                    "connections": c.connections,
                    "requests": c.requests,
                    "frames_received": c.frames_received,
                    "frames_sent": c.frames_sent,
                })
            })
            .collect(),
    )
}

/// A row's requests per core, `cores 0:812 1:790` (empty for a row
/// without per-core counts).
pub fn cores_cell(r: &Row) -> String {
    let Ok(Value::Array(cores)) = serde_json::from_str::<Value>(r.s("per_core")) else {
        return String::new();
    };
    let parts: Vec<String> = cores
        .iter()
        .map(|c| format!("{}:{}", c["core"], c["requests"]))
        .collect();
    format!("cores {}", parts.join(" "))
}

/// A row as results.json holds it: [`Row::json`], with `per_core` (kept in
/// the row as JSON text) as the array it is.
pub fn row_json(r: &Row) -> Value {
    let mut j = r.json();
    if let Ok(v @ Value::Array(_)) = serde_json::from_str::<Value>(r.s("per_core")) {
        j["per_core"] = v;
    }
    j
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
/// `qemu-nbd` and, when the section has its rows, `linux` (a booted
/// appliance) or the peers `peer1`, `peer2`, ... in order (`--remote`,
/// rows with `net=remote`).
fn columns(section: &[&Row]) -> Vec<String> {
    if !section.iter().any(|r| r.s("net") == "remote") {
        let linux = section.iter().any(|r| r.s("target") == "linux");
        return TARGETS
            .iter()
            .map(|(t, _, _)| t.to_string())
            .filter(|t| linux || t != "linux")
            .collect();
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

/// The table: per network mode, NIC (when the rows name another than
/// virtio-net, or several) and NIC settings, and per configuration (CPUs,
/// shadow doorbells, ioeventfd) when the rows hold several, a line per
/// queue depth. The last ratio is the file export against the fourth
/// column (qemu-nbd, or the first peer). Under each section: the host CPU
/// time per I/O, the guest's frames per request and, for a NIC with a
/// stack per core (igb), the requests each core served
/// (`null qd16 cores 0:812 1:790`).
pub fn table(rows: &[Row], jobs: usize, secs: u64) -> String {
    type ByQd<'a> = BTreeMap<usize, BTreeMap<String, &'a Row>>;
    let mut by_net: BTreeMap<(usize, String), ByQd> = BTreeMap::new();
    let config = config_title(rows);
    let nic = nic_title(rows);
    let op_rank = |r: &Row| {
        let op = crate::bench::op_of(r);
        crate::bench::OPS.iter().position(|o| *o == op).unwrap_or(9)
    };
    let group = |r: &Row| (op_rank(r), format!("{}{}{}", r.s("net"), nic(r), config(r)));
    for r in rows {
        by_net
            .entry(group(r))
            .or_default()
            .entry(r.f("qd") as usize)
            .or_default()
            .insert(r.s("target").into(), r);
    }
    let mut s = String::new();
    for ((op, net), by_qd) in by_net {
        let section: Vec<&Row> = rows
            .iter()
            .filter(|r| group(r) == (op, net.clone()))
            .collect();
        let cols = columns(&section);
        let reference = cols.get(3).cloned();
        let what = section.first().map_or("read", |r| crate::bench::op_of(r));
        s += &format!(
            "\nnet={net}: fio --ioengine=nbd, {}, {jobs} job(s), {secs} s per row; IOPS (p50/p99 latency us)\n",
            crate::bench::op_title(what).trim_end_matches(" (overwrites)")
        );
        if what == "write" {
            s += WRITES;
            s += "\n";
        }
        if cols.iter().any(|c| c == "linux") {
            s += LINUX;
            s += "\n";
        }
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
        let cores: Vec<String> = section
            .iter()
            .filter(|r| !cores_cell(r).is_empty())
            .map(|r| format!("{} qd{} {}", r.s("target"), r.s("qd"), cores_cell(r)))
            .collect();
        if !cores.is_empty() {
            s += "requests per core: ";
            s += &cores.join(", ");
            s += "\n";
        }
    }
    s
}

/// One boot of `bench nbd`: a network mode, a NIC, and for virtio-net an
/// offload set (`None`: igb, its driver's offloads), an MTU (`None`: no
/// `host_mtu=`) and a configuration (CPUs, shadow doorbells, ioeventfd).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BootPlan {
    pub net: NetMode,
    pub nic: Nic,
    pub offload: Option<crate::offload::Offloads>,
    pub mtu: Option<u16>,
    pub variant: crate::bench::Variant,
}

impl BootPlan {
    /// The offload set as rows carry it: the set's label on virtio-net,
    /// [`IGB_OFFLOAD_LABEL`] on igb.
    pub fn offload_label(&self) -> String {
        self.offload
            .map_or(IGB_OFFLOAD_LABEL.to_string(), |o| o.label())
    }
}

/// Every boot, network mode outermost, then NIC, offload set, MTU and
/// configuration. igb is not crossed with the offload sets (they are
/// virtio-net's switches): it boots once per network mode, MTU and
/// configuration.
pub fn plan(opts: &NbdOpts) -> Vec<BootPlan> {
    let mut boots = Vec::new();
    for &net in &opts.nets {
        for &nic in &opts.nics {
            let offloads: Vec<Option<crate::offload::Offloads>> = match nic {
                Nic::Virtio => opts.offloads.iter().copied().map(Some).collect(),
                Nic::Igb => vec![None],
            };
            for &offload in &offloads {
                for &mtu in &opts.mtus {
                    for variant in opts.sweep.variants() {
                        boots.push(BootPlan {
                            net,
                            nic,
                            offload,
                            mtu,
                            variant,
                        });
                    }
                }
            }
        }
    }
    boots
}

/// The guest's line about its NIC: virtio-net's offloads
/// (`virtio-net: csum on, ...`) or igb's bring-up (`igb MAC ..., N queue
/// pair(s) with RSS, csum on, tso on, rx csum on, mtu 1500`); empty when
/// the console has none.
pub fn guest_nic_line(console: &str, nic: Nic) -> String {
    let at = match nic {
        Nic::Virtio => "virtio-net: ",
        Nic::Igb => "igb MAC ",
    };
    console
        .lines()
        .find_map(|l| l.find(at).map(|i| l[i..].trim().to_string()))
        .unwrap_or_default()
}

/// What the guest counted while one fio run was served.
#[derive(Clone, Debug, Default)]
struct Counted {
    /// Requests, frames sent, frames received.
    frames: Option<(u64, u64, u64)>,
    /// Per core (a stack per core), what each served.
    cores: Option<BTreeMap<u32, CoreCount>>,
}

/// The guest's counts before a fio run.
struct Before {
    frame_counts: usize,
    cores: BTreeMap<u32, CoreCount>,
}

impl Before {
    fn take(guest: &Guest) -> Before {
        let c = guest.console();
        Before {
            frame_counts: crate::offload::frame_counts(&c).len(),
            cores: core_counts(&c),
        }
    }
}

/// Waits (at most 5 s) for the guest's counts of the fio run that did
/// `ios` reads, logged when its service goes idle after the client left:
/// on single-queue virtio-net the next `virtio-net since the last count`
/// line; with a stack per core (igb, virtio-net multiqueue) the cores'
/// reports, until they account for at least `ios` more requests (each core
/// that served reports when its connections closed).
fn counted_after(guest: &Guest, nic: Nic, before: &Before, ios: u64, cpus: u32) -> Counted {
    let t = Instant::now();
    loop {
        let c = guest.console();
        // A stack per core (igb; virtio-net multiqueue on a tap) says what
        // each core served; single-queue virtio-net counts the device's.
        let per_core = nic == Nic::Igb || !core_counts(&c).is_empty();
        match nic {
            Nic::Virtio if !per_core => {
                let f = crate::offload::frame_counts(&c);
                if f.len() > before.frame_counts {
                    let sum = f[before.frame_counts..]
                        .iter()
                        .fold((0, 0, 0), |a, b| (a.0 + b.0, a.1 + b.1, a.2 + b.2));
                    return Counted {
                        frames: Some(sum),
                        cores: None,
                    };
                }
            }
            _ => {
                let d = core_deltas(&before.cores, &core_counts(&c), cpus);
                let requests: u64 = d.values().map(|c| c.requests).sum();
                if requests >= ios.max(1) || t.elapsed() >= Duration::from_secs(5) {
                    let (tx, rx) = d.values().fold((0, 0), |a, c| {
                        (a.0 + c.frames_sent, a.1 + c.frames_received)
                    });
                    return Counted {
                        frames: (requests > 0).then_some((requests, tx, rx)),
                        cores: (requests > 0).then_some(d),
                    };
                }
            }
        }
        if t.elapsed() >= Duration::from_secs(5) {
            return Counted::default();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// What one target measured over a queue depth's rounds.
#[derive(Default)]
struct Acc {
    results: Vec<FioResult>,
    cpu: f64,
    wall: f64,
    /// Requests, frames sent, frames received (the guest's count).
    frames: (u64, u64, u64),
    cores: Option<BTreeMap<u32, CoreCount>>,
}

pub fn nbd(opts: &NbdOpts) -> Result<i32, Error> {
    std::fs::create_dir_all(&opts.out).map_err(io_err(format!("create {}", opts.out.display())))?;
    let fio_version = version("fio", "--version");
    if fio_version.is_empty() {
        return Err(Error::Usage(
            "fio not found: apt-get install fio (./dx installs it)".into(),
        ));
    }
    check_nics(&opts.nics, &opts.mtus)?;
    let img = crate::bench::image(opts.file_size)?;
    // Write rows only where a target takes writes (the null export does not).
    let writes = opts.ops.iter().any(|o| o == "write") && opts.targets.iter().any(|t| *t != "null");
    let scratch = if writes {
        vec![
            crate::bench::scratch("raw", opts.file_size)?,
            crate::bench::scratch("qemu-nbd", opts.file_size)?,
        ]
    } else {
        Vec::new()
    };
    let linux = if opts.targets.contains(&"linux") {
        let t = Instant::now();
        let p = crate::linuxguest::prepare()?;
        eprintln!(
            "dioxide bench: linux guest: {} ({:.1} s to prepare or check)",
            p.package,
            t.elapsed().as_secs_f64()
        );
        Some((p, crate::bench::scratch("linux", opts.file_size)?))
    } else {
        None
    };
    eprintln!("dioxide bench: building the kernel (release)");
    let kernel = kernel::build()?;
    let mut rows = Vec::new();
    let mut runs = Vec::new();
    let nic_fields = opts.offloads.len() > 1
        || opts.mtus.len() > 1
        || opts.offloads[0].0.is_some()
        || opts.mtus[0].is_some();
    for b in plan(opts) {
        let BootPlan {
            net,
            nic,
            offload,
            mtu,
            variant,
        } = b;
        let mut cfg = Config::new(kernel.clone());
        cfg.add_disk(&img);
        if writes {
            cfg.add_disk(&scratch[0]);
        }
        cfg.accel = opts.accel;
        cfg.mem_mib = opts.mem;
        cfg.boot = opts.boot;
        cfg.nic = nic;
        cfg.args = vec![
            "log=info".into(),
            "nbd.null=1".into(),
            format!("nvme.completion={}", opts.completion),
        ];
        if writes {
            cfg.args.push("nbd.rw=all".into());
            cfg.args.push("nbd.rw_from=any".into());
        }
        variant.apply(&mut cfg);
        if let Some(o) = offload {
            cfg.args.extend(o.kernel_args());
        }
        cfg.net_mtu = mtu;
        // igb's is the driver's, whatever was asked (only 1500 is taken).
        let mtu_label = match (nic, mtu) {
            (Nic::Igb, _) => IGB_MTU.to_string(),
            (Nic::Virtio, m) => m.map_or("default".to_string(), |m| m.to_string()),
        };
        let offload_label = b.offload_label();
        let nic_settings = match offload {
            Some(o) => format!("offload {}, mtu {mtu_label}", o.label()),
            None => format!(
                "offloads the driver's ({IGB_OFFLOADS}; --offload sets are virtio-net's), mtu {mtu_label}"
            ),
        };
        eprintln!(
            "dioxide bench: booting the appliance (accel {}, boot {}, net {}, nic {}, {nic_settings}, completion {}, {})",
            opts.accel.name(),
            opts.boot.name(),
            net.name(),
            nic.name(),
            opts.completion,
            variant.label()
        );
        let base = cfg.clone();
        let app = boot(cfg, net)?;
        let qemu_pid = app.guest.pid().unwrap_or(0);
        // The Linux guest (user networking only), booted while the
        // appliance is paused and paused itself until its turn.
        let lg = match (&linux, net) {
            (Some((p, img)), NetMode::User) => {
                signal(qemu_pid, "-STOP");
                eprintln!("dioxide bench: booting the Linux guest ({})", p.package);
                let g = crate::linuxguest::boot(p, &base, img, opts.jobs);
                signal(qemu_pid, "-CONT");
                let g = g?;
                signal(g.guest.pid().unwrap_or(0), "-STOP");
                eprintln!(
                    "dioxide bench: Linux guest at {} after {:.1} s, qemu-nbd {}",
                    g.url, g.boot_secs, g.options
                );
                Some(g)
            }
            (Some(_), NetMode::Tap) => {
                eprintln!("dioxide bench: linux: left out with --net tap (the Linux guest runs on user networking only)");
                None
            }
            _ => None,
        };
        let lg_pid = lg.as_ref().and_then(|g| g.guest.pid()).unwrap_or(0);
        let nic_line = guest_nic_line(&app.guest.console(), nic);
        eprintln!("dioxide bench: guest: {nic_line}");
        let host = HostNbd::start(&img, opts.jobs)?;
        let host_w = if writes {
            Some(HostNbd::start_with(&scratch[1], opts.jobs, true)?)
        } else {
            None
        };
        eprintln!(
            "dioxide bench: appliance at {}, qemu-nbd ({}) at {}",
            app.url, host.options, host.url
        );
        for op in opts.ops.iter().filter(|o| writes || *o != "write") {
            let write = op == "write";
            for &qd in &opts.qds {
                let mut acc: BTreeMap<&str, Acc> = BTreeMap::new();
                let slice = (opts.secs / opts.rounds).max(1);
                for _ in 0..opts.rounds {
                    for &target in &opts.targets {
                        if target == "linux" && lg.is_none() {
                            continue;
                        }
                        let (uri, pid) = match (target, host_w.as_ref().filter(|_| write)) {
                            ("linux", _) => (
                                lg.as_ref().map(|g| g.url.clone()).unwrap_or_default(),
                                lg_pid,
                            ),
                            ("file", _) => (format!("{}/bench.bin", app.url), qemu_pid),
                            ("raw", None) => (format!("{}/nvme0n1", app.url), qemu_pid),
                            ("raw", Some(_)) => (format!("{}/nvme1n1", app.url), qemu_pid),
                            ("null", None) => (format!("{}/null", app.url), qemu_pid),
                            ("null", Some(_)) => continue,
                            (_, None) => (host.url.clone(), host.pid()),
                            (_, Some(w)) => (w.url.clone(), w.pid()),
                        };
                        // The appliance's QEMU is paused while another
                        // server runs; the Linux guest's runs only in its
                        // own turn.
                        let paused = target == "qemu-nbd" || target == "linux";
                        if paused {
                            signal(qemu_pid, "-STOP");
                        }
                        if target == "linux" {
                            signal(lg_pid, "-CONT");
                        }
                        let before = Before::take(&app.guest);
                        let c0 = cpu_secs(pid);
                        let t0 = Instant::now();
                        let r = fio_op(&uri, op, qd, opts.jobs, slice, opts.file_size);
                        let wall = t0.elapsed().as_secs_f64();
                        let cpu = cpu_secs(pid) - c0;
                        if target == "linux" {
                            signal(lg_pid, "-STOP");
                        }
                        let e = acc.entry(target).or_default();
                        if paused {
                            signal(qemu_pid, "-CONT");
                        } else {
                            let ios = r.as_ref().map_or(0, |r| r.ios);
                            let counted =
                                counted_after(&app.guest, nic, &before, ios, variant.cpus());
                            if let Some((n, tx, rx)) = counted.frames {
                                e.frames.0 += n;
                                e.frames.1 += tx;
                                e.frames.2 += rx;
                            }
                            if let Some(d) = counted.cores {
                                let all = e.cores.get_or_insert_with(BTreeMap::new);
                                for (core, c) in d {
                                    all.entry(core).or_default().add(&c);
                                }
                            }
                        }
                        e.results.push(r?);
                        e.cpu += cpu;
                        e.wall += wall;
                    }
                }
                for (target, _, _) in TARGETS {
                    let Some(a) = acc.get(target) else {
                        continue;
                    };
                    let r = mean_of(&a.results);
                    let ios = r.ios;
                    let (n, tx, rx) = a.frames;
                    let per_req = (n > 0).then(|| (tx as f64 / n as f64, rx as f64 / n as f64));
                    let cpu_per_io = if ios > 0 {
                        a.cpu / ios as f64 * 1e6
                    } else {
                        0.0
                    };
                    let mut fields = vec![
                        ("target", target.into()),
                        ("op", op.clone()),
                        ("net", net.name().into()),
                        ("nic", nic.name().into()),
                        ("qd", qd.to_string()),
                        ("jobs", opts.jobs.to_string()),
                        ("rounds", opts.rounds.to_string()),
                        ("server_cpu_us_per_io", format!("{cpu_per_io:.1}")),
                        ("wall_secs", format!("{:.2}", a.wall)),
                    ];
                    fields.extend(r.fields());
                    let mut row = Row::new(&fields);
                    variant.fill(&mut row);
                    if nic_fields {
                        row.fields.insert("offload".into(), offload_label.clone());
                        row.fields.insert("mtu".into(), mtu_label.clone());
                    }
                    if let Some((t, x)) = per_req {
                        row.fields
                            .insert("tx_frames_per_req".into(), format!("{t:.2}"));
                        row.fields
                            .insert("rx_frames_per_req".into(), format!("{x:.2}"));
                    }
                    if let Some(cores) = &a.cores {
                        row.fields
                            .insert("per_core".into(), per_core_json(cores).to_string());
                    }
                    eprintln!(
                    "  {op} net={} nic={} offload={offload_label} mtu={mtu_label} {} qd={qd:<4} {target:<9} {:>9} IOPS  p50 {:>7.0} us  p99 {:>7.0} us{}{}",
                    net.name(),
                    nic.name(),
                    variant.label(),
                    fmt_iops(r.iops),
                    r.p50_us,
                    r.p99_us,
                    per_req.map_or(String::new(), |(t, x)| format!("  frames/req {t:.2} sent {x:.2} received")),
                    match cores_cell(&row) {
                        c if c.is_empty() => c,
                        c => format!("  {c}"),
                    }
                );
                    rows.push(row);
                }
            }
        }
        let console = app.guest.console();
        runs.push(json!({
            "net": net.name(),
            "nic": nic.name(),
            "offload": offload_label,
            "mtu": if nic == Nic::Igb { Some(IGB_MTU) } else { mtu },
            "nic_line": nic_line,
            "virtio_net": if nic == Nic::Virtio { nic_line.as_str() } else { "" },
            // virtio-net's counts per idle period (igb's are per core).
            "frame_counts": if nic == Nic::Virtio { crate::offload::frame_counts(&console) } else { Vec::new() },
            "core_counts": per_core_json(&core_counts(&console)),
            "cpus": variant.cpus(),
            "dbbuf": variant.dbbuf,
            "ioeventfd": u8::from(variant.ioeventfd.unwrap_or(false)),
            "appliance_url": app.url,
            "qemu_nbd_options": host.options,
            "qemu_nbd_write_options": host_w.as_ref().map(|w| w.options.clone()),
            "linux_guest": lg.as_ref().map(|g| json!({
                "kernel_package": linux.as_ref().map(|(p, _)| p.package.clone()),
                "qemu_nbd_options": g.options,
                "boot_secs": g.boot_secs,
                "url": g.url,
                "console": g.guest.console(),
            })),
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
        "rows": rows.iter().map(row_json).collect::<Vec<_>>(),
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
            "ops": opts.ops,
            "writes": if writes { Some(WRITES) } else { None },
            "linux": if linux.is_some() { Some(LINUX) } else { None },
            "nics": opts.nics.iter().map(|n| n.name()).collect::<Vec<_>>(),
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
    let nic = nic_title(&rows);
    let plot = plot_panels(
        &rows,
        &|r| {
            format!(
                "{}, NBD, net={}{}{}",
                crate::bench::op_title(crate::bench::op_of(r)),
                r.s("net"),
                nic(r),
                config(r)
            )
        },
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

    /// A row of `nic` at `cpus` CPUs, with per-core requests when given.
    fn nic_row(target: &str, nic: &str, cpus: u32, iops: f64, cores: &[(u32, u64)]) -> Row {
        let mut r = Row::new(&[
            ("target", target.into()),
            ("net", "user".into()),
            ("nic", nic.into()),
            ("qd", "16".into()),
            ("iops", format!("{iops:.1}")),
        ]);
        Variant {
            smp: Some(cpus),
            dbbuf: None,
            ioeventfd: None,
        }
        .fill(&mut r);
        if !cores.is_empty() {
            let m: BTreeMap<u32, CoreCount> = cores
                .iter()
                .map(|&(c, n)| {
                    (
                        c,
                        CoreCount {
                            connections: 1,
                            requests: n,
                            frames_received: 2 * n,
                            frames_sent: n,
                        },
                    )
                })
                .collect();
            r.fields
                .insert("per_core".into(), per_core_json(&m).to_string());
        }
        r
    }

    #[test]
    fn the_table_has_a_section_per_nic_and_igb_sections_say_what_each_core_served() {
        let rows = [
            nic_row("null", "igb", 1, 1000.0, &[(0, 1624)]),
            nic_row("null", "igb", 2, 1800.0, &[(0, 812), (1, 790)]),
            nic_row("null", "virtio", 1, 900.0, &[]),
            nic_row("null", "virtio", 2, 950.0, &[]),
        ];
        let t = table(&rows, 1, 5);
        let heads: Vec<&str> = t.lines().filter(|l| l.starts_with("net=")).collect();
        assert_eq!(heads.len(), 4, "{t}");
        for (h, want) in heads.iter().zip([
            "net=user nic=igb cpus=1 ",
            "net=user nic=igb cpus=2 ",
            "net=user nic=virtio cpus=1 ",
            "net=user nic=virtio cpus=2 ",
        ]) {
            assert!(h.starts_with(want), "{want} in {t}");
        }
        // The per-core line is under igb's sections only.
        let cores: Vec<&str> = t
            .lines()
            .filter(|l| l.starts_with("requests per core: "))
            .collect();
        assert_eq!(
            cores,
            [
                "requests per core: null qd16 cores 0:1624",
                "requests per core: null qd16 cores 0:812 1:790"
            ],
            "{t}"
        );
        let virtio = &t[t.find("nic=virtio cpus=1").unwrap()..];
        assert!(!virtio.contains("per core"), "{t}");
        // virtio-net alone, the default: no nic= in the titles (as before).
        let t = table(&rows[2..3], 1, 5);
        assert!(t.contains("\nnet=user: fio --ioengine=nbd"), "{t}");
        // igb alone: it says so.
        let t = table(&rows[..1], 1, 5);
        assert!(t.contains("\nnet=user nic=igb: fio --ioengine=nbd"), "{t}");
        // results.json: per_core as an array of objects, nic as a string.
        let j = row_json(&rows[1]);
        assert_eq!(j["nic"], json!("igb"));
        assert_eq!(
            j["per_core"],
            json!([
                {"core": 0, "connections": 1, "requests": 812, "frames_received": 1624, "frames_sent": 812},
                {"core": 1, "connections": 1, "requests": 790, "frames_received": 1580, "frames_sent": 790}
            ])
        );
        assert!(row_json(&rows[2]).get("per_core").is_none());
    }

    const IGB_CONSOLE: &str = "\
[ 0.9] INFO  net: 00:03.0 igb MAC 52:54:00:12:34:56, link up 1000 Mb/s full duplex, 2 queue pair(s) with RSS, csum on, tso on, rx csum on, mtu 1500
[ 1.0] INFO  nbd: idle: 100 requests served, heap 1 bytes in use, peak 2 bytes
[ 1.0] INFO  nbd: core 0: 2 connections, 100 requests served, 310 frames received, 155 sent since start
[ 2.0] ERROR nbd: core 3: its network stack did not start: Busy
[ 2.1] INFO  nbd: core 1: 1 connections, 40 requests served, 90 frames received, 45 sent since start
[ 3.0] INFO  nbd: core 0: 3 connections, 180 requests served, 500 frames received, 250 sent since start
";

    #[test]
    fn core_lines_give_each_cores_last_count_and_the_difference_over_a_row() {
        let after = core_counts(IGB_CONSOLE);
        assert_eq!(after.len(), 2, "{after:?}");
        assert_eq!(
            after[&0],
            CoreCount {
                connections: 3,
                requests: 180,
                frames_received: 500,
                frames_sent: 250
            }
        );
        assert_eq!(after[&1].requests, 40);
        // Before the row: the console up to the first core line.
        let before = core_counts(&IGB_CONSOLE[..IGB_CONSOLE.find("[ 2.0]").unwrap()]);
        assert_eq!(before.keys().copied().collect::<Vec<_>>(), [0]);
        let d = core_deltas(&before, &after, 2);
        assert_eq!(
            (d[&0].connections, d[&0].requests, d[&0].frames_received),
            (1, 80, 190)
        );
        assert_eq!((d[&1].connections, d[&1].requests), (1, 40));
        // A core that reported nothing is there with zeros.
        let d = core_deltas(&after, &after, 3);
        assert_eq!(d.len(), 3);
        assert!(d.values().all(|c| *c == CoreCount::default()), "{d:?}");
        assert!(guest_nic_line(IGB_CONSOLE, Nic::Igb).ends_with("rx csum on, mtu 1500"));
    }

    #[test]
    fn a_console_without_core_lines_gives_no_counts() {
        // virtio-net's idle report: the same service, no per-core lines.
        let c = "\
[ 1.0] INFO  net: virtio-net: csum off (not offered), guest_csum off (not offered), mrg_rxbuf on, mtu 1500 (default), tso off (not offered)
[ 1.0] INFO  nbd: idle: 100 requests served, heap 1 bytes in use, peak 2 bytes
[ 1.0] INFO  nbd: run loop since the last idle: 100 requests, 5 loops, cycles per request 9: net 1 (1%)
[ 1.0] INFO  net: virtio-net since the last count: 310 frames sent (0 with partial checksum, 0 GSO, 0 dropped), 155 received (0 merged, 0 bad checksum)
";
        assert!(core_counts(c).is_empty());
        assert!(core_deltas(&core_counts(c), &core_counts(c), 0).is_empty());
        assert_eq!(guest_nic_line(c, Nic::Igb), "");
        assert!(guest_nic_line(c, Nic::Virtio).starts_with("virtio-net: csum off"));
        // The control: the igb console does give counts.
        assert!(!core_counts(IGB_CONSOLE).is_empty());
    }

    fn opts(nics: &str, offloads: &str, mtus: &[Option<u16>], smp: &str) -> NbdOpts {
        NbdOpts {
            qds: vec![16],
            jobs: 1,
            secs: 1,
            out: PathBuf::new(),
            file_size: 1 << 20,
            accel: Accel::Tcg,
            mem: 256,
            nets: vec![NetMode::User],
            nics: parse_nics(nics).unwrap(),
            offloads: crate::offload::Offloads::parse_list(offloads).unwrap(),
            mtus: mtus.to_vec(),
            targets: vec!["null"],
            ops: vec!["read".into()],
            completion: "poll".into(),
            rounds: 1,
            boot: crate::qemu::Boot::Pvh,
            sweep: crate::bench::Sweep::parse(Some(smp), None, None).unwrap(),
            host_ios: 0,
        }
    }

    #[test]
    fn igb_boots_once_per_configuration_whatever_the_offload_sets() {
        let o = opts("igb,virtio", "none,default,all", &[None], "1,2");
        let p = plan(&o);
        let igb: Vec<&BootPlan> = p.iter().filter(|b| b.nic == Nic::Igb).collect();
        let virtio: Vec<&BootPlan> = p.iter().filter(|b| b.nic == Nic::Virtio).collect();
        assert_eq!(igb.len(), 2, "{p:?}");
        assert!(igb.iter().all(|b| b.offload.is_none()));
        assert_eq!(igb[0].offload_label(), "driver");
        assert_eq!(virtio.len(), 6, "{p:?}");
        // igb first, as asked; CPUs innermost.
        assert_eq!(
            p.iter()
                .map(|b| (b.nic, b.variant.cpus()))
                .take(3)
                .collect::<Vec<_>>(),
            [(Nic::Igb, 1), (Nic::Igb, 2), (Nic::Virtio, 1)]
        );
        assert_eq!(virtio[5].offload_label(), "all");
    }

    #[test]
    fn igb_refuses_an_mtu_it_cannot_have() {
        let nics = parse_nics("igb,virtio").unwrap();
        let e = check_nics(&nics, &[Some(1500), Some(9000)]).unwrap_err();
        assert!(e.to_string().contains("--mtu 9000 with --nic igb"), "{e}");
        check_nics(&nics, &[None, Some(1500)]).unwrap();
        // virtio-net alone takes any.
        check_nics(&[Nic::Virtio], &[Some(9000)]).unwrap();
        assert!(parse_nics("igb,e1000").is_err());
        assert_eq!(parse_nics("virtio,virtio").unwrap(), [Nic::Virtio]);
    }
}
