//! The `[sink.kafka]` and `[source.kafka]` sections of the daemon's config.
//!
//! Anything librdkafka understands can be passed through the `producer` /
//! `consumer` maps: that is how SASL, TLS, compression and batching are set,
//! so this module names only what walcast itself decides. The maps may hold
//! secrets (`sasl.password`, `ssl.key.pem`), so these structs are never
//! serialised back out and their `Debug` output redacts them.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use rdkafka::ClientConfig;
use serde::Deserialize;

/// Debezium's default `topic.prefix` is the logical server name; ours is the
/// product name so an unconfigured install still gets readable topics.
pub const DEFAULT_TOPIC_PREFIX: &str = "walcast";
/// Records accepted by the sink and not yet confirmed by the broker. Above
/// this `send` waits, so a broker outage stalls capture instead of growing
/// memory without bound.
pub const DEFAULT_MAX_IN_FLIGHT_RECORDS: usize = 100_000;
/// `-1` asks the broker for its own `num.partitions` / `default.replication.factor`.
pub const BROKER_DEFAULT: i32 = -1;
pub const DEFAULT_SOURCE_MAX_BATCH_RECORDS: usize = 500;
pub const DEFAULT_SOURCE_MAX_BATCH_WAIT: Duration = Duration::from_millis(100);
/// Records handed out by a source and not yet committed. Above this the
/// source hands out nothing until the relay's sink catches up, so a stuck
/// sink holds memory bounded (librdkafka's prefetch queue is bounded too).
pub const DEFAULT_SOURCE_MAX_IN_FLIGHT_RECORDS: usize = 20_000;

/// Producer properties walcast sets unless the user overrides them.
///
/// * `enable.idempotence` + `acks=all`: a retried send never duplicates or
///   reorders records within a partition, so per-row order survives retries.
/// * `message.timeout.ms=0` (infinite): during a broker outage librdkafka
///   keeps retrying instead of failing records. Capture then stalls (the
///   in-flight cap fills, `send` waits, the slot's flush LSN stops) and
///   resumes by itself when the broker is back. A finite timeout would turn
///   every outage into failed batches and a pipeline restart.
/// * `murmur2_random`: the Java client's partitioner, so a row's key lands in
///   the same partition as it would from Debezium or any Java producer.
/// * `compression.type=zstd` at librdkafka's default level (3), chosen from
///   `tests/bench/compression.py` (figures in tests/bench/RESULTS.md,
///   2026-12-06): on record batches of walcast's JSON envelopes of 100 rows
///   or more, zstd sends 1.7× (varied rows) to 3.5× (the benchmark's
///   repetitive rows) fewer bytes than lz4, for 0.4–0.8 ms more CPU per MB
///   of JSON (about 5 % of a core at 100k events/s). Level 1 compresses as
///   well as 3 and was up to 20 % cheaper on varied rows, not on repetitive
///   ones: too small and too noisy a difference to leave librdkafka's
///   default. Levels 6 and above cost 3–8× more for at most 10 % fewer
///   bytes. Small batches (10 records, a trickle of single-row
///   transactions) cost zstd 4–5 ms per MB, mostly setting up its context
///   per batch, 5–8× lz4's, but at a rate where that is a few ms per second.
///   Where brokers and consumers are close and CPU is the limit,
///   `compression.type = "lz4"` in `producer` is the alternative.
pub const PRODUCER_DEFAULTS: &[(&str, &str)] = &[
    ("enable.idempotence", "true"),
    ("acks", "all"),
    ("message.timeout.ms", "0"),
    ("partitioner", "murmur2_random"),
    ("compression.type", "zstd"),
    ("linger.ms", "5"),
];

/// Consumer properties walcast sets unless the user overrides them. Offsets
/// are committed by walcast only after the sink acknowledged the records,
/// so auto-commit must stay off; `read_committed` hides records of aborted
/// producer transactions.
///
/// `queued.max.messages.kbytes` bounds librdkafka's prefetch queue. Its
/// default, 64 MiB, made a relay's resident memory about 300 MiB while it
/// caught up a backlog; [`CONSUMER_PREFETCH_KBYTES`] still holds tens of
/// thousands of change events, more than a batch needs to be read without
/// waiting for the broker. Raise it in `consumer` for very large records.
pub const CONSUMER_DEFAULTS: &[(&str, &str)] = &[
    ("enable.auto.commit", "false"),
    ("enable.auto.offset.store", "false"),
    ("auto.offset.reset", "earliest"),
    ("isolation.level", "read_committed"),
    ("queued.max.messages.kbytes", CONSUMER_PREFETCH_KBYTES),
];

