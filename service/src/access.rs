//! Who may connect and who may write: the access lists given at start
//! (`nbd.allow=`, `nbd.rw_from=`; `docs/plans/writes.md`).
//!
//! A writable appliance on a real network must not take writes from
//! anyone who can reach it. So writes come only from client addresses in
//! the write list; every other client sees each export read-only
//! (`NBD_FLAG_READ_ONLY`, `EPERM` on writes). The connect list, when
//! given, limits who may connect at all: a client outside it is reset as
//! soon as its connection is accepted, before the greeting and before any
//! buffer is given to it. With no write list nobody writes, whatever
//! exports are writable.
//!
//! Syntax of both lists: IPv4 networks separated by commas, each
//! `a.b.c.d/len` or a bare address (`/32`); `any` is `0.0.0.0/0`.

use alloc::string::String;
use alloc::vec::Vec;
use smoltcp::wire::{IpAddress, Ipv4Address, Ipv4Cidr};

/// The access lists. The default lets anyone connect and nobody write.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Access {
    /// Who may connect; `None`: anyone.
    allow: Option<Vec<Ipv4Cidr>>,
    /// Who may write (to the exports that take writes).
    rw_from: Vec<Ipv4Cidr>,
}

/// A list that does not parse: the entry, as given.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BadCidr(pub String);

impl core::fmt::Display for BadCidr {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "{:?} is not an IPv4 network (a.b.c.d/len, a.b.c.d or any)",
            self.0
        )
    }
}

impl core::error::Error for BadCidr {}

/// Parses a list (see the module's documentation).
pub fn parse_list(s: &str) -> Result<Vec<Ipv4Cidr>, BadCidr> {
    if s.trim().is_empty() {
        // An empty list would let nobody connect (or write): a slip.
        return Err(BadCidr(s.into()));
    }
    s.split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .map(|e| {
            if e == "any" {
                return Ok(Ipv4Cidr::new(Ipv4Address::UNSPECIFIED, 0));
            }
            let parsed = if e.contains('/') {
                e.parse::<Ipv4Cidr>().ok()
            } else {
                e.parse::<Ipv4Address>().ok().map(|a| Ipv4Cidr::new(a, 32))
            };
            parsed.ok_or_else(|| BadCidr(e.into()))
        })
        .collect()
}

fn contains(list: &[Ipv4Cidr], ip: IpAddress) -> bool {
    let IpAddress::Ipv4(a) = ip;
    list.iter().any(|c| c.contains_addr(&a))
}

impl Access {
    /// The lists from their kernel arguments: `allow` (`nbd.allow=`;
    /// `None`: anyone may connect) and `rw_from` (`nbd.rw_from=`; `None`:
    /// nobody may write).
    pub fn parse(allow: Option<&str>, rw_from: Option<&str>) -> Result<Access, BadCidr> {
        Ok(Access {
            allow: allow.map(parse_list).transpose()?,
            rw_from: rw_from.map(parse_list).transpose()?.unwrap_or_default(),
        })
    }

    /// A client at `ip` may connect.
    pub fn may_connect(&self, ip: IpAddress) -> bool {
        self.allow.as_deref().is_none_or(|l| contains(l, ip))
    }

    /// A client at `ip` may write (it may connect, and it is in the write
    /// list).
    pub fn may_write(&self, ip: IpAddress) -> bool {
        self.may_connect(ip) && contains(&self.rw_from, ip)
    }

    /// Some client may write.
    pub fn any_writer(&self) -> bool {
        !self.rw_from.is_empty()
    }

    /// For the boot log: `writes from 10.0.2.2/32; connections from any
    /// address`.
    pub fn describe(&self) -> impl core::fmt::Display + '_ {
        struct D<'a>(&'a Access);
        fn list(f: &mut core::fmt::Formatter<'_>, l: &[Ipv4Cidr]) -> core::fmt::Result {
            for (i, c) in l.iter().enumerate() {
                if i > 0 {
                    f.write_str(",")?;
                }
                write!(f, "{c}")?;
            }
            Ok(())
        }
        impl core::fmt::Display for D<'_> {
            fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
                if self.0.rw_from.is_empty() {
                    f.write_str("writes from no address")?;
                } else {
                    f.write_str("writes from ")?;
                    list(f, &self.0.rw_from)?;
                }
                match &self.0.allow {
                    None => f.write_str("; connections from any address"),
                    Some(l) => {
                        f.write_str("; connections only from ")?;
                        list(f, l)
                    }
                }
            }
        }
        D(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddress {
        IpAddress::Ipv4(s.parse().unwrap())
    }

    #[test]
    fn the_lists_parse_networks_addresses_and_any_and_refuse_the_rest() {
        let a = Access::parse(Some("10.0.2.0/24, 192.168.1.7"), Some("10.0.2.2/32")).unwrap();
        assert!(a.may_connect(ip("10.0.2.15")));
        assert!(a.may_connect(ip("192.168.1.7")));
        assert!(!a.may_connect(ip("192.168.1.8")));
        assert!(a.may_write(ip("10.0.2.2")));
        assert!(!a.may_write(ip("10.0.2.3")));
        assert_eq!(
            a.describe().to_string(),
            "writes from 10.0.2.2/32; connections only from 10.0.2.0/24,192.168.1.7/32"
        );
        let any = Access::parse(None, Some("any")).unwrap();
        assert!(any.may_write(ip("203.0.113.9")));
        for bad in ["10.0.2/24", "10.0.2.2/33", "host", "::1", "10.0.2.2/", ""] {
            assert_eq!(
                Access::parse(Some(bad), None),
                Err(BadCidr(bad.into())),
                "{bad}"
            );
            assert_eq!(Access::parse(None, Some(bad)), Err(BadCidr(bad.into())));
        }
    }

    #[test]
    fn by_default_anyone_connects_and_nobody_writes() {
        let a = Access::default();
        assert!(a.may_connect(ip("10.0.2.2")));
        assert!(!a.may_write(ip("10.0.2.2")));
        assert!(!a.any_writer());
        assert_eq!(
            a.describe().to_string(),
            "writes from no address; connections from any address"
        );
        // A writer outside the connect list cannot write either.
        let a = Access::parse(Some("10.0.2.3"), Some("10.0.2.2")).unwrap();
        assert!(!a.may_write(ip("10.0.2.2")));
    }
}
