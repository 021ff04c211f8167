//! Shaping events per table before they leave walcast: column include and
//! exclude lists, masks, truncation and salted hashes, and the message key
//! override (Debezium's `column.include.list`, `column.exclude.list`,
//! `column.mask.with.N.chars`, `column.truncate.to.N.chars`,
//! `column.mask.hash.SHA-256.with.salt`, `message.key.columns`).
//!
//! # Why here, and the invariant
//!
//! A shaped column must never reach any sink in its original form: not in
//! an event, not in a schema derived from the table (Avro, an index
//! mapping), not in a snapshot row. So the [`Shaper`] runs once, between
//! the source and every sink, and rewrites the table description and the
//! row images together: sinks and encoders only ever see the shaped
//! [`TableSchema`], whose column types say what the fields now hold (a
//! masked or hashed column is text). Snapshot rows and streamed rows go
//! through the same shaper, so their shapes agree.
//!
//! An unchanged TOASTed value ([`Value::Unavailable`]) stays unavailable
//! whatever the rule (the sinks keep what they have), and a null stays null.
//!
//! # Keys
//!
//! `message_key_columns` replaces the table's key (its primary key or
//! replica identity index) by the listed columns, for key-less tables too:
//! their events then get keys, per-key ordering and sink document ids. When
//! an update changes the override key and the old row is known (the columns
//! are part of the replica identity, e.g. REPLICA IDENTITY FULL), it is
//! published as a delete of the old key and a create of the new one, as a
//! primary-key change is; when the old values are not in the WAL, walcast
//! cannot know the old key and publishes the update under the new one (set
//! REPLICA IDENTITY FULL on such tables).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::event::{ChangeEvent, Op};
use crate::table::{Column, PgType, TableSchema};
use crate::value::Value;

/// The shaping rules of one table, as written in the config
/// (`[pipelines.NAME.table."schema.table"]`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TableShapeConfig {
    /// Only these columns leave walcast (and the key columns, which must be
    /// listed too).
    #[serde(default)]
    pub column_include_list: Option<Vec<String>>,
    /// These columns never leave walcast.
    #[serde(default)]
    pub column_exclude_list: Vec<String>,
    /// `{ column = N }`: the value is replaced by N asterisks.
    #[serde(default)]
    pub column_mask_with: BTreeMap<String, usize>,
    /// `{ column = N }`: text longer than N characters (bytea: bytes) is cut
    /// to N.
    #[serde(default)]
    pub column_truncate_to: BTreeMap<String, usize>,
    /// Columns replaced by the lowercase hex SHA-256 of the salt followed by
    /// the value's text form; needs `hash_salt_env` or `hash_salt_file`.
    #[serde(default)]
    pub column_mask_hash: Vec<String>,
    /// The environment variable holding the hash salt.
    pub hash_salt_env: Option<String>,
    /// A file holding the hash salt (trailing newline ignored).
    pub hash_salt_file: Option<std::path::PathBuf>,
    /// The key of this table's events, replacing its primary key.
    pub message_key_columns: Option<Vec<String>>,
    /// A row filter (`WHERE` condition), applied by the source: for
    /// Postgres, the publication's row filter (15+), honoured by snapshots.
    pub row_filter: Option<String>,
}

impl TableShapeConfig {
    /// Whether the rules change anything the shaper handles.
    pub fn shapes_events(&self) -> bool {
        self.column_include_list.is_some()
            || !self.column_exclude_list.is_empty()
            || !self.column_mask_with.is_empty()
            || !self.column_truncate_to.is_empty()
            || !self.column_mask_hash.is_empty()
            || self.message_key_columns.is_some()
    }

