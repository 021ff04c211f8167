//! Schemas evolving under a running capture: ALTER TABLE mid-stream
//! registers a new version before the first event of the new shape; an
//! incompatible change stops the pipeline with an error naming the subject;
//! a data contract refuses what breaks it. Against Apicurio and against
//! walcast's own embedded registry.

mod support;

use std::sync::Arc;
use std::time::Duration;

use support::*;

const WAIT: Duration = Duration::from_secs(90);

fn config(
    pipeline: &str,
    admin: &str,
    db: &str,
    prefix: &str,
    registry_url: &str,
    extra_top: &str,
    extra_registry: &str,
) -> String {
    format!(
        r#"{extra_top}
[admin]
listen = "{admin}"
[log]
format = "json"
[pipelines.{pipeline}]
kind = "capture"
topic_prefix = "{prefix}"
format = "avro"
[pipelines.{pipeline}.registry]
url = "{registry_url}"
{extra_registry}
[pipelines.{pipeline}.source]
port = {port}
database = "{db}"
user = "postgres"
tables = ["public.orders"]
[[pipelines.{pipeline}.sinks]]
type = "kafka"
bootstrap_servers = "{bootstrap}"
"#,
        port = pg_port(),
        bootstrap = var("WALCAST_TEST_KAFKA_BOOTSTRAP")
    )
}

async fn decoded(registry_url: &str, topic: &str, n: usize) -> Vec<serde_json::Value> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::Message;
    let decoder = walcast_schemas::AvroDecoder::new(Arc::new(
        walcast_schemas::HttpRegistry::new(&walcast_schemas::RegistryConfig::new(registry_url))
            .unwrap(),
    ));
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", var("WALCAST_TEST_KAFKA_BOOTSTRAP"))
        .set("group.id", unique("evo"))
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
        let (id, v) = decoder.decode(&r).await.unwrap();
        out.push(serde_json::json!({"schema_id": id, "event": v}));
    }
    out
}

async fn run_evolution(registry_url: &str, extra_top: &str) {
    let db = TestDb::new("wc_evo").await;
    db.exec("CREATE TABLE orders (id bigint PRIMARY KEY, item text)")
        .await;
    let prefix = unique("evo");
    let topic = format!("{prefix}.public.orders");
    let mut w = Walcast::start_with(|_, admin| {
        config(
            &unique("evo"),
            admin,
            &db.name,
            &prefix,
            registry_url,
            extra_top,
            "",
        )
    });
    w.wait_state("streaming", WAIT).await;
    db.exec("INSERT INTO orders VALUES (1, 'a')").await;
    db.exec("ALTER TABLE orders ADD COLUMN price numeric(8,2)")
        .await;
    db.exec("INSERT INTO orders VALUES (2, 'b', 2.50)").await;
    let ev = decoded(registry_url, &topic, 2).await;
    assert_ne!(
        ev[0]["schema_id"], ev[1]["schema_id"],
        "a new schema version for the new shape"
    );
    assert_eq!(ev[1]["event"]["after"]["price"], "2.50");
    assert!(ev[0]["event"]["after"].get("price").is_none());
    // Both versions are in the registry under the value subject.
    let versions: serde_json::Value =
        reqwest::get(format!("{registry_url}/subjects/{topic}-value/versions"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
    assert_eq!(versions.as_array().map(|v| v.len()), Some(2), "{versions}");

    // An incompatible change (a column's type) stops the pipeline with the subject named.
    db.exec("ALTER TABLE orders ALTER COLUMN item TYPE int USING 0")
        .await;
    db.exec("INSERT INTO orders VALUES (3, 3, 1.00)").await;
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
            "an incompatible schema did not stop the pipeline:\n{}",
            tail(&w.log(), 3000)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let log = w.log();
    assert!(
        log.contains(&format!("{topic}-value")) && log.to_lowercase().contains("incompatible"),
        "{}",
        tail(&log, 3000)
    );
    w.kill9();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alter_table_mid_stream_with_apicurio() {
    run_evolution(&var("WALCAST_TEST_REGISTRY_URL"), "").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alter_table_mid_stream_with_the_embedded_registry() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let top = format!(
        "[embedded_registry]\ndir = \"{}\"\nlisten = \"127.0.0.1:{port}\"",
        dir.path().display()
    );
    run_evolution(&format!("http://127.0.0.1:{port}"), &top).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_contract_mismatch_is_refused_by_run() {
    let db = TestDb::new("wc_contract").await;
    // The checked-in example contract says public.orders has id bigint,
    // item text, price numeric(12,2); this table narrows price.
    db.exec("CREATE TABLE orders (id bigint PRIMARY KEY, item text, price numeric(6,2))")
        .await;
    let prefix = unique("ctr");
    let contracts = concat!(env!("CARGO_MANIFEST_DIR"), "/schemas/contracts");
    let mut w = Walcast::start_with(|_, admin| {
        config(
            "contract",
            admin,
            &db.name,
            &prefix,
            &var("WALCAST_TEST_REGISTRY_URL"),
            "",
            &format!("contracts = \"{contracts}\""),
        )
    });
    w.wait_state("streaming", WAIT).await;
    db.exec("INSERT INTO orders VALUES (1, 'a', 1.00)").await;
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
            "the contract mismatch did not stop the pipeline:\n{}",
            tail(&w.log(), 3000)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let log = w.log();
    assert!(
        log.contains("contract") && log.contains("price"),
        "{}",
        tail(&log, 3000)
    );
    w.kill9();
}
