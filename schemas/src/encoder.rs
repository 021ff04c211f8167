//! [`AvroEncoder`]: change events to Confluent-framed Avro, registering each
//! table's schemas once; and [`AvroDecoder`], the way back for `walcast
//! tail` and the relays.
//!
//! Schemas are derived and registered the first time a table shape is seen,
//! keyed by relation id and [`TableSchema::version`] and checked against the
//! full table description, so a new Relation message (a column added) makes
//! a new schema version while every later event of that shape costs a map
//! lookup. A registry that refuses the new shape as incompatible yields a
//! definite error naming the subject, and the pipeline's policy applies.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use async_trait::async_trait;
use serde_json::Value as Json;
use walcast_sdk::{ChangeEvent, EncodeError, EncodedRecord, EventEncoder, KeyField, TableSchema};

use crate::codec::{self, DecodeError};
use crate::contracts::{ContractError, Contracts};
use crate::mapping::{self, AvroSchema, MappingOptions, TableSchemas};
use crate::registry::{HttpRegistry, Registry, RegistryConfig, RegistryError, SubjectStrategy};
use crate::wire::{self, WireError};

/// Names the Kafka topic of an event; the encoder and the Kafka sink must
/// be given the same one, since subjects derive from topics.
pub type TopicNamer = Arc<dyn Fn(&ChangeEvent) -> String + Send + Sync>;

/// Debezium's default topic: `<prefix>.<schema>.<table>`, the prefix being
/// the pipeline's logical name (`SourceInfo::name`).
pub fn default_topic(event: &ChangeEvent) -> String {
    format!(
        "{}.{}.{}",
        event.source.name, event.table.schema, event.table.name
    )
}

/// One table shape, derived and registered.
struct Registered {
    table: Arc<TableSchema>,
    prefix: String,
    schemas: TableSchemas,
    key_id: Option<u32>,
    value_id: u32,
    /// The field appended to the key schema, if any (see [`KeyField`]).
    key_field: Option<Arc<str>>,
}

/// The columns that differ between two shapes of a table, and a sentence
/// for each, in Postgres's type names.
fn column_changes(old: &TableSchema, new: &TableSchema) -> (Vec<String>, Vec<String>) {
    let mut columns = Vec::new();
    let mut changes = Vec::new();
    for c in &new.columns {
        let change = match old.columns.iter().find(|o| o.name == c.name) {
            Some(o) if o.pg_type != c.pg_type => format!(
                "column `{}` changed type from {} to {}",
                c.name,
                o.pg_type.sql_name(),
                c.pg_type.sql_name()
            ),
            Some(o) if o.nullable && !c.nullable => format!("column `{}` became NOT NULL", c.name),
            Some(_) => continue,
            None if !c.nullable => format!(
                "column `{}` ({}) was added as NOT NULL",
                c.name,
                c.pg_type.sql_name()
            ),
            None => format!("column `{}` ({}) was added", c.name, c.pg_type.sql_name()),
        };
        columns.push(c.name.clone());
        changes.push(change);
    }
    for o in &old.columns {
        if !new.columns.iter().any(|c| c.name == o.name) {
            columns.push(o.name.clone());
            changes.push(format!(
                "column `{}` ({}) was dropped",
                o.name,
                o.pg_type.sql_name()
            ));
        }
    }
    if changes.is_empty() {
        changes.push("no column change explains it".to_string());
    }
    (columns, changes)
}

/// Avro with a schema registry, as an [`EventEncoder`] for the Kafka sink.
pub struct AvroEncoder {
    registry: Arc<dyn Registry>,
    options: MappingOptions,
    subjects: SubjectStrategy,
    topics: TopicNamer,
    contracts: Option<Arc<Contracts>>,
    tables: RwLock<HashMap<(u32, u32), Arc<Registered>>>,
}

impl AvroEncoder {
    pub fn new(
        registry: Arc<dyn Registry>,
        options: MappingOptions,
        subjects: SubjectStrategy,
        topics: TopicNamer,
    ) -> Self {
        AvroEncoder {
            registry,
            options,
            subjects,
            topics,
            contracts: None,
            tables: RwLock::default(),
        }
    }

