//! The management API (`/api/v1` on the admin server, issue 27) against a
//! running daemon capturing a real Postgres into the stack's Kafka: pause
//! holds the slot (its confirmed_flush_lsn stays put, nothing new reaches
//! Kafka, the lag grows) and resume delivers every row exactly as Postgres
//! has it; the token is required; a snapshot request through the API
//! delivers `r` events; the slot list shows retained WAL; a slot drop needs
//! its confirmation, is refused for a running pipeline's slot and works for
//! a stale one; the `walcast` commands call the same API and fall back to
//! Postgres when no daemon answers; every action leaves an audit line.
//! Run with the stack's settings: `eval "$(deploy/local/stack env)"`.

mod support;

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::*;

const WAIT: Duration = Duration::from_secs(60);
const TOKEN: &str = "management-token-0123456789";
const ACTOR: &str = "test-operator";

/// A call to the admin server: `GET` without a body, `POST` with one.
async fn call(w: &Walcast, path: &str, body: Option<Value>, token: Option<&str>) -> (u16, Value) {
    let http = reqwest::Client::new();
    let url = format!("http://{}{path}", w.admin);
    let mut r = match body {
        Some(b) => http.post(&url).json(&b),
        None => http.get(&url),
    }
    .header("X-Walcast-Actor", ACTOR);
    if let Some(t) = token {
        r = r.bearer_auth(t);
    }
    // (0, null) until the daemon listens.
    let Ok(resp) = r.send().await else {
        return (0, Value::Null);
    };
    let code = resp.status().as_u16();
    let text = resp.text().await.unwrap_or_default();
    (
        code,
        serde_json::from_str(&text).unwrap_or(json!({ "text": text })),
    )
}

async fn status(w: &Walcast) -> Value {
    call(w, "/status", None, Some(TOKEN)).await.1["pipelines"][0].clone()
}

