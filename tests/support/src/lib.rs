//! What every end-to-end test needs: the stack's servers (named by the
//! WALCAST_TEST_* variables that `deploy/local/stack env` prints), a fresh
//! database per test, and the walcast binary run as a user would run it.
//!
//! A crate of its own, so that it is compiled once and linked into every
//! test binary (as a module it was compiled into each of them, with
//! `allow(dead_code)` to hide what each did not use). The modules follow
//! the concerns: [`stack`] (where the servers are), [`pg`] (databases,
//! writers, comparisons with Postgres), [`daemon`] (the binary and its
//! configs), [`kafka`] (reading topics back), [`debezium`] (the reference
//! connector in Kafka Connect), [`python`] (the off-the-shelf readers), [`parity`] (comparing
//! Debezium's events and schemas with walcast's), [`sinks`] (Redis and
//! OpenSearch), [`http`] (proxies that cut a connection), [`net`] (a TCP
//! proxy that cuts the network path). Everything is
//! re-exported at the top, so a test writes `support::TestDb`.
//!
//! Nothing here sleeps for a fixed time: waits poll for a condition with a
//! deadline and fail with what was seen. Everything a test creates is
//! removed on drop, panics included, so no slot pins WAL after a failure.

pub mod daemon;
pub mod debezium;
pub mod http;
pub mod kafka;
pub mod net;
pub mod parity;
pub mod pg;
pub mod python;
pub mod sinks;
pub mod stack;

pub use daemon::*;
pub use debezium::*;
pub use http::*;
pub use kafka::*;
pub use net::*;
pub use parity::*;
pub use pg::*;
pub use python::*;
pub use sinks::*;
pub use stack::*;

/// The repository's root (this crate is tests/support).
pub fn repo_root() -> &'static std::path::Path {
    static ROOT: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    ROOT.get_or_init(|| {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../..")
            .canonicalize()
            .expect("the repository root")
    })
}
