//! Which NIC serves: every network function the kernel drives, in PCI
//! order, and `net.nic=virtio|igb` to choose when several are present
//! (default: the first found). virtio-net serves with one stack (on the
//! boot core, with the storage cores' hand-over); igb serves with one
//! stack per core over its RSS queue pairs ([`serve_per_core`]).

use crate::drivers::pci::Function;
use crate::drivers::virtio_net::{self, NetDevice};
use crate::net::{nbd, stack};
use crate::platform::smp;
use dioxide_service::percore::{Fanout, Inboxes};

/// The NIC kinds the kernel drives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Virtio,
    Igb,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Virtio => "virtio",
            Kind::Igb => "igb",
        }
    }

    fn of(f: &Function) -> Option<Kind> {
        if virtio_net::matches(f) {
            Some(Kind::Virtio)
        } else if crate::drivers::igb::matches(f) {
            Some(Kind::Igb)
        } else {
            None
        }
    }
}

/// A NIC brought up.
pub enum Found {
    Virtio(alloc::boxed::Box<NetDevice>, [u8; 6]),
    Igb(alloc::boxed::Box<crate::drivers::igb::Nic>),
}

/// Finds the NIC to serve on: the first of kind `wanted` (`net.nic=`), or
/// the first of any kind, in PCI order; brings it up. Logs every NIC seen
/// and why none serves.
pub fn find(functions: &[Function], wanted: Option<&str>) -> Option<Found> {
    let seen: alloc::vec::Vec<(Kind, &Function)> = functions
        .iter()
        .filter_map(|f| Some((Kind::of(f)?, f)))
        .collect();
    for (k, f) in &seen {
        log::info!(target: "net", "{}: {} NIC ({:04x}:{:04x})", f.bdf, k.name(), f.vendor, f.device);
    }
    let pick = match wanted {
        None => seen.first(),
        Some(w) => {
            if ![Kind::Virtio, Kind::Igb].iter().any(|k| k.name() == w) {
                log::error!(target: "net", "net.nic={w}: expected virtio or igb; serving on the first NIC found");
                seen.first()
            } else {
                let p = seen.iter().find(|(k, _)| k.name() == w);
                if p.is_none() {
                    log::error!(target: "net", "net.nic={w}: no such NIC: no network service");
                    return None;
                }
                p
            }
        }
    };
    let Some(&(kind, f)) = pick else {
        log::warn!(target: "net", "no NIC the kernel drives (virtio-net, igb): no network service");
        return None;
    };
    let found = match kind {
        Kind::Virtio => {
            virtio_net::bring_up(f).map(|(d, mac)| Found::Virtio(alloc::boxed::Box::new(d), mac))
        }
        Kind::Igb => {
            crate::drivers::igb::bring_up(f).map(|n| Found::Igb(alloc::boxed::Box::new(n)))
        }
    };
    if found.is_none() {
        log::warn!(target: "net", "{}: {} did not come up: no network service", f.bdf, kind.name());
    }
    found
}

/// Serves with one network stack per core over igb's queue pairs: core
/// `i` owns queue pair `i` (RSS spreads connections over them), its own
/// smoltcp interface and sockets and its own NBD service, and reads from
/// its own NVMe queues; queue 0's core (this one) runs DHCP and answers
/// what RSS cannot hash, and copies ARP to the others
/// (`dioxide_service::percore`). Never returns.
pub fn serve_per_core(
    nic: alloc::boxed::Box<crate::drivers::igb::Nic>,
    mounts: &[crate::block::disk::Mounted],
    args: &crate::ServiceArgs,
    addressing: stack::Addressing,
) -> ! {
    let mac = nic.mac();
    let nic = alloc::boxed::Box::leak(nic);
    // The device stays (link, statistics) for the life of the appliance:
    // its queues are in use until power-off.
    let mut ports = core::mem::take(&mut nic.ports);
    let cores = ports.len();
    let table = nbd::table(mounts, args.null);
    let inboxes: &'static Inboxes =
        alloc::boxed::Box::leak(alloc::boxed::Box::new(Inboxes::new(cores)));
    nbd::announce(table, args.null);
    log::info!(
        target: "nbd",
        "one network stack per core on {cores} core(s): connections spread by RSS, each served on its core's NVMe queues (heap bound above is per core)"
    );
    let stall_ns = args.stall_ns;
    let others = ports.split_off(1.min(ports.len()));
    for (i, port) in others.into_iter().enumerate() {
        let core = i + 1;
        let job = alloc::boxed::Box::new(move || {
            serve_core(
                port,
                core,
                mac,
                stack::Addressing::Follow,
                table,
                inboxes,
                stall_ns,
            )
        });
        if let Err(e) = smp::run_on(core, job) {
            log::error!(target: "nbd", "core {core}: its network stack did not start: {e:?}");
        }
    }
    let Some(port0) = ports.pop() else {
        crate::run_loop::<NetDevice>(None, None)
    };
    serve_core(port0, 0, mac, addressing, table, inboxes, stall_ns)
}

/// Core `core`'s stack and service on `port`, then its run loop.
fn serve_core(
    port: crate::drivers::igb::Port,
    core: usize,
    mac: [u8; 6],
    addressing: stack::Addressing,
    table: &'static dioxide_service::Table,
    inboxes: &'static Inboxes,
    stall_ns: u64,
) -> ! {
    let dev = Fanout::new(port, core, core == 0, inboxes);
    let mut net = stack::init(dev, mac, addressing);
    let server = nbd::server(&mut net, table, stall_ns);
    crate::run_loop(Some(net), Some(server))
}
