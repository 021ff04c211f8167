//! The configuration file: named pipelines, each a source and its sinks.
//!
//! Layered with the `config` crate: the file (TOML, or YAML by extension),
//! then environment variables prefixed `WALCAST_` with `__` between levels
//! (`WALCAST_PIPELINES__ORDERS__SOURCE__PASSWORD`). Every struct a user
//! writes rejects unknown keys, and errors name the key and the file.
//! Secrets can come from files (`password_file`) so they stay out of the
//! config and the environment.

mod load;
mod model;

pub use load::load;
pub use model::*;
