//! Debezium-style transaction metadata: a BEGIN and an END record per
//! Postgres transaction on a dedicated topic, so consumers can regroup a
//! transaction's events spread over many table topics.
//!
//! The event model carries each event's transaction id but not where a
//! transaction ends, so boundaries are inferred from the stream: a
//! transaction ends when an event of another transaction (or one outside any
//! transaction, a snapshot read) arrives, or when the sink is flushed. Two
//! limits follow. The END of the last transaction before a quiet period is
//! written only when the next transaction starts or at the next flush. And a
//! crash between a transaction's last event and its END loses that END:
//! the slot resumes after the commit, so the transaction is not replayed.
//! A capture that marks commit boundaries in its batches would remove both.
//!
//! Records are JSON whatever the event encoding (Debezium's Avro schema for
//! them is not registered by walcast); key `{"id"}`, value `{status, id,
//! event_count, data_collections, ts_ms}`.

use std::collections::BTreeMap;

use serde_json::json;
use walcast_sdk::{ChangeEvent, Lsn};

/// One BEGIN or END record, ready to produce.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MarkerRecord {
    pub key: Vec<u8>,
    pub value: Vec<u8>,
    pub commit_lsn: Lsn,
    pub tx_id: Option<u32>,
}

#[derive(Debug)]
struct OpenTransaction {
    id: String,
    commit_lsn: Lsn,
    tx_id: Option<u32>,
    ts_ms: i64,
    events: u64,
    /// `schema.table` -> events, sorted so END records are reproducible.
    collections: BTreeMap<String, u64>,
}

/// Follows the event stream and produces BEGIN/END records.
#[derive(Debug, Default)]
pub struct TransactionMarkers {
    open: Option<OpenTransaction>,
}

impl TransactionMarkers {
    pub fn new() -> Self {
        TransactionMarkers::default()
    }

    /// Accounts for `event`; returns the END of the previous transaction
    /// and the BEGIN of a new one when the event starts one. The records
    /// must be produced before the event itself.
    pub fn observe(&mut self, event: &ChangeEvent) -> Vec<MarkerRecord> {
        let mut out = Vec::new();
        let id = event.transaction.as_ref().map(|t| t.id.as_str());
        if self.open.as_ref().map(|o| o.id.as_str()) != id {
            out.extend(self.close());
            if let Some(id) = id {
                let open = OpenTransaction {
                    id: id.to_string(),
                    commit_lsn: event.source.commit_lsn,
                    tx_id: event.source.tx_id,
                    ts_ms: event.source.ts_ms,
                    events: 0,
                    collections: BTreeMap::new(),
                };
                out.push(marker(&open, "BEGIN"));
                self.open = Some(open);
            }
        }
        if let Some(open) = &mut self.open {
            open.events += 1;
            *open
                .collections
                .entry(event.table.qualified_name())
                .or_default() += 1;
        }
        out
    }

    /// Ends the open transaction, if any.
    pub fn close(&mut self) -> Option<MarkerRecord> {
        self.open.take().map(|o| marker(&o, "END"))
    }
}

fn marker(tx: &OpenTransaction, status: &str) -> MarkerRecord {
    let end = status == "END";
    let value = json!({
        "status": status,
        "id": tx.id,
        "event_count": end.then_some(tx.events),
        "data_collections": end.then(|| tx.collections.iter()
            .map(|(c, n)| json!({"data_collection": c, "event_count": n}))
            .collect::<Vec<_>>()),
        "ts_ms": tx.ts_ms,
    });
    MarkerRecord {
        key: serde_json::to_vec(&json!({ "id": tx.id })).expect("JSON values always serialise"),
        value: serde_json::to_vec(&value).expect("JSON values always serialise"),
        commit_lsn: tx.commit_lsn,
        tx_id: tx.tx_id,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use walcast_sdk::{
        Op, ReplicaIdentity, SnapshotMarker, SourceInfo, TableSchema, TransactionInfo,
    };

    use super::*;

    fn event(table: &str, tx: Option<(u32, u64)>) -> ChangeEvent {
        let schema = Arc::new(TableSchema {
            relation_id: 1,
            schema: "public".into(),
            name: table.into(),
            columns: vec![],
            replica_identity: ReplicaIdentity::Default,
            version: 1,
        });
        let (xid, lsn) = tx.unwrap_or((0, 0));
        ChangeEvent {
            op: Op::Create,
            table: schema,
            before: None,
            after: Some(vec![]),
            source: SourceInfo {
                name: "t".into(),
                db: "d".into(),
                lsn: Lsn(lsn),
                commit_lsn: Lsn(lsn),
                tx_id: tx.map(|_| xid),
                ts_ms: 7,
                ts_us: 7000,
                snapshot: SnapshotMarker::False,
            },
            transaction: tx.map(|(x, l)| TransactionInfo {
                id: format!("{x}:{l}"),
                total_order: 1,
                data_collection_order: 1,
            }),
            ts_ms: 8,
        }
    }

    fn status(m: &MarkerRecord) -> serde_json::Value {
        serde_json::from_slice(&m.value).unwrap()
    }

    #[test]
    fn begin_on_first_event_end_on_next_transaction_or_close() {
        let mut t = TransactionMarkers::new();
        let out = t.observe(&event("a", Some((5, 100))));
        assert_eq!(out.len(), 1);
        assert_eq!(status(&out[0])["status"], "BEGIN");
        assert_eq!(status(&out[0])["event_count"], serde_json::Value::Null);
        assert!(t.observe(&event("b", Some((5, 100)))).is_empty());
        assert!(t.observe(&event("a", Some((5, 100)))).is_empty());
        let out = t.observe(&event("a", Some((6, 200))));
        assert_eq!(out.len(), 2);
        let end = status(&out[0]);
        assert_eq!(end["status"], "END");
        assert_eq!(end["id"], "5:100");
        assert_eq!(end["event_count"], 3);
        assert_eq!(end["data_collections"][0]["data_collection"], "public.a");
        assert_eq!(end["data_collections"][0]["event_count"], 2);
        assert_eq!(out[0].commit_lsn, Lsn(100));
        assert_eq!(status(&out[1])["status"], "BEGIN");
        // an event outside any transaction ends the open one
        let out = t.observe(&event("a", None));
        assert_eq!(out.len(), 1);
        assert_eq!(status(&out[0])["event_count"], 1);
        assert!(t.close().is_none());
    }
}
