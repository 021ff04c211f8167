//! Random events whose columns cover every [`PgType`] (values of the kind
//! the capture makes for that type, and NULL, unavailable TOAST and arrays)
//! must encode to the same bytes with the byte writer and with the
//! serde-based reference, with and without the per-table cache, under both
//! `special_numeric` modes and any placeholder.

use std::sync::Arc;

use proptest::prelude::*;

use super::reference;
use super::writer::{self, TableCache};
use super::{JsonOptions, SpecialNumeric};
use crate::event::{ChangeEvent, Op, SnapshotMarker, SourceInfo, TransactionInfo};
use crate::table::{Column, PgType, ReplicaIdentity, TableSchema};
use crate::value::{
    Numeric, Value, DATE_INFINITY, DATE_NEG_INFINITY, TIMESTAMP_INFINITY, TIMESTAMP_NEG_INFINITY,
};
use crate::Lsn;

/// Text with what JSON must escape (quotes, backslashes, every control
/// byte), DEL, multi-byte characters, and long runs for the 16-byte scan.
fn text() -> BoxedStrategy<String> {
    prop_oneof![
        "[a-zA-Z0-9 ]{0,40}",
        any::<String>(),
        proptest::collection::vec(
            prop_oneof![
                (0u32..0x80).prop_map(|c| char::from_u32(c).unwrap()),
                Just('"'),
                Just('\\'),
                Just('é'),
                Just('\u{2028}'),
                Just('😀'),
            ],
            0..70
        )
        .prop_map(|v| v.into_iter().collect()),
    ]
    .boxed()
}

fn float64() -> BoxedStrategy<f64> {
    prop_oneof![
        any::<f64>(),
        Just(f64::NAN),
        Just(f64::INFINITY),
        Just(f64::NEG_INFINITY),
        Just(0.0),
        Just(-0.0),
        Just(f64::MIN_POSITIVE / 3.0),
        Just(1e21),
        Just(1e-7),
        (-1_000_000i64..1_000_000).prop_map(|i| i as f64 / 100.0),
    ]
    .boxed()
}

fn float32() -> BoxedStrategy<f32> {
    prop_oneof![
        any::<f32>(),
        Just(f32::NAN),
        Just(f32::INFINITY),
        Just(f32::NEG_INFINITY),
        Just(0.1f32),
        (-100_000i32..100_000).prop_map(|i| i as f32 / 10.0),
    ]
    .boxed()
}

fn numeric() -> BoxedStrategy<Numeric> {
    prop_oneof![
        6 => (any::<i64>(), 0u32..6).prop_map(|(i, scale)| {
            let s = i.unsigned_abs().to_string();
            let s = if scale as usize >= s.len() {
                format!("0.{s:0>width$}", width = scale as usize)
            } else if scale == 0 {
                s
            } else {
                let (a, b) = s.split_at(s.len() - scale as usize);
                format!("{a}.{b}")
            };
            Numeric::Finite(if i < 0 { format!("-{s}") } else { s })
        }),
        1 => Just(Numeric::NaN),
        1 => Just(Numeric::PositiveInfinity),
        1 => Just(Numeric::NegativeInfinity),
    ]
    .boxed()
}

const DAY: i64 = 86_400_000_000;

fn timestamp() -> BoxedStrategy<i64> {
    prop_oneof![
        // Postgres's range (4713 BC to 294276 AD) and then some.
        (-211_813_488_000_000_000i64..i64::MAX).boxed(),
        (0i64..4_102_444_800_000_000).boxed(),
        any::<i64>().boxed(),
        Just(TIMESTAMP_INFINITY).boxed(),
        Just(TIMESTAMP_NEG_INFINITY).boxed(),
        Just(-62_167_219_200_000_000i64 - 1).boxed(), // just before year 0
    ]
    .boxed()
}

