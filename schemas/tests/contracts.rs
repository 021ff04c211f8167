//! Data contracts: the example in `schemas/contracts/`, the violations a
//! table can commit, files that must not load, and the encoder refusing a
//! table that breaks its contract.

mod common;

use std::path::Path;
use std::sync::Arc;

use common::{column, table};
use walcast_schemas::contracts::{load_dir, ContractError};
use walcast_schemas::mapping::derive;
use walcast_schemas::{
    default_topic, AvroEncoder, EmbeddedRegistry, MappingOptions, SubjectStrategy,
};
use walcast_sdk::{
    ChangeEvent, Column, EncodeError, EventEncoder, Lsn, Numeric, Op, PgType, SnapshotMarker,
    SourceInfo, TableSchema, Value,
};

fn examples() -> walcast_schemas::Contracts {
    load_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("contracts")).unwrap()
}

fn price(precision: u32) -> PgType {
    PgType::Numeric {
        precision: Some(precision),
        scale: Some(2),
    }
}

fn orders(columns: Vec<Column>) -> Arc<TableSchema> {
    table("public", "orders", 1, columns)
}

fn base() -> Vec<Column> {
    vec![
        column("id", PgType::Int8, true),
        column("item", PgType::Text, false),
        column("price", price(12), false),
    ]
}

fn violation(result: Result<(), ContractError>) -> (String, String) {
    match result {
        Err(ContractError::Violation { table, field, .. }) => (table, field),
        other => panic!("expected a violation, got {other:?}"),
    }
}

#[test]
fn the_example_contract_holds_for_its_table_and_catches_changes() {
    let contracts = examples();
    assert_eq!(contracts.tables().collect::<Vec<_>>(), ["public.orders"]);
    let opts = MappingOptions::default();

    contracts
        .check_table(&orders(base()), "shop", &opts)
        .unwrap();
    // Any prefix; and through the derived schemas directly.
    let derived = derive(&orders(base()), "other_prefix", &opts).unwrap();
    contracts.check("public", "orders", &derived).unwrap();
    // A column added is fine; so is a table without a contract.
    let mut added = base();
    added.push(column("note", PgType::Text, false));
    contracts
        .check_table(&orders(added), "shop", &opts)
        .unwrap();
    contracts
        .check_table(
            &table("public", "other", 1, vec![column("x", PgType::Text, false)]),
            "shop",
            &opts,
        )
        .unwrap();

    // numeric(12,2) -> numeric(10,2): the decimal no longer matches.
    let mut narrowed = base();
    narrowed[2] = column("price", price(10), false);
    let err = contracts.check_table(&orders(narrowed), "shop", &opts);
    let message = format!("{:?}", err.as_ref().err());
    assert_eq!(
        violation(err),
        ("public.orders".into(), "price".into()),
        "{message}"
    );

    // item retyped to integer.
    let mut retyped = base();
    retyped[1] = column("item", PgType::Int4, false);
    assert_eq!(
        violation(contracts.check_table(&orders(retyped), "shop", &opts)).1,
        "item"
    );

    // id dropped: it has no default in the contract.
    let dropped = base()[1..].to_vec();
    let err = contracts.check_table(&orders(dropped), "shop", &opts);
    let text = err.as_ref().unwrap_err().to_string();
    assert_eq!(violation(err).1, "id");
    assert!(
        text.contains("public.orders") && text.contains("public.orders.avsc"),
        "{text}"
    );

    // item dropped: the contract's default covers it.
    let without_item = vec![base()[0].clone(), base()[2].clone()];
    contracts
        .check_table(&orders(without_item), "shop", &opts)
        .unwrap();
}

#[test]
fn bad_contract_files_are_errors_not_missing_contracts() {
    let dir = common::scratch_dir("contracts_bad");
    std::fs::write(dir.join("README.txt"), "ignored").unwrap();
    assert!(load_dir(&dir).unwrap().is_empty());

    std::fs::write(
        dir.join("public.orders.avsc"),
        r#"{"type": "record", "name": "#,
    )
    .unwrap();
    let err = load_dir(&dir).unwrap_err();
    assert!(matches!(err, ContractError::Parse { .. }), "{err}");
    assert!(err.to_string().contains("public.orders.avsc"), "{err}");

    std::fs::write(dir.join("public.orders.avsc"), r#""string""#).unwrap();
    assert!(matches!(
        load_dir(&dir),
        Err(ContractError::NotRecord { .. })
    ));

    std::fs::remove_file(dir.join("public.orders.avsc")).unwrap();
    std::fs::write(
        dir.join("orders.avsc"),
        r#"{"type":"record","name":"Value","fields":[]}"#,
    )
    .unwrap();
    assert!(matches!(load_dir(&dir), Err(ContractError::Name { .. })));

    std::fs::remove_dir_all(&dir).unwrap();
    assert!(matches!(load_dir(&dir), Err(ContractError::Dir { .. })));
}

#[tokio::test]
async fn the_encoder_refuses_a_table_that_breaks_its_contract() {
    let registry = Arc::new(EmbeddedRegistry::new());
    let encoder = AvroEncoder::new(
        registry.clone(),
        MappingOptions::default(),
        SubjectStrategy::TopicName,
        Arc::new(default_topic),
    )
    .with_contracts(Arc::new(examples()));
    let event = |columns: Vec<Column>| ChangeEvent {
        op: Op::Create,
        table: orders(columns),
        before: None,
        after: Some(vec![
            Value::Int64(1),
            Value::Text("pen".into()),
            Value::Numeric(Numeric::Finite("1.50".into())),
        ]),
        source: SourceInfo {
            name: "shop".into(),
            db: "app".into(),
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
    encoder.encode(&event(base())).await.unwrap();

    let mut narrowed = base();
    narrowed[2] = column("price", price(10), false);
    let mut ev = event(narrowed);
    // A new shape of the table (a new Relation message).
    ev.table = Arc::new(TableSchema {
        version: 2,
        ..(*ev.table).clone()
    });
    let err = encoder.encode(&ev).await.unwrap_err();
    match &err {
        EncodeError::Invalid { table, column, .. } => {
            assert_eq!(
                (table.as_str(), column.as_str()),
                ("public.orders", "price"),
                "{err}"
            );
        }
        other => panic!("expected Invalid, got {other}"),
    }
    assert!(!err.is_transient());
    // Refused before registering: only the first shape is in the registry.
    assert_eq!(registry.subject_ids("shop.public.orders-value").len(), 1);
}
