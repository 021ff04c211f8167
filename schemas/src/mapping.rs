//! Postgres tables to Avro schemas, in the shape Debezium's Postgres
//! connector registers, so that consumers written against Debezium's Avro
//! read walcast's records unchanged.
//!
//! The full type table, with the reasons for each choice, is in
//! `schemas/MAPPING.md`. Two choices differ from Debezium on purpose:
//!
//! * In the row record (`<prefix>.<schema>.<table>.Value`) every column that
//!   is not part of the key is `["null", T]`, whatever its `NOT NULL`. The
//!   before image of an update or delete under `REPLICA IDENTITY DEFAULT`
//!   carries only the key columns, and pgoutput does not send `attnotnull`
//!   at all; Debezium papers over this by inventing zero values, which a
//!   consumer cannot tell from real data. Key columns follow the column's
//!   nullability.
//! * `timestamptz` is a `long` with logical type `timestamp-micros` (UTC)
//!   rather than Debezium's ISO string, so Avro consumers get a typed instant.
//!
//! Both choices are walcast's own shape (`avro_compat = "walcast"`, the
//! default). `avro_compat = "debezium"` drops them and follows Debezium
//! exactly ([`crate::debezium`]), for consumers built for Debezium's Avro.
//!
//! Identifiers that are not valid Avro names are sanitised as Debezium does
//! (every character outside `[A-Za-z0-9_]` becomes `_`, and a leading digit
//! gains a `_` prefix); the original is kept in the `walcast.table` and
//! `walcast.column` attributes so nothing is lost.

use std::collections::{BTreeMap, HashSet};

use apache_avro::rabin::Rabin;
use apache_avro::Schema;
use serde::Deserialize;
use serde_json::{json, Map, Value as Json};
use walcast_sdk::{Column, PgType, TableSchema};

/// Namespace and name of Debezium's `source` block record.
pub const SOURCE_RECORD: &str = "io.debezium.connector.postgresql.Source";
/// Debezium's name for the `transaction` block record.
pub const TRANSACTION_RECORD: &str = "event.block";
/// Debezium's record for numerics without a declared scale.
pub const VARIABLE_SCALE_DECIMAL: &str = "io.debezium.data.VariableScaleDecimal";
/// Precision given to `money`: it is a 64-bit count of cents, at most 19 digits.
pub const MONEY_PRECISION: u32 = 19;
/// Scale of `money` (Debezium's `money.fraction.digits` default).
pub const MONEY_SCALE: u32 = 2;
/// Custom attribute that keeps a table's original `schema.table`.
pub const TABLE_ATTRIBUTE: &str = "walcast.table";
/// Custom attribute that keeps a column's original name when it had to be sanitised.
pub const COLUMN_ATTRIBUTE: &str = "walcast.column";

/// How a `numeric` without precision and scale travels. It has no fixed
/// scale, so Avro's `decimal` cannot hold it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum UnconstrainedNumeric {
    /// Debezium's default (`decimal.handling.mode=precise`): a record
    /// `io.debezium.data.VariableScaleDecimal {scale: int, value: bytes}`.
    /// Exact, and what Debezium consumers expect, but it cannot carry `NaN`
    /// or `±Infinity`: Debezium 3.6 stops its connector on them
    /// (`ConnectException` from `SpecialValueDecimal.fromLogical`).
    VariableScale,
    /// Postgres's text form: exact and readable, and the only form that can
    /// carry `NaN` and `Infinity`. The default: an unconstrained `numeric`
    /// is where Postgres allows the special values (a `numeric(p,s)` holds
    /// no infinity), and a legal value must never stop a pipeline.
    #[default]
    String,
    /// A double: convenient, lossy beyond 15-17 significant digits.
    Double,
}

/// How column names that are not Avro names become field names
/// (Debezium's `field.name.adjustment.mode`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FieldNameAdjustment {
    /// Every character outside `[A-Za-z0-9_]` becomes `_` (and a leading
    /// digit gets a `_` before it): readable, but `名前` and `値段` both
    /// become `__`, which walcast refuses (naming both columns).
    #[default]
    Avro,
    /// Every character outside `[A-Za-z0-9]`, the underscore included,
    /// becomes `_uXXXX` (its UTF-16 code unit in hex), as Debezium's
    /// `avro_unicode` does: never two columns on one field.
    AvroUnicode,
}

/// Whose Avro shape the schemas and values follow (`registry.avro_compat`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AvroCompat {
    /// walcast's own: Debezium's names and envelope, with typed Avro
    /// values where Debezium has Connect types (`timestamptz` as
    /// `timestamp-micros`, logical types on dates, times and UUIDs) and
    /// every non-key column nullable. The module doc says why.
    #[default]
    Walcast,
    /// Debezium 3.6's Postgres connector through a Kafka Connect Avro
    /// converter, with its default modes: what a consumer written for
    /// Debezium's Avro reads unchanged ([`crate::debezium`]).
    Debezium,
}

/// Choices that change the derived schemas.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MappingOptions {
    pub unconstrained_numeric: UnconstrainedNumeric,
    pub field_name_adjustment: FieldNameAdjustment,
    pub avro_compat: AvroCompat,
}

