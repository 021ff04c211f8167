//! Incremental snapshots while streaming: the watermark algorithm of
//! Netflix's DBLog paper (and Debezium's incremental snapshots), so that a
//! table's existing rows can be read at any time (a table added to a
//! running pipeline, a sink rebuilt from scratch) without stopping the
//! stream and without a consistent-point snapshot.
//!
//! # Signals
//!
//! A snapshot is asked for with a logical decoding message
//! (`pg_logical_emit_message(true, 'walcast.signal', '{"type":
//! "execute-snapshot", "pipeline": "...", "tables": [...]}')`, what
//! `walcast snapshot` sends). It travels through the replication stream, so
//! a running daemon needs no other channel, and it is transactional: a
//! signal in a rolled-back transaction never arrives. Every slot of the
//! database sees it; a pipeline acts on signals naming it (or naming no
//! pipeline) and on tables it captures.
//!
//! # One chunk
//!
//! Tables are read one after the other, in chunks by primary key (`WHERE
//! key > last ORDER BY key LIMIT n`), on a SQL session of their own, so
//! that the replication loop keeps streaming while the query runs. For each
//! chunk:
//!
//! 1. the loop opens a *window* on the table: from then on, the key of
//!    every streamed change to that table is remembered;
//! 2. the reader writes a low watermark (`pg_logical_emit_message(false,
//!    'walcast.watermark', ...)`), reads the chunk, hands the rows to the
//!    loop, and writes a high watermark;
//! 3. when the loop reads the high watermark in the stream, it drops from
//!    the chunk every row whose key changed in the window (the streamed
//!    change is newer, or as new, and it was already emitted) and emits the
//!    rest as op `r` events with `source.snapshot = "incremental"`, then
//!    closes the window.
//!
//! Why this is correct: a change the chunk query did not see committed
//! after its snapshot was taken, so the stream carries it after the window
//! opened. If it arrives before the high watermark, the row is dropped from
//! the chunk and the streamed change stands; if after, it follows the row
//! in the stream. Either way, applying events in stream order ends with the
//! table's current rows, and the memory held is one chunk plus the keys
//! changed while it was read.
//!
//! The window opens when the loop *asks* for the chunk, before the low
//! watermark is written: every transaction the loop decodes after that
//! point is tracked, including one whose commit record precedes the low
//! watermark in the WAL but which was not yet visible to the chunk's
//! snapshot (Postgres makes a commit visible a moment after writing its
//! record). The low watermark then only confirms, in the stream, that the
//! reader started.
//!
//! One case stays open, as in DBLog and Debezium: a transaction the loop
//! decoded *before* asking for the chunk but still invisible when the
//! chunk's snapshot was taken. Logical decoding sends a commit once its
//! record is flushed, and the committing backend becomes visible a little
//! later (after waiting for synchronous standbys, if any). With a lagging
//! synchronous standby such a row could be read older than its change
//! already delivered; without synchronous replication the backend would
//! have to stall between flushing its commit and leaving the proc array
//! for longer than the loop takes to ask for a chunk and the reader to
//! write a watermark and start its query.
//!
//! Watermarks are non-transactional messages: they are never rolled back,
//! and appear in the stream at the point they were written, between
//! transactions. The walsender sends WAL only once it is flushed, and a
//! non-transactional message alone does not flush: it would wait for the
//! WAL writer (`wal_writer_delay`, 200 ms by default), which was most of
//! each chunk's time. So the high watermark is written in a statement that
//! also takes a transaction id (`pg_current_xact_id()`): its commit, with
//! `synchronous_commit = local` on the reader's session, flushes the WAL
//! up to and past the watermark at once. That transaction changes nothing
//! (pgoutput sends it as an empty transaction, or not at all).
//!
//! # Reading ahead
//!
//! The next chunk of the same table is asked for as soon as the current
//! one's rows reached the loop, before its high watermark comes back
//! through the stream: its query runs while the watermark makes its round
//! trip. That opens a second window while the first is still open, and
//! each is exactly the window of the argument above: it opened before its
//! own low watermark and query, it tracks every change streamed after
//! that, and it closes at its own high watermark. Their key ranges do not
//! overlap (the second starts after the first's last key), and the reader
//! writes the first's high watermark before the second's low one, so the
//! chunks go out in order. At most two chunks are held (the second is only
//! asked for when the first did not end the table); a table the reader
//! refuses in the second window is dropped once the first went out.
//!
//! # Chunk size
//!
//! A chunk holds at most `snapshot_chunk_rows` rows, and at most a quarter
//! of `max_in_flight_bytes` of row values: a table's first chunk reads 100
//! rows, and each next one as many rows of the width seen so far as fit,
//! so that 300 kB TOASTed rows make small chunks and narrow rows full
//! ones.
//!
//! # Checkpoint
//!
//! The `r` events carry the high watermark's LSN as `source.lsn` and
//! `commit_lsn` (their version: older than any later streamed change, newer
//! than any earlier one) and are registered with the LSN checkpoint at that
//! position, after every event streamed before it, so the slot is confirmed
//! past the high watermark only once the sinks acknowledged them.
//!
//! # Progress
//!
//! Which tables remain and the last key of each acknowledged chunk are kept
//! in `state_dir/<pipeline>.incremental.json`, written once the sinks
//! acknowledged the chunk, so a restarted daemon resumes with the next
//! chunk (a window interrupted by a crash is read again).

