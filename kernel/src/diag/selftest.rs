//! Self-tests a user runs to check a machine (`selftest=` on the command line).
//! Each prints its result line(s) without a log prefix and powers off with a
//! status (see [`crate::platform::power`]).

use crate::block::disk::Mounted;
use crate::drivers::nvme::{self, DmaBuf};
use crate::outln;
use crate::platform::power::{self, EXIT_DEVICE, EXIT_OK, EXIT_TEST_FAILED};
use crate::platform::time;
use alloc::vec::Vec;
use dioxide_iomap::{DioError, DioRequest, DioResult, IoBuf, Kiocb, Op, ReqId};
use sha2::{Digest, Sha256};

const NO_MEMORY: DioError = DioError::Unsupported("out of memory");
const FLUSH: IoBuf = IoBuf::empty();

/// The raw commands one self-test has in flight, by the test's tag: its
/// own table, filled from the engine's deliveries (`(ReqId, result)`, the
/// id's index being the tag). The test is the engine's only asynchronous
/// owner while it runs.
struct Tags {
    /// The namespace the commands go to (index in `nvme::disks()`).
    disk: usize,
    results: Vec<Option<Result<usize, DioError>>>,
}

impl Tags {
    fn new(disk: usize, n: usize) -> Self {
        Tags {
            disk,
            results: alloc::vec![None; n],
        }
    }

    /// Submits a raw command as `tag`.
    ///
    /// # Safety
    /// As [`nvme::submit`]: `buf` untouched until `tag` is done.
    unsafe fn submit(&mut self, op: Op, lba: u64, buf: IoBuf, tag: u16) -> Result<(), DioError> {
        if let Some(r) = self.results.get_mut(tag as usize) {
            *r = None;
        }
        // SAFETY: our caller keeps `buf` untouched until the tag is done,
        // i.e. until its completion was delivered: nvme::submit's contract.
        unsafe { nvme::submit(self.disk, op, lba, buf, ReqId::new(tag, 0)) }
    }

    fn is_done(&self, tag: u16) -> bool {
        matches!(self.results.get(tag as usize), Some(Some(_)))
    }

    fn take(&mut self, tag: u16) -> Option<Result<usize, DioError>> {
        self.results.get_mut(tag as usize)?.take()
    }

    /// Runs the completion path until `done` holds. Every command has a
    /// deadline, so this ends.
    fn wait(&mut self, done: impl Fn(&Self) -> bool) {
        loop {
            let results = &mut self.results;
            nvme::service(|id, r| {
                if let Some(x) = results.get_mut(id.index()) {
                    *x = Some(r);
                }
            });
            if done(self) {
                return;
            }
            nvme::idle();
        }
    }
}

fn device_error(what: &str, e: DioError) -> ! {
    log::error!(target: "selftest", "{what}: {e}");
    outln!("error {what}: {e}");
    nvme::power_off(EXIT_DEVICE)
}

fn hex(bytes: &[u8]) -> alloc::string::String {
    use core::fmt::Write;
    let mut s = alloc::string::String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// Logs the counters, shuts the controller down (CC.SHN, so that a device
/// with a volatile cache commits it) and powers off with success.
fn finish() -> ! {
    for (i, d) in nvme::disks().iter().enumerate() {
        if let Some(q) = nvme::stats(i) {
            log::info!(
                target: "nvme",
                "{}: {} submitted, {} completed, {} errors, {} timeouts, {} spurious; doorbells {} written, {} skipped (shadow doorbells); {} kicks, {} lost doorbells recovered",
                d.name, q.submitted, q.completed, q.errors, q.timeouts, q.spurious, q.doorbell_writes, q.doorbells_skipped, q.kicks, q.recoveries
            );
        }
    }
    let h = crate::mm::heap::stats();
    let (frames_total, frames_used) = crate::mm::frame::stats();
    log::info!(
        target: "mm",
        "heap: {} allocations, {} frees, {} KiB in use (peak {} KiB); frames: {} KiB of {} MiB used",
        h.allocs, h.frees, h.bytes_in_use / 1024, h.peak_bytes / 1024, frames_used / 1024, frames_total >> 20
    );
    nvme::power_off(EXIT_OK)
}

/// `selftest=calibrate`: measures the TSC against every source in this boot
/// and prints one line per source, `calibrate source=hpet hz=2445123456`
/// (or `calibrate source=pit unavailable="..."`), so that the host can
/// compare them; then a fixed amount of CPU work, for the host to time how
/// fast this accelerator runs guest code.
pub fn calibrate() -> ! {
    let facts = crate::platform::acpi::facts();
    for s in dioxide_firmware::calib::Source::ALL {
        match time::measure(s, facts) {
            Ok(hz) => outln!("calibrate source={} hz={hz}", s.key()),
            Err(e) => outln!("calibrate source={} unavailable=\"{e}\"", s.key()),
        }
    }
    let t0 = time::now_ns();
    let mut x: u64 = 1;
    for i in 0..20_000_000u64 {
        x = core::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(i));
    }
    let ms = (time::now_ns() - t0) / 1_000_000;
    outln!(
        "calibrate iterations=20000000 guest_ms={ms} tsc_mhz={} x={:x}",
        time::tsc_hz() / 1_000_000,
        x & 0xff
    );
    power::exit(EXIT_OK)
}

