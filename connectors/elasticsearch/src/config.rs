//! The `[sink]` section of an Elasticsearch/OpenSearch pipeline.
//!
//! It holds credentials, so it is only ever deserialised, and its `Debug`
//! form hides them.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::mapping::{JsonMapping, NumericMapping};

/// `public.orders`: one index per table, named after it.
pub const DEFAULT_INDEX_TEMPLATE: &str = "{schema}.{table}";
/// Elasticsearch's own guidance is bulk requests of a few MB; 1000 actions
/// of ordinary rows stay well under the default 100 MB request limit.
pub const DEFAULT_BULK_MAX_ACTIONS: usize = 1_000;
pub const DEFAULT_BULK_MAX_BYTES: usize = 5 * 1024 * 1024;
/// How long a partly filled bulk may wait for more batches.
pub const DEFAULT_FLUSH_INTERVAL: Duration = Duration::from_secs(1);
pub const DEFAULT_DEAD_LETTER_INDEX: &str = "walcast-deadletter";
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
pub const DEFAULT_RETRY_INITIAL: Duration = Duration::from_millis(100);
pub const DEFAULT_RETRY_MAX: Duration = Duration::from_secs(30);

walcast_sdk::deprecated_ms_field!(de_flush_interval, "flush_interval");
walcast_sdk::deprecated_ms_field!(de_timeout, "timeout");
walcast_sdk::deprecated_ms_field!(de_retry_initial, "retry_initial");
walcast_sdk::deprecated_ms_field!(de_retry_max, "retry_max");

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ElasticsearchSinkConfig {
    /// Base URL of the cluster, `http://` or `https://`.
    pub url: String,
    /// Index per table; `{schema}` and `{table}` are replaced, then the name
    /// is made valid (see [`crate::request_builder::sanitize_index_name`]).
    #[serde(default = "default_index_template")]
    pub index_template: String,
    #[serde(default)]
    pub auth: Option<Auth>,
    /// A PEM file of CA certificates to trust besides the system's.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    #[serde(default = "default_bulk_max_actions")]
    pub bulk_max_actions: usize,
    #[serde(default = "default_bulk_max_bytes")]
    pub bulk_max_bytes: usize,
    /// How long a partly filled bulk waits for more (`"1s"`; the old
    /// `flush_interval_ms` still reads, deprecated).
    #[serde(
        default = "default_flush_interval",
        alias = "flush_interval_ms",
        deserialize_with = "de_flush_interval"
    )]
    pub flush_interval: Duration,
    #[serde(default)]
    pub dead_letter: DeadLetter,
    #[serde(default)]
    pub truncate: TruncateAction,
    #[serde(default)]
    pub version_type: VersionType,
    /// Per request (`timeout_ms` deprecated).
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
    /// Create each index from the table's schema before its first write,
    /// and add fields for new columns (see [`crate::mapping`]). `false`
    /// leaves mappings to the cluster (index templates, dynamic mapping).
    #[serde(default = "default_manage_mappings")]
    pub manage_mappings: bool,
    /// How `numeric` and `money` columns are mapped.
    #[serde(default)]
    pub numeric: NumericMapping,
    /// How `json` and `jsonb` columns are mapped and written.
    #[serde(default)]
    pub json: JsonMapping,
}

#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Auth {
    Basic {
        username: String,
        password: String,
    },
    /// The base64 `id:key` value Elasticsearch returns as `encoded`, sent as
    /// `Authorization: ApiKey <api_key>`.
    ApiKey {
        api_key: String,
    },
}

/// Where documents the cluster refuses (400: a mapping conflict, a value the
/// field cannot parse) go, so that one bad row does not stop the pipeline.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum DeadLetter {
    /// An index of the same cluster; one document per refused action, with
    /// `_id` = `<index>/<id>/<version>` so a replay overwrites, not repeats.
    Index { name: String },
    /// A JSON-lines file, appended and fsynced before the batch is acked.
    File { path: PathBuf },
}