/// Why a table could not be given an Avro schema. Always definite: the
/// table's shape will not change by retrying.
#[derive(Debug, thiserror::Error)]
pub enum MappingError {
    #[error("{table}: columns `{first}` and `{second}` both become the Avro field `{field}`; rename one of them, or set field_name_adjustment = \"avro_unicode\" in the registry section (names such columns `_uXXXX`, as Debezium's field.name.adjustment.mode does)")]
    FieldCollision {
        table: String,
        first: String,
        second: String,
        field: String,
    },
    #[error("{table}: the derived Avro schema is invalid (a walcast bug): {source}")]
    Invalid {
        table: String,
        #[source]
        source: Box<apache_avro::Error>,
    },
    #[error("schema is not JSON: {source}")]
    Json {
        #[source]
        source: serde_json::Error,
    },
    #[error("schema is not valid Avro: {source}")]
    Parse {
        #[source]
        source: Box<apache_avro::Error>,
    },
}

/// An Avro schema as both the JSON text walcast registers (with Debezium's
/// `connect.*` attributes, which the parsed form drops) and the parsed form
/// the codec writes with.
#[derive(Debug, Clone)]
pub struct AvroSchema {
    json: Json,
    schema: Schema,
    fingerprint: u64,
}

impl AvroSchema {
    pub fn from_json(json: Json) -> Result<Self, MappingError> {
        let schema = Schema::parse(&json).map_err(|e| MappingError::Parse {
            source: Box::new(e),
        })?;
        Ok(AvroSchema::from_parts(json, schema))
    }

    pub fn parse_str(text: &str) -> Result<Self, MappingError> {
        let json: Json =
            serde_json::from_str(text).map_err(|source| MappingError::Json { source })?;
        AvroSchema::from_json(json)
    }

    fn from_parts(json: Json, schema: Schema) -> Self {
        let fingerprint = fingerprint(&schema);
        AvroSchema {
            json,
            schema,
            fingerprint,
        }
    }

    /// The JSON text to register.
    pub fn text(&self) -> String {
        self.json.to_string()
    }

    pub fn json(&self) -> &Json {
        &self.json
    }

    pub fn schema(&self) -> &Schema {
        &self.schema
    }

    /// The Rabin fingerprint of the parsing canonical form: equal for
    /// schemas that write the same bytes, whatever their formatting,
    /// attributes or docs (Apicurio hands schemas back compacted).
    pub fn fingerprint(&self) -> u64 {
        self.fingerprint
    }

    /// The full name of a named schema (`<prefix>.<schema>.<table>.Envelope`).
    pub fn full_name(&self) -> Option<String> {
        self.schema.name().map(|n| n.fullname(None))
    }
}

/// The Rabin fingerprint of a schema's parsing canonical form.
pub fn fingerprint(schema: &Schema) -> u64 {
    let bytes = schema.fingerprint::<Rabin>().bytes;
    let mut buf = [0u8; 8];
    buf.copy_from_slice(&bytes[..8]);
    u64::from_le_bytes(buf)
}

/// The key and value schemas of one table, and the Avro field name each
/// column was given.
#[derive(Debug, Clone)]
pub struct TableSchemas {
    /// `<prefix>.<schema>.<table>`, sanitised.
    pub namespace: String,
    /// `None` for a table without key columns.
    pub key: Option<AvroSchema>,
    /// The Debezium envelope.
    pub value: AvroSchema,
    /// The Avro field name of each column, aligned with `TableSchema::columns`.
    pub fields: Vec<String>,
    /// Each column's default as `avro_compat = "debezium"` declares it
    /// ([`crate::debezium::column_default`]), aligned with the columns; all
    /// `None` in walcast's shape. A nullable column with one is
    /// `[T, "null"]`, so the codec writes its branches the other way round.
    pub defaults: Vec<Option<walcast_sdk::Value>>,
}

