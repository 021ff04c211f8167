//! Which topic a table's events go to, and making sure it exists.
//!
//! Names follow Debezium (`<prefix>.<schema>.<table>`) so consumers written
//! for Debezium find their topics; characters Kafka refuses in a topic name
//! are replaced by `_`, as Debezium's `TopicNamingStrategy` does. A route
//! (`schema.table` -> topic) overrides the rule for one table.
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

use crate::config::TopicCreationConfig;

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
}

/// Maps tables to topic names, caching the result per table so the hot path
/// does not format strings per record.
#[derive(Debug, Clone)]
pub struct TopicRouter {
    prefix: String,
    routes: BTreeMap<String, String>,
    cache: HashMap<String, HashMap<String, Route>>,
}

impl TopicRouter {
    pub fn new(prefix: impl Into<String>, routes: BTreeMap<String, String>) -> Self {
        TopicRouter {
            prefix: prefix.into(),
            routes,
            cache: HashMap::new(),
        }
    }

    pub fn route(&mut self, table: &TableSchema) -> Route {
        if let Some(r) = self
            .cache
            .get(&table.schema)
            .and_then(|m| m.get(&table.name))
        {
            return r.clone();
        }
        let route = Route {
            topic: self.name(&table.schema, &table.name).into(),
            table: table.qualified_name().into(),
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
        if let Some(t) = self.routes.get(&format!("{schema}.{table}")) {
            return t.clone();
        }
        let raw = format!("{}.{}.{}", self.prefix, schema, table);
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
                    None if create => TopicState::WouldCreate {
                        partitions: self.creation.partitions,
                        replication_factor: self.creation.replication_factor,
                    },
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
            let config: Vec<(&str, &str)> = self
                .creation
                .config
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            let new = NewTopic {
                name: topic,
                num_partitions: self.creation.partitions,
                replication: TopicReplication::Fixed(self.creation.replication_factor),
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
            tracing::info!(
                topic,
                partitions = self.creation.partitions,
                "kafka: created topic"
            );
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
        let mut routes = BTreeMap::new();
        routes.insert("public.orders".to_string(), "orders-v2".to_string());
        let mut r = TopicRouter::new("shop", routes);
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
