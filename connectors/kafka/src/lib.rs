//! Kafka for walcast: the sink a capture pipeline publishes change events
//! with, and the consumer-group source a relay pipeline reads them back from.
//!
//! Both ends keep the acknowledgement contract of [`walcast_sdk::ack`]: the
//! sink acknowledges a batch only after the broker confirmed every record of
//! it, and the source commits an offset only after every record below it was
//! acknowledged by the relay's sink.
//!
//! * Capture: [`KafkaSink::new`] from a [`KafkaSinkConfig`] and an
//!   [`walcast_sdk::EventEncoder`] (JSON here, Avro from the schemas crate);
//!   [`KafkaSink::check`] for `walcast check`.
//! * Relay: [`KafkaSource::new`] from a [`KafkaSourceConfig`]; loop on
//!   [`KafkaSource::next_batch`], decode, hand records to a sink with their
//!   ackers (or one [`KafkaSource::join`]ed acker), and call
//!   [`KafkaSource::commit_acknowledged`] regularly.

pub mod config;
pub mod dead_letter;
pub mod delivery;
pub mod offsets;
pub mod outbox;
pub mod record;
pub mod sink;
pub mod source;
pub mod topic;
pub mod transaction;

pub use config::{
    ConfigError, DeliveryMode, KafkaSinkConfig, KafkaSourceConfig, Subscription,
    TopicCreationConfig,
};
pub use dead_letter::RecordDeadLetter;
pub use delivery::DeliveryError;
pub use sink::{KafkaSink, KafkaSinkError, NoticeTopics};
pub use source::{KafkaSource, SourceBatch, SourceError, SourceRecord};
pub use topic::{TopicError, TopicState, TopicStatus};
