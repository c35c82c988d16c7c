//! The driver against the simulated controller.

use crate::cmd::{io, Status};
use crate::sim::{Fault, FaultAction, Qemu, Sim, SimConfig, SimHal};
use crate::*;

// Counts allocations per thread, so that tests running in parallel do not see
// each other's.
#[global_allocator]
static GLOBAL: dioxide_testkit::CountingAlloc = dioxide_testkit::CountingAlloc;

fn allocs() -> u64 {
    dioxide_testkit::thread_allocs()
}

type Ctrl = Controller<SimHal, Sim>;
type Qp = QueuePair<SimHal, Sim>;

fn config() -> Config {
    Config {
        admin_entries: 8,
        admin_timeout_ms: 100,
        io_timeout_ms: 100,
        abort_grace_ms: 50,
        dbbuf: true,
        ..Config::default()
    }
}

fn setup(cfg: SimConfig, entries: u16, vector: Option<u16>) -> (Sim, SimHal, Ctrl, Qp) {
    let sim = Sim::new(cfg);
    // Fill the namespace with a position-dependent pattern.
    let disk: Vec<u8> = (0..sim.disk().len()).map(|i| pattern(i as u64)).collect();
    sim.write_disk(0, &disk);
    let hal = SimHal::new();
    let mut ctrl = Controller::init(hal.clone(), sim.clone(), config()).unwrap();
    assert_eq!(ctrl.set_queue_count(1).unwrap(), 1);
    let qp = ctrl.create_io_queue(1, entries, vector).unwrap();
    (sim, hal, ctrl, qp)
}

fn small() -> SimConfig {
    SimConfig {
        block_size: 512,
        blocks: 128,
        ..Default::default()
    }
}

/// A fault that makes the device fetch one read of `lba` and hold it.
fn stall(opcode: u8, lba: u64) -> Fault {
    Fault {
        admin: false,
        opcode,
        lba: Some(lba),
        action: FaultAction::Drop,
        count: 1,
    }
}

fn pattern(i: u64) -> u8 {
    (i.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 56) as u8
}

/// A DMA-able host buffer at a chosen offset into a page.
fn buffer(len: usize, offset: usize) -> (Vec<u8>, usize) {
    let v = vec![0u8; len + offset + 2 * PAGE_SIZE];
    let base = v.as_ptr() as usize;
    let start = (base.div_ceil(PAGE_SIZE) * PAGE_SIZE) - base + offset;
    (v, start)
}

fn read(qp: &mut Qp, lba: u64, blocks: u32, buf: &mut [u8]) -> Result<u32, NvmeError> {
    // SAFETY: buf lives until execute returns.
    unsafe {
        qp.execute(
            SubmissionEntry::read(1, lba, blocks),
            Some(DataBuf::from_mut_slice(buf)),
        )
    }
}

fn write(qp: &mut Qp, lba: u64, blocks: u32, buf: &[u8]) -> Result<u32, NvmeError> {
    // SAFETY: buf lives until execute returns.
    unsafe {
        qp.execute(
            SubmissionEntry::write(1, lba, blocks),
            Some(DataBuf::from_slice(buf)),
        )
    }
}

#[test]
fn identify_both_block_sizes() {
    for bs in [512u32, 4096] {
        let cfg = SimConfig {
            block_size: bs,
            blocks: 64,
            ..Default::default()
        };
        let (_sim, _hal, mut ctrl, _qp) = setup(cfg, 16, None);
        assert_eq!(ctrl.info().model.as_str(), "dioxide simulated NVMe");
        assert_eq!(ctrl.info().mdts_bytes, Some(512 * 1024));
        assert_eq!(ctrl.max_transfer(), 512 * 1024);
        assert_eq!(ctrl.active_namespaces().unwrap(), vec![1]);
        let ns = ctrl.namespace(1).unwrap();
        assert_eq!(
            ns,
            Namespace {
                nsid: 1,
                block_size: bs,
                blocks: 64
            }
        );
        // An inactive namespace identifies as zeroes: size 0.
        assert_eq!(
            ctrl.namespace(2),
            Err(NvmeError::NamespaceEmpty { nsid: 2 })
        );
    }
}

#[test]
fn reads_match_the_namespace_for_every_prp_shape() {
    let cfg = SimConfig {
        block_size: 512,
        blocks: 4096,
        ..Default::default()
    };
    let (sim, _hal, _ctrl, mut qp) = setup(cfg, 16, None);
    let disk = sim.disk();
    // (bytes, buffer offset in page): PRP1 only, PRP1+PRP2, PRP list, offset
    // buffers whose first page is partial, the largest transfer (MDTS).
    for (len, off) in [
        (512, 0),
        (4096, 0),
        (512, 3584),
        (4096, 512),
        (8192, 0),
        (8192, 2048),
        (12288, 0),
        (65536, 1024),
        (512 * 1024, 0),
        (512 * 1024, 4092 & !511),
    ] {
        let (mut v, start) = buffer(len, off);
        let lba = 7;
        read(&mut qp, lba, (len / 512) as u32, &mut v[start..start + len]).unwrap();
        let want = &disk[lba as usize * 512..lba as usize * 512 + len];
        assert!(v[start..start + len] == *want, "len {len} offset {off}");
        // Nothing outside the buffer was written.
        assert!(v[..start].iter().all(|&b| b == 0));
        assert!(v[start + len..].iter().all(|&b| b == 0));
    }
}

#[test]
fn writes_land_on_the_namespace_and_flush_succeeds() {
    let cfg = SimConfig {
        block_size: 4096,
        blocks: 256,
        ..Default::default()
    };
    let (sim, _hal, _ctrl, mut qp) = setup(cfg, 16, None);
    let (mut v, start) = buffer(3 * 4096, 0);
    for (i, b) in v[start..start + 3 * 4096].iter_mut().enumerate() {
        *b = (i % 251) as u8;
    }
    write(&mut qp, 100, 3, &v[start..start + 3 * 4096]).unwrap();
    // SAFETY: no data buffer.
    unsafe { qp.execute(SubmissionEntry::flush(1), None).unwrap() };
    let disk = sim.disk();
    assert!(disk[100 * 4096..103 * 4096] == v[start..start + 3 * 4096]);
    // The blocks around are untouched.
    assert_eq!(disk[99 * 4096 + 4095], pattern(99 * 4096 + 4095));
    assert_eq!(disk[103 * 4096], pattern(103 * 4096));
}

