//! Turning change events into Redis writes: pure functions, no I/O.
//!
//! # Keys
//! A key template such as `{schema}.{table}:{id}` names a row's key.
//! `{schema}` and `{table}` are the table's; `{id}` is the key columns'
//! values joined with `:` in key-column order; `{<column>}` is one key
//! column's value. Values render as [`walcast_sdk::json::value`] does, with
//! strings unquoted. Braces are always placeholders; a template cannot hold
//! a literal `{`.
//!
//! # Versions (upsert mode)
//! Each row key `K` has a companion key holding the commit LSN of the version
//! stored in `K`: `{K}:__v`, or `K:__v` when `K` already has a Redis Cluster
//! hash tag, so that both keys always hash to the same cluster slot and one
//! script can touch both. [`VERSIONED_WRITE_LUA`] writes `K` only when the
//! incoming version is `>=` the stored one: an older event is a no-op, and a
//! replay of the same version rewrites the same data (idempotent; and two
//! changes of one row in one transaction share a commit LSN and must both
//! apply, in order). A delete removes `K` but leaves the companion as a
//! tombstone with a TTL, so that a late older upsert cannot resurrect the
//! row. The companion of a live row expires with the row when a TTL is set.
//!
//! # Unchanged TOASTed values (upsert mode)
//! An update that left a TOASTed column unchanged does not carry its value
//! ([`walcast_sdk::toast`]). The write leaves such columns out of the
//! payload and names them ([`Write::Upsert::keep`]); the script keeps their
//! stored values (JSON: decoded from the stored document; hash: the fields
//! are not overwritten), under the same version check. Without a stored
//! value the column is left out and listed in `__walcast_incomplete`
//! (a JSON array in the document, or a hash field holding one); the
//! placeholder is never stored.
//!
//! # Truncate
//! In invalidate and upsert modes a truncate becomes a `SCAN MATCH` for the
//! table's keys (the template up to its first key placeholder, then `*`)
//! followed by `UNLINK`, when the template starts with something naming the
//! table. Version companions are left (they start with `{`, so the pattern
//! never matches them): they only refuse versions older than the truncate.
//! In cluster mode, or when no safe pattern exists, the truncate is logged
//! and ignored. In publish mode a truncate is a message with `op = "t"` and
//! a `null` key.

use serde_json::{json, Value as Json};
use walcast_sdk::json::{value, JsonOptions};
use walcast_sdk::{ChangeEvent, Lsn, Op, TableSchema, Value};

use crate::config::{Mode, PublishVia, UpsertFormat};

