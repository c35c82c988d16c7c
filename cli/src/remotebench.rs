//! `dioxide bench nbd --remote nbd://HOST[:PORT]`: the rows of `bench nbd`
//! (fio's `nbd` engine, 4K random reads at each queue depth) against an
//! appliance already running elsewhere — a server booted from the ISO, or a
//! `dioxide run` on another machine — and against any other NBD server the
//! user names (`--peer URI`, repeatable: qemu-nbd or nbd-server on that
//! network). Nothing is booted here.
//!
//! The appliance's exports are taken from its list (`nbdinfo --list
//! --json`) by the names the kernel gives them (`kernel/src/net/nbd.rs`):
//! the raw namespace `nvme0n1` (else the first `nvme<C>n<N>`), `null`
//! (served when the appliance was booted with `nbd.null=1`), and as the
//! file `bench.bin` when there is one, else the largest other export. At
//! each queue depth the targets take turns for `--rounds` rounds, as in
//! `bench nbd`. The table, `results.json` and `plot.svg` are those of
//! `bench nbd`, with `net=remote` rows that carry the URI each read; the
//! server's CPU time and frame counts, which a booted appliance's process
//! and console give, are not known here and are left out.

use crate::bench::{fmt_iops, plot_panels, Row};
use crate::nbdbench::{fio, mean_of, table, version, FioResult, TARGETS};
use crate::{io_err, Error};
use serde_json::{json, Value};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The NBD port when a URI names none.
pub const DEFAULT_PORT: u16 = 10809;

/// How long a server may take to accept a TCP connection.
const CONNECT_WITHIN: Duration = Duration::from_secs(10);

/// How long the appliance may take to list its exports: libnbd asks about
/// each export in turn, which behind QEMU's user networking costs 0.2 s an
/// export (README, "Listing many exports").
const LIST_WITHIN: Duration = Duration::from_secs(600);

/// The smallest export fio's 4K reads can use.
const MIN_EXPORT: u64 = 4096;

/// What `dioxide bench nbd --remote` was asked.
pub struct RemoteOpts {
    /// The appliance, `nbd://HOST[:PORT]` as given.
    pub remote: String,
    /// Other NBD servers, as URIs with their export.
    pub peers: Vec<String>,
    pub qds: Vec<usize>,
    pub jobs: usize,
    pub secs: u64,
    /// Each row's time is split into this many rounds, the targets taking
    /// turns.
    pub rounds: u64,
    /// Which of the appliance's exports: `file`, `raw`, `null`.
    pub targets: Vec<&'static str>,
    pub out: PathBuf,
    /// Reads per row of the host benchmark of the request path (this
    /// machine's CPU, not the appliance's); 0 leaves it out.
    pub host_ios: u64,
}

/// An NBD server's TCP address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub host: String,
    pub port: u16,
}

impl Endpoint {
    /// `host:port`, an IPv6 address in brackets.
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    pub fn url(&self) -> String {
        format!("nbd://{}", self.authority())
    }

    /// The URI of export `name` (percent-encoded, RFC 3986 path).
    pub fn export_uri(&self, name: &str) -> String {
        let path: String = name
            .bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' | b'/' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect();
        format!("{}/{path}", self.url())
    }
}

/// `HOST[:PORT]` at the start of `s` (after the scheme), and the rest (from
/// the first `/` or `?`).
fn parse_authority(s: &str) -> Result<(Endpoint, &str), String> {
    let end = s.find(['/', '?']).unwrap_or(s.len());
    let (auth, rest) = s.split_at(end);
    if auth.contains('@') {
        return Err("a user name is not taken".into());
    }
    let (host, port) = match auth.strip_prefix('[') {
        Some(v6) => {
            let (h, after) = v6
                .split_once(']')
                .ok_or("an IPv6 address without its closing `]`")?;
            match after.strip_prefix(':') {
                Some(p) => (h, Some(p)),
                None if after.is_empty() => (h, None),
                None => return Err(format!("{after:?} after the IPv6 address")),
            }
        }
        None => match auth.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (auth, None),
        },
    };
    if host.is_empty() {
        return Err("no host".into());
    }
    let port = match port {
        None => DEFAULT_PORT,
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|&p| p > 0)
            .ok_or_else(|| format!("port {p:?} is not a port number (1 to 65535)"))?,
    };
    Ok((
        Endpoint {
            host: host.into(),
            port,
        },
        rest,
    ))
}

