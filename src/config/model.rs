//! The configuration's shape and defaults. Every default is a named
//! constant, and the README's config reference lists them.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

pub use walcast_postgres::config::PostgresSourceConfig;

pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9187";
pub const DEFAULT_MAX_IN_FLIGHT_EVENTS: usize = 200_000;
/// 32 MiB of events (as `ChangeEvent::approx_bytes` counts them) between
/// Postgres and the sinks: about 65,000 rows of 8 narrow columns, or 100
/// rows of 300 kB TOASTed text.
pub const DEFAULT_MAX_IN_FLIGHT_BYTES: usize = 8 * 1024 * 1024;
pub const DEFAULT_BATCH_MAX_EVENTS: usize = 4_096;
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);
pub const DEFAULT_STATE_DIR: &str = "./walcast-state";
pub const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(10);
/// Debezium's `heartbeat.topics.prefix`; the topic is `<this>.<topic_prefix>`.
pub const DEFAULT_HEARTBEAT_TOPIC_PREFIX: &str = "__debezium-heartbeat";
/// The schema-change topic is `<topic_prefix><this>`.
pub const DEFAULT_SCHEMA_CHANGES_TOPIC_SUFFIX: &str = ".schema-changes";

/// The whole file.
#[derive(Debug, Clone)]
pub struct Config {
    pub admin: AdminConfig,
    pub log: LogConfig,
    /// A schema registry served by walcast itself (no JVM needed).
    pub embedded_registry: Option<walcast_schemas::EmbeddedRegistryConfig>,
    /// Pipelines by name. The name is used in metrics, logs, and the default
    /// slot, publication and topic prefix.
    pub pipelines: BTreeMap<String, PipelineConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Address of the health/metrics/status HTTP server; localhost unless
    /// you mean otherwise. Empty string disables it.
    #[serde(default = "default_admin_listen")]
    pub listen: String,
    /// A file holding a bearer token: `/status` and `/metrics` (and every
    /// endpoint but the probes `/healthz` and `/readyz`) then answer only
    /// requests with `Authorization: Bearer <token>`. Set it whenever
    /// `listen` is beyond loopback: status shows the topology.
    pub token_file: Option<PathBuf>,
    /// Serve HTTPS with this PEM certificate chain and key.
    pub tls: Option<AdminTls>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminTls {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: default_admin_listen(),
            token_file: None,
            tls: None,
        }
    }
}

fn default_admin_listen() -> String {
    DEFAULT_ADMIN_LISTEN.to_string()
}

impl AdminConfig {
    pub fn address(&self) -> Option<Result<SocketAddr, std::net::AddrParseError>> {
        (!self.listen.is_empty()).then(|| self.listen.parse())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Human-readable on a terminal, JSON otherwise.
    #[default]
    Auto,
    Human,
    Json,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    #[serde(default)]
    pub format: LogFormat,
    /// A tracing filter (`info`, `walcast=debug,rdkafka=warn`); RUST_LOG wins.
    #[serde(default = "default_log_level")]
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Auto,
            level: default_log_level(),
        }
    }
}

fn default_log_level() -> String {
    "info".into()
}

/// The file's top level, with each pipeline read only for its `kind`; the
/// pipelines themselves are read one by one as their kind's struct, so
/// that errors name the full key (`pipelines.orders.source.port`), which a
/// serde-tagged enum would lose.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TopLevel {
    #[serde(default)]
    pub admin: AdminConfig,
    #[serde(default)]
    pub log: LogConfig,
    /// Serve a Confluent-compatible registry from this process, with its
    /// schemas kept in `dir`; pipelines point `[registry] url` at `listen`.
    pub embedded_registry: Option<walcast_schemas::EmbeddedRegistryConfig>,
    pub pipelines: BTreeMap<String, PipelineKind>,
}

#[derive(Debug, Clone, Deserialize)]
pub(crate) struct PipelineKind {
    pub kind: Option<String>,
}

