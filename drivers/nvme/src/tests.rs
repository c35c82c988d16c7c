//! The driver against the simulated controller.

use crate::cmd::{io, Status};
use crate::sim::{Fault, FaultAction, Sim, SimConfig, SimHal};
use crate::*;
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

// Counts allocations per thread, so that tests running in parallel do not see
// each other's.
struct Counting;
thread_local! {
    static ALLOCS: Cell<u64> = const { Cell::new(0) };
}
// SAFETY: forwards to the system allocator; the counter is a const-initialised
// thread-local without destructor.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
        // SAFETY: same contract as ours.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(p, l) }
    }
}
#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocs() -> u64 {
    ALLOCS.with(|c| c.get())
}

type Ctrl = Controller<SimHal, Sim>;
type Qp = QueuePair<SimHal, Sim>;

fn config() -> Config {
    Config {
        admin_entries: 8,
        admin_timeout_ms: 100,
        io_timeout_ms: 100,
        abort_grace_ms: 50,
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
            Some(DataBuf {
                addr: odd.as_mut_ptr() as usize + 2,
                len: 512,
            }),
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
    // Creating the same queue id twice: Invalid Queue Identifier.
    match ctrl.create_io_queue(1, 16, None) {
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
    let mut bufs = vec![vec![0u8; 3 * 4096]; 32];
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
