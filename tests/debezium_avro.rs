//! Debezium compatibility in Avro: the same workload (every type of
//! schemas/MAPPING.md, inserts, updates, a key change, deletes under
//! REPLICA IDENTITY DEFAULT and FULL, NULLs, NOT NULL columns, column
//! DEFAULTs of every kind Debezium reads (constants, `now()`, `nextval`,
//! `gen_random_uuid()`, a quote inside a literal, bits, a nullable column's,
//! set to NULL once), a key-less table, a composite key whose index is in
//! another order than its columns) captured by Debezium 3.6.1 on Kafka Connect
//! with Apicurio's Avro converter, and by walcast with `format = "avro"`
//! and `avro_compat = "debezium"`, both registering in the same Apicurio
//! registry. Both sides are read by off-the-shelf clients (confluent-kafka's
//! registry client and fastavro, `tests/fixtures/avro_topic_dump.py`), and
//! compared:
//! * the registered key and value schemas of each table: record names,
//!   field names and order, types, logical types, precision/scale,
//!   `connect.name`, `connect.version`, `connect.parameters`,
//!   `connect.type`, defaults (walcast's own `walcast.*` attributes aside);
//! * the decoded events, field by field: key, op, before, after,
//!   transaction, and the source fields both carry.
//! A field or attribute on one side only is a failure, in both directions,
//! except the deliberate, documented differences in KNOWN_SCHEMA and
//! KNOWN_VALUES (schemas/MAPPING.md says why for each).
//!
//! Needs the stack with Connect: `deploy/local/stack up --with debezium`
//! (which installs the converter), and python3 with venv (the first run
//! installs confluent-kafka and fastavro into `target/py-venv-e2e`).

mod support;

use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};
use support::*;

const WAIT: Duration = Duration::from_secs(120);

/// (path fragment, why): schema differences that are deliberate. A
/// difference is forgiven when its path contains the fragment.
const KNOWN_SCHEMA: &[(&str, &str)] = &[
    (
        "types.value.before.n25.precision",
        "numeric(2,5): Debezium declares precision 2 < scale 5, which Avro forbids (Java's Avro \
         drops the logical type, fastavro and apache-avro refuse the schema); walcast declares 5",
    ),
    (
        "value.source.commit_lsn",
        "walcast's addition to source: the commit LSN relays use as the row version",
    ),
];

/// (path fragment, why): value differences that are deliberate.
const KNOWN_VALUES: &[(&str, &str)] = &[
    (
        "transaction.id",
        "Debezium 3.6.1 (pgoutput) writes `txId:LSN` with each event's own LSN, so the id changes \
         within one transaction; walcast writes `txId:commit LSN`, one id per transaction \
         (total_order and data_collection_order agree)",
    ),
    (
        "source.sequence",
        "walcast does not keep the previous commit's LSN; it writes null",
    ),
    (
        "source.commit_lsn",
        "walcast's addition to source (see KNOWN_SCHEMA)",
    ),
    (
        ".n25",
        "numeric(2,5): Debezium's schema is invalid Avro, so a reader sees its bytes (base64) \
         where walcast's reads as a decimal; same unscaled value",
    ),
    (
        "d_nul: debezium=7 walcast=null",
        "a nullable column with a DEFAULT: Debezium's Avro converter writes the default where the \
         value is null (Connect's Struct.get gives a null field its schema default), in key-only \
         before images and for a real NULL alike; walcast writes the null",
    ),
    (
        ".nm",
        "`name` columns: Debezium 3.6.1 writes null for every value; walcast writes the name",
    ),
];

/// Source fields both write with the same meaning and value.
const SOURCE_FIELDS: &[&str] = &[
    "connector",
    "name",
    "db",
    "schema",
    "table",
    "txId",
    "lsn",
    "snapshot",
    "ts_ms",
    "ts_us",
    "ts_ns",
    "xmin",
    "origin",
    "origin_lsn",
    "sequence",
];

/// Every record of `topics` (until `count` carry a value) as the Python
/// reader decoded them, with the writer schemas by id; prefixes replaced by
/// `PREFIX` so the two producers' names compare.
fn dump(registry: &str, prefix: &str, topics: &[String], count: usize) -> Value {
    let out = Command::new(venv_python())
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/avro_topic_dump.py"
        ))
        .arg(var("WALCAST_TEST_KAFKA_BOOTSTRAP"))
        .arg(registry)
        .arg(count.to_string())
        .args(topics)
        .output()
        .expect("run the Python reader");
    assert!(
        out.status.success(),
        "reading {topics:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout)
        .unwrap()
        .replace(prefix, "PREFIX");
    serde_json::from_str(&text).expect("reader output is JSON")
}

