//! Change events to Avro binary and back, against the schemas of
//! [`crate::mapping`]. No I/O: the registry lookups live in the encoder and
//! decoder.
//!
//! Values apache-avro cannot hold are refused here with the table and column
//! named ([`EncodeError::Invalid`]); the pipeline's policy then halts or
//! dead-letters. apache-avro validates every datum against its schema on
//! write as a second line of defence.

use std::collections::HashMap;

use apache_avro::reader::datum::GenericDatumReader;
use apache_avro::schema::{Name, ResolvedSchema};
use apache_avro::types::Value as Avro;
use apache_avro::writer::datum::GenericDatumWriter;
use apache_avro::{Decimal, Schema};
use base64::Engine;
use num_bigint::{BigInt, Sign};
use serde_json::{json, Map, Value as Json};
use walcast_sdk::json::{timestamp_utc, DEFAULT_UNAVAILABLE_PLACEHOLDER};
use walcast_sdk::{ChangeEvent, Column, EncodeError, Numeric, PgType, TableSchema, Value};

use crate::mapping::{
    row_field_nullable, MappingOptions, TableSchemas, UnconstrainedNumeric, COLUMN_ATTRIBUTE,
    VARIABLE_SCALE_DECIMAL,
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
    let (Some(key_schema), Some(row)) = (&schemas.key, event.identity_row()) else {
        return Ok(None);
    };
    let table = &event.table;
    let mut fields = Vec::new();
    for i in table.key_indexes() {
        let c = &table.columns[i];
        let v = row.get(i).unwrap_or(&Value::Null);
        fields.push((
            schemas.fields[i].clone(),
            field_value(table, c, v, c.nullable, opts)?,
        ));
    }
    write(table, key_schema.schema(), Avro::Record(fields)).map(Some)
}

