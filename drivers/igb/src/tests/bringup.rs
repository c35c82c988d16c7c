//! Reset, station address, link, configuration, interrupts.

use super::*;
use crate::regs::{self, gpie, ivar};
use crate::{Error, Mmio, RxRing, MAX_QUEUES};
use dioxide_nic::Link;

#[test]
fn the_device_resets_and_comes_up_with_its_mac_and_a_gigabit_link() {
    let (model, hal, dev, queues) = up(small(2));
    assert_eq!(dev.mac(), MAC);
    let link = Link {
        up: true,
        speed_mbps: 1000,
        full_duplex: true,
    };
    assert_eq!(dev.link(), link);
    assert_eq!(queues.len(), 2);
    // The reset took its model time (1 ms) and was waited for.
    assert!(hal.now() >= 1_000_000);
    assert_eq!(model.reg(regs::CTRL) & regs::ctrl::RST, 0);
    let caps = dev.caps();
    assert!(caps.csum && caps.tso && caps.rx_csum);
    assert_eq!((caps.mtu, caps.max_frame, caps.queues), (1500, 65535, 2));
}

#[test]
fn a_reset_that_never_completes_is_a_timeout_error() {
    let mc = ModelConfig {
        reset_never_completes: true,
        ..quick_model()
    };
    let (model, hal) = Model::new(mc);
    let err = Igb::new(model, hal.clone(), small(1)).err();
    assert_eq!(err, Some(Error::ResetTimeout));
    // Bounded by the 100 ms deadline, not the link's 5 s.
    assert!(hal.now() < 1_000_000_000, "{}", hal.now());
}

#[test]
fn a_station_address_without_av_is_refused() {
    let mc = ModelConfig {
        mac_valid: false,
        ..quick_model()
    };
    let (model, hal) = Model::new(mc);
    assert_eq!(
        Igb::new(model, hal, small(1)).err(),
        Some(Error::NoMacAddress)
    );
    let mc = ModelConfig {
        mac: [0x01, 0, 0x5e, 0, 0, 1],
        ..quick_model()
    };
    let (model, hal) = Model::new(mc);
    let err = Igb::new(model, hal, small(1)).err();
    assert!(matches!(err, Some(Error::BadMacAddress(_))), "{err:?}");
}

#[test]
fn the_link_comes_up_only_after_autonegotiation_restarted_through_mdic() {
    // QEMU's timing: 500 ms from BMCR.ANRESTART to STATUS.LU.
    let (model, hal, dev, _q) = up_with(ModelConfig::default(), small(1));
    assert!(dev.link().up);
    assert!(hal.now() >= 500_000_000, "{}", hal.now());
    // The PHY reports autonegotiation complete.
    assert_eq!(model.reg(regs::STATUS) & regs::status::LU, regs::status::LU);
}

#[test]
fn without_a_cable_the_driver_comes_up_link_down_and_reports_the_link_when_it_comes() {
    let (model, hal) = Model::new(quick_model());
    model.set_cable(false);
    let cfg = Config {
        link_timeout_ns: 50_000_000,
        ..small(1)
    };
    let (mut dev, _q) = Igb::new(model.clone(), hal.clone(), cfg).expect("up, link down");
    assert_eq!(dev.link(), Link::default());
    let other = dev.other_vector();
    assert_eq!(other, 1);
    let before = model.fired(other);
    model.set_cable(true);
    hal.advance(2_000_000);
    model.step();
    assert_eq!(
        model.fired(other),
        before + 1,
        "link change raised the other vector"
    );
    let now = dev.handle_other().expect("link changed");
    assert!(now.up && now.speed_mbps == 1000);
    assert_eq!(dev.handle_other(), None);
}

