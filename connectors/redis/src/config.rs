//! The `[sink]` section of a Redis pipeline, as the user writes it.
//!
//! URLs carry credentials (`redis://user:pass@host`), so this config is only
//! ever deserialised; its `Debug` form hides passwords.

use std::fmt;
use std::time::Duration;

use serde::Deserialize;

use crate::request::KeyTemplate;

/// `public.orders:42`: qualified enough that two schemas never share a key.
pub const DEFAULT_KEY_TEMPLATE: &str = "{schema}.{table}:{id}";
/// How long a delete's version marker outlives the row: long enough that a
/// late or replayed older upsert (a Kafka relay rewound by a day) cannot
/// resurrect the row, short enough that deleted keys do not pile up.
pub const DEFAULT_TOMBSTONE_TTL_SECS: u64 = 24 * 60 * 60;
pub const DEFAULT_CHANNEL_TEMPLATE: &str = "walcast:{schema}.{table}";
/// Streams are trimmed approximately (`MAXLEN ~`) so trimming stays cheap.
pub const DEFAULT_STREAM_MAXLEN: u64 = 100_000;
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
pub const DEFAULT_RETRY_INITIAL: Duration = Duration::from_millis(100);
pub const DEFAULT_RETRY_MAX: Duration = Duration::from_secs(30);

walcast_sdk::deprecated_ms_field!(de_timeout, "timeout");
walcast_sdk::deprecated_ms_field!(de_retry_initial, "retry_initial");
walcast_sdk::deprecated_ms_field!(de_retry_max, "retry_max");

/// A Redis sink.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisSinkConfig {
    /// One URL for a single server (`redis://`, `rediss://` for TLS, with
    /// `user:pass@` for AUTH); several seed nodes when `cluster = true`.
    pub urls: Vec<String>,
    #[serde(default)]
    pub cluster: bool,
    pub mode: Mode,
    /// Connect and per-command response timeout.
    /// Per command (`"5s"`; the old `timeout_ms` still reads, deprecated).
    #[serde(
        default = "default_timeout",
        alias = "timeout_ms",
        deserialize_with = "de_timeout"
    )]
    pub timeout: Duration,
    /// Backoff for transient errors, first and longest wait
    /// (`retry_initial_ms` / `retry_max_ms` deprecated).
    #[serde(
        default = "default_retry_initial",
        alias = "retry_initial_ms",
        deserialize_with = "de_retry_initial"
    )]
    pub retry_initial: Duration,
    #[serde(
        default = "default_retry_max",
        alias = "retry_max_ms",
        deserialize_with = "de_retry_max"
    )]
    pub retry_max: Duration,
}

