//! Relay pipelines: Kafka (a consumer group over walcast's topics) to Redis,
//! OpenSearch or files.
//!
//! Offsets are the checkpoint here. A record's offset is committed only
//! after every sink acknowledged it and everything before it in its
//! partition (the Kafka source tracks that); a crash replays from the last
//! commit and the sinks' version checks (commit LSN) make replays no-ops.
//! Each relay has its own group, so a slow search cluster never holds back
//! the Postgres slot or another relay.
//!
//! # Records that can never be applied
//!
//! A record that does not decode, or that a sink refuses whatever the state
//! of the destination ([`Sink::refuses`]: a table without the key a document
//! id or a key template needs), would fail every batch it is in on every
//! re-read: an endless loop that starves every other table. So each record
//! is checked before anything is sent, and `on_refused` decides, as Kafka
//! Connect's `errors.tolerance` does: `halt` (the default) stops the relay,
//! and the daemon with exit code 1, without committing past the record;
//! `dead_letter` copies the record once to a topic with the reason in
//! headers, leaves it out of the refusing sink's batch (the other sinks
//! still get it), and the offset moves on.
//!
//! A batch a sink fails later (an acker answered `fail`: a permission
//! refused, maxmemory reached) can never succeed as it is either (that is
//! what `fail` means), and it is not one record's fault: the relay stops
//! with the reason rather than re-reading the same records without end. Only
//! a transient error returned by `send` re-reads from the committed offsets.

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value as Json;
use tokio_util::sync::CancellationToken;
use walcast_kafka::{KafkaSource, RecordDeadLetter, SourceRecord};
use walcast_schemas::{AvroDecoder, HttpRegistry};
use walcast_sdk::relay::{event_from_envelope_typed, event_from_json_bytes};
use walcast_sdk::retry::Backoff;
use walcast_sdk::PgType;
use walcast_sdk::{send_to_every_sink, ChangeEvent, Sink};

use crate::config::{OnRefused, RelayConfig};
use walcast_sdk::status::{PipelineState, StatusHandle};
use walcast_sdk::telemetry as metrics;

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
    #[error(
        "relay {pipeline}: record {topic}[{partition}]@{offset} refused by the {sink} sink: {message}; \
         its offset is not committed. Fix the cause, or set `on_refused = {{ dead_letter = {{ topic = \"...\" }} }}` \
         on the relay to set such records aside and go on"
    )]
    Refused {
        pipeline: String,
        sink: String,
        topic: String,
        partition: i32,
        offset: i64,
        message: String,
    },
    #[error("relay {pipeline}: cannot write record {topic}[{partition}]@{offset} to the dead-letter topic: {source}")]
    DeadLetter {
        pipeline: String,
        topic: String,
        partition: i32,
        offset: i64,
        source: walcast_kafka::SourceError,
    },
    #[error(
        "relay {pipeline}: the {sink} sink refused a batch: {message}; retrying cannot help, \
         so the relay stops with the offsets before it"
    )]
    Sink {
        pipeline: String,
        sink: String,
        message: String,
    },
    #[error(
        "relay {pipeline}: a sink failed a batch and retrying cannot help ({source}); \
         the relay stops with the offsets before it: fix the cause and restart"
    )]
    NotApplied {
        pipeline: String,
        source: walcast_kafka::SourceError,
    },
}

/// A record of the batch that cannot be applied: the sinks that refuse it
/// and why, or no sink when it does not decode (no sink can take it).
struct Refusal {
    record: usize,
    sinks: Vec<String>,
    reasons: Vec<String>,
}

/// The columns' Postgres types, by column name, as an Avro writer schema
/// tells them.
type ColumnTypes = std::collections::HashMap<String, PgType>;

struct Decoder {
    avro: Option<AvroDecoder>,
    /// Column types per writer schema id, read once per schema.
    types: std::sync::Mutex<std::collections::HashMap<u32, Arc<ColumnTypes>>>,
}

impl Decoder {
    /// An Avro record (`what`: "record" or "key") through the registry:
    /// writer schema id, value as JSON, writer schema.
    async fn decode_avro(
        &self,
        bytes: &[u8],
        what: &str,
    ) -> Result<(u32, Json, Arc<walcast_schemas::AvroSchema>), String> {
        let avro = self.avro.as_ref().ok_or_else(|| {
            format!("an Avro {what}, but the relay has no [registry] to decode it")
        })?;
        avro.decode_with_schema(bytes)
            .await
            .map_err(|e| e.to_string())
    }

    /// An Avro record as JSON, and the column types its writer schema
    /// gives.
    async fn avro(&self, bytes: &[u8]) -> Result<(Json, Arc<ColumnTypes>), String> {
        let (id, v, schema) = self.decode_avro(bytes, "record").await?;
        let mut cache = self.types.lock().expect("column types lock poisoned");
        let types = cache
            .entry(id)
            .or_insert_with(|| Arc::new(walcast_schemas::mapping::column_types(schema.json())))
            .clone();
        Ok((v, types))
    }

