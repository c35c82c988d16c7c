//! The write side of the service over its loopback wire against a device
//! model that keeps what is written (a RAM disk that completes each command
//! on the next poll): data written reads back, FUA and FLUSH reach the
//! device, write-zeroes in rounds, who may write and who may connect, a
//! payload cut short, a device error, and the buffers given back.

use super::loopback::{Link, LoopError, Loopback, OneEngine, ServerSide};
use super::*;
use dioxide_iomap::{BlkError, Op};
use dioxide_nbd::client::{fnv1a, Reply, FNV_START};
use dioxide_nbd::{cflag, cmd};
use std::cell::RefCell;
use std::rc::Rc;

const BLOCKS: u64 = 2048;
const LBS: usize = 4096;
const MAX_T: usize = 128 * 1024;

/// What the device saw.
#[derive(Default)]
struct Seen {
    disk: Vec<u8>,
    writes: u64,
    fua_writes: u64,
    flushes: u64,
    /// A write touching this block fails.
    bad_block: Option<u64>,
    /// When set, the device's bytes live here instead of `disk`: shared
    /// with a filesystem's write path ([`RamDev`]), which other cores may
    /// reach.
    ram: Option<Ram>,
}

type Ram = std::sync::Arc<std::sync::Mutex<Vec<u8>>>;

/// The same RAM as the device model, as dxfs's synchronous device (the
/// write path's own commands).
struct RamDev(Ram);

impl dioxide_dxfs::BlockDevice for RamDev {
    fn sector_size(&self) -> u32 {
        512
    }
    fn size(&self) -> u64 {
        self.0.lock().unwrap().len() as u64
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), dioxide_dxfs::DevError> {
        let (a, b) = dioxide_dxfs::check_access(self, offset, buf.len())?;
        buf.copy_from_slice(&self.0.lock().unwrap()[a..b]);
        Ok(())
    }
}

impl dioxide_dxfs::BlockDeviceMut for RamDev {
    fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<(), dioxide_dxfs::DevError> {
        let (a, b) = dioxide_dxfs::check_access(&*self, offset, buf.len())?;
        self.0.lock().unwrap()[a..b].copy_from_slice(buf);
        Ok(())
    }
}

struct MemQueue {
    seen: Rc<RefCell<Seen>>,
    done: Vec<(u64, Result<(), BlkError>)>,
}

impl BlockQueue for MemQueue {
    fn lba_shift(&self) -> u32 {
        12
    }
    fn max_transfer(&self) -> usize {
        MAX_T
    }
    fn depth(&self) -> usize {
        64
    }
    fn in_flight(&self) -> usize {
        self.done.len()
    }
    fn capacity(&self) -> u64 {
        BLOCKS
    }
    fn now_ns(&self) -> u64 {
        now()
    }
    unsafe fn submit(&mut self, op: Op, lba: u64, buf: IoBuf, tag: u64) -> Result<(), BlkError> {
        if self.done.len() == self.depth() {
            return Err(BlkError::QueueFull);
        }
        let mut seen = self.seen.borrow_mut();
        let blocks = buf.len() as u64 / LBS as u64;
        if op != Op::Flush && (blocks == 0 || lba + blocks > BLOCKS) {
            return Err(BlkError::Invalid);
        }
        let at = lba as usize * LBS;
        let mut result = Ok(());
        match op {
            Op::Flush => seen.flushes += 1,
            Op::Read => {
                // SAFETY: the caller hands the device `buf` until the completion.
                let dst = unsafe { std::slice::from_raw_parts_mut(buf.as_ptr(), buf.len()) };
                match &seen.ram {
                    Some(ram) => dst.copy_from_slice(&ram.lock().unwrap()[at..at + buf.len()]),
                    None => dst.copy_from_slice(&seen.disk[at..at + buf.len()]),
                }
            }
            Op::Write | Op::WriteFua => {
                if seen
                    .bad_block
                    .is_some_and(|b| (lba..lba + blocks).contains(&b))
                {
                    result = Err(BlkError::Status {
                        sct: 2,
                        sc: 0x80,
                        name: "Write Fault",
                    });
                } else {
                    // SAFETY: as above; the device only reads it.
                    let src = unsafe { std::slice::from_raw_parts(buf.as_ptr(), buf.len()) };
                    match &seen.ram {
                        Some(ram) => ram.lock().unwrap()[at..at + buf.len()].copy_from_slice(src),
                        None => seen.disk[at..at + buf.len()].copy_from_slice(src),
                    }
                    seen.writes += 1;
                    seen.fua_writes += (op == Op::WriteFua) as u64;
                }
            }
        }
        self.done.push((tag, result));
        Ok(())
    }
    fn poll<F: FnMut(u64, Result<(), BlkError>)>(&mut self, mut on_done: F) -> usize {
        let n = self.done.len();
        for (tag, r) in self.done.drain(..) {
            on_done(tag, r);
        }
        n
    }
}

