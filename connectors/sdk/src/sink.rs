//! The sink side of the contract.

use std::sync::Arc;

use async_trait::async_trait;

use crate::ack::Acker;
use crate::event::ChangeEvent;

/// Events handed to a sink together with the obligation to answer for them.
/// Events are shared, so one batch can fan out to several sinks.
#[derive(Debug, Clone)]
pub struct Batch {
    pub events: Arc<Vec<ChangeEvent>>,
    pub acker: Acker,
}

/// Why a sink could not take or deliver events, classified by what the
/// pipeline should do about it.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// Worth retrying: the same events may succeed later (an outage, a
    /// timeout, back-pressure from the destination).
    #[error("{sink}: {message} (transient; will retry)")]
    Transient {
        sink: String,
        message: String,
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
    /// Retrying the same events cannot help (bad credentials, a value the
    /// destination refuses, misconfiguration): an operator must act.
    #[error("{sink}: {message}")]
    Definite {
        sink: String,
        message: String,
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
}

/// The message without a leading `"{sink}: "`: the sink's own errors
/// often name it already, and the variant's display adds it once.
fn unprefixed(sink: &str, message: String) -> String {
    match message
        .strip_prefix(sink)
        .and_then(|rest| rest.strip_prefix(": "))
    {
        Some(rest) => rest.to_string(),
        None => message,
    }
}

impl SinkError {
    pub fn transient(sink: impl Into<String>, message: impl Into<String>) -> Self {
        let sink = sink.into();
        SinkError::Transient {
            message: unprefixed(&sink, message.into()),
            sink,
            source: None,
        }
    }

    pub fn definite(sink: impl Into<String>, message: impl Into<String>) -> Self {
        let sink = sink.into();
        SinkError::Definite {
            message: unprefixed(&sink, message.into()),
            sink,
            source: None,
        }
    }

    pub fn with_source(mut self, err: impl std::error::Error + Send + Sync + 'static) -> Self {
        match &mut self {
            SinkError::Transient { source, .. } | SinkError::Definite { source, .. } => {
                *source = Some(Box::new(err));
            }
        }
        self
    }

    pub fn is_transient(&self) -> bool {
        matches!(self, SinkError::Transient { .. })
    }
}

/// A destination for change events.
///
/// Delivery is at-least-once: after a crash or a retry a sink sees events it
/// may already have applied, and must apply them idempotently (the commit
/// LSN, [`ChangeEvent::version`], orders versions of a row).
#[async_trait]
pub trait Sink: Send {
    /// A short name for logs and metrics (`kafka`, `redis`, ...).
    fn name(&self) -> &str;

    /// Takes a batch. `Ok` means the sink has taken responsibility for it
    /// and will answer its acker, possibly later (when a broker confirms).
    /// On `Err` the batch's acker is dropped unanswered, which fails it.
    async fn send(&mut self, batch: Batch) -> Result<(), SinkError>;

    /// Waits until every batch taken so far has been answered.
    async fn flush(&mut self) -> Result<(), SinkError>;

    /// Why this sink would refuse `event` definitively whatever the state
    /// of the destination (a table without the key its document id or key
    /// template needs), or `None`. Pure and cheap: a relay asks before
    /// sending, so that such a record is dead-lettered once, or stops the
    /// relay, instead of failing every batch it is in on every re-read.
    /// A sink whose `send` can refuse single events this way must say so
    /// here.
    fn refuses(&self, _event: &ChangeEvent) -> Option<String> {
        None
    }

    /// Whether this sink takes [notices](crate::notice) (heartbeats, schema
    /// changes, logical messages). Those that do not get their batches
    /// without them.
    fn takes_notices(&self) -> bool {
        false
    }

    /// Whether the destination is reachable, for readiness probes.
    async fn healthy(&self) -> bool {
        true
    }

    /// The source starts over from its checkpoint: the batches after it
    /// come again. A sink that refuses batches after a failure (so that none
    /// passes a failed one) takes them again from here. Called before the
    /// first batch of each restart; nothing else is in flight then.
    async fn rewind(&mut self) -> Result<(), SinkError> {
        Ok(())
    }
}

/// The one "send a batch to every sink" step, shared by the capture loop
/// and the relay: each sink in turn gets its events (`events` yields one
/// `Arc` per sink, in order: the same one for all, or a copy without the
/// events that sink refused) with a clone of the batch's acker, and what it
/// did is counted (`walcast_sink_events_total`, `walcast_sink_errors_total`)
/// and a refusal logged. Returns the refusals, by sink name, for the caller
/// to classify: a refused batch's acker clone is dropped unanswered, so the
/// batch fails and its position is never confirmed.
pub async fn send_to_every_sink(
    pipeline: &str,
    sinks: &mut [Box<dyn Sink>],
    events: impl IntoIterator<Item = Arc<Vec<ChangeEvent>>>,
    acker: &Acker,
) -> Vec<(String, SinkError)> {
    use crate::telemetry::{SINK_ERRORS, SINK_EVENTS};
    let mut refused = Vec::new();
    for (sink, events) in sinks.iter_mut().zip(events) {
        // A batch that held only notices, for a sink that takes none:
        // nothing to send, and nothing to answer (no acker clone).
        if events.is_empty() {
            continue;
        }
        let name = sink.name().to_string();
        let n = events.len() as u64;
        let batch = Batch {
            events,
            acker: acker.clone(),
        };
        match sink.send(batch).await {
            Ok(()) => {
                metrics::counter!(SINK_EVENTS, "pipeline" => pipeline.to_string(), "sink" => name)
                    .increment(n)
            }
            Err(e) => {
                tracing::error!(pipeline = %pipeline, sink = %name, error = %e, "sink refused a batch");
                metrics::counter!(SINK_ERRORS, "pipeline" => pipeline.to_string(), "sink" => name.clone())
                    .increment(1);
                refused.push((name, e));
            }
        }
    }
    refused
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sink_is_named_once() {
        let e = SinkError::definite("kafka", "kafka: cannot create topic `t`");
        assert_eq!(e.to_string(), "kafka: cannot create topic `t`");
        let e = SinkError::transient("redis", "connection refused");
        assert_eq!(
            e.to_string(),
            "redis: connection refused (transient; will retry)"
        );
    }
}
