//! Reading and validating the file.

use std::path::{Path, PathBuf};

use config::{File, FileFormat};

use super::model::*;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("config file {path}: `{key}`: {message}")]
    Rule {
        path: PathBuf,
        key: String,
        message: String,
    },
}

/// Loads a file and the WALCAST_ environment.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.into(),
        source,
    })?;
    let format = match path.extension().and_then(|e| e.to_str()) {
        Some("yaml") | Some("yml") => FileFormat::Yaml,
        _ => FileFormat::Toml,
    };
    parse(path, &text, format, true)
}

/// Parses TOML text (tests); no environment layer.
#[cfg(test)]
pub fn load_str(name: &str, text: &str) -> Result<Config, ConfigError> {
    parse(Path::new(name), text, FileFormat::Toml, false)
}

fn parse(path: &Path, text: &str, format: FileFormat, env: bool) -> Result<Config, ConfigError> {
    let invalid = |message: String| ConfigError::Invalid {
        path: path.into(),
        message,
    };
    let mut builder = config::Config::builder().add_source(File::from_str(text, format));
    if env {
        for (key, value) in env_overrides(std::env::vars()) {
            builder = builder
                .set_override(key, value)
                .map_err(|e| invalid(e.to_string()))?;
        }
    }
    let raw = builder.build().map_err(|e| invalid(e.to_string()))?;
    let top: TopLevel = raw
        .clone()
        .try_deserialize()
        .map_err(|e| invalid(e.to_string()))?;
    let mut pipelines = std::collections::BTreeMap::new();
    for (name, kind) in top.pipelines {
        let key = format!("pipelines.{name}");
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            return Err(ConfigError::Rule {
                path: path.into(),
                key,
                message: "pipeline names use letters, digits, `_` and `-`".into(),
            });
        }
        // serde_path_to_error keeps the path inside the pipeline, which the
        // config crate's own errors do not.
        let value: config::Value = raw.get(&key).map_err(|e| invalid(e.to_string()))?;
        let at = |e: serde_path_to_error::Error<config::ConfigError>| ConfigError::Rule {
            path: path.into(),
            key: format!("{key}.{}", e.path()),
            message: e.into_inner().to_string(),
        };
        let p = match kind.kind.as_deref() {
            Some("capture") => {
                PipelineConfig::Capture(serde_path_to_error::deserialize(value).map_err(at)?)
            }
            Some("relay") => {
                PipelineConfig::Relay(serde_path_to_error::deserialize(value).map_err(at)?)
            }
            Some(other) => {
                return Err(ConfigError::Rule {
                    path: path.into(),
                    key: format!("{key}.kind"),
                    message: format!("unknown kind {other:?}; expected \"capture\" or \"relay\""),
                })
            }
            None => {
                return Err(ConfigError::Rule {
                    path: path.into(),
                    key: format!("{key}.kind"),
                    message: "missing: set kind = \"capture\" or \"relay\"".into(),
                })
            }
        };
        pipelines.insert(name, p);
    }
    let cfg = Config {
        admin: top.admin,
        log: top.log,
        embedded_registry: top.embedded_registry,
        pipelines,
    };
    validate(path, &cfg)?;
    Ok(cfg)
}

/// `WALCAST_PIPELINES__ORDERS__SOURCE__PASSWORD=x` becomes
/// `pipelines.orders.source.password = "x"`. Only variables whose first
/// level is a top-level key count, so `WALCAST_CONFIG` and the test suite's
/// `WALCAST_TEST_*` never reach the config. Keys are lowercased, as the
/// environment is conventionally upper case: pipeline names overridden this
/// way must be lower case in the file.
fn env_overrides(vars: impl Iterator<Item = (String, String)>) -> Vec<(String, String)> {
    const TOP: &[&str] = &["admin", "log", "pipelines"];
    let mut out: Vec<(String, String)> = vars
        .filter_map(|(k, v)| {
            let rest = k.strip_prefix("WALCAST_")?;
            let parts: Vec<String> = rest.split("__").map(|p| p.to_lowercase()).collect();
            (parts.len() >= 2 && TOP.contains(&parts[0].as_str())).then(|| (parts.join("."), v))
        })
        .collect();
    out.sort();
    out
}

