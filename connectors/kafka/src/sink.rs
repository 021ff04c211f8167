//! The Kafka sink: publishes change events, keyed by primary key, and
//! acknowledges a batch only when the broker has confirmed every record of
//! it (see [`crate::delivery`]).
//!
//! Per-row order: records of one key go to one partition (the key decides
//! the partition) and the idempotent producer keeps their order across
//! retries. A delete is followed by a tombstone with the same key.
//!
//! Outages: librdkafka retries for ever (`message.timeout.ms = 0`). Records
//! wait in its queue while each holds a permit of `max_in_flight_records`;
//! when the permits run out `send` waits, capture stalls, the replication
//! slot's flush LSN stops, and all of it resumes when the broker is back.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::OwnedHeaders;
use rdkafka::producer::{BaseRecord, Producer, PurgeConfig, ThreadedProducer};
use tokio::sync::Semaphore;
use walcast_sdk::retry::Backoff;
use walcast_sdk::{Acker, Batch, ChangeEvent, EncodeError, EventEncoder, Lsn, Op, Sink, SinkError};

use crate::config::{ConfigError, DeliveryMode, KafkaSinkConfig};
use crate::delivery::{DeliveryContext, DeliveryError, RecordToken};
use crate::offsets::{self, Position};
use crate::record;
use crate::topic::{Route, TopicAdmin, TopicError, TopicRouter, TopicStatus};
use crate::transaction::TransactionMarkers;

const SINK_NAME: &str = "kafka";
/// How long to wait before offering a record again when librdkafka's own
/// queue is full (only if `queue.buffering.max.messages` was set below
/// `max_in_flight_records`).
const QUEUE_FULL_WAIT: Duration = Duration::from_millis(10);
const HEALTH_TIMEOUT: Duration = Duration::from_secs(5);
/// Backoff while the schema registry is unavailable (see `KafkaSink::encode`).
const ENCODE_RETRY_INITIAL: Duration = Duration::from_millis(500);
const ENCODE_RETRY_MAX: Duration = Duration::from_secs(30);

/// Why the sink could not be built or checked.
#[derive(Debug, thiserror::Error)]
pub enum KafkaSinkError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// librdkafka refused the configuration (an unknown or invalid property
    /// in `[sink.kafka.producer]`).
    #[error("kafka: cannot create the producer: {source}")]
    Client {
        #[source]
        source: KafkaError,
    },
    #[error(transparent)]
    Topic(#[from] TopicError),
}

/// Publishes batches of change events to Kafka.
pub struct KafkaSink {
    producer: ThreadedProducer<DeliveryContext>,
    context: DeliveryContext,
    encoder: Arc<dyn EventEncoder>,
    router: TopicRouter,
    admin: Option<TopicAdmin>,
    transactions: Option<(Arc<str>, TransactionMarkers)>,
    tombstones_on_delete: bool,
    skip_truncate: bool,
    in_flight: Arc<Semaphore>,
    max_in_flight: u32,
    /// Set in exactly-once mode.
    transactional: Option<Transactional>,
    /// Where events the encoder refuses as invalid go instead of halting.
    dead_letter: Option<DeadLetter>,
    /// The outbox table whose inserts are routed as messages, and the
    /// prefix of logical messages routed the same way.
    outbox: Option<crate::outbox::OutboxConfig>,
    /// Where heartbeats and schema changes go (pipeline settings).
    notice_topics: NoticeTopics,
    /// Events written to the dead-letter topic (the daemon exports it as
    /// `walcast_dead_letters_total`).
    dead_lettered: Arc<std::sync::atomic::AtomicU64>,
    /// Ends the task that purges the queues after refused credentials.
    _auth_watch: AuthWatch,
}

/// The topics of the pipeline's notices (see [`walcast_sdk::notice`]);
/// a notice whose topic is unset is dropped by this sink.
#[derive(Debug, Clone, Default)]
pub struct NoticeTopics {
    /// Heartbeats (`heartbeat.topic`).
    pub heartbeat: Option<String>,
    /// Schema changes and captured DDL (`schema_changes.topic`).
    pub schema_changes: Option<String>,
}

/// The dead-letter policy: an event whose values do not fit its schema is
/// written, as Debezium JSON, to `topic` with the error in a header, and
/// the pipeline goes on. Never used for transient failures (an unreachable
/// registry), which are retried.
struct DeadLetter {
    topic: Arc<str>,
    encoder: walcast_sdk::JsonEncoder,
}

