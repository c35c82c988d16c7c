//! Shadow doorbells, several I/O queue pairs sharing one controller, and
//! namespaces, against the simulated controller.

use crate::blk::NvmeQueue;
use crate::cmd::io;
use crate::queue::need_event;
use crate::sim::{Fault, FaultAction, Sim, SimConfig, SimHal, SimNamespace};
use crate::*;
use dioxide_blk::{BlkError, BlockQueue, IoBuf, Op};
use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;

/// This thread's "nvme" log lines since the last call.
fn logged() -> Vec<String> {
    dioxide_testkit::logged("nvme")
}

type Ctrl = Controller<SimHal, Sim>;
type Qp = QueuePair<SimHal, Sim>;
type Shared = SharedController<SimHal, Sim>;
type Nq = NvmeQueue<SimHal, Sim>;

fn config(dbbuf: bool) -> Config {
    Config {
        admin_entries: 8,
        admin_timeout_ms: 100,
        io_timeout_ms: 100,
        abort_grace_ms: 50,
        dbbuf,
        ..Config::default()
    }
}

fn pattern(i: u64) -> u8 {
    (i.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 56) as u8
}

fn new_sim(cfg: SimConfig) -> Sim {
    let sim = Sim::new(cfg);
    let disk: Vec<u8> = (0..sim.disk().len()).map(|i| pattern(i as u64)).collect();
    sim.write_disk(0, &disk);
    sim
}

fn small() -> SimConfig {
    SimConfig {
        block_size: 512,
        blocks: 1024,
        ..Default::default()
    }
}

/// A page-aligned host buffer of `pages` pages: (vector, offset of the
/// aligned start).
fn pages(n: usize) -> (Vec<u8>, usize) {
    let v = vec![0u8; (n + 1) * PAGE_SIZE];
    let off = (PAGE_SIZE - v.as_ptr() as usize % PAGE_SIZE) % PAGE_SIZE;
    (v, off)
}

/// Submits a read of one 512-byte block at `lba` into `buf` with `tag`.
fn submit_read(qp: &mut Qp, lba: u64, buf: &mut [u8], tag: u64) -> u16 {
    // SAFETY: every caller keeps `buf` alive and untouched until the
    // command's completion was delivered.
    unsafe {
        qp.submit(
            SubmissionEntry::read(1, lba, 1),
            Some(DataBuf::from_mut_slice(buf)),
            tag,
        )
        .unwrap()
    }
}

#[test]
fn need_event_is_the_virtio_test_and_errs_towards_a_doorbell_across_the_wrap() {
    // The controller waits at `old` (it consumed everything): notify.
    assert!(need_event(5, 6, 5));
    assert!(need_event(5, 9, 5));
    // It is still behind `old` and will read the shadow tail again: skip.
    assert!(!need_event(3, 6, 5));
    assert!(!need_event(0, 6, 5));
    // Across the ring's wrap (entries 8: tail 6 -> 1, indices not modulo
    // 2^16): waiting at old notifies, behind old skips.
    assert!(need_event(6, 1, 6));
    assert!(!need_event(4, 1, 6));
    assert!(!need_event(1, 1, 6));
    // A stale index from before the wrap asks for a (harmless) doorbell.
    assert!(need_event(0, 1, 6));
    // Free-running u16 wrap.
    assert!(need_event(0xffff, 0, 0xffff));
    assert!(!need_event(0xfffe, 0, 0xffff));
    // Nothing new: never.
    assert!(!need_event(5, 5, 5));
}

#[test]
fn doorbell_buffer_is_configured_and_io_works_through_shadow_doorbells() {
    let _ = logged();
    let sim = new_sim(small());
    let hal = SimHal::new();
    let mut ctrl = Ctrl::init(hal.clone(), sim.clone(), config(true)).unwrap();
    assert!(logged().iter().any(|l| l == "doorbell buffer: on"));
    assert!(ctrl.doorbell_buffer());
    assert!(sim.dbbuf_enabled());
    assert_eq!(sim.dbbuf_configs(), 1);
    let mut qp = ctrl.create_io_queue(1, 8, None).unwrap();
    assert!(qp.shadow_doorbells());
    assert!(!ctrl.admin().shadow_doorbells());
    let disk = sim.disk();
    let mut buf = vec![0u8; 512];
    // 7 slots, 8 entries: 300 commands wrap the rings many times.
    for i in 0..300u64 {
        let lba = (i * 13) % 1024;
        // SAFETY: buf lives until execute returns.
        unsafe {
            qp.execute(
                SubmissionEntry::read(1, lba, 1),
                Some(DataBuf::from_mut_slice(&mut buf)),
            )
            .unwrap()
        };
        assert_eq!(buf[..], disk[lba as usize * 512..][..512], "command {i}");
    }
    assert_eq!(sim.bad_shadow_values(), 0);
    // The device processes each doorbell at once: it always waits at the
    // old tail, so every doorbell is written.
    assert_eq!(sim.doorbell_writes(1).0, 300);
}

