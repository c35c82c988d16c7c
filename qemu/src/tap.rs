//! `--net tap`: a host tap device for the guest's NIC, a faster path than
//! QEMU user networking (no user-space TCP/IP relay on the host side).
//!
//! [`Tap::create`] makes `dxtapN` (the first free N) with the host address
//! 172.30.N.1/24 and gives the guest 172.30.N.2 as a static address (the
//! kernel arguments `net.ip=` and `net.gw=`); dropping the `Tap` deletes the
//! device. Needs root with CAP_NET_ADMIN, `/dev/net/tun` and `ip` from
//! iproute2. Where the machine or account cannot have a tap device (not
//! root, no CAP_NET_ADMIN, no usable `/dev/net/tun`, `ip` refused with
//! EPERM) the error is [`Error::TapUnavailable`]; any other failure (`ip`
//! not installed, ...) is a real error.

use crate::Error;
use std::net::Ipv4Addr;
use std::process::Command;

pub struct Tap {
    pub ifname: String,
    pub host: Ipv4Addr,
    pub guest: Ipv4Addr,
    /// Queues (`multi_queue` above 1).
    pub queues: u16,
}

/// Capability number of CAP_NET_ADMIN (linux/capability.h).
const CAP_NET_ADMIN: u32 = 12;

/// Whether the `CapEff:` line of a `/proc/PID/status` text holds
/// CAP_NET_ADMIN; `None` when there is no such line.
fn has_net_admin(status: &str) -> Option<bool> {
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))?
        .trim();
    let caps = u64::from_str_radix(hex, 16).ok()?;
    Some(caps & (1 << CAP_NET_ADMIN) != 0)
}

/// What failing to open `/dev/net/tun` means.
fn tun_open_error(e: &std::io::Error) -> Error {
    use std::io::ErrorKind;
    match (e.kind(), e.raw_os_error()) {
        (ErrorKind::NotFound, _) => {
            Error::TapUnavailable("no /dev/net/tun (no tun driver on this machine)".into())
        }
        (ErrorKind::PermissionDenied, _) => {
            Error::TapUnavailable(format!("/dev/net/tun: {e} (needs root)"))
        }
        (_, Some(libc::ENODEV | libc::ENXIO)) => {
            Error::TapUnavailable(format!("/dev/net/tun: {e} (tun driver not loaded)"))
        }
        _ => Error::Tap(format!("/dev/net/tun: {e}")),
    }
}

/// Whether this process can make a tap device at all.
fn check_privileges() -> Result<(), Error> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(Error::TapUnavailable(
            "not root (a tap device needs CAP_NET_ADMIN)".into(),
        ));
    }
    if let Ok(status) = std::fs::read_to_string("/proc/self/status") {
        if has_net_admin(&status) == Some(false) {
            return Err(Error::TapUnavailable(
                "root but without CAP_NET_ADMIN (a restricted container?)".into(),
            ));
        }
    }
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .map(drop)
        .map_err(|e| tun_open_error(&e))
}

/// What a failed `ip` command means: EPERM is a missing privilege (the
/// network namespace is not ours), anything else a real error.
fn ip_failure(args: &[&str], stderr: &str) -> Error {
    let what = format!("ip {}: {}", args.join(" "), stderr.trim());
    if stderr.contains("Operation not permitted") {
        Error::TapUnavailable(what)
    } else {
        Error::Tap(what)
    }
}

fn ip(args: &[&str]) -> Result<(), Error> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|source| Error::Spawn {
            program: "ip".into(),
            hint: "apt-get install iproute2",
            source,
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(ip_failure(args, &String::from_utf8_lossy(&out.stderr)))
    }
}

impl Tap {
    /// Makes a tap device for one guest.
    pub fn create() -> Result<Tap, Error> {
        Tap::with_queues(1)
    }

