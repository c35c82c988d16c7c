//! A session driver for [`Conn`], shared by the unit tests' random quick
//! mode and the cargo-fuzz target `nbd_session` (built with the `fuzzing`
//! feature).
//!
//! [`run`] reads a byte string as a script. Its first bytes choose the
//! export table, `max_in_flight` and whether the client may write
//! ([`Conn::allow_writes`], called before the handshake); the tables hold
//! read-only exports and exports that take writes ([`ExportInfo::writable`]),
//! so a session is read-only, writable, or writable but refused. The rest
//! is a sequence of steps:
//!
//! - the client writes into its "socket": raw garbage, client flags,
//!   well-formed options (LIST, INFO, GO, STRUCTURED_REPLY, EXPORT_NAME,
//!   ABORT, unsupported and oversized ones), well-formed requests with
//!   small random fields, or a flood of one of them. The requests: READ
//!   (with FUA too), WRITE with its payload (a pattern of its own per
//!   write; sometimes cut short, so that what follows is taken as
//!   payload), FLUSH (with and without FUA, with a bad offset or length),
//!   TRIM, WRITE_ZEROES, DISC, CACHE, BLOCK_STATUS and unknown types;
//!   lengths and offsets aligned to the export's minimum block or not,
//!   within the export, at its end, past it, overflowing, zero, over the
//!   maximum block size; flags FUA, NO_HOLE, FAST_ZERO, DF or random;
//! - the kernel side (this driver) moves bytes from the socket into the
//!   connection, at most [`Conn::input_room`] at a time (what is not taken
//!   stays in the socket and is offered again later), and never through
//!   [`Conn::receive`] while a write's payload is pending: then it fills
//!   the write's buffer with [`Conn::take_payload`] in pieces of random
//!   sizes, from the bytes the connection holds and fresh ones from the
//!   socket (those leave the socket), submits the write only when the
//!   call says `done` and then calls [`Conn::resume`];
//! - it consumes some or all of the output and then calls
//!   [`Conn::resume`], takes decoded requests and answers them in any
//!   order: reads with data (a pattern derived from the offset) or an
//!   error through [`Conn::reply_read`] or [`Conn::reply_read_error`];
//!   flushes, trims, write-zeroes and submitted writes with `Ok` or an
//!   error through [`Conn::reply`] (a write whose connection ended in the
//!   middle of its payload too, never submitted);
//! - it closes the peer's side, or ends the connection itself
//!   ([`Conn::end`]), at any point, a payload's middle included.
//!
//! When the script ends the driver drains the connection as a patient
//! client would (reads all output, fills the pending write from the
//! socket, answers every request, offers the rest of the socket) and then
//! closes the peer's side.
//!
//! After every step it asserts (panicking, which the fuzzer and the tests
//! report):
//!
//! - [`Conn::memory`] ≤ [`memory_bound`] and the output waiting stays
//!   within [`OUTPUT_HIGH`] + [`MAX_CONTROL_REPLY`] + the read replies the
//!   driver admitted + the write-side replies it queued since decoding
//!   stopped (at most 16 bytes × `max_in_flight`);
//! - [`Conn::in_flight`] ≤ `max_in_flight` (reads and the write side's
//!   requests together);
//! - a connection whose client sent more while its replies were not read
//!   takes no input (`input_room() == 0`), nor while a payload is pending;
//! - the output consumed so far parses as the server's message stream that
//!   a model of the client's bytes predicts: the greeting, option replies
//!   with their option, type and length (lists whole and in order, INFO/GO
//!   with the export's size, the transmission flags — READ_ONLY or the
//!   write flags, by the export and the client's permission — and the
//!   requested infos), the EXPORT_NAME reply, simple replies and
//!   structured chunks with their magic, handle, error and length; every
//!   request decoded exactly as sent or refused with the error the
//!   protocol's rules give (EPERM, EINVAL, ENOSPC, in the code's order),
//!   each answered exactly once, where the driver answered it, with the
//!   requested length of the right data for reads and the driver's result
//!   for the others;
//! - [`Conn::take_payload`] hands over exactly the bytes held first, then
//!   fresh ones, as much as the buffer and the payload allow, says `done`
//!   exactly at the payload's last byte and never after the connection
//!   ended in its middle; the buffer of a submitted write equals the
//!   bytes the client sent after that write's header; nothing is decoded
//!   past a write before its payload is done;
//! - once drained, nothing is left: every request sent was answered, no
//!   input waits in the socket, the connection is closed when it should be.
//!
//! Replaying a failure: the quick-mode test prints the seed of the failing
//! session; the fuzzer leaves the script in `nbd/fuzz/artifacts/`.

use super::*;
use alloc::collections::BTreeMap;
use alloc::format;
use alloc::string::String;
use alloc::vec;

/// Unconsumed read replies the driver allows itself (like the kernel's
/// per-connection budget): a read is answered only when its reply fits.
pub const READ_BUDGET: usize = (1 << 20) + 64;
/// Largest read the driver answers with data; larger ones get an error.
pub const DATA_MAX: u32 = 1 << 20;

/// An export table for sessions: [`FIXED`] exports of various sizes and
/// block sizes, some taking writes, optionally followed by thousands of
/// generated names (some long, two in three writable) and one name as long
/// as an NBD_OPT_GO can carry with two info requests.
pub struct FakeExports {
    names: Vec<String>,
    infos: Vec<ExportInfo>,
    index: BTreeMap<String, u32>,
}

/// The fixed exports at the start of every table (scripts pick them most).
pub const FIXED: usize = 8;

/// Longest export name in the big table: what NBD_OPT_GO can carry with
/// two info requests (4-byte length, name, 2-byte count, 2 x 2 bytes).
pub const LONGEST_NAME: usize = MAX_OPTION - 10;

impl FakeExports {
    /// `bulk` generated exports after the fixed ones (the long name only
    /// with `bulk > 0`).
    pub fn new(bulk: usize) -> FakeExports {
        let info = |size: u64, min_block: u32, preferred_block: u32, max_block: u32, writable| {
            ExportInfo {
                size,
                min_block,
                preferred_block,
                max_block,
                writable,
                write_block: 0,
            }
        };
        // Writable: a size that is not a multiple of its block (the last
        // block is past the end), a huge one, one of 1-byte blocks and one
        // whose maximum block is small.
        let mut list: Vec<(String, ExportInfo)> = vec![
            ("disk.img".into(), info(1 << 20, 512, 4096, 1 << 20, false)),
            ("tiny".into(), info(1000, 512, 512, 4096, true)),
            ("empty".into(), info(0, 512, 4096, 65536, false)),
            ("nvme0n1".into(), info(1 << 40, 4096, 4096, 64 << 20, true)),
            (
                "dir/ünïcode-名前.bin".into(),
                info(123_456_789, 1, 4096, 128 << 10, true),
            ),
            (
                format!("long/{}", "n".repeat(4091)),
                info(8192, 4096, 4096, 4096, false),
            ),
            ("rw.img".into(), info(1 << 20, 512, 4096, 65536, true)),
            // A writable file: reads of any byte, writes of whole 4 KiB
            // blocks, a size that is not a multiple of them.
            (
                "file.bin".into(),
                ExportInfo {
                    write_block: 4096,
                    ..info(100_000, 1, 4096, 65536, true)
                },
            ),
        ];
        assert_eq!(list.len(), FIXED);
        for i in 0..bulk {
            let pad = if i % 300 == 7 {
                "p".repeat(2000)
            } else {
                "-x".repeat(i % 40)
            };
            let max = [4096, 65536, 1 << 20, 32 << 20][i % 4];
            list.push((
                format!("vol{:02}/export-{i:05}{pad}", i % 50),
                info(
                    (i as u64 + 1) * 4096 * (i as u64 % 7 + 1) + (i as u64 % 3) * 100,
                    [512, 4096][i % 2],
                    4096,
                    max,
                    i % 3 != 0,
                ),
            ));
        }
        if bulk > 0 {
            let mut name = String::from("huge/");
            while name.len() < LONGEST_NAME {
                name.push('h');
            }
            list.push((name, info(1 << 30, 512, 65536, 1 << 20, true)));
        }
        let mut t = FakeExports {
            names: Vec::new(),
            infos: Vec::new(),
            index: BTreeMap::new(),
        };
        for (i, (name, info)) in list.into_iter().enumerate() {
            assert!(name.len() <= LONGEST_NAME);
            t.index.insert(name.clone(), i as u32);
            t.names.push(name);
            t.infos.push(info);
        }
        t
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// Bytes of the NBD_OPT_LIST answer (every SERVER reply and the ACK).
    pub fn list_bytes(&self) -> usize {
        self.names.iter().map(|n| 24 + n.len()).sum::<usize>() + 20
    }
}

impl Exports for FakeExports {
    fn lookup(&self, name: &str) -> Option<(u32, ExportInfo)> {
        let name = name.strip_prefix('/').unwrap_or(name);
        let i = *self.index.get(name)?;
        Some((i, self.infos[i as usize]))
    }
    fn name(&self, index: usize) -> Option<&str> {
        self.names.get(index).map(|s| s.as_str())
    }
}

/// The tables a script chooses from ([`FIXED`] exports, or 3,000 more),
/// and the read data pattern.
pub struct Tables {
    pub small: FakeExports,
    pub big: FakeExports,
    pattern: Vec<u8>,
}

/// Period of the read data pattern: a prime, so that block-aligned offsets
/// see different bytes.
const PERIOD: u64 = 65_521;

impl Tables {
    pub fn new() -> Tables {
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let pattern = (0..PERIOD as usize + DATA_MAX as usize)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 32) as u8
            })
            .collect();
        Tables {
            small: FakeExports::new(0),
            big: FakeExports::new(3000),
            pattern,
        }
    }

    /// The data of export `export` at `offset`: `len` (at most
    /// [`DATA_MAX`]) bytes of a pseudo-random sequence that repeats every
    /// [`PERIOD`] bytes, shifted by the export.
    pub fn data(&self, export: u32, offset: u64, len: u32) -> &[u8] {
        let k = ((offset % PERIOD + 7919 * export as u64) % PERIOD) as usize;
        &self.pattern[k..k + len as usize]
    }
}

