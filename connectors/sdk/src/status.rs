//! What a running pipeline reports about itself: the state behind /status,
//! /readyz and `walcast status`.
//!
//! Sources update it as they go (state, positions, snapshot progress); the
//! daemon's admin HTTP server reads it. Both sides hold a [`StatusHandle`].
//!
//! The handle also carries the one instruction that flows the other way:
//! pause. The management API sets it ([`StatusHandle::request_pause`]); a
//! source that supports pausing watches it ([`StatusHandle::pause_watch`])
//! and reports [`PipelineState::Paused`] once it has stopped reading. It
//! lives in memory only: a restarted daemon streams again.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use crate::Lsn;
use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PipelineState {
    Starting,
    /// Reading the tables' existing rows (the initial snapshot).
    Snapshotting,
    Streaming,
    /// Lost the connection or a sink; retrying with backoff.
    Retrying,
    /// Waiting for a replication slot held by another process.
    Standby,
    /// Paused through the management API: connected, holding the slot's
    /// position, reading nothing; the lag keeps being reported.
    Paused,
    Stopped,
    Failed,
}

#[derive(Debug, Clone, Serialize)]
pub struct PipelineStatus {
    pub name: String,
    pub kind: &'static str,
    pub state: PipelineState,
    pub slot: Option<String>,
    pub publication: Option<String>,
    /// The LSN confirmed to Postgres (everything before it is delivered).
    pub confirmed_lsn: Option<String>,
    /// The server's WAL end as last reported.
    pub wal_end: Option<String>,
    pub lag_bytes: u64,
    pub in_flight_events: usize,
    pub events_total: u64,
    pub transactions_total: u64,
    pub sinks: Vec<String>,
    pub last_error: Option<String>,
    /// A pause was asked for (through the management API) and not yet
    /// undone. The state says when it took effect: a pipeline still taking
    /// its initial snapshot, or reconnecting, pauses once it streams.
    pub pause_requested: bool,
    /// Long operations (snapshots): rows done, estimate, rate, ETA.
    pub progress: BTreeMap<String, serde_json::Value>,
}

/// Shared, cheaply cloned handle to one pipeline's status.
#[derive(Debug, Clone)]
pub struct StatusHandle {
    status: Arc<Mutex<PipelineStatus>>,
    /// `true` while a pause is requested; the source watches it.
    pause: Arc<tokio::sync::watch::Sender<bool>>,
}

impl StatusHandle {
    pub fn new(name: &str, kind: &'static str, sinks: Vec<String>) -> Self {
        let status = Arc::new(Mutex::new(PipelineStatus {
            name: name.into(),
            kind,
            state: PipelineState::Starting,
            slot: None,
            publication: None,
            confirmed_lsn: None,
            wal_end: None,
            lag_bytes: 0,
            in_flight_events: 0,
            events_total: 0,
            transactions_total: 0,
            sinks,
            last_error: None,
            pause_requested: false,
            progress: BTreeMap::new(),
        }));
        StatusHandle {
            status,
            pause: Arc::new(tokio::sync::watch::channel(false).0),
        }
    }

    pub fn update(&self, f: impl FnOnce(&mut PipelineStatus)) {
        if let Ok(mut s) = self.status.lock() {
            f(&mut s);
        }
    }

    /// Asks the source to pause (`true`) or resume (`false`); returns
    /// whether that changed the request.
    pub fn request_pause(&self, pause: bool) -> bool {
        self.update(|s| s.pause_requested = pause);
        self.pause
            .send_if_modified(|p| std::mem::replace(p, pause) != pause)
    }

    /// Whether a pause is requested now.
    pub fn pause_requested(&self) -> bool {
        *self.pause.borrow()
    }

    /// A receiver that wakes when the pause request changes.
    pub fn pause_watch(&self) -> tokio::sync::watch::Receiver<bool> {
        self.pause.subscribe()
    }

    pub fn snapshot(&self) -> PipelineStatus {
        self.status
            .lock()
            .map(|s| s.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    pub fn set_state(&self, state: PipelineState) {
        self.update(|s| s.state = state);
    }

    pub fn set_positions(&self, confirmed: Lsn, wal_end: Lsn, in_flight: usize) {
        self.update(|s| {
            s.confirmed_lsn = Some(confirmed.to_string());
            s.wal_end = Some(wal_end.to_string());
            s.lag_bytes = wal_end.0.saturating_sub(confirmed.0);
            s.in_flight_events = in_flight;
        });
    }
}