/// The model processes a queue only after its doorbell, later (QEMU's
/// timer): commands submitted meanwhile need no MMIO write.
fn batched_reads(dbbuf: bool, cq_eventidx: bool) -> (Sim, Qp) {
    let sim = new_sim(SimConfig {
        cq_eventidx,
        ..small()
    });
    let hal = SimHal::new();
    let mut ctrl = Ctrl::init(hal, sim.clone(), config(dbbuf)).unwrap();
    let mut qp = ctrl.create_io_queue(1, 8, None).unwrap();
    assert_eq!(qp.shadow_doorbells(), dbbuf);
    sim.set_deferred(true);
    let disk = sim.disk();
    let (mut v, o) = pages(1);
    // Batches of 5 reads (7 slots) for 40 rounds: the tail wraps the
    // 8-entry ring 25 times, at every position.
    for round in 0..40u64 {
        for k in 0..5u64 {
            let lba = (round * 5 + k) % 1024;
            let buf = &mut v[o + k as usize * 512..o + (k as usize + 1) * 512];
            submit_read(&mut qp, lba, buf, round * 5 + k);
        }
        sim.run_pending();
        let mut got = Vec::new();
        qp.process_completions(|c| got.push((c.tag, c.result)));
        got.sort_by_key(|&(t, _)| t);
        assert_eq!(got.len(), 5, "round {round}: {got:?}");
        for (k, (tag, r)) in got.into_iter().enumerate() {
            assert_eq!(tag, round * 5 + k as u64);
            assert!(r.is_ok());
            let lba = tag % 1024;
            assert_eq!(
                v[o + k * 512..o + (k + 1) * 512],
                disk[lba as usize * 512..][..512]
            );
        }
    }
    assert_eq!(qp.stats().completed, 200);
    assert_eq!(sim.bad_shadow_values(), 0);
    (sim, qp)
}

#[test]
fn shadow_doorbells_save_mmio_writes_while_the_controller_is_busy() {
    let (sim, qp) = batched_reads(true, true);
    // One SQ doorbell per batch instead of five; one CQ doorbell per reap.
    assert_eq!(sim.doorbell_writes(1), (40, 40));
    let s = qp.stats();
    assert_eq!((s.doorbell_writes, s.doorbells_skipped), (80, 160));
    let (sim, qp) = batched_reads(false, true);
    assert_eq!(sim.doorbell_writes(1), (200, 40));
    assert_eq!(qp.stats().doorbells_skipped, 0);
}

#[test]
fn shadow_doorbells_work_with_qemu_7_2_0_which_never_writes_the_cq_event_index() {
    let (sim, _qp) = batched_reads(true, false);
    // The CQ event index stays 0: only a head moving from 0 rings MMIO; the
    // controller reads the shadow head before posting, and the queue never
    // holds more completions than it has slots, so none is lost.
    let (sq, cq) = sim.doorbell_writes(1);
    assert_eq!(sq, 40);
    assert!(cq < 40, "{cq}");
}

#[test]
fn doorbell_buffer_off_when_unsupported_or_disabled() {
    let _ = logged();
    let sim = new_sim(SimConfig {
        dbbuf: false,
        ..small()
    });
    let mut ctrl = Ctrl::init(SimHal::new(), sim.clone(), config(true)).unwrap();
    assert!(logged()
        .iter()
        .any(|l| l == "doorbell buffer: off (not supported)"));
    assert!(!ctrl.doorbell_buffer());
    let mut qp = ctrl.create_io_queue(1, 8, None).unwrap();
    assert!(!qp.shadow_doorbells());
    let mut buf = vec![0u8; 512];
    // SAFETY: buf lives until execute returns.
    unsafe {
        qp.execute(
            SubmissionEntry::read(1, 3, 1),
            Some(DataBuf::from_mut_slice(&mut buf)),
        )
        .unwrap()
    };
    assert_eq!(buf[..], sim.disk()[3 * 512..4 * 512]);
    assert_eq!(sim.dbbuf_configs(), 0);
    assert_eq!(sim.doorbell_writes(1), (1, 1));

    let sim = new_sim(small());
    let ctrl = Ctrl::init(SimHal::new(), sim.clone(), config(false)).unwrap();
    assert!(logged()
        .iter()
        .any(|l| l == "doorbell buffer: off (disabled)"));
    assert!(!ctrl.doorbell_buffer());
    assert!(!sim.dbbuf_enabled());
}

