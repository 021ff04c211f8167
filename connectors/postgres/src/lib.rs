//! walcast's Postgres source: from a replication slot to batches of change
//! events, and the LSN confirmed back once every sink has them.
//!
//! The data path, in the order a change travels it:
//!
//! * [`replication`] is the walsender connection (TLS, authentication,
//!   CopyBoth) and the replication sub-protocol as functions over bytes.
//! * [`pgoutput`] decodes the logical decoding messages, without I/O.
//! * [`setup`] checks the server, the role, the tables, the publication and
//!   the slot, and creates what is missing.
//! * [`catalog`] resolves column types and primary keys.
//! * [`convert`] turns pgoutput's text values into typed values.
//! * [`assemble`] turns pgoutput messages into Debezium-shaped events.
//! * [`snapshot`] reads the rows that exist when capture starts.
//! * [`incremental`] reads tables' rows while streaming, when signalled
//!   (watermark-based, as in DBLog).
//! * [`schema_change`] notices when a captured table's columns change, and
//!   installs the optional DDL capture trigger.
//! * [`stream`] is the I/O loop: it reads the slot, hands batches to the
//!   sinks and confirms positions through [`checkpoint`].
//! * [`config`] is the source's section of the config file.
//!
//! This crate depends on the SDK (events, the acknowledgement contract,
//! status and metrics) and nothing else of walcast; the daemon wires it to
//! its sinks.

pub mod assemble;
pub mod catalog;
pub mod checkpoint;
pub mod config;
pub mod convert;
pub mod incremental;
pub mod pgoutput;
pub mod replication;
pub mod schema_change;
pub mod setup;
pub mod snapshot;
pub mod stream;
pub mod streamed;

pub use config::{PostgresSourceConfig, SnapshotMode};
pub use stream::{run, CaptureError, CaptureSettings};