use std::collections::{HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_postgres::Client;
use walcast_sdk::{
    ChangeEvent, Lsn, Op, SnapshotMarker, SourceInfo, TableName, TableSchema, Value,
};

use crate::pgoutput::LogicalMessage;
use crate::replication::connection::ConnectParams;
use walcast_sdk::status::StatusHandle;
use walcast_sdk::telemetry as metrics;

use super::assemble::Assembler;
use super::catalog::{self, pg_error_text, Catalog, CatalogError};
use super::snapshot::{copy_fields, row_values, CopyLines, SnapshotError, TableJob};

/// Prefix of the logical messages that ask for a snapshot.
pub const SIGNAL_PREFIX: &str = "walcast.signal";
/// Prefix of the chunk watermarks.
pub const WATERMARK_PREFIX: &str = "walcast.watermark";

#[derive(Debug, thiserror::Error)]
pub enum IncrementalError {
    #[error("incremental snapshot state file {path}: {source}")]
    StateIo {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("incremental snapshot state file {path} is not valid JSON state ({source}); remove it and signal the snapshot again")]
    StateParse {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("incremental snapshot: {0}")]
    Catalog(#[from] CatalogError),
    #[error("incremental snapshot of {table}: {what}: {}", pg_error_text(source))]
    Query {
        table: String,
        what: &'static str,
        source: tokio_postgres::Error,
    },
    #[error("incremental snapshot: {0}")]
    Read(#[from] SnapshotError),
    #[error("incremental snapshot: the chunk reader stopped")]
    ReaderGone,
    #[error("sending the snapshot signal: {}", pg_error_text(.0))]
    Signal(tokio_postgres::Error),
}

impl IncrementalError {
    /// The connection went away: the session restarts and the snapshot
    /// resumes from its last acknowledged chunk.
    pub fn is_transient(&self) -> bool {
        match self {
            IncrementalError::Catalog(e) => e.is_transient(),
            IncrementalError::Read(e) => e.is_transient(),
            IncrementalError::Query { source, .. } | IncrementalError::Signal(source) => {
                super::catalog::transient_sql(source)
            }
            IncrementalError::ReaderGone => true,
            _ => false,
        }
    }
}

// ---------------------------------------------------------------------------
// Signals.

/// What a signal message holds (JSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Signal {
    /// `execute-snapshot` (read these tables) or `stop-snapshot` (forget
    /// every queued table), Debezium's names.
    #[serde(rename = "type")]
    pub kind: String,
    /// The pipeline meant; none means every pipeline capturing the tables.
    #[serde(default)]
    pub pipeline: Option<String>,
    /// `schema.table` names (Debezium's `data-collections` is accepted).
    #[serde(default, alias = "data-collections")]
    pub tables: Vec<String>,
}

/// Writes a signal into the WAL over an ordinary SQL session; returns its
/// LSN. Transactional, so it is decoded only once committed.
pub async fn send_signal(client: &Client, signal: &Signal) -> Result<Lsn, IncrementalError> {
    let body = serde_json::to_string(signal).expect("serializable");
    let row = client
        .query_one(
            "SELECT pg_logical_emit_message(true, $1, $2::text)::text",
            &[&SIGNAL_PREFIX, &body],
        )
        .await
        .map_err(IncrementalError::Signal)?;
    Ok(row.get::<_, String>(0).parse().unwrap_or_default())
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Watermark {
    pipeline: String,
    /// This process's session, so that watermarks of another daemon or of
    /// an earlier session are ignored.
    run: String,
    chunk: u64,
    /// `low` or `high`.
    kind: String,
}

// ---------------------------------------------------------------------------
// Durable progress.

/// One table still to read.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PendingTable {
    /// `schema.table`, for display.
    pub name: String,
    pub schema: String,
    pub table: String,
    /// Rows acknowledged so far.
    pub rows: u64,
    /// Key (text forms, key-index order) of the last acknowledged row.
    pub last_key: Option<Vec<String>>,
}

/// `<state_dir>/<pipeline>.incremental.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IncrementalState {
    pub format: u32,
    pub pipeline: String,
    pub slot: String,
    /// Tables in the order they are read; the first is in progress.
    pub tables: Vec<PendingTable>,
}

impl IncrementalState {
    pub fn load(path: &Path) -> Result<Option<Self>, IncrementalError> {
        let Some(bytes) =
            super::snapshot::read_if_exists(path).map_err(|source| IncrementalError::StateIo {
                path: path.into(),
                source,
            })?
        else {
            return Ok(None);
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|source| IncrementalError::StateParse {
                path: path.into(),
                source,
            })
    }

    /// Atomic, as the initial snapshot's state (the same writer).
    pub fn save(&self, path: &Path) -> Result<(), IncrementalError> {
        super::snapshot::write_atomically(
            path,
            &serde_json::to_vec_pretty(self).expect("serializable"),
        )
        .map_err(|source| IncrementalError::StateIo {
            path: path.into(),
            source,
        })
    }
}

/// What a chunk adds to the durable state once its events are delivered.
#[derive(Debug, Clone)]
struct ChunkDone {
    /// Batches with a lower sequence must be delivered first.
    seq_below: u64,
    table: String,
    rows: u64,
    last_key: Option<Vec<String>>,
    table_done: bool,
}

// ---------------------------------------------------------------------------
// The chunk reader (its own SQL session and task).

struct ChunkRequest {
    chunk: u64,
    /// `schema.table`, for messages.
    table: String,
    schema: String,
    name: String,
    after: Option<Vec<String>>,
}

/// Rows of a table's first chunk when nothing tells how wide they are.
const PROBE_ROWS: usize = 100;

/// A chunk read between its watermarks.
struct ChunkRows {
    chunk: u64,
    table: Arc<TableSchema>,
    rows: Vec<Vec<Value>>,
    /// Text form of the last row's key, to resume after.
    last_key: Option<Vec<String>>,
    /// Fewer rows than asked: the table is done.
    done: bool,
    /// `pg_class.reltuples`, on a table's first chunk.
    estimate: Option<u64>,
}

/// How many rows the next chunk of a table may hold: `chunk_bytes` of rows
/// of the width seen so far (the chunk is held in memory from its read to
/// its high watermark), never more than `snapshot_chunk_rows`.
#[derive(Debug, Clone, Copy, PartialEq)]
struct ChunkSizer {
    max_rows: usize,
    chunk_bytes: usize,
}

impl ChunkSizer {
    /// Rows for a chunk of rows `width` bytes wide in memory (`None`: not
    /// known yet).
    fn rows(&self, width: Option<usize>) -> usize {
        match width {
            Some(w) => (self.chunk_bytes / w.max(1)).clamp(1, self.max_rows.max(1)),
            None => self.max_rows.clamp(1, PROBE_ROWS),
        }
    }
}

enum ChunkOutcome {
    Rows(ChunkRows),
    /// The table cannot be read incrementally (gone, no key, not in the
    /// publication); it is dropped from the queue with this reason.
    Skip {
        chunk: u64,
        reason: String,
    },
}

struct Reader {
    /// The reader's one SQL session (watermarks, catalog, COPY).
    catalog: Catalog,
    pipeline: String,
    run: String,
    publication: String,
    sizer: ChunkSizer,
    /// Tables whose row estimate this session already reported.
    estimated: HashSet<String>,
    /// The table last read and the width of its rows in memory (bytes per
    /// row of its last chunk), which sizes its next chunk.
    width: Option<(String, usize)>,
}

impl Reader {
    async fn watermark(&self, table: &str, chunk: u64, kind: &str) -> Result<(), IncrementalError> {
        let body = serde_json::to_string(&Watermark {
            pipeline: self.pipeline.clone(),
            run: self.run.clone(),
            chunk,
            kind: kind.into(),
        })
        .expect("serializable");
        // The high watermark is what the loop waits for: written with a
        // transaction id, so that its commit flushes the WAL at once (see
        // the module doc), instead of waiting for the WAL writer.
        let sql = if kind == "high" {
            "SELECT pg_logical_emit_message(false, $1, $2::text), pg_current_xact_id()"
        } else {
            "SELECT pg_logical_emit_message(false, $1, $2::text)"
        };
        self.catalog
            .client()
            .execute(sql, &[&WATERMARK_PREFIX, &body])
            .await
            .map_err(|source| IncrementalError::Query {
                table: table.into(),
                what: "writing a watermark",
                source,
            })?;
        Ok(())
    }

    async fn run(
        mut self,
        mut requests: mpsc::Receiver<ChunkRequest>,
        out: mpsc::Sender<Result<ChunkOutcome, IncrementalError>>,
    ) {
        while let Some(req) = requests.recv().await {
            let chunk = req.chunk;
            let table = req.table.clone();
            let result = match self.read(req).await {
                // A definite error (a privilege, a type walcast cannot
                // read) concerns this table only: skip it, keep streaming.
                Err(e) if !e.is_transient() => Ok(ChunkOutcome::Skip {
                    chunk,
                    reason: e.to_string(),
                }),
                other => other,
            };
            let ok = matches!(result, Ok(ChunkOutcome::Rows(_)));
            let failed = result.is_err();
            // The rows are with the loop before the high watermark is in
            // the WAL, so the loop has them when it reads the watermark.
            if out.send(result).await.is_err() || failed {
                return;
            }
            if ok {
                if let Err(e) = self.watermark(&table, chunk, "high").await {
                    let _ = out.send(Err(e)).await;
                    return;
                }
            }
        }
    }

    async fn read(&mut self, req: ChunkRequest) -> Result<ChunkOutcome, IncrementalError> {
        let skip = |reason: String| {
            Ok(ChunkOutcome::Skip {
                chunk: req.chunk,
                reason,
            })
        };
        let (schema, name) = (req.schema.clone(), req.name.clone());
        let qerr = |what| {
            let table = req.table.clone();
            move |source| IncrementalError::Query {
                table,
                what,
                source,
            }
        };
        let published = self
            .catalog
            .client()
            .query_opt(
                "SELECT 1 FROM pg_publication_tables WHERE pubname = $1 AND schemaname = $2 AND tablename = $3",
                &[&self.publication, &schema, &name],
            )
            .await
            .map_err(qerr("publication membership"))?
            .is_some();
        if !published {
            return skip(format!(
                "it is not in publication {}, so its changes are not streamed; add it to the pipeline's `tables` and restart walcast (which alters the publication), then signal the snapshot again",
                self.publication
            ));
        }
        let described = match self
            .catalog
            .table_schema_by_name(&TableName::new(schema.clone(), name.clone()))
            .await
        {
            Ok(d) => d,
            Err(CatalogError::Missing { .. }) => return skip("the table does not exist".into()),
            Err(e) => return Err(e.into()),
        };
        if described.key_order.is_empty() {
            return skip("it has no primary key (or replica identity index) to read it by; incremental snapshots page by key".into());
        }
        let estimate = if self.estimated.insert(req.table.clone()) {
            let reltuples: f64 = self
                .catalog
                .client()
                .query_one(
                    "SELECT greatest(reltuples, 0)::float8 FROM pg_class WHERE oid = $1",
                    &[&described.schema.relation_id],
                )
                .await
                .map_err(qerr("row estimate"))?
                .get(0);
            Some(reltuples as u64)
        } else {
            None
        };
        let job = TableJob {
            index: 0,
            table: Arc::clone(&described.schema),
            key_order: described.key_order,
            type_names: described.type_names,
            resume_after: None,
            row_filter: described.row_filter,
        };
        let width = self
            .width
            .as_ref()
            .filter(|(t, _)| *t == req.table)
            .map(|(_, w)| *w);
        let limit = self.sizer.rows(width);
        let shown = req
            .after
            .as_ref()
            .map(|k| format!("after key ({})", k.join(", ")))
            .unwrap_or_else(|| "from the start".into());
        let sql = job.sql(req.after.as_deref(), limit);

        self.watermark(&req.table, req.chunk, "low").await?;
        let read_err = |source| {
            IncrementalError::Read(SnapshotError::Query {
                table: req.table.clone(),
                chunk: shown.clone(),
                source,
            })
        };
        let stream = self
            .catalog
            .client()
            .copy_out(sql.as_str())
            .await
            .map_err(read_err)?;
        futures::pin_mut!(stream);
        let mut lines = CopyLines::default();
        let mut rows = Vec::with_capacity(limit.min(16_384));
        let mut bytes = 0usize;
        let mut last_key = None;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(read_err)?;
            lines.feed(&chunk, |line| {
                let fields = copy_fields(line).map_err(|e| SnapshotError::Copy {
                    table: req.table.clone(),
                    chunk: shown.clone(),
                    reason: e.to_string(),
                })?;
                let row = row_values(&job, &fields, &shown)?;
                bytes += std::mem::size_of::<ChangeEvent>()
                    + row.iter().map(Value::approx_bytes).sum::<usize>();
                rows.push(row);
                last_key = Some(
                    job.key_order
                        .iter()
                        .map(|i| fields[*i].as_deref().unwrap_or_default().to_string())
                        .collect::<Vec<String>>(),
                );
                Ok::<_, SnapshotError>(())
            })?;
        }
        if !lines.rest.is_empty() {
            return Err(SnapshotError::Copy {
                table: req.table.clone(),
                chunk: shown.clone(),
                reason: "COPY output ends inside a row".into(),
            }
            .into());
        }
        if !rows.is_empty() {
            self.width = Some((req.table.clone(), bytes / rows.len()));
        }
        Ok(ChunkOutcome::Rows(ChunkRows {
            chunk: req.chunk,
            done: rows.len() < limit,
            table: job.table,
            rows,
            last_key: last_key.or(req.after),
            estimate,
        }))
    }
}