/// The model's volatile write cache: a write is cached until a Flush or
/// its own FUA puts it on the media, a later write of a block replaces the
/// cached one, and a power cut keeps the subset of cached blocks it is
/// told to and loses the rest. Without the cache (the control) every
/// completed write is on the media at once.
#[test]
fn the_volatile_cache_keeps_writes_until_flush_or_fua_and_a_power_cut_loses_the_rest() {
    for volatile_cache in [true, false] {
        let cfg = SimConfig {
            block_size: 512,
            blocks: 64,
            volatile_cache,
            ..Default::default()
        };
        let (sim, _hal, ctrl, mut qp) = setup(cfg, 16, None);
        assert_eq!(ctrl.info().volatile_write_cache, volatile_cache);
        let before = sim.disk();
        let (mut v, start) = buffer(2 * 512, 0);
        let mut put = |qp: &mut Qp, lba: u64, byte: u8, fua: bool| {
            v[start..start + 512].fill(byte);
            let mut c = SubmissionEntry::write(1, lba, 1);
            if fua {
                c = c.with_fua();
            }
            // SAFETY: the buffer lives until execute returns.
            unsafe { qp.execute(c, Some(DataBuf::from_slice(&v[start..start + 512]))) }.unwrap();
        };
        put(&mut qp, 1, 0xa1, false);
        put(&mut qp, 2, 0xa2, false);
        // SAFETY: no data buffer.
        unsafe { qp.execute(SubmissionEntry::flush(1), None).unwrap() };
        put(&mut qp, 3, 0xa3, false);
        put(&mut qp, 4, 0xa4, false);
        put(&mut qp, 4, 0xb4, false); // replaces the cached 0xa4
        put(&mut qp, 5, 0xa5, true); // FUA: on the media at once
        put(&mut qp, 6, 0xa6, false);
        put(&mut qp, 6, 0xb6, true); // FUA over a cached block
        let block = |d: &[u8], b: usize| d[b * 512..(b + 1) * 512].to_vec();
        let full = |byte: u8| vec![byte; 512];
        // Reads see every completed write, cached or not.
        let seen = sim.disk();
        for (b, byte) in [
            (1, 0xa1),
            (2, 0xa2),
            (3, 0xa3),
            (4, 0xb4),
            (5, 0xa5),
            (6, 0xb6),
        ] {
            assert_eq!(block(&seen, b), full(byte), "block {b}");
        }
        if volatile_cache {
            // Blocks 3 and 4 (the 3rd and the 5th write) wait in the cache.
            assert_eq!(sim.cached_blocks(), vec![(3, 3), (4, 5)]);
            let media = sim.media();
            assert_eq!(block(&media, 3), block(&before, 3), "not flushed");
            assert_eq!(block(&media, 5), full(0xa5), "FUA");
            // The cut keeps block 4 (its last write) and loses block 3.
            sim.power_cut(|b, _| b == 4);
            let after = sim.disk();
            assert_eq!(block(&after, 3), block(&before, 3), "lost");
            assert_eq!(block(&after, 4), full(0xb4), "kept: the last write");
        } else {
            assert!(sim.cached_blocks().is_empty());
            sim.power_cut(|_, _| false);
            assert_eq!(sim.disk(), seen, "nothing was volatile");
        }
        let after = sim.disk();
        for (b, byte) in [(1, 0xa1), (2, 0xa2), (5, 0xa5), (6, 0xb6)] {
            assert_eq!(block(&after, b), full(byte), "durable block {b}");
        }
        assert_eq!(block(&after, 7), block(&before, 7), "untouched");
    }
}

#[test]
fn queue_wraps_around_many_times() {
    let cfg = SimConfig {
        block_size: 512,
        blocks: 1024,
        ..Default::default()
    };
    // 4 entries: 3 slots; 500 commands wrap the rings and flip the phase 125
    // times.
    let (sim, _hal, _ctrl, mut qp) = setup(cfg, 4, None);
    let disk = sim.disk();
    assert_eq!(qp.depth(), 3);
    let mut buf = vec![0u8; 512];
    for i in 0..500u64 {
        let lba = (i * 37) % 1024;
        read(&mut qp, lba, 1, &mut buf).unwrap();
        assert!(
            buf[..] == disk[lba as usize * 512..lba as usize * 512 + 512],
            "command {i}"
        );
    }
    assert_eq!(qp.stats().completed, 500);
    assert_eq!(qp.in_flight(), 0);
}

#[test]
fn full_depth_in_flight_and_out_of_order_completion() {
    let cfg = SimConfig {
        block_size: 512,
        blocks: 1024,
        ..Default::default()
    };
    let (sim, _hal, _ctrl, mut qp) = setup(cfg, 8, None);
    let disk = sim.disk();
    let mut bufs = vec![vec![0u8; 512]; 7];
    sim.set_hold(true);
    for (i, b) in bufs.iter_mut().enumerate() {
        // SAFETY: bufs outlive the completions processed below.
        unsafe {
            qp.submit(
                SubmissionEntry::read(1, i as u64 * 10, 1),
                Some(DataBuf::from_mut_slice(b)),
                1000 + i as u64,
            )
            .unwrap()
        };
    }
    // Every slot is taken.
    // SAFETY: no data buffer.
    let full = unsafe { qp.submit(SubmissionEntry::flush(1), None, 0) };
    assert_eq!(full, Err(NvmeError::QueueFull));
    assert_eq!(sim.held(), 7);
    sim.release(&[6, 2, 4, 0, 5, 1, 3]);
    let mut tags = Vec::new();
    let n = qp.process_completions(|c| {
        c.result.unwrap();
        tags.push(c.tag)
    });
    assert_eq!(n, 7);
    assert_eq!(tags, vec![1006, 1002, 1004, 1000, 1005, 1001, 1003]);
    for (i, b) in bufs.iter().enumerate() {
        let at = i * 10 * 512;
        assert!(b[..] == disk[at..at + 512]);
    }
    assert_eq!(qp.in_flight(), 0);
}

