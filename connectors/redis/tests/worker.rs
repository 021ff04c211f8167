//! Issue 26: `send` hands the batch to the sink's write worker and returns
//! while Redis is still working; the acker waits for Redis, and a definite
//! failure comes back from the next `send` or `flush`. A file of its own:
//! `CLIENT PAUSE` holds every writer of the shared test Redis, and test
//! binaries run one after another, so no test of another file sees it.

mod common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::*;
use walcast_redis::request::version_key;
use walcast_redis::{Mode, UpsertFormat};
use walcast_sdk::Sink;

/// The tests of this file run one at a time: the pause of one would hold
/// the other's own writes past its client's response timeout.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn upsert_json() -> Mode {
    Mode::Upsert {
        key_template: "{schema}.{table}:{id}".into(),
        format: UpsertFormat::Json,
        ttl_secs: None,
        tombstone_ttl_secs: 3_600,
        truncate_scan: true,
    }
}

/// Makes the version key of `key` a list: the script's GET then answers
/// WRONGTYPE, a definite failure.
async fn poison_version(r: &mut redis::aio::MultiplexedConnection, key: &str) {
    let _: i64 = redis::cmd("LPUSH")
        .arg(version_key(key))
        .arg("x")
        .query_async(r)
        .await
        .unwrap();
}

#[tokio::test]
async fn send_returns_before_redis_applies_the_batch_and_the_acker_waits_for_it() {
    let _serial = SERIAL.lock().await;
    let name = unique_table("paused");
    let t = table(&name, &[("id", true), ("name", false)]);
    let mut sink = sink(upsert_json()).await;
    let mut r = client().await;
    let key = format!("public.{name}:1");
    // Load the script first, so that the paused batch is one round trip.
    send(&mut sink, vec![upsert(&t, vec![int(0), text("warm")], 1)])
        .await
        .unwrap();

    let _: () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(2_000)
        .arg("WRITE")
        .query_async(&mut r)
        .await
        .unwrap();
    let paused = Instant::now();
    let (sent, mut tracker) = tokio::time::timeout(
        Duration::from_millis(1_000),
        hand_over(&mut sink, vec![upsert(&t, vec![int(1), text("later")], 10)]),
    )
    .await
    .expect("send returns while Redis holds the writes");
    sent.unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(1_000), tracker.next())
            .await
            .is_err(),
        "the acker is not answered while Redis holds the writes"
    );
    assert_eq!(get(&mut r, &key).await, None, "not written yet");

    let answered = tokio::time::timeout(Duration::from_secs(10), tracker.next())
        .await
        .expect("answered once the pause ends");
    answered.expect("the batch is applied");
    assert!(
        paused.elapsed() >= Duration::from_millis(1_800),
        "answered only after the pause: {:?}",
        paused.elapsed()
    );
    assert_eq!(
        get(&mut r, &key).await.as_deref(),
        Some(r#"{"id":1,"name":"later"}"#)
    );
    sink.flush().await.unwrap();
}

#[tokio::test]
async fn a_definite_failure_comes_back_from_the_next_send_or_flush_and_stops_later_batches() {
    let _serial = SERIAL.lock().await;
    let name = unique_table("wrongtype");
    let t = table(&name, &[("id", true), ("name", false)]);
    let mut sink = sink(upsert_json()).await;
    let stats = sink.stats();
    let mut r = client().await;
    let key = |id: i32| format!("public.{name}:{id}");
    poison_version(&mut r, &key(1)).await;

    let (sent, mut first) =
        hand_over(&mut sink, vec![upsert(&t, vec![int(1), text("a")], 10)]).await;
    sent.expect("send returns before Redis answers");
    let reason = first.next().await.expect_err("the acker fails").reason;
    assert!(
        reason.contains("WRONGTYPE") && reason.contains(&key(1)) && reason.contains("LSN"),
        "{reason}"
    );

    // The next send returns that failure, as `send` did when it waited,
    // and its own batch is failed unwritten.
    let (sent, mut second) =
        hand_over(&mut sink, vec![upsert(&t, vec![int(2), text("b")], 11)]).await;
    let err = sent.expect_err("the next send returns the failure");
    assert!(!err.is_transient(), "{err}");
    assert_eq!(err.to_string(), format!("redis: {reason}"));
    let refused = second.next().await.expect_err("refused").reason;
    assert!(refused.contains("an earlier batch failed"), "{refused}");
    assert!(refused.contains("WRONGTYPE"), "{refused}");

    // Reported once; later batches are still refused, nothing is written.
    sink.flush().await.expect("nothing new to report");
    let (sent, _third) = hand_over(&mut sink, vec![upsert(&t, vec![int(3), text("c")], 12)]).await;
    let err = sent.expect_err("refused until the replay");
    assert!(err.to_string().contains("an earlier batch failed"), "{err}");
    assert_eq!(get(&mut r, &key(2)).await, None);
    assert_eq!(get(&mut r, &key(3)).await, None);
    assert_eq!(stats.batches_failed.load(Ordering::Relaxed), 3);

    // The replay from the checkpoint (after the cause is fixed) is written.
    let _: i64 = redis::cmd("DEL")
        .arg(version_key(&key(1)))
        .query_async(&mut r)
        .await
        .unwrap();
    sink.rewind().await.unwrap();
    send(&mut sink, vec![upsert(&t, vec![int(1), text("a")], 10)])
        .await
        .unwrap();
    assert_eq!(
        get(&mut r, &key(1)).await.as_deref(),
        Some(r#"{"id":1,"name":"a"}"#)
    );

    // With no send after it, `flush` returns the failure.
    poison_version(&mut r, &key(4)).await;
    let (sent, mut fourth) =
        hand_over(&mut sink, vec![upsert(&t, vec![int(4), text("d")], 13)]).await;
    sent.unwrap();
    let err = sink.flush().await.expect_err("flush returns the failure");
    assert!(!err.is_transient(), "{err}");
    let reason = fourth.next().await.expect_err("the acker fails").reason;
    assert_eq!(err.to_string(), format!("redis: {reason}"));
    assert!(reason.contains(&key(4)), "{reason}");
}

fn int(i: i32) -> walcast_sdk::Value {
    walcast_sdk::Value::Int32(i)
}
