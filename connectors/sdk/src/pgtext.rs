//! Column values from Postgres's text output to typed [`Value`]s.
//!
//! Both the replication stream (pgoutput sends text) and snapshots (COPY in
//! text format) come through here, so a value reads the same whichever way
//! it arrived; so do the constants of column `DEFAULT`s, which
//! `avro_compat = "debezium"` writes into schemas (in this crate so that
//! the schema mapping can read them too). The walsender and snapshot sessions are started with
//! `DateStyle=ISO`, `TimeZone=UTC`, `IntervalStyle=iso_8601` and
//! `extra_float_digits=3` (see [`SESSION_SETTINGS`]), which fixes the text
//! forms parsed here.

use crate::value::{DATE_INFINITY, DATE_NEG_INFINITY, TIMESTAMP_INFINITY, TIMESTAMP_NEG_INFINITY};
use crate::{Numeric, PgType, Value};

/// Session settings that make text output unambiguous for the parsers below.
pub const SESSION_SETTINGS: &[(&str, &str)] = &[
    ("DateStyle", "ISO"),
    ("TimeZone", "UTC"),
    ("IntervalStyle", "iso_8601"),
    ("extra_float_digits", "3"),
];

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot read {type_name} value {shown:?}: {reason}")]
pub struct ConvertError {
    pub type_name: String,
    pub shown: String,
    pub reason: String,
}

fn err(ty: &PgType, text: &str, reason: impl Into<String>) -> ConvertError {
    let shown: String = text.chars().take(64).collect();
    ConvertError {
        type_name: ty.sql_name(),
        shown,
        reason: reason.into(),
    }
}

/// Converts one non-null value from its text form.
pub fn from_text(ty: &PgType, text: &str) -> Result<Value, ConvertError> {
    let e = |r: &str| err(ty, text, r);
    Ok(match ty {
        PgType::Bool => match text {
            "t" | "true" => Value::Bool(true),
            "f" | "false" => Value::Bool(false),
            _ => return Err(e("expected t or f")),
        },
        PgType::Int2 => Value::Int16(text.parse().map_err(|_| e("not a smallint"))?),
        PgType::Int4 => Value::Int32(text.parse().map_err(|_| e("not an integer"))?),
        PgType::Int8 => Value::Int64(text.parse().map_err(|_| e("not a bigint"))?),
        PgType::Float4 => Value::Float32(parse_float(text).ok_or_else(|| e("not a real"))? as f32),
        PgType::Float8 => Value::Float64(parse_float(text).ok_or_else(|| e("not a double"))?),
        PgType::Numeric { .. } => Value::Numeric(match text {
            "NaN" => Numeric::NaN,
            "Infinity" => Numeric::PositiveInfinity,
            "-Infinity" => Numeric::NegativeInfinity,
            t if is_decimal(t) => Numeric::Finite(t.to_string()),
            _ => return Err(e("not a decimal number")),
        }),
        PgType::Money => Value::Numeric(Numeric::Finite(
            money(text).ok_or_else(|| e("not a money amount"))?,
        )),
        PgType::Text
        | PgType::Varchar { .. }
        | PgType::Char { .. }
        | PgType::Name
        | PgType::Unknown { .. } => Value::Text(text.to_string()),
        PgType::Bytea => {
            Value::Bytes(bytea(text).ok_or_else(|| e("not bytea hex or escape output"))?)
        }
        PgType::Uuid => Value::Uuid(uuid(text).ok_or_else(|| e("not a uuid"))?),
        PgType::Json | PgType::Jsonb => Value::Json(text.to_string()),
        PgType::Date => Value::Date(date(text).ok_or_else(|| e("not an ISO date"))?),
        PgType::Time => Value::Time(time(text).ok_or_else(|| e("not a time of day"))?),
        PgType::TimeTz => {
            let (t, off) = split_offset(text).ok_or_else(|| e("not a time with zone"))?;
            Value::TimeTz {
                micros: time(t).ok_or_else(|| e("not a time of day"))?,
                offset_seconds: off,
            }
        }
        PgType::Timestamp => {
            Value::Timestamp(timestamp(text, false).ok_or_else(|| e("not an ISO timestamp"))?)
        }
        PgType::TimestampTz => Value::TimestampTz(
            timestamp(text, true).ok_or_else(|| e("not an ISO timestamp with zone"))?,
        ),
        PgType::Interval => {
            let (months, days, micros) =
                interval(text).ok_or_else(|| e("not an ISO 8601 interval"))?;
            Value::Interval {
                months,
                days,
                micros,
            }
        }
        PgType::Inet | PgType::Cidr | PgType::MacAddr | PgType::MacAddr8 => {
            Value::Network(text.to_string())
        }
        PgType::Enum { .. } => Value::Enum(text.to_string()),
        PgType::Array { element } => array(element, text)?,
    })
}

