//! `walcast run`: the daemon. Loads the config, starts the admin server and
//! every pipeline, waits for a signal, drains.

use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use crate::config::{self, LogFormat};
use crate::{admin, pipeline};
use walcast_sdk::status::PipelineState;

fn init_logging(format: LogFormat, level: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let json = match format {
        LogFormat::Json => true,
        LogFormat::Human => false,
        LogFormat::Auto => !std::io::stderr().is_terminal(),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .init();
    } else {
        builder.init();
    }
}

pub(crate) async fn run(path: &std::path::Path) -> anyhow::Result<ExitCode> {
    let cfg = config::load(path)?;
    init_logging(cfg.log.format, &cfg.log.level);
    // Read before logging was set up; said now.
    for w in walcast_sdk::duration::take_deprecations() {
        tracing::warn!(config = %path.display(), "{w}");
    }
    let prometheus = admin::install_recorder();
    let shutdown = CancellationToken::new();
    // SIGTERM and SIGINT are caught from here on: a signal during start-up
    // (building the pipelines can take seconds) stops the daemon cleanly,
    // exit 0, instead of killing it by the signal's default action
    // (tests/capture.rs saw "signal: 15" from a daemon stopped just after
    // a restart).
    {
        let signals = Signals::install();
        let sd = shutdown.clone();
        tokio::spawn(async move {
            signals.wait().await;
            tracing::info!("shutting down: draining in-flight events");
            sd.cancel();
        });
    }

    if let Some(reg) = &cfg.embedded_registry {
        let registry = std::sync::Arc::new(
            walcast_schemas::EmbeddedRegistry::open(&reg.dir)
                .with_context(|| format!("embedded_registry.dir = {}", reg.dir.display()))?,
        );
        if let Some(listen) = &reg.listen {
            // Bound before any pipeline starts: schemas register on the first event.
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .with_context(|| format!("embedded_registry.listen = {listen}"))?;
            let sd = shutdown.clone();
            tokio::spawn(async move {
                if let Err(e) = walcast_schemas::server::serve(registry, listener, async move {
                    sd.cancelled().await
                })
                .await
                {
                    tracing::error!(error = %e, "embedded schema registry stopped");
                }
            });
        }
    }
    let mut runnables = Vec::new();
    for (name, p) in &cfg.pipelines {
        runnables.push(pipeline::build(name, p).await?);
    }
    let statuses: Vec<_> = runnables.iter().map(|r| r.status.clone()).collect();
    let managed: Vec<_> = runnables
        .iter()
        .map(|r| {
            let capture = r.capture_settings().map(|settings| crate::manage::Capture {
                name: r.name.clone(),
                settings: settings.clone(),
            });
            (r.status.clone(), capture)
        })
        .collect();

    if let Some(addr) = cfg.admin.address() {
        let addr = addr.context("admin.listen")?;
        let security = admin::Security::load(&cfg.admin)?;
        let daemon = std::sync::Arc::new(admin::api::Daemon {
            pipelines: managed,
            config: path.to_path_buf(),
            token: security.token.is_some(),
            loopback: addr.ip().is_loopback(),
        });
        let (p, s, sd) = (prometheus.clone(), daemon, shutdown.clone());
        let listener_check = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on admin.listen = {addr}"))?;
        drop(listener_check);
        tokio::spawn(async move {
            if let Err(e) = admin::serve(addr, p, s, security, sd).await {
                tracing::error!(error = %e, "admin HTTP server stopped");
            }
        });
    }

    tokio::spawn(systemd_notify(statuses.clone(), shutdown.clone()));

    let mut tasks = tokio::task::JoinSet::new();
    for r in runnables {
        let sd = shutdown.clone();
        let name = r.name.clone();
        tasks.spawn(async move { (name, r.run(sd).await) });
    }
    let mut failed = false;
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok((name, Err(e))) => {
                tracing::error!(pipeline = %name, error = %e, "pipeline stopped");
                failed = true;
                // One definite failure stops the daemon, so a supervisor
                // restarts it and the operator sees it.
                shutdown.cancel();
            }
            Ok((_, Ok(()))) => {}
            Err(e) => {
                tracing::error!(error = %e, "pipeline task panicked");
                failed = true;
                shutdown.cancel();
            }
        }
    }
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// SIGTERM and SIGINT, registered when made (not when first awaited).
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> Signals {
        use tokio::signal::unix::{signal, SignalKind};
        Signals {
            term: signal(SignalKind::terminate()).expect("SIGTERM handler"),
            int: signal(SignalKind::interrupt()).expect("SIGINT handler"),
        }
    }

    async fn wait(mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}

/// READY=1 once every pipeline streams; WATCHDOG=1 while the process runs.
async fn systemd_notify(statuses: Vec<walcast_sdk::StatusHandle>, shutdown: CancellationToken) {
    let watchdog = sd_notify::watchdog_enabled();
    let period = watchdog.map(|d| d / 2).unwrap_or(Duration::from_secs(1));
    let mut ready = false;
    let mut tick = tokio::time::interval(period.min(Duration::from_secs(1)));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        // A snapshot can take hours; it is progress, not a failed start, so
        // it must not run into systemd's start timeout.
        if !ready
            && statuses.iter().all(|s| {
                matches!(
                    s.snapshot().state,
                    PipelineState::Streaming | PipelineState::Snapshotting | PipelineState::Paused
                )
            })
        {
            ready = true;
            let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
            tracing::info!("all pipelines streaming");
        }
        if watchdog.is_some() {
            let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
        }
    }
}
