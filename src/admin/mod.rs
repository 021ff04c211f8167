//! The admin HTTP server: liveness, readiness, Prometheus metrics and a JSON
//! status, on localhost by default because status can reveal table names
//! and positions. Bound beyond loopback, it takes a bearer token
//! (`admin.token_file`) for everything but the probes, and TLS
//! (`admin.tls`): the probes stay open because kubelet and systemd call them
//! without credentials, and they reveal no more than "ready or not". The
//! status page at `/` is open too: it is a static file, and its script
//! sends the token for the data (see [`page`]).
//!
//! The management API (`/api/v1`, see [`api`]) sits behind the same token.

pub mod api;
pub mod page;

use std::net::SocketAddr;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio_util::sync::CancellationToken;

use walcast_sdk::status::{PipelineState, StatusHandle};
use walcast_sdk::telemetry as metrics;

#[derive(Clone)]
struct AppState {
    prometheus: PrometheusHandle,
    pipelines: Vec<StatusHandle>,
    history: page::History,
}

impl axum::extract::FromRef<AppState> for page::History {
    fn from_ref(s: &AppState) -> Self {
        s.history.clone()
    }
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

/// How the admin server is protected.
#[derive(Clone, Default)]
pub struct Security {
    /// Required as `Authorization: Bearer <token>` beyond the probes.
    pub token: Option<std::sync::Arc<str>>,
    /// HTTPS instead of HTTP.
    pub tls: Option<std::sync::Arc<rustls::ServerConfig>>,
}

impl Security {
    /// Reads the token file and the TLS certificate and key.
    pub fn load(config: &crate::config::AdminConfig) -> anyhow::Result<Self> {
        use anyhow::Context as _;
        let token = match &config.token_file {
            None => None,
            Some(path) => {
                let t = std::fs::read_to_string(path)
                    .with_context(|| format!("admin.token_file {}", path.display()))?;
                let t = t.trim();
                anyhow::ensure!(
                    t.len() >= 16,
                    "admin.token_file {}: the token is shorter than 16 characters",
                    path.display()
                );
                Some(std::sync::Arc::from(t))
            }
        };
        let tls = match &config.tls {
            None => None,
            Some(t) => {
                let certs = rustls_pemfile::certs(
                    &mut std::fs::read(&t.cert_file)
                        .with_context(|| format!("admin.tls.cert_file {}", t.cert_file.display()))?
                        .as_slice(),
                )
                .collect::<Result<Vec<_>, _>>()
                .with_context(|| format!("admin.tls.cert_file {}", t.cert_file.display()))?;
                let key = rustls_pemfile::private_key(
                    &mut std::fs::read(&t.key_file)
                        .with_context(|| format!("admin.tls.key_file {}", t.key_file.display()))?
                        .as_slice(),
                )
                .with_context(|| format!("admin.tls.key_file {}", t.key_file.display()))?
                .with_context(|| {
                    format!(
                        "admin.tls.key_file {}: no private key in it",
                        t.key_file.display()
                    )
                })?;
                let provider = rustls::crypto::CryptoProvider::get_default()
                    .cloned()
                    .unwrap_or_else(|| {
                        std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider())
                    });
                let config = rustls::ServerConfig::builder_with_provider(provider)
                    .with_safe_default_protocol_versions()
                    .context("admin TLS")?
                    .with_no_client_auth()
                    .with_single_cert(certs, key)
                    .context("admin.tls: the certificate and the key do not go together")?;
                Some(std::sync::Arc::new(config))
            }
        };
        Ok(Security { token, tls })
    }
}

pub async fn serve(
    addr: SocketAddr,
    prometheus: PrometheusHandle,
    daemon: std::sync::Arc<api::Daemon>,
    security: Security,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let pipelines: Vec<StatusHandle> = daemon.pipelines.iter().map(|(s, _)| s.clone()).collect();
    let protected = Router::new()
        .route("/metrics", get(metrics_text))
        .route("/status", get(status))
        .route("/status/history", get(page::history))
        .merge(api::routes(daemon))
        .layer(axum::middleware::from_fn_with_state(
            security.token.clone(),
            require_token,
        ));
    let app = Router::new()
        .route("/", get(page::index))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .merge(protected)
        .with_state(AppState {
            prometheus,
            history: page::spawn_sampler(pipelines.clone(), shutdown.clone()),
            pipelines,
        });
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, tls = security.tls.is_some(), token = security.token.is_some(), "admin HTTP listening");
    if !addr.ip().is_loopback() && security.token.is_none() {
        tracing::warn!(%addr, "the admin server listens beyond loopback without admin.token_file: anyone who reaches it reads the status (tables, slots, positions)");
    }
    match security.tls {
        None => {
            axum::serve(
                listener,
                app.into_make_service_with_connect_info::<SocketAddr>(),
            )
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await
        }
        Some(tls) => serve_tls(listener, app, tls, shutdown).await,
    }
}

/// HTTPS: each accepted connection goes through the TLS handshake, then
/// hyper serves the same router on it.
async fn serve_tls(
    listener: tokio::net::TcpListener,
    app: Router,
    tls: std::sync::Arc<rustls::ServerConfig>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => accepted?,
            _ = shutdown.cancelled() => return Ok(()),
        };
        let (acceptor, app) = (acceptor.clone(), app.clone());
        tokio::spawn(async move {
            let stream = match acceptor.accept(tcp).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::debug!(%peer, error = %e, "admin TLS handshake failed");
                    return;
                }
            };
            // The peer for the management API's audit lines, as
            // `into_make_service_with_connect_info` records it over plain HTTP.
            let app = app.layer(axum::Extension(axum::extract::ConnectInfo(peer)));
            let service = hyper_util::service::TowerToHyperService::new(app);
            if let Err(e) =
                hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await
            {
                tracing::debug!(%peer, error = %e, "admin connection ended");
            }
        });
    }
}

/// Lets a request through when no token is configured, or when it carries
/// the token (compared in constant time).
async fn require_token(
    State(token): State<Option<std::sync::Arc<str>>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let Some(token) = token else {
        return next.run(request).await;
    };
    let given = request
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    let same = given.len() == token.len()
        && given
            .bytes()
            .zip(token.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0;
    if same {
        next.run(request).await
    } else {
        (
            StatusCode::UNAUTHORIZED,
            [(axum::http::header::WWW_AUTHENTICATE, "Bearer")],
            "a bearer token is required (admin.token_file)\n",
        )
            .into_response()
    }
}

async fn readyz(State(s): State<AppState>) -> impl IntoResponse {
    let not_ready: Vec<String> = s
        .pipelines
        .iter()
        .map(|p| p.snapshot())
        // Paused on purpose: the process is fine, and a readiness failure
        // would only take it out of its Service.
        .filter(|p| !matches!(p.state, PipelineState::Streaming | PipelineState::Paused))
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
    let statuses: Vec<_> = s.pipelines.iter().map(|p| p.snapshot()).collect();
    metrics::refresh(&statuses);
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
