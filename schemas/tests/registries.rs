//! One suite, two registries: the same cases through [`HttpRegistry`]
//! against the local stack's Apicurio 3.3.3 (ccompat API, BACKWARD) and
//! against walcast's embedded registry served on a free loopback port, so
//! the embedded one answers as a real registry does. Schemas are compared
//! parsed (fingerprint and apache-avro's parsed form), never as strings:
//! registries reformat what they store.
//!
//! ```sh
//! WALCAST_STACK_DIR=target/stack deploy/local/stack up --only registry
//! eval "$(deploy/local/stack env)"
//! cargo test -p walcast-schemas --test registries
//! ```

mod common;

use common::{client, column, registry_url, table, unique, Served};
use serde_json::{json, Value as Json};
use walcast_schemas::mapping::derive;
use walcast_schemas::registry::CONTENT_TYPE;
use walcast_schemas::{
    AvroSchema, CompatibilityLevel, MappingOptions, Registry, RegistryError, VersionRef,
};
use walcast_sdk::PgType;

/// The value schemas of three shapes of `public.orders`: the base, one
/// with a nullable column added (BACKWARD compatible), one with `qty`
/// retyped int -> text (incompatible).
fn shapes(prefix: &str) -> [AvroSchema; 3] {
    let base = || {
        vec![
            column("id", PgType::Int8, true),
            column("qty", PgType::Int4, false),
            column(
                "price",
                PgType::Numeric {
                    precision: Some(12),
                    scale: Some(2),
                },
                false,
            ),
            column("placed_at", PgType::TimestampTz, false),
        ]
    };
    let opts = MappingOptions::default();
    let mut added = base();
    added.push(column("note", PgType::Text, false));
    let mut changed = base();
    changed[1] = column("qty", PgType::Text, false);
    [base(), added, changed].map(|columns| {
        derive(&table("public", "orders", 1, columns), prefix, &opts)
            .unwrap()
            .value
    })
}

fn same(a: &AvroSchema, b: &AvroSchema) {
    assert_eq!(a.fingerprint(), b.fingerprint());
    assert_eq!(a.schema(), b.schema());
}

/// A raw request, for what the client does not expose: the status and the
/// parsed Confluent body.
async fn raw(method: reqwest::Method, url: String, body: Option<Json>) -> (u16, Json) {
    let mut req = reqwest::Client::new()
        .request(method, url)
        .header("accept", CONTENT_TYPE);
    if let Some(body) = body {
        req = req
            .header("content-type", CONTENT_TYPE)
            .body(body.to_string());
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}")),
    )
}

/// Sends a raw request and asserts the registry's error answer (HTTP
/// `status` and `error_code`, as Confluent's API gives them); returns the
/// answer. `name` says which registry or case in the failure message.
async fn assert_error(
    name: &str,
    method: reqwest::Method,
    url: String,
    body: Option<Json>,
    status: u16,
    code: impl Into<Json>,
) -> Json {
    let (got, answer) = raw(method, url, body).await;
    assert_eq!(
        (got, &answer["error_code"]),
        (status, &code.into()),
        "{name}: {answer}"
    );
    answer
}

