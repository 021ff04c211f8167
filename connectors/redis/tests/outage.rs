//! A Redis outage in the middle of a batch: the sink holds the batch,
//! retries, and acknowledges once Redis is back.
//!
//! This test runs a redis-server of its own (the binary the stack
//! installs) on a free port, so that killing it disturbs no other test.

mod common;

use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;
use walcast_redis::{Mode, RedisSink, UpsertFormat};
use walcast_sdk::{AckTracker, Batch, Sink, Value};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn start_redis(port: u16) -> Child {
    let dir = std::env::temp_dir();
    let mut child = Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .current_dir(dir)
        .stdout(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run redis-server ({e}); `deploy/local/stack up --only redis` installs it"
            )
        });
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return child;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("redis-server on port {port} did not answer");
}

/// A sink on the Redis this file starts on `port`.
async fn sink_on(port: u16, mode: Mode) -> RedisSink {
    let mut c = config(mode);
    c.urls = vec![format!("redis://127.0.0.1:{port}")];
    RedisSink::connect(c).await.unwrap()
}

#[tokio::test]
async fn a_batch_sent_during_an_outage_is_retried_until_redis_is_back() {
    let port = free_port();
    let mut server = start_redis(port);
    let name = unique_table("outage");
    let t = table(&name, &[("id", true), ("v", false)]);
    let mut sink = sink_on(
        port,
        Mode::Upsert {
            key_template: "{table}:{id}".into(),
            format: UpsertFormat::Json,
            ttl_secs: None,
            tombstone_ttl_secs: 60,
            truncate_scan: true,
        },
    )
    .await;
    let stats = sink.stats();

    server.kill().unwrap();
    server.wait().unwrap();
    let sending = tokio::spawn(async move {
        let outcome = send(
            &mut sink,
            vec![upsert(&t, vec![Value::Int32(1), text("kept")], 10)],
        )
        .await;
        (outcome, sink)
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        !sending.is_finished(),
        "the sink holds the batch while Redis is down"
    );
    let mut server = start_redis(port);

    let (outcome, _sink) = tokio::time::timeout(Duration::from_secs(30), sending)
        .await
        .expect("acked after the restart")
        .unwrap();
    let retries = stats.retries.load(Ordering::Relaxed);
    let mut r = redis::Client::open(format!("redis://127.0.0.1:{port}"))
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let stored = get(&mut r, &format!("{name}:1")).await;
    server.kill().unwrap();
    server.wait().unwrap();

    outcome.expect("the batch is delivered once Redis is back");
    assert!(retries > 0, "the outage was retried");
    assert_eq!(stored.as_deref(), Some(r#"{"id":1,"v":"kept"}"#));
}

/// The worker retries while it holds a batch; dropping the sink (shutdown)
/// stops that, and the batch is failed as transient, to be replayed.
#[tokio::test]
async fn dropping_the_sink_during_an_outage_gives_the_batch_back_as_transient() {
    let port = free_port();
    let mut server = start_redis(port);
    let name = unique_table("dropped");
    let t = table(&name, &[("id", true), ("v", false)]);
    let mut sink = sink_on(
        port,
        Mode::Invalidate {
            key_template: "{table}:{id}".into(),
            truncate_scan: true,
        },
    )
    .await;
    let stats = sink.stats();
    server.kill().unwrap();
    server.wait().unwrap();

    let mut tracker: AckTracker<u64> = AckTracker::new();
    let acker = tracker.register(Some(1), 1);
    sink.send(Batch {
        events: std::sync::Arc::new(vec![upsert(&t, vec![Value::Int32(1), text("x")], 10)]),
        acker,
    })
    .await
    .expect("the worker takes the batch");
    let waiting = tokio::time::timeout(Duration::from_secs(2), tracker.next()).await;
    assert!(waiting.is_err(), "held and retried while Redis is down");
    assert!(stats.retries.load(Ordering::Relaxed) > 0);
    drop(sink);
    let failure = tokio::time::timeout(Duration::from_secs(10), tracker.next())
        .await
        .expect("answered once the sink is dropped")
        .expect_err("not delivered");
    assert!(failure.transient, "{}", failure.reason);
    assert!(failure.reason.contains("stopped"), "{}", failure.reason);
}
