//! Issue 21: a record a relay's sinks can never apply (a table without
//! key, for OpenSearch and Redis upserts, which name rows by their key)
//! must not be re-read without end. By default it stops the relay (exit 1)
//! without committing past it; with `on_refused = { dead_letter = ... }` it
//! is copied once to the dead-letter topic and the relay moves on. A
//! capture listing such a table for such a sink is refused by `check` and
//! at start-up.

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Headers;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::Message;
use serde_json::{json, Value as Json};
use support::*;

const WAIT: Duration = Duration::from_secs(60);

fn envelope(table: &str, after: Json, lsn: u64) -> Json {
    json!({
        "before": null,
        "after": after,
        "source": {"version": "0.1.0", "connector": "postgresql", "name": "shop", "ts_ms": 1,
                   "snapshot": "false", "db": "app", "schema": "public", "table": table,
                   "txId": 7, "lsn": lsn, "commit_lsn": lsn},
        "op": "c", "ts_ms": 1, "transaction": null
    })
}

async fn create_topics(names: &[&str]) {
    let admin: AdminClient<DefaultClientContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", var("WALCAST_TEST_KAFKA_BOOTSTRAP"))
        .create()
        .unwrap();
    let topics: Vec<NewTopic<'_>> = names
        .iter()
        .map(|n| NewTopic::new(n, 1, TopicReplication::Fixed(1)))
        .collect();
    for r in admin
        .create_topics(&topics, &AdminOptions::new())
        .await
        .unwrap()
    {
        r.unwrap();
    }
}

async fn produce(topic: &str, key: Option<Json>, value: Json) {
    let producer: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", var("WALCAST_TEST_KAFKA_BOOTSTRAP"))
        .create()
        .unwrap();
    let key = key.map(|k| k.to_string());
    let value = value.to_string();
    let mut r = FutureRecord::to(topic).payload(&value);
    if let Some(k) = &key {
        r = r.key(k);
    }
    producer.send(r, Duration::from_secs(30)).await.unwrap();
}

/// Every record of `topic` from the beginning: (key, value, headers).
type Read = (Option<Vec<u8>>, Option<Vec<u8>>, BTreeMap<String, String>);

