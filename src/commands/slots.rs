//! `walcast slots list|drop`: the replication slots of the config's source
//! clusters, and dropping a decommissioned pipeline's slot. Through the
//! daemon's management API when one answers (it knows which pipelines
//! run); otherwise directly against Postgres with the config, saying so.

use std::process::ExitCode;

use anyhow::Context;

use crate::cli::DaemonArgs;
use crate::commands::daemon::{self, Reply};
use crate::config::PipelineConfig;

/// Asks the daemon; `Err(why)` when none answers.
async fn ask(
    args: &DaemonArgs,
    cfg: Option<&crate::config::Config>,
    path: &str,
    body: Option<serde_json::Value>,
) -> anyhow::Result<Result<(u16, serde_json::Value), String>> {
    Ok(match daemon::connect(args, cfg)? {
        Some(d) => match d.call(path, body).await? {
            Reply::Answered(code, v) => Ok((code, v)),
            Reply::Unreachable(why) => {
                Err(format!("no walcast daemon answers at {} ({why})", d.base))
            }
        },
        None => Err("the config disables the admin server".into()),
    })
}

pub(crate) async fn list(args: &DaemonArgs, json: bool) -> anyhow::Result<ExitCode> {
    let cfg = daemon::load_config(args)?;
    let v = match ask(args, cfg.as_ref(), "/slots", None).await? {
        Ok((code, v)) if (200..300).contains(&code) => v,
        Ok((code, v)) => return daemon::finish(code, &v),
        Err(why) => {
            let (cfg, _) = daemon::required(cfg.as_ref(), args.config.as_deref(), &why)?;
            eprintln!("{why}: reading the slots from Postgres directly");
            let captures = daemon::captures(cfg)?;
            let slots = crate::manage::list_slots(&captures, &|_| None).await?;
            serde_json::json!({ "slots": slots })
        }
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<32} {:<9} {:<7} {:<14} {:>16} {:<11} {:<16} SOURCE",
        "SLOT", "PLUGIN", "ACTIVE", "CONFIRMED", "RETAINED_BYTES", "WAL_STATUS", "PIPELINE"
    );
    for s in v["slots"].as_array().into_iter().flatten() {
        let text = |k: &str| s[k].as_str().unwrap_or("-").to_string();
        println!(
            "{:<32} {:<9} {:<7} {:<14} {:>16} {:<11} {:<16} {}/{}",
            text("slot"),
            text("plugin"),
            s["active"].as_bool().unwrap_or(false),
            text("confirmed_flush_lsn"),
            s["retained_wal_bytes"]
                .as_i64()
                .map(|b| b.to_string())
                .unwrap_or_else(|| "-".into()),
            text("wal_status"),
            match (s["pipeline"].as_str(), s["pipeline_state"].as_str()) {
                (Some(p), Some(st)) => format!("{p} ({st})"),
                (Some(p), None) => p.to_string(),
                _ => "-".into(),
            },
            text("source"),
            text("database"),
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub(crate) async fn drop(
    args: &DaemonArgs,
    slot: Option<&str>,
    pipeline: Option<&str>,
    confirm: Option<&str>,
    source: Option<&str>,
) -> anyhow::Result<ExitCode> {
    let cfg = daemon::load_config(args)?;
    // A pipeline of the config names its slot (and its cluster).
    let (slot, source) = match (slot, pipeline) {
        (Some(s), _) => (s.to_string(), source.map(String::from)),
        (None, Some(p)) => {
            let (cfg, path) = daemon::required(
                cfg.as_ref(),
                args.config.as_deref(),
                &format!("--pipeline {p} is looked up in the config"),
            )?;
            let c = match cfg.pipelines.get(p) {
                Some(PipelineConfig::Capture(c)) => c,
                Some(PipelineConfig::Relay(_)) => {
                    anyhow::bail!("pipeline {p} is a relay; it has no replication slot")
                }
                None => anyhow::bail!("no pipeline named {p} in {}", path.display()),
            };
            let s = crate::pipeline::capture_settings(p, c)?;
            (s.wanted.slot, Some(source.unwrap_or(p).to_string()))
        }
        (None, None) => anyhow::bail!("name the slot to drop, or its pipeline with --pipeline"),
    };
    let body = serde_json::json!({ "slot": slot, "confirm": confirm, "source": source });
    match ask(args, cfg.as_ref(), "/slots/drop", Some(body)).await? {
        Ok((code, v)) => daemon::finish(code, &v),
        Err(why) => {
            let (cfg, _) = daemon::required(cfg.as_ref(), args.config.as_deref(), &why)?;
            println!("{why}: dropping the slot in Postgres directly");
            let captures = daemon::captures(cfg)?;
            let done =
                crate::manage::drop_slot(&captures, &|_| None, &slot, confirm, source.as_deref())
                    .await
                    .context("walcast slots drop")?;
            println!("{}", done.message);
            Ok(ExitCode::SUCCESS)
        }
    }
}
