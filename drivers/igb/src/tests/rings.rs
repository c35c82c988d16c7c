//! Rings wrapping, malformed write-backs, allocation, statistics, shutdown.

use super::*;
use crate::model::Fault;
use crate::{QueuePair, RxRing, TxMeta, TxRing};
use dioxide_testkit::{thread_allocs, Rng};

/// Receives everything waiting on queue 0 into `out`.
fn drain(q: &mut Queue<Model>, out: &mut Vec<Vec<u8>>) {
    while let Some(f) = q.rx().receive(|f| f.data.to_vec()) {
        out.push(f);
    }
}

#[test]
fn thousands_of_received_frames_wrap_a_ring_of_eight() {
    let (model, _hal, _dev, mut queues) = up(small(1));
    let q = &mut queues[0];
    let mut rng = Rng::new(7);
    let (mut sent, mut got) = (Vec::new(), Vec::new());
    for round in 0..1000 {
        // Up to 7 at once: the ring's 8 slots less the driver's gap.
        for _ in 0..1 + round % 7 {
            let mut payload = vec![0u8; rng.below(1400) as usize];
            rng.fill(&mut payload);
            let f = tcp_frame(1000, &payload);
            model.inject(&f);
            sent.push(f);
        }
        model.step();
        drain(q, &mut got);
    }
    assert_eq!(got.len(), sent.len());
    assert!(got == sent, "frames arrive whole and in order");
    let c = q.counters();
    assert_eq!(
        (c.rx_frames, c.malformed, c.rx_dropped),
        (sent.len() as u64, 0, 0)
    );
    assert!(model.errors().is_empty(), "{:?}", model.errors());
}

#[test]
fn frames_beyond_the_free_descriptors_are_missed_and_counted_by_the_device() {
    let (model, _hal, mut dev, mut queues) = up(small(1));
    for i in 0..10 {
        model.inject(&tcp_frame(i, b"x"));
    }
    model.step();
    let mut got = Vec::new();
    drain(&mut queues[0], &mut got);
    assert_eq!(got.len(), 7);
    let s = dev.stats();
    assert_eq!((s.gprc, s.mpc, s.rnbc, s.tpr), (7, 3, 3, 10));
    assert_eq!(dev.stats().mpc, 3, "accumulated, registers cleared on read");
}

#[test]
fn thousands_of_transmitted_frames_wrap_a_ring_of_eight() {
    let (model, _hal, mut dev, mut queues) = up(small(1));
    let q = &mut queues[0];
    let mut rng = Rng::new(9);
    let (mut sent, mut wire) = (Vec::new(), Vec::new());
    while sent.len() < 5000 {
        let mut f = tcp_frame(2000, &vec![0; rng.below(1400) as usize]);
        rng.fill(&mut f[54..]);
        let meta = TxMeta::default();
        match q.tx().transmit(f.len(), meta, |b| b.copy_from_slice(&f)) {
            Some(()) => sent.push(f),
            None => {
                model.step();
                wire.extend(model.take_wire());
            }
        }
    }
    model.step();
    wire.extend(model.take_wire());
    assert!(
        wire == sent,
        "{} sent, {} on the wire",
        sent.len(),
        wire.len()
    );
    q.tx().reclaim();
    assert_eq!(q.tx().free(), 7, "every descriptor taken back");
    let s = dev.stats();
    assert_eq!((s.gptc, s.tpt), (5000, 5000));
    assert_eq!(q.counters().tx_frames, 5000);
}

/// Frames `before` with `fault` on the first, then good ones; what the
/// driver delivers and counts.
fn with_fault(fault: Fault) -> (Vec<Vec<u8>>, Vec<Vec<u8>>, crate::Counters) {
    let (model, _hal, _dev, mut queues) = up(small(1));
    let frames: Vec<Vec<u8>> = (0..4)
        .map(|i| tcp_frame(100 + i, &[i as u8; 100]))
        .collect();
    model.fault(fault);
    for f in &frames {
        model.inject(f);
    }
    model.step();
    let mut got = Vec::new();
    drain(&mut queues[0], &mut got);
    // The queue keeps working: a thousand more frames through it.
    for i in 0..1000u16 {
        let f = tcp_frame(i, &i.to_be_bytes());
        model.inject(&f);
        model.step();
        let g = queues[0].rx().receive(|f| f.data.to_vec());
        assert_eq!(g.as_ref(), Some(&f), "{fault:?}: frame {i} after the fault");
    }
    (frames, got, queues[0].counters())
}

