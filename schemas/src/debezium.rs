//! `avro_compat = "debezium"`: schemas and values as Debezium 3.6's
//! Postgres connector writes them through a Kafka Connect Avro converter
//! (Confluent's `AvroData`, which Apicurio's converter copies), with its
//! default modes (`decimal.handling.mode=precise`,
//! `time.precision.mode=adaptive`, `interval.handling.mode=numeric`,
//! `binary.handling.mode=bytes`).
//!
//! Why a second shape at all: walcast's own Avro (the default) gives Avro
//! readers typed values where Debezium gives Connect types: `timestamptz`
//! is a `timestamp-micros` instant rather than Debezium's ISO string, dates
//! and times carry Avro logical types, and every non-key column is
//! nullable. A consumer generated from Debezium's schemas, or one that
//! switches on `connect.name`, needs Debezium's exact shape instead; this
//! module is that shape, recorded from Debezium 3.6.1 with Apicurio's
//! converter on the workload of `tests/debezium_avro.rs`
//! (`schemas/MAPPING.md` lists every type and the few places walcast
//! cannot follow, each with the reason).
//!
//! What Debezium does that is easy to get wrong, and is matched here:
//! * no Avro logical types except `decimal`: dates, times and UUIDs are
//!   plain `int`/`long`/`string` named only by `connect.name`;
//! * `smallint` is `{"type": "int", "connect.type": "int16"}`;
//! * a column is required exactly when it is `NOT NULL` (key or not), and a
//!   required column missing from a before image (`REPLICA IDENTITY
//!   DEFAULT` sends only the key) gets its `DEFAULT` as Debezium reads it
//!   ([`column_default`]), or else its type's zero value (`""`, `0`,
//!   `1970-01-01T00:00:00Z`);
//! * a column's `DEFAULT` is the field's `default` and its type's
//!   `connect.default` (a nullable column with one becomes `[T, "null"]`,
//!   the default's branch first, as Connect's `AvroData` writes it);
//! * key fields come in the order of the key's index (`PRIMARY KEY (b, a)`:
//!   `b`, `a`), not in column order;
//! * `time(p)`/`timestamp(p)` with p ≤ 3 are milliseconds
//!   (`io.debezium.time.Time` int, `io.debezium.time.Timestamp` long),
//!   otherwise microseconds;
//! * `timestamptz` is an ISO string with exactly the column's fractional
//!   digits (`timestamptz(0)`: none; default 6), `timetz` an ISO time with
//!   trailing zeros of the fraction dropped;
//! * ±infinity dates and timestamps are the numbers Debezium derives from
//!   the JDBC driver's infinity constants, not walcast's `i32::MAX`-style
//!   markers;
//! * `money` is a decimal of scale 2 and precision 64 without a
//!   `connect.decimal.precision` parameter; `bit(n > 1)`/`varbit` are
//!   `io.debezium.data.Bits` bytes (little-endian, as Java's
//!   `BitSet.toByteArray`), `bit(1)` a boolean; `point` is
//!   `io.debezium.data.geometry.Point` with its WKB; `xml` and `tsvector`
//!   are named strings;
//! * the envelope's fields come in Debezium's order (`transaction` before
//!   `op`), and `source` has Debezium's fields in Debezium's order
//!   (`snapshot` an `Enum` string union, `sequence`, `origin`,
//!   `origin_lsn`), plus walcast's `commit_lsn` at the end.

use std::collections::HashSet;

use serde_json::{json, Value as Json};
use walcast_sdk::json::civil_from_days;
use walcast_sdk::value::{
    DATE_INFINITY, DATE_NEG_INFINITY, TIMESTAMP_INFINITY, TIMESTAMP_NEG_INFINITY,
};
use walcast_sdk::{Column, Numeric, PgType, Value};

use crate::binary as bin;
use crate::mapping::{MappingOptions, UnconstrainedNumeric, SOURCE_RECORD, VARIABLE_SCALE_DECIMAL};

/// `connect.name` of Kafka Connect's decimal.
const DECIMAL: &str = "org.apache.kafka.connect.data.Decimal";
/// Precision Debezium's `money` schema declares (Connect's default when a
/// decimal has no `connect.decimal.precision`).
pub const MONEY_PRECISION: u32 = 64;
/// What Debezium 3.6.1 writes for `timestamp 'infinity'` and
/// `'-infinity'` as microseconds (the JDBC driver's `DATE_POSITIVE_INFINITY`
/// and `DATE_NEGATIVE_INFINITY`, read as microseconds); a `timestamp(p ≤ 3)`
/// in milliseconds gets these divided by 1000.
pub const TIMESTAMP_INFINITY_VALUE: i64 = 9_223_372_036_825_200_000;
pub const TIMESTAMP_NEG_INFINITY_VALUE: i64 = -9_223_372_036_832_400_000;
/// What Debezium 3.6.1 writes for `date 'infinity'` and `'-infinity'` (the
/// JDBC constants turned into a day count that overflows an int).
pub const DATE_INFINITY_VALUE: i32 = -2_147_472_692;
pub const DATE_NEG_INFINITY_VALUE: i32 = -2_147_472_691;