#[test]
fn error_statuses_are_typed_and_named() {
    let cfg = SimConfig {
        block_size: 512,
        blocks: 128,
        ..Default::default()
    };
    let (sim, _hal, _ctrl, mut qp) = setup(cfg, 8, None);
    let mut buf = vec![0u8; 1024];
    // Past the end of the namespace: the device says LBA Out of Range.
    let e = read(&mut qp, 127, 2, &mut buf).unwrap_err();
    match e {
        NvmeError::Command {
            qid: 1,
            opcode: io::READ,
            status,
        } => {
            assert_eq!((status.sct(), status.sc()), (0, 0x80));
            assert_eq!(status.name(), "LBA Out of Range");
        }
        other => panic!("{other:?}"),
    }
    // A media error on one block only.
    sim.inject(Fault {
        admin: false,
        opcode: io::READ,
        lba: Some(40),
        action: FaultAction::Fail(Status::new(2, 0x81).with_dnr()),
        count: u32::MAX,
    });
    let e = read(&mut qp, 39, 2, &mut buf).unwrap_err();
    assert_eq!(
        e.to_string(),
        "command failed (queue 1, opcode 0x02): Unrecovered Read Error (sct 0x2 sc 0x81, do not retry)"
    );
    read(&mut qp, 41, 2, &mut buf).unwrap();
    assert_eq!(qp.stats().errors, 2);
    // Buffers the controller cannot address are refused before submission.
    let mut odd = vec![0u8; 520];
    // SAFETY: refused before the device sees it.
    let r = unsafe {
        qp.submit(
            SubmissionEntry::read(1, 0, 1),
            DataBuf::from_addr(odd.as_mut_ptr() as usize + 2, 512),
            0,
        )
    };
    assert!(matches!(r, Err(NvmeError::BadBuffer { .. })));
    let big = vec![0u8; 1024 * 1024];
    // SAFETY: refused before the device sees it.
    let r = unsafe {
        qp.submit(
            SubmissionEntry::read(1, 0, 2048),
            Some(DataBuf::from_slice(&big)),
            0,
        )
    };
    assert_eq!(
        r,
        Err(NvmeError::BadBuffer {
            len: 1024 * 1024,
            max: 512 * 1024
        })
    );
    assert_eq!(qp.in_flight(), 0);
}

#[test]
fn a_waited_command_that_never_completes_times_out_and_wedges_the_queue_until_reset() {
    let (sim, hal, mut ctrl, mut qp) = setup(small(), 8, None);
    sim.inject(stall(io::READ, 5));
    let mut buf = vec![0u8; 512];
    let t0 = hal.now();
    let e = read(&mut qp, 5, 1, &mut buf).unwrap_err();
    assert!(
        matches!(
            e,
            NvmeError::Timeout {
                qid: 1,
                opcode: io::READ,
                ..
            }
        ),
        "{e:?}"
    );
    // It waited for the deadline (100 ms of virtual time), not forever.
    let waited = hal.now() - t0;
    assert!((100_000_000..200_000_000).contains(&waited), "{waited}");
    assert_eq!(qp.stats().timeouts, 1);
    // The device may still write the buffer: the queue takes nothing more.
    assert!(sim.may_access(buf.as_ptr() as usize, 512));
    assert!(qp.needs_reset());
    let mut other = vec![0u8; 512];
    assert_eq!(
        read(&mut qp, 0, 1, &mut other),
        Err(NvmeError::ResetRequired { qid: 1 })
    );
    // The reset stops the device; the waiter already had its error, so
    // nothing is delivered again.
    ctrl.reset(&mut [&mut qp], |c| panic!("delivered twice: {c:?}"))
        .unwrap();
    assert!(!sim.may_access(buf.as_ptr() as usize, 512));
    assert!(!qp.needs_reset());
    for lba in 0..20 {
        read(&mut qp, lba, 1, &mut buf).unwrap();
    }
    assert_eq!(qp.in_flight(), 0);
}

#[test]
fn a_waited_command_that_completes_late_frees_its_slot_without_a_reset() {
    let (sim, _hal, _ctrl, mut qp) = setup(small(), 8, None);
    sim.inject(stall(io::READ, 5));
    let mut buf = vec![0u8; 512];
    assert!(matches!(
        read(&mut qp, 5, 1, &mut buf),
        Err(NvmeError::Timeout { .. })
    ));
    assert!(qp.needs_reset());
    // The device answers after all: it is done with the buffer, the id is
    // free again and the late completion does not reach anyone.
    sim.finish_stalled();
    assert_eq!(
        qp.process_completions(|_| panic!("late completion delivered")),
        1
    );
    assert_eq!(qp.stats().late, 1);
    assert!(!qp.needs_reset());
    assert_eq!(qp.in_flight(), 0);
    read(&mut qp, 6, 1, &mut buf).unwrap();
}

#[test]
fn controller_that_never_becomes_ready() {
    let sim = Sim::new(SimConfig::default());
    sim.set_never_ready(true);
    let hal = SimHal::new();
    let e = Controller::init(hal.clone(), sim, config()).err().unwrap();
    // CAP.TO of the model is 1 s.
    assert_eq!(
        e,
        NvmeError::NotReady {
            enable: true,
            waited_ms: 1000
        }
    );
    assert!(hal.now() >= 1_000_000_000 && hal.now() < 2_000_000_000);
    assert_eq!(
        e.to_string(),
        "controller did not become ready within 1000 ms (CAP.TO)"
    );
}

#[test]
fn controller_fatal_status() {
    let sim = Sim::new(SimConfig::default());
    sim.set_fatal_on_enable(true);
    let e = Controller::init(SimHal::new(), sim, config())
        .err()
        .unwrap();
    assert_eq!(e, NvmeError::ControllerFatal);
}

#[test]
fn namespace_of_size_zero() {
    let cfg = SimConfig {
        reported_blocks: Some(0),
        ..Default::default()
    };
    let sim = Sim::new(cfg);
    let mut ctrl = Controller::init(SimHal::new(), sim, config()).unwrap();
    let e = ctrl.namespace(1).unwrap_err();
    assert_eq!(e.to_string(), "namespace 1 has size 0 (inactive or absent)");
}

#[test]
fn an_admin_command_that_never_completes_blocks_admin_commands_until_reset() {
    let sim = Sim::new(SimConfig::default());
    let mut ctrl = Controller::init(SimHal::new(), sim.clone(), config()).unwrap();
    sim.inject(Fault {
        admin: true,
        opcode: crate::cmd::admin::IDENTIFY,
        lba: None,
        action: FaultAction::Drop,
        count: 1,
    });
    let e = ctrl.namespace(1).unwrap_err();
    assert!(matches!(
        e,
        NvmeError::Timeout {
            qid: 0,
            opcode: 0x06,
            ..
        }
    ));
    // The Identify may still write the scratch page: no admin command is
    // taken (so the page is not reused) until the controller is reset.
    assert_eq!(sim.stalled(), 1);
    assert!(ctrl.needs_reset());
    let e = ctrl.namespace(1).unwrap_err();
    assert_eq!(e, NvmeError::ResetRequired { qid: 0 });
    assert_eq!(
        e.to_string(),
        "queue 0 refuses commands until the controller is reset (a timed-out command still owns its buffer)"
    );
    assert_eq!(ctrl.abort(1, 0), Err(NvmeError::ResetRequired { qid: 0 }));
    ctrl.reset(&mut [], |c| panic!("{c:?}")).unwrap();
    assert_eq!(sim.stalled(), 0);
    assert!(!ctrl.needs_reset());
    assert_eq!(ctrl.namespace(1).unwrap().blocks, 2048);
}

