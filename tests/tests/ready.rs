//! Ready means ready, and negotiation is fast: a client polling the
//! appliance's port from the instant QEMU starts is refused at once until
//! the NBD server listens and then served at once (no lost SYN, no 6 s slirp
//! retry); and listing thousands of exports costs one quick round trip per
//! option.

use dioxide::nbdbench::{boot, NetMode};
use dioxide_qemu::free_port;
use dioxide_qemu::Guest;
use dioxide_tests::*;
use std::collections::BTreeSet;
use std::io::{self, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

/// A minimal NBD client (fixed newstyle, no zeroes) whose every failure is
/// an `io::Error`, so that a poller can tell "refused" from anything else.
struct Nbd {
    s: TcpStream,
}

use dioxide_tests::nbdraw::{IHAVEOPT, OPT_GO, OPT_INFO, OPT_LIST, REP_ACK, REP_INFO, REP_SERVER};

fn bad(why: String) -> io::Error {
    io::Error::new(ErrorKind::InvalidData, why)
}

impl Nbd {
    fn connect(port: u16, timeout: Duration) -> io::Result<Nbd> {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let s = TcpStream::connect_timeout(&addr, timeout)?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(timeout))?;
        s.set_write_timeout(Some(timeout))?;
        let mut c = Nbd { s };
        let hello = c.read_n(18)?;
        if &hello[..16] != b"NBDMAGICIHAVEOPT" {
            return Err(bad(format!("greeting {hello:02x?}")));
        }
        // NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES
        c.s.write_all(&3u32.to_be_bytes())?;
        Ok(c)
    }

    fn read_n(&mut self, n: usize) -> io::Result<Vec<u8>> {
        let mut b = vec![0u8; n];
        self.s.read_exact(&mut b)?;
        Ok(b)
    }

    /// One option, written in one segment; its replies up to the last.
    fn option(&mut self, opt: u32, data: &[u8]) -> io::Result<Vec<(u32, Vec<u8>)>> {
        let mut m = IHAVEOPT.to_be_bytes().to_vec();
        m.extend(opt.to_be_bytes());
        m.extend((data.len() as u32).to_be_bytes());
        m.extend(data);
        self.s.write_all(&m)?;
        let mut replies = Vec::new();
        loop {
            let h = self.read_n(20)?;
            let be32 = |i: usize| u32::from_be_bytes(h[i..i + 4].try_into().unwrap());
            if be32(8) != opt {
                return Err(bad(format!("reply to option {} for {opt}", be32(8))));
            }
            let (ty, len) = (be32(12), be32(16) as usize);
            let d = self.read_n(len)?;
            replies.push((ty, d));
            if ty != REP_SERVER && ty != REP_INFO {
                return Ok(replies);
            }
        }
    }

    /// NBD_OPT_LIST: every export name.
    fn list(&mut self) -> io::Result<Vec<String>> {
        let r = self.option(OPT_LIST, &[])?;
        let mut names = Vec::new();
        for (ty, d) in r {
            match ty {
                REP_SERVER if d.len() >= 4 => {
                    let n = u32::from_be_bytes(d[..4].try_into().unwrap()) as usize;
                    let name = d.get(4..4 + n).ok_or_else(|| bad("short name".into()))?;
                    names.push(String::from_utf8_lossy(name).into_owned());
                }
                REP_ACK => {}
                _ => return Err(bad(format!("NBD_OPT_LIST reply {ty:#x}"))),
            }
        }
        Ok(names)
    }

    /// NBD_OPT_INFO or NBD_OPT_GO of `name`: its size.
    fn info_or_go(&mut self, opt: u32, name: &str) -> io::Result<u64> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend(name.as_bytes());
        d.extend(0u16.to_be_bytes());
        let r = self.option(opt, &d)?;
        match r.last() {
            Some((REP_ACK, _)) => {}
            other => return Err(bad(format!("{name}: final reply {other:?}"))),
        }
        r.iter()
            .find(|(t, d)| *t == REP_INFO && d.len() >= 10 && d[..2] == [0, 0])
            .map(|(_, d)| u64::from_be_bytes(d[2..10].try_into().unwrap()))
            .ok_or_else(|| bad(format!("{name}: no NBD_INFO_EXPORT")))
    }

    /// NBD_CMD_READ, simple reply.
    fn read(&mut self, offset: u64, len: u32) -> io::Result<Vec<u8>> {
        let mut m = 0x2560_9513u32.to_be_bytes().to_vec();
        m.extend(0u32.to_be_bytes()); // flags, type READ
        m.extend(7u64.to_be_bytes());
        m.extend(offset.to_be_bytes());
        m.extend(len.to_be_bytes());
        self.s.write_all(&m)?;
        let h = self.read_n(16)?;
        if h[..8] != [0x67, 0x44, 0x66, 0x98, 0, 0, 0, 0] {
            return Err(bad(format!("read reply {h:02x?}")));
        }
        self.read_n(len as usize)
    }
}