/// A value of the kind the capture makes for `ty`.
fn typed(ty: &PgType) -> BoxedStrategy<Value> {
    match ty {
        PgType::Bool => any::<bool>().prop_map(Value::Bool).boxed(),
        PgType::Int2 => any::<i16>().prop_map(Value::Int16).boxed(),
        PgType::Int4 => any::<i32>().prop_map(Value::Int32).boxed(),
        PgType::Int8 => any::<i64>().prop_map(Value::Int64).boxed(),
        PgType::Float4 => float32().prop_map(Value::Float32).boxed(),
        PgType::Float8 => float64().prop_map(Value::Float64).boxed(),
        PgType::Numeric { .. } | PgType::Money => numeric().prop_map(Value::Numeric).boxed(),
        PgType::Text
        | PgType::Varchar { .. }
        | PgType::Char { .. }
        | PgType::Name
        | PgType::Unknown { .. } => text().prop_map(Value::Text).boxed(),
        PgType::Bytea => proptest::collection::vec(any::<u8>(), 0..40)
            .prop_map(Value::Bytes)
            .boxed(),
        PgType::Uuid => any::<[u8; 16]>().prop_map(Value::Uuid).boxed(),
        PgType::Json | PgType::Jsonb => text().prop_map(Value::Json).boxed(),
        PgType::Date => prop_oneof![
            any::<i32>(),
            -2_451_545i32..106_000_000,
            Just(DATE_INFINITY),
            Just(DATE_NEG_INFINITY)
        ]
        .prop_map(Value::Date)
        .boxed(),
        PgType::Time => (0..=DAY).prop_map(Value::Time).boxed(),
        PgType::TimeTz => (
            prop_oneof![
                0..=DAY,
                Just(0),
                Just(1),
                Just(DAY - 1),
                (0..86_400i64).prop_map(|s| s * 1_000_000)
            ],
            -57_599i32..=57_599,
        )
            .prop_map(|(micros, offset_seconds)| Value::TimeTz {
                micros,
                offset_seconds,
            })
            .boxed(),
        PgType::Timestamp => timestamp().prop_map(Value::Timestamp).boxed(),
        PgType::TimestampTz => timestamp().prop_map(Value::TimestampTz).boxed(),
        // Intervals whose microsecond total fits in an i64 (beyond that
        // both writers overflow alike).
        PgType::Interval => (
            -1_000_000i32..1_000_000,
            -10_000_000i32..10_000_000,
            -(1i64 << 60)..(1i64 << 60),
        )
            .prop_map(|(months, days, micros)| Value::Interval {
                months,
                days,
                micros,
            })
            .boxed(),
        PgType::Inet | PgType::Cidr | PgType::MacAddr | PgType::MacAddr8 => {
            text().prop_map(Value::Network).boxed()
        }
        PgType::Enum { .. } => text().prop_map(Value::Enum).boxed(),
        PgType::Array { element } => proptest::collection::vec(
            prop_oneof![4 => typed(element), 1 => Just(Value::Null)],
            0..5,
        )
        .prop_map(Value::Array)
        .boxed(),
    }
}

fn scalar_types() -> Vec<PgType> {
    vec![
        PgType::Bool,
        PgType::Int2,
        PgType::Int4,
        PgType::Int8,
        PgType::Float4,
        PgType::Float8,
        PgType::Numeric {
            precision: Some(12),
            scale: Some(2),
        },
        PgType::Numeric {
            precision: None,
            scale: None,
        },
        PgType::Money,
        PgType::Text,
        PgType::Varchar {
            max_length: Some(20),
        },
        PgType::Char { length: Some(3) },
        PgType::Name,
        PgType::Bytea,
        PgType::Uuid,
        PgType::Json,
        PgType::Jsonb,
        PgType::Date,
        PgType::Time,
        PgType::TimeTz,
        PgType::Timestamp,
        PgType::TimestampTz,
        PgType::Interval,
        PgType::Inet,
        PgType::Cidr,
        PgType::MacAddr,
        PgType::MacAddr8,
        PgType::Enum {
            type_name: "mood".into(),
            labels: vec!["ok".into()],
        },
        PgType::Unknown {
            type_name: "point".into(),
        },
    ]
}

/// Every type, arrays of every scalar type, and arrays of arrays.
fn every_type() -> Vec<PgType> {
    let scalars = scalar_types();
    let mut all = scalars.clone();
    for s in &scalars {
        all.push(PgType::Array {
            element: Box::new(s.clone()),
        });
    }
    all.push(PgType::Array {
        element: Box::new(PgType::Array {
            element: Box::new(PgType::Int4),
        }),
    });
    all
}