#[test]
fn a_reset_gives_the_doorbell_buffer_again_and_the_queue_starts_from_zeroed_slots() {
    let sim = new_sim(small());
    let hal = SimHal::new();
    let mut ctrl = Ctrl::init(hal.clone(), sim.clone(), config(true)).unwrap();
    let mut qp = ctrl.create_io_queue(1, 8, None).unwrap();
    let disk = sim.disk();
    let (mut v, o) = pages(1);
    // Move the tail to 5 (shadow slot 5), then stall one command there.
    for i in 0..5u64 {
        submit_read(&mut qp, i, &mut v[o..o + 512], i);
        assert_eq!(qp.process_completions(|c| assert!(c.result.is_ok())), 1);
    }
    drop_read(&sim, 9);
    submit_read(&mut qp, 9, &mut v[o + 512..o + 1024], 99);
    let mut failed = Vec::new();
    ctrl.reset(&mut [&mut qp], |c| failed.push((c.tag, c.result)))
        .unwrap();
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0].0, 99);
    assert!(matches!(failed[0].1, Err(NvmeError::Cancelled { .. })));
    assert!(!sim.may_access(v[o + 512..].as_ptr() as usize, 512));
    assert_eq!(sim.disables(), 1);
    assert_eq!(sim.dbbuf_configs(), 2);
    assert!(sim.dbbuf_enabled());
    assert_eq!(ctrl.epoch(), 1);
    assert_eq!(qp.epoch(), 1);
    // The ring starts again at 0: had the shadow slot kept its 6, the
    // controller would fetch six stale entries.
    for i in 0..20u64 {
        let lba = 100 + i;
        submit_read(&mut qp, lba, &mut v[o..o + 512], i);
        assert_eq!(qp.process_completions(|c| assert!(c.result.is_ok())), 1);
        assert_eq!(v[o..o + 512], disk[lba as usize * 512..][..512]);
    }
    assert_eq!(sim.bad_shadow_values(), 0);
    assert_eq!(qp.stats().completed, 25);
}

// ---------------------------------------------------------------------------
// Several queues.

#[test]
fn create_io_queues_gives_each_queue_its_msix_entry_up_to_what_qemu_grants() {
    let sim = new_sim(small());
    let mut ctrl = Ctrl::init(SimHal::new(), sim.clone(), config(true)).unwrap();
    let qs = ctrl.create_io_queues(4, 4096, true).unwrap();
    assert_eq!(qs.len(), 4);
    for (i, q) in qs.iter().enumerate() {
        let qid = i as u16 + 1;
        assert_eq!(q.qid(), qid);
        assert_eq!(q.vector(), Some(qid));
        // Clamped to CAP.MQES + 1.
        assert_eq!(q.entries(), 1024);
        assert!(q.shadow_doorbells());
        let info = sim.io_queue(qid).unwrap();
        assert_eq!(info.vector, Some(qid));
    }
    // QEMU 7.2 grants 64 I/O queue pairs (max_ioqpairs), MSI-X entries
    // 1..=64 of its 65 (msix_qsize).
    let sim = new_sim(small());
    let mut ctrl = Ctrl::init(SimHal::new(), sim.clone(), config(true)).unwrap();
    let qs = ctrl.create_io_queues(100, 4, true).unwrap();
    assert_eq!(qs.len(), 64);
    assert_eq!(qs[63].vector(), Some(64));
    assert!(sim.has_io_queue(64));
    // Polled queues.
    let sim = new_sim(small());
    let mut ctrl = Ctrl::init(SimHal::new(), sim.clone(), config(true)).unwrap();
    let qs = ctrl.create_io_queues(2, 16, false).unwrap();
    assert!(qs.iter().all(|q| q.vector().is_none()));
}

/// What the owners of block requests heard: tag -> results (each must be
/// one).
type Heard = HashMap<u64, Vec<Result<(), BlkError>>>;

/// The next read of `lba` is fetched and never answered.
fn drop_read(sim: &Sim, lba: u64) {
    sim.inject(Fault {
        admin: false,
        opcode: io::READ,
        lba: Some(lba),
        action: FaultAction::Drop,
        count: 1,
    });
}

fn heard_once(h: &Heard) -> bool {
    h.values().all(|v| v.len() == 1)
}

fn ns() -> Namespace {
    Namespace {
        nsid: 1,
        block_size: 512,
        blocks: 1024,
    }
}

/// Two queues on one controller: (sim, hal, shared, queue 1, queue 2).
fn two_queues(cfg: SimConfig) -> (Sim, SimHal, Arc<Shared>, Nq, Nq) {
    let sim = new_sim(cfg);
    let hal = SimHal::new();
    let mut ctrl = Ctrl::init(hal.clone(), sim.clone(), config(true)).unwrap();
    let mut qs = ctrl.create_io_queues(2, 16, false).unwrap();
    let shared = Arc::new(SharedController::new(ctrl));
    let q2 = NvmeQueue::new(qs.pop().unwrap(), hal.clone(), ns()).with_controller(shared.clone());
    let q1 = NvmeQueue::new(qs.pop().unwrap(), hal.clone(), ns()).with_controller(shared.clone());
    (sim, hal, shared, q1, q2)
}

