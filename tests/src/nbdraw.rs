//! A minimal NBD client over a raw socket, for requests real clients never
//! send and for replies they do not show (error messages).

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
pub const READ: u16 = 0;
pub const WRITE: u16 = 1;
pub const DISC: u16 = 2;
pub const FLUSH: u16 = 3;
pub const TRIM: u16 = 4;
pub const BLOCK_STATUS: u16 = 7;
pub const WRITE_ZEROES: u16 = 6;
pub const ACK: u32 = 1;
pub const SERVER: u32 = 2;
pub const INFO: u32 = 3;
pub const ERR_UNSUP: u32 = (1 << 31) + 1;
pub const ERR_UNKNOWN: u32 = (1 << 31) + 6;

pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const OPT_INFO: u32 = 6;
pub const OPT_LIST: u32 = 3;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const INFO_EXPORT: u16 = 0;
pub const INFO_BLOCK_SIZE: u16 = 3;
pub const EINVAL: u32 = 22;

/// An option as sent: IHAVEOPT, the option, its length and data.
pub fn option_bytes(opt: u32, data: &[u8]) -> Vec<u8> {
    let mut m = IHAVEOPT.to_be_bytes().to_vec();
    m.extend(opt.to_be_bytes());
    m.extend((data.len() as u32).to_be_bytes());
    m.extend(data);
    m
}

/// The data of NBD_OPT_GO for `name` (no information requests).
pub fn go_data(name: &str) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend(name.as_bytes());
    d.extend(0u16.to_be_bytes());
    d
}

/// A request header as sent.
pub fn request_bytes(ty: u16, flags: u16, handle: u64, offset: u64, len: u32) -> [u8; 28] {
    let mut m = [0u8; 28];
    m[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    m[4..6].copy_from_slice(&flags.to_be_bytes());
    m[6..8].copy_from_slice(&ty.to_be_bytes());
    m[8..16].copy_from_slice(&handle.to_be_bytes());
    m[16..24].copy_from_slice(&offset.to_be_bytes());
    m[24..].copy_from_slice(&len.to_be_bytes());
    m
}

/// What NBD_OPT_INFO/GO said about an export.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Info {
    pub size: u64,
    /// (minimum, preferred, maximum) from NBD_INFO_BLOCK_SIZE.
    pub block: Option<(u32, u32, u32)>,
}

pub struct Client {
    pub s: TcpStream,
}

