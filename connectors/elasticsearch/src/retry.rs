//! What to do with a `_bulk` response: pure classification, tested from
//! bodies captured from a real OpenSearch 2.19.
//!
//! A bulk request succeeds or fails per item. Items are applied (2xx), a
//! version conflict (409: a newer version, or with `external` the same, is
//! already there, which is what a replay looks like), or a delete of
//! something already gone (404): all three count as done. 429 and 5xx mean
//! the cluster is overloaded or a shard is moving: retry those items. 400
//! means the cluster refuses this document (a mapping conflict, an
//! unparsable value): it goes to the dead letter and the pipeline goes on,
//! because retrying cannot help and stopping would hold back every table.
//! Any other 4xx (403 on one index, 404 on an index action to a closed
//! index) is definite.

use serde::Deserialize;

use crate::request_builder::ActionKind;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ItemOutcome {
    Done,
    Retry,
    DeadLetter,
    Definite,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResponseOutcome {
    /// Read the items.
    Items,
    /// The whole request failed but may succeed later.
    Retry,
    /// The whole request is refused: credentials, permissions, a request
    /// larger than `http.max_content_length`.
    Definite,
}

/// One item of a `_bulk` response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ItemResult {
    pub status: u16,
    pub error_type: Option<String>,
    pub reason: Option<String>,
}

#[derive(Deserialize)]
struct BulkResponse {
    items: Vec<std::collections::HashMap<String, RawItem>>,
}

#[derive(Deserialize)]
struct RawItem {
    status: u16,
    #[serde(default)]
    error: Option<RawError>,
}

#[derive(Deserialize)]
struct RawError {
    #[serde(rename = "type")]
    error_type: Option<String>,
    reason: Option<String>,
    #[serde(default)]
    caused_by: Option<Box<RawError>>,
}

impl RawError {
    fn full_reason(&self) -> Option<String> {
        let mut reason = self.reason.clone()?;
        if let Some(cause) = self.caused_by.as_ref().and_then(|c| c.reason.clone()) {
            reason.push_str(": ");
            reason.push_str(&cause);
        }
        Some(reason)
    }
}

/// The items of a `_bulk` response, in request order.
pub fn parse_bulk_response(body: &[u8]) -> Result<Vec<ItemResult>, serde_json::Error> {
    let resp: BulkResponse = serde_json::from_slice(body)?;
    Ok(resp
        .items
        .into_iter()
        .filter_map(|m| m.into_values().next())
        .map(|i| ItemResult {
            status: i.status,
            error_type: i.error.as_ref().and_then(|e| e.error_type.clone()),
            reason: i.error.as_ref().and_then(RawError::full_reason),
        })
        .collect())
}

pub fn classify_response(status: u16) -> ResponseOutcome {
    match status {
        200..=299 => ResponseOutcome::Items,
        408 | 429 | 500..=599 => ResponseOutcome::Retry,
        _ => ResponseOutcome::Definite,
    }
}

pub fn classify_item(kind: ActionKind, item: &ItemResult) -> ItemOutcome {
    match item.status {
        200..=299 | 409 => ItemOutcome::Done,
        404 if kind == ActionKind::Delete => ItemOutcome::Done,
        429 | 500..=599 => ItemOutcome::Retry,
        400 => ItemOutcome::DeadLetter,
        _ => ItemOutcome::Definite,
    }
}

/// One document of an `_mget` response.
#[derive(Debug, Clone, PartialEq)]
pub enum Fetched {
    /// The stored `_source` (only the fields asked for).
    Found(serde_json::Map<String, serde_json::Value>),
    /// No such document, or no such index yet: nothing to keep.
    Missing,
    /// The document could not be read now (a shard unavailable): retry.
    Retry(String),
}

#[derive(Deserialize)]
struct MgetResponse {
    docs: Vec<MgetDoc>,
}

#[derive(Deserialize)]
struct MgetDoc {
    #[serde(default)]
    found: bool,
    #[serde(rename = "_source", default)]
    source: Option<serde_json::Map<String, serde_json::Value>>,
    #[serde(default)]
    error: Option<RawError>,
}

/// The documents of an `_mget` response, in request order. A missing index
/// answers a per-document `index_not_found_exception`, which is
/// [`Fetched::Missing`]; any other per-document error is worth a retry (the
/// whole request was accepted, so it is not about permissions).
pub fn parse_mget_response(body: &[u8]) -> Result<Vec<Fetched>, serde_json::Error> {
    let resp: MgetResponse = serde_json::from_slice(body)?;
    Ok(resp
        .docs
        .into_iter()
        .map(|d| match (d.error, d.found, d.source) {
            (Some(e), _, _) if e.error_type.as_deref() == Some("index_not_found_exception") => {
                Fetched::Missing
            }
            (Some(e), _, _) => Fetched::Retry(
                e.full_reason()
                    .or(e.error_type)
                    .unwrap_or_else(|| "unknown error".into()),
            ),
            (None, true, Some(source)) => Fetched::Found(source),
            (None, true, None) => Fetched::Found(serde_json::Map::new()),
            (None, false, _) => Fetched::Missing,
        })
        .collect())
}

