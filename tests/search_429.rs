//! OpenSearch back-pressure for real traffic: a proxy in the test sits
//! between walcast and a real OpenSearch node and answers the first bulk
//! requests with per-item 429 (es_rejected_execution_exception, what a full
//! write queue gives) and then one whole-request 429, before forwarding.
//! The sink must retry with backoff and deliver everything, in direct mode
//! (Postgres → OpenSearch, no Kafka).

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};
use support::*;

#[derive(Clone)]
struct Proxy {
    upstream: String,
    bulk_seen: Arc<AtomicUsize>,
    http: reqwest::Client,
}

/// Per-item 429 for every action of a `_bulk` body.
fn rejected_items(body: &[u8]) -> Value {
    let mut items = Vec::new();
    let mut lines = body.split(|b| *b == b'\n').filter(|l| !l.is_empty());
    while let Some(line) = lines.next() {
        let action: Value = serde_json::from_slice(line).unwrap();
        let (kind, meta) = action
            .as_object()
            .unwrap()
            .iter()
            .next()
            .map(|(k, v)| (k.clone(), v.clone()))
            .unwrap();
        if kind != "delete" {
            lines.next(); // the document
        }
        items.push(json!({kind: {"_index": meta["_index"], "_id": meta["_id"], "status": 429,
            "error": {"type": "es_rejected_execution_exception", "reason": "rejected execution (queue capacity 1)"}}}));
    }
    json!({"took": 1, "errors": true, "items": items})
}

async fn handle(State(p): State<Proxy>, method: Method, uri: Uri, body: Bytes) -> Response {
    if uri.path().ends_with("/_bulk") {
        let n = p.bulk_seen.fetch_add(1, Ordering::SeqCst);
        if n < 2 {
            return (StatusCode::OK, axum::Json(rejected_items(&body))).into_response();
        }
        if n == 2 {
            return (
                StatusCode::TOO_MANY_REQUESTS,
                axum::Json(
                    json!({"error": {"type": "es_rejected_execution_exception"}, "status": 429}),
                ),
            )
                .into_response();
        }
    }
    forward(
        &p.http,
        &p.upstream,
        &method,
        &uri,
        &[("content-type", "application/json")],
        body,
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_bulk_requests_are_retried_until_delivered() {
    let search = var("WALCAST_TEST_OPENSEARCH_URL");
    let proxy = Proxy {
        upstream: search.clone(),
        bulk_seen: Arc::new(AtomicUsize::new(0)),
        http: reqwest::Client::new(),
    };
    let seen = proxy.bulk_seen.clone();
    let proxy_url = serve(axum::Router::new().fallback(handle).with_state(proxy)).await;

    let db = TestDb::new("wc_429").await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY, v text)").await;
    let index = unique("es429");
    let w = Walcast::start_with(|_, admin| {
        format!(
            r#"[admin]
listen = "{admin}"
[log]
format = "json"
[pipelines.direct]
kind = "capture"
format = "json"
[pipelines.direct.source]
port = {port}
database = "{db}"
user = "postgres"
tables = ["public.t"]
[[pipelines.direct.sinks]]
type = "elasticsearch"
url = "{proxy_url}"
index_template = "{index}"
flush_interval_ms = 100
retry_initial_ms = 50
retry_max_ms = 500
"#,
            port = pg_port(),
            db = db.name
        )
    });
    w.wait_state("streaming", Duration::from_secs(60)).await;
    db.exec("INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 20) g")
        .await;
    let http = reqwest::Client::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let count = search_count(&http, &search, &index).await;
        if count == Some(20) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "documents never arrived: {count:?} in the index; log:\n{}",
            tail(&w.log(), 3000)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        seen.load(Ordering::SeqCst) >= 4,
        "three rejected bulk requests, then at least one forwarded"
    );
    let doc = search_doc(&http, &search, &index, 7).await;
    assert_eq!(doc["_source"]["v"], "v7");
    // The batch is acknowledged once the index has it: nothing stays in flight.
    w.wait_status(
        "no events in flight (events stayed in flight)",
        Duration::from_secs(30),
        |s| s["pipelines"][0]["in_flight_events"] == 0,
    )
    .await;
}
