//! dioxide's NBD server, sans-IO: one [`Conn`] per TCP connection is fed
//! the bytes that arrived, hands out the requests it decoded as
//! [`Event`]s, takes their completions in any order, and yields the bytes
//! to send. It owns no socket, no clock and no storage, so it runs the same
//! on the host in tests as in the kernel over smoltcp.
//!
//! NBD server side (fixed newstyle handshake, simple replies), following the
//! protocol document of the NetworkBlockDevice project (`doc/proto.md`).
//!
//! Wire formats (all integers big-endian):
//!
//! ```text
//! greeting  S: "NBDMAGIC" "IHAVEOPT" u16 handshake flags (FIXED_NEWSTYLE | NO_ZEROES)
//!           C: u32 client flags
//! option    C: "IHAVEOPT" u32 option u32 length, data
//!           S: u64 0x0003e889045565a9 u32 option u32 reply type u32 length, data
//! EXPORT_NAME reply (no header): u64 size u16 transmission flags [124 zero bytes]
//! request   C: u32 0x25609513 u16 command flags u16 type u64 handle u64 offset u32 length [data]
//! reply     S: u32 0x67446698 u32 error u64 handle [data]
//! chunk     S: u32 0x668e33ef u16 flags u16 type u64 handle u32 length, payload
//!              OFFSET_DATA (1): u64 offset, data
//!              ERROR (0x8001): u32 error u16 message length, message
//! ```
//!
//! Options: EXPORT_NAME, ABORT, LIST, INFO, GO (with NBD_INFO_EXPORT, _NAME,
//! _BLOCK_SIZE), STRUCTURED_REPLY; STARTTLS and the meta-context options
//! are answered `NBD_REP_ERR_UNSUP`, unknown options too. Once structured
//! replies are negotiated every read is answered by one chunk with the DONE
//! flag (OFFSET_DATA or ERROR with a message); other commands keep simple
//! replies, as the protocol allows. (Structured replies are not only an
//! option: QEMU's client with simple replies hangs on an export whose size
//! is not a multiple of 512, because it then reads a whole sector.) Commands: READ and
//! FLUSH are served, DISC closes after the requests in flight; anything
//! unknown gets `EINVAL`.
//!
//! The write side: an export that takes writes ([`ExportInfo::writable`])
//! is writable to a client the caller allows ([`Conn::allow_writes`]);
//! the transmission flags then announce SEND_FUA, SEND_TRIM and
//! SEND_WRITE_ZEROES (and not READ_ONLY), and WRITE, FLUSH, TRIM and
//! WRITE_ZEROES become [`Event`]s answered by [`Conn::reply`]. A write's
//! payload is handed to the caller ([`Conn::take_payload`]) rather than
//! decoded: the connection stops decoding after the header, hands over
//! the payload bytes that arrived with it (held, at most [`INPUT_CAP`]),
//! then takes the rest straight from the transport's bytes into the
//! caller's buffer. Writes must be aligned to the export's minimum block
//! size (`EINVAL` otherwise, as the protocol's size constraints say). To
//! everyone else the export is read-only: writes, trims and write-zeroes
//! get `EPERM` (a refused write's payload is discarded as it arrives).
//! Errors follow the protocol's error section: `ENOSPC` for a write or
//! write-zeroes past the end, `EINVAL` for a trim past it, a zero length, a
//! write over the maximum block size, or a flag the command does not take
//! (FUA, once announced, is taken by every command).
//! A protocol violation (wrong magic, unknown client flags, a name that is
//! not UTF-8) closes the connection.
//!
//! ## Memory bounds
//!
//! Everything a client can make a connection hold is bounded, so that a
//! client which sends and never reads cannot grow the heap:
//!
//! - **Input**: the caller feeds at most [`Conn::input_room`] bytes (it
//!   leaves the rest in the socket, whose receive window then closes: the
//!   client is held by TCP flow control). Buffered input never exceeds
//!   [`INPUT_CAP`] (one maximal option); larger option data and refused
//!   write payloads are discarded as they arrive.
//! - **Replies**: nothing new is decoded while [`OUTPUT_HIGH`] bytes of
//!   output wait to be sent, so control replies (FLUSH, errors, options)
//!   stop at `OUTPUT_HIGH` plus what one option or request queues
//!   ([`MAX_CONTROL_REPLY`]). NBD_OPT_LIST is answered export
//!   by export as the output drains ([`Conn::resume`]), never all at once.
//! - **Reads**: at most `max_in_flight` requests (reads and the write
//!   side's) are decoded and not yet answered; read data is admitted by
//!   the caller (the service budgets its buffers and read replies, see the
//!   kernel's `net::nbd`), and so is a write's payload: it stays in the
//!   transport until the caller takes it into a buffer of its own.
//! - Every allocation is fallible (`try_reserve`): when one fails the
//!   connection ends with [`CloseReason::OutOfMemory`], never a panic.
//!
//! [`Conn::memory`] reports what a connection holds, at most [`memory_bound`]
//! (the tests, the fuzz target and the kernel's stated bound use it).
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]

extern crate alloc;

use alloc::collections::VecDeque;
use alloc::vec::Vec;
use outq::OutQueue;

pub mod client;
pub mod outq;

pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
pub const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

pub mod opt {
    pub const EXPORT_NAME: u32 = 1;
    pub const ABORT: u32 = 2;
    pub const LIST: u32 = 3;
    pub const STARTTLS: u32 = 5;
    pub const INFO: u32 = 6;
    pub const GO: u32 = 7;
    pub const STRUCTURED_REPLY: u32 = 8;
    pub const LIST_META_CONTEXT: u32 = 9;
    pub const SET_META_CONTEXT: u32 = 10;
}