fn pg_type() -> BoxedStrategy<PgType> {
    proptest::sample::select(every_type()).boxed()
}

/// A column's value: mostly of its type, sometimes NULL or unavailable.
fn cell(ty: &PgType) -> BoxedStrategy<Value> {
    prop_oneof![
        8 => typed(ty),
        1 => Just(Value::Null),
        1 => Just(Value::Unavailable),
    ]
    .boxed()
}

fn table() -> BoxedStrategy<Arc<TableSchema>> {
    (
        proptest::collection::vec((pg_type(), text(), any::<bool>()), 1..12),
        text(),
        text(),
        any::<u32>(),
        any::<u32>(),
    )
        .prop_map(|(cols, schema, name, relation_id, version)| {
            let columns = cols
                .into_iter()
                .enumerate()
                // Postgres column names are unique: number them (after the
                // last `#`, so that no two can meet).
                .map(|(i, (pg_type, name, key))| Column {
                    key_position: None,
                    default: None,
                    name: format!("{name}#{i}"),
                    pg_type,
                    type_oid: 0,
                    type_modifier: -1,
                    nullable: !key,
                    key,
                })
                .collect();
            Arc::new(TableSchema {
                relation_id,
                schema,
                name,
                columns,
                replica_identity: ReplicaIdentity::Default,
                version,
            })
        })
        .boxed()
}

fn row(table: &TableSchema) -> BoxedStrategy<Vec<Value>> {
    table
        .columns
        .iter()
        .map(|c| cell(&c.pg_type))
        .collect::<Vec<_>>()
        .boxed()
}

fn event() -> BoxedStrategy<ChangeEvent> {
    table()
        .prop_flat_map(|t| {
            (
                Just(t.clone()),
                proptest::option::of(row(&t)),
                proptest::option::of(row(&t)),
                proptest::sample::select(vec![
                    Op::Create,
                    Op::Update,
                    Op::Delete,
                    Op::Read,
                    Op::Truncate,
                ]),
                (
                    text(),
                    text(),
                    any::<u64>(),
                    any::<u64>(),
                    any::<Option<u32>>(),
                ),
                (any::<i64>(), any::<i64>(), any::<i64>()),
                proptest::sample::select(vec![
                    SnapshotMarker::False,
                    SnapshotMarker::True,
                    SnapshotMarker::First,
                    SnapshotMarker::Last,
                    SnapshotMarker::Incremental,
                ]),
                proptest::option::of((text(), any::<u64>(), any::<u64>())),
            )
        })
        .prop_map(
            |(
                table,
                before,
                after,
                op,
                (name, db, lsn, commit, tx_id),
                (ts_ms, ts_us, ets),
                snapshot,
                tx,
            )| {
                ChangeEvent {
                    op,
                    table,
                    before,
                    after,
                    source: SourceInfo {
                        name,
                        db,
                        lsn: Lsn(lsn),
                        commit_lsn: Lsn(commit),
                        tx_id,
                        ts_ms,
                        ts_us,
                        snapshot,
                    },
                    transaction: tx.map(|(id, total_order, data_collection_order)| {
                        TransactionInfo {
                            id,
                            total_order,
                            data_collection_order,
                        }
                    }),
                    ts_ms: ets,
                }
            },
        )
        .boxed()
}

fn options() -> BoxedStrategy<JsonOptions> {
    (
        prop_oneof![
            Just(super::DEFAULT_UNAVAILABLE_PLACEHOLDER.to_string()),
            text()
        ],
        prop_oneof![
            Just(SpecialNumeric::Postgres),
            Just(SpecialNumeric::Debezium)
        ],
    )
        .prop_map(|(unavailable_placeholder, special_numeric)| JsonOptions {
            unavailable_placeholder,
            special_numeric,
        })
        .boxed()
}

