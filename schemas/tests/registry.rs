//! Against a real Confluent-compatible registry (the local stack's Apicurio
//! Registry 3.3.3, BACKWARD compatibility):
//!
//! ```sh
//! WALCAST_STACK_DIR=target/stack deploy/local/stack up --only registry
//! eval "$(deploy/local/stack env)"
//! cargo test -p walcast-schemas --test registry
//! ```
//!
//! Every test uses its own subjects (a per-run suffix in the pipeline
//! prefix), so runs against a long-lived registry do not interfere.

mod common;

use std::sync::Arc;

use common::{column, registry_url, unique};
use serde_json::json;
use walcast_schemas::mapping::derive;
use walcast_schemas::{
    AvroDecoder, AvroEncoder, HttpRegistry, MappingOptions, Registry, RegistryConfig,
    RegistryError, SubjectStrategy,
};
use walcast_sdk::{
    ChangeEvent, Column, EncodeError, EventEncoder, Lsn, Numeric, Op, PgType, ReplicaIdentity,
    SnapshotMarker, SourceInfo, TableSchema, TransactionInfo, Value,
};

fn client() -> HttpRegistry {
    common::client(&registry_url())
}

/// `public.orders` at `version`, under one relation id across versions (as
/// an altered table keeps its oid): the encoder relates the versions by it.
fn table(version: u32, columns: Vec<Column>) -> Arc<TableSchema> {
    Arc::new(TableSchema {
        relation_id: 16_384,
        schema: "public".into(),
        name: "orders".into(),
        columns,
        replica_identity: ReplicaIdentity::Default,
        version,
    })
}

fn base_columns() -> Vec<Column> {
    vec![
        column("id", PgType::Int8, true),
        column("qty", PgType::Int4, false),
        column(
            "price",
            PgType::Numeric {
                precision: Some(10),
                scale: Some(2),
            },
            false,
        ),
        column("placed_at", PgType::TimestampTz, false),
    ]
}

fn event(prefix: &str, table: Arc<TableSchema>, after: Vec<Value>) -> ChangeEvent {
    ChangeEvent {
        op: Op::Create,
        table,
        before: None,
        after: Some(after),
        source: SourceInfo {
            name: prefix.into(),
            db: "shop".into(),
            lsn: Lsn(0x16_B374_D848),
            commit_lsn: Lsn(0x16_B374_D900),
            tx_id: Some(771),
            ts_ms: 1_700_000_000_123,
            ts_us: 1_700_000_000_123_456,
            snapshot: SnapshotMarker::False,
        },
        transaction: Some(TransactionInfo {
            id: "771:97500010752".into(),
            total_order: 2,
            data_collection_order: 1,
        }),
        ts_ms: 1_700_000_000_200,
    }
}

#[tokio::test]
async fn registers_idempotently_and_looks_up_by_id() {
    let prefix = unique("idem");
    let schemas = derive(
        &table(1, base_columns()),
        &prefix,
        &MappingOptions::default(),
    )
    .unwrap();
    let key = schemas.key.as_ref().unwrap();
    let topic = format!("{prefix}.public.orders");
    let registry = client();

    let key_id = registry
        .register(&format!("{topic}-key"), key)
        .await
        .unwrap();
    let value_id = registry
        .register(&format!("{topic}-value"), &schemas.value)
        .await
        .unwrap();
    assert_ne!(key_id, value_id);
    // Cached, and idempotent on the server too (a fresh client has no cache).
    assert_eq!(
        registry
            .register(&format!("{topic}-value"), &schemas.value)
            .await
            .unwrap(),
        value_id
    );
    let fresh = client();
    assert_eq!(
        fresh
            .register(&format!("{topic}-value"), &schemas.value)
            .await
            .unwrap(),
        value_id
    );

    // Apicurio stores the schema compacted; the parsed forms must still agree.
    let fetched = fresh.schema_by_id(value_id).await.unwrap();
    assert_eq!(fetched.fingerprint(), schemas.value.fingerprint());
    assert_eq!(
        fetched.full_name(),
        Some(format!("{prefix}.public.orders.Envelope"))
    );
    assert_eq!(
        fresh.schema_by_id(key_id).await.unwrap().fingerprint(),
        key.fingerprint()
    );

    let missing = fresh.schema_by_id(i32::MAX as u32).await.unwrap_err();
    assert!(
        matches!(missing, RegistryError::NotFound { .. }),
        "{missing}"
    );
    assert!(!missing.is_transient());
}

