//! The outbox event router (Debezium's `io.debezium.transforms.outbox.EventRouter`):
//! rows inserted into an outbox table become messages on a topic per
//! aggregate type, keyed by the aggregate id, with the payload as the value.
//!
//! # Why
//!
//! A service that must update its tables and tell others about it writes
//! the message into an outbox table in the same transaction; capturing that
//! table turns the commit into the message, exactly when (and only if) the
//! transaction commits. Consumers want the message, not a row-change
//! envelope, so the outbox table's changes are rewritten here instead of
//! being published as row changes.
//!
//! # What is published
//!
//! Only inserts (`op = c`) are messages, as in Debezium. Deleting the row
//! right after inserting it (the usual way to keep the table empty) and
//! snapshot reads produce nothing; an update is ignored with a warning. The
//! record's key is the aggregate id and its value the payload, rendered as
//! Debezium's JsonConverter (schemas off) renders them: a JSON string for a
//! `text`/`jsonb` payload unless `expand_json_payload` writes a JSON payload
//! as the document itself. A null payload is a tombstone. Headers: `id`
//! (the event id), `type` (the event type), one per `fields_as_headers`
//! column, and walcast's usual `walcast.lsn`/`walcast.txid`. Outbox records
//! are JSON whatever the pipeline's `format`.
//!
//! # The outbox without a table
//!
//! With `message_prefix`, a logical decoding message written with
//! `pg_logical_emit_message(true, '<prefix>', '<json>')` is published the
//! same way, without a table to insert into and clean up (no bloat, no
//! vacuum). The content is a JSON object whose fields are named like the
//! outbox table's columns (`id`, `aggregatetype`, `aggregateid`, `type`,
//! `payload`, the `*_column` settings rename them); `aggregatetype` is
//! required, the others may be absent (null). The key is the aggregate id,
//! the value the payload (a JSON string holding a non-string payload unless
//! `expand_json_payload`, as for a `jsonb` column), headers `id` (the
//! message's LSN, `X/X`, when the content has no id: stable across
//! replays, so consumers can de-duplicate), `type`, the `fields_as_headers`
//! fields, and `walcast.transactional`.
//!
//! A transactional message (first argument `true`) is published only if
//! its transaction commits, in commit order. A non-transactional one is
//! published as soon as it is decoded, even if its transaction rolls back:
//! that is what `false` asks Postgres for.
//!
//! The planners ([`plan`], [`plan_message`]) are pure; the sink produces
//! what they return.

use serde::Deserialize;
use walcast_sdk::json::{self, JsonOptions};
use walcast_sdk::{ChangeEvent, Op, Value};

/// `outbox = { table = "public.outbox", ... }` in a Kafka sink.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutboxConfig {
    /// The outbox table, `schema.table`.
    #[serde(default)]
    pub table: Option<String>,
    /// The prefix of logical decoding messages published as outbox
    /// messages (the outbox without a table).
    #[serde(default)]
    pub message_prefix: Option<String>,
    /// The topic name; `${routedByValue}` is replaced by the aggregate type
    /// (Debezium's `route.topic.replacement`).
    #[serde(default = "default_topic")]
    pub topic: String,
    #[serde(default = "default_id")]
    pub id_column: String,
    #[serde(default = "default_aggregate_type")]
    pub aggregate_type_column: String,
    #[serde(default = "default_aggregate_id")]
    pub aggregate_id_column: String,
    #[serde(default = "default_type")]
    pub type_column: String,
    #[serde(default = "default_payload")]
    pub payload_column: String,
    /// Other columns carried as headers named after them.
    #[serde(default)]
    pub fields_as_headers: Vec<String>,
    /// A JSON payload becomes the record's value as is, not a JSON string
    /// holding it (Debezium's `table.expand.json.payload`, default off).
    #[serde(default)]
    pub expand_json_payload: bool,
}

fn default_topic() -> String {
    "outbox.event.${routedByValue}".into()
}
fn default_id() -> String {
    "id".into()
}
fn default_aggregate_type() -> String {
    "aggregatetype".into()
}
fn default_aggregate_id() -> String {
    "aggregateid".into()
}
fn default_type() -> String {
    "type".into()
}
fn default_payload() -> String {
    "payload".into()
}

