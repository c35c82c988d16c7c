//! The network side: the TCP/IP stack on virtio-net and the NBD service
//! on it.
pub mod nbd;
pub mod stack;
pub mod storage;
