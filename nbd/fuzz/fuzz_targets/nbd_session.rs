//! Any byte string as an NBD session script (`dioxide_nbd::session`):
//! client bytes, valid protocol pieces and garbage, split anywhere, against
//! a caller that reads output, fills write payloads in random pieces,
//! answers requests in any order and closes or ends the connection at
//! random. Nothing may panic, exceed the memory bound, take input while the
//! client is behind, hand over a payload other than the one sent, or send a
//! byte that is not the expected reply.
#![no_main]

use dioxide_nbd::session::{run, Tables};
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

static TABLES: OnceLock<Tables> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    run(data, TABLES.get_or_init(Tables::new));
});
