//! The capture loop: read the slot, assemble events, hand batches to the
//! sinks, confirm what they acknowledged.
//!
//! Reading and delivering are decoupled by a bounded queue and an in-flight
//! limit: when sinks fall behind (a broker outage), reading stops, memory
//! stays bounded, and the loop still answers Postgres with status updates so
//! the walsender does not time the connection out. Transient failures
//! (network, a server restart, a slot held by another process) restart the
//! session from the slot's confirmed position with exponential backoff;
//! definite ones stop the pipeline with a message that says what to do.
//!
//! Pausing (the management API, through [`StatusHandle::request_pause`])
//! uses the same mechanism as back-pressure: the loop stops pulling from
//! the replication stream and keeps everything else going. Postgres
//! blocks the walsender on the full socket, which costs nothing; the
//! standby status updates keep going out on the timer with the confirmed
//! position unchanged, so the walsender never times the connection out
//! and the slot holds its place (batches already handed to the sinks are
//! still acknowledged and confirmed, then nothing moves). Keepalives are
//! not read while paused, so the server's WAL end comes from
//! `pg_current_wal_lsn()` on the catalog connection instead, and the lag
//! keeps growing in /status and the metrics. Resuming reads on from the
//! very next message: nothing is skipped, and nothing is read twice. A
//! pause lives in memory only: a reconnect keeps it (the new session
//! starts paused), a restarted daemon streams.
//!
//! With `streaming` on, Postgres also sends transactions still in
//! progress, in blocks: those are held in [`crate::streamed`] and, at their
//! Stream Commit, replayed through the same path as a protocol 1
//! transaction (a Begin made from the commit, each change, the Commit).
//! Reading from the server waits while a replay runs, so commit order is
//! kept; the replay itself yields to acknowledgements, ticks and the
//! in-flight limits like reading does.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use walcast_sdk::ack::AckFailure;
use walcast_sdk::retry::Backoff;
use walcast_sdk::{send_to_every_sink, Acker, ChangeEvent, Lsn, Sink, TableName};

use walcast_sdk::status::{PipelineState, StatusHandle};
use walcast_sdk::telemetry as metrics;

use crate::assemble::{AssembleError, AssembleOptions, Assembler};
use crate::catalog::{self, Catalog, CatalogError};
use crate::checkpoint::LsnCheckpoint;
use crate::config::SnapshotMode;
use crate::incremental::{Incremental, IncrementalError, IncrementalSettings};
use crate::pgoutput::streaming::InStream;
use crate::pgoutput::{self, Begin, Commit, LogicalMessage, Message, StreamCommit};
use crate::replication::connection::{
    quote_ident, ConnectParams, ReplicationConnection, ReplicationError, ReplicationStream,
};
use crate::replication::ServerMessage;
use crate::schema_change::{self, SchemaHistory};
use crate::setup::{self, SetupError, Wanted};
use crate::snapshot::{self, Outcome, SnapshotError, SnapshotJob, SnapshotSettings, SnapshotState};
use crate::streamed::{Entry, Replay, Streamed, StreamedError};
use walcast_sdk::notice::{self, NoticeKind};

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("pipeline {pipeline}: {source}")]
    Replication {
        pipeline: String,
        source: ReplicationError,
    },
    #[error("pipeline {pipeline}: {source}")]
    Catalog {
        pipeline: String,
        source: CatalogError,
    },
    #[error("pipeline {pipeline}: {source}")]
    Setup {
        pipeline: String,
        source: SetupError,
    },
    #[error("pipeline {pipeline}: {source}")]
    Assemble {
        pipeline: String,
        source: AssembleError,
    },
    #[error("pipeline {pipeline}: decoding pgoutput at LSN {lsn}: {source}")]
    Decode {
        pipeline: String,
        lsn: Lsn,
        source: pgoutput::DecodeError,
    },
    #[error(
        "pipeline {pipeline}: a sink failed to deliver events after LSN {confirmed}: {source}"
    )]
    Delivery {
        pipeline: String,
        confirmed: Lsn,
        source: AckFailure,
    },
    #[error("pipeline {pipeline}: {message}")]
    Definite { pipeline: String, message: String },
    /// The walsender found the publication gone while decoding. pgoutput
    /// reads publications as of the WAL position it decodes, so every
    /// change after the drop fails, even once the publication is created
    /// again: no reconnect can help, and recreating it quietly would hide
    /// the gap. Definite.
    #[error(
        "pipeline {pipeline}: publication {publication} was dropped while walcast streamed from slot {slot} \
         ({source}). Postgres cannot decode the changes made after the drop through this slot, even once \
         the publication exists again, and walcast does not recreate it by itself. Everything up to LSN \
         {confirmed} was delivered. To go on: recreate the publication (CREATE PUBLICATION ... FOR TABLE ..., \
         or let walcast create it at start with create_publication = true), then either skip the gap with \
         SELECT pg_replication_slot_advance('{slot}', pg_current_wal_lsn()); (changes made between the drop \
         and then are not delivered) or drop the slot (walcast slots drop) so the next start snapshots the \
         tables again"
    )]
    PublicationDropped {
        pipeline: String,
        publication: String,
        slot: String,
        confirmed: Lsn,
        source: ReplicationError,
    },
    #[error("pipeline {pipeline}: {source}")]
    Snapshot {
        pipeline: String,
        source: SnapshotError,
    },
    #[error("pipeline {pipeline}: {source}")]
    Incremental {
        pipeline: String,
        source: IncrementalError,
    },
    #[error("pipeline {pipeline}: {source}")]
    Streamed {
        pipeline: String,
        source: StreamedError,
    },
}

impl CaptureError {
    pub fn is_transient(&self) -> bool {
        match self {
            CaptureError::Replication { source, .. } => source.is_transient(),
            CaptureError::Catalog { source, .. } => source.is_transient(),
            CaptureError::Setup { source, .. } => source.is_transient(),
            CaptureError::Snapshot { source, .. } => source.is_transient(),
            CaptureError::Incremental { source, .. } => source.is_transient(),
            CaptureError::Streamed { source, .. } => source.is_transient(),
            // Every sink that failed the batch said a replay may succeed
            // (an outage longer than a Kafka transaction): start over from
            // the confirmed position, the sinks rewound.
            CaptureError::Delivery { source, .. } => source.transient,
            _ => false,
        }
    }

    fn is_standby(&self) -> bool {
        matches!(
            self,
            CaptureError::Setup {
                source: SetupError::Busy(_),
                ..
            }
        ) || matches!(self, CaptureError::Replication { source, .. } if source.sqlstate() == Some("55006"))
    }
}

/// Everything one capture pipeline needs, resolved from the config.
#[derive(Debug, Clone)]
pub struct CaptureSettings {
    pub pipeline: String,
    pub connect: ConnectParams,
    pub wanted: Wanted,
    pub assemble: AssembleOptions,
    pub status_interval: Duration,
    pub max_in_flight_events: usize,
    /// Bytes of events between Postgres and the sinks before reading stops
    /// (see [`ChangeEvent::approx_bytes`]); large transactions are sliced
    /// at an eighth of it, so TOASTed rows of hundreds of kB stay bounded.
    pub max_in_flight_bytes: usize,
    pub batch_max_events: usize,
    pub shutdown_timeout: Duration,
    pub retry_max_backoff: Duration,
    pub snapshot: SnapshotSettings,
    /// `streaming`: ask for pgoutput protocol 2 with streaming of
    /// transactions in progress (see [`crate::streamed`]).
    pub streaming: bool,
    /// Where streamed transactions past the memory budget are spilled
    /// (the pipeline's state_dir).
    pub spill_dir: std::path::PathBuf,
    /// What the pipeline publishes besides row changes.
    pub notices: NoticeSettings,
}

/// Heartbeats, schema-change events and logical messages (see
/// [`walcast_sdk::notice`]). The default publishes none of them.
#[derive(Debug, Clone, Default)]
pub struct NoticeSettings {
    pub heartbeat: Option<HeartbeatSettings>,
    /// Publish an event when a captured table's columns change.
    pub schema_changes: bool,
    /// Install the DDL capture event trigger at start (see
    /// [`crate::schema_change`]).
    pub ddl_capture: bool,
    /// Logical message prefixes delivered as notices (the Kafka sinks'
    /// `outbox.message_prefix`). Other messages are read and dropped.
    pub message_prefixes: Vec<String>,
}

/// Debezium's `heartbeat.interval.ms` and `heartbeat.action.query`.
#[derive(Debug, Clone)]
pub struct HeartbeatSettings {
    pub interval: Duration,
    /// Run on a normal connection before each heartbeat, so that WAL flows
    /// through the slot when the database is otherwise idle.
    pub action_query: Option<String>,
}

/// How long a heartbeat's action query may take before the heartbeat is
/// published without it.
const ACTION_QUERY_TIMEOUT: Duration = Duration::from_secs(30);