/// Submits a read of one block at `lba` into the 512 bytes at host address
/// `addr` through the block layer's interface.
fn blk_read(q: &mut Nq, lba: u64, addr: usize, tag: u64) -> Result<(), BlkError> {
    let buf = IoBuf::from_addr(addr, 512).unwrap();
    // SAFETY: the callers keep the memory at `addr` alive and untouched
    // until its completion was heard.
    unsafe { q.submit(Op::Read, lba, buf, tag) }
}

#[test]
fn one_queue_times_out_the_reset_fails_every_command_on_both_queues_once_and_both_serve_again() {
    let (sim, hal, shared, mut q1, mut q2) = two_queues(small());
    let disk = sim.disk();
    sim.set_ignore_aborts(true);
    // Queue 1's read of LBA 10 and queue 2's read of LBA 20 are fetched
    // and never answered.
    for lba in [10, 20] {
        drop_read(&sim, lba);
    }
    let (v, o) = pages(8);
    let base = v.as_ptr() as usize + o;
    let bufs: Vec<(usize, usize)> = (0..8).map(|i| (base + i * 512, 512)).collect();
    let heard = RefCell::new(Heard::new());
    let hear = |tag: u64, r: Result<(), BlkError>| {
        let (addr, len) = bufs[tag as usize];
        assert!(
            !sim.may_access(addr, len),
            "tag {tag} heard while the device could still access its buffer"
        );
        heard.borrow_mut().entry(tag).or_default().push(r);
    };
    let buf = |tag: usize| base + tag * 512;
    // t = 0: queue 1's doomed read.
    blk_read(&mut q1, 10, buf(0), 0).unwrap();
    hal.advance(90_000_000);
    // t = 90 ms: queue 2's doomed read (deadline 190 ms) and a good one.
    blk_read(&mut q2, 20, buf(1), 1).unwrap();
    blk_read(&mut q2, 21, buf(2), 2).unwrap();
    assert_eq!(q2.poll(hear), 1);
    // Queue 1's timer runs: abort at 100 ms (declined), reset at 150 ms.
    let mut steps = 0;
    while shared.epoch() == 0 {
        hal.advance(10_000_000);
        q1.poll(hear);
        q1.expire(hear);
        steps += 1;
        assert!(steps < 50, "no reset");
    }
    assert_eq!(sim.disables(), 1);
    assert!(matches!(heard.borrow()[&0][..], [Err(BlkError::Timeout)]));
    // Queue 2 has not looked yet: its commands wait; one more, submitted
    // between the reset and its rejoin, never reaches the device.
    assert!(!heard.borrow().contains_key(&1));
    let before = sim.commands();
    blk_read(&mut q2, 22, buf(3), 3).unwrap();
    assert_eq!(sim.commands(), before);
    assert_eq!(q2.in_flight(), 2);
    // Its next poll notices the new epoch and rejoins.
    q2.poll(hear);
    assert_eq!(q2.qp.epoch(), 1);
    assert_eq!(shared.lock().stats().rejoins, 1);
    {
        let h = heard.borrow();
        assert!(matches!(h[&1][..], [Err(BlkError::Cancelled)]), "{h:?}");
        assert!(matches!(h[&3][..], [Err(BlkError::Cancelled)]), "{h:?}");
        assert!(matches!(h[&2][..], [Ok(())]));
    }
    assert_eq!(v[o + 3 * 512..o + 4 * 512], [0u8; 512][..]);
    // Both queues serve again, through their (zeroed) shadow slots.
    for (i, q) in [&mut q1, &mut q2].into_iter().enumerate() {
        let tag = 4 + i as u64;
        let lba = 300 + i as u64;
        blk_read(q, lba, buf(tag as usize), tag).unwrap();
        assert_eq!(q.poll(hear), 1);
        assert_eq!(
            v[o + tag as usize * 512..][..512],
            disk[lba as usize * 512..][..512]
        );
    }
    // Nothing more happens on later timer runs.
    for _ in 0..30 {
        hal.advance(10_000_000);
        q1.expire(hear);
        q2.expire(hear);
    }
    assert_eq!(sim.disables(), 1);
    let h = heard.borrow();
    assert_eq!(h.len(), 6);
    assert!(heard_once(&h), "{h:?}");
    assert_eq!(sim.bad_shadow_values(), 0);
    drop(h);
    drop(v);
}

