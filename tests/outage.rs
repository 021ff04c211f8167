//! Outages under load on the real stack: the broker stopped and restarted,
//! walcast killed with -9, Redis and OpenSearch stopped; nothing committed
//! in Postgres may be missing at the end. These tests stop shared servers,
//! so they run one at a time.

mod support;

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::Duration;

use serde_json::Value;
use support::*;

static SERIAL: Mutex<()> = Mutex::new(());
const WAIT: Duration = Duration::from_secs(120);

fn kafka_json_config(pipeline: &str, db: &str, prefix: &str, admin: &str) -> String {
    KafkaCapture::new(pipeline, db, prefix, &["public.t"])
        .pipeline("max_in_flight_events = 20000")
        .source("retry_max_backoff = \"2s\"")
        .create_topics()
        .toml(admin)
}

/// The rows of the tests' table `t` in Postgres.
async fn rows(db: &TestDb) -> HashMap<i64, String> {
    db.client
        .query("SELECT id, v FROM t", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get::<_, i32>(0) as i64, r.get::<_, String>(1)))
        .collect()
}

/// Whether Redis holds each of `ids` under `{prefix}:{id}` (upsert, JSON)
/// with Postgres's `v`.
async fn redis_rows_equal(
    conn: &mut redis::aio::MultiplexedConnection,
    prefix: &str,
    want: &HashMap<i64, String>,
    ids: &[i64],
) -> bool {
    for id in ids {
        let v: Option<String> = redis::cmd("GET")
            .arg(format!("{prefix}:{id}"))
            .query_async(conn)
            .await
            .unwrap_or(None);
        let Some(v) = v else { return false };
        if serde_json::from_str::<Value>(&v).unwrap()["v"] != want[id].as_str() {
            return false;
        }
    }
    true
}

/// Whether `index` holds as many documents as `want` has rows, and each
/// of `ids` with Postgres's `v`.
async fn index_equal(
    http: &reqwest::Client,
    search: &str,
    index: &str,
    want: &HashMap<i64, String>,
    ids: impl IntoIterator<Item = &i64>,
) -> bool {
    if search_count(http, search, index).await != Some(want.len() as u64) {
        return false;
    }
    for id in ids {
        if search_doc(http, search, index, id).await["_source"]["v"] != want[id].as_str() {
            return false;
        }
    }
    true
}

/// Inserts `n` rows, 10 per transaction, at a steady pace.
fn writer(db: String, n: i32) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let c = connect(&db).await;
        for chunk in (1..=n).collect::<Vec<_>>().chunks(10) {
            let values: Vec<String> = chunk.iter().map(|i| format!("({i}, 'v{i}')")).collect();
            c.batch_execute(&format!(
                "INSERT INTO t VALUES {}; UPDATE t SET v = v || '!' WHERE id = {}",
                values.join(","),
                chunk[0]
            ))
            .await
            .unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
}

/// Checks every row reached the topic, per-row order held, and returns the
/// number of duplicated events.
fn verify_topic(topic: &str, n: i32) -> usize {
    let records = consume_json(topic, WAIT, |r| {
        let ids: HashSet<i64> = r
            .iter()
            .filter_map(|(_, v)| v.as_ref()?.get("after")?.get("id")?.as_i64())
            .collect();
        ids.len() == n as usize
    });
    let mut seen = HashSet::new();
    let mut dups = 0;
    let mut last_lsn: HashMap<i64, u64> = HashMap::new();
    for (_, v) in &records {
        let Some(v) = v else { continue };
        let id = v["after"]["id"].as_i64().unwrap();
        let lsn = v["source"]["lsn"].as_u64().unwrap();
        if !seen.insert((id, lsn)) {
            dups += 1;
            continue;
        }
        // Within a row, positions only go forward (replays repeat, never reorder).
        if let Some(prev) = last_lsn.insert(id, lsn) {
            assert!(lsn > prev, "row {id}: event at {lsn} after {prev}");
        }
    }
    dups
}

