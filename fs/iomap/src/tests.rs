//! The DIO layer against an in-memory device model and a fake filesystem.

use crate::*;
use std::cell::{Cell, RefCell};

// ---- allocation counting (per thread) ----
#[global_allocator]
static A: dioxide_testkit::CountingAlloc = dioxide_testkit::CountingAlloc;
fn allocs() -> u64 {
    dioxide_testkit::thread_allocs()
}

// ---- device model ----
#[derive(Clone, Copy)]
struct Pending {
    op: Op,
    lba: u64,
    buf: IoBuf,
    tag: u64,
}

/// An in-memory device: commands complete on poll (moving the data then),
/// in submission order or reversed; errors can be injected per block.
struct MemQueue {
    disk: Vec<u8>,
    shift: u32,
    depth: usize,
    pending: Vec<Pending>,
    /// Reused so that the model itself allocates nothing per command.
    scratch: Vec<Pending>,
    reverse: bool,
    fail_lba: Option<u64>,
    max_transfer: usize,
    clock: Cell<u64>,
    submitted: usize,
}

impl MemQueue {
    fn new(bytes: usize, shift: u32) -> Self {
        let disk: Vec<u8> = (0..bytes)
            .map(|i| (i as u64).wrapping_mul(2654435761).wrapping_shr(13) as u8)
            .collect();
        MemQueue {
            disk,
            shift,
            depth: 32,
            pending: Vec::with_capacity(64),
            scratch: Vec::with_capacity(64),
            reverse: false,
            fail_lba: None,
            max_transfer: 16384,
            clock: Cell::new(0),
            submitted: 0,
        }
    }
}

impl BlockQueue for MemQueue {
    fn lba_shift(&self) -> u32 {
        self.shift
    }
    fn max_transfer(&self) -> usize {
        self.max_transfer
    }
    fn depth(&self) -> usize {
        self.depth
    }
    fn in_flight(&self) -> usize {
        self.pending.len()
    }
    fn capacity(&self) -> u64 {
        (self.disk.len() >> self.shift) as u64
    }
    unsafe fn submit(&mut self, op: Op, lba: u64, buf: IoBuf, tag: u64) -> Result<(), BlkError> {
        if self.pending.len() >= self.depth {
            return Err(BlkError::QueueFull);
        }
        assert_eq!(
            buf.len() % (1 << self.shift),
            0,
            "device transfer of whole blocks"
        );
        assert!(buf.len() <= self.max_transfer);
        assert!((lba << self.shift) as usize + buf.len() <= self.disk.len());
        self.submitted += 1;
        self.pending.push(Pending { op, lba, buf, tag });
        Ok(())
    }
    fn poll<F: FnMut(u64, Result<(), BlkError>)>(&mut self, mut on_done: F) -> usize {
        let mut p = std::mem::take(&mut self.scratch);
        std::mem::swap(&mut p, &mut self.pending);
        if self.reverse {
            p.reverse();
        }
        let n = p.len();
        for c in p.drain(..) {
            let blocks = (c.buf.len() >> self.shift) as u64;
            if self
                .fail_lba
                .is_some_and(|f| f >= c.lba && f < c.lba + blocks)
            {
                on_done(
                    c.tag,
                    Err(BlkError::Status {
                        sct: 2,
                        sc: 0x81,
                        name: "Unrecovered Read Error",
                    }),
                );
                continue;
            }
            let at = (c.lba << self.shift) as usize;
            // SAFETY: the engine keeps the buffer valid until completion.
            unsafe {
                match c.op {
                    Op::Flush => {}
                    Op::Read => std::ptr::copy_nonoverlapping(
                        self.disk[at..].as_ptr(),
                        c.buf.addr() as *mut u8,
                        c.buf.len(),
                    ),
                    Op::Write | Op::WriteFua => std::ptr::copy_nonoverlapping(
                        c.buf.addr() as *const u8,
                        self.disk[at..].as_mut_ptr(),
                        c.buf.len(),
                    ),
                }
            }
            on_done(c.tag, Ok(()));
        }
        self.scratch = p;
        n
    }
    fn now_ns(&self) -> u64 {
        self.clock.set(self.clock.get() + 1);
        self.clock.get()
    }
}

