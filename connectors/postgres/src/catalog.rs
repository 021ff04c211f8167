//! What the capture asks Postgres's catalog over an ordinary SQL session:
//! column types (enums, domains, arrays), primary keys (and the order of
//! their index), nullability, column defaults.
//!
//! The catalog describes the table as it is now, not as it was at the WAL
//! position being decoded; pgoutput's Relation message is authoritative for
//! the column list and types, and the catalog only adds what pgoutput does
//! not send (the primary key, NOT NULL, enum labels, a domain's base type,
//! `DEFAULT` expressions, which `avro_compat = "debezium"` writes into
//! schemas as Debezium does).

use std::collections::HashMap;
use std::sync::Arc;

use tokio_postgres::Client;
use walcast_sdk::{Column, PgType, ReplicaIdentity, TableName, TableSchema};

use crate::pgoutput::{Relation, ReplicaIdentitySetting};
use crate::replication::connection::ConnectParams;
use crate::replication::tls::{self, SslMode};

use super::convert::SESSION_SETTINGS;

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error(
        "cannot connect to Postgres for catalog queries ({target}): {}",
        pg_error_text(source)
    )]
    Connect {
        target: String,
        source: tokio_postgres::Error,
    },
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// The password exchange this connection would make is refused (see
    /// `ReplicationError::PlaintextPassword`); checked with walcast's own
    /// protocol code first, since tokio-postgres would just answer.
    #[error("{0}")]
    Auth(crate::replication::connection::ReplicationError),
    #[error("catalog query failed ({what}): {}", pg_error_text(source))]
    Query {
        what: String,
        source: tokio_postgres::Error,
    },
    #[error("table {table} does not exist")]
    Missing { table: String },
    /// No server of the list qualifies under `target_session_attrs`.
    #[error(
        "Postgres at {endpoint} is {found}, and target_session_attrs = \"{wanted}\" asks for another kind of server; \
         waiting for one in the `host` list to qualify (a standby is passed over until it is promoted)"
    )]
    WrongSession {
        endpoint: String,
        wanted: &'static str,
        found: &'static str,
    },
}

impl CatalogError {
    pub fn is_transient(&self) -> bool {
        match self {
            // Refused credentials or a database that does not exist do not
            // get better by retrying; anything else (refused connections,
            // a server starting or shutting down) may.
            CatalogError::Connect { source, .. } => !source
                .code()
                .is_some_and(|c| c.code().starts_with("28") || c.code() == "3D000"),
            CatalogError::Query { source, .. } => transient_sql(source),
            CatalogError::Auth(e) => e.is_transient(),
            CatalogError::WrongSession { .. } => true,
            CatalogError::Tls(_) | CatalogError::Missing { .. } => false,
        }
    }
}

/// tokio-postgres shows a server's error as just "db error": the server's
/// message and SQLSTATE say what went wrong ("sorry, too many clients
/// already", a syntax Postgres 14 does not know). Every error of the
/// Postgres source that wraps a `tokio_postgres::Error` displays it so.
pub fn pg_error_text(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!(
            "{}: {} (SQLSTATE {})",
            db.severity(),
            db.message(),
            db.code().code()
        ),
        None => e.to_string(),
    }
}

/// Whether an SQL error may go away by reconnecting later: the connection
/// closed or failed below SQL, or the server said it is going away or not
/// ready (a restart, a crash, a terminated backend, too many connections,
/// a serialization failure). One rule for every SQL session of a capture.
pub fn transient_sql(e: &tokio_postgres::Error) -> bool {
    if e.is_closed() {
        return true;
    }
    match e.code() {
        None => e.as_db_error().is_none(),
        Some(c) => {
            let c = c.code();
            c.starts_with("08") // connection exceptions
                || c.starts_with("57P") // admin/crash shutdown, cannot connect now
                || c == "53300" // too_many_connections
                || c == "53000" // insufficient_resources
                || c == "40001" // serialization_failure
                || c == "40P01" // deadlock_detected
        }
    }
}

