//! The status page at `/`: one HTML file with a little inline script,
//! embedded in the binary (no build step, no assets to deploy), that reads
//! `/status`, `/status/history` and `/metrics` like any other client.
//!
//! The page itself holds no data, so it is served without the token: a
//! browser cannot add an `Authorization` header to a navigation. Its script
//! sends the token (asked for once, kept in the tab's sessionStorage) with
//! every request, and the data endpoints stay behind `admin.token_file`.
//!
//! `/status` is a snapshot; a chart of the lag over the last minutes needs
//! the past, which only the daemon has when the page opens. A sampler keeps
//! each pipeline's lag every [`SAMPLE_EVERY`] for [`KEEP`], and the last
//! few distinct errors it saw, and `/status/history` returns them.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::response::{Html, IntoResponse};
use axum::Json;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use walcast_sdk::status::StatusHandle;

/// How often the sampler reads each pipeline's status.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(5);
/// How far back the lag history reaches (15 minutes).
pub const KEEP: Duration = Duration::from_secs(15 * 60);
/// Distinct errors kept per pipeline.
const ERRORS_KEPT: usize = 5;

const PAGE: &str = include_str!("status_page.html");

#[derive(Debug, Default, Clone, Serialize)]
struct PipelineHistory {
    /// `[unix milliseconds, lag bytes]`, oldest first.
    lag_bytes: VecDeque<(u64, u64)>,
    /// The last distinct values of `last_error`, oldest first, with when
    /// the sampler first saw each.
    errors: VecDeque<SeenError>,
}

#[derive(Debug, Clone, Serialize)]
struct SeenError {
    at_ms: u64,
    message: String,
}

/// The sampled past of every pipeline, shared with the handler.
#[derive(Clone, Default)]
pub struct History(Arc<Mutex<BTreeMap<String, PipelineHistory>>>);

impl History {
    fn sample(&self, pipelines: &[StatusHandle], now_ms: u64) {
        let Ok(mut all) = self.0.lock() else { return };
        for p in pipelines {
            let st = p.snapshot();
            let h = all.entry(st.name.clone()).or_default();
            h.lag_bytes.push_back((now_ms, st.lag_bytes));
            let keep = (KEEP.as_secs() / SAMPLE_EVERY.as_secs()) as usize;
            while h.lag_bytes.len() > keep {
                h.lag_bytes.pop_front();
            }
            if let Some(e) = st.last_error {
                if h.errors.back().map(|x| &x.message) != Some(&e) {
                    h.errors.push_back(SeenError {
                        at_ms: now_ms,
                        message: e,
                    });
                    while h.errors.len() > ERRORS_KEPT {
                        h.errors.pop_front();
                    }
                }
            }
        }
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Samples until `shutdown`; the first sample at once.
pub fn spawn_sampler(pipelines: Vec<StatusHandle>, shutdown: CancellationToken) -> History {
    let history = History::default();
    let h = history.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(SAMPLE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => h.sample(&pipelines, now_ms()),
                _ = shutdown.cancelled() => return,
            }
        }
    });
    history
}

/// `GET /`: the page.
pub async fn index() -> impl IntoResponse {
    (
        [
            (axum::http::header::CACHE_CONTROL, "no-cache"),
            // The page loads nothing from elsewhere; its script talks only
            // to this server.
            (
                axum::http::header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src 'self' data:; form-action 'none'; frame-ancestors 'none'",
            ),
        ],
        Html(PAGE),
    )
}

/// `GET /status/history`: each pipeline's sampled lag and recent errors.
pub async fn history(State(h): State<History>) -> impl IntoResponse {
    let pipelines = h.0.lock().map(|m| m.clone()).unwrap_or_default();
    Json(serde_json::json!({
        "sample_seconds": SAMPLE_EVERY.as_secs(),
        "pipelines": pipelines,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_is_bounded_and_keeps_distinct_errors() {
        let p = StatusHandle::new("orders", "capture", vec!["kafka".into()]);
        let h = History::default();
        let keep = (KEEP.as_secs() / SAMPLE_EVERY.as_secs()) as usize;
        for i in 0..(keep as u64 + 10) {
            p.update(|s| {
                s.lag_bytes = i;
                s.last_error = Some(format!("error {}", i / 100));
            });
            h.sample(&[p.clone()], i * 5000);
        }
        let all = h.0.lock().unwrap();
        let o = &all["orders"];
        assert_eq!(o.lag_bytes.len(), keep);
        let last = keep as u64 + 9;
        assert_eq!(*o.lag_bytes.back().unwrap(), (last * 5000, last));
        assert_eq!(o.lag_bytes.front().unwrap().1, 10);
        // 190 samples: errors 0 and 1, each recorded once.
        let msgs: Vec<_> = o.errors.iter().map(|e| e.message.as_str()).collect();
        assert_eq!(msgs, ["error 0", "error 1"]);
    }

    #[test]
    fn the_page_reads_the_endpoints_the_server_has() {
        for path in ["/status", "/status/history", "/metrics"] {
            assert!(
                PAGE.contains(&format!("'{path}'")),
                "the page fetches {path}"
            );
        }
        assert!(
            !PAGE.contains(" src=") && !PAGE.contains("<link") && !PAGE.contains("@import"),
            "the page loads nothing from elsewhere"
        );
    }
}
