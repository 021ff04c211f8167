//! Incremental snapshots against a real Postgres (issue #7): `walcast
//! snapshot TABLE` makes a running daemon read a table's rows in chunks
//! between watermarks while it keeps streaming, and the events, applied in
//! order, rebuild the table even with writes going on; a table added to a
//! pipeline's config is read this way after a restart.
//! Run with the stack's settings: `eval "$(deploy/local/stack env)"`.

mod support;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::*;

const WAIT: Duration = Duration::from_secs(180);

fn op(e: &Value) -> &str {
    e["value"]["op"].as_str().unwrap_or("?")
}

fn table_of(e: &Value) -> &str {
    e["value"]["source"]["table"].as_str().unwrap_or("?")
}

/// The incremental snapshot's entry in /status, once it says done.
async fn wait_incremental_done(w: &Walcast) -> Value {
    let st = w
        .wait_status("the incremental snapshot to finish", WAIT, |s| {
            s["pipelines"][0]["progress"]["incremental_snapshot"]["state"] == "done"
        })
        .await;
    st["pipelines"][0]["progress"]["incremental_snapshot"].clone()
}

fn state(w: &Walcast, pipeline: &str) -> Option<Value> {
    w.state_file(&format!("{pipeline}.incremental.json"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incremental_snapshot_under_concurrent_writes_rebuilds_the_table() {
    const N: i32 = 50_000;
    let db = TestDb::new("wc_incr").await;
    db.exec(&format!(
        "CREATE TABLE big (id int PRIMARY KEY, v text);
         INSERT INTO big SELECT i, 'row ' || i FROM generate_series(1, {N}) i;
         ANALYZE big;"
    ))
    .await;
    // No initial snapshot: only the signalled one reads existing rows.
    let w = Walcast::start_with(|out, admin| {
        file_pipeline_config(
            "incr",
            &db.name,
            &["public.big"],
            "snapshot = \"never\"\nsnapshot_chunk_rows = 2000",
            out,
            admin,
        )
    });
    w.wait_state("streaming", WAIT).await;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let writes = big_writer(db.name.clone(), true, N + 1, stop_rx);
    w.wait_events("streamed changes before the snapshot", WAIT, |e| {
        e.len() >= 20
    })
    .await;
    let started = Instant::now();
    let (ok, out) = cli("snapshot", &w.config, &["public.big"]);
    assert!(ok, "walcast snapshot failed: {out}");
    assert!(out.contains("public.big"), "{out}");
    let progress = wait_incremental_done(&w).await;
    let secs = started.elapsed().as_secs_f64();
    // Writes go on after it, then stop.
    let after_done = w.events().len();
    w.wait_events("streamed changes after the snapshot", WAIT, |e| {
        e.len() >= after_done + 50
    })
    .await;
    stop_tx.send(true).unwrap();
    let transactions = writes.await.unwrap();
    let ev = converge(&w, &db, "big", WAIT).await;

    let reads: Vec<(usize, &Value)> = ev
        .iter()
        .enumerate()
        .filter(|(_, e)| op(e) == "r")
        .collect();
    assert!(
        reads
            .iter()
            .all(|(_, e)| e["value"]["source"]["snapshot"] == "incremental"
                && e["value"]["transaction"].is_null()
                && e["value"]["source"]["lsn"] == e["value"]["source"]["commit_lsn"]),
        "snapshot reads are marked incremental, with the watermark as position"
    );
    let ids: std::collections::HashSet<i64> = reads
        .iter()
        .map(|(_, e)| e["value"]["after"]["id"].as_i64().unwrap())
        .collect();
    assert_eq!(ids.len(), reads.len(), "no row is read twice");
    assert!(
        reads.len() >= (N as usize).saturating_sub(5 * transactions as usize),
        "{} rows read of {N} with {transactions} write transactions",
        reads.len()
    );
    // Streaming went on while the chunks were read.
    let (first, last) = (reads[0].0, reads[reads.len() - 1].0);
    let interleaved = ev[first..last].iter().filter(|e| op(e) != "r").count();
    assert!(
        interleaved > 0,
        "no streamed change between the first and the last snapshot read"
    );
    // Positions never go backwards in the stream.
    let lsns: Vec<u64> = ev
        .iter()
        .map(|e| e["value"]["source"]["commit_lsn"].as_u64().unwrap())
        .collect();
    assert!(
        lsns.windows(2).all(|p| p[0] <= p[1]),
        "versions are in stream order"
    );
    assert_eq!(
        progress["rows"].as_u64(),
        Some(reads.len() as u64),
        "{progress}"
    );
    let st = state(&w, "incr").expect("state file");
    assert_eq!(st["tables"], serde_json::json!([]), "{st}");
    let log = w.log();
    assert!(log.contains("incremental snapshot requested"));
    let superseded: u64 = log
        .lines()
        .filter(|l| l.contains("incremental snapshot chunk"))
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|j| j["superseded"].as_u64())
        .sum();
    eprintln!(
        "incremental snapshot of {} rows in {secs:.1} s with {transactions} concurrent write transactions; \
         {interleaved} streamed events interleaved; {superseded} chunk rows superseded by streamed changes; {} events in all",
        reads.len(),
        ev.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_added_to_a_running_pipeline_is_read_by_walcast_snapshot() {
    let db = TestDb::new("wc_incradd").await;
    db.exec(
        "CREATE TABLE a (id int PRIMARY KEY, v text); INSERT INTO a SELECT i, 'a' FROM generate_series(1, 10) i;
         CREATE TABLE b (id int PRIMARY KEY, v text); INSERT INTO b SELECT i, 'b ' || i FROM generate_series(1, 3000) i;",
    )
    .await;
    let cfg = |tables: &[&str], out: &Path, admin: &str| {
        file_pipeline_config(
            "add",
            &db.name,
            tables,
            "snapshot_chunk_rows = 700",
            out,
            admin,
        )
    };
    let mut w = Walcast::start_with(|out, admin| cfg(&["public.a"], out, admin));
    w.wait_state("streaming", WAIT).await;
    assert_eq!(w.events().len(), 10, "the initial snapshot of a");

    // Not captured yet: the command says what to do.
    let (ok, out) = cli("snapshot", &w.config, &["b"]);
    assert!(!ok, "{out}");
    assert!(out.contains("does not capture public.b"), "{out}");

    // Add it to the config and restart: the publication gains the table.
    assert!(w.terminate().success());
    std::fs::write(&w.config, cfg(&["public.a", "public.b"], &w.out, &w.admin)).unwrap();
    w.spawn();
    w.wait_state("streaming", WAIT).await;
    assert!(
        w.log().contains("run `walcast snapshot public.b`"),
        "the log says how to read its rows"
    );
    let published: i64 = db
        .client
        .query_one(
            "SELECT count(*) FROM pg_publication_tables WHERE pubname = 'walcast_add' AND tablename = 'b'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(published, 1);
    // Changes stream at once; old rows are not there yet.
    db.exec("INSERT INTO b VALUES (5000, 'streamed'); UPDATE b SET v = 'changed' WHERE id = 1")
        .await;
    w.wait_events("b's streamed changes", WAIT, |e| {
        e.iter().filter(|x| table_of(x) == "b").count() >= 2
    })
    .await;
    assert_eq!(rebuild_rows(&w.events(), "b").len(), 2);

    let (ok, out) = cli("snapshot", &w.config, &["b"]);
    assert!(ok, "{out}");
    wait_incremental_done(&w).await;
    let shown = Command::new(bin())
        .args(["status", "--admin", &w.admin])
        .output()
        .unwrap();
    let shown = String::from_utf8_lossy(&shown.stdout);
    assert!(
        shown.contains("incremental_snapshot: done rows=3001/"),
        "walcast status shows the progress: {shown}"
    );
    let ev = converge(&w, &db, "b", WAIT).await;
    let reads = ev
        .iter()
        .filter(|e| table_of(e) == "b" && op(e) == "r")
        .count();
    assert_eq!(reads, 3001, "every row of b, read once");
    assert_eq!(rebuild_rows(&ev, "b").len(), 3001);
    assert_eq!(rebuild_rows(&ev, "b")[&1], "changed");
    // Table a was left alone.
    assert_eq!(ev.iter().filter(|e| table_of(e) == "a").count(), 10);
    let st = state(&w, "add").expect("state file");
    assert_eq!(st["tables"], serde_json::json!([]));
    assert!(w.terminate().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_incremental_snapshot_resumes_without_a_new_signal() {
    const N: i32 = 60_000;
    let db = TestDb::new("wc_incrkill").await;
    db.exec(&format!(
        "CREATE TABLE big (id int PRIMARY KEY, v text);
         INSERT INTO big SELECT i, 'row ' || i FROM generate_series(1, {N}) i;
         ANALYZE big;"
    ))
    .await;
    // fsync per small batch slows the sink enough to stop it midway.
    let mut w = Walcast::start_with(|out, admin| {
        file_pipeline_config_with(
            "incrkill",
            &db.name,
            &["public.big"],
            "snapshot = \"never\"\nsnapshot_chunk_rows = 1000",
            "batch_max_events = 200\nmax_in_flight_events = 2000",
            "fsync = true",
            out,
            admin,
        )
    });
    w.wait_state("streaming", WAIT).await;
    let (ok, out) = cli("snapshot", &w.config, &["public.big"]);
    assert!(ok, "{out}");
    let deadline = Instant::now() + WAIT;
    let saved = loop {
        if let Some(st) = state(&w, "incrkill") {
            let rows = st["tables"][0]["rows"].as_u64().unwrap_or(0);
            if rows > 0 {
                break rows;
            }
            assert!(
                st["tables"].as_array().is_some_and(|t| !t.is_empty()),
                "the snapshot finished before it could be interrupted; make it slower"
            );
        }
        assert!(
            Instant::now() < deadline,
            "no incremental snapshot progress saved:\n{}",
            tail(&w.log(), 4000)
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let before = w.kill9_keeping_whole_lines();
    let saved_after_kill = state(&w, "incrkill").unwrap()["tables"][0]["rows"]
        .as_u64()
        .unwrap();
    assert!(
        before as u64 >= saved_after_kill,
        "the state never claims more than the sink holds: {saved_after_kill} > {before}"
    );
    // Changes while it is down, then a restart with no new signal.
    db.exec("UPDATE big SET v = 'changed while down' WHERE id % 1000 = 0; DELETE FROM big WHERE id % 1000 = 1; INSERT INTO big VALUES (200000, 'new while down')").await;
    w.spawn();
    wait_incremental_done(&w).await;
    let ev = converge(&w, &db, "big", WAIT).await;
    let reads_after = ev[before..].iter().filter(|e| op(e) == "r").count();
    assert!(
        reads_after > 0 && reads_after < N as usize,
        "{reads_after} rows read after the restart"
    );
    assert!(w.log().contains("incremental snapshot resuming"));
    assert_eq!(
        state(&w, "incrkill").unwrap()["tables"],
        serde_json::json!([])
    );
    eprintln!(
        "killed with {saved} rows saved ({before} events in the file); {reads_after} rows read after the restart of {N}"
    );
    assert!(w.terminate().success());
}