/// Hands batches to every sink, in order, on its own task so that a slow
/// sink never stops the capture loop from answering Postgres.
///
/// A session that ended (a reconnect) leaves batches queued here whose
/// tracker is gone: they are dropped, since the next session replays them
/// from the confirmed position. The first batch of a new session rewinds
/// the sinks first ([`Sink::rewind`]), so a sink that refused batches after
/// a failure takes the replay.
async fn dispatch(
    pipeline: String,
    mut sinks: Vec<Box<dyn Sink>>,
    mut rx: mpsc::Receiver<(Vec<ChangeEvent>, Acker)>,
) -> Vec<Box<dyn Sink>> {
    let mut session = None;
    while let Some((events, acker)) = rx.recv().await {
        if acker.is_orphaned() {
            acker.ack();
            continue;
        }
        if session
            .replace(acker.tracker())
            .is_some_and(|s| s != acker.tracker())
        {
            for sink in sinks.iter_mut() {
                if let Err(e) = sink.rewind().await {
                    tracing::warn!(pipeline = %pipeline, sink = %sink.name(), error = %e, "rewinding a sink for the replay failed");
                }
            }
        }
        // A sink that refuses the batch drops its acker clone, which fails
        // the batch: the session restarts from the confirmed position.
        let events = Arc::new(events);
        // Sinks that take no notices get the batch without them.
        let rows_only = events.iter().any(notice::is_notice).then(|| {
            Arc::new(
                events
                    .iter()
                    .filter(|e| !notice::is_notice(e))
                    .cloned()
                    .collect::<Vec<_>>(),
            )
        });
        let per_sink: Vec<_> = sinks
            .iter()
            .map(|s| match &rows_only {
                Some(rows) if !s.takes_notices() => Arc::clone(rows),
                _ => Arc::clone(&events),
            })
            .collect();
        send_to_every_sink(&pipeline, &mut sinks, per_sink, &acker).await;
        acker.ack();
    }
    for sink in sinks.iter_mut() {
        if let Err(e) = sink.flush().await {
            tracing::warn!(pipeline = %pipeline, sink = %sink.name(), error = %e, "flushing a sink at shutdown failed");
        }
    }
    sinks
}

/// Runs a capture pipeline until shutdown or a definite error.
pub async fn run(
    settings: CaptureSettings,
    sinks: Vec<Box<dyn Sink>>,
    status: StatusHandle,
    shutdown: CancellationToken,
) -> Result<(), CaptureError> {
    for e in &settings.connect.endpoints {
        if let Some(w) =
            crate::replication::tls::exposure_warning(&e.host, settings.connect.sslmode)
        {
            tracing::warn!(pipeline = %settings.pipeline, "{w}");
        }
    }
    let (tx, rx) = mpsc::channel(8);
    let dispatcher = tokio::spawn(dispatch(settings.pipeline.clone(), sinks, rx));
    let mut backoff = Backoff::new(Duration::from_millis(500), settings.retry_max_backoff);
    status.update(|s| {
        s.slot = Some(settings.wanted.slot.clone());
        s.publication = Some(settings.wanted.publication.clone());
    });
    // Once this process has streamed from the slot, the slot vanishing means
    // someone dropped it: recreating it would silently skip every change
    // made since. That must stop the pipeline, never be "repaired".
    let mut slot_seen = false;
    // Table shapes outlive sessions: a reconnect must not take the first
    // description it gets for a baseline (see `schema_change`).
    let mut history = SchemaHistory::default();
    let result = loop {
        let started = Instant::now();
        match session(
            &settings,
            &tx,
            &status,
            &shutdown,
            &mut slot_seen,
            &mut history,
        )
        .await
        {
            Ok(()) => break Ok(()),
            Err(e) if e.is_transient() && !shutdown.is_cancelled() => {
                if started.elapsed() > Duration::from_secs(60) {
                    backoff.reset();
                }
                let delay = backoff.next_delay();
                if e.is_standby() {
                    status.set_state(PipelineState::Standby);
                    tracing::info!(pipeline = %settings.pipeline, error = %e, retry_in = ?delay, "standing by");
                } else {
                    status.set_state(PipelineState::Retrying);
                    tracing::warn!(pipeline = %settings.pipeline, error = %e, retry_in = ?delay, "capture interrupted; reconnecting");
                }
                status.update(|s| s.last_error = Some(e.to_string()));
                ::metrics::gauge!(metrics::STREAMING, "pipeline" => settings.pipeline.clone())
                    .set(0.0);
                ::metrics::counter!(metrics::RESTARTS, "pipeline" => settings.pipeline.clone())
                    .increment(1);
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.cancelled() => break Ok(()),
                }
            }
            Err(e) => break Err(e),
        }
    };
    ::metrics::gauge!(metrics::STREAMING, "pipeline" => settings.pipeline.clone()).set(0.0);
    drop(tx);
    let _ = tokio::time::timeout(settings.shutdown_timeout, dispatcher).await;
    match &result {
        Ok(()) => status.set_state(PipelineState::Stopped),
        Err(e) => status.update(|s| {
            s.state = PipelineState::Failed;
            s.last_error = Some(e.to_string());
        }),
    }
    result
}

/// Events waiting to be handed to the sinks. Small transactions are
/// grouped: a batch carries every transaction committed within
/// [`LINGER`] (up to `batch_max_events`), confirmed at the end of the
/// last one, so a stream of single-row transactions does not pay the
/// per-batch cost (dispatch, acknowledgement, a sink round trip) each time.
struct Outbox {
    /// Events of committed transactions, then those of the open one.
    events: Vec<ChangeEvent>,
    /// How many leading events belong to committed transactions.
    ready: usize,
    /// The end of the last committed transaction among them.
    ready_pos: Option<Lsn>,
    deadline: Option<tokio::time::Instant>,
    /// The events' [`ChangeEvent::approx_bytes`], for the limit by bytes,
    /// counted once per event as it comes in.
    bytes: usize,
    /// Those of the committed (ready) ones.
    ready_bytes: usize,
}

/// The bytes of `events` as the in-flight limit counts them.
fn batch_bytes(events: &[ChangeEvent]) -> usize {
    events.iter().map(ChangeEvent::approx_bytes).sum()
}

/// How long committed transactions may wait to be grouped into one batch.
const LINGER: Duration = Duration::from_millis(2);

impl Outbox {
    fn push(&mut self, e: ChangeEvent) {
        self.bytes += e.approx_bytes();
        self.events.push(e);
    }

    /// Every event, committed or not (a slice of a large transaction), and
    /// their bytes.
    fn take_all(&mut self) -> (Vec<ChangeEvent>, usize) {
        self.ready = 0;
        self.ready_bytes = 0;
        (
            std::mem::take(&mut self.events),
            std::mem::take(&mut self.bytes),
        )
    }

    fn commit(&mut self, end: Lsn) {
        self.ready = self.events.len();
        self.ready_bytes = self.bytes;
        self.ready_pos = Some(end);
        self.deadline
            .get_or_insert_with(|| tokio::time::Instant::now() + LINGER);
    }

    fn take_ready(&mut self) -> Option<(Vec<ChangeEvent>, Lsn, usize)> {
        let pos = self.ready_pos.take()?;
        let events: Vec<ChangeEvent> = self.events.drain(..self.ready).collect();
        let bytes = std::mem::take(&mut self.ready_bytes);
        self.bytes -= bytes;
        self.ready = 0;
        self.deadline = None;
        Some((events, pos, bytes))
    }

    /// Events of the open transaction.
    fn open_len(&self) -> usize {
        self.events.len() - self.ready
    }
}