    /// Enforces `contracts`: a table shape whose derived schema breaks its
    /// contract is refused before anything is registered, with
    /// `EncodeError::Invalid` naming the table and the field, so the
    /// pipeline's invalid-value policy applies (by default it halts).
    pub fn with_contracts(mut self, contracts: Arc<Contracts>) -> Self {
        self.contracts = Some(contracts);
        self
    }

    /// An encoder over an HTTP registry from the pipeline's `[registry]`
    /// section (contracts included), naming topics
    /// `<prefix>.<schema>.<table>`.
    pub fn from_config(config: &RegistryConfig) -> Result<Self, RegistryError> {
        let registry = Arc::new(HttpRegistry::new(config)?);
        let contracts = config.load_contracts().map_err(|e| RegistryError::Config {
            field: "contracts",
            message: e.to_string(),
        })?;
        let encoder = AvroEncoder::new(
            registry,
            config.mapping_options(),
            config.subject_strategy,
            Arc::new(default_topic),
        );
        Ok(match contracts {
            Some(c) => encoder.with_contracts(Arc::new(c)),
            None => encoder,
        })
    }

    pub fn registry(&self) -> &Arc<dyn Registry> {
        &self.registry
    }

    async fn registered(
        &self,
        event: &ChangeEvent,
        key_field: Option<&KeyField>,
    ) -> Result<Arc<Registered>, EncodeError> {
        let table = &event.table;
        let key = (table.relation_id, table.version);
        let field_name = key_field.map(|f| &f.name);
        if let Some(r) = self
            .tables
            .read()
            .expect("encoder cache lock poisoned")
            .get(&key)
        {
            if (Arc::ptr_eq(&r.table, table) || r.table == *table)
                && r.prefix == event.source.name
                && r.key_field.as_ref() == field_name
            {
                return Ok(r.clone());
            }
        }
        let invalid = |e: mapping::MappingError| EncodeError::Invalid {
            table: table.qualified_name(),
            column: "*".into(),
            message: e.to_string(),
        };
        let mut schemas =
            mapping::derive(table, &event.source.name, &self.options).map_err(invalid)?;
        if let (Some(name), Some(k)) = (field_name, &schemas.key) {
            schemas.key =
                Some(mapping::with_key_field(k, name, &table.qualified_name()).map_err(invalid)?);
        }
        if let Some(contracts) = &self.contracts {
            contracts
                .check(&table.schema, &table.name, &schemas)
                .map_err(|e| match &e {
                    ContractError::Violation { table, field, .. } => EncodeError::Invalid {
                        table: table.clone(),
                        column: field.clone(),
                        message: e.to_string(),
                    },
                    e => EncodeError::Invalid {
                        table: table.qualified_name(),
                        column: "*".into(),
                        message: e.to_string(),
                    },
                })?;
        }
        let topic = (self.topics)(event);
        let refused = |e: RegistryError| match e {
            RegistryError::Incompatible { .. } => self.incompatible(table, e),
            e => e.into(),
        };
        let key_id = match &schemas.key {
            Some(k) => Some(
                self.registry
                    .register(&self.subjects.subject(&topic, k, true), k)
                    .await
                    .map_err(refused)?,
            ),
            None => None,
        };
        let value_id = self
            .registry
            .register(
                &self.subjects.subject(&topic, &schemas.value, false),
                &schemas.value,
            )
            .await
            .map_err(refused)?;
        let r = Arc::new(Registered {
            table: table.clone(),
            prefix: event.source.name.clone(),
            schemas,
            key_id,
            value_id,
            key_field: field_name.cloned(),
        });
        self.tables
            .write()
            .expect("encoder cache lock poisoned")
            .insert(key, r.clone());
        Ok(r)
    }

    /// The registry refused `table`'s new shape: says which columns changed
    /// since the last shape this process registered for the table, with old
    /// and new types, as an `Invalid` error so the pipeline's policy (halt
    /// or dead-letter) applies rather than a retry that cannot succeed.
    fn incompatible(&self, table: &TableSchema, refused: RegistryError) -> EncodeError {
        let previous = self
            .tables
            .read()
            .expect("encoder cache lock poisoned")
            .values()
            .filter(|r| r.table.relation_id == table.relation_id && r.table.version < table.version)
            .max_by_key(|r| r.table.version)
            .map(|r| r.table.clone());
        let (columns, changes) = match previous {
            Some(old) => column_changes(&old, table),
            None => (
                vec![],
                vec!["no earlier shape of this table was registered by this process; compare with the subject's latest version".to_string()],
            ),
        };
        EncodeError::Invalid {
            table: table.qualified_name(),
            column: if columns.is_empty() {
                "*".to_string()
            } else {
                columns.join(", ")
            },
            message: format!(
                "{refused}; changes: {}. Make the change compatible (add columns as nullable, widen \
                 types), or set the subject's compatibility to NONE if the consumers can cope, then restart",
                changes.join("; ")
            ),
        }
    }