const TABLES: &str = r#"CREATE TYPE mood AS ENUM ('sad', 'happy');
CREATE DOMAIN posint AS int CHECK (VALUE > 0);
CREATE TABLE types (id int PRIMARY KEY, b bool, i2 int2, i4 int4, i8 int8, f4 real,
    f8 float8, n numeric(12,2), nu numeric, m money, t text, vc varchar(10), c char(3),
    nm name, by bytea, u uuid, j json, jb jsonb, d date, ti time, ttz timetz,
    ts timestamp, tstz timestamptz, iv interval, ip inet, cidr_ cidr, mac macaddr,
    mac8 macaddr8, e mood, dom posint, ai int[], at text[], pt point,
    n0 numeric(7), n25 numeric(2,5), ts3 timestamp(3), ts0 timestamp(0), tstz0 timestamptz(0),
    tstz3 timestamptz(3), ti0 time(0), ti3 time(3), ttz3 timetz(3), tsv tsvector, xm xml,
    bits bit(10), bit1 bit(1), vb varbit(5), i4r int4range, tsa timestamptz[],
    nn_t text NOT NULL, nn_i int NOT NULL, nn_n numeric(5,2) NOT NULL, nn_nu numeric NOT NULL,
    nn_d date NOT NULL, nn_ts timestamp NOT NULL, nn_tstz timestamptz NOT NULL, nn_u uuid NOT NULL,
    nn_b bytea NOT NULL, nn_bool bool NOT NULL, nn_arr int[] NOT NULL, nn_e mood NOT NULL,
    nn_j jsonb NOT NULL, nn_iv interval NOT NULL, nn_ttz timetz NOT NULL, nn_m money NOT NULL,
    nn_f float8 NOT NULL, nn_def text NOT NULL DEFAULT 'dflt', d_nul int DEFAULT 7,
    d_fn timestamptz NOT NULL DEFAULT now(), d_q text NOT NULL DEFAULT 'it''s', ser serial,
    d_num numeric(6,2) NOT NULL DEFAULT 1.5, d_day date NOT NULL DEFAULT '2020-02-29',
    d_ts timestamp(3) NOT NULL DEFAULT '2020-01-01 01:02:03.456', d_u uuid NOT NULL DEFAULT gen_random_uuid(),
    d_b bool NOT NULL DEFAULT true, d_f4 real NOT NULL DEFAULT 1.25, d_bits bit(3) NOT NULL DEFAULT B'101');
CREATE TABLE full_rows (id int PRIMARY KEY, note text NOT NULL, v int, at timestamptz);
ALTER TABLE full_rows REPLICA IDENTITY FULL;
CREATE TABLE keyless (a text, b int NOT NULL);
CREATE TABLE multikey (k1 text NOT NULL, k2 uuid NOT NULL, k3 date NOT NULL, v text, PRIMARY KEY (k2, k1, k3));"#;

/// The NOT NULL columns' values of a row: (`nn_t`, ..., `nn_f`).
const NN: &str = r#"'nt', 5, 1.5, 2.25, '2020-01-01', '2020-01-01 01:02:03', '2020-01-01 01:02:03+00',
    'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '\x01', true, '{1,2}', 'happy', '{"k": 1}', '1 day',
    '01:00:00+01', 12.34, 0.5"#;

