//! `source.streaming = true` (pgoutput protocol 2, transactions streamed
//! while in progress) against a real Postgres, with
//! `logical_decoding_work_mem` at its 64kB minimum for the test's database
//! so that every transaction of more than a few hundred rows is streamed.
//! Kafka must hold exactly what committed, in commit order, as with
//! protocol 1: the rows of a large transaction (with a savepoint rolled
//! back inside it) and of small transactions committed meanwhile, nothing
//! of a transaction rolled back after streaming began. The slot's
//! statistics show the transactions were streamed and nothing was spilled
//! to the server's disk, where a protocol 1 reader of the same WAL spills.
//! And a kill -9 of walcast in the middle of a streamed transaction loses
//! nothing and publishes nothing partial.
//!
//! `WALCAST_TEST_STREAMING_ROWS` sets the large transaction's rows
//! (200 000 by default).

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use support::*;

fn rows() -> i64 {
    std::env::var("WALCAST_TEST_STREAMING_ROWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200_000)
}

/// A database whose walsenders stream past 64 kB of changes.
async fn streaming_db(prefix: &str) -> TestDb {
    let db = TestDb::new(prefix).await;
    db.exec(&format!(
        "ALTER DATABASE {} SET logical_decoding_work_mem = '64kB';
         CREATE TABLE t (id bigint PRIMARY KEY, v text);",
        db.name
    ))
    .await;
    db
}

fn capture(pipeline: &str, db: &str, prefix: &str) -> KafkaCapture {
    KafkaCapture::new(pipeline, db, prefix, &["public.t"])
        .source("streaming = true\n")
        // One partition: the topic's order is the order of publication.
        .sink("create_topics = true\ntopic_creation = { partitions = 1 }")
        // A small window, so the large transaction goes to a spill file.
        .pipeline("max_in_flight_bytes = \"2MiB\"\n")
}

/// The topic's row events in order: (id, v, txId).
fn topic_rows(topic: &str, expected: usize) -> Vec<(i64, String, i64)> {
    let records = consume_json(topic, Duration::from_secs(300), |r| r.len() >= expected);
    // Nothing more trickles in.
    let more = consume_json_until(topic, Duration::from_secs(3), |r| r.len() > expected).0;
    assert_eq!(more.len(), records.len(), "more records than expected");
    records
        .iter()
        .filter_map(|(_, v)| {
            let v = v.as_ref()?;
            let p = v.get("payload").unwrap_or(v);
            let after = &p["after"];
            Some((
                after["id"].as_i64()?,
                after["v"].as_str()?.to_string(),
                p["source"]["txId"].as_i64().unwrap_or(-1),
            ))
        })
        .collect()
}

async fn wait_confirmed_to_now(db: &TestDb, slot: &str, w: &mut Walcast) {
    db.exec("SELECT 1").await;
    let end = db.current_wal().await;
    let deadline = Instant::now() + Duration::from_secs(600);
    while db.confirmed_flush(slot).await.unwrap_or(0) < end {
        assert!(
            w.exited().is_none(),
            "walcast exited:\n{}",
            tail(&w.log(), 3000)
        );
        assert!(
            Instant::now() < deadline,
            "not confirmed; {:?}",
            w.status().await
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// (spill_bytes, stream_txns, stream_bytes) of a slot, once its
/// statistics show at least `min_stream_txns` streamed transactions (the
/// statistics are flushed a little after the decoding).
async fn slot_stats(db: &TestDb, slot: &str, min_stream_txns: i64) -> (i64, i64, i64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = db
            .client
            .query_opt(
                "SELECT spill_bytes, stream_txns, stream_bytes FROM pg_stat_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await
            .unwrap();
        let s = r
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .unwrap_or((0, 0, 0));
        if s.1 >= min_stream_txns || Instant::now() > deadline {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_transactions_publish_exactly_what_committed_in_commit_order() {
    let n = rows();
    let db = streaming_db("wc_stream").await;
    // A protocol 1 reader of the same WAL, for the spill comparison.
    db.exec("SELECT pg_create_logical_replication_slot('v1_reader', 'pgoutput')")
        .await;
    let pipeline = unique("stream");
    let prefix = unique("st");
    let topic = format!("{prefix}.public.t");
    let mut w = Walcast::start_with(|_, admin| capture(&pipeline, &db.name, &prefix).toml(admin));
    w.wait_state("streaming", Duration::from_secs(120)).await;
    let slot = format!("walcast_{pipeline}");

    // The large transaction, on a connection of its own, with small
    // transactions committing while it runs.
    let big = connect(&db.name).await;
    big.batch_execute(&format!(
        "BEGIN; INSERT INTO t SELECT g, 'big' FROM generate_series(1, {}) g",
        n / 2
    ))
    .await
    .unwrap();
    for i in 0..20 {
        db.exec(&format!(
            "INSERT INTO t VALUES ({}, 'small-before')",
            10_000_000 + i
        ))
        .await;
    }
    // A savepoint whose rows are streamed, then rolled back.
    big.batch_execute(&format!(
        "SAVEPOINT s; INSERT INTO t SELECT g, 'aborted-savepoint' FROM generate_series({}, {}) g;
         ROLLBACK TO SAVEPOINT s;
         INSERT INTO t SELECT g, 'big' FROM generate_series({}, {n}) g",
        n + 1,
        n + 20_000,
        n / 2 + 1
    ))
    .await
    .unwrap();
    // A transaction rolled back once streaming of it began.
    let doomed = connect(&db.name).await;
    doomed
        .batch_execute(
            "BEGIN; INSERT INTO t SELECT g, 'rolled-back' FROM generate_series(20000001, 20030000) g",
        )
        .await
        .unwrap();
    // Both the big one and this one streamed (Postgres 16+ would skip
    // streaming this one if it found it rolled back already).
    let streamed_before = slot_stats(&db, &slot, 2).await.1;
    assert!(
        streamed_before >= 2,
        "streaming began: {streamed_before} transactions streamed"
    );
    doomed.batch_execute("ROLLBACK").await.unwrap();
    big.batch_execute("COMMIT").await.unwrap();
    for i in 0..20 {
        db.exec(&format!(
            "INSERT INTO t VALUES ({}, 'small-after')",
            30_000_000 + i
        ))
        .await;
    }
    wait_confirmed_to_now(&db, &slot, &mut w).await;

    let expected = (n + 40) as usize;
    let got = topic_rows(&topic, expected);
    // Both ways: Kafka holds every row of Postgres, and nothing else.
    let in_pg = table_rows(&db, "t").await;
    let in_kafka: BTreeMap<i64, String> = got.iter().map(|(id, v, _)| (*id, v.clone())).collect();
    assert_eq!(got.len(), expected, "each committed row once");
    assert_eq!(in_pg.len(), expected);
    assert!(in_kafka == in_pg, "Kafka and Postgres differ");
    // Commit order: the small transactions committed during the big one
    // come before all of it, those after it after; no transaction split.
    let labels: Vec<&str> = got.iter().map(|(_, v, _)| v.as_str()).collect();
    let first_big = labels.iter().position(|v| *v == "big").unwrap();
    let last_big = labels.iter().rposition(|v| *v == "big").unwrap();
    assert_eq!(first_big, 20, "the 20 small ones first");
    assert_eq!(
        last_big - first_big + 1,
        n as usize,
        "the big one in one piece"
    );
    assert!(labels[last_big + 1..].iter().all(|v| *v == "small-after"));
    let big_tx: Vec<i64> = got[first_big..=last_big].iter().map(|r| r.2).collect();
    assert!(big_tx.iter().all(|x| *x == big_tx[0]), "one transaction id");

    let (spill, stream_txns, stream_bytes) = slot_stats(&db, &slot, 2).await;
    eprintln!("streaming slot: spill_bytes {spill}, stream_txns {stream_txns}, stream_bytes {stream_bytes}");
    assert_eq!(spill, 0, "nothing spilled to the server's disk");
    assert!(stream_txns >= 2 && stream_bytes > 0);
    // The same WAL through protocol 1 spills.
    db.exec(
        "SET logical_decoding_work_mem = '64kB';
         SELECT count(*) FROM pg_logical_slot_get_binary_changes('v1_reader', NULL, NULL,
           'proto_version', '1', 'publication_names', (SELECT string_agg(pubname, ',') FROM pg_publication))",
    )
    .await;
    let (v1_spill, v1_streamed, _) = slot_stats(&db, "v1_reader", 0).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut v1_spill = v1_spill;
    while v1_spill == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(300)).await;
        v1_spill = slot_stats(&db, "v1_reader", 0).await.0;
    }
    eprintln!("protocol 1 reader: spill_bytes {v1_spill}, stream_txns {v1_streamed}");
    assert!(v1_spill > 0, "protocol 1 spills the same transactions");
    assert_eq!(v1_streamed, 0);
    let leftovers: Vec<_> = std::fs::read_dir(w.dir.join("walcast-state"))
        .map(|d| {
            d.flatten()
                .map(|f| f.file_name())
                .filter(|f| f.to_string_lossy().ends_with(".spill"))
                .collect()
        })
        .unwrap_or_default();
    assert!(leftovers.is_empty(), "spill files left: {leftovers:?}");
    db.exec("SELECT pg_drop_replication_slot('v1_reader')")
        .await;
    w.kill9();
}

/// kill -9 while a streamed transaction is held (spilled to a file, with
/// the window this small), then a restart: Postgres sends it again from
/// its start, and Kafka gets every row of it once it commits, and of the
/// transactions around it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_in_the_middle_of_a_streamed_transaction_loses_nothing() {
    let n = rows() / 2;
    let db = streaming_db("wc_streamkill").await;
    let pipeline = unique("streamkill");
    let prefix = unique("sk");
    let topic = format!("{prefix}.public.t");
    let mut w = Walcast::start_with(|_, admin| capture(&pipeline, &db.name, &prefix).toml(admin));
    w.wait_state("streaming", Duration::from_secs(120)).await;
    let slot = format!("walcast_{pipeline}");
    db.exec("INSERT INTO t VALUES (0, 'before')").await;
    // Confirmed before the kill: at-least-once would replay it otherwise.
    wait_confirmed_to_now(&db, &slot, &mut w).await;

    let big = connect(&db.name).await;
    big.batch_execute(&format!(
        "BEGIN; INSERT INTO t SELECT g, 'big' FROM generate_series(1, {n}) g"
    ))
    .await
    .unwrap();
    // Wait until walcast holds it in a spill file, then kill.
    let state = w.dir.join("walcast-state");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let spilled = std::fs::read_dir(&state)
            .map(|d| {
                d.flatten()
                    .any(|f| f.file_name().to_string_lossy().ends_with(".spill"))
            })
            .unwrap_or(false);
        if spilled {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never spilled:\n{}",
            tail(&w.log(), 3000)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    w.kill9();
    big.batch_execute(&format!(
        "INSERT INTO t SELECT g, 'big' FROM generate_series({}, {}) g; COMMIT",
        n + 1,
        n + 1000
    ))
    .await
    .unwrap();
    db.exec("INSERT INTO t VALUES (-1, 'after')").await;
    w.spawn();
    wait_confirmed_to_now(&db, &slot, &mut w).await;
    let expected = (n + 1002) as usize;
    let got = topic_rows(&topic, expected);
    let in_pg = table_rows(&db, "t").await;
    let in_kafka: BTreeMap<i64, String> = got.iter().map(|(id, v, _)| (*id, v.clone())).collect();
    assert_eq!(
        got.len(),
        expected,
        "each row once: nothing partial was published before the kill"
    );
    assert!(in_kafka == in_pg, "Kafka and Postgres differ");
    assert_eq!(got.first().map(|r| r.1.as_str()), Some("before"));
    assert_eq!(got.last().map(|r| r.1.as_str()), Some("after"));
    w.kill9();
}
