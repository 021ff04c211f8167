//! Events as JSON, in the shape Debezium's JsonConverter writes with
//! `schemas.enable=false`, so existing consumers parse them unchanged.
//!
//! Value representations follow Debezium's Postgres defaults, with one
//! deliberate difference: `numeric` is a JSON string (`"12.50"`, Debezium's
//! `decimal.handling.mode=string`) rather than base64 of the unscaled bytes,
//! because every JSON consumer (Redis, a search index, a human) can read it.
//!
//! | Postgres | JSON | Debezium semantic type |
//! |---|---|---|
//! | real | the real's shortest decimal form (`0.1`), as Java prints a float | float32 |
//! | date | days since epoch | io.debezium.time.Date |
//! | time | microseconds since midnight | io.debezium.time.MicroTime |
//! | timetz | `"HH:MM:SS.ffffffZ"` in UTC | io.debezium.time.ZonedTime |
//! | timestamp | microseconds since epoch | io.debezium.time.MicroTimestamp |
//! | timestamptz | `"YYYY-MM-DDTHH:MM:SS.ffffffZ"`, years outside 0000-9999 signed (`+10000`, `-0043`) as Java writes them | io.debezium.time.ZonedTimestamp |
//! | interval | microseconds (months of 30.4375 days, computed in doubles as Debezium does) | io.debezium.time.MicroDuration |
//! | bytea | base64 | bytes |
//! | uuid, json, jsonb, inet, enum | string | io.debezium.data.Uuid / Json / ... |
//!
//! An unchanged TOASTed value is Debezium's placeholder
//! `__debezium_unavailable_value`: as text, as base64 of its bytes in a
//! `bytea`, as a one-element array in an array ([`column_value`]).
//! Compared with Debezium 3.6.1 on generated workloads by
//! tests/debezium_generated.rs; the differences left are listed in the
//! README ("Debezium parity").

use base64::Engine;
use serde_json::{json, Map, Value as Json};

use crate::event::ChangeEvent;
use crate::table::{PgType, TableSchema};
use crate::value::{Numeric, Value, DATE_INFINITY, DATE_NEG_INFINITY};

mod writer;
pub(crate) use writer::{prepared_envelope, prepared_key, write_prepared_envelope, TableCache};
#[cfg(test)]
mod proptests;
#[cfg(test)]
mod reference;

/// Debezium's default `unavailable.value.placeholder`.
pub const DEFAULT_UNAVAILABLE_PLACEHOLDER: &str = "__debezium_unavailable_value";

/// How a `numeric` NaN or ±Infinity is written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SpecialNumeric {
    /// Postgres's own text: `"NaN"`, `"Infinity"`, `"-Infinity"` (what
    /// `numeric_in` reads back, and what most JSON consumers expect).
    #[default]
    Postgres,
    /// Debezium's (`decimal.handling.mode=string`): `"NAN"`,
    /// `"POSITIVE_INFINITY"`, `"NEGATIVE_INFINITY"`, for consumers written
    /// against Debezium's output.
    Debezium,
}

/// Options that change how values render.
#[derive(Debug, Clone)]
pub struct JsonOptions {
    /// Written in place of an unchanged TOASTed value.
    pub unavailable_placeholder: String,
    pub special_numeric: SpecialNumeric,
}

