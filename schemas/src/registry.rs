//! Schema registries: the [`Registry`] trait the encoder and decoder use,
//! and [`HttpRegistry`], a client of the Confluent Schema Registry REST API
//! (Confluent, Karapace, Redpanda, Apicurio's `/apis/ccompat/v7`).
//!
//! Every answer is cached: `(subject, fingerprint) -> id` and
//! `id -> schema`, so once a table's schemas are registered the hot path
//! makes no HTTP call. Schemas are compared by the Rabin fingerprint of
//! their parsing canonical form, never as strings, because registries
//! reformat what they store (Apicurio hands schemas back compacted).
//!
//! Failures are classified by what the caller should do: connection errors,
//! timeouts, 5xx and 429 are transient (retried here with
//! [`walcast_sdk::retry::Backoff`], then reported as transient so the
//! pipeline can retry later); 409 (incompatible), 422 (invalid schema),
//! 401/403 and other 4xx are definite and carry the registry's message.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use reqwest::{Method, StatusCode, Url};
use serde::Deserialize;
use serde_json::{json, Value as Json};
use walcast_sdk::retry::Backoff;
use walcast_sdk::EncodeError;

use crate::mapping::{AvroSchema, MappingError, UnconstrainedNumeric};

/// The Confluent API's media type, which strict registries require.
pub const CONTENT_TYPE: &str = "application/vnd.schemaregistry.v1+json";
/// Per-request timeout.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Attempts per call before a transient failure is reported.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 5;
/// First retry delay; doubles up to [`MAX_RETRY_DELAY`].
pub const INITIAL_RETRY_DELAY: Duration = Duration::from_millis(200);
pub const MAX_RETRY_DELAY: Duration = Duration::from_secs(5);

fn default_request_timeout() -> Duration {
    DEFAULT_REQUEST_TIMEOUT
}

walcast_sdk::deprecated_ms_field!(de_request_timeout, "request_timeout");

fn default_max_attempts() -> u32 {
    DEFAULT_MAX_ATTEMPTS
}

/// How subjects are named.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SubjectStrategy {
    /// `<topic>-key` / `<topic>-value`: Confluent's default, one schema
    /// lineage per topic.
    #[default]
    TopicName,
    /// The record's full name (`<prefix>.<schema>.<table>.Envelope`), for
    /// topics that carry several record types.
    RecordName,
    /// `<topic>-<record's full name>` (Confluent's
    /// `TopicRecordNameStrategy`): a lineage per table within each topic,
    /// for topics several tables are routed to.
    TopicRecordName,
}

impl SubjectStrategy {
    pub fn subject(self, topic: &str, schema: &AvroSchema, is_key: bool) -> String {
        match (self, schema.full_name()) {
            (SubjectStrategy::RecordName, Some(name)) => name,
            (SubjectStrategy::TopicRecordName, Some(name)) => format!("{topic}-{name}"),
            _ => format!("{topic}-{}", if is_key { "key" } else { "value" }),
        }
    }
}

/// The `[registry]` section of an Avro pipeline. Holds a password, so it is
/// never serialised back out and its `Debug` hides it.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryConfig {
    /// Base URL of the Confluent-compatible API, e.g.
    /// `http://registry:8081` or `http://apicurio:8080/apis/ccompat/v7`.
    pub url: String,
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password: Option<String>,
    /// PEM file of CA certificates to trust in addition to the system's.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    #[serde(default)]
    pub subject_strategy: SubjectStrategy,
    /// How `numeric` without precision travels. Unset: `string` under
    /// `avro_compat = "walcast"`, `variable_scale` (Debezium's `precise`)
    /// under `avro_compat = "debezium"`.
    #[serde(default)]
    pub unconstrained_numeric: Option<UnconstrainedNumeric>,
    /// Whose Avro shape to write: `walcast` (default) or `debezium`
    /// (what Debezium's Postgres connector writes through a Kafka Connect
    /// Avro converter; `schemas/MAPPING.md`).
    #[serde(default)]
    pub avro_compat: crate::mapping::AvroCompat,
    /// How column names that are not Avro names become field names
    /// (Debezium's `field.name.adjustment.mode`): `avro` or `avro_unicode`.
    #[serde(default)]
    pub field_name_adjustment: crate::mapping::FieldNameAdjustment,
    /// Per request, connecting included (`"10s"`; the old
    /// `request_timeout_ms` still reads, deprecated).
    #[serde(
        default = "default_request_timeout",
        alias = "request_timeout_ms",
        deserialize_with = "de_request_timeout"
    )]
    pub request_timeout: Duration,
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// Directory of data contracts (`<schema>.<table>.avsc`, see
    /// [`crate::contracts`]). When set, the encoder refuses to encode a
    /// table whose derived row schema the table's contract cannot read.
    #[serde(default)]
    pub contracts: Option<PathBuf>,
    /// What the Kafka sink does with an event the encoder refuses as
    /// invalid (`EncodeError::Invalid`): halt the pipeline (default) or
    /// route it to a dead-letter topic.
    #[serde(default)]
    pub on_invalid: InvalidValuePolicy,
}