impl Tables {
    /// The first `len` bytes (at most [`DATA_MAX`]) of the payload of the
    /// client's write number `w`: the data pattern from a place of its
    /// own, so that a payload handed over shifted, cut short or mixed up
    /// with another write's shows.
    pub fn payload(&self, w: u64, len: u32) -> &[u8] {
        let k = (w.wrapping_mul(7_777) % PERIOD) as usize;
        &self.pattern[k..k + len as usize]
    }
}

impl Default for Tables {
    fn default() -> Self {
        Self::new()
    }
}

/// What a session did (to see that scripts reach deep states).
#[derive(Clone, Copy, Debug, Default)]
pub struct Summary {
    pub steps: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// The connection decoded a GO or EXPORT_NAME.
    pub transmission: bool,
    pub reads_answered: u64,
    /// The client was allowed to write ([`Conn::allow_writes`]).
    pub may_write: bool,
    /// Writes whose payload was handed over whole (submitted).
    pub writes_done: u64,
    /// Writes whose connection ended in the middle of their payload.
    pub writes_cut: u64,
    /// Writes, flushes, trims and write-zeroes answered by the driver.
    pub updates_answered: u64,
    /// Writes, trims and write-zeroes refused when decoded (EPERM,
    /// EINVAL, ENOSPC).
    pub updates_refused: u64,
    pub control_replies: u64,
    /// NBD_OPT_LIST answers parsed whole.
    pub lists: u64,
    /// Steps after which input was held (`input_room() == 0`).
    pub held: u64,
    /// Most output waiting at once, and most memory held at once.
    pub peak_output: usize,
    pub peak_memory: usize,
    /// Why the connection ended before the driver closed the peer's side
    /// at the end (ABORT, DISC, a protocol error), if it did.
    pub closed: Option<CloseReason>,
}

/// Runs one session from `script` (any bytes) and checks every property
/// listed in the module documentation; panics on a violation.
pub fn run(script: &[u8], tables: &Tables) -> Summary {
    let mut s = Script { b: script, at: 0 };
    let ex = if s.u8().is_multiple_of(16) {
        &tables.big
    } else {
        &tables.small
    };
    let b = s.u8();
    let max_in_flight = [1usize, 2, 4, 16, 128, 128, 3, 8][b as usize % 8];
    // The client may write three times in four.
    let may_write = !(b >> 3).is_multiple_of(4);
    let mut d = Driver::new(tables, ex, max_in_flight, may_write);
    d.prologue(&mut s);
    d.check();
    while !s.done() {
        d.step(&mut s);
        d.check();
    }
    d.finish();
    d.sum
}

/// The script being read: past its end every byte reads as zero.
struct Script<'a> {
    b: &'a [u8],
    at: usize,
}

impl Script<'_> {
    fn done(&self) -> bool {
        self.at >= self.b.len()
    }
    fn u8(&mut self) -> u8 {
        let v = self.b.get(self.at).copied().unwrap_or(0);
        self.at += 1;
        v
    }
    fn u16(&mut self) -> u16 {
        u16::from_be_bytes([self.u8(), self.u8()])
    }
    fn u32(&mut self) -> u32 {
        u32::from_be_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }
    fn u64(&mut self) -> u64 {
        ((self.u32() as u64) << 32) | self.u32() as u64
    }
    fn below(&mut self, n: u32) -> u32 {
        if n <= 256 {
            self.u8() as u32 % n.max(1)
        } else {
            self.u32() % n
        }
    }
    /// Up to `below(max)` raw bytes of the script.
    fn raw(&mut self, max: u32) -> Vec<u8> {
        let n = self.below(max) as usize;
        self.bytes(n).to_vec()
    }
    /// Up to `n` raw bytes of the script.
    fn bytes(&mut self, n: usize) -> &[u8] {
        let start = self.at.min(self.b.len());
        let end = (start + n).min(self.b.len());
        self.at = end.max(self.at);
        &self.b[start..end]
    }
}

// ---- the model of the server's output ----

/// One control reply (or a run of them) the client's bytes call for, in
/// order.
#[derive(Debug)]
enum Expect {
    Greeting,
    /// An option reply of type `ty` (ACK: no data; errors: a message).
    Opt {
        option: u32,
        ty: u32,
    },
    /// NBD_INFO_EXPORT for INFO/GO.
    InfoExport {
        option: u32,
        size: u64,
        flags: u16,
    },
    /// NBD_INFO_NAME echoing the requested name.
    InfoName {
        option: u32,
        name: Vec<u8>,
    },
    InfoBlock {
        option: u32,
        info: ExportInfo,
    },
    /// NBD_OPT_LIST: SERVER replies from name `next` on, then the ACK.
    List {
        next: usize,
    },
    ExportName {
        size: u64,
        zeroes: bool,
        flags: u16,
    },
    Simple {
        handle: u64,
        err: u32,
    },
    /// A read refused when decoded (EINVAL), as a chunk with a message
    /// when structured replies are on.
    ReadRefused {
        handle: u64,
        structured: bool,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Flags,
    Options,
    Transmission,
    /// The server closes on what it decoded: nothing after is decoded.
    Closed,
}

/// What the server's reply to a request the driver answered must be.
#[derive(Debug)]
struct Record {
    /// Where the reply starts in the output stream.
    pos: u64,
    ev: Event,
    structured: bool,
    /// `None`: the data (reads) or success; otherwise the error and its
    /// message (reads with structured replies only).
    err: Option<(Errno, String)>,
}

impl Record {
    fn is_read(&self) -> bool {
        matches!(self.ev, Event::Read { .. })
    }

    fn len(&self) -> u64 {
        let Event::Read { len, .. } = self.ev else {
            // The write side: a simple reply.
            return 16;
        };
        match (&self.err, self.structured) {
            (None, true) => 28 + len as u64,
            (None, false) => 16 + len as u64,
            (Some((_, m)), true) => 26 + wire_message(m).len() as u64,
            (Some(_), false) => 16,
        }
    }
}

/// Decodes the bytes the connection took, as the server must, into the
/// replies and requests they call for; parses the consumed output against
/// them.
struct Model {
    phase: Phase,
    /// Taken input not yet decoded.
    inb: Vec<u8>,
    skip: u64,
    no_zeroes: bool,
    structured: bool,
    /// The caller allowed the client to write.
    may_write: bool,
    export: Option<(u32, ExportInfo)>,
    expect: VecDeque<Expect>,
    /// Requests that must come out as events, in order.
    events: VecDeque<Event>,
    /// The payloads of the writes decoded (accepted), by their number in
    /// decoding order: the bytes the connection took after each header.
    payloads: BTreeMap<u64, Vec<u8>>,
    /// Writes decoded so far; payload bytes still to come for the last.
    writes: u64,
    payload_left: u64,
    /// Writes, trims and write-zeroes refused.
    refused: u64,
    /// Replies to requests the driver answered, by position in the output.
    records: VecDeque<Record>,
    /// Consumed output not yet parsed, and the stream position of its
    /// first byte.
    out: Vec<u8>,
    out_at: usize,
    pos: u64,
    lists: u64,
    controls: u64,
}

fn utf8(b: &[u8]) -> Option<&str> {
    core::str::from_utf8(b).ok()
}

impl Model {
    fn new(may_write: bool) -> Model {
        let mut expect = VecDeque::new();
        expect.push_back(Expect::Greeting);
        Model {
            phase: Phase::Flags,
            inb: Vec::new(),
            skip: 0,
            no_zeroes: false,
            structured: false,
            may_write,
            export: None,
            expect,
            events: VecDeque::new(),
            payloads: BTreeMap::new(),
            writes: 0,
            payload_left: 0,
            refused: 0,
            records: VecDeque::new(),
            out: Vec::new(),
            out_at: 0,
            pos: 0,
            lists: 0,
            controls: 0,
        }
    }

