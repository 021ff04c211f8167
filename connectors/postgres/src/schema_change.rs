//! Schema-change events: a captured table's columns changed.
//!
//! # Where a change shows
//!
//! pgoutput describes a table with a Relation message before the first
//! change of it in a session, and again whenever its shape changed since
//! (it compares with what it sent). So a Relation message whose columns
//! (name, type, nullability, key) differ from the last description walcast
//! saw *is* the schema change, at the position of the first row of the new
//! shape: the event goes into the stream right there, before that row.
//! ALTERs that change nothing a consumer sees (a default, a comment) and
//! DDL on tables not captured produce no event. A rewrite that keeps the
//! columns (`ALTER TYPE` to the same type) produces none either.
//!
//! # What "last seen" means
//!
//! [`SchemaHistory`] remembers, per relation, the shapes this process saw
//! and the LSN each was first seen at. It outlives sessions: after a
//! reconnect the replay starts from the confirmed position, so entries
//! newer than that position are forgotten ([`SchemaHistory::rewind`]), and
//! a change whose event was not acknowledged is announced again (at least
//! once, like every event). The first description of a table in a process
//! is the baseline: a change made while walcast was stopped is not
//! announced, since nothing of the old shape is known then (with
//! `ddl_capture`, the DDL statement still arrives, from the WAL).
//!
//! # DDL text
//!
//! With `ddl_capture = true` walcast installs an event trigger that calls
//! `pg_logical_emit_message(true, 'walcast.ddl', current_query())` at
//! `ddl_command_end`, so the statement travels in the WAL inside its own
//! transaction, committed or not with it. It becomes an event of its own on
//! the same topic, published before the schema change it causes (the DDL
//! commits before any row of the new shape can). The trigger fires for
//! every DDL statement of the database, captured tables or not.

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::{json, Value as Json};
use walcast_sdk::notice::{self, NoticeKind};
use walcast_sdk::{ChangeEvent, Column, Lsn, PgType, SourceInfo, TableSchema};

/// The prefix of the logical messages the DDL trigger writes.
pub const DDL_MESSAGE_PREFIX: &str = "walcast.ddl";
/// The event trigger and its function, in the `public` schema.
pub const DDL_TRIGGER: &str = "walcast_ddl_capture";

/// The SQL that installs the DDL trigger (idempotent). Needs a superuser
/// (event triggers are owned by one), so `walcast check` prints it for a
/// DBA to run when walcast's user cannot. The function runs as whoever
/// issued the DDL (`pg_logical_emit_message` is open to every role) and
/// never fails their statement: an error becomes a warning, and that
/// statement's text is then missing from the stream.
pub fn ddl_trigger_sql() -> String {
    format!(
        "CREATE OR REPLACE FUNCTION public.{DDL_TRIGGER}() RETURNS event_trigger LANGUAGE plpgsql \
         SET search_path = pg_catalog AS $walcast$ \
         BEGIN PERFORM pg_logical_emit_message(true, '{DDL_MESSAGE_PREFIX}', current_query()); \
         EXCEPTION WHEN OTHERS THEN RAISE WARNING 'walcast DDL capture: %', SQLERRM; END $walcast$; \
         DO $walcast$ BEGIN \
           IF NOT EXISTS (SELECT 1 FROM pg_event_trigger WHERE evtname = '{DDL_TRIGGER}') THEN \
             CREATE EVENT TRIGGER {DDL_TRIGGER} ON ddl_command_end EXECUTE FUNCTION public.{DDL_TRIGGER}(); \
           END IF; \
         END $walcast$;"
    )
}

/// The columns a consumer sees, in order: what a schema change compares.
fn shape(t: &TableSchema) -> Vec<(&str, u32, i32, bool, bool)> {
    t.columns
        .iter()
        .map(|c| {
            (
                c.name.as_str(),
                c.type_oid,
                c.type_modifier,
                c.nullable,
                c.key,
            )
        })
        .collect()
}

/// Shapes seen per relation, with the LSN each was first seen at (see the
/// module docs).
#[derive(Default)]
pub struct SchemaHistory {
    seen: HashMap<u32, Vec<(Lsn, Arc<TableSchema>)>>,
}