/// Keeps the row and its version key in step; see the module doc.
///
/// KEYS: row key, version key. ARGV: version (decimal u64), action (`set`,
/// `hset`, `del`), ttl seconds (0 = none; for `del` the tombstone TTL), the
/// number N of columns to keep from the stored row, those N column names,
/// then the JSON text (`set`) or field/value pairs (`hset`).
/// Returns 0 when a newer version is already stored, 1 when applied, 2 when
/// applied without some kept column because the stored row lacked it (the
/// row then lists them under `__walcast_incomplete`).
/// Versions compare as decimal strings (length first) because Lua numbers
/// are doubles and an LSN can exceed 2^53.
///
/// Kept JSON values go through Redis's cjson: the JSON text of the event's
/// own columns is spliced in untouched, and only the kept values (TOASTed
/// text, bytea, json: strings) are decoded and encoded again.
pub const VERSIONED_WRITE_LUA: &str = r#"
local v = ARGV[1]
local cur = redis.call('GET', KEYS[2])
if cur and (#cur > #v or (#cur == #v and cur > v)) then
  return 0
end
local action = ARGV[2]
local ttl = tonumber(ARGV[3])
if action == 'del' then
  redis.call('DEL', KEYS[1])
  redis.call('SET', KEYS[2], v, 'EX', ttl)
  return 1
end
local nkeep = tonumber(ARGV[4])
local first = 5 + nkeep
local stored_type = 'none'
if nkeep > 0 then
  stored_type = redis.call('TYPE', KEYS[1]).ok
end
local missing = {}
local result = 1
if action == 'set' then
  local doc = ARGV[first]
  if nkeep > 0 then
    local stored = nil
    if stored_type == 'string' then
      local ok, decoded = pcall(cjson.decode, redis.call('GET', KEYS[1]))
      if ok and type(decoded) == 'table' then
        stored = decoded
      end
    end
    local extra = {}
    for i = 5, first - 1 do
      local val = nil
      if stored then
        val = stored[ARGV[i]]
      end
      if val == nil then
        table.insert(missing, ARGV[i])
      else
        table.insert(extra, cjson.encode(ARGV[i]) .. ':' .. cjson.encode(val))
      end
    end
    if #missing > 0 then
      table.insert(extra, '"__walcast_incomplete":' .. cjson.encode(missing))
      result = 2
    end
    if #extra > 0 then
      if doc == '{}' then
        doc = '{' .. table.concat(extra, ',') .. '}'
      else
        doc = string.sub(doc, 1, -2) .. ',' .. table.concat(extra, ',') .. '}'
      end
    end
  end
  if ttl > 0 then
    redis.call('SET', KEYS[1], doc, 'EX', ttl)
  else
    redis.call('SET', KEYS[1], doc)
  end
else
  local kept = {}
  if nkeep > 0 then
    local unknown = {}
    if stored_type == 'hash' then
      local marker = redis.call('HGET', KEYS[1], '__walcast_incomplete')
      if marker then
        local ok, cols = pcall(cjson.decode, marker)
        if ok and type(cols) == 'table' then
          for _, c in ipairs(cols) do
            unknown[c] = true
          end
        end
      end
    end
    for i = 5, first - 1 do
      local val = false
      if stored_type == 'hash' then
        val = redis.call('HGET', KEYS[1], ARGV[i])
      end
      if val then
        table.insert(kept, ARGV[i])
        table.insert(kept, val)
      elseif stored_type ~= 'hash' or unknown[ARGV[i]] then
        -- A stored hash without the field held NULL there; no hash, or a
        -- field it lists as unknown, leaves the value unknown.
        table.insert(missing, ARGV[i])
      end
    end
  end
  redis.call('DEL', KEYS[1])
  if #ARGV >= first + 1 then
    redis.call('HSET', KEYS[1], unpack(ARGV, first))
  end
  if #kept > 0 then
    redis.call('HSET', KEYS[1], unpack(kept))
  end
  if #missing > 0 then
    redis.call('HSET', KEYS[1], '__walcast_incomplete', cjson.encode(missing))
    result = 2
  end
  if ttl > 0 and redis.call('EXISTS', KEYS[1]) == 1 then
    redis.call('EXPIRE', KEYS[1], ttl)
  end
end
if ttl > 0 then
  redis.call('SET', KEYS[2], v, 'EX', ttl)
else
  redis.call('SET', KEYS[2], v)
end
return result
"#;

/// A template that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    #[error("template `{0}` has a `{{` that is never closed")]
    Unclosed(String),
    #[error("template `{0}` has a `}}` with no `{{` before it")]
    StrayClose(String),
    #[error("template `{0}` has an empty placeholder `{{}}`")]
    EmptyPlaceholder(String),
    #[error("template is empty")]
    Empty,
}

/// An event this sink cannot turn into a write. Definite: the same event
/// fails the same way on every retry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error(
        "table {table} has no primary key (nor replica identity index), so template `{template}` cannot name its rows \
         (event at LSN {lsn}); give the table a key or leave it out of the publication"
    )]
    NoKey {
        table: String,
        template: String,
        lsn: Lsn,
    },
    #[error("template `{template}` names column `{column}`, which is not a key column of {table} (event at LSN {lsn})")]
    NotAKeyColumn {
        table: String,
        template: String,
        column: String,
        lsn: Lsn,
    },
    #[error("{op} event for {table} at LSN {lsn} carries no {image} image")]
    MissingImage {
        table: String,
        op: &'static str,
        image: &'static str,
        lsn: Lsn,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    Schema,
    Table,
    Id,
    Column(String),
}