    /// Bytes the connection took from the client.
    fn taken(&mut self, ex: &FakeExports, mut data: &[u8]) {
        if self.phase == Phase::Closed {
            return;
        }
        if self.skip > 0 {
            let n = self.skip.min(data.len() as u64) as usize;
            self.skip -= n as u64;
            data = &data[n..];
        }
        if self.payload_left > 0 {
            let n = self.payload_left.min(data.len() as u64) as usize;
            self.payload_left -= n as u64;
            self.payloads
                .entry(self.writes - 1)
                .or_default()
                .extend_from_slice(&data[..n]);
            data = &data[n..];
        }
        self.inb.extend_from_slice(data);
        self.decode(ex);
    }

    fn close(&mut self) {
        self.phase = Phase::Closed;
        self.inb = Vec::new();
        self.skip = 0;
        self.payload_left = 0;
    }

    /// The transmission flags of `info` for this client: HAS_FLAGS,
    /// SEND_FLUSH, CAN_MULTI_CONN and READ_ONLY, or SEND_FUA, SEND_TRIM
    /// and SEND_WRITE_ZEROES instead of READ_ONLY where it writes.
    fn tflags(&self, info: &ExportInfo) -> u16 {
        if info.writable && self.may_write {
            0x016d
        } else {
            0x0107
        }
    }

    fn decode(&mut self, ex: &FakeExports) {
        let inb = core::mem::take(&mut self.inb);
        let mut at = 0;
        loop {
            let avail = &inb[at..];
            match self.phase {
                Phase::Flags => {
                    if avail.len() < 4 {
                        break;
                    }
                    let flags = be32(avail);
                    at += 4;
                    if flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
                        self.close();
                        return;
                    }
                    self.no_zeroes = flags & FLAG_C_NO_ZEROES != 0;
                    self.phase = Phase::Options;
                }
                Phase::Options => {
                    if avail.len() < 16 {
                        break;
                    }
                    if be64(avail) != IHAVEOPT {
                        self.close();
                        return;
                    }
                    let option = be32(&avail[8..]);
                    let len = be32(&avail[12..]) as usize;
                    if len > MAX_OPTION {
                        let here = (avail.len() - 16).min(len);
                        at += 16 + here;
                        self.skip = (len - here) as u64;
                        self.expect.push_back(Expect::Opt {
                            option,
                            ty: rep::ERR_TOO_BIG,
                        });
                        continue;
                    }
                    if avail.len() < 16 + len {
                        break;
                    }
                    at += 16 + len;
                    self.option(ex, option, &avail[16..16 + len]);
                    if self.phase == Phase::Closed {
                        return;
                    }
                }
                Phase::Transmission => {
                    if avail.len() < 28 {
                        break;
                    }
                    if be32(avail) != REQUEST_MAGIC {
                        self.close();
                        return;
                    }
                    let flags = be16(&avail[4..]);
                    let ty = be16(&avail[6..]);
                    let handle = be64(&avail[8..]);
                    let offset = be64(&avail[16..]);
                    let len = be32(&avail[24..]);
                    at += 28;
                    let (export, info) = self.export.expect("transmission without an export");
                    let simple = |err: Errno| Expect::Simple {
                        handle,
                        err: err as u32,
                    };
                    let writes = info.writable && self.may_write;
                    let fua = flags & cflag::FUA != 0;
                    match ty {
                        cmd::READ => {
                            // FUA is taken (and ignored) where announced.
                            let ok = (flags == 0 || (writes && flags == cflag::FUA))
                                && len > 0
                                && len <= info.max_block.min(MAX_REQUEST)
                                && offset
                                    .checked_add(len as u64)
                                    .is_some_and(|e| e <= info.size);
                            if ok {
                                self.events.push_back(Event::Read {
                                    handle,
                                    export,
                                    offset,
                                    len,
                                });
                            } else {
                                self.expect.push_back(Expect::ReadRefused {
                                    handle,
                                    structured: self.structured,
                                });
                            }
                        }
                        cmd::FLUSH => {
                            let fua_ok = if writes { cflag::FUA } else { 0 };
                            if flags & !fua_ok != 0 || offset != 0 || len != 0 {
                                self.expect.push_back(simple(Errno::Inval));
                            } else if writes {
                                self.events.push_back(Event::Flush { handle, export });
                            } else {
                                // Read-only: nothing to make durable.
                                self.expect.push_back(Expect::Simple { handle, err: 0 });
                            }
                        }
                        cmd::DISC => {
                            self.close();
                            return;
                        }
                        cmd::WRITE => match update_error(writes, &info, ty, flags, offset, len) {
                            None => {
                                self.events.push_back(Event::Write {
                                    handle,
                                    export,
                                    offset,
                                    len,
                                    fua,
                                });
                                let here = (inb.len() - at).min(len as usize);
                                self.payloads
                                    .insert(self.writes, inb[at..at + here].to_vec());
                                self.writes += 1;
                                at += here;
                                self.payload_left = len as u64 - here as u64;
                            }
                            Some(e) => {
                                // Refused: the payload is discarded.
                                let here = (inb.len() - at).min(len as usize);
                                at += here;
                                self.skip = len as u64 - here as u64;
                                self.refused += 1;
                                self.expect.push_back(simple(e));
                            }
                        },
                        cmd::TRIM | cmd::WRITE_ZEROES => {
                            match update_error(writes, &info, ty, flags, offset, len) {
                                None if ty == cmd::TRIM => self.events.push_back(Event::Trim {
                                    handle,
                                    export,
                                    offset,
                                    len,
                                    fua,
                                }),
                                None => self.events.push_back(Event::WriteZeroes {
                                    handle,
                                    export,
                                    offset,
                                    len,
                                    fua,
                                    no_hole: flags & cflag::NO_HOLE != 0,
                                }),
                                Some(e) => {
                                    self.refused += 1;
                                    self.expect.push_back(simple(e));
                                }
                            }
                        }
                        _ => self.expect.push_back(simple(Errno::Inval)),
                    }
                }
                Phase::Closed => return,
            }
        }
        let mut inb = inb;
        inb.drain(..at);
        self.inb = inb;
    }

    fn option(&mut self, ex: &FakeExports, option: u32, data: &[u8]) {
        let reply = |ty| Expect::Opt { option, ty };
        match option {
            opt::EXPORT_NAME => match utf8(data).and_then(|n| ex.lookup(n)) {
                Some((id, info)) => {
                    self.expect.push_back(Expect::ExportName {
                        size: info.size,
                        zeroes: !self.no_zeroes,
                        flags: self.tflags(&info),
                    });
                    self.export = Some((id, info));
                    self.phase = Phase::Transmission;
                }
                None => self.close(),
            },
            opt::ABORT => {
                self.expect.push_back(reply(rep::ACK));
                self.close();
            }
            opt::LIST if data.is_empty() => self.expect.push_back(Expect::List { next: 0 }),
            opt::LIST => self.expect.push_back(reply(rep::ERR_INVALID)),
            opt::INFO | opt::GO => {
                let parsed = (|| {
                    let nlen = be32(data.get(0..4)?) as usize;
                    let name = data.get(4..4usize.checked_add(nlen)?)?;
                    let count = be16(data.get(4 + nlen..6 + nlen)?) as usize;
                    let reqs = data.get(6 + nlen..)?;
                    (reqs.len() == 2 * count).then_some((name, reqs))
                })();
                let Some((name, reqs)) = parsed else {
                    self.expect.push_back(reply(rep::ERR_INVALID));
                    return;
                };
                let Some(name_str) = utf8(name) else {
                    self.expect.push_back(reply(rep::ERR_INVALID));
                    return;
                };
                let Some((id, info)) = ex.lookup(name_str) else {
                    self.expect.push_back(reply(rep::ERR_UNKNOWN));
                    return;
                };
                let wants = |t: u16| reqs.chunks_exact(2).any(|c| be16(c) == t);
                self.expect.push_back(Expect::InfoExport {
                    option,
                    size: info.size,
                    flags: self.tflags(&info),
                });
                if wants(info::NAME) {
                    self.expect.push_back(Expect::InfoName {
                        option,
                        name: name.to_vec(),
                    });
                }
                if wants(info::BLOCK_SIZE) {
                    self.expect.push_back(Expect::InfoBlock { option, info });
                }
                self.expect.push_back(reply(rep::ACK));
                if option == opt::GO {
                    self.export = Some((id, info));
                    self.phase = Phase::Transmission;
                }
            }
            opt::STRUCTURED_REPLY if data.is_empty() => {
                self.structured = true;
                self.expect.push_back(reply(rep::ACK));
            }
            opt::STRUCTURED_REPLY => self.expect.push_back(reply(rep::ERR_INVALID)),
            _ => self.expect.push_back(reply(rep::ERR_UNSUP)),
        }
    }

    /// Output the driver consumed.
    fn consumed(&mut self, t: &Tables, ex: &FakeExports, bytes: &[u8]) {
        if self.out_at > 0 && self.out_at * 2 >= self.out.len() {
            self.out.drain(..self.out_at);
            self.out_at = 0;
        }
        self.out.extend_from_slice(bytes);
        self.parse(t, ex);
    }

