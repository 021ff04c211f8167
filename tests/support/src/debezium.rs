//! Debezium in the stack's Kafka Connect (`--with debezium`), the reference
//! the compatibility tests compare walcast with: its REST API, a guard that
//! removes a connector when the test ends, and the wait for its slot.

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::pg::TestDb;
use crate::stack::var;

/// A Kafka Connect REST call: (status code, JSON body or null).
pub async fn connect_rest(method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    let url = format!("{}{path}", var("WALCAST_TEST_CONNECT_URL"));
    let c = reqwest::Client::new();
    let req = match method {
        "POST" => c.post(&url).json(&body.unwrap()),
        "DELETE" => c.delete(&url),
        _ => c.get(&url),
    };
    let resp = req.send().await.expect("Kafka Connect REST");
    let code = resp.status().as_u16();
    (code, resp.json().await.unwrap_or(Value::Null))
}

/// Deletes the Debezium connector when the test ends, panics included, so
/// a failed run leaves no connector retrying against a dropped database.
pub struct ConnectorGuard(pub String);

impl Drop for ConnectorGuard {
    fn drop(&mut self) {
        let _ = Command::new("curl")
            .args(["-s", "-o", "/dev/null", "-X", "DELETE"])
            .arg(format!(
                "{}/connectors/{}",
                var("WALCAST_TEST_CONNECT_URL"),
                self.0
            ))
            .status();
    }
}

/// Creates `connector` with `config` (Debezium's PostgresConnector) and
/// waits until its slot `<connector>_slot` is active, so that what the test
/// writes next is streamed to it. The guard deletes the connector on drop.
pub async fn start_connector(
    db: &TestDb,
    connector: &str,
    config: Value,
    wait: Duration,
) -> ConnectorGuard {
    let (code, body) = connect_rest(
        "POST",
        "/connectors",
        Some(serde_json::json!({"name": connector, "config": config})),
    )
    .await;
    assert!(
        code == 201 || code == 200,
        "creating the Debezium connector: {code} {body}"
    );
    let guard = ConnectorGuard(connector.to_string());
    let deadline = Instant::now() + wait;
    loop {
        let active: Option<bool> = db
            .client
            .query_opt(
                "SELECT active FROM pg_replication_slots WHERE slot_name = $1",
                &[&format!("{connector}_slot")],
            )
            .await
            .unwrap()
            .map(|r| r.get(0));
        if active == Some(true) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "Debezium's slot never became active: {:?}",
            connect_rest("GET", &format!("/connectors/{connector}/status"), None).await
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    guard
}

/// Sets Apicurio's Avro converter for keys and values on a connector
/// config: the registry's native API (from its Confluent-compatible URL),
/// writing the Confluent wire format (magic byte, 4-byte content id: the
/// ids of the registry's Confluent API) without its own headers, as the
/// Avro parity tests compare it with walcast.
pub fn apicurio_avro_converter(config: &mut Value, ccompat_registry: &str) {
    let native = ccompat_registry.replace("/apis/ccompat/v7", "/apis/registry/v2");
    for side in ["key", "value"] {
        config[format!("{side}.converter")] =
            Value::from("io.apicurio.registry.utils.converter.AvroConverter");
        for (k, v) in [
            ("apicurio.registry.url", native.as_str()),
            ("apicurio.registry.auto-register", "true"),
            ("apicurio.registry.find-latest", "true"),
            ("apicurio.registry.as-confluent", "true"),
            ("apicurio.registry.use-id", "contentId"),
            ("apicurio.registry.headers.enabled", "false"),
        ] {
            config[format!("{side}.converter.{k}")] = Value::from(v);
        }
    }
}
