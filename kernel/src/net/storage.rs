//! Storage cores: the NBD service's reads issued and completed on other
//! cores than the network's.
//!
//! The network stack (smoltcp on one virtio-net queue) and the NBD
//! protocol run on the boot core: QEMU's user networking has one queue, so
//! one core owns the frames either way, and it is where most of a
//! request's cycles go (the run-loop profile: 63-66 % network stack,
//! 6-7 % NVMe completion). With more than one core online, every
//! connection is given a storage core ([`core_for`]: cores 1.. in turn);
//! the boot core decodes a read, reserves its buffer and budgets, and
//! hands it to that core as a [`Job`] on the core's lane (a bounded
//! lock-free queue). The storage core issues it on its own queue pair of
//! the namespace (`dioxide_service::issue`: dxfs's `iomap_begin`, the DIO engine, the
//! NVMe submission), reaps its completions (polling, or its own MSI-X
//! vector), and sends each part's result back on the lane's return queue;
//! the boot core collects them in its poll ([`collect`]) and replies. So
//! a connection's reads complete on the core that submitted them, and no
//! lock is shared between cores on the submission or completion path: each
//! engine is taken only by its own core.
//!
//! When (kernel argument `nbd.storage_cores`, default on with interrupt
//! completion, off with polling), measured on a 2-core host under TCG with
//! 2 vCPUs, fio 4K random reads (IOPS, QD1 / QD16):
//!
//! | completion | storage cores | file | null |
//! |---|---|---|---|
//! | poll | on | 217 / 2,071 | 2,199 / 6,428 |
//! | poll | off | 1,210 / 3,484 | 3,998 / 10,100 |
//! | irq | on | 1,719 / 5,116 | 5,442 / 10,200 |
//! | irq | off | 2,019 / 4,619 | 3,603 / 8,437 |
//!
//! A polling storage core spins for the whole time its reads are at the
//! device; the emulated device is QEMU's own thread, which then shares the
//! host's two cores with two spinning vCPUs (the boot core's run loop
//! polls too), and every read waits for it (p50 4 ms at QD1). With
//! interrupt completion the storage core halts until the MSI-X arrives. On
//! real hardware, where the device is not emulated by the host's cores,
//! `nbd.storage_cores=1` with polling is the configuration to measure.
//!
//! Bounds: a lane's job queue holds [`MAX_REQS`](dioxide_service::MAX_REQS) jobs, as many
//! as the service has requests, so a send fails only if that invariant
//! breaks (the job is then issued on the boot core: still correct). The
//! return queue holds [`RETURNS`] results; what a full one cannot take
//! waits, in order, in the storage core's backlog (bounded by the results
//! the requests in flight can owe: their parts and one reference each),
//! and the storage core retries without holding any lock. It never waits
//! for the boot core while it holds an engine: with fewer queues than
//! cores it may share one with the boot core, which takes it before it
//! empties the lanes.
//!
//! A storage core with nothing queued and nothing in flight halts; the
//! boot core wakes it with an IPI after queueing a job when it said it was
//! asleep (the flag is set before the last check for work, with interrupts
//! off until the halt: a job queued in between is seen, or its IPI ends the
//! halt).

use super::nbd::KernelPlatform;
use crate::drivers::nvme;
use crate::platform::smp;
use alloc::collections::VecDeque;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use crossbeam_queue::ArrayQueue;
use crossbeam_utils::CachePadded;
pub use dioxide_service::Done;
use dioxide_service::{issue, Job, Table};
use x86_64::instructions::interrupts;

/// Results a lane's return queue holds.
pub const RETURNS: usize = 4096;

struct Lane {
    /// Jobs and the TSC when each was queued.
    jobs: ArrayQueue<(Job, u64)>,
    done: ArrayQueue<Done>,
    sleeping: AtomicBool,
    /// Wake-ups sent (by the boot core).
    wakes: AtomicU64,
    /// Jobs taken and their cycles from queueing to taken: written by the
    /// storage core for every job, on a line of their own.
    taken: CachePadded<Taken>,
}

struct Taken {
    handed: AtomicU64,
    handoff: AtomicU64,
}

/// (jobs handed over, their mean TSC cycles from queueing to a storage core
/// taking them, wake-up IPIs sent) since the last call, all lanes together:
/// reported with the run-loop profile when the service goes idle (`nbd:
/// storage cores: ...`).
pub fn take_stats() -> (u64, u64, u64) {
    let (mut n, mut c, mut w) = (0, 0, 0);
    for lane in lanes() {
        n += lane.taken.handed.swap(0, Ordering::Relaxed);
        c += lane.taken.handoff.swap(0, Ordering::Relaxed);
        w += lane.wakes.swap(0, Ordering::Relaxed);
    }
    (n, c / n.max(1), w)
}

/// One lane per core (the boot core's is never used).
/// Each on cache lines of its own: a storage core writes only its lane's.
static LANES: spin::Once<Vec<CachePadded<Lane>>> = spin::Once::new();

fn lanes() -> &'static [CachePadded<Lane>] {
    LANES.get().map_or(&[], |l| l.as_slice())
}

