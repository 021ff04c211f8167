//! Every metric walcast exports, defined once with its labels, so that the
//! log line and the counter for an event never drift apart and the Grafana
//! dashboard has one list to check against.
//!
//! It lives in the SDK because sources and the pipeline runtime both count
//! into these series; the daemon only installs the exporter (admin HTTP) and
//! calls [`describe`].

use std::time::Duration;

use metrics::{
    counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Unit,
};

pub const EVENTS: &str = "walcast_events_total";
pub const TRANSACTIONS: &str = "walcast_transactions_total";
pub const WAL_BYTES: &str = "walcast_wal_bytes_total";
pub const LAG_BYTES: &str = "walcast_replication_lag_bytes";
pub const LAG_SECONDS: &str = "walcast_replication_lag_seconds";
pub const COMMIT_TO_ACK: &str = "walcast_commit_to_ack_seconds";
pub const SLOT_RETAINED: &str = "walcast_slot_wal_retained_bytes";
pub const SINK_ERRORS: &str = "walcast_sink_errors_total";
pub const SINK_EVENTS: &str = "walcast_sink_events_total";
pub const IN_FLIGHT: &str = "walcast_in_flight_events";
pub const CONFIRMED_LSN: &str = "walcast_confirmed_lsn";
pub const STREAMING: &str = "walcast_streaming";
pub const PAUSED: &str = "walcast_paused";
pub const RESTARTS: &str = "walcast_pipeline_restarts_total";
pub const SNAPSHOT_ROWS: &str = "walcast_snapshot_rows_total";
pub const SNAPSHOT_RUNNING: &str = "walcast_snapshot_running";
pub const MAX_IN_FLIGHT: &str = "walcast_max_in_flight_events";
pub const DEAD_LETTERS: &str = "walcast_dead_letters_total";

/// All names, for the dashboard check.
pub const ALL: &[&str] = &[
    EVENTS,
    TRANSACTIONS,
    WAL_BYTES,
    LAG_BYTES,
    LAG_SECONDS,
    COMMIT_TO_ACK,
    SLOT_RETAINED,
    SINK_ERRORS,
    SINK_EVENTS,
    IN_FLIGHT,
    CONFIRMED_LSN,
    STREAMING,
    PAUSED,
    RESTARTS,
    SNAPSHOT_ROWS,
    SNAPSHOT_RUNNING,
    MAX_IN_FLIGHT,
    DEAD_LETTERS,
];

pub fn describe() {
    describe_counter!(EVENTS, "Change events captured, by pipeline, table and op");
    describe_counter!(TRANSACTIONS, "Transactions captured");
    describe_counter!(
        WAL_BYTES,
        Unit::Bytes,
        "pgoutput bytes received from Postgres"
    );
    describe_gauge!(
        LAG_BYTES,
        Unit::Bytes,
        "Server WAL end minus the confirmed LSN"
    );
    describe_gauge!(
        LAG_SECONDS,
        Unit::Seconds,
        "Now minus the commit time of the newest transaction received"
    );
    describe_histogram!(
        COMMIT_TO_ACK,
        Unit::Seconds,
        "From commit in Postgres to acknowledgement by every sink"
    );
    describe_gauge!(
        SLOT_RETAINED,
        Unit::Bytes,
        "WAL the replication slot keeps on the server (current LSN minus restart_lsn)"
    );
    describe_counter!(SINK_ERRORS, "Sink failures, by sink");
    describe_counter!(SINK_EVENTS, "Events handed to each sink");
    describe_gauge!(IN_FLIGHT, "Events handed to sinks and not yet acknowledged");
    describe_gauge!(CONFIRMED_LSN, "The LSN confirmed to Postgres, as a number");
    describe_gauge!(STREAMING, "1 while the pipeline streams");
    describe_gauge!(
        PAUSED,
        "1 while the pipeline is paused through the management API (walcast_streaming is 0 then)"
    );
    describe_counter!(RESTARTS, "Pipeline restarts after a transient error");
    describe_counter!(
        SNAPSHOT_ROWS,
        "Rows read by snapshots and handed to the sinks"
    );
    describe_gauge!(
        SNAPSHOT_RUNNING,
        "1 while a snapshot (snapshot=initial or incremental) has rows left to read"
    );
    describe_gauge!(
        MAX_IN_FLIGHT,
        "max_in_flight_events: the in-flight events at which capture stops reading"
    );
    describe_counter!(
        DEAD_LETTERS,
        "Events or records set aside in a dead letter instead of delivered, by sink"
    );
}

