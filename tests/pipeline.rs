//! The whole path on real servers: Postgres → walcast capture → Kafka (Avro
//! through Apicurio) → walcast relay → Redis and OpenSearch, in one daemon
//! run from one config file, as the quick start runs it.

mod support;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::Message;
use support::*;

const WAIT: Duration = Duration::from_secs(90);

async fn until<T>(what: &str, mut f: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_to_kafka_avro_to_redis_and_opensearch() {
    let db = TestDb::new("wc_pipe").await;
    db.exec("CREATE TABLE orders (id bigint PRIMARY KEY, item text NOT NULL, price numeric(12,2), placed timestamptz)").await;
    let prefix = unique("shop");
    let bootstrap = var("WALCAST_TEST_KAFKA_BOOTSTRAP");
    let registry = var("WALCAST_TEST_REGISTRY_URL");
    let redis_url = var("WALCAST_TEST_REDIS_URL");
    let search = var("WALCAST_TEST_OPENSEARCH_URL");
    let topic = format!("{prefix}.public.orders");
    let index = format!("{prefix}-orders");

    let w = Walcast::start_with(|_out, admin| {
        format!(
            r#"[admin]
listen = "{admin}"
[pipelines.{prefix}_cap]
kind = "capture"
topic_prefix = "{prefix}"
format = "avro"
[pipelines.{prefix}_cap.registry]
url = "{registry}"
[pipelines.{prefix}_cap.source]
port = {port}
database = "{db}"
user = "postgres"
tables = ["public.orders"]
[[pipelines.{prefix}_cap.sinks]]
type = "kafka"
bootstrap_servers = "{bootstrap}"
create_topics = true
topic_creation = {{ partitions = 3 }}

[pipelines.{prefix}_relay]
kind = "relay"
[pipelines.{prefix}_relay.source]
bootstrap_servers = "{bootstrap}"
group_id = "{prefix}-relay"
subscribe = {{ pattern = "^{prefix}\\..*" }}
consumer = {{ "topic.metadata.refresh.interval.ms" = "500" }}
[pipelines.{prefix}_relay.registry]
url = "{registry}"
[[pipelines.{prefix}_relay.sinks]]
type = "redis"
urls = ["{redis_url}"]
mode = {{ type = "upsert", key_template = "{prefix}:{{table}}:{{id}}" }}
[[pipelines.{prefix}_relay.sinks]]
type = "elasticsearch"
url = "{search}"
index_template = "{prefix}-{{table}}"
flush_interval_ms = 100
"#,
            port = pg_port(),
            db = db.name
        )
    });
    w.wait_state("streaming", WAIT).await;
    let _ = until("both pipelines streaming", async || {
        let s = w.status().await?;
        s["pipelines"]
            .as_array()?
            .iter()
            .all(|p| p["state"] == "streaming")
            .then_some(())
    })
    .await;

    db.exec(
        "INSERT INTO orders VALUES (1, 'apple', 1.50, '2024-01-02 03:04:05+00'), (2, 'pear', 2.25, NULL), (3, 'fig', NULL, NULL);
         UPDATE orders SET price = 9.99 WHERE id = 1;
         DELETE FROM orders WHERE id = 2;",
    )
    .await;

    // Kafka: Avro records (magic byte 0), keyed by id, a row's events in
    // one partition, a tombstone after the delete.
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .set("group.id", unique("verify"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    consumer.subscribe(&[&topic]).unwrap();
    let mut records: Vec<(i32, Option<Vec<u8>>, Option<Vec<u8>>)> = Vec::new();
    let deadline = Instant::now() + WAIT;
    while records.len() < 6 {
        assert!(
            Instant::now() < deadline,
            "only {} records on {topic}",
            records.len()
        );
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
            records.push((
                m.partition(),
                m.key().map(|k| k.to_vec()),
                m.payload().map(|p| p.to_vec()),
            ));
        }
    }
    assert_eq!(
        records.len(),
        6,
        "3 inserts, 1 update, 1 delete, 1 tombstone"
    );
    assert!(
        records
            .iter()
            .all(|(_, k, _)| k.as_ref().is_some_and(|k| k[0] == 0)),
        "Avro keys in the Confluent framing"
    );
    let tombstones: Vec<_> = records.iter().filter(|(_, _, v)| v.is_none()).collect();
    assert_eq!(tombstones.len(), 1);
    let mut partition_of: HashMap<Vec<u8>, i32> = HashMap::new();
    for (p, k, _) in &records {
        let prev = partition_of.insert(k.clone().unwrap(), *p);
        assert!(prev.is_none_or(|q| q == *p), "one row, one partition");
    }
    assert_eq!(partition_of.len(), 3, "three distinct keys");
    // Decoded through the registry, the update is the Debezium envelope.
    let decoder = walcast_schemas::AvroDecoder::new(std::sync::Arc::new(
        walcast_schemas::HttpRegistry::new(&walcast_schemas::RegistryConfig::new(registry.clone()))
            .unwrap(),
    ));
    let mut ops = Vec::new();
    for (_, _, v) in &records {
        if let Some(v) = v {
            let (_, env) = decoder.decode(v).await.unwrap();
            ops.push(env["op"].as_str().unwrap().to_string());
            if env["op"] == "u" {
                assert_eq!(env["after"]["price"], "9.99");
                assert_eq!(env["after"]["placed"], "2024-01-02T03:04:05.000000Z");
                assert_eq!(env["source"]["table"], "orders");
            }
        }
    }
    ops.sort();
    assert_eq!(ops, ["c", "c", "c", "d", "u"]);

    // Redis: the after image of live rows; the deleted row is gone.
    let client = redis::Client::open(redis_url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let key1 = format!("{prefix}:orders:1");
    let v: String = until("the updated row in Redis", async || {
        let v: Option<String> = redis::cmd("GET")
            .arg(&key1)
            .query_async(&mut conn)
            .await
            .ok()?;
        v.filter(|v| v.contains("9.99"))
    })
    .await;
    let row: serde_json::Value = serde_json::from_str(&v).unwrap();
    assert_eq!(row["item"], "apple");
    let gone: Option<String> = redis::cmd("GET")
        .arg(format!("{prefix}:orders:2"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(gone, None, "the deleted row is not cached");

    // OpenSearch: documents by primary key, the deleted one absent.
    let http = reqwest::Client::new();
    until("3 documents visible, then 2", async || {
        http.post(format!("{search}/{index}/_refresh"))
            .send()
            .await
            .ok()?;
        let doc: serde_json::Value = http
            .get(format!("{search}/{index}/_doc/1"))
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        (doc["_source"]["price"] == "9.99").then_some(())
    })
    .await;
    let deleted = http
        .get(format!("{search}/{index}/_doc/2"))
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status().as_u16(), 404);
    let fig: serde_json::Value = http
        .get(format!("{search}/{index}/_doc/3"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(fig["_source"]["item"], "fig");

    // A trickle of single-row transactions keeps the relay reading while its
    // offset commits fall due: no batch may be dropped on the way (the relay
    // once raced its commit timer against a half-read batch and re-read
    // from the committed offsets every few seconds).
    for i in 100..160 {
        db.exec(&format!(
            "INSERT INTO orders VALUES ({i}, 'trickle', {i}, NULL)"
        ))
        .await;
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    until("the trickle's 60 rows in Redis", async || {
        let n: i64 = redis::cmd("EXISTS")
            .arg(
                (100..160)
                    .map(|i| format!("{prefix}:orders:{i}"))
                    .collect::<Vec<_>>(),
            )
            .query_async(&mut conn)
            .await
            .ok()?;
        (n == 60).then_some(())
    })
    .await;
    let s = w.status().await.expect("status");
    let relay = s["pipelines"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["kind"] == "relay")
        .expect("the relay's status");
    assert_eq!(relay["state"], "streaming", "{relay}");
    assert_eq!(relay["last_error"], serde_json::Value::Null, "{relay}");
    assert_eq!(
        relay["events_total"], 65,
        "each event applied once: {relay}"
    );

    // Every metric the dashboard queries exists on the live /metrics.
    let (_, metrics) = w.http("/metrics").await.unwrap();
    let dashboard = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/connectors/sdk/src/telemetry.rs"
    ))
    .unwrap();
    for name in dashboard
        .split('"')
        .filter(|s| s.starts_with("walcast_") && !s.contains(' '))
    {
        assert!(
            metrics.contains(name),
            "metric {name} missing from /metrics:\n{metrics}"
        );
    }
}
