//! Delivery reports: the only thing that may acknowledge a batch.
//!
//! Every record handed to librdkafka carries a `RecordToken` holding a
//! clone of its batch's [`Acker`] and one permit of the sink's in-flight
//! budget. librdkafka calls `DeliveryContext::delivery` exactly once per
//! record, on the producer's polling thread, when the broker has confirmed it
//! (with `acks=all`: written to every in-sync replica) or when it has
//! definitely failed. The token's acker is answered there and its permit
//! returned, so a batch is acknowledged only when every one of its records
//! is, and the budget bounds memory during an outage. A token dropped
//! unanswered (the producer destroyed with records queued) fails its batch,
//! which is the safe outcome.

use std::sync::{Arc, Mutex};

use rdkafka::client::ClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::producer::{DeliveryResult, ProducerContext};
use tokio::sync::OwnedSemaphorePermit;
use walcast_sdk::{Acker, Lsn};

/// Why a record was not delivered. Every variant names the topic and what
/// the record carried, so the operator can find the row.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DeliveryError {
    /// The record exceeds a size limit (client `message.max.bytes`, the
    /// broker's `message.max.bytes` or the topic's `max.message.bytes`).
    /// Retrying cannot help.
    #[error(
        "kafka: record for {what} at LSN {lsn} is {size} bytes, over the size limit of topic `{topic}` ({code}); \
         raise the topic's `max.message.bytes` (or the broker's `message.max.bytes`) and the producer's \
         `message.max.bytes` in [sink.kafka.producer], or exclude the oversized column from the publication"
    )]
    RecordTooLarge {
        topic: String,
        what: String,
        lsn: Lsn,
        size: usize,
        code: RDKafkaErrorCode,
    },
    /// The broker refused the client's credentials (SASL). librdkafka keeps
    /// reconnecting, but the records would wait forever: the sink purges
    /// them and they fail with this. Definite, as in the Java producer.
    #[error(
        "kafka: the broker refused the client's credentials ({reason}); check security.protocol, \
         sasl.mechanism, sasl.username and sasl.password in the sink's [producer] properties"
    )]
    Authentication { reason: String },
    /// The broker or librdkafka refused the record.
    #[error(
        "kafka: record for {what} at LSN {lsn} was not delivered to topic `{topic}`: {code}{hint}"
    )]
    Refused {
        topic: String,
        what: String,
        lsn: Lsn,
        code: RDKafkaErrorCode,
        hint: &'static str,
    },
}

impl DeliveryError {
    pub(crate) fn new(
        code: RDKafkaErrorCode,
        topic: &str,
        what: String,
        lsn: Lsn,
        size: usize,
    ) -> Self {
        match code {
            RDKafkaErrorCode::MessageSizeTooLarge | RDKafkaErrorCode::InvalidMessageSize => {
                DeliveryError::RecordTooLarge {
                    topic: topic.to_string(),
                    what,
                    lsn,
                    size,
                    code,
                }
            }
            _ => DeliveryError::Refused {
                topic: topic.to_string(),
                what,
                lsn,
                code,
                hint: hint(code),
            },
        }
    }

    /// Definite errors need an operator; transient ones may pass after a
    /// restart from the checkpoint (the records are re-read then).
    pub fn is_transient(&self) -> bool {
        match self {
            DeliveryError::RecordTooLarge { .. } | DeliveryError::Authentication { .. } => false,
            DeliveryError::Refused { code, .. } => is_transient(*code),
        }
    }
}

/// Classifies a librdkafka / broker error code by consequence.
pub fn is_transient(code: RDKafkaErrorCode) -> bool {
    !matches!(
        code,
        RDKafkaErrorCode::MessageSizeTooLarge
            | RDKafkaErrorCode::InvalidMessageSize
            | RDKafkaErrorCode::InvalidMessage
            | RDKafkaErrorCode::InvalidRecord
            | RDKafkaErrorCode::UnknownTopicOrPartition
            | RDKafkaErrorCode::UnknownTopic
            | RDKafkaErrorCode::UnknownPartition
            | RDKafkaErrorCode::InvalidTopic
            | RDKafkaErrorCode::TopicAuthorizationFailed
            | RDKafkaErrorCode::ClusterAuthorizationFailed
            | RDKafkaErrorCode::TransactionalIdAuthorizationFailed
            | RDKafkaErrorCode::SaslAuthenticationFailed
            | RDKafkaErrorCode::Authentication
            | RDKafkaErrorCode::PolicyViolation
            | RDKafkaErrorCode::UnsupportedForMessageFormat
            | RDKafkaErrorCode::UnsupportedCompressionType
            | RDKafkaErrorCode::InvalidRequiredAcks
            | RDKafkaErrorCode::InvalidArgument
            | RDKafkaErrorCode::Fatal
    )
}