/// One message to produce.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxRecord {
    pub topic: String,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub headers: Vec<(String, Option<Vec<u8>>)>,
}

/// Why an outbox row or message cannot become a message (definite: the
/// table, the producer of the messages or the config must change).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("outbox {table}: {message}")]
pub struct OutboxError {
    /// `table public.outbox` or `message prefix 'outbox' at LSN 0/1234`.
    pub table: String,
    pub message: String,
}

impl OutboxConfig {
    /// Whether `event` belongs to the outbox table.
    pub fn matches(&self, event: &ChangeEvent) -> bool {
        self.table
            .as_deref()
            .and_then(|t| t.split_once('.'))
            .is_some_and(|(schema, name)| schema == event.table.schema && name == event.table.name)
    }

    /// Whether a logical message of `prefix` is an outbox message.
    pub fn matches_prefix(&self, prefix: &str) -> bool {
        self.message_prefix.as_deref() == Some(prefix)
    }
}

/// Header on message-outbox records: whether the message was transactional.
pub const TRANSACTIONAL_HEADER: &str = "walcast.transactional";

/// The message for a logical decoding message of the outbox prefix (see
/// the module docs). `lsn` is the message's own position.
pub fn plan_message(
    cfg: &OutboxConfig,
    prefix: &str,
    content: &[u8],
    transactional: bool,
    lsn: walcast_sdk::Lsn,
) -> Result<OutboxRecord, OutboxError> {
    let err = |message: String| {
        OutboxError {
        table: format!("message prefix '{prefix}' at LSN {lsn}"),
        message: format!(
            "{message}; the pipeline stops here (fix what emits these messages, then skip this one with \
             SELECT pg_replication_slot_advance('<slot>', '<an LSN past {lsn}>'))"
        ),
    }
    };
    let doc: serde_json::Value = serde_json::from_slice(content)
        .map_err(|e| err(format!("the content is not JSON ({e})")))?;
    let serde_json::Value::Object(fields) = doc else {
        return Err(err("the content is not a JSON object".into()));
    };
    let null = serde_json::Value::Null;
    let get = |name: &str| fields.get(name).unwrap_or(&null);
    let text = |v: &serde_json::Value| -> Option<String> {
        match v {
            serde_json::Value::Null => None,
            serde_json::Value::String(s) => Some(s.clone()),
            other => Some(other.to_string()),
        }
    };
    let routed = text(get(&cfg.aggregate_type_column)).ok_or_else(|| {
        err(format!(
            "`{}` is missing or null: the message has no topic",
            cfg.aggregate_type_column
        ))
    })?;
    let topic = cfg.topic.replace("${routedByValue}", &routed);
    let key = match get(&cfg.aggregate_id_column) {
        serde_json::Value::Null => None,
        v => Some(serde_json::to_vec(v).expect("JSON")),
    };
    let value = match get(&cfg.payload_column) {
        serde_json::Value::Null => None,
        v @ serde_json::Value::String(_) => Some(serde_json::to_vec(v).expect("JSON")),
        v if cfg.expand_json_payload => Some(serde_json::to_vec(v).expect("JSON")),
        // As a `jsonb` payload column renders without expansion: a JSON
        // string holding the document.
        v => Some(serde_json::to_vec(&serde_json::Value::String(v.to_string())).expect("JSON")),
    };
    let id = text(get(&cfg.id_column)).unwrap_or_else(|| lsn.to_string());
    let mut headers = vec![
        ("id".to_string(), Some(id.into_bytes())),
        (
            "type".to_string(),
            text(get(&cfg.type_column)).map(String::into_bytes),
        ),
    ];
    for h in &cfg.fields_as_headers {
        headers.push((h.clone(), text(get(h)).map(String::into_bytes)));
    }
    headers.push((
        TRANSACTIONAL_HEADER.to_string(),
        Some(transactional.to_string().into_bytes()),
    ));
    Ok(OutboxRecord {
        topic,
        key,
        value,
        headers,
    })
}