/// What happens to an event that cannot be encoded because of its values or
/// its table's shape (`EncodeError::Invalid`: a NaN in a `decimal` column, a
/// contract violation). Transient registry failures are never subject to
/// this policy: they are retried.
///
/// In TOML: `on_invalid = "halt"` or
/// `on_invalid = { dead_letter = { topic = "walcast.dlq" } }`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum InvalidValuePolicy {
    /// Stop the pipeline without acknowledging the event, so nothing is
    /// skipped silently; an operator fixes the table or the contract and
    /// restarts, and the event is read again.
    #[default]
    Halt,
    /// Write the event to `topic` instead (as the JSON encoder renders it,
    /// with the error in a header) and go on. The event is then missing
    /// from its table's topic: consumers of that topic see a gap.
    DeadLetter { topic: String },
}

impl std::fmt::Debug for RegistryConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryConfig")
            .field("url", &walcast_sdk::secret::redact_url(&self.url))
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("ca_file", &self.ca_file)
            .field("subject_strategy", &self.subject_strategy)
            .field("unconstrained_numeric", &self.unconstrained_numeric)
            .field("field_name_adjustment", &self.field_name_adjustment)
            .field("avro_compat", &self.avro_compat)
            .field("request_timeout", &self.request_timeout)
            .field("max_attempts", &self.max_attempts)
            .field("contracts", &self.contracts)
            .field("on_invalid", &self.on_invalid)
            .finish()
    }
}

impl RegistryConfig {
    /// The schema derivation choices this config makes.
    pub fn mapping_options(&self) -> crate::MappingOptions {
        use crate::mapping::AvroCompat;
        crate::MappingOptions {
            unconstrained_numeric: self
                .unconstrained_numeric
                .unwrap_or(match self.avro_compat {
                    AvroCompat::Walcast => UnconstrainedNumeric::String,
                    AvroCompat::Debezium => UnconstrainedNumeric::VariableScale,
                }),
            field_name_adjustment: self.field_name_adjustment,
            avro_compat: self.avro_compat,
        }
    }

    /// A config with every default, for `url`.
    pub fn new(url: impl Into<String>) -> Self {
        RegistryConfig {
            url: url.into(),
            username: None,
            password: None,
            ca_file: None,
            subject_strategy: SubjectStrategy::default(),
            unconstrained_numeric: None,
            field_name_adjustment: Default::default(),
            avro_compat: Default::default(),
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            contracts: None,
            on_invalid: InvalidValuePolicy::default(),
        }
    }

    /// The data contracts of `contracts`, if set. An unreadable directory
    /// or an unparsable contract is an error, never "no contract".
    pub fn load_contracts(
        &self,
    ) -> Result<Option<crate::contracts::Contracts>, crate::contracts::ContractError> {
        self.contracts
            .as_deref()
            .map(crate::contracts::load_dir)
            .transpose()
    }

    pub fn validate(&self) -> Result<Url, RegistryError> {
        let bad = |field: &'static str, message: String| RegistryError::Config { field, message };
        let url = Url::parse(&self.url)
            .map_err(|e| bad("url", format!("`{}` is not a URL: {e}", self.url)))?;
        if !matches!(url.scheme(), "http" | "https") || url.cannot_be_a_base() {
            return Err(bad(
                "url",
                format!("`{}` must be an http:// or https:// URL", self.url),
            ));
        }
        if self.password.is_some() && self.username.is_none() {
            return Err(bad("password", "a password needs a username".into()));
        }
        if self.max_attempts == 0 {
            return Err(bad("max_attempts", "must be at least 1".into()));
        }
        if self.request_timeout.is_zero() {
            return Err(bad("request_timeout", "must be positive".into()));
        }
        if let InvalidValuePolicy::DeadLetter { topic } = &self.on_invalid {
            if topic.trim().is_empty() {
                return Err(bad(
                    "on_invalid.dead_letter.topic",
                    "must not be empty".into(),
                ));
            }
        }
        Ok(url)
    }
}

