//! The generative differential oracle (issue 21, section 1): random schemas
//! over every mapped type, random concurrent DML, optional faults; then
//! every table rebuilt from Kafka, Redis and OpenSearch by off-the-shelf
//! clients and compared with Postgres both ways. The oracle itself is
//! Python (tests/oracle/: oracle.py drives the run, generator.py the schema
//! and the writers, compare.py the readers, pgtypes.py every type and every
//! normalisation); this test runs its short form against the stack and
//! fails on any difference, printing the oracle's repro lines.
//!
//! Short form (CI): the seeds of `SHORT`, about a minute each, three of
//! them with faults; the failover seed has a stand-by walcast take over
//! and, on Postgres 17+, a Postgres pair of its own fail over (it says it
//! skipped that before 17). Service faults (broker kill -9, Redis and
//! OpenSearch stopped, Postgres fast/immediate shutdowns) stop servers of
//! the stack: they run only with `WALCAST_ORACLE_STACK_FAULTS=1`, never set
//! it against a stack others use.
//!
//! Long form: `WALCAST_ORACLE_LONG=1` runs `WALCAST_ORACLE_RUNS` seeds
//! (default 10) starting at `WALCAST_ORACLE_SEED` (default: random), each
//! for `WALCAST_ORACLE_SECONDS` (default 300) with faults, format and mode
//! cycling through JSON/Avro × direct/relay; record its
//! figures in tests/oracle/RESULTS.md (the README quotes the last);
//! `WALCAST_ORACLE_BIN=target/release/walcast` runs a release build. Every
//! feature is generated except those `SWITCHES` in tests/oracle/oracle.py
//! keeps off (truncates of sink tables: the test stack's OpenSearch has no
//! `_delete_by_query`); `WALCAST_ORACLE_ENABLE=...` / `_DISABLE=...`
//! switch them.
//!
//! Needs python3 with venv: the first run creates `target/py-venv` and
//! installs the clients from PyPI (tests/oracle/run). Without python3, or
//! when the install fails, the test prints why and is skipped.

mod support;

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use support::var;

/// (seed, format, mode, seconds of load, faults). Faults other than
/// `walcast_kill`, `walcast_takeover` and `pg_failover` (which acts on a
/// Postgres pair of the run's own) stop servers of the stack: they run only with
/// `WALCAST_ORACLE_STACK_FAULTS=1` (deploy/local/test sets it: CI owns its
/// stack), and are left out otherwise. The relay seed has the broker
/// killed: a relay that stalled after a broker restart passed every other
/// test (tests/oracle/RESULTS.md, 2026-12-06 21:21). Short runs go through
/// their shuffled list in turn (`--fault-cycle`), so each listed fault
/// happens unless the load ends first.
const SHORT: &[(u64, &str, &str, u32, &str)] = &[
    (101, "avro", "relay", 20, ""),
    (102, "json", "direct", 20, ""),
    (
        103,
        "avro",
        "direct",
        30,
        "pg_immediate,redis_stop,search_stop,walcast_kill",
    ),
    (104, "json", "relay", 25, "broker_kill,walcast_kill"),
    // Failover (issue 22): a stand-by walcast takes over from the active
    // one killed -9, and on Postgres 17+ the run's own primary is stopped
    // -m immediate and its physical standby promoted (tests/oracle/
    // pgpair.py); before 17 the oracle says it skipped that fault.
    (105, "json", "direct", 30, "pg_failover,walcast_takeover"),
];

fn skip(reason: &str) {
    eprintln!("\n*** oracle SKIPPED: {reason} ***\n");
}