impl Default for DeadLetter {
    fn default() -> Self {
        DeadLetter::Index {
            name: DEFAULT_DEAD_LETTER_INDEX.to_string(),
        }
    }
}

/// What a `TRUNCATE` does to the table's index.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TruncateAction {
    /// `_delete_by_query` with `match_all` on the table's index.
    #[default]
    DeleteAll,
    /// Log a warning and leave the index as it is.
    Ignore,
}

/// How the cluster compares the commit LSN sent as each action's version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VersionType {
    /// Apply when the LSN is `>=` the stored one. Two changes of one row in
    /// one transaction share a commit LSN, and the second must win; a replay
    /// of the same version rewrites the same content. Older versions: 409.
    #[default]
    ExternalGte,
    /// Apply only when strictly newer: the same LSN is also a 409, so the
    /// later change of a row changed twice in one transaction is lost.
    External,
}

impl VersionType {
    pub fn as_str(self) -> &'static str {
        match self {
            VersionType::ExternalGte => "external_gte",
            VersionType::External => "external",
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("elasticsearch sink: `{field}` {problem}")]
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

impl ElasticsearchSinkConfig {
    /// A config with every default, for `url`.
    pub fn new(url: impl Into<String>) -> Self {
        ElasticsearchSinkConfig {
            url: url.into(),
            index_template: default_index_template(),
            auth: None,
            ca_file: None,
            bulk_max_actions: DEFAULT_BULK_MAX_ACTIONS,
            bulk_max_bytes: DEFAULT_BULK_MAX_BYTES,
            flush_interval: DEFAULT_FLUSH_INTERVAL,
            dead_letter: DeadLetter::default(),
            truncate: TruncateAction::default(),
            version_type: VersionType::default(),
            timeout: DEFAULT_TIMEOUT,
            retry_initial: DEFAULT_RETRY_INITIAL,
            retry_max: DEFAULT_RETRY_MAX,
            manage_mappings: true,
            numeric: NumericMapping::default(),
            json: JsonMapping::default(),
        }
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(self.url.starts_with("http://") || self.url.starts_with("https://")) {
            return Err(bad("url", "must start with http:// or https://"));
        }
        crate::request_builder::IndexTemplate::parse(&self.index_template)
            .map_err(|e| bad("index_template", e.to_string()))?;
        if self.bulk_max_actions == 0 {
            return Err(bad("bulk_max_actions", "must be above 0"));
        }
        if self.bulk_max_bytes < 1024 {
            return Err(bad("bulk_max_bytes", "must be at least 1024"));
        }
        if self.flush_interval.is_zero() {
            return Err(bad("flush_interval", "must be above 0"));
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
        match &self.dead_letter {
            DeadLetter::Index { name } => {
                let clean = crate::request_builder::sanitize_index_name(name);
                if clean.as_deref() != Some(name.as_str()) {
                    return Err(bad("dead_letter.name", format!("`{name}` is not a valid index name (lowercase, no \\ / * ? \" < > | , # : or spaces)")));
                }
            }
            DeadLetter::File { path } => {
                if path.as_os_str().is_empty() {
                    return Err(bad("dead_letter.path", "must not be empty"));
                }
            }
        }
        if let Some(Auth::Basic { username, .. }) = &self.auth {
            if username.is_empty() {
                return Err(bad("auth.username", "must not be empty"));
            }
        }
        Ok(())
    }
}

impl fmt::Debug for Auth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Auth::Basic { username, .. } => {
                write!(f, "Basic {{ username: {username:?}, password: *** }}")
            }
            Auth::ApiKey { .. } => f.write_str("ApiKey { api_key: *** }"),
        }
    }
}

impl fmt::Debug for ElasticsearchSinkConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ElasticsearchSinkConfig")
            .field("url", &walcast_sdk::secret::redact_url(&self.url))
            .field("index_template", &self.index_template)
            .field("auth", &self.auth)
            .field("ca_file", &self.ca_file)
            .field("bulk_max_actions", &self.bulk_max_actions)
            .field("bulk_max_bytes", &self.bulk_max_bytes)
            .field("flush_interval", &self.flush_interval)
            .field("dead_letter", &self.dead_letter)
            .field("truncate", &self.truncate)
            .field("version_type", &self.version_type)
            .field("manage_mappings", &self.manage_mappings)
            .field("numeric", &self.numeric)
            .field("json", &self.json)
            .finish_non_exhaustive()
    }
}

