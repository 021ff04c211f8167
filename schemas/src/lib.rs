//! Avro for walcast: the Postgres to Avro type mapping ([`mapping`]), the
//! codec ([`codec`], writing Avro's binary encoding with [`binary`]), the
//! Confluent wire header ([`wire`]), a Confluent
//! Schema Registry client ([`registry`]), an embedded registry kept in a
//! directory ([`embedded`]) and served over the Confluent REST API
//! ([`server`]), data contracts ([`contracts`]) and the [`AvroEncoder`] /
//! [`AvroDecoder`] the Kafka sink and source use.
//!
//! Schemas are registered once per table shape and cached; the hot path
//! makes no HTTP call.

pub mod binary;
pub mod codec;
pub mod contracts;
pub mod debezium;
pub mod embedded;
pub mod encoder;
pub mod mapping;
pub mod registry;
pub mod server;
pub mod wire;

pub use contracts::{ContractError, Contracts};
pub use embedded::{EmbeddedError, EmbeddedRegistry, EmbeddedRegistryConfig};
pub use encoder::{default_topic, AvroDecoder, AvroEncoder, ReadError, TopicNamer};
pub use mapping::{
    AvroCompat, AvroSchema, FieldNameAdjustment, MappingOptions, TableSchemas, UnconstrainedNumeric,
};
pub use registry::{
    Compatibility, CompatibilityLevel, HttpRegistry, InvalidValuePolicy, Registry, RegistryConfig,
    RegistryError, SubjectStrategy, SubjectVersion, VersionRef,
};
