//! `dioxide bench local`: the in-guest benchmark of the read path, with the
//! host benchmark of the same crates beside it.

use crate::accel::Accel;
use crate::{io_err, kernel, qemu, workspace_root, Error};
use dioxide_dxfs::mkfs::{Node, Options, Source, Tree};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

pub struct LocalOpts {
    pub qds: Vec<usize>,
    pub devs: Vec<String>,
    pub completions: Vec<String>,
    /// What the requests do ([`OPS`]).
    pub ops: Vec<String>,
    pub secs: u64,
    pub out: PathBuf,
    pub file_size: u64,
    pub accel: Accel,
    pub mem: u32,
    /// Reads per target in the host benchmark (0: skip it).
    pub host_ios: u64,
    /// The host benchmark's thread counts (`--threads` of
    /// dioxide-hostbench: a list, or `auto`); empty: one thread only.
    pub host_threads: String,
    /// Instead of booting: the console of a kernel that ran the benchmark
    /// elsewhere (a server booted from `dioxide image --cmdline "bench.qd=..."`).
    pub from_log: Option<PathBuf>,
    /// How the kernel boots (PVH, or GRUB under SeaBIOS or OVMF).
    pub boot: qemu::Boot,
    /// One boot per variant (CPUs, shadow doorbells, ioeventfd).
    pub sweep: Sweep,
}

/// What `--op` takes: 4 KiB reads, overwrites, overwrites with FUA (the
/// kernel's `bench.op=`).
pub const OPS: [&str; 3] = ["read", "write", "write-fua"];

/// A row's `op` (a kernel from before writes printed none: reads).
pub fn op_of(r: &Row) -> &str {
    match r.s("op") {
        "" => "read",
        o => o,
    }
}

/// How a table's section and a panel's title name an op.
pub fn op_title(op: &str) -> &'static str {
    match op {
        "write" => "4K random writes (overwrites)",
        "write-fua" => "4K random writes with FUA (overwrites)",
        _ => "4K random reads",
    }
}

/// Most guest CPUs a `--smp` list takes.
pub const MAX_SMP: u32 = 64;

/// The `--smp`, `--dbbuf` and `--ioeventfd` lists of a benchmark: one boot
/// per combination. A list not given is one boot as without the option:
/// one CPU and no `smp=` argument, no `nvme.dbbuf=` argument (the kernel's
/// default), no `ioeventfd=on`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Sweep {
    pub smp: Option<Vec<u32>>,
    pub dbbuf: Option<Vec<u8>>,
    pub ioeventfd: Option<Vec<bool>>,
}

/// One boot of a [`Sweep`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Variant {
    /// QEMU `-smp N` and kernel argument `smp=N`; `None`: one CPU, no
    /// argument.
    pub smp: Option<u32>,
    /// Kernel argument `nvme.dbbuf=V`; `None`: not given.
    pub dbbuf: Option<u8>,
    /// QEMU `ioeventfd=on|off` on the NVMe controller; `None`: QEMU's
    /// default (off).
    pub ioeventfd: Option<bool>,
}

impl Sweep {
    /// Parses the three lists as the CLI takes them (comma-separated).
    pub fn parse(
        smp: Option<&str>,
        dbbuf: Option<&str>,
        ioeventfd: Option<&str>,
    ) -> Result<Sweep, Error> {
        let smp = smp
            .map(|s| {
                let v: Vec<u32> = parse_list(s)
                    .iter()
                    .map(|x| x.parse::<u32>())
                    .collect::<Result<_, _>>()
                    .unwrap_or_default();
                if v.is_empty() || v.iter().any(|&n| n == 0 || n > MAX_SMP) {
                    return Err(Error::Usage(format!(
                        "--smp {s}: CPU counts from 1 to {MAX_SMP}, comma-separated"
                    )));
                }
                Ok(v)
            })
            .transpose()?;
        let bits = |name: &str, s: &str| -> Result<Vec<u8>, Error> {
            let v: Vec<u8> = parse_list(s)
                .iter()
                .filter_map(|x| match x.as_str() {
                    "0" | "off" => Some(0),
                    "1" | "on" => Some(1),
                    _ => None,
                })
                .collect();
            if v.is_empty() || v.len() != parse_list(s).len() {
                return Err(Error::Usage(format!(
                    "--{name} {s}: 0 and/or 1, comma-separated"
                )));
            }
            Ok(v)
        };
        Ok(Sweep {
            smp,
            dbbuf: dbbuf.map(|s| bits("dbbuf", s)).transpose()?,
            ioeventfd: ioeventfd
                .map(|s| bits("ioeventfd", s).map(|v| v.into_iter().map(|b| b == 1).collect()))
                .transpose()?,
        })
    }

    /// Every combination, CPUs outermost.
    pub fn variants(&self) -> Vec<Variant> {
        fn list<T: Copy>(o: &Option<Vec<T>>) -> Vec<Option<T>> {
            match o {
                Some(v) => v.iter().copied().map(Some).collect(),
                None => vec![None],
            }
        }
        let mut out = Vec::new();
        for smp in list(&self.smp) {
            for dbbuf in list(&self.dbbuf) {
                for ioeventfd in list(&self.ioeventfd) {
                    out.push(Variant {
                        smp,
                        dbbuf,
                        ioeventfd,
                    });
                }
            }
        }
        out
    }

    /// The lists as results.json's `config` records them (null: not given).
    pub fn json(&self) -> Value {
        json!({"smp": self.smp, "dbbuf": self.dbbuf, "ioeventfd": self.ioeventfd})
    }
}

impl Variant {
    /// Guest CPUs.
    pub fn cpus(&self) -> u32 {
        self.smp.unwrap_or(1)
    }

