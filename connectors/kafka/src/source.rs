//! The consumer-group source of a relay: hands out raw records with an
//! [`Acker`] each and commits a partition's offset only up to the first
//! record not yet acknowledged.
//!
//! # The offset invariant
//!
//! Each assigned partition has its own [`AckTracker`]; every record handed
//! out is registered there with position `offset + 1` (Kafka's committed
//! offset is the next one to read). The tracker resolves acknowledgements in
//! offset order, so its checkpoint is the highest offset below which every
//! record of the partition is acknowledged, and only that is committed. A
//! failed record stops its partition's checkpoint for good; the relay must
//! restart and re-read from the committed offset. Delivery is therefore
//! at-least-once: records acknowledged above a gap are read again.
//!
//! # Rebalances
//!
//! Before partitions are revoked, [`ConsumerContext::pre_rebalance`] commits
//! what is acknowledged on them (synchronously, on the consumer's thread)
//! and forgets their trackers. Records of those partitions still in flight
//! are not waited for: their later acknowledgements go nowhere, and the new
//! owner re-reads them from the committed offset. Waiting inside the
//! callback would block the consumer (and the tokio worker polling it) for
//! as long as the slowest sink, so walcast bounds rebalance time instead and
//! accepts the duplicates. When the assignment is lost (session timeout)
//! nothing is committed: another member already owns the partitions.
//!
//! Records fetched for a partition that is no longer assigned when they are
//! registered are dropped rather than handed out; their new owner reads them.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Headers, Message};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::ClientContext;
use walcast_sdk::{AckTracker, Acker};

use crate::config::{ConfigError, KafkaSourceConfig};
use crate::delivery::is_transient;

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// librdkafka refused the configuration or the subscription.
    #[error("kafka source (group `{group}`): cannot start the consumer: {source}")]
    Client {
        group: String,
        #[source]
        source: KafkaError,
    },
    #[error("kafka source (group `{group}`): cannot read records: {source}")]
    Consume {
        group: String,
        transient: bool,
        #[source]
        source: KafkaError,
    },
    #[error("kafka source (group `{group}`): cannot commit offsets: {source}")]
    Commit {
        group: String,
        #[source]
        source: KafkaError,
    },
    /// A relay could not copy a refused record to its dead-letter topic.
    #[error("kafka: cannot write to the dead-letter topic `{topic}`: {source}; check that it exists and that the relay may write to it")]
    DeadLetter {
        topic: String,
        #[source]
        source: KafkaError,
    },
    /// A record was not applied by the sink: the partition cannot commit past
    /// it; restart the relay to re-read from the committed offset.
    #[error("kafka source: record of topic `{topic}` partition {partition} was not applied, offsets stop at {committed:?}: {reason}")]
    NotApplied {
        topic: String,
        partition: i32,
        committed: Option<i64>,
        reason: String,
    },
}

impl SourceError {
    pub fn is_transient(&self) -> bool {
        match self {
            SourceError::Config(_)
            | SourceError::Client { .. }
            | SourceError::DeadLetter { .. } => false,
            SourceError::Consume { transient, .. } => *transient,
            // A restart from the committed offsets is the remedy.
            SourceError::Commit { .. } | SourceError::NotApplied { .. } => true,
        }
    }
}

/// One Kafka record, as read. The relay decodes key and value itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceRecord {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub headers: Vec<(String, Option<Vec<u8>>)>,
    /// The record's timestamp in ms since the Unix epoch, when it has one.
    pub timestamp_ms: Option<i64>,
}

impl SourceRecord {
    fn from_message(m: &BorrowedMessage<'_>) -> Self {
        SourceRecord {
            topic: m.topic().to_string(),
            partition: m.partition(),
            offset: m.offset(),
            key: m.key().map(<[u8]>::to_vec),
            value: m.payload().map(<[u8]>::to_vec),
            headers: m
                .headers()
                .map(|h| {
                    h.iter()
                        .map(|h| (h.key.to_string(), h.value.map(<[u8]>::to_vec)))
                        .collect()
                })
                .unwrap_or_default(),
            timestamp_ms: m.timestamp().to_millis(),
        }
    }

    /// The value of header `key`, if present and not null.
    pub fn header(&self, key: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(k, _)| k == key)
            .and_then(|(_, v)| v.as_deref())
    }
}

/// Records read together. `ackers[i]` answers for `records[i]`; to hand the
/// whole batch to a sink under one acker, use [`KafkaSource::join`].
#[derive(Debug)]
pub struct SourceBatch {
    pub records: Vec<SourceRecord>,
    pub ackers: Vec<Acker>,
}

impl SourceBatch {
    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }
}