type EventCounts =
    std::collections::HashMap<(u32, &'static str), (Arc<walcast_sdk::TableSchema>, u64)>;

/// A commit handed to the sinks, kept to measure commit-to-ack latency.
struct PendingCommit {
    end: Lsn,
    commit_micros: i64,
}

fn now_micros() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

/// Wraps a component's error with the pipeline's name, so that each call in
/// the session reads `.in_pipeline(s)?`.
trait Component {
    fn within(self, pipeline: String) -> CaptureError;
}

macro_rules! component {
    ($error:ty, $variant:ident) => {
        impl Component for $error {
            fn within(self, pipeline: String) -> CaptureError {
                CaptureError::$variant {
                    pipeline,
                    source: self,
                }
            }
        }
    };
}
component!(ReplicationError, Replication);
component!(CatalogError, Catalog);
component!(SetupError, Setup);
component!(AssembleError, Assemble);
component!(SnapshotError, Snapshot);
component!(IncrementalError, Incremental);
component!(StreamedError, Streamed);

trait InPipeline<T> {
    fn in_pipeline(self, s: &CaptureSettings) -> Result<T, CaptureError>;
}

impl<T, E: Component> InPipeline<T> for Result<T, E> {
    fn in_pipeline(self, s: &CaptureSettings) -> Result<T, CaptureError> {
        self.map_err(|e| e.within(s.pipeline.clone()))
    }
}

/// One replication session, from connecting to the end of the stream:
/// [`prepare`] decides where to start (and takes a snapshot when one is
/// due), then the [`CaptureLoop`] streams until shutdown or an error.
async fn session(
    s: &CaptureSettings,
    tx: &mpsc::Sender<(Vec<ChangeEvent>, Acker)>,
    status: &StatusHandle,
    shutdown: &CancellationToken,
    slot_seen: &mut bool,
    history: &mut SchemaHistory,
) -> Result<(), CaptureError> {
    let Some(prepared) = prepare(s, tx, status, shutdown, *slot_seen).await? else {
        return Ok(());
    };
    let mut capture = CaptureLoop::start(s, tx, status, prepared, slot_seen, history).await?;
    let result = capture.run(shutdown).await;
    capture.finish(result).await
}

/// A session ready to stream: the server checked and set up, the snapshot
/// (if one was due) delivered.
struct Prepared {
    catalog: Catalog,
    conn: ReplicationConnection,
    plan: setup::Plan,
    /// Where streaming resumes: the slot's confirmed position, or the
    /// consistent point of a slot just created.
    start: Lsn,
    /// The server's WAL position when the session began.
    server_wal: Lsn,
}

/// Where a session starts, as [`choose_start`] decides it.
struct Start {
    position: Lsn,
    /// The snapshot to take or finish before streaming.
    snapshot: Option<SnapshotState>,
    /// The snapshot exported by creating the slot, which that snapshot
    /// reads under.
    exported: Option<String>,
}

/// Checks and sets up the server (publication, slot), decides where to
/// start and takes the snapshot due. `None` when there is nothing to
/// stream: the snapshot was cancelled by shutdown, or `initial_only` is
/// done.
async fn prepare(
    s: &CaptureSettings,
    tx: &mpsc::Sender<(Vec<ChangeEvent>, Acker)>,
    status: &StatusHandle,
    shutdown: &CancellationToken,
    slot_seen: bool,
) -> Result<Option<Prepared>, CaptureError> {
    let mode = s.snapshot.mode;
    let state_path = &s.snapshot.state_path;

    status.set_state(PipelineState::Starting);
    let prior = SnapshotState::load(state_path).in_pipeline(s)?;
    if mode == SnapshotMode::InitialOnly
        && prior
            .as_ref()
            .is_some_and(|st| st.done && st.slot == s.wanted.slot)
    {
        tracing::info!(pipeline = %s.pipeline, state = %state_path.display(), "snapshot = initial_only and the snapshot is complete; nothing to do");
        return Ok(None);
    }
    let client = catalog::connect(&s.connect).await.in_pipeline(s)?;
    let plan = setup::plan(&client, &s.wanted).await.in_pipeline(s)?;
    for w in &plan.warnings {
        tracing::warn!(pipeline = %s.pipeline, "{w}");
    }
    if slot_seen {
        refuse_recreating(s, &plan, status)?;
    }
    setup::apply_publication(&client, &plan)
        .await
        .in_pipeline(s)?;
    if s.notices.ddl_capture {
        setup::install_ddl_trigger(&client).await.in_pipeline(s)?;
    }
    let mut catalog = Catalog::new(client).for_publication(&s.wanted.publication);

    let mut conn = ReplicationConnection::connect(&s.connect)
        .await
        .in_pipeline(s)?;
    let system = conn.identify_system().await.in_pipeline(s)?;
    let start = choose_start(s, &mut conn, &plan, prior, system.xlog_pos).await?;
    if let Some(mut st) = start.snapshot {
        status.set_state(PipelineState::Snapshotting);
        let job = SnapshotJob {
            pipeline: &s.pipeline,
            settings: &s.snapshot,
            connect: &s.connect,
            name: &s.assemble.name,
            database: &s.assemble.database,
            tables: &plan.tables,
            exported: start.exported,
            position: st.consistent_point().unwrap_or(start.position),
            max_in_flight_events: s.max_in_flight_events,
            max_in_flight_bytes: s.max_in_flight_bytes,
            batch_max_events: s.batch_max_events,
            shutdown_timeout: s.shutdown_timeout,
        };
        // The replication connection stays idle meanwhile: its next
        // command would end the exported snapshot.
        match snapshot::run(job, &mut st, &mut catalog, tx, status, shutdown)
            .await
            .in_pipeline(s)?
        {
            Outcome::Cancelled => return Ok(None),
            Outcome::Complete => {}
        }
    }
    if mode == SnapshotMode::InitialOnly {
        tracing::info!(pipeline = %s.pipeline, "snapshot = initial_only: snapshot complete, not streaming");
        return Ok(None);
    }
    Ok(Some(Prepared {
        catalog,
        conn,
        plan,
        start: start.position,
        server_wal: system.xlog_pos,
    }))
}

/// Once this process has streamed from the slot, the slot or the
/// publication vanishing means someone dropped it: recreating either would
/// silently skip changes. That stops the pipeline, never gets "repaired".
fn refuse_recreating(
    s: &CaptureSettings,
    plan: &setup::Plan,
    status: &StatusHandle,
) -> Result<(), CaptureError> {
    if plan.create_slot {
        let confirmed = status
            .snapshot()
            .confirmed_lsn
            .unwrap_or_else(|| "?".into());
        return Err(CaptureError::Definite {
            pipeline: s.pipeline.clone(),
            message: format!(
                "replication slot {} disappeared while walcast was streaming from it (dropped externally?). \
                 Recreating it would silently skip every change made after LSN {confirmed}, so walcast stops. \
                 Find out what dropped it (after a failover: a slot not synchronised to the promoted standby, see \
                 slot_failover); restarting walcast creates a new slot that starts from now \
                 (changes between LSN {confirmed} and then are lost to the sinks unless re-snapshotted)",
                s.wanted.slot
            ),
        });
    }
    if plan.create_publication.is_some() {
        return Err(CaptureError::Definite {
            pipeline: s.pipeline.clone(),
            message: format!(
                "publication {} disappeared while walcast was streaming (dropped externally?). walcast does not \
                 recreate it mid-stream: Postgres cannot decode the changes made after the drop through slot {} \
                 even once it exists again. Recreate it, then skip the gap with \
                 SELECT pg_replication_slot_advance('{}', pg_current_wal_lsn()); or drop the slot to snapshot again",
                s.wanted.publication, s.wanted.slot, s.wanted.slot
            ),
        });
    }
    Ok(())
}

/// Which snapshot to take, if any, and from where to stream (see the
/// snapshot module for why this order keeps every row). Creates the slot
/// when the plan says so.
async fn choose_start(
    s: &CaptureSettings,
    conn: &mut ReplicationConnection,
    plan: &setup::Plan,
    prior: Option<SnapshotState>,
    server_wal: Lsn,
) -> Result<Start, CaptureError> {
    let mode = s.snapshot.mode;
    let state_path = &s.snapshot.state_path;
    let unfinished = prior.filter(|st| !st.done && st.slot == s.wanted.slot);
    if !plan.create_slot {
        if plan.enable_failover {
            conn.enable_failover(&s.wanted.slot).await.in_pipeline(s)?;
            tracing::info!(pipeline = %s.pipeline, slot = %s.wanted.slot, "made the replication slot a failover slot (slot_failover)");
        }
        let confirmed = plan
            .slot_confirmed_lsn
            .as_deref()
            .and_then(|l| l.parse().ok())
            .unwrap_or_default();
        let snapshot = match mode {
            SnapshotMode::Never => None,
            SnapshotMode::Initial => unfinished,
            // A snapshot is asked for: finish one, or take one now.
            SnapshotMode::InitialOnly => Some(unfinished.unwrap_or_else(|| {
                let mut st = SnapshotState::new(&s.pipeline, &s.wanted.slot, &plan.tables);
                st.consistent_point = Some(server_wal.to_string());
                st
            })),
        };
        return Ok(Start {
            position: confirmed,
            snapshot,
            exported: None,
        });
    }
    let export = mode != SnapshotMode::Never;
    let mut snapshot = None;
    if export {
        // Written before the slot exists: a crash right after creating
        // it must still find a snapshot to finish. A slot created anew
        // streams from a new point, so earlier progress is void, except
        // under initial_only whose temporary slot never streams.
        let st = match unfinished {
            Some(st) if mode == SnapshotMode::InitialOnly => st,
            _ => SnapshotState::new(&s.pipeline, &s.wanted.slot, &plan.tables),
        };
        st.save(state_path).in_pipeline(s)?;
        snapshot = Some(st);
    }
    // initial_only needs the slot only for its snapshot; a temporary one
    // vanishes with the connection and pins no WAL afterwards.
    let temporary = mode == SnapshotMode::InitialOnly;
    let created = conn
        .create_slot(&s.wanted.slot, temporary, export, s.wanted.failover)
        .await
        .in_pipeline(s)?;
    tracing::info!(pipeline = %s.pipeline, slot = %s.wanted.slot, consistent_point = %created.consistent_point, temporary, "created replication slot");
    // Incremental snapshot progress belongs to the slot it was read
    // against; a new slot starts from a new point.
    if !temporary && std::fs::remove_file(&s.snapshot.incremental_state_path).is_ok() {
        tracing::info!(pipeline = %s.pipeline, state = %s.snapshot.incremental_state_path.display(), "removed the incremental snapshot state of the previous slot");
    }
    let mut exported = None;
    if let Some(st) = snapshot.as_mut() {
        if st.consistent_point.is_none() || mode == SnapshotMode::InitialOnly {
            st.consistent_point = Some(created.consistent_point.to_string());
        }
        st.save(state_path).in_pipeline(s)?;
        exported = created.snapshot_name.clone();
    }
    Ok(Start {
        position: created.consistent_point,
        snapshot,
        exported,
    })
}

/// Whether the capture loop goes on after a wake-up. `Stop` ends the
/// session without error: shutdown, or the dispatcher gone (the pipeline
/// is stopping).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flow {
    Continue,
    Stop,
}