/// A parsed key (or channel) template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyTemplate {
    text: String,
    segments: Vec<Segment>,
}

impl KeyTemplate {
    pub fn parse(text: &str) -> Result<Self, TemplateError> {
        if text.is_empty() {
            return Err(TemplateError::Empty);
        }
        let mut segments = Vec::new();
        let mut rest = text;
        while !rest.is_empty() {
            let open = rest.find('{');
            let close = rest.find('}');
            match (open, close) {
                (None, None) => {
                    segments.push(Segment::Literal(rest.to_string()));
                    break;
                }
                (None, Some(_)) => return Err(TemplateError::StrayClose(text.into())),
                (Some(o), Some(c)) if c < o => return Err(TemplateError::StrayClose(text.into())),
                (Some(_), None) => return Err(TemplateError::Unclosed(text.into())),
                (Some(o), Some(c)) => {
                    if o > 0 {
                        segments.push(Segment::Literal(rest[..o].to_string()));
                    }
                    let name = &rest[o + 1..c];
                    if name.contains('{') {
                        return Err(TemplateError::Unclosed(text.into()));
                    }
                    segments.push(match name {
                        "" => return Err(TemplateError::EmptyPlaceholder(text.into())),
                        "schema" => Segment::Schema,
                        "table" => Segment::Table,
                        "id" => Segment::Id,
                        column => Segment::Column(column.to_string()),
                    });
                    rest = &rest[c + 1..];
                }
            }
        }
        Ok(KeyTemplate {
            text: text.to_string(),
            segments,
        })
    }

    /// Whether the template needs the row's key (`{id}` or a column).
    pub fn uses_key(&self) -> bool {
        self.segments
            .iter()
            .any(|s| matches!(s, Segment::Id | Segment::Column(_)))
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The name for one row. `key` is the row's key columns in key order;
    /// `lsn` only serves error messages.
    pub fn render(
        &self,
        table: &TableSchema,
        key: Option<&[(&str, &Value)]>,
        lsn: Lsn,
    ) -> Result<String, RequestError> {
        let mut out = String::new();
        for seg in &self.segments {
            match seg {
                Segment::Literal(s) => out.push_str(s),
                Segment::Schema => out.push_str(&table.schema),
                Segment::Table => out.push_str(&table.name),
                Segment::Id | Segment::Column(_) => {
                    let key = key
                        .filter(|k| !k.is_empty())
                        .ok_or_else(|| RequestError::NoKey {
                            table: table.qualified_name(),
                            template: self.text.clone(),
                            lsn,
                        })?;
                    if let Segment::Column(name) = seg {
                        let (_, v) = key.iter().find(|(n, _)| n == name).ok_or_else(|| {
                            RequestError::NotAKeyColumn {
                                table: table.qualified_name(),
                                template: self.text.clone(),
                                column: name.clone(),
                                lsn,
                            }
                        })?;
                        out.push_str(&key_part(v));
                    } else {
                        for (i, (_, v)) in key.iter().enumerate() {
                            if i > 0 {
                                out.push(':');
                            }
                            out.push_str(&key_part(v));
                        }
                    }
                }
            }
        }
        Ok(out)
    }

    /// A `SCAN MATCH` pattern for every key of `table`, or `None` when the
    /// part before the first key placeholder does not name the table (then
    /// the pattern could match other tables' keys).
    pub fn scan_pattern(&self, table: &TableSchema) -> Option<String> {
        let mut out = String::new();
        let mut names_table = false;
        for seg in &self.segments {
            match seg {
                Segment::Literal(s) => out.push_str(&glob_escape(s)),
                Segment::Schema => {
                    out.push_str(&glob_escape(&table.schema));
                }
                Segment::Table => {
                    names_table = true;
                    out.push_str(&glob_escape(&table.name));
                }
                Segment::Id | Segment::Column(_) => {
                    out.push('*');
                    return names_table.then_some(out);
                }
            }
        }
        // No key placeholder: the template names exactly one key.
        names_table.then_some(out)
    }
}

fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for ch in s.chars() {
        if matches!(ch, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(ch);
    }
    out
}

/// A key value as it appears in a key: strings without quotes, everything
/// else as its JSON text.
pub fn key_part(v: &Value) -> String {
    match value(v, &JsonOptions::default()) {
        Json::String(s) => s,
        other => other.to_string(),
    }
}

/// The companion key that holds `key`'s version; see the module doc.
pub fn version_key(key: &str) -> String {
    if has_hash_tag(key) {
        format!("{key}:__v")
    } else {
        format!("{{{key}}}:__v")
    }
}

fn has_hash_tag(key: &str) -> bool {
    match key.find('{') {
        Some(o) => key[o + 1..].find('}').is_some_and(|c| c > 0),
        None => false,
    }
}

/// The row data written by an upsert.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Payload {
    Json(String),
    Hash(Vec<(String, String)>),
}