    /// Unconsumed bytes of read replies (`reads`) or of write-side
    /// replies, `consumed` being the output consumed so far.
    fn pending(&self, consumed: u64, reads: bool) -> u64 {
        self.records
            .iter()
            .filter(|r| r.is_read() == reads)
            .map(|r| (r.pos + r.len()).saturating_sub(r.pos.max(consumed)))
            .sum()
    }

    /// Parses every whole message of the consumed output.
    fn parse(&mut self, t: &Tables, ex: &FakeExports) {
        loop {
            let avail = &self.out[self.out_at..];
            if avail.is_empty() {
                return;
            }
            let n = if self.records.front().is_some_and(|r| r.pos == self.pos) {
                let r = self.records.front().unwrap();
                let n = r.len() as usize;
                if avail.len() < n {
                    return;
                }
                check_reply(t, r, &avail[..n]);
                self.records.pop_front();
                n
            } else {
                let pos = self.pos;
                let Some(e) = self.expect.front_mut() else {
                    panic!(
                        "output at {pos} answers nothing the client sent: {:02x?}",
                        &avail[..avail.len().min(40)]
                    );
                };
                let Some((n, done)) = parse_control(e, avail, ex, pos) else {
                    return;
                };
                if done {
                    if matches!(e, Expect::List { .. }) {
                        self.lists += 1;
                    }
                    self.expect.pop_front();
                }
                self.controls += 1;
                n
            };
            self.out_at += n;
            self.pos += n as u64;
            if let Some(r) = self.records.front() {
                assert!(
                    r.pos >= self.pos,
                    "a message ending at {} overlaps the reply to read {:?} placed at {}",
                    self.pos,
                    r.ev,
                    r.pos
                );
            }
        }
    }
}

/// The error the protocol's rules give a WRITE, TRIM or WRITE_ZEROES
/// (command `ty`) on an export described by `info`, where the client
/// writes or not (`writes`); `None`: served. In the order of the code's
/// checks: EPERM where the client may not write; EINVAL for a flag the
/// command does not take (FUA, NO_HOLE for write-zeroes), a zero length,
/// a write over the maximum block size announced, a write or write-zeroes
/// not aligned to the minimum block size; past the end ENOSPC, EINVAL for
/// a trim.
fn update_error(
    writes: bool,
    info: &ExportInfo,
    ty: u16,
    flags: u16,
    offset: u64,
    len: u32,
) -> Option<Errno> {
    if !writes {
        return Some(Errno::Perm);
    }
    let takes = if ty == cmd::WRITE_ZEROES {
        cflag::FUA | cflag::NO_HOLE
    } else {
        cflag::FUA
    };
    let block = info.min_block.max(info.write_block).max(1) as u64;
    let unaligned = !offset.is_multiple_of(block) || !(len as u64).is_multiple_of(block);
    if flags & !takes != 0
        || len == 0
        || (ty == cmd::WRITE && len > info.max_block.min(MAX_REQUEST))
        || (ty != cmd::TRIM && unaligned)
    {
        return Some(Errno::Inval);
    }
    if offset as u128 + len as u128 > info.size as u128 {
        return Some(if ty == cmd::TRIM {
            Errno::Inval
        } else {
            Errno::NoSpc
        });
    }
    None
}

/// An error message as the server must send it: UTF-8 of at most 4096
/// bytes, cut at a character boundary.
fn wire_message(m: &str) -> &str {
    let mut n = m.len().min(4096);
    while !m.is_char_boundary(n) {
        n -= 1;
    }
    &m[..n]
}

fn check_reply(t: &Tables, r: &Record, b: &[u8]) {
    let at = r.pos;
    let Event::Read {
        handle,
        export,
        offset,
        len,
    } = r.ev
    else {
        let handle = match r.ev {
            Event::Write { handle, .. }
            | Event::Flush { handle, .. }
            | Event::Trim { handle, .. }
            | Event::WriteZeroes { handle, .. } => handle,
            Event::Read { .. } => unreachable!(),
        };
        let err = r.err.as_ref().map_or(0, |(e, _)| *e as u32);
        assert_eq!(be32(b), SIMPLE_REPLY_MAGIC, "reply magic at {at}");
        assert_eq!(be32(&b[4..]), err, "reply error at {at} to {:?}", r.ev);
        assert_eq!(be64(&b[8..]), handle, "reply handle at {at}");
        return;
    };
    match (&r.err, r.structured) {
        (None, true) => {
            assert_eq!(be32(b), STRUCTURED_REPLY_MAGIC, "read chunk magic at {at}");
            assert_eq!(be16(&b[4..]), chunk::FLAG_DONE, "read chunk flags at {at}");
            assert_eq!(be16(&b[6..]), chunk::OFFSET_DATA, "read chunk type at {at}");
            assert_eq!(be64(&b[8..]), handle, "read chunk handle at {at}");
            assert_eq!(be32(&b[16..]), 8 + len, "read chunk length at {at}");
            assert_eq!(be64(&b[20..]), offset, "read chunk offset at {at}");
            check_data(t.data(export, offset, len), &b[28..], at);
        }
        (None, false) => {
            assert_eq!(be32(b), SIMPLE_REPLY_MAGIC, "read reply magic at {at}");
            assert_eq!(be32(&b[4..]), 0, "read reply error at {at}");
            assert_eq!(be64(&b[8..]), handle, "read reply handle at {at}");
            check_data(t.data(export, offset, len), &b[16..], at);
        }
        (Some((e, msg)), true) => {
            let m = wire_message(msg).as_bytes();
            assert_eq!(be32(b), STRUCTURED_REPLY_MAGIC, "error chunk magic at {at}");
            assert_eq!(be16(&b[4..]), chunk::FLAG_DONE, "error chunk flags at {at}");
            assert_eq!(be16(&b[6..]), chunk::ERROR, "error chunk type at {at}");
            assert_eq!(be64(&b[8..]), handle, "error chunk handle at {at}");
            assert_eq!(
                be32(&b[16..]) as usize,
                6 + m.len(),
                "error chunk length at {at}"
            );
            assert_eq!(be32(&b[20..]), *e as u32, "error chunk error at {at}");
            assert_eq!(
                be16(&b[24..]) as usize,
                m.len(),
                "error message length at {at}"
            );
            assert_eq!(&b[26..], m, "error message at {at}");
        }
        (Some((e, _)), false) => {
            assert_eq!(be32(b), SIMPLE_REPLY_MAGIC, "read reply magic at {at}");
            assert_eq!(be32(&b[4..]), *e as u32, "read reply error at {at}");
            assert_eq!(be64(&b[8..]), handle, "read reply handle at {at}");
        }
    }
}

fn check_data(want: &[u8], got: &[u8], at: u64) {
    if want != got {
        let i = want.iter().zip(got).position(|(a, b)| a != b).unwrap_or(0);
        panic!("read data at {at} differs from byte {i} on");
    }
}

