//! Everything a capture needs from Postgres before streaming: the server
//! settings, the role's privileges, the tables, the publication and the
//! slot. `plan` only looks (that is `walcast check`); `apply` creates what
//! is missing. Every problem comes back as one message that says what to do.
//!
//! # Row filters
//!
//! A `row_filter` becomes the publication's `WHERE` for the table: Postgres
//! evaluates it when decoding (an update moving a row out of the filter is
//! published as a delete, into it as an insert), and the snapshots read the
//! filter back from `pg_publication_tables.rowfilter` (see
//! `Catalog::table_schema_by_name`), so initial, incremental and streamed
//! rows agree. Filters are compared as Postgres prints them: the configured
//! text is first put through a publication created in a transaction that is
//! rolled back (which also has Postgres validate it: immutable built-in
//! functions only, columns of the table, no user-defined types), so `v>1`
//! and `(v > 1)` are the same filter.
//!
//! Postgres refuses every UPDATE and DELETE on a table whose publication
//! filter references a column outside its replica identity (for the
//! application, not just for walcast), so such a filter is refused here.
//!
//! Drift: walcast gives a table the configured filter when the publication
//! it manages has another, or none. It never removes a filter the config
//! does not mention (the publication may be someone else's, and removing a
//! filter would publish rows someone chose to keep in the database): that
//! filter is honoured and reported.

use std::collections::{HashMap, HashSet};

use tokio_postgres::Client;

use crate::catalog::pg_error_text;
use crate::replication::connection::{quote_ident, quote_literal};
use walcast_sdk::TableName;

#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("{0}")]
    Definite(String),
    /// Worth retrying: the slot is held by another process (a standby
    /// waiting for the active daemon to die takes it over this way).
    #[error("{0}")]
    Busy(String),
    /// The server is a standby; worth retrying, it may be promoted.
    #[error("{0}")]
    Standby(String),
    #[error("catalog query failed ({what}): {}", pg_error_text(source))]
    Query {
        what: String,
        source: tokio_postgres::Error,
    },
}

impl SetupError {
    pub fn is_transient(&self) -> bool {
        match self {
            SetupError::Busy(_) | SetupError::Standby(_) => true,
            SetupError::Query { source, .. } => super::catalog::transient_sql(source),
            SetupError::Definite(_) => false,
        }
    }
}

fn q(what: impl Into<String>) -> impl FnOnce(tokio_postgres::Error) -> SetupError {
    let what = what.into();
    move |source| SetupError::Query { what, source }
}

/// What the pipeline wants.
#[derive(Debug, Clone)]
pub struct Wanted {
    pub slot: String,
    pub publication: String,
    pub tables: Vec<TableName>,
    pub schemas: Vec<String>,
    pub keyless: Vec<TableName>,
    pub create_slot: bool,
    pub create_publication: bool,
    /// The publication's `publish_via_partition_root`: partitions' changes
    /// arrive as changes of their partitioned table (`true`), or under
    /// each partition's own name (`false`).
    pub via_root: bool,
    /// `slot_failover`: the slot is (made) a failover slot, Postgres 17+.
    pub failover: bool,
    /// `publish_generated_columns`: stored generated columns are published
    /// (Postgres 18+).
    pub generated_columns: bool,
    /// `streaming`: transactions in progress are streamed (pgoutput
    /// protocol 2, Postgres 14+).
    pub streaming: bool,
    /// `row_filter` per table: the publication's `WHERE` for it
    /// (Postgres 15+); see the module's notes on row filters.
    pub row_filters: Vec<(TableName, String)>,
}

/// A captured partitioned table and its partitions (leaves) when planned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partitioned {
    pub table: TableName,
    pub leaves: Vec<TableName>,
}

/// What `apply` would do, and the state found.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    pub create_publication: Option<String>,
    /// `ALTER PUBLICATION ... ADD ...` for captured tables the existing
    /// publication does not cover yet (a table added to `tables`).
    pub alter_publication: Option<String>,
    /// The tables that statement adds: their changes stream from then on,
    /// their existing rows need an incremental snapshot.
    pub added_tables: Vec<TableName>,
    pub create_slot: bool,
    /// The slot's confirmed_flush_lsn when it exists.
    pub slot_confirmed_lsn: Option<String>,
    /// Captured tables as found. With
    /// `publish_via_partition_root = false` a listed partitioned table is
    /// replaced by its partitions here: those are the names in the stream.
    pub tables: Vec<TableName>,
    /// The partitioned tables among the captured ones.
    pub partitioned: Vec<Partitioned>,
    /// `ALTER PUBLICATION ... SET (publish_via_partition_root = ...)` when
    /// the existing publication publishes partitions the other way.
    pub set_via_root: Option<String>,
    /// `ALTER PUBLICATION ... SET (publish_generated_columns = stored)`
    /// when `publish_generated_columns` asks for them and the existing
    /// publication does not publish them.
    pub set_generated: Option<String>,
    /// The slot exists and is not a failover slot yet, and `slot_failover`
    /// asks for one: `ALTER_REPLICATION_SLOT ... (FAILOVER true)`.
    pub enable_failover: bool,
    /// The row filter of each filtered table once the plan is applied, as
    /// Postgres prints it (configured, or found in a publication walcast
    /// does not manage): what the stream and the snapshots honour.
    pub row_filters: Vec<(TableName, String)>,
    /// Statements that give a covered table the configured row filter
    /// (one transaction each: drop the table from the publication and add
    /// it back with its `WHERE`), with the table.
    pub set_row_filters: Vec<(TableName, String)>,
    /// Things the operator should know (shown by `check`, logged at start).
    pub warnings: Vec<String>,
}

