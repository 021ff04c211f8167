//! Management actions on pipelines and replication slots: what the admin
//! server's `/api/v1` does (see [`crate::admin::api`]), and what the
//! `walcast snapshot` / `walcast slots` commands fall back to when no
//! daemon answers. One implementation, so the checks and the messages are
//! the same whichever way an operator asks.
//!
//! - An incremental snapshot request is a signal written through Postgres
//!   (a logical decoding message, see `walcast_postgres::incremental`):
//!   the daemon picks it up from its own replication stream, in order with
//!   the changes, exactly as when the command writes it directly. Going
//!   through the daemon only adds the audit line and the token.
//! - Slots are cluster-wide in Postgres: they are listed per source
//!   cluster (the capture pipelines' endpoints), with the database each
//!   belongs to and the pipeline of this config that owns it.
//! - Dropping a slot loses its position for good, so the request repeats
//!   the slot's name, and a slot a running pipeline owns is refused: the
//!   pipeline would stop on the vanished slot (it never recreates one it
//!   streamed from).
//!
//! Errors are classified by what the caller can do: a bad request (fix it
//! and ask again), a conflict (change the state first: stop the pipeline),
//! not found, or Postgres unavailable (transient: ask again later).

use std::collections::BTreeMap;
use std::path::Path;

use serde::Serialize;
use walcast_postgres as capture;
use walcast_postgres::stream::CaptureSettings;
use walcast_sdk::status::PipelineState;
use walcast_sdk::TableName;

#[derive(Debug, thiserror::Error)]
pub enum ManageError {
    /// The request itself is wrong (a missing confirmation, a table the
    /// pipeline does not capture): fix it and ask again.
    #[error("{0}")]
    BadRequest(String),
    /// Refused in the current state (a slot in use): change that first.
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    NotFound(String),
    /// Postgres could not be reached or failed a query; `transient` says
    /// whether asking again may help.
    #[error("{message}")]
    Postgres { message: String, transient: bool },
}

impl ManageError {
    /// The HTTP status the admin API answers with.
    pub fn http_status(&self) -> u16 {
        match self {
            ManageError::BadRequest(_) => 400,
            ManageError::Conflict(_) => 409,
            ManageError::NotFound(_) => 404,
            ManageError::Postgres {
                transient: true, ..
            } => 503,
            ManageError::Postgres { .. } => 502,
        }
    }

    fn catalog(what: &str, e: capture::catalog::CatalogError) -> Self {
        ManageError::Postgres {
            transient: e.is_transient(),
            message: format!("{what}: {e}"),
        }
    }

    fn query(what: &str, e: tokio_postgres::Error) -> Self {
        ManageError::Postgres {
            // A lost connection may come back; an SQL error will not.
            transient: e.as_db_error().is_none(),
            message: format!("{what}: {e}"),
        }
    }
}

/// A capture pipeline as the management actions see it.
#[derive(Clone)]
pub struct Capture {
    pub name: String,
    pub settings: CaptureSettings,
}

/// What a snapshot request did.
#[derive(Debug, Serialize)]
pub struct SnapshotRequested {
    pub pipeline: String,
    /// `execute-snapshot` or `stop-snapshot`.
    pub signal: &'static str,
    pub tables: Vec<String>,
    /// Where the signal is in the WAL.
    pub lsn: String,
    pub message: String,
}