// ---- fake filesystem ----
/// Mappings (file offset, length, kind, device byte address), sorted.
struct FakeFile {
    maps: Vec<(u64, u64, IomapType, u64)>,
    size: u64,
    bs: u32,
    flags: MappingFlags,
    begins: Cell<u32>,
    ends: Cell<u32>,
}

impl FakeFile {
    fn new(maps: Vec<(u64, u64, IomapType, u64)>, size: u64) -> Self {
        FakeFile {
            maps,
            size,
            bs: 4096,
            flags: MappingFlags::empty(),
            begins: Cell::new(0),
            ends: Cell::new(0),
        }
    }
    /// One mapped extent of `len` bytes at device address `dev`.
    fn contiguous(len: u64, dev: u64) -> Self {
        Self::new(vec![(0, len, IomapType::Mapped, dev)], len)
    }
}

impl IomapOps for FakeFile {
    fn iomap_begin(&self, pos: u64, _len: u64, _flags: IomapFlags) -> Result<Iomap, IomapError> {
        self.begins.set(self.begins.get() + 1);
        for &(o, l, kind, addr) in &self.maps {
            if pos >= o && pos < o + l {
                return Ok(Iomap {
                    kind,
                    offset: o,
                    length: l,
                    addr,
                    flags: self.flags,
                });
            }
        }
        // Past the last mapping: a hole to "infinity".
        let start = self
            .maps
            .iter()
            .map(|m| m.0 + m.1)
            .filter(|&e| e <= pos)
            .max()
            .unwrap_or(0);
        Ok(Iomap {
            kind: IomapType::Hole,
            offset: start,
            length: u64::MAX / 2,
            addr: 0,
            flags: MappingFlags::empty(),
        })
    }
    fn iomap_end(&self, _pos: u64, _len: u64, _done: u64, _flags: IomapFlags, _iomap: &Iomap) {
        self.ends.set(self.ends.get() + 1);
    }
    fn size(&self) -> u64 {
        self.size
    }
    fn block_size(&self) -> u32 {
        self.bs
    }
}

struct Hooks;
impl DioOps for Hooks {}
static HOOKS: Hooks = Hooks;

fn engine() -> Engine<MemQueue> {
    Engine::new(MemQueue::new(1 << 20, 9))
}

/// A 4 KiB-aligned buffer.
fn abuf(len: usize) -> (Vec<u8>, usize) {
    let v = vec![0u8; len + 8192];
    let off = (4096 - v.as_ptr() as usize % 4096) % 4096;
    (v, off)
}

fn read_sync(
    e: &mut Engine<MemQueue>,
    f: &FakeFile,
    pos: u64,
    buf: &mut [u8],
    flags: DioFlags,
) -> Result<DioResult, DioError> {
    // SAFETY: buf lives until the synchronous call returns.
    unsafe {
        e.dio_rw(DioRequest {
            iocb: Kiocb::sync(pos),
            op: Op::Read,
            buf: IoBuf::from_mut_slice(buf),
            ops: f,
            dops: None,
            flags,
            done_before: 0,
        })
    }
}

#[test]
fn simple_read_is_simple_and_correct() {
    let mut e = engine();
    let f = FakeFile::contiguous(64 * 1024, 128 * 1024);
    let (mut v, o) = abuf(4096);
    let r = read_sync(&mut e, &f, 8192, &mut v[o..o + 4096], DioFlags::empty()).unwrap();
    assert_eq!(r, DioResult::Done(4096));
    assert_eq!(e.stats().simple, 1);
    assert_eq!(e.stats().generic, 0);
    let want = &e.queue().disk[128 * 1024 + 8192..128 * 1024 + 8192 + 4096];
    assert_eq!(&v[o..o + 4096], want);
    assert_eq!((f.begins.get(), f.ends.get()), (1, 1));
    assert_eq!(e.free_slots(), 32);
}