#[test]
fn a_queue_that_wants_a_reset_after_another_queue_made_one_rejoins_instead() {
    let (sim, hal, shared, mut q1, mut q2) = two_queues(small());
    sim.set_ignore_aborts(true);
    for lba in [10, 20] {
        drop_read(&sim, lba);
    }
    let (a, ao) = pages(1);
    let (b, bo) = pages(1);
    let (a, b) = (a.as_ptr() as usize + ao, b.as_ptr() as usize + bo);
    let heard = RefCell::new(Heard::new());
    let hear =
        |tag: u64, r: Result<(), BlkError>| heard.borrow_mut().entry(tag).or_default().push(r);
    blk_read(&mut q1, 10, a, 1).unwrap();
    blk_read(&mut q2, 20, b, 2).unwrap();
    // Both pass their deadline and their abort grace together; queue 1's
    // timer runs first and resets; queue 2's timer then finds the epoch
    // moved (its wedged command was failed by that reset) and does not
    // reset again.
    for _ in 0..3 {
        hal.advance(60_000_000);
        q1.expire(hear);
        if shared.epoch() == 0 {
            q2.expire(hear);
        }
    }
    assert_eq!(shared.epoch(), 1);
    q2.expire(hear);
    assert_eq!(sim.disables(), 1);
    let h = heard.borrow();
    assert!(heard_once(&h));
    assert!(matches!(h[&1][..], [Err(BlkError::Timeout)]), "{h:?}");
    assert!(matches!(h[&2][..], [Err(BlkError::Timeout)]), "{h:?}");
    drop(h);
    assert!(!q2.qp.needs_reset());
    blk_read(&mut q2, 30, b, 3).unwrap();
    assert_eq!(q2.poll(hear), 1);
}

#[test]
fn a_controller_that_cannot_be_stopped_halts_every_queue_until_a_later_reset() {
    let (sim, hal, shared, mut q1, mut q2) = two_queues(small());
    sim.set_ignore_aborts(true);
    drop_read(&sim, 10);
    drop_read(&sim, 20);
    let (va, ao) = pages(1);
    let (vb, bo) = pages(1);
    let (a, b_addr) = (va.as_ptr() as usize + ao, vb.as_ptr() as usize + bo);
    let heard = RefCell::new(Heard::new());
    let hear = |tag: u64, r: Result<(), BlkError>| {
        heard.borrow_mut().entry(tag).or_default().push(r);
    };
    blk_read(&mut q1, 10, a, 1).unwrap();
    hal.advance(60_000_000);
    // Queue 2's command is fetched and held by the device.
    blk_read(&mut q2, 20, b_addr, 2).unwrap();
    assert!(sim.may_access(b_addr, 512));
    sim.set_never_disable(true);
    while !shared.is_halted() {
        hal.advance(30_000_000);
        q1.expire(hear);
    }
    assert_eq!(shared.epoch(), 0);
    // Queue 2 learns it on its next timer run: it refuses new commands and
    // keeps its command (the device may still write its buffer).
    q2.expire(hear);
    assert!(q2.qp.is_down());
    assert_eq!(blk_read(&mut q2, 21, a, 3), Err(BlkError::Unavailable));
    assert!(heard.borrow().is_empty());
    // The controller can be stopped again: the next timer run resets it.
    sim.set_never_disable(false);
    hal.advance(10_000_000);
    q1.expire(hear);
    assert_eq!(shared.epoch(), 1);
    assert!(!shared.is_halted());
    q2.poll(hear);
    {
        let h = heard.borrow();
        assert!(heard_once(&h));
        assert_eq!(h.len(), 2, "{h:?}");
    }
    assert!(!sim.may_access(b_addr, 512));
    for (q, lba, tag) in [(&mut q1, 40, 10), (&mut q2, 41, 11)] {
        blk_read(q, lba, a, tag).unwrap();
        assert_eq!(q.poll(hear), 1);
    }
    drop((va, vb));
}

#[test]
fn queues_on_two_threads_keep_serving_across_a_reset_made_by_one_of_them() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let (sim, hal, shared, mut q1, q2) = two_queues(small());
    let disk = sim.disk();
    sim.set_ignore_aborts(true);
    let stop = Arc::new(AtomicBool::new(false));
    // Queue 2 runs on another thread, as on another core: reads, each
    // retried until it succeeds (at least 200); each completion heard
    // exactly once.
    let worker = {
        let disk = disk.clone();
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut q2 = q2;
            let (v, o) = pages(1);
            let addr = v.as_ptr() as usize + o;
            let (mut failures, mut tag, mut i) = (0u32, 1000u64, 0u64);
            // Until told to stop, and back on the current epoch (it rejoins
            // from its own poll).
            let caught_up = |q: &Nq| q.qp.epoch() == q.controller().unwrap().epoch();
            while i < 200 || !stop.load(Ordering::Relaxed) || !caught_up(&q2) {
                let lba = (i * 7) % 1024;
                tag += 1;
                let r = match blk_read(&mut q2, lba, addr, tag) {
                    Err(e) => Err(e),
                    Ok(()) => {
                        let mut got = None;
                        while got.is_none() {
                            let mut hear = |t: u64, x: Result<(), BlkError>| {
                                assert_eq!(t, tag);
                                assert!(got.is_none(), "heard twice");
                                got = Some(x);
                            };
                            q2.poll(&mut hear);
                            q2.expire(&mut hear);
                            q2.relax();
                        }
                        got.unwrap()
                    }
                };
                match r {
                    Ok(()) => {
                        assert_eq!(v[o..o + 512], disk[lba as usize * 512..][..512], "read {i}");
                        i += 1;
                    }
                    Err(_) => failures += 1,
                }
                assert!(failures < 1000);
            }
            (failures, q2)
        })
    };
    // Meanwhile queue 1's read of LBA 10 is never answered: queue 1 aborts
    // it, then resets the controller.
    drop_read(&sim, 10);
    let (va, ao) = pages(1);
    let a = va.as_ptr() as usize + ao;
    let heard = RefCell::new(Heard::new());
    let hear = |t: u64, r: Result<(), BlkError>| heard.borrow_mut().entry(t).or_default().push(r);
    blk_read(&mut q1, 10, a, 1).unwrap();
    while shared.epoch() == 0 {
        hal.advance(5_000_000);
        q1.poll(hear);
        q1.expire(hear);
        std::thread::yield_now();
    }
    stop.store(true, Ordering::Relaxed);
    let (failures, mut q2) = worker.join().unwrap();
    assert!(heard_once(&heard.borrow()));
    assert!(matches!(heard.borrow()[&1][..], [Err(BlkError::Timeout)]));
    // Only reads in flight around the reset failed (and were retried).
    assert!(failures <= 3, "{failures}");
    assert_eq!(q2.qp.epoch(), shared.epoch());
    assert!(!q2.qp.needs_reset());
    blk_read(&mut q2, 5, a, 2).unwrap();
    assert_eq!(q2.poll(hear), 1);
    for q in [&mut q1, &mut q2] {
        blk_read(q, 6, a, 3).unwrap();
        assert_eq!(q.poll(hear), 1);
    }
    drop(va);
}