/// The answer to `_delete_by_query`: a missing index has nothing to delete.
pub fn classify_truncate(status: u16, body: &[u8]) -> ItemOutcome {
    match status {
        200..=299 => ItemOutcome::Done,
        404 if String::from_utf8_lossy(body).contains("index_not_found_exception") => {
            ItemOutcome::Done
        }
        408 | 429 | 500..=599 => ItemOutcome::Retry,
        _ => ItemOutcome::Definite,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Captured from OpenSearch 2.19.1: created, an older version (409), a
    /// string into a `long` field (400), a delete of a missing document.
    const MIXED: &str = r#"{"took":136,"errors":true,"items":[{"index":{"_index":"capture","_id":"1","_version":5,"result":"created","_shards":{"total":1,"successful":1,"failed":0},"_seq_no":0,"_primary_term":1,"status":201}},{"index":{"_index":"capture","_id":"1","status":409,"error":{"type":"version_conflict_engine_exception","reason":"[1]: version conflict, current version [5] is higher than the one provided [4]","index":"capture","shard":"0","index_uuid":"vAezQ6ztQ3y04HvmiXP4Pg"}}},{"index":{"_index":"capture","_id":"2","status":400,"error":{"type":"mapper_parsing_exception","reason":"failed to parse field [n] of type [long] in document with id '2'. Preview of field's value: 'not a number'","caused_by":{"type":"illegal_argument_exception","reason":"For input string: \"not a number\""}}}},{"delete":{"_index":"capture","_id":"9","_version":5,"result":"not_found","_shards":{"total":1,"successful":1,"failed":0},"_seq_no":1,"_primary_term":1,"status":404}}]}"#;

    /// Captured from OpenSearch 2.19.1: a stored document (only the
    /// requested `_source` fields), a missing id, a missing index.
    const MGET: &str = r#"{"docs":[{"_index":"tmpmget-x","_id":"1","_version":5,"_seq_no":0,"_primary_term":1,"found":true,"_source":{"big":"zz"}},{"_index":"tmpmget-x","_id":"2","found":false},{"_index":"tmpmget-nosuch","_id":"1","error":{"root_cause":[{"type":"index_not_found_exception","reason":"no such index [tmpmget-nosuch]","index":"tmpmget-nosuch","resource.id":"tmpmget-nosuch","resource.type":"index_expression","index_uuid":"_na_"}],"type":"index_not_found_exception","reason":"no such index [tmpmget-nosuch]","index":"tmpmget-nosuch","resource.id":"tmpmget-nosuch","resource.type":"index_expression","index_uuid":"_na_"}}]}"#;

    #[test]
    fn reads_a_captured_mget_response() {
        let docs = parse_mget_response(MGET.as_bytes()).unwrap();
        assert_eq!(
            docs,
            vec![
                Fetched::Found(
                    serde_json::json!({"big": "zz"})
                        .as_object()
                        .unwrap()
                        .clone()
                ),
                Fetched::Missing,
                Fetched::Missing,
            ]
        );
    }

    #[test]
    fn classifies_a_captured_mixed_response() {
        let items = parse_bulk_response(MIXED.as_bytes()).unwrap();
        let kinds = [
            ActionKind::Index,
            ActionKind::Index,
            ActionKind::Index,
            ActionKind::Delete,
        ];
        let outcomes: Vec<_> = kinds
            .iter()
            .zip(&items)
            .map(|(k, i)| classify_item(*k, i))
            .collect();
        assert_eq!(
            outcomes,
            vec![
                ItemOutcome::Done,
                ItemOutcome::Done,
                ItemOutcome::DeadLetter,
                ItemOutcome::Done
            ]
        );
        assert_eq!(
            items[2].error_type.as_deref(),
            Some("mapper_parsing_exception")
        );
        assert_eq!(
            items[2].reason.as_deref(),
            Some("failed to parse field [n] of type [long] in document with id '2'. Preview of field's value: 'not a number': For input string: \"not a number\"")
        );
        assert_eq!(items[0].error_type, None);
    }

    #[test]
    fn overload_and_shard_failures_retry_other_refusals_are_definite() {
        // The shape Elasticsearch and OpenSearch document for a full write
        // queue (not producible on demand from a test server).
        let rejected = r#"{"took":3,"errors":true,"items":[{"index":{"_index":"x","_id":"1","status":429,"error":{"type":"es_rejected_execution_exception","reason":"rejected execution of coordinating operation"}}},{"index":{"_index":"x","_id":"2","status":503,"error":{"type":"unavailable_shards_exception","reason":"primary shard is not active"}}},{"index":{"_index":"x","_id":"3","status":403,"error":{"type":"cluster_block_exception","reason":"index [x] blocked by: [FORBIDDEN/8/index write (api)];"}}},{"index":{"_index":"x","_id":"4","status":404,"error":{"type":"index_not_found_exception","reason":"no such index [x]"}}}]}"#;
        let items = parse_bulk_response(rejected.as_bytes()).unwrap();
        let outcomes: Vec<_> = items
            .iter()
            .map(|i| classify_item(ActionKind::Index, i))
            .collect();
        assert_eq!(
            outcomes,
            vec![
                ItemOutcome::Retry,
                ItemOutcome::Retry,
                ItemOutcome::Definite,
                ItemOutcome::Definite
            ]
        );
    }

    #[test]
    fn classifies_whole_responses() {
        assert_eq!(classify_response(200), ResponseOutcome::Items);
        assert_eq!(classify_response(429), ResponseOutcome::Retry);
        assert_eq!(classify_response(503), ResponseOutcome::Retry);
        assert_eq!(classify_response(401), ResponseOutcome::Definite);
        assert_eq!(classify_response(413), ResponseOutcome::Definite);
        // Captured: an empty bulk body is a 400 of the whole request.
        assert_eq!(classify_response(400), ResponseOutcome::Definite);
        assert_eq!(
            classify_truncate(404, br#"{"error":{"root_cause":[{"type":"index_not_found_exception","reason":"no such index [t]"}]},"status":404}"#),
            ItemOutcome::Done
        );
        // Captured from a node without the reindex module.
        assert_eq!(
            classify_truncate(400, br#"{"error":"no handler found for uri [/nope/_delete_by_query] and method [POST]"}"#),
            ItemOutcome::Definite
        );
    }
}
