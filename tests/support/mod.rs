//! The test support crate (tests/support/src, package
//! `walcast-test-support`), compiled once for every test binary; this file
//! only lets a test keep writing `mod support;` and `support::TestDb`.

pub use walcast_test_support::*;
