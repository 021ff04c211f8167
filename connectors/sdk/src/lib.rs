//! The contract every walcast connector builds on.
//!
//! Connectors depend on this crate and nothing else of walcast: the change
//! event ([`event`]), its typed column values ([`value`]), the table
//! description those values follow ([`table`]), source positions
//! ([`position`]) and the acknowledgement contract between sources and sinks
//! ([`ack`], [`sink`]), and what a running pipeline reports about itself:
//! its status ([`status`]) and its metrics ([`telemetry`]).
//!
//! Delivery is at-least-once. A sink may see an event again after a crash or
//! a retry and must apply it idempotently; every event carries the commit LSN
//! of its transaction so sinks can refuse to let an older version overwrite a
//! newer one.

pub mod ack;
pub mod duration;
pub mod encode;
pub mod event;
pub mod json;
pub mod notice;
pub mod pgtext;
pub mod position;
pub mod relay;
pub mod retry;
pub mod secret;
pub mod shape;
pub mod sink;
pub mod size;
pub mod status;
pub mod table;
pub mod telemetry;
pub mod toast;
pub mod value;

pub use ack::{AckTracker, Acker, Delivery};
pub use encode::{EncodeError, EncodedRecord, EventEncoder, JsonEncoder, KeyField};
pub use event::{ChangeEvent, Op, SnapshotMarker, SourceInfo, TransactionInfo};
pub use position::Lsn;
pub use sink::{send_to_every_sink, Batch, Sink, SinkError};
pub use status::{PipelineState, PipelineStatus, StatusHandle};
pub use table::{Column, PgType, ReplicaIdentity, TableName, TableSchema};
pub use value::{Numeric, Value};
