//! The stack's servers: their addresses from the WALCAST_TEST_* variables
//! that `deploy/local/stack env` prints, or a stack of the tests' own.

use std::process::{Command, Stdio};

pub fn var(name: &str) -> String {
    if std::env::var("WALCAST_TEST_STACK_DIR").is_err() {
        own_stack();
    }
    std::env::var(name).unwrap_or_else(|_| {
        panic!(
            "{name} is not set: these tests run against the local stack. Start it and load its settings with\n  \
             deploy/local/stack up && eval \"$(deploy/local/stack env)\"\nor run everything with deploy/local/test"
        )
    })
}

/// Without a stack named by WALCAST_TEST_*, the tests start their own
/// (`target/stack-auto`, shared by the test binaries of one `cargo test`)
/// and a watchdog that stops it when that `cargo test` exits, panics
/// included, so no server outlives the run.
fn own_stack() {
    static STARTED: std::sync::Once = std::sync::Once::new();
    STARTED.call_once(|| {
        let root = crate::repo_root().display().to_string();
        let dir = format!("{root}/target/stack-auto");
        let script = format!("{root}/deploy/local/stack");
        let up = Command::new("bash")
            .arg(&script)
            .args(["up", "--with", "debezium"])
            .env("WALCAST_STACK_DIR", &dir)
            .stdout(Stdio::inherit())
            .stderr(Stdio::inherit())
            .status()
            .expect("run deploy/local/stack up");
        assert!(up.success(), "deploy/local/stack up failed; see the logs under {dir}");
        let env = Command::new("bash").arg(&script).arg("env").env("WALCAST_STACK_DIR", &dir).output().expect("stack env");
        for line in String::from_utf8_lossy(&env.stdout).lines() {
            if let Some((k, v)) = line.trim_start_matches("export ").split_once('=') {
                if k.starts_with("WALCAST_") {
                    std::env::set_var(k, v.trim_matches(|c| c == '\'' || c == '"'));
                }
            }
        }
        let cargo = std::os::unix::process::parent_id();
        let _ = Command::new("setsid")
            .arg("bash")
            .arg("-c")
            .arg(format!("while kill -0 {cargo} 2>/dev/null; do sleep 2; done; WALCAST_STACK_DIR='{dir}' bash '{script}' down >/dev/null 2>&1"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
    });
}

pub fn pg_port() -> u16 {
    var("WALCAST_TEST_PG_PORT")
        .parse()
        .expect("WALCAST_TEST_PG_PORT is a port")
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// Runs `deploy/local/stack ARGS` on the stack the tests use (for outage
/// tests: `stop kafka`, `start kafka`).
pub fn stack(args: &[&str]) {
    let script = crate::repo_root().join("deploy/local/stack");
    let out = Command::new("bash")
        .arg(script)
        .args(args)
        .env("WALCAST_STACK_DIR", var("WALCAST_TEST_STACK_DIR"))
        .output()
        .expect("run deploy/local/stack");
    assert!(
        out.status.success(),
        "stack {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
