//! The chaos test: continuous mixed load while everything that can fail
//! does — walcast killed with -9 again and again, Postgres restarted, the
//! Kafka broker killed with -9 and restarted, Redis and OpenSearch stopped
//! for 20 s each. At the end:
//!
//! - every table is rebuilt from its Kafka topic by a plain consumer (none
//!   of walcast's code) as any consumer would apply it: in offset order
//!   within the key's partition, last write wins, deletes and tombstones
//!   remove the row. Each row must equal Postgres column by column, with no
//!   row missing and none extra; no change of a row may follow a newer one
//!   (duplicates after a crash are counted, and must be 0 in exactly-once);
//! - Redis (upsert) and the search index must each hold exactly Postgres's
//!   rows of `accounts`: same keys both ways, every column equal. One
//!   exception: the stack's Redis has no persistence, so stopping it wipes
//!   it; a row whose last change committed before Redis last went down may
//!   be missing from it (counted in the report), never stale or extra.
//!
//! A difference names the table, the key, the column and both values.
//!
//! Short form by default (one round of faults, about two minutes per
//! variant); `WALCAST_CHAOS_LONG=1` runs ten rounds. Runs of the long form
//! (and of the short one with `WALCAST_CHAOS_RECORD=1`) append their report
//! to tests/chaos/RESULTS.md.

mod support;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::time::{Duration, Instant};

