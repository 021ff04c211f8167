//! The initial snapshot: the rows that exist before capture starts, read
//! as events with op `r`, so that a sink starting empty ends up with the
//! whole table and not only what changes later.
//!
//! # The invariant
//!
//! Every row is delivered as of one position from which the stream then
//! continues, so that nothing is missed and nothing is applied out of date:
//!
//! * **Fresh snapshot.** The slot is created with `EXPORT_SNAPSHOT`. The
//!   exported snapshot sees exactly the transactions committed before the
//!   slot's consistent point, and the slot streams exactly those committed
//!   after it. Every worker session imports that snapshot (`SET TRANSACTION
//!   SNAPSHOT`) while the replication connection stays idle (its next
//!   command would end the export), and streaming starts only once every
//!   snapshot batch was acknowledged by every sink. Snapshot events carry
//!   the consistent point as `source.lsn` and `source.commit_lsn`.
//! * **Resumed snapshot.** Progress is written to a state file only after
//!   the sinks acknowledged a chunk. After a crash, the slot still sits at
//!   its consistent point (nothing was confirmed while snapshotting), and
//!   the remaining chunks are read under a *new* snapshot, since the
//!   exported one died with its connection. Rows changed since the
//!   consistent point then appear in the snapshot with their newer values,
//!   and their stream events follow. Snapshot events still carry the
//!   consistent point as version, which is older than any streamed change,
//!   so sinks that apply by version (Redis, OpenSearch) let the stream win,
//!   and replaying the stream in order converges on the table's state.
//!
//! # How rows are read
//!
//! A plain table (`relkind = 'r'`) is cut into ctid block ranges
//! (`WHERE ctid >= '(a,0)' AND ctid < '(b,0)'`, a TID range scan: the heap
//! read in order, no index, no sort), and the ranges of every table go to
//! one queue that all `snapshot_workers` sessions take from, so one big
//! table keeps every session busy (PeerDB reads tables the same way). All
//! sessions import the one snapshot, in which each visible row version has
//! exactly one ctid: the ranges (the last one open-ended) partition the
//! table exactly, and no row is read twice or missed. The plan is made in
//! a worker session inside the snapshot, after locking the table in ACCESS
//! SHARE mode, and every session keeps its transaction (and the locks its
//! reads took) until all workers are done, so no rewrite can renumber the
//! rows between the plan and the last range's read.
//!
//! Progress is per range: the plan (the first block of each range) and the
//! table's `pg_relation_filenode` are saved with the ranges acknowledged.
//! A resumed run reads the missing ranges under its new snapshot. There a
//! row sits at another ctid only if it was updated after the consistent
//! point (an update writes a new row version): the resumed snapshot reads
//! it if the new version lies in a missing range, and if it lies in a range
//! already read, the row's stream event (an update with the whole new row)
//! brings it, after the snapshot. One loss stays possible in that case, as
//! for any row known only from its stream event: an update that left a
//! TOASTed column unchanged does not carry it (without REPLICA IDENTITY
//! FULL), and the sinks mark the column unknown (see `walcast_sdk::toast`).
//! A rewrite (VACUUM FULL, CLUSTER, an ALTER TABLE that rewrites) gives the
//! table a new file and every row a new ctid: the filenode differs, and the
//! table is read again from the start.
//!
//! Partitioned tables published through their root, servers before
//! Postgres 14 (no TID range scans) and tables an earlier version started
//! by key are read in chunks by key instead (keyset pagination over the
//! primary key's index, `snapshot_chunk_rows` rows a chunk), one worker per
//! table, resuming after the last acknowledged key; such a table without a
//! key is read in one pass and starts over after a crash.
//!
//! Rows arrive as `COPY ... TO STDOUT` text, one row per message, parsed
//! where they lie (fields without escapes are borrowed, not copied) and
//! converted by the same functions as streamed values. Memory stays
//! bounded by `max_in_flight_events` and `max_in_flight_bytes`: workers
//! stop when the sinks fall behind, and Postgres waits on the socket.

use std::borrow::Cow;
use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;
use walcast_sdk::ack::AckFailure;
use walcast_sdk::{
    AckTracker, Acker, ChangeEvent, Lsn, Op, SnapshotMarker, SourceInfo, TableName, TableSchema,
    Value,
};

use crate::config::SnapshotMode;
use crate::replication::connection::{quote_ident, quote_literal, ConnectParams};
use walcast_sdk::status::StatusHandle;
use walcast_sdk::telemetry as metrics;

use super::catalog::{self, pg_error_text, Catalog, CatalogError};
use super::convert;

/// How snapshots are taken, from the pipeline's config.
#[derive(Debug, Clone)]
pub struct SnapshotSettings {
    pub mode: SnapshotMode,
    pub workers: usize,
    pub chunk_rows: usize,
    /// Largest block range of a plain table read in one query, in bytes.
    pub range_size: usize,
    /// The state file: `<state_dir>/<pipeline>.snapshot.json`.
    pub state_path: PathBuf,
    /// Incremental snapshots' queue and progress:
    /// `<state_dir>/<pipeline>.incremental.json`.
    pub incremental_state_path: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("snapshot state file {path}: {source}")]
    StateIo {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("snapshot state file {path} is not valid JSON state ({source}); remove it to take the snapshot again from the start")]
    StateParse {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("snapshot: {0}")]
    Catalog(#[from] CatalogError),
    #[error("snapshot: {what}: {}", pg_error_text(source))]
    Session {
        what: String,
        source: tokio_postgres::Error,
    },
    /// `chunk` says which part of the table: `after key (...)`, `from the
    /// start`, `blocks a..b`.
    #[error("snapshot of {table}, chunk {chunk}: {}", pg_error_text(source))]
    Query {
        table: String,
        chunk: String,
        source: tokio_postgres::Error,
    },
    #[error("snapshot of {table}, chunk {chunk}: {reason}")]
    Copy {
        table: String,
        chunk: String,
        reason: String,
    },
    #[error("snapshot of {table}: {reason}")]
    Table { table: String, reason: String },
    #[error("a sink failed to deliver snapshot events (consistent point {lsn}): {source}")]
    Delivery { lsn: Lsn, source: AckFailure },
}

impl SnapshotError {
    /// Worth retrying: the connection went away. The retry resumes from the
    /// last acknowledged chunk.
    pub fn is_transient(&self) -> bool {
        match self {
            SnapshotError::Catalog(e) => e.is_transient(),
            SnapshotError::Session { source, .. } | SnapshotError::Query { source, .. } => {
                super::catalog::transient_sql(source)
            }
            SnapshotError::Delivery { source, .. } => source.transient,
            _ => false,
        }
    }
}

// ---------------------------------------------------------------------------
// The state file.

/// One table's durable progress.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TableProgress {
    /// Every row was read and acknowledged.
    pub done: bool,
    /// Rows acknowledged so far.
    pub rows: u64,
    /// The key (text forms, in key-index order) of the last row of the last
    /// acknowledged chunk; reading resumes after it.
    pub last_key: Option<Vec<String>>,
    /// The table's block ranges and which are delivered, when it is read by
    /// ranges (absent from state files of earlier versions, whose tables
    /// resume by key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ranges: Option<RangePlan>,
}

/// A plain table cut into ctid block ranges, and which of them the sinks
/// acknowledged.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RangePlan {
    /// `pg_relation_filenode` when the plan was made. A rewrite (VACUUM
    /// FULL, CLUSTER, an ALTER TABLE that rewrites) gives the table a new
    /// file and every row a new ctid, so the plan is void once it changed.
    pub filenode: u32,
    /// First block of each range; each ends where the next starts, and the
    /// last is open-ended (rows added since fall into it).
    pub starts: Vec<u32>,
    /// Acknowledged, by range.
    pub done: Vec<bool>,
}