/// Derives the key and envelope schemas of `table`. `prefix` is the
/// pipeline's logical name (Debezium's `topic.prefix`, walcast's
/// `SourceInfo::name`).
pub fn derive(
    table: &TableSchema,
    prefix: &str,
    opts: &MappingOptions,
) -> Result<TableSchemas, MappingError> {
    let qualified = table.qualified_name();
    let namespace = match opts.avro_compat {
        AvroCompat::Walcast => format!(
            "{}.{}.{}",
            sanitize_namespace(prefix),
            sanitize_name(&table.schema),
            sanitize_name(&table.name)
        ),
        // Debezium adjusts `<prefix>.<schema>.<table>` as one name: a dot
        // in an identifier stays a dot (one more namespace level).
        AvroCompat::Debezium => {
            sanitize_namespace(&format!("{prefix}.{}.{}", table.schema, table.name))
        }
    };
    let fields = field_names(table, opts.field_name_adjustment)?;
    let defaults: Vec<Option<walcast_sdk::Value>> = table
        .columns
        .iter()
        .map(|c| match opts.avro_compat {
            AvroCompat::Walcast => None,
            AvroCompat::Debezium => crate::debezium::column_default(c).filter(|v| {
                crate::debezium::default_json(&c.pg_type, c.type_modifier, v).is_some()
            }),
        })
        .collect();

    let key_indexes = key_order(table, opts);
    let key = if key_indexes.is_empty() {
        None
    } else {
        let mut named = HashSet::new();
        let key_fields: Vec<Json> = key_indexes
            .iter()
            .map(|&i| {
                field(
                    &table.columns[i],
                    &fields[i],
                    table.columns[i].nullable,
                    defaults[i].as_ref(),
                    opts,
                    &mut named,
                )
            })
            .collect();
        let json = json!({
            "type": "record",
            "name": "Key",
            "namespace": namespace,
            "fields": key_fields,
            "connect.name": format!("{namespace}.Key"),
            TABLE_ATTRIBUTE: qualified,
        });
        Some(parse(json, &qualified)?)
    };

    let mut named = HashSet::new();
    let row_fields: Vec<Json> = table
        .columns
        .iter()
        .zip(&fields)
        .zip(&defaults)
        .map(|((c, f), d)| {
            field(
                c,
                f,
                row_field_nullable(c, opts),
                d.as_ref(),
                opts,
                &mut named,
            )
        })
        .collect();
    let row = json!({
        "type": "record",
        "name": "Value",
        "fields": row_fields,
        "connect.name": format!("{namespace}.Value"),
        TABLE_ATTRIBUTE: qualified,
    });
    let envelope_fields = match opts.avro_compat {
        AvroCompat::Walcast => json!([
            {"name": "before", "type": ["null", row], "default": null},
            {"name": "after", "type": ["null", "Value"], "default": null},
            {"name": "source", "type": source_record()},
            {"name": "op", "type": "string"},
            {"name": "ts_ms", "type": ["null", "long"], "default": null},
            {"name": "ts_us", "type": ["null", "long"], "default": null},
            {"name": "ts_ns", "type": ["null", "long"], "default": null},
            {"name": "transaction", "type": ["null", transaction_record()], "default": null},
        ]),
        // Debezium's order: `transaction` comes before `op`.
        AvroCompat::Debezium => json!([
            {"name": "before", "type": ["null", row], "default": null},
            {"name": "after", "type": ["null", "Value"], "default": null},
            {"name": "source", "type": crate::debezium::source_record()},
            {"name": "transaction", "type": ["null", transaction_record()], "default": null},
            {"name": "op", "type": "string"},
            {"name": "ts_ms", "type": ["null", "long"], "default": null},
            {"name": "ts_us", "type": ["null", "long"], "default": null},
            {"name": "ts_ns", "type": ["null", "long"], "default": null},
        ]),
    };
    let value = json!({
        "type": "record",
        "name": "Envelope",
        "namespace": namespace,
        "fields": envelope_fields,
        "connect.version": 2,
        "connect.name": format!("{namespace}.Envelope"),
        TABLE_ATTRIBUTE: qualified,
    });
    let value = parse(value, &qualified)?;
    Ok(TableSchemas {
        namespace,
        key,
        value,
        fields,
        defaults,
    })
}

/// The key's columns in the order of its fields: column order in walcast's
/// shape, the key index's order under `avro_compat = "debezium"` (as
/// Debezium's key schema has them). Column order is kept in walcast's own
/// shape because the key's bytes choose the Kafka partition: reordering
/// would move every composite key of a running pipeline to another one.
pub fn key_order(table: &TableSchema, opts: &MappingOptions) -> Vec<usize> {
    match opts.avro_compat {
        AvroCompat::Walcast => table.key_indexes(),
        AvroCompat::Debezium => table.key_indexes_in_index_order(),
    }
}

/// Whether a column of the row record admits null: see the module doc.
/// With `avro_compat = "debezium"`, exactly the nullable columns, as
/// Debezium declares them.
pub fn row_field_nullable(column: &Column, opts: &MappingOptions) -> bool {
    match opts.avro_compat {
        AvroCompat::Walcast => column.nullable || !column.key,
        AvroCompat::Debezium => column.nullable,
    }
}

/// The key schema with a string field `name` appended (the topic router's
/// table identifier, see `walcast_sdk::KeyField`).
pub fn with_key_field(
    key: &AvroSchema,
    name: &str,
    table: &str,
) -> Result<AvroSchema, MappingError> {
    let mut json = key.json().clone();
    if let Some(fields) = json.get_mut("fields").and_then(Json::as_array_mut) {
        fields.push(json!({"name": name, "type": "string"}));
    }
    parse(json, table)
}

fn parse(json: Json, table: &str) -> Result<AvroSchema, MappingError> {
    let schema = Schema::parse(&json).map_err(|e| MappingError::Invalid {
        table: table.to_string(),
        source: Box::new(e),
    })?;
    Ok(AvroSchema::from_parts(json, schema))
}

fn field_names(
    table: &TableSchema,
    mode: FieldNameAdjustment,
) -> Result<Vec<String>, MappingError> {
    let mut seen: BTreeMap<String, &str> = BTreeMap::new();
    let mut out = Vec::with_capacity(table.columns.len());
    for c in &table.columns {
        let f = field_name(&c.name, mode);
        if let Some(first) = seen.insert(f.clone(), &c.name) {
            return Err(MappingError::FieldCollision {
                table: table.qualified_name(),
                first: first.to_string(),
                second: c.name.clone(),
                field: f,
            });
        }
        out.push(f);
    }
    Ok(out)
}