/// Parses the next message for `e` from `b` (stream position `pos`):
/// `None` when it is not all there yet, else the bytes it took and whether
/// `e` is complete.
fn parse_control(e: &mut Expect, b: &[u8], ex: &FakeExports, pos: u64) -> Option<(usize, bool)> {
    // Option replies: header and data.
    let opt_reply = |b: &[u8], option: u32| -> Option<(u32, usize)> {
        if b.len() < 20 {
            return None;
        }
        assert_eq!(be64(b), REPLY_MAGIC, "option reply magic at {pos}");
        assert_eq!(be32(&b[8..]), option, "option reply's option at {pos}");
        let len = be32(&b[16..]) as usize;
        if b.len() < 20 + len {
            return None;
        }
        Some((be32(&b[12..]), len))
    };
    match e {
        Expect::Greeting => {
            if b.len() < 18 {
                return None;
            }
            assert_eq!(&b[..18], b"NBDMAGICIHAVEOPT\x00\x03", "greeting");
            Some((18, true))
        }
        Expect::Opt { option, ty } => {
            let (t, len) = opt_reply(b, *option)?;
            assert_eq!(t, *ty, "reply type to option {option} at {pos}");
            if *ty == rep::ACK {
                assert_eq!(len, 0, "ACK with data at {pos}");
            } else {
                assert!(
                    len > 0 && utf8(&b[20..20 + len]).is_some(),
                    "error message at {pos}"
                );
            }
            Some((20 + len, true))
        }
        Expect::InfoExport {
            option,
            size,
            flags,
        } => {
            let (t, len) = opt_reply(b, *option)?;
            assert_eq!((t, len), (rep::INFO, 12), "NBD_INFO_EXPORT at {pos}");
            assert_eq!(be16(&b[20..]), info::EXPORT, "NBD_INFO_EXPORT at {pos}");
            assert_eq!(be64(&b[22..]), *size, "export size at {pos}");
            assert_eq!(be16(&b[30..]), *flags, "transmission flags at {pos}");
            Some((32, true))
        }
        Expect::InfoName { option, name } => {
            let (t, len) = opt_reply(b, *option)?;
            assert_eq!(
                (t, len),
                (rep::INFO, 2 + name.len()),
                "NBD_INFO_NAME at {pos}"
            );
            assert_eq!(be16(&b[20..]), info::NAME, "NBD_INFO_NAME at {pos}");
            assert!(b[22..22 + name.len()] == name[..], "NBD_INFO_NAME at {pos}");
            Some((20 + len, true))
        }
        Expect::InfoBlock { option, info } => {
            let (t, len) = opt_reply(b, *option)?;
            assert_eq!((t, len), (rep::INFO, 14), "NBD_INFO_BLOCK_SIZE at {pos}");
            assert_eq!(
                be16(&b[20..]),
                info::BLOCK_SIZE,
                "NBD_INFO_BLOCK_SIZE at {pos}"
            );
            let sizes = (be32(&b[22..]), be32(&b[26..]), be32(&b[30..]));
            let want = (
                info.min_block,
                info.preferred_block,
                info.max_block.min(MAX_REQUEST),
            );
            assert_eq!(sizes, want, "block sizes at {pos}");
            Some((34, true))
        }
        Expect::List { next } => {
            let (t, len) = opt_reply(b, opt::LIST)?;
            match ex.name(*next) {
                Some(name) => {
                    assert_eq!(t, rep::SERVER, "list entry {next} at {pos}");
                    assert_eq!(len, 4 + name.len(), "list entry {next} at {pos}");
                    assert_eq!(
                        be32(&b[20..]) as usize,
                        name.len(),
                        "list entry {next} at {pos}"
                    );
                    assert!(
                        &b[24..20 + len] == name.as_bytes(),
                        "list entry {next} at {pos}"
                    );
                    *next += 1;
                    Some((20 + len, false))
                }
                None => {
                    assert_eq!((t, len), (rep::ACK, 0), "list end at {pos}");
                    Some((20, true))
                }
            }
        }
        Expect::ExportName {
            size,
            zeroes,
            flags,
        } => {
            let n = if *zeroes { 134 } else { 10 };
            if b.len() < n {
                return None;
            }
            assert_eq!(be64(b), *size, "EXPORT_NAME reply size at {pos}");
            assert_eq!(be16(&b[8..]), *flags, "EXPORT_NAME reply flags at {pos}");
            assert!(
                b[10..n].iter().all(|&z| z == 0),
                "EXPORT_NAME zeroes at {pos}"
            );
            Some((n, true))
        }
        Expect::Simple { handle, err } => {
            if b.len() < 16 {
                return None;
            }
            assert_eq!(be32(b), SIMPLE_REPLY_MAGIC, "simple reply magic at {pos}");
            assert_eq!(be64(&b[8..]), *handle, "simple reply handle at {pos}");
            assert_eq!(be32(&b[4..]), *err, "simple reply error at {pos}");
            Some((16, true))
        }
        Expect::ReadRefused {
            handle,
            structured: false,
        } => {
            if b.len() < 16 {
                return None;
            }
            assert_eq!(be32(b), SIMPLE_REPLY_MAGIC, "simple reply magic at {pos}");
            assert_eq!(be64(&b[8..]), *handle, "refused read's handle at {pos}");
            assert_eq!(be32(&b[4..]), Errno::Inval as u32, "refused read at {pos}");
            Some((16, true))
        }
        Expect::ReadRefused {
            handle,
            structured: true,
        } => {
            if b.len() < 20 {
                return None;
            }
            assert_eq!(
                be32(b),
                STRUCTURED_REPLY_MAGIC,
                "error chunk magic at {pos}"
            );
            assert_eq!(
                be16(&b[4..]),
                chunk::FLAG_DONE,
                "error chunk flags at {pos}"
            );
            assert_eq!(be16(&b[6..]), chunk::ERROR, "error chunk type at {pos}");
            assert_eq!(be64(&b[8..]), *handle, "refused read's handle at {pos}");
            let len = be32(&b[16..]) as usize;
            assert!(len >= 6, "error chunk length at {pos}");
            if b.len() < 20 + len {
                return None;
            }
            assert_eq!(be32(&b[20..]), Errno::Inval as u32, "refused read at {pos}");
            let m = be16(&b[24..]) as usize;
            assert!(m > 0 && m + 6 == len, "error message length at {pos}");
            assert!(utf8(&b[26..26 + m]).is_some(), "error message at {pos}");
            Some((20 + len, true))
        }
    }
}

// ---- the driver ----

/// An option as a client sends it (also used by the unit tests).
pub(crate) fn option_bytes(code: u32, data: &[u8]) -> Vec<u8> {
    let mut v = IHAVEOPT.to_be_bytes().to_vec();
    v.extend_from_slice(&code.to_be_bytes());
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(data);
    v
}

/// A transmission request header (also used by the unit tests).
pub(crate) fn request_bytes(ty: u16, flags: u16, handle: u64, offset: u64, len: u32) -> Vec<u8> {
    let mut v = REQUEST_MAGIC.to_be_bytes().to_vec();
    v.extend_from_slice(&flags.to_be_bytes());
    v.extend_from_slice(&ty.to_be_bytes());
    v.extend_from_slice(&handle.to_be_bytes());
    v.extend_from_slice(&offset.to_be_bytes());
    v.extend_from_slice(&len.to_be_bytes());
    v
}

/// NBD_OPT_INFO/GO data: name length, name, count, info requests.
pub(crate) fn go_data(name: &[u8], infos: &[u16]) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name);
    d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for i in infos {
        d.extend_from_slice(&i.to_be_bytes());
    }
    d
}

/// Where a request taken from the connection stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fill {
    /// May be answered: not a write, or a write whose payload was handed
    /// over whole (submitted).
    Ready,
    /// A write whose payload is being handed over.
    Filling,
    /// A write whose connection ended in the middle of its payload: never
    /// submitted, answered all the same.
    Cut,
}

/// A request taken from the connection, not yet answered.
struct Taken {
    ev: Event,
    fill: Fill,
    /// A write's number among the writes taken (the model's numbering),
    /// its buffer and how much of it was filled.
    serial: u64,
    buf: Vec<u8>,
    filled: usize,
}

fn handle_of(ev: &Event) -> u64 {
    match *ev {
        Event::Read { handle, .. }
        | Event::Write { handle, .. }
        | Event::Flush { handle, .. }
        | Event::Trim { handle, .. }
        | Event::WriteZeroes { handle, .. } => handle,
    }
}

struct Driver<'e> {
    t: &'e Tables,
    ex: &'e FakeExports,
    conn: Conn,
    max_in_flight: usize,
    bound: usize,
    /// Client bytes in the socket, not yet taken: `socket[sock_at..]`.
    socket: Vec<u8>,
    sock_at: usize,
    model: Model,
    /// Requests taken from the connection, not yet answered.
    taken: Vec<Taken>,
    /// Writes taken so far.
    writes: u64,
    /// Output consumed so far.
    consumed: u64,
    peer_closed: bool,
    /// The driver ended the connection ([`Conn::end`]).
    ended: bool,
    /// The export the client last asked to open (for plausible requests).
    target: Option<ExportInfo>,
    /// The client flags were written.
    flags_sent: bool,
    /// WRITE requests the client generated (for their payload patterns).
    client_writes: u64,
    sum: Summary,
}

impl<'e> Driver<'e> {
    fn new(t: &'e Tables, ex: &'e FakeExports, max_in_flight: usize, may_write: bool) -> Self {
        let mut conn = Conn::new(max_in_flight);
        conn.allow_writes(may_write);
        Driver {
            t,
            ex,
            conn,
            max_in_flight,
            bound: memory_bound(max_in_flight, READ_BUDGET),
            socket: Vec::new(),
            sock_at: 0,
            model: Model::new(may_write),
            taken: Vec::new(),
            writes: 0,
            consumed: 0,
            peer_closed: false,
            ended: false,
            target: None,
            flags_sent: false,
            client_writes: 0,
            sum: Summary {
                may_write,
                ..Summary::default()
            },
        }
    }

    fn sock(&self) -> &[u8] {
        &self.socket[self.sock_at..]
    }

    fn write(&mut self, b: &[u8]) {
        if self.sock_at > 0 && self.sock_at * 2 >= self.socket.len() {
            self.socket.drain(..self.sock_at);
            self.sock_at = 0;
        }
        self.socket.extend_from_slice(b);
    }