/// One client attempt: connect, negotiate `name`, read it whole.
fn fetch(port: u16, name: &str, timeout: Duration) -> io::Result<Vec<u8>> {
    let mut c = Nbd::connect(port, timeout)?;
    let size = c.info_or_go(OPT_GO, name)?;
    c.read(0, size as u32)
}

/// A client polls the forwarded port from the instant QEMU is spawned. Until
/// the server listens every attempt is refused at once (QEMU opens the port
/// only then); the first attempt after that is answered at once.
#[test]
fn a_client_polling_from_launch_is_refused_then_served() {
    let dir = TempDir::new("ready-poll");
    let src = dir.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    let want = b"served as soon as it listens\n".to_vec();
    std::fs::write(src.join("hello.txt"), &want).unwrap();
    let img = dir.path().join("fs.img");
    dioxide::fstool::mkfs(&img, &src, None, 4096, "").unwrap();
    let port = free_port().unwrap();
    let mut cfg = config(Some(&img), &[]);
    cfg.timeout = Some(Duration::from_secs(300));
    cfg.nbd_port = Some(port);

    let t0 = Instant::now();
    let guest = Guest::spawn(&cfg).unwrap_or_else(|e| panic!("{e}"));
    let _show = ConsoleOnPanic(&guest);
    // Not a timing assertion: a SYN lost to a guest without an address
    // was retried by QEMU after 6 s, and an accepted connection to a guest
    // not listening hangs; a refusal takes microseconds and an answer
    // milliseconds. Any attempt near this bound is one of those failures.
    // Measured (the figures are printed) on a 2-core machine shared with
    // another QEMU test run, with both cores also kept busy by two shell
    // loops: the longest refusal 6.2 ms, the answered attempt 115 ms (3
    // runs; idle: 1.7 ms and 26 ms): 3 s is 26 times the worst.
    let bound = Duration::from_secs(3);
    let mut refused = 0u32;
    let mut longest_refusal = Duration::ZERO;
    let (answered, took) = loop {
        let a = Instant::now();
        let r = fetch(port, "hello.txt", bound * 2);
        let took = a.elapsed();
        match r {
            Ok(data) => {
                assert_eq!(data, want, "wrong data");
                break (t0.elapsed(), took);
            }
            Err(e) => {
                assert_eq!(
                    e.kind(),
                    ErrorKind::ConnectionRefused,
                    "attempt {} after {:?}, {took:?} long: {e} (before readiness a \
                     connection must be refused, after it served)",
                    refused + 1,
                    a - t0
                );
                assert!(took < bound, "a refusal took {took:?}");
                longest_refusal = longest_refusal.max(took);
                refused += 1;
            }
        }
        assert!(
            t0.elapsed() < Duration::from_secs(180),
            "never answered:\n{}",
            guest.console()
        );
        std::thread::sleep(Duration::from_millis(5));
    };
    assert!(
        took < bound,
        "the answered attempt took {took:?} (a lost SYN?)"
    );
    assert!(refused > 0, "no attempt before readiness");
    let console = guest.console();
    let listening = console
        .lines()
        .find(|l| l.contains("nbd: listening"))
        .unwrap_or("-");
    eprintln!(
        "spawn to first answered read: {answered:?} ({refused} attempts refused before, \
         the longest refusal took {longest_refusal:?}, the answered one {took:?}); guest: \
         {listening}"
    );
}

/// A Unix socket relay to the appliance's TCP port, for clients that would
/// otherwise stall on TCP: libnbd 1.14 writes NBD_OPT_LIST_META_CONTEXT
/// with MSG_MORE on its last piece, and Linux holds those bytes until its
/// 200 ms probe timer (against any server: qemu-nbd too), so `nbdinfo
/// --list` over TCP costs 0.2 s per export whatever the server does.
fn unix_relay(sock: &std::path::Path, port: u16) {
    let l = std::os::unix::net::UnixListener::bind(sock).expect("bind the relay socket");
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(c) = c else { return };
            let Ok(t) = TcpStream::connect(("127.0.0.1", port)) else {
                return;
            };
            let _ = t.set_nodelay(true);
            let (mut c2, mut t2) = (c.try_clone().unwrap(), t.try_clone().unwrap());
            std::thread::spawn(move || {
                let _ = io::copy(&mut c2, &mut t2);
                let _ = t2.shutdown(std::net::Shutdown::Write);
            });
            let (mut c, mut t) = (c, t);
            std::thread::spawn(move || {
                let _ = io::copy(&mut t, &mut c);
                let _ = c.shutdown(std::net::Shutdown::Write);
            });
        }
    });
}