fn now() -> u64 {
    static T0: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    T0.get_or_init(std::time::Instant::now).elapsed().as_nanos() as u64
}

/// A dxfs image (4 KiB blocks) of `vol.bin` (64 KiB, every block
/// written, bytes `pattern(20, ..)`) and `sparse.bin` (64 KiB, a hole
/// but its first 8 KiB).
fn image() -> (Vec<u8>, dioxide_dxfs::Fs<dioxide_dxfs::MemDevice>) {
    use dioxide_dxfs::mkfs::{self, Node, Options, Source, Tree};
    struct Src;
    impl Source for Src {
        fn read(&mut self, id: u64, off: u64, buf: &mut [u8]) -> Result<(), String> {
            let p = pattern(20 + id, 64 * 1024);
            buf.copy_from_slice(&p[off as usize..off as usize + buf.len()]);
            Ok(())
        }
    }
    let tree = Tree {
        nodes: vec![
            Node::dir(vec![("vol.bin".into(), 1), ("sparse.bin".into(), 2)]),
            Node::file(64 * 1024, vec![(0, 64 * 1024)], 0),
            Node::file(64 * 1024, vec![(0, 8192)], 1),
        ],
    };
    let opts = Options::default();
    let plan = mkfs::plan(&tree, &opts).unwrap();
    let mut dev = dioxide_dxfs::MemDevice::new(BLOCKS as usize * LBS, 512);
    mkfs::write(&tree, &plan, &opts, &mut Src, &mut dev, &mut |_, _| {}).unwrap();
    let bytes = dev.data.clone();
    (bytes, dioxide_dxfs::Fs::mount(dev).unwrap())
}

/// Exports `disk` (writable) and `ro` (the same namespace, read-only),
/// and the image's files, `vol.bin` and `sparse.bin` writable.
fn table() -> &'static Table {
    let mut t = Table::new();
    t.add_raw("disk".into(), BLOCKS * LBS as u64, 0, LBS as u32);
    t.add_raw("ro".into(), BLOCKS * LBS as u64, 0, LBS as u32);
    t.add_null(1 << 20);
    t.set_writable("disk").unwrap();
    let (_, fs) = image();
    for name in ["vol.bin", "sparse.bin"] {
        let f = fs.open(fs.resolve(&format!("/{name}")).unwrap()).unwrap();
        t.add_file(name.into(), f, 4096, 0, LBS as u32);
        t.set_writable(name).unwrap();
    }
    Box::leak(Box::new(t))
}

struct Rig {
    seen: Rc<RefCell<Seen>>,
    side: ServerSide,
    lo: Loopback,
    server: Server<OneEngine<MemQueue>>,
    replies: Vec<Reply>,
}

/// The loopback's client address.
const CLIENT: &str = "10.0.0.2";

fn rig(export: &str, access: Access) -> Rig {
    rig_stalling(export, access, STALL_NS)
}

fn rig_stalling(export: &str, access: Access, stall_ns: u64) -> Rig {
    rig_on(export, access, stall_ns, table())
}

fn rig_on(export: &str, access: Access, stall_ns: u64, table: &'static Table) -> Rig {
    // The device holds the image (the raw tests write where it has no
    // file: blocks it does not use stay zero).
    let seen = Rc::new(RefCell::new(Seen {
        disk: vec![0; BLOCKS as usize * LBS],
        ..Seen::default()
    }));
    let engine = Engine::new(MemQueue {
        seen: seen.clone(),
        done: Vec::with_capacity(64),
    });
    let (mut side, lo) = Loopback::new(export, true, 64, now, now, Link::default());
    let disks = [DiskLimits {
        depth: 64,
        max_transfer: MAX_T,
        lbs: LBS,
    }];
    let mut server = Server::new(
        OneEngine::new(engine, now, now),
        &mut side.sockets,
        table,
        &disks,
        stall_ns,
    );
    server.set_access(access);
    Rig {
        seen,
        side,
        lo,
        server,
        replies: Vec::with_capacity(64),
    }
}

fn writer() -> Access {
    Access::parse(None, Some(CLIENT)).unwrap()
}