/// The streaming half of a session: what it reads, what it holds, and one
/// method per kind of wake-up ([`CaptureLoop::run`] is the `select!`).
struct CaptureLoop<'a> {
    s: &'a CaptureSettings,
    tx: &'a mpsc::Sender<(Vec<ChangeEvent>, Acker)>,
    status: &'a StatusHandle,
    stream: ReplicationStream,
    catalog: Catalog,
    /// The captured tables as found by the plan.
    tables: Vec<TableName>,
    /// `schema.table` of the tables captured without a key.
    keyless: HashSet<String>,
    asm: Assembler,
    /// Relations of tables the pipeline does not capture, warned about once.
    skipped: HashSet<u32>,
    inc: Incremental,
    cp: LsnCheckpoint,
    outbox: Outbox,
    /// Commits handed to the sinks, for the commit-to-ack latency.
    commits: VecDeque<PendingCommit>,
    /// The server's WAL end as last reported.
    wal_end: Lsn,
    last_sent: Instant,
    /// When the server was last heard from, or reading last resumed (see
    /// [`CaptureLoop::check_liveness`]).
    last_heard: Instant,
    /// A keepalive was asked for since the server was last heard from.
    pinged: bool,
    /// The confirmed position moved since the last status update.
    dirty: bool,
    dropped_seen: HashSet<TableName>,
    /// Events per (relation, op) in the current transaction, turned into
    /// metric increments once per commit: no allocation per event.
    tx_counts: EventCounts,
    /// The management API's pause request.
    pause: tokio::sync::watch::Receiver<bool>,
    /// Reading is paused (see the module docs).
    paused: bool,
    /// Table shapes seen, for schema-change events.
    history: &'a mut SchemaHistory,
    /// Schema changes of the Relation messages just read (see
    /// [`CaptureLoop::flush_schema_changes`]).
    schema_changes: Vec<(Arc<walcast_sdk::TableSchema>, Arc<walcast_sdk::TableSchema>)>,
    /// Streamed transactions in progress (`streaming` on).
    streamed: Streamed,
    /// A streamed transaction that committed, being replayed: reading
    /// from the server waits until it is through.
    replay: Option<(Replay, StreamCommit)>,
}

impl<'a> CaptureLoop<'a> {
    /// Starts streaming from the slot and sets up what the loop holds.
    async fn start(
        s: &'a CaptureSettings,
        tx: &'a mpsc::Sender<(Vec<ChangeEvent>, Acker)>,
        status: &'a StatusHandle,
        prepared: Prepared,
        slot_seen: &mut bool,
        history: &'a mut SchemaHistory,
    ) -> Result<CaptureLoop<'a>, CaptureError> {
        let Prepared {
            catalog,
            conn,
            plan,
            start,
            server_wal,
        } = prepared;
        let mut options = vec![
            (
                "proto_version",
                if s.streaming { "2" } else { "1" }.to_string(),
            ),
            ("publication_names", quote_ident(&s.wanted.publication)),
            ("messages", "true".to_string()),
        ];
        if s.streaming {
            options.push(("streaming", "on".to_string()));
        }
        let stream = conn
            .start_replication(&s.wanted.slot, Lsn(0), &options)
            .await
            .in_pipeline(s)?;
        *slot_seen = true;
        history.rewind(start);
        let mut pause = status.pause_watch();
        let paused = *pause.borrow_and_update();
        tracing::info!(pipeline = %s.pipeline, slot = %s.wanted.slot, from = %start, server_wal = %server_wal, paused,
            in_progress_transactions = s.streaming, "streaming");
        status.set_state(if paused {
            PipelineState::Paused
        } else {
            PipelineState::Streaming
        });
        status.update(|st| st.last_error = None);
        ::metrics::gauge!(metrics::STREAMING, "pipeline" => s.pipeline.clone()).set(if paused {
            0.0
        } else {
            1.0
        });

