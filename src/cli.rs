//! Command-line interface.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "walcast",
    version,
    about = "Postgres change data capture to Kafka, Redis and OpenSearch"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run every pipeline of the config file until SIGTERM/SIGINT.
    Run {
        #[arg(short, long, env = "WALCAST_CONFIG")]
        config: PathBuf,
    },
    /// Validate the config file, connect to each source and report what
    /// `run` would create (slot, publication), creating nothing.
    Check {
        #[arg(short, long, env = "WALCAST_CONFIG")]
        config: PathBuf,
        /// Only parse and validate the file; connect to nothing.
        #[arg(long)]
        offline: bool,
    },
    /// Show a running daemon's pipelines: state, positions, lag.
    Status {
        /// The daemon's admin address (`host:port`, or `https://host:port`
        /// when the admin server has `tls`).
        #[arg(long, default_value = crate::config::DEFAULT_ADMIN_LISTEN)]
        admin: String,
        /// The file holding the admin server's bearer token (`admin.token_file`).
        #[arg(long, env = "WALCAST_ADMIN_TOKEN_FILE")]
        token_file: Option<std::path::PathBuf>,
        /// A PEM CA to trust for an https admin address.
        #[arg(long)]
        ca_file: Option<std::path::PathBuf>,
    },
    /// Print the events of a topic as JSON lines (Avro decoded through the
    /// registry), what users otherwise do with kcat and a registry client.
    Tail {
        /// The topic (`<prefix>.<schema>.<table>`).
        topic: String,
        #[arg(
            long,
            env = "WALCAST_KAFKA_BOOTSTRAP",
            default_value = "127.0.0.1:9092"
        )]
        bootstrap_servers: String,
        /// Confluent-compatible registry URL, for Avro topics.
        #[arg(long, env = "WALCAST_REGISTRY_URL")]
        registry: Option<String>,
        /// Start from the beginning of the topic instead of its end.
        #[arg(long)]
        from_beginning: bool,
        /// Stop after this many events.
        #[arg(long)]
        max: Option<usize>,
        /// Stop when no record arrives for this long (e.g. `5s`).
        #[arg(long, value_parser = humantime::parse_duration)]
        idle_timeout: Option<std::time::Duration>,
    },
    /// Read tables' existing rows into a running pipeline (an incremental
    /// snapshot, op `r`, while changes keep streaming). Sends the request
    /// through Postgres (a logical decoding message on the pipeline's
    /// source), so it reaches the daemon through its replication stream.
    Snapshot {
        #[arg(short, long, env = "WALCAST_CONFIG")]
        config: PathBuf,
        /// The capture pipeline; optional when the config has only one.
        #[arg(long)]
        pipeline: Option<String>,
        /// Forget every table still queued instead (stop-snapshot).
        #[arg(long, conflicts_with = "tables")]
        stop: bool,
        /// Tables to read, `schema.table` (`table` alone means
        /// `public.table`); they must be captured by the pipeline.
        tables: Vec<String>,
    },
    /// Manage replication slots.
    Slots {
        #[command(subcommand)]
        command: SlotsCommand,
    },
}

#[derive(Debug, Subcommand)]
pub enum SlotsCommand {
    /// Drop the slot of a pipeline (after decommissioning it: the WAL it
    /// retained is released and its position is lost).
    Drop {
        #[arg(short, long, env = "WALCAST_CONFIG")]
        config: PathBuf,
        /// The pipeline whose slot to drop.
        #[arg(long)]
        pipeline: String,
    },
}
