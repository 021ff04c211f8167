//! An in-process registry for single-binary setups with no external
//! registry: the same [`Registry`] surface, BACKWARD compatibility enforced
//! with apache-avro's schema resolution rules.
//!
//! Ids live only as long as the process. Records written with them cannot
//! be read by another process (or after a restart) unless the same schemas
//! are registered in the same order; use it where the encoder and the
//! readers share one process, or for tests of the pipeline itself.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use apache_avro::schema_compatibility::SchemaCompatibility;
use async_trait::async_trait;

use crate::mapping::AvroSchema;
use crate::registry::{Compatibility, Registry, RegistryError};

#[derive(Default)]
struct Store {
    /// Index + 1 is the id.
    schemas: Vec<Arc<AvroSchema>>,
    by_fingerprint: HashMap<u64, u32>,
    /// The ids of each subject's versions, oldest first.
    subjects: HashMap<String, Vec<u32>>,
}

/// An in-memory registry. Ids are process-local (see the module doc).
#[derive(Default)]
pub struct EmbeddedRegistry {
    store: Mutex<Store>,
}

impl EmbeddedRegistry {
    pub fn new() -> Self {
        EmbeddedRegistry::default()
    }

    /// The ids registered under `subject`, oldest first.
    pub fn versions(&self, subject: &str) -> Vec<u32> {
        self.store
            .lock()
            .expect("embedded registry lock poisoned")
            .subjects
            .get(subject)
            .cloned()
            .unwrap_or_default()
    }
}

/// BACKWARD: a reader with the new schema can read data written with the latest one.
fn backward(latest: &AvroSchema, candidate: &AvroSchema) -> Compatibility {
    match SchemaCompatibility::can_read(latest.schema(), candidate.schema()) {
        Ok(_) => Compatibility {
            is_compatible: true,
            messages: Vec::new(),
        },
        Err(e) => Compatibility {
            is_compatible: false,
            messages: vec![e.to_string()],
        },
    }
}

#[async_trait]
impl Registry for EmbeddedRegistry {
    async fn register(&self, subject: &str, schema: &AvroSchema) -> Result<u32, RegistryError> {
        let mut store = self.store.lock().expect("embedded registry lock poisoned");
        let existing = store.by_fingerprint.get(&schema.fingerprint()).copied();
        let versions = store.subjects.get(subject).cloned().unwrap_or_default();
        if let Some(id) = existing.filter(|id| versions.contains(id)) {
            return Ok(id);
        }
        if let Some(&latest) = versions.last() {
            let verdict = backward(&store.schemas[latest as usize - 1], schema);
            if !verdict.is_compatible {
                return Err(RegistryError::Incompatible {
                    subject: subject.to_string(),
                    message: verdict.messages.join("; "),
                });
            }
        }
        let id = match existing {
            Some(id) => id,
            None => {
                store.schemas.push(Arc::new(schema.clone()));
                let id = store.schemas.len() as u32;
                store.by_fingerprint.insert(schema.fingerprint(), id);
                id
            }
        };
        store
            .subjects
            .entry(subject.to_string())
            .or_default()
            .push(id);
        Ok(id)
    }

    async fn schema_by_id(&self, id: u32) -> Result<Arc<AvroSchema>, RegistryError> {
        let store = self.store.lock().expect("embedded registry lock poisoned");
        (id as usize)
            .checked_sub(1)
            .and_then(|i| store.schemas.get(i))
            .cloned()
            .ok_or_else(|| RegistryError::NotFound {
                url: "embedded".into(),
                message: format!("schema id {id}"),
            })
    }

    async fn check_compatibility(
        &self,
        subject: &str,
        schema: &AvroSchema,
    ) -> Result<Compatibility, RegistryError> {
        let store = self.store.lock().expect("embedded registry lock poisoned");
        Ok(match store.subjects.get(subject).and_then(|v| v.last()) {
            Some(&latest) => backward(&store.schemas[latest as usize - 1], schema),
            None => Compatibility {
                is_compatible: true,
                messages: Vec::new(),
            },
        })
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
        assert_eq!(r.versions("t-value"), [id1, id2]);
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
    }
}