#[test]
fn queue_creation_errors_are_reported() {
    let sim = Sim::new(SimConfig {
        max_queue_entries: 64,
        ..Default::default()
    });
    let mut ctrl = Controller::init(SimHal::new(), sim.clone(), config()).unwrap();
    assert!(matches!(
        ctrl.create_io_queue(1, 65, None),
        Err(NvmeError::BadQueue { .. })
    ));
    let q1 = ctrl.create_io_queue(1, 64, None).unwrap();
    // Creating the same queue id twice is refused before the device is
    // asked (its shadow doorbell slots belong to the live queue).
    let before = sim.commands();
    match ctrl.create_io_queue(1, 16, None) {
        Err(NvmeError::BadQueue { qid: 1, .. }) => {}
        other => panic!("{:?}", other.map(|q| q.qid())),
    }
    assert_eq!(sim.commands(), before);
    // The device answers Invalid Queue Identifier to a queue id beyond what
    // it supports (QEMU: 64 I/O queue pairs).
    match ctrl.create_io_queue(65, 16, None) {
        Err(NvmeError::Command { status, .. }) => {
            assert_eq!(status.name(), "Invalid Queue Identifier")
        }
        other => panic!("{:?}", other.map(|q| q.qid())),
    }
    ctrl.delete_io_queue(q1).unwrap();
    assert!(!sim.has_io_queue(1));
    let q1 = ctrl.create_io_queue(1, 16, None).unwrap();
    assert!(sim.has_io_queue(1));
    drop(q1);
}

#[test]
fn interrupt_driven_completion() {
    let cfg = SimConfig {
        block_size: 512,
        blocks: 128,
        ..Default::default()
    };
    let (sim, _hal, _ctrl, mut qp) = setup(cfg, 8, Some(3));
    let disk = sim.disk();
    assert_eq!(qp.vector(), Some(3));
    let mut buf = vec![0u8; 512];
    // SAFETY: buf outlives the completion processed below.
    let cid = unsafe {
        qp.submit(
            SubmissionEntry::read(1, 9, 1),
            Some(DataBuf::from_mut_slice(&mut buf)),
            7,
        )
        .unwrap()
    };
    // The model raised the queue's vector; the "interrupt handler" runs the
    // completion.
    assert_eq!(sim.interrupts(3), 1);
    let mut done = None;
    assert_eq!(
        qp.process_completions(|c| done = Some((c.cid, c.tag, c.result))),
        1
    );
    assert_eq!(done, Some((cid, 7, Ok(0))));
    assert!(buf[..] == disk[9 * 512..10 * 512]);
    // A second run of the handler finds nothing.
    assert_eq!(qp.process_completions(|_| panic!()), 0);
}

#[test]
fn spurious_completions_are_counted_not_trusted() {
    let cfg = SimConfig {
        block_size: 512,
        blocks: 128,
        ..Default::default()
    };
    let (sim, _hal, _ctrl, mut qp) = setup(cfg, 8, None);
    sim.post_bogus(1, 3);
    sim.post_bogus(1, 999);
    assert_eq!(
        qp.process_completions(|_| panic!("bogus completion delivered")),
        2
    );
    assert_eq!(qp.stats().spurious, 2);
    let mut buf = vec![0u8; 512];
    read(&mut qp, 0, 1, &mut buf).unwrap();
}

#[test]
fn submit_and_complete_allocate_nothing() {
    let cfg = SimConfig {
        block_size: 4096,
        blocks: 256,
        ..Default::default()
    };
    let (_sim, _hal, _ctrl, mut qp) = setup(cfg, 64, None);
    // The control: the same counter counts the buffers made here (32 and
    // the outer vector), so the 0 below is not a counter that never counts.
    let c0 = allocs();
    let mut bufs = vec![vec![0u8; 3 * 4096]; 32];
    assert!(
        allocs() - c0 >= 33,
        "{} allocations counted for 33",
        allocs() - c0
    );
    let before = allocs();
    for round in 0..100u64 {
        for (i, b) in bufs.iter_mut().enumerate() {
            // SAFETY: bufs outlive the completions processed below.
            unsafe {
                qp.submit(
                    SubmissionEntry::read(1, (round + i as u64) % 250, 3),
                    Some(DataBuf::from_mut_slice(b)),
                    i as u64,
                )
                .unwrap()
            };
        }
        let mut n = 0;
        while n < 32 {
            n += qp.process_completions(|c| assert!(c.result.is_ok()));
        }
    }
    assert_eq!(allocs() - before, 0);
    assert_eq!(qp.stats().completed, 3200);
}

#[test]
fn driver_never_hands_cpu_addresses_to_the_device() {
    // The model rejects device addresses below PHYS_OFFSET; a read through
    // every PRP shape above succeeded, so all were translated. A buffer
    // address used raw would look like this:
    let cfg = SimConfig {
        block_size: 512,
        blocks: 128,
        ..Default::default()
    };
    let (_sim, _hal, _ctrl, mut qp) = setup(cfg, 8, None);
    let buf = vec![0u8; 512];
    let mut cmd = SubmissionEntry::read(1, 0, 1);
    cmd.prp1 = buf.as_ptr() as u64;
    // SAFETY: the model refuses the CPU address and transfers nothing.
    let e = unsafe { qp.execute(cmd, None) }.unwrap_err();
    match e {
        NvmeError::Command { status, .. } => assert_eq!(status.name(), "Data Transfer Error"),
        other => panic!("{other:?}"),
    }
}

// ---- Timeouts, Abort and controller reset -------------------------------

/// Submits a one-block read of `lba` into `buf` with `tag`.
fn submit_read(qp: &mut Qp, lba: u64, buf: &mut [u8], tag: u64) -> u16 {
    // SAFETY: every test keeps `buf` alive and untouched until its completion
    // was delivered, or until the end of the test (after which nothing runs
    // the model again).
    unsafe {
        qp.submit(
            SubmissionEntry::read(1, lba, (buf.len() / 512) as u32),
            Some(DataBuf::from_mut_slice(buf)),
            tag,
        )
        .unwrap()
    }
}