    /// Sets the boot's CPUs, kernel arguments and controller option.
    pub fn apply(&self, cfg: &mut qemu::Config) {
        if let Some(n) = self.smp {
            cfg.smp = n;
            cfg.args.push(format!("smp={n}"));
        }
        if let Some(d) = self.dbbuf {
            cfg.args.push(format!("nvme.dbbuf={d}"));
        }
        cfg.nvme_ioeventfd = self.ioeventfd.unwrap_or(false);
    }

    /// Fills the row's `cpus`, `dbbuf` and `ioeventfd` from this
    /// configuration where the kernel did not give them (`dbbuf` empty,
    /// i.e. null in JSON, when the kernel's default was left alone).
    pub fn fill(&self, row: &mut Row) {
        let mut put = |k: &str, v: String| {
            row.fields.entry(k.to_string()).or_insert(v);
        };
        put("cpus", self.cpus().to_string());
        put(
            "dbbuf",
            self.dbbuf.map(|d| d.to_string()).unwrap_or_default(),
        );
        put(
            "ioeventfd",
            u8::from(self.ioeventfd.unwrap_or(false)).to_string(),
        );
    }

    /// `cpus=2 dbbuf=1 ioeventfd=0`, for titles and progress lines.
    pub fn label(&self) -> String {
        format!(
            "cpus={} dbbuf={} ioeventfd={}",
            self.cpus(),
            self.dbbuf.map_or("default".to_string(), |d| d.to_string()),
            u8::from(self.ioeventfd.unwrap_or(false))
        )
    }
}