    async fn event(&self, r: &SourceRecord) -> Result<Option<ChangeEvent>, String> {
        // A tombstone only tells compaction to forget the key: the delete
        // before it already reached the sinks.
        let Some(value) = r.value.as_deref() else {
            return Ok(None);
        };
        let key = match r.key.as_deref() {
            Some(k) => Some(self.key_columns(k).await?),
            None => None,
        };
        if walcast_schemas::wire::is_framed(value) {
            let (env, types) = self.avro(value).await?;
            event_from_envelope_typed(key.as_deref(), &env, Some(&types)).map_err(|e| e.to_string())
        } else {
            // JSON records carry no types; read without a Value tree.
            event_from_json_bytes(key.as_deref(), value).map_err(|e| {
                if serde_json::from_slice::<serde::de::IgnoredAny>(value).is_err() {
                    format!("neither Avro (magic byte 0) nor JSON: {e}")
                } else {
                    e.to_string()
                }
            })
        }
    }

    /// The key record's columns in the order it was written (the table's
    /// key order, which `{id}` and document ids follow): from the writer
    /// schema for Avro, from the text for JSON (a parsed JSON map sorts its
    /// members by name).
    async fn key_columns(&self, bytes: &[u8]) -> Result<Vec<String>, String> {
        if walcast_schemas::wire::is_framed(bytes) {
            let (_, _, schema) = self.decode_avro(bytes, "key").await?;
            Ok(walcast_schemas::mapping::record_columns(schema.json()))
        } else {
            match walcast_sdk::relay::json_member_names(bytes) {
                Some(names) => Ok(names),
                // Any other JSON names no column, as before.
                None => serde_json::from_slice::<serde::de::IgnoredAny>(bytes)
                    .map(|_| Vec::new())
                    .map_err(|e| format!("a key neither Avro (magic byte 0) nor JSON: {e}")),
            }
        }
    }
}

