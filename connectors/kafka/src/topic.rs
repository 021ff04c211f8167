//! Which topic a table's events go to, and making sure it exists.
//!
//! Names follow Debezium (`<prefix>.<schema>.<table>`) so consumers written
//! for Debezium find their topics; characters Kafka refuses in a topic name
//! are replaced by `_`, as Debezium's `TopicNamingStrategy` does. A route
//! (`schema.table` -> topic) overrides the rule for one table; a
//! regular-expression route (Debezium's `ByLogicalTableRouter`, see
//! [`crate::config::Routes`]) renames default names that match it, and
//! adds the table's default name to the keys of the tables it merges.
//!
//! Topic metadata is always read for *all* topics: a metadata request naming
//! one topic makes a producer-type client (the admin client is one) ask the
//! broker to auto-create it, which would bypass the configured partitions
//! and replication factor.
//!
//! # A topic is used only once its leaders answer
//!
//! Before the first record goes to a topic, every partition's leader must
//! answer a ListOffsets request. A broker lists itself as a new partition's
//! leader in metadata a moment before it accepts writes for it, and in that
//! moment librdkafka's idempotent producer can lose records without an
//! error: the first ProduceRequest to the partition is refused ("not
//! leader"), the next one, already in flight, is accepted (a broker accepts
//! any first sequence number from a producer it has no state for), and
//! librdkafka then takes the refused records as "implicitly acknowledged by
//! a later batch" and reports them delivered. The oracle (tests/oracle) found
//! this as snapshot rows missing from a topic created a moment before, with
//! librdkafka's `IMPLICITACK` debug line naming the lost message ids (the
//! same defect is reported against the Go client, confluent-kafka-go#921).
//! The probe runs once per topic per process, for topics found as well as
//! created (another process may have created one a moment ago).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::ClientConfig;
use walcast_sdk::TableSchema;

use crate::config::{ConfigError, Routes, TopicCreationConfig};
use walcast_sdk::KeyField;

/// How long a metadata or admin request may take before it counts as an
/// outage rather than a slow broker.
pub const ADMIN_TIMEOUT: Duration = Duration::from_secs(30);

/// How long to wait for a topic's leaders to answer before producing
/// anyway (with a warning): an unreachable leader delays records but does
/// not lose them; only a leader in the middle of taking over does.
pub const LEADER_WAIT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum TopicError {
    /// The admin client could not be built: a bad librdkafka property.
    #[error("kafka: cannot create the admin client: {source}")]
    Client {
        #[source]
        source: KafkaError,
    },
    #[error("kafka: cannot read topic metadata from the brokers: {source}")]
    Metadata {
        #[source]
        source: KafkaError,
    },
    #[error("kafka: cannot create topic `{topic}`: {code}{hint}")]
    Create {
        topic: String,
        code: RDKafkaErrorCode,
        hint: &'static str,
    },
}

impl TopicError {
    /// Whether retrying later may succeed (an unreachable broker) as opposed
    /// to needing an operator (a refused config, missing ACLs).
    pub fn is_transient(&self) -> bool {
        match self {
            TopicError::Client { .. } => false,
            TopicError::Metadata { .. } => true,
            TopicError::Create { code, .. } => !matches!(
                code,
                RDKafkaErrorCode::TopicAuthorizationFailed
                    | RDKafkaErrorCode::ClusterAuthorizationFailed
                    | RDKafkaErrorCode::InvalidPartitions
                    | RDKafkaErrorCode::InvalidReplicationFactor
                    | RDKafkaErrorCode::InvalidConfig
                    | RDKafkaErrorCode::InvalidTopic
                    | RDKafkaErrorCode::PolicyViolation
                    | RDKafkaErrorCode::InvalidRequest
            ),
        }
    }
}

/// Where one table's records go, and its name for messages.
#[derive(Debug, Clone)]
pub struct Route {
    pub topic: Arc<str>,
    /// `schema.table`.
    pub table: Arc<str>,
    /// Added to every key of the table (a regular-expression route).
    pub key_field: Option<KeyField>,
}

