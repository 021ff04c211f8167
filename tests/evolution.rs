//! Schemas evolving under a running capture: ALTER TABLE mid-stream
//! registers a new version before the first event of the new shape; an
//! incompatible change stops the pipeline with an error naming the subject;
//! a data contract refuses what breaks it. Against Apicurio and against
//! walcast's own embedded registry.

mod support;

use std::time::Duration;

use support::*;

const WAIT: Duration = Duration::from_secs(90);

fn config(
    pipeline: &str,
    admin: &str,
    db: &str,
    prefix: &str,
    registry_url: &str,
    extra_top: &str,
    extra_registry: &str,
) -> String {
    KafkaCapture::new(pipeline, db, prefix, &["public.orders"])
        .top(extra_top)
        .avro(registry_url, extra_registry)
        .toml(admin)
}

async fn run_evolution(registry_url: &str, extra_top: &str) {
    let db = TestDb::new("wc_evo").await;
    db.exec("CREATE TABLE orders (id bigint PRIMARY KEY, item text)")
        .await;
    let prefix = unique("evo");
    let topic = format!("{prefix}.public.orders");
    let mut w = Walcast::start_with(|_, admin| {
        config(
            &unique("evo"),
            admin,
            &db.name,
            &prefix,
            registry_url,
            extra_top,
            "",
        )
    });
    w.wait_state("streaming", WAIT).await;
    db.exec("INSERT INTO orders VALUES (1, 'a')").await;
    db.exec("ALTER TABLE orders ADD COLUMN price numeric(8,2)")
        .await;
    db.exec("INSERT INTO orders VALUES (2, 'b', 2.50)").await;
    let ev = consume_avro(registry_url, &topic, 2, WAIT).await;
    assert_ne!(ev[0].0, ev[1].0, "a new schema version for the new shape");
    assert_eq!(ev[1].1["after"]["price"], "2.50");
    assert!(ev[0].1["after"].get("price").is_none());
    // Both versions are in the registry under the value subject.
    let versions: serde_json::Value =
        reqwest::get(format!("{registry_url}/subjects/{topic}-value/versions"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
    assert_eq!(versions.as_array().map(|v| v.len()), Some(2), "{versions}");

    // An incompatible change (a column's type) stops the pipeline with the subject named.
    db.exec("ALTER TABLE orders ALTER COLUMN item TYPE int USING 0")
        .await;
    db.exec("INSERT INTO orders VALUES (3, 3, 1.00)").await;
    w.wait_failed("an incompatible schema", WAIT).await;
    let log = w.log();
    assert!(
        log.contains(&format!("{topic}-value"))
            && log.to_lowercase().contains("incompatible")
            && log.contains("column `item` changed type from text to integer"),
        "{}",
        tail(&log, 3000)
    );
    w.kill9();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alter_table_mid_stream_with_apicurio() {
    run_evolution(&var("WALCAST_TEST_REGISTRY_URL"), "").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alter_table_mid_stream_with_the_embedded_registry() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let top = format!(
        "[embedded_registry]\ndir = \"{}\"\nlisten = \"127.0.0.1:{port}\"",
        dir.path().display()
    );
    run_evolution(&format!("http://127.0.0.1:{port}"), &top).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_contract_mismatch_is_refused_by_run_and_reported_by_check() {
    let db = TestDb::new("wc_contract").await;
    // The checked-in example contract says public.orders has id bigint,
    // item text, price numeric(12,2); this table narrows price.
    db.exec("CREATE TABLE orders (id bigint PRIMARY KEY, item text, price numeric(6,2))")
        .await;
    let prefix = unique("ctr");
    let contracts = concat!(env!("CARGO_MANIFEST_DIR"), "/schemas/contracts");
    let text = |db: &str, admin: &str| {
        config(
            "contract",
            admin,
            db,
            &prefix,
            &var("WALCAST_TEST_REGISTRY_URL"),
            "",
            &format!("contracts = \"{contracts}\""),
        )
    };
    // `walcast check` reports the mismatch before anything runs...
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("walcast.toml");
    std::fs::write(&file, text(&db.name, "127.0.0.1:0")).unwrap();
    let (ok, out) = check(&file);
    assert!(!ok, "check must fail on a contract mismatch:\n{out}");
    assert!(
        out.contains("public.orders.avsc") && out.contains("price"),
        "check names the contract and the field:\n{out}"
    );
    // ...and passes a table that keeps the contract.
    let good = TestDb::new("wc_contract_ok").await;
    good.exec("CREATE TABLE orders (id bigint PRIMARY KEY, item text, price numeric(12,2))")
        .await;
    std::fs::write(&file, text(&good.name, "127.0.0.1:0")).unwrap();
    let (ok, out) = check(&file);
    assert!(ok, "a table that keeps its contract passes check:\n{out}");
    assert!(out.contains("matches"), "{out}");
    let mut w = Walcast::start_with(|_, admin| text(&db.name, admin));
    w.wait_state("streaming", WAIT).await;
    db.exec("INSERT INTO orders VALUES (1, 'a', 1.00)").await;
    w.wait_failed("the contract mismatch", WAIT).await;
    let log = w.log();
    assert!(
        log.contains("contract") && log.contains("price"),
        "{}",
        tail(&log, 3000)
    );
    w.kill9();
}

/// A value Avro cannot carry (NaN in a `numeric(12,2)` column) under the
/// dead-letter policy: the event goes, as JSON with the error in a header,
/// to the dead-letter topic; the rows around it reach their topic and the
/// slot moves past it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_value_goes_to_the_dead_letter_topic() {
    let db = TestDb::new("wc_dlq").await;
    db.exec("CREATE TABLE orders (id bigint PRIMARY KEY, item text, price numeric(12,2))")
        .await;
    let prefix = unique("dlq");
    let dlq = format!("{prefix}.dlq");
    let registry = var("WALCAST_TEST_REGISTRY_URL");
    let mut w = Walcast::start_with(|_, admin| {
        config(
            "deadletter",
            admin,
            &db.name,
            &prefix,
            &registry,
            "",
            &format!("on_invalid = {{ dead_letter = {{ topic = \"{dlq}\" }} }}"),
        )
    });
    w.wait_state("streaming", WAIT).await;
    db.exec("INSERT INTO orders VALUES (1, 'a', 1.50); INSERT INTO orders VALUES (2, 'bad', 'NaN'); INSERT INTO orders VALUES (3, 'c', 2.50)")
        .await;
    let ev = consume_avro(&registry, &format!("{prefix}.public.orders"), 2, WAIT).await;
    let ids: Vec<i64> = ev
        .iter()
        .map(|(_, e)| e["after"]["id"].as_i64().unwrap())
        .collect();
    assert_eq!(ids, [1, 3], "the valid rows reach the table's topic");
    let dead = consume_json(&dlq, WAIT, |r| !r.is_empty());
    assert_eq!(dead.len(), 1, "{dead:?}");
    let value = dead[0].1.as_ref().expect("the event as JSON");
    assert_eq!(value["after"]["id"], 2);
    assert_eq!(value["after"]["price"], "NaN");
    assert!(
        w.log().contains("dead-letter") && w.log().contains("price"),
        "the routing is logged with the column:\n{}",
        tail(&w.log(), 3000)
    );
    // And counted, for the WalcastDeadLettersGrowing alert.
    assert_eq!(
        w.metric(
            "walcast_dead_letters_total",
            &[("pipeline", "deadletter"), ("sink", "kafka")]
        )
        .await,
        Some(1.0),
        "walcast_dead_letters_total"
    );
    // Nothing halted: the slot confirms past the three inserts.
    let end = db.current_wal().await;
    w.wait_confirmed(
        &db,
        "walcast_deadletter",
        end,
        WAIT,
        "the slot never moved past the dead-lettered event",
    )
    .await;
    w.kill9();
}

/// Exactly-once, a refused batch, and batches of another table queued
/// behind it (shared/REPRODUCTIONS.md): no later transaction may commit,
/// or its position in the offsets topic would make the restarted daemon
/// drop the refused changes as "already in Kafka".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_once_commits_nothing_after_a_refused_batch_and_loses_nothing() {
    use std::collections::HashMap;
    let db = TestDb::new("wc_eofail").await;
    db.exec(
        "CREATE TABLE a (id int PRIMARY KEY, v text); CREATE TABLE b (id int PRIMARY KEY, v text);
         INSERT INTO a SELECT g, 'a' || g FROM generate_series(1, 100) g;
         INSERT INTO b SELECT g, 'b' || g FROM generate_series(1, 100) g;",
    )
    .await;
    let prefix = unique("eofail");
    let registry = var("WALCAST_TEST_REGISTRY_URL");
    let txn = unique("walcast-eofail");
    let mut w = Walcast::start_with(|_, admin| {
        KafkaCapture::new("eofail", &db.name, &prefix, &["public.a", "public.b"])
            .avro(&registry, "")
            .sink(&format!(
                "delivery = {{ mode = \"exactly_once\", transactional_id = \"{txn}\", offsets_topic = \"{prefix}.offsets\" }}"
            ))
            .toml(admin)
    });
    w.wait_state("streaming", WAIT).await;
    consume_avro(&registry, &format!("{prefix}.public.a"), 100, WAIT).await;
    consume_avro(&registry, &format!("{prefix}.public.b"), 100, WAIT).await;
    // The registry refuses a's new value schema (BACKWARD): a's batch fails.
    db.exec("ALTER TABLE a ALTER COLUMN v TYPE integer USING length(v)")
        .await;
    db.exec("INSERT INTO a VALUES (101, 7)").await;
    for i in 101..=400 {
        db.client
            .execute("INSERT INTO b VALUES ($1, 'later')", &[&i])
            .await
            .unwrap();
    }
    w.wait_failed("the refused schema", WAIT).await;
    w.kill9();
    // The operator allows the change and restarts.
    let client = reqwest::Client::new();
    let r = client
        .put(format!("{registry}/config/{prefix}.public.a-value"))
        .header("content-type", "application/vnd.schemaregistry.v1+json")
        .body(r#"{"compatibility":"NONE"}"#)
        .send()
        .await
        .unwrap();
    assert!(
        r.status().is_success(),
        "setting compatibility: {}",
        r.status()
    );
    w.spawn();
    w.wait_state("streaming", WAIT).await;
    // A read_committed consumer sees every row once.
    for (table, n) in [("a", 101usize), ("b", 400)] {
        let topic = format!("{prefix}.public.{table}");
        let ev = consume_avro(&registry, &topic, n, WAIT).await;
        let mut count: HashMap<i64, usize> = HashMap::new();
        for (_, e) in &ev {
            *count.entry(e["after"]["id"].as_i64().unwrap()).or_default() += 1;
        }
        let dups: Vec<_> = count.iter().filter(|(_, c)| **c > 1).collect();
        assert!(dups.is_empty(), "{table}: duplicates {dups:?}");
        assert_eq!(count.len(), n, "{table}: {} of {n} rows", count.len());
        // And nothing more is there behind them.
        let all = committed_records(&topic);
        assert_eq!(all, n, "{table}: {all} records, {n} expected");
    }
}

/// How many records a read_committed consumer reads from `topic` until it
/// has been idle for 3 s.
fn committed_records(topic: &str) -> usize {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", var("WALCAST_TEST_KAFKA_BOOTSTRAP"))
        .set("group.id", unique("count"))
        .set("auto.offset.reset", "earliest")
        .set("isolation.level", "read_committed")
        .create()
        .expect("consumer");
    consumer.subscribe(&[topic]).expect("subscribe");
    let mut n = 0;
    let mut idle = std::time::Instant::now();
    while idle.elapsed() < Duration::from_secs(3) {
        if let Some(Ok(_)) = consumer.poll(Duration::from_millis(200)) {
            n += 1;
            idle = std::time::Instant::now();
        }
    }
    n
}

/// NaN and ±Infinity are legal in an unconstrained `numeric`: the default
/// Avro pipeline carries them (as Postgres's text) instead of stopping, as
/// Debezium's precise mode and walcast's `variable_scale` do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn special_numeric_values_travel_in_the_default_avro_pipeline() {
    let db = TestDb::new("wc_nan").await;
    db.exec("CREATE TABLE orders (id bigint PRIMARY KEY, item text, amount numeric)")
        .await;
    let prefix = unique("nan");
    let registry = var("WALCAST_TEST_REGISTRY_URL");
    let mut w =
        Walcast::start_with(|_, admin| config("nan", admin, &db.name, &prefix, &registry, "", ""));
    w.wait_state("streaming", WAIT).await;
    db.exec(
        "INSERT INTO orders VALUES (1, 'a', 'NaN'), (2, 'b', 'Infinity'), (3, 'c', '-Infinity'), (4, 'd', 12.340)",
    )
    .await;
    let ev = consume_avro(&registry, &format!("{prefix}.public.orders"), 4, WAIT).await;
    let amounts: Vec<&str> = ev
        .iter()
        .map(|(_, e)| e["after"]["amount"].as_str().unwrap_or("?"))
        .collect();
    assert_eq!(amounts, ["NaN", "Infinity", "-Infinity", "12.340"]);
    assert!(
        w.exited().is_none(),
        "the pipeline stopped:\n{}",
        tail(&w.log(), 3000)
    );
    w.kill9();
}

/// `walcast check` asks the registry about every captured table's schemas:
/// a mapping change the subject would refuse (here `unconstrained_numeric`
/// from `variable_scale` to `string` under BACKWARD) is an error before
/// `run`, and the unchanged config is reported accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_reports_a_schema_change_the_registry_would_refuse() {
    let db = TestDb::new("wc_compat").await;
    db.exec("CREATE TABLE orders (id bigint PRIMARY KEY, item text, amount numeric)")
        .await;
    let prefix = unique("compat");
    let registry = var("WALCAST_TEST_REGISTRY_URL");
    let variable = "unconstrained_numeric = \"variable_scale\"";
    let mut w = Walcast::start_with(|_, admin| {
        config("compat", admin, &db.name, &prefix, &registry, "", variable)
    });
    w.wait_state("streaming", WAIT).await;
    db.exec("INSERT INTO orders VALUES (1, 'a', 1.5)").await;
    consume_avro(&registry, &format!("{prefix}.public.orders"), 1, WAIT).await;
    assert!(w.terminate().success());
    let (ok, out) = check(&w.config);
    assert!(ok, "{out}");
    assert!(
        out.contains(&format!(
            "subject {prefix}.public.orders-value: the schema of public.orders is accepted"
        )),
        "{out}"
    );
    let text = std::fs::read_to_string(&w.config).unwrap();
    std::fs::write(
        &w.config,
        text.replace(variable, "unconstrained_numeric = \"string\""),
    )
    .unwrap();
    let (ok, out) = check(&w.config);
    assert!(!ok, "check accepted a change the registry refuses:\n{out}");
    assert!(
        out.contains(&format!(
            "subject {prefix}.public.orders-value would refuse the schema of public.orders"
        )),
        "{out}"
    );
}