impl SchemaHistory {
    /// A new session replays from `start`: forget shapes first seen after
    /// it (their changes come again), keeping each table's oldest shape.
    pub fn rewind(&mut self, start: Lsn) {
        for shapes in self.seen.values_mut() {
            while shapes.len() > 1 && shapes.last().is_some_and(|(at, _)| *at > start) {
                shapes.pop();
            }
        }
    }

    /// The table as described in the transaction that commits at `lsn`;
    /// returns the previous shape when the columns changed (a
    /// schema-change event is due). Positions are commit LSNs, which the
    /// stream delivers in order and which compare with confirmed positions.
    pub fn observe(&mut self, table: &Arc<TableSchema>, lsn: Lsn) -> Option<Arc<TableSchema>> {
        let shapes = self.seen.entry(table.relation_id).or_default();
        let Some((at, last)) = shapes.last() else {
            shapes.push((lsn, Arc::clone(table)));
            return None;
        };
        if shape(last) == shape(table) {
            return None;
        }
        let previous = Arc::clone(last);
        // Two shapes in one transaction share its commit LSN.
        let newer = lsn >= *at;
        shapes.push((lsn, Arc::clone(table)));
        // An older description (a replay reaching back before a change
        // already seen) is not a change forward.
        newer.then_some(previous)
    }
}

/// A column's type as `format_type` would show it, close enough for a
/// reader: lengths and precision included.
fn type_text(c: &Column) -> String {
    match &c.pg_type {
        PgType::Varchar {
            max_length: Some(n),
        } => format!("character varying({n})"),
        PgType::Char { length: Some(n) } => format!("character({n})"),
        t => t.sql_name(),
    }
}

fn columns(t: &TableSchema) -> Json {
    Json::Array(
        t.columns
            .iter()
            .map(|c| {
                json!({
                    "name": c.name,
                    "type": type_text(c),
                    "type_oid": c.type_oid,
                    "type_modifier": c.type_modifier,
                    "nullable": c.nullable,
                    "key": c.key,
                })
            })
            .collect(),
    )
}

fn source_block(s: &SourceInfo, table: Option<&TableSchema>) -> Json {
    json!({
        "version": env!("CARGO_PKG_VERSION"),
        "connector": "postgresql",
        "name": s.name,
        "ts_ms": s.ts_ms,
        "ts_us": s.ts_us,
        "snapshot": "false",
        "db": s.db,
        "schema": table.map(|t| t.schema.as_str()),
        "table": table.map(|t| t.name.as_str()),
        "txId": s.tx_id,
        "lsn": s.lsn.0,
        "commit_lsn": s.commit_lsn.0,
    })
}

/// Debezium's schema-change topic key: the database.
fn key(s: &SourceInfo) -> String {
    json!({ "databaseName": s.db }).to_string()
}

/// The schema-change event: the table, its columns before and after, and
/// which columns were added, dropped or altered.
pub fn event(old: &TableSchema, new: &TableSchema, source: SourceInfo, ts_ms: i64) -> ChangeEvent {
    let named = |t: &TableSchema, n: &str| t.columns.iter().find(|c| c.name == n).cloned();
    let added: Vec<&str> = new
        .columns
        .iter()
        .filter(|c| named(old, &c.name).is_none())
        .map(|c| c.name.as_str())
        .collect();
    let dropped: Vec<&str> = old
        .columns
        .iter()
        .filter(|c| named(new, &c.name).is_none())
        .map(|c| c.name.as_str())
        .collect();
    let altered: Vec<&str> = new
        .columns
        .iter()
        .filter(|c| named(old, &c.name).is_some_and(|o| o != **c))
        .map(|c| c.name.as_str())
        .collect();
    let value = json!({
        "type": "ALTER",
        "table": { "schema": new.schema, "name": new.name },
        "before": { "columns": columns(old) },
        "after": { "columns": columns(new) },
        "changes": { "added": added, "dropped": dropped, "altered": altered },
        "source": source_block(&source, Some(new)),
        "ts_ms": ts_ms,
    });
    notice::document(
        NoticeKind::SchemaChange,
        key(&source),
        value.to_string(),
        source,
        ts_ms,
    )
}

