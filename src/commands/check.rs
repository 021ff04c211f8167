//! `walcast check`: what `run` would do, without doing it: the config, Postgres
//! (publication, slot, tables, partitions), the registry, Kafka topics and
//! index mappings; exit 1 on any error.

use std::process::ExitCode;
use std::time::Duration;

use crate::config::{self, PipelineConfig};
use crate::pipeline;
use walcast_postgres as capture;
use walcast_postgres::replication;

pub(crate) async fn check(path: &std::path::Path, offline: bool) -> anyhow::Result<ExitCode> {
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
                                if plan.enable_failover {
                                    " (walcast will ALTER the existing slot to one)"
                                } else {
                                    ""
                                }
                            );
                        }
                        for e in &s.connect.endpoints {
                            if let Some(w) =
                                replication::tls::exposure_warning(&e.host, s.connect.sslmode)
                            {
                                println!("  warning: {w}");
                            }
                        }
                        for w in &plan.warnings {
                            println!("  warning: {w}");
                        }
                        for t in &plan.tables {
                            match plan.row_filters.iter().find(|(f, _)| f == t) {
                                Some((_, f)) => println!("  table {t}: OK, row filter WHERE {f}"),
                                None => println!("  table {t}: OK"),
                            }
                        }
                        for (t, f) in &plan.row_filters {
                            if !plan.tables.contains(t) {
                                // A partitioned table, published via its root.
                                println!("  table {t}: row filter WHERE {f}");
                            }
                        }
                        for (t, sql) in &plan.set_row_filters {
                            println!("  would change the row filter of {t}: {sql}");
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
                check_notices(c, &s, &client).await;
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

/// Reports what the pipeline publishes besides row changes: heartbeats,
/// schema changes (and whether the DDL trigger is there), outbox messages.
async fn check_notices(
    c: &config::CaptureConfig,
    s: &capture::CaptureSettings,
    client: &tokio_postgres::Client,
) {
    let prefix = &s.assemble.name;
    if let Some(h) = &c.heartbeat {
        println!(
            "  heartbeat: every {} to topic {}{}",
            humantime::format_duration(h.interval),
            h.topic(prefix),
            match &h.action_query {
                Some(q) => format!(", after running the action query: {q}"),
                None => ", no action query".into(),
            }
        );
    }
    if let Some(sc) = &c.schema_changes {
        println!(
            "  schema changes: to topic {} (JSON; a captured table's old and new columns)",
            sc.topic(prefix)
        );
        if sc.ddl_capture {
            let trigger = capture::schema_change::DDL_TRIGGER;
            match client
                .query_opt(
                    "SELECT 1 FROM pg_event_trigger WHERE evtname = $1",
                    &[&trigger],
                )
                .await
            {
                Ok(Some(_)) => println!("  ddl_capture: event trigger {trigger} is installed"),
                Ok(None) => println!(
                    "  ddl_capture: would install event trigger {trigger} (needs a superuser): {}",
                    capture::schema_change::ddl_trigger_sql()
                ),
                Err(e) => {
                    println!("  warning: ddl_capture: cannot look for event trigger {trigger}: {e}")
                }
            }
        }
    }
    for sink in &c.sinks {
        let config::SinkConfig::Kafka(k) = sink else {
            continue;
        };
        if let Some(o) = &k.outbox {
            if let Some(t) = &o.table {
                println!("  outbox: inserts into {t} become messages on {}", o.topic);
            }
            if let Some(p) = &o.message_prefix {
                println!(
                    "  outbox: logical messages with prefix '{p}' (pg_logical_emit_message) become messages on {}",
                    o.topic
                );
            }
        }
    }
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
            walcast_kafka::KafkaSink::check_with_notices(
                &k,
                &s.wanted.tables,
                &pipeline::notice_topics(c, &s.assemble.name),
            ),
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
                    let what = if walcast_sdk::TableName::parse(&t.table).is_some() {
                        format!("table {}", t.table)
                    } else {
                        t.table.clone()
                    };
                    println!("  kafka: {what} -> topic {}: {state}", t.topic);
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
            match walcast_kafka::topic::TopicRouter::new(k.topic_prefix.clone(), k.routes.clone()) {
                Ok(router) => ok &= check_registry(name, r, s, &router).await,
                Err(e) => {
                    println!("pipeline {name}: ERROR: {e}");
                    ok = false;
                }
            }
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
        let (topic, key_field) = router.resolve(&wanted.schema, &wanted.name);
        // The key as a topic route sends it: with the table's identifier.
        let derived = walcast_schemas::mapping::derive(&table.schema, &s.assemble.name, &options)
            .and_then(|mut schemas| {
                if let (Some(f), Some(k)) = (&key_field, &schemas.key) {
                    schemas.key = Some(walcast_schemas::mapping::with_key_field(
                        k,
                        &f.name,
                        &wanted.to_string(),
                    )?);
                }
                Ok(schemas)
            });
        let schemas = match derived {
            Ok(schemas) => schemas,
            Err(e) => {
                println!("pipeline {name}: ERROR: registry: table {wanted}: {e}");
                ok = false;
                continue;
            }
        };
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
