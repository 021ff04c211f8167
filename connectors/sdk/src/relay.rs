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
//!
//! The key columns' order is not in the envelope either, and a parsed
//! `serde_json::Map` has lost it (it sorts its members by name): a
//! composite key rebuilt from the map would name a row `k:1` where the
//! capture, and any sink fed directly, names it `1:k` (`{id}` in a Redis
//! key, an OpenSearch `_id`). So the caller passes the key's columns in
//! the order the key record was written ([`json_member_names`] for a JSON
//! key, the key's writer schema for Avro), and the rebuilt table has them
//! in that order.
//!
//! A JSON record is read by [`event_from_json_bytes`] straight into the
//! envelope's parts, each row an ordered list of members: parsing it into a
//! `serde_json::Value` first built a sorted map per object and freed it
//! again, about a sixth of a relay's CPU (tests/bench/RESULTS.md, "Profiles
//! of the targets not met"). Both readers build the event through one
//! function over either form of a JSON object ([`Object`]).

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::Value as Json;

use crate::event::{ChangeEvent, Op, SnapshotMarker, SourceInfo, TransactionInfo};
use crate::json::DEFAULT_UNAVAILABLE_PLACEHOLDER;

/// Base64 of [`DEFAULT_UNAVAILABLE_PLACEHOLDER`]'s bytes.
const UNAVAILABLE_BYTEA_BASE64: &str = "X19kZWJleml1bV91bmF2YWlsYWJsZV92YWx1ZQ==";
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
        // The JSON encoder's placeholder of a bytea (base64 of its bytes)
        // and of an array (a one-element array): see json::column_value.
        Json::String(s) if s == UNAVAILABLE_BYTEA_BASE64 => Value::Unavailable,
        Json::String(s) => Value::Text(s.clone()),
        Json::Array(a) if a.len() == 1 && a[0] == DEFAULT_UNAVAILABLE_PLACEHOLDER => {
            Value::Unavailable
        }
        Json::Array(a) => Value::Array(a.iter().map(value).collect()),
        Json::Object(_) => Value::Json(j.to_string()),
    }
}

/// A column's value from its JSON form. Where the columns' types are
/// known (an Avro topic), the unchanged-TOAST placeholder also has the
/// forms Avro gives it where a string cannot go (schemas/MAPPING.md
/// "Values Avro cannot carry"): a `bytea` carries the placeholder's UTF-8
/// bytes (base64 in the JSON form), an array of strings a one-element array
/// holding it. Read as values, they overwrote a sink's stored copy with the
/// placeholder's bytes.
fn column_value(j: &Json, pg: &PgType, typed: bool) -> Value {
    if typed {
        match (pg, j) {
            (PgType::Bytea, Json::String(s))
                if base64::Engine::decode(&base64::engine::general_purpose::STANDARD, s)
                    .is_ok_and(|b| b == DEFAULT_UNAVAILABLE_PLACEHOLDER.as_bytes()) =>
            {
                return Value::Unavailable
            }
            (PgType::Array { .. }, Json::Array(items))
                if items.len() == 1 && items[0] == DEFAULT_UNAVAILABLE_PLACEHOLDER =>
            {
                return Value::Unavailable
            }
            _ => {}
        }
    }
    value(j)
}

/// The member names of a JSON object in the order they were written (a
/// parsed `serde_json::Map` sorts them). `None` when `bytes` is not a JSON
/// object.
pub fn json_member_names(bytes: &[u8]) -> Option<Vec<String>> {
    struct Names;
    impl<'de> serde::de::Visitor<'de> for Names {
        type Value = Vec<String>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(
            self,
            mut map: A,
        ) -> Result<Self::Value, A::Error> {
            let mut names = Vec::new();
            while let Some(name) = map.next_key::<String>()? {
                map.next_value::<serde::de::IgnoredAny>()?;
                names.push(name);
            }
            Ok(names)
        }
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    serde::Deserializer::deserialize_map(&mut de, Names).ok()
}

/// A JSON object as the event builder reads it: a parsed map, or the
/// members in the order they were written.
trait Object {
    fn member(&self, name: &str) -> Option<&Json>;
    fn names(&self) -> Box<dyn Iterator<Item = &String> + '_>;
    /// As `member`, for lookups made mostly in the object's own order:
    /// `hint` is where the last one was found.
    fn member_near(&self, name: &str, _hint: &mut usize) -> Option<&Json> {
        self.member(name)
    }
}

impl Object for serde_json::Map<String, Json> {
    fn member(&self, name: &str) -> Option<&Json> {
        self.get(name)
    }
    fn names(&self) -> Box<dyn Iterator<Item = &String> + '_> {
        Box::new(self.keys())
    }
}

