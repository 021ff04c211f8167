//! The admin HTTP server: liveness, readiness, Prometheus metrics and a JSON
//! status, on localhost by default because status can reveal table names
//! and positions.

pub mod metrics;

use std::net::SocketAddr;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio_util::sync::CancellationToken;

use crate::pipeline::status::{PipelineState, StatusHandle};

#[derive(Clone)]
struct AppState {
    prometheus: PrometheusHandle,
    pipelines: Vec<StatusHandle>,
}

/// How often the recorder folds histogram samples into their buckets.
/// `install_recorder` leaves that to the caller: until then (or until
/// /metrics is scraped) it keeps every sample, so an unscraped daemon grew
/// by every commit's latency sample (found by tests/soak.rs).
const METRICS_UPKEEP: std::time::Duration = std::time::Duration::from_secs(5);

/// Installs the global metrics recorder once per process, and the task that
/// keeps its memory bounded (needs a Tokio runtime).
pub fn install_recorder() -> PrometheusHandle {
    let handle = PrometheusBuilder::new()
        .set_buckets(&[
            0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
        ])
        .expect("static buckets are valid")
        .install_recorder()
        .expect("the metrics recorder is installed once");
    metrics::describe();
    let upkeep = handle.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(METRICS_UPKEEP);
        loop {
            tick.tick().await;
            upkeep.run_upkeep();
        }
    });
    handle
}

pub async fn serve(
    addr: SocketAddr,
    prometheus: PrometheusHandle,
    pipelines: Vec<StatusHandle>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .route("/status", get(status))
        .with_state(AppState {
            prometheus,
            pipelines,
        });
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "admin HTTP listening");
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}

async fn readyz(State(s): State<AppState>) -> impl IntoResponse {
    let not_ready: Vec<String> = s
        .pipelines
        .iter()
        .map(|p| p.snapshot())
        .filter(|p| p.state != PipelineState::Streaming)
        .map(|p| format!("{}: {:?}", p.name, p.state))
        .collect();
    if not_ready.is_empty() {
        (StatusCode::OK, "ready\n".to_string())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {}\n", not_ready.join(", ")),
        )
    }
}

async fn metrics_text(State(s): State<AppState>) -> impl IntoResponse {
    (
        [("content-type", "text/plain; version=0.0.4")],
        s.prometheus.render(),
    )
}

async fn status(State(s): State<AppState>) -> impl IntoResponse {
    Json(serde_json::json!({
        "version": env!("CARGO_PKG_VERSION"),
        "pipelines": s.pipelines.iter().map(|p| p.snapshot()).collect::<Vec<_>>(),
    }))
}