/// The simple path overwrites one written block (no metadata, no
/// allocation); a write into a hole or an unwritten extent is not simple,
/// falls back, and the generic path refuses it (allocation and conversion
/// are the filesystem's, not built here).
#[test]
fn a_simple_write_overwrites_a_written_block_and_nothing_else_is_simple() {
    let mut e = engine();
    let f = FakeFile::contiguous(64 * 1024, 128 * 1024);
    let (mut v, o) = abuf(4096);
    v[o..o + 4096].fill(0xa7);
    let buf = IoBuf::from_addr(v[o..].as_mut_ptr() as usize, 4096).unwrap();
    for op in [Op::Write, Op::WriteFua] {
        // SAFETY: v outlives the synchronous call.
        let r = unsafe {
            e.dio_rw(DioRequest {
                iocb: Kiocb::sync(8192),
                op,
                buf,
                ops: &f,
                dops: None,
                flags: DioFlags::empty(),
                done_before: 0,
            })
        };
        assert_eq!(r, Ok(DioResult::Done(4096)));
    }
    assert_eq!((e.stats().simple, e.stats().generic), (2, 0));
    assert!(e.queue().disk[128 * 1024 + 8192..][..4096]
        .iter()
        .all(|&b| b == 0xa7));
    for kind in [IomapType::Hole, IomapType::Unwritten] {
        let mut e = engine();
        let f = FakeFile::new(vec![(0, 64 * 1024, kind, 0)], 64 * 1024);
        let before = e.queue().disk.clone();
        // SAFETY: as above.
        let r = unsafe { e.dio_rw(DioRequest::write(Kiocb::sync(0), buf, &f)) };
        assert!(
            matches!(r, Err(DioError::Unallocated { .. })),
            "{kind:?}: {r:?}"
        );
        let s = e.stats();
        assert_eq!((s.simple, s.fell_back, s.generic), (0, 1, 1), "{kind:?}");
        assert!(e.queue().disk == before, "{kind:?}: the device was written");
    }
    // A write over written blocks and then a hole changes nothing (the
    // mapped part is not written before the hole is met), and one past
    // the end of the file is refused.
    let mut e = engine();
    let f = FakeFile::new(
        vec![
            (0, 8192, IomapType::Mapped, 64 * 1024),
            (8192, 8192, IomapType::Hole, 0),
        ],
        16384,
    );
    let before = e.queue().disk.clone();
    let (mut w, wo) = abuf(16384);
    w[wo..wo + 16384].fill(0x3c);
    let big = IoBuf::from_addr(w[wo..].as_mut_ptr() as usize, 16384).unwrap();
    // SAFETY: w outlives the synchronous call.
    let r = unsafe { e.dio_rw(DioRequest::write(Kiocb::sync(0), big, &f)) };
    assert!(
        matches!(r, Err(DioError::Unallocated { pos: 8192 })),
        "{r:?}"
    );
    assert!(e.queue().disk == before, "the mapped part was written");
    let part = IoBuf::from_addr(w[wo..].as_mut_ptr() as usize, 8192).unwrap();
    // SAFETY: as above.
    let r = unsafe { e.dio_rw(DioRequest::write(Kiocb::sync(12288), part, &f)) };
    assert!(matches!(r, Err(DioError::Invalid(_))), "{r:?}");
    // The control: the mapped part alone is written.
    // SAFETY: as above.
    let r = unsafe { e.dio_rw(DioRequest::write(Kiocb::sync(0), part, &f)) };
    assert_eq!(r, Ok(DioResult::Done(8192)));
    assert!(e.queue().disk[64 * 1024..][..8192]
        .iter()
        .all(|&b| b == 0x3c));
}

