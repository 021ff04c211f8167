//! The Redis sink: applies batches in order on a worker task, one round
//! trip per batch, and acknowledges each only when every reply has arrived.
//!
//! # Why a worker
//! [`Sink::send`] used to write its batch and wait for every reply before
//! returning, so a relay could not fetch and decode its next Kafka batch
//! while Redis worked: the relay reached ~48k rows/s where `redis-cli
//! --pipe` of the same keys does ~490k/s (issue 26). Now `send` plans the
//! writes (pure: [`crate::request`]) and hands them to a worker task over a
//! channel one batch deep, then returns; the worker writes the batch while
//! the caller prepares the next one. Nothing changes for durability: the
//! checkpoint follows the ackers, and the worker answers a batch's acker
//! only once Redis has answered every write of it. [`Sink::flush`] waits
//! until every batch handed over has been answered.
//!
//! # Order
//! The worker is the only writer and takes one batch at a time, so at most
//! one pipeline is in flight on the connection: publish mode's messages
//! keep their order, and a retried batch is never overtaken by a later one.
//! Truncates cut a batch: the writes before one go in one pipeline, then its
//! SCAN/UNLINK loop runs, then the writes after it.
//!
//! A single server is written through one pipeline per batch over a
//! [`ConnectionManager`], which reconnects by itself. A Redis Cluster cannot
//! take a pipeline spanning slots, so there every command is sent at once,
//! concurrently, over the multiplexed cluster connection: still one round
//! trip of latency per batch.
//!
//! # Errors
//! Transient errors retry the whole step (pipeline or truncate) with
//! [`Backoff`] while the worker holds the batch; the channel then fills and
//! `send` waits, which back-pressures the pipeline as before. A definite
//! error fails the batch's acker at once, and the next `send` or `flush`
//! returns it, worded and classified as when `send` waited for it. From
//! then on the sink writes nothing more (the worker fails the batches
//! already handed over, `send` refuses new ones) until [`Sink::rewind`]
//! announces the replay from the checkpoint: a later batch written past a
//! failed one would, after that replay, reach subscribers out of order.
//! Dropping the sink stops the worker's retries; a batch it gave up that
//! way is failed as transient (the source replays it). A batch whose source
//! has started over by the time the worker reaches it is skipped, as the
//! capture's dispatcher does: the replay brings it again.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, RedisError, Script, Value as RedisValue};
use tokio::sync::{mpsc, oneshot, watch};
use walcast_sdk::retry::Backoff;
use walcast_sdk::{Acker, Batch, ChangeEvent, Lsn, Sink, SinkError};

use crate::config::{redact_url, ConfigError, RedisSinkConfig};
use crate::request::{
    version_key, Payload, Plan, RequestError, TemplateError, Write, VERSIONED_WRITE_LUA,
};
use crate::retry::{classify, Classification};

const SINK_NAME: &str = "redis";
/// SCAN hint for truncates: big enough to finish large tables in few round
/// trips, small enough not to stall the server on one call.
const TRUNCATE_SCAN_COUNT: u64 = 1_000;

/// Why the sink could not start or apply a batch.
#[derive(Debug, thiserror::Error)]
pub enum RedisSinkError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("redis sink: {0}")]
    Template(#[from] TemplateError),
    #[error("redis sink: cannot connect to {url}: {source}")]
    Connect {
        url: String,
        #[source]
        source: RedisError,
    },
    #[error("redis sink: {0}")]
    Request(#[from] RequestError),
    #[error(
        "redis sink: maxmemory reached: Redis refused a write to `{key}` ({table}, LSN {lsn}) with \
         \"OOM command not allowed\"; raise maxmemory, choose an evicting maxmemory-policy, or set ttl_secs"
    )]
    MaxMemory {
        key: String,
        table: String,
        lsn: Lsn,
        #[source]
        source: RedisError,
    },
    #[error("redis sink: writing `{key}` ({table}, LSN {lsn}) failed: {source}")]
    Write {
        key: String,
        table: String,
        lsn: Lsn,
        transient: bool,
        #[source]
        source: RedisError,
    },
    #[error(
        "redis sink: not writing this batch because an earlier batch failed ({reason}); \
         a later batch written past it would reach Redis out of order after the replay. \
         The pipeline replays from its last confirmed position once restarted"
    )]
    EarlierFailure { reason: String },
    #[error("redis sink: stopped before the batch was applied (Redis did not answer)")]
    Stopped,
    #[error("redis sink: the write worker has stopped")]
    WorkerGone,
}

