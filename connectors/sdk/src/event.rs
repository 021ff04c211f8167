//! The change event: one row change with its before and after images.
//!
//! The shape follows Debezium's Postgres connector (`before`, `after`,
//! `source`, `op`, `ts_ms`, `transaction`) so that consumers written for
//! Debezium read walcast's events unchanged.

use std::sync::Arc;

use serde::Serialize;

use crate::position::Lsn;
use crate::table::TableSchema;
use crate::value::Value;

/// What happened to the row. The letters are Debezium's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum Op {
    #[serde(rename = "c")]
    Create,
    #[serde(rename = "u")]
    Update,
    #[serde(rename = "d")]
    Delete,
    #[serde(rename = "t")]
    Truncate,
    /// A row read by a snapshot rather than from the WAL.
    #[serde(rename = "r")]
    Read,
}

impl Op {
    pub fn code(self) -> &'static str {
        match self {
            Op::Create => "c",
            Op::Update => "u",
            Op::Delete => "d",
            Op::Truncate => "t",
            Op::Read => "r",
        }
    }
}

/// Debezium's `source.snapshot` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SnapshotMarker {
    False,
    True,
    First,
    Last,
    Incremental,
}

impl SnapshotMarker {
    pub fn as_str(self) -> &'static str {
        match self {
            SnapshotMarker::False => "false",
            SnapshotMarker::True => "true",
            SnapshotMarker::First => "first",
            SnapshotMarker::Last => "last",
            SnapshotMarker::Incremental => "incremental",
        }
    }
}

/// Where the change came from (Debezium's `source` block).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SourceInfo {
    /// The logical name of the pipeline (Debezium's `topic.prefix`).
    pub name: String,
    pub db: String,
    /// The LSN of this change's record (Debezium's `source.lsn`).
    pub lsn: Lsn,
    /// The commit LSN of its transaction: the version sinks compare.
    pub commit_lsn: Lsn,
    pub tx_id: Option<u32>,
    /// Commit time in milliseconds since the Unix epoch.
    pub ts_ms: i64,
    /// Commit time in microseconds, for latency measurement and `ts_us`.
    pub ts_us: i64,
    pub snapshot: SnapshotMarker,
}

/// Debezium's `transaction` block.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TransactionInfo {
    /// `txid:commit_lsn`, as Debezium writes it.
    pub id: String,
    /// Position of this event among all events of the transaction, from 1.
    pub total_order: u64,
    /// Position among the transaction's events for the same table, from 1.
    pub data_collection_order: u64,
}

/// One row change. `before` and `after` are aligned with `table.columns`.
#[derive(Debug, Clone)]
pub struct ChangeEvent {
    pub op: Op,
    pub table: Arc<TableSchema>,
    pub before: Option<Vec<Value>>,
    pub after: Option<Vec<Value>>,
    pub source: SourceInfo,
    pub transaction: Option<TransactionInfo>,
    /// When walcast processed the event, ms since the Unix epoch.
    pub ts_ms: i64,
}

impl ChangeEvent {
    /// Roughly the memory the event holds, in bytes (its images; the table
    /// description is shared): see [`Value::approx_bytes`].
    pub fn approx_bytes(&self) -> usize {
        let image = |i: &Option<Vec<Value>>| {
            i.as_ref()
                .map_or(0, |r| r.iter().map(Value::approx_bytes).sum::<usize>())
        };
        std::mem::size_of::<ChangeEvent>() + image(&self.before) + image(&self.after)
    }

    /// The row image that identifies the row: the after image for inserts,
    /// updates and reads, the before image for deletes.
    pub fn identity_row(&self) -> Option<&[Value]> {
        match self.op {
            Op::Delete => self.before.as_deref(),
            Op::Truncate => None,
            _ => self.after.as_deref().or(self.before.as_deref()),
        }
    }

    /// The primary-key values, in column order, or `None` when the table
    /// has no key or the event is a truncate.
    pub fn key_values(&self) -> Option<Vec<(&str, &Value)>> {
        let row = self.identity_row()?;
        let cols: Vec<_> = self
            .table
            .columns
            .iter()
            .zip(row)
            .filter(|(c, _)| c.key)
            .map(|(c, v)| (c.name.as_str(), v))
            .collect();
        if cols.is_empty() {
            None
        } else {
            Some(cols)
        }
    }

    /// The version a sink stores with the row so that replays and stale
    /// events never overwrite newer data: the commit LSN.
    pub fn version(&self) -> u64 {
        self.source.commit_lsn.0
    }
}
