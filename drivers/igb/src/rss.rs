//! Receive-side scaling: the Toeplitz hash, the hash inputs of IPv4 and
//! TCP/IPv4, and the redirection table.
//!
//! The hash (Microsoft's RSS specification, which the 82576 follows,
//! datasheet 7.1.1.7): for every bit of the input, most significant bit of
//! the first byte first, the 32 key bits starting at that bit position are
//! XORed into the result when the input bit is 1. Inputs: source address,
//! destination address (IPv4), then source port, destination port
//! (TCP/IPv4), all in network byte order. The queue is the redirection
//! table entry selected by the hash's low 7 bits.

/// Microsoft's default key (the one its verification vectors use).
pub const MS_KEY: [u8; 40] = [
    0x6d, 0x5a, 0x56, 0xda, 0x25, 0x5b, 0x0e, 0xc2, 0x41, 0x67, 0x25, 0x3d, 0x43, 0xa3, 0x8f, 0xb0,
    0xd0, 0xca, 0x2b, 0xcb, 0xae, 0x7b, 0x30, 0xb4, 0x77, 0xcb, 0x2d, 0xa3, 0x80, 0x30, 0xf2, 0x0c,
    0x6a, 0x42, 0xb7, 0x3b, 0xbe, 0xac, 0x01, 0xfa,
];

/// Entries of the redirection table.
pub const RETA_LEN: usize = 128;

/// The Toeplitz hash of `input` under `key`; input bits beyond
/// `8 * key.len() - 32` contribute nothing.
pub fn toeplitz(key: &[u8], input: &[u8]) -> u32 {
    let mut result = 0u32;
    // The 32 key bits starting at the current bit, and the next byte to
    // shift in.
    let mut window = key
        .iter()
        .take(4)
        .fold(0u32, |w, &b| (w << 8) | u32::from(b));
    let mut next = key.iter().skip(4);
    for &byte in input {
        let incoming = next.next().copied().unwrap_or(0);
        for bit in 0..8 {
            if byte & (0x80 >> bit) != 0 {
                result ^= window;
            }
            window = (window << 1) | u32::from((incoming >> (7 - bit)) & 1);
        }
    }
    result
}

/// The IPv4 hash input: source, destination.
pub fn ipv4_input(src: [u8; 4], dst: [u8; 4]) -> [u8; 8] {
    let mut i = [0u8; 8];
    i[..4].copy_from_slice(&src);
    i[4..].copy_from_slice(&dst);
    i
}

/// The TCP/IPv4 hash input: source, destination, source port,
/// destination port.
pub fn ipv4_tcp_input(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> [u8; 12] {
    let mut i = [0u8; 12];
    i[..8].copy_from_slice(&ipv4_input(src, dst));
    i[8..10].copy_from_slice(&sport.to_be_bytes());
    i[10..].copy_from_slice(&dport.to_be_bytes());
    i
}

/// The redirection table spreading over `queues` queues: entry `i` is
/// queue `i % queues`.
pub fn reta(queues: usize) -> [u8; RETA_LEN] {
    let mut t = [0u8; RETA_LEN];
    for (i, e) in t.iter_mut().enumerate() {
        *e = (i % queues.max(1)) as u8;
    }
    t
}

/// The queue a hash selects in `table` (the 82576 takes the entry's low 4
/// bits; QEMU does too).
pub fn queue_of(table: &[u8; RETA_LEN], hash: u32) -> usize {
    usize::from(table[(hash & 0x7f) as usize] & 0xf)
}

/// Four consecutive bytes as the little-endian register value the device
/// reads them from (RETA and RSSRK: byte 0 in bits 7:0).
pub fn reg_word(bytes: &[u8]) -> u32 {
    bytes
        .iter()
        .take(4)
        .enumerate()
        .fold(0, |w, (i, &b)| w | u32::from(b) << (8 * i))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Microsoft's "Verifying the RSS Hash Calculation" table (also the
    /// 82599 datasheet's 7.1.2.8.3): destination, source, and the IPv4 and
    /// TCP/IPv4 hashes under [`MS_KEY`].
    /// Destination and port, source and port, IPv4 hash, TCP/IPv4 hash.
    type Vector = ([u8; 4], u16, [u8; 4], u16, u32, u32);

    const VECTORS: [Vector; 5] = [
        (
            [161, 142, 100, 80],
            1766,
            [66, 9, 149, 187],
            2794,
            0x323e_8fc2,
            0x51cc_c178,
        ),
        (
            [65, 69, 140, 83],
            4739,
            [199, 92, 111, 2],
            14230,
            0xd718_262a,
            0xc626_b0ea,
        ),
        (
            [12, 22, 207, 184],
            38024,
            [24, 19, 198, 95],
            12898,
            0xd2d0_a5de,
            0x5c2b_394a,
        ),
        (
            [209, 142, 163, 6],
            2217,
            [38, 27, 205, 30],
            48228,
            0x8298_9176,
            0xafc7_327f,
        ),
        (
            [202, 188, 127, 2],
            1303,
            [153, 39, 163, 191],
            44251,
            0x5d18_09c5,
            0x10e8_28a2,
        ),
    ];

    #[test]
    fn the_hash_matches_microsofts_ipv4_verification_vectors() {
        for (dst, _, src, _, ipv4, _) in VECTORS {
            assert_eq!(
                toeplitz(&MS_KEY, &ipv4_input(src, dst)),
                ipv4,
                "{src:?} -> {dst:?}"
            );
        }
    }

    #[test]
    fn the_hash_matches_microsofts_tcp_ipv4_verification_vectors() {
        for (dst, dport, src, sport, _, tcp) in VECTORS {
            let input = ipv4_tcp_input(src, dst, sport, dport);
            assert_eq!(
                toeplitz(&MS_KEY, &input),
                tcp,
                "{src:?}:{sport} -> {dst:?}:{dport}"
            );
        }
    }

    #[test]
    fn the_table_spreads_evenly_and_registers_take_bytes_low_first() {
        let t = reta(3);
        assert_eq!(&t[..7], &[0, 1, 2, 0, 1, 2, 0]);
        assert_eq!(queue_of(&t, 0xffff_ff85), 5 % 3);
        assert_eq!(reg_word(&t[..4]), 0x0002_0100);
        assert_eq!(reg_word(&MS_KEY[..4]), 0xda56_5a6d);
        assert!(reta(0).iter().all(|&q| q == 0));
        // An empty input hashes to 0; a key shorter than the window too.
        assert_eq!(toeplitz(&MS_KEY, &[]), 0);
        assert_eq!(toeplitz(&[], &[0xff]), 0);
    }
}
