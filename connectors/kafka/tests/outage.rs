//! A broker outage stalls the sink without losing or acknowledging anything,
//! and delivery resumes when the broker returns. Its own test binary, so
//! stopping the broker never disturbs the other tests.

mod support;

use std::sync::Arc;
use std::time::Duration;

use support::*;
use walcast_sdk::{AckTracker, Batch, Op, Sink};

fn stack(cmd: &str) {
    let status = stack_command()
        .args([cmd, "kafka"])
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
    let mut sink = sink(sink_config(&[("public.outage", &topic)]));
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
    assert_eq!(
        after_names(&recs),
        ["before", "during", "during"],
        "no loss, no duplicate (idempotent producer)"
    );
}
