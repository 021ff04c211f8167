//! Kafka security through librdkafka properties (issue #16): the stack's
//! broker has a SASL_PLAINTEXT listener with a SCRAM-SHA-256 user
//! (WALCAST_TEST_KAFKA_SASL_*). A capture whose `[sinks.producer]` carries
//! `security.protocol`, `sasl.mechanism`, `sasl.username` and
//! `sasl.password` delivers its events there; a wrong password stops the
//! pipeline with an error that says authentication failed and where to look,
//! confirms nothing, and neither password appears in the logs, /status or
//! /metrics.

mod support;

use std::time::Duration;

use support::*;

const WAIT: Duration = Duration::from_secs(120);

fn config(pipeline: &str, db: &str, prefix: &str, admin: &str, password: &str) -> String {
    config_with(pipeline, db, prefix, admin, password, "")
}

fn config_with(
    pipeline: &str,
    db: &str,
    prefix: &str,
    admin: &str,
    password: &str,
    sink: &str,
) -> String {
    KafkaCapture::new(pipeline, db, prefix, &["public.t"])
        .bootstrap(&var("WALCAST_TEST_KAFKA_SASL_BOOTSTRAP"))
        .log("level = \"debug\"")
        .sink(&format!(
            r#"create_topics = true
{sink}
[pipelines.{pipeline}.sinks.producer]
"security.protocol" = "SASL_PLAINTEXT"
"sasl.mechanism" = "{mechanism}"
"sasl.username" = "{user}"
"sasl.password" = "{password}""#,
            mechanism = var("WALCAST_TEST_KAFKA_SASL_MECHANISM"),
            user = var("WALCAST_TEST_KAFKA_SASL_USER"),
        ))
        .toml(admin)
}

/// Every place a secret must not show up: the log, /status, /metrics.
async fn assert_secret_absent(w: &Walcast, secret: &str) {
    let status = w.http("/status").await.map(|(_, b)| b).unwrap_or_default();
    let metrics = w.http("/metrics").await.map(|(_, b)| b).unwrap_or_default();
    for (what, text) in [("log", w.log()), ("/status", status), ("/metrics", metrics)] {
        assert!(
            !text.contains(secret),
            "the Kafka password appears in the {what}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sasl_scram_producer_delivers_and_a_wrong_password_is_a_clear_error() {
    let password = var("WALCAST_TEST_KAFKA_SASL_PASSWORD");
    let db = TestDb::new("wc_sasl").await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY, v text)").await;

    // The right password: events arrive.
    let prefix = unique("sasl");
    let pipeline = unique("sasl");
    let mut w =
        Walcast::start_with(|_, admin| config(&pipeline, &db.name, &prefix, admin, &password));
    w.wait_state("streaming", WAIT).await;
    db.exec("INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 20) g")
        .await;
    let records = consume_json(&format!("{prefix}.public.t"), WAIT, |r| r.len() >= 20);
    assert_eq!(records.len(), 20);
    assert_eq!(records[6].1.as_ref().unwrap()["after"]["v"], "v7");
    let slot = format!("walcast_{pipeline}");
    let end = db.current_wal().await;
    w.wait_confirmed(&db, &slot, end, WAIT, "never confirmed")
        .await;
    assert_secret_absent(&w, &password).await;
    w.kill9();

    // A wrong password (a canary that must not leak either): the pipeline
    // stops with an authentication error, and nothing is confirmed.
    let wrong = format!("canary-{}", unique("pw"));
    let db2 = TestDb::new("wc_sasl_bad").await;
    db2.exec("CREATE TABLE t (id int PRIMARY KEY, v text)")
        .await;
    let pipeline2 = unique("saslbad");
    let mut w2 = Walcast::start_with(|_, admin| {
        config(&pipeline2, &db2.name, &unique("saslbad"), admin, &wrong)
    });
    db2.exec("INSERT INTO t VALUES (1, 'never delivered')")
        .await;
    w2.wait_failed("a wrong SASL password", WAIT).await;
    let log = w2.log();
    let stopped = log
        .lines()
        .rev()
        .find(|l| l.contains("pipeline stopped") || l.contains("\"level\":\"ERROR\""))
        .unwrap_or_else(|| panic!("no error logged:\n{}", tail(&log, 4000)));
    eprintln!("wrong password: {stopped}");
    assert!(
        stopped.to_lowercase().contains("authentication") && stopped.contains("sasl."),
        "the error says authentication failed and points at the sasl.* settings: {stopped}"
    );
    assert_secret_absent(&w2, &wrong).await;
    let slot2 = format!("walcast_{pipeline2}");
    let row = db2
        .client
        .query_one(
            "SELECT (confirmed_flush_lsn - '0/0')::bigint FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot2],
        )
        .await
        .ok();
    if let Some(row) = row {
        let confirmed: i64 = row.get(0);
        let insert_lsn: i64 = db2
            .client
            .query_one("SELECT (pg_current_wal_lsn() - '0/0')::bigint", &[])
            .await
            .unwrap()
            .get(0);
        assert!(confirmed < insert_lsn, "something was confirmed");
    }
}

/// Exactly-once over SASL: the position is read back from the offsets
/// topic with the same credentials (the reader once logged in with
/// rdkafka's "[sanitized for safety]" placeholder instead of the password,
/// so an exactly-once pipeline on a SASL listener could not start). After a
/// kill -9 and a restart, every row is in the topic once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_once_over_sasl_reads_its_position_back_across_a_kill() {
    let password = var("WALCAST_TEST_KAFKA_SASL_PASSWORD");
    let db = TestDb::new("wc_sasl_eos").await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY, v text)").await;
    let prefix = unique("sasleos");
    let pipeline = unique("sasleos");
    let delivery =
        format!(r#"delivery = {{ mode = "exactly_once", transactional_id = "{pipeline}" }}"#);
    let mut w = Walcast::start_with(|_, admin| {
        config_with(&pipeline, &db.name, &prefix, admin, &password, &delivery)
    });
    w.wait_state("streaming", WAIT).await;
    db.exec("INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 20) g")
        .await;
    let topic = format!("{prefix}.public.t");
    consume_json(&topic, WAIT, |r| r.len() >= 20);
    let slot = format!("walcast_{pipeline}");
    let end = db.current_wal().await;
    w.wait_confirmed(&db, &slot, end, WAIT, "never confirmed")
        .await;
    w.kill9();
    db.exec("INSERT INTO t SELECT g, 'v' || g FROM generate_series(21, 30) g")
        .await;
    w.spawn();
    w.wait_state("streaming", WAIT).await;
    let end = db.current_wal().await;
    w.wait_confirmed(&db, &slot, end, WAIT, "never confirmed after the restart")
        .await;
    let records = consume_json(&topic, WAIT, |r| r.len() >= 30);
    let mut ids: Vec<i64> = records
        .iter()
        .filter_map(|(_, v)| v.as_ref()?["after"]["id"].as_i64())
        .collect();
    ids.sort();
    assert_eq!(ids, (1..=30).collect::<Vec<_>>(), "each row once");
    assert_secret_absent(&w, &password).await;
    assert!(
        w.log().contains("offsets"),
        "the log mentions the offsets topic it read"
    );
    w.kill9();
}
