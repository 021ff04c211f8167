//! Command-line interface.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "walcast", version, about = "Postgres change data capture to Kafka, Redis and OpenSearch")]
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
        /// The daemon's admin address.
        #[arg(long, default_value = crate::config::DEFAULT_ADMIN_LISTEN)]
        admin: String,
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