#[test]
fn gpie_goes_before_ivar_so_the_model_keeps_the_mapping() {
    let (model, _hal, _dev, _q) = up(small(3));
    assert_eq!(model.ivar_refused(), 0);
    let g = model.reg(regs::GPIE);
    assert_eq!(
        g,
        gpie::MSIX_MODE | gpie::EIAME | gpie::PBA_SUPPORT | gpie::NSICR
    );
    // Queue q's receive and transmit entries both name vector q.
    for q in 0..3 {
        let v = model.reg(regs::ivar(q));
        assert_eq!(v & 0xff, ivar::VALID | q as u32);
        assert_eq!((v >> 8) & 0xff, ivar::VALID | q as u32);
    }
    assert_eq!(model.reg(regs::IVAR_MISC), (ivar::VALID | 3) << 8);
    // Control: on a fresh model, IVAR written before GPIE is refused.
    let (fresh, _) = Model::new(quick_model());
    fresh.write32(regs::ivar(0), ivar::VALID);
    assert_eq!((fresh.ivar_refused(), fresh.reg(regs::ivar(0))), (1, 0));
    fresh.write32(regs::GPIE, gpie::MSIX_MODE);
    fresh.write32(regs::ivar(0), ivar::VALID);
    assert_eq!(fresh.reg(regs::ivar(0)), ivar::VALID);
}

#[test]
fn configurations_out_of_range_are_refused_and_too_many_queues_clamped() {
    let bad = [
        Config {
            queues: 0,
            ..small(1)
        },
        Config {
            rx_descs: 12,
            ..small(1)
        },
        Config {
            tx_descs: 8192,
            ..small(1)
        },
        Config {
            rx_buf: 1024,
            ..small(1)
        },
        Config {
            rx_buf: 3000,
            ..small(1)
        },
        Config {
            csum: false,
            ..small(1)
        },
        Config {
            itr_us: 9000,
            ..small(1)
        },
        Config {
            mtu: 20,
            ..small(1)
        },
    ];
    for cfg in bad {
        let (model, hal) = Model::new(quick_model());
        let err = Igb::new(model, hal, cfg).err();
        assert!(matches!(err, Some(Error::BadConfig(_))), "{cfg:?}: {err:?}");
    }
    let (_m, _h, dev, queues) = up(small(12));
    assert_eq!((queues.len(), dev.caps().queues), (MAX_QUEUES, MAX_QUEUES));
    assert_eq!(
        dev.other_vector(),
        8,
        "8 queue vectors and the link's fit 10"
    );
}

#[test]
fn a_queue_interrupt_fires_when_unmasked_then_masks_itself_until_enabled_again() {
    let cfg = Config {
        itr_us: 100,
        ..small(2)
    };
    let (model, _hal, _dev, mut queues) = up(cfg);
    assert_eq!(model.reg(regs::eitr(0)) & 0x7ffc, 100 << 2);
    let q0 = &mut queues[0];
    assert_eq!(q0.vector(), 0);
    // Masked at start: a frame raises nothing.
    model.inject(&tcp_frame(1, b"a"));
    model.step();
    assert_eq!(model.fired(0), 0);
    assert!(q0.rx().receive(|_| ()).is_some());
    q0.enable_irq();
    model.inject(&tcp_frame(1, b"b"));
    model.inject(&tcp_frame(1, b"c"));
    model.step();
    assert_eq!(model.fired(0), 1, "auto-masked after the first");
    assert_eq!(model.reg(regs::EIMS) & 1, 0);
    // The second frame's cause waits, masked (the first's was auto-cleared).
    assert_eq!(model.reg(regs::EICR) & 1, 1);
    while q0.rx().receive(|_| ()).is_some() {}
    q0.enable_irq();
    assert_eq!(model.fired(0), 2, "the pending cause fires once unmasked");
    q0.enable_irq();
    q0.disable_irq();
    model.inject(&tcp_frame(1, b"d"));
    model.step();
    assert_eq!(model.fired(0), 2, "masked by disable_irq");
    // Queue 1's vector never fired: its flows are elsewhere or masked.
    assert_eq!(model.fired(1), 0);
}
