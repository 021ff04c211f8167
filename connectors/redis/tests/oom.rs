//! maxmemory behaviour. A file of its own: it fills the shared test Redis,
//! and test binaries run one after another, so no other test sees it.

mod common;

use common::*;
use walcast_redis::{Mode, UpsertFormat};
use walcast_sdk::Value;

#[tokio::test]
async fn reaching_maxmemory_fails_the_batch_with_a_clear_message() {
    let name = unique_table("oom");
    let t = table(&name, &[("id", true), ("blob", false)]);
    let mut r = client().await;
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory-policy")
        .arg("noeviction")
        .query_async(&mut r)
        .await
        .unwrap();
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg("1mb")
        .query_async(&mut r)
        .await
        .unwrap();

    let mut sink = sink(Mode::Upsert {
        key_template: "{table}:{id}".into(),
        format: UpsertFormat::Json,
        ttl_secs: None,
        tombstone_ttl_secs: 60,
        truncate_scan: true,
    })
    .await;
    let blob = "x".repeat(64 * 1024);
    let mut outcome = Ok(());
    for i in 0..200 {
        let rows = (0..4)
            .map(|j| upsert(&t, vec![Value::Int32(i * 4 + j), text(&blob)], 1 + i as u64))
            .collect();
        outcome = send(&mut sink, rows).await;
        if outcome.is_err() {
            break;
        }
    }

    // Put the server back before asserting, so a failure leaves it usable.
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg("0")
        .query_async(&mut r)
        .await
        .unwrap();
    let mut cursor = 0u64;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("*{name}*"))
            .query_async(&mut r)
            .await
            .unwrap();
        if !keys.is_empty() {
            let _: i64 = redis::cmd("DEL")
                .arg(&keys)
                .query_async(&mut r)
                .await
                .unwrap();
        }
        if next == 0 {
            break;
        }
        cursor = next;
    }

    let reason = outcome.expect_err("50 MB of writes must exceed maxmemory 1mb");
    assert!(reason.contains("maxmemory reached"), "{reason}");
    assert!(
        reason.contains(&name) && reason.contains("LSN"),
        "the message names the table and LSN: {reason}"
    );
}
