//! The Postgres source's settings, as a user writes them
//! (`[pipelines.NAME.source]`), with their defaults and the rules
//! [`PostgresSourceConfig::validate`] checks before anything connects.
//!
//! Every default is a named constant; the README's config reference lists
//! them. The password is a [`Secret`], so a `Debug` of the config never
//! shows it.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use walcast_sdk::secret::Secret;
use walcast_sdk::TableName;

use crate::replication::connection::{Endpoint, TargetSessionAttrs};
use crate::replication::tls::{ChannelBindingMode, SslMode};

pub const DEFAULT_HOST: &str = "127.0.0.1";
pub const DEFAULT_PG_PORT: u16 = 5432;
pub const DEFAULT_STATUS_INTERVAL: Duration = Duration::from_secs(10);
/// As Postgres's own `wal_receiver_timeout`.
pub const DEFAULT_RECEIVE_TIMEOUT: Duration = Duration::from_secs(60);
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_RETRY_MAX_BACKOFF: Duration = Duration::from_secs(30);
pub const DEFAULT_SNAPSHOT_WORKERS: usize = 2;
pub const DEFAULT_SNAPSHOT_CHUNK_ROWS: usize = 10_000;
/// Largest block range of a table the initial snapshot reads in one query.
pub const DEFAULT_SNAPSHOT_RANGE_SIZE: usize = 32 << 20;

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
    pub target_session_attrs: TargetSessionAttrs,
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
    /// Ask Postgres (14+) to stream large transactions while they run
    /// (pgoutput protocol 2, `streaming 'on'`) instead of spilling them to
    /// its disk past `logical_decoding_work_mem`; walcast holds them (in
    /// memory within half of `max_in_flight_bytes`, in `state_dir` past
    /// it) and still publishes only what committed, at its commit. Off by
    /// default.
    #[serde(default)]
    pub streaming: bool,
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
    pub channel_binding: ChannelBindingMode,
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
    /// Postgres's `wal_receiver_timeout` for walcast: how long the
    /// replication stream may stay silent while walcast is reading before
    /// the connection is taken for dead and reopened (a cut network path
    /// sends no reset). Half-way, walcast asks the server for a keepalive.
    /// Also the TCP user timeout of the SQL connection.
    #[serde(default = "default_receive_timeout", with = "humantime_serde")]
    pub receive_timeout: Duration,
    /// Longest wait between reconnection attempts (exponential backoff).
    #[serde(default = "default_retry_max", with = "humantime_serde")]
    pub retry_max_backoff: Duration,
    /// Whether the rows already in the tables are read when the slot is
    /// created (Debezium's `snapshot.mode`).
    #[serde(default)]
    pub snapshot: SnapshotMode,
    /// SQL sessions reading during a snapshot, all in the one exported
    /// snapshot: together on the block ranges of a table, or on the chunks
    /// of different tables.
    #[serde(default = "default_snapshot_workers")]
    pub snapshot_workers: usize,
    /// Rows per snapshot chunk where tables are read by key (partitioned
    /// tables, incremental snapshots): the unit of progress a restart
    /// resumes from.
    #[serde(default = "default_snapshot_chunk_rows")]
    pub snapshot_chunk_rows: usize,
    /// Largest ctid block range the initial snapshot reads from a plain
    /// table in one query (`"32MiB"`; of the table's heap on disk): the
    /// unit of progress a restart resumes from. Smaller tables are cut
    /// finer, so that every worker gets a share.
    #[serde(
        default = "default_snapshot_range_size",
        deserialize_with = "walcast_sdk::size::deserialize"
    )]
    pub snapshot_range_size: usize,
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
    pub fn endpoints(&self) -> Result<Vec<Endpoint>, String> {
        let hosts: Vec<&str> = self.host.split(',').map(str::trim).collect();
        if hosts.iter().any(|h| h.is_empty()) {
            return Err(format!(
                "`host` = {:?} has an empty entry; list servers as \"host1,host2\"",
                self.host
            ));
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
            .map(|(h, port)| Endpoint {
                host: h.to_string(),
                port,
            })
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
fn default_snapshot_range_size() -> usize {
    DEFAULT_SNAPSHOT_RANGE_SIZE
}

fn yes() -> bool {
    true
}
fn default_host() -> String {
    DEFAULT_HOST.into()
}
fn default_status_interval() -> Duration {
    DEFAULT_STATUS_INTERVAL
}
fn default_connect_timeout() -> Duration {
    DEFAULT_CONNECT_TIMEOUT
}
fn default_receive_timeout() -> Duration {
    DEFAULT_RECEIVE_TIMEOUT
}
fn default_retry_max() -> Duration {
    DEFAULT_RETRY_MAX_BACKOFF
}

/// A source setting that breaks a rule: the field (under `source.`) and
/// what is wrong with it.
#[derive(Debug, thiserror::Error)]
#[error("postgres source: `{field}`: {problem}")]
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

impl PostgresSourceConfig {
    /// Checks what the file alone can tell; the server is checked at start
    /// (`walcast check`).
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.tables.is_empty() && self.schemas.is_empty() {
            return Err(bad(
                "tables",
                "list the tables to capture (`tables`) or whole schemas (`schemas`)",
            ));
        }
        for (field, list) in [
            ("tables", &self.tables),
            ("keyless_tables", &self.keyless_tables),
        ] {
            for t in list {
                if TableName::parse(t).is_none() {
                    return Err(bad(field, format!("`{t}` is not of the form schema.table")));
                }
            }
        }
        if let Err(m) = self.endpoints() {
            let field = if m.starts_with("`host`") {
                "host"
            } else {
                "port"
            };
            return Err(bad(field, m));
        }
        if self.password.is_some() && self.password_file.is_some() {
            return Err(bad(
                "password_file",
                "set `password` or `password_file`, not both",
            ));
        }
        if self.snapshot_workers == 0 {
            return Err(bad("snapshot_workers", "must be at least 1"));
        }
        if self.snapshot_chunk_rows == 0 {
            return Err(bad("snapshot_chunk_rows", "must be at least 1"));
        }
        if self.snapshot_range_size < 64 * 1024 {
            return Err(bad(
                "snapshot_range_size",
                "must be at least 64KiB (eight 8 kB pages)",
            ));
        }
        if self.status_interval.is_zero() {
            return Err(bad("status_interval", "must be positive"));
        }
        if self.receive_timeout < Duration::from_secs(2) {
            return Err(bad(
                "receive_timeout",
                "must be at least 2s (Postgres's wal_receiver_timeout defaults to 60s)",
            ));
        }
        Ok(())
    }

    /// The password, from `password` or read from `password_file` (trailing
    /// newline removed).
    pub fn password(&self) -> Result<Option<String>, std::io::Error> {
        if let Some(s) = &self.password {
            return Ok(Some(s.expose().to_string()));
        }
        match &self.password_file {
            Some(p) => Ok(Some(
                std::fs::read_to_string(p)?
                    .trim_end_matches(['\n', '\r'])
                    .to_string(),
            )),
            None => Ok(None),
        }
    }

    /// The tables listed in `tables`, parsed (a config that passed
    /// [`validate`](Self::validate) has only well-formed names).
    pub fn table_names(&self) -> Vec<TableName> {
        self.tables
            .iter()
            .filter_map(|t| TableName::parse(t))
            .collect()
    }

    /// The tables listed in `keyless_tables`, parsed.
    pub fn keyless_table_names(&self) -> Vec<TableName> {
        self.keyless_tables
            .iter()
            .filter_map(|t| TableName::parse(t))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> PostgresSourceConfig {
        toml::from_str(text).unwrap()
    }

    #[test]
    fn defaults_and_rules() {
        let c = parse("database = \"app\"\nuser = \"walcast\"\ntables = [\"public.orders\"]");
        assert_eq!(c.port, Ports::One(DEFAULT_PG_PORT));
        assert_eq!(c.host, DEFAULT_HOST);
        assert_eq!(c.status_interval, DEFAULT_STATUS_INTERVAL);
        assert_eq!(c.snapshot, SnapshotMode::Initial);
        c.validate().unwrap();
        assert_eq!(c.table_names(), vec![TableName::new("public", "orders")]);

        let e = parse("database = \"app\"\nuser = \"w\"\ntables = [\"orders\"]")
            .validate()
            .unwrap_err();
        assert_eq!(e.field, "tables");
        assert!(e.problem.contains("schema.table"), "{e}");

        let e = parse("database = \"app\"\nuser = \"w\"")
            .validate()
            .unwrap_err();
        assert_eq!(e.field, "tables");

        let e = parse(
            "database = \"app\"\nuser = \"w\"\nschemas = [\"s\"]\npassword = \"x\"\npassword_file = \"/p\"",
        )
        .validate()
        .unwrap_err();
        assert_eq!(e.field, "password_file");
    }

    #[test]
    fn the_password_never_prints() {
        let c = parse("database = \"app\"\nuser = \"w\"\nschemas = [\"s\"]\npassword = \"canary\"");
        assert!(!format!("{c:?}").contains("canary"));
        assert_eq!(c.password().unwrap().as_deref(), Some("canary"));
    }
}
