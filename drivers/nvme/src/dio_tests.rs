//! The DIO layer (`dioxide-iomap`) over this driver's [`NvmeQueue`] and the
//! simulated controller: the path the kernel runs, end to end on the host.
//! (Here rather than in the DIO layer's crate, which does not depend on any
//! driver.)

use crate::blk::NvmeQueue;
use crate::sim::{Sim, SimConfig, SimHal};
use dioxide_iomap::*;
use std::cell::RefCell;

/// A file of mapped extents `(file offset, length, device address)`.
struct FakeFile {
    maps: Vec<(u64, u64, u64)>,
    size: u64,
}

impl FakeFile {
    fn new(maps: Vec<(u64, u64, IomapType, u64)>, size: u64) -> Self {
        FakeFile {
            maps: maps.into_iter().map(|(o, l, _, a)| (o, l, a)).collect(),
            size,
        }
    }
    fn contiguous(len: u64, dev: u64) -> Self {
        FakeFile {
            maps: vec![(0, len, dev)],
            size: len,
        }
    }
}

impl IomapOps for FakeFile {
    fn iomap_begin(&self, pos: u64, _len: u64, _flags: IomapFlags) -> Result<Iomap, IomapError> {
        self.maps
            .iter()
            .find(|&&(o, l, _)| pos >= o && pos < o + l)
            .map(|&(offset, length, addr)| Iomap {
                kind: IomapType::Mapped,
                offset,
                length,
                addr,
                flags: MappingFlags::empty(),
            })
            .ok_or(IomapError::Range)
    }
    fn size(&self) -> u64 {
        self.size
    }
    fn block_size(&self) -> u32 {
        4096
    }
}

/// A 4 KiB-aligned window of `len` bytes in a vector: (vector, offset).
fn abuf(len: usize) -> (Vec<u8>, usize) {
    let v = vec![0u8; len + 8192];
    let off = (4096 - v.as_ptr() as usize % 4096) % 4096;
    (v, off)
}

#[test]
fn through_the_nvme_driver_and_its_simulated_controller() {
    let sim = Sim::new(SimConfig {
        block_size: 4096,
        blocks: 256,
        ..Default::default()
    });
    let data: Vec<u8> = (0..256 * 4096)
        .map(|i: usize| (i / 4096) as u8 ^ (i % 251) as u8)
        .collect();
    sim.write_disk(0, &data);
    let hal = SimHal::new();
    let mut ctrl = crate::Controller::init(hal.clone(), sim.clone(), Default::default()).unwrap();
    let ns = ctrl.namespace(1).unwrap();
    let qp = ctrl.create_io_queue(1, 64, None).unwrap();
    let mut e = Engine::new(NvmeQueue::new(qp, hal, ns));
    let f = FakeFile::new(
        vec![
            (0, 65536, IomapType::Mapped, 40960),
            (65536, 65536, IomapType::Mapped, 8192),
        ],
        131072,
    );
    let (mut v, o) = abuf(131072);
    // Simple, then generic across both extents.
    // SAFETY: v outlives the synchronous calls.
    let r = unsafe {
        e.dio_rw(DioRequest::read(
            Kiocb::sync(4096),
            IoBuf::from_mut_slice(&mut v[o..o + 4096]),
            &f,
        ))
    };
    assert_eq!(r, Ok(DioResult::Done(4096)));
    assert_eq!(&v[o..o + 4096], &data[45056..49152]);
    // SAFETY: a synchronous request: it returns only when the device is done with the buffer, a slice of `v`, which outlives it.
    let r = unsafe {
        e.dio_rw(DioRequest::read(
            Kiocb::sync(0),
            IoBuf::from_mut_slice(&mut v[o..o + 131072]),
            &f,
        ))
    };
    assert_eq!(r, Ok(DioResult::Done(131072)));
    assert_eq!(&v[o..o + 65536], &data[40960..106496]);
    assert_eq!(&v[o + 65536..o + 131072], &data[8192..73728]);
    assert_eq!((e.stats().simple, e.stats().generic), (1, 1));
    // A raw read.
    // SAFETY: a synchronous request: it returns only when the device is done with the buffer, a slice of `v`, which outlives it.
    let r = unsafe {
        e.raw(
            Op::Read,
            3,
            IoBuf::from_mut_slice(&mut v[o..o + 4096]),
            None,
        )
    };
    assert_eq!(r, Ok(DioResult::Done(4096)));
    assert_eq!(&v[o..o + 4096], &data[12288..16384]);
}