/// `--remote`: `nbd://HOST[:PORT]` (port 10809 by default), the appliance
/// itself, not one of its exports.
pub fn parse_remote(uri: &str) -> Result<Endpoint, Error> {
    let bad = |why: &str| {
        Error::Usage(format!(
            "--remote {uri}: {why}; expected nbd://HOST[:PORT] (the appliance's address; port {DEFAULT_PORT} when none is given)"
        ))
    };
    let rest = uri
        .strip_prefix("nbd://")
        .ok_or_else(|| bad("not an nbd:// URI"))?;
    let (ep, path) = parse_authority(rest).map_err(|w| bad(&w))?;
    if !(path.is_empty() || path == "/") {
        return Err(bad(
            "it names an export, but the exports are picked from the appliance's list (to benchmark one export of your choice, give its URI as a --peer)",
        ));
    }
    Ok(ep)
}

/// `--peer`: any NBD URI libnbd takes (fio's engine hands it to
/// `nbd_connect_uri`): for `nbd://` and `nbds://` its TCP address, checked
/// before the run; `None` for a Unix socket or vsock URI.
pub fn parse_peer(uri: &str) -> Result<Option<Endpoint>, Error> {
    for scheme in ["nbd://", "nbds://"] {
        if let Some(rest) = uri.strip_prefix(scheme) {
            return parse_authority(rest)
                .map(|(ep, _)| Some(ep))
                .map_err(|why| Error::Usage(format!("--peer {uri}: {why}")));
        }
    }
    if [
        "nbd+unix://",
        "nbds+unix://",
        "nbd+vsock://",
        "nbds+vsock://",
    ]
    .iter()
    .any(|s| uri.starts_with(s))
    {
        return Ok(None);
    }
    Err(Error::Usage(format!(
        "--peer {uri}: not an NBD URI; expected nbd://HOST[:PORT][/EXPORT] (or nbd+unix:///EXPORT?socket=PATH)"
    )))
}

/// Whether something accepts a TCP connection at `ep`, within
/// [`CONNECT_WITHIN`]; the error says why not in words. `what` names the
/// option that gave it.
pub fn reach(ep: &Endpoint, what: &str) -> Result<(), Error> {
    let fail = |why: String| Error::Usage(format!("{what} {}: {why}", ep.url()));
    let addrs: Vec<SocketAddr> = (ep.host.as_str(), ep.port)
        .to_socket_addrs()
        .map_err(|e| fail(format!("cannot resolve {}: {e}", ep.host)))?
        .collect();
    let mut last = None;
    for a in &addrs {
        match TcpStream::connect_timeout(a, CONNECT_WITHIN) {
            Ok(_) => return Ok(()),
            Err(e) => last = Some((a, e)),
        }
    }
    let Some((a, e)) = last else {
        return Err(fail(format!("{} has no address", ep.host)));
    };
    let why = match e.kind() {
        std::io::ErrorKind::ConnectionRefused => {
            "connection refused: nothing listens on that port (is the appliance up, and is that its NBD port?)".to_string()
        }
        std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock => format!(
            "no answer within {} s (the host is down or unreachable, or a firewall drops the connection)",
            CONNECT_WITHIN.as_secs()
        ),
        _ => e.to_string(),
    };
    Err(fail(format!("cannot connect to {a}: {why}")))
}

/// One export of a list: its name and size in bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Export {
    pub name: String,
    pub size: u64,
}

/// The exports of `nbdinfo --json` or `nbdinfo --list --json` output.
pub fn parse_exports(text: &str) -> Result<Vec<Export>, String> {
    let v: Value = serde_json::from_str(text).map_err(|e| format!("not JSON ({e})"))?;
    let list = v["exports"]
        .as_array()
        .ok_or("no \"exports\" in nbdinfo's JSON")?;
    list.iter()
        .map(|e| {
            Ok(Export {
                name: e["export-name"]
                    .as_str()
                    .ok_or("an export without \"export-name\"")?
                    .to_string(),
                size: e["export-size"]
                    .as_u64()
                    .ok_or("an export without \"export-size\"")?,
            })
        })
        .collect()
}