/// Why a registry call failed.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("registry config: `{field}`: {message}")]
    Config {
        field: &'static str,
        message: String,
    },
    #[error("registry CA file {path}: {source}")]
    CaFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("registry CA file {path} holds no usable PEM certificate: {source}")]
    Certificate {
        path: PathBuf,
        #[source]
        source: reqwest::Error,
    },
    #[error("registry HTTP client could not be built: {source}")]
    Client {
        #[source]
        source: reqwest::Error,
    },
    #[error("registry {url} unreachable after {attempts} attempts: {source}")]
    Unreachable {
        url: String,
        attempts: u32,
        #[source]
        source: reqwest::Error,
    },
    #[error("registry {url} answered {status} after {attempts} attempts: {message}")]
    Unavailable {
        url: String,
        status: u16,
        attempts: u32,
        message: String,
    },
    #[error("subject `{subject}`: the registry refused the schema as incompatible with the subject's compatibility level: {message}")]
    Incompatible { subject: String, message: String },
    #[error("subject `{subject}`: the registry refused the schema as invalid: {message}")]
    InvalidSchema { subject: String, message: String },
    #[error(
        "registry {url} refused the credentials ({status}): {message}; check username and password"
    )]
    Unauthorized {
        url: String,
        status: u16,
        message: String,
    },
    #[error("registry {url}: not found: {message}")]
    NotFound { url: String, message: String },
    #[error("registry {url} refused the request ({status}): {message}")]
    Rejected {
        url: String,
        status: u16,
        message: String,
    },
    #[error("registry {url} answered with an unexpected body: {message}")]
    Response { url: String, message: String },
    /// The embedded registry could not persist a new schema (disk full,
    /// permissions); retrying later may succeed.
    #[error("embedded registry store: {message}")]
    Store { message: String },
    #[error("schema id {id} from the registry is not usable Avro: {source}")]
    Schema {
        id: u32,
        #[source]
        source: MappingError,
    },
}

impl RegistryError {
    /// Whether retrying later may succeed (the registry was down or overloaded).
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            RegistryError::Unreachable { .. }
                | RegistryError::Unavailable { .. }
                | RegistryError::Store { .. }
        )
    }
}

impl From<RegistryError> for EncodeError {
    fn from(e: RegistryError) -> Self {
        EncodeError::Registry {
            message: e.to_string(),
            transient: e.is_transient(),
            source: Some(Box::new(e)),
        }
    }
}

/// The registry's verdict on a candidate schema.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Compatibility {
    pub is_compatible: bool,
    /// Why not, when the registry says (Confluent's `verbose=true` messages).
    pub messages: Vec<String>,
}

/// A subject's (or the registry's) compatibility level, as the Confluent
/// API spells it. Non-transitive levels compare with the latest version
/// only, transitive ones with every version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, serde::Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum CompatibilityLevel {
    /// Readers using the new schema can read data written with the old one.
    #[default]
    Backward,
    BackwardTransitive,
    /// Readers using the old schema can read data written with the new one.
    Forward,
    ForwardTransitive,
    /// Both.
    Full,
    FullTransitive,
    /// Anything goes.
    None,
}

impl CompatibilityLevel {
    pub fn as_str(self) -> &'static str {
        match self {
            CompatibilityLevel::Backward => "BACKWARD",
            CompatibilityLevel::BackwardTransitive => "BACKWARD_TRANSITIVE",
            CompatibilityLevel::Forward => "FORWARD",
            CompatibilityLevel::ForwardTransitive => "FORWARD_TRANSITIVE",
            CompatibilityLevel::Full => "FULL",
            CompatibilityLevel::FullTransitive => "FULL_TRANSITIVE",
            CompatibilityLevel::None => "NONE",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        serde_json::from_value(Json::String(text.to_string())).ok()
    }

    pub fn is_transitive(self) -> bool {
        matches!(
            self,
            CompatibilityLevel::BackwardTransitive
                | CompatibilityLevel::ForwardTransitive
                | CompatibilityLevel::FullTransitive
        )
    }
}

/// A version of a subject: a number (1-based) or the latest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VersionRef {
    Latest,
    Number(u32),
}

impl VersionRef {
    /// Confluent's path forms: `latest`, `-1` (also the latest) or a number.
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "latest" | "-1" => Some(VersionRef::Latest),
            n => n.parse().ok().filter(|&n| n > 0).map(VersionRef::Number),
        }
    }
}

impl std::fmt::Display for VersionRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VersionRef::Latest => f.write_str("latest"),
            VersionRef::Number(n) => write!(f, "{n}"),
        }
    }
}