/// Checks everything; creates nothing.
pub async fn plan(client: &Client, w: &Wanted) -> Result<Plan, SetupError> {
    let definite = |m: String| Err(SetupError::Definite(m));
    let wal_level: String = client
        .query_one("SHOW wal_level", &[])
        .await
        .map_err(q("wal_level"))?
        .get(0);
    if wal_level != "logical" {
        return definite(format!(
            "Postgres has wal_level = {wal_level}; logical replication needs wal_level = logical. \
             Run ALTER SYSTEM SET wal_level = logical; and restart Postgres"
        ));
    }
    let role = client
        .query_one("SELECT current_user::text, rolreplication, rolsuper FROM pg_roles WHERE rolname = current_user", &[])
        .await
        .map_err(q("role attributes"))?;
    let (user, replication, superuser): (String, bool, bool) =
        (role.get(0), role.get(1), role.get(2));
    if !replication && !superuser {
        return definite(format!(
            "role {user} lacks the REPLICATION attribute needed to stream changes; run ALTER ROLE {} REPLICATION;",
            quote_ident(&user)
        ));
    }

    let row = client
        .query_one(
            "SELECT current_setting('server_version'), current_setting('server_version_num')::int, pg_is_in_recovery()",
            &[],
        )
        .await
        .map_err(q("server version"))?;
    let (v, version_num, in_recovery): (String, i32, bool) = (row.get(0), row.get(1), row.get(2));
    let major = (version_num / 10000) as u32;
    // A standby (reached with target_session_attrs = any, or the only host
    // listed) cannot serve the capture: Postgres 16+ can decode there, but
    // walcast creates its publication, and incremental snapshots write
    // watermarks, on the server it reads. Wait for a promotion.
    if in_recovery {
        return Err(SetupError::Standby(format!(
            "Postgres {v} here is a standby (in recovery); walcast captures from the primary (it creates the publication \
             and slot and writes snapshot watermarks there). Waiting for a promotion; list the primary in `host` \
             (several hosts with target_session_attrs = \"primary\", the default, skip standbys)"
        )));
    }
    if w.failover && major < 17 {
        return definite(format!(
            "slot_failover = true needs Postgres 17 or later (failover slots), and this server is {v}; \
             remove slot_failover, or upgrade"
        ));
    }
    if w.streaming && major < 14 {
        return definite(format!(
            "streaming = true needs Postgres 14 or later (pgoutput protocol version 2), and this server is {v}; \
             remove streaming (transactions then arrive whole at their commit), or upgrade"
        ));
    }
    if w.generated_columns && major < 18 {
        return definite(format!(
            "publish_generated_columns = true needs Postgres 18 or later (earlier versions never publish generated \
             columns), and this server is {v}; remove the setting, or upgrade"
        ));
    }
    if let Some((table, _)) = w.row_filters.first() {
        if major < 15 {
            return definite(format!(
                "table {table} has a row_filter, and publication row filters need Postgres 15 or later, and this server is {v}; \
                 remove row_filter (walcast does not filter rows itself), or upgrade"
            ));
        }
    }
    let mut warnings = Vec::new();
    if w.failover {
        let standby_slots: String = client
            .query_one("SELECT current_setting('synchronized_standby_slots')", &[])
            .await
            .map_err(q("synchronized_standby_slots"))?
            .get(0);
        if standby_slots.is_empty() {
            warnings.push(
                "slot_failover is on but synchronized_standby_slots is empty on this primary: walcast may receive \
                 (and publish) changes a standby has not received yet, which a promoted standby then never had. \
                 Set synchronized_standby_slots to the standbys' physical slots"
                    .into(),
            );
        }
    }

    // Postgres 14 has no publications FOR TABLES IN SCHEMA (15 on).
    let schemas_unsupported = if w.schemas.is_empty() {
        None
    } else {
        (major < 15).then(|| format!(
            "`schemas` needs Postgres 15 or later to put a schema in the publication (FOR TABLES IN SCHEMA), and this server is {v}; \
             list the tables in `tables` instead, or create the publication yourself (e.g. FOR ALL TABLES) and set create_publication = false"
        ))
    };

    // The tables: listed ones, plus every table of listed schemas.
    let mut tables = w.tables.clone();
    for schema in &w.schemas {
        let rows = client
            .query(
                "SELECT n.nspname::text, c.relname::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                 WHERE n.nspname = $1 AND c.relkind IN ('r', 'p')
                   AND CASE WHEN $2 THEN NOT c.relispartition ELSE c.relkind = 'r' END
                 ORDER BY 2",
                &[schema, &w.via_root],
            )
            .await
            .map_err(q(format!("tables of schema {schema}")))?;
        if rows.is_empty() {
            let exists = client
                .query_opt("SELECT 1 FROM pg_namespace WHERE nspname = $1", &[schema])
                .await
                .map_err(q("schema"))?
                .is_some();
            if !exists {
                return definite(format!(
                    "schema {schema} does not exist in this database (listed in `schemas`)"
                ));
            }
        }
        for r in rows {
            let t = TableName::new(r.get::<_, String>(0), r.get::<_, String>(1));
            if !tables.contains(&t) {
                tables.push(t);
            }
        }
    }
    // A listed table that is gone is a mistake in a new pipeline, but in
    // one whose slot exists it is a table dropped since (the slot may still
    // hold its last changes, which are delivered): warn, capture the rest.
    let slot_exists = client
        .query_opt(
            "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1",
            &[&w.slot],
        )
        .await
        .map_err(q("replication slot"))?
        .is_some();
    let mut dropped = Vec::new();
    let mut partitioned = Vec::new();
    // One query for every table, not one each: a pipeline of 1,000 tables
    // spent seconds in round trips here before it streamed.
    let (schemas, names) = table_arrays(&tables);
    let mut rows: HashMap<TableName, tokio_postgres::Row> = client
        .query(
            "SELECT t.s, t.n, c.relreplident::text, has_table_privilege(c.oid, 'SELECT'),
                    EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary),
                    c.oid, c.relkind = 'p'
             FROM unnest($1::text[], $2::text[]) AS t(s, n)
             JOIN pg_namespace ns ON ns.nspname = t.s
             JOIN pg_class c ON c.relnamespace = ns.oid AND c.relname = t.n AND c.relkind IN ('r', 'p')",
            &[&schemas, &names],
        )
        .await
        .map_err(q("captured tables"))?
        .into_iter()
        .map(|r| (TableName::new(r.get::<_, String>(0), r.get::<_, String>(1)), r))
        .collect();
    for table in &tables {
        let Some(row) = rows.remove(table) else {
            if slot_exists {
                tracing::warn!(
                    table = %table,
                    slot = %w.slot,
                    "captured table does not exist any more (dropped?); the other tables are captured and its \
                     changes committed before the drop are still delivered; remove it from `tables`"
                );
                dropped.push(table.clone());
                continue;
            }
            return definite(format!(
                "table {table} does not exist (names are case-sensitive and used as written; check `tables`)"
            ));
        };
        let (ident, select, has_pk): (String, bool, bool) = (row.get(2), row.get(3), row.get(4));
        let (oid, is_partitioned): (u32, bool) = (row.get(5), row.get(6));
        if is_partitioned {
            let p = partitions(client, table, oid, has_pk, &ident).await?;
            partitioned.push(p);
        }
        if !select {
            return definite(format!(
                "role {user} lacks SELECT on {table}; run GRANT SELECT ON {} TO {};",
                table.quoted(),
                quote_ident(&user)
            ));
        }
        if ident == "n" {
            return definite(format!(
                "table {table} has REPLICA IDENTITY NOTHING, so updates and deletes cannot be captured; \
                 run ALTER TABLE {} REPLICA IDENTITY DEFAULT (with a primary key) or FULL",
                table.quoted()
            ));
        }
        let keyless_ok = w.keyless.contains(table);
        if !has_pk && ident != "i" && !keyless_ok {
            return definite(format!(
                "table {table} has no primary key, so its events would have no key (no per-row order in Kafka, \
                 no cache or index updates). Add a primary key, or list \"{table}\" under `keyless_tables` to \
                 capture it with null keys{}",
                if ident == "f" { "" } else { " (it then also needs REPLICA IDENTITY FULL for updates and deletes)" }
            ));
        }
        if !has_pk && ident == "d" && keyless_ok {
            tracing::warn!(
                table = %table,
                "captured without a key and with REPLICA IDENTITY DEFAULT: only inserts can be captured, and Postgres \
                 refuses UPDATE and DELETE on it while it is in the publication; set REPLICA IDENTITY FULL if rows change"
            );
        } else if !has_pk && ident == "d" {
            return definite(format!(
                "table {table} has no primary key and REPLICA IDENTITY DEFAULT, so Postgres logs nothing of old rows \
                 and cannot publish its updates and deletes; run ALTER TABLE {} REPLICA IDENTITY FULL",
                table.quoted()
            ));
        }
    }

    tables.retain(|t| !dropped.contains(t));
    if w.via_root {
        // A partition listed beside its partitioned table would only ever
        // get snapshot events: its changes arrive under the parent's name.
        for p in &partitioned {
            if let Some(leaf) = p.leaves.iter().find(|l| tables.contains(l)) {
                return definite(format!(
                    "table {leaf} is a partition of {parent}, which is captured too: with publish_via_partition_root = true \
                     (the default) its changes are published as changes of {parent}; remove {leaf} from `tables` \
                     (or set publish_via_partition_root = false to capture each partition as a table of its own)",
                    parent = p.table
                ));
            }
        }
    } else {
        // Each partition is a table of its own: the stream names them.
        let mut expanded = Vec::new();
        for t in &tables {
            match partitioned.iter().find(|p| &p.table == t) {
                Some(p) => expanded.extend(p.leaves.iter().cloned()),
                None => expanded.push(t.clone()),
            }
        }
        expanded.dedup();
        tables = expanded;
    }
    let mut wanted_filters: Vec<(TableName, Trial)> = Vec::new();
    for (table, expr) in &w.row_filters {
        if !tables.contains(table) && !partitioned.iter().any(|p| &p.table == table) {
            continue; // dropped since: warned about above
        }
        if !w.via_root && partitioned.iter().any(|p| &p.table == table) {
            return definite(format!(
                "table {table} is partitioned and has a row_filter, but publish_via_partition_root = false: Postgres then \
                 publishes each partition under its own name with the partition's own filter and ignores the parent's; \
                 set publish_via_partition_root = true, or filter the partitions"
            ));
        }
        let trial = trial_filter(client, table, expr, w.via_root).await?;
        check_identity_covers(client, table, &trial).await?;
        wanted_filters.push((table.clone(), trial));
    }
    let mut plan = Plan {
        tables: tables.clone(),
        partitioned: partitioned.clone(),
        warnings,
        ..Plan::default()
    };
    let with_via_root = if w.generated_columns {
        format!(
            " WITH (publish_via_partition_root = {}, publish_generated_columns = stored)",
            w.via_root
        )
    } else {
        format!(" WITH (publish_via_partition_root = {})", w.via_root)
    };

    // The publication.
    let publication = client
        .query_opt(
            &format!(
                "SELECT puballtables, pubinsert, pubupdate, pubdelete, pubtruncate, pubviaroot, {} FROM pg_publication WHERE pubname = $1",
                if major >= 18 { "pubgencols::text = 's'" } else { "false" }
            ),
            &[&w.publication],
        )
        .await
        .map_err(q("publication"))?;
    match publication {
        None if !w.create_publication => {
            return definite(format!(
                "publication {} does not exist and create_publication is false; create it with CREATE PUBLICATION {} FOR TABLE ...",
                w.publication,
                quote_ident(&w.publication)
            ))
        }
        None => {
            let names: Vec<String> = w
                .tables
                .iter()
                .filter(|t| !dropped.contains(t))
                .map(|t| with_filter(t, &wanted_filters))
                .collect();
            let targets = publication_targets(&names, &w.schemas);
            if !w.schemas.is_empty() {
                if let Some(m) = schemas_unsupported {
                    return definite(m);
                }
            }
            if targets.is_empty() {
                return definite(format!(
                    "none of the tables listed in `tables` exists any more, and publication {} is missing; nothing to capture",
                    w.publication
                ));
            }
            plan.create_publication = Some(format!(
                "CREATE PUBLICATION {} FOR {}{with_via_root}",
                quote_ident(&w.publication),
                targets
            ));
            plan.row_filters = wanted_filters
                .iter()
                .map(|(t, trial)| (t.clone(), trial.printed.clone()))
                .collect();
        }
        Some(row) => {
            let ops: [bool; 4] = [row.get(1), row.get(2), row.get(3), row.get(4)];
            if ops.iter().any(|o| !o) {
                return definite(format!(
                    "publication {} does not publish every operation; run ALTER PUBLICATION {} SET (publish = 'insert, update, delete, truncate')",
                    w.publication,
                    quote_ident(&w.publication)
                ));
            }
            let via_root: bool = row.get(5);
            if via_root != w.via_root && (!partitioned.is_empty() || !w.schemas.is_empty()) {
                let sql = format!(
                    "ALTER PUBLICATION {} SET (publish_via_partition_root = {})",
                    quote_ident(&w.publication),
                    w.via_root
                );
                if !w.create_publication {
                    return definite(format!(
                        "publication {} has publish_via_partition_root = {via_root} but the pipeline is configured with \
                         publish_via_partition_root = {}, so the partitions' changes would arrive under names the pipeline \
                         does not capture; run {sql}; (or change the pipeline's setting)",
                        w.publication, w.via_root
                    ));
                }
                plan.set_via_root = Some(sql);
            }
            // Only ever turned on: a publication someone set to publish
            // them keeps doing so, and the snapshot follows the
            // publication (Catalog::for_publication), so events agree.
            let generated: bool = row.get(6);
            if w.generated_columns && !generated {
                let sql = format!(
                    "ALTER PUBLICATION {} SET (publish_generated_columns = stored)",
                    quote_ident(&w.publication)
                );
                if !w.create_publication {
                    return definite(format!(
                        "publication {} does not publish generated columns but the pipeline sets publish_generated_columns = true; \
                         run {sql}; (or remove the setting)",
                        w.publication
                    ));
                }
                plan.set_generated = Some(sql);
            }
            // Listed in the publication, or a partition (or partitioned
            // table) whose partition tree is a member: pg_publication_tables
            // lists roots or leaves depending on publish_via_partition_root.
            // One query for all tables (the view is read once).
            let (schemas, names) = table_arrays(&tables);
            let covered: HashSet<TableName> = client
                .query(
                    "WITH pt AS MATERIALIZED (SELECT schemaname, tablename FROM pg_publication_tables WHERE pubname = $1)
                     SELECT t.s, t.n FROM unnest($2::text[], $3::text[]) AS t(s, n)
                     WHERE EXISTS (SELECT 1 FROM pt WHERE pt.schemaname = t.s AND pt.tablename = t.n)
                        OR EXISTS (SELECT 1 FROM pg_publication_rel pr JOIN pg_publication p ON p.oid = pr.prpubid
                                   JOIN pg_class c ON c.relname = t.n JOIN pg_namespace n ON n.oid = c.relnamespace AND n.nspname = t.s
                                   WHERE p.pubname = $1
                                     AND (pr.prrelid = c.oid OR pr.prrelid IN (SELECT relid FROM pg_partition_ancestors(c.oid))))",
                    &[&w.publication, &schemas, &names],
                )
                .await
                .map_err(q("publication tables"))?
                .into_iter()
                .map(|r| TableName::new(r.get::<_, String>(0), r.get::<_, String>(1)))
                .collect();
            let missing_tables: Vec<TableName> =
                tables.iter().filter(|t| !covered.contains(*t)).cloned().collect();
            let missing: Vec<String> = missing_tables.iter().map(TableName::quoted).collect();
            if !missing.is_empty() && w.create_publication {
                // Tables listed by name are added by name; tables of a
                // listed schema by their schema, so later ones follow.
                let (mut names, mut schemas): (Vec<String>, Vec<String>) = (Vec::new(), Vec::new());
                for table in &missing_tables {
                    if w.tables.contains(table) {
                        names.push(with_filter(table, &wanted_filters));
                    } else if !schemas.contains(&table.schema) {
                        schemas.push(table.schema.clone());
                    }
                }
                if !schemas.is_empty() {
                    if let Some(m) = schemas_unsupported {
                        return definite(m);
                    }
                }
                plan.alter_publication = Some(format!(
                    "ALTER PUBLICATION {} ADD {}",
                    quote_ident(&w.publication),
                    publication_targets(&names, &schemas)
                ));
                plan.added_tables = missing_tables.clone();
            } else if !missing.is_empty() {
                return definite(format!(
                    "publication {} does not cover {}; run ALTER PUBLICATION {} ADD TABLE {}",
                    w.publication,
                    missing.join(", "),
                    quote_ident(&w.publication),
                    missing_tables
                        .iter()
                        .map(|t| with_filter(t, &wanted_filters))
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
            reconcile_filters(client, w, &tables, &missing_tables, &wanted_filters, &mut plan).await?;
        }
    }

    // The slot.
    let slot = client
        .query_opt(
            &format!(
                "SELECT plugin::text, database::text, active_pid, confirmed_flush_lsn::text, slot_type::text, {}
                 FROM pg_replication_slots WHERE slot_name = $1",
                if major >= 17 { "failover" } else { "false" }
            ),
            &[&w.slot],
        )
        .await
        .map_err(q("replication slot"))?;
    match slot {
        None if !w.create_slot => {
            return definite(format!(
                "replication slot {} does not exist and create_slot is false",
                w.slot
            ));
        }
        None => {
            let row = client
                .query_one(
                    "SELECT (SELECT count(*) FROM pg_replication_slots)::int, current_setting('max_replication_slots')::int",
                    &[],
                )
                .await
                .map_err(q("slot count"))?;
            let (used, max): (i32, i32) = (row.get(0), row.get(1));
            if used >= max {
                return definite(format!(
                    "all {max} replication slots (max_replication_slots) are in use; drop an unused one with \
                     SELECT pg_drop_replication_slot('name') (see pg_replication_slots), or raise max_replication_slots and restart Postgres"
                ));
            }
            plan.create_slot = true;
        }
        Some(row) => {
            let (plugin, database, active, confirmed, kind): (
                Option<String>,
                Option<String>,
                Option<i32>,
                Option<String>,
                String,
            ) = (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4));
            let db: String = client
                .query_one("SELECT current_database()::text", &[])
                .await
                .map_err(q("database"))?
                .get(0);
            if kind != "logical" || plugin.as_deref() != Some("pgoutput") {
                return definite(format!(
                    "replication slot {} exists but is not a logical pgoutput slot (plugin {}); choose another `slot` name",
                    w.slot,
                    plugin.unwrap_or_else(|| "none".into())
                ));
            }
            if database.as_deref() != Some(db.as_str()) {
                return definite(format!(
                    "replication slot {} belongs to database {}, not {db}; choose another `slot` name",
                    w.slot,
                    database.unwrap_or_default()
                ));
            }
            if let Some(pid) = active {
                return Err(SetupError::Busy(format!(
                    "replication slot {} is in use by another process (PID {pid}); waiting for it to be released \
                     (another walcast for the same pipeline, or a stale connection)",
                    w.slot
                )));
            }
            plan.slot_confirmed_lsn = confirmed;
            let failover: bool = row.get(5);
            plan.enable_failover = w.failover && !failover;
        }
    }
    Ok(plan)
}

// ---------------------------------------------------------------------------
// Row filters (see the module notes).

/// A filter as Postgres stored it.
struct Trial {
    /// `pg_get_expr`: how `pg_publication_tables.rowfilter` shows it.
    printed: String,
    /// The attribute numbers it references (from the stored node tree).
    attnums: Vec<i16>,
    /// As configured, for statements.
    written: String,
    /// Whether Postgres printed it (false: the role may not create a
    /// publication, `printed` is the text as written).
    normalised: bool,
}

/// Has Postgres parse, check and print `expr` as a filter of `table`, in a
/// transaction that is rolled back (nothing is created).
async fn trial_filter(
    client: &Client,
    table: &TableName,
    expr: &str,
    via_root: bool,
) -> Result<Trial, SetupError> {
    let trial = format!("walcast_row_filter_trial_{}", std::process::id());
    client
        .batch_execute("BEGIN")
        .await
        .map_err(q("begin row filter check"))?;
    let result = async {
        client
            // Postgres takes a partitioned table's filter only when
            // published via its root. One statement (extended protocol): a
            // filter cannot smuggle in another statement, here or later in
            // the statements built from it.
            .execute(
                &format!(
                    "CREATE PUBLICATION {} FOR TABLE {} WHERE ({expr}) WITH (publish_via_partition_root = {via_root})",
                    quote_ident(&trial),
                    table.quoted()
                ),
                &[],
            )
            .await?;
        client
            .query_one(
                "SELECT pg_get_expr(pr.prqual, pr.prrelid), pr.prqual::text
                 FROM pg_publication_rel pr JOIN pg_publication p ON p.oid = pr.prpubid WHERE p.pubname = $1",
                &[&trial],
            )
            .await
    }
    .await;
    client
        .batch_execute("ROLLBACK")
        .await
        .map_err(q("roll back row filter check"))?;
    match result {
        Ok(row) => Ok(Trial {
            printed: row.get(0),
            attnums: node_tree_attnums(&row.get::<_, String>(1)),
            written: expr.to_string(),
            normalised: true,
        }),
        Err(e) => match e.as_db_error() {
            // Without the privileges to create a publication, the filter is
            // taken as written (compared as text).
            Some(db) if db.code().code() == "42501" => Ok(Trial {
                printed: expr.to_string(),
                attnums: Vec::new(),
                written: expr.to_string(),
                normalised: false,
            }),
            Some(db) => Err(SetupError::Definite(format!(
                "row_filter of table {table} (`{expr}`) is not a valid publication row filter: {}{}; a filter may use \
                 the table's columns, constants, and immutable built-in operators and functions",
                db.message(),
                db.detail().map(|d| format!(" ({d})")).unwrap_or_default()
            ))),
            None => Err(SetupError::Query {
                what: format!("row filter of {table}"),
                source: e,
            }),
        },
    }
}

/// The attribute numbers of the table's columns in a stored expression
/// (`{VAR :varno 1 :varattno N ...}` in `pg_node_tree` text).
fn node_tree_attnums(tree: &str) -> Vec<i16> {
    let mut out: Vec<i16> = tree
        .split("{VAR ")
        .skip(1)
        .filter_map(|var| {
            let rest = &var[var.find(":varattno ")? + ":varattno ".len()..];
            let end = rest.find(|c: char| c != '-' && !c.is_ascii_digit())?;
            rest[..end].parse().ok()
        })
        .collect();
    out.sort_unstable();
    out.dedup();
    out
}

/// Refuses a filter that references columns outside the replica identity
/// (Postgres would refuse the application's UPDATEs and DELETEs).
async fn check_identity_covers(
    client: &Client,
    table: &TableName,
    trial: &Trial,
) -> Result<(), SetupError> {
    if trial.attnums.is_empty() {
        return Ok(());
    }
    let row = client
        .query_one(
            "SELECT c.relreplident::text,
                    ARRAY(SELECT a.attname::text FROM pg_attribute a
                          WHERE a.attrelid = c.oid AND a.attnum = ANY($3::int2[])
                            AND NOT EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid
                                              AND CASE c.relreplident WHEN 'd' THEN i.indisprimary ELSE i.indisreplident END
                                              AND a.attnum = ANY(i.indkey))
                          ORDER BY a.attnum),
                    EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid
                              AND CASE c.relreplident WHEN 'd' THEN i.indisprimary ELSE i.indisreplident END)
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = $1 AND c.relname = $2",
            &[&table.schema, &table.name, &trial.attnums],
        )
        .await
        .map_err(q(format!("replica identity of {table}")))?;
    let (ident, outside, has_identity): (String, Vec<String>, bool) =
        (row.get(0), row.get(1), row.get(2));
    // FULL covers every column; a table without any identity (key-less,
    // captured insert-only) has its UPDATEs and DELETEs refused already.
    if ident == "f" || !has_identity || outside.is_empty() {
        return Ok(());
    }
    Err(SetupError::Definite(format!(
        "row_filter of table {table} (`{}`) uses column(s) {} outside its replica identity ({}): Postgres would then refuse \
         every UPDATE and DELETE on {table} (\"Column used in the publication WHERE expression is not part of the replica \
         identity\"). Filter on the key columns only, or run ALTER TABLE {} REPLICA IDENTITY FULL",
        trial.written,
        outside.join(", "),
        if ident == "d" { "the primary key" } else { "its replica identity index" },
        table.quoted()
    )))
}