fn workload() -> String {
    format!(
        r#"INSERT INTO types VALUES
    (1, true, -32768, 2147483647, -9223372036854775808, 1.5, -2.25e-300,
     -1234567890.12, '123456789012345678901234567890.123456789', '-1234.56', 'tëxt', 'var',
     'ab', 'nm', '\x00ff', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '{{"a": [1, 2]}}',
     '{{"b": null, "c": "d"}}', '2024-02-29', '23:59:59.999999', '10:00:00.5+02',
     '2000-01-01 00:00:00.5', '2023-11-14 22:13:20.123456+00',
     '1 year 2 mons -3 days 04:05:06.5', '192.168.0.1/24', '10.0.0.0/8',
     '08:00:2b:01:02:03', '08:00:2b:01:02:03:04:05', 'happy', 42, '{{1,NULL,3}}',
     '{{"a b","c\"d",NULL}}', '(1.5,-2)', 1234567, 0.00012, '2020-01-01 01:02:03.456',
     '2020-01-01 01:02:03', '2020-01-01 01:02:03+05', '2020-01-01 00:00:00.1+00', '01:02:03',
     '01:02:03.123', '10:00:00.123+05:30', 'a fat cat', '<a>x</a>', B'1000000001', B'1', B'11',
     '[1,5)', '{{"2020-01-01 00:00:00+00",NULL}}', {NN}, 'given', 8, '2021-01-01 00:00:00+00',
     'q', 100, 2.5, '2021-01-01', '2021-01-01 00:00:00', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a12', false,
     2.5, B'011');
INSERT INTO types (id, nn_t, nn_i, nn_n, nn_nu, nn_d, nn_ts, nn_tstz, nn_u, nn_b, nn_bool, nn_arr,
    nn_e, nn_j, nn_iv, nn_ttz, nn_m, nn_f) VALUES (2, {NN});
INSERT INTO types (id, f4, f8, nu, n, d, ts, tstz, iv, ttz, bit1, nn_t, nn_i, nn_n, nn_nu, nn_d,
    nn_ts, nn_tstz, nn_u, nn_b, nn_bool, nn_arr, nn_e, nn_j, nn_iv, nn_ttz, nn_m, nn_f) VALUES
    (3, '-Infinity', 'NaN', '-0.000000000000000000001', 0, '1970-01-01',
     '1969-12-31 23:59:59.999999', '1900-06-30 12:00:00-05', '-1 mons 00:00:00.000001',
     '23:59:59.999999-08', B'0', {NN});
INSERT INTO types (id, d, ts, tstz, ts3, tstz3, nn_t, nn_i, nn_n, nn_nu, nn_d, nn_ts, nn_tstz,
    nn_u, nn_b, nn_bool, nn_arr, nn_e, nn_j, nn_iv, nn_ttz, nn_m, nn_f) VALUES
    (4, 'infinity', 'infinity', '-infinity', '-infinity', 'infinity', {NN}),
    (5, '-infinity', '-infinity', 'infinity', 'infinity', '-infinity', {NN});
UPDATE types SET t = 'updated', i4 = 7 WHERE id = 1;
UPDATE types SET id = 30 WHERE id = 3;
UPDATE types SET d_nul = NULL WHERE id = 4;
DELETE FROM types WHERE id = 2;
DELETE FROM types WHERE id = 1;
INSERT INTO full_rows VALUES (1, 'a', 1, '2020-01-01 00:00:00+00');
UPDATE full_rows SET note = 'b', v = NULL WHERE id = 1;
DELETE FROM full_rows WHERE id = 1;
INSERT INTO keyless VALUES ('x', 1), (NULL, 2);
INSERT INTO multikey VALUES ('a', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '2024-01-01', 'v');
UPDATE multikey SET v = 'w';
DELETE FROM multikey;"#
    )
}