async fn wait_status(w: &Walcast, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let s = status(w).await;
        if pred(&s) {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {s}\n{}",
            tail(&w.log(), 3000)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A metric's value for the pipeline, from /metrics with the token.
async fn metric(w: &Walcast, name: &str, pipeline: &str) -> Option<f64> {
    let (_, body) = call(w, "/metrics", None, Some(TOKEN)).await;
    let text = body["text"].as_str()?.to_string();
    text.lines().find_map(|l| {
        let (series, value) = l.rsplit_once(' ')?;
        let rest = series.strip_prefix(name)?;
        (rest.starts_with('{') && rest.contains(&format!("pipeline=\"{pipeline}\"")))
            .then(|| value.parse().ok())
            .flatten()
    })
}

/// `walcast ARGS...`: (success, stdout + stderr).
fn walcast(args: &[&str]) -> (bool, String) {
    let out = Command::new(bin())
        .args(args)
        .env("USER", ACTOR)
        .output()
        .expect("run walcast");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// The `id -> v` rows the topic's change events rebuild, applied in order,
/// and how many creates each id got.
fn rebuild(records: &[(Value, Option<Value>)]) -> (BTreeMap<i64, String>, BTreeMap<i64, u32>) {
    let (mut rows, mut creates) = (BTreeMap::new(), BTreeMap::new());
    for v in records.iter().filter_map(|(_, v)| v.as_ref()) {
        match v["op"].as_str().unwrap_or("?") {
            "c" | "r" | "u" => {
                let id = v["after"]["id"].as_i64().expect("after.id");
                if v["op"] == "c" {
                    *creates.entry(id).or_insert(0) += 1;
                }
                rows.insert(id, v["after"]["v"].as_str().unwrap_or("<null>").to_string());
            }
            "d" => {
                rows.remove(&v["before"]["id"].as_i64().expect("before.id"));
            }
            other => panic!("unexpected op {other}: {v}"),
        }
    }
    (rows, creates)
}

/// `X/Y` as a number.
fn lsn(text: &str) -> u64 {
    let (hi, lo) = text.split_once('/').expect("an LSN");
    (u64::from_str_radix(hi, 16).unwrap() << 32) | u64::from_str_radix(lo, 16).unwrap()
}

async fn active_pid(db: &TestDb, slot: &str) -> Option<i32> {
    db.client
        .query_one(
            "SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .unwrap()
        .get(0)
}

fn topic_len(topic: &str) -> usize {
    // Read until the topic is quiet for a moment; `false` never finishes
    // early, so this reads for the whole window.
    consume_json_until(topic, Duration::from_secs(3), |_| false)
        .0
        .len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_holds_the_slot_resume_loses_nothing_and_every_action_is_audited() {
    let db = TestDb::new("wc_mgmt").await;
    db.exec(
        "CREATE TABLE t (id int PRIMARY KEY, v text);
         CREATE TABLE s (id int PRIMARY KEY, v text);
         INSERT INTO s SELECT i, 'existing ' || i FROM generate_series(1, 20) i;",
    )
    .await;
    // A walsender that hears nothing for 2 s ends the connection: the pause
    // below lasts several times that, so it must keep answering.
    db.exec(&format!(
        "ALTER DATABASE {} SET wal_sender_timeout = '2s'",
        db.name
    ))
    .await;
    let pipeline = unique("mgmt");
    let prefix = unique("mgmt");
    let slot = format!("walcast_{pipeline}");
    let tmp = tempfile::tempdir().unwrap();
    let token_file = tmp.path().join("admin.token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let mut w = Walcast::start_with(|_, admin| {
        KafkaCapture::new(&pipeline, &db.name, &prefix, &["public.t", "public.s"])
            .source("snapshot = \"never\"")
            .create_topics()
            .toml(admin)
            .replace(
                &format!("listen = \"{admin}\""),
                &format!(
                    "listen = \"{admin}\"\ntoken_file = \"{}\"",
                    token_file.display()
                ),
            )
            // A relay too, which refuses to pause.
            + &format!(
                r#"
[pipelines.{pipeline}_relay]
kind = "relay"
[pipelines.{pipeline}_relay.source]
bootstrap_servers = "{bootstrap}"
group_id = "{prefix}-relay"
subscribe = {{ topics = ["{prefix}.public.t"] }}
[[pipelines.{pipeline}_relay.sinks]]
type = "file"
path = "{out}"
"#,
                bootstrap = var("WALCAST_TEST_KAFKA_BOOTSTRAP"),
                out = tmp.path().join("relay.jsonl").display(),
            )
    });
    let (topic_t, topic_s) = (format!("{prefix}.public.t"), format!("{prefix}.public.s"));
    let api = |action: &str| format!("/api/v1/pipelines/{pipeline}/{action}");

    // The token: nothing without it.
    let deadline = Instant::now() + WAIT;
    while status(&w).await["state"] != "streaming" {
        assert!(
            Instant::now() < deadline,
            "never streamed:\n{}",
            tail(&w.log(), 3000)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for (path, body) in [
        (api("pause"), Some(json!({}))),
        ("/api/v1/slots".to_string(), None),
        (
            "/api/v1/slots/drop".to_string(),
            Some(json!({"slot": slot, "confirm": slot})),
        ),
    ] {
        let (code, _) = call(&w, &path, body.clone(), None).await;
        assert_eq!(code, 401, "{path} without the token");
        let (code, _) = call(&w, &path, body, Some("management-token-012345678X")).await;
        assert_eq!(code, 401, "{path} with a wrong token");
    }
    assert_eq!(
        status(&w).await["state"],
        "streaming",
        "a refused pause changed nothing"
    );

    // Streaming: rows reach Kafka.
    for i in 0..10 {
        db.exec(&format!(
            "INSERT INTO t SELECT g, 'row ' || g FROM generate_series({}, {}) g",
            i * 10 + 1,
            i * 10 + 10
        ))
        .await;
    }
    let t2 = topic_t.clone();
    tokio::task::spawn_blocking(move || consume_json(&t2, WAIT, |r| r.len() >= 100))
        .await
        .unwrap();

    // Pause.
    let (code, answer) = call(&w, &api("pause"), Some(json!({})), Some(TOKEN)).await;
    assert_eq!(code, 200, "pause: {answer}");
    assert_eq!(answer["state"], "paused", "{answer}");
    assert!(
        answer["message"].as_str().unwrap().contains("paused"),
        "{answer}"
    );
    // What was in flight drains and is confirmed; then the slot must hold.
    // (Nothing in flight, and the server has the position walcast confirmed.)
    let deadline = Instant::now() + WAIT;
    loop {
        let st = status(&w).await;
        let confirmed = st["confirmed_lsn"].as_str().map(lsn);
        if st["in_flight_events"] == 0 && confirmed == db.confirmed_flush(&slot).await {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never settled after the pause: {st}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let held = db.confirmed_flush(&slot).await.expect("the slot");
    let lag_before = status(&w).await["lag_bytes"].as_u64().unwrap();

    db.exec(
        "INSERT INTO t SELECT g, 'paused ' || g FROM generate_series(101, 200) g;
         UPDATE t SET v = 'updated while paused' WHERE id <= 10;
         DELETE FROM t WHERE id BETWEEN 11 AND 15;",
    )
    .await;
    let written = db.current_wal().await;
    // The lag grows (the server's WAL end keeps being read), in /status and
    // in the metrics, while the state says paused.
    let st = wait_status(&w, "the lag to grow while paused", |s| {
        s["lag_bytes"].as_u64().unwrap_or(0) > lag_before && s["wal_end"].as_str().is_some()
    })
    .await;
    assert_eq!(st["state"], "paused", "{st}");
    assert_eq!(st["pause_requested"], true, "{st}");
    let lag_metric = metric(&w, "walcast_replication_lag_bytes", &pipeline)
        .await
        .unwrap_or(0.0);
    tokio::time::sleep(Duration::from_millis(600)).await;
    let lag_metric = metric(&w, "walcast_replication_lag_bytes", &pipeline)
        .await
        .unwrap_or(lag_metric);
    assert!(
        lag_metric > lag_before as f64,
        "lag metric {lag_metric} vs {lag_before} before the writes"
    );
    assert_eq!(metric(&w, "walcast_paused", &pipeline).await, Some(1.0));
    assert_eq!(metric(&w, "walcast_streaming", &pipeline).await, Some(0.0));
    // `walcast status` shows it too.
    let (ok, out) = walcast(&[
        "status",
        "--admin",
        &w.admin,
        "--token-file",
        token_file.to_str().unwrap(),
    ]);
    assert!(ok && out.contains("paused"), "walcast status: {out}");

    // Nothing new reaches Kafka, the slot does not move, the walsender stays.
    let t2 = topic_t.clone();
    let seen = tokio::task::spawn_blocking(move || topic_len(&t2))
        .await
        .unwrap();
    assert_eq!(seen, 100, "records reached Kafka while paused");
    assert_eq!(
        db.confirmed_flush(&slot).await,
        Some(held),
        "the slot moved while paused"
    );
    let active: bool = db
        .client
        .query_one(
            "SELECT active FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        active,
        "the replication connection was dropped while paused"
    );
    let walsender = active_pid(&db, &slot).await;

    // The slot list: the pipeline's slot, the WAL it retains.
    let (code, listed) = call(&w, "/api/v1/slots", None, Some(TOKEN)).await;
    assert_eq!(code, 200, "{listed}");
    let mine = listed["slots"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["slot"] == slot.as_str())
        .unwrap_or_else(|| panic!("{slot} not listed: {listed}"))
        .clone();
    assert_eq!(mine["pipeline"], pipeline.as_str(), "{mine}");
    assert_eq!(mine["pipeline_state"], "paused", "{mine}");
    assert_eq!(mine["plugin"], "pgoutput", "{mine}");
    assert_eq!(mine["database"], db.name.as_str(), "{mine}");
    assert_eq!(mine["active"], true, "{mine}");
    let retained = mine["retained_wal_bytes"].as_i64().unwrap_or(0) as u64;
    assert!(
        retained >= written - held,
        "retained {retained} bytes, but {} were written since the slot's position",
        written - held
    );

    // The command shows the same, from the daemon.
    let config = w.config.to_str().unwrap().to_string();
    let (ok, out) = walcast(&["slots", "list", "-c", &config]);
    assert!(ok, "walcast slots list: {out}");
    let line = out
        .lines()
        .find(|l| l.starts_with(&slot))
        .unwrap_or_else(|| panic!("{slot} not in walcast slots list:\n{out}"));
    assert!(
        line.contains(&format!("{pipeline} (paused)")) && line.contains("pgoutput"),
        "{line}"
    );

    // Dropping it: the confirmation, then refused for a running pipeline.
    let (code, refused) = call(
        &w,
        "/api/v1/slots/drop",
        Some(json!({"slot": slot})),
        Some(TOKEN),
    )
    .await;
    assert_eq!(code, 400, "{refused}");
    assert!(
        refused["error"].as_str().unwrap().contains("\"confirm\""),
        "{refused}"
    );
    let (code, refused) = call(
        &w,
        "/api/v1/slots/drop",
        Some(json!({"slot": slot, "confirm": "something else"})),
        Some(TOKEN),
    )
    .await;
    assert_eq!(code, 400, "{refused}");
    let (code, refused) = call(
        &w,
        "/api/v1/slots/drop",
        Some(json!({"slot": slot, "confirm": slot})),
        Some(TOKEN),
    )
    .await;
    assert_eq!(code, 409, "{refused}");
    let e = refused["error"].as_str().unwrap();
    assert!(
        e.contains(&pipeline) && e.contains("remove the pipeline"),
        "{refused}"
    );
    assert!(
        db.confirmed_flush(&slot).await.is_some(),
        "the slot survives"
    );

    // A stale slot (a decommissioned pipeline's) is dropped.
    let stale = unique("stale_slot");
    db.client
        .execute(
            "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
            &[&stale],
        )
        .await
        .unwrap();
    let (_, listed) = call(&w, "/api/v1/slots", None, Some(TOKEN)).await;
    let s = listed["slots"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["slot"] == stale.as_str())
        .unwrap_or_else(|| panic!("{stale} not listed: {listed}"))
        .clone();
    assert!(s["pipeline"].is_null() && s["active"] == false, "{s}");
    let (code, dropped) = call(
        &w,
        "/api/v1/slots/drop",
        Some(json!({"slot": stale, "confirm": stale})),
        Some(TOKEN),
    )
    .await;
    assert_eq!(code, 200, "{dropped}");
    assert!(
        dropped["message"].as_str().unwrap().contains(&stale),
        "{dropped}"
    );
    assert!(
        db.confirmed_flush(&stale).await.is_none(),
        "{stale} still exists"
    );
    let (code, _) = call(
        &w,
        "/api/v1/slots/drop",
        Some(json!({"slot": stale, "confirm": stale})),
        Some(TOKEN),
    )
    .await;
    assert_eq!(code, 404, "dropping it again");

    // Still paused through all that, on the same replication connection
    // (no timeout, no reconnect); resume with the command, which reads the
    // admin address and the token from the config.
    assert_eq!(
        db.confirmed_flush(&slot).await,
        Some(held),
        "the slot moved while paused"
    );
    // A snapshot asked for while paused waits for the resume.
    let (code, answer) = call(
        &w,
        &api("snapshot"),
        Some(json!({"tables": ["public.t"]})),
        Some(TOKEN),
    )
    .await;
    assert_eq!(code, 200, "{answer}");
    assert!(
        answer["message"].as_str().unwrap().contains("paused"),
        "{answer}"
    );
    assert_eq!(
        active_pid(&db, &slot).await,
        walsender,
        "the walsender changed while paused (timed out?):\n{}",
        tail(&w.log(), 3000)
    );
    assert_eq!(
        metric(&w, "walcast_pipeline_restarts_total", &pipeline)
            .await
            .unwrap_or(0.0),
        0.0
    );
    let (ok, out) = walcast(&["resume", &pipeline, "-c", &config]);
    assert!(ok && out.contains("resumed"), "walcast resume: {out}");
    let want = table_rows(&db, "t").await;
    let (t2, w2) = (topic_t.clone(), want.clone());
    let (records, converged) =
        tokio::task::spawn_blocking(move || consume_json_until(&t2, WAIT, |r| rebuild(r).0 == w2))
            .await
            .unwrap();
    let (rows, creates) = rebuild(&records);
    let missing: Vec<_> = want
        .iter()
        .filter(|(k, v)| rows.get(k) != Some(v))
        .collect();
    let extra: Vec<_> = rows
        .iter()
        .filter(|(k, v)| want.get(k) != Some(v))
        .collect();
    assert!(
        converged && missing.is_empty() && extra.is_empty(),
        "Kafka differs from Postgres after resume: missing or different {missing:?}, extra {extra:?}"
    );
    assert_eq!(want.len(), 195);
    let doubled: Vec<_> = creates.iter().filter(|(_, n)| **n != 1).collect();
    assert!(
        doubled.is_empty() && creates.len() == 200,
        "creates per id: {doubled:?} of {}",
        creates.len()
    );
    let moved_to = written;
    w.wait_confirmed(&db, &slot, moved_to, WAIT, "the slot after resume")
        .await;

    // The command's pause and a second resume through the API.
    let (ok, out) = walcast(&["pause", &pipeline, "-c", &config]);
    assert!(ok && out.contains("paused"), "walcast pause: {out}");
    let (code, answer) = call(&w, &api("resume"), Some(json!({})), Some(TOKEN)).await;
    assert_eq!(
        (code, answer["state"].as_str()),
        (200, Some("streaming")),
        "{answer}"
    );
    let (code, answer) = call(&w, &api("resume"), Some(json!({})), Some(TOKEN)).await;
    assert_eq!(code, 200, "{answer}");
    assert!(
        answer["message"].as_str().unwrap().contains("not paused"),
        "{answer}"
    );

    // An incremental snapshot through the API: 'r' events of s.
    let (code, answer) = call(
        &w,
        &api("snapshot"),
        Some(json!({"tables": ["public.nope"]})),
        Some(TOKEN),
    )
    .await;
    assert_eq!(code, 400, "{answer}");
    assert!(
        answer["error"]
            .as_str()
            .unwrap()
            .contains("does not capture public.nope"),
        "{answer}"
    );
    let (code, answer) = call(
        &w,
        &api("snapshot"),
        Some(json!({"tables": ["s"]})),
        Some(TOKEN),
    )
    .await;
    assert_eq!(code, 200, "{answer}");
    assert_eq!(answer["tables"], json!(["public.s"]), "{answer}");
    let t2 = topic_s.clone();
    let records = tokio::task::spawn_blocking(move || consume_json(&t2, WAIT, |r| r.len() >= 20))
        .await
        .unwrap();
    let (rows, _) = rebuild(&records);
    assert!(
        records
            .iter()
            .all(|(_, v)| v.as_ref().is_some_and(|v| v["op"] == "r")),
        "the snapshot's events are reads"
    );
    assert_eq!(rows, table_rows(&db, "s").await);
    let (code, answer) = call(&w, &api("snapshot/stop"), Some(json!({})), Some(TOKEN)).await;
    assert_eq!(code, 200, "{answer}");
    // The command goes through the daemon as well.
    let (ok, out) = walcast(&["snapshot", "-c", &config, "public.s"]);
    assert!(
        ok && out.contains("public.s") && !out.contains("directly"),
        "walcast snapshot: {out}"
    );
    // A relay is not paused (409, saying why); an unknown pipeline is a 404.
    let (code, answer) = call(
        &w,
        &format!("/api/v1/pipelines/{pipeline}_relay/pause"),
        Some(json!({})),
        Some(TOKEN),
    )
    .await;
    assert_eq!(code, 409, "{answer}");
    assert!(
        answer["error"].as_str().unwrap().contains("relay"),
        "{answer}"
    );
    let (code, _) = call(
        &w,
        "/api/v1/pipelines/nope/pause",
        Some(json!({})),
        Some(TOKEN),
    )
    .await;
    assert_eq!(code, 404);

    // The audit lines: one per action, with how the caller got in and who.
    let log = w.log();
    let audit: Vec<Value> = log
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["target"] == "walcast::audit")
        .collect();
    let find = |action: &str, code: u64| {
        audit
            .iter()
            .find(|v| v["action"] == action && v["code"] == code)
            .unwrap_or_else(|| panic!("no audit line for {action} {code}: {audit:?}"))
    };
    for (action, code) in [
        ("pause", 200),
        ("resume", 200),
        ("slots-list", 200),
        ("slot-drop", 400),
        ("slot-drop", 409),
        ("slot-drop", 200),
        ("snapshot", 200),
        ("snapshot-stop", 200),
    ] {
        let line = find(action, code);
        assert_eq!(line["caller"], "token", "{line}");
        assert_eq!(line["actor"], ACTOR, "{line}");
        assert!(
            line["peer"].as_str().unwrap().starts_with("127.0.0.1:"),
            "{line}"
        );
    }
    assert!(
        !audit.iter().any(|v| v["code"] == 401),
        "refused requests never reach an action"
    );

    // Decommissioned: with the daemon stopped, the command drops the slot
    // directly, after the confirmation.
    assert!(w.terminate().success());
    let (ok, out) = walcast(&["slots", "drop", "--pipeline", &pipeline, "-c", &config]);
    assert!(!ok && out.contains("--confirm"), "{out}");
    let (ok, out) = walcast(&[
        "slots",
        "drop",
        "--pipeline",
        &pipeline,
        "--confirm",
        &slot,
        "-c",
        &config,
    ]);
    assert!(ok, "{out}");
    assert!(
        out.contains("no walcast daemon answers")
            && out.contains(&format!("dropped replication slot {slot}")),
        "{out}"
    );
    assert!(
        db.confirmed_flush(&slot).await.is_none(),
        "the slot is gone"
    );
}

/// Beyond loopback without a token, status stays readable (as before) but
/// no action is taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn actions_are_refused_beyond_loopback_without_a_token() {
    let db = TestDb::new("wc_mgmt_open").await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY, v text);")
        .await;
    let w = Walcast::start_with(|out, admin| {
        file_pipeline_config(
            "open",
            &db.name,
            &["public.t"],
            "",
            out,
            &admin.replace("127.0.0.1", "0.0.0.0"),
        )
    });
    w.wait_state("streaming", WAIT).await;
    let (code, answer) = call(&w, "/api/v1/pipelines/open/pause", Some(json!({})), None).await;
    assert_eq!(code, 403, "{answer}");
    assert!(
        answer["error"]
            .as_str()
            .unwrap()
            .contains("admin.token_file"),
        "{answer}"
    );
    let (code, answer) = call(&w, "/api/v1/slots", None, None).await;
    assert_eq!(code, 200, "{answer}");
    assert_eq!(
        w.status().await.unwrap()["pipelines"][0]["state"],
        "streaming"
    );
    assert!(
        w.log().contains("\"caller\":\"no token\""),
        "the audit line says no token:\n{}",
        tail(&w.log(), 2000)
    );
}
