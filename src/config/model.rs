//! The configuration's shape and defaults. Every default is a named
//! constant, and the README's config reference lists them.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::replication::tls::SslMode;

pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9187";
pub const DEFAULT_PG_PORT: u16 = 5432;
pub const DEFAULT_STATUS_INTERVAL: Duration = Duration::from_secs(10);
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_MAX_IN_FLIGHT_EVENTS: usize = 200_000;
pub const DEFAULT_BATCH_MAX_EVENTS: usize = 4_096;
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);
pub const DEFAULT_RETRY_MAX_BACKOFF: Duration = Duration::from_secs(30);
pub const DEFAULT_SNAPSHOT_WORKERS: usize = 2;
pub const DEFAULT_SNAPSHOT_CHUNK_ROWS: usize = 10_000;
pub const DEFAULT_STATE_DIR: &str = "./walcast-state";

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
}

fn default_state_dir() -> PathBuf {
    PathBuf::from(DEFAULT_STATE_DIR)
}

fn default_max_in_flight() -> usize {
    DEFAULT_MAX_IN_FLIGHT_EVENTS
}
fn default_batch_max() -> usize {
    DEFAULT_BATCH_MAX_EVENTS
}
fn default_shutdown_timeout() -> Duration {
    DEFAULT_SHUTDOWN_TIMEOUT
}

/// Where a secret comes from: inline, or a file read at start (trailing
/// newline removed). Never printed.
#[derive(Clone, Default, Deserialize)]
#[serde(transparent)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("\"<redacted>\"")
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresSourceConfig {
    /// The server, or several separated by commas (libpq's host list: tried
    /// in order, see `target_session_attrs`), e.g. the primary and the
    /// standby a failover promotes.
    #[serde(default = "default_host")]
    pub host: String,
    /// The port, or one per host separated by commas (`"5432,5433"`).
    #[serde(default)]
    pub port: Ports,
    /// Which server of the `host` list to use: `primary` (default),
    /// `read-write` or `any` (libpq's names).
    #[serde(default)]
    pub target_session_attrs: crate::replication::connection::TargetSessionAttrs,
    /// Create the slot as a failover slot (Postgres 17+; Debezium's
    /// `slot.failover`), and make an existing one so: standbys with
    /// `sync_replication_slots = on` keep it in step, and after a promotion
    /// walcast resumes from it on the new primary.
    #[serde(default)]
    pub slot_failover: bool,
    /// Publish stored generated columns (Postgres 18+: the publication's
    /// `publish_generated_columns = stored`): events and snapshots carry
    /// them. Off by default, as in Postgres.
    #[serde(default)]
    pub publish_generated_columns: bool,
    pub database: String,
    pub user: String,
    pub password: Option<Secret>,
    /// A file holding the password (Kubernetes secret, systemd credential).
    pub password_file: Option<PathBuf>,
    #[serde(default)]
    pub sslmode: SslMode,
    /// PEM CA certificate for sslmode verify-ca / verify-full (and for
    /// `require`, which then verifies the CA, as libpq does).
    pub ssl_root_cert: Option<PathBuf>,
    /// SCRAM channel binding: `prefer` (SCRAM-SHA-256-PLUS whenever TLS is
    /// on and the server offers it), `require`, `disable` (libpq's).
    #[serde(default)]
    pub channel_binding: crate::replication::tls::ChannelBindingMode,
    /// Allow a clear-text or md5 password exchange over an unencrypted
    /// connection (refused by default).
    #[serde(default)]
    pub allow_plaintext_password: bool,
    /// Replication slot name. Default: `walcast_<pipeline>`.
    pub slot: Option<String>,
    /// Publication name. Default: `walcast_<pipeline>`.
    pub publication: Option<String>,
    /// Tables to capture, `schema.table`. Identifiers are used as written
    /// (case-sensitive, quoted in SQL).
    #[serde(default)]
    pub tables: Vec<String>,
    /// Capture every table of these schemas (`FOR TABLES IN SCHEMA`).
    #[serde(default)]
    pub schemas: Vec<String>,
    /// Create the publication when it is missing.
    #[serde(default = "yes")]
    pub create_publication: bool,
    /// Create the slot when it is missing.
    #[serde(default = "yes")]
    pub create_slot: bool,
    /// Tables allowed to have no primary key (events carry a null key).
    #[serde(default)]
    pub keyless_tables: Vec<String>,
    /// How a partitioned table's changes are published (Postgres's
    /// publication option of the same name). `true` (the default, as in
    /// supabase/etl and what Debezium users set by hand): every change of a
    /// partition is published as a change of the partitioned table it
    /// belongs to, to the parent's topic, and partitions attached later are
    /// captured with no config change. `false`: each partition is a table
    /// of its own (its own topic and schema); a listed parent stands for its
    /// partitions.
    #[serde(default = "yes")]
    pub publish_via_partition_root: bool,
    /// Interval of standby status updates; Postgres also gets one whenever
    /// it asks. Keep it under the server's wal_sender_timeout.
    #[serde(default = "default_status_interval", with = "humantime_serde")]
    pub status_interval: Duration,
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Longest wait between reconnection attempts (exponential backoff).
    #[serde(default = "default_retry_max", with = "humantime_serde")]
    pub retry_max_backoff: Duration,
    /// Whether the rows already in the tables are read when the slot is
    /// created (Debezium's `snapshot.mode`).
    #[serde(default)]
    pub snapshot: SnapshotMode,
    /// SQL sessions reading tables in parallel during a snapshot (one
    /// table per session at a time).
    #[serde(default = "default_snapshot_workers")]
    pub snapshot_workers: usize,
    /// Rows per snapshot chunk: the unit of progress a restart resumes from.
    #[serde(default = "default_snapshot_chunk_rows")]
    pub snapshot_chunk_rows: usize,
}

