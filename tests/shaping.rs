//! Per-table event shaping end to end through Kafka: excluded columns,
//! masks, truncation, salted hashes and a message key override, on snapshot
//! rows and streamed changes alike, in JSON and in Avro (the registered
//! schema says what the fields hold; an excluded column is not in it).
//! Run with the stack's settings: `eval "$(deploy/local/stack env)"`.

mod support;

use std::time::Duration;

use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use support::*;

const WAIT: Duration = Duration::from_secs(90);
const SALT: &str = "pepper-for-tests";

fn hashed(v: &str) -> String {
    let mut h = Sha256::new();
    h.update(SALT.as_bytes());
    h.update(v.as_bytes());
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

const RULES: &str = r#"
[pipelines.P.table."public.users"]
column_exclude_list = ["ssn"]
column_mask_with = { age = 3 }
column_truncate_to = { bio = 4 }
column_mask_hash = ["email"]
hash_salt_env = "WALCAST_TEST_SHAPING_SALT"
[pipelines.P.table."public.log"]
message_key_columns = ["code"]
"#;

async fn schema(db: &TestDb) {
    db.exec(
        "CREATE TABLE users (id int PRIMARY KEY, email text, ssn text, bio text, age int);
         INSERT INTO users VALUES (1, 'a@x.org', '111-11', 'first bio', 31), (2, 'b@x.org', '222-22', 'second bio', 32);
         CREATE TABLE log (code text NOT NULL, note text);
         ALTER TABLE log REPLICA IDENTITY FULL;
         INSERT INTO log VALUES ('k1', 'snap');",
    )
    .await;
}

async fn workload(db: &TestDb) {
    db.exec(
        "INSERT INTO users VALUES (3, 'c@x.org', '333-33', 'third bio', 33);
         UPDATE users SET bio = 'changed bio', ssn = '444-44' WHERE id = 1;
         INSERT INTO log VALUES ('k2', 'new');
         UPDATE log SET code = 'k3' WHERE code = 'k2';",
    )
    .await;
}

fn config(pipeline: &str, db: &TestDb, prefix: &str) -> KafkaCapture {
    KafkaCapture::new(pipeline, &db.name, prefix, &["public.users", "public.log"])
        .source("keyless_tables = [\"public.log\"]")
        .pipeline(&RULES.replace("pipelines.P.", &format!("pipelines.{pipeline}.")))
}

fn no_secret_leaves(records: &[String]) {
    for r in records {
        for secret in [
            "111-11",
            "222-22",
            "333-33",
            "444-44",
            "a@x.org",
            "b@x.org",
            "c@x.org",
            "ssn",
            "first bio",
        ] {
            assert!(!r.contains(secret), "`{secret}` left walcast: {r}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shaped_columns_and_an_overridden_key_through_kafka_in_json() {
    std::env::set_var("WALCAST_TEST_SHAPING_SALT", SALT);
    let db = TestDb::new("wc_shape").await;
    schema(&db).await;
    let prefix = unique("shape");
    let cfg = config("shape", &db, &prefix);
    let mut w = Walcast::start_with(|_, admin| cfg.toml(admin));
    w.wait_state("streaming", WAIT).await;
    workload(&db).await;

    let users = consume_json(&format!("{prefix}.public.users"), WAIT, |r| r.len() >= 4);
    let texts: Vec<String> = users
        .iter()
        .map(|(k, v)| {
            format!(
                "{k} {}",
                v.as_ref().map(Value::to_string).unwrap_or_default()
            )
        })
        .collect();
    no_secret_leaves(&texts);
    let after = |id: i64, op: &str| -> Value {
        users
            .iter()
            .filter_map(|(_, v)| v.as_ref())
            .find(|v| v["op"] == op && v["after"]["id"] == id)
            .unwrap_or_else(|| panic!("no {op} of user {id}: {texts:#?}"))["after"]
            .clone()
    };
    assert_eq!(
        after(1, "r"),
        json!({"id": 1, "email": hashed("a@x.org"), "bio": "firs", "age": "***"}),
        "a snapshot row"
    );
    assert_eq!(
        after(3, "c"),
        json!({"id": 3, "email": hashed("c@x.org"), "bio": "thir", "age": "***"})
    );
    assert_eq!(after(1, "u")["bio"], "chan");

    // The key-less table is keyed by `code`; the key change is a delete of
    // the old key (and its tombstone) and a create of the new one.
    let log = consume_json(&format!("{prefix}.public.log"), WAIT, |r| r.len() >= 5);
    let seen: Vec<(Value, Option<String>)> = log
        .iter()
        .map(|(k, v)| {
            (
                k.clone(),
                v.as_ref().map(|v| v["op"].as_str().unwrap().to_string()),
            )
        })
        .collect();
    assert_eq!(
        seen,
        vec![
            (json!({"code": "k1"}), Some("r".into())),
            (json!({"code": "k2"}), Some("c".into())),
            (json!({"code": "k2"}), Some("d".into())),
            (json!({"code": "k2"}), None),
            (json!({"code": "k3"}), Some("c".into())),
        ],
        "{log:#?}"
    );
    assert!(w.terminate().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_registered_avro_schema_describes_the_shaped_table() {
    std::env::set_var("WALCAST_TEST_SHAPING_SALT", SALT);
    let db = TestDb::new("wc_shapeavro").await;
    schema(&db).await;
    let prefix = unique("shapeav");
    let registry = var("WALCAST_TEST_REGISTRY_URL");
    let cfg = config("shapeav", &db, &prefix).avro(&registry, "");
    let mut w = Walcast::start_with(|_, admin| cfg.toml(admin));
    w.wait_state("streaming", WAIT).await;
    workload(&db).await;
    let events = consume_avro(&registry, &format!("{prefix}.public.users"), 4, WAIT).await;
    let texts: Vec<String> = events.iter().map(|(_, e)| e.to_string()).collect();
    no_secret_leaves(&texts);
    let three = events
        .iter()
        .map(|(_, e)| e)
        .find(|e| e["after"]["id"] == 3)
        .expect("user 3");
    assert_eq!(three["after"]["email"], hashed("c@x.org"));
    assert_eq!(three["after"]["age"], "***");
    // The value schema the registry holds: no ssn, age a string.
    let subject = format!("{prefix}.public.users-value");
    let text = reqwest::get(format!("{registry}/subjects/{subject}/versions/latest"))
        .await
        .expect("registry")
        .text()
        .await
        .unwrap();
    assert!(
        !text.contains("ssn"),
        "the registered schema names the excluded column: {text}"
    );
    let schema: Value = serde_json::from_str(
        serde_json::from_str::<Value>(&text).unwrap()["schema"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    fn field<'a>(v: &'a Value, name: &str) -> Option<&'a Value> {
        match v {
            Value::Object(o)
                if o.get("name").and_then(Value::as_str) == Some(name)
                    && o.contains_key("type") =>
            {
                Some(v)
            }
            Value::Object(o) => o.values().find_map(|x| field(x, name)),
            Value::Array(a) => a.iter().find_map(|x| field(x, name)),
            _ => None,
        }
    }
    let age = field(&schema, "age").expect("an age field").to_string();
    assert!(
        age.contains("string") && !age.contains("int"),
        "age is not a string in the schema: {age}"
    );
    assert!(w.terminate().success());
}

/// Column names that are not Avro names: by default `名前` and `値段` would
/// both become the field `__`, which `walcast check` reports naming both
/// columns (before `run` would stop on it); Debezium's `avro_unicode`
/// adjustment keeps them apart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_ascii_column_names_collide_in_check_and_not_with_avro_unicode() {
    let db = TestDb::new("wc_unicode").await;
    db.exec("CREATE TABLE jp (id int PRIMARY KEY, \"名前\" text, \"値段\" int); INSERT INTO jp VALUES (1, 'りんご', 120);")
        .await;
    let prefix = unique("uni");
    let registry = var("WALCAST_TEST_REGISTRY_URL");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("walcast.toml");
    let plain = KafkaCapture::new("uni", &db.name, &prefix, &["public.jp"]).avro(&registry, "");
    std::fs::write(&path, plain.toml("127.0.0.1:1")).unwrap();
    let (ok, out) = check(&path);
    assert!(
        !ok && out.contains("`名前`") && out.contains("`値段`") && out.contains("`__`"),
        "{out}"
    );
    assert!(
        out.contains("avro_unicode"),
        "the error does not name the way out: {out}"
    );

    let unicode = KafkaCapture::new("uni", &db.name, &prefix, &["public.jp"])
        .avro(&registry, "field_name_adjustment = \"avro_unicode\"");
    std::fs::write(&path, unicode.toml("127.0.0.1:1")).unwrap();
    let (ok, out) = check(&path);
    assert!(ok, "{out}");
    let mut w = Walcast::start_with(|_, admin| unicode.toml(admin));
    let events = consume_avro(&registry, &format!("{prefix}.public.jp"), 1, WAIT).await;
    // walcast's decoder gives the columns their names back (the schema
    // records them); the fields themselves are escaped.
    assert_eq!(
        events[0].1["after"],
        json!({"id": 1, "名前": "りんご", "値段": 120})
    );
    let text = reqwest::get(format!(
        "{registry}/subjects/{prefix}.public.jp-value/versions/latest"
    ))
    .await
    .unwrap()
    .text()
    .await
    .unwrap();
    assert!(
        text.contains("_u540d_u524d") && text.contains("_u5024_u6bb5"),
        "{text}"
    );
    assert!(w.terminate().success());
}

/// The outbox event router: inserts into an outbox table, deleted in the
/// same transaction as Debezium users do, become messages on
/// `outbox.event.<aggregatetype>` keyed by the aggregate id, with the
/// payload as the value and the event id and type as headers; the outbox
/// table's own row changes are not published; a rolled-back insert is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_rows_become_messages_routed_by_aggregate_type() {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::message::Headers;
    use rdkafka::Message;
    let db = TestDb::new("wc_outbox").await;
    let routed = unique("ordr");
    db.exec(
        "CREATE TABLE outbox (id uuid PRIMARY KEY, aggregatetype text NOT NULL, aggregateid text NOT NULL,
                              type text NOT NULL, payload jsonb, tenant text);",
    )
    .await;
    let prefix = unique("obx");
    let cfg = KafkaCapture::new("obx", &db.name, &prefix, &["public.outbox"])
        .sink("create_topics = true\noutbox = { table = \"public.outbox\", fields_as_headers = [\"tenant\"], expand_json_payload = true }");
    let mut w = Walcast::start_with(|_, admin| cfg.toml(admin));
    w.wait_state("streaming", WAIT).await;
    db.exec(&format!(
        "BEGIN;
         INSERT INTO outbox VALUES ('00000000-0000-0000-0000-000000000001', '{routed}', 'o-1', 'OrderCreated', '{{\"total\": 5}}', 'acme');
         DELETE FROM outbox;
         COMMIT;
         BEGIN;
         INSERT INTO outbox VALUES ('00000000-0000-0000-0000-000000000009', '{routed}', 'o-9', 'Never', '{{}}', 'acme');
         ROLLBACK;
         INSERT INTO outbox VALUES ('00000000-0000-0000-0000-000000000002', '{routed}', 'o-1', 'OrderPaid', '{{\"paid\": true}}', NULL);"
    ))
    .await;
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", var("WALCAST_TEST_KAFKA_BOOTSTRAP"))
        .set("group.id", unique("obx"))
        .set("auto.offset.reset", "earliest")
        .set("topic.metadata.refresh.interval.ms", "500")
        .create()
        .unwrap();
    consumer
        .subscribe(&[&format!("outbox.event.{routed}")])
        .unwrap();
    let mut got = Vec::new();
    let deadline = std::time::Instant::now() + WAIT;
    while got.len() < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "{} outbox messages:\n{}",
            got.len(),
            tail(&w.log(), 3000)
        );
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
            let headers: Vec<(String, String)> = m
                .headers()
                .map(|h| {
                    h.iter()
                        .map(|h| {
                            (
                                h.key.to_string(),
                                String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned(),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            let key: Value = serde_json::from_slice(m.key().unwrap()).unwrap();
            let value: Value = serde_json::from_slice(m.payload().unwrap()).unwrap();
            got.push((key, value, headers));
        }
    }
    assert_eq!(got[0].0, json!("o-1"));
    assert_eq!(got[0].1, json!({"total": 5}));
    let h = |i: usize, k: &str| {
        got[i]
            .2
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.clone())
    };
    assert_eq!(
        h(0, "id").as_deref(),
        Some("00000000-0000-0000-0000-000000000001")
    );
    assert_eq!(h(0, "type").as_deref(), Some("OrderCreated"));
    assert_eq!(h(0, "tenant").as_deref(), Some("acme"));
    assert_eq!(got[1].1, json!({"paid": true}));
    assert_eq!(h(1, "type").as_deref(), Some("OrderPaid"));
    // Nothing else: no rolled-back message, no row-change topic for the table.
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        consumer.poll(Duration::from_secs(1)).is_none(),
        "a third message"
    );
    let (rows, _) = consume_json_until(
        &format!("{prefix}.public.outbox"),
        Duration::from_secs(3),
        |r| !r.is_empty(),
    );
    assert!(
        rows.is_empty(),
        "the outbox table's row changes were published: {rows:?}"
    );
    assert!(w.terminate().success());
}
