//! JSON (Debezium envelope) encoding throughput, one core.
//!
//! The event is the benchmark table's row: bigint key, bigint, text,
//! numeric(12,2), char(3), text, two timestamptz — the same shape as
//! tests/bench workload (a). Run: `cargo bench -p walcast-sdk --bench json_encode`.
//! Throughput is reported in elements (events) per second; criterion runs
//! on one thread, so that is events/s per core.
//!
//! `envelope_*` build the tree (`envelope_bytes_insert` serialises it);
//! `envelope_bytes_fn_*` are the tree-less `json::envelope_bytes`;
//! `encoder_*` are what the Kafka sink runs per event (key and envelope,
//! through the async encoder trait); `value_timestamptz` is one column as the
//! Redis and OpenSearch sinks render it.
//!
//! `WALCAST_BENCH_CLOCK=cpu` measures the bench thread's CPU time instead
//! of wall time: on a machine shared with other builds, wall time mostly
//! measures how long the thread waited for a core, while CPU time stays
//! comparable between runs (caches are still shared, so it is not exact).

use std::sync::Arc;

use criterion::measurement::{Measurement, ValueFormatter, WallTime};
use criterion::{black_box, criterion_main, Criterion, Throughput};
use walcast_sdk::json::{self, JsonOptions};
use walcast_sdk::{
    ChangeEvent, Column, EventEncoder, JsonEncoder, Lsn, Numeric, Op, PgType, ReplicaIdentity,
    SourceInfo, TableSchema, TransactionInfo, Value,
};

fn col(name: &str, pg_type: PgType, oid: u32, key: bool) -> Column {
    Column {
        key_position: None,
        default: None,
        name: name.into(),
        pg_type,
        type_oid: oid,
        type_modifier: -1,
        nullable: !key,
        key,
    }
}

fn table(identity: ReplicaIdentity) -> Arc<TableSchema> {
    Arc::new(TableSchema {
        relation_id: 16400,
        schema: "public".into(),
        name: "bench_rows".into(),
        columns: vec![
            col("id", PgType::Int8, 20, true),
            col("account", PgType::Int8, 20, false),
            col("label", PgType::Text, 25, false),
            col(
                "amount",
                PgType::Numeric {
                    precision: Some(12),
                    scale: Some(2),
                },
                1700,
                false,
            ),
            col("currency", PgType::Char { length: Some(3) }, 1042, false),
            col("note", PgType::Text, 25, false),
            col("created_at", PgType::TimestampTz, 1184, false),
            col("updated_at", PgType::TimestampTz, 1184, false),
        ],
        replica_identity: identity,
        version: 1,
    })
}

fn row(i: i64) -> Vec<Value> {
    vec![
        Value::Int64(i),
        Value::Int64(i % 9973),
        Value::Text(format!("label-{i}")),
        Value::Numeric(Numeric::Finite(format!("{}.{:02}", i % 100_000, i % 100))),
        Value::Text("EUR".into()),
        Value::Text("some free text that a real row might carry, about sixty bytes".into()),
        Value::TimestampTz(1_717_000_000_000_000 + i),
        Value::TimestampTz(1_717_000_000_500_000 + i),
    ]
}

/// An insert, or with `full` an update carrying the whole old row
/// (REPLICA IDENTITY FULL).
pub fn event(i: i64, full: bool) -> ChangeEvent {
    let lsn = 0x1_0000_0000 + i as u64 * 120;
    ChangeEvent {
        op: if full { Op::Update } else { Op::Create },
        table: table(if full {
            ReplicaIdentity::Full
        } else {
            ReplicaIdentity::Default
        }),
        before: full.then(|| row(i - 1)),
        after: Some(row(i)),
        source: SourceInfo {
            name: "bench".into(),
            db: "walcast_bench".into(),
            lsn: Lsn(lsn),
            commit_lsn: Lsn(lsn + 4096),
            tx_id: Some(7_654_321),
            ts_ms: 1_717_000_000_123,
            ts_us: 1_717_000_000_123_456,
            snapshot: walcast_sdk::SnapshotMarker::False,
        },
        transaction: Some(TransactionInfo {
            id: format!("7654321:{}", lsn + 4096),
            total_order: 17,
            data_collection_order: 17,
        }),
        ts_ms: 1_717_000_000_200,
    }
}