#[test]
fn each_eligibility_condition_alone_sends_the_read_to_the_generic_path() {
    fn base() -> FakeFile {
        FakeFile::contiguous(64 * 1024, 0)
    }
    let (mut v, o) = abuf(16384);
    // (name, build, pos, len, flags, dops, done_before, write, expect_fallback)
    type Case = (
        &'static str,
        Box<dyn Fn() -> FakeFile>,
        u64,
        usize,
        DioFlags,
        bool,
        usize,
        bool,
        bool,
    );
    let cases: Vec<Case> = vec![
        (
            "write of more than a block",
            Box::new(base),
            0,
            8192,
            DioFlags::empty(),
            false,
            0,
            true,
            false,
        ),
        (
            "zero length",
            Box::new(base),
            0,
            0,
            DioFlags::empty(),
            false,
            0,
            false,
            false,
        ),
        (
            "larger than a block",
            Box::new(base),
            0,
            8192,
            DioFlags::empty(),
            false,
            0,
            false,
            false,
        ),
        (
            "dio hooks",
            Box::new(base),
            0,
            4096,
            DioFlags::empty(),
            true,
            0,
            false,
            false,
        ),
        (
            "done_before",
            Box::new(base),
            0,
            4096,
            DioFlags::empty(),
            false,
            7,
            false,
            false,
        ),
        (
            "FORCE_WAIT",
            Box::new(base),
            0,
            4096,
            DioFlags::FORCE_WAIT,
            false,
            0,
            false,
            false,
        ),
        (
            "PARTIAL",
            Box::new(base),
            0,
            4096,
            DioFlags::PARTIAL,
            false,
            0,
            false,
            false,
        ),
        (
            "BOUNCE",
            Box::new(base),
            0,
            4096,
            DioFlags::BOUNCE,
            false,
            0,
            false,
            false,
        ),
        (
            "past i_size",
            Box::new(|| FakeFile::new(vec![(0, 65536, IomapType::Mapped, 0)], 6000)),
            4096,
            4096,
            DioFlags::empty(),
            false,
            0,
            false,
            false,
        ),
        (
            "hole",
            Box::new(|| {
                FakeFile::new(
                    vec![
                        (0, 4096, IomapType::Mapped, 0),
                        (4096, 4096, IomapType::Hole, 0),
                    ],
                    65536,
                )
            }),
            4096,
            4096,
            DioFlags::empty(),
            false,
            0,
            false,
            true,
        ),
        (
            "unwritten",
            Box::new(|| FakeFile::new(vec![(0, 8192, IomapType::Unwritten, 0)], 65536)),
            0,
            4096,
            DioFlags::empty(),
            false,
            0,
            false,
            true,
        ),
        (
            "mapping shorter than the range",
            Box::new(|| {
                FakeFile::new(
                    vec![
                        (0, 2048, IomapType::Mapped, 0),
                        (2048, 62000, IomapType::Mapped, 8192),
                    ],
                    64000,
                )
            }),
            0,
            4096,
            DioFlags::empty(),
            false,
            0,
            false,
            true,
        ),
        (
            "integrity flag",
            Box::new(|| {
                let mut f = base();
                f.flags = MappingFlags::INTEGRITY;
                f
            }),
            0,
            4096,
            DioFlags::empty(),
            false,
            0,
            false,
            true,
        ),
    ];
    for (name, build, pos, len, flags, hooks, done_before, write, fallback) in cases {
        let mut e = engine();
        let f = build();
        let buf = IoBuf::from_addr(v[o..].as_mut_ptr() as usize, len).unwrap();
        let dops: Option<&'static dyn DioOps> = if hooks { Some(&HOOKS) } else { None };
        let op = if write { Op::Write } else { Op::Read };
        // SAFETY: v outlives the synchronous call.
        let r = unsafe {
            e.dio_rw(DioRequest {
                iocb: Kiocb::sync(pos),
                op,
                buf,
                ops: &f,
                dops,
                flags,
                done_before,
            })
        };
        assert!(r.is_ok(), "{name}: {r:?}");
        let s = e.stats();
        assert_eq!((s.simple, s.generic), (0, 1), "{name}: {s:?}");
        assert_eq!(s.fell_back, fallback as u64, "{name}");
        assert_eq!(f.begins.get(), f.ends.get(), "{name}: begin/end pairs");
    }
    // The runtime switch alone.
    let mut e = engine();
    e.set_simple(false);
    read_sync(&mut e, &base(), 0, &mut v[o..o + 4096], DioFlags::empty()).unwrap();
    assert_eq!((e.stats().simple, e.stats().generic), (0, 1));
}

#[test]
fn misaligned_requests_are_invalid_on_both_paths() {
    let mut e = engine();
    let f = FakeFile::contiguous(64 * 1024, 0);
    let (mut v, o) = abuf(8192);
    for (pos, len) in [(100u64, 512usize), (0, 100), (512 + 7, 8192)] {
        let r = read_sync(&mut e, &f, pos, &mut v[o..o + len], DioFlags::empty());
        assert!(matches!(r, Err(DioError::Invalid(_))), "{pos} {len}: {r:?}");
    }
    // Misaligned memory.
    let r = read_sync(&mut e, &f, 0, &mut v[o + 1..o + 1 + 512], DioFlags::empty());
    assert!(matches!(r, Err(DioError::Invalid(_))));
    // FSBLOCK_ALIGNED: 512-byte aligned is not enough.
    let r = read_sync(
        &mut e,
        &f,
        512,
        &mut v[o..o + 512],
        DioFlags::FSBLOCK_ALIGNED,
    );
    assert!(matches!(r, Err(DioError::Invalid(_))));
    assert_eq!(e.queue().submitted, 0);
}

