//! The Redis sink against a real Redis (WALCAST_TEST_REDIS_URL).

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;
use futures::StreamExt;
use walcast_redis::{Mode, PublishVia, RedisSink, UpsertFormat};
use walcast_sdk::{Op, Value};

fn upsert_mode(format: UpsertFormat, ttl_secs: Option<u64>) -> Mode {
    Mode::Upsert {
        key_template: "{schema}.{table}:{id}".into(),
        format,
        ttl_secs,
        tombstone_ttl_secs: 3_600,
        truncate_scan: true,
    }
}

#[tokio::test]
async fn invalidate_deletes_composite_keys_and_truncate_scans_the_table() {
    let name = unique_table("inv");
    let t = table(&name, &[("region", true), ("id", true), ("note", false)]);
    let mut sink = sink(Mode::Invalidate {
        key_template: "c:{table}:{id}".into(),
        truncate_scan: true,
    })
    .await;
    let mut r = client().await;
    for k in ["eu:1", "eu:2", "us:1"] {
        let _: () = redis::cmd("SET")
            .arg(format!("c:{name}:{k}"))
            .arg("cached")
            .query_async(&mut r)
            .await
            .unwrap();
    }
    let other = format!("c:{name}x:eu:1");
    let _: () = redis::cmd("SET")
        .arg(&other)
        .arg("cached")
        .query_async(&mut r)
        .await
        .unwrap();

    let row = vec![text("eu"), Value::Int32(1), text("hi")];
    send(&mut sink, vec![event(&t, Op::Create, None, Some(row), 10)])
        .await
        .unwrap();
    assert_eq!(
        get(&mut r, &format!("c:{name}:eu:1")).await,
        None,
        "the changed row's key is gone"
    );
    assert_eq!(
        get(&mut r, &format!("c:{name}:eu:2")).await.as_deref(),
        Some("cached")
    );

    send(&mut sink, vec![event(&t, Op::Truncate, None, None, 11)])
        .await
        .unwrap();
    assert_eq!(
        get(&mut r, &format!("c:{name}:eu:2")).await,
        None,
        "truncate removes every key of the table"
    );
    assert_eq!(get(&mut r, &format!("c:{name}:us:1")).await, None);
    assert_eq!(
        get(&mut r, &other).await.as_deref(),
        Some("cached"),
        "a table whose name only starts alike is untouched"
    );
}