/// The relay consumer's default prefetch, in KiB (see [`CONSUMER_DEFAULTS`]).
pub const CONSUMER_PREFETCH_KBYTES: &str = "8192";

/// `topic.metadata.refresh.interval.ms` for pattern subscriptions, unless
/// the user sets it in `consumer`.
///
/// librdkafka matches a pattern only against the topics of its last
/// metadata refresh, every 300 s by default (the Java consumer's
/// `metadata.max.age.ms` is the same). A relay started before the capture
/// created a new table's topic would then see nothing for up to five
/// minutes. Every 5 s finds a new topic within seconds; the price is one
/// metadata request (all topics, as any pattern subscription needs) per
/// consumer every 5 s, which brokers serve from memory. Topic-list
/// subscriptions keep librdkafka's default: they do not discover topics.
pub const PATTERN_METADATA_REFRESH_MS: &str = "5000";

/// librdkafka properties walcast must own for its delivery guarantees; a user
/// value for them is refused rather than silently overriding the contract.
const CONSUMER_RESERVED: &[&str] = &["enable.auto.commit", "group.id", "bootstrap.servers"];
const PRODUCER_RESERVED: &[&str] = &["bootstrap.servers", "transactional.id"];

/// The config was refused. Every message names the key and the broken rule.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("kafka: `{field}` {rule}")]
    Invalid { field: String, rule: String },
}

fn invalid(field: impl Into<String>, rule: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.into(),
        rule: rule.into(),
    }
}

/// The Kafka sink of a capture pipeline.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaSinkConfig {
    /// `host:port[,host:port]`.
    pub bootstrap_servers: String,
    /// Topics are `<topic_prefix>.<schema>.<table>` unless routed.
    #[serde(default = "default_topic_prefix")]
    pub topic_prefix: String,
    /// `schema.table` -> topic (a table), or regular-expression routes (an
    /// array of tables), overriding the naming rule; see [`Routes`].
    #[serde(default)]
    pub routes: Routes,
    /// Follow each delete with a null-valued record so compacted topics
    /// forget the row (Debezium's `tombstones.on.delete`).
    #[serde(default = "default_true")]
    pub tombstones_on_delete: bool,
    /// Drop truncate events instead of publishing them (keyless) to the
    /// table's topic.
    #[serde(default)]
    pub skip_truncate: bool,
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight_records: usize,
    /// Create missing topics with `topic_creation` before the first record.
    #[serde(default)]
    pub create_topics: bool,
    #[serde(default)]
    pub topic_creation: TopicCreationConfig,
    /// Publish Debezium-style BEGIN/END transaction records to this topic
    /// (Debezium names it `<prefix>.transaction`). Off when absent.
    #[serde(default)]
    pub transaction_topic: Option<String>,
    #[serde(default)]
    pub delivery: DeliveryMode,
    /// Any librdkafka producer property, applied over [`PRODUCER_DEFAULTS`].
    #[serde(default)]
    pub producer: BTreeMap<String, String>,
    /// With `format = "json"`: how a numeric NaN/±Infinity is written,
    /// `postgres` (`"NaN"`, default) or `debezium` (`"NAN"`, ...).
    #[serde(default)]
    pub json_special_numeric: walcast_sdk::json::SpecialNumeric,
    /// Route an outbox table's inserts as messages (see [`crate::outbox`]).
    #[serde(default)]
    pub outbox: Option<crate::outbox::OutboxConfig>,
}

/// Debezium's `key.field.name` default (`ByLogicalTableRouter`).
pub const DEFAULT_KEY_FIELD_NAME: &str = "__dbz__physicalTableIdentifier";

/// The sink's `routes`, in one of two forms:
///
/// * a table, `routes = { "public.orders" = "orders-v2" }`: a table to a
///   named topic;
/// * an array of tables, `[[...sinks.routes]]` with `topic_regex` and
///   `topic_replacement` (Debezium's topic router, `ByLogicalTableRouter`):
///   the first route whose expression matches the *whole* default topic
///   name (`<prefix>.<schema>.<table>`) renames it, `$1` standing for a
///   group. Many tables may land in one topic: their keys then carry the
///   table's default topic name in `key_field_name`, so two rows with the
///   same primary key in two tables stay two keys.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Routes {
    pub tables: BTreeMap<String, String>,
    pub regex: Vec<RegexRoute>,
}