/// Kills `w` with -9 and restarts it three times while 3000 rows are
/// inserted; checks the topic has every row in per-row order and returns
/// the number of duplicated events.
async fn kill_9_three_times_under_load(w: &mut Walcast, db: &TestDb, prefix: &str) -> usize {
    const N: i32 = 3000;
    let load = writer(db.name.clone(), N);
    for round in 0..3 {
        tokio::time::sleep(Duration::from_millis(1500 + 700 * round)).await;
        w.kill9();
        w.spawn();
    }
    load.await.unwrap();
    verify_topic(&format!("{prefix}.public.t"), N)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_stopped_for_30s_under_load_loses_nothing() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let db = TestDb::new("wc_brokerdown").await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY, v text)").await;
    let prefix = unique("bd");
    let mut w =
        Walcast::start_with(|_, admin| kafka_json_config("brokerdown", &db.name, &prefix, admin));
    w.wait_state("streaming", WAIT).await;
    const N: i32 = 3000;
    let load = writer(db.name.clone(), N);
    tokio::time::sleep(Duration::from_secs(2)).await;
    stack(&["stop", "kafka"]);
    tokio::time::sleep(Duration::from_secs(30)).await;
    let status = w
        .status()
        .await
        .expect("walcast stays up while the broker is down");
    let in_flight = status["pipelines"][0]["in_flight_events"].as_u64().unwrap();
    stack(&["start", "kafka"]);
    load.await.unwrap();
    assert!(
        w.exited().is_none(),
        "walcast exited during the outage:\n{}",
        tail(&w.log(), 3000)
    );
    let dups = verify_topic(&format!("{prefix}.public.t"), N);
    eprintln!("broker outage: in flight while down {in_flight}, duplicates {dups}");
    // Everything acknowledged: the slot caught up with the workload.
    let end = db.current_wal().await;
    w.wait_confirmed(
        &db,
        "walcast_brokerdown",
        end,
        WAIT,
        "the slot never confirmed the end of the workload",
    )
    .await;
}

/// Exactly-once through a broker outage longer than the Kafka transaction
/// timeout: the open transaction fails, the capture starts over from the
/// confirmed position with a new producer session, and a read_committed
/// consumer sees every row exactly once (it used to exit 1).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_once_survives_an_outage_longer_than_the_transaction_timeout() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let db = TestDb::new("wc_eolong").await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY, v text)").await;
    let prefix = unique("eolong");
    let txn_id = unique("walcast-eolong");
    let mut w = Walcast::start_with(|_, admin| {
        kafka_json_config("eolong", &db.name, &prefix, admin)
            + &format!(
                "delivery = {{ mode = \"exactly_once\", transactional_id = \"{txn_id}\", offsets_topic = \"{prefix}.offsets\", transaction_timeout_ms = 8000 }}\n"
            )
    });
    w.wait_state("streaming", WAIT).await;
    const N: i32 = 2000;
    let load = writer(db.name.clone(), N);
    tokio::time::sleep(Duration::from_secs(2)).await;
    stack(&["stop", "kafka"]);
    tokio::time::sleep(Duration::from_secs(20)).await;
    assert!(
        w.exited().is_none(),
        "walcast exited during the outage:\n{}",
        tail(&w.log(), 3000)
    );
    stack(&["start", "kafka"]);
    load.await.unwrap();
    let dups = verify_topic(&format!("{prefix}.public.t"), N);
    assert_eq!(dups, 0, "duplicates seen by a read_committed consumer");
    // The outage did outlast a transaction (else this test proves nothing).
    assert!(
        w.log()
            .contains("starting a new producer session for the replay"),
        "no transaction failed during the outage:\n{}",
        tail(&w.log(), 3000)
    );
    assert!(
        w.exited().is_none(),
        "walcast exited after the outage:\n{}",
        tail(&w.log(), 3000)
    );
    let end = db.current_wal().await;
    w.wait_confirmed(
        &db,
        "walcast_eolong",
        end,
        WAIT,
        "the slot never confirmed the end of the workload",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_under_load_to_kafka_loses_nothing() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let db = TestDb::new("wc_kill").await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY, v text)").await;
    let prefix = unique("k9");
    let mut w =
        Walcast::start_with(|_, admin| kafka_json_config("killk", &db.name, &prefix, admin));
    w.wait_state("streaming", WAIT).await;
    let dups = kill_9_three_times_under_load(&mut w, &db, &prefix).await;
    eprintln!("3 x kill -9 under load: duplicates {dups}");
    assert!(
        dups <= 3 * 20_000,
        "duplicates bounded by the in-flight window"
    );
}

