//! Which NIC serves: every network function the kernel drives, in PCI
//! order, and `net.nic=virtio|igb` to choose when several are present
//! (default: the first found). igb serves with one stack per core over
//! its RSS queue pairs, and so does virtio-net with VIRTIO_NET_F_MQ over
//! its queue pairs, steered by the host ([`serve_per_core`]); single-queue
//! virtio-net serves with one stack on the boot core, with the storage
//! cores' hand-over.

use crate::drivers::pci::Function;
use crate::drivers::virtio_net::{self, NetDevice};
use crate::net::{nbd, stack};
use crate::platform::smp;
use core::sync::atomic::{AtomicUsize, Ordering};
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

/// A NIC brought up: virtio-net's queue pairs (one without
/// VIRTIO_NET_F_MQ) and MAC, or igb.
pub enum Found {
    Virtio(alloc::vec::Vec<NetDevice>, [u8; 6]),
    Igb(alloc::boxed::Box<crate::drivers::igb::Nic>),
}

/// How many network stacks (one per core, each on its own queue pair) a
/// multi-queue NIC should serve with: one per online core, but no more
/// than the NVMe queues of the namespace with the fewest (a core whose
/// namespace queue is shared with another would reap that core's
/// completions into its own service) nor than `nic_max`. Logs when that
/// leaves cores out.
pub fn stacks_wanted(what: &str, nic_max: usize) -> usize {
    let nvme_queues = (0..crate::drivers::nvme::disks().len())
        .map(crate::drivers::nvme::queue_count)
        .min()
        .unwrap_or(usize::MAX);
    let cpus = smp::cpu_count();
    let stacks = cpus.min(nvme_queues).clamp(1, nic_max.max(1));
    if stacks < cpus {
        log::warn!(
            target: "net",
            "{what}: {stacks} network stack(s) for {cpus} cores ({} NVMe queues per namespace, {nic_max} NIC queue pairs at most): the other cores do not serve",
            nvme_queues.min(cpus)
        );
    }
    stacks
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
            let want = stacks_wanted(&alloc::format!("{} virtio-net", f.bdf), MAX_STACKS);
            virtio_net::bring_up(f, want as u16).map(|(d, mac)| Found::Virtio(d, mac))
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

/// The most network stacks (cores serving with a queue pair each).
pub const MAX_STACKS: usize = 8;

/// Serves with one network stack per core over igb's queue pairs.
pub fn serve_igb(
    nic: alloc::boxed::Box<crate::drivers::igb::Nic>,
    mounts: &[crate::block::disk::Mounted],
    args: &crate::ServiceArgs,
    addressing: stack::Addressing,
) -> ! {
    let mac = nic.mac();
    let nic = alloc::boxed::Box::leak(nic);
    // The device stays (link, statistics) for the life of the appliance:
    // its queues are in use until power-off.
    let ports = core::mem::take(&mut nic.ports);
    // What RSS cannot hash arrives on queue 0 only: core 0 copies it.
    serve_per_core(
        "RSS",
        ports,
        |p: &crate::drivers::igb::Port| p.queue().has_frame(),
        |core| core == 0,
        mac,
        mounts,
        args,
        addressing,
    )
}

/// Serves with one network stack per core over virtio-net's queue pairs
/// (VIRTIO_NET_F_MQ). The host side steers each flow to one queue (a
/// multi-queue tap: by the flow's hash, then by the queue its replies
/// leave on), and whatever is not a TCP flow of ours may come on any
/// queue: every core copies what the others must see.
pub fn serve_virtio(
    ports: alloc::vec::Vec<NetDevice>,
    mac: [u8; 6],
    mounts: &[crate::block::disk::Mounted],
    args: &crate::ServiceArgs,
    addressing: stack::Addressing,
) -> ! {
    serve_per_core(
        "the host's flow steering",
        ports,
        |p: &NetDevice| p.has_rx(),
        |_| true,
        mac,
        mounts,
        args,
        addressing,
    )
}

/// Serves with one network stack per core over a NIC's queue pairs: core
/// `i` owns queue pair `i` (the NIC spreads connections over them:
/// `spread` says how), its own smoltcp interface and sockets and its own
/// NBD service, and reads from its own NVMe queues; queue 0's core (this
/// one) runs DHCP (`dioxide_service::percore`). Never returns.
/// `rx_ready` says whether a port has a frame waiting; `publishes(core)`
/// whether that core's queue may receive frames other cores must see (ARP
/// replies, DHCP), which it then copies to them.
#[allow(clippy::too_many_arguments)]
fn serve_per_core<P: stack::NetPort + 'static>(
    spread: &str,
    mut ports: alloc::vec::Vec<P>,
    rx_ready: fn(&P) -> bool,
    publishes: fn(usize) -> bool,
    mac: [u8; 6],
    mounts: &[crate::block::disk::Mounted],
    args: &crate::ServiceArgs,
    addressing: stack::Addressing,
) -> ! {
    let cores = ports.len();
    let table = nbd::table(mounts, args);
    let inboxes: &'static Inboxes =
        alloc::boxed::Box::leak(alloc::boxed::Box::new(Inboxes::new(cores)));
    // Every core's stack and service are made here, before the start line,
    // so that its heap figure holds all their sockets (the idle reports
    // must come back to it); each then moves to its core.
    let mut stacks: alloc::vec::Vec<_> = ports
        .drain(..)
        .enumerate()
        .map(|(core, port)| {
            let addressing = if core == 0 {
                addressing
            } else {
                stack::Addressing::Follow
            };
            let dev = Fanout::new(port, rx_ready, core, publishes(core), inboxes);
            let mut net = stack::init(dev, mac, addressing);
            let server = nbd::server(&mut net, table, args);
            (net, server)
        })
        .collect();
    let others = stacks.split_off(1.min(stacks.len()));
    let handed = others.len();
    for (i, (net, server)) in others.into_iter().enumerate() {
        let core = i + 1;
        let moved = Moved((net, server));
        let job = alloc::boxed::Box::new(move || {
            // A method call, so that the closure captures all of `moved`.
            let (net, server) = moved.take();
            STARTED.fetch_add(1, Ordering::AcqRel);
            crate::run_loop(Some(net), Some(server))
        });
        if let Err(e) = smp::run_on(core, job) {
            log::error!(target: "nbd", "core {core}: its network stack did not start: {e:?}");
        }
    }
    // The start line once every core runs its loop: its heap figure then
    // holds everything the cores keep for good (their jobs included).
    let t0 = crate::platform::time::now_ns();
    while STARTED.load(Ordering::Acquire) < handed
        && crate::platform::time::now_ns() - t0 < START_WAIT_NS
    {
        core::hint::spin_loop();
    }
    nbd::announce(table, args.null);
    log::info!(
        target: "nbd",
        "one network stack per core on {cores} core(s): connections spread by {spread}, each served on its core's NVMe queues (heap bound above is per core)"
    );
    match stacks.pop() {
        Some((net, server)) => crate::run_loop(Some(net), Some(server)),
        None => crate::run_loop::<P>(None, None),
    }
}

/// The other cores whose run loop started (`serve_per_core`).
static STARTED: AtomicUsize = AtomicUsize::new(0);
/// How long the boot core waits for them before it logs the start line.
const START_WAIT_NS: u64 = 2_000_000_000;

/// A core's stack and service on their way from the boot core, which made
/// them, to the core that runs them.
struct Moved<T>(T);

impl<T> Moved<T> {
    fn take(self) -> T {
        self.0
    }
}

// SAFETY: what is moved is owned outright (its DMA buffers, which are not
// `Send` because they are raw memory, included) and was never used before
// the move; after it only the receiving core touches it, and the boot core
// keeps no reference to any of it.
unsafe impl<T> Send for Moved<T> {}
