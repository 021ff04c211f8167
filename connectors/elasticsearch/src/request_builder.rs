//! Turning change events into `_bulk` actions: pure functions, no I/O.
//!
//! Each row is one document: the index comes from the table (see
//! [`IndexTemplate`] and [`sanitize_index_name`]), the `_id` from the
//! primary key (one column: its value; several: the values joined by `:` in
//! key order), the body is the after image as Debezium JSON, with dates and
//! timestamps as ISO 8601 and values the index mapping cannot hold moved
//! aside ([`crate::mapping::document`]). Inserts,
//! updates and snapshot reads are `index` actions, deletes are `delete`
//! actions, and every action carries the commit LSN as an external version,
//! so the cluster itself refuses older versions (409).
//!
//! An `index` action for an update that left TOASTed columns unchanged
//! ([`Action::unavailable`] not empty) is not ready to send: its document
//! lacks those columns, and the sink first fetches the stored document
//! (`_mget`, I/O, in the sink) and completes the action with
//! [`Action::complete`] (pure), so that the placeholder never overwrites a
//! stored value; see [`walcast_sdk::toast`]. The completed document is still
//! indexed with the event's commit LSN as external version, so a stale
//! event stays refused (409) whatever it was merged with. No script is
//! involved: clusters without the painless module behave the same.
//!
//! The request format (no `_type`, `version`/`version_type` in the action
//! line) is what Elasticsearch 7.x and 8.x and OpenSearch 1.x and 2.x
//! accept alike.

use serde_json::{json, Value as Json};
use walcast_sdk::json::{value, JsonOptions};
use walcast_sdk::{toast, ChangeEvent, Lsn, Op, TableSchema, Value};

use crate::config::VersionType;
use crate::mapping::{self, MappingOptions};

/// Elasticsearch refuses longer index names.
const MAX_INDEX_NAME_BYTES: usize = 255;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    #[error("template `{template}` has an unknown placeholder `{{{name}}}`; only {{schema}} and {{table}} exist")]
    UnknownPlaceholder { template: String, name: String },
    #[error("template `{0}` has an unbalanced brace")]
    Unbalanced(String),
}

/// An event that cannot become a bulk action. Definite: the same event
/// fails the same way on every retry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error(
        "table {table} has no primary key (nor replica identity index), so its rows have no document id \
         (event at LSN {lsn}); give the table a key or leave it out of the publication"
    )]
    NoKey { table: String, lsn: Lsn },
    #[error("index template `{template}` gives no valid index name for table {table}")]
    BadIndexName { template: String, table: String },
    #[error("{op} event for {table} at LSN {lsn} carries no {image} image")]
    MissingImage {
        table: String,
        op: &'static str,
        image: &'static str,
        lsn: Lsn,
    },
}

/// A parsed index template: `{schema}` and `{table}` and literal text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexTemplate(String);

impl IndexTemplate {
    pub fn parse(template: &str) -> Result<Self, TemplateError> {
        let mut rest = template;
        while let Some(open) = rest.find('{') {
            let close = rest[open..]
                .find('}')
                .ok_or_else(|| TemplateError::Unbalanced(template.into()))?
                + open;
            let name = &rest[open + 1..close];
            if name != "schema" && name != "table" {
                return Err(TemplateError::UnknownPlaceholder {
                    template: template.into(),
                    name: name.into(),
                });
            }
            rest = &rest[close + 1..];
        }
        if rest.contains('}') {
            return Err(TemplateError::Unbalanced(template.into()));
        }
        Ok(IndexTemplate(template.to_string()))
    }

    /// The sanitised index name for `table`.
    pub fn render(&self, table: &TableSchema) -> Result<String, RequestError> {
        let raw = self
            .0
            .replace("{schema}", &table.schema)
            .replace("{table}", &table.name);
        sanitize_index_name(&raw).ok_or_else(|| RequestError::BadIndexName {
            template: self.0.clone(),
            table: table.qualified_name(),
        })
    }
}