// ---------------------------------------------------------------------------
// The loop's side.

/// The key of a row as a comparable string (the same values give the same
/// string whether they came from COPY or from pgoutput: both convert the
/// type's text output).
fn key_string(table: &TableSchema, row: &[Value]) -> String {
    let mut out = String::new();
    for (c, v) in table.columns.iter().zip(row) {
        if c.key {
            out.push_str(&format!("{v:?}\u{1f}"));
        }
    }
    out
}

/// An open chunk: from the loop's request to the high watermark.
struct Window {
    chunk: u64,
    schema: String,
    name: String,
    low_seen: bool,
    /// Keys of streamed changes to the table since the window opened.
    changed: HashSet<String>,
    /// A truncate of the table arrived: every row read is stale.
    truncated: bool,
    rows: Option<ChunkRows>,
    /// The reader refused the table (see [`ChunkOutcome::Skip`]); acted on
    /// once the window is the oldest.
    skipped: Option<String>,
}

/// Windows open at once: the chunk waiting for its high watermark, and the
/// next chunk of the same table, read meanwhile (see the module doc).
const MAX_WINDOWS: usize = 2;

/// Settings of the incremental snapshots of one pipeline.
#[derive(Debug, Clone)]
pub struct IncrementalSettings {
    pub pipeline: String,
    pub slot: String,
    pub publication: String,
    /// The most rows a chunk holds (`snapshot_chunk_rows`).
    pub chunk_rows: usize,
    /// The memory a chunk's rows may take (a quarter of
    /// `max_in_flight_bytes`): chunks hold fewer rows when rows are wide.
    pub chunk_bytes: usize,
    pub batch_max_events: usize,
    /// `<state_dir>/<pipeline>.incremental.json`.
    pub state_path: PathBuf,
    /// `source.name` and `source.db` of events.
    pub name: String,
    pub database: String,
    /// Tables the pipeline captures (`None`: every table of the
    /// publication, when whole schemas are captured).
    pub tables: Option<HashSet<String>>,
}

