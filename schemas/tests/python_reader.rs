//! A standard reader decodes what walcast writes: events encoded by
//! [`AvroEncoder`] (against Apicurio and against the embedded registry
//! served over HTTP) are decoded by Confluent's Python client
//! (`confluent_kafka.schema_registry.avro.AvroDeserializer`, fastavro
//! underneath) in `decode_with_confluent.py`, and the values it returns are
//! compared with what the events hold.
//!
//! Needs `python3` with `venv`; the first run creates a virtualenv in
//! `target/py-venv` and installs `confluent-kafka[avro,schemaregistry]` from
//! PyPI, later runs reuse it. A missing Python or a failed install fails the
//! test: it never skips.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use common::{client, column, registry_url, table, unique, Served};
use serde_json::{json, Value as Json};
use walcast_schemas::{default_topic, AvroEncoder, MappingOptions, SubjectStrategy};
use walcast_sdk::{
    ChangeEvent, EventEncoder, Lsn, Numeric, Op, PgType, SnapshotMarker, SourceInfo, TableSchema,
    Value,
};

fn workspace_target() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target")
}

/// The virtualenv's python, created and filled on first use. A stamp file
/// marks a complete install, so an interrupted one is redone.
fn venv_python() -> PathBuf {
    let venv = workspace_target().join("py-venv");
    let python = venv.join("bin").join("python");
    let stamp = venv.join(".walcast-confluent-kafka");
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
        Command::new(venv.join("bin").join("pip")).args([
            "install",
            "--quiet",
            "confluent-kafka[avro,schemaregistry]",
            "fastavro",
        ]),
        "pip install confluent-kafka[avro,schemaregistry] fastavro",
    );
    std::fs::write(&stamp, b"").unwrap();
    python
}

fn items() -> Arc<TableSchema> {
    let numeric = PgType::Numeric {
        precision: Some(12),
        scale: Some(2),
    };
    table(
        "public",
        "items",
        1,
        vec![
            column("id", PgType::Int8, true),
            column("name", PgType::Text, false),
            column("price", numeric, false),
            column("placed_at", PgType::TimestampTz, false),
            column("local_at", PgType::Timestamp, false),
            column("day", PgType::Date, false),
            column("at", PgType::Time, false),
            column("uid", PgType::Uuid, false),
            column(
                "tags",
                PgType::Array {
                    element: Box::new(PgType::Text),
                },
                false,
            ),
            column("ratio", PgType::Float8, false),
            column("active", PgType::Bool, false),
            column("doc", PgType::Jsonb, false),
            column("raw", PgType::Bytea, false),
        ],
    )
}