/// The benchmark rows in a console transcript, and the first error line the
/// kernel printed (`{"bench":"error","message":...}`), if any.
pub fn console_rows(console: &str) -> (Vec<Row>, Option<String>) {
    let mut error = None;
    let rows = console
        .lines()
        .filter_map(|l| {
            if error.is_none() {
                error = json_at(l, r#"{"bench":"error""#)
                    .and_then(|v| v["message"].as_str().map(str::to_string));
            }
            Row::parse(l)
        })
        .collect();
    (rows, error)
}

/// The JSON object that starts with `prefix` anywhere in `line` (a console
/// captured from a server may carry a terminal's escapes or a BMC's
/// timestamp before it); anything after the object is ignored.
fn json_at(line: &str, prefix: &str) -> Option<Value> {
    let at = line.find(prefix)?;
    serde_json::Deserializer::from_str(&line[at..])
        .into_iter::<Value>()
        .next()?
        .ok()
}

/// One in-guest row (a `{"bench":"row",...}` line).
#[derive(Clone, Debug)]
pub struct Row {
    pub fields: BTreeMap<String, String>,
}

impl Row {
    pub fn new(fields: &[(&str, String)]) -> Row {
        Row {
            fields: fields
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
        }
    }
    /// A row of the kernel's benchmark: a JSON line `{"bench":"row",...}`
    /// (kernel/src/diag/bench.rs), found as [`json_at`] finds it.
    pub fn parse(line: &str) -> Option<Row> {
        let v = json_at(line, r#"{"bench":"row""#)?;
        let fields = v
            .as_object()?
            .iter()
            .filter(|(k, _)| *k != "bench")
            .map(|(k, v)| {
                let v = match v {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                (k.clone(), v)
            })
            .collect();
        Some(Row { fields })
    }
    pub fn s(&self, k: &str) -> &str {
        self.fields.get(k).map(String::as_str).unwrap_or("")
    }
    pub fn f(&self, k: &str) -> f64 {
        self.s(k).parse().unwrap_or(0.0)
    }
    /// The row as a JSON object: numbers as numbers (counts as integers),
    /// names as strings, an empty value (a `dbbuf` left at the kernel's
    /// default) as null.
    pub fn json(&self) -> Value {
        let mut m = serde_json::Map::new();
        for (k, v) in &self.fields {
            if v.is_empty() {
                m.insert(k.clone(), Value::Null);
                continue;
            }
            let val = match v.parse::<f64>() {
                Ok(x)
                    if !matches!(
                        k.as_str(),
                        "target" | "op" | "dev" | "completion" | "net" | "export" | "uri"
                    ) =>
                {
                    if matches!(
                        k.as_str(),
                        "qd" | "ios"
                            | "errors"
                            | "jobs"
                            | "rounds"
                            | "simple_path"
                            | "generic_path"
                            | "fell_back"
                            | "cpus"
                            | "dbbuf"
                            | "ioeventfd"
                            | "threads"
                    ) {
                        json!(x as u64)
                    } else {
                        json!(x)
                    }
                }
                _ => json!(v),
            };
            m.insert(k.clone(), val);
        }
        Value::Object(m)
    }
}

/// Deterministic pseudo-random file contents for the bench image.
struct RandomSource;
impl Source for RandomSource {
    fn read(&mut self, _id: u64, offset: u64, buf: &mut [u8]) -> Result<(), String> {
        crate::image::position_random(0xd10c_1de5, offset, buf);
        Ok(())
    }
}

/// The bench image (a dxfs with `/bench.bin` of `size` random bytes), made
/// once under target/dioxide/.
pub fn image(size: u64) -> Result<PathBuf, Error> {
    let dir = workspace_root().join("target").join("dioxide");
    std::fs::create_dir_all(&dir).map_err(io_err(format!("create {}", dir.display())))?;
    let path = dir.join(format!("bench-{}m.img", size >> 20));
    if crate::image::has_file(&path, "/bench.bin") {
        return Ok(path);
    }
    eprintln!(
        "dioxide bench: making {} ({} MiB file of random data)",
        path.display(),
        size >> 20
    );
    let tree = Tree {
        nodes: vec![
            Node::dir(vec![("bench.bin".into(), 1)]),
            Node::file(size, vec![(0, size)], 0),
        ],
    };
    let opts = Options {
        label: "bench".into(),
        ..Default::default()
    };
    crate::image::write_tree(&path, &tree, &opts, &mut RandomSource)?;
    Ok(path)
}

/// A scratch image of `size` bytes under target/dioxide/ (`name` tells
/// them apart), every block written with zeroes once, so that writes to it
/// never land in a hole of the host file (which would make the host file
/// system allocate on the way).
pub fn scratch(name: &str, size: u64) -> Result<PathBuf, Error> {
    use std::io::Write;
    let dir = workspace_root().join("target").join("dioxide");
    std::fs::create_dir_all(&dir).map_err(io_err(format!("create {}", dir.display())))?;
    let path = dir.join(format!("scratch-{name}-{}m.img", size >> 20));
    if std::fs::metadata(&path).is_ok_and(|m| m.len() == size) {
        return Ok(path);
    }
    let tmp = path.with_extension("part");
    let mut f = std::fs::File::create(&tmp).map_err(io_err(format!("create {}", tmp.display())))?;
    let zeros = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        let n = left.min(zeros.len() as u64) as usize;
        f.write_all(&zeros[..n])
            .map_err(io_err(format!("write {}", tmp.display())))?;
        left -= n as u64;
    }
    f.sync_all()
        .map_err(io_err(format!("sync {}", tmp.display())))?;
    std::fs::rename(&tmp, &path).map_err(io_err(format!("rename {}", tmp.display())))?;
    Ok(path)
}

/// Builds and runs the host benchmark (also on `threads` threads side by
/// side, a `--threads` list, unless empty); its JSON report.
pub fn host_bench(ios: u64, threads: &str) -> Result<Value, Error> {
    let ios = ios.to_string();
    let mut args = vec!["--json", "--ios", &ios];
    if !threads.is_empty() {
        args.extend(["--threads", threads]);
    }
    run_hostbench(&args)
}

/// Builds and runs the host benchmark of the whole NBD request path
/// (`dioxide-hostbench --nbd`): TCP/IP, NBD, DIO and dxfs on the host, at
/// queue depths 1, 16 and 128, for the file, raw and null targets, with
/// and without checksum offload at MTU 1500 and 9000, and with TSO (and
/// checksum offload) at 1500; its JSON report (`host_rows`).
pub fn host_nbd_bench(ios: u64) -> Result<Value, Error> {
    let ios = ios.to_string();
    run_hostbench(&["--nbd", "--json", "--ios", &ios, "--qd", "1,16,128"])
}

fn run_hostbench(args: &[&str]) -> Result<Value, Error> {
    let root = workspace_root();
    let mut cmd = kernel::cargo();
    cmd.args([
        "run",
        "--release",
        "-q",
        "-p",
        "dioxide-hostbench",
        "--target-dir",
    ])
    .arg(root.join("target").join("hostbench"))
    .arg("--")
    .args(args);
    // It exits non-zero when a read failed (or it did not build): say so
    // rather than "building the kernel failed".
    let out = match kernel::run(&mut cmd) {
        Err(Error::Build(stderr)) => {
            return Err(Error::Usage(format!(
                "the host benchmark failed:\n{stderr}"
            )))
        }
        r => r?,
    };
    serde_json::from_slice(&out.stdout).map_err(|e| {
        Error::Usage(format!(
            "host benchmark output: {e}: {}",
            String::from_utf8_lossy(&out.stdout)
        ))
    })
}

fn on_off(v: &Value) -> &'static str {
    if v.as_bool().unwrap_or(false) {
        "on"
    } else {
        "off"
    }
}

/// The NBD host rows (`host_rows` of `bench nbd`) as a table.
pub fn host_nbd_table(rows: &[Value]) -> String {
    let mut s = String::from(
        "host NBD path (real CPU, server side: TCP/IP + NBD + DIO + dxfs against the instant NVMe model)\n  target   qd  csum  mtu  tso   cycles/io    ns/io  allocs/io  frames out/in | receive decode submit complete  reply transmit  stack\n",
    );
    for r in rows {
        let f = |k: &str| r[k].as_f64().unwrap_or(0.0);
        s += &format!(
            "  {:<6} {:>4}  {:<4} {:>4}  {:<3} {:>11.0} {:>8.0} {:>10.3} {:>6.2}/{:<6.2} |",
            r["target"].as_str().unwrap_or("?"),
            f("qd"),
            on_off(&r["csum_offload"]),
            f("mtu"),
            on_off(&r["tso"]),
            f("cycles_per_io"),
            f("ns_per_io"),
            f("allocs_per_io"),
            f("frames_sent_per_io"),
            f("frames_received_per_io"),
        );
        for p in [
            "receive", "decode", "submit", "complete", "reply", "transmit", "stack",
        ] {
            s += &format!(" {:>7.0}", f(&format!("{p}_cycles")));
        }
        s += "\n";
    }
    s
}

/// The host benchmark's threaded rows (`host_threads_rows`) as a table.
pub fn host_threads_table(rows: &[Value]) -> String {
    let mut s = "threads target   CPU cycles/io: mean  worst | TSC cycles/io  allocs/io |  IOPS, all threads  per thread\n".to_string();
    for r in rows {
        let f = |k: &str| r[k].as_f64().unwrap_or(0.0);
        s += &format!(
            "{:7} {:8} {:19.0} {:6.0} | {:13.0} {:10.3} | {:>18} {:>11}\n",
            r["threads"].as_u64().unwrap_or(0),
            r["target"].as_str().unwrap_or(""),
            f("cpu_cycles_per_io"),
            f("cpu_cycles_per_io_max"),
            f("cycles_per_io"),
            f("allocs_per_io"),
            fmt_iops(f("iops")),
            fmt_iops(f("iops_per_thread"))
        );
    }
    s
}

pub fn fmt_iops(x: f64) -> String {
    let n = x.round() as u64;
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// A row's queue depth and configuration: (qd, cpus, dbbuf, ioeventfd),
/// the last three as printed (`-` when the row does not say).
pub type RowKey = (usize, u32, String, String);

/// The [`RowKey`] of `r`.
pub fn row_key(r: &Row) -> RowKey {
    let or_dash = |k: &str| match r.s(k) {
        "" => "-".to_string(),
        v => v.to_string(),
    };
    (
        r.f("qd") as usize,
        r.f("cpus") as u32,
        or_dash("dbbuf"),
        or_dash("ioeventfd"),
    )
}

/// Rows by (op's place in [`OPS`], device, completion), then [`RowKey`],
/// then target.
type Groups<'a> = BTreeMap<(usize, String, String), BTreeMap<RowKey, BTreeMap<String, &'a Row>>>;

/// The table laid out like the upstream one (qd, simple=0, simple=1, gain),
/// with the raw namespace and the file/raw ratio beside it, and which path
/// served the simple=1 reads (requests on the simple path, on the generic
/// path, and simple-path attempts that fell back).
pub fn table(rows: &[Row]) -> String {
    let mut groups: Groups = BTreeMap::new();
    for r in rows {
        groups
            .entry((
                OPS.iter().position(|o| *o == op_of(r)).unwrap_or(OPS.len()),
                r.s("dev").into(),
                r.s("completion").into(),
            ))
            .or_default()
            .entry(row_key(r))
            .or_default()
            .insert(r.s("target").into(), r);
    }
    let mut s = String::new();
    for ((op, dev, comp), by_qd) in groups {
        let op = op_title(OPS.get(op).copied().unwrap_or("read"));
        s += &format!("\ndev={dev} completion={comp}: {op}\n");
        s += "  qd cpus dbbuf ioefd        raw   simple=0   simple=1    gain  file/raw | cycles/io: raw  simple=0  simple=1  simple/raw | p99 us: raw  simple | allocs/io: simple=0 simple=1 | simple=1 path: simple generic fell_back\n";
        for ((qd, cpus, dbbuf, ioefd), t) in by_qd {
            let g = |k: &str, f: &str| t.get(k).map(|r| r.f(f)).unwrap_or(0.0);
            let cpus = if cpus == 0 {
                "-".to_string()
            } else {
                cpus.to_string()
            };
            let (raw, gen, sim) = (g("raw", "iops"), g("generic", "iops"), g("simple", "iops"));
            let gain = if gen > 0.0 {
                (sim - gen) / gen * 100.0
            } else {
                0.0
            };
            let ratio = if raw > 0.0 { sim / raw } else { 0.0 };
            let (cr, cg, cs) = (
                g("raw", "cycles_per_io"),
                g("generic", "cycles_per_io"),
                g("simple", "cycles_per_io"),
            );
            s += &format!(
                "{:4} {:>4} {:>5} {:>5} {:>10} {:>10} {:>10} {:>+6.2}% {:>8.3} | {:>14.0} {:>9.0} {:>9.0} {:>11.3} | {:>11.1} {:>7.1} | {:>18.3} {:>8.3} | {:>19.0} {:>7.0} {:>9.0}\n",
                qd,
                cpus,
                dbbuf,
                ioefd,
                fmt_iops(raw),
                fmt_iops(gen),
                fmt_iops(sim),
                gain,
                ratio,
                cr,
                cg,
                cs,
                if cr > 0.0 { cs / cr } else { 0.0 },
                g("raw", "lat_p99_us"),
                g("simple", "lat_p99_us"),
                g("generic", "allocs_per_io"),
                g("simple", "allocs_per_io"),
                g("simple", "simple_path"),
                g("simple", "generic_path"),
                g("simple", "fell_back")
            );
        }
    }
    s
}

/// The configuration part of a panel title: `cpus=2 dbbuf=1 ioeventfd=0`
/// when the rows hold more than one configuration, else nothing.
pub fn config_title(rows: &[Row]) -> impl Fn(&Row) -> String {
    let key = |r: &Row| {
        let k = row_key(r);
        format!(" cpus={} dbbuf={} ioeventfd={}", k.1, k.2, k.3)
    };
    let mut all: Vec<String> = rows.iter().map(key).collect();
    all.sort();
    all.dedup();
    let several = all.len() > 1;
    move |r: &Row| if several { key(r) } else { String::new() }
}

/// An SVG with one panel per (device, completion, and configuration when
/// there are several): IOPS against queue depth for raw, generic and simple.
pub fn plot(rows: &[Row]) -> String {
    let config = config_title(rows);
    plot_panels(
        rows,
        &|r| {
            format!(
                "{}, dev={} completion={}{}",
                op_title(op_of(r)),
                r.s("dev"),
                r.s("completion"),
                config(r)
            )
        },
        &[
            ("raw", "#444444", "raw namespace"),
            ("generic", "#d62728", "file, simple=0"),
            ("simple", "#1f77b4", "file, simple=1"),
        ],
    )
}

/// One panel per `group(row)` (its title names what the requests do): IOPS
/// against queue depth, a line per `(target, colour, label)` of `series`.
pub fn plot_panels(
    rows: &[Row],
    group: &dyn Fn(&Row) -> String,
    series: &[(&str, &str, &str)],
) -> String {
    let mut groups: BTreeMap<String, Vec<&Row>> = BTreeMap::new();
    for r in rows {
        groups.entry(group(r)).or_default().push(r);
    }
    let (w, ph) = (760.0, 280.0);
    let h = ph * groups.len().max(1) as f64 + 20.0;
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
    );
    for (gi, (title, rs)) in groups.iter().enumerate() {
        let top = 20.0 + gi as f64 * ph;
        let (x0, x1, y0, y1) = (70.0, w - 150.0, top + 20.0, top + ph - 50.0);
        let mut qds: Vec<usize> = rs.iter().map(|r| r.f("qd") as usize).collect();
        qds.sort_unstable();
        qds.dedup();
        let ymax = rs.iter().map(|r| r.f("iops")).fold(1.0, f64::max) * 1.1;
        let xpos = |qd: usize| {
            let i = qds.iter().position(|&q| q == qd).unwrap_or(0) as f64;
            x0 + if qds.len() > 1 {
                i / (qds.len() - 1) as f64 * (x1 - x0)
            } else {
                (x1 - x0) / 2.0
            }
        };
        let ypos = |v: f64| y1 - v / ymax * (y1 - y0);
        s += &format!(
            "<text x=\"{x0}\" y=\"{}\" font-weight=\"bold\">{title}: IOPS</text>\n",
            top + 10.0
        );
        s += &format!("<line x1=\"{x0}\" y1=\"{y1}\" x2=\"{x1}\" y2=\"{y1}\" stroke=\"black\"/><line x1=\"{x0}\" y1=\"{y0}\" x2=\"{x0}\" y2=\"{y1}\" stroke=\"black\"/>\n");
        for k in 0..=4 {
            let v = ymax * k as f64 / 4.0;
            let y = ypos(v);
            s += &format!("<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{}</text><line x1=\"{x0}\" y1=\"{y}\" x2=\"{x1}\" y2=\"{y}\" stroke=\"#eeeeee\"/>\n", x0 - 5.0, y + 4.0, fmt_iops(v));
        }
        for &q in &qds {
            s += &format!(
                "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">qd {q}</text>\n",
                xpos(q),
                y1 + 16.0
            );
        }
        for (li, (t, c, label)) in series.iter().enumerate() {
            let mut pts: Vec<(usize, f64)> = rs
                .iter()
                .filter(|r| r.s("target") == *t)
                .map(|r| (r.f("qd") as usize, r.f("iops")))
                .collect();
            pts.sort_by_key(|p| p.0);
            let path: Vec<String> = pts
                .iter()
                .map(|&(q, v)| format!("{:.1},{:.1}", xpos(q), ypos(v)))
                .collect();
            s += &format!(
                "<polyline fill=\"none\" stroke=\"{c}\" stroke-width=\"2\" points=\"{}\"/>\n",
                path.join(" ")
            );
            for &(q, v) in &pts {
                s += &format!(
                    "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"{c}\"/>\n",
                    xpos(q),
                    ypos(v)
                );
            }
            let ly = y0 + 10.0 + li as f64 * 18.0;
            s += &format!("<line x1=\"{}\" y1=\"{ly}\" x2=\"{}\" y2=\"{ly}\" stroke=\"{c}\" stroke-width=\"2\"/><text x=\"{}\" y=\"{}\">{label}</text>\n", x1 + 10.0, x1 + 30.0, x1 + 35.0, ly + 4.0);
        }
    }
    s += "</svg>\n";
    s
}

/// Runs everything and writes `results.json` and `plot.svg` to `opts.out`.
pub fn local(opts: &LocalOpts) -> Result<i32, Error> {
    std::fs::create_dir_all(&opts.out).map_err(io_err(format!("create {}", opts.out.display())))?;
    let mut rows = Vec::new();
    let mut boots = Vec::new();
    let mut image_path = None;
    if let Some(log) = &opts.from_log {
        let text = std::fs::read(log).map_err(io_err(format!("read {}", log.display())))?;
        let (found, error) = console_rows(&String::from_utf8_lossy(&text));
        if let Some(e) = error {
            return Err(Error::Usage(format!(
                "{}: the kernel's benchmark failed: {e}",
                log.display()
            )));
        }
        if found.is_empty() {
            return Err(Error::Usage(format!(
                "{}: no benchmark rows (lines {{\"bench\":\"row\",...}} printed by a kernel booted with bench.* arguments)",
                log.display()
            )));
        }
        boots.push(json!({"log": log.display().to_string(), "rows": found.len()}));
        rows = found;
    } else {
        let img = image(opts.file_size)?;
        eprintln!("dioxide bench: building the kernel (release)");
        let kernel = kernel::build()?;
        boot_rows(opts, &img, &kernel, &mut rows, &mut boots)?;
        image_path = Some(img.display().to_string());
    }
    let host = if opts.host_ios > 0 && opts.from_log.is_none() {
        eprintln!(
            "dioxide bench: host benchmark ({} I/Os per target: 4 KiB reads, and writes of the raw-write and simple-write rows)",
            opts.host_ios
        );
        Some(host_bench(opts.host_ios, &opts.host_threads)?)
    } else {
        None
    };
    print!("{}", table(&rows));
    for r in rows
        .iter()
        .filter(|r| r.s("target") == "simple" && r.f("fell_back") > 0.0)
    {
        println!(
            "warning: {} dev={} completion={} qd={}: {} simple=1 requests fell back to the generic path",
            op_of(r),
            r.s("dev"),
            r.s("completion"),
            r.s("qd"),
            r.s("fell_back")
        );
    }
    if opts.accel == Accel::Tcg && opts.from_log.is_none() {
        println!(
            "(guest under TCG: in-guest cycles are emulated; see the host rows for real CPU cost)"
        );
    }
    if let Some(h) = &host {
        println!(
            "\nhost: the same crates on this CPU, {} reads in flight, instant controller model ({:.1} ns per I/O, subtracted)",
            h["qd"], h["model_ns_per_io"].as_f64().unwrap_or(0.0)
        );
        println!("target         ns/io  cycles/io  allocs/io  simple_path generic_path fell_back");
        for r in h["host_rows"].as_array().into_iter().flatten() {
            println!(
                "{:12} {:8.1} {:10.0} {:10.3} {:12} {:12} {:9}",
                r["target"].as_str().unwrap_or(""),
                r["ns_per_io"].as_f64().unwrap_or(0.0),
                r["cycles_per_io"].as_f64().unwrap_or(0.0),
                r["allocs_per_io"].as_f64().unwrap_or(0.0),
                r["simple_path"].as_u64().unwrap_or(0),
                r["generic_path"].as_u64().unwrap_or(0),
                r["fell_back"].as_u64().unwrap_or(0)
            );
        }
        let threads = h["host_threads_rows"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        if !threads.is_empty() {
            println!(
                "\nhost, threads side by side (each its own engine, queue and model; CPU cycles: the thread's CPU time, model subtracted)"
            );
            print!("{}", host_threads_table(&threads));
        }
    }
    let results = json!({
        "rows": rows.iter().map(Row::json).collect::<Vec<_>>(),
        "host_rows": host.as_ref().map(|h| h["host_rows"].clone()).unwrap_or(json!([])),
        "host_threads_rows": host
            .as_ref()
            .and_then(|h| h.get("host_threads_rows").cloned())
            .unwrap_or(json!([])),
        "host": host.clone().unwrap_or(json!(null)),
        "config": {
            "accel": if opts.from_log.is_some() { "from a console log" } else { opts.accel.name() },
            "boot": if opts.from_log.is_some() { "from a console log" } else { opts.boot.name() },
            "file_bytes": opts.file_size,
            "secs_per_row": opts.secs,
            "qds": opts.qds,
            "sweep": opts.sweep.json(),
            "image": image_path,
            "boots": boots,
        }
    });
    let json_path = opts.out.join("results.json");
    let text = serde_json::to_string_pretty(&results).map_err(|e| Error::Usage(e.to_string()))?;
    std::fs::write(&json_path, text).map_err(io_err(format!("write {}", json_path.display())))?;
    let svg = opts.out.join("plot.svg");
    std::fs::write(&svg, plot(&rows)).map_err(io_err(format!("write {}", svg.display())))?;
    println!("\nwrote {} and {}", json_path.display(), svg.display());
    Ok(0)
}

/// Boots the kernel once per variant of the sweep and completion mode and
/// collects its rows, each with the variant's `cpus`, `dbbuf` and
/// `ioeventfd` where the kernel did not say.
fn boot_rows(
    opts: &LocalOpts,
    img: &std::path::Path,
    kernel: &std::path::Path,
    rows: &mut Vec<Row>,
    boots: &mut Vec<Value>,
) -> Result<(), Error> {
    for variant in opts.sweep.variants() {
        for comp in &opts.completions {
            let (found, boot) = boot_variant(opts, img, kernel, variant, comp)?;
            rows.extend(found);
            boots.extend(boot);
        }
    }
    Ok(())
}

/// One boot of [`boot_rows`]: its rows and what `config.boots` records.
fn boot_variant(
    opts: &LocalOpts,
    img: &std::path::Path,
    kernel: &std::path::Path,
    variant: Variant,
    comp: &str,
) -> Result<(Vec<Row>, Option<Value>), Error> {
    let qd_list: Vec<String> = opts.qds.iter().map(|q| q.to_string()).collect();
    let devs: Vec<&str> = opts
        .devs
        .iter()
        .map(String::as_str)
        .filter(|d| comp == "poll" || *d == "nvme")
        .collect();
    if devs.is_empty() {
        return Ok((Vec::new(), None));
    }
    let nrows = devs.len() * opts.ops.len() * opts.qds.len() * 3;
    let mut cfg = qemu::Config::new(kernel.to_path_buf());
    cfg.add_disk(img);
    cfg.accel = opts.accel;
    cfg.mem_mib = opts.mem;
    cfg.boot = opts.boot;
    // The same arguments a server's image takes: `bench.*` alone runs it.
    cfg.args = vec![
        "log=warn".into(),
        format!("nvme.completion={comp}"),
        format!("bench.completion={comp}"),
        format!("bench.dev={}", devs.join(",")),
        format!("bench.op={}", opts.ops.join(",")),
        format!("bench.qd={}", qd_list.join(",")),
        format!("bench.secs={}", opts.secs),
    ];
    variant.apply(&mut cfg);
    cfg.timeout = Some(Duration::from_secs(
        nrows as u64 * (opts.secs * 3 + 5) + 120,
    ));
    cfg.echo = true;
    cfg.echo_prefix = Some(r#"{"bench":"running""#);
    eprintln!(
        "dioxide bench: booting ({} rows, {} s each, accel {}, boot {}, completion {comp}, {})",
        nrows,
        opts.secs,
        opts.accel.name(),
        opts.boot.name(),
        variant.label()
    );
    let out = qemu::run(&cfg)?;
    if out.status != 0 {
        return Err(Error::Usage(format!(
            "the guest benchmark failed (status {}):\n{}",
            out.status, out.console
        )));
    }
    let (mut found, _) = console_rows(&out.console);
    for r in &mut found {
        variant.fill(r);
    }
    // How the guest says it was booted (its `{"bench":"file",...}` line),
    // next to how it was asked to be (`config.boot`).
    let file = out
        .console
        .lines()
        .find_map(|l| json_at(l, r#"{"bench":"file""#));
    let said = |k: &str| file.as_ref().map_or(Value::Null, |f| f[k].clone());
    let boot = json!({
        "guest_protocol": said("protocol"),
        "guest_firmware": said("firmware"),
        "completion": comp,
        "devs": devs,
        "cpus": variant.cpus(),
        "dbbuf": variant.dbbuf,
        "ioeventfd": u8::from(variant.ioeventfd.unwrap_or(false)),
        "rows": found.len(),
        "seconds": out.elapsed.as_secs_f64(),
    });
    Ok((found, Some(boot)))
}

/// Comma-separated list parser for the CLI.
pub fn parse_list(s: &str) -> Vec<String> {
    s.split(',')
        .map(|x| x.trim().to_string())
        .filter(|x| !x.is_empty())
        .collect()
}

pub fn default_out() -> PathBuf {
    workspace_root()
        .join("target")
        .join("dioxide")
        .join("bench-local")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_host_nbd_table_has_a_line_per_row_with_its_link_and_phases() {
        let row = serde_json::json!({
            "target": "file", "qd": 16, "csum_offload": true, "mtu": 1500, "tso": true,
            "cycles_per_io": 2534.4, "ns_per_io": 1036.0, "allocs_per_io": 0.0,
            "frames_sent_per_io": 0.12, "frames_received_per_io": 0.19,
            "receive_cycles": 80.0, "decode_cycles": 98.0, "submit_cycles": 321.0,
            "complete_cycles": 135.0, "reply_cycles": 1002.0, "transmit_cycles": 378.0,
            "stack_cycles": 251.0
        });
        let t = host_nbd_table(&[row]);
        let line = t.lines().nth(2).unwrap();
        let words: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(
            words,
            [
                "file",
                "16",
                "on",
                "1500",
                "on",
                "2534",
                "1036",
                "0.000",
                "0.12/0.19",
                "|",
                "80",
                "98",
                "321",
                "135",
                "1002",
                "378",
                "251"
            ],
            "{t}"
        );
    }

    #[test]
    fn rows_are_json_lines_anywhere_in_a_console_line() {
        let console = concat!(
            "[    0.001] INFO boot: dioxide\n",
            "{\"bench\":\"file\",\"bytes\":1073741824}\n",
            "\x1b[0m{\"bench\":\"row\",\"target\":\"simple\",\"dev\":\"nvme\",\"completion\":\"poll\",\"qd\":16,\"iops\":20558,\"allocs_per_io\":0.000}\r\n",
            "{\"bench\":\"row\",\"target\":\"raw\",\"dev\":\"nvme\",\"completion\":\"poll\",\"qd\":16,\"iops\":25459}\n",
            "{\"bench\":\"row\",\"target\":\"raw\",\"qd\":1\n",
            "{\"bench\":\"done\"}\n",
        );
        let (rows, error) = console_rows(console);
        assert_eq!(error, None);
        assert_eq!(rows.len(), 2, "the truncated row is skipped");
        assert_eq!(rows[0].s("target"), "simple");
        assert_eq!(rows[0].f("iops"), 20558.0);
        assert_eq!(rows[0].s("qd"), "16");
        assert!(!rows[0].fields.contains_key("bench"));
        let j = rows[1].json();
        assert_eq!(j["iops"], json!(25459.0));
        assert_eq!(j["qd"], json!(16));
        assert_eq!(j["dev"], json!("nvme"));
    }

    #[test]
    fn sweep_lists() {
        let s = Sweep::parse(Some("1, 2,4"), Some("0,1"), Some("off,on")).unwrap();
        assert_eq!(s.smp, Some(vec![1, 2, 4]));
        assert_eq!(s.dbbuf, Some(vec![0, 1]));
        assert_eq!(s.ioeventfd, Some(vec![false, true]));
        let v = s.variants();
        assert_eq!(v.len(), 12);
        assert_eq!(
            v[0],
            Variant {
                smp: Some(1),
                dbbuf: Some(0),
                ioeventfd: Some(false)
            }
        );
        assert_eq!(
            v[11],
            Variant {
                smp: Some(4),
                dbbuf: Some(1),
                ioeventfd: Some(true)
            }
        );
        // Nothing given: one boot as without the options.
        let none = Sweep::parse(None, None, None).unwrap();
        assert_eq!(
            none.variants(),
            [Variant {
                smp: None,
                dbbuf: None,
                ioeventfd: None
            }]
        );
        assert_eq!(
            none.json(),
            json!({"smp": null, "dbbuf": null, "ioeventfd": null})
        );
        let err = |smp: Option<&str>, dbbuf: Option<&str>, ioe: Option<&str>| {
            Sweep::parse(smp, dbbuf, ioe).unwrap_err().to_string()
        };
        assert_eq!(
            err(Some("0,2"), None, None),
            "--smp 0,2: CPU counts from 1 to 64, comma-separated"
        );
        assert!(err(Some("65"), None, None).starts_with("--smp 65:"));
        assert!(err(Some("two"), None, None).starts_with("--smp two:"));
        assert!(err(Some(""), None, None).starts_with("--smp :"));
        assert_eq!(
            err(None, Some("0,2"), None),
            "--dbbuf 0,2: 0 and/or 1, comma-separated"
        );
        assert_eq!(
            err(None, None, Some("yes")),
            "--ioeventfd yes: 0 and/or 1, comma-separated"
        );
    }

    #[test]
    fn a_variant_sets_the_boot_and_fills_the_rows() {
        let v = Variant {
            smp: Some(2),
            dbbuf: Some(1),
            ioeventfd: Some(true),
        };
        let mut cfg = qemu::Config::new(PathBuf::from("/k"));
        cfg.args = vec!["log=warn".into()];
        v.apply(&mut cfg);
        assert_eq!(cfg.smp, 2);
        assert_eq!(cfg.args, ["log=warn", "smp=2", "nvme.dbbuf=1"]);
        assert!(cfg.nvme_ioeventfd);
        assert_eq!(v.label(), "cpus=2 dbbuf=1 ioeventfd=1");
        // A row without the fields gets them; one from a kernel that says
        // how many CPUs it used keeps its own.
        let mut row = Row::parse(r#"{"bench":"row","target":"raw","qd":16,"iops":100}"#).unwrap();
        v.fill(&mut row);
        let j = row.json();
        assert_eq!(
            (&j["cpus"], &j["dbbuf"], &j["ioeventfd"]),
            (&json!(2), &json!(1), &json!(1))
        );
        let mut own = Row::parse(r#"{"bench":"row","target":"raw","qd":16,"cpus":1}"#).unwrap();
        v.fill(&mut own);
        assert_eq!(own.json()["cpus"], json!(1));
        // The defaults: one CPU, no arguments, dbbuf null (the kernel's).
        let d = Variant {
            smp: None,
            dbbuf: None,
            ioeventfd: None,
        };
        let mut cfg = qemu::Config::new(PathBuf::from("/k"));
        d.apply(&mut cfg);
        assert_eq!((cfg.smp, cfg.args.len(), cfg.nvme_ioeventfd), (1, 0, false));
        let mut row = Row::parse(r#"{"bench":"row","target":"raw","qd":1}"#).unwrap();
        d.fill(&mut row);
        let j = row.json();
        assert_eq!(
            (&j["cpus"], &j["dbbuf"], &j["ioeventfd"]),
            (&json!(1), &Value::Null, &json!(0))
        );
        assert_eq!(d.label(), "cpus=1 dbbuf=default ioeventfd=0");
    }

    #[test]
    fn the_table_has_a_line_per_queue_depth_and_configuration() {
        let row = |t: &str, qd: u32, cpus: u32, iops: u32| {
            let mut r = Row::parse(&format!(
                r#"{{"bench":"row","target":"{t}","dev":"nvme","completion":"poll","qd":{qd},"iops":{iops}}}"#
            ))
            .unwrap();
            Variant {
                smp: Some(cpus),
                dbbuf: None,
                ioeventfd: None,
            }
            .fill(&mut r);
            r
        };
        let rows = [
            row("raw", 16, 2, 2000),
            row("raw", 16, 1, 1000),
            row("simple", 16, 2, 1800),
            row("raw", 1, 1, 100),
        ];
        let t = table(&rows);
        let lines: Vec<&str> = t.lines().filter(|l| !l.is_empty()).collect();
        assert_eq!(lines[0], "dev=nvme completion=poll: 4K random reads");
        assert!(
            lines[1].starts_with("  qd cpus dbbuf ioefd        raw "),
            "{t}"
        );
        assert_eq!(lines.len(), 5, "{t}");
        assert!(
            lines[2].starts_with("   1    1     -     0        100 "),
            "{t}"
        );
        assert!(
            lines[3].starts_with("  16    1     -     0      1,000 "),
            "{t}"
        );
        assert!(
            lines[4].starts_with("  16    2     -     0      2,000          0      1,800 "),
            "{t}"
        );
        // Several configurations: a panel each.
        let title = config_title(&rows);
        assert_eq!(title(&rows[0]), " cpus=2 dbbuf=- ioeventfd=0");
        assert!(plot(&rows).contains("dev=nvme completion=poll cpus=1 dbbuf=- ioeventfd=0"));
        let one = config_title(&rows[1..2]);
        assert_eq!(one(&rows[1]), "");
    }

    #[test]
    fn writes_have_sections_of_their_own_after_the_reads() {
        let row = |op: &str, t: &str, iops: u32| {
            Row::parse(&format!(
                r#"{{"bench":"row","target":"{t}","op":"{op}","dev":"nvme","completion":"poll","qd":16,"cpus":1,"iops":{iops}}}"#
            ))
            .unwrap()
        };
        // A log from a kernel without `op` (reads) and write rows.
        let mut old = row("read", "raw", 500);
        old.fields.remove("op");
        let rows = [
            row("write-fua", "raw", 300),
            row("write", "raw", 900),
            row("write", "simple", 880),
            old,
        ];
        let t = table(&rows);
        let titles: Vec<&str> = t.lines().filter(|l| l.starts_with("dev=")).collect();
        assert_eq!(
            titles,
            [
                "dev=nvme completion=poll: 4K random reads",
                "dev=nvme completion=poll: 4K random writes (overwrites)",
                "dev=nvme completion=poll: 4K random writes with FUA (overwrites)",
            ],
            "{t}"
        );
        assert!(t.contains("     900          0        880 "), "{t}");
        let svg = plot(&rows);
        assert!(svg.contains("4K random writes with FUA (overwrites), dev=nvme"));
        assert!(svg.contains("4K random reads, dev=nvme"));
    }

    #[test]
    fn the_host_threads_table() {
        let rows: Vec<Value> = [
            r#"{"threads":1,"target":"simple","cpu_cycles_per_io":157.0,"cpu_cycles_per_io_max":157.0,"cycles_per_io":159.0,"cycles_per_io_max":159.0,"ns_per_io":65.2,"allocs_per_io":0.000,"model_cycles_per_io":26.0,"iops":13136246,"iops_per_thread":13136246}"#,
            r#"{"threads":2,"target":"simple","cpu_cycles_per_io":170.0,"cpu_cycles_per_io_max":177.0,"cycles_per_io":187.0,"cycles_per_io_max":204.0,"ns_per_io":76.5,"allocs_per_io":0.000,"model_cycles_per_io":26.0,"iops":21611280,"iops_per_thread":11782963}"#,
        ]
        .iter()
        .map(|s| serde_json::from_str(s).unwrap())
        .collect();
        let t = host_threads_table(&rows);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3, "{t}");
        assert!(
            lines[0].starts_with("threads target   CPU cycles/io"),
            "{t}"
        );
        assert_eq!(
            lines[2],
            "      2 simple                   170    177 |           187      0.000 |         21,611,280  11,782,963"
        );
    }

    #[test]
    fn the_kernels_error_line_is_reported() {
        let (rows, error) =
            console_rows("{\"bench\":\"error\",\"message\":\"nvme0n1 holds no \\\"dxfs\\\"\"}\n");
        assert!(rows.is_empty());
        assert_eq!(error.as_deref(), Some("nvme0n1 holds no \"dxfs\""));
    }
}