    /// Makes a tap device for one guest with `queues` queues (a
    /// `multi_queue` tap above 1: QEMU's `queues=` needs one, and a
    /// single-queue netdev cannot open one).
    pub fn with_queues(queues: u16) -> Result<Tap, Error> {
        check_privileges()?;
        for n in 0..64u8 {
            let ifname = format!("dxtap{n}");
            let exists = || {
                std::path::Path::new("/sys/class/net")
                    .join(&ifname)
                    .exists()
            };
            if exists() {
                continue;
            }
            let (host, guest) = (Ipv4Addr::new(172, 30, n, 1), Ipv4Addr::new(172, 30, n, 2));
            let mut add = vec!["tuntap", "add", "dev", &ifname, "mode", "tap"];
            if queues > 1 {
                add.push("multi_queue");
            }
            match ip(&add) {
                Ok(()) => {}
                // Taken by a concurrent run: try the next name.
                Err(Error::Tap(_)) if exists() => continue,
                Err(e) => return Err(e),
            }
            // Deleted on drop, also when the steps below fail.
            let tap = Tap {
                ifname,
                host,
                guest,
                queues: queues.max(1),
            };
            ip(&["addr", "add", &format!("{host}/24"), "dev", &tap.ifname])?;
            ip(&["link", "set", &tap.ifname, "up"])?;
            return Ok(tap);
        }
        Err(Error::Tap("dxtap0..dxtap63 all exist".into()))
    }

    /// Sets the host side's MTU (jumbo frames: the guest's NIC gets the
    /// same through `host_mtu=`, so the host's TCP announces an MSS to
    /// match).
    pub fn set_mtu(&self, mtu: u16) -> Result<(), Error> {
        ip(&["link", "set", "dev", &self.ifname, "mtu", &mtu.to_string()])
    }

    /// Kernel arguments giving the guest its address.
    pub fn guest_args(&self) -> Vec<String> {
        vec![
            format!("net.ip={}/24", self.guest),
            format!("net.gw={}", self.host),
        ]
    }

    /// QEMU's -netdev value.
    pub fn netdev(&self) -> String {
        let mut n = format!("tap,id=net0,ifname={},script=no,downscript=no", self.ifname);
        if self.queues > 1 {
            n += &format!(",queues={}", self.queues);
        }
        n
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        if let Err(e) = ip(&["link", "del", &self.ifname]) {
            eprintln!("dioxide: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cap_net_admin_from_proc_status() {
        let root = "Name:\tx\nCapInh:\t0000000000000000\nCapEff:\t000001ffffffffff\n";
        assert_eq!(has_net_admin(root), Some(true));
        let user = "CapEff:\t0000000000000000\n";
        assert_eq!(has_net_admin(user), Some(false));
        // Everything but bit 12.
        let no_net_admin = format!("CapEff:\t{:016x}\n", 0x1ff_ffff_ffffu64 & !(1 << 12));
        assert_eq!(has_net_admin(&no_net_admin), Some(false));
        assert_eq!(has_net_admin("Name:\tx\n"), None);
    }

    #[test]
    fn missing_tun_is_a_skip_reason_other_errors_are_not() {
        use std::io::{Error as IoError, ErrorKind};
        let skip = |e: IoError| matches!(tun_open_error(&e), Error::TapUnavailable(_));
        assert!(skip(IoError::from(ErrorKind::NotFound)));
        assert!(skip(IoError::from(ErrorKind::PermissionDenied)));
        assert!(skip(IoError::from_raw_os_error(libc::ENODEV)));
        assert!(!skip(IoError::from_raw_os_error(libc::EMFILE)));
    }

    #[test]
    fn ip_failures() {
        let e = ip_failure(
            &["tuntap", "add"],
            "ioctl(TUNSETIFF): Operation not permitted\n",
        );
        assert!(matches!(e, Error::TapUnavailable(_)), "{e:?}");
        assert_eq!(e.exit_code(), 2);
        let e = ip_failure(&["addr", "add"], "Error: ipv4: Address already assigned.");
        assert!(matches!(e, Error::Tap(_)), "{e:?}");
        assert_eq!(e.exit_code(), 125);
        assert!(e.to_string().contains("ip addr add: Error: ipv4"), "{e}");
    }
}
