//! Change events to Avro binary and back, against the schemas of
//! [`crate::mapping`]. No I/O: the registry lookups live in the encoder and
//! decoder.
//!
//! Encoding writes the Avro binary directly, field by field in the order
//! the schema of [`crate::mapping::derive`] declares (see [`crate::binary`]);
//! the tests decode every output with apache-avro against that schema and
//! check that re-encoding it gives the same bytes, so the two cannot drift
//! apart unnoticed. Decoding uses apache-avro.
//!
//! Values Avro cannot hold are refused here with the table and column
//! named ([`EncodeError::Invalid`]); the pipeline's policy then halts or
//! dead-letters.

use std::collections::HashMap;

use apache_avro::reader::datum::GenericDatumReader;
use apache_avro::schema::{Name, ResolvedSchema};
use apache_avro::types::Value as Avro;
use apache_avro::Schema;
use base64::Engine;
use num_bigint::{BigInt, Sign};
use serde_json::{json, Map, Value as Json};
use walcast_sdk::json::{timestamp_utc, DEFAULT_UNAVAILABLE_PLACEHOLDER};
use walcast_sdk::{ChangeEvent, Column, EncodeError, Numeric, PgType, TableSchema, Value};

use crate::binary as bin;
use crate::mapping::{
    row_field_nullable, AvroCompat, MappingOptions, TableSchemas, UnconstrainedNumeric,
    COLUMN_ATTRIBUTE, VARIABLE_SCALE_DECIMAL,
};

/// Why a datum could not be read. Definite: the bytes do not match the
/// schema they name.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("Avro datum does not match its writer schema `{schema}`: {source}")]
    Datum {
        schema: String,
        #[source]
        source: Box<apache_avro::Error>,
    },
    #[error("writer schema `{schema}` has unresolvable names: {source}")]
    Names {
        schema: String,
        #[source]
        source: Box<apache_avro::Error>,
    },
}

/// The Avro binary of the event's key, or `None` for a key-less table or a
/// truncate.
pub fn encode_key(
    event: &ChangeEvent,
    schemas: &TableSchemas,
    opts: &MappingOptions,
) -> Result<Option<Vec<u8>>, EncodeError> {
    let mut out = Vec::new();
    Ok(encode_key_into(event, schemas, opts, &mut out)?.then_some(out))
}

/// Appends the key's Avro binary to `out`; false (and nothing written) for
/// a key-less table or a truncate.
pub fn encode_key_into(
    event: &ChangeEvent,
    schemas: &TableSchemas,
    opts: &MappingOptions,
    out: &mut Vec<u8>,
) -> Result<bool, EncodeError> {
    let (Some(_), Some(row)) = (&schemas.key, event.identity_row()) else {
        return Ok(false);
    };
    let table = &event.table;
    for i in crate::mapping::key_order(table, opts) {
        let c = &table.columns[i];
        let v = row.get(i).unwrap_or(&Value::Null);
        field(out, table, c, v, c.nullable, None, opts)?;
    }
    Ok(true)
}

/// The Avro binary of the event's Debezium envelope.
pub fn encode_value(
    event: &ChangeEvent,
    schemas: &TableSchemas,
    opts: &MappingOptions,
) -> Result<Vec<u8>, EncodeError> {
    let mut out = Vec::with_capacity(256);
    encode_value_into(event, schemas, opts, &mut out)?;
    Ok(out)
}

/// Appends the envelope's Avro binary to `out`, field by field in the order
/// of [`crate::mapping::derive`]'s schema (`before`, `after`, `source`,
/// `op`, `ts_ms`, `transaction`).
pub fn encode_value_into(
    event: &ChangeEvent,
    schemas: &TableSchemas,
    opts: &MappingOptions,
    out: &mut Vec<u8>,
) -> Result<(), EncodeError> {
    let table = &event.table;
    if schemas.fields.len() != table.columns.len() {
        return Err(invalid(
            table,
            "*",
            format!(
                "schema has {} fields for {} columns",
                schemas.fields.len(),
                table.columns.len()
            ),
        ));
    }
    image(out, table, event.before.as_deref(), &schemas.defaults, opts)?;
    image(out, table, event.after.as_deref(), &schemas.defaults, opts)?;
    if opts.avro_compat == AvroCompat::Debezium {
        debezium_envelope_rest(out, event);
        return Ok(());
    }
    let s = &event.source;
    bin::string(out, env!("CARGO_PKG_VERSION"));
    bin::string(out, "postgresql");
    bin::string(out, &s.name);
    bin::long(out, s.ts_ms);
    optional_long(out, Some(s.ts_us));
    optional_long(out, Some(s.ts_us.saturating_mul(1000)));
    bin::string(out, s.snapshot.as_str());
    bin::string(out, &s.db);
    bin::string(out, &table.schema);
    bin::string(out, &table.name);
    optional_long(out, s.tx_id.map(i64::from));
    optional_long(out, Some(s.lsn.0 as i64));
    optional_long(out, None); // xmin: not tracked, as in Debezium by default
    optional_long(out, Some(s.commit_lsn.0 as i64));
    bin::string(out, event.op.code());
    optional_long(out, Some(event.ts_ms));
    // Debezium 3's ts_us and ts_ns: the same processing time, kept in ms.
    optional_long(out, Some(event.ts_ms.saturating_mul(1000)));
    optional_long(out, Some(event.ts_ms.saturating_mul(1_000_000)));
    match &event.transaction {
        None => bin::long(out, NULL_BRANCH),
        Some(t) => {
            bin::long(out, VALUE_BRANCH);
            bin::string(out, &t.id);
            bin::long(out, t.total_order as i64);
            bin::long(out, t.data_collection_order as i64);
        }
    }
    Ok(())
}