/// One version of a subject, as `GET /subjects/{s}/versions/{v}` and
/// `POST /subjects/{s}` answer it.
#[derive(Debug, Clone)]
pub struct SubjectVersion {
    pub subject: String,
    pub version: u32,
    pub id: u32,
    pub schema: Arc<AvroSchema>,
}

/// What the encoder and decoder need from a registry.
#[async_trait]
pub trait Registry: Send + Sync {
    /// Registers `schema` under `subject` (idempotent: an equal schema gets
    /// its existing id) and returns its global id.
    async fn register(&self, subject: &str, schema: &AvroSchema) -> Result<u32, RegistryError>;

    /// The schema with global id `id`.
    async fn schema_by_id(&self, id: u32) -> Result<Arc<AvroSchema>, RegistryError>;

    /// Whether `schema` could be registered under `subject` now. A subject
    /// that does not exist yet accepts anything.
    async fn check_compatibility(
        &self,
        subject: &str,
        schema: &AvroSchema,
    ) -> Result<Compatibility, RegistryError>;
}

/// A registry's refusal, before it is given a meaning by the call.
struct Refusal {
    url: String,
    status: StatusCode,
    message: String,
}

/// A Confluent-API registry over HTTP(S).
pub struct HttpRegistry {
    client: reqwest::Client,
    base: Url,
    username: Option<String>,
    password: Option<String>,
    max_attempts: u32,
    ids: RwLock<HashMap<(String, u64), u32>>,
    schemas: RwLock<HashMap<u32, Arc<AvroSchema>>>,
}