/// Fractional digits of a `time`/`timestamp`/`timestamptz`/`timetz` column
/// from its type modifier (-1, no precision given, is 6).
pub fn time_precision(typmod: i32) -> u32 {
    if (0..=6).contains(&typmod) {
        typmod as u32
    } else {
        6
    }
}

fn named(ty: &str, name: &str) -> Json {
    json!({"type": ty, "connect.version": 1, "connect.name": name})
}

/// The Avro type (never a null union) Debezium gives a column of type `pg`
/// with type modifier `typmod`. `named` as in [`crate::mapping::avro_type`].
pub fn column_type(
    pg: &PgType,
    typmod: i32,
    opts: &MappingOptions,
    named_types: &mut HashSet<&'static str>,
) -> Json {
    match pg {
        PgType::Bool => json!("boolean"),
        PgType::Int2 => json!({"type": "int", "connect.type": "int16"}),
        PgType::Int4 => json!("int"),
        PgType::Int8 => json!("long"),
        PgType::Float4 => json!("float"),
        PgType::Float8 => json!("double"),
        PgType::Numeric {
            precision: Some(p),
            scale,
        } => {
            let s = scale.unwrap_or(0);
            // Debezium declares numeric(2,5) as precision 2, scale 5, which
            // Avro forbids (scale > precision): Java's Avro then ignores the
            // logical type and strict readers (fastavro, apache-avro) refuse
            // the schema. walcast declares precision 5; the Connect
            // parameter keeps the column's precision, as Debezium's.
            json!({
                "type": "bytes",
                "scale": s,
                "precision": (*p).max(s).max(1),
                "connect.version": 1,
                "connect.parameters": {"scale": s.to_string(), "connect.decimal.precision": p.to_string()},
                "connect.name": DECIMAL,
                "logicalType": "decimal",
            })
        }
        PgType::Numeric {
            precision: None, ..
        } => match opts.unconstrained_numeric {
            UnconstrainedNumeric::String => json!("string"),
            UnconstrainedNumeric::Double => json!("double"),
            UnconstrainedNumeric::VariableScale => {
                if !named_types.insert(VARIABLE_SCALE_DECIMAL) {
                    return json!(VARIABLE_SCALE_DECIMAL);
                }
                json!({
                    "type": "record",
                    "name": "VariableScaleDecimal",
                    "namespace": "io.debezium.data",
                    "fields": [{"name": "scale", "type": "int"}, {"name": "value", "type": "bytes"}],
                    "connect.doc": "Variable scaled decimal",
                    "connect.version": 1,
                    "connect.name": VARIABLE_SCALE_DECIMAL,
                })
            }
        },
        PgType::Money => json!({
            "type": "bytes",
            "scale": crate::mapping::MONEY_SCALE,
            "precision": MONEY_PRECISION,
            "connect.version": 1,
            "connect.parameters": {"scale": crate::mapping::MONEY_SCALE.to_string()},
            "connect.name": DECIMAL,
            "logicalType": "decimal",
        }),
        PgType::Text
        | PgType::Varchar { .. }
        | PgType::Char { .. }
        | PgType::Name
        | PgType::Inet
        | PgType::Cidr
        | PgType::MacAddr
        | PgType::MacAddr8 => json!("string"),
        PgType::Bytea => json!("bytes"),
        PgType::Uuid => named("string", "io.debezium.data.Uuid"),
        PgType::Json | PgType::Jsonb => named("string", "io.debezium.data.Json"),
        PgType::Date => named("int", "io.debezium.time.Date"),
        PgType::Time if time_precision(typmod) <= 3 => named("int", "io.debezium.time.Time"),
        PgType::Time => named("long", "io.debezium.time.MicroTime"),
        PgType::TimeTz => named("string", "io.debezium.time.ZonedTime"),
        PgType::Timestamp if time_precision(typmod) <= 3 => {
            named("long", "io.debezium.time.Timestamp")
        }
        PgType::Timestamp => named("long", "io.debezium.time.MicroTimestamp"),
        PgType::TimestampTz => named("string", "io.debezium.time.ZonedTimestamp"),
        PgType::Interval => named("long", "io.debezium.time.MicroDuration"),
        PgType::Enum { labels, .. } => json!({
            "type": "string",
            "connect.version": 1,
            "connect.parameters": {"allowed": labels.join(",")},
            "connect.name": "io.debezium.data.Enum",
        }),
        PgType::Array { element } => {
            json!({"type": "array", "items": ["null", column_type(element, -1, opts, named_types)]})
        }
        PgType::Unknown { type_name } => match unknown_kind(type_name, typmod) {
            Unknown::Bit1 => json!("boolean"),
            Unknown::Bits => json!({
                "type": "bytes",
                "connect.version": 1,
                // Debezium's column length; a varbit without one is unbounded.
                "connect.parameters": {"length": if typmod > 0 { typmod.to_string() } else { i32::MAX.to_string() }},
                "connect.name": "io.debezium.data.Bits",
            }),
            Unknown::Point => {
                if !named_types.insert(POINT) {
                    return json!(POINT);
                }
                json!({
                    "type": "record",
                    "name": "Point",
                    "namespace": "io.debezium.data.geometry",
                    "fields": [
                        {"name": "x", "type": "double"},
                        {"name": "y", "type": "double"},
                        {"name": "wkb", "type": ["null", "bytes"], "default": null},
                        {"name": "srid", "type": ["null", "int"], "default": null},
                    ],
                    "connect.doc": "Geometry (POINT)",
                    "connect.version": 1,
                    "connect.name": POINT,
                })
            }
            Unknown::Xml => named("string", "io.debezium.data.Xml"),
            Unknown::Tsvector => named("string", "io.debezium.data.Tsvector"),
            Unknown::Text => json!("string"),
        },
    }
}

