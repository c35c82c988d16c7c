//! Kernel command line: space-separated `key=value` (or bare `key`) words.
//!
//! | key | values | meaning |
//! |-----|--------|---------|
//! | `selftest` | `digest`, `rw`, `files`, `bench`, `noalloc`, `fault`, `panic`, `calibrate`, `smp`, `ap-panic` | run a self-test and power off |
//! | `smp` | number of CPUs (default: all the MADT lists, at most 64) | how many CPUs to run, the boot CPU included; `smp=1` leaves the others parked |
//! | `nvme.completion` | `poll` (default), `irq` | how I/O completions are reaped |
//! | `nvme.timeout_ms` | milliseconds (default 5000) | deadline of each command |
//! | `nvme.dbbuf` | `1` (default), `0`, `keep` | shadow doorbells (Doorbell Buffer Config) when the controller offers them; after the controller lost an update (a kick recovered a queue) every doorbell goes through MMIO too, unless `keep` |
//! | `nvme.kick_ms` | milliseconds (default 10, `0` never) | a queue with commands in flight that completes none for this long gets its doorbells written again through MMIO |
//! | `rw.blocks` | logical blocks (default: 1 MiB worth) | scratch range size of `selftest=rw` |
//! | `bench.qd` | e.g. `1,16,64` | queue depths of `selftest=bench`; any `bench.*` argument without `selftest=` runs it (JSON lines on every console) |
//! | `bench.dev` | `nvme`, `null` (comma list) | devices of `selftest=bench` |
//! | `bench.completion` | `poll`, `irq` (comma list) | completion modes (irq needs `nvme.completion=irq`) |
//! | `bench.secs` | seconds per row (default 2) | |
//! | `bench.file` | path (default: the largest file) | file read by `selftest=bench` |
//! | `bench.op` | `read` (default), `write`, `write-fua`, comma-separated | what the benchmark's requests do; writes overwrite the file's blocks |
//! | `dxfs.commit_s` | seconds (default 5), `0`: never | commit what the filesystems' write paths hold this often without a client's FLUSH or FUA |
//! | `dio.simple` | `1` (default), `0` | the iomap simple path on or off (upstream `/sys/kernel/iomap/simple_read`) |
//! | `net.ip`, `net.gw` | `A.B.C.D/N`, `A.B.C.D` | static address instead of DHCP |
//! | `net.csum`, `net.tso`, `net.mrg_rxbuf` | `1` (default), `0` | virtio-net checksum offload, TCP segmentation offload (needs `net.csum`), merged receive buffers; each only where the device offers it (the log says) |
//! | `net.guest_csum` | `0` (default), `1` | take frames with partial or host-checked checksums (VIRTIO_NET_F_GUEST_CSUM) |
//! | `net.mtu` | 576 to 65521 (default: the device's `host_mtu`, else 1500) | the MTU, at most the device's |
//! | `nbd.null` | `1` | add the export `null`: zeros without device I/O (network path alone, for `dioxide bench nbd`) |
//! | `nbd.storage_cores` | `1`, `0` (default: 1 with `nvme.completion=irq`, else 0) | with several CPUs, issue each connection's reads on a storage core (1) or all on the boot core (0) |
//! | `nbd.stall_s` | seconds (default 30) | drop an NBD connection whose replies wait and that takes less than 64 KiB of them in this long; TCP keep-alive probe after half of it without a packet |
//! | `nbd.peer_timeout_s` | seconds (default 300) | drop an NBD connection whose peer sends nothing, not even an answer to a keep-alive probe, for this long |
//! | `nbd.rw` | `all`, `namespaces`, `files`, or export names separated by commas | exports that take writes: raw namespaces that hold no mounted dxfs filesystem, and files (overwrites of written blocks; a hole gets ENOTSUP); from the clients `nbd.rw_from` names only |
//! | `nbd.rw_from` | IPv4 networks or addresses, comma-separated (`10.0.2.2/32`, `any`) | clients that may write; every other client sees each export read-only (`EPERM` on writes). Without it nobody writes |
//! | `nbd.allow` | IPv4 networks or addresses, comma-separated | clients that may connect at all (default: any); others are reset at once |
//! | `time.source` | `hpet`, `pmtimer`, `pit`, `cpuid` | calibrate the TSC against this source only (default: the first that measures, in this order) |
//! | `power` | `debugexit`, `acpi`, `halt` | how to power off (default: `debugexit` under a hypervisor, falling back to `acpi`; on bare metal `acpi` after success, `halt` after a failure) |
//! | `panic` | `off` (default), `reboot` | what a panic or CPU exception ends in: power-off, or a reset |
//! | `log` | `error`, `warn`, `info` (default), `debug`, `trace` | log level |

pub struct Cmdline<'a> {
    words: &'a str,
}

impl<'a> Cmdline<'a> {
    pub fn new(s: &'a str) -> Self {
        Cmdline { words: s }
    }

    pub fn get(&self, key: &str) -> Option<&'a str> {
        self.words
            .split_ascii_whitespace()
            .rev()
            .find_map(|w| match w.split_once('=') {
                Some((k, v)) if k == key => Some(v),
                None if w == key => Some(""),
                _ => None,
            })
    }

    /// Parses `key` as an unsigned number; `Err` names the bad value.
    pub fn number(&self, key: &str) -> Result<Option<u64>, &'a str> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.parse().map(Some).map_err(|_| v),
        }
    }

    /// Parses `key` as a switch, `0` or `1`; `Err` names the bad value.
    pub fn switch(&self, key: &str) -> Result<Option<bool>, &'a str> {
        match self.get(key) {
            None => Ok(None),
            Some("1") => Ok(Some(true)),
            Some("0") => Ok(Some(false)),
            Some(v) => Err(v),
        }
    }

    pub fn keys(&self) -> impl Iterator<Item = &'a str> {
        self.words
            .split_ascii_whitespace()
            .map(|w| w.split_once('=').map_or(w, |(k, _)| k))
    }
}

pub const KNOWN: &[&str] = &[
    "selftest",
    "nvme.completion",
    "nvme.timeout_ms",
    "nvme.dbbuf",
    "nvme.kick_ms",
    "rw.blocks",
    "dio.simple",
    "net.ip",
    "nbd.null",
    "nbd.storage_cores",
    "nbd.stall_s",
    "nbd.peer_timeout_s",
    "nbd.rw",
    "nbd.rw_from",
    "nbd.allow",
    "net.gw",
    "log",
    "bench.qd",
    "bench.dev",
    "bench.completion",
    "bench.secs",
    "bench.file",
    "bench.op",
    "dxfs.commit_s",
    "time.source",
    "power",
    "panic",
    "smp",
];
