//! Exactly-once across crashes: where the last committed Kafka transaction
//! ended in the Postgres stream.
//!
//! # The invariant
//!
//! The slot's confirmed LSN moves only after a Kafka transaction commits,
//! so a crash between the commit and the confirmation makes Postgres send
//! again transactions that Kafka already holds. To tell them apart, every
//! Kafka transaction also writes one record to the offsets topic (key: the
//! pipeline's `transactional_id`, value: the [`Position`] of the last change
//! it carries). Because that record is part of the same Kafka transaction,
//! it is visible to a `read_committed` reader exactly when the changes are.
//!
//! On start, after `init_transactions` has fenced and aborted whatever the
//! predecessor left open, the sink reads the last committed position back
//! and drops every replayed change at or before it. A Postgres transaction
//! is replayed with the same changes in the same order (pgoutput decodes the
//! same WAL), so (commit LSN, order within the transaction) names a change
//! across restarts, also when a large transaction was split over several
//! Kafka transactions.
//!
//! Snapshot reads carry no such position and are never skipped: a crash in
//! the middle of a snapshot resumes from its last acknowledged chunk (see
//! the daemon's snapshot module) and may repeat that chunk's rows.
//!
//! The topic is compacted with one partition, so reading it back costs one
//! record per pipeline. Each pipeline has a topic of its own by default
//! (`walcast.offsets.<transactional_id>`): a `read_committed` reader cannot
//! pass a transaction still open on a partition, so on a topic shared by
//! several pipelines another pipeline's open transaction would stall this
//! one's start (up to that transaction's timeout) and could make it read an
//! older record of its own (duplicates, never a skipped change). Sharing one
//! topic, `offsets_topic = "..."` on every pipeline, stays possible; versions
//! before this default used the shared `walcast.offsets`, and a pipeline
//! whose own topic holds no position yet reads its position from there once.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};
use walcast_sdk::{ChangeEvent, Lsn, SnapshotMarker};

use crate::config::TopicCreationConfig;

/// The topic every pipeline shared before each had its own: read for a
/// pipeline's position when its own topic has none yet.
pub const SHARED_OFFSETS_TOPIC: &str = "walcast.offsets";

/// The offsets topic of a pipeline unless configured otherwise:
/// `walcast.offsets.<transactional_id>`, characters Kafka does not allow in
/// a topic name replaced by `_`, cut to Kafka's 249-character limit.
pub fn default_topic(transactional_id: &str) -> String {
    let id: String = transactional_id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect();
    let mut t = format!("{SHARED_OFFSETS_TOPIC}.{id}");
    t.truncate(249);
    t
}

/// How long reading the offsets back may take before start-up fails (and
/// is retried by the pipeline).
const READ_TIMEOUT: Duration = Duration::from_secs(60);

/// A change's place in the Postgres stream, stable across replays.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Position {
    /// Commit LSN of the change's transaction.
    pub commit_lsn: u64,
    /// 1-based order of the change within its transaction.
    pub total_order: u64,
}

impl Position {
    /// The position of a streamed change; `None` for snapshot reads and for
    /// events that carry no transaction order.
    pub fn of(event: &ChangeEvent) -> Option<Position> {
        if event.source.snapshot != SnapshotMarker::False {
            return None;
        }
        let order = event.transaction.as_ref()?.total_order;
        Some(Position {
            commit_lsn: event.source.commit_lsn.0,
            total_order: order,
        })
    }
}