/// The recovery step an owner runs on a timer, as the `ctrl` module docs
/// describe it: abort what is overdue, reset when the queue or the admin
/// queue asks for it. Returns whether a reset ran and its outcome.
fn recover(
    ctrl: &mut Ctrl,
    qp: &mut Qp,
    now: u64,
    deliver: impl FnMut(Completion),
) -> Option<Result<(), NvmeError>> {
    let mut reset = false;
    while let Some(x) = qp.expire(now) {
        match x {
            Expiry::Abort { qid, cid, .. } => {
                // Advisory: a declined or failed abort ends in a reset later.
                let _ = ctrl.abort(qid, cid);
            }
            Expiry::ResetNeeded { .. } => reset = true,
        }
    }
    (reset || ctrl.needs_reset() || qp.needs_reset()).then(|| ctrl.reset(&mut [qp], deliver))
}

#[test]
fn a_command_that_never_completes_is_aborted_and_its_owner_gets_the_abort_error() {
    let (sim, hal, mut ctrl, mut qp) = setup(small(), 8, None);
    let disk = sim.disk();
    sim.inject(stall(io::READ, 5));
    let mut buf = vec![0u8; 512];
    let cid = submit_read(&mut qp, 5, &mut buf, 77);
    assert_eq!(sim.stalled(), 1);
    // Before its deadline nothing happens.
    assert_eq!(qp.expire(hal.now()), None);
    let deadline = qp.next_deadline().unwrap();
    assert_eq!(
        qp.expire(deadline),
        Some(Expiry::Abort {
            qid: 1,
            cid,
            opcode: io::READ
        })
    );
    assert_eq!(qp.expire(deadline), None);
    // Past its deadline the owner still hears nothing: the device owns the
    // buffer.
    assert_eq!(qp.process_completions(|c| panic!("{c:?}")), 0);
    assert!(qp.is_in_flight(cid));
    assert!(sim.may_access(buf.as_ptr() as usize, 512));
    // The controller aborts it; then it completes, with the abort error.
    assert_eq!(ctrl.abort(1, cid), Ok(true));
    assert!(!sim.may_access(buf.as_ptr() as usize, 512));
    let mut got = Vec::new();
    assert_eq!(qp.process_completions(|c| got.push(c)), 1);
    assert_eq!(got.len(), 1);
    let e = NvmeError::Aborted {
        qid: 1,
        cid,
        opcode: io::READ,
    };
    assert_eq!((got[0].tag, got[0].cid, got[0].result), (77, cid, Err(e)));
    assert_eq!(
        e.to_string(),
        format!("command aborted after timing out (queue 1, cid {cid}, opcode 0x02)")
    );
    // Nothing more to do, no reset needed, and the queue keeps working.
    assert_eq!(qp.expire(u64::MAX), None);
    assert!(!qp.needs_reset() && !ctrl.needs_reset());
    read(&mut qp, 5, 1, &mut buf).unwrap();
    assert!(buf[..] == disk[5 * 512..6 * 512]);
}

#[test]
fn a_command_completing_after_a_declined_abort_reaches_its_owner_with_its_data() {
    let (sim, hal, mut ctrl, mut qp) = setup(small(), 8, None);
    let disk = sim.disk();
    sim.inject(stall(io::READ, 9));
    sim.set_ignore_aborts(true);
    let mut buf = vec![0u8; 512];
    let cid = submit_read(&mut qp, 9, &mut buf, 5);
    hal.advance(100_000_000);
    assert!(matches!(qp.expire(hal.now()), Some(Expiry::Abort { .. })));
    // "Not aborted", as QEMU 7.2 answers.
    assert_eq!(ctrl.abort(1, cid), Ok(false));
    assert_eq!(ctrl.stats().aborts_declined, 1);
    assert_eq!(qp.process_completions(|c| panic!("{c:?}")), 0);
    // The slow device finishes within the grace period: a normal completion.
    sim.finish_stalled();
    let mut got = None;
    assert_eq!(qp.process_completions(|c| got = Some((c.tag, c.result))), 1);
    assert_eq!(got, Some((5, Ok(0))));
    assert!(buf[..] == disk[9 * 512..10 * 512]);
    assert_eq!(qp.expire(u64::MAX), None);
    assert!(!qp.needs_reset());
    assert_eq!(qp.stats().late, 1);
}

#[test]
fn an_ignored_abort_leads_to_a_reset_that_fails_every_in_flight_command_once() {
    let (sim, hal, mut ctrl, mut qp) = setup(small(), 8, None);
    let disk = sim.disk();
    sim.set_ignore_aborts(true);
    for lba in 1..=3 {
        sim.inject(stall(io::READ, lba));
    }
    let mut bufs = vec![vec![0u8; 512]; 3];
    let (a, rest) = bufs.split_first_mut().unwrap();
    let cid_a = submit_read(&mut qp, 1, a, 100);
    // Two more that stall too, 60 ms later: their deadlines are still ahead
    // when the reset comes.
    hal.advance(60_000_000);
    let cid_b = submit_read(&mut qp, 2, &mut rest[0], 101);
    let cid_c = submit_read(&mut qp, 3, &mut rest[1], 102);
    hal.advance(45_000_000);
    let mut delivered = Vec::new();
    // A is overdue: aborted, but the controller declines.
    assert_eq!(
        recover(&mut ctrl, &mut qp, hal.now(), |c| delivered.push(c)),
        None
    );
    assert_eq!(qp.stats().aborts, 1);
    assert!(delivered.is_empty());
    // Past the grace period: a reset is needed; new commands are refused.
    hal.advance(50_000_000);
    assert_eq!(
        qp.expire(hal.now()),
        Some(Expiry::ResetNeeded {
            qid: 1,
            cid: cid_a,
            opcode: io::READ
        })
    );
    assert_eq!(qp.expire(hal.now()), None);
    assert!(qp.needs_reset());
    let mut other = vec![0u8; 512];
    // SAFETY: refused before the device sees it.
    let refused = unsafe {
        qp.submit(
            SubmissionEntry::read(1, 0, 1),
            Some(DataBuf::from_mut_slice(&mut other)),
            0,
        )
    };
    assert_eq!(refused, Err(NvmeError::ResetRequired { qid: 1 }));
    assert!(delivered.is_empty());
    // The reset fails each of them exactly once: A timed out, B and C were
    // cancelled on its account.
    assert_eq!(
        recover(&mut ctrl, &mut qp, hal.now(), |c| delivered.push(c)),
        Some(Ok(()))
    );
    delivered.sort_by_key(|c| c.tag);
    let got: Vec<_> = delivered.iter().map(|c| (c.tag, c.result)).collect();
    let (q, op) = (1, io::READ);
    assert_eq!(
        got,
        vec![
            (
                100,
                Err(NvmeError::Timeout {
                    qid: q,
                    cid: cid_a,
                    opcode: op
                })
            ),
            (
                101,
                Err(NvmeError::Cancelled {
                    qid: q,
                    cid: cid_b,
                    opcode: op
                })
            ),
            (
                102,
                Err(NvmeError::Cancelled {
                    qid: q,
                    cid: cid_c,
                    opcode: op
                })
            ),
        ]
    );
    assert_eq!(
        delivered[1].result.unwrap_err().to_string(),
        format!("command cancelled by a controller reset (queue 1, cid {cid_b}, opcode 0x02)")
    );
    // Nothing is delivered again afterwards, and new commands work.
    assert_eq!(qp.process_completions(|c| panic!("{c:?}")), 0);
    assert_eq!(qp.expire(u64::MAX), None);
    assert_eq!(qp.in_flight(), 0);
    for lba in 0..10 {
        read(&mut qp, lba, 1, &mut other).unwrap();
        assert!(other[..] == disk[lba as usize * 512..lba as usize * 512 + 512]);
    }
    assert_eq!(sim.disables(), 1);
}

