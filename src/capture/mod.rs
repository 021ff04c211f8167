//! Postgres capture: from a replication slot to batches of change events.
//!
//! * [`setup`] checks the server, the role, the tables, the publication and
//!   the slot, and creates what is missing.
//! * [`catalog`] resolves column types and primary keys.
//! * [`convert`] turns pgoutput's text values into typed values.
//! * [`assemble`] turns pgoutput messages into Debezium-shaped events.
//! * [`snapshot`] reads the rows that exist when capture starts.
//! * [`incremental`] reads tables' rows while streaming, when signalled
//!   (watermark-based, as in DBLog).
//! * [`stream`] is the I/O loop: it reads the slot, hands batches to the
//!   sinks and confirms positions through [`crate::checkpoint`].

pub mod assemble;
pub mod catalog;
pub mod convert;
pub mod incremental;
pub mod setup;
pub mod snapshot;
pub mod stream;
