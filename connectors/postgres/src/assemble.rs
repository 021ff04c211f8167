//! Turning decoded pgoutput messages into change events, one transaction at
//! a time.
//!
//! pgoutput (protocol 1) sends each transaction whole, between Begin and
//! Commit, and each row change refers to a table by the relation id of a
//! Relation message sent earlier on the same stream. The assembler keeps
//! those table descriptions and builds Debezium-shaped before/after images,
//! keeping an unchanged TOASTed column distinct from NULL.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use walcast_sdk::{
    ChangeEvent, Lsn, Op, ReplicaIdentity, SnapshotMarker, SourceInfo, TableSchema,
    TransactionInfo, Value,
};

use crate::pgoutput::{pg_to_unix_micros, Begin, Commit, OldTuple, TupleValue};

use super::convert::{self, ConvertError};

#[derive(Debug, thiserror::Error)]
pub enum AssembleError {
    #[error("change for relation {relation_id} at LSN {lsn} arrived before its Relation message")]
    UnknownRelation { relation_id: u32, lsn: Lsn },
    #[error("row change at LSN {lsn} outside a transaction")]
    OutsideTransaction { lsn: Lsn },
    #[error("{table}.{column} at LSN {lsn}: {source}")]
    Convert {
        table: String,
        column: String,
        lsn: Lsn,
        source: ConvertError,
    },
    #[error("{table} at LSN {lsn}: the row has {got} columns but the table has {expected}")]
    ColumnCount {
        table: String,
        lsn: Lsn,
        got: usize,
        expected: usize,
    },
    #[error("{table}.{column} at LSN {lsn}: binary column values are not supported (walcast asks pgoutput for text)")]
    Binary {
        table: String,
        column: String,
        lsn: Lsn,
    },
}

/// Settings that shape events.
#[derive(Debug, Clone)]
pub struct AssembleOptions {
    /// Debezium's `topic.prefix` / `source.name`.
    pub name: String,
    pub database: String,
    /// `schema.table` names to emit; others are dropped (the publication may
    /// cover more tables than the pipeline wants).
    pub tables: Option<HashSet<String>>,
}

struct Finished {
    end_lsn: Lsn,
    commit_micros: i64,
}

struct Tx {
    xid: u32,
    commit_lsn: Lsn,
    commit_micros: i64,
    total_order: u64,
    per_table: HashMap<u32, u64>,
}