/// One regular-expression route (see [`Routes`]).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegexRoute {
    /// Matched against the whole default topic name.
    pub topic_regex: String,
    /// The topic; `$1`, `${name}` stand for the expression's groups.
    pub topic_replacement: String,
    /// The key field naming the source table (its default topic name).
    #[serde(default = "default_key_field_name")]
    pub key_field_name: String,
    /// `false`: keys are left as they are (when the tables routed together
    /// never share a key, or consumers need Debezium-free keys).
    #[serde(default = "default_true")]
    pub key_enforce_uniqueness: bool,
}

fn default_key_field_name() -> String {
    DEFAULT_KEY_FIELD_NAME.to_string()
}

impl Routes {
    pub fn is_empty(&self) -> bool {
        self.tables.is_empty() && self.regex.is_empty()
    }

    /// The routes' expressions, anchored (Debezium matches the whole name);
    /// the error names the route.
    pub fn compile(&self) -> Result<Vec<regex::Regex>, ConfigError> {
        self.regex
            .iter()
            .enumerate()
            .map(|(i, r)| {
                regex::Regex::new(&format!("^(?:{})$", r.topic_regex)).map_err(|e| {
                    invalid(
                        format!("routes[{i}].topic_regex"),
                        format!("`{}` is not a regular expression: {e}", r.topic_regex),
                    )
                })
            })
            .collect()
    }
}

impl<'de> Deserialize<'de> for Routes {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Routes;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(
                    "a table of \"schema.table\" = \"topic\", or an array of [[routes]] with topic_regex and topic_replacement",
                )
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<Routes, A::Error> {
                Ok(Routes {
                    tables: Deserialize::deserialize(
                        serde::de::value::MapAccessDeserializer::new(map),
                    )?,
                    regex: Vec::new(),
                })
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, seq: A) -> Result<Routes, A::Error> {
                Ok(Routes {
                    tables: BTreeMap::new(),
                    regex: Deserialize::deserialize(serde::de::value::SeqAccessDeserializer::new(
                        seq,
                    ))?,
                })
            }
        }
        d.deserialize_any(V)
    }
}

/// How batches become durable in Kafka.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(tag = "mode", rename_all = "snake_case", deny_unknown_fields)]
pub enum DeliveryMode {
    /// Idempotent producer, batch acknowledged when every record is
    /// confirmed. A crash replays from the slot's checkpoint, so consumers
    /// may see records twice (never out of order within a row).
    #[default]
    AtLeastOnce,
    /// One Kafka transaction per batch, acknowledged after the commit:
    /// `read_committed` consumers never see a batch twice or in part, even
    /// across a crash. Costs a commit round trip per batch. During an outage
    /// a transaction times out after `transaction_timeout` (librdkafka
    /// requires `message.timeout.ms` not to exceed it), the batch fails and
    /// the pipeline restarts from its checkpoint.
    ExactlyOnce {
        /// Stable across restarts of this pipeline and unique among
        /// pipelines: a restarted producer with the same id fences off its
        /// predecessor's unfinished transaction.
        transactional_id: String,
        /// `"60s"`; the old `transaction_timeout_ms` still reads, deprecated.
        #[serde(
            default = "default_transaction_timeout",
            alias = "transaction_timeout_ms",
            deserialize_with = "de_transaction_timeout"
        )]
        transaction_timeout: Duration,
        /// Compacted topic where each Kafka transaction records the last
        /// Postgres change it carries, read back on start to skip changes
        /// Kafka already holds (see [`crate::offsets`]).
        /// Default: `walcast.offsets.<transactional_id>`, one per pipeline.
        #[serde(default)]
        offsets_topic: Option<String>,
    },
}

/// The broker's default `transaction.max.timeout.ms` is 15 minutes; one
/// minute bounds how long an outage holds a transaction open.
pub const DEFAULT_TRANSACTION_TIMEOUT: Duration = Duration::from_secs(60);

fn default_transaction_timeout() -> Duration {
    DEFAULT_TRANSACTION_TIMEOUT
}

