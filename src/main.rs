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

/// mimalloc's defaults favour speed over resident memory: freed pages are
/// handed back to the OS after a delay, arenas are committed eagerly, and
/// transparent huge pages round the heap up in 2 MiB steps. Catching up a
/// backlog, those held 30-50 MiB of freed memory on top of what was in
/// flight (peak RSS 87-100 MiB with the defaults, 60-66 MiB with these
/// three settings; CPU per event unchanged within the noise: the experiment
/// is in tests/bench/RESULTS.md, 2026-12-06). A `MIMALLOC_*` variable in
/// the environment still wins, for whoever wants mimalloc's defaults back.
#[allow(unsafe_code)]
fn tune_allocator() {
    use libmimalloc_sys::mi_option_set;
    // The option numbers of the mimalloc v3 header libmimalloc-sys builds by default.
    const _: () = assert!(
        libmimalloc_sys::_mi_option_last == 47,
        "mimalloc option numbers changed"
    );
    const ARENA_EAGER_COMMIT: libmimalloc_sys::mi_option_t = 4;
    const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    for (option, var, value) in [
        (PURGE_DELAY, "MIMALLOC_PURGE_DELAY", 0),
        (ARENA_EAGER_COMMIT, "MIMALLOC_ARENA_EAGER_COMMIT", 0),
    ] {
        if std::env::var_os(var).is_none() {
            // SAFETY: mi_option_set stores a number in mimalloc's option
            // table; it is called here before any other thread exists.
            unsafe { mi_option_set(option, value) };
        }
    }
}

use std::process::ExitCode;

use clap::Parser;

use cli::{Cli, Command, SlotsCommand};

fn main() -> ExitCode {
    tune_allocator();
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