/// Makes `raw` a valid index name, or `None` if nothing valid remains.
///
/// The rules (Elasticsearch 7+/OpenSearch): lowercase only; none of
/// `\ / * ? " < > | , # :` or space; not starting with `-`, `_` or `+`; not
/// `.` or `..`; at most 255 bytes. Uppercase letters are lowercased,
/// forbidden characters become `_`, leading `-`, `_`, `+` are dropped, and
/// the name is cut to 255 bytes. A leading `.` is kept: such indices are
/// hidden by convention, which a template author may want.
pub fn sanitize_index_name(raw: &str) -> Option<String> {
    let lowered: String = raw
        .chars()
        .flat_map(char::to_lowercase)
        .map(|c| {
            if matches!(
                c,
                '\\' | '/' | '*' | '?' | '"' | '<' | '>' | '|' | ',' | '#' | ':' | ' '
            ) {
                '_'
            } else {
                c
            }
        })
        .collect();
    let mut name = lowered.trim_start_matches(['-', '_', '+']).to_string();
    while name.len() > MAX_INDEX_NAME_BYTES {
        name.pop();
    }
    if name.is_empty() || name == "." || name == ".." {
        None
    } else {
        Some(name)
    }
}

/// A key value in a document id: strings without quotes, others as JSON.
pub fn id_part(v: &Value) -> String {
    match value(v, &JsonOptions::default()) {
        Json::String(s) => s,
        other => other.to_string(),
    }
}

fn id_of(key: &[(&str, &Value)]) -> String {
    key.iter()
        .map(|(_, v)| id_part(v))
        .collect::<Vec<_>>()
        .join(":")
}

/// The document id of the event's row.
pub fn document_id(event: &ChangeEvent) -> Result<String, RequestError> {
    let key = event.key_values().ok_or_else(|| RequestError::NoKey {
        table: event.table.qualified_name(),
        lsn: event.source.commit_lsn,
    })?;
    Ok(id_of(&key))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActionKind {
    Index,
    Delete,
}

/// One bulk action with what error handling and the dead letter need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Action {
    pub kind: ActionKind,
    pub index: String,
    pub id: String,
    pub version: u64,
    pub table: String,
    pub op: Op,
    /// The action line and, for `index`, the document line, each ending in
    /// a newline: ready to append to a `_bulk` body.
    pub ndjson: String,
    /// The document, for the dead letter.
    pub document: Option<String>,
    /// Columns the event does not carry (unchanged TOASTed values): the
    /// document lacks them until [`Self::complete`] fills them in.
    pub unavailable: Vec<String>,
}

impl Action {
    /// Fills the columns this action's event does not carry from `stored`
    /// (the document as the cluster, or an earlier action of the same
    /// flush, has it; `None` when there is none) and re-renders the
    /// document. Returns the columns still unknown, which the document
    /// lists under [`toast::INCOMPLETE_FIELD`]. Returns nothing and changes
    /// nothing for an action without unavailable columns.
    pub fn complete(&mut self, stored: Option<&serde_json::Map<String, Json>>) -> Vec<String> {
        if self.unavailable.is_empty() {
            return Vec::new();
        }
        let Some(Ok(Json::Object(mut doc))) =
            self.document.as_deref().map(serde_json::from_str::<Json>)
        else {
            return Vec::new();
        };
        let incomplete = toast::merge(&mut doc, &self.unavailable, stored);
        let doc = Json::Object(doc).to_string();
        let header_end = self.ndjson.find('\n').map_or(self.ndjson.len(), |i| i + 1);
        self.ndjson.truncate(header_end);
        self.ndjson.push_str(&doc);
        self.ndjson.push('\n');
        self.document = Some(doc);
        self.unavailable.clear();
        incomplete
    }

    /// The document as a JSON object, for a later action of the same row.
    pub fn document_object(&self) -> Option<serde_json::Map<String, Json>> {
        match serde_json::from_str(self.document.as_deref()?) {
            Ok(Json::Object(m)) => Some(m),
            _ => None,
        }
    }
}

/// What one event asks of the cluster, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    Action(Action),
    /// `_delete_by_query` with `match_all` on the table's index.
    Truncate {
        index: String,
        table: String,
        lsn: Lsn,
    },
}

/// Builds the entries of one event.
#[derive(Debug, Clone)]
pub struct RequestBuilder {
    pub index: IndexTemplate,
    pub version_type: VersionType,
    pub truncate: bool,
    /// How documents are rendered to fit the index mapping.
    pub mapping: MappingOptions,
}