#[test]
fn multi_extent_reads_with_holes_unwritten_and_eof() {
    let mut e = engine();
    // 4 KiB mapped, 8 KiB hole, 4 KiB unwritten, 20 KiB mapped elsewhere,
    // file size ends 100 bytes into the last block.
    let f = FakeFile::new(
        vec![
            (0, 4096, IomapType::Mapped, 40960),
            (4096, 8192, IomapType::Hole, 0),
            (12288, 4096, IomapType::Unwritten, 81920),
            (16384, 20480, IomapType::Mapped, 200704),
        ],
        32768 + 100,
    );
    let (mut v, o) = abuf(40960);
    v[o..o + 40960].fill(0xee);
    let r = read_sync(&mut e, &f, 0, &mut v[o..o + 40960], DioFlags::empty()).unwrap();
    // Short read at end of file.
    assert_eq!(r, DioResult::Done(32868));
    let disk = e.queue().disk.clone();
    assert_eq!(&v[o..o + 4096], &disk[40960..45056]);
    assert!(v[o + 4096..o + 16384].iter().all(|&b| b == 0));
    assert_eq!(&v[o + 16384..o + 32868], &disk[200704..200704 + 16484]);
    // Bytes past EOF are untouched.
    assert!(v[o + 32868..o + 40960].iter().all(|&b| b == 0xee));
    // 20 KiB mapped at a 16 KiB max transfer: 2 commands, plus the first
    // extent: 3 (the EOF tail rides in the second through a bounce).
    assert_eq!(e.queue().submitted, 3);
    assert_eq!(e.stats().generic, 1);
    // Reading entirely past EOF returns 0.
    assert_eq!(
        read_sync(&mut e, &f, 65536, &mut v[o..o + 4096], DioFlags::empty()).unwrap(),
        DioResult::Done(0)
    );
}

thread_local! {
    static DONE: RefCell<Vec<(usize, Result<usize, DioError>)>> = const { RefCell::new(Vec::new()) };
}
fn record(ctx: usize, r: Result<usize, DioError>) {
    DONE.with(|d| d.borrow_mut().push((ctx, r)));
}
/// The owner's id of request `n` (these tests' owners keep no slab).
fn owner(n: impl TryInto<u16>) -> ReqId {
    ReqId::new(n.try_into().ok().expect("small owner index"), 0)
}
/// Delivers finished requests to `record`, as a run loop would.
fn deliver<Q: BlockQueue>(e: &mut Engine<Q>) -> usize {
    e.complete(|id, r| record(id.index(), r))
}
fn take_done() -> Vec<(usize, Result<usize, DioError>)> {
    DONE.with(|d| std::mem::take(&mut *d.borrow_mut()))
}

#[test]
fn async_completions_out_of_order_are_delivered_to_the_right_callers() {
    let mut e = engine();
    e.queue_mut().reverse = true;
    let f = FakeFile::contiguous(256 * 1024, 0);
    let (mut v, o) = abuf(16 * 4096);
    for i in 0..16usize {
        let iocb = Kiocb::with_owner(i as u64 * 4096, owner(i));
        let buf = IoBuf::from_addr(v[o + i * 4096..].as_mut_ptr() as usize, 4096).unwrap();
        // SAFETY: v outlives the polls below.
        let r = unsafe { e.dio_rw(DioRequest::read(iocb, buf, &f)) }.unwrap();
        assert_eq!(r, DioResult::Queued);
    }
    // A generic async request too (two blocks).
    let (mut g, go) = abuf(8192);
    let iocb = Kiocb::with_owner(65536, owner(100));
    assert_eq!(
        // SAFETY: g outlives the polls below.
        unsafe {
            e.dio_rw(DioRequest::read(
                iocb,
                IoBuf::from_mut_slice(&mut g[go..go + 8192]),
                &f,
            ))
        }
        .unwrap(),
        DioResult::Queued
    );
    assert!(take_done().is_empty(), "nothing completes before a poll");
    e.poll();
    assert!(
        take_done().is_empty(),
        "owners hear of completions from complete()"
    );
    assert_eq!(deliver(&mut e), 17);
    let mut done = take_done();
    assert_eq!(done.len(), 17);
    // Reversed: the generic request was submitted last and completes first.
    assert_eq!(done[0], (100, Ok(8192)));
    done.sort_by_key(|d| d.0);
    for (i, d) in done.iter().take(16).enumerate() {
        assert_eq!(*d, (i, Ok(4096)));
    }
    let disk = &e.queue().disk;
    assert_eq!(&v[o..o + 65536], &disk[..65536]);
    assert_eq!(&g[go..go + 8192], &disk[65536..73728]);
    assert_eq!(e.stats().simple, 16);
    assert_eq!(e.free_slots(), 32);
}

