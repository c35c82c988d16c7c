//! A sans-IO NBD client: the fixed newstyle handshake (NBD_OPT_STRUCTURED_REPLY
//! when asked for, then NBD_OPT_GO), then reads — and writes, flushes,
//! trims and write-zeroes ([`Client::command`]) — for the service's
//! loopback self-test, its host tests and the host benchmark of the whole
//! request path. Like
//! [`Conn`](crate::Conn) it owns no socket: it is fed what arrived
//! ([`Client::receive`]) and yields what to send ([`Client::output`]).
//!
//! It allocates only in [`Client::new`] (its buffers, sized for
//! `max_in_flight` reads of at most `max_read` bytes), so a run of reads
//! through it allocates nothing per read: the no-allocation self-test
//! counts the client's heap use along with the server's.
//!
//! Each reply's data is summed ([`Reply::sum`], FNV-1a) rather than kept,
//! so a caller can check contents without holding them.

use crate::*;
use alloc::vec::Vec;

/// Why the client gave up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientError {
    /// The greeting was not NBD fixed newstyle.
    BadGreeting,
    /// An option reply or a reply had the wrong magic.
    BadMagic,
    /// The server refused NBD_OPT_GO (its reply type).
    Refused(u32),
    /// A reply named a handle not in flight, or a length not asked for.
    UnexpectedReply,
    /// More reads than `max_in_flight`, or one longer than `max_read`.
    TooMany,
}

impl core::fmt::Display for ClientError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            ClientError::BadGreeting => f.write_str("not an NBD fixed newstyle server"),
            ClientError::BadMagic => f.write_str("reply with a wrong magic"),
            ClientError::Refused(t) => write!(f, "NBD_OPT_GO refused (reply type {t:#x})"),
            ClientError::UnexpectedReply => f.write_str("reply to no read in flight"),
            ClientError::TooMany => f.write_str("read beyond the client's limits"),
        }
    }
}

impl core::error::Error for ClientError {}

/// A finished read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reply {
    pub handle: u64,
    /// 0, or the NBD error.
    pub error: u32,
    /// Data bytes received.
    pub len: u32,
    /// FNV-1a of the data.
    pub sum: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Greeting,
    Options,
    Ready,
    Failed(ClientError),
}