/// A controller that stops answering: the owners of the commands in flight
/// (a simple-path read into the caller's buffer, a generic read through a
/// bounce buffer) hear of the timeout only after the abort went unanswered
/// and the controller was reset — never while the device could still write
/// into their buffers — and the queue serves again afterwards.
#[test]
fn a_timed_out_command_reaches_its_owner_only_after_the_controller_reset() {
    type Seen = Vec<(usize, Result<usize, DioError>, bool)>;
    type Device = Option<(Sim, Vec<(usize, usize)>)>;
    thread_local! {
        static SEEN: RefCell<Seen> = const { RefCell::new(Vec::new()) };
        static DEV: RefCell<Device> = const { RefCell::new(None) };
    }
    fn owner(ctx: usize, r: Result<usize, DioError>) {
        let busy = DEV.with(|d| {
            let d = d.borrow();
            let (sim, bufs) = d.as_ref().expect("device registered");
            sim.may_access(bufs[ctx].0, bufs[ctx].1)
        });
        SEEN.with(|s| s.borrow_mut().push((ctx, r, busy)));
    }
    let sim = Sim::new(SimConfig {
        block_size: 4096,
        blocks: 256,
        ..Default::default()
    });
    let data: Vec<u8> = (0..256 * 4096).map(|i: usize| (i % 253) as u8).collect();
    sim.write_disk(0, &data);
    let hal = SimHal::new();
    let cfg = crate::Config {
        io_timeout_ms: 100,
        admin_timeout_ms: 100,
        abort_grace_ms: 100,
        ..Default::default()
    };
    let mut ctrl = crate::Controller::init(hal.clone(), sim.clone(), cfg).unwrap();
    let ns = ctrl.namespace(1).unwrap();
    let qp = ctrl.create_io_queue(1, 64, None).unwrap();
    let ctrl = std::sync::Arc::new(crate::SharedController::new(ctrl));
    let mut e = Engine::new(NvmeQueue::new(qp, hal.clone(), ns).with_controller(ctrl));
    let f = FakeFile::contiguous(256 * 4096, 0);
    let (mut a, ao) = abuf(4096);
    let (mut b, bo) = abuf(8192);
    let bufs = vec![
        (a[ao..].as_mut_ptr() as usize, 4096),
        (b[bo..].as_mut_ptr() as usize, 8192),
    ];
    DEV.with(|d| *d.borrow_mut() = Some((sim.clone(), bufs.clone())));
    sim.set_hung(true);
    sim.set_ignore_aborts(true);
    for (ctx, &(addr, len)) in bufs.iter().enumerate() {
        let iocb = Kiocb::with_owner(4096 * ctx as u64, ReqId::new(ctx as u16, 0));
        let flags = if ctx == 1 {
            DioFlags::BOUNCE
        } else {
            DioFlags::empty()
        };
        // SAFETY: a and b outlive every completion (checked below).
        let r = unsafe {
            e.dio_rw(DioRequest {
                iocb,
                op: Op::Read,
                buf: IoBuf::from_addr(addr, len).unwrap(),
                ops: &f,
                dops: None,
                flags,
                done_before: 0,
            })
        };
        assert_eq!(r, Ok(DioResult::Queued));
    }
    assert_eq!((e.stats().simple, e.stats().generic), (1, 1));
    // Polling and expiring before, at and after the deadlines: nobody hears
    // anything until the reset.
    for _ in 0..50 {
        e.poll();
        e.expire();
        e.complete(|id, r| owner(id.index(), r));
        hal.advance(10_000_000);
        if SEEN.with(|s| !s.borrow().is_empty()) {
            break;
        }
    }
    let seen = SEEN.with(|s| s.borrow().clone());
    assert_eq!(seen.len(), 2, "both owners heard of the timeout: {seen:?}");
    for (ctx, r, busy) in seen {
        assert!(
            !busy,
            "owner {ctx} got its buffer back while the device could write it"
        );
        assert!(
            matches!(
                r,
                Err(DioError::Io {
                    err: BlkError::Timeout,
                    ..
                })
            ),
            "owner {ctx}: {r:?}"
        );
    }
    // The controller answers again after the reset: reads work.
    let (mut v, o) = abuf(8192);
    // SAFETY: v outlives the synchronous call.
    let r = unsafe {
        e.dio_rw(DioRequest::read(
            Kiocb::sync(8192),
            IoBuf::from_mut_slice(&mut v[o..o + 8192]),
            &f,
        ))
    };
    assert_eq!(r, Ok(DioResult::Done(8192)));
    assert_eq!(&v[o..o + 8192], &data[8192..16384]);
    let q = e.queue().qp.stats();
    assert_eq!(q.resets, 1, "{q:?}");
    drop((a, b));
}