impl RedisSinkError {
    pub fn is_transient(&self) -> bool {
        match self {
            RedisSinkError::Connect { source, .. } => classify(source) == Classification::Transient,
            RedisSinkError::Write { transient, .. } => *transient,
            RedisSinkError::Stopped => true,
            _ => false,
        }
    }

    fn into_sink_error(self) -> SinkError {
        let message = self.to_string();
        if self.is_transient() {
            SinkError::transient(SINK_NAME, message).with_source(self)
        } else {
            SinkError::definite(SINK_NAME, message).with_source(self)
        }
    }
}

/// Counters the daemon exports as metrics.
#[derive(Debug, Default)]
pub struct RedisSinkStats {
    pub batches_acked: AtomicU64,
    pub batches_failed: AtomicU64,
    /// Commands sent and answered without error.
    pub writes_applied: AtomicU64,
    /// Versioned writes refused because a newer version was stored.
    pub writes_stale: AtomicU64,
    /// Upserts written without some unchanged TOASTed column because no
    /// stored value existed (listed under `__walcast_incomplete`).
    pub writes_incomplete: AtomicU64,
    /// Attempts repeated after a transient error.
    pub retries: AtomicU64,
}

#[derive(Clone)]
enum Connection {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl Connection {
    /// One reply per command; `Err` when the round trip itself failed.
    async fn run(
        &mut self,
        cmds: Vec<Cmd>,
    ) -> Result<Vec<Result<RedisValue, RedisError>>, RedisError> {
        match self {
            Connection::Single(conn) => {
                let mut pipe = redis::pipe();
                for c in cmds {
                    pipe.add_command(c);
                }
                pipe.ignore_errors();
                let replies: Vec<RedisValue> = pipe.query_async(conn).await?;
                Ok(replies.into_iter().map(server_error_as_err).collect())
            }
            Connection::Cluster(conn) => {
                let replies = futures::future::join_all(cmds.iter().map(|c| {
                    let mut conn = conn.clone();
                    async move { c.query_async::<RedisValue>(&mut conn).await }
                }))
                .await;
                Ok(replies
                    .into_iter()
                    .map(|r| r.and_then(server_error_as_err))
                    .collect())
            }
        }
    }

    async fn ping(&mut self) -> bool {
        let ping = redis::cmd("PING");
        match self {
            Connection::Single(c) => ping.query_async::<String>(c).await.is_ok(),
            Connection::Cluster(c) => ping.query_async::<String>(c).await.is_ok(),
        }
    }
}

fn server_error_as_err(v: RedisValue) -> Result<RedisValue, RedisError> {
    match v {
        RedisValue::ServerError(e) => Err(e.into()),
        other => Ok(other),
    }
}

/// One round trip (or, for a truncate, one SCAN loop) retried as a whole.
#[derive(Clone, Copy)]
enum Step<'a> {
    Pipeline(&'a [Planned]),
    Truncate(&'a str, &'a Planned),
}

/// A write with what error messages need to say about it.
struct Planned {
    write: Write,
    table: String,
    lsn: Lsn,
}

/// See the module doc.
pub struct RedisSink {
    plan: Plan,
    /// To the worker, one batch deep.
    tx: mpsc::Sender<Command>,
    /// A clone of the worker's connection, for [`Sink::healthy`] only.
    conn: Connection,
    stats: Arc<RedisSinkStats>,
    /// The worker's definite failure that no `send` or `flush` has returned yet.
    unreported: Arc<Mutex<Option<RedisSinkError>>>,
    /// Why batches are refused until [`Sink::rewind`]: a batch failed.
    failed: Option<String>,
    /// Dropped with the sink, which stops the worker's retries.
    _stop: watch::Sender<()>,
}

/// What the sink asks of its worker, in order.
enum Command {
    Batch {
        acker: Acker,
        writes: Vec<Planned>,
    },
    /// Answered once everything handed over before has been answered.
    Flush(oneshot::Sender<()>),
    /// The source replays from its checkpoint: write again.
    Rewind(oneshot::Sender<()>),
}

impl RedisSink {
    /// Validates the config, connects and starts the write worker. Fails
    /// when the server cannot be reached or refuses the credentials, so
    /// that a broken setup shows at startup rather than as retries. Must
    /// run inside a tokio runtime.
    pub async fn connect(config: RedisSinkConfig) -> Result<Self, RedisSinkError> {
        config.validate()?;
        let plan = Plan::new(&config.mode, config.cluster)?;
        let mut conn = open(&config).await?;
        if !conn.ping().await {
            let source = RedisError::from(std::io::Error::other("PING got no answer"));
            return Err(RedisSinkError::Connect {
                url: redact_url(&config.urls[0]),
                source,
            });
        }
        let stats = Arc::<RedisSinkStats>::default();
        let unreported = Arc::new(Mutex::new(None));
        let (stop, stopped) = watch::channel(());
        let (tx, rx) = mpsc::channel(1);
        let worker = Worker {
            conn: conn.clone(),
            script: Script::new(VERSIONED_WRITE_LUA),
            use_eval: false,
            retry_initial: config.retry_initial,
            retry_max: config.retry_max,
            stats: Arc::clone(&stats),
            failed: None,
            unreported: Arc::clone(&unreported),
            stopped,
        };
        tokio::spawn(worker.run(rx));
        Ok(RedisSink {
            plan,
            tx,
            conn,
            stats,
            unreported,
            failed: None,
            _stop: stop,
        })
    }