impl Default for JsonOptions {
    fn default() -> Self {
        JsonOptions {
            unavailable_placeholder: DEFAULT_UNAVAILABLE_PLACEHOLDER.to_string(),
            special_numeric: SpecialNumeric::default(),
        }
    }
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

/// The full envelope: `before`, `after`, `source`, `op`, `ts_ms` (with
/// Debezium 3's `ts_us` and `ts_ns`: the same processing time, which walcast
/// keeps in milliseconds), `transaction`. The source block's `ts_us` and
/// `ts_ns` are the commit time Postgres gives in microseconds; `xmin` is
/// always null, as in Debezium unless its xmin tracking is on.
pub fn envelope(event: &ChangeEvent, opts: &JsonOptions) -> Json {
    let s = &event.source;
    let table = &event.table;
    json!({
        "before": event.before.as_deref().map(|r| row(table, r, opts)),
        "after": event.after.as_deref().map(|r| row(table, r, opts)),
        "source": {
            "version": env!("CARGO_PKG_VERSION"),
            "connector": "postgresql",
            "name": s.name,
            "ts_ms": s.ts_ms,
            "ts_us": s.ts_us,
            "ts_ns": s.ts_us.saturating_mul(1000),
            "snapshot": s.snapshot.as_str(),
            "db": s.db,
            "schema": table.schema,
            "table": table.name,
            "txId": s.tx_id,
            "lsn": s.lsn.0,
            "xmin": Json::Null,
            "commit_lsn": s.commit_lsn.0,
        },
        "op": event.op.code(),
        "ts_ms": event.ts_ms,
        "ts_us": event.ts_ms.saturating_mul(1000),
        "ts_ns": event.ts_ms.saturating_mul(1_000_000),
        "transaction": event.transaction.as_ref().map(|t| json!({
            "id": t.id,
            "total_order": t.total_order,
            "data_collection_order": t.data_collection_order,
        })),
    })
}

/// The key record: the primary-key columns. `None` for a key-less table.
pub fn key(event: &ChangeEvent, opts: &JsonOptions) -> Option<Json> {
    let cols = event.key_values()?;
    let mut m = Map::new();
    for (name, v) in cols {
        m.insert(name.to_string(), value(v, opts));
    }
    Some(Json::Object(m))
}

/// A row image as a JSON object keyed by column name.
pub fn row(table: &TableSchema, values: &[Value], opts: &JsonOptions) -> Json {
    let mut m = Map::with_capacity(values.len());
    for (c, v) in table.columns.iter().zip(values) {
        m.insert(c.name.clone(), column_value(&c.pg_type, v, opts));
    }
    Json::Object(m)
}

/// One column's value: [`value`], except that an unchanged TOASTed value
/// (`Value::Unavailable`) takes the form Debezium gives the placeholder in
/// the column's type, so that a reader decodes it as it decodes the
/// column's values: base64 of its bytes for a `bytea`, a one-element array
/// for an array, the text itself otherwise.
pub fn column_value(pg: &PgType, v: &Value, opts: &JsonOptions) -> Json {
    match (v, pg) {
        (Value::Unavailable, PgType::Bytea) => Json::String(
            base64::engine::general_purpose::STANDARD
                .encode(opts.unavailable_placeholder.as_bytes()),
        ),
        (Value::Unavailable, PgType::Array { .. }) => json!([opts.unavailable_placeholder]),
        _ => value(v, opts),
    }
}

/// One value.
pub fn value(v: &Value, opts: &JsonOptions) -> Json {
    match v {
        Value::Null => Json::Null,
        Value::Unavailable => Json::String(opts.unavailable_placeholder.clone()),
        Value::Bool(b) => Json::Bool(*b),
        Value::Int16(i) => json!(i),
        Value::Int32(i) => json!(i),
        Value::Int64(i) => json!(i),
        Value::Float32(f) => float(float32_as_double(*f)),
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
        } => json!(interval_micros(*months, *days, *micros)),
        Value::Array(items) => Json::Array(items.iter().map(|i| value(i, opts)).collect()),
    }
}

/// [`envelope`] written straight to bytes, without building the JSON tree,
/// in Debezium's field order and rows in column order; the content equals
/// [`envelope`]'s (tested). The Kafka sink's encoder ([`crate::JsonEncoder`])
/// writes the same bytes with each table's names escaped once (how and why:
/// `json/writer.rs`).
pub fn envelope_bytes(event: &ChangeEvent, opts: &JsonOptions) -> Vec<u8> {
    let mut out = Vec::with_capacity(512);
    writer::write_envelope(&mut out, event, writer::Names::Plain(&event.table), opts);
    out
}

/// [`key`] written straight to bytes; `None` for a key-less table.
pub fn key_bytes(event: &ChangeEvent, opts: &JsonOptions) -> Option<Vec<u8>> {
    key_bytes_with(event, opts, None)
}

/// As [`key_bytes`], with a field added after the key columns (the topic
/// router's table identifier).
pub fn key_bytes_with(
    event: &ChangeEvent,
    opts: &JsonOptions,
    extra: Option<&crate::encode::KeyField>,
) -> Option<Vec<u8>> {
    let cols = event.key_values()?;
    let mut out = Vec::with_capacity(64);
    out.push(b'{');
    for (i, (name, v)) in cols.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        writer::write_str(&mut out, name);
        out.push(b':');
        writer::write_value(&mut out, v, opts);
    }
    if let Some(f) = extra {
        if !cols.is_empty() {
            out.push(b',');
        }
        writer::write_str(&mut out, &f.name);
        out.push(b':');
        writer::write_str(&mut out, &f.value);
    }
    out.push(b'}');
    Some(out)
}

