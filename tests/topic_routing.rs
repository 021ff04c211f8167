//! Topic routing end to end (issue 24): Debezium's topic router
//! (`ByLogicalTableRouter`) as `[[...sinks.routes]]` entries. Two tables
//! whose rows share primary keys go to one topic, their keys made unique by
//! `__dbz__physicalTableIdentifier` (the table's own topic name); a third
//! table keeps its own topic; the merged topic is created with its own
//! partition count. In JSON, and in Avro through the registry (one subject
//! per table within the topic, `topic_record_name`), where keys and values
//! decode with the registered schemas. A bad expression is refused naming
//! the route and the file; Avro with one subject per topic is refused.
//! Run with the stack's settings: `eval "$(deploy/local/stack env)"`.

mod support;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::Message;
use serde_json::{json, Value};
use support::*;

const WAIT: Duration = Duration::from_secs(60);
const FIELD: &str = "__dbz__physicalTableIdentifier";

async fn schema(db: &TestDb) {
    db.exec(
        "CREATE TABLE orders_eu (id int PRIMARY KEY, total int);
         CREATE TABLE orders_us (id int PRIMARY KEY, total int);
         CREATE TABLE other (id int PRIMARY KEY);
         INSERT INTO orders_eu VALUES (1, 10), (2, 20);
         INSERT INTO orders_us VALUES (1, 11), (2, 21);
         INSERT INTO other VALUES (1);",
    )
    .await;
}

async fn workload(db: &TestDb) {
    db.exec(
        "INSERT INTO orders_eu VALUES (3, 30);
         INSERT INTO orders_us VALUES (3, 31);
         DELETE FROM orders_us WHERE id = 2;",
    )
    .await;
}

