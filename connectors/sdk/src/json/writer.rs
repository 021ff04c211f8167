//! JSON written straight into a byte buffer: the hot path of the Kafka
//! sink's JSON encoder (`envelope_bytes`, `key_bytes`, [`TableCache`]).
//!
//! Why not serde: profiling the serde-based writer (criterion, 8-column
//! row) showed the time going to the generic serializer's per-field calls,
//! to strings built with `format!` and then copied (two `timestamptz`s a
//! row, uuids, `timetz`), to escaping strings one byte at a time, and to
//! the output `Vec` growing by doubling. Here strings are scanned sixteen
//! bytes at a time and copied whole when nothing needs escaping (the
//! common case), times are built from a digit-pair table in a fixed array
//! and copied once, column names are escaped once per table shape, and the
//! output is allocated at the size of the largest of the table's envelopes
//! so far (up to 16 KiB). Shapes stay cached for the encoder's life, as the
//! Avro encoder's schemas do: one entry per table and schema change.
//!
//! The bytes must equal what serde_json wrote before, for every value:
//! escaping follows serde_json's table (`\"`, `\\`, `\b \f \n \r \t`,
//! other control bytes as `\u00xx`, nothing else), and numbers go through
//! serde_json's own formatter, so floats are printed by the same algorithm
//! serde_json uses, whichever that is in the locked version (1.0.154 prints
//! them with `zmij`, no longer `ryu`: copying ryu here would have drifted). The tests
//! compare against the serde-based writer byte for byte, including a
//! property test over random values of every kind.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use base64::Engine;
use serde_json::ser::{CompactFormatter, Formatter};

use super::{JsonOptions, SpecialNumeric};
use crate::event::{ChangeEvent, Op};
use crate::table::{PgType, TableSchema};
use crate::value::{Numeric, Value, TIMESTAMP_INFINITY, TIMESTAMP_NEG_INFINITY};

/// Bytes serde_json escapes, and as what (`u` = `\u00xx`); 0 = copied.
static ESCAPE: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut i = 0;
    while i < 0x20 {
        t[i] = b'u';
        i += 1;
    }
    t[0x08] = b'b';
    t[0x09] = b't';
    t[0x0a] = b'n';
    t[0x0c] = b'f';
    t[0x0d] = b'r';
    t[b'"' as usize] = b'"';
    t[b'\\' as usize] = b'\\';
    t
};

#[inline(always)]
fn is_special(b: u8) -> bool {
    (b < 0x20) | (b == b'"') | (b == b'\\')
}

/// Whether any byte needs escaping. Sixteen bytes per step without early
/// exits inside a step, which the compiler turns into vector compares.
#[inline]
fn needs_escape(bytes: &[u8]) -> bool {
    let mut chunks = bytes.chunks_exact(16);
    for chunk in &mut chunks {
        let mut hit = false;
        for &b in chunk {
            hit |= is_special(b);
        }
        if hit {
            return true;
        }
    }
    chunks.remainder().iter().any(|&b| is_special(b))
}

/// `s` as a JSON string, quotes included.
#[inline]
pub(crate) fn write_str(out: &mut Vec<u8>, s: &str) {
    let bytes = s.as_bytes();
    out.reserve(bytes.len() + 2);
    out.push(b'"');
    if needs_escape(bytes) {
        escape_into(out, bytes);
    } else {
        out.extend_from_slice(bytes);
    }
    out.push(b'"');
}

#[cold]
fn escape_into(out: &mut Vec<u8>, bytes: &[u8]) {
    static HEX: [u8; 16] = *b"0123456789abcdef";
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let e = ESCAPE[b as usize];
        if e == 0 {
            continue;
        }
        out.extend_from_slice(&bytes[start..i]);
        if e == b'u' {
            out.extend_from_slice(&[
                b'\\',
                b'u',
                b'0',
                b'0',
                HEX[(b >> 4) as usize],
                HEX[(b & 0xf) as usize],
            ]);
        } else {
            out.extend_from_slice(&[b'\\', e]);
        }
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
}