    /// Invariants that hold between any two steps.
    fn check(&mut self) {
        let c = &self.conn;
        let mem = c.memory();
        assert!(
            mem <= self.bound,
            "memory {mem} above the bound {} (output waiting {}, in flight {})",
            self.bound,
            c.output_pending(),
            c.in_flight()
        );
        // Write-side replies are queued whatever the output waiting, but
        // once decoding stops (OUTPUT_HIGH) only the requests then in
        // flight can add theirs.
        let reads = self.model.pending(self.consumed, true) as usize;
        let updates =
            (self.model.pending(self.consumed, false) as usize).min(16 * self.max_in_flight);
        assert!(
            c.output_pending() <= OUTPUT_HIGH + MAX_CONTROL_REPLY + reads + updates,
            "output waiting {} above OUTPUT_HIGH + MAX_CONTROL_REPLY + {reads} bytes of read replies + {updates} of write-side replies",
            c.output_pending()
        );
        assert!(
            c.in_flight() <= self.max_in_flight,
            "{} requests in flight, limit {}",
            c.in_flight(),
            self.max_in_flight
        );
        assert!(c.in_flight() >= self.taken.len());
        if c.payload_pending() > 0 {
            assert_eq!(c.input_room(), 0, "input room while a payload is pending");
            assert!(c.in_transmission(), "a payload pending out of transmission");
            match self.taken.iter().find(|t| t.fill == Fill::Filling) {
                Some(w) => assert_eq!(
                    c.payload_pending() as usize,
                    w.buf.len() - w.filled,
                    "payload pending for {:?}",
                    w.ev
                ),
                None => assert!(
                    c.peek_event().is_some(),
                    "a payload pending and no write for it"
                ),
            }
        }
        // A client that sends while its replies wait is held (unless its
        // bytes are being discarded: a write payload, an oversized option).
        let open = !self.peer_closed && self.model.phase != Phase::Closed;
        if open && self.model.skip == 0 {
            let reads_full = c.in_transmission() && c.in_flight() >= self.max_in_flight;
            if c.output_pending() >= OUTPUT_HIGH || reads_full {
                assert_eq!(c.input_room(), 0, "input taken while the client is behind");
            }
        }
        if c.input_room() == 0 {
            self.sum.held += 1;
        }
        if c.in_transmission() {
            self.sum.transmission = true;
        }
        self.sum.peak_output = self.sum.peak_output.max(c.output_pending());
        self.sum.peak_memory = self.sum.peak_memory.max(mem);
    }

    /// Offers up to `n` socket bytes, no more than the connection has room
    /// for (or, with `over`, the whole socket: it must still take no more
    /// than it can hold). While a write's payload is pending the bytes go
    /// to its buffer instead ([`Driver::fill`]), never to
    /// [`Conn::receive`].
    fn deliver(&mut self, n: usize, over: bool) {
        if self.peer_closed {
            return;
        }
        if self.conn.payload_pending() > 0 {
            let n = if over { usize::MAX } else { n };
            self.fill(n, n);
            return;
        }
        let room = self.conn.input_room();
        let n = if over {
            self.sock().len()
        } else {
            n.min(room).min(self.sock().len())
        };
        if n == 0 {
            return;
        }
        let offered = &self.socket[self.sock_at..self.sock_at + n];
        let taken = self.conn.receive(self.ex, offered);
        assert!(taken <= n, "took {taken} of {n} bytes offered");
        if !over {
            // Offered within its room, it takes everything.
            assert_eq!(
                taken, n,
                "took {taken} of {n} bytes offered within its room"
            );
        }
        self.model
            .taken(self.ex, &self.socket[self.sock_at..self.sock_at + taken]);
        self.sock_at += taken;
        self.sum.bytes_in += taken as u64;
    }

    /// Hands the write being filled (if any, and taken) up to `piece`
    /// more bytes of its payload through [`Conn::take_payload`]: the
    /// bytes the connection holds, then up to `fresh` bytes from the
    /// socket. Checks exactly what it hands over; on `done` compares the
    /// buffer with what the client sent, submits and resumes.
    fn fill(&mut self, piece: usize, fresh: usize) {
        let Some(i) = self.taken.iter().position(|t| t.fill == Fill::Filling) else {
            return;
        };
        let pending = self.conn.payload_pending() as usize;
        let avail = self.socket.len() - self.sock_at;
        let w = &mut self.taken[i];
        let rem = w.buf.len() - w.filled;
        if pending == 0 {
            // The connection ended in the middle of the payload (the peer
            // closed, the driver ended it): nothing more is handed over,
            // and the write is never done.
            assert!(
                !self.conn.in_transmission(),
                "the payload of {:?} vanished",
                w.ev
            );
            let p = self
                .conn
                .take_payload(&self.socket[self.sock_at..], &mut w.buf[w.filled..]);
            let none = Payload {
                from_data: 0,
                written: 0,
                done: false,
            };
            assert_eq!(p, none, "a write cut short goes on: {:?}", w.ev);
            w.fill = Fill::Cut;
            self.sum.writes_cut += 1;
            return;
        }
        assert_eq!(pending, rem, "payload pending for {:?}", w.ev);
        // What the connection holds of it: the payload bytes it took,
        // less those handed over.
        let held = self.model.payloads.get(&w.serial).map_or(0, |p| p.len()) - w.filled;
        let k = piece.min(rem);
        let f = fresh.min(avail);
        let want = k.min(pending);
        let h = held.min(want);
        let from_data = f.min(want - h);
        let written = h + from_data;
        let expected = Payload {
            from_data,
            written,
            done: written > 0 && written == pending,
        };
        let p = self.conn.take_payload(
            &self.socket[self.sock_at..self.sock_at + f],
            &mut w.buf[w.filled..w.filled + k],
        );
        assert_eq!(
            p, expected,
            "take_payload of {f} fresh bytes into {k} with {held} held, {pending} pending for {:?}",
            w.ev
        );
        assert_eq!(self.conn.payload_pending() as usize, pending - written);
        self.model.taken(
            self.ex,
            &self.socket[self.sock_at..self.sock_at + from_data],
        );
        self.sock_at += from_data;
        self.sum.bytes_in += from_data as u64;
        w.filled += written;
        if p.done {
            let sent = self
                .model
                .payloads
                .remove(&w.serial)
                .expect("the model saw the payload");
            assert_eq!(sent.len(), w.buf.len(), "payload length of {:?}", w.ev);
            if sent != w.buf {
                let at = sent.iter().zip(&w.buf).position(|(a, b)| a != b);
                panic!(
                    "the payload of {:?} differs from the client's from byte {at:?} on",
                    w.ev
                );
            }
            // Submitted; the requests after it may be decoded now.
            w.fill = Fill::Ready;
            w.buf = Vec::new();
            self.sum.writes_done += 1;
            self.conn.resume(self.ex);
        }
    }

    /// Consumes up to `n` bytes of output, parses them, resumes.
    fn consume(&mut self, n: usize) {
        let mut n = n.min(self.conn.output_pending());
        while n > 0 {
            let k = n.min(self.conn.output().len());
            assert!(k > 0, "output() empty while {n} bytes wait");
            self.model
                .consumed(self.t, self.ex, &self.conn.output()[..k]);
            self.conn.consume_output(k);
            self.consumed += k as u64;
            self.sum.bytes_out += k as u64;
            n -= k;
        }
        self.conn.resume(self.ex);
    }

    /// Takes up to `n` decoded requests; each must be the next one the
    /// client's bytes call for.
    fn take_events(&mut self, n: usize) {
        for _ in 0..n {
            let peeked = self.conn.peek_event().copied();
            let Some(ev) = self.conn.next_event() else {
                return;
            };
            assert_eq!(peeked, Some(ev));
            let want = self.model.events.pop_front();
            assert_eq!(Some(ev), want, "decoded request differs from the one sent");
            let mut t = Taken {
                ev,
                fill: Fill::Ready,
                serial: 0,
                buf: Vec::new(),
                filled: 0,
            };
            if let Event::Write { len, .. } = ev {
                assert!(
                    self.taken.iter().all(|t| t.fill != Fill::Filling),
                    "{ev:?} decoded before the payload ahead of it was done"
                );
                let pending = self.conn.payload_pending();
                assert!(
                    pending == len || (pending == 0 && !self.conn.in_transmission()),
                    "{pending} payload bytes pending as {ev:?} is taken"
                );
                t.fill = Fill::Filling;
                t.serial = self.writes;
                self.writes += 1;
                t.buf = vec![0; len as usize];
            }
            self.taken.push(t);
        }
    }

    /// The first taken request that may be answered.
    fn answerable(&self) -> Option<usize> {
        self.taken.iter().position(|t| t.fill != Fill::Filling)
    }

    /// Answers taken request `i` (not a write still being filled). A read
    /// (`how`: 0 data, 1 `reply_read` error, 2 `reply_read_error` with a
    /// message of `msg_len` bytes) not while the reply would exceed the
    /// read budget; the others with `Ok` (`how` 0) or `errno`. Returns
    /// whether it did.
    fn answer(&mut self, i: usize, how: u8, errno: Errno, msg_len: usize) -> bool {
        let Some(t) = self.taken.get(i) else {
            return false;
        };
        if t.fill == Fill::Filling {
            return false;
        }
        let ev = t.ev;
        let Event::Read {
            handle,
            export,
            offset,
            len,
        } = ev
        else {
            return self.answer_update(i, how == 0, errno);
        };
        let how = if len > DATA_MAX { how.max(1) } else { how };
        let msg: String = match how {
            0 => String::new(),
            1 => errno.message().into(),
            // Odd lengths: a 'é' straddles byte 4096 of the long one.
            _ if msg_len % 2 == 1 => "éa".chars().cycle().take(msg_len).collect(),
            _ => "é-message ".chars().cycle().take(msg_len).collect(),
        };
        let structured = self.model.structured;
        let record = Record {
            pos: self.consumed + self.conn.output_pending() as u64,
            ev,
            structured,
            err: (how != 0).then(|| (errno, msg.clone())),
        };
        let pending = self.model.pending(self.consumed, true);
        if pending + record.len() > READ_BUDGET as u64 {
            return false;
        }
        self.taken.swap_remove(i);
        let before = self.conn.output_pending();
        let closed = self.conn.is_closed();
        match how {
            0 => {
                let data = self.t.data(export, offset, len);
                self.conn.reply_read(self.ex, handle, offset, Ok(data));
            }
            1 => self.conn.reply_read(self.ex, handle, offset, Err(errno)),
            _ => self.conn.reply_read_error(self.ex, handle, errno, &msg),
        }
        if !closed {
            assert!(
                self.conn.output_pending() >= before + record.len() as usize,
                "the reply to read {ev:?} is missing"
            );
            self.model.records.push_back(record);
        }
        self.sum.reads_answered += 1;
        true
    }