walcast_sdk::deprecated_ms_field!(de_transaction_timeout, "transaction_timeout");
walcast_sdk::deprecated_ms_field!(de_max_batch_wait, "max_batch_wait");

/// How topics are created when `create_topics = true`.
///
/// `cleanup.policy` is left to the broker unless set in `config`: many CDC
/// users want `compact` (the tombstones then delete rows for good), but
/// compaction on a topic that also serves as an audit log loses history, so
/// that choice is the operator's.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicCreationConfig {
    #[serde(default = "default_broker")]
    pub partitions: i32,
    #[serde(default = "default_broker")]
    pub replication_factor: i32,
    /// Topic-level configs, e.g. `"cleanup.policy" = "compact"`.
    #[serde(default)]
    pub config: BTreeMap<String, String>,
    /// Per topic (by its final name, after routing: a table's own topic is
    /// `<prefix>.<schema>.<table>`), settings that replace the ones above.
    #[serde(default)]
    pub topics: BTreeMap<String, TopicOverride>,
}

/// `topic_creation.topics."name"`: what differs for one topic.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicOverride {
    pub partitions: Option<i32>,
    pub replication_factor: Option<i32>,
    /// Merged over `topic_creation.config`.
    #[serde(default)]
    pub config: BTreeMap<String, String>,
}

impl TopicCreationConfig {
    /// Partitions, replication factor and configs for `topic`.
    pub fn for_topic(&self, topic: &str) -> (i32, i32, BTreeMap<String, String>) {
        let mut config = self.config.clone();
        match self.topics.get(topic) {
            Some(o) => {
                config.extend(o.config.clone());
                (
                    o.partitions.unwrap_or(self.partitions),
                    o.replication_factor.unwrap_or(self.replication_factor),
                    config,
                )
            }
            None => (self.partitions, self.replication_factor, config),
        }
    }
}

impl Default for TopicCreationConfig {
    fn default() -> Self {
        TopicCreationConfig {
            partitions: BROKER_DEFAULT,
            replication_factor: BROKER_DEFAULT,
            config: BTreeMap::new(),
            topics: BTreeMap::new(),
        }
    }
}

/// What a relay's source subscribes to.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum Subscription {
    Topics(Vec<String>),
    /// A regular expression in librdkafka's syntax; it is anchored with `^`
    /// if it is not already, because librdkafka treats only `^`-prefixed
    /// names as patterns.
    Pattern(String),
}

/// The Kafka source of a relay pipeline.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaSourceConfig {
    pub bootstrap_servers: String,
    /// One group per relay, so a slow sink never holds back another.
    pub group_id: String,
    pub subscribe: Subscription,
    #[serde(default = "default_max_batch_records")]
    pub max_batch_records: usize,
    /// How long a batch waits to fill (`"100ms"`; the old
    /// `max_batch_wait_ms` still reads, deprecated).
    #[serde(
        default = "default_max_batch_wait",
        alias = "max_batch_wait_ms",
        deserialize_with = "de_max_batch_wait"
    )]
    pub max_batch_wait: Duration,
    #[serde(default = "default_source_max_in_flight")]
    pub max_in_flight_records: usize,
    /// Any librdkafka consumer property, applied over [`CONSUMER_DEFAULTS`].
    #[serde(default)]
    pub consumer: BTreeMap<String, String>,
}

fn default_topic_prefix() -> String {
    DEFAULT_TOPIC_PREFIX.to_string()
}
fn default_true() -> bool {
    true
}
fn default_max_in_flight() -> usize {
    DEFAULT_MAX_IN_FLIGHT_RECORDS
}
fn default_broker() -> i32 {
    BROKER_DEFAULT
}
fn default_max_batch_records() -> usize {
    DEFAULT_SOURCE_MAX_BATCH_RECORDS
}
fn default_max_batch_wait() -> Duration {
    DEFAULT_SOURCE_MAX_BATCH_WAIT
}
fn default_source_max_in_flight() -> usize {
    DEFAULT_SOURCE_MAX_IN_FLIGHT_RECORDS
}