    fn key(
        &self,
        event: &ChangeEvent,
        r: &Registered,
        field: Option<&KeyField>,
    ) -> Result<Option<Vec<u8>>, EncodeError> {
        let Some(id) = r.key_id else {
            return Ok(None);
        };
        let mut out = Vec::with_capacity(32);
        wire::write_header(&mut out, id);
        if !codec::encode_key_into(event, &r.schemas, &self.options, &mut out)? {
            return Ok(None);
        }
        // The appended field is the key record's last.
        if let Some(f) = field {
            crate::binary::string(&mut out, &f.value);
        }
        Ok(Some(out))
    }
}

#[async_trait]
impl EventEncoder for AvroEncoder {
    async fn encode(&self, event: &ChangeEvent) -> Result<EncodedRecord, EncodeError> {
        self.encode_with_key_field(event, None, false).await
    }

    async fn encode_tombstone(&self, event: &ChangeEvent) -> Result<EncodedRecord, EncodeError> {
        self.encode_with_key_field(event, None, true).await
    }

    async fn encode_with_key_field(
        &self,
        event: &ChangeEvent,
        field: Option<&KeyField>,
        tombstone: bool,
    ) -> Result<EncodedRecord, EncodeError> {
        let r = self.registered(event, field).await?;
        let key = self.key(event, &r, field)?;
        if tombstone {
            return Ok(EncodedRecord { key, value: None });
        }
        let mut value = Vec::with_capacity(256);
        wire::write_header(&mut value, r.value_id);
        codec::encode_value_into(event, &r.schemas, &self.options, &mut value)?;
        Ok(EncodedRecord {
            key,
            value: Some(value),
        })
    }

    fn format(&self) -> &'static str {
        "avro"
    }
}

/// Why a record could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error("schema id {id}: {source}")]
    Registry {
        id: u32,
        #[source]
        source: RegistryError,
    },
    #[error("schema id {id}: {source}")]
    Decode {
        id: u32,
        #[source]
        source: DecodeError,
    },
}

impl ReadError {
    /// Only a registry outage is worth retrying; bad bytes stay bad.
    pub fn is_transient(&self) -> bool {
        matches!(self, ReadError::Registry { source, .. } if source.is_transient())
    }
}

/// Confluent-framed Avro back to JSON in the shape of
/// `walcast_sdk::json::envelope` (see [`codec::to_json`]).
pub struct AvroDecoder {
    registry: Arc<dyn Registry>,
}

impl AvroDecoder {
    pub fn new(registry: Arc<dyn Registry>) -> Self {
        AvroDecoder { registry }
    }

    /// The record (key or value) as JSON and the id of its writer schema.
    pub async fn decode(&self, record: &[u8]) -> Result<(u32, Json), ReadError> {
        self.decode_with_schema(record)
            .await
            .map(|(id, json, _)| (id, json))
    }

