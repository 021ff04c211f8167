//! Every mapped type round-trips: a row of each Postgres type, written in
//! Postgres, captured by the walcast daemon as Avro into Kafka through the
//! registry, is read back by standard clients (confluent-kafka's
//! AvroDeserializer on fastavro, psycopg for Postgres) and equals the
//! Postgres value, column by column (`tests/fixtures/avro_types_roundtrip.py`).
//!
//! Against Apicurio and against walcast's embedded registry. Values Avro
//! cannot carry (NaN in a decimal, ±infinity timestamps that no Python
//! datetime holds) are outside this test; schemas/MAPPING.md says what
//! happens to them and `tests/evolution.rs` tests the dead-letter path.
//!
//! Needs python3 with venv; the first run installs confluent-kafka, fastavro
//! and psycopg from PyPI into `target/py-venv-e2e`. It never skips.

mod support;

use std::process::Command;
use std::time::Duration;

use support::*;

const WAIT: Duration = Duration::from_secs(90);

const TABLE: &str = "CREATE TYPE mood AS ENUM ('sad', 'happy');
    CREATE DOMAIN posint AS int CHECK (VALUE > 0);
    CREATE TABLE types (id int PRIMARY KEY, b bool, i2 int2, i4 int4, i8 int8, f4 real,
        f8 float8, n numeric(12,2), nu numeric, m money, t text, vc varchar(10), c char(3),
        nm name, by bytea, u uuid, j json, jb jsonb, d date, ti time, ttz timetz,
        ts timestamp, tstz timestamptz, iv interval, ip inet, cidr_ cidr, mac macaddr,
        mac8 macaddr8, e mood, dom posint, ai int[], at text[], pt point)";

const ROWS: &str = r#"INSERT INTO types VALUES
    (1, true, -32768, 2147483647, -9223372036854775808, 1.5, -2.25e-300,
     -1234567890.12, '123456789012345678901234567890.123456789', '-1234.56', 'tëxt', 'var',
     'ab', 'nm', '\x00ff', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '{"a": [1, 2]}',
     '{"b": null, "c": "d"}', '2024-02-29', '23:59:59.999999', '10:00:00+02',
     '2000-01-01 00:00:00.5', '2023-11-14 22:13:20.123456+00',
     '1 year 2 mons -3 days 04:05:06.5', '192.168.0.1/24', '10.0.0.0/8',
     '08:00:2b:01:02:03', '08:00:2b:01:02:03:04:05', 'happy', 42, '{1,NULL,3}',
     '{"a b","c\"d",NULL}', '(1.5,-2)');
    INSERT INTO types (id) VALUES (2);
    INSERT INTO types (id, f4, f8, nu, n, d, ts, tstz, iv) VALUES
    (3, '-Infinity', 'NaN', '-0.000000000000000000001', 0, '1970-01-01',
     '1969-12-31 23:59:59.999999', '1900-06-30 12:00:00-05', '-1 mons 00:00:00.000001')"#;

async fn round_trip(registry_url: &str, extra_top: &str, name: &str) {
    let db = TestDb::new(&format!("wc_avro_{name}")).await;
    db.exec(TABLE).await;
    let prefix = unique("avt");
    let mut w = Walcast::start_with(|_, admin| {
        format!(
            r#"{extra_top}
[admin]
listen = "{admin}"
[pipelines.{name}]
kind = "capture"
topic_prefix = "{prefix}"
format = "avro"
[pipelines.{name}.registry]
url = "{registry_url}"
[pipelines.{name}.source]
port = {port}
database = "{db}"
user = "postgres"
tables = ["public.types"]
[[pipelines.{name}.sinks]]
type = "kafka"
bootstrap_servers = "{bootstrap}"
"#,
            port = pg_port(),
            db = db.name,
            bootstrap = var("WALCAST_TEST_KAFKA_BOOTSTRAP"),
        )
    });
    w.wait_state("streaming", WAIT).await;
    db.exec(ROWS).await;
    let dsn = format!(
        "host=127.0.0.1 port={} user=postgres dbname={}",
        pg_port(),
        db.name
    );
    let out = Command::new(venv_python())
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/avro_types_roundtrip.py"
        ))
        .args([
            &var("WALCAST_TEST_KAFKA_BOOTSTRAP"),
            registry_url,
            &format!("{prefix}.public.types"),
            &dsn,
            "3",
        ])
        .output()
        .expect("run the Python reader");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "Avro as read by confluent-kafka differs from Postgres:\n{text}\nwalcast log:\n{}",
        tail(&w.log(), 3000)
    );
    // 3 rows x 33 columns, all compared.
    assert!(
        text.contains("compared 99 values of 3 rows, 0 differences"),
        "{text}"
    );
    w.kill9();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_mapped_type_round_trips_through_apicurio() {
    round_trip(&var("WALCAST_TEST_REGISTRY_URL"), "", "avtapicurio").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_mapped_type_round_trips_through_the_embedded_registry() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let top = format!(
        "[embedded_registry]\ndir = \"{}\"\nlisten = \"127.0.0.1:{port}\"",
        dir.path().display()
    );
    round_trip(&format!("http://127.0.0.1:{port}"), &top, "avtembedded").await;
}
