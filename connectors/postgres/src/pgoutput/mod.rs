//! The pgoutput logical decoding protocol, as plain functions over bytes.
//!
//! Postgres's `pgoutput` plugin sends one message per CopyData payload of the
//! replication stream: transaction boundaries, relation (table shape)
//! descriptions and row changes whose column values are in text form. This
//! module turns those bytes into [`Message`]s and does no I/O, so it is tested
//! with frames captured from a real server (see `tests` and
//! `tests/fixtures/pgoutput`).
//!
//! Protocol version 1 is what walcast asks for by default: transactions
//! arrive whole at commit (Postgres spills large ones to disk), which keeps
//! the commit LSN of every change known when it is read. With the
//! pipeline's `streaming` on, walcast asks for version 2 with `streaming`:
//! Postgres then also sends a large transaction while it runs, in blocks
//! ([`streaming`] decodes them; `crate::streamed` holds them until the
//! commit). Two-phase messages (version 3) are never asked for and are
//! reported as such rather than misread.
//!
//! Reference: "Logical Replication Message Formats" in the Postgres manual.

mod decode;
mod message;
pub mod streaming;

pub use decode::{decode, DecodeError};
pub use message::*;

#[cfg(test)]
pub(crate) mod tests;