impl HttpRegistry {
    pub fn new(config: &RegistryConfig) -> Result<Self, RegistryError> {
        let base = config.validate()?;
        let mut builder = reqwest::Client::builder()
            .timeout(config.request_timeout)
            .connect_timeout(config.request_timeout);
        if let Some(path) = &config.ca_file {
            let pem = std::fs::read(path).map_err(|source| RegistryError::CaFile {
                path: path.clone(),
                source,
            })?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|source| {
                RegistryError::Certificate {
                    path: path.clone(),
                    source,
                }
            })?;
            for cert in certs {
                builder = builder.add_root_certificate(cert);
            }
        }
        let client = builder
            .build()
            .map_err(|source| RegistryError::Client { source })?;
        Ok(HttpRegistry {
            client,
            base,
            username: config.username.clone(),
            password: config.password.clone(),
            max_attempts: config.max_attempts,
            ids: RwLock::default(),
            schemas: RwLock::default(),
        })
    }

    fn endpoint(&self, segments: &[&str]) -> Url {
        let mut url = self.base.clone();
        url.path_segments_mut()
            .expect("validate() refuses URLs that cannot be a base")
            .pop_if_empty()
            .extend(segments);
        url
    }

    /// Sends a request, retrying transient failures. `Ok(Err(_))` is a
    /// definite refusal for the caller to interpret.
    async fn call(
        &self,
        method: Method,
        url: Url,
        body: Option<&Json>,
    ) -> Result<Result<Json, Refusal>, RegistryError> {
        let mut backoff = Backoff::new(INITIAL_RETRY_DELAY, MAX_RETRY_DELAY);
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut req = self
                .client
                .request(method.clone(), url.clone())
                .header(reqwest::header::ACCEPT, CONTENT_TYPE);
            if let Some(user) = &self.username {
                req = req.basic_auth(user, self.password.as_deref());
            }
            if let Some(body) = body {
                req = req
                    .header(reqwest::header::CONTENT_TYPE, CONTENT_TYPE)
                    .body(body.to_string());
            }
            let last = attempt >= self.max_attempts;
            let result = match req.send().await {
                Ok(resp) => {
                    let status = resp.status();
                    resp.text().await.map(|text| (status, text))
                }
                Err(e) => Err(e),
            };
            let (status, text) = match result {
                Ok(answer) => answer,
                Err(source) if last => {
                    return Err(RegistryError::Unreachable {
                        url: walcast_sdk::secret::redact_url(url.as_str()),
                        attempts: attempt,
                        source,
                    });
                }
                Err(e) => {
                    tracing::warn!(url = %url, attempt, error = %e, "schema registry unreachable; retrying");
                    tokio::time::sleep(backoff.next_delay()).await;
                    continue;
                }
            };
            if status.is_success() {
                return serde_json::from_str(&text)
                    .map(Ok)
                    .map_err(|e| RegistryError::Response {
                        url: walcast_sdk::secret::redact_url(url.as_str()),
                        message: format!("{e}: {text}"),
                    });
            }
            let message = error_message(&text);
            if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS {
                if last {
                    return Err(RegistryError::Unavailable {
                        url: walcast_sdk::secret::redact_url(url.as_str()),
                        status: status.as_u16(),
                        attempts: attempt,
                        message,
                    });
                }
                tracing::warn!(url = %url, attempt, status = status.as_u16(), message, "schema registry unavailable; retrying");
                tokio::time::sleep(backoff.next_delay()).await;
                continue;
            }
            if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
                return Err(RegistryError::Unauthorized {
                    url: walcast_sdk::secret::redact_url(url.as_str()),
                    status: status.as_u16(),
                    message,
                });
            }
            return Ok(Err(Refusal {
                url: walcast_sdk::secret::redact_url(url.as_str()),
                status,
                message,
            }));
        }
    }

    /// Every subject (`GET /subjects`).
    pub async fn subjects(&self) -> Result<Vec<String>, RegistryError> {
        let url = self.endpoint(&["subjects"]);
        let answer = self
            .call(Method::GET, url.clone(), None)
            .await?
            .map_err(|r| refused("", r))?;
        serde_json::from_value(answer.clone()).map_err(|e| RegistryError::Response {
            url: walcast_sdk::secret::redact_url(url.as_str()),
            message: format!("{e}: {answer}"),
        })
    }

    /// The version numbers of `subject`, oldest first
    /// (`GET /subjects/{s}/versions`).
    pub async fn versions(&self, subject: &str) -> Result<Vec<u32>, RegistryError> {
        let url = self.endpoint(&["subjects", subject, "versions"]);
        let answer = self
            .call(Method::GET, url.clone(), None)
            .await?
            .map_err(|r| refused(subject, r))?;
        serde_json::from_value(answer.clone()).map_err(|e| RegistryError::Response {
            url: walcast_sdk::secret::redact_url(url.as_str()),
            message: format!("{e}: {answer}"),
        })
    }

    /// One version of `subject` (`GET /subjects/{s}/versions/{v}`).
    pub async fn version(
        &self,
        subject: &str,
        version: VersionRef,
    ) -> Result<SubjectVersion, RegistryError> {
        let url = self.endpoint(&["subjects", subject, "versions", &version.to_string()]);
        let answer = self
            .call(Method::GET, url.clone(), None)
            .await?
            .map_err(|r| refused(subject, r))?;
        subject_version(&url, subject, &answer)
    }

    /// The version of `subject` holding `schema`, if any (`POST /subjects/{s}`).
    pub async fn lookup(
        &self,
        subject: &str,
        schema: &AvroSchema,
    ) -> Result<Option<SubjectVersion>, RegistryError> {
        let url = self.endpoint(&["subjects", subject]);
        let body = json!({ "schema": schema.text() });
        match self.call(Method::POST, url.clone(), Some(&body)).await? {
            Ok(answer) => subject_version(&url, subject, &answer).map(Some),
            Err(r) if r.status == StatusCode::NOT_FOUND => Ok(None),
            Err(r) => Err(refused(subject, r)),
        }
    }

    /// Whether `schema` is compatible with one version of `subject` under
    /// the subject's level (`POST /compatibility/subjects/{s}/versions/{v}`).
    pub async fn check_compatibility_with(
        &self,
        subject: &str,
        version: VersionRef,
        schema: &AvroSchema,
    ) -> Result<Compatibility, RegistryError> {
        let mut url = self.endpoint(&[
            "compatibility",
            "subjects",
            subject,
            "versions",
            &version.to_string(),
        ]);
        url.query_pairs_mut().append_pair("verbose", "true");
        let body = json!({ "schema": schema.text() });
        match self.call(Method::POST, url.clone(), Some(&body)).await? {
            Ok(answer) => compatibility(&url, &answer),
            // No subject (or no version) yet: the first schema is always accepted.
            Err(r) if r.status == StatusCode::NOT_FOUND && version == VersionRef::Latest => {
                Ok(Compatibility {
                    is_compatible: true,
                    messages: Vec::new(),
                })
            }
            Err(r) => Err(refused(subject, r)),
        }
    }

    /// The compatibility level of `subject`, or the registry's global one
    /// for `None` (`GET /config[/{s}]`).
    pub async fn compatibility_level(
        &self,
        subject: Option<&str>,
    ) -> Result<CompatibilityLevel, RegistryError> {
        let url = match subject {
            Some(s) => self.endpoint(&["config", s]),
            None => self.endpoint(&["config"]),
        };
        let answer = self
            .call(Method::GET, url.clone(), None)
            .await?
            .map_err(|r| refused(subject.unwrap_or(""), r))?;
        answer
            .get("compatibilityLevel")
            .or_else(|| answer.get("compatibility"))
            .and_then(Json::as_str)
            .and_then(CompatibilityLevel::parse)
            .ok_or_else(|| RegistryError::Response {
                url: walcast_sdk::secret::redact_url(url.as_str()),
                message: format!("no known compatibilityLevel in {answer}"),
            })
    }

    /// Sets the compatibility level of `subject`, or the global one for
    /// `None` (`PUT /config[/{s}]`).
    pub async fn set_compatibility_level(
        &self,
        subject: Option<&str>,
        level: CompatibilityLevel,
    ) -> Result<(), RegistryError> {
        let url = match subject {
            Some(s) => self.endpoint(&["config", s]),
            None => self.endpoint(&["config"]),
        };
        let body = json!({ "compatibility": level.as_str() });
        self.call(Method::PUT, url, Some(&body))
            .await?
            .map_err(|r| refused(subject.unwrap_or(""), r))?;
        Ok(())
    }

    fn cached_id(&self, subject: &str, fingerprint: u64) -> Option<u32> {
        self.ids
            .read()
            .expect("registry cache lock poisoned")
            .get(&(subject.to_string(), fingerprint))
            .copied()
    }
}

