//! What a captured table looks like: its name, its columns, their Postgres
//! types and which of them form the key.
//!
//! Built by the capture from pgoutput Relation messages and the catalog; the
//! schema mapping (Avro) and every sink read it to interpret a row.

use serde::Serialize;

/// A table's schema-qualified name, as Postgres spells it (case-sensitive,
/// unquoted). Displayed as `schema.table`, the form configs, topics, logs
/// and metrics use; [`TableName::quoted`] is the form SQL needs.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct TableName {
    pub schema: String,
    pub name: String,
}

impl TableName {
    pub fn new(schema: impl Into<String>, name: impl Into<String>) -> Self {
        TableName {
            schema: schema.into(),
            name: name.into(),
        }
    }

    /// Parses `schema.table` as a config writes it; identifiers may contain
    /// dots or quotes if double-quoted (`"my.schema"."my ""table"""`).
    /// `None` unless there are exactly two non-empty parts.
    pub fn parse(s: &str) -> Option<TableName> {
        let mut parts = Vec::new();
        let mut cur = String::new();
        let mut quoted = false;
        let mut chars = s.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '"' if quoted && chars.peek() == Some(&'"') => {
                    cur.push('"');
                    chars.next();
                }
                '"' => quoted = !quoted,
                '.' if !quoted => parts.push(std::mem::take(&mut cur)),
                c => cur.push(c),
            }
        }
        parts.push(cur);
        match <[String; 2]>::try_from(parts) {
            Ok([schema, name]) if !schema.is_empty() && !name.is_empty() && !quoted => {
                Some(TableName { schema, name })
            }
            _ => None,
        }
    }

    /// `schema.table` as a config or a signal writes it: plain, unless a
    /// part holds a dot or a double quote, then both parts quoted, so that
    /// [`TableName::parse`] reads it back as it was.
    pub fn to_config_string(&self) -> String {
        let plain = |s: &str| !s.contains('.') && !s.contains('"');
        if plain(&self.schema) && plain(&self.name) {
            self.to_string()
        } else {
            self.quoted()
        }
    }

    /// `"schema"."table"`, each identifier quoted for SQL (embedded double
    /// quotes doubled), so any name is used exactly as written.
    pub fn quoted(&self) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(&self.name))
    }
}

impl std::fmt::Display for TableName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.schema, self.name)
    }
}

/// A double-quoted SQL identifier: `my "x"` becomes `"my ""x"""`.
pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// The Postgres type of a column, resolved to what walcast knows how to
/// convert. Domains arrive here already resolved to their base type.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum PgType {
    Bool,
    Int2,
    Int4,
    Int8,
    Float4,
    Float8,
    /// `numeric(p, s)`; both `None` for an unconstrained `numeric`.
    Numeric {
        precision: Option<u32>,
        scale: Option<u32>,
    },
    Money,
    Text,
    Varchar {
        max_length: Option<u32>,
    },
    Char {
        length: Option<u32>,
    },
    Name,
    Bytea,
    Uuid,
    Json,
    Jsonb,
    Date,
    Time,
    TimeTz,
    Timestamp,
    TimestampTz,
    Interval,
    Inet,
    Cidr,
    MacAddr,
    MacAddr8,
    Enum {
        type_name: String,
        labels: Vec<String>,
    },
    Array {
        element: Box<PgType>,
    },
    /// A type walcast has no conversion for; values travel as their text form.
    Unknown {
        type_name: String,
    },
}

impl PgType {
    /// The SQL name, for messages and schema docs.
    pub fn sql_name(&self) -> String {
        match self {
            PgType::Bool => "boolean".into(),
            PgType::Int2 => "smallint".into(),
            PgType::Int4 => "integer".into(),
            PgType::Int8 => "bigint".into(),
            PgType::Float4 => "real".into(),
            PgType::Float8 => "double precision".into(),
            PgType::Numeric {
                precision: Some(p),
                scale,
            } => format!("numeric({p},{})", scale.unwrap_or(0)),
            PgType::Numeric { .. } => "numeric".into(),
            PgType::Money => "money".into(),
            PgType::Text => "text".into(),
            PgType::Varchar { .. } => "character varying".into(),
            PgType::Char { .. } => "character".into(),
            PgType::Name => "name".into(),
            PgType::Bytea => "bytea".into(),
            PgType::Uuid => "uuid".into(),
            PgType::Json => "json".into(),
            PgType::Jsonb => "jsonb".into(),
            PgType::Date => "date".into(),
            PgType::Time => "time without time zone".into(),
            PgType::TimeTz => "time with time zone".into(),
            PgType::Timestamp => "timestamp without time zone".into(),
            PgType::TimestampTz => "timestamp with time zone".into(),
            PgType::Interval => "interval".into(),
            PgType::Inet => "inet".into(),
            PgType::Cidr => "cidr".into(),
            PgType::MacAddr => "macaddr".into(),
            PgType::MacAddr8 => "macaddr8".into(),
            PgType::Enum { type_name, .. } => type_name.clone(),
            PgType::Array { element } => format!("{}[]", element.sql_name()),
            PgType::Unknown { type_name } => type_name.clone(),
        }
    }
}