/// Whether `name` is a raw namespace as the appliance names them:
/// `nvme<C>n<N>`.
pub fn is_raw(name: &str) -> bool {
    let Some(rest) = name.strip_prefix("nvme") else {
        return false;
    };
    let Some((c, n)) = rest.split_once('n') else {
        return false;
    };
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    digits(c) && digits(n)
}

/// The export of `kind` (`file`, `raw` or `null`) in the appliance's list:
/// `nvme0n1`, else the first raw namespace; `null`; `bench.bin` (what `bench
/// nbd` serves), else the largest file. Exports too small for a 4K read
/// are not picked.
pub fn pick<'a>(exports: &'a [Export], kind: &str) -> Option<&'a Export> {
    let big = || exports.iter().filter(|e| e.size >= MIN_EXPORT);
    let file = |e: &&Export| e.name != "null" && !is_raw(&e.name);
    match kind {
        "raw" => big()
            .find(|e| e.name == "nvme0n1")
            .or_else(|| big().find(|e| is_raw(&e.name))),
        "null" => big().find(|e| e.name == "null"),
        _ => big()
            .filter(file)
            .find(|e| e.name == "bench.bin")
            .or_else(|| big().filter(file).max_by_key(|e| e.size)),
    }
}

/// The error for a kind of export the appliance does not have: what it has
/// instead, and how to leave the kind out.
fn missing(ep: &Endpoint, kind: &str, exports: &[Export], targets: &[&str]) -> Error {
    let why = match kind {
        "null" => " (the appliance serves one when booted with the kernel argument nbd.null=1)",
        "raw" => " (a namespace, nvme<C>n<N>: is this a dioxide appliance?)",
        _ => " (a file export of at least 4 KiB)",
    };
    const SHOWN: usize = 20;
    let mut names: Vec<String> = exports
        .iter()
        .take(SHOWN)
        .map(|e| format!("{:?} ({} bytes)", e.name, e.size))
        .collect();
    if exports.len() > SHOWN {
        names.push(format!("and {} more", exports.len() - SHOWN));
    }
    let others: Vec<&str> = targets.iter().copied().filter(|t| *t != kind).collect();
    let leave_out = if others.is_empty() {
        String::new()
    } else {
        format!("; leave it out with --targets {}", others.join(","))
    };
    Error::Usage(format!(
        "{} has no {kind} export{why}; its {} export(s): {}{leave_out}",
        ep.url(),
        exports.len(),
        if names.is_empty() {
            "none".to_string()
        } else {
            names.join(", ")
        }
    ))
}

/// Runs `cmd` with its output captured, killed after `limit` (then `None`).
fn output_within(
    cmd: &mut Command,
    limit: Duration,
    program: &str,
    hint: &'static str,
) -> Result<Option<Output>, Error> {
    crate::qemu::die_with_parent(cmd);
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| Error::Spawn {
            program: program.into(),
            hint,
            source,
        })?;
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(limit) {
        Ok(out) => out.map(Some).map_err(io_err(format!("wait for {program}"))),
        Err(_) => {
            // The waiting thread reaps it once it is gone.
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
            Ok(None)
        }
    }
}