/// Maps tables to topic names, caching the result per table so the hot path
/// does not format strings per record.
#[derive(Debug, Clone)]
pub struct TopicRouter {
    prefix: String,
    routes: BTreeMap<String, String>,
    regex: Vec<(regex::Regex, crate::config::RegexRoute)>,
    cache: HashMap<String, HashMap<String, Route>>,
}

impl TopicRouter {
    /// Fails on an expression that does not compile (the config's
    /// validation reports it first, naming the route).
    pub fn new(prefix: impl Into<String>, routes: Routes) -> Result<Self, ConfigError> {
        let compiled = routes.compile()?;
        Ok(TopicRouter {
            prefix: prefix.into(),
            regex: compiled.into_iter().zip(routes.regex).collect(),
            routes: routes.tables,
            cache: HashMap::new(),
        })
    }

    pub fn route(&mut self, table: &TableSchema) -> Route {
        if let Some(r) = self
            .cache
            .get(&table.schema)
            .and_then(|m| m.get(&table.name))
        {
            return r.clone();
        }
        let (topic, key_field) = self.resolve(&table.schema, &table.name);
        let route = Route {
            topic: topic.into(),
            table: table.qualified_name().into(),
            key_field,
        };
        self.cache
            .entry(table.schema.clone())
            .or_default()
            .insert(table.name.clone(), route.clone());
        route
    }

    pub fn topic_for(&mut self, table: &TableSchema) -> Arc<str> {
        self.route(table).topic
    }

    /// The topic for `schema.table`, without caching (for `walcast check`).
    pub fn name(&self, schema: &str, table: &str) -> String {
        self.resolve(schema, table).0
    }

    /// The topic, and the key field a regular-expression route adds: the
    /// table's default topic name, which tells merged tables apart.
    pub fn resolve(&self, schema: &str, table: &str) -> (String, Option<KeyField>) {
        if let Some(t) = self.routes.get(&format!("{schema}.{table}")) {
            return (t.clone(), None);
        }
        let default = self.default_name(schema, table);
        for (re, route) in &self.regex {
            if let Some(caps) = re.captures(&default) {
                let mut topic = String::new();
                caps.expand(&route.topic_replacement, &mut topic);
                let topic = sanitise(&topic);
                let field = route.key_enforce_uniqueness.then(|| KeyField {
                    name: route.key_field_name.as_str().into(),
                    value: default.as_str().into(),
                });
                return (topic, field);
            }
        }
        (default, None)
    }

    /// Debezium's `<prefix>.<schema>.<table>`, sanitised.
    pub fn default_name(&self, schema: &str, table: &str) -> String {
        sanitise(&format!("{}.{}.{}", self.prefix, schema, table))
    }
}