impl RangePlan {
    /// Splits `blocks` blocks into ranges of at most `max_blocks` (at least
    /// [`MIN_RANGE_BLOCKS`] each), and into at least
    /// [`RANGES_PER_WORKER`] per worker when the table is big enough, so
    /// that every worker has a share and none is left with the last big
    /// one.
    pub fn new(filenode: u32, blocks: u64, max_blocks: u64, workers: usize) -> Self {
        let max_blocks = max_blocks.max(1);
        let wanted = blocks
            .div_ceil(max_blocks)
            .max((workers * RANGES_PER_WORKER) as u64);
        let n = wanted.min(blocks / MIN_RANGE_BLOCKS).max(1);
        let step = blocks.div_ceil(n).max(1);
        let starts: Vec<u32> = (0..n)
            .map(|i| i * step)
            .take_while(|b| *b == 0 || *b < blocks)
            .map(|b| b.min(u64::from(u32::MAX)) as u32)
            .collect();
        RangePlan {
            filenode,
            done: vec![false; starts.len()],
            starts,
        }
    }

    /// The ranges not acknowledged yet.
    pub fn remaining(&self) -> Vec<BlockRange> {
        (0..self.starts.len())
            .filter(|i| !self.done[*i])
            .map(|i| BlockRange {
                index: i,
                start: self.starts[i],
                end: self.starts.get(i + 1).copied(),
            })
            .collect()
    }
}

/// Ranges are at least this many blocks (1 MiB of 8 kB pages): below, a
/// query's round trip costs more than its rows.
pub const MIN_RANGE_BLOCKS: u64 = 128;
/// A table is cut into at least this many ranges per worker (when big
/// enough), so that workers finish together.
pub const RANGES_PER_WORKER: usize = 4;

/// One ctid block range of a table: blocks `start..end`, `end` open for the
/// table's last range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockRange {
    pub index: usize,
    pub start: u32,
    pub end: Option<u32>,
}

impl std::fmt::Display for BlockRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.end {
            Some(end) => write!(f, "blocks {}..{}", self.start, end),
            None => write!(f, "blocks {}..", self.start),
        }
    }
}

/// The snapshot's durable progress for one pipeline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotState {
    pub format: u32,
    pub pipeline: String,
    pub slot: String,
    /// The slot's consistent point (`X/X`); unset between writing this
    /// file and the slot's creation.
    pub consistent_point: Option<String>,
    pub done: bool,
    /// By `schema.table`.
    pub tables: BTreeMap<String, TableProgress>,
}

impl SnapshotState {
    pub fn new(pipeline: &str, slot: &str, tables: &[TableName]) -> Self {
        SnapshotState {
            format: 1,
            pipeline: pipeline.into(),
            slot: slot.into(),
            consistent_point: None,
            done: false,
            tables: tables
                .iter()
                .map(|t| (t.to_string(), TableProgress::default()))
                .collect(),
        }
    }

    pub fn load(path: &Path) -> Result<Option<Self>, SnapshotError> {
        let Some(bytes) = read_if_exists(path).map_err(|source| SnapshotError::StateIo {
            path: path.into(),
            source,
        })?
        else {
            return Ok(None);
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|source| SnapshotError::StateParse {
                path: path.into(),
                source,
            })
    }

    /// Writes the file atomically: a crash leaves the old or the new
    /// content, never a torn one (temporary file, fsync, rename, fsync of
    /// the directory).
    pub fn save(&self, path: &Path) -> Result<(), SnapshotError> {
        write_atomically(
            path,
            &serde_json::to_vec_pretty(self).expect("serializable"),
        )
        .map_err(|source| SnapshotError::StateIo {
            path: path.into(),
            source,
        })
    }

    pub fn consistent_point(&self) -> Option<Lsn> {
        self.consistent_point
            .as_deref()
            .and_then(|l| l.parse().ok())
    }
}

// ---------------------------------------------------------------------------
// COPY text format.

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("COPY text field {field}: {reason}")]
pub struct CopyTextError {
    pub field: usize,
    pub reason: String,
}

/// Splits one line of `COPY ... TO STDOUT` text output (without its
/// newline) into fields, undoing the format's escapes. `\N` alone is NULL;
/// `\\`, `\t`, `\n`, `\r`, `\b`, `\f`, `\v`, octal `\ooo` and hex `\xhh`
/// stand for their bytes; any other escaped character for itself. Raw tabs
/// only ever separate fields (tabs in data are escaped), so splitting first
/// is safe. Fields without a backslash (most) are borrowed from the line.
pub fn copy_fields(line: &[u8]) -> Result<Vec<Option<Cow<'_, str>>>, CopyTextError> {
    // Checked once for the line; tabs are ASCII, so every field of valid
    // UTF-8 is too.
    let text = std::str::from_utf8(line).map_err(|e| CopyTextError {
        field: memchr::memchr_iter(b'\t', &line[..e.valid_up_to()]).count(),
        reason: format!("not UTF-8: {e}"),
    })?;
    let mut out = Vec::with_capacity(16);
    let mut from = 0;
    let ends = memchr::memchr_iter(b'\t', line).chain(std::iter::once(line.len()));
    for (field, to) in ends.enumerate() {
        let raw = &text[from..to];
        from = to + 1;
        out.push(if raw == "\\N" {
            None
        } else if memchr::memchr(b'\\', raw.as_bytes()).is_none() {
            Some(Cow::Borrowed(raw))
        } else {
            Some(Cow::Owned(unescape(field, raw.as_bytes())?))
        });
    }
    Ok(out)
}

/// [`copy_fields`], every field owned.
pub fn parse_copy_line(line: &[u8]) -> Result<Vec<Option<String>>, CopyTextError> {
    Ok(copy_fields(line)?
        .into_iter()
        .map(|f| f.map(Cow::into_owned))
        .collect())
}

/// One field with backslash escapes, unescaped.
fn unescape(field: usize, raw: &[u8]) -> Result<String, CopyTextError> {
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        let b = raw[i];
        i += 1;
        if b != b'\\' {
            out.push(b);
            continue;
        }
        let Some(&c) = raw.get(i) else {
            return Err(CopyTextError {
                field,
                reason: "a backslash ends the field".into(),
            });
        };
        i += 1;
        match c {
            b't' => out.push(b'\t'),
            b'n' => out.push(b'\n'),
            b'r' => out.push(b'\r'),
            b'b' => out.push(0x08),
            b'f' => out.push(0x0c),
            b'v' => out.push(0x0b),
            b'0'..=b'7' => {
                let mut v = u32::from(c - b'0');
                for _ in 0..2 {
                    match raw.get(i) {
                        Some(d @ b'0'..=b'7') => {
                            v = v * 8 + u32::from(d - b'0');
                            i += 1;
                        }
                        _ => break,
                    }
                }
                out.push(v as u8);
            }
            b'x' if raw.get(i).is_some_and(u8::is_ascii_hexdigit) => {
                let mut v = 0u32;
                for _ in 0..2 {
                    match raw.get(i).and_then(|d| (*d as char).to_digit(16)) {
                        Some(d) => {
                            v = v * 16 + d;
                            i += 1;
                        }
                        None => break,
                    }
                }
                out.push(v as u8);
            }
            other => out.push(other),
        }
    }
    String::from_utf8(out).map_err(|e| CopyTextError {
        field,
        reason: format!("not UTF-8: {e}"),
    })
}

// ---------------------------------------------------------------------------
// Workers.