/// 2,500 files: NBD_OPT_LIST names them all, NBD_OPT_INFO answers for
/// each on one connection, and `nbdinfo --list` shows every one; each
/// within a generous bound (the figures are printed; the bounds and the
/// measurements behind them are at the top of the test).
#[test]
fn thousands_of_exports_are_listed_quickly() {
    const FILES: usize = 2500;
    // "Quickly": generous bounds, not a benchmark. Measured on a 2-core
    // machine shared with another QEMU test run (TCG), and with both cores
    // also kept busy by two shell loops (2026-12-07):
    //   NBD_OPT_LIST of 2501:  22 ms,  loaded 109 ms   bound 2 s
    //   2500 NBD_OPT_INFO:    361 ms,  loaded 1.04 s   bound 10 s (4 ms each)
    //   nbdinfo --list:       1.9 s,   loaded 3.8 s    bound 30 s
    // Each bound is at least 7 times the loaded figure. What they catch is a
    // cost per export or per option: a 40 ms delayed ACK per round trip
    // would take 100 s for the INFOs, the 200 ms per export some servers
    // pay 500 s.
    const LIST_BOUND: Duration = Duration::from_secs(2);
    const INFO_BOUND: Duration = Duration::from_secs(10);
    const NBDINFO_BOUND: Duration = Duration::from_secs(30);
    let dir = TempDir::new("ready-list");
    let src = dir.path().join("src");
    let mut want = BTreeSet::new();
    let mut sizes = std::collections::BTreeMap::new();
    for k in 0..FILES {
        let name = match k % 50 {
            0 => format!("d{}/ünï cødé {k}.txt", k % 7),
            _ => format!("d{}/f{k}.txt", k % 7),
        };
        let path = src.join(&name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let body = format!("{k}\n").repeat(k % 13);
        std::fs::write(&path, &body).unwrap();
        sizes.insert(name.clone(), body.len() as u64);
        want.insert(name);
    }
    let img = dir.path().join("fs.img");
    dioxide::fstool::mkfs(&img, &src, None, 4096, "").unwrap();
    let mut cfg = config(Some(&img), &[]);
    cfg.timeout = Some(Duration::from_secs(900));
    let app = boot(cfg, NetMode::User).unwrap_or_else(|e| panic!("{e}"));
    let _show = ConsoleOnPanic(&app.guest);
    let port = app.port;

    // Raw client: one segment per option.
    let t = Instant::now();
    let mut c = Nbd::connect(port, Duration::from_secs(30)).expect("connect");
    let names = c.list().expect("NBD_OPT_LIST");
    let list_time = t.elapsed();
    let got: BTreeSet<String> = names.iter().cloned().collect();
    assert_eq!(names.len(), got.len(), "names repeated");
    let mut expect = want.clone();
    expect.insert("nvme0n1".into());
    assert_eq!(got, expect, "NBD_OPT_LIST");
    let t = Instant::now();
    for (name, size) in &sizes {
        assert_eq!(c.info_or_go(OPT_INFO, name).expect(name), *size, "{name}");
    }
    let info_time = t.elapsed();
    eprintln!(
        "raw client: NBD_OPT_LIST of {} exports in {list_time:?}; {FILES} NBD_OPT_INFO in \
         {info_time:?} ({:.2} ms per round trip)",
        names.len(),
        info_time.as_secs_f64() * 1e3 / FILES as f64
    );
    assert!(list_time < LIST_BOUND, "NBD_OPT_LIST took {list_time:?}");
    assert!(info_time < INFO_BOUND, "NBD_OPT_INFO took {info_time:?}");
    drop(c);

    // nbdinfo --list, through the relay (see `unix_relay`).
    let sock = dir.path().join("nbd.sock");
    unix_relay(&sock, port);
    let t = Instant::now();
    let out = Command::new("nbdinfo")
        .arg("--list")
        .arg(format!("nbd+unix:///?socket={}", sock.display()))
        .output()
        .unwrap_or_else(|e| panic!("nbdinfo: {e} (./dx test installs libnbd-bin)"));
    let nbdinfo_time = t.elapsed();
    assert!(
        out.status.success(),
        "nbdinfo --list: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let list = String::from_utf8_lossy(&out.stdout);
    let shown: BTreeSet<&str> = list
        .lines()
        .filter_map(|l| l.strip_prefix("export=\"")?.strip_suffix("\":"))
        .collect();
    let missing: Vec<&String> = expect
        .iter()
        .filter(|n| !shown.contains(n.as_str()))
        .collect();
    assert!(missing.is_empty(), "nbdinfo --list lacks {missing:?}");
    assert_eq!(shown.len(), expect.len(), "nbdinfo --list shows more");
    eprintln!(
        "nbdinfo --list of {} exports: {nbdinfo_time:?} ({:.2} ms per export, two options each)",
        expect.len(),
        nbdinfo_time.as_secs_f64() * 1e3 / expect.len() as f64
    );
    assert!(
        nbdinfo_time < NBDINFO_BOUND,
        "nbdinfo --list took {nbdinfo_time:?}"
    );
}