    /// Answers taken write-side request `i` through [`Conn::reply`]:
    /// `Ok` or `errno`.
    fn answer_update(&mut self, i: usize, ok: bool, errno: Errno) -> bool {
        let t = self.taken.swap_remove(i);
        let result = if ok { Ok(()) } else { Err(errno) };
        let record = Record {
            pos: self.consumed + self.conn.output_pending() as u64,
            ev: t.ev,
            structured: false,
            err: result.err().map(|e| (e, String::new())),
        };
        let before = self.conn.output_pending();
        let closed = self.conn.is_closed();
        self.conn.reply(self.ex, handle_of(&t.ev), result);
        if !closed {
            assert!(
                self.conn.output_pending() >= before + 16,
                "the reply to {:?} is missing",
                t.ev
            );
            self.model.records.push_back(record);
        }
        self.sum.updates_answered += 1;
        true
    }

    /// The caller ends the connection ([`Conn::end`]), as the service's
    /// guard does: nothing more is decoded.
    fn end(&mut self) {
        if !self.peer_closed && !self.ended {
            self.ended = true;
            self.conn.end(CloseReason::Unserved);
            self.model.close();
        }
    }

    fn close_peer(&mut self) {
        if !self.peer_closed {
            self.peer_closed = true;
            self.conn.peer_closed();
        }
    }

    /// The script's opening: nothing, the client flags, or the flags and
    /// an NBD_OPT_GO of a known export (after STRUCTURED_REPLY, maybe),
    /// so that most scripts reach transmission.
    fn prologue(&mut self, s: &mut Script) {
        let how = s.u8();
        if how.is_multiple_of(4) && how & 16 == 0 {
            return;
        }
        self.flags_sent = true;
        let flags = if how & 4 == 0 {
            FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES
        } else {
            FLAG_C_FIXED_NEWSTYLE
        };
        self.write(&flags.to_be_bytes());
        if how % 4 == 1 {
            return;
        }
        if how % 4 == 3 {
            self.write(&option_bytes(opt::STRUCTURED_REPLY, &[]));
        }
        let i = if how & 8 == 0 {
            (how >> 4) as usize % FIXED
        } else {
            s.u16() as usize % self.ex.len()
        };
        let name = self.ex.names[i].clone();
        self.target = Some(self.ex.infos[i]);
        self.write(&option_bytes(opt::GO, &go_data(name.as_bytes(), &[])));
    }

    fn step(&mut self, s: &mut Script) {
        self.sum.steps += 1;
        let op = s.u8() % 32;
        // Garbage and stray flags: one time in four (they end most
        // sessions).
        let op = if op < 2 && s.below(4) != 0 { 2 } else { op };
        match op {
            0 => {
                let b = s.raw(48);
                self.write(&b);
            }
            1 => {
                self.flags_sent = true;
                let f = match s.below(8) {
                    0 => FLAG_C_FIXED_NEWSTYLE,
                    1 => 0,
                    2 => FLAG_C_NO_ZEROES,
                    3 => s.u32(),
                    _ => FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES,
                };
                self.write(&f.to_be_bytes());
            }
            2..=11 => {
                // Mostly what the phase calls for (the flags, options until
                // a GO or EXPORT_NAME of a known export was sent, then
                // requests).
                if !self.flags_sent {
                    self.flags_sent = true;
                    self.write(&FLAG_C_FIXED_NEWSTYLE.to_be_bytes());
                }
                let request = self.target.is_some() != (s.below(32) == 0);
                let piece = if request {
                    self.gen_request(s)
                } else {
                    self.gen_option(s)
                };
                self.write(&piece);
            }
            12 => {
                // A flood of one piece: requests by the thousand (at most
                // 128 KiB of them), options by the dozen (a LIST of the big
                // table answers 300 KiB).
                let request = s.below(4) != 0;
                let piece = if request {
                    self.gen_request(s)
                } else {
                    self.gen_option(s)
                };
                let count = if request {
                    // Read data counts too: at most 1 MiB answered.
                    let data = if be16(&piece[6..]) == cmd::READ {
                        be32(&piece[24..]).min(DATA_MAX) as usize
                    } else {
                        0
                    };
                    let n = (1usize << s.below(13)) + s.below(64) as usize;
                    n.min((128 << 10) / piece.len())
                        .min((1 << 20) / data.max(1))
                        .max(1)
                } else {
                    (1 + s.below(16) as usize)
                        .min((128 << 10) / piece.len())
                        .max(1)
                };
                for _ in 0..count {
                    self.write(&piece);
                }
            }
            13..=15 => {
                let n = match s.below(4) {
                    0 => 1 + s.below(8) as usize,
                    1 => s.below(512) as usize,
                    2 => s.below(INPUT_CAP as u32 + 1) as usize,
                    _ => usize::MAX,
                };
                let over = s.below(8) == 0;
                self.deliver(n, over);
            }
            16 => {
                // A piece of a pending payload: held bytes only, a few
                // fresh ones, or whatever is there; into a buffer piece
                // that may be empty.
                let piece = match s.below(4) {
                    0 => s.below(9) as usize,
                    1 => s.below(1024) as usize,
                    2 => s.below(1 << 17) as usize,
                    _ => usize::MAX,
                };
                let fresh = match s.below(4) {
                    0 => 0,
                    1 => 1 + s.below(16) as usize,
                    2 => s.below(1 << 17) as usize,
                    _ => usize::MAX,
                };
                self.fill(piece, fresh);
            }
            17..=20 => {
                let n = match s.below(4) {
                    0 => 1 + s.below(8) as usize,
                    1 => s.below(1024) as usize,
                    2 => s.below(1 << 20) as usize,
                    _ => usize::MAX,
                };
                self.consume(n);
            }
            21 | 22 => {
                let max = if s.below(2) == 0 { 4 } else { 256 };
                let n = 1 + s.below(max) as usize;
                self.take_events(n);
            }
            23..=25 => {
                let n = 1 + s.below(4) as usize;
                for _ in 0..n {
                    let i = s.below(self.taken.len().max(1) as u32) as usize;
                    let how = [0, 0, 0, 1, 2][s.below(5) as usize];
                    let errno = [
                        Errno::Io,
                        Errno::NoMem,
                        Errno::Inval,
                        Errno::Shutdown,
                        Errno::Perm,
                        Errno::NoSpc,
                    ][s.below(6) as usize];
                    let msg_len = [0, 1, 30, 5000, 5001][s.below(5) as usize];
                    self.answer(i, how, errno, msg_len);
                }
            }
            26 => match s.below(8) {
                0 | 1 => self.close_peer(),
                2 => self.end(),
                _ => {}
            },
            _ => {
                // The kernel's loop, once: take room's worth (or fill the
                // pending write), take requests, answer what the budget
                // allows, send some of the output.
                self.deliver(usize::MAX, false);
                self.take_events(usize::MAX);
                self.fill(usize::MAX, usize::MAX);
                while let Some(i) = self.answerable() {
                    if !self.answer(i, 0, Errno::Io, 0) {
                        break;
                    }
                }
                let n = s.u16() as usize * 16;
                self.consume(n);
            }
        }
    }

    /// An export name: one of the table (maybe with a leading slash), or
    /// a near miss, or random bytes.
    fn gen_name(&mut self, s: &mut Script) -> Vec<u8> {
        let n = self.ex.len() as u32;
        let i = if s.below(2) == 0 {
            s.below(FIXED as u32)
        } else {
            s.u16() as u32 % n
        };
        let name = self.ex.names[i as usize].as_bytes();
        match s.below(10) {
            0 => [b"/", name].concat(),
            1 => [name, b"x"].concat(),
            2 => s.raw(12),
            3 => Vec::new(),
            _ => name.to_vec(),
        }
    }

