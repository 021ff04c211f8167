//! A registry inside walcast, for setups with no external registry: the
//! same [`Registry`] surface in-process, and the Confluent REST subset over
//! HTTP ([`crate::server`]) for consumers in other processes.
//!
//! [`EmbeddedRegistry::open`] keeps its state in a directory, so ids never
//! change across restarts (records already on Kafka name them):
//!
//! ```text
//! <dir>/schemas/<id>.json   {"id": 7, "schema": "<the schema's JSON text>"}
//! <dir>/subjects.json       {"subjects": {"<subject>": [<id of version 1>, ...]},
//!                            "compatibility": "BACKWARD",
//!                            "subject_compatibility": {"<subject>": "NONE"}}
//! ```
//!
//! Every file is written whole to a temporary file, fsynced, renamed over
//! the old one and the directory fsynced, so a crash leaves either the old
//! or the new file. A new schema's file is written before the subject index
//! that refers to it: a crash in between leaves an unreferenced schema whose
//! id stays taken, never an index pointing at nothing. One process may open
//! a directory at a time (nothing enforces it: two would hand out the same
//! ids).
//!
//! Writes happen only when a new schema or level is registered (once per
//! table shape), synchronously under the store's lock: a few milliseconds
//! of fsync on a path that is otherwise a map lookup.
//!
//! [`EmbeddedRegistry::new`] is the same registry without a directory: ids
//! live only as long as the process, for tests and single-process setups.
//!
//! Schemas are identified as Confluent does, by their whole JSON (keys
//! sorted, whitespace removed), not by the parsing canonical form, which
//! ignores docs and custom attributes (`connect.name`, `walcast.column`)
//! that consumers read. Compatibility follows apache-avro's schema
//! resolution rules.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use apache_avro::schema_compatibility::SchemaCompatibility;
use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

use crate::mapping::AvroSchema;
use crate::registry::{
    Compatibility, CompatibilityLevel, Registry, RegistryError, SubjectVersion, VersionRef,
};

/// The embedded registry's section of the daemon config.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmbeddedRegistryConfig {
    /// Where schemas and subjects are kept (created if missing). Keep it
    /// with the daemon's other state: losing it changes ids, and records
    /// already written name the old ones.
    pub dir: PathBuf,
    /// `host:port` to serve the Confluent REST API on, for consumers in
    /// other processes (and for pipelines whose `[registry] url` points
    /// here). Unset: in-process only.
    #[serde(default)]
    pub listen: Option<String>,
}

/// Why the embedded registry refused or failed. The HTTP status and
/// Confluent error code of each are in [`EmbeddedError::status`] and
/// [`EmbeddedError::error_code`].
#[derive(Debug, thiserror::Error)]
pub enum EmbeddedError {
    /// Reading or writing the directory failed. Possibly transient (disk
    /// full, permissions fixed later).
    #[error("embedded registry: {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file in the directory is not what this module writes: refused at
    /// open rather than guessed at, since ids must not change.
    #[error("embedded registry: {path}: {message}")]
    Corrupt { path: PathBuf, message: String },
    #[error("subject `{subject}` not found")]
    SubjectNotFound { subject: String },
    #[error("subject `{subject}` has no version {version}")]
    VersionNotFound { subject: String, version: u32 },
    #[error("schema id {id} not found")]
    SchemaNotFound { id: u32 },
    #[error("subject `{subject}` holds no such schema")]
    SchemaNotInSubject { subject: String },
    #[error("subject `{subject}` has no subject-level compatibility configured")]
    SubjectLevelNotConfigured { subject: String },
    #[error("schema being registered is incompatible with an earlier schema for subject `{subject}` ({level}): {}", messages.join("; "))]
    Incompatible {
        subject: String,
        level: &'static str,
        messages: Vec<String>,
    },
    #[error("invalid schema: {message}")]
    InvalidSchema { message: String },
    #[error("invalid version `{version}`: a positive number, `latest` or -1")]
    InvalidVersion { version: String },
    #[error("invalid compatibility level `{level}`")]
    InvalidLevel { level: String },
    #[error("invalid request: {message}")]
    InvalidRequest { message: String },
}