fn subject_version(
    url: &Url,
    subject: &str,
    answer: &Json,
) -> Result<SubjectVersion, RegistryError> {
    let bad = |what: &str| RegistryError::Response {
        url: walcast_sdk::secret::redact_url(url.as_str()),
        message: format!("no {what} in {answer}"),
    };
    let number = |key: &str| {
        answer
            .get(key)
            .and_then(Json::as_u64)
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| bad(key))
    };
    let id = number("id")?;
    let version = number("version")?;
    let text = answer
        .get("schema")
        .and_then(Json::as_str)
        .ok_or_else(|| bad("schema"))?;
    let schema =
        AvroSchema::parse_str(text).map_err(|source| RegistryError::Schema { id, source })?;
    Ok(SubjectVersion {
        subject: answer
            .get("subject")
            .and_then(Json::as_str)
            .unwrap_or(subject)
            .to_string(),
        version,
        id,
        schema: Arc::new(schema),
    })
}

fn compatibility(url: &Url, answer: &Json) -> Result<Compatibility, RegistryError> {
    let is_compatible = answer
        .get("is_compatible")
        .and_then(Json::as_bool)
        .ok_or_else(|| RegistryError::Response {
            url: walcast_sdk::secret::redact_url(url.as_str()),
            message: format!("no is_compatible in {answer}"),
        })?;
    let messages = answer
        .get("messages")
        .and_then(Json::as_array)
        .map(|m| {
            m.iter()
                .map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_string))
                .collect()
        })
        .unwrap_or_default();
    Ok(Compatibility {
        is_compatible,
        messages,
    })
}

/// The `message` of a Confluent error body (`{"error_code":..,"message":..}`),
/// or the body itself.
fn error_message(body: &str) -> String {
    match serde_json::from_str::<Json>(body) {
        Ok(j) => match (j.get("error_code"), j.get("message").and_then(Json::as_str)) {
            (Some(code), Some(m)) => format!("{m} (error code {code})"),
            (None, Some(m)) => m.to_string(),
            _ => body.to_string(),
        },
        Err(_) => body.trim().chars().take(500).collect(),
    }
}

fn refused(subject: &str, r: Refusal) -> RegistryError {
    match r.status {
        StatusCode::CONFLICT => RegistryError::Incompatible {
            subject: subject.to_string(),
            message: r.message,
        },
        StatusCode::UNPROCESSABLE_ENTITY => RegistryError::InvalidSchema {
            subject: subject.to_string(),
            message: r.message,
        },
        StatusCode::NOT_FOUND => RegistryError::NotFound {
            url: r.url,
            message: r.message,
        },
        status => RegistryError::Rejected {
            url: r.url,
            status: status.as_u16(),
            message: r.message,
        },
    }
}

#[async_trait]
impl Registry for HttpRegistry {
    async fn register(&self, subject: &str, schema: &AvroSchema) -> Result<u32, RegistryError> {
        if let Some(id) = self.cached_id(subject, schema.fingerprint()) {
            return Ok(id);
        }
        let url = self.endpoint(&["subjects", subject, "versions"]);
        let body = json!({ "schema": schema.text() });
        let answer = self
            .call(Method::POST, url.clone(), Some(&body))
            .await?
            .map_err(|r| refused(subject, r))?;
        let id = answer
            .get("id")
            .and_then(Json::as_u64)
            .and_then(|id| u32::try_from(id).ok())
            .ok_or_else(|| RegistryError::Response {
                url: walcast_sdk::secret::redact_url(url.as_str()),
                message: format!("no schema id in {answer}"),
            })?;
        tracing::info!(subject, id, "schema registered");
        self.ids
            .write()
            .expect("registry cache lock poisoned")
            .insert((subject.to_string(), schema.fingerprint()), id);
        self.schemas
            .write()
            .expect("registry cache lock poisoned")
            .entry(id)
            .or_insert_with(|| Arc::new(schema.clone()));
        Ok(id)
    }