#[test]
fn a_controller_that_stops_answering_even_admin_commands_is_reset_and_works_again() {
    let (sim, hal, mut ctrl, mut qp) = setup(small(), 8, None);
    let disk = sim.disk();
    sim.set_hung(true);
    let mut bufs = vec![vec![0u8; 512]; 2];
    for (i, b) in bufs.iter_mut().enumerate() {
        submit_read(&mut qp, 20 + i as u64, b, i as u64);
    }
    assert_eq!(sim.stalled(), 2);
    let mut delivered = Vec::new();
    hal.advance(100_000_000);
    // The first Abort times out on the admin queue, which then refuses the
    // second; the controller asks for a reset itself.
    let deadline = qp.next_deadline().unwrap();
    let first = qp.expire(deadline).unwrap();
    let Expiry::Abort { cid, .. } = first else {
        panic!("{first:?}")
    };
    assert!(matches!(
        ctrl.abort(1, cid),
        Err(NvmeError::Timeout {
            qid: 0,
            opcode: 0x08,
            ..
        })
    ));
    assert!(ctrl.needs_reset());
    // (The Abort's own 100 ms wait outlasted the first command's grace, so
    // look exactly at the second command's deadline.)
    let second = qp.next_deadline().unwrap();
    assert!(matches!(qp.expire(second), Some(Expiry::Abort { .. })));
    assert_eq!(
        ctrl.abort(1, cid + 1),
        Err(NvmeError::ResetRequired { qid: 0 })
    );
    assert!(delivered.is_empty());
    assert_eq!(
        recover(&mut ctrl, &mut qp, hal.now(), |c| delivered.push(c)),
        Some(Ok(()))
    );
    delivered.sort_by_key(|c| c.tag);
    assert_eq!(delivered.len(), 2);
    for (i, c) in delivered.iter().enumerate() {
        assert_eq!(c.tag, i as u64);
        assert!(
            matches!(c.result, Err(NvmeError::Timeout { qid: 1, .. })),
            "{c:?}"
        );
    }
    // Admin and I/O commands work again.
    assert!(!ctrl.needs_reset() && !qp.needs_reset());
    assert_eq!(ctrl.namespace(1).unwrap().blocks, 128);
    let mut buf = vec![0u8; 512];
    read(&mut qp, 21, 1, &mut buf).unwrap();
    assert!(buf[..] == disk[21 * 512..22 * 512]);
}

#[test]
fn a_controller_that_never_becomes_ready_after_reset_fails_cleanly_and_refuses_commands() {
    let (sim, _hal, mut ctrl, mut qp) = setup(small(), 8, None);
    sim.set_hung(true);
    let mut buf = vec![0u8; 512];
    submit_read(&mut qp, 3, &mut buf, 9);
    sim.set_never_ready(true);
    let mut delivered = Vec::new();
    let e = ctrl
        .reset(&mut [&mut qp], |c| delivered.push(c))
        .unwrap_err();
    assert_eq!(
        e,
        NvmeError::NotReady {
            enable: true,
            waited_ms: 1000
        }
    );
    // The controller did stop, so the command was handed back once.
    assert_eq!(delivered.len(), 1);
    assert!(matches!(
        delivered[0].result,
        Err(NvmeError::Cancelled { .. })
    ));
    // Both queues refuse new commands with a clear error.
    assert!(qp.is_down() && qp.needs_reset() && ctrl.needs_reset());
    // SAFETY: refused before the device sees it.
    let r = unsafe { qp.submit(SubmissionEntry::flush(1), None, 0) };
    assert_eq!(r, Err(NvmeError::ControllerDown { qid: 1 }));
    assert_eq!(
        r.unwrap_err().to_string(),
        "queue 1 refuses commands: the controller did not come back after a reset"
    );
    assert_eq!(ctrl.namespace(1), Err(NvmeError::ControllerDown { qid: 0 }));
    assert_eq!(qp.expire(u64::MAX), None);
    assert_eq!(ctrl.stats().failed_resets, 1);
    // When the controller recovers, a later reset brings everything back.
    sim.set_never_ready(false);
    ctrl.reset(&mut [&mut qp], |c| panic!("{c:?}")).unwrap();
    assert!(!qp.is_down());
    read(&mut qp, 3, 1, &mut buf).unwrap();
    assert_eq!(
        ctrl.stats(),
        ControllerStats {
            resets: 2,
            failed_resets: 1,
            ..Default::default()
        }
    );
}