/// FNV-1a, continued from `h`.
pub fn fnv1a(mut h: u64, data: &[u8]) -> u64 {
    for &b in data {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// FNV-1a's starting value.
pub const FNV_START: u64 = 0xcbf2_9ce4_8422_2325;

/// A read in flight: its length, data bytes seen so far and their sum.
#[derive(Clone, Copy, Default)]
struct Slot {
    busy: bool,
    len: u32,
    got: u32,
    sum: u64,
}

pub struct Client {
    state: State,
    want_structured: bool,
    structured: bool,
    size: u64,
    out: Vec<u8>,
    sent: usize,
    inb: Vec<u8>,
    /// Reads in flight by handle (the slot index).
    slots: Vec<Slot>,
    in_flight: usize,
    max_read: usize,
    /// Data of the reply being received: handle and bytes still to come
    /// (replies are parsed as their data arrives, never buffered whole).
    data: Option<(usize, usize)>,
    replies: Vec<Reply>,
}

impl Client {
    /// A client for export `name`, asking for structured replies when
    /// `structured`, with at most `max_in_flight` reads of at most
    /// `max_read` bytes each.
    pub fn new(name: &str, structured: bool, max_in_flight: usize, max_read: usize) -> Client {
        let mut out = Vec::with_capacity(64 + name.len() + 28 * max_in_flight);
        out.extend_from_slice(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes());
        if structured {
            out.extend_from_slice(&IHAVEOPT.to_be_bytes());
            out.extend_from_slice(&opt::STRUCTURED_REPLY.to_be_bytes());
            out.extend_from_slice(&0u32.to_be_bytes());
        }
        out.extend_from_slice(&IHAVEOPT.to_be_bytes());
        out.extend_from_slice(&opt::GO.to_be_bytes());
        out.extend_from_slice(&(4 + name.len() as u32 + 2).to_be_bytes());
        out.extend_from_slice(&(name.len() as u32).to_be_bytes());
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(&0u16.to_be_bytes());
        Client {
            state: State::Greeting,
            want_structured: structured,
            structured: false,
            size: 0,
            out,
            sent: 0,
            // A header, an option reply's data (names are short), or a
            // reply header: data is summed as it arrives.
            inb: Vec::with_capacity(64 * 1024 + 64),
            slots: alloc::vec![Slot::default(); max_in_flight.max(1)],
            in_flight: 0,
            max_read,
            data: None,
            replies: Vec::with_capacity(max_in_flight.max(1)),
        }
    }

    /// The handshake is done: reads may be sent.
    pub fn is_ready(&self) -> bool {
        self.state == State::Ready
    }

    /// Why the client stopped, if it did.
    pub fn error(&self) -> Option<ClientError> {
        match self.state {
            State::Failed(e) => Some(e),
            _ => None,
        }
    }

    /// The export's size (known once ready).
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Structured replies were negotiated.
    pub fn structured(&self) -> bool {
        self.structured
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Bytes to send.
    pub fn output(&self) -> &[u8] {
        &self.out[self.sent..]
    }

    /// `n` bytes of [`Client::output`] were sent.
    pub fn consume_output(&mut self, n: usize) {
        self.sent = (self.sent + n).min(self.out.len());
        if self.sent == self.out.len() {
            self.out.clear();
            self.sent = 0;
        }
    }

    /// Sends a read of `len` bytes at `offset`; returns its handle.
    pub fn read(&mut self, offset: u64, len: u32) -> Result<u64, ClientError> {
        if len as usize > self.max_read {
            return Err(ClientError::TooMany);
        }
        self.request(cmd::READ, 0, offset, len, &[], len)
    }

    /// Sends any other command (`cmd::WRITE` with `payload` as its data,
    /// `FLUSH`, `TRIM`, `WRITE_ZEROES`) with command flags `flags`
    /// (`cflag`); `len` is the request's length field (for a write, the
    /// payload's length is used). Its reply is a [`Reply`] with no data.
    /// The output grows for a payload beyond its capacity (reads alone
    /// never make it grow).
    pub fn command(
        &mut self,
        ty: u16,
        flags: u16,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) -> Result<u64, ClientError> {
        if ty == cmd::READ || payload.len() > u32::MAX as usize {
            return Err(ClientError::TooMany);
        }
        let len = if ty == cmd::WRITE {
            payload.len() as u32
        } else {
            len
        };
        self.request(ty, flags, offset, len, payload, 0)
    }

    /// Queues request `ty` and its payload; the reply is expected to carry
    /// `data` bytes.
    fn request(
        &mut self,
        ty: u16,
        flags: u16,
        offset: u64,
        len: u32,
        payload: &[u8],
        data: u32,
    ) -> Result<u64, ClientError> {
        let Some(h) = self.slots.iter().position(|s| !s.busy) else {
            return Err(ClientError::TooMany);
        };
        self.slots[h] = Slot {
            busy: true,
            len: data,
            got: 0,
            sum: FNV_START,
        };
        self.in_flight += 1;
        // Drop what was sent before appending: the buffer keeps the
        // capacity it was made with (no allocation per read).
        if self.sent > 0 {
            self.out.drain(..self.sent);
            self.sent = 0;
        }
        let mut r = [0u8; 28];
        r[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        r[4..6].copy_from_slice(&flags.to_be_bytes());
        r[6..8].copy_from_slice(&ty.to_be_bytes());
        r[8..16].copy_from_slice(&(h as u64).to_be_bytes());
        r[16..24].copy_from_slice(&offset.to_be_bytes());
        r[24..].copy_from_slice(&len.to_be_bytes());
        self.out.extend_from_slice(&r);
        self.out.extend_from_slice(payload);
        Ok(h as u64)
    }

    /// Finished reads since the last call, in arrival order.
    pub fn replies(&mut self) -> impl Iterator<Item = Reply> + '_ {
        self.replies.drain(..)
    }

    /// Feeds what arrived (all of it is taken).
    pub fn receive(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            if let State::Failed(_) = self.state {
                return;
            }
            // Data of a reply: summed as it passes.
            if let Some((h, left)) = self.data {
                let n = left.min(data.len());
                let slot = &mut self.slots[h];
                slot.sum = fnv1a(slot.sum, &data[..n]);
                slot.got += n as u32;
                data = &data[n..];
                if left == n {
                    self.data = None;
                    self.finish(h, 0);
                } else {
                    self.data = Some((h, left - n));
                }
                continue;
            }
            // Gather the item: its header says how long the rest is.
            let mut need = self.need();
            while self.inb.len() < need && !data.is_empty() {
                let n = (need - self.inb.len()).min(data.len());
                self.inb.extend_from_slice(&data[..n]);
                data = &data[n..];
                need = self.need();
            }
            if self.inb.len() < need {
                return;
            }
            if let Err(e) = self.parse() {
                self.state = State::Failed(e);
            }
        }
    }

    /// Bytes the next item needs in `inb` before it can be parsed.
    fn need(&self) -> usize {
        let b = &self.inb;
        match self.state {
            State::Greeting => 18,
            State::Options if b.len() < 20 => 20,
            State::Options => 20 + be32(&b[16..]) as usize,
            // A simple reply may answer any command but a read.
            State::Ready if self.structured && b.len() < 4 => 4,
            State::Ready if self.structured && be32(b) == SIMPLE_REPLY_MAGIC => 16,
            State::Ready if self.structured && b.len() < 20 => 20,
            State::Ready if self.structured => {
                let ty = be16(&b[6..]);
                if ty == chunk::OFFSET_DATA {
                    28
                } else {
                    20 + be32(&b[16..]) as usize
                }
            }
            State::Ready => 16,
            State::Failed(_) => 0,
        }
    }

    fn parse(&mut self) -> Result<(), ClientError> {
        let b = core::mem::take(&mut self.inb);
        let r = self.parse_item(&b);
        self.inb = b;
        self.inb.clear();
        r
    }

    fn parse_item(&mut self, b: &[u8]) -> Result<(), ClientError> {
        match self.state {
            State::Greeting => {
                if be64(b) != NBDMAGIC
                    || be64(&b[8..]) != IHAVEOPT
                    || be16(&b[16..]) & FLAG_FIXED_NEWSTYLE == 0
                {
                    return Err(ClientError::BadGreeting);
                }
                self.state = State::Options;
            }
            State::Options => {
                if be64(b) != REPLY_MAGIC {
                    return Err(ClientError::BadMagic);
                }
                let (option, ty) = (be32(&b[8..]), be32(&b[12..]));
                let d = &b[20..];
                match (option, ty) {
                    (opt::STRUCTURED_REPLY, t) => {
                        self.structured = self.want_structured && t == rep::ACK
                    }
                    (opt::GO, rep::INFO) if d.len() >= 12 && be16(d) == info::EXPORT => {
                        self.size = be64(&d[2..]);
                    }
                    (opt::GO, rep::INFO) => {}
                    (opt::GO, rep::ACK) => self.state = State::Ready,
                    (_, t) => return Err(ClientError::Refused(t)),
                }
            }
            State::Ready if self.structured && be32(b) == SIMPLE_REPLY_MAGIC => {
                let (err, h) = (be32(&b[4..]), be64(&b[8..]) as usize);
                let slot = self.slot(h)?;
                if err == 0 && slot.len != 0 {
                    // Reads are answered in chunks once they are on.
                    return Err(ClientError::UnexpectedReply);
                }
                self.finish(h, err);
            }
            State::Ready if self.structured => {
                if be32(b) != STRUCTURED_REPLY_MAGIC {
                    return Err(ClientError::BadMagic);
                }
                let (flags, ty, h) = (be16(&b[4..]), be16(&b[6..]), be64(&b[8..]) as usize);
                let len = be32(&b[16..]) as usize;
                let slot = self.slot(h)?;
                match ty {
                    chunk::OFFSET_DATA => {
                        let n = len.checked_sub(8).ok_or(ClientError::UnexpectedReply)?;
                        if slot.got as usize + n > slot.len as usize
                            || flags & chunk::FLAG_DONE == 0
                        {
                            // Replies split in several chunks are not asked for.
                            return Err(ClientError::UnexpectedReply);
                        }
                        if n == 0 {
                            self.finish(h, 0);
                        } else {
                            self.data = Some((h, n));
                        }
                    }
                    _ => {
                        let err = if b.len() >= 24 { be32(&b[20..]) } else { 5 };
                        self.finish(h, err.max(1));
                    }
                }
            }
            State::Ready => {
                if be32(b) != SIMPLE_REPLY_MAGIC {
                    return Err(ClientError::BadMagic);
                }
                let (err, h) = (be32(&b[4..]), be64(&b[8..]) as usize);
                let slot = self.slot(h)?;
                if err != 0 || slot.len == 0 {
                    self.finish(h, err);
                } else {
                    self.data = Some((h, slot.len as usize));
                }
            }
            State::Failed(_) => {}
        }
        Ok(())
    }

    fn slot(&self, h: usize) -> Result<Slot, ClientError> {
        match self.slots.get(h) {
            Some(s) if s.busy => Ok(*s),
            _ => Err(ClientError::UnexpectedReply),
        }
    }

    fn finish(&mut self, h: usize, error: u32) {
        let Some(s) = self.slots.get_mut(h) else {
            return;
        };
        s.busy = false;
        self.in_flight -= 1;
        self.replies.push(Reply {
            handle: h as u64,
            error,
            len: s.got,
            sum: s.sum,
        });
    }
}
