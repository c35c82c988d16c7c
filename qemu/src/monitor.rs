//! QEMU's QMP monitor on a unix socket, used to open the NBD port forward of
//! user networking only once the guest's server listens (`hostfwd_add`).
//!
//! The socket lives in a private temporary directory (mode 0700) that
//! [`MonitorDir`] removes when dropped; the caller may remove it earlier,
//! once connected (a connected unix socket needs no file), so that nothing
//! is left behind when this process is killed. Commands go through QMP's
//! `human-monitor-command`.

use crate::{io_err, Error};
use std::ffi::OsString;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The socket's name in its directory.
pub const SOCKET: &str = "qmp.sock";

/// A temporary directory holding QEMU's QMP socket; removed on drop.
pub struct MonitorDir {
    dir: PathBuf,
}

impl MonitorDir {
    pub fn new() -> Result<MonitorDir, Error> {
        use std::os::unix::fs::DirBuilderExt;
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let base = std::env::temp_dir();
        let mut last = None;
        // A unix socket path holds at most 107 bytes: stay in the system's
        // temporary directory, with a short name.
        for _ in 0..100 {
            let dir = base.join(format!(
                "dioxide-qmp-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
                Ok(()) => return Ok(MonitorDir { dir }),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last = Some(e),
                Err(e) => return Err(io_err(format!("create {}", dir.display()))(e)),
            }
        }
        Err(io_err(format!("create a directory in {}", base.display()))(
            last.unwrap_or_else(|| std::io::Error::other("no free name")),
        ))
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// The socket's path.
    pub fn socket(&self) -> PathBuf {
        self.dir.join(SOCKET)
    }

    /// QEMU's `-qmp` value: a server on the socket that does not wait for
    /// a client before starting the guest.
    pub fn qemu_arg(&self) -> OsString {
        let mut a = OsString::from("unix:");
        // Commas in a path are doubled in QEMU option syntax.
        a.push(self.socket().to_string_lossy().replace(',', ",,"));
        a.push(",server=on,wait=off");
        a
    }
}

impl Drop for MonitorDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A QMP session (capabilities negotiated).
pub struct Qmp {
    r: BufReader<UnixStream>,
    w: UnixStream,
}

impl Qmp {
    /// Connects and negotiates capabilities.
    pub fn connect(socket: &Path) -> Result<Qmp, String> {
        let s = UnixStream::connect(socket).map_err(|e| format!("{}: {e}", socket.display()))?;
        let timeout = Some(Duration::from_secs(10));
        s.set_read_timeout(timeout).map_err(|e| e.to_string())?;
        s.set_write_timeout(timeout).map_err(|e| e.to_string())?;
        let w = s.try_clone().map_err(|e| e.to_string())?;
        let mut q = Qmp {
            r: BufReader::new(s),
            w,
        };
        q.next("QMP")?;
        q.execute(serde_json::json!({ "execute": "qmp_capabilities" }))?;
        Ok(q)
    }

    /// The next message carrying `key`; events (`{"event": ...}`) are
    /// skipped, an error reply is an error.
    fn next(&mut self, key: &str) -> Result<serde_json::Value, String> {
        loop {
            let mut line = String::new();
            match self.r.read_line(&mut line) {
                Ok(0) => return Err("QMP: connection closed".into()),
                Ok(_) => {}
                Err(e) => return Err(format!("QMP: {e}")),
            }
            let v: serde_json::Value =
                serde_json::from_str(&line).map_err(|e| format!("QMP: {e}: {line}"))?;
            if let Some(e) = v.get("error") {
                return Err(format!("QMP: {e}"));
            }
            if v.get(key).is_some() {
                return Ok(v);
            }
        }
    }

    /// Sends a command and returns its `return` value.
    fn execute(&mut self, cmd: serde_json::Value) -> Result<serde_json::Value, String> {
        writeln!(self.w, "{cmd}")
            .and_then(|_| self.w.flush())
            .map_err(|e| format!("QMP: {e}"))?;
        Ok(self.next("return")?["return"].take())
    }

    /// Runs one human-monitor (HMP) command and returns its output (empty
    /// for most commands that succeed; HMP reports errors as text).
    pub fn hmp(&mut self, command: &str) -> Result<String, String> {
        let v = self.execute(serde_json::json!({
            "execute": "human-monitor-command",
            "arguments": { "command-line": command },
        }))?;
        Ok(v.as_str().unwrap_or_default().trim().to_string())
    }

    /// Forwards `127.0.0.1:host_port` to `guest_ip:guest_port` on the user
    /// networking netdev `net0`.
    pub fn hostfwd_add(
        &mut self,
        host_port: u16,
        guest_ip: &str,
        guest_port: u16,
    ) -> Result<(), String> {
        let out = self.hmp(&format!(
            "hostfwd_add net0 tcp:127.0.0.1:{host_port}-{guest_ip}:{guest_port}"
        ))?;
        if out.is_empty() {
            Ok(())
        } else {
            Err(out)
        }
    }
}
