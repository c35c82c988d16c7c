use super::*;
use alloc::vec;
use dioxide_testkit::Rng;

struct Fake;
const A: ExportInfo = ExportInfo {
    size: 10_000,
    min_block: 512,
    preferred_block: 4096,
    max_block: 1 << 20,
    writable: false,
    write_block: 0,
};
const RAW: ExportInfo = ExportInfo {
    size: 1 << 30,
    min_block: 4096,
    preferred_block: 4096,
    max_block: 32 << 20,
    writable: false,
    write_block: 0,
};
/// An export that takes writes.
const VOL: ExportInfo = ExportInfo {
    size: 1 << 20,
    min_block: 512,
    preferred_block: 4096,
    max_block: 64 << 10,
    writable: true,
    write_block: 0,
};
impl Exports for Fake {
    fn lookup(&self, name: &str) -> Option<(u32, ExportInfo)> {
        match name.trim_start_matches('/') {
            "data/a.bin" => Some((1, A)),
            "nvme0n1" => Some((2, RAW)),
            "vol" => Some((3, VOL)),
            _ => None,
        }
    }
    fn name(&self, index: usize) -> Option<&str> {
        ["data/a.bin", "nvme0n1", "vol"].get(index).copied()
    }
}

use super::session::{option_bytes as option, request_bytes as request};

fn go_data(name: &str, infos: &[u16]) -> Vec<u8> {
    super::session::go_data(name.as_bytes(), infos)
}

/// Parses option replies: (option, type, data).
fn option_replies(mut b: &[u8]) -> Vec<(u32, u32, Vec<u8>)> {
    let mut out = vec![];
    while b.len() >= 20 {
        assert_eq!(be64(b), REPLY_MAGIC);
        let len = be32(&b[16..]) as usize;
        out.push((be32(&b[8..]), be32(&b[12..]), b[20..20 + len].to_vec()));
        b = &b[20 + len..];
    }
    assert!(b.is_empty(), "trailing bytes {b:?}");
    out
}

/// All the output waiting.
fn take(c: &mut Conn) -> Vec<u8> {
    let mut v = Vec::new();
    while !c.output().is_empty() {
        let k = c.output().len();
        v.extend_from_slice(c.output());
        c.consume_output(k);
    }
    v
}