/// A JSON object's members in the order they were written.
struct Members(Vec<(String, Json)>);

impl Object for Members {
    fn member(&self, name: &str) -> Option<&Json> {
        self.0.iter().find(|(n, _)| n == name).map(|(_, v)| v)
    }
    fn names(&self) -> Box<dyn Iterator<Item = &String> + '_> {
        Box::new(self.0.iter().map(|(n, _)| n))
    }
    /// Searches on from the last find, wrapping: the columns are the key's
    /// then the others in the record's order, so a row of n columns is read
    /// in about n comparisons instead of n²/2.
    fn member_near(&self, name: &str, hint: &mut usize) -> Option<&Json> {
        let n = self.0.len();
        let i = (0..n)
            .map(|k| (*hint + k) % n)
            .find(|&i| self.0[i].0 == name)?;
        *hint = i + 1;
        Some(&self.0[i].1)
    }
}

impl<'de> serde::Deserialize<'de> for Members {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Members;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Members, A::Error> {
                let mut members = Vec::with_capacity(map.size_hint().unwrap_or(8));
                while let Some(name) = map.next_key::<String>()? {
                    members.push((name, map.next_value::<Json>()?));
                }
                Ok(Members(members))
            }
        }
        d.deserialize_map(V)
    }
}

/// The parts of a JSON envelope the event is built from; other members
/// are skipped unparsed.
#[derive(Default)]
struct WireEnvelope {
    op: Option<Json>,
    before: Option<Members>,
    after: Option<Members>,
    /// Present (a `null` one has no fields) or not.
    source: Option<Option<Members>>,
    transaction: Option<Members>,
    ts_ms: Option<Json>,
}

impl<'de> serde::Deserialize<'de> for WireEnvelope {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = WireEnvelope;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<WireEnvelope, A::Error> {
                let mut env = WireEnvelope::default();
                while let Some(name) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                    match name.as_ref() {
                        "op" => env.op = Some(map.next_value()?),
                        "ts_ms" => env.ts_ms = Some(map.next_value()?),
                        "before" => env.before = map.next_value()?,
                        "after" => env.after = map.next_value()?,
                        "source" => env.source = Some(map.next_value()?),
                        "transaction" => env.transaction = map.next_value()?,
                        _ => {
                            map.next_value::<serde::de::IgnoredAny>()?;
                        }
                    }
                }
                Ok(env)
            }
        }
        d.deserialize_map(V)
    }
}

/// As [`event_from_envelope`], reading the envelope from a JSON record's
/// bytes without building a `serde_json::Value` of it (see the module doc).
/// Columns other than the key's keep the order the record lists them in.
pub fn event_from_json_bytes(
    key_columns: Option<&[String]>,
    bytes: &[u8],
) -> Result<Option<ChangeEvent>, EnvelopeError> {
    let env: WireEnvelope = match serde_json::from_slice(bytes) {
        Ok(env) => env,
        // Not the envelope's shape (a record that is not an object, a row
        // that is not one): read it as any JSON, as the Value reader does.
        Err(_) => {
            let v: Json = serde_json::from_slice(bytes)
                .map_err(|e| EnvelopeError(format!("not JSON: {e}")))?;
            return event_from_envelope(key_columns, &v);
        }
    };
    build_event(
        key_columns,
        Parts {
            op: env.op.as_ref(),
            before: env.before.as_ref().map(|o| o as &dyn Object),
            after: env.after.as_ref().map(|o| o as &dyn Object),
            source: env
                .source
                .as_ref()
                .map(|s| s.as_ref().map(|o| o as &dyn Object).unwrap_or(&EMPTY)),
            transaction: env.transaction.as_ref().map(|o| o as &dyn Object),
            ts_ms: env.ts_ms.as_ref(),
        },
        None,
    )
}