    fn gen_option(&mut self, s: &mut Script) -> Vec<u8> {
        let (code, data): (u32, Vec<u8>) = match s.below(16) {
            0..=2 => (opt::LIST, Vec::new()),
            3 => (opt::LIST, [&[0x55][..], &s.raw(8)].concat()),
            4..=7 => {
                let code = if s.below(3) == 0 { opt::INFO } else { opt::GO };
                let name = self.gen_name(s);
                let mut infos = Vec::new();
                for _ in 0..s.below(4) {
                    let t = match s.below(5) {
                        0 => info::NAME,
                        1 => info::BLOCK_SIZE,
                        2 => info::EXPORT,
                        3 => info::DESCRIPTION,
                        _ => s.u16(),
                    };
                    infos.push(t);
                }
                let mut d = go_data(&name, &infos);
                let mangle = s.below(16);
                if mangle == 0 {
                    // A count that does not match the requests.
                    d[4 + name.len() + 1] ^= 1;
                } else if mangle == 1 {
                    d.truncate(s.below(d.len() as u32) as usize);
                }
                if code == opt::GO && mangle > 1 {
                    if let Some((_, info)) = utf8(&name).and_then(|n| self.ex.lookup(n)) {
                        self.target = Some(info);
                    }
                }
                (code, d)
            }
            8 => {
                let d = if s.below(4) == 0 { vec![1] } else { Vec::new() };
                (opt::STRUCTURED_REPLY, d)
            }
            9 | 10 => {
                let name = self.gen_name(s);
                if let Some((_, info)) = utf8(&name).and_then(|n| self.ex.lookup(n)) {
                    self.target = Some(info);
                }
                (opt::EXPORT_NAME, name)
            }
            11 => (opt::ABORT, Vec::new()),
            12 => {
                let code = [
                    opt::STARTTLS,
                    opt::LIST_META_CONTEXT,
                    opt::SET_META_CONTEXT,
                    0,
                    99,
                ][s.below(5) as usize];
                (code, s.raw(16))
            }
            13 => {
                // Oversized: the header and part of the data.
                let len = MAX_OPTION as u32 + 1 + s.below(100_000);
                let code = s.below(12);
                let mut v = IHAVEOPT.to_be_bytes().to_vec();
                v.extend_from_slice(&code.to_be_bytes());
                v.extend_from_slice(&len.to_be_bytes());
                let part = if s.below(16) == 0 {
                    len as usize
                } else {
                    s.below(64) as usize
                };
                v.resize(16 + part, 0x49);
                return v;
            }
            14 => {
                // Malformed INFO/GO data.
                let code = if s.below(2) == 0 { opt::INFO } else { opt::GO };
                (code, s.raw(12))
            }
            _ => (s.u32() % 12, s.raw(8)),
        };
        option_bytes(code, &data)
    }

    fn gen_request(&mut self, s: &mut Script) -> Vec<u8> {
        let info = self.target.unwrap_or(ExportInfo {
            size: 1 << 20,
            min_block: 512,
            preferred_block: 4096,
            max_block: 1 << 20,
            writable: false,
            write_block: 0,
        });
        let ty = match s.below(16) {
            0..=5 => cmd::READ,
            6..=8 => cmd::WRITE,
            9 => cmd::FLUSH,
            10 => cmd::DISC,
            11 => cmd::TRIM,
            12 => cmd::WRITE_ZEROES,
            13 => {
                [cmd::TRIM, cmd::WRITE_ZEROES, cmd::CACHE, cmd::BLOCK_STATUS][s.below(4) as usize]
            }
            _ => s.u16(),
        };
        let flags = match s.below(16) {
            0 => s.u16(),
            1 | 2 => cflag::FUA,
            3 | 4 if ty == cmd::WRITE_ZEROES => {
                [cflag::NO_HOLE, cflag::FUA | cflag::NO_HOLE][s.below(2) as usize]
            }
            3 => [
                cflag::NO_HOLE,
                cflag::FUA | cflag::NO_HOLE,
                cflag::FAST_ZERO,
                cflag::FUA | cflag::FAST_ZERO,
                cflag::DF,
                cflag::REQ_ONE,
            ][s.below(6) as usize],
            _ => 0,
        };
        let handle = if s.below(4) == 0 {
            s.u64()
        } else {
            s.below(16) as u64
        };
        let size = info.size;
        let (offset, len) = if matches!(ty, cmd::WRITE | cmd::TRIM | cmd::WRITE_ZEROES) {
            // Mostly whole blocks within the export; sometimes unaligned,
            // at or past the end, overflowing, zero, over the maximum.
            let block = info.min_block.max(info.write_block).max(1);
            let maxw = info.max_block.min(MAX_REQUEST);
            let len: u32 = match s.below(12) {
                0 => 0,
                1 => 1 + s.below(2 * block),
                2 => maxw + [0, 1, block][s.below(3) as usize],
                3 if ty != cmd::WRITE || s.below(4) == 0 => s.u32(),
                3 | 4 => 1 + s.below(64 * 1024),
                _ => block * (1 + s.below((maxw / block).clamp(1, 16))),
            };
            let b = block as u64;
            let offset: u64 = match s.below(10) {
                0 if s.below(2) == 0 => s.u64(),
                0 => u64::MAX / b * b,
                1 => {
                    let last = size.saturating_sub(len as u64) / b * b;
                    [last, last + b, size, size - size % b][s.below(4) as usize]
                }
                2 => s.u32() as u64 % size.max(1),
                _ => b * (s.u32() as u64 % (size.saturating_sub(len as u64) / b + 1)),
            };
            (offset, len)
        } else {
            let len: u32 = match s.below(8) {
                0 => 0,
                1 => s.u32(),
                2 if s.below(2) == 0 => info.max_block.min(MAX_REQUEST) + s.below(2),
                3 => 1 + s.below(64 * 1024),
                _ => 1 + s.below(4096),
            };
            let offset: u64 = match s.below(8) {
                0 => s.u64(),
                1 => size.saturating_sub(len as u64) + s.below(3) as u64,
                2 => size.saturating_sub(1 + s.below(600) as u64),
                _ => {
                    let room = size.saturating_sub(len as u64);
                    if room == 0 {
                        0
                    } else {
                        s.u32() as u64 % room
                    }
                }
            };
            match ty {
                cmd::FLUSH | cmd::DISC if s.below(4) != 0 => (0, 0),
                _ => (offset, len),
            }
        };
        let mut v = request_bytes(ty, flags, handle, offset, len);
        if ty == cmd::WRITE {
            // The payload, a pattern of this write's own; sometimes cut
            // short, and always when too long to send (the rest never
            // comes: what follows is taken as payload or skipped).
            let n = if len > 1 << 20 || s.below(32) == 0 {
                s.below(len.min(1 << 16) + 1)
            } else {
                len
            };
            v.extend_from_slice(self.t.payload(self.client_writes, n));
            self.client_writes += 1;
        }
        v
    }

    /// Drains the connection as a patient client would, checks that
    /// nothing is left unanswered, then closes the peer's side and checks
    /// that the connection ends.
    fn finish(&mut self) {
        self.drain();
        if !self.peer_closed {
            assert!(
                self.sock().is_empty(),
                "{} client bytes never taken (input_room {}, output waiting {}, in flight {})",
                self.sock().len(),
                self.conn.input_room(),
                self.conn.output_pending(),
                self.conn.in_flight()
            );
            // (Ended by the driver, it decodes nothing more: what the
            // model decoded after is never answered.)
            if !self.ended {
                assert!(
                    self.model.expect.is_empty(),
                    "never answered: {:?}",
                    self.model.expect.front()
                );
                assert!(
                    self.model.events.is_empty(),
                    "requests never decoded: {:?}",
                    self.model.events.front()
                );
            }
            assert_eq!(
                self.conn.is_closed(),
                self.model.phase == Phase::Closed,
                "closed after the client's last bytes"
            );
            self.sum.closed = self.conn.close_reason();
            self.close_peer();
            self.drain();
        }
        assert!(self.conn.is_closed(), "the connection outlives its peer");
        assert!(
            self.taken.is_empty(),
            "requests never answered: {:?}",
            self.taken.first().map(|t| (t.ev, t.fill))
        );
        assert_eq!(self.conn.in_flight(), 0);
        assert!(self.conn.output().is_empty());
        assert!(
            self.model.records.is_empty(),
            "read replies never sent: {:?}",
            self.model.records.front()
        );
        assert_eq!(
            self.model.out_at,
            self.model.out.len(),
            "output ends inside a message"
        );
        self.sum.lists = self.model.lists;
        self.sum.updates_refused = self.model.refused;
        self.sum.control_replies = self.model.controls;
    }

    fn drain(&mut self) {
        loop {
            let answered = |d: &Self| d.sum.reads_answered + d.sum.updates_answered;
            let before = (self.consumed, self.sock_at, answered(self));
            self.consume(usize::MAX);
            self.check();
            self.deliver(usize::MAX, false);
            self.check();
            self.take_events(usize::MAX);
            self.fill(usize::MAX, usize::MAX);
            self.check();
            while let Some(i) = self.answerable() {
                if !self.answer(i, 0, Errno::Io, 0) {
                    self.consume(usize::MAX);
                }
                self.check();
            }
            let after = (self.consumed, self.sock_at, answered(self));
            if before == after && self.conn.output_pending() == 0 {
                break;
            }
        }
    }
}