/// One table to read, with what is needed to page through it.
pub(super) struct TableJob {
    pub(super) index: usize,
    pub(super) table: Arc<TableSchema>,
    /// Key columns in the key index's order, empty for a key-less table.
    pub(super) key_order: Vec<usize>,
    pub(super) type_names: Vec<String>,
    pub(super) resume_after: Option<Vec<String>>,
    /// The publication's row filter ([`crate::catalog::CatalogTable::row_filter`]): only
    /// rows it lets through are read, so a sink never receives a row the
    /// stream would have filtered out.
    pub(super) row_filter: Option<String>,
}

impl TableJob {
    pub(super) fn name(&self) -> String {
        self.table.qualified_name()
    }

    /// The `COPY ... TO STDOUT` of the chunk after key `after` (text forms
    /// in key-index order), at most `limit` rows, ordered by key.
    pub(super) fn sql(&self, after: Option<&[String]>, limit: usize) -> String {
        let cols: Vec<String> = self
            .table
            .columns
            .iter()
            .map(|c| quote_ident(&c.name))
            .collect();
        let from = self.table.table_name().quoted();
        // Parenthesised: the filter is an expression of its own, combined
        // with the chunk's key range by AND whatever operators it uses.
        let mut conditions: Vec<String> =
            self.row_filter.iter().map(|f| format!("({f})")).collect();
        if self.key_order.is_empty() {
            return format!(
                "COPY (SELECT {} FROM {from}{} ORDER BY ctid) TO STDOUT",
                cols.join(", "),
                where_clause(&conditions)
            );
        }
        let keys: Vec<String> = self
            .key_order
            .iter()
            .map(|i| quote_ident(&self.table.columns[*i].name))
            .collect();
        if let Some(k) = after {
            let lits: Vec<String> = self
                .key_order
                .iter()
                .zip(k)
                .map(|(i, v)| format!("{}::{}", quote_literal(v), self.type_names[*i]))
                .collect();
            conditions.push(format!("({}) > ({})", keys.join(", "), lits.join(", ")));
        }
        format!(
            "COPY (SELECT {} FROM {from}{} ORDER BY {} LIMIT {limit}) TO STDOUT",
            cols.join(", "),
            where_clause(&conditions),
            keys.join(", ")
        )
    }
}

impl TableJob {
    /// The `COPY ... TO STDOUT` of one block range, in physical order (a
    /// TID range scan: sequential reads, no sort). The first range has no
    /// lower bound and the last no upper one, so a table of one range is a
    /// plain sequential scan.
    pub(super) fn range_sql(&self, range: &BlockRange) -> String {
        let cols: Vec<String> = self
            .table
            .columns
            .iter()
            .map(|c| quote_ident(&c.name))
            .collect();
        let mut conditions: Vec<String> =
            self.row_filter.iter().map(|f| format!("({f})")).collect();
        if range.start > 0 {
            conditions.push(format!("ctid >= '({},0)'::tid", range.start));
        }
        if let Some(end) = range.end {
            conditions.push(format!("ctid < '({end},0)'::tid"));
        }
        format!(
            "COPY (SELECT {} FROM {}{}) TO STDOUT",
            cols.join(", "),
            self.table.table_name().quoted(),
            where_clause(&conditions)
        )
    }
}

fn where_clause(conditions: &[String]) -> String {
    if conditions.is_empty() {
        String::new()
    } else {
        format!(" WHERE {}", conditions.join(" AND "))
    }
}

/// Where a chunk ended: what becomes durable once its events are.
#[derive(Debug, Clone)]
struct ChunkEnd {
    table: usize,
    rows: u64,
    last_key: Option<Vec<String>>,
    table_done: bool,
    /// The block range this chunk was, for a table read by ranges.
    range: Option<usize>,
}

/// Events of one table handed from a worker to the coordinator, in order.
struct Piece {
    events: Vec<ChangeEvent>,
    ends: Vec<ChunkEnd>,
}

/// What every event of this snapshot shares.
#[derive(Clone)]
struct EventContext {
    name: String,
    database: String,
    lsn: Lsn,
}

fn now_micros() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

/// A snapshot row as an event; `us` is when it was read (taken once per
/// piece of events: a clock read per row cost more than the row's key).
fn read_event(
    cx: &EventContext,
    table: &Arc<TableSchema>,
    after: Vec<Value>,
    us: i64,
) -> ChangeEvent {
    ChangeEvent {
        op: Op::Read,
        table: Arc::clone(table),
        before: None,
        after: Some(after),
        source: SourceInfo {
            name: cx.name.clone(),
            db: cx.database.clone(),
            lsn: cx.lsn,
            commit_lsn: cx.lsn,
            tx_id: None,
            ts_ms: us.div_euclid(1000),
            ts_us: us,
            snapshot: SnapshotMarker::True,
        },
        transaction: None,
        ts_ms: us.div_euclid(1000),
    }
}

/// What a worker reads in one go.
enum Work {
    /// A whole table, chunk after chunk by key (in one pass without key).
    Chunks(Arc<TableJob>),
    /// One block range of a table; the table's ranges are shared out among
    /// all workers.
    Range(Arc<TableJob>, BlockRange),
}

struct Worker {
    client: Client,
    cx: EventContext,
    chunk_rows: usize,
    batch_max: usize,
    out: mpsc::Sender<Result<Piece, SnapshotError>>,
}

impl Worker {
    /// Reads until the queue is empty. Returns the session with its
    /// transaction still open: the tables' locks must hold until every
    /// worker is done (see the module doc), so the coordinator ends them
    /// all at the end.
    async fn run(self, work: Arc<Mutex<VecDeque<Work>>>) -> Client {
        loop {
            let next = work.lock().ok().and_then(|mut q| q.pop_front());
            let result = match next {
                None => break,
                Some(Work::Chunks(job)) => self.table(&job).await,
                Some(Work::Range(job, range)) => self.range(&job, range).await,
            };
            if let Err(e) = result {
                let _ = self.out.send(Err(e)).await;
                break;
            }
        }
        self.client
    }

    /// Reads one block range, sending pieces of at most `batch_max` events;
    /// the last piece says the range is read.
    async fn range(&self, job: &TableJob, range: BlockRange) -> Result<(), SnapshotError> {
        let shown = range.to_string();
        let read = self
            .copy(job, &job.range_sql(&range), &shown, false)
            .await?;
        self.send(Piece {
            events: read.events,
            ends: vec![ChunkEnd {
                table: job.index,
                rows: read.rows,
                last_key: None,
                table_done: false,
                range: Some(range.index),
            }],
        })
        .await
    }

    /// Reads one table chunk by chunk, sending pieces of at most
    /// `batch_max` events; each chunk's last piece says where it ended.
    async fn table(&self, job: &TableJob) -> Result<(), SnapshotError> {
        let keyed = !job.key_order.is_empty();
        let mut after = job.resume_after.clone();
        loop {
            let shown = after
                .as_ref()
                .map(|k| format!("after key ({})", k.join(", ")))
                .unwrap_or_else(|| "from the start".into());
            let sql = job.sql(after.as_deref(), self.chunk_rows);
            let read = self.copy(job, &sql, &shown, keyed).await?;
            let table_done = !keyed || read.rows < self.chunk_rows as u64;
            let end = ChunkEnd {
                table: job.index,
                rows: read.rows,
                last_key: if keyed {
                    read.last_key.clone().or(after.clone())
                } else {
                    None
                },
                table_done,
                range: None,
            };
            self.send(Piece {
                events: read.events,
                ends: vec![end],
            })
            .await?;
            if table_done {
                return Ok(());
            }
            after = read.last_key;
        }
    }