impl KafkaSinkConfig {
    /// A config with every default, for code and tests that build one by hand.
    pub fn new(bootstrap_servers: impl Into<String>) -> Self {
        KafkaSinkConfig {
            bootstrap_servers: bootstrap_servers.into(),
            topic_prefix: default_topic_prefix(),
            routes: Routes::default(),
            tombstones_on_delete: true,
            skip_truncate: false,
            max_in_flight_records: DEFAULT_MAX_IN_FLIGHT_RECORDS,
            create_topics: false,
            topic_creation: TopicCreationConfig::default(),
            transaction_topic: None,
            delivery: DeliveryMode::AtLeastOnce,
            producer: BTreeMap::new(),
            json_special_numeric: Default::default(),
            outbox: None,
        }
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(o) = &self.outbox {
            if o.table.is_none() && o.message_prefix.is_none() {
                return Err(invalid(
                    "outbox",
                    "needs `table` (an outbox table) or `message_prefix` (logical messages), or both",
                ));
            }
            if o.table.as_ref().is_some_and(|t| t.split('.').count() != 2) {
                return Err(invalid("outbox.table", "must be schema.table"));
            }
            if o.message_prefix.as_ref().is_some_and(|p| p.is_empty()) {
                return Err(invalid("outbox.message_prefix", "must not be empty"));
            }
            if !o.topic.contains("${routedByValue}") {
                tracing::info!(topic = %o.topic, "outbox: every message goes to one topic (no ${{routedByValue}} in outbox.topic)");
            }
        }
        if self.bootstrap_servers.trim().is_empty() {
            return Err(invalid(
                "bootstrap_servers",
                "must list at least one host:port",
            ));
        }
        if self.topic_prefix.is_empty() {
            return Err(invalid("topic_prefix", "must not be empty"));
        }
        for ch in self.topic_prefix.chars() {
            if !legal_topic_char(ch) {
                return Err(invalid(
                    "topic_prefix",
                    format!("contains `{ch}`; Kafka topic names allow only [a-zA-Z0-9._-]"),
                ));
            }
        }
        for (table, topic) in &self.routes.tables {
            if !table.contains('.') {
                return Err(invalid(
                    format!("routes.\"{table}\""),
                    "the key must be `schema.table`",
                ));
            }
            check_topic_name(&format!("routes.\"{table}\""), topic)?;
        }
        self.routes.compile()?;
        for (i, r) in self.routes.regex.iter().enumerate() {
            if r.topic_replacement.trim().is_empty() {
                return Err(invalid(
                    format!("routes[{i}].topic_replacement"),
                    "must not be empty",
                ));
            }
            if r.key_enforce_uniqueness && r.key_field_name.trim().is_empty() {
                return Err(invalid(
                    format!("routes[{i}].key_field_name"),
                    "must not be empty",
                ));
            }
        }
        if let Some(t) = &self.transaction_topic {
            check_topic_name("transaction_topic", t)?;
        }
        if self.max_in_flight_records == 0 {
            return Err(invalid("max_in_flight_records", "must be at least 1"));
        }
        if self.max_in_flight_records > u32::MAX as usize >> 3 {
            return Err(invalid(
                "max_in_flight_records",
                format!("must be at most {}", u32::MAX >> 3),
            ));
        }
        let tc = &self.topic_creation;
        let counts = [
            ("topic_creation.partitions".to_string(), Some(tc.partitions)),
            (
                "topic_creation.replication_factor".to_string(),
                Some(tc.replication_factor),
            ),
        ]
        .into_iter()
        .chain(tc.topics.iter().flat_map(|(t, o)| {
            [
                (
                    format!("topic_creation.topics.\"{t}\".partitions"),
                    o.partitions,
                ),
                (
                    format!("topic_creation.topics.\"{t}\".replication_factor"),
                    o.replication_factor,
                ),
            ]
        }));
        for (field, n) in counts {
            if let Some(n) = n {
                if n == 0 || n < BROKER_DEFAULT {
                    return Err(invalid(
                        field,
                        "must be positive, or -1 for the broker's default",
                    ));
                }
            }
        }
        if let DeliveryMode::ExactlyOnce {
            transactional_id,
            transaction_timeout,
            offsets_topic,
        } = &self.delivery
        {
            if offsets_topic
                .as_deref()
                .is_some_and(|t| t.trim().is_empty())
            {
                return Err(invalid("delivery.offsets_topic", "must not be empty"));
            }
            if transactional_id.trim().is_empty() {
                return Err(invalid("delivery.transactional_id", "must not be empty"));
            }
            if transaction_timeout.as_millis() == 0 {
                return Err(invalid(
                    "delivery.transaction_timeout",
                    "must be at least 1ms",
                ));
            }
        }
        for key in PRODUCER_RESERVED {
            if self.producer.contains_key(*key) {
                return Err(invalid(
                    format!("producer.\"{key}\""),
                    "is set by walcast; use the dedicated setting",
                ));
            }
        }
        Ok(())
    }

