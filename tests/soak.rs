//! Soak (opt-in, issue #16): steady mixed load through a capture to Kafka
//! for a long time, sampling the walcast process every 10 s: resident
//! memory (VmRSS), open file descriptors (/proc/PID/fd) and replication lag
//! (pg_current_wal_lsn - the slot's confirmed_flush_lsn). The samples go to
//! `tests/soak/soak-<time>.csv` and a summary is appended to
//! `tests/soak/RESULTS.md`.
//!
//! Asserted: nothing grows without bound — RSS at the end under 1.5x RSS
//! after warm-up, open fds at the end no more than after warm-up plus a
//! small slack, and once the load stops the slot confirms everything.
//!
//! `cargo test --test soak -- --ignored --nocapture` (30 minutes;
//! `WALCAST_SOAK_MINUTES=N` to change). Ignored otherwise, so CI output says
//! it did not run (it used to return at once and count as passed).

mod support;

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use support::*;

const SAMPLE_EVERY: Duration = Duration::from_secs(10);

fn proc_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with(field))?
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

struct Sample {
    secs: u64,
    rss_kib: u64,
    fds: usize,
    lag_bytes: i64,
    committed_tx: u64,
}

/// Steady mixed load: every 20 ms a transaction of 5 inserts, 2 updates
/// and a delete. Returns the transactions committed.
fn load(
    db: String,
    stop: tokio::sync::watch::Receiver<bool>,
    count: std::sync::Arc<std::sync::atomic::AtomicU64>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let c = connect(&db).await;
        let mut next = 1i64;
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        while !*stop.borrow() {
            tick.tick().await;
            let ids: Vec<String> = (next..next + 5)
                .map(|i| format!("({i}, 'v{i}', now())"))
                .collect();
            let sql = format!(
                "BEGIN; INSERT INTO s VALUES {}; UPDATE s SET v = v || '+', at = now() WHERE id IN ({}, {});
                 DELETE FROM s WHERE id = {}; COMMIT;",
                ids.join(","),
                (next - 3).max(1),
                (next - 7).max(1),
                (next - 50).max(1)
            );
            c.batch_execute(&sql).await.expect("load transaction");
            next += 5;
            count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "30-minute soak: run with `cargo test --test soak -- --ignored --nocapture`"]
async fn soak_memory_fds_and_lag_stay_flat() {
    let minutes: u64 = std::env::var("WALCAST_SOAK_MINUTES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30);
    let duration = Duration::from_secs(minutes * 60);
    // Warm-up: caches, librdkafka buffers and allocator arenas settle.
    let warmup = Duration::from_secs((minutes * 60 / 5).clamp(60, 300));

    let db = TestDb::new("wc_soak").await;
    db.exec("CREATE TABLE s (id bigint PRIMARY KEY, v text, at timestamptz)")
        .await;
    let pipeline = unique("soak");
    let prefix = unique("soak");
    let w = Walcast::start_with(|_, admin| {
        KafkaCapture::new(&pipeline, &db.name, &prefix, &["public.s"])
            .create_topics()
            .toml(admin)
    });
    w.wait_state("streaming", Duration::from_secs(120)).await;
    let pid = w.child.as_ref().unwrap().id();
    let slot = format!("walcast_{pipeline}");

    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let committed = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let writer = load(db.name.clone(), stop, committed.clone());

    let started = Instant::now();
    let mut samples: Vec<Sample> = Vec::new();
    let mut tick = tokio::time::interval(SAMPLE_EVERY);
    while started.elapsed() < duration {
        tick.tick().await;
        assert!(
            !writer.is_finished(),
            "the load stopped:\n{}",
            tail(&w.log(), 2000)
        );
        let lag: i64 = db
            .client
            .query_one(
                "SELECT (pg_current_wal_lsn() - confirmed_flush_lsn)::bigint FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await
            .expect("lag")
            .get(0);
        let s = Sample {
            secs: started.elapsed().as_secs(),
            rss_kib: proc_kib(pid, "VmRSS:"),
            fds: open_fds(pid),
            lag_bytes: lag,
            committed_tx: committed.load(std::sync::atomic::Ordering::Relaxed),
        };
        eprintln!(
            "soak {:>5} s: RSS {:>6} KiB, fds {:>3}, lag {:>9} B, {} tx",
            s.secs, s.rss_kib, s.fds, s.lag_bytes, s.committed_tx
        );
        samples.push(s);
    }
    stop_tx.send(true).unwrap();
    writer.await.unwrap();
    let total_tx = committed.load(std::sync::atomic::Ordering::Relaxed);

    // Everything is confirmed once the load stops.
    let end = db.current_wal().await;
    w.wait_confirmed(
        &db,
        &slot,
        end,
        Duration::from_secs(300),
        "the slot never caught up after the load",
    )
    .await;
    let hwm = proc_kib(pid, "VmHWM:");

    // The report.
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/soak");
    std::fs::create_dir_all(dir).unwrap();
    let stamp = String::from_utf8(
        std::process::Command::new("date")
            .args(["-u", "+%Y%m%d-%H%M"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap()
    .trim()
    .to_string();
    let mut csv = String::from("seconds,rss_kib,open_fds,lag_bytes,committed_tx\n");
    for s in &samples {
        writeln!(
            csv,
            "{},{},{},{},{}",
            s.secs, s.rss_kib, s.fds, s.lag_bytes, s.committed_tx
        )
        .unwrap();
    }
    let csv_name = format!("soak-{stamp}.csv");
    std::fs::write(format!("{dir}/{csv_name}"), csv).unwrap();

    let after_warmup: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.secs >= warmup.as_secs())
        .collect();
    let base = after_warmup.first().expect("samples after warm-up");
    let last = samples.last().unwrap();
    let rss_max = after_warmup.iter().map(|s| s.rss_kib).max().unwrap();
    let fds_max = after_warmup.iter().map(|s| s.fds).max().unwrap();
    let mut lags: Vec<i64> = after_warmup.iter().map(|s| s.lag_bytes).collect();
    lags.sort();
    let lag_p50 = lags[lags.len() / 2];
    let lag_max = *lags.last().unwrap();
    // Least-squares slope of RSS after warm-up, in KiB per hour.
    let n = after_warmup.len() as f64;
    let mx = after_warmup.iter().map(|s| s.secs as f64).sum::<f64>() / n;
    let my = after_warmup.iter().map(|s| s.rss_kib as f64).sum::<f64>() / n;
    let cov: f64 = after_warmup
        .iter()
        .map(|s| (s.secs as f64 - mx) * (s.rss_kib as f64 - my))
        .sum();
    let var: f64 = after_warmup
        .iter()
        .map(|s| (s.secs as f64 - mx).powi(2))
        .sum();
    let slope_kib_per_h = if var > 0.0 { cov / var * 3600.0 } else { 0.0 };
    // What each transaction after warm-up left behind, on average: a leak
    // per commit shows here whatever the run's length.
    let growth_per_tx = (last.rss_kib as f64 - base.rss_kib as f64) * 1024.0
        / (last.committed_tx.saturating_sub(base.committed_tx).max(1)) as f64;
    // The commit the run built, so the row can be traced back to the code.
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default()
    };
    let commit = format!(
        "{}{}",
        git(&["rev-parse", "--short", "HEAD"]),
        if git(&["status", "--porcelain", "--untracked-files=no"]).is_empty() {
            ""
        } else {
            "+changes"
        }
    );
    let summary = format!(
        "| {stamp} (commit {commit}) | {minutes} min | {total_tx} tx ({} row changes) | {} MiB | {} MiB | {} MiB | {} MiB | {:+.1} MiB/h | {growth_per_tx:+.1} B | {} → {} (max {fds_max}) | {} KiB | {} KiB | [{csv_name}]({csv_name}) |\n",
        total_tx * 8,
        base.rss_kib / 1024,
        last.rss_kib / 1024,
        rss_max / 1024,
        hwm / 1024,
        slope_kib_per_h / 1024.0,
        base.fds,
        last.fds,
        lag_p50 / 1024,
        lag_max / 1024,
    );
    let results = format!("{dir}/RESULTS.md");
    if !std::path::Path::new(&results).exists() {
        std::fs::write(
            &results,
            "# Soak runs (tests/soak.rs)\n\n\
             Steady load (a transaction of 5 inserts, 2 updates and 1 delete every 20 ms) captured to Kafka in JSON,\n\
             debug build, sampled every 10 s. RSS and fds are the walcast process's; lag is\n\
             `pg_current_wal_lsn() - confirmed_flush_lsn`. \"after warm-up\" is the first sample past\n\
             a fifth of the run (1 to 5 minutes).\n\n\
             | run (UTC) | length | load | RSS after warm-up | RSS at end | RSS max | VmHWM | RSS slope | RSS growth per tx | open fds | lag p50 | lag max | samples |\n\
             |---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
        )
        .unwrap();
    }
    let mut text = std::fs::read_to_string(&results).unwrap();
    text.push_str(&summary);
    std::fs::write(&results, text).unwrap();
    eprintln!("{summary}");

    assert!(
        (last.rss_kib as f64) < 1.5 * base.rss_kib as f64,
        "RSS grew from {} KiB after warm-up to {} KiB",
        base.rss_kib,
        last.rss_kib
    );
    // RSS growth per transaction is reported, not asserted: over a 15-minute
    // run glibc's arenas still creep by ~15 B/tx (librdkafka's zstd contexts,
    // ~3.6 MB allocated and freed per produce request on broker threads)
    // while heaptrack shows the heap itself flat (peak 4.6 MB).
    assert!(
        last.fds <= base.fds + 8,
        "open fds grew from {} after warm-up to {}",
        base.fds,
        last.fds
    );
    assert!(w.status().await.is_some(), "walcast still answers");
}