impl Rig {
    fn connect(&mut self) {
        self.lo.connect(&mut self.side, &mut self.server).unwrap();
    }
    fn settle(&mut self) -> Vec<Reply> {
        let mut out = core::mem::take(&mut self.replies);
        out.clear();
        self.lo
            .settle(&mut self.side, &mut self.server, &mut out)
            .unwrap();
        let copy = out.clone();
        self.replies = out;
        copy
    }
    /// As `settle`, allocating nothing: the number of replies.
    fn settle_quietly(&mut self) -> usize {
        self.replies.clear();
        self.lo
            .settle(&mut self.side, &mut self.server, &mut self.replies)
            .unwrap();
        self.replies.len()
    }
    fn write(&mut self, offset: u64, data: &[u8], flags: u16) -> u64 {
        self.lo
            .client()
            .command(cmd::WRITE, flags, offset, 0, data)
            .unwrap()
    }
    /// Reads `[offset, offset + len)` back, 4 KiB at a time, and checks
    /// each piece's sum against `expect`.
    fn read_back(&mut self, offset: u64, expect: &[u8]) {
        for (k, piece) in expect.chunks(4096).enumerate() {
            let h = self
                .lo
                .client()
                .read(offset + k as u64 * 4096, piece.len() as u32)
                .unwrap();
            let r = self.settle();
            assert_eq!(r.len(), 1);
            assert_eq!((r[0].handle, r[0].error), (h, 0));
            assert_eq!(
                r[0].sum,
                fnv1a(FNV_START, piece),
                "block at {}",
                offset + k as u64 * 4096
            );
        }
    }
    /// The server let everything go: nothing in flight, no budget held.
    fn assert_released(&self) {
        assert_eq!(self.server.in_flight(), 0);
        assert_eq!(self.server.held_total, 0);
        assert!(self.server.held.iter().all(|&h| h == 0));
        assert!(self.server.budgets.iter().all(|b| b.cmds == 0));
    }
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut r = dioxide_testkit::Rng::new(seed);
    (0..len).map(|_| r.below(256) as u8).collect()
}

fn errors(replies: &[Reply]) -> Vec<(u64, u32)> {
    let mut v: Vec<(u64, u32)> = replies.iter().map(|r| (r.handle, r.error)).collect();
    v.sort();
    v
}

#[test]
fn writes_reach_the_device_and_read_back_with_fua_and_flush_passed_on() {
    let mut r = rig("disk", writer());
    r.connect();
    // One block, several blocks, and one longer than a device command
    // (three commands), in flight together.
    let a = pattern(1, 4096);
    let b = pattern(2, 3 * 4096);
    let c = pattern(3, 300 * 1024);
    let ha = r.write(0, &a, 0);
    let hb = r.write(64 * 4096, &b, cflag::FUA);
    let hc = r.write(100 * 4096, &c, 0);
    let replies = r.settle();
    assert_eq!(errors(&replies), {
        let mut v = vec![(ha, 0), (hb, 0), (hc, 0)];
        v.sort();
        v
    });
    {
        let seen = r.seen.borrow();
        assert_eq!(&seen.disk[..4096], &a[..]);
        assert_eq!(&seen.disk[64 * 4096..67 * 4096], &b[..]);
        assert_eq!(&seen.disk[100 * 4096..100 * 4096 + c.len()], &c[..]);
        // 1 + 1 + 3 device writes; the FUA one with FUA.
        assert_eq!((seen.writes, seen.fua_writes, seen.flushes), (5, 1, 0));
    }
    let h = r.lo.client().command(cmd::FLUSH, 0, 0, 0, &[]).unwrap();
    assert_eq!(errors(&r.settle()), vec![(h, 0)]);
    assert_eq!(r.seen.borrow().flushes, 1);
    r.read_back(64 * 4096, &b);
    r.read_back(100 * 4096, &c[..8192]);
    r.assert_released();
}

#[test]
fn a_write_beyond_the_end_or_unaligned_is_refused_and_the_connection_goes_on() {
    let mut r = rig("disk", writer());
    r.connect();
    let size = BLOCKS * LBS as u64;
    let past = r.write(size - 4096, &pattern(4, 8192), 0);
    let unaligned = r.write(512, &pattern(5, 4096), 0);
    let good = r.write(4096, &pattern(6, 4096), 0);
    let got = errors(&r.settle());
    let mut want = vec![
        (past, Errno::NoSpc as u32),
        (unaligned, Errno::Inval as u32),
        (good, 0),
    ];
    want.sort();
    assert_eq!(got, want);
    // Only the good one reached the device.
    assert_eq!(r.seen.borrow().writes, 1);
    r.assert_released();
}

