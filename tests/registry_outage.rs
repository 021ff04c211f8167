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

use axum::body::Bytes;
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
    let pass: Vec<(&str, &str)> = ["content-type", "accept"]
        .into_iter()
        .filter_map(|name| Some((name, headers.get(name)?.to_str().unwrap())))
        .collect();
    forward(&p.http, &p.upstream, &method, &uri, &pass, body).await
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
    let proxy_url = serve(axum::Router::new().fallback(handle).with_state(proxy)).await;

    let db = TestDb::new("wc_regout").await;
    db.exec("CREATE TABLE orders (id bigint PRIMARY KEY, item text)")
        .await;
    let pipeline = unique("regout");
    let prefix = unique("ro");
    let topic = format!("{prefix}.public.orders");
    let mut w = Walcast::start_with(|_, admin| {
        KafkaCapture::new(&pipeline, &db.name, &prefix, &["public.orders"])
            .avro(&proxy_url, "max_attempts = 2")
            .toml(admin)
    });
    w.wait_state("streaming", WAIT).await;
    const N: i64 = 50;
    for i in 1..=N {
        db.exec(&format!("INSERT INTO orders VALUES ({i}, 'item {i}')"))
            .await;
    }
    let events = consume_avro(&registry, &topic, N as usize, WAIT).await;
    let ids: Vec<i64> = events
        .iter()
        .map(|(_, e)| e["after"]["id"].as_i64().unwrap())
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
    w.wait_confirmed(&db, &slot, delivered_end, WAIT, "never confirmed")
        .await;

    // An incompatible change: the registry refuses, the pipeline stops
    // with the subject, table and column named, and the refused change is
    // never confirmed (a restart would meet it again).
    db.exec("ALTER TABLE orders ALTER COLUMN item TYPE int USING 0")
        .await;
    let before_refused = db.current_wal().await;
    db.exec("INSERT INTO orders VALUES (1000, 1000)").await;
    w.wait_failed("the incompatible schema", WAIT).await;
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
