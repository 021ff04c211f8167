//! The Elasticsearch/OpenSearch sink.
//!
//! [`Sink::send`] turns a batch into bulk actions and hands it
//! to a worker task, which buffers batches until `bulk_max_actions` actions,
//! `bulk_max_bytes` bytes or `flush_interval` is reached, then writes
//! them in `_bulk` requests of at most those sizes. A batch's acker is
//! answered only when every one of its actions was in a completed bulk:
//! applied, a version conflict (a newer version is there), or written to
//! the dead letter. Items answered 429/5xx, and whole requests that fail
//! transiently, are retried with [`Backoff`] while the worker holds the
//! batches; its queue is one batch deep, so `send` then waits, which
//! back-pressures the pipeline.
//!
//! Updates that left TOASTed columns unchanged carry no value for them. Before
//! writing, a flush reads those columns of the stored documents with one
//! `_mget` per `bulk_max_actions` rows and completes each such action from
//! the newest version it knows: an earlier action of the same row in the
//! same flush, else the stored document (see
//! [`crate::request_builder::Action::complete`] and [`walcast_sdk::toast`]).
//! Flushes run one at a time, so nothing of the row is in flight between
//! the read and the write.
//!
//! # Index mappings
//!
//! Before the first write of a table's shape to an index, a flush makes
//! sure the index has the mapping [`crate::mapping`] derives from the
//! table: `PUT <index>` with it when the index does not exist (an answer
//! `resource_already_exists_exception`, from another writer or a user who
//! created it, is fine); otherwise `GET <index>/_mapping`, fields for new
//! columns added with `PUT <index>/_mapping`, and fields whose existing
//! type differs (a column whose type changed, an index mapped dynamically or
//! by hand) reported as a warning and in `mapping_conflicts`: OpenSearch
//! cannot change a field's type, and a user's mapping is theirs. Documents
//! that then do not fit are refused per item (400) and go to the dead
//! letter. Each (index, table shape) is ensured once per process; `send`
//! derives the mapping once per shape (pure) and hands it along with the
//! batch.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE};
use reqwest::{Method, StatusCode};
use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use walcast_sdk::retry::Backoff;
use walcast_sdk::{Acker, Batch, Lsn, Sink, SinkError};

use crate::config::{Auth, ConfigError, DeadLetter, ElasticsearchSinkConfig, TruncateAction};
use crate::mapping::{self, Flavor, MappingDiff, MappingOptions};
use crate::request_builder::{
    bulk_body, dead_letter_id, dead_letter_record, mget_body, Action, ActionKind, Entry,
    IndexTemplate, RequestBuilder, RequestError, TemplateError,
};
use crate::retry::{
    classify_item, classify_response, classify_truncate, parse_bulk_response, parse_mget_response,
    Fetched, ItemOutcome, ItemResult, ResponseOutcome,
};

const SINK_NAME: &str = "elasticsearch";
/// How much of an error body goes into a message.
const BODY_EXCERPT: usize = 500;

/// Why the sink could not start or deliver.
#[derive(Debug, thiserror::Error)]
pub enum ElasticsearchSinkError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("elasticsearch sink: {0}")]
    Template(#[from] TemplateError),
    #[error("elasticsearch sink: cannot read CA file {path}: {source}")]
    CaFile {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("elasticsearch sink: building the HTTP client: {0}")]
    Client(#[source] reqwest::Error),
    #[error("elasticsearch sink: cannot reach {url}: {source}")]
    Unreachable {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("elasticsearch sink: {url} answered HTTP {status}: {body}; check `auth` and the user's privileges")]
    Refused {
        url: String,
        status: u16,
        body: String,
    },
    #[error("elasticsearch sink: {0}")]
    Request(#[from] RequestError),
    #[error("elasticsearch sink: {0}")]
    Delivery(#[from] DeliveryError),
    #[error("elasticsearch sink: the bulk worker has stopped")]
    WorkerGone,
}

/// Why actions of a batch were not delivered. Definite: the batch fails.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DeliveryError {
    #[error("{verb} of `{id}` in index `{index}` ({table}, LSN {lsn}) refused with HTTP {status}: {error_type}: {reason}")]
    ItemRefused {
        verb: &'static str,
        index: String,
        id: String,
        table: String,
        lsn: Lsn,
        status: u16,
        error_type: String,
        reason: String,
    },
    #[error("_bulk refused with HTTP {status} while writing `{id}` to `{index}` ({table}, LSN {lsn}): {body}")]
    BulkRefused {
        status: u16,
        index: String,
        id: String,
        table: String,
        lsn: Lsn,
        body: String,
    },
    #[error("_bulk answered something other than one item per action ({actions} actions): {body}")]
    MalformedResponse { actions: usize, body: String },
    #[error(
        "dead letter for `{id}` in `{index}` ({table}, LSN {lsn}) could not be written: {reason}"
    )]
    DeadLetterRefused {
        index: String,
        id: String,
        table: String,
        lsn: Lsn,
        reason: String,
    },
    #[error(
        "reading the stored documents of {table} (LSN {lsn}) to keep its unchanged TOASTed columns: \
         _mget refused with HTTP {status}: {body}; the user needs the `read` privilege on the indices it writes"
    )]
    FetchRefused {
        table: String,
        lsn: Lsn,
        status: u16,
        body: String,
    },
    #[error(
        "creating or updating the mapping of index `{index}` for {table} refused with HTTP {status}: {body}; \
         the user needs `create_index` and `manage` (put mapping) on the index, or set `manage_mappings = false` \
         (an unknown field type such as `flat_object` or `scaled_float` needs another `json` or `numeric` setting)"
    )]
    MappingRefused {
        index: String,
        table: String,
        status: u16,
        body: String,
    },
    #[error(
        "truncate of {table} (LSN {lsn}): _delete_by_query on `{index}` refused with HTTP {status}: {body}; \
         set `truncate = \"ignore\"` to skip truncates"
    )]
    TruncateRefused {
        table: String,
        index: String,
        lsn: Lsn,
        status: u16,
        body: String,
    },
}

