//! pgoutput decoding and text-to-value conversion throughput, one core: the
//! two steps between a WAL message and a [`walcast_sdk::Value`] row.
//!
//! The frame is an `Insert` of the benchmark table's row (bigint key,
//! bigint, text, numeric(12,2), char(3), text, two timestamptz), built as
//! pgoutput sends it. `tests/bench/run` runs it (`cargo bench -p
//! walcast-postgres --bench decode`). Throughput is in elements (events)
//! per second; criterion runs on one thread, so that is events/s per core.
//!
//! The `snapshot` group follows one row of the initial snapshot through the
//! same stages on one core: a `COPY ... TO STDOUT` text line split into
//! fields, converted, made an event, and written as the file sink's JSON
//! line (the stages `tests/bench/snapshot` times end to end).

use walcast_postgres::{convert, pgoutput};

use bytes::{BufMut, Bytes, BytesMut};
use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use walcast_sdk::PgType;

const TEXTS: [&str; 8] = [
    "123456789",
    "42",
    "label-000123456789",
    "1234.56",
    "EUR",
    "a note of some length, as rows in the benchmark table have",
    "2026-11-23 12:34:56.789012+00",
    "2026-11-23 12:35:01.000001+00",
];

fn types() -> Vec<PgType> {
    vec![
        PgType::Int8,
        PgType::Int8,
        PgType::Text,
        PgType::Numeric {
            precision: Some(12),
            scale: Some(2),
        },
        PgType::Char { length: Some(3) },
        PgType::Text,
        PgType::TimestampTz,
        PgType::TimestampTz,
    ]
}

/// `I`, relation id, `N`, then the tuple: column count and each column as
/// `t`, length, text.
fn insert_frame() -> Bytes {
    let mut b = BytesMut::new();
    b.put_u8(b'I');
    b.put_u32(16_400);
    b.put_u8(b'N');
    b.put_u16(TEXTS.len() as u16);
    for t in TEXTS {
        b.put_u8(b't');
        b.put_u32(t.len() as u32);
        b.put_slice(t.as_bytes());
    }
    b.freeze()
}

fn row(types: &[PgType], message: &pgoutput::Message) -> Vec<walcast_sdk::Value> {
    let pgoutput::Message::Insert(insert) = message else {
        panic!("an insert: {message:?}");
    };
    insert
        .new
        .iter()
        .zip(types)
        .map(|(v, ty)| match v {
            pgoutput::TupleValue::Text(t) => {
                convert::from_text(ty, std::str::from_utf8(t).unwrap()).unwrap()
            }
            other => panic!("text values only: {other:?}"),
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let frame = insert_frame();
    let types = types();
    let decoded = pgoutput::decode(frame.clone()).expect("the frame decodes");
    assert_eq!(row(&types, &decoded).len(), 8);

    let mut g = c.benchmark_group("pgoutput");
    g.throughput(Throughput::Elements(1));
    g.bench_function("decode_insert_8_columns", |b| {
        b.iter(|| pgoutput::decode(black_box(frame.clone())).unwrap())
    });
    g.finish();

    let mut g = c.benchmark_group("convert");
    g.throughput(Throughput::Elements(1));
    g.bench_function("row_from_text_8_columns", |b| {
        b.iter(|| {
            TEXTS
                .iter()
                .zip(&types)
                .map(|(t, ty)| convert::from_text(ty, black_box(t)).unwrap())
                .collect::<Vec<_>>()
        })
    });
    g.bench_function("decode_and_convert_insert", |b| {
        b.iter(|| row(&types, &pgoutput::decode(black_box(frame.clone())).unwrap()))
    });
    g.finish();
}

fn table() -> std::sync::Arc<walcast_sdk::TableSchema> {
    let names = [
        "id",
        "account",
        "label",
        "amount",
        "currency",
        "note",
        "created_at",
        "updated_at",
    ];
    std::sync::Arc::new(walcast_sdk::TableSchema {
        relation_id: 16_400,
        schema: "public".into(),
        name: "snap_rows".into(),
        columns: names
            .iter()
            .zip(types())
            .enumerate()
            .map(|(i, (n, ty))| walcast_sdk::Column {
                name: n.to_string(),
                pg_type: ty,
                type_oid: 0,
                type_modifier: -1,
                nullable: i != 0,
                key: i == 0,
            })
            .collect(),
        replica_identity: walcast_sdk::ReplicaIdentity::Default,
        version: 0,
    })
}

fn snapshot_event(
    table: &std::sync::Arc<walcast_sdk::TableSchema>,
    line: &[u8],
) -> walcast_sdk::ChangeEvent {
    let fields = walcast_postgres::snapshot::copy_fields(line).unwrap();
    let after = fields
        .iter()
        .zip(&table.columns)
        .map(|(f, c)| match f {
            Some(t) => convert::from_text(&c.pg_type, t).unwrap(),
            None => walcast_sdk::Value::Null,
        })
        .collect();
    walcast_sdk::ChangeEvent {
        op: walcast_sdk::Op::Read,
        table: std::sync::Arc::clone(table),
        before: None,
        after: Some(after),
        source: walcast_sdk::SourceInfo {
            name: "snapbench".into(),
            db: "walcast_bench_snap".into(),
            lsn: walcast_sdk::Lsn(0x16B3748),
            commit_lsn: walcast_sdk::Lsn(0x16B3748),
            tx_id: None,
            ts_ms: 1_764_000_000_000,
            ts_us: 1_764_000_000_000_000,
            snapshot: walcast_sdk::SnapshotMarker::True,
        },
        transaction: None,
        ts_ms: 1_764_000_000_000,
    }
}

fn bench_snapshot(c: &mut Criterion) {
    let line = TEXTS.join("\t").into_bytes();
    let table = table();
    let encoder = walcast_sdk::JsonEncoder::new(Default::default());
    let mut g = c.benchmark_group("snapshot");
    g.throughput(Throughput::Elements(1));
    g.bench_function("copy_line_fields", |b| {
        b.iter(|| {
            walcast_postgres::snapshot::copy_fields(black_box(&line))
                .unwrap()
                .len()
        })
    });
    g.bench_function("copy_line_to_event", |b| {
        b.iter(|| snapshot_event(&table, black_box(&line)))
    });
    let mut out = Vec::with_capacity(1 << 20);
    g.bench_function("copy_line_to_json_line", |b| {
        b.iter(|| {
            out.clear();
            let e = snapshot_event(&table, black_box(&line));
            encoder.write_key_value(&mut out, &e);
            out.push(b'\n');
            out.len()
        })
    });
    g.finish();
}

criterion_group!(benches, bench, bench_snapshot);
criterion_main!(benches);