#[test]
fn write_zeroes_zero_a_range_longer_than_a_round_and_nothing_beside_it() {
    let mut r = rig("disk", writer());
    r.connect();
    let fill = pattern(7, 600 * 4096);
    let h = r.write(0, &fill[..256 * 1024], 0);
    r.settle();
    {
        let mut seen = r.seen.borrow_mut();
        seen.disk[..fill.len()].copy_from_slice(&fill);
    }
    // 2 MiB + 12 KiB from block 10: 16 commands of 128 KiB and one more,
    // in three rounds of at most 8.
    let (start, len) = (10 * 4096u64, 2 * 1024 * 1024 + 3 * 4096u32);
    let writes0 = r.seen.borrow().writes;
    let hz =
        r.lo.client()
            .command(cmd::WRITE_ZEROES, cflag::NO_HOLE, start, len, &[])
            .unwrap();
    assert_eq!(errors(&r.settle()), vec![(hz, 0)]);
    let seen = r.seen.borrow();
    let (s, e) = (start as usize, start as usize + len as usize);
    assert!(seen.disk[s..e].iter().all(|&b| b == 0));
    assert_eq!(&seen.disk[..s], &fill[..s]);
    assert_eq!(&seen.disk[e..fill.len()], &fill[e..]);
    assert_eq!(seen.writes - writes0, 17);
    drop(seen);
    let _ = h;
    // A round of two commands from a pool buffer (256 KiB) twice as long
    // as one command, whose tail holds an earlier write's bytes: both
    // commands write the zeroed head.
    let h = r.write(0, &fill[..256 * 1024], 0);
    r.settle();
    let hz =
        r.lo.client()
            .command(cmd::WRITE_ZEROES, 0, 0, 256 * 1024, &[])
            .unwrap();
    assert_eq!(errors(&r.settle()), vec![(hz, 0)]);
    assert!(r.seen.borrow().disk[..256 * 1024].iter().all(|&b| b == 0));
    let _ = h;
    r.assert_released();
}

#[test]
fn trim_is_answered_and_changes_nothing() {
    let mut r = rig("disk", writer());
    r.connect();
    let data = pattern(8, 8192);
    r.write(0, &data, 0);
    r.settle();
    let writes = r.seen.borrow().writes;
    let h =
        r.lo.client()
            .command(cmd::TRIM, cflag::FUA, 0, 8192, &[])
            .unwrap();
    assert_eq!(errors(&r.settle()), vec![(h, 0)]);
    assert_eq!(r.seen.borrow().writes, writes);
    r.read_back(0, &data);
}

#[test]
fn a_client_not_in_the_write_list_sees_every_export_read_only() {
    for (access, allowed) in [
        (
            Access::parse(None, Some("10.0.0.3,192.168.0.0/16")).unwrap(),
            false,
        ),
        (Access::default(), false),
        // The control: the same client in the list writes.
        (Access::parse(None, Some("10.0.0.0/24")).unwrap(), true),
    ] {
        let mut r = rig("disk", access);
        r.connect();
        let h = r.write(0, &pattern(9, 4096), 0);
        let hz =
            r.lo.client()
                .command(cmd::WRITE_ZEROES, 0, 8192, 4096, &[])
                .unwrap();
        let e = if allowed { 0 } else { Errno::Perm as u32 };
        let mut want = vec![(h, e), (hz, e)];
        want.sort();
        assert_eq!(errors(&r.settle()), want);
        assert_eq!(r.seen.borrow().writes, if allowed { 2 } else { 0 });
        r.assert_released();
    }
    // An export the platform left read-only refuses a writer too.
    let mut r = rig("ro", writer());
    r.connect();
    let h = r.write(0, &pattern(9, 4096), 0);
    assert_eq!(errors(&r.settle()), vec![(h, Errno::Perm as u32)]);
    assert_eq!(r.seen.borrow().writes, 0);
}

#[test]
fn a_client_outside_the_connect_list_is_reset_before_the_greeting() {
    let mut r = rig(
        "disk",
        Access::parse(Some("10.0.0.3"), Some(CLIENT)).unwrap(),
    );
    assert!(matches!(
        r.lo.connect(&mut r.side, &mut r.server),
        Err(LoopError::Stuck(_))
    ));
    assert_eq!(r.server.connections(), 0);
    // The control: in the list, it connects.
    let mut r = rig("disk", Access::parse(Some("10.0.0.0/24"), None).unwrap());
    r.connect();
    assert_eq!(r.server.connections(), 1);
}

#[test]
fn a_payload_cut_short_is_never_written_and_its_buffer_is_given_back() {
    let mut r = rig("disk", writer());
    r.connect();
    // A 64 KiB write whose header and first 10 KiB arrive, then the
    // client is gone.
    let mut req = vec![0u8; 28];
    req[..4].copy_from_slice(&dioxide_nbd::REQUEST_MAGIC.to_be_bytes());
    req[6..8].copy_from_slice(&cmd::WRITE.to_be_bytes());
    req[16..24].copy_from_slice(&0u64.to_be_bytes());
    req[24..].copy_from_slice(&(64 * 1024u32).to_be_bytes());
    req.extend_from_slice(&pattern(10, 10 * 1024));
    assert!(r.lo.send_raw(&req));
    r.lo.steps(&mut r.side, &mut r.server, 50);
    // Its buffer is held meanwhile.
    assert!(r.server.held_total >= 64 * 1024);
    assert_eq!(r.server.in_flight(), 1);
    r.lo.close(&mut r.side, &mut r.server);
    r.assert_released();
    let seen = r.seen.borrow();
    assert_eq!(seen.writes, 0);
    assert!(seen.disk.iter().all(|&b| b == 0));
}

