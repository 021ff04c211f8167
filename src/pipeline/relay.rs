//! Relay pipelines: Kafka (a consumer group over walcast's topics) to Redis,
//! OpenSearch or files.
//!
//! Offsets are the checkpoint here. A record's offset is committed only
//! after every sink acknowledged it and everything before it in its
//! partition (the Kafka source tracks that); a crash replays from the last
//! commit and the sinks' version checks (commit LSN) make replays no-ops.
//! Each relay has its own group, so a slow search cluster never holds back
//! the Postgres slot or another relay.

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value as Json;
use tokio_util::sync::CancellationToken;
use walcast_kafka::{KafkaSource, SourceRecord};
use walcast_schemas::{AvroDecoder, HttpRegistry};
use walcast_sdk::relay::event_from_envelope;
use walcast_sdk::retry::Backoff;
use walcast_sdk::{Batch, ChangeEvent, Sink};

use crate::admin::metrics;
use crate::config::RelayConfig;
use crate::pipeline::status::{PipelineState, StatusHandle};

/// How often acknowledged offsets are committed.
const COMMIT_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("relay {pipeline}: {source}")]
    Source {
        pipeline: String,
        source: walcast_kafka::SourceError,
    },
    #[error("relay {pipeline}: record {topic}[{partition}]@{offset}: {message}")]
    Decode {
        pipeline: String,
        topic: String,
        partition: i32,
        offset: i64,
        message: String,
    },
    #[error("relay {pipeline}: schema registry: {message}")]
    Registry { pipeline: String, message: String },
}

struct Decoder {
    avro: Option<AvroDecoder>,
}

impl Decoder {
    async fn json(&self, bytes: &[u8]) -> Result<Json, String> {
        if bytes.first() == Some(&0) {
            let avro = self
                .avro
                .as_ref()
                .ok_or("an Avro record, but the relay has no [registry] to decode it")?;
            let (_, v) = avro.decode(bytes).await.map_err(|e| e.to_string())?;
            Ok(v)
        } else {
            serde_json::from_slice(bytes)
                .map_err(|e| format!("neither Avro (magic byte 0) nor JSON: {e}"))
        }
    }

    async fn event(&self, r: &SourceRecord) -> Result<Option<ChangeEvent>, String> {
        // A tombstone only tells compaction to forget the key: the delete
        // before it already reached the sinks.
        let Some(value) = r.value.as_deref() else {
            return Ok(None);
        };
        let env = self.json(value).await?;
        let key = match r.key.as_deref() {
            Some(k) => Some(self.json(k).await?),
            None => None,
        };
        event_from_envelope(key.as_ref(), &env).map_err(|e| e.to_string())
    }
}

