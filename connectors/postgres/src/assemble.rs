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

pub(crate) fn now_ms() -> i64 {
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

    /// The source block of a notice at `lsn` (a schema change, a logical
    /// message): the open transaction's commit and xid, or, outside one,
    /// the notice's own position and time.
    pub fn notice_source(&self, lsn: Lsn) -> SourceInfo {
        let (commit_lsn, tx_id, micros) = match &self.tx {
            Some(tx) => (tx.commit_lsn, Some(tx.xid), tx.commit_micros),
            None => (lsn, None, now_ms().saturating_mul(1000)),
        };
        SourceInfo {
            name: self.opts.name.clone(),
            db: self.opts.database.clone(),
            lsn,
            commit_lsn,
            tx_id,
            ts_ms: micros.div_euclid(1000),
            ts_us: micros,
            snapshot: SnapshotMarker::False,
        }
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

/// The assembler fed with the frames Postgres 15 sent for
/// `tests/fixtures/pgoutput/capture.sh` (see `pgoutput::tests`): no server.
#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::pgoutput::{Message, Relation, ReplicaIdentitySetting};
    use walcast_sdk::{Column, Numeric};

    /// The table as the catalog would describe it: both fixture tables
    /// have the primary key `id`, and only built-in types.
    pub(crate) fn schema(rel: &Relation) -> Arc<TableSchema> {
        Arc::new(TableSchema {
            relation_id: rel.id,
            schema: rel.namespace.clone(),
            name: rel.name.clone(),
            columns: rel
                .columns
                .iter()
                .map(|c| Column {
                    key_position: None,
                    default: None,
                    name: c.name.clone(),
                    pg_type: crate::catalog::builtin(c.type_oid, c.type_modifier).unwrap(),
                    type_oid: c.type_oid,
                    type_modifier: c.type_modifier,
                    nullable: c.name != "id",
                    key: c.name == "id",
                })
                .collect(),
            replica_identity: match rel.replica_identity {
                ReplicaIdentitySetting::Default => ReplicaIdentity::Default,
                ReplicaIdentitySetting::Nothing => ReplicaIdentity::Nothing,
                ReplicaIdentitySetting::Full => ReplicaIdentity::Full,
                ReplicaIdentitySetting::Index => ReplicaIdentity::Index,
            },
            version: 1,
        })
    }

    pub(crate) fn options(tables: Option<&[&str]>) -> AssembleOptions {
        AssembleOptions {
            name: "shop".into(),
            database: "app".into(),
            tables: tables.map(|t| t.iter().map(|s| s.to_string()).collect()),
        }
    }

    /// What the capture loop does with each message, minus the I/O: the
    /// events in order, and each commit's end LSN as the assembler reports
    /// it. Message `i` is at LSN `1000 + i`.
    fn replay(asm: &mut Assembler, frames: Vec<Message>) -> (Vec<ChangeEvent>, Vec<Lsn>) {
        let (mut events, mut commits) = (Vec::new(), Vec::new());
        for (i, m) in frames.into_iter().enumerate() {
            let lsn = Lsn(1000 + i as u64);
            match m {
                Message::Begin(b) => asm.begin(&b),
                Message::Commit(c) => {
                    let end = asm.commit(&c);
                    let (finished, _) = asm.take_finished().expect("a commit finishes");
                    assert_eq!(finished, end);
                    assert!(asm.take_finished().is_none(), "reported once");
                    commits.push(end);
                }
                Message::Relation(r) => asm.set_relation(schema(&r)),
                Message::Insert(x) => {
                    events.extend(asm.insert(x.relation_id, &x.new, lsn).unwrap())
                }
                Message::Update(u) => events.extend(
                    asm.update(u.relation_id, u.old.as_ref(), &u.new, lsn)
                        .unwrap(),
                ),
                Message::Delete(d) => {
                    events.extend(asm.delete(d.relation_id, &d.old, lsn).unwrap())
                }
                Message::Truncate(t) => events.extend(asm.truncate(&t.relation_ids, lsn).unwrap()),
                _ => {}
            }
        }
        (events, commits)
    }

    fn int(v: i64) -> Value {
        Value::Int64(v)
    }
    fn text(s: &str) -> Value {
        Value::Text(s.into())
    }
    fn summary(e: &ChangeEvent) -> (String, &'static str) {
        (e.table.qualified_name(), e.op.code())
    }

    #[test]
    fn a_captured_session_becomes_debezium_shaped_events() {
        let mut asm = Assembler::new(options(None));
        let (events, commits) = replay(&mut asm, crate::pgoutput::tests::frames());
        assert!(!asm.in_transaction());
        let items = "public.fx_items".to_string();
        let full = "public.fx_full".to_string();
        assert_eq!(
            events.iter().map(summary).collect::<Vec<_>>(),
            vec![
                (items.clone(), "c"),
                (items.clone(), "c"),
                (items.clone(), "u"),
                // UPDATE ... SET id = 3: the old key goes away, as Debezium has it.
                (items.clone(), "d"),
                (items.clone(), "c"),
                (items.clone(), "u"),
                (items.clone(), "d"),
                (full.clone(), "c"),
                (full.clone(), "u"),
                (full.clone(), "d"),
                (items.clone(), "t"),
                (full.clone(), "t"),
            ]
        );
        // One commit per statement, plus the insert transaction and the
        // logical message's; confirmed positions only grow.
        assert_eq!(commits.len(), 10);
        assert!(commits.windows(2).all(|w| w[0] < w[1]), "{commits:?}");

        let apple = &events[0];
        assert_eq!(apple.before, None);
        assert_eq!(
            apple.after,
            Some(vec![
                int(1),
                text("apple"),
                Value::Numeric(Numeric::Finite("1.50".into())),
                Value::Null
            ])
        );
        assert_eq!(apple.source.name, "shop");
        assert_eq!(apple.source.db, "app");
        assert_eq!(apple.source.lsn, Lsn(1002));
        assert_eq!(apple.source.snapshot, SnapshotMarker::False);
        // Both rows of the first transaction carry its commit and order.
        let pear = &events[1];
        assert_eq!(pear.source.commit_lsn, apple.source.commit_lsn);
        assert_eq!(pear.source.tx_id, apple.source.tx_id);
        let (t0, t1) = (
            apple.transaction.as_ref().unwrap(),
            pear.transaction.as_ref().unwrap(),
        );
        assert_eq!(t0.id, t1.id);
        assert_eq!((t0.total_order, t1.total_order), (1, 2));
        assert_eq!((t0.data_collection_order, t1.data_collection_order), (1, 2));
        assert!(matches!(&pear.after.as_ref().unwrap()[3], Value::Text(s) if s.len() == 9600));

        // REPLICA IDENTITY DEFAULT: no before image for an update that
        // keeps the key.
        assert_eq!(events[2].before, None);
        assert_eq!(events[2].after.as_ref().unwrap()[1], text("green apple"));

        // The key change: the delete has the old key (other columns null,
        // as Postgres sends a key-only old tuple), the create the new row.
        let (del, cre) = (&events[3], &events[4]);
        assert_eq!(del.before.as_ref().unwrap()[0], int(1));
        assert_eq!(del.after, None);
        assert_eq!(cre.after.as_ref().unwrap()[0], int(3));
        assert_eq!(cre.after.as_ref().unwrap()[1], text("green apple"));
        assert_eq!(del.source.commit_lsn, cre.source.commit_lsn);
        assert_eq!(
            (
                del.transaction.as_ref().unwrap().total_order,
                cre.transaction.as_ref().unwrap().total_order
            ),
            (1, 2)
        );

        // An unchanged TOASTed column is Unavailable, never NULL.
        let price = events[5].after.as_ref().unwrap();
        assert_eq!(price[2], Value::Numeric(Numeric::Finite("2.00".into())));
        assert_eq!(price[3], Value::Unavailable);

        assert_eq!(events[6].before.as_ref().unwrap()[0], int(3));

        // REPLICA IDENTITY FULL: whole old rows.
        assert_eq!(events[8].before, Some(vec![Value::Int32(1), text("a")]));
        assert_eq!(events[8].after, Some(vec![Value::Int32(1), text("b")]));
        assert_eq!(events[9].before, Some(vec![Value::Int32(1), text("b")]));

        // TRUNCATE of two tables: one event each, no images, one transaction.
        for t in &events[10..] {
            assert_eq!((&t.before, &t.after), (&None, &None));
        }
        assert_eq!(events[10].source.commit_lsn, events[11].source.commit_lsn);
    }

    #[test]
    fn tables_the_pipeline_does_not_list_are_dropped() {
        let mut asm = Assembler::new(options(Some(&["public.fx_full"])));
        let (events, commits) = replay(&mut asm, crate::pgoutput::tests::frames());
        assert!(
            events.iter().all(|e| e.table.name == "fx_full"),
            "{:?}",
            events.iter().map(summary).collect::<Vec<_>>()
        );
        assert_eq!(events.len(), 4, "c, u, d and the truncate");
        // Transactions of unlisted tables still commit: their end is
        // confirmed like any other.
        assert_eq!(commits.len(), 10);
        // A table added while streaming (an attached partition) is emitted.
        assert!(!asm.wants("public.fx_items"));
        asm.want("public.fx_items".into());
        assert!(asm.wants("public.fx_items"));
    }

    #[test]
    fn changes_without_their_relation_or_transaction_are_errors() {
        let frames = crate::pgoutput::tests::frames();
        let Message::Insert(insert) = frames[2].clone() else {
            panic!("{:?}", frames[2])
        };
        let Message::Relation(rel) = &frames[1] else {
            panic!("{:?}", frames[1])
        };
        let mut asm = Assembler::new(options(None));
        let e = asm
            .insert(insert.relation_id, &insert.new, Lsn(7))
            .unwrap_err();
        assert!(
            matches!(e, AssembleError::UnknownRelation { relation_id, lsn: Lsn(7) } if relation_id == rel.id),
            "{e}"
        );
        asm.set_relation(schema(rel));
        let e = asm
            .insert(insert.relation_id, &insert.new, Lsn(8))
            .unwrap_err();
        assert!(
            matches!(e, AssembleError::OutsideTransaction { lsn: Lsn(8) }),
            "{e}"
        );
        let Message::Begin(begin) = &frames[0] else {
            panic!()
        };
        asm.begin(begin);
        let e = asm
            .insert(insert.relation_id, &insert.new[..2], Lsn(9))
            .unwrap_err();
        assert!(
            matches!(
                &e,
                AssembleError::ColumnCount {
                    got: 2,
                    expected: 4,
                    ..
                }
            ),
            "{e}"
        );
        let mut bad = insert.new.clone();
        bad[2] = TupleValue::Text(bytes::Bytes::from_static(b"not a number"));
        let e = asm.insert(insert.relation_id, &bad, Lsn(10)).unwrap_err();
        assert!(
            e.to_string().contains("public.fx_items.price") && e.to_string().contains("LSN"),
            "{e}"
        );
    }

    #[test]
    fn tables_without_usable_keys_are_named() {
        let frames = crate::pgoutput::tests::frames();
        let Message::Relation(rel) = &frames[1] else {
            panic!()
        };
        let table = schema(rel);
        assert_eq!(key_problem(&table), None);
        let mut keyless = (*table).clone();
        keyless.columns.iter_mut().for_each(|c| c.key = false);
        let p = key_problem(&keyless).unwrap();
        assert!(
            p.contains("public.fx_items") && p.contains("keyless_tables"),
            "{p}"
        );
        let mut nothing = (*table).clone();
        nothing.replica_identity = ReplicaIdentity::Nothing;
        assert!(key_problem(&nothing)
            .unwrap()
            .contains("REPLICA IDENTITY NOTHING"));
    }
}