#[test]
fn a_device_write_error_fails_that_write_and_no_other() {
    let mut r = rig("disk", writer());
    r.seen.borrow_mut().bad_block = Some(20);
    r.connect();
    let bad = r.write(16 * 4096, &pattern(11, 8 * 4096), 0);
    let good = r.write(40 * 4096, &pattern(12, 4096), 0);
    let mut want = vec![(bad, Errno::Io as u32), (good, 0)];
    want.sort();
    assert_eq!(errors(&r.settle()), want);
    // The connection serves on.
    let data = pattern(13, 4096);
    let h = r.write(41 * 4096, &data, 0);
    assert_eq!(errors(&r.settle()), vec![(h, 0)]);
    r.read_back(41 * 4096, &data);
    r.assert_released();
}

#[test]
fn steady_writes_allocate_nothing_and_the_counter_sees_a_growing_write() {
    let mut r = rig("disk", writer());
    r.connect();
    let data = pattern(14, 4096);
    let big = pattern(15, 512 * 1024);
    // Warm-up: pools, queues and the client's buffers reach their size
    // (its output that of the big write, below).
    r.write(512 * 4096, &big, 0);
    r.settle();
    for round in 0..4u64 {
        for k in 0..16u64 {
            r.write((round * 16 + k) * 4096, &data, 0);
        }
        r.settle();
    }
    let before = dioxide_testkit::thread_allocs();
    for round in 0..8u64 {
        for k in 0..16u64 {
            r.write((round * 16 + k) * 4096, &data, 0);
        }
        assert_eq!(r.settle_quietly(), 16);
    }
    assert_eq!(dioxide_testkit::thread_allocs() - before, 0);
    // The control: a write larger than the large pool's buffers gets a
    // buffer of its own on the server, and the counter sees it.
    let before = dioxide_testkit::thread_allocs();
    r.write(512 * 4096, &big, 0);
    r.settle_quietly();
    assert!(dioxide_testkit::thread_allocs() > before);
    r.read_back(512 * 4096, &big[..4096]);
}

#[test]
fn a_payload_that_trickles_ends_its_connection_after_the_stall_time() {
    // Stall time 300 ms: a payload must bring 64 KiB (or its rest) in it.
    let mut r = rig_stalling("disk", writer(), 300_000_000);
    r.connect();
    let mut req = vec![0u8; 28];
    req[..4].copy_from_slice(&dioxide_nbd::REQUEST_MAGIC.to_be_bytes());
    req[6..8].copy_from_slice(&cmd::WRITE.to_be_bytes());
    req[24..].copy_from_slice(&(1024 * 1024u32).to_be_bytes());
    assert!(r.lo.send_raw(&req));
    // 1 KiB every 20 ms: it moves, but at 50 KiB/s.
    let t0 = std::time::Instant::now();
    let mut dropped = false;
    while t0.elapsed() < std::time::Duration::from_secs(3) {
        r.lo.send_raw(&[7u8; 1024]);
        r.lo.steps(&mut r.side, &mut r.server, 5);
        std::thread::sleep(std::time::Duration::from_millis(20));
        if r.server.in_flight() == 0 && r.server.held_total == 0 {
            dropped = true;
            break;
        }
    }
    assert!(dropped, "a trickling payload kept its buffer");
    assert!(t0.elapsed() >= std::time::Duration::from_millis(300));
    r.assert_released();
    assert_eq!(r.seen.borrow().writes, 0);
}

/// Where `name`'s file block `fb` lives on the device.
fn file_block(name: &str, fb: u64) -> usize {
    let (_, fs) = image();
    let f = fs.open(fs.resolve(&format!("/{name}")).unwrap()).unwrap();
    use dioxide_iomap::IomapOps;
    let m = f
        .iomap_begin(fb * 4096, 4096, dioxide_iomap::IomapFlags::empty())
        .unwrap();
    assert_eq!(m.kind, dioxide_iomap::IomapType::Mapped);
    (m.addr + (fb * 4096 - m.offset)) as usize
}

