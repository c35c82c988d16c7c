//! `dioxide bench nbd` run the way a user runs it, in its smallest form: one
//! queue depth, one round of one second per target, QEMU user networking.
//! It boots the appliance under TCG and runs fio against the file, raw and
//! null exports and against qemu-nbd on the host; the test checks the table
//! it prints and the rows of results.json (not the figures: a benchmark is
//! never a timing test, but every target must have done reads).

use serde_json::Value;
use std::io::Read;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const TARGETS: [&str; 4] = ["file", "raw", "null", "qemu-nbd"];

/// Runs `dioxide args...`, killed after `limit`; (exit code, stdout, stderr).
fn dioxide(args: &[&str], limit: Duration) -> (Option<i32>, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_dioxide"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run dioxide");
    let collect = |mut pipe: Box<dyn Read + Send>| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let b = buf.clone();
        let t = std::thread::spawn(move || {
            let mut chunk = [0u8; 4096];
            while let Ok(n) = pipe.read(&mut chunk) {
                if n == 0 {
                    break;
                }
                b.lock().unwrap().extend_from_slice(&chunk[..n]);
            }
        });
        (buf, t)
    };
    let (out, t_out) = collect(Box::new(child.stdout.take().unwrap()));
    let (err, t_err) = collect(Box::new(child.stderr.take().unwrap()));
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait for dioxide") {
            break s.code();
        }
        if t0.elapsed() > limit {
            // Its QEMU and qemu-nbd die with it (PR_SET_PDEATHSIG).
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let _ = (t_out.join(), t_err.join());
    let text = |b: &Arc<Mutex<Vec<u8>>>| String::from_utf8_lossy(&b.lock().unwrap()).into_owned();
    (status, text(&out), text(&err))
}

