//! The appliance on QEMU's Intel 82576 (`-device igb`): one network stack
//! per guest CPU on its own RSS queue pair, served to real clients (nbdinfo,
//! nbdcopy) over user networking and a tap device, every byte compared.
//!
//! Connections spread over the cores by the NIC's RSS hash of their ports;
//! each core says what it served (`nbd: core N: C connections, R requests
//! served, ...`, after its service goes idle).

use dioxide::nbdbench::{boot, Appliance, NetMode};
use dioxide_qemu::{Guest, Nic};
use dioxide_tests::nbdraw::Client;
use dioxide_tests::*;
use std::collections::BTreeMap;
use std::io::ErrorKind;
use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

/// Boots the appliance on `img` with an igb NIC and `smp` CPUs.
fn serve_igb(
    img: &std::path::Path,
    smp: u32,
    net: NetMode,
) -> Result<Appliance, dioxide_qemu::Error> {
    let mut cfg = config(Some(img), &[]);
    cfg.nic = Nic::Igb;
    cfg.smp = smp;
    cfg.mem_mib = 512;
    cfg.timeout = Some(Duration::from_secs(900));
    boot(cfg, net)
}

fn run(cmd: &mut Command) -> (bool, Vec<u8>, String) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e} (the test command installs libnbd-bin)"));
    (
        out.status.success(),
        out.stdout,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The image of a small tree: its paths and contents.
fn tree(dir: &TempDir, files: usize, seed: u64) -> (std::path::PathBuf, Vec<(String, Vec<u8>)>) {
    let src = dir.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    let paths = random_tree(&src, seed, files);
    let img = dir.path().join("fs.img");
    dioxide::fstool::mkfs(&img, &src, None, 4096, "").unwrap();
    let files = paths
        .into_iter()
        .map(|p| {
            let b = std::fs::read(src.join(&p)).unwrap();
            (p, b)
        })
        .collect();
    (img, files)
}

/// Copies every file with nbdcopy and compares it.
fn copy_and_compare(url: &str, files: &[(String, Vec<u8>)]) {
    for (p, want) in files {
        let (ok, got, err) =
            run(Command::new("nbdcopy").args([&format!("{url}/{}", uri_path(p)), "-"]));
        assert!(ok, "{p}: {err}");
        assert!(
            got == *want,
            "{p}: {} bytes differ from {}",
            got.len(),
            want.len()
        );
    }
}

/// Each core's latest `nbd: core N: C connections, R requests served`
/// line: core -> (connections, requests).
fn core_counts(console: &str) -> BTreeMap<usize, (u64, u64)> {
    let mut m = BTreeMap::new();
    for l in console.lines() {
        let Some(i) = l.find("nbd: core ") else {
            continue;
        };
        let rest = &l[i + "nbd: core ".len()..];
        let Some((core, rest)) = rest.split_once(": ") else {
            continue;
        };
        let mut words = rest.split_whitespace();
        let conns = words.next().and_then(|w| w.parse().ok());
        let reqs = words.nth(1).and_then(|w| w.parse().ok());
        if let (Ok(c), Some(n), Some(r)) = (core.parse(), conns, reqs) {
            m.insert(c, (n, r));
        }
    }
    m
}

#[test]
fn core_lines_parse() {
    let c = "[ 1.0] INFO  nbd: core 0: 3 connections, 120 requests served, 9 frames received, 4 sent since start\n\
             [ 1.1] INFO  nbd: core 1: 5 connections, 200 requests served, 9 frames received, 4 sent since start\n\
             [ 1.2] INFO  nbd: core 0: 4 connections, 130 requests served, 9 frames received, 4 sent since start\n";
    let m = core_counts(c);
    assert_eq!(m.get(&0), Some(&(4, 130)));
    assert_eq!(m.get(&1), Some(&(5, 200)));
    assert!(core_counts("nbd: idle: 3 requests served").is_empty());
}

/// Waits until the cores' lines account for at least `conns` connections
/// (each core logs when its service goes idle).
fn wait_counts(guest: &Guest, conns: u64) -> BTreeMap<usize, (u64, u64)> {
    let t0 = Instant::now();
    loop {
        let m = core_counts(&guest.console());
        if m.values().map(|v| v.0).sum::<u64>() >= conns {
            return m;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "the cores accounted for fewer than {conns} connections: {m:?}\n{}",
            guest.console()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Boots on igb with `smp` CPUs, lists and copies every export; returns
/// the appliance for more.
fn serves_every_export(net: NetMode, smp: u32, seed: u64) -> Option<Appliance> {
    // One folder per test (TempDir names by process: tests run at once).
    let dir = TempDir::new(&format!("igb-copy-{seed}"));
    let (img, files) = tree(&dir, 16, seed);
    let mut app = match serve_igb(&img, smp, net) {
        Ok(a) => a,
        Err(dioxide_qemu::Error::TapUnavailable(why)) => {
            skipped("igb_serves_every_export_over_tap", &why);
            return None;
        }
        Err(e) => panic!("{e}"),
    };
    let console = wait_for_console(&mut app.guest, "nbd: serving", Duration::from_secs(60));
    assert!(console.contains("igb NIC (8086:10c9)"), "{console}");
    assert!(
        console.contains(&format!(
            "{smp} queue pair(s) with RSS, csum on, tso on, rx csum on, mtu 1500"
        )),
        "{console}"
    );
    assert!(
        console.contains(&format!("one network stack per core on {smp} core(s)")),
        "{console}"
    );
    let (ok, out, err) = run(Command::new("nbdinfo").args(["--list", &app.url]));
    assert!(ok, "{err}");
    let list = String::from_utf8_lossy(&out);
    for (p, _) in &files {
        assert!(
            list.contains(&format!("export=\"{p}\"")),
            "{p} missing:\n{list}"
        );
    }
    copy_and_compare(&app.url, &files);
    // The raw namespace: the image itself.
    let want = std::fs::read(&img).unwrap();
    let (ok, got, err) = run(Command::new("nbdcopy").args([&format!("{}/nvme0n1", app.url), "-"]));
    assert!(ok, "{err}");
    assert!(got == want, "nvme0n1 differs from the image");
    Some(app)
}

#[test]
fn igb_serves_every_export_over_user_networking() {
    serves_every_export(NetMode::User, 2, 91);
}

#[test]
fn igb_serves_every_export_over_tap() {
    if let Some(app) = serves_every_export(NetMode::Tap, 2, 92) {
        let console = app.guest.console();
        assert!(console.contains("net: static address "), "{console}");
    }
}

/// A greeted connection. Behind QEMU's user networking a connection can be
/// lost before the guest sees it (QEMU's listener has a backlog of 1; see
/// soak.rs `greeted`): no greeting within 5 s, and another is made.
fn greeted(addr: SocketAddr) -> Client {
    for _ in 0..10 {
        match Client::try_greeting_at(addr, Duration::from_secs(5)) {
            Ok(c) => return c,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) => panic!("connect: {e}"),
        }
    }
    panic!("no greeting on 10 connections in a row")
}

/// Reads all of `want` from the raw namespace in 256 KiB reads on one
/// connection, every reply compared.
fn read_all(addr: SocketAddr, want: &[u8]) -> Result<(), String> {
    let mut c = greeted(addr);
    let size = c
        .go("nvme0n1")
        .map_err(|e| format!("NBD_OPT_GO: error {e}"))?;
    if size != want.len() as u64 {
        return Err(format!("size {size}, image {}", want.len()));
    }
    for off in (0..want.len()).step_by(256 << 10) {
        let len = (want.len() - off).min(256 << 10);
        let got = c
            .read_at(off as u64, len as u32)
            .map_err(|e| format!("read at {off}: error {e}"))?;
        if got != want[off..off + len] {
            return Err(format!("read at {off}: wrong bytes"));
        }
    }
    c.disconnect();
    Ok(())
}

/// Reads the raw namespace over `n` connections at once, `rounds` times at
/// most, until connections were served by at least two cores; every reply
/// compared. Returns the cores' counts.
fn spread(smp: u32, n: usize) -> BTreeMap<usize, (u64, u64)> {
    let dir = TempDir::new(&format!("igb-rss-{smp}"));
    let (img, _) = tree(&dir, 4, 93 + u64::from(smp));
    let app = serve_igb(&img, smp, NetMode::User).unwrap_or_else(|e| panic!("{e}"));
    spread_over(&app, &img, smp, n)
}

/// [`spread`] on an appliance already serving `img` on `smp` cores.
fn spread_over(
    app: &Appliance,
    img: &std::path::Path,
    smp: u32,
    n: usize,
) -> BTreeMap<usize, (u64, u64)> {
    let want = std::sync::Arc::new(std::fs::read(img).unwrap());
    let addr: SocketAddr = app.url["nbd://".len()..]
        .parse()
        .unwrap_or_else(|e| panic!("{}: {e}", app.url));
    let mut total = 0u64;
    // With 2 cores all 8 connections land on one core with probability
    // 1/128 (each port hashes to either queue): rounds make that vanish.
    for round in 0..4 {
        let readers: Vec<_> = (0..n)
            .map(|_| {
                let want = want.clone();
                std::thread::spawn(move || read_all(addr, &want))
            })
            .collect();
        for r in readers {
            if let Err(e) = r.join().unwrap() {
                panic!("round {round}: {e}\n{}", app.guest.console());
            }
        }
        total += n as u64;
        let counts = wait_counts(&app.guest, total);
        if counts.values().filter(|v| v.0 > 0).count() >= 2 {
            let served: u64 = counts.values().map(|v| v.1).sum();
            assert!(served > 0, "{counts:?}");
            assert!(counts.keys().all(|&c| c < smp as usize), "{counts:?}");
            return counts;
        }
    }
    panic!(
        "{} rounds of {n} connections all served by one core:\n{}",
        4,
        app.guest.console()
    );
}

#[test]
fn rss_spreads_8_connections_over_2_cores() {
    let c = spread(2, 8);
    eprintln!("per-core (connections, requests): {c:?}");
}

#[test]
fn rss_spreads_8_connections_over_4_cores() {
    let c = spread(4, 8);
    eprintln!("per-core (connections, requests): {c:?}");
}

/// Without `net.ip=` the address comes from DHCP, run on queue 0's core
/// (RSS leaves UDP there): the boot log says the lease and where to
/// connect, and the other core serves with it too.
#[test]
fn igb_takes_its_address_from_dhcp_on_2_cores() {
    let dir = TempDir::new("igb-dhcp");
    let (img, files) = tree(&dir, 6, 97);
    // A free host port for the forward (user networking with no address
    // on the command line: the kernel asks QEMU's DHCP server).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut cfg = config(Some(&img), &[]);
    cfg.nic = Nic::Igb;
    cfg.smp = 2;
    cfg.mem_mib = 512;
    cfg.netdev = Some(format!(
        "user,id=net0,net=10.0.2.0/24,host=10.0.2.2,hostfwd=tcp:127.0.0.1:{port}-:10809"
    ));
    let mut guest = Guest::spawn(&cfg).unwrap_or_else(|e| panic!("{e}"));
    let console = wait_for_console(
        &mut guest,
        "nbd: serving 7 exports at nbd://10.0.2.15:10809/",
        Duration::from_secs(120),
    );
    assert!(
        console.contains("net: DHCP: address 10.0.2.15/24 router 10.0.2.2"),
        "{console}"
    );
    // Several connections, so that both cores serve some.
    let url = format!("nbd://127.0.0.1:{port}");
    for _ in 0..3 {
        copy_and_compare(&url, &files);
    }
    let counts = wait_counts(&guest, 3 * files.len() as u64);
    assert!(counts.values().map(|v| v.1).sum::<u64>() > 0, "{counts:?}");
}

/// With virtio-net and igb both present, `net.nic=igb` serves on igb (the
/// second in PCI order); without it the first found (virtio-net) serves.
#[test]
fn net_nic_chooses_between_virtio_and_igb() {
    let dir = TempDir::new("igb-choice");
    let (img, files) = tree(&dir, 3, 98);
    for (arg, serves_igb) in [(Some("net.nic=igb"), true), (None, false)] {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut args = vec!["net.ip=10.0.2.15/24", "net.gw=10.0.2.2"];
        args.extend(arg);
        let mut cfg = config(Some(&img), &args);
        cfg.smp = 2;
        cfg.mem_mib = 512;
        // virtio-net first (slot 2), then igb (slot 3); the forward is on
        // the network of the NIC that should serve.
        let fwd = format!(",hostfwd=tcp:127.0.0.1:{port}-:10809");
        let (v, i) = if serves_igb {
            ("", fwd.as_str())
        } else {
            (fwd.as_str(), "")
        };
        cfg.netdev = Some(format!("user,id=net0,net=10.0.2.0/24,host=10.0.2.2{v}"));
        cfg.extra = vec![
            "-netdev".into(),
            format!("user,id=net1,net=10.0.2.0/24,host=10.0.2.2{i}"),
            "-device".into(),
            "igb,netdev=net1".into(),
        ];
        let mut guest = Guest::spawn(&cfg).unwrap_or_else(|e| panic!("{e}"));
        let console = wait_for_console(&mut guest, "nbd: serving", Duration::from_secs(120));
        assert!(console.contains("virtio NIC (1af4:1000)"), "{console}");
        assert!(console.contains("igb NIC (8086:10c9)"), "{console}");
        assert_eq!(
            console.contains("one network stack per core on 2 core(s)"),
            serves_igb,
            "{arg:?}:\n{console}"
        );
        assert_eq!(console.contains("virtio-net MAC"), !serves_igb, "{console}");
        copy_and_compare(&format!("nbd://127.0.0.1:{port}"), &files);
    }
}

/// virtio-net with VIRTIO_NET_F_MQ on a 2-queue tap: one stack per core, as
/// on igb, with the host's tap steering each flow to one queue (by its
/// hash, then by the queue its replies leave on); 8 connections spread
/// over both cores, every reply compared.
#[test]
fn virtio_multiqueue_spreads_8_connections_over_2_cores() {
    let dir = TempDir::new("virtio-mq");
    let (img, _) = tree(&dir, 4, 97);
    let mut cfg = config(Some(&img), &[]);
    // On a tap, virtio-net gets one queue per CPU (`Config::tap_queues`).
    cfg.nic = Nic::Virtio;
    cfg.smp = 2;
    cfg.mem_mib = 512;
    cfg.timeout = Some(Duration::from_secs(900));
    let mut app = match boot(cfg, NetMode::Tap) {
        Ok(a) => a,
        Err(dioxide_qemu::Error::TapUnavailable(why)) => {
            skipped("virtio_multiqueue_spreads_8_connections_over_2_cores", &why);
            return;
        }
        Err(e) => panic!("{e}"),
    };
    let console = wait_for_console(&mut app.guest, "nbd: serving", Duration::from_secs(60));
    assert!(
        console.contains("2 queue pair(s) (multiqueue)"),
        "{console}"
    );
    assert!(
        console.contains("one network stack per core on 2 core(s): connections spread by the host's flow steering"),
        "{console}"
    );
    let c = spread_over(&app, &img, 2, 8);
    eprintln!("per-core (connections, requests): {c:?}");
}
