//! The serde-based writer the byte writer replaced, kept as the reference
//! the tests compare against byte for byte: `Serialize` impls over the
//! event (rows in column order, the envelope in Debezium's field order),
//! and the tree renderer of single values with its `format!`-based time,
//! uuid and interval text, as they were before the rewrite.

use base64::Engine;
use serde::ser::{Serialize, SerializeMap, SerializeSeq, Serializer};
use serde_json::{json, Value as Json};

use super::{civil_from_days, JsonOptions, SpecialNumeric};
use crate::event::ChangeEvent;
use crate::table::TableSchema;
use crate::value::{Numeric, Value, TIMESTAMP_INFINITY, TIMESTAMP_NEG_INFINITY};

pub fn envelope_bytes(event: &ChangeEvent, opts: &JsonOptions) -> Vec<u8> {
    serde_json::to_vec(&EnvelopeSer { event, opts }).expect("events always serialise")
}

pub fn key_bytes(event: &ChangeEvent, opts: &JsonOptions) -> Option<Vec<u8>> {
    let cols = event.key_values()?;
    Some(serde_json::to_vec(&KeySer { cols: &cols, opts }).expect("keys always serialise"))
}

fn special_numeric(n: &Numeric, mode: SpecialNumeric) -> String {
    match (mode, n) {
        (_, Numeric::Finite(s)) => s.clone(),
        (SpecialNumeric::Postgres, other) => other.to_string(),
        (SpecialNumeric::Debezium, Numeric::NaN) => "NAN".into(),
        (SpecialNumeric::Debezium, Numeric::PositiveInfinity) => "POSITIVE_INFINITY".into(),
        (SpecialNumeric::Debezium, Numeric::NegativeInfinity) => "NEGATIVE_INFINITY".into(),
    }
}

/// The tree renderer of one value, as `json::value` was.
pub fn value(v: &Value, opts: &JsonOptions) -> Json {
    match v {
        Value::Null => Json::Null,
        Value::Unavailable => Json::String(opts.unavailable_placeholder.clone()),
        Value::Bool(b) => Json::Bool(*b),
        Value::Int16(i) => json!(i),
        Value::Int32(i) => json!(i),
        Value::Int64(i) => json!(i),
        Value::Float32(f) => float(crate::json::float32_as_double(*f)),
        Value::Float64(f) => float(*f),
        Value::Numeric(n) => Json::String(special_numeric(n, opts.special_numeric)),
        Value::Text(s) | Value::Json(s) | Value::Network(s) | Value::Enum(s) => {
            Json::String(s.clone())
        }
        Value::Bytes(b) => Json::String(base64::engine::general_purpose::STANDARD.encode(b)),
        Value::Uuid(u) => Json::String(uuid_string(u)),
        Value::Date(d) => json!(d),
        Value::Time(t) => json!(t),
        Value::TimeTz {
            micros,
            offset_seconds,
        } => Json::String(zoned_time(*micros, *offset_seconds)),
        Value::Timestamp(t) => json!(t),
        Value::TimestampTz(t) => Json::String(timestamp_utc(*t)),
        Value::Interval {
            months,
            days,
            micros,
        } => json!(crate::json::interval_micros(*months, *days, *micros)),
        Value::Array(items) => Json::Array(items.iter().map(|i| value(i, opts)).collect()),
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

pub fn uuid_string(u: &[u8; 16]) -> String {
    let h: String = u.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

pub fn zoned_time(micros: i64, offset_seconds: i32) -> String {
    let utc = (micros - i64::from(offset_seconds) * 1_000_000).rem_euclid(86_400_000_000);
    let secs = utc / 1_000_000;
    let mut s = format!("{:02}:{:02}:{:02}", secs / 3600, secs / 60 % 60, secs % 60);
    let frac = utc % 1_000_000;
    if frac != 0 {
        let f = format!("{frac:06}");
        s.push('.');
        s.push_str(f.trim_end_matches('0'));
    }
    s.push('Z');
    s
}

fn time_of_day(micros: i64) -> String {
    let secs = micros / 1_000_000;
    let frac = micros % 1_000_000;
    format!(
        "{:02}:{:02}:{:02}.{:06}",
        secs / 3600,
        (secs / 60) % 60,
        secs % 60,
        frac
    )
}

pub fn timestamp_utc(micros: i64) -> String {
    match micros {
        TIMESTAMP_INFINITY => "infinity".into(),
        TIMESTAMP_NEG_INFINITY => "-infinity".into(),
        _ => {
            let days = micros.div_euclid(86_400_000_000);
            let rest = micros.rem_euclid(86_400_000_000);
            let (y, m, d) = civil_from_days(days);
            format!(
                "{}-{m:02}-{d:02}T{}Z",
                crate::json::iso_year(y),
                time_of_day(rest)
            )
        }
    }
}

struct EnvelopeSer<'a> {
    event: &'a ChangeEvent,
    opts: &'a JsonOptions,
}

impl<'a> Serialize for EnvelopeSer<'a> {
    fn serialize<S: Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
        let (e, opts) = (self.event, self.opts);
        let row = |r: &'a Option<Vec<Value>>| -> Option<RowSer<'a>> {
            r.as_deref().map(|values| RowSer {
                table: &e.table,
                values,
                opts,
            })
        };
        let mut m = ser.serialize_map(Some(8))?;
        m.serialize_entry("before", &row(&e.before))?;
        m.serialize_entry("after", &row(&e.after))?;
        m.serialize_entry("source", &SourceSer(e))?;
        m.serialize_entry("op", e.op.code())?;
        m.serialize_entry("ts_ms", &e.ts_ms)?;
        m.serialize_entry("ts_us", &e.ts_ms.saturating_mul(1000))?;
        m.serialize_entry("ts_ns", &e.ts_ms.saturating_mul(1_000_000))?;
        m.serialize_entry("transaction", &e.transaction.as_ref().map(TransactionSer))?;
        m.end()
    }
}

struct SourceSer<'a>(&'a ChangeEvent);