fn validate(path: &Path, cfg: &Config) -> Result<(), ConfigError> {
    let rule = |key: String, message: &str| ConfigError::Rule {
        path: path.into(),
        key,
        message: message.into(),
    };
    if cfg.pipelines.is_empty() {
        return Err(rule(
            "pipelines".into(),
            "no pipeline is defined; add a [pipelines.NAME] section",
        ));
    }
    if let Some(Err(e)) = cfg.admin.address() {
        return Err(rule(
            "admin.listen".into(),
            &format!("not a socket address (host:port): {e}"),
        ));
    }
    for (name, p) in &cfg.pipelines {
        match p {
            PipelineConfig::Capture(c) => {
                let key = |k: &str| format!("pipelines.{name}.{k}");
                let s = &c.source;
                s.validate()
                    .map_err(|e| rule(key(&format!("source.{}", e.field)), &e.problem))?;
                for (t, shape) in &c.table {
                    let k = key(&format!("table.\"{t}\""));
                    if walcast_sdk::TableName::parse(t).is_none() {
                        return Err(rule(k, &format!("`{t}` is not of the form schema.table")));
                    }
                    let captured = s.tables.contains(t)
                        || s.schemas.iter().any(|sc| t.starts_with(&format!("{sc}.")));
                    if !captured {
                        return Err(rule(
                            k,
                            &format!(
                                "`{t}` is not captured by this pipeline (add it to source.tables)"
                            ),
                        ));
                    }
                    if let Err(m) = shape.validate(&k) {
                        return Err(rule(k, &m));
                    }
                    if let Some(f) = &shape.row_filter {
                        if f.trim().is_empty() {
                            return Err(rule(
                                format!("{k}.row_filter"),
                                "is empty; write a SQL condition (e.g. \"region = 'eu'\") or remove it",
                            ));
                        }
                        if let Some(sc) =
                            s.schemas.iter().find(|sc| t.starts_with(&format!("{sc}.")))
                        {
                            return Err(rule(
                                format!("{k}.row_filter"),
                                &format!(
                                    "schema `{sc}` is captured whole (source.schemas), and Postgres publishes every row of a schema \
                                     in the publication (FOR TABLES IN SCHEMA), ignoring a table's WHERE; capture `{t}` in a \
                                     pipeline that lists it in source.tables instead"
                                ),
                            ));
                        }
                    }
                }
                if c.sinks.is_empty() {
                    return Err(rule(
                        key("sinks"),
                        "a capture pipeline needs at least one sink",
                    ));
                }
                if c.max_in_flight_bytes < 64 * 1024 {
                    return Err(rule(
                        key("max_in_flight_bytes"),
                        "must be at least 64KiB, e.g. \"32MiB\"",
                    ));
                }
                if c.batch_max_events == 0 || c.max_in_flight_events < c.batch_max_events {
                    return Err(rule(
                        key("max_in_flight_events"),
                        "must be at least batch_max_events, which must be positive",
                    ));
                }
                let has_kafka = c.sinks.iter().any(|s| matches!(s, SinkConfig::Kafka(_)));
                if has_kafka && c.format == EventFormat::Avro && c.registry.is_none() {
                    return Err(rule(
                        key("registry"),
                        "format = \"avro\" (the default) needs a schema registry: add [pipelines.NAME.registry] url = \"http://...\", or set format = \"json\"",
                    ));
                }
                validate_sinks(path, &key, &c.sinks)?;
                if let Some(h) = &c.heartbeat {
                    if h.interval.is_zero() {
                        return Err(rule(
                            key("heartbeat.interval"),
                            "must be positive, e.g. \"10s\"",
                        ));
                    }
                    if h.action_query.as_ref().is_some_and(|q| q.trim().is_empty()) {
                        return Err(rule(
                            key("heartbeat.action_query"),
                            "must not be empty (leave it out instead)",
                        ));
                    }
                    if !has_kafka {
                        return Err(rule(
                            key("heartbeat"),
                            "heartbeat records are published to Kafka, and this pipeline has no kafka sink",
                        ));
                    }
                }
                if c.schema_changes.is_some() && !has_kafka {
                    return Err(rule(
                        key("schema_changes"),
                        "schema-change events are published to Kafka, and this pipeline has no kafka sink",
                    ));
                }
                if let (EventFormat::Avro, Some(r)) = (c.format, &c.registry) {
                    for (i, sink) in c.sinks.iter().enumerate() {
                        let SinkConfig::Kafka(k) = sink else { continue };
                        if !k.routes.regex.is_empty()
                            && r.subject_strategy == walcast_schemas::SubjectStrategy::TopicName
                        {
                            return Err(rule(
                                key(&format!("sinks[{i}].routes")),
                                "topic_regex routes can send several tables to one topic, whose Avro value schemas \
                                 differ, and the registry would refuse the second table's schema under the topic's \
                                 one subject; set registry.subject_strategy = \"topic_record_name\" (a subject per \
                                 table within the topic, Confluent's TopicRecordNameStrategy) or \"record_name\"",
                            ));
                        }
                    }
                }
                if !s.keyless_tables.is_empty() {
                    // Known from the config alone: those tables have no key,
                    // and these sinks name rows by their key.
                    for (i, sink) in c.sinks.iter().enumerate() {
                        let why = match sink {
                            SinkConfig::Elasticsearch(_) => "its document ids are primary keys",
                            SinkConfig::Redis(r) if r.needs_row_key() => {
                                "its key template names the row's key"
                            }
                            _ => continue,
                        };
                        return Err(rule(
                            key(&format!("sinks[{i}]")),
                            &format!(
                                "source.keyless_tables lists {}, but the {} sink cannot write rows without a primary key ({why}); \
                                 give those tables a key (or REPLICA IDENTITY USING INDEX), or capture them in a pipeline without this sink",
                                s.keyless_tables
                                    .iter()
                                    .map(|t| format!("`{t}`"))
                                    .collect::<Vec<_>>()
                                    .join(", "),
                                sink.kind()
                            ),
                        ));
                    }
                }
                if let Some(r) = &c.registry {
                    r.validate()
                        .map_err(|e| rule(key("registry"), &e.to_string()))?;
                }
            }
            PipelineConfig::Relay(r) => {
                let key = |k: &str| format!("pipelines.{name}.{k}");
                if r.sinks.is_empty() {
                    return Err(rule(
                        key("sinks"),
                        "a relay pipeline needs at least one sink",
                    ));
                }
                if r.sinks.iter().any(|s| matches!(s, SinkConfig::Kafka(_))) {
                    return Err(rule(
                        key("sinks"),
                        "a relay reads from Kafka; its sinks are redis, elasticsearch or file",
                    ));
                }
                r.source
                    .validate()
                    .map_err(|e| rule(key("source"), &e.to_string()))?;
                if let OnRefused::DeadLetter { topic } = &r.on_refused {
                    if topic.trim().is_empty() {
                        return Err(rule(
                            key("on_refused.dead_letter.topic"),
                            "must not be empty",
                        ));
                    }
                    let subscribed = match &r.source.subscribe {
                        walcast_kafka::Subscription::Topics(t) => t.contains(topic),
                        walcast_kafka::Subscription::Pattern(_) => r
                            .source
                            .subscription_names()
                            .first()
                            .and_then(|p| regex::Regex::new(p).ok())
                            .is_some_and(|re| re.is_match(topic)),
                    };
                    if subscribed {
                        return Err(rule(
                            key("on_refused.dead_letter.topic"),
                            &format!("`{topic}` is one the relay subscribes to, so it would read its own dead letters back; choose a topic outside `source.subscribe`"),
                        ));
                    }
                }
                validate_sinks(path, &key, &r.sinks)?;
                if let Some(reg) = &r.registry {
                    reg.validate()
                        .map_err(|e| rule(key("registry"), &e.to_string()))?;
                }
            }
        }
    }
    Ok(())
}