/// The envelope's members the event is built from, from either reader.
struct Parts<'a> {
    op: Option<&'a Json>,
    before: Option<&'a dyn Object>,
    after: Option<&'a dyn Object>,
    source: Option<&'a dyn Object>,
    transaction: Option<&'a dyn Object>,
    ts_ms: Option<&'a Json>,
}

/// Rebuilds an event from its key columns, in the key record's order
/// (`None` for a key-less table or a truncate), and its envelope. Returns
/// `Ok(None)` for a transaction metadata record or anything else without
/// `op`.
pub fn event_from_envelope(
    key_columns: Option<&[String]>,
    env: &Json,
) -> Result<Option<ChangeEvent>, EnvelopeError> {
    event_from_envelope_typed(key_columns, env, None)
}

/// As [`event_from_envelope`], with the columns' Postgres types where
/// `types` knows them (by column name); the others are
/// [`PgType::Unknown`].
pub fn event_from_envelope_typed(
    key_columns: Option<&[String]>,
    env: &Json,
    types: Option<&HashMap<String, PgType>>,
) -> Result<Option<ChangeEvent>, EnvelopeError> {
    let object = |k: &str| {
        env.get(k)
            .and_then(Json::as_object)
            .map(|o| o as &dyn Object)
    };
    build_event(
        key_columns,
        Parts {
            op: env.get("op"),
            before: object("before"),
            after: object("after"),
            source: env
                .get("source")
                .map(|s| s.as_object().map(|o| o as &dyn Object).unwrap_or(&EMPTY)),
            transaction: object("transaction"),
            ts_ms: env.get("ts_ms"),
        },
        types,
    )
}

/// A `source` member that is not an object: no fields.
static EMPTY: Members = Members(Vec::new());