#[tokio::test]
async fn upsert_json_refuses_stale_versions_and_replays_are_no_ops() {
    let name = unique_table("ups");
    let t = table(&name, &[("id", true), ("name", false)]);
    let mut sink = sink(upsert_mode(UpsertFormat::Json, None)).await;
    let stats = sink.stats();
    let mut r = client().await;
    let key = format!("public.{name}:7");

    let batch = vec![
        event(
            &t,
            Op::Create,
            None,
            Some(vec![Value::Int64(7), text("first")]),
            100,
        ),
        upsert(&t, vec![Value::Int64(7), text("second")], 100),
    ];
    send(&mut sink, batch.clone()).await.unwrap();
    assert_eq!(
        get(&mut r, &key).await.as_deref(),
        Some(r#"{"id":7,"name":"second"}"#),
        "two changes in one transaction both apply"
    );
    assert_eq!(
        get(&mut r, &format!("{{{key}}}:__v")).await.as_deref(),
        Some("100")
    );

    send(
        &mut sink,
        vec![upsert(&t, vec![Value::Int64(7), text("stale")], 99)],
    )
    .await
    .unwrap();
    assert_eq!(
        get(&mut r, &key).await.as_deref(),
        Some(r#"{"id":7,"name":"second"}"#),
        "an older version never overwrites"
    );
    assert_eq!(stats.writes_stale.load(Ordering::Relaxed), 1);

    send(
        &mut sink,
        vec![upsert(
            &t,
            vec![Value::Int64(7), text("newer")],
            0x1_0000_0000_0000,
        )],
    )
    .await
    .unwrap();
    // A version above 2^53, where Lua's doubles would lose precision.
    send(
        &mut sink,
        vec![upsert(
            &t,
            vec![Value::Int64(7), text("slightly older")],
            0x1_0000_0000_0000 - 1,
        )],
    )
    .await
    .unwrap();
    assert_eq!(
        get(&mut r, &key).await.as_deref(),
        Some(r#"{"id":7,"name":"newer"}"#)
    );

    // Replaying the whole first batch changes nothing.
    let stale_before = stats.writes_stale.load(Ordering::Relaxed);
    send(&mut sink, batch).await.unwrap();
    assert_eq!(
        get(&mut r, &key).await.as_deref(),
        Some(r#"{"id":7,"name":"newer"}"#)
    );
    assert_eq!(stats.writes_stale.load(Ordering::Relaxed), stale_before + 2);
}

#[tokio::test]
async fn delete_leaves_a_tombstone_that_a_late_older_upsert_cannot_pass() {
    let name = unique_table("del");
    let t = table(&name, &[("id", true), ("name", false)]);
    let mut sink = sink(upsert_mode(UpsertFormat::Json, None)).await;
    let mut r = client().await;
    let key = format!("public.{name}:1");

    send(
        &mut sink,
        vec![upsert(&t, vec![Value::Int32(1), text("a")], 200)],
    )
    .await
    .unwrap();
    send(
        &mut sink,
        vec![delete(&t, vec![Value::Int32(1), Value::Null], 300)],
    )
    .await
    .unwrap();
    assert_eq!(get(&mut r, &key).await, None);
    let ttl: i64 = redis::cmd("TTL")
        .arg(format!("{{{key}}}:__v"))
        .query_async(&mut r)
        .await
        .unwrap();
    assert!(
        (1..=3_600).contains(&ttl),
        "the tombstone expires after tombstone_ttl_secs, got {ttl}"
    );

    send(
        &mut sink,
        vec![upsert(&t, vec![Value::Int32(1), text("late")], 250)],
    )
    .await
    .unwrap();
    assert_eq!(
        get(&mut r, &key).await,
        None,
        "a late older upsert must not resurrect a deleted row"
    );

    send(
        &mut sink,
        vec![event(
            &t,
            Op::Create,
            None,
            Some(vec![Value::Int32(1), text("reborn")]),
            400,
        )],
    )
    .await
    .unwrap();
    assert_eq!(
        get(&mut r, &key).await.as_deref(),
        Some(r#"{"id":1,"name":"reborn"}"#),
        "a newer insert does"
    );
}

#[tokio::test]
async fn hash_format_with_ttl_and_key_change() {
    let name = unique_table("hash");
    let t = table(
        &name,
        &[
            ("id", true),
            ("name", false),
            ("score", false),
            ("gone", false),
        ],
    );
    let mut sink = sink(upsert_mode(UpsertFormat::Hash, Some(120))).await;
    let mut r = client().await;
    let key = format!("public.{name}:5");

    let row = vec![
        Value::Int32(5),
        text("Ann"),
        Value::Float64(1.5),
        Value::Null,
    ];
    send(&mut sink, vec![event(&t, Op::Read, None, Some(row), 10)])
        .await
        .unwrap();
    let mut h: Vec<(String, String)> = redis::cmd("HGETALL")
        .arg(&key)
        .query_async(&mut r)
        .await
        .unwrap();
    h.sort();
    assert_eq!(
        h,
        vec![
            ("id".into(), "5".into()),
            ("name".into(), "Ann".into()),
            ("score".into(), "1.5".into())
        ]
    );
    for k in [key.clone(), format!("{{{key}}}:__v")] {
        let ttl: i64 = redis::cmd("TTL").arg(&k).query_async(&mut r).await.unwrap();
        assert!((1..=120).contains(&ttl), "{k} has ttl {ttl}");
    }

    // The key moves from 5 to 6: the old key goes, the new one appears.
    let changed = event(
        &t,
        Op::Update,
        Some(vec![Value::Int32(5), Value::Null, Value::Null, Value::Null]),
        Some(vec![Value::Int32(6), text("Ann"), Value::Null, Value::Null]),
        20,
    );
    send(&mut sink, vec![changed]).await.unwrap();
    let exists: i64 = redis::cmd("EXISTS")
        .arg(&key)
        .query_async(&mut r)
        .await
        .unwrap();
    assert_eq!(exists, 0);
    let name6: Option<String> = redis::cmd("HGET")
        .arg(format!("public.{name}:6"))
        .arg("name")
        .query_async(&mut r)
        .await
        .unwrap();
    assert_eq!(name6.as_deref(), Some("Ann"));
}

#[tokio::test]
async fn publish_reaches_a_subscriber_and_a_stream() {
    let name = unique_table("pub");
    let t = table(&name, &[("id", true), ("name", false)]);
    let client = redis::Client::open(redis_url()).unwrap();
    let mut pubsub = client.get_async_pubsub().await.unwrap();
    let channel = format!("walcast:public.{name}");
    pubsub.subscribe(&channel).await.unwrap();

    let mut sink = sink(Mode::Publish {
        via: PublishVia::Channel,
        name_template: "walcast:{schema}.{table}".into(),
        stream_maxlen: 10,
    })
    .await;
    send(
        &mut sink,
        vec![delete(&t, vec![Value::Int32(3), Value::Null], 77)],
    )
    .await
    .unwrap();
    let msg = tokio::time::timeout(Duration::from_secs(5), pubsub.on_message().next())
        .await
        .expect("a message within 5 s")
        .unwrap();
    let payload: serde_json::Value =
        serde_json::from_str(&msg.get_payload::<String>().unwrap()).unwrap();
    assert_eq!(
        payload,
        serde_json::json!({"schema": "public", "table": name, "op": "d", "key": {"id": 3}, "lsn": 77})
    );

    let mut sink = sink_stream().await;
    // `MAXLEN ~` trims whole stream nodes (100 entries by default), so write
    // enough for trimming to show.
    let rows: Vec<_> = (0..250)
        .map(|i| upsert(&t, vec![Value::Int32(i), text("x")], 100 + i as u64))
        .collect();
    send(&mut sink, rows).await.unwrap();
    let mut r = common::client().await;
    let stream = format!("s:{name}");
    let len: u64 = redis::cmd("XLEN")
        .arg(&stream)
        .query_async(&mut r)
        .await
        .unwrap();
    assert!(
        (10..250).contains(&len),
        "MAXLEN ~ 10 trims the stream, got {len}"
    );
    let last: Vec<(String, Vec<String>)> = redis::cmd("XREVRANGE")
        .arg(&stream)
        .arg("+")
        .arg("-")
        .arg("COUNT")
        .arg(1)
        .query_async(&mut r)
        .await
        .unwrap();
    let (_, fields) = &last[0];
    assert_eq!(fields[0], "message");
    let newest: serde_json::Value = serde_json::from_str(&fields[1]).unwrap();
    assert_eq!(
        newest,
        serde_json::json!({"schema": "public", "table": name, "op": "u", "key": {"id": 249}, "lsn": 349})
    );
}

async fn sink_stream() -> RedisSink {
    sink(Mode::Publish {
        via: PublishVia::Stream,
        name_template: "s:{table}".into(),
        stream_maxlen: 10,
    })
    .await
}

#[tokio::test]
async fn a_table_without_key_fails_the_batch_definitively() {
    let name = unique_table("nokey");
    let t = table(&name, &[("a", false)]);
    let mut sink = sink(upsert_mode(UpsertFormat::Json, None)).await;
    let err = send(&mut sink, vec![upsert(&t, vec![Value::Int32(1)], 5)])
        .await
        .unwrap_err();
    assert!(
        err.contains(&format!("public.{name} has no primary key")),
        "{err}"
    );
}

#[tokio::test]
async fn unreachable_server_is_reported_at_connect() {
    let mut c = config(Mode::Invalidate {
        key_template: "{table}:{id}".into(),
        truncate_scan: true,
    });
    c.urls = vec!["redis://user:pw@127.0.0.1:1".into()];
    c.timeout = std::time::Duration::from_millis(500);
    let err = RedisSink::connect(c).await.err().expect("port 1 refuses");
    assert!(err.is_transient(), "{err}");
    let text = err.to_string();
    assert!(
        text.contains("127.0.0.1:1") && !text.contains("pw"),
        "{text}"
    );
}

/// Issue 21: an update that left a TOASTed column unchanged must keep the
/// stored value (JSON and hash), still under the version check; with no
/// stored row the placeholder is never written.
#[tokio::test]
async fn unchanged_toast_values_keep_the_stored_value() {
    let name = unique_table("toast");
    let t = table(&name, &[("id", true), ("title", false), ("body", false)]);
    let row = |id: i64, title: &str, body: Value| vec![Value::Int64(id), text(title), body];
    let mut r = client().await;

    // JSON documents.
    let mut sink = sink(upsert_mode(UpsertFormat::Json, None)).await;
    let key1 = format!("public.{name}:1");
    let doc = |s: Option<String>| -> serde_json::Value {
        serde_json::from_str(&s.expect("a stored document")).unwrap()
    };
    send(
        &mut sink,
        vec![upsert(&t, row(1, "a", text("long \"text\" v1")), 10)],
    )
    .await
    .unwrap();
    send(
        &mut sink,
        vec![upsert(&t, row(1, "b", Value::Unavailable), 20)],
    )
    .await
    .unwrap();
    assert_eq!(
        doc(get(&mut r, &key1).await),
        serde_json::json!({"id": 1, "title": "b", "body": "long \"text\" v1"})
    );
    send(
        &mut sink,
        vec![
            upsert(&t, row(1, "c", Value::Null), 30),
            upsert(&t, row(1, "d", Value::Unavailable), 31),
        ],
    )
    .await
    .unwrap();
    assert_eq!(
        doc(get(&mut r, &key1).await),
        serde_json::json!({"id": 1, "title": "d", "body": null}),
        "a stored NULL is a value too"
    );
    send(
        &mut sink,
        vec![upsert(&t, row(1, "stale", Value::Unavailable), 15)],
    )
    .await
    .unwrap();
    assert_eq!(
        doc(get(&mut r, &key1).await)["title"],
        "d",
        "stale stays refused"
    );
    let key2 = format!("public.{name}:2");
    send(
        &mut sink,
        vec![upsert(&t, row(2, "new key", Value::Unavailable), 40)],
    )
    .await
    .unwrap();
    assert_eq!(
        doc(get(&mut r, &key2).await),
        serde_json::json!({"id": 2, "title": "new key", "__walcast_incomplete": ["body"]})
    );
    assert_eq!(sink.stats().writes_incomplete.load(Ordering::Relaxed), 1);

    // Hashes.
    let hname = unique_table("toasth");
    let th = table(&hname, &[("id", true), ("title", false), ("body", false)]);
    let mut sink = common::sink(upsert_mode(UpsertFormat::Hash, None)).await;
    let hkey = format!("public.{hname}:1");
    let hash = |r: &mut redis::aio::MultiplexedConnection, k: String| {
        let mut r = r.clone();
        async move {
            let m: std::collections::BTreeMap<String, String> = redis::cmd("HGETALL")
                .arg(k)
                .query_async(&mut r)
                .await
                .unwrap();
            m
        }
    };
    send(&mut sink, vec![upsert(&th, row(1, "a", text("big")), 10)])
        .await
        .unwrap();
    send(
        &mut sink,
        vec![upsert(&th, row(1, "b", Value::Unavailable), 20)],
    )
    .await
    .unwrap();
    let h = hash(&mut r, hkey.clone()).await;
    assert_eq!(h.get("body").map(String::as_str), Some("big"));
    assert_eq!(h.get("title").map(String::as_str), Some("b"));
    assert!(!h.contains_key("__walcast_incomplete"));
    send(
        &mut sink,
        vec![upsert(&th, row(2, "x", Value::Unavailable), 30)],
    )
    .await
    .unwrap();
    let h = hash(&mut r, format!("public.{hname}:2")).await;
    assert_eq!(
        h.get("__walcast_incomplete").map(String::as_str),
        Some(r#"["body"]"#)
    );
    assert!(!h.contains_key("body"));
    assert!(h
        .values()
        .all(|v| !v.contains("__debezium_unavailable_value")));
}