/// A 4 KiB-block namespace served by two queue pairs (two cores' engines)
/// on one controller with shadow doorbells: the block layer's `lba_shift`
/// is 12, reads and writes of either engine see the same namespace, and a
/// transfer that is not whole 4 KiB blocks is refused before the device.
#[test]
fn a_4k_namespace_through_two_engines_sharing_the_controller() {
    let sim = Sim::new(SimConfig {
        block_size: 4096,
        blocks: 256,
        ..Default::default()
    });
    let data: Vec<u8> = (0..256 * 4096)
        .map(|i: usize| (i / 4096) as u8 ^ (i % 241) as u8)
        .collect();
    sim.write_disk(0, &data);
    let hal = SimHal::new();
    let mut ctrl = crate::Controller::init(hal.clone(), sim.clone(), Default::default()).unwrap();
    assert!(ctrl.doorbell_buffer());
    assert_eq!(ctrl.active_namespaces().unwrap(), vec![1]);
    let ns = ctrl.namespace(1).unwrap();
    assert_eq!(ns.block_size, 4096);
    let mut qs = ctrl.create_io_queues(2, 64, false).unwrap();
    let shared = std::sync::Arc::new(crate::SharedController::new(ctrl));
    let q2 = qs.pop().unwrap();
    let q1 = qs.pop().unwrap();
    assert!(q1.shadow_doorbells() && q2.shadow_doorbells());
    let mut e1 = Engine::new(NvmeQueue::new(q1, hal.clone(), ns).with_controller(shared.clone()));
    let mut e2 = Engine::new(NvmeQueue::new(q2, hal.clone(), ns).with_controller(shared.clone()));
    assert_eq!(e1.queue().lba_shift(), 12);
    assert_eq!(e2.queue().capacity(), 256);
    let f = FakeFile::new(
        vec![
            (0, 16384, IomapType::Mapped, 4096 * 100),
            (16384, 16384, IomapType::Mapped, 4096 * 7),
        ],
        32768,
    );
    let (mut v, o) = abuf(32768);
    for e in [&mut e1, &mut e2] {
        v.fill(0);
        // Simple path, one block.
        // SAFETY: a synchronous request: it returns only when the device is done with the buffer, a slice of `v`, which outlives it.
        let r = unsafe {
            e.dio_rw(DioRequest::read(
                Kiocb::sync(4096),
                IoBuf::from_mut_slice(&mut v[o..o + 4096]),
                &f,
            ))
        };
        assert_eq!(r, Ok(DioResult::Done(4096)));
        assert_eq!(&v[o..o + 4096], &data[4096 * 101..4096 * 102]);
        // Generic path across both extents.
        // SAFETY: as above.
        let r = unsafe {
            e.dio_rw(DioRequest::read(
                Kiocb::sync(0),
                IoBuf::from_mut_slice(&mut v[o..o + 32768]),
                &f,
            ))
        };
        assert_eq!(r, Ok(DioResult::Done(32768)));
        assert_eq!(&v[o..o + 16384], &data[4096 * 100..4096 * 104]);
        assert_eq!(&v[o + 16384..o + 32768], &data[4096 * 7..4096 * 11]);
    }
    // A raw write of two blocks through engine 1, read back through 2.
    let (mut w, wo) = abuf(8192);
    for (i, b) in w[wo..wo + 8192].iter_mut().enumerate() {
        *b = (i % 199) as u8;
    }
    // SAFETY: a synchronous request on a slice of `w`, which outlives it.
    let r = unsafe {
        e1.raw(
            Op::Write,
            50,
            IoBuf::from_mut_slice(&mut w[wo..wo + 8192]),
            None,
        )
    };
    assert_eq!(r, Ok(DioResult::Done(8192)));
    // SAFETY: as above, on `v`.
    let r = unsafe {
        e2.raw(
            Op::Read,
            50,
            IoBuf::from_mut_slice(&mut v[o..o + 8192]),
            None,
        )
    };
    assert_eq!(r, Ok(DioResult::Done(8192)));
    assert_eq!(&v[o..o + 8192], &w[wo..wo + 8192]);
    assert_eq!(&sim.disk()[50 * 4096..52 * 4096], &w[wo..wo + 8192]);
    // Half a block: refused before any command.
    let before = sim.commands();
    // SAFETY: refused synchronously; `v` outlives the call.
    let r = unsafe { e2.raw(Op::Read, 3, IoBuf::from_mut_slice(&mut v[o..o + 512]), None) };
    assert!(matches!(r, Err(DioError::Invalid(_))), "{r:?}");
    assert_eq!(sim.commands(), before);
    // Past the end of the namespace.
    // SAFETY: as above.
    let r = unsafe {
        e1.raw(
            Op::Read,
            255,
            IoBuf::from_mut_slice(&mut v[o..o + 8192]),
            None,
        )
    };
    assert!(r.is_err(), "{r:?}");
    assert_eq!(sim.bad_shadow_values(), 0);
}