    /// As [`Self::decode`], with the writer schema itself (a relay reads
    /// the columns' types from it: [`crate::mapping::column_types`]).
    pub async fn decode_with_schema(
        &self,
        record: &[u8],
    ) -> Result<(u32, Json, Arc<AvroSchema>), ReadError> {
        let (id, datum) = wire::parse(record)?;
        let schema = self
            .registry
            .schema_by_id(id)
            .await
            .map_err(|source| ReadError::Registry { id, source })?;
        let value = codec::decode(schema.schema(), datum)
            .map_err(|source| ReadError::Decode { id, source })?;
        let json = codec::to_json(&value, schema.schema())
            .map_err(|source| ReadError::Decode { id, source })?;
        Ok((id, json, schema))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::embedded::EmbeddedRegistry;
    use walcast_sdk::{
        Column, Lsn, Op, PgType, ReplicaIdentity, SnapshotMarker, SourceInfo, Value,
    };

    fn event(table: Arc<TableSchema>, op: Op, row: Vec<Value>) -> ChangeEvent {
        let (before, after) = if op == Op::Delete {
            (Some(row), None)
        } else {
            (None, Some(row))
        };
        ChangeEvent {
            op,
            table,
            before,
            after,
            source: SourceInfo {
                name: "shop".into(),
                db: "app".into(),
                lsn: Lsn(10),
                commit_lsn: Lsn(11),
                tx_id: Some(5),
                ts_ms: 1,
                ts_us: 1000,
                snapshot: SnapshotMarker::False,
            },
            transaction: None,
            ts_ms: 2,
        }
    }

    fn table(version: u32, extra: bool) -> Arc<TableSchema> {
        let mut columns = vec![Column {
            key_position: None,
            default: None,
            name: "id".into(),
            pg_type: PgType::Int4,
            type_oid: 23,
            type_modifier: -1,
            nullable: false,
            key: true,
        }];
        if extra {
            columns.push(Column {
                key_position: None,
                default: None,
                name: "note".into(),
                pg_type: PgType::Text,
                type_oid: 25,
                type_modifier: -1,
                nullable: true,
                key: false,
            });
        }
        Arc::new(TableSchema {
            relation_id: 9,
            schema: "public".into(),
            name: "t".into(),
            columns,
            replica_identity: ReplicaIdentity::Default,
            version,
        })
    }

    #[test]
    fn column_changes_name_columns_with_old_and_new_types() {
        let old = table(1, true);
        let mut retyped = (*old).clone();
        retyped.columns[1].pg_type = PgType::Numeric {
            precision: Some(8),
            scale: Some(2),
        };
        let (cols, changes) = column_changes(&old, &retyped);
        assert_eq!(cols, ["note"]);
        assert_eq!(
            changes,
            ["column `note` changed type from text to numeric(8,2)"]
        );
        let (cols, changes) = column_changes(&old, &table(2, false));
        assert_eq!(cols, ["note"]);
        assert_eq!(changes, ["column `note` (text) was dropped"]);
        let (_, changes) = column_changes(&table(1, false), &old);
        assert_eq!(changes, ["column `note` (text) was added"]);
    }

    #[tokio::test]
    async fn encodes_registers_once_and_decodes_back() {
        let registry = Arc::new(EmbeddedRegistry::new());
        let enc = AvroEncoder::new(
            registry.clone(),
            MappingOptions::default(),
            SubjectStrategy::TopicName,
            Arc::new(default_topic),
        );
        let dec = AvroDecoder::new(registry.clone());
        let e1 = event(table(1, false), Op::Create, vec![Value::Int32(1)]);
        let rec = enc.encode(&e1).await.unwrap();
        let rec2 = enc.encode(&e1).await.unwrap();
        assert_eq!(rec, rec2);
        assert_eq!(registry.subject_ids("shop.public.t-value").len(), 1);
        assert_eq!(registry.subject_ids("shop.public.t-key").len(), 1);
        let (_, key) = dec.decode(rec.key.as_ref().unwrap()).await.unwrap();
        assert_eq!(key, serde_json::json!({"id": 1}));
        let (_, value) = dec.decode(rec.value.as_ref().unwrap()).await.unwrap();
        let mut expected = walcast_sdk::json::envelope(&e1, &Default::default());
        assert_eq!(value, expected);

        // The table gains a nullable column: a second version, and the key is unchanged.
        let e2 = event(
            table(2, true),
            Op::Delete,
            vec![Value::Int32(1), Value::Null],
        );
        let rec = enc.encode_tombstone(&e2).await.unwrap();
        assert!(rec.value.is_none());
        let rec = enc.encode(&e2).await.unwrap();
        assert_eq!(registry.subject_ids("shop.public.t-value").len(), 2);
        assert_eq!(registry.subject_ids("shop.public.t-key").len(), 1);
        let (_, value) = dec.decode(rec.value.as_ref().unwrap()).await.unwrap();
        expected = walcast_sdk::json::envelope(&e2, &Default::default());
        assert_eq!(value, expected);

        assert!(matches!(
            dec.decode(b"{\"a\":12}").await,
            Err(ReadError::Wire(WireError::WrongMagic { .. }))
        ));
        let missing = dec.decode(&wire::frame(999, &[])).await.unwrap_err();
        assert!(
            !missing.is_transient() && missing.to_string().contains("999"),
            "{missing}"
        );
    }
}