#[test]
fn write_backs_with_length_zero_or_beyond_the_buffer_are_dropped_and_counted() {
    for fault in [Fault::ZeroLength, Fault::TooLong] {
        let (frames, got, c) = with_fault(fault);
        assert_eq!(got, frames[1..], "{fault:?}");
        assert_eq!((c.malformed, c.rx_dropped), (1, 0), "{fault:?}");
    }
}

#[test]
fn a_frame_spanning_buffers_is_dropped_whole_and_counted_once() {
    let (frames, got, c) = with_fault(Fault::SplitFrame);
    assert_eq!(got, frames[1..]);
    assert_eq!(c.malformed, 1);
    // A lone descriptor without EOP takes the next frame as its end.
    let (frames, got, c) = with_fault(Fault::NoEop);
    assert_eq!(got, frames[2..]);
    assert_eq!(c.malformed, 1);
}

#[test]
fn dd_written_into_a_slot_not_given_to_the_device_is_never_read() {
    let (frames, got, c) = with_fault(Fault::DdOnGap);
    assert_eq!(got, frames, "no phantom frame");
    assert_eq!(c.malformed, 0);
}

#[test]
fn an_errored_frame_is_dropped_and_counted() {
    let (frames, got, c) = with_fault(Fault::RxError);
    assert_eq!(got, frames[1..]);
    assert_eq!((c.rx_dropped, c.malformed), (1, 0));
}

/// Allocations this thread makes in `f`.
fn allocs_in(f: impl FnOnce()) -> u64 {
    let a = thread_allocs();
    f();
    thread_allocs() - a
}

#[test]
fn receiving_and_transmitting_allocate_nothing_per_frame() {
    let (model, _hal, _dev, mut queues) = up(small(1));
    let q = &mut queues[0];
    let frame = tcp_frame(5, &[7; 1000]);
    let big = {
        let seg = tcp(5, 80, 1, 0x18, &[3; 20000]);
        ipv4_frame([10, 0, 0, 1], [10, 0, 0, 2], 6, &seg, false)
    };
    // Control: the same measuring counts an allocation.
    let control = allocs_in(|| drop(std::hint::black_box(vec![0u8; 16])));
    assert_eq!(control, 1, "the counting allocator counts");
    let mut in_driver = 0;
    let mut bytes = 0;
    for i in 0..2000 {
        model.inject(&frame);
        model.step();
        in_driver += allocs_in(|| {
            q.rx().receive(|f| bytes += f.data.len()).expect("a frame");
        });
        let (f, meta) = if i % 10 == 0 {
            let meta = TxMeta {
                csum: true,
                tso_mss: Some(1448),
            };
            (&big, meta)
        } else {
            (
                &frame,
                TxMeta {
                    csum: true,
                    tso_mss: None,
                },
            )
        };
        in_driver += allocs_in(|| {
            q.tx()
                .transmit(f.len(), meta, |b| b.copy_from_slice(f))
                .expect("room");
        });
        model.step();
        model.take_wire();
    }
    assert_eq!(in_driver, 0);
    assert_eq!(bytes, 2000 * frame.len());
    let c = q.counters();
    assert_eq!((c.rx_frames, c.tx_frames, c.tx_dropped), (2000, 2000, 0));
    assert_eq!(c.rx_bad_csum, 0);
    assert!(model.errors().is_empty(), "{:?}", model.errors());
}

#[test]
fn shutdown_resets_the_device_and_frees_every_region() {
    let (model, hal, dev, queues) = up(small(2));
    assert_eq!(
        hal.live_regions(),
        2 * 5,
        "per queue: rx ring and buffers, tx ring, buffers, TSO"
    );
    dev.shutdown(queues).expect("reset");
    assert_eq!(hal.live_regions(), 0);
    assert_eq!(model.reg(crate::regs::RCTL), 0);
}