/// Opens an ordinary SQL session with the same settings as the walsender,
/// so COPY output parses like pgoutput's.
pub async fn connect(p: &ConnectParams) -> Result<Client, CatalogError> {
    // tokio-postgres sends a password however the server asks for it. Where
    // the connection may end up unencrypted, the same exchange is made
    // first with walcast's own startup, which refuses a clear-text or md5
    // password there (and channel_binding = require without binding).
    let may_be_plain = matches!(p.sslmode, SslMode::Disable | SslMode::Prefer);
    let binding_required = p.channel_binding == tls::ChannelBindingMode::Require;
    if (may_be_plain && p.password.is_some() && !p.allow_plaintext_password) || binding_required {
        crate::replication::connection::ReplicationConnection::connect(p)
            .await
            .map_err(CatalogError::Auth)?;
    }
    // The servers in order, as the replication connection tries them (see
    // `TargetSessionAttrs`): one unreachable or not qualifying is skipped.
    let mut last = None;
    for e in &p.endpoints {
        let client = match connect_one(p, e).await {
            Ok(c) => c,
            Err(err) if err.is_transient() => {
                last = Some(err);
                continue;
            }
            Err(err) => return Err(err),
        };
        let row = client
            .query_one(
                "SELECT pg_is_in_recovery(), current_setting('default_transaction_read_only') = 'on'",
                &[],
            )
            .await
            .map_err(q("pg_is_in_recovery"))?;
        let (in_recovery, read_only): (bool, bool) = (row.get(0), row.get(1));
        if p.target_session_attrs.accepts(in_recovery, read_only) {
            return Ok(client);
        }
        last = Some(CatalogError::WrongSession {
            endpoint: e.to_string(),
            wanted: p.target_session_attrs.as_str(),
            found: if in_recovery {
                "a standby (in recovery)"
            } else {
                "read-only (default_transaction_read_only = on)"
            },
        });
    }
    Err(last.expect("at least one host (checked by the config)"))
}

async fn connect_one(
    p: &ConnectParams,
    e: &crate::replication::connection::Endpoint,
) -> Result<Client, CatalogError> {
    let mut cfg = tokio_postgres::Config::new();
    cfg.channel_binding(match p.channel_binding {
        tls::ChannelBindingMode::Disable => tokio_postgres::config::ChannelBinding::Disable,
        tls::ChannelBindingMode::Prefer => tokio_postgres::config::ChannelBinding::Prefer,
        tls::ChannelBindingMode::Require => tokio_postgres::config::ChannelBinding::Require,
    });
    cfg.host(&e.host)
        .port(e.port)
        .user(&p.user)
        .dbname(&p.database)
        .application_name(&p.application_name)
        .connect_timeout(p.connect_timeout)
        // A cut network path sends no reset: without this, a query whose
        // bytes the server never acknowledges waits for the kernel's
        // retransmissions (about 15 minutes).
        .tcp_user_timeout(p.receive_timeout);
    if let Some(pw) = &p.password {
        cfg.password(pw);
    }
    let opts: Vec<String> = SESSION_SETTINGS
        .iter()
        .map(|(k, v)| format!("-c {k}={v}"))
        .collect();
    cfg.options(opts.join(" "));
    let target = format!("{e}/{}", p.database);
    let client = match tls::client_config(p.sslmode, p.ssl_root_cert.as_deref())? {
        None => {
            cfg.ssl_mode(tokio_postgres::config::SslMode::Disable);
            let (client, conn) = cfg
                .connect(tokio_postgres::NoTls)
                .await
                .map_err(|source| CatalogError::Connect { target, source })?;
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!(error = %e, "catalog connection closed");
                }
            });
            client
        }
        Some(tls_config) => {
            cfg.ssl_mode(if p.sslmode == SslMode::Prefer {
                tokio_postgres::config::SslMode::Prefer
            } else {
                tokio_postgres::config::SslMode::Require
            });
            let connector = crate::replication::sql_tls::MakeTls(tls_config);
            let (client, conn) = cfg
                .connect(connector)
                .await
                .map_err(|source| CatalogError::Connect { target, source })?;
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!(error = %e, "catalog connection closed");
                }
            });
            client
        }
    };
    Ok(client)
}