fn field(
    column: &Column,
    name: &str,
    nullable: bool,
    default: Option<&walcast_sdk::Value>,
    opts: &MappingOptions,
    named: &mut HashSet<&'static str>,
) -> Json {
    let mut ty = match opts.avro_compat {
        AvroCompat::Walcast => avro_type(&column.pg_type, opts, named),
        AvroCompat::Debezium => {
            crate::debezium::column_type(&column.pg_type, column.type_modifier, opts, named)
        }
    };
    // A default (avro_compat = "debezium"): the field's `default`, and
    // `connect.default` on its type, as Connect's AvroData writes them.
    let default = default
        .and_then(|v| crate::debezium::default_json(&column.pg_type, column.type_modifier, v));
    if let Some(d) = &default {
        ty = match ty {
            Json::String(t) => json!({"type": t, "connect.default": d}),
            Json::Object(mut o) => {
                o.insert("connect.default".into(), d.clone());
                Json::Object(o)
            }
            other => other,
        };
    }
    let mut f = Map::new();
    f.insert("name".into(), json!(name));
    match (nullable, default) {
        (true, None) => {
            f.insert("type".into(), json!(["null", ty]));
            f.insert("default".into(), Json::Null);
        }
        // The default's branch first: an Avro default is of the first.
        (true, Some(d)) => {
            f.insert("type".into(), json!([ty, "null"]));
            f.insert("default".into(), d);
        }
        (false, d) => {
            f.insert("type".into(), ty);
            if let Some(d) = d {
                f.insert("default".into(), d);
            }
        }
    }
    if name != column.name {
        f.insert(COLUMN_ATTRIBUTE.into(), json!(column.name));
    }
    Json::Object(f)
}

/// The Avro type (never a null union) of a Postgres type. `named` holds the
/// named types already defined in the schema being built: Avro allows one
/// definition per name, later uses are references.
pub fn avro_type(pg: &PgType, opts: &MappingOptions, named: &mut HashSet<&'static str>) -> Json {
    match pg {
        PgType::Bool => json!("boolean"),
        PgType::Int2 | PgType::Int4 => json!("int"),
        PgType::Int8 => json!("long"),
        PgType::Float4 => json!("float"),
        PgType::Float8 => json!("double"),
        PgType::Numeric {
            precision: Some(p),
            scale,
        } => decimal(*p, scale.unwrap_or(0)),
        PgType::Numeric {
            precision: None, ..
        } => match opts.unconstrained_numeric {
            UnconstrainedNumeric::String => json!("string"),
            UnconstrainedNumeric::Double => json!("double"),
            UnconstrainedNumeric::VariableScale => {
                if !named.insert(VARIABLE_SCALE_DECIMAL) {
                    return json!(VARIABLE_SCALE_DECIMAL);
                }
                json!({
                    "type": "record",
                    "name": "VariableScaleDecimal",
                    "namespace": "io.debezium.data",
                    "doc": "Variable scaled decimal",
                    "fields": [{"name": "scale", "type": "int"}, {"name": "value", "type": "bytes"}],
                    "connect.version": 1,
                    "connect.name": VARIABLE_SCALE_DECIMAL,
                })
            }
        },
        PgType::Money => decimal(MONEY_PRECISION, MONEY_SCALE),
        PgType::Text
        | PgType::Varchar { .. }
        | PgType::Char { .. }
        | PgType::Name
        | PgType::Inet
        | PgType::Cidr
        | PgType::MacAddr
        | PgType::MacAddr8
        | PgType::Unknown { .. } => json!("string"),
        PgType::Bytea => json!("bytes"),
        PgType::Uuid => {
            json!({"type": "string", "logicalType": "uuid", "connect.version": 1, "connect.name": "io.debezium.data.Uuid"})
        }
        PgType::Json | PgType::Jsonb => {
            json!({"type": "string", "connect.version": 1, "connect.name": "io.debezium.data.Json"})
        }
        PgType::Date => {
            json!({"type": "int", "logicalType": "date", "connect.version": 1, "connect.name": "io.debezium.time.Date"})
        }
        PgType::Time => {
            json!({"type": "long", "logicalType": "time-micros", "connect.version": 1, "connect.name": "io.debezium.time.MicroTime"})
        }
        PgType::TimeTz => {
            json!({"type": "string", "connect.version": 1, "connect.name": "io.debezium.time.ZonedTime"})
        }
        PgType::Timestamp => json!({
            "type": "long",
            "logicalType": "local-timestamp-micros",
            "connect.version": 1,
            "connect.name": "io.debezium.time.MicroTimestamp",
        }),
        PgType::TimestampTz => json!({"type": "long", "logicalType": "timestamp-micros"}),
        PgType::Interval => {
            json!({"type": "long", "connect.version": 1, "connect.name": "io.debezium.time.MicroDuration"})
        }
        PgType::Enum { labels, .. } => json!({
            "type": "string",
            "connect.version": 1,
            "connect.parameters": {"allowed": labels.join(",")},
            "connect.name": "io.debezium.data.Enum",
        }),
        PgType::Array { element } => {
            json!({"type": "array", "items": ["null", avro_type(element, opts, named)]})
        }
    }
}