/// One write, in the order it must happen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Write {
    /// `DEL key` (invalidate mode).
    Delete {
        key: String,
    },
    /// [`VERSIONED_WRITE_LUA`] with `set`/`hset`.
    Upsert {
        key: String,
        version: u64,
        payload: Payload,
        ttl_secs: Option<u64>,
        /// Columns the event does not carry (unchanged TOASTed values),
        /// absent from `payload`: the stored values are kept.
        keep: Vec<String>,
    },
    /// [`VERSIONED_WRITE_LUA`] with `del`.
    Tombstone {
        key: String,
        version: u64,
        ttl_secs: u64,
    },
    Publish {
        channel: String,
        message: String,
    },
    StreamAdd {
        stream: String,
        maxlen: u64,
        message: String,
    },
    /// SCAN MATCH pattern + UNLINK, for a truncate.
    DeleteMatching {
        pattern: String,
    },
}

/// The mode with its templates parsed, ready to turn events into writes.
#[derive(Debug, Clone)]
pub enum Plan {
    Invalidate {
        key: KeyTemplate,
        truncate_scan: bool,
    },
    Upsert {
        key: KeyTemplate,
        format: UpsertFormat,
        ttl_secs: Option<u64>,
        tombstone_ttl_secs: u64,
        truncate_scan: bool,
    },
    Publish {
        via: PublishVia,
        name: KeyTemplate,
        stream_maxlen: u64,
    },
}

impl Plan {
    /// `cluster` turns truncate scans off: SCAN only sees one node.
    pub fn new(mode: &Mode, cluster: bool) -> Result<Self, TemplateError> {
        Ok(match mode {
            Mode::Invalidate {
                key_template,
                truncate_scan,
            } => Plan::Invalidate {
                key: KeyTemplate::parse(key_template)?,
                truncate_scan: *truncate_scan && !cluster,
            },
            Mode::Upsert {
                key_template,
                format,
                ttl_secs,
                tombstone_ttl_secs,
                truncate_scan,
            } => Plan::Upsert {
                key: KeyTemplate::parse(key_template)?,
                format: *format,
                ttl_secs: *ttl_secs,
                tombstone_ttl_secs: *tombstone_ttl_secs,
                truncate_scan: *truncate_scan && !cluster,
            },
            Mode::Publish {
                via,
                name_template,
                stream_maxlen,
            } => Plan::Publish {
                via: *via,
                name: KeyTemplate::parse(name_template)?,
                stream_maxlen: *stream_maxlen,
            },
        })
    }