fn hint(code: RDKafkaErrorCode) -> &'static str {
    match code {
        RDKafkaErrorCode::UnknownTopicOrPartition | RDKafkaErrorCode::UnknownTopic | RDKafkaErrorCode::UnknownPartition => {
            " (the topic does not exist and the broker does not auto-create it: set create_topics = true or create it)"
        }
        RDKafkaErrorCode::TopicAuthorizationFailed | RDKafkaErrorCode::ClusterAuthorizationFailed => {
            " (the principal needs WRITE on the topic, and IDEMPOTENT_WRITE on the cluster for idempotence)"
        }
        RDKafkaErrorCode::SaslAuthenticationFailed | RDKafkaErrorCode::Authentication => {
            " (check the sasl.* settings in [sink.kafka.producer])"
        }
        RDKafkaErrorCode::MessageTimedOut => {
            " (message.timeout.ms expired; walcast's default 0 waits for the broker indefinitely)"
        }
        _ => "",
    }
}

/// What travels with a record through librdkafka.
pub(crate) struct RecordToken {
    /// `None` for records no batch waits for (an END marker written at flush).
    pub acker: Option<Acker>,
    pub permit: OwnedSemaphorePermit,
    pub topic: Arc<str>,
    /// `schema.table`, or the transaction topic's role, for messages.
    pub what: Arc<str>,
    pub lsn: Lsn,
    pub size: usize,
}

/// The producer's context: answers ackers from delivery reports and keeps
/// the first failure so the sink can refuse further batches.
#[derive(Clone, Default)]
pub(crate) struct DeliveryContext {
    failure: Arc<Mutex<Option<DeliveryError>>>,
    /// Woken when the credentials are refused, so the sink purges what
    /// waits in librdkafka's queues.
    pub(crate) auth_failed: Arc<tokio::sync::Notify>,
}

impl DeliveryContext {
    /// The first delivery failure since the sink started, if any.
    pub fn failure(&self) -> Option<DeliveryError> {
        self.failure.lock().map(|f| f.clone()).unwrap_or(None)
    }

    pub(crate) fn record_failure(&self, err: DeliveryError) {
        if let Ok(mut f) = self.failure.lock() {
            f.get_or_insert(err);
        }
    }
}

impl ClientContext for DeliveryContext {
    fn error(&self, error: KafkaError, reason: &str) {
        // Broker-down and similar errors are reported here while librdkafka
        // keeps retrying; records are not failed by them. Refused
        // credentials are different: no retry will pass.
        if matches!(
            error.rdkafka_error_code(),
            Some(RDKafkaErrorCode::Authentication | RDKafkaErrorCode::SaslAuthenticationFailed)
        ) {
            let first = self.failure().is_none();
            self.record_failure(DeliveryError::Authentication {
                reason: reason.to_string(),
            });
            if first {
                tracing::error!(error = %error, reason, "kafka producer: authentication failed");
                self.auth_failed.notify_one();
            }
            return;
        }
        tracing::warn!(error = %error, reason, "kafka producer");
    }
}

impl ProducerContext for DeliveryContext {
    type DeliveryOpaque = Box<RecordToken>;

    fn delivery(&self, result: &DeliveryResult<'_>, token: Box<RecordToken>) {
        let RecordToken {
            acker,
            permit,
            topic,
            what,
            lsn,
            size,
        } = *token;
        match result {
            Ok(_) => {
                if let Some(a) = acker {
                    a.ack();
                }
            }
            Err((err, msg)) => {
                let code = err.rdkafka_error_code().unwrap_or(RDKafkaErrorCode::Fail);
                let size = size.max(msg.payload_len() + msg.key().map_or(0, <[u8]>::len));
                // Records purged after refused credentials fail with that.
                let err = match self.failure() {
                    Some(auth @ DeliveryError::Authentication { .. }) => auth,
                    _ => DeliveryError::new(code, &topic, what.to_string(), lsn, size),
                };
                tracing::error!(error = %err, transient = err.is_transient(), "kafka delivery failed");
                if let Some(a) = acker {
                    a.fail(err.to_string());
                }
                self.record_failure(err);
            }
        }
        drop(permit);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn too_large_names_topic_table_lsn_size_and_settings() {
        let e = DeliveryError::new(
            RDKafkaErrorCode::MessageSizeTooLarge,
            "shop.public.docs",
            "public.docs".into(),
            Lsn(0x16_B374_D848),
            2_000_000,
        );
        assert!(!e.is_transient());
        let msg = e.to_string();
        for needle in [
            "shop.public.docs",
            "public.docs",
            "16/B374D848",
            "2000000 bytes",
            "max.message.bytes",
            "message.max.bytes",
        ] {
            assert!(msg.contains(needle), "`{needle}` missing from: {msg}");
        }
    }

    #[test]
    fn classification() {
        assert!(is_transient(RDKafkaErrorCode::MessageTimedOut));
        assert!(is_transient(RDKafkaErrorCode::AllBrokersDown));
        assert!(is_transient(RDKafkaErrorCode::NotLeaderForPartition));
        assert!(!is_transient(RDKafkaErrorCode::TopicAuthorizationFailed));
        assert!(!is_transient(RDKafkaErrorCode::UnknownTopicOrPartition));
        let e = DeliveryError::new(RDKafkaErrorCode::UnknownTopic, "t", "s.t".into(), Lsn(1), 1);
        assert!(e.to_string().contains("create_topics"), "{e}");
    }
}
