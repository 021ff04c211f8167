//! The replication connection to Postgres: a walsender session
//! (`replication=database`) that runs replication commands and then streams
//! WAL in CopyBoth mode.
//!
//! Upstream tokio-postgres has no replication mode, so the transport is
//! written on postgres-protocol's message codecs: [`connection`] does the
//! I/O (TLS, startup, authentication, simple queries, CopyBoth) and
//! [`protocol`] parses and builds the replication sub-protocol as plain
//! functions over bytes.

pub mod connection;
pub mod protocol;
pub mod sql_tls;
pub mod tls;

pub use protocol::ServerMessage;