    /// Runs one `COPY ... TO STDOUT` and turns its rows into events, sending
    /// full pieces as it goes; returns the events of the last, partial
    /// piece, with the row count (and the last row's key when asked).
    async fn copy(
        &self,
        job: &TableJob,
        sql: &str,
        shown: &str,
        keep_key: bool,
    ) -> Result<CopyRead, SnapshotError> {
        let name = job.name();
        let qerr = |source| SnapshotError::Query {
            table: name.clone(),
            chunk: shown.to_string(),
            source,
        };
        let stream = self.client.copy_out(sql).await.map_err(qerr)?;
        futures::pin_mut!(stream);
        let mut lines = CopyLines::default();
        let mut now = now_micros();
        let mut read = CopyRead {
            events: Vec::with_capacity(self.batch_max.min(4096)),
            rows: 0,
            last_key: None,
        };
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(qerr)?;
            lines.feed(&chunk, |line| {
                let fields = copy_fields(line).map_err(|e| SnapshotError::Copy {
                    table: name.clone(),
                    chunk: shown.to_string(),
                    reason: e.to_string(),
                })?;
                let values = row_values(job, &fields, shown)?;
                if keep_key {
                    read.last_key = Some(
                        job.key_order
                            .iter()
                            .map(|i| fields[*i].as_deref().unwrap_or_default().to_string())
                            .collect(),
                    );
                }
                read.events
                    .push(read_event(&self.cx, &job.table, values, now));
                read.rows += 1;
                Ok::<_, SnapshotError>(())
            })?;
            if read.events.len() >= self.batch_max {
                let events = std::mem::replace(
                    &mut read.events,
                    Vec::with_capacity(self.batch_max.min(4096)),
                );
                self.send(Piece {
                    events,
                    ends: Vec::new(),
                })
                .await?;
                now = now_micros();
            }
        }
        if !lines.rest.is_empty() {
            return Err(SnapshotError::Copy {
                table: name,
                chunk: shown.to_string(),
                reason: "COPY output ends inside a row".into(),
            });
        }
        Ok(read)
    }

    async fn send(&self, piece: Piece) -> Result<(), SnapshotError> {
        self.out
            .send(Ok(piece))
            .await
            .map_err(|_| SnapshotError::Table {
                table: String::new(),
                reason: "the snapshot stopped (shutdown or a failure elsewhere)".into(),
            })
    }
}

/// What one COPY gave: the events not sent yet, all its rows, and the key
/// of its last row (text forms) when asked for.
struct CopyRead {
    events: Vec<ChangeEvent>,
    rows: u64,
    last_key: Option<Vec<String>>,
}

/// Cuts COPY output into lines. Postgres sends each row in a message of its
/// own, so lines are taken straight from the message; only a row split
/// across messages (other servers, proxies) is put together in `rest`.
#[derive(Default)]
pub(super) struct CopyLines {
    pub(super) rest: BytesMut,
}

impl CopyLines {
    /// Calls `row` with each complete line (newline removed) of `chunk`.
    pub(super) fn feed<E>(
        &mut self,
        chunk: &[u8],
        mut row: impl FnMut(&[u8]) -> Result<(), E>,
    ) -> Result<(), E> {
        let mut from = 0;
        if !self.rest.is_empty() {
            let Some(nl) = memchr::memchr(b'\n', chunk) else {
                self.rest.extend_from_slice(chunk);
                return Ok(());
            };
            self.rest.extend_from_slice(&chunk[..nl]);
            let line = std::mem::take(&mut self.rest);
            row(&line)?;
            from = nl + 1;
        }
        let start = from;
        for nl in memchr::memchr_iter(b'\n', &chunk[start..]) {
            row(&chunk[from..start + nl])?;
            from = start + nl + 1;
        }
        self.rest.extend_from_slice(&chunk[from..]);
        Ok(())
    }
}

/// Converts one COPY row's text fields into the table's values, as the
/// stream would (the same text output functions feed both).
pub(super) fn row_values<S: AsRef<str>>(
    job: &TableJob,
    fields: &[Option<S>],
    shown: &str,
) -> Result<Vec<Value>, SnapshotError> {
    let table = &job.table;
    if fields.len() != table.columns.len() {
        return Err(SnapshotError::Copy {
            table: job.name(),
            chunk: shown.into(),
            reason: format!(
                "a row has {} fields but the table has {} columns",
                fields.len(),
                table.columns.len()
            ),
        });
    }
    // Allocated at its size: collecting `Result`s would grow it by steps.
    let mut values = Vec::with_capacity(fields.len());
    for (f, c) in fields.iter().zip(&table.columns) {
        values.push(match f {
            None => Value::Null,
            Some(text) => {
                convert::from_text(&c.pg_type, text.as_ref()).map_err(|e| SnapshotError::Copy {
                    table: job.name(),
                    chunk: shown.into(),
                    reason: format!("column {}: {e}", c.name),
                })?
            }
        });
    }
    Ok(values)
}

// ---------------------------------------------------------------------------
// The coordinator.

/// How a snapshot run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Every row was delivered and acknowledged; the state file says done.
    Complete,
    /// Shutdown was requested; acknowledged progress is saved.
    Cancelled,
}

/// One snapshot run: which tables, under which snapshot, at which position.
pub struct SnapshotJob<'a> {
    pub pipeline: &'a str,
    pub settings: &'a SnapshotSettings,
    pub connect: &'a ConnectParams,
    /// `source.name` and `source.db` of events.
    pub name: &'a str,
    pub database: &'a str,
    pub tables: &'a [TableName],
    /// The snapshot exported by the slot's creation; `None` to take a new
    /// one (a resumed snapshot).
    pub exported: Option<String>,
    /// The version snapshot events carry (the slot's consistent point).
    pub position: Lsn,
    pub max_in_flight_events: usize,
    pub max_in_flight_bytes: usize,
    pub batch_max_events: usize,
    pub shutdown_timeout: Duration,
}

/// Opens the worker sessions, all in one snapshot: the exported one, or a
/// new one exported by the first session for the others.
async fn open_sessions(
    p: &ConnectParams,
    n: usize,
    exported: Option<String>,
) -> Result<Vec<Client>, SnapshotError> {
    let begin = "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY";
    let mut clients = Vec::with_capacity(n);
    let mut name = exported;
    for i in 0..n {
        let c = catalog::connect(p).await?;
        match &name {
            Some(snap) => c
                .batch_execute(&format!(
                    "{begin}; SET TRANSACTION SNAPSHOT {}",
                    quote_literal(snap)
                ))
                .await
                .map_err(|source| SnapshotError::Session {
                    what: format!("importing snapshot {snap} in worker {i}"),
                    source,
                })?,
            None => {
                c.batch_execute(begin)
                    .await
                    .map_err(|source| SnapshotError::Session {
                        what: "beginning the snapshot".into(),
                        source,
                    })?;
                let row = c
                    .query_one("SELECT pg_export_snapshot()", &[])
                    .await
                    .map_err(|source| SnapshotError::Session {
                        what: "exporting a snapshot for the workers".into(),
                        source,
                    })?;
                name = Some(row.get(0));
            }
        }
        clients.push(c);
    }
    Ok(clients)
}

struct Progress {
    started: Instant,
    rows_read: u64,
    rows_before: u64,
    estimate: u64,
    tables: usize,
    tables_done: usize,
    resumed: bool,
}