/// Counters the daemon exports as metrics.
#[derive(Debug, Default)]
pub struct ElasticsearchSinkStats {
    pub bulk_requests: AtomicU64,
    pub actions_applied: AtomicU64,
    /// Items answered 409: a newer (or, with `external`, the same) version
    /// was already indexed.
    pub version_conflicts: AtomicU64,
    /// Actions the cluster refused with 400, written to the dead letter.
    pub dead_lettered: AtomicU64,
    /// Requests repeated after a transient error.
    pub retries: AtomicU64,
    pub batches_acked: AtomicU64,
    pub batches_failed: AtomicU64,
    /// Unchanged TOASTed values taken from the stored document.
    pub unavailable_kept: AtomicU64,
    /// Documents written without some unchanged TOASTed value because no
    /// stored value existed (listed under `__walcast_incomplete`).
    pub incomplete_documents: AtomicU64,
    /// Indices created with a mapping derived from their table.
    pub indices_created: AtomicU64,
    /// `PUT _mapping` requests that added fields for new columns.
    pub mapping_updates: AtomicU64,
    /// Fields whose existing mapping differs from what the column needs.
    pub mapping_conflicts: AtomicU64,
}

/// The mapping one table shape needs in its index.
#[derive(Debug)]
pub struct IndexMapping {
    pub index: String,
    pub table: String,
    /// Identifies the table shape (column names and types).
    pub shape: u64,
    pub mapping: serde_json::Value,
}

/// Identifies a table's shape: its columns' names and types.
fn shape_of(table: &walcast_sdk::TableSchema) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for c in &table.columns {
        c.name.hash(&mut h);
        c.pg_type.hash(&mut h);
    }
    h.finish()
}

/// What `walcast check` reports for one table.
#[derive(Debug, Clone)]
pub enum IndexPlan {
    /// No such index: it would be created with this mapping.
    WouldCreate {
        index: String,
        mapping: serde_json::Value,
    },
    /// The index exists: fields that would be added, fields that conflict.
    Exists { index: String, diff: MappingDiff },
}

#[derive(Clone)]
struct Http {
    client: reqwest::Client,
    base: String,
    auth: Option<Auth>,
}

impl Http {
    fn request(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        let rb = self
            .client
            .request(method, format!("{}/{}", self.base, path));
        match &self.auth {
            Some(Auth::Basic { username, password }) => rb.basic_auth(username, Some(password)),
            Some(Auth::ApiKey { api_key }) => rb.header(AUTHORIZATION, format!("ApiKey {api_key}")),
            None => rb,
        }
    }

    /// Status and body, or the transport error.
    async fn send(
        &self,
        rb: reqwest::RequestBuilder,
    ) -> Result<(u16, bytes::Bytes), reqwest::Error> {
        let resp = rb.send().await?;
        let status = resp.status().as_u16();
        Ok((status, resp.bytes().await?))
    }
}

fn excerpt(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    match text.char_indices().nth(BODY_EXCERPT) {
        Some((cut, _)) => format!("{}...", &text[..cut]),
        None => text.into_owned(),
    }
}

enum Command {
    Batch {
        acker: Acker,
        entries: Vec<Entry>,
        mappings: Vec<Arc<IndexMapping>>,
    },
    Flush(oneshot::Sender<Result<(), DeliveryError>>),
}

/// See the module doc.
pub struct ElasticsearchSink {
    tx: mpsc::Sender<Command>,
    builder: RequestBuilder,
    http: Http,
    stats: Arc<ElasticsearchSinkStats>,
    manage_mappings: bool,
    /// The mapping of each (index, table shape) seen, derived once.
    mappings: HashMap<(String, u64), Arc<IndexMapping>>,
}

/// The HTTP client of `config`, and the cluster's `GET /` answer (which
/// also proves it answers and accepts the credentials).
async fn client_and_root(
    config: &ElasticsearchSinkConfig,
) -> Result<(Http, serde_json::Value), ElasticsearchSinkError> {
    let mut cb = reqwest::Client::builder().timeout(config.timeout);
    if let Some(path) = &config.ca_file {
        let pem = std::fs::read(path).map_err(|source| ElasticsearchSinkError::CaFile {
            path: path.display().to_string(),
            source,
        })?;
        for cert in
            reqwest::Certificate::from_pem_bundle(&pem).map_err(ElasticsearchSinkError::Client)?
        {
            cb = cb.add_root_certificate(cert);
        }
    }
    let http = Http {
        client: cb.build().map_err(ElasticsearchSinkError::Client)?,
        base: config.url.trim_end_matches('/').to_string(),
        auth: config.auth.clone(),
    };
    let (status, body) = http
        .send(http.request(Method::GET, ""))
        .await
        .map_err(|source| ElasticsearchSinkError::Unreachable {
            url: walcast_sdk::secret::redact_url(&config.url),
            source,
        })?;
    if !StatusCode::from_u16(status).is_ok_and(|s| s.is_success()) {
        return Err(ElasticsearchSinkError::Refused {
            url: walcast_sdk::secret::redact_url(&config.url),
            status,
            body: excerpt(&body),
        });
    }
    let root = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
    Ok((http, root))
}

