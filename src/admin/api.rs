//! The management API, `/api/v1` on the admin server: act on a running
//! daemon's pipelines without editing files and restarting.
//!
//! | route | what |
//! |---|---|
//! | `POST /api/v1/pipelines/{name}/pause` | stop reading, hold the slot's position |
//! | `POST /api/v1/pipelines/{name}/resume` | read on from where it paused |
//! | `POST /api/v1/pipelines/{name}/snapshot` `{"tables": [...]}` | incremental snapshot |
//! | `POST /api/v1/pipelines/{name}/snapshot/stop` | forget the queued tables |
//! | `GET /api/v1/slots` | slots of the source clusters, retained WAL, owner |
//! | `POST /api/v1/slots/drop` `{"slot", "confirm", "source"?}` | drop a slot no running pipeline uses |
//!
//! Every route sits behind the admin token when `admin.token_file` is set
//! (the same check as `/status`). The actions that change something are
//! refused (403) when the server listens beyond loopback without a token:
//! status can be read by whoever reaches it then, but nobody anonymous
//! gets to drop a slot. Answers are JSON: what was done in `message`, or
//! `error` with what to do instead.
//!
//! Every action writes one audit line at INFO (target `walcast::audit`):
//! the action, the pipeline or slot, how the caller was let in (`token`,
//! or `loopback, no token`: the token is the only identity there is), the
//! peer address, the actor the caller names in `X-Walcast-Actor` (the
//! `walcast` commands send `--actor`, by default `$USER`; it is a claim,
//! not an authentication), and the outcome.
//!
//! A pause is not persisted: a restarted daemon streams again (the
//! operator who restarts it sees a clean state; a pause that outlived a
//! restart silently would be worse).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{ConnectInfo, Path};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use serde::Deserialize;
use serde_json::json;

use walcast_sdk::status::{PipelineState, StatusHandle};

use crate::manage::{self, Capture, ManageError};

/// What the management API acts on.
pub struct Daemon {
    /// Every pipeline, captures with their settings.
    pub pipelines: Vec<(StatusHandle, Option<Capture>)>,
    /// The config file, named in messages.
    pub config: std::path::PathBuf,
    /// Whether a token protects the admin server.
    pub token: bool,
    /// Whether the admin server listens on loopback only.
    pub loopback: bool,
}

impl Daemon {
    fn captures(&self) -> Vec<Capture> {
        self.pipelines
            .iter()
            .filter_map(|(_, c)| c.clone())
            .collect()
    }

    fn state_of(&self, name: &str) -> Option<PipelineState> {
        self.pipelines
            .iter()
            .map(|(s, _)| s.snapshot())
            .find(|s| s.name == name)
            .map(|s| s.state)
    }

    fn find(&self, name: &str) -> Result<&(StatusHandle, Option<Capture>), ApiError> {
        self.pipelines
            .iter()
            .find(|(s, _)| s.snapshot().name == name)
            .ok_or_else(|| {
                ApiError::Manage(ManageError::NotFound(format!(
                    "no pipeline named {name} in this daemon ({})",
                    self.config.display()
                )))
            })
    }
}

/// The routes, to be put behind the token check (the daemon travels as an
/// extension, so they merge into a router of any state).
pub fn routes<S: Clone + Send + Sync + 'static>(daemon: Arc<Daemon>) -> Router<S> {
    Router::new()
        .route("/api/v1/pipelines/{name}/pause", post(pause))
        .route("/api/v1/pipelines/{name}/resume", post(resume))
        .route("/api/v1/pipelines/{name}/snapshot", post(snapshot))
        .route(
            "/api/v1/pipelines/{name}/snapshot/stop",
            post(snapshot_stop),
        )
        .route("/api/v1/slots", get(slots))
        .route("/api/v1/slots/drop", post(slot_drop))
        .layer(axum::Extension(daemon))
}

/// Who asked, for the audit line.
struct Caller {
    via: &'static str,
    peer: String,
    actor: String,
}

/// The header naming who acts (`walcast --actor`).
pub const ACTOR_HEADER: &str = "x-walcast-actor";

impl Caller {
    fn of(d: &Daemon, peer: Option<SocketAddr>, headers: &HeaderMap) -> Self {
        let actor: String = headers
            .get(ACTOR_HEADER)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .chars()
            .filter(|c| !c.is_control())
            .take(100)
            .collect();
        Caller {
            // The token middleware already let the request through.
            via: match (d.token, d.loopback) {
                (true, _) => "token",
                (false, true) => "loopback, no token",
                (false, false) => "no token",
            },
            peer: peer.map(|p| p.to_string()).unwrap_or_else(|| "?".into()),
            actor: if actor.trim().is_empty() {
                "unnamed".into()
            } else {
                actor.trim().to_string()
            },
        }
    }