#[test]
fn device_error_on_the_simple_path_is_deferred_reported_once_and_returned() {
    // Async: the callback is not called from the completion handler but from
    // the deferred work.
    let mut e = engine();
    let f = FakeFile::contiguous(64 * 1024, 0);
    e.queue_mut().fail_lba = Some(16); // byte 8192
    let (mut v, o) = abuf(4096);
    let iocb = Kiocb::with_owner(8192, owner(5));
    // SAFETY: v outlives the polls below.
    unsafe {
        e.dio_rw(DioRequest::read(
            iocb,
            IoBuf::from_mut_slice(&mut v[o..o + 4096]),
            &f,
        ))
    }
    .unwrap();
    e.poll();
    assert!(take_done().is_empty(), "errors are not completed inline");
    assert_eq!(e.stats().errors, 0);
    assert_eq!(deliver(&mut e), 1);
    let err = DioError::Io {
        pos: 8192,
        err: BlkError::Status {
            sct: 2,
            sc: 0x81,
            name: "Unrecovered Read Error",
        },
    };
    assert_eq!(take_done(), vec![(5, Err(err))]);
    assert_eq!(e.stats().errors, 1);
    assert_eq!(deliver(&mut e), 0);
    assert_eq!(e.free_slots(), 32);
    // Sync: returned to the caller, counted once.
    let r = read_sync(&mut e, &f, 8192, &mut v[o..o + 4096], DioFlags::empty());
    assert_eq!(r, Err(err));
    assert_eq!(e.stats().errors, 2);
    assert_eq!(e.stats().simple, 2);
    assert_eq!(
        err.to_string(),
        "I/O error at file offset 8192: Unrecovered Read Error (sct 0x2 sc 0x81)"
    );
}

#[test]
fn device_error_on_the_generic_path_first_error_wins_and_partial() {
    let mut e = engine();
    let f = FakeFile::contiguous(256 * 1024, 0);
    e.queue_mut().fail_lba = Some(40); // byte 20480: inside the 2nd 16 KiB command
    let (mut v, o) = abuf(65536);
    let r = read_sync(&mut e, &f, 0, &mut v[o..o + 65536], DioFlags::empty());
    assert_eq!(
        r,
        Err(DioError::Io {
            pos: 16384,
            err: BlkError::Status {
                sct: 2,
                sc: 0x81,
                name: "Unrecovered Read Error"
            }
        })
    );
    assert_eq!(e.stats().errors, 1);
    // PARTIAL: the bytes before the failing command.
    let r = read_sync(&mut e, &f, 0, &mut v[o..o + 65536], DioFlags::PARTIAL);
    assert_eq!(r, Ok(DioResult::Done(16384)));
    // Async generic with an error: the callback gets it.
    let iocb = Kiocb::with_owner(0, owner(9));
    // SAFETY: v outlives the poll below.
    unsafe {
        e.dio_rw(DioRequest::read(
            iocb,
            IoBuf::from_mut_slice(&mut v[o..o + 65536]),
            &f,
        ))
    }
    .unwrap();
    e.poll();
    deliver(&mut e);
    assert!(matches!(
        take_done()[..],
        [(9, Err(DioError::Io { pos: 16384, .. }))]
    ));
}