    pub fn stats(&self) -> Arc<RedisSinkStats> {
        Arc::clone(&self.stats)
    }

    /// The batch's writes in order, with what error messages need.
    fn plan_batch(&self, events: &[ChangeEvent]) -> Result<Vec<Planned>, RedisSinkError> {
        let mut planned = Vec::with_capacity(events.len());
        for e in events {
            let table = e.table.qualified_name();
            for write in self.plan.writes(e)? {
                planned.push(Planned {
                    write,
                    table: table.clone(),
                    lsn: e.source.commit_lsn,
                });
            }
        }
        Ok(planned)
    }

    /// The worker's definite failure, once: from then on `self.failed`
    /// refuses batches.
    fn take_unreported(&mut self) -> Option<RedisSinkError> {
        let e = self
            .unreported
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()?;
        self.failed.get_or_insert_with(|| e.to_string());
        Some(e)
    }

    /// Hands the worker a command answered once everything before it is.
    async fn ask_worker(
        &mut self,
        command: impl FnOnce(oneshot::Sender<()>) -> Command,
    ) -> Result<(), SinkError> {
        let gone = || SinkError::definite(SINK_NAME, RedisSinkError::WorkerGone.to_string());
        let (done, answered) = oneshot::channel();
        self.tx.send(command(done)).await.map_err(|_| gone())?;
        answered.await.map_err(|_| gone())
    }
}

/// A connection to the configured server or cluster.
async fn open(config: &RedisSinkConfig) -> Result<Connection, RedisSinkError> {
    let timeout = config.timeout;
    let connect_err = |source| RedisSinkError::Connect {
        url: redact_url(&config.urls[0]),
        source,
    };
    if config.cluster {
        let client = redis::cluster::ClusterClient::builder(config.urls.clone())
            .connection_timeout(timeout)
            .response_timeout(timeout)
            .build()
            .map_err(connect_err)?;
        Ok(Connection::Cluster(
            client.get_async_connection().await.map_err(connect_err)?,
        ))
    } else {
        let client = redis::Client::open(config.urls[0].as_str()).map_err(connect_err)?;
        let mgr_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            .set_number_of_retries(1);
        Ok(Connection::Single(
            ConnectionManager::new_with_config(client, mgr_config)
                .await
                .map_err(connect_err)?,
        ))
    }
}

/// Writes the batches the sink hands over, one at a time, in order; see
/// the module doc.
struct Worker {
    conn: Connection,
    script: Script,
    /// Set after a NOSCRIPT: EVAL caches the script on whichever node runs it.
    use_eval: bool,
    retry_initial: Duration,
    retry_max: Duration,
    stats: Arc<RedisSinkStats>,
    /// Why later batches are failed unwritten until a rewind.
    failed: Option<String>,
    unreported: Arc<Mutex<Option<RedisSinkError>>>,
    /// Changes (to an error) when the sink is dropped.
    stopped: watch::Receiver<()>,
}

impl Worker {
    async fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        while let Some(command) = rx.recv().await {
            match command {
                Command::Batch { acker, writes } => self.answer(acker, &writes).await,
                Command::Flush(done) => {
                    let _ = done.send(());
                }
                Command::Rewind(done) => {
                    self.failed = None;
                    *self.unreported.lock().unwrap_or_else(|p| p.into_inner()) = None;
                    let _ = done.send(());
                }
            }
        }
    }