fn mapping_options(config: &ElasticsearchSinkConfig, root: &serde_json::Value) -> MappingOptions {
    MappingOptions {
        numeric: config.numeric,
        json: config.json,
        flavor: Flavor::from_root(root),
    }
}

/// The `properties` of the first index of a `GET <index>/_mapping` answer
/// (the concrete index behind an alias has its own name).
fn existing_properties(body: &[u8]) -> Option<serde_json::Map<String, serde_json::Value>> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    let first = v.as_object()?.values().next()?;
    Some(
        first["mappings"]["properties"]
            .as_object()
            .cloned()
            .unwrap_or_default(),
    )
}

/// For `walcast check`: the index each table would be written to, and
/// whether it would be created (with which mapping) or what its existing
/// mapping lacks or contradicts. Reads only.
pub async fn plan_indices(
    config: &ElasticsearchSinkConfig,
    tables: &[walcast_sdk::TableSchema],
) -> Result<Vec<(String, IndexPlan)>, ElasticsearchSinkError> {
    config.validate()?;
    let template = IndexTemplate::parse(&config.index_template)?;
    let (http, root) = client_and_root(config).await?;
    let opts = mapping_options(config, &root);
    let mut out = Vec::new();
    for table in tables {
        let index = template.render(table)?;
        let wanted = mapping::index_mapping(table, &opts);
        let (status, body) = http
            .send(http.request(Method::GET, &format!("{index}/_mapping")))
            .await
            .map_err(|source| ElasticsearchSinkError::Unreachable {
                url: walcast_sdk::secret::redact_url(&config.url),
                source,
            })?;
        let plan = match (status, existing_properties(&body)) {
            (200, Some(existing)) => IndexPlan::Exists {
                diff: mapping::diff(
                    &existing,
                    wanted["properties"].as_object().expect("properties"),
                ),
                index,
            },
            (404, _) => IndexPlan::WouldCreate {
                index,
                mapping: wanted,
            },
            _ => {
                return Err(ElasticsearchSinkError::Refused {
                    url: format!("{}/{index}/_mapping", config.url),
                    status,
                    body: excerpt(&body),
                })
            }
        };
        out.push((table.qualified_name(), plan));
    }
    Ok(out)
}

impl ElasticsearchSink {
    /// Validates the config, checks that the cluster answers and accepts the
    /// credentials (`GET /`), and starts the bulk worker. Must run inside a
    /// tokio runtime.
    pub async fn connect(config: ElasticsearchSinkConfig) -> Result<Self, ElasticsearchSinkError> {
        config.validate()?;
        let (http, root) = client_and_root(&config).await?;
        let builder = RequestBuilder {
            index: IndexTemplate::parse(&config.index_template)?,
            version_type: config.version_type,
            truncate: config.truncate == TruncateAction::DeleteAll,
            mapping: mapping_options(&config, &root),
        };
        let stats = Arc::new(ElasticsearchSinkStats::default());
        let (tx, rx) = mpsc::channel(1);
        let worker = Worker {
            http: http.clone(),
            max_actions: config.bulk_max_actions,
            max_bytes: config.bulk_max_bytes,
            interval: config.flush_interval,
            dead_letter: config.dead_letter.clone(),
            backoff: Backoff::new(config.retry_initial, config.retry_max),
            stats: Arc::clone(&stats),
            buffer: Vec::new(),
            buffered_actions: 0,
            buffered_bytes: 0,
            oldest: None,
            ensured: HashSet::new(),
        };
        tokio::spawn(worker.run(rx));
        Ok(ElasticsearchSink {
            tx,
            builder,
            http,
            stats,
            manage_mappings: config.manage_mappings,
            mappings: HashMap::new(),
        })
    }

    pub fn stats(&self) -> Arc<ElasticsearchSinkStats> {
        Arc::clone(&self.stats)
    }
}

#[async_trait]
impl Sink for ElasticsearchSink {
    fn name(&self) -> &str {
        SINK_NAME
    }

    /// Returns once the worker has taken the batch; its acker is answered
    /// when the batch's bulk requests complete. An event that cannot become
    /// an action (a table without key) fails the batch here.
    async fn send(&mut self, batch: Batch) -> Result<(), SinkError> {
        let mut entries = Vec::with_capacity(batch.events.len());
        let mut mappings: Vec<Arc<IndexMapping>> = Vec::new();
        for event in batch.events.iter() {
            if self.manage_mappings && event.op != walcast_sdk::Op::Truncate {
                if let Ok(index) = self.builder.index.render(&event.table) {
                    let key = (index, shape_of(&event.table));
                    let m = match self.mappings.get(&key) {
                        Some(m) => Arc::clone(m),
                        None => {
                            let m = Arc::new(IndexMapping {
                                index: key.0.clone(),
                                table: event.table.qualified_name(),
                                shape: key.1,
                                mapping: mapping::index_mapping(
                                    &event.table,
                                    &self.builder.mapping,
                                ),
                            });
                            self.mappings.insert(key, Arc::clone(&m));
                            m
                        }
                    };
                    if !mappings.iter().any(|x| Arc::ptr_eq(x, &m)) {
                        mappings.push(m);
                    }
                }
            }
            match self.builder.entries(event) {
                Ok(e) => entries.extend(e),
                Err(e) => {
                    let err = ElasticsearchSinkError::from(e);
                    self.stats.batches_failed.fetch_add(1, Ordering::Relaxed);
                    batch.acker.fail(err.to_string());
                    return Err(SinkError::definite(SINK_NAME, err.to_string()).with_source(err));
                }
            }
        }
        self.tx
            .send(Command::Batch {
                acker: batch.acker,
                entries,
                mappings,
            })
            .await
            .map_err(|_| {
                SinkError::definite(SINK_NAME, ElasticsearchSinkError::WorkerGone.to_string())
            })
    }