fn q(what: impl Into<String>) -> impl FnOnce(tokio_postgres::Error) -> CatalogError {
    let what = what.into();
    move |source| CatalogError::Query { what, source }
}

/// Built-in types by OID (pg_type.h), with their array types.
pub(crate) fn builtin(oid: u32, typmod: i32) -> Option<PgType> {
    let numeric = || {
        if typmod >= 4 {
            let t = typmod - 4;
            PgType::Numeric {
                precision: Some(((t >> 16) & 0xffff) as u32),
                scale: Some((t & 0xffff) as u32),
            }
        } else {
            PgType::Numeric {
                precision: None,
                scale: None,
            }
        }
    };
    let len = || (typmod >= 4).then(|| (typmod - 4) as u32);
    let arr = |e: PgType| PgType::Array {
        element: Box::new(e),
    };
    Some(match oid {
        16 => PgType::Bool,
        17 => PgType::Bytea,
        18 => PgType::Char { length: Some(1) },
        19 => PgType::Name,
        20 => PgType::Int8,
        21 => PgType::Int2,
        23 => PgType::Int4,
        25 => PgType::Text,
        26 => PgType::Int8, // oid: unsigned 32-bit, widened
        114 => PgType::Json,
        650 => PgType::Cidr,
        700 => PgType::Float4,
        701 => PgType::Float8,
        774 => PgType::MacAddr8,
        790 => PgType::Money,
        829 => PgType::MacAddr,
        869 => PgType::Inet,
        1042 => PgType::Char { length: len() },
        1043 => PgType::Varchar { max_length: len() },
        1082 => PgType::Date,
        1083 => PgType::Time,
        1114 => PgType::Timestamp,
        1184 => PgType::TimestampTz,
        1186 => PgType::Interval,
        1266 => PgType::TimeTz,
        1700 => numeric(),
        2950 => PgType::Uuid,
        3802 => PgType::Jsonb,
        1000 => arr(PgType::Bool),
        1001 => arr(PgType::Bytea),
        1002 => arr(PgType::Char { length: Some(1) }),
        1003 => arr(PgType::Name),
        1005 => arr(PgType::Int2),
        1007 => arr(PgType::Int4),
        1009 => arr(PgType::Text),
        1014 => arr(PgType::Char { length: None }),
        1015 => arr(PgType::Varchar { max_length: None }),
        1016 => arr(PgType::Int8),
        1021 => arr(PgType::Float4),
        1022 => arr(PgType::Float8),
        1028 => arr(PgType::Int8),
        1040 => arr(PgType::MacAddr),
        1041 => arr(PgType::Inet),
        651 => arr(PgType::Cidr),
        775 => arr(PgType::MacAddr8),
        791 => arr(PgType::Money),
        199 => arr(PgType::Json),
        3807 => arr(PgType::Jsonb),
        1182 => arr(PgType::Date),
        1183 => arr(PgType::Time),
        1115 => arr(PgType::Timestamp),
        1185 => arr(PgType::TimestampTz),
        1187 => arr(PgType::Interval),
        1270 => arr(PgType::TimeTz),
        1231 => arr(PgType::Numeric {
            precision: None,
            scale: None,
        }),
        2951 => arr(PgType::Uuid),
        _ => return None,
    })
}

/// A table described from the catalog (see [`Catalog::table_schema_by_name`]).
#[derive(Debug, Clone)]
pub struct CatalogTable {
    pub schema: Arc<TableSchema>,
    /// `format_type` of each column, for casting literals in SQL.
    pub type_names: Vec<String>,
    /// Indexes of the key columns in the order of the key's index.
    pub key_order: Vec<usize>,
    /// The publication's row filter for the table (Postgres 15+,
    /// `pg_publication_tables.rowfilter`, as Postgres prints it): a snapshot
    /// reads only the rows it lets through, as the stream only carries
    /// changes of those rows. Whoever wrote it (walcast's `row_filter`, or
    /// the owner of a publication walcast does not manage).
    pub row_filter: Option<String>,
}

