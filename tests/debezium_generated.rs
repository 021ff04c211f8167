//! Debezium parity on generated workloads: the oracle's generator
//! (tests/oracle/generator.py, through tests/oracle/parity.py) makes a
//! seed's tables (every type of its catalog, awkward schema, table and
//! column names, single and composite primary keys with the index in
//! another order than the columns, key-less tables, REPLICA IDENTITY FULL
//! and USING INDEX, NOT NULL columns with a DEFAULT, TOASTed columns) and a
//! workload (inserts, updates touching and leaving alone the TOASTed
//! columns, key changes, deletes, truncates, rolled-back savepoints and
//! transactions, NULLs). Debezium 3.6.1 on the stack's Kafka Connect and
//! walcast capture it from the same database, and every record of every
//! topic is compared, both ways:
//! * JSON (`walcast_json_matches_debezium_on_generated_workloads`):
//!   JsonConverter without schemas, `decimal.handling.mode=string`, as
//!   tests/debezium.rs; walcast with `json_special_numeric = "debezium"`.
//! * Avro (`walcast_avro_matches_debezium_on_generated_workloads`):
//!   Apicurio's AvroConverter (Avro names adjusted, as Avro needs), walcast
//!   with `avro_compat = "debezium"`, both in the same registry; the
//!   registered key and value schemas of every table, attribute by
//!   attribute, and every decoded record, as tests/debezium_avro.rs.
//!
//! Records pair up per topic and key, in the order Kafka holds them
//! (key-less ones by LSN); a topic, a record or a field on one side only
//! is a difference. Deliberate differences are the KNOWN_* lists below,
//! each with its reason (README "Debezium parity", schemas/MAPPING.md); anything
//! else fails, with one example per kind of difference and the seed.
//!
//! Short form (CI, `cargo test`): the seeds of JSON_SEEDS / AVRO_SEEDS,
//! TRANSACTIONS transactions each. Longer: `WALCAST_PARITY_SEEDS=7,8,9`
//! (or `WALCAST_PARITY_RUNS=N` seeds from `WALCAST_PARITY_SEED`, random by
//! default) and `WALCAST_PARITY_TRANSACTIONS=500`.
//!
//! Needs the stack with Connect (`deploy/local/stack up --with debezium`)
//! and python3 with venv (target/py-venv-e2e, installed on first use).

mod support;

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};
use support::*;

const WAIT: Duration = Duration::from_secs(120);

/// The short form's seeds and size.
const JSON_SEEDS: &[u64] = &[11];
const AVRO_SEEDS: &[u64] = &[12];
const TRANSACTIONS: u32 = 80;

/// (fragment, why): JSON differences that are deliberate. A difference is
/// forgiven when its line contains the fragment.
const KNOWN_JSON: &[(&str, &str)] = &[
    (
        "tombstone of a key-less delete",
        "Debezium follows a delete of a key-less table with a tombstone whose key is null; \
         walcast writes none (compaction, which tombstones serve, refuses null keys)",
    ),
    (
        "same real, other digits",
        "a `real` (float4): walcast writes its shortest decimal form; the JVM of the stack (17) \
         prints some reals with more digits (1.17549435E-38 for 1.1754944e-38, Float.toString \
         before JDK 19); both read back as the same real",
    ),
    (
        "infinite date ",
        "date 'infinity'/'-infinity' in JSON: walcast writes i32::MAX/MIN (its documented \
         markers), Debezium -2147472692/-2147472691, numbers its JDBC driver's infinity constants \
         overflow into (read as dates they are in year -5877641); `avro_compat = \"debezium\"` \
         writes Debezium's numbers",
    ),
    (
        "infinite timestamp ",
        "timestamp 'infinity'/'-infinity' in JSON: walcast writes i64::MAX/MIN, Debezium \
         9223372036825200000/-9223372036832400000 (the same overflow); `avro_compat = \
         \"debezium\"` writes Debezium's numbers",
    ),
    (
        "bit string ",
        "bit(n)/varbit in JSON: walcast writes the bit string (\"10011011\"), Debezium base64 of \
         Java's BitSet bytes (\"mw==\"), which loses the length (B'0001' and B'1' are both \
         0x01); `avro_compat = \"debezium\"` writes Debezium's bytes",
    ),
    (
    "key-only before.",
    "a delete under REPLICA IDENTITY DEFAULT/USING INDEX carries the key only: Debezium writes \
     the type's zero or the column's DEFAULT for a NOT NULL column, walcast null (README \"The \
     event\"); only where walcast's value is null",
)];

