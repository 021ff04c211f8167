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
pub const RESTARTS: &str = "walcast_pipeline_restarts_total";
pub const SNAPSHOT_ROWS: &str = "walcast_snapshot_rows_total";

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
    RESTARTS,
    SNAPSHOT_ROWS,
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
    describe_counter!(RESTARTS, "Pipeline restarts after a transient error");
    describe_counter!(
        SNAPSHOT_ROWS,
        "Rows read by snapshots and handed to the sinks"
    );
}

/// Makes every series exist from the start, so dashboards and alerts see
/// zeros rather than gaps.
pub fn register_pipeline(pipeline: &str, sinks: &[String]) {
    let p = pipeline.to_string();
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
    }
}

pub fn events(pipeline: &str, table: &str, op: &'static str, n: u64) {
    counter!(EVENTS, "pipeline" => pipeline.to_string(), "table" => table.to_string(), "op" => op)
        .increment(n);
}

pub fn commit_to_ack(pipeline: &str, d: Duration) {
    histogram!(COMMIT_TO_ACK, "pipeline" => pipeline.to_string()).record(d.as_secs_f64());
}
