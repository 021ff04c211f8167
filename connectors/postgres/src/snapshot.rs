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
//! Each table is read in chunks by key (keyset pagination over the primary
//! key's index, `COPY ... TO STDOUT` in text format); tables without a key
//! are read in one pass and restart from the beginning after a crash.
//! Memory stays bounded by `max_in_flight_events` and `max_in_flight_bytes`:
//! workers stop when the
//! sinks fall behind.

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

use super::catalog::{self, Catalog, CatalogError};
use super::convert;

/// How snapshots are taken, from the pipeline's config.
#[derive(Debug, Clone)]
pub struct SnapshotSettings {
    pub mode: SnapshotMode,
    pub workers: usize,
    pub chunk_rows: usize,
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
    #[error("snapshot: {what}: {source}")]
    Session {
        what: String,
        source: tokio_postgres::Error,
    },
    #[error("snapshot of {table}, chunk after key {after}: {source}")]
    Query {
        table: String,
        after: String,
        source: tokio_postgres::Error,
    },
    #[error("snapshot of {table}, chunk after key {after}: {reason}")]
    Copy {
        table: String,
        after: String,
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
/// is safe.
pub fn parse_copy_line(line: &[u8]) -> Result<Vec<Option<String>>, CopyTextError> {
    line.split(|b| *b == b'\t')
        .enumerate()
        .map(|(field, raw)| {
            if raw == b"\\N" {
                return Ok(None);
            }
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
            String::from_utf8(out).map(Some).map_err(|e| CopyTextError {
                field,
                reason: format!("not UTF-8: {e}"),
            })
        })
        .collect()
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

fn read_event(cx: &EventContext, table: &Arc<TableSchema>, after: Vec<Value>) -> ChangeEvent {
    let us = now_micros();
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

struct Worker {
    client: Client,
    cx: EventContext,
    chunk_rows: usize,
    batch_max: usize,
    out: mpsc::Sender<Result<Piece, SnapshotError>>,
}

impl Worker {
    async fn run(self, jobs: Arc<Mutex<VecDeque<TableJob>>>) {
        loop {
            let job = jobs.lock().ok().and_then(|mut q| q.pop_front());
            let Some(job) = job else { break };
            if let Err(e) = self.table(&job).await {
                let _ = self.out.send(Err(e)).await;
                return;
            }
        }
        let _ = self.client.batch_execute("COMMIT").await;
    }

    /// Reads one table chunk by chunk, sending pieces of at most
    /// `batch_max` events; each chunk's last piece says where it ended.
    async fn table(&self, job: &TableJob) -> Result<(), SnapshotError> {
        let name = job.name();
        let keyed = !job.key_order.is_empty();
        let mut after = job.resume_after.clone();
        loop {
            let shown = after
                .as_ref()
                .map(|k| format!("({})", k.join(", ")))
                .unwrap_or_else(|| "(start)".into());
            let sql = job.sql(after.as_deref(), self.chunk_rows);
            let qerr = |source| SnapshotError::Query {
                table: name.clone(),
                after: shown.clone(),
                source,
            };
            let stream = self.client.copy_out(sql.as_str()).await.map_err(qerr)?;
            futures::pin_mut!(stream);
            let mut buf = BytesMut::new();
            let mut events = Vec::new();
            let mut rows = 0u64;
            let mut last_key: Option<Vec<String>> = None;
            let mut eof = false;
            while !eof {
                match stream.next().await {
                    Some(chunk) => buf.extend_from_slice(&chunk.map_err(qerr)?),
                    None => eof = true,
                }
                while let Some(nl) = buf.iter().position(|b| *b == b'\n') {
                    let line = buf.split_to(nl + 1);
                    let fields = parse_copy_line(&line[..nl]).map_err(|e| SnapshotError::Copy {
                        table: name.clone(),
                        after: shown.clone(),
                        reason: e.to_string(),
                    })?;
                    let values = self.row(job, &fields, &shown)?;
                    if keyed {
                        last_key = Some(
                            job.key_order
                                .iter()
                                .map(|i| fields[*i].clone().unwrap_or_default())
                                .collect(),
                        );
                    }
                    events.push(read_event(&self.cx, &job.table, values));
                    rows += 1;
                    if events.len() >= self.batch_max {
                        self.send(Piece {
                            events: std::mem::take(&mut events),
                            ends: Vec::new(),
                        })
                        .await?;
                    }
                }
                if eof && !buf.is_empty() {
                    return Err(SnapshotError::Copy {
                        table: name.clone(),
                        after: shown.clone(),
                        reason: "COPY output ends inside a row".into(),
                    });
                }
            }
            let table_done = !keyed || rows < self.chunk_rows as u64;
            let end = ChunkEnd {
                table: job.index,
                rows,
                last_key: if keyed {
                    last_key.clone().or(after.clone())
                } else {
                    None
                },
                table_done,
            };
            self.send(Piece {
                events,
                ends: vec![end],
            })
            .await?;
            if table_done {
                return Ok(());
            }
            after = last_key;
        }
    }

    fn row(
        &self,
        job: &TableJob,
        fields: &[Option<String>],
        shown: &str,
    ) -> Result<Vec<Value>, SnapshotError> {
        row_values(job, fields, shown)
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

/// Converts one COPY row's text fields into the table's values, as the
/// stream would (the same text output functions feed both).
pub(super) fn row_values(
    job: &TableJob,
    fields: &[Option<String>],
    shown: &str,
) -> Result<Vec<Value>, SnapshotError> {
    let table = &job.table;
    if fields.len() != table.columns.len() {
        return Err(SnapshotError::Copy {
            table: job.name(),
            after: shown.into(),
            reason: format!(
                "a row has {} fields but the table has {} columns",
                fields.len(),
                table.columns.len()
            ),
        });
    }
    fields
        .iter()
        .zip(&table.columns)
        .map(|(f, c)| match f {
            None => Ok(Value::Null),
            Some(text) => convert::from_text(&c.pg_type, text).map_err(|e| SnapshotError::Copy {
                table: job.name(),
                after: shown.into(),
                reason: format!("column {}: {e}", c.name),
            }),
        })
        .collect()
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
        if end.table_done && !t.done {
            t.done = true;
            completed += 1;
        }
    }
    completed
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
    let path = &job.settings.state_path;
    let resumed = state.tables.values().any(|t| t.done || t.rows > 0) || job.exported.is_none();
    // The tables, described before any worker starts.
    let mut jobs = VecDeque::new();
    let mut names = Vec::new();
    let mut estimate = 0u64;
    let mut rows_before = 0u64;
    for table in job.tables {
        let name = table.to_string();
        let progress = state.tables.entry(name.clone()).or_default().clone();
        rows_before += progress.rows;
        let described = catalog.table_schema_by_name(table).await?;
        let reltuples: f64 = catalog
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
        estimate += (reltuples as u64).max(progress.rows);
        names.push(name.clone());
        if progress.done {
            continue;
        }
        if described.key_order.is_empty() && described.schema.has_key() {
            return Err(SnapshotError::Table {
                table: name,
                reason: "its key columns are not those of an index".into(),
            });
        }
        jobs.push_back(TableJob {
            index: names.len() - 1,
            table: described.schema,
            key_order: described.key_order,
            type_names: described.type_names,
            // Key-less tables have no position to resume from.
            resume_after: progress.last_key.clone(),
            row_filter: described.row_filter,
        });
    }
    let mut progress = Progress {
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
        remaining = jobs.len(),
        estimated_rows = estimate,
        position = %job.position,
        exported_snapshot = ?job.exported,
        resumed,
        "snapshot starting"
    );
    progress.report(job.pipeline, status, "running", false);

    let workers = job.settings.workers.min(jobs.len()).max(1);
    let clients = if jobs.is_empty() {
        Vec::new()
    } else {
        open_sessions(job.connect, workers, job.exported.clone()).await?
    };
    let cx = EventContext {
        name: job.name.to_string(),
        database: job.database.to_string(),
        lsn: job.position,
    };
    let (out_tx, mut out_rx) = mpsc::channel::<Result<Piece, SnapshotError>>(workers * 2);
    let queue = Arc::new(Mutex::new(jobs));
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

    let mut tracker: AckTracker<u64> = AckTracker::new();
    let mut ends_by_seq: BTreeMap<u64, Vec<ChunkEnd>> = BTreeMap::new();
    let mut next_seq = 0u64;
    let mut held: Option<Piece> = None;
    let mut sent_any = false;
    let mut workers_done = false;
    let mut dirty = false;
    let mut last_save = Instant::now();
    let mut last_log = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    // Hands a piece to the dispatcher, registered so that its chunk ends
    // become durable only once the sinks acknowledged it.
    macro_rules! release {
        ($piece:expr) => {{
            let mut piece: Piece = $piece;
            let position = (!piece.ends.is_empty()).then(|| {
                next_seq += 1;
                ends_by_seq.insert(next_seq, std::mem::take(&mut piece.ends));
                next_seq
            });
            let n = piece.events.len();
            let bytes: usize = piece.events.iter().map(ChangeEvent::approx_bytes).sum();
            let acker = tracker.register_sized(position, n, bytes);
            if n == 0 {
                acker.ack();
            } else {
                if !sent_any {
                    piece.events[0].source.snapshot = SnapshotMarker::First;
                    sent_any = true;
                }
                ::metrics::counter!(metrics::SNAPSHOT_ROWS, "pipeline" => job.pipeline.to_string()).increment(n as u64);
                metrics::events(job.pipeline, &piece.events[0].table.qualified_name(), "r", n as u64);
                status.update(|s| s.events_total += n as u64);
                if tx.send((piece.events, acker)).await.is_err() {
                    return Ok(Outcome::Cancelled);
                }
            }
        }};
    }

    let outcome = loop {
        if workers_done && tracker.in_flight_batches() == 0 {
            break Outcome::Complete;
        }
        let room = (tracker.in_flight_events() < job.max_in_flight_events
            && tracker.in_flight_bytes() < job.max_in_flight_bytes)
            || tracker.in_flight_events() == 0;
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break Outcome::Cancelled,
            acked = tracker.next() => match acked {
                Ok(Some(seq)) => {
                    progress.tables_done += apply_acknowledged(state, &names, &mut ends_by_seq, seq);
                    dirty = true;
                    if last_save.elapsed() >= Duration::from_millis(500) {
                        state.save(path)?;
                        last_save = Instant::now();
                        dirty = false;
                    }
                }
                Ok(None) => {}
                Err(source) => return Err(SnapshotError::Delivery { lsn: job.position, source }),
            },
            _ = tick.tick() => {
                if dirty {
                    state.save(path)?;
                    last_save = Instant::now();
                    dirty = false;
                }
                let log = last_log.elapsed() >= Duration::from_secs(5);
                if log { last_log = Instant::now(); }
                progress.report(job.pipeline, status, "running", log);
            }
            msg = out_rx.recv(), if room && !workers_done => match msg {
                Some(Ok(mut piece)) => {
                    progress.rows_read += piece.events.len() as u64;
                    if piece.events.is_empty() {
                        // Nothing to send: its chunk ends ride on the piece
                        // held back, or are recorded at once.
                        match held.as_mut() {
                            Some(h) => h.ends.append(&mut piece.ends),
                            None => release!(piece),
                        }
                    } else if let Some(prev) = held.replace(piece) {
                        release!(prev);
                    }
                }
                Some(Err(e)) => return Err(e),
                None => {
                    workers_done = true;
                    // The very last record of the snapshot says so.
                    if let Some(mut last) = held.take() {
                        let only = !sent_any;
                        if let Some(e) = last.events.last_mut() {
                            e.source.snapshot = SnapshotMarker::Last;
                        }
                        if only && last.events.len() > 1 {
                            last.events[0].source.snapshot = SnapshotMarker::First;
                        }
                        sent_any = true;
                        release!(last);
                    }
                }
            },
        }
    };
    tasks.abort_all();

    if outcome == Outcome::Cancelled {
        // Let what is in flight be acknowledged, so a restart repeats less.
        let deadline = tokio::time::Instant::now() + job.shutdown_timeout;
        while tracker.in_flight_batches() > 0 {
            match tokio::time::timeout_at(deadline, tracker.next()).await {
                Ok(Ok(Some(seq))) => {
                    apply_acknowledged(state, &names, &mut ends_by_seq, seq);
                }
                Ok(Ok(None)) => {}
                _ => break,
            }
        }
        state.save(path)?;
        progress.report(job.pipeline, status, "interrupted", true);
        return Ok(Outcome::Cancelled);
    }
    for n in &names {
        state.tables.entry(n.clone()).or_default().done = true;
    }
    state.done = true;
    state.save(path)?;
    progress.tables_done = progress.tables;
    progress.report(job.pipeline, status, "done", true);
    Ok(Outcome::Complete)
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