/// The Avro binary of the event's Debezium envelope.
pub fn encode_value(
    event: &ChangeEvent,
    schemas: &TableSchemas,
    opts: &MappingOptions,
) -> Result<Vec<u8>, EncodeError> {
    let table = &event.table;
    let image = |row: Option<&[Value]>| -> Result<Avro, EncodeError> {
        let Some(row) = row else {
            return Ok(Avro::Union(0, Box::new(Avro::Null)));
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
        let mut fields = Vec::with_capacity(row.len());
        for ((c, v), name) in table.columns.iter().zip(row).zip(&schemas.fields) {
            fields.push((
                name.clone(),
                field_value(table, c, v, row_field_nullable(c), opts)?,
            ));
        }
        Ok(Avro::Union(1, Box::new(Avro::Record(fields))))
    };
    let s = &event.source;
    let source = Avro::Record(vec![
        (
            "version".into(),
            Avro::String(env!("CARGO_PKG_VERSION").into()),
        ),
        ("connector".into(), Avro::String("postgresql".into())),
        ("name".into(), Avro::String(s.name.clone())),
        ("ts_ms".into(), Avro::Long(s.ts_ms)),
        ("ts_us".into(), some(Avro::Long(s.ts_us))),
        ("snapshot".into(), Avro::String(s.snapshot.as_str().into())),
        ("db".into(), Avro::String(s.db.clone())),
        ("schema".into(), Avro::String(table.schema.clone())),
        ("table".into(), Avro::String(table.name.clone())),
        (
            "txId".into(),
            s.tx_id
                .map_or_else(none, |t| some(Avro::Long(i64::from(t)))),
        ),
        ("lsn".into(), some(Avro::Long(s.lsn.0 as i64))),
        ("commit_lsn".into(), some(Avro::Long(s.commit_lsn.0 as i64))),
    ]);
    let transaction = match &event.transaction {
        None => none(),
        Some(t) => some(Avro::Record(vec![
            ("id".into(), Avro::String(t.id.clone())),
            ("total_order".into(), Avro::Long(t.total_order as i64)),
            (
                "data_collection_order".into(),
                Avro::Long(t.data_collection_order as i64),
            ),
        ])),
    };
    let envelope = Avro::Record(vec![
        ("before".into(), image(event.before.as_deref())?),
        ("after".into(), image(event.after.as_deref())?),
        ("source".into(), source),
        ("op".into(), Avro::String(event.op.code().into())),
        ("ts_ms".into(), some(Avro::Long(event.ts_ms))),
        ("transaction".into(), transaction),
    ]);
    write(table, schemas.value.schema(), envelope)
}

fn write(table: &TableSchema, schema: &Schema, value: Avro) -> Result<Vec<u8>, EncodeError> {
    GenericDatumWriter::builder(schema)
        .build()
        .and_then(|w| w.write_value_to_vec(value))
        .map_err(|e| invalid(table, "*", format!("Avro writer refused the record: {e}")))
}

fn some(v: Avro) -> Avro {
    Avro::Union(1, Box::new(v))
}

fn none() -> Avro {
    Avro::Union(0, Box::new(Avro::Null))
}

fn invalid(table: &TableSchema, column: &str, message: String) -> EncodeError {
    EncodeError::Invalid {
        table: table.qualified_name(),
        column: column.to_string(),
        message,
    }
}

fn field_value(
    table: &TableSchema,
    c: &Column,
    v: &Value,
    nullable: bool,
    opts: &MappingOptions,
) -> Result<Avro, EncodeError> {
    if v.is_null() {
        if nullable {
            return Ok(none());
        }
        return Err(invalid(
            table,
            &c.name,
            "NULL in a column whose Avro type is not nullable (a key column)".into(),
        ));
    }
    let inner = column_value(&c.pg_type, v, opts).map_err(|m| invalid(table, &c.name, m))?;
    Ok(if nullable { some(inner) } else { inner })
}

/// Whether the column's Avro type is a plain string, which can carry the
/// unavailable-value placeholder.
fn is_string_typed(pg: &PgType, opts: &MappingOptions) -> bool {
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

/// The non-null Avro value of one column value; the error is the message
/// for [`EncodeError::Invalid`].
fn column_value(pg: &PgType, v: &Value, opts: &MappingOptions) -> Result<Avro, String> {
    if matches!(v, Value::Unavailable) {
        return unavailable(pg, opts);
    }
    let mismatch = || {
        format!(
            "a {} column holds the captured value {v:?}, which walcast cannot convert",
            pg.sql_name()
        )
    };
    Ok(match (pg, v) {
        (PgType::Bool, Value::Bool(b)) => Avro::Boolean(*b),
        (PgType::Int2 | PgType::Int4, Value::Int16(i)) => Avro::Int(i32::from(*i)),
        (PgType::Int2 | PgType::Int4, Value::Int32(i)) => Avro::Int(*i),
        (PgType::Int8, Value::Int16(i)) => Avro::Long(i64::from(*i)),
        (PgType::Int8, Value::Int32(i)) => Avro::Long(i64::from(*i)),
        (PgType::Int8, Value::Int64(i)) => Avro::Long(*i),
        (PgType::Float4, Value::Float32(f)) => Avro::Float(*f),
        (PgType::Float8, Value::Float32(f)) => Avro::Double(f64::from(*f)),
        (PgType::Float8, Value::Float64(f)) => Avro::Double(*f),
        (
            PgType::Numeric {
                precision: Some(_),
                scale,
            },
            Value::Numeric(n),
        ) => decimal(n, scale.unwrap_or(0))?,
        (
            PgType::Numeric {
                precision: None, ..
            },
            Value::Numeric(n),
        ) => unconstrained(n, opts.unconstrained_numeric)?,
        (PgType::Money, Value::Numeric(n)) => decimal(n, crate::mapping::MONEY_SCALE)?,
        (PgType::Money, Value::Text(t)) => decimal(
            &money_numeric(t).ok_or_else(mismatch)?,
            crate::mapping::MONEY_SCALE,
        )?,
        (PgType::Money, Value::Int64(cents)) => {
            Avro::Decimal(Decimal::from(BigInt::from(*cents).to_signed_bytes_be()))
        }
        (PgType::Bytea, Value::Bytes(b)) => Avro::Bytes(b.clone()),
        (PgType::Uuid, Value::Uuid(u)) => Avro::Uuid(apache_avro::Uuid::from_bytes(*u)),
        (PgType::Uuid, Value::Text(t)) => Avro::Uuid(
            apache_avro::Uuid::parse_str(t).map_err(|e| format!("`{t}` is not a UUID: {e}"))?,
        ),
        (PgType::Date, Value::Date(d)) => Avro::Date(*d),
        (PgType::Time, Value::Time(t)) => Avro::TimeMicros(*t),
        (PgType::TimeTz, v @ Value::TimeTz { .. }) => Avro::String(zoned_time(v)),
        (PgType::Timestamp, Value::Timestamp(t)) => Avro::LocalTimestampMicros(*t),
        (PgType::TimestampTz, Value::TimestampTz(t)) => Avro::TimestampMicros(*t),
        (
            PgType::Interval,
            Value::Interval {
                months,
                days,
                micros,
            },
        ) => Avro::Long(interval_micros(*months, *days, *micros)),
        (PgType::Array { element }, Value::Array(items)) => Avro::Array(
            items
                .iter()
                .map(|i| {
                    if i.is_null() {
                        Ok(none())
                    } else {
                        column_value(element, i, opts).map(some)
                    }
                })
                .collect::<Result<_, _>>()?,
        ),
        (pg, Value::Text(s) | Value::Json(s) | Value::Network(s) | Value::Enum(s))
            if is_string_typed(pg, opts) =>
        {
            Avro::String(s.clone())
        }
        _ => return Err(mismatch()),
    })
}

/// Debezium's placeholder where a string or bytes can carry it; anything
/// else has no representation for "the value exists but was not sent".
fn unavailable(pg: &PgType, opts: &MappingOptions) -> Result<Avro, String> {
    match pg {
        pg if is_string_typed(pg, opts) => Ok(Avro::String(DEFAULT_UNAVAILABLE_PLACEHOLDER.into())),
        PgType::Bytea => Ok(Avro::Bytes(DEFAULT_UNAVAILABLE_PLACEHOLDER.as_bytes().to_vec())),
        PgType::Array { element } if is_string_typed(element, opts) => {
            Ok(Avro::Array(vec![some(Avro::String(DEFAULT_UNAVAILABLE_PLACEHOLDER.into()))]))
        }
        _ => Err(format!(
            "an unchanged TOASTed {} value was not sent by Postgres and Avro has no placeholder for this type; \
             set REPLICA IDENTITY FULL on the table so the old row carries it",
            pg.sql_name()
        )),
    }
}

/// `numeric(p, s)` as Avro decimal bytes: the unscaled value in big-endian
/// two's complement.
fn decimal(n: &Numeric, scale: u32) -> Result<Avro, String> {
    Ok(Avro::Decimal(Decimal::from(decimal_bytes(n, scale)?)))
}

/// The big-endian two's-complement bytes of `n` at `scale` (`12.50` at
/// scale 2 is `0x04E2`).
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

fn unconstrained(n: &Numeric, mode: UnconstrainedNumeric) -> Result<Avro, String> {
    match mode {
        UnconstrainedNumeric::String => Ok(Avro::String(n.to_string())),
        UnconstrainedNumeric::Double => Ok(Avro::Double(match n {
            Numeric::Finite(s) => s
                .parse()
                .map_err(|e| format!("numeric {s} is not a number: {e}"))?,
            Numeric::NaN => f64::NAN,
            Numeric::PositiveInfinity => f64::INFINITY,
            Numeric::NegativeInfinity => f64::NEG_INFINITY,
        })),
        UnconstrainedNumeric::VariableScale => {
            let (_, scale) = n.unscaled().ok_or_else(|| {
                format!("numeric {n} has no decimal form; set unconstrained_numeric = \"string\" to carry NaN and infinities")
            })?;
            Ok(Avro::Record(vec![
                ("scale".into(), Avro::Int(scale as i32)),
                ("value".into(), Avro::Bytes(decimal_bytes(n, scale)?)),
            ]))
        }
    }
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

/// Months count 30.4375 days, as in `walcast_sdk::json` and Debezium's MicroDuration.
pub fn interval_micros(months: i32, days: i32, micros: i64) -> i64 {
    let month_micros = (f64::from(months) * 30.4375 * 86_400_000_000.0) as i64;
    month_micros + i64::from(days) * 86_400_000_000 + micros
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
        Avro::Float(f) => float(f64::from(*f)),
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
    use std::sync::Arc;
    use walcast_sdk::{Lsn, Op, ReplicaIdentity, SnapshotMarker, SourceInfo, TransactionInfo};

    fn col(name: &str, pg_type: PgType, nullable: bool, key: bool) -> Column {
        Column {
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
            &decode(schemas.key.as_ref().unwrap().schema(), &key).unwrap(),
            schemas.key.as_ref().unwrap().schema(),
        )
        .unwrap();
        assert_eq!(key_json, json!({"id": 42}));

        let bytes = encode_value(&ev, &schemas, &opts).unwrap();
        let decoded = to_json(
            &decode(schemas.value.schema(), &bytes).unwrap(),
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
        assert_eq!(after["attz"], json!("23:00:00.000000Z"));
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
        ] {
            assert_eq!(decoded["source"][f], expected["source"][f], "source.{f}");
        }
        assert_eq!(decoded["op"], json!("c"));
        assert_eq!(decoded["transaction"], expected["transaction"]);
        assert_eq!(decoded["ts_ms"], expected["ts_ms"]);
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
            };
            let s = derive(&ev.table, "p", &opts).unwrap();
            let decoded = to_json(
                &decode(s.value.schema(), &encode_value(&ev, &s, &opts).unwrap()).unwrap(),
                s.value.schema(),
            )
            .unwrap();
            assert_eq!(decoded["after"]["x"], expected, "{mode:?}");
        }
    }

    #[test]
    fn refuses_what_avro_cannot_carry_naming_the_column() {
        let opts = MappingOptions::default();
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
        let avro = decode(s.value.schema(), &encode_value(&ev, &s, &opts).unwrap()).unwrap();
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