impl Progress {
    fn report(&self, pipeline: &str, status: &StatusHandle, state: &str, log: bool) {
        let secs = self.started.elapsed().as_secs_f64().max(0.001);
        let rate = self.rows_read as f64 / secs;
        let done = self.rows_before + self.rows_read;
        let remaining = self.estimate.saturating_sub(done);
        let eta =
            (rate > 0.0 && state == "running").then(|| (remaining as f64 / rate).round() as u64);
        let value = serde_json::json!({
            "state": state,
            "rows": done,
            "estimated_total": self.estimate,
            "rows_per_second": rate.round(),
            "eta_seconds": eta,
            "tables": self.tables,
            "tables_done": self.tables_done,
            "resumed": self.resumed,
        });
        status.update(|s| {
            s.progress.insert("snapshot".into(), value);
        });
        if log {
            tracing::info!(
                pipeline = %pipeline,
                rows = done,
                estimated_total = self.estimate,
                rows_per_second = rate.round(),
                eta_seconds = ?eta,
                tables_done = self.tables_done,
                tables = self.tables,
                "snapshot {state}"
            );
        }
    }
}

/// Records the chunk ends of every batch up to `seq`, which the sinks have
/// acknowledged (the tracker resolves batches in order). Returns how many
/// tables this completed.
fn apply_acknowledged(
    state: &mut SnapshotState,
    names: &[String],
    ends_by_seq: &mut BTreeMap<u64, Vec<ChunkEnd>>,
    seq: u64,
) -> usize {
    let mut completed = 0;
    let rest = ends_by_seq.split_off(&(seq + 1));
    for end in std::mem::replace(ends_by_seq, rest).into_values().flatten() {
        let t = state.tables.entry(names[end.table].clone()).or_default();
        t.rows += end.rows;
        if end.last_key.is_some() {
            t.last_key = end.last_key;
        }
        let mut table_done = end.table_done;
        if let (Some(i), Some(plan)) = (end.range, t.ranges.as_mut()) {
            if let Some(d) = plan.done.get_mut(i) {
                *d = true;
            }
            table_done = plan.done.iter().all(|d| *d);
        }
        if table_done && !t.done {
            t.done = true;
            completed += 1;
        }
    }
    completed
}

/// Whether the server reads a ctid range without scanning the whole table
/// (TID range scans, Postgres 14+); before, every range would cost a full
/// scan, and tables are read by key.
async fn tid_range_scans(client: &Client) -> Result<bool, SnapshotError> {
    let version: i32 = client
        .query_one("SELECT current_setting('server_version_num')::int", &[])
        .await
        .map_err(|source| SnapshotError::Session {
            what: "server_version_num".into(),
            source,
        })?
        .get(0);
    Ok(version >= 140_000)
}

/// The block ranges left to read of a table, or `None` when it is read by
/// key: it is not a plain table (a partitioned one published through its
/// root), or an earlier version of walcast started it by key.
///
/// Runs in a worker session, inside the snapshot, and takes the table's
/// ACCESS SHARE lock first (held until the snapshot ends, as reading does
/// anyway): no rewrite can then renumber the rows between this plan and
/// the workers' reads, so the ranges partition exactly the rows the
/// snapshot sees. A plan saved by an interrupted run holds while the
/// table's file is the same; a rewrite since (VACUUM FULL, CLUSTER, a
/// rewriting ALTER TABLE) moved every row, and the table starts over.
async fn plan_ranges(
    client: &Client,
    job: &TableJob,
    progress: &mut TableProgress,
    settings: &SnapshotSettings,
) -> Result<Option<Vec<BlockRange>>, SnapshotError> {
    if progress.last_key.is_some() && progress.ranges.is_none() {
        return Ok(None);
    }
    let name = job.name();
    let session = |what: &str| {
        let what = format!("{what} of {name}");
        move |source| SnapshotError::Session { what, source }
    };
    // Any read locks the table in ACCESS SHARE mode until the transaction
    // ends; this one needs no privilege beyond the snapshot's own (LOCK
    // TABLE would want SELECT on the whole table, not only the columns).
    let cols: Vec<String> = job
        .table
        .columns
        .iter()
        .map(|c| quote_ident(&c.name))
        .collect();
    client
        .batch_execute(&format!(
            "SELECT {} FROM {} LIMIT 0",
            cols.join(", "),
            job.table.table_name().quoted()
        ))
        .await
        .map_err(session("locking"))?;
    let row = client
        .query_one(
            "SELECT c.relkind::text, pg_relation_filenode(c.oid), pg_relation_size(c.oid),
                    current_setting('block_size')::int8
             FROM pg_class c WHERE c.oid = $1",
            &[&job.table.relation_id],
        )
        .await
        .map_err(session("size and file"))?;
    let (kind, filenode, bytes, block_size): (String, Option<u32>, i64, i64) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    let (Some(filenode), "r") = (filenode, kind.as_str()) else {
        if progress.ranges.take().is_some() {
            // Ranged once, now of another kind: read it all again by key.
            progress.rows = 0;
        }
        return Ok(None);
    };
    if let Some(plan) = &progress.ranges {
        if plan.filenode == filenode {
            return Ok(Some(plan.remaining()));
        }
        tracing::warn!(
            table = %name,
            "the table was rewritten (VACUUM FULL, CLUSTER or an ALTER TABLE) since the interrupted snapshot: \
             its rows moved, so it is read again from the start"
        );
        progress.rows = 0;
    }
    let block_size = block_size.max(1) as u64;
    let plan = RangePlan::new(
        filenode,
        (bytes.max(0) as u64).div_ceil(block_size),
        settings.range_size as u64 / block_size,
        settings.workers,
    );
    let ranges = plan.remaining();
    progress.ranges = Some(plan);
    Ok(Some(ranges))
}

/// The tables to read, described before any worker starts.
struct Described {
    /// Every table's name, in `job.tables` order (index = `TableJob::index`).
    names: Vec<String>,
    /// Postgres's row estimate of each, for progress.
    reltuples: Vec<u64>,
    /// The tables not yet done.
    pending: Vec<TableJob>,
}

async fn describe_tables(
    job: &SnapshotJob<'_>,
    state: &mut SnapshotState,
    catalog: &mut Catalog,
) -> Result<Described, SnapshotError> {
    let mut d = Described {
        names: Vec::new(),
        reltuples: Vec::new(),
        pending: Vec::new(),
    };
    for table in job.tables {
        let name = table.to_string();
        let progress = state.tables.entry(name.clone()).or_default().clone();
        let described = catalog.table_schema_by_name(table).await?;
        let estimate: f64 = catalog
            .client()
            .query_one(
                "SELECT greatest(reltuples, 0)::float8 FROM pg_class WHERE oid = $1",
                &[&described.schema.relation_id],
            )
            .await
            .map_err(|source| SnapshotError::Session {
                what: format!("row estimate of {name}"),
                source,
            })?
            .get(0);
        d.reltuples.push(estimate as u64);
        d.names.push(name.clone());
        if progress.done {
            continue;
        }
        if described.key_order.is_empty() && described.schema.has_key() {
            return Err(SnapshotError::Table {
                table: name,
                reason: "its key columns are not those of an index".into(),
            });
        }
        d.pending.push(TableJob {
            index: d.names.len() - 1,
            table: described.schema,
            key_order: described.key_order,
            type_names: described.type_names,
            resume_after: progress.last_key.clone(),
            row_filter: described.row_filter,
        });
    }
    Ok(d)
}

/// The parts to read: ctid ranges of the tables that take them, planned by
/// the first session inside the snapshot, keyset chunks for the others.
async fn plan_work(
    first: &Client,
    pending: Vec<TableJob>,
    names: &[String],
    state: &mut SnapshotState,
    settings: &SnapshotSettings,
) -> Result<VecDeque<Work>, SnapshotError> {
    let mut work = VecDeque::new();
    let ranges_apply = tid_range_scans(first).await?;
    for table in pending {
        let progress = state.tables.entry(names[table.index].clone()).or_default();
        let plan = if ranges_apply {
            plan_ranges(first, &table, progress, settings).await?
        } else {
            None
        };
        let table = Arc::new(table);
        match plan {
            Some(ranges) => work.extend(
                ranges
                    .into_iter()
                    .map(|r| Work::Range(Arc::clone(&table), r)),
            ),
            None => work.push_back(Work::Chunks(table)),
        }
    }
    Ok(work)
}

