//! Unchanged TOASTed values at sinks that keep a copy of the row.
//!
//! Postgres does not resend a large (TOASTed) value that an update left
//! unchanged, and without REPLICA IDENTITY FULL the event carries
//! [`Value::Unavailable`] for it (Debezium's `__debezium_unavailable_value`
//! placeholder on the wire). A sink that stores whole rows (a search
//! document, a Redis copy) must keep the value it already has for such a
//! column: writing the placeholder, or `null`, would destroy data that
//! still exists in Postgres.
//!
//! So sinks write the event's row without those columns and take their
//! values from the stored copy ([`merge`]). When there is no stored copy, or
//! it lacks the column too (a primary-key change is a delete of the old row
//! and a create of the new one, so the new document starts empty; or the
//! sink was wiped), the value is unknown: the column is left out and the
//! row lists it under [`INCOMPLETE_FIELD`] (`"__walcast_incomplete":
//! ["body"]`), with a warning, so readers can tell "unknown" from "absent"
//! and a re-snapshot of the table (`walcast snapshot`) repairs it. The
//! placeholder itself is never stored as data. The next event that carries
//! the column writes a complete row and the marker disappears.

use serde_json::{Map, Value as Json};

use crate::event::ChangeEvent;
use crate::value::Value;

/// The field of a stored row listing the columns whose value the sink does
/// not know (see the module doc).
pub const INCOMPLETE_FIELD: &str = "__walcast_incomplete";

/// The columns of the event's after image that it does not carry.
pub fn unavailable_columns(event: &ChangeEvent) -> Vec<String> {
    let Some(after) = event.after.as_deref() else {
        return Vec::new();
    };
    event
        .table
        .columns
        .iter()
        .zip(after)
        .filter(|(_, v)| matches!(v, Value::Unavailable))
        .map(|(c, _)| c.name.clone())
        .collect()
}

/// Fills `doc` (the event's row without the `unavailable` columns) with the
/// stored values of those columns, and returns the columns `stored` does
/// not have either; those are listed under [`INCOMPLETE_FIELD`] in `doc`.
/// A stored `null` is a value (the column was NULL) and is kept.
pub fn merge(
    doc: &mut Map<String, Json>,
    unavailable: &[String],
    stored: Option<&Map<String, Json>>,
) -> Vec<String> {
    let mut incomplete = Vec::new();
    for col in unavailable {
        match stored.and_then(|s| s.get(col)) {
            Some(v) => {
                doc.insert(col.clone(), v.clone());
            }
            None => {
                doc.remove(col);
                incomplete.push(col.clone());
            }
        }
    }
    if incomplete.is_empty() {
        doc.remove(INCOMPLETE_FIELD);
    } else {
        doc.insert(
            INCOMPLETE_FIELD.to_string(),
            Json::Array(incomplete.iter().cloned().map(Json::String).collect()),
        );
    }
    incomplete
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn map(j: Json) -> Map<String, Json> {
        j.as_object().unwrap().clone()
    }

    #[test]
    fn keeps_stored_values_and_marks_what_nobody_knows() {
        let unavailable = vec!["body".to_string(), "notes".to_string()];
        let mut doc = map(json!({"id": 1, "title": "new"}));
        let stored = map(json!({"id": 1, "title": "old", "body": "long text", "notes": null}));
        assert!(merge(&mut doc, &unavailable, Some(&stored)).is_empty());
        assert_eq!(
            Json::Object(doc),
            json!({"id": 1, "title": "new", "body": "long text", "notes": null})
        );

        let mut doc = map(json!({"id": 2, "title": "t"}));
        let stored = map(json!({"id": 2, "body": "b", INCOMPLETE_FIELD: ["notes"]}));
        assert_eq!(merge(&mut doc, &unavailable, Some(&stored)), vec!["notes"]);
        assert_eq!(
            Json::Object(doc),
            json!({"id": 2, "title": "t", "body": "b", INCOMPLETE_FIELD: ["notes"]})
        );

        let mut doc = map(json!({"id": 3}));
        assert_eq!(merge(&mut doc, &unavailable, None).len(), 2);
        assert_eq!(
            Json::Object(doc),
            json!({"id": 3, INCOMPLETE_FIELD: ["body", "notes"]})
        );
    }
}
