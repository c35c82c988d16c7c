//! The network side: the NICs (`nic`: which one serves, one stack per
//! core on a multi-queue NIC), the TCP/IP stack on each (`stack`) and the
//! NBD service on it (`nbd`, with the storage cores of `storage`).
pub mod nbd;
pub mod nic;
pub mod stack;
pub mod storage;
