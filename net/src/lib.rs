//! The network service of dioxide.
//!
//! [`nbd`] is a sans-IO NBD server: one [`nbd::Conn`] per TCP connection is
//! fed the bytes that arrived, hands out the requests it decoded as
//! [`nbd::Event`]s, takes their completions in any order, and yields the
//! bytes to send. It owns no socket, no clock and no storage, so it runs the
//! same on the host in tests as in the kernel over smoltcp.
#![cfg_attr(not(test), no_std)]
#![deny(clippy::undocumented_unsafe_blocks)]

extern crate alloc;

pub mod nbd;
