//! Column values from Postgres's text output to typed values: the
//! parsers live in `walcast_sdk::pgtext`, shared with the schema mapping.

pub use walcast_sdk::pgtext::*;
