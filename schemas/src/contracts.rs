//! Data contracts: the row shape consumers of a table were promised,
//! checked against the schema walcast derives from the live table, so a
//! column dropped or retyped in Postgres stops the pipeline (or `walcast
//! check`) instead of surprising consumers.
//!
//! A contract is an Avro record schema in `<dir>/<schema>.<table>.avsc`
//! (split at the first dot: `public.orders.avsc` is table `orders` of
//! schema `public`), describing the row record (`after`/`before` of the
//! envelope, `<prefix>.<schema>.<table>.Value`), with the field names and
//! types of `schemas/MAPPING.md` (non-key columns are `["null", T]`). The
//! record's name and namespace are not compared, so one contract serves
//! every pipeline prefix. A table without a file has no contract.
//!
//! The rule: **the contract, used as a reader schema, must be able to read
//! what walcast writes** (Avro schema resolution, apache-avro's
//! `SchemaCompatibility::can_read(writer = derived row, reader = contract)`,
//! requiring full compatibility: a union of which only some branches
//! resolve is a violation).
//! In registry terms the derived schema must be FORWARD compatible with the
//! contract, i.e. the contract is BACKWARD compatible with (can read data
//! written by) the derived schema. So, for each contract field:
//!
//! * the table has a column of that (Avro) name whose type the contract's
//!   type can read (same type, or an Avro promotion such as int -> long;
//!   for decimals the same precision and scale), or
//! * the table lacks it and the contract gives the field a `default`.
//!
//! Columns the contract does not mention are allowed (readers skip them).

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use apache_avro::schema::{RecordField, RecordSchema};
use apache_avro::Schema;
use walcast_sdk::TableSchema;

use crate::mapping::{self, AvroSchema, MappingOptions, TableSchemas};

/// The file name suffix of a contract.
pub const EXTENSION: &str = "avsc";

/// Why contracts could not be loaded, or a table breaks its contract.
/// Always definite: fix the file or the table.
#[derive(Debug, thiserror::Error)]
pub enum ContractError {
    #[error("contracts directory {path}: {source}")]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("contract {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("contract {path} is not a valid Avro schema: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("contract {path}: the file name must be <schema>.<table>.avsc")]
    Name { path: PathBuf },
    #[error("contract {path}: must be an Avro record schema (the row record)")]
    NotRecord { path: PathBuf },
    #[error("{table}: cannot derive its Avro schema to check the contract: {message}")]
    Derive { table: String, message: String },
    /// The table breaks its contract at `field`.
    #[error("{table}: field `{field}` breaks the contract {contract}: {message}")]
    Violation {
        table: String,
        field: String,
        contract: PathBuf,
        message: String,
    },
}

/// One table's contract.
#[derive(Debug, Clone)]
pub struct Contract {
    /// Where it was read from, for messages.
    pub path: PathBuf,
    pub schema: AvroSchema,
}

/// The contracts of a directory, by `(schema, table)`.
#[derive(Debug, Clone, Default)]
pub struct Contracts {
    by_table: BTreeMap<(String, String), Contract>,
}

/// Loads every `*.avsc` of `dir`. Other files are ignored; an unreadable
/// directory, a badly named or unparsable `.avsc`, or one that is not a
/// record is an error, never "no contract".
pub fn load_dir(dir: &Path) -> Result<Contracts, ContractError> {
    let dir_err = |source| ContractError::Dir {
        path: dir.to_path_buf(),
        source,
    };
    let mut contracts = Contracts::default();
    let mut paths = Vec::new();
    for entry in fs::read_dir(dir).map_err(dir_err)? {
        let path = entry.map_err(dir_err)?.path();
        if path.extension().and_then(|e| e.to_str()) == Some(EXTENSION) {
            paths.push(path);
        }
    }
    paths.sort();
    for path in paths {
        let name = path
            .file_stem()
            .and_then(|s| s.to_str())
            .and_then(|s| s.split_once('.'))
            .filter(|(schema, table)| !schema.is_empty() && !table.is_empty())
            .map(|(s, t)| (s.to_string(), t.to_string()))
            .ok_or_else(|| ContractError::Name { path: path.clone() })?;
        let text = fs::read_to_string(&path).map_err(|source| ContractError::Read {
            path: path.clone(),
            source,
        })?;
        let schema = AvroSchema::parse_str(&text).map_err(|e| ContractError::Parse {
            path: path.clone(),
            message: e.to_string(),
        })?;
        if !matches!(schema.schema(), Schema::Record(_)) {
            return Err(ContractError::NotRecord { path });
        }
        contracts.by_table.insert(name, Contract { path, schema });
    }
    Ok(contracts)
}