    /// Writes everything buffered and waits for the answers. Returns the
    /// first definite failure among the batches it answered.
    async fn flush(&mut self) -> Result<(), SinkError> {
        let (reply, answer) = oneshot::channel();
        let gone =
            || SinkError::definite(SINK_NAME, ElasticsearchSinkError::WorkerGone.to_string());
        self.tx
            .send(Command::Flush(reply))
            .await
            .map_err(|_| gone())?;
        match answer.await.map_err(|_| gone())? {
            Ok(()) => Ok(()),
            Err(e) => {
                let err = ElasticsearchSinkError::from(e);
                Err(SinkError::definite(SINK_NAME, err.to_string()).with_source(err))
            }
        }
    }

    /// A table without key (no document id) or a table name the index
    /// template cannot turn into an index.
    fn refuses(&self, event: &walcast_sdk::ChangeEvent) -> Option<String> {
        self.builder
            .check(event)
            .err()
            .map(|e| ElasticsearchSinkError::from(e).to_string())
    }

    /// `GET /_cluster/health` answers (yellow is healthy: a single node
    /// never allocates replicas).
    async fn healthy(&self) -> bool {
        matches!(
            self.http
                .send(self.http.request(Method::GET, "_cluster/health"))
                .await,
            Ok((200, _))
        )
    }
}

/// An action of the buffer: which batch it belongs to, and the action.
type Slot<'a> = (usize, &'a Action);

struct Worker {
    http: Http,
    max_actions: usize,
    max_bytes: usize,
    interval: Duration,
    dead_letter: DeadLetter,
    backoff: Backoff,
    stats: Arc<ElasticsearchSinkStats>,
    buffer: Vec<Buffered>,
    buffered_actions: usize,
    buffered_bytes: usize,
    oldest: Option<Instant>,
    /// (index, table shape) whose mapping is in place.
    ensured: HashSet<(String, u64)>,
}

/// A batch the worker holds: its acker, actions and the mappings they need.
type Buffered = (Acker, Vec<Entry>, Vec<Arc<IndexMapping>>);