/// Takes (or resumes) the snapshot described by `state`, saving progress as
/// the sinks acknowledge it. Returns once every snapshot event is
/// acknowledged, so the caller may start streaming.
pub async fn run(
    job: SnapshotJob<'_>,
    state: &mut SnapshotState,
    catalog: &mut Catalog,
    tx: &mpsc::Sender<(Vec<ChangeEvent>, Acker)>,
    status: &StatusHandle,
    shutdown: &CancellationToken,
) -> Result<Outcome, SnapshotError> {
    let resumed = state.tables.values().any(|t| t.done || t.rows > 0) || job.exported.is_none();
    let Described {
        names,
        reltuples,
        pending,
    } = describe_tables(&job, state, catalog).await?;
    // The sessions, all in one snapshot; the first also plans the ranges,
    // inside that snapshot.
    let clients = if pending.is_empty() {
        Vec::new()
    } else {
        open_sessions(job.connect, job.settings.workers, job.exported.clone()).await?
    };
    let work = match clients.first() {
        Some(first) => plan_work(first, pending, &names, state, job.settings).await?,
        None => VecDeque::new(),
    };
    let rows_before: u64 = names.iter().map(|n| state.tables[n].rows).sum();
    let estimate: u64 = names
        .iter()
        .zip(&reltuples)
        .map(|(n, e)| (*e).max(state.tables[n].rows))
        .sum();
    let progress = Progress {
        started: Instant::now(),
        rows_read: 0,
        rows_before,
        estimate,
        tables: names.len(),
        tables_done: state
            .tables
            .iter()
            .filter(|(n, t)| t.done && names.contains(n))
            .count(),
        resumed,
    };
    tracing::info!(
        pipeline = %job.pipeline,
        tables = names.len(),
        remaining = names.len() - progress.tables_done,
        parts = work.len(),
        estimated_rows = estimate,
        position = %job.position,
        exported_snapshot = ?job.exported,
        resumed,
        "snapshot starting"
    );
    progress.report(job.pipeline, status, "running", false);

    // Sessions beyond the parts to read would only idle.
    let workers = clients.len().min(work.len()).max(1);
    let clients: Vec<Client> = clients.into_iter().take(work.len()).collect();
    let cx = EventContext {
        name: job.name.to_string(),
        database: job.database.to_string(),
        lsn: job.position,
    };
    let (out_tx, out_rx) = mpsc::channel::<Result<Piece, SnapshotError>>(workers * 2);
    let queue = Arc::new(Mutex::new(work));
    let mut tasks = tokio::task::JoinSet::new();
    for client in clients {
        let w = Worker {
            client,
            cx: cx.clone(),
            chunk_rows: job.settings.chunk_rows,
            batch_max: job.batch_max_events,
            out: out_tx.clone(),
        };
        tasks.spawn(w.run(Arc::clone(&queue)));
    }
    drop(out_tx);

    let mut d = Dispatcher {
        job: &job,
        state,
        names: &names,
        tx,
        status,
        progress,
        tracker: AckTracker::new(),
        ends_by_seq: BTreeMap::new(),
        next_seq: 0,
        held: None,
        sent_any: false,
        dirty: false,
        last_save: Instant::now(),
        last_log: Instant::now(),
    };
    let outcome = match d.run(out_rx, shutdown).await? {
        End::Complete => Outcome::Complete,
        End::Cancelled => Outcome::Cancelled,
        // The pipeline is gone: nothing more can be acknowledged.
        End::Closed => return Ok(Outcome::Cancelled),
    };
    if outcome == Outcome::Complete {
        // Every worker is done: their transactions (and locks) end now.
        while let Some(joined) = tasks.join_next().await {
            if let Ok(client) = joined {
                let _ = client.batch_execute("COMMIT").await;
            }
        }
    }
    tasks.abort_all();
    if outcome == Outcome::Cancelled {
        d.drain_cancelled().await?;
        return Ok(Outcome::Cancelled);
    }
    d.finish()?;
    Ok(Outcome::Complete)
}

/// Hands the workers' pieces to the sinks within the in-flight bounds, and
/// makes each chunk's or range's end durable in the state file once the
/// sinks acknowledged it: one method per kind of wake-up.
struct Dispatcher<'a, 'j> {
    job: &'a SnapshotJob<'j>,
    state: &'a mut SnapshotState,
    names: &'a [String],
    tx: &'a mpsc::Sender<(Vec<ChangeEvent>, Acker)>,
    status: &'a StatusHandle,
    progress: Progress,
    tracker: AckTracker<u64>,
    /// The chunk ends each registered position makes durable.
    ends_by_seq: BTreeMap<u64, Vec<ChunkEnd>>,
    next_seq: u64,
    /// The newest piece, held back so that the very last event of the
    /// snapshot can be marked as such.
    held: Option<Piece>,
    sent_any: bool,
    dirty: bool,
    last_save: Instant,
    last_log: Instant,
}

/// From [`Dispatcher::release`]: the pipeline's channel closed.
struct Closed;

/// How the dispatcher's loop ended.
enum End {
    Complete,
    Cancelled,
    Closed,
}

impl Dispatcher<'_, '_> {
    async fn run(
        &mut self,
        mut out_rx: mpsc::Receiver<Result<Piece, SnapshotError>>,
        shutdown: &CancellationToken,
    ) -> Result<End, SnapshotError> {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut workers_done = false;
        loop {
            if workers_done && self.tracker.in_flight_batches() == 0 {
                return Ok(End::Complete);
            }
            let room = (self.tracker.in_flight_events() < self.job.max_in_flight_events
                && self.tracker.in_flight_bytes() < self.job.max_in_flight_bytes)
                || self.tracker.in_flight_events() == 0;
            let closed = tokio::select! {
                biased;
                _ = shutdown.cancelled() => return Ok(End::Cancelled),
                acked = self.tracker.next() => {
                    self.on_ack(acked)?;
                    Ok(())
                }
                _ = tick.tick() => {
                    self.on_tick()?;
                    Ok(())
                }
                msg = out_rx.recv(), if room && !workers_done => match msg {
                    Some(Ok(piece)) => self.on_piece(piece).await,
                    Some(Err(e)) => return Err(e),
                    None => {
                        workers_done = true;
                        self.on_workers_done().await
                    }
                },
            };
            if closed.is_err() {
                return Ok(End::Closed);
            }
        }
    }

    /// The sinks acknowledged everything up to a registered position.
    fn on_ack(&mut self, acked: Result<Option<u64>, AckFailure>) -> Result<(), SnapshotError> {
        match acked {
            Ok(Some(seq)) => {
                self.progress.tables_done +=
                    apply_acknowledged(self.state, self.names, &mut self.ends_by_seq, seq);
                self.dirty = true;
                if self.last_save.elapsed() >= Duration::from_millis(500) {
                    self.save()?;
                }
                Ok(())
            }
            Ok(None) => Ok(()),
            Err(source) => Err(SnapshotError::Delivery {
                lsn: self.job.position,
                source,
            }),
        }
    }

    /// Saves progress not yet saved, and reports it (logged every 5 s).
    fn on_tick(&mut self) -> Result<(), SnapshotError> {
        if self.dirty {
            self.save()?;
        }
        let log = self.last_log.elapsed() >= Duration::from_secs(5);
        if log {
            self.last_log = Instant::now();
        }
        self.progress
            .report(self.job.pipeline, self.status, "running", log);
        Ok(())
    }