// ---------------------------------------------------------------------------
// Namespaces.

#[test]
fn a_controller_without_active_namespaces_lists_none() {
    let sim = new_sim(SimConfig {
        ns1_active: false,
        ..small()
    });
    let mut ctrl = Ctrl::init(SimHal::new(), sim, config(true)).unwrap();
    assert_eq!(ctrl.active_namespaces().unwrap(), Vec::<u32>::new());
    assert_eq!(
        ctrl.namespace(1),
        Err(NvmeError::NamespaceEmpty { nsid: 1 })
    );
}

fn extra(nsid: u32, metadata: u16) -> SimNamespace {
    SimNamespace {
        nsid,
        block_size: 4096,
        blocks: 100,
        metadata,
        extended: false,
    }
}

#[test]
fn namespaces_are_scanned_when_the_active_list_is_refused_or_too_new() {
    for (version, active_list) in [(0x0001_0400, false), (0x0001_0000, true)] {
        let sim = new_sim(SimConfig {
            extra_namespaces: vec![extra(3, 0), extra(7, 8)],
            nn: Some(8),
            version,
            active_list,
            ..small()
        });
        let mut ctrl = Ctrl::init(SimHal::new(), sim.clone(), config(true)).unwrap();
        let before = sim.commands();
        assert_eq!(ctrl.active_namespaces().unwrap(), vec![1, 3, 7]);
        // NVMe 1.0: not even asked for the list (one Identify per nsid).
        if version == 0x0001_0000 {
            assert_eq!(sim.commands() - before, 8);
        }
    }
    // A large NN is scanned up to MAX_SCANNED_NAMESPACES.
    let sim = new_sim(SimConfig {
        extra_namespaces: vec![extra(1024, 0), extra(1025, 0)],
        nn: Some(1 << 20),
        active_list: false,
        ..small()
    });
    let mut ctrl = Ctrl::init(SimHal::new(), sim, config(true)).unwrap();
    assert_eq!(ctrl.active_namespaces().unwrap(), vec![1, 1024]);
}

#[test]
fn a_long_active_namespace_list_is_read_in_pages() {
    let sim = new_sim(SimConfig {
        extra_namespaces: (2..=1500).map(|n| extra(n, 0)).collect(),
        nn: Some(1500),
        ..small()
    });
    let mut ctrl = Ctrl::init(SimHal::new(), sim, config(true)).unwrap();
    let ids = ctrl.active_namespaces().unwrap();
    assert_eq!(ids, (1..=1500).collect::<Vec<u32>>());
}

#[test]
fn a_namespace_with_metadata_is_refused_with_its_id_and_metadata_size() {
    let sim = new_sim(SimConfig {
        extra_namespaces: vec![
            extra(2, 8),
            SimNamespace {
                extended: true,
                ..extra(3, 16)
            },
            extra(4, 0),
        ],
        ..small()
    });
    let mut ctrl = Ctrl::init(SimHal::new(), sim, config(true)).unwrap();
    assert_eq!(ctrl.active_namespaces().unwrap(), vec![1, 2, 3, 4]);
    let e = ctrl.namespace(2).unwrap_err();
    assert_eq!(
        e,
        NvmeError::MetadataFormat {
            nsid: 2,
            metadata_bytes: 8,
            lba_format: 1,
            extended: false
        }
    );
    assert_eq!(
        e.to_string(),
        "namespace 2: 8 bytes of metadata per block (LBA format 1): unsupported, format it without metadata"
    );
    assert!(matches!(
        ctrl.namespace(3),
        Err(NvmeError::MetadataFormat {
            nsid: 3,
            metadata_bytes: 16,
            extended: true,
            ..
        })
    ));
    assert_eq!(
        ctrl.namespace(4).unwrap(),
        Namespace {
            nsid: 4,
            block_size: 4096,
            blocks: 100
        }
    );
}