/// The message for an outbox table's event, or `None` when the event is
/// not one (anything but an insert).
pub fn plan(cfg: &OutboxConfig, event: &ChangeEvent) -> Result<Option<OutboxRecord>, OutboxError> {
    match event.op {
        Op::Create => {}
        Op::Update => {
            tracing::warn!(table = %event.table.qualified_name(), lsn = %event.source.commit_lsn,
                "outbox: an update of an outbox row is ignored (only inserts are messages)");
            return Ok(None);
        }
        _ => return Ok(None),
    }
    let err = |message: String| OutboxError {
        table: format!("table {}", event.table.qualified_name()),
        message,
    };
    let row = event
        .after
        .as_deref()
        .ok_or_else(|| err("an insert without its row".into()))?;
    let get = |col: &str| -> Result<&Value, OutboxError> {
        let i = event.table.column_index(col).ok_or_else(|| {
            err(format!(
                "has no column `{col}` (set the outbox's *_column names)"
            ))
        })?;
        Ok(&row[i])
    };
    let opts = JsonOptions::default();
    let text = |v: &Value| -> Option<String> {
        match json::value(v, &opts) {
            serde_json::Value::Null => None,
            serde_json::Value::String(s) => Some(s),
            other => Some(other.to_string()),
        }
    };
    let routed = text(get(&cfg.aggregate_type_column)?).ok_or_else(|| {
        err(format!(
            "`{}` is null: the row has no topic",
            cfg.aggregate_type_column
        ))
    })?;
    let topic = cfg.topic.replace("${routedByValue}", &routed);
    let key = match get(&cfg.aggregate_id_column)? {
        Value::Null => None,
        v => Some(serde_json::to_vec(&json::value(v, &opts)).expect("JSON")),
    };
    let value = match get(&cfg.payload_column)? {
        Value::Null => None,
        Value::Unavailable => {
            return Err(err(
                "the payload is an unchanged TOASTed value, which an insert never has".into(),
            ))
        }
        Value::Json(s) if cfg.expand_json_payload => Some(s.as_bytes().to_vec()),
        v => Some(serde_json::to_vec(&json::value(v, &opts)).expect("JSON")),
    };
    let mut headers = vec![
        (
            "id".to_string(),
            text(get(&cfg.id_column)?).map(String::into_bytes),
        ),
        (
            "type".to_string(),
            text(get(&cfg.type_column)?).map(String::into_bytes),
        ),
    ];
    for h in &cfg.fields_as_headers {
        headers.push((h.clone(), text(get(h)?).map(String::into_bytes)));
    }
    Ok(Some(OutboxRecord {
        topic,
        key,
        value,
        headers,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use walcast_sdk::{
        Column, Lsn, PgType, ReplicaIdentity, SnapshotMarker, SourceInfo, TableSchema,
    };

    fn cfg(extra: &str) -> OutboxConfig {
        serde_json::from_str(&format!(r#"{{"table": "public.outbox"{extra}}}"#)).unwrap()
    }

    fn event(op: Op, payload: Value) -> ChangeEvent {
        let col = |name: &str, pg_type: PgType| Column {
            key_position: None,
            default: None,
            name: name.into(),
            pg_type,
            type_oid: 0,
            type_modifier: -1,
            nullable: true,
            key: name == "id",
        };
        let table = Arc::new(TableSchema {
            relation_id: 1,
            schema: "public".into(),
            name: "outbox".into(),
            columns: vec![
                col("id", PgType::Uuid),
                col("aggregatetype", PgType::Text),
                col("aggregateid", PgType::Text),
                col("type", PgType::Text),
                col("payload", PgType::Jsonb),
                col("tenant", PgType::Text),
            ],
            replica_identity: ReplicaIdentity::Default,
            version: 1,
        });
        let row = vec![
            Value::Uuid([1; 16]),
            Value::Text("order".into()),
            Value::Text("42".into()),
            Value::Text("OrderCreated".into()),
            payload,
            Value::Text("acme".into()),
        ];
        ChangeEvent {
            op,
            table,
            before: None,
            after: Some(row),
            source: SourceInfo {
                name: "p".into(),
                db: "d".into(),
                lsn: Lsn(1),
                commit_lsn: Lsn(2),
                tx_id: Some(1),
                ts_ms: 0,
                ts_us: 0,
                snapshot: SnapshotMarker::False,
            },
            transaction: None,
            ts_ms: 0,
        }
    }

    #[test]
    fn an_insert_becomes_a_message_like_debeziums_event_router() {
        let r = plan(
            &cfg(r#", "fields_as_headers": ["tenant"]"#),
            &event(Op::Create, Value::Json(r#"{"total": 5}"#.into())),
        )
        .unwrap()
        .unwrap();
        assert_eq!(r.topic, "outbox.event.order");
        assert_eq!(r.key.as_deref(), Some(&b"\"42\""[..]));
        // JsonConverter without expansion: a JSON string holding the document.
        assert_eq!(r.value.as_deref(), Some(&br#""{\"total\": 5}""#[..]));
        assert_eq!(
            r.headers[0],
            (
                "id".into(),
                Some(b"01010101-0101-0101-0101-010101010101".to_vec())
            )
        );
        assert_eq!(
            r.headers[1],
            ("type".into(), Some(b"OrderCreated".to_vec()))
        );
        assert_eq!(r.headers[2], ("tenant".into(), Some(b"acme".to_vec())));
    }

    #[test]
    fn expansion_topic_template_tombstones_and_ignored_operations() {
        let c = cfg(r#", "expand_json_payload": true, "topic": "events.${routedByValue}.v1""#);
        let r = plan(
            &c,
            &event(Op::Create, Value::Json(r#"{"total": 5}"#.into())),
        )
        .unwrap()
        .unwrap();
        assert_eq!(r.topic, "events.order.v1");
        assert_eq!(r.value.as_deref(), Some(&br#"{"total": 5}"#[..]));
        assert_eq!(
            plan(&c, &event(Op::Create, Value::Null))
                .unwrap()
                .unwrap()
                .value,
            None
        );
        for op in [Op::Update, Op::Delete, Op::Read, Op::Truncate] {
            assert_eq!(plan(&c, &event(op, Value::Null)).unwrap(), None, "{op:?}");
        }
    }

    #[test]
    fn a_logical_message_is_routed_like_an_outbox_row() {
        let c: OutboxConfig = serde_json::from_str(
            r#"{"message_prefix": "outbox", "fields_as_headers": ["tenant"]}"#,
        )
        .unwrap();
        assert!(c.matches_prefix("outbox") && !c.matches_prefix("outbox2"));
        assert!(!c.matches(&event(Op::Create, Value::Null)), "no table");
        let r = plan_message(
            &c,
            "outbox",
            br#"{"aggregatetype": "order", "aggregateid": 42, "type": "OrderCreated",
                 "payload": {"total": 5}, "tenant": "acme"}"#,
            true,
            walcast_sdk::Lsn(0x16_B374_D848),
        )
        .unwrap();
        assert_eq!(r.topic, "outbox.event.order");
        assert_eq!(r.key.as_deref(), Some(&b"42"[..]));
        assert_eq!(r.value.as_deref(), Some(&br#""{\"total\":5}""#[..]));
        assert_eq!(r.headers[0], ("id".into(), Some(b"16/B374D848".to_vec())));
        assert_eq!(
            r.headers[1],
            ("type".into(), Some(b"OrderCreated".to_vec()))
        );
        assert_eq!(r.headers[2], ("tenant".into(), Some(b"acme".to_vec())));
        assert_eq!(
            r.headers[3],
            (TRANSACTIONAL_HEADER.into(), Some(b"true".to_vec()))
        );
        let expanded = OutboxConfig {
            expand_json_payload: true,
            ..c.clone()
        };
        let r = plan_message(
            &expanded,
            "outbox",
            br#"{"id": "e-1", "aggregatetype": "order", "payload": {"total": 5}}"#,
            false,
            walcast_sdk::Lsn(1),
        )
        .unwrap();
        assert_eq!(r.value.as_deref(), Some(&br#"{"total":5}"#[..]));
        assert_eq!(r.key, None);
        assert_eq!(r.headers[0], ("id".into(), Some(b"e-1".to_vec())));
        for bad in [&b"not json"[..], b"[1]", br#"{"payload": 1}"#] {
            let e = plan_message(&c, "outbox", bad, true, walcast_sdk::Lsn(1)).unwrap_err();
            assert!(
                e.to_string().contains("message prefix 'outbox' at LSN 0/1"),
                "{e}"
            );
        }
    }

    #[test]
    fn a_missing_column_is_named() {
        let e = plan(
            &cfg(r#", "payload_column": "body""#),
            &event(Op::Create, Value::Null),
        )
        .unwrap_err();
        assert!(e.to_string().contains("`body`"), "{e}");
    }
}
