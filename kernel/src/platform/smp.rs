//! Placeholder until SMP bring-up lands: one CPU.

use alloc::vec::Vec;

pub fn cpu_count() -> usize {
    1
}

pub fn cpu_index() -> usize {
    0
}

pub fn on_each_cpu<T: Send>(f: impl Fn(usize) -> T + Sync) -> Vec<T> {
    alloc::vec![f(0)]
}

pub fn run_on(_cpu: usize, _job: alloc::boxed::Box<dyn FnOnce() + Send>) {}

pub fn wake(_cpu: usize) {}
pub const MAX_CPUS: usize = 64;
