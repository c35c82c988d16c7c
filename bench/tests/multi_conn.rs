//! CAN_MULTI_CONN, shown: the appliance announces it on writable exports,
//! promising that a FLUSH on one connection makes durable every write any
//! connection had been answered for. Here two services (two cores: each
//! its own NVMe I/O queue of one simulated controller with a volatile write
//! cache, its own network stack and its own client) serve one raw
//! namespace; client A's answered writes survive a power cut once client
//! B's FLUSH is answered. The controls: a write answered after that flush
//! is lost at the cut (the cache is real), one with FUA is not.

mod common;

use common::LBS;
use dioxide_nbd::client::Reply;
use dioxide_nbd::{cflag, cmd};

const BLOCKS: u64 = 256;

#[test]
fn a_flush_on_one_connection_makes_every_connections_answered_writes_durable() {
    let (sim, ctrl, [mut a, mut b]) = common::two_cores(BLOCKS, 128 * 1024);
    assert!(ctrl.info().volatile_write_cache);
    let block = |byte: u8| vec![byte; LBS];
    let answered = |r: Vec<Reply>| {
        assert!(r.iter().all(|r| r.error == 0), "{r:?}");
        r.len()
    };

    // A: block 1 plain, block 2 with FUA; both answered.
    a.lo.client()
        .command(cmd::WRITE, 0, LBS as u64, 0, &block(0xa1))
        .unwrap();
    a.lo.client()
        .command(cmd::WRITE, cflag::FUA, 2 * LBS as u64, 0, &block(0xa2))
        .unwrap();
    assert_eq!(answered(a.settle()), 2);
    // Block 1 waits in the controller's volatile cache; block 2 does not.
    assert_eq!(
        sim.cached_blocks().iter().map(|c| c.0).collect::<Vec<_>>(),
        [1]
    );

    // B flushes, on the other core's queue.
    b.lo.client().command(cmd::FLUSH, 0, 0, 0, &[]).unwrap();
    assert_eq!(answered(b.settle()), 1);
    assert!(
        sim.cached_blocks().is_empty(),
        "B's flush left A's write cached"
    );

    // A: block 3, answered after the flush and never flushed.
    a.lo.client()
        .command(cmd::WRITE, 0, 3 * LBS as u64, 0, &block(0xa3))
        .unwrap();
    assert_eq!(answered(a.settle()), 1);

    sim.power_cut(|_, _| false);
    let media = sim.disk();
    let at = |b: usize| media[b * LBS..(b + 1) * LBS].to_vec();
    assert_eq!(at(1), block(0xa1), "answered before B's flush: durable");
    assert_eq!(at(2), block(0xa2), "FUA: durable");
    assert_eq!(at(3), block(0), "the control: not flushed, lost at the cut");
}