pub mod rep {
    pub const ACK: u32 = 1;
    pub const SERVER: u32 = 2;
    pub const INFO: u32 = 3;
    pub const ERR_UNSUP: u32 = (1 << 31) + 1;
    pub const ERR_POLICY: u32 = (1 << 31) + 2;
    pub const ERR_INVALID: u32 = (1 << 31) + 3;
    pub const ERR_UNKNOWN: u32 = (1 << 31) + 6;
    pub const ERR_TOO_BIG: u32 = (1 << 31) + 9;
}

/// Structured reply chunk types and flags.
pub mod chunk {
    pub const FLAG_DONE: u16 = 1 << 0;
    pub const OFFSET_DATA: u16 = 1;
    pub const ERROR: u16 = (1 << 15) + 1;
}

pub mod info {
    pub const EXPORT: u16 = 0;
    pub const NAME: u16 = 1;
    pub const DESCRIPTION: u16 = 2;
    pub const BLOCK_SIZE: u16 = 3;
}

/// Transmission flags.
pub mod tflag {
    pub const HAS_FLAGS: u16 = 1 << 0;
    pub const READ_ONLY: u16 = 1 << 1;
    pub const SEND_FLUSH: u16 = 1 << 2;
    pub const SEND_FUA: u16 = 1 << 3;
    pub const SEND_TRIM: u16 = 1 << 5;
    pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
    pub const CAN_MULTI_CONN: u16 = 1 << 8;
}

/// Command flags (the request's 16-bit flags field).
pub mod cflag {
    /// Force unit access: the reply is sent only once the command's effect
    /// is durable.
    pub const FUA: u16 = 1 << 0;
    /// WRITE_ZEROES: the range must be written (allocated), not punched.
    pub const NO_HOLE: u16 = 1 << 1;
    pub const DF: u16 = 1 << 2;
    pub const REQ_ONE: u16 = 1 << 3;
    pub const FAST_ZERO: u16 = 1 << 4;
}

pub mod cmd {
    pub const READ: u16 = 0;
    pub const WRITE: u16 = 1;
    pub const DISC: u16 = 2;
    pub const FLUSH: u16 = 3;
    pub const TRIM: u16 = 4;
    pub const CACHE: u16 = 5;
    pub const WRITE_ZEROES: u16 = 6;
    pub const BLOCK_STATUS: u16 = 7;
}

/// Error values of replies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Errno {
    Perm = 1,
    Io = 5,
    NoMem = 12,
    Inval = 22,
    NoSpc = 28,
    Overflow = 75,
    NotSup = 95,
    Shutdown = 108,
}

impl Errno {
    /// A message for error chunks.
    pub fn message(self) -> &'static str {
        match self {
            Errno::Perm => "the export is read-only",
            Errno::Io => "I/O error on the appliance's storage",
            Errno::NoMem => "out of memory on the appliance",
            Errno::Inval => "invalid request",
            Errno::NoSpc => "no space left",
            Errno::Overflow => "value too large",
            Errno::NotSup => "not supported",
            Errno::Shutdown => "the server is shutting down",
        }
    }
}

/// Largest option data buffered; longer options are refused and skipped.
pub const MAX_OPTION: usize = 64 * 1024;
/// Largest input a connection buffers: one option header and its data.
pub const INPUT_CAP: usize = 16 + MAX_OPTION;
/// Output waiting to be sent above which no new option or request is
/// decoded (the client is held back until it reads its replies).
pub const OUTPUT_HIGH: usize = 256 * 1024;
/// Most output one decoded option or request queues, read data aside:
/// NBD_OPT_GO answered with NBD_INFO_EXPORT, NBD_INFO_NAME (the name as the
/// client sent it, at most an option's data), NBD_INFO_BLOCK_SIZE and the
/// ACK. An NBD_OPT_LIST entry (24 bytes and a name) stays below it for
/// export names no longer than [`MAX_OPTION`].
pub const MAX_CONTROL_REPLY: usize = (20 + 12) + (20 + 2 + MAX_OPTION) + (20 + 14) + 20;
/// Longest header of a read's data reply: the structured OFFSET_DATA chunk
/// header and its offset (a simple reply's is 16 bytes).
pub const READ_REPLY_HEADER_MAX: usize = 28;
/// Largest request length served (a common NBD limit; advertised as the
/// maximum block size).
pub const MAX_REQUEST: u32 = 32 * 1024 * 1024;

/// Upper bound of [`Conn::memory`] for a connection created with
/// `max_in_flight` whose caller keeps at most `read_budget` bytes of read
/// replies (headers included) unconsumed in its output. The terms:
///
/// - **input** `2 * INPUT_CAP`: the input buffer never holds more than
///   [`INPUT_CAP`] bytes ([`Conn::input_room`]); its capacity grows by
///   doubling (`try_reserve`), so it is below twice the largest length.
/// - **output** `OutQueue::bound(P, P)` with `P = OUTPUT_HIGH +
///   MAX_CONTROL_REPLY + read_budget`: the output waiting to be sent
///   holds control replies (greeting, option replies, replies to requests
///   other than answered reads) and read replies. No option or request is
///   decoded while [`OUTPUT_HIGH`] bytes wait, and one decoded option or
///   request (or one NBD_OPT_LIST name) queues at most
///   [`MAX_CONTROL_REPLY`] bytes, so control replies waiting never exceed
///   `OUTPUT_HIGH + MAX_CONTROL_REPLY`; read replies waiting are the
///   caller's, at most `read_budget`. (Without a caller budget only
///   `max_in_flight` times the largest read would bound them: reads
///   decoded before the output reached `OUTPUT_HIGH` may all be answered
///   after.) The front segment's sent part, kept until the segment is
///   sent whole, is one reply, so at most another `P`; the segments' own
///   slack is [`OutQueue::bound`]'s.
/// - **requests** `max(2 * max_in_flight, 4) * size_of::<Event>()`: at
///   most `max_in_flight` requests are decoded and unanswered, so the
///   event queue holds no more; its capacity doubles (minimum 4 slots).
/// - **write-side replies** `16 * max_in_flight`: the replies to writes,
///   flushes, trims and write-zeroes ([`Conn::reply`], 16 bytes each) are
///   queued when the caller answers, whatever the output waiting, and at
///   most `max_in_flight` of them are unanswered at once.
///
/// Assumes export names no longer than [`MAX_OPTION`] (a longer name could
/// not be asked for in an option anyway).
pub const fn memory_bound(max_in_flight: usize, read_budget: usize) -> usize {
    let input = 2 * INPUT_CAP;
    let p = OUTPUT_HIGH + MAX_CONTROL_REPLY + read_budget;
    let output = OutQueue::bound(2 * p, 2 * p);
    let requests = max(2 * max_in_flight, 4) * core::mem::size_of::<Event>();
    let write_replies = 16 * max_in_flight;
    input + output + requests + write_replies
}

