//! The virtio-net offloads as the CLI takes them (`dioxide run --offload
//! SET --mtu N`, `dioxide bench nbd --offload SET,SET --mtu N,N`): a SET is
//! `default` (the kernel's defaults, no argument), `none`, `all`, or names
//! joined with `+` (`csum+mrg_rxbuf`): those on, the others off. Each
//! becomes the kernel argument `net.NAME=0|1`; the kernel uses an offload
//! only where the device offers it and says so in its boot log.

use crate::Error;

/// The offloads, in the order of the kernel's boot-log line.
pub const NAMES: [&str; 4] = ["csum", "guest_csum", "mrg_rxbuf", "tso"];

/// One set: `None`, the kernel's defaults; else which of [`NAMES`] are on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Offloads(pub Option<[bool; 4]>);

impl Offloads {
    pub fn parse(s: &str) -> Result<Offloads, Error> {
        match s {
            "default" => return Ok(Offloads(None)),
            "none" => return Ok(Offloads(Some([false; 4]))),
            "all" => return Ok(Offloads(Some([true; 4]))),
            _ => {}
        }
        let mut on = [false; 4];
        for w in s.split('+') {
            match NAMES.iter().position(|n| *n == w) {
                Some(i) => on[i] = true,
                None => {
                    return Err(Error::Usage(format!(
                        "--offload {s}: default, none, all, or {} joined with +",
                        NAMES.join(", ")
                    )))
                }
            }
        }
        Ok(Offloads(Some(on)))
    }

    /// A comma-separated list of sets.
    pub fn parse_list(s: &str) -> Result<Vec<Offloads>, Error> {
        let v = crate::bench::parse_list(s)
            .iter()
            .map(|x| Offloads::parse(x))
            .collect::<Result<Vec<_>, _>>()?;
        if v.is_empty() {
            return Err(Error::Usage(format!("--offload {s}: empty")));
        }
        Ok(v)
    }

    /// The kernel arguments: every switch, explicitly.
    pub fn kernel_args(&self) -> Vec<String> {
        match self.0 {
            None => Vec::new(),
            Some(on) => NAMES
                .iter()
                .zip(on)
                .map(|(n, b)| format!("net.{n}={}", u8::from(b)))
                .collect(),
        }
    }

    /// As parsed: `default`, `none`, `all`, `csum+mrg_rxbuf`.
    pub fn label(&self) -> String {
        match self.0 {
            None => "default".into(),
            Some(on) if on == [false; 4] => "none".into(),
            Some(on) if on == [true; 4] => "all".into(),
            Some(on) => NAMES
                .iter()
                .zip(on)
                .filter(|(_, b)| *b)
                .map(|(n, _)| *n)
                .collect::<Vec<_>>()
                .join("+"),
        }
    }
}

/// `--mtu`: an IP MTU from 576 to 65521 (the kernel's range).
pub fn parse_mtu(s: &str) -> Result<u16, Error> {
    s.parse::<u16>()
        .ok()
        .filter(|m| (576..=65521).contains(m))
        .ok_or_else(|| Error::Usage(format!("--mtu {s}: an MTU from 576 to 65521")))
}

/// A comma-separated list of MTUs.
pub fn parse_mtus(s: &str) -> Result<Vec<u16>, Error> {
    let v = crate::bench::parse_list(s)
        .iter()
        .map(|x| parse_mtu(x))
        .collect::<Result<Vec<_>, _>>()?;
    if v.is_empty() {
        return Err(Error::Usage(format!("--mtu {s}: empty")));
    }
    Ok(v)
}

/// The exact frame counts of a console transcript, per idle period of the
/// NBD service: (requests, frames sent, frames received) from each
/// `run loop since the last idle: N requests` line and the
/// `virtio-net since the last count: T frames sent (...), R received` line
/// after it.
pub fn frame_counts(console: &str) -> Vec<(u64, u64, u64)> {
    let mut out = Vec::new();
    let mut reqs = None;
    for l in console.lines() {
        if let Some(i) = l.find("run loop since the last idle: ") {
            let rest = &l[i + "run loop since the last idle: ".len()..];
            reqs = rest.split(' ').next().and_then(|n| n.parse::<u64>().ok());
        } else if let Some(i) = l.find("virtio-net since the last count: ") {
            let rest = &l[i + "virtio-net since the last count: ".len()..];
            let sent = rest.split(' ').next().and_then(|n| n.parse::<u64>().ok());
            let recv = rest
                .find("), ")
                .and_then(|j| rest[j + 3..].split(' ').next())
                .and_then(|n| n.parse::<u64>().ok());
            if let (Some(n), Some(t), Some(r)) = (reqs.take(), sent, recv) {
                out.push((n, t, r));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sets_parse_to_kernel_arguments() {
        let o = Offloads::parse("csum+mrg_rxbuf").unwrap();
        assert_eq!(
            o.kernel_args(),
            [
                "net.csum=1",
                "net.guest_csum=0",
                "net.mrg_rxbuf=1",
                "net.tso=0"
            ]
        );
        assert_eq!(o.label(), "csum+mrg_rxbuf");
        assert!(Offloads::parse("default").unwrap().kernel_args().is_empty());
        assert_eq!(Offloads::parse("none").unwrap().label(), "none");
        assert_eq!(
            Offloads::parse("all").unwrap().kernel_args()[3],
            "net.tso=1"
        );
        assert!(Offloads::parse("csum+lro").is_err());
        let l = Offloads::parse_list("none,csum,all").unwrap();
        assert_eq!(l.len(), 3);
        assert_eq!(parse_mtus("1500,9000").unwrap(), [1500, 9000]);
        assert!(parse_mtu("100").is_err());
    }

    #[test]
    fn frame_counts_from_the_console() {
        let c = "\
[ 1.0] INFO  nbd: idle: 100 requests served, heap 1 bytes in use, peak 2 bytes
[ 1.0] INFO  nbd: run loop since the last idle: 100 requests, 5 loops, cycles per request 9: net 1 (1%)
[ 1.0] INFO  net: virtio-net since the last count: 310 frames sent (300 with partial checksum, 0 GSO, 0 dropped), 155 received (0 merged, 0 bad checksum)
[ 1.0] INFO  nbd: frames per request: 3 sent (1 cycles to build, 2 to hand over, each), 1 received (3 cycles to process each)
[ 2.0] INFO  nbd: run loop since the last idle: 7 requests, 5 loops, cycles per request 9: net 1 (1%)
[ 2.0] INFO  net: virtio-net since the last count: 7 frames sent (0 with partial checksum, 0 GSO, 0 dropped), 14 received (0 merged, 0 bad checksum)
";
        assert_eq!(frame_counts(c), [(100, 310, 155), (7, 7, 14)]);
    }
}