struct PartitionAcks {
    tracker: AckTracker<i64>,
    committed: Option<i64>,
}

impl PartitionAcks {
    fn new() -> Self {
        PartitionAcks {
            tracker: AckTracker::new(),
            committed: None,
        }
    }
}

/// Assigned partitions (topic -> partition -> acks), shared between the
/// source and the rebalance callbacks.
#[derive(Default)]
struct Assignment {
    partitions: HashMap<String, HashMap<i32, PartitionAcks>>,
}

#[derive(Clone, Default)]
struct Shared(Arc<Mutex<Assignment>>);

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Assignment> {
        // A panic while holding the lock leaves only counters behind; the
        // trackers stay consistent, so carry on.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Offsets ready to commit, plus the partitions that can no longer advance.
struct Committable {
    offsets: Vec<(String, i32, i64)>,
    failure: Option<SourceError>,
}

impl Assignment {
    fn committable(&mut self, only: Option<&TopicPartitionList>) -> Committable {
        let mut offsets = Vec::new();
        let mut failure = None;
        for (topic, parts) in &mut self.partitions {
            for (&partition, acks) in parts.iter_mut() {
                if let Some(tpl) = only {
                    if tpl.find_partition(topic, partition).is_none() {
                        continue;
                    }
                }
                if let Err(f) = acks.tracker.poll() {
                    failure.get_or_insert(SourceError::NotApplied {
                        topic: topic.clone(),
                        partition,
                        committed: acks.committed,
                        reason: f.reason,
                    });
                }
                if let Some(&cp) = acks.tracker.checkpoint() {
                    if acks.committed.is_none_or(|c| cp > c) {
                        offsets.push((topic.clone(), partition, cp));
                    }
                }
            }
        }
        Committable { offsets, failure }
    }

    fn mark_committed(&mut self, offsets: &[(String, i32, i64)]) {
        for (topic, partition, offset) in offsets {
            if let Some(acks) = self
                .partitions
                .get_mut(topic)
                .and_then(|p| p.get_mut(partition))
            {
                acks.committed = Some(acks.committed.map_or(*offset, |c| c.max(*offset)));
            }
        }
    }
}

fn to_tpl(offsets: &[(String, i32, i64)]) -> TopicPartitionList {
    let mut tpl = TopicPartitionList::with_capacity(offsets.len());
    for (topic, partition, offset) in offsets {
        // Only fails for an invalid offset, which a checkpoint never is.
        let _ = tpl.add_partition_offset(topic, *partition, Offset::Offset(*offset));
    }
    tpl
}

struct SourceContext {
    shared: Shared,
    group: String,
}

impl ClientContext for SourceContext {
    fn error(&self, error: KafkaError, reason: &str) {
        tracing::warn!(group = %self.group, error = %error, reason, "kafka consumer");
    }
}

impl ConsumerContext for SourceContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Revoke(tpl) = rebalance else {
            return;
        };
        let ready = {
            let mut a = self.shared.lock();
            let ready = a.committable(Some(tpl));
            for elem in tpl.elements() {
                if let Some(parts) = a.partitions.get_mut(elem.topic()) {
                    parts.remove(&elem.partition());
                }
            }
            ready
        };
        if ready.offsets.is_empty() {
            return;
        }
        if consumer.assignment_lost() {
            tracing::warn!(group = %self.group, "kafka source: assignment lost; acknowledged offsets not committed");
            return;
        }
        match consumer.commit(&to_tpl(&ready.offsets), CommitMode::Sync) {
            Ok(()) => {
                tracing::info!(group = %self.group, partitions = ready.offsets.len(), "kafka source: committed before revoke")
            }
            Err(e) => {
                tracing::warn!(group = %self.group, error = %e, "kafka source: commit before revoke failed; the new owner re-reads")
            }
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                let mut a = self.shared.lock();
                for elem in tpl.elements() {
                    a.partitions
                        .entry(elem.topic().to_string())
                        .or_default()
                        .entry(elem.partition())
                        .or_insert_with(PartitionAcks::new);
                }
            }
            Rebalance::Revoke(_) => {}
            Rebalance::Error(e) => {
                tracing::warn!(group = %self.group, error = %e, "kafka source: rebalance error")
            }
        }
    }
}

/// How often a source at its in-flight cap looks again for answers.
const FULL_RECHECK: Duration = Duration::from_millis(2);