impl Client {
    /// Connected; the greeting is read when `greet`.
    pub fn connect(port: u16) -> Client {
        Client::connect_to(std::net::SocketAddr::from(([127, 0, 0, 1], port)))
    }
    /// A connection to `addr` (a tap guest's, say).
    pub fn connect_to(addr: std::net::SocketAddr) -> Client {
        let s = TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
        s.set_nodelay(true).unwrap();
        Client { s }
    }
    pub fn greeted(port: u16) -> Client {
        let mut c = Client::connect(port);
        let g = c.read_n(18);
        assert_eq!(&g[..16], b"NBDMAGICIHAVEOPT");
        c.send(&3u32.to_be_bytes());
        c
    }
    /// Like [`Client::greeted`], but a connection closed before the
    /// greeting, or no greeting within `timeout`, is an error, not a panic:
    /// behind QEMU's user networking a server with no free socket accepts
    /// on the host side and then closes.
    pub fn try_greeting(port: u16, timeout: Duration) -> std::io::Result<Client> {
        Client::try_greeting_at(std::net::SocketAddr::from(([127, 0, 0, 1], port)), timeout)
    }
    /// [`Client::try_greeting`] to `addr`.
    pub fn try_greeting_at(
        addr: std::net::SocketAddr,
        timeout: Duration,
    ) -> std::io::Result<Client> {
        let mut c = Client::connect_to(addr);
        let mut g = [0u8; 18];
        c.s.set_read_timeout(Some(timeout))?;
        c.s.read_exact(&mut g).map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("{e} (greeting, local address {:?})", c.s.local_addr()),
            )
        })?;
        c.s.set_read_timeout(Some(Duration::from_secs(120)))?;
        assert_eq!(&g[..16], b"NBDMAGICIHAVEOPT");
        c.send(&3u32.to_be_bytes());
        Ok(c)
    }
    /// SO_LINGER 0: dropping the client resets the connection (RST)
    /// instead of closing it (FIN).
    pub fn reset_on_drop(&self) {
        use std::os::fd::AsRawFd;
        let l = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        // SAFETY: a valid socket and a `linger` of the size passed.
        let r = unsafe {
            libc::setsockopt(
                self.s.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                (&l as *const libc::linger).cast(),
                std::mem::size_of::<libc::linger>() as libc::socklen_t,
            )
        };
        assert_eq!(r, 0, "SO_LINGER: {}", std::io::Error::last_os_error());
    }
    /// Greeted (retrying for up to 30 s while every connection is taken or a
    /// socket is being recycled), then NBD_OPT_GO: the export's size.
    pub fn open(port: u16, name: &str) -> (Client, u64) {
        let mut c = Client::greeted_within(port, Duration::from_secs(30));
        let size = c
            .go(name)
            .unwrap_or_else(|t| panic!("GO {name}: reply {t:#x}"));
        (c, size)
    }
    pub fn send(&mut self, b: &[u8]) {
        self.s.write_all(b).expect("send");
    }
    pub fn read_n(&mut self, n: usize) -> Vec<u8> {
        let mut b = vec![0u8; n];
        self.s.read_exact(&mut b).expect("read");
        b
    }
    /// True when the server closed the connection (EOF or reset).
    pub fn closed(&mut self) -> bool {
        let mut b = [0u8; 4096];
        loop {
            match self.s.read(&mut b) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e) if e.kind() == ErrorKind::ConnectionReset => return true,
                Err(_) => return false,
            }
        }
    }
    pub fn option(&mut self, opt: u32, data: &[u8]) -> Vec<(u32, Vec<u8>)> {
        self.send(&option_bytes(opt, data));
        let mut replies = Vec::new();
        loop {
            let h = self.read_n(20);
            assert_eq!(&h[..8], &0x0003_e889_0455_65a9u64.to_be_bytes());
            assert_eq!(u32::from_be_bytes(h[8..12].try_into().unwrap()), opt);
            let ty = u32::from_be_bytes(h[12..16].try_into().unwrap());
            let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
            let d = self.read_n(len);
            replies.push((ty, d));
            if ty != SERVER && ty != INFO {
                return replies;
            }
        }
    }
    /// NBD_OPT_GO: the export size, or the final reply type.
    pub fn go(&mut self, name: &str) -> Result<u64, u32> {
        let r = self.option(OPT_GO, &go_data(name));
        let last = r.last().expect("a reply").0;
        if last != ACK {
            return Err(last);
        }
        let info = r
            .iter()
            .find(|(t, d)| *t == INFO && d[..2] == [0, 0])
            .expect("NBD_INFO_EXPORT");
        Ok(u64::from_be_bytes(info.1[2..10].try_into().unwrap()))
    }
    pub fn request(&mut self, ty: u16, flags: u16, handle: u64, offset: u64, len: u32) {
        self.send(&request_bytes(ty, flags, handle, offset, len));
    }
    /// A simple reply: (handle, error), then `data_len` bytes when the
    /// error is 0.
    pub fn reply(&mut self, data_len: usize) -> (u64, u32, Vec<u8>) {
        let h = self.read_n(16);
        assert_eq!(&h[..4], &0x6744_6698u32.to_be_bytes(), "simple reply magic");
        let err = u32::from_be_bytes(h[4..8].try_into().unwrap());
        let handle = u64::from_be_bytes(h[8..16].try_into().unwrap());
        let data = if err == 0 {
            self.read_n(data_len)
        } else {
            Vec::new()
        };
        (handle, err, data)
    }
    /// One read, waited for.
    pub fn read_at(&mut self, offset: u64, len: u32) -> Result<Vec<u8>, u32> {
        self.request(READ, 0, 0xabc, offset, len);
        let (h, err, data) = self.reply(len as usize);
        assert_eq!(h, 0xabc);
        if err == 0 {
            Ok(data)
        } else {
            Err(err)
        }
    }
}