/// Rows, rate and ETA for /status and the log.
struct Progress {
    started: Instant,
    rows: u64,
    estimate: u64,
    table_estimate: u64,
    table_rows: u64,
    tables_done: usize,
    last_log: Instant,
}

/// Events to hand to the sinks at a high watermark.
pub struct ChunkEvents {
    /// Batches of at most `batch_max_events` (possibly one empty batch: the
    /// chunk's progress still needs a place in the acknowledgement order).
    pub batches: Vec<Vec<ChangeEvent>>,
    /// The high watermark's LSN: the position of the last batch.
    pub position: Lsn,
}

/// The incremental snapshots of one replication session.
pub struct Incremental {
    s: IncrementalSettings,
    run: String,
    connect: ConnectParams,
    /// What the state file says (acknowledged).
    durable: IncrementalState,
    /// Tables still to read and where the next chunk starts (emitted, not
    /// necessarily acknowledged).
    queue: VecDeque<PendingTable>,
    next_chunk: u64,
    /// Open windows, oldest first, all on the queue's first table.
    windows: VecDeque<Window>,
    requests: Option<mpsc::Sender<ChunkRequest>>,
    results: Option<mpsc::Receiver<Result<ChunkOutcome, IncrementalError>>>,
    awaiting_delivery: VecDeque<ChunkDone>,
    progress: Option<Progress>,
}