fn full_row(id: i64, price: &str) -> Vec<Value> {
    vec![
        Value::Int64(id),
        Value::Text("widget".into()),
        Value::Numeric(Numeric::Finite(price.into())),
        Value::TimestampTz(1_700_000_000_123_456),
        Value::Timestamp(1_700_000_000_123_456),
        Value::Date(19_782),
        Value::Time(45_296_000_789),
        Value::Uuid([
            0x12, 0x3e, 0x45, 0x67, 0xe8, 0x9b, 0x12, 0xd3, 0xa4, 0x56, 0x42, 0x66, 0x14, 0x17,
            0x40, 0x00,
        ]),
        Value::Array(vec![Value::Text("a".into()), Value::Null]),
        Value::Float64(0.25),
        Value::Bool(true),
        Value::Json(r#"{"a": 1}"#.into()),
        Value::Bytes(vec![0x00, 0xff]),
    ]
}

/// `full_row` as the Python side prints it.
fn full_row_json(id: i64, price: &str) -> Json {
    json!({
        "id": id,
        "name": "widget",
        "price": {"decimal": price},
        "placed_at": {"datetime": "2023-11-14T22:13:20.123456+00:00"},
        "local_at": {"datetime": "2023-11-14T22:13:20.123456"},
        "day": {"date": "2024-02-29"},
        "at": {"time": "12:34:56.000789"},
        "uid": {"uuid": "123e4567-e89b-12d3-a456-426614174000"},
        "tags": ["a", null],
        "ratio": 0.25,
        "active": true,
        "doc": "{\"a\": 1}",
        "raw": {"bytes": "00ff"},
    })
}

/// A delete's before image under REPLICA IDENTITY DEFAULT: the key only.
fn key_only(id: i64) -> Vec<Value> {
    let mut row = vec![Value::Null; items().columns.len()];
    row[0] = Value::Int64(id);
    row
}

fn key_only_json(id: i64) -> Json {
    let mut row = serde_json::Map::new();
    for c in &items().columns {
        row.insert(c.name.clone(), Json::Null);
    }
    row.insert("id".into(), json!(id));
    Json::Object(row)
}

fn event(
    prefix: &str,
    op: Op,
    before: Option<Vec<Value>>,
    after: Option<Vec<Value>>,
) -> ChangeEvent {
    ChangeEvent {
        op,
        table: items(),
        before,
        after,
        source: SourceInfo {
            name: prefix.into(),
            db: "shop".into(),
            lsn: Lsn(0x16_B374_D848),
            commit_lsn: Lsn(0x16_B374_D900),
            tx_id: Some(771),
            ts_ms: 1_700_000_000_123,
            ts_us: 1_700_000_000_123_456,
            snapshot: if op == Op::Read {
                SnapshotMarker::True
            } else {
                SnapshotMarker::False
            },
        },
        transaction: None,
        ts_ms: 1_700_000_000_200,
    }
}

/// Encodes four events (read, create, update, delete) through `url`, has
/// Confluent's Python client decode them and compares.
async fn decoded_by_confluent(name: &str, url: &str) {
    let python = venv_python();
    let prefix = unique(&format!("py_{name}"));
    let encoder = AvroEncoder::new(
        Arc::new(client(url)),
        MappingOptions::default(),
        SubjectStrategy::TopicName,
        Arc::new(default_topic),
    );
    let cases = [
        (
            event(&prefix, Op::Read, None, Some(full_row(1, "0.01"))),
            "r",
            Json::Null,
            full_row_json(1, "0.01"),
        ),
        (
            event(&prefix, Op::Create, None, Some(full_row(2, "12.50"))),
            "c",
            Json::Null,
            full_row_json(2, "12.50"),
        ),
        (
            event(
                &prefix,
                Op::Update,
                None,
                Some(full_row(2, "-9999999999.99")),
            ),
            "u",
            Json::Null,
            full_row_json(2, "-9999999999.99"),
        ),
        (
            event(&prefix, Op::Delete, Some(key_only(2)), None),
            "d",
            key_only_json(2),
            Json::Null,
        ),
    ];
    let dir = common::scratch_dir(&format!("py_{name}"));
    let mut files = Vec::new();
    for (i, (ev, ..)) in cases.iter().enumerate() {
        let record = encoder.encode(ev).await.unwrap();
        let path = dir.join(format!("{i}.bin"));
        std::fs::write(&path, record.value.unwrap()).unwrap();
        files.push(path);
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/decode_with_confluent.py");
    let topic = default_topic(&cases[0].0);
    // Off the runtime's thread: the embedded registry answering the
    // script is served by this runtime.
    let mut cmd = Command::new(&python);
    cmd.arg(&script).arg(url).arg(&topic).args(&files);
    let out = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .unwrap()
        .expect("run decode_with_confluent.py");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{name}: decode_with_confluent.py failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let decoded: Vec<Json> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert_eq!(decoded.len(), cases.len(), "{name}: {stdout}");
    for ((ev, op, before, after), got) in cases.iter().zip(&decoded) {
        assert_eq!(got["op"], json!(op), "{name}: {got}");
        assert_eq!(got["before"], *before, "{name} {op}: before");
        assert_eq!(got["after"], *after, "{name} {op}: after");
        assert_eq!(got["source"]["name"], json!(prefix), "{name}: {got}");
        assert_eq!(
            got["source"]["lsn"],
            json!(ev.source.lsn.0),
            "{name}: {got}"
        );
        assert_eq!(
            got["source"]["commit_lsn"],
            json!(ev.source.commit_lsn.0),
            "{name}: {got}"
        );
        assert_eq!(got["ts_ms"], json!(ev.ts_ms), "{name}: {got}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn confluent_python_client_decodes_what_walcast_writes() {
    decoded_by_confluent("apicurio", &registry_url()).await;
    let served = Served::start(None).await;
    decoded_by_confluent("embedded", &served.url).await;
    served.stop().await;
}
