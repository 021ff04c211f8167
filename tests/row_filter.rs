//! Row filters end to end (issue 24): a table's `row_filter` becomes the
//! publication's `WHERE`, and the initial snapshot, the stream and an
//! incremental snapshot deliver exactly the rows `SELECT ... WHERE filter`
//! returns, to Kafka and to a Redis sink of the same pipeline. An update
//! moving a row out of the filter reaches the sinks as a delete, one moving
//! a row in as a create. A filter the publication already has in another
//! form is changed; one Postgres would enforce against the application's
//! UPDATEs (a column outside the replica identity) is refused by `check`.
//! Run with the stack's settings: `eval "$(deploy/local/stack env)"`.

mod support;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::*;

const WAIT: Duration = Duration::from_secs(60);
const FILTER: &str = "region = 'eu' AND amount > 10";
/// Every id the workload ever uses, for asking Redis.
const IDS: std::ops::RangeInclusive<i64> = 1..=40;

async fn filtered_ids(db: &TestDb) -> BTreeSet<i64> {
    connect(&db.name)
        .await
        .query(&format!("SELECT id FROM orders WHERE {FILTER}"), &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get::<_, i32>(0) as i64)
        .collect()
}

/// Applies the topic's events in order: the ids a sink holds.
fn fold(records: &[(Value, Option<Value>)]) -> BTreeSet<i64> {
    let mut ids = BTreeSet::new();
    for v in records.iter().filter_map(|(_, v)| v.as_ref()) {
        match v["op"].as_str().unwrap() {
            "d" => {
                ids.remove(&v["before"]["id"].as_i64().unwrap());
            }
            _ => {
                ids.insert(v["after"]["id"].as_i64().unwrap());
            }
        }
    }
    ids
}

fn ops_of(records: &[(Value, Option<Value>)], id: i64) -> Vec<String> {
    records
        .iter()
        .filter_map(|(_, v)| v.as_ref())
        .filter(|v| v["after"]["id"] == id || v["before"]["id"] == id)
        .map(|v| v["op"].as_str().unwrap().to_string())
        .collect()
}

async fn redis_ids(redis: &mut redis::aio::MultiplexedConnection, prefix: &str) -> BTreeSet<i64> {
    let mut ids = BTreeSet::new();
    for id in IDS {
        let v: Option<String> = redis::cmd("GET")
            .arg(format!("{prefix}:{id}"))
            .query_async(redis)
            .await
            .unwrap();
        if v.is_some() {
            ids.insert(id);
        }
    }
    ids
}