    async fn schema_by_id(&self, id: u32) -> Result<Arc<AvroSchema>, RegistryError> {
        if let Some(s) = self
            .schemas
            .read()
            .expect("registry cache lock poisoned")
            .get(&id)
        {
            return Ok(s.clone());
        }
        let url = self.endpoint(&["schemas", "ids", &id.to_string()]);
        let answer = self
            .call(Method::GET, url.clone(), None)
            .await?
            .map_err(|r| match r.status {
                StatusCode::NOT_FOUND => RegistryError::NotFound {
                    url: r.url,
                    message: format!("schema id {id}: {}", r.message),
                },
                _ => refused("", r),
            })?;
        if let Some(kind) = answer.get("schemaType").and_then(Json::as_str) {
            if kind != "AVRO" {
                return Err(RegistryError::Response {
                    url: walcast_sdk::secret::redact_url(url.as_str()),
                    message: format!("schema id {id} is {kind}, not Avro"),
                });
            }
        }
        let text =
            answer
                .get("schema")
                .and_then(Json::as_str)
                .ok_or_else(|| RegistryError::Response {
                    url: walcast_sdk::secret::redact_url(url.as_str()),
                    message: format!("no schema in {answer}"),
                })?;
        let schema = Arc::new(
            AvroSchema::parse_str(text).map_err(|source| RegistryError::Schema { id, source })?,
        );
        self.schemas
            .write()
            .expect("registry cache lock poisoned")
            .insert(id, schema.clone());
        Ok(schema)
    }

