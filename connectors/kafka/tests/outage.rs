//! A broker outage stalls the sink without losing or acknowledging anything,
//! and delivery resumes when the broker returns. Its own test binary, so
//! stopping the broker never disturbs the other tests.

mod support;

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use support::*;
use walcast_kafka::{KafkaSink, KafkaSinkConfig};
use walcast_sdk::{AckTracker, Batch, JsonEncoder, Op, Sink};

fn stack(cmd: &str) {
    let dir = std::env::var("WALCAST_TEST_STACK_DIR").unwrap_or_else(|_| {
        panic!("WALCAST_TEST_STACK_DIR is not set: run `eval \"$(deploy/local/stack env)\"` first")
    });
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy/local/stack");
    let status = Command::new("bash")
        .arg(script)
        .args([cmd, "kafka"])
        .env("WALCAST_STACK_DIR", &dir)
        .status()
        .expect("run deploy/local/stack");
    assert!(status.success(), "deploy/local/stack {cmd} kafka failed");
}

/// Starts the broker again even when an assertion fails mid-outage.
struct Restart;
impl Drop for Restart {
    fn drop(&mut self) {
        if std::thread::panicking() {
            stack("start");
        }
    }
}

#[tokio::test]
async fn outage_stalls_acknowledgement_until_the_broker_returns() {
    let topic = unique("walcast.it.outage");
    create_topic(&topic, 1, &[]).await;
    let rows = table("public", "outage", true);
    let mut cfg = KafkaSinkConfig::new(bootstrap());
    cfg.routes.insert("public.outage".into(), topic.clone());
    let mut sink = KafkaSink::new(cfg, Arc::new(JsonEncoder::default())).unwrap();
    let mut tracker: AckTracker<u64> = AckTracker::new();

    let a = tracker.register(Some(1), 1);
    sink.send(Batch {
        events: Arc::new(vec![event(&rows, Op::Create, 1, "before", 0x10, 1)]),
        acker: a,
    })
    .await
    .unwrap();
    tokio::time::timeout(Duration::from_secs(60), tracker.next())
        .await
        .expect("first batch delivered")
        .unwrap();
    assert_eq!(tracker.checkpoint(), Some(&1));

    stack("stop");
    let _restart = Restart;
    let a = tracker.register(Some(2), 2);
    let events = vec![
        event(&rows, Op::Update, 1, "during", 0x20, 2),
        event(&rows, Op::Create, 2, "during", 0x20, 2),
    ];
    sink.send(Batch {
        events: Arc::new(events),
        acker: a,
    })
    .await
    .expect("send only enqueues");
    // With the broker down nothing may be acknowledged, however long we wait.
    let waited = tokio::time::timeout(Duration::from_secs(8), tracker.next()).await;
    assert!(
        waited.is_err(),
        "acknowledged while the broker was down: {waited:?}"
    );
    assert_eq!(tracker.checkpoint(), Some(&1));
    assert_eq!(sink.in_flight_records(), 2);
    assert!(!sink.healthy().await, "unhealthy while the broker is down");

    stack("start");
    let cp = tokio::time::timeout(Duration::from_secs(120), tracker.next())
        .await
        .expect("delivered after restart");
    assert_eq!(cp.unwrap(), Some(2));
    sink.flush().await.unwrap();
    let recs = read_all(&topic, 1, 3, Duration::from_secs(60));
    let names: Vec<_> = recs
        .iter()
        .map(|r| {
            r.json_value()["after"]["name"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(
        names,
        ["before", "during", "during"],
        "no loss, no duplicate (idempotent producer)"
    );
}