/// Characters Kafka refuses in a topic name become `_`.
fn sanitise(raw: &str) -> String {
    raw.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// What `walcast check` reports for one table's topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicStatus {
    /// `schema.table`.
    pub table: String,
    pub topic: String,
    pub state: TopicState,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TopicState {
    Exists {
        partitions: usize,
    },
    /// Missing; the sink will create it (`create_topics = true`).
    WouldCreate {
        partitions: i32,
        replication_factor: i32,
    },
    /// Missing and the sink will not create it: it appears only if the
    /// broker auto-creates topics, otherwise deliveries fail.
    Missing,
}

/// Reads topic metadata and creates missing topics.
pub struct TopicAdmin {
    admin: Arc<AdminClient<DefaultClientContext>>,
    creation: TopicCreationConfig,
    known: HashSet<String>,
}

impl TopicAdmin {
    /// `client` is the producer's config; producer-only properties are
    /// harmless to the admin client.
    pub fn new(client: &ClientConfig, creation: TopicCreationConfig) -> Result<Self, TopicError> {
        let mut client = client.clone();
        client.set("allow.auto.create.topics", "false");
        let admin = client
            .create()
            .map_err(|source| TopicError::Client { source })?;
        Ok(TopicAdmin {
            admin: Arc::new(admin),
            creation,
            known: HashSet::new(),
        })
    }

    /// Every topic the cluster has, with its partition count.
    pub async fn existing(&self) -> Result<BTreeMap<String, usize>, TopicError> {
        let admin = Arc::clone(&self.admin);
        // fetch_metadata blocks the calling thread.
        tokio::task::spawn_blocking(move || {
            let md = admin
                .inner()
                .fetch_metadata(None, ADMIN_TIMEOUT)
                .map_err(|source| TopicError::Metadata { source })?;
            Ok(md
                .topics()
                .iter()
                .filter(|t| t.error().is_none())
                .map(|t| (t.name().to_string(), t.partitions().len()))
                .collect())
        })
        .await
        .expect("metadata task does not panic")
    }

    /// Reports, without creating anything, which of `topics` (pairs of
    /// `schema.table` and topic) exist and which would be created.
    pub async fn check(
        &self,
        topics: &[(String, String)],
        create: bool,
    ) -> Result<Vec<TopicStatus>, TopicError> {
        let existing = self.existing().await?;
        Ok(topics
            .iter()
            .map(|(table, topic)| TopicStatus {
                table: table.clone(),
                topic: topic.clone(),
                state: match existing.get(topic) {
                    Some(&partitions) => TopicState::Exists { partitions },
                    None if create => {
                        let (partitions, replication_factor, _) = self.creation.for_topic(topic);
                        TopicState::WouldCreate {
                            partitions,
                            replication_factor,
                        }
                    }
                    None => TopicState::Missing,
                },
            })
            .collect())
    }

    /// Creates `topic` unless it exists, then waits until every partition's
    /// leader answers (see the module docs); remembers topics seen so the
    /// broker is asked once per topic per process.
    pub async fn ensure(&mut self, topic: &str) -> Result<(), TopicError> {
        if self.known.contains(topic) {
            return Ok(());
        }
        let existing = self.existing().await?;
        let found = existing.get(topic).copied();
        if found.is_none() {
            let (partitions, replication_factor, config) = self.creation.for_topic(topic);
            let config: Vec<(&str, &str)> = config
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            let new = NewTopic {
                name: topic,
                num_partitions: partitions,
                replication: TopicReplication::Fixed(replication_factor),
                config,
            };
            let opts = AdminOptions::new().operation_timeout(Some(ADMIN_TIMEOUT));
            let results = self
                .admin
                .create_topics([&new], &opts)
                .await
                .map_err(|source| TopicError::Metadata { source })?;
            for r in results {
                match r {
                    Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                    Err((topic, code)) => {
                        let hint = match code {
                            RDKafkaErrorCode::InvalidReplicationFactor => {
                                " (topic_creation.replication_factor is larger than the number of brokers?)"
                            }
                            RDKafkaErrorCode::TopicAuthorizationFailed | RDKafkaErrorCode::ClusterAuthorizationFailed => {
                                " (the principal needs CREATE on the topic or cluster, or create it by hand and set create_topics = false)"
                            }
                            _ => "",
                        };
                        return Err(TopicError::Create { topic, code, hint });
                    }
                }
            }
            tracing::info!(topic, partitions, "kafka: created topic");
        }
        self.wait_for_leaders(topic, found).await?;
        self.known.insert(topic.to_string());
        Ok(())
    }

    /// Waits until every partition of `topic` answers a ListOffsets request
    /// at its leader, at most [`LEADER_WAIT`]. `partitions` is the count
    /// already known, if any.
    async fn wait_for_leaders(
        &self,
        topic: &str,
        mut partitions: Option<usize>,
    ) -> Result<(), TopicError> {
        let deadline = tokio::time::Instant::now() + LEADER_WAIT;
        let mut last_error = None;
        loop {
            let count = match partitions {
                Some(n) => n,
                None => match self.existing().await?.get(topic) {
                    Some(&n) => {
                        partitions = Some(n);
                        n
                    }
                    None => 0,
                },
            };
            if count > 0 {
                let admin = Arc::clone(&self.admin);
                let name = topic.to_string();
                // fetch_watermarks blocks the calling thread.
                let answer = tokio::task::spawn_blocking(move || {
                    (0..count as i32).try_for_each(|p| {
                        admin
                            .inner()
                            .fetch_watermarks(&name, p, Duration::from_secs(5))
                            .map(|_| ())
                            .map_err(|e| format!("partition {p}: {e}"))
                    })
                })
                .await
                .expect("watermark task does not panic");
                match answer {
                    Ok(()) => return Ok(()),
                    Err(e) => last_error = Some(e),
                }
            }
            if tokio::time::Instant::now() >= deadline {
                tracing::warn!(
                    topic,
                    error = last_error.as_deref().unwrap_or("the topic is not in the metadata yet"),
                    "kafka: the topic's partition leaders did not answer within {LEADER_WAIT:?}; producing anyway"
                );
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use walcast_sdk::ReplicaIdentity;

    fn table(schema: &str, name: &str) -> TableSchema {
        TableSchema {
            relation_id: 1,
            schema: schema.into(),
            name: name.into(),
            columns: vec![],
            replica_identity: ReplicaIdentity::Default,
            version: 1,
        }
    }

    #[test]
    fn debezium_naming_routes_and_sanitising() {
        let mut routes = Routes::default();
        routes
            .tables
            .insert("public.orders".to_string(), "orders-v2".to_string());
        let mut r = TopicRouter::new("shop", routes).unwrap();
        assert_eq!(
            &*r.topic_for(&table("public", "customers")),
            "shop.public.customers"
        );
        assert_eq!(&*r.topic_for(&table("public", "orders")), "orders-v2");
        assert_eq!(
            &*r.topic_for(&table("sales", "orders")),
            "shop.sales.orders",
            "routes match schema too"
        );
        assert_eq!(
            &*r.topic_for(&table("public", "Grüße tab")),
            "shop.public.Gr__e_tab"
        );
        // cached answer is the same
        assert_eq!(
            &*r.topic_for(&table("public", "customers")),
            "shop.public.customers"
        );
    }

    #[test]
    fn regex_routes_merge_tables_and_key_them_by_their_own_topic() {
        let routes: crate::config::KafkaSinkConfig = toml::from_str(
            r#"
            bootstrap_servers = "b:9092"
            [[routes]]
            topic_regex = 'shop\.(\w+)\.orders_(.*)'
            topic_replacement = "shop.$1.orders_all"
            [[routes]]
            topic_regex = 'shop\.public\.(audit)'
            topic_replacement = "${1}-log"
            key_enforce_uniqueness = false
            "#,
        )
        .unwrap();
        let mut r = TopicRouter::new("shop", routes.routes).unwrap();
        let eu = r.route(&table("public", "orders_eu"));
        assert_eq!(&*eu.topic, "shop.public.orders_all");
        assert_eq!(
            eu.key_field,
            Some(KeyField {
                name: "__dbz__physicalTableIdentifier".into(),
                value: "shop.public.orders_eu".into()
            })
        );
        assert_eq!(
            &*r.topic_for(&table("public", "orders_us")),
            "shop.public.orders_all"
        );
        // The whole name must match: a prefix match is no match.
        assert_eq!(
            &*r.topic_for(&table("public", "audit_old")),
            "shop.public.audit_old"
        );
        let audit = r.route(&table("public", "audit"));
        assert_eq!((&*audit.topic, audit.key_field), ("audit-log", None));
        assert!(r.route(&table("public", "other")).key_field.is_none());
    }

    #[test]
    fn a_bad_route_expression_is_refused_naming_the_route() {
        let c: crate::config::KafkaSinkConfig = toml::from_str(
            r#"
            bootstrap_servers = "b:9092"
            [[routes]]
            topic_regex = "orders("
            topic_replacement = "x"
            "#,
        )
        .unwrap();
        let e = c.validate().unwrap_err().to_string();
        assert!(
            e.contains("routes[0].topic_regex") && e.contains("orders("),
            "{e}"
        );
    }

    #[test]
    fn create_errors_are_classified() {
        let definite = TopicError::Create {
            topic: "t".into(),
            code: RDKafkaErrorCode::PolicyViolation,
            hint: "",
        };
        assert!(!definite.is_transient());
        let transient = TopicError::Create {
            topic: "t".into(),
            code: RDKafkaErrorCode::RequestTimedOut,
            hint: "",
        };
        assert!(transient.is_transient());
    }
}