        let keyless: HashSet<String> = s.wanted.keyless.iter().map(TableName::to_string).collect();
        // The names the stream carries for the captured tables: with
        // publish_via_partition_root = false a listed partitioned table
        // stands for its partitions.
        let mut assemble = s.assemble.clone();
        if let Some(set) = assemble.tables.as_mut() {
            set.extend(plan.tables.iter().map(TableName::to_string));
        }
        let asm = Assembler::new(assemble.clone());
        let inc = Incremental::new(
            IncrementalSettings {
                pipeline: s.pipeline.clone(),
                slot: s.wanted.slot.clone(),
                publication: s.wanted.publication.clone(),
                chunk_rows: s.snapshot.chunk_rows,
                chunk_bytes: s.max_in_flight_bytes / 4,
                batch_max_events: s.batch_max_events,
                state_path: s.snapshot.incremental_state_path.clone(),
                name: s.assemble.name.clone(),
                database: s.assemble.database.clone(),
                tables: assemble.tables.clone(),
            },
            s.connect.clone(),
        )
        .in_pipeline(s)?;
        for table in &plan.added_tables {
            tracing::warn!(pipeline = %s.pipeline, table = %table, publication = %s.wanted.publication,
                "table added to the publication: its changes stream from now on, its existing rows are not read; run `walcast snapshot {table}` to read them");
        }
        Ok(CaptureLoop {
            s,
            tx,
            status,
            stream,
            catalog,
            tables: plan.tables,
            keyless,
            asm,
            skipped: HashSet::new(),
            inc,
            cp: LsnCheckpoint::new(start),
            outbox: Outbox {
                events: Vec::new(),
                ready: 0,
                ready_pos: None,
                deadline: None,
                bytes: 0,
                ready_bytes: 0,
            },
            commits: VecDeque::new(),
            wal_end: start,
            last_sent: Instant::now(),
            last_heard: Instant::now(),
            pinged: false,
            dirty: false,
            dropped_seen: HashSet::new(),
            tx_counts: Default::default(),
            pause,
            paused,
            history,
            schema_changes: Vec::new(),
            // Half the in-flight bound: the other half is for events on
            // their way to the sinks.
            streamed: Streamed::new(&s.spill_dir, &s.pipeline, s.max_in_flight_bytes / 2),
            replay: None,
        })
    }

    /// Whether reading may go on: not paused, under the in-flight limits
    /// (streamed transactions held in memory count), the dispatcher's
    /// queue not full.
    fn can_read(&self) -> bool {
        !self.paused
            && self.cp.in_flight_events() + self.outbox.events.len() < self.s.max_in_flight_events
            && self.cp.in_flight_bytes() + self.outbox.bytes + self.streamed.memory_bytes()
                < self.s.max_in_flight_bytes
            && self.tx.capacity() > 0
    }

    /// Waits for the next wake-up and hands it to its method, until
    /// shutdown or an error. Reading stops while the in-flight limit is
    /// reached or the dispatcher's queue is full (back-pressure); the rest
    /// (acknowledgements, status updates) goes on.
    async fn run(&mut self, shutdown: &CancellationToken) -> Result<(), CaptureError> {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut slot_tick = tokio::time::interval(Duration::from_secs(10));
        let beat_every = self
            .s
            .notices
            .heartbeat
            .as_ref()
            .map_or(Duration::from_secs(3600), |h| h.interval);
        let mut heartbeat =
            tokio::time::interval_at(tokio::time::Instant::now() + beat_every, beat_every);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let can_read = self.can_read();
            let replaying = self.replay.is_some();
            let linger = self.outbox.deadline;
            self.inc.maybe_request(can_read).in_pipeline(self.s)?;
            let flow = tokio::select! {
                biased;
                _ = shutdown.cancelled() => {
                    // Hand over what is complete so it can be confirmed while draining.
                    self.flush_ready().await;
                    Flow::Stop
                }
                acked = self.cp.next_ack() => self.on_ack(acked)?,
                result = self.inc.next_result(), if self.inc.awaiting_rows() => {
                    if let Some(Err(e)) = result {
                        return Err(e.within(self.s.pipeline.clone()));
                    }
                    Flow::Continue
                }
                _ = tick.tick() => self.on_tick().await?,
                // The sender lives in the status handle this loop holds,
                // so `changed` never fails while the loop runs.
                _ = self.pause.changed() => self.on_pause_request().await?,
                _ = slot_tick.tick() => {
                    self.on_slot_tick().await;
                    Flow::Continue
                }
                _ = heartbeat.tick(), if self.s.notices.heartbeat.is_some() && self.tx.capacity() > 0 => {
                    self.on_heartbeat().await?
                }
                _ = tokio::time::sleep_until(linger.unwrap_or_else(tokio::time::Instant::now)), if linger.is_some() && self.tx.capacity() > 0 => {
                    self.flush_ready().await
                }
                _ = std::future::ready(()), if can_read && replaying => self.replay_step().await?,
                msg = self.stream.recv(), if can_read && !replaying => {
                    if msg.is_ok() {
                        self.last_heard = Instant::now();
                        self.pinged = false;
                    }
                    match msg {
                        Ok(ServerMessage::Keepalive { wal_end, reply_requested, .. }) => {
                            self.on_keepalive(wal_end, reply_requested).await?
                        }
                        Ok(ServerMessage::XLogData { start, wal_end, data, .. }) => {
                            self.on_wal(start, wal_end, data).await?
                        }
                        Err(e) => return Err(stream_error(self.s, e, self.cp.confirmed())),
                    }
                }
            };
            if flow == Flow::Stop {
                return Ok(());
            }
        }
    }

    /// Sends a registered batch to the dispatcher. (`&mut self`: a
    /// `&self` held across the await would need the loop to be `Sync`,
    /// which the replication stream is not.)
    async fn dispatch(&mut self, events: Vec<ChangeEvent>, acker: Acker) -> Flow {
        match self.tx.send((events, acker)).await {
            Ok(()) => Flow::Continue,
            Err(_) => Flow::Stop,
        }
    }

    /// Registers events with the checkpoint, to confirm `position` once
    /// every sink has them (`None`: a slice of an open transaction), and
    /// sends them.
    async fn send(&mut self, events: Vec<ChangeEvent>, position: Option<Lsn>) -> Flow {
        let bytes = batch_bytes(&events);
        self.send_sized(events, position, bytes).await
    }

    /// As [`Self::send`], with the events' bytes already counted (the
    /// outbox counts each event once, as it comes in).
    async fn send_sized(
        &mut self,
        events: Vec<ChangeEvent>,
        position: Option<Lsn>,
        bytes: usize,
    ) -> Flow {
        let acker = self.cp.register_sized(position, events.len(), bytes);
        self.dispatch(events, acker).await
    }

    /// The outbox flush: the committed transactions waiting in the outbox
    /// go to the sinks as one batch, confirmed at the end of the last.
    async fn flush_ready(&mut self) -> Flow {
        match self.outbox.take_ready() {
            Some((events, position, bytes)) => self.send_sized(events, Some(position), bytes).await,
            None => Flow::Continue,
        }
    }

    /// Sends a standby status update with the confirmed position.
    async fn send_status(&mut self) -> Result<(), CaptureError> {
        self.stream
            .send_status(self.cp.confirmed(), false)
            .await
            .in_pipeline(self.s)?;
        self.last_sent = Instant::now();
        self.dirty = false;
        Ok(())
    }

    /// A cut network path sends no reset, and an idle walsender sends
    /// nothing while walcast's status updates keep arriving, so silence
    /// alone proves nothing: as Postgres's walreceiver does, half-way
    /// through `receive_timeout` walcast asks for a keepalive, and when
    /// even that does not come the connection is taken for dead (a
    /// transient error: reconnect from the confirmed position). Only
    /// while reading: paused or back-pressured, nothing is read, so the
    /// clock starts again when reading resumes.
    async fn check_liveness(&mut self) -> Result<(), CaptureError> {
        if !self.can_read() || self.replay.is_some() {
            self.last_heard = Instant::now();
            self.pinged = false;
            return Ok(());
        }
        let silent = self.last_heard.elapsed();
        let limit = self.s.connect.receive_timeout;
        if silent >= limit {
            return Err(CaptureError::Replication {
                pipeline: self.s.pipeline.clone(),
                source: ReplicationError::Silent(limit),
            });
        }
        if silent >= limit / 2 && !self.pinged {
            self.pinged = true;
            self.stream
                .send_status(self.cp.confirmed(), true)
                .await
                .in_pipeline(self.s)?;
            self.last_sent = Instant::now();
        }
        Ok(())
    }

    /// Sinks acknowledged a batch: the confirmed position may move.
    fn on_ack(&mut self, acked: Result<bool, AckFailure>) -> Result<Flow, CaptureError> {
        match acked {
            Ok(true) => {
                self.dirty = true;
                let now = now_micros();
                while self
                    .commits
                    .front()
                    .is_some_and(|c| c.end <= self.cp.confirmed())
                {
                    let c = self.commits.pop_front().expect("checked");
                    metrics::commit_to_ack(
                        &self.s.pipeline,
                        Duration::from_micros(now.saturating_sub(c.commit_micros).max(0) as u64),
                    );
                }
            }
            Ok(false) => {}
            Err(source) => {
                return Err(CaptureError::Delivery {
                    pipeline: self.s.pipeline.clone(),
                    confirmed: self.cp.confirmed(),
                    source,
                })
            }
        }
        self.inc
            .on_delivered(self.cp.delivered_below())
            .in_pipeline(self.s)?;
        Ok(Flow::Continue)
    }

    /// The management API asked to pause or to resume: reading stops or
    /// goes on at the next wake-up (see the module docs). On pausing, the
    /// position confirmed so far goes to the server and to the status at
    /// once, so the state `paused` comes with the position the slot holds
    /// (plus what is still in flight).
    async fn on_pause_request(&mut self) -> Result<Flow, CaptureError> {
        let pause = *self.pause.borrow_and_update();
        if pause == self.paused {
            return Ok(Flow::Continue);
        }
        self.paused = pause;
        let (confirmed, in_flight) = (self.cp.confirmed(), self.cp.in_flight_events());
        if pause {
            if self.dirty {
                self.send_status().await?;
            }
            self.status
                .set_positions(confirmed, self.wal_end, in_flight);
            self.status.set_state(PipelineState::Paused);
            tracing::info!(pipeline = %self.s.pipeline, slot = %self.s.wanted.slot, %confirmed, in_flight,
                "paused: reading from the slot stopped; what is in flight is still delivered and confirmed, \
                 then the slot holds its position");
        } else {
            self.status.set_state(PipelineState::Streaming);
            tracing::info!(pipeline = %self.s.pipeline, slot = %self.s.wanted.slot, %confirmed, wal_end = %self.wal_end,
                "resumed: reading from the slot again");
        }
        ::metrics::gauge!(metrics::STREAMING, "pipeline" => self.s.pipeline.clone())
            .set(if pause { 0.0 } else { 1.0 });
        Ok(Flow::Continue)
    }

    /// While paused, the server's WAL end as the catalog connection reads
    /// it (keepalives, which carry it otherwise, are not read then). A
    /// failure leaves the last value: the replication connection is the
    /// one that decides whether the session is alive.
    async fn poll_wal_end(&mut self) {
        let query = self.catalog.client().query_one(
            "SELECT (CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_lsn() END)::text",
            &[],
        );
        if let Ok(Ok(row)) = tokio::time::timeout(Duration::from_secs(2), query).await {
            if let Some(lsn) = row
                .get::<_, Option<String>>(0)
                .and_then(|l| l.parse::<Lsn>().ok())
            {
                self.wal_end = self.wal_end.max(lsn);
            }
        }
    }

    /// Every 500 ms: whether the server is still there, a status update
    /// when the position moved (or `status_interval` passed), and the
    /// status and gauges.
    async fn on_tick(&mut self) -> Result<Flow, CaptureError> {
        self.check_liveness().await?;
        if self.dirty || self.last_sent.elapsed() >= self.s.status_interval {
            self.send_status().await?;
        }
        if self.paused {
            self.poll_wal_end().await;
        }
        let (confirmed, in_flight) = (self.cp.confirmed(), self.cp.in_flight_events());
        self.status
            .set_positions(confirmed, self.wal_end, in_flight);
        self.inc.report(self.status, false);
        let p = || self.s.pipeline.clone();
        ::metrics::gauge!(metrics::LAG_BYTES, "pipeline" => p())
            .set(self.wal_end.0.saturating_sub(confirmed.0) as f64);
        ::metrics::gauge!(metrics::IN_FLIGHT, "pipeline" => p()).set(in_flight as f64);
        ::metrics::gauge!(metrics::CONFIRMED_LSN, "pipeline" => p()).set(confirmed.0 as f64);
        Ok(Flow::Continue)
    }

    /// Every 10 s: dropped tables, and the WAL the slot retains. Bounded
    /// in time: a SQL connection that hangs must not stop the loop (the
    /// replication connection decides whether the session is alive).
    async fn on_slot_tick(&mut self) {
        let limit = self.s.connect.receive_timeout / 2;
        if tokio::time::timeout(limit, self.slot_queries())
            .await
            .is_err()
        {
            tracing::warn!(pipeline = %self.s.pipeline, timeout = ?limit, "the SQL connection did not answer the periodic slot query; skipped");
        }
    }

    async fn slot_queries(&mut self) {
        warn_dropped_tables(self.s, &self.catalog, &self.tables, &mut self.dropped_seen).await;
        if let Ok(row) = self.catalog.client().query_opt(
            "SELECT (pg_current_wal_lsn() - restart_lsn)::float8 FROM pg_replication_slots WHERE slot_name = $1",
            &[&self.s.wanted.slot],
        ).await {
            if let Some(Some(bytes)) = row.map(|r| r.get::<_, Option<f64>>(0)) {
                ::metrics::gauge!(metrics::SLOT_RETAINED, "pipeline" => self.s.pipeline.clone()).set(bytes);
            }
        }
    }

    /// A keepalive: the server's WAL end (an idle slot's position may move
    /// with it), and a status update at once when the server asks.
    async fn on_keepalive(
        &mut self,
        end: Lsn,
        reply_requested: bool,
    ) -> Result<Flow, CaptureError> {
        self.wal_end = self.wal_end.max(end);
        let busy =
            self.asm.in_transaction() || !self.outbox.events.is_empty() || self.replay.is_some();
        if self.cp.on_wal_end(end, busy) {
            self.dirty = true;
        }
        if reply_requested {
            self.send_status().await?;
        }
        Ok(Flow::Continue)
    }

    /// A pgoutput message at `lsn`. Inside a streamed block it is held
    /// for its transaction; the stream control messages start and end
    /// blocks, drop aborted changes, or start a committed transaction's
    /// replay; anything else is [processed](Self::process) at once.
    async fn on_wal(
        &mut self,
        lsn: Lsn,
        end: Lsn,
        data: bytes::Bytes,
    ) -> Result<Flow, CaptureError> {
        self.wal_end = self.wal_end.max(end);
        ::metrics::counter!(metrics::WAL_BYTES, "pipeline" => self.s.pipeline.clone())
            .increment(data.len() as u64);
        if self.streamed.open_block().is_some() {
            return self.on_streamed_change(lsn, data);
        }
        let m = pgoutput::decode(data).map_err(|source| self.decode_error(lsn, source))?;
        match m {
            Message::StreamStart(st) => self.streamed.start(st.xid).in_pipeline(self.s)?,
            Message::StreamStop => {
                return Err(CaptureError::Streamed {
                    pipeline: self.s.pipeline.clone(),
                    source: StreamedError::Protocol(format!(
                        "Stream Stop at {lsn} outside a block"
                    )),
                })
            }
            Message::StreamAbort(a) => self.streamed.abort(a.xid, a.subxid),
            Message::StreamCommit(c) => self.start_replay(c)?,
            m => return self.process(m, lsn).await,
        }
        Ok(Flow::Continue)
    }

    fn decode_error(&self, lsn: Lsn, source: pgoutput::DecodeError) -> CaptureError {
        CaptureError::Decode {
            pipeline: self.s.pipeline.clone(),
            lsn,
            source,
        }
    }

    /// A payload inside a streamed block: held under its transaction
    /// until the commit (or dropped by an abort), or the block's end.
    fn on_streamed_change(&mut self, lsn: Lsn, data: bytes::Bytes) -> Result<Flow, CaptureError> {
        match pgoutput::streaming::in_stream_xid(&data) {
            Ok(None) => self.streamed.stop(),
            Ok(Some(xid)) => self
                .streamed
                .push(Entry {
                    lsn,
                    xid,
                    payload: data,
                })
                .in_pipeline(self.s)?,
            Err(source) => return Err(self.decode_error(lsn, source)),
        }
        Ok(Flow::Continue)
    }

    /// Stream Commit: the transaction begins, as a protocol 1 Begin would
    /// begin it, and its changes are replayed by [`Self::replay_step`].
    fn start_replay(&mut self, c: StreamCommit) -> Result<(), CaptureError> {
        let replay = self.streamed.commit(c.xid).in_pipeline(self.s)?;
        self.asm.begin(&Begin {
            final_lsn: c.commit_lsn,
            commit_time: c.commit_time,
            xid: c.xid,
        });
        self.replay = Some((replay, c));
        Ok(())
    }

    /// Replays changes of the committed streamed transaction while reading
    /// may go on (a few hundred per wake-up, so acknowledgements and
    /// status updates keep their turn), and its commit after the last.
    async fn replay_step(&mut self) -> Result<Flow, CaptureError> {
        const STEP: usize = 256;
        for _ in 0..STEP {
            let (replay, commit) = self.replay.as_mut().expect("replaying");
            let Some(entry) = replay.next_entry().in_pipeline(self.s)? else {
                let c = commit.clone();
                self.replay = None;
                let commit = Commit {
                    flags: c.flags,
                    commit_lsn: c.commit_lsn,
                    end_lsn: c.end_lsn,
                    commit_time: c.commit_time,
                };
                return self.process(Message::Commit(commit), c.commit_lsn).await;
            };
            let message = match pgoutput::streaming::decode_in_stream(entry.payload) {
                Ok(InStream::Change { message, .. }) => message,
                Ok(InStream::Stop) => continue,
                Err(source) => return Err(self.decode_error(entry.lsn, source)),
            };
            if self.process(message, entry.lsn).await? == Flow::Stop {
                return Ok(Flow::Stop);
            }
            if !self.can_read() {
                break;
            }
        }
        Ok(Flow::Continue)
    }

    /// A message of a transaction (received whole, or replayed), in order:
    /// assembled into events, and a commit or a large transaction's slice
    /// handed over.
    async fn process(&mut self, m: Message, lsn: Lsn) -> Result<Flow, CaptureError> {
        if let Message::Message(lm) = &m {
            if self.on_logical_message(lm).await? == Flow::Stop {
                return Ok(Flow::Stop);
            }
        }
        self.apply(m, lsn).await?;
        if let Some((end_lsn, commit_micros)) = self.asm.take_finished() {
            self.on_commit(end_lsn, commit_micros);
            if self.outbox.ready >= self.s.batch_max_events {
                return Ok(self.flush_ready().await);
            }
        } else if self.outbox.open_len() >= self.s.batch_max_events
            || self.outbox.bytes >= self.s.max_in_flight_bytes / 8
        {
            // A large transaction: deliver it in slices; only its last
            // slice carries a position to confirm.
            if self.flush_ready().await == Flow::Stop {
                return Ok(Flow::Stop);
            }
            let (events, bytes) = self.outbox.take_all();
            return Ok(self.send_sized(events, None, bytes).await);
        }
        Ok(Flow::Continue)
    }

    /// A logical message: an incremental snapshot's signal or watermark.
    /// At a high watermark the chunk's rows go out, after everything
    /// streamed before it, in order.
    async fn on_logical_message(&mut self, lm: &LogicalMessage) -> Result<Flow, CaptureError> {
        let chunk = self
            .inc
            .on_message(lm, &self.asm, self.status)
            .await
            .in_pipeline(self.s)?;
        let Some(chunk) = chunk else {
            return Ok(Flow::Continue);
        };
        if self.flush_ready().await == Flow::Stop {
            return Ok(Flow::Stop);
        }
        let n = chunk.batches.len();
        for (i, events) in chunk.batches.into_iter().enumerate() {
            let last = i + 1 == n;
            let acker = self
                .cp
                .register(last.then_some(chunk.position), events.len());
            if last {
                self.inc.registered(acker.sequence());
            }
            if events.is_empty() {
                acker.ack();
                continue;
            }
            if self.dispatch(events, acker).await == Flow::Stop {
                return Ok(Flow::Stop);
            }
        }
        Ok(Flow::Continue)
    }

    /// A commit: its transaction becomes ready to hand over, with its
    /// position; metrics and status count it.
    fn on_commit(&mut self, end_lsn: Lsn, commit_micros: i64) {
        let n = self.outbox.open_len();
        self.outbox.commit(end_lsn);
        self.commits.push_back(PendingCommit {
            end: end_lsn,
            commit_micros,
        });
        let p = || self.s.pipeline.clone();
        ::metrics::counter!(metrics::TRANSACTIONS, "pipeline" => p()).increment(1);
        ::metrics::gauge!(metrics::LAG_SECONDS, "pipeline" => p())
            .set((now_micros() - commit_micros).max(0) as f64 / 1e6);
        self.status.update(|st| {
            st.events_total += n as u64;
            st.transactions_total += 1;
        });
        for ((_, op), (table, count)) in self.tx_counts.drain() {
            metrics::events(&self.s.pipeline, &table.qualified_name(), op, count);
        }
    }

    /// Drain: lets sinks acknowledge what is in flight, confirms it and
    /// closes the stream (after a clean end only: after an error the next
    /// session resumes from the confirmed position).
    async fn finish(self, result: Result<(), CaptureError>) -> Result<(), CaptureError> {
        let CaptureLoop {
            s,
            status,
            stream,
            mut cp,
            wal_end,
            ..
        } = self;
        if result.is_ok() {
            let deadline = tokio::time::Instant::now() + s.shutdown_timeout;
            while cp.in_flight_batches() > 0 {
                match tokio::time::timeout_at(deadline, cp.next_ack()).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => {
                        tracing::error!(pipeline = %s.pipeline, error = %e, "a batch failed while draining");
                        break;
                    }
                    Err(_) => {
                        tracing::warn!(pipeline = %s.pipeline, in_flight = cp.in_flight_events(), "shutdown timeout: unacknowledged events will be replayed on restart");
                        break;
                    }
                }
            }
            let confirmed = cp.confirmed();
            if let Err(e) = stream.close(confirmed).await {
                tracing::debug!(error = %e, "closing the replication stream");
            }
            tracing::info!(pipeline = %s.pipeline, confirmed = %confirmed, "capture stopped");
        }
        status.set_positions(cp.confirmed(), wal_end, cp.in_flight_events());
        result
    }

    /// Feeds one message to the assembler; row changes become events in
    /// the outbox.
    async fn apply(&mut self, m: Message, lsn: Lsn) -> Result<(), CaptureError> {
        let s = self.s;
        if !self.schema_changes.is_empty()
            && matches!(
                m,
                Message::Insert(_) | Message::Update(_) | Message::Delete(_) | Message::Truncate(_)
            )
        {
            self.flush_schema_changes(lsn);
        }
        match m {
            Message::Begin(b) => self.asm.begin(&b),
            Message::Commit(c) => {
                self.asm.commit(&c);
            }
            Message::Relation(rel) => self.on_relation(&rel, lsn).await?,
            Message::Insert(i) => {
                if let Some(e) = self.asm.insert(i.relation_id, &i.new, lsn).in_pipeline(s)? {
                    self.push(e);
                }
            }
            Message::Update(u) => {
                for e in self
                    .asm
                    .update(u.relation_id, u.old.as_ref(), &u.new, lsn)
                    .in_pipeline(s)?
                {
                    self.push(e);
                }
            }
            Message::Delete(d) => {
                if let Some(e) = self.asm.delete(d.relation_id, &d.old, lsn).in_pipeline(s)? {
                    self.push(e);
                }
            }
            Message::Truncate(t) => {
                for e in self.asm.truncate(&t.relation_ids, lsn).in_pipeline(s)? {
                    self.push(e);
                }
            }
            Message::Origin(_) | Message::Type(_) => {}
            // Handled by `on_wal` before they get here.
            Message::StreamStart(_)
            | Message::StreamStop
            | Message::StreamCommit(_)
            | Message::StreamAbort(_) => {}
            Message::Message(m) => self.on_message_notice(m).await,
        }
        Ok(())
    }

    /// An event of the open transaction: into the outbox, seen by the
    /// incremental snapshot (which drops its rows the stream supersedes),
    /// counted for the metrics.
    fn push(&mut self, e: ChangeEvent) {
        self.inc.observe(&e);
        self.tx_counts
            .entry((e.table.relation_id, e.op.code()))
            .or_insert_with(|| (Arc::clone(&e.table), 0))
            .1 += 1;
        self.outbox.push(e);
    }

    /// A Relation message: the table's shape as of here, described by the
    /// catalog; an unlisted table is skipped, captured, or delivered as its
    /// partitioned parent (see [`unlisted_relation`]).
    async fn on_relation(
        &mut self,
        rel: &pgoutput::Relation,
        lsn: Lsn,
    ) -> Result<(), CaptureError> {
        let s = self.s;
        let mut table = self.catalog.table_schema(rel).await.in_pipeline(s)?;
        let mut wanted = self.asm.wants(&table.qualified_name());
        if !wanted {
            let name = table.qualified_name();
            match unlisted_relation(
                s,
                &mut self.asm,
                &self.catalog,
                &mut self.skipped,
                rel.id,
                &name,
            )
            .await
            {
                Unlisted::Skip => {}
                Unlisted::Capture => wanted = true,
                Unlisted::AsParent(parent) => {
                    let mut t = (*table).clone();
                    t.schema = parent.schema;
                    t.name = parent.name;
                    table = Arc::new(t);
                    wanted = true;
                }
            }
        }
        let name = table.qualified_name();
        // A dropped table's key may be unknowable (REPLICA IDENTITY FULL
        // and never seen by this process): its last changes then go out
        // with a null key rather than stopping every other table.
        if wanted && !self.keyless.contains(&name) && !self.catalog.was_dropped(rel.id) {
            if let Some(problem) = crate::assemble::key_problem(&table) {
                return Err(CaptureError::Definite {
                    pipeline: s.pipeline.clone(),
                    message: problem,
                });
            }
        }
        tracing::debug!(pipeline = %s.pipeline, table = %name, version = table.version, "relation");
        if wanted && s.notices.schema_changes {
            // pgoutput sends Relation messages without a position of their
            // own (0/0): the transaction's commit orders them.
            let at = self.asm.notice_source(lsn).commit_lsn;
            if let Some(old) = self.history.observe(&table, at) {
                tracing::info!(pipeline = %s.pipeline, table = %name, commit_lsn = %at, "schema change");
                self.schema_changes.push((old, Arc::clone(&table)));
            }
        }
        self.asm.set_relation(table);
        Ok(())
    }

    /// Schema changes waiting for the row change that follows their
    /// Relation message: they go out right before it, with its position.
    fn flush_schema_changes(&mut self, lsn: Lsn) {
        for (old, new) in std::mem::take(&mut self.schema_changes) {
            let source = self.asm.notice_source(lsn);
            let event = schema_change::event(&old, &new, source, crate::assemble::now_ms());
            self.outbox.push(event);
        }
    }

    /// A logical message: DDL text from walcast's trigger, or a message of
    /// an outbox prefix, becomes a notice; anything else is dropped here
    /// (incremental snapshot signals were handled before). A transactional
    /// message rides in its transaction's events and goes out only with its
    /// commit (pgoutput never sends those of a rolled-back transaction); a
    /// non-transactional one was written whatever became of its
    /// transaction and goes out at once, confirmed with the next commit.
    async fn on_message_notice(&mut self, m: LogicalMessage) {
        let n = &self.s.notices;
        let ts_ms = crate::assemble::now_ms();
        let event = if n.schema_changes && m.prefix == schema_change::DDL_MESSAGE_PREFIX {
            let ddl = String::from_utf8_lossy(&m.content);
            schema_change::ddl_event(&ddl, self.asm.notice_source(m.lsn), ts_ms)
        } else if n.message_prefixes.contains(&m.prefix) {
            let source = self.asm.notice_source(m.lsn);
            notice::message(m.prefix, m.content.to_vec(), m.transactional, source, ts_ms)
        } else {
            tracing::trace!(pipeline = %self.s.pipeline, prefix = %m.prefix, lsn = %m.lsn, "logical message dropped");
            return;
        };
        if self.asm.in_transaction() {
            self.outbox.push(event);
            return;
        }
        // Outside a transaction: after what is ready, on its own, with no
        // position of its own to confirm.
        if self.flush_ready().await == Flow::Continue {
            self.send(vec![event], None).await;
        }
    }

    /// A heartbeat: the action query (if any) on the catalog connection,
    /// then a heartbeat notice with the positions read and confirmed.
    async fn on_heartbeat(&mut self) -> Result<Flow, CaptureError> {
        let Some(h) = self.s.notices.heartbeat.as_ref() else {
            return Ok(Flow::Continue);
        };
        if let Some(q) = &h.action_query {
            match tokio::time::timeout(ACTION_QUERY_TIMEOUT, self.catalog.client().batch_execute(q))
                .await
            {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    // A query Postgres refuses as written (syntax, a missing
                    // table, a privilege: class 42) fails every time.
                    if e.code().is_some_and(|c| c.code().starts_with("42")) {
                        return Err(CaptureError::Definite {
                            pipeline: self.s.pipeline.clone(),
                            message: format!(
                                "heartbeat.action_query failed: {e} ({q}); fix it or remove it from [pipelines.{}.heartbeat]",
                                self.s.pipeline
                            ),
                        });
                    }
                    tracing::warn!(pipeline = %self.s.pipeline, error = %e, "heartbeat.action_query failed; publishing the heartbeat anyway, retrying at the next one");
                }
                Err(_) => {
                    tracing::warn!(pipeline = %self.s.pipeline, timeout = ?ACTION_QUERY_TIMEOUT, "heartbeat.action_query timed out; publishing the heartbeat anyway");
                }
            }
        }
        let ts_ms = crate::assemble::now_ms();
        let key = serde_json::json!({ "serverName": self.s.assemble.name }).to_string();
        let value = serde_json::json!({
            "ts_ms": ts_ms,
            "lsn": self.wal_end.0,
            "confirmed_lsn": self.cp.confirmed().0,
        })
        .to_string();
        let mut source = self.asm.notice_source(self.wal_end);
        source.tx_id = None;
        source.commit_lsn = self.cp.confirmed();
        let event = notice::document(NoticeKind::Heartbeat, key, value, source, ts_ms);
        if self.flush_ready().await == Flow::Stop {
            return Ok(Flow::Stop);
        }
        Ok(self.send(vec![event], None).await)
    }
}

