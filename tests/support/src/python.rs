//! The Python virtualenv of the tests that read Kafka with an off-the-shelf
//! client (confluent-kafka with its registry client, fastavro, psycopg):
//! target/py-venv-e2e, created on first use. A stamp file marks a complete
//! install, so an interrupted one is redone; within one process the install
//! happens once however many tests ask.

use std::path::PathBuf;
use std::process::Command;

/// The virtualenv's python.
pub fn venv_python() -> PathBuf {
    static PYTHON: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    PYTHON.get_or_init(install_venv).clone()
}

fn install_venv() -> PathBuf {
    let venv = crate::repo_root().join("target/py-venv-e2e");
    let python = venv.join("bin/python");
    let stamp = venv.join(".walcast-installed");
    if stamp.is_file() && python.is_file() {
        return python;
    }
    let run = |cmd: &mut Command, what: &str| {
        let out = cmd
            .output()
            .unwrap_or_else(|e| panic!("{what}: cannot run: {e} (is python3 installed?)"));
        assert!(
            out.status.success(),
            "{what} failed ({}):\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(
        Command::new("python3").args(["-m", "venv"]).arg(&venv),
        "python3 -m venv",
    );
    run(
        Command::new(venv.join("bin/pip")).args([
            "install",
            "--quiet",
            "confluent-kafka[avro,schemaregistry]==2.16.1",
            "fastavro",
            "psycopg[binary]",
        ]),
        "pip install confluent-kafka fastavro psycopg",
    );
    std::fs::write(&stamp, b"").unwrap();
    python
}
