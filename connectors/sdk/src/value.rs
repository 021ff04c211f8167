//! Typed column values.
//!
//! Postgres sends row values as text; the capture converts them once into
//! these variants so that every sink and encoder works from the same typed
//! value. Two states are kept apart that a naive decoder merges: SQL `NULL`
//! and [`Value::Unavailable`], an unchanged TOASTed column that Postgres did
//! not resend. Writing `NULL` for the latter would erase data downstream.

use serde::Serialize;

/// Microseconds since 1970-01-01 that stand for `infinity` / `-infinity` in
/// timestamps, as Postgres itself stores them (`DT_NOEND` / `DT_NOBEGIN`
/// shifted to the Unix epoch would overflow, so the extremes are used).
pub const TIMESTAMP_INFINITY: i64 = i64::MAX;
pub const TIMESTAMP_NEG_INFINITY: i64 = i64::MIN;
/// Days since 1970-01-01 that stand for `infinity` / `-infinity` in dates.
pub const DATE_INFINITY: i32 = i32::MAX;
pub const DATE_NEG_INFINITY: i32 = i32::MIN;

/// An arbitrary-precision decimal. Finite values keep Postgres's exact text
/// (`-12.50`), which is lossless and converts to Avro's scaled bytes without
/// going through floating point.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum Numeric {
    Finite(String),
    NaN,
    PositiveInfinity,
    NegativeInfinity,
}

impl Numeric {
    /// The unscaled integer digits and the scale: `-12.50` is (`-1250`, 2).
    /// `None` for NaN and the infinities, which have no decimal form.
    pub fn unscaled(&self) -> Option<(String, u32)> {
        let Numeric::Finite(text) = self else {
            return None;
        };
        let (neg, digits) = match text.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, text.as_str()),
        };
        let (int_part, frac_part) = digits.split_once('.').unwrap_or((digits, ""));
        let mut unscaled = String::with_capacity(text.len());
        if neg {
            unscaled.push('-');
        }
        unscaled.push_str(int_part);
        unscaled.push_str(frac_part);
        Some((unscaled, frac_part.len() as u32))
    }

    /// Rescales a finite value to `scale` digits after the point, padding
    /// with zeros. Fails (returns `None`) when digits would be lost.
    pub fn with_scale(&self, scale: u32) -> Option<String> {
        let (unscaled, current) = self.unscaled()?;
        if current == scale {
            return Some(unscaled);
        }
        if current < scale {
            let mut s = unscaled;
            s.extend(std::iter::repeat_n('0', (scale - current) as usize));
            return Some(s);
        }
        let cut = (current - scale) as usize;
        let (keep, dropped) = unscaled.split_at(unscaled.len() - cut);
        if dropped.bytes().all(|b| b == b'0') {
            Some(keep.to_string())
        } else {
            None
        }
    }
}

impl std::fmt::Display for Numeric {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Numeric::Finite(s) => f.write_str(s),
            Numeric::NaN => f.write_str("NaN"),
            Numeric::PositiveInfinity => f.write_str("Infinity"),
            Numeric::NegativeInfinity => f.write_str("-Infinity"),
        }
    }
}

/// One column value of a row.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", content = "value", rename_all = "snake_case")]
pub enum Value {
    Null,
    /// An unchanged TOASTed column that the WAL does not carry: the value
    /// exists in Postgres but this event does not know it.
    Unavailable,
    Bool(bool),
    Int16(i16),
    Int32(i32),
    Int64(i64),
    Float32(f32),
    Float64(f64),
    Numeric(Numeric),
    /// text, varchar, char, name, and the text form of unknown types.
    Text(String),
    Bytes(Vec<u8>),
    Uuid([u8; 16]),
    /// json and jsonb, as the JSON text Postgres printed.
    Json(String),
    /// Days since 1970-01-01; see [`DATE_INFINITY`].
    Date(i32),
    /// Microseconds since midnight.
    Time(i64),
    /// Microseconds since midnight and the zone's offset east of UTC in seconds.
    TimeTz {
        micros: i64,
        offset_seconds: i32,
    },
    /// Microseconds since 1970-01-01 00:00, no time zone; see [`TIMESTAMP_INFINITY`].
    Timestamp(i64),
    /// Microseconds since 1970-01-01 00:00 UTC; see [`TIMESTAMP_INFINITY`].
    TimestampTz(i64),
    /// Postgres keeps months, days and microseconds apart because their
    /// lengths vary; so do we.
    Interval {
        months: i32,
        days: i32,
        micros: i64,
    },
    /// inet, cidr, macaddr and macaddr8 in Postgres's text form.
    Network(String),
    Enum(String),
    Array(Vec<Value>),
}

impl Value {
    /// Roughly the memory the value holds, in bytes: what in-flight limits
    /// by bytes count (`max_in_flight_bytes`). Not exact (allocator slack,
    /// capacity beyond length), but proportional where it matters: a
    /// 300 kB TOASTed text counts 300 kB, an integer its size.
    pub fn approx_bytes(&self) -> usize {
        let inline = std::mem::size_of::<Value>();
        inline
            + match self {
                Value::Text(s) | Value::Json(s) | Value::Network(s) | Value::Enum(s) => s.len(),
                Value::Numeric(Numeric::Finite(s)) => s.len(),
                Value::Bytes(b) => b.len(),
                Value::Array(items) => items.iter().map(Value::approx_bytes).sum(),
                _ => 0,
            }
    }

    pub fn is_null(&self) -> bool {
        matches!(self, Value::Null)
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn approximate_size_follows_the_large_values() {
        let small = Value::Int64(1).approx_bytes();
        let big = Value::Text("x".repeat(300_000)).approx_bytes();
        assert!((300_000..300_100).contains(&big), "{big}");
        let arr = Value::Array(vec![Value::Bytes(vec![0; 1000]), Value::Null]).approx_bytes();
        assert!(arr >= 1000 + 2 * small, "{arr}");
    }

    use super::*;

    #[test]
    fn numeric_unscaled_and_rescale() {
        let n = Numeric::Finite("-12.50".into());
        assert_eq!(n.unscaled(), Some(("-1250".into(), 2)));
        assert_eq!(n.with_scale(4).as_deref(), Some("-125000"));
        assert_eq!(n.with_scale(1).as_deref(), Some("-125"));
        assert_eq!(n.with_scale(0), None);
        assert_eq!(
            Numeric::Finite("7".into()).with_scale(2).as_deref(),
            Some("700")
        );
        assert_eq!(Numeric::NaN.unscaled(), None);
    }
}