// ---------------------------------------------------------------------------
// Lost shadow doorbell updates (sim.rs, "Lost shadow doorbell updates") and
// the queue's kick (queue.rs, "Lost doorbells").

/// Two queues on a controller whose shadow tail reads are stale, processed
/// later than their doorbells (deferred), with `dbbuf_keep`.
fn lossy_queues(keep: bool) -> (Sim, SimHal, Arc<Shared>, Nq, Nq) {
    let sim = new_sim(SimConfig {
        stale_shadow_tail: true,
        ..small()
    });
    let hal = SimHal::new();
    let cfg = Config {
        dbbuf_keep: keep,
        ..config(true)
    };
    let mut ctrl = Ctrl::init(hal.clone(), sim.clone(), cfg).unwrap();
    let mut qs = ctrl.create_io_queues(2, 32, false).unwrap();
    let shared = Arc::new(SharedController::new(ctrl));
    let q2 = NvmeQueue::new(qs.pop().unwrap(), hal.clone(), ns()).with_controller(shared.clone());
    let q1 = NvmeQueue::new(qs.pop().unwrap(), hal.clone(), ns()).with_controller(shared.clone());
    sim.set_deferred(true);
    (sim, hal, shared, q1, q2)
}

/// A burst of 16 reads on an idle queue (tags `first..first + 16`), then
/// the kernel's loop: the device runs, the queue is polled, and once a
/// millisecond (virtual time) expired. Returns the virtual nanoseconds until
/// every read was heard (or panics after `limit_ms`).
fn burst(
    sim: &Sim,
    hal: &SimHal,
    q: &mut Nq,
    first: u64,
    heard: &RefCell<Heard>,
    base: usize,
    limit_ms: u64,
) -> u64 {
    let hear = |tag: u64, r: Result<(), BlkError>| {
        heard.borrow_mut().entry(tag).or_default().push(r);
    };
    for tag in first..first + 16 {
        blk_read(q, tag % 1024, base + (tag as usize % 16) * 512, tag).unwrap();
    }
    let start = hal.now();
    let done = |h: &Heard| (first..first + 16).all(|t| h.contains_key(&t));
    while !done(&heard.borrow()) {
        assert!(
            hal.now() - start < limit_ms * 1_000_000,
            "reads {first}..{} not all heard within {limit_ms} ms: {:?}",
            first + 16,
            heard.borrow().keys().collect::<Vec<_>>()
        );
        sim.run_pending();
        q.poll(hear);
        hal.advance(1_000_000);
        q.expire(hear);
    }
    hal.now() - start
}

#[test]
fn a_lost_shadow_doorbell_update_stalls_a_queue_that_trusts_the_event_index() {
    // The control: the loss the model makes really stalls a queue that
    // never kicks (as Linux's driver, until its 30 s timeout).
    let sim = new_sim(SimConfig {
        stale_shadow_tail: true,
        ..small()
    });
    let mut ctrl = Ctrl::init(SimHal::new(), sim.clone(), config(true)).unwrap();
    let mut qp = ctrl.create_io_queue(1, 32, None).unwrap();
    qp.set_kick_after_ns(0);
    sim.set_deferred(true);
    let (mut v, o) = pages(2);
    for k in 0..16usize {
        submit_read(
            &mut qp,
            k as u64,
            &mut v[o + k * 512..o + (k + 1) * 512],
            k as u64,
        );
    }
    // The first submission found the controller idle (MMIO), the other 15
    // went through the shadow slot only.
    let s = qp.stats();
    assert_eq!((s.doorbell_writes, s.doorbells_skipped), (1, 15));
    let mut done = 0;
    for _ in 0..100 {
        sim.run_pending();
        done += qp.process_completions(|c| assert!(c.result.is_ok()));
        assert_eq!(qp.watch(u64::MAX / 2), None);
    }
    assert_eq!(
        done, 1,
        "the device fetched only what the MMIO write drained"
    );
    assert_eq!(qp.in_flight(), 15);
    assert_eq!(qp.stats().kicks, 0);
}

