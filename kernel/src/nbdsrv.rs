//! The NBD service: every regular file of the dxfs filesystem is an export
//! named by its path (without the leading slash; one is accepted), and
//! `nvme0n1` exports the raw namespace. Up to [`CONNS`] connections are
//! served at once on TCP port [`PORT`], each by a sans-IO
//! [`dioxide_net::nbd::Conn`]; file reads go through the DIO layer
//! (`dio_rw`: 4 KiB reads take the simple path), raw reads straight to the
//! queue.
//!
//! This first version serves each request synchronously from the run loop
//! (the read completes before the next request is decoded); requests that
//! are not aligned to the device block are served through an aligned bounce
//! buffer.

use crate::net::Net;
use crate::nvme::{self, DmaBuf};
use alloc::collections::BTreeMap;
use alloc::string::String;
use alloc::vec::Vec;
use dioxide_dxfs::{File, Fs};
use dioxide_iomap::{DioResult, IoBuf, Kiocb, Op};
use dioxide_net::nbd::{Conn, Errno, Event, ExportInfo, Exports, MAX_REQUEST};
use smoltcp::iface::SocketHandle;
use smoltcp::socket::tcp;

pub const PORT: u16 = 10809;
pub const CONNS: usize = 16;
const SOCKET_BUF: usize = 256 * 1024;
/// Stop serving requests of a connection while this much output waits.
const OUTPUT_HIGH: usize = 4 << 20;

enum Target {
    File(alloc::boxed::Box<File>),
    Raw,
}

struct Export {
    name: String,
    info: ExportInfo,
    target: Target,
}

/// The export table, built at start.
pub struct Table {
    exports: Vec<Export>,
    by_name: BTreeMap<String, u32>,
}

impl Exports for Table {
    fn lookup(&self, name: &str) -> Option<(u32, ExportInfo)> {
        let name = name.strip_prefix('/').unwrap_or(name);
        let id = *self.by_name.get(name)?;
        Some((id, self.exports[id as usize].info))
    }
    fn for_each_name(&self, f: &mut dyn FnMut(&str)) {
        for e in &self.exports {
            f(&e.name);
        }
    }
}

enum Slot {
    Listening,
    Serving(Conn),
    /// Closed by us; waiting for the socket to finish before listening again.
    Closing,
}

pub struct Server {
    table: Table,
    sockets: Vec<(SocketHandle, Slot)>,
    rx: Vec<u8>,
    lbs: u64,
    pub served: u64,
}

impl Server {
    /// Builds the export table and opens the listening sockets.
    pub fn new(
        net: &mut Net,
        fs: Option<&Fs<crate::storage::NvmeDisk>>,
        dev: &nvme::Nvme,
    ) -> Server {
        let lbs = dev.ns.block_size;
        let mut exports = Vec::new();
        if let Some(fs) = fs {
            match fs.walk() {
                Ok(entries) => {
                    for e in entries.into_iter().filter(|e| e.inode.is_file()) {
                        match fs.open(e.ino) {
                            Ok(f) => exports.push(Export {
                                name: String::from(&e.path[1..]),
                                // Any alignment is served (through an aligned
                                // bounce), and file sizes need not be block
                                // multiples: a client must not round them.
                                info: ExportInfo {
                                    size: f.size(),
                                    min_block: 1,
                                    preferred_block: fs.block_size(),
                                    max_block: MAX_REQUEST,
                                },
                                target: Target::File(alloc::boxed::Box::new(f)),
                            }),
                            Err(err) => log::warn!(target: "nbd", "{} not exported: {err}", e.path),
                        }
                    }
                }
                Err(err) => log::warn!(target: "nbd", "file exports unavailable: {err}"),
            }
        }
        exports.push(Export {
            name: "nvme0n1".into(),
            info: ExportInfo {
                size: dev.ns.bytes(),
                min_block: lbs,
                preferred_block: 4096.max(lbs),
                max_block: MAX_REQUEST,
            },
            target: Target::Raw,
        });
        let by_name = exports
            .iter()
            .enumerate()
            .map(|(i, e)| (e.name.clone(), i as u32))
            .collect();
        let mut sockets = Vec::with_capacity(CONNS);
        for _ in 0..CONNS {
            let mut s = tcp::Socket::new(
                tcp::SocketBuffer::new(alloc::vec![0u8; SOCKET_BUF]),
                tcp::SocketBuffer::new(alloc::vec![0u8; SOCKET_BUF]),
            );
            s.set_nagle_enabled(false);
            let _ = s.listen(PORT);
            sockets.push((net.sockets.add(s), Slot::Listening));
        }
        log::info!(target: "nbd", "listening on port {PORT}: {} exports ({} files and nvme0n1)", exports.len(), exports.len() - 1);
        Server {
            table: Table { exports, by_name },
            sockets,
            rx: alloc::vec![0u8; 64 * 1024],
            lbs: lbs as u64,
            served: 0,
        }
    }