// Writing into a Vec cannot fail; serde_json's formatter still returns a
// Result because it writes to any `io::Write`.
const VEC_WRITE: &str = "writing into a Vec cannot fail";

#[inline]
pub(crate) fn write_i64(out: &mut Vec<u8>, i: i64) {
    CompactFormatter.write_i64(out, i).expect(VEC_WRITE);
}

#[inline]
pub(crate) fn write_u64(out: &mut Vec<u8>, i: u64) {
    CompactFormatter.write_u64(out, i).expect(VEC_WRITE);
}

/// A double as serde_json writes a finite `f64` (its own formatter), and
/// NaN/±Infinity as the strings [`super::value`] gives them.
fn write_float(out: &mut Vec<u8>, f: f64) {
    if f.is_finite() {
        CompactFormatter.write_f64(out, f).expect(VEC_WRITE);
    } else if f.is_nan() {
        out.extend_from_slice(b"\"NaN\"");
    } else if f > 0.0 {
        out.extend_from_slice(b"\"Infinity\"");
    } else {
        out.extend_from_slice(b"\"-Infinity\"");
    }
}

/// "00" to "99".
static PAIRS: [[u8; 2]; 100] = {
    let mut t = [[0u8; 2]; 100];
    let mut i = 0;
    while i < 100 {
        t[i] = [b'0' + (i / 10) as u8, b'0' + (i % 10) as u8];
        i += 1;
    }
    t
};

/// Writes `n` (0 ≤ n < 100) as two digits at `at`.
#[inline(always)]
fn put2(buf: &mut [u8], at: usize, n: i64) {
    buf[at..at + 2].copy_from_slice(&PAIRS[n as usize]);
}

/// `HH:MM:SS` of a second within a day, at `at`.
#[inline(always)]
fn put_hms(buf: &mut [u8], at: usize, secs: i64) {
    put2(buf, at, secs / 3600);
    put2(buf, at + 3, secs / 60 % 60);
    put2(buf, at + 6, secs % 60);
}

/// Six digits of microseconds (0 ≤ `frac` < 1 s) at `at`.
#[inline(always)]
fn put_micros(buf: &mut [u8], at: usize, frac: i64) {
    put2(buf, at, frac / 10_000);
    put2(buf, at + 2, frac / 100 % 100);
    put2(buf, at + 4, frac % 100);
}

/// [`super::timestamp_utc`]'s text, appended without quotes. Built in a
/// fixed-size array and copied once.
pub(crate) fn push_timestamp_utc(out: &mut Vec<u8>, micros: i64) {
    match micros {
        TIMESTAMP_INFINITY => out.extend_from_slice(b"infinity"),
        TIMESTAMP_NEG_INFINITY => out.extend_from_slice(b"-infinity"),
        _ => {
            let days = micros.div_euclid(86_400_000_000);
            let rest = micros.rem_euclid(86_400_000_000);
            let (y, m, d) = super::civil_from_days(days);
            let mut b = *b"0000-00-00T00:00:00.000000Z";
            put2(&mut b, 5, i64::from(m));
            put2(&mut b, 8, i64::from(d));
            put_hms(&mut b, 11, rest / 1_000_000);
            put_micros(&mut b, 20, rest % 1_000_000);
            if (0..=9999).contains(&y) {
                put2(&mut b, 0, y / 100);
                put2(&mut b, 2, y % 100);
                out.extend_from_slice(&b);
            } else {
                push_iso_year(out, y);
                out.extend_from_slice(&b[4..]);
            }
        }
    }
}

/// A year outside 0000-9999 as ISO 8601's expanded form, as Java's
/// `DateTimeFormatter.ISO_*` (and so Debezium) writes it: `+10000`,
/// `-0043` (astronomical: 44 BC).
pub(crate) fn push_iso_year(out: &mut Vec<u8>, y: i64) {
    use std::io::Write;
    if y > 9999 {
        write!(out, "+{y}").expect(VEC_WRITE);
    } else if y < 0 {
        write!(out, "-{:04}", -y).expect(VEC_WRITE);
    } else {
        write!(out, "{y:04}").expect(VEC_WRITE);
    }
}

