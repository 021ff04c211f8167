//! Notices: what a capture pipeline publishes besides row changes —
//! heartbeats, schema changes (and captured DDL text), and logical decoding
//! messages (`pg_logical_emit_message`) for the message outbox.
//!
//! # Why they ride as change events
//!
//! A notice must travel the same road as the rows around it: in the same
//! batches, in WAL order (a schema change goes out before the first row of
//! the new shape; an outbox message only with its committed transaction),
//! acknowledged by the same [`Acker`](crate::Acker) so that the confirmed
//! LSN never passes an undelivered one. So a notice is a [`ChangeEvent`] of
//! a synthetic table: relation id 0 (an OID Postgres never assigns) in the
//! schema [`NOTICE_SCHEMA`], which no catalog holds. Its columns carry what
//! the notice says.
//!
//! Only sinks that say so ([`Sink::takes_notices`](crate::Sink::takes_notices),
//! Kafka) receive them: the capture loop hands the others their batches
//! without notices, so a cache or an index never sees a synthetic table.
//!
//! Notices carry no [`TransactionInfo`](crate::TransactionInfo): they take
//! no place in a transaction's `total_order`, so the order numbers of the
//! row events stay Debezium's.

use std::sync::Arc;

use crate::event::{ChangeEvent, Op, SourceInfo};
use crate::table::{Column, PgType, ReplicaIdentity, TableSchema};
use crate::value::Value;

/// The schema of the synthetic notice tables (not a valid unquoted
/// identifier, so no ordinary table is taken for one).
pub const NOTICE_SCHEMA: &str = "(walcast)";

/// What a notice is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoticeKind {
    /// Published every `heartbeat.interval`.
    Heartbeat,
    /// A captured table's columns changed.
    SchemaChange,
    /// The text of a DDL statement, captured by walcast's event trigger.
    Ddl,
    /// A logical decoding message (`pg_logical_emit_message`).
    Message,
}

impl NoticeKind {
    /// The synthetic table's name.
    pub fn table_name(self) -> &'static str {
        match self {
            NoticeKind::Heartbeat => "heartbeat",
            NoticeKind::SchemaChange => "schema_change",
            NoticeKind::Ddl => "ddl",
            NoticeKind::Message => "message",
        }
    }

    fn from_table_name(name: &str) -> Option<Self> {
        Some(match name {
            "heartbeat" => NoticeKind::Heartbeat,
            "schema_change" => NoticeKind::SchemaChange,
            "ddl" => NoticeKind::Ddl,
            "message" => NoticeKind::Message,
            _ => return None,
        })
    }
}

/// A notice read back from its event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Notice<'a> {
    /// A record the source rendered whole: heartbeats, schema changes and
    /// DDL. `key` and `value` are JSON documents.
    Document {
        kind: NoticeKind,
        key: &'a str,
        value: &'a str,
    },
    /// A logical decoding message as Postgres wrote it.
    Message {
        prefix: &'a str,
        content: &'a [u8],
        transactional: bool,
    },
}

fn column(name: &str, pg_type: PgType) -> Column {
    Column {
        key_position: None,
        default: None,
        name: name.into(),
        pg_type,
        type_oid: 0,
        type_modifier: -1,
        nullable: true,
        key: false,
    }
}

fn table(kind: NoticeKind, columns: Vec<Column>) -> Arc<TableSchema> {
    Arc::new(TableSchema {
        relation_id: 0,
        schema: NOTICE_SCHEMA.into(),
        name: kind.table_name().into(),
        columns,
        replica_identity: ReplicaIdentity::Nothing,
        version: 1,
    })
}

fn event(table: Arc<TableSchema>, row: Vec<Value>, source: SourceInfo, ts_ms: i64) -> ChangeEvent {
    ChangeEvent {
        op: Op::Create,
        table,
        before: None,
        after: Some(row),
        source,
        transaction: None,
        ts_ms,
    }
}

/// A notice whose record the source rendered: `key` and `value` are JSON.
/// `kind` is not [`NoticeKind::Message`].
pub fn document(
    kind: NoticeKind,
    key: String,
    value: String,
    source: SourceInfo,
    ts_ms: i64,
) -> ChangeEvent {
    debug_assert!(kind != NoticeKind::Message);
    let t = table(
        kind,
        vec![column("key", PgType::Json), column("value", PgType::Json)],
    );
    event(t, vec![Value::Json(key), Value::Json(value)], source, ts_ms)
}

/// A logical decoding message.
pub fn message(
    prefix: String,
    content: Vec<u8>,
    transactional: bool,
    source: SourceInfo,
    ts_ms: i64,
) -> ChangeEvent {
    let t = table(
        NoticeKind::Message,
        vec![
            column("prefix", PgType::Text),
            column("content", PgType::Bytea),
            column("transactional", PgType::Bool),
        ],
    );
    event(
        t,
        vec![
            Value::Text(prefix),
            Value::Bytes(content),
            Value::Bool(transactional),
        ],
        source,
        ts_ms,
    )
}

/// Whether the event is a notice rather than a row change.
pub fn is_notice(event: &ChangeEvent) -> bool {
    kind(&event.table).is_some()
}

/// The notice kind of a table, `None` for a real table.
pub fn kind(table: &TableSchema) -> Option<NoticeKind> {
    if table.relation_id != 0 || table.schema != NOTICE_SCHEMA {
        return None;
    }
    NoticeKind::from_table_name(&table.name)
}

/// The notice an event carries, `None` for a row change.
pub fn read(event: &ChangeEvent) -> Option<Notice<'_>> {
    let kind = kind(&event.table)?;
    let row = event.after.as_deref()?;
    match (kind, row) {
        (NoticeKind::Message, [Value::Text(prefix), Value::Bytes(content), Value::Bool(t)]) => {
            Some(Notice::Message {
                prefix,
                content,
                transactional: *t,
            })
        }
        (NoticeKind::Message, _) => None,
        (kind, [Value::Json(key), Value::Json(value)]) => {
            Some(Notice::Document { kind, key, value })
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Lsn, SnapshotMarker};

    fn source() -> SourceInfo {
        SourceInfo {
            name: "shop".into(),
            db: "app".into(),
            lsn: Lsn(7),
            commit_lsn: Lsn(9),
            tx_id: Some(3),
            ts_ms: 1,
            ts_us: 1000,
            snapshot: SnapshotMarker::False,
        }
    }

    #[test]
    fn notices_read_back_and_row_changes_are_not_notices() {
        let m = message("outbox".into(), b"{}".to_vec(), true, source(), 5);
        assert!(is_notice(&m));
        assert_eq!(
            read(&m),
            Some(Notice::Message {
                prefix: "outbox",
                content: b"{}",
                transactional: true
            })
        );
        let h = document(
            NoticeKind::Heartbeat,
            r#"{"serverName":"shop"}"#.into(),
            r#"{"ts_ms":5}"#.into(),
            source(),
            5,
        );
        assert_eq!(
            read(&h),
            Some(Notice::Document {
                kind: NoticeKind::Heartbeat,
                key: r#"{"serverName":"shop"}"#,
                value: r#"{"ts_ms":5}"#
            })
        );
        // A user's table that happens to be called like a notice table.
        let mut real = (*h.table).clone();
        real.relation_id = 16384;
        assert_eq!(kind(&real), None);
        real.relation_id = 0;
        real.schema = "walcast".into();
        assert_eq!(kind(&real), None);
    }
}