    /// Logs the state of busy connections (debugging aid, `log=trace`).
    pub fn trace(&self, net: &mut Net) {
        for (h, slot) in &self.sockets {
            if let Slot::Serving(c) = slot {
                let s = net.sockets.get_mut::<tcp::Socket>(*h);
                log::trace!(
                    target: "nbd",
                    "conn: state {:?} out {} send_queue {} recv_queue {} in_flight {}",
                    s.state(), c.output().len(), s.send_queue(), s.recv_queue(), c.in_flight()
                );
            }
        }
    }

    /// Serves every connection as far as it can go without waiting.
    pub fn poll(&mut self, net: &mut Net) {
        for i in 0..self.sockets.len() {
            let h = self.sockets[i].0;
            let sock = net.sockets.get_mut::<tcp::Socket>(h);
            let slot = &mut self.sockets[i].1;
            match slot {
                Slot::Listening => {
                    if sock.is_active() {
                        log::debug!(target: "nbd", "connection from {:?}", sock.remote_endpoint());
                        *slot = Slot::Serving(Conn::new(64));
                    } else if !sock.is_open() {
                        let _ = sock.listen(PORT);
                    }
                }
                Slot::Closing => {
                    if !sock.is_open() {
                        let _ = sock.listen(PORT);
                        *slot = Slot::Listening;
                    }
                }
                Slot::Serving(_) => {}
            }
            let Slot::Serving(conn) = slot else { continue };
            while sock.can_recv() {
                match sock.recv_slice(&mut self.rx) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => conn.receive(&self.table, &self.rx[..n]),
                }
            }
            // The peer finished sending (FIN received) or the connection is
            // gone. (Before Established, may_recv() is false too: not that.)
            let peer_done = matches!(
                sock.state(),
                tcp::State::CloseWait
                    | tcp::State::LastAck
                    | tcp::State::Closing
                    | tcp::State::TimeWait
                    | tcp::State::Closed
            );
            if peer_done && !sock.can_recv() && !conn.is_closed() {
                conn.peer_closed();
            }
            while conn.output().len() < OUTPUT_HIGH {
                let Some(ev) = conn.next_event() else { break };
                let Event::Read {
                    handle,
                    export,
                    offset,
                    len,
                } = ev;
                log::trace!(target: "nbd", "read export {export} at {offset} len {len}");
                let result = read(&self.table, self.lbs, export, offset, len);
                log::trace!(target: "nbd", "read done: {:?}", result.as_ref().err());
                self.served += 1;
                match result {
                    Ok(buf) => {
                        let skew = (offset % self.lbs) as usize;
                        conn.reply_read(
                            &self.table,
                            handle,
                            Ok(&buf.as_slice()[skew..skew + len as usize]),
                        );
                    }
                    Err(e) => conn.reply_read(&self.table, handle, Err(e)),
                }
            }
            while !conn.output().is_empty() && sock.can_send() {
                match sock.send_slice(conn.output()) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => conn.consume_output(n),
                }
            }
            if (conn.is_closed() || !sock.is_open())
                && (conn.output().is_empty() || !sock.may_send())
            {
                sock.close();
                *slot = Slot::Closing;
            }
        }
    }
}

/// Reads `[offset, offset + len)` of an export into a buffer that starts at
/// the block boundary below `offset`.
fn read(t: &Table, lbs: u64, export: u32, offset: u64, len: u32) -> Result<DmaBuf, Errno> {
    let e = t.exports.get(export as usize).ok_or(Errno::Inval)?;
    let a0 = offset / lbs * lbs;
    let a1 = (offset + len as u64).div_ceil(lbs) * lbs;
    let n = (a1 - a0) as usize;
    let mut buf = DmaBuf::new(n).ok_or(Errno::NoMem)?;
    match &e.target {
        Target::File(f) => {
            let iob = buf.part(0, n);
            // SAFETY: `buf` is owned here; the call is synchronous.
            let r = nvme::with_engine(|eng| unsafe {
                eng.dio_rw(&Kiocb::sync(a0), Op::Read, iob, &**f, None, 0, 0)
            });
            match r {
                Some(Ok(DioResult::Done(got))) if got as u64 >= offset + len as u64 - a0 => Ok(buf),
                Some(Ok(_)) => Err(Errno::Io),
                Some(Err(err)) => {
                    log::warn!(target: "nbd", "read of {} at {offset}: {err}", e.name);
                    Err(Errno::Io)
                }
                None => Err(Errno::Io),
            }
        }
        Target::Raw => {
            let max = 256 * 1024;
            let mut done = 0usize;
            while done < n {
                let c = (n - done).min(max);
                let iob: IoBuf = buf.part(done, c);
                let lba = (a0 + done as u64) / lbs;
                // SAFETY: as above.
                let r = nvme::with_engine(|eng| unsafe { eng.raw(Op::Read, lba, iob, None) });
                match r {
                    Some(Ok(_)) => done += c,
                    Some(Err(err)) => {
                        log::warn!(target: "nbd", "raw read at {offset}: {err}");
                        return Err(Errno::Io);
                    }
                    None => return Err(Errno::Io),
                }
            }
            Ok(buf)
        }
    }
}
