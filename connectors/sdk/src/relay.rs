//! Events read back from Kafka, for relay pipelines.
//!
//! A relay consumes what a capture published (Avro decoded through the
//! registry, or JSON) as the Debezium envelope in JSON form, and must hand
//! its sinks the same [`ChangeEvent`]s the capture would have. The column
//! types are not in the envelope, so values come back as the JSON-shaped
//! variants that render to exactly the JSON they were read from: a sink
//! writing `json::row` of a relayed event writes what the capture's JSON
//! encoder wrote. The commit LSN travels in `source.commit_lsn`, so versions
//! (and therefore stale-write protection) survive the trip.
//!
//! When the relay knows the columns' types (from the Avro writer schema, see
//! [`event_from_envelope_typed`]) the rebuilt table carries them, so a sink
//! can derive what depends on them (an index mapping); the values stay in
//! their JSON form either way.

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::Value as Json;

use crate::event::{ChangeEvent, Op, SnapshotMarker, SourceInfo, TransactionInfo};
use crate::json::DEFAULT_UNAVAILABLE_PLACEHOLDER;
use crate::position::Lsn;
use crate::table::{Column, PgType, ReplicaIdentity, TableSchema};
use crate::value::Value;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a walcast/Debezium change event: {0}")]
pub struct EnvelopeError(pub String);

fn value(j: &Json) -> Value {
    match j {
        Json::Null => Value::Null,
        Json::Bool(b) => Value::Bool(*b),
        Json::Number(n) => match n.as_i64() {
            Some(i) => Value::Int64(i),
            None => Value::Float64(n.as_f64().unwrap_or(f64::NAN)),
        },
        Json::String(s) if s == DEFAULT_UNAVAILABLE_PLACEHOLDER => Value::Unavailable,
        Json::String(s) => Value::Text(s.clone()),
        Json::Array(a) => Value::Array(a.iter().map(value).collect()),
        Json::Object(_) => Value::Json(j.to_string()),
    }
}

/// Rebuilds an event from its key (`None` for a key-less table or a
/// truncate) and its envelope. Returns `Ok(None)` for a transaction
/// metadata record or anything else without `op`.
pub fn event_from_envelope(
    key: Option<&Json>,
    env: &Json,
) -> Result<Option<ChangeEvent>, EnvelopeError> {
    event_from_envelope_typed(key, env, None)
}

/// As [`event_from_envelope`], with the columns' Postgres types where
/// `types` knows them (by column name); the others are
/// [`PgType::Unknown`].
pub fn event_from_envelope_typed(
    key: Option<&Json>,
    env: &Json,
    types: Option<&HashMap<String, PgType>>,
) -> Result<Option<ChangeEvent>, EnvelopeError> {
    let Some(op) = env.get("op").and_then(Json::as_str) else {
        return Ok(None);
    };
    let op = match op {
        "c" => Op::Create,
        "u" => Op::Update,
        "d" => Op::Delete,
        "t" => Op::Truncate,
        "r" => Op::Read,
        other => return Err(EnvelopeError(format!("unknown op {other:?}"))),
    };
    let src = env
        .get("source")
        .ok_or_else(|| EnvelopeError("no `source` block".into()))?;
    let s = |k: &str| {
        src.get(k)
            .and_then(Json::as_str)
            .unwrap_or_default()
            .to_string()
    };
    let n = |k: &str| src.get(k).and_then(Json::as_i64);
    let before = env.get("before").filter(|v| !v.is_null());
    let after = env.get("after").filter(|v| !v.is_null());
    let image = after.or(before);
    let key_names: Vec<String> = key
        .and_then(Json::as_object)
        .map(|k| k.keys().cloned().collect())
        .unwrap_or_default();
    let columns: Vec<Column> = match image.and_then(Json::as_object) {
        Some(row) => row
            .keys()
            .map(|name| Column {
                name: name.clone(),
                pg_type: types.and_then(|t| t.get(name)).cloned().unwrap_or_else(|| {
                    PgType::Unknown {
                        type_name: "relayed".into(),
                    }
                }),
                type_oid: 0,
                type_modifier: -1,
                nullable: true,
                key: key_names.contains(name),
            })
            .collect(),
        None => Vec::new(),
    };
    let row = |img: Option<&Json>| -> Option<Vec<Value>> {
        let obj = img?.as_object()?;
        Some(
            columns
                .iter()
                .map(|c| obj.get(&c.name).map(value).unwrap_or(Value::Null))
                .collect(),
        )
    };
    let table = Arc::new(TableSchema {
        relation_id: 0,
        schema: s("schema"),
        name: s("table"),
        columns: columns.clone(),
        replica_identity: ReplicaIdentity::Default,
        version: 0,
    });
    let ts_ms = n("ts_ms").unwrap_or(0);
    let snapshot = match s("snapshot").as_str() {
        "true" => SnapshotMarker::True,
        "first" => SnapshotMarker::First,
        "last" => SnapshotMarker::Last,
        "incremental" => SnapshotMarker::Incremental,
        _ => SnapshotMarker::False,
    };
    let lsn = Lsn(n("lsn").unwrap_or(0) as u64);
    Ok(Some(ChangeEvent {
        op,
        before: row(before),
        after: row(after),
        source: SourceInfo {
            name: s("name"),
            db: s("db"),
            lsn,
            // Older producers without commit_lsn: the change's own LSN still
            // orders versions of one row.
            commit_lsn: n("commit_lsn").map(|l| Lsn(l as u64)).unwrap_or(lsn),
            tx_id: n("txId").map(|t| t as u32),
            ts_ms,
            ts_us: n("ts_us").unwrap_or(ts_ms * 1000),
            snapshot,
        },
        transaction: env
            .get("transaction")
            .filter(|t| !t.is_null())
            .map(|t| TransactionInfo {
                id: t
                    .get("id")
                    .and_then(Json::as_str)
                    .unwrap_or_default()
                    .to_string(),
                total_order: t.get("total_order").and_then(Json::as_u64).unwrap_or(0),
                data_collection_order: t
                    .get("data_collection_order")
                    .and_then(Json::as_u64)
                    .unwrap_or(0),
            }),
        table,
        ts_ms: env.get("ts_ms").and_then(Json::as_i64).unwrap_or(0),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::json::{self, JsonOptions};

    #[test]
    fn relayed_events_render_the_json_they_came_from() {
        let env = serde_json::json!({
            "before": null,
            "after": {"id": 7, "name": "x", "price": "1.50", "big": "__debezium_unavailable_value", "tags": ["a"], "f": 1.5},
            "source": {"name": "p", "db": "d", "schema": "public", "table": "t", "lsn": 10, "commit_lsn": 20, "txId": 3, "ts_ms": 5, "snapshot": "false"},
            "op": "u", "ts_ms": 9, "transaction": null
        });
        let key = serde_json::json!({"id": 7});
        let e = event_from_envelope(Some(&key), &env).unwrap().unwrap();
        assert_eq!(e.op, Op::Update);
        assert_eq!(e.version(), 20);
        // Column order follows the JSON map's, which depends on serde_json's
        // features: look the column up by name.
        let big = e.table.column_index("big").unwrap();
        assert_eq!(e.after.as_ref().unwrap()[big], Value::Unavailable);
        let opts = JsonOptions::default();
        assert_eq!(
            json::row(&e.table, e.after.as_ref().unwrap(), &opts),
            env["after"]
        );
        assert_eq!(json::key(&e, &opts).unwrap(), key);
        assert!(
            event_from_envelope(None, &serde_json::json!({"status": "BEGIN"}))
                .unwrap()
                .is_none()
        );
    }
}