impl EmbeddedError {
    /// The HTTP status Confluent's registry answers with.
    pub fn status(&self) -> u16 {
        match self {
            EmbeddedError::Io { .. } | EmbeddedError::Corrupt { .. } => 500,
            EmbeddedError::SubjectNotFound { .. }
            | EmbeddedError::VersionNotFound { .. }
            | EmbeddedError::SchemaNotFound { .. }
            | EmbeddedError::SchemaNotInSubject { .. }
            | EmbeddedError::SubjectLevelNotConfigured { .. } => 404,
            EmbeddedError::Incompatible { .. } => 409,
            EmbeddedError::InvalidSchema { .. }
            | EmbeddedError::InvalidVersion { .. }
            | EmbeddedError::InvalidLevel { .. }
            | EmbeddedError::InvalidRequest { .. } => 422,
        }
    }

    /// Confluent's `error_code`.
    pub fn error_code(&self) -> u32 {
        match self {
            EmbeddedError::Io { .. } | EmbeddedError::Corrupt { .. } => 50001,
            EmbeddedError::SubjectNotFound { .. } => 40401,
            EmbeddedError::VersionNotFound { .. } => 40402,
            EmbeddedError::SchemaNotFound { .. } | EmbeddedError::SchemaNotInSubject { .. } => {
                40403
            }
            EmbeddedError::SubjectLevelNotConfigured { .. } => 40408,
            EmbeddedError::Incompatible { .. } => 409,
            EmbeddedError::InvalidSchema { .. } => 42201,
            EmbeddedError::InvalidVersion { .. } => 42202,
            EmbeddedError::InvalidLevel { .. } => 42203,
            EmbeddedError::InvalidRequest { .. } => 422,
        }
    }
}

impl From<EmbeddedError> for RegistryError {
    fn from(e: EmbeddedError) -> Self {
        match e {
            EmbeddedError::Incompatible { ref subject, .. } => RegistryError::Incompatible {
                subject: subject.clone(),
                message: e.to_string(),
            },
            EmbeddedError::InvalidSchema { message } => RegistryError::InvalidSchema {
                subject: String::new(),
                message,
            },
            EmbeddedError::Io { .. } | EmbeddedError::Corrupt { .. } => RegistryError::Store {
                message: e.to_string(),
            },
            other => RegistryError::NotFound {
                url: "embedded".into(),
                message: other.to_string(),
            },
        }
    }
}

/// The subject index as persisted.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Index {
    /// Each subject's schema ids; version n is element n - 1.
    subjects: BTreeMap<String, Vec<u32>>,
    #[serde(default)]
    compatibility: CompatibilityLevel,
    #[serde(default)]
    subject_compatibility: BTreeMap<String, CompatibilityLevel>,
}

/// A schema's file.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SchemaFile {
    id: u32,
    schema: String,
}

#[derive(Default)]
struct Store {
    schemas: BTreeMap<u32, Arc<AvroSchema>>,
    /// Compact JSON with sorted keys (the schema's identity) -> id.
    by_canonical: HashMap<String, u32>,
    index: Index,
}

impl Store {
    fn next_id(&self) -> u32 {
        self.schemas.keys().next_back().map_or(1, |id| id + 1)
    }

    fn ids(&self, subject: &str) -> Result<&Vec<u32>, EmbeddedError> {
        self.index
            .subjects
            .get(subject)
            .filter(|v| !v.is_empty())
            .ok_or_else(|| EmbeddedError::SubjectNotFound {
                subject: subject.to_string(),
            })
    }

    fn version(&self, subject: &str, version: VersionRef) -> Result<SubjectVersion, EmbeddedError> {
        let ids = self.ids(subject)?;
        let n = match version {
            VersionRef::Latest => ids.len() as u32,
            VersionRef::Number(n) => n,
        };
        let id = *ids.get((n as usize).wrapping_sub(1)).ok_or_else(|| {
            EmbeddedError::VersionNotFound {
                subject: subject.to_string(),
                version: n,
            }
        })?;
        Ok(SubjectVersion {
            subject: subject.to_string(),
            version: n,
            id,
            schema: self.schemas[&id].clone(),
        })
    }

    fn level(&self, subject: &str) -> CompatibilityLevel {
        self.index
            .subject_compatibility
            .get(subject)
            .copied()
            .unwrap_or(self.index.compatibility)
    }