/// `nbdinfo [--list] --json uri`: the exports, or the reason why not.
fn nbdinfo(uri: &str, list: bool, what: &str) -> Result<Vec<Export>, Error> {
    let mut cmd = Command::new("nbdinfo");
    if list {
        cmd.arg("--list");
    }
    cmd.args(["--json", uri]);
    let out = output_within(
        &mut cmd,
        LIST_WITHIN,
        "nbdinfo",
        "apt-get install libnbd-bin",
    )?
    .ok_or_else(|| {
        Error::Usage(format!(
            "{what} {uri}: nbdinfo did not finish within {} s (is it an NBD server?)",
            LIST_WITHIN.as_secs()
        ))
    })?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(Error::Usage(format!(
            "{what} {uri}: not served: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    parse_exports(&stdout).map_err(|why| Error::Usage(format!("{what} {uri}: nbdinfo: {why}")))
}

/// One target of the run: a row's `target`, the URI fio reads, the export
/// (the appliance's) and the bytes read over.
struct Target {
    name: String,
    uri: String,
    export: Option<String>,
    size: u64,
}

/// Finds the appliance's exports and the peers' sizes: the targets, or the
/// first reason one cannot be benchmarked.
fn targets(opts: &RemoteOpts, ep: &Endpoint) -> Result<(Vec<Target>, usize), Error> {
    reach(ep, "--remote")?;
    let exports = nbdinfo(&ep.url(), true, "--remote")?;
    let mut out = Vec::new();
    for &kind in &opts.targets {
        let e = pick(&exports, kind).ok_or_else(|| missing(ep, kind, &exports, &opts.targets))?;
        out.push(Target {
            name: kind.into(),
            uri: ep.export_uri(&e.name),
            export: Some(e.name.clone()),
            size: e.size,
        });
    }
    for (i, p) in opts.peers.iter().enumerate() {
        if let Some(pe) = parse_peer(p)? {
            reach(&pe, "--peer")?;
        }
        let size = nbdinfo(p, false, "--peer")?.first().map_or(0, |e| e.size);
        if size < MIN_EXPORT {
            return Err(Error::Usage(format!(
                "--peer {p}: the export holds {size} bytes, less than one 4K read"
            )));
        }
        out.push(Target {
            name: format!("peer{}", i + 1),
            uri: p.clone(),
            export: None,
            size,
        });
    }
    Ok((out, exports.len()))
}

/// Plot colours of the peers, in turn.
const PEER_COLOURS: [&str; 6] = [
    "#d62728", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf",
];

/// Runs the benchmark and writes the table (stdout), `results.json` and
/// `plot.svg` to `opts.out`.
pub fn remote(opts: &RemoteOpts) -> Result<i32, Error> {
    let ep = parse_remote(&opts.remote)?;
    for p in &opts.peers {
        parse_peer(p)?;
    }
    let fio_version = version("fio", "--version");
    if fio_version.is_empty() {
        return Err(Error::Usage(
            "fio not found: apt-get install fio (./dx installs it)".into(),
        ));
    }
    std::fs::create_dir_all(&opts.out).map_err(io_err(format!("create {}", opts.out.display())))?;
    let (targets, listed) = targets(opts, &ep)?;
    eprintln!(
        "dioxide bench: {} lists {listed} exports; reading {}",
        ep.url(),
        targets
            .iter()
            .map(|t| format!("{} {} ({} bytes)", t.name, t.uri, t.size))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let mut rows = Vec::new();
    let slice = (opts.secs / opts.rounds).max(1);
    for &qd in &opts.qds {
        // Per target: fio's result of each round and the wall time.
        let mut acc: Vec<(Vec<FioResult>, f64)> =
            targets.iter().map(|_| (Vec::new(), 0.0)).collect();
        for _ in 0..opts.rounds {
            for (t, a) in targets.iter().zip(acc.iter_mut()) {
                let t0 = Instant::now();
                // 4K reads over the export, to its last whole 4 KiB.
                let r = fio(&t.uri, qd, opts.jobs, slice, t.size / 4096 * 4096)?;
                a.0.push(r);
                a.1 += t0.elapsed().as_secs_f64();
            }
        }
        for (t, (rs, wall)) in targets.iter().zip(&acc) {
            let r = mean_of(rs);
            eprintln!(
                "  remote qd={qd:<4} {:<9} {:>9} IOPS  p50 {:>7.0} us  p99 {:>7.0} us",
                t.name,
                fmt_iops(r.iops),
                r.p50_us,
                r.p99_us
            );
            let mut fields = vec![
                ("target", t.name.clone()),
                ("net", "remote".into()),
                ("qd", qd.to_string()),
                ("jobs", opts.jobs.to_string()),
                ("rounds", opts.rounds.to_string()),
                ("wall_secs", format!("{wall:.2}")),
                ("uri", t.uri.clone()),
            ];
            fields.extend(r.fields());
            let mut row = Row::new(&fields);
            if let Some(e) = &t.export {
                row.fields.insert("export".into(), e.clone());
            }
            rows.push(row);
        }
    }
    print!("{}", table(&rows, opts.jobs, opts.secs));
    let host_rows = if opts.host_ios > 0 {
        eprintln!(
            "dioxide bench: host benchmark of the NBD request path on this machine ({} reads per row)",
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
            "remote": ep.url(),
            "exports_listed": listed,
            "targets": targets.iter().map(|t| json!({
                "target": t.name,
                "uri": t.uri,
                "export": t.export,
                "bytes": t.size,
            })).collect::<Vec<_>>(),
            "secs_per_row": opts.secs,
            "rounds": opts.rounds,
            "jobs": opts.jobs,
            "qds": opts.qds,
            "fio": fio_version,
            "nbdinfo": version("nbdinfo", "--version"),
        }
    });
    let json_path = opts.out.join("results.json");
    let text = serde_json::to_string_pretty(&results).map_err(|e| Error::Usage(e.to_string()))?;
    std::fs::write(&json_path, text).map_err(io_err(format!("write {}", json_path.display())))?;
    let mut series: Vec<(String, String, String)> = TARGETS[..3]
        .iter()
        .map(|(t, c, l)| (t.to_string(), c.to_string(), l.to_string()))
        .collect();
    for (i, t) in targets.iter().filter(|t| t.export.is_none()).enumerate() {
        series.push((
            t.name.clone(),
            PEER_COLOURS[i % PEER_COLOURS.len()].into(),
            format!("{} ({})", t.name, t.uri),
        ));
    }
    let series: Vec<(&str, &str, &str)> = series
        .iter()
        .map(|(t, c, l)| (t.as_str(), c.as_str(), l.as_str()))
        .collect();
    let svg = opts.out.join("plot.svg");
    let title = format!("4K random reads, NBD, net=remote {}", ep.url());
    std::fs::write(&svg, plot_panels(&rows, &|_| title.clone(), &series))
        .map_err(io_err(format!("write {}", svg.display())))?;
    println!("\nwrote {} and {}", json_path.display(), svg.display());
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remote_uris_take_a_host_and_an_optional_port_and_nothing_else() {
        let ep = |h: &str, p| Endpoint {
            host: h.into(),
            port: p,
        };
        assert_eq!(
            parse_remote("nbd://192.168.1.20").unwrap(),
            ep("192.168.1.20", 10809)
        );
        assert_eq!(
            parse_remote("nbd://server.lan:20809/").unwrap(),
            ep("server.lan", 20809)
        );
        assert_eq!(parse_remote("nbd://[::1]:7000").unwrap(), ep("::1", 7000));
        assert_eq!(
            parse_remote("nbd://[fe80::1]").unwrap().url(),
            "nbd://[fe80::1]:10809"
        );
        for (bad, why) in [
            ("192.168.1.20:10809", "not an nbd:// URI"),
            ("nbds://host", "not an nbd:// URI"),
            ("nbd://", "no host"),
            ("nbd://:10809", "no host"),
            ("nbd://host:0", "port \"0\" is not a port number"),
            ("nbd://host:http", "port \"http\" is not a port number"),
            ("nbd://host:65536", "port \"65536\" is not a port number"),
            ("nbd://host/bench.bin", "it names an export"),
            ("nbd://host?tls=on", "it names an export"),
            ("nbd://[::1", "closing `]`"),
            ("nbd://user@host", "a user name is not taken"),
        ] {
            let e = parse_remote(bad).unwrap_err().to_string();
            assert!(e.starts_with(&format!("--remote {bad}: ")), "{e}");
            assert!(e.contains(why), "{bad}: {e}");
            assert!(e.contains("expected nbd://HOST[:PORT]"), "{e}");
        }
    }

    #[test]
    fn peers_are_any_nbd_uri_and_tcp_ones_give_their_address() {
        assert_eq!(
            parse_peer("nbd://10.0.0.5:10810/disk").unwrap(),
            Some(Endpoint {
                host: "10.0.0.5".into(),
                port: 10810
            })
        );
        assert_eq!(
            parse_peer("nbd+unix:///?socket=/tmp/nbd.sock").unwrap(),
            None
        );
        let e = parse_peer("http://host/").unwrap_err().to_string();
        assert!(e.contains("--peer http://host/: not an NBD URI"), "{e}");
        let e = parse_peer("nbd://host:x/a").unwrap_err().to_string();
        assert!(e.contains("port \"x\""), "{e}");
    }

    #[test]
    fn export_uris_are_percent_encoded() {
        let ep = parse_remote("nbd://h:1").unwrap();
        assert_eq!(
            ep.export_uri("nvme1n1/my photos/ä.jpg"),
            "nbd://h:1/nvme1n1/my%20photos/%C3%A4.jpg"
        );
    }

    /// nbdinfo 1.14's `--list --json` as it printed it for qemu-nbd.
    const LIST: &str = r#"{
"protocol": "newstyle-fixed",
"TLS": false,
"structured": true,
"exports": [
	{
	"export-name": "data/a.bin",
	"uri": "nbd://127.0.0.1:20809/data/a.bin",
	"is_read_only": true,
	"block_size_minimum": 1,
	"export-size": 16777216,
	"export-size-str": "16M"
	},
	{
	"export-name": "nvme0n1",
	"export-size": 67108864
	} ]
}"#;

    #[test]
    fn the_export_list_is_read_from_nbdinfo_json() {
        assert_eq!(
            parse_exports(LIST).unwrap(),
            [
                Export {
                    name: "data/a.bin".into(),
                    size: 16 << 20
                },
                Export {
                    name: "nvme0n1".into(),
                    size: 64 << 20
                }
            ]
        );
        assert!(parse_exports("nbdinfo: oops").is_err());
        assert!(parse_exports(r#"{"exports":[{"export-name":"x"}]}"#)
            .unwrap_err()
            .contains("export-size"));
    }

    #[test]
    fn exports_are_picked_by_the_names_the_appliance_gives() {
        let list = |names: &[(&str, u64)]| -> Vec<Export> {
            names
                .iter()
                .map(|(n, s)| Export {
                    name: n.to_string(),
                    size: *s,
                })
                .collect()
        };
        let all = list(&[
            ("README", 900),
            ("big.iso", 5 << 20),
            ("nvme1n1/other.bin", 9 << 20),
            ("bench.bin", 1 << 20),
            ("nvme1n1", 1 << 30),
            ("nvme0n1", 1 << 30),
            ("null", 1 << 30),
        ]);
        let name = |k| pick(&all, k).map(|e| e.name.as_str());
        assert_eq!(name("file"), Some("bench.bin"));
        assert_eq!(name("raw"), Some("nvme0n1"));
        assert_eq!(name("null"), Some("null"));
        // No bench.bin: the largest file; no nvme0n1: the first namespace;
        // files under 4 KiB are not read.
        let some = list(&[
            ("README", 900),
            ("big.iso", 5 << 20),
            ("nvme1n1/other.bin", 9 << 20),
            ("nvme1n1", 1 << 30),
        ]);
        let name = |k| pick(&some, k).map(|e| e.name.as_str());
        assert_eq!(name("file"), Some("nvme1n1/other.bin"));
        assert_eq!(name("raw"), Some("nvme1n1"));
        assert_eq!(name("null"), None);
        assert_eq!(pick(&list(&[("README", 900)]), "file"), None);
        for (n, raw) in [
            ("nvme0n1", true),
            ("nvme12n3", true),
            ("nvme0n1/a", false),
            ("nvmen1", false),
            ("nvme0n", false),
            ("xnvme0n1", false),
        ] {
            assert_eq!(is_raw(n), raw, "{n}");
        }
        // The error says what there is and how to leave the kind out.
        let ep = parse_remote("nbd://h").unwrap();
        let e = missing(&ep, "null", &some, &["file", "raw", "null"]).to_string();
        assert_eq!(
            e,
            "nbd://h:10809 has no null export (the appliance serves one when booted with the kernel argument nbd.null=1); its 4 export(s): \"README\" (900 bytes), \"big.iso\" (5242880 bytes), \"nvme1n1/other.bin\" (9437184 bytes), \"nvme1n1\" (1073741824 bytes); leave it out with --targets file,raw"
        );
    }

    #[test]
    fn a_port_nobody_listens_on_is_refused_in_words() {
        // A port that was free a moment ago.
        let port = crate::nbdbench::free_port().unwrap();
        let ep = Endpoint {
            host: "127.0.0.1".into(),
            port,
        };
        let e = reach(&ep, "--remote").unwrap_err().to_string();
        assert!(
            e.starts_with(&format!(
                "--remote nbd://127.0.0.1:{port}: cannot connect to 127.0.0.1:{port}: connection refused"
            )),
            "{e}"
        );
    }
}
