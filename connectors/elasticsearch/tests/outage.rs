//! An OpenSearch outage while a batch is in flight: the sink holds the
//! batch, retries, and acknowledges once the node is back. A file of its own
//! because it stops the shared test node (test binaries run one after
//! another); it restarts it through `deploy/local/stack`.

use std::process::Command;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use walcast_elasticsearch::{ElasticsearchSink, ElasticsearchSinkConfig};
use walcast_sdk::{
    AckTracker, Batch, ChangeEvent, Column, Lsn, Op, PgType, ReplicaIdentity, Sink, SnapshotMarker,
    SourceInfo, TableSchema, Value,
};

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: start the test services with `deploy/local/stack up --only opensearch` and run `eval \"$(deploy/local/stack env)\"`")
    })
}

fn stack(args: &[&str]) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy/local/stack");
    let status = Command::new(script)
        .args(args)
        .env("WALCAST_STACK_DIR", env("WALCAST_TEST_STACK_DIR"))
        .status()
        .expect("run deploy/local/stack");
    assert!(status.success(), "deploy/local/stack {args:?} failed");
}

#[tokio::test]
async fn a_batch_sent_during_an_outage_is_retried_until_the_node_is_back() {
    let url = env("WALCAST_TEST_OPENSEARCH_URL");
    let name = format!("outage_{}", std::process::id());
    let t = Arc::new(TableSchema {
        relation_id: 1,
        schema: "public".into(),
        name: name.clone(),
        columns: vec![Column {
            key_position: None,
            default: None,
            name: "id".into(),
            pg_type: PgType::Int4,
            type_oid: 23,
            type_modifier: -1,
            nullable: false,
            key: true,
        }],
        replica_identity: ReplicaIdentity::Default,
        version: 1,
    });
    let event = ChangeEvent {
        op: Op::Create,
        table: t,
        before: None,
        after: Some(vec![Value::Int32(1)]),
        source: SourceInfo {
            name: "it".into(),
            db: "app".into(),
            lsn: Lsn(5),
            commit_lsn: Lsn(5),
            tx_id: None,
            ts_ms: 0,
            ts_us: 0,
            snapshot: SnapshotMarker::False,
        },
        transaction: None,
        ts_ms: 0,
    };
    let mut c = ElasticsearchSinkConfig::new(url.clone());
    c.index_template = "it-{table}".into();
    c.retry_initial = std::time::Duration::from_millis(200);
    c.retry_max = std::time::Duration::from_millis(2_000);
    c.timeout = std::time::Duration::from_millis(5_000);
    let mut sink = ElasticsearchSink::connect(c).await.unwrap();
    let stats = sink.stats();

    stack(&["stop", "opensearch"]);
    let mut tracker: AckTracker<u64> = AckTracker::new();
    let acker = tracker.register(Some(1), 1);
    sink.send(Batch {
        events: Arc::new(vec![event]),
        acker,
    })
    .await
    .unwrap();
    let flushing = tokio::spawn(async move { (sink.flush().await, sink) });
    tokio::time::sleep(Duration::from_secs(2)).await;
    let held = !flushing.is_finished();
    stack(&["start", "opensearch"]);

    let (flushed, _sink) = tokio::time::timeout(Duration::from_secs(120), flushing)
        .await
        .expect("flushed after the restart")
        .unwrap();
    assert!(held, "the sink holds the batch while the node is down");
    flushed.expect("the batch is delivered once the node is back");
    assert_eq!(tracker.next().await.unwrap(), Some(1));
    assert!(
        stats.retries.load(Ordering::Relaxed) > 0,
        "the outage was retried"
    );
    let resp = reqwest::get(format!("{url}/it-{name}/_doc/1"))
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
}