    /// The verdict of `subject`'s level on `candidate` against `version`
    /// (all versions up to it for a transitive level and `latest`).
    fn verdict(
        &self,
        subject: &str,
        version: VersionRef,
        candidate: &AvroSchema,
    ) -> Result<Compatibility, EmbeddedError> {
        let level = self.level(subject);
        let ids = match self.ids(subject) {
            Ok(ids) => ids,
            // A subject that does not exist yet accepts anything.
            Err(_) if version == VersionRef::Latest => return Ok(compatible()),
            Err(e) => return Err(e),
        };
        let chosen = self.version(subject, version)?;
        let against: Vec<&AvroSchema> = if level.is_transitive() && version == VersionRef::Latest {
            ids.iter().map(|id| &*self.schemas[id]).collect()
        } else {
            vec![&chosen.schema]
        };
        let mut messages = Vec::new();
        for existing in against {
            messages.extend(check(level, existing, candidate));
        }
        Ok(Compatibility {
            is_compatible: messages.is_empty(),
            messages,
        })
    }
}

fn compatible() -> Compatibility {
    Compatibility {
        is_compatible: true,
        messages: Vec::new(),
    }
}

/// Whether every datum written with `writer` can be read with `reader`.
/// apache-avro answers `Partial` when only some branches of a union (or
/// symbols of an enum) resolve, i.e. some data would fail to read; the
/// Confluent registry (Java Avro) calls that incompatible, and so do we.
pub fn can_read(writer: &apache_avro::Schema, reader: &apache_avro::Schema) -> Result<(), String> {
    match SchemaCompatibility::can_read(writer, reader) {
        Ok(apache_avro::schema_compatibility::Compatibility::Full) => Ok(()),
        Ok(apache_avro::schema_compatibility::Compatibility::Partial) => {
            Err("only some of the writer's union branches or enum symbols can be read".into())
        }
        Err(e) => Err(e.to_string()),
    }
}

/// Why `candidate` breaks `level` against `existing` (nothing if it does not).
fn check(level: CompatibilityLevel, existing: &AvroSchema, candidate: &AvroSchema) -> Vec<String> {
    use CompatibilityLevel as L;
    let mut out = Vec::new();
    let backward = matches!(
        level,
        L::Backward | L::BackwardTransitive | L::Full | L::FullTransitive
    );
    let forward = matches!(
        level,
        L::Forward | L::ForwardTransitive | L::Full | L::FullTransitive
    );
    if backward {
        if let Err(e) = can_read(existing.schema(), candidate.schema()) {
            out.push(format!(
                "the new schema cannot read data written with the existing one: {e}"
            ));
        }
    }
    if forward {
        if let Err(e) = can_read(candidate.schema(), existing.schema()) {
            out.push(format!(
                "the existing schema cannot read data written with the new one: {e}"
            ));
        }
    }
    out
}

/// Compact JSON with object keys sorted at every level: equal for schemas
/// Confluent considers the same, whatever the formatting.
pub fn canonical_json(json: &Json) -> String {
    fn sorted(json: &Json) -> Json {
        match json {
            Json::Object(map) => {
                let mut entries: Vec<_> = map.iter().collect();
                entries.sort_by(|a, b| a.0.cmp(b.0));
                let mut out = serde_json::Map::new();
                for (k, v) in entries {
                    out.insert(k.clone(), sorted(v));
                }
                Json::Object(out)
            }
            Json::Array(items) => Json::Array(items.iter().map(sorted).collect()),
            other => other.clone(),
        }
    }
    // With serde_json's `preserve_order` the map keeps insertion order,
    // which is now sorted; without it the map sorts anyway.
    sorted(json).to_string()
}

/// Writes `bytes` to `path` atomically and durably: temporary file, fsync,
/// rename, fsync of the directory.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), EmbeddedError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| EmbeddedError::Io { path, source }
    };
    let tmp = path.with_extension("json.tmp");
    let mut file = fs::File::create(&tmp).map_err(io(&tmp))?;
    file.write_all(bytes).map_err(io(&tmp))?;
    file.sync_all().map_err(io(&tmp))?;
    drop(file);
    fs::rename(&tmp, path).map_err(io(path))?;
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir))?;
    Ok(())
}

/// An embedded registry; see the module doc.
#[derive(Default)]
pub struct EmbeddedRegistry {
    store: Mutex<Store>,
    /// `None`: in memory only.
    dir: Option<PathBuf>,
}

impl EmbeddedRegistry {
    /// A registry in memory only: ids last as long as the process.
    pub fn new() -> Self {
        EmbeddedRegistry::default()
    }

