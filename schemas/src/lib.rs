//! Avro for walcast: the Postgres to Avro type mapping ([`mapping`]), the
//! codec ([`codec`]), the Confluent wire header ([`wire`]), a Confluent
//! Schema Registry client ([`registry`]), an in-process registry
//! ([`embedded`]) and the [`AvroEncoder`] / [`AvroDecoder`] the Kafka sink
//! and source use.
//!
//! Schemas are registered once per table shape and cached; the hot path
//! makes no HTTP call.

pub mod codec;
pub mod embedded;
pub mod encoder;
pub mod mapping;
pub mod registry;
pub mod wire;

pub use embedded::EmbeddedRegistry;
pub use encoder::{default_topic, AvroDecoder, AvroEncoder, ReadError, TopicNamer};
pub use mapping::{AvroSchema, MappingOptions, TableSchemas, UnconstrainedNumeric};
pub use registry::{
    Compatibility, HttpRegistry, Registry, RegistryConfig, RegistryError, SubjectStrategy,
};