async fn suite(name: &str, url: &str) {
    let prefix = unique("suite");
    let subject = format!("{prefix}.public.orders-value");
    let [v1, v2, v3] = shapes(&prefix);
    let registry = client(url);

    // The global level is BACKWARD (Apicurio's stack sets it; the embedded
    // registry's default).
    assert_eq!(
        registry.compatibility_level(None).await.unwrap(),
        CompatibilityLevel::Backward,
        "{name}"
    );

    // Register, and the same schema again: the same id, also for a client
    // without cache.
    let id1 = registry.register(&subject, &v1).await.unwrap();
    assert_eq!(
        registry.register(&subject, &v1).await.unwrap(),
        id1,
        "{name}"
    );
    let fresh = client(url);
    assert_eq!(fresh.register(&subject, &v1).await.unwrap(), id1, "{name}");
    assert!(fresh.subjects().await.unwrap().contains(&subject), "{name}");
    assert_eq!(fresh.versions(&subject).await.unwrap(), [1], "{name}");

    // Lookup by id, by subject and schema, and the latest version.
    same(&fresh.schema_by_id(id1).await.unwrap(), &v1);
    let found = fresh.lookup(&subject, &v1).await.unwrap().unwrap();
    assert_eq!((found.version, found.id), (1, id1), "{name}");
    same(&found.schema, &v1);
    assert!(
        fresh.lookup(&subject, &v2).await.unwrap().is_none(),
        "{name}"
    );
    let latest = fresh.version(&subject, VersionRef::Latest).await.unwrap();
    assert_eq!((latest.version, latest.id), (1, id1), "{name}");
    same(&latest.schema, &v1);

    // Verdicts: a nullable column added is compatible, a retyped one is not
    // (against latest and against version 1 by number).
    assert!(
        fresh
            .check_compatibility(&subject, &v2)
            .await
            .unwrap()
            .is_compatible,
        "{name}"
    );
    assert!(
        !fresh
            .check_compatibility(&subject, &v3)
            .await
            .unwrap()
            .is_compatible,
        "{name}"
    );
    assert!(
        !fresh
            .check_compatibility_with(&subject, VersionRef::Number(1), &v3)
            .await
            .unwrap()
            .is_compatible,
        "{name}"
    );
    // A subject that does not exist accepts anything.
    let nosuch = format!("{prefix}.nosuch-value");
    assert!(
        fresh
            .check_compatibility(&nosuch, &v3)
            .await
            .unwrap()
            .is_compatible,
        "{name}"
    );

    // The compatible change becomes version 2 and the latest.
    let id2 = fresh.register(&subject, &v2).await.unwrap();
    assert_ne!(id1, id2, "{name}");
    assert_eq!(fresh.versions(&subject).await.unwrap(), [1, 2], "{name}");
    let latest = fresh.version(&subject, VersionRef::Latest).await.unwrap();
    assert_eq!((latest.version, latest.id), (2, id2), "{name}");
    same(&latest.schema, &v2);
    same(
        &fresh
            .version(&subject, VersionRef::Number(1))
            .await
            .unwrap()
            .schema,
        &v1,
    );

    // The incompatible one is refused: 409 with error_code 409.
    let err = fresh.register(&subject, &v3).await.unwrap_err();
    assert!(
        matches!(&err, RegistryError::Incompatible { subject: s, .. } if *s == subject),
        "{name}: {err}"
    );
    assert!(!err.is_transient());
    let versions_url = format!("{url}/subjects/{subject}/versions");
    assert_error(
        name,
        reqwest::Method::POST,
        versions_url.clone(),
        Some(json!({"schema": v3.text()})),
        409,
        409,
    )
    .await;

    // An invalid schema: 422 with error_code 42201.
    let body = assert_error(
        name,
        reqwest::Method::POST,
        versions_url,
        Some(json!({"schema": "{\"type\":\"record\"}"})),
        422,
        42201,
    )
    .await;
    assert!(body["message"].is_string(), "{name}: {body}");

    // Unknown subject, version and id.
    let err = fresh.versions(&nosuch).await.unwrap_err();
    assert!(
        matches!(err, RegistryError::NotFound { .. }),
        "{name}: {err}"
    );
    assert_error(
        name,
        reqwest::Method::GET,
        format!("{url}/subjects/{nosuch}/versions"),
        None,
        404,
        40401,
    )
    .await;
    assert_error(
        name,
        reqwest::Method::GET,
        format!("{url}/subjects/{subject}/versions/7"),
        None,
        404,
        40402,
    )
    .await;
    assert_error(
        name,
        reqwest::Method::GET,
        format!("{url}/schemas/ids/{}", i32::MAX),
        None,
        404,
        40403,
    )
    .await;
    assert!(matches!(
        fresh.schema_by_id(i32::MAX as u32).await,
        Err(RegistryError::NotFound { .. })
    ));

    // A subject set to NONE takes the incompatible schema as version 3.
    fresh
        .set_compatibility_level(Some(&subject), CompatibilityLevel::None)
        .await
        .unwrap();
    assert_eq!(
        fresh.compatibility_level(Some(&subject)).await.unwrap(),
        CompatibilityLevel::None,
        "{name}"
    );
    let id3 = fresh.register(&subject, &v3).await.unwrap();
    let latest = fresh.version(&subject, VersionRef::Latest).await.unwrap();
    assert_eq!((latest.version, latest.id), (3, id3), "{name}");
    same(&latest.schema, &v3);
    // The global level is untouched.
    assert_eq!(
        fresh.compatibility_level(None).await.unwrap(),
        CompatibilityLevel::Backward,
        "{name}"
    );
    assert_error(
        name,
        reqwest::Method::PUT,
        format!("{url}/config/{subject}"),
        Some(json!({"compatibility": "SOMETIMES"})),
        422,
        42203,
    )
    .await;
}

#[tokio::test]
async fn apicurio_answers_the_suite() {
    suite("apicurio", &registry_url()).await;
}

#[tokio::test]
async fn embedded_answers_the_suite() {
    let served = Served::start(None).await;
    suite("embedded", &served.url).await;
    served.stop().await;
}

