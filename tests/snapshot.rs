//! The initial snapshot against a real Postgres (issue: snapshots): rows
//! that exist before capture arrive as op `r`, concurrent writes are
//! neither lost nor applied out of date, a kill -9 resumes from the last
//! acknowledged chunk, and `snapshot = "never"` reads nothing.
//! Run with the stack's settings: `eval "$(deploy/local/stack env)"`.

mod support;

use std::time::{Duration, Instant};

use serde_json::Value;
use support::*;

const WAIT: Duration = Duration::from_secs(120);

fn op(e: &Value) -> &str {
    e["value"]["op"].as_str().unwrap_or("?")
}

fn marker(e: &Value) -> &str {
    e["value"]["source"]["snapshot"].as_str().unwrap_or("?")
}

async fn big_table(db: &TestDb, rows: i32) {
    db.exec(&format!(
        "CREATE TABLE big (id int PRIMARY KEY, v text);
         INSERT INTO big SELECT i, 'row ' || i || E'\\ttab\\\\' FROM generate_series(1, {rows}) i;
         ANALYZE big;"
    ))
    .await;
}

fn state_file(w: &Walcast, pipeline: &str) -> Option<Value> {
    w.state_file(&format!("{pipeline}.snapshot.json"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_under_concurrent_writes_rebuilds_the_table() {
    const N: i32 = 50_000;
    let db = TestDb::new("wc_snap").await;
    big_table(&db, N).await;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    // Writes start before the slot exists and go on through the snapshot.
    let writes = big_writer(db.name.clone(), false, N + 1, stop_rx);
    let started = Instant::now();
    let w = Walcast::start_with(|out, admin| {
        file_pipeline_config_with(
            "snap",
            &db.name,
            &["public.big"],
            "snapshot_workers = 2\nsnapshot_chunk_rows = 1000",
            "",
            "",
            out,
            admin,
        )
    });
    w.wait_events("the last snapshot record", WAIT, |e| {
        e.iter().any(|x| marker(x) == "last")
    })
    .await;
    let snapshot_secs = started.elapsed().as_secs_f64();
    w.wait_events("streamed changes after the snapshot", WAIT, |e| {
        e.iter().filter(|x| op(x) != "r").count() >= 50
    })
    .await;
    stop_tx.send(true).unwrap();
    let transactions = writes.await.unwrap();
    let ev = converge(&w, &db, "big", WAIT).await;

    let reads: Vec<&Value> = ev.iter().filter(|e| op(e) == "r").collect();
    let first_stream = ev.iter().position(|e| op(e) != "r").unwrap();
    assert_eq!(
        first_stream,
        reads.len(),
        "every snapshot record comes before the first streamed change"
    );
    assert_eq!(marker(reads[0]), "first");
    assert_eq!(marker(reads[reads.len() - 1]), "last");
    assert!(reads[1..reads.len() - 1]
        .iter()
        .all(|e| marker(e) == "true"));
    assert!(ev[first_stream..].iter().all(|e| marker(e) == "false"));
    let ids: std::collections::HashSet<i64> = reads
        .iter()
        .map(|e| e["value"]["after"]["id"].as_i64().unwrap())
        .collect();
    assert_eq!(ids.len(), reads.len(), "no row is read twice");
    assert!(
        reads.len() >= (N as usize).saturating_sub(3 * transactions as usize),
        "{} rows read",
        reads.len()
    );
    // Snapshot records: no transaction, the consistent point as position,
    // which streamed changes are all after.
    let cp = reads[0]["value"]["source"]["lsn"].as_u64().unwrap();
    assert!(reads
        .iter()
        .all(|e| e["value"]["source"]["commit_lsn"].as_u64() == Some(cp)
            && e["value"]["transaction"].is_null()));
    assert!(ev[first_stream..]
        .iter()
        .all(|e| e["value"]["source"]["commit_lsn"].as_u64().unwrap() > cp));
    assert_eq!(
        reads[0]["key"],
        serde_json::json!({"id": reads[0]["value"]["after"]["id"]})
    );
    let status = w.status().await.unwrap();
    let progress = &status["pipelines"][0]["progress"]["snapshot"];
    assert_eq!(progress["state"], "done", "{status}");
    assert_eq!(progress["rows"].as_u64(), Some(reads.len() as u64));
    let state = state_file(&w, "snap").expect("state file");
    assert_eq!(state["done"], true);
    assert!(w.log().contains("snapshot done"));
    eprintln!(
        "snapshot of {} rows in {snapshot_secs:.1} s with {transactions} concurrent write transactions; {} streamed events after it",
        reads.len(),
        ev.len() - reads.len()
    );
}

/// Starts a snapshot of `big` (N rows), kills it with -9 once some
/// progress is saved, runs the statements of `while_down` one by one (VACUUM
/// cannot share a transaction) against the database, restarts it
/// and waits until the events rebuild the table as Postgres has it.
/// Returns the daemon, the events before the kill and the rows read after
/// the restart.
async fn kill_mid_snapshot_and_resume(
    db: &TestDb,
    pipeline: &str,
    n: i32,
    while_down: &[&str],
) -> (Walcast, usize, usize) {
    // fsync per small batch slows the sink down enough to stop it midway.
    let mut w = Walcast::start_with(|out, admin| {
        file_pipeline_config_with(
            pipeline,
            &db.name,
            &["public.big"],
            "snapshot_workers = 2\nsnapshot_chunk_rows = 1000\nsnapshot_range_size = \"1MiB\"",
            "batch_max_events = 200\nmax_in_flight_events = 2000",
            "fsync = true",
            out,
            admin,
        )
    });
    let deadline = Instant::now() + WAIT;
    let saved = loop {
        if let Some(s) = state_file(&w, pipeline) {
            let rows = s["tables"]["public.big"]["rows"].as_u64().unwrap_or(0);
            if rows > 0 {
                assert_eq!(
                    s["done"], false,
                    "the snapshot finished before it could be interrupted; make it slower"
                );
                let ranges = &s["tables"]["public.big"]["ranges"];
                let done = ranges["done"].as_array().expect("read by block ranges");
                assert!(
                    done.len() >= 2 && done.iter().any(|d| d == false),
                    "several ranges, some left: {ranges}"
                );
                break rows;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no snapshot progress saved:\n{}",
            tail(&w.log(), 4000)
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let before = w.kill9_keeping_whole_lines();
    let saved_after_kill = state_file(&w, pipeline).unwrap()["tables"]["public.big"]["rows"]
        .as_u64()
        .unwrap();
    assert!(
        before as u64 >= saved_after_kill,
        "the state never claims more than the sink holds: {saved_after_kill} > {before}"
    );
    for sql in while_down {
        db.exec(sql).await;
    }
    w.spawn();
    w.wait_events("the last snapshot record", WAIT, |e| {
        e.iter().any(|x| marker(x) == "last")
    })
    .await;
    let ev = converge(&w, db, "big", WAIT).await;
    let reads_after = ev[before..].iter().filter(|e| op(e) == "r").count();
    assert!(
        w.log().contains("\"resumed\":true"),
        "the log says it resumed"
    );
    let state = state_file(&w, pipeline).unwrap();
    assert_eq!(state["done"], true);
    eprintln!(
        "killed with {saved} rows saved ({before} events in the file); {reads_after} rows read after the restart of {n}; {} duplicates",
        (before + reads_after) as i64 - n as i64
    );
    (w, before, reads_after)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_snapshot_resumes_from_the_last_acknowledged_chunk() {
    const N: i32 = 300_000;
    let db = TestDb::new("wc_snapkill").await;
    big_table(&db, N).await;
    // Changes while it is down: streamed after the resumed snapshot (rows
    // updated into ranges already read come only from the stream).
    let (mut w, _, reads_after) = kill_mid_snapshot_and_resume(
        &db,
        "snapkill",
        N,
        &["UPDATE big SET v = 'changed while down' WHERE id % 1000 = 0; DELETE FROM big WHERE id % 1000 = 1; \
         INSERT INTO big VALUES (900000, 'new while down')"],
    )
    .await;
    assert!(
        reads_after > 0 && reads_after < N as usize,
        "{reads_after} rows read after the restart: only the ranges left"
    );
    assert!(!w.log().contains("was rewritten"));
    assert!(w.terminate().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_rewritten_while_down_is_read_again_from_the_start() {
    const N: i32 = 300_000;
    let db = TestDb::new("wc_snaprewrite").await;
    big_table(&db, N).await;
    // VACUUM FULL after deleting rows at the front moves every row to
    // another ctid: the saved ranges mean nothing any more.
    let (mut w, _, reads_after) = kill_mid_snapshot_and_resume(
        &db,
        "snaprewrite",
        N,
        &[
            "DELETE FROM big WHERE id <= 5000; UPDATE big SET v = 'changed while down' WHERE id % 1000 = 0",
            "VACUUM FULL big",
        ],
    )
    .await;
    let rows_now = table_rows(&db, "big").await.len();
    assert_eq!(
        reads_after, rows_now,
        "the whole table is read again after its rewrite"
    );
    assert!(
        w.log().contains("was rewritten"),
        "the log says why the table starts over"
    );
    assert!(w.terminate().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_table_is_read_by_several_workers_each_row_once() {
    let db = TestDb::new("wc_snapranges").await;
    // About 8 MB each: several 1 MiB ranges.
    db.exec(
        "CREATE TABLE wide (id int PRIMARY KEY, v text);
         INSERT INTO wide SELECT i, repeat('w', 150) || i || E'\\tab' FROM generate_series(1, 40000) i;
         CREATE TABLE heap (id int, v text); ALTER TABLE heap REPLICA IDENTITY FULL;
         INSERT INTO heap SELECT i % 30000, repeat('h', 150) || i FROM generate_series(1, 40000) i;
         DELETE FROM wide WHERE id % 7 = 0;
         ANALYZE wide; ANALYZE heap;",
    )
    .await;
    let mut w = Walcast::start_with(|out, admin| {
        file_pipeline_config_with(
            "ranges",
            &db.name,
            &["public.wide", "public.heap"],
            "snapshot = \"initial_only\"\nsnapshot_workers = 3\nsnapshot_range_size = \"1MiB\"\nkeyless_tables = [\"public.heap\"]",
            "batch_max_events = 300",
            "",
            out,
            admin,
        )
    });
    let deadline = Instant::now() + WAIT;
    let status = loop {
        if let Some(st) = w.exited() {
            break st;
        }
        assert!(
            Instant::now() < deadline,
            "initial_only did not exit:\n{}",
            tail(&w.log(), 4000)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "{status:?}:\n{}", tail(&w.log(), 4000));
    let ev = w.events();
    assert!(ev.iter().all(|e| op(e) == "r"));
    for table in ["wide", "heap"] {
        // Every row of Postgres once, nothing else: compared as multisets
        // (the key-less table has duplicate rows of its own).
        let mut want: Vec<(i64, String)> = db
            .client
            .query(&format!("SELECT id::int8, v FROM {table}"), &[])
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        let read: Vec<(i64, String)> = ev
            .iter()
            .filter(|e| e["value"]["source"]["table"] == table)
            .map(|e| {
                let a = &e["value"]["after"];
                (
                    a["id"].as_i64().unwrap(),
                    a["v"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        let mut got = read.clone();
        want.sort();
        got.sort();
        let missing = want
            .iter()
            .filter(|r| got.binary_search(r).is_err())
            .count();
        let extra = got
            .iter()
            .filter(|r| want.binary_search(r).is_err())
            .count();
        assert_eq!(
            (missing, extra),
            (0, 0),
            "{table}: rows missing, rows extra"
        );
        assert_eq!(
            got, want,
            "{table}: each row exactly as often as in Postgres"
        );
        // Rows were inserted in id order, so a table read by one session
        // from start to end would arrive sorted; pieces of ranges read at
        // the same time interleave.
        if table == "wide" {
            assert!(
                read.windows(2).any(|p| p[0].0 > p[1].0),
                "the ranges of one table were read by several sessions at once"
            );
        }
        let state = state_file(&w, "ranges").unwrap();
        let ranges = &state["tables"][format!("public.{table}")]["ranges"];
        let done = ranges["done"].as_array().expect("read by block ranges");
        assert!(done.len() >= 4, "{table}: {ranges}");
        assert!(done.iter().all(|d| d == true), "{table}: {ranges}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_never_reads_no_existing_rows() {
    let db = TestDb::new("wc_snapnever").await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t SELECT i, 'x' FROM generate_series(1, 100) i").await;
    let w = Walcast::start_with(|out, admin| {
        file_pipeline_config(
            "never",
            &db.name,
            &["public.t"],
            r#"snapshot = "never""#,
            out,
            admin,
        )
    });
    w.wait_state("streaming", WAIT).await;
    db.exec("INSERT INTO t VALUES (1000, 'streamed')").await;
    let ev = w.wait_events("the insert", WAIT, |e| !e.is_empty()).await;
    assert_eq!(ev.len(), 1, "{ev:?}");
    assert_eq!(op(&ev[0]), "c");
    assert!(state_file(&w, "never").is_none(), "no snapshot, no state");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_values_read_like_streamed_ones() {
    let db = TestDb::new("wc_snaptypes").await;
    db.exec(
        "CREATE TYPE mood AS ENUM ('sad', 'happy');
         CREATE TABLE types (id int PRIMARY KEY, n numeric(12,2), nu numeric, tstz timestamptz, ai int[], at text[],
            t text, by bytea, j jsonb, iv interval, e mood, d date, f8 float8, nothing text,
            g int GENERATED ALWAYS AS (id * 2) STORED)",
    )
    .await;
    let row = r#"-1234567890.12, 'NaN', '2024-02-29 12:34:56.789+02', '{1,NULL,3}', '{"a b","c\"d",NULL,"x\\y"}',
        E'tab\there\nnewline \\ backslash ë', '\x00ff5c', '{"k": [1, "t\tx"]}', '1 year 2 mons -3 days 04:05:06.5', 'happy',
        '0044-03-15 BC', 1.1, NULL"#;
    db.exec(&format!("INSERT INTO types VALUES (1, {row})"))
        .await;
    let w = Walcast::start_with(|out, admin| {
        file_pipeline_config("snaptypes", &db.name, &["public.types"], "", out, admin)
    });
    w.wait_state("streaming", WAIT).await;
    db.exec(&format!("INSERT INTO types VALUES (2, {row})"))
        .await;
    let ev = w
        .wait_events("the snapshot row and the streamed row", WAIT, |e| {
            e.len() >= 2
        })
        .await;
    assert_eq!(op(&ev[0]), "r");
    assert_eq!(
        marker(&ev[0]),
        "last",
        "a single-row snapshot's record is its last"
    );
    assert_eq!(op(&ev[1]), "c");
    let mut read = ev[0]["value"]["after"].clone();
    let mut streamed = ev[1]["value"]["after"].clone();
    read["id"] = Value::Null;
    streamed["id"] = Value::Null;
    assert_eq!(read, streamed);
    assert!(
        read.get("g").is_none(),
        "generated columns are left out, as pgoutput does"
    );
    assert_eq!(read["t"], "tab\there\nnewline \\ backslash ë");
    assert_eq!(read["nothing"], Value::Null);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn initial_only_reads_the_tables_exits_zero_and_keeps_no_slot() {
    let db = TestDb::new("wc_snaponly").await;
    db.exec(
        "CREATE TABLE a (id int PRIMARY KEY, v text); INSERT INTO a SELECT i, 'a' FROM generate_series(1, 2500) i;
         CREATE TABLE b (k int, v text); ALTER TABLE b REPLICA IDENTITY FULL; INSERT INTO b SELECT i, 'b' FROM generate_series(1, 300) i;",
    )
    .await;
    let mut w = Walcast::start_with(|out, admin| {
        file_pipeline_config(
            "only",
            &db.name,
            &["public.a", "public.b"],
            "snapshot = \"initial_only\"\nsnapshot_chunk_rows = 1000\nkeyless_tables = [\"public.b\"]",
            out,
            admin,
        )
    });
    let deadline = Instant::now() + WAIT;
    let status = loop {
        if let Some(st) = w.exited() {
            break st;
        }
        assert!(
            Instant::now() < deadline,
            "initial_only did not exit:\n{}",
            tail(&w.log(), 4000)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        status.success(),
        "exit status {status:?}:\n{}",
        tail(&w.log(), 4000)
    );
    let ev = w.events();
    assert_eq!(ev.len(), 2800);
    assert!(ev.iter().all(|e| op(e) == "r"));
    assert_eq!(marker(&ev[0]), "first");
    assert_eq!(marker(&ev[2799]), "last");
    assert_eq!(
        ev.iter()
            .filter(|e| e["value"]["source"]["table"] == "b" && e["key"].is_null())
            .count(),
        300
    );
    assert_eq!(
        db.confirmed_flush("walcast_only").await,
        None,
        "the temporary slot is gone"
    );
    // Done is done: a second run reads nothing and exits at once.
    w.spawn();
    let deadline = Instant::now() + WAIT;
    while w.exited().is_none() {
        assert!(
            Instant::now() < deadline,
            "second initial_only run did not exit"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(w.events().len(), 2800);
}
