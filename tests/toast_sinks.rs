//! Issue 21, end to end: Postgres → capture (JSON) → Kafka → relay → Redis
//! and OpenSearch. An update that leaves a TOASTed column unchanged carries
//! `__debezium_unavailable_value` on Kafka; the sinks must keep the stored
//! value. A key change (a delete and a create) has no stored value for the
//! new row: the column is left out and listed, never the placeholder.

mod support;

use std::time::{Duration, Instant};

use support::*;

const WAIT: Duration = Duration::from_secs(90);
const PLACEHOLDER: &str = "__debezium_unavailable_value";

async fn until<T>(what: &str, w: &Walcast, mut f: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}:\n{}",
            tail(&w.log(), 3000)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unchanged_toast_columns_keep_their_value_in_redis_and_opensearch() {
    let db = TestDb::new("wc_toast").await;
    // EXTERNAL: stored out of line without compression, so 10 kB is TOASTed.
    db.exec(
        "CREATE TABLE t (id int PRIMARY KEY, v text, body text);
         ALTER TABLE t ALTER COLUMN body SET STORAGE EXTERNAL;",
    )
    .await;
    let prefix = unique("toast");
    let topic = format!("{prefix}.public.t");
    let search = var("WALCAST_TEST_OPENSEARCH_URL");
    let w = Walcast::start_with(|_, admin| {
        KafkaCapture::new("toastcap", &db.name, &prefix, &["public.t"])
            .create_topics()
            .toml(admin)
            + &relay_to_redis_and_search(&prefix, &topic, &prefix, 100)
    });
    // Both pipelines: `wait_state` looks at the first by name, the relay,
    // and rows written while the capture still snapshots arrive as reads.
    w.wait_status("both pipelines streaming", WAIT, |s| {
        s["pipelines"]
            .as_array()
            .is_some_and(|p| p.len() == 2 && p.iter().all(|p| p["state"] == "streaming"))
    })
    .await;
    let body: String = "0123456789".repeat(1_000);
    db.exec(&format!(
        "INSERT INTO t VALUES (1, 'a', '{body}'), (3, 'c', '{body}');
         UPDATE t SET v = 'b' WHERE id = 1;
         UPDATE t SET id = 4 WHERE id = 3;"
    ))
    .await;

    // The capture really published the placeholder for the update.
    consume_json(&topic, WAIT, |rs| {
        rs.iter().any(|(_, v)| {
            v.as_ref()
                .is_some_and(|v| v["op"] == "u" && v["after"]["body"] == PLACEHOLDER)
        })
    });

    let http = reqwest::Client::new();
    let doc = until("the update in OpenSearch", &w, async || {
        let d = search_doc(&http, &search, &prefix, 1).await;
        (d["_source"]["v"] == "b").then_some(d)
    })
    .await;
    let kept = doc["_source"]["body"].as_str().unwrap_or_default();
    assert!(
        kept == body,
        "the stored body survives in OpenSearch; got {:.60}",
        kept
    );
    let mut redis = redis::Client::open(var("WALCAST_TEST_REDIS_URL"))
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let cached: serde_json::Value = until("the update in Redis", &w, async || {
        let s: Option<String> = redis::cmd("GET")
            .arg(format!("{prefix}:1"))
            .query_async(&mut redis)
            .await
            .unwrap();
        let v: serde_json::Value = serde_json::from_str(&s?).unwrap();
        (v["v"] == "b").then_some(v)
    })
    .await;
    let kept = cached["body"].as_str().unwrap_or_default();
    assert!(
        kept == body,
        "the stored body survives in Redis; got {:.60}",
        kept
    );

    // The key change: the new row has no stored copy to keep the body from.
    let moved = until("the moved row in OpenSearch", &w, async || {
        let d = search_doc(&http, &search, &prefix, 4).await;
        (d["found"] == true).then_some(d)
    })
    .await;
    assert_eq!(
        moved["_source"],
        serde_json::json!({"id": 4, "v": "c", "__walcast_incomplete": ["body"]})
    );
    let cached: Option<String> = redis::cmd("GET")
        .arg(format!("{prefix}:4"))
        .query_async(&mut redis)
        .await
        .unwrap();
    let cached: serde_json::Value = serde_json::from_str(&cached.unwrap()).unwrap();
    assert_eq!(
        cached,
        serde_json::json!({"id": 4, "v": "c", "__walcast_incomplete": ["body"]})
    );
    assert!(
        !w.log().contains("pipeline stopped"),
        "{}",
        tail(&w.log(), 2000)
    );
}