impl RequestBuilder {
    /// Whether `event` can become actions at all (an index name, and a
    /// document id unless it is a truncate), without building them.
    pub fn check(&self, event: &ChangeEvent) -> Result<(), RequestError> {
        self.index.render(&event.table)?;
        if event.op != Op::Truncate {
            document_id(event)?;
        }
        Ok(())
    }

    pub fn entries(&self, event: &ChangeEvent) -> Result<Vec<Entry>, RequestError> {
        let table = &event.table;
        let index = self.index.render(table)?;
        if event.op == Op::Truncate {
            if !self.truncate {
                tracing::warn!(table = %table.qualified_name(), lsn = %event.source.commit_lsn, %index, "truncate ignored (truncate = \"ignore\")");
                return Ok(Vec::new());
            }
            return Ok(vec![Entry::Truncate {
                index,
                table: table.qualified_name(),
                lsn: event.source.commit_lsn,
            }]);
        }
        let id = document_id(event)?;
        let mut out = Vec::with_capacity(2);
        // An update that changed the key leaves a document under the old id.
        if let (Op::Update, Some(before)) = (event.op, event.before.as_deref()) {
            let old: Vec<(&str, &Value)> = table
                .columns
                .iter()
                .zip(before)
                .filter(|(c, _)| c.key)
                .map(|(c, v)| (c.name.as_str(), v))
                .collect();
            if !old.is_empty()
                && !old
                    .iter()
                    .any(|(_, v)| matches!(v, Value::Null | Value::Unavailable))
            {
                let old_id = id_of(&old);
                if old_id != id {
                    out.push(Entry::Action(self.action(
                        event,
                        ActionKind::Delete,
                        &index,
                        old_id,
                        None,
                    )));
                }
            }
        }
        if event.op == Op::Delete {
            out.push(Entry::Action(self.action(
                event,
                ActionKind::Delete,
                &index,
                id,
                None,
            )));
        } else {
            let after = event
                .after
                .as_deref()
                .ok_or_else(|| RequestError::MissingImage {
                    table: table.qualified_name(),
                    op: event.op.code(),
                    image: "after",
                    lsn: event.source.commit_lsn,
                })?;
            let unavailable = toast::unavailable_columns(event);
            let mut doc = mapping::document(table, after, &self.mapping);
            if let Json::Object(m) = &mut doc {
                for col in &unavailable {
                    m.remove(col);
                }
            }
            let mut action =
                self.action(event, ActionKind::Index, &index, id, Some(doc.to_string()));
            action.unavailable = unavailable;
            out.push(Entry::Action(action));
        }
        Ok(out)
    }

    fn action(
        &self,
        event: &ChangeEvent,
        kind: ActionKind,
        index: &str,
        id: String,
        document: Option<String>,
    ) -> Action {
        let version = event.version();
        let verb = match kind {
            ActionKind::Index => "index",
            ActionKind::Delete => "delete",
        };
        // Written by hand so the field order is fixed whatever serde_json's features.
        let mut ndjson = format!(
            r#"{{"{verb}":{{"_index":{},"_id":{},"version":{version},"version_type":"{}"}}}}"#,
            Json::String(index.to_string()),
            Json::String(id.clone()),
            self.version_type.as_str(),
        );
        ndjson.push('\n');
        if let Some(doc) = &document {
            ndjson.push_str(doc);
            ndjson.push('\n');
        }
        Action {
            kind,
            index: index.to_string(),
            id,
            version,
            table: event.table.qualified_name(),
            op: event.op,
            ndjson,
            document,
            unavailable: Vec::new(),
        }
    }
}

/// The `_mget` body fetching, for each `(index, id, columns)`, the stored
/// values of `columns`.
pub fn mget_body(docs: &[(String, String, Vec<String>)]) -> String {
    let docs: Vec<Json> = docs
        .iter()
        .map(|(index, id, columns)| json!({"_index": index, "_id": id, "_source": columns}))
        .collect();
    json!({ "docs": docs }).to_string()
}