/// A table of a CREATE/ALTER PUBLICATION object list, with its `WHERE`.
fn with_filter(table: &TableName, filters: &[(TableName, Trial)]) -> String {
    match filters.iter().find(|(t, _)| t == table) {
        Some((_, trial)) => format!("{} WHERE ({})", table.quoted(), trial.written),
        None => table.quoted(),
    }
}

/// Compares each covered table's filter in the existing publication with
/// the configured one (see the notes on row filters above).
async fn reconcile_filters(
    client: &Client,
    w: &Wanted,
    tables: &[TableName],
    added: &[TableName],
    wanted: &[(TableName, Trial)],
    plan: &mut Plan,
) -> Result<(), SetupError> {
    // Row filters came with Postgres 15 (pg_publication_tables has no
    // `rowfilter` before); a configured one was refused on 14 already.
    let version: i32 = client
        .query_one("SELECT current_setting('server_version_num')::int", &[])
        .await
        .map_err(q("server_version_num"))?
        .get(0);
    if version < 150000 {
        return Ok(());
    }
    let mut candidates: Vec<&TableName> = tables.iter().collect();
    for p in &plan.partitioned {
        if !candidates.contains(&&p.table) {
            candidates.push(&p.table);
        }
    }
    // The publication's filters in one query, not one per table.
    let mut published: HashMap<TableName, Option<String>> = client
        .query(
            "SELECT schemaname, tablename, rowfilter FROM pg_publication_tables WHERE pubname = $1",
            &[&w.publication],
        )
        .await
        .map_err(q("row filters"))?
        .into_iter()
        .map(|r| {
            (
                TableName::new(r.get::<_, String>(0), r.get::<_, String>(1)),
                r.get(2),
            )
        })
        .collect();
    for table in candidates {
        let want = wanted
            .iter()
            .find(|(t, _)| t == table)
            .map(|(_, trial)| trial);
        if added.contains(table) {
            if let Some(trial) = want {
                plan.row_filters
                    .push((table.clone(), trial.printed.clone()));
            }
            continue;
        }
        let found: Option<String> = published.remove(table).flatten();
        match (want, found) {
            (None, None) => {}
            (None, Some(found)) => {
                plan.warnings.push(format!(
                    "publication {} filters table {table} with WHERE {found}, which the config does not set: honoured (the \
                     stream and snapshots carry only those rows); set row_filter to manage it, or remove it with \
                     ALTER PUBLICATION {} SET TABLE ... (walcast never widens a filter by itself)",
                    w.publication,
                    quote_ident(&w.publication)
                ));
                plan.row_filters.push((table.clone(), found));
            }
            (Some(trial), found) if found.as_deref() == Some(trial.printed.as_str()) => {
                plan.row_filters
                    .push((table.clone(), trial.printed.clone()));
            }
            (Some(trial), Some(found)) if !trial.normalised => {
                plan.warnings.push(format!(
                    "table {table}: the publication filters it with WHERE {found}; row_filter is `{}`, which walcast \
                     cannot compare (the role may not create publications, which is how Postgres is asked to print a \
                     filter): the publication's filter is honoured",
                    trial.written
                ));
                plan.row_filters.push((table.clone(), found));
            }
            (Some(trial), found) => {
                // One query string, so one transaction: the table is never
                // out of the publication for the stream.
                let sql = format!(
                    "ALTER PUBLICATION {p} DROP TABLE {t}; ALTER PUBLICATION {p} ADD TABLE {t} WHERE ({})",
                    trial.written,
                    p = quote_ident(&w.publication),
                    t = table.quoted()
                );
                let was = found
                    .as_deref()
                    .map(|f| format!("WHERE {f}"))
                    .unwrap_or_else(|| "no filter".into());
                if !w.create_publication {
                    return Err(SetupError::Definite(format!(
                        "publication {} publishes table {table} with {was}, but its row_filter is `{}`; run \
                         BEGIN; {sql}; COMMIT; (or change row_filter)",
                        w.publication, trial.written
                    )));
                }
                plan.warnings.push(format!(
                    "table {table}: the publication has {was} and row_filter asks for WHERE {}; walcast changes it. Rows \
                     the new filter lets through that were not published before are not read by that: run `walcast \
                     snapshot {table}`; rows it now excludes stay in the sinks (no delete is published for them)",
                    trial.printed
                ));
                plan.set_row_filters.push((table.clone(), sql));
                plan.row_filters
                    .push((table.clone(), trial.printed.clone()));
            }
        }
    }
    Ok(())
}