#[test]
fn bounce_buffered_reads_and_writes() {
    let mut e = engine();
    let f = FakeFile::contiguous(64 * 1024, 4096);
    let (mut v, o) = abuf(12288);
    let r = read_sync(&mut e, &f, 0, &mut v[o..o + 12288], DioFlags::BOUNCE).unwrap();
    assert_eq!(r, DioResult::Done(12288));
    assert_eq!(&v[o..o + 12288], &e.queue().disk[4096..16384]);
    // Write through bounce, read back directly.
    for (i, b) in v[o..o + 8192].iter_mut().enumerate() {
        *b = i as u8 ^ 0x5a;
    }
    // SAFETY: v outlives the synchronous call.
    let r = unsafe {
        e.dio_rw(DioRequest {
            iocb: Kiocb::sync(4096),
            op: Op::Write,
            buf: IoBuf::from_slice(&v[o..o + 8192]),
            ops: &f,
            dops: None,
            flags: DioFlags::BOUNCE,
            done_before: 0,
        })
    };
    assert_eq!(r, Ok(DioResult::Done(8192)));
    assert_eq!(&e.queue().disk[8192..16384], &v[o..o + 8192]);
    // Writes into holes need allocation, which this layer cannot do.
    let hole = FakeFile::new(vec![(0, 4096, IomapType::Hole, 0)], 4096);
    // SAFETY: a synchronous request: it returns only when the device is done with the buffer, a slice of `v`, which outlives it.
    let r = unsafe {
        e.dio_rw(DioRequest::new(
            Kiocb::sync(0),
            Op::Write,
            IoBuf::from_slice(&v[o..o + 4096]),
            &hole,
        ))
    };
    assert!(matches!(r, Err(DioError::Unallocated { pos: 0 })));
}

#[test]
fn nowait_without_a_free_slot_is_again() {
    let mut e = engine();
    e.queue_mut().depth = 2;
    let mut e = Engine::new(e.into_queue());
    let f = FakeFile::contiguous(64 * 1024, 0);
    let (mut v, o) = abuf(3 * 4096);
    for i in 0..2 {
        let iocb = Kiocb::with_owner(i * 4096, owner(i as usize));
        // SAFETY: v outlives the poll below.
        unsafe {
            e.dio_rw(DioRequest::read(
                iocb,
                IoBuf::from_mut_slice(&mut v[o + i as usize * 4096..o + (i as usize + 1) * 4096]),
                &f,
            ))
        }
        .unwrap();
    }
    let mut iocb = Kiocb::with_owner(8192, owner(2));
    iocb.flags = KiocbFlags::NOWAIT;
    // SAFETY: v outlives the poll below.
    let r = unsafe {
        e.dio_rw(DioRequest::read(
            iocb,
            IoBuf::from_mut_slice(&mut v[o + 8192..o + 12288]),
            &f,
        ))
    };
    assert_eq!(r, Err(DioError::Again));
    // Without NOWAIT the call polls until a slot's request finishes, and
    // frees that slot, its result kept for complete(), which its owner
    // runs later.
    iocb.flags = KiocbFlags::empty();
    assert_eq!(
        // SAFETY: `v` lives to the end of the test, after every completion is delivered.
        unsafe {
            e.dio_rw(DioRequest::read(
                iocb,
                IoBuf::from_mut_slice(&mut v[o + 8192..o + 12288]),
                &f,
            ))
        },
        Ok(DioResult::Queued)
    );
    e.poll();
    assert_eq!(e.pending_completions(), 3);
    assert_eq!(deliver(&mut e), 3);
    let mut done = take_done();
    done.sort_by_key(|d| d.0);
    assert_eq!(done, vec![(0, Ok(4096)), (1, Ok(4096)), (2, Ok(4096))]);
}