#[test]
fn bench_nbd_in_its_smallest_form_writes_table_and_json() {
    let dir = dioxide::workspace_root()
        .join("target")
        .join("test-tmp")
        .join(format!("bench-nbd-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let t0 = Instant::now();
    let (status, stdout, stderr) = dioxide(
        &[
            "bench",
            "nbd",
            "--qd",
            "1",
            "--secs",
            "1",
            "--rounds",
            "1",
            "--jobs",
            "1",
            "--net",
            "user",
            "--file-size",
            "8M",
            "--accel",
            "tcg",
            "--mem",
            "256",
            "--out",
            dir.to_str().unwrap(),
        ],
        Duration::from_secs(300),
    );
    let all = format!("stdout:\n{stdout}\nstderr:\n{stderr}");
    assert_eq!(status, Some(0), "{all}");
    eprintln!("bench nbd took {:.1} s", t0.elapsed().as_secs_f64());

    // The table: one network mode, a header naming every target, one line
    // for queue depth 1 with a figure (not "-") for each, and the ratios.
    assert!(
        stdout.contains(
            "net=user: fio --ioengine=nbd, 4K random reads, 1 job(s), 1 s per row; IOPS (p50/p99 latency us)"
        ),
        "{all}"
    );
    let header = stdout
        .lines()
        .find(|l| l.trim_start().starts_with("qd "))
        .unwrap_or_else(|| panic!("no table header\n{all}"));
    let cols: Vec<&str> = header.split_whitespace().collect();
    assert_eq!(
        cols,
        [
            "qd",
            "file",
            "raw",
            "null",
            "qemu-nbd",
            "file/raw",
            "file/qemu-nbd"
        ],
        "{all}"
    );
    let line = stdout
        .lines()
        .find(|l| l.trim_start().starts_with("1 "))
        .unwrap_or_else(|| panic!("no qd 1 line\n{all}"));
    // "1  12,345 (80/120)  ...  0.950  0.400": 4 cells of IOPS (p50/p99).
    let cells: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(cells.len(), 1 + 4 * 2 + 2, "{line}");
    for i in 0..4 {
        let iops: u64 = cells[1 + 2 * i].replace(',', "").parse().expect(line);
        assert!(iops > 0, "{} in {line}", TARGETS[i]);
        assert!(cells[2 + 2 * i].starts_with('('), "{line}");
    }
    for ratio in &cells[9..] {
        assert!(ratio.parse::<f64>().expect(line) > 0.0, "{line}");
    }
    assert!(
        stdout.contains("host CPU per I/O (us, server process incl. its vCPU thread): file "),
        "{all}"
    );

    // results.json: a row per target, with the fields the README lists.
    let json: Value =
        serde_json::from_slice(&std::fs::read(dir.join("results.json")).expect("results.json"))
            .expect("results.json is JSON");
    let rows = json["rows"].as_array().expect("rows");
    // Reads of every target; writes (the default `--op read,write`) of all
    // but the null export, which takes none.
    for (op, want) in [
        ("read", TARGETS.to_vec()),
        ("write", vec!["file", "raw", "qemu-nbd"]),
    ] {
        let mut targets: Vec<&str> = rows
            .iter()
            .filter(|r| r["op"] == op)
            .map(|r| r["target"].as_str().unwrap())
            .collect();
        targets.sort_unstable();
        let mut want = want;
        want.sort_unstable();
        assert_eq!(targets, want, "{op}: {json:#}");
    }
    assert!(
        stdout.contains("net=user: fio --ioengine=nbd, 4K random writes, 1 job(s)"),
        "{all}"
    );
    for r in rows {
        assert_eq!(r["net"], "user", "{r}");
        assert_eq!(r["qd"].as_u64(), Some(1), "{r}");
        assert_eq!(r["jobs"].as_u64(), Some(1), "{r}");
        assert_eq!(r["rounds"].as_u64(), Some(1), "{r}");
        assert!(r["iops"].as_f64().unwrap() > 0.0, "{r}");
        assert!(r["ios"].as_u64().unwrap() > 0, "{r}");
        for k in [
            "lat_p50_us",
            "lat_p99_us",
            "lat_mean_us",
            "server_cpu_us_per_io",
            "wall_secs",
        ] {
            assert!(r[k].as_f64().is_some_and(|v| v >= 0.0), "{k} in {r}");
        }
        assert!(r["lat_p99_us"].as_f64() >= r["lat_p50_us"].as_f64(), "{r}");
        assert!(r["lat_p50_us"].as_f64().unwrap() > 0.0, "{r}");
    }
    let cfg = &json["config"];
    assert_eq!(cfg["accel"], "tcg", "{cfg}");
    assert_eq!(cfg["qds"], serde_json::json!([1]), "{cfg}");
    for k in ["fio", "qemu_nbd", "qemu"] {
        assert!(
            cfg[k].as_str().is_some_and(|v| !v.is_empty()),
            "{k} in {cfg}"
        );
    }
    let runs = cfg["runs"].as_array().expect("runs");
    assert_eq!(runs.len(), 1, "{cfg}");
    // The appliance logged no error while it served the benchmark.
    let warnings = runs[0]["guest_warnings"]
        .as_array()
        .expect("guest_warnings");
    assert!(
        !warnings
            .iter()
            .any(|w| w.as_str().is_some_and(|w| w.contains(" ERROR "))),
        "{warnings:?}"
    );
    assert!(runs[0]["qemu_nbd_options"]
        .as_str()
        .is_some_and(|o| o.starts_with("--cache=")));
    let svg = std::fs::read_to_string(dir.join("plot.svg")).expect("plot.svg");
    assert!(svg.starts_with("<svg") && svg.contains("NBD, net=user") && svg.contains("qemu-nbd"));
    let _ = std::fs::remove_dir_all(&dir);
}

/// `dioxide bench nbd --nic igb,virtio` at two CPUs, null export only:
/// one boot per NIC, each NIC's row with reads done, the igb row with the
/// per-core counts its cores logged (not that both served: RSS may put
/// the one fio connection on either core), virtio-net's without. A 4 MiB
/// image of its own: QEMU locks its disk image, and the smallest-form test
/// boots on the 8 MiB one at the same time.
#[test]
fn bench_nbd_on_igb_and_virtio_gives_a_row_per_nic_and_igbs_per_core_counts() {
    let dir = dioxide::workspace_root()
        .join("target")
        .join("test-tmp")
        .join(format!("bench-nbd-nic-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let t0 = Instant::now();
    let (status, stdout, stderr) = dioxide(
        &[
            "bench",
            "nbd",
            "--nic",
            "igb,virtio",
            "--smp",
            "2",
            "--targets",
            "null",
            "--qd",
            "16",
            "--secs",
            "1",
            "--rounds",
            "1",
            "--file-size",
            "4M",
            "--accel",
            "tcg",
            "--mem",
            "256",
            "--host-ios",
            "0",
            "--out",
            dir.to_str().unwrap(),
        ],
        Duration::from_secs(300),
    );
    let all = format!("stdout:\n{stdout}\nstderr:\n{stderr}");
    assert_eq!(status, Some(0), "{all}");
    eprintln!(
        "bench nbd --nic igb,virtio took {:.1} s",
        t0.elapsed().as_secs_f64()
    );

    // The table: a section per NIC, igb's with its requests per core.
    for nic in ["igb", "virtio"] {
        assert!(
            stdout.contains(&format!("\nnet=user nic={nic}: fio --ioengine=nbd")),
            "{all}"
        );
    }
    let igb = &stdout[stdout.find("nic=igb:").unwrap()..stdout.find("nic=virtio:").unwrap()];
    assert!(
        igb.contains("requests per core: null qd16 cores 0:"),
        "{all}"
    );
    assert!(
        stderr.contains("nic igb, offloads the driver's (csum, tso, rx csum on"),
        "{all}"
    );

    let json: Value =
        serde_json::from_slice(&std::fs::read(dir.join("results.json")).expect("results.json"))
            .expect("results.json is JSON");
    let rows = json["rows"].as_array().expect("rows");
    assert_eq!(rows.len(), 2, "{json:#}");
    for nic in ["igb", "virtio"] {
        let r = rows
            .iter()
            .find(|r| r["nic"] == nic)
            .unwrap_or_else(|| panic!("no {nic} row: {json:#}"));
        assert_eq!(
            (&r["target"], &r["cpus"]),
            (&"null".into(), &2.into()),
            "{r}"
        );
        assert!(r["iops"].as_f64().unwrap() > 0.0, "{r}");
        assert!(r["ios"].as_u64().unwrap() > 0, "{r}");
        if nic == "virtio" {
            assert!(r.get("per_core").is_none(), "{r}");
            continue;
        }
        // Both cores listed; together they served at least fio's reads.
        let cores = r["per_core"].as_array().expect("per_core");
        assert_eq!(cores.len(), 2, "{r}");
        let served: u64 = cores.iter().map(|c| c["requests"].as_u64().unwrap()).sum();
        assert!(served >= r["ios"].as_u64().unwrap(), "{r}");
        assert!(
            cores.iter().any(|c| c["connections"].as_u64() > Some(0)),
            "{r}"
        );
    }
    let runs = json["config"]["runs"].as_array().expect("runs");
    assert_eq!(runs.len(), 2, "{json:#}");
    assert!(runs[0]["nic_line"]
        .as_str()
        .is_some_and(|l| l.contains("2 queue pair(s) with RSS")));
    for run in runs {
        let warnings = run["guest_warnings"].as_array().expect("guest_warnings");
        assert!(
            !warnings
                .iter()
                .any(|w| w.as_str().is_some_and(|w| w.contains(" ERROR "))),
            "{warnings:?}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// `qemu-nbd` serving a file read-only on 127.0.0.1 (killed on drop).
struct QemuNbd(std::process::Child);

impl Drop for QemuNbd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl QemuNbd {
    /// Starts it on a free port and waits until it accepts connections.
    fn start(img: &std::path::Path) -> (QemuNbd, u16) {
        let port = dioxide::nbdbench::free_port().unwrap();
        let child = Command::new("qemu-nbd")
            .args(["--read-only", "--persistent", "--format=raw"])
            .args(["--bind=127.0.0.1", &format!("--port={port}"), "--shared=4"])
            .arg(img)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("qemu-nbd (./dx installs qemu-utils)");
        let q = QemuNbd(child);
        let t0 = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "qemu-nbd not listening"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        (q, port)
    }
}

/// `dioxide bench nbd --remote`: an appliance started on its own (as a
/// server would be, here under TCG with user networking and the null
/// export), then the benchmark against it from outside, by its address
/// alone, and against a qemu-nbd peer on a small raw file. The rows of the
/// appliance's file, raw and null exports (picked from its list by name)
/// and of the peer are in the table and results.json, each with reads.
#[test]
fn bench_nbd_remote_reads_an_appliance_started_elsewhere_and_a_peer() {
    let dir = dioxide::workspace_root()
        .join("target")
        .join("test-tmp")
        .join(format!("bench-nbd-remote-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let src = dir.join("src");
    std::fs::create_dir_all(&src).unwrap();
    let mut rng = dioxide_testkit::Rng::new(5);
    let mut data = vec![0u8; 8 << 20];
    rng.fill(&mut data);
    std::fs::write(src.join("bench.bin"), &data).unwrap();
    std::fs::write(src.join("notes.txt"), b"not the file to read\n").unwrap();
    let img = dir.join("fs.img");
    dioxide::fstool::mkfs(&img, &src, None, 4096, "").unwrap();
    let peer_img = dir.join("peer.img");
    std::fs::write(&peer_img, &data[..4 << 20]).unwrap();

    let kernel = dioxide::kernel::build().unwrap_or_else(|e| panic!("{e}"));
    let mut cfg = dioxide::qemu::Config::new(kernel);
    cfg.add_disk(&img);
    cfg.accel = dioxide::accel::Accel::Tcg;
    cfg.mem_mib = 256;
    cfg.args = vec!["nbd.null=1".into()];
    cfg.timeout = Some(Duration::from_secs(600));
    let t0 = Instant::now();
    let app = dioxide::nbdbench::boot(cfg, dioxide::nbdbench::NetMode::User)
        .unwrap_or_else(|e| panic!("{e}"));
    let (_peer, peer_port) = QemuNbd::start(&peer_img);
    let remote = format!("nbd://127.0.0.1:{}", app.port);
    let peer = format!("nbd://127.0.0.1:{peer_port}");
    let out = dir.join("out");
    let (status, stdout, stderr) = dioxide(
        &[
            "bench",
            "nbd",
            "--remote",
            &remote,
            "--peer",
            &peer,
            "--qd",
            "4",
            "--secs",
            "1",
            "--rounds",
            "1",
            "--out",
            out.to_str().unwrap(),
        ],
        Duration::from_secs(300),
    );
    let all = format!(
        "stdout:\n{stdout}\nstderr:\n{stderr}\nappliance:\n{}",
        app.guest.console()
    );
    assert_eq!(status, Some(0), "{all}");
    eprintln!(
        "appliance boot and bench nbd --remote took {:.1} s",
        t0.elapsed().as_secs_f64()
    );

    // The table: a remote section, the appliance's three exports and the
    // peer as columns, a figure in each, and what each column read.
    assert!(
        stdout.contains("\nnet=remote: fio --ioengine=nbd, 4K random reads, 1 job(s), 1 s per row"),
        "{all}"
    );
    let header = stdout
        .lines()
        .find(|l| l.trim_start().starts_with("qd "))
        .unwrap_or_else(|| panic!("no table header\n{all}"));
    let cols: Vec<&str> = header.split_whitespace().collect();
    assert_eq!(
        cols,
        [
            "qd",
            "file",
            "raw",
            "null",
            "peer1",
            "file/raw",
            "file/peer1"
        ],
        "{all}"
    );
    let line = stdout
        .lines()
        .find(|l| l.trim_start().starts_with("4 "))
        .unwrap_or_else(|| panic!("no qd 4 line\n{all}"));
    let cells: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(cells.len(), 1 + 4 * 2 + 2, "{line}");
    for i in 0..4 {
        let iops: u64 = cells[1 + 2 * i].replace(',', "").parse().expect(line);
        assert!(iops > 0, "column {} in {line}", cols[1 + i]);
    }
    assert!(
        stdout.contains(&format!(
            "read: file {remote}/bench.bin, raw {remote}/nvme0n1, null {remote}/null, peer1 {peer}\n"
        )),
        "{all}"
    );
    // No server CPU time or guest frames: the appliance is not ours here.
    assert!(!stdout.contains("host CPU per I/O"), "{all}");

    // results.json: a row per target with reads, the URI it read.
    let json: Value =
        serde_json::from_slice(&std::fs::read(out.join("results.json")).expect("results.json"))
            .expect("results.json is JSON");
    let rows = json["rows"].as_array().expect("rows");
    for (target, uri, export) in [
        ("file", format!("{remote}/bench.bin"), "bench.bin"),
        ("raw", format!("{remote}/nvme0n1"), "nvme0n1"),
        ("null", format!("{remote}/null"), "null"),
        ("peer1", peer.clone(), ""),
    ] {
        let r = rows
            .iter()
            .find(|r| r["target"] == target)
            .unwrap_or_else(|| panic!("no {target} row: {json:#}"));
        assert_eq!(r["net"], "remote", "{r}");
        assert_eq!(r["qd"].as_u64(), Some(4), "{r}");
        assert_eq!(r["uri"], uri.as_str(), "{r}");
        if !export.is_empty() {
            assert_eq!(r["export"], export, "{r}");
        }
        assert!(r["iops"].as_f64().unwrap() > 0.0, "{r}");
        assert!(r["ios"].as_u64().unwrap() > 0, "{r}");
        assert!(r["lat_p50_us"].as_f64().unwrap() > 0.0, "{r}");
    }
    assert_eq!(rows.len(), 4, "{json:#}");
    let cfg = &json["config"];
    assert_eq!(cfg["remote"], remote.as_str(), "{cfg}");
    assert_eq!(cfg["exports_listed"].as_u64(), Some(4), "{cfg}");
    assert_eq!(json["host_rows"], serde_json::json!([]), "{json:#}");
    let svg = std::fs::read_to_string(out.join("plot.svg")).expect("plot.svg");
    assert!(svg.contains("NBD, net=remote") && svg.contains("peer1 (nbd://"));
    drop(app);
    let _ = std::fs::remove_dir_all(&dir);
}