/// An error that ended the replication stream, with the publication named
/// when it is the publication that went missing (SQLSTATE 42704 from
/// pgoutput: `publication "x" does not exist`).
fn stream_error(s: &CaptureSettings, e: ReplicationError, confirmed: Lsn) -> CaptureError {
    let publication_missing = matches!(&e, ReplicationError::Server(se)
        if (se.code == "42704" && se.message.starts_with("publication ")) || se.message.starts_with("skipped loading publication"));
    if publication_missing {
        CaptureError::PublicationDropped {
            pipeline: s.pipeline.clone(),
            publication: s.wanted.publication.clone(),
            slot: s.wanted.slot.clone(),
            confirmed,
            source: e,
        }
    } else {
        CaptureError::Replication {
            pipeline: s.pipeline.clone(),
            source: e,
        }
    }
}

/// Warns once per table about captured tables that were dropped while
/// streaming. Nothing stops: pgoutput still decodes the changes committed
/// before the drop (they are delivered), and simply sends nothing for the
/// table afterwards, as Debezium's connector keeps running too.
async fn warn_dropped_tables(
    s: &CaptureSettings,
    catalog: &Catalog,
    tables: &[TableName],
    seen: &mut HashSet<TableName>,
) {
    let (schemas, names): (Vec<&str>, Vec<&str>) = tables
        .iter()
        .map(|t| (t.schema.as_str(), t.name.as_str()))
        .unzip();
    let Ok(rows) = catalog
        .client()
        .query(
            "SELECT x.s, x.t FROM unnest($1::text[], $2::text[]) AS x(s, t)
             WHERE NOT EXISTS (SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                               WHERE n.nspname = x.s AND c.relname = x.t)",
            &[&schemas, &names],
        )
        .await
    else {
        return;
    };
    for r in rows {
        let t = TableName::new(r.get::<_, String>(0), r.get::<_, String>(1));
        if seen.insert(t.clone()) {
            tracing::warn!(
                pipeline = %s.pipeline,
                table = %t,
                "captured table was dropped: the changes committed before the drop are delivered, the other \
                 tables keep streaming; remove it from `tables` (or `schemas`) of this pipeline"
            );
        }
    }
}