impl Serialize for SourceSer<'_> {
    fn serialize<S: Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
        let (s, table) = (&self.0.source, &self.0.table);
        let mut m = ser.serialize_map(Some(14))?;
        m.serialize_entry("version", env!("CARGO_PKG_VERSION"))?;
        m.serialize_entry("connector", "postgresql")?;
        m.serialize_entry("name", &s.name)?;
        m.serialize_entry("ts_ms", &s.ts_ms)?;
        m.serialize_entry("ts_us", &s.ts_us)?;
        m.serialize_entry("ts_ns", &s.ts_us.saturating_mul(1000))?;
        m.serialize_entry("snapshot", s.snapshot.as_str())?;
        m.serialize_entry("db", &s.db)?;
        m.serialize_entry("schema", &table.schema)?;
        m.serialize_entry("table", &table.name)?;
        m.serialize_entry("txId", &s.tx_id)?;
        m.serialize_entry("lsn", &s.lsn.0)?;
        m.serialize_entry("xmin", &Option::<i64>::None)?;
        m.serialize_entry("commit_lsn", &s.commit_lsn.0)?;
        m.end()
    }
}

struct TransactionSer<'a>(&'a crate::event::TransactionInfo);

impl Serialize for TransactionSer<'_> {
    fn serialize<S: Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
        let mut m = ser.serialize_map(Some(3))?;
        m.serialize_entry("id", &self.0.id)?;
        m.serialize_entry("total_order", &self.0.total_order)?;
        m.serialize_entry("data_collection_order", &self.0.data_collection_order)?;
        m.end()
    }
}

struct RowSer<'a> {
    table: &'a TableSchema,
    values: &'a [Value],
    opts: &'a JsonOptions,
}

impl Serialize for RowSer<'_> {
    fn serialize<S: Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
        let mut m = ser.serialize_map(Some(self.values.len()))?;
        for (c, v) in self.table.columns.iter().zip(self.values) {
            match v {
                Value::Unavailable => m.serialize_entry(
                    &c.name,
                    &crate::json::column_value(&c.pg_type, v, self.opts),
                )?,
                _ => m.serialize_entry(&c.name, &ValueSer(v, self.opts))?,
            }
        }
        m.end()
    }
}

struct KeySer<'a> {
    cols: &'a [(&'a str, &'a Value)],
    opts: &'a JsonOptions,
}

impl Serialize for KeySer<'_> {
    fn serialize<S: Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
        let mut m = ser.serialize_map(Some(self.cols.len()))?;
        for (name, v) in self.cols {
            m.serialize_entry(name, &ValueSer(v, self.opts))?;
        }
        m.end()
    }
}

/// One value, rendered as [`value`] renders it.
struct ValueSer<'a>(&'a Value, &'a JsonOptions);

impl Serialize for ValueSer<'_> {
    fn serialize<S: Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            Value::Null => ser.serialize_unit(),
            Value::Unavailable => ser.serialize_str(&self.1.unavailable_placeholder),
            Value::Bool(b) => ser.serialize_bool(*b),
            Value::Int16(i) => ser.serialize_i16(*i),
            Value::Int32(i) => ser.serialize_i32(*i),
            Value::Int64(i) => ser.serialize_i64(*i),
            Value::Float32(f) => serialize_float(crate::json::float32_as_double(*f), ser),
            Value::Float64(f) => serialize_float(*f, ser),
            Value::Numeric(Numeric::Finite(s)) => ser.serialize_str(s),
            Value::Text(s) | Value::Json(s) | Value::Network(s) | Value::Enum(s) => {
                ser.serialize_str(s)
            }
            Value::Date(d) => ser.serialize_i32(*d),
            Value::Time(t) | Value::Timestamp(t) => ser.serialize_i64(*t),
            Value::Array(items) => {
                let mut seq = ser.serialize_seq(Some(items.len()))?;
                for i in items {
                    seq.serialize_element(&ValueSer(i, self.1))?;
                }
                seq.end()
            }
            // Rarer or string-building types: the tree renderer's answer.
            other => value(other, self.1).serialize(ser),
        }
    }
}

fn serialize_float<S: Serializer>(f: f64, ser: S) -> Result<S::Ok, S::Error> {
    if f.is_finite() {
        ser.serialize_f64(f)
    } else {
        float(f).serialize(ser)
    }
}