impl Incremental {
    /// Loads what an earlier session left unfinished.
    pub fn new(s: IncrementalSettings, connect: ConnectParams) -> Result<Self, IncrementalError> {
        let durable = match IncrementalState::load(&s.state_path)? {
            Some(st) if st.slot == s.slot => st,
            Some(_) | None => IncrementalState {
                format: 1,
                pipeline: s.pipeline.clone(),
                slot: s.slot.clone(),
                tables: Vec::new(),
            },
        };
        let queue: VecDeque<PendingTable> = durable.tables.iter().cloned().collect();
        if !queue.is_empty() {
            tracing::info!(
                pipeline = %s.pipeline,
                tables = ?queue.iter().map(|t| &t.name).collect::<Vec<_>>(),
                "incremental snapshot resuming from the last acknowledged chunk"
            );
        }
        let run = format!("{:016x}", rand::random::<u64>());
        let mut me = Incremental {
            s,
            run,
            connect,
            durable,
            queue,
            next_chunk: 0,
            windows: VecDeque::new(),
            requests: None,
            results: None,
            awaiting_delivery: VecDeque::new(),
            progress: None,
        };
        if !me.queue.is_empty() {
            me.start_progress();
        }
        Ok(me)
    }

    fn start_progress(&mut self) {
        if self.progress.is_none() {
            self.progress = Some(Progress {
                started: Instant::now(),
                rows: 0,
                estimate: 0,
                table_estimate: 0,
                table_rows: 0,
                tables_done: 0,
                last_log: Instant::now(),
            });
        }
    }

    fn captured(&self, name: &str) -> bool {
        self.s.tables.as_ref().is_none_or(|t| t.contains(name))
    }

    /// A logical message from the stream. Returns the chunk's events when
    /// it is this session's high watermark.
    pub async fn on_message(
        &mut self,
        m: &LogicalMessage,
        asm: &Assembler,
        status: &StatusHandle,
    ) -> Result<Option<ChunkEvents>, IncrementalError> {
        if m.prefix == SIGNAL_PREFIX {
            self.on_signal(m);
            self.report(status, true);
            return Ok(None);
        }
        if m.prefix != WATERMARK_PREFIX {
            return Ok(None);
        }
        let Ok(w) = serde_json::from_slice::<Watermark>(&m.content) else {
            return Ok(None);
        };
        if w.pipeline != self.s.pipeline || w.run != self.run {
            return Ok(None);
        }
        if w.kind == "low" {
            if let Some(win) = self.windows.iter_mut().find(|win| win.chunk == w.chunk) {
                win.low_seen = true;
            }
            return Ok(None);
        }
        // A high watermark: the reader writes them in order, each after
        // sending its chunk's rows, so it closes the oldest window.
        if self.windows.front().is_none_or(|win| win.chunk != w.chunk) {
            return Ok(None);
        }
        while self
            .windows
            .front()
            .is_some_and(|win| win.chunk == w.chunk && win.rows.is_none() && win.skipped.is_none())
        {
            let outcome = match self.results.as_mut() {
                Some(rx) => rx.recv().await.ok_or(IncrementalError::ReaderGone)?,
                None => return Err(IncrementalError::ReaderGone),
            };
            self.on_result(outcome)?;
        }
        if self.windows.front().is_none_or(|win| win.chunk != w.chunk) {
            return Ok(None);
        }
        let Some(win) = self.windows.pop_front() else {
            return Ok(None);
        };
        let Some(chunk) = win.rows else {
            return Ok(None);
        };
        let events = self.emit(
            win.changed,
            win.truncated,
            win.low_seen,
            chunk,
            m.lsn,
            asm,
            status,
        );
        self.settle_skipped();
        Ok(Some(events))
    }