/// [`super::zoned_time`]'s text, appended without quotes.
pub(crate) fn push_zoned_time(out: &mut Vec<u8>, micros: i64, offset_seconds: i32) {
    let utc = (micros - i64::from(offset_seconds) * 1_000_000).rem_euclid(86_400_000_000);
    let mut b = *b"00:00:00.000000Z";
    put_hms(&mut b, 0, utc / 1_000_000);
    let frac = utc % 1_000_000;
    if frac == 0 {
        out.extend_from_slice(&b[..8]);
    } else {
        put_micros(&mut b, 9, frac);
        // The fraction without its trailing zeros.
        let zeros = b[9..15].iter().rev().take_while(|&&d| d == b'0').count();
        out.extend_from_slice(&b[..15 - zeros]);
    }
    out.push(b'Z');
}

/// [`super::uuid_string`]'s text, appended without quotes.
pub(crate) fn push_uuid(out: &mut Vec<u8>, u: &[u8; 16]) {
    static HEX: [u8; 16] = *b"0123456789abcdef";
    for (i, b) in u.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            out.push(b'-');
        }
        out.extend_from_slice(&[HEX[(b >> 4) as usize], HEX[(b & 0xf) as usize]]);
    }
}

fn write_base64(out: &mut Vec<u8>, bytes: &[u8]) {
    let engine = &base64::engine::general_purpose::STANDARD;
    let len = base64::encoded_len(bytes.len(), true).expect("a byte string that fits in memory");
    let start = out.len();
    out.resize(start + len, 0);
    let written = engine
        .encode_slice(bytes, &mut out[start..])
        .expect("the slice has the encoded length");
    debug_assert_eq!(written, len);
}

/// One column's value, the bytes serde_json writes for
/// [`super::column_value`]'s tree.
pub(crate) fn write_column_value(out: &mut Vec<u8>, pg: &PgType, v: &Value, opts: &JsonOptions) {
    match (v, pg) {
        (Value::Unavailable, PgType::Bytea) => {
            out.push(b'"');
            write_base64(out, opts.unavailable_placeholder.as_bytes());
            out.push(b'"');
        }
        (Value::Unavailable, PgType::Array { .. }) => {
            out.push(b'[');
            write_str(out, &opts.unavailable_placeholder);
            out.push(b']');
        }
        _ => write_value(out, v, opts),
    }
}

/// One value, the bytes serde_json writes for [`super::value`]'s tree.
pub(crate) fn write_value(out: &mut Vec<u8>, v: &Value, opts: &JsonOptions) {
    match v {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Unavailable => write_str(out, &opts.unavailable_placeholder),
        Value::Bool(true) => out.extend_from_slice(b"true"),
        Value::Bool(false) => out.extend_from_slice(b"false"),
        Value::Int16(i) => write_i64(out, i64::from(*i)),
        Value::Int32(i) | Value::Date(i) => write_i64(out, i64::from(*i)),
        Value::Int64(i) | Value::Time(i) | Value::Timestamp(i) => write_i64(out, *i),
        Value::Float32(f) => write_float(out, crate::json::float32_as_double(*f)),
        Value::Float64(f) => write_float(out, *f),
        Value::Numeric(n) => match (opts.special_numeric, n) {
            (_, Numeric::Finite(s)) => write_str(out, s),
            (SpecialNumeric::Postgres, Numeric::NaN) => out.extend_from_slice(b"\"NaN\""),
            (SpecialNumeric::Postgres, Numeric::PositiveInfinity) => {
                out.extend_from_slice(b"\"Infinity\"")
            }
            (SpecialNumeric::Postgres, Numeric::NegativeInfinity) => {
                out.extend_from_slice(b"\"-Infinity\"")
            }
            (SpecialNumeric::Debezium, Numeric::NaN) => out.extend_from_slice(b"\"NAN\""),
            (SpecialNumeric::Debezium, Numeric::PositiveInfinity) => {
                out.extend_from_slice(b"\"POSITIVE_INFINITY\"")
            }
            (SpecialNumeric::Debezium, Numeric::NegativeInfinity) => {
                out.extend_from_slice(b"\"NEGATIVE_INFINITY\"")
            }
        },
        Value::Text(s) | Value::Json(s) | Value::Network(s) | Value::Enum(s) => write_str(out, s),
        Value::Bytes(b) => {
            out.push(b'"');
            write_base64(out, b);
            out.push(b'"');
        }
        Value::Uuid(u) => {
            out.push(b'"');
            push_uuid(out, u);
            out.push(b'"');
        }
        Value::TimeTz {
            micros,
            offset_seconds,
        } => {
            out.push(b'"');
            push_zoned_time(out, *micros, *offset_seconds);
            out.push(b'"');
        }
        Value::TimestampTz(t) => {
            out.push(b'"');
            push_timestamp_utc(out, *t);
            out.push(b'"');
        }
        Value::Interval {
            months,
            days,
            micros,
        } => write_i64(out, super::interval_micros(*months, *days, *micros)),
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_value(out, item, opts);
            }
            out.push(b']');
        }
    }
}

