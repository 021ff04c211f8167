//! The schema registry failing under a running Avro capture (issue #16): a
//! proxy in the test sits between walcast and the stack's real Apicurio and
//! answers the first requests with 500. walcast must wait the outage out
//! (the client's own attempts, then the Kafka sink's backoff, holding the
//! pipeline) and deliver every event; afterwards an incompatible ALTER
//! stops the pipeline with an error naming the subject, the table and the
//! column, and confirms nothing past the refused change.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use support::*;

const WAIT: Duration = Duration::from_secs(120);
/// Requests answered 500 before the proxy starts forwarding: more than the
/// client's `max_attempts` (2 here), so only a retry above it gets through.
const FAILING: usize = 7;

#[derive(Clone)]
struct Proxy {
    upstream: String,
    seen: Arc<AtomicUsize>,
    http: reqwest::Client,
}

async fn handle(
    State(p): State<Proxy>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if p.seen.fetch_add(1, Ordering::SeqCst) < FAILING {
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            axum::Json(
                serde_json::json!({"error_code": 50001, "message": "injected by the test proxy"}),
            ),
        )
            .into_response();
    }
    let url = format!(
        "{}{}",
        p.upstream,
        uri.path_and_query().map(|x| x.as_str()).unwrap_or("/")
    );
    let mut req = p.http.request(
        reqwest::Method::from_bytes(method.as_str().as_bytes()).unwrap(),
        url,
    );
    for name in ["content-type", "accept"] {
        if let Some(v) = headers.get(name) {
            req = req.header(name, v.to_str().unwrap());
        }
    }
    let resp = req.body(body.to_vec()).send().await.unwrap();
    let status = StatusCode::from_u16(resp.status().as_u16()).unwrap();
    let ct = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json")
        .to_string();
    let bytes = resp.bytes().await.unwrap();
    Response::builder()
        .status(status)
        .header("content-type", ct)
        .body(Body::from(bytes))
        .unwrap()
}

/// The topic's values, decoded with the real registry.
async fn decoded(registry_url: &str, topic: &str, n: usize) -> Vec<serde_json::Value> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::Message;
    let decoder = walcast_schemas::AvroDecoder::new(Arc::new(
        walcast_schemas::HttpRegistry::new(&walcast_schemas::RegistryConfig::new(registry_url))
            .unwrap(),
    ));
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", var("WALCAST_TEST_KAFKA_BOOTSTRAP"))
        .set("group.id", unique("regout"))
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    consumer.subscribe(&[topic]).unwrap();
    let mut raw = Vec::new();
    let deadline = std::time::Instant::now() + WAIT;
    while raw.len() < n {
        assert!(
            std::time::Instant::now() < deadline,
            "{} of {n} records on {topic}",
            raw.len()
        );
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
            if let Some(p) = m.payload() {
                raw.push(p.to_vec());
            }
        }
    }
    let mut out = Vec::new();
    for r in raw {
        out.push(decoder.decode(&r).await.unwrap().1);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_500s_are_waited_out_then_an_incompatible_change_stops_naming_the_column() {
    let registry = var("WALCAST_TEST_REGISTRY_URL");
    let proxy = Proxy {
        upstream: registry.clone(),
        seen: Arc::new(AtomicUsize::new(0)),
        http: reqwest::Client::new(),
    };
    let seen = proxy.seen.clone();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy_url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        axum::serve(
            listener,
            axum::Router::new().fallback(handle).with_state(proxy),
        )
        .await
        .unwrap();
    });

    let db = TestDb::new("wc_regout").await;
    db.exec("CREATE TABLE orders (id bigint PRIMARY KEY, item text)")
        .await;
    let pipeline = unique("regout");
    let prefix = unique("ro");
    let topic = format!("{prefix}.public.orders");
    let mut w = Walcast::start_with(|_, admin| {
        format!(
            r#"[admin]
listen = "{admin}"
[log]
format = "json"
[pipelines.{pipeline}]
kind = "capture"
topic_prefix = "{prefix}"
format = "avro"
[pipelines.{pipeline}.registry]
url = "{proxy_url}"
max_attempts = 2
[pipelines.{pipeline}.source]
port = {port}
database = "{db}"
user = "postgres"
tables = ["public.orders"]
status_interval = "1s"
[[pipelines.{pipeline}.sinks]]
type = "kafka"
bootstrap_servers = "{bootstrap}"
"#,
            port = pg_port(),
            db = db.name,
            bootstrap = var("WALCAST_TEST_KAFKA_BOOTSTRAP")
        )
    });
    w.wait_state("streaming", WAIT).await;
    const N: i64 = 50;
    for i in 1..=N {
        db.exec(&format!("INSERT INTO orders VALUES ({i}, 'item {i}')"))
            .await;
    }
    let events = decoded(&registry, &topic, N as usize).await;
    let ids: Vec<i64> = events
        .iter()
        .map(|e| e["after"]["id"].as_i64().unwrap())
        .collect();
    assert_eq!(
        ids,
        (1..=N).collect::<Vec<_>>(),
        "every row, in order, once"
    );
    assert!(
        seen.load(Ordering::SeqCst) > FAILING,
        "the proxy failed {FAILING} requests, then forwarded"
    );
    assert!(
        w.exited().is_none(),
        "the outage stopped walcast:\n{}",
        tail(&w.log(), 3000)
    );
    let log = w.log();
    assert!(
        log.contains("schema registry unavailable; retrying")
            && log.contains("holding the pipeline and retrying"),
        "the outage is logged as waited out:\n{}",
        tail(&log, 3000)
    );
    // Everything delivered is confirmed.
    let slot = format!("walcast_{pipeline}");
    let delivered_end = db.current_wal().await;
    let deadline = std::time::Instant::now() + WAIT;
    while db.confirmed_flush(&slot).await.unwrap_or(0) < delivered_end {
        assert!(std::time::Instant::now() < deadline, "never confirmed");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // An incompatible change: the registry refuses, the pipeline stops
    // with the subject, table and column named, and the refused change is
    // never confirmed (a restart would meet it again).
    db.exec("ALTER TABLE orders ALTER COLUMN item TYPE int USING 0")
        .await;
    let before_refused = db.current_wal().await;
    db.exec("INSERT INTO orders VALUES (1000, 1000)").await;
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        if w.exited().is_some()
            || w.status()
                .await
                .is_some_and(|s| s["pipelines"][0]["state"] == "failed")
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the incompatible schema did not stop the pipeline:\n{}",
            tail(&w.log(), 3000)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let log = w.log();
    let error_line = log
        .lines()
        .rev()
        .find(|l| l.contains("incompatible") || l.contains("INCOMPATIBLE"))
        .unwrap_or_else(|| panic!("no error about the schema:\n{}", tail(&log, 3000)));
    for part in [
        format!("{topic}-value"),
        "public.orders".to_string(),
        "column `item` changed type from text to integer".to_string(),
    ] {
        assert!(
            error_line.contains(&part),
            "the error names {part}: {error_line}"
        );
    }
    assert!(
        db.confirmed_flush(&slot).await.unwrap() <= before_refused,
        "the refused change was confirmed"
    );
    w.kill9();
}