impl Worker {
    async fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        loop {
            let deadline = self.oldest.map(|t| t + self.interval);
            tokio::select! {
                cmd = rx.recv() => match cmd {
                    Some(Command::Batch { acker, entries, mappings }) => {
                        self.buffered_actions += entries.len();
                        self.buffered_bytes += entries.iter().map(entry_bytes).sum::<usize>();
                        self.oldest.get_or_insert_with(Instant::now);
                        self.buffer.push((acker, entries, mappings));
                        if self.buffered_actions >= self.max_actions || self.buffered_bytes >= self.max_bytes {
                            let _ = self.flush().await;
                        }
                    }
                    Some(Command::Flush(reply)) => {
                        let _ = reply.send(self.flush().await);
                    }
                    None => {
                        let _ = self.flush().await;
                        return;
                    }
                },
                _ = tokio::time::sleep_until(deadline.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600))), if deadline.is_some() => {
                    let _ = self.flush().await;
                }
            }
        }
    }

    /// Writes every buffered batch and answers its acker.
    async fn flush(&mut self) -> Result<(), DeliveryError> {
        let batches = std::mem::take(&mut self.buffer);
        self.buffered_actions = 0;
        self.buffered_bytes = 0;
        self.oldest = None;
        let mut failures: Vec<Option<DeliveryError>> = vec![None; batches.len()];
        self.ensure_mappings(&batches, &mut failures).await;
        let mut batches: Vec<(Acker, Vec<Entry>)> =
            batches.into_iter().map(|(a, e, _)| (a, e)).collect();
        self.fill_unavailable(&mut batches, &mut failures).await;
        let mut chunk: Vec<Slot<'_>> = Vec::new();
        let mut chunk_bytes = 0;
        for (bi, (_, entries)) in batches.iter().enumerate() {
            if failures[bi].is_some() {
                // Its documents could not be completed: write none of them.
                continue;
            }
            for entry in entries {
                match entry {
                    Entry::Action(a) => {
                        if !chunk.is_empty()
                            && (chunk.len() >= self.max_actions
                                || chunk_bytes + a.ndjson.len() > self.max_bytes)
                        {
                            self.write_chunk(&chunk, &mut failures).await;
                            chunk.clear();
                            chunk_bytes = 0;
                        }
                        chunk_bytes += a.ndjson.len();
                        chunk.push((bi, a));
                    }
                    Entry::Truncate { index, table, lsn } => {
                        // Everything before the truncate must land before it.
                        if !chunk.is_empty() {
                            self.write_chunk(&chunk, &mut failures).await;
                            chunk.clear();
                            chunk_bytes = 0;
                        }
                        if let Err(e) = self.truncate(index, table, *lsn).await {
                            failures[bi].get_or_insert(e);
                        }
                    }
                }
            }
        }
        if !chunk.is_empty() {
            self.write_chunk(&chunk, &mut failures).await;
        }
        let mut first = None;
        for ((acker, _), failure) in batches.into_iter().zip(failures) {
            match failure {
                None => {
                    self.stats.batches_acked.fetch_add(1, Ordering::Relaxed);
                    acker.ack();
                }
                Some(e) => {
                    self.stats.batches_failed.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(error = %e, "elasticsearch sink: batch failed");
                    acker.fail(e.to_string());
                    first.get_or_insert(e);
                }
            }
        }
        first.map_or(Ok(()), Err)
    }

    /// Puts in place the mapping of every (index, table shape) the batches
    /// need and this process has not ensured yet (see the module doc). A
    /// batch whose mapping is refused fails, and none of its actions is
    /// written.
    async fn ensure_mappings(
        &mut self,
        batches: &[Buffered],
        failures: &mut [Option<DeliveryError>],
    ) {
        for (bi, (_, _, mappings)) in batches.iter().enumerate() {
            for m in mappings {
                if failures[bi].is_some() || self.ensured.contains(&(m.index.clone(), m.shape)) {
                    continue;
                }
                match self.ensure_mapping(m).await {
                    Ok(()) => {
                        self.ensured.insert((m.index.clone(), m.shape));
                    }
                    Err(e) => {
                        for (bj, (_, _, others)) in batches.iter().enumerate().skip(bi) {
                            if others.iter().any(|o| Arc::ptr_eq(o, m)) {
                                failures[bj].get_or_insert_with(|| e.clone());
                            }
                        }
                    }
                }
            }
        }
    }

    /// Creates the index with `m`'s mapping, or adds to an existing index
    /// the fields it lacks and reports those that conflict. Idempotent and
    /// safe against concurrent writers.
    async fn ensure_mapping(&mut self, m: &IndexMapping) -> Result<(), DeliveryError> {
        let refused = |status: u16, body: &[u8]| DeliveryError::MappingRefused {
            index: m.index.clone(),
            table: m.table.clone(),
            status,
            body: excerpt(body),
        };
        self.backoff.reset();
        loop {
            let rb = self
                .http
                .request(Method::PUT, &m.index)
                .json(&serde_json::json!({ "mappings": m.mapping }));
            let reason = match self.http.send(rb).await {
                Err(e) => format!("creating index {}: {e}", m.index),
                Ok((status, _)) if (200..300).contains(&status) => {
                    self.stats.indices_created.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(index = %m.index, table = %m.table, "elasticsearch sink: created the index with a mapping derived from the table");
                    return Ok(());
                }
                Ok((400, body)) if excerpt(&body).contains("resource_already_exists_exception") => {
                    match self.update_mapping(m).await? {
                        None => return Ok(()),
                        Some(reason) => reason,
                    }
                }
                Ok((status, body)) => match classify_response(status) {
                    ResponseOutcome::Retry => format!(
                        "creating index {} answered HTTP {status}: {}",
                        m.index,
                        excerpt(&body)
                    ),
                    _ => return Err(refused(status, &body)),
                },
            };
            let delay = self.retry_pause(&reason);
            tokio::time::sleep(delay).await;
        }
    }

    /// The existing index's side of [`Self::ensure_mapping`]: `Ok(None)`
    /// when done, `Ok(Some(reason))` to retry from the start.
    async fn update_mapping(&mut self, m: &IndexMapping) -> Result<Option<String>, DeliveryError> {
        let refused = |status: u16, body: &[u8]| DeliveryError::MappingRefused {
            index: m.index.clone(),
            table: m.table.clone(),
            status,
            body: excerpt(body),
        };
        let (status, body) = match self
            .http
            .send(
                self.http
                    .request(Method::GET, &format!("{}/_mapping", m.index)),
            )
            .await
        {
            Err(e) => return Ok(Some(format!("reading the mapping of {}: {e}", m.index))),
            Ok(answer) => answer,
        };
        let existing = match (classify_response(status), existing_properties(&body)) {
            (ResponseOutcome::Items, Some(existing)) => existing,
            (ResponseOutcome::Definite, _) if status != 404 => return Err(refused(status, &body)),
            // 404: deleted meanwhile; 5xx: try again.
            _ => {
                return Ok(Some(format!(
                    "reading the mapping of {} answered HTTP {status}",
                    m.index
                )))
            }
        };
        let wanted = m.mapping["properties"]
            .as_object()
            .cloned()
            .unwrap_or_default();
        let diff = mapping::diff(&existing, &wanted);
        for c in &diff.conflicts {
            self.stats.mapping_conflicts.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                index = %m.index, table = %m.table, field = %c.field, existing = %c.existing, wanted = %c.wanted,
                "elasticsearch sink: {c} in index `{}`; OpenSearch cannot change a field's type, so it is left as it is \
                 and documents whose value does not fit go to the dead letter. To apply the new mapping, reindex into \
                 a new index (delete this one, or change `index_template`, and re-snapshot the table)",
                m.index
            );
        }
        if diff.missing.is_empty() {
            return Ok(None);
        }
        let fields: Vec<&String> = diff.missing.keys().collect();
        let rb = self
            .http
            .request(Method::PUT, &format!("{}/_mapping", m.index))
            .json(&serde_json::json!({ "properties": diff.missing }));
        match self.http.send(rb).await {
            Err(e) => Ok(Some(format!("updating the mapping of {}: {e}", m.index))),
            Ok((status, _)) if (200..300).contains(&status) => {
                self.stats.mapping_updates.fetch_add(1, Ordering::Relaxed);
                tracing::info!(index = %m.index, table = %m.table, fields = ?fields, "elasticsearch sink: added fields for new columns to the index mapping");
                Ok(None)
            }
            Ok((400, body)) => {
                // A field added meanwhile with another type: the same as a
                // conflict found above, reported and left to the user.
                self.stats.mapping_conflicts.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(index = %m.index, table = %m.table, fields = ?fields, body = %excerpt(&body),
                    "elasticsearch sink: the index refused new fields; documents that do not fit go to the dead letter");
                Ok(None)
            }
            Ok((status, body)) => match classify_response(status) {
                ResponseOutcome::Retry => Ok(Some(format!(
                    "updating the mapping of {} answered HTTP {status}",
                    m.index
                ))),
                _ => Err(refused(status, &body)),
            },
        }
    }

    /// Completes the actions whose events left TOASTed columns unchanged
    /// (see the module doc). A batch whose stored documents cannot be read
    /// fails, and none of its actions is written.
    async fn fill_unavailable(
        &mut self,
        batches: &mut [(Acker, Vec<Entry>)],
        failures: &mut [Option<DeliveryError>],
    ) {
        let mut wanted: HashMap<(String, String), BTreeSet<String>> = HashMap::new();
        for (_, entries) in batches.iter() {
            for entry in entries {
                if let Entry::Action(a) = entry {
                    if !a.unavailable.is_empty() {
                        wanted
                            .entry((a.index.clone(), a.id.clone()))
                            .or_default()
                            .extend(a.unavailable.iter().cloned());
                    }
                }
            }
        }
        if wanted.is_empty() {
            return;
        }
        let keys: Vec<(String, String, Vec<String>)> = wanted
            .into_iter()
            .map(|((index, id), cols)| (index, id, cols.into_iter().collect()))
            .collect();
        let stored = match self.fetch(&keys).await {
            Ok(stored) => stored,
            Err((status, body)) => {
                for (bi, (_, entries)) in batches.iter().enumerate() {
                    let first = entries.iter().find_map(|e| match e {
                        Entry::Action(a) if !a.unavailable.is_empty() => Some(a),
                        _ => None,
                    });
                    if let Some(a) = first {
                        failures[bi].get_or_insert_with(|| DeliveryError::FetchRefused {
                            table: a.table.clone(),
                            lsn: Lsn(a.version),
                            status,
                            body: body.clone(),
                        });
                    }
                }
                return;
            }
        };
        // The newest version of each row this flush writes before the
        // action at hand: `None` once deleted (or truncated).
        let mut latest: HashMap<
            (String, String),
            Option<serde_json::Map<String, serde_json::Value>>,
        > = HashMap::new();
        let mut truncated: HashSet<String> = HashSet::new();
        for (_, entries) in batches.iter_mut() {
            for entry in entries.iter_mut() {
                let a = match entry {
                    Entry::Truncate { index, .. } => {
                        latest.retain(|(i, _), _| i != index);
                        truncated.insert(index.clone());
                        continue;
                    }
                    Entry::Action(a) => a,
                };
                let key = (a.index.clone(), a.id.clone());
                let Some(fetched) = stored.get(&key) else {
                    continue; // no action of this row lacks a value
                };
                if a.kind == ActionKind::Delete {
                    latest.insert(key, None);
                    continue;
                }
                if !a.unavailable.is_empty() {
                    let base = match latest.get(&key) {
                        Some(newest) => newest.as_ref(),
                        None if truncated.contains(&a.index) => None,
                        None => fetched.as_ref(),
                    };
                    let asked = a.unavailable.clone();
                    let incomplete = a.complete(base);
                    self.stats
                        .unavailable_kept
                        .fetch_add((asked.len() - incomplete.len()) as u64, Ordering::Relaxed);
                    if !incomplete.is_empty() {
                        self.stats
                            .incomplete_documents
                            .fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(
                            index = %a.index, id = %a.id, table = %a.table, lsn = %Lsn(a.version),
                            columns = ?incomplete,
                            "elasticsearch sink: unchanged TOASTed columns have no stored value (no document yet, \
                             e.g. after a key change); written without them and listed in `{}`; \
                             REPLICA IDENTITY FULL or a re-snapshot of the table supplies them",
                            walcast_sdk::toast::INCOMPLETE_FIELD
                        );
                    }
                }
                latest.insert(key, a.document_object());
            }
        }
    }

    /// The stored values of the given columns of the given documents,
    /// `None` for a document that does not exist. Retries transient
    /// failures; a definite refusal returns its status and body.
    async fn fetch(
        &mut self,
        keys: &[(String, String, Vec<String>)],
    ) -> Result<
        HashMap<(String, String), Option<serde_json::Map<String, serde_json::Value>>>,
        (u16, String),
    > {
        let mut out = HashMap::with_capacity(keys.len());
        for chunk in keys.chunks(self.max_actions.max(1)) {
            self.backoff.reset();
            loop {
                let rb = self
                    .http
                    .request(Method::POST, "_mget")
                    .header(CONTENT_TYPE, "application/json")
                    .body(mget_body(chunk));
                let reason = match self.http.send(rb).await {
                    Err(e) => format!("_mget request failed: {e}"),
                    Ok((status, body)) => match classify_response(status) {
                        ResponseOutcome::Retry => {
                            format!("_mget answered HTTP {status}: {}", excerpt(&body))
                        }
                        ResponseOutcome::Definite => return Err((status, excerpt(&body))),
                        ResponseOutcome::Items => match parse_mget_response(&body) {
                            Ok(docs) if docs.len() == chunk.len() => {
                                match docs.iter().find_map(|d| match d {
                                    Fetched::Retry(r) => Some(r.clone()),
                                    _ => None,
                                }) {
                                    Some(r) => format!("_mget could not read a document: {r}"),
                                    None => {
                                        for ((index, id, _), doc) in chunk.iter().zip(docs) {
                                            let doc = match doc {
                                                Fetched::Found(m) => Some(m),
                                                _ => None,
                                            };
                                            out.insert((index.clone(), id.clone()), doc);
                                        }
                                        break;
                                    }
                                }
                            }
                            _ => return Err((status, excerpt(&body))),
                        },
                    },
                };
                let delay = self.retry_pause(&reason);
                tokio::time::sleep(delay).await;
            }
        }
        Ok(out)
    }

    fn retry_pause(&mut self, reason: &str) -> Duration {
        let delay = self.backoff.next_delay();
        self.stats.retries.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            reason,
            attempt = self.backoff.attempts(),
            delay_ms = delay.as_millis() as u64,
            "elasticsearch sink: transient error, retrying"
        );
        delay
    }

    /// One bulk of at most `max_actions`/`max_bytes`, retried until every
    /// item is done, dead-lettered or definitely refused.
    async fn write_chunk(&mut self, chunk: &[Slot<'_>], failures: &mut [Option<DeliveryError>]) {
        let mut pending: Vec<Slot<'_>> = chunk.to_vec();
        self.backoff.reset();
        loop {
            let body = bulk_body(pending.iter().map(|(_, a)| *a));
            self.stats.bulk_requests.fetch_add(1, Ordering::Relaxed);
            let rb = self
                .http
                .request(Method::POST, "_bulk")
                .header(CONTENT_TYPE, "application/x-ndjson")
                .body(body);
            let reason = match self.http.send(rb).await {
                Err(e) => format!("_bulk request failed: {e}"),
                Ok((status, body)) => match classify_response(status) {
                    ResponseOutcome::Retry => {
                        format!("_bulk answered HTTP {status}: {}", excerpt(&body))
                    }
                    ResponseOutcome::Definite => {
                        for (bi, a) in &pending {
                            failures[*bi].get_or_insert_with(|| DeliveryError::BulkRefused {
                                status,
                                index: a.index.clone(),
                                id: a.id.clone(),
                                table: a.table.clone(),
                                lsn: Lsn(a.version),
                                body: excerpt(&body),
                            });
                        }
                        return;
                    }
                    ResponseOutcome::Items => {
                        let items = match parse_bulk_response(&body) {
                            Ok(items) if items.len() == pending.len() => items,
                            _ => {
                                let e = DeliveryError::MalformedResponse {
                                    actions: pending.len(),
                                    body: excerpt(&body),
                                };
                                for (bi, _) in &pending {
                                    failures[*bi].get_or_insert_with(|| e.clone());
                                }
                                return;
                            }
                        };
                        let mut retry = Vec::new();
                        let mut dead = Vec::new();
                        for (slot, item) in pending.iter().zip(items) {
                            let (bi, a) = *slot;
                            match classify_item(a.kind, &item) {
                                ItemOutcome::Done if item.status == 409 => {
                                    self.stats.version_conflicts.fetch_add(1, Ordering::Relaxed);
                                }
                                ItemOutcome::Done => {
                                    self.stats.actions_applied.fetch_add(1, Ordering::Relaxed);
                                }
                                ItemOutcome::Retry => retry.push((*slot, item)),
                                ItemOutcome::DeadLetter => dead.push((*slot, item)),
                                ItemOutcome::Definite => {
                                    failures[bi].get_or_insert_with(|| item_refused(a, &item));
                                }
                            }
                        }
                        if !dead.is_empty() {
                            self.write_dead_letters(&dead, failures).await;
                        }
                        let Some((_, first)) = retry.first() else {
                            return;
                        };
                        let reason = format!(
                            "{} of {} items answered HTTP {} ({})",
                            retry.len(),
                            pending.len(),
                            first.status,
                            first.error_type.as_deref().unwrap_or("no error type")
                        );
                        pending = retry.into_iter().map(|(slot, _)| slot).collect();
                        reason
                    }
                },
            };
            let delay = self.retry_pause(&reason);
            tokio::time::sleep(delay).await;
        }
    }

    /// Records refused actions at the dead-letter destination, retrying
    /// until it has them: only then may their batches be acknowledged.
    async fn write_dead_letters(
        &mut self,
        dead: &[(Slot<'_>, ItemResult)],
        failures: &mut [Option<DeliveryError>],
    ) {
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or_default();
        let records: Vec<serde_json::Value> = dead
            .iter()
            .map(|((_, a), item)| {
                let error_type = item.error_type.as_deref().unwrap_or("unknown");
                let reason = item.reason.as_deref().unwrap_or("");
                tracing::warn!(
                    index = %a.index, id = %a.id, table = %a.table, lsn = %Lsn(a.version), status = item.status,
                    error_type, reason, "elasticsearch sink: document refused, written to the dead letter"
                );
                dead_letter_record(a, item.status, error_type, reason, now_ms)
            })
            .collect();
        self.backoff.reset();
        loop {
            let outcome = match &self.dead_letter {
                DeadLetter::File { path } => append_lines(path, &records)
                    .await
                    .map_err(|e| format!("appending to {}: {e}", path.display())),
                DeadLetter::Index { name } => {
                    let mut body = String::new();
                    for (((_, a), _), record) in dead.iter().zip(&records) {
                        body.push_str(&serde_json::json!({"index": {"_index": name, "_id": dead_letter_id(a)}}).to_string());
                        body.push('\n');
                        body.push_str(&record.to_string());
                        body.push('\n');
                    }
                    let rb = self
                        .http
                        .request(Method::POST, "_bulk")
                        .header(CONTENT_TYPE, "application/x-ndjson")
                        .body(body);
                    match self.http.send(rb).await {
                        Err(e) => Err(format!("_bulk to the dead-letter index failed: {e}")),
                        Ok((status, body)) => match classify_response(status) {
                            ResponseOutcome::Retry => Err(format!(
                                "dead-letter _bulk answered HTTP {status}: {}",
                                excerpt(&body)
                            )),
                            ResponseOutcome::Definite => {
                                return fail_dead(
                                    dead,
                                    failures,
                                    format!("HTTP {status}: {}", excerpt(&body)),
                                );
                            }
                            ResponseOutcome::Items => match parse_bulk_response(&body) {
                                Ok(items)
                                    if items.iter().all(|i| (200..300).contains(&i.status)) =>
                                {
                                    Ok(())
                                }
                                Ok(items)
                                    if items
                                        .iter()
                                        .any(|i| matches!(i.status, 429 | 500..=599)) =>
                                {
                                    Err("the dead-letter index is overloaded or unavailable"
                                        .to_string())
                                }
                                _ => {
                                    return fail_dead(
                                        dead,
                                        failures,
                                        format!("refused: {}", excerpt(&body)),
                                    )
                                }
                            },
                        },
                    }
                }
            };
            match outcome {
                Ok(()) => {
                    self.stats
                        .dead_lettered
                        .fetch_add(dead.len() as u64, Ordering::Relaxed);
                    return;
                }
                Err(reason) => {
                    let delay = self.retry_pause(&reason);
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    async fn truncate(&mut self, index: &str, table: &str, lsn: Lsn) -> Result<(), DeliveryError> {
        self.backoff.reset();
        loop {
            let rb = self
                .http
                .request(
                    Method::POST,
                    &format!("{index}/_delete_by_query?conflicts=proceed&refresh=true"),
                )
                .json(&serde_json::json!({"query": {"match_all": {}}}));
            let reason = match self.http.send(rb).await {
                Err(e) => format!("_delete_by_query failed: {e}"),
                Ok((status, body)) => match classify_truncate(status, &body) {
                    ItemOutcome::Done => {
                        tracing::info!(%index, %table, %lsn, "elasticsearch sink: truncate deleted every document of the index");
                        return Ok(());
                    }
                    ItemOutcome::Retry => format!("_delete_by_query answered HTTP {status}"),
                    _ => {
                        return Err(DeliveryError::TruncateRefused {
                            table: table.to_string(),
                            index: index.to_string(),
                            lsn,
                            status,
                            body: excerpt(&body),
                        })
                    }
                },
            };
            let delay = self.retry_pause(&reason);
            tokio::time::sleep(delay).await;
        }
    }
}

fn entry_bytes(e: &Entry) -> usize {
    match e {
        Entry::Action(a) => a.ndjson.len(),
        Entry::Truncate { .. } => 0,
    }
}

fn item_refused(a: &Action, item: &ItemResult) -> DeliveryError {
    DeliveryError::ItemRefused {
        verb: match a.kind {
            ActionKind::Index => "index",
            ActionKind::Delete => "delete",
        },
        index: a.index.clone(),
        id: a.id.clone(),
        table: a.table.clone(),
        lsn: Lsn(a.version),
        status: item.status,
        error_type: item.error_type.clone().unwrap_or_else(|| "unknown".into()),
        reason: item.reason.clone().unwrap_or_default(),
    }
}

fn fail_dead(
    dead: &[(Slot<'_>, ItemResult)],
    failures: &mut [Option<DeliveryError>],
    reason: String,
) {
    for ((bi, a), _) in dead {
        failures[*bi].get_or_insert_with(|| DeliveryError::DeadLetterRefused {
            index: a.index.clone(),
            id: a.id.clone(),
            table: a.table.clone(),
            lsn: Lsn(a.version),
            reason: reason.clone(),
        });
    }
}

/// Appends one JSON line per record and syncs, so an acknowledged batch's
/// dead letters survive a crash.
async fn append_lines(
    path: &std::path::Path,
    records: &[serde_json::Value],
) -> std::io::Result<()> {
    let mut text = String::new();
    for r in records {
        text.push_str(&r.to_string());
        text.push('\n');
    }
    let mut file = tokio::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .await?;
    file.write_all(text.as_bytes()).await?;
    file.sync_data().await
}