const POINT: &str = "io.debezium.data.geometry.Point";

/// Types walcast does not convert (they arrive as text) that Debezium
/// names; anything else is a plain string in both.
enum Unknown {
    Bit1,
    Bits,
    Point,
    Xml,
    Tsvector,
    Text,
}

fn unknown_kind(type_name: &str, typmod: i32) -> Unknown {
    match type_name {
        "bit" if typmod == 1 => Unknown::Bit1,
        "bit" | "bit varying" => Unknown::Bits,
        "point" => Unknown::Point,
        "xml" => Unknown::Xml,
        "tsvector" => Unknown::Tsvector,
        _ => Unknown::Text,
    }
}

/// Debezium's `source` record for Postgres, field for field, with
/// walcast's `commit_lsn` added at the end (an Avro reader built from
/// Debezium's schema skips it).
pub fn source_record() -> Json {
    json!({
        "type": "record",
        "name": "Source",
        "namespace": "io.debezium.connector.postgresql",
        "fields": [
            {"name": "version", "type": "string"},
            {"name": "connector", "type": "string"},
            {"name": "name", "type": "string"},
            {"name": "ts_ms", "type": "long"},
            {"name": "snapshot", "type": [{
                "type": "string",
                "connect.version": 1,
                "connect.parameters": {"allowed": "true,first,first_in_data_collection,last_in_data_collection,last,false,incremental"},
                "connect.default": "false",
                "connect.name": "io.debezium.data.Enum",
            }, "null"], "default": "false"},
            {"name": "db", "type": "string"},
            {"name": "sequence", "type": ["null", "string"], "default": null},
            {"name": "ts_us", "type": ["null", "long"], "default": null},
            {"name": "ts_ns", "type": ["null", "long"], "default": null},
            {"name": "schema", "type": "string"},
            {"name": "table", "type": "string"},
            {"name": "txId", "type": ["null", "long"], "default": null},
            {"name": "lsn", "type": ["null", "long"], "default": null},
            {"name": "xmin", "type": ["null", "long"], "default": null},
            {"name": "origin", "type": ["null", "string"], "default": null},
            {"name": "origin_lsn", "type": ["null", "long"], "default": null},
            {"name": "commit_lsn", "type": ["null", "long"], "default": null},
        ],
        "connect.version": 1,
        "connect.name": SOURCE_RECORD,
    })
}

/// Whether a column's Debezium type is a plain Avro string (so it can carry
/// the unavailable-value placeholder).
pub fn is_string_typed(pg: &PgType, typmod: i32, opts: &MappingOptions) -> bool {
    match pg {
        PgType::Text
        | PgType::Varchar { .. }
        | PgType::Char { .. }
        | PgType::Name
        | PgType::Json
        | PgType::Jsonb
        | PgType::TimeTz
        | PgType::TimestampTz
        | PgType::Uuid
        | PgType::Inet
        | PgType::Cidr
        | PgType::MacAddr
        | PgType::MacAddr8
        | PgType::Enum { .. } => true,
        PgType::Unknown { type_name } => matches!(
            unknown_kind(type_name, typmod),
            Unknown::Xml | Unknown::Tsvector | Unknown::Text
        ),
        PgType::Numeric {
            precision: None, ..
        } => opts.unconstrained_numeric == UnconstrainedNumeric::String,
        _ => false,
    }
}