/// The text of [`row`]'s tree (keys sorted, as its map keeps them), without
/// building it; with `skip_unavailable`, unchanged TOASTed columns are left
/// out, as the Redis sink stores rows.
pub fn row_text(
    table: &TableSchema,
    values: &[Value],
    opts: &JsonOptions,
    skip_unavailable: bool,
) -> String {
    let mut out = Vec::with_capacity(32 * values.len() + 2);
    writer::write_row_sorted(&mut out, table, values, opts, skip_unavailable);
    String::from_utf8(out).expect("JSON text of UTF-8 strings")
}

/// One value's JSON text appended to `out`: the bytes serde_json writes for
/// [`value`]'s tree, without building it.
pub fn write_value(out: &mut Vec<u8>, v: &Value, opts: &JsonOptions) {
    writer::write_value(out, v, opts)
}

/// An `interval` as Debezium's MicroDuration: months of 30.4375 days, and
/// computed as Debezium 3.6 does, in doubles from the parts its JDBC
/// driver's `PGInterval` splits the interval into (days, then hours,
/// minutes and fractional seconds, each carrying the time's sign), the
/// microseconds truncated at the end: a large interval's last digit comes
/// out as Debezium's, which an exact sum would not.
pub fn interval_micros(months: i32, days: i32, micros: i64) -> i64 {
    let hours = micros / 3_600_000_000;
    let minutes = micros % 3_600_000_000 / 60_000_000;
    let seconds = (micros % 60_000_000) as f64 / 1e6;
    let days = f64::from(months) * 30.4375 + f64::from(days);
    let seconds = ((days * 24.0 + hours as f64) * 60.0 + minutes as f64) * 60.0 + seconds;
    (seconds * 1e6) as i64
}

