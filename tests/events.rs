//! What a capture pipeline publishes besides row changes, end to end
//! through Kafka: heartbeats (and the action query that keeps an idle
//! database's slot moving), schema-change events with the DDL text, and the
//! outbox without a table (`pg_logical_emit_message`).
//! Run with the stack's settings: `eval "$(deploy/local/stack env)"`.

mod support;

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::*;

const WAIT: Duration = Duration::from_secs(60);

/// One record as read: key, value, headers, the producer's timestamp.
#[derive(Debug, Clone)]
struct Record {
    key: Value,
    value: Value,
    headers: Vec<(String, Option<String>)>,
    timestamp_ms: i64,
}

impl Record {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| v.as_deref())
    }
}

/// `walcast check` of a config, before anything runs: its output.
fn checked(toml: &str) -> String {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("walcast.toml");
    std::fs::write(&path, toml).expect("write config");
    let (ok, text) = check(&path);
    assert!(ok, "{text}");
    text
}

/// Reads `topics` from the beginning until `done` holds (checked when the
/// topics go quiet) or `timeout` passes; the records per topic.
fn read(
    topics: &[&str],
    timeout: Duration,
    done: impl Fn(&std::collections::HashMap<String, Vec<Record>>) -> bool,
) -> std::collections::HashMap<String, Vec<Record>> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::message::Headers;
    use rdkafka::Message;
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", var("WALCAST_TEST_KAFKA_BOOTSTRAP"))
        .set("group.id", unique("events"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .set("topic.metadata.refresh.interval.ms", "500")
        .create()
        .expect("consumer");
    consumer.subscribe(topics).expect("subscribe");
    let mut out: std::collections::HashMap<String, Vec<Record>> = Default::default();
    // A topic created after the subscription rebalances the group, which
    // may read a partition again from the start: keep each offset once.
    let mut seen = std::collections::HashSet::new();
    let deadline = Instant::now() + timeout;
    loop {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                if !seen.insert((m.topic().to_string(), m.partition(), m.offset())) {
                    continue;
                }
                let json = |b: Option<&[u8]>| {
                    b.map(|b| serde_json::from_slice(b).expect("JSON"))
                        .unwrap_or(Value::Null)
                };
                let headers = m
                    .headers()
                    .map(|h| {
                        h.iter()
                            .map(|h| {
                                (
                                    h.key.to_string(),
                                    h.value.map(|v| String::from_utf8_lossy(v).into_owned()),
                                )
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                out.entry(m.topic().to_string()).or_default().push(Record {
                    key: json(m.key()),
                    value: json(m.payload()),
                    headers,
                    timestamp_ms: m.timestamp().to_millis().unwrap_or(0),
                });
                continue;
            }
            _ => {
                if done(&out) || Instant::now() > deadline {
                    return out;
                }
            }
        }
    }
}

/// With the captured table idle and nothing else written by the test, the
/// action query's inserts make WAL flow through the slot: its confirmed
/// position passes where the WAL was when streaming began, and a
/// heartbeat record (key `serverName`, value `ts_ms` and the LSN) arrives
/// on Debezium's default topic at each interval, in JSON although the
/// pipeline's format is Avro.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_reach_kafka_and_the_action_query_moves_an_idle_slot() {
    let db = TestDb::new("wc_hb").await;
    db.exec(
        "CREATE TABLE idle (id int PRIMARY KEY);
         CREATE TABLE beats (at timestamptz NOT NULL);",
    )
    .await;
    let prefix = unique("hb");
    let cfg = KafkaCapture::new("hb", &db.name, &prefix, &["public.idle"])
        .avro(&var("WALCAST_TEST_REGISTRY_URL"), "")
        .pipeline("heartbeat = { interval = \"500ms\", action_query = \"INSERT INTO beats VALUES (now())\" }")
        .sink("create_topics = true");
    let text = checked(&cfg.toml("127.0.0.1:1"));
    // A file sink beside Kafka: it takes no notices.
    let mut w = Walcast::start_with(|out, admin| {
        format!(
            "{}[[pipelines.hb.sinks]]\ntype = \"file\"\npath = {:?}\n",
            cfg.toml(admin),
            out.display().to_string()
        )
    });
    w.wait_state("streaming", WAIT).await;
    assert!(
        text.contains(&format!(
            "heartbeat: every 500ms to topic __debezium-heartbeat.{prefix}, after running the action query: INSERT INTO beats VALUES (now())"
        )) && text.contains(&format!(
            "kafka: heartbeats -> topic __debezium-heartbeat.{prefix}: would be created"
        )) && text.contains(&format!("kafka: table public.idle -> topic {prefix}.public.idle")),
        "{text}"
    );
    let slot = "walcast_hb";
    let start = db.current_wal().await;
    w.wait_confirmed(
        &db,
        slot,
        start + 1,
        WAIT,
        "the slot did not move past the WAL position at start",
    )
    .await;
    let topic = format!("__debezium-heartbeat.{prefix}");
    let got = read(&[&topic], WAIT, |r| {
        r.get(&topic).is_some_and(|v| v.len() >= 3)
    });
    let beats = got.get(&topic).cloned().unwrap_or_default();
    assert!(beats.len() >= 3, "{beats:?}\n{}", tail(&w.log(), 3000));
    for b in &beats {
        assert_eq!(b.key, json!({ "serverName": prefix }));
        assert!(
            b.value["ts_ms"].as_i64().unwrap() > 1_600_000_000_000,
            "{b:?}"
        );
        assert!(b.value["lsn"].as_u64().unwrap() > 0, "{b:?}");
        assert!(b.value["confirmed_lsn"].is_u64(), "{b:?}");
    }
    let lsns: Vec<u64> = beats
        .iter()
        .map(|b| b.value["lsn"].as_u64().unwrap())
        .collect();
    assert!(lsns.windows(2).all(|w| w[0] <= w[1]), "{lsns:?}");
    assert!(
        lsns.last() > lsns.first(),
        "the read position moved: {lsns:?}"
    );
    let n: i64 = db
        .client
        .query_one("SELECT count(*) FROM beats", &[])
        .await
        .unwrap()
        .get(0);
    assert!(n >= 3, "the action query ran {n} times");
    assert!(w.events().is_empty(), "the file sink got {:?}", w.events());
    // Nothing of the idle table, and no row-change topic for `beats`.
    let rows = read(
        &[&format!("{prefix}.public.idle")],
        Duration::from_secs(2),
        |_| false,
    );
    assert!(rows.is_empty(), "{rows:?}");
    assert!(w.terminate().success());
}

/// ADD COLUMN, DROP COLUMN and ALTER TYPE under streaming: each becomes an
/// event with the old and new columns, published before the first row of
/// the new shape; the DDL trigger walcast installs adds each statement as
/// an event of its own, before the change it causes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_changes_and_ddl_precede_rows_of_the_new_shape() {
    let db = TestDb::new("wc_sc").await;
    db.exec("CREATE TABLE items (id int PRIMARY KEY, name text NOT NULL);")
        .await;
    let prefix = unique("sc");
    let cfg = KafkaCapture::new("sc", &db.name, &prefix, &["public.items"])
        .pipeline("schema_changes = { ddl_capture = true }")
        .sink("create_topics = true");
    let text = checked(&cfg.toml("127.0.0.1:1"));
    let mut w = Walcast::start_with(|_, admin| cfg.toml(admin));
    w.wait_state("streaming", WAIT).await;
    assert!(
        text.contains(&format!("schema changes: to topic {prefix}.schema-changes"))
            && text.contains(&format!(
                "kafka: schema changes -> topic {prefix}.schema-changes: would be created"
            ))
            && text.contains("ddl_capture: would install event trigger walcast_ddl_capture (needs a superuser): CREATE OR REPLACE FUNCTION"),
        "{text}"
    );
    for sql in [
        "INSERT INTO items VALUES (1, 'one')",
        "ALTER TABLE items ADD COLUMN price numeric(10,2)",
        "INSERT INTO items VALUES (2, 'two', 2.50)",
        "ALTER TABLE items DROP COLUMN name",
        "INSERT INTO items VALUES (3, 3.50)",
        "ALTER TABLE items ALTER COLUMN price TYPE text",
        "INSERT INTO items VALUES (4, 'four')",
        // Not a change a consumer sees: no event (its DDL text still is one).
        "ALTER TABLE items ALTER COLUMN price SET DEFAULT 'x'",
        "INSERT INTO items VALUES (5, DEFAULT)",
    ] {
        db.exec(sql).await;
        // walcast describes a table from the live catalog when it decodes
        // the Relation message: let it decode each shape before the next
        // DDL, or nullability of a column dropped since is unknown.
        if sql.starts_with("INSERT") {
            let at = db.current_wal().await;
            w.wait_confirmed(&db, "walcast_sc", at, WAIT, "row not delivered")
                .await;
        }
    }
    let changes = format!("{prefix}.schema-changes");
    let data = format!("{prefix}.public.items");
    let got = read(&[&changes, &data], WAIT, |r| {
        r.get(&changes).is_some_and(|v| v.len() >= 7) && r.get(&data).is_some_and(|v| v.len() >= 5)
    });
    let events = got.get(&changes).cloned().unwrap_or_default();
    let rows = got.get(&data).cloned().unwrap_or_default();
    assert_eq!(rows.len(), 5, "{rows:?}\n{}", tail(&w.log(), 3000));
    let ddl: Vec<&Record> = events.iter().filter(|e| e.value["type"] == "DDL").collect();
    let alters: Vec<&Record> = events
        .iter()
        .filter(|e| e.value["type"] == "ALTER")
        .collect();
    assert_eq!(
        ddl.iter()
            .map(|e| e.value["ddl"].as_str().unwrap())
            .collect::<Vec<_>>(),
        vec![
            "ALTER TABLE items ADD COLUMN price numeric(10,2)",
            "ALTER TABLE items DROP COLUMN name",
            "ALTER TABLE items ALTER COLUMN price TYPE text",
            "ALTER TABLE items ALTER COLUMN price SET DEFAULT 'x'",
        ],
        "{events:#?}"
    );
    assert_eq!(alters.len(), 3, "{events:#?}\n{}", tail(&w.log(), 6000));
    let cols = |e: &Record, side: &str| -> Vec<(String, String, bool, bool)> {
        e.value[side]["columns"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| {
                (
                    c["name"].as_str().unwrap().to_string(),
                    c["type"].as_str().unwrap().to_string(),
                    c["nullable"].as_bool().unwrap(),
                    c["key"].as_bool().unwrap(),
                )
            })
            .collect()
    };
    let c =
        |n: &str, t: &str, nullable: bool, key: bool| (n.to_string(), t.to_string(), nullable, key);
    let id = c("id", "integer", false, true);
    let name = c("name", "text", false, false);
    assert_eq!(cols(alters[0], "before"), vec![id.clone(), name.clone()]);
    let price = c("price", "numeric(10,2)", true, false);
    assert_eq!(
        cols(alters[0], "after"),
        vec![id.clone(), name.clone(), price.clone()]
    );
    assert_eq!(alters[0].value["changes"]["added"], json!(["price"]));
    assert_eq!(cols(alters[1], "after"), vec![id.clone(), price.clone()]);
    assert_eq!(alters[1].value["changes"]["dropped"], json!(["name"]));
    assert_eq!(
        cols(alters[2], "after"),
        vec![id.clone(), c("price", "text", true, false)]
    );
    assert_eq!(alters[2].value["changes"]["altered"], json!(["price"]));
    for a in &alters {
        assert_eq!(
            a.value["table"],
            json!({"schema": "public", "name": "items"})
        );
        assert_eq!(a.key, json!({"databaseName": db.name}));
        assert!(a.value["source"]["txId"].is_u64(), "{a:?}");
    }
    // Each change comes with the transaction of the first row of the new
    // shape (rows 2, 3, 4), at that row's position, and was produced
    // before it; its DDL was produced before the change.
    for (i, a) in alters.iter().enumerate() {
        let row = &rows[i + 1];
        assert_eq!(row.value["after"]["id"], json!(i as i64 + 2));
        assert_eq!(
            a.value["source"]["lsn"], row.value["source"]["lsn"],
            "{a:?} {row:?}"
        );
        assert_eq!(a.value["source"]["txId"], row.value["source"]["txId"]);
        assert!(a.timestamp_ms <= row.timestamp_ms, "{a:?} {row:?}");
        let pos = |r: &Record| events.iter().position(|e| std::ptr::eq(e, r)).unwrap();
        assert!(pos(ddl[i]) < pos(a), "DDL after its change: {events:#?}");
        assert!(
            ddl[i].value["source"]["lsn"].as_u64() < a.value["source"]["lsn"].as_u64(),
            "{events:#?}"
        );
    }
    // The rows of each shape carry the columns of that shape.
    assert_eq!(
        rows[1].value["after"],
        json!({"id": 2, "name": "two", "price": "2.50"})
    );
    assert_eq!(rows[2].value["after"], json!({"id": 3, "price": "3.50"}));
    assert_eq!(rows[3].value["after"], json!({"id": 4, "price": "four"}));
    assert!(w.terminate().success());
}

/// The outbox without a table: `pg_logical_emit_message(true, prefix,
/// json)` in a committed transaction becomes a message routed by its
/// aggregate type, keyed by its aggregate id, with the payload as the
/// value; in a rolled-back transaction it never leaves Postgres. A
/// non-transactional one is published even though its transaction rolled
/// back (that is what `false` asks for); other prefixes are dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logical_messages_are_outbox_messages_once_committed() {
    let db = TestDb::new("wc_obm").await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY);").await;
    let routed = unique("ordm");
    let prefix = unique("obm");
    let cfg = KafkaCapture::new("obm", &db.name, &prefix, &["public.t"]).sink(
        "create_topics = true\noutbox = { message_prefix = \"obm\", fields_as_headers = [\"tenant\"] }",
    );
    let text = checked(&cfg.toml("127.0.0.1:1"));
    let mut w = Walcast::start_with(|_, admin| cfg.toml(admin));
    w.wait_state("streaming", WAIT).await;
    assert!(
        text.contains("outbox: logical messages with prefix 'obm' (pg_logical_emit_message) become messages on outbox.event.${routedByValue}"),
        "{text}"
    );
    let msg = |id: &str, kind: &str, payload: &str| {
        format!(
            r#"{{"aggregatetype": "{routed}", "aggregateid": "{id}", "type": "{kind}", "payload": {payload}, "tenant": "acme"}}"#
        )
    };
    db.exec(&format!(
        "BEGIN;
         INSERT INTO t VALUES (1);
         SELECT pg_logical_emit_message(true, 'obm', '{}');
         COMMIT;
         BEGIN;
         SELECT pg_logical_emit_message(true, 'obm', '{}');
         SELECT pg_logical_emit_message(false, 'obm', '{}');
         ROLLBACK;
         SELECT pg_logical_emit_message(true, 'not-obm', '{}');
         SELECT pg_logical_emit_message(true, 'obm', '{}');",
        msg("o-1", "OrderCreated", r#"{"total": 5}"#),
        msg("o-9", "Never", "{}"),
        msg("o-5", "Audit", r#""kept""#),
        msg("o-7", "Other", "{}"),
        msg("o-1", "OrderPaid", r#"{"paid": true}"#),
    ))
    .await;
    let topic = format!("outbox.event.{routed}");
    let got = read(&[&topic], WAIT, |r| {
        r.get(&topic).is_some_and(|v| v.len() >= 3)
    });
    // A fourth would show after the first three; give it a moment.
    let got = if got.get(&topic).is_some_and(|v| v.len() == 3) {
        read(&[&topic], Duration::from_secs(2), |_| false)
    } else {
        got
    };
    let recs = got.get(&topic).cloned().unwrap_or_default();
    let summary: Vec<(Value, Option<&str>, Option<&str>)> = recs
        .iter()
        .map(|r| {
            (
                r.key.clone(),
                r.header("type"),
                r.header("walcast.transactional"),
            )
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            (json!("o-1"), Some("OrderCreated"), Some("true")),
            (json!("o-5"), Some("Audit"), Some("false")),
            (json!("o-1"), Some("OrderPaid"), Some("true")),
        ],
        "{}",
        tail(&w.log(), 3000)
    );
    // JsonConverter without expansion: a JSON string holding the payload.
    assert_eq!(recs[0].value, json!(r#"{"total":5}"#));
    assert_eq!(recs[1].value, json!("kept"));
    assert_eq!(recs[0].header("tenant"), Some("acme"));
    // No id in the content: the message's LSN, unique and stable.
    let ids: Vec<&str> = recs.iter().map(|r| r.header("id").unwrap()).collect();
    assert!(ids.iter().all(|i| i.contains('/')), "{ids:?}");
    assert_eq!(
        ids.iter().collect::<std::collections::HashSet<_>>().len(),
        3,
        "{ids:?}"
    );
    // The committed transaction's row went out as usual.
    let rows = read(&[&format!("{prefix}.public.t")], WAIT, |r| !r.is_empty());
    assert_eq!(rows.values().map(Vec::len).sum::<usize>(), 1, "{rows:?}");
    assert!(w.terminate().success());
}

/// An action query Postgres refuses as written fails every time: the
/// pipeline stops, naming the setting and the query, instead of warning
/// for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_action_query_postgres_refuses_stops_the_pipeline_naming_it() {
    let db = TestDb::new("wc_hbq").await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY);").await;
    let prefix = unique("hbq");
    let cfg = KafkaCapture::new("hbq", &db.name, &prefix, &["public.t"])
        .pipeline("heartbeat = { interval = \"200ms\", action_query = \"INSERT INTO no_such_table VALUES (1)\" }");
    let mut w = Walcast::start_with(|_, admin| cfg.toml(admin));
    w.wait_failed("a refused heartbeat.action_query", WAIT)
        .await;
    let log = w.log();
    assert!(
        log.contains("heartbeat.action_query failed")
            && log.contains("no_such_table")
            && log.contains("[pipelines.hbq.heartbeat]"),
        "{}",
        tail(&log, 3000)
    );
}
