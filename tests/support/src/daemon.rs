//! The walcast binary run as a user runs it: a config file, `walcast run`,
//! its admin server and log, and the one-shot subcommands.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::pg::TestDb;
use crate::stack::{free_port, pg_port, var};

/// The walcast binary, run with a config file in a temporary folder.
pub struct Walcast {
    pub child: Option<Child>,
    pub dir: PathBuf,
    pub config: PathBuf,
    pub out: PathBuf,
    pub admin: String,
    _tmp: Option<tempfile::TempDir>,
}

/// The walcast binary cargo built for this `cargo test`: beside the test
/// binary's `deps/` folder (a library cannot see `CARGO_BIN_EXE_walcast`,
/// which cargo gives integration tests only).
pub fn bin() -> &'static str {
    static BIN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        let exe = std::env::current_exe().expect("the test binary's path");
        let dir = exe
            .parent()
            .and_then(|d| d.parent())
            .expect("target/<profile>");
        let bin = dir.join("walcast");
        assert!(
            bin.exists(),
            "{} does not exist: run the tests with cargo test, which builds it",
            bin.display()
        );
        bin.to_string_lossy().into_owned()
    })
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