/// Refused credentials leave records in librdkafka's queues for ever (it
/// keeps reconnecting); a task purges them so that they fail, with the
/// authentication error, and the pipeline stops with it. Dropping this
/// ends the task.
struct AuthWatch(Arc<tokio::sync::Notify>);

impl AuthWatch {
    fn start(context: &DeliveryContext, producer: &ThreadedProducer<DeliveryContext>) -> Self {
        let stop = Arc::new(tokio::sync::Notify::new());
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let failed = Arc::clone(&context.auth_failed);
            let producer = producer.clone();
            let stopped = Arc::clone(&stop);
            rt.spawn(async move {
                let purge = tokio::select! {
                    _ = failed.notified() => true,
                    _ = stopped.notified() => false,
                };
                if purge {
                    tracing::error!("kafka: purging queued records after refused credentials");
                }
                // Off the async threads: the last handle's drop joins the
                // producer's polling thread.
                let _ = tokio::task::spawn_blocking(move || {
                    if purge {
                        producer.purge(PurgeConfig::default().queue().inflight());
                    }
                    drop(producer);
                })
                .await;
            });
        }
        AuthWatch(stop)
    }
}

impl Drop for AuthWatch {
    fn drop(&mut self) {
        self.0.notify_one();
    }
}

struct Transactional {
    timeout: Duration,
    initialized: bool,
    id: String,
    offsets_topic: Arc<str>,
    /// With the default `offsets_topic`: the topic every pipeline shared
    /// before, read when the pipeline's own topic holds no position yet.
    shared_offsets_topic: Option<Arc<str>>,
    /// Where the offsets topic is read back from and created with.
    client: rdkafka::ClientConfig,
    replication_factor: i32,
    /// The last change Kafka holds: replayed changes up to it are dropped
    /// (see [`crate::offsets`]). Read once at start, then kept current.
    resume_after: Option<Position>,
    /// Why a transaction failed, once one has. Batches queued behind it
    /// are refused from then on: committing one would write a later
    /// position to the offsets topic, and a restarted daemon would take the
    /// failed batch's changes as already in Kafka and drop them. Only a
    /// replay from the slot's confirmed position (below the failed batch),
    /// announced by [`Sink::rewind`], delivers again.
    failed: Option<String>,
}

impl KafkaSink {
    /// Builds the producer. Connects lazily: an unreachable broker shows up
    /// as stalled deliveries and in [`Sink::healthy`], not here.
    pub fn new(
        config: KafkaSinkConfig,
        encoder: Arc<dyn EventEncoder>,
    ) -> Result<Self, KafkaSinkError> {
        config.validate()?;
        let client = config.client_config();
        let context = DeliveryContext::default();
        let producer: ThreadedProducer<DeliveryContext> = client
            .create_with_context(context.clone())
            .map_err(|source| KafkaSinkError::Client { source })?;
        let admin = if config.create_topics {
            Some(TopicAdmin::new(&client, config.topic_creation.clone())?)
        } else {
            None
        };
        let max_in_flight = config.max_in_flight_records as u32;
        let auth_watch = AuthWatch::start(&context, &producer);
        Ok(KafkaSink {
            _auth_watch: auth_watch,
            producer,
            context,
            encoder,
            router: TopicRouter::new(config.topic_prefix.clone(), config.routes.clone())?,
            admin,
            transactions: config
                .transaction_topic
                .map(|t| (Arc::from(t.as_str()), TransactionMarkers::new())),
            tombstones_on_delete: config.tombstones_on_delete,
            skip_truncate: config.skip_truncate,
            in_flight: Arc::new(Semaphore::new(max_in_flight as usize)),
            max_in_flight,
            transactional: match config.delivery {
                DeliveryMode::AtLeastOnce => None,
                DeliveryMode::ExactlyOnce {
                    transaction_timeout,
                    transactional_id,
                    offsets_topic,
                } => Some(Transactional {
                    timeout: transaction_timeout,
                    initialized: false,
                    // Unset: a topic of its own, and the one all pipelines
                    // shared before, to read an older position from once.
                    shared_offsets_topic: offsets_topic
                        .is_none()
                        .then(|| Arc::from(offsets::SHARED_OFFSETS_TOPIC)),
                    offsets_topic: Arc::from(
                        offsets_topic
                            .unwrap_or_else(|| offsets::default_topic(&transactional_id))
                            .as_str(),
                    ),
                    id: transactional_id,
                    client: client.clone(),
                    replication_factor: config.topic_creation.replication_factor,
                    resume_after: None,
                    failed: None,
                }),
            },
            dead_letter: None,
            outbox: config.outbox.clone(),
            notice_topics: NoticeTopics::default(),
            dead_lettered: Arc::default(),
        })
    }

