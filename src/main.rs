//! walcast: Postgres change data capture as one small daemon.
//!
//! The binary wires the pieces together from the config file: each
//! pipeline's source (a Postgres slot) and sinks (Kafka, Redis, OpenSearch,
//! files), the admin HTTP server, logging, and systemd notification.

mod admin;
mod cli;
mod commands;
mod config;
mod manage;
mod pipeline;

/// mimalloc instead of glibc malloc: allocation was about a fifth of the
/// capture path's CPU time under glibc, and its per-thread arenas let RSS
/// creep on long runs (tests/bench/RESULTS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::process::ExitCode;

use clap::Parser;

use cli::{Cli, Command, SlotsCommand};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match runtime.block_on(dispatch(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("walcast: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Run { config } => commands::run::run(&config).await,
        Command::Check { config, offline } => commands::check::check(&config, offline).await,
        Command::Status {
            admin,
            token_file,
            ca_file,
        } => commands::status::status(&admin, token_file.as_deref(), ca_file.as_deref()).await,
        Command::Tail {
            topic,
            bootstrap_servers,
            registry,
            from_beginning,
            max,
            idle_timeout,
        } => {
            commands::tail::tail(
                &topic,
                &bootstrap_servers,
                registry.as_deref(),
                from_beginning,
                max,
                idle_timeout,
            )
            .await
        }
        Command::Pause { pipeline, daemon } => {
            commands::pause::pause(&daemon, &pipeline, true).await
        }
        Command::Resume { pipeline, daemon } => {
            commands::pause::pause(&daemon, &pipeline, false).await
        }
        Command::Snapshot {
            daemon,
            pipeline,
            stop,
            tables,
        } => commands::snapshot::snapshot(&daemon, pipeline.as_deref(), stop, &tables).await,
        Command::Slots {
            command: SlotsCommand::List { daemon, json },
        } => commands::slots::list(&daemon, json).await,
        Command::Slots {
            command:
                SlotsCommand::Drop {
                    slot,
                    pipeline,
                    confirm,
                    source,
                    daemon,
                },
        } => {
            commands::slots::drop(
                &daemon,
                slot.as_deref(),
                pipeline.as_deref(),
                confirm.as_deref(),
                source.as_deref(),
            )
            .await
        }
    }
}
