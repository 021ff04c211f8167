//! `walcast snapshot`: asks a running capture for an incremental snapshot (or
//! to stop one) through its signal.

use std::process::ExitCode;

use anyhow::Context;

use crate::config::{self, PipelineConfig};
use crate::pipeline;
use walcast_postgres as capture;
use walcast_sdk::TableName;

/// `walcast snapshot`: checks the tables are captured and in the
/// publication, then writes the signal the daemon reads from its stream.
pub(crate) async fn snapshot_signal(
    path: &std::path::Path,
    pipeline: Option<&str>,
    stop: bool,
    tables: &[String],
) -> anyhow::Result<ExitCode> {
    use capture::incremental::{send_signal, Signal};
    if tables.is_empty() && !stop {
        anyhow::bail!("name at least one table to snapshot (schema.table), or --stop");
    }
    let cfg = config::load(path)?;
    let captures: Vec<&String> = cfg
        .pipelines
        .iter()
        .filter(|(_, p)| matches!(p, PipelineConfig::Capture(_)))
        .map(|(n, _)| n)
        .collect();
    let name = match pipeline {
        Some(n) => n.to_string(),
        None if captures.len() == 1 => captures[0].clone(),
        None => anyhow::bail!(
            "{} has {} capture pipelines ({}); choose one with --pipeline",
            path.display(),
            captures.len(),
            captures
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let p = cfg
        .pipelines
        .get(&name)
        .with_context(|| format!("no pipeline named {name} in {}", path.display()))?;
    let PipelineConfig::Capture(c) = p else {
        anyhow::bail!("pipeline {name} is a relay; snapshots read Postgres tables")
    };
    let s = pipeline::capture_settings(&name, c)?;
    let client = capture::catalog::connect(&s.connect).await?;
    let mut names = Vec::new();
    for t in tables {
        let wanted = TableName::parse(t)
            .or_else(|| (!t.contains('.')).then(|| TableName::new("public", t)))
            .with_context(|| format!("{t} is not a table name (schema.table)"))?;
        let qualified = wanted.to_string();
        let captured =
            s.wanted.tables.contains(&wanted) || s.wanted.schemas.contains(&wanted.schema);
        if !captured {
            anyhow::bail!(
                "pipeline {name} does not capture {qualified}: add it to `source.tables` in {} and restart walcast \
                 (it adds the table to the publication and streams its changes), then run this command again",
                path.display()
            );
        }
        let published = client
            .query_opt(
                "SELECT 1 FROM pg_publication_tables WHERE pubname = $1 AND schemaname = $2 AND tablename = $3",
                &[&s.wanted.publication, &wanted.schema, &wanted.name],
            )
            .await?
            .is_some();
        if !published {
            anyhow::bail!(
                "{qualified} is not in publication {} yet, so its changes are not streamed: restart walcast with the \
                 updated config (it adds the table) or run ALTER PUBLICATION {} ADD TABLE {}, then run this command again",
                s.wanted.publication,
                walcast_sdk::table::quote_ident(&s.wanted.publication),
                wanted.quoted(),
            );
        }
        // Quoted where needed, so the daemon splits it back the same way.
        names.push(wanted.to_config_string());
    }
    let signal = Signal {
        kind: if stop {
            "stop-snapshot"
        } else {
            "execute-snapshot"
        }
        .into(),
        pipeline: Some(name.clone()),
        tables: names.clone(),
    };
    let lsn = send_signal(&client, &signal).await?;
    if stop {
        println!("asked pipeline {name} to stop its incremental snapshot (signal at LSN {lsn})");
    } else {
        println!(
            "asked pipeline {name} to snapshot {} (signal at LSN {lsn}); a running walcast picks it up from its \
             replication stream, a stopped one when it starts. Progress: `walcast status`",
            names.join(", ")
        );
    }
    Ok(ExitCode::SUCCESS)
}