/// Every slot held by a finished request its owner has not collected (the
/// NBD service's requests, while the service itself runs a filesystem
/// commit on the same queue): a synchronous raw command still runs, and
/// every owner gets its own result afterwards, once.
#[test]
fn a_synchronous_command_runs_while_every_slot_waits_for_its_owner() {
    let mut e = engine();
    e.queue_mut().depth = 4;
    let mut e = Engine::new(e.into_queue());
    let f = FakeFile::contiguous(64 * 1024, 0);
    let (mut v, o) = abuf(5 * 4096);
    for i in 0..4usize {
        let iocb = Kiocb::with_owner(i as u64 * 4096, owner(i));
        // SAFETY: v outlives every completion, delivered below.
        unsafe {
            e.dio_rw(DioRequest::read(
                iocb,
                IoBuf::from_mut_slice(&mut v[o + i * 4096..o + (i + 1) * 4096]),
                &f,
            ))
        }
        .unwrap();
    }
    e.poll();
    assert_eq!(
        e.pending_completions(),
        4,
        "every slot finished, none taken"
    );
    // SAFETY: a synchronous command: done with the buffer when it returns.
    let r = unsafe {
        e.raw(
            Op::Write,
            0,
            IoBuf::from_mut_slice(&mut v[o + 4 * 4096..o + 5 * 4096]),
            None,
        )
    };
    assert_eq!(r, Ok(DioResult::Done(4096)));
    assert_eq!(deliver(&mut e), 4);
    let mut done = take_done();
    done.sort_by_key(|d| d.0);
    assert_eq!(
        done,
        (0..4).map(|i| (i, Ok(4096))).collect::<Vec<_>>(),
        "each owner once"
    );
    assert_eq!(deliver(&mut e), 0);
}

#[test]
fn simple_path_allocates_nothing_generic_path_does() {
    let mut e = engine();
    let f = FakeFile::contiguous(512 * 1024, 0);
    let (mut v, o) = abuf(32 * 4096);
    let before = allocs();
    for round in 0..200u64 {
        for i in 0..32usize {
            let pos = ((round * 7 + i as u64 * 13) % 128) * 4096;
            let iocb = Kiocb::with_owner(pos, owner(i));
            let buf = IoBuf::from_addr(v[o + i * 4096..].as_mut_ptr() as usize, 4096).unwrap();
            // SAFETY: v outlives the poll below.
            unsafe { e.dio_rw(DioRequest::read(iocb, buf, &f)) }.unwrap();
        }
        e.poll();
        e.complete(|_, r| assert!(r.is_ok()));
    }
    // Sync simple reads too, and simple writes (overwrites).
    for i in 0..100u64 {
        read_sync(&mut e, &f, i * 4096, &mut v[o..o + 4096], DioFlags::empty()).unwrap();
        let buf = IoBuf::from_addr(v[o..].as_mut_ptr() as usize, 4096).unwrap();
        // SAFETY: v outlives the synchronous call.
        let r = unsafe { e.dio_rw(DioRequest::write(Kiocb::sync(i * 4096), buf, &f)) };
        assert_eq!(r, Ok(DioResult::Done(4096)));
    }
    assert_eq!(allocs() - before, 0, "simple path allocated");
    assert_eq!(e.stats().simple, 6600);
    e.set_simple(false);
    let before = allocs();
    for i in 0..100u64 {
        read_sync(&mut e, &f, i * 4096, &mut v[o..o + 4096], DioFlags::empty()).unwrap();
    }
    let per_io = (allocs() - before) as f64 / 100.0;
    assert!(
        per_io >= 1.0,
        "the generic path allocates its dio object: {per_io}"
    );
}

#[test]
fn null_device_completes_on_the_next_poll() {
    let q = null::NullQueue::new(8, 12, 1 << 20, || 0);
    let mut e = Engine::new(q);
    let f = FakeFile::contiguous(1 << 30, 0);
    let (mut v, o) = abuf(4096);
    let iocb = Kiocb::with_owner(4096, owner(77));
    // SAFETY: v outlives the poll below.
    unsafe {
        e.dio_rw(DioRequest::read(
            iocb,
            IoBuf::from_mut_slice(&mut v[o..o + 4096]),
            &f,
        ))
    }
    .unwrap();
    assert!(take_done().is_empty());
    assert_eq!(e.poll(), 1);
    assert_eq!(deliver(&mut e), 1);
    assert_eq!(take_done(), vec![(77, Ok(4096))]);
    // Sync on the null device.
    assert_eq!(
        // SAFETY: a synchronous request: it returns only when the device is done with the buffer, a slice of `v`, which outlives it.
        unsafe {
            e.dio_rw(DioRequest::read(
                Kiocb::sync(0),
                IoBuf::from_mut_slice(&mut v[o..o + 4096]),
                &f,
            ))
        },
        Ok(DioResult::Done(4096))
    );
}