/// Makes every series exist from the start, so dashboards and alerts see
/// zeros rather than gaps.
///
/// `max_in_flight` is the capture pipeline's `max_in_flight_events` (a
/// relay has none).
pub fn register_pipeline(pipeline: &str, sinks: &[String], max_in_flight: Option<usize>) {
    let p = pipeline.to_string();
    if let Some(max) = max_in_flight {
        gauge!(MAX_IN_FLIGHT, "pipeline" => p.clone()).set(max as f64);
        for which in ["initial", "incremental"] {
            gauge!(SNAPSHOT_RUNNING, "pipeline" => p.clone(), "snapshot" => which).set(0.0);
        }
    }
    counter!(TRANSACTIONS, "pipeline" => p.clone()).absolute(0);
    counter!(WAL_BYTES, "pipeline" => p.clone()).absolute(0);
    counter!(RESTARTS, "pipeline" => p.clone()).absolute(0);
    counter!(SNAPSHOT_ROWS, "pipeline" => p.clone()).absolute(0);
    gauge!(LAG_BYTES, "pipeline" => p.clone()).set(0.0);
    gauge!(LAG_SECONDS, "pipeline" => p.clone()).set(0.0);
    gauge!(SLOT_RETAINED, "pipeline" => p.clone()).set(0.0);
    gauge!(IN_FLIGHT, "pipeline" => p.clone()).set(0.0);
    gauge!(CONFIRMED_LSN, "pipeline" => p.clone()).set(0.0);
    gauge!(STREAMING, "pipeline" => p.clone()).set(0.0);
    for s in sinks {
        counter!(SINK_ERRORS, "pipeline" => p.clone(), "sink" => s.clone()).absolute(0);
        counter!(SINK_EVENTS, "pipeline" => p.clone(), "sink" => s.clone()).absolute(0);
        counter!(DEAD_LETTERS, "pipeline" => p.clone(), "sink" => s.clone()).absolute(0);
    }
}

pub fn events(pipeline: &str, table: &str, op: &'static str, n: u64) {
    counter!(EVENTS, "pipeline" => pipeline.to_string(), "table" => table.to_string(), "op" => op)
        .increment(n);
}

pub fn commit_to_ack(pipeline: &str, d: Duration) {
    histogram!(COMMIT_TO_ACK, "pipeline" => pipeline.to_string()).record(d.as_secs_f64());
}

/// A dead-letter count kept by a sink of its own (the connectors do not
/// depend on the daemon, so they count in an atomic the daemon reads).
pub type DeadLetterCount = Box<dyn Fn() -> u64 + Send + Sync>;

/// Sinks' own dead-letter counts, added to [`DEAD_LETTERS`] at each scrape
/// ([`refresh`]) by what they grew since the last (so that a relay's own
/// dead letters for the same sink add up with them); keyed by (pipeline,
/// sink), a rebuilt pipeline replaces its entry.
#[allow(clippy::type_complexity)]
static DEAD_LETTER_COUNTS: std::sync::Mutex<
    std::collections::BTreeMap<(String, String), (DeadLetterCount, u64)>,
> = std::sync::Mutex::new(std::collections::BTreeMap::new());

/// Exports `count` as `walcast_dead_letters_total{pipeline, sink}`.
pub fn watch_dead_letters(pipeline: &str, sink: &str, count: DeadLetterCount) {
    if let Ok(mut m) = DEAD_LETTER_COUNTS.lock() {
        m.insert((pipeline.to_string(), sink.to_string()), (count, 0));
    }
}

/// Dead letters a relay set aside itself: `sink` refused the record, or
/// `decode` when it could not be decoded at all.
pub fn relay_dead_letter(pipeline: &str, sink: &str) {
    counter!(DEAD_LETTERS, "pipeline" => pipeline.to_string(), "sink" => sink.to_string())
        .increment(1);
}

/// Brings the values read at scrape time up to date: the sinks'
/// dead-letter counts, and whether a snapshot is running (from the status
/// the snapshot reports in `progress`, so that an alert can tell a stalled
/// snapshot from a finished one).
pub fn refresh(pipelines: &[crate::status::PipelineStatus]) {
    if let Ok(mut m) = DEAD_LETTER_COUNTS.lock() {
        for ((p, s), (count, seen)) in m.iter_mut() {
            let now = count();
            if now > *seen {
                counter!(DEAD_LETTERS, "pipeline" => p.clone(), "sink" => s.clone())
                    .increment(now - *seen);
                *seen = now;
            }
        }
    }
    for st in pipelines {
        let paused = st.state == crate::status::PipelineState::Paused;
        gauge!(PAUSED, "pipeline" => st.name.clone()).set(if paused { 1.0 } else { 0.0 });
    }
    for st in pipelines.iter().filter(|st| st.kind == "capture") {
        let running =
            |key: &str| st.progress.get(key).and_then(|v| v["state"].as_str()) == Some("running");
        let initial = running("snapshot") || st.state == crate::status::PipelineState::Snapshotting;
        for (which, on) in [
            ("initial", initial),
            ("incremental", running("incremental_snapshot")),
        ] {
            gauge!(SNAPSHOT_RUNNING, "pipeline" => st.name.clone(), "snapshot" => which)
                .set(if on { 1.0 } else { 0.0 });
        }
    }
}