/// The Postgres type of each column of an envelope schema written by
/// [`derive`], keyed by column name: what a relay knows of the columns'
/// types (the envelope's JSON carries none). The inverse of [`avro_type`]
/// where the Avro type tells: logical types and Debezium's `connect.name`
/// give dates, times, decimals, uuids, JSON, enums and intervals back;
/// `int` comes back as `integer`, and types that travel as plain strings
/// (`inet`, `cidr`, `macaddr`, an unconstrained `numeric` under the default
/// `unconstrained_numeric = "string"`) come back as `text`. Empty for a
/// schema that is not such an envelope.
pub fn column_types(envelope: &Json) -> std::collections::HashMap<String, PgType> {
    let mut out = std::collections::HashMap::new();
    let Some(fields) = envelope["fields"].as_array() else {
        return out;
    };
    // `before` defines the row record; `after` refers to it by name.
    let row = fields
        .iter()
        .filter(|f| f["name"] == "before" || f["name"] == "after")
        .filter_map(|f| non_null(&f["type"]))
        .find(|t| t["type"] == "record");
    let Some(row_fields) = row.and_then(|r| r["fields"].as_array()) else {
        return out;
    };
    for f in row_fields {
        let name = f[COLUMN_ATTRIBUTE]
            .as_str()
            .or_else(|| f["name"].as_str())
            .unwrap_or_default();
        if let Some(t) = non_null(&f["type"]) {
            out.insert(name.to_string(), pg_type_of(t));
        }
    }
    out
}