/// A DDL statement captured by the trigger.
pub fn ddl_event(ddl: &str, source: SourceInfo, ts_ms: i64) -> ChangeEvent {
    let value = json!({
        "type": "DDL",
        "ddl": ddl,
        "source": source_block(&source, None),
        "ts_ms": ts_ms,
    });
    notice::document(
        NoticeKind::Ddl,
        key(&source),
        value.to_string(),
        source,
        ts_ms,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use walcast_sdk::{ReplicaIdentity, SnapshotMarker};

    fn col(name: &str, pg_type: PgType, oid: u32, nullable: bool, key: bool) -> Column {
        Column {
            key_position: None,
            default: None,
            name: name.into(),
            pg_type,
            type_oid: oid,
            type_modifier: -1,
            nullable,
            key,
        }
    }

    fn table(columns: Vec<Column>, version: u32) -> Arc<TableSchema> {
        Arc::new(TableSchema {
            relation_id: 42,
            schema: "public".into(),
            name: "items".into(),
            columns,
            replica_identity: ReplicaIdentity::Default,
            version,
        })
    }

    fn v1() -> Arc<TableSchema> {
        table(
            vec![
                col("id", PgType::Int4, 23, false, true),
                col("name", PgType::Text, 25, true, false),
            ],
            1,
        )
    }

    fn v2() -> Arc<TableSchema> {
        table(
            vec![
                col("id", PgType::Int8, 20, false, true),
                col(
                    "label",
                    PgType::Varchar {
                        max_length: Some(20),
                    },
                    1043,
                    true,
                    false,
                ),
            ],
            2,
        )
    }

    #[test]
    fn a_changed_description_is_a_change_and_a_replay_is_not() {
        let mut h = SchemaHistory::default();
        assert!(h.observe(&v1(), Lsn(10)).is_none(), "the baseline");
        assert!(h.observe(&v1(), Lsn(20)).is_none(), "same columns");
        // Only the version differs: no change a consumer sees.
        let same = table(v1().columns.clone(), 9);
        assert!(h.observe(&same, Lsn(25)).is_none());
        let old = h.observe(&v2(), Lsn(30)).expect("a change");
        assert_eq!(old.columns[0].type_oid, 23);
        // The session breaks before the change was delivered: the replay
        // from 15 describes v1, then v2 again, which is announced again.
        h.rewind(Lsn(15));
        assert!(h.observe(&v1(), Lsn(16)).is_none());
        assert!(h.observe(&v2(), Lsn(30)).is_some(), "announced again");
        // A replay from before the change that starts with v2 already
        // known, then meets v1 (older WAL): not a change forward.
        let mut h = SchemaHistory::default();
        h.observe(&v2(), Lsn(30));
        assert!(h.observe(&v1(), Lsn(16)).is_none());
    }

    #[test]
    fn the_trigger_sql_is_idempotent_and_cannot_fail_a_ddl() {
        let sql = ddl_trigger_sql();
        assert!(sql.contains("CREATE OR REPLACE FUNCTION public.walcast_ddl_capture()"));
        assert!(sql.contains("IF NOT EXISTS (SELECT 1 FROM pg_event_trigger"));
        assert!(sql.contains("EXCEPTION WHEN OTHERS THEN RAISE WARNING"));
        assert!(sql.contains("ON ddl_command_end"));
    }

    #[test]
    fn the_event_names_old_and_new_columns() {
        let source = SourceInfo {
            name: "shop".into(),
            db: "app".into(),
            lsn: Lsn(30),
            commit_lsn: Lsn(40),
            tx_id: Some(7),
            ts_ms: 1,
            ts_us: 1000,
            snapshot: SnapshotMarker::False,
        };
        let e = event(&v1(), &v2(), source, 5);
        let Some(notice::Notice::Document { kind, key, value }) = notice::read(&e) else {
            panic!()
        };
        assert_eq!(kind, NoticeKind::SchemaChange);
        assert_eq!(key, r#"{"databaseName":"app"}"#);
        let v: Json = serde_json::from_str(value).unwrap();
        assert_eq!(v["table"]["name"], "items");
        assert_eq!(v["before"]["columns"][0]["type"], "integer");
        assert_eq!(v["after"]["columns"][0]["type"], "bigint");
        assert_eq!(v["after"]["columns"][1]["type"], "character varying(20)");
        assert_eq!(v["changes"]["added"], json!(["label"]));
        assert_eq!(v["changes"]["dropped"], json!(["name"]));
        assert_eq!(v["changes"]["altered"], json!(["id"]));
        assert_eq!(v["source"]["lsn"], 30);
        assert_eq!(v["source"]["txId"], 7);
    }
}
