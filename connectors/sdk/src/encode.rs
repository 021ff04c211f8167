//! Turning an event into the bytes of a Kafka record (or any keyed message).
//!
//! The Kafka sink knows nothing of Avro or registries: it is given an
//! [`EventEncoder`]. The JSON encoder lives here; the Avro one, which needs a
//! schema registry, lives in the schemas crate.

use async_trait::async_trait;

use crate::event::ChangeEvent;
use crate::json::{self, JsonOptions};

/// A record's key and value bytes. `value: None` is a tombstone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedRecord {
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
}

/// Why an event could not be encoded.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    /// The event does not fit its schema (a value of the wrong type, a
    /// decimal with more digits than its column allows). Retrying cannot
    /// help; the configured policy (halt or dead-letter) applies.
    #[error("{table}: column `{column}`: {message}")]
    Invalid {
        table: String,
        column: String,
        message: String,
    },
    /// The schema registry could not be reached or refused the schema.
    #[error("schema registry: {message}")]
    Registry {
        message: String,
        transient: bool,
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
}

impl EncodeError {
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            EncodeError::Registry {
                transient: true,
                ..
            }
        )
    }
}

/// A field added to a record's key: Debezium's topic router
/// (`ByLogicalTableRouter`) adds the source table's own topic name, so keys
/// stay unique when several tables share a topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyField {
    /// `__dbz__physicalTableIdentifier` by default.
    pub name: std::sync::Arc<str>,
    pub value: std::sync::Arc<str>,
}

/// Encodes an event's key and value. Called on the hot path: implementations
/// cache whatever they look up (schemas, registry ids).
#[async_trait]
pub trait EventEncoder: Send + Sync {
    async fn encode(&self, event: &ChangeEvent) -> Result<EncodedRecord, EncodeError>;

    /// As [`Self::encode`] (or [`Self::encode_tombstone`]), with `field`
    /// added to the key (a key-less event stays key-less). Encoders that
    /// cannot add one refuse.
    async fn encode_with_key_field(
        &self,
        event: &ChangeEvent,
        field: Option<&KeyField>,
        tombstone: bool,
    ) -> Result<EncodedRecord, EncodeError> {
        match (field, tombstone) {
            (None, false) => self.encode(event).await,
            (None, true) => self.encode_tombstone(event).await,
            (Some(f), _) => Err(EncodeError::Invalid {
                table: event.table.qualified_name(),
                column: f.name.to_string(),
                message: format!("the {} encoder cannot add a field to keys", self.format()),
            }),
        }
    }

    /// Encodes the tombstone that follows a delete: the same key, no value.
    async fn encode_tombstone(&self, event: &ChangeEvent) -> Result<EncodedRecord, EncodeError> {
        let mut rec = self.encode(event).await?;
        rec.value = None;
        Ok(rec)
    }

    /// A short name for logs: `json`, `avro`.
    fn format(&self) -> &'static str;
}

/// Debezium-JsonConverter-compatible JSON, without the schema block
/// (`schemas.enable=false`): the bytes of [`json::key_bytes`] and
/// [`json::envelope_bytes`], written with each table shape's column names
/// escaped once and kept (by relation id and shape version, like the Avro
/// encoder's schemas), and each envelope allocated at the size its table's
/// envelopes need.
#[derive(Debug, Clone, Default)]
pub struct JsonEncoder {
    pub options: JsonOptions,
    tables: std::sync::Arc<json::TableCache>,
}

impl JsonEncoder {
    pub fn new(options: JsonOptions) -> Self {
        JsonEncoder {
            options,
            tables: Default::default(),
        }
    }

    /// One JSON line's object, `{"key":<key or null>,"value":<envelope>}`,
    /// appended to `out` (the file sink's format): the same key and
    /// envelope bytes as [`EventEncoder::encode`], without a buffer each.
    pub fn write_key_value(&self, out: &mut Vec<u8>, event: &ChangeEvent) {
        let prepared = self.tables.get(&event.table);
        out.extend_from_slice(b"{\"key\":");
        match json::prepared_key(&prepared, event, &self.options) {
            Some(key) => out.extend_from_slice(&key),
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(b",\"value\":");
        json::write_prepared_envelope(out, &prepared, event, &self.options);
        out.push(b'}');
    }
}

#[async_trait]
impl EventEncoder for JsonEncoder {
    async fn encode(&self, event: &ChangeEvent) -> Result<EncodedRecord, EncodeError> {
        let prepared = self.tables.get(&event.table);
        let key = json::prepared_key(&prepared, event, &self.options);
        let value = json::prepared_envelope(&prepared, event, &self.options);
        Ok(EncodedRecord {
            key,
            value: Some(value),
        })
    }

    async fn encode_with_key_field(
        &self,
        event: &ChangeEvent,
        field: Option<&KeyField>,
        tombstone: bool,
    ) -> Result<EncodedRecord, EncodeError> {
        let key = json::key_bytes_with(event, &self.options, field);
        let value = (!tombstone).then(|| json::envelope_bytes(event, &self.options));
        Ok(EncodedRecord { key, value })
    }

    fn format(&self) -> &'static str {
        "json"
    }
}
