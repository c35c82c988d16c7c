//! `--net tap`: a host tap device for the guest's NIC, a faster path than
//! QEMU user networking (no user-space TCP/IP relay on the host side).
//!
//! [`Tap::create`] makes `dxtapN` (the first free N) with the host address
//! 172.30.N.1/24 and gives the guest 172.30.N.2 as a static address (the
//! kernel arguments `net.ip=` and `net.gw=`); dropping the `Tap` deletes the
//! device. Needs CAP_NET_ADMIN (root) and `ip` from iproute2.

use crate::Error;
use std::net::Ipv4Addr;
use std::process::Command;

pub struct Tap {
    pub ifname: String,
    pub host: Ipv4Addr,
    pub guest: Ipv4Addr,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip {}: {e} (install iproute2)", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl Tap {
    /// Makes a tap device for one guest.
    pub fn create() -> Result<Tap, Error> {
        let fail = |why: String| {
            Error::Usage(format!(
                "--net tap: {why}; a tap device needs root (CAP_NET_ADMIN): use --net user otherwise"
            ))
        };
        for n in 0..64u8 {
            let ifname = format!("dxtap{n}");
            if std::path::Path::new("/sys/class/net")
                .join(&ifname)
                .exists()
            {
                continue;
            }
            let (host, guest) = (Ipv4Addr::new(172, 30, n, 1), Ipv4Addr::new(172, 30, n, 2));
            match ip(&["tuntap", "add", "dev", &ifname, "mode", "tap"]) {
                Ok(()) => {}
                // Taken by a concurrent run: try the next name.
                Err(_)
                    if std::path::Path::new("/sys/class/net")
                        .join(&ifname)
                        .exists() =>
                {
                    continue
                }
                Err(e) => return Err(fail(e)),
            }
            let tap = Tap {
                ifname,
                host,
                guest,
            };
            ip(&["addr", "add", &format!("{host}/24"), "dev", &tap.ifname]).map_err(fail)?;
            ip(&["link", "set", &tap.ifname, "up"]).map_err(fail)?;
            return Ok(tap);
        }
        Err(fail("dxtap0..dxtap63 all exist".into()))
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
        format!("tap,id=net0,ifname={},script=no,downscript=no", self.ifname)
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        if let Err(e) = ip(&["link", "del", &self.ifname]) {
            eprintln!("dioxide: {e}");
        }
    }
}
