//! The catalog changing under a running capture (issue #16): a captured
//! table dropped mid-stream, a column's type changed mid-stream, the
//! publication dropped. Each has a defined behaviour:
//!
//! - **DROP TABLE** of one captured table: nothing stops. Every change
//!   committed before the drop is delivered (pgoutput still decodes it, with
//!   the catalog as of its WAL position), the other tables keep streaming, a
//!   warning names the table, and a restart (even one that replays the
//!   dropped table's last changes) neither fails nor loops.
//! - **ALTER COLUMN TYPE**: pgoutput sends a new Relation; events after it
//!   carry the new type (see tests/evolution.rs for Avro and the registry).
//! - **DROP PUBLICATION**: the walsender fails on the first change after the
//!   drop and keeps failing on it even once the publication exists again
//!   (PostgreSQL 15 reads publications as of the decoded position). walcast
//!   stops with an error naming the publication and the way out, and never
//!   recreates the publication mid-stream.

mod support;

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use serde_json::Value;
use support::*;

const WAIT: Duration = Duration::from_secs(120);

/// Inserts one row per transaction into `table` until told to stop or the
/// table is gone; returns the ids whose transaction committed.
fn writer(
    db: String,
    table: &'static str,
    stop: tokio::sync::watch::Receiver<bool>,
) -> tokio::task::JoinHandle<Vec<i64>> {
    tokio::spawn(async move {
        let c = connect(&db).await;
        let mut committed = Vec::new();
        for id in 1i64.. {
            if *stop.borrow() {
                break;
            }
            match c
                .batch_execute(&format!("INSERT INTO {table} VALUES ({id}, 'v{id}')"))
                .await
            {
                Ok(()) => committed.push(id),
                // The table was dropped under us: what committed is the truth.
                Err(e) if e.as_db_error().is_some_and(|d| d.code().code() == "42P01") => break,
                Err(e) => panic!("insert into {table}: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        committed
    })
}

/// Inserted ids per table among the events written so far.
fn ids_by_table(events: &[Value]) -> HashMap<String, BTreeSet<i64>> {
    let mut out: HashMap<String, BTreeSet<i64>> = HashMap::new();
    for e in events {
        let v = &e["value"];
        if v["op"] == "c" {
            out.entry(v["source"]["table"].as_str().unwrap_or("?").to_string())
                .or_default()
                .insert(v["after"]["id"].as_i64().expect("an id"));
        }
    }
    out
}

/// JSON log lines at WARN level whose `table` field is `table`.
fn warnings_for(log: &str, table: &str) -> usize {
    log.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|l| l["level"] == "WARN")
        .filter(|l| l["fields"]["table"] == table || l["table"] == table)
        .count()
}

/// A database with `t (id, v)` and walcast streaming it to a file, with a
/// short retry backoff: the publication tests' start. Returns the
/// publication's name, `walcast_<pipeline>` (the slot's too).
async fn streaming_t(db_prefix: &str, pipeline_prefix: &str) -> (TestDb, Walcast, String) {
    let db = TestDb::new(db_prefix).await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY, v text)").await;
    let pipeline = unique(pipeline_prefix);
    let w = Walcast::start_with(|out, admin| {
        file_pipeline_config(
            &pipeline,
            &db.name,
            &["public.t"],
            "retry_max_backoff = \"1s\"",
            out,
            admin,
        )
    });
    w.wait_state("streaming", WAIT).await;
    (db, w, format!("walcast_{pipeline}"))
}

async fn publication_exists(db: &TestDb, publication: &str) -> bool {
    db.client
        .query_opt(
            "SELECT 1 FROM pg_publication WHERE pubname = $1",
            &[&publication],
        )
        .await
        .unwrap()
        .is_some()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_captured_table_dropped_mid_stream_delivers_its_last_changes_and_the_others_keep_flowing()
{
    let db = TestDb::new("wc_droptab").await;
    // c has REPLICA IDENTITY FULL: after a restart its replayed changes come
    // with no way to learn its key from the catalog (it is gone).
    db.exec(
        "CREATE TABLE a (id bigint PRIMARY KEY, v text);
         CREATE TABLE b (id bigint PRIMARY KEY, v text);
         CREATE TABLE c (id bigint PRIMARY KEY, v text);
         ALTER TABLE c REPLICA IDENTITY FULL",
    )
    .await;
    let pipeline = unique("droptab");
    let mut w = Walcast::start_with(|out, admin| {
        file_pipeline_config(
            &pipeline,
            &db.name,
            &["public.a", "public.b", "public.c"],
            "retry_max_backoff = \"1s\"",
            out,
            admin,
        )
    });
    w.wait_state("streaming", WAIT).await;
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let wa = writer(db.name.clone(), "a", stop.clone());
    let wb = writer(db.name.clone(), "b", stop.clone());
    let wc = writer(db.name.clone(), "c", stop.clone());

    // a is dropped while walcast streams, under load.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    db.exec("DROP TABLE a").await;
    let a_ids = wa.await.unwrap();
    tokio::time::sleep(Duration::from_millis(1000)).await;

    // c is dropped while walcast is down with c's last changes unconfirmed:
    // the restart replays them, and must deliver them rather than stop.
    w.kill9();
    tokio::time::sleep(Duration::from_millis(700)).await;
    db.exec("DROP TABLE c").await;
    let c_ids = wc.await.unwrap();
    w.spawn();
    w.wait_state("streaming", WAIT).await;
    // b keeps flowing after the restart.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop_tx.send(true).unwrap();
    let b_ids = wb.await.unwrap();
    assert!(
        a_ids.len() > 10 && b_ids.len() > 10 && c_ids.len() > 10,
        "the load ran: a {} b {} c {}",
        a_ids.len(),
        b_ids.len(),
        c_ids.len()
    );

    let want: HashMap<String, BTreeSet<i64>> = [("a", &a_ids), ("b", &b_ids), ("c", &c_ids)]
        .into_iter()
        .map(|(t, ids)| (t.to_string(), ids.iter().copied().collect()))
        .collect();
    let events = w
        .wait_events("every committed row of a, b and c", WAIT, |ev| {
            let got = ids_by_table(ev);
            want.iter()
                .all(|(t, ids)| got.get(t).is_some_and(|g| ids.is_subset(g)))
        })
        .await;
    // Nothing that was not committed, either.
    let got = ids_by_table(&events);
    for (t, ids) in &want {
        assert_eq!(&got[t], ids, "table {t}");
    }
    assert!(
        w.exited().is_none(),
        "walcast stopped:\n{}",
        tail(&w.log(), 4000)
    );
    let status = w.status().await.expect("status");
    assert_eq!(status["pipelines"][0]["state"], "streaming", "{status}");
    // c's replayed events still carry its key, taken from the Relation
    // message's replica identity... which under FULL is every column, so
    // none: a null key, but the event itself is whole.
    let c_event = events
        .iter()
        .find(|e| e["value"]["source"]["table"] == "c")
        .expect("an event of c");
    assert_eq!(c_event["value"]["after"]["v"], format!("v{}", c_ids[0]));

    let log = w.log();
    assert!(
        warnings_for(&log, "public.a") >= 1 && warnings_for(&log, "public.c") >= 1,
        "a warning names each dropped table:\n{}",
        tail(&log, 4000)
    );
    // The slot is not stuck behind the dropped tables.
    let end = db.current_wal().await;
    w.wait_confirmed(
        &db,
        &format!("walcast_{pipeline}"),
        end,
        WAIT,
        "the slot never confirmed past the drops",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_column_type_changed_mid_stream_gives_events_of_the_new_type() {
    let db = TestDb::new("wc_alttype").await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY, n int, amount int, label varchar(5))")
        .await;
    let pipeline = unique("alttype");
    let mut w = Walcast::start_with(|out, admin| {
        file_pipeline_config(&pipeline, &db.name, &["public.t"], "", out, admin)
    });
    w.wait_state("streaming", WAIT).await;
    db.exec("INSERT INTO t VALUES (1, 1, 7, 'ab')").await;
    // Widening, a change of representation (int -> numeric is a JSON string
    // with its scale), and a text-compatible change, in one transaction
    // with rows written on both sides of it.
    db.exec(
        "BEGIN;
         INSERT INTO t VALUES (2, 2, 8, 'cd');
         ALTER TABLE t ALTER COLUMN n TYPE bigint,
                       ALTER COLUMN amount TYPE numeric(10,2),
                       ALTER COLUMN label TYPE text;
         INSERT INTO t VALUES (3, 5000000000, 7.5, 'a longer label');
         COMMIT;
         UPDATE t SET n = n + 1 WHERE id = 1",
    )
    .await;
    let ev = w.wait_events("4 events", WAIT, |ev| ev.len() >= 4).await;
    let after = |i: usize| ev[i]["value"]["after"].clone();
    assert_eq!(after(0)["amount"], 7, "before the change: an int");
    assert_eq!(
        after(1)["amount"],
        8,
        "written before the ALTER in the same transaction"
    );
    assert_eq!(after(2)["n"], 5_000_000_000i64, "bigint");
    assert_eq!(after(2)["amount"], "7.50", "numeric(10,2)");
    assert_eq!(after(2)["label"], "a longer label");
    assert_eq!(ev[3]["value"]["op"], "u");
    assert_eq!(after(3)["n"], 2);
    assert_eq!(
        after(3)["amount"],
        "7.00",
        "a rewritten row has the new type"
    );
    assert!(w.exited().is_none(), "{}", tail(&w.log(), 3000));
    assert_eq!(
        w.status().await.unwrap()["pipelines"][0]["state"],
        "streaming"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_publication_stops_the_pipeline_naming_it_and_is_never_recreated() {
    let (db, mut w, publication) = streaming_t("wc_droppub", "droppub").await;
    // The publication and the slot are both named after the pipeline.
    let slot = publication.clone();
    for i in 1..=10 {
        db.exec(&format!("INSERT INTO t VALUES ({i}, 'v{i}')"))
            .await;
    }
    w.wait_events("10 events", WAIT, |ev| ev.len() >= 10).await;

    db.exec(&format!("DROP PUBLICATION {publication}")).await;
    db.exec("INSERT INTO t VALUES (11, 'after the drop')").await;
    w.wait_failed("the dropped publication", WAIT).await;
    let log = w.log();
    assert!(
        log.contains(&format!("publication {publication} was dropped"))
            && log.contains(&format!("pg_replication_slot_advance('{slot}'")),
        "the error names the publication and the way out:\n{}",
        tail(&log, 4000)
    );
    if let Some(st) = w.exited() {
        assert!(!st.success(), "a failed pipeline exits non-zero");
    }
    // walcast did not recreate it (that would hide the gap).
    let recreated = publication_exists(&db, &publication).await;
    assert!(!recreated, "walcast recreated the publication by itself");
    let ev = w.events();
    assert_eq!(ev.len(), 10, "exactly the changes before the drop");
    w.kill9();

    // The way out the message gives works: recreate, skip the gap, restart.
    db.exec(&format!(
        "CREATE PUBLICATION {publication} FOR TABLE t;
         SELECT pg_replication_slot_advance('{slot}', pg_current_wal_lsn());
         INSERT INTO t VALUES (12, 'after the fix')"
    ))
    .await;
    w.spawn();
    let ev = w
        .wait_events("the row after the fix", WAIT, |ev| {
            ev.iter().any(|e| e["value"]["after"]["id"] == 12)
        })
        .await;
    assert!(
        !ev.iter().any(|e| e["value"]["after"]["id"] == 11),
        "the change inside the gap is skipped, as the message says"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publication_dropped_before_a_reconnect_is_not_recreated_by_it() {
    let (db, mut w, publication) = streaming_t("wc_droppub2", "droppub2").await;
    // The publication and the slot are both named after the pipeline.
    let slot = publication.clone();
    db.exec("INSERT INTO t VALUES (1, 'a')").await;
    w.wait_events("1 event", WAIT, |ev| !ev.is_empty()).await;
    // No change follows the drop, so the walsender has nothing to fail on;
    // the connection is cut instead (a transient error: walcast reconnects
    // and finds the publication missing).
    db.exec(&format!("DROP PUBLICATION {publication}")).await;
    db.exec(&format!(
        "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = '{slot}'"
    ))
    .await;
    w.wait_failed("the publication missing at reconnect", WAIT)
        .await;
    let log = w.log();
    assert!(
        log.contains(&format!("publication {publication} disappeared"))
            && log.contains("pg_replication_slot_advance"),
        "{}",
        tail(&log, 3000)
    );
    let recreated = publication_exists(&db, &publication).await;
    assert!(!recreated, "walcast recreated the publication on reconnect");
}