    /// The librdkafka configuration: defaults, then the user's map.
    pub fn client_config(&self) -> ClientConfig {
        let mut cfg = ClientConfig::new();
        for (k, v) in PRODUCER_DEFAULTS {
            cfg.set(*k, *v);
        }
        // librdkafka's own queue must hold at least our cap, or it refuses
        // records with QueueFull before our back-pressure engages.
        let queue = self.max_in_flight_records.clamp(100_000, 2_147_483_647);
        cfg.set("queue.buffering.max.messages", queue.to_string());
        if let DeliveryMode::ExactlyOnce {
            transactional_id,
            transaction_timeout,
            ..
        } = &self.delivery
        {
            let ms = transaction_timeout.as_millis().to_string();
            cfg.set("transactional.id", transactional_id);
            cfg.set("transaction.timeout.ms", &ms);
            cfg.set("message.timeout.ms", &ms);
        }
        for (k, v) in &self.producer {
            cfg.set(k, v);
        }
        cfg.set("bootstrap.servers", &self.bootstrap_servers);
        cfg
    }
}

impl KafkaSourceConfig {
    pub fn new(
        bootstrap_servers: impl Into<String>,
        group_id: impl Into<String>,
        subscribe: Subscription,
    ) -> Self {
        KafkaSourceConfig {
            bootstrap_servers: bootstrap_servers.into(),
            group_id: group_id.into(),
            subscribe,
            max_batch_records: DEFAULT_SOURCE_MAX_BATCH_RECORDS,
            max_batch_wait: DEFAULT_SOURCE_MAX_BATCH_WAIT,
            max_in_flight_records: DEFAULT_SOURCE_MAX_IN_FLIGHT_RECORDS,
            consumer: BTreeMap::new(),
        }
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.bootstrap_servers.trim().is_empty() {
            return Err(invalid(
                "bootstrap_servers",
                "must list at least one host:port",
            ));
        }
        if self.group_id.trim().is_empty() {
            return Err(invalid("group_id", "must not be empty"));
        }
        match &self.subscribe {
            Subscription::Topics(t) if t.is_empty() => {
                return Err(invalid("subscribe.topics", "must name at least one topic"));
            }
            Subscription::Topics(t) => {
                for topic in t {
                    check_topic_name("subscribe.topics", topic)?;
                }
            }
            Subscription::Pattern(p) if p.is_empty() => {
                return Err(invalid("subscribe.pattern", "must not be empty"))
            }
            Subscription::Pattern(_) => {}
        }
        if self.max_batch_records == 0 {
            return Err(invalid("max_batch_records", "must be at least 1"));
        }
        if self.max_in_flight_records < self.max_batch_records {
            return Err(invalid(
                "max_in_flight_records",
                "must be at least max_batch_records",
            ));
        }
        for key in CONSUMER_RESERVED {
            if self.consumer.contains_key(*key) {
                return Err(invalid(
                    format!("consumer.\"{key}\""),
                    "is set by walcast; use the dedicated setting",
                ));
            }
        }
        Ok(())
    }

    pub fn client_config(&self) -> ClientConfig {
        let mut cfg = ClientConfig::new();
        for (k, v) in CONSUMER_DEFAULTS {
            cfg.set(*k, *v);
        }
        if matches!(self.subscribe, Subscription::Pattern(_)) {
            cfg.set(
                "topic.metadata.refresh.interval.ms",
                PATTERN_METADATA_REFRESH_MS,
            );
        }
        for (k, v) in &self.consumer {
            cfg.set(k, v);
        }
        cfg.set("bootstrap.servers", &self.bootstrap_servers);
        cfg.set("group.id", &self.group_id);
        cfg
    }

    /// The names handed to librdkafka's subscribe.
    pub fn subscription_names(&self) -> Vec<String> {
        match &self.subscribe {
            Subscription::Topics(t) => t.clone(),
            Subscription::Pattern(p) if p.starts_with('^') => vec![p.clone()],
            Subscription::Pattern(p) => vec![format!("^{p}")],
        }
    }
}

