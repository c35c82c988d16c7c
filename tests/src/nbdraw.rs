//! A minimal NBD client over a raw socket (std `TcpStream`), for the
//! requests and patterns real clients never produce: many requests sent
//! before any reply is read, exact error values, the option replies as
//! sent. Panics on anything unexpected, with what it expected.

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const READ: u16 = 0;
pub const DISC: u16 = 2;
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const INFO_EXPORT: u16 = 0;
pub const INFO_BLOCK_SIZE: u16 = 3;
pub const EINVAL: u32 = 22;

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

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().unwrap())
}
fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().unwrap())
}

impl Client {
    /// Connected (not yet greeted); reads time out after 120 s.
    pub fn connect(port: u16) -> Client {
        let s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
        s.set_nodelay(true).unwrap();
        Client { s }
    }

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

    /// Greeted and in transmission on export `name`; its size.
    pub fn open(port: u16, name: &str) -> (Client, u64) {
        let mut c = Client::greeted_within(port, Duration::from_secs(30));
        let info = c
            .info_or_go(OPT_GO, name)
            .unwrap_or_else(|t| panic!("GO {name}: reply {t:#x}"));
        (c, info.size)
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

    /// Sends an option and reads its replies up to the final one.
    pub fn option(&mut self, opt: u32, data: &[u8]) -> Vec<(u32, Vec<u8>)> {
        let mut m = IHAVEOPT.to_be_bytes().to_vec();
        m.extend(opt.to_be_bytes());
        m.extend((data.len() as u32).to_be_bytes());
        m.extend(data);
        self.send(&m);
        let mut replies = Vec::new();
        loop {
            let h = self.read_n(20);
            assert_eq!(be64(&h), OPT_REPLY_MAGIC, "option reply magic");
            assert_eq!(be32(&h[8..]), opt, "option of the reply");
            let ty = be32(&h[12..]);
            let len = be32(&h[16..]) as usize;
            let d = self.read_n(len);
            replies.push((ty, d));
            if ty != REP_SERVER && ty != REP_INFO {
                return replies;
            }
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

    pub fn request(&mut self, ty: u16, flags: u16, handle: u64, offset: u64, len: u32) {
        let mut m = REQUEST_MAGIC.to_be_bytes().to_vec();
        m.extend(flags.to_be_bytes());
        m.extend(ty.to_be_bytes());
        m.extend(handle.to_be_bytes());
        m.extend(offset.to_be_bytes());
        m.extend(len.to_be_bytes());
        self.send(&m);
    }

    /// A simple reply's header: (handle, error).
    pub fn reply_header(&mut self) -> (u64, u32) {
        let h = self.read_n(16);
        assert_eq!(be32(&h), SIMPLE_REPLY_MAGIC, "simple reply magic");
        (be64(&h[8..]), be32(&h[4..]))
    }

    /// One read, waited for: its data or the error value.
    pub fn read_at(&mut self, offset: u64, len: u32) -> Result<Vec<u8>, u32> {
        self.request(READ, 0, 0xabc, offset, len);
        let (h, err) = self.reply_header();
        assert_eq!(h, 0xabc, "handle of the reply");
        if err == 0 {
            Ok(self.read_n(len as usize))
        } else {
            Err(err)
        }
    }

    /// NBD_CMD_DISC, then waits for the server to close.
    pub fn disconnect(mut self) {
        self.request(DISC, 0, 0, 0, 0);
        assert!(self.closed(), "not closed after NBD_CMD_DISC");
    }
}
