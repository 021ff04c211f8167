//! Wiring pipelines from the config: sources, sinks, status, and the task
//! that runs each one.

pub mod relay;

use std::collections::HashSet;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use walcast_sdk::{EventEncoder, JsonEncoder, Sink};

use walcast_postgres::assemble::AssembleOptions;
use walcast_postgres::replication::connection::ConnectParams;
use walcast_postgres::setup::Wanted;
use walcast_postgres::snapshot::SnapshotSettings;
use walcast_postgres::stream::{self, CaptureSettings};
use walcast_sdk::telemetry as metrics;
use walcast_sdk::StatusHandle;

use crate::config::{CaptureConfig, EventFormat, PipelineConfig, RelayConfig, SinkConfig};

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("{0}")]
    Config(String),
    #[error("pipeline {pipeline}: cannot read {key}: {source}")]
    Secret {
        pipeline: String,
        key: &'static str,
        source: std::io::Error,
    },
    #[error("pipeline {pipeline}: sink {sink}: {message}")]
    Sink {
        pipeline: String,
        sink: &'static str,
        message: String,
    },
}

/// Resolves a capture pipeline's settings (no I/O but reading secret files).
pub fn capture_settings(name: &str, c: &CaptureConfig) -> Result<CaptureSettings, BuildError> {
    let src = &c.source;
    let password = src.password().map_err(|source| BuildError::Secret {
        pipeline: name.into(),
        key: "source.password_file",
        source,
    })?;
    let default_name = format!(
        "walcast_{}",
        name.to_lowercase()
            .replace(|c: char| !c.is_ascii_alphanumeric(), "_")
    );
    let tables = src.table_names();
    let keyless = src.keyless_table_names();
    let wanted = Wanted {
        slot: src.slot.clone().unwrap_or_else(|| default_name.clone()),
        publication: src
            .publication
            .clone()
            .unwrap_or_else(|| default_name.clone()),
        tables: tables.clone(),
        schemas: src.schemas.clone(),
        keyless,
        create_slot: src.create_slot,
        create_publication: src.create_publication,
        via_root: src.publish_via_partition_root,
        failover: src.slot_failover,
        generated_columns: src.publish_generated_columns,
        streaming: src.streaming,
        row_filters: c
            .table
            .iter()
            .filter_map(|(t, shape)| {
                let filter = shape.row_filter.as_ref()?;
                Some((walcast_sdk::TableName::parse(t)?, filter.clone()))
            })
            .collect(),
    };
    // With whole schemas captured, every table of the publication is wanted.
    let filter: Option<HashSet<String>> = if src.schemas.is_empty() {
        Some(tables.iter().map(|t| t.to_string()).collect())
    } else {
        None
    };
    Ok(CaptureSettings {
        pipeline: name.to_string(),
        connect: ConnectParams {
            endpoints: src
                .endpoints()
                .map_err(|m| BuildError::Config(format!("pipeline {name}: {m}")))?,
            target_session_attrs: src.target_session_attrs,
            user: src.user.clone(),
            password,
            database: src.database.clone(),
            sslmode: src.sslmode,
            ssl_root_cert: src.ssl_root_cert.clone(),
            application_name: format!("walcast/{name}"),
            connect_timeout: src.connect_timeout,
            receive_timeout: src.receive_timeout,
            allow_plaintext_password: src.allow_plaintext_password,
            channel_binding: src.channel_binding,
        },
        wanted,
        assemble: AssembleOptions {
            name: c.topic_prefix.clone().unwrap_or_else(|| name.to_string()),
            database: src.database.clone(),
            tables: filter,
        },
        status_interval: src.status_interval,
        max_in_flight_events: c.max_in_flight_events,
        max_in_flight_bytes: c.max_in_flight_bytes,
        batch_max_events: c.batch_max_events,
        shutdown_timeout: c.shutdown_timeout,
        retry_max_backoff: src.retry_max_backoff,
        snapshot: SnapshotSettings {
            mode: src.snapshot,
            workers: src.snapshot_workers,
            chunk_rows: src.snapshot_chunk_rows,
            range_size: src.snapshot_range_size,
            state_path: c.state_dir.join(format!("{name}.snapshot.json")),
            incremental_state_path: c.state_dir.join(format!("{name}.incremental.json")),
        },
        streaming: src.streaming,
        spill_dir: c.state_dir.clone(),
        notices: stream::NoticeSettings {
            heartbeat: c.heartbeat.as_ref().map(|h| stream::HeartbeatSettings {
                interval: h.interval,
                action_query: h.action_query.clone(),
            }),
            schema_changes: c.schema_changes.is_some(),
            ddl_capture: c.schema_changes.as_ref().is_some_and(|s| s.ddl_capture),
            message_prefixes: c
                .sinks
                .iter()
                .filter_map(|s| match s {
                    SinkConfig::Kafka(k) => k.outbox.as_ref()?.message_prefix.clone(),
                    _ => None,
                })
                .collect(),
        },
    })
}