/// A `real` as a JSON number: the double nearest to the real's shortest
/// decimal form (`0.1`, not `0.10000000149011612`, the real widened), as
/// Debezium's JsonConverter writes a Java `float` and as a reader expects
/// of a `real`. NaN and infinities go through unchanged.
pub fn float32_as_double(f: f32) -> f64 {
    if !f.is_finite() {
        return f64::from(f);
    }
    // The fewest significant digits that read back as the same real, each
    // count correctly rounded (ties to even, as Postgres's float4out and
    // Python's repr choose: -463813.625 is -463813.62, where Rust's
    // Display writes -463813.63).
    let wide = f64::from(f);
    for digits in 1..=9 {
        let mut buf = [0u8; 32];
        let mut w = std::io::Cursor::new(&mut buf[..]);
        let _ = std::io::Write::write_fmt(&mut w, format_args!("{:.*e}", digits - 1, wide));
        let n = w.position() as usize;
        if let Some(v) = std::str::from_utf8(&buf[..n])
            .ok()
            .and_then(|t| t.parse::<f64>().ok())
        {
            if v as f32 == f {
                return v;
            }
        }
    }
    wide
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

/// The canonical 8-4-4-4-12 form.
pub fn uuid_string(u: &[u8; 16]) -> String {
    let mut out = Vec::with_capacity(36);
    writer::push_uuid(&mut out, u);
    String::from_utf8(out).expect("hex digits and dashes")
}

/// A `timetz` as Debezium's `ZonedTime` (Java's `ISO_OFFSET_TIME` in UTC):
/// `HH:MM:SS`, the fraction without trailing zeros if there is one, `Z`.
pub fn zoned_time(micros: i64, offset_seconds: i32) -> String {
    let mut out = Vec::with_capacity(16);
    writer::push_zoned_time(&mut out, micros, offset_seconds);
    String::from_utf8(out).expect("digits, colons, a point and Z")
}

/// Days since 1970-01-01 as a proleptic Gregorian (year, month, day);
/// Howard Hinnant's `civil_from_days`.
pub fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// A UTC timestamp in ISO-8601 with microseconds, or `infinity`/`-infinity`.
/// The year is `{:04}`: `-043` for 44 BC, `200000` past 9999.
pub fn timestamp_utc(micros: i64) -> String {
    let mut out = Vec::with_capacity(27);
    writer::push_timestamp_utc(&mut out, micros);
    String::from_utf8(out).expect("digits, signs and ASCII letters")
}

/// A year as ISO 8601 writes it: four digits within 0000-9999, else
/// signed (`+10000`, `-0043`), as Java's formatters (and so Debezium) do.
pub fn iso_year(y: i64) -> String {
    let mut out = Vec::with_capacity(8);
    writer::push_iso_year(&mut out, y);
    String::from_utf8(out).expect("digits and signs")
}

/// A date as `YYYY-MM-DD`, or `infinity`/`-infinity`.
pub fn date_string(days: i32) -> String {
    match days {
        DATE_INFINITY => "infinity".into(),
        DATE_NEG_INFINITY => "-infinity".into(),
        _ => {
            let (y, m, d) = civil_from_days(i64::from(days));
            format!("{y:04}-{m:02}-{d:02}")
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn reals_are_written_in_their_shortest_form() {
        assert_eq!(float32_as_double(0.1), 0.1);
        assert_eq!(float32_as_double(-f32::MAX), -3.4028235e38);
        // f32::MIN_POSITIVE: Rust's shortest form (Java 17 prints 1.17549435E-38).
        assert_eq!(float32_as_double(f32::MIN_POSITIVE), 1.175_494_4e-38);
        assert_eq!(float32_as_double(f32::from_bits(1)), 1e-45);
        // A tie between two shortest forms goes to the even digit.
        assert_eq!(float32_as_double(-463_813.625), -463_813.62);
        assert!(float32_as_double(-0.0).is_sign_negative());
        assert!(float32_as_double(f32::NAN).is_nan());
        assert_eq!(
            value(&Value::Float32(0.1), &JsonOptions::default()).to_string(),
            "0.1"
        );
    }

    #[test]
    fn intervals_are_debeziums_microdurations() {
        let day = 86_400_000_000i64;
        assert_eq!(interval_micros(0, 1, 0), day);
        assert_eq!(interval_micros(1, 0, 0), 2_629_800_000_000);
        // -1 mons +3 days -00:00:01
        assert_eq!(interval_micros(-1, 3, -1_000_000), -2_370_601_000_000);
        // A value Debezium 3.6.1 wrote one microsecond under the exact sum.
        let (m, d, us) = (102, -47, 61 * 3_600_000_000 + 2 * 60_000_000 + 3_456_789);
        let exact = (f64::from(m) * 30.4375 * 86_400_000_000.0) as i64 + i64::from(d) * day + us;
        assert!((interval_micros(m, d, us) - exact).abs() <= 1);
    }

    #[test]
    fn years_outside_four_digits_are_signed_as_java_writes_them() {
        let day = 86_400_000_000i64;
        // 200000-12-31 and 44 BC (-0043), as Debezium 3.6.1 wrote them.
        let far = (days_from_civil_for_test(200_000, 12, 31)) * day;
        assert_eq!(timestamp_utc(far), "+200000-12-31T00:00:00.000000Z");
        let bc = days_from_civil_for_test(-43, 3, 15) * day + 12 * 3_600_000_000;
        assert_eq!(timestamp_utc(bc), "-0043-03-15T12:00:00.000000Z");
        assert_eq!(iso_year(9999), "9999");
        assert_eq!(iso_year(0), "0000");
    }

    fn days_from_civil_for_test(y: i64, m: u32, d: u32) -> i64 {
        crate::pgtext::days_from_civil(y, m, d)
    }

    use super::*;
    use crate::value::TIMESTAMP_INFINITY;

    #[test]
    fn special_numerics_render_as_postgres_or_as_debezium() {
        let v = |n: Numeric, mode| {
            value(
                &Value::Numeric(n),
                &JsonOptions {
                    special_numeric: mode,
                    ..JsonOptions::default()
                },
            )
        };
        assert_eq!(v(Numeric::NaN, SpecialNumeric::Postgres), json!("NaN"));
        assert_eq!(
            v(Numeric::PositiveInfinity, SpecialNumeric::Postgres),
            json!("Infinity")
        );
        assert_eq!(v(Numeric::NaN, SpecialNumeric::Debezium), json!("NAN"));
        assert_eq!(
            v(Numeric::PositiveInfinity, SpecialNumeric::Debezium),
            json!("POSITIVE_INFINITY")
        );
        assert_eq!(
            v(Numeric::NegativeInfinity, SpecialNumeric::Debezium),
            json!("NEGATIVE_INFINITY")
        );
        assert_eq!(
            v(Numeric::Finite("1.50".into()), SpecialNumeric::Debezium),
            json!("1.50")
        );
    }

    #[test]
    fn renders_times_like_debezium() {
        assert_eq!(timestamp_utc(0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(
            timestamp_utc(1_700_000_000_123_456),
            "2023-11-14T22:13:20.123456Z"
        );
        assert_eq!(timestamp_utc(-1), "1969-12-31T23:59:59.999999Z");
        assert_eq!(timestamp_utc(TIMESTAMP_INFINITY), "infinity");
        assert_eq!(date_string(19_000), "2022-01-08");
        assert_eq!(date_string(-719_162), "0001-01-01");
        let opts = JsonOptions::default();
        assert_eq!(
            value(
                &Value::TimeTz {
                    micros: 3_600_000_000,
                    offset_seconds: 7200
                },
                &opts
            ),
            json!("23:00:00Z")
        );
        assert_eq!(value(&Value::Float64(f64::NAN), &opts), json!("NaN"));
        assert_eq!(
            value(&Value::Unavailable, &opts),
            json!(DEFAULT_UNAVAILABLE_PLACEHOLDER)
        );
        assert_eq!(
            value(&Value::Uuid([0xab; 16]), &opts),
            json!("abababab-abab-abab-abab-abababababab")
        );
        assert_eq!(
            value(
                &Value::Interval {
                    months: 0,
                    days: 1,
                    micros: 5
                },
                &opts
            ),
            json!(86_400_000_005i64)
        );
    }

    #[test]
    fn bytes_equal_the_tree_for_every_value_kind() {
        use crate::event::{Op, SnapshotMarker, SourceInfo, TransactionInfo};
        use crate::table::{Column, PgType, ReplicaIdentity};
        use crate::Lsn;
        let values = vec![
            Value::Int64(7),
            Value::Null,
            Value::Unavailable,
            Value::Bool(true),
            Value::Int16(-3),
            Value::Int32(i32::MAX),
            Value::Float32(0.1),
            Value::Float64(f64::NEG_INFINITY),
            Value::Float64(f64::NAN),
            Value::Float64(-2.25e-300),
            Value::Numeric(Numeric::Finite("12.50".into())),
            Value::Numeric(Numeric::NaN),
            Value::Text("tëxt \"quoted\"\n".into()),
            Value::Json(r#"{"a": 1}"#.into()),
            Value::Bytes(vec![0, 255]),
            Value::Uuid([0xab; 16]),
            Value::Date(DATE_NEG_INFINITY),
            Value::Time(86_399_999_999),
            Value::TimeTz {
                micros: 3_600_000_000,
                offset_seconds: 7200,
            },
            Value::Timestamp(TIMESTAMP_INFINITY),
            Value::TimestampTz(1_700_000_000_123_456),
            Value::Interval {
                months: 14,
                days: -3,
                micros: 5,
            },
            Value::Array(vec![Value::Int32(1), Value::Null, Value::Text("x".into())]),
        ];
        let columns = (0..values.len())
            .map(|i| Column {
                key_position: None,
                default: None,
                name: format!("c{i}"),
                pg_type: PgType::Text,
                type_oid: 25,
                type_modifier: -1,
                nullable: i != 0,
                key: i == 0,
            })
            .collect();
        let table = std::sync::Arc::new(TableSchema {
            relation_id: 1,
            schema: "public".into(),
            name: "every".into(),
            columns,
            replica_identity: ReplicaIdentity::Default,
            version: 1,
        });
        let opts = JsonOptions::default();
        for (before, transaction) in [
            (None, None),
            (
                Some(values.clone()),
                Some(TransactionInfo {
                    id: "9:42".into(),
                    total_order: 3,
                    data_collection_order: 2,
                }),
            ),
        ] {
            let event = ChangeEvent {
                op: if before.is_some() {
                    Op::Update
                } else {
                    Op::Create
                },
                table: table.clone(),
                before,
                after: Some(values.clone()),
                source: SourceInfo {
                    name: "shop".into(),
                    db: "db".into(),
                    lsn: Lsn(0x42),
                    commit_lsn: Lsn(0x43),
                    tx_id: Some(9),
                    ts_ms: 1,
                    ts_us: 1_000,
                    snapshot: SnapshotMarker::False,
                },
                transaction,
                ts_ms: 2,
            };
            let bytes = envelope_bytes(&event, &opts);
            assert_eq!(
                String::from_utf8(bytes.clone()).unwrap(),
                String::from_utf8(reference::envelope_bytes(&event, &opts)).unwrap()
            );
            let streamed: Json = serde_json::from_slice(&bytes).unwrap();
            assert_eq!(streamed, envelope(&event, &opts));
            let key: Json = serde_json::from_slice(&key_bytes(&event, &opts).unwrap()).unwrap();
            assert_eq!(Some(key), super::key(&event, &opts));
        }
    }
}