/// `source`, `transaction`, `op` and the times of the envelope in
/// Debezium's order and shape ([`crate::debezium::source_record`]).
fn debezium_envelope_rest(out: &mut Vec<u8>, event: &ChangeEvent) {
    let s = &event.source;
    let table = &event.table;
    bin::string(out, env!("CARGO_PKG_VERSION"));
    bin::string(out, "postgresql");
    bin::string(out, &s.name);
    bin::long(out, s.ts_ms);
    // snapshot: ["Enum string", "null"], the string first.
    bin::long(out, 0);
    bin::string(out, s.snapshot.as_str());
    bin::string(out, &s.db);
    optional_long(out, None); // sequence: walcast does not keep the previous commit's LSN
    optional_long(out, Some(s.ts_us));
    optional_long(out, Some(s.ts_us.saturating_mul(1000)));
    bin::string(out, &table.schema);
    bin::string(out, &table.name);
    optional_long(out, s.tx_id.map(i64::from));
    optional_long(out, Some(s.lsn.0 as i64));
    optional_long(out, None); // xmin: not tracked, as in Debezium by default
    optional_long(out, None); // origin: not carried yet (null without replication origins)
    optional_long(out, None); // origin_lsn
    optional_long(out, Some(s.commit_lsn.0 as i64));
    match &event.transaction {
        None => bin::long(out, NULL_BRANCH),
        Some(t) => {
            bin::long(out, VALUE_BRANCH);
            bin::string(out, &t.id);
            bin::long(out, t.total_order as i64);
            bin::long(out, t.data_collection_order as i64);
        }
    }
    bin::string(out, event.op.code());
    optional_long(out, Some(event.ts_ms));
    optional_long(out, Some(event.ts_ms.saturating_mul(1000)));
    optional_long(out, Some(event.ts_ms.saturating_mul(1_000_000)));
}

/// Union branches of every `["null", T]` the mapping writes.
const NULL_BRANCH: i64 = 0;
const VALUE_BRANCH: i64 = 1;

fn optional_long(out: &mut Vec<u8>, v: Option<i64>) {
    match v {
        None => bin::long(out, NULL_BRANCH),
        Some(v) => {
            bin::long(out, VALUE_BRANCH);
            bin::long(out, v);
        }
    }
}

/// A `["null", Value]` row image.
fn image(
    out: &mut Vec<u8>,
    table: &TableSchema,
    row: Option<&[Value]>,
    defaults: &[Option<Value>],
    opts: &MappingOptions,
) -> Result<(), EncodeError> {
    let Some(row) = row else {
        bin::long(out, NULL_BRANCH);
        return Ok(());
    };
    if row.len() != table.columns.len() {
        return Err(invalid(
            table,
            "*",
            format!(
                "row has {} values for {} columns",
                row.len(),
                table.columns.len()
            ),
        ));
    }
    bin::long(out, VALUE_BRANCH);
    for (i, (c, v)) in table.columns.iter().zip(row).enumerate() {
        let default = defaults.get(i).and_then(Option::as_ref);
        field(out, table, c, v, row_field_nullable(c, opts), default, opts)?;
    }
    Ok(())
}

fn invalid(table: &TableSchema, column: &str, message: String) -> EncodeError {
    EncodeError::Invalid {
        table: table.qualified_name(),
        column: column.to_string(),
        message,
    }
}

/// One field of a row or key record. `default`: the column's default under
/// `avro_compat = "debezium"` (then a nullable field is `[T, "null"]`, the
/// branches the other way round).
fn field(
    out: &mut Vec<u8>,
    table: &TableSchema,
    c: &Column,
    v: &Value,
    nullable: bool,
    default: Option<&Value>,
    opts: &MappingOptions,
) -> Result<(), EncodeError> {
    let (null_branch, value_branch) = match (nullable, default) {
        (true, Some(_)) => (VALUE_BRANCH, NULL_BRANCH),
        _ => (NULL_BRANCH, VALUE_BRANCH),
    };
    if v.is_null() {
        if nullable {
            bin::long(out, null_branch);
            return Ok(());
        }
        if opts.avro_compat == AvroCompat::Debezium && !c.key {
            // A NOT NULL column the before image does not carry (REPLICA
            // IDENTITY DEFAULT): Debezium's default, or its zero value.
            match default {
                Some(d) => column_value(out, &c.pg_type, c.type_modifier, d, opts)
                    .map_err(|m| invalid(table, &c.name, m))?,
                None => crate::debezium::write_zero(out, &c.pg_type, c.type_modifier, opts),
            }
            return Ok(());
        }
        return Err(invalid(
            table,
            &c.name,
            "NULL in a column whose Avro type is not nullable (a key column)".into(),
        ));
    }
    if nullable {
        bin::long(out, value_branch);
    }
    column_value(out, &c.pg_type, c.type_modifier, v, opts).map_err(|m| invalid(table, &c.name, m))
}

/// Whether the column's Avro type is a plain string, which can carry the
/// unavailable-value placeholder.
fn is_string_typed(pg: &PgType, opts: &MappingOptions) -> bool {
    if opts.avro_compat == AvroCompat::Debezium {
        return crate::debezium::is_string_typed(pg, -1, opts);
    }
    match pg {
        PgType::Text
        | PgType::Varchar { .. }
        | PgType::Char { .. }
        | PgType::Name
        | PgType::Json
        | PgType::Jsonb
        | PgType::TimeTz
        | PgType::Inet
        | PgType::Cidr
        | PgType::MacAddr
        | PgType::MacAddr8
        | PgType::Enum { .. }
        | PgType::Unknown { .. } => true,
        PgType::Numeric {
            precision: None, ..
        } => opts.unconstrained_numeric == UnconstrainedNumeric::String,
        _ => false,
    }
}