/// The same kill -9 rounds in exactly-once mode: a read_committed consumer
/// (librdkafka's default isolation, as in `consume_json`) sees each change
/// once, because every Kafka transaction records its last change in the
/// offsets topic and the restarted daemon drops what Kafka already holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_under_load_exactly_once_gives_no_duplicates() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let db = TestDb::new("wc_kill_eos").await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY, v text)").await;
    let prefix = unique("k9eos");
    let txn_id = unique("walcast-k9eos");
    let offsets = format!("{prefix}.offsets");
    let mut w = Walcast::start_with(|_, admin| {
        kafka_json_config("killeos", &db.name, &prefix, admin)
            + &format!(
                "delivery = {{ mode = \"exactly_once\", transactional_id = \"{txn_id}\", offsets_topic = \"{offsets}\" }}\n"
            )
    });
    w.wait_state("streaming", WAIT).await;
    let dups = kill_9_three_times_under_load(&mut w, &db, &prefix).await;
    let log = w.log();
    let dropped = log
        .lines()
        .filter(|l| l.contains("dropped replayed changes that Kafka already holds"))
        .count();
    eprintln!("3 x kill -9 under load, exactly-once: duplicates {dups}, replays dropped in {dropped} batches");
    assert_eq!(dups, 0, "no duplicates to a read_committed consumer");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_survives_kill_9_and_sink_outages_and_converges() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let db = TestDb::new("wc_relay").await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY, v text)").await;
    let prefix = unique("rl");
    let search = var("WALCAST_TEST_OPENSEARCH_URL");
    let redis_url = var("WALCAST_TEST_REDIS_URL");
    let mut w = Walcast::start_with(|_, admin| {
        kafka_json_config("relaycap", &db.name, &prefix, admin)
            + &relay_to_redis_and_search(&prefix, &format!("{prefix}.public.t"), &prefix, 100)
    });
    w.wait_state("streaming", WAIT).await;

    // Phase 1: load, kill -9 the daemon (capture and relay) mid-batch.
    let load = writer(db.name.clone(), 1500);
    tokio::time::sleep(Duration::from_secs(2)).await;
    w.kill9();
    w.spawn();
    load.await.unwrap();
    let redis = redis::Client::open(redis_url.as_str()).unwrap();
    let mut conn = redis.get_multiplexed_async_connection().await.unwrap();
    let http = reqwest::Client::new();
    let converged = async |conn: &mut redis::aio::MultiplexedConnection,
                           want: &HashMap<i64, String>,
                           ids: &[i64]|
           -> bool {
        redis_rows_equal(conn, &prefix, want, ids).await
            && index_equal(&http, &search, &prefix, want, ids.iter().step_by(97)).await
    };
    let want = rows(&db).await;
    let ids: Vec<i64> = want.keys().copied().collect();
    let deadline = std::time::Instant::now() + WAIT;
    while !converged(&mut conn, &want, &ids).await {
        assert!(
            std::time::Instant::now() < deadline,
            "Redis and the index never matched Postgres after kill -9:\n{}",
            w.log()
                .lines()
                .filter(|l| l.contains("ERROR") || l.contains("refused"))
                .take(20)
                .collect::<Vec<_>>()
                .join("\n")
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    // Phase 2: Redis and OpenSearch each stopped for 20 s under load. The
    // relay holds its batch and retries; capture and the slot go on.
    for service in ["redis", "opensearch"] {
        let confirmed_before = db.confirmed_flush("walcast_relaycap").await.unwrap();
        stack(&["stop", service]);
        db.exec("UPDATE t SET v = v || '+' WHERE id % 3 = 0").await;
        tokio::time::sleep(Duration::from_secs(20)).await;
        assert!(
            db.confirmed_flush("walcast_relaycap").await.unwrap() > confirmed_before,
            "the Postgres slot kept moving while {service} was down"
        );
        stack(&["start", service]);
        let want = rows(&db).await;
        // Redis restarts empty (no persistence in the stack): check the rows
        // changed during the outage, which the relay must have caught up.
        let touched: Vec<i64> = want.keys().copied().filter(|id| id % 3 == 0).collect();
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            let ok = if service == "redis" {
                redis_rows_equal(&mut conn, &prefix, &want, &touched).await
            } else {
                converged(&mut conn, &want, &touched).await
            };
            if ok {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the relay did not catch up after {service} returned:\n{}",
                tail(&w.log(), 3000)
            );
            tokio::time::sleep(Duration::from_millis(300)).await;
            // A new connection: the old one died with the server.
            if let Ok(c) = redis.get_multiplexed_async_connection().await {
                conn = c;
            }
        }
    }
    assert!(
        w.exited().is_none(),
        "walcast stayed up through the outages"
    );
}