/// Checks the tables are captured by the pipeline and in its publication,
/// then writes the signal its capture reads from the stream. `config`
/// names the config file in the messages.
pub async fn request_snapshot(
    c: &Capture,
    config: &Path,
    stop: bool,
    tables: &[String],
) -> Result<SnapshotRequested, ManageError> {
    use capture::incremental::{send_signal, Signal};
    let (name, s) = (&c.name, &c.settings);
    if tables.is_empty() && !stop {
        return Err(ManageError::BadRequest(format!(
            "name at least one table of pipeline {name} to snapshot (schema.table)"
        )));
    }
    let client = capture::catalog::connect(&s.connect)
        .await
        .map_err(|e| ManageError::catalog(&format!("pipeline {name}"), e))?;
    let mut names = Vec::new();
    for t in tables {
        let wanted = TableName::parse(t)
            .or_else(|| (!t.contains('.')).then(|| TableName::new("public", t)))
            .ok_or_else(|| {
                ManageError::BadRequest(format!("{t} is not a table name (schema.table)"))
            })?;
        let qualified = wanted.to_string();
        let captured =
            s.wanted.tables.contains(&wanted) || s.wanted.schemas.contains(&wanted.schema);
        if !captured {
            return Err(ManageError::BadRequest(format!(
                "pipeline {name} does not capture {qualified}: add it to `source.tables` in {} and restart walcast \
                 (it adds the table to the publication and streams its changes), then ask again",
                config.display()
            )));
        }
        let published = client
            .query_opt(
                "SELECT 1 FROM pg_publication_tables WHERE pubname = $1 AND schemaname = $2 AND tablename = $3",
                &[&s.wanted.publication, &wanted.schema, &wanted.name],
            )
            .await
            .map_err(|e| ManageError::query(&format!("publication {}", s.wanted.publication), e))?
            .is_some();
        if !published {
            return Err(ManageError::Conflict(format!(
                "{qualified} is not in publication {} yet, so its changes are not streamed: restart walcast with the \
                 updated config (it adds the table) or run ALTER PUBLICATION {} ADD TABLE {}, then ask again",
                s.wanted.publication,
                walcast_sdk::table::quote_ident(&s.wanted.publication),
                wanted.quoted(),
            )));
        }
        // Quoted where needed, so the daemon splits it back the same way.
        names.push(wanted.to_config_string());
    }
    let kind = if stop {
        "stop-snapshot"
    } else {
        "execute-snapshot"
    };
    let signal = Signal {
        kind: kind.into(),
        pipeline: Some(name.clone()),
        tables: names.clone(),
    };
    let lsn = send_signal(&client, &signal)
        .await
        .map_err(|e| ManageError::Postgres {
            transient: e.is_transient(),
            message: format!("pipeline {name}: writing the snapshot signal: {e}"),
        })?;
    let message = if stop {
        format!("asked pipeline {name} to stop its incremental snapshot (signal at LSN {lsn})")
    } else {
        format!(
            "asked pipeline {name} to snapshot {} (signal at LSN {lsn}); a running walcast picks it up from its \
             replication stream, a stopped one when it starts. Progress: `walcast status`",
            names.join(", ")
        )
    };
    Ok(SnapshotRequested {
        pipeline: name.clone(),
        signal: kind,
        tables: names,
        lsn: lsn.to_string(),
        message,
    })
}

/// One replication slot of a source cluster.
#[derive(Debug, Serialize)]
pub struct Slot {
    pub slot: String,
    /// The output plugin (`pgoutput`); none for a physical slot.
    pub plugin: Option<String>,
    /// `logical` or `physical`.
    pub slot_type: String,
    /// The database of a logical slot.
    pub database: Option<String>,
    pub active: bool,
    pub active_pid: Option<i32>,
    pub temporary: bool,
    pub confirmed_flush_lsn: Option<String>,
    pub restart_lsn: Option<String>,
    /// WAL the server keeps for the slot: its current position minus
    /// `restart_lsn`.
    pub retained_wal_bytes: Option<i64>,
    /// `reserved`, `extended`, `unreserved` or `lost`.
    pub wal_status: Option<String>,
    /// The capture pipeline of this config that streams from it.
    pub pipeline: Option<String>,
    /// That pipeline's state in the daemon (none without a daemon).
    pub pipeline_state: Option<PipelineState>,
    /// The cluster, as the pipelines of this config reach it
    /// (`host:port`, the first endpoint).
    pub source: String,
}

/// The capture pipelines grouped by the cluster they read (slots are
/// cluster-wide): the first endpoint names it.
fn clusters(captures: &[Capture]) -> BTreeMap<String, Vec<&Capture>> {
    let mut out: BTreeMap<String, Vec<&Capture>> = BTreeMap::new();
    for c in captures {
        let key = c
            .settings
            .connect
            .endpoints
            .iter()
            .map(|e| e.to_string())
            .collect::<Vec<_>>()
            .join(",");
        out.entry(key).or_default().push(c);
    }
    out
}

const SLOTS_QUERY: &str = "SELECT slot_name::text, plugin::text, slot_type::text, database::text, active, active_pid,
        temporary, confirmed_flush_lsn::text, restart_lsn::text,
        ((CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_lsn() END) - restart_lsn)::bigint,
        wal_status::text
 FROM pg_replication_slots ORDER BY slot_name";

