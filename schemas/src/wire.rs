//! The Confluent wire format: what Kafka records carry so that a reader can
//! find the writer's schema in the registry.
//!
//! `0x00` (magic byte), the schema id as a 4-byte big-endian integer, then
//! the Avro binary datum. Pure functions over bytes.

/// The only magic byte Confluent has defined.
pub const MAGIC: u8 = 0;

/// Whether a record's bytes are framed by a schema registry serializer
/// (they start with the magic byte) rather than JSON text, which never
/// starts with a zero byte. The one place readers (the relay, `walcast
/// tail`) tell Avro from JSON.
pub fn is_framed(bytes: &[u8]) -> bool {
    bytes.first() == Some(&MAGIC)
}
/// Magic byte plus schema id.
pub const HEADER_LEN: usize = 5;

/// Why bytes are not a Confluent-framed record. Definite: the record was
/// written by something else (plain JSON, another framing) or cut short.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("record of {len} bytes is shorter than the 5-byte Confluent header (magic byte and schema id)")]
    Short { len: usize },
    #[error("record starts with byte 0x{found:02x}, not the Confluent magic byte 0x00: not written with a schema registry serializer")]
    WrongMagic { found: u8 },
}

/// Prepends the header for `schema_id` to an Avro datum.
pub fn frame(schema_id: u32, datum: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + datum.len());
    write_header(&mut out, schema_id);
    out.extend_from_slice(datum);
    out
}

/// Appends the header, for callers that write the datum into the same buffer.
pub fn write_header(out: &mut Vec<u8>, schema_id: u32) {
    out.push(MAGIC);
    out.extend_from_slice(&schema_id.to_be_bytes());
}

/// The schema id and the Avro datum of a framed record.
pub fn parse(record: &[u8]) -> Result<(u32, &[u8]), WireError> {
    if record.len() < HEADER_LEN {
        return Err(WireError::Short { len: record.len() });
    }
    if record[0] != MAGIC {
        return Err(WireError::WrongMagic { found: record[0] });
    }
    let id = u32::from_be_bytes([record[1], record[2], record[3], record[4]]);
    Ok((id, &record[HEADER_LEN..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_and_parses() {
        let framed = frame(0x0102_0304, &[9, 8]);
        assert_eq!(framed, [0, 1, 2, 3, 4, 9, 8]);
        assert_eq!(parse(&framed), Ok((0x0102_0304, &[9u8, 8][..])));
        assert_eq!(parse(&[0, 0, 0, 0, 7]), Ok((7, &[][..])));
    }

    #[test]
    fn refuses_short_and_foreign_records() {
        assert_eq!(parse(&[0, 0, 0, 1]), Err(WireError::Short { len: 4 }));
        assert_eq!(parse(&[]), Err(WireError::Short { len: 0 }));
        assert_eq!(
            parse(b"{\"a\":1}"),
            Err(WireError::WrongMagic { found: b'{' })
        );
    }
}
