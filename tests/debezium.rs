//! Debezium compatibility: the same workload captured by Debezium 3.6.1 (on
//! Kafka Connect, JSON converter) and by walcast in JSON format must agree
//! field by field on key, before, after, op and the source fields both
//! have. A field present on one side and absent on the other is a failure
//! (named by its path), in the images, the key, `source` and the envelope,
//! except the one-sided fields listed below (ONLY_*). Known, deliberate
//! differences are listed in KNOWN_DIFFERENCES, ONLY_* and in the README;
//! anything else fails the test.
//! Needs the stack with Connect: `deploy/local/stack up --with debezium`.

mod support;

use std::time::Duration;

use serde_json::{json, Value};
use support::*;

const WAIT: Duration = Duration::from_secs(120);

/// Source fields both produce with the same meaning.
const SOURCE_FIELDS: &[&str] = &[
    "connector",
    "db",
    "schema",
    "table",
    "txId",
    "lsn",
    "snapshot",
    // Commit time, as Postgres gives it (microseconds), three ways.
    "ts_ms",
    "ts_us",
    "ts_ns",
    "xmin",
];

/// Fields one side has and the other does not (README, "The event"). Any
/// other field present on one side only is a failure.
///
/// `sequence` (the previous commit's LSN and this one's) and `commit_lsn`
/// are deliberate. `origin` and `origin_lsn` (Debezium 3.6.1; null unless
/// the change came through a replication origin) are a gap: walcast decodes
/// pgoutput's Origin message but does not carry it into events yet. Listed
/// so that any further difference fails; remove an entry when walcast
/// writes the field. (`ts_us`/`ts_ns` of the envelope and `xmin`, listed
/// here until 2026-12-06, are written now.)
const ONLY_DEBEZIUM_SOURCE: &[&str] = &["sequence", "origin", "origin_lsn"];
const ONLY_WALCAST_SOURCE: &[&str] = &["commit_lsn"];
const ONLY_DEBEZIUM_ENVELOPE: &[&str] = &[];
const ONLY_WALCAST_ENVELOPE: &[&str] = &[];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn walcast_json_matches_debezium_field_by_field() {
    let db = TestDb::new("wc_dbz").await;
    db.exec(
        "CREATE TYPE color AS ENUM ('red', 'green');
         CREATE TABLE items (
            id bigint PRIMARY KEY, qty int, small smallint, flag bool, price numeric(12,2), ratio float8, name text,
            code char(3), tags text[], payload jsonb, uid uuid, raw bytea, day date, at_time time,
            created timestamp, updated timestamptz, c color);
         CREATE TABLE full_rows (id int PRIMARY KEY, note text); ALTER TABLE full_rows REPLICA IDENTITY FULL;
         CREATE TABLE specials (id int PRIMARY KEY, n numeric);",
    )
    .await;
    let dbz_prefix = unique("dbz");
    let wc_prefix = unique("wcj");
    let connector = unique("dbz_conn");
    // Debezium first: wait until its slot streams.
    let _guard = start_connector(
        &db,
        &connector,
        json!({
            "connector.class": "io.debezium.connector.postgresql.PostgresConnector",
            "plugin.name": "pgoutput",
            "database.hostname": "127.0.0.1",
            "database.port": pg_port().to_string(),
            "database.user": "postgres",
            "database.password": "unused",
            "database.dbname": db.name,
            "topic.prefix": dbz_prefix,
            "table.include.list": "public.items,public.full_rows,public.specials",
            "slot.name": format!("{connector}_slot"),
            "publication.name": format!("{connector}_pub"),
            "publication.autocreate.mode": "filtered",
            "snapshot.mode": "no_data",
            "decimal.handling.mode": "string",
            "key.converter": "org.apache.kafka.connect.json.JsonConverter",
            "key.converter.schemas.enable": "false",
            "value.converter": "org.apache.kafka.connect.json.JsonConverter",
            "value.converter.schemas.enable": "false",
            "skipped.operations": "none",
        }),
        WAIT,
    )
    .await;
    let w = Walcast::start_with(|_, admin| {
        format!(
            r#"[admin]
listen = "{admin}"
[pipelines.compat]
kind = "capture"
topic_prefix = "{wc_prefix}"
format = "json"
[pipelines.compat.source]
port = {port}
database = "{db}"
user = "postgres"
tables = ["public.items", "public.full_rows", "public.specials"]
[[pipelines.compat.sinks]]
type = "kafka"
bootstrap_servers = "{bootstrap}"
json_special_numeric = "debezium"
"#,
            port = pg_port(),
            db = db.name,
            bootstrap = var("WALCAST_TEST_KAFKA_BOOTSTRAP")
        )
    });
    w.wait_state("streaming", WAIT).await;

    db.exec(
        r#"INSERT INTO items VALUES
            (1, 10, -3, true, 12.50, 0.25, 'apple', 'abc', '{"x","y z"}', '{"k": [1, 2]}', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11',
             '\x0102ff', '2024-02-29', '13:14:15.123456', '2024-01-02 03:04:05.5', '2024-01-02 03:04:05.123+02', 'red'),
            (2, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL),
            (3, 1, 1, false, -0.01, -1e10, 'pear', 'x', '{}', 'null', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a12',
             '\x', '1970-01-01', '00:00:00', '1970-01-01 00:00:00', '1970-01-01 00:00:00+00', 'green');
         UPDATE items SET qty = 11, name = 'green apple' WHERE id = 1;
         UPDATE items SET id = 30 WHERE id = 3;
         DELETE FROM items WHERE id = 2;
         INSERT INTO full_rows VALUES (1, 'a');
         UPDATE full_rows SET note = 'b' WHERE id = 1;
         DELETE FROM full_rows WHERE id = 1;
         INSERT INTO specials VALUES (1, 'NaN'), (2, 'Infinity'), (3, '-Infinity'), (4, 1.5);"#,
    )
    .await;

    let mut report = Vec::new();
    let mut mismatches = 0;
    for table in ["items", "full_rows", "specials"] {
        let count = |r: &[(Value, Option<Value>)]| r.iter().filter(|(_, v)| v.is_some()).count();
        let expected = match table {
            "items" => 7,
            "full_rows" => 3,
            _ => 4,
        };
        let dbz = consume_json(&format!("{dbz_prefix}.public.{table}"), WAIT, |r| {
            count(r) >= expected
        });
        let wc = consume_json(&format!("{wc_prefix}.public.{table}"), WAIT, |r| {
            count(r) >= expected
        });
        let dbz: Vec<_> = dbz.into_iter().filter(|(_, v)| v.is_some()).collect();
        let wc: Vec<_> = wc.into_iter().filter(|(_, v)| v.is_some()).collect();
        assert_eq!(
            dbz.len(),
            wc.len(),
            "{table}: Debezium {} events, walcast {}",
            dbz.len(),
            wc.len()
        );
        // Both publish in commit order; compare event by event, per key.
        let mut dbz_sorted = dbz.clone();
        let mut wc_sorted = wc.clone();
        let order = |e: &(Value, Option<Value>)| {
            (
                e.0.to_string(),
                e.1.as_ref().unwrap()["source"]["lsn"].as_u64().unwrap_or(0),
            )
        };
        dbz_sorted.sort_by_key(order);
        wc_sorted.sort_by_key(order);
        for ((dk, dv), (wk, wv)) in dbz_sorted.iter().zip(&wc_sorted) {
            let (dv, wv) = (dv.as_ref().unwrap(), wv.as_ref().unwrap());
            let mut diffs = Vec::new();
            compare_values("key", Some(dk), Some(wk), &mut diffs);
            for field in ["op", "before", "after"] {
                compare_values(field, dv.get(field), wv.get(field), &mut diffs);
            }
            for f in SOURCE_FIELDS {
                compare_values(
                    &format!("source.{f}"),
                    dv["source"].get(*f),
                    wv["source"].get(*f),
                    &mut diffs,
                );
            }
            // The other fields of the envelope and of `source` carry values
            // that differ by nature (times, versions, names): they must be
            // present on both sides, except those listed as one-sided.
            for (what, d, w, only_dbz, only_wc) in [
                ("", dv, wv, ONLY_DEBEZIUM_ENVELOPE, ONLY_WALCAST_ENVELOPE),
                (
                    "source.",
                    &dv["source"],
                    &wv["source"],
                    ONLY_DEBEZIUM_SOURCE,
                    ONLY_WALCAST_SOURCE,
                ),
            ] {
                let (d, w) = (d.as_object(), w.as_object());
                let (Some(d), Some(w)) = (d, w) else {
                    diffs.push(format!("{what}: not an object on both sides"));
                    continue;
                };
                for f in d
                    .keys()
                    .filter(|f| !w.contains_key(*f) && !only_dbz.contains(&f.as_str()))
                {
                    diffs.push(format!(
                        "{what}{f}: only in debezium (= {}), missing from walcast",
                        d[f]
                    ));
                }
                for f in w
                    .keys()
                    .filter(|f| !d.contains_key(*f) && !only_wc.contains(&f.as_str()))
                {
                    diffs.push(format!(
                        "{what}{f}: only in walcast (= {}), missing from debezium",
                        w[f]
                    ));
                }
            }
            for d in diffs {
                mismatches += 1;
                report.push(format!("{table} key={dk} op={}: {d}", dv["op"]));
            }
        }
    }
    assert_eq!(
        mismatches,
        0,
        "walcast and Debezium disagree:\n{}",
        report.join("\n")
    );
}