/// A connection past the greeting with fixed newstyle and no zeroes.
fn greeted() -> Conn {
    let mut c = Conn::new(16);
    take(&mut c);
    c.receive(
        &Fake,
        &(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes(),
    );
    c
}

fn opened(name: &str) -> Conn {
    let mut c = greeted();
    c.receive(&Fake, &option(opt::GO, &go_data(name, &[])));
    assert!(c.in_transmission());
    take(&mut c);
    c
}

#[test]
fn greeting_golden_bytes() {
    let c = Conn::new(4);
    assert_eq!(c.output(), b"NBDMAGICIHAVEOPT\x00\x03");
}

#[test]
fn go_with_block_size_and_name() {
    let mut c = greeted();
    c.receive(
        &Fake,
        &option(
            opt::GO,
            &go_data("data/a.bin", &[info::BLOCK_SIZE, info::NAME]),
        ),
    );
    assert!(c.in_transmission());
    let r = option_replies(&take(&mut c));
    assert_eq!(r.len(), 4);
    // NBD_INFO_EXPORT: type 0, size 10000, flags HAS_FLAGS|READ_ONLY|SEND_FLUSH|CAN_MULTI_CONN.
    assert_eq!(
        r[0],
        (
            opt::GO,
            rep::INFO,
            vec![0, 0, 0, 0, 0, 0, 0, 0, 0x27, 0x10, 0x01, 0x07]
        )
    );
    assert_eq!(
        r[1],
        (opt::GO, rep::INFO, [&[0u8, 1][..], b"data/a.bin"].concat())
    );
    let mut bs = vec![0, 3];
    for v in [512u32, 4096, 1 << 20] {
        bs.extend_from_slice(&v.to_be_bytes());
    }
    assert_eq!(r[2], (opt::GO, rep::INFO, bs));
    assert_eq!(r[3], (opt::GO, rep::ACK, vec![]));
}

#[test]
fn info_does_not_enter_transmission_and_unknown_exports_are_refused() {
    let mut c = greeted();
    c.receive(&Fake, &option(opt::INFO, &go_data("/nvme0n1", &[])));
    assert!(!c.in_transmission());
    let r = option_replies(&take(&mut c));
    assert_eq!(
        r.iter().map(|x| x.1).collect::<Vec<_>>(),
        vec![rep::INFO, rep::ACK]
    );
    c.receive(&Fake, &option(opt::GO, &go_data("nope", &[])));
    assert_eq!(option_replies(&take(&mut c))[0].1, rep::ERR_UNKNOWN);
    c.receive(&Fake, &option(opt::GO, &go_data("../etc/passwd", &[])));
    assert_eq!(option_replies(&take(&mut c))[0].1, rep::ERR_UNKNOWN);
    // Malformed: the name length runs past the data.
    c.receive(&Fake, &option(opt::GO, &[0, 0, 0, 50, b'a']));
    assert_eq!(option_replies(&take(&mut c))[0].1, rep::ERR_INVALID);
    // Still negotiating.
    c.receive(&Fake, &option(opt::GO, &go_data("nvme0n1", &[])));
    assert!(c.in_transmission());
}

#[test]
fn export_name_with_and_without_zero_padding() {
    for (flags, len) in [
        (FLAG_C_FIXED_NEWSTYLE, 8 + 2 + 124),
        (FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES, 10),
    ] {
        let mut c = Conn::new(4);
        take(&mut c);
        c.receive(&Fake, &flags.to_be_bytes());
        c.receive(&Fake, &option(opt::EXPORT_NAME, b"nvme0n1"));
        let out = take(&mut c);
        assert_eq!(out.len(), len);
        assert_eq!(be64(&out), 1 << 30);
        assert_eq!(be16(&out[8..]), 0x0107);
        assert!(c.in_transmission());
    }
    // An unknown name: the only answer the protocol has is closing.
    let mut c = greeted();
    c.receive(&Fake, &option(opt::EXPORT_NAME, b"missing"));
    assert!(c.is_closed());
    assert_eq!(c.close_reason(), Some(CloseReason::UnknownExport));
}

#[test]
fn list_unknown_and_unsupported_options() {
    let mut c = greeted();
    c.receive(&Fake, &option(opt::LIST, &[]));
    let r = option_replies(&take(&mut c));
    assert_eq!(r.len(), 4);
    assert_eq!(
        r[0],
        (
            opt::LIST,
            rep::SERVER,
            [&10u32.to_be_bytes()[..], b"data/a.bin"].concat()
        )
    );
    assert_eq!(r[1].2[4..], *b"nvme0n1");
    assert_eq!(r[2].2[4..], *b"vol");
    assert_eq!(r[3].1, rep::ACK);
    c.receive(&Fake, &option(opt::LIST, b"x"));
    assert_eq!(option_replies(&take(&mut c))[0].1, rep::ERR_INVALID);
    for o in [
        opt::STARTTLS,
        opt::LIST_META_CONTEXT,
        opt::SET_META_CONTEXT,
        77,
    ] {
        c.receive(&Fake, &option(o, b"whatever"));
        let r = option_replies(&take(&mut c));
        assert_eq!((r[0].0, r[0].1), (o, rep::ERR_UNSUP));
    }
    assert!(!c.is_closed());
}

#[test]
fn oversized_option_is_refused_and_its_data_skipped() {
    let mut c = greeted();
    let big = vec![0xaau8; MAX_OPTION + 1000];
    let msg = option(99, &big);
    // Arrives in pieces.
    for chunk in msg.chunks(7000) {
        c.receive(&Fake, chunk);
    }
    assert_eq!(option_replies(&take(&mut c))[0].1, rep::ERR_TOO_BIG);
    c.receive(&Fake, &option(opt::LIST, &[]));
    assert_eq!(option_replies(&take(&mut c)).len(), 4);
}

#[test]
fn garbage_handshakes_close_the_connection() {
    let mut c = Conn::new(4);
    take(&mut c);
    c.receive(&Fake, b"GET / HTTP/1.1\r\n\r\n");
    assert!(c.is_closed());
    assert_eq!(c.close_reason(), Some(CloseReason::BadClientFlags));
    let mut c = greeted();
    c.receive(&Fake, b"this is not IHAVEOPT");
    assert!(c.is_closed());
    assert_eq!(c.close_reason(), Some(CloseReason::BadOptionMagic));
    let mut c = greeted();
    c.receive(&Fake, &option(opt::ABORT, &[]));
    assert_eq!(option_replies(c.output())[0].1, rep::ACK);
    assert!(!c.is_closed(), "the ACK is sent first");
    take(&mut c);
    assert!(c.is_closed());
}

#[test]
fn reads_become_events_and_replies_go_out_in_any_order() {
    let mut c = opened("data/a.bin");
    let mut reqs = request(cmd::READ, 0, 1, 0, 4096);
    reqs.extend(request(cmd::READ, 0, 2, 4096, 512));
    reqs.extend(request(cmd::READ, 0, 3, 9728, 272));
    // One byte at a time.
    for b in &reqs {
        c.receive(&Fake, core::slice::from_ref(b));
    }
    let ev: Vec<Event> = core::iter::from_fn(|| c.next_event()).collect();
    assert_eq!(
        ev,
        vec![
            Event::Read {
                handle: 1,
                export: 1,
                offset: 0,
                len: 4096
            },
            Event::Read {
                handle: 2,
                export: 1,
                offset: 4096,
                len: 512
            },
            Event::Read {
                handle: 3,
                export: 1,
                offset: 9728,
                len: 272
            },
        ]
    );
    assert_eq!(c.in_flight(), 3);
    c.reply_read(&Fake, 3, 0, Ok(&[7u8; 272]));
    c.reply_read(&Fake, 1, 0, Err(Errno::Io));
    let out = take(&mut c);
    assert_eq!(
        &out[..16],
        &[0x67, 0x44, 0x66, 0x98, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 3]
    );
    assert!(out[16..288].iter().all(|&b| b == 7));
    assert_eq!(
        &out[288..],
        &[0x67, 0x44, 0x66, 0x98, 0, 0, 0, 5, 0, 0, 0, 0, 0, 0, 0, 1]
    );
    c.reply_read(&Fake, 2, 0, Ok(&[1u8; 512]));
    assert_eq!(take(&mut c).len(), 16 + 512);
    assert_eq!(c.in_flight(), 0);
}

fn errors(out: &[u8]) -> Vec<(u64, u32)> {
    out.chunks(16)
        .map(|r| (be64(&r[8..]), be32(&r[4..])))
        .collect()
}

#[test]
fn bad_requests_get_protocol_errors() {
    let mut c = opened("data/a.bin");
    let mut reqs = request(cmd::READ, 0, 1, 9999, 2); // past the end
    reqs.extend(request(cmd::READ, 0, 2, 0, 0)); // zero length
    reqs.extend(request(cmd::READ, 0, 3, 0, u32::MAX)); // 4 GiB
    reqs.extend(request(cmd::READ, 0, 4, u64::MAX - 1, 4)); // offset overflow
    reqs.extend(request(cmd::READ, 1, 5, 0, 512)); // a flag not negotiated
    reqs.extend(request(cmd::TRIM, 0, 6, 0, 512));
    reqs.extend(request(cmd::BLOCK_STATUS, 0, 7, 0, 512));
    reqs.extend(request(42, 0, 8, 0, 512));
    reqs.extend(request(cmd::FLUSH, 0, 9, 0, 0));
    c.receive(&Fake, &reqs);
    assert!(c.next_event().is_none());
    let e = Errno::Inval as u32;
    assert_eq!(
        errors(&take(&mut c)),
        vec![
            (1, e),
            (2, e),
            (3, e),
            (4, e),
            (5, e),
            (6, Errno::Perm as u32),
            (7, e),
            (8, e),
            (9, 0)
        ]
    );
    assert!(!c.is_closed());
}

#[test]
fn writes_to_a_read_only_export_are_refused_and_their_payload_skipped() {
    let mut c = opened("nvme0n1");
    let mut bytes = request(cmd::WRITE, 0, 11, 0, 100_000);
    bytes.extend(vec![0x25u8; 100_000]); // payload that looks like request magic
    bytes.extend(request(cmd::READ, 0, 12, 0, 4096));
    for chunk in bytes.chunks(1500) {
        c.receive(&Fake, chunk);
    }
    assert_eq!(errors(&take(&mut c)), vec![(11, Errno::Perm as u32)]);
    assert_eq!(
        c.next_event(),
        Some(Event::Read {
            handle: 12,
            export: 2,
            offset: 0,
            len: 4096
        })
    );
}

#[test]
fn bad_request_magic_closes_and_disc_waits_for_reads_in_flight() {
    let mut c = opened("nvme0n1");
    c.receive(&Fake, &[0u8; 28]);
    assert!(c.is_closed());
    assert_eq!(c.close_reason(), Some(CloseReason::BadRequestMagic));

    let mut c = opened("nvme0n1");
    let mut bytes = request(cmd::READ, 0, 1, 0, 512);
    bytes.extend(request(cmd::DISC, 0, 2, 0, 0));
    bytes.extend(request(cmd::READ, 0, 3, 0, 512)); // after DISC: ignored
    c.receive(&Fake, &bytes);
    assert_eq!(
        c.next_event(),
        Some(Event::Read {
            handle: 1,
            export: 2,
            offset: 0,
            len: 512
        })
    );
    assert_eq!(c.next_event(), None);
    assert!(!c.is_closed(), "a read is in flight");
    c.reply_read(&Fake, 1, 0, Ok(&[0u8; 512]));
    assert_eq!(take(&mut c).len(), 16 + 512);
    assert!(c.is_closed());
}

#[test]
fn in_flight_limit_applies_back_pressure() {
    let mut c = Conn::new(2);
    take(&mut c);
    c.receive(
        &Fake,
        &(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes(),
    );
    c.receive(&Fake, &option(opt::GO, &go_data("nvme0n1", &[])));
    take(&mut c);
    let bytes: Vec<u8> = (0..5)
        .flat_map(|h| request(cmd::READ, 0, h, h * 4096, 4096))
        .collect();
    c.receive(&Fake, &bytes);
    let first: Vec<Event> = core::iter::from_fn(|| c.next_event()).collect();
    assert_eq!(first.len(), 2);
    c.reply_read(&Fake, 0, 0, Ok(&[0u8; 4096]));
    let more: Vec<Event> = core::iter::from_fn(|| c.next_event()).collect();
    assert_eq!(
        more,
        vec![Event::Read {
            handle: 2,
            export: 2,
            offset: 8192,
            len: 4096
        }]
    );
    c.reply_read(&Fake, 1, 0, Ok(&[0u8; 4096]));
    c.reply_read(&Fake, 2, 0, Ok(&[0u8; 4096]));
    let rest: Vec<Event> = core::iter::from_fn(|| c.next_event()).collect();
    assert_eq!(rest.len(), 2);
}

#[test]
fn peer_closing_mid_request_with_reads_in_flight() {
    let mut c = opened("nvme0n1");
    let mut bytes = request(cmd::READ, 0, 1, 0, 512);
    bytes.extend(&request(cmd::READ, 0, 2, 0, 512)[..10]); // half a request
    c.receive(&Fake, &bytes);
    assert!(c.next_event().is_some());
    c.peer_closed();
    assert!(!c.is_closed());
    c.reply_read(&Fake, 1, 0, Ok(&[0u8; 512]));
    // The reply still goes out; then the connection is over.
    assert_eq!(take(&mut c).len(), 16 + 512);
    assert!(c.is_closed());
}

#[test]
fn output_sent_in_small_pieces_arrives_whole_and_in_order() {
    let mut c = opened("nvme0n1");
    // Replies totalling several MiB, drained a few KiB at a time while more
    // replies are appended (the way a TCP send buffer takes them).
    let mut want = Vec::new();
    let mut got = Vec::new();
    for h in 0..40u64 {
        c.receive(&Fake, &request(cmd::READ, 0, h, h * 131_072, 131_072));
        assert_eq!(c.peek_event().copied(), c.next_event());
        let data = vec![h as u8; 131_072];
        c.reply_read(&Fake, h, 0, Ok(&data));
        want.extend_from_slice(&[0x67, 0x44, 0x66, 0x98, 0, 0, 0, 0]);
        want.extend_from_slice(&h.to_be_bytes());
        want.extend_from_slice(&data);
        for _ in 0..20 {
            let n = c.output().len().min(5000);
            got.extend_from_slice(&c.output()[..n]);
            c.consume_output(n);
        }
    }
    got.extend(take(&mut c));
    assert!(c.output().is_empty());
    assert_eq!(got.len(), want.len());
    assert!(got == want);
}

#[test]
fn structured_replies_golden_bytes() {
    let mut c = greeted();
    // With data: invalid. Without: acknowledged.
    c.receive(&Fake, &option(opt::STRUCTURED_REPLY, b"x"));
    assert_eq!(option_replies(&take(&mut c))[0].1, rep::ERR_INVALID);
    c.receive(&Fake, &option(opt::STRUCTURED_REPLY, &[]));
    assert_eq!(
        take(&mut c),
        [
            0x00, 0x03, 0xe8, 0x89, 0x04, 0x55, 0x65, 0xa9, // reply magic
            0, 0, 0, 8, // option
            0, 0, 0, 1, // ACK
            0, 0, 0, 0, // length
        ]
    );
    c.receive(&Fake, &option(opt::GO, &go_data("data/a.bin", &[])));
    assert!(c.in_transmission());
    take(&mut c);
    c.receive(&Fake, &request(cmd::READ, 0, 0x1122, 9998, 2));
    let ev = c.next_event().unwrap();
    assert_eq!(
        ev,
        Event::Read {
            handle: 0x1122,
            export: 1,
            offset: 9998,
            len: 2
        }
    );
    c.reply_read(&Fake, 0x1122, 9998, Ok(b"hi"));
    assert_eq!(
        take(&mut c),
        [
            0x66, 0x8e, 0x33, 0xef, // structured reply magic
            0, 1, // flags: DONE
            0, 1, // OFFSET_DATA
            0, 0, 0, 0, 0, 0, 0x11, 0x22, // handle
            0, 0, 0, 10, // length: offset + 2 bytes
            0, 0, 0, 0, 0, 0, 0x27, 0x0e, // offset 9998
            b'h', b'i',
        ]
    );
    // Errors of reads, early (past the end) and late (I/O), are ERROR
    // chunks with a message; other commands keep simple replies.
    c.receive(&Fake, &request(cmd::READ, 0, 7, 9999, 2));
    let out = take(&mut c);
    assert_eq!(&out[..8], &[0x66, 0x8e, 0x33, 0xef, 0, 1, 0x80, 0x01]);
    assert_eq!(&out[8..16], &7u64.to_be_bytes());
    let len = u32::from_be_bytes(out[16..20].try_into().unwrap()) as usize;
    assert_eq!(out.len(), 20 + len);
    assert_eq!(&out[20..24], &22u32.to_be_bytes());
    let mlen = u16::from_be_bytes([out[24], out[25]]) as usize;
    assert_eq!(mlen + 6, len);
    assert_eq!(&out[26..], b"read beyond the end of the export");
    c.receive(&Fake, &request(cmd::READ, 0, 8, 0, 512));
    c.next_event().unwrap();
    c.reply_read(&Fake, 8, 0, Err(Errno::Io));
    let out = take(&mut c);
    assert_eq!(&out[4..8], &[0, 1, 0x80, 0x01]);
    assert_eq!(&out[20..24], &5u32.to_be_bytes());
    c.receive(&Fake, &request(cmd::FLUSH, 0, 9, 0, 0));
    assert_eq!(
        take(&mut c),
        [0x67, 0x44, 0x66, 0x98, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 9]
    );
}

// ---- random sessions (see `session`) ----

/// The script of quick-mode session `seed`: 16 to 200 random bytes; the
/// big export table in one session of a hundred.
fn quick_script(seed: u64) -> Vec<u8> {
    let mut rng = Rng::new(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let len = 16 + rng.below(185) as usize;
    let mut v: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
    v[0] = if rng.below(100) == 0 { 0 } else { v[0] | 1 };
    v
}

/// Prints the seed of the session that panicked.
struct Replay(u64);
impl Drop for Replay {
    fn drop(&mut self) {
        if std::thread::panicking() {
            std::eprintln!(
                "session seed {} failed; replay: NBD_SESSION_SEED={} cargo test -p dioxide-nbd random_sessions",
                self.0,
                self.0
            );
        }
    }
}

#[test]
fn a_hundred_thousand_random_sessions_keep_memory_bounded_and_output_well_formed() {
    let tables = session::Tables::new();
    let one = std::env::var("NBD_SESSION_SEED")
        .ok()
        .map(|s| s.parse::<u64>().unwrap());
    let seeds: Vec<u64> = match one {
        Some(s) => vec![s],
        None => {
            // NBD_SESSION_FIRST: another range of seeds.
            let n = std::env::var("NBD_SESSIONS").map_or(100_000, |n| n.parse().unwrap());
            let first = std::env::var("NBD_SESSION_FIRST").map_or(1, |n| n.parse().unwrap());
            (first..first + n).collect()
        }
    };
    let t = std::time::Instant::now();
    let mut total = session::Summary::default();
    let (mut trans, mut lists, mut held, mut high, mut answered) = (0, 0, 0, 0, 0);
    let (mut wrote, mut cut, mut updated, mut refused) = (0, 0, 0, 0);
    let mut reasons = std::collections::BTreeMap::new();
    for &seed in &seeds {
        let guard = Replay(seed);
        let s = session::run(&quick_script(seed), &tables);
        core::mem::forget(guard);
        total.steps += s.steps;
        total.bytes_in += s.bytes_in;
        total.bytes_out += s.bytes_out;
        total.reads_answered += s.reads_answered;
        total.writes_done += s.writes_done;
        total.writes_cut += s.writes_cut;
        total.updates_answered += s.updates_answered;
        total.updates_refused += s.updates_refused;
        wrote += (s.writes_done > 0) as u32;
        cut += (s.writes_cut > 0) as u32;
        updated += (s.updates_answered > 0) as u32;
        refused += (s.updates_refused > 0) as u32;
        trans += s.transmission as u32;
        lists += (s.lists > 0) as u32;
        held += (s.held > 0) as u32;
        high += (s.peak_output >= OUTPUT_HIGH) as u32;
        answered += (s.reads_answered > 0) as u32;
        total.peak_memory = total.peak_memory.max(s.peak_memory);
        *reasons.entry(format!("{:?}", s.closed)).or_insert(0u32) += 1;
    }
    std::eprintln!(
        "{} sessions in {:?}: {} steps, {} bytes in, {} out, {} reads answered; {trans} reached transmission, {lists} listed, {held} held input, {high} reached OUTPUT_HIGH, {answered} had reads answered; peak memory {}",
        seeds.len(),
        t.elapsed(),
        total.steps,
        total.bytes_in,
        total.bytes_out,
        total.reads_answered,
        total.peak_memory
    );
    std::eprintln!(
        "write side: {} writes submitted ({wrote} sessions), {} cut short by the connection's end ({cut}), {} requests answered by Conn::reply ({updated}), {} refused when decoded ({refused})",
        total.writes_done,
        total.writes_cut,
        total.updates_answered,
        total.updates_refused
    );
    std::eprintln!("ended by the server: {reasons:?}");
    // The sessions must reach the states whose bounds they test, or the
    // test checks nothing there. Seeds 1..=100,000 gave (per 100,000):
    // 61,311 reached transmission, 8,949 listed, 5,866 held input, 314
    // reached OUTPUT_HIGH, 15,411 had reads answered, 3,838 submitted
    // writes, 561 had a write cut short by the connection's end, 9,747 had
    // write-side requests answered and 34,493 had some refused (see the
    // lines above). The minimums are about half of each: a change of the
    // script generator's mix passes, one that stops reaching a state
    // fails. Checked from 10,000 sessions on (NBD_SESSIONS= smaller, or one
    // NBD_SESSION_SEED, only reports).
    let n = seeds.len() as u32;
    if n >= 10_000 {
        for (what, got, per_100k) in [
            ("reached transmission", trans, 30_000),
            ("listed exports", lists, 4_500),
            ("held input", held, 1_500),
            ("reached OUTPUT_HIGH", high, 190),
            ("had reads answered", answered, 9_000),
            ("submitted writes", wrote, 1_900),
            ("had a write cut short", cut, 250),
            ("answered write-side requests", updated, 4_800),
            ("had write-side requests refused", refused, 17_000),
        ] {
            let min = (n as u64 * per_100k / 100_000) as u32;
            assert!(got >= min, "{got} of {n} sessions {what}: fewer than {min}");
        }
    }
}

// ---- floods: a client that sends and does not read is held ----

/// The client's side of the TCP connection: what it wrote and the server
/// has not taken yet.
struct Socket {
    b: Vec<u8>,
    at: usize,
}

impl Socket {
    fn new(b: Vec<u8>) -> Socket {
        Socket { b, at: 0 }
    }
    fn left(&self) -> usize {
        self.b.len() - self.at
    }
    /// Offers what the connection has room for, as the kernel does, until
    /// it takes no more.
    fn pump(&mut self, c: &mut Conn, ex: &dyn Exports) {
        loop {
            let n = c.input_room().min(self.left());
            if n == 0 {
                return;
            }
            let taken = c.receive(ex, &self.b[self.at..self.at + n]);
            assert_eq!(taken, n);
            self.at += taken;
        }
    }
}

/// The bound for a caller that never answers a read.
fn bound(max_in_flight: usize) -> usize {
    memory_bound(max_in_flight, 0)
}

/// Reads all the output `n` bytes at a time, resuming and feeding the
/// connection after each, until both sides are idle; checks the bound at
/// every step.
fn read_all(c: &mut Conn, sock: &mut Socket, ex: &dyn Exports, n: usize, limit: usize) -> Vec<u8> {
    let mut got = Vec::new();
    loop {
        let k = c.output().len().min(n);
        got.extend_from_slice(&c.output()[..k]);
        c.consume_output(k);
        c.resume(ex);
        sock.pump(c, ex);
        assert!(c.memory() <= limit, "memory {} above {limit}", c.memory());
        if c.output().is_empty() && sock.left() == 0 {
            return got;
        }
    }
}

#[test]
fn a_client_that_floods_flush_without_reading_is_held_at_no_input_room_with_memory_under_the_bound()
{
    let mut c = opened("nvme0n1");
    let n = 100_000u64;
    let mut sock = Socket::new(
        (0..n)
            .flat_map(|h| request(cmd::FLUSH, 0, h, 0, 0))
            .collect(),
    );
    sock.pump(&mut c, &Fake);
    assert_eq!(c.input_room(), 0);
    assert!(c.output_pending() >= OUTPUT_HIGH);
    assert!(c.output_pending() <= OUTPUT_HIGH + MAX_CONTROL_REPLY);
    assert!(c.memory() <= bound(16), "{}", c.memory());
    // Nothing more is taken however often it is offered.
    sock.pump(&mut c, &Fake);
    c.resume(&Fake);
    assert_eq!(c.input_room(), 0);
    let held = sock.left();
    assert!(held >= 28 * n as usize - (OUTPUT_HIGH + MAX_CONTROL_REPLY) / 16 * 28 - INPUT_CAP);
    // Once the client reads, every flush is answered once, in order.
    let out = read_all(&mut c, &mut sock, &Fake, 60_000, bound(16));
    assert!(errors(&out).into_iter().eq((0..n).map(|h| (h, 0))));
}

#[test]
fn a_flood_of_unknown_commands_is_held_and_each_gets_einval_in_order() {
    let mut c = opened("data/a.bin");
    let n = 60_000u64;
    let types = [42u16, cmd::CACHE, cmd::BLOCK_STATUS, 0xffff];
    let mut sock = Socket::new(
        (0..n)
            .flat_map(|h| request(types[h as usize % 4], 0, h, h, 512))
            .collect(),
    );
    sock.pump(&mut c, &Fake);
    assert_eq!(c.input_room(), 0);
    assert!(c.memory() <= bound(16), "{}", c.memory());
    assert!(sock.left() > 0);
    let out = read_all(&mut c, &mut sock, &Fake, 100_000, bound(16));
    let e = Errno::Inval as u32;
    assert!(errors(&out).into_iter().eq((0..n).map(|h| (h, e))));
}

#[test]
fn a_client_that_pipelines_4500_lists_against_three_thousand_exports_is_held_and_gets_every_list_whole_and_in_order(
) {
    let ex = session::FakeExports::new(3000);
    assert!(ex.list_bytes() > OUTPUT_HIGH);
    let mut c = Conn::new(128);
    take(&mut c);
    c.receive(&ex, &FLAG_C_FIXED_NEWSTYLE.to_be_bytes());
    let n = 4500usize;
    let mut sock = Socket::new((0..n).flat_map(|_| option(opt::LIST, &[])).collect());
    sock.pump(&mut c, &ex);
    assert_eq!(c.input_room(), 0);
    assert!(c.output_pending() >= OUTPUT_HIGH);
    assert!(c.output_pending() <= OUTPUT_HIGH + MAX_CONTROL_REPLY);
    assert!(c.memory() <= bound(128), "{}", c.memory());
    // At most INPUT_CAP buffered, the rest left in the socket.
    assert!(16 * n > INPUT_CAP);
    assert_eq!(sock.left(), 16 * n - INPUT_CAP);
    // One list's answer, as it must arrive every time.
    let mut one = Vec::new();
    for i in 0.. {
        let Some(name) = ex.name(i) else { break };
        let mut h = REPLY_MAGIC.to_be_bytes().to_vec();
        h.extend_from_slice(&opt::LIST.to_be_bytes());
        h.extend_from_slice(&rep::SERVER.to_be_bytes());
        h.extend_from_slice(&(4 + name.len() as u32).to_be_bytes());
        h.extend_from_slice(&(name.len() as u32).to_be_bytes());
        one.extend_from_slice(&h);
        one.extend_from_slice(name.as_bytes());
    }
    one.extend_from_slice(&REPLY_MAGIC.to_be_bytes());
    one.extend_from_slice(&opt::LIST.to_be_bytes());
    one.extend_from_slice(&rep::ACK.to_be_bytes());
    one.extend_from_slice(&0u32.to_be_bytes());
    assert_eq!(one.len(), ex.list_bytes());
    // The client reads in pieces of odd sizes; compare as they come.
    let mut at = 0usize;
    let sizes = [100_000usize, 7, 300_000, 65_536, 1];
    let mut k = 0;
    loop {
        let take_n = c.output().len().min(sizes[k % sizes.len()]);
        k += 1;
        let mut got = &c.output()[..take_n];
        while !got.is_empty() {
            let p = at % one.len();
            let m = got.len().min(one.len() - p);
            assert!(got[..m] == one[p..p + m], "list {} differs", at / one.len());
            got = &got[m..];
            at += m;
        }
        c.consume_output(take_n);
        c.resume(&ex);
        sock.pump(&mut c, &ex);
        assert!(c.memory() <= bound(128), "{}", c.memory());
        assert!(c.output_pending() <= OUTPUT_HIGH + MAX_CONTROL_REPLY);
        if c.output().is_empty() && sock.left() == 0 {
            break;
        }
    }
    assert_eq!(at, n * one.len());
    assert!(!c.is_closed());
}

/// A client sends `n` reads of 4 KiB and reads nothing; the kernel side
/// takes input as room allows, takes every read and answers it while the
/// unsent replies fit in `budget`. Returns the connection once nothing
/// moves, with the socket, the reads taken and not answered, and the
/// count answered.
fn read_flood(max: usize, budget: usize, n: u64) -> (Conn, Socket, VecDeque<Event>, u64) {
    let mut c = Conn::new(max);
    take(&mut c);
    c.receive(&Fake, &FLAG_C_FIXED_NEWSTYLE.to_be_bytes());
    c.receive(&Fake, &option(opt::GO, &go_data("nvme0n1", &[])));
    take(&mut c);
    let mut sock = Socket::new(
        (0..n)
            .flat_map(|h| request(cmd::READ, 0, h, h * 4096, 4096))
            .collect(),
    );
    let data = [0x5au8; 4096];
    let mut answered = 0u64;
    let mut waiting: VecDeque<Event> = VecDeque::new();
    loop {
        let before = (sock.left(), answered, waiting.len());
        sock.pump(&mut c, &Fake);
        waiting.extend(core::iter::from_fn(|| c.next_event()));
        while let Some(&Event::Read { handle, offset, .. }) = waiting.front() {
            if c.output_pending() + 16 + 4096 > budget {
                break;
            }
            waiting.pop_front();
            c.reply_read(&Fake, handle, offset, Ok(&data));
            answered += 1;
        }
        assert!(c.in_flight() <= max);
        let limit = memory_bound(max, budget);
        assert!(c.memory() <= limit, "{} above {limit}", c.memory());
        if before == (sock.left(), answered, waiting.len()) {
            return (c, sock, waiting, answered);
        }
    }
}

#[test]
fn a_read_flood_whose_replies_are_never_read_is_held_by_the_output_limit_or_the_read_slots() {
    let max = 128;
    // A budget above OUTPUT_HIGH: decoding stops at OUTPUT_HIGH, every
    // read decoded gets its reply, none is left in flight.
    let (c, sock, waiting, answered) = read_flood(max, session::READ_BUDGET, 5000);
    assert_eq!(c.input_room(), 0);
    assert_eq!((c.in_flight(), waiting.len()), (0, 0));
    assert!(c.output_pending() >= OUTPUT_HIGH);
    assert!(c.output_pending() < OUTPUT_HIGH + max * (16 + 4096));
    assert!(sock.left() >= 28 * (5000 - answered as usize) - INPUT_CAP);
    // A small budget: the service stops answering, the read slots fill
    // and decoding stops there.
    let (c, sock, waiting, answered) = read_flood(max, 64 << 10, 5000);
    assert_eq!(c.input_room(), 0);
    assert_eq!((c.in_flight(), waiting.len()), (max, max));
    assert_eq!(answered, (64 << 10) / (16 + 4096));
    assert!(sock.left() >= 28 * (5000 - answered as usize - max) - INPUT_CAP);
}

#[test]
fn once_the_client_reads_a_held_read_flood_completes_with_each_read_answered_once() {
    let max = 128;
    let n = 5000;
    let (mut c, mut sock, mut waiting, mut answered) = read_flood(max, 64 << 10, n);
    let limit = memory_bound(max, 64 << 10);
    let data = [0x5au8; 4096];
    let mut out = Vec::new();
    while answered < n {
        out.extend_from_slice(c.output());
        c.consume_output(c.output().len());
        c.resume(&Fake);
        sock.pump(&mut c, &Fake);
        waiting.extend(core::iter::from_fn(|| c.next_event()));
        while let Some(&Event::Read { handle, offset, .. }) = waiting.front() {
            if c.output_pending() + 16 + 4096 > 64 << 10 {
                break;
            }
            waiting.pop_front();
            c.reply_read(&Fake, handle, offset, Ok(&data));
            answered += 1;
        }
        assert!(c.memory() <= limit);
    }
    out.extend(take(&mut c));
    let handles: Vec<u64> = out.chunks(16 + 4096).map(|r| be64(&r[8..])).collect();
    assert!(handles.into_iter().eq(0..n));
    assert_eq!(c.in_flight(), 0);
}

#[test]
fn one_decoded_option_queues_at_most_max_control_reply_even_go_with_the_longest_name() {
    // The step behind the bound "control replies stop at OUTPUT_HIGH plus
    // one step": NBD_OPT_GO asking for the name and block sizes of an
    // export whose name is as long as the option can carry.
    let ex = session::FakeExports::new(3000);
    let name = (0..ex.len())
        .filter_map(|i| ex.name(i))
        .max_by_key(|n| n.len())
        .unwrap()
        .to_string();
    assert_eq!(name.len(), session::LONGEST_NAME);
    let data = go_data(&name, &[info::NAME, info::BLOCK_SIZE]);
    assert_eq!(data.len(), MAX_OPTION);
    let mut c = Conn::new(4);
    take(&mut c);
    c.receive(&ex, &FLAG_C_FIXED_NEWSTYLE.to_be_bytes());
    let mut sock = Socket::new(option(opt::GO, &data));
    sock.pump(&mut c, &ex);
    assert!(c.in_transmission());
    assert!(
        c.output_pending() <= MAX_CONTROL_REPLY,
        "{} > {MAX_CONTROL_REPLY}",
        c.output_pending()
    );
    // Likewise a LIST entry of that name.
    let mut c = Conn::new(4);
    take(&mut c);
    c.receive(&ex, &FLAG_C_FIXED_NEWSTYLE.to_be_bytes());
    c.receive(&ex, &option(opt::LIST, &[]));
    let out = take(&mut c);
    let longest = option_replies(&out)
        .iter()
        .map(|r| 20 + r.2.len())
        .max()
        .unwrap();
    assert!(longest <= MAX_CONTROL_REPLY);
}

#[test]
fn error_messages_longer_than_4096_bytes_are_cut_at_a_character_boundary() {
    // Strings on the wire are UTF-8 of at most 4096 bytes (proto.md,
    // "Conventions"): a 'é' straddling byte 4096 is left out whole.
    let mut c = greeted();
    c.receive(&Fake, &option(opt::STRUCTURED_REPLY, &[]));
    c.receive(&Fake, &option(opt::GO, &go_data("nvme0n1", &[])));
    take(&mut c);
    c.receive(&Fake, &request(cmd::READ, 0, 1, 0, 512));
    c.next_event().unwrap();
    let msg = "éa".repeat(2000); // 'é' at bytes 4095..4097
    c.reply_read_error(&Fake, 1, Errno::Io, &msg);
    let out = take(&mut c);
    let m = be16(&out[24..]) as usize;
    assert_eq!(m, 4095);
    assert_eq!(be32(&out[16..]) as usize, 6 + m);
    assert_eq!(out.len(), 26 + m);
    assert_eq!(core::str::from_utf8(&out[26..]).unwrap(), &msg[..4095]);
}

#[test]
fn receive_takes_a_discarded_payload_and_then_what_it_has_room_for() {
    let mut c = opened("nvme0n1");
    c.receive(&Fake, &request(cmd::WRITE, 0, 1, 0, 100));
    // The room is that of the payload being discarded...
    assert_eq!(c.input_room(), 100);
    // ...but offered more, it takes the payload and the request after it.
    let mut bytes = vec![0u8; 100];
    bytes.extend(request(cmd::READ, 0, 2, 0, 512));
    assert_eq!(c.receive(&Fake, &bytes), 128);
    assert!(c.next_event().is_some());
    assert_eq!(errors(&take(&mut c)), vec![(1, Errno::Perm as u32)]);
}

// ---- direct replies and the client ----

/// Pumps bytes both ways between `client` and `conn` until neither has
/// anything to say, answering each read with `data(offset, len)`: through
/// `reply_read_direct` into `wire` when `direct`, else `reply_read`.
fn pump(
    client: &mut client::Client,
    conn: &mut Conn,
    direct: bool,
    data: &dyn Fn(u64, u32) -> Vec<u8>,
) {
    loop {
        let mut moved = false;
        let out = client.output().to_vec();
        if !out.is_empty() {
            client.consume_output(out.len());
            conn.receive(&Fake, &out);
            moved = true;
        }
        while let Some(Event::Read {
            handle,
            offset,
            len,
            ..
        }) = conn.next_event()
        {
            let d = data(offset, len);
            let mut wire = Vec::new();
            let sent = direct
                && conn.reply_read_direct(&Fake, handle, offset, d.len(), |h| {
                    wire.extend_from_slice(h);
                    wire.extend_from_slice(&d);
                    true
                });
            if !sent {
                conn.reply_read(&Fake, handle, offset, Ok(&d));
            }
            client.receive(&wire);
            moved = true;
        }
        let back = take(conn);
        if !back.is_empty() {
            client.receive(&back);
            moved = true;
        }
        if !moved {
            return;
        }
    }
}

fn pattern(offset: u64, len: u32) -> Vec<u8> {
    (offset..offset + len as u64)
        .map(|i| (i * 7) as u8)
        .collect()
}

#[test]
fn the_client_reads_through_a_connection_with_and_without_structured_and_direct_replies() {
    for structured in [false, true] {
        for direct in [false, true] {
            let mut cl = client::Client::new("data/a.bin", structured, 8, 4096);
            let mut conn = Conn::new(8);
            pump(&mut cl, &mut conn, direct, &pattern);
            assert!(
                cl.is_ready(),
                "handshake ({structured}, {direct}): {:?}",
                cl.error()
            );
            assert_eq!(cl.structured(), structured);
            assert_eq!(cl.size(), A.size);
            let mut asked = Vec::new();
            for (off, len) in [(0u64, 512u32), (100, 4096), (9_000, 1000), (9_999, 1)] {
                asked.push((cl.read(off, len).unwrap(), off, len));
            }
            // Past the end: an error reply, for either reply kind.
            let bad = cl.read(9_999, 2).unwrap();
            pump(&mut cl, &mut conn, direct, &pattern);
            let replies: Vec<_> = cl.replies().collect();
            assert_eq!(replies.len(), 5);
            for (h, off, len) in asked {
                let r = replies.iter().find(|r| r.handle == h).unwrap();
                assert_eq!(r.error, 0);
                assert_eq!(r.len, len);
                assert_eq!(r.sum, client::fnv1a(client::FNV_START, &pattern(off, len)));
            }
            let r = replies.iter().find(|r| r.handle == bad).unwrap();
            assert_eq!(r.error, Errno::Inval as u32);
            assert_eq!(cl.in_flight(), 0);
            assert_eq!(conn.in_flight(), 0);
            assert!(cl.error().is_none());
        }
    }
}

#[test]
fn a_direct_reply_is_the_queued_reply_byte_for_byte_and_waits_behind_queued_output() {
    for structured in [false, true] {
        let mut c = greeted();
        if structured {
            c.receive(&Fake, &option(opt::STRUCTURED_REPLY, &[]));
        }
        c.receive(&Fake, &option(opt::GO, &go_data("data/a.bin", &[])));
        take(&mut c);
        c.receive(&Fake, &request(cmd::READ, 0, 0x1122, 9998, 2));
        c.receive(&Fake, &request(cmd::READ, 0, 0x3344, 0, 2));
        c.next_event().unwrap();
        c.next_event().unwrap();
        let mut direct = Vec::new();
        assert!(c.reply_read_direct(&Fake, 0x1122, 9998, 2, |h| {
            direct.extend_from_slice(h);
            direct.extend_from_slice(b"hi");
            true
        }));
        assert_eq!(c.in_flight(), 1);
        let mut queued = opened_like(structured);
        queued.reply_read(&Fake, 0x1122, 9998, Ok(b"hi"));
        assert_eq!(direct, take(&mut queued));
        // A transport without room: nothing changes.
        assert!(!c.reply_read_direct(&Fake, 0x3344, 0, 2, |_| false));
        assert_eq!(c.in_flight(), 1);
        // Output waiting: the reply must queue behind it.
        c.receive(&Fake, &request(cmd::FLUSH, 0, 9, 0, 0));
        assert!(c.output_pending() > 0);
        assert!(!c.reply_read_direct(&Fake, 0x3344, 0, 2, |_| panic!("not called")));
    }
}

/// A connection in transmission on `data/a.bin` with one read (handle
/// 0x1122 at 9998) in flight.
fn opened_like(structured: bool) -> Conn {
    let mut c = greeted();
    if structured {
        c.receive(&Fake, &option(opt::STRUCTURED_REPLY, &[]));
    }
    c.receive(&Fake, &option(opt::GO, &go_data("data/a.bin", &[])));
    c.receive(&Fake, &request(cmd::READ, 0, 0x1122, 9998, 2));
    c.next_event().unwrap();
    take(&mut c);
    c
}

// ---------------------------------------------------------------------------
// The write side.

/// A connection in transmission on `name`, its client allowed to write or
/// not; the GO reply's NBD_INFO_EXPORT transmission flags.
fn opened_rw(name: &str, may_write: bool) -> (Conn, u16) {
    let mut c = Conn::new(16);
    c.allow_writes(may_write);
    take(&mut c);
    c.receive(
        &Fake,
        &(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes(),
    );
    c.receive(&Fake, &option(opt::GO, &go_data(name, &[])));
    assert!(c.in_transmission());
    let r = option_replies(&take(&mut c));
    assert_eq!((r[0].1, r[0].2.len()), (rep::INFO, 12));
    (c, be16(&r[0].2[10..]))
}

#[test]
fn write_flags_are_announced_only_where_the_export_and_the_client_both_allow_writes() {
    // HAS_FLAGS | SEND_FLUSH | SEND_FUA | SEND_TRIM | SEND_WRITE_ZEROES |
    // CAN_MULTI_CONN.
    assert_eq!(opened_rw("vol", true).1, 0x016d);
    // HAS_FLAGS | READ_ONLY | SEND_FLUSH | CAN_MULTI_CONN: the client may
    // not write, or the export takes no writes.
    assert_eq!(opened_rw("vol", false).1, 0x0107);
    assert_eq!(opened_rw("nvme0n1", true).1, 0x0107);
    // NBD_OPT_EXPORT_NAME's reply carries the same flags.
    let mut c = Conn::new(4);
    c.allow_writes(true);
    take(&mut c);
    c.receive(&Fake, &FLAG_C_FIXED_NEWSTYLE.to_be_bytes());
    c.receive(&Fake, &option(opt::EXPORT_NAME, b"vol"));
    let out = take(&mut c);
    assert_eq!(&out[..10], &[0, 0, 0, 0, 0, 0x10, 0, 0, 0x01, 0x6d]);
}

#[test]
fn a_write_hands_its_payload_over_once_and_the_requests_after_it_follow() {
    let (mut c, _) = opened_rw("vol", true);
    let payload = pattern(4096, 10_240);
    let mut bytes = request(cmd::WRITE, cflag::FUA, 21, 4096, 10_240);
    bytes.extend(&payload);
    bytes.extend(request(cmd::READ, cflag::FUA, 22, 0, 512));
    // The header and the payload's start arrive together.
    assert_eq!(c.receive(&Fake, &bytes[..1500]), 1500);
    assert_eq!(
        c.next_event(),
        Some(Event::Write {
            handle: 21,
            export: 3,
            offset: 4096,
            len: 10_240,
            fua: true
        })
    );
    assert!(c.next_event().is_none(), "nothing decoded past the header");
    assert_eq!(c.payload_pending(), 10_240);
    assert_eq!(c.input_room(), 0, "the payload is not buffered by receive");
    let mut dst = vec![0u8; 10_240];
    // What the connection holds first (1,472 bytes), then fresh bytes, in
    // pieces that end where the caller's buffer does.
    let got = |from_data, written, done| Payload {
        from_data,
        written,
        done,
    };
    assert_eq!(c.take_payload(&[], &mut dst[..100]), got(0, 100, false));
    assert_eq!(
        c.take_payload(&bytes[1500..], &mut dst[100..1600]),
        got(128, 1500, false)
    );
    assert_eq!(c.payload_pending(), 8_640);
    let p = c.take_payload(&bytes[1628..], &mut dst[1600..]);
    assert_eq!(p, got(8_640, 8_640, true));
    let fresh = p.from_data;
    assert_eq!(dst, payload, "the payload arrives whole and in order");
    assert_eq!(c.payload_pending(), 0);
    // Nothing more is handed over, nor done again; decoding goes on once
    // the caller resumes.
    assert_eq!(
        c.take_payload(&bytes[1628 + fresh..], &mut dst),
        got(0, 0, false)
    );
    c.resume(&Fake);
    // Decoding goes on: the read after it (FUA, announced, is ignored).
    let rest = &bytes[1628 + fresh..];
    assert_eq!(c.receive(&Fake, rest), rest.len());
    assert!(matches!(
        c.next_event(),
        Some(Event::Read { handle: 22, .. })
    ));
    assert_eq!(c.in_flight(), 2);
    c.reply(&Fake, 21, Ok(()));
    c.reply(&Fake, 22, Err(Errno::Io));
    // Simple replies, golden bytes.
    assert_eq!(
        take(&mut c),
        [
            &[0x67, 0x44, 0x66, 0x98, 0, 0, 0, 0][..],
            &21u64.to_be_bytes(),
            &[0x67, 0x44, 0x66, 0x98, 0, 0, 0, 5],
            &22u64.to_be_bytes()
        ]
        .concat()
    );
    assert_eq!(c.in_flight(), 0);
}

#[test]
fn flush_trim_and_write_zeroes_become_events_on_a_writable_connection() {
    let (mut c, _) = opened_rw("vol", true);
    let mut reqs = request(cmd::FLUSH, 0, 1, 0, 0);
    reqs.extend(request(cmd::FLUSH, cflag::FUA, 2, 0, 0));
    reqs.extend(request(cmd::TRIM, cflag::FUA, 3, 8192, 4096));
    reqs.extend(request(cmd::WRITE_ZEROES, cflag::NO_HOLE, 4, 0, 1 << 20));
    reqs.extend(request(cmd::WRITE_ZEROES, 0, 5, 512, 512));
    c.receive(&Fake, &reqs);
    let events: Vec<Event> = core::iter::from_fn(|| c.next_event()).collect();
    assert_eq!(
        events,
        vec![
            Event::Flush {
                handle: 1,
                export: 3
            },
            Event::Flush {
                handle: 2,
                export: 3
            },
            Event::Trim {
                handle: 3,
                export: 3,
                offset: 8192,
                len: 4096,
                fua: true
            },
            // Longer than the maximum block size: no payload, allowed.
            Event::WriteZeroes {
                handle: 4,
                export: 3,
                offset: 0,
                len: 1 << 20,
                fua: false,
                no_hole: true
            },
            Event::WriteZeroes {
                handle: 5,
                export: 3,
                offset: 512,
                len: 512,
                fua: false,
                no_hole: false
            },
        ]
    );
    assert!(
        take(&mut c).is_empty(),
        "nothing answered before the caller"
    );
    assert_eq!(c.in_flight(), 5);
}

#[test]
fn refused_writes_get_the_protocols_errors_and_their_payload_is_skipped() {
    let (mut c, _) = opened_rw("vol", true);
    let size = VOL.size;
    let mut bytes = Vec::new();
    let mut write = |flags: u16, h: u64, off: u64, len: u32| {
        bytes.extend(request(cmd::WRITE, flags, h, off, len));
        bytes.extend(vec![0x25u8; len as usize]); // looks like request magic
    };
    write(0, 1, size - 512, 1024); // past the end: ENOSPC
    write(0, 2, 0, (64 << 10) + 1); // over the maximum block size
    write(cflag::NO_HOLE, 3, 0, 512); // a flag writes do not take
    write(cflag::FAST_ZERO, 4, 0, 512);
    write(0, 5, 0, 0); // zero length
    bytes.extend(request(cmd::TRIM, 0, 6, size - 100, 512)); // past the end: EINVAL
    bytes.extend(request(cmd::WRITE_ZEROES, 0, 7, size, 512)); // past the end: ENOSPC
    bytes.extend(request(cmd::WRITE_ZEROES, cflag::FAST_ZERO, 8, 0, 512)); // not announced
    bytes.extend(request(cmd::TRIM, cflag::NO_HOLE, 9, 0, 512));
    bytes.extend(request(cmd::FLUSH, 0, 10, 0, 512));
    bytes.extend(request(cmd::READ, cflag::DF, 11, 0, 512));
    bytes.extend(request(cmd::READ, 0, 12, 0, 512));
    for chunk in bytes.chunks(1000) {
        let mut at = 0;
        while at < chunk.len() {
            let n = c.receive(&Fake, &chunk[at..]);
            assert!(n > 0, "input refused at {at} of a chunk");
            at += n;
            assert_eq!(
                c.payload_pending(),
                0,
                "no refused write waits for its payload"
            );
        }
    }
    let (inval, nospc) = (Errno::Inval as u32, Errno::NoSpc as u32);
    assert_eq!(
        errors(&take(&mut c)),
        vec![
            (1, nospc),
            (2, inval),
            (3, inval),
            (4, inval),
            (5, inval),
            (6, inval),
            (7, nospc),
            (8, inval),
            (9, inval),
            (10, inval),
            (11, inval)
        ]
    );
    assert!(matches!(
        c.next_event(),
        Some(Event::Read { handle: 12, .. })
    ));
    assert!(c.next_event().is_none());
}

#[test]
fn a_client_not_allowed_to_write_sees_the_export_read_only() {
    let (mut c, _) = opened_rw("vol", false);
    let mut bytes = request(cmd::WRITE, 0, 1, 0, 4096);
    bytes.extend(vec![7u8; 4096]);
    bytes.extend(request(cmd::TRIM, 0, 2, 0, 4096));
    bytes.extend(request(cmd::WRITE_ZEROES, 0, 3, 0, 4096));
    bytes.extend(request(cmd::FLUSH, 0, 4, 0, 0));
    bytes.extend(request(cmd::FLUSH, cflag::FUA, 5, 0, 0)); // FUA not announced
    bytes.extend(request(cmd::READ, cflag::FUA, 6, 0, 512));
    bytes.extend(request(cmd::READ, 0, 7, 0, 512));
    c.receive(&Fake, &bytes);
    let (perm, inval) = (Errno::Perm as u32, Errno::Inval as u32);
    assert_eq!(
        errors(&take(&mut c)),
        vec![
            (1, perm),
            (2, perm),
            (3, perm),
            (4, 0),
            (5, inval),
            (6, inval)
        ]
    );
    assert!(matches!(
        c.next_event(),
        Some(Event::Read { handle: 7, .. })
    ));
    assert!(c.next_event().is_none());
}

#[test]
fn a_client_gone_in_the_middle_of_a_payload_leaves_its_write_to_be_answered_and_closes() {
    let (mut c, _) = opened_rw("vol", true);
    let mut bytes = request(cmd::WRITE, 0, 1, 0, 4096);
    bytes.extend(vec![1u8; 1000]);
    c.receive(&Fake, &bytes);
    assert!(matches!(c.next_event(), Some(Event::Write { .. })));
    assert_eq!(c.payload_pending(), 4096);
    c.peer_closed();
    assert_eq!(c.payload_pending(), 0, "no more payload will come");
    let mut dst = vec![0u8; 4096];
    let p = c.take_payload(&[1u8; 3096], &mut dst);
    assert!(
        !p.done && p.written == 0,
        "a cut-short write is never done: {p:?}"
    );
    assert!(!c.is_closed(), "its write is still to be answered");
    c.reply(&Fake, 1, Err(Errno::Io));
    // Its reply still goes out (the client may only have shut its side).
    assert_eq!(errors(&take(&mut c)), vec![(1, Errno::Io as u32)]);
    assert!(c.is_closed());
}

#[test]
fn writes_count_against_the_in_flight_limit() {
    let mut c = Conn::new(2);
    c.allow_writes(true);
    c.receive(&Fake, &FLAG_C_FIXED_NEWSTYLE.to_be_bytes());
    c.receive(&Fake, &option(opt::GO, &go_data("vol", &[])));
    take(&mut c);
    let mut bytes = request(cmd::FLUSH, 0, 1, 0, 0);
    bytes.extend(request(cmd::TRIM, 0, 2, 0, 512));
    bytes.extend(request(cmd::FLUSH, 0, 3, 0, 0));
    let n = c.receive(&Fake, &bytes);
    assert_eq!(c.in_flight(), 2);
    assert_eq!(c.input_room(), 0, "held while two requests are in flight");
    assert!(matches!(
        c.next_event(),
        Some(Event::Flush { handle: 1, .. })
    ));
    assert!(matches!(
        c.next_event(),
        Some(Event::Trim { handle: 2, .. })
    ));
    assert_eq!(n, bytes.len(), "the third request is held, not decoded");
    c.reply(&Fake, 1, Ok(()));
    assert!(matches!(
        c.next_event(),
        Some(Event::Flush { handle: 3, .. })
    ));
}

#[test]
fn back_to_back_writes_each_get_their_own_payload() {
    let (mut c, _) = opened_rw("vol", true);
    let mut bytes = request(cmd::WRITE, 0, 1, 0, 512);
    bytes.extend(vec![0xa1u8; 512]);
    bytes.extend(request(cmd::WRITE, 0, 2, 512, 1024));
    bytes.extend(vec![0xa2u8; 1024]);
    bytes.extend(request(cmd::DISC, 0, 3, 0, 0));
    // Both writes and the DISC arrive at once.
    assert_eq!(c.receive(&Fake, &bytes), bytes.len());
    assert!(matches!(
        c.next_event(),
        Some(Event::Write {
            handle: 1,
            len: 512,
            ..
        })
    ));
    assert!(c.next_event().is_none());
    // A caller that fills while the connection says bytes are pending gets
    // the first write's bytes only, however large its buffer.
    let mut first = vec![0u8; 2048];
    let mut n = 0;
    while c.payload_pending() > 0 {
        let p = c.take_payload(&[], &mut first[n..]);
        n += p.written;
        if p.done {
            break;
        }
    }
    assert_eq!(&first[..n], &[0xa1u8; 512][..]);
    c.resume(&Fake);
    assert!(matches!(
        c.next_event(),
        Some(Event::Write {
            handle: 2,
            len: 1024,
            ..
        })
    ));
    let mut second = vec![0u8; 1024];
    assert!(c.take_payload(&[], &mut second).done);
    assert_eq!(second, vec![0xa2u8; 1024]);
    c.resume(&Fake);
    // DISC waits for the two writes in flight.
    assert!(!c.in_transmission());
    assert!(!c.is_closed());
    c.reply(&Fake, 1, Ok(()));
    c.reply(&Fake, 2, Ok(()));
    assert_eq!(errors(&take(&mut c)), vec![(1, 0), (2, 0)]);
    assert!(c.is_closed());
}

#[test]
fn writes_must_be_aligned_to_the_minimum_block_size() {
    let (mut c, _) = opened_rw("vol", true);
    let mut bytes = request(cmd::WRITE, 0, 1, 100, 512); // offset
    bytes.extend(vec![0u8; 512]);
    bytes.extend(request(cmd::WRITE, 0, 2, 0, 700)); // length
    bytes.extend(vec![0u8; 700]);
    bytes.extend(request(cmd::WRITE_ZEROES, 0, 3, 1, 511));
    // A trim may be rounded instead: served.
    bytes.extend(request(cmd::TRIM, 0, 4, 1, 511));
    c.receive(&Fake, &bytes);
    let inval = Errno::Inval as u32;
    assert_eq!(
        errors(&take(&mut c)),
        vec![(1, inval), (2, inval), (3, inval)]
    );
    assert!(matches!(
        c.next_event(),
        Some(Event::Trim { handle: 4, .. })
    ));
}

#[test]
fn the_write_permission_is_fixed_once_the_flags_are_announced() {
    // Told READ_ONLY, then allowed: still refused.
    let (mut c, flags) = opened_rw("vol", false);
    assert_ne!(flags & tflag::READ_ONLY, 0);
    c.allow_writes(true);
    let mut bytes = request(cmd::WRITE, 0, 1, 0, 512);
    bytes.extend(vec![0u8; 512]);
    c.receive(&Fake, &bytes);
    assert_eq!(errors(&take(&mut c)), vec![(1, Errno::Perm as u32)]);
    // Told it may write, then disallowed: the announced flags stand.
    let (mut c, flags) = opened_rw("vol", true);
    assert_eq!(flags & tflag::READ_ONLY, 0);
    c.allow_writes(false);
    c.receive(&Fake, &bytes);
    assert!(matches!(
        c.next_event(),
        Some(Event::Write { handle: 1, .. })
    ));
}

#[test]
fn a_connection_the_caller_ends_answers_what_is_in_flight_and_closes() {
    let (mut c, _) = opened_rw("vol", true);
    let mut bytes = request(cmd::WRITE, 0, 1, 0, 4096);
    bytes.extend(vec![1u8; 100]);
    c.receive(&Fake, &bytes);
    assert!(matches!(c.next_event(), Some(Event::Write { .. })));
    c.end(CloseReason::Unserved);
    assert_eq!(c.close_reason(), Some(CloseReason::Unserved));
    assert_eq!(c.payload_pending(), 0);
    // The rest of the payload is discarded as it arrives.
    assert_eq!(c.receive(&Fake, &[0x25u8; 3996]), 3996);
    c.reply(&Fake, 1, Err(Errno::Perm));
    assert_eq!(errors(&take(&mut c)), vec![(1, Errno::Perm as u32)]);
    assert!(c.is_closed());
}
