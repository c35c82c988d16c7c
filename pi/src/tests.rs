use super::*;

/// CRC-16/T10-DIF bit by bit, from its definition (the reference the
/// table-driven guard is checked against).
fn crc16_bitwise(data: &[u8]) -> u16 {
    let mut crc = 0u16;
    for &b in data {
        crc ^= (b as u16) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x8bb7
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// CRC-64/NVMe bit by bit (reflected, initial value and final XOR all ones).
fn crc64_bitwise(data: &[u8]) -> u64 {
    let mut crc = !0u64;
    for &b in data {
        crc ^= b as u64;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x9a6c_9329_ac4b_c9b5
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fn block(seed: u8) -> Vec<u8> {
    (0..4096u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8 ^ seed)
        .collect()
}

#[test]
fn guards_match_their_check_values_and_a_bitwise_reference() {
    // The catalogue's check values (CRC of "123456789").
    assert_eq!(guard(GuardSize::Crc16, b"123456789"), 0xd0db);
    assert_eq!(guard(GuardSize::Crc64, b"123456789"), 0xae8b_1486_0a79_9888);
    for seed in [0u8, 1, 0x5a, 0xff] {
        let b = block(seed);
        for len in [512, 4096] {
            assert_eq!(
                guard(GuardSize::Crc16, &b[..len]),
                crc16_bitwise(&b[..len]) as u64
            );
            assert_eq!(guard(GuardSize::Crc64, &b[..len]), crc64_bitwise(&b[..len]));
        }
    }
    // A block of zeroes: 0 for the 16-bit guard (initial value 0).
    assert_eq!(guard(GuardSize::Crc16, &[0u8; 4096]), 0);
}

#[test]
fn golden_tuples() {
    let t = Tuple {
        guard: 0xd0db,
        app: 0x1234,
        reftag: 0x0102_0304,
    };
    let mut b = [0xeeu8; 9];
    assert!(t.emit(GuardSize::Crc16, &mut b));
    assert_eq!(b, [0xd0, 0xdb, 0x12, 0x34, 0x01, 0x02, 0x03, 0x04, 0xee]);
    assert_eq!(Tuple::parse(GuardSize::Crc16, &b), Some(t));
    let t = Tuple {
        guard: 0xae8b_1486_0a79_9888,
        app: 0xbeef,
        reftag: 0x0a0b_0c0d_0e0f,
    };
    let mut b = [0u8; 16];
    assert!(t.emit(GuardSize::Crc64, &mut b));
    assert_eq!(
        b,
        [
            0xae, 0x8b, 0x14, 0x86, 0x0a, 0x79, 0x98, 0x88, 0xbe, 0xef, 0x0a, 0x0b, 0x0c, 0x0d,
            0x0e, 0x0f
        ]
    );
    assert_eq!(Tuple::parse(GuardSize::Crc64, &b), Some(t));
    // Too short: nothing parsed, nothing written.
    assert_eq!(Tuple::parse(GuardSize::Crc64, &b[..15]), None);
    let mut short = [0u8; 7];
    assert!(!t.emit(GuardSize::Crc16, &mut short));
    assert_eq!(short, [0; 7]);
}

#[test]
fn reference_tags_are_truncated_to_the_formats_width() {
    let d = block(3);
    let lba = 0x1234_5678_9abc_def0u64;
    let t16 = generate(GuardSize::Crc16, &d, lba, 0);
    assert_eq!(t16.reftag, 0x9abc_def0);
    let t64 = generate(GuardSize::Crc64, &d, lba, 0);
    assert_eq!(t64.reftag, 0x5678_9abc_def0);
    let all = Expect {
        checks: Checks::all(),
        reftag: lba,
        app: 0,
        app_mask: 0xffff,
    };
    for (size, t) in [(GuardSize::Crc16, t16), (GuardSize::Crc64, t64)] {
        assert_eq!(
            verify(size, PiType::Type1, &d, &t, &all),
            Ok(Verified::Checked)
        );
    }
}

#[test]
fn each_tag_that_does_not_match_is_named() {
    let d = block(7);
    for size in [GuardSize::Crc16, GuardSize::Crc64] {
        let t = generate(size, &d, 100, 0x0042);
        let exp = Expect {
            checks: Checks::all(),
            reftag: 100,
            app: 0x0042,
            app_mask: 0xffff,
        };
        // Control: the block as written passes.
        assert_eq!(
            verify(size, PiType::Type1, &d, &t, &exp),
            Ok(Verified::Checked)
        );
        // One byte of data changed: the guard.
        let mut bad = d.clone();
        bad[1000] ^= 0x10;
        assert!(matches!(
            verify(size, PiType::Type1, &bad, &t, &exp),
            Err(Mismatch::Guard { found, .. }) if found == t.guard
        ));
        // A byte of the tuple changed: the tag it falls in.
        let mut raw = [0u8; 16];
        t.emit(size, &mut raw);
        raw[size.tuple_len() - 1] ^= 1;
        let t2 = Tuple::parse(size, &raw).unwrap();
        assert_eq!(
            verify(size, PiType::Type1, &d, &t2, &exp),
            Err(Mismatch::Ref {
                expected: 100,
                found: 101
            })
        );
        // Another block's reference tag (a misdirected write).
        let other = Expect { reftag: 101, ..exp };
        assert_eq!(
            verify(size, PiType::Type1, &d, &t, &other),
            Err(Mismatch::Ref {
                expected: 101,
                found: 100
            })
        );
        // Type 3 never checks the reference tag.
        assert_eq!(
            verify(size, PiType::Type3, &d, &t, &other),
            Ok(Verified::Checked)
        );
        // The application tag, under its mask.
        let app = Expect { app: 0x0043, ..exp };
        assert_eq!(
            verify(size, PiType::Type2, &d, &t, &app),
            Err(Mismatch::App {
                expected: 0x43,
                found: 0x42
            })
        );
        let masked = Expect {
            app: 0x0043,
            app_mask: 0xfffe,
            ..exp
        };
        assert_eq!(
            verify(size, PiType::Type2, &d, &t, &masked),
            Ok(Verified::Checked)
        );
        // Checks not asked for are not made.
        let none = Expect {
            checks: Checks::empty(),
            ..other
        };
        assert_eq!(
            verify(size, PiType::Type1, &bad, &t, &none),
            Ok(Verified::Checked)
        );
    }
}

#[test]
fn blocks_never_written_carry_the_escape() {
    let d = block(9);
    for size in [GuardSize::Crc16, GuardSize::Crc64] {
        // All ones, as a namespace formatted with protection reads where
        // nothing was written.
        let ones = Tuple::parse(size, &[0xff; 16]).unwrap();
        let exp = Expect {
            checks: Checks::all(),
            reftag: 5,
            app: 0,
            app_mask: 0xffff,
        };
        for ty in [PiType::Type1, PiType::Type2, PiType::Type3] {
            assert_eq!(verify(size, ty, &d, &ones, &exp), Ok(Verified::Escaped));
        }
        // Types 1 and 2: the application tag alone escapes.
        let app_only = Tuple {
            guard: 0,
            app: 0xffff,
            reftag: 5,
        };
        assert_eq!(
            verify(size, PiType::Type1, &d, &app_only, &exp),
            Ok(Verified::Escaped)
        );
        // Type 3 needs the reference tag of all ones too: this block is
        // checked, and its guard fails.
        assert!(matches!(
            verify(size, PiType::Type3, &d, &app_only, &exp),
            Err(Mismatch::Guard { .. })
        ));
    }
}

#[test]
fn mismatches_read_as_messages() {
    let m = Mismatch::Ref {
        expected: 0x10,
        found: 0x11,
    };
    assert_eq!(m.to_string(), "reference tag 0x11, expected 0x10");
    let m = Mismatch::App {
        expected: 0x42,
        found: 0xffff,
    };
    assert_eq!(m.to_string(), "application tag 0xffff, expected 0x0042");
}
