//! The setup `crash_raw` and `multi_conn` share: one simulated NVMe
//! controller with a volatile write cache and two services (two cores,
//! each its own I/O queue of it, its own network stack and loopback
//! client) serving its namespace as the writable raw export "vol".

use dioxide_iomap::Engine;
use dioxide_nbd::client::Reply;
use dioxide_nvme::blk::NvmeQueue;
use dioxide_nvme::sim::{Sim, SimConfig, SimHal};
use dioxide_nvme::Controller;
use dioxide_service::loopback::{Link, Loopback, OneEngine, ServerSide};
use dioxide_service::{Access, DiskLimits, Server, Table, STALL_NS};

pub const LBS: usize = 4096;

fn now() -> u64 {
    static T0: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    T0.get_or_init(std::time::Instant::now).elapsed().as_nanos() as u64
}

type Svc = Server<OneEngine<NvmeQueue<SimHal, Sim>>>;

/// One core's service on its own I/O queue, and its client.
pub struct Core {
    side: ServerSide,
    pub lo: Loopback,
    server: Svc,
}

impl Core {
    fn new(
        ctrl: &mut Controller<SimHal, Sim>,
        hal: &SimHal,
        qid: u16,
        table: &'static Table,
        max_transfer: usize,
    ) -> Core {
        let ns = ctrl.namespace(1).expect("namespace");
        let qp = ctrl.create_io_queue(qid, 64, None).expect("queue");
        let engine = Engine::new(NvmeQueue::new(qp, hal.clone(), ns));
        let (mut side, mut lo) = Loopback::new("vol", true, 16, now, now, Link::default());
        let disks = [DiskLimits {
            depth: 64,
            max_transfer,
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
        Core { side, lo, server }
    }

    /// Runs the service and its client until the client has nothing in
    /// flight; the replies, in arrival order.
    pub fn settle(&mut self) -> Vec<Reply> {
        let mut out = Vec::new();
        self.lo
            .settle(&mut self.side, &mut self.server, &mut out)
            .expect("settle");
        out
    }
}

/// A controller of `blocks` blocks of `LBS` bytes with a volatile write
/// cache, and the two cores serving it (I/O queues 1 and 2), their disk
/// limits saying `max_transfer` bytes a request.
pub fn two_cores(blocks: u64, max_transfer: usize) -> (Sim, Controller<SimHal, Sim>, [Core; 2]) {
    let sim = Sim::new(SimConfig {
        block_size: LBS as u32,
        blocks,
        volatile_cache: true,
        ..Default::default()
    });
    let hal = SimHal::new();
    let mut ctrl = Controller::init(hal.clone(), sim.clone(), Default::default()).unwrap();
    assert_eq!(ctrl.set_queue_count(2).unwrap(), 2);
    let table: &'static Table = {
        let mut t = Table::new();
        t.add_raw("vol".into(), blocks * LBS as u64, 0, LBS as u32);
        t.set_writable("vol").unwrap();
        Box::leak(Box::new(t))
    };
    let cores = [
        Core::new(&mut ctrl, &hal, 1, table, max_transfer),
        Core::new(&mut ctrl, &hal, 2, table, max_transfer),
    ];
    (sim, ctrl, cores)
}