/// One pipeline: where events come from and where they go.
#[derive(Debug, Clone)]
pub enum PipelineConfig {
    /// Postgres → sinks (Kafka, or Redis/OpenSearch/file directly).
    Capture(CaptureConfig),
    /// Kafka (a consumer group over walcast's topics) → Redis/OpenSearch/file.
    Relay(RelayConfig),
}

/// How events are encoded on Kafka.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventFormat {
    /// Avro in the Confluent wire format, schemas in `[registry]`.
    #[default]
    Avro,
    /// Debezium JsonConverter JSON without the schema block.
    Json,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelayConfig {
    /// `"relay"`.
    #[serde(rename = "kind")]
    pub _kind: String,
    pub source: walcast_kafka::KafkaSourceConfig,
    /// Needed to decode Avro records (JSON records need none).
    pub registry: Option<walcast_schemas::RegistryConfig>,
    pub sinks: Vec<SinkConfig>,
    /// How long a SIGTERM waits for in-flight records to be acknowledged.
    #[serde(default = "default_shutdown_timeout", with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// What to do with a record that cannot be applied whatever happens:
    /// one that does not decode, or that a sink refuses (a table without
    /// the key a document id or key template needs).
    #[serde(default)]
    pub on_refused: OnRefused,
}

/// A relay's policy for records it can never apply, as Kafka Connect's
/// `errors.tolerance` and `errors.deadletterqueue.topic.name`.
///
/// In TOML: `on_refused = "halt"` or
/// `on_refused = { dead_letter = { topic = "walcast.relay.dlq" } }`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum OnRefused {
    /// Stop the relay, and the daemon with exit code 1, naming the record
    /// and the reason, without committing its offset: nothing is skipped
    /// silently. Fix the cause (or choose `dead_letter`) and restart.
    #[default]
    Halt,
    /// Copy the record as it was read (key, value, headers) to `topic`,
    /// with headers naming the reason, the sink and where it came from
    /// (`walcast.error`, `walcast.sink`, `walcast.topic`,
    /// `walcast.partition`, `walcast.offset`), then commit past it. The
    /// other sinks still get it when they can take it.
    DeadLetter { topic: String },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaptureConfig {
    /// `"capture"`.
    #[serde(rename = "kind")]
    pub _kind: String,
    pub source: PostgresSourceConfig,
    /// Debezium's `topic.prefix`: the first part of topic names and the
    /// `source.name` of events. Default: the pipeline's name.
    pub topic_prefix: Option<String>,
    /// Encoding of events on Kafka sinks.
    #[serde(default)]
    pub format: EventFormat,
    /// The schema registry (Confluent REST API) for `format = "avro"`.
    pub registry: Option<walcast_schemas::RegistryConfig>,
    pub sinks: Vec<SinkConfig>,
    /// Events buffered between Postgres and the sinks before reading stops
    /// (back-pressure). Bounds memory whatever the transaction size.
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight_events: usize,
    /// The same bound in bytes (`"8MiB"`, or a number of bytes): reading
    /// stops at whichever is reached first, and a large transaction is cut
    /// into batches at an eighth of it, so wide rows (TOASTed values of
    /// hundreds of kB) bound memory as well as many narrow ones.
    #[serde(
        default = "default_max_in_flight_bytes",
        deserialize_with = "walcast_sdk::size::deserialize"
    )]
    pub max_in_flight_bytes: usize,
    /// Largest batch handed to sinks; big transactions are cut into
    /// batches of this size.
    #[serde(default = "default_batch_max")]
    pub batch_max_events: usize,
    /// How long a SIGTERM waits for in-flight events to be acknowledged.
    #[serde(default = "default_shutdown_timeout", with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// Where durable progress lives (the snapshot's completed chunks), so
    /// that a restart resumes instead of starting over. Relative to the
    /// working directory; under systemd use `StateDirectory=walcast` and
    /// `/var/lib/walcast`.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// Per-table shaping (`[pipelines.NAME.table."schema.table"]`): column
    /// include/exclude lists, masks, hashes, the message key, a row filter.
    #[serde(default)]
    pub table: std::collections::BTreeMap<String, walcast_sdk::shape::TableShapeConfig>,
    /// A heartbeat record every `interval` on the Kafka sinks (Debezium's
    /// `heartbeat.interval.ms`, `heartbeat.topics.prefix`,
    /// `heartbeat.action.query`).
    pub heartbeat: Option<HeartbeatConfig>,
    /// An event on the Kafka sinks when a captured table's columns change.
    pub schema_changes: Option<SchemaChangesConfig>,
}