/// A table shape's JSON pieces, escaped once: each column's `"name":`, the
/// key columns, the source block's `"schema":…,"table":…,`; and the size
/// the shape's envelopes have needed, so that the next one is allocated
/// once at the right size.
#[derive(Debug)]
pub(crate) struct Prepared {
    table: Arc<TableSchema>,
    names: Vec<Box<[u8]>>,
    key: Vec<usize>,
    schema_table: Box<[u8]>,
    value_size: AtomicUsize,
}

/// Above this an envelope's buffer grows as it is written rather than being
/// allocated up front: one 300 kB TOASTed row must not make every later
/// event of its table allocate 300 kB.
const MAX_SIZE_HINT: usize = 16 * 1024;

impl Prepared {
    pub(crate) fn new(table: &Arc<TableSchema>) -> Self {
        let names = table
            .columns
            .iter()
            .map(|c| {
                let mut n = Vec::with_capacity(c.name.len() + 3);
                write_str(&mut n, &c.name);
                n.push(b':');
                n.into_boxed_slice()
            })
            .collect();
        let key = (table.columns.iter().enumerate())
            .filter(|(_, c)| c.key)
            .map(|(i, _)| i)
            .collect();
        let mut schema_table = Vec::new();
        schema_table.extend_from_slice(b"\"schema\":");
        write_str(&mut schema_table, &table.schema);
        schema_table.extend_from_slice(b",\"table\":");
        write_str(&mut schema_table, &table.name);
        schema_table.push(b',');
        Prepared {
            table: Arc::clone(table),
            names,
            key,
            schema_table: schema_table.into_boxed_slice(),
            value_size: AtomicUsize::new(512),
        }
    }

    /// Whether this was prepared for `table`'s shape.
    fn fits(&self, table: &Arc<TableSchema>) -> bool {
        Arc::ptr_eq(&self.table, table) || *self.table == **table
    }
}

/// Prepared shapes by relation id and shape version, as the Avro encoder
/// keeps its schemas. A hit is checked against the table description (a
/// pointer comparison when the events share the capture's `Arc`, as they
/// do), so a stale or colliding entry is rebuilt, never used.
#[derive(Debug, Default)]
pub(crate) struct TableCache {
    tables: RwLock<HashMap<(u32, u32), Arc<Prepared>, BuildHasherDefault<ShapeHasher>>>,
}

/// A multiply-rotate hash for the two integers of a shape's id: SipHash
/// (the default, built against hash flooding, which relation ids from
/// Postgres cannot mount) cost as much as the rest of the lookup.
#[derive(Default)]
pub(crate) struct ShapeHasher(u64);