/// Polls a future that never waits (the JSON encoder's) to its end.
fn poll_once<F: std::future::Future>(f: F) -> F::Output {
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match std::pin::pin!(f).poll(&mut cx) {
        std::task::Poll::Ready(v) => v,
        std::task::Poll::Pending => panic!("the JSON encoder does not wait"),
    }
}

/// The bench thread's CPU time (`CLOCK_THREAD_CPUTIME_ID`).
struct ThreadCpu;

fn thread_cpu_ns() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

impl Measurement for ThreadCpu {
    type Intermediate = u64;
    type Value = u64;
    fn start(&self) -> u64 {
        thread_cpu_ns()
    }
    fn end(&self, start: u64) -> u64 {
        thread_cpu_ns() - start
    }
    fn add(&self, a: &u64, b: &u64) -> u64 {
        a + b
    }
    fn zero(&self) -> u64 {
        0
    }
    fn to_f64(&self, v: &u64) -> f64 {
        *v as f64
    }
    fn formatter(&self) -> &dyn ValueFormatter {
        &CpuFormatter
    }
}

/// Nanoseconds of CPU time, and elements per CPU second.
struct CpuFormatter;

impl ValueFormatter for CpuFormatter {
    fn scale_values(&self, _typical: f64, _values: &mut [f64]) -> &'static str {
        "ns (cpu)"
    }
    fn scale_throughputs(&self, _typical: f64, t: &Throughput, values: &mut [f64]) -> &'static str {
        let per = match t {
            Throughput::Elements(n) | Throughput::Bytes(n) | Throughput::BytesDecimal(n) => *n,
        } as f64;
        for v in values {
            *v = per * 1e9 / *v / 1e3;
        }
        "Kelem/cpu-s"
    }
    fn scale_for_machines(&self, _values: &mut [f64]) -> &'static str {
        "ns"
    }
}

fn bench<M: Measurement>(c: &mut Criterion<M>) {
    let mut g = c.benchmark_group("json");
    g.throughput(Throughput::Elements(1));
    let opts = JsonOptions::default();
    let insert = event(123_456, false);
    let update = event(123_456, true);
    g.bench_function("envelope_value_insert", |b| {
        b.iter(|| json::envelope(black_box(&insert), &opts))
    });
    g.bench_function("envelope_bytes_insert", |b| {
        b.iter(|| serde_json::to_vec(&json::envelope(black_box(&insert), &opts)).unwrap())
    });
    g.bench_function("envelope_bytes_fn_insert", |b| {
        b.iter(|| json::envelope_bytes(black_box(&insert), &opts))
    });
    g.bench_function("envelope_bytes_fn_update_full", |b| {
        b.iter(|| json::envelope_bytes(black_box(&update), &opts))
    });
    // What the Redis and OpenSearch sinks call per column.
    let tstz = Value::TimestampTz(1_717_000_000_123_456);
    g.bench_function("value_timestamptz", |b| {
        b.iter(|| json::value(black_box(&tstz), &opts))
    });
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let enc = JsonEncoder::default();
    g.bench_function("encoder_key_value_insert", |b| {
        b.iter(|| rt.block_on(enc.encode(black_box(&insert))).unwrap())
    });
    g.bench_function("encoder_key_value_update_full", |b| {
        b.iter(|| rt.block_on(enc.encode(black_box(&update))).unwrap())
    });
    // The encoder without a runtime around each call: the sink awaits it
    // inside its task, which costs a poll, not a `block_on`.
    g.bench_function("encoder_polled_insert", |b| {
        b.iter(|| poll_once(enc.encode(black_box(&insert))).unwrap())
    });
    g.finish();
}

fn benches() {
    if std::env::var("WALCAST_BENCH_CLOCK").as_deref() == Ok("cpu") {
        let mut c = Criterion::default()
            .with_measurement(ThreadCpu)
            .configure_from_args();
        bench(&mut c);
    } else {
        let mut c = Criterion::<WallTime>::default().configure_from_args();
        bench(&mut c);
    }
}

criterion_main!(benches);