/// Direct capture into Redis and OpenSearch, no Kafka in between: while
/// either server is down the capture's sink holds its batch and retries (a
/// transient error never exits), the slot is not confirmed past the changes
/// the stopped sink has not applied, and once the server is back every
/// changed row is there and the slot moves past them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_capture_holds_the_slot_while_redis_or_opensearch_is_down() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let db = TestDb::new("wc_direct_out").await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY, v text)").await;
    let prefix = unique("dout");
    let search = var("WALCAST_TEST_OPENSEARCH_URL");
    let redis_url = var("WALCAST_TEST_REDIS_URL");
    let pipeline = unique("dircap");
    let slot = format!("walcast_{pipeline}");
    let mut w = Walcast::start_with(|_, admin| {
        format!(
            r#"[admin]
listen = "{admin}"
[log]
format = "json"
level = "info,walcast=debug"
[pipelines.{pipeline}]
kind = "capture"
[pipelines.{pipeline}.source]
host = "127.0.0.1"
port = {port}
database = "{db}"
user = "postgres"
tables = ["public.t"]
retry_max_backoff = "2s"
[[pipelines.{pipeline}.sinks]]
type = "redis"
urls = ["{redis_url}"]
mode = {{ type = "upsert", key_template = "{prefix}:{{id}}" }}
retry_max_ms = 1000
[[pipelines.{pipeline}.sinks]]
type = "elasticsearch"
url = "{search}"
index_template = "{prefix}"
flush_interval_ms = 100
retry_max_ms = 1000
"#,
            port = pg_port(),
            db = db.name,
        )
    });
    w.wait_state("streaming", WAIT).await;
    db.exec("INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 300) g")
        .await;
    let redis = redis::Client::open(redis_url.as_str()).unwrap();
    let http = reqwest::Client::new();
    // Whether Redis holds `redis_ids` as Postgres does and the index holds
    // every row as Postgres has it (false while a server does not answer).
    let equal = async |want: &HashMap<i64, String>, redis_ids: &[i64]| -> bool {
        let Ok(mut conn) = redis.get_multiplexed_async_connection().await else {
            return false;
        };
        redis_rows_equal(&mut conn, &prefix, want, redis_ids).await
            && index_equal(&http, &search, &prefix, want, want.keys()).await
    };
    let wait_equal = async |w: &mut Walcast, redis_ids: &[i64], when: &str| {
        let want = rows(&db).await;
        let deadline = std::time::Instant::now() + WAIT;
        while !equal(&want, redis_ids).await {
            assert!(
                w.exited().is_none(),
                "walcast exited {when}:\n{}",
                tail(&w.log(), 4000)
            );
            assert!(
                std::time::Instant::now() < deadline,
                "Redis and the index never matched Postgres {when}:\n{}",
                tail(&w.log(), 4000)
            );
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    };
    let all: Vec<i64> = (1..=300).collect();
    wait_equal(&mut w, &all, "after the first load").await;

    for service in ["redis", "opensearch"] {
        stack(&["stop", service]);
        db.exec("UPDATE t SET v = v || '+' WHERE id % 3 = 0").await;
        let after_update = db.current_wal().await;
        tokio::time::sleep(Duration::from_secs(15)).await;
        assert!(
            w.exited().is_none(),
            "walcast exited while {service} was down:\n{}",
            tail(&w.log(), 4000)
        );
        let confirmed = db.confirmed_flush(&slot).await.unwrap();
        assert!(
            confirmed < after_update,
            "the slot was confirmed past a change {service} had not applied \
             ({confirmed:#x} >= {after_update:#x})"
        );
        stack(&["start", service]);
        // The stack's Redis has no persistence: it restarts empty, so only
        // the rows changed during the outage are checked there.
        let touched: Vec<i64> = all.iter().copied().filter(|id| id % 3 == 0).collect();
        wait_equal(&mut w, &touched, &format!("after {service} came back")).await;
        w.wait_confirmed(
            &db,
            &slot,
            after_update,
            WAIT,
            &format!("the slot never moved past the outage of {service}"),
        )
        .await;
    }
    assert!(
        w.log().contains("retry") || w.log().contains("transient"),
        "the log says the sink retried"
    );
    assert!(w.terminate().success());
}