    /// Mutating actions need a token once the server is reachable beyond
    /// loopback.
    fn may_change(&self, d: &Daemon) -> Result<(), ApiError> {
        if !d.token && !d.loopback {
            return Err(ApiError::forbidden(
                "the admin server listens beyond loopback without admin.token_file: management actions are \
                 refused; set admin.token_file (or listen on 127.0.0.1) and restart walcast",
            ));
        }
        Ok(())
    }

    /// The audit line.
    fn audit(&self, action: &str, target: &str, outcome: &Result<Answer, ApiError>) {
        let (code, said) = match outcome {
            Ok(a) => (
                a.code.as_u16(),
                a.body["message"].as_str().unwrap_or("").to_string(),
            ),
            Err(e) => (e.status().as_u16(), e.to_string()),
        };
        tracing::info!(
            target: "walcast::audit",
            action,
            target_name = target,
            caller = self.via,
            peer = %self.peer,
            actor = %self.actor,
            code,
            outcome = %said,
            "management action"
        );
    }
}

/// A successful answer: a status code and a JSON body with a `message`.
struct Answer {
    code: StatusCode,
    body: serde_json::Value,
}

impl IntoResponse for Answer {
    fn into_response(self) -> Response {
        (self.code, Json(self.body)).into_response()
    }
}