/// A consumer in a group, reading batches of raw records.
pub struct KafkaSource {
    consumer: Arc<StreamConsumer<SourceContext>>,
    shared: Shared,
    group: String,
    max_batch_records: usize,
    max_batch_wait: Duration,
    max_in_flight: usize,
    /// Batch ackers from [`Self::join`], resolved in order into the per-record
    /// ackers they stand for.
    joined: AckTracker<u64>,
    next_join: u64,
    held: VecDeque<(u64, Vec<Acker>)>,
    /// The last transient consumer error of the last [`Self::next_batch`]
    /// call, if any (see there).
    consume_trouble: Option<String>,
}

impl KafkaSource {
    /// Creates the consumer and subscribes; partitions arrive with the
    /// group's first rebalance, inside [`Self::next_batch`].
    pub fn new(config: KafkaSourceConfig) -> Result<Self, SourceError> {
        config.validate()?;
        let group = config.group_id.clone();
        let shared = Shared::default();
        let context = SourceContext {
            shared: shared.clone(),
            group: group.clone(),
        };
        let consumer: StreamConsumer<SourceContext> = config
            .client_config()
            .create_with_context(context)
            .map_err(|source| SourceError::Client {
                group: group.clone(),
                source,
            })?;
        let names = config.subscription_names();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        consumer
            .subscribe(&names)
            .map_err(|source| SourceError::Client {
                group: group.clone(),
                source,
            })?;
        Ok(KafkaSource {
            consumer: Arc::new(consumer),
            shared,
            group,
            max_batch_records: config.max_batch_records,
            max_batch_wait: config.max_batch_wait,
            max_in_flight: config.max_in_flight_records,
            joined: AckTracker::new(),
            next_join: 0,
            held: VecDeque::new(),
            consume_trouble: None,
        })
    }

    /// The last transient consumer error the last [`Self::next_batch`] call
    /// read past (brokers down, a transport failure, a subscribed topic not
    /// created yet), for the pipeline's status: librdkafka reconnects by
    /// itself, so such errors are not returned.
    pub fn consume_trouble(&self) -> Option<&str> {
        self.consume_trouble.as_deref()
    }

    /// Reads up to `max_batch_records` records, waiting at most
    /// `max_batch_wait`; the batch may be empty. While
    /// `max_in_flight_records` are handed out and not committed it reads
    /// nothing and returns an empty batch after the wait: acknowledge and
    /// call [`Self::commit_acknowledged`] to make room. Not cancel-safe: records
    /// read by a cancelled call are lost to this consumer until the next
    /// rebalance or restart (their partitions' offsets stop before them), so
    /// call it to completion; it always returns within the wait.
    pub async fn next_batch(&mut self) -> Result<SourceBatch, SourceError> {
        let deadline = tokio::time::Instant::now() + self.max_batch_wait;
        self.consume_trouble = None;
        let mut records = Vec::new();
        let mut ackers = Vec::new();
        // Acknowledged records hold no memory: only those the sinks have
        // not answered count against the cap, whether or not their offsets
        // are committed yet (commits come once a second; counting until
        // then capped a relay at `max_in_flight_records` per second).
        let room = loop {
            self.resolve_acknowledged();
            let room = self.max_in_flight.saturating_sub(self.in_flight_records());
            if room > 0 {
                break room;
            }
            if tokio::time::Instant::now() >= deadline {
                return Ok(SourceBatch { records, ackers });
            }
            tokio::time::sleep(FULL_RECHECK.min(self.max_batch_wait)).await;
        };
        while records.len() < self.max_batch_records.min(room) {
            let record = match tokio::time::timeout_at(deadline, self.consumer.recv()).await {
                Err(_) => break,
                Ok(Ok(m)) => SourceRecord::from_message(&m),
                Ok(Err(source)) => {
                    // A subscribed topic that does not exist yet appears
                    // once the capture publishes to it: wait, do not fail.
                    let transient = source.rdkafka_error_code().is_none_or(|c| {
                        is_transient(c)
                            || matches!(
                                c,
                                rdkafka::types::RDKafkaErrorCode::UnknownTopicOrPartition
                                    | rdkafka::types::RDKafkaErrorCode::UnknownTopic
                            )
                    });
                    let err = SourceError::Consume {
                        group: self.group.clone(),
                        transient,
                        source,
                    };
                    if transient {
                        // Error events (all brokers down, a transport
                        // failure) queue up in the consumer while a broker
                        // is away, and librdkafka reconnects by itself:
                        // read on past them. Returning each one made the
                        // caller back off once per queued event, up to 30 s
                        // each, and a relay stalled for good after a broker
                        // restart (oracle seed 9011). The context has
                        // logged it; the status shows it.
                        tracing::debug!(error = %err, "kafka source: reading on past a transient consumer error");
                        self.consume_trouble = Some(err.to_string());
                        continue;
                    }
                    if records.is_empty() {
                        return Err(err);
                    }
                    tracing::warn!(error = %err, "kafka source: returning the records read so far");
                    break;
                }
            };
            let acker = {
                let mut a = self.shared.lock();
                a.partitions
                    .get_mut(&record.topic)
                    .and_then(|p| p.get_mut(&record.partition))
                    .map(|acks| acks.tracker.register(Some(record.offset + 1), 1))
            };
            if let Some(acker) = acker {
                records.push(record);
                ackers.push(acker);
            }
        }
        Ok(SourceBatch { records, ackers })
    }

