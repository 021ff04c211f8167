//! Relay pipelines into Redis and OpenSearch, and reading the search index.

use crate::stack::var;

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