/// `port`: a number, or a comma-separated list with one port per host.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum Ports {
    One(u16),
    List(String),
}

impl Default for Ports {
    fn default() -> Self {
        Ports::One(DEFAULT_PG_PORT)
    }
}

impl PostgresSourceConfig {
    /// The `host` and `port` lists paired up as libpq pairs them: one port
    /// for every host, or one port per host.
    pub fn endpoints(&self) -> Result<Vec<crate::replication::connection::Endpoint>, String> {
        let hosts: Vec<&str> = self.host.split(',').map(str::trim).collect();
        if hosts.iter().any(|h| h.is_empty()) {
            return Err(format!("`host` = {:?} has an empty entry; list servers as \"host1,host2\"", self.host));
        }
        let ports: Vec<u16> = match &self.port {
            Ports::One(p) => vec![*p],
            Ports::List(l) => l
                .split(',')
                .map(|p| {
                    p.trim()
                        .parse()
                        .map_err(|_| format!("`port` = {l:?}: {p:?} is not a port number"))
                })
                .collect::<Result<_, _>>()?,
        };
        let ports = match ports.len() {
            1 => vec![ports[0]; hosts.len()],
            n if n == hosts.len() => ports,
            n => {
                return Err(format!(
                    "`port` lists {n} ports for {} hosts; give one port for all hosts or one per host",
                    hosts.len()
                ))
            }
        };
        Ok(hosts
            .into_iter()
            .zip(ports)
            .map(|(h, port)| crate::replication::connection::Endpoint { host: h.to_string(), port })
            .collect())
    }
}

/// What happens to the rows that exist before capture starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SnapshotMode {
    /// Read every table (events with op `r`) when the slot is created, then
    /// stream from the slot's consistent point.
    #[default]
    Initial,
    /// Stream changes only.
    Never,
    /// Read every table once, then stop the pipeline (exit 0 when it is the
    /// only one) without streaming; a temporary slot provides the snapshot
    /// and pins no WAL afterwards.
    InitialOnly,
}

fn default_snapshot_workers() -> usize {
    DEFAULT_SNAPSHOT_WORKERS
}
fn default_snapshot_chunk_rows() -> usize {
    DEFAULT_SNAPSHOT_CHUNK_ROWS
}

fn yes() -> bool {
    true
}
fn default_host() -> String {
    "127.0.0.1".into()
}
fn default_status_interval() -> Duration {
    DEFAULT_STATUS_INTERVAL
}
fn default_connect_timeout() -> Duration {
    DEFAULT_CONNECT_TIMEOUT
}
fn default_retry_max() -> Duration {
    DEFAULT_RETRY_MAX_BACKOFF
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
