//! Avro encoding throughput, one core: the key and the Debezium envelope of
//! the benchmark table's row (bigint key, bigint, text, numeric(12,2),
//! char(3), text, two timestamptz), as tests/bench workload (a) writes it.
//! Run: `cargo bench -p walcast-schemas --bench avro_encode`. Throughput is
//! in elements (events) per second on one thread, i.e. per core.

use std::sync::Arc;

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use walcast_schemas::{
    codec, default_topic, mapping, wire, AvroEncoder, EmbeddedRegistry, MappingOptions,
    SubjectStrategy,
};
use walcast_sdk::{
    ChangeEvent, Column, EventEncoder, Lsn, Numeric, Op, PgType, ReplicaIdentity, SourceInfo,
    TableSchema, TransactionInfo, Value,
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

fn event(i: i64, full: bool) -> ChangeEvent {
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

fn bench(c: &mut Criterion) {
    let opts = MappingOptions::default();
    let insert = event(123_456, false);
    let update = event(123_456, true);
    let schemas = mapping::derive(&insert.table, "bench", &opts).unwrap();

    let mut g = c.benchmark_group("avro");
    g.throughput(Throughput::Elements(1));
    g.bench_function("codec_value_insert", |b| {
        b.iter(|| codec::encode_value(black_box(&insert), &schemas, &opts).unwrap())
    });
    g.bench_function("codec_key_value_framed_insert", |b| {
        b.iter(|| {
            let k = codec::encode_key(black_box(&insert), &schemas, &opts)
                .unwrap()
                .unwrap();
            let v = codec::encode_value(black_box(&insert), &schemas, &opts).unwrap();
            (wire::frame(1, &k), wire::frame(2, &v))
        })
    });
    // The Kafka sink's path: AvroEncoder with its schema-id cache warm
    // (an in-process registry; the hot path makes no registry call).
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let enc = AvroEncoder::new(
        Arc::new(EmbeddedRegistry::new()),
        opts.clone(),
        SubjectStrategy::TopicName,
        Arc::new(default_topic),
    );
    rt.block_on(enc.encode(&insert)).unwrap();
    g.bench_function("encoder_key_value_insert", |b| {
        b.iter(|| rt.block_on(enc.encode(black_box(&insert))).unwrap())
    });
    rt.block_on(enc.encode(&update)).unwrap();
    g.bench_function("encoder_key_value_update_full", |b| {
        b.iter(|| rt.block_on(enc.encode(black_box(&update))).unwrap())
    });
    g.bench_function("derive_schemas", |b| {
        b.iter(|| mapping::derive(black_box(&insert.table), "bench", &opts).unwrap())
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
