//! walcast: Postgres change data capture as one small daemon.
//!
//! The binary wires the pieces together from the config file: each
//! pipeline's source (a Postgres slot) and sinks (Kafka, Redis, OpenSearch,
//! files), the admin HTTP server, logging, and systemd notification.

mod admin;
mod cli;
mod config;
mod pipeline;

/// mimalloc instead of glibc malloc: allocation was about a fifth of the
/// capture path's CPU time under glibc, and its per-thread arenas let RSS
/// creep on long runs (tests/bench/RESULTS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use tokio_util::sync::CancellationToken;

use cli::{Cli, Command, SlotsCommand};
use config::{LogFormat, PipelineConfig};
use walcast_postgres as capture;
use walcast_postgres::replication;
use walcast_sdk::status::PipelineState;
use walcast_sdk::TableName;

fn init_logging(format: LogFormat, level: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let json = match format {
        LogFormat::Json => true,
        LogFormat::Human => false,
        LogFormat::Auto => !std::io::stderr().is_terminal(),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .init();
    } else {
        builder.init();
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match runtime.block_on(dispatch(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("walcast: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Run { config } => run(&config).await,
        Command::Check { config, offline } => check(&config, offline).await,
        Command::Status {
            admin,
            token_file,
            ca_file,
        } => status(&admin, token_file.as_deref(), ca_file.as_deref()).await,
        Command::Tail {
            topic,
            bootstrap_servers,
            registry,
            from_beginning,
            max,
            idle_timeout,
        } => {
            tail(
                &topic,
                &bootstrap_servers,
                registry.as_deref(),
                from_beginning,
                max,
                idle_timeout,
            )
            .await
        }
        Command::Snapshot {
            config,
            pipeline,
            stop,
            tables,
        } => snapshot_signal(&config, pipeline.as_deref(), stop, &tables).await,
        Command::Slots {
            command: SlotsCommand::Drop { config, pipeline },
        } => slots_drop(&config, &pipeline).await,
    }
}

async fn run(path: &std::path::Path) -> anyhow::Result<ExitCode> {
    let cfg = config::load(path)?;
    init_logging(cfg.log.format, &cfg.log.level);
    // Read before logging was set up; said now.
    for w in walcast_sdk::duration::take_deprecations() {
        tracing::warn!(config = %path.display(), "{w}");
    }
    let prometheus = admin::install_recorder();
    let shutdown = CancellationToken::new();

    if let Some(reg) = &cfg.embedded_registry {
        let registry = std::sync::Arc::new(
            walcast_schemas::EmbeddedRegistry::open(&reg.dir)
                .with_context(|| format!("embedded_registry.dir = {}", reg.dir.display()))?,
        );
        if let Some(listen) = &reg.listen {
            // Bound before any pipeline starts: schemas register on the first event.
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .with_context(|| format!("embedded_registry.listen = {listen}"))?;
            let sd = shutdown.clone();
            tokio::spawn(async move {
                if let Err(e) = walcast_schemas::server::serve(registry, listener, async move {
                    sd.cancelled().await
                })
                .await
                {
                    tracing::error!(error = %e, "embedded schema registry stopped");
                }
            });
        }
    }
    let mut runnables = Vec::new();
    for (name, p) in &cfg.pipelines {
        runnables.push(pipeline::build(name, p).await?);
    }
    let statuses: Vec<_> = runnables.iter().map(|r| r.status.clone()).collect();

    if let Some(addr) = cfg.admin.address() {
        let addr = addr.context("admin.listen")?;
        let security = admin::Security::load(&cfg.admin)?;
        let (p, s, sd) = (prometheus.clone(), statuses.clone(), shutdown.clone());
        let listener_check = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on admin.listen = {addr}"))?;
        drop(listener_check);
        tokio::spawn(async move {
            if let Err(e) = admin::serve(addr, p, s, security, sd).await {
                tracing::error!(error = %e, "admin HTTP server stopped");
            }
        });
    }

    {
        let sd = shutdown.clone();
        tokio::spawn(async move {
            wait_for_signal().await;
            tracing::info!("shutting down: draining in-flight events");
            sd.cancel();
        });
    }
    tokio::spawn(systemd_notify(statuses.clone(), shutdown.clone()));

    let mut tasks = tokio::task::JoinSet::new();
    for r in runnables {
        let sd = shutdown.clone();
        let name = r.name.clone();
        tasks.spawn(async move { (name, r.run(sd).await) });
    }
    let mut failed = false;
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok((name, Err(e))) => {
                tracing::error!(pipeline = %name, error = %e, "pipeline stopped");
                failed = true;
                // One definite failure stops the daemon, so a supervisor
                // restarts it and the operator sees it.
                shutdown.cancel();
            }
            Ok((_, Ok(()))) => {}
            Err(e) => {
                tracing::error!(error = %e, "pipeline task panicked");
                failed = true;
                shutdown.cancel();
            }
        }
    }
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

/// READY=1 once every pipeline streams; WATCHDOG=1 while the process runs.
async fn systemd_notify(statuses: Vec<walcast_sdk::StatusHandle>, shutdown: CancellationToken) {
    let watchdog = sd_notify::watchdog_enabled();
    let period = watchdog.map(|d| d / 2).unwrap_or(Duration::from_secs(1));
    let mut ready = false;
    let mut tick = tokio::time::interval(period.min(Duration::from_secs(1)));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        // A snapshot can take hours; it is progress, not a failed start, so
        // it must not run into systemd's start timeout.
        if !ready
            && statuses.iter().all(|s| {
                matches!(
                    s.snapshot().state,
                    PipelineState::Streaming | PipelineState::Snapshotting
                )
            })
        {
            ready = true;
            let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
            tracing::info!("all pipelines streaming");
        }
        if watchdog.is_some() {
            let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
        }
    }
}

async fn check(path: &std::path::Path, offline: bool) -> anyhow::Result<ExitCode> {
    let cfg = config::load(path)?;
    println!(
        "config {}: valid ({} pipeline(s))",
        path.display(),
        cfg.pipelines.len()
    );
    for w in walcast_sdk::duration::take_deprecations() {
        println!("  warning: {w}");
    }
    if offline {
        return Ok(ExitCode::SUCCESS);
    }
    let mut ok = true;
    for (name, p) in &cfg.pipelines {
        match p {
            PipelineConfig::Capture(c) => {
                let s = pipeline::capture_settings(name, c)?;
                let client = match capture::catalog::connect(&s.connect).await {
                    Ok(c) => c,
                    Err(e) => {
                        println!("pipeline {name}: ERROR: {e}");
                        ok = false;
                        continue;
                    }
                };
                match capture::setup::plan(&client, &s.wanted).await {
                    Ok(plan) => {
                        println!(
                            "pipeline {name}: Postgres {}/{} OK",
                            replication::connection::describe_endpoints(&s.connect.endpoints),
                            s.connect.database
                        );
                        if s.connect.endpoints.len() > 1 {
                            println!(
                                "  hosts tried in order; target_session_attrs = {}",
                                s.connect.target_session_attrs.as_str()
                            );
                        }
                        if s.wanted.failover {
                            println!(
                                "  slot {}: failover slot{}",
                                s.wanted.slot,
                                if plan.enable_failover { " (walcast will ALTER the existing slot to one)" } else { "" }
                            );
                        }
                        for e in &s.connect.endpoints {
                            if let Some(w) = replication::tls::exposure_warning(&e.host, s.connect.sslmode) {
                                println!("  warning: {w}");
                            }
                        }
                        for w in &plan.warnings {
                            println!("  warning: {w}");
                        }
                        for t in &plan.tables {
                            println!("  table {t}: OK");
                        }
                        for p in &plan.partitioned {
                            let t = &p.table;
                            if s.wanted.via_root {
                                println!(
                                    "  table {t} is partitioned ({} partitions): published via the partition root, \
                                     so every partition's changes (and those of partitions attached later) go out as {t}",
                                    p.leaves.len()
                                );
                            } else {
                                println!(
                                    "  table {t} is partitioned: publish_via_partition_root = false, so each of its {} \
                                     partitions is captured as a table of its own (partitions attached later too)",
                                    p.leaves.len()
                                );
                            }
                        }
                        if let Some(sql) = &plan.set_via_root {
                            println!("  would change the publication: {sql}");
                        }
                        match (&plan.create_publication, &plan.alter_publication) {
                            (Some(sql), _) => println!("  would create publication: {sql}"),
                            (None, Some(sql)) => println!(
                                "  would add tables to the publication: {sql} (then read their rows with `walcast snapshot`)"
                            ),
                            (None, None) => println!(
                                "  publication {}: exists and covers the tables",
                                s.wanted.publication
                            ),
                        }
                        if plan.create_slot {
                            println!(
                                "  would create replication slot {} (pgoutput)",
                                s.wanted.slot
                            );
                        } else {
                            println!(
                                "  replication slot {}: exists, confirmed up to {}",
                                s.wanted.slot,
                                plan.slot_confirmed_lsn.as_deref().unwrap_or("?")
                            );
                        }
                    }
                    Err(e) => {
                        println!("pipeline {name}: ERROR: {e}");
                        ok = false;
                    }
                }
                ok &= check_contracts(name, c, &s, client).await;
                ok &= check_kafka_sinks(name, c, &s).await;
                ok &= check_search_sinks(name, c, &s).await;
            }
            PipelineConfig::Relay(r) => {
                if r.sinks
                    .iter()
                    .any(|s| matches!(s, config::SinkConfig::Elasticsearch(e) if e.manage_mappings))
                {
                    let untyped = walcast_sdk::TableSchema {
                        relation_id: 0,
                        schema: String::new(),
                        name: String::new(),
                        columns: Vec::new(),
                        replica_identity: walcast_sdk::ReplicaIdentity::Default,
                        version: 0,
                    };
                    println!(
                        "  elasticsearch: each index is mapped from its topic's Avro writer schema before the first write; \
                         JSON topics carry no types and get only the untyped mapping {}",
                        walcast_elasticsearch::mapping::index_mapping(&untyped, &Default::default())
                    );
                }
                println!(
                    "pipeline {name}: relay from Kafka {} (group {}) to {}",
                    r.source.bootstrap_servers,
                    r.source.group_id,
                    r.sinks
                        .iter()
                        .map(|s| s.kind())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
        }
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Checks each captured table that has a data contract against the schema
/// walcast would derive from it now, as `run` does before the first event.
async fn check_contracts(
    name: &str,
    c: &config::CaptureConfig,
    s: &capture::CaptureSettings,
    client: tokio_postgres::Client,
) -> bool {
    let (config::EventFormat::Avro, Some(r)) = (c.format, &c.registry) else {
        return true;
    };
    let contracts = match r.load_contracts() {
        Ok(Some(contracts)) => contracts,
        Ok(None) => return true,
        Err(e) => {
            println!("pipeline {name}: ERROR: registry.contracts: {e}");
            return false;
        }
    };
    let options = r.mapping_options();
    let mut catalog = capture::catalog::Catalog::new(client).for_publication(&s.wanted.publication);
    let mut ok = true;
    for wanted in &s.wanted.tables {
        let Some(contract) = contracts.get(&wanted.schema, &wanted.name) else {
            continue;
        };
        let path = contract.path.display();
        let table = match catalog.table_schema_by_name(wanted).await {
            Ok(table) => table,
            Err(e) => {
                println!("pipeline {name}: ERROR: contract {path}: {e}");
                ok = false;
                continue;
            }
        };
        match contracts.check_table(&table.schema, &s.assemble.name, &options) {
            Ok(()) => println!("  contract {path}: table {wanted} matches"),
            Err(e) => {
                println!("pipeline {name}: ERROR: {e}");
                ok = false;
            }
        }
    }
    ok
}

/// Reports the topics and subjects a capture would publish to.
async fn check_kafka_sinks(
    name: &str,
    c: &config::CaptureConfig,
    s: &capture::CaptureSettings,
) -> bool {
    let mut ok = true;
    for sink in &c.sinks {
        let config::SinkConfig::Kafka(k) = sink else {
            continue;
        };
        let k = pipeline::kafka_config(k, &s.assemble.name);
        match tokio::time::timeout(
            Duration::from_secs(15),
            walcast_kafka::KafkaSink::check(&k, &s.wanted.tables),
        )
        .await
        {
            Ok(Ok(topics)) => {
                for t in topics {
                    let state = match t.state {
                        walcast_kafka::TopicState::Exists { partitions } => {
                            format!("exists ({partitions} partitions)")
                        }
                        walcast_kafka::TopicState::WouldCreate { .. } => {
                            "would be created".to_string()
                        }
                        other => format!("{other:?}"),
                    };
                    println!("  kafka: table {} -> topic {}: {state}", t.table, t.topic);
                }
            }
            Ok(Err(e)) => {
                println!("pipeline {name}: ERROR: kafka: {e}");
                ok = false;
            }
            Err(_) => {
                println!(
                    "pipeline {name}: ERROR: kafka: no answer from {} within 15 s",
                    k.bootstrap_servers
                );
                ok = false;
            }
        }
        if let (config::EventFormat::Avro, Some(r)) = (c.format, &c.registry) {
            let router =
                walcast_kafka::topic::TopicRouter::new(k.topic_prefix.clone(), k.routes.clone());
            ok &= check_registry(name, r, s, &router).await;
        }
    }
    ok
}

/// Shows the index each captured table goes to and the mapping walcast
/// would create it with, or what an existing index lacks or contradicts.
async fn check_search_sinks(
    name: &str,
    c: &config::CaptureConfig,
    s: &capture::CaptureSettings,
) -> bool {
    let sinks: Vec<_> = c
        .sinks
        .iter()
        .filter_map(|k| match k {
            config::SinkConfig::Elasticsearch(e) if e.manage_mappings => Some(e),
            _ => None,
        })
        .collect();
    if sinks.is_empty() {
        return true;
    }
    let client = match capture::catalog::connect(&s.connect).await {
        Ok(c) => c,
        Err(e) => {
            println!("pipeline {name}: ERROR: {e}");
            return false;
        }
    };
    let mut catalog = capture::catalog::Catalog::new(client).for_publication(&s.wanted.publication);
    let mut tables = Vec::new();
    for wanted in &s.wanted.tables {
        match catalog.table_schema_by_name(wanted).await {
            Ok(table) => tables.push(table.schema.as_ref().clone()),
            Err(e) => {
                println!("pipeline {name}: ERROR: elasticsearch: table {wanted}: {e}");
                return false;
            }
        }
    }
    let mut ok = true;
    for e in sinks {
        match walcast_elasticsearch::sink::plan_indices(e, &tables).await {
            Ok(plans) => {
                for (table, plan) in plans {
                    match plan {
                        walcast_elasticsearch::sink::IndexPlan::WouldCreate { index, mapping } => println!(
                            "  elasticsearch: table {table} -> index {index}: would be created with mapping {mapping}"
                        ),
                        walcast_elasticsearch::sink::IndexPlan::Exists { index, diff } => {
                            let missing: Vec<&String> = diff.missing.keys().collect();
                            println!(
                                "  elasticsearch: table {table} -> index {index}: exists{}",
                                if missing.is_empty() { String::new() } else {
                                    format!("; would add fields {}", serde_json::Value::Object(diff.missing.clone()))
                                }
                            );
                            for conflict in &diff.conflicts {
                                println!(
                                    "  elasticsearch: WARNING: index {index}: {conflict}; OpenSearch cannot change a field's type: \
                                     documents that do not fit go to the dead letter until the table is reindexed into a new index"
                                );
                            }
                        }
                    }
                }
            }
            Err(err) => {
                println!("pipeline {name}: ERROR: {err}");
                ok = false;
            }
        }
    }
    ok
}

/// Asks the registry whether each captured table's key and value schemas,
/// as this config derives them, would be accepted under their subjects'
/// compatibility levels: a change of mapping options (say
/// `unconstrained_numeric`) or of a column type that the registry would
/// refuse is reported here, before `run` stops on it.
async fn check_registry(
    name: &str,
    r: &walcast_schemas::RegistryConfig,
    s: &capture::CaptureSettings,
    router: &walcast_kafka::topic::TopicRouter,
) -> bool {
    use walcast_schemas::registry::VersionRef;
    let registry = match walcast_schemas::HttpRegistry::new(r) {
        Ok(reg) => reg,
        Err(e) => {
            println!("pipeline {name}: ERROR: registry: {e}");
            return false;
        }
    };
    let client = match capture::catalog::connect(&s.connect).await {
        Ok(c) => c,
        Err(e) => {
            println!("pipeline {name}: ERROR: {e}");
            return false;
        }
    };
    let options = r.mapping_options();
    let mut catalog = capture::catalog::Catalog::new(client).for_publication(&s.wanted.publication);
    let mut ok = true;
    for wanted in &s.wanted.tables {
        let table = match catalog.table_schema_by_name(wanted).await {
            Ok(table) => table,
            Err(e) => {
                println!("pipeline {name}: ERROR: registry: table {wanted}: {e}");
                ok = false;
                continue;
            }
        };
        let schemas =
            match walcast_schemas::mapping::derive(&table.schema, &s.assemble.name, &options) {
                Ok(schemas) => schemas,
                Err(e) => {
                    println!("pipeline {name}: ERROR: registry: table {wanted}: {e}");
                    ok = false;
                    continue;
                }
            };
        let topic = router.name(&wanted.schema, &wanted.name);
        let parts = [(schemas.key.as_ref(), true), (Some(&schemas.value), false)];
        for (schema, is_key) in parts {
            let Some(schema) = schema else { continue };
            let subject = r.subject_strategy.subject(&topic, schema, is_key);
            match registry
                .check_compatibility_with(&subject, VersionRef::Latest, schema)
                .await
            {
                Ok(c) if c.is_compatible => {
                    println!("  registry: subject {subject}: the schema of {wanted} is accepted (new or compatible)")
                }
                Ok(c) => {
                    println!(
                        "pipeline {name}: ERROR: registry: subject {subject} would refuse the schema of {wanted} as incompatible \
                         with its latest version{}; run would stop at the table's first event. Revert the change, register under \
                         a new subject (another topic), or relax the subject's compatibility (PUT /config/{subject})",
                        if c.messages.is_empty() { String::new() } else { format!(": {}", c.messages.join("; ")) }
                    );
                    ok = false;
                }
                Err(e) => {
                    println!("pipeline {name}: ERROR: registry: subject {subject}: {e}");
                    ok = false;
                }
            }
        }
    }
    ok
}

async fn status(
    admin: &str,
    token_file: Option<&std::path::Path>,
    ca_file: Option<&std::path::Path>,
) -> anyhow::Result<ExitCode> {
    let url = if admin.contains("://") {
        format!("{}/status", admin.trim_end_matches('/'))
    } else {
        format!("http://{admin}/status")
    };
    let mut client = reqwest::Client::builder();
    if let Some(ca) = ca_file {
        let pem = std::fs::read(ca).with_context(|| format!("--ca-file {}", ca.display()))?;
        client = client.add_root_certificate(
            reqwest::Certificate::from_pem(&pem)
                .with_context(|| format!("--ca-file {}", ca.display()))?,
        );
    }
    let mut request = client.build()?.get(&url);
    if let Some(path) = token_file {
        let token = std::fs::read_to_string(path)
            .with_context(|| format!("--token-file {}", path.display()))?;
        request = request.bearer_auth(token.trim());
    }
    let response = request
        .send()
        .await
        .with_context(|| format!("cannot reach the daemon at {url}"))?;
    anyhow::ensure!(
        response.status() != reqwest::StatusCode::UNAUTHORIZED,
        "the daemon at {url} wants its admin token: pass --token-file (or WALCAST_ADMIN_TOKEN_FILE)"
    );
    let body = response.text().await?;
    let v: serde_json::Value =
        serde_json::from_str(&body).context("the daemon's /status is not JSON")?;
    for p in v["pipelines"].as_array().into_iter().flatten() {
        println!(
            "{:<20} {:<10} confirmed={} wal_end={} lag_bytes={} in_flight={} events={}{}",
            p["name"].as_str().unwrap_or("?"),
            p["state"].as_str().unwrap_or("?"),
            p["confirmed_lsn"].as_str().unwrap_or("-"),
            p["wal_end"].as_str().unwrap_or("-"),
            p["lag_bytes"],
            p["in_flight_events"],
            p["events_total"],
            p["last_error"]
                .as_str()
                .map(|e| format!(" last_error={e}"))
                .unwrap_or_default(),
        );
        // Snapshots in progress (or just finished): rows, estimate, rate, ETA.
        for (what, g) in p["progress"].as_object().into_iter().flatten() {
            println!(
                "  {what}: {} rows={}/{} rows_per_second={} eta_seconds={}{}",
                g["state"].as_str().unwrap_or("?"),
                g["rows"],
                g["estimated_total"],
                g["rows_per_second"],
                g["eta_seconds"],
                g["table"]
                    .as_str()
                    .map(|t| format!(" table={t}"))
                    .unwrap_or_default(),
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn tail(
    topic: &str,
    bootstrap: &str,
    registry: Option<&str>,
    from_beginning: bool,
    max: Option<usize>,
    idle_timeout: Option<Duration>,
) -> anyhow::Result<ExitCode> {
    use rdkafka::consumer::{Consumer, StreamConsumer};
    use rdkafka::Message;
    let consumer: StreamConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", format!("walcast-tail-{}", std::process::id()))
        .set("enable.auto.commit", "false")
        .set(
            "auto.offset.reset",
            if from_beginning { "earliest" } else { "latest" },
        )
        .set("isolation.level", "read_committed")
        .create()
        .context("creating the Kafka consumer")?;
    consumer.subscribe(&[topic]).context("subscribing")?;
    let decoder = match registry {
        Some(url) => Some(walcast_schemas::AvroDecoder::new(std::sync::Arc::new(
            walcast_schemas::HttpRegistry::new(&walcast_schemas::RegistryConfig::new(url))?,
        ))),
        None => None,
    };
    let decode = async |bytes: &[u8]| -> anyhow::Result<serde_json::Value> {
        if bytes.first() == Some(&0) {
            let d = decoder
                .as_ref()
                .context("an Avro record: pass --registry URL to decode it")?;
            Ok(d.decode(bytes).await?.1)
        } else {
            Ok(serde_json::from_slice(bytes).unwrap_or_else(|_| {
                serde_json::Value::String(String::from_utf8_lossy(bytes).into_owned())
            }))
        }
    };
    let mut n = 0;
    loop {
        let next = consumer.recv();
        let m = match idle_timeout {
            Some(t) => match tokio::time::timeout(t, next).await {
                Ok(m) => m,
                Err(_) => break,
            },
            None => next.await,
        }
        .context("reading from Kafka")?;
        let key = match m.key() {
            Some(k) => decode(k).await?,
            None => serde_json::Value::Null,
        };
        let value = match m.payload() {
            Some(v) => decode(v).await?,
            None => serde_json::Value::Null,
        };
        println!(
            "{}",
            serde_json::json!({"topic": m.topic(), "partition": m.partition(), "offset": m.offset(), "key": key, "value": value})
        );
        n += 1;
        if max.is_some_and(|max| n >= max) {
            break;
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn slots_drop(path: &std::path::Path, name: &str) -> anyhow::Result<ExitCode> {
    let cfg = config::load(path)?;
    let p = cfg
        .pipelines
        .get(name)
        .with_context(|| format!("no pipeline named {name} in {}", path.display()))?;
    let PipelineConfig::Capture(c) = p else {
        anyhow::bail!("pipeline {name} is a relay; it has no replication slot")
    };
    let s = pipeline::capture_settings(name, c)?;
    let client = capture::catalog::connect(&s.connect).await?;
    if capture::setup::drop_slot(&client, &s.wanted.slot).await? {
        println!("dropped replication slot {}", s.wanted.slot);
        // A snapshot's progress belongs to the slot it started with.
        for state in [&s.snapshot.state_path, &s.snapshot.incremental_state_path] {
            if std::fs::remove_file(state).is_ok() {
                println!("removed snapshot state {}", state.display());
            }
        }
    } else {
        println!("replication slot {} does not exist", s.wanted.slot);
    }
    Ok(ExitCode::SUCCESS)
}

/// `walcast snapshot`: checks the tables are captured and in the
/// publication, then writes the signal the daemon reads from its stream.
async fn snapshot_signal(
    path: &std::path::Path,
    pipeline: Option<&str>,
    stop: bool,
    tables: &[String],
) -> anyhow::Result<ExitCode> {
    use capture::incremental::{send_signal, Signal};
    if tables.is_empty() && !stop {
        anyhow::bail!("name at least one table to snapshot (schema.table), or --stop");
    }
    let cfg = config::load(path)?;
    let captures: Vec<&String> = cfg
        .pipelines
        .iter()
        .filter(|(_, p)| matches!(p, PipelineConfig::Capture(_)))
        .map(|(n, _)| n)
        .collect();
    let name = match pipeline {
        Some(n) => n.to_string(),
        None if captures.len() == 1 => captures[0].clone(),
        None => anyhow::bail!(
            "{} has {} capture pipelines ({}); choose one with --pipeline",
            path.display(),
            captures.len(),
            captures
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let p = cfg
        .pipelines
        .get(&name)
        .with_context(|| format!("no pipeline named {name} in {}", path.display()))?;
    let PipelineConfig::Capture(c) = p else {
        anyhow::bail!("pipeline {name} is a relay; snapshots read Postgres tables")
    };
    let s = pipeline::capture_settings(&name, c)?;
    let client = capture::catalog::connect(&s.connect).await?;
    let mut names = Vec::new();
    for t in tables {
        let wanted = TableName::parse(t)
            .or_else(|| (!t.contains('.')).then(|| TableName::new("public", t)))
            .with_context(|| format!("{t} is not a table name (schema.table)"))?;
        let qualified = wanted.to_string();
        let captured =
            s.wanted.tables.contains(&wanted) || s.wanted.schemas.contains(&wanted.schema);
        if !captured {
            anyhow::bail!(
                "pipeline {name} does not capture {qualified}: add it to `source.tables` in {} and restart walcast \
                 (it adds the table to the publication and streams its changes), then run this command again",
                path.display()
            );
        }
        let published = client
            .query_opt(
                "SELECT 1 FROM pg_publication_tables WHERE pubname = $1 AND schemaname = $2 AND tablename = $3",
                &[&s.wanted.publication, &wanted.schema, &wanted.name],
            )
            .await?
            .is_some();
        if !published {
            anyhow::bail!(
                "{qualified} is not in publication {} yet, so its changes are not streamed: restart walcast with the \
                 updated config (it adds the table) or run ALTER PUBLICATION {} ADD TABLE {}, then run this command again",
                s.wanted.publication,
                walcast_sdk::table::quote_ident(&s.wanted.publication),
                wanted.quoted(),
            );
        }
        // Quoted where needed, so the daemon splits it back the same way.
        names.push(wanted.to_config_string());
    }
    let signal = Signal {
        kind: if stop {
            "stop-snapshot"
        } else {
            "execute-snapshot"
        }
        .into(),
        pipeline: Some(name.clone()),
        tables: names.clone(),
    };
    let lsn = send_signal(&client, &signal).await?;
    if stop {
        println!("asked pipeline {name} to stop its incremental snapshot (signal at LSN {lsn})");
    } else {
        println!(
            "asked pipeline {name} to snapshot {} (signal at LSN {lsn}); a running walcast picks it up from its \
             replication stream, a stopped one when it starts. Progress: `walcast status`",
            names.join(", ")
        );
    }
    Ok(ExitCode::SUCCESS)
}