#[test]
fn a_file_takes_overwrites_of_its_written_blocks_and_refuses_to_allocate() {
    let mut r = rig("vol.bin", writer());
    r.seen.borrow_mut().disk = image().0;
    r.connect();
    let before = r.seen.borrow().disk.clone();
    // One block with FUA (the simple write path), four blocks with FUA
    // (generic), in flight together; then a flush.
    let one = pattern(30, 4096);
    let four = pattern(31, 4 * 4096);
    let h1 = r.write(3 * 4096, &one, cflag::FUA);
    let h4 = r.write(8 * 4096, &four, cflag::FUA);
    let hf = r.lo.client().command(cmd::FLUSH, 0, 0, 0, &[]).unwrap();
    let mut want = vec![(h1, 0), (h4, 0), (hf, 0)];
    want.sort();
    assert_eq!(errors(&r.settle()), want);
    {
        let seen = r.seen.borrow();
        assert_eq!(&seen.disk[file_block("vol.bin", 3)..][..4096], &one[..]);
        for k in 0..4 {
            assert_eq!(
                &seen.disk[file_block("vol.bin", 8 + k)..][..4096],
                &four[k as usize * 4096..][..4096]
            );
        }
        // The four blocks are one device write: two with FUA in all.
        assert_eq!((seen.writes, seen.fua_writes, seen.flushes), (2, 2, 1));
        // Nothing but those five blocks changed: no metadata was written.
        let changed = seen
            .disk
            .chunks(4096)
            .zip(before.chunks(4096))
            .filter(|(a, b)| a != b)
            .count();
        assert_eq!(changed, 5);
    }
    let stats = r.server.platform().with_engine(0, |e| e.stats()).unwrap();
    assert_eq!((stats.simple, stats.generic), (1, 1), "{stats:?}");
    r.read_back(3 * 4096, &one);
    r.read_back(8 * 4096, &four);
    // A write that is not whole filesystem blocks: EINVAL (the export's
    // minimum block is the filesystem's).
    let h = r.write(4096 + 512, &pattern(32, 512), 0);
    assert_eq!(errors(&r.settle()), vec![(h, Errno::Inval as u32)]);
    r.assert_released();

    // A hole needs allocation: ENOTSUP, and the device is untouched; the
    // written part of the same file takes the overwrite.
    let mut r = rig("sparse.bin", writer());
    r.seen.borrow_mut().disk = image().0;
    r.connect();
    let before = r.seen.borrow().disk.clone();
    let hole = r.write(8 * 4096, &pattern(33, 4096), 0);
    assert_eq!(errors(&r.settle()), vec![(hole, Errno::NotSup as u32)]);
    assert!(r.seen.borrow().disk == before);
    let data = pattern(34, 4096);
    let ok = r.write(4096, &data, 0);
    assert_eq!(errors(&r.settle()), vec![(ok, 0)]);
    r.read_back(4096, &data);
    r.read_back(8 * 4096, &[0u8; 4096]);
    // A write-zeroes over the written part and the hole is refused whole.
    let before = r.seen.borrow().disk.clone();
    let hz =
        r.lo.client()
            .command(cmd::WRITE_ZEROES, 0, 0, 16 * 4096, &[])
            .unwrap();
    assert_eq!(errors(&r.settle()), vec![(hz, Errno::NotSup as u32)]);
    assert!(
        r.seen.borrow().disk == before,
        "a refused write-zeroes wrote"
    );
    r.read_back(4096, &data);
    // So is a write over both.
    let hw = r.write(0, &pattern(35, 12 * 4096), 0);
    assert_eq!(errors(&r.settle()), vec![(hw, Errno::NotSup as u32)]);
    assert!(r.seen.borrow().disk == before, "a refused write wrote");
    r.assert_released();

    // A write-zeroes over written blocks of a file zeroes them (one dio
    // per zeroed buffer) and nothing beside them.
    let mut r = rig("vol.bin", writer());
    r.seen.borrow_mut().disk = image().0;
    r.connect();
    let hz =
        r.lo.client()
            .command(cmd::WRITE_ZEROES, 0, 4096, 14 * 4096, &[])
            .unwrap();
    assert_eq!(errors(&r.settle()), vec![(hz, 0)]);
    let p = pattern(20, 64 * 1024);
    r.read_back(0, &p[..4096]);
    r.read_back(4096, &[0u8; 14 * 4096]);
    r.read_back(15 * 4096, &p[15 * 4096..]);
    r.assert_released();
}

/// An image (with a commit log) of `sparse.bin` (256 KiB, a hole),
/// `big.bin` (16 MiB, a hole: more than the device has free) and
/// `vol.bin` (64 KiB written), its files writable with the filesystem's
/// write path over the same RAM as the device model.
fn allocating_rig(export: &str) -> (Rig, Ram) {
    allocating_rig_committing(export, 0)
}

