//! Diagnostics: the self-tests and in-guest benchmarks selected with the
//! `selftest=` kernel argument.
pub mod bench;
pub mod nbd;
pub mod selftest;
pub mod smp;
