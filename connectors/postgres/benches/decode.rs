//! pgoutput decoding and text-to-value conversion throughput, one core: the
//! two steps between a WAL message and a [`walcast_sdk::Value`] row.
//!
//! The frame is an `Insert` of the benchmark table's row (bigint key,
//! bigint, text, numeric(12,2), char(3), text, two timestamptz), built as
//! pgoutput sends it. `tests/bench/run` runs it (`cargo bench -p
//! walcast-postgres --bench decode`). Throughput is in elements (events)
//! per second; criterion runs on one thread, so that is events/s per core.

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

criterion_group!(benches, bench);
criterion_main!(benches);