/// What to do with a relation the pipeline does not list.
enum Unlisted {
    Skip,
    Capture,
    /// Deliver its changes as changes of this partitioned table.
    AsParent(TableName),
}

/// A relation the pipeline does not list arrived in the stream. A partition
/// of a captured partitioned table is captured: as a table of its own when
/// partitions are (one attached since the start), or else as its parent
/// (pgoutput describes a partition after its root whenever one of its
/// changes goes out through the root; and WAL decoded from before the
/// publication published via the root, e.g. a publication created by an
/// older walcast, names the partition in its changes: skipping it would
/// lose them). Anything else is a table the publication
/// covers beyond the pipeline's list: skipped, with a warning once, never
/// silently.
async fn unlisted_relation(
    s: &CaptureSettings,
    asm: &mut Assembler,
    catalog: &Catalog,
    skipped: &mut HashSet<u32>,
    relation_id: u32,
    name: &str,
) -> Unlisted {
    let ancestors: Vec<TableName> = catalog
        .client()
        .query(
            "SELECT n.nspname::text, c.relname::text
             FROM pg_partition_ancestors($1::oid::regclass) a
             JOIN pg_class c ON c.oid = a.relid JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE a.relid <> $1::oid::regclass",
            &[&relation_id],
        )
        .await
        .map(|rows| {
            rows.iter()
                .map(|r| TableName::new(r.get::<_, String>(0), r.get::<_, String>(1)))
                .collect()
        })
        .unwrap_or_default();
    if let Some(parent) = ancestors.iter().find(|p| asm.wants(&p.to_string())) {
        if s.wanted.via_root {
            // pgoutput describes the partition right after its root
            // whenever a partition's change goes out through the root
            // (maybe_send_schema), so this is routine; changes that name
            // the partition itself (WAL decoded from before the
            // publication published via the root) are delivered as the
            // parent's too.
            tracing::debug!(pipeline = %s.pipeline, table = %name, parent = %parent,
                "a partition of a captured partitioned table: its changes are the parent's");
            return Unlisted::AsParent(parent.clone());
        }
        tracing::info!(pipeline = %s.pipeline, table = %name, parent = %parent,
            "capturing a partition of a captured partitioned table (attached since the start; rows it held when \
             attached are not read: run `walcast snapshot` for it)");
        asm.want(name.to_string());
        return Unlisted::Capture;
    }
    if skipped.insert(relation_id) {
        tracing::warn!(pipeline = %s.pipeline, table = %name, publication = %s.wanted.publication,
            "the publication sends changes of a table this pipeline does not capture: they are skipped; \
             add the table to `tables`, or remove it from the publication");
    }
    Unlisted::Skip
}

