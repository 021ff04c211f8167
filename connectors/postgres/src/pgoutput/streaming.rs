//! Protocol version 2's streamed transactions (Postgres 14+, `streaming
//! 'on'`): what changes on the wire, as plain functions over bytes.
//!
//! When a transaction's decoded changes outgrow `logical_decoding_work_mem`,
//! a walsender asked for streaming sends them while the transaction still
//! runs instead of spilling them to disk: a block starts with Stream Start
//! (the top-level xid), holds Relation, Type, row-change and logical
//! messages each prefixed by the xid of the (sub)transaction that made the
//! change, and ends with Stream Stop. Blocks of several transactions
//! interleave with each other and with ordinary Begin…Commit transactions.
//! The outcome comes later, outside any block: Stream Commit (with the
//! commit's LSN, end and time, which the changes did not know) or Stream
//! Abort (of the whole transaction, or of one subtransaction when a
//! savepoint was rolled back).
//!
//! The xid prefix is there only inside a block, so the capture loop reads
//! those payloads with [`in_stream_xid`] (when they arrive: just enough to
//! file them under their transaction) and [`decode_in_stream`] (at the
//! commit, when they are replayed); the messages around blocks come
//! through [`super::decode`].

use bytes::Bytes;

use super::decode::Reader;
use super::*;

/// A payload read inside a streamed block.
#[derive(Debug, Clone, PartialEq)]
pub enum InStream {
    /// Stream Stop: the block ends.
    Stop,
    /// A change of (sub)transaction `xid`.
    Change { xid: u32, message: Message },
}

/// The tags that carry the xid prefix inside a block.
const CHANGE_TAGS: &[u8] = b"RYIUDTM";

/// The xid prefix of a payload read inside a block, without decoding the
/// rest: `None` for Stream Stop. Anything else does not belong in a block.
pub fn in_stream_xid(payload: &[u8]) -> Result<Option<u32>, DecodeError> {
    let Some(&tag) = payload.first() else {
        return Err(DecodeError::Empty);
    };
    if tag == b'E' {
        return Ok(None);
    }
    if !CHANGE_TAGS.contains(&tag) {
        return Err(not_in_block(tag));
    }
    match payload.get(1..5) {
        Some(x) => Ok(Some(u32::from_be_bytes(x.try_into().expect("four bytes")))),
        None => Err(DecodeError::Truncated {
            tag: tag as char,
            field: "xid",
        }),
    }
}

/// Decodes a payload read inside a block: Stream Stop, or a change with
/// the xid it carries.
pub fn decode_in_stream(payload: Bytes) -> Result<InStream, DecodeError> {
    let (tag, mut r) = Reader::open(payload)?;
    if tag == b'E' {
        return Ok(InStream::Stop);
    }
    if !CHANGE_TAGS.contains(&tag) {
        return Err(not_in_block(tag));
    }
    let xid = r.u32("xid")?;
    Ok(InStream::Change {
        xid,
        message: r.change(tag)?,
    })
}

fn not_in_block(tag: u8) -> DecodeError {
    DecodeError::Malformed {
        tag: tag as char,
        detail: "not expected inside a streamed transaction's block".into(),
    }
}

/// The stream control messages, read outside a block by [`super::decode`]
/// (Stream Stop too: the capture loop refuses it there).
pub(super) fn control(tag: u8, r: &mut Reader) -> Result<Message, DecodeError> {
    Ok(match tag {
        b'S' => Message::StreamStart(StreamStart {
            xid: r.u32("xid")?,
            first_segment: r.u8("first segment")? == 1,
        }),
        b'E' => Message::StreamStop,
        b'c' => Message::StreamCommit(StreamCommit {
            xid: r.u32("xid")?,
            flags: r.u8("flags")?,
            commit_lsn: r.lsn("commit LSN")?,
            end_lsn: r.lsn("end LSN")?,
            commit_time: r.i64("commit timestamp")?,
        }),
        b'A' => Message::StreamAbort(StreamAbort {
            xid: r.u32("xid")?,
            subxid: r.u32("subtransaction xid")?,
        }),
        other => {
            return Err(DecodeError::UnknownTag(other));
        }
    })
}