/// The tables as two parallel arrays (schemas, names), for queries that
/// `unnest` them instead of asking once per table.
fn table_arrays(tables: &[TableName]) -> (Vec<&str>, Vec<&str>) {
    tables
        .iter()
        .map(|t| (t.schema.as_str(), t.name.as_str()))
        .unzip()
}

/// The object list of CREATE/ALTER PUBLICATION: `TABLE a, b, TABLES IN
/// SCHEMA s`. One TABLE keyword for all the tables: Postgres 14 rejects
/// `TABLE a, TABLE b` (15 accepts both).
fn publication_targets(tables: &[String], schemas: &[String]) -> String {
    let mut targets = Vec::new();
    if !tables.is_empty() {
        targets.push(format!("TABLE {}", tables.join(", ")));
    }
    targets.extend(
        schemas
            .iter()
            .map(|s| format!("TABLES IN SCHEMA {}", quote_ident(s))),
    );
    targets.join(", ")
}

/// Creates the publication the plan calls for (the slot is created on the
/// replication connection, which can export a snapshot).
pub async fn apply_publication(client: &Client, plan: &Plan) -> Result<(), SetupError> {
    if let Some(sql) = &plan.set_generated {
        tracing::info!(%sql, "publish_generated_columns asks for generated columns; changing the publication");
        run_publication_sql(
            client,
            sql,
            "change the publication",
            "the role must own the publication (or be superuser), or run it yourself",
        )
        .await?;
    }
    if let Some(sql) = &plan.set_via_root {
        tracing::warn!(%sql, "the publication published partitioned tables the other way than publish_via_partition_root asks; changing it");
        run_publication_sql(
            client,
            sql,
            "change the publication",
            "the role must own the publication (or be superuser), or run it yourself",
        )
        .await?;
    }
    for (table, sql) in &plan.set_row_filters {
        tracing::warn!(%table, %sql, "the publication filters the table's rows other than its row_filter says; changing it");
        run_publication_sql(
            client,
            sql,
            &format!("change the row filter of {table}"),
            "the role must own the publication and the table (or be superuser), or run it yourself",
        )
        .await?;
    }
    if let Some(sql) = &plan.alter_publication {
        tracing::info!(%sql, "adding tables to the publication");
        run_publication_sql(client, sql, "add tables to the publication", "the role must own the publication and the tables (or be superuser), or run it yourself").await?;
    }
    if let Some(sql) = &plan.create_publication {
        tracing::info!(%sql, "creating publication");
        run_publication_sql(
            client,
            sql,
            "create the publication",
            "the role must own the tables (or be superuser), or create it yourself",
        )
        .await?;
    }
    Ok(())
}