fn legal_topic_char(ch: char) -> bool {
    ch.is_ascii_alphanumeric() || matches!(ch, '.' | '_' | '-')
}

/// Kafka's own rule (`Topic.validate`): 1..=249 chars of `[a-zA-Z0-9._-]`,
/// not `.` or `..`.
pub(crate) fn check_topic_name(field: &str, topic: &str) -> Result<(), ConfigError> {
    if topic.is_empty() || topic.len() > 249 || topic == "." || topic == ".." {
        return Err(invalid(
            field,
            format!("`{topic}` is not a valid topic name (1 to 249 characters, not `.` or `..`)"),
        ));
    }
    if let Some(ch) = topic.chars().find(|c| !legal_topic_char(*c)) {
        return Err(invalid(
            field,
            format!("`{topic}` contains `{ch}`; Kafka topic names allow only [a-zA-Z0-9._-]"),
        ));
    }
    Ok(())
}

/// Keys whose values must never reach a log (the SDK's one rule).
fn is_secret(key: &str) -> bool {
    walcast_sdk::secret::is_secret_key(key)
}

struct Redacted<'a>(&'a BTreeMap<String, String>);

impl fmt::Debug for Redacted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(self.0.iter().map(|(k, v)| {
                (
                    k,
                    if is_secret(k) {
                        "<redacted>"
                    } else {
                        v.as_str()
                    },
                )
            }))
            .finish()
    }
}

impl fmt::Debug for KafkaSinkConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaSinkConfig")
            .field("bootstrap_servers", &self.bootstrap_servers)
            .field("topic_prefix", &self.topic_prefix)
            .field("routes", &self.routes)
            .field("tombstones_on_delete", &self.tombstones_on_delete)
            .field("skip_truncate", &self.skip_truncate)
            .field("max_in_flight_records", &self.max_in_flight_records)
            .field("create_topics", &self.create_topics)
            .field("topic_creation", &self.topic_creation)
            .field("transaction_topic", &self.transaction_topic)
            .field("delivery", &self.delivery)
            .field("producer", &Redacted(&self.producer))
            .finish()
    }
}