/// [`allocating_rig`] whose table commits the write path every
/// `commit_ns` (0: never).
fn allocating_rig_committing(export: &str, commit_ns: u64) -> (Rig, Ram) {
    use dioxide_dxfs::mkfs::{self, Node, Options, Source, Tree};
    struct Src;
    impl Source for Src {
        fn read(&mut self, _: u64, off: u64, buf: &mut [u8]) -> Result<(), String> {
            let p = pattern(40, 64 * 1024);
            buf.copy_from_slice(&p[off as usize..off as usize + buf.len()]);
            Ok(())
        }
    }
    let tree = Tree {
        nodes: vec![
            Node::dir(vec![
                ("sparse.bin".into(), 1),
                ("big.bin".into(), 2),
                ("vol.bin".into(), 3),
            ]),
            Node::file(256 * 1024, vec![], 0),
            Node::file(16 << 20, vec![], 0),
            Node::file(64 * 1024, vec![(0, 64 * 1024)], 0),
        ],
    };
    let opts = Options {
        size: Some(BLOCKS * LBS as u64),
        ..Options::default()
    };
    let plan = mkfs::plan(&tree, &opts).unwrap();
    let mut dev = dioxide_dxfs::MemDevice::new(BLOCKS as usize * LBS, 512);
    mkfs::write(&tree, &plan, &opts, &mut Src, &mut dev, &mut |_, _| {}).unwrap();
    let ram: Ram = std::sync::Arc::new(std::sync::Mutex::new(dev.data.clone()));
    let fs = dioxide_dxfs::Fs::mount(dev).unwrap();
    let w = dioxide_dxfs::WritableFs::mount(RamDev(ram.clone())).unwrap();
    let w = dioxide_dxfs::Writer(std::sync::Arc::new(dioxide_dxfs::SharedFs::new(w)));
    let mut t = Table::new();
    for name in ["sparse.bin", "big.bin", "vol.bin"] {
        let f = fs.open(fs.resolve(&format!("/{name}")).unwrap()).unwrap();
        t.add_file(name.into(), f, 4096, 0, LBS as u32);
        t.set_writable(name).unwrap();
    }
    assert_eq!(t.attach_writer(0, &w), 3);
    t.set_commit_interval(commit_ns);
    let t: &'static Table = Box::leak(Box::new(t));
    let r = rig_on(export, writer(), STALL_NS, t);
    r.seen.borrow_mut().ram = Some(ram.clone());
    (r, ram)
}

/// The image as the RAM holds it now: fsck clean, and file `name`'s bytes.
fn committed(ram: &Ram, name: &str) -> Vec<u8> {
    let dev = dioxide_dxfs::MemDevice::from_vec(ram.lock().unwrap().clone(), 512);
    let rep = dioxide_dxfs::fsck::check(&dev);
    assert!(rep.clean(), "fsck: {:?}", rep.problems);
    let fs = dioxide_dxfs::Fs::mount(&dev).unwrap();
    let f = fs.open(fs.resolve(&format!("/{name}")).unwrap()).unwrap();
    let mut v = vec![0u8; f.size() as usize];
    fs.read(&f, 0, &mut v).unwrap();
    v
}

#[test]
fn a_sparse_file_takes_allocating_writes_through_its_write_path() {
    let (mut r, ram) = allocating_rig("sparse.bin");
    r.connect();
    let mut want = vec![0u8; 256 * 1024];
    // Three blocks into the hole, then one more with FUA.
    let a = pattern(41, 3 * 4096);
    let h = r.write(16 * 4096, &a, 0);
    assert_eq!(errors(&r.settle()), vec![(h, 0)]);
    want[16 * 4096..19 * 4096].copy_from_slice(&a);
    // Read back through the service: the snapshot's hole asks the write
    // path, which has the blocks now.
    r.read_back(16 * 4096, &a);
    r.read_back(15 * 4096, &[0u8; 4096]);
    // Not yet committed: the image as a crash would leave it reads zeroes.
    assert!(committed(&ram, "sparse.bin").iter().all(|&b| b == 0));
    let b = pattern(42, 4096);
    let h = r.write(40 * 4096, &b, cflag::FUA);
    assert_eq!(errors(&r.settle()), vec![(h, 0)]);
    want[40 * 4096..41 * 4096].copy_from_slice(&b);
    assert!(committed(&ram, "sparse.bin") == want, "FUA: durable");
    // An overwrite of a block now written takes the simple path, and a
    // fresh hole is filled without FUA: not committed yet (the control);
    // FLUSH commits.
    let c = pattern(43, 4096);
    let h = r.write(17 * 4096, &c, 0);
    let g = pattern(46, 4096);
    let hg = r.write(60 * 4096, &g, 0);
    let mut e = vec![(h, 0), (hg, 0)];
    e.sort();
    assert_eq!(errors(&r.settle()), e);
    assert!(
        committed(&ram, "sparse.bin")[60 * 4096..61 * 4096]
            .iter()
            .all(|&b| b == 0),
        "(control: not committed before the FLUSH)"
    );
    let hf = r.lo.client().command(cmd::FLUSH, 0, 0, 0, &[]).unwrap();
    assert_eq!(errors(&r.settle()), vec![(hf, 0)]);
    want[17 * 4096..18 * 4096].copy_from_slice(&c);
    want[60 * 4096..61 * 4096].copy_from_slice(&g);
    assert!(committed(&ram, "sparse.bin") == want, "FLUSH: durable");
    // A FUA overwrite of a block filled since the last commit commits its
    // mapping too.
    let k = pattern(47, 4096);
    let hk = r.write(62 * 4096, &k, 0);
    assert_eq!(errors(&r.settle()), vec![(hk, 0)]);
    let k2 = pattern(48, 4096);
    let hk = r.write(62 * 4096, &k2, cflag::FUA);
    assert_eq!(errors(&r.settle()), vec![(hk, 0)]);
    want[62 * 4096..63 * 4096].copy_from_slice(&k2);
    assert!(
        committed(&ram, "sparse.bin") == want,
        "FUA overwrite: durable"
    );
    // Write-zeroes over written blocks and a hole: the written blocks get
    // zeroes, the hole stays a hole.
    let hz =
        r.lo.client()
            .command(cmd::WRITE_ZEROES, 0, 15 * 4096, 4 * 4096, &[])
            .unwrap();
    let hf = r.lo.client().command(cmd::FLUSH, 0, 0, 0, &[]).unwrap();
    let mut e = vec![(hz, 0), (hf, 0)];
    e.sort();
    assert_eq!(errors(&r.settle()), e);
    want[15 * 4096..19 * 4096].fill(0);
    r.read_back(15 * 4096, &want[15 * 4096..19 * 4096]);
    assert!(committed(&ram, "sparse.bin") == want);
    // A write without FLUSH is committed when its client goes.
    let d = pattern(45, 4096);
    let h = r.write(50 * 4096, &d, 0);
    assert_eq!(errors(&r.settle()), vec![(h, 0)]);
    assert!(
        committed(&ram, "sparse.bin")[50 * 4096..51 * 4096]
            .iter()
            .all(|&b| b == 0),
        "(control: not committed yet)"
    );
    want[50 * 4096..51 * 4096].copy_from_slice(&d);
    r.lo.close(&mut r.side, &mut r.server);
    assert!(
        committed(&ram, "sparse.bin") == want,
        "committed at the disconnect"
    );
    r.assert_released();
}

