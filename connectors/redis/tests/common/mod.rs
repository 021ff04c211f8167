//! Shared by the integration tests: events, a real Redis, and the ack
//! round trip. Every test names its own table so tests never share keys.

#![allow(dead_code)]

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use walcast_redis::{Mode, RedisSink, RedisSinkConfig};
use walcast_sdk::{
    AckTracker, Batch, ChangeEvent, Column, Lsn, Op, PgType, ReplicaIdentity, Sink, SnapshotMarker,
    SourceInfo, TableSchema, Value,
};

pub fn redis_url() -> String {
    std::env::var("WALCAST_TEST_REDIS_URL").unwrap_or_else(|_| {
        panic!(
            "WALCAST_TEST_REDIS_URL is not set: these tests need a real Redis. \
             Start one with `deploy/local/stack up --only redis` and run `eval \"$(deploy/local/stack env)\"`"
        )
    })
}

/// A table name no other test (or earlier run) uses.
pub fn unique_table(base: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!(
        "{base}_{}_{}_{}",
        std::process::id(),
        nanos,
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// `cols` are (name, is_key); every column is text-typed except that values
/// carry their own types.
pub fn table(name: &str, cols: &[(&str, bool)]) -> Arc<TableSchema> {
    Arc::new(TableSchema {
        relation_id: 1,
        schema: "public".into(),
        name: name.into(),
        columns: cols
            .iter()
            .map(|(c, key)| Column {
                key_position: None,
                default: None,
                name: c.to_string(),
                pg_type: PgType::Text,
                type_oid: 25,
                type_modifier: -1,
                nullable: !key,
                key: *key,
            })
            .collect(),
        replica_identity: ReplicaIdentity::Default,
        version: 1,
    })
}

pub fn event(
    t: &Arc<TableSchema>,
    op: Op,
    before: Option<Vec<Value>>,
    after: Option<Vec<Value>>,
    lsn: u64,
) -> ChangeEvent {
    ChangeEvent {
        op,
        table: Arc::clone(t),
        before,
        after,
        source: SourceInfo {
            name: "it".into(),
            db: "app".into(),
            lsn: Lsn(lsn),
            commit_lsn: Lsn(lsn),
            tx_id: Some(1),
            ts_ms: 0,
            ts_us: 0,
            snapshot: if op == Op::Read {
                SnapshotMarker::True
            } else {
                SnapshotMarker::False
            },
        },
        transaction: None,
        ts_ms: 0,
    }
}

pub fn upsert(t: &Arc<TableSchema>, row: Vec<Value>, lsn: u64) -> ChangeEvent {
    event(t, Op::Update, None, Some(row), lsn)
}

pub fn delete(t: &Arc<TableSchema>, row: Vec<Value>, lsn: u64) -> ChangeEvent {
    event(t, Op::Delete, Some(row), None, lsn)
}

pub fn config(mode: Mode) -> RedisSinkConfig {
    RedisSinkConfig {
        urls: vec![redis_url()],
        cluster: false,
        mode,
        timeout: std::time::Duration::from_millis(5_000),
        retry_initial: std::time::Duration::from_millis(50),
        retry_max: std::time::Duration::from_millis(500),
    }
}

pub async fn sink(mode: Mode) -> RedisSink {
    RedisSink::connect(config(mode))
        .await
        .expect("connect to the test Redis")
}

/// Hands one batch to `send` and returns its result and the batch's own
/// tracker, to wait for the acker's answer with.
pub async fn hand_over(
    sink: &mut RedisSink,
    events: Vec<ChangeEvent>,
) -> (Result<(), walcast_sdk::SinkError>, AckTracker<u64>) {
    let mut tracker = AckTracker::new();
    let acker = tracker.register(Some(1), events.len());
    let sent = sink
        .send(Batch {
            events: Arc::new(events),
            acker,
        })
        .await;
    (sent, tracker)
}

/// Sends one batch, waits for its acker, and returns what it was answered.
/// `send` returns once the worker has taken the batch, so a definite
/// failure in Redis comes back from the following `flush` instead (with the
/// acker's reason); a batch the sink refuses fails in `send` itself.
pub async fn send(sink: &mut RedisSink, events: Vec<ChangeEvent>) -> Result<(), String> {
    let (sent, mut tracker) = hand_over(sink, events).await;
    let answered = tracker.next().await.map(|_| ()).map_err(|f| f.reason);
    let flushed = sink.flush().await;
    match (&sent, &flushed, &answered) {
        (Ok(()), Ok(()), Ok(())) => {}
        (Err(e), Ok(()), Err(reason)) | (Ok(()), Err(e), Err(reason)) => {
            assert!(!e.is_transient(), "{e}");
            assert!(
                e.to_string().ends_with(reason.as_str()),
                "send()/flush() return what the acker was told: {e} / {reason}"
            );
        }
        _ => {
            panic!("send(), flush() and the acker disagree: {sent:?} / {flushed:?} / {answered:?}")
        }
    }
    answered
}

pub async fn client() -> redis::aio::MultiplexedConnection {
    redis::Client::open(redis_url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

pub async fn get(conn: &mut redis::aio::MultiplexedConnection, key: &str) -> Option<String> {
    redis::cmd("GET").arg(key).query_async(conn).await.unwrap()
}

pub fn text(s: &str) -> Value {
    Value::Text(s.into())
}