const fn max(a: usize, b: usize) -> usize {
    if a > b {
        a
    } else {
        b
    }
}

/// What a client may know of an export.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExportInfo {
    pub size: u64,
    /// Minimum block size (the device's logical block).
    pub min_block: u32,
    /// Preferred block size (the filesystem block).
    pub preferred_block: u32,
    /// Maximum request length.
    pub max_block: u32,
    /// The export's storage takes writes. A connection writes to it only
    /// when its client may write too ([`Conn::allow_writes`]); otherwise
    /// the client sees it read-only.
    pub writable: bool,
    /// Writes and write-zeroes must start and end on multiples of this
    /// (and of `min_block`): a file's filesystem block, while its reads,
    /// and the minimum block announced to every client, stay at any byte
    /// (libnbd refuses requests not aligned to the announced minimum, and
    /// a read-only client must go on reading a file of any size). 0: only
    /// `min_block`.
    pub write_block: u32,
}

/// The exports of a server.
pub trait Exports {
    /// The export called `name`: an id for the caller and its info.
    fn lookup(&self, name: &str) -> Option<(u32, ExportInfo)>;
    /// The name of export number `index` (0, 1, ... until `None`), for
    /// NBD_OPT_LIST, which is answered a name at a time as output drains.
    fn name(&self, index: usize) -> Option<&str>;
}

/// A request for the storage behind the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// Read `len` bytes at `offset` of export `export`; answer with
    /// [`Conn::reply_read`].
    Read {
        handle: u64,
        export: u32,
        offset: u64,
        len: u32,
    },
    /// Write `len` bytes at `offset`: the payload follows, handed over by
    /// [`Conn::take_payload`] (nothing else is decoded until all of it
    /// was). With `fua` the reply waits until the data is durable. Answer
    /// with [`Conn::reply`].
    Write {
        handle: u64,
        export: u32,
        offset: u64,
        len: u32,
        fua: bool,
    },
    /// Make every write replied to before it durable (on any connection:
    /// the exports are announced CAN_MULTI_CONN); answer with
    /// [`Conn::reply`] once they are.
    Flush { handle: u64, export: u32 },
    /// The range's contents are no longer needed (advisory: reads may
    /// return the old bytes or zeroes). Answer with [`Conn::reply`].
    Trim {
        handle: u64,
        export: u32,
        offset: u64,
        len: u32,
        fua: bool,
    },
    /// Write zeroes to the range; `no_hole`: the range must stay allocated
    /// (written), not be punched. Answer with [`Conn::reply`].
    WriteZeroes {
        handle: u64,
        export: u32,
        offset: u64,
        len: u32,
        fua: bool,
        no_hole: bool,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Waiting for the client flags.
    ClientFlags,
    Options,
    Transmission,
    /// Send what is queued, then close.
    Closing,
    Closed,
}

/// What [`Conn::take_payload`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Payload {
    /// Bytes of the caller's `data` it took.
    pub from_data: usize,
    /// Bytes it wrote to the caller's buffer (held ones first).
    pub written: usize,
    /// This call handed over the payload's last byte: the write is whole.
    pub done: bool,
}

/// Why a connection ended (for logs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseReason {
    BadClientFlags,
    BadOptionMagic,
    BadRequestMagic,
    UnknownExport,
    BadName,
    Abort,
    Disconnect,
    /// An allocation for this connection failed: it was dropped.
    OutOfMemory,
    /// The caller cannot serve a request the connection decoded (see
    /// [`Conn::end`]).
    Unserved,
}

/// One NBD connection.
pub struct Conn {
    state: State,
    inb: Vec<u8>,
    /// Output waiting to be sent (segments, never reallocated).
    out: OutQueue,
    no_zeroes: bool,
    /// NBD_OPT_STRUCTURED_REPLY was negotiated.
    structured: bool,
    export: Option<(u32, ExportInfo)>,
    /// Input bytes still to discard (oversized option data, refused write
    /// payloads).
    skip: u64,
    /// Payload bytes of the last decoded write still to be handed over
    /// ([`Conn::take_payload`]); nothing is decoded meanwhile.
    payload: u32,
    /// The client may write (to exports that take writes).
    may_write: bool,
    events: VecDeque<Event>,
    /// NBD_OPT_LIST in progress: the next export index to announce.
    listing: Option<usize>,
    /// Drop every reply (the connection failed to allocate).
    discard: bool,
    in_flight: usize,
    max_in_flight: usize,
    close_reason: Option<CloseReason>,
    /// Requests decoded over the connection's life.
    pub requests: u64,
}

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}
fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}
fn be64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

impl Default for Conn {
    fn default() -> Self {
        Self::new(256)
    }
}