/// Writes the non-null Avro value of one column value, of the type
/// [`crate::mapping::avro_type`] gives `pg`; the error is the message for
/// [`EncodeError::Invalid`]. On error `out` may hold part of the value: the
/// caller discards the whole record.
fn column_value(
    out: &mut Vec<u8>,
    pg: &PgType,
    typmod: i32,
    v: &Value,
    opts: &MappingOptions,
) -> Result<(), String> {
    if matches!(v, Value::Unavailable) {
        return unavailable(out, pg, opts);
    }
    if opts.avro_compat == AvroCompat::Debezium && crate::debezium::write_value(out, pg, typmod, v)?
    {
        return Ok(());
    }
    let mismatch = || {
        format!(
            "a {} column holds the captured value {v:?}, which walcast cannot convert",
            pg.sql_name()
        )
    };
    match (pg, v) {
        (PgType::Bool, Value::Bool(b)) => out.push(u8::from(*b)),
        (PgType::Int2 | PgType::Int4, Value::Int16(i)) => bin::long(out, i64::from(*i)),
        (PgType::Int2 | PgType::Int4, Value::Int32(i)) => bin::long(out, i64::from(*i)),
        (PgType::Int8, Value::Int16(i)) => bin::long(out, i64::from(*i)),
        (PgType::Int8, Value::Int32(i)) => bin::long(out, i64::from(*i)),
        (PgType::Int8, Value::Int64(i)) => bin::long(out, *i),
        (PgType::Float4, Value::Float32(f)) => out.extend_from_slice(&f.to_le_bytes()),
        (PgType::Float8, Value::Float32(f)) => out.extend_from_slice(&f64::from(*f).to_le_bytes()),
        (PgType::Float8, Value::Float64(f)) => out.extend_from_slice(&f.to_le_bytes()),
        (
            PgType::Numeric {
                precision: Some(_),
                scale,
            },
            Value::Numeric(n),
        ) => bin::bytes(out, &decimal_bytes(n, scale.unwrap_or(0))?),
        (
            PgType::Numeric {
                precision: None, ..
            },
            Value::Numeric(n),
        ) => match (opts.avro_compat, opts.unconstrained_numeric, n) {
            // Debezium 3.6's variable-scale decimal drops trailing fraction
            // zeros (`1.500` is 1.5, scale 1; `-0.000` is 0, scale 0).
            (AvroCompat::Debezium, UnconstrainedNumeric::VariableScale, Numeric::Finite(t))
                if t.contains('.') =>
            {
                let t = t.trim_end_matches('0').trim_end_matches('.');
                let t = if t == "-0" { "0" } else { t };
                unconstrained(
                    out,
                    &Numeric::Finite(t.to_string()),
                    opts.unconstrained_numeric,
                )?
            }
            _ => unconstrained(out, n, opts.unconstrained_numeric)?,
        },
        (PgType::Money, Value::Numeric(n)) => {
            bin::bytes(out, &decimal_bytes(n, crate::mapping::MONEY_SCALE)?)
        }
        (PgType::Money, Value::Text(t)) => bin::bytes(
            out,
            &decimal_bytes(
                &money_numeric(t).ok_or_else(mismatch)?,
                crate::mapping::MONEY_SCALE,
            )?,
        ),
        (PgType::Money, Value::Int64(cents)) => {
            bin::bytes(out, &BigInt::from(*cents).to_signed_bytes_be())
        }
        (PgType::Bytea, Value::Bytes(b)) => bin::bytes(out, b),
        (PgType::Uuid, Value::Uuid(u)) => {
            let mut text = apache_avro::Uuid::encode_buffer();
            bin::string(
                out,
                apache_avro::Uuid::from_bytes(*u)
                    .hyphenated()
                    .encode_lower(&mut text),
            );
        }
        (PgType::Uuid, Value::Text(t)) => {
            let u =
                apache_avro::Uuid::parse_str(t).map_err(|e| format!("`{t}` is not a UUID: {e}"))?;
            bin::string(out, &u.hyphenated().to_string());
        }
        (PgType::Date, Value::Date(d)) => bin::long(out, i64::from(*d)),
        (PgType::Time, Value::Time(t)) => bin::long(out, *t),
        (PgType::TimeTz, v @ Value::TimeTz { .. }) => bin::string(out, &zoned_time(v)),
        (PgType::Timestamp, Value::Timestamp(t)) => bin::long(out, *t),
        (PgType::TimestampTz, Value::TimestampTz(t)) => bin::long(out, *t),
        (
            PgType::Interval,
            Value::Interval {
                months,
                days,
                micros,
            },
        ) => bin::long(out, interval_micros(*months, *days, *micros)),
        (PgType::Array { element }, Value::Array(items)) => {
            // One block holding every item, then the empty block that ends
            // the array (an empty array is the end block alone).
            if !items.is_empty() {
                bin::long(out, items.len() as i64);
                for i in items {
                    if i.is_null() {
                        bin::long(out, NULL_BRANCH);
                    } else {
                        bin::long(out, VALUE_BRANCH);
                        column_value(out, element, -1, i, opts)?;
                    }
                }
            }
            bin::long(out, 0);
        }
        (pg, Value::Text(s) | Value::Json(s) | Value::Network(s) | Value::Enum(s))
            if is_string_typed(pg, opts) =>
        {
            bin::string(out, s)
        }
        _ => return Err(mismatch()),
    }
    Ok(())
}

/// Debezium's placeholder where a string or bytes can carry it; anything
/// else has no representation for "the value exists but was not sent".
fn unavailable(out: &mut Vec<u8>, pg: &PgType, opts: &MappingOptions) -> Result<(), String> {
    match pg {
        pg if is_string_typed(pg, opts) => bin::string(out, DEFAULT_UNAVAILABLE_PLACEHOLDER),
        PgType::Bytea => bin::bytes(out, DEFAULT_UNAVAILABLE_PLACEHOLDER.as_bytes()),
        PgType::Array { element } if is_string_typed(element, opts) => {
            bin::long(out, 1);
            bin::long(out, VALUE_BRANCH);
            bin::string(out, DEFAULT_UNAVAILABLE_PLACEHOLDER);
            bin::long(out, 0);
        }
        _ => {
            return Err(format!(
                "an unchanged TOASTed {} value was not sent by Postgres and Avro has no placeholder for this type; \
                 set REPLICA IDENTITY FULL on the table so the old row carries it",
                pg.sql_name()
            ))
        }
    }
    Ok(())
}

/// The big-endian two's-complement bytes of `n` at `scale` (`12.50` at
/// scale 2 is `0x04E2`): an Avro decimal's unscaled value.
pub fn decimal_bytes(n: &Numeric, scale: u32) -> Result<Vec<u8>, String> {
    let Numeric::Finite(_) = n else {
        return Err(format!(
            "numeric {n} has no decimal form; Avro decimals cannot carry NaN or infinities"
        ));
    };
    let unscaled = n
        .with_scale(scale)
        .ok_or_else(|| format!("numeric {n} has more than {scale} digits after the point"))?;
    let int: BigInt = unscaled
        .parse()
        .map_err(|e| format!("numeric {n} is not a decimal number: {e}"))?;
    Ok(int.to_signed_bytes_be())
}