#[test]
fn a_kick_recovers_a_lost_shadow_doorbell_within_milliseconds_and_turns_the_event_index_off() {
    let (sim, hal, shared, mut q1, mut q2) = lossy_queues(false);
    let disk = sim.disk();
    let (v, o) = pages(4);
    let base = v.as_ptr() as usize + o;
    let heard = RefCell::new(Heard::new());
    let _ = logged();
    let took = burst(&sim, &hal, &mut q1, 0, &heard, base, 50);
    // Kicked after 10 ms (DEFAULT_KICK_NS) of no progress, recovered on
    // the next look: milliseconds, against the 100 ms command timeout here
    // (5 s in the kernel).
    assert!(took <= DEFAULT_KICK_NS + 3_000_000, "{took} ns");
    {
        let h = heard.borrow();
        assert!(heard_once(&h), "{h:?}");
        assert!(
            h.values().all(|r| r[0].is_ok()),
            "no error reaches the owner: {h:?}"
        );
    }
    for k in 0..16usize {
        assert_eq!(v[o + k * 512..][..512], disk[k * 512..][..512]);
    }
    let s = q1.qp.stats();
    assert_eq!(
        (s.kicks, s.recoveries, s.errors, s.timeouts, s.aborts),
        (1, 1, 0, 0, 0)
    );
    assert_eq!(sim.disables(), 0, "no reset");
    assert!(q1.qp.event_idx_distrusted());
    assert!(shared.event_idx_distrusted());
    assert_eq!(shared.lock().stats().lost_doorbells, 1);
    let log = logged();
    assert!(
        log.iter().any(
            |l| l.contains("queue 1: 15 command(s) in flight, none completed")
                && l.contains("SQ tail 16, controller consumed to 1")
        ),
        "{log:?}"
    );
    assert!(
        log.iter().any(|l| l.contains("recovered a lost doorbell")),
        "{log:?}"
    );
    assert!(
        log.iter()
            .any(|l| l.contains("shadow doorbells off for the rest of its life")),
        "{log:?}"
    );
    // From now on every doorbell goes through MMIO: the next bursts need no
    // kick, on this queue and (after its next timer run) on the other.
    q2.expire(|_, _| {});
    assert!(q2.qp.event_idx_distrusted());
    // (One turn of the loop: the virtual clock moves 1 ms per turn.)
    let took = burst(&sim, &hal, &mut q1, 16, &heard, base, 50);
    assert!(took < 2_000_000, "{took} ns");
    let took = burst(&sim, &hal, &mut q2, 32, &heard, base, 50);
    assert!(took < 2_000_000, "{took} ns");
    assert_eq!(q1.qp.stats().kicks + q2.qp.stats().kicks, 1);
    let h = heard.borrow();
    assert_eq!(h.len(), 48);
    assert!(h.values().all(|r| r.len() == 1 && r[0].is_ok()));
    drop(h);
    drop(v);
}

#[test]
fn with_dbbuf_keep_the_event_index_stays_trusted_and_every_loss_is_kicked() {
    let (sim, hal, shared, mut q1, _q2) = lossy_queues(true);
    let (v, o) = pages(4);
    let base = v.as_ptr() as usize + o;
    let heard = RefCell::new(Heard::new());
    let _ = logged();
    for round in 0..3 {
        let took = burst(&sim, &hal, &mut q1, round * 16, &heard, base, 50);
        assert!(took <= DEFAULT_KICK_NS + 3_000_000, "{took} ns");
    }
    assert!(!q1.qp.event_idx_distrusted());
    assert!(!shared.event_idx_distrusted());
    let s = q1.qp.stats();
    assert_eq!((s.kicks, s.recoveries, s.errors), (3, 3, 0));
    assert!(logged()
        .iter()
        .any(|l| l.contains("shadow doorbells kept (nvme.dbbuf=keep)")));
    assert!(heard
        .borrow()
        .values()
        .all(|r| r.len() == 1 && r[0].is_ok()));
    drop(v);
}

#[test]
fn a_slow_command_is_kicked_once_harmlessly_and_not_taken_for_a_lost_doorbell() {
    // A command the device holds (fetched, not answered) for 40 ms: the
    // kick finds the controller caught up with our tail, changes nothing,
    // and the event index stays trusted.
    let (sim, hal, shared, mut q1, _q2) = two_queues(small());
    drop_read(&sim, 7);
    let (v, o) = pages(1);
    let base = v.as_ptr() as usize + o;
    let heard = RefCell::new(Heard::new());
    let hear = |tag: u64, r: Result<(), BlkError>| {
        heard.borrow_mut().entry(tag).or_default().push(r);
    };
    blk_read(&mut q1, 7, base, 0).unwrap();
    for _ in 0..40 {
        q1.poll(hear);
        hal.advance(1_000_000);
        q1.expire(hear);
    }
    let s = q1.qp.stats();
    assert_eq!((s.kicks, s.recoveries), (1, 0));
    sim.finish_stalled();
    q1.poll(hear);
    hal.advance(1_000_000);
    q1.expire(hear);
    assert_eq!(q1.qp.stats().recoveries, 0);
    assert!(!q1.qp.event_idx_distrusted());
    assert!(!shared.event_idx_distrusted());
    assert!(matches!(heard.borrow()[&0][..], [Ok(())]));
    drop(v);
}