#[derive(Debug, thiserror::Error)]
enum ApiError {
    #[error(transparent)]
    Manage(#[from] ManageError),
    /// The server's own rule (no anonymous changes beyond loopback).
    #[error("{0}")]
    Forbidden(&'static str),
}

impl ApiError {
    fn forbidden(message: &'static str) -> Self {
        ApiError::Forbidden(message)
    }

    fn status(&self) -> StatusCode {
        match self {
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::Manage(e) => {
                StatusCode::from_u16(e.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status(), Json(json!({ "error": self.to_string() }))).into_response()
    }
}

/// Runs an action with its token policy and its audit line.
async fn act(
    d: &Daemon,
    caller: Caller,
    action: &str,
    target: &str,
    mutating: bool,
    f: impl std::future::Future<Output = Result<Answer, ApiError>>,
) -> Response {
    let outcome = match mutating.then(|| caller.may_change(d)) {
        Some(Err(e)) => Err(e),
        _ => f.await,
    };
    caller.audit(action, target, &outcome);
    match outcome {
        Ok(a) => a.into_response(),
        Err(e) => e.into_response(),
    }
}

/// The peer's address, when the server recorded it (`ConnectInfo`, set by
/// both the plain and the TLS listener).
struct Peer(Option<SocketAddr>);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Peer {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _: &S,
    ) -> Result<Self, Self::Rejection> {
        Ok(Peer(
            parts
                .extensions
                .get::<ConnectInfo<SocketAddr>>()
                .map(|c| c.0),
        ))
    }
}

/// How long pause and resume wait for the pipeline to act on the request
/// before answering 202 (it acts within one wake-up of its loop while
/// streaming).
const TAKE_EFFECT: Duration = Duration::from_secs(5);

async fn wait_state(status: &StatusHandle, done: impl Fn(PipelineState) -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + TAKE_EFFECT;
    loop {
        if done(status.snapshot().state) {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn positions(status: &StatusHandle) -> serde_json::Value {
    let s = status.snapshot();
    json!({
        "pipeline": s.name,
        "state": s.state,
        "pause_requested": s.pause_requested,
        "confirmed_lsn": s.confirmed_lsn,
        "wal_end": s.wal_end,
        "lag_bytes": s.lag_bytes,
        "in_flight_events": s.in_flight_events,
    })
}

fn with_message(mut v: serde_json::Value, message: String) -> serde_json::Value {
    v["message"] = json!(message);
    v
}

async fn pause(
    Extension(d): Extension<Arc<Daemon>>,
    Path(name): Path<String>,
    peer: Peer,
    headers: HeaderMap,
) -> Response {
    let caller = Caller::of(&d, peer.0, &headers);
    act(&d, caller, "pause", &name, true, async {
        let (status, capture) = d.find(&name)?;
        if capture.is_none() {
            return Err(ManageError::Conflict(format!(
                "pipeline {name} is a relay (Kafka to sinks): pausing a relay is not supported; its consumer group \
                 keeps its committed offsets, so stopping the daemon is a pause without loss"
            ))
            .into());
        }
        let changed = status.request_pause(true);
        let took = wait_state(status, |s| s == PipelineState::Paused).await;
        let st = status.snapshot();
        let (code, message) = if took {
            (
                StatusCode::OK,
                format!(
                    "{} pipeline {name}: reading stopped, slot {} holds confirmed LSN {}; the lag keeps growing until \
                     `walcast resume {name}`",
                    if changed { "paused" } else { "already paused:" },
                    st.slot.as_deref().unwrap_or("?"),
                    st.confirmed_lsn.as_deref().unwrap_or("?"),
                ),
            )
        } else {
            (
                StatusCode::ACCEPTED,
                format!(
                    "pause of pipeline {name} requested; it is {} now and pauses as soon as it streams",
                    serde_json::to_value(st.state).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default()
                ),
            )
        };
        Ok(Answer {
            code,
            body: with_message(positions(status), message),
        })
    })
    .await
}

async fn resume(
    Extension(d): Extension<Arc<Daemon>>,
    Path(name): Path<String>,
    peer: Peer,
    headers: HeaderMap,
) -> Response {
    let caller = Caller::of(&d, peer.0, &headers);
    act(&d, caller, "resume", &name, true, async {
        let (status, capture) = d.find(&name)?;
        if capture.is_none() {
            return Err(ManageError::Conflict(format!(
                "pipeline {name} is a relay: it cannot be paused, so there is nothing to resume"
            ))
            .into());
        }
        let changed = status.request_pause(false);
        let took = wait_state(status, |s| s != PipelineState::Paused).await;
        let message = match (changed, took) {
            (false, _) => format!("pipeline {name} was not paused; nothing to do"),
            (true, true) => format!("resumed pipeline {name}: reading from the slot again"),
            (true, false) => format!("resume of pipeline {name} requested"),
        };
        Ok(Answer {
            code: if took {
                StatusCode::OK
            } else {
                StatusCode::ACCEPTED
            },
            body: with_message(positions(status), message),
        })
    })
    .await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SnapshotBody {
    #[serde(default)]
    tables: Vec<String>,
}

async fn snapshot_action(
    d: &Daemon,
    name: &str,
    stop: bool,
    tables: &[String],
) -> Result<Answer, ApiError> {
    let (_, capture) = d.find(name)?;
    let Some(capture) = capture else {
        return Err(ManageError::Conflict(format!(
            "pipeline {name} is a relay; snapshots read Postgres tables"
        ))
        .into());
    };
    let mut done = manage::request_snapshot(capture, &d.config, stop, tables).await?;
    if d.state_of(name) == Some(PipelineState::Paused) {
        done.message.push_str(&format!(
            " (pipeline {name} is paused: it reads the request once resumed)"
        ));
    }
    Ok(Answer {
        code: StatusCode::OK,
        body: serde_json::to_value(&done).unwrap_or_default(),
    })
}

async fn snapshot(
    Extension(d): Extension<Arc<Daemon>>,
    Path(name): Path<String>,
    peer: Peer,
    headers: HeaderMap,
    body: Result<Json<SnapshotBody>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let caller = Caller::of(&d, peer.0, &headers);
    act(&d, caller, "snapshot", &name, true, async {
        let Json(b) = body.map_err(|e| {
            ApiError::Manage(ManageError::BadRequest(format!(
                "the body must be JSON {{\"tables\": [\"schema.table\", ...]}}: {e}"
            )))
        })?;
        snapshot_action(&d, &name, false, &b.tables).await
    })
    .await
}

async fn snapshot_stop(
    Extension(d): Extension<Arc<Daemon>>,
    Path(name): Path<String>,
    peer: Peer,
    headers: HeaderMap,
) -> Response {
    let caller = Caller::of(&d, peer.0, &headers);
    act(
        &d,
        caller,
        "snapshot-stop",
        &name,
        true,
        snapshot_action(&d, &name, true, &[]),
    )
    .await
}

async fn slots(Extension(d): Extension<Arc<Daemon>>, peer: Peer, headers: HeaderMap) -> Response {
    let caller = Caller::of(&d, peer.0, &headers);
    act(&d, caller, "slots-list", "*", false, async {
        let captures = d.captures();
        let slots = manage::list_slots(&captures, &|n| d.state_of(n)).await?;
        Ok(Answer {
            code: StatusCode::OK,
            body: json!({
                "message": format!("{} slot(s)", slots.len()),
                "slots": slots,
            }),
        })
    })
    .await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DropBody {
    #[serde(default)]
    slot: String,
    confirm: Option<String>,
    /// A pipeline whose source cluster holds the slot.
    source: Option<String>,
}

async fn slot_drop(
    Extension(d): Extension<Arc<Daemon>>,
    peer: Peer,
    headers: HeaderMap,
    body: Result<Json<DropBody>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let caller = Caller::of(&d, peer.0, &headers);
    let target = body
        .as_ref()
        .map(|b| b.slot.clone())
        .unwrap_or_else(|_| "?".into());
    act(&d, caller, "slot-drop", &target, true, async {
        let Json(b) = body.map_err(|e| {
            ApiError::Manage(ManageError::BadRequest(format!(
                "the body must be JSON {{\"slot\": \"<name>\", \"confirm\": \"<name>\"}}: {e}"
            )))
        })?;
        let captures = d.captures();
        let done = manage::drop_slot(
            &captures,
            &|n| d.state_of(n),
            &b.slot,
            b.confirm.as_deref(),
            b.source.as_deref(),
        )
        .await?;
        Ok(Answer {
            code: StatusCode::OK,
            body: serde_json::to_value(&done).unwrap_or_default(),
        })
    })
    .await
}