    async fn check_compatibility(
        &self,
        subject: &str,
        schema: &AvroSchema,
    ) -> Result<Compatibility, RegistryError> {
        self.check_compatibility_with(subject, VersionRef::Latest, schema)
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_parses_with_defaults_and_refuses_unknown_fields() {
        let c: RegistryConfig = serde_json::from_value(
            json!({"url": "https://r:8081", "username": "u", "password": "p"}),
        )
        .unwrap();
        assert_eq!(c.subject_strategy, SubjectStrategy::TopicName);
        assert_eq!(
            c.mapping_options().unconstrained_numeric,
            UnconstrainedNumeric::String
        );
        assert_eq!(c.mapping_options().avro_compat, crate::AvroCompat::Walcast);
        assert_eq!(c.max_attempts, DEFAULT_MAX_ATTEMPTS);
        // Debezium's shape brings Debezium's precise mode, unless set.
        let c: RegistryConfig =
            serde_json::from_value(json!({"url": "http://r", "avro_compat": "debezium"})).unwrap();
        let o = c.mapping_options();
        assert_eq!(o.avro_compat, crate::AvroCompat::Debezium);
        assert_eq!(o.unconstrained_numeric, UnconstrainedNumeric::VariableScale);
        let c: RegistryConfig = serde_json::from_value(
            json!({"url": "http://r", "avro_compat": "debezium", "unconstrained_numeric": "string"}),
        )
        .unwrap();
        assert_eq!(
            c.mapping_options().unconstrained_numeric,
            UnconstrainedNumeric::String
        );
        assert!(serde_json::from_value::<RegistryConfig>(
            json!({"url": "http://r", "avro_compat": "confluent"})
        )
        .is_err());
        assert!(
            !format!("{c:?}").contains("\"p\""),
            "password leaked into Debug"
        );
        let c: RegistryConfig =
            serde_json::from_value(json!({"url": "http://r", "subject_strategy": "record_name", "unconstrained_numeric": "string"})).unwrap();
        assert_eq!(c.subject_strategy, SubjectStrategy::RecordName);
        let err =
            serde_json::from_value::<RegistryConfig>(json!({"url": "http://r", "compat": "x"}))
                .unwrap_err();
        assert!(err.to_string().contains("compat"), "{err}");
    }

    #[test]
    fn invalid_value_policy_defaults_to_halt_and_names_a_dead_letter_topic() {
        let c: RegistryConfig = serde_json::from_value(json!({"url": "http://r"})).unwrap();
        assert_eq!(c.on_invalid, InvalidValuePolicy::Halt);
        assert_eq!(c.contracts, None);
        let c: RegistryConfig = serde_json::from_value(json!({
            "url": "http://r",
            "contracts": "schemas/contracts",
            "on_invalid": {"dead_letter": {"topic": "walcast.dlq"}},
        }))
        .unwrap();
        assert_eq!(
            c.on_invalid,
            InvalidValuePolicy::DeadLetter {
                topic: "walcast.dlq".into()
            }
        );
        let c: RegistryConfig =
            serde_json::from_value(json!({"url": "http://r", "on_invalid": "halt"})).unwrap();
        assert_eq!(c.on_invalid, InvalidValuePolicy::Halt);
        assert!(serde_json::from_value::<RegistryConfig>(
            json!({"url": "http://r", "on_invalid": {"dead_letter": {"topic": "t", "x": 1}}})
        )
        .is_err());
        let mut c = RegistryConfig::new("http://r");
        c.on_invalid = InvalidValuePolicy::DeadLetter { topic: " ".into() };
        let RegistryError::Config { field, .. } = c.validate().unwrap_err() else {
            panic!()
        };
        assert_eq!(field, "on_invalid.dead_letter.topic");
    }

    #[test]
    fn levels_and_versions_parse_as_the_api_spells_them() {
        assert_eq!(
            CompatibilityLevel::parse("FULL_TRANSITIVE"),
            Some(CompatibilityLevel::FullTransitive)
        );
        assert_eq!(CompatibilityLevel::parse("backward"), None);
        for level in [CompatibilityLevel::Backward, CompatibilityLevel::None] {
            assert_eq!(CompatibilityLevel::parse(level.as_str()), Some(level));
        }
        assert_eq!(VersionRef::parse("latest"), Some(VersionRef::Latest));
        assert_eq!(VersionRef::parse("-1"), Some(VersionRef::Latest));
        assert_eq!(VersionRef::parse("3"), Some(VersionRef::Number(3)));
        assert_eq!(VersionRef::parse("0"), None);
        assert_eq!(VersionRef::parse("x"), None);
    }

    #[test]
    fn validate_names_the_field() {
        let RegistryError::Config { field, .. } =
            RegistryConfig::new("ftp://r").validate().unwrap_err()
        else {
            panic!()
        };
        assert_eq!(field, "url");
        let mut c = RegistryConfig::new("http://r");
        c.password = Some("p".into());
        let RegistryError::Config { field, .. } = c.validate().unwrap_err() else {
            panic!()
        };
        assert_eq!(field, "password");
    }

    #[test]
    fn endpoints_keep_the_base_path_and_escape_subjects() {
        let r = HttpRegistry::new(&RegistryConfig::new("http://h:1/apis/ccompat/v7/")).unwrap();
        assert_eq!(
            r.endpoint(&["subjects", "a.b-value", "versions"]).as_str(),
            "http://h:1/apis/ccompat/v7/subjects/a.b-value/versions"
        );
        assert_eq!(
            r.endpoint(&["subjects", "a/b c"]).as_str(),
            "http://h:1/apis/ccompat/v7/subjects/a%2Fb%20c"
        );
    }

    #[test]
    fn error_bodies_yield_the_registry_message() {
        // Confluent's body for an incompatible schema.
        let body = r#"{"error_code":409,"message":"Schema being registered is incompatible with an earlier schema for subject \"t-value\""}"#;
        assert!(error_message(body).starts_with("Schema being registered is incompatible"));
        assert!(error_message(body).contains("409"));
        assert_eq!(
            error_message("<html>Bad Gateway</html>"),
            "<html>Bad Gateway</html>"
        );
        let e = refused(
            "t-value",
            Refusal {
                url: "u".into(),
                status: StatusCode::CONFLICT,
                message: "m".into(),
            },
        );
        assert!(matches!(e, RegistryError::Incompatible { .. }) && !e.is_transient());
        assert!(e.to_string().contains("t-value"));
        let e = refused(
            "t-value",
            Refusal {
                url: "u".into(),
                status: StatusCode::UNPROCESSABLE_ENTITY,
                message: "m".into(),
            },
        );
        assert!(matches!(e, RegistryError::InvalidSchema { .. }));
    }

    #[tokio::test]
    async fn unreachable_registry_is_transient_after_retries() {
        // A port nothing listens on: bind, read the port, release it.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut c = RegistryConfig::new(format!("http://127.0.0.1:{port}"));
        c.max_attempts = 2;
        let r = HttpRegistry::new(&c).unwrap();
        let err = r.schema_by_id(1).await.unwrap_err();
        assert!(
            matches!(err, RegistryError::Unreachable { attempts: 2, .. }),
            "{err}"
        );
        let enc: EncodeError = err.into();
        assert!(enc.is_transient());
    }
}
