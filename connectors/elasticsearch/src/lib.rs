//! walcast's Elasticsearch/OpenSearch sink: rows as documents, written with
//! NDJSON `_bulk` and the commit LSN as an external version so that replays
//! and stale events never overwrite newer documents. See README.md for the
//! versions it targets and [`sink`] for buffering and acknowledgement.

pub mod config;
pub mod mapping;
pub mod request_builder;
pub mod retry;
pub mod sink;

pub use config::{Auth, DeadLetter, ElasticsearchSinkConfig, TruncateAction, VersionType};
pub use sink::{DeliveryError, ElasticsearchSink, ElasticsearchSinkError, ElasticsearchSinkStats};
