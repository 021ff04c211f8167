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

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use walcast_sdk::ack::AckFailure;
use walcast_sdk::retry::Backoff;
use walcast_sdk::{Acker, Batch, ChangeEvent, Lsn, Sink, TableName};

use crate::checkpoint::LsnCheckpoint;
use crate::pgoutput::{self, Message};
use crate::replication::connection::{
    quote_ident, ConnectParams, ReplicationConnection, ReplicationError,
};
use crate::replication::ServerMessage;
use walcast_sdk::status::{PipelineState, StatusHandle};
use walcast_sdk::telemetry as metrics;

use super::assemble::{AssembleError, AssembleOptions, Assembler};
use super::catalog::{self, Catalog, CatalogError};
use super::incremental::{Incremental, IncrementalError, IncrementalSettings};
use super::setup::{self, SetupError, Wanted};
use super::snapshot::{self, Outcome, SnapshotError, SnapshotJob, SnapshotSettings, SnapshotState};
use crate::config::SnapshotMode;

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
}

impl CaptureError {
    pub fn is_transient(&self) -> bool {
        match self {
            CaptureError::Replication { source, .. } => source.is_transient(),
            CaptureError::Catalog { source, .. } => source.is_transient(),
            CaptureError::Setup { source, .. } => source.is_transient(),
            CaptureError::Snapshot { source, .. } => source.is_transient(),
            CaptureError::Incremental { source, .. } => source.is_transient(),
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
    pub batch_max_events: usize,
    pub shutdown_timeout: Duration,
    pub retry_max_backoff: Duration,
    pub snapshot: SnapshotSettings,
}

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
        let events = Arc::new(events);
        for sink in sinks.iter_mut() {
            let name = sink.name().to_string();
            let n = events.len() as u64;
            match sink.send(Batch { events: Arc::clone(&events), acker: acker.clone() }).await {
                Ok(()) => ::metrics::counter!(metrics::SINK_EVENTS, "pipeline" => pipeline.clone(), "sink" => name).increment(n),
                Err(e) => {
                    tracing::error!(pipeline = %pipeline, sink = %name, error = %e, "sink refused a batch");
                    ::metrics::counter!(metrics::SINK_ERRORS, "pipeline" => pipeline.clone(), "sink" => name).increment(1);
                }
            }
        }
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
    if let Some(w) =
        crate::replication::tls::exposure_warning(&settings.connect.host, settings.connect.sslmode)
    {
        tracing::warn!(pipeline = %settings.pipeline, "{w}");
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
    let result = loop {
        let started = Instant::now();
        match session(&settings, &tx, &status, &shutdown, &mut slot_seen).await {
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
}

/// How long committed transactions may wait to be grouped into one batch.
const LINGER: Duration = Duration::from_millis(2);

impl Outbox {
    fn commit(&mut self, end: Lsn) {
        self.ready = self.events.len();
        self.ready_pos = Some(end);
        self.deadline
            .get_or_insert_with(|| tokio::time::Instant::now() + LINGER);
    }

    fn take_ready(&mut self) -> Option<(Vec<ChangeEvent>, Lsn)> {
        let pos = self.ready_pos.take()?;
        let events: Vec<ChangeEvent> = self.events.drain(..self.ready).collect();
        self.ready = 0;
        self.deadline = None;
        Some((events, pos))
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

/// One replication session, from connecting to the end of the stream.
async fn session(
    s: &CaptureSettings,
    tx: &mpsc::Sender<(Vec<ChangeEvent>, Acker)>,
    status: &StatusHandle,
    shutdown: &CancellationToken,
    slot_seen: &mut bool,
) -> Result<(), CaptureError> {
    let p = || s.pipeline.clone();
    let cat_err = |source| CaptureError::Catalog {
        pipeline: p(),
        source,
    };
    let rep_err = |source| CaptureError::Replication {
        pipeline: p(),
        source,
    };
    let setup_err = |source| CaptureError::Setup {
        pipeline: p(),
        source,
    };
    let snap_err = |source| CaptureError::Snapshot {
        pipeline: p(),
        source,
    };
    let inc_err = |source| CaptureError::Incremental {
        pipeline: p(),
        source,
    };
    let mode = s.snapshot.mode;
    let state_path = &s.snapshot.state_path;

    status.set_state(PipelineState::Starting);
    let prior = SnapshotState::load(state_path).map_err(snap_err)?;
    if mode == SnapshotMode::InitialOnly
        && prior
            .as_ref()
            .is_some_and(|st| st.done && st.slot == s.wanted.slot)
    {
        tracing::info!(pipeline = %s.pipeline, state = %state_path.display(), "snapshot = initial_only and the snapshot is complete; nothing to do");
        return Ok(());
    }
    let client = catalog::connect(&s.connect).await.map_err(cat_err)?;
    let plan = setup::plan(&client, &s.wanted).await.map_err(setup_err)?;
    if plan.create_slot && *slot_seen {
        let confirmed = status
            .snapshot()
            .confirmed_lsn
            .unwrap_or_else(|| "?".into());
        return Err(CaptureError::Definite {
            pipeline: p(),
            message: format!(
                "replication slot {} disappeared while walcast was streaming from it (dropped externally?). \
                 Recreating it would silently skip every change made after LSN {confirmed}, so walcast stops. \
                 Find out what dropped it; restarting walcast creates a new slot that starts from now \
                 (changes between LSN {confirmed} and then are lost to the sinks unless re-snapshotted)",
                s.wanted.slot
            ),
        });
    }
    if plan.create_publication.is_some() && *slot_seen {
        return Err(CaptureError::Definite {
            pipeline: p(),
            message: format!(
                "publication {} disappeared while walcast was streaming (dropped externally?). walcast does not \
                 recreate it mid-stream: Postgres cannot decode the changes made after the drop through slot {} \
                 even once it exists again. Recreate it, then skip the gap with \
                 SELECT pg_replication_slot_advance('{}', pg_current_wal_lsn()); or drop the slot to snapshot again",
                s.wanted.publication, s.wanted.slot, s.wanted.slot
            ),
        });
    }
    setup::apply_publication(&client, &plan)
        .await
        .map_err(setup_err)?;
    let mut catalog = Catalog::new(client);

    let mut conn = ReplicationConnection::connect(&s.connect)
        .await
        .map_err(rep_err)?;
    let system = conn.identify_system().await.map_err(rep_err)?;
    // Which snapshot to take, if any (see the snapshot module for why
    // this order keeps every row).
    let unfinished = prior.filter(|st| !st.done && st.slot == s.wanted.slot);
    let mut snapshot_state: Option<SnapshotState> = None;
    let mut exported = None;
    let start = if plan.create_slot {
        let export = mode != SnapshotMode::Never;
        if export {
            // Written before the slot exists: a crash right after creating
            // it must still find a snapshot to finish. A slot created anew
            // streams from a new point, so earlier progress is void, except
            // under initial_only whose temporary slot never streams.
            let st = match unfinished {
                Some(st) if mode == SnapshotMode::InitialOnly => st,
                _ => SnapshotState::new(&s.pipeline, &s.wanted.slot, &plan.tables),
            };
            st.save(state_path).map_err(snap_err)?;
            snapshot_state = Some(st);
        }
        // initial_only needs the slot only for its snapshot; a temporary one
        // vanishes with the connection and pins no WAL afterwards.
        let temporary = mode == SnapshotMode::InitialOnly;
        let created = conn
            .create_slot(&s.wanted.slot, temporary, export)
            .await
            .map_err(rep_err)?;
        tracing::info!(pipeline = %s.pipeline, slot = %s.wanted.slot, consistent_point = %created.consistent_point, temporary, "created replication slot");
        // Incremental snapshot progress belongs to the slot it was read
        // against; a new slot starts from a new point.
        if !temporary && std::fs::remove_file(&s.snapshot.incremental_state_path).is_ok() {
            tracing::info!(pipeline = %s.pipeline, state = %s.snapshot.incremental_state_path.display(), "removed the incremental snapshot state of the previous slot");
        }
        if let Some(st) = snapshot_state.as_mut() {
            if st.consistent_point.is_none() || mode == SnapshotMode::InitialOnly {
                st.consistent_point = Some(created.consistent_point.to_string());
            }
            st.save(state_path).map_err(snap_err)?;
            exported = created.snapshot_name.clone();
        }
        created.consistent_point
    } else {
        let confirmed = plan
            .slot_confirmed_lsn
            .as_deref()
            .and_then(|l| l.parse().ok())
            .unwrap_or_default();
        match mode {
            SnapshotMode::Never => {}
            SnapshotMode::Initial => snapshot_state = unfinished,
            // A snapshot is asked for: finish one, or take one now.
            SnapshotMode::InitialOnly => {
                snapshot_state = Some(unfinished.unwrap_or_else(|| {
                    let mut st = SnapshotState::new(&s.pipeline, &s.wanted.slot, &plan.tables);
                    st.consistent_point = Some(system.xlog_pos.to_string());
                    st
                }))
            }
        }
        confirmed
    };
    if let Some(mut st) = snapshot_state {
        status.set_state(PipelineState::Snapshotting);
        let job = SnapshotJob {
            pipeline: &s.pipeline,
            settings: &s.snapshot,
            connect: &s.connect,
            name: &s.assemble.name,
            database: &s.assemble.database,
            tables: &plan.tables,
            exported,
            position: st.consistent_point().unwrap_or(start),
            max_in_flight_events: s.max_in_flight_events,
            batch_max_events: s.batch_max_events,
            shutdown_timeout: s.shutdown_timeout,
        };
        // The replication connection stays idle meanwhile: its next
        // command would end the exported snapshot.
        match snapshot::run(job, &mut st, &mut catalog, tx, status, shutdown)
            .await
            .map_err(snap_err)?
        {
            Outcome::Cancelled => return Ok(()),
            Outcome::Complete => {}
        }
    }
    if mode == SnapshotMode::InitialOnly {
        tracing::info!(pipeline = %s.pipeline, "snapshot = initial_only: snapshot complete, not streaming");
        return Ok(());
    }
    let options = [
        ("proto_version", "1".to_string()),
        ("publication_names", quote_ident(&s.wanted.publication)),
        ("messages", "true".to_string()),
    ];
    let mut stream = conn
        .start_replication(&s.wanted.slot, Lsn(0), &options)
        .await
        .map_err(rep_err)?;
    *slot_seen = true;
    tracing::info!(pipeline = %s.pipeline, slot = %s.wanted.slot, from = %start, server_wal = %system.xlog_pos, "streaming");
    status.set_state(PipelineState::Streaming);
    status.update(|st| st.last_error = None);
    ::metrics::gauge!(metrics::STREAMING, "pipeline" => p()).set(1.0);

    let keyless: HashSet<String> = s.wanted.keyless.iter().map(TableName::to_string).collect();
    // The names the stream carries for the captured tables: with
    // publish_via_partition_root = false a listed partitioned table
    // stands for its partitions.
    let mut assemble = s.assemble.clone();
    if let Some(set) = assemble.tables.as_mut() {
        set.extend(plan.tables.iter().map(TableName::to_string));
    }
    let mut asm = Assembler::new(assemble.clone());
    let mut skipped = HashSet::<u32>::new();
    let mut inc = Incremental::new(
        IncrementalSettings {
            pipeline: s.pipeline.clone(),
            slot: s.wanted.slot.clone(),
            publication: s.wanted.publication.clone(),
            chunk_rows: s.snapshot.chunk_rows,
            batch_max_events: s.batch_max_events,
            state_path: s.snapshot.incremental_state_path.clone(),
            name: s.assemble.name.clone(),
            database: s.assemble.database.clone(),
            tables: assemble.tables.clone(),
        },
        s.connect.clone(),
    )
    .map_err(inc_err)?;
    for table in &plan.added_tables {
        tracing::warn!(pipeline = %s.pipeline, table = %table, publication = %s.wanted.publication,
            "table added to the publication: its changes stream from now on, its existing rows are not read; run `walcast snapshot {table}` to read them");
    }
    let mut cp = LsnCheckpoint::new(start);
    let mut outbox = Outbox {
        events: Vec::new(),
        ready: 0,
        ready_pos: None,
        deadline: None,
    };
    let mut commits = VecDeque::<PendingCommit>::new();
    let mut wal_end = start;
    let mut last_sent = Instant::now();
    let mut dirty = false;
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut retained_tick = tokio::time::interval(Duration::from_secs(10));
    let mut dropped_seen = HashSet::<TableName>::new();
    // Events per (relation, op) in the current transaction, turned into
    // metric increments once per commit: no allocation per event.
    let mut tx_counts: EventCounts = Default::default();

    let result: Result<(), CaptureError> = loop {
        let can_read = cp.in_flight_events() + outbox.events.len() < s.max_in_flight_events
            && tx.capacity() > 0;
        let linger = outbox.deadline;
        if let Err(e) = inc.maybe_request(can_read) {
            break Err(inc_err(e));
        }
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => {
                // Hand over what is complete so it can be confirmed while draining.
                if let Some((events, pos)) = outbox.take_ready() {
                    let acker = cp.register(Some(pos), events.len());
                    let _ = tx.send((events, acker)).await;
                }
                break Ok(());
            }
            acked = cp.next_ack() => {
                match acked {
                    Ok(true) => {
                        dirty = true;
                        let now = now_micros();
                        while commits.front().is_some_and(|c| c.end <= cp.confirmed()) {
                            let c = commits.pop_front().expect("checked");
                            metrics::commit_to_ack(&s.pipeline, Duration::from_micros(now.saturating_sub(c.commit_micros).max(0) as u64));
                        }
                    }
                    Ok(false) => {}
                    Err(source) => break Err(CaptureError::Delivery { pipeline: p(), confirmed: cp.confirmed(), source }),
                }
                if let Err(e) = inc.on_delivered(cp.delivered_below()) {
                    break Err(inc_err(e));
                }
            }
            result = inc.next_result(), if inc.awaiting_rows() => {
                if let Some(Err(e)) = result {
                    break Err(inc_err(e));
                }
            }
            _ = tick.tick() => {
                if dirty || last_sent.elapsed() >= s.status_interval {
                    if let Err(e) = stream.send_status(cp.confirmed(), false).await { break Err(rep_err(e)); }
                    last_sent = Instant::now();
                    dirty = false;
                }
                status.set_positions(cp.confirmed(), wal_end, cp.in_flight_events());
                inc.report(status, false);
                ::metrics::gauge!(metrics::LAG_BYTES, "pipeline" => p()).set(wal_end.0.saturating_sub(cp.confirmed().0) as f64);
                ::metrics::gauge!(metrics::IN_FLIGHT, "pipeline" => p()).set(cp.in_flight_events() as f64);
                ::metrics::gauge!(metrics::CONFIRMED_LSN, "pipeline" => p()).set(cp.confirmed().0 as f64);
            }
            _ = retained_tick.tick() => {
                warn_dropped_tables(s, &catalog, &plan.tables, &mut dropped_seen).await;
                if let Ok(row) = catalog.client().query_opt(
                    "SELECT (pg_current_wal_lsn() - restart_lsn)::float8 FROM pg_replication_slots WHERE slot_name = $1",
                    &[&s.wanted.slot],
                ).await {
                    if let Some(Some(bytes)) = row.map(|r| r.get::<_, Option<f64>>(0)) {
                        ::metrics::gauge!(metrics::SLOT_RETAINED, "pipeline" => p()).set(bytes);
                    }
                }
            }
            _ = tokio::time::sleep_until(linger.unwrap_or_else(tokio::time::Instant::now)), if linger.is_some() && tx.capacity() > 0 => {
                if let Some((events, pos)) = outbox.take_ready() {
                    let acker = cp.register(Some(pos), events.len());
                    if tx.send((events, acker)).await.is_err() { break Ok(()); }
                }
            }
            msg = stream.recv(), if can_read => {
                let msg = match msg { Ok(m) => m, Err(e) => break Err(stream_error(s, e, cp.confirmed())) };
                match msg {
                    ServerMessage::Keepalive { wal_end: end, reply_requested, .. } => {
                        wal_end = wal_end.max(end);
                        if cp.on_wal_end(end, asm.in_transaction() || !outbox.events.is_empty()) { dirty = true; }
                        if reply_requested {
                            if let Err(e) = stream.send_status(cp.confirmed(), false).await { break Err(rep_err(e)); }
                            last_sent = Instant::now();
                            dirty = false;
                        }
                    }
                    ServerMessage::XLogData { start: lsn, wal_end: end, data, .. } => {
                        wal_end = wal_end.max(end);
                        ::metrics::counter!(metrics::WAL_BYTES, "pipeline" => p()).increment(data.len() as u64);
                        let m = match pgoutput::decode(data) {
                            Ok(m) => m,
                            Err(source) => break Err(CaptureError::Decode { pipeline: p(), lsn, source }),
                        };
                        if let Message::Message(lm) = &m {
                            match inc.on_message(lm, &asm, status).await {
                                Ok(None) => {}
                                Ok(Some(chunk)) => {
                                    // After everything streamed before the
                                    // high watermark, in order.
                                    if let Some((events, pos)) = outbox.take_ready() {
                                        let acker = cp.register(Some(pos), events.len());
                                        if tx.send((events, acker)).await.is_err() { break Ok(()); }
                                    }
                                    let n = chunk.batches.len();
                                    let mut closed = false;
                                    for (i, events) in chunk.batches.into_iter().enumerate() {
                                        let last = i + 1 == n;
                                        let acker = cp.register(last.then_some(chunk.position), events.len());
                                        if last { inc.registered(acker.sequence()); }
                                        if events.is_empty() { acker.ack(); continue; }
                                        if tx.send((events, acker)).await.is_err() { closed = true; break; }
                                    }
                                    if closed { break Ok(()); }
                                }
                                Err(e) => break Err(inc_err(e)),
                            }
                        }
                        if let Err(e) = handle(s, &mut asm, &mut catalog, &keyless, &mut skipped, &mut outbox.events, &mut tx_counts, &mut inc, m, lsn).await {
                            break Err(e);
                        }
                        // A commit: hand the transaction over with its position.
                        if let Some((end_lsn, commit_micros)) = take_commit(&mut asm) {
                            let n = outbox.open_len();
                            outbox.commit(end_lsn);
                            commits.push_back(PendingCommit { end: end_lsn, commit_micros });
                            ::metrics::counter!(metrics::TRANSACTIONS, "pipeline" => p()).increment(1);
                            ::metrics::gauge!(metrics::LAG_SECONDS, "pipeline" => p()).set((now_micros() - commit_micros).max(0) as f64 / 1e6);
                            status.update(|st| { st.events_total += n as u64; st.transactions_total += 1; });
                            for ((_, op), (table, count)) in tx_counts.drain() { metrics::events(&s.pipeline, &table.qualified_name(), op, count); }
                            if outbox.ready >= s.batch_max_events {
                                if let Some((events, pos)) = outbox.take_ready() {
                                    let acker = cp.register(Some(pos), events.len());
                                    if tx.send((events, acker)).await.is_err() { break Ok(()); }
                                }
                            }
                        } else if outbox.open_len() >= s.batch_max_events {
                            // A large transaction: deliver it in slices; only
                            // its last slice carries a position to confirm.
                            if let Some((events, pos)) = outbox.take_ready() {
                                let acker = cp.register(Some(pos), events.len());
                                if tx.send((events, acker)).await.is_err() { break Ok(()); }
                            }
                            let events = std::mem::take(&mut outbox.events);
                            let acker = cp.register(None, events.len());
                            if tx.send((events, acker)).await.is_err() { break Ok(()); }
                        }
                    }
                }
            }
        }
    };

    // Drain: let sinks acknowledge what is in flight, then confirm it.
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
/// (WAL decoded from before the publication published via the root, e.g. a
/// publication created by an older walcast, names the partition: skipping
/// it would lose its changes). Anything else is a table the publication
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
            tracing::warn!(pipeline = %s.pipeline, table = %name, parent = %parent,
                "changes of a partition arrive under its own name (decoded from before the publication published \
                 via the partition root): delivering them as changes of the partitioned table");
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

/// The commit just assembled, if the last message was a Commit.
fn take_commit(asm: &mut Assembler) -> Option<(Lsn, i64)> {
    asm.take_finished()
}

#[allow(clippy::too_many_arguments)]
async fn handle(
    s: &CaptureSettings,
    asm: &mut Assembler,
    catalog: &mut Catalog,
    keyless: &HashSet<String>,
    skipped: &mut HashSet<u32>,
    pending: &mut Vec<ChangeEvent>,
    counts: &mut EventCounts,
    inc: &mut Incremental,
    m: Message,
    lsn: Lsn,
) -> Result<(), CaptureError> {
    let asm_err = |source| CaptureError::Assemble {
        pipeline: s.pipeline.clone(),
        source,
    };
    let mut push = |e: ChangeEvent, pending: &mut Vec<ChangeEvent>| {
        inc.observe(&e);
        counts
            .entry((e.table.relation_id, e.op.code()))
            .or_insert_with(|| (Arc::clone(&e.table), 0))
            .1 += 1;
        pending.push(e);
    };
    match m {
        Message::Begin(b) => asm.begin(&b),
        Message::Commit(c) => {
            asm.commit(&c);
        }
        Message::Relation(rel) => {
            let table =
                catalog
                    .table_schema(&rel)
                    .await
                    .map_err(|source| CaptureError::Catalog {
                        pipeline: s.pipeline.clone(),
                        source,
                    })?;
            let mut table = table;
            let mut wanted = asm.wants(&table.qualified_name());
            if !wanted {
                match unlisted_relation(s, asm, catalog, skipped, rel.id, &table.qualified_name())
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
            if wanted && !keyless.contains(&name) && !catalog.was_dropped(rel.id) {
                if let Some(problem) = super::assemble::key_problem(&table) {
                    return Err(CaptureError::Definite {
                        pipeline: s.pipeline.clone(),
                        message: problem,
                    });
                }
            }
            tracing::debug!(pipeline = %s.pipeline, table = %name, version = table.version, "relation");
            asm.set_relation(table);
        }
        Message::Insert(i) => {
            if let Some(e) = asm.insert(i.relation_id, &i.new, lsn).map_err(asm_err)? {
                push(e, pending);
            }
        }
        Message::Update(u) => {
            for e in asm
                .update(u.relation_id, u.old.as_ref(), &u.new, lsn)
                .map_err(asm_err)?
            {
                push(e, pending);
            }
        }
        Message::Delete(d) => {
            if let Some(e) = asm.delete(d.relation_id, &d.old, lsn).map_err(asm_err)? {
                push(e, pending);
            }
        }
        Message::Truncate(t) => {
            for e in asm.truncate(&t.relation_ids, lsn).map_err(asm_err)? {
                push(e, pending);
            }
        }
        Message::Origin(_) | Message::Type(_) => {}
        Message::Message(m) => {
            tracing::debug!(pipeline = %s.pipeline, prefix = %m.prefix, lsn = %m.lsn, "logical message");
        }
    }
    Ok(())
}