    /// Applies one batch (unless an earlier one failed) and answers its
    /// acker.
    async fn answer(&mut self, acker: Acker, writes: &[Planned]) {
        if acker.is_orphaned() {
            // Its source started over (or stopped): the replay brings the
            // batch again, and writing it now would only duplicate it.
            acker.ack();
            return;
        }
        if let Some(reason) = &self.failed {
            let e = RedisSinkError::EarlierFailure {
                reason: reason.clone(),
            };
            self.stats.batches_failed.fetch_add(1, Ordering::Relaxed);
            acker.fail(e.to_string());
            return;
        }
        match self.apply(writes).await {
            Ok(()) => {
                self.stats.batches_acked.fetch_add(1, Ordering::Relaxed);
                acker.ack();
            }
            Err(e) if e.is_transient() => {
                // Only `Stopped`: other transient errors are retried.
                tracing::warn!(error = %e, "redis sink: batch given up at shutdown");
                acker.fail_transient(e.to_string());
            }
            Err(e) => {
                self.stats.batches_failed.fetch_add(1, Ordering::Relaxed);
                tracing::error!(error = %e, "redis sink: batch failed");
                let reason = e.to_string();
                self.failed = Some(reason.clone());
                // Stored before the acker answers, so that whoever sees
                // the failure finds the error.
                self.unreported
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get_or_insert(e);
                acker.fail(reason);
            }
        }
    }

    /// Applies every write of the batch, retrying transient errors; `Err`
    /// is definite, or [`RedisSinkError::Stopped`].
    async fn apply(&mut self, planned: &[Planned]) -> Result<(), RedisSinkError> {
        // Truncates cut the batch: what comes before must land before the
        // scan, what comes after must land after it.
        for segment in planned.split_inclusive(|p| matches!(p.write, Write::DeleteMatching { .. }))
        {
            let (last, rest) = segment
                .split_last()
                .expect("split_inclusive yields non-empty slices");
            let (pipelined, truncate) = match &last.write {
                Write::DeleteMatching { pattern } => (rest, Some((pattern.as_str(), last))),
                _ => (segment, None),
            };
            if !pipelined.is_empty() {
                self.with_retry(Step::Pipeline(pipelined)).await?;
            }
            if let Some((pattern, p)) = truncate {
                self.with_retry(Step::Truncate(pattern, p)).await?;
            }
        }
        Ok(())
    }

