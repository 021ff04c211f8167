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
    /// Pause a capture pipeline of a running daemon: it stops reading, its
    /// slot holds its position (the server keeps the WAL) and the lag keeps
    /// being reported. Not kept across a restart of the daemon.
    Pause {
        /// The pipeline.
        pipeline: String,
        #[command(flatten)]
        daemon: DaemonArgs,
    },
    /// Resume a paused pipeline: it reads on from where it stopped.
    Resume {
        /// The pipeline.
        pipeline: String,
        #[command(flatten)]
        daemon: DaemonArgs,
    },
    /// Read tables' existing rows into a running pipeline (an incremental
    /// snapshot, op `r`, while changes keep streaming). Asks the daemon
    /// (management API); when none answers, writes the request through
    /// Postgres itself (a logical decoding message on the pipeline's
    /// source), which a daemon picks up from its stream when it starts.
    Snapshot {
        #[command(flatten)]
        daemon: DaemonArgs,
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

/// How a command reaches a running daemon's management API.
#[derive(Debug, clap::Args)]
pub struct DaemonArgs {
    /// The config file: the daemon's admin address (`admin.listen`) and
    /// token (`admin.token_file`) come from it, and the commands that can
    /// act without a daemon use its sources.
    #[arg(short, long, env = "WALCAST_CONFIG")]
    pub config: Option<PathBuf>,
    /// The daemon's admin address (`host:port`, or `https://host:port`),
    /// instead of the config's `admin.listen`.
    #[arg(long)]
    pub admin: Option<String>,
    /// The file holding the admin token, instead of the config's
    /// `admin.token_file`.
    #[arg(long, env = "WALCAST_ADMIN_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// A PEM CA to trust for an https admin address.
    #[arg(long)]
    pub ca_file: Option<PathBuf>,
    /// Who is acting, for the daemon's audit log (default: $USER).
    #[arg(long)]
    pub actor: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum SlotsCommand {
    /// The replication slots of the config's source clusters: plugin,
    /// activity, confirmed position, WAL retained, owning pipeline.
    List {
        #[command(flatten)]
        daemon: DaemonArgs,
        /// Print the JSON answer instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Drop a replication slot no running pipeline uses (after
    /// decommissioning a pipeline: the WAL it retained is released and
    /// its position is lost). The slot's name must be repeated with
    /// `--confirm`.
    Drop {
        /// The slot; or name its pipeline with --pipeline.
        #[arg(required_unless_present = "pipeline")]
        slot: Option<String>,
        /// The pipeline (of the config) whose slot to drop.
        #[arg(long)]
        pipeline: Option<String>,
        /// The slot's name again, to confirm.
        #[arg(long)]
        confirm: Option<String>,
        /// A pipeline reading the cluster that holds the slot, when
        /// several source clusters have a slot of that name.
        #[arg(long)]
        source: Option<String>,
        #[command(flatten)]
        daemon: DaemonArgs,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_cli_is_consistent_and_the_management_commands_parse() {
        Cli::command().debug_assert();
        let cli = Cli::try_parse_from([
            "walcast",
            "slots",
            "drop",
            "walcast_old",
            "--confirm",
            "walcast_old",
            "-c",
            "w.toml",
        ])
        .unwrap();
        assert!(matches!(
            cli.command,
            Command::Slots {
                command: SlotsCommand::Drop { slot: Some(ref s), confirm: Some(ref c), .. }
            } if s == "walcast_old" && c == "walcast_old"
        ));
        // A slot or a pipeline is needed.
        assert!(Cli::try_parse_from(["walcast", "slots", "drop", "--confirm", "x"]).is_err());
        let cli = Cli::try_parse_from([
            "walcast",
            "pause",
            "orders",
            "--admin",
            "https://h:9187",
            "--actor",
            "alice",
        ])
        .unwrap();
        assert!(matches!(
            cli.command,
            Command::Pause { ref pipeline, ref daemon }
                if pipeline == "orders" && daemon.actor.as_deref() == Some("alice")
        ));
        assert!(Cli::try_parse_from(["walcast", "snapshot", "--stop", "t"]).is_err());
    }
}
