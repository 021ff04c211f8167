//! The sink against a real OpenSearch 2.19 (WALCAST_TEST_OPENSEARCH_URL).
//! Every test writes to indices named after its own tables.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value as Json};
use walcast_elasticsearch::{DeadLetter, ElasticsearchSink, ElasticsearchSinkConfig};
use walcast_sdk::{
    AckTracker, Batch, ChangeEvent, Column, Lsn, Op, PgType, ReplicaIdentity, Sink, SnapshotMarker,
    SourceInfo, TableSchema, Value,
};

fn opensearch_url() -> String {
    std::env::var("WALCAST_TEST_OPENSEARCH_URL").unwrap_or_else(|_| {
        panic!(
            "WALCAST_TEST_OPENSEARCH_URL is not set: these tests need a real OpenSearch. \
             Start one with `deploy/local/stack up --only opensearch` and run `eval \"$(deploy/local/stack env)\"`"
        )
    })
}

fn unique(base: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!(
        "{base}_{}_{nanos}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

fn table(name: &str, cols: &[(&str, bool)]) -> Arc<TableSchema> {
    Arc::new(TableSchema {
        relation_id: 1,
        schema: "public".into(),
        name: name.into(),
        columns: cols
            .iter()
            .map(|(c, key)| Column {
                key_position: None,
                default: None,
                name: c.to_string(),
                pg_type: PgType::Text,
                type_oid: 25,
                type_modifier: -1,
                nullable: !key,
                key: *key,
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
            name: "it".into(),
            db: "app".into(),
            lsn: Lsn(lsn),
            commit_lsn: Lsn(lsn),
            tx_id: Some(1),
            ts_ms: 0,
            ts_us: 0,
            snapshot: SnapshotMarker::False,
        },
        transaction: None,
        ts_ms: 0,
    }
}

fn upsert(t: &Arc<TableSchema>, row: Vec<Value>, lsn: u64) -> ChangeEvent {
    event(t, Op::Update, None, Some(row), lsn)
}

fn text(s: &str) -> Value {
    Value::Text(s.into())
}

fn config() -> ElasticsearchSinkConfig {
    let mut c = ElasticsearchSinkConfig::new(opensearch_url());
    c.index_template = "it-{table}".into();
    c.dead_letter = DeadLetter::Index {
        name: "it-deadletter".into(),
    };
    c.retry_initial = std::time::Duration::from_millis(50);
    c.retry_max = std::time::Duration::from_millis(500);
    c
}

/// Sends one batch, flushes, and returns what its acker was answered.
async fn send(sink: &mut ElasticsearchSink, events: Vec<ChangeEvent>) -> Result<(), String> {
    let mut tracker: AckTracker<u64> = AckTracker::new();
    let acker = tracker.register(Some(1), events.len());
    sink.send(Batch {
        events: Arc::new(events),
        acker,
    })
    .await
    .map_err(|e| e.to_string())?;
    let flushed = sink.flush().await;
    let answered = tracker.next().await.map(|_| ()).map_err(|f| f.reason);
    assert_eq!(
        flushed.is_ok(),
        answered.is_ok(),
        "flush() and the acker disagree: {flushed:?} / {answered:?}"
    );
    answered
}

struct Search {
    http: reqwest::Client,
    base: String,
}

impl Search {
    fn new() -> Self {
        Search {
            http: reqwest::Client::new(),
            base: opensearch_url().trim_end_matches('/').to_string(),
        }
    }

    async fn get(&self, path: &str) -> (u16, Json) {
        let r = self
            .http
            .get(format!("{}/{path}", self.base))
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.json().await.unwrap())
    }

    async fn refresh(&self, index: &str) {
        let r = self
            .http
            .post(format!("{}/{index}/_refresh", self.base))
            .send()
            .await
            .unwrap();
        assert!(
            r.status().is_success(),
            "refresh {index}: {}",
            r.text().await.unwrap()
        );
    }

    async fn count(&self, index: &str) -> u64 {
        self.refresh(index).await;
        self.get(&format!("{index}/_count")).await.1["count"]
            .as_u64()
            .unwrap()
    }

    async fn create_index(&self, index: &str, body: Json) {
        let r = self
            .http
            .put(format!("{}/{index}", self.base))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert!(
            r.status().is_success(),
            "create {index}: {}",
            r.text().await.unwrap()
        );
    }
}

#[tokio::test]
async fn index_and_delete_round_trip() {
    let name = unique("rt");
    let index = format!("it-{name}");
    let t = table(&name, &[("id", true), ("name", false), ("qty", false)]);
    let mut sink = ElasticsearchSink::connect(config()).await.unwrap();
    assert!(sink.healthy().await);
    let os = Search::new();

    send(
        &mut sink,
        vec![
            event(
                &t,
                Op::Create,
                None,
                Some(vec![Value::Int64(1), text("pen"), Value::Int32(3)]),
                100,
            ),
            event(
                &t,
                Op::Read,
                None,
                Some(vec![Value::Int64(2), text("ink"), Value::Null]),
                100,
            ),
        ],
    )
    .await
    .unwrap();
    assert_eq!(os.count(&index).await, 2);
    let (status, doc) = os.get(&format!("{index}/_doc/1")).await;
    assert_eq!(status, 200);
    assert_eq!(doc["_source"], json!({"id": 1, "name": "pen", "qty": 3}));
    assert_eq!(
        doc["_version"], 100,
        "the commit LSN is the document version"
    );

    send(
        &mut sink,
        vec![event(
            &t,
            Op::Delete,
            Some(vec![Value::Int64(1), Value::Null, Value::Null]),
            None,
            200,
        )],
    )
    .await
    .unwrap();
    assert_eq!(os.get(&format!("{index}/_doc/1")).await.0, 404);
    assert_eq!(os.count(&index).await, 1);
}

#[tokio::test]
async fn older_versions_and_replays_are_no_ops() {
    let name = unique("ver");
    let index = format!("it-{name}");
    let t = table(&name, &[("id", true), ("name", false)]);
    let mut sink = ElasticsearchSink::connect(config()).await.unwrap();
    let stats = sink.stats();
    let os = Search::new();

    // Two changes of one row in one transaction share the commit LSN: the later wins.
    let batch = vec![
        event(
            &t,
            Op::Create,
            None,
            Some(vec![Value::Int32(7), text("first")]),
            500,
        ),
        upsert(&t, vec![Value::Int32(7), text("second")], 500),
    ];
    send(&mut sink, batch).await.unwrap();
    send(
        &mut sink,
        vec![upsert(&t, vec![Value::Int32(7), text("stale")], 400)],
    )
    .await
    .unwrap();
    assert_eq!(
        stats.version_conflicts.load(Ordering::Relaxed),
        1,
        "the stale event was a 409, counted as done"
    );
    let (_, doc) = os.get(&format!("{index}/_doc/7")).await;
    assert_eq!(doc["_source"]["name"], "second");
    assert_eq!(doc["_version"], 500);

    // A late older delete does not remove the newer document either.
    send(
        &mut sink,
        vec![event(
            &t,
            Op::Delete,
            Some(vec![Value::Int32(7), Value::Null]),
            None,
            450,
        )],
    )
    .await
    .unwrap();
    assert_eq!(os.get(&format!("{index}/_doc/7")).await.0, 200);
    assert_eq!(stats.version_conflicts.load(Ordering::Relaxed), 2);
}

#[tokio::test]
async fn a_mapping_error_goes_to_the_dead_letter_index_and_the_batch_acks() {
    let name = unique("dlq");
    let index = format!("it-{name}");
    let dlq = format!("it-dlq-{name}");
    let os = Search::new();
    os.create_index(&index, json!({"settings": {"number_of_replicas": 0}, "mappings": {"properties": {"n": {"type": "long"}}}}))
        .await;
    let t = table(&name, &[("id", true), ("n", false)]);
    let mut c = config();
    c.dead_letter = DeadLetter::Index { name: dlq.clone() };
    let mut sink = ElasticsearchSink::connect(c).await.unwrap();
    let stats = sink.stats();

    send(
        &mut sink,
        vec![
            upsert(&t, vec![Value::Int32(1), Value::Int64(5)], 0x3_0000_0010),
            upsert(
                &t,
                vec![Value::Int32(2), text("not a number")],
                0x3_0000_0010,
            ),
        ],
    )
    .await
    .expect("a refused document does not fail the batch");
    assert_eq!(stats.dead_lettered.load(Ordering::Relaxed), 1);
    assert_eq!(os.count(&index).await, 1, "the good document is indexed");
    assert_eq!(os.count(&dlq).await, 1);
    let (status, rec) = os
        .get(&format!("{dlq}/_doc/{index}%2F2%2F{}", 0x3_0000_0010u64))
        .await;
    assert_eq!(status, 200, "{rec}");
    let rec = &rec["_source"];
    assert_eq!(rec["index"], json!(index));
    assert_eq!(rec["id"], "2");
    assert_eq!(rec["lsn"], json!(0x3_0000_0010u64));
    assert_eq!(rec["lsn_text"], "3/10");
    assert_eq!(rec["status"], 400);
    assert_eq!(rec["error_type"], "mapper_parsing_exception");
    assert!(
        rec["reason"]
            .as_str()
            .unwrap()
            .contains("failed to parse field [n] of type [long]"),
        "{rec}"
    );
    assert_eq!(rec["document"], r#"{"id":2,"n":"not a number"}"#);
}

#[tokio::test]
async fn the_dead_letter_can_be_a_json_lines_file() {
    let name = unique("dlqf");
    let index = format!("it-{name}");
    let os = Search::new();
    os.create_index(&index, json!({"settings": {"number_of_replicas": 0}, "mappings": {"properties": {"n": {"type": "long"}}}}))
        .await;
    let path = std::env::temp_dir().join(format!("{name}.jsonl"));
    let t = table(&name, &[("id", true), ("n", false)]);
    let mut c = config();
    c.dead_letter = DeadLetter::File { path: path.clone() };
    let mut sink = ElasticsearchSink::connect(c).await.unwrap();
    send(
        &mut sink,
        vec![upsert(&t, vec![Value::Int32(9), text("x")], 77)],
    )
    .await
    .unwrap();
    let lines = std::fs::read_to_string(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    let rec: Json = serde_json::from_str(lines.lines().next().unwrap()).unwrap();
    assert_eq!(
        (
            rec["id"].as_str(),
            rec["lsn"].as_u64(),
            rec["error_type"].as_str()
        ),
        (Some("9"), Some(77), Some("mapper_parsing_exception"))
    );
}

#[tokio::test]
async fn composite_keys_become_joined_ids() {
    let name = unique("comp");
    let index = format!("it-{name}");
    let t = table(&name, &[("region", true), ("id", true), ("v", false)]);
    let mut sink = ElasticsearchSink::connect(config()).await.unwrap();
    send(
        &mut sink,
        vec![upsert(
            &t,
            vec![text("eu"), Value::Int64(42), text("x")],
            10,
        )],
    )
    .await
    .unwrap();
    let (status, doc) = Search::new().get(&format!("{index}/_doc/eu:42")).await;
    assert_eq!(status, 200, "{doc}");
    assert_eq!(doc["_source"]["v"], "x");
}

#[tokio::test]
async fn bulks_are_split_by_max_actions_and_flushed_by_the_timer() {
    let name = unique("split");
    let index = format!("it-{name}");
    let t = table(&name, &[("id", true)]);
    let mut c = config();
    c.bulk_max_actions = 2;
    c.flush_interval = std::time::Duration::from_millis(200);
    let mut sink = ElasticsearchSink::connect(c).await.unwrap();
    let stats = sink.stats();
    send(
        &mut sink,
        (0..5)
            .map(|i| upsert(&t, vec![Value::Int32(i)], 10))
            .collect(),
    )
    .await
    .unwrap();
    assert_eq!(
        stats.bulk_requests.load(Ordering::Relaxed),
        3,
        "5 actions at 2 per bulk"
    );
    assert_eq!(Search::new().count(&index).await, 5);

    // Without flush(): one action stays below bulk_max_actions, so only the
    // flush interval can write it.
    let mut tracker: AckTracker<u64> = AckTracker::new();
    let acker = tracker.register(Some(1), 1);
    sink.send(Batch {
        events: Arc::new(vec![upsert(&t, vec![Value::Int32(99)], 11)]),
        acker,
    })
    .await
    .unwrap();
    let answered = tokio::time::timeout(Duration::from_secs(10), tracker.next())
        .await
        .expect("acked by the flush timer");
    assert_eq!(answered.unwrap(), Some(1));
    assert_eq!(stats.bulk_requests.load(Ordering::Relaxed), 4);
}

#[tokio::test]
async fn a_table_without_key_fails_its_batch() {
    let name = unique("nokey");
    let t = table(&name, &[("line", false)]);
    let mut sink = ElasticsearchSink::connect(config()).await.unwrap();
    let mut tracker: AckTracker<u64> = AckTracker::new();
    let acker = tracker.register(Some(1), 1);
    let err = sink
        .send(Batch {
            events: Arc::new(vec![upsert(&t, vec![text("x")], 5)]),
            acker,
        })
        .await
        .unwrap_err();
    assert!(!err.is_transient());
    let reason = tracker.next().await.unwrap_err().reason;
    assert!(
        reason.contains(&format!("table public.{name} has no primary key")),
        "{reason}"
    );
}

#[tokio::test]
async fn a_closed_port_is_reported_at_connect() {
    let err = ElasticsearchSink::connect(ElasticsearchSinkConfig::new("http://127.0.0.1:1"))
        .await
        .err()
        .expect("port 1 refuses");
    assert!(
        err.to_string().contains("cannot reach http://127.0.0.1:1"),
        "{err}"
    );
}

/// Issue 21: an update that left a TOASTed column unchanged carries no value
/// for it. The stored value must survive (from the cluster, or from an
/// earlier change of the row in the same flush); a stale event stays
/// refused; and with no stored value the placeholder is never written.
#[tokio::test]
async fn unchanged_toast_values_keep_the_stored_value() {
    let name = unique("toast");
    let index = format!("it-{name}");
    let t = table(&name, &[("id", true), ("title", false), ("body", false)]);
    let mut sink = ElasticsearchSink::connect(config()).await.unwrap();
    let os = Search::new();
    let row = |id: i64, title: &str, body: Value| vec![Value::Int64(id), text(title), body];
    let source = |doc: &Json| doc["_source"].clone();

    send(
        &mut sink,
        vec![upsert(&t, row(1, "a", text("long text v1")), 10)],
    )
    .await
    .unwrap();
    send(
        &mut sink,
        vec![upsert(&t, row(1, "b", Value::Unavailable), 20)],
    )
    .await
    .unwrap();
    let (_, doc) = os.get(&format!("{index}/_doc/1")).await;
    assert_eq!(
        source(&doc),
        json!({"id": 1, "title": "b", "body": "long text v1"}),
        "the stored body survives an update that did not carry it"
    );
    assert_eq!(doc["_version"], 20, "still versioned by the commit LSN");

    // Two changes of the row in one flush: the second keeps the first's body.
    send(
        &mut sink,
        vec![
            upsert(&t, row(1, "c", text("long text v2")), 30),
            upsert(&t, row(1, "d", Value::Unavailable), 31),
        ],
    )
    .await
    .unwrap();
    let (_, doc) = os.get(&format!("{index}/_doc/1")).await;
    assert_eq!(
        source(&doc),
        json!({"id": 1, "title": "d", "body": "long text v2"})
    );

    // A replayed older event is still refused by its version.
    send(
        &mut sink,
        vec![upsert(&t, row(1, "stale", Value::Unavailable), 15)],
    )
    .await
    .unwrap();
    let (_, doc) = os.get(&format!("{index}/_doc/1")).await;
    assert_eq!(source(&doc)["title"], "d");
    assert_eq!(doc["_version"], 31);

    // No stored document (a key change creates the new row this way).
    send(
        &mut sink,
        vec![upsert(&t, row(2, "new key", Value::Unavailable), 40)],
    )
    .await
    .unwrap();
    let (_, doc) = os.get(&format!("{index}/_doc/2")).await;
    assert_eq!(
        source(&doc),
        json!({"id": 2, "title": "new key", "__walcast_incomplete": ["body"]}),
        "an unknown value is left out and listed, never the placeholder"
    );
    // The next change that carries the column completes the document.
    send(&mut sink, vec![upsert(&t, row(2, "full", text("b2")), 41)])
        .await
        .unwrap();
    let (_, doc) = os.get(&format!("{index}/_doc/2")).await;
    assert_eq!(
        source(&doc),
        json!({"id": 2, "title": "full", "body": "b2"})
    );
    let stats = sink.stats();
    assert_eq!(
        stats
            .unavailable_kept
            .load(std::sync::atomic::Ordering::Relaxed),
        3
    );
    assert_eq!(
        stats
            .incomplete_documents
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
}

fn typed_table(name: &str, cols: &[(&str, PgType)], version: u32) -> Arc<TableSchema> {
    Arc::new(TableSchema {
        relation_id: 1,
        schema: "public".into(),
        name: name.into(),
        columns: cols
            .iter()
            .enumerate()
            .map(|(i, (c, t))| Column {
                key_position: None,
                default: None,
                name: c.to_string(),
                pg_type: t.clone(),
                type_oid: 0,
                type_modifier: -1,
                nullable: i != 0,
                key: i == 0,
            })
            .collect(),
        replica_identity: ReplicaIdentity::Default,
        version,
    })
}

/// Issue 21: the index is created from the table's types before the first
/// write. Dynamic mapping made `double precision` a 32-bit float (1e300
/// refused, digits lost) and refused `infinity` as a date.
#[tokio::test]
async fn the_index_is_mapped_from_the_table_and_special_values_are_set_aside() {
    let name = unique("typed");
    let index = format!("it-{name}");
    let s = Search::new();
    let t = typed_table(
        &name,
        &[
            ("id", PgType::Int8),
            ("f", PgType::Float8),
            ("at", PgType::TimestampTz),
            ("until", PgType::Date),
        ],
        1,
    );
    let mut sink = ElasticsearchSink::connect(config()).await.unwrap();
    send(
        &mut sink,
        vec![
            upsert(
                &t,
                vec![
                    Value::Int64(1),
                    Value::Float64(1e300),
                    Value::TimestampTz(1_700_000_000_123_456),
                    Value::Date(19_000),
                ],
                10,
            ),
            upsert(
                &t,
                vec![
                    Value::Int64(2),
                    Value::Float64(0.1 + 0.2),
                    Value::TimestampTz(walcast_sdk::value::TIMESTAMP_INFINITY),
                    Value::Date(walcast_sdk::value::DATE_NEG_INFINITY),
                ],
                10,
            ),
            upsert(
                &t,
                vec![
                    Value::Int64(3),
                    Value::Float64(f64::NAN),
                    Value::Null,
                    Value::Date(-719_528 - 1),
                ],
                10,
            ),
        ],
    )
    .await
    .unwrap();
    let (_, m) = s.get(&format!("{index}/_mapping")).await;
    let p = &m[&index]["mappings"]["properties"];
    assert_eq!(p["f"]["type"], "double", "{m}");
    assert_eq!(p["at"]["type"], "date", "{m}");
    assert_eq!(p["until"]["type"], "date", "{m}");
    assert_eq!(
        s.count(&index).await,
        3,
        "every row indexed, none dead-lettered"
    );
    let (_, d1) = s.get(&format!("{index}/_doc/1")).await;
    assert_eq!(d1["_source"]["f"].as_f64(), Some(1e300));
    assert_eq!(d1["_source"]["at"], "2023-11-14T22:13:20.123456Z");
    assert_eq!(d1["_source"]["until"], "2022-01-08");
    let (_, d2) = s.get(&format!("{index}/_doc/2")).await;
    assert_eq!(d2["_source"]["f"].as_f64(), Some(0.1 + 0.2));
    assert_eq!(d2["_source"]["f"].to_string(), "0.30000000000000004");
    assert!(d2["_source"].get("at").is_none(), "{d2}");
    assert_eq!(
        d2["_source"]["__walcast_special"],
        serde_json::json!({"at": "infinity", "until": "-infinity"})
    );
    let (_, d3) = s.get(&format!("{index}/_doc/3")).await;
    assert_eq!(
        d3["_source"]["__walcast_special"],
        serde_json::json!({"f": "NaN"})
    );
    assert_eq!(
        d3["_source"]["until"], "-0001-12-31",
        "2 BC in ISO 8601's expanded years"
    );
    // The special text is searchable.
    let (_, hits) = s
        .get(&format!("{index}/_search?q=__walcast_special.at:infinity"))
        .await;
    assert_eq!(hits["hits"]["total"]["value"], 1, "{hits}");

    // ALTER TABLE ... ADD COLUMN: the new field is mapped before its first document.
    let t2 = typed_table(
        &name,
        &[
            ("id", PgType::Int8),
            ("f", PgType::Float8),
            ("at", PgType::TimestampTz),
            ("until", PgType::Date),
            ("ratio", PgType::Float8),
        ],
        2,
    );
    send(
        &mut sink,
        vec![upsert(
            &t2,
            vec![
                Value::Int64(4),
                Value::Float64(2.5),
                Value::Null,
                Value::Null,
                Value::Float64(1.0),
            ],
            11,
        )],
    )
    .await
    .unwrap();
    let (_, m) = s.get(&format!("{index}/_mapping")).await;
    assert_eq!(
        m[&index]["mappings"]["properties"]["ratio"]["type"], "double",
        "{m}"
    );
    assert_eq!(sink.stats().indices_created.load(Ordering::Relaxed), 1);
    assert_eq!(sink.stats().mapping_updates.load(Ordering::Relaxed), 1);
}

/// A user-created index is respected: missing fields are added, a field of
/// another type is reported and left alone.
#[tokio::test]
async fn an_existing_index_keeps_its_mapping_and_conflicts_are_counted() {
    let name = unique("userindex");
    let index = format!("it-{name}");
    let s = Search::new();
    s.create_index(
        &index,
        serde_json::json!({"mappings": {"properties": {"f": {"type": "keyword"}}}}),
    )
    .await;
    let t = typed_table(&name, &[("id", PgType::Int8), ("f", PgType::Float8)], 1);
    let mut sink = ElasticsearchSink::connect(config()).await.unwrap();
    send(
        &mut sink,
        vec![upsert(&t, vec![Value::Int64(1), Value::Float64(1.5)], 5)],
    )
    .await
    .unwrap();
    let (_, m) = s.get(&format!("{index}/_mapping")).await;
    let p = &m[&index]["mappings"]["properties"];
    assert_eq!(p["f"]["type"], "keyword", "the user's mapping stays: {m}");
    assert_eq!(p["id"]["type"], "long", "missing fields are added: {m}");
    assert_eq!(sink.stats().mapping_conflicts.load(Ordering::Relaxed), 1);
    assert_eq!(s.count(&index).await, 1);
}