/// An allocating write that no FLUSH or FUA follows, its client still
/// connected: committed by the periodic commit (`dxfs.commit_s`), and
/// (the control) never without it.
#[test]
fn the_periodic_commit_makes_an_unflushed_allocating_write_durable() {
    let d = pattern(49, 4096);
    for commit_ns in [20_000_000, 0] {
        let (mut r, ram) = allocating_rig_committing("sparse.bin", commit_ns);
        r.connect();
        let h = r.write(30 * 4096, &d, 0);
        assert_eq!(errors(&r.settle()), vec![(h, 0)]);
        let durable = || committed(&ram, "sparse.bin")[30 * 4096..31 * 4096] == d[..];
        let t0 = std::time::Instant::now();
        // Up to 5 s with the timer (it takes 20-40 ms); 300 ms without.
        let wait = if commit_ns > 0 { 5_000 } else { 300 };
        while !durable() && t0.elapsed().as_millis() < wait {
            r.lo.steps(&mut r.side, &mut r.server, 4);
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(
            durable(),
            commit_ns > 0,
            "commit every {commit_ns} ns: durable after {:?}",
            t0.elapsed()
        );
        r.lo.close(&mut r.side, &mut r.server);
        assert!(durable(), "committed at the disconnect in any case");
        r.assert_released();
    }
}

#[test]
fn a_file_bigger_than_the_free_space_fills_it_then_gets_enospc_and_serving_goes_on() {
    let (mut r, ram) = allocating_rig("big.bin");
    r.connect();
    let chunk = pattern(44, 128 * 1024);
    let mut written = 0u64;
    let full = loop {
        let h = r.write(written, &chunk, 0);
        let rep = r.settle();
        assert_eq!(rep.len(), 1);
        assert_eq!(rep[0].handle, h);
        if rep[0].error != 0 {
            break rep[0].error;
        }
        written += chunk.len() as u64;
        assert!(written < 16 << 20, "the device cannot hold 16 MiB");
    };
    assert_eq!(full, Errno::NoSpc as u32);
    assert!(written > 4 << 20, "{written} bytes before ENOSPC");
    // Serving goes on: what was answered reads back and commits.
    r.read_back(0, &chunk[..8192]);
    let hf = r.lo.client().command(cmd::FLUSH, 0, 0, 0, &[]).unwrap();
    assert_eq!(errors(&r.settle()), vec![(hf, 0)]);
    let big = committed(&ram, "big.bin");
    for k in 0..(written / chunk.len() as u64) as usize {
        assert!(
            big[k * chunk.len()..][..chunk.len()] == chunk[..],
            "chunk {k}"
        );
    }
    r.assert_released();
}