    /// A worker read a piece: the one held back goes out, this one waits.
    async fn on_piece(&mut self, mut piece: Piece) -> Result<(), Closed> {
        self.progress.rows_read += piece.events.len() as u64;
        if piece.events.is_empty() {
            // Nothing to send: its chunk ends ride on the piece held back,
            // or are recorded at once.
            match self.held.as_mut() {
                Some(h) => h.ends.append(&mut piece.ends),
                None => self.release(piece).await?,
            }
        } else if let Some(prev) = self.held.replace(piece) {
            self.release(prev).await?;
        }
        Ok(())
    }

    /// Every worker finished: the very last record of the snapshot says so.
    async fn on_workers_done(&mut self) -> Result<(), Closed> {
        if let Some(mut last) = self.held.take() {
            let only = !self.sent_any;
            if let Some(e) = last.events.last_mut() {
                e.source.snapshot = SnapshotMarker::Last;
            }
            if only && last.events.len() > 1 {
                last.events[0].source.snapshot = SnapshotMarker::First;
            }
            self.sent_any = true;
            self.release(last).await?;
        }
        Ok(())
    }

    /// Hands a piece to the sinks, registered so that its chunk ends become
    /// durable only once the sinks acknowledged it.
    async fn release(&mut self, mut piece: Piece) -> Result<(), Closed> {
        let position = (!piece.ends.is_empty()).then(|| {
            self.next_seq += 1;
            self.ends_by_seq
                .insert(self.next_seq, std::mem::take(&mut piece.ends));
            self.next_seq
        });
        let n = piece.events.len();
        let bytes: usize = piece.events.iter().map(ChangeEvent::approx_bytes).sum();
        let acker = self.tracker.register_sized(position, n, bytes);
        if n == 0 {
            acker.ack();
            return Ok(());
        }
        if !self.sent_any {
            piece.events[0].source.snapshot = SnapshotMarker::First;
            self.sent_any = true;
        }
        let pipeline = self.job.pipeline;
        ::metrics::counter!(metrics::SNAPSHOT_ROWS, "pipeline" => pipeline.to_string())
            .increment(n as u64);
        metrics::events(
            pipeline,
            &piece.events[0].table.qualified_name(),
            "r",
            n as u64,
        );
        self.status.update(|s| s.events_total += n as u64);
        self.tx
            .send((piece.events, acker))
            .await
            .map_err(|_| Closed)
    }

    fn save(&mut self) -> Result<(), SnapshotError> {
        self.state.save(&self.job.settings.state_path)?;
        self.last_save = Instant::now();
        self.dirty = false;
        Ok(())
    }

    /// Cancelled: lets what is in flight be acknowledged (so a restart
    /// repeats less), then saves.
    async fn drain_cancelled(&mut self) -> Result<(), SnapshotError> {
        let deadline = tokio::time::Instant::now() + self.job.shutdown_timeout;
        while self.tracker.in_flight_batches() > 0 {
            match tokio::time::timeout_at(deadline, self.tracker.next()).await {
                Ok(Ok(Some(seq))) => {
                    apply_acknowledged(self.state, self.names, &mut self.ends_by_seq, seq);
                }
                Ok(Ok(None)) => {}
                _ => break,
            }
        }
        self.save()?;
        self.progress
            .report(self.job.pipeline, self.status, "interrupted", true);
        Ok(())
    }

    /// Complete: every table is done.
    fn finish(&mut self) -> Result<(), SnapshotError> {
        for n in self.names {
            self.state.tables.entry(n.clone()).or_default().done = true;
        }
        self.state.done = true;
        self.save()?;
        self.progress.tables_done = self.progress.tables;
        self.progress
            .report(self.job.pipeline, self.status, "done", true);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(s: &str) -> Option<String> {
        Some(s.to_string())
    }

    #[test]
    fn copy_text_fields_and_nulls() {
        assert_eq!(
            parse_copy_line(b"1\tabc\t\\N\t").unwrap(),
            vec![f("1"), f("abc"), None, f("")]
        );
        assert_eq!(parse_copy_line(b"").unwrap(), vec![f("")]);
        // A literal backslash followed by N is text, not NULL.
        assert_eq!(parse_copy_line(b"\\\\N").unwrap(), vec![f("\\N")]);
        assert_eq!(
            parse_copy_line(b"\\N\\N").unwrap(),
            vec![f("NN")],
            "only a whole field is NULL"
        );
    }

    #[test]
    fn copy_text_escapes() {
        assert_eq!(
            parse_copy_line(b"a\\tb\\nc\\rd\\\\e").unwrap(),
            vec![f("a\tb\nc\rd\\e")]
        );
        assert_eq!(
            parse_copy_line(b"\\b\\f\\v").unwrap(),
            vec![f("\u{8}\u{c}\u{b}")]
        );
        assert_eq!(
            parse_copy_line(b"\\101\\0\\12x").unwrap(),
            vec![f("A\0\nx")]
        );
        assert_eq!(parse_copy_line(b"\\x41\\x4g").unwrap(), vec![f("A\u{4}g")]);
        assert_eq!(
            parse_copy_line(b"\\q\\.").unwrap(),
            vec![f("q.")],
            "other escaped characters stand for themselves"
        );
        // bytea's hex output arrives with its backslash doubled.
        assert_eq!(parse_copy_line(b"\\\\x00ff").unwrap(), vec![f("\\x00ff")]);
        // UTF-8 passes through.
        assert_eq!(
            parse_copy_line("tëxt\t{\"a b\",NULL}".as_bytes()).unwrap(),
            vec![f("tëxt"), f("{\"a b\",NULL}")]
        );
    }

    #[test]
    fn copy_text_errors() {
        assert_eq!(parse_copy_line(b"ok\tbad\\").unwrap_err().field, 1);
        assert!(parse_copy_line(b"\\377")
            .unwrap_err()
            .reason
            .contains("UTF-8"));
    }

    #[test]
    fn fields_without_escapes_are_borrowed() {
        let fields = copy_fields(b"1\tplain\t\\N\tesc\\\\aped").unwrap();
        assert!(matches!(fields[1], Some(Cow::Borrowed("plain"))));
        assert_eq!(fields[2], None);
        assert!(matches!(&fields[3], Some(Cow::Owned(s)) if s == "esc\\aped"));
    }

    #[test]
    fn copy_lines_come_whole_however_the_output_is_cut() {
        let text = b"1\ta\n2\tb\n3\tc\n";
        for cut in 0..text.len() {
            for cut2 in cut..text.len() {
                let mut lines = CopyLines::default();
                let mut got: Vec<Vec<u8>> = Vec::new();
                for part in [&text[..cut], &text[cut..cut2], &text[cut2..]] {
                    lines
                        .feed(part, |l| {
                            got.push(l.to_vec());
                            Ok::<_, ()>(())
                        })
                        .unwrap();
                }
                assert_eq!(
                    got,
                    vec![b"1\ta".to_vec(), b"2\tb".to_vec(), b"3\tc".to_vec()],
                    "cut at {cut} and {cut2}"
                );
                assert!(lines.rest.is_empty());
            }
        }
        let mut lines = CopyLines::default();
        lines.feed(b"1\tpartial", |_| Err(())).unwrap();
        assert_eq!(&lines.rest[..], b"1\tpartial", "an unfinished row is kept");
    }

    #[test]
    fn ranges_cover_every_block_once_and_share_the_work() {
        for (blocks, max, workers) in [
            (0u64, 4096u64, 2usize),
            (1, 4096, 2),
            (127, 4096, 2),
            (700, 4096, 2),
            (17_000, 4096, 2),
            (17_000, 4096, 8),
            (1_000_000, 4096, 2),
            (1_000_003, 333, 3),
        ] {
            let plan = RangePlan::new(7, blocks, max, workers);
            let ranges = plan.remaining();
            assert_eq!(ranges.len(), plan.starts.len());
            assert_eq!(ranges[0].start, 0, "{blocks}");
            assert_eq!(ranges.last().unwrap().end, None, "the last range is open");
            for w in ranges.windows(2) {
                assert_eq!(w[0].end, Some(w[1].start), "contiguous: {blocks}");
                assert!(w[0].start < w[1].start, "{blocks}: {ranges:?}");
                let len = u64::from(w[1].start - w[0].start);
                assert!(len <= max.max(MIN_RANGE_BLOCKS), "{blocks}: {len}");
                assert!(len >= MIN_RANGE_BLOCKS.min(blocks), "{blocks}: {len}");
            }
            assert!(u64::from(ranges.last().unwrap().start) < blocks.max(1));
            let wanted = (workers * RANGES_PER_WORKER) as u64;
            if blocks >= wanted * MIN_RANGE_BLOCKS {
                assert!(ranges.len() as u64 >= wanted, "{blocks}: {}", ranges.len());
            }
        }
        let mut plan = RangePlan::new(7, 2000, 4096, 2);
        plan.done[0] = true;
        plan.done[3] = true;
        let left: Vec<usize> = plan.remaining().iter().map(|r| r.index).collect();
        assert_eq!(left.len(), plan.starts.len() - 2);
        assert!(!left.contains(&0) && !left.contains(&3));
    }

    #[test]
    fn range_sql_bounds_by_ctid_and_keeps_the_row_filter() {
        use walcast_sdk::{Column, PgType, ReplicaIdentity};
        let table = Arc::new(TableSchema {
            relation_id: 1,
            schema: "public".into(),
            name: "t".into(),
            columns: vec![Column {
                name: "v".into(),
                pg_type: PgType::Int4,
                type_oid: 23,
                type_modifier: -1,
                nullable: true,
                key: false,
                key_position: None,
                default: None,
            }],
            replica_identity: ReplicaIdentity::Full,
            version: 0,
        });
        let job = TableJob {
            index: 0,
            table,
            key_order: Vec::new(),
            type_names: vec!["integer".into()],
            resume_after: None,
            row_filter: None,
        };
        let r = |start, end| BlockRange {
            index: 0,
            start,
            end,
        };
        assert_eq!(
            job.range_sql(&r(0, None)),
            r#"COPY (SELECT "v" FROM "public"."t") TO STDOUT"#
        );
        assert_eq!(
            job.range_sql(&r(0, Some(10))),
            r#"COPY (SELECT "v" FROM "public"."t" WHERE ctid < '(10,0)'::tid) TO STDOUT"#
        );
        let job = TableJob {
            row_filter: Some("(v > 1) OR (v IS NULL)".into()),
            ..job
        };
        assert_eq!(
            job.range_sql(&r(10, Some(20))),
            r#"COPY (SELECT "v" FROM "public"."t" WHERE ((v > 1) OR (v IS NULL)) AND ctid >= '(10,0)'::tid AND ctid < '(20,0)'::tid) TO STDOUT"#
        );
        assert_eq!(
            job.range_sql(&r(20, None)),
            r#"COPY (SELECT "v" FROM "public"."t" WHERE ((v > 1) OR (v IS NULL)) AND ctid >= '(20,0)'::tid) TO STDOUT"#
        );
    }

    #[test]
    fn state_files_of_earlier_versions_still_load() {
        let old = r#"{"format": 1, "pipeline": "p", "slot": "s", "consistent_point": "0/1", "done": false,
            "tables": {"public.t": {"done": false, "rows": 3, "last_key": ["3"]}}}"#;
        let st: SnapshotState = serde_json::from_str(old).unwrap();
        assert_eq!(st.tables["public.t"].ranges, None);
        assert_eq!(st.tables["public.t"].last_key, Some(vec!["3".to_string()]));
    }