/// The column names of a record schema's fields, in the schema's order
/// (the original name where the Avro name was sanitised): a key schema
/// gives the key columns in the table's order, which a decoded JSON map
/// has lost.
pub fn record_columns(record: &Json) -> Vec<String> {
    record["fields"]
        .as_array()
        .map(|fields| {
            fields
                .iter()
                .filter_map(|f| f[COLUMN_ATTRIBUTE].as_str().or_else(|| f["name"].as_str()))
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

/// The non-null branch of a `["null", T]` union, or the type itself.
fn non_null(t: &Json) -> Option<&Json> {
    match t {
        Json::Array(branches) => branches.iter().find(|b| *b != "null"),
        Json::Null => None,
        other => Some(other),
    }
}

fn pg_type_of(t: &Json) -> PgType {
    let unknown = || PgType::Unknown {
        type_name: "relayed".into(),
    };
    if let Some(name) = t.as_str() {
        return match name {
            "boolean" => PgType::Bool,
            "int" => PgType::Int4,
            "long" => PgType::Int8,
            "float" => PgType::Float4,
            "double" => PgType::Float8,
            "string" => PgType::Text,
            "bytes" => PgType::Bytea,
            VARIABLE_SCALE_DECIMAL => PgType::Numeric {
                precision: None,
                scale: None,
            },
            _ => unknown(),
        };
    }
    let u32_of = |v: &Json| {
        v.as_u64()
            .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
            .map(|n| n as u32)
    };
    match t["logicalType"].as_str() {
        Some("decimal") => {
            return PgType::Numeric {
                precision: u32_of(&t["precision"]),
                scale: u32_of(&t["scale"]).or(Some(0)),
            }
        }
        Some("uuid") => return PgType::Uuid,
        Some("date") => return PgType::Date,
        Some("time-micros") => return PgType::Time,
        Some("local-timestamp-micros") => return PgType::Timestamp,
        Some("timestamp-micros") => return PgType::TimestampTz,
        _ => {}
    }
    match t["connect.name"].as_str() {
        Some("io.debezium.data.Json") => return PgType::Jsonb,
        Some("io.debezium.time.ZonedTime") => return PgType::TimeTz,
        Some("io.debezium.time.MicroDuration") => return PgType::Interval,
        Some("io.debezium.time.MicroTimestamp") => return PgType::Timestamp,
        Some("io.debezium.time.ZonedTimestamp") => return PgType::TimestampTz,
        Some("io.debezium.time.Date") => return PgType::Date,
        Some("io.debezium.data.Uuid") => return PgType::Uuid,
        Some(VARIABLE_SCALE_DECIMAL) => {
            return PgType::Numeric {
                precision: None,
                scale: None,
            }
        }
        Some("io.debezium.data.Enum") => {
            return PgType::Enum {
                type_name: "enum".into(),
                labels: t["connect.parameters"]["allowed"]
                    .as_str()
                    .map(|a| a.split(',').map(str::to_string).collect())
                    .unwrap_or_default(),
            }
        }
        _ => {}
    }
    match t["type"].as_str() {
        Some("array") => match non_null(&t["items"]) {
            Some(items) => PgType::Array {
                element: Box::new(pg_type_of(items)),
            },
            None => unknown(),
        },
        Some("record") => unknown(),
        Some(_) => pg_type_of(&t["type"]),
        None => unknown(),
    }
}

/// Avro requires `scale <= precision`; Postgres allows `numeric(2,5)`
/// (values below 0.001), which needs `precision = scale` digits in Avro.
fn decimal(precision: u32, scale: u32) -> Json {
    let precision = precision.max(scale).max(1);
    json!({
        "type": "bytes",
        "logicalType": "decimal",
        "precision": precision,
        "scale": scale,
        "connect.version": 1,
        "connect.parameters": {"scale": scale.to_string(), "connect.decimal.precision": precision.to_string()},
        "connect.name": "org.apache.kafka.connect.data.Decimal",
    })
}

fn source_record() -> Json {
    json!({
        "type": "record",
        "name": "Source",
        "namespace": "io.debezium.connector.postgresql",
        "fields": [
            {"name": "version", "type": "string"},
            {"name": "connector", "type": "string"},
            {"name": "name", "type": "string"},
            {"name": "ts_ms", "type": "long"},
            {"name": "ts_us", "type": ["null", "long"], "default": null},
            {"name": "ts_ns", "type": ["null", "long"], "default": null},
            {"name": "snapshot", "type": "string", "default": "false"},
            {"name": "db", "type": "string"},
            {"name": "schema", "type": "string"},
            {"name": "table", "type": "string"},
            {"name": "txId", "type": ["null", "long"], "default": null},
            {"name": "lsn", "type": ["null", "long"], "default": null},
            {"name": "xmin", "type": ["null", "long"], "default": null},
            {"name": "commit_lsn", "type": ["null", "long"], "default": null},
        ],
        "connect.name": SOURCE_RECORD,
    })
}

fn transaction_record() -> Json {
    json!({
        "type": "record",
        "name": "block",
        "namespace": "event",
        "fields": [
            {"name": "id", "type": "string"},
            {"name": "total_order", "type": "long"},
            {"name": "data_collection_order", "type": "long"},
        ],
        "connect.version": 1,
        "connect.name": TRANSACTION_RECORD,
    })
}

/// An identifier as a valid Avro name: `[A-Za-z_][A-Za-z0-9_]*`.
pub fn sanitize_name(ident: &str) -> String {
    let mut out: String = ident
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if out.is_empty() || out.starts_with(|c: char| c.is_ascii_digit()) {
        out.insert(0, '_');
    }
    out
}

/// A column name as an Avro field name, under `mode`.
pub fn field_name(ident: &str, mode: FieldNameAdjustment) -> String {
    match mode {
        FieldNameAdjustment::Avro => sanitize_name(ident),
        FieldNameAdjustment::AvroUnicode => {
            let mut out = String::with_capacity(ident.len());
            for (i, c) in ident.chars().enumerate() {
                if c.is_ascii_alphabetic() || (c.is_ascii_digit() && i > 0) {
                    out.push(c);
                } else {
                    let mut units = [0u16; 2];
                    for u in c.encode_utf16(&mut units) {
                        out.push_str(&format!("_u{u:04x}"));
                    }
                }
            }
            out
        }
    }
}

/// A dotted namespace with each component sanitised.
pub fn sanitize_namespace(ns: &str) -> String {
    ns.split('.')
        .map(sanitize_name)
        .collect::<Vec<_>>()
        .join(".")
}

#[cfg(test)]
mod tests {
    use super::*;
    use apache_avro::schema::{RecordSchema, UnionSchema};
    use walcast_sdk::ReplicaIdentity;

    fn col(name: &str, pg_type: PgType, nullable: bool, key: bool) -> Column {
        Column {
            key_position: None,
            default: None,
            name: name.into(),
            pg_type,
            type_oid: 0,
            type_modifier: -1,
            nullable,
            key,
        }
    }

    fn table(columns: Vec<Column>) -> TableSchema {
        TableSchema {
            relation_id: 1,
            schema: "public".into(),
            name: "orders".into(),
            columns,
            replica_identity: ReplicaIdentity::Default,
            version: 1,
        }
    }

    fn record(schema: &Schema) -> &RecordSchema {
        match schema {
            Schema::Record(r) => r,
            other => panic!("not a record: {other:?}"),
        }
    }

    /// The parsed type of every PgType, each checked against what
    /// apache-avro made of our JSON (so a misspelt logicalType, which Avro
    /// silently ignores, fails here).
    #[test]
    fn every_pg_type_maps_to_its_avro_type() {
        let elem = Box::new(PgType::Int4);
        let cases: Vec<(PgType, &str)> = vec![
            (PgType::Bool, "Boolean"),
            (PgType::Int2, "Int"),
            (PgType::Int4, "Int"),
            (PgType::Int8, "Long"),
            (PgType::Float4, "Float"),
            (PgType::Float8, "Double"),
            (
                PgType::Numeric {
                    precision: Some(10),
                    scale: Some(2),
                },
                "Decimal(10,2)",
            ),
            (
                PgType::Numeric {
                    precision: Some(2),
                    scale: Some(5),
                },
                "Decimal(5,5)",
            ),
            (
                PgType::Numeric {
                    precision: Some(7),
                    scale: None,
                },
                "Decimal(7,0)",
            ),
            (
                PgType::Numeric {
                    precision: None,
                    scale: None,
                },
                "String",
            ),
            (PgType::Money, "Decimal(19,2)"),
            (PgType::Text, "String"),
            (
                PgType::Varchar {
                    max_length: Some(3),
                },
                "String",
            ),
            (PgType::Char { length: Some(1) }, "String"),
            (PgType::Name, "String"),
            (PgType::Bytea, "Bytes"),
            (PgType::Uuid, "Uuid"),
            (PgType::Json, "String"),
            (PgType::Jsonb, "String"),
            (PgType::Date, "Date"),
            (PgType::Time, "TimeMicros"),
            (PgType::TimeTz, "String"),
            (PgType::Timestamp, "LocalTimestampMicros"),
            (PgType::TimestampTz, "TimestampMicros"),
            (PgType::Interval, "Long"),
            (PgType::Inet, "String"),
            (PgType::Cidr, "String"),
            (PgType::MacAddr, "String"),
            (PgType::MacAddr8, "String"),
            (
                PgType::Enum {
                    type_name: "mood".into(),
                    labels: vec!["sad".into(), "ok".into()],
                },
                "String",
            ),
            (PgType::Array { element: elem }, "Array(Union(Null,Int))"),
            (
                PgType::Unknown {
                    type_name: "tsvector".into(),
                },
                "String",
            ),
        ];
        for (pg, expected) in cases {
            let json = avro_type(&pg, &MappingOptions::default(), &mut HashSet::new());
            let parsed = Schema::parse(&json).unwrap_or_else(|e| panic!("{pg:?}: {e}"));
            assert_eq!(describe(&parsed), expected, "{pg:?} -> {json}");
        }
    }

    fn describe(s: &Schema) -> String {
        match s {
            Schema::Boolean => "Boolean".into(),
            Schema::Int => "Int".into(),
            Schema::Long => "Long".into(),
            Schema::Float => "Float".into(),
            Schema::Double => "Double".into(),
            Schema::String => "String".into(),
            Schema::Bytes => "Bytes".into(),
            Schema::Null => "Null".into(),
            Schema::Uuid(_) => "Uuid".into(),
            Schema::Date => "Date".into(),
            Schema::TimeMicros => "TimeMicros".into(),
            Schema::LocalTimestampMicros => "LocalTimestampMicros".into(),
            Schema::TimestampMicros => "TimestampMicros".into(),
            Schema::Decimal(d) => format!("Decimal({},{})", d.precision, d.scale),
            Schema::Record(r) => format!("Record({})", r.name.fullname(None)),
            Schema::Array(a) => format!("Array({})", describe(&a.items)),
            Schema::Union(u) => format!(
                "Union({})",
                u.variants()
                    .iter()
                    .map(describe)
                    .collect::<Vec<_>>()
                    .join(",")
            ),
            other => format!("{other:?}"),
        }
    }

    #[test]
    fn unconstrained_numeric_follows_the_option() {
        let pg = PgType::Numeric {
            precision: None,
            scale: None,
        };
        for (mode, expected) in [
            (UnconstrainedNumeric::String, "String"),
            (UnconstrainedNumeric::Double, "Double"),
        ] {
            let json = avro_type(
                &pg,
                &MappingOptions {
                    unconstrained_numeric: mode,
                    ..Default::default()
                },
                &mut HashSet::new(),
            );
            assert_eq!(describe(&Schema::parse(&json).unwrap()), expected);
        }
        let mode: UnconstrainedNumeric = serde_json::from_str("\"variable_scale\"").unwrap();
        assert_eq!(mode, UnconstrainedNumeric::VariableScale);
        assert!(serde_json::from_str::<UnconstrainedNumeric>("\"float\"").is_err());
    }

    #[test]
    fn envelope_has_debezium_shape_and_names() {
        let t = table(vec![
            col("id", PgType::Int8, false, true),
            col(
                "total",
                PgType::Numeric {
                    precision: None,
                    scale: None,
                },
                true,
                false,
            ),
            col(
                "fee",
                PgType::Numeric {
                    precision: None,
                    scale: None,
                },
                false,
                false,
            ),
            col("note", PgType::Text, false, false),
        ]);
        let variable_scale = MappingOptions {
            unconstrained_numeric: UnconstrainedNumeric::VariableScale,
            ..Default::default()
        };
        let s = derive(&t, "shop", &variable_scale).unwrap();
        assert_eq!(s.namespace, "shop.public.orders");
        assert_eq!(
            s.value.full_name().as_deref(),
            Some("shop.public.orders.Envelope")
        );
        let key = s.key.as_ref().unwrap();
        assert_eq!(key.full_name().as_deref(), Some("shop.public.orders.Key"));
        assert_eq!(describe(&record(key.schema()).fields[0].schema), "Long");

        let env = record(s.value.schema());
        let names: Vec<_> = env.fields.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "before",
                "after",
                "source",
                "op",
                "ts_ms",
                "ts_us",
                "ts_ns",
                "transaction"
            ]
        );
        let Schema::Union(before) = &env.fields[0].schema else {
            panic!("before is not a union")
        };
        let row = record(&before.variants()[1]);
        assert_eq!(row.name.fullname(None), "shop.public.orders.Value");
        // A NOT NULL non-key column is still nullable: see the module doc.
        assert_eq!(describe(&row.fields[3].schema), "Union(Null,String)");
        assert_eq!(describe(&row.fields[0].schema), "Long");
        let source = record(&env.fields[2].schema);
        assert_eq!(source.name.fullname(None), SOURCE_RECORD);
        let source_fields: Vec<_> = source.fields.iter().map(|f| f.name.as_str()).collect();
        for f in [
            "version",
            "connector",
            "name",
            "ts_ms",
            "snapshot",
            "db",
            "schema",
            "table",
            "txId",
            "lsn",
            "ts_us",
            "ts_ns",
            "xmin",
        ] {
            assert!(source_fields.contains(&f), "source lacks {f}");
        }
        let Schema::Union(tx) = &env.fields[7].schema else {
            panic!("transaction is not a union")
        };
        assert_eq!(
            record(&tx.variants()[1]).name.fullname(None),
            TRANSACTION_RECORD
        );
        // The second unconstrained numeric refers to the first definition.
        assert!(
            s.value
                .text()
                .matches("\"name\":\"VariableScaleDecimal\"")
                .count()
                == 1
        );
        let _: &UnionSchema = before;
    }

    #[test]
    fn keyless_table_has_no_key_schema() {
        let t = table(vec![col("a", PgType::Text, true, false)]);
        assert!(derive(&t, "p", &MappingOptions::default())
            .unwrap()
            .key
            .is_none());
    }

    #[test]
    fn invalid_identifiers_are_sanitised_and_kept() {
        assert_eq!(sanitize_name("order-lines"), "order_lines");
        assert_eq!(sanitize_name("1st"), "_1st");
        assert_eq!(sanitize_name("café"), "caf_");
        assert_eq!(sanitize_namespace("my-app.v2"), "my_app.v2");
        let u = |s: &str| field_name(s, FieldNameAdjustment::AvroUnicode);
        assert_eq!(u("名前"), "_u540d_u524d");
        assert_eq!(u("値段"), "_u5024_u6bb5");
        assert_eq!(u("a_b"), "a_u005fb");
        assert_eq!(u("1st"), "_u0031st");
        assert_eq!(u("plain"), "plain");
        assert_ne!(u("a_b"), u("a-b"));
        let mut t = table(vec![
            col("line id", PgType::Int4, false, true),
            col("2nd", PgType::Text, true, false),
        ]);
        t.schema = "Sales Data".into();
        t.name = "order.lines".into();
        let s = derive(&t, "my-app", &MappingOptions::default()).unwrap();
        assert_eq!(s.namespace, "my_app.Sales_Data.order_lines");
        assert_eq!(s.fields, ["line_id", "_2nd"]);
        assert_eq!(
            s.value.json()["walcast.table"],
            json!("Sales Data.order.lines")
        );
        assert!(s.value.text().contains("\"walcast.column\":\"line id\""));
    }

    #[test]
    fn colliding_sanitised_columns_are_refused() {
        let t = table(vec![
            col("a-b", PgType::Int4, false, true),
            col("a_b", PgType::Text, true, false),
        ]);
        let err = derive(&t, "p", &MappingOptions::default()).unwrap_err();
        assert!(matches!(err, MappingError::FieldCollision { .. }), "{err}");
        assert!(err.to_string().contains("public.orders"), "{err}");
    }

    #[test]
    fn fingerprint_ignores_attributes_and_formatting() {
        let a = AvroSchema::parse_str(r#"{"type":"record","name":"R","fields":[{"name":"x","type":"int"}],"connect.name":"R"}"#).unwrap();
        let b = AvroSchema::parse_str("{ \"type\": \"record\", \"name\": \"R\",\n \"fields\": [ {\"name\": \"x\", \"type\": \"int\"} ] }").unwrap();
        let c = AvroSchema::parse_str(
            r#"{"type":"record","name":"R","fields":[{"name":"x","type":"long"}]}"#,
        )
        .unwrap();
        assert_eq!(a.fingerprint(), b.fingerprint());
        assert_ne!(a.fingerprint(), c.fingerprint());
    }

    #[test]
    fn column_types_read_back_what_derive_wrote() {
        let cols = [
            ("id", PgType::Int8),
            ("f", PgType::Float8),
            ("r", PgType::Float4),
            (
                "price",
                PgType::Numeric {
                    precision: Some(10),
                    scale: Some(2),
                },
            ),
            (
                "n",
                PgType::Numeric {
                    precision: None,
                    scale: None,
                },
            ),
            ("d", PgType::Date),
            ("ts", PgType::Timestamp),
            ("tstz", PgType::TimestampTz),
            ("j", PgType::Jsonb),
            ("u", PgType::Uuid),
            ("b", PgType::Bytea),
            ("order-no", PgType::Text),
            (
                "tags",
                PgType::Array {
                    element: Box::new(PgType::TimestampTz),
                },
            ),
            ("ip", PgType::Inet),
        ];
        let table = TableSchema {
            relation_id: 1,
            schema: "public".into(),
            name: "t".into(),
            columns: cols
                .iter()
                .map(|(n, t)| Column {
                    key_position: None,
                    default: None,
                    name: n.to_string(),
                    pg_type: t.clone(),
                    type_oid: 0,
                    type_modifier: -1,
                    nullable: true,
                    key: *n == "id",
                })
                .collect(),
            replica_identity: ReplicaIdentity::Default,
            version: 1,
        };
        for numeric in [
            UnconstrainedNumeric::String,
            UnconstrainedNumeric::VariableScale,
        ] {
            let opts = MappingOptions {
                unconstrained_numeric: numeric,
                ..Default::default()
            };
            let schemas = derive(&table, "shop", &opts).unwrap();
            // Through the text a registry hands back.
            let back: Json = serde_json::from_str(&schemas.value.text()).unwrap();
            let types = column_types(&back);
            for (name, pg) in &cols {
                let expected = match (name, numeric) {
                    (&"n", UnconstrainedNumeric::String) | (&"ip", _) => PgType::Text,
                    _ => pg.clone(),
                };
                assert_eq!(types[*name], expected, "{name} with {numeric:?}");
            }
        }
    }
}