use rand::Rng;
use serde_json::Value;
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
    let started = Instant::now();
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
    // When Redis last went down: the stack runs it without persistence, so
    // a stop wipes it (see the Redis check at the end).
    let mut redis_stopped_ms = 0u64;
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
        redis_stopped_ms = now_ms();
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

    // Postgres is the truth. Every column is compared: `at` (timestamptz)
    // in the text walcast's JSON gives it (microseconds, UTC, `Z`).
    let pg_accounts = table_rows(
        &db.name,
        "SELECT id::text, to_jsonb(a)::text FROM accounts a",
    )
    .await;
    let pg_ledger = table_rows(
        &db.name,
        r#"SELECT id::text, jsonb_set(to_jsonb(l), '{at}',
                  to_jsonb(to_char(l.at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')))::text
           FROM ledger l"#,
    )
    .await;
    let walcast_errors = |w: &Walcast| {
        w.log()
            .lines()
            .filter(|l| l.contains("ERROR") || l.contains("WARN"))
            .take(30)
            .collect::<Vec<_>>()
            .join("\n")
    };

    // Rebuild both tables from Kafka with a plain consumer: last write wins
    // per key, in offset order within the key's partition.
    let mut report = Vec::new();
    let mut total_dups = 0;
    let mut accounts_last_commit = HashMap::new();
    for (table, pg) in [("accounts", &pg_accounts), ("ledger", &pg_ledger)] {
        let topic = format!("{prefix}.public.{table}");
        let (records, _) = consume_records_until(&topic, WAIT, |r| &rebuild(r).state == pg);
        let rebuilt = rebuild(&records);
        let diffs = diff_rows(table, "kafka", pg, &rebuilt.state);
        assert!(
            diffs.is_empty(),
            "{table} rebuilt from Kafka ({} records, {} rows) differs from Postgres ({} rows) in {} places:\n  {}\nwalcast errors:\n{}",
            records.len(),
            rebuilt.state.len(),
            pg.len(),
            diffs.len(),
            diffs.iter().take(20).cloned().collect::<Vec<_>>().join("\n  "),
            walcast_errors(&w)
        );
        assert!(
            rebuilt.disorder.is_empty(),
            "{table}: per-row order broken in {} places: {:?}",
            rebuilt.disorder.len(),
            rebuilt.disorder.iter().take(20).collect::<Vec<_>>()
        );
        total_dups += rebuilt.dups;
        if table == "accounts" {
            accounts_last_commit = rebuilt.last_commit_ms.clone();
        }
        report.push(format!(
            "{table}: {} rows, {} records, every row's columns equal Postgres both ways (lost 0, extra 0), order kept, duplicates {}",
            pg.len(),
            records.len(),
            rebuilt.dups
        ));
    }

    eprintln!(
        "chaos, Kafka side{}:\n  {}",
        if exactly_once { " (exactly-once)" } else { "" },
        report.join("\n  ")
    );

    // The search index and Redis each equal Postgres: the same keys (none
    // missing, none extra) and the same values, column by column. The relay
    // may still be catching up (the long form leaves it ~10^5 rows behind
    // on a busy machine): wait while it makes progress, fail when it stalls.
    let http = reqwest::Client::new();
    let mut last_progress = Instant::now();
    let mut last_seen = (usize::MAX, usize::MAX, usize::MAX);
    let redis = redis::Client::open(redis_url.as_str()).unwrap();
    let index = format!("{prefix}-accounts");
    let deadline = Instant::now() + WAIT;
    loop {
        let redis_rows = redis_rows(&redis, &format!("{prefix}:")).await;
        // The stack's Redis keeps nothing across a stop, and nothing tells
        // the relay it lost its data: a row whose last change committed
        // before Redis last went down may be missing (if present it must
        // be equal). Every other row must be there, equal, and no key may
        // be extra.
        let mut wiped = 0;
        let redis_diffs = match &redis_rows {
            Some(rows) => {
                let expected: BTreeMap<String, Value> = pg_accounts
                    .iter()
                    .filter(|(id, _)| {
                        let lost_in_restart = !rows.contains_key(*id)
                            && accounts_last_commit
                                .get(*id)
                                .is_some_and(|t| *t < redis_stopped_ms);
                        wiped += lost_in_restart as usize;
                        !lost_in_restart
                    })
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                diff_rows("accounts", "redis", &expected, rows)
            }
            None => vec!["redis: not answering".to_string()],
        };
        let count = search_count(&http, &search, &index).await.unwrap_or(0) as usize;
        // Fetching the whole index costs a scroll: only once the count fits.
        let index_diffs = if count == pg_accounts.len() {
            match search_rows(&http, &search, &index).await {
                Some(rows) => diff_rows("accounts", "index", &pg_accounts, &rows),
                None => vec!["index: not answering".to_string()],
            }
        } else {
            vec![format!(
                "index: {count} documents for {} rows",
                pg_accounts.len()
            )]
        };
        if redis_diffs.is_empty() && index_diffs.is_empty() {
            report.push(format!(
                "search index: {count} documents, each equal to its Postgres row (none missing, none extra); \
                 redis: {} keys, each equal to its Postgres row, none extra; missing only {wiped} rows last changed \
                 before Redis (no persistence) last went down",
                redis_rows.map(|r| r.len()).unwrap_or(0)
            ));
            break;
        }
        let seen = (count, redis_diffs.len(), index_diffs.len());
        if seen != last_seen {
            last_seen = seen;
            last_progress = Instant::now();
        }
        assert!(
            Instant::now() < deadline || last_progress.elapsed() < Duration::from_secs(90),
            "sinks stopped converging (no progress for 90 s): {} rows in Postgres\n\
             redis, {} differences:\n  {}\nindex, {} differences:\n  {}",
            pg_accounts.len(),
            redis_diffs.len(),
            redis_diffs
                .iter()
                .take(20)
                .cloned()
                .collect::<Vec<_>>()
                .join("\n  "),
            index_diffs.len(),
            index_diffs
                .iter()
                .take(20)
                .cloned()
                .collect::<Vec<_>>()
                .join("\n  "),
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let summary = format!(
        "chaos report{} ({} committed transactions, {} s):\n  faults: {}\n  {}\n  duplicates total: {total_dups}",
        if exactly_once { " (exactly-once)" } else { "" },
        committed,
        started.elapsed().as_secs(),
        faults.join("; "),
        report.join("\n  ")
    );
    eprintln!("{summary}");
    if exactly_once {
        assert_eq!(
            total_dups, 0,
            "exactly-once: duplicates seen by a read_committed consumer"
        );
    }
    record_run(
        long,
        exactly_once,
        rounds,
        committed,
        total_dups,
        started.elapsed(),
        &summary,
    );
}

/// A table as rebuilt from its topic.
struct Rebuilt {
    /// Row per key (the key's `id` as text), last write winning.
    state: BTreeMap<String, Value>,
    /// Records repeating a change already read (same key, same `source.lsn`).
    dups: usize,
    /// Changes of a row read after a newer change of it, and keys found in
    /// more than one partition.
    disorder: Vec<String>,
    /// Commit time (`source.ts_ms`) of each key's last change.
    last_commit_ms: HashMap<String, u64>,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// Applies a topic's records the way any consumer of it would: in offset
/// order within each partition, the last write of a key winning (a delete
/// or a tombstone removes the row). Duplicates (a change repeated after a
/// crash) are applied again, as a consumer would, and counted.
fn rebuild(records: &[JsonRecord]) -> Rebuilt {
    let mut ordered: Vec<&JsonRecord> = records.iter().collect();
    ordered.sort_by_key(|r| (r.partition, r.offset));
    let mut state = BTreeMap::new();
    let mut seen: HashSet<(String, u64)> = HashSet::new();
    let mut newest: HashMap<String, u64> = HashMap::new();
    let mut partition_of: HashMap<String, i32> = HashMap::new();
    let mut dups = 0;
    let mut disorder = Vec::new();
    let mut last_commit_ms = HashMap::new();
    for r in ordered {
        let id = r.key["id"].to_string();
        if let Some(p) = partition_of.insert(id.clone(), r.partition) {
            if p != r.partition {
                disorder.push(format!("key {id} in partitions {p} and {}", r.partition));
            }
        }
        let Some(v) = &r.value else {
            state.remove(&id);
            continue;
        };
        let lsn = v["source"]["lsn"].as_u64().unwrap_or(0);
        last_commit_ms.insert(id.clone(), v["source"]["ts_ms"].as_u64().unwrap_or(0));
        if !seen.insert((id.clone(), lsn)) {
            dups += 1;
        } else if let Some(prev) = newest.insert(id.clone(), lsn) {
            if lsn < prev {
                disorder.push(format!(
                    "key {id}: lsn {lsn} at {}:{} after lsn {prev}",
                    r.partition, r.offset
                ));
                newest.insert(id.clone(), prev);
            }
        }
        match v["op"].as_str() {
            Some("d") => {
                state.remove(&id);
            }
            Some("c") | Some("u") | Some("r") => {
                state.insert(id, v["after"].clone());
            }
            other => disorder.push(format!("key {id}: unexpected op {other:?}")),
        }
    }
    Rebuilt {
        state,
        dups,
        disorder,
        last_commit_ms,
    }
}

/// Every difference between Postgres's rows and a copy of them (`side`),
/// both ways: rows missing from the copy, rows only in the copy, and for
/// each row in both every column present on either side whose values
/// differ (a column absent on one side is a difference).
fn diff_rows(
    table: &str,
    side: &str,
    pg: &BTreeMap<String, Value>,
    copy: &BTreeMap<String, Value>,
) -> Vec<String> {
    let show = |v: Option<&Value>| v.map_or("<absent>".to_string(), |v| v.to_string());
    let mut out = Vec::new();
    for (key, row) in pg {
        let Some(other) = copy.get(key) else {
            out.push(format!(
                "{table} key={key}: missing from {side}; postgres={row}"
            ));
            continue;
        };
        match (row.as_object(), other.as_object()) {
            (Some(a), Some(b)) => {
                let columns: BTreeSet<&String> = a.keys().chain(b.keys()).collect();
                for col in columns {
                    if a.get(col) != b.get(col) {
                        out.push(format!(
                            "{table} key={key} column={col}: postgres={} {side}={}",
                            show(a.get(col)),
                            show(b.get(col))
                        ));
                    }
                }
            }
            _ if row != other => {
                out.push(format!("{table} key={key}: postgres={row} {side}={other}"))
            }
            _ => {}
        }
    }
    for (key, row) in copy {
        if !pg.contains_key(key) {
            out.push(format!(
                "{table} key={key}: extra in {side}, not in postgres; {side}={row}"
            ));
        }
    }
    out
}

/// Every row the Redis upsert sink holds under `prefix` (keys
/// `<prefix><id>`; the version keys, `{<prefix><id>}:__v`, do not match),
/// by id. `None` while Redis does not answer.
async fn redis_rows(client: &redis::Client, prefix: &str) -> Option<BTreeMap<String, Value>> {
    let mut conn = client.get_multiplexed_async_connection().await.ok()?;
    let mut keys: Vec<String> = Vec::new();
    let mut cursor: u64 = 0;
    loop {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}*"))
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut conn)
            .await
            .ok()?;
        keys.extend(batch);
        if next == 0 {
            break;
        }
        cursor = next;
    }
    keys.sort();
    keys.dedup();
    let mut rows = BTreeMap::new();
    for chunk in keys.chunks(1000) {
        let values: Vec<Option<String>> = redis::cmd("MGET")
            .arg(chunk)
            .query_async(&mut conn)
            .await
            .ok()?;
        for (key, value) in chunk.iter().zip(values) {
            // A key deleted between SCAN and MGET is simply not there.
            if let Some(v) = value {
                let parsed = serde_json::from_str(&v).unwrap_or(Value::String(v));
                rows.insert(key[prefix.len()..].to_string(), parsed);
            }
        }
    }
    Some(rows)
}

/// Every document of `index` (its `_source`, by `_id`), through a scroll.
/// `None` while OpenSearch does not answer.
async fn search_rows(
    http: &reqwest::Client,
    search: &str,
    index: &str,
) -> Option<BTreeMap<String, Value>> {
    let _ = http.post(format!("{search}/{index}/_refresh")).send().await;
    let mut page: Value = http
        .post(format!("{search}/{index}/_search?scroll=1m"))
        .json(&serde_json::json!({"size": 5000, "query": {"match_all": {}}}))
        .send()
        .await
        .ok()?
        .json()
        .await
        .ok()?;
    let mut rows = BTreeMap::new();
    loop {
        let hits = page["hits"]["hits"].as_array()?.clone();
        if hits.is_empty() {
            break;
        }
        for h in hits {
            rows.insert(h["_id"].as_str()?.to_string(), h["_source"].clone());
        }
        let scroll_id = page["_scroll_id"].as_str()?.to_string();
        page = http
            .post(format!("{search}/_search/scroll"))
            .json(&serde_json::json!({"scroll": "1m", "scroll_id": scroll_id}))
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
    }
    if let Some(id) = page["_scroll_id"].as_str() {
        let _ = http
            .delete(format!("{search}/_search/scroll"))
            .json(&serde_json::json!({"scroll_id": id}))
            .send()
            .await;
    }
    Some(rows)
}

/// Appends a run's summary to tests/chaos/RESULTS.md (with the date, the
/// commit and the command), as tests/soak.rs does for soak runs: always
/// for the long form, for the short form when `WALCAST_CHAOS_RECORD=1`
/// (CI runs it on every change; its output is in the CI log).
fn record_run(
    long: bool,
    exactly_once: bool,
    rounds: usize,
    committed: u64,
    dups: usize,
    took: Duration,
    summary: &str,
) {
    if !long && std::env::var("WALCAST_CHAOS_RECORD").map_or(true, |v| v != "1") {
        return;
    }
    let root = env!("CARGO_MANIFEST_DIR");
    let run = |args: &[&str]| {
        std::process::Command::new(args[0])
            .args(&args[1..])
            .current_dir(root)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default()
    };
    let date = run(&["date", "-u", "+%Y-%m-%d %H:%M UTC"]);
    let commit = run(&["git", "rev-parse", "--short", "HEAD"]);
    let dirty = !run(&["git", "status", "--porcelain", "--untracked-files=no"]).is_empty();
    let test = if exactly_once {
        "chaos_exactly_once_loses_nothing_and_duplicates_nothing"
    } else {
        "chaos_loses_nothing"
    };
    let command = format!(
        "{}cargo test --test chaos -- --exact {test} --nocapture",
        if long {
            "WALCAST_CHAOS_LONG=1 "
        } else {
            "WALCAST_CHAOS_RECORD=1 "
        }
    );
    let entry = format!(
        "\n## {date} — {} form, {}, commit {commit}{}\n\n\
         - command: `{command}`\n\
         - {rounds} round(s) of faults, {committed} committed transactions, {} s, lost 0, duplicates {dups}\n\n\
         ```\n{summary}\n```\n",
        if long { "long" } else { "short" },
        if exactly_once { "exactly-once" } else { "at-least-once" },
        if dirty { " (with uncommitted changes)" } else { "" },
        took.as_secs(),
    );
    let dir = format!("{root}/tests/chaos");
    std::fs::create_dir_all(&dir).unwrap();
    let results = format!("{dir}/RESULTS.md");
    let mut text = std::fs::read_to_string(&results).unwrap_or_else(|_| {
        "# Chaos runs (tests/chaos.rs)\n\n\
         Appended by the test itself: every run of the long form (`WALCAST_CHAOS_LONG=1`), and the\n\
         short form when `WALCAST_CHAOS_RECORD=1`. Each entry is the test's own report, as printed.\n"
            .to_string()
    });
    text.push_str(&entry);
    std::fs::write(&results, text).unwrap();
}

/// The checks themselves, on records made up here (no stack needed): a
/// replayed older change applied last wins, as it would for any consumer;
/// a missing row, an extra row, a changed value and a column present on
/// one side only are each reported with table, key, column and both values.
#[test]
fn rebuild_and_diff_report_what_differs() {
    use serde_json::json;
    let rec = |offset: i64, id: i64, lsn: u64, op: &str, after: Value| JsonRecord {
        partition: 0,
        offset,
        key: json!({ "id": id }),
        value: Some(json!({"op": op, "after": after, "source": {"lsn": lsn, "ts_ms": lsn}})),
    };
    let records = vec![
        rec(0, 1, 10, "c", json!({"id": 1, "v": "a"})),
        rec(1, 1, 20, "u", json!({"id": 1, "v": "b"})),
        rec(2, 2, 30, "c", json!({"id": 2, "v": "x"})),
        rec(3, 2, 40, "d", Value::Null),
        JsonRecord {
            partition: 0,
            offset: 4,
            key: json!({"id": 2}),
            value: None,
        },
        // A replay of id 1's first change after its second: last write wins.
        rec(5, 1, 10, "c", json!({"id": 1, "v": "a"})),
    ];
    let rebuilt = rebuild(&records);
    assert_eq!(rebuilt.dups, 1);
    assert!(rebuilt.disorder.is_empty(), "{:?}", rebuilt.disorder);
    assert_eq!(rebuilt.state.len(), 1);
    assert_eq!(rebuilt.state["1"], json!({"id": 1, "v": "a"}));
    assert_eq!(rebuilt.last_commit_ms["1"], 10);

    let pg: BTreeMap<String, Value> = [
        ("1".to_string(), json!({"id": 1, "v": "b", "w": 1})),
        ("3".to_string(), json!({"id": 3})),
    ]
    .into();
    let mut copy = rebuilt.state.clone();
    copy.insert("4".into(), json!({"id": 4}));
    let diffs = diff_rows("t", "kafka", &pg, &copy);
    assert_eq!(
        diffs,
        vec![
            r#"t key=1 column=v: postgres="b" kafka="a""#.to_string(),
            "t key=1 column=w: postgres=1 kafka=<absent>".to_string(),
            r#"t key=3: missing from kafka; postgres={"id":3}"#.to_string(),
            r#"t key=4: extra in kafka, not in postgres; kafka={"id":4}"#.to_string(),
        ]
    );
}
