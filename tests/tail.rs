//! `walcast tail` prints a topic's events as JSON lines, decoded: JSON
//! topics as they are, Avro topics through the registry. It reads with the
//! relay's Kafka source and stops at `--max` or after `--idle-timeout`.

mod support;

use std::process::Command;
use std::time::Duration;

use support::*;

const WAIT: Duration = Duration::from_secs(120);

fn tail_lines(topic: &str, extra: &[&str]) -> Vec<serde_json::Value> {
    let out = Command::new(bin())
        .args(["tail", topic, "--from-beginning", "--idle-timeout", "10s"])
        .args(["--bootstrap-servers", &var("WALCAST_TEST_KAFKA_BOOTSTRAP")])
        .args(extra)
        .output()
        .expect("run walcast tail");
    assert!(
        out.status.success(),
        "walcast tail failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_prints_json_and_avro_topics_decoded() {
    let db = TestDb::new("wc_tail").await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY, v text)").await;
    let registry = var("WALCAST_TEST_REGISTRY_URL");
    for format in ["json", "avro"] {
        let prefix = unique("tail");
        let pipeline = unique("tail");
        let mut capture =
            KafkaCapture::new(&pipeline, &db.name, &prefix, &["public.t"]).create_topics();
        if format == "avro" {
            capture = capture.avro(&registry, "");
        }
        let mut w = Walcast::start_with(|_, admin| capture.toml(admin));
        w.wait_state("streaming", WAIT).await;
        db.exec("INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 5) g ON CONFLICT (id) DO UPDATE SET v = excluded.v")
            .await;
        let topic = format!("{prefix}.public.t");
        let mut extra = vec![];
        if format == "avro" {
            extra = vec!["--registry", registry.as_str()];
        }
        let deadline = std::time::Instant::now() + WAIT;
        let lines = loop {
            let lines = tail_lines(&topic, &extra);
            if lines.len() >= 5 || std::time::Instant::now() > deadline {
                break lines;
            }
        };
        // The second round also snapshots the first round's rows.
        let ids: std::collections::BTreeSet<i64> = lines
            .iter()
            .filter_map(|l| l["value"]["after"]["id"].as_i64())
            .collect();
        assert_eq!(ids, (1..=5).collect(), "{format}: {lines:?}");
        assert!(
            lines
                .iter()
                .all(|l| l["topic"] == topic.as_str() && l["key"]["id"].is_i64()),
            "{format}: {lines:?}"
        );
        // --max stops early.
        let mut max = extra.clone();
        max.extend(["--max", "2"]);
        assert_eq!(tail_lines(&topic, &max).len(), 2, "{format}: --max 2");
        w.terminate();
    }
}