    /// How many events went to the dead-letter topic so far.
    pub fn dead_lettered(&self) -> Arc<std::sync::atomic::AtomicU64> {
        Arc::clone(&self.dead_lettered)
    }

    /// Publishes the pipeline's heartbeats and schema changes to these
    /// topics.
    pub fn with_notice_topics(mut self, topics: NoticeTopics) -> Self {
        self.notice_topics = topics;
        self
    }

    /// Routes events the encoder refuses as invalid
    /// (`EncodeError::Invalid`) to `topic` instead of failing the batch.
    pub fn with_dead_letter(mut self, topic: impl Into<String>) -> Self {
        self.dead_letter = Some(DeadLetter {
            topic: Arc::from(topic.into().as_str()),
            encoder: walcast_sdk::JsonEncoder::default(),
        });
        self
    }

    /// For `walcast check`: which topics the given tables map to and
    /// whether they exist or would be created. Creates nothing.
    pub async fn check(
        config: &KafkaSinkConfig,
        tables: &[walcast_sdk::TableName],
    ) -> Result<Vec<TopicStatus>, KafkaSinkError> {
        Self::check_with_notices(config, tables, &NoticeTopics::default()).await
    }

    /// [`KafkaSink::check`], with the topics of the pipeline's heartbeats
    /// and schema changes (labelled `heartbeats`, `schema changes`).
    pub async fn check_with_notices(
        config: &KafkaSinkConfig,
        tables: &[walcast_sdk::TableName],
        notices: &NoticeTopics,
    ) -> Result<Vec<TopicStatus>, KafkaSinkError> {
        config.validate()?;
        let router = TopicRouter::new(config.topic_prefix.clone(), config.routes.clone())?;
        let mut topics: Vec<(String, String)> = tables
            .iter()
            .map(|t| (t.to_string(), router.name(&t.schema, &t.name)))
            .collect();
        if let Some(t) = &config.transaction_topic {
            topics.push(("transaction metadata".to_string(), t.clone()));
        }
        if let Some(t) = &notices.heartbeat {
            topics.push(("heartbeats".to_string(), t.clone()));
        }
        if let Some(t) = &notices.schema_changes {
            topics.push(("schema changes".to_string(), t.clone()));
        }
        let admin = TopicAdmin::new(&config.client_config(), config.topic_creation.clone())?;
        Ok(admin.check(&topics, config.create_topics).await?)
    }

    /// Waits for every outstanding delivery, then destroys the producer off
    /// the async threads (destroying it blocks while librdkafka shuts down).
    pub async fn close(mut self) -> Result<(), SinkError> {
        let flushed = self.flush().await;
        let producer = self.producer;
        tokio::task::spawn_blocking(move || drop(producer))
            .await
            .expect("dropping the producer does not panic");
        flushed
    }

    /// Records accepted and not yet confirmed or failed by the broker.
    pub fn in_flight_records(&self) -> usize {
        self.max_in_flight as usize - self.in_flight.available_permits()
    }

    fn check_failure(&self) -> Result<(), SinkError> {
        match self.context.failure() {
            None => Ok(()),
            Some(err) => Err(delivery_sink_error(err)),
        }
    }

