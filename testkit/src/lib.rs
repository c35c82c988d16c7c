//! What dioxide's tests and benchmarks share, so that each is written once:
//!
//! - [`Rng`], a small deterministic generator (xorshift64*, Vigna 2014):
//!   seeded runs repeat exactly, on the host and in the kernel's
//!   benchmarks (`no_std`);
//! - [`CountingAlloc`] (feature `std`), a global allocator over the
//!   system's that counts allocations per thread, for the "allocates
//!   nothing" assertions and the host benchmark's figures;
//! - [`run_within`] (feature `std`): a command run with a time limit, so
//!   that a test whose client or appliance hangs fails instead of hanging;
//! - [`logged`] (feature `std`): the log lines of one target this thread
//!   wrote, for tests that check what is logged.
#![cfg_attr(not(feature = "std"), no_std)]

/// xorshift64*: 64 bits of state, period 2^64 - 1, good enough to pick
/// offsets and fill test data (not for anything secret).
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator seeded with `seed` (0, which xorshift would never
    /// leave, becomes 1).
    pub const fn new(seed: u64) -> Rng {
        Rng(if seed == 0 { 1 } else { seed })
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number in `0..n` (`0` when `n` is 0; modulo bias is irrelevant
    /// here).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// Fills `buf` with the next bytes (little-endian words).
    pub fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

#[cfg(feature = "std")]
mod counting {
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::Cell;

    /// Counts heap allocations per thread (tests running in parallel do
    /// not see each other's). Install it in a test crate or binary with
    /// `#[global_allocator] static A: CountingAlloc = CountingAlloc;`.
    ///
    /// Only per thread: a process-wide counter would be one cache line
    /// written by every thread on every allocation, and threads that
    /// allocate side by side would pay for moving it between cores (the
    /// host benchmark's generic path measured about 1.5 times its cost on
    /// two threads with such a counter, its own cost without).
    pub struct CountingAlloc;

    thread_local! {
        static THREAD: Cell<u64> = const { Cell::new(0) };
    }

    // SAFETY: every call goes to the system allocator with the caller's
    // own arguments, so its contract is the caller's; the counter is a
    // const-initialised thread-local without destructor, which never
    // allocates.
    unsafe impl GlobalAlloc for CountingAlloc {
        unsafe fn alloc(&self, l: Layout) -> *mut u8 {
            let _ = THREAD.try_with(|c| c.set(c.get() + 1));
            // SAFETY: `l` is the caller's layout, valid per GlobalAlloc's
            // contract (non-zero size).
            unsafe { System.alloc(l) }
        }
        unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
            // SAFETY: `p` came from `alloc` above, i.e. from `System`,
            // with this layout.
            unsafe { System.dealloc(p, l) }
        }
    }

    /// Allocations made by this thread (through [`CountingAlloc`]).
    pub fn thread_allocs() -> u64 {
        THREAD.with(|c| c.get())
    }
}

#[cfg(feature = "std")]
pub use counting::{thread_allocs, CountingAlloc};

/// Runs `cmd` with no input, collecting its output: its exit status, stdout
/// and stderr. Killed after `limit`, failing the test (a panic that carries
/// its stderr).
#[cfg(feature = "std")]
pub fn run_within(
    cmd: &mut std::process::Command,
    limit: std::time::Duration,
) -> (std::process::ExitStatus, Vec<u8>, String) {
    use std::io::Read;
    use std::process::Stdio;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e} (./dx test installs the tools the tests use)"));
    let collect = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut b = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut b);
            }
            b
        })
    };
    let out = collect(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let err = collect(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let t0 = std::time::Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if t0.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            let err = err.join().unwrap_or_default();
            panic!(
                "{cmd:?} still running after {limit:?}; killed. stderr:\n{}",
                String::from_utf8_lossy(&err)
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    (
        status,
        out.join().unwrap_or_default(),
        String::from_utf8_lossy(&err.join().unwrap_or_default()).into_owned(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_generator_repeats_its_known_sequence() {
        // Golden values: the seeded runs of every test depend on them.
        let mut r = Rng::new(1);
        assert_eq!(r.next_u64(), 0x47e4_ce4b_896c_dd1d);
        let mut a = Rng::new(42);
        let mut b = Rng::new(42);
        for _ in 0..1000 {
            assert_eq!(a.next_u64(), b.next_u64());
        }
        assert_eq!(Rng::new(0).next_u64(), Rng::new(1).next_u64());
        let mut buf = [0u8; 13];
        Rng::new(7).fill(&mut buf);
        let mut c = Rng::new(7);
        assert_eq!(buf[..8], c.next_u64().to_le_bytes());
        assert_eq!(buf[8..], c.next_u64().to_le_bytes()[..5]);
        assert!((0..1000).all(|_| a.below(10) < 10));
        assert_eq!(a.below(0), 0);
    }
}

/// The `log` records of the targets this thread named in [`logged`]
/// calls, kept per thread (tests run on threads of their own). A thread
/// that asked for none only reads a flag without a destructor (as the
/// counting allocator's counter): it stores nothing and registers no
/// thread-local destructor, so allocation-counting tests are not disturbed
/// by the logger; records logged while a thread's locals are torn down are
/// dropped.
#[cfg(feature = "std")]
struct Capture;

#[cfg(feature = "std")]
std::thread_local! {
    static ASKED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    static WANTED: std::cell::RefCell<Vec<String>> = const { std::cell::RefCell::new(Vec::new()) };
    static LINES: std::cell::RefCell<Vec<(String, String)>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

#[cfg(feature = "std")]
impl log::Log for Capture {
    fn enabled(&self, _: &log::Metadata) -> bool {
        true
    }
    fn log(&self, r: &log::Record) {
        if !ASKED.try_with(|a| a.get()).unwrap_or(false) {
            return;
        }
        let wanted = WANTED
            .try_with(|w| w.borrow().iter().any(|t| t == r.target()))
            .unwrap_or(false);
        if wanted {
            let _ = LINES.try_with(|l| {
                l.borrow_mut()
                    .push((r.target().to_string(), r.args().to_string()))
            });
        }
    }
    fn flush(&self) {}
}

/// This thread's log lines of `target` since the last call (the first
/// call starts keeping them and returns none). The first call in the
/// process installs the capturing logger at trace level; it panics if
/// another logger was installed first (the capture would see nothing).
#[cfg(feature = "std")]
pub fn logged(target: &str) -> Vec<String> {
    static CAPTURE: Capture = Capture;
    static INIT: std::sync::Once = std::sync::Once::new();
    INIT.call_once(|| {
        log::set_logger(&CAPTURE).expect("no other logger in a test process using logged()");
        log::set_max_level(log::LevelFilter::Trace);
    });
    ASKED.with(|a| a.set(true));
    WANTED.with(|w| {
        let mut w = w.borrow_mut();
        if !w.iter().any(|t| t == target) {
            w.push(target.to_string());
        }
    });
    LINES.with(|l| {
        let mut l = l.borrow_mut();
        let (mine, rest) = std::mem::take(&mut *l)
            .into_iter()
            .partition(|(t, _)| t == target);
        *l = rest;
        mine.into_iter().map(|(_, m)| m).collect()
    })
}
