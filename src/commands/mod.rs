//! The subcommands, one module each, built on the components' public APIs
//! (the Postgres source, the sinks, the schemas crate) and the config.

pub(crate) mod check;
pub(crate) mod daemon;
pub(crate) mod pause;
pub(crate) mod run;
pub(crate) mod slots;
pub(crate) mod snapshot;
pub(crate) mod status;
pub(crate) mod tail;