    async fn send_events(
        &mut self,
        events: &[ChangeEvent],
        acker: Option<&Acker>,
    ) -> Result<(), SinkError> {
        let resume_after = self.transactional.as_ref().and_then(|t| t.resume_after);
        let mut skipped = 0u64;
        for event in events {
            if let (Some(after), Some(at)) = (resume_after, Position::of(event)) {
                if at <= after {
                    // Already in Kafka, with its transaction markers: only
                    // the markers' counts need to see it.
                    if let Some((_, markers)) = &mut self.transactions {
                        markers.observe(event);
                    }
                    skipped += 1;
                    continue;
                }
            }
            if let Some(n) = walcast_sdk::notice::read(event) {
                self.send_notice(event, n, acker).await?;
                continue;
            }
            if event.op == Op::Truncate && self.skip_truncate {
                continue;
            }
            if let Some(outbox) = self.outbox.as_ref().filter(|o| o.matches(event)) {
                let planned = crate::outbox::plan(outbox, event)
                    .map_err(|e| SinkError::definite(SINK_NAME, e.to_string()).with_source(e))?;
                if let Some(rec) = planned {
                    self.send_outbox(event, rec, acker).await?;
                }
                continue;
            }
            let Route {
                topic,
                table: what,
                key_field,
            } = self.router.route(&event.table);
            let key_field = key_field.as_ref();
            self.ensure_topic(&topic).await?;
            if self.transactions.is_some() {
                self.send_markers(event, acker).await?;
            }
            let lsn = event.source.commit_lsn;
            let rec = match self.encode(event, key_field, false, &what, lsn).await {
                Ok(rec) => rec,
                Err(e @ EncodeError::Invalid { .. }) if self.dead_letter.is_some() => {
                    self.send_dead_letter(event, &e, &topic, &what, acker)
                        .await?;
                    continue;
                }
                Err(e) => return Err(encode_sink_error(e, &what, lsn)),
            };
            self.produce(
                &topic,
                rec.key.as_deref(),
                rec.value.as_deref(),
                record::headers(event),
                &what,
                lsn,
                acker,
            )
            .await?;
            if event.op == Op::Delete && self.tombstones_on_delete {
                let rec = self
                    .encode(event, key_field, true, &what, lsn)
                    .await
                    .map_err(|e| encode_sink_error(e, &what, lsn))?;
                // A key-less table has nothing for compaction to forget.
                if rec.key.is_some() {
                    self.produce(
                        &topic,
                        rec.key.as_deref(),
                        None,
                        record::headers(event),
                        &what,
                        lsn,
                        acker,
                    )
                    .await?;
                }
            }
        }
        if skipped > 0 {
            tracing::info!(
                skipped,
                up_to = %resume_after.expect("skips need a position"),
                "exactly-once: dropped replayed changes that Kafka already holds"
            );
        }
        Ok(())
    }

    /// Produces a notice: a heartbeat or schema change to its topic, a
    /// logical message of the outbox prefix as an outbox message. JSON
    /// whatever the pipeline's format; acknowledged with the batch.
    async fn send_notice(
        &mut self,
        event: &ChangeEvent,
        notice: walcast_sdk::notice::Notice<'_>,
        acker: Option<&Acker>,
    ) -> Result<(), SinkError> {
        use walcast_sdk::notice::{Notice, NoticeKind};
        let lsn = event.source.commit_lsn;
        let (topic, key, value) = match notice {
            Notice::Message {
                prefix,
                content,
                transactional,
            } => {
                let Some(outbox) = self.outbox.as_ref().filter(|o| o.matches_prefix(prefix)) else {
                    return Ok(());
                };
                let rec = crate::outbox::plan_message(
                    outbox,
                    prefix,
                    content,
                    transactional,
                    event.source.lsn,
                )
                .map_err(|e| SinkError::definite(SINK_NAME, e.to_string()).with_source(e))?;
                return self.send_outbox(event, rec, acker).await;
            }
            Notice::Document { kind, key, value } => {
                let topic = match kind {
                    NoticeKind::Heartbeat => self.notice_topics.heartbeat.as_deref(),
                    _ => self.notice_topics.schema_changes.as_deref(),
                };
                let Some(topic) = topic else {
                    return Ok(());
                };
                (Arc::<str>::from(topic), key, value)
            }
        };
        self.ensure_topic(&topic).await?;
        let what: Arc<str> = Arc::from(event.table.name.as_str());
        self.produce(
            &topic,
            Some(key.as_bytes()),
            Some(value.as_bytes()),
            record::headers(event),
            &what,
            lsn,
            acker,
        )
        .await
    }

    /// Produces an outbox message: acknowledged with the batch like any
    /// record (and inside its Kafka transaction in exactly-once mode).
    async fn send_outbox(
        &mut self,
        event: &ChangeEvent,
        rec: crate::outbox::OutboxRecord,
        acker: Option<&Acker>,
    ) -> Result<(), SinkError> {
        let topic: Arc<str> = Arc::from(rec.topic.as_str());
        self.ensure_topic(&topic).await?;
        let mut headers = record::headers(event);
        for (k, v) in &rec.headers {
            headers = headers.insert(rdkafka::message::Header {
                key: k,
                value: v.as_deref(),
            });
        }
        let what: Arc<str> = Arc::from(format!("outbox {}", rec.topic).as_str());
        self.produce(
            &topic,
            rec.key.as_deref(),
            rec.value.as_deref(),
            headers,
            &what,
            event.source.commit_lsn,
            acker,
        )
        .await
    }