/// Writes the non-null value `v` of a column of type `pg` (modifier
/// `typmod`) as [`column_type`] declares it. `Value::Unavailable` and the
/// types walcast's own mapping also has are the caller's
/// ([`crate::codec`]); this handles what differs. Returns `Ok(false)` when
/// the value is not one it handles.
pub fn write_value(out: &mut Vec<u8>, pg: &PgType, typmod: i32, v: &Value) -> Result<bool, String> {
    match (pg, v) {
        (PgType::Date, Value::Date(d)) => bin::long(out, i64::from(date_days(*d))),
        (PgType::Time, Value::Time(t)) if time_precision(typmod) <= 3 => {
            bin::long(out, t.div_euclid(1000))
        }
        (
            PgType::TimeTz,
            Value::TimeTz {
                micros,
                offset_seconds,
            },
        ) => bin::string(out, &zoned_time(*micros, *offset_seconds)),
        (PgType::Timestamp, Value::Timestamp(t)) => {
            let micros = match *t {
                TIMESTAMP_INFINITY => TIMESTAMP_INFINITY_VALUE,
                TIMESTAMP_NEG_INFINITY => TIMESTAMP_NEG_INFINITY_VALUE,
                t => t,
            };
            bin::long(
                out,
                if time_precision(typmod) <= 3 {
                    micros.div_euclid(1000)
                } else {
                    micros
                },
            )
        }
        (PgType::TimestampTz, Value::TimestampTz(t)) => {
            bin::string(out, &zoned_timestamp(*t, time_precision(typmod)))
        }
        (PgType::Money, Value::Numeric(n)) => bin::bytes(
            out,
            &crate::codec::decimal_bytes(n, crate::mapping::MONEY_SCALE)?,
        ),
        (PgType::Unknown { type_name }, Value::Text(s)) => match unknown_kind(type_name, typmod) {
            Unknown::Bit1 => out.push(u8::from(s == "1")),
            Unknown::Bits => bin::bytes(out, &bits_bytes(s)?),
            Unknown::Point => {
                let (x, y) = point(s)?;
                out.extend_from_slice(&x.to_le_bytes());
                out.extend_from_slice(&y.to_le_bytes());
                bin::long(out, 1);
                bin::bytes(out, &point_wkb(x, y));
                bin::long(out, 0); // srid: null
            }
            _ => bin::string(out, s),
        },
        _ => return Ok(false),
    }
    Ok(true)
}

/// Writes what Debezium writes for a `NOT NULL` column that a before image
/// does not carry (`REPLICA IDENTITY DEFAULT` sends the key columns only):
/// its type's zero. (Debezium writes the column's `DEFAULT` where it has
/// one, which walcast does not know; see `schemas/MAPPING.md`.)
pub fn write_zero(out: &mut Vec<u8>, pg: &PgType, typmod: i32, opts: &MappingOptions) {
    match pg {
        PgType::Bool => out.push(0),
        PgType::Int2 | PgType::Int4 | PgType::Int8 | PgType::Date | PgType::Interval => {
            bin::long(out, 0)
        }
        PgType::Time | PgType::Timestamp => bin::long(out, 0),
        PgType::Float4 => out.extend_from_slice(&0f32.to_le_bytes()),
        PgType::Float8 => out.extend_from_slice(&0f64.to_le_bytes()),
        PgType::Numeric {
            precision: Some(_), ..
        }
        | PgType::Money => bin::bytes(out, &[0]),
        PgType::Numeric {
            precision: None, ..
        } => match opts.unconstrained_numeric {
            UnconstrainedNumeric::VariableScale => {
                bin::long(out, 0);
                bin::bytes(out, &[0]);
            }
            UnconstrainedNumeric::Double => out.extend_from_slice(&0f64.to_le_bytes()),
            UnconstrainedNumeric::String => bin::string(out, "0"),
        },
        PgType::Bytea => bin::bytes(out, &[]),
        PgType::TimeTz => bin::string(out, "00:00:00Z"),
        PgType::TimestampTz => bin::string(out, &zoned_timestamp(0, 0)),
        PgType::Array { .. } => bin::long(out, 0),
        PgType::Unknown { type_name } => match unknown_kind(type_name, typmod) {
            Unknown::Bit1 => out.push(0),
            Unknown::Bits => bin::bytes(out, &[]),
            Unknown::Point => {
                out.extend_from_slice(&0f64.to_le_bytes());
                out.extend_from_slice(&0f64.to_le_bytes());
                bin::long(out, 0);
                bin::long(out, 0);
            }
            _ => bin::string(out, ""),
        },
        _ => bin::string(out, ""),
    }
}