/// Starts a storage loop on every core but the boot core, serving `table`'s
/// exports with `jobs` job slots per lane. With one core, or `enabled`
/// false (kernel argument `nbd.storage_cores=0`), nothing: reads are issued
/// in the run loop.
pub fn start(table: &'static Table, jobs: usize, enabled: bool) {
    let cpus = smp::cpu_count();
    if cpus < 2 {
        return;
    }
    if !enabled {
        log::info!(target: "nbd", "reads issued on the boot core (nbd.storage_cores=0; {} cores idle)", cpus - 1);
        return;
    }
    LANES.call_once(|| {
        (0..cpus)
            .map(|_| {
                CachePadded::new(Lane {
                    jobs: ArrayQueue::new(jobs.max(1)),
                    done: ArrayQueue::new(RETURNS),
                    sleeping: AtomicBool::new(false),
                    wakes: AtomicU64::new(0),
                    taken: CachePadded::new(Taken {
                        handed: AtomicU64::new(0),
                        handoff: AtomicU64::new(0),
                    }),
                })
            })
            .collect()
    });
    for cpu in 1..cpus {
        let job = alloc::boxed::Box::new(move || storage_loop(cpu, table));
        if let Err(e) = smp::run_on(cpu, job) {
            // Not reached (every core below cpu_count is online); its
            // connections' reads would wait, so say so.
            log::error!(target: "nbd", "storage core {cpu}: {e:?}");
        }
    }
    log::info!(target: "nbd", "reads issued on storage cores 1..{} (network on core 0)", cpus - 1);
}

/// The storage core of the connection on socket `sock`: 0 (this core)
/// when no storage loop runs.
pub fn core_for(sock: usize) -> usize {
    let n = lanes().len();
    if n < 2 {
        0
    } else {
        1 + sock % (n - 1)
    }
}

/// Queues `job` for storage core `core`; gives it back when that is this
/// core (or the lane is full).
pub fn send(core: usize, job: Job) -> Result<(), Job> {
    if core == smp::cpu_index() {
        return Err(job);
    }
    let Some(lane) = lanes().get(core) else {
        return Err(job);
    };
    lane.jobs
        .push((job, crate::platform::time::rdtsc()))
        .map_err(|(j, _)| j)?;
    if lane.sleeping.load(Ordering::SeqCst) {
        lane.wakes.fetch_add(1, Ordering::Relaxed);
        smp::wake(core);
    }
    Ok(())
}

/// Hands every result the storage cores sent back to `f` (boot core).
pub fn collect(f: &mut dyn FnMut(Done)) {
    for lane in lanes().iter().skip(1) {
        while let Some(d) = lane.done.pop() {
            f(d);
        }
    }
}

/// Sends `d` back to the boot core; when the return queue is full (or
/// results already wait), keeps it in `backlog`, in order. Called with an
/// engine's lock held (from its delivery or the submission), so it must
/// not wait: a core sharing that engine with the boot core would deadlock
/// with it (the boot core takes the engine before it empties the lanes).
fn give_back(lane: &Lane, backlog: &mut VecDeque<Done>, d: Done) {
    if !backlog.is_empty() {
        backlog.push_back(d);
    } else if let Err(d) = lane.done.push(d) {
        backlog.push_back(d);
    }
}

/// Moves what waits in `backlog` to the return queue, as far as it has
/// room (no lock held: the boot core empties it on every poll).
fn flush(lane: &Lane, backlog: &mut VecDeque<Done>) {
    while let Some(d) = backlog.pop_front() {
        if let Err(d) = lane.done.push(d) {
            backlog.push_front(d);
            break;
        }
    }
}

fn storage_loop(cpu: usize, table: &'static Table) {
    let Some(lane) = lanes().get(cpu) else {
        return;
    };
    log::debug!(target: "nbd", "storage core {cpu} serving");
    // Results the return queue had no room for (allocated once; it grows
    // only past RETURNS results waiting, which many-part raw reads on many
    // namespaces can reach).
    let mut backlog: VecDeque<Done> = VecDeque::with_capacity(RETURNS);
    loop {
        while let Some((job, t)) = lane.jobs.pop() {
            // (Another core's TSC: a hair behind ours at worst.)
            let waited = crate::platform::time::rdtsc().saturating_sub(t);
            lane.taken.handoff.fetch_add(waited, Ordering::Relaxed);
            lane.taken.handed.fetch_add(1, Ordering::Relaxed);
            issue(&KernelPlatform, table, &job, &mut |id, result, refs| {
                give_back(lane, &mut backlog, Done { id, result, refs })
            });
        }
        nvme::service(|id, r| {
            give_back(
                lane,
                &mut backlog,
                Done {
                    id,
                    result: Some(r),
                    refs: 1,
                },
            )
        });
        flush(lane, &mut backlog);
        if !backlog.is_empty() {
            // The boot core is behind: let it catch up, then try again.
            core::hint::spin_loop();
            continue;
        }
        // Halt when there is nothing to do: no job and nothing in flight
        // or, with interrupt completion, nothing delivered yet (the
        // completion's MSI-X ends the halt). Polled completions are waited
        // for by spinning: only an interrupt would end the halt.
        let irq = nvme::mode() == nvme::Mode::Irq;
        if lane.jobs.is_empty() && (irq || !nvme::busy()) {
            interrupts::disable();
            lane.sleeping.store(true, Ordering::SeqCst);
            let idle = if irq {
                !nvme::has_deliveries()
            } else {
                !nvme::busy()
            };
            if lane.jobs.is_empty() && idle {
                // sti; hlt: an IPI or completion between the check and the
                // halt still wakes us; the APIC tick bounds the sleep.
                interrupts::enable_and_hlt();
            } else {
                interrupts::enable();
            }
            lane.sleeping.store(false, Ordering::SeqCst);
        }
    }
}