/// `selftest=fault`: touches address 0 (unmapped) to show the exception path.
pub fn fault() -> ! {
    log::info!(target: "selftest", "reading address 0: expect a page fault report");
    let p = core::hint::black_box(0usize) as *const u64;
    // SAFETY: deliberately unsound: page 0 is unmapped and the resulting page
    // fault powers the machine off; nothing runs after it.
    let v = unsafe { core::ptr::read_volatile(p) };
    outln!("fault did not fault (read {v:#x})");
    power::exit(EXIT_TEST_FAILED)
}

/// `selftest=panic`: panics on purpose, to show the panic path: the report
/// (`PANIC: ...`) and power-off with status 5 ([`power::EXIT_PANIC`]).
pub fn panic() -> ! {
    log::info!(target: "selftest", "panicking on purpose: expect a panic report");
    panic!("selftest=panic: deliberate panic");
}

/// `selftest=digest`: reads every namespace whole (several commands in
/// flight) and prints `digest <name> bytes=<n> sha256=<hex>` for each
/// (`digest nvme0n1 ...`, `digest nvme0n2 ...`, in controller and namespace
/// order).
pub fn digest() -> ! {
    for disk in 0..nvme::disks().len() {
        digest_one(disk);
    }
    nvme::power_off(EXIT_OK)
}

fn digest_one(disk: usize) {
    let Some(dev) = nvme::disks().get(disk) else {
        return;
    };
    let bs = dev.ns.block_size as usize;
    let total = dev.ns.bytes();
    let chunk = (dev.max_transfer.min(256 * 1024) / bs).max(1) * bs;
    let qd = 8usize;
    let nchunks = total.div_ceil(chunk as u64) as usize;
    let mut bufs: Vec<DmaBuf> = (0..qd)
        .map(|_| DmaBuf::new(chunk).unwrap_or_else(|| device_error("digest", NO_MEMORY)))
        .collect();
    let len_of = |i: usize| -> usize { ((total - (i * chunk) as u64).min(chunk as u64)) as usize };
    let submit = |tags: &mut Tags, bufs: &mut Vec<DmaBuf>, i: usize| {
        let len = len_of(i);
        let lba = (i * chunk / bs) as u64;
        // Poisoned, so that a read which moves no data does not hash what
        // an earlier read left in the buffer (zeroes, often, on an image).
        poison(&mut bufs[i % qd].as_mut_slice()[..len], (i * chunk) as u64);
        let part = bufs[i % qd].part(0, len);
        // SAFETY: the buffer is not touched until its tag is done.
        if let Err(e) = unsafe { tags.submit(Op::Read, lba, part, (i % qd) as u16) } {
            device_error("digest submit", e);
        }
    };
    let t0 = time::now_ns();
    let mut hasher = Sha256::new();
    let mut next = 0;
    let mut tags = Tags::new(disk, qd);
    while next < nchunks.min(qd) {
        submit(&mut tags, &mut bufs, next);
        next += 1;
    }
    for i in 0..nchunks {
        let tag = (i % qd) as u16;
        tags.wait(|t| t.is_done(tag));
        match tags.take(tag) {
            Some(Ok(_)) => {}
            Some(Err(e)) => device_error(&alloc::format!("digest read at byte {}", i * chunk), e),
            None => device_error("digest", DioError::Unsupported("lost completion")),
        }
        hasher.update(&bufs[i % qd].as_slice()[..len_of(i)]);
        if next < nchunks {
            submit(&mut tags, &mut bufs, next);
            next += 1;
        }
    }
    let ns = (time::now_ns() - t0).max(1);
    log::info!(
        target: "selftest",
        "{}: read {} MiB in {} ms ({} MiB/s, {} commands of {} KiB)",
        dev.name,
        total >> 20,
        ns / 1_000_000,
        (total as u128 * 1_000_000_000 / ns as u128) >> 20,
        nchunks,
        chunk / 1024
    );
    outln!(
        "digest {} bytes={} sha256={}",
        dev.name,
        total,
        hex(&hasher.finalize())
    );
}