/// What Debezium 3.6 makes of a column's `DEFAULT` (its
/// `PostgresDefaultValueConverter`): the value it declares as the field's
/// default and writes where a key-only before image lacks a `NOT NULL`
/// column; `None` where it declares none. Its rules, followed here to the
/// letter:
/// * only some types have a reader: `bool`, `int2/4/8` (and serials),
///   `float4/8`, `numeric(p, s)` (an unconstrained `numeric` would be a
///   struct, which Connect cannot use as a default), `text`, `varchar`,
///   `char(n)`, `json`, `jsonb`, `xml`, `uuid`, `date`, `time`,
///   `timestamp`, `timestamptz`, `interval`, `bit`, `varbit`, enums (the
///   label between the outer quotes, a doubled quote left doubled); a
///   domain, an array, `money`, `bytea`... have none;
/// * a function call (`now()`, `nextval('s'::regclass)`,
///   `gen_random_uuid()`) or `CURRENT_TIMESTAMP`-like keyword is not
///   evaluated: the type's placeholder stands for it (`0`, `false`, `""`,
///   `{}`, the epoch, the zero UUID);
/// * a literal is the text between the first two quotes on one line
///   (`'a''b'::text` reads as `a`, as Debezium's `'(.*?)'` does), or the
///   whole expression when it has no quote (`42`, `true`); anything that
///   does not then parse (`1 + 2`) has no default.
pub fn column_default(column: &Column) -> Option<Value> {
    let expr = column.default.as_deref()?.trim();
    let kind = default_kind(column)?;
    if expr.starts_with("NULL::") {
        return None;
    }
    if kind == DefaultKind::Enum {
        // Between the outer quotes of `'label'::type`, as it is (a doubled
        // quote stays doubled): Debezium's extractEnumDefault.
        let literal = &expr[..expr.rfind("::")?];
        let inner = literal.strip_prefix('\'')?.strip_suffix('\'')?;
        return Some(Value::Enum(inner.to_string()));
    }
    const CURRENT_DATE_TIMES: &[&str] = &[
        "current_timestamp",
        "current_time",
        "current_date",
        "localtime",
        "localtimestamp",
    ];
    let evaluated =
        is_function_call(expr) || CURRENT_DATE_TIMES.contains(&expr.to_ascii_lowercase().as_str());
    let text = if evaluated {
        placeholder(kind)?.to_string()
    } else {
        first_quoted(expr)?
    };
    let pg = &column.pg_type;
    let parse = |t: &PgType| walcast_sdk::pgtext::from_text(t, &text).ok();
    let v = match kind {
        DefaultKind::Bool => Value::Bool(text.eq_ignore_ascii_case("true")),
        DefaultKind::Int
        | DefaultKind::Date
        | DefaultKind::Timestamp
        | DefaultKind::TimestampTz => parse(pg)?,
        DefaultKind::Float => match parse(pg)? {
            Value::Float32(f) if f.is_finite() => Value::Float32(f),
            Value::Float64(f) if f.is_finite() => Value::Float64(f),
            _ => return None,
        },
        DefaultKind::Numeric => match parse(pg)? {
            v @ Value::Numeric(Numeric::Finite(_)) => v,
            _ => return None,
        },
        DefaultKind::Text => Value::Text(text),
        DefaultKind::Json => Value::Json(text),
        DefaultKind::Uuid => parse(pg)?,
        DefaultKind::Time if text == "00:00" => Value::Time(0),
        DefaultKind::Time => parse(pg)?,
        DefaultKind::Interval => parse(pg)?,
        DefaultKind::Enum => return None,
        DefaultKind::Bits => {
            if !text.bytes().all(|b| b == b'0' || b == b'1') || text.is_empty() {
                return None;
            }
            Value::Text(text)
        }
    };
    // ±infinity dates and timestamps: Debezium's readers make other numbers
    // of them than its value converters; left out rather than guessed.
    match v {
        Value::Date(DATE_INFINITY | DATE_NEG_INFINITY)
        | Value::Timestamp(TIMESTAMP_INFINITY | TIMESTAMP_NEG_INFINITY)
        | Value::TimestampTz(TIMESTAMP_INFINITY | TIMESTAMP_NEG_INFINITY) => None,
        v => Some(v),
    }
}

/// The types Debezium reads defaults of (see [`column_default`]).
#[derive(Clone, Copy, PartialEq, Debug)]
enum DefaultKind {
    Bool,
    Int,
    Float,
    Numeric,
    Text,
    Json,
    Uuid,
    Date,
    Time,
    Timestamp,
    TimestampTz,
    Interval,
    Enum,
    Bits,
}

fn default_kind(column: &Column) -> Option<DefaultKind> {
    // A domain keeps its own OID (Debezium looks its reader up by the
    // domain's name, and has none).
    let (kind, oid) = match &column.pg_type {
        PgType::Bool => (DefaultKind::Bool, 16),
        PgType::Int2 => (DefaultKind::Int, 21),
        PgType::Int4 => (DefaultKind::Int, 23),
        PgType::Int8 => (DefaultKind::Int, 20),
        PgType::Float4 => (DefaultKind::Float, 700),
        PgType::Float8 => (DefaultKind::Float, 701),
        PgType::Numeric {
            precision: Some(_), ..
        } => (DefaultKind::Numeric, 1700),
        PgType::Text => (DefaultKind::Text, 25),
        PgType::Varchar { .. } => (DefaultKind::Text, 1043),
        PgType::Char { .. } => (DefaultKind::Text, 1042),
        PgType::Json => (DefaultKind::Json, 114),
        PgType::Jsonb => (DefaultKind::Json, 3802),
        PgType::Uuid => (DefaultKind::Uuid, 2950),
        PgType::Date => (DefaultKind::Date, 1082),
        PgType::Time => (DefaultKind::Time, 1083),
        PgType::Timestamp => (DefaultKind::Timestamp, 1114),
        PgType::TimestampTz => (DefaultKind::TimestampTz, 1184),
        PgType::Interval => (DefaultKind::Interval, 1186),
        // Debezium 3.6 reads the defaults of every enum type it knows.
        PgType::Enum { .. } => return Some(DefaultKind::Enum),
        PgType::Unknown { type_name } => match type_name.as_str() {
            "xml" => (DefaultKind::Text, 142),
            "bit" => (DefaultKind::Bits, 1560),
            "bit varying" => (DefaultKind::Bits, 1562),
            _ => return None,
        },
        _ => return None,
    };
    (column.type_oid == oid).then_some(kind)
}