fn validate_sinks(
    path: &Path,
    key: &dyn Fn(&str) -> String,
    sinks: &[SinkConfig],
) -> Result<(), ConfigError> {
    for (i, s) in sinks.iter().enumerate() {
        let problem = match s {
            SinkConfig::File(_) => None,
            SinkConfig::Kafka(k) => k.validate().err().map(|e| e.to_string()),
            SinkConfig::Redis(r) => r.validate().err().map(|e| e.to_string()),
            SinkConfig::Elasticsearch(e) => e.validate().err().map(|e| e.to_string()),
        };
        if let Some(message) = problem {
            return Err(ConfigError::Rule {
                path: path.into(),
                key: key(&format!("sinks[{i}]")),
                message,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const GOOD: &str = r#"
[pipelines.orders]
kind = "capture"
[pipelines.orders.source]
database = "app"
user = "walcast"
tables = ["public.orders"]
[[pipelines.orders.sinks]]
type = "file"
path = "-"
"#;

    #[test]
    fn environment_overrides_only_config_keys() {
        let vars = vec![
            (
                "WALCAST_PIPELINES__ORDERS__SOURCE__PASSWORD".to_string(),
                "s3cret".to_string(),
            ),
            ("WALCAST_TEST_PG_USER".to_string(), "x".to_string()),
            (
                "WALCAST_CONFIG".to_string(),
                "/etc/walcast.toml".to_string(),
            ),
            (
                "WALCAST_ADMIN__LISTEN".to_string(),
                "0.0.0.0:9187".to_string(),
            ),
        ];
        assert_eq!(
            env_overrides(vars.into_iter()),
            vec![
                ("admin.listen".to_string(), "0.0.0.0:9187".to_string()),
                (
                    "pipelines.orders.source.password".to_string(),
                    "s3cret".to_string()
                ),
            ]
        );
    }

    #[test]
    fn keyless_tables_are_refused_for_sinks_that_need_a_key() {
        let keyless = GOOD.replace(
            "tables = [\"public.orders\"]",
            "tables = [\"public.orders\", \"public.log\"]\nkeyless_tables = [\"public.log\"]",
        );
        load_str("t.toml", &keyless).expect("a file sink takes key-less rows");
        let search = keyless.replace(
            "type = \"file\"\npath = \"-\"",
            "type = \"elasticsearch\"\nurl = \"http://search:9200\"",
        );
        let e = load_str("t.toml", &search).unwrap_err().to_string();
        assert!(
            e.contains("pipelines.orders.sinks[0]")
                && e.contains("`public.log`")
                && e.contains("elasticsearch sink cannot write rows without a primary key"),
            "{e}"
        );
        let redis = |mode: &str| {
            keyless.replace(
                "type = \"file\"\npath = \"-\"",
                &format!("type = \"redis\"\nurls = [\"redis://cache:6379\"]\nmode = {mode}"),
            )
        };
        assert!(load_str(
            "t.toml",
            &redis(r#"{ type = "upsert", key_template = "{table}:{id}" }"#)
        )
        .is_err());
        load_str(
            "t.toml",
            &redis(r#"{ type = "publish", via = "channel", name_template = "cdc:{table}" }"#),
        )
        .expect("publishing names no row");
    }

    #[test]
    fn a_relay_dead_letter_topic_must_be_outside_its_subscription() {
        let relay = |on_refused: &str| {
            format!(
                r#"
[pipelines.cache]
kind = "relay"
on_refused = {on_refused}
[pipelines.cache.source]
bootstrap_servers = "k:9092"
group_id = "g"
subscribe = {{ pattern = "^shop\\..*" }}
[[pipelines.cache.sinks]]
type = "file"
path = "-"
"#
            )
        };
        let c = load_str(
            "t.toml",
            &relay(r#"{ dead_letter = { topic = "shop-dlq" } }"#),
        )
        .unwrap();
        let PipelineConfig::Relay(r) = &c.pipelines["cache"] else {
            panic!()
        };
        assert_eq!(
            r.on_refused,
            OnRefused::DeadLetter {
                topic: "shop-dlq".into()
            }
        );
        let e = load_str(
            "t.toml",
            &relay(r#"{ dead_letter = { topic = "shop.dlq" } }"#),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("pipelines.cache.on_refused.dead_letter.topic")
                && e.contains("read its own dead letters"),
            "{e}"
        );
        let c = load_str("t.toml", &relay(r#""halt""#)).unwrap();
        let PipelineConfig::Relay(r) = &c.pipelines["cache"] else {
            panic!()
        };
        assert_eq!(r.on_refused, OnRefused::Halt);
    }

    /// Every duration in every section reads as "30s" / "250ms" under its
    /// un-suffixed key; the old `*_ms` numbers still read, as milliseconds,
    /// and are reported as deprecated.
    #[test]
    fn durations_are_human_and_the_old_ms_keys_still_read() {
        let capture = |sinks: &str, registry: &str| {
            format!(
                r#"
[pipelines.orders]
kind = "capture"
shutdown_timeout = "45s"
[pipelines.orders.source]
database = "app"
user = "walcast"
tables = ["public.orders"]
status_interval = "2s"
[pipelines.orders.registry]
url = "http://registry:8081"
{registry}
{sinks}
"#
            )
        };
        let new = capture(
            r#"
[[pipelines.orders.sinks]]
type = "kafka"
bootstrap_servers = "k:9092"
delivery = { mode = "exactly_once", transactional_id = "t", transaction_timeout = "90s" }
[[pipelines.orders.sinks]]
type = "redis"
urls = ["redis://cache:6379"]
mode = { type = "invalidate", key_template = "{table}:{id}" }
timeout = "250ms"
retry_initial = "50ms"
retry_max = "5s"
[[pipelines.orders.sinks]]
type = "elasticsearch"
url = "http://search:9200"
flush_interval = "200ms"
timeout = "10s"
retry_initial = "100ms"
retry_max = "1m"
"#,
            r#"request_timeout = "3s""#,
        );
        let old = capture(
            r#"
[[pipelines.orders.sinks]]
type = "kafka"
bootstrap_servers = "k:9092"
delivery = { mode = "exactly_once", transactional_id = "t", transaction_timeout_ms = 90000 }
[[pipelines.orders.sinks]]
type = "redis"
urls = ["redis://cache:6379"]
mode = { type = "invalidate", key_template = "{table}:{id}" }
timeout_ms = 250
retry_initial_ms = 50
retry_max_ms = 5000
[[pipelines.orders.sinks]]
type = "elasticsearch"
url = "http://search:9200"
flush_interval_ms = 200
timeout_ms = 10000
retry_initial_ms = 100
retry_max_ms = 60000
"#,
            "request_timeout_ms = 3000",
        );
        walcast_sdk::duration::take_deprecations();
        let ms = Duration::from_millis;
        for (text, deprecated) in [(new, false), (old, true)] {
            let c = load_str("t.toml", &text).unwrap();
            let PipelineConfig::Capture(p) = &c.pipelines["orders"] else {
                panic!()
            };
            assert_eq!(p.shutdown_timeout, ms(45_000));
            assert_eq!(p.source.status_interval, ms(2_000));
            assert_eq!(p.registry.as_ref().unwrap().request_timeout, ms(3_000));
            let [SinkConfig::Kafka(k), SinkConfig::Redis(r), SinkConfig::Elasticsearch(e)] =
                p.sinks.as_slice()
            else {
                panic!("{:?}", p.sinks)
            };
            let walcast_kafka::config::DeliveryMode::ExactlyOnce {
                transaction_timeout,
                ..
            } = &k.delivery
            else {
                panic!()
            };
            assert_eq!(*transaction_timeout, ms(90_000));
            assert_eq!(
                (r.timeout, r.retry_initial, r.retry_max),
                (ms(250), ms(50), ms(5_000))
            );
            assert_eq!(
                (e.flush_interval, e.timeout, e.retry_initial, e.retry_max),
                (ms(200), ms(10_000), ms(100), ms(60_000))
            );
            let warnings = walcast_sdk::duration::take_deprecations();
            if deprecated {
                for expected in [
                    "`transaction_timeout_ms = 90000`",
                    "`timeout_ms = 250`",
                    "`retry_max_ms = 5000` (milliseconds as a number) is deprecated; write `retry_max = \"5s\"`",
                    "`flush_interval_ms = 200`",
                    "`request_timeout_ms = 3000`",
                ] {
                    assert!(warnings.iter().any(|w| w.contains(expected)), "{expected}: {warnings:?}");
                }
            } else {
                assert!(warnings.is_empty(), "{warnings:?}");
            }
        }
        // Old and new key together: refused, naming the key.
        let both = GOOD.replace(
            "path = \"-\"",
            "path = \"-\"\n[[pipelines.orders.sinks]]\ntype = \"redis\"\nurls = [\"redis://c:6379\"]\nmode = { type = \"invalidate\", key_template = \"{table}:{id}\" }\ntimeout = \"1s\"\ntimeout_ms = 1000",
        );
        let e = load_str("t.toml", &both).unwrap_err().to_string();
        assert!(e.contains("timeout"), "{e}");
        let bad = GOOD.replace(
            "path = \"-\"",
            "path = \"-\"\n[[pipelines.orders.sinks]]\ntype = \"redis\"\nurls = [\"redis://c:6379\"]\nmode = { type = \"invalidate\", key_template = \"{table}:{id}\" }\ntimeout = \"soon\"",
        );
        let e = load_str("t.toml", &bad).unwrap_err().to_string();
        assert!(
            e.contains("pipelines.orders.sinks") && e.contains("`soon` is not a duration"),
            "{e}"
        );
    }

    #[test]
    fn heartbeat_schema_changes_and_the_message_outbox_are_read_and_checked() {
        let kafka = GOOD
            .replace(
                "[pipelines.orders.source]",
                "topic_prefix = \"shop\"\nformat = \"json\"\n\
                 heartbeat = { interval = \"2s\", action_query = \"UPDATE hb SET at = now()\" }\n\
                 schema_changes = { ddl_capture = true }\n[pipelines.orders.source]",
            )
            .replace(
                "type = \"file\"\npath = \"-\"",
                "type = \"kafka\"\nbootstrap_servers = \"k:9092\"\noutbox = { message_prefix = \"obx\" }",
            );
        let c = load_str("t.toml", &kafka).unwrap();
        let PipelineConfig::Capture(p) = &c.pipelines["orders"] else {
            panic!()
        };
        let h = p.heartbeat.as_ref().unwrap();
        assert_eq!(h.interval, Duration::from_secs(2));
        assert_eq!(h.topic("shop"), "__debezium-heartbeat.shop");
        let sc = p.schema_changes.as_ref().unwrap();
        assert!(sc.ddl_capture);
        assert_eq!(sc.topic("shop"), "shop.schema-changes");
        let s = crate::pipeline::capture_settings("orders", p).unwrap();
        assert_eq!(s.notices.message_prefixes, vec!["obx".to_string()]);
        assert!(s.notices.schema_changes && s.notices.ddl_capture);
        assert_eq!(
            s.notices
                .heartbeat
                .as_ref()
                .unwrap()
                .action_query
                .as_deref(),
            Some("UPDATE hb SET at = now()")
        );
        // Defaults: 10 s, nothing published without the sections.
        let bare = kafka.replace(
            "heartbeat = { interval = \"2s\", action_query = \"UPDATE hb SET at = now()\" }",
            "heartbeat = {}",
        );
        let c = load_str("t.toml", &bare).unwrap();
        let PipelineConfig::Capture(p) = &c.pipelines["orders"] else {
            panic!()
        };
        assert_eq!(
            p.heartbeat.as_ref().unwrap().interval,
            DEFAULT_HEARTBEAT_INTERVAL
        );
        let s = crate::pipeline::capture_settings(
            "orders",
            &match load_str("t.toml", GOOD).unwrap().pipelines.remove("orders") {
                Some(PipelineConfig::Capture(p)) => p,
                _ => panic!(),
            },
        )
        .unwrap();
        assert!(s.notices.heartbeat.is_none() && !s.notices.schema_changes);
        assert!(s.notices.message_prefixes.is_empty());
        for (text, needle) in [
            (
                kafka.replace("interval = \"2s\"", "interval = \"0s\""),
                "pipelines.orders.heartbeat.interval",
            ),
            (
                kafka.replace("interval = \"2s\"", "interval_ms = 2000"),
                "unknown field `interval_ms`",
            ),
            (
                kafka.replace("outbox = { message_prefix = \"obx\" }", "outbox = {}"),
                "needs `table` (an outbox table) or `message_prefix`",
            ),
            (
                GOOD.replace(
                    "[pipelines.orders.source]",
                    "schema_changes = {}\n[pipelines.orders.source]",
                ),
                "pipelines.orders.schema_changes",
            ),
        ] {
            let e = load_str("t.toml", &text).unwrap_err().to_string();
            assert!(e.contains(needle), "{needle}: {e}");
        }
    }

    #[test]
    fn defaults_apply() {
        let c = load_str("t.toml", GOOD).unwrap();
        let PipelineConfig::Capture(p) = &c.pipelines["orders"] else {
            panic!("a capture")
        };
        assert_eq!(
            p.source.port,
            walcast_postgres::config::Ports::One(walcast_postgres::config::DEFAULT_PG_PORT)
        );
        assert_eq!(
            p.source.target_session_attrs,
            walcast_postgres::replication::connection::TargetSessionAttrs::Primary
        );
        assert!(!p.source.slot_failover);
        assert!(!p.source.streaming, "streaming is opt-in");
        assert_eq!(
            p.source.status_interval,
            walcast_postgres::config::DEFAULT_STATUS_INTERVAL
        );
        assert_eq!(c.admin.listen, DEFAULT_ADMIN_LISTEN);
        // The admin HTTP server (status, metrics) is reachable from this
        // host only unless the operator says otherwise.
        let admin = c.admin.address().expect("on by default").unwrap();
        assert!(admin.ip().is_loopback(), "{admin}");
        assert!(p.source.create_slot);
    }

    #[test]
    fn host_and_port_lists_pair_up_as_in_libpq() {
        let with = |extra: &str| {
            GOOD.replace(
                "database = \"app\"",
                &format!("database = \"app\"\n{extra}"),
            )
        };
        let c = load_str("t.toml", &with("host = \"pg-a, pg-b\"\nport = 5433\ntarget_session_attrs = \"read-write\"\nslot_failover = true\nstreaming = true")).unwrap();
        let PipelineConfig::Capture(p) = &c.pipelines["orders"] else {
            panic!()
        };
        let e: Vec<String> = p
            .source
            .endpoints()
            .unwrap()
            .iter()
            .map(|e| e.to_string())
            .collect();
        assert_eq!(e, ["pg-a:5433", "pg-b:5433"]);
        assert!(p.source.slot_failover);
        assert!(p.source.streaming);
        let c = load_str(
            "t.toml",
            &with("host = \"pg-a,pg-b\"\nport = \"5433,5434\""),
        )
        .unwrap();
        let PipelineConfig::Capture(p) = &c.pipelines["orders"] else {
            panic!()
        };
        let e: Vec<String> = p
            .source
            .endpoints()
            .unwrap()
            .iter()
            .map(|e| e.to_string())
            .collect();
        assert_eq!(e, ["pg-a:5433", "pg-b:5434"]);
        let e = load_str("t.toml", &with("host = \"a,b,c\"\nport = \"1,2\""))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("pipelines.orders.source.port") && e.contains("2 ports for 3 hosts"),
            "{e}"
        );
        let e = load_str("t.toml", &with("host = \"a,,b\""))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("pipelines.orders.source.host") && e.contains("empty entry"),
            "{e}"
        );
        let e = load_str("t.toml", &with("target_session_attrs = \"standby\""))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("pipelines.orders.source.target_session_attrs") || e.contains("standby"),
            "{e}"
        );
    }

    #[test]
    fn unknown_keys_are_named_with_the_file() {
        let bad = GOOD.replace("user = \"walcast\"", "user = \"walcast\"\nusername = \"x\"");
        let e = load_str("bad.toml", &bad).unwrap_err().to_string();
        assert!(e.contains("bad.toml") && e.contains("username"), "{e}");
        let bad = GOOD.replace("path = \"-\"", "path = \"-\"\ncolour = 1");
        let e = load_str("bad2.toml", &bad).unwrap_err().to_string();
        assert!(e.contains("colour"), "{e}");
        let bad = GOOD.replace("kind = \"capture\"", "kind = \"capture\"\nwhatever = 2");
        let e = load_str("bad3.toml", &bad).unwrap_err().to_string();
        assert!(e.contains("whatever"), "{e}");
    }

    #[test]
    fn wrong_types_and_rules_are_explained() {
        let e = load_str(
            "t.toml",
            &GOOD.replace("database = \"app\"", "database = \"app\"\nport = \"five\""),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("pipelines.orders.source.port"), "{e}");
        let e = load_str(
            "t.toml",
            &GOOD.replace("kind = \"capture\"", "kind = \"capturr\""),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("pipelines.orders.kind") && e.contains("capturr"),
            "{e}"
        );
        let e = load_str(
            "t.toml",
            &GOOD.replace("[\"public.orders\"]", "[\"orders\"]"),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("schema.table") && e.contains("pipelines.orders.source.tables"),
            "{e}"
        );
        let e = load_str(
            "t.toml",
            &GOOD.replace("type = \"file\"", "type = \"carrier-pigeon\""),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("carrier-pigeon"), "{e}");
    }
}