    /// Opens (creating if needed) the registry kept in `dir`, loading every
    /// schema and subject so ids stay what they were.
    pub fn open(dir: &Path) -> Result<Self, EmbeddedError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| EmbeddedError::Io { path, source }
        };
        let schemas_dir = dir.join("schemas");
        fs::create_dir_all(&schemas_dir).map_err(io(&schemas_dir))?;
        let mut store = Store::default();
        for entry in fs::read_dir(&schemas_dir).map_err(io(&schemas_dir))? {
            let path = entry.map_err(io(&schemas_dir))?.path();
            let Some(stem) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".json"))
            else {
                // Leftover temporary files of an interrupted write.
                continue;
            };
            let corrupt = |message: String| EmbeddedError::Corrupt {
                path: path.clone(),
                message,
            };
            let id: u32 = stem
                .parse()
                .map_err(|_| corrupt("not named <schema id>.json".into()))?;
            let text = fs::read_to_string(&path).map_err(io(&path))?;
            let file: SchemaFile =
                serde_json::from_str(&text).map_err(|e| corrupt(e.to_string()))?;
            if file.id != id {
                return Err(corrupt(format!("holds id {} under id {id}", file.id)));
            }
            let schema = AvroSchema::parse_str(&file.schema).map_err(|e| corrupt(e.to_string()))?;
            let canonical = canonical_json(schema.json());
            store.by_canonical.insert(canonical, id);
            store.schemas.insert(id, Arc::new(schema));
        }
        let index_path = dir.join("subjects.json");
        match fs::read_to_string(&index_path) {
            Ok(text) => {
                let corrupt = |message: String| EmbeddedError::Corrupt {
                    path: index_path.clone(),
                    message,
                };
                store.index = serde_json::from_str(&text).map_err(|e| corrupt(e.to_string()))?;
                for (subject, ids) in &store.index.subjects {
                    if let Some(id) = ids.iter().find(|id| !store.schemas.contains_key(id)) {
                        return Err(corrupt(format!(
                            "subject `{subject}` refers to schema id {id}, which has no file"
                        )));
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(&index_path)(e)),
        }
        tracing::info!(dir = %dir.display(), schemas = store.schemas.len(), subjects = store.index.subjects.len(), "embedded schema registry opened");
        Ok(EmbeddedRegistry {
            store: Mutex::new(store),
            dir: Some(dir.to_path_buf()),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Store> {
        self.store.lock().expect("embedded registry lock poisoned")
    }

    fn save_index(&self, index: &Index) -> Result<(), EmbeddedError> {
        match &self.dir {
            Some(dir) => write_atomic(
                &dir.join("subjects.json"),
                &serde_json::to_vec_pretty(index).expect("the index always serialises"),
            ),
            None => Ok(()),
        }
    }

    /// Every subject with at least one version, sorted.
    pub fn subjects(&self) -> Vec<String> {
        self.lock()
            .index
            .subjects
            .iter()
            .filter(|(_, ids)| !ids.is_empty())
            .map(|(s, _)| s.clone())
            .collect()
    }

    /// The schema ids of `subject`'s versions, oldest first (empty for an
    /// unknown subject).
    pub fn subject_ids(&self, subject: &str) -> Vec<u32> {
        self.lock()
            .index
            .subjects
            .get(subject)
            .cloned()
            .unwrap_or_default()
    }

    /// The version numbers of `subject`, oldest first.
    pub fn versions(&self, subject: &str) -> Result<Vec<u32>, EmbeddedError> {
        Ok((1..=self.lock().ids(subject)?.len() as u32).collect())
    }

    pub fn version(
        &self,
        subject: &str,
        version: VersionRef,
    ) -> Result<SubjectVersion, EmbeddedError> {
        self.lock().version(subject, version)
    }

    pub fn schema(&self, id: u32) -> Result<Arc<AvroSchema>, EmbeddedError> {
        self.lock()
            .schemas
            .get(&id)
            .cloned()
            .ok_or(EmbeddedError::SchemaNotFound { id })
    }

    /// The version of `subject` holding `schema`.
    pub fn lookup(
        &self,
        subject: &str,
        schema: &AvroSchema,
    ) -> Result<SubjectVersion, EmbeddedError> {
        let store = self.lock();
        let ids = store.ids(subject)?;
        let canonical = canonical_json(schema.json());
        let position = store
            .by_canonical
            .get(&canonical)
            .and_then(|id| ids.iter().position(|i| i == id))
            .ok_or_else(|| EmbeddedError::SchemaNotInSubject {
                subject: subject.to_string(),
            })?;
        store.version(subject, VersionRef::Number(position as u32 + 1))
    }

    /// Registers `schema` under `subject`: its existing id if the subject
    /// already holds it, else a new version after the subject's level has
    /// accepted it (an id shared with other subjects holding the same
    /// schema, as Confluent does).
    pub fn register_schema(
        &self,
        subject: &str,
        schema: &AvroSchema,
    ) -> Result<u32, EmbeddedError> {
        if subject.is_empty() {
            return Err(EmbeddedError::InvalidRequest {
                message: "empty subject".into(),
            });
        }
        let mut store = self.lock();
        let canonical = canonical_json(schema.json());
        let existing = store.by_canonical.get(&canonical).copied();
        let ids = store
            .index
            .subjects
            .get(subject)
            .cloned()
            .unwrap_or_default();
        if let Some(id) = existing.filter(|id| ids.contains(id)) {
            return Ok(id);
        }
        let verdict = store.verdict(subject, VersionRef::Latest, schema)?;
        if !verdict.is_compatible {
            return Err(EmbeddedError::Incompatible {
                subject: subject.to_string(),
                level: store.level(subject).as_str(),
                messages: verdict.messages,
            });
        }
        let id = match existing {
            Some(id) => id,
            None => {
                let id = store.next_id();
                if let Some(dir) = &self.dir {
                    let file = SchemaFile {
                        id,
                        schema: schema.text(),
                    };
                    write_atomic(
                        &dir.join("schemas").join(format!("{id}.json")),
                        &serde_json::to_vec(&file).expect("a schema file always serialises"),
                    )?;
                }
                store.by_canonical.insert(canonical, id);
                store.schemas.insert(id, Arc::new(schema.clone()));
                id
            }
        };
        let mut index = store.index.clone();
        index
            .subjects
            .entry(subject.to_string())
            .or_default()
            .push(id);
        self.save_index(&index)?;
        store.index = index;
        tracing::info!(subject, id, "schema registered in the embedded registry");
        Ok(id)
    }

    /// Whether `schema` is compatible with `version` of `subject` under the
    /// subject's level. An unknown subject accepts anything for `latest`.
    pub fn check(
        &self,
        subject: &str,
        version: VersionRef,
        schema: &AvroSchema,
    ) -> Result<Compatibility, EmbeddedError> {
        self.lock().verdict(subject, version, schema)
    }

    /// The level of `subject` (its own if set, else the global one), or
    /// the global level for `None`.
    pub fn level(&self, subject: Option<&str>) -> CompatibilityLevel {
        let store = self.lock();
        match subject {
            Some(s) => store.level(s),
            None => store.index.compatibility,
        }
    }

    /// The level set on `subject` itself, if any.
    pub fn subject_level(&self, subject: &str) -> Option<CompatibilityLevel> {
        self.lock()
            .index
            .subject_compatibility
            .get(subject)
            .copied()
    }

    /// Sets the level of `subject`, or the global one for `None`.
    pub fn set_level(
        &self,
        subject: Option<&str>,
        level: CompatibilityLevel,
    ) -> Result<(), EmbeddedError> {
        let mut store = self.lock();
        let mut index = store.index.clone();
        match subject {
            Some(s) => {
                index.subject_compatibility.insert(s.to_string(), level);
            }
            None => index.compatibility = level,
        }
        self.save_index(&index)?;
        store.index = index;
        Ok(())
    }
}

#[async_trait]
impl Registry for EmbeddedRegistry {
    async fn register(&self, subject: &str, schema: &AvroSchema) -> Result<u32, RegistryError> {
        self.register_schema(subject, schema).map_err(|e| match e {
            EmbeddedError::InvalidSchema { message } => RegistryError::InvalidSchema {
                subject: subject.to_string(),
                message,
            },
            e => e.into(),
        })
    }

    async fn schema_by_id(&self, id: u32) -> Result<Arc<AvroSchema>, RegistryError> {
        Ok(self.schema(id)?)
    }

    async fn check_compatibility(
        &self,
        subject: &str,
        schema: &AvroSchema,
    ) -> Result<Compatibility, RegistryError> {
        Ok(self.check(subject, VersionRef::Latest, schema)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schema(fields: &str) -> AvroSchema {
        AvroSchema::parse_str(&format!(
            r#"{{"type":"record","name":"R","fields":[{fields}]}}"#
        ))
        .unwrap()
    }

    #[tokio::test]
    async fn registers_idempotently_and_enforces_backward() {
        let r = EmbeddedRegistry::new();
        let v1 = schema(r#"{"name":"a","type":"int"}"#);
        let id1 = r.register("t-value", &v1).await.unwrap();
        assert_eq!(r.register("t-value", &v1).await.unwrap(), id1);
        let v2 = schema(
            r#"{"name":"a","type":"int"},{"name":"b","type":["null","string"],"default":null}"#,
        );
        let id2 = r.register("t-value", &v2).await.unwrap();
        assert_ne!(id1, id2);
        assert_eq!(r.subject_ids("t-value"), [id1, id2]);
        assert_eq!(r.versions("t-value").unwrap(), [1, 2]);
        assert_eq!(
            r.schema_by_id(id2).await.unwrap().fingerprint(),
            v2.fingerprint()
        );

        let bad = schema(
            r#"{"name":"a","type":"string"},{"name":"b","type":["null","string"],"default":null}"#,
        );
        assert!(
            !r.check_compatibility("t-value", &bad)
                .await
                .unwrap()
                .is_compatible
        );
        let err = r.register("t-value", &bad).await.unwrap_err();
        assert!(
            matches!(&err, RegistryError::Incompatible { subject, .. } if subject == "t-value"),
            "{err}"
        );
        assert!(
            r.check_compatibility("other", &bad)
                .await
                .unwrap()
                .is_compatible
        );
        assert!(matches!(
            r.schema_by_id(99).await,
            Err(RegistryError::NotFound { .. })
        ));
        assert!(matches!(
            r.schema_by_id(0).await,
            Err(RegistryError::NotFound { .. })
        ));

        // NONE lets anything through; FORWARD refuses a field without default
        // that old readers would miss.
        r.set_level(Some("t-value"), CompatibilityLevel::None)
            .unwrap();
        let id3 = r.register("t-value", &bad).await.unwrap();
        assert_eq!(r.version("t-value", VersionRef::Latest).unwrap().id, id3);
        r.set_level(Some("t-value"), CompatibilityLevel::Forward)
            .unwrap();
        let removed = schema(r#"{"name":"b","type":["null","string"],"default":null}"#);
        assert!(
            !r.check("t-value", VersionRef::Latest, &removed)
                .unwrap()
                .is_compatible
        );
    }

    #[test]
    fn attributes_are_part_of_a_schemas_identity() {
        let r = EmbeddedRegistry::new();
        let plain = schema(r#"{"name":"a","type":"bytes"}"#);
        let decimal = schema(
            r#"{"name":"a","type":{"type":"bytes","logicalType":"decimal","precision":4,"scale":2}}"#,
        );
        r.set_level(None, CompatibilityLevel::None).unwrap();
        let a = r.register_schema("s", &plain).unwrap();
        let b = r.register_schema("s", &decimal).unwrap();
        assert_ne!(a, b);
        assert_eq!(r.lookup("s", &decimal).unwrap().version, 2);
        // Same parsing canonical form, another attribute: another schema.
        let named = schema(r#"{"name":"a","type":"bytes","walcast.column":"A"}"#);
        assert_eq!(named.fingerprint(), plain.fingerprint());
        let c = r.register_schema("s", &named).unwrap();
        assert!(c != a && c != b);
        // Formatting and key order are not.
        let reordered = AvroSchema::parse_str(
            r#"{"fields": [ {"type":"bytes", "name":"a"} ], "name":"R", "type":"record"}"#,
        )
        .unwrap();
        assert_eq!(r.register_schema("s", &reordered).unwrap(), a);
    }

    #[test]
    fn refuses_a_corrupt_directory_rather_than_renumbering() {
        let dir =
            std::env::temp_dir().join(format!("walcast-embedded-corrupt-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        {
            let r = EmbeddedRegistry::open(&dir).unwrap();
            r.register_schema("s", &schema(r#"{"name":"a","type":"int"}"#))
                .unwrap();
        }
        fs::write(dir.join("schemas").join("1.json"), "{").unwrap();
        let err = EmbeddedRegistry::open(&dir).err().unwrap();
        assert!(matches!(err, EmbeddedError::Corrupt { .. }), "{err}");
        fs::remove_file(dir.join("schemas").join("1.json")).unwrap();
        let err = EmbeddedRegistry::open(&dir).err().unwrap();
        assert!(err.to_string().contains("schema id 1"), "{err}");
        fs::remove_dir_all(&dir).unwrap();
    }
}
