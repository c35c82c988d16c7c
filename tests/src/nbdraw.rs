//! A minimal NBD client over a raw socket, for requests real clients never
//! send and for replies they do not show (error messages).

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

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

pub const LIST: u32 = 3;
pub const GO: u32 = 7;
pub const STRUCTURED_REPLY: u32 = 8;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;

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

pub struct Client {
    pub s: TcpStream,
}

impl Client {
    /// Connected; the greeting is read when `greet`.
    pub fn connect(port: u16) -> Client {
        let s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
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
    pub fn try_greeted(port: u16, timeout: Duration) -> std::io::Result<Client> {
        let mut c = Client::connect(port);
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
    pub fn open(port: u16, name: &str) -> (Client, u64) {
        let mut c = Client::greeted(port);
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
        let r = self.option(GO, &go_data(name));
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
        self.option(STRUCTURED_REPLY, &[])
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