/// Moves `buf` to or from the device at `lba` in `unit`-byte commands with up
/// to `qd` in flight.
fn transfer(
    disk: usize,
    write: bool,
    lba: u64,
    buf: &mut DmaBuf,
    unit: usize,
    qd: usize,
) -> Result<(), DioError> {
    let bs = nvme::disks()
        .get(disk)
        .map_or(512, |d| d.ns.block_size as usize);
    let units = buf.as_slice().len() / unit;
    let mut tags = Tags::new(disk, qd);
    let mut free: Vec<u16> = (0..qd as u16).rev().collect();
    let mut inflight: Vec<u16> = Vec::with_capacity(qd);
    let mut next = 0;
    let mut done = 0;
    let mut first_error = None;
    while done < units {
        while next < units && !free.is_empty() && first_error.is_none() {
            let tag = free.pop().unwrap_or(0);
            let at = lba + (next * unit / bs) as u64;
            let op = if write { Op::Write } else { Op::Read };
            let part = buf.part(next * unit, unit);
            // SAFETY: `buf` outlives the wait below, which covers every tag.
            unsafe { tags.submit(op, at, part, tag)? };
            inflight.push(tag);
            next += 1;
        }
        if inflight.is_empty() {
            break;
        }
        tags.wait(|t| inflight.iter().any(|&i| t.is_done(i)));
        inflight.retain(|&t| match tags.take(t) {
            Some(r) => {
                if let Err(e) = r {
                    first_error.get_or_insert(e);
                }
                free.push(t);
                done += 1;
                false
            }
            None => true,
        });
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// `selftest=files`: walks the dxfs tree of every namespace that holds one,
/// reads every regular file in full and prints `file <path> bytes=<n>
/// sha256=<hex>` per file, then `files done count=<n>`. Paths are named as
/// the NBD service names them: `/data/a.bin` on `nvme0n1`,
/// `/nvme1n1/data/a.bin` on any other namespace. A damaged file or
/// directory is reported (`file <path> error=...`) and the walk goes on
/// with the rest; the run then fails.
pub fn files(mounts: &[Mounted]) -> ! {
    if mounts.is_empty() {
        let first = nvme::disks().first().map_or("nvme0n1", |d| d.name.as_str());
        outln!("files error: {first} holds no usable dxfs");
        nvme::power_off(EXIT_TEST_FAILED);
    }
    let mut buf = DmaBuf::new(1 << 20).unwrap_or_else(|| device_error("files", NO_MEMORY));
    let (mut count, mut errors, mut bytes) = (0u64, 0u64, 0u64);
    let t0 = time::now_ns();
    for m in mounts {
        let (c, e, b) = files_of(m, &mut buf);
        count += c;
        errors += e;
        bytes += b;
    }
    let ms = (time::now_ns() - t0) / 1_000_000;
    log::info!(target: "selftest", "files: {count} files, {} KiB in {ms} ms, {errors} errors", bytes / 1024);
    let mut s = dioxide_iomap::Stats::default();
    for i in 0..nvme::disks().len() {
        if let Some(e) = nvme::with_engine(i, |e| e.stats()) {
            s.simple += e.simple;
            s.generic += e.generic;
            s.fell_back += e.fell_back;
            s.errors += e.errors;
        }
    }
    outln!(
        "files iomap simple={} generic={} fell_back={} errors={}",
        s.simple,
        s.generic,
        s.fell_back,
        s.errors
    );
    if errors > 0 {
        outln!("files done count={count} errors={errors}");
        nvme::power_off(EXIT_TEST_FAILED);
    }
    outln!("files done count={count}");
    finish()
}

/// One filesystem of [`files`]: (files read, errors, bytes). The files are
/// those the NBD service exports ([`dioxide_dxfs::Fs::scan`]); each damaged
/// structure is one error line (`file <path> error=...` for a file left
/// out, `dir <path>/ error=...` for a directory or some of its entries).
fn files_of(m: &Mounted, buf: &mut DmaBuf) -> (u64, u64, u64) {
    use dioxide_dxfs::Lost;
    let root = m.root();
    let scan = match m.fs.scan() {
        Ok(scan) => scan,
        Err(e) => {
            outln!("dir {}/ error={}", root, e);
            return (0, 1, 0);
        }
    };
    let mut errors = scan.damage.len() as u64;
    for d in &scan.damage {
        match d.lost {
            Lost::File => outln!("file {}{} error={}", root, d.path, d.error),
            Lost::Directory | Lost::Entries => {
                outln!("dir {}{}/ error={}", root, d.path, d.error)
            }
        }
    }
    let (mut count, mut bytes) = (0u64, 0u64);
    for (path, f) in scan.files() {
        match read_whole(m.disk, f, buf) {
            Ok((n, sha256)) => {
                outln!("file {}{} bytes={} sha256={}", root, path, n, sha256);
                count += 1;
                bytes += n;
            }
            Err(err) => {
                outln!("file {}{} error={}", root, path, err);
                errors += 1;
            }
        }
    }
    (count, errors, bytes)
}

/// Reads file `f` of namespace `disk` whole through the DIO layer, and its
/// first block again through a 4 KiB request: its size and sha256 (hex), or
/// what failed.
fn read_whole(
    disk: usize,
    f: &dioxide_dxfs::File,
    buf: &mut DmaBuf,
) -> Result<(u64, alloc::string::String), alloc::string::String> {
    let mut hasher = Sha256::new();
    let mut off = 0u64;
    let mut failed = None;
    let mut first = [0u8; 4096];
    while off < f.size() {
        // Every file read goes through the DIO layer: 1 MiB requests
        // take the generic path (EOF tails through a bounce buffer).
        // The buffer is poisoned first, so that bytes the read did
        // not move cannot pass for data left by an earlier read.
        poison(&mut buf.as_mut_slice()[..1 << 20], off);
        let iob = buf.part(0, 1 << 20);
        // SAFETY: `buf` is owned here; the call is synchronous.
        let r = nvme::with_engine(disk, |e| unsafe {
            e.dio_rw(DioRequest::read(Kiocb::sync(off), iob, f))
        })
        .unwrap_or(Err(DioError::Unsupported("no NVMe engine")));
        let want = (f.size() - off).min(1 << 20) as usize;
        match r {
            Ok(DioResult::Done(n)) if n != want => {
                failed = Some(alloc::format!(
                    "read at byte {off} returned {n} bytes, not {want}"
                ));
                break;
            }
            Ok(DioResult::Done(n)) => {
                hasher.update(&buf.as_slice()[..n]);
                if off == 0 {
                    let k = n.min(4096);
                    first[..k].copy_from_slice(&buf.as_slice()[..k]);
                }
                off += n as u64;
            }
            Ok(DioResult::Queued) => {
                failed = Some("synchronous read queued".into());
                break;
            }
            Err(err) => {
                failed = Some(alloc::format!("{err}"));
                break;
            }
        }
    }
    if failed.is_none() && off != f.size() {
        failed = Some(alloc::format!(
            "read {off} bytes of a {}-byte file",
            f.size()
        ));
    }
    // The first block again through a 4 KiB request, which takes the
    // simple path when it is on: it must return the same bytes. The
    // buffer first holds the complement of those bytes, so a read
    // that moved no data (or only part of it) cannot match.
    if failed.is_none() && f.size() >= 4096 {
        for (b, &want) in buf.as_mut_slice()[..4096].iter_mut().zip(first.iter()) {
            *b = !want;
        }
        let iob = buf.part(0, 4096);
        // SAFETY: `buf` is owned here; the call is synchronous.
        let r = nvme::with_engine(disk, |e| unsafe {
            e.dio_rw(DioRequest::read(Kiocb::sync(0), iob, f))
        });
        failed = match r {
            Some(Ok(DioResult::Done(4096))) => {
                let got = &buf.as_slice()[..4096];
                got.iter()
                    .zip(first.iter())
                    .position(|(a, b)| a != b)
                    .map(|i| {
                        alloc::format!(
                        "4 KiB read differs from the 1 MiB read at byte {i} ({:#04x}, not {:#04x})",
                        got[i],
                        first[i]
                    )
                    })
            }
            Some(Ok(DioResult::Done(n))) => Some(alloc::format!("4 KiB read returned {n} bytes")),
            Some(Ok(DioResult::Queued)) => Some("4 KiB read queued".into()),
            Some(Err(e)) => Some(alloc::format!("4 KiB read: {e}")),
            None => Some("no NVMe engine".into()),
        };
    }
    match failed {
        None => Ok((off, hex(&hasher.finalize()))),
        Some(err) => Err(err),
    }
}

/// Fills `buf` with a pattern no disk is likely to hold (each 8-byte word
/// names its file position), so that a read which moves no data is seen.
fn poison(buf: &mut [u8], pos: u64) {
    for (i, w) in buf.chunks_mut(8).enumerate() {
        let v = 0xdead_beef_0000_0000u64 ^ (pos + i as u64 * 8);
        w.copy_from_slice(&v.to_le_bytes()[..w.len()]);
    }
}

/// Sets every byte of `dst` to the complement of the same byte of `src`.
fn complement(dst: &mut DmaBuf, src: &DmaBuf) {
    for (d, s) in dst.as_mut_slice().iter_mut().zip(src.as_slice()) {
        *d = !*s;
    }
}

fn pattern(pass: u64, off: u64) -> u8 {
    let x =
        (off / 8).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ pass.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    (x >> ((off % 8) * 8)) as u8
}

/// `selftest=rw`: saves a scratch range (the end of the namespace), writes a
/// pattern over it at queue depths 1, 4 and 32, reads each back and compares,
/// flushes, then restores and verifies the original contents. Prints `rw ok`
/// or the first mismatch. Every namespace in turn; `rw ok` once all passed.
pub fn rw(blocks_arg: Option<u64>) -> ! {
    for disk in 0..nvme::disks().len() {
        rw_one(disk, blocks_arg);
    }
    outln!("rw ok");
    finish()
}

fn rw_one(disk: usize, blocks_arg: Option<u64>) {
    let Some(dev) = nvme::disks().get(disk) else {
        return;
    };
    let bs = dev.ns.block_size as u64;
    let unit = 4096u64.max(bs);
    let want = blocks_arg.unwrap_or((1 << 20) / bs).max(unit / bs);
    let blocks = want.min(dev.ns.blocks) / (unit / bs) * (unit / bs);
    if blocks == 0 {
        outln!("rw mismatch: namespace smaller than one {unit}-byte unit");
        nvme::power_off(EXIT_TEST_FAILED);
    }
    let lba = dev.ns.blocks - blocks;
    let len = (blocks * bs) as usize;
    let alloc_buf = || DmaBuf::new(len).unwrap_or_else(|| device_error("rw", NO_MEMORY));
    let mut saved = alloc_buf();
    let mut wbuf = alloc_buf();
    let mut rbuf = alloc_buf();
    log::info!(target: "selftest", "rw: {}: scratch LBAs {}..{} ({} KiB), saving them first", dev.name, lba, lba + blocks, len / 1024);
    if let Err(e) = transfer(disk, false, lba, &mut saved, unit as usize, 8) {
        device_error("rw save", e);
    }
    let t0 = time::now_ns();
    for qd in [1usize, 4, 32] {
        for (i, b) in wbuf.as_mut_slice().iter_mut().enumerate() {
            *b = pattern(qd as u64, i as u64);
        }
        // The read buffer holds the complement of what must come back, so
        // that a read which moves no data fails the comparison.
        complement(&mut rbuf, &wbuf);
        if let Err(e) = transfer(disk, true, lba, &mut wbuf, unit as usize, qd) {
            device_error(&alloc::format!("rw write qd={qd}"), e);
        }
        if let Err(e) = transfer(disk, false, lba, &mut rbuf, unit as usize, qd) {
            device_error(&alloc::format!("rw read qd={qd}"), e);
        }
        if let Some(i) = (0..len).find(|&i| wbuf.as_slice()[i] != rbuf.as_slice()[i]) {
            outln!(
                "rw mismatch qd={} lba={} offset={} expected={:#04x} got={:#04x}",
                qd,
                lba + i as u64 / bs,
                i as u64 % bs,
                wbuf.as_slice()[i],
                rbuf.as_slice()[i]
            );
            nvme::power_off(EXIT_TEST_FAILED);
        }
        // SAFETY: no data buffer.
        if let Err(e) = unsafe { nvme::execute(disk, Op::Flush, 0, FLUSH) } {
            device_error("rw flush", e);
        }
        log::info!(target: "selftest", "rw: pass at queue depth {qd} verified");
    }
    if let Err(e) = transfer(disk, true, lba, &mut saved, unit as usize, 8) {
        device_error("rw restore", e);
    }
    // SAFETY: no data buffer.
    if let Err(e) = unsafe { nvme::execute(disk, Op::Flush, 0, FLUSH) } {
        device_error("rw flush", e);
    }
    complement(&mut rbuf, &saved);
    if let Err(e) = transfer(disk, false, lba, &mut rbuf, unit as usize, 8) {
        device_error("rw verify restore", e);
    }
    if saved.as_slice() != rbuf.as_slice() {
        outln!("rw mismatch: original contents not restored at LBA {lba}");
        nvme::power_off(EXIT_TEST_FAILED);
    }
    log::info!(target: "selftest", "rw: {}: original contents restored; {} ms", dev.name, (time::now_ns() - t0) / 1_000_000);
}