#[test]
fn oracle() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    if Command::new("python3").arg("--version").output().is_err() {
        return skip(
            "python3 is not installed (the oracle is Python; apt-get install python3 python3-venv)",
        );
    }
    // The runner script creates the venv on first use; do it once here so
    // a failed install is a clear skip rather than a failure of every seed.
    let venv = root.join("tests/oracle/run");
    let prep = Command::new("bash")
        .arg(&venv)
        .arg("--help")
        .output()
        .expect("run tests/oracle/run");
    if !prep.status.success() {
        return skip(&format!(
            "the Python clients could not be installed (PyPI unreachable?):\n{}{}",
            String::from_utf8_lossy(&prep.stdout),
            String::from_utf8_lossy(&prep.stderr)
        ));
    }
    // Loads the stack's settings (or starts a stack) the way every test does.
    for v in [
        "WALCAST_TEST_PG_PORT",
        "WALCAST_TEST_KAFKA_BOOTSTRAP",
        "WALCAST_TEST_REGISTRY_URL",
        "WALCAST_TEST_REDIS_URL",
        "WALCAST_TEST_OPENSEARCH_URL",
    ] {
        var(v);
    }
    let stack_faults = std::env::var("WALCAST_ORACLE_STACK_FAULTS").as_deref() == Ok("1");
    let service_faults = "walcast_kill,broker_kill,redis_stop,search_stop,pg_fast,pg_immediate";
    let mut runs: Vec<(u64, Option<String>, Option<String>, u32, String)> = Vec::new();
    let long = std::env::var("WALCAST_ORACLE_LONG").as_deref() == Ok("1");
    if long {
        let n: u64 = std::env::var("WALCAST_ORACLE_RUNS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(10);
        let secs: u32 = std::env::var("WALCAST_ORACLE_SECONDS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(300);
        let first: u64 = std::env::var("WALCAST_ORACLE_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| rand::random::<u64>() % 1_000_000);
        // Format and mode cycle through all four combinations (JSON and
        // Avro, direct and relay), so any four consecutive seeds cover each.
        const COMBOS: [(&str, &str); 4] = [
            ("json", "direct"),
            ("avro", "relay"),
            ("avro", "direct"),
            ("json", "relay"),
        ];
        for (i, s) in (first..first + n).enumerate() {
            let faults = if stack_faults {
                service_faults
            } else {
                "walcast_kill"
            };
            let (f, m) = COMBOS[i % COMBOS.len()];
            runs.push((s, Some(f.into()), Some(m.into()), secs, faults.to_string()));
        }
    } else {
        // The other Postgres versions (deploy/local/test-pg-versions) run
        // some of the seeds, to keep CI within its time:
        // WALCAST_ORACLE_SHORT_SEEDS lists them ("101,105").
        let only: Option<Vec<u64>> = std::env::var("WALCAST_ORACLE_SHORT_SEEDS").ok().map(|s| {
            s.split(',')
                .map(|n| {
                    n.trim().parse().unwrap_or_else(|_| {
                        panic!("WALCAST_ORACLE_SHORT_SEEDS: {n:?} is not a seed")
                    })
                })
                .collect()
        });
        let own = ["walcast_kill", "walcast_takeover", "pg_failover"];
        for &(s, f, m, secs, faults) in SHORT {
            if only.as_ref().is_some_and(|o| !o.contains(&s)) {
                continue;
            }
            let faults: Vec<&str> = faults
                .split(',')
                .filter(|f| !f.is_empty() && (stack_faults || own.contains(f)))
                .collect();
            runs.push((s, Some(f.into()), Some(m.into()), secs, faults.join(",")));
        }
    }
    // WALCAST_ORACLE_BIN runs another build (a release binary for the long
    // form, whose throughput under faults decides whether the outputs catch
    // up within the window); the test's own debug build otherwise.
    let bin = std::env::var("WALCAST_ORACLE_BIN")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_walcast").to_string());
    let mut failed = Vec::new();
    let started = Instant::now();
    for (seed, format, mode, secs, faults) in runs {
        let mut cmd = Command::new("bash");
        cmd.arg(&venv)
            .args(["--seed", &seed.to_string(), "--seconds", &secs.to_string()])
            .args(["--bin", &bin]);
        if let Some(f) = &format {
            cmd.args(["--format", f]);
        }
        if let Some(m) = &mode {
            cmd.args(["--mode", m]);
        }
        if !faults.is_empty() {
            cmd.args(["--faults", &faults]);
            if !long {
                // Each listed fault at least once in a short run.
                cmd.arg("--fault-cycle");
            }
        }
        let t = Instant::now();
        let out = cmd.output().expect("run the oracle");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        // Everything the oracle printed: the summary on success, the
        // differences (seed, table, key, column, values, LSNs) on failure.
        println!("{stdout}");
        let noise = |l: &&str| !l.starts_with('%'); // librdkafka's notices
        let err: Vec<&str> = stderr.lines().filter(noise).collect();
        if !err.is_empty() {
            println!("{}", err.join("\n"));
        }
        eprintln!(
            "oracle seed {seed}: exit {:?} in {:.0?}",
            out.status.code(),
            t.elapsed()
        );
        if !out.status.success() {
            failed.push(seed);
        }
    }
    eprintln!("oracle: {:.0?} in all", started.elapsed());
    assert!(
        failed.is_empty(),
        "the oracle found differences (or could not run) for seeds {failed:?}; the lines above starting with DIFF \
         are the repros, and `tests/oracle/run --seed N ...` (printed after FAIL) reruns one"
    );
}