#[test]
fn a_controller_that_cannot_be_stopped_keeps_every_buffer() {
    let (sim, _hal, mut ctrl, mut qp) = setup(small(), 8, None);
    sim.set_hung(true);
    let mut buf = vec![0u8; 512];
    let cid = submit_read(&mut qp, 3, &mut buf, 9);
    sim.set_never_disable(true);
    let e = ctrl
        .reset(&mut [&mut qp], |c| panic!("buffer handed back: {c:?}"))
        .unwrap_err();
    assert_eq!(
        e,
        NvmeError::NotReady {
            enable: false,
            waited_ms: 1000
        }
    );
    // The device may still write the buffer: the command stays in flight and
    // the queue takes nothing new.
    assert!(sim.may_access(buf.as_ptr() as usize, 512));
    assert!(qp.is_in_flight(cid));
    // SAFETY: refused before the device sees it.
    let r = unsafe { qp.submit(SubmissionEntry::flush(1), None, 0) };
    assert_eq!(r, Err(NvmeError::ControllerDown { qid: 1 }));
}

#[test]
fn no_completion_reaches_an_owner_while_the_device_may_still_access_its_buffer() {
    let (sim, hal, mut ctrl, mut qp) = setup(small(), 8, None);
    const CANARY: u8 = 0xee;
    let mut bufs = vec![vec![0u8; 512]; 5];
    let addrs: Vec<usize> = bufs.iter().map(|b| b.as_ptr() as usize).collect();
    let mut delivered: Vec<(u64, Result<u32, NvmeError>)> = Vec::new();
    // The owner: checks with the device model that it is done with the
    // buffer, then reuses it at once (fills it with a canary).
    let mut deliver = |c: Completion| {
        let addr = addrs[c.tag as usize];
        assert!(
            !sim.may_access(addr, 512),
            "tag {} delivered while the device may still access its buffer",
            c.tag
        );
        // SAFETY: the driver says the device is done with the buffer; the
        // test owns it (512 bytes) and nothing else touches it now.
        unsafe { std::ptr::write_bytes(addr as *mut u8, CANARY, 512) };
        delivered.push((c.tag, c.result));
    };
    sim.inject(stall(io::READ, 10));
    sim.inject(stall(io::READ, 20));
    sim.inject(stall(io::READ, 50));
    // 0 and 1 stall, 2 and 3 complete at once.
    for (tag, lba) in [(0u64, 10u64), (1, 20), (2, 30), (3, 40)] {
        submit_read(&mut qp, lba, &mut bufs[tag as usize], tag);
    }
    qp.process_completions(&mut deliver);
    // Past the deadline: 0 is aborted by the controller, 1's abort declined.
    hal.advance(100_000_000);
    let now = hal.now();
    let Some(Expiry::Abort { cid, .. }) = qp.expire(now) else {
        panic!()
    };
    assert_eq!(ctrl.abort(1, cid), Ok(true));
    sim.set_ignore_aborts(true);
    let Some(Expiry::Abort { cid, .. }) = qp.expire(now) else {
        panic!()
    };
    assert_eq!(ctrl.abort(1, cid), Ok(false));
    assert_eq!(qp.expire(now), None);
    qp.process_completions(&mut deliver);
    // 4 stalls too, before its own deadline.
    submit_read(&mut qp, 50, &mut bufs[4], 4);
    assert!(sim.may_access(addrs[1], 512) && sim.may_access(addrs[4], 512));
    // Past the grace period: the reset stops the device, then hands back 1
    // and 4.
    hal.advance(50_000_000);
    assert_eq!(
        recover(&mut ctrl, &mut qp, hal.now(), &mut deliver),
        Some(Ok(()))
    );
    delivered.sort_by_key(|d| d.0);
    let tags: Vec<u64> = delivered.iter().map(|d| d.0).collect();
    assert_eq!(tags, vec![0, 1, 2, 3, 4], "each exactly once");
    assert!(matches!(delivered[0].1, Err(NvmeError::Aborted { .. })));
    assert!(matches!(delivered[1].1, Err(NvmeError::Timeout { .. })));
    assert!(delivered[2].1.is_ok() && delivered[3].1.is_ok());
    assert!(matches!(delivered[4].1, Err(NvmeError::Cancelled { .. })));
    // Whatever the device does now, no reused buffer changes.
    sim.finish_stalled();
    assert_eq!(qp.process_completions(|c| panic!("{c:?}")), 0);
    assert!(bufs.iter().all(|b| b.iter().all(|&x| x == CANARY)));
}

#[test]
fn the_reset_recreates_the_io_queue_with_the_same_memory_and_vector() {
    let (sim, _hal, mut ctrl, mut qp) = setup(small(), 16, Some(3));
    let before = sim.io_queue(1).unwrap();
    assert_eq!(before.vector, Some(3));
    assert_eq!(before.cq_base, qp.cq_phys());
    assert_eq!(before.sq_base, qp.sq_phys());
    let mut buf = vec![0u8; 512];
    // Leave the rings mid-way, so that the rewind shows.
    for lba in 0..5 {
        submit_read(&mut qp, lba, &mut buf, lba);
        qp.process_completions(|c| c.result.map(|_| ()).unwrap());
    }
    ctrl.reset(&mut [&mut qp], |c| panic!("{c:?}")).unwrap();
    assert_eq!(sim.io_queue(1), Some(before));
    let raised = sim.interrupts(3);
    submit_read(&mut qp, 7, &mut buf, 7);
    assert_eq!(sim.interrupts(3), raised + 1);
    let mut got = None;
    qp.process_completions(|c| got = Some((c.tag, c.result)));
    assert_eq!(got, Some((7, Ok(0))));
    assert_eq!(buf[..], sim.disk()[7 * 512..8 * 512]);
}

#[test]
fn a_reset_refuses_a_queue_with_the_admin_queue_id_and_leaves_the_controller_alone() {
    let (sim, hal, mut ctrl, _qp) = setup(small(), 8, None);
    let mut bogus = Qp::new(hal, sim.clone(), 0, 8, 4, 1_000_000, PAGE_SIZE, None).unwrap();
    assert_eq!(
        ctrl.reset(&mut [&mut bogus], |c| panic!("{c:?}")),
        Err(NvmeError::BadQueue { qid: 0, entries: 8 })
    );
    assert_eq!(sim.disables(), 0);
    assert_eq!(ctrl.stats().resets, 0);
    assert_eq!(ctrl.namespace(1).unwrap().blocks, 128);
}

