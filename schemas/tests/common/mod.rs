//! Helpers shared by the integration tests: the external registry's URL,
//! per-run names, table builders and an embedded registry served on a free
//! loopback port.

#![allow(dead_code)]

use std::path::Path;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use walcast_schemas::{EmbeddedRegistry, HttpRegistry, RegistryConfig};
use walcast_sdk::{Column, PgType, ReplicaIdentity, TableSchema};

/// The local stack's Apicurio (`deploy/local/stack env`).
pub fn registry_url() -> String {
    std::env::var("WALCAST_TEST_REGISTRY_URL").unwrap_or_else(|_| {
        panic!(
            "WALCAST_TEST_REGISTRY_URL is not set: start a registry with `deploy/local/stack up --only registry` \
             and run `eval \"$(deploy/local/stack env)\"` before these tests"
        )
    })
}

pub fn client(url: &str) -> HttpRegistry {
    HttpRegistry::new(&RegistryConfig::new(url)).expect("registry client")
}

/// A name no earlier run used, so subjects start empty.
pub fn unique(test: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("it{}_{}_{test}", std::process::id(), nanos)
}

pub fn column(name: &str, pg_type: PgType, key: bool) -> Column {
    Column {
        key_position: None,
        default: None,
        name: name.into(),
        pg_type,
        type_oid: 0,
        type_modifier: -1,
        nullable: !key,
        key,
    }
}

pub fn table(schema: &str, name: &str, version: u32, columns: Vec<Column>) -> Arc<TableSchema> {
    Arc::new(TableSchema {
        relation_id: 16_384 + version,
        schema: schema.into(),
        name: name.into(),
        columns,
        replica_identity: ReplicaIdentity::Default,
        version,
    })
}

/// An embedded registry served on 127.0.0.1:<free port> until dropped
/// (or [`Served::stop`]ped).
pub struct Served {
    pub url: String,
    pub registry: Arc<EmbeddedRegistry>,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<std::io::Result<()>>>,
}

impl Served {
    /// Serves the registry kept in `dir`, or an in-memory one.
    pub async fn start(dir: Option<&Path>) -> Served {
        let registry = Arc::new(match dir {
            Some(dir) => EmbeddedRegistry::open(dir).expect("open the embedded registry"),
            None => EmbeddedRegistry::new(),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (tx, rx) = oneshot::channel();
        let task = tokio::spawn(walcast_schemas::server::serve(
            registry.clone(),
            listener,
            async {
                let _ = rx.await;
            },
        ));
        Served {
            url,
            registry,
            shutdown: Some(tx),
            task: Some(task),
        }
    }

    /// Stops serving and waits for the server to finish.
    pub async fn stop(mut self) {
        let _ = self.shutdown.take().unwrap().send(());
        self.task.take().unwrap().await.unwrap().unwrap();
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// A fresh directory under the target directory (not /tmp, which may be
/// small), removed first if an earlier run left it.
pub fn scratch_dir(test: &str) -> std::path::PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../target/schemas-test-scratch")
        .join(unique(test));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
