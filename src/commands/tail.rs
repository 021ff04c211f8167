//! `walcast tail`: prints a topic's events, decoded (Avro through the registry,
//! or JSON).

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;

pub(crate) async fn tail(
    topic: &str,
    bootstrap: &str,
    registry: Option<&str>,
    from_beginning: bool,
    max: Option<usize>,
    idle_timeout: Option<Duration>,
) -> anyhow::Result<ExitCode> {
    use rdkafka::consumer::{Consumer, StreamConsumer};
    use rdkafka::Message;
    let consumer: StreamConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", format!("walcast-tail-{}", std::process::id()))
        .set("enable.auto.commit", "false")
        .set(
            "auto.offset.reset",
            if from_beginning { "earliest" } else { "latest" },
        )
        .set("isolation.level", "read_committed")
        .create()
        .context("creating the Kafka consumer")?;
    consumer.subscribe(&[topic]).context("subscribing")?;
    let decoder = match registry {
        Some(url) => Some(walcast_schemas::AvroDecoder::new(std::sync::Arc::new(
            walcast_schemas::HttpRegistry::new(&walcast_schemas::RegistryConfig::new(url))?,
        ))),
        None => None,
    };
    let decode = async |bytes: &[u8]| -> anyhow::Result<serde_json::Value> {
        if bytes.first() == Some(&0) {
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
    loop {
        let next = consumer.recv();
        let m = match idle_timeout {
            Some(t) => match tokio::time::timeout(t, next).await {
                Ok(m) => m,
                Err(_) => break,
            },
            None => next.await,
        }
        .context("reading from Kafka")?;
        let key = match m.key() {
            Some(k) => decode(k).await?,
            None => serde_json::Value::Null,
        };
        let value = match m.payload() {
            Some(v) => decode(v).await?,
            None => serde_json::Value::Null,
        };
        println!(
            "{}",
            serde_json::json!({"topic": m.topic(), "partition": m.partition(), "offset": m.offset(), "key": key, "value": value})
        );
        n += 1;
        if max.is_some_and(|max| n >= max) {
            break;
        }
    }
    Ok(ExitCode::SUCCESS)
}
