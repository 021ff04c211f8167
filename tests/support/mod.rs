//! What every end-to-end test needs: the stack's servers (named by the
//! WALCAST_TEST_* variables that `deploy/local/stack env` prints), a fresh
//! database per test, and the walcast binary run as a user would run it.
//!
//! Nothing here sleeps for a fixed time: waits poll for a condition with a
//! deadline and fail with what was seen. Everything a test creates is
//! removed on drop, panics included, so no slot pins WAL after a failure.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio_postgres::{Client, NoTls};

pub fn var(name: &str) -> String {
    if std::env::var("WALCAST_TEST_STACK_DIR").is_err() {
        own_stack();
    }
    std::env::var(name).unwrap_or_else(|_| {
        panic!(
            "{name} is not set: these tests run against the local stack. Start it and load its settings with\n  \
             deploy/local/stack up && eval \"$(deploy/local/stack env)\"\nor run everything with deploy/local/test"
        )
    })
}

/// Without a stack named by WALCAST_TEST_*, the tests start their own
/// (`target/stack-auto`, shared by the test binaries of one `cargo test`)
/// and a watchdog that stops it when that `cargo test` exits, panics
/// included, so no server outlives the run.
fn own_stack() {
    static STARTED: std::sync::Once = std::sync::Once::new();
    STARTED.call_once(|| {
        let root = env!("CARGO_MANIFEST_DIR");
        let dir = format!("{root}/target/stack-auto");
        let script = format!("{root}/deploy/local/stack");
        let up = Command::new("bash")
            .arg(&script)
            .args(["up", "--with", "debezium"])
            .env("WALCAST_STACK_DIR", &dir)
            .stdout(Stdio::inherit())
            .stderr(Stdio::inherit())
            .status()
            .expect("run deploy/local/stack up");
        assert!(up.success(), "deploy/local/stack up failed; see the logs under {dir}");
        let env = Command::new("bash").arg(&script).arg("env").env("WALCAST_STACK_DIR", &dir).output().expect("stack env");
        for line in String::from_utf8_lossy(&env.stdout).lines() {
            if let Some((k, v)) = line.trim_start_matches("export ").split_once('=') {
                if k.starts_with("WALCAST_") {
                    std::env::set_var(k, v.trim_matches(|c| c == '\'' || c == '"'));
                }
            }
        }
        let cargo = std::os::unix::process::parent_id();
        let _ = Command::new("setsid")
            .arg("bash")
            .arg("-c")
            .arg(format!("while kill -0 {cargo} 2>/dev/null; do sleep 2; done; WALCAST_STACK_DIR='{dir}' bash '{script}' down >/dev/null 2>&1"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
    });
}

pub fn pg_port() -> u16 {
    var("WALCAST_TEST_PG_PORT")
        .parse()
        .expect("WALCAST_TEST_PG_PORT is a port")
}

pub async fn connect(db: &str) -> Client {
    connect_as(db, "postgres", None).await
}

pub async fn connect_as(db: &str, user: &str, password: Option<&str>) -> Client {
    let mut cfg = tokio_postgres::Config::new();
    cfg.host("127.0.0.1").port(pg_port()).user(user).dbname(db);
    if let Some(p) = password {
        cfg.password(p);
    }
    let (client, conn) = cfg
        .connect(NoTls)
        .await
        .unwrap_or_else(|e| panic!("connecting to {db} as {user}: {e}"));
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

pub fn unique(prefix: &str) -> String {
    let n: u64 = rand::random::<u64>() % 1_000_000_000;
    format!("{prefix}_{n}")
}

/// A database of its own for one test, dropped (with its slots) on drop.
pub struct TestDb {
    pub name: String,
    pub client: Client,
}

impl TestDb {
    pub async fn new(prefix: &str) -> Self {
        let name = unique(prefix);
        connect("postgres")
            .await
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("create database");
        let client = connect(&name).await;
        TestDb { name, client }
    }

    pub async fn exec(&self, sql: &str) {
        self.client
            .batch_execute(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
    }

    pub async fn confirmed_flush(&self, slot: &str) -> Option<u64> {
        let row = self
            .client
            .query_opt("SELECT (confirmed_flush_lsn - '0/0')::bigint FROM pg_replication_slots WHERE slot_name = $1", &[&slot])
            .await
            .expect("slot query");
        row.and_then(|r| r.get::<_, Option<i64>>(0))
            .map(|v| v as u64)
    }

    pub async fn current_wal(&self) -> u64 {
        self.client
            .query_one("SELECT (pg_current_wal_lsn() - '0/0')::bigint", &[])
            .await
            .expect("wal")
            .get::<_, i64>(0) as u64
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        // Drop is synchronous and may run while a runtime unwinds: clean up
        // on a thread with a runtime of its own.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            rt.block_on(async move {
                let c = connect("postgres").await;
                for _ in 0..50 {
                    let _ = c
                        .batch_execute(&format!(
                            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE database = '{name}' AND active_pid IS NOT NULL;
                             SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE database = '{name}' AND NOT active;"
                        ))
                        .await;
                    let left: i64 = c
                        .query_one("SELECT count(*) FROM pg_replication_slots WHERE database = $1", &[&name])
                        .await
                        .map(|r| r.get(0))
                        .unwrap_or(0);
                    if left == 0 {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                let _ = c.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).await;
            });
        })
        .join();
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// The walcast binary, run with a config file in a temporary folder.
pub struct Walcast {
    pub child: Option<Child>,
    pub dir: PathBuf,
    pub config: PathBuf,
    pub out: PathBuf,
    pub admin: String,
    _tmp: Option<tempfile::TempDir>,
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_walcast")
}

/// A config for one capture pipeline of `db` writing JSON lines to a file.
pub fn file_pipeline_config(
    pipeline: &str,
    db: &str,
    tables: &[&str],
    extra_source: &str,
    out: &Path,
    admin: &str,
) -> String {
    file_pipeline_config_with(pipeline, db, tables, extra_source, "", "", out, admin)
}

/// As [`file_pipeline_config`], with extra keys for the pipeline table and
/// the file sink too (the snapshot tests set both).
#[allow(clippy::too_many_arguments)]
pub fn file_pipeline_config_with(
    pipeline: &str,
    db: &str,
    tables: &[&str],
    extra_source: &str,
    extra_pipeline: &str,
    extra_sink: &str,
    out: &Path,
    admin: &str,
) -> String {
    let tables: Vec<String> = tables.iter().map(|t| format!("{t:?}")).collect();
    format!(
        r#"[admin]
listen = "{admin}"
[log]
format = "json"
level = "info,walcast=debug"
[pipelines.{pipeline}]
kind = "capture"
{extra_pipeline}
[pipelines.{pipeline}.source]
host = "127.0.0.1"
port = {port}
database = "{db}"
user = "postgres"
tables = [{tables}]
status_interval = "1s"
{extra_source}
[[pipelines.{pipeline}.sinks]]
type = "file"
path = "{out}"
{extra_sink}
"#,
        port = pg_port(),
        tables = tables.join(", "),
        out = out.display()
    )
}

/// A capture pipeline of `db` to the stack's Kafka, as TOML: the config the
/// Kafka end-to-end tests share, with a slot for each kind of extra setting.
/// JSON, `status_interval = "1s"` and a plain sink unless told otherwise.
#[derive(Clone, Debug)]
pub struct KafkaCapture {
    pipeline: String,
    db: String,
    prefix: String,
    tables: Vec<String>,
    format: String,
    bootstrap: String,
    top: String,
    log: String,
    pipeline_extra: String,
    registry: Option<String>,
    source: String,
    sink: String,
}

impl KafkaCapture {
    pub fn new(pipeline: &str, db: &str, prefix: &str, tables: &[&str]) -> Self {
        KafkaCapture {
            pipeline: pipeline.into(),
            db: db.into(),
            prefix: prefix.into(),
            tables: tables.iter().map(|t| t.to_string()).collect(),
            format: "json".into(),
            bootstrap: var("WALCAST_TEST_KAFKA_BOOTSTRAP"),
            top: String::new(),
            log: String::new(),
            pipeline_extra: String::new(),
            registry: None,
            source: "status_interval = \"1s\"\n".into(),
            sink: String::new(),
        }
    }

    /// Avro through the registry at `url`, with extra `[registry]` keys.
    pub fn avro(mut self, url: &str, extra_registry: &str) -> Self {
        self.format = "avro".into();
        self.registry = Some(format!("url = \"{url}\"\n{extra_registry}\n"));
        self
    }

    /// Another broker (the SASL listener).
    pub fn bootstrap(mut self, bootstrap: &str) -> Self {
        self.bootstrap = bootstrap.into();
        self
    }

    /// Lines before everything else (other top-level tables).
    pub fn top(mut self, lines: &str) -> Self {
        self.top.push_str(lines);
        self.top.push('\n');
        self
    }

    /// Extra `[log]` keys.
    pub fn log(mut self, lines: &str) -> Self {
        self.log.push_str(lines);
        self.log.push('\n');
        self
    }

    /// Extra keys of the pipeline's own table.
    pub fn pipeline(mut self, lines: &str) -> Self {
        self.pipeline_extra.push_str(lines);
        self.pipeline_extra.push('\n');
        self
    }

    /// Extra source keys.
    pub fn source(mut self, lines: &str) -> Self {
        self.source.push_str(lines);
        self.source.push('\n');
        self
    }

    /// Extra Kafka sink keys (and sub-tables, last).
    pub fn sink(mut self, lines: &str) -> Self {
        self.sink.push_str(lines);
        self.sink.push('\n');
        self
    }

    /// `create_topics = true` with 3 partitions per topic.
    pub fn create_topics(self) -> Self {
        self.sink("create_topics = true\ntopic_creation = { partitions = 3 }")
    }

    /// The config file's text, with the admin endpoint on `admin`.
    pub fn toml(&self, admin: &str) -> String {
        let KafkaCapture {
            pipeline,
            db,
            prefix,
            format,
            bootstrap,
            top,
            log,
            pipeline_extra,
            source,
            sink,
            ..
        } = self;
        let tables: Vec<String> = self.tables.iter().map(|t| format!("{t:?}")).collect();
        let registry = self
            .registry
            .as_ref()
            .map(|r| format!("[pipelines.{pipeline}.registry]\n{r}"))
            .unwrap_or_default();
        format!(
            r#"{top}[admin]
listen = "{admin}"
[log]
format = "json"
{log}[pipelines.{pipeline}]
kind = "capture"
topic_prefix = "{prefix}"
format = "{format}"
{pipeline_extra}{registry}[pipelines.{pipeline}.source]
port = {port}
database = "{db}"
user = "postgres"
tables = [{tables}]
{source}[[pipelines.{pipeline}.sinks]]
type = "kafka"
bootstrap_servers = "{bootstrap}"
{sink}"#,
            port = pg_port(),
            tables = tables.join(", "),
        )
    }
}

impl Walcast {
    /// Writes `config` (with `{out}` and `{admin}` available through the
    /// returned paths) and starts `walcast run`.
    pub fn start_with(config_text: impl FnOnce(&Path, &str) -> String) -> Self {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().to_path_buf();
        let out = dir.join("events.jsonl");
        let admin = format!("127.0.0.1:{}", free_port());
        let config = dir.join("walcast.toml");
        std::fs::write(&config, config_text(&out, &admin)).expect("write config");
        let mut w = Walcast {
            child: None,
            dir,
            config,
            out,
            admin,
            _tmp: Some(tmp),
        };
        w.spawn();
        w
    }

    pub fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("walcast.log"))
            .expect("log file");
        // In the test's folder, so that relative paths (the default
        // `state_dir`) stay out of the source tree.
        let child = Command::new(bin())
            .current_dir(&self.dir)
            .args(["run", "-c"])
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start walcast");
        self.child = Some(child);
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("walcast.log")).unwrap_or_default()
    }

    /// kill -9: no chance to drain or confirm anything.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// kill -9 mid-write, then drops the file sink's torn last line (it
    /// belongs to a batch that was never acknowledged); returns how many
    /// events the file keeps. For the resume-after-kill tests.
    pub fn kill9_keeping_whole_lines(&mut self) -> usize {
        self.kill9();
        let text = std::fs::read(&self.out).expect("the file sink's output");
        let keep = text
            .iter()
            .rposition(|b| *b == b'\n')
            .map(|p| p + 1)
            .unwrap_or(0);
        std::fs::write(&self.out, &text[..keep]).expect("trim the sink's file");
        self.events().len()
    }

    /// SIGTERM, then the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("running");
        Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status()
            .expect("kill -TERM");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(st) = c.try_wait().expect("wait") {
                return st;
            }
            assert!(
                Instant::now() < deadline,
                "walcast did not exit within 30 s of SIGTERM:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().expect("wait"))
    }

    /// Every JSON line the file sink wrote so far.
    pub fn events(&self) -> Vec<serde_json::Value> {
        let text = std::fs::read_to_string(&self.out).unwrap_or_default();
        // Only whole lines: the sink may be in the middle of writing the last.
        let complete = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
        complete
            .lines()
            .filter(|l| !l.is_empty())
            .map(|l| serde_json::from_str(l).expect("a JSON line"))
            .collect()
    }

    /// Waits until `pred` holds over the events written so far.
    pub async fn wait_events(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&[serde_json::Value]) -> bool,
    ) -> Vec<serde_json::Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let ev = self.events();
            if pred(&ev) {
                return ev;
            }
            if Instant::now() > deadline {
                panic!(
                    "timed out waiting for {what}; {} events so far; log:\n{}",
                    ev.len(),
                    tail(&self.log(), 4000)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn http(&self, path: &str) -> Option<(u16, String)> {
        let resp = reqwest::get(format!("http://{}{path}", self.admin))
            .await
            .ok()?;
        let code = resp.status().as_u16();
        Some((code, resp.text().await.unwrap_or_default()))
    }

    /// The value of the series `name` whose labels include `labels`, from
    /// /metrics (no token).
    pub async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let (_, body) = self.http("/metrics").await?;
        body.lines().find_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let rest = series.strip_prefix(name)?;
            let all = rest.is_empty() || rest.starts_with('{');
            (all && labels
                .iter()
                .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\""))))
            .then(|| value.parse().ok())
            .flatten()
        })
    }

    pub async fn status(&self) -> Option<serde_json::Value> {
        let (_, body) = self.http("/status").await?;
        serde_json::from_str(&body).ok()
    }

    /// Waits until `/status` satisfies `pred`: the one status poll with a
    /// deadline that the waits on the admin endpoint share.
    pub async fn wait_status(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.status().await {
                if pred(&s) {
                    return s;
                }
            }
            if Instant::now() > deadline {
                panic!(
                    "timed out waiting for {what}: {:?}\nlog:\n{}",
                    self.status().await,
                    tail(&self.log(), 4000)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until the admin endpoint reports the first pipeline in `state`.
    pub async fn wait_state(&self, state: &str, timeout: Duration) -> serde_json::Value {
        self.wait_status(
            &format!("the pipeline to reach {state} (it never did)"),
            timeout,
            |s| s["pipelines"][0]["state"] == state,
        )
        .await
    }

    /// Waits until the pipeline has stopped on an error: the process exited
    /// or /status says `failed`. Shared by every test of a fatal error;
    /// `what` names the cause in the failure message.
    pub async fn wait_failed(&mut self, what: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if self.exited().is_some()
                || self
                    .status()
                    .await
                    .is_some_and(|s| s["pipelines"][0]["state"] == "failed")
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{what} did not stop the pipeline:\n{}",
                tail(&self.log(), 4000)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until `db`'s replication slot `slot` confirms `lsn` (everything
    /// up to it acknowledged); panics with `failure`, the slot's position
    /// and the log's tail when `timeout` passes first.
    pub async fn wait_confirmed(
        &self,
        db: &TestDb,
        slot: &str,
        lsn: u64,
        timeout: Duration,
        failure: &str,
    ) {
        let deadline = Instant::now() + timeout;
        loop {
            let confirmed = db.confirmed_flush(slot).await;
            if confirmed.is_some_and(|c| c >= lsn) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{failure}: slot {slot} confirmed {confirmed:?}, waiting for {lsn}\nlog:\n{}",
                tail(&self.log(), 3000)
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The JSON state file `name` under the default `state_dir`, if written
    /// (snapshot progress files).
    pub fn state_file(&self, name: &str) -> Option<serde_json::Value> {
        let text = std::fs::read_to_string(self.dir.join("walcast-state").join(name)).ok()?;
        serde_json::from_str(&text).ok()
    }
}

impl Drop for Walcast {
    fn drop(&mut self) {
        self.kill9();
    }
}

pub fn tail(s: &str, n: usize) -> &str {
    let start = s.len().saturating_sub(n);
    let start = (start..s.len())
        .find(|i| s.is_char_boundary(*i))
        .unwrap_or(s.len());
    &s[start..]
}

/// Runs `walcast check -c FILE`; returns (success, stdout + stderr).
pub fn check(config: &Path) -> (bool, String) {
    cli("check", config, &[])
}

/// Runs `walcast SUBCOMMAND -c FILE ARGS...` as a user would; returns
/// (success, stdout + stderr).
pub fn cli(subcommand: &str, config: &Path, args: &[&str]) -> (bool, String) {
    let out = Command::new(bin())
        .args([subcommand, "-c"])
        .arg(config)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run walcast {subcommand}: {e}"));
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Applies the change events of `table` (as the file sink writes them) in
/// order, per `id` key: the `id -> v` rows a sink would hold. The snapshot
/// tests rebuild their tables with it.
pub fn rebuild_rows(events: &[serde_json::Value], table: &str) -> BTreeMap<i64, String> {
    let mut rows = BTreeMap::new();
    for e in events
        .iter()
        .filter(|e| e["value"]["source"]["table"].as_str().unwrap_or("?") == table)
    {
        let v = &e["value"];
        match v["op"].as_str().unwrap_or("?") {
            "r" | "c" | "u" => {
                let after = &v["after"];
                if let Some(before) = v["before"]["id"].as_i64() {
                    rows.remove(&before);
                }
                rows.insert(
                    after["id"].as_i64().unwrap(),
                    after["v"].as_str().unwrap_or("<null>").to_string(),
                );
            }
            "d" => {
                rows.remove(&v["before"]["id"].as_i64().unwrap());
            }
            other => panic!("unexpected op {other}: {e}"),
        }
    }
    rows
}

/// Concurrent load on `big (id, v)` for the snapshot tests: small
/// transactions of an insert, an update, (with `hot`, an update of a second
/// row,) a delete and a key change, until told to stop. Returns how many
/// committed.
pub fn big_writer(
    db: String,
    hot: bool,
    first_new_id: i32,
    stop: tokio::sync::watch::Receiver<bool>,
) -> tokio::task::JoinHandle<u64> {
    tokio::spawn(async move {
        let c = connect(&db).await;
        let mut n = 0u64;
        let mut next = first_new_id;
        while !*stop.borrow() {
            let k = (rand::random::<u32>() % first_new_id as u32) as i32 + 1;
            let hot_update = if hot {
                format!("UPDATE big SET v = 'hot {n}' WHERE id = {};", k + 3)
            } else {
                String::new()
            };
            c.batch_execute(&format!(
                "BEGIN;
                 INSERT INTO big VALUES ({next}, 'new {next}');
                 UPDATE big SET v = v || ' u{n}' WHERE id = {k};
                 {hot_update}
                 DELETE FROM big WHERE id = {};
                 UPDATE big SET id = id + 1000000 WHERE id = {};
                 COMMIT;",
                k + 7,
                k + 13
            ))
            .await
            .unwrap();
            next += 1;
            n += 1;
        }
        n
    })
}

/// `table`'s `id -> v` rows as Postgres has them, to compare with
/// [`rebuild_rows`].
pub async fn table_rows(db: &TestDb, table: &str) -> BTreeMap<i64, String> {
    db.client
        .query(
            &format!("SELECT id::int8, coalesce(v, '<null>') FROM {table}"),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get::<_, i64>(0), r.get::<_, String>(1)))
        .collect()
}

/// Waits until the events of `table` rebuild it as Postgres has it;
/// returns the events. On timeout, names the differing and extra rows.
pub async fn converge(
    w: &Walcast,
    db: &TestDb,
    table: &str,
    timeout: Duration,
) -> Vec<serde_json::Value> {
    let want = table_rows(db, table).await;
    let deadline = Instant::now() + timeout;
    loop {
        let ev = w.events();
        let got = rebuild_rows(&ev, table);
        if got == want {
            return ev;
        }
        if Instant::now() > deadline {
            let differing: Vec<_> = want
                .iter()
                .filter(|(k, v)| got.get(k) != Some(v))
                .take(5)
                .map(|(k, v)| (k, v, got.get(k)))
                .collect();
            let extra: Vec<_> = got
                .iter()
                .filter(|(k, _)| !want.contains_key(k))
                .take(5)
                .collect();
            panic!(
                "events never rebuilt {table}: {} rows vs {} in Postgres; differing (key, postgres, events) {differing:?}, extra {extra:?}\nlog:\n{}",
                got.len(),
                want.len(),
                tail(&w.log(), 4000)
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A Postgres cluster of its own, for settings the shared one must not
/// have (wal_level=replica, a single replication slot). Stopped on drop.
pub struct TempCluster {
    pub port: u16,
    dir: tempfile::TempDir,
}

impl TempCluster {
    pub fn start(settings: &[&str]) -> Self {
        let bin = PathBuf::from(var("WALCAST_TEST_PG_BIN"));
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("data");
        let port = free_port();
        let as_pg = |cmd: &Path| {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(cmd);
            c
        };
        Command::new("chown")
            .args(["-R", "postgres"])
            .arg(dir.path())
            .status()
            .expect("chown");
        let st = as_pg(&bin.join("initdb"))
            .args(["-A", "trust", "-U", "postgres", "-D"])
            .arg(&data)
            .stdout(Stdio::null())
            .status()
            .expect("initdb");
        assert!(st.success(), "initdb failed");
        let mut conf = format!("port = {port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\nfsync = off\n", dir.path().display());
        for s in settings {
            conf.push_str(s);
            conf.push('\n');
        }
        std::fs::write(data.join("postgresql.auto.conf"), conf).expect("conf");
        let st = as_pg(&bin.join("pg_ctl"))
            .args(["-D"])
            .arg(&data)
            .args(["-l"])
            .arg(dir.path().join("log"))
            .args(["-w", "start"])
            .stdout(Stdio::null())
            .status()
            .expect("pg_ctl");
        assert!(
            st.success(),
            "pg_ctl start failed: {}",
            std::fs::read_to_string(dir.path().join("log")).unwrap_or_default()
        );
        TempCluster { port, dir }
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn pg_ctl(&self, args: &[&str]) -> bool {
        let bin = PathBuf::from(var("WALCAST_TEST_PG_BIN"));
        Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(bin.join("pg_ctl"))
            .arg("-D")
            .arg(self.data_dir())
            .arg("-l")
            .arg(self.dir.path().join("log"))
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    }

    /// Stops the server with `pg_ctl stop -m MODE` (smart, fast,
    /// immediate), keeping its data.
    pub fn stop_mode(&self, mode: &str) {
        assert!(
            self.pg_ctl(&["-m", mode, "-w", "stop"]),
            "pg_ctl stop -m {mode} failed"
        );
    }

    /// Stops the server at once (connections are cut), keeping its data.
    pub fn stop(&self) {
        assert!(
            self.pg_ctl(&["-m", "immediate", "-w", "stop"]),
            "pg_ctl stop failed"
        );
    }

    /// Starts it again on the same port.
    pub fn start_again(&self) {
        assert!(
            self.pg_ctl(&["-w", "start"]),
            "pg_ctl start failed: {}",
            std::fs::read_to_string(self.dir.path().join("log")).unwrap_or_default()
        );
    }

    pub async fn client(&self) -> Client {
        let (client, conn) = tokio_postgres::Config::new()
            .host("127.0.0.1")
            .port(self.port)
            .user("postgres")
            .dbname("postgres")
            .connect(NoTls)
            .await
            .expect("connect temp cluster");
        tokio::spawn(async move {
            let _ = conn.await;
        });
        client
    }
}

impl Drop for TempCluster {
    fn drop(&mut self) {
        let bin = PathBuf::from(std::env::var("WALCAST_TEST_PG_BIN").unwrap_or_default());
        let _ = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(bin.join("pg_ctl"))
            .args(["-D"])
            .arg(self.dir.path().join("data"))
            .args(["-m", "immediate", "-w", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// Runs `deploy/local/stack ARGS` on the stack the tests use (for outage
/// tests: `stop kafka`, `start kafka`).
pub fn stack(args: &[&str]) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/local/stack");
    let out = Command::new("bash")
        .arg(script)
        .args(args)
        .env("WALCAST_STACK_DIR", var("WALCAST_TEST_STACK_DIR"))
        .output()
        .expect("run deploy/local/stack");
    assert!(
        out.status.success(),
        "stack {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Reads a topic from the beginning with a plain consumer (none of
/// walcast's code) until `done` holds over the JSON values read, or the
/// deadline passes. Returns (key, value) pairs; tombstones have no value.
pub fn consume_json(
    topic: &str,
    timeout: Duration,
    done: impl Fn(&[(serde_json::Value, Option<serde_json::Value>)]) -> bool,
) -> Vec<(serde_json::Value, Option<serde_json::Value>)> {
    let (records, finished) = consume_json_until(topic, timeout, done);
    assert!(
        finished,
        "timed out reading {topic}: {} records",
        records.len()
    );
    records
}

/// As [`consume_json`], but returns what it read when the deadline passes,
/// with `false`, so the caller can explain the difference.
pub fn consume_json_until(
    topic: &str,
    timeout: Duration,
    done: impl Fn(&[(serde_json::Value, Option<serde_json::Value>)]) -> bool,
) -> (Vec<(serde_json::Value, Option<serde_json::Value>)>, bool) {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::Message;
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", var("WALCAST_TEST_KAFKA_BOOTSTRAP"))
        .set("group.id", unique("verify"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .set("topic.metadata.refresh.interval.ms", "500")
        .create()
        .expect("consumer");
    consumer.subscribe(&[topic]).expect("subscribe");
    let mut out = Vec::new();
    let deadline = Instant::now() + timeout;
    let mut idle = 0;
    loop {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                idle = 0;
                let key = m
                    .key()
                    .map(|k| serde_json::from_slice(k).expect("JSON key"))
                    .unwrap_or(serde_json::Value::Null);
                let value = m
                    .payload()
                    .map(|v| serde_json::from_slice(v).expect("JSON value"));
                out.push((key, value));
                continue;
            }
            _ => idle += 1,
        }
        // Check the (possibly costly) condition when the topic goes quiet.
        if idle >= 1 && done(&out) {
            return (out, true);
        }
        if Instant::now() > deadline {
            return (out, false);
        }
    }
}

/// One record of a JSON topic as a plain consumer reads it: where it is
/// (partition, offset), its key and its value (`None` for a tombstone).
#[derive(Clone, Debug)]
pub struct JsonRecord {
    pub partition: i32,
    pub offset: i64,
    pub key: serde_json::Value,
    pub value: Option<serde_json::Value>,
}

/// As [`consume_json_until`], keeping each record's partition and offset,
/// for checks that depend on Kafka's order (last write wins per key).
pub fn consume_records_until(
    topic: &str,
    timeout: Duration,
    done: impl Fn(&[JsonRecord]) -> bool,
) -> (Vec<JsonRecord>, bool) {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::Message;
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", var("WALCAST_TEST_KAFKA_BOOTSTRAP"))
        .set("group.id", unique("verify"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .set("topic.metadata.refresh.interval.ms", "500")
        .create()
        .expect("consumer");
    consumer.subscribe(&[topic]).expect("subscribe");
    let mut out = Vec::new();
    let deadline = Instant::now() + timeout;
    loop {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                out.push(JsonRecord {
                    partition: m.partition(),
                    offset: m.offset(),
                    key: m
                        .key()
                        .map(|k| serde_json::from_slice(k).expect("JSON key"))
                        .unwrap_or(serde_json::Value::Null),
                    value: m
                        .payload()
                        .map(|v| serde_json::from_slice(v).expect("JSON value")),
                });
                continue;
            }
            // Check the (possibly costly) condition when the topic goes quiet.
            _ => {
                if done(&out) {
                    return (out, true);
                }
            }
        }
        if Instant::now() > deadline {
            return (out, false);
        }
    }
}

/// Reads the first `n` records of an Avro topic from the beginning and
/// decodes them through the registry at `registry_url`: (schema id, event)
/// pairs, in the order read. Fails after `timeout` with how many arrived.
pub async fn consume_avro(
    registry_url: &str,
    topic: &str,
    n: usize,
    timeout: Duration,
) -> Vec<(u32, serde_json::Value)> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::Message;
    let decoder = walcast_schemas::AvroDecoder::new(std::sync::Arc::new(
        walcast_schemas::HttpRegistry::new(&walcast_schemas::RegistryConfig::new(registry_url))
            .expect("registry client"),
    ));
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", var("WALCAST_TEST_KAFKA_BOOTSTRAP"))
        .set("group.id", unique("avro"))
        .set("auto.offset.reset", "earliest")
        .create()
        .expect("consumer");
    consumer.subscribe(&[topic]).expect("subscribe");
    let mut raw = Vec::new();
    let deadline = Instant::now() + timeout;
    while raw.len() < n {
        assert!(
            Instant::now() < deadline,
            "{} of {n} records on {topic}",
            raw.len()
        );
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
            if let Some(p) = m.payload() {
                raw.push(p.to_vec());
            }
        }
    }
    let mut out = Vec::new();
    for r in raw {
        out.push(
            decoder
                .decode(&r)
                .await
                .expect("decode through the registry"),
        );
    }
    out
}

/// Serves `router` on a free loopback port for the rest of the test; returns
/// its URL. The failure-injecting proxies run on it.
pub async fn serve(router: axum::Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move {
        axum::serve(listener, router).await.expect("serve");
    });
    url
}

/// What the failure-injecting proxies do with a request they let through:
/// sends it to `upstream` (same method, path, query and body, with
/// `headers`) and answers with upstream's status, body and content type.
pub async fn forward(
    http: &reqwest::Client,
    upstream: &str,
    method: &axum::http::Method,
    uri: &axum::http::Uri,
    headers: &[(&str, &str)],
    body: axum::body::Bytes,
) -> axum::response::Response {
    let url = format!(
        "{upstream}{}",
        uri.path_and_query().map(|x| x.as_str()).unwrap_or("/")
    );
    let mut req = http.request(
        reqwest::Method::from_bytes(method.as_str().as_bytes()).unwrap(),
        url,
    );
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    let resp = req.body(body.to_vec()).send().await.unwrap();
    let status = axum::http::StatusCode::from_u16(resp.status().as_u16()).unwrap();
    let content_type = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json")
        .to_string();
    let bytes = resp.bytes().await.unwrap();
    axum::response::Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(axum::body::Body::from(bytes))
        .unwrap()
}

/// A relay pipeline named `relay` from `topic` to the stack's Redis (upsert
/// under `{prefix}:{id}`) and OpenSearch (`index_template`), as TOML to
/// append to a config: the fan-out the outage and chaos tests check.
pub fn relay_to_redis_and_search(
    prefix: &str,
    topic: &str,
    index_template: &str,
    flush_interval_ms: u64,
) -> String {
    format!(
        r#"
[pipelines.relay]
kind = "relay"
[pipelines.relay.source]
bootstrap_servers = "{bootstrap}"
group_id = "{prefix}-relay"
subscribe = {{ topics = ["{topic}"] }}
consumer = {{ "topic.metadata.refresh.interval.ms" = "500" }}
[[pipelines.relay.sinks]]
type = "redis"
urls = ["{redis_url}"]
mode = {{ type = "upsert", key_template = "{prefix}:{{id}}" }}
retry_max_ms = 1000
[[pipelines.relay.sinks]]
type = "elasticsearch"
url = "{search}"
index_template = "{index_template}"
flush_interval_ms = {flush_interval_ms}
retry_max_ms = 1000
"#,
        bootstrap = var("WALCAST_TEST_KAFKA_BOOTSTRAP"),
        redis_url = var("WALCAST_TEST_REDIS_URL"),
        search = var("WALCAST_TEST_OPENSEARCH_URL"),
    )
}

/// Refreshes the OpenSearch `index` at `search` and counts its documents;
/// `None` while OpenSearch does not answer. How the tests see what a
/// search sink has delivered.
pub async fn search_count(http: &reqwest::Client, search: &str, index: &str) -> Option<u64> {
    let _ = http.post(format!("{search}/{index}/_refresh")).send().await;
    let count: serde_json::Value = http
        .get(format!("{search}/{index}/_count"))
        .send()
        .await
        .ok()?
        .json()
        .await
        .unwrap_or(serde_json::Value::Null);
    count["count"].as_u64()
}

/// The OpenSearch document `id` of `index` as JSON (`_source` holds the
/// row; a missing one answers `found: false`).
pub async fn search_doc(
    http: &reqwest::Client,
    search: &str,
    index: &str,
    id: impl std::fmt::Display,
) -> serde_json::Value {
    http.get(format!("{search}/{index}/_doc/{id}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}