/// `heartbeat = { interval = "10s", topic = "...", action_query = "..." }`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeartbeatConfig {
    #[serde(default = "default_heartbeat_interval", with = "humantime_serde")]
    pub interval: Duration,
    /// Default: `__debezium-heartbeat.<topic_prefix>`, as Debezium names it.
    pub topic: Option<String>,
    /// SQL run on a normal connection before each heartbeat (an `INSERT`
    /// or `UPDATE` of a heartbeat table), so that WAL of this database
    /// flows through the slot when the captured tables are idle.
    pub action_query: Option<String>,
}

/// `schema_changes = { topic = "...", ddl_capture = true }`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SchemaChangesConfig {
    /// Default: `<topic_prefix>.schema-changes`.
    pub topic: Option<String>,
    /// Install an event trigger that writes each DDL statement to the WAL
    /// (needs a superuser once); each becomes an event on the same topic.
    #[serde(default)]
    pub ddl_capture: bool,
}

fn default_heartbeat_interval() -> Duration {
    DEFAULT_HEARTBEAT_INTERVAL
}

impl HeartbeatConfig {
    pub fn topic(&self, topic_prefix: &str) -> String {
        self.topic
            .clone()
            .unwrap_or_else(|| format!("{DEFAULT_HEARTBEAT_TOPIC_PREFIX}.{topic_prefix}"))
    }
}

impl SchemaChangesConfig {
    pub fn topic(&self, topic_prefix: &str) -> String {
        self.topic
            .clone()
            .unwrap_or_else(|| format!("{topic_prefix}{DEFAULT_SCHEMA_CHANGES_TOPIC_SUFFIX}"))
    }
}

fn default_state_dir() -> PathBuf {
    PathBuf::from(DEFAULT_STATE_DIR)
}

fn default_max_in_flight() -> usize {
    DEFAULT_MAX_IN_FLIGHT_EVENTS
}
fn default_max_in_flight_bytes() -> usize {
    DEFAULT_MAX_IN_FLIGHT_BYTES
}

fn default_batch_max() -> usize {
    DEFAULT_BATCH_MAX_EVENTS
}
fn default_shutdown_timeout() -> Duration {
    DEFAULT_SHUTDOWN_TIMEOUT
}

/// A destination, by `type`.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum SinkConfig {
    /// JSON lines to stdout or a file: for debugging and tests.
    File(walcast_file::FileSinkConfig),
    /// Kafka topics, keyed by primary key.
    Kafka(walcast_kafka::KafkaSinkConfig),
    /// Redis: cache invalidation, upserts or invalidation messages.
    Redis(walcast_redis::RedisSinkConfig),
    /// Elasticsearch / OpenSearch `_bulk`.
    Elasticsearch(walcast_elasticsearch::ElasticsearchSinkConfig),
}

impl SinkConfig {
    pub fn kind(&self) -> &'static str {
        match self {
            SinkConfig::File(_) => "file",
            SinkConfig::Kafka(_) => "kafka",
            SinkConfig::Redis(_) => "redis",
            SinkConfig::Elasticsearch(_) => "elasticsearch",
        }
    }
}
