//! `walcast slots drop`: drops a decommissioned pipeline's replication slot and
//! its snapshot state.

use std::process::ExitCode;

use anyhow::Context;

use crate::config::{self, PipelineConfig};
use crate::pipeline;
use walcast_postgres as capture;

pub(crate) async fn slots_drop(path: &std::path::Path, name: &str) -> anyhow::Result<ExitCode> {
    let cfg = config::load(path)?;
    let p = cfg
        .pipelines
        .get(name)
        .with_context(|| format!("no pipeline named {name} in {}", path.display()))?;
    let PipelineConfig::Capture(c) = p else {
        anyhow::bail!("pipeline {name} is a relay; it has no replication slot")
    };
    let s = pipeline::capture_settings(name, c)?;
    let client = capture::catalog::connect(&s.connect).await?;
    if capture::setup::drop_slot(&client, &s.wanted.slot).await? {
        println!("dropped replication slot {}", s.wanted.slot);
        // A snapshot's progress belongs to the slot it started with.
        for state in [&s.snapshot.state_path, &s.snapshot.incremental_state_path] {
            if std::fs::remove_file(state).is_ok() {
                println!("removed snapshot state {}", state.display());
            }
        }
    } else {
        println!("replication slot {} does not exist", s.wanted.slot);
    }
    Ok(ExitCode::SUCCESS)
}