impl fmt::Debug for KafkaSourceConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaSourceConfig")
            .field("bootstrap_servers", &self.bootstrap_servers)
            .field("group_id", &self.group_id)
            .field("subscribe", &self.subscribe)
            .field("max_batch_records", &self.max_batch_records)
            .field("max_batch_wait", &self.max_batch_wait)
            .field("max_in_flight_records", &self.max_in_flight_records)
            .field("consumer", &Redacted(&self.consumer))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sink_defaults_from_minimal_toml() {
        let c: KafkaSinkConfig = toml::from_str(r#"bootstrap_servers = "127.0.0.1:9092""#).unwrap();
        c.validate().unwrap();
        assert_eq!(c.topic_prefix, DEFAULT_TOPIC_PREFIX);
        assert!(c.tombstones_on_delete);
        assert!(!c.skip_truncate);
        assert!(!c.create_topics);
        assert_eq!(c.max_in_flight_records, DEFAULT_MAX_IN_FLIGHT_RECORDS);
        assert_eq!(c.topic_creation.partitions, BROKER_DEFAULT);
        let cfg = c.client_config();
        assert_eq!(cfg.get("enable.idempotence"), Some("true"));
        assert_eq!(cfg.get("acks"), Some("all"));
        assert_eq!(cfg.get("message.timeout.ms"), Some("0"));
    }

    #[test]
    fn sink_full_toml_and_overrides() {
        let c: KafkaSinkConfig = toml::from_str(
            r#"
            bootstrap_servers = "k1:9092,k2:9092"
            topic_prefix = "shop"
            routes = { "public.orders" = "orders-v2" }
            tombstones_on_delete = false
            skip_truncate = true
            create_topics = true
            transaction_topic = "shop.transaction"
            [topic_creation]
            partitions = 6
            replication_factor = 3
            config = { "cleanup.policy" = "compact" }
            [producer]
            "security.protocol" = "SASL_SSL"
            "sasl.password" = "hunter2"
            "acks" = "1"
            "#,
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.routes.tables["public.orders"], "orders-v2");
        assert_eq!(c.delivery, DeliveryMode::AtLeastOnce);
        assert_eq!(c.topic_creation.partitions, 6);
        let cfg = c.client_config();
        assert_eq!(
            cfg.get("acks"),
            Some("1"),
            "user map overrides walcast defaults"
        );
        assert_eq!(cfg.get("security.protocol"), Some("SASL_SSL"));
        let dbg = format!("{c:?}");
        assert!(!dbg.contains("hunter2"), "{dbg}");
        assert!(dbg.contains("<redacted>"));
    }

    #[test]
    fn exactly_once_mode() {
        let c: KafkaSinkConfig = toml::from_str(
            r#"
            bootstrap_servers = "k:9092"
            [delivery]
            mode = "exactly_once"
            transactional_id = "walcast-orders"
            "#,
        )
        .unwrap();
        c.validate().unwrap();
        let cfg = c.client_config();
        assert_eq!(cfg.get("transactional.id"), Some("walcast-orders"));
        assert_eq!(
            cfg.get("message.timeout.ms"),
            Some("60000"),
            "must not exceed transaction.timeout.ms"
        );
        let err = toml::from_str::<KafkaSinkConfig>(
            "bootstrap_servers = \"k:1\"\ndelivery = { mode = \"exactly_once\" }",
        )
        .unwrap_err();
        assert!(err.to_string().contains("transactional_id"), "{err}");
    }

    #[test]
    fn unknown_fields_and_bad_values_are_refused() {
        let err =
            toml::from_str::<KafkaSinkConfig>("bootstrap_servers = \"x:1\"\ntopic_prefx = \"a\"")
                .unwrap_err();
        assert!(err.to_string().contains("topic_prefx"), "{err}");

        let mut c = KafkaSinkConfig::new("x:1");
        c.routes.tables.insert("orders".into(), "t".into());
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("schema.table"));

        let mut c = KafkaSinkConfig::new("x:1");
        c.topic_prefix = "my prefix".into();
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("topic_prefix") && err.contains("` `"), "{err}");

        let mut c = KafkaSinkConfig::new("x:1");
        c.topic_creation.partitions = 0;
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("topic_creation.partitions"));

        let mut c = KafkaSinkConfig::new("x:1");
        c.producer.insert("transactional.id".into(), "x".into());
        assert!(c.validate().is_err());
    }

    #[test]
    fn source_subscription_forms() {
        let c: KafkaSourceConfig = toml::from_str(
            r#"
            bootstrap_servers = "k:9092"
            group_id = "relay-redis"
            subscribe = { pattern = "shop\\..*" }
            "#,
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.subscription_names(), vec!["^shop\\..*".to_string()]);
        assert_eq!(c.client_config().get("enable.auto.commit"), Some("false"));
        assert_eq!(
            c.client_config().get("topic.metadata.refresh.interval.ms"),
            Some(PATTERN_METADATA_REFRESH_MS),
            "a pattern finds new topics within seconds"
        );
        let mut tuned = c.clone();
        tuned
            .consumer
            .insert("topic.metadata.refresh.interval.ms".into(), "60000".into());
        assert_eq!(
            tuned
                .client_config()
                .get("topic.metadata.refresh.interval.ms"),
            Some("60000"),
            "the user's value wins"
        );
        let listed = KafkaSourceConfig::new("k:1", "g", Subscription::Topics(vec!["t".into()]));
        assert_eq!(
            listed
                .client_config()
                .get("topic.metadata.refresh.interval.ms"),
            None
        );
        assert_eq!(
            listed.client_config().get("queued.max.messages.kbytes"),
            Some(CONSUMER_PREFETCH_KBYTES),
            "a bounded prefetch by default"
        );
        let mut bigger = listed.clone();
        bigger
            .consumer
            .insert("queued.max.messages.kbytes".into(), "65536".into());
        assert_eq!(
            bigger.client_config().get("queued.max.messages.kbytes"),
            Some("65536"),
            "the user's prefetch wins"
        );

        let c: KafkaSourceConfig = toml::from_str(
            r#"
            bootstrap_servers = "k:9092"
            group_id = "g"
            subscribe = { topics = [] }
            "#,
        )
        .unwrap();
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("subscribe.topics"));

        let mut c = KafkaSourceConfig::new("k:1", "g", Subscription::Topics(vec!["t".into()]));
        c.consumer
            .insert("enable.auto.commit".into(), "true".into());
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("enable.auto.commit"));
    }
}