impl std::fmt::Display for Position {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "change #{} of the transaction committed at {}",
            self.total_order,
            Lsn(self.commit_lsn)
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum OffsetsError {
    #[error("exactly-once: cannot read offsets topic `{topic}`: {source}")]
    Read {
        topic: String,
        #[source]
        source: KafkaError,
    },
    /// The broker answered for the topic with an error other than "it does
    /// not exist": reading it as "no position" would republish everything.
    #[error(
        "exactly-once: the broker refuses to describe offsets topic `{topic}`: {code}{advice}"
    )]
    Metadata {
        topic: String,
        code: rdkafka::types::RDKafkaErrorCode,
        advice: &'static str,
    },
    /// The broker refused the fetch itself (Describe allowed, Read not).
    #[error(
        "exactly-once: the broker refuses to let walcast read offsets topic `{topic}`: {code}; \
         grant the producer's principal Read on it (and Describe, Write, Create)"
    )]
    ReadRefused {
        topic: String,
        code: rdkafka::types::RDKafkaErrorCode,
    },
    #[error("exactly-once: reading offsets topic `{topic}` did not finish within {secs} s (is the broker reachable?)")]
    Timeout { topic: String, secs: u64 },
    #[error("exactly-once: offsets topic `{topic}` holds a record for `{key}` that is not a walcast position: {reason}")]
    Corrupt {
        topic: String,
        key: String,
        reason: String,
    },
}

impl OffsetsError {
    /// Transient unless a restart cannot change the answer: a corrupt
    /// record, an invalid topic name, or a refusal by the broker's ACLs
    /// (retrying those would loop; the operator must grant access).
    pub fn is_transient(&self) -> bool {
        match self {
            OffsetsError::Corrupt { .. } => false,
            OffsetsError::Metadata { code, .. } | OffsetsError::ReadRefused { code, .. } => {
                !is_definite(*code)
            }
            OffsetsError::Read { source, .. } => {
                !source.rdkafka_error_code().is_some_and(is_definite)
            }
            OffsetsError::Timeout { .. } => true,
        }
    }
}

fn is_definite(code: rdkafka::types::RDKafkaErrorCode) -> bool {
    use rdkafka::types::RDKafkaErrorCode as C;
    matches!(
        code,
        C::TopicAuthorizationFailed
            | C::ClusterAuthorizationFailed
            | C::GroupAuthorizationFailed
            | C::SaslAuthenticationFailed
            | C::InvalidTopic
    )
}

/// The record that goes into the offsets topic with a Kafka transaction.
pub fn record(transactional_id: &str, position: Position) -> (Vec<u8>, Vec<u8>) {
    (
        transactional_id.as_bytes().to_vec(),
        serde_json::to_vec(&position).expect("a position always serialises"),
    )
}

/// How the offsets topic is created: one partition is plenty (one small
/// record per pipeline after compaction), and compaction keeps only the
/// latest position of each pipeline.
pub fn topic_creation(replication_factor: i32) -> TopicCreationConfig {
    TopicCreationConfig {
        partitions: 1,
        replication_factor,
        config: BTreeMap::from([("cleanup.policy".to_string(), "compact".to_string())]),
        topics: BTreeMap::new(),
    }
}

