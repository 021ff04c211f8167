//! The Confluent Schema Registry REST subset over an [`EmbeddedRegistry`],
//! so consumers in other processes (Confluent's serializers, Kafka Connect,
//! `kcat -s avro`) resolve the ids walcast writes.
//!
//! Served: `GET /subjects`, `GET /subjects/{s}/versions`,
//! `GET /subjects/{s}/versions/{v|latest}`, `POST /subjects/{s}/versions`
//! (register), `POST /subjects/{s}` (lookup), `GET /schemas/ids/{id}`,
//! `POST /compatibility/subjects/{s}/versions/{v|latest}`, `GET`/`PUT
//! /config` and `/config/{s}`. Nothing is deleted. Errors are Confluent's
//! `{"error_code": N, "message": "..."}` with Confluent's codes (40401 no
//! subject, 40402 no version, 40403 no schema, 409 incompatible, 42201
//! invalid schema, 42202 invalid version, 42203 invalid level). Only Avro
//! schemas without references are accepted. There is no authentication:
//! listen on loopback or a private network.

use std::future::Future;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde::Deserialize;
use serde_json::{json, Value as Json};

use crate::embedded::{EmbeddedError, EmbeddedRegistry};
use crate::mapping::AvroSchema;
use crate::registry::{CompatibilityLevel, SubjectVersion, VersionRef, CONTENT_TYPE};

type Shared = State<Arc<EmbeddedRegistry>>;

/// An answer in the registry's media type.
fn reply(status: StatusCode, body: Json) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, CONTENT_TYPE)],
        body.to_string(),
    )
        .into_response()
}

fn ok(body: Json) -> Response {
    reply(StatusCode::OK, body)
}