/// The capture loop's pure part, fed with the frames Postgres 15 sent for
/// `tests/fixtures/pgoutput/capture.sh` (no server): what it hands to the
/// sinks and what it may confirm. The outbox releases whole committed
/// transactions only, with their commit's end as the position; the
/// checkpoint reaches a commit's end only once every batch up to it is
/// acknowledged, whatever order the acknowledgements come in.
#[cfg(test)]
mod tests {
    use super::*;
    use crate::assemble::tests::{options, schema};

    /// Feeds the frames through the assembler into the outbox as
    /// `CaptureLoop` does, taking what is ready after every `take_every`
    /// messages (a linger that ends at various points). Message `i` is at
    /// LSN `1000 + i`.
    fn batches(take_every: usize) -> (Vec<(Vec<ChangeEvent>, Lsn)>, usize, Vec<Lsn>) {
        let mut asm = Assembler::new(options(None));
        let mut outbox = Outbox {
            events: Vec::new(),
            ready: 0,
            ready_pos: None,
            deadline: None,
            bytes: 0,
            ready_bytes: 0,
        };
        let (mut out, mut total, mut commits) = (Vec::new(), 0, Vec::new());
        for (i, m) in crate::pgoutput::tests::frames().into_iter().enumerate() {
            let lsn = Lsn(1000 + i as u64);
            let events = match m {
                Message::Begin(b) => {
                    asm.begin(&b);
                    vec![]
                }
                Message::Commit(c) => {
                    let end = asm.commit(&c);
                    asm.take_finished();
                    outbox.commit(end);
                    commits.push(end);
                    vec![]
                }
                Message::Relation(r) => {
                    asm.set_relation(schema(&r));
                    vec![]
                }
                Message::Insert(x) => asm
                    .insert(x.relation_id, &x.new, lsn)
                    .unwrap()
                    .into_iter()
                    .collect(),
                Message::Update(u) => asm
                    .update(u.relation_id, u.old.as_ref(), &u.new, lsn)
                    .unwrap(),
                Message::Delete(d) => asm
                    .delete(d.relation_id, &d.old, lsn)
                    .unwrap()
                    .into_iter()
                    .collect(),
                Message::Truncate(t) => asm.truncate(&t.relation_ids, lsn).unwrap(),
                _ => vec![],
            };
            total += events.len();
            for e in events {
                outbox.push(e);
            }
            if i % take_every == 0 {
                if let Some((events, pos, bytes)) = outbox.take_ready() {
                    assert_eq!(
                        bytes,
                        batch_bytes(&events),
                        "bytes counted as events came in"
                    );
                    out.push((events, pos));
                }
            }
        }
        if let Some((events, pos, bytes)) = outbox.take_ready() {
            assert_eq!(bytes, batch_bytes(&events));
            out.push((events, pos));
        }
        assert_eq!(
            outbox.open_len(),
            0,
            "the session ends between transactions"
        );
        assert_eq!(outbox.bytes, 0, "nothing is left counted");
        (out, total, commits)
    }

    #[test]
    fn the_outbox_releases_whole_committed_transactions_at_their_end() {
        for take_every in [1, 2, 3, 5, 40] {
            let (out, total, commits) = batches(take_every);
            assert_eq!(
                out.iter().map(|(e, _)| e.len()).sum::<usize>(),
                total,
                "nothing held back or lost"
            );
            for (events, pos) in &out {
                assert!(commits.contains(pos), "a batch ends at a commit: {pos}");
                // Every event of the batch committed before its position.
                assert!(events.iter().all(|e| e.source.commit_lsn <= *pos));
            }
            let positions: Vec<Lsn> = out.iter().map(|(_, p)| *p).collect();
            assert!(positions.windows(2).all(|w| w[0] < w[1]), "{positions:?}");
            // No transaction is split across batches.
            let mut seen = HashSet::new();
            let mut last = None;
            for (events, _) in &out {
                for e in events {
                    let c = e.source.commit_lsn;
                    if last != Some(c) {
                        assert!(seen.insert(c), "transaction {c} split across batches");
                        last = Some(c);
                    }
                }
            }
        }
    }

    #[tokio::test]
    async fn the_checkpoint_reaches_a_commit_only_when_everything_before_it_is_acknowledged() {
        let (out, _, commits) = batches(2);
        let mut cp = LsnCheckpoint::new(Lsn(1));
        let ackers: Vec<(Acker, Lsn)> = out
            .iter()
            .map(|(e, pos)| (cp.register(Some(*pos), e.len()), *pos))
            .collect();
        // Acknowledge from the last batch to the first: nothing may be
        // confirmed until the first batch is.
        let n = ackers.len();
        let mut ackers = ackers;
        let first = ackers.remove(0);
        for (a, _) in ackers.drain(..).rev() {
            a.ack();
            cp.poll().unwrap();
            assert_eq!(
                cp.confirmed(),
                Lsn(1),
                "a later batch's ack confirms nothing"
            );
        }
        first.0.ack();
        cp.poll().unwrap();
        assert_eq!(
            cp.confirmed(),
            *commits.last().unwrap(),
            "all {n} batches acknowledged"
        );
        assert_eq!(cp.in_flight_batches(), 0);
    }
}