/// (fragment, why): Avro schema differences that are deliberate.
const KNOWN_SCHEMA: &[(&str, &str)] = &[
    (
        "same real, other digits",
        "a `real` column's DEFAULT: the schema's JSON number is the real's shortest form in \
         walcast's, Java's Float.toString in Debezium's (1.4E-45 for 1e-45); the same real",
    ),
    (
        "value.source.commit_lsn",
        "walcast's addition to source: the commit LSN relays use as the row version",
    ),
];

/// (fragment, why): Avro value differences that are deliberate.
const KNOWN_VALUES: &[(&str, &str)] = &[
    (
        "transaction.id",
        "Debezium 3.6.1 (pgoutput) writes `txId:LSN` with each event's own LSN; walcast \
         `txId:commit LSN`, one id per transaction",
    ),
    (
        "source.sequence",
        "walcast does not keep the previous commit's LSN; it writes null",
    ),
    ("source.commit_lsn", "walcast's addition to source"),
];

/// Source fields both write with the same meaning and value (JSON; Avro
/// compares every field of its fixed `source` record).
const SOURCE_FIELDS: &[&str] = &[
    "connector",
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
];

/// Envelope and source fields one side writes and the other does not, as
/// tests/debezium.rs lists them (JSON).
const ONLY_DEBEZIUM_SOURCE: &[&str] = &["sequence", "origin", "origin_lsn"];
const ONLY_WALCAST_SOURCE: &[&str] = &["commit_lsn"];

#[derive(Clone, Copy, PartialEq, Debug)]
enum Format {
    Json,
    Avro,
}