fn default_index_template() -> String {
    DEFAULT_INDEX_TEMPLATE.to_string()
}
fn default_bulk_max_actions() -> usize {
    DEFAULT_BULK_MAX_ACTIONS
}
fn default_bulk_max_bytes() -> usize {
    DEFAULT_BULK_MAX_BYTES
}
fn default_flush_interval() -> Duration {
    DEFAULT_FLUSH_INTERVAL
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
fn default_manage_mappings() -> bool {
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_with_defaults_and_hides_secrets() {
        let c: ElasticsearchSinkConfig = toml::from_str(
            r#"
            url = "https://search:9200"
            auth = { type = "basic", username = "walcast", password = "hunter2" }
            dead_letter = { type = "file", path = "/var/lib/walcast/dlq.jsonl" }
            "#,
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.index_template, DEFAULT_INDEX_TEMPLATE);
        assert_eq!(c.bulk_max_actions, DEFAULT_BULK_MAX_ACTIONS);
        assert_eq!(c.truncate, TruncateAction::DeleteAll);
        assert_eq!(c.version_type, VersionType::ExternalGte);
        assert!(c.manage_mappings);
        assert_eq!(c.numeric, NumericMapping::Auto);
        assert_eq!(c.json, JsonMapping::Flat);
        let m: ElasticsearchSinkConfig = toml::from_str(
            "url = \"http://h:9200\"\nnumeric = \"keyword\"\njson = \"object\"\nmanage_mappings = false",
        )
        .unwrap();
        assert_eq!(
            (m.numeric, m.json, m.manage_mappings),
            (NumericMapping::Keyword, JsonMapping::Object, false)
        );
        assert_eq!(
            c.dead_letter,
            DeadLetter::File {
                path: "/var/lib/walcast/dlq.jsonl".into()
            }
        );
        let debug = format!("{c:?}");
        assert!(
            !debug.contains("hunter2") && debug.contains("walcast"),
            "{debug}"
        );

        let c: ElasticsearchSinkConfig = toml::from_str(
            "url = \"http://h:9200\"\nauth = { type = \"api_key\", api_key = \"c2VjcmV0\" }",
        )
        .unwrap();
        assert_eq!(
            c.dead_letter,
            DeadLetter::Index {
                name: DEFAULT_DEAD_LETTER_INDEX.into()
            }
        );
        assert!(!format!("{c:?}").contains("c2VjcmV0"));
    }

    #[test]
    fn rejects_unknown_fields_and_names_the_field() {
        let err =
            toml::from_str::<ElasticsearchSinkConfig>("url = \"http://h\"\nbulk_max_action = 5")
                .unwrap_err();
        assert!(err.to_string().contains("bulk_max_action"), "{err}");
        let err = toml::from_str::<ElasticsearchSinkConfig>(
            "url = \"http://h\"\nauth = { type = \"basic\", user = \"u\", password = \"p\" }",
        )
        .unwrap_err();
        assert!(err.to_string().contains("user"), "{err}");

        let mut c = ElasticsearchSinkConfig::new("h:9200");
        assert_eq!(c.validate().unwrap_err().field, "url");
        c.url = "http://h:9200".into();
        c.index_template = "{schema}.{tabel}".into();
        assert_eq!(c.validate().unwrap_err().field, "index_template");
        c.index_template = DEFAULT_INDEX_TEMPLATE.into();
        c.dead_letter = DeadLetter::Index {
            name: "Dead Letters".into(),
        };
        assert_eq!(c.validate().unwrap_err().field, "dead_letter.name");
        c.dead_letter = DeadLetter::default();
        c.bulk_max_actions = 0;
        assert_eq!(c.validate().unwrap_err().field, "bulk_max_actions");
    }
}