    #[test]
    fn state_file_round_trips_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub").join("p.snapshot.json");
        assert_eq!(SnapshotState::load(&path).unwrap(), None);
        let mut s = SnapshotState::new("p", "walcast_p", &[TableName::new("public", "t")]);
        s.consistent_point = Some("0/16B3748".into());
        s.tables.get_mut("public.t").unwrap().last_key = Some(vec!["42".into()]);
        s.save(&path).unwrap();
        assert_eq!(SnapshotState::load(&path).unwrap(), Some(s.clone()));
        assert_eq!(s.consistent_point(), Some(Lsn(0x16B3748)));
        assert!(!path.with_extension("json.tmp").exists());
        std::fs::write(&path, b"{").unwrap();
        assert!(matches!(
            SnapshotState::load(&path),
            Err(SnapshotError::StateParse { .. })
        ));
    }

    #[test]
    fn chunk_sql_pages_by_key_in_index_order() {
        use walcast_sdk::{Column, PgType, ReplicaIdentity};
        let col = |name: &str, key: bool| Column {
            key_position: None,
            default: None,
            name: name.into(),
            pg_type: PgType::Int4,
            type_oid: 23,
            type_modifier: -1,
            nullable: !key,
            key,
        };
        let table = Arc::new(TableSchema {
            relation_id: 1,
            schema: "public".into(),
            name: "o'k".into(),
            columns: vec![col("v", false), col("a", true), col("b", true)],
            replica_identity: ReplicaIdentity::Default,
            version: 0,
        });
        let job = TableJob {
            index: 0,
            table,
            key_order: vec![2, 1],
            type_names: vec!["integer".into(), "integer".into(), "text".into()],
            resume_after: None,
            row_filter: None,
        };
        assert_eq!(
            job.sql(None, 10),
            r#"COPY (SELECT "v", "a", "b" FROM "public"."o'k" ORDER BY "b", "a" LIMIT 10) TO STDOUT"#
        );
        assert_eq!(
            job.sql(Some(&["x'y".into(), "3".into()]), 10),
            r#"COPY (SELECT "v", "a", "b" FROM "public"."o'k" WHERE ("b", "a") > ('x''y'::text, '3'::integer) ORDER BY "b", "a" LIMIT 10) TO STDOUT"#
        );
        // A row filter bounds every chunk, OR and all.
        let job = TableJob {
            row_filter: Some("(v > 1) OR (v IS NULL)".into()),
            ..job
        };
        assert_eq!(
            job.sql(None, 10),
            r#"COPY (SELECT "v", "a", "b" FROM "public"."o'k" WHERE ((v > 1) OR (v IS NULL)) ORDER BY "b", "a" LIMIT 10) TO STDOUT"#
        );
        assert_eq!(
            job.sql(Some(&["x".into(), "3".into()]), 10),
            r#"COPY (SELECT "v", "a", "b" FROM "public"."o'k" WHERE ((v > 1) OR (v IS NULL)) AND ("b", "a") > ('x'::text, '3'::integer) ORDER BY "b", "a" LIMIT 10) TO STDOUT"#
        );
        let keyless = TableJob {
            key_order: Vec::new(),
            ..job
        };
        assert_eq!(
            keyless.sql(None, 10),
            r#"COPY (SELECT "v", "a", "b" FROM "public"."o'k" WHERE ((v > 1) OR (v IS NULL)) ORDER BY ctid) TO STDOUT"#
        );
    }
}

/// A state file's bytes, or `None` when it does not exist yet.
pub(crate) fn read_if_exists(path: &Path) -> std::io::Result<Option<Vec<u8>>> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Writes a state file so that a crash leaves the old or the new content,
/// never a torn one: temporary file, fsync, rename, fsync of the folder.
pub(crate) fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let tmp = path.with_extension("json.tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}
