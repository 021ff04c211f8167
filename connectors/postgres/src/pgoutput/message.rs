//! The messages pgoutput sends, as decoded.

use bytes::Bytes;
use walcast_sdk::Lsn;

/// Microseconds since 2000-01-01 00:00 UTC, Postgres's epoch.
pub type PgTimestamp = i64;

/// Microseconds between the Unix epoch and Postgres's (2000-01-01).
pub const PG_EPOCH_OFFSET_MICROS: i64 = 946_684_800_000_000;

/// Converts a Postgres timestamp to microseconds since the Unix epoch.
pub fn pg_to_unix_micros(ts: PgTimestamp) -> i64 {
    ts.saturating_add(PG_EPOCH_OFFSET_MICROS)
}

#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    Begin(Begin),
    Commit(Commit),
    Origin(Origin),
    Relation(Relation),
    Type(TypeMessage),
    Insert(Insert),
    Update(Update),
    Delete(Delete),
    Truncate(Truncate),
    Message(LogicalMessage),
    /// Protocol 2: the messages around a streamed (in-progress)
    /// transaction's blocks (see [`super::streaming`]).
    StreamStart(StreamStart),
    StreamStop,
    StreamCommit(StreamCommit),
    StreamAbort(StreamAbort),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Begin {
    /// The LSN of the commit record: the transaction's position.
    pub final_lsn: Lsn,
    pub commit_time: PgTimestamp,
    pub xid: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Commit {
    pub flags: u8,
    pub commit_lsn: Lsn,
    /// The end of the commit record: the position to confirm once every
    /// change of the transaction is durable downstream.
    pub end_lsn: Lsn,
    pub commit_time: PgTimestamp,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub commit_lsn: Lsn,
    pub name: String,
}

/// How Postgres logs old rows for the table (`relreplident`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicaIdentitySetting {
    Default,
    Nothing,
    Full,
    Index,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelationColumn {
    /// Part of the replica identity (the key Postgres logs for updates and
    /// deletes). With REPLICA IDENTITY FULL every column is flagged.
    pub identity: bool,
    pub name: String,
    pub type_oid: u32,
    pub type_modifier: i32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    pub id: u32,
    /// Empty for pg_catalog, as pgoutput sends it.
    pub namespace: String,
    pub name: String,
    pub replica_identity: ReplicaIdentitySetting,
    pub columns: Vec<RelationColumn>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TypeMessage {
    pub oid: u32,
    pub namespace: String,
    pub name: String,
}

/// One column of a row as sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TupleValue {
    Null,
    /// An unchanged TOASTed value that the WAL record does not carry.
    UnchangedToast,
    Text(Bytes),
    Binary(Bytes),
}

pub type Tuple = Vec<TupleValue>;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Insert {
    pub relation_id: u32,
    pub new: Tuple,
}

/// Which old image an update or delete carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OldTuple {
    /// 'K': the replica-identity key columns (others are null).
    Key(Tuple),
    /// 'O': the whole old row (REPLICA IDENTITY FULL).
    Full(Tuple),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Update {
    pub relation_id: u32,
    /// Present only when the key changed (DEFAULT/INDEX) or always (FULL).
    pub old: Option<OldTuple>,
    pub new: Tuple,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delete {
    pub relation_id: u32,
    pub old: OldTuple,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Truncate {
    pub cascade: bool,
    pub restart_identity: bool,
    pub relation_ids: Vec<u32>,
}

/// A message written with `pg_logical_emit_message`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogicalMessage {
    pub transactional: bool,
    pub lsn: Lsn,
    pub prefix: String,
    pub content: Bytes,
}

/// 'S': a block of an in-progress transaction's changes follows, up to
/// Stream Stop; each change in it carries the xid of its (sub)transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamStart {
    /// The top-level transaction.
    pub xid: u32,
    /// The transaction's first block (in this walsender session).
    pub first_segment: bool,
}

/// 'c': a streamed transaction committed; its blocks are its changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamCommit {
    pub xid: u32,
    pub flags: u8,
    pub commit_lsn: Lsn,
    /// The end of the commit record: the position to confirm.
    pub end_lsn: Lsn,
    pub commit_time: PgTimestamp,
}

/// 'A': a streamed transaction (`subxid == xid`) or one of its
/// subtransactions (a savepoint rolled back) aborted: the changes carrying
/// `subxid` never happened. (Protocol 4 adds the abort's LSN and time,
/// which walcast does not ask for.)
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamAbort {
    pub xid: u32,
    pub subxid: u32,
}
