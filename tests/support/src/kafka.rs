//! Reading topics back with an off-the-shelf client (rdkafka), in JSON and
//! in Avro through the registry.

use std::time::{Duration, Instant};

use crate::pg::unique;
use crate::stack::var;

/// Reads a topic from the beginning with a plain consumer (none of
/// walcast's code) until `done` holds over the JSON values read, or the
/// deadline passes. Returns (key, value) pairs; tombstones have no value.
pub fn consume_json(
    topic: &str,
    timeout: Duration,
    done: impl Fn(&[(serde_json::Value, Option<serde_json::Value>)]) -> bool,
) -> Vec<(serde_json::Value, Option<serde_json::Value>)> {
    let (records, finished) = consume_json_until(topic, timeout, done);
    assert!(
        finished,
        "timed out reading {topic}: {} records",
        records.len()
    );
    records
}

/// As [`consume_json`], but returns what it read when the deadline passes,
/// with `false`, so the caller can explain the difference.
pub fn consume_json_until(
    topic: &str,
    timeout: Duration,
    done: impl Fn(&[(serde_json::Value, Option<serde_json::Value>)]) -> bool,
) -> (Vec<(serde_json::Value, Option<serde_json::Value>)>, bool) {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::Message;
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", var("WALCAST_TEST_KAFKA_BOOTSTRAP"))
        .set("group.id", unique("verify"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .set("topic.metadata.refresh.interval.ms", "500")
        .create()
        .expect("consumer");
    consumer.subscribe(&[topic]).expect("subscribe");
    let mut out = Vec::new();
    let deadline = Instant::now() + timeout;
    let mut idle = 0;
    loop {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                idle = 0;
                let key = m
                    .key()
                    .map(|k| serde_json::from_slice(k).expect("JSON key"))
                    .unwrap_or(serde_json::Value::Null);
                let value = m
                    .payload()
                    .map(|v| serde_json::from_slice(v).expect("JSON value"));
                out.push((key, value));
                continue;
            }
            _ => idle += 1,
        }
        // Check the (possibly costly) condition when the topic goes quiet.
        if idle >= 1 && done(&out) {
            return (out, true);
        }
        if Instant::now() > deadline {
            return (out, false);
        }
    }
}

/// One record of a JSON topic as a plain consumer reads it: where it is
/// (partition, offset), its key and its value (`None` for a tombstone).
#[derive(Clone, Debug)]
pub struct JsonRecord {
    pub partition: i32,
    pub offset: i64,
    pub key: serde_json::Value,
    pub value: Option<serde_json::Value>,
}

/// As [`consume_json_until`], keeping each record's partition and offset,
/// for checks that depend on Kafka's order (last write wins per key).
pub fn consume_records_until(
    topic: &str,
    timeout: Duration,
    done: impl Fn(&[JsonRecord]) -> bool,
) -> (Vec<JsonRecord>, bool) {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::Message;
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", var("WALCAST_TEST_KAFKA_BOOTSTRAP"))
        .set("group.id", unique("verify"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .set("topic.metadata.refresh.interval.ms", "500")
        .create()
        .expect("consumer");
    consumer.subscribe(&[topic]).expect("subscribe");
    let mut out = Vec::new();
    let deadline = Instant::now() + timeout;
    loop {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                out.push(JsonRecord {
                    partition: m.partition(),
                    offset: m.offset(),
                    key: m
                        .key()
                        .map(|k| serde_json::from_slice(k).expect("JSON key"))
                        .unwrap_or(serde_json::Value::Null),
                    value: m
                        .payload()
                        .map(|v| serde_json::from_slice(v).expect("JSON value")),
                });
                continue;
            }
            // Check the (possibly costly) condition when the topic goes quiet.
            _ => {
                if done(&out) {
                    return (out, true);
                }
            }
        }
        if Instant::now() > deadline {
            return (out, false);
        }
    }
}

/// Reads the first `n` records of an Avro topic from the beginning and
/// decodes them through the registry at `registry_url`: (schema id, event)
/// pairs, in the order read. Fails after `timeout` with how many arrived.
pub async fn consume_avro(
    registry_url: &str,
    topic: &str,
    n: usize,
    timeout: Duration,
) -> Vec<(u32, serde_json::Value)> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::Message;
    let decoder = walcast_schemas::AvroDecoder::new(std::sync::Arc::new(
        walcast_schemas::HttpRegistry::new(&walcast_schemas::RegistryConfig::new(registry_url))
            .expect("registry client"),
    ));
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", var("WALCAST_TEST_KAFKA_BOOTSTRAP"))
        .set("group.id", unique("avro"))
        .set("auto.offset.reset", "earliest")
        .create()
        .expect("consumer");
    consumer.subscribe(&[topic]).expect("subscribe");
    let mut raw = Vec::new();
    let deadline = Instant::now() + timeout;
    while raw.len() < n {
        assert!(
            Instant::now() < deadline,
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
        out.push(
            decoder
                .decode(&r)
                .await
                .expect("decode through the registry"),
        );
    }
    out
}
