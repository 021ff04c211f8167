//! Decoding one pgoutput message from the bytes of one XLogData payload.

use bytes::Bytes;
use walcast_sdk::Lsn;

use super::message::*;

/// A pgoutput payload that does not parse. Each payload is a whole message,
/// so running out of bytes means a malformed message, not "read more".
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("pgoutput message '{tag}' ended early while reading {field}")]
    Truncated { tag: char, field: &'static str },
    #[error("unknown pgoutput message tag {0:#04x}")]
    UnknownTag(u8),
    #[error("pgoutput message '{tag}': {detail}")]
    Malformed { tag: char, detail: String },
    /// A two-phase commit message: walcast never asks for `two_phase`.
    #[error(
        "pgoutput two-phase message '{0}' received; walcast never asks for two_phase, \
         so Postgres should not send it"
    )]
    Unrequested(char),
    #[error("empty pgoutput message")]
    Empty,
}

pub(super) struct Reader {
    buf: Bytes,
    pub(super) tag: char,
}

impl Reader {
    /// The message's tag, and a reader over the rest.
    pub(super) fn open(payload: Bytes) -> Result<(u8, Reader), DecodeError> {
        let Some(&tag) = payload.first() else {
            return Err(DecodeError::Empty);
        };
        let r = Reader {
            buf: payload.slice(1..),
            tag: tag as char,
        };
        Ok((tag, r))
    }

    /// Room for `n` items of at least `min_size` bytes each, but never more
    /// than the bytes left could hold: a count comes from the network, and
    /// a lying one must not reserve gigabytes before the reads fail.
    fn capacity(&self, n: usize, min_size: usize) -> usize {
        n.min(self.buf.len() / min_size.max(1))
    }

    fn need(&self, n: usize, field: &'static str) -> Result<(), DecodeError> {
        if self.buf.len() < n {
            Err(DecodeError::Truncated {
                tag: self.tag,
                field,
            })
        } else {
            Ok(())
        }
    }

    pub(super) fn u8(&mut self, field: &'static str) -> Result<u8, DecodeError> {
        self.need(1, field)?;
        let v = self.buf[0];
        self.buf = self.buf.slice(1..);
        Ok(v)
    }

    pub(super) fn i16(&mut self, field: &'static str) -> Result<i16, DecodeError> {
        self.need(2, field)?;
        let v = i16::from_be_bytes([self.buf[0], self.buf[1]]);
        self.buf = self.buf.slice(2..);
        Ok(v)
    }

    pub(super) fn i32(&mut self, field: &'static str) -> Result<i32, DecodeError> {
        self.need(4, field)?;
        let v = i32::from_be_bytes(self.buf[..4].try_into().expect("length checked"));
        self.buf = self.buf.slice(4..);
        Ok(v)
    }

    pub(super) fn u32(&mut self, field: &'static str) -> Result<u32, DecodeError> {
        Ok(self.i32(field)? as u32)
    }

    pub(super) fn i64(&mut self, field: &'static str) -> Result<i64, DecodeError> {
        self.need(8, field)?;
        let v = i64::from_be_bytes(self.buf[..8].try_into().expect("length checked"));
        self.buf = self.buf.slice(8..);
        Ok(v)
    }

    pub(super) fn lsn(&mut self, field: &'static str) -> Result<Lsn, DecodeError> {
        Ok(Lsn(self.i64(field)? as u64))
    }

    fn bytes(&mut self, n: usize, field: &'static str) -> Result<Bytes, DecodeError> {
        self.need(n, field)?;
        Ok(self.buf.split_to(n))
    }

    /// A NUL-terminated string.
    fn cstr(&mut self, field: &'static str) -> Result<String, DecodeError> {
        let end = self
            .buf
            .iter()
            .position(|&b| b == 0)
            .ok_or(DecodeError::Truncated {
                tag: self.tag,
                field,
            })?;
        let s = std::str::from_utf8(&self.buf[..end])
            .map_err(|e| DecodeError::Malformed {
                tag: self.tag,
                detail: format!("{field} is not UTF-8: {e}"),
            })?
            .to_string();
        self.buf = self.buf.slice(end + 1..);
        Ok(s)
    }

    fn tuple(&mut self) -> Result<Tuple, DecodeError> {
        let n = self.i16("column count")?;
        if n < 0 {
            return Err(DecodeError::Malformed {
                tag: self.tag,
                detail: format!("negative column count {n}"),
            });
        }
        // Each column takes at least its one-byte kind.
        let mut cols = Vec::with_capacity(self.capacity(n as usize, 1));
        for _ in 0..n {
            let kind = self.u8("column kind")?;
            cols.push(match kind {
                b'n' => TupleValue::Null,
                b'u' => TupleValue::UnchangedToast,
                b't' | b'b' => {
                    let len = self.i32("column length")?;
                    if len < 0 {
                        return Err(DecodeError::Malformed {
                            tag: self.tag,
                            detail: format!("negative column length {len}"),
                        });
                    }
                    let data = self.bytes(len as usize, "column value")?;
                    if kind == b't' {
                        TupleValue::Text(data)
                    } else {
                        TupleValue::Binary(data)
                    }
                }
                other => {
                    return Err(DecodeError::Malformed {
                        tag: self.tag,
                        detail: format!("unknown tuple column kind {other:#04x}"),
                    })
                }
            });
        }
        Ok(cols)
    }