fn unconstrained(out: &mut Vec<u8>, n: &Numeric, mode: UnconstrainedNumeric) -> Result<(), String> {
    match mode {
        UnconstrainedNumeric::String => bin::string(out, &n.to_string()),
        UnconstrainedNumeric::Double => {
            let f = match n {
                Numeric::Finite(s) => s
                    .parse()
                    .map_err(|e| format!("numeric {s} is not a number: {e}"))?,
                Numeric::NaN => f64::NAN,
                Numeric::PositiveInfinity => f64::INFINITY,
                Numeric::NegativeInfinity => f64::NEG_INFINITY,
            };
            out.extend_from_slice(&f64::to_le_bytes(f));
        }
        UnconstrainedNumeric::VariableScale => {
            let (_, scale) = n.unscaled().ok_or_else(|| {
                format!("numeric {n} has no decimal form; set unconstrained_numeric = \"string\" to carry NaN and infinities")
            })?;
            bin::long(out, i64::from(scale));
            bin::bytes(out, &decimal_bytes(n, scale)?);
        }
    }
    Ok(())
}

/// `$1,234.50` (money's text output) as a numeric.
fn money_numeric(text: &str) -> Option<Numeric> {
    let neg = text.contains('-') || text.starts_with('(');
    let digits: String = text
        .chars()
        .filter(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    if digits.is_empty() {
        return None;
    }
    Some(Numeric::Finite(if neg {
        format!("-{digits}")
    } else {
        digits
    }))
}

/// Months count 30.4375 days: `walcast_sdk::json::interval_micros`, as
/// Debezium's MicroDuration computes it.
pub fn interval_micros(months: i32, days: i32, micros: i64) -> i64 {
    walcast_sdk::json::interval_micros(months, days, micros)
}

/// Debezium's ZonedTime text, identical to the JSON encoder's.
fn zoned_time(v: &Value) -> String {
    match walcast_sdk::json::value(v, &Default::default()) {
        Json::String(s) => s,
        other => other.to_string(),
    }
}

/// Reads one Avro datum written with `schema`.
pub fn decode(schema: &Schema, mut datum: &[u8]) -> Result<Avro, DecodeError> {
    GenericDatumReader::builder(schema)
        .build()
        .and_then(|r| r.read_value(&mut datum))
        .map_err(|e| DecodeError::Datum {
            schema: schema_name(schema),
            source: Box::new(e),
        })
}

fn schema_name(schema: &Schema) -> String {
    schema
        .name()
        .map(|n| n.fullname(None))
        .unwrap_or_else(|| schema.canonical_form())
}

/// A decoded datum as JSON, in the shape `walcast_sdk::json::envelope`
/// writes where the Avro carries enough to do so: decimals as strings,
/// `timestamp-micros` as ISO-8601 UTC, bytes as base64, unions unwrapped.
/// Columns keep their original Postgres names (`walcast.column`).
pub fn to_json(value: &Avro, schema: &Schema) -> Result<Json, DecodeError> {
    let resolved = ResolvedSchema::try_from(schema).map_err(|e| DecodeError::Names {
        schema: schema_name(schema),
        source: Box::new(e),
    })?;
    Ok(JsonRender {
        names: resolved.get_names(),
    }
    .render(value, schema))
}

struct JsonRender<'a, 's> {
    names: &'a HashMap<Name, &'s Schema>,
}

impl JsonRender<'_, '_> {
    fn resolve<'x>(&'x self, schema: &'x Schema) -> &'x Schema {
        match schema {
            Schema::Ref { name } => self.names.get(name).copied().unwrap_or(schema),
            other => other,
        }
    }

    fn render(&self, value: &Avro, schema: &Schema) -> Json {
        let schema = self.resolve(schema);
        match (value, schema) {
            (Avro::Union(i, inner), Schema::Union(u)) => match u.variants().get(*i as usize) {
                Some(s) => self.render(inner, s),
                None => self.render(inner, &Schema::Null),
            },
            (Avro::Record(fields), Schema::Record(r)) => {
                if r.name.fullname(None) == VARIABLE_SCALE_DECIMAL {
                    if let [(_, Avro::Int(scale)), (_, Avro::Bytes(b))] = fields.as_slice() {
                        return Json::String(decimal_string(
                            &BigInt::from_signed_bytes_be(b),
                            *scale as usize,
                        ));
                    }
                }
                let mut m = Map::with_capacity(fields.len());
                for ((name, v), f) in fields.iter().zip(&r.fields) {
                    let key = match f.custom_attributes.get(COLUMN_ATTRIBUTE) {
                        Some(Json::String(original)) => original.clone(),
                        _ => name.clone(),
                    };
                    m.insert(key, self.render(v, &f.schema));
                }
                Json::Object(m)
            }
            (Avro::Array(items), Schema::Array(a)) => {
                Json::Array(items.iter().map(|i| self.render(i, &a.items)).collect())
            }
            (Avro::Map(entries), Schema::Map(m)) => Json::Object(
                entries
                    .iter()
                    .map(|(k, v)| (k.clone(), self.render(v, &m.types)))
                    .collect(),
            ),
            (Avro::Decimal(d), Schema::Decimal(ds)) => {
                Json::String(decimal_string(&BigInt::from(d.clone()), ds.scale))
            }
            (Avro::TimestampMicros(t), _) => Json::String(timestamp_utc(*t)),
            (v, _) => scalar(v),
        }
    }
}

fn scalar(v: &Avro) -> Json {
    match v {
        Avro::Null => Json::Null,
        Avro::Boolean(b) => json!(b),
        Avro::Int(i) | Avro::Date(i) | Avro::TimeMillis(i) => json!(i),
        Avro::Long(i)
        | Avro::TimeMicros(i)
        | Avro::TimestampMillis(i)
        | Avro::TimestampNanos(i)
        | Avro::LocalTimestampMillis(i)
        | Avro::LocalTimestampMicros(i)
        | Avro::LocalTimestampNanos(i) => json!(i),
        Avro::TimestampMicros(t) => Json::String(timestamp_utc(*t)),
        Avro::Float(f) => float(walcast_sdk::json::float32_as_double(*f)),
        Avro::Double(f) => float(*f),
        Avro::Bytes(b) | Avro::Fixed(_, b) => {
            Json::String(base64::engine::general_purpose::STANDARD.encode(b))
        }
        Avro::String(s) | Avro::Enum(_, s) => Json::String(s.clone()),
        Avro::Uuid(u) => Json::String(u.hyphenated().to_string()),
        Avro::Union(_, inner) => scalar(inner),
        Avro::Array(items) => Json::Array(items.iter().map(scalar).collect()),
        Avro::Record(fields) => {
            Json::Object(fields.iter().map(|(k, v)| (k.clone(), scalar(v))).collect())
        }
        Avro::Map(m) => Json::Object(m.iter().map(|(k, v)| (k.clone(), scalar(v))).collect()),
        Avro::Decimal(d) => Json::String(decimal_string(&BigInt::from(d.clone()), 0)),
        Avro::BigDecimal(d) => Json::String(d.to_string()),
        Avro::Duration(d) => json!({
            "months": u32::from(d.months()),
            "days": u32::from(d.days()),
            "millis": u32::from(d.millis()),
        }),
    }
}

fn float(f: f64) -> Json {
    serde_json::Number::from_f64(f)
        .map(Json::Number)
        .unwrap_or_else(|| {
            Json::String(if f.is_nan() {
                "NaN".into()
            } else if f > 0.0 {
                "Infinity".into()
            } else {
                "-Infinity".into()
            })
        })
}

/// An unscaled integer at `scale` as Postgres prints it: `1250`, 2 is `12.50`.
pub fn decimal_string(unscaled: &BigInt, scale: usize) -> String {
    let digits = unscaled.magnitude().to_string();
    let sign = if unscaled.sign() == Sign::Minus {
        "-"
    } else {
        ""
    };
    if scale == 0 {
        return format!("{sign}{digits}");
    }
    let padded = format!("{digits:0>width$}", width = scale + 1);
    let (int, frac) = padded.split_at(padded.len() - scale);
    format!("{sign}{int}.{frac}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mapping::derive;
    use apache_avro::writer::datum::GenericDatumWriter;

    /// Decodes `datum` with apache-avro against `schema`, requires every
    /// byte to be consumed, and requires apache-avro's own encoding of the
    /// decoded value (validated against the schema) to be the same bytes.
    fn checked_decode(schema: &Schema, datum: &[u8]) -> Avro {
        let mut rest = datum;
        let value = GenericDatumReader::builder(schema)
            .build()
            .and_then(|r| r.read_value(&mut rest))
            .expect("apache-avro reads the datum");
        assert!(rest.is_empty(), "{} bytes left after the datum", rest.len());
        let again = GenericDatumWriter::builder(schema)
            .build()
            .and_then(|w| w.write_value_to_vec(value.clone()))
            .expect("apache-avro writes the decoded value back");
        assert_eq!(
            again, datum,
            "apache-avro encodes the same value differently"
        );
        value
    }
    use std::sync::Arc;
    use walcast_sdk::{Lsn, Op, ReplicaIdentity, SnapshotMarker, SourceInfo, TransactionInfo};

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

    fn event(columns: Vec<Column>, after: Vec<Value>) -> ChangeEvent {
        let table = TableSchema {
            relation_id: 7,
            schema: "public".into(),
            name: "orders".into(),
            columns,
            replica_identity: ReplicaIdentity::Default,
            version: 1,
        };
        ChangeEvent {
            op: Op::Create,
            table: Arc::new(table),
            before: None,
            after: Some(after),
            source: SourceInfo {
                name: "shop".into(),
                db: "app".into(),
                lsn: Lsn(0x16_B374_D848),
                commit_lsn: Lsn(0x16_B374_D900),
                tx_id: Some(771),
                ts_ms: 1_700_000_000_123,
                ts_us: 1_700_000_000_123_456,
                snapshot: SnapshotMarker::False,
            },
            transaction: Some(TransactionInfo {
                id: "771:97500010752".into(),
                total_order: 1,
                data_collection_order: 1,
            }),
            ts_ms: 1_700_000_000_200,
        }
    }

    fn all_types() -> (Vec<Column>, Vec<Value>) {
        let cols = vec![
            col("id", PgType::Int8, false, true),
            col("flag", PgType::Bool, true, false),
            col("small", PgType::Int2, true, false),
            col("n", PgType::Int4, true, false),
            col("r", PgType::Float4, true, false),
            col("d", PgType::Float8, true, false),
            col(
                "price",
                PgType::Numeric {
                    precision: Some(10),
                    scale: Some(2),
                },
                true,
                false,
            ),
            col(
                "free",
                PgType::Numeric {
                    precision: None,
                    scale: None,
                },
                true,
                false,
            ),
            col("cash", PgType::Money, true, false),
            col(
                "title",
                PgType::Varchar {
                    max_length: Some(20),
                },
                true,
                false,
            ),
            col("blob", PgType::Bytea, true, false),
            col("uid", PgType::Uuid, true, false),
            col("doc", PgType::Jsonb, true, false),
            col("day", PgType::Date, true, false),
            col("at", PgType::Time, true, false),
            col("attz", PgType::TimeTz, true, false),
            col("local", PgType::Timestamp, true, false),
            col("utc", PgType::TimestampTz, true, false),
            col("span", PgType::Interval, true, false),
            col("ip", PgType::Inet, true, false),
            col(
                "mood",
                PgType::Enum {
                    type_name: "mood".into(),
                    labels: vec!["ok".into(), "sad".into()],
                },
                true,
                false,
            ),
            col(
                "tags",
                PgType::Array {
                    element: Box::new(PgType::Text),
                },
                true,
                false,
            ),
            col(
                "other",
                PgType::Unknown {
                    type_name: "tsvector".into(),
                },
                true,
                false,
            ),
            col("gone", PgType::Text, true, false),
            col("big", PgType::Text, true, false),
        ];
        let vals = vec![
            Value::Int64(42),
            Value::Bool(true),
            Value::Int16(-3),
            Value::Int32(7),
            Value::Float32(1.5),
            Value::Float64(f64::NAN),
            Value::Numeric(Numeric::Finite("12.50".into())),
            Value::Numeric(Numeric::Finite("-0.001".into())),
            Value::Numeric(Numeric::Finite("3.10".into())),
            Value::Text("hello".into()),
            Value::Bytes(vec![0, 255]),
            Value::Uuid([0xab; 16]),
            Value::Json("{\"a\":1}".into()),
            Value::Date(19_000),
            Value::Time(3_600_000_000),
            Value::TimeTz {
                micros: 3_600_000_000,
                offset_seconds: 7200,
            },
            Value::Timestamp(1_700_000_000_000_000),
            Value::TimestampTz(i64::MAX),
            Value::Interval {
                months: 0,
                days: 1,
                micros: 5,
            },
            Value::Network("10.0.0.1/32".into()),
            Value::Enum("sad".into()),
            Value::Array(vec![Value::Text("a".into()), Value::Null]),
            Value::Text("'a':1".into()),
            Value::Null,
            Value::Unavailable,
        ];
        (cols, vals)
    }

    #[test]
    fn decimal_bytes_are_big_endian_twos_complement() {
        assert_eq!(
            decimal_bytes(&Numeric::Finite("12.50".into()), 2).unwrap(),
            [0x04, 0xE2]
        );
        assert_eq!(
            decimal_bytes(&Numeric::Finite("12.5".into()), 2).unwrap(),
            [0x04, 0xE2]
        );
        assert_eq!(
            decimal_bytes(&Numeric::Finite("-1".into()), 0).unwrap(),
            [0xFF]
        );
        assert_eq!(
            decimal_bytes(&Numeric::Finite("128".into()), 0).unwrap(),
            [0x00, 0x80]
        );
        assert!(decimal_bytes(&Numeric::Finite("1.234".into()), 2).is_err());
        assert!(decimal_bytes(&Numeric::NaN, 2).unwrap_err().contains("NaN"));
        assert_eq!(decimal_string(&BigInt::from(1250), 2), "12.50");
        assert_eq!(decimal_string(&BigInt::from(-1), 3), "-0.001");
        assert_eq!(decimal_string(&BigInt::from(7), 0), "7");
    }

    #[test]
    fn round_trips_every_type_through_apache_avro() {
        let (cols, vals) = all_types();
        let ev = event(cols, vals);
        let opts = MappingOptions::default();
        let schemas = derive(&ev.table, "shop", &opts).unwrap();
        let key = encode_key(&ev, &schemas, &opts).unwrap().unwrap();
        let key_json = to_json(
            &checked_decode(schemas.key.as_ref().unwrap().schema(), &key),
            schemas.key.as_ref().unwrap().schema(),
        )
        .unwrap();
        assert_eq!(key_json, json!({"id": 42}));

        let bytes = encode_value(&ev, &schemas, &opts).unwrap();
        let decoded = to_json(
            &checked_decode(schemas.value.schema(), &bytes),
            schemas.value.schema(),
        )
        .unwrap();
        let after = &decoded["after"];
        assert_eq!(decoded["before"], Json::Null);
        assert_eq!(after["price"], json!("12.50"));
        assert_eq!(after["free"], json!("-0.001"));
        assert_eq!(after["cash"], json!("3.10"));
        assert_eq!(after["d"], json!("NaN"));
        assert_eq!(after["blob"], json!("AP8="));
        assert_eq!(after["uid"], json!("abababab-abab-abab-abab-abababababab"));
        assert_eq!(after["attz"], json!("23:00:00Z"));
        assert_eq!(after["utc"], json!("infinity"));
        assert_eq!(after["span"], json!(86_400_000_005i64));
        assert_eq!(after["tags"], json!(["a", null]));
        assert_eq!(after["gone"], Json::Null);
        assert_eq!(after["big"], json!(DEFAULT_UNAVAILABLE_PLACEHOLDER));

        // Wherever the JSON encoder's rendering is Avro-expressible, the two agree.
        let expected = walcast_sdk::json::envelope(&ev, &Default::default());
        for name in [
            "id", "flag", "small", "n", "r", "title", "doc", "day", "at", "local", "ip", "mood",
            "other", "price", "uid", "attz",
        ] {
            assert_eq!(after[name], expected["after"][name], "column {name}");
        }
        for f in [
            "version",
            "connector",
            "name",
            "ts_ms",
            "ts_us",
            "snapshot",
            "db",
            "schema",
            "table",
            "txId",
            "lsn",
            "commit_lsn",
            "ts_us",
            "ts_ns",
            "xmin",
        ] {
            assert_eq!(decoded["source"][f], expected["source"][f], "source.{f}");
        }
        assert_eq!(decoded["op"], json!("c"));
        assert_eq!(decoded["transaction"], expected["transaction"]);
        for f in ["ts_ms", "ts_us", "ts_ns"] {
            assert_eq!(decoded[f], expected[f], "{f}");
        }
    }

    #[test]
    fn unconstrained_numeric_modes_round_trip() {
        for (mode, expected) in [
            (UnconstrainedNumeric::String, json!("NaN")),
            (UnconstrainedNumeric::Double, json!("NaN")),
        ] {
            let ev = event(
                vec![
                    col("id", PgType::Int4, false, true),
                    col(
                        "x",
                        PgType::Numeric {
                            precision: None,
                            scale: None,
                        },
                        true,
                        false,
                    ),
                ],
                vec![Value::Int32(1), Value::Numeric(Numeric::NaN)],
            );
            let opts = MappingOptions {
                unconstrained_numeric: mode,
                ..Default::default()
            };
            let s = derive(&ev.table, "p", &opts).unwrap();
            let decoded = to_json(
                &checked_decode(s.value.schema(), &encode_value(&ev, &s, &opts).unwrap()),
                s.value.schema(),
            )
            .unwrap();
            assert_eq!(decoded["after"]["x"], expected, "{mode:?}");
        }
    }

    #[test]
    fn refuses_what_avro_cannot_carry_naming_the_column() {
        // variable_scale (Debezium's precise mode) cannot carry the special values.
        let opts = MappingOptions {
            unconstrained_numeric: UnconstrainedNumeric::VariableScale,
            ..Default::default()
        };
        let cases = [
            (
                PgType::Numeric {
                    precision: Some(5),
                    scale: Some(2),
                },
                Value::Numeric(Numeric::NaN),
                "NaN",
            ),
            (
                PgType::Numeric {
                    precision: None,
                    scale: None,
                },
                Value::Numeric(Numeric::PositiveInfinity),
                "Infinity",
            ),
            (PgType::Int4, Value::Unavailable, "REPLICA IDENTITY FULL"),
            (
                PgType::Array {
                    element: Box::new(PgType::Int4),
                },
                Value::Unavailable,
                "REPLICA IDENTITY FULL",
            ),
            (PgType::Int4, Value::Text("x".into()), "cannot convert"),
        ];
        for (pg, v, needle) in cases {
            let ev = event(
                vec![
                    col("id", PgType::Int4, false, true),
                    col("amount", pg.clone(), true, false),
                ],
                vec![Value::Int32(1), v],
            );
            let s = derive(&ev.table, "p", &opts).unwrap();
            let err = encode_value(&ev, &s, &opts).unwrap_err();
            let EncodeError::Invalid {
                table,
                column,
                message,
            } = &err
            else {
                panic!("{err}")
            };
            assert_eq!(
                (table.as_str(), column.as_str()),
                ("public.orders", "amount"),
                "{pg:?}"
            );
            assert!(message.contains(needle), "{pg:?}: {message}");
            assert!(!err.is_transient());
        }
    }

    #[test]
    fn bytea_unavailable_is_the_placeholder_bytes() {
        let opts = MappingOptions::default();
        let ev = event(
            vec![
                col("id", PgType::Int4, false, true),
                col("b", PgType::Bytea, true, false),
            ],
            vec![Value::Int32(1), Value::Unavailable],
        );
        let s = derive(&ev.table, "p", &opts).unwrap();
        let avro = checked_decode(s.value.schema(), &encode_value(&ev, &s, &opts).unwrap());
        let Avro::Record(env) = avro else { panic!() };
        let Avro::Union(1, after) = &env[1].1 else {
            panic!()
        };
        let Avro::Record(row) = after.as_ref() else {
            panic!()
        };
        assert_eq!(
            row[1].1,
            Avro::Union(
                1,
                Box::new(Avro::Bytes(
                    DEFAULT_UNAVAILABLE_PLACEHOLDER.as_bytes().to_vec()
                ))
            )
        );
    }

    #[test]
    fn every_shape_matches_apache_avro_byte_for_byte() {
        // An update with both images, each unconstrained-numeric mode, the
        // money and uuid inputs that arrive as text, empty and placeholder
        // arrays, a snapshot read without transaction: `checked_decode`
        // compares each datum with apache-avro's encoding.
        let cols = vec![
            col("id", PgType::Int8, false, true),
            col("k2", PgType::Text, false, true),
            col(
                "free",
                PgType::Numeric {
                    precision: None,
                    scale: None,
                },
                true,
                false,
            ),
            col("cash", PgType::Money, true, false),
            col("cents", PgType::Money, true, false),
            col("uid", PgType::Uuid, true, false),
            col(
                "none",
                PgType::Array {
                    element: Box::new(PgType::Int4),
                },
                true,
                false,
            ),
            col(
                "toast",
                PgType::Array {
                    element: Box::new(PgType::Text),
                },
                true,
                false,
            ),
            col("f", PgType::Float8, true, false),
            col("neg", PgType::Int4, true, false),
        ];
        let row = |free: &str| {
            vec![
                Value::Int64(-9_000_000_000),
                Value::Text("naïve".into()),
                Value::Numeric(Numeric::Finite(free.into())),
                Value::Text("-$1,234.50".into()),
                Value::Int64(-5),
                Value::Text("ABABABAB-ABAB-ABAB-ABAB-ABABABABABAB".into()),
                Value::Array(vec![]),
                Value::Unavailable,
                Value::Float32(0.25),
                Value::Int32(i32::MIN),
            ]
        };
        for mode in [
            UnconstrainedNumeric::String,
            UnconstrainedNumeric::Double,
            UnconstrainedNumeric::VariableScale,
        ] {
            let opts = MappingOptions {
                unconstrained_numeric: mode,
                ..Default::default()
            };
            let mut ev = event(cols.clone(), row("123456789012345678901234567890.5"));
            ev.op = Op::Update;
            ev.before = Some(row("-0.000001"));
            let s = derive(&ev.table, "p", &opts).unwrap();
            let key = encode_key(&ev, &s, &opts).unwrap().unwrap();
            checked_decode(s.key.as_ref().unwrap().schema(), &key);
            let value = checked_decode(s.value.schema(), &encode_value(&ev, &s, &opts).unwrap());
            let json = to_json(&value, s.value.schema()).unwrap();
            assert_eq!(json["before"]["cash"], json!("-1234.50"), "{mode:?}");
            assert_eq!(json["after"]["cents"], json!("-0.05"), "{mode:?}");
            assert_eq!(
                json["after"]["uid"],
                json!("abababab-abab-abab-abab-abababababab"),
                "{mode:?}"
            );
            assert_eq!(json["after"]["none"], json!([]), "{mode:?}");
            assert_eq!(json["after"]["neg"], json!(i32::MIN), "{mode:?}");

            ev.op = Op::Read;
            ev.transaction = None;
            ev.source.tx_id = None;
            ev.source.snapshot = SnapshotMarker::True;
            let json = to_json(
                &checked_decode(s.value.schema(), &encode_value(&ev, &s, &opts).unwrap()),
                s.value.schema(),
            )
            .unwrap();
            assert_eq!(json["transaction"], Json::Null);
            assert_eq!(json["source"]["txId"], Json::Null);
            assert_eq!(json["op"], json!("r"));
        }
    }

    /// `avro_compat = "debezium"`: every type of `all_types` plus the
    /// Debezium-only ones encodes to what apache-avro reads back (byte for
    /// byte), with the values Debezium 3.6.1 wrote for the same Postgres
    /// values (recorded with Apicurio's converter, `tests/debezium_avro.rs`).
    #[test]
    fn debezium_compat_writes_debeziums_values() {
        let opts = MappingOptions {
            unconstrained_numeric: UnconstrainedNumeric::VariableScale,
            avro_compat: AvroCompat::Debezium,
            ..Default::default()
        };
        let (mut cols, mut vals) = all_types();
        // `free` under variable_scale, `big` (Unavailable) is a string: both fine.
        let extra = [
            (
                col("ts3", PgType::Timestamp, true, false),
                3,
                Value::Timestamp(1_577_840_523_456_000),
            ),
            (
                col("ti0", PgType::Time, true, false),
                0,
                Value::Time(3_723_000_000),
            ),
            (
                col("tz0", PgType::TimestampTz, true, false),
                0,
                Value::TimestampTz(1_577_822_523_000_000),
            ),
            (
                col("tsinf", PgType::Timestamp, true, false),
                -1,
                Value::Timestamp(i64::MAX),
            ),
            (
                col("ts3inf", PgType::Timestamp, true, false),
                3,
                Value::Timestamp(i64::MIN),
            ),
            (
                col("dinf", PgType::Date, true, false),
                -1,
                Value::Date(i32::MAX),
            ),
            (
                col(
                    "bits",
                    PgType::Unknown {
                        type_name: "bit".into(),
                    },
                    true,
                    false,
                ),
                10,
                Value::Text("1000000001".into()),
            ),
            (
                col(
                    "bit1",
                    PgType::Unknown {
                        type_name: "bit".into(),
                    },
                    true,
                    false,
                ),
                1,
                Value::Text("1".into()),
            ),
            (
                col(
                    "pt",
                    PgType::Unknown {
                        type_name: "point".into(),
                    },
                    true,
                    false,
                ),
                -1,
                Value::Text("(1.5,-2)".into()),
            ),
            (
                col(
                    "xm",
                    PgType::Unknown {
                        type_name: "xml".into(),
                    },
                    true,
                    false,
                ),
                -1,
                Value::Text("<a/>".into()),
            ),
            (col("nn_t", PgType::Text, false, false), -1, Value::Null),
            (
                col("nn_tz", PgType::TimestampTz, false, false),
                -1,
                Value::Null,
            ),
            (
                col(
                    "nn_num",
                    PgType::Numeric {
                        precision: None,
                        scale: None,
                    },
                    false,
                    false,
                ),
                -1,
                Value::Null,
            ),
            (
                col(
                    "nn_arr",
                    PgType::Array {
                        element: Box::new(PgType::Int4),
                    },
                    false,
                    false,
                ),
                -1,
                Value::Null,
            ),
            (
                col(
                    "nn_pt",
                    PgType::Unknown {
                        type_name: "point".into(),
                    },
                    false,
                    false,
                ),
                -1,
                Value::Null,
            ),
        ];
        for (mut c, typmod, v) in extra {
            c.type_modifier = typmod;
            cols.push(c);
            vals.push(v);
        }
        // all_types' NaN double is fine; its `free` numeric is finite.
        let ev = event(cols, vals);
        let s = derive(&ev.table, "shop", &opts).unwrap();
        let env = s.value.json();
        let names: Vec<_> = env["fields"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f["name"].as_str().unwrap())
            .collect();
        assert_eq!(
            names,
            [
                "before",
                "after",
                "source",
                "transaction",
                "op",
                "ts_ms",
                "ts_us",
                "ts_ns"
            ]
        );
        let row = &env["fields"][0]["type"][1]["fields"];
        let field = |n: &str| {
            row.as_array()
                .unwrap()
                .iter()
                .find(|f| f["name"] == n)
                .unwrap_or_else(|| panic!("no field {n}"))
                .clone()
        };
        assert_eq!(field("id")["type"], json!("long"), "NOT NULL key: required");
        assert_eq!(field("nn_t")["type"], json!("string"), "NOT NULL: required");
        assert_eq!(
            field("small")["type"][1],
            json!({"type": "int", "connect.type": "int16"})
        );
        assert_eq!(
            field("utc")["type"][1]["connect.name"],
            "io.debezium.time.ZonedTimestamp"
        );
        assert_eq!(field("day")["type"][1].get("logicalType"), None);
        assert_eq!(field("uid")["type"][1].get("logicalType"), None);
        assert_eq!(
            field("ts3")["type"][1]["connect.name"],
            "io.debezium.time.Timestamp"
        );
        assert_eq!(field("ti0")["type"][1]["type"], "int");
        assert_eq!(field("cash")["type"][1]["precision"], 64);
        assert_eq!(field("bit1")["type"][1], "boolean");
        assert_eq!(
            field("bits")["type"][1]["connect.parameters"]["length"],
            "10"
        );

        let key = encode_key(&ev, &s, &opts).unwrap().unwrap();
        checked_decode(s.key.as_ref().unwrap().schema(), &key);
        let mut del = ev.clone();
        del.op = Op::Delete;
        del.before = del.after.take().map(|row| {
            row.into_iter()
                .zip(&del.table.columns)
                .map(|(v, c)| if c.key { v } else { Value::Null })
                .collect()
        });
        for e in [&ev, &del] {
            let bytes = encode_value(e, &s, &opts).unwrap();
            let json =
                to_json(&checked_decode(s.value.schema(), &bytes), s.value.schema()).unwrap();
            assert_eq!(json["source"]["snapshot"], json!("false"));
            assert_eq!(json["source"]["sequence"], Json::Null);
            assert_eq!(json["source"]["commit_lsn"], json!(0x16_B374_D900i64));
            assert_eq!(json["op"], json!(e.op.code()));
            if e.op == Op::Delete {
                let b = &json["before"];
                assert_eq!(b["id"], json!(42));
                assert_eq!(b["nn_t"], json!(""));
                assert_eq!(b["nn_tz"], json!("1970-01-01T00:00:00Z"));
                assert_eq!(b["nn_num"], json!("0"));
                assert_eq!(b["nn_arr"], json!([]));
                assert_eq!(b["nn_pt"]["x"], json!(0.0));
                assert_eq!(b["title"], Json::Null);
                continue;
            }
            let a = &json["after"];
            assert_eq!(a["utc"], json!("infinity"));
            assert_eq!(a["attz"], json!("23:00:00Z"));
            assert_eq!(a["day"], json!(19_000));
            assert_eq!(a["ts3"], json!(1_577_840_523_456i64));
            assert_eq!(a["ti0"], json!(3_723_000));
            assert_eq!(a["tz0"], json!("2019-12-31T20:02:03Z"));
            assert_eq!(a["tsinf"], json!(crate::debezium::TIMESTAMP_INFINITY_VALUE));
            assert_eq!(a["ts3inf"], json!(-9_223_372_036_832_400i64));
            assert_eq!(a["dinf"], json!(crate::debezium::DATE_INFINITY_VALUE));
            assert_eq!(a["bits"], json!("AQI="));
            assert_eq!(a["bit1"], json!(true));
            assert_eq!(
                a["pt"],
                json!({"x": 1.5, "y": -2.0, "wkb": "AQEAAAAAAAAAAAD4PwAAAAAAAADA", "srid": null})
            );
            assert_eq!(a["xm"], json!("<a/>"));
            assert_eq!(a["free"], json!("-0.001"));
            assert_eq!(a["price"], json!("12.50"));
            assert_eq!(a["cash"], json!("3.10"));
            assert_eq!(a["big"], json!(DEFAULT_UNAVAILABLE_PLACEHOLDER));
        }
    }

    #[test]
    fn money_text_parses() {
        assert_eq!(
            money_numeric("$1,234.50"),
            Some(Numeric::Finite("1234.50".into()))
        );
        assert_eq!(
            money_numeric("-$0.10"),
            Some(Numeric::Finite("-0.10".into()))
        );
        assert_eq!(money_numeric("abc"), None);
    }
}