fn show(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn events_encode_as_the_serde_writer_did(event in event(), opts in options()) {
        let expected = reference::envelope_bytes(&event, &opts);
        prop_assert_eq!(show(&super::envelope_bytes(&event, &opts)), show(&expected));
        let expected_key = reference::key_bytes(&event, &opts);
        prop_assert_eq!(
            super::key_bytes(&event, &opts).map(|k| show(&k)),
            expected_key.as_deref().map(show)
        );
        // Twice through one cache: the second time from the prepared shape.
        let cache = TableCache::default();
        for _ in 0..2 {
            let p = cache.get(&event.table);
            prop_assert_eq!(show(&writer::prepared_envelope(&p, &event, &opts)), show(&expected));
            prop_assert_eq!(
                writer::prepared_key(&p, &event, &opts).map(|k| show(&k)),
                expected_key.as_deref().map(show)
            );
        }
    }

    #[test]
    fn values_of_every_kind_encode_as_the_tree_did(
        v in pg_type().prop_flat_map(|t| cell(&t)),
        opts in options(),
    ) {
        let tree = reference::value(&v, &opts);
        prop_assert_eq!(&super::value(&v, &opts), &tree);
        let mut out = Vec::new();
        super::write_value(&mut out, &v, &opts);
        prop_assert_eq!(show(&out), serde_json::to_string(&tree).unwrap());
    }

    #[test]
    fn row_text_is_the_trees_text(event in event(), opts in options(), skip in any::<bool>()) {
        let Some(values) = event.after.as_deref() else { return Ok(()) };
        let mut tree = super::row(&event.table, values, &opts);
        if skip {
            let serde_json::Value::Object(m) = &mut tree else { unreachable!() };
            for col in crate::toast::unavailable_columns(&event) {
                m.remove(&col);
            }
        }
        prop_assert_eq!(
            super::row_text(&event.table, values, &opts, skip),
            tree.to_string()
        );
    }

    #[test]
    fn text_helpers_equal_their_format_versions(
        micros in timestamp(),
        tod in 0..=DAY,
        offset in -57_599i32..=57_599,
        u in any::<[u8; 16]>(),
    ) {
        prop_assert_eq!(super::timestamp_utc(micros), reference::timestamp_utc(micros));
        prop_assert_eq!(super::zoned_time(tod, offset), reference::zoned_time(tod, offset));
        prop_assert_eq!(super::uuid_string(&u), reference::uuid_string(&u));
    }
}

/// The cache rebuilds a shape that reuses a relation id and version but
/// differs (a column renamed): it never writes another shape's names.
#[test]
fn a_colliding_shape_is_not_served_from_the_cache() {
    let mk = |col: &str| {
        Arc::new(TableSchema {
            relation_id: 7,
            schema: "public".into(),
            name: "t".into(),
            columns: vec![Column {
                key_position: None,
                default: None,
                name: col.into(),
                pg_type: PgType::Int4,
                type_oid: 23,
                type_modifier: -1,
                nullable: false,
                key: true,
            }],
            replica_identity: ReplicaIdentity::Default,
            version: 1,
        })
    };
    let event = |table| ChangeEvent {
        op: Op::Create,
        table,
        before: None,
        after: Some(vec![Value::Int32(1)]),
        source: SourceInfo {
            name: "p".into(),
            db: "d".into(),
            lsn: Lsn(1),
            commit_lsn: Lsn(2),
            tx_id: None,
            ts_ms: 0,
            ts_us: 0,
            snapshot: SnapshotMarker::False,
        },
        transaction: None,
        ts_ms: 0,
    };
    let cache = TableCache::default();
    let opts = JsonOptions::default();
    let a = event(mk("a"));
    let b = event(mk("b"));
    let key =
        |e: &ChangeEvent| show(&writer::prepared_key(&cache.get(&e.table), e, &opts).unwrap());
    assert_eq!(key(&a), r#"{"a":1}"#);
    assert_eq!(key(&b), r#"{"b":1}"#);
    assert_eq!(key(&a), r#"{"a":1}"#);
    // An equal shape in another Arc is served from the cache.
    let a2 = event(mk("a"));
    assert!(Arc::ptr_eq(&cache.get(&a.table), &cache.get(&a2.table)));
}
