//! Shared pieces of the tests against the real broker started by
//! `deploy/local/stack`.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::ClientConfig;
use walcast_kafka::{KafkaSink, KafkaSinkConfig};
use walcast_sdk::{
    ChangeEvent, Column, JsonEncoder, Lsn, Op, PgType, ReplicaIdentity, SnapshotMarker, SourceInfo,
    TableSchema, TransactionInfo, Value,
};

/// The broker's address; a missing variable fails the test with the fix.
pub fn bootstrap() -> String {
    std::env::var("WALCAST_TEST_KAFKA_BOOTSTRAP").unwrap_or_else(|_| {
        panic!(
            "WALCAST_TEST_KAFKA_BOOTSTRAP is not set: these tests need a real Kafka. Start one with \
             `deploy/local/stack up --only kafka` and run `eval \"$(deploy/local/stack env)\"` first"
        )
    })
}

/// A variable `deploy/local/stack env` sets; a missing one fails the test
/// with the fix.
pub fn env(name: &str) -> String {
    std::env::var(name)
        .unwrap_or_else(|_| panic!("{name} is not set: load `deploy/local/stack env`"))
}

/// `deploy/local/stack` on the stack the tests use (stop/start the broker,
/// run a Kafka CLI tool), ready for its arguments.
pub fn stack_command() -> std::process::Command {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy/local/stack");
    let mut cmd = std::process::Command::new("bash");
    cmd.arg(script)
        .env("WALCAST_STACK_DIR", env("WALCAST_TEST_STACK_DIR"));
    cmd
}

/// A sink config for the stack's broker with `(table, topic)` routes: the
/// base every sink test changes.
pub fn sink_config(routes: &[(&str, &str)]) -> KafkaSinkConfig {
    let mut c = KafkaSinkConfig::new(bootstrap());
    c.routes.tables = routes
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
    c
}

/// A sink with the JSON encoder, as the sink tests use it.
pub fn sink(config: KafkaSinkConfig) -> KafkaSink {
    KafkaSink::new(config, Arc::new(JsonEncoder::default())).expect("sink")
}

/// A name no earlier run used, so tests never read each other's records.
pub fn unique(name: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{name}-{nanos:x}")
}

pub async fn create_topic(name: &str, partitions: i32, config: &[(&str, &str)]) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap())
        .create()
        .expect("admin client");
    let topic = NewTopic {
        name,
        num_partitions: partitions,
        replication: TopicReplication::Fixed(1),
        config: config.to_vec(),
    };
    let res = admin
        .create_topics([&topic], &AdminOptions::new())
        .await
        .expect("create_topics");
    for r in res {
        r.unwrap_or_else(|(t, e)| panic!("creating {t}: {e}"));
    }
}

pub fn table(schema: &str, name: &str, keyed: bool) -> Arc<TableSchema> {
    Arc::new(TableSchema {
        relation_id: 16384,
        schema: schema.into(),
        name: name.into(),
        columns: vec![
            Column {
                key_position: None,
                default: None,
                name: "id".into(),
                pg_type: PgType::Int8,
                type_oid: 20,
                type_modifier: -1,
                nullable: false,
                key: keyed,
            },
            Column {
                key_position: None,
                default: None,
                name: "name".into(),
                pg_type: PgType::Text,
                type_oid: 25,
                type_modifier: -1,
                nullable: true,
                key: false,
            },
        ],
        replica_identity: ReplicaIdentity::Default,
        version: 1,
    })
}

/// One event of transaction `tx_id` committed at `lsn`.
pub fn event(
    table: &Arc<TableSchema>,
    op: Op,
    id: i64,
    text: &str,
    lsn: u64,
    tx_id: u32,
) -> ChangeEvent {
    let row = || Some(vec![Value::Int64(id), Value::Text(text.to_string())]);
    let (before, after) = match op {
        Op::Create | Op::Read => (None, row()),
        Op::Update => (row(), row()),
        Op::Delete => (row(), None),
        Op::Truncate => (None, None),
    };
    ChangeEvent {
        op,
        table: Arc::clone(table),
        before,
        after,
        source: SourceInfo {
            name: "walcast-test".into(),
            db: "shop".into(),
            lsn: Lsn(lsn),
            commit_lsn: Lsn(lsn),
            tx_id: Some(tx_id),
            ts_ms: 1_700_000_000_000,
            ts_us: 1_700_000_000_000_000,
            snapshot: SnapshotMarker::False,
        },
        transaction: None,
        ts_ms: 1_700_000_000_001,
    }
}

pub fn in_transaction(mut e: ChangeEvent, total_order: u64) -> ChangeEvent {
    e.transaction = Some(TransactionInfo {
        id: format!("{}:{}", e.source.tx_id.unwrap(), e.source.commit_lsn.0),
        total_order,
        data_collection_order: total_order,
    });
    e
}

/// A record as read back, owned.
#[derive(Debug, Clone)]
pub struct Read {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub headers: Vec<(String, Option<Vec<u8>>)>,
}

impl Read {
    pub fn header(&self, k: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(h, _)| h == k)
            .and_then(|(_, v)| v.as_deref())
            .map(|v| std::str::from_utf8(v).unwrap())
    }
    pub fn json_value(&self) -> serde_json::Value {
        serde_json::from_slice(self.value.as_deref().expect("not a tombstone"))
            .expect("value is JSON")
    }
    pub fn json_key(&self) -> serde_json::Value {
        serde_json::from_slice(self.key.as_deref().expect("has a key")).expect("key is JSON")
    }
}

/// Reads `count` records of `topic` from the beginning of every partition,
/// with a plain consumer (no group), sorted by (partition, offset). Fails
/// after `timeout` with what it got.
pub fn read_all(topic: &str, partitions: i32, count: usize, timeout: Duration) -> Vec<Read> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap())
        .set("group.id", unique("reader"))
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&tpl).unwrap();
    let deadline = std::time::Instant::now() + timeout;
    let mut out = Vec::new();
    while out.len() < count {
        assert!(
            std::time::Instant::now() < deadline,
            "read {} of {count} records from {topic}: {out:#?}",
            out.len()
        );
        if let Some(m) = consumer.poll(Duration::from_millis(200)) {
            let m = m.expect("consume");
            out.push(Read {
                partition: m.partition(),
                offset: m.offset(),
                key: m.key().map(<[u8]>::to_vec),
                value: m.payload().map(<[u8]>::to_vec),
                headers: m
                    .headers()
                    .map(|h| {
                        h.iter()
                            .map(|h| (h.key.to_string(), h.value.map(<[u8]>::to_vec)))
                            .collect()
                    })
                    .unwrap_or_default(),
            });
        }
    }
    // nothing beyond what was expected
    assert!(
        consumer.poll(Duration::from_millis(500)).is_none(),
        "more records than expected in {topic}"
    );
    out.sort_by_key(|r| (r.partition, r.offset));
    out
}

/// The `after.name` of each record, in order: what the delivery tests
/// compare to say which events arrived.
pub fn after_names(records: &[Read]) -> Vec<String> {
    records
        .iter()
        .map(|r| {
            r.json_value()["after"]["name"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect()
}