/// How a pipeline's Kafka sinks encode events, and where they publish the
/// pipeline's notices.
pub struct Encoding<'a> {
    pub format: EventFormat,
    pub registry: Option<&'a walcast_schemas::RegistryConfig>,
    pub notice_topics: walcast_kafka::NoticeTopics,
}

/// The topics of a capture pipeline's heartbeats and schema changes.
pub fn notice_topics(c: &CaptureConfig, topic_prefix: &str) -> walcast_kafka::NoticeTopics {
    walcast_kafka::NoticeTopics {
        heartbeat: c.heartbeat.as_ref().map(|h| h.topic(topic_prefix)),
        schema_changes: c.schema_changes.as_ref().map(|s| s.topic(topic_prefix)),
    }
}

/// The Kafka sink's settings as the pipeline means them: its topic prefix
/// is the pipeline's (Debezium's `topic.prefix`) unless the sink sets one.
pub fn kafka_config(
    k: &walcast_kafka::KafkaSinkConfig,
    prefix: &str,
) -> walcast_kafka::KafkaSinkConfig {
    let mut k = k.clone();
    if k.topic_prefix == walcast_kafka::config::DEFAULT_TOPIC_PREFIX {
        k.topic_prefix = prefix.to_string();
    }
    k
}

/// Opens every sink of a pipeline.
pub async fn build_sinks(
    pipeline: &str,
    prefix: &str,
    sinks: &[SinkConfig],
    encoding: &Encoding<'_>,
) -> Result<Vec<Box<dyn Sink>>, BuildError> {
    let mut out: Vec<Box<dyn Sink>> = Vec::new();
    for s in sinks {
        let err = |message: String| BuildError::Sink {
            pipeline: pipeline.into(),
            sink: s.kind(),
            message,
        };
        match s {
            SinkConfig::File(f) => out.push(Box::new(
                walcast_file::FileSink::open(f)
                    .await
                    .map_err(|e| err(e.to_string()))?,
            )),
            SinkConfig::Kafka(k) => {
                let k = kafka_config(k, prefix);
                let encoder: Arc<dyn EventEncoder> = match (encoding.format, encoding.registry) {
                    (EventFormat::Json, _) => {
                        Arc::new(JsonEncoder::new(walcast_sdk::json::JsonOptions {
                            special_numeric: k.json_special_numeric,
                            ..Default::default()
                        }))
                    }
                    (EventFormat::Avro, None) => {
                        return Err(err("format = \"avro\" needs a [registry] section".into()))
                    }
                    (EventFormat::Avro, Some(r)) => {
                        let registry = Arc::new(
                            walcast_schemas::HttpRegistry::new(r)
                                .map_err(|e| err(e.to_string()))?,
                        );
                        // Subjects follow topic names, so the encoder names
                        // topics exactly as the sink routes them.
                        let router = walcast_kafka::topic::TopicRouter::new(
                            k.topic_prefix.clone(),
                            k.routes.clone(),
                        )
                        .map_err(|e| err(e.to_string()))?;
                        let mut encoder = walcast_schemas::AvroEncoder::new(
                            registry,
                            r.mapping_options(),
                            r.subject_strategy,
                            Arc::new(move |e: &walcast_sdk::ChangeEvent| {
                                router.name(&e.table.schema, &e.table.name)
                            }),
                        );
                        // Data contracts: an event whose derived schema breaks
                        // its table's checked-in .avsc is refused, never sent.
                        if let Some(c) = r.load_contracts().map_err(|e| err(e.to_string()))? {
                            encoder = encoder.with_contracts(Arc::new(c));
                        }
                        Arc::new(encoder)
                    }
                };
                let mut sink = walcast_kafka::KafkaSink::new(k, encoder)
                    .map_err(|e| err(e.to_string()))?
                    .with_notice_topics(encoding.notice_topics.clone());
                // Only the Avro encoder refuses values; JSON renders anything.
                if let (
                    EventFormat::Avro,
                    Some(walcast_schemas::RegistryConfig {
                        on_invalid: walcast_schemas::InvalidValuePolicy::DeadLetter { topic },
                        ..
                    }),
                ) = (encoding.format, encoding.registry)
                {
                    sink = sink.with_dead_letter(topic.clone());
                    let count = sink.dead_lettered();
                    metrics::watch_dead_letters(
                        pipeline,
                        walcast_sdk::Sink::name(&sink),
                        Box::new(move || count.load(std::sync::atomic::Ordering::Relaxed)),
                    );
                }
                out.push(Box::new(sink));
            }
            SinkConfig::Redis(r) => out.push(Box::new(
                walcast_redis::RedisSink::connect(r.clone())
                    .await
                    .map_err(|e| err(e.to_string()))?,
            )),
            SinkConfig::Elasticsearch(e) => {
                let sink = walcast_elasticsearch::ElasticsearchSink::connect(e.clone())
                    .await
                    .map_err(|e| err(e.to_string()))?;
                let stats = sink.stats();
                metrics::watch_dead_letters(
                    pipeline,
                    walcast_sdk::Sink::name(&sink),
                    Box::new(move || {
                        stats
                            .dead_lettered
                            .load(std::sync::atomic::Ordering::Relaxed)
                    }),
                );
                out.push(Box::new(sink));
            }
        }
    }
    Ok(out)
}

