//! The streaming replication sub-protocol inside CopyBoth, as plain
//! functions over bytes: XLogData and primary keepalive from the server,
//! standby status updates from us.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use walcast_sdk::Lsn;

use crate::pgoutput::PG_EPOCH_OFFSET_MICROS;

/// What the server sends inside a CopyData message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerMessage {
    /// 'w': a piece of WAL, for us a pgoutput message.
    XLogData {
        start: Lsn,
        wal_end: Lsn,
        send_time: i64,
        data: Bytes,
    },
    /// 'k': the server's WAL end, and whether it wants a status update now.
    Keepalive {
        wal_end: Lsn,
        send_time: i64,
        reply_requested: bool,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("replication message '{tag}' is {len} bytes, shorter than its {need}-byte header")]
    Short { tag: char, len: usize, need: usize },
    #[error("unknown replication message tag {0:#04x}")]
    UnknownTag(u8),
    #[error("empty CopyData message on the replication stream")]
    Empty,
}

/// Parses the payload of one CopyData message from the server.
pub fn parse_server_message(mut buf: Bytes) -> Result<ServerMessage, ProtocolError> {
    let Some(&tag) = buf.first() else {
        return Err(ProtocolError::Empty);
    };
    let len = buf.len();
    match tag {
        b'w' => {
            if len < 25 {
                return Err(ProtocolError::Short {
                    tag: 'w',
                    len,
                    need: 25,
                });
            }
            buf.advance(1);
            let start = Lsn(buf.get_u64());
            let wal_end = Lsn(buf.get_u64());
            let send_time = buf.get_i64();
            Ok(ServerMessage::XLogData {
                start,
                wal_end,
                send_time,
                data: buf,
            })
        }
        b'k' => {
            if len < 18 {
                return Err(ProtocolError::Short {
                    tag: 'k',
                    len,
                    need: 18,
                });
            }
            buf.advance(1);
            let wal_end = Lsn(buf.get_u64());
            let send_time = buf.get_i64();
            let reply_requested = buf.get_u8() == 1;
            Ok(ServerMessage::Keepalive {
                wal_end,
                send_time,
                reply_requested,
            })
        }
        other => Err(ProtocolError::UnknownTag(other)),
    }
}

/// Microseconds since 2000-01-01, the clock the protocol uses.
pub fn pg_now() -> i64 {
    let unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0);
    unix - PG_EPOCH_OFFSET_MICROS
}

/// A standby status update ('r'). For a logical slot Postgres takes `flush`
/// as the slot's confirmed_flush_lsn: WAL before it may be recycled and
/// changes before it are never sent again. Written and applied are reported
/// as the same position, as we keep nothing that is written but not flushed.
pub fn standby_status_update(flushed: Lsn, now: i64, reply_requested: bool) -> Bytes {
    let mut b = BytesMut::with_capacity(34);
    b.put_u8(b'r');
    b.put_u64(flushed.0);
    b.put_u64(flushed.0);
    b.put_u64(flushed.0);
    b.put_i64(now);
    b.put_u8(u8::from(reply_requested));
    b.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_xlogdata_and_keepalive() {
        let mut w = BytesMut::new();
        w.put_u8(b'w');
        w.put_u64(0x10);
        w.put_u64(0x20);
        w.put_i64(7);
        w.put_slice(b"Bpayload");
        let m = parse_server_message(w.freeze()).unwrap();
        assert_eq!(
            m,
            ServerMessage::XLogData {
                start: Lsn(0x10),
                wal_end: Lsn(0x20),
                send_time: 7,
                data: Bytes::from_static(b"Bpayload")
            }
        );

        let mut k = BytesMut::new();
        k.put_u8(b'k');
        k.put_u64(0x30);
        k.put_i64(9);
        k.put_u8(1);
        assert_eq!(
            parse_server_message(k.freeze()).unwrap(),
            ServerMessage::Keepalive {
                wal_end: Lsn(0x30),
                send_time: 9,
                reply_requested: true
            }
        );
        assert_eq!(
            parse_server_message(Bytes::from_static(b"k\0")),
            Err(ProtocolError::Short {
                tag: 'k',
                len: 2,
                need: 18
            })
        );
        assert_eq!(
            parse_server_message(Bytes::from_static(b"x")),
            Err(ProtocolError::UnknownTag(b'x'))
        );
    }

    #[test]
    fn status_update_layout() {
        let b = standby_status_update(Lsn(0x0102), 5, true);
        assert_eq!(b.len(), 34);
        assert_eq!(b[0], b'r');
        assert_eq!(&b[1..9], &0x0102u64.to_be_bytes());
        assert_eq!(&b[9..17], &0x0102u64.to_be_bytes());
        assert_eq!(&b[25..33], &5i64.to_be_bytes());
        assert_eq!(b[33], 1);
    }
}