#[test]
fn stats_count_timeouts_aborts_and_resets() {
    let (sim, hal, mut ctrl, mut qp) = setup(small(), 8, None);
    sim.inject(stall(io::READ, 1));
    sim.inject(stall(io::READ, 2));
    let mut bufs = vec![vec![0u8; 512]; 2];
    let (a, b) = bufs.split_at_mut(1);
    submit_read(&mut qp, 1, &mut a[0], 0);
    submit_read(&mut qp, 2, &mut b[0], 1);
    hal.advance(100_000_000);
    // The first abort succeeds; then the controller ignores aborts.
    let Some(Expiry::Abort { cid, .. }) = qp.expire(hal.now()) else {
        panic!()
    };
    ctrl.abort(1, cid).unwrap();
    sim.set_ignore_aborts(true);
    let mut n = 0;
    assert_eq!(recover(&mut ctrl, &mut qp, hal.now(), |_| n += 1), None);
    qp.process_completions(|_| n += 1);
    hal.advance(50_000_000);
    assert!(recover(&mut ctrl, &mut qp, hal.now(), |_| n += 1).is_some());
    assert_eq!(n, 2);
    let s = qp.stats();
    assert_eq!(
        (
            s.submitted,
            s.timeouts,
            s.aborts,
            s.aborted,
            s.reset_failed,
            s.resets
        ),
        (2, 2, 2, 1, 1, 1)
    );
    assert_eq!((s.completed, s.errors, s.late), (1, 1, 1));
    assert_eq!(
        ctrl.stats(),
        ControllerStats {
            aborts_sent: 2,
            aborts_declined: 1,
            resets: 1,
            failed_resets: 0,
            rejoins: 0,
            lost_doorbells: 0,
        }
    );
}

// ---- QEMU 7.2 and QEMU 10.0 (sim module docs) ---------------------------

fn on(qemu: Qemu) -> SimConfig {
    SimConfig { qemu, ..small() }
}

#[test]
fn the_driver_serves_through_shadow_doorbells_on_both_qemus() {
    for qemu in [Qemu::V7_2, Qemu::V10_0] {
        let (sim, _hal, ctrl, mut qp) = setup(on(qemu), 8, Some(1));
        let disk = sim.disk();
        // CAP.CSS differs (0xc1, 0x41); the NVM command set bit is in both.
        let css = (ctrl.cap().0 >> 37) & 0xff;
        assert_eq!(css, if qemu == Qemu::V7_2 { 0xc1 } else { 0x41 });
        assert!(ctrl.cap().nvm_command_set());
        assert!(ctrl.doorbell_buffer() && sim.dbbuf_enabled(), "{qemu:?}");
        // Around the ring a few times, reads and writes.
        let mut buf = vec![0u8; 1024];
        for i in 0..20u64 {
            let lba = (i * 7) % 120;
            read(&mut qp, lba, 2, &mut buf).unwrap();
            let at = lba as usize * 512;
            assert!(buf[..] == disk[at..at + 1024], "{qemu:?} lba {lba}");
        }
        let data = vec![0x5au8; 512];
        write(&mut qp, 100, 1, &data).unwrap();
        assert!(sim.disk()[100 * 512..101 * 512] == data[..], "{qemu:?}");
        assert_eq!(sim.bad_shadow_values(), 0, "{qemu:?}");
    }
}

#[test]
fn queue_entry_sizes_are_checked_at_enable_on_7_2_and_at_queue_creation_on_10_0() {
    // A CC without IOSQES/IOCQES (an admin-only driver may leave them 0).
    let enable_without_sizes = |sim: &Sim| {
        sim.write32(regs::AQA, (7 << 16) | 7);
        sim.write32(regs::CC, regs::CC_EN);
        sim.read32(regs::CSTS)
    };
    let sim = Sim::new(on(Qemu::V7_2));
    assert_eq!(enable_without_sizes(&sim), regs::CSTS_CFS);
    let sim = Sim::new(on(Qemu::V10_0));
    assert_eq!(enable_without_sizes(&sim), regs::CSTS_RDY);

    // The driver writes 64- and 16-byte entry sizes: both take its queues.
    // On 10.0, a CC rewritten without them (EN kept) makes Create I/O
    // Completion Queue fail.
    let sim = Sim::new(on(Qemu::V10_0));
    let mut ctrl = Controller::init(SimHal::new(), sim.clone(), config()).unwrap();
    let q1 = ctrl.create_io_queue(1, 8, None).unwrap();
    sim.write32(regs::CC, regs::CC_EN);
    match ctrl.create_io_queue(2, 8, None) {
        Err(NvmeError::Command { status, .. }) => {
            assert_eq!(status.name(), "Invalid Queue Size");
            assert!(status.dnr());
        }
        other => panic!("{:?}", other.map(|q| q.qid())),
    }
    assert!(sim.has_io_queue(1) && !sim.has_io_queue(2));
    drop(q1);
}

#[test]
fn qemu_10_declines_an_abort_yet_the_read_completes_with_the_cancelled_io_error() {
    for qemu in [Qemu::V7_2, Qemu::V10_0] {
        let (sim, hal, mut ctrl, mut qp) = setup(on(qemu), 8, None);
        let disk = sim.disk();
        sim.inject(stall(io::READ, 9));
        sim.set_ignore_aborts(true);
        let mut buf = vec![0u8; 512];
        let cid = submit_read(&mut qp, 9, &mut buf, 5);
        hal.advance(100_000_000);
        assert!(matches!(qp.expire(hal.now()), Some(Expiry::Abort { .. })));
        // Both answer "not aborted".
        assert_eq!(ctrl.abort(1, cid), Ok(false), "{qemu:?}");
        assert_eq!(ctrl.stats().aborts_declined, 1);
        let mut got = Vec::new();
        let n = qp.process_completions(|c| got.push((c.tag, c.result)));
        if qemu == Qemu::V7_2 {
            // 7.2 left the read alone: the device still owns the buffer.
            assert_eq!(n, 0);
            assert!(sim.may_access(buf.as_ptr() as usize, 512));
            continue;
        }
        // 10.0 cancelled its I/O: the owner gets that error now, the buffer
        // is its own again, and no reset is needed.
        assert!(!sim.may_access(buf.as_ptr() as usize, 512));
        assert_eq!(n, 1);
        let status = Status::new(2, 0x81);
        assert_eq!(status.name(), "Unrecovered Read Error");
        let e = NvmeError::Command {
            qid: 1,
            opcode: io::READ,
            status,
        };
        assert_eq!(got, vec![(5, Err(e))]);
        assert_eq!(qp.stats().late, 1);
        assert_eq!(qp.expire(u64::MAX), None);
        assert!(!qp.needs_reset() && !ctrl.needs_reset());
        read(&mut qp, 9, 1, &mut buf).unwrap();
        assert!(buf[..] == disk[9 * 512..10 * 512]);
    }
}