/// Reads the last committed position of `transactional_id`, or `None` if
/// it never committed one (or the topic does not exist yet).
///
/// `client` is the producer's configuration; only the properties that
/// concern connecting (security, SASL, SSL, timeouts) are carried over to
/// the reader. Blocks: call it off the async threads.
pub fn read_last(
    client: &ClientConfig,
    topic: &str,
    transactional_id: &str,
) -> Result<Option<Position>, OffsetsError> {
    let read = |source| OffsetsError::Read {
        topic: topic.to_string(),
        source,
    };
    let mut cfg = ClientConfig::new();
    // `config_map` shows secrets as a placeholder (rdkafka sanitises
    // `sasl.password` and the like): take the keys from it and each value
    // from `get`, or a SASL reader would log in with the placeholder.
    for k in client.config_map().into_keys() {
        let Some(v) = client.get(k) else { continue };
        let connection = [
            "security.",
            "sasl.",
            "ssl.",
            "socket.",
            "client.",
            "broker.",
        ]
        .iter()
        .any(|p| k.starts_with(p));
        if connection || k == "bootstrap.servers" {
            cfg.set(k, v);
        }
    }
    cfg.set("group.id", "walcast-offsets-reader")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .set("isolation.level", "read_committed")
        .set("allow.auto.create.topics", "false");
    let consumer: BaseConsumer = cfg.create().map_err(read)?;
    let metadata = consumer
        .fetch_metadata(Some(topic), READ_TIMEOUT)
        .map_err(read)?;
    // Only "the topic does not exist" means "no position yet"; any other
    // answer (an ACL refusal above all) must not be read as one.
    let partitions: Vec<i32> = match metadata.topics().first() {
        None => return Ok(None),
        Some(t) => match t.error().map(rdkafka::types::RDKafkaErrorCode::from) {
            None => t.partitions().iter().map(|p| p.id()).collect(),
            Some(rdkafka::types::RDKafkaErrorCode::UnknownTopicOrPartition) => return Ok(None),
            Some(code) => {
                return Err(OffsetsError::Metadata {
                    topic: topic.to_string(),
                    code,
                    advice: match code {
                        rdkafka::types::RDKafkaErrorCode::TopicAuthorizationFailed => {
                            "; grant the producer's principal Describe and Read on it (and Write, Create)"
                        }
                        _ => "",
                    },
                })
            }
        },
    };
    let mut assignment = TopicPartitionList::new();
    for &p in &partitions {
        let (low, high) = consumer
            .fetch_watermarks(topic, p, READ_TIMEOUT)
            .map_err(read)?;
        if high > low {
            assignment
                .add_partition_offset(topic, p, Offset::Beginning)
                .map_err(read)?;
        }
    }
    let mut pending = assignment.count();
    if pending == 0 {
        return Ok(None);
    }
    consumer.assign(&assignment).map_err(read)?;
    let deadline = Instant::now() + READ_TIMEOUT;
    let mut last = None;
    while pending > 0 {
        if Instant::now() > deadline {
            return Err(OffsetsError::Timeout {
                topic: topic.to_string(),
                secs: READ_TIMEOUT.as_secs(),
            });
        }
        match consumer.poll(Duration::from_millis(200)) {
            None => {}
            Some(Err(KafkaError::PartitionEOF(_))) => pending -= 1,
            Some(Err(e)) => {
                return Err(match e.rdkafka_error_code() {
                    Some(code) if is_definite(code) => OffsetsError::ReadRefused {
                        topic: topic.to_string(),
                        code,
                    },
                    _ => read(e),
                })
            }
            Some(Ok(m)) => {
                if m.key() != Some(transactional_id.as_bytes()) {
                    continue;
                }
                // Compaction tombstones (null values) carry nothing.
                let Some(value) = m.payload() else { continue };
                let position: Position =
                    serde_json::from_slice(value).map_err(|e| OffsetsError::Corrupt {
                        topic: topic.to_string(),
                        key: transactional_id.to_string(),
                        reason: e.to_string(),
                    })?;
                last = Some(position);
            }
        }
    }
    Ok(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_order_by_commit_then_order_and_round_trip() {
        let a = Position {
            commit_lsn: 0x20,
            total_order: 9,
        };
        let b = Position {
            commit_lsn: 0x30,
            total_order: 1,
        };
        assert!(a < b);
        assert!(
            a < Position {
                commit_lsn: 0x20,
                total_order: 10
            }
        );
        let (key, value) = record("pipe-1", b);
        assert_eq!(key, b"pipe-1");
        assert_eq!(serde_json::from_slice::<Position>(&value).unwrap(), b);
    }
}

#[cfg(test)]
mod topic_tests {
    use super::*;

    #[test]
    fn each_pipeline_has_its_own_topic_by_default() {
        assert_eq!(default_topic("orders-eos"), "walcast.offsets.orders-eos");
        assert_ne!(default_topic("a"), default_topic("b"));
        assert_eq!(default_topic("a b/c"), "walcast.offsets.a_b_c");
        assert_eq!(default_topic(&"x".repeat(400)).len(), 249);
    }
}