    fn on_signal(&mut self, m: &LogicalMessage) {
        let signal: Signal = match serde_json::from_slice(&m.content) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(pipeline = %self.s.pipeline, lsn = %m.lsn, error = %e, "ignoring a malformed walcast.signal message");
                return;
            }
        };
        if signal
            .pipeline
            .as_ref()
            .is_some_and(|p| *p != self.s.pipeline)
        {
            return;
        }
        match signal.kind.as_str() {
            "execute-snapshot" => {
                let mut added = Vec::new();
                for t in &signal.tables {
                    let Some(TableName {
                        schema,
                        name: table,
                    }) = TableName::parse(t)
                    else {
                        tracing::error!(pipeline = %self.s.pipeline, table = %t, "snapshot signal: not a schema.table name; ignored");
                        continue;
                    };
                    let name = TableName::new(&schema, &table).to_string();
                    if !self.captured(&name) {
                        if signal.pipeline.is_some() {
                            tracing::error!(pipeline = %self.s.pipeline, table = %name, "snapshot signal: this pipeline does not capture the table (add it to `tables` and restart); ignored");
                        }
                        continue;
                    }
                    if self.queue.iter().any(|q| q.name == name) {
                        tracing::info!(pipeline = %self.s.pipeline, table = %name, "snapshot signal: table already queued");
                        continue;
                    }
                    let pending = PendingTable {
                        name: name.clone(),
                        schema,
                        table,
                        rows: 0,
                        last_key: None,
                    };
                    self.queue.push_back(pending.clone());
                    self.durable.tables.push(pending);
                    added.push(name);
                }
                if added.is_empty() {
                    return;
                }
                // Saved now, before the signal's transaction can be
                // confirmed to Postgres: a crash cannot lose the request.
                if let Err(e) = self.durable.save(&self.s.state_path) {
                    tracing::error!(pipeline = %self.s.pipeline, error = %e, "cannot save the incremental snapshot queue; it holds until the process stops");
                }
                self.start_progress();
                tracing::info!(pipeline = %self.s.pipeline, lsn = %m.lsn, tables = ?added, "incremental snapshot requested");
            }
            "stop-snapshot" => {
                tracing::info!(pipeline = %self.s.pipeline, lsn = %m.lsn, tables = ?self.queue.iter().map(|t| &t.name).collect::<Vec<_>>(), "incremental snapshot stopped by signal");
                self.queue.clear();
                self.durable.tables.clear();
                self.windows.clear();
                self.progress = None;
                if let Err(e) = self.durable.save(&self.s.state_path) {
                    tracing::error!(pipeline = %self.s.pipeline, error = %e, "cannot save the incremental snapshot queue");
                }
            }
            other => {
                tracing::warn!(pipeline = %self.s.pipeline, kind = %other, "ignoring a walcast.signal of unknown type")
            }
        }
    }

    /// A change event just assembled: remembered by the open windows if it
    /// changed their table.
    pub fn observe(&mut self, e: &ChangeEvent) {
        let Some(win) = self.windows.front() else {
            return;
        };
        if e.table.name != win.name || e.table.schema != win.schema {
            return;
        }
        if e.op == walcast_sdk::Op::Truncate {
            self.windows.iter_mut().for_each(|w| w.truncated = true);
            return;
        }
        if let Some(row) = e.identity_row() {
            let key = key_string(&e.table, row);
            for w in self.windows.iter_mut() {
                w.changed.insert(key.clone());
            }
        }
    }

    /// Whether a chunk's rows are awaited from the reader.
    pub fn awaiting_rows(&self) -> bool {
        self.results.is_some()
            && self
                .windows
                .iter()
                .any(|w| w.rows.is_none() && w.skipped.is_none())
    }

    /// The reader's answer (in the loop's `select!`).
    pub async fn next_result(&mut self) -> Option<Result<(), IncrementalError>> {
        let rx = self.results.as_mut()?;
        let outcome = rx.recv().await.unwrap_or(Err(IncrementalError::ReaderGone));
        Some(self.on_result(outcome))
    }

    fn on_result(
        &mut self,
        outcome: Result<ChunkOutcome, IncrementalError>,
    ) -> Result<(), IncrementalError> {
        match outcome? {
            ChunkOutcome::Rows(rows) => {
                if let Some(win) = self.windows.iter_mut().find(|w| w.chunk == rows.chunk) {
                    win.rows = Some(rows);
                }
            }
            ChunkOutcome::Skip { chunk, reason } => {
                if let Some(win) = self.windows.iter_mut().find(|w| w.chunk == chunk) {
                    win.skipped = Some(reason);
                }
                self.settle_skipped();
            }
        }
        Ok(())
    }

    /// A table the reader refused is dropped from the queue once its window
    /// is the oldest: a chunk before it, read already, still goes out at
    /// its high watermark.
    fn settle_skipped(&mut self) {
        let Some(reason) = self.windows.front().and_then(|w| w.skipped.clone()) else {
            return;
        };
        // Every open window is on that table.
        self.windows.clear();
        if let Some(t) = self.queue.pop_front() {
            tracing::error!(pipeline = %self.s.pipeline, table = %t.name, reason = %reason, "incremental snapshot of this table skipped");
            self.durable.tables.retain(|d| d.name != t.name);
            if let Err(e) = self.durable.save(&self.s.state_path) {
                tracing::error!(pipeline = %self.s.pipeline, error = %e, "cannot save the incremental snapshot queue");
            }
        }
    }

    /// Asks for the next chunk when the sinks have room: when no window is
    /// open, or, to read ahead, when the open one has its rows and more of
    /// its table is left. The window opens now (see the module doc).
    pub fn maybe_request(&mut self, room: bool) -> Result<(), IncrementalError> {
        if !room || self.windows.len() >= MAX_WINDOWS {
            return Ok(());
        }
        let Some(table) = self.queue.front().cloned() else {
            return Ok(());
        };
        let after = match self.windows.back() {
            None => table.last_key,
            Some(Window {
                rows: Some(rows),
                skipped: None,
                ..
            }) if !rows.done => rows.last_key.clone(),
            Some(_) => return Ok(()),
        };
        if self.requests.is_none() {
            self.spawn_reader();
        }
        self.next_chunk += 1;
        let req = ChunkRequest {
            chunk: self.next_chunk,
            table: table.name,
            schema: table.schema.clone(),
            name: table.table.clone(),
            after,
        };
        self.requests
            .as_ref()
            .expect("spawned")
            .try_send(req)
            .map_err(|_| IncrementalError::ReaderGone)?;
        self.windows.push_back(Window {
            chunk: self.next_chunk,
            schema: table.schema,
            name: table.table,
            low_seen: false,
            changed: HashSet::new(),
            truncated: false,
            rows: None,
            skipped: None,
        });
        Ok(())
    }

    fn spawn_reader(&mut self) {
        // Room for a request of each window and one the reader is still
        // answering after a stop-snapshot closed its window.
        let (req_tx, req_rx) = mpsc::channel(MAX_WINDOWS + 1);
        let (res_tx, res_rx) = mpsc::channel(1);
        let connect = self.connect.clone();
        let pipeline = self.s.pipeline.clone();
        let run = self.run.clone();
        let publication = self.s.publication.clone();
        let sizer = ChunkSizer {
            max_rows: self.s.chunk_rows,
            chunk_bytes: self.s.chunk_bytes,
        };
        tokio::spawn(async move {
            let connected = match catalog::connect(&connect).await {
                // A high watermark's commit flushes the WAL on this server
                // only, never waiting for synchronous standbys.
                Ok(client) => match client.batch_execute("SET synchronous_commit = local").await {
                    Ok(()) => Ok(client),
                    Err(source) => Err(IncrementalError::Query {
                        table: String::new(),
                        what: "setting synchronous_commit for the chunk reader",
                        source,
                    }),
                },
                Err(e) => Err(e.into()),
            };
            match connected {
                Ok(client) => {
                    Reader {
                        catalog: Catalog::new(client).for_publication(&publication),
                        pipeline,
                        run,
                        publication,
                        sizer,
                        estimated: HashSet::new(),
                        width: None,
                    }
                    .run(req_rx, res_tx)
                    .await
                }
                Err(e) => {
                    let _ = res_tx.send(Err(e)).await;
                }
            }
        });
        self.requests = Some(req_tx);
        self.results = Some(res_rx);
    }

    #[allow(clippy::too_many_arguments)]
    fn emit(
        &mut self,
        changed: HashSet<String>,
        truncated: bool,
        low_seen: bool,
        chunk: ChunkRows,
        position: Lsn,
        asm: &Assembler,
        status: &StatusHandle,
    ) -> ChunkEvents {
        if !low_seen {
            tracing::warn!(pipeline = %self.s.pipeline, chunk = chunk.chunk, "high watermark without its low watermark in the stream");
        }
        // Streamed events of the table carry the relation as the stream
        // last described it; snapshot events use the same description when
        // the columns agree, so both encode with one schema.
        let table = match asm.relation(chunk.table.relation_id) {
            Some(r)
                if r.columns.len() == chunk.table.columns.len()
                    && r.columns.iter().zip(&chunk.table.columns).all(|(a, b)| {
                        a.name == b.name && a.type_oid == b.type_oid && a.key == b.key
                    }) =>
            {
                r
            }
            _ => Arc::clone(&chunk.table),
        };
        let name = table.qualified_name();
        let read = chunk.rows.len() as u64;
        let us = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros() as i64)
            .unwrap_or(0);
        let mut events = Vec::with_capacity(chunk.rows.len());
        if !truncated {
            for row in chunk.rows {
                if !changed.is_empty() && changed.contains(&key_string(&table, &row)) {
                    continue;
                }
                events.push(ChangeEvent {
                    op: Op::Read,
                    table: Arc::clone(&table),
                    before: None,
                    after: Some(row),
                    source: SourceInfo {
                        name: self.s.name.clone(),
                        db: self.s.database.clone(),
                        lsn: position,
                        commit_lsn: position,
                        tx_id: None,
                        ts_ms: us.div_euclid(1000),
                        ts_us: us,
                        snapshot: SnapshotMarker::Incremental,
                    },
                    transaction: None,
                    ts_ms: us.div_euclid(1000),
                });
            }
        }
        let emitted = events.len() as u64;
        tracing::debug!(pipeline = %self.s.pipeline, table = %name, chunk = chunk.chunk, read, emitted, superseded = read - emitted, truncated, lsn = %position, "incremental snapshot chunk");
        if emitted > 0 {
            ::metrics::counter!(metrics::SNAPSHOT_ROWS, "pipeline" => self.s.pipeline.clone())
                .increment(emitted);
            metrics::events(&self.s.pipeline, &name, "r", emitted);
            status.update(|s| s.events_total += emitted);
        }
        // Where the table stands once these events are delivered.
        let done = chunk.done;
        let front = self
            .queue
            .front_mut()
            .expect("a window reads the queue's first table");
        front.rows += emitted;
        front.last_key = chunk.last_key.clone();
        self.awaiting_delivery.push_back(ChunkDone {
            seq_below: 0, // set by `registered`
            table: front.name.clone(),
            rows: emitted,
            last_key: chunk.last_key,
            table_done: done,
        });
        if let Some(p) = self.progress.as_mut() {
            p.rows += emitted;
            p.table_rows += emitted;
            if let Some(est) = chunk.estimate {
                // Rows of a resumed table acknowledged before this session
                // are not read again: they are not part of what remains.
                let est = est.saturating_sub(front.rows - emitted);
                p.table_estimate = est;
                p.estimate += est;
            }
        }
        if done {
            let t = self.queue.pop_front().expect("front");
            tracing::info!(pipeline = %self.s.pipeline, table = %t.name, rows = t.rows, "incremental snapshot of table read");
            if let Some(p) = self.progress.as_mut() {
                p.tables_done += 1;
                p.estimate = p.estimate.saturating_sub(p.table_estimate) + p.table_rows;
                p.table_estimate = 0;
                p.table_rows = 0;
            }
        }
        let mut batches: Vec<Vec<ChangeEvent>> = Vec::new();
        let max = self.s.batch_max_events.max(1);
        let mut it = events.into_iter().peekable();
        while it.peek().is_some() {
            batches.push(it.by_ref().take(max).collect());
        }
        if batches.is_empty() {
            batches.push(Vec::new());
        }
        self.report(status, done);
        ChunkEvents { batches, position }
    }

    /// The last batch of the chunk just emitted has sequence `seq`.
    pub fn registered(&mut self, seq: u64) {
        if let Some(d) = self.awaiting_delivery.back_mut() {
            d.seq_below = seq + 1;
        }
    }

    /// Records chunks whose events every sink has now acknowledged
    /// (every batch below `delivered_below`).
    pub fn on_delivered(&mut self, delivered_below: u64) -> Result<(), IncrementalError> {
        let mut changed = false;
        while self
            .awaiting_delivery
            .front()
            .is_some_and(|d| d.seq_below > 0 && d.seq_below <= delivered_below)
        {
            let d = self.awaiting_delivery.pop_front().expect("checked");
            if let Some(t) = self.durable.tables.iter_mut().find(|t| t.name == d.table) {
                t.rows += d.rows;
                t.last_key = d.last_key;
            }
            if d.table_done {
                self.durable.tables.retain(|t| t.name != d.table);
            }
            changed = true;
        }
        if changed {
            self.durable.save(&self.s.state_path)?;
        }
        Ok(())
    }

    /// Progress in /status (`progress.incremental_snapshot`) and, every
    /// 5 s or when asked, in the log.
    pub fn report(&mut self, status: &StatusHandle, force_log: bool) {
        let Some(p) = self.progress.as_mut() else {
            return;
        };
        let idle = self.queue.is_empty() && self.windows.is_empty();
        let secs = p.started.elapsed().as_secs_f64().max(0.001);
        let rate = p.rows as f64 / secs;
        // Tables not started yet count with what the ones read so far did.
        let estimate = (p.estimate.saturating_sub(p.table_estimate)
            + p.table_estimate.max(p.table_rows))
        .max(p.rows);
        let remaining = estimate.saturating_sub(p.rows);
        let eta = (!idle && rate > 0.0).then(|| (remaining as f64 / rate).round() as u64);
        let state = if idle { "done" } else { "running" };
        let value = serde_json::json!({
            "state": state,
            "table": self.queue.front().map(|t| t.name.clone()),
            "tables_remaining": self.queue.len(),
            "tables_done": p.tables_done,
            "rows": p.rows,
            "estimated_total": estimate,
            "rows_per_second": rate.round(),
            "eta_seconds": eta,
        });
        status.update(|s| {
            s.progress.insert("incremental_snapshot".into(), value);
        });
        let log = force_log || p.last_log.elapsed() >= Duration::from_secs(5);
        if log {
            p.last_log = Instant::now();
            tracing::info!(
                pipeline = %self.s.pipeline,
                table = ?self.queue.front().map(|t| &t.name),
                rows = p.rows,
                estimated_total = estimate,
                rows_per_second = rate.round(),
                eta_seconds = ?eta,
                tables_remaining = self.queue.len(),
                "incremental snapshot {state}"
            );
        }
        if idle {
            self.progress = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_and_watermarks_round_trip_as_json() {
        let s: Signal = serde_json::from_str(
            r#"{"type": "execute-snapshot", "pipeline": "orders", "tables": ["public.a", "\"odd.s\".b"]}"#,
        )
        .unwrap();
        assert_eq!(s.kind, "execute-snapshot");
        assert_eq!(s.pipeline.as_deref(), Some("orders"));
        assert_eq!(
            TableName::parse(&s.tables[1]),
            Some(TableName::new("odd.s", "b"))
        );
        let debezium: Signal = serde_json::from_str(
            r#"{"type": "execute-snapshot", "data-collections": ["public.t"]}"#,
        )
        .unwrap();
        assert_eq!(debezium.tables, vec!["public.t".to_string()]);
        let any: Signal = serde_json::from_str(r#"{"type": "stop-snapshot"}"#).unwrap();
        assert_eq!(any.pipeline, None);
        assert!(any.tables.is_empty());
    }

    #[test]
    fn keys_compare_across_sources() {
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
        let t = TableSchema {
            relation_id: 1,
            schema: "public".into(),
            name: "t".into(),
            columns: vec![col("a", true), col("v", false), col("b", true)],
            replica_identity: ReplicaIdentity::Default,
            version: 0,
        };
        let r1 = [Value::Int32(1), Value::Text("x".into()), Value::Int32(2)];
        let r2 = [Value::Int32(1), Value::Text("y".into()), Value::Int32(2)];
        let r3 = [Value::Int32(2), Value::Text("x".into()), Value::Int32(1)];
        assert_eq!(key_string(&t, &r1), key_string(&t, &r2));
        assert_ne!(key_string(&t, &r1), key_string(&t, &r3));
    }

    #[test]
    fn chunks_are_sized_by_row_width() {
        let sizer = ChunkSizer {
            max_rows: 10_000,
            chunk_bytes: 8 << 20,
        };
        assert_eq!(sizer.rows(None), PROBE_ROWS, "a table's first chunk probes");
        assert_eq!(sizer.rows(Some(500)), 10_000, "narrow rows: the row cap");
        assert_eq!(
            sizer.rows(Some(300 << 10)),
            27,
            "300 kB rows: 8 MiB of them"
        );
        assert_eq!(sizer.rows(Some(64 << 20)), 1, "at least one row");
        assert_eq!(sizer.rows(Some(0)), 10_000);
        let small = ChunkSizer {
            max_rows: 3,
            chunk_bytes: 8 << 20,
        };
        assert_eq!(small.rows(None), 3, "never more than snapshot_chunk_rows");
    }

    #[test]
    fn state_is_saved_and_loaded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.incremental.json");
        assert_eq!(IncrementalState::load(&path).unwrap(), None);
        let st = IncrementalState {
            format: 1,
            pipeline: "p".into(),
            slot: "walcast_p".into(),
            tables: vec![PendingTable {
                name: "public.t".into(),
                schema: "public".into(),
                table: "t".into(),
                rows: 10,
                last_key: Some(vec!["10".into()]),
            }],
        };
        st.save(&path).unwrap();
        assert_eq!(IncrementalState::load(&path).unwrap(), Some(st));
    }
}