/// Installs the DDL capture event trigger (`ddl_capture = true`; see
/// [`crate::schema_change`]). Event triggers need a superuser: without the
/// privilege the error is definite and carries the SQL for a DBA to run.
pub async fn install_ddl_trigger(client: &Client) -> Result<(), SetupError> {
    let installed = client
        .query_opt(
            "SELECT 1 FROM pg_event_trigger WHERE evtname = $1",
            &[&crate::schema_change::DDL_TRIGGER],
        )
        .await
        .map_err(|source| SetupError::Query {
            what: "looking for the DDL capture event trigger".into(),
            source,
        })?
        .is_some();
    if installed {
        return Ok(());
    }
    run_publication_sql(
        client,
        &crate::schema_change::ddl_trigger_sql(),
        "install the DDL capture event trigger (ddl_capture = true)",
        "event triggers need a superuser; have one run this once in the database, or set ddl_capture = false",
    )
    .await
}

/// Runs one publication statement; a missing privilege (42501) is definite,
/// with what the operator can do and the statement to run by hand.
async fn run_publication_sql(
    client: &Client,
    sql: &str,
    what: &str,
    advice: &str,
) -> Result<(), SetupError> {
    client
        .batch_execute(sql)
        .await
        .map_err(|e| match e.as_db_error() {
            Some(db) if db.code().code() == "42501" => {
                SetupError::Definite(format!("cannot {what}: {}; {advice}: {sql}", db.message()))
            }
            _ => SetupError::Query {
                what: what.to_string(),
                source: e,
            },
        })
}

