//! CAN_MULTI_CONN, shown: the appliance announces it on writable exports,
//! promising that a FLUSH on one connection makes durable every write any
//! connection had been answered for. Here two services (two cores: each
//! its own NVMe I/O queue of one simulated controller with a volatile write
//! cache, its own network stack and its own client) serve one raw
//! namespace; client A's answered writes survive a power cut once client
//! B's FLUSH is answered. The controls: a write answered after that flush
//! is lost at the cut (the cache is real), one with FUA is not.

use dioxide_iomap::Engine;
use dioxide_nbd::client::Reply;
use dioxide_nbd::{cflag, cmd};
use dioxide_nvme::blk::NvmeQueue;
use dioxide_nvme::sim::{Sim, SimConfig, SimHal};
use dioxide_nvme::Controller;
use dioxide_service::loopback::{Link, Loopback, OneEngine, ServerSide};
use dioxide_service::{Access, DiskLimits, Server, Table, STALL_NS};

const BLOCKS: u64 = 256;
const LBS: usize = 4096;

fn now() -> u64 {
    static T0: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    T0.get_or_init(std::time::Instant::now).elapsed().as_nanos() as u64
}

type Svc = Server<OneEngine<NvmeQueue<SimHal, Sim>>>;

/// One core's service on I/O queue `qid`, and its client.
fn core(
    ctrl: &mut Controller<SimHal, Sim>,
    hal: &SimHal,
    qid: u16,
    table: &'static Table,
) -> (ServerSide, Loopback, Svc) {
    let ns = ctrl.namespace(1).expect("namespace");
    let qp = ctrl.create_io_queue(qid, 64, None).expect("queue");
    let engine = Engine::new(NvmeQueue::new(qp, hal.clone(), ns));
    let (mut side, mut lo) = Loopback::new("vol", true, 16, now, now, Link::default());
    let disks = [DiskLimits {
        depth: 64,
        max_transfer: 128 * 1024,
        lbs: LBS,
    }];
    let mut server = Server::new(
        OneEngine::new(engine, now, now),
        &mut side.sockets,
        table,
        &disks,
        STALL_NS,
    );
    server.set_access(Access::parse(None, Some("10.0.0.2")).unwrap());
    lo.connect(&mut side, &mut server).expect("connect");
    (side, lo, server)
}

fn settle(side: &mut ServerSide, lo: &mut Loopback, server: &mut Svc) -> Vec<Reply> {
    let mut out = Vec::new();
    lo.settle(side, server, &mut out).expect("settle");
    out
}

#[test]
fn a_flush_on_one_connection_makes_every_connections_answered_writes_durable() {
    let sim = Sim::new(SimConfig {
        block_size: LBS as u32,
        blocks: BLOCKS,
        volatile_cache: true,
        ..Default::default()
    });
    let hal = SimHal::new();
    let mut ctrl = Controller::init(hal.clone(), sim.clone(), Default::default()).unwrap();
    assert!(ctrl.info().volatile_write_cache);
    assert_eq!(ctrl.set_queue_count(2).unwrap(), 2);
    let table: &'static Table = {
        let mut t = Table::new();
        t.add_raw("vol".into(), BLOCKS * LBS as u64, 0, LBS as u32);
        t.set_writable("vol").unwrap();
        Box::leak(Box::new(t))
    };
    let (mut sa, mut a, mut server_a) = core(&mut ctrl, &hal, 1, table);
    let (mut sb, mut b, mut server_b) = core(&mut ctrl, &hal, 2, table);
    let block = |byte: u8| vec![byte; LBS];
    let answered = |r: Vec<Reply>| {
        assert!(r.iter().all(|r| r.error == 0), "{r:?}");
        r.len()
    };

    // A: block 1 plain, block 2 with FUA; both answered.
    a.client()
        .command(cmd::WRITE, 0, LBS as u64, 0, &block(0xa1))
        .unwrap();
    a.client()
        .command(cmd::WRITE, cflag::FUA, 2 * LBS as u64, 0, &block(0xa2))
        .unwrap();
    assert_eq!(answered(settle(&mut sa, &mut a, &mut server_a)), 2);
    // Block 1 waits in the controller's volatile cache; block 2 does not.
    assert_eq!(
        sim.cached_blocks().iter().map(|c| c.0).collect::<Vec<_>>(),
        [1]
    );

    // B flushes, on the other core's queue.
    b.client().command(cmd::FLUSH, 0, 0, 0, &[]).unwrap();
    assert_eq!(answered(settle(&mut sb, &mut b, &mut server_b)), 1);
    assert!(
        sim.cached_blocks().is_empty(),
        "B's flush left A's write cached"
    );

    // A: block 3, answered after the flush and never flushed.
    a.client()
        .command(cmd::WRITE, 0, 3 * LBS as u64, 0, &block(0xa3))
        .unwrap();
    assert_eq!(answered(settle(&mut sa, &mut a, &mut server_a)), 1);

    sim.power_cut(|_, _| false);
    let media = sim.disk();
    let at = |b: usize| media[b * LBS..(b + 1) * LBS].to_vec();
    assert_eq!(at(1), block(0xa1), "answered before B's flush: durable");
    assert_eq!(at(2), block(0xa2), "FUA: durable");
    assert_eq!(at(3), block(0), "the control: not flushed, lost at the cut");
}