#[tokio::test]
async fn embedded_keeps_ids_across_a_restart() {
    let dir = common::scratch_dir("restart");
    let prefix = unique("restart");
    let [v1, v2, v3] = shapes(&prefix);
    let subject = format!("{prefix}.public.orders-value");
    let other = format!("{prefix}.public.other-value");

    let served = Served::start(Some(&dir)).await;
    let registry = client(&served.url);
    let id1 = registry.register(&subject, &v1).await.unwrap();
    let id2 = registry.register(&subject, &v2).await.unwrap();
    // The same schema under another subject shares its id.
    assert_eq!(registry.register(&other, &v1).await.unwrap(), id1);
    registry
        .set_compatibility_level(Some(&other), CompatibilityLevel::None)
        .await
        .unwrap();
    served.stop().await;

    // Opened again: same ids, versions and levels; a new schema gets a new id.
    let served = Served::start(Some(&dir)).await;
    let registry = client(&served.url);
    same(&registry.schema_by_id(id1).await.unwrap(), &v1);
    same(&registry.schema_by_id(id2).await.unwrap(), &v2);
    assert_eq!(registry.versions(&subject).await.unwrap(), [1, 2]);
    assert_eq!(registry.register(&subject, &v2).await.unwrap(), id2);
    assert_eq!(
        registry.compatibility_level(Some(&other)).await.unwrap(),
        CompatibilityLevel::None
    );
    assert!(matches!(
        registry.register(&subject, &v3).await,
        Err(RegistryError::Incompatible { .. })
    ));
    let id3 = registry.register(&other, &v3).await.unwrap();
    assert!(id3 > id2, "ids are never reused: {id3} after {id2}");
    assert_eq!(served.registry.subject_ids(&other), [id1, id3]);
    served.stop().await;

    // What is on disk: one file per id and the subject index.
    let mut files: Vec<String> = std::fs::read_dir(dir.join("schemas"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    files.sort();
    let mut expected = vec![
        format!("{id1}.json"),
        format!("{id2}.json"),
        format!("{id3}.json"),
    ];
    expected.sort();
    assert_eq!(files, expected);
    assert!(dir.join("subjects.json").is_file());
    std::fs::remove_dir_all(&dir).unwrap();
}

/// What only the embedded registry is checked for: Confluent's answers
/// where Apicurio differs or the client does not go.
#[tokio::test]
async fn embedded_answers_in_confluents_media_type_and_codes() {
    let served = Served::start(None).await;
    let url = &served.url;
    let [v1, ..] = shapes("details");
    let subject = "details.public.orders-value";
    client(url).register(subject, &v1).await.unwrap();

    let resp = reqwest::get(format!("{url}/subjects")).await.unwrap();
    assert_eq!(
        resp.headers()["content-type"].to_str().unwrap(),
        CONTENT_TYPE
    );
    assert_eq!(resp.json::<Json>().await.unwrap(), json!([subject]));

    let cases = [
        // No level of its own: 40408 unless asked to fall back to the global one.
        (
            reqwest::Method::GET,
            format!("config/{subject}"),
            None,
            404,
            json!(40408),
        ),
        (
            reqwest::Method::GET,
            format!("subjects/{subject}/versions/first"),
            None,
            422,
            json!(42202),
        ),
        (
            reqwest::Method::POST,
            format!("subjects/{subject}/versions"),
            Some(json!({"schema": "syntax = \"proto3\";", "schemaType": "PROTOBUF"})),
            422,
            json!(42201),
        ),
        (
            reqwest::Method::POST,
            format!("subjects/{subject}"),
            Some(json!({"schema": "\"string\""})),
            404,
            json!(40403),
        ),
        (
            reqwest::Method::GET,
            "no/such/route".to_string(),
            None,
            404,
            json!(404),
        ),
    ];
    for (method, path, body, status, code) in cases {
        let answer = assert_error(&path, method, format!("{url}/{path}"), body, status, code).await;
        assert!(answer["message"].is_string(), "{path}: {answer}");
    }
    let (status, answer) = raw(
        reqwest::Method::GET,
        format!("{url}/config/{subject}?defaultToGlobal=true"),
        None,
    )
    .await;
    assert_eq!(
        (status, answer),
        (200, json!({"compatibilityLevel": "BACKWARD"}))
    );
    // Verbose compatibility answers carry the reasons.
    let [_, _, v3] = shapes("details");
    let (status, answer) = raw(
        reqwest::Method::POST,
        format!("{url}/compatibility/subjects/{subject}/versions/latest?verbose=true"),
        Some(json!({"schema": v3.text()})),
    )
    .await;
    assert_eq!(
        (status, &answer["is_compatible"]),
        (200, &json!(false)),
        "{answer}"
    );
    assert!(
        !answer["messages"].as_array().unwrap().is_empty(),
        "{answer}"
    );
    served.stop().await;
}