#[tokio::test]
async fn nullable_column_evolves_and_type_change_is_refused() {
    let prefix = unique("evolve");
    let subject = format!("{prefix}.public.orders-value");
    let registry = client();
    let opts = MappingOptions::default();
    let v1 = derive(&table(1, base_columns()), &prefix, &opts)
        .unwrap()
        .value;

    // A subject that does not exist yet accepts anything (the registry answers 404).
    assert!(
        registry
            .check_compatibility(&subject, &v1)
            .await
            .unwrap()
            .is_compatible
    );
    let id1 = registry.register(&subject, &v1).await.unwrap();

    let mut added = base_columns();
    added.push(column("note", PgType::Text, false));
    let v2 = derive(&table(2, added), &prefix, &opts).unwrap().value;
    assert!(
        registry
            .check_compatibility(&subject, &v2)
            .await
            .unwrap()
            .is_compatible
    );
    let id2 = registry.register(&subject, &v2).await.unwrap();
    assert_ne!(id1, id2);

    let mut changed = base_columns();
    changed[1] = column("qty", PgType::Text, false);
    let v3 = derive(&table(3, changed), &prefix, &opts).unwrap().value;
    assert!(
        !registry
            .check_compatibility(&subject, &v3)
            .await
            .unwrap()
            .is_compatible
    );
    let err = registry.register(&subject, &v3).await.unwrap_err();
    assert!(
        matches!(&err, RegistryError::Incompatible { subject: s, .. } if *s == subject),
        "{err}"
    );
    assert!(!err.is_transient());
    assert!(err.to_string().contains(&subject), "{err}");
}

#[tokio::test]
async fn encoder_round_trips_through_the_registry() {
    let prefix = unique("roundtrip");
    let config: RegistryConfig = serde_json::from_value(
        json!({"url": registry_url(), "unconstrained_numeric": "variable_scale"}),
    )
    .unwrap();
    let encoder = AvroEncoder::from_config(&config).unwrap();
    let decoder = AvroDecoder::new(Arc::new(client()));

    let ev = event(
        &prefix,
        table(1, base_columns()),
        vec![
            Value::Int64(42),
            Value::Int32(3),
            Value::Numeric(Numeric::Finite("12.50".into())),
            Value::TimestampTz(1_700_000_000_123_456),
        ],
    );
    let record = encoder.encode(&ev).await.unwrap();
    let (key_id, key) = decoder
        .decode(record.key.as_deref().unwrap())
        .await
        .unwrap();
    assert_eq!(key, json!({"id": 42}));
    let (value_id, value) = decoder
        .decode(record.value.as_deref().unwrap())
        .await
        .unwrap();
    assert_ne!(key_id, value_id);
    assert_eq!(value, walcast_sdk::json::envelope(&ev, &Default::default()));
    assert_eq!(value["after"]["price"], json!("12.50"));
    assert_eq!(
        value["after"]["placed_at"],
        json!("2023-11-14T22:13:20.123456Z")
    );

    // The table gains a nullable column: a new value version, decodable too.
    let mut added = base_columns();
    added.push(column("note", PgType::Text, false));
    let mut row = ev.after.clone().unwrap();
    row.push(Value::Text("gift".into()));
    let ev2 = event(&prefix, table(2, added), row);
    let record2 = encoder.encode(&ev2).await.unwrap();
    let (value_id2, value2) = decoder
        .decode(record2.value.as_deref().unwrap())
        .await
        .unwrap();
    assert_ne!(value_id2, value_id);
    assert_eq!(value2["after"]["note"], json!("gift"));
    assert_eq!(
        decoder
            .decode(record2.key.as_deref().unwrap())
            .await
            .unwrap()
            .0,
        key_id
    );

    // An incompatible shape is refused as invalid (so `on_invalid` applies),
    // naming the subject and the changed column with both types.
    let mut changed = base_columns();
    changed[1] = column("qty", PgType::Text, false);
    let mut row = ev.after.clone().unwrap();
    row[1] = Value::Text("three".into());
    let err = encoder
        .encode(&event(&prefix, table(3, changed), row))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, EncodeError::Invalid { column, .. } if column.contains("qty")),
        "{err}"
    );
    assert!(!err.is_transient(), "{err}");
    assert!(
        err.to_string()
            .contains(&format!("{prefix}.public.orders-value"))
            && err
                .to_string()
                .contains("column `qty` changed type from integer to text"),
        "{err}"
    );
}

#[tokio::test]
async fn record_name_strategy_uses_the_record_full_name() {
    let prefix = unique("recname");
    let registry = Arc::new(client());
    let encoder = AvroEncoder::new(
        registry.clone(),
        MappingOptions::default(),
        SubjectStrategy::RecordName,
        Arc::new(walcast_schemas::default_topic),
    );
    let ev = event(
        &prefix,
        table(1, base_columns()),
        vec![Value::Int64(1), Value::Null, Value::Null, Value::Null],
    );
    let record = encoder.encode(&ev).await.unwrap();
    let schemas = derive(&ev.table, &prefix, &MappingOptions::default()).unwrap();
    let subject = format!("{prefix}.public.orders.Envelope");
    // A fresh client (no cache) finds the encoder's schema under the record-name subject.
    let id = client().register(&subject, &schemas.value).await.unwrap();
    assert_eq!(
        walcast_schemas::wire::parse(record.value.as_deref().unwrap())
            .unwrap()
            .0,
        id
    );
    assert!(
        registry
            .check_compatibility(&subject, &schemas.value)
            .await
            .unwrap()
            .is_compatible
    );
}
