//! `walcast check` on broken configs and broken servers: one actionable
//! error each, non-zero exit, nothing created. Also the standby takeover of
//! a slot held by another process.

mod support;

use std::path::PathBuf;
use std::time::Duration;

use support::*;

fn write(dir: &tempfile::TempDir, name: &str, text: &str) -> PathBuf {
    let p = dir.path().join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn config(port: u16, db: &str, user: &str, tables: &str, extra: &str) -> String {
    format!(
        r#"[pipelines.chk]
kind = "capture"
format = "json"
[pipelines.chk.source]
host = "127.0.0.1"
port = {port}
database = "{db}"
user = "{user}"
tables = [{tables}]
connect_timeout = "3s"
{extra}
[[pipelines.chk.sinks]]
type = "file"
path = "-"
"#
    )
}

fn expect_error(path: &std::path::Path, needles: &[&str]) {
    let (ok, out) = check(path);
    assert!(
        !ok,
        "walcast check should fail for {}:\n{out}",
        path.display()
    );
    for n in needles {
        assert!(
            out.contains(n),
            "expected {n:?} in the output of check {}:\n{out}",
            path.display()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_files_are_named_precisely() {
    let dir = tempfile::tempdir().unwrap();
    let good = config(pg_port(), "postgres", "postgres", r#""public.t""#, "");
    let unknown = write(
        &dir,
        "unknown.toml",
        &good.replace(
            "user = \"postgres\"",
            "user = \"postgres\"\nusername = \"x\"",
        ),
    );
    expect_error(&unknown, &["unknown.toml", "username"]);
    let wrong_type = write(
        &dir,
        "type.toml",
        &good.replace(&format!("port = {}", pg_port()), "port = \"high\""),
    );
    expect_error(&wrong_type, &["type.toml", "port"]);
    let bad_url = write(
        &dir,
        "url.toml",
        &good.replace("format = \"json\"", "").replace(
            "[[pipelines.chk.sinks]]\ntype = \"file\"\npath = \"-\"",
            "[pipelines.chk.registry]\nurl = \"not a url\"\n[[pipelines.chk.sinks]]\ntype = \"kafka\"\nbootstrap_servers = \"127.0.0.1:1\"",
        ),
    );
    expect_error(&bad_url, &["url.toml", "registry"]);
    let no_registry = write(
        &dir,
        "noreg.toml",
        &good.replace("format = \"json\"", "").replace(
            "type = \"file\"\npath = \"-\"",
            "type = \"kafka\"\nbootstrap_servers = \"127.0.0.1:1\"",
        ),
    );
    expect_error(
        &no_registry,
        &["pipelines.chk.registry", "format = \"json\""],
    );
    let unreachable = write(
        &dir,
        "down.toml",
        &config(free_port(), "postgres", "postgres", r#""public.t""#, ""),
    );
    expect_error(&unreachable, &["cannot connect to Postgres", "127.0.0.1"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_problems_each_get_one_actionable_message() {
    let db = TestDb::new("wc_check").await;
    let role = unique("norep");
    let reader = unique("nosel");
    db.exec(&format!(
        "CREATE TABLE good (id int PRIMARY KEY); CREATE TABLE nokey (v int);
         CREATE ROLE {role} LOGIN; GRANT SELECT ON good TO {role};
         CREATE ROLE {reader} LOGIN REPLICATION;"
    ))
    .await;
    let dir = tempfile::tempdir().unwrap();
    let port = pg_port();
    let c = |name: &str, user: &str, tables: &str| {
        write(&dir, name, &config(port, &db.name, user, tables, ""))
    };

    expect_error(
        &c("norep.toml", &role, r#""public.good""#),
        &[
            "lacks the REPLICATION attribute",
            &format!("ALTER ROLE \"{role}\" REPLICATION"),
        ],
    );
    expect_error(
        &c("nosel.toml", &reader, r#""public.good""#),
        &["lacks SELECT on public.good", "GRANT SELECT"],
    );
    expect_error(
        &c("missing.toml", "postgres", r#""public.nope""#),
        &["public.nope does not exist"],
    );
    expect_error(
        &c("nokey.toml", "postgres", r#""public.nokey""#),
        &["no primary key", "keyless_tables"],
    );

    // A good config reports its plan and creates nothing.
    let (ok, out) = check(&c("good.toml", "postgres", r#""public.good""#));
    assert!(ok, "{out}");
    assert!(
        out.contains("would create publication") && out.contains("would create replication slot"),
        "{out}"
    );
    let slots: i64 = db
        .client
        .query_one(
            "SELECT count(*) FROM pg_replication_slots WHERE database = current_database()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let pubs: i64 = db
        .client
        .query_one("SELECT count(*) FROM pg_publication", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!((slots, pubs), (0, 0), "check created nothing");
    db.exec(&format!(
        "DROP OWNED BY {role}; DROP ROLE {role}; DROP ROLE {reader};"
    ))
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wal_level_replica_and_exhausted_slots_are_explained() {
    let replica = TempCluster::start(&["wal_level = replica"]);
    replica
        .client()
        .await
        .batch_execute("CREATE TABLE t (id int PRIMARY KEY)")
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let p = write(
        &dir,
        "replica.toml",
        &config(replica.port, "postgres", "postgres", r#""public.t""#, ""),
    );
    expect_error(
        &p,
        &[
            "wal_level = replica",
            "ALTER SYSTEM SET wal_level = logical",
        ],
    );
    drop(replica);

    let full = TempCluster::start(&[
        "wal_level = logical",
        "max_replication_slots = 1",
        "max_wal_senders = 4",
    ]);
    let c = full.client().await;
    c.batch_execute("CREATE TABLE t (id int PRIMARY KEY)")
        .await
        .unwrap();
    c.batch_execute("SELECT pg_create_logical_replication_slot('someone_else', 'pgoutput')")
        .await
        .unwrap();
    let p = write(
        &dir,
        "slots.toml",
        &config(full.port, "postgres", "postgres", r#""public.t""#, ""),
    );
    expect_error(&p, &["all 1 replication slots", "max_replication_slots"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_waits_for_the_slot_and_takes_over() {
    let db = TestDb::new("wc_standby").await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY)").await;
    let mut active = Walcast::start_with(|out, admin| {
        file_pipeline_config(
            "standby",
            &db.name,
            &["public.t"],
            "retry_max_backoff = \"1s\"",
            out,
            admin,
        )
    });
    active
        .wait_state("streaming", Duration::from_secs(60))
        .await;
    let standby = Walcast::start_with(|out, admin| {
        file_pipeline_config(
            "standby",
            &db.name,
            &["public.t"],
            "retry_max_backoff = \"1s\"",
            out,
            admin,
        )
    });
    let s = standby.wait_state("standby", Duration::from_secs(60)).await;
    let err = s["pipelines"][0]["last_error"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(err.contains("in use by another process"), "{err}");
    let (code, _) = standby.http("/readyz").await.unwrap();
    assert_eq!(code, 503, "a standby is not ready");

    active.kill9();
    standby
        .wait_state("streaming", Duration::from_secs(60))
        .await;
    db.exec("INSERT INTO t VALUES (1)").await;
    standby
        .wait_events(
            "the row, through the standby",
            Duration::from_secs(60),
            |e| e.len() == 1,
        )
        .await;
    let (code, _) = standby.http("/readyz").await.unwrap();
    assert_eq!(code, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_dropped_under_a_running_daemon_is_never_recreated() {
    let db = TestDb::new("wc_slotdrop").await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY)").await;
    let mut w = Walcast::start_with(|out, admin| {
        file_pipeline_config(
            "slotdrop",
            &db.name,
            &["public.t"],
            "retry_max_backoff = \"1s\"",
            out,
            admin,
        )
    });
    w.wait_state("streaming", Duration::from_secs(60)).await;
    db.exec(
        "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = 'walcast_slotdrop';",
    )
    .await;
    // Drop it while the daemon reconnects (retry until it is not active).
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let r = db
            .client
            .batch_execute("SELECT pg_drop_replication_slot('walcast_slotdrop')")
            .await;
        if r.is_ok() {
            break;
        }
        let _ = db.client.batch_execute("SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = 'walcast_slotdrop' AND active_pid IS NOT NULL").await;
        assert!(
            std::time::Instant::now() < deadline,
            "could not drop the slot: {r:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The daemon stops with a definite error and does not recreate it.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(st) = w.exited() {
            break st;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "walcast kept running after its slot was dropped:\n{}",
            tail(&w.log(), 3000)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(!status.success());
    assert!(
        w.log().contains("disappeared while walcast was streaming"),
        "{}",
        tail(&w.log(), 3000)
    );
    let slots: i64 = db
        .client
        .query_one(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'walcast_slotdrop'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(slots, 0, "the slot was not silently recreated");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identifiers_with_mixed_case_spaces_and_quotes_work() {
    let db = TestDb::new("wc_idents").await;
    db.exec(r#"CREATE SCHEMA "Sales Dept"; CREATE TABLE "Sales Dept"."Order ""Items""" ("Id" int PRIMARY KEY, "Unit Price" numeric(6,2));"#).await;
    let w = Walcast::start_with(|out, admin| {
        file_pipeline_config(
            "idents",
            &db.name,
            &[],
            r#"tables = ['"Sales Dept"."Order ""Items"""']"#,
            out,
            admin,
        )
        .replace("tables = []\n", "")
    });
    w.wait_state("streaming", Duration::from_secs(60)).await;
    db.exec(r#"INSERT INTO "Sales Dept"."Order ""Items""" VALUES (1, 9.99)"#)
        .await;
    let ev = w
        .wait_events("the row", Duration::from_secs(60), |e| e.len() == 1)
        .await;
    assert_eq!(ev[0]["value"]["source"]["schema"], "Sales Dept");
    assert_eq!(ev[0]["value"]["source"]["table"], "Order \"Items\"");
    assert_eq!(
        ev[0]["value"]["after"],
        serde_json::json!({"Id": 1, "Unit Price": "9.99"})
    );
    assert_eq!(ev[0]["key"], serde_json::json!({"Id": 1}));
}