fn parse_float(t: &str) -> Option<f64> {
    match t {
        "NaN" => Some(f64::NAN),
        "Infinity" => Some(f64::INFINITY),
        "-Infinity" => Some(f64::NEG_INFINITY),
        _ => t.parse().ok(),
    }
}

fn is_decimal(t: &str) -> bool {
    let t = t.strip_prefix('-').unwrap_or(t);
    let mut dots = 0;
    !t.is_empty()
        && t.bytes().all(|b| {
            if b == b'.' {
                dots += 1;
                true
            } else {
                b.is_ascii_digit()
            }
        })
        && dots <= 1
}

/// `$1,234.56` / `-$1,234.56` (lc_monetary C or en_US) to `1234.56`.
fn money(t: &str) -> Option<String> {
    let neg = t.starts_with('-') || t.starts_with('(');
    let digits: String = t
        .chars()
        .filter(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    if digits.is_empty() || !is_decimal(&digits) {
        return None;
    }
    Some(if neg { format!("-{digits}") } else { digits })
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn bytea(t: &str) -> Option<Vec<u8>> {
    if let Some(h) = t.strip_prefix("\\x") {
        let b = h.as_bytes();
        if b.len() % 2 != 0 {
            return None;
        }
        return b
            .chunks(2)
            .map(|p| Some(hex(p[0])? << 4 | hex(p[1])?))
            .collect();
    }
    // bytea_output = escape: backslash-octal and doubled backslashes.
    let b = t.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' {
            if b.get(i + 1) == Some(&b'\\') {
                out.push(b'\\');
                i += 2;
            } else {
                let oct = std::str::from_utf8(b.get(i + 1..i + 4)?).ok()?;
                out.push(u8::from_str_radix(oct, 8).ok()?);
                i += 4;
            }
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    Some(out)
}

fn uuid(t: &str) -> Option<[u8; 16]> {
    let digits: Vec<u8> = t.bytes().filter(|b| *b != b'-').collect();
    if digits.len() != 32 {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, p) in digits.chunks(2).enumerate() {
        out[i] = hex(p[0])? << 4 | hex(p[1])?;
    }
    Some(out)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Hinnant's
/// `days_from_civil`). Year 0 is 1 BC, as ISO 8601 counts.
pub fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// `YYYY-MM-DD[ BC]`.
fn date_days(t: &str) -> Option<i64> {
    match t.strip_suffix(" BC") {
        Some(rest) => era_date_days(rest, true),
        None => era_date_days(t, false),
    }
}

/// `YYYY-MM-DD` of the era given. The usual four-digit year is read by
/// position (timestamps of every snapshot row come through here); other
/// years by splitting.
fn era_date_days(t: &str, bc: bool) -> Option<i64> {
    let b = t.as_bytes();
    let (y, m, d) = if b.len() == 10 && b[4] == b'-' && b[7] == b'-' {
        (digits(&b[..4])?, digits(&b[5..7])?, digits(&b[8..])?)
    } else {
        let mut parts = t.splitn(3, '-');
        let y: i64 = parts.next()?.parse().ok()?;
        let m: i64 = parts.next()?.parse().ok()?;
        let d: i64 = parts.next()?.parse().ok()?;
        (y, m, d)
    };
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) {
        return None;
    }
    let y = if bc { 1 - y } else { y };
    Some(days_from_civil(y, m as u32, d as u32))
}

/// ASCII digits (1 to 18 of them) as a number.
fn digits(b: &[u8]) -> Option<i64> {
    if b.is_empty() || b.len() > 18 {
        return None;
    }
    b.iter().try_fold(0i64, |v, c| {
        c.is_ascii_digit().then(|| v * 10 + i64::from(c - b'0'))
    })
}

fn date(t: &str) -> Option<i32> {
    match t {
        "infinity" => Some(DATE_INFINITY),
        "-infinity" => Some(DATE_NEG_INFINITY),
        _ => i32::try_from(date_days(t)?).ok(),
    }
}

/// `HH:MM:SS[.ffffff]` to microseconds; 24:00:00 is allowed, as in Postgres.
fn time(t: &str) -> Option<i64> {
    let b = t.as_bytes();
    let (h, m, sec, frac) = if b.len() >= 8 && b[2] == b':' && b[5] == b':' {
        // Postgres's own form, read by position.
        let frac = match &b[8..] {
            [] => &[][..],
            [b'.', f @ ..] => f,
            _ => return None,
        };
        (digits(&b[..2])?, digits(&b[3..5])?, digits(&b[6..8])?, frac)
    } else {
        let mut parts = t.splitn(3, ':');
        let h: i64 = parts.next()?.parse().ok()?;
        let m: i64 = parts.next()?.parse().ok()?;
        let s = parts.next()?;
        let (sec, frac) = s.split_once('.').unwrap_or((s, ""));
        (h, m, sec.parse().ok()?, frac.as_bytes())
    };
    if frac.len() > 6 || !frac.iter().all(u8::is_ascii_digit) {
        return None;
    }
    // Fraction digits scaled to six: `.5` is 500000 µs.
    let frac_micros = match frac {
        [] => 0,
        f => digits(f)? * 10i64.pow(6 - f.len() as u32),
    };
    Some(((h * 60 + m) * 60 + sec) * 1_000_000 + frac_micros)
}

/// Splits `...+HH[:MM[:SS]]` / `...-HH...` into the rest and the offset in
/// seconds east of UTC.
fn split_offset(t: &str) -> Option<(&str, i32)> {
    // ASCII signs: a byte position is a character boundary.
    let pos = t.bytes().rposition(|b| b == b'+' || b == b'-')?;
    let (rest, off) = t.split_at(pos);
    let sign = if off.starts_with('-') { -1 } else { 1 };
    let mut secs = 0i32;
    for (i, p) in off[1..].split(':').enumerate() {
        let v: i32 = p.parse().ok()?;
        secs += v * [3600, 60, 1].get(i)?;
    }
    Some((rest, sign * secs))
}

fn timestamp(t: &str, with_zone: bool) -> Option<i64> {
    match t {
        "infinity" => return Some(TIMESTAMP_INFINITY),
        "-infinity" => return Some(TIMESTAMP_NEG_INFINITY),
        _ => {}
    }
    let (t, bc) = match t.strip_suffix(" BC") {
        Some(rest) => (rest, true),
        None => (t, false),
    };
    let (d, rest) = t.split_once(' ')?;
    let (clock, offset) = if with_zone {
        split_offset(rest)?
    } else {
        (rest, 0)
    };
    let days = era_date_days(d, bc)?;
    let micros = time(clock)?;
    Some(days * 86_400_000_000 + micros - i64::from(offset) * 1_000_000)
}

/// ISO 8601 durations as Postgres prints them with IntervalStyle=iso_8601:
/// `P1Y2M3DT4H5M6.5S`, components may be negative, `PT0S` for zero.
fn interval(t: &str) -> Option<(i32, i32, i64)> {
    let body = t.strip_prefix('P')?;
    let (date_part, time_part) = body.split_once('T').unwrap_or((body, ""));
    let (mut months, mut days, mut micros) = (0i64, 0i64, 0i64);
    for (num, unit) in components(date_part)? {
        match unit {
            'Y' => months += num.parse::<i64>().ok()? * 12,
            'M' => months += num.parse::<i64>().ok()?,
            'W' => days += num.parse::<i64>().ok()? * 7,
            'D' => days += num.parse::<i64>().ok()?,
            _ => return None,
        }
    }
    for (num, unit) in components(time_part)? {
        match unit {
            'H' => micros += num.parse::<i64>().ok()? * 3_600_000_000,
            'M' => micros += num.parse::<i64>().ok()? * 60_000_000,
            'S' => {
                let neg = num.starts_with('-');
                let (s, f) = num
                    .trim_start_matches('-')
                    .split_once('.')
                    .unwrap_or((num.trim_start_matches('-'), ""));
                let f = if f.is_empty() {
                    0
                } else {
                    format!("{f:0<6}").get(..6)?.parse::<i64>().ok()?
                };
                let v = s.parse::<i64>().ok()? * 1_000_000 + f;
                micros += if neg { -v } else { v };
            }
            _ => return None,
        }
    }
    Some((
        i32::try_from(months).ok()?,
        i32::try_from(days).ok()?,
        micros,
    ))
}

fn components(s: &str) -> Option<Vec<(&str, char)>> {
    let mut out = Vec::new();
    let mut start = 0;
    for (i, c) in s.char_indices() {
        if c.is_ascii_alphabetic() {
            if i == start {
                return None;
            }
            out.push((&s[start..i], c));
            start = i + 1;
        }
    }
    (start == s.len()).then_some(out)
}

/// Array literals: `{1,2,NULL}`, `{"a b","c\"d"}`, `{{1,2},{3,4}}`, with an
/// optional `[lo:hi]=` dimension prefix.
fn array(element: &PgType, text: &str) -> Result<Value, ConvertError> {
    let ty = PgType::Array {
        element: Box::new(element.clone()),
    };
    let body = match text.find("={") {
        Some(i) if text.starts_with('[') => &text[i + 1..],
        _ => text,
    };
    let mut p = ArrayParser {
        s: body.as_bytes(),
        i: 0,
    };
    let v = p.parse(element).map_err(|r| err(&ty, text, r))?;
    if p.i != p.s.len() {
        return Err(err(&ty, text, "trailing characters after the array"));
    }
    Ok(v)
}

struct ArrayParser<'a> {
    s: &'a [u8],
    i: usize,
}

impl ArrayParser<'_> {
    fn parse(&mut self, element: &PgType) -> Result<Value, String> {
        if self.s.get(self.i) != Some(&b'{') {
            return Err("expected '{'".into());
        }
        self.i += 1;
        let mut items = Vec::new();
        if self.s.get(self.i) == Some(&b'}') {
            self.i += 1;
            return Ok(Value::Array(items));
        }
        loop {
            match self.s.get(self.i) {
                Some(b'{') => items.push(self.parse(element)?),
                Some(b'"') => {
                    self.i += 1;
                    let mut buf = Vec::new();
                    loop {
                        match self.s.get(self.i) {
                            Some(b'\\') => {
                                buf.push(*self.s.get(self.i + 1).ok_or("dangling backslash")?);
                                self.i += 2;
                            }
                            Some(b'"') => {
                                self.i += 1;
                                break;
                            }
                            Some(&b) => {
                                buf.push(b);
                                self.i += 1;
                            }
                            None => return Err("unterminated quoted element".into()),
                        }
                    }
                    let text = String::from_utf8(buf).map_err(|_| "element is not UTF-8")?;
                    items.push(from_text(element, &text).map_err(|e| e.to_string())?);
                }
                Some(_) => {
                    let start = self.i;
                    while let Some(&b) = self.s.get(self.i) {
                        if b == b',' || b == b'}' {
                            break;
                        }
                        self.i += 1;
                    }
                    let raw = std::str::from_utf8(&self.s[start..self.i])
                        .map_err(|_| "element is not UTF-8")?;
                    if raw == "NULL" {
                        items.push(Value::Null);
                    } else {
                        items.push(from_text(element, raw).map_err(|e| e.to_string())?);
                    }
                }
                None => return Err("unterminated array".into()),
            }
            match self.s.get(self.i) {
                Some(b',') => self.i += 1,
                Some(b'}') => {
                    self.i += 1;
                    return Ok(Value::Array(items));
                }
                _ => return Err("expected ',' or '}'".into()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(ty: PgType, t: &str) -> Value {
        from_text(&ty, t).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn scalars() {
        assert_eq!(v(PgType::Bool, "t"), Value::Bool(true));
        assert_eq!(v(PgType::Int2, "-32768"), Value::Int16(i16::MIN));
        assert_eq!(
            v(PgType::Int8, "9223372036854775807"),
            Value::Int64(i64::MAX)
        );
        assert!(matches!(v(PgType::Float8, "NaN"), Value::Float64(f) if f.is_nan()));
        assert_eq!(
            v(PgType::Float4, "-Infinity"),
            Value::Float32(f32::NEG_INFINITY)
        );
        assert_eq!(
            v(
                PgType::Numeric {
                    precision: None,
                    scale: None
                },
                "-0.001"
            ),
            Value::Numeric(Numeric::Finite("-0.001".into()))
        );
        assert_eq!(
            v(
                PgType::Numeric {
                    precision: None,
                    scale: None
                },
                "Infinity"
            ),
            Value::Numeric(Numeric::PositiveInfinity)
        );
        assert_eq!(
            v(PgType::Money, "-$1,234.56"),
            Value::Numeric(Numeric::Finite("-1234.56".into()))
        );
        assert_eq!(
            v(PgType::Bytea, "\\x00ff10"),
            Value::Bytes(vec![0, 255, 16])
        );
        assert_eq!(
            v(PgType::Bytea, "a\\\\b\\001"),
            Value::Bytes(vec![b'a', b'\\', b'b', 1])
        );
        assert_eq!(
            v(PgType::Uuid, "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"),
            Value::Uuid([
                0xa0, 0xee, 0xbc, 0x99, 0x9c, 0x0b, 0x4e, 0xf8, 0xbb, 0x6d, 0x6b, 0xb9, 0xbd, 0x38,
                0x0a, 0x11
            ])
        );
        assert!(from_text(&PgType::Int4, "x")
            .unwrap_err()
            .to_string()
            .contains("integer"));
    }

    #[test]
    fn dates_and_times() {
        assert_eq!(v(PgType::Date, "1970-01-01"), Value::Date(0));
        assert_eq!(v(PgType::Date, "2000-03-01"), Value::Date(11_017));
        assert_eq!(v(PgType::Date, "0001-01-01 BC"), Value::Date(-719_528));
        assert_eq!(v(PgType::Date, "infinity"), Value::Date(DATE_INFINITY));
        assert_eq!(v(PgType::Time, "13:14:15.5"), Value::Time(47_655_500_000));
        assert_eq!(
            v(PgType::TimeTz, "01:00:00+02"),
            Value::TimeTz {
                micros: 3_600_000_000,
                offset_seconds: 7200
            }
        );
        assert_eq!(
            v(PgType::TimeTz, "01:00:00-05:30"),
            Value::TimeTz {
                micros: 3_600_000_000,
                offset_seconds: -19_800
            }
        );
        assert_eq!(
            v(PgType::Timestamp, "1970-01-02 00:00:00.000001"),
            Value::Timestamp(86_400_000_001)
        );
        assert_eq!(
            v(PgType::TimestampTz, "2023-11-14 22:13:20.123456+00"),
            Value::TimestampTz(1_700_000_000_123_456)
        );
        assert_eq!(
            v(PgType::TimestampTz, "1970-01-01 01:00:00+01"),
            Value::TimestampTz(0)
        );
        assert_eq!(
            v(PgType::TimestampTz, "-infinity"),
            Value::TimestampTz(TIMESTAMP_NEG_INFINITY)
        );
        // Forms off the by-position path read as before.
        assert_eq!(v(PgType::Time, "24:00:00"), Value::Time(86_400_000_000));
        assert_eq!(v(PgType::Time, "00:00:00.000001"), Value::Time(1));
        assert_eq!(v(PgType::Time, "1:02:03.12"), Value::Time(3_723_120_000));
        assert!(from_text(&PgType::Time, "13:14:15.1234567").is_err());
        assert!(from_text(&PgType::Time, "13:14:15x").is_err());
        assert!(from_text(&PgType::Time, "13:14:1a").is_err());
        assert!(from_text(&PgType::Date, "2024-13-01").is_err());
        assert!(from_text(&PgType::Date, "2024-1a-01").is_err());
        assert_eq!(
            v(PgType::Date, "10000-01-01"),
            Value::Date(days_from_civil(10_000, 1, 1) as i32)
        );
        assert_eq!(
            v(PgType::Timestamp, "0044-03-15 12:00:00 BC"),
            Value::Timestamp(days_from_civil(-43, 3, 15) * 86_400_000_000 + 43_200_000_000)
        );
        assert_eq!(
            v(PgType::TimestampTz, "2023-11-14 22:13:20.5-03:30"),
            Value::TimestampTz(1_700_000_000_500_000 + 12_600_000_000)
        );
        assert_eq!(
            v(PgType::Interval, "P1Y2M3DT4H5M6.5S"),
            Value::Interval {
                months: 14,
                days: 3,
                micros: 14_706_500_000
            }
        );
        assert_eq!(
            v(PgType::Interval, "P-1Y-2M3DT-4H-5M-6S"),
            Value::Interval {
                months: -14,
                days: 3,
                micros: -14_706_000_000
            }
        );
        assert_eq!(
            v(PgType::Interval, "PT0S"),
            Value::Interval {
                months: 0,
                days: 0,
                micros: 0
            }
        );
        assert_eq!(
            v(PgType::Interval, "PT-0.000001S"),
            Value::Interval {
                months: 0,
                days: 0,
                micros: -1
            }
        );
    }

    #[test]
    fn arrays() {
        let int = PgType::Int4;
        assert_eq!(
            array(&int, "{1,NULL,3}").unwrap(),
            Value::Array(vec![Value::Int32(1), Value::Null, Value::Int32(3)])
        );
        assert_eq!(array(&int, "{}").unwrap(), Value::Array(vec![]));
        assert_eq!(
            array(&int, "{{1,2},{3,4}}").unwrap(),
            Value::Array(vec![
                Value::Array(vec![Value::Int32(1), Value::Int32(2)]),
                Value::Array(vec![Value::Int32(3), Value::Int32(4)])
            ])
        );
        assert_eq!(
            array(&int, "[0:1]={7,8}").unwrap(),
            Value::Array(vec![Value::Int32(7), Value::Int32(8)])
        );
        assert_eq!(
            array(&PgType::Text, r#"{"a b","c\"d",NULL,"NULL",plain}"#).unwrap(),
            Value::Array(vec![
                Value::Text("a b".into()),
                Value::Text("c\"d".into()),
                Value::Null,
                Value::Text("NULL".into()),
                Value::Text("plain".into())
            ])
        );
        assert!(array(&int, "{1,2").is_err());
    }
}