    /// Whether `event` can be written at all (its key, or channel, renders),
    /// without building the writes.
    pub fn check(&self, event: &ChangeEvent) -> Result<(), RequestError> {
        let lsn = event.source.commit_lsn;
        match self {
            Plan::Publish { name, .. } => name.render(&event.table, None, lsn).map(|_| ()),
            _ if event.op == Op::Truncate => Ok(()),
            Plan::Invalidate { key, .. } | Plan::Upsert { key, .. } => key
                .render(&event.table, event.key_values().as_deref(), lsn)
                .map(|_| ()),
        }
    }

    /// The writes for one event, in order.
    pub fn writes(&self, event: &ChangeEvent) -> Result<Vec<Write>, RequestError> {
        let table = &event.table;
        let lsn = event.source.commit_lsn;
        match self {
            Plan::Publish {
                via,
                name,
                stream_maxlen,
            } => {
                let target = name.render(table, None, lsn)?;
                let message = publish_message(event).to_string();
                Ok(vec![match via {
                    PublishVia::Channel => Write::Publish {
                        channel: target,
                        message,
                    },
                    PublishVia::Stream => Write::StreamAdd {
                        stream: target,
                        maxlen: *stream_maxlen,
                        message,
                    },
                }])
            }
            Plan::Invalidate { key, truncate_scan }
            | Plan::Upsert {
                key, truncate_scan, ..
            } if event.op == Op::Truncate => {
                match key.scan_pattern(table).filter(|_| *truncate_scan) {
                    Some(pattern) => Ok(vec![Write::DeleteMatching { pattern }]),
                    None => {
                        tracing::warn!(
                            table = %table.qualified_name(), lsn = %lsn, template = key.as_str(),
                            "truncate ignored: cluster mode, truncate_scan = false, or the key template does not start by naming the table"
                        );
                        Ok(Vec::new())
                    }
                }
            }
            Plan::Invalidate { key, .. } => {
                let mut keys = Vec::with_capacity(2);
                if let Some(old) = old_key_if_changed(event, key)? {
                    keys.push(old);
                }
                keys.push(key.render(table, event.key_values().as_deref(), lsn)?);
                Ok(keys.into_iter().map(|key| Write::Delete { key }).collect())
            }
            Plan::Upsert {
                key,
                format,
                ttl_secs,
                tombstone_ttl_secs,
                ..
            } => {
                let version = event.version();
                let mut out = Vec::with_capacity(2);
                if let Some(old) = old_key_if_changed(event, key)? {
                    out.push(Write::Tombstone {
                        key: old,
                        version,
                        ttl_secs: *tombstone_ttl_secs,
                    });
                }
                let name = key.render(table, event.key_values().as_deref(), lsn)?;
                if event.op == Op::Delete {
                    out.push(Write::Tombstone {
                        key: name,
                        version,
                        ttl_secs: *tombstone_ttl_secs,
                    });
                } else {
                    let after =
                        event
                            .after
                            .as_deref()
                            .ok_or_else(|| RequestError::MissingImage {
                                table: table.qualified_name(),
                                op: event.op.code(),
                                image: "after",
                                lsn,
                            })?;
                    let keep = walcast_sdk::toast::unavailable_columns(event);
                    let payload = match format {
                        // The row without its `keep` (unavailable) columns.
                        UpsertFormat::Json => Payload::Json(walcast_sdk::json::row_text(
                            table,
                            after,
                            &JsonOptions::default(),
                            true,
                        )),
                        UpsertFormat::Hash => Payload::Hash(hash_fields(table, after)),
                    };
                    out.push(Write::Upsert {
                        key: name,
                        version,
                        payload,
                        ttl_secs: *ttl_secs,
                        keep,
                    });
                }
                Ok(out)
            }
        }
    }
}

/// `{"schema","table","op","key","lsn"}`: enough for a subscriber to drop
/// its cached copy; `lsn` is the commit LSN (the row's version).
pub fn publish_message(event: &ChangeEvent) -> Json {
    json!({
        "schema": event.table.schema,
        "table": event.table.name,
        "op": event.op.code(),
        "key": walcast_sdk::json::key(event, &JsonOptions::default()),
        "lsn": event.version(),
    })
}