/// The row record (`<prefix>.<schema>.<table>.Value`) of a derived envelope.
fn row_record(derived: &TableSchemas) -> Option<&RecordSchema> {
    let Schema::Record(envelope) = derived.value.schema() else {
        return None;
    };
    // The record is defined in `before`, the first field; `after` refers
    // to it by name.
    envelope
        .fields
        .iter()
        .filter(|f| f.name == "before" || f.name == "after")
        .find_map(|f| match &f.schema {
            Schema::Union(union) => union.variants().iter().find_map(|v| match v {
                Schema::Record(r) => Some(r),
                _ => None,
            }),
            _ => None,
        })
}

fn writer_field<'a>(writer: &'a RecordSchema, reader: &RecordField) -> Option<&'a RecordField> {
    std::iter::once(&reader.name)
        .chain(reader.aliases.iter())
        .find_map(|name| writer.fields.iter().find(|f| &f.name == name))
}

impl Contracts {
    pub fn is_empty(&self) -> bool {
        self.by_table.is_empty()
    }

    pub fn len(&self) -> usize {
        self.by_table.len()
    }

    /// The contract of `schema.table`, if any.
    pub fn get(&self, schema: &str, table: &str) -> Option<&Contract> {
        self.by_table.get(&(schema.to_string(), table.to_string()))
    }

    /// The tables with a contract, as `schema.table`.
    pub fn tables(&self) -> impl Iterator<Item = String> + '_ {
        self.by_table.keys().map(|(s, t)| format!("{s}.{t}"))
    }

    /// Checks the schemas derived for `schema.table` against its contract
    /// (see the module doc for the rule). No contract: `Ok`.
    pub fn check(
        &self,
        schema: &str,
        table: &str,
        derived: &TableSchemas,
    ) -> Result<(), ContractError> {
        let Some(contract) = self.get(schema, table) else {
            return Ok(());
        };
        let qualified = format!("{schema}.{table}");
        let violation = |field: &str, message: String| ContractError::Violation {
            table: qualified.clone(),
            field: field.to_string(),
            contract: contract.path.clone(),
            message,
        };
        let Schema::Record(reader) = contract.schema.schema() else {
            return Err(ContractError::NotRecord {
                path: contract.path.clone(),
            });
        };
        let writer = row_record(derived).ok_or_else(|| ContractError::Derive {
            table: qualified.clone(),
            message: "the derived envelope has no row record (a walcast bug)".into(),
        })?;
        for field in &reader.fields {
            match writer_field(writer, field) {
                Some(w) => {
                    // Named types inside the field (VariableScaleDecimal) are
                    // resolved through the schemas' own definitions.
                    if let Err(e) = crate::embedded::can_read(&w.schema, &field.schema) {
                        return Err(violation(
                            &field.name,
                            format!("the contract's type cannot read the table's: {e}"),
                        ));
                    }
                }
                None if field.default.is_some() => {}
                None => {
                    return Err(violation(
                        &field.name,
                        "the table has no such column and the contract gives no default".into(),
                    ))
                }
            }
        }
        Ok(())
    }

    /// Derives `table`'s schemas as the encoder would and checks them: what
    /// `walcast check` calls for each captured table.
    pub fn check_table(
        &self,
        table: &TableSchema,
        prefix: &str,
        options: &MappingOptions,
    ) -> Result<(), ContractError> {
        if self.get(&table.schema, &table.name).is_none() {
            return Ok(());
        }
        let derived =
            mapping::derive(table, prefix, options).map_err(|e| ContractError::Derive {
                table: table.qualified_name(),
                message: e.to_string(),
            })?;
        self.check(&table.schema, &table.name, &derived)
    }
}
