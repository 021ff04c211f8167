//! `walcast tail`: prints a topic's events, decoded (Avro through the registry,
//! or JSON). Reads with the relay's Kafka source (its own consumer group,
//! `read_committed`, nothing committed) and tells Avro from JSON as the
//! relay does ([`walcast_schemas::wire::is_framed`]).

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use walcast_kafka::{KafkaSource, KafkaSourceConfig, Subscription};

pub(crate) async fn tail(
    topic: &str,
    bootstrap: &str,
    registry: Option<&str>,
    from_beginning: bool,
    max: Option<usize>,
    idle_timeout: Option<Duration>,
) -> anyhow::Result<ExitCode> {
    let reset = if from_beginning { "earliest" } else { "latest" };
    let mut source = KafkaSource::new(KafkaSourceConfig {
        bootstrap_servers: bootstrap.to_string(),
        group_id: format!("walcast-tail-{}", std::process::id()),
        subscribe: Subscription::Topics(vec![topic.to_string()]),
        max_batch_records: 500,
        max_batch_wait: Duration::from_millis(200),
        max_in_flight_records: usize::MAX,
        consumer: BTreeMap::from([("auto.offset.reset".to_string(), reset.to_string())]),
    })
    .context("creating the Kafka consumer")?;
    let decoder = match registry {
        Some(url) => Some(walcast_schemas::AvroDecoder::new(std::sync::Arc::new(
            walcast_schemas::HttpRegistry::new(&walcast_schemas::RegistryConfig::new(url))?,
        ))),
        None => None,
    };
    let decode = async |bytes: &[u8]| -> anyhow::Result<serde_json::Value> {
        if walcast_schemas::wire::is_framed(bytes) {
            let d = decoder
                .as_ref()
                .context("an Avro record: pass --registry URL to decode it")?;
            Ok(d.decode(bytes).await?.1)
        } else {
            Ok(serde_json::from_slice(bytes).unwrap_or_else(|_| {
                serde_json::Value::String(String::from_utf8_lossy(bytes).into_owned())
            }))
        }
    };
    let mut n = 0;
    let mut last = tokio::time::Instant::now();
    'read: loop {
        let batch = match source.next_batch().await {
            Ok(b) => b,
            // A topic that does not exist yet, or a broker away: wait, as
            // the relay does.
            Err(e) if e.is_transient() => {
                tokio::time::sleep(Duration::from_millis(200)).await;
                tracing::debug!(error = %e, "tail: waiting for the topic");
                walcast_kafka::SourceBatch {
                    records: Vec::new(),
                    ackers: Vec::new(),
                }
            }
            Err(e) => return Err(e).context("reading from Kafka"),
        };
        if batch.records.is_empty() {
            if idle_timeout.is_some_and(|t| last.elapsed() >= t) {
                break;
            }
            continue;
        }
        last = tokio::time::Instant::now();
        for (r, acker) in batch.records.iter().zip(batch.ackers) {
            // Nothing is committed: the group is this process's own.
            acker.ack();
            let key = match r.key.as_deref() {
                Some(k) => decode(k).await?,
                None => serde_json::Value::Null,
            };
            let value = match r.value.as_deref() {
                Some(v) => decode(v).await?,
                None => serde_json::Value::Null,
            };
            println!(
                "{}",
                serde_json::json!({"topic": r.topic, "partition": r.partition, "offset": r.offset, "key": key, "value": value})
            );
            n += 1;
            if max.is_some_and(|max| n >= max) {
                break 'read;
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