/// What Debezium puts in place of a function call (`extractDefault`'s
/// placeholder per type); `None` where the placeholder does not parse as
/// the type (Debezium then has no default either).
fn placeholder(kind: DefaultKind) -> Option<&'static str> {
    Some(match kind {
        DefaultKind::Bool => "false",
        DefaultKind::Int => "0",
        DefaultKind::Float | DefaultKind::Numeric => "0.0",
        DefaultKind::Text => "",
        DefaultKind::Json => "{}",
        DefaultKind::Uuid => "00000000-0000-0000-0000-000000000000",
        DefaultKind::Date => "1970-01-01",
        DefaultKind::Time => "00:00",
        // Debezium's "1970-01-01", read in the JVM's zone (UTC on servers).
        DefaultKind::Timestamp => "1970-01-01 00:00:00",
        DefaultKind::TimestampTz => "1970-01-01 00:00:00+00",
        // Debezium's "epoch" is no interval Postgres's driver reads.
        DefaultKind::Interval | DefaultKind::Enum | DefaultKind::Bits => return None,
    })
}

/// Debezium's test for a default evaluated by a function:
/// `^[(]?[A-Za-z0-9_.]+\((?:.+(?:, ?.+)*)?\)` (3.6.1).
fn is_function_call(expr: &str) -> bool {
    let s = expr.strip_prefix('(').unwrap_or(expr);
    let name = s
        .bytes()
        .take_while(|b| b.is_ascii_alphanumeric() || *b == b'_' || *b == b'.')
        .count();
    name > 0 && s[name..].starts_with('(') && s[name + 1..].contains(')')
}

/// Debezium's `extractDefault`: the expression itself when it has no
/// quote, else the first match of Java's `'(.*?)'` (whose `.` matches no
/// line terminator); `None` when there is none.
fn first_quoted(expr: &str) -> Option<String> {
    if !expr.contains('\'') {
        return Some(expr.to_string());
    }
    let quotes: Vec<usize> = expr.match_indices('\'').map(|(i, _)| i).collect();
    quotes.windows(2).find_map(|w| {
        let inner = &expr[w[0] + 1..w[1]];
        (!inner.contains(['\n', '\r', '\u{85}', '\u{2028}', '\u{2029}'])).then(|| inner.to_string())
    })
}

/// A default ([`column_default`]) as an Avro schema's `default` (and
/// `connect.default`): numbers, booleans and strings as they are, bytes
/// (decimals, bit strings) as a string of ISO-8859-1 characters, times in
/// the unit the column's type has.
pub fn default_json(pg: &PgType, typmod: i32, v: &Value) -> Option<Json> {
    let latin1 = |b: &[u8]| Json::String(b.iter().map(|&c| char::from(c)).collect());
    Some(match (pg, v) {
        (_, Value::Bool(b)) => json!(b),
        (_, Value::Int16(i)) => json!(i),
        (_, Value::Int32(i)) => json!(i),
        (_, Value::Int64(i)) => json!(i),
        // The float's shortest decimal form, as Java prints a Float.
        (_, Value::Float32(f)) => json!(f.to_string().parse::<f64>().ok()?),
        (_, Value::Float64(f)) => json!(f),
        (PgType::Numeric { scale, .. }, Value::Numeric(n)) => {
            latin1(&crate::codec::decimal_bytes(n, scale.unwrap_or(0)).ok()?)
        }
        (PgType::Uuid, Value::Uuid(u)) => {
            json!(apache_avro::Uuid::from_bytes(*u).hyphenated().to_string())
        }
        (PgType::Date, Value::Date(d)) => json!(date_days(*d)),
        (PgType::Time, Value::Time(t)) if time_precision(typmod) <= 3 => json!(t.div_euclid(1000)),
        (PgType::Time, Value::Time(t)) => json!(t),
        (PgType::Timestamp, Value::Timestamp(t)) if time_precision(typmod) <= 3 => {
            json!(t.div_euclid(1000))
        }
        (PgType::Timestamp, Value::Timestamp(t)) => json!(t),
        (PgType::TimestampTz, Value::TimestampTz(t)) => {
            json!(zoned_timestamp(*t, time_precision(typmod)))
        }
        (PgType::Unknown { type_name }, Value::Text(s)) => match unknown_kind(type_name, typmod) {
            Unknown::Bit1 => json!(s == "1"),
            Unknown::Bits => latin1(&bits_bytes(s).ok()?),
            _ => json!(s),
        },
        (
            PgType::Interval,
            Value::Interval {
                months,
                days,
                micros,
            },
        ) => json!(crate::codec::interval_micros(*months, *days, *micros)),
        (_, Value::Text(s) | Value::Json(s) | Value::Enum(s)) => json!(s),
        _ => return None,
    })
}