/// Applies `on_refused` to the batch's refused records: the first one
/// stops the relay without a dead-letter topic; with one, each record is
/// copied there once (naming every sink that refused it) before the batch
/// goes on. The copies are produced concurrently (one delivery wait per
/// batch, not per record: a key-less table's large transaction is
/// thousands of refused records) and all must be delivered before the
/// batch's offsets are committed.
async fn set_aside(
    pipeline: &str,
    refusals: &[Refusal],
    records: &[SourceRecord],
    dead_letter: Option<&RecordDeadLetter>,
) -> Result<(), RelayError> {
    let Some(dlq) = dead_letter else {
        let Some(refusal) = refusals.first() else {
            return Ok(());
        };
        let r = &records[refusal.record];
        let reason = refusal.reasons.join("; ");
        let sinks = refusal.sinks.join(",");
        return Err(if sinks.is_empty() {
            RelayError::Decode {
                pipeline: pipeline.to_string(),
                topic: r.topic.clone(),
                partition: r.partition,
                offset: r.offset,
                message: reason,
            }
        } else {
            RelayError::Refused {
                pipeline: pipeline.to_string(),
                sink: sinks,
                topic: r.topic.clone(),
                partition: r.partition,
                offset: r.offset,
                message: reason,
            }
        });
    };
    let copies = refusals.iter().map(|refusal| {
        let r = &records[refusal.record];
        let reason = refusal.reasons.join("; ");
        let sinks = refusal.sinks.join(",");
        async move {
            let sent = dlq
                .send(r, (!sinks.is_empty()).then_some(sinks.as_str()), &reason)
                .await;
            (refusal, r, reason, sinks, sent)
        }
    });
    for (refusal, r, reason, sinks, sent) in futures::future::join_all(copies).await {
        sent.map_err(|source| RelayError::DeadLetter {
            pipeline: pipeline.to_string(),
            topic: r.topic.clone(),
            partition: r.partition,
            offset: r.offset,
            source,
        })?;
        tracing::warn!(
            pipeline, sinks = %sinks, topic = %r.topic, partition = r.partition, offset = r.offset,
            dead_letter_topic = dlq.topic(), reason = %reason,
            "record refused; copied to the dead-letter topic and skipped"
        );
        for sink in &refusal.sinks {
            ::metrics::counter!(metrics::SINK_ERRORS, "pipeline" => pipeline.to_string(), "sink" => sink.clone())
                .increment(1);
            metrics::relay_dead_letter(pipeline, sink);
        }
        if refusal.sinks.is_empty() {
            metrics::relay_dead_letter(pipeline, "decode");
        }
    }
    Ok(())
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
    let decoder = Decoder {
        avro,
        types: Default::default(),
    };
    let dead_letter = match &cfg.on_refused {
        OnRefused::Halt => None,
        OnRefused::DeadLetter { topic } => {
            Some(RecordDeadLetter::new(&cfg.source, topic).map_err(|source| {
                RelayError::Source {
                    pipeline: p(),
                    source,
                }
            })?)
        }
    };
    let mut source = KafkaSource::new(cfg.source.clone()).map_err(|source| RelayError::Source {
        pipeline: p(),
        source,
    })?;
    status.set_state(PipelineState::Streaming);
    ::metrics::gauge!(metrics::STREAMING, "pipeline" => p()).set(1.0);
    let mut backoff = Backoff::default();
    let mut last_commit = tokio::time::Instant::now();
    // A sink returned a transient error: its batch's failure is worth a
    // re-read, unlike any other failed batch.
    let mut transient_failure = false;
    // The consumer error the status shows while no records arrive.
    let mut shown_trouble: Option<String> = None;
    let result = loop {
        // `next_batch` is not cancel-safe (records it registered would be
        // dropped unanswered and fail their partitions), so it is never
        // raced against a timer or the shutdown signal: it returns within
        // `max_batch_wait`, and both are checked between calls.
        if shutdown.is_cancelled() {
            break Ok(());
        }
        if last_commit.elapsed() >= COMMIT_INTERVAL {
            last_commit = tokio::time::Instant::now();
            match source.commit_acknowledged().await {
                Ok(_) => {}
                Err(e @ walcast_kafka::SourceError::NotApplied { .. }) if !transient_failure => {
                    break Err(RelayError::NotApplied {
                        pipeline: p(),
                        source: e,
                    });
                }
                Err(e @ walcast_kafka::SourceError::NotApplied { .. }) => {
                    // A sink's send failed transiently: nothing past the
                    // batch may be committed. Re-read from the committed
                    // offsets; the sinks' version checks make the replay
                    // idempotent.
                    transient_failure = false;
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
        if batch.records.is_empty() {
            // Nothing read, and the consumer met a transient error (a
            // broker away): say so while librdkafka reconnects.
            match source.consume_trouble() {
                Some(trouble) => {
                    status.set_state(PipelineState::Retrying);
                    status.update(|s| s.last_error = Some(trouble.to_string()));
                    shown_trouble = Some(trouble.to_string());
                }
                None => status.set_state(PipelineState::Streaming),
            }
            continue;
        }
        status.set_state(PipelineState::Streaming);
        // Records flow again: the consumer's trouble is over (librdkafka
        // recovered), so it is no longer the pipeline's last error.
        if let Some(shown) = shown_trouble.take() {
            status.update(|s| {
                if s.last_error.as_deref() == Some(shown.as_str()) {
                    s.last_error = None;
                }
            });
        }
        let mut events = Vec::with_capacity(batch.records.len());
        let mut records_of = Vec::with_capacity(batch.records.len());
        let mut refusals = Vec::new();
        for (i, r) in batch.records.iter().enumerate() {
            match decoder.event(r).await {
                Ok(Some(e)) => {
                    events.push(e);
                    records_of.push(i);
                }
                Ok(None) => {}
                Err(message) => refusals.push(Refusal {
                    record: i,
                    sinks: Vec::new(),
                    reasons: vec![message],
                }),
            }
        }
        // Per sink, the events it refuses (indices into `events`).
        let mut refused_by: Vec<Vec<usize>> = vec![Vec::new(); sinks.len()];
        for (j, e) in events.iter().enumerate() {
            let mut refusal: Option<Refusal> = None;
            for (k, sink) in sinks.iter().enumerate() {
                if let Some(reason) = sink.refuses(e) {
                    refused_by[k].push(j);
                    let r = refusal.get_or_insert_with(|| Refusal {
                        record: records_of[j],
                        sinks: Vec::new(),
                        reasons: Vec::new(),
                    });
                    r.sinks.push(sink.name().to_string());
                    r.reasons.push(reason);
                }
            }
            refusals.extend(refusal);
        }
        if let Err(e) = set_aside(name, &refusals, &batch.records, dead_letter.as_ref()).await {
            // The batch's ackers drop unanswered: nothing past it commits.
            break Err(e);
        }
        let n = events.len() as u64;
        for e in &events {
            metrics::events(name, &e.table.qualified_name(), e.op.code(), 1);
        }
        let acker = source.join(batch.ackers);
        let events = Arc::new(events);
        // Each sink gets the batch without the events it refused.
        let per_sink: Vec<_> = refused_by
            .iter()
            .map(|refused| {
                if refused.is_empty() {
                    Arc::clone(&events)
                } else {
                    Arc::new(
                        events
                            .iter()
                            .enumerate()
                            .filter(|(j, _)| !refused.contains(j))
                            .map(|(_, e)| e.clone())
                            .collect(),
                    )
                }
            })
            .collect();
        let mut halt = None;
        for (sname, e) in send_to_every_sink(name, &mut sinks, per_sink, &acker).await {
            if e.is_transient() {
                transient_failure = true;
            } else {
                halt.get_or_insert(RelayError::Sink {
                    pipeline: p(),
                    sink: sname,
                    message: e.to_string(),
                });
            }
        }
        if let Some(e) = halt {
            break Err(e);
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