/// The partitions of a captured partitioned table, checked the way Postgres
/// checks them: updates and deletes of a partition are logged with the
/// partition's own replica identity, not its parent's.
async fn partitions(
    client: &Client,
    table: &TableName,
    oid: u32,
    has_pk: bool,
    parent_ident: &str,
) -> Result<Partitioned, SetupError> {
    let rows = client
        .query(
            "SELECT n.nspname::text, c.relname::text, c.relreplident::text,
                    EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary)
             FROM pg_partition_tree($1::oid::regclass) pt
             JOIN pg_class c ON c.oid = pt.relid JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE pt.isleaf ORDER BY 1, 2",
            &[&oid],
        )
        .await
        .map_err(q(format!("partitions of {table}")))?;
    let mut leaves = Vec::with_capacity(rows.len());
    let mut unidentified = Vec::new();
    for r in &rows {
        let leaf = TableName::new(r.get::<_, String>(0), r.get::<_, String>(1));
        let (ident, leaf_pk): (String, bool) = (r.get(2), r.get(3));
        if ident == "n" || (ident == "d" && !leaf_pk) {
            unidentified.push(leaf.quoted());
        }
        leaves.push(leaf);
    }
    // A key-less parent with REPLICA IDENTITY DEFAULT is captured insert-only
    // (`keyless_tables`, warned about above): its partitions are too.
    let insert_only = !has_pk && parent_ident == "d";
    if !unidentified.is_empty() && !insert_only {
        return Err(SetupError::Definite(format!(
            "partitioned table {table}: Postgres logs updates and deletes of a partition with the partition's own \
             replica identity, and {} cannot publish them (no primary key, REPLICA IDENTITY DEFAULT or NOTHING); run \
             ALTER TABLE ... REPLICA IDENTITY FULL on each (the parent's setting does not apply to its partitions)",
            unidentified.join(", ")
        )));
    }
    Ok(Partitioned {
        table: table.clone(),
        leaves,
    })
}

