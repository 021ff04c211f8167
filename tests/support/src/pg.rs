//! Postgres: connections, a fresh database per test (dropped with its
//! slots on drop), writers, and the comparison of a table with what a sink
//! rebuilt from events; a throw-away cluster for tests that stop Postgres.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tokio_postgres::{Client, NoTls};

use crate::daemon::{tail, Walcast};
use crate::stack::{free_port, pg_port, var};

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

/// The rows of table `c (id int, v text)` that [`restart_tolerant_writer`]
/// writes to, as `rebuild_rows` gives them from events.
pub async fn rows_of_c(client: &Client) -> BTreeMap<i64, String> {
    client
        .query("SELECT id::int8, v FROM c", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get::<_, i64>(0), r.get::<_, String>(1)))
        .collect()
}

/// Single-row transactions (an insert and an update) to table `c` of the
/// `postgres` database on whichever of `ports` accepts writes, until told
/// to stop, riding over restarts and failovers; returns how many the
/// servers acknowledged. Ids continue from what the server has: after a
/// failover the last few acknowledged commits may be gone with the old
/// primary (an insert that meets an id again updates it).
pub fn restart_tolerant_writer(
    ports: &[u16],
    stop: tokio::sync::watch::Receiver<bool>,
) -> tokio::task::JoinHandle<u64> {
    let ports = ports.to_vec();
    tokio::spawn(async move {
        let (mut n, mut id) = (0u64, 0i64);
        while !*stop.borrow() {
            let mut cfg = tokio_postgres::Config::new();
            for p in &ports {
                cfg.host("127.0.0.1").port(*p);
            }
            let conn = cfg
                .user("postgres")
                .dbname("postgres")
                .target_session_attrs(tokio_postgres::config::TargetSessionAttrs::ReadWrite)
                .connect_timeout(Duration::from_secs(2))
                .connect(NoTls)
                .await;
            let Ok((c, conn)) = conn else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            tokio::spawn(async move {
                let _ = conn.await;
            });
            let Ok(row) = c
                .query_one("SELECT coalesce(max(id), 0)::int8 FROM c", &[])
                .await
            else {
                continue;
            };
            id = id.max(row.get::<_, i64>(0));
            while !*stop.borrow() {
                let r = c
                    .batch_execute(&format!(
                        "INSERT INTO c VALUES ({}, 'v') ON CONFLICT (id) DO UPDATE SET v = 'again'; UPDATE c SET v = 'u{n}' WHERE id = {};",
                        id + 1,
                        id / 2 + 1
                    ))
                    .await;
                if r.is_err() {
                    break;
                }
                id += 1;
                n += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        n
    })
}