fn read_topic(topic: &str, at_least: usize) -> Vec<Read> {
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", var("WALCAST_TEST_KAFKA_BOOTSTRAP"))
        .set("group.id", unique("verify"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .set("topic.metadata.refresh.interval.ms", "500")
        .create()
        .unwrap();
    consumer.subscribe(&[topic]).unwrap();
    let deadline = Instant::now() + WAIT;
    let mut out = Vec::new();
    let mut idle = 0;
    loop {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                idle = 0;
                let headers = m
                    .headers()
                    .map(|h| {
                        h.iter()
                            .map(|h| {
                                (
                                    h.key.to_string(),
                                    String::from_utf8_lossy(h.value.unwrap_or_default())
                                        .into_owned(),
                                )
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                out.push((
                    m.key().map(<[u8]>::to_vec),
                    m.payload().map(<[u8]>::to_vec),
                    headers,
                ));
            }
            _ => idle += 1,
        }
        // Past the minimum, read on until the topic has been quiet for 2 s.
        if out.len() >= at_least && idle >= 10 {
            return out;
        }
        assert!(
            Instant::now() < deadline,
            "{topic}: {} records, expected at least {at_least}",
            out.len()
        );
    }
}

/// The relay group's committed offset of partition 0 of `topic`.
fn committed(group: &str, topic: &str) -> Option<i64> {
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", var("WALCAST_TEST_KAFKA_BOOTSTRAP"))
        .set("group.id", group)
        .create()
        .unwrap();
    let mut tpl = rdkafka::TopicPartitionList::new();
    tpl.add_partition(topic, 0);
    let got = consumer
        .committed_offsets(tpl, Duration::from_secs(10))
        .ok()?;
    match got.find_partition(topic, 0)?.offset() {
        rdkafka::Offset::Offset(o) => Some(o),
        _ => None,
    }
}

fn relay_config(prefix: &str, admin: &str, extra: &str) -> String {
    format!(
        r#"[admin]
listen = "{admin}"
[log]
format = "json"
[pipelines.relay]
kind = "relay"
{extra}
[pipelines.relay.source]
bootstrap_servers = "{bootstrap}"
group_id = "{prefix}-relay"
subscribe = {{ pattern = "^{prefix}\\..*" }}
max_batch_wait_ms = 50
[[pipelines.relay.sinks]]
type = "elasticsearch"
url = "{search}"
index_template = "{prefix}-{{table}}"
flush_interval_ms = 100
[[pipelines.relay.sinks]]
type = "redis"
urls = ["{redis}"]
mode = {{ type = "upsert", key_template = "{prefix}:{{table}}:{{id}}" }}
"#,
        bootstrap = var("WALCAST_TEST_KAFKA_BOOTSTRAP"),
        search = var("WALCAST_TEST_OPENSEARCH_URL"),
        redis = var("WALCAST_TEST_REDIS_URL"),
    )
}

async fn wait_doc(prefix: &str, id: i64) -> Json {
    let http = reqwest::Client::new();
    let search = var("WALCAST_TEST_OPENSEARCH_URL");
    let deadline = Instant::now() + WAIT;
    loop {
        let doc = search_doc(&http, &search, &format!("{prefix}-orders"), id).await;
        if doc["found"] == true {
            return doc;
        }
        assert!(
            Instant::now() < deadline,
            "orders {id} never indexed: {doc}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyless_record_stops_the_relay_by_default_instead_of_looping() {
    let prefix = unique("refuse");
    let orders = format!("{prefix}.public.orders");
    let log = format!("{prefix}.public.log");
    create_topics(&[&orders, &log]).await;
    produce(
        &orders,
        Some(json!({"id": 1})),
        envelope("orders", json!({"id": 1, "item": "pen"}), 10),
    )
    .await;
    produce(
        &log,
        None,
        envelope("log", json!({"line": "no key here"}), 11),
    )
    .await;

    let mut w = Walcast::start_with(|_, admin| relay_config(&prefix, admin, ""));
    w.wait_failed("a record of a key-less table", WAIT).await;
    let deadline = Instant::now() + WAIT;
    let status = loop {
        if let Some(s) = w.exited() {
            break s;
        }
        assert!(Instant::now() < deadline, "walcast did not exit");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(status.code(), Some(1), "{}", tail(&w.log(), 3000));
    let log_text = w.log();
    assert!(
        log_text.contains("public.log has no primary key")
            && log_text.contains(&format!("{log}[0]@0"))
            && log_text.contains("on_refused"),
        "the error names the record, the cause and the way out:\n{}",
        tail(&log_text, 3000)
    );
    assert_eq!(
        committed(&format!("{prefix}-relay"), &log),
        None,
        "nothing is committed past the refused record"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyless_records_go_to_the_dead_letter_once_and_the_relay_moves_on() {
    let prefix = unique("refusedlq");
    let orders = format!("{prefix}.public.orders");
    let log = format!("{prefix}.public.log");
    // Outside the subscription pattern, or the relay would read it back.
    let dlq = format!("{prefix}-dlq");
    create_topics(&[&orders, &log, &dlq]).await;
    produce(
        &orders,
        Some(json!({"id": 1})),
        envelope("orders", json!({"id": 1, "item": "pen"}), 10),
    )
    .await;
    let first = envelope("log", json!({"line": "first"}), 11);
    produce(&log, None, first.clone()).await;
    produce(
        &orders,
        Some(json!({"id": 2})),
        envelope("orders", json!({"id": 2, "item": "ink"}), 12),
    )
    .await;

    let w = Walcast::start_with(|_, admin| {
        relay_config(
            &prefix,
            admin,
            &format!("on_refused = {{ dead_letter = {{ topic = \"{dlq}\" }} }}"),
        )
    });
    wait_doc(&prefix, 1).await;
    wait_doc(&prefix, 2).await;
    let group = format!("{prefix}-relay");
    let deadline = Instant::now() + WAIT;
    while committed(&group, &log) != Some(1) {
        assert!(
            Instant::now() < deadline,
            "the relay never committed past the key-less record:\n{}",
            tail(&w.log(), 3000)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let dead = read_topic(&dlq, 1);
    assert_eq!(dead.len(), 1, "one dead letter per refused record");
    let (key, value, headers) = &dead[0];
    assert_eq!(key, &None);
    assert_eq!(
        serde_json::from_slice::<Json>(value.as_ref().unwrap()).unwrap(),
        first,
        "the record as it was read"
    );
    assert!(
        headers["walcast.error"].contains("public.log has no primary key"),
        "{headers:?}"
    );
    assert_eq!(headers["walcast.sink"], "elasticsearch,redis");
    assert_eq!(headers["walcast.topic"], log);
    assert_eq!(headers["walcast.partition"], "0");
    assert_eq!(headers["walcast.offset"], "0");

    // The relay goes on: another refused record is set aside once, the
    // first is not repeated, and later rows still arrive.
    produce(&log, None, envelope("log", json!({"line": "second"}), 13)).await;
    produce(
        &orders,
        Some(json!({"id": 3})),
        envelope("orders", json!({"id": 3, "item": "cap"}), 14),
    )
    .await;
    wait_doc(&prefix, 3).await;
    let deadline = Instant::now() + WAIT;
    while committed(&group, &log) != Some(2) {
        assert!(
            Instant::now() < deadline,
            "not committed past the second record"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let dead = read_topic(&dlq, 2);
    assert_eq!(
        dead.iter()
            .map(|(_, _, h)| h["walcast.offset"].clone())
            .collect::<Vec<_>>(),
        vec!["0", "1"],
        "each refused record exactly once"
    );
    let status = w.status().await.unwrap();
    assert_eq!(status["pipelines"][0]["state"], "streaming", "{status}");
    // Counted for each sink that refused them (the WalcastDeadLettersGrowing alert).
    for sink in ["elasticsearch", "redis"] {
        assert_eq!(
            w.metric(
                "walcast_dead_letters_total",
                &[("pipeline", "relay"), ("sink", sink)]
            )
            .await,
            Some(2.0),
            "walcast_dead_letters_total for {sink}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_and_start_up_refuse_a_keyless_table_for_a_search_sink() {
    let db = TestDb::new("wc_keyless").await;
    db.exec("CREATE TABLE log (line text)").await;
    let prefix = unique("keyless");
    let config = |admin: &str| {
        format!(
            r#"[admin]
listen = "{admin}"
[pipelines.{prefix}]
kind = "capture"
[pipelines.{prefix}.source]
port = {port}
database = "{db}"
user = "postgres"
tables = ["public.log"]
keyless_tables = ["public.log"]
[[pipelines.{prefix}.sinks]]
type = "elasticsearch"
url = "{search}"
"#,
            port = pg_port(),
            db = db.name,
            search = var("WALCAST_TEST_OPENSEARCH_URL"),
        )
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("walcast.toml");
    std::fs::write(&path, config(&format!("127.0.0.1:{}", free_port()))).unwrap();
    let (ok, out) = check(&path);
    assert!(
        !ok,
        "check accepted a key-less table for the search sink:\n{out}"
    );
    assert!(
        out.contains(&format!("pipelines.{prefix}.sinks[0]"))
            && out.contains("`public.log`")
            && out.contains("without a primary key"),
        "{out}"
    );

    let mut w = Walcast::start_with(|_, admin| config(admin));
    let deadline = Instant::now() + WAIT;
    let status = loop {
        if let Some(s) = w.exited() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "walcast run started:\n{}",
            w.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(!status.success());
    assert!(w.log().contains("without a primary key"), "{}", w.log());
}
