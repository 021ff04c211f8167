//! Durations in configs: one style everywhere, `"30s"`, `"250ms"`, `"2m"`
//! (humantime's forms), under un-suffixed keys (`timeout`, `retry_max`).
//!
//! The connectors' configs used to take milliseconds as numbers under
//! `*_ms` keys (`timeout_ms = 5000`). Those keys still work, as serde
//! aliases of the new ones, so existing files keep their meaning: a number
//! is milliseconds, as it always was. Each use is recorded as a deprecation
//! ([`take_deprecations`]) that the daemon logs once logging is set up.
//! Setting both the old and the new key is an error (a duplicate field).
//!
//! Use [`deprecated_ms_field!`](crate::deprecated_ms_field) to declare the
//! deserializer of a field, so that its warning names the key.

use std::fmt;
use std::sync::Mutex;
use std::time::Duration;

use serde::de::{self, Deserializer, Visitor};

static DEPRECATIONS: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// The deprecation warnings recorded while reading configs, once each.
pub fn take_deprecations() -> Vec<String> {
    let mut d = DEPRECATIONS.lock().unwrap_or_else(|p| p.into_inner());
    let mut out = std::mem::take(&mut *d);
    out.dedup();
    out
}

fn record(message: String) {
    let mut d = DEPRECATIONS.lock().unwrap_or_else(|p| p.into_inner());
    if !d.contains(&message) {
        d.push(message);
    }
}

/// Parses `"30s"`, `"250ms"`, `"1m 30s"`.
pub fn parse(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text.trim()).map_err(|e| {
        format!("`{text}` is not a duration ({e}); write it as \"30s\", \"250ms\" or \"2m\"")
    })
}

/// How a duration is written back, for messages: `"250ms"`, `"30s"`.
pub fn display(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

struct DurationVisitor {
    key: &'static str,
}

impl Visitor<'_> for DurationVisitor {
    type Value = Duration;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "a duration such as \"30s\" or \"250ms\"")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Duration, E> {
        // A number in a string is what an environment override of an old
        // `*_ms` key gives (`WALCAST_..._TIMEOUT_MS=5000`).
        match v.trim().parse::<u64>() {
            Ok(ms) => self.visit_u64(ms),
            Err(_) => parse(v).map_err(E::custom),
        }
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Duration, E> {
        record(format!(
            "`{key}_ms = {v}` (milliseconds as a number) is deprecated; write `{key} = \"{}\"`",
            display(Duration::from_millis(v)),
            key = self.key
        ));
        Ok(Duration::from_millis(v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Duration, E> {
        u64::try_from(v)
            .map_err(|_| E::custom(format!("{v} is negative; a duration is positive")))
            .and_then(|v| self.visit_u64(v))
    }
}

/// Reads a duration field that used to be `<key>_ms`: a string is a human
/// duration, a number milliseconds (recorded as deprecated).
pub fn deserialize<'de, D: Deserializer<'de>>(
    key: &'static str,
    d: D,
) -> Result<Duration, D::Error> {
    d.deserialize_any(DurationVisitor { key })
}

/// Declares `fn $name(d) -> Result<Duration, _>` reading the duration
/// `$key` (or its deprecated alias `$key_ms`), for
/// `#[serde(alias = "$key_ms", deserialize_with = "$name")]`.
#[macro_export]
macro_rules! deprecated_ms_field {
    ($name:ident, $key:literal) => {
        fn $name<'de, D: serde::Deserializer<'de>>(d: D) -> Result<std::time::Duration, D::Error> {
            $crate::duration::deserialize($key, d)
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    crate::deprecated_ms_field!(de_timeout, "timeout");

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct T {
        #[serde(alias = "timeout_ms", deserialize_with = "de_timeout")]
        timeout: Duration,
    }

    fn parse_toml(text: &str) -> Result<T, String> {
        serde_json::from_value::<T>(text_to_json(text)).map_err(|e| e.to_string())
    }

    /// The SDK has no TOML parser; a one-key `key = value` line becomes
    /// JSON, which goes through the same visitor methods.
    fn text_to_json(line: &str) -> serde_json::Value {
        let (k, v) = line.split_once('=').unwrap();
        let v: serde_json::Value = serde_json::from_str(v.trim()).unwrap();
        serde_json::json!({ k.trim(): v })
    }

    #[test]
    fn human_durations_and_the_old_milliseconds() {
        assert_eq!(
            parse_toml(r#"timeout = "30s""#).unwrap().timeout,
            Duration::from_secs(30)
        );
        assert_eq!(
            parse_toml(r#"timeout = "250ms""#).unwrap().timeout,
            Duration::from_millis(250)
        );
        take_deprecations();
        assert_eq!(
            parse_toml("timeout_ms = 1500").unwrap().timeout,
            Duration::from_millis(1500)
        );
        let d = take_deprecations();
        assert!(
            d.iter()
                .any(|m| m.contains("`timeout_ms = 1500`") && m.contains("timeout = \"1s 500ms\"")),
            "{d:?}"
        );
        let e = parse_toml(r#"timeout = "soon""#).unwrap_err();
        assert!(
            e.contains("`soon` is not a duration") && e.contains("\"250ms\""),
            "{e}"
        );
        assert!(parse_toml("timeout_ms = -1").is_err());
    }
}