fn error(e: &EmbeddedError) -> Response {
    if e.status() >= 500 {
        tracing::error!(error = %e, "embedded schema registry failed a request");
    }
    reply(
        StatusCode::from_u16(e.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        json!({"error_code": e.error_code(), "message": e.to_string()}),
    )
}

fn respond(result: Result<Json, EmbeddedError>) -> Response {
    match result {
        Ok(body) => ok(body),
        Err(e) => error(&e),
    }
}

fn version_json(v: &SubjectVersion) -> Json {
    json!({"subject": v.subject, "version": v.version, "id": v.id, "schema": v.schema.text()})
}

/// The body of register, lookup and compatibility requests. Unknown fields
/// (`metadata`, `ruleSet`, ...) are ignored as Confluent's own registry
/// does for features it does not use.
#[derive(Deserialize)]
struct SchemaRequest {
    schema: String,
    #[serde(rename = "schemaType", default)]
    schema_type: Option<String>,
    #[serde(default)]
    references: Vec<Json>,
}

fn parse_schema(body: &[u8]) -> Result<AvroSchema, EmbeddedError> {
    let request: SchemaRequest =
        serde_json::from_slice(body).map_err(|e| EmbeddedError::InvalidRequest {
            message: format!("body is not {{\"schema\": \"...\"}}: {e}"),
        })?;
    if let Some(kind) = request.schema_type.as_deref().filter(|k| *k != "AVRO") {
        return Err(EmbeddedError::InvalidSchema {
            message: format!("schemaType {kind} is not supported; only AVRO"),
        });
    }
    if !request.references.is_empty() {
        return Err(EmbeddedError::InvalidSchema {
            message: "schema references are not supported".into(),
        });
    }
    AvroSchema::parse_str(&request.schema).map_err(|e| EmbeddedError::InvalidSchema {
        message: e.to_string(),
    })
}

fn parse_version(text: &str) -> Result<VersionRef, EmbeddedError> {
    VersionRef::parse(text).ok_or_else(|| EmbeddedError::InvalidVersion {
        version: text.to_string(),
    })
}

async fn subjects(State(r): Shared) -> Response {
    ok(json!(r.subjects()))
}

async fn versions(State(r): Shared, Path(subject): Path<String>) -> Response {
    respond(r.versions(&subject).map(|v| json!(v)))
}

async fn version(State(r): Shared, Path((subject, v)): Path<(String, String)>) -> Response {
    respond(
        parse_version(&v)
            .and_then(|v| r.version(&subject, v))
            .map(|v| version_json(&v)),
    )
}

async fn register(State(r): Shared, Path(subject): Path<String>, body: Bytes) -> Response {
    respond(
        parse_schema(&body)
            .and_then(|s| r.register_schema(&subject, &s))
            .map(|id| json!({"id": id})),
    )
}

async fn lookup(State(r): Shared, Path(subject): Path<String>, body: Bytes) -> Response {
    respond(
        parse_schema(&body)
            .and_then(|s| r.lookup(&subject, &s))
            .map(|v| version_json(&v)),
    )
}

async fn schema_by_id(State(r): Shared, Path(id): Path<String>) -> Response {
    let id = match id.parse::<u32>() {
        Ok(id) => id,
        Err(_) => return error(&EmbeddedError::SchemaNotFound { id: 0 }),
    };
    respond(r.schema(id).map(|s| json!({"schema": s.text()})))
}

#[derive(Deserialize)]
struct Verbose {
    #[serde(default)]
    verbose: Option<bool>,
}

async fn compatibility(
    State(r): Shared,
    Path((subject, v)): Path<(String, String)>,
    Query(q): Query<Verbose>,
    body: Bytes,
) -> Response {
    let verdict = parse_version(&v)
        .and_then(|v| Ok((v, parse_schema(&body)?)))
        .and_then(|(v, s)| r.check(&subject, v, &s));
    respond(verdict.map(|c| {
        if q.verbose.unwrap_or(false) {
            json!({"is_compatible": c.is_compatible, "messages": c.messages})
        } else {
            json!({"is_compatible": c.is_compatible})
        }
    }))
}

#[derive(Deserialize)]
struct LevelRequest {
    compatibility: String,
}

fn parse_level(body: &[u8]) -> Result<CompatibilityLevel, EmbeddedError> {
    let request: LevelRequest =
        serde_json::from_slice(body).map_err(|e| EmbeddedError::InvalidRequest {
            message: format!("body is not {{\"compatibility\": \"...\"}}: {e}"),
        })?;
    CompatibilityLevel::parse(&request.compatibility).ok_or(EmbeddedError::InvalidLevel {
        level: request.compatibility,
    })
}

async fn get_config(State(r): Shared) -> Response {
    ok(json!({"compatibilityLevel": r.level(None).as_str()}))
}

async fn put_config(State(r): Shared, body: Bytes) -> Response {
    respond(parse_level(&body).and_then(|level| {
        r.set_level(None, level)?;
        Ok(json!({"compatibility": level.as_str()}))
    }))
}

#[derive(Deserialize)]
struct DefaultToGlobal {
    #[serde(default, rename = "defaultToGlobal")]
    default_to_global: Option<bool>,
}

async fn get_subject_config(
    State(r): Shared,
    Path(subject): Path<String>,
    Query(q): Query<DefaultToGlobal>,
) -> Response {
    let level = match r.subject_level(&subject) {
        Some(level) => Ok(level),
        None if q.default_to_global.unwrap_or(false) => Ok(r.level(None)),
        None => Err(EmbeddedError::SubjectLevelNotConfigured { subject }),
    };
    respond(level.map(|l| json!({"compatibilityLevel": l.as_str()})))
}

async fn put_subject_config(
    State(r): Shared,
    Path(subject): Path<String>,
    body: Bytes,
) -> Response {
    respond(parse_level(&body).and_then(|level| {
        r.set_level(Some(&subject), level)?;
        Ok(json!({"compatibility": level.as_str()}))
    }))
}

async fn not_found() -> Response {
    reply(
        StatusCode::NOT_FOUND,
        json!({"error_code": 404, "message": "HTTP 404 Not Found"}),
    )
}

/// The REST API over `registry`, to mount or serve.
pub fn router(registry: Arc<EmbeddedRegistry>) -> Router {
    Router::new()
        .route("/subjects", get(subjects))
        .route("/subjects/{subject}", post(lookup))
        .route("/subjects/{subject}/versions", get(versions).post(register))
        .route("/subjects/{subject}/versions/{version}", get(version))
        .route("/schemas/ids/{id}", get(schema_by_id))
        .route(
            "/compatibility/subjects/{subject}/versions/{version}",
            post(compatibility),
        )
        .route("/config", get(get_config).put(put_config))
        .route(
            "/config/{subject}",
            get(get_subject_config).put(put_subject_config),
        )
        .fallback(not_found)
        .with_state(registry)
}

/// Serves `registry` on `listener` until `shutdown` resolves. Bind the
/// listener before building pipelines that point at it, so their first
/// registration finds it listening.
pub async fn serve(
    registry: Arc<EmbeddedRegistry>,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "embedded schema registry listening");
    }
    axum::serve(listener, router(registry))
        .with_graceful_shutdown(shutdown)
        .await
}