fn key_from_row<'a>(table: &'a TableSchema, image: &'a [Value]) -> Vec<(&'a str, &'a Value)> {
    table
        .columns
        .iter()
        .zip(image)
        .filter(|(c, _)| c.key)
        .map(|(c, v)| (c.name.as_str(), v))
        .collect()
}

/// An update that changed the key leaves the old key behind: it must go too.
fn old_key_if_changed(
    event: &ChangeEvent,
    template: &KeyTemplate,
) -> Result<Option<String>, RequestError> {
    if event.op != Op::Update || !template.uses_key() {
        return Ok(None);
    }
    let (Some(before), Some(after)) = (event.before.as_deref(), event.after.as_deref()) else {
        return Ok(None);
    };
    let old = key_from_row(&event.table, before);
    let new = key_from_row(&event.table, after);
    if old.is_empty()
        || old == new
        || old
            .iter()
            .any(|(_, v)| matches!(v, Value::Null | Value::Unavailable))
    {
        return Ok(None);
    }
    template
        .render(&event.table, Some(&old), event.source.commit_lsn)
        .map(Some)
}

/// Field/value pairs for HSET: NULL columns are left out (a hash has no
/// NULL), and so are unavailable ones (the stored field is kept), strings
/// as they are, other values as JSON text.
pub fn hash_fields(table: &TableSchema, image: &[Value]) -> Vec<(String, String)> {
    table
        .columns
        .iter()
        .zip(image)
        .filter(|(_, v)| !matches!(v, Value::Null | Value::Unavailable))
        .map(|(c, v)| (c.name.clone(), key_part(v)))
        .collect()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use walcast_sdk::{Column, PgType, ReplicaIdentity, SnapshotMarker, SourceInfo};

    use super::*;

    fn table(keys: &[&str], cols: &[&str]) -> Arc<TableSchema> {
        Arc::new(TableSchema {
            relation_id: 1,
            schema: "public".into(),
            name: "orders".into(),
            columns: cols
                .iter()
                .map(|c| Column {
                    key_position: None,
                    default: None,
                    name: c.to_string(),
                    pg_type: PgType::Text,
                    type_oid: 25,
                    type_modifier: -1,
                    nullable: true,
                    key: keys.contains(c),
                })
                .collect(),
            replica_identity: ReplicaIdentity::Default,
            version: 1,
        })
    }

    fn event(
        t: &Arc<TableSchema>,
        op: Op,
        before: Option<Vec<Value>>,
        after: Option<Vec<Value>>,
        lsn: u64,
    ) -> ChangeEvent {
        ChangeEvent {
            op,
            table: Arc::clone(t),
            before,
            after,
            source: SourceInfo {
                name: "test".into(),
                db: "db".into(),
                lsn: Lsn(lsn),
                commit_lsn: Lsn(lsn),
                tx_id: Some(7),
                ts_ms: 0,
                ts_us: 0,
                snapshot: SnapshotMarker::False,
            },
            transaction: None,
            ts_ms: 0,
        }
    }

    fn upsert_plan(format: UpsertFormat) -> Plan {
        Plan::Upsert {
            key: KeyTemplate::parse("{table}:{id}").unwrap(),
            format,
            ttl_secs: Some(60),
            tombstone_ttl_secs: 86_400,
            truncate_scan: true,
        }
    }

    #[test]
    fn renders_single_composite_and_named_key_columns() {
        let t = table(&["region", "id"], &["region", "id", "note"]);
        let e = event(
            &t,
            Op::Create,
            None,
            Some(vec![
                Value::Text("eu".into()),
                Value::Int64(42),
                Value::Null,
            ]),
            1,
        );
        let key = e.key_values();
        let render = |tpl: &str| {
            KeyTemplate::parse(tpl)
                .unwrap()
                .render(&t, key.as_deref(), Lsn(1))
        };
        assert_eq!(
            render("{schema}.{table}:{id}").unwrap(),
            "public.orders:eu:42"
        );
        assert_eq!(render("o:{id}:{region}").unwrap(), "o:eu:42:eu");
        let err = render("o:{note}").unwrap_err();
        assert!(
            err.to_string()
                .contains("`note`, which is not a key column of public.orders"),
            "{err}"
        );

        let keyless = table(&[], &["a"]);
        let e = event(
            &keyless,
            Op::Create,
            None,
            Some(vec![Value::Int32(1)]),
            0x16_0000_0010,
        );
        assert_eq!(
            upsert_plan(UpsertFormat::Json).check(&e).unwrap_err(),
            upsert_plan(UpsertFormat::Json).writes(&e).unwrap_err(),
            "the check says up front what writing would refuse"
        );
        let publish = Plan::Publish {
            via: PublishVia::Channel,
            name: KeyTemplate::parse("cdc:{table}").unwrap(),
            stream_maxlen: 1,
        };
        assert!(publish.check(&e).is_ok());
        let err = upsert_plan(UpsertFormat::Json).writes(&e).unwrap_err();
        assert!(
            err.to_string().contains("public.orders has no primary key"),
            "{err}"
        );
        assert!(err.to_string().contains("LSN 16/10"), "{err}");
    }

    #[test]
    fn parses_templates_strictly() {
        assert_eq!(
            KeyTemplate::parse("a:{id").unwrap_err(),
            TemplateError::Unclosed("a:{id".into())
        );
        assert_eq!(
            KeyTemplate::parse("a}:{id}").unwrap_err(),
            TemplateError::StrayClose("a}:{id}".into())
        );
        assert_eq!(
            KeyTemplate::parse("a:{}").unwrap_err(),
            TemplateError::EmptyPlaceholder("a:{}".into())
        );
        assert!(KeyTemplate::parse("{a{b}}").is_err());
        assert!(!KeyTemplate::parse("x:{schema}.{table}").unwrap().uses_key());
    }

    #[test]
    fn upserts_json_and_hash_and_tombstones_deletes() {
        let t = table(&["id"], &["id", "name", "gone"]);
        let after = vec![Value::Int32(5), Value::Text("Ann".into()), Value::Null];
        let e = event(&t, Op::Update, None, Some(after.clone()), 900);
        assert_eq!(
            upsert_plan(UpsertFormat::Json).writes(&e).unwrap(),
            vec![Write::Upsert {
                key: "orders:5".into(),
                version: 900,
                payload: Payload::Json(r#"{"gone":null,"id":5,"name":"Ann"}"#.into()),
                ttl_secs: Some(60),
                keep: vec![],
            }]
        );
        assert_eq!(
            upsert_plan(UpsertFormat::Hash).writes(&e).unwrap()[0],
            Write::Upsert {
                key: "orders:5".into(),
                version: 900,
                payload: Payload::Hash(vec![
                    ("id".into(), "5".into()),
                    ("name".into(), "Ann".into())
                ]),
                ttl_secs: Some(60),
                keep: vec![],
            }
        );
        let d = event(&t, Op::Delete, Some(after), None, 901);
        assert_eq!(
            upsert_plan(UpsertFormat::Json).writes(&d).unwrap(),
            vec![Write::Tombstone {
                key: "orders:5".into(),
                version: 901,
                ttl_secs: 86_400
            }]
        );
    }

    #[test]
    fn unavailable_columns_are_kept_not_written() {
        let t = table(&["id"], &["id", "name", "body"]);
        let e = event(
            &t,
            Op::Update,
            None,
            Some(vec![
                Value::Int32(5),
                Value::Text("Ann".into()),
                Value::Unavailable,
            ]),
            900,
        );
        for (format, payload) in [
            (
                UpsertFormat::Json,
                Payload::Json(r#"{"id":5,"name":"Ann"}"#.into()),
            ),
            (
                UpsertFormat::Hash,
                Payload::Hash(vec![
                    ("id".into(), "5".into()),
                    ("name".into(), "Ann".into()),
                ]),
            ),
        ] {
            assert_eq!(
                upsert_plan(format).writes(&e).unwrap(),
                vec![Write::Upsert {
                    key: "orders:5".into(),
                    version: 900,
                    payload,
                    ttl_secs: Some(60),
                    keep: vec!["body".into()],
                }]
            );
        }
    }

    #[test]
    fn a_key_change_removes_the_old_key_too() {
        let t = table(&["id"], &["id", "name"]);
        let e = event(
            &t,
            Op::Update,
            Some(vec![Value::Int32(1), Value::Null]),
            Some(vec![Value::Int32(2), Value::Text("x".into())]),
            50,
        );
        let plan = Plan::Invalidate {
            key: KeyTemplate::parse("{table}:{id}").unwrap(),
            truncate_scan: true,
        };
        assert_eq!(
            plan.writes(&e).unwrap(),
            vec![
                Write::Delete {
                    key: "orders:1".into()
                },
                Write::Delete {
                    key: "orders:2".into()
                }
            ]
        );
        let w = upsert_plan(UpsertFormat::Json).writes(&e).unwrap();
        assert_eq!(
            w[0],
            Write::Tombstone {
                key: "orders:1".into(),
                version: 50,
                ttl_secs: 86_400
            }
        );
        assert!(matches!(&w[1], Write::Upsert { key, .. } if key == "orders:2"));
    }

    #[test]
    fn truncate_scans_only_when_the_pattern_names_the_table() {
        let t = table(&["id"], &["id"]);
        let e = event(&t, Op::Truncate, None, None, 7);
        let plan = |tpl: &str, scan: bool| Plan::Invalidate {
            key: KeyTemplate::parse(tpl).unwrap(),
            truncate_scan: scan,
        };
        assert_eq!(
            plan("{schema}.{table}:{id}", true).writes(&e).unwrap(),
            vec![Write::DeleteMatching {
                pattern: "public.orders:*".into()
            }]
        );
        assert_eq!(plan("c:{id}:{table}", true).writes(&e).unwrap(), vec![]);
        assert_eq!(plan("{table}:{id}", false).writes(&e).unwrap(), vec![]);
        let odd = Arc::new(TableSchema {
            name: "a*b".into(),
            ..(*t).clone()
        });
        assert_eq!(
            KeyTemplate::parse("{table}:{id}")
                .unwrap()
                .scan_pattern(&odd)
                .unwrap(),
            "a\\*b:*"
        );
    }

    #[test]
    fn publishes_key_and_version() {
        let t = table(&["id"], &["id", "name"]);
        let e = event(
            &t,
            Op::Delete,
            Some(vec![Value::Int32(3), Value::Null]),
            None,
            77,
        );
        let plan = Plan::Publish {
            via: PublishVia::Stream,
            name: KeyTemplate::parse("cdc:{table}").unwrap(),
            stream_maxlen: 10,
        };
        assert_eq!(
            plan.writes(&e).unwrap(),
            vec![Write::StreamAdd {
                stream: "cdc:orders".into(),
                maxlen: 10,
                message: r#"{"key":{"id":3},"lsn":77,"op":"d","schema":"public","table":"orders"}"#
                    .into(),
            }]
        );
        let trunc = event(&t, Op::Truncate, None, None, 78);
        assert_eq!(publish_message(&trunc)["key"], Json::Null);
    }

    #[test]
    fn version_keys_share_the_cluster_slot() {
        assert_eq!(version_key("orders:5"), "{orders:5}:__v");
        assert_eq!(version_key("{user1}:cart"), "{user1}:cart:__v");
        assert_eq!(version_key("a{}b"), "{a{}b}:__v");
    }
}