/// The slots of every cluster the config's capture pipelines read, with
/// their owner; `state` gives a pipeline's state in the running daemon.
pub async fn list_slots(
    captures: &[Capture],
    state: &(dyn Fn(&str) -> Option<PipelineState> + Sync),
) -> Result<Vec<Slot>, ManageError> {
    let mut out = Vec::new();
    for (source, group) in clusters(captures) {
        out.extend(cluster_slots(&source, &group, state).await?);
    }
    Ok(out)
}

async fn cluster_slots(
    source: &str,
    group: &[&Capture],
    state: &(dyn Fn(&str) -> Option<PipelineState> + Sync),
) -> Result<Vec<Slot>, ManageError> {
    let first = group[0];
    let client = capture::catalog::connect(&first.settings.connect)
        .await
        .map_err(|e| {
            ManageError::catalog(&format!("source {source} (pipeline {})", first.name), e)
        })?;
    let rows = client
        .query(SLOTS_QUERY, &[])
        .await
        .map_err(|e| ManageError::query(&format!("source {source}: pg_replication_slots"), e))?;
    Ok(rows
        .iter()
        .map(|r| {
            let slot: String = r.get(0);
            let database: Option<String> = r.get(3);
            let owner = group.iter().find(|c| {
                c.settings.wanted.slot == slot
                    && database.as_deref() == Some(c.settings.connect.database.as_str())
            });
            Slot {
                plugin: r.get(1),
                slot_type: r.get(2),
                database,
                active: r.get(4),
                active_pid: r.get(5),
                temporary: r.get(6),
                confirmed_flush_lsn: r.get(7),
                restart_lsn: r.get(8),
                retained_wal_bytes: r.get(9),
                wal_status: r.get(10),
                pipeline: owner.map(|c| c.name.clone()),
                pipeline_state: owner.and_then(|c| state(&c.name)),
                source: source.to_string(),
                slot,
            }
        })
        .collect())
}

/// What dropping a slot did.
#[derive(Debug, Serialize)]
pub struct SlotDropped {
    pub slot: String,
    pub source: String,
    /// The pipeline of this config that owned it, if any.
    pub pipeline: Option<String>,
    /// Snapshot progress files removed with it (they belong to the slot).
    pub removed_state: Vec<String>,
    pub message: String,
}