fn date_days(d: i32) -> i32 {
    match d {
        DATE_INFINITY => DATE_INFINITY_VALUE,
        DATE_NEG_INFINITY => DATE_NEG_INFINITY_VALUE,
        d => d,
    }
}

/// Debezium's `ZonedTimestamp`: UTC, `YYYY-MM-DDTHH:MM:SS`, then exactly
/// `digits` fractional digits (none for 0), then `Z`; `infinity` and
/// `-infinity` as Postgres spells them.
pub fn zoned_timestamp(micros: i64, digits: u32) -> String {
    match micros {
        TIMESTAMP_INFINITY => "infinity".into(),
        TIMESTAMP_NEG_INFINITY => "-infinity".into(),
        _ => {
            let days = micros.div_euclid(86_400_000_000);
            let rest = micros.rem_euclid(86_400_000_000);
            let (y, m, d) = civil_from_days(days);
            let secs = rest / 1_000_000;
            let mut s = format!(
                "{}-{m:02}-{d:02}T{:02}:{:02}:{:02}",
                walcast_sdk::json::iso_year(y),
                secs / 3600,
                secs / 60 % 60,
                secs % 60
            );
            if digits > 0 {
                let frac = format!("{:06}", rest % 1_000_000);
                s.push('.');
                s.push_str(&frac[..digits.min(6) as usize]);
            }
            s.push('Z');
            s
        }
    }
}

/// Debezium's `ZonedTime` (the JSON encoder writes the same).
pub fn zoned_time(micros: i64, offset_seconds: i32) -> String {
    walcast_sdk::json::zoned_time(micros, offset_seconds)
}

/// A bit string (`"1000000001"`, most significant bit first) as Java's
/// `BitSet.toByteArray`: little-endian bytes, no trailing zero bytes.
pub fn bits_bytes(text: &str) -> Result<Vec<u8>, String> {
    let mut bytes = vec![0u8; text.len().div_ceil(8)];
    for (i, c) in text.bytes().rev().enumerate() {
        match c {
            b'1' => bytes[i / 8] |= 1 << (i % 8),
            b'0' => {}
            _ => return Err(format!("`{text}` is not a bit string")),
        }
    }
    while bytes.last() == Some(&0) {
        bytes.pop();
    }
    Ok(bytes)
}

/// `(1.5,-2)`, a point's text form, as its coordinates.
fn point(text: &str) -> Result<(f64, f64), String> {
    let inner = text
        .trim()
        .strip_prefix('(')
        .and_then(|t| t.strip_suffix(')'))
        .ok_or_else(|| format!("`{text}` is not a point"))?;
    let (x, y) = inner
        .split_once(',')
        .ok_or_else(|| format!("`{text}` is not a point"))?;
    let num = |s: &str| {
        s.trim()
            .parse::<f64>()
            .map_err(|e| format!("`{text}` is not a point: {e}"))
    };
    Ok((num(x)?, num(y)?))
}

/// A point's well-known binary, little-endian, as Debezium writes it.
pub fn point_wkb(x: f64, y: f64) -> Vec<u8> {
    let mut wkb = Vec::with_capacity(21);
    wkb.push(1);
    wkb.extend_from_slice(&1u32.to_le_bytes());
    wkb.extend_from_slice(&x.to_le_bytes());
    wkb.extend_from_slice(&y.to_le_bytes());
    wkb
}

#[cfg(test)]
mod tests {
    use super::*;

    fn column(pg_type: PgType, type_oid: u32, default: &str) -> Column {
        Column {
            name: "c".into(),
            pg_type,
            type_oid,
            type_modifier: -1,
            nullable: false,
            key: false,
            key_position: None,
            default: Some(default.into()),
        }
    }

    #[test]
    fn defaults_are_read_as_debezium_reads_them() {
        let d = |pg: PgType, oid: u32, e: &str| column_default(&column(pg, oid, e));
        assert_eq!(
            d(PgType::Text, 25, "'dflt'::text"),
            Some(Value::Text("dflt".into()))
        );
        // Debezium's '(.*?)' stops at the first quote of a doubled one.
        assert_eq!(
            d(PgType::Text, 25, "'it''s'::text"),
            Some(Value::Text("it".into()))
        );
        assert_eq!(d(PgType::Int4, 23, "42"), Some(Value::Int32(42)));
        assert_eq!(d(PgType::Int4, 23, "'-5'::integer"), Some(Value::Int32(-5)));
        // A function call is not evaluated: the type's placeholder.
        assert_eq!(
            d(PgType::Int8, 20, "nextval('t_id_seq'::regclass)"),
            Some(Value::Int64(0))
        );
        assert_eq!(
            d(PgType::TimestampTz, 1184, "now()"),
            Some(Value::TimestampTz(0))
        );
        assert_eq!(
            d(PgType::Uuid, 2950, "gen_random_uuid()"),
            Some(Value::Uuid([0; 16]))
        );
        // No reader: a domain (its own OID), money, an expression.
        assert_eq!(d(PgType::Int4, 16_400, "1"), None);
        assert_eq!(d(PgType::Money, 790, "'1.00'::money"), None);
        assert_eq!(
            d(PgType::TimestampTz, 1184, "CURRENT_TIMESTAMP"),
            Some(Value::TimestampTz(0))
        );
        assert_eq!(d(PgType::Int4, 23, "1 + 2"), None);
        let mood = PgType::Enum {
            type_name: "mood".into(),
            labels: vec![],
        };
        assert_eq!(
            d(mood, 16_500, "'it''s'::mood"),
            Some(Value::Enum("it''s".into()))
        );
        assert_eq!(d(PgType::Bool, 16, "true"), Some(Value::Bool(true)));
        assert_eq!(d(PgType::Text, 25, "NULL::text"), None);
        let bits = PgType::Unknown {
            type_name: "bit".into(),
        };
        let v = d(bits.clone(), 1560, "'101'::\"bit\"").unwrap();
        assert_eq!(default_json(&bits, 3, &v), Some(json!("\u{5}")));
    }