    /// Checks what can be checked without the table; `key` is the config
    /// key of this section, for messages.
    pub fn validate(&self, key: &str) -> Result<(), String> {
        if !self.column_mask_hash.is_empty()
            && self.hash_salt_env.is_none()
            && self.hash_salt_file.is_none()
        {
            return Err(format!(
                "{key}.column_mask_hash needs a salt: set hash_salt_env or hash_salt_file (a hash without a salt is a \
                 dictionary lookup away from the value)"
            ));
        }
        if self.hash_salt_env.is_some() && self.hash_salt_file.is_some() {
            return Err(format!(
                "{key}: set hash_salt_env or hash_salt_file, not both"
            ));
        }
        let mut seen: HashMap<&str, &str> = HashMap::new();
        let rules = self
            .column_mask_with
            .keys()
            .map(|c| (c.as_str(), "column_mask_with"))
            .chain(
                self.column_truncate_to
                    .keys()
                    .map(|c| (c.as_str(), "column_truncate_to")),
            )
            .chain(
                self.column_mask_hash
                    .iter()
                    .map(|c| (c.as_str(), "column_mask_hash")),
            )
            .chain(
                self.column_exclude_list
                    .iter()
                    .map(|c| (c.as_str(), "column_exclude_list")),
            );
        for (c, rule) in rules {
            if let Some(other) = seen.insert(c, rule) {
                return Err(format!(
                    "{key}: column `{c}` is in both {other} and {rule}; give it one rule"
                ));
            }
        }
        if matches!(&self.message_key_columns, Some(k) if k.is_empty()) {
            return Err(format!(
                "{key}.message_key_columns is empty; list the key's columns or remove it"
            ));
        }
        Ok(())
    }

