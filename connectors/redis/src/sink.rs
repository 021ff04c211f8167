//! The Redis sink: applies each batch in one round trip and acknowledges it
//! only when every reply has arrived.
//!
//! A single server is written through one pipeline per batch over a
//! [`ConnectionManager`], which reconnects by itself. A Redis Cluster cannot
//! take a pipeline spanning slots, so there every command is sent at once,
//! concurrently, over the multiplexed cluster connection: still one round
//! trip of latency per batch. Transient errors retry the whole batch with
//! [`Backoff`] while the sink holds it, which back-pressures the pipeline;
//! definite errors fail the batch's acker and are returned.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, RedisError, Script, Value as RedisValue};
use walcast_sdk::retry::Backoff;
use walcast_sdk::{Batch, ChangeEvent, Lsn, Sink, SinkError};

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
}

impl RedisSinkError {
    pub fn is_transient(&self) -> bool {
        match self {
            RedisSinkError::Connect { source, .. } => classify(source) == Classification::Transient,
            RedisSinkError::Write { transient, .. } => *transient,
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

enum Connection {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl Connection {
    /// One reply per command; `Err` when the round trip itself failed.
    async fn run(
        &mut self,
        cmds: &[Cmd],
    ) -> Result<Vec<Result<RedisValue, RedisError>>, RedisError> {
        match self {
            Connection::Single(conn) => {
                let mut pipe = redis::pipe();
                for c in cmds {
                    pipe.add_command(c.clone());
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
    config: RedisSinkConfig,
    plan: Plan,
    conn: Connection,
    script: Script,
    /// Set after a NOSCRIPT: EVAL caches the script on whichever node runs it.
    use_eval: bool,
    stats: Arc<RedisSinkStats>,
}

impl RedisSink {
    /// Validates the config and connects. Fails when the server cannot be
    /// reached or refuses the credentials, so that a broken setup shows at
    /// startup rather than as retries.
    pub async fn connect(config: RedisSinkConfig) -> Result<Self, RedisSinkError> {
        config.validate()?;
        let plan = Plan::new(&config.mode, config.cluster)?;
        let timeout = config.timeout;
        let first_url = redact_url(&config.urls[0]);
        let connect_err = |source| RedisSinkError::Connect {
            url: first_url.clone(),
            source,
        };
        let conn = if config.cluster {
            let client = redis::cluster::ClusterClient::builder(config.urls.clone())
                .connection_timeout(timeout)
                .response_timeout(timeout)
                .build()
                .map_err(connect_err)?;
            Connection::Cluster(client.get_async_connection().await.map_err(connect_err)?)
        } else {
            let client = redis::Client::open(config.urls[0].as_str()).map_err(connect_err)?;
            let mgr_config = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(timeout))
                .set_response_timeout(Some(timeout))
                .set_number_of_retries(1);
            Connection::Single(
                ConnectionManager::new_with_config(client, mgr_config)
                    .await
                    .map_err(connect_err)?,
            )
        };
        let mut sink = RedisSink {
            config,
            plan,
            conn,
            script: Script::new(VERSIONED_WRITE_LUA),
            use_eval: false,
            stats: Arc::default(),
        };
        if !sink.conn.ping().await {
            let source = RedisError::from(std::io::Error::other("PING got no answer"));
            return Err(RedisSinkError::Connect {
                url: first_url,
                source,
            });
        }
        Ok(sink)
    }

    pub fn stats(&self) -> Arc<RedisSinkStats> {
        Arc::clone(&self.stats)
    }

    fn backoff(&self) -> Backoff {
        Backoff::new(self.config.retry_initial, self.config.retry_max)
    }

    /// Applies every write of the batch, retrying transient errors.
    async fn apply(&mut self, events: &[ChangeEvent]) -> Result<(), RedisSinkError> {
        let mut planned = Vec::with_capacity(events.len());
        for e in events {
            for write in self.plan.writes(e)? {
                planned.push(Planned {
                    write,
                    table: e.table.qualified_name(),
                    lsn: e.source.commit_lsn,
                });
            }
        }
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
        let mut backoff = self.backoff();
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
                    tokio::time::sleep(delay).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn run_pipelined(&mut self, writes: &[Planned]) -> Result<(), RedisSinkError> {
        loop {
            let cmds: Vec<Cmd> = writes.iter().map(|p| self.command(&p.write)).collect();
            let replies = match self.conn.run(&cmds).await {
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

    /// Returns once the batch is applied (acker answered `ack`) or has
    /// failed definitively (acker answered `fail`, and the error returned).
    async fn send(&mut self, batch: Batch) -> Result<(), SinkError> {
        match self.apply(&batch.events).await {
            Ok(()) => {
                self.stats.batches_acked.fetch_add(1, Ordering::Relaxed);
                batch.acker.ack();
                Ok(())
            }
            Err(e) => {
                self.stats.batches_failed.fetch_add(1, Ordering::Relaxed);
                tracing::error!(error = %e, "redis sink: batch failed");
                batch.acker.fail(e.to_string());
                Err(e.into_sink_error())
            }
        }
    }

    /// A table without the key the template needs, or a template naming a
    /// column that is not a key column.
    fn refuses(&self, event: &ChangeEvent) -> Option<String> {
        self.plan
            .check(event)
            .err()
            .map(|e| RedisSinkError::from(e).to_string())
    }

    /// Nothing is buffered: `send` returns only once its batch is answered.
    async fn flush(&mut self) -> Result<(), SinkError> {
        Ok(())
    }

    async fn healthy(&self) -> bool {
        let mut conn = match &self.conn {
            Connection::Single(c) => Connection::Single(c.clone()),
            Connection::Cluster(c) => Connection::Cluster(c.clone()),
        };
        conn.ping().await
    }
}