/// Records with a value per table in the workload.
const EVENTS: &[(&str, usize)] = &[
    ("types", 11),
    ("full_rows", 3),
    ("keyless", 2),
    ("multikey", 3),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn walcast_avro_matches_debezium_with_an_avro_converter() {
    let registry = var("WALCAST_TEST_REGISTRY_URL");
    let db = TestDb::new("wc_dbz_avro").await;
    db.exec(TABLES).await;
    let dbz_prefix = unique("dbza");
    let wc_prefix = unique("wca");
    let connector = unique("dbz_avro");
    let tables = "public.types,public.full_rows,public.keyless,public.multikey";
    let mut config = json!({
        "connector.class": "io.debezium.connector.postgresql.PostgresConnector",
        "plugin.name": "pgoutput",
        "database.hostname": "127.0.0.1",
        "database.port": pg_port().to_string(),
        "database.user": "postgres",
        "database.password": "unused",
        "database.dbname": db.name,
        "topic.prefix": dbz_prefix,
        "table.include.list": tables,
        "slot.name": format!("{connector}_slot"),
        "publication.name": format!("{connector}_pub"),
        "publication.autocreate.mode": "filtered",
        "snapshot.mode": "no_data",
        "skipped.operations": "none",
        // walcast always writes the transaction block.
        "provide.transaction.metadata": "true",
    });
    apicurio_avro_converter(&mut config, &registry);
    let _guard = start_connector(&db, &connector, config, WAIT).await;
    let w = Walcast::start_with(|_, admin| {
        format!(
            r#"[admin]
listen = "{admin}"
[pipelines.dbzavro]
kind = "capture"
topic_prefix = "{wc_prefix}"
format = "avro"
[pipelines.dbzavro.registry]
url = "{registry}"
avro_compat = "debezium"
[pipelines.dbzavro.source]
port = {port}
database = "{db}"
user = "postgres"
tables = ["public.types", "public.full_rows", "public.keyless", "public.multikey"]
keyless_tables = ["public.keyless"]
[[pipelines.dbzavro.sinks]]
type = "kafka"
bootstrap_servers = "{bootstrap}"
"#,
            port = pg_port(),
            db = db.name,
            bootstrap = var("WALCAST_TEST_KAFKA_BOOTSTRAP")
        )
    });
    w.wait_state("streaming", WAIT).await;
    db.exec(&workload()).await;

    let topics = |prefix: &str| -> Vec<String> {
        EVENTS
            .iter()
            .map(|(t, _)| format!("{prefix}.public.{t}"))
            .collect()
    };
    let total: usize = EVENTS.iter().map(|(_, n)| n).sum();
    let dbz = dump(&registry, &dbz_prefix, &topics(&dbz_prefix), total);
    let wc = dump(&registry, &wc_prefix, &topics(&wc_prefix), total);
    let status = connect_rest("GET", &format!("/connectors/{connector}/status"), None).await;

    let mut report = Vec::new();
    let mut known_schema = Known::new(KNOWN_SCHEMA);
    let mut known_values = Known::new(KNOWN_VALUES);
    let mut compared = 0;
    for (table, expected) in EVENTS {
        let topic = format!("PREFIX.public.{table}");
        let events = |side: &Value| -> Vec<Value> {
            let mut v: Vec<Value> = side["records"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|r| r["topic"] == topic.as_str() && !r["value"].is_null())
                .cloned()
                .collect();
            v.sort_by_key(|r| (r["key"].to_string(), r["value"]["source"]["lsn"].as_i64()));
            v
        };
        let (d, w) = (events(&dbz), events(&wc));
        assert_eq!(
            (d.len(), w.len()),
            (*expected, *expected),
            "{table}: events from Debezium and walcast ({status:?})"
        );
        // The registered schemas of the first event (every event of a
        // table has the same ones here).
        for part in ["key", "value"] {
            let id = |side: &Value, e: &Value| {
                let id = &e[format!("{part}_id")];
                side["schemas"]
                    .get(id.to_string())
                    .cloned()
                    .unwrap_or(Value::Null)
            };
            let (ds, ws) = (id(&dbz, &d[0]), id(&wc, &w[0]));
            let mut diffs = Vec::new();
            compare_schema(&format!("{table}.{part}"), &ds, &ws, &mut diffs);
            report.extend(diffs.into_iter().filter(|p| !known_schema.forgives(p)));
        }
        for (de, we) in d.iter().zip(&w) {
            let (dv, wv) = (&de["value"], &we["value"]);
            let mut diffs = Vec::new();
            compare_values("key", Some(&de["key"]), Some(&we["key"]), &mut diffs);
            for f in ["op", "before", "after", "transaction"] {
                compare_values(f, dv.get(f), wv.get(f), &mut diffs);
            }
            for f in SOURCE_FIELDS {
                compare_values(
                    &format!("source.{f}"),
                    dv["source"].get(*f),
                    wv["source"].get(*f),
                    &mut diffs,
                );
            }
            // Every other field must be present on both sides (values
            // differ by nature: versions, processing times).
            for (what, d, w) in [("", dv, wv), ("source.", &dv["source"], &wv["source"])] {
                let (d, w) = (d.as_object().unwrap(), w.as_object().unwrap());
                for f in d.keys().filter(|f| !w.contains_key(*f)) {
                    diffs.push(format!("{what}{f}: only in debezium"));
                }
                for f in w.keys().filter(|f| !d.contains_key(*f)) {
                    diffs.push(format!("{what}{f}: only in walcast"));
                }
            }
            compared += 1;
            report.extend(
                diffs
                    .into_iter()
                    .filter(|p| !known_values.forgives(p))
                    .map(|p| format!("{table} key={} op={}: {p}", de["key"], dv["op"])),
            );
        }
    }
    assert_eq!(compared, EVENTS.iter().map(|(_, n)| n).sum::<usize>());
    for (p, why) in known_schema
        .unused()
        .into_iter()
        .chain(known_values.unused())
    {
        report.push(format!(
            "listed difference `{p}` ({why}) did not occur: remove it"
        ));
    }
    assert!(
        report.is_empty(),
        "walcast's Avro (avro_compat = \"debezium\") and Debezium's differ:\n{}",
        report.join("\n")
    );
}