impl Format {
    fn name(self) -> &'static str {
        match self {
            Format::Json => "json",
            Format::Avro => "avro",
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn walcast_json_matches_debezium_on_generated_workloads() {
    run_seeds(Format::Json, JSON_SEEDS).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn walcast_avro_matches_debezium_on_generated_workloads() {
    run_seeds(Format::Avro, AVRO_SEEDS).await;
}

/// The seeds to run: the environment's, or the short form's.
fn seeds(short: &[u64]) -> Vec<u64> {
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    if let Some(list) = env("WALCAST_PARITY_SEEDS") {
        return list
            .split(',')
            .map(|s| {
                s.trim()
                    .parse()
                    .expect("WALCAST_PARITY_SEEDS: comma-separated numbers")
            })
            .collect();
    }
    if let Some(n) = env("WALCAST_PARITY_RUNS") {
        let n: u64 = n.parse().expect("WALCAST_PARITY_RUNS: a number");
        let first = env("WALCAST_PARITY_SEED")
            .map(|s| s.parse().expect("WALCAST_PARITY_SEED: a number"))
            .unwrap_or_else(|| rand::random::<u64>() % 1_000_000);
        return (first..first + n).collect();
    }
    short.to_vec()
}

async fn run_seeds(format: Format, short: &[u64]) {
    let transactions: u32 = std::env::var("WALCAST_PARITY_TRANSACTIONS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(TRANSACTIONS);
    let mut failed = Vec::new();
    for seed in seeds(short) {
        let started = std::time::Instant::now();
        let (compared, report) = run_one(format, seed, transactions).await;
        eprintln!(
            "parity {} seed {seed}: {compared} records compared, {} kinds of difference, in {:.0?}",
            format.name(),
            report.len(),
            started.elapsed()
        );
        if !report.is_empty() {
            failed.push(format!(
                "seed {seed} ({} transactions; rerun with WALCAST_PARITY_SEEDS={seed} \
                 WALCAST_PARITY_TRANSACTIONS={transactions}):\n{}",
                transactions,
                report.join("\n")
            ));
        }
    }
    assert!(
        failed.is_empty(),
        "walcast's {} and Debezium's differ:\n{}",
        format.name(),
        failed.join("\n\n")
    );
}

/// One table of the scenario, as parity.py describes it.
struct Table {
    schema: String,
    name: String,
    config_name: String,
    quoted: String,
    keyless: bool,
    identity_full: bool,
    /// Column name to SQL type.
    types: BTreeMap<String, String>,
}

fn python(args: &[&str]) -> String {
    let out = Command::new(venv_python())
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/oracle/parity.py"
        ))
        .args(args)
        .output()
        .expect("run tests/oracle/parity.py");
    assert!(
        out.status.success(),
        "parity.py {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("parity.py writes UTF-8")
}

/// Runs one seed; returns how many records were compared and the
/// differences (one line per kind, with its count and first example).
async fn run_one(format: Format, seed: u64, transactions: u32) -> (usize, Vec<String>) {
    let db = TestDb::new(&format!("wc_par_{}", format.name())).await;
    let dsn = format!(
        "host=127.0.0.1 port={} dbname={} user=postgres",
        pg_port(),
        db.name
    );
    let seed_s = seed.to_string();
    let scenario: Value = serde_json::from_str(&python(&[
        "scenario",
        "--seed",
        &seed_s,
        "--format",
        format.name(),
        "--dsn",
        &dsn,
    ]))
    .expect("scenario JSON");
    let tables: Vec<Table> = scenario["tables"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| Table {
            schema: t["schema"].as_str().unwrap().to_string(),
            name: t["name"].as_str().unwrap().to_string(),
            config_name: t["config_name"].as_str().unwrap().to_string(),
            quoted: t["quoted"].as_str().unwrap().to_string(),
            keyless: t["keyless"].as_bool().unwrap(),
            identity_full: t["identity_full"].as_bool().unwrap(),
            types: t["columns"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| {
                    (
                        c["name"].as_str().unwrap().to_string(),
                        c["type"].as_str().unwrap().to_string(),
                    )
                })
                .collect(),
        })
        .collect();
    let by_topic_name = |topic: &str| -> Option<&Table> {
        // PREFIX.<schema>.<table>, sanitised as both name topics.
        let clean = |s: &str| -> String {
            s.chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || "._-".contains(c) {
                        c
                    } else {
                        '_'
                    }
                })
                .collect()
        };
        tables
            .iter()
            .find(|t| format!("PREFIX.{}", clean(&format!("{}.{}", t.schema, t.name))) == topic)
    };

    let dbz_prefix = unique(&format!("dbzg{}", format.name()));
    let wc_prefix = unique(&format!("wcg{}", format.name()));
    let connector = unique("dbz_gen");
    // Debezium's publication, made here: its own would name the tables in
    // SQL it writes, and these names are built to be awkward.
    db.exec(&format!(
        "CREATE PUBLICATION {connector}_pub FOR TABLE {}",
        tables
            .iter()
            .map(|t| t.quoted.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    ))
    .await;
    let registry = var("WALCAST_TEST_REGISTRY_URL");
    let mut config = json!({
        "connector.class": "io.debezium.connector.postgresql.PostgresConnector",
        "plugin.name": "pgoutput",
        "database.hostname": "127.0.0.1",
        "database.port": pg_port().to_string(),
        "database.user": "postgres",
        "database.password": "unused",
        "database.dbname": db.name,
        "topic.prefix": dbz_prefix,
        "slot.name": format!("{connector}_slot"),
        "publication.name": format!("{connector}_pub"),
        "publication.autocreate.mode": "disabled",
        "snapshot.mode": "no_data",
        "skipped.operations": "none",
    });
    match format {
        Format::Json => {
            for (k, v) in [
                ("decimal.handling.mode", "string"),
                (
                    "key.converter",
                    "org.apache.kafka.connect.json.JsonConverter",
                ),
                ("key.converter.schemas.enable", "false"),
                (
                    "value.converter",
                    "org.apache.kafka.connect.json.JsonConverter",
                ),
                ("value.converter.schemas.enable", "false"),
            ] {
                config[k] = json!(v);
            }
        }
        Format::Avro => {
            for (k, v) in [
                // walcast always writes the transaction block.
                ("provide.transaction.metadata", "true"),
                // Avro names: what walcast's `field_name_adjustment = "avro"`
                // (the default) and its record names do.
                ("schema.name.adjustment.mode", "avro"),
                ("field.name.adjustment.mode", "avro"),
            ] {
                config[k] = json!(v);
            }
            apicurio_avro_converter(&mut config, &registry);
        }
    }
    let _guard = start_connector(&db, &connector, config, WAIT).await;

    let toml_list = |names: Vec<&str>| -> String {
        names
            .iter()
            .map(|n| serde_json::to_string(n).unwrap())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let all = toml_list(tables.iter().map(|t| t.config_name.as_str()).collect());
    let keyless = toml_list(
        tables
            .iter()
            .filter(|t| t.keyless)
            .map(|t| t.config_name.as_str())
            .collect(),
    );
    let slot = format!("{wc_prefix}_slot");
    let shape = match format {
        Format::Json => "format = \"json\"\n".to_string(),
        Format::Avro => format!(
            "format = \"avro\"\n[pipelines.parity.registry]\nurl = \"{registry}\"\navro_compat = \"debezium\"\n"
        ),
    };
    let w = Walcast::start_with(|_, admin| {
        format!(
            r#"[admin]
listen = "{admin}"
[pipelines.parity]
kind = "capture"
topic_prefix = "{wc_prefix}"
{shape}[pipelines.parity.source]
port = {port}
database = "{db}"
user = "postgres"
slot = "{slot}"
publication = "{wc_prefix}_pub"
tables = [{all}]
keyless_tables = [{keyless}]
[[pipelines.parity.sinks]]
type = "kafka"
bootstrap_servers = "{bootstrap}"
json_special_numeric = "debezium"
"#,
            port = pg_port(),
            db = db.name,
            bootstrap = var("WALCAST_TEST_KAFKA_BOOTSTRAP")
        )
    });
    w.wait_state("streaming", WAIT).await;

    let outcomes = python(&[
        "write",
        "--seed",
        &seed_s,
        "--format",
        format.name(),
        "--dsn",
        &dsn,
        "--transactions",
        &transactions.to_string(),
    ]);
    eprintln!("parity {} seed {seed}: workload {outcomes}", format.name());
    let end = db.current_wal().await;
    w.wait_confirmed(
        &db,
        &slot,
        end,
        WAIT,
        "walcast did not deliver the workload",
    )
    .await;

    let dump = |prefix: &str, expect: usize| -> Value {
        // Debezium's transaction topic (Avro) is not compared: walcast
        // writes one only with `transaction_topic`.
        let pattern = format!("^{}\\.(?!transaction$).*", prefix);
        let expect = expect.to_string();
        let mut args = vec![
            "dump".to_string(),
            "--format".into(),
            format.name().into(),
            "--bootstrap".into(),
            var("WALCAST_TEST_KAFKA_BOOTSTRAP"),
            "--pattern".into(),
            pattern,
            "--expect".into(),
            expect,
        ];
        if format == Format::Avro {
            args.extend(["--registry".to_string(), registry.clone()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let text = python(&args).replace(prefix, "PREFIX");
        serde_json::from_str(&text).expect("dump JSON")
    };
    let wc = dump(&wc_prefix, 0);
    let wc_count = wc["records"].as_array().unwrap().len();
    assert!(wc_count > 0, "walcast published nothing for seed {seed}");
    let dbz = dump(&dbz_prefix, wc_count);

    let mut diffs: Vec<(String, String)> = Vec::new(); // (kind, example)
    let mut known_json = Known::new(KNOWN_JSON);
    let mut known_schema = Known::new(KNOWN_SCHEMA);
    let mut known_values = Known::new(KNOWN_VALUES);
    let null_tombstones = std::cell::RefCell::new(Vec::<String>::new());
    let groups = |side: &Value| -> BTreeMap<(String, String), Vec<Value>> {
        let mut out: BTreeMap<(String, String), Vec<Value>> = BTreeMap::new();
        for r in side["records"].as_array().unwrap() {
            out.entry((
                r["topic"].as_str().unwrap().to_string(),
                r["key"].to_string(),
            ))
            .or_default()
            .push(r.clone());
        }
        // Records without a key (key-less tables, truncates) spread over
        // partitions: in LSN order. Debezium follows a key-less delete
        // with a tombstone whose key is null too (useless to compaction,
        // which refuses null keys); walcast does not: counted apart.
        for ((topic, key), records) in out.iter_mut() {
            if key == "null" {
                let before = records.len();
                records.retain(|r| !r["value"].is_null());
                for _ in records.len()..before {
                    null_tombstones.borrow_mut().push(topic.clone());
                }
                records.sort_by_key(|r| r["value"]["source"]["lsn"].as_i64());
            }
        }
        out
    };
    let dg = groups(&dbz);
    for topic in null_tombstones.take() {
        if !known_json.forgives("tombstone of a key-less delete") {
            diffs.push(("debezium: tombstone with a null key".into(), topic));
        }
    }
    let wg = groups(&wc);
    for topic in null_tombstones.take() {
        diffs.push(("walcast: tombstone with a null key".into(), topic));
    }
    let topics = |g: &BTreeMap<(String, String), Vec<Value>>| -> Vec<String> {
        let mut t: Vec<String> = g.keys().map(|(t, _)| t.clone()).collect();
        t.dedup();
        t
    };
    let (dt, wt) = (topics(&dg), topics(&wg));
    for t in dt.iter().filter(|t| !wt.contains(t)) {
        diffs.push(("topic only in debezium".into(), t.clone()));
    }
    for t in wt.iter().filter(|t| !dt.contains(t)) {
        diffs.push(("topic only in walcast".into(), t.clone()));
    }

    // Avro: the registered schemas of each table.
    if format == Format::Avro {
        for topic in dt.iter().filter(|t| wt.contains(t)) {
            for part in ["key", "value"] {
                let first = |side: &Value| -> Value {
                    side["records"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .filter(|r| r["topic"] == topic.as_str())
                        .find_map(|r| {
                            let id = &r[format!("{part}_id")];
                            (!id.is_null()).then(|| side["schemas"][id.to_string()].clone())
                        })
                        .unwrap_or(Value::Null)
                };
                let mut out = Vec::new();
                compare_schema(
                    &format!("{}.{part}", topic.trim_start_matches("PREFIX.")),
                    &first(&dbz),
                    &first(&wc),
                    &mut out,
                );
                for line in out {
                    let line = if line.contains("default: ") && same_real(&line) {
                        format!("same real, other digits {line}")
                    } else {
                        line
                    };
                    if !known_schema.forgives(&line) {
                        diffs.push((kind_of(&line), line));
                    }
                }
            }
        }
    }

    let mut compared = 0;
    let mut keys: Vec<&(String, String)> = dg.keys().chain(wg.keys()).collect();
    keys.sort();
    keys.dedup();
    let empty = Vec::new();
    for group in keys {
        let (topic, key) = group;
        let (d, w) = (
            dg.get(group).unwrap_or(&empty),
            wg.get(group).unwrap_or(&empty),
        );
        let table = by_topic_name(topic);
        if d.len() != w.len() {
            let ops = |r: &[Value]| -> Vec<String> {
                r.iter()
                    .map(|r| r["value"]["op"].as_str().unwrap_or("tombstone").to_string())
                    .collect()
            };
            diffs.push((
                format!("{topic}: number of records per key"),
                format!(
                    "{topic} key={key}: debezium {:?}, walcast {:?}",
                    ops(d),
                    ops(w)
                ),
            ));
        }
        for (de, we) in d.iter().zip(w) {
            compared += 1;
            let mut lines = Vec::new();
            compare_values("key", Some(&de["key"]), Some(&we["key"]), &mut lines);
            let (dv, wv) = (&de["value"], &we["value"]);
            match (dv.is_null(), wv.is_null()) {
                (true, true) => {}
                (false, true) | (true, false) => {
                    lines.push(format!(
                        "value: tombstone on one side (debezium {} walcast {})",
                        dv["op"], wv["op"]
                    ));
                }
                (false, false) => {
                    compare_event(format, table, dv, wv, &mut lines);
                }
            }
            let op = dv["op"]
                .as_str()
                .or(wv["op"].as_str())
                .unwrap_or("tombstone");
            for line in lines {
                let line = explain_json(format, table, &line).unwrap_or(line);
                let forgiven = match format {
                    Format::Json => known_json.forgives(&line),
                    Format::Avro => known_values.forgives(&line),
                };
                if !forgiven {
                    diffs.push((
                        format!("{topic} op={op}: {}", kind_of(&line)),
                        format!("{topic} key={key} op={op}: {line}"),
                    ));
                }
            }
        }
    }

    // One line per kind of difference: its count and first example.
    let mut kinds: BTreeMap<String, (usize, String)> = BTreeMap::new();
    for (kind, example) in diffs {
        kinds.entry(kind).or_insert((0, example)).0 += 1;
    }
    let report = kinds
        .into_iter()
        .map(|(kind, (n, example))| {
            let example: String = if example.chars().count() > 400 {
                example.chars().take(400).chain("…".chars()).collect()
            } else {
                example
            };
            format!("{n}× {kind}\n    e.g. {example}")
        })
        .collect();
    drop(w);
    (compared, report)
}

/// The kinds of JSON difference KNOWN_JSON lists by what the values are,
/// not by their path: the line, relabelled.
fn explain_json(format: Format, table: Option<&Table>, line: &str) -> Option<String> {
    if format != Format::Json {
        return None;
    }
    let (path, values) = line.split_once(": debezium=")?;
    let (_, w) = values.split_once(" walcast=")?;
    let column = path.split_once('.').map(|(_, c)| c)?;
    let ty = table?.types.get(column)?.as_str();
    let marker = |label: &str| Some(format!("{label} {line}"));
    // Two numbers that are the same real.
    if ty == "real" && same_real(line) {
        return marker("same real, other digits");
    }
    match (ty, w) {
        ("date", "2147483647" | "-2147483648") => return marker("infinite date"),
        ("timestamp", "9223372036854775807" | "-9223372036854775808") => {
            return marker("infinite timestamp")
        }
        _ => {}
    }
    // A bit string column: Debezium's base64 against walcast's digits.
    if ty.starts_with("bit") || ty.starts_with("varbit") {
        let digits = w.trim_matches('"');
        if digits.bytes().all(|b| b == b'0' || b == b'1') {
            return Some(format!("bit string {line}"));
        }
    }
    None
}

/// Whether a difference line's two values are numbers that are the same
/// `real` (f32) written with different digits.
fn same_real(line: &str) -> bool {
    let Some((_, values)) = line.split_once(": debezium=") else {
        return false;
    };
    let Some((d, w)) = values.split_once(" walcast=") else {
        return false;
    };
    match (d.parse::<f64>(), w.parse::<f64>()) {
        (Ok(d), Ok(w)) => d != w && (d as f32) == (w as f32),
        _ => false,
    }
}

/// A difference line without its values: `after.col: debezium=1 walcast=2`
/// is of kind `after.col`.
fn kind_of(line: &str) -> String {
    line.split(": ").next().unwrap_or(line).to_string()
}

/// Compares two events (values, not tombstones) field by field.
fn compare_event(
    format: Format,
    table: Option<&Table>,
    dv: &Value,
    wv: &Value,
    out: &mut Vec<String>,
) {
    compare_values("op", dv.get("op"), wv.get("op"), out);
    compare_values("after", dv.get("after"), wv.get("after"), out);
    // A key-only before image (a delete under REPLICA IDENTITY DEFAULT or
    // USING INDEX): its non-key columns are KNOWN_JSON's where walcast's
    // is null.
    let key_only = dv["op"] == "d" && table.is_some_and(|t| !t.identity_full && !t.keyless);
    let mut before = Vec::new();
    compare_values("before", dv.get("before"), wv.get("before"), &mut before);
    for line in before {
        if key_only && format == Format::Json && line.ends_with("walcast=null") {
            out.push(format!("key-only {line}"));
        } else {
            out.push(line);
        }
    }
    match format {
        Format::Json => {
            for f in SOURCE_FIELDS {
                compare_values(
                    &format!("source.{f}"),
                    dv["source"].get(*f),
                    wv["source"].get(*f),
                    out,
                );
            }
            // The other fields must be present on both sides (values differ
            // by nature: versions, processing times), one-sided ones apart.
            for (what, d, w, only_d, only_w) in [
                ("", dv, wv, &[][..], &[][..]),
                (
                    "source.",
                    &dv["source"],
                    &wv["source"],
                    ONLY_DEBEZIUM_SOURCE,
                    ONLY_WALCAST_SOURCE,
                ),
            ] {
                let (Some(d), Some(w)) = (d.as_object(), w.as_object()) else {
                    out.push(format!("{what}: not an object on both sides"));
                    continue;
                };
                for f in d
                    .keys()
                    .filter(|f| !w.contains_key(*f) && !only_d.contains(&f.as_str()))
                {
                    out.push(format!("{what}{f}: only in debezium"));
                }
                for f in w
                    .keys()
                    .filter(|f| !d.contains_key(*f) && !only_w.contains(&f.as_str()))
                {
                    out.push(format!("{what}{f}: only in walcast"));
                }
            }
        }
        Format::Avro => {
            compare_values(
                "transaction",
                dv.get("transaction"),
                wv.get("transaction"),
                out,
            );
            // Every field of Debezium's source record but the version and
            // the processing times of the envelope.
            let d = dv["source"].as_object().cloned().unwrap_or_default();
            let w = wv["source"].as_object().cloned().unwrap_or_default();
            let mut fields: Vec<&String> = d.keys().chain(w.keys()).collect();
            fields.sort();
            fields.dedup();
            for f in fields.into_iter().filter(|f| *f != "version") {
                compare_values(&format!("source.{f}"), d.get(f), w.get(f), out);
            }
            let (d, w) = (dv.as_object().unwrap(), wv.as_object().unwrap());
            for f in d.keys().filter(|f| !w.contains_key(*f)) {
                out.push(format!("{f}: only in debezium"));
            }
            for f in w.keys().filter(|f| !d.contains_key(*f)) {
                out.push(format!("{f}: only in walcast"));
            }
        }
    }
}
