//! walcast's Redis sink.
//!
//! Three modes ([`config::Mode`]): `invalidate` deletes each changed row's
//! cache key; `upsert` keeps a copy of the row (JSON string or hash) that an
//! older or replayed event can never overwrite (see [`request`] for the
//! version keys and tombstones); `publish` announces each change on a
//! channel or stream.
//!
//! A batch is acknowledged once Redis has answered every command of it.
//! [`walcast_sdk::Sink::send`] hands the batch to a write worker and returns,
//! so the caller prepares the next batch while Redis works (see [`sink`]);
//! transient errors are retried by the worker, definite ones (maxmemory
//! reached, wrong credentials, a key of the wrong type, a table without the
//! key the template needs) fail the batch's acker and are returned by the
//! next `send` or `flush`. The last
//! one is known from the event alone, and [`walcast_sdk::Sink::refuses`]
//! says so before sending, so that a relay can set such a record aside or
//! stop instead of failing its batch on every re-read.

pub mod config;
pub mod request;
pub mod retry;
pub mod sink;

pub use config::{Mode, PublishVia, RedisSinkConfig, UpsertFormat};
pub use sink::{RedisSink, RedisSinkError, RedisSinkStats};