/// What the publication says of one table (see [`Catalog::published_columns`]).
#[derive(Debug, Default)]
struct Published {
    columns: Option<Vec<String>>,
    generated: bool,
    row_filter: Option<String>,
}

/// Resolves types and keys, caching what it learns for the process's life.
pub struct Catalog {
    client: Client,
    types: HashMap<(u32, i32), PgType>,
    versions: HashMap<u32, u32>,
    /// The last description of each relation, for when the table is gone
    /// from the catalog by the time its Relation message is decoded.
    known: HashMap<u32, Arc<TableSchema>>,
    /// Relations found dropped (see [`Self::was_dropped`]).
    dropped: std::collections::HashSet<u32>,
    /// The pipeline's publication: a table described by name gets the
    /// columns it publishes (see [`Self::table_schema_by_name`]).
    publication: Option<String>,
    /// Columns already warned about as having no conversion (relation,
    /// column, type): Postgres sends a Relation message again after every
    /// invalidation, and the warning is once per column, not per message.
    unconverted: std::collections::HashSet<(u32, String, String)>,
}

impl Catalog {
    pub fn new(client: Client) -> Self {
        Catalog {
            client,
            types: HashMap::new(),
            versions: HashMap::new(),
            known: HashMap::new(),
            dropped: Default::default(),
            publication: None,
            unconverted: Default::default(),
        }
    }

    /// Describes tables by name with the columns this publication
    /// publishes, as the stream will carry them.
    pub fn for_publication(mut self, publication: &str) -> Self {
        self.publication = Some(publication.to_string());
        self
    }

    /// The columns the publication publishes for a table (Postgres 15+:
    /// `pg_publication_tables.attnames`, which reflects a column list and,
    /// on 18, `publish_generated_columns`); `None` when there is no
    /// publication to ask, the server is older, or the table is not (yet)
    /// in it: then every column but generated ones, as pgoutput sends.
    /// Before 18, `attnames` also lists generated columns, which pgoutput
    /// never sends there: the flag says whether to trust it for them. The
    /// row filter (`rowfilter`) comes along, from the same row.
    async fn published_columns(
        &self,
        schema: &str,
        table: &str,
    ) -> Result<Published, CatalogError> {
        let Some(publication) = &self.publication else {
            return Ok(Published::default());
        };
        let version: i32 = self
            .client
            .query_one("SELECT current_setting('server_version_num')::int", &[])
            .await
            .map_err(q("server_version_num"))?
            .get(0);
        if version < 150000 {
            return Ok(Published::default());
        }
        let row = self
            .client
            .query_opt(
                "SELECT attnames::text[], rowfilter FROM pg_publication_tables WHERE pubname = $1 AND schemaname = $2 AND tablename = $3",
                &[publication, &schema, &table],
            )
            .await
            .map_err(q(format!("published columns of {schema}.{table}")))?;
        Ok(Published {
            columns: row.as_ref().map(|r| r.get::<_, Vec<String>>(0)),
            generated: version >= 180000,
            row_filter: row.and_then(|r| r.get::<_, Option<String>>(1)),
        })
    }