/// A pipeline ready to run.
pub struct Runnable {
    pub name: String,
    pub status: StatusHandle,
    kind: Kind,
}

enum Kind {
    Capture(CaptureSettings, Vec<Box<dyn Sink>>),
    Relay(Box<RelayConfig>, Vec<Box<dyn Sink>>),
}

pub async fn build(name: &str, cfg: &PipelineConfig) -> Result<Runnable, BuildError> {
    match cfg {
        PipelineConfig::Capture(c) => {
            let settings = capture_settings(name, c)?;
            let encoding = Encoding {
                format: c.format,
                registry: c.registry.as_ref(),
                notice_topics: notice_topics(c, &settings.assemble.name),
            };
            let sinks = build_sinks(name, &settings.assemble.name, &c.sinks, &encoding).await?;
            // Shaped before any sink sees an event (see walcast_sdk::shape).
            let shaper = std::sync::Arc::new(
                walcast_sdk::shape::Shaper::new(&c.table, &format!("pipelines.{name}.table"))
                    .map_err(|e| BuildError::Config(format!("pipeline {name}: {e}")))?,
            );
            let sinks: Vec<Box<dyn Sink>> = sinks
                .into_iter()
                .map(|s| walcast_sdk::shape::ShapingSink::wrap(s, std::sync::Arc::clone(&shaper)))
                .collect();
            let sink_names: Vec<String> = sinks.iter().map(|s| s.name().to_string()).collect();
            metrics::register_pipeline(name, &sink_names, Some(c.max_in_flight_events));
            Ok(Runnable {
                name: name.into(),
                status: StatusHandle::new(name, "capture", sink_names),
                kind: Kind::Capture(settings, sinks),
            })
        }
        PipelineConfig::Relay(r) => {
            let encoding = Encoding {
                format: EventFormat::Json,
                registry: None,
                notice_topics: Default::default(),
            };
            let sinks = build_sinks(name, name, &r.sinks, &encoding).await?;
            let sink_names: Vec<String> = sinks.iter().map(|s| s.name().to_string()).collect();
            metrics::register_pipeline(name, &sink_names, None);
            Ok(Runnable {
                name: name.into(),
                status: StatusHandle::new(name, "relay", sink_names),
                kind: Kind::Relay(Box::new(r.clone()), sinks),
            })
        }
    }
}

impl Runnable {
    /// A capture pipeline's settings (the management API acts with them).
    pub fn capture_settings(&self) -> Option<&CaptureSettings> {
        match &self.kind {
            Kind::Capture(settings, _) => Some(settings),
            Kind::Relay(..) => None,
        }
    }

    pub async fn run(self, shutdown: CancellationToken) -> Result<(), String> {
        match self.kind {
            Kind::Capture(settings, sinks) => stream::run(settings, sinks, self.status, shutdown)
                .await
                .map_err(|e| e.to_string()),
            Kind::Relay(cfg, sinks) => relay::run(&self.name, &cfg, sinks, self.status, shutdown)
                .await
                .map_err(|e| e.to_string()),
        }
    }
}