async fn until(what: &str, w: &Walcast, mut f: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !f().await {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}:\n{}",
            tail(&w.log(), 3000)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_and_stream_deliver_exactly_the_filtered_rows_to_kafka_and_redis() {
    if var("WALCAST_TEST_PG_VERSION").parse::<u32>().unwrap_or(15) < 15 {
        eprintln!(
            "SKIPPED: publication row filters need Postgres 15+ (the refusal is tested instead)"
        );
        return;
    }
    let db = TestDb::new("wc_rowf").await;
    let prefix = unique("rowf");
    let pipeline = "rowf";
    // REPLICA IDENTITY FULL: the filter uses non-key columns, which Postgres
    // allows for UPDATE and DELETE only when the old row is fully logged.
    // The publication exists already, with another filter: walcast changes it.
    db.exec(&format!(
        "CREATE TABLE orders (id int PRIMARY KEY, region text NOT NULL, amount int NOT NULL);
         ALTER TABLE orders REPLICA IDENTITY FULL;
         INSERT INTO orders SELECT i, CASE WHEN i % 3 = 0 THEN 'us' ELSE 'eu' END, i * 2 FROM generate_series(1, 20) i;
         CREATE PUBLICATION walcast_{pipeline} FOR TABLE orders WHERE (amount > 0) WITH (publish_via_partition_root = true);"
    ))
    .await;
    let cfg = KafkaCapture::new(pipeline, &db.name, &prefix, &["public.orders"])
        .source("snapshot_chunk_rows = 3")
        .pipeline(&format!(
            "[pipelines.{pipeline}.table.\"public.orders\"]\nrow_filter = \"{FILTER}\""
        ));
    let redis_sink = format!(
        "[[pipelines.{pipeline}.sinks]]\ntype = \"redis\"\nurls = [\"{}\"]\nmode = {{ type = \"upsert\", key_template = \"{prefix}:{{id}}\" }}\n",
        var("WALCAST_TEST_REDIS_URL")
    );
    let text = |admin: &str| cfg.toml(admin) + &redis_sink;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("walcast.toml");
    std::fs::write(&path, text("127.0.0.1:1")).unwrap();
    let (ok, out) = check(&path);
    assert!(ok, "{out}");
    assert!(
        out.contains("would change the row filter of public.orders"),
        "check does not show the drift: {out}"
    );

    let snapshot_rows = filtered_ids(&db).await;
    assert!(snapshot_rows.len() > 5 && snapshot_rows.len() < 20);
    let mut w = Walcast::start_with(|_, admin| text(admin));
    w.wait_state("streaming", WAIT).await;
    let rowfilter: String = connect(&db.name)
        .await
        .query_one(
            &format!(
                "SELECT rowfilter FROM pg_publication_tables WHERE pubname = 'walcast_{pipeline}'"
            ),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(rowfilter, "((region = 'eu'::text) AND (amount > 10))");

    let topic = format!("{prefix}.public.orders");
    let snap = consume_json(&topic, WAIT, |r| r.len() >= snapshot_rows.len());
    let read: BTreeSet<i64> = snap
        .iter()
        .filter_map(|(_, v)| v.as_ref())
        .filter(|v| v["op"] == "r")
        .map(|v| v["after"]["id"].as_i64().unwrap())
        .collect();
    assert_eq!(
        read, snapshot_rows,
        "the initial snapshot read other rows than the filter's"
    );

    // 2 (eu, 4) is out of the filter and moves in; 4 (eu, 8) too, by its
    // amount; 5 (eu, 10) stays out; 7 (eu, 14) moves out by its region,
    // 8 (eu, 16) by its amount; 10 (eu, 20) is deleted; inserts in and out.
    db.exec(
        "UPDATE orders SET amount = 50 WHERE id = 2;
         UPDATE orders SET amount = 11 WHERE id = 4;
         UPDATE orders SET amount = 9 WHERE id = 5;
         UPDATE orders SET region = 'us' WHERE id = 7;
         UPDATE orders SET amount = 1 WHERE id = 8;
         DELETE FROM orders WHERE id = 10;
         DELETE FROM orders WHERE id = 3;
         INSERT INTO orders VALUES (21, 'eu', 100), (22, 'us', 100), (23, 'eu', 5);
         UPDATE orders SET amount = amount + 1 WHERE id IN (11, 12);",
    )
    .await;
    let expected = filtered_ids(&db).await;
    let records = consume_json(&topic, WAIT, |r| fold(r) == expected);
    assert_eq!(
        fold(&records),
        expected,
        "Kafka, folded, against SELECT ... WHERE"
    );
    assert_eq!(
        ops_of(&records, 2),
        ["c"],
        "moved into the filter: a create"
    );
    assert_eq!(
        ops_of(&records, 7),
        ["r", "d"],
        "moved out of the filter: a delete"
    );
    assert_eq!(ops_of(&records, 8), ["r", "d"]);
    for never in [3, 5, 12, 22, 23] {
        assert!(
            ops_of(&records, never).is_empty(),
            "row {never} never matched the filter, yet: {:?}",
            ops_of(&records, never)
        );
    }

    let mut redis = redis::Client::open(var("WALCAST_TEST_REDIS_URL"))
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    until("Redis to hold the filtered rows", &w, async || {
        redis_ids(&mut redis, &prefix).await == expected
    })
    .await;

    // An incremental snapshot reads the filtered rows only, chunk by chunk.
    let before = records.len();
    let (ok, out) = cli("snapshot", &w.config, &["public.orders"]);
    assert!(ok, "{out}");
    let all = consume_json(&topic, WAIT, |r| {
        r.len() >= before + expected.len()
            && r[before..]
                .iter()
                .filter_map(|(_, v)| v.as_ref())
                .filter(|v| v["source"]["snapshot"] == "incremental")
                .count()
                >= expected.len()
    });
    let incremental: Vec<i64> = all[before..]
        .iter()
        .filter_map(|(_, v)| v.as_ref())
        .filter(|v| v["source"]["snapshot"] == "incremental")
        .map(|v| v["after"]["id"].as_i64().unwrap())
        .collect();
    assert_eq!(
        incremental.iter().copied().collect::<BTreeSet<_>>(),
        expected,
        "the incremental snapshot read other rows than the filter's"
    );
    assert_eq!(
        incremental.len(),
        expected.len(),
        "a row read twice: {incremental:?}"
    );
    assert_eq!(redis_ids(&mut redis, &prefix).await, expected);
    assert!(w.terminate().success());
    // Stopped (the slot is free): check shows the filter, and no change.
    let (ok, out) = check(&w.config);
    assert!(
        ok && out.contains(
            "table public.orders: OK, row filter WHERE ((region = 'eu'::text) AND (amount > 10))"
        ),
        "{out}"
    );
    assert!(!out.contains("would change the row filter"), "{out}");
}

/// A filter on a column outside the replica identity would make Postgres
/// refuse the application's UPDATEs and DELETEs: `check` refuses it and
/// says what to do; an invalid filter is refused with Postgres's reason; a
/// partitioned table is filtered through its root only; a table of a schema
/// captured whole cannot be filtered. On Postgres 14 any filter is refused,
/// naming the version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filters_postgres_would_enforce_on_writers_or_reject_are_refused_by_check() {
    let db = TestDb::new("wc_rowfbad").await;
    db.exec("CREATE TABLE acct (id int PRIMARY KEY, region text)")
        .await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("walcast.toml");
    let write = |filter: &str| {
        let cfg = KafkaCapture::new("rowfbad", &db.name, "x", &["public.acct"]).pipeline(&format!(
            "[pipelines.rowfbad.table.\"public.acct\"]\nrow_filter = \"{filter}\""
        ));
        std::fs::write(&path, cfg.toml("127.0.0.1:1")).unwrap();
    };
    let old = var("WALCAST_TEST_PG_VERSION").parse::<u32>().unwrap_or(15) < 15;
    write("region = 'eu'");
    let (ok, out) = check(&path);
    assert!(!ok, "{out}");
    if old {
        assert!(
            out.contains("public.acct") && out.contains("Postgres 15 or later"),
            "{out}"
        );
        return;
    }
    assert!(
        out.contains("region")
            && out.contains("replica identity")
            && out.contains("REPLICA IDENTITY FULL"),
        "{out}"
    );
    write("id > 100");
    let (ok, out) = check(&path);
    assert!(ok && out.contains("row filter WHERE (id > 100)"), "{out}");
    write("now() > '2020-01-01'");
    let (ok, out) = check(&path);
    assert!(
        !ok && out.contains("not a valid publication row filter")
            && out.contains("mutable functions"),
        "{out}"
    );
    // Nothing was left behind by the checks.
    let pubs: i64 = connect(&db.name)
        .await
        .query_one("SELECT count(*) FROM pg_publication", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(pubs, 0);
    // A partitioned table: filtered through its root only.
    db.exec(
        "CREATE TABLE pt (id int, r text, PRIMARY KEY (id, r)) PARTITION BY LIST (r);
         CREATE TABLE pt_a PARTITION OF pt FOR VALUES IN ('a');",
    )
    .await;
    let partitioned = |extra: &str| {
        let cfg = KafkaCapture::new("rowfbad", &db.name, "x", &["public.pt"])
            .source(extra)
            .pipeline("[pipelines.rowfbad.table.\"public.pt\"]\nrow_filter = \"r = 'a'\"");
        std::fs::write(&path, cfg.toml("127.0.0.1:1")).unwrap();
        check(&path)
    };
    let (ok, out) = partitioned("");
    assert!(
        ok && out.contains("table public.pt: OK, row filter WHERE (r = 'a'::text)"),
        "{out}"
    );
    let (ok, out) = partitioned("publish_via_partition_root = false");
    assert!(
        !ok && out.contains("publish_via_partition_root = true") && out.contains("public.pt"),
        "{out}"
    );
    let whole = KafkaCapture::new("rowfbad", &db.name, "x", &[])
        .source("schemas = [\"public\"]")
        .pipeline("[pipelines.rowfbad.table.\"public.acct\"]\nrow_filter = \"id > 1\"");
    std::fs::write(&path, whole.toml("127.0.0.1:1")).unwrap();
    let (ok, out) = check(&path);
    assert!(
        !ok && out.contains("row_filter") && out.contains("FOR TABLES IN SCHEMA"),
        "{out}"
    );
}