/// A `_bulk` body of `actions`.
pub fn bulk_body<'a>(actions: impl IntoIterator<Item = &'a Action>) -> String {
    let mut body = String::new();
    for a in actions {
        body.push_str(&a.ndjson);
    }
    body
}

/// The dead-letter record of a refused action. The document travels as a
/// string so that the dead-letter index never has a mapping conflict itself.
pub fn dead_letter_record(
    action: &Action,
    status: u16,
    error_type: &str,
    reason: &str,
    now_ms: i64,
) -> Json {
    json!({
        "index": action.index,
        "id": action.id,
        "table": action.table,
        "op": action.op.code(),
        "lsn": action.version,
        "lsn_text": Lsn(action.version).to_string(),
        "status": status,
        "error_type": error_type,
        "reason": reason,
        "document": action.document,
        "failed_at_ms": now_ms,
    })
}

/// The `_id` of a dead-letter record: a replay overwrites, not repeats.
pub fn dead_letter_id(action: &Action) -> String {
    format!("{}/{}/{}", action.index, action.id, action.version)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use walcast_sdk::{Column, PgType, ReplicaIdentity, SnapshotMarker, SourceInfo};

    use super::*;

    fn table(name: &str, keys: &[&str], cols: &[&str]) -> Arc<TableSchema> {
        Arc::new(TableSchema {
            relation_id: 1,
            schema: "Sales".into(),
            name: name.into(),
            columns: cols
                .iter()
                .map(|c| Column {
                    key_position: None,
                    default: None,
                    name: c.to_string(),
                    pg_type: PgType::Text,
                    type_oid: 25,
                    type_modifier: -1,
                    nullable: true,
                    key: keys.contains(c),
                })
                .collect(),
            replica_identity: ReplicaIdentity::Default,
            version: 1,
        })
    }

    fn event(
        t: &Arc<TableSchema>,
        op: Op,
        before: Option<Vec<Value>>,
        after: Option<Vec<Value>>,
        lsn: u64,
    ) -> ChangeEvent {
        ChangeEvent {
            op,
            table: Arc::clone(t),
            before,
            after,
            source: SourceInfo {
                name: "t".into(),
                db: "d".into(),
                lsn: Lsn(lsn),
                commit_lsn: Lsn(lsn),
                tx_id: None,
                ts_ms: 0,
                ts_us: 0,
                snapshot: SnapshotMarker::False,
            },
            transaction: None,
            ts_ms: 0,
        }
    }

    fn builder() -> RequestBuilder {
        RequestBuilder {
            index: IndexTemplate::parse("{schema}.{table}").unwrap(),
            version_type: VersionType::ExternalGte,
            truncate: true,
            mapping: MappingOptions::default(),
        }
    }

    #[test]
    fn sanitizes_index_names() {
        assert_eq!(
            sanitize_index_name("Sales.Orders").as_deref(),
            Some("sales.orders")
        );
        assert_eq!(sanitize_index_name("_a b:c*d").as_deref(), Some("a_b_c_d"));
        assert_eq!(sanitize_index_name("-+_"), None);
        assert_eq!(sanitize_index_name(".."), None);
        assert_eq!(sanitize_index_name(&"x".repeat(300)).unwrap().len(), 255);
        assert!(IndexTemplate::parse("cdc-{table}").is_ok());
        assert!(matches!(
            IndexTemplate::parse("{db}.{table}"),
            Err(TemplateError::UnknownPlaceholder { .. })
        ));
        assert!(matches!(
            IndexTemplate::parse("{table"),
            Err(TemplateError::Unbalanced(_))
        ));
    }

    #[test]
    fn builds_index_and_delete_lines_with_external_versions() {
        let t = table("Orders", &["region", "id"], &["region", "id", "total"]);
        let row = vec![Value::Text("eu".into()), Value::Int64(42), Value::Null];
        let created = builder()
            .entries(&event(
                &t,
                Op::Create,
                None,
                Some(row.clone()),
                0x1_0000_0010,
            ))
            .unwrap();
        let deleted = builder()
            .entries(&event(&t, Op::Delete, Some(row), None, 0x1_0000_0020))
            .unwrap();
        let actions: Vec<&Action> = created
            .iter()
            .chain(&deleted)
            .map(|e| match e {
                Entry::Action(a) => a,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(
            bulk_body(actions.iter().copied()),
            concat!(
                r#"{"index":{"_index":"sales.orders","_id":"eu:42","version":4294967312,"version_type":"external_gte"}}"#,
                "\n",
                r#"{"id":42,"region":"eu","total":null}"#,
                "\n",
                r#"{"delete":{"_index":"sales.orders","_id":"eu:42","version":4294967328,"version_type":"external_gte"}}"#,
                "\n",
            )
        );
        assert_eq!(actions[0].table, "Sales.Orders");
    }

    #[test]
    fn key_change_deletes_the_old_document_and_keyless_tables_fail() {
        let t = table("t", &["id"], &["id", "v"]);
        let e = event(
            &t,
            Op::Update,
            Some(vec![Value::Int32(1), Value::Null]),
            Some(vec![Value::Int32(2), Value::Int32(9)]),
            5,
        );
        let entries = builder().entries(&e).unwrap();
        assert!(
            matches!(&entries[0], Entry::Action(a) if a.kind == ActionKind::Delete && a.id == "1")
        );
        assert!(
            matches!(&entries[1], Entry::Action(a) if a.kind == ActionKind::Index && a.id == "2")
        );

        let keyless = table("log", &[], &["line"]);
        let err = builder()
            .entries(&event(
                &keyless,
                Op::Create,
                None,
                Some(vec![Value::Text("x".into())]),
                0x2_0000_0001,
            ))
            .unwrap_err();
        assert_eq!(
            builder()
                .check(&event(
                    &keyless,
                    Op::Create,
                    None,
                    Some(vec![Value::Null]),
                    0x2_0000_0001
                ))
                .unwrap_err(),
            err
        );
        assert!(builder()
            .check(&event(&keyless, Op::Truncate, None, None, 1))
            .is_ok());
        assert_eq!(err.to_string(), "table Sales.log has no primary key (nor replica identity index), so its rows have no document id (event at LSN 2/1); give the table a key or leave it out of the publication");
    }

    #[test]
    fn unchanged_toast_columns_are_left_out_then_filled_from_the_stored_document() {
        let t = table("docs", &["id"], &["id", "title", "body"]);
        let e = event(
            &t,
            Op::Update,
            None,
            Some(vec![
                Value::Int32(1),
                Value::Text("new".into()),
                Value::Unavailable,
            ]),
            7,
        );
        let mut entries = builder().entries(&e).unwrap();
        let Entry::Action(a) = &mut entries[0] else {
            panic!()
        };
        assert_eq!(a.unavailable, vec!["body"]);
        assert!(
            !a.ndjson.contains("__debezium_unavailable_value"),
            "{}",
            a.ndjson
        );
        assert_eq!(a.document.as_deref(), Some(r#"{"id":1,"title":"new"}"#));
        let stored = json!({"body": "long"});
        let mut kept = a.clone();
        assert!(kept.complete(stored.as_object()).is_empty());
        assert_eq!(
            kept.ndjson,
            concat!(
                r#"{"index":{"_index":"sales.docs","_id":"1","version":7,"version_type":"external_gte"}}"#,
                "\n",
                r#"{"body":"long","id":1,"title":"new"}"#,
                "\n"
            )
        );
        assert_eq!(a.complete(None), vec!["body"]);
        assert_eq!(
            a.document.as_deref(),
            Some(r#"{"__walcast_incomplete":["body"],"id":1,"title":"new"}"#)
        );
        assert_eq!(
            mget_body(&[("i".into(), "1".into(), vec!["body".into()])]),
            r#"{"docs":[{"_id":"1","_index":"i","_source":["body"]}]}"#
        );
    }

    #[test]
    fn truncate_is_a_delete_by_query_or_nothing() {
        let t = table("t", &["id"], &["id"]);
        let e = event(&t, Op::Truncate, None, None, 9);
        assert_eq!(
            builder().entries(&e).unwrap(),
            vec![Entry::Truncate {
                index: "sales.t".into(),
                table: "Sales.t".into(),
                lsn: Lsn(9)
            }]
        );
        let ignore = RequestBuilder {
            truncate: false,
            ..builder()
        };
        assert_eq!(ignore.entries(&e).unwrap(), vec![]);
    }
}
