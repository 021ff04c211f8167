//! `walcast snapshot`: asks a running capture for an incremental snapshot (or
//! to stop one). Through the daemon's management API when one answers;
//! otherwise by writing the signal through Postgres directly (the daemon
//! reads it from its stream when it runs), saying so.

use std::process::ExitCode;

use anyhow::Context;

use crate::cli::DaemonArgs;
use crate::commands::daemon::{self, Reply};
use crate::config::PipelineConfig;

pub(crate) async fn snapshot(
    args: &DaemonArgs,
    pipeline: Option<&str>,
    stop: bool,
    tables: &[String],
) -> anyhow::Result<ExitCode> {
    if tables.is_empty() && !stop {
        anyhow::bail!("name at least one table to snapshot (schema.table), or --stop");
    }
    let cfg = daemon::load_config(args)?;
    let name = match (pipeline, &cfg) {
        (Some(n), _) => n.to_string(),
        (None, Some(c)) => {
            let captures: Vec<&String> = c
                .pipelines
                .iter()
                .filter(|(_, p)| matches!(p, PipelineConfig::Capture(_)))
                .map(|(n, _)| n)
                .collect();
            match captures.as_slice() {
                [one] => one.to_string(),
                _ => anyhow::bail!(
                    "the config has {} capture pipelines ({}); choose one with --pipeline",
                    captures.len(),
                    captures
                        .iter()
                        .map(|s| s.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            }
        }
        (None, None) => anyhow::bail!("name the pipeline with --pipeline (or pass --config)"),
    };
    let why = match daemon::connect(args, cfg.as_ref())? {
        Some(d) => {
            let (path, body) = if stop {
                (
                    format!("/pipelines/{name}/snapshot/stop"),
                    serde_json::json!({}),
                )
            } else {
                (
                    format!("/pipelines/{name}/snapshot"),
                    serde_json::json!({ "tables": tables }),
                )
            };
            match d.call(&path, Some(body)).await? {
                Reply::Answered(code, v) => return daemon::finish(code, &v),
                Reply::Unreachable(why) => {
                    format!("no walcast daemon answers at {} ({why})", d.base)
                }
            }
        }
        None => "the config disables the admin server".to_string(),
    };
    let (cfg, path) = daemon::required(cfg.as_ref(), args.config.as_deref(), &why)?;
    println!("{why}: writing the snapshot signal through Postgres directly");
    let p = cfg
        .pipelines
        .get(&name)
        .with_context(|| format!("no pipeline named {name} in {}", path.display()))?;
    let PipelineConfig::Capture(c) = p else {
        anyhow::bail!("pipeline {name} is a relay; snapshots read Postgres tables")
    };
    let capture = crate::manage::Capture {
        name: name.clone(),
        settings: crate::pipeline::capture_settings(&name, c)?,
    };
    let done = crate::manage::request_snapshot(&capture, path, stop, tables).await?;
    println!("{}", done.message);
    Ok(ExitCode::SUCCESS)
}