pub async fn run(
    name: &str,
    cfg: &RelayConfig,
    mut sinks: Vec<Box<dyn Sink>>,
    status: StatusHandle,
    shutdown: CancellationToken,
) -> Result<(), RelayError> {
    let p = || name.to_string();
    let avro = match &cfg.registry {
        Some(r) => Some(AvroDecoder::new(Arc::new(HttpRegistry::new(r).map_err(
            |e| RelayError::Registry {
                pipeline: p(),
                message: e.to_string(),
            },
        )?))),
        None => None,
    };
    let decoder = Decoder { avro };
    let mut source = KafkaSource::new(cfg.source.clone()).map_err(|source| RelayError::Source {
        pipeline: p(),
        source,
    })?;
    status.set_state(PipelineState::Streaming);
    ::metrics::gauge!(metrics::STREAMING, "pipeline" => p()).set(1.0);
    let mut backoff = Backoff::default();
    let mut last_commit = tokio::time::Instant::now();
    let result = loop {
        // `next_batch` is not cancel-safe (records it registered would be
        // dropped unanswered and fail their partitions), so it is never
        // raced against a timer or the shutdown signal: it returns within
        // `max_batch_wait_ms`, and both are checked between calls.
        if shutdown.is_cancelled() {
            break Ok(());
        }
        if last_commit.elapsed() >= COMMIT_INTERVAL {
            last_commit = tokio::time::Instant::now();
            match source.commit_acknowledged().await {
                Ok(_) => {}
                Err(e @ walcast_kafka::SourceError::NotApplied { .. }) => {
                    // A sink gave up on a batch: nothing past it may be
                    // committed. Re-read from the committed offsets; the
                    // sinks' version checks make the replay idempotent.
                    tracing::error!(pipeline = %name, error = %e, "a batch was not applied; re-reading from the last committed offsets");
                    ::metrics::counter!(metrics::RESTARTS, "pipeline" => p()).increment(1);
                    status.set_state(PipelineState::Retrying);
                    status.update(|s| s.last_error = Some(e.to_string()));
                    let _ = source.shutdown().await;
                    tokio::time::sleep(backoff.next_delay()).await;
                    source = match KafkaSource::new(cfg.source.clone()) {
                        Ok(s) => s,
                        Err(source) => {
                            let e = RelayError::Source {
                                pipeline: p(),
                                source,
                            };
                            status.update(|s| {
                                s.state = PipelineState::Failed;
                                s.last_error = Some(e.to_string());
                            });
                            return Err(e);
                        }
                    };
                    continue;
                }
                Err(e) => {
                    tracing::warn!(pipeline = %name, error = %e, "committing offsets failed; will retry")
                }
            }
            status.update(|s| s.in_flight_events = source.in_flight_records());
        }
        let batch = source.next_batch().await;
        let batch = match batch {
            Ok(b) => b,
            Err(e) if e.is_transient() => {
                let delay = backoff.next_delay();
                tracing::warn!(pipeline = %name, error = %e, retry_in = ?delay, "Kafka source error; retrying");
                status.set_state(PipelineState::Retrying);
                tokio::select! {
                    _ = shutdown.cancelled() => {}
                    _ = tokio::time::sleep(delay) => {}
                }
                continue;
            }
            Err(source) => {
                break Err(RelayError::Source {
                    pipeline: p(),
                    source,
                })
            }
        };
        backoff.reset();
        status.set_state(PipelineState::Streaming);
        if batch.records.is_empty() {
            continue;
        }
        let mut events = Vec::with_capacity(batch.records.len());
        let mut failed = None;
        for r in &batch.records {
            match decoder.event(r).await {
                Ok(Some(e)) => events.push(e),
                Ok(None) => {}
                Err(message) => {
                    failed = Some(RelayError::Decode {
                        pipeline: p(),
                        topic: r.topic.clone(),
                        partition: r.partition,
                        offset: r.offset,
                        message,
                    });
                    break;
                }
            }
        }
        if let Some(e) = failed {
            // The batch's ackers drop unanswered: nothing past it commits.
            break Err(e);
        }
        let n = events.len() as u64;
        for e in &events {
            metrics::events(name, &e.table.qualified_name(), e.op.code(), 1);
        }
        let acker = source.join(batch.ackers);
        let events = Arc::new(events);
        for sink in sinks.iter_mut() {
            let sname = sink.name().to_string();
            match sink
                .send(Batch {
                    events: Arc::clone(&events),
                    acker: acker.clone(),
                })
                .await
            {
                Ok(()) => {
                    ::metrics::counter!(metrics::SINK_EVENTS, "pipeline" => p(), "sink" => sname)
                        .increment(n)
                }
                Err(e) => {
                    tracing::error!(pipeline = %name, sink = %sname, error = %e, "sink refused a batch");
                    ::metrics::counter!(metrics::SINK_ERRORS, "pipeline" => p(), "sink" => sname)
                        .increment(1);
                }
            }
        }
        acker.ack();
        status.update(|s| s.events_total += n);
    };
    for sink in sinks.iter_mut() {
        let _ = tokio::time::timeout(cfg.shutdown_timeout, sink.flush()).await;
    }
    let _ = source.commit_acknowledged().await;
    let _ = source.shutdown().await;
    ::metrics::gauge!(metrics::STREAMING, "pipeline" => p()).set(0.0);
    match &result {
        Ok(()) => status.set_state(PipelineState::Stopped),
        Err(e) => status.update(|s| {
            s.state = PipelineState::Failed;
            s.last_error = Some(e.to_string());
        }),
    }
    result
}