    async fn with_retry(&mut self, step: Step<'_>) -> Result<(), RedisSinkError> {
        let mut backoff = Backoff::new(self.retry_initial, self.retry_max);
        loop {
            let outcome = match step {
                Step::Pipeline(writes) => self.run_pipelined(writes).await,
                Step::Truncate(pattern, p) => self.delete_matching(pattern, p).await,
            };
            match outcome {
                Ok(()) => return Ok(()),
                Err(e) if e.is_transient() => {
                    let delay = backoff.next_delay();
                    self.stats.retries.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        error = %e, attempt = backoff.attempts(), delay_ms = delay.as_millis() as u64,
                        "redis sink: transient error, retrying the batch"
                    );
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        // Only errs: the sink is gone, nobody waits.
                        _ = self.stopped.changed() => return Err(RedisSinkError::Stopped),
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn run_pipelined(&mut self, writes: &[Planned]) -> Result<(), RedisSinkError> {
        loop {
            let cmds: Vec<Cmd> = writes.iter().map(|p| self.command(&p.write)).collect();
            let replies = match self.conn.run(cmds).await {
                Ok(r) => r,
                Err(source) => return Err(write_error(&writes[0], source)),
            };
            let mut reload = false;
            let mut worst: Option<RedisSinkError> = None;
            let (mut applied, mut stale) = (0u64, 0u64);
            for (p, reply) in writes.iter().zip(replies) {
                match reply {
                    Ok(RedisValue::Int(0)) if is_versioned(&p.write) => stale += 1,
                    Ok(RedisValue::Int(2)) if is_versioned(&p.write) => {
                        applied += 1;
                        self.stats.writes_incomplete.fetch_add(1, Ordering::Relaxed);
                        if let Write::Upsert { key, keep, .. } = &p.write {
                            tracing::warn!(
                                key, table = %p.table, lsn = %p.lsn, columns = ?keep,
                                "redis sink: unchanged TOASTed columns have no stored value (no row yet, e.g. after a key change); \
                                 written without them and listed in `{}`; REPLICA IDENTITY FULL or a re-snapshot of the table supplies them",
                                walcast_sdk::toast::INCOMPLETE_FIELD
                            );
                        }
                    }
                    Ok(_) => applied += 1,
                    Err(source) => match classify(&source) {
                        Classification::ReloadScript => reload = true,
                        _ => {
                            let e = write_error(p, source);
                            // Keep the most definite error: it decides the batch.
                            if worst
                                .as_ref()
                                .is_none_or(|w| w.is_transient() && !e.is_transient())
                            {
                                worst = Some(e);
                            }
                        }
                    },
                }
            }
            self.stats
                .writes_applied
                .fetch_add(applied, Ordering::Relaxed);
            self.stats.writes_stale.fetch_add(stale, Ordering::Relaxed);
            if let Some(e) = worst {
                return Err(e);
            }
            if !reload {
                return Ok(());
            }
            if self.use_eval {
                // EVAL itself cannot answer NOSCRIPT; do not loop forever.
                return Ok(());
            }
            tracing::info!("redis sink: script cache empty on the server; resending with EVAL");
            self.use_eval = true;
        }
    }

    async fn delete_matching(&mut self, pattern: &str, p: &Planned) -> Result<(), RedisSinkError> {
        let Connection::Single(conn) = &mut self.conn else {
            return Ok(()); // Plan::new turns scans off in cluster mode.
        };
        let mut cursor = 0u64;
        let mut deleted = 0usize;
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(pattern)
                .arg("COUNT")
                .arg(TRUNCATE_SCAN_COUNT)
                .query_async(conn)
                .await
                .map_err(|e| write_error(p, e))?;
            if !keys.is_empty() {
                deleted += keys.len();
                redis::cmd("UNLINK")
                    .arg(&keys)
                    .query_async::<i64>(conn)
                    .await
                    .map_err(|e| write_error(p, e))?;
            }
            if next == 0 {
                break;
            }
            cursor = next;
        }
        tracing::info!(table = %p.table, lsn = %p.lsn, pattern, deleted, "redis sink: truncate removed the table's keys");
        Ok(())
    }

    fn command(&self, write: &Write) -> Cmd {
        match write {
            Write::Delete { key } => {
                let mut c = redis::cmd("DEL");
                c.arg(key);
                c
            }
            Write::Upsert {
                key,
                version,
                payload,
                ttl_secs,
                keep,
            } => {
                let mut c = self.script_cmd(key, *version);
                let action = match payload {
                    Payload::Json(_) => "set",
                    Payload::Hash(_) => "hset",
                };
                c.arg(action).arg(ttl_secs.unwrap_or(0)).arg(keep.len());
                for col in keep {
                    c.arg(col);
                }
                match payload {
                    Payload::Json(text) => {
                        c.arg(text);
                    }
                    Payload::Hash(fields) => {
                        for (f, v) in fields {
                            c.arg(f).arg(v);
                        }
                    }
                }
                c
            }
            Write::Tombstone {
                key,
                version,
                ttl_secs,
            } => {
                let mut c = self.script_cmd(key, *version);
                c.arg("del").arg(*ttl_secs);
                c
            }
            Write::Publish { channel, message } => {
                let mut c = redis::cmd("PUBLISH");
                c.arg(channel).arg(message);
                c
            }
            Write::StreamAdd {
                stream,
                maxlen,
                message,
            } => {
                let mut c = redis::cmd("XADD");
                c.arg(stream)
                    .arg("MAXLEN")
                    .arg("~")
                    .arg(*maxlen)
                    .arg("*")
                    .arg("message")
                    .arg(message);
                c
            }
            Write::DeleteMatching { .. } => unreachable!("truncates are run by delete_matching"),
        }
    }

    fn script_cmd(&self, key: &str, version: u64) -> Cmd {
        let mut c = if self.use_eval {
            let mut c = redis::cmd("EVAL");
            c.arg(VERSIONED_WRITE_LUA);
            c
        } else {
            let mut c = redis::cmd("EVALSHA");
            c.arg(self.script.get_hash());
            c
        };
        c.arg(2)
            .arg(key)
            .arg(version_key(key))
            .arg(version.to_string());
        c
    }
}

fn is_versioned(w: &Write) -> bool {
    matches!(w, Write::Upsert { .. } | Write::Tombstone { .. })
}

fn write_key(w: &Write) -> &str {
    match w {
        Write::Delete { key } | Write::Upsert { key, .. } | Write::Tombstone { key, .. } => key,
        Write::Publish { channel, .. } => channel,
        Write::StreamAdd { stream, .. } => stream,
        Write::DeleteMatching { pattern } => pattern,
    }
}

fn write_error(p: &Planned, source: RedisError) -> RedisSinkError {
    let key = write_key(&p.write).to_string();
    match classify(&source) {
        Classification::MaxMemory => RedisSinkError::MaxMemory {
            key,
            table: p.table.clone(),
            lsn: p.lsn,
            source,
        },
        c => RedisSinkError::Write {
            key,
            table: p.table.clone(),
            lsn: p.lsn,
            transient: matches!(c, Classification::Transient | Classification::ReloadScript),
            source,
        },
    }
}

#[async_trait]
impl Sink for RedisSink {
    fn name(&self) -> &str {
        SINK_NAME
    }

    /// Plans the batch and hands it to the worker; returns once the worker
    /// has taken it (at once, unless a batch is still waiting for the worker
    /// ahead of it). The acker is answered when Redis has answered every
    /// write. Returns the worker's definite failure of an earlier batch, and
    /// refuses batches after one, failing their ackers (see the module doc).
    async fn send(&mut self, batch: Batch) -> Result<(), SinkError> {
        // The worker's failure is returned once, as it happened; later
        // batches are refused with the reason.
        let unreported = self.take_unreported();
        if let Some(reason) = self.failed.clone() {
            let this_batch = RedisSinkError::EarlierFailure { reason };
            self.stats.batches_failed.fetch_add(1, Ordering::Relaxed);
            batch.acker.fail(this_batch.to_string());
            return Err(unreported.unwrap_or(this_batch).into_sink_error());
        }
        let writes = match self.plan_batch(&batch.events) {
            Ok(w) => w,
            Err(e) => {
                self.stats.batches_failed.fetch_add(1, Ordering::Relaxed);
                tracing::error!(error = %e, "redis sink: batch failed");
                self.failed = Some(e.to_string());
                batch.acker.fail(e.to_string());
                return Err(e.into_sink_error());
            }
        };
        self.tx
            .send(Command::Batch {
                acker: batch.acker,
                writes,
            })
            .await
            .map_err(|_| SinkError::definite(SINK_NAME, RedisSinkError::WorkerGone.to_string()))
    }

    /// A table without the key the template needs, or a template naming a
    /// column that is not a key column.
    fn refuses(&self, event: &ChangeEvent) -> Option<String> {
        self.plan
            .check(event)
            .err()
            .map(|e| RedisSinkError::from(e).to_string())
    }

    /// Waits until the worker has answered every batch handed over, and
    /// returns its definite failure of one that no `send` returned yet.
    async fn flush(&mut self) -> Result<(), SinkError> {
        self.ask_worker(Command::Flush).await?;
        match self.take_unreported() {
            Some(e) => Err(e.into_sink_error()),
            None => Ok(()),
        }
    }

    /// The replay from the checkpoint starts: batches handed over before
    /// are answered (failed, after a failure), and later ones written again.
    async fn rewind(&mut self) -> Result<(), SinkError> {
        self.ask_worker(Command::Rewind).await?;
        self.failed = None;
        Ok(())
    }

    async fn healthy(&self) -> bool {
        self.conn.clone().ping().await
    }
}