/// Drops `slot` once `confirm` repeats its name, unless a running pipeline
/// owns it or a process streams from it. `source` (a pipeline's name)
/// picks the cluster when several have a slot of that name.
pub async fn drop_slot(
    captures: &[Capture],
    state: &(dyn Fn(&str) -> Option<PipelineState> + Sync),
    slot: &str,
    confirm: Option<&str>,
    source: Option<&str>,
) -> Result<SlotDropped, ManageError> {
    if slot.is_empty() {
        return Err(ManageError::BadRequest(
            "name the slot to drop: {\"slot\": \"<name>\", \"confirm\": \"<name>\"}".into(),
        ));
    }
    if confirm != Some(slot) {
        return Err(ManageError::BadRequest(format!(
            "dropping replication slot {slot} releases the WAL it retains and loses its position for good (a \
             pipeline streaming from it would have to snapshot again); to confirm, repeat the slot's name: \
             {{\"slot\": \"{slot}\", \"confirm\": \"{slot}\"}} (walcast slots drop {slot} --confirm {slot})"
        )));
    }
    let mut candidates = Vec::new();
    for (cluster, group) in clusters(captures) {
        if let Some(p) = source {
            if !group.iter().any(|c| c.name == p) {
                continue;
            }
        }
        let found = cluster_slots(&cluster, &group, state)
            .await?
            .into_iter()
            .find(|s| s.slot == slot);
        if let Some(found) = found {
            candidates.push((cluster, group, found));
        }
    }
    if source.is_some_and(|p| !captures.iter().any(|c| c.name == p)) {
        return Err(ManageError::NotFound(format!(
            "no capture pipeline named {} in the config (\"source\" names the pipeline whose cluster holds the slot)",
            source.unwrap_or_default()
        )));
    }
    let (cluster, group, found) = match candidates.len() {
        0 => {
            return Err(ManageError::NotFound(format!(
                "no replication slot named {slot} on the source cluster(s) of this config's capture pipelines \
                 (`walcast slots list` shows them)"
            )))
        }
        1 => candidates.pop().expect("one"),
        _ => {
            return Err(ManageError::BadRequest(format!(
                "several source clusters have a slot named {slot} ({}); name the cluster with \"source\": \
                 \"<a pipeline reading it>\" (--source)",
                candidates
                    .iter()
                    .map(|(c, ..)| c.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )))
        }
    };
    if let (Some(p), Some(st)) = (&found.pipeline, found.pipeline_state) {
        if !matches!(st, PipelineState::Stopped | PipelineState::Failed) {
            return Err(ManageError::Conflict(format!(
                "replication slot {slot} belongs to pipeline {p}, which is running ({}): remove the pipeline from \
                 the config and restart walcast first (or stop walcast and run `walcast slots drop`); dropping the \
                 slot of a running pipeline would stop it",
                serde_json::to_value(st)
                    .ok()
                    .and_then(|v| v.as_str().map(String::from))
                    .unwrap_or_default()
            )));
        }
    }
    if let Some(pid) = found.active_pid {
        return Err(ManageError::Conflict(format!(
            "replication slot {slot} is in use by server process {pid} (another walcast, or another consumer): \
             stop it first"
        )));
    }
    let owner = found
        .pipeline
        .as_ref()
        .and_then(|p| group.iter().find(|c| &c.name == p));
    let connect = &owner.copied().unwrap_or(group[0]).settings.connect;
    let client = capture::catalog::connect(connect)
        .await
        .map_err(|e| ManageError::catalog(&format!("source {cluster}"), e))?;
    match capture::setup::drop_slot(&client, slot).await {
        Ok(true) => {}
        Ok(false) => {
            return Err(ManageError::NotFound(format!(
                "replication slot {slot} no longer exists on {cluster}"
            )))
        }
        Err(capture::setup::SetupError::Busy(m)) => return Err(ManageError::Conflict(m)),
        Err(e) => {
            return Err(ManageError::Postgres {
                transient: e.is_transient(),
                message: format!("dropping replication slot {slot} on {cluster}: {e}"),
            })
        }
    }
    // A snapshot's progress belongs to the slot it started with.
    let mut removed_state = Vec::new();
    if let Some(c) = owner {
        for state in [
            &c.settings.snapshot.state_path,
            &c.settings.snapshot.incremental_state_path,
        ] {
            if std::fs::remove_file(state).is_ok() {
                removed_state.push(state.display().to_string());
            }
        }
    }
    let mut message = format!(
        "dropped replication slot {slot} on {cluster}{}",
        found
            .retained_wal_bytes
            .map(|b| format!(" (it retained {b} bytes of WAL)"))
            .unwrap_or_default()
    );
    for s in &removed_state {
        message.push_str(&format!("; removed snapshot state {s}"));
    }
    Ok(SlotDropped {
        slot: slot.to_string(),
        source: cluster,
        pipeline: found.pipeline.clone(),
        removed_state,
        message,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_slot_drop_needs_the_name_repeated_before_anything_is_touched() {
        // No capture at all: the confirmation is checked first, without
        // connecting anywhere.
        for confirm in [None, Some(""), Some("walcast_orderz")] {
            let e = drop_slot(&[], &|_| None, "walcast_orders", confirm, None)
                .await
                .unwrap_err();
            assert_eq!(e.http_status(), 400, "{e}");
            assert!(
                e.to_string()
                    .contains(r#"{"slot": "walcast_orders", "confirm": "walcast_orders"}"#),
                "{e}"
            );
        }
        let e = drop_slot(&[], &|_| None, "", Some(""), None)
            .await
            .unwrap_err();
        assert_eq!(e.http_status(), 400, "{e}");
        // Confirmed, but no cluster has it.
        let e = drop_slot(
            &[],
            &|_| None,
            "walcast_orders",
            Some("walcast_orders"),
            None,
        )
        .await
        .unwrap_err();
        assert_eq!(e.http_status(), 404, "{e}");
    }

    #[test]
    fn errors_map_to_what_the_caller_can_do() {
        let pg = |transient| ManageError::Postgres {
            message: "x".into(),
            transient,
        };
        assert_eq!(ManageError::Conflict("x".into()).http_status(), 409);
        assert_eq!(ManageError::NotFound("x".into()).http_status(), 404);
        assert_eq!(pg(true).http_status(), 503);
        assert_eq!(pg(false).http_status(), 502);
    }
}