    #[test]
    fn zoned_timestamp_has_the_columns_digits() {
        // 2023-11-14 22:13:20.123456 UTC
        let t = 1_700_000_000_123_456;
        assert_eq!(zoned_timestamp(t, 6), "2023-11-14T22:13:20.123456Z");
        assert_eq!(zoned_timestamp(t, 3), "2023-11-14T22:13:20.123Z");
        assert_eq!(zoned_timestamp(t, 0), "2023-11-14T22:13:20Z");
        assert_eq!(zoned_timestamp(0, 6), "1970-01-01T00:00:00.000000Z");
        assert_eq!(zoned_timestamp(0, 0), "1970-01-01T00:00:00Z");
        // 1900-06-30 17:00:00 UTC, before the epoch.
        assert_eq!(
            zoned_timestamp(-2_193_375_600_000_000, 6),
            "1900-06-30T17:00:00.000000Z"
        );
        assert_eq!(zoned_timestamp(TIMESTAMP_INFINITY, 6), "infinity");
        assert_eq!(zoned_timestamp(TIMESTAMP_NEG_INFINITY, 3), "-infinity");
    }

    #[test]
    fn zoned_time_drops_trailing_zeros_of_the_fraction() {
        let h = 3_600_000_000;
        assert_eq!(zoned_time(10 * h, 7200), "08:00:00Z");
        assert_eq!(zoned_time(10 * h + 500_000, 7200), "08:00:00.5Z");
        assert_eq!(zoned_time(10 * h + 123_000, 19_800), "04:30:00.123Z");
        assert_eq!(zoned_time(24 * h - 1, -8 * 3600), "07:59:59.999999Z");
        assert_eq!(zoned_time(0, 0), "00:00:00Z");
    }

    #[test]
    fn bits_are_little_endian_like_java_bitsets() {
        assert_eq!(bits_bytes("101").unwrap(), [0x05]);
        assert_eq!(bits_bytes("11").unwrap(), [0x03]);
        assert_eq!(bits_bytes("1000000001").unwrap(), [0x01, 0x02]);
        assert_eq!(bits_bytes("0000000000").unwrap(), Vec::<u8>::new());
        assert!(bits_bytes("10x").is_err());
    }

    #[test]
    fn point_wkb_is_what_debezium_wrote() {
        assert_eq!(point("(1.5,-2)").unwrap(), (1.5, -2.0));
        use base64::Engine;
        assert_eq!(
            base64::engine::general_purpose::STANDARD.encode(point_wkb(1.5, -2.0)),
            "AQEAAAAAAAAAAAD4PwAAAAAAAADA"
        );
        assert!(point("1,2").is_err());
    }

    #[test]
    fn time_precision_follows_the_type_modifier() {
        assert_eq!(time_precision(-1), 6);
        assert_eq!(time_precision(0), 0);
        assert_eq!(time_precision(3), 3);
        let opts = MappingOptions::default();
        let mut n = HashSet::new();
        assert_eq!(
            column_type(&PgType::Timestamp, 3, &opts, &mut n)["connect.name"],
            "io.debezium.time.Timestamp"
        );
        assert_eq!(
            column_type(&PgType::Timestamp, 4, &opts, &mut n)["connect.name"],
            "io.debezium.time.MicroTimestamp"
        );
        assert_eq!(column_type(&PgType::Time, 0, &opts, &mut n)["type"], "int");
        assert_eq!(
            column_type(&PgType::Time, -1, &opts, &mut n)["type"],
            "long"
        );
    }

    #[test]
    fn zero_numeric_is_one_zero_byte_as_javas_biginteger() {
        use walcast_sdk::Numeric;
        assert_eq!(
            crate::codec::decimal_bytes(&Numeric::Finite("0".into()), 0).unwrap(),
            [0]
        );
        assert_eq!(
            crate::codec::decimal_bytes(&Numeric::Finite("0.00".into()), 2).unwrap(),
            [0]
        );
    }
}