impl Hasher for ShapeHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }
    fn write_u32(&mut self, i: u32) {
        self.write_u64(u64::from(i));
    }
    fn write_u64(&mut self, i: u64) {
        self.0 = (self.0.rotate_left(5) ^ i).wrapping_mul(0x517c_c1b7_2722_0a95);
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

impl TableCache {
    pub(crate) fn get(&self, table: &Arc<TableSchema>) -> Arc<Prepared> {
        let id = (table.relation_id, table.version);
        if let Some(p) = self.tables.read().expect("json table cache").get(&id) {
            if p.fits(table) {
                return Arc::clone(p);
            }
        }
        let p = Arc::new(Prepared::new(table));
        self.tables
            .write()
            .expect("json table cache")
            .insert(id, Arc::clone(&p));
        p
    }
}

/// The column names of a row: escaped once per shape, or on the spot.
#[derive(Clone, Copy)]
pub(crate) enum Names<'a> {
    Prepared(&'a Prepared),
    Plain(&'a TableSchema),
}

impl<'a> Names<'a> {
    #[inline]
    fn write(self, out: &mut Vec<u8>, column: usize) {
        match self {
            Names::Prepared(p) => out.extend_from_slice(&p.names[column]),
            Names::Plain(t) => {
                write_str(out, &t.columns[column].name);
                out.push(b':');
            }
        }
    }

    fn table(self) -> &'a TableSchema {
        match self {
            Names::Prepared(p) => &p.table,
            Names::Plain(t) => t,
        }
    }
}

fn write_row(out: &mut Vec<u8>, names: Names<'_>, values: &[Value], opts: &JsonOptions) {
    out.push(b'{');
    let columns = names.table().columns.len();
    for (i, v) in values.iter().enumerate().take(columns) {
        if i > 0 {
            out.push(b',');
        }
        names.write(out, i);
        write_column_value(out, &names.table().columns[i].pg_type, v, opts);
    }
    out.push(b'}');
}

fn write_image(out: &mut Vec<u8>, names: Names<'_>, image: Option<&[Value]>, opts: &JsonOptions) {
    match image {
        Some(values) => write_row(out, names, values, opts),
        None => out.extend_from_slice(b"null"),
    }
}

/// The envelope in Debezium's field order (see [`super::envelope`]).
pub(crate) fn write_envelope(
    out: &mut Vec<u8>,
    event: &ChangeEvent,
    names: Names<'_>,
    opts: &JsonOptions,
) {
    let s = &event.source;
    out.extend_from_slice(b"{\"before\":");
    write_image(out, names, event.before.as_deref(), opts);
    out.extend_from_slice(b",\"after\":");
    write_image(out, names, event.after.as_deref(), opts);
    out.extend_from_slice(
        concat!(
            ",\"source\":{\"version\":\"",
            env!("CARGO_PKG_VERSION"),
            "\",\"connector\":\"postgresql\",\"name\":"
        )
        .as_bytes(),
    );
    write_str(out, &s.name);
    out.extend_from_slice(b",\"ts_ms\":");
    write_i64(out, s.ts_ms);
    out.extend_from_slice(b",\"ts_us\":");
    write_i64(out, s.ts_us);
    out.extend_from_slice(b",\"ts_ns\":");
    write_i64(out, s.ts_us.saturating_mul(1000));
    out.extend_from_slice(b",\"snapshot\":");
    write_str(out, s.snapshot.as_str());
    out.extend_from_slice(b",\"db\":");
    write_str(out, &s.db);
    out.push(b',');
    match names {
        Names::Prepared(p) => out.extend_from_slice(&p.schema_table),
        Names::Plain(t) => {
            out.extend_from_slice(b"\"schema\":");
            write_str(out, &t.schema);
            out.extend_from_slice(b",\"table\":");
            write_str(out, &t.name);
            out.push(b',');
        }
    }
    out.extend_from_slice(b"\"txId\":");
    match s.tx_id {
        Some(x) => write_u64(out, u64::from(x)),
        None => out.extend_from_slice(b"null"),
    }
    out.extend_from_slice(b",\"lsn\":");
    write_u64(out, s.lsn.0);
    out.extend_from_slice(b",\"xmin\":null,\"commit_lsn\":");
    write_u64(out, s.commit_lsn.0);
    out.extend_from_slice(b"},\"op\":");
    write_str(out, event.op.code());
    out.extend_from_slice(b",\"ts_ms\":");
    write_i64(out, event.ts_ms);
    out.extend_from_slice(b",\"ts_us\":");
    write_i64(out, event.ts_ms.saturating_mul(1000));
    out.extend_from_slice(b",\"ts_ns\":");
    write_i64(out, event.ts_ms.saturating_mul(1_000_000));
    out.extend_from_slice(b",\"transaction\":");
    match &event.transaction {
        Some(t) => {
            out.extend_from_slice(b"{\"id\":");
            write_str(out, &t.id);
            out.extend_from_slice(b",\"total_order\":");
            write_u64(out, t.total_order);
            out.extend_from_slice(b",\"data_collection_order\":");
            write_u64(out, t.data_collection_order);
            out.push(b'}');
        }
        None => out.extend_from_slice(b"null"),
    }
    out.push(b'}');
}

/// The identity row (see [`ChangeEvent::identity_row`]).
fn identity_row(event: &ChangeEvent) -> Option<&[Value]> {
    match event.op {
        Op::Delete => event.before.as_deref(),
        Op::Truncate => None,
        _ => event.after.as_deref().or(event.before.as_deref()),
    }
}

/// The key object of a prepared shape; `None` when it has no key columns
/// or the event no identity row (as [`ChangeEvent::key_values`]).
pub(crate) fn prepared_key(
    p: &Prepared,
    event: &ChangeEvent,
    opts: &JsonOptions,
) -> Option<Vec<u8>> {
    let row = identity_row(event)?;
    // key_values zips columns with the row: a key column past the row's end
    // is not part of the key.
    let mut cols = p.key.iter().copied().filter(|&i| i < row.len()).peekable();
    cols.peek()?;
    let mut out = Vec::with_capacity(64);
    out.push(b'{');
    for (n, i) in cols.enumerate() {
        if n > 0 {
            out.push(b',');
        }
        out.extend_from_slice(&p.names[i]);
        write_value(&mut out, &row[i], opts);
    }
    out.push(b'}');
    Some(out)
}

/// The envelope of an event of a prepared shape, allocated at the size the
/// shape's envelopes have needed so far.
pub(crate) fn prepared_envelope(p: &Prepared, event: &ChangeEvent, opts: &JsonOptions) -> Vec<u8> {
    let hint = p.value_size.load(Ordering::Relaxed);
    let mut out = Vec::with_capacity(hint);
    write_envelope(&mut out, event, Names::Prepared(p), opts);
    if out.len() > hint && hint < MAX_SIZE_HINT {
        p.value_size
            .fetch_max(out.len().min(MAX_SIZE_HINT), Ordering::Relaxed);
    }
    out
}

/// [`prepared_envelope`] appended to a buffer of the caller's.
pub(crate) fn write_prepared_envelope(
    out: &mut Vec<u8>,
    p: &Prepared,
    event: &ChangeEvent,
    opts: &JsonOptions,
) {
    write_envelope(out, event, Names::Prepared(p), opts);
}

/// A row as [`super::row`]'s tree serialises: keys in byte order (the
/// tree's map is sorted), optionally without the unavailable columns.
/// Column names within a table are unique, as Postgres makes them.
pub(crate) fn write_row_sorted(
    out: &mut Vec<u8>,
    table: &TableSchema,
    values: &[Value],
    opts: &JsonOptions,
    skip_unavailable: bool,
) {
    let mut order: Vec<usize> = (0..table.columns.len().min(values.len()))
        .filter(|&i| !(skip_unavailable && matches!(values[i], Value::Unavailable)))
        .collect();
    order.sort_unstable_by(|&a, &b| table.columns[a].name.cmp(&table.columns[b].name));
    out.push(b'{');
    for (n, &i) in order.iter().enumerate() {
        if n > 0 {
            out.push(b',');
        }
        write_str(out, &table.columns[i].name);
        out.push(b':');
        write_column_value(out, &table.columns[i].pg_type, &values[i], opts);
    }
    out.push(b'}');
}
