//! A relay's dead-letter topic: records it can never apply (they do not
//! decode, or a sink refuses them whatever the destination's state) are
//! copied there as they were read, so the relay can move past them without
//! losing them. The shape is Kafka Connect's `errors.deadletterqueue`:
//! original key, value and headers, plus headers naming why and where from,
//! so an operator can fix the cause and replay the records.

use std::time::Duration;

use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;

use crate::config::KafkaSourceConfig;
use crate::record::{ERROR_HEADER, TOPIC_HEADER};
use crate::source::{SourceError, SourceRecord};

/// On a relay dead-letter record: the sink that refused it (absent when the
/// record did not decode).
pub const SINK_HEADER: &str = "walcast.sink";
/// On a relay dead-letter record: the partition it was read from.
pub const PARTITION_HEADER: &str = "walcast.partition";
/// On a relay dead-letter record: its offset there.
pub const OFFSET_HEADER: &str = "walcast.offset";

/// How long one dead-letter record may wait for the broker before the relay
/// gives up and stops (the record's offset is then not committed).
const DELIVERY_TIMEOUT_MS: &str = "120000";

/// Consumer properties the producer shares: how to reach and authenticate
/// to the same cluster.
fn shares(key: &str) -> bool {
    ["security.", "sasl.", "ssl.", "client.dns.", "socket."]
        .iter()
        .any(|p| key.starts_with(p))
}

/// A producer to one dead-letter topic on the relay's cluster.
pub struct RecordDeadLetter {
    producer: FutureProducer,
    topic: String,
}

impl RecordDeadLetter {
    pub fn new(source: &KafkaSourceConfig, topic: &str) -> Result<Self, SourceError> {
        let mut cfg = ClientConfig::new();
        cfg.set("bootstrap.servers", &source.bootstrap_servers)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("message.timeout.ms", DELIVERY_TIMEOUT_MS);
        for (k, v) in source.consumer.iter().filter(|(k, _)| shares(k)) {
            cfg.set(k, v);
        }
        let producer = cfg.create().map_err(|e| SourceError::Client {
            group: source.group_id.clone(),
            source: e,
        })?;
        Ok(RecordDeadLetter {
            producer,
            topic: topic.to_string(),
        })
    }

    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// Copies `record` to the dead-letter topic with `reason`, and waits
    /// for the broker's acknowledgement.
    pub async fn send(
        &self,
        record: &SourceRecord,
        sink: Option<&str>,
        reason: &str,
    ) -> Result<(), SourceError> {
        let mut headers = OwnedHeaders::new_with_capacity(record.headers.len() + 5);
        for (k, v) in &record.headers {
            headers = headers.insert(Header {
                key: k,
                value: v.as_deref(),
            });
        }
        let partition = record.partition.to_string();
        let offset = record.offset.to_string();
        headers = headers
            .insert(Header {
                key: ERROR_HEADER,
                value: Some(reason.as_bytes()),
            })
            .insert(Header {
                key: TOPIC_HEADER,
                value: Some(record.topic.as_bytes()),
            })
            .insert(Header {
                key: PARTITION_HEADER,
                value: Some(partition.as_bytes()),
            })
            .insert(Header {
                key: OFFSET_HEADER,
                value: Some(offset.as_bytes()),
            });
        if let Some(sink) = sink {
            headers = headers.insert(Header {
                key: SINK_HEADER,
                value: Some(sink.as_bytes()),
            });
        }
        let mut out: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&self.topic).headers(headers);
        if let Some(k) = record.key.as_deref() {
            out = out.key(k);
        }
        if let Some(v) = record.value.as_deref() {
            out = out.payload(v);
        }
        self.producer
            .send(out, Duration::from_secs(5))
            .await
            .map(|_| ())
            .map_err(|(source, _)| SourceError::DeadLetter {
                topic: self.topic.clone(),
                source,
            })
    }
}