    /// Writes a refused event to the dead-letter topic. Its delivery
    /// counts for the batch like any record, so the event is acknowledged
    /// only once Kafka has it somewhere.
    async fn send_dead_letter(
        &mut self,
        event: &ChangeEvent,
        error: &EncodeError,
        topic: &Arc<str>,
        what: &Arc<str>,
        acker: Option<&Acker>,
    ) -> Result<(), SinkError> {
        let dead = self.dead_letter.as_ref().expect("dead-letter policy");
        let dlq = Arc::clone(&dead.topic);
        let lsn = event.source.commit_lsn;
        let rec = dead
            .encoder
            .encode(event)
            .await
            .map_err(|e| encode_sink_error(e, what, lsn))?;
        let message = format!("cannot encode event of {what} at LSN {lsn}: {error}");
        tracing::warn!(
            dead_letter_topic = %dlq,
            topic = %topic,
            error = %message,
            "kafka: event routed to the dead-letter topic"
        );
        self.ensure_topic(&dlq).await?;
        let headers = record::dead_letter_headers(event, &message, topic);
        self.produce(
            &dlq,
            rec.key.as_deref(),
            rec.value.as_deref(),
            headers,
            what,
            lsn,
            acker,
        )
        .await?;
        self.dead_lettered
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Makes sure the topic exists (with `create_topics`), waiting out a
    /// broker that cannot be reached, as deliveries do; a refusal, or
    /// credentials the broker refused meanwhile, fail at once.
    async fn ensure_topic(&mut self, topic: &str) -> Result<(), SinkError> {
        let Some(admin) = &mut self.admin else {
            return Ok(());
        };
        let mut backoff = Backoff::new(ENCODE_RETRY_INITIAL, ENCODE_RETRY_MAX);
        loop {
            match admin.ensure(topic).await {
                Ok(()) => return Ok(()),
                Err(e) if e.is_transient() => {
                    if let Some(f) = self.context.failure() {
                        return Err(delivery_sink_error(f));
                    }
                    let delay = backoff.next_delay();
                    tracing::warn!(topic, error = %e, retry_in = ?delay, "kafka: cannot make sure the topic exists; retrying");
                    tokio::time::sleep(delay).await;
                }
                Err(e) => return Err(topic_sink_error(e)),
            }
        }
    }

    /// Encodes an event, waiting out a schema registry outage: a transient
    /// failure (unreachable, 5xx, 429 after the client's own attempts) is
    /// retried with backoff for as long as it lasts, holding the batch —
    /// and so the capture, by back-pressure — as a broker outage does.
    /// Failing the batch instead would stop the pipeline for good, since a
    /// failed acknowledgement is definite. Refusals (an incompatible or
    /// invalid schema, a value that does not fit) are returned at once, for
    /// the caller's invalid-value policy.
    async fn encode(
        &self,
        event: &ChangeEvent,
        key_field: Option<&walcast_sdk::KeyField>,
        tombstone: bool,
        what: &str,
        lsn: Lsn,
    ) -> Result<walcast_sdk::EncodedRecord, EncodeError> {
        let mut backoff = Backoff::new(ENCODE_RETRY_INITIAL, ENCODE_RETRY_MAX);
        loop {
            let encoded = self
                .encoder
                .encode_with_key_field(event, key_field, tombstone)
                .await;
            match encoded {
                Ok(rec) => return Ok(rec),
                Err(e) if e.is_transient() => {
                    let delay = backoff.next_delay();
                    tracing::warn!(table = %what, lsn = %lsn, error = %e, retry_in = ?delay,
                        "kafka: cannot encode an event while the schema registry is unavailable; holding the pipeline and retrying");
                    tokio::time::sleep(delay).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn send_markers(
        &mut self,
        event: &ChangeEvent,
        acker: Option<&Acker>,
    ) -> Result<(), SinkError> {
        let Some((topic, markers)) = &mut self.transactions else {
            return Ok(());
        };
        let topic = Arc::clone(topic);
        let records = markers.observe(event);
        self.produce_markers(&topic, records, acker).await
    }

    async fn produce_markers(
        &mut self,
        topic: &Arc<str>,
        records: Vec<crate::transaction::MarkerRecord>,
        acker: Option<&Acker>,
    ) -> Result<(), SinkError> {
        if records.is_empty() {
            return Ok(());
        }
        self.ensure_topic(topic).await?;
        let what: Arc<str> = Arc::from("transaction metadata");
        for m in records {
            let headers = record::headers_for(m.commit_lsn, m.tx_id);
            self.produce(
                topic,
                Some(&m.key),
                Some(&m.value),
                headers,
                &what,
                m.commit_lsn,
                acker,
            )
            .await?;
        }
        Ok(())
    }

    /// Exactly-once: the batch is one Kafka transaction and its acker is
    /// answered by the commit, not by the records' delivery reports (a
    /// delivered record of an aborted transaction is not durable).
    async fn send_transaction(
        &mut self,
        events: &[ChangeEvent],
        acker: Acker,
    ) -> Result<(), SinkError> {
        let t = self.transactional.as_ref().expect("exactly-once mode");
        let timeout = t.timeout;
        if let Some(reason) = &t.failed {
            let e = SinkError::definite(
                SINK_NAME,
                format!(
                    "exactly-once: not committing this batch because an earlier transaction failed ({reason}); \
                     a later commit would move the position in the offsets topic past the failed changes. \
                     Restart walcast to replay from the last confirmed position"
                ),
            );
            acker.fail(e.to_string());
            return Err(e);
        }
        match self.run_transaction(events, timeout).await {
            Ok(()) => {
                acker.ack();
                Ok(())
            }
            Err(e) => {
                if let Some(t) = &mut self.transactional {
                    t.failed = Some(e.to_string());
                }
                // An outage that outlasted the transaction: the capture
                // replays from its confirmed position after a rewind.
                if e.is_transient() {
                    acker.fail_transient(e.to_string());
                } else {
                    acker.fail(e.to_string());
                }
                Err(e)
            }
        }
    }

    async fn run_transaction(
        &mut self,
        events: &[ChangeEvent],
        timeout: Duration,
    ) -> Result<(), SinkError> {
        self.check_failure()?;
        if !self.transactional.as_ref().is_some_and(|t| t.initialized) {
            let p = self.producer.clone();
            // Blocks until the coordinator has fenced any predecessor with
            // the same transactional id and aborted its open transaction.
            blocking(move || p.init_transactions(timeout))
                .await
                .map_err(|e| transaction_sink_error("initialising transactions", e))?;
            self.load_offsets().await?;
            if let Some(t) = &mut self.transactional {
                t.initialized = true;
            }
        }
        self.producer
            .begin_transaction()
            .map_err(|e| transaction_sink_error("beginning a transaction", e))?;
        // A Postgres transaction's END marker goes out with the batch that
        // starts the next one (see `transaction`), so that a transaction
        // split over batches still gets one BEGIN/END pair with its count.
        let sent = self.send_events(events, None).await;
        let resume_after = self.transactional.as_ref().and_then(|t| t.resume_after);
        let reached = events
            .iter()
            .filter_map(Position::of)
            .max()
            .filter(|p| Some(*p) > resume_after);
        let sent = match (sent, reached) {
            (Ok(()), Some(position)) => self.send_offsets(position).await,
            (other, _) => other,
        };
        let outcome = match sent {
            Ok(()) => {
                let p = self.producer.clone();
                blocking(move || p.commit_transaction(timeout))
                    .await
                    .map_err(|e| transaction_sink_error("committing", e))
            }
            Err(e) => Err(e),
        };
        if let (Ok(()), Some(position), Some(t)) = (&outcome, reached, &mut self.transactional) {
            t.resume_after = Some(position);
        }
        if outcome.is_err() {
            let p = self.producer.clone();
            if let Err(abort) = blocking(move || p.abort_transaction(timeout)).await {
                tracing::warn!(error = %abort, "kafka: aborting the failed transaction failed too");
            }
        }
        outcome
    }

    /// Creates the offsets topic if needed and reads back where the last
    /// committed transaction of this `transactional_id` ended. Runs after
    /// `init_transactions`, which settled the predecessor's transaction.
    async fn load_offsets(&mut self) -> Result<(), SinkError> {
        let t = self.transactional.as_ref().expect("exactly-once mode");
        let (client, topic, id) = (t.client.clone(), Arc::clone(&t.offsets_topic), t.id.clone());
        let mut admin = TopicAdmin::new(&client, offsets::topic_creation(t.replication_factor))
            .map_err(topic_sink_error)?;
        admin.ensure(&topic).await.map_err(topic_sink_error)?;
        let transient_or_definite = |e: offsets::OffsetsError| {
            let message = e.to_string();
            if e.is_transient() {
                SinkError::transient(SINK_NAME, message).with_source(e)
            } else {
                SinkError::definite(SINK_NAME, message).with_source(e)
            }
        };
        let (c, i) = (client.clone(), id.clone());
        let mut position = blocking(move || offsets::read_last(&c, &topic, &i))
            .await
            .map_err(transient_or_definite)?;
        if let (None, Some(shared)) = (position, t.shared_offsets_topic.clone()) {
            let shared_name = Arc::clone(&shared);
            position = blocking(move || offsets::read_last(&client, &shared, &id))
                .await
                .map_err(transient_or_definite)?;
            if let Some(p) = position {
                tracing::info!(
                    offsets_topic = %t.offsets_topic,
                    shared_offsets_topic = %shared_name,
                    "exactly-once: position {p} read from the offsets topic pipelines shared before; \
                     from now on it is written to this pipeline's own topic"
                );
            }
        }
        match position {
            Some(p) => tracing::info!(
                offsets_topic = %t.offsets_topic,
                "exactly-once: Kafka holds everything up to {p}; replayed changes up to it are dropped"
            ),
            None => tracing::info!(
                offsets_topic = %t.offsets_topic,
                "exactly-once: no committed position yet for this transactional_id"
            ),
        }
        if let Some(t) = &mut self.transactional {
            t.resume_after = position;
        }
        Ok(())
    }

    /// Writes the batch's last position inside the open transaction.
    async fn send_offsets(&mut self, position: Position) -> Result<(), SinkError> {
        let t = self.transactional.as_ref().expect("exactly-once mode");
        let topic = Arc::clone(&t.offsets_topic);
        let (key, value) = offsets::record(&t.id, position);
        let what: Arc<str> = Arc::from("exactly-once offsets");
        let lsn = Lsn(position.commit_lsn);
        self.produce(
            &topic,
            Some(&key),
            Some(&value),
            OwnedHeaders::new(),
            &what,
            lsn,
            None,
        )
        .await
    }

    /// Hands one record to librdkafka, after taking a permit of the
    /// in-flight budget (this is where an outage makes `send` wait).
    #[allow(clippy::too_many_arguments)]
    async fn produce(
        &self,
        topic: &Arc<str>,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        headers: OwnedHeaders,
        what: &Arc<str>,
        lsn: Lsn,
        acker: Option<&Acker>,
    ) -> Result<(), SinkError> {
        let permit = Arc::clone(&self.in_flight)
            .acquire_owned()
            .await
            .expect("the in-flight semaphore is never closed");
        let size = key.map_or(0, <[u8]>::len) + value.map_or(0, <[u8]>::len);
        let token = Box::new(RecordToken {
            acker: acker.cloned(),
            permit,
            topic: Arc::clone(topic),
            what: Arc::clone(what),
            lsn,
            size,
        });
        let mut rec: BaseRecord<'_, [u8], [u8], Box<RecordToken>> =
            BaseRecord::with_opaque_to(topic, token).headers(headers);
        if let Some(k) = key {
            rec = rec.key(k);
        }
        if let Some(v) = value {
            rec = rec.payload(v);
        }
        loop {
            match self.producer.send(rec) {
                Ok(()) => return Ok(()),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    rec = back;
                    tokio::time::sleep(QUEUE_FULL_WAIT).await;
                }
                Err((err, back)) => {
                    let code = err.rdkafka_error_code().unwrap_or(RDKafkaErrorCode::Fail);
                    let err = DeliveryError::new(code, topic, what.to_string(), lsn, size);
                    if let Some(a) = back.delivery_opaque.acker {
                        a.fail(err.to_string());
                    }
                    self.context.record_failure(err.clone());
                    return Err(delivery_sink_error(err));
                }
            }
        }
    }
}

#[async_trait]
impl Sink for KafkaSink {
    fn name(&self) -> &str {
        SINK_NAME
    }

    /// Heartbeats, schema changes and outbox messages are Kafka records;
    /// those this sink has no topic for are dropped in `send_notice`.
    fn takes_notices(&self) -> bool {
        true
    }

    async fn send(&mut self, batch: Batch) -> Result<(), SinkError> {
        let Batch { events, acker } = batch;
        if let Err(e) = self.check_failure() {
            acker.fail(e.to_string());
            return Err(e);
        }
        if self.transactional.is_some() {
            return self.send_transaction(&events, acker).await;
        }
        match self.send_events(&events, Some(&acker)).await {
            // The records' clones of the acker answer for them; this one
            // only says that every record was handed over.
            Ok(()) => {
                acker.ack();
                Ok(())
            }
            Err(e) => {
                acker.fail(e.to_string());
                Err(e)
            }
        }
    }

    /// Exactly-once after a failed transaction: a new producer session (a
    /// producer whose transaction timed out may be unusable), initialised
    /// again, which fences and aborts what the old one left open and reads
    /// the position back from the offsets topic, so the replay drops what
    /// Kafka already holds and commits the rest.
    async fn rewind(&mut self) -> Result<(), SinkError> {
        let Some(t) = &mut self.transactional else {
            return Ok(());
        };
        let Some(reason) = t.failed.take() else {
            return Ok(());
        };
        tracing::warn!(%reason, "exactly-once: starting a new producer session for the replay after a failed transaction");
        let context = DeliveryContext::default();
        let producer: ThreadedProducer<DeliveryContext> =
            t.client.create_with_context(context.clone()).map_err(|e| {
                SinkError::transient(
                    SINK_NAME,
                    format!("exactly-once: creating a new producer: {e}"),
                )
            })?;
        t.initialized = false;
        t.resume_after = None;
        let old = std::mem::replace(&mut self.producer, producer);
        self._auth_watch = AuthWatch::start(&context, &self.producer);
        self.context = context;
        self.in_flight = Arc::new(Semaphore::new(self.max_in_flight as usize));
        // Dropping a producer purges and joins its thread: not on the runtime.
        let _ = tokio::task::spawn_blocking(move || drop(old)).await;
        Ok(())
    }

    /// Waits until the broker has answered for every record sent so far.
    /// During an outage this waits until the broker is back.
    async fn flush(&mut self) -> Result<(), SinkError> {
        // Outside a transaction there is nowhere to write a marker in
        // exactly-once mode; the END waits for the next batch there.
        if let (Some((topic, markers)), None) = (&mut self.transactions, &self.transactional) {
            let topic = Arc::clone(topic);
            let end: Vec<_> = markers.close().into_iter().collect();
            self.produce_markers(&topic, end, None).await?;
        }
        let all = self
            .in_flight
            .acquire_many(self.max_in_flight)
            .await
            .expect("the in-flight semaphore is never closed");
        drop(all);
        self.check_failure()
    }

    async fn healthy(&self) -> bool {
        let producer = self.producer.clone();
        tokio::task::spawn_blocking(move || {
            producer
                .client()
                .fetch_metadata(None, HEALTH_TIMEOUT)
                .is_ok()
        })
        .await
        .unwrap_or(false)
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f)
        .await
        .expect("blocking producer call does not panic")
}

fn transaction_sink_error(step: &str, err: KafkaError) -> SinkError {
    let fatal = match &err {
        KafkaError::Transaction(e) => e.is_fatal(),
        _ => false,
    };
    let message = format!("exactly-once: {step} failed: {err}");
    if fatal {
        let message = format!("{message} (the producer is fenced or broken: does another pipeline use the same transactional_id?)");
        SinkError::definite(SINK_NAME, message).with_source(err)
    } else {
        SinkError::transient(SINK_NAME, message).with_source(err)
    }
}

fn delivery_sink_error(err: DeliveryError) -> SinkError {
    let message = err.to_string();
    if err.is_transient() {
        SinkError::transient(SINK_NAME, message).with_source(err)
    } else {
        SinkError::definite(SINK_NAME, message).with_source(err)
    }
}

fn topic_sink_error(err: TopicError) -> SinkError {
    let message = err.to_string();
    if err.is_transient() {
        SinkError::transient(SINK_NAME, message).with_source(err)
    } else {
        SinkError::definite(SINK_NAME, message).with_source(err)
    }
}

fn encode_sink_error(err: EncodeError, what: &str, lsn: Lsn) -> SinkError {
    let message = format!("cannot encode event of {what} at LSN {lsn}: {err}");
    if err.is_transient() {
        SinkError::transient(SINK_NAME, message).with_source(err)
    } else {
        SinkError::definite(SINK_NAME, message).with_source(err)
    }
}
