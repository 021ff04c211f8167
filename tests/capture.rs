//! End-to-end capture against a real Postgres (issue: capture).
//! Run with the stack's settings: `eval "$(deploy/local/stack env)"`.

mod support;

use std::time::Duration;

use serde_json::{json, Value};
use support::*;

const WAIT: Duration = Duration::from_secs(60);

fn ops(ev: &[Value]) -> Vec<String> {
    ev.iter()
        .map(|e| {
            format!(
                "{}:{}",
                e["value"]["source"]["table"].as_str().unwrap_or("?"),
                e["value"]["op"].as_str().unwrap_or("?")
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interleaved_transactions_give_ordered_events_per_replica_identity() {
    let db = TestDb::new("wc_interleave").await;
    db.exec(
        "CREATE TABLE ta (id int PRIMARY KEY, v text);
         CREATE TABLE tb (id int PRIMARY KEY, v text); ALTER TABLE tb REPLICA IDENTITY FULL;
         CREATE TABLE tc (k int, v text); ALTER TABLE tc REPLICA IDENTITY FULL;",
    )
    .await;
    let w = Walcast::start_with(|out, admin| {
        file_pipeline_config(
            "interleave",
            &db.name,
            &["public.ta", "public.tb", "public.tc"],
            r#"keyless_tables = ["public.tc"]"#,
            out,
            admin,
        )
    });
    w.wait_state("streaming", WAIT).await;

    // Two sessions interleave; the second commits first.
    let s1 = connect(&db.name).await;
    let s2 = connect(&db.name).await;
    s1.batch_execute("BEGIN; INSERT INTO ta VALUES (1, 'a1'); INSERT INTO tb VALUES (1, 'b1');")
        .await
        .unwrap();
    s2.batch_execute("BEGIN; INSERT INTO ta VALUES (2, 'a2'); INSERT INTO tc VALUES (7, 'c7');")
        .await
        .unwrap();
    s1.batch_execute("INSERT INTO ta VALUES (3, 'a3');")
        .await
        .unwrap();
    s2.batch_execute("COMMIT;").await.unwrap();
    s1.batch_execute("COMMIT;").await.unwrap();
    db.exec(
        "BEGIN;
         UPDATE ta SET v = 'a1x' WHERE id = 1;
         UPDATE ta SET id = 10 WHERE id = 2;
         DELETE FROM ta WHERE id = 3;
         UPDATE tb SET v = 'b1x' WHERE id = 1;
         UPDATE tc SET v = 'c7x' WHERE k = 7;
         COMMIT;
         DELETE FROM tb WHERE id = 1;
         DELETE FROM tc WHERE k = 7;
         TRUNCATE ta;",
    )
    .await;

    let ev = w.wait_events("14 events", WAIT, |e| e.len() >= 14).await;
    assert_eq!(
        ops(&ev),
        [
            "ta:c", "tc:c", // session 2 committed first
            "ta:c", "tb:c", "ta:c", // then session 1, in statement order
            "ta:u", "ta:d", "ta:c", "ta:d", "tb:u",
            "tc:u", // a key change is a delete and a create
            "tb:d", "tc:d", "ta:t",
        ]
    );
    let v = |i: usize| &ev[i]["value"];
    // Transactions: one id and commit LSN per transaction, orders within.
    assert_eq!(v(0)["transaction"]["id"], v(1)["transaction"]["id"]);
    assert_ne!(v(1)["transaction"]["id"], v(2)["transaction"]["id"]);
    assert_eq!(v(4)["transaction"]["total_order"], 3);
    assert_eq!(v(4)["transaction"]["data_collection_order"], 2);
    assert!(v(2)["source"]["commit_lsn"].as_u64() > v(0)["source"]["commit_lsn"].as_u64());
    // Inserts: no before, full after.
    assert_eq!(v(2)["before"], Value::Null);
    assert_eq!(v(2)["after"], json!({"id": 1, "v": "a1"}));
    // DEFAULT identity: no before when the key is unchanged...
    assert_eq!(v(5)["before"], Value::Null);
    assert_eq!(v(5)["after"], json!({"id": 1, "v": "a1x"}));
    // ...a key change: delete of the old key, create of the new one...
    assert_eq!(v(6)["before"], json!({"id": 2, "v": null}));
    assert_eq!(v(6)["after"], Value::Null);
    assert_eq!(ev[6]["key"], json!({"id": 2}));
    assert_eq!(v(7)["before"], Value::Null);
    assert_eq!(v(7)["after"], json!({"id": 10, "v": "a2"}));
    assert_eq!(ev[7]["key"], json!({"id": 10}));
    // ...and the old key on delete.
    assert_eq!(v(8)["before"], json!({"id": 3, "v": null}));
    assert_eq!(v(8)["after"], Value::Null);
    // FULL identity: the whole old row.
    assert_eq!(v(9)["before"], json!({"id": 1, "v": "b1"}));
    assert_eq!(v(10)["before"], json!({"k": 7, "v": "c7"}));
    assert_eq!(v(11)["before"], json!({"id": 1, "v": "b1x"}));
    assert_eq!(v(12)["before"], json!({"k": 7, "v": "c7x"}));
    // Keys: the primary key; none for the key-less table or a truncate.
    assert_eq!(ev[1]["key"], Value::Null);
    assert_eq!(ev[13]["key"], Value::Null);
    assert_eq!(v(13)["before"], Value::Null);
    assert_eq!(v(0)["source"]["db"], db.name.as_str());
    assert_eq!(v(0)["source"]["name"], "interleave");
    assert_eq!(v(0)["source"]["schema"], "public");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_type_round_trips_from_sql_to_its_value() {
    let db = TestDb::new("wc_types").await;
    db.exec(
        "CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
         CREATE DOMAIN posint AS integer CHECK (VALUE > 0);
         CREATE TABLE types (
            id int PRIMARY KEY, b bool, i2 int2, i4 int4, i8 int8, f4 float4, f8 float8,
            n numeric(12,2), nu numeric, t text, vc varchar(10), c char(3), nm name, by bytea,
            u uuid, j json, jb jsonb, d date, ti time, ttz timetz, ts timestamp, tstz timestamptz,
            iv interval, ip inet, cidr_ cidr, mac macaddr, m money, e mood, dom posint,
            ai int[], at text[], big text)",
    )
    .await;
    let w = Walcast::start_with(|out, admin| {
        file_pipeline_config("types", &db.name, &["public.types"], "", out, admin)
    });
    w.wait_state("streaming", WAIT).await;
    db.exec(
        r#"INSERT INTO types VALUES (
            1, true, -32768, 2147483647, -9223372036854775808, 1.5, -2.25e-300,
            -1234567890.12, 'NaN', 'tëxt', 'var', 'ab', 'nm', '\x00ff',
            'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '{"a": [1, 2]}', '{"b": null}', '2024-02-29', '23:59:59.999999',
            '10:00:00+02', '2000-01-01 00:00:00.5', 'infinity', '1 year 2 mons -3 days 04:05:06.5', '192.168.0.1/24',
            '10.0.0.0/8', '08:00:2b:01:02:03', '-1234.56', 'happy', 42,
            '{1,NULL,3}', '{"a b","c\"d",NULL}', NULL);
         INSERT INTO types (id) VALUES (2);
         INSERT INTO types (id, f8, nu, tstz, d) VALUES (3, 'Infinity', '-Infinity', '-infinity', '0044-03-15 BC');
         INSERT INTO types (id, big) VALUES (4, (SELECT string_agg(md5(i::text), '') FROM generate_series(1, 40000) i));
         UPDATE types SET t = 'changed' WHERE id = 4;"#,
    )
    .await;
    let ev = w.wait_events("5 events", WAIT, |e| e.len() >= 5).await;
    let a = &ev[0]["value"]["after"];
    let expect = json!({
        "id": 1, "b": true, "i2": -32768, "i4": 2147483647, "i8": i64::MIN, "f4": 1.5, "f8": -2.25e-300,
        "n": "-1234567890.12", "nu": "NaN", "t": "tëxt", "vc": "var", "c": "ab ", "nm": "nm", "by": "AP8=",
        "u": "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", "j": "{\"a\": [1, 2]}", "jb": "{\"b\": null}",
        "d": 19782, "ti": 86_399_999_999i64, "ttz": "08:00:00Z", "ts": 946_684_800_500_000i64,
        "tstz": "infinity",
        "iv": (14.0f64 * 30.4375 * 86_400_000_000.0) as i64 - 3 * 86_400_000_000 + 14_706_500_000,
        "ip": "192.168.0.1/24", "cidr_": "10.0.0.0/8", "mac": "08:00:2b:01:02:03", "m": "-1234.56",
        "e": "happy", "dom": 42, "ai": [1, null, 3], "at": ["a b", "c\"d", null], "big": null
    });
    for (k, v) in expect.as_object().unwrap() {
        assert_eq!(&a[k], v, "column {k}");
    }
    // NULL everywhere but the key.
    let nulls = &ev[1]["value"]["after"];
    assert!(
        nulls
            .as_object()
            .unwrap()
            .iter()
            .all(|(k, v)| k == "id" || v.is_null()),
        "{nulls}"
    );
    let ext = &ev[2]["value"]["after"];
    assert_eq!(ext["f8"], "Infinity");
    assert_eq!(ext["nu"], "-Infinity");
    assert_eq!(ext["tstz"], "-infinity");
    assert_eq!(
        ext["d"], -735_160,
        "44 BC as days since 1970, as Postgres counts them"
    );
    // A TOASTed value over 1 MB arrives whole on insert, and is marked
    // unavailable (never null) when an update leaves it unchanged.
    assert_eq!(
        ev[3]["value"]["after"]["big"].as_str().unwrap().len(),
        1_280_000
    );
    assert_eq!(
        ev[4]["value"]["after"]["big"],
        "__debezium_unavailable_value"
    );
    assert_eq!(ev[4]["value"]["after"]["t"], "changed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_then_restart_loses_nothing_and_replays_only_after_the_confirmed_lsn() {
    let db = TestDb::new("wc_crash").await;
    db.exec("CREATE TABLE c (id int PRIMARY KEY)").await;
    let mut w = Walcast::start_with(|out, admin| {
        file_pipeline_config("crash", &db.name, &["public.c"], "", out, admin)
    });
    w.wait_state("streaming", WAIT).await;
    const N: i32 = 600;
    let writer = {
        let name = db.name.clone();
        tokio::spawn(async move {
            let c = connect(&name).await;
            for i in 1..=N {
                c.execute("INSERT INTO c VALUES ($1)", &[&i]).await.unwrap();
            }
        })
    };
    w.wait_events("some events", WAIT, |e| e.len() >= 100).await;
    w.kill9();
    let confirmed_at_crash = db
        .confirmed_flush("walcast_crash")
        .await
        .expect("slot exists");
    let before_restart = w.events().len();
    w.spawn();
    // Streaming again before anything else: when the writer had finished
    // before the kill (a fast server), every row is already in the file,
    // and a SIGTERM in the new process's first milliseconds (before it
    // catches signals) killed it by the signal (seen on Postgres 17).
    w.wait_state("streaming", WAIT).await;
    writer.await.unwrap();
    let ev = w
        .wait_events("every row", WAIT, |e| {
            let ids: std::collections::HashSet<i64> = e
                .iter()
                .filter_map(|x| x["value"]["after"]["id"].as_i64())
                .collect();
            ids.len() == N as usize
        })
        .await;
    // Duplicates: only events whose commit is after what was confirmed.
    let mut seen = std::collections::HashSet::new();
    let mut dups = 0;
    for e in &ev {
        let id = e["value"]["after"]["id"].as_i64().unwrap();
        if !seen.insert(id) {
            dups += 1;
            let lsn = e["value"]["source"]["commit_lsn"].as_u64().unwrap();
            assert!(
                lsn >= confirmed_at_crash,
                "row {id} replayed from {lsn}, before the confirmed {confirmed_at_crash}"
            );
        }
    }
    assert!(before_restart >= 100);
    eprintln!("kill -9 at {before_restart} events; {dups} replayed after restart");
    let st = w.terminate();
    assert!(
        st.success(),
        "walcast exited with {st} on SIGTERM:\n{}",
        tail(&w.log(), 4000)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_to_uncaptured_tables_do_not_pin_wal() {
    let db = TestDb::new("wc_idle").await;
    db.exec("CREATE TABLE captured (id int PRIMARY KEY); CREATE TABLE noise (id serial PRIMARY KEY, v text)").await;
    let w = Walcast::start_with(|out, admin| {
        file_pipeline_config("idle", &db.name, &["public.captured"], "", out, admin)
    });
    w.wait_state("streaming", WAIT).await;
    let start = db.confirmed_flush("walcast_idle").await.unwrap();
    for _ in 0..5 {
        db.exec("INSERT INTO noise (v) SELECT repeat('x', 200) FROM generate_series(1, 20000)")
            .await;
    }
    let target = db.current_wal().await;
    assert!(target > start + 5_000_000, "the noise wrote WAL");
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let now = db.confirmed_flush("walcast_idle").await.unwrap();
        if now >= target {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "confirmed_flush_lsn stuck at {now}, WAL at {target}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(w.events().is_empty(), "no event from an uncaptured table");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_and_exits_zero() {
    let db = TestDb::new("wc_term").await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY)").await;
    let mut w = Walcast::start_with(|out, admin| {
        file_pipeline_config("term", &db.name, &["public.t"], "", out, admin)
    });
    w.wait_state("streaming", WAIT).await;
    db.exec("INSERT INTO t SELECT generate_series(1, 1000)")
        .await;
    let ev = w
        .wait_events("1000 events", WAIT, |e| e.len() >= 1000)
        .await;
    let commit = ev[999]["value"]["source"]["commit_lsn"].as_u64().unwrap();
    assert!(w.terminate().success(), "exit 0 on SIGTERM");
    let confirmed = db.confirmed_flush("walcast_term").await.unwrap();
    assert!(confirmed > commit, "the final status update confirmed {confirmed}, not past the last commit at {commit}; log:\n{}", w.log());
}