impl Conn {
    /// A new connection with at most `max_in_flight` reads outstanding; the
    /// greeting is queued for sending. (Allocates nothing until input or
    /// output needs it; those allocations are fallible.)
    pub fn new(max_in_flight: usize) -> Conn {
        let mut c = Conn {
            state: State::ClientFlags,
            inb: Vec::new(),
            out: OutQueue::new(),
            no_zeroes: false,
            structured: false,
            export: None,
            skip: 0,
            payload: 0,
            may_write: false,
            events: VecDeque::new(),
            listing: None,
            discard: false,
            in_flight: 0,
            max_in_flight: max_in_flight.max(1),
            close_reason: None,
            requests: 0,
        };
        let mut g = [0u8; 18];
        g[..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
        g[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
        g[16..].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
        c.put(&[&g]);
        c
    }

    /// Appends `parts` to the output, or, when the memory for them cannot
    /// be had, ends the connection ([`CloseReason::OutOfMemory`]).
    fn put(&mut self, parts: &[&[u8]]) {
        if self.discard {
            return;
        }
        if self.out.push(parts).is_err() {
            self.out_of_memory();
        }
    }

    fn out_of_memory(&mut self) {
        log::warn!(target: "nbd", "connection dropped: out of memory for its buffers");
        self.discard = true;
        self.out.clear();
        self.inb = Vec::new();
        self.listing = None;
        self.close(CloseReason::OutOfMemory);
    }

    /// Output waiting to be sent, bytes.
    pub fn output_pending(&self) -> usize {
        self.out.pending()
    }

    /// Heap bytes this connection holds (input, output and request queue).
    pub fn memory(&self) -> usize {
        self.inb.capacity()
            + self.out.memory()
            + self.events.capacity() * core::mem::size_of::<Event>()
    }

    /// How many bytes [`Conn::receive`] takes now. The caller leaves the
    /// rest in the socket (TCP flow control holds the client back): zero
    /// while replies wait to be read ([`OUTPUT_HIGH`]), a list is being
    /// sent, or every read slot is taken; otherwise what fits in
    /// [`INPUT_CAP`]. Data that is discarded (refused write payloads,
    /// oversized options, input after the end) is always taken.
    pub fn input_room(&self) -> usize {
        if matches!(self.state, State::Closing | State::Closed) {
            return INPUT_CAP;
        }
        if self.skip > 0 {
            return self.skip.min(INPUT_CAP as u64) as usize;
        }
        if self.payload > 0 {
            // A write's data: taken by `take_payload`, not buffered here.
            return 0;
        }
        if self.blocked() {
            return 0;
        }
        INPUT_CAP.saturating_sub(self.inb.len())
    }

    /// No option or request is decoded now.
    fn blocked(&self) -> bool {
        self.output_pending() >= OUTPUT_HIGH
            || self.payload > 0
            || self.listing.is_some()
            || (self.state == State::Transmission && self.in_flight >= self.max_in_flight)
    }

    /// Bytes to send next: a prefix of what waits ([`Conn::output_pending`]
    /// bytes in all); after [`Conn::consume_output`] of all of it, the next
    /// part (empty when nothing waits).
    pub fn output(&self) -> &[u8] {
        self.out.front()
    }

    /// `n` bytes of [`Conn::output`] were sent.
    pub fn consume_output(&mut self, n: usize) {
        self.out.consume(n);
        if self.state == State::Closing && self.out.is_empty() && self.in_flight == 0 {
            self.state = State::Closed;
        }
    }

    /// The connection is over: close the socket (after sending
    /// [`Conn::output`], which is then empty).
    pub fn is_closed(&self) -> bool {
        self.state == State::Closed
    }

    pub fn close_reason(&self) -> Option<CloseReason> {
        self.close_reason
    }

    /// Whether the handshake is done.
    pub fn in_transmission(&self) -> bool {
        self.state == State::Transmission
    }

    /// Reads in flight (handed out, not yet answered).
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Ends the connection from the caller's side (`why` is logged and
    /// kept): nothing more is decoded; what is queued is still sent and
    /// the requests in flight still answered before it closes.
    pub fn end(&mut self, why: CloseReason) {
        if !matches!(self.state, State::Closing | State::Closed) {
            self.close(why);
        }
    }

    /// The peer closed its side: nothing more will arrive.
    pub fn peer_closed(&mut self) {
        self.inb.clear();
        // A write whose payload had not all come is never submitted; the
        // caller still answers it ([`Conn::reply`], dropped when closed).
        self.payload = 0;
        if self.state != State::Closed {
            self.state = if self.in_flight == 0 {
                State::Closed
            } else {
                State::Closing
            };
            self.close_reason.get_or_insert(CloseReason::Disconnect);
        }
    }

    /// The next decoded request, left in place (to check its size before
    /// taking it).
    pub fn peek_event(&self) -> Option<&Event> {
        self.events.front()
    }

    /// The next decoded request.
    pub fn next_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    fn close(&mut self, why: CloseReason) {
        log::debug!(target: "nbd", "closing connection: {why:?}");
        self.close_reason = Some(why);
        self.inb.clear();
        self.payload = 0;
        self.state = if self.out.is_empty() && self.in_flight == 0 {
            State::Closed
        } else {
            State::Closing
        };
    }

    /// Feeds bytes received from the client and returns how many it took
    /// (the caller keeps the rest for later): the bytes it discards (the
    /// rest of a refused write payload or oversized option), then at most
    /// what it has room for. Offered no more than [`Conn::input_room`], it
    /// takes them all.
    pub fn receive(&mut self, exports: &dyn Exports, data: &[u8]) -> usize {
        if matches!(self.state, State::Closing | State::Closed) {
            return data.len();
        }
        let mut taken = 0;
        let mut data = data;
        if self.skip > 0 {
            let n = (self.skip.min(data.len() as u64)) as usize;
            self.skip -= n as u64;
            data = &data[n..];
            taken += n;
        }
        let room = self.input_room();
        let data = &data[..data.len().min(room)];
        if data.is_empty() {
            return taken;
        }
        if self.inb.try_reserve(data.len()).is_err() {
            self.out_of_memory();
            return taken + data.len();
        }
        self.inb.extend_from_slice(data);
        self.process(exports);
        taken + data.len()
    }

    /// Continues after output was consumed: sends more of a list, decodes
    /// input held back while replies waited. Cheap when there is nothing
    /// to do.
    pub fn resume(&mut self, exports: &dyn Exports) {
        if self.output_pending() < OUTPUT_HIGH
            && (self.listing.is_some() || !self.inb.is_empty())
            && !matches!(self.state, State::Closing | State::Closed)
        {
            self.process(exports);
        }
    }

    fn option_reply(&mut self, option: u32, ty: u32, data: &[u8]) {
        let mut h = [0u8; 20];
        h[..8].copy_from_slice(&REPLY_MAGIC.to_be_bytes());
        h[8..12].copy_from_slice(&option.to_be_bytes());
        h[12..16].copy_from_slice(&ty.to_be_bytes());
        h[16..].copy_from_slice(&(data.len() as u32).to_be_bytes());
        self.put(&[&h, data]);
    }

    fn simple_reply(&mut self, handle: u64, err: u32) {
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
        h[4..8].copy_from_slice(&err.to_be_bytes());
        h[8..].copy_from_slice(&handle.to_be_bytes());
        self.put(&[&h]);
    }

    /// A read's error: a simple reply, or an ERROR chunk with `msg` once
    /// structured replies are on.
    fn read_error(&mut self, handle: u64, err: Errno, msg: &str) {
        if !self.structured {
            self.simple_reply(handle, err as u32);
            return;
        }
        // Strings on the wire are UTF-8 of at most 4096 bytes: cut at a
        // character boundary.
        let mut n = msg.len().min(4096);
        while !msg.is_char_boundary(n) {
            n -= 1;
        }
        let msg = &msg.as_bytes()[..n];
        let h = Self::chunk_header(chunk::ERROR, handle, 6 + msg.len() as u32);
        let mut e = [0u8; 6];
        e[..4].copy_from_slice(&(err as u32).to_be_bytes());
        e[4..].copy_from_slice(&(msg.len() as u16).to_be_bytes());
        self.put(&[&h, &e, msg]);
    }

    fn chunk_header(ty: u16, handle: u64, len: u32) -> [u8; 20] {
        let mut h = [0u8; 20];
        h[..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
        h[4..6].copy_from_slice(&chunk::FLAG_DONE.to_be_bytes());
        h[6..8].copy_from_slice(&ty.to_be_bytes());
        h[8..16].copy_from_slice(&handle.to_be_bytes());
        h[16..].copy_from_slice(&len.to_be_bytes());
        h
    }

    /// Announces exports of an NBD_OPT_LIST in progress while the output
    /// has room; the final ACK when all are out.
    fn continue_list(&mut self, exports: &dyn Exports) {
        while let Some(i) = self.listing {
            if self.output_pending() >= OUTPUT_HIGH || self.discard {
                return;
            }
            match exports.name(i) {
                Some(name) => {
                    let len = (name.len() as u32).to_be_bytes();
                    let mut h = [0u8; 20];
                    h[..8].copy_from_slice(&REPLY_MAGIC.to_be_bytes());
                    h[8..12].copy_from_slice(&opt::LIST.to_be_bytes());
                    h[12..16].copy_from_slice(&rep::SERVER.to_be_bytes());
                    h[16..].copy_from_slice(&(4 + name.len() as u32).to_be_bytes());
                    self.put(&[&h, &len, name.as_bytes()]);
                    self.listing = Some(i + 1);
                }
                None => {
                    self.listing = None;
                    self.option_reply(opt::LIST, rep::ACK, &[]);
                }
            }
        }
    }

    /// Whether this connection writes to an export described by `info`:
    /// the export takes writes and the client may write.
    fn writes_to(&self, info: &ExportInfo) -> bool {
        info.writable && self.may_write
    }

    fn transmission_flags(&self, info: &ExportInfo) -> u16 {
        let common = tflag::HAS_FLAGS | tflag::SEND_FLUSH | tflag::CAN_MULTI_CONN;
        if self.writes_to(info) {
            common | tflag::SEND_FUA | tflag::SEND_TRIM | tflag::SEND_WRITE_ZEROES
        } else {
            common | tflag::READ_ONLY
        }
    }

    /// Decodes everything complete in the input buffer, as far as the
    /// output and read limits allow.
    fn process(&mut self, exports: &dyn Exports) {
        self.continue_list(exports);
        // Taken out so that option data can be handled in place.
        let inb = core::mem::take(&mut self.inb);
        let mut at = 0usize;
        loop {
            let avail = &inb[at..];
            if self.blocked() {
                break;
            }
            match self.state {
                State::ClientFlags => {
                    if avail.len() < 4 {
                        break;
                    }
                    let flags = be32(avail);
                    at += 4;
                    if flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
                        self.close(CloseReason::BadClientFlags);
                        return;
                    }
                    self.no_zeroes = flags & FLAG_C_NO_ZEROES != 0;
                    self.state = State::Options;
                }
                State::Options => {
                    if avail.len() < 16 {
                        break;
                    }
                    if be64(avail) != IHAVEOPT {
                        self.close(CloseReason::BadOptionMagic);
                        return;
                    }
                    let option = be32(&avail[8..]);
                    let len = be32(&avail[12..]) as usize;
                    if len > MAX_OPTION {
                        // Refuse and discard the data as it arrives.
                        at += 16;
                        let here = (avail.len() - 16).min(len);
                        at += here;
                        self.skip = (len - here) as u64;
                        self.option_reply(option, rep::ERR_TOO_BIG, b"option data too large");
                        if self.skip > 0 {
                            break;
                        }
                        continue;
                    }
                    if avail.len() < 16 + len {
                        break;
                    }
                    let data = &avail[16..16 + len];
                    at += 16 + len;
                    self.handle_option(exports, option, data);
                    if self.state != State::Options {
                        if self.state == State::Transmission {
                            continue;
                        }
                        break;
                    }
                }
                State::Transmission => {
                    if avail.len() < 28 {
                        break;
                    }
                    if be32(avail) != REQUEST_MAGIC {
                        self.close(CloseReason::BadRequestMagic);
                        return;
                    }
                    let flags = be16(&avail[4..]);
                    let ty = be16(&avail[6..]);
                    let handle = be64(&avail[8..]);
                    let offset = be64(&avail[16..]);
                    let len = be32(&avail[24..]);
                    at += 28;
                    self.requests += 1;
                    let Some((export, info)) = self.export else {
                        self.close(CloseReason::UnknownExport);
                        return;
                    };
                    match ty {
                        cmd::READ => {
                            // FUA, once announced (writable), is valid on
                            // every command: ignored on a read.
                            let fua_ok = if self.writes_to(&info) { cflag::FUA } else { 0 };
                            let bad = flags & !fua_ok != 0
                                || len == 0
                                || len > info.max_block.min(MAX_REQUEST)
                                || offset.checked_add(len as u64).is_none_or(|e| e > info.size);
                            if bad {
                                let why = if flags & !fua_ok != 0 {
                                    "unsupported read flags"
                                } else if len == 0 {
                                    "zero-length read"
                                } else if len > info.max_block.min(MAX_REQUEST) {
                                    "read larger than the maximum block size"
                                } else {
                                    "read beyond the end of the export"
                                };
                                self.read_error(handle, Errno::Inval, why);
                            } else {
                                if self.events.try_reserve(1).is_err() {
                                    self.out_of_memory();
                                    return;
                                }
                                self.in_flight += 1;
                                self.events.push_back(Event::Read {
                                    handle,
                                    export,
                                    offset,
                                    len,
                                });
                            }
                        }
                        cmd::FLUSH if self.writes_to(&info) => {
                            if flags & !cflag::FUA != 0 || offset != 0 || len != 0 {
                                self.simple_reply(handle, Errno::Inval as u32);
                            } else if !self.push_event(Event::Flush { handle, export }) {
                                return;
                            }
                        }
                        cmd::FLUSH => {
                            // Read-only: nothing to make durable (and FUA,
                            // not announced, is a flag it does not take).
                            let err = if flags != 0 || offset != 0 || len != 0 {
                                Errno::Inval as u32
                            } else {
                                0
                            };
                            self.simple_reply(handle, err);
                        }
                        cmd::DISC => {
                            self.close(CloseReason::Disconnect);
                            return;
                        }
                        cmd::WRITE => {
                            let fua = flags & cflag::FUA != 0;
                            match self.check_update(&info, ty, flags, offset, len) {
                                Ok(()) => {
                                    let write = Event::Write {
                                        handle,
                                        export,
                                        offset,
                                        len,
                                        fua,
                                    };
                                    if !self.push_event(write) {
                                        return;
                                    }
                                    // Handed over by `take_payload`: the
                                    // bytes after `at` start it.
                                    self.payload = len;
                                    break;
                                }
                                Err(e) => {
                                    // The payload follows: discard it.
                                    let here = (inb.len() - at).min(len as usize);
                                    at += here;
                                    self.skip = len as u64 - here as u64;
                                    self.simple_reply(handle, e as u32);
                                    if self.skip > 0 {
                                        break;
                                    }
                                }
                            }
                        }
                        cmd::TRIM | cmd::WRITE_ZEROES => {
                            let fua = flags & cflag::FUA != 0;
                            match self.check_update(&info, ty, flags, offset, len) {
                                Ok(()) => {
                                    let e = if ty == cmd::TRIM {
                                        Event::Trim {
                                            handle,
                                            export,
                                            offset,
                                            len,
                                            fua,
                                        }
                                    } else {
                                        Event::WriteZeroes {
                                            handle,
                                            export,
                                            offset,
                                            len,
                                            fua,
                                            no_hole: flags & cflag::NO_HOLE != 0,
                                        }
                                    };
                                    if !self.push_event(e) {
                                        return;
                                    }
                                }
                                Err(e) => self.simple_reply(handle, e as u32),
                            }
                        }
                        _ => self.simple_reply(handle, Errno::Inval as u32),
                    }
                }
                State::Closing | State::Closed => break,
            }
        }
        if !matches!(self.state, State::Closing | State::Closed) {
            let mut inb = inb;
            inb.drain(..at.min(inb.len()));
            self.inb = inb;
        }
    }

    /// Queues a decoded request for the caller (counted in flight);
    /// false when the memory for it cannot be had (the connection then
    /// ends).
    fn push_event(&mut self, e: Event) -> bool {
        if self.events.try_reserve(1).is_err() {
            self.out_of_memory();
            return false;
        }
        self.in_flight += 1;
        self.events.push_back(e);
        true
    }

    /// Checks a WRITE, TRIM or WRITE_ZEROES (command `ty`) against the
    /// export and the protocol (`doc/proto.md`): `EPERM` when this
    /// connection may not write to it; `EINVAL` for a flag the command does
    /// not take (FAST_ZERO is not announced), a zero length (unspecified
    /// by the protocol, which only asks not to disconnect), a write over
    /// the maximum block size we announce (TRIM and WRITE_ZEROES may be
    /// longer: they carry no payload), or a write or write-zeroes not
    /// aligned to the minimum block size (a trim may be rounded instead);
    /// past the export's end `ENOSPC`
    /// for writes and `EINVAL` for a trim, as the protocol's error section
    /// says.
    fn check_update(
        &self,
        info: &ExportInfo,
        ty: u16,
        flags: u16,
        offset: u64,
        len: u32,
    ) -> Result<(), Errno> {
        if !self.writes_to(info) {
            return Err(Errno::Perm);
        }
        let allowed = match ty {
            cmd::WRITE_ZEROES => cflag::FUA | cflag::NO_HOLE,
            _ => cflag::FUA,
        };
        if flags & !allowed != 0 || len == 0 {
            return Err(Errno::Inval);
        }
        if ty == cmd::WRITE && len > info.max_block.min(MAX_REQUEST) {
            return Err(Errno::Inval);
        }
        let block = info.min_block.max(info.write_block).max(1) as u64;
        if ty != cmd::TRIM && (!offset.is_multiple_of(block) || !(len as u64).is_multiple_of(block))
        {
            return Err(Errno::Inval);
        }
        if offset.checked_add(len as u64).is_none_or(|e| e > info.size) {
            return Err(if ty == cmd::TRIM {
                Errno::Inval
            } else {
                Errno::NoSpc
            });
        }
        Ok(())
    }

    fn handle_option(&mut self, exports: &dyn Exports, option: u32, data: &[u8]) {
        match option {
            opt::EXPORT_NAME => {
                let Ok(name) = core::str::from_utf8(data) else {
                    self.close(CloseReason::BadName);
                    return;
                };
                match exports.lookup(name) {
                    Some((id, info)) => {
                        let f = self.transmission_flags(&info);
                        let zeroes: &[u8] = if self.no_zeroes { &[] } else { &[0u8; 124] };
                        self.put(&[&info.size.to_be_bytes(), &f.to_be_bytes(), zeroes]);
                        self.export = Some((id, info));
                        self.enter_transmission();
                    }
                    // The protocol has no error reply here: close.
                    None => self.close(CloseReason::UnknownExport),
                }
            }
            opt::ABORT => {
                self.option_reply(option, rep::ACK, &[]);
                self.close(CloseReason::Abort);
            }
            opt::LIST => {
                if !data.is_empty() {
                    self.option_reply(option, rep::ERR_INVALID, b"NBD_OPT_LIST takes no data");
                    return;
                }
                self.listing = Some(0);
                self.continue_list(exports);
            }
            opt::INFO | opt::GO => self.info_or_go(exports, option, data),
            opt::STARTTLS => self.option_reply(option, rep::ERR_UNSUP, b"TLS is not supported"),
            opt::STRUCTURED_REPLY => {
                if !data.is_empty() {
                    self.option_reply(
                        option,
                        rep::ERR_INVALID,
                        b"NBD_OPT_STRUCTURED_REPLY takes no data",
                    );
                } else {
                    self.structured = true;
                    self.option_reply(option, rep::ACK, &[]);
                }
            }
            opt::LIST_META_CONTEXT | opt::SET_META_CONTEXT => {
                self.option_reply(option, rep::ERR_UNSUP, b"no metadata contexts")
            }
            _ => self.option_reply(option, rep::ERR_UNSUP, b"unknown option"),
        }
    }

    fn info_or_go(&mut self, exports: &dyn Exports, option: u32, data: &[u8]) {
        // u32 name length, name, u16 count, count x u16 info requests
        let parsed = (|| {
            let nlen = be32(data.get(0..4)?) as usize;
            let name = data.get(4..4 + nlen)?;
            let count = be16(data.get(4 + nlen..6 + nlen)?) as usize;
            let reqs = data.get(6 + nlen..)?;
            if reqs.len() != 2 * count {
                return None;
            }
            Some((name, reqs))
        })();
        let Some((name, reqs)) = parsed else {
            self.option_reply(option, rep::ERR_INVALID, b"malformed NBD_OPT_INFO/GO");
            return;
        };
        let Ok(name) = core::str::from_utf8(name) else {
            self.option_reply(option, rep::ERR_INVALID, b"export name is not UTF-8");
            return;
        };
        let Some((id, info)) = exports.lookup(name) else {
            self.option_reply(option, rep::ERR_UNKNOWN, b"no such export");
            return;
        };
        let wants = |t: u16| reqs.chunks_exact(2).any(|c| be16(c) == t);
        let mut d = [0u8; 12];
        d[..2].copy_from_slice(&info::EXPORT.to_be_bytes());
        d[2..10].copy_from_slice(&info.size.to_be_bytes());
        d[10..].copy_from_slice(&self.transmission_flags(&info).to_be_bytes());
        self.option_reply(option, rep::INFO, &d);
        if wants(info::NAME) {
            let mut h = [0u8; 22];
            h[..8].copy_from_slice(&REPLY_MAGIC.to_be_bytes());
            h[8..12].copy_from_slice(&option.to_be_bytes());
            h[12..16].copy_from_slice(&rep::INFO.to_be_bytes());
            h[16..20].copy_from_slice(&(2 + name.len() as u32).to_be_bytes());
            h[20..].copy_from_slice(&info::NAME.to_be_bytes());
            self.put(&[&h, name.as_bytes()]);
        }
        if wants(info::BLOCK_SIZE) {
            let mut d = [0u8; 14];
            d[..2].copy_from_slice(&info::BLOCK_SIZE.to_be_bytes());
            d[2..6].copy_from_slice(&info.min_block.to_be_bytes());
            d[6..10].copy_from_slice(&info.preferred_block.to_be_bytes());
            d[10..].copy_from_slice(&info.max_block.min(MAX_REQUEST).to_be_bytes());
            self.option_reply(option, rep::INFO, &d);
        }
        self.option_reply(option, rep::ACK, &[]);
        if option == opt::GO {
            self.export = Some((id, info));
            self.enter_transmission();
        }
    }

    /// Starts transmission. The request queue gets its room for every read
    /// that may be in flight now, so that decoding a read never allocates
    /// (it is within [`memory_bound`]'s terms anyway).
    fn enter_transmission(&mut self) {
        self.state = State::Transmission;
        if self.events.try_reserve(self.max_in_flight).is_err() {
            self.out_of_memory();
        }
    }

    /// Lets this connection's client write to the exports that take writes
    /// ([`ExportInfo::writable`]): the caller decides by the client's
    /// address before the handshake ends (the transmission flags say it).
    /// Without it every export is read-only to the client.
    pub fn allow_writes(&mut self, yes: bool) {
        // Once the flags are announced the answer stands: a client told
        // READ_ONLY is never let write, nor one told it may refused.
        if matches!(self.state, State::ClientFlags | State::Options) {
            self.may_write = yes;
        }
    }

    /// Payload bytes of the last [`Event::Write`] not yet handed over by
    /// [`Conn::take_payload`] (0 when none waits).
    pub fn payload_pending(&self) -> u32 {
        self.payload
    }

    /// Hands over the pending write's payload: copies into `dst` what the
    /// connection already holds of it (bytes that arrived with the header,
    /// at most [`INPUT_CAP`]), then from `data` (bytes fresh from the
    /// transport), at most [`Conn::payload_pending`] bytes in all and at
    /// most `dst.len()`. Nothing more is decoded here: once the payload is
    /// done the caller submits the write and calls [`Conn::resume`] for
    /// the requests after it. A write is submitted only on `done`: a
    /// connection that ends in the middle of a payload (the peer closed,
    /// a protocol error) hands over nothing more, and its write, never
    /// done, is answered and dropped.
    pub fn take_payload(&mut self, data: &[u8], dst: &mut [u8]) -> Payload {
        let want = (self.payload as usize).min(dst.len());
        let held = self.inb.len().min(want);
        dst[..held].copy_from_slice(&self.inb[..held]);
        self.inb.drain(..held);
        let from_data = data.len().min(want - held);
        dst[held..held + from_data].copy_from_slice(&data[..from_data]);
        let written = held + from_data;
        self.payload -= written as u32;
        Payload {
            from_data,
            written,
            done: written > 0 && self.payload == 0,
        }
    }

    /// Answers a WRITE, FLUSH, TRIM or WRITE_ZEROES ([`Event::Write`] and
    /// the others but reads): a simple reply, `Ok` or the error. Replies
    /// may come in any order.
    pub fn reply(&mut self, exports: &dyn Exports, handle: u64, result: Result<(), Errno>) {
        self.in_flight = self.in_flight.saturating_sub(1);
        if self.state == State::Closed {
            return;
        }
        self.simple_reply(handle, result.err().map_or(0, |e| e as u32));
        self.after_read_reply(exports);
    }

    /// Answers the read `handle` of `offset`: the data on success (exactly
    /// the requested length), an error otherwise. Replies may come in any
    /// order.
    pub fn reply_read(
        &mut self,
        exports: &dyn Exports,
        handle: u64,
        offset: u64,
        result: Result<&[u8], Errno>,
    ) {
        self.in_flight = self.in_flight.saturating_sub(1);
        if self.state == State::Closed {
            return;
        }
        match result {
            Ok(data) if self.structured => {
                let h = Self::chunk_header(chunk::OFFSET_DATA, handle, 8 + data.len() as u32);
                self.put(&[&h, &offset.to_be_bytes(), data]);
            }
            Ok(data) => {
                let mut h = [0u8; 16];
                h[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
                h[8..].copy_from_slice(&handle.to_be_bytes());
                self.put(&[&h, data]);
            }
            Err(e) => self.read_error(handle, e, e.message()),
        }
        self.after_read_reply(exports);
    }

    /// Answers the read `handle` of `offset` (`len` bytes of data, all
    /// there) without queueing it, when nothing waits before it in the
    /// output: hands `send` the reply's header (16 bytes, or 28 with
    /// structured replies: the OFFSET_DATA chunk header and its offset),
    /// which writes the header and then the data straight to the transport
    /// and says whether it had room for both. So a read's data is copied
    /// once, from its buffer to the transport, instead of into the output
    /// queue first. Returns whether the reply went out that way; when not
    /// (output waits, the connection is closing, `send` had no room)
    /// nothing changed and the caller answers with [`Conn::reply_read`].
    pub fn reply_read_direct(
        &mut self,
        exports: &dyn Exports,
        handle: u64,
        offset: u64,
        len: usize,
        send: impl FnOnce(&[u8]) -> bool,
    ) -> bool {
        if self.state != State::Transmission || !self.out.is_empty() || self.discard {
            return false;
        }
        let mut h = [0u8; READ_REPLY_HEADER_MAX];
        let n = if self.structured {
            let c = Self::chunk_header(chunk::OFFSET_DATA, handle, 8 + len as u32);
            h[..20].copy_from_slice(&c);
            h[20..].copy_from_slice(&offset.to_be_bytes());
            READ_REPLY_HEADER_MAX
        } else {
            h[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
            h[8..16].copy_from_slice(&handle.to_be_bytes());
            16
        };
        if !send(&h[..n]) {
            return false;
        }
        self.in_flight = self.in_flight.saturating_sub(1);
        self.after_read_reply(exports);
        true
    }

    /// Answers the read `handle` with error `err` and a message for the
    /// client (sent in an ERROR chunk once structured replies are on).
    pub fn reply_read_error(&mut self, exports: &dyn Exports, handle: u64, err: Errno, msg: &str) {
        self.in_flight = self.in_flight.saturating_sub(1);
        if self.state == State::Closed {
            return;
        }
        self.read_error(handle, err, msg);
        self.after_read_reply(exports);
    }

    fn after_read_reply(&mut self, exports: &dyn Exports) {
        if self.state == State::Closing {
            if self.out.is_empty() && self.in_flight == 0 {
                self.state = State::Closed;
            }
            return;
        }
        // Requests held back by the in-flight limit can now be decoded.
        self.process(exports);
    }
}

#[cfg(any(test, feature = "fuzzing"))]
pub mod session;
#[cfg(test)]
mod tests;