    /// One acker standing for `ackers` (typically a batch's), for a sink
    /// that answers per batch. Answering it answers all of them, at the next
    /// [`Self::commit_acknowledged`].
    pub fn join(&mut self, ackers: Vec<Acker>) -> Acker {
        // Joins are registered in order, so the tracker's sequence numbers
        // equal this counter and serve as the position.
        let seq = self.next_join;
        self.next_join += 1;
        let acker = self.joined.register(Some(seq), ackers.len());
        debug_assert_eq!(acker.sequence(), seq);
        self.held.push_back((seq, ackers));
        acker
    }

    fn resolve_joined(&mut self) {
        let failed = self.joined.poll().err();
        if let Some(&delivered) = self.joined.checkpoint() {
            while self.held.front().is_some_and(|(s, _)| *s <= delivered) {
                let (_, ackers) = self.held.pop_front().expect("front exists");
                ackers.into_iter().for_each(Acker::ack);
            }
        }
        if let Some(f) = failed {
            if self.held.front().is_some_and(|(s, _)| *s == f.sequence) {
                let (_, ackers) = self.held.pop_front().expect("front exists");
                for a in ackers {
                    a.fail(f.reason.clone());
                }
            }
        }
    }

    /// Applies the answers that arrived (batch ackers into their records'
    /// ackers, those into their partitions' checkpoints) without
    /// committing, so that [`Self::in_flight_records`] counts only what the
    /// sinks still hold. A failed record stays in its tracker, and
    /// [`Self::commit_acknowledged`] reports it.
    fn resolve_acknowledged(&mut self) {
        self.resolve_joined();
        let mut a = self.shared.lock();
        for acks in a.partitions.values_mut().flat_map(|p| p.values_mut()) {
            let _ = acks.tracker.poll();
        }
    }

    /// Commits, per partition, the offset below which every record is
    /// acknowledged. Returns how many partitions moved. Partitions that
    /// advanced are committed even when another partition has a failed
    /// record, which is then reported as [`SourceError::NotApplied`].
    pub async fn commit_acknowledged(&mut self) -> Result<usize, SourceError> {
        self.resolve_joined();
        let ready = self.shared.lock().committable(None);
        let moved = ready.offsets.len();
        if moved > 0 {
            let consumer = Arc::clone(&self.consumer);
            let tpl = to_tpl(&ready.offsets);
            // A synchronous commit blocks the thread until the coordinator answers.
            tokio::task::spawn_blocking(move || consumer.commit(&tpl, CommitMode::Sync))
                .await
                .expect("commit task does not panic")
                .map_err(|source| SourceError::Commit {
                    group: self.group.clone(),
                    source,
                })?;
            self.shared.lock().mark_committed(&ready.offsets);
        }
        match ready.failure {
            Some(f) => Err(f),
            None => Ok(moved),
        }
    }

    /// Records handed out and not yet acknowledged (as of the last
    /// [`Self::next_batch`] or [`Self::commit_acknowledged`]).
    pub fn in_flight_records(&self) -> usize {
        self.shared
            .lock()
            .partitions
            .values()
            .flat_map(|p| p.values())
            .map(|a| a.tracker.in_flight_events())
            .sum()
    }

    /// The partitions currently assigned to this member.
    pub fn assignment(&self) -> Vec<(String, i32)> {
        let a = self.shared.lock();
        let mut v: Vec<_> = a
            .partitions
            .iter()
            .flat_map(|(t, p)| p.keys().map(move |p| (t.clone(), *p)))
            .collect();
        v.sort();
        v
    }

    /// Commits what is acknowledged and leaves the group, so the remaining
    /// members take the partitions over without waiting for a session
    /// timeout.
    pub async fn shutdown(mut self) -> Result<(), SourceError> {
        let result = self.commit_acknowledged().await.map(|_| ());
        let consumer = self.consumer;
        // Leaving the group blocks (it runs the revoke callback and waits
        // for the coordinator).
        tokio::task::spawn_blocking(move || {
            consumer.unsubscribe();
            drop(consumer);
        })
        .await
        .expect("close task does not panic");
        result
    }
}