/// What the sink does with each change.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Mode {
    /// Delete the row's cache key so that readers reload it from Postgres.
    Invalidate {
        #[serde(default = "default_key_template")]
        key_template: String,
        /// On a truncate, SCAN for the table's keys and delete them. Only
        /// possible when the template names `{schema}` or `{table}` before
        /// the key (otherwise the pattern would match unrelated keys), and
        /// not in cluster mode (SCAN is per node).
        #[serde(default = "default_true")]
        truncate_scan: bool,
    },
    /// Keep a copy of the row in Redis, written only if not older than the
    /// copy already there.
    Upsert {
        #[serde(default = "default_key_template")]
        key_template: String,
        #[serde(default)]
        format: UpsertFormat,
        /// Expire rows (and their version markers) this many seconds after
        /// their last write; none when absent.
        #[serde(default)]
        ttl_secs: Option<u64>,
        #[serde(default = "default_tombstone_ttl_secs")]
        tombstone_ttl_secs: u64,
        #[serde(default = "default_true")]
        truncate_scan: bool,
    },
    /// Tell subscribers which row changed, without its data.
    Publish {
        #[serde(default)]
        via: PublishVia,
        /// Channel or stream name; `{schema}` and `{table}` are replaced.
        #[serde(default = "default_channel_template")]
        name_template: String,
        /// For `via = "stream"`: `XADD ... MAXLEN ~ <n>`.
        #[serde(default = "default_stream_maxlen")]
        stream_maxlen: u64,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UpsertFormat {
    /// `SET key <after image as Debezium JSON>`.
    #[default]
    Json,
    /// `HSET key col value ...`: strings as they are, other values as JSON
    /// text, NULL columns left out.
    Hash,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PublishVia {
    /// PUBLISH: fire and forget, only connected subscribers see it.
    #[default]
    Channel,
    /// XADD: kept (up to `stream_maxlen`) for consumers that come later.
    Stream,
}

/// A config field that breaks a rule.
#[derive(Debug, thiserror::Error)]
#[error("redis sink: `{field}` {problem}")]
pub struct ConfigError {
    pub field: &'static str,
    pub problem: String,
}

fn bad(field: &'static str, problem: impl Into<String>) -> ConfigError {
    ConfigError {
        field,
        problem: problem.into(),
    }
}

impl RedisSinkConfig {
    /// Whether every row needs a primary key here: the key (or channel)
    /// template names `{id}` or a key column. A table without key cannot be
    /// written then.
    pub fn needs_row_key(&self) -> bool {
        let template = match &self.mode {
            Mode::Invalidate { key_template, .. } | Mode::Upsert { key_template, .. } => {
                key_template
            }
            Mode::Publish { name_template, .. } => name_template,
        };
        crate::request::KeyTemplate::parse(template).is_ok_and(|t| t.uses_key())
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.urls.is_empty() {
            return Err(bad("urls", "must name at least one Redis URL"));
        }
        if !self.cluster && self.urls.len() > 1 {
            return Err(bad(
                "urls",
                "has several URLs; set `cluster = true` for Redis Cluster, or keep one",
            ));
        }
        for url in &self.urls {
            if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
                return Err(bad(
                    "urls",
                    format!(
                        "`{}` must start with redis:// or rediss:// (TLS)",
                        redact_url(url)
                    ),
                ));
            }
        }
        if self.timeout.is_zero() {
            return Err(bad("timeout", "must be above 0"));
        }
        if self.retry_initial.is_zero() || self.retry_max < self.retry_initial {
            return Err(bad(
                "retry_max",
                "must be at least retry_initial, which must be above 0",
            ));
        }
        match &self.mode {
            Mode::Invalidate { key_template, .. } => {
                KeyTemplate::parse(key_template)
                    .map_err(|e| bad("mode.key_template", e.to_string()))?;
            }
            Mode::Upsert {
                key_template,
                ttl_secs,
                tombstone_ttl_secs,
                ..
            } => {
                KeyTemplate::parse(key_template)
                    .map_err(|e| bad("mode.key_template", e.to_string()))?;
                if *ttl_secs == Some(0) {
                    return Err(bad(
                        "mode.ttl_secs",
                        "must be above 0, or left out for no expiry",
                    ));
                }
                if *tombstone_ttl_secs == 0 {
                    return Err(bad(
                        "mode.tombstone_ttl_secs",
                        "must be above 0: a delete must leave its version for a while",
                    ));
                }
            }
            Mode::Publish {
                name_template,
                stream_maxlen,
                ..
            } => {
                let t = KeyTemplate::parse(name_template)
                    .map_err(|e| bad("mode.name_template", e.to_string()))?;
                if t.uses_key() {
                    return Err(bad(
                        "mode.name_template",
                        "may only use {schema} and {table}",
                    ));
                }
                if *stream_maxlen == 0 {
                    return Err(bad("mode.stream_maxlen", "must be above 0"));
                }
            }
        }
        Ok(())
    }
}

impl fmt::Debug for RedisSinkConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let urls: Vec<String> = self.urls.iter().map(|u| redact_url(u)).collect();
        f.debug_struct("RedisSinkConfig")
            .field("urls", &urls)
            .field("cluster", &self.cluster)
            .field("mode", &self.mode)
            .field("timeout", &self.timeout)
            .field("retry_initial", &self.retry_initial)
            .field("retry_max", &self.retry_max)
            .finish()
    }
}

/// The URL with any password replaced, for logs and messages (the SDK's
/// one redaction rule).
pub use walcast_sdk::secret::redact_url;