fn config(pipeline: &str, db: &TestDb, prefix: &str) -> KafkaCapture {
    KafkaCapture::new(
        pipeline,
        &db.name,
        prefix,
        &["public.orders_eu", "public.orders_us", "public.other"],
    )
    .sink(&format!(
        "create_topics = true
topic_creation = {{ partitions = 1, topics = {{ \"{prefix}.orders_all\" = {{ partitions = 4 }} }} }}
[[pipelines.{pipeline}.sinks.routes]]
topic_regex = '{prefix}\\.public\\.orders_(eu|us)'
topic_replacement = '{prefix}.orders_all'"
    ))
}

/// A record's key and value bytes.
type Raw = (Option<Vec<u8>>, Option<Vec<u8>>);

/// Raw records of `topic`, until `n` have arrived (and no more after).
fn records(topic: &str, n: usize) -> Vec<Raw> {
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", var("WALCAST_TEST_KAFKA_BOOTSTRAP"))
        .set("group.id", unique("route"))
        .set("auto.offset.reset", "earliest")
        .set("topic.metadata.refresh.interval.ms", "500")
        .create()
        .unwrap();
    consumer.subscribe(&[topic]).unwrap();
    let mut out = Vec::new();
    let deadline = Instant::now() + WAIT;
    while out.len() < n {
        assert!(
            Instant::now() < deadline,
            "{} of {n} records on {topic}",
            out.len()
        );
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
            out.push((m.key().map(<[u8]>::to_vec), m.payload().map(<[u8]>::to_vec)));
        }
    }
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        consumer.poll(Duration::from_millis(500)).is_none(),
        "more than {n} records on {topic}"
    );
    out
}

fn partitions(topic: &str) -> usize {
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", var("WALCAST_TEST_KAFKA_BOOTSTRAP"))
        .create()
        .unwrap();
    let md = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .unwrap();
    md.topics()[0].partitions().len()
}

/// What both formats must show once decoded: every (key, op) of the merged
/// topic, keys carrying the source table's own topic name and agreeing with
/// the value's `source.table`, and unique per row across the two tables.
fn assert_merged(prefix: &str, decoded: &[(Value, Option<Value>)]) {
    let id = |t: &str| format!("{prefix}.public.{t}");
    for (key, value) in decoded {
        let table = key[FIELD].as_str().expect("the key names its table");
        if let Some(v) = value {
            assert_eq!(
                table,
                id(v["source"]["table"].as_str().unwrap()),
                "{key} {v}"
            );
        }
    }
    let seen: BTreeSet<(i64, String, String)> = decoded
        .iter()
        .map(|(k, v)| {
            (
                k["id"].as_i64().unwrap(),
                k[FIELD].as_str().unwrap().to_string(),
                v.as_ref()
                    .map(|v| v["op"].as_str().unwrap().to_string())
                    .unwrap_or_else(|| "tombstone".into()),
            )
        })
        .collect();
    let expected: BTreeSet<(i64, String, String)> = [
        (1, "orders_eu", "r"),
        (2, "orders_eu", "r"),
        (1, "orders_us", "r"),
        (2, "orders_us", "r"),
        (3, "orders_eu", "c"),
        (3, "orders_us", "c"),
        (2, "orders_us", "d"),
        (2, "orders_us", "tombstone"),
    ]
    .into_iter()
    .map(|(i, t, o)| (i, id(t), o.to_string()))
    .collect();
    assert_eq!(seen, expected);
    assert_eq!(decoded.len(), expected.len(), "{decoded:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_tables_share_a_topic_with_unique_keys_in_json() {
    let db = TestDb::new("wc_route").await;
    schema(&db).await;
    let prefix = unique("route");
    let cfg = config("route", &db, &prefix);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("walcast.toml");
    std::fs::write(&path, cfg.toml("127.0.0.1:1")).unwrap();
    let (ok, out) = check(&path);
    assert!(ok, "{out}");
    assert!(
        out.contains(&format!(
            "table public.orders_eu -> topic {prefix}.orders_all"
        )) && out.contains(&format!(
            "table public.other -> topic {prefix}.public.other"
        )),
        "{out}"
    );
    let mut w = Walcast::start_with(|_, admin| cfg.toml(admin));
    w.wait_state("streaming", WAIT).await;
    workload(&db).await;
    let merged = format!("{prefix}.orders_all");
    let raw = records(&merged, 8);
    let first = String::from_utf8(raw[0].0.clone().expect("a key")).unwrap();
    assert!(
        first.starts_with("{\"id\":")
            && first.contains(&format!(",\"{FIELD}\":\"{prefix}.public.orders_")),
        "the identifier follows the key columns: {first}"
    );
    let decoded: Vec<(Value, Option<Value>)> = raw
        .into_iter()
        .map(|(k, v)| {
            (
                serde_json::from_slice(&k.expect("a key")).unwrap(),
                v.map(|v| serde_json::from_slice(&v).unwrap()),
            )
        })
        .collect();
    assert_merged(&prefix, &decoded);
    // The table no route matches keeps its topic and plain keys.
    let other = records(&format!("{prefix}.public.other"), 1);
    let key: Value = serde_json::from_slice(other[0].0.as_deref().unwrap()).unwrap();
    assert_eq!(key, json!({"id": 1}));
    assert_eq!(
        partitions(&merged),
        4,
        "topic_creation.topics sets the merged topic's partitions"
    );
    assert_eq!(partitions(&format!("{prefix}.public.other")), 1);
    assert!(w.terminate().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_tables_share_a_topic_with_unique_keys_in_avro() {
    let db = TestDb::new("wc_routeav").await;
    schema(&db).await;
    let prefix = unique("routeav");
    let registry = var("WALCAST_TEST_REGISTRY_URL");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("walcast.toml");
    // One subject per topic cannot hold two tables' schemas: refused.
    let per_topic = config("routeav", &db, &prefix).avro(&registry, "");
    std::fs::write(&path, per_topic.toml("127.0.0.1:1")).unwrap();
    let (ok, out) = check(&path);
    assert!(
        !ok && out.contains("topic_record_name") && out.contains("sinks[0].routes"),
        "{out}"
    );
    let cfg =
        config("routeav", &db, &prefix).avro(&registry, "subject_strategy = \"topic_record_name\"");
    std::fs::write(&path, cfg.toml("127.0.0.1:1")).unwrap();
    let (ok, out) = check(&path);
    assert!(ok, "{out}");
    let mut w = Walcast::start_with(|_, admin| cfg.toml(admin));
    w.wait_state("streaming", WAIT).await;
    workload(&db).await;
    let merged = format!("{prefix}.orders_all");
    let decoder = walcast_schemas::AvroDecoder::new(std::sync::Arc::new(
        walcast_schemas::HttpRegistry::new(&walcast_schemas::RegistryConfig::new(&registry))
            .unwrap(),
    ));
    let mut decoded = Vec::new();
    for (k, v) in records(&merged, 8) {
        let key = decoder.decode(&k.expect("a key")).await.expect("key").1;
        let value = match v {
            Some(v) => Some(decoder.decode(&v).await.expect("value").1),
            None => None,
        };
        decoded.push((key, value));
    }
    assert_merged(&prefix, &decoded);
    // A subject per table within the topic, keys and values alike.
    let subjects: Vec<String> = reqwest::get(format!("{registry}/subjects"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ours: BTreeSet<&str> = subjects
        .iter()
        .map(String::as_str)
        .filter(|s| s.starts_with(&format!("{merged}-")))
        .collect();
    let expected: BTreeSet<String> = ["orders_eu", "orders_us"]
        .iter()
        .flat_map(|t| ["Key", "Envelope"].map(|r| format!("{merged}-{}.public.{t}.{r}", prefix)))
        .collect();
    assert_eq!(
        ours,
        expected.iter().map(String::as_str).collect::<BTreeSet<_>>()
    );
    let key_schema = reqwest::get(format!(
        "{registry}/subjects/{merged}-{prefix}.public.orders_eu.Key/versions/latest"
    ))
    .await
    .unwrap()
    .text()
    .await
    .unwrap();
    assert!(key_schema.contains(FIELD), "{key_schema}");
    assert!(w.terminate().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_that_is_not_a_regular_expression_is_refused_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("walcast.toml");
    let cfg = KafkaCapture::new("badroute", "postgres", "x", &["public.t"]).sink(
        "[[pipelines.badroute.sinks.routes]]\ntopic_regex = 'x\\.public\\.(orders'\ntopic_replacement = 'all'",
    );
    std::fs::write(&path, cfg.toml("127.0.0.1:1")).unwrap();
    let (ok, out) = cli("check", &path, &["--offline"]);
    assert!(!ok, "{out}");
    assert!(
        out.contains("routes[0].topic_regex")
            && out.contains("x\\.public\\.(orders")
            && out.contains(&path.display().to_string()),
        "{out}"
    );
}
