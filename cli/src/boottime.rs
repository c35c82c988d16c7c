//! `dioxide bench boot`: boot-to-serving time per boot method. The clock
//! starts when QEMU is spawned (a bios/uefi boot's ISO is made before) and
//! stops when the appliance has answered a real NBD handshake on its
//! forwarded port: the server's greeting, then `NBD_OPT_LIST` answered up to
//! its final ACK. A client polls the port from the start; until the kernel's
//! server listens QEMU refuses it at once (see [`crate::qemu`]), so the
//! polling costs no more than its 5 ms pause. The appliance serves the
//! built-in sample tree.

use crate::accel::Accel;
use crate::qemu::{Boot, Config, Guest};
use crate::{kernel, Error};
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

/// NBD's option magic ("IHAVEOPT") and reply magic.
const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const OPT_ABORT: u32 = 2;
const OPT_LIST: u32 = 3;
const REP_ACK: u32 = 1;
const REP_SERVER: u32 = 2;

/// How long one boot may take to serve before it counts as failed.
const LIMIT: Duration = Duration::from_secs(300);

fn bad(why: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, why)
}

/// One NBD handshake on 127.0.0.1:`port` (fixed newstyle): the greeting,
/// the client flags, `NBD_OPT_LIST` read to its ACK, then `NBD_OPT_ABORT`.
/// The number of exports listed.
pub fn handshake(port: u16, timeout: Duration) -> io::Result<usize> {
    let mut s = TcpStream::connect_timeout(&SocketAddr::from(([127, 0, 0, 1], port)), timeout)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    let mut hello = [0u8; 18];
    s.read_exact(&mut hello)?;
    if &hello[..16] != b"NBDMAGICIHAVEOPT" {
        return Err(bad(format!("greeting {hello:02x?}")));
    }
    // NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES, then the option.
    let mut m = 3u32.to_be_bytes().to_vec();
    m.extend(IHAVEOPT.to_be_bytes());
    m.extend(OPT_LIST.to_be_bytes());
    m.extend(0u32.to_be_bytes());
    s.write_all(&m)?;
    let mut exports = 0;
    loop {
        let mut h = [0u8; 20];
        s.read_exact(&mut h)?;
        let be32 = |i: usize| u32::from_be_bytes([h[i], h[i + 1], h[i + 2], h[i + 3]]);
        let magic = u64::from_be_bytes([h[0], h[1], h[2], h[3], h[4], h[5], h[6], h[7]]);
        if magic != REPLY_MAGIC || be32(8) != OPT_LIST {
            return Err(bad(format!("option reply header {h:02x?}")));
        }
        let len = be32(16) as usize;
        if len > 1 << 20 {
            return Err(bad(format!("option reply of {len} bytes")));
        }
        let mut data = vec![0u8; len];
        s.read_exact(&mut data)?;
        match be32(12) {
            REP_SERVER => exports += 1,
            REP_ACK => break,
            t => return Err(bad(format!("NBD_OPT_LIST reply type {t:#x}"))),
        }
    }
    let mut m = IHAVEOPT.to_be_bytes().to_vec();
    m.extend(OPT_ABORT.to_be_bytes());
    m.extend(0u32.to_be_bytes());
    // The server may close at once; the handshake is done either way.
    let _ = s.write_all(&m);
    Ok(exports)
}

/// One boot's times, from spawning QEMU.
#[derive(Clone, Copy, Debug)]
pub struct Sample {
    /// To the first kernel log line (firmware and GRUB before it).
    pub first_line: Option<Duration>,
    /// To the NBD handshake answered.
    pub serving: Duration,
}

/// Boots the appliance on `disk` and measures it (QEMU killed after).
pub fn measure(kernel: &Path, disk: &Path, boot: Boot, accel: Accel) -> Result<Sample, Error> {
    let port = crate::nbdbench::free_port()?;
    let mut cfg = Config::new(kernel.to_path_buf());
    cfg.add_disk(disk);
    cfg.accel = accel;
    cfg.mem_mib = 256;
    cfg.boot = boot;
    cfg.nbd_port = Some(port);
    cfg.timeout = Some(LIMIT);
    let mut guest = Guest::spawn(&cfg)?;
    loop {
        if handshake(port, Duration::from_secs(10)).is_ok() {
            let serving = guest.started().elapsed();
            return Ok(Sample {
                first_line: guest.first_line(),
                serving,
            });
        }
        // The port forward failed (another process took the port): say so.
        guest.wait_nbd(Duration::ZERO)?;
        if !guest.is_running() || guest.started().elapsed() > LIMIT {
            return Err(Error::Usage(format!(
                "{} boot: no NBD handshake answered (QEMU {}):\n{}",
                boot.name(),
                if guest.is_running() {
                    "still running"
                } else {
                    "exited"
                },
                guest.console()
            )));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn secs(d: Option<Duration>) -> String {
    d.map_or("-".into(), |d| format!("{:.2} s", d.as_secs_f64()))
}

/// Measures `runs` boots of each method (taking turns, so that drift on a
/// shared machine hits all alike) and prints the times.
pub fn run(boots: &[Boot], runs: usize, accel: Accel) -> Result<i32, Error> {
    eprintln!("dioxide bench: building the kernel (release)");
    let kernel = kernel::build()?;
    let disk = crate::image::sample()?;
    println!(
        "boot-to-serving (accel {}): QEMU spawned -> NBD handshake answered on the forwarded port",
        accel.name()
    );
    println!(
        "{:5} {:>4} {:>18} {:>10}",
        "boot", "run", "first kernel line", "serving"
    );
    let mut all: Vec<(Boot, Vec<Duration>)> = boots.iter().map(|b| (*b, Vec::new())).collect();
    let t0 = Instant::now();
    for run in 1..=runs {
        for (boot, times) in all.iter_mut() {
            let s = measure(&kernel, &disk, *boot, accel)?;
            println!(
                "{:5} {:>4} {:>18} {:>10}",
                boot.name(),
                run,
                secs(s.first_line),
                secs(Some(s.serving))
            );
            times.push(s.serving);
        }
    }
    for (boot, times) in &mut all {
        times.sort();
        let list: Vec<String> = times
            .iter()
            .map(|t| format!("{:.2}", t.as_secs_f64()))
            .collect();
        println!(
            "{}: median {} (runs: {} s)",
            boot.name(),
            secs(times.get(times.len() / 2).copied()),
            list.join(", ")
        );
    }
    eprintln!(
        "dioxide bench: {} boots in {:.0} s",
        runs * boots.len(),
        t0.elapsed().as_secs_f64()
    );
    Ok(0)
}