fn default_key_template() -> String {
    DEFAULT_KEY_TEMPLATE.to_string()
}
fn default_channel_template() -> String {
    DEFAULT_CHANNEL_TEMPLATE.to_string()
}
fn default_tombstone_ttl_secs() -> u64 {
    DEFAULT_TOMBSTONE_TTL_SECS
}
fn default_stream_maxlen() -> u64 {
    DEFAULT_STREAM_MAXLEN
}
fn default_timeout() -> Duration {
    DEFAULT_TIMEOUT
}
fn default_retry_initial() -> Duration {
    DEFAULT_RETRY_INITIAL
}
fn default_retry_max() -> Duration {
    DEFAULT_RETRY_MAX
}
fn default_true() -> bool {
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<RedisSinkConfig, toml::de::Error> {
        toml::from_str(text)
    }

    #[test]
    fn upsert_with_defaults() {
        let c = parse(
            r#"
            urls = ["redis://app:s3cret@127.0.0.1:6379/0"]
            [mode]
            type = "upsert"
            format = "hash"
            ttl_secs = 60
            "#,
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(
            c.mode,
            Mode::Upsert {
                key_template: DEFAULT_KEY_TEMPLATE.into(),
                format: UpsertFormat::Hash,
                ttl_secs: Some(60),
                tombstone_ttl_secs: DEFAULT_TOMBSTONE_TTL_SECS,
                truncate_scan: true,
            }
        );
        assert_eq!(c.timeout, DEFAULT_TIMEOUT);
        let debug = format!("{c:?}");
        assert!(!debug.contains("s3cret"), "{debug}");
        assert!(debug.contains("app:<redacted>@127.0.0.1:6379/0"), "{debug}");
    }

    #[test]
    fn publish_stream_and_invalidate() {
        let c = parse(
            r#"
            urls = ["redis://127.0.0.1:6379"]
            [mode]
            type = "publish"
            via = "stream"
            name_template = "cdc:{table}"
            stream_maxlen = 500
            "#,
        )
        .unwrap();
        c.validate().unwrap();
        assert!(matches!(
            c.mode,
            Mode::Publish {
                via: PublishVia::Stream,
                stream_maxlen: 500,
                ..
            }
        ));
        let c = parse("urls = [\"redis://h\"]\nmode = { type = \"invalidate\", key_template = \"{table}:{id}\" }").unwrap();
        c.validate().unwrap();
    }

    #[test]
    fn rejects_unknown_fields_and_names_the_broken_field() {
        let err = parse("urls = [\"redis://h\"]\nmode = { type = \"upsert\", tll_secs = 5 }")
            .unwrap_err();
        assert!(err.to_string().contains("tll_secs"), "{err}");
        let err = parse("urls = [\"redis://h\"]\nclustr = true\nmode = { type = \"invalidate\" }")
            .unwrap_err();
        assert!(err.to_string().contains("clustr"), "{err}");

        let c = parse("urls = [\"redis://a\", \"redis://b\"]\nmode = { type = \"invalidate\" }")
            .unwrap();
        assert_eq!(c.validate().unwrap_err().field, "urls");
        let c = parse("urls = [\"http://a\"]\nmode = { type = \"invalidate\" }").unwrap();
        assert_eq!(c.validate().unwrap_err().field, "urls");
        let c = parse("urls = [\"redis://a\"]\nmode = { type = \"invalidate\", key_template = \"{table}:{id\" }").unwrap();
        assert_eq!(c.validate().unwrap_err().field, "mode.key_template");
        let c = parse(
            "urls = [\"redis://a\"]\nmode = { type = \"publish\", name_template = \"x:{id}\" }",
        )
        .unwrap();
        assert_eq!(c.validate().unwrap_err().field, "mode.name_template");
        let c =
            parse("urls = [\"redis://a\"]\nmode = { type = \"upsert\", tombstone_ttl_secs = 0 }")
                .unwrap();
        assert_eq!(c.validate().unwrap_err().field, "mode.tombstone_ttl_secs");
    }

    #[test]
    fn redacts_passwords() {
        assert_eq!(
            redact_url("rediss://u:p@h:1/2"),
            "rediss://u:<redacted>@h:1/2"
        );
        assert_eq!(redact_url("redis://:p@h"), "redis://:<redacted>@h");
        assert_eq!(redact_url("redis://h:6379"), "redis://h:6379");
    }
}
