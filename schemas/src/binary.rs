//! Avro's binary encoding of the primitive types, as the specification
//! defines it: what the codec writes a datum with, without building a
//! `Value` tree first (that tree and its allocations were most of the
//! encoder's time). Pure functions appending to a buffer.

/// `int` and `long`: zig-zag, then a little-endian base-128 varint.
pub fn long(out: &mut Vec<u8>, v: i64) {
    let mut z = ((v << 1) ^ (v >> 63)) as u64;
    while z >= 0x80 {
        out.push((z as u8) | 0x80);
        z >>= 7;
    }
    out.push(z as u8);
}

/// `bytes`: the length as a `long`, then the bytes.
pub fn bytes(out: &mut Vec<u8>, b: &[u8]) {
    long(out, b.len() as i64);
    out.extend_from_slice(b);
}

/// `string`: its UTF-8 bytes as `bytes`.
pub fn string(out: &mut Vec<u8>, s: &str) {
    bytes(out, s.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn longs_are_zigzag_varints() {
        // The specification's examples, and the extremes.
        for (v, expected) in [
            (0i64, vec![0x00u8]),
            (-1, vec![0x01]),
            (1, vec![0x02]),
            (-2, vec![0x03]),
            (2, vec![0x04]),
            (-64, vec![0x7f]),
            (64, vec![0x80, 0x01]),
            (
                i64::MAX,
                vec![0xfe, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01],
            ),
            (
                i64::MIN,
                vec![0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01],
            ),
        ] {
            let mut out = Vec::new();
            long(&mut out, v);
            assert_eq!(out, expected, "{v}");
        }
    }

    #[test]
    fn strings_carry_their_byte_length() {
        let mut out = Vec::new();
        string(&mut out, "foo");
        assert_eq!(out, [0x06, b'f', b'o', b'o']);
    }
}
