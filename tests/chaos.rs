//! The chaos test: continuous mixed load while everything that can fail
//! does — walcast killed with -9 again and again, Postgres restarted, the
//! Kafka broker killed with -9 and restarted, Redis and OpenSearch stopped
//! for 20 s each. At the end every table is rebuilt from the Kafka topics by
//! a plain consumer (none of walcast's code) and compared with Postgres; the
//! search index must equal Postgres and Redis must hold no stale row.
//!
//! Short form by default (about two minutes); `WALCAST_CHAOS_LONG=1` runs
//! ten rounds of faults.

mod support;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use rand::Rng;
use serde_json::Value;
#[allow(unused_imports)]
use support::consume_json_until;
use support::*;

const WAIT: Duration = Duration::from_secs(180);

fn kill9_pidfile(var_name: &str) {
    let pid = std::fs::read_to_string(var(var_name))
        .expect("pid file")
        .trim()
        .to_string();
    let _ = std::process::Command::new("kill")
        .args(["-9", &pid])
        .status();
}

/// Mixed load: inserts, updates and deletes in small transactions, over two
/// tables; reconnects when Postgres restarts. Stops when told.
fn load(db: String, stop: tokio::sync::watch::Receiver<bool>) -> tokio::task::JoinHandle<u64> {
    tokio::spawn(async move {
        let mut committed = 0u64;
        let mut next_id = 1i64;
        'outer: loop {
            let c = match tokio::time::timeout(Duration::from_secs(5), connect_quiet(&db)).await {
                Ok(Some(c)) => c,
                _ => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    if *stop.borrow() {
                        break;
                    }
                    continue;
                }
            };
            loop {
                if *stop.borrow() {
                    break 'outer;
                }
                let sql = {
                    let mut r = rand::rng();
                    let mut stmts = vec!["BEGIN".to_string()];
                    for _ in 0..r.random_range(1..8) {
                        let pick = r.random_range(0..10);
                        let target = r.random_range(1..next_id.max(2));
                        stmts.push(match pick {
                            0..=4 => {
                                next_id += 1;
                                format!("INSERT INTO accounts VALUES ({}, {}, 'n{}')", next_id, r.random_range(0..1000), next_id)
                            }
                            5..=7 => format!("UPDATE accounts SET balance = balance + {}, note = note || '.' WHERE id = {target}", r.random_range(1..50)),
                            8 => format!("DELETE FROM accounts WHERE id = {target}"),
                            _ => format!("INSERT INTO ledger (account, amount) VALUES ({target}, {})", r.random_range(-100..100)),
                        });
                    }
                    stmts.push("COMMIT".into());
                    stmts.join("; ")
                };
                match c.batch_execute(&sql).await {
                    Ok(()) => committed += 1,
                    Err(_) => continue 'outer,
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        committed
    })
}

async fn connect_quiet(db: &str) -> Option<tokio_postgres::Client> {
    let (client, conn) = tokio_postgres::Config::new()
        .host("127.0.0.1")
        .port(pg_port())
        .user("postgres")
        .dbname(db)
        .connect(tokio_postgres::NoTls)
        .await
        .ok()?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Some(client)
}

async fn table_rows(db: &str, sql: &str) -> BTreeMap<String, Value> {
    let c = connect(db).await;
    let rows = c.query(sql, &[]).await.unwrap();
    rows.iter()
        .map(|r| {
            let v: Value = serde_json::from_str(&r.get::<_, String>(1)).unwrap();
            (r.get::<_, String>(0), v)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chaos_loses_nothing() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    chaos(false).await;
}

/// The same faults with the Kafka sink in exactly-once mode: zero lost and
/// zero duplicates for a read_committed consumer (librdkafka's default
/// isolation, which the rebuilding consumer uses).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chaos_exactly_once_loses_nothing_and_duplicates_nothing() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    chaos(true).await;
}

/// Both variants stop shared servers: one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

async fn chaos(exactly_once: bool) {
    let long = std::env::var("WALCAST_CHAOS_LONG").is_ok_and(|v| v == "1");
    let rounds = if long { 10 } else { 1 };
    let db = TestDb::new("wc_chaos").await;
    db.exec(
        "CREATE TABLE accounts (id bigint PRIMARY KEY, balance int NOT NULL, note text);
         CREATE TABLE ledger (id bigserial PRIMARY KEY, account bigint, amount int, at timestamptz DEFAULT now());",
    )
    .await;
    let prefix = unique(if exactly_once { "chaoseos" } else { "chaos" });
    let delivery = if exactly_once {
        format!("delivery = {{ mode = \"exactly_once\", transactional_id = \"{prefix}\", offsets_topic = \"{prefix}.offsets\" }}")
    } else {
        String::new()
    };
    let search = var("WALCAST_TEST_OPENSEARCH_URL");
    let redis_url = var("WALCAST_TEST_REDIS_URL");
    let mut w = Walcast::start_with(|_, admin| {
        KafkaCapture::new(
            "chaos",
            &db.name,
            &prefix,
            &["public.accounts", "public.ledger"],
        )
        .source("retry_max_backoff = \"2s\"")
        .create_topics()
        .sink(&delivery)
        .toml(admin)
            + &relay_to_redis_and_search(
                &prefix,
                &format!("{prefix}.public.accounts"),
                &format!("{prefix}-{{table}}"),
                200,
            )
    });
    w.wait_state("streaming", WAIT).await;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let writer = load(db.name.clone(), stop_rx);
    let mut faults: Vec<String> = Vec::new();
    let pause = |s: u64| tokio::time::sleep(Duration::from_secs(s));
    for round in 0..rounds {
        pause(3).await;
        for _ in 0..3 {
            w.kill9();
            faults.push(format!("round {round}: kill -9 walcast"));
            w.spawn();
            tokio::time::sleep(Duration::from_millis(rand::rng().random_range(500..2500))).await;
        }
        kill9_pidfile("WALCAST_TEST_KAFKA_PIDFILE");
        faults.push(format!("round {round}: kill -9 kafka, restart after 5 s"));
        pause(5).await;
        stack(&["start", "kafka"]);
        pause(3).await;
        if round == 0 {
            stack(&["stop", "postgres"]);
            faults.push(format!("round {round}: restart postgres"));
            pause(2).await;
            stack(&["start", "postgres"]);
            pause(3).await;
        }
        stack(&["stop", "redis"]);
        faults.push(format!("round {round}: redis down 20 s"));
        pause(20).await;
        stack(&["start", "redis"]);
        stack(&["stop", "opensearch"]);
        faults.push(format!("round {round}: opensearch down 20 s"));
        pause(20).await;
        stack(&["start", "opensearch"]);
        w.kill9();
        faults.push(format!("round {round}: kill -9 walcast"));
        w.spawn();
    }
    pause(3).await;
    stop_tx.send(true).unwrap();
    let committed = writer.await.unwrap();

    // Rebuild both tables from Kafka with a plain consumer.
    let pg_accounts = table_rows(
        &db.name,
        "SELECT id::text, to_jsonb(a)::text FROM accounts a",
    )
    .await;
    let pg_ledger = table_rows(
        &db.name,
        "SELECT id::text, (to_jsonb(l) - 'at')::text FROM ledger l",
    )
    .await;
    let mut report = Vec::new();
    let mut total_dups = 0;
    for (table, pg) in [("accounts", &pg_accounts), ("ledger", &pg_ledger)] {
        let topic = format!("{prefix}.public.{table}");
        let rebuild =
            |records: &[(Value, Option<Value>)]| -> (BTreeMap<String, Value>, usize, Vec<String>) {
                let mut state: BTreeMap<String, Value> = BTreeMap::new();
                let mut seen: HashSet<(String, u64)> = HashSet::new();
                let mut last: HashMap<String, u64> = HashMap::new();
                let mut dups = 0;
                let mut disorder = Vec::new();
                for (key, value) in records {
                    let Some(v) = value else { continue };
                    let id = key["id"].to_string();
                    let lsn = v["source"]["lsn"].as_u64().unwrap_or(0);
                    if !seen.insert((id.clone(), lsn)) {
                        dups += 1;
                        continue;
                    }
                    if let Some(prev) = last.insert(id.clone(), lsn) {
                        if lsn < prev {
                            disorder.push(format!("{table} {id}: {lsn} after {prev}"));
                        }
                    }
                    match v["op"].as_str() {
                        Some("d") => {
                            state.remove(&id);
                        }
                        Some("c") | Some("u") | Some("r") => {
                            let mut after = v["after"].clone();
                            if let Some(o) = after.as_object_mut() {
                                o.remove("at");
                            }
                            state.insert(id, after);
                        }
                        _ => {}
                    }
                }
                (state, dups, disorder)
            };
        let expected: Vec<(String, Value)> =
            pg.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        let (records, _) = consume_json_until(&topic, WAIT, |r| {
            let (state, _, _) = rebuild(r);
            expected.iter().all(|(k, v)| state.get(k) == Some(v)) && state.len() == expected.len()
        });
        let (state, dups, disorder) = rebuild(&records);
        if &state != pg {
            let missing: Vec<_> = pg
                .iter()
                .filter(|(k, v)| state.get(*k) != Some(v))
                .take(5)
                .collect();
            let extra: Vec<_> = state
                .iter()
                .filter(|(k, _)| !pg.contains_key(*k))
                .take(5)
                .collect();
            panic!(
                "{table} rebuilt from Kafka differs from Postgres: {} rows vs {}; differing {missing:?}; extra {extra:?}\nwalcast errors:\n{}",
                state.len(),
                pg.len(),
                w.log().lines().filter(|l| l.contains("ERROR") || l.contains("WARN")).take(30).collect::<Vec<_>>().join("\n")
            );
        }
        assert!(disorder.is_empty(), "per-row order broken: {disorder:?}");
        total_dups += dups;
        report.push(format!(
            "{table}: {} rows, {} records, lost 0, duplicates {dups}",
            pg.len(),
            records.len()
        ));
    }

    eprintln!(
        "chaos, Kafka side{}:\n  {}",
        if exactly_once { " (exactly-once)" } else { "" },
        report.join("\n  ")
    );

    // The search index equals Postgres; Redis serves no stale row. The
    // relay may still be catching up (the long form leaves it ~10^5 rows
    // behind on a busy machine): wait while it makes progress, fail when
    // it stalls.
    let http = reqwest::Client::new();
    let mut last_progress = Instant::now();
    let mut last_seen = (usize::MAX, usize::MAX);
    let redis = redis::Client::open(redis_url.as_str()).unwrap();
    let index = format!("{prefix}-accounts");
    let deadline = Instant::now() + WAIT;
    loop {
        let count = search_count(&http, &search, &index).await.unwrap_or(0) as usize;
        // Every 37th row compared in full (the index is too big to fetch in one page).
        let mut index_diffs = 0;
        if count == pg_accounts.len() {
            for (id, row) in pg_accounts.iter().step_by(37) {
                let doc: Value = match http.get(format!("{search}/{index}/_doc/{id}")).send().await
                {
                    Ok(r) => r.json().await.unwrap_or(Value::Null),
                    Err(_) => Value::Null,
                };
                if &doc["_source"] != row {
                    index_diffs += 1;
                }
            }
        }
        let mut stale = 0;
        if let Ok(mut conn) = redis.get_multiplexed_async_connection().await {
            for (id, row) in &pg_accounts {
                let v: Option<String> = redis::cmd("GET")
                    .arg(format!("{prefix}:{id}"))
                    .query_async(&mut conn)
                    .await
                    .unwrap_or(None);
                if let Some(v) = v {
                    if &serde_json::from_str::<Value>(&v).unwrap() != row {
                        stale += 1;
                    }
                }
            }
        }
        if count == pg_accounts.len() && index_diffs == 0 && stale == 0 {
            report.push(format!("search index: {count} documents, as many as rows, sampled rows equal; redis: no stale row"));
            break;
        }
        if (count, stale) != last_seen {
            last_seen = (count, stale);
            last_progress = Instant::now();
        }
        assert!(
            Instant::now() < deadline || last_progress.elapsed() < Duration::from_secs(90),
            "sinks stopped converging: index {count} docs vs {} rows ({index_diffs} sampled differ), {stale} stale Redis rows, no progress for 90 s",
            pg_accounts.len()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    eprintln!("chaos report{} ({} committed transactions):\n  faults: {}\n  {}\n  duplicates total: {total_dups}", if exactly_once { " (exactly-once)" } else { "" }, committed, faults.join("; "), report.join("\n  "));
    if exactly_once {
        assert_eq!(
            total_dups, 0,
            "exactly-once: duplicates seen by a read_committed consumer"
        );
    }
}