fn build_event(
    key_columns: Option<&[String]>,
    env: Parts<'_>,
    types: Option<&HashMap<String, PgType>>,
) -> Result<Option<ChangeEvent>, EnvelopeError> {
    let Some(op) = env.op.and_then(Json::as_str) else {
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
        .source
        .ok_or_else(|| EnvelopeError("no `source` block".into()))?;
    let s = |k: &str| {
        src.member(k)
            .and_then(Json::as_str)
            .unwrap_or_default()
            .to_string()
    };
    let n = |k: &str| src.member(k).and_then(Json::as_i64);
    let (before, after) = (env.before, env.after);
    let image = after.or(before);
    let key_names = key_columns.unwrap_or_default();
    let columns: Vec<Column> = match image {
        // The key columns first, in the key's order (it is the order of
        // `{id}` and document ids), then the others.
        Some(row) => key_names
            .iter()
            .filter(|k| row.member(k.as_str()).is_some())
            .chain(row.names().filter(|n| !key_names.contains(n)))
            .map(|name| Column {
                key_position: None,
                default: None,
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
    let row = |img: Option<&dyn Object>| -> Option<Vec<Value>> {
        let obj = img?;
        let mut hint = 0;
        Some(
            columns
                .iter()
                .map(|c| {
                    obj.member_near(&c.name, &mut hint)
                        .map(|j| column_value(j, &c.pg_type, types.is_some()))
                        .unwrap_or(Value::Null)
                })
                .collect(),
        )
    };
    let (before, after) = (row(before), row(after));
    let table = Arc::new(TableSchema {
        relation_id: 0,
        schema: s("schema"),
        name: s("table"),
        columns,
        replica_identity: ReplicaIdentity::Default,
        version: 0,
    });
    let ts_ms = n("ts_ms").unwrap_or(0);
    let snapshot = match src
        .member("snapshot")
        .and_then(Json::as_str)
        .unwrap_or_default()
    {
        "true" => SnapshotMarker::True,
        "first" => SnapshotMarker::First,
        "last" => SnapshotMarker::Last,
        "incremental" => SnapshotMarker::Incremental,
        _ => SnapshotMarker::False,
    };
    let lsn = Lsn(n("lsn").unwrap_or(0) as u64);
    Ok(Some(ChangeEvent {
        op,
        before,
        after,
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
        transaction: env.transaction.map(|t| TransactionInfo {
            id: t
                .member("id")
                .and_then(Json::as_str)
                .unwrap_or_default()
                .to_string(),
            total_order: t.member("total_order").and_then(Json::as_u64).unwrap_or(0),
            data_collection_order: t
                .member("data_collection_order")
                .and_then(Json::as_u64)
                .unwrap_or(0),
        }),
        table,
        ts_ms: env.ts_ms.and_then(Json::as_i64).unwrap_or(0),
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
        let e = event_from_envelope(Some(&["id".to_string()]), &env)
            .unwrap()
            .unwrap();
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

    /// A composite key keeps the order its record was written in (the
    /// table's), not the byte order of the column names a parsed map has.
    #[test]
    fn composite_keys_keep_the_key_records_order() {
        let key_bytes = br#"{"region": "k", "id": 1}"#;
        let names = json_member_names(key_bytes).unwrap();
        assert_eq!(names, ["region", "id"]);
        assert_eq!(json_member_names(b"[1]"), None);
        let env = serde_json::json!({
            "before": null,
            "after": {"id": 1, "region": "k", "amount": 5, "Zed": "z"},
            "source": {"schema": "public", "table": "t", "lsn": 10, "commit_lsn": 20},
            "op": "c", "ts_ms": 9
        });
        let e = event_from_envelope(Some(&names), &env).unwrap().unwrap();
        let key: Vec<(&str, &Value)> = e.key_values().unwrap();
        assert_eq!(
            key,
            [
                ("region", &Value::Text("k".into())),
                ("id", &Value::Int64(1))
            ]
        );
        let opts = JsonOptions::default();
        assert_eq!(
            crate::json::key_bytes(&e, &opts).unwrap(),
            br#"{"region":"k","id":1}"#
        );
        // The row is the same whatever the columns' order.
        assert_eq!(
            json::row(&e.table, e.after.as_ref().unwrap(), &opts),
            env["after"]
        );
    }

    /// From an Avro topic, a `bytea` placeholder (its bytes, base64 here)
    /// and a string array's one-element placeholder are unchanged values,
    /// not data; from a JSON topic (no types) the placeholder is a string.
    #[test]
    fn avro_forms_of_the_toast_placeholder_are_unavailable() {
        let b64 = base64::Engine::encode(
            &base64::engine::general_purpose::STANDARD,
            DEFAULT_UNAVAILABLE_PLACEHOLDER,
        );
        let env = serde_json::json!({
            "before": null,
            "after": {"id": 1, "b": b64, "tags": [DEFAULT_UNAVAILABLE_PLACEHOLDER], "other": "AP8="},
            "source": {"schema": "public", "table": "t", "lsn": 10, "commit_lsn": 20},
            "op": "u", "ts_ms": 9
        });
        let types: HashMap<String, PgType> = [
            ("id".to_string(), PgType::Int8),
            ("b".to_string(), PgType::Bytea),
            ("other".to_string(), PgType::Bytea),
            (
                "tags".to_string(),
                PgType::Array {
                    element: Box::new(PgType::Text),
                },
            ),
        ]
        .into();
        let key = ["id".to_string()];
        let e = event_from_envelope_typed(Some(&key), &env, Some(&types))
            .unwrap()
            .unwrap();
        let after = e.after.as_ref().unwrap();
        let at = |c: &str| &after[e.table.column_index(c).unwrap()];
        assert_eq!(at("b"), &Value::Unavailable);
        assert_eq!(at("tags"), &Value::Unavailable);
        assert_eq!(at("other"), &Value::Text("AP8=".into()));
        // Untyped (a JSON topic): the JSON encoder's forms are the
        // placeholder (base64 of its bytes, a one-element array), another
        // base64 string is not.
        let e = event_from_envelope(Some(&key), &env).unwrap().unwrap();
        let after = e.after.as_ref().unwrap();
        let at = |c: &str| &after[e.table.column_index(c).unwrap()];
        assert_eq!(at("b"), &Value::Unavailable);
        assert_eq!(at("tags"), &Value::Unavailable);
        assert_eq!(at("other"), &Value::Text("AP8=".into()));
    }

    /// Reading a JSON record's bytes builds the event the `Value` reader
    /// builds from the same record: op, source, transaction, both rows
    /// (compared by column name), key order; only the non-key columns'
    /// order differs (the record's instead of sorted). Records that are
    /// not the envelope's shape fall back to the `Value` reader.
    #[test]
    fn the_bytes_reader_builds_the_events_the_value_reader_builds() {
        let records = [
            r#"{"before":null,"after":{"id":1,"region":"k","zeta":"z","alpha":[1,2],"big":"__debezium_unavailable_value","doc":{"a":1}},"source":{"version":"x","name":"p","db":"d","schema":"public","table":"t","lsn":10,"commit_lsn":20,"txId":3,"ts_ms":5,"ts_us":5001,"snapshot":"false","sequence":"[null,\"10\"]"},"op":"u","ts_ms":9,"transaction":{"id":"3:20","total_order":2,"data_collection_order":1}}"#,
            r#"{"before":{"id":2,"region":"q","n":null},"after":null,"source":{"schema":"s","table":"t2","lsn":30},"op":"d","ts_ms":1}"#,
            r#"{"before":null,"after":null,"source":{"schema":"s","table":"t3","lsn":40,"commit_lsn":41,"snapshot":"last"},"op":"t","ts_ms":2}"#,
            r#"{"after":{"region":"r","id":3},"source":{"schema":"s","table":"t","lsn":50,"snapshot":"incremental"},"op":"r"}"#,
            r#"{"status":"BEGIN","id":"3:20","event_count":null}"#,
            r#"[1, 2]"#,
            r#""a string""#,
            r#"{"before":"not a row","after":{"id":4,"region":"x"},"source":{"schema":"s","table":"t","lsn":60},"op":"c"}"#,
            r#"{"after":{"id":5,"region":"x"},"source":null,"op":"c"}"#,
            r#"{"after":{"id":5,"region":"x"},"op":"c"}"#,
            r#"{"after":{"id":5},"source":{},"op":"x"}"#,
        ];
        let key = ["region".to_string(), "id".to_string()];
        for text in records {
            let value: Json = serde_json::from_str(text).unwrap();
            let old = event_from_envelope(Some(&key), &value);
            let new = event_from_json_bytes(Some(&key), text.as_bytes());
            let (old, new) = match (old, new) {
                (Ok(Some(o)), Ok(Some(n))) => (o, n),
                (Ok(None), Ok(None)) | (Err(_), Err(_)) => continue,
                (o, n) => panic!("{text}: {o:?} against {n:?}"),
            };
            assert_eq!(old.op, new.op, "{text}");
            assert_eq!(old.source, new.source, "{text}");
            assert_eq!(old.transaction, new.transaction, "{text}");
            assert_eq!(old.ts_ms, new.ts_ms, "{text}");
            assert_eq!(
                (&old.table.schema, &old.table.name),
                (&new.table.schema, &new.table.name)
            );
            let names = |e: &ChangeEvent| {
                let mut n: Vec<String> = e.table.columns.iter().map(|c| c.name.clone()).collect();
                n.sort();
                n
            };
            assert_eq!(names(&old), names(&new), "{text}");
            assert_eq!(old.key_values(), new.key_values(), "{text}");
            for (o, n) in [(&old.before, &new.before), (&old.after, &new.after)] {
                assert_eq!(o.is_some(), n.is_some(), "{text}");
                if let (Some(o), Some(n)) = (o, n) {
                    for c in &old.table.columns {
                        let at = |e: &ChangeEvent, row: &Vec<Value>| {
                            row[e.table.column_index(&c.name).unwrap()].clone()
                        };
                        assert_eq!(at(&old, o), at(&new, n), "{text}: column {}", c.name);
                    }
                }
            }
        }
        // The record's order for the other columns, after the key's.
        let e = event_from_json_bytes(Some(&key), records[0].as_bytes())
            .unwrap()
            .unwrap();
        let order: Vec<&str> = e.table.columns.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(order, ["region", "id", "zeta", "alpha", "big", "doc"]);
        let after = e.after.as_ref().unwrap();
        assert_eq!(after[4], Value::Unavailable);
        assert_eq!(after[5], Value::Json(r#"{"a":1}"#.into()));
    }
}