    fn old_tuple(&mut self, kind: u8) -> Result<OldTuple, DecodeError> {
        match kind {
            b'K' => Ok(OldTuple::Key(self.tuple()?)),
            b'O' => Ok(OldTuple::Full(self.tuple()?)),
            other => Err(DecodeError::Malformed {
                tag: self.tag,
                detail: format!("expected 'K' or 'O', got {other:#04x}"),
            }),
        }
    }
}

/// Decodes one pgoutput message (the payload of one XLogData) read
/// outside a streamed transaction's block (see [`super::streaming`] for
/// those inside one).
pub fn decode(payload: Bytes) -> Result<Message, DecodeError> {
    let (tag, mut r) = Reader::open(payload)?;
    let msg = match tag {
        b'B' => Message::Begin(Begin {
            final_lsn: r.lsn("final LSN")?,
            commit_time: r.i64("commit timestamp")?,
            xid: r.u32("xid")?,
        }),
        b'C' => Message::Commit(Commit {
            flags: r.u8("flags")?,
            commit_lsn: r.lsn("commit LSN")?,
            end_lsn: r.lsn("end LSN")?,
            commit_time: r.i64("commit timestamp")?,
        }),
        b'O' => Message::Origin(Origin {
            commit_lsn: r.lsn("origin LSN")?,
            name: r.cstr("origin name")?,
        }),
        b'S' | b'E' | b'c' | b'A' => return super::streaming::control(tag, &mut r),
        b'P' | b'K' | b'r' | b'p' | b'b' => return Err(DecodeError::Unrequested(tag as char)),
        _ => return r.change(tag),
    };
    Ok(msg)
}

impl Reader {
    /// The body of a message that may carry a streamed transaction's xid
    /// before it (relation, type, row changes, logical message), read
    /// after that xid. Any other tag is unknown here.
    pub(super) fn change(&mut self, tag: u8) -> Result<Message, DecodeError> {
        let r = self;
        let msg = match tag {
            b'R' => r.relation()?,
            b'Y' => Message::Type(TypeMessage {
                oid: r.u32("type oid")?,
                namespace: r.cstr("namespace")?,
                name: r.cstr("type name")?,
            }),
            b'I' => {
                let relation_id = r.u32("relation id")?;
                match r.u8("tuple kind")? {
                    b'N' => Message::Insert(Insert {
                        relation_id,
                        new: r.tuple()?,
                    }),
                    other => {
                        return Err(DecodeError::Malformed {
                            tag: 'I',
                            detail: format!("expected 'N', got {other:#04x}"),
                        })
                    }
                }
            }
            b'U' => r.update()?,
            b'D' => {
                let relation_id = r.u32("relation id")?;
                let kind = r.u8("tuple kind")?;
                Message::Delete(Delete {
                    relation_id,
                    old: r.old_tuple(kind)?,
                })
            }
            b'T' => {
                let n = r.i32("relation count")?;
                let options = r.u8("options")?;
                let mut relation_ids = Vec::with_capacity(r.capacity(n.max(0) as usize, 4));
                for _ in 0..n {
                    relation_ids.push(r.u32("relation id")?);
                }
                Message::Truncate(Truncate {
                    cascade: options & 1 != 0,
                    restart_identity: options & 2 != 0,
                    relation_ids,
                })
            }
            b'M' => {
                let flags = r.u8("flags")?;
                let lsn = r.lsn("message LSN")?;
                let prefix = r.cstr("prefix")?;
                let len = r.i32("content length")?;
                let content = r.bytes(len.max(0) as usize, "content")?;
                Message::Message(LogicalMessage {
                    transactional: flags & 1 != 0,
                    lsn,
                    prefix,
                    content,
                })
            }
            other => return Err(DecodeError::UnknownTag(other)),
        };
        Ok(msg)
    }

    fn relation(&mut self) -> Result<Message, DecodeError> {
        let id = self.u32("relation id")?;
        let namespace = self.cstr("namespace")?;
        let name = self.cstr("relation name")?;
        let replica_identity = match self.u8("replica identity")? {
            b'd' => ReplicaIdentitySetting::Default,
            b'n' => ReplicaIdentitySetting::Nothing,
            b'f' => ReplicaIdentitySetting::Full,
            b'i' => ReplicaIdentitySetting::Index,
            other => {
                return Err(DecodeError::Malformed {
                    tag: 'R',
                    detail: format!("unknown replica identity {other:#04x}"),
                })
            }
        };
        let n = self.i16("column count")?;
        // flags, an empty name's NUL, type OID, modifier: 10 bytes at least.
        let mut columns = Vec::with_capacity(self.capacity(n.max(0) as usize, 10));
        for _ in 0..n {
            columns.push(RelationColumn {
                identity: self.u8("column flags")? & 1 == 1,
                name: self.cstr("column name")?,
                type_oid: self.u32("column type")?,
                type_modifier: self.i32("column type modifier")?,
            });
        }
        Ok(Message::Relation(Relation {
            id,
            namespace,
            name,
            replica_identity,
            columns,
        }))
    }

    fn update(&mut self) -> Result<Message, DecodeError> {
        let relation_id = self.u32("relation id")?;
        let mut kind = self.u8("tuple kind")?;
        let old = if kind == b'K' || kind == b'O' {
            let old = self.old_tuple(kind)?;
            kind = self.u8("tuple kind")?;
            Some(old)
        } else {
            None
        };
        if kind != b'N' {
            return Err(DecodeError::Malformed {
                tag: 'U',
                detail: format!("expected 'N', got {kind:#04x}"),
            });
        }
        Ok(Message::Update(Update {
            relation_id,
            old,
            new: self.tuple()?,
        }))
    }
}