/// Drops a slot (the `walcast slots drop` command).
pub async fn drop_slot(client: &Client, slot: &str) -> Result<bool, SetupError> {
    let row = client
        .query_opt(
            "SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(q("replication slot"))?;
    match row {
        None => Ok(false),
        Some(r) => {
            if let Some(pid) = r.get::<_, Option<i32>>(0) {
                return Err(SetupError::Busy(format!(
                    "slot {slot} is in use by PID {pid}; stop that walcast first"
                )));
            }
            client
                .execute(
                    &format!("SELECT pg_drop_replication_slot({})", quote_literal(slot)),
                    &[],
                )
                .await
                .map_err(q("drop slot"))?;
            Ok(true)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_columns_are_read_from_the_stored_node_tree() {
        // What Postgres 15 stores for `v > 3 AND s = 'x'` on (id, v, s).
        let tree = "{BOOLEXPR :boolop and :args ({OPEXPR :opno 521 :args ({VAR :varno 1 :varattno 2 :vartype 23} \
                    {CONST :consttype 23}) :location 72} {OPEXPR :opno 98 :args ({VAR :varno 1 :varattno 3 :vartype 25} \
                    {CONST :consttype 25}) :location 82} {OPEXPR :args ({VAR :varno 1 :varattno 2 :vartype 23})}) :location 76}";
        assert_eq!(node_tree_attnums(tree), vec![2, 3]);
        assert_eq!(
            node_tree_attnums("{CONST :consttype 16}"),
            Vec::<i16>::new()
        );
    }

    #[test]
    fn filtered_tables_carry_their_where_in_publication_statements() {
        let t = TableName::new("public".to_string(), "o".to_string());
        let filters = vec![(
            t.clone(),
            Trial {
                printed: "(v > 1)".into(),
                attnums: vec![2],
                written: "v > 1".into(),
                normalised: true,
            },
        )];
        assert_eq!(with_filter(&t, &filters), r#""public"."o" WHERE (v > 1)"#);
        let other = TableName::new("public".to_string(), "p".to_string());
        assert_eq!(with_filter(&other, &filters), r#""public"."p""#);
    }
}