    /// Whether a column of a type walcast has no conversion for is seen
    /// for the first time (and so is to be warned about).
    fn first_unconverted(&mut self, relation_id: u32, column: &str, type_name: &str) -> bool {
        self.unconverted
            .insert((relation_id, column.to_string(), type_name.to_string()))
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Whether the relation no longer existed in the catalog when its last
    /// Relation message was described: it was dropped after the changes
    /// being decoded were committed. Its key then comes from the Relation
    /// message (or an earlier description), not from the catalog.
    pub fn was_dropped(&self, relation_id: u32) -> bool {
        self.dropped.contains(&relation_id)
    }

    /// The walcast type for a column type OID and modifier.
    pub async fn resolve_type(&mut self, oid: u32, typmod: i32) -> Result<PgType, CatalogError> {
        if let Some(t) = builtin(oid, typmod) {
            return Ok(t);
        }
        if let Some(t) = self.types.get(&(oid, typmod)) {
            return Ok(t.clone());
        }
        let t = Box::pin(self.lookup_type(oid, typmod)).await?;
        self.types.insert((oid, typmod), t.clone());
        Ok(t)
    }

    async fn lookup_type(&mut self, oid: u32, typmod: i32) -> Result<PgType, CatalogError> {
        let row = self
            .client
            .query_opt(
                "SELECT t.typtype::text, t.typbasetype, t.typtypmod, t.typelem, t.typcategory::text,
                        format_type(t.oid, NULL)
                 FROM pg_type t WHERE t.oid = $1",
                &[&oid],
            )
            .await
            .map_err(q(format!("type {oid}")))?;
        let Some(row) = row else {
            return Ok(PgType::Unknown {
                type_name: format!("oid {oid}"),
            });
        };
        let typtype: String = row.get(0);
        let base: u32 = row.get(1);
        let base_mod: i32 = row.get(2);
        let elem: u32 = row.get(3);
        let category: String = row.get(4);
        let name: String = row.get(5);
        Ok(match typtype.as_str() {
            "d" => {
                self.resolve_type(base, if typmod >= 0 { typmod } else { base_mod })
                    .await?
            }
            "e" => {
                let labels = self
                    .client
                    .query("SELECT enumlabel::text FROM pg_enum WHERE enumtypid = $1 ORDER BY enumsortorder", &[&oid])
                    .await
                    .map_err(q(format!("enum labels of {name}")))?
                    .iter()
                    .map(|r| r.get::<_, String>(0))
                    .collect();
                PgType::Enum {
                    type_name: name,
                    labels,
                }
            }
            "b" if category == "A" && elem != 0 => PgType::Array {
                element: Box::new(self.resolve_type(elem, -1).await?),
            },
            _ => PgType::Unknown { type_name: name },
        })
    }

    /// Describes a table from the catalog alone, as [`Self::table_schema`]
    /// would from the table's Relation message: a snapshot reads rows
    /// before any Relation arrives, and its events must have the same
    /// shape as the streamed ones (same columns, types, key and relation
    /// id): with a publication ([`Self::for_publication`]), exactly the
    /// columns it publishes for the table (a column list leaves some out;
    /// Postgres 18's `publish_generated_columns = stored` adds stored
    /// generated ones); without, every column but generated ones.
    pub async fn table_schema_by_name(
        &mut self,
        table_name: &TableName,
    ) -> Result<CatalogTable, CatalogError> {
        let name = table_name.to_string();
        let (schema, table) = (&table_name.schema, &table_name.name);
        let rel = self
            .client
            .query_opt(
                "SELECT c.oid, c.relreplident::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                 WHERE n.nspname = $1 AND c.relname = $2",
                &[&schema, &table],
            )
            .await
            .map_err(q(format!("table {name}")))?
            .ok_or_else(|| CatalogError::Missing { table: name.clone() })?;
        let (oid, ident): (u32, String) = (rel.get(0), rel.get(1));
        let Published {
            columns: published,
            generated: generated_published,
            row_filter,
        } = self.published_columns(schema, table).await?;
        let replica_identity = match ident.as_str() {
            "n" => ReplicaIdentity::Nothing,
            "f" => ReplicaIdentity::Full,
            "i" => ReplicaIdentity::Index,
            _ => ReplicaIdentity::Default,
        };
        let rows = self
            .client
            .query(
                "SELECT a.attname::text, a.atttypid, a.atttypmod, a.attnotnull, format_type(a.atttypid, a.atttypmod),
                        coalesce(a.attnum = ANY(pk.indkey), false), coalesce(a.attnum = ANY(ri.indkey), false),
                        array_position(pk.indkey::int2[], a.attnum), array_position(ri.indkey::int2[], a.attnum),
                        CASE WHEN a.attgenerated = '' THEN pg_get_expr(d.adbin, d.adrelid) END
                 FROM pg_attribute a
                 LEFT JOIN pg_index pk ON pk.indrelid = a.attrelid AND pk.indisprimary
                 LEFT JOIN pg_index ri ON ri.indrelid = a.attrelid AND ri.indisreplident
                 LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
                 WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped
                   AND CASE WHEN $2::text[] IS NULL THEN a.attgenerated = ''
                            ELSE a.attname = ANY($2) AND (a.attgenerated = '' OR $3) END
                 ORDER BY a.attnum",
                &[&oid, &published, &generated_published],
            )
            .await
            .map_err(q(format!("columns of {name}")))?;
        let has_pk = rows.iter().any(|r| r.get::<_, bool>(5));
        let mut columns = Vec::with_capacity(rows.len());
        let mut type_names = Vec::with_capacity(rows.len());
        for r in &rows {
            let (col, type_oid, type_modifier, not_null): (String, u32, i32, bool) =
                (r.get(0), r.get(1), r.get(2), r.get(3));
            let pg_type = self.resolve_type(type_oid, type_modifier).await?;
            let (key, position) = if has_pk {
                (r.get::<_, bool>(5), r.get::<_, Option<i32>>(7))
            } else {
                (
                    replica_identity == ReplicaIdentity::Index && r.get::<_, bool>(6),
                    r.get::<_, Option<i32>>(8),
                )
            };
            columns.push(Column {
                key_position: position.filter(|_| key).map(|p| p as u16),
                default: r.get(9),
                name: col,
                pg_type,
                type_oid,
                type_modifier,
                nullable: !not_null,
                key,
            });
            type_names.push(r.get::<_, String>(4));
        }
        // The key in index order, so that keyset pagination walks the index.
        let index_keys = self
            .client
            .query(
                "SELECT a.attname::text
                 FROM pg_index i CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
                 JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
                 WHERE i.indrelid = $1 AND (i.indisprimary OR (NOT $2 AND i.indisreplident))
                 ORDER BY k.ord",
                &[&oid, &has_pk],
            )
            .await
            .map_err(q(format!("key of {name}")))?;
        let key_order: Vec<usize> = index_keys
            .iter()
            .filter_map(|r| columns.iter().position(|c| c.name == r.get::<_, String>(0)))
            .filter(|i| columns[*i].key)
            .collect();
        let schema = Arc::new(TableSchema {
            relation_id: oid,
            schema: schema.clone(),
            name: table.clone(),
            columns,
            replica_identity,
            version: 0,
        });
        Ok(CatalogTable {
            schema,
            type_names,
            key_order,
            row_filter,
        })
    }

    /// Builds the table description for a Relation message.
    pub async fn table_schema(&mut self, rel: &Relation) -> Result<Arc<TableSchema>, CatalogError> {
        let schema = if rel.namespace.is_empty() {
            "pg_catalog".to_string()
        } else {
            rel.namespace.clone()
        };
        // A table created by the transaction being decoded may not be
        // visible yet: the walsender decodes a commit once its WAL is
        // flushed, a moment before the committing backend makes it visible
        // to other sessions (seen on a busy machine: a partition attached
        // mid-stream taken for a dropped table). So "no rows" is asked again
        // for up to about a second before the table is taken as dropped.
        let mut tries = 0;
        let rows = loop {
            let rows = self
                .client
                .query(
                    "SELECT a.attname::text, a.attnotnull,
                            coalesce(a.attnum = ANY(i.indkey), false) AS pk,
                            array_position(coalesce(i.indkey, ri.indkey)::int2[], a.attnum),
                            CASE WHEN a.attgenerated = '' THEN pg_get_expr(d.adbin, d.adrelid) END
                     FROM pg_attribute a
                     LEFT JOIN pg_index i ON i.indrelid = a.attrelid AND i.indisprimary
                     LEFT JOIN pg_index ri ON ri.indrelid = a.attrelid AND ri.indisreplident
                     LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
                     WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped",
                    &[&rel.id],
                )
                .await
                .map_err(q(format!("columns of {schema}.{}", rel.name)))?;
            tries += 1;
            if !rows.is_empty() || tries >= 10 || self.dropped.contains(&rel.id) {
                break rows;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        };
        let info: HashMap<String, (bool, bool)> = rows
            .iter()
            .map(|r| (r.get::<_, String>(0), (r.get(1), r.get(2))))
            .collect();
        // Each column's place in the key's index (the primary key's, else
        // the replica identity index's) and its DEFAULT.
        let extra: HashMap<String, (Option<i32>, Option<String>)> = rows
            .iter()
            .map(|r| (r.get::<_, String>(0), (r.get(3), r.get(4))))
            .collect();
        let has_pk = info.values().any(|(_, pk)| *pk);
        // A table dropped after the changes being decoded: pgoutput still
        // decodes them (with the catalog as of their WAL position), but the
        // live catalog knows nothing of it. Those changes were committed and
        // are delivered; the key comes from what this process saw of the
        // table before, or else from the replica identity flags of the
        // Relation message (the primary key under REPLICA IDENTITY DEFAULT).
        let gone = rows.is_empty();
        let previous = if gone {
            self.dropped.insert(rel.id);
            let previous = self.known.get(&rel.id).cloned();
            tracing::warn!(
                table = %format!("{schema}.{}", rel.name),
                relation_id = rel.id,
                key_from = if previous.is_some() { "the table's earlier description" } else { "the Relation message" },
                "table no longer exists (dropped?): delivering the changes committed before the drop; \
                 remove it from `tables` once they are through"
            );
            previous
        } else {
            self.dropped.remove(&rel.id);
            None
        };
        let replica_identity = match rel.replica_identity {
            ReplicaIdentitySetting::Default => ReplicaIdentity::Default,
            ReplicaIdentitySetting::Nothing => ReplicaIdentity::Nothing,
            ReplicaIdentitySetting::Full => ReplicaIdentity::Full,
            ReplicaIdentitySetting::Index => ReplicaIdentity::Index,
        };
        let mut columns = Vec::with_capacity(rel.columns.len());
        for c in &rel.columns {
            let pg_type = self.resolve_type(c.type_oid, c.type_modifier).await?;
            let unconverted = match &pg_type {
                PgType::Unknown { type_name } => self.first_unconverted(rel.id, &c.name, type_name),
                _ => false,
            };
            if let (true, PgType::Unknown { type_name }) = (unconverted, &pg_type) {
                tracing::warn!(
                    table = %format!("{schema}.{}", rel.name),
                    column = %c.name,
                    r#type = %type_name,
                    "walcast has no conversion for this type; its values are captured as text"
                );
            }
            let (not_null, pk) = info.get(&c.name).copied().unwrap_or((false, false));
            // The key is the primary key; without one, the replica identity
            // index (pgoutput flags its columns). REPLICA IDENTITY FULL flags
            // every column, which is no key at all.
            let (key, not_null) = if gone {
                match previous
                    .as_ref()
                    .and_then(|p| p.columns.iter().find(|pc| pc.name == c.name))
                {
                    Some(pc) => (pc.key, !pc.nullable),
                    None => (
                        replica_identity != ReplicaIdentity::Full && c.identity,
                        false,
                    ),
                }
            } else if has_pk {
                (pk, not_null)
            } else {
                (
                    replica_identity == ReplicaIdentity::Index && c.identity,
                    not_null,
                )
            };
            let (position, default) = if gone {
                previous
                    .as_ref()
                    .and_then(|p| p.columns.iter().find(|pc| pc.name == c.name))
                    .map(|pc| (pc.key_position, pc.default.clone()))
                    .unwrap_or((None, None))
            } else {
                match extra.get(&c.name) {
                    Some((p, d)) => (p.filter(|_| key).map(|p| p as u16), d.clone()),
                    None => (None, None),
                }
            };
            columns.push(Column {
                key_position: position,
                default,
                name: c.name.clone(),
                pg_type,
                type_oid: c.type_oid,
                type_modifier: c.type_modifier,
                nullable: !not_null,
                key,
            });
        }
        let version = self
            .versions
            .entry(rel.id)
            .and_modify(|v| *v += 1)
            .or_insert(1);
        let table = Arc::new(TableSchema {
            relation_id: rel.id,
            schema,
            name: rel.name.clone(),
            columns,
            replica_identity,
            version: *version,
        });
        self.known.insert(rel.id, Arc::clone(&table));
        Ok(table)
    }
}