    fn salt(&self, key: &str) -> Result<Option<Vec<u8>>, ShapeError> {
        if self.column_mask_hash.is_empty() {
            return Ok(None);
        }
        let salt = match (&self.hash_salt_env, &self.hash_salt_file) {
            (Some(var), _) => std::env::var(var).map_err(|_| ShapeError::Config {
                message: format!("{key}.hash_salt_env: the environment variable {var} is not set"),
            })?,
            (None, Some(file)) => std::fs::read_to_string(file)
                .map_err(|e| ShapeError::Config {
                    message: format!("{key}.hash_salt_file: cannot read {}: {e}", file.display()),
                })?
                .trim_end_matches(['\n', '\r'])
                .to_string(),
            (None, None) => unreachable!("validated"),
        };
        if salt.is_empty() {
            return Err(ShapeError::Config {
                message: format!("{key}: the hash salt is empty"),
            });
        }
        Ok(Some(salt.into_bytes()))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ShapeError {
    #[error("{message}")]
    Config { message: String },
    /// The rules do not fit the table as it is (definite: fix the config).
    #[error("table {table}: {message}")]
    Table { table: String, message: String },
}

#[derive(Debug, Clone)]
enum Action {
    Keep,
    Mask(usize),
    Truncate(usize),
    Hash,
}

/// A table's shape, for one version of its description.
#[derive(Debug)]
struct Shaped {
    table: Arc<TableSchema>,
    /// For each output column: its index in the source row and what to do.
    columns: Vec<(usize, Action)>,
    /// The key was overridden: key changes split updates.
    key_overridden: bool,
}

struct Rules {
    config: TableShapeConfig,
    salt: Option<Vec<u8>>,
}

/// Applies every table's rules; built once per pipeline.
pub struct Shaper {
    /// schema → table → rules: looked up per event without allocating.
    rules: HashMap<String, HashMap<String, Rules>>,
    /// Keyed by the source description's address and version: a new
    /// description (a changed table) gets a new shape.
    cache: Mutex<HashMap<(u32, u32), Arc<Shaped>>>,
    warned: Mutex<std::collections::HashSet<(String, String)>>,
}

impl Shaper {
    /// `tables`: `schema.table` → rules; `key_prefix` names the config
    /// section in messages (`pipelines.orders.table`).
    pub fn new(
        tables: &BTreeMap<String, TableShapeConfig>,
        key_prefix: &str,
    ) -> Result<Self, ShapeError> {
        let mut rules: HashMap<String, HashMap<String, Rules>> = HashMap::new();
        for (name, config) in tables {
            let key = format!("{key_prefix}.\"{name}\"");
            config
                .validate(&key)
                .map_err(|message| ShapeError::Config { message })?;
            if config.shapes_events() {
                let salt = config.salt(&key)?;
                let table = crate::TableName::parse(name).ok_or_else(|| ShapeError::Config {
                    message: format!("{key}: not of the form schema.table"),
                })?;
                rules.entry(table.schema).or_default().insert(
                    table.name,
                    Rules {
                        config: config.clone(),
                        salt,
                    },
                );
            }
        }
        Ok(Shaper {
            rules,
            cache: Mutex::new(HashMap::new()),
            warned: Mutex::new(Default::default()),
        })
    }

    /// Whether any table has rules (else [`Self::apply`] is the identity).
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The table as sinks will see it (for `check` and schema registration).
    pub fn shape_table(&self, table: &Arc<TableSchema>) -> Result<Arc<TableSchema>, ShapeError> {
        Ok(match self.shaped(table)? {
            Some(s) => Arc::clone(&s.table),
            None => Arc::clone(table),
        })
    }

    fn rules_for(&self, table: &TableSchema) -> Option<&Rules> {
        self.rules.get(&table.schema)?.get(&table.name)
    }

    /// Whether events of this table are changed by the rules.
    pub fn applies_to(&self, table: &TableSchema) -> bool {
        self.rules_for(table).is_some()
    }

    fn shaped(&self, table: &Arc<TableSchema>) -> Result<Option<Arc<Shaped>>, ShapeError> {
        let Some(rules) = self.rules_for(table) else {
            return Ok(None);
        };
        let id = (table.relation_id, table.version);
        if let Some(s) = self.cache.lock().expect("shape cache").get(&id) {
            // The same relation and version always has the same columns.
            if s.columns.iter().all(|(i, _)| *i < table.columns.len()) {
                return Ok(Some(Arc::clone(s)));
            }
        }
        let shaped = Arc::new(self.plan(table, &rules.config)?);
        self.cache
            .lock()
            .expect("shape cache")
            .insert(id, Arc::clone(&shaped));
        Ok(Some(shaped))
    }

    fn warn_missing(&self, table: &str, column: &str, rule: &str) {
        if self
            .warned
            .lock()
            .expect("warned")
            .insert((table.to_string(), column.to_string()))
        {
            tracing::warn!(table, column, rule, "a shaping rule names a column the table does not have (dropped?); it has no effect");
        }
    }

    fn plan(&self, table: &TableSchema, c: &TableShapeConfig) -> Result<Shaped, ShapeError> {
        let tname = table.qualified_name();
        let err = |message: String| ShapeError::Table {
            table: tname.clone(),
            message,
        };
        let has = |col: &str| table.column_index(col).is_some();
        for (list, rule) in [
            (
                c.column_exclude_list.iter().collect::<Vec<_>>(),
                "column_exclude_list",
            ),
            (c.column_mask_hash.iter().collect(), "column_mask_hash"),
            (c.column_mask_with.keys().collect(), "column_mask_with"),
            (c.column_truncate_to.keys().collect(), "column_truncate_to"),
            (
                c.column_include_list.iter().flatten().collect(),
                "column_include_list",
            ),
        ] {
            for col in list {
                if !has(col) {
                    self.warn_missing(&tname, col, rule);
                }
            }
        }
        let included = |col: &Column| {
            c.column_include_list
                .as_ref()
                .is_none_or(|l| l.contains(&col.name))
                && !c.column_exclude_list.contains(&col.name)
        };
        let key_names: Vec<String> = match &c.message_key_columns {
            Some(k) => {
                for col in k {
                    match table.columns.iter().find(|x| &x.name == col) {
                        None => {
                            return Err(err(format!(
                                "message_key_columns names `{col}`, which the table does not have"
                            )))
                        }
                        Some(x) if !included(x) => {
                            return Err(err(format!(
                                "message_key_columns names `{col}`, which the column lists exclude"
                            )))
                        }
                        Some(_) => {}
                    }
                }
                k.clone()
            }
            None => table
                .columns
                .iter()
                .filter(|x| x.key)
                .map(|x| x.name.clone())
                .collect(),
        };
        let mut columns = Vec::new();
        let mut out = Vec::new();
        for (i, col) in table.columns.iter().enumerate() {
            let is_key = key_names.contains(&col.name);
            if !included(col) {
                if is_key {
                    return Err(err(format!(
                        "column `{}` is part of the key and cannot be left out (choose another key with message_key_columns)",
                        col.name
                    )));
                }
                continue;
            }
            // A key chosen by message_key_columns is in the order it lists.
            let key_position = match &c.message_key_columns {
                Some(k) => k.iter().position(|n| n == &col.name).map(|p| p as u16 + 1),
                None => col.key_position,
            };
            let mut shaped = Column {
                key: is_key,
                key_position,
                ..col.clone()
            };
            let text = |mut s: Column| {
                s.pg_type = PgType::Text;
                s.type_oid = 25;
                s.type_modifier = -1;
                s.default = None; // the column's DEFAULT is no longer its value
                s
            };
            let action = if let Some(n) = c.column_mask_with.get(&col.name) {
                shaped = text(shaped);
                Action::Mask(*n)
            } else if c.column_mask_hash.contains(&col.name) {
                shaped = text(shaped);
                Action::Hash
            } else if let Some(n) = c.column_truncate_to.get(&col.name) {
                if !matches!(
                    col.pg_type,
                    PgType::Text
                        | PgType::Varchar { .. }
                        | PgType::Char { .. }
                        | PgType::Name
                        | PgType::Bytea
                ) {
                    return Err(err(format!(
                        "column_truncate_to applies to text and bytea columns; `{}` is {}",
                        col.name,
                        col.pg_type.sql_name()
                    )));
                }
                Action::Truncate(*n)
            } else {
                Action::Keep
            };
            if is_key && !matches!(action, Action::Keep) {
                return Err(err(format!(
                    "column `{}` is part of the key; masking it would merge rows under one key (hash it with \
                     column_mask_hash only if it is not the key, or choose another key with message_key_columns)",
                    col.name
                )));
            }
            columns.push((i, action));
            out.push(shaped);
        }
        Ok(Shaped {
            table: Arc::new(TableSchema {
                columns: out,
                ..table.clone()
            }),
            columns,
            key_overridden: c.message_key_columns.is_some(),
        })
    }

    /// Shapes one event; an update that changes an overridden key becomes a
    /// delete and a create. Events of tables without rules pass unchanged.
    pub fn apply(&self, event: ChangeEvent) -> Result<Vec<ChangeEvent>, ShapeError> {
        let Some(shaped) = self.shaped(&event.table)? else {
            return Ok(vec![event]);
        };
        let salt = self.rules_for(&event.table).and_then(|r| r.salt.as_deref());
        let image = |row: &[Value]| -> Vec<Value> {
            shaped
                .columns
                .iter()
                .map(|(i, action)| {
                    shape_value(row.get(*i).cloned().unwrap_or(Value::Null), action, salt)
                })
                .collect()
        };
        let before = event.before.as_deref().map(image);
        let after = event.after.as_deref().map(image);
        let table = Arc::clone(&shaped.table);
        if shaped.key_overridden && event.op == Op::Update {
            if let (Some(b), Some(a)) = (&before, &after) {
                let key = |row: &[Value]| -> Vec<Value> {
                    table
                        .columns
                        .iter()
                        .zip(row)
                        .filter(|(c, _)| c.key)
                        .map(|(_, v)| v.clone())
                        .collect()
                };
                let (old, new) = (key(b), key(a));
                // An unavailable (unchanged TOASTed) value did not change.
                let known = old
                    .iter()
                    .chain(&new)
                    .all(|v| !matches!(v, Value::Unavailable));
                if known && old != new {
                    let delete = ChangeEvent {
                        op: Op::Delete,
                        table: Arc::clone(&table),
                        before: Some(b.clone()),
                        after: None,
                        ..event.clone()
                    };
                    let create = ChangeEvent {
                        op: Op::Create,
                        table,
                        before: None,
                        after: Some(a.clone()),
                        ..event
                    };
                    return Ok(vec![delete, create]);
                }
            }
        }
        Ok(vec![ChangeEvent {
            table,
            before,
            after,
            ..event
        }])
    }
}

fn shape_value(v: Value, action: &Action, salt: Option<&[u8]>) -> Value {
    if matches!(v, Value::Null | Value::Unavailable) {
        return v;
    }
    match action {
        Action::Keep => v,
        Action::Mask(n) => Value::Text("*".repeat(*n)),
        Action::Truncate(n) => match v {
            Value::Text(s) => Value::Text(s.chars().take(*n).collect()),
            Value::Bytes(mut b) => {
                b.truncate(*n);
                Value::Bytes(b)
            }
            other => other,
        },
        Action::Hash => {
            let mut h = Sha256::new();
            h.update(salt.unwrap_or_default());
            h.update(text_form(&v).as_bytes());
            Value::Text(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
        }
    }
}

/// The value as text, for hashing: strings as they are, anything else as
/// its JSON rendering.
fn text_form(v: &Value) -> String {
    match v {
        Value::Text(s) | Value::Json(s) | Value::Network(s) | Value::Enum(s) => s.clone(),
        other => match crate::json::value(other, &crate::json::JsonOptions::default()) {
            serde_json::Value::String(s) => s,
            j => j.to_string(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{SnapshotMarker, SourceInfo};
    use crate::position::Lsn;
    use crate::table::ReplicaIdentity;

    fn col(name: &str, pg_type: PgType, key: bool) -> Column {
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

    fn users() -> Arc<TableSchema> {
        Arc::new(TableSchema {
            relation_id: 7,
            schema: "public".into(),
            name: "users".into(),
            columns: vec![
                col("id", PgType::Int4, true),
                col("email", PgType::Text, false),
                col("ssn", PgType::Text, false),
                col("bio", PgType::Text, false),
                col("age", PgType::Int4, false),
            ],
            replica_identity: ReplicaIdentity::Full,
            version: 1,
        })
    }

    fn event(op: Op, before: Option<Vec<Value>>, after: Option<Vec<Value>>) -> ChangeEvent {
        ChangeEvent {
            op,
            table: users(),
            before,
            after,
            source: SourceInfo {
                name: "p".into(),
                db: "d".into(),
                lsn: Lsn(1),
                commit_lsn: Lsn(2),
                tx_id: Some(3),
                ts_ms: 0,
                ts_us: 0,
                snapshot: SnapshotMarker::False,
            },
            transaction: None,
            ts_ms: 0,
        }
    }

    fn row(id: i32, email: &str, ssn: &str, bio: Value, age: i32) -> Vec<Value> {
        vec![
            Value::Int32(id),
            Value::Text(email.into()),
            Value::Text(ssn.into()),
            bio,
            Value::Int32(age),
        ]
    }

    fn shaper(toml_text: &str) -> Shaper {
        let tables: BTreeMap<String, TableShapeConfig> = toml_like(toml_text);
        Shaper::new(&tables, "pipelines.p.table").unwrap()
    }

    /// The config as the daemon would deserialize it (JSON here: the SDK
    /// has no TOML parser).
    fn toml_like(json: &str) -> BTreeMap<String, TableShapeConfig> {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn excluded_masked_truncated_and_hashed_columns_never_leave_in_the_original() {
        std::env::set_var("WALCAST_TEST_SALT_1", "pepper");
        let s = shaper(
            r#"{"public.users": {"column_exclude_list": ["ssn"], "column_mask_with": {"age": 3},
                "column_truncate_to": {"bio": 4}, "column_mask_hash": ["email"], "hash_salt_env": "WALCAST_TEST_SALT_1"}}"#,
        );
        let out = s
            .apply(event(
                Op::Create,
                None,
                Some(row(
                    1,
                    "a@b.c",
                    "123-45",
                    Value::Text("a long bio".into()),
                    42,
                )),
            ))
            .unwrap();
        assert_eq!(out.len(), 1);
        let e = &out[0];
        let names: Vec<&str> = e.table.columns.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["id", "email", "bio", "age"]);
        let after = e.after.as_ref().unwrap();
        assert_eq!(after[0], Value::Int32(1));
        let mut h = Sha256::new();
        h.update(b"pepper");
        h.update(b"a@b.c");
        let want: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(after[1], Value::Text(want));
        assert_eq!(after[2], Value::Text("a lo".into()));
        assert_eq!(after[3], Value::Text("***".into()));
        // The schema says what the fields hold now.
        assert_eq!(e.table.columns[3].pg_type, PgType::Text);
        assert_eq!(e.table.columns[1].pg_type, PgType::Text);
        let text = format!("{e:?}");
        assert!(
            !text.contains("123-45") && !text.contains("a@b.c") && !text.contains("long bio"),
            "{text}"
        );
    }

    #[test]
    fn null_and_unchanged_toast_stay_what_they_are() {
        let s = shaper(r#"{"public.users": {"column_mask_with": {"bio": 5}}}"#);
        let out = s
            .apply(event(
                Op::Update,
                None,
                Some(row(1, "e", "s", Value::Unavailable, 1)),
            ))
            .unwrap();
        assert_eq!(out[0].after.as_ref().unwrap()[3], Value::Unavailable);
        let out = s
            .apply(event(
                Op::Update,
                None,
                Some(row(1, "e", "s", Value::Null, 1)),
            ))
            .unwrap();
        assert_eq!(out[0].after.as_ref().unwrap()[3], Value::Null);
    }

    #[test]
    fn include_list_keeps_the_listed_columns_and_tables_without_rules_pass() {
        let s = shaper(r#"{"public.users": {"column_include_list": ["id", "age"]}}"#);
        let out = s
            .apply(event(
                Op::Create,
                None,
                Some(row(1, "e", "s", Value::Null, 9)),
            ))
            .unwrap();
        assert_eq!(
            out[0].after.as_ref().unwrap(),
            &vec![Value::Int32(1), Value::Int32(9)]
        );
        let other = Shaper::new(
            &toml_like(r#"{"public.other": {"column_exclude_list": ["x"]}}"#),
            "k",
        )
        .unwrap();
        let e = event(Op::Create, None, Some(row(1, "e", "s", Value::Null, 9)));
        let out = other.apply(e.clone()).unwrap();
        assert!(Arc::ptr_eq(&out[0].table, &e.table));
    }

    #[test]
    fn a_key_override_keys_events_and_splits_a_key_change() {
        let s = shaper(r#"{"public.users": {"message_key_columns": ["email"]}}"#);
        let out = s
            .apply(event(
                Op::Create,
                None,
                Some(row(1, "e1", "s", Value::Null, 9)),
            ))
            .unwrap();
        let keys: Vec<_> = out[0]
            .key_values()
            .unwrap()
            .into_iter()
            .map(|(n, v)| (n.to_string(), v.clone()))
            .collect();
        assert_eq!(keys, [("email".to_string(), Value::Text("e1".into()))]);
        let out = s
            .apply(event(
                Op::Update,
                Some(row(1, "e1", "s", Value::Null, 9)),
                Some(row(1, "e2", "s", Value::Null, 9)),
            ))
            .unwrap();
        assert_eq!(
            out.iter().map(|e| e.op).collect::<Vec<_>>(),
            [Op::Delete, Op::Create]
        );
        assert_eq!(out[0].key_values().unwrap()[0].1, &Value::Text("e1".into()));
        assert_eq!(out[1].key_values().unwrap()[0].1, &Value::Text("e2".into()));
        // The same key: one update.
        let out = s
            .apply(event(
                Op::Update,
                Some(row(1, "e2", "s", Value::Null, 9)),
                Some(row(1, "e2", "t", Value::Null, 10)),
            ))
            .unwrap();
        assert_eq!(out.len(), 1);
    }

    #[test]
    fn incoherent_rules_are_refused_with_the_reason() {
        let e = |json: &str| {
            let s = Shaper::new(&toml_like(json), "pipelines.p.table");
            match s {
                Err(e) => e.to_string(),
                Ok(s) => s
                    .apply(event(
                        Op::Create,
                        None,
                        Some(row(1, "e", "s", Value::Null, 1)),
                    ))
                    .unwrap_err()
                    .to_string(),
            }
        };
        assert!(
            e(r#"{"public.users": {"column_exclude_list": ["id"]}}"#).contains("part of the key")
        );
        assert!(
            e(r#"{"public.users": {"column_mask_with": {"id": 3}}}"#).contains("part of the key")
        );
        assert!(
            e(r#"{"public.users": {"column_truncate_to": {"age": 3}}}"#).contains("text and bytea")
        );
        assert!(e(r#"{"public.users": {"column_mask_hash": ["email"]}}"#).contains("needs a salt"));
        assert!(e(r#"{"public.users": {"message_key_columns": ["nope"]}}"#).contains("`nope`"));
        assert!(e(
            r#"{"public.users": {"column_mask_with": {"bio": 1}, "column_exclude_list": ["bio"]}}"#
        )
        .contains("both"));
        assert!(e(r#"{"public.users": {"hash_salt_env": "WALCAST_TEST_NO_SUCH_VAR", "column_mask_hash": ["bio"]}}"#)
            .contains("WALCAST_TEST_NO_SUCH_VAR is not set"));
    }
}

/// A sink behind a [`Shaper`]: every batch is shaped before the inner sink
/// sees it, so no sink can receive an unshaped event. A table whose rules
/// do not fit it fails the batch definitely (the config must change).
pub struct ShapingSink {
    inner: Box<dyn crate::sink::Sink>,
    shaper: Arc<Shaper>,
}

impl ShapingSink {
    pub fn wrap(
        inner: Box<dyn crate::sink::Sink>,
        shaper: Arc<Shaper>,
    ) -> Box<dyn crate::sink::Sink> {
        if shaper.is_empty() {
            return inner;
        }
        Box::new(ShapingSink { inner, shaper })
    }
}

#[async_trait::async_trait]
impl crate::sink::Sink for ShapingSink {
    fn name(&self) -> &str {
        self.inner.name()
    }

    async fn send(&mut self, batch: crate::sink::Batch) -> Result<(), crate::sink::SinkError> {
        // A batch of tables without rules goes through as it is.
        if !batch
            .events
            .iter()
            .any(|e| self.shaper.applies_to(&e.table))
        {
            return self.inner.send(batch).await;
        }
        let mut events = Vec::with_capacity(batch.events.len());
        for e in batch.events.iter() {
            let shaped = self.shaper.apply(e.clone()).map_err(|err| {
                crate::sink::SinkError::definite(self.inner.name(), err.to_string())
                    .with_source(err)
            })?;
            events.extend(shaped);
        }
        self.inner
            .send(crate::sink::Batch {
                events: Arc::new(events),
                acker: batch.acker,
            })
            .await
    }

    async fn flush(&mut self) -> Result<(), crate::sink::SinkError> {
        self.inner.flush().await
    }

    fn refuses(&self, event: &ChangeEvent) -> Option<String> {
        if !self.shaper.applies_to(&event.table) {
            return self.inner.refuses(event);
        }
        match self.shaper.apply(event.clone()) {
            Err(e) => Some(e.to_string()),
            Ok(events) => events.iter().find_map(|e| self.inner.refuses(e)),
        }
    }

    fn takes_notices(&self) -> bool {
        self.inner.takes_notices()
    }

    // `healthy` keeps the default: a boxed sink is not `Sync`, and the
    // daemon asks sinks' health where it holds them unboxed.

    async fn rewind(&mut self) -> Result<(), crate::sink::SinkError> {
        self.inner.rewind().await
    }
}