impl Client {
    /// NBD_OPT_STRUCTURED_REPLY; true when the server agreed.
    pub fn structured(&mut self) -> bool {
        self.option(OPT_STRUCTURED_REPLY, &[])
            .last()
            .is_some_and(|r| r.0 == ACK)
    }
    /// One structured reply chunk: (flags, type, handle, payload).
    pub fn chunk(&mut self) -> (u16, u16, u64, Vec<u8>) {
        let h = self.read_n(20);
        assert_eq!(
            &h[..4],
            &0x668e_33efu32.to_be_bytes(),
            "structured reply magic"
        );
        let flags = u16::from_be_bytes(h[4..6].try_into().unwrap());
        let ty = u16::from_be_bytes(h[6..8].try_into().unwrap());
        let handle = u64::from_be_bytes(h[8..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
        (flags, ty, handle, self.read_n(len))
    }
    /// One read over structured replies: the data, or the error number and
    /// the server's message.
    pub fn read_structured(
        &mut self,
        handle: u64,
        offset: u64,
        len: u32,
    ) -> Result<Vec<u8>, (u32, String)> {
        self.request(READ, 0, handle, offset, len);
        let (flags, ty, h, payload) = self.chunk();
        assert_eq!(h, handle, "reply to another request");
        assert_eq!(flags & 1, 1, "one chunk per read (DONE)");
        match ty {
            1 => {
                assert_eq!(u64::from_be_bytes(payload[..8].try_into().unwrap()), offset);
                Ok(payload[8..].to_vec())
            }
            0x8001 => {
                let err = u32::from_be_bytes(payload[..4].try_into().unwrap());
                let n = u16::from_be_bytes(payload[4..6].try_into().unwrap()) as usize;
                Err((
                    err,
                    String::from_utf8_lossy(&payload[6..6 + n]).into_owned(),
                ))
            }
            t => panic!("unexpected chunk type {t:#x}"),
        }
    }
}

/// Helpers of the limit tests.
impl Client {
    /// Connects and takes the greeting; `None` when the server refuses or
    /// closes the connection instead (within `within`).
    pub fn try_greeted(port: u16, within: Duration) -> Option<Client> {
        let s = match TcpStream::connect(("127.0.0.1", port)) {
            Ok(s) => s,
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => return None,
            Err(e) => panic!("connect: {e}"),
        };
        s.set_read_timeout(Some(within)).unwrap();
        s.set_nodelay(true).unwrap();
        let mut c = Client { s };
        let mut g = [0u8; 18];
        match c.s.read_exact(&mut g) {
            Ok(()) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::UnexpectedEof
                        | ErrorKind::ConnectionReset
                        | ErrorKind::ConnectionAborted
                ) =>
            {
                return None
            }
            Err(e) => panic!("no greeting and no close within {within:?}: {e}"),
        }
        assert_eq!(&g[..16], b"NBDMAGICIHAVEOPT");
        c.s.set_read_timeout(Some(Duration::from_secs(120)))
            .unwrap();
        c.send(&3u32.to_be_bytes());
        Some(c)
    }

    /// Greeted, retrying for up to `within` while the server refuses (a
    /// socket of a closed connection may not be listening again yet).
    pub fn greeted_within(port: u16, within: Duration) -> Client {
        let t0 = Instant::now();
        loop {
            if let Some(c) = Client::try_greeted(port, Duration::from_secs(30)) {
                return c;
            }
            assert!(
                t0.elapsed() < within,
                "the server refused connections for {within:?}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// NBD_OPT_INFO or NBD_OPT_GO asking for the block sizes: what the
    /// server said, or its final reply type when not ACK.
    pub fn info_or_go(&mut self, opt: u32, name: &str) -> Result<Info, u32> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend(name.as_bytes());
        d.extend(1u16.to_be_bytes());
        d.extend(INFO_BLOCK_SIZE.to_be_bytes());
        let r = self.option(opt, &d);
        let last = r.last().expect("a reply").0;
        if last != REP_ACK {
            return Err(last);
        }
        let info = |t: u16| {
            r.iter()
                .find(|(ty, d)| *ty == REP_INFO && d.len() >= 2 && d[..2] == t.to_be_bytes())
                .map(|(_, d)| d[2..].to_vec())
        };
        let export = info(INFO_EXPORT).expect("NBD_INFO_EXPORT");
        assert_eq!(export.len(), 10, "NBD_INFO_EXPORT length");
        let block = info(INFO_BLOCK_SIZE).map(|b| {
            assert_eq!(b.len(), 12, "NBD_INFO_BLOCK_SIZE length");
            (be32(&b), be32(&b[4..]), be32(&b[8..]))
        });
        Ok(Info {
            size: be64(&export),
            block,
        })
    }

    /// A simple reply's header: (handle, error).
    pub fn reply_header(&mut self) -> (u64, u32) {
        let h = self.read_n(16);
        assert_eq!(be32(&h), SIMPLE_REPLY_MAGIC, "simple reply magic");
        (be64(&h[8..]), be32(&h[4..]))
    }

    /// NBD_CMD_DISC, then waits for the server to close.
    pub fn disconnect(mut self) {
        self.request(DISC, 0, 0, 0, 0);
        assert!(self.closed(), "not closed after NBD_CMD_DISC");
    }
}
fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().unwrap())
}
fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().unwrap())
}