/// One column of a captured table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Column {
    pub name: String,
    pub pg_type: PgType,
    /// The type's OID as pgoutput sent it (before domain resolution).
    pub type_oid: u32,
    /// The type modifier (`atttypmod`), -1 when none.
    pub type_modifier: i32,
    pub nullable: bool,
    /// Part of the primary key (or of the replica identity index).
    pub key: bool,
    /// The column's place in the key's index, from 1 (`PRIMARY KEY (b, a)`
    /// makes `b` 1), when the catalog said; `avro_compat = "debezium"`
    /// orders key fields so, as Debezium does. walcast's own shapes keep
    /// column order (see [`TableSchema::key_indexes`]).
    pub key_position: Option<u16>,
    /// The column's `DEFAULT` as Postgres prints it (`pg_get_expr`, e.g.
    /// `'dflt'::text`, `nextval('s'::regclass)`), when it has one: what
    /// `avro_compat = "debezium"` turns into a schema default, as
    /// Debezium does.
    pub default: Option<String>,
}

/// How much of the old row Postgres writes to the WAL for updates and deletes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ReplicaIdentity {
    /// The primary key columns.
    Default,
    /// Nothing at all: updates and deletes cannot be captured.
    Nothing,
    /// The whole old row.
    Full,
    /// The columns of a chosen unique index.
    Index,
}

/// A captured table as of one point in the stream. A new `TableSchema`
/// (with a new [`TableSchema::version`]) is made whenever Postgres sends a
/// changed Relation message, so events keep the shape they were written with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TableSchema {
    pub relation_id: u32,
    pub schema: String,
    pub name: String,
    pub columns: Vec<Column>,
    pub replica_identity: ReplicaIdentity,
    /// Increases each time the table's shape changes within this process.
    pub version: u32,
}

impl TableSchema {
    /// `schema.table`, for messages and topic names.
    pub fn qualified_name(&self) -> String {
        format!("{}.{}", self.schema, self.name)
    }

    /// The table's name as a [`TableName`].
    pub fn table_name(&self) -> TableName {
        TableName::new(&self.schema, &self.name)
    }

    /// Indexes of the key columns, in column order.
    pub fn key_indexes(&self) -> Vec<usize> {
        self.columns
            .iter()
            .enumerate()
            .filter(|(_, c)| c.key)
            .map(|(i, _)| i)
            .collect()
    }

    /// Indexes of the key columns in the order of the key's index (column
    /// order where the catalog gave no positions): Debezium's key field
    /// order.
    pub fn key_indexes_in_index_order(&self) -> Vec<usize> {
        let mut keys = self.key_indexes();
        keys.sort_by_key(|&i| self.columns[i].key_position.unwrap_or(u16::MAX));
        keys
    }

    pub fn has_key(&self) -> bool {
        self.columns.iter().any(|c| c.key)
    }

    pub fn column_index(&self, name: &str) -> Option<usize> {
        self.columns.iter().position(|c| c.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_table_names() {
        assert_eq!(
            TableName::parse("public.orders"),
            Some(TableName::new("public", "orders"))
        );
        assert_eq!(
            TableName::parse(r#""My Schema"."odd.""name""#),
            Some(TableName::new("My Schema", "odd.\"name"))
        );
        assert_eq!(TableName::parse("orders"), None);
        assert_eq!(TableName::parse("a.b.c"), None);
        assert_eq!(TableName::parse(".x"), None);
        assert_eq!(TableName::parse("x."), None);
        assert_eq!(TableName::parse(r#""open.x"#), None);
    }

    #[test]
    fn displays_plain_and_quotes_for_sql() {
        let t = TableName::new("My Schema", "odd.\"name");
        assert_eq!(t.to_string(), "My Schema.odd.\"name");
        assert_eq!(t.quoted(), r#""My Schema"."odd.""name""#);
        // What quoted() and to_config_string() write, parse() reads back.
        assert_eq!(TableName::parse(&t.quoted()), Some(t.clone()));
        assert_eq!(t.to_config_string(), t.quoted());
        assert_eq!(TableName::parse(&t.to_config_string()), Some(t));
        let plain = TableName::new("public", "Orders");
        assert_eq!(plain.to_config_string(), "public.Orders");
        assert_eq!(TableName::parse(&plain.to_config_string()), Some(plain));
    }
}