/// Per-stream state: known relations and the transaction being read.
pub struct Assembler {
    opts: AssembleOptions,
    relations: HashMap<u32, Arc<TableSchema>>,
    tx: Option<Tx>,
    finished: Option<Finished>,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl Assembler {
    pub fn new(opts: AssembleOptions) -> Self {
        Assembler {
            opts,
            relations: HashMap::new(),
            tx: None,
            finished: None,
        }
    }

    pub fn set_relation(&mut self, table: Arc<TableSchema>) {
        self.relations.insert(table.relation_id, table);
    }

    /// The table as the stream last described it.
    pub fn relation(&self, relation_id: u32) -> Option<Arc<TableSchema>> {
        self.relations.get(&relation_id).cloned()
    }

    pub fn in_transaction(&self) -> bool {
        self.tx.is_some()
    }

    pub fn begin(&mut self, b: &Begin) {
        self.tx = Some(Tx {
            xid: b.xid,
            commit_lsn: b.final_lsn,
            commit_micros: pg_to_unix_micros(b.commit_time),
            total_order: 0,
            per_table: HashMap::new(),
        });
    }

    /// Ends the transaction; returns the LSN to confirm once its events are
    /// durable (the end of the commit record).
    pub fn commit(&mut self, c: &Commit) -> Lsn {
        self.tx = None;
        self.finished = Some(Finished {
            end_lsn: c.end_lsn,
            commit_micros: pg_to_unix_micros(c.commit_time),
        });
        c.end_lsn
    }

    /// The transaction committed by the last message, once: its end LSN and
    /// commit time in microseconds since the Unix epoch.
    pub fn take_finished(&mut self) -> Option<(Lsn, i64)> {
        self.finished.take().map(|f| (f.end_lsn, f.commit_micros))
    }

    /// Adds a table to those emitted (a partition attached while
    /// streaming, when partitions are captured as tables of their own).
    pub fn want(&mut self, name: String) {
        if let Some(set) = self.opts.tables.as_mut() {
            set.insert(name);
        }
    }

    /// Whether events of this table are emitted.
    pub fn wants(&self, name: &str) -> bool {
        self.opts
            .tables
            .as_ref()
            .is_none_or(|set| set.contains(name))
    }

    fn wanted(&self, t: &TableSchema) -> bool {
        self.opts
            .tables
            .as_ref()
            .is_none_or(|set| set.contains(&t.qualified_name()))
    }

    fn table(&self, relation_id: u32, lsn: Lsn) -> Result<Arc<TableSchema>, AssembleError> {
        self.relations
            .get(&relation_id)
            .cloned()
            .ok_or(AssembleError::UnknownRelation { relation_id, lsn })
    }

    fn row(
        table: &TableSchema,
        tuple: &[TupleValue],
        lsn: Lsn,
    ) -> Result<Vec<Value>, AssembleError> {
        if tuple.len() != table.columns.len() {
            return Err(AssembleError::ColumnCount {
                table: table.qualified_name(),
                lsn,
                got: tuple.len(),
                expected: table.columns.len(),
            });
        }
        tuple
            .iter()
            .zip(&table.columns)
            .map(|(v, c)| match v {
                TupleValue::Null => Ok(Value::Null),
                TupleValue::UnchangedToast => Ok(Value::Unavailable),
                TupleValue::Text(b) => {
                    let text = std::str::from_utf8(b).map_err(|e| AssembleError::Convert {
                        table: table.qualified_name(),
                        column: c.name.clone(),
                        lsn,
                        source: ConvertError {
                            type_name: c.pg_type.sql_name(),
                            shown: String::new(),
                            reason: e.to_string(),
                        },
                    })?;
                    convert::from_text(&c.pg_type, text).map_err(|source| AssembleError::Convert {
                        table: table.qualified_name(),
                        column: c.name.clone(),
                        lsn,
                        source,
                    })
                }
                TupleValue::Binary(_) => Err(AssembleError::Binary {
                    table: table.qualified_name(),
                    column: c.name.clone(),
                    lsn,
                }),
            })
            .collect()
    }

    fn event(
        &mut self,
        op: Op,
        table: Arc<TableSchema>,
        before: Option<Vec<Value>>,
        after: Option<Vec<Value>>,
        lsn: Lsn,
    ) -> Result<ChangeEvent, AssembleError> {
        let opts = &self.opts;
        let tx = self
            .tx
            .as_mut()
            .ok_or(AssembleError::OutsideTransaction { lsn })?;
        tx.total_order += 1;
        let per = tx.per_table.entry(table.relation_id).or_insert(0);
        *per += 1;
        Ok(ChangeEvent {
            op,
            before,
            after,
            source: SourceInfo {
                name: opts.name.clone(),
                db: opts.database.clone(),
                lsn,
                commit_lsn: tx.commit_lsn,
                tx_id: Some(tx.xid),
                ts_ms: tx.commit_micros.div_euclid(1000),
                ts_us: tx.commit_micros,
                snapshot: SnapshotMarker::False,
            },
            transaction: Some(TransactionInfo {
                id: format!("{}:{}", tx.xid, tx.commit_lsn.0),
                total_order: tx.total_order,
                data_collection_order: *per,
            }),
            table,
            ts_ms: now_ms(),
        })
    }

    pub fn insert(
        &mut self,
        relation_id: u32,
        new: &[TupleValue],
        lsn: Lsn,
    ) -> Result<Option<ChangeEvent>, AssembleError> {
        let table = self.table(relation_id, lsn)?;
        if !self.wanted(&table) {
            return Ok(None);
        }
        let after = Self::row(&table, new, lsn)?;
        self.event(Op::Create, table, None, Some(after), lsn)
            .map(Some)
    }

    /// With REPLICA IDENTITY DEFAULT or INDEX, Postgres sends the old key
    /// only when the key changed, so `before` is absent for most updates, as
    /// in Debezium. An unchanged TOASTed column stays
    /// [`Value::Unavailable`] unless the full old row (REPLICA IDENTITY
    /// FULL) supplies it.
    ///
    /// An update that changes the primary key becomes a delete of the old
    /// key and a create of the new one, as Debezium emits it: keyed topics
    /// and the sinks see the old row go away (a tombstone follows the delete
    /// on Kafka) instead of two keys that both look alive.
    pub fn update(
        &mut self,
        relation_id: u32,
        old: Option<&OldTuple>,
        new: &[TupleValue],
        lsn: Lsn,
    ) -> Result<Vec<ChangeEvent>, AssembleError> {
        let table = self.table(relation_id, lsn)?;
        if !self.wanted(&table) {
            return Ok(Vec::new());
        }
        let before = match old {
            Some(OldTuple::Key(t)) | Some(OldTuple::Full(t)) => Some(Self::row(&table, t, lsn)?),
            None => None,
        };
        let mut after = Self::row(&table, new, lsn)?;
        if let (Some(OldTuple::Full(_)), Some(b)) = (old, &before) {
            for (a, o) in after.iter_mut().zip(b) {
                if matches!(a, Value::Unavailable) && !matches!(o, Value::Unavailable) {
                    *a = o.clone();
                }
            }
        }
        let key_changed = table.has_key()
            && before.as_ref().is_some_and(|b| {
                table
                    .columns
                    .iter()
                    .zip(b.iter().zip(&after))
                    .any(|(c, (o, n))| c.key && o != n)
            });
        if key_changed {
            let delete = self.event(Op::Delete, table.clone(), before, None, lsn)?;
            let create = self.event(Op::Create, table, None, Some(after), lsn)?;
            return Ok(vec![delete, create]);
        }
        Ok(vec![self.event(
            Op::Update,
            table,
            before,
            Some(after),
            lsn,
        )?])
    }

    pub fn delete(
        &mut self,
        relation_id: u32,
        old: &OldTuple,
        lsn: Lsn,
    ) -> Result<Option<ChangeEvent>, AssembleError> {
        let table = self.table(relation_id, lsn)?;
        if !self.wanted(&table) {
            return Ok(None);
        }
        let (OldTuple::Key(t) | OldTuple::Full(t)) = old;
        let before = Self::row(&table, t, lsn)?;
        self.event(Op::Delete, table, Some(before), None, lsn)
            .map(Some)
    }

    pub fn truncate(
        &mut self,
        relation_ids: &[u32],
        lsn: Lsn,
    ) -> Result<Vec<ChangeEvent>, AssembleError> {
        let mut out = Vec::new();
        for id in relation_ids {
            let table = self.table(*id, lsn)?;
            if self.wanted(&table) {
                out.push(self.event(Op::Truncate, table, None, None, lsn)?);
            }
        }
        Ok(out)
    }
}

/// Whether a table can be captured with usable keys.
pub fn key_problem(table: &TableSchema) -> Option<String> {
    if table.replica_identity == ReplicaIdentity::Nothing {
        return Some(format!(
            "table {} has REPLICA IDENTITY NOTHING, so Postgres logs no old row for updates and deletes; \
             run ALTER TABLE {} REPLICA IDENTITY DEFAULT (with a primary key) or FULL",
            table.qualified_name(),
            table.qualified_name()
        ));
    }
    if !table.has_key() {
        return Some(format!(
            "table {} has no primary key: events would have no key, so per-row ordering in Kafka and \
             cache/index updates are impossible. Add a primary key, or list the table under \
             `keyless_tables` to capture it anyway (events go out with a null key)",
            table.qualified_name()
        ));
    }
    None
}
