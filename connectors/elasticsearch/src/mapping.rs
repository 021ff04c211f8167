//! The index mapping a table gets, and the documents that fit it: pure
//! functions, no I/O.
//!
//! Left to dynamic mapping, OpenSearch guesses from the first document: a
//! `double precision` becomes a 32-bit `float` (digits lost, `1e300`
//! refused), a date arrives as a number, `infinity` is refused by a date.
//! So the sink creates each index from the table's schema before its first
//! write ([`index_mapping`]), and renders each row to fit it
//! ([`document`]): dates and timestamps as ISO 8601 strings, JSON columns
//! as objects.
//!
//! Where the types come from: a capture pipeline's events carry each
//! column's [`PgType`]; a relay's events carry the types the Avro writer
//! schema gives (see `walcast_schemas::mapping::column_types`); a relay of
//! JSON topics knows no types (every column is [`PgType::Unknown`]) and gets
//! only the conservative dynamic templates of [`index_mapping`]: numbers
//! `long`/`double` (never `float`), strings `text` with a `keyword`
//! sub-field, no date detection.
//!
//! # Values a field cannot hold
//!
//! A value the field's type cannot hold is never replaced by a stand-in:
//! the column is left out of the document and its Postgres text goes to
//! `__walcast_special.<column>` ([`SPECIAL_FIELD`], mapped `keyword`), so it
//! can still be found (`__walcast_special.valid_until: infinity`). That is:
//! `NaN` and `±Infinity` in `real`/`double precision` (and in `numeric`
//! unless it is mapped `keyword`), `±infinity` dates and timestamps, an
//! `inet` with a netmask (`192.168.0.1/24`: the `ip` type holds addresses
//! only), a JSON value that is not an object (with `json = "object"` or
//! `"flat"`), and an array holding any of these (the whole array goes).
//! BC dates and years past 9999 fit: they are written in ISO 8601's
//! expanded form (`-0043-03-15` is 44 BC, `+10000-01-01`).

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::{json, Map, Value as Json};
use walcast_sdk::json::{civil_from_days, value as json_value, JsonOptions};
use walcast_sdk::value::{
    DATE_INFINITY, DATE_NEG_INFINITY, TIMESTAMP_INFINITY, TIMESTAMP_NEG_INFINITY,
};
use walcast_sdk::{PgType, TableSchema, Value};

/// Where values a field cannot hold are recorded, as Postgres's text.
pub const SPECIAL_FIELD: &str = "__walcast_special";
/// Lucene refuses terms over 32766 bytes; 8191 characters of UTF-8 stay
/// under it, so a long text never fails its document.
pub const KEYWORD_IGNORE_ABOVE: u32 = 8191;
/// Parses ISO 8601 with up to nine fractional digits and expanded years.
/// The `date` type indexes milliseconds; `_source` keeps the microseconds.
pub const DATE_FORMAT: &str = "strict_date_optional_time_nanos";

/// How `numeric` and `money` columns are mapped (`numeric` in the sink's config).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NumericMapping {
    /// `numeric(p, 0)` with p ≤ 18 as `long`, everything else `double`.
    #[default]
    Auto,
    /// `numeric(p, s)` with s > 0 and p ≤ 18, and `money`, as `scaled_float`
    /// (factor 10^s; needs the mapper-extras module), the rest as `auto`.
    ScaledFloat,
    /// Every numeric as `double`.
    Double,
    /// Every numeric as `keyword`: the exact text (`NaN` included), no range queries.
    Keyword,
}

/// How `json` and `jsonb` columns are mapped (`json` in the sink's config).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JsonMapping {
    /// One field for the whole value, its leaves searchable as keywords:
    /// `flat_object` (OpenSearch ≥ 2.7) or `flattened` (Elasticsearch).
    #[default]
    Flat,
    /// An object whose sub-fields are mapped dynamically (with the
    /// conservative templates); keys whose types vary between rows conflict.
    Object,
    /// The JSON text as a string (`text` with a `keyword` sub-field).
    String,
}

/// Which product answers: the flat JSON type is named differently.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Flavor {
    #[default]
    OpenSearch,
    Elasticsearch,
}

impl Flavor {
    /// From the `GET /` answer (`version.distribution` is `opensearch` there).
    pub fn from_root(root: &Json) -> Self {
        match root["version"]["distribution"].as_str() {
            Some("opensearch") => Flavor::OpenSearch,
            _ if root["tagline"]
                .as_str()
                .is_some_and(|t| t.contains("OpenSearch")) =>
            {
                Flavor::OpenSearch
            }
            _ => Flavor::Elasticsearch,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MappingOptions {
    pub numeric: NumericMapping,
    pub json: JsonMapping,
    pub flavor: Flavor,
}

fn text_field() -> Json {
    json!({"type": "text", "fields": {"keyword": {"type": "keyword", "ignore_above": KEYWORD_IGNORE_ABOVE}}})
}

fn keyword() -> Json {
    json!({"type": "keyword", "ignore_above": KEYWORD_IGNORE_ABOVE})
}

/// The field mapping of a column type; `None` for a type walcast does not
/// know (the dynamic templates decide from the value).
pub fn field_mapping(pg: &PgType, opts: &MappingOptions) -> Option<Json> {
    Some(match pg {
        PgType::Bool => json!({"type": "boolean"}),
        PgType::Int2 => json!({"type": "short"}),
        PgType::Int4 => json!({"type": "integer"}),
        PgType::Int8 => json!({"type": "long"}),
        PgType::Float4 => json!({"type": "float"}),
        PgType::Float8 => json!({"type": "double"}),
        PgType::Numeric { precision, scale } => {
            numeric_mapping(*precision, scale.unwrap_or(0), opts.numeric)
        }
        PgType::Money => numeric_mapping(Some(18), 2, opts.numeric),
        PgType::Text | PgType::Varchar { .. } | PgType::Char { .. } | PgType::Name => text_field(),
        PgType::Uuid
        | PgType::Enum { .. }
        | PgType::MacAddr
        | PgType::MacAddr8
        | PgType::TimeTz => keyword(),
        PgType::Bytea => json!({"type": "binary"}),
        PgType::Json | PgType::Jsonb => match (opts.json, opts.flavor) {
            (JsonMapping::Flat, Flavor::OpenSearch) => json!({"type": "flat_object"}),
            (JsonMapping::Flat, Flavor::Elasticsearch) => json!({"type": "flattened"}),
            (JsonMapping::Object, _) => json!({"type": "object", "dynamic": true}),
            (JsonMapping::String, _) => text_field(),
        },
        PgType::Date | PgType::Timestamp | PgType::TimestampTz => {
            json!({"type": "date", "format": DATE_FORMAT})
        }
        // Microseconds since midnight, and microseconds (Debezium's forms).
        PgType::Time | PgType::Interval => json!({"type": "long"}),
        PgType::Inet => json!({"type": "ip"}),
        PgType::Cidr => json!({"type": "ip_range"}),
        // Fields are multi-valued: an array is its elements' field.
        PgType::Array { element } => return field_mapping(element, opts),
        PgType::Unknown { .. } => return None,
    })
}

fn numeric_mapping(precision: Option<u32>, scale: u32, policy: NumericMapping) -> Json {
    match (policy, precision) {
        (NumericMapping::Keyword, _) => keyword(),
        (NumericMapping::Double, _) => json!({"type": "double"}),
        (_, Some(p)) if scale == 0 && p <= 18 => json!({"type": "long"}),
        (NumericMapping::ScaledFloat, Some(p)) if p <= 18 => {
            json!({"type": "scaled_float", "scaling_factor": 10f64.powi(scale as i32)})
        }
        _ => json!({"type": "double"}),
    }
}

/// Whether a column of this type can have values its field cannot hold
/// (and so a `__walcast_special` sub-field).
fn may_be_special(pg: &PgType, opts: &MappingOptions) -> bool {
    match pg {
        PgType::Float4
        | PgType::Float8
        | PgType::Date
        | PgType::Timestamp
        | PgType::TimestampTz
        | PgType::Inet => true,
        PgType::Numeric { .. } | PgType::Money => opts.numeric != NumericMapping::Keyword,
        PgType::Json | PgType::Jsonb => opts.json != JsonMapping::String,
        PgType::Array { element } => may_be_special(element, opts),
        _ => false,
    }
}

/// The conservative dynamic templates every walcast index has: what a
/// column of unknown type (a JSON relay, a type walcast has no conversion
/// for) and the keys inside a `json = "object"` column get.
pub fn dynamic_templates() -> Json {
    json!([
        {"walcast_strings": {"match_mapping_type": "string", "mapping": text_field()}},
        {"walcast_doubles": {"match_mapping_type": "double", "mapping": {"type": "double"}}},
        {"walcast_longs": {"match_mapping_type": "long", "mapping": {"type": "long"}}},
    ])
}

/// The `properties` of a table's index: one field per column of known
/// type, [`SPECIAL_FIELD`] with a keyword per column that may need it, and
/// `__walcast_incomplete` (unchanged TOASTed columns with no stored value).
pub fn properties(table: &TableSchema, opts: &MappingOptions) -> Map<String, Json> {
    let mut props = Map::new();
    let mut special = Map::new();
    for c in &table.columns {
        if let Some(m) = field_mapping(&c.pg_type, opts) {
            props.insert(c.name.clone(), m);
        }
        if may_be_special(&c.pg_type, opts) {
            special.insert(c.name.clone(), keyword());
        }
    }
    props.insert(
        walcast_sdk::toast::INCOMPLETE_FIELD.to_string(),
        json!({"type": "keyword"}),
    );
    props.insert(
        SPECIAL_FIELD.to_string(),
        json!({"type": "object", "properties": special}),
    );
    props
}

/// The whole mapping walcast creates an index with.
pub fn index_mapping(table: &TableSchema, opts: &MappingOptions) -> Json {
    json!({
        "date_detection": false,
        "numeric_detection": false,
        "dynamic_templates": dynamic_templates(),
        "properties": properties(table, opts),
    })
}

/// A field whose existing mapping differs from what the table needs:
/// OpenSearch cannot change a field's type in place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conflict {
    pub field: String,
    pub existing: String,
    pub wanted: String,
}

impl std::fmt::Display for Conflict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "field `{}` is mapped {} but the column needs {}",
            self.field, self.existing, self.wanted
        )
    }
}

/// What an existing index lacks, and where it disagrees.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct MappingDiff {
    /// Fields to add with `PUT <index>/_mapping` (`{"properties": missing}`).
    pub missing: Map<String, Json>,
    pub conflicts: Vec<Conflict>,
}

fn describe(m: &Json) -> String {
    let ty = m["type"]
        .as_str()
        .unwrap_or(if m.get("properties").is_some() {
            "object"
        } else {
            "?"
        });
    match m.get("scaling_factor") {
        Some(f) => format!("{ty} (scaling_factor {f})"),
        None => ty.to_string(),
    }
}

/// Compares the `properties` an index has with those a table needs.
/// Only types are compared (and a `scaled_float`'s factor): a format or a
/// sub-field the user chose is theirs. Sub-fields of [`SPECIAL_FIELD`]
/// that are missing are added.
pub fn diff(existing: &Map<String, Json>, wanted: &Map<String, Json>) -> MappingDiff {
    let mut out = MappingDiff::default();
    for (name, want) in wanted {
        match existing.get(name) {
            None => {
                out.missing.insert(name.clone(), want.clone());
            }
            Some(have) if name == SPECIAL_FIELD => {
                let have_props = have["properties"].as_object().cloned().unwrap_or_default();
                let want_props = want["properties"].as_object().cloned().unwrap_or_default();
                let sub = diff(&have_props, &want_props);
                if !sub.missing.is_empty() {
                    out.missing.insert(
                        name.clone(),
                        json!({"type": "object", "properties": sub.missing}),
                    );
                }
                out.conflicts
                    .extend(sub.conflicts.into_iter().map(|c| Conflict {
                        field: format!("{SPECIAL_FIELD}.{}", c.field),
                        ..c
                    }));
            }
            Some(have) => {
                let (h, w) = (describe(have), describe(want));
                if h != w {
                    out.conflicts.push(Conflict {
                        field: name.clone(),
                        existing: h,
                        wanted: w,
                    });
                }
            }
        }
    }
    out
}

/// One column value as the document holds it.
enum Rendered {
    Field(Json),
    /// The field cannot hold it: Postgres's text for [`SPECIAL_FIELD`].
    Special(String),
}

/// The document of a row: the columns that fit their fields, and
/// [`SPECIAL_FIELD`] with those that do not (see the module doc).
/// Unchanged TOASTed columns ([`Value::Unavailable`]) are left out; the
/// sink completes them. Values of relayed events arrive in their JSON form
/// (a date as days in an `Int64`, a timestamptz as text); both forms render
/// the same.
pub fn document(table: &TableSchema, values: &[Value], opts: &MappingOptions) -> Json {
    let json_opts = JsonOptions::default();
    let mut doc = Map::with_capacity(values.len());
    let mut special = BTreeMap::new();
    for (c, v) in table.columns.iter().zip(values) {
        match v {
            Value::Unavailable => continue,
            Value::Null => {
                doc.insert(c.name.clone(), Json::Null);
            }
            _ => match render(&c.pg_type, v, opts, &json_opts) {
                Rendered::Field(j) => {
                    doc.insert(c.name.clone(), j);
                }
                Rendered::Special(text) => {
                    special.insert(c.name.clone(), Json::String(text));
                }
            },
        }
    }
    if !special.is_empty() {
        doc.insert(
            SPECIAL_FIELD.to_string(),
            Json::Object(special.into_iter().collect()),
        );
    }
    Json::Object(doc)
}

fn non_finite_text(s: &str) -> Option<&'static str> {
    match s {
        "NaN" => Some("NaN"),
        "Infinity" => Some("Infinity"),
        "-Infinity" => Some("-Infinity"),
        _ => None,
    }
}

fn render(pg: &PgType, v: &Value, opts: &MappingOptions, jo: &JsonOptions) -> Rendered {
    let plain = || Rendered::Field(json_value(v, jo));
    match (pg, v) {
        (PgType::Float4 | PgType::Float8, Value::Float32(f)) if !f.is_finite() => {
            Rendered::Special(json_value(v, jo).as_str().unwrap_or("NaN").to_string())
        }
        (PgType::Float4 | PgType::Float8, Value::Float64(f)) if !f.is_finite() => {
            Rendered::Special(json_value(v, jo).as_str().unwrap_or("NaN").to_string())
        }
        (PgType::Float4 | PgType::Float8, Value::Text(s)) => match non_finite_text(s) {
            Some(t) => Rendered::Special(t.into()),
            None => plain(),
        },
        (PgType::Numeric { .. } | PgType::Money, _) if opts.numeric != NumericMapping::Keyword => {
            let text = match v {
                Value::Numeric(n) => n.to_string(),
                Value::Text(s) => s.clone(),
                _ => return plain(),
            };
            match &text[..] {
                "NaN" | "Infinity" | "-Infinity" => Rendered::Special(text),
                // Beyond a double's range: the field would refuse it.
                t if t.parse::<f64>().is_ok_and(|f| f.is_infinite()) => Rendered::Special(text),
                _ => plain(),
            }
        }
        (PgType::Date, Value::Date(d)) => date(*d),
        (PgType::Date, Value::Int64(d)) => match i32::try_from(*d) {
            Ok(d) => date(d),
            Err(_) => plain(),
        },
        (PgType::Timestamp, Value::Timestamp(us) | Value::Int64(us)) => timestamp(*us, ""),
        (PgType::TimestampTz, Value::TimestampTz(us)) => timestamp(*us, "Z"),
        (PgType::TimestampTz, Value::Text(s)) if s == "infinity" || s == "-infinity" => {
            Rendered::Special(s.clone())
        }
        // A relayed timestamptz is the JSON encoder's text, whose year is
        // `{y:04}` (`-043` for 44 BC, `200000`): the date field reads
        // only ISO 8601's expanded years there, so the year is rewritten.
        (PgType::TimestampTz, Value::Text(s)) => match expand_year(s) {
            Some(t) => Rendered::Field(Json::String(t)),
            None => plain(),
        },
        (PgType::Inet, Value::Network(s) | Value::Text(s)) if s.contains('/') => {
            Rendered::Special(s.clone())
        }
        (PgType::Json | PgType::Jsonb, Value::Json(s) | Value::Text(s))
            if opts.json != JsonMapping::String =>
        {
            match serde_json::from_str::<Json>(s) {
                Ok(obj @ Json::Object(_)) => Rendered::Field(obj),
                _ => Rendered::Special(s.clone()),
            }
        }
        (PgType::Array { element }, Value::Array(items)) => {
            let mut out = Vec::with_capacity(items.len());
            for item in items {
                if item.is_null() {
                    out.push(Json::Null);
                    continue;
                }
                match render(element, item, opts, jo) {
                    Rendered::Field(j) => out.push(j),
                    Rendered::Special(_) => {
                        return Rendered::Special(json_value(v, jo).to_string());
                    }
                }
            }
            Rendered::Field(Json::Array(out))
        }
        _ => plain(),
    }
}

/// ISO 8601 year: four digits for 0000–9999, else the expanded form with a
/// sign (astronomical numbering: 0000 is 1 BC, -0043 is 44 BC), as the JSON
/// encoder writes it too.
use walcast_sdk::json::iso_year;

/// `YYYY-MM-DDT...` with the year as the JSON encoder writes it, with the
/// year as [`iso_year`] writes it; `None` when `s` is not of that form.
fn expand_year(s: &str) -> Option<String> {
    let (date, rest) = s.split_once('T')?;
    let mut parts = date.rsplitn(3, '-');
    let (d, m, y) = (parts.next()?, parts.next()?, parts.next()?);
    if d.len() != 2 || m.len() != 2 {
        return None;
    }
    let y: i64 = y.parse().ok()?;
    Some(format!("{}-{m}-{d}T{rest}", iso_year(y)))
}

fn date(days: i32) -> Rendered {
    match days {
        DATE_INFINITY => Rendered::Special("infinity".into()),
        DATE_NEG_INFINITY => Rendered::Special("-infinity".into()),
        _ => {
            let (y, m, d) = civil_from_days(i64::from(days));
            Rendered::Field(Json::String(format!("{}-{m:02}-{d:02}", iso_year(y))))
        }
    }
}

fn timestamp(micros: i64, zone: &str) -> Rendered {
    match micros {
        TIMESTAMP_INFINITY => Rendered::Special("infinity".into()),
        TIMESTAMP_NEG_INFINITY => Rendered::Special("-infinity".into()),
        _ => {
            let days = micros.div_euclid(86_400_000_000);
            let rest = micros.rem_euclid(86_400_000_000);
            let (y, m, d) = civil_from_days(days);
            let secs = rest / 1_000_000;
            Rendered::Field(Json::String(format!(
                "{}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:06}{zone}",
                iso_year(y),
                secs / 3600,
                (secs / 60) % 60,
                secs % 60,
                rest % 1_000_000
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use walcast_sdk::{Column, Numeric, ReplicaIdentity};

    use super::*;

    fn table(cols: &[(&str, PgType)]) -> TableSchema {
        TableSchema {
            relation_id: 1,
            schema: "public".into(),
            name: "t".into(),
            columns: cols
                .iter()
                .enumerate()
                .map(|(i, (n, t))| Column {
                    key_position: None,
                    default: None,
                    name: n.to_string(),
                    pg_type: t.clone(),
                    type_oid: 0,
                    type_modifier: -1,
                    nullable: i != 0,
                    key: i == 0,
                })
                .collect(),
            replica_identity: ReplicaIdentity::Default,
            version: 1,
        }
    }

    fn every_type() -> TableSchema {
        table(&[
            ("id", PgType::Int8),
            ("f8", PgType::Float8),
            ("f4", PgType::Float4),
            (
                "n",
                PgType::Numeric {
                    precision: None,
                    scale: None,
                },
            ),
            (
                "n10_2",
                PgType::Numeric {
                    precision: Some(10),
                    scale: Some(2),
                },
            ),
            (
                "n12_0",
                PgType::Numeric {
                    precision: Some(12),
                    scale: Some(0),
                },
            ),
            ("txt", PgType::Text),
            ("b", PgType::Bytea),
            ("ip", PgType::Inet),
            ("net", PgType::Cidr),
            ("j", PgType::Jsonb),
            ("d", PgType::Date),
            ("ts", PgType::Timestamp),
            ("tstz", PgType::TimestampTz),
            (
                "tags",
                PgType::Array {
                    element: Box::new(PgType::Text),
                },
            ),
            (
                "odd",
                PgType::Unknown {
                    type_name: "tsvector".into(),
                },
            ),
        ])
    }

    #[test]
    fn maps_each_type_and_never_a_float_for_double_precision() {
        let m = index_mapping(&every_type(), &MappingOptions::default());
        let p = &m["properties"];
        assert_eq!(p["f8"], json!({"type": "double"}));
        assert_eq!(p["f4"], json!({"type": "float"}));
        assert_eq!(p["n"], json!({"type": "double"}));
        assert_eq!(p["n10_2"], json!({"type": "double"}));
        assert_eq!(p["n12_0"], json!({"type": "long"}));
        assert_eq!(p["txt"]["type"], "text");
        assert_eq!(p["txt"]["fields"]["keyword"]["type"], "keyword");
        assert_eq!(p["b"], json!({"type": "binary"}));
        assert_eq!(p["ip"], json!({"type": "ip"}));
        assert_eq!(p["net"], json!({"type": "ip_range"}));
        assert_eq!(p["j"], json!({"type": "flat_object"}));
        assert_eq!(p["tstz"], json!({"type": "date", "format": DATE_FORMAT}));
        assert_eq!(p["tags"]["type"], "text");
        assert!(
            p.get("odd").is_none(),
            "unknown types are left to the templates"
        );
        let mut special: Vec<&String> = p[SPECIAL_FIELD]["properties"]
            .as_object()
            .unwrap()
            .keys()
            .collect();
        special.sort();
        assert_eq!(
            special,
            ["d", "f4", "f8", "ip", "j", "n", "n10_2", "n12_0", "ts", "tstz"]
        );
        assert_eq!(m["date_detection"], false);
        assert_eq!(m["numeric_detection"], false);

        let keyword = MappingOptions {
            numeric: NumericMapping::Keyword,
            json: JsonMapping::Object,
            flavor: Flavor::Elasticsearch,
        };
        let p = properties(&every_type(), &keyword);
        assert_eq!(p["n"]["type"], "keyword");
        assert_eq!(p["j"], json!({"type": "object", "dynamic": true}));
        assert!(p[SPECIAL_FIELD]["properties"].get("n").is_none());
        let flat_es = MappingOptions {
            flavor: Flavor::Elasticsearch,
            ..Default::default()
        };
        assert_eq!(
            properties(&every_type(), &flat_es)["j"],
            json!({"type": "flattened"})
        );
        let scaled = MappingOptions {
            numeric: NumericMapping::ScaledFloat,
            ..Default::default()
        };
        assert_eq!(
            properties(&every_type(), &scaled)["n10_2"],
            json!({"type": "scaled_float", "scaling_factor": 100.0})
        );
    }

    #[test]
    fn special_values_leave_the_field_and_keep_their_text() {
        let t = every_type();
        let row = vec![
            Value::Int64(1),
            Value::Float64(f64::INFINITY),
            Value::Float32(f32::NAN),
            Value::Numeric(Numeric::NaN),
            Value::Numeric(Numeric::Finite("12.50".into())),
            Value::Numeric(Numeric::Finite("1e400".into())),
            Value::Text("x".into()),
            Value::Bytes(vec![0, 255]),
            Value::Network("10.0.0.1/8".into()),
            Value::Network("10.0.0.0/8".into()),
            Value::Json("[1, 2]".into()),
            Value::Date(DATE_INFINITY),
            Value::Timestamp(TIMESTAMP_NEG_INFINITY),
            Value::TimestampTz(1_700_000_000_123_456),
            Value::Array(vec![Value::Text("a".into()), Value::Null]),
            Value::Text("'a' 'b'".into()),
        ];
        let doc = document(&t, &row, &MappingOptions::default());
        assert_eq!(
            doc,
            json!({
                "id": 1, "n10_2": "12.50", "txt": "x", "b": "AP8=", "net": "10.0.0.0/8",
                "tstz": "2023-11-14T22:13:20.123456Z", "tags": ["a", null], "odd": "'a' 'b'",
                SPECIAL_FIELD: {
                    "f8": "Infinity", "f4": "NaN", "n": "NaN", "n12_0": "1e400", "ip": "10.0.0.1/8",
                    "j": "[1, 2]", "d": "infinity", "ts": "-infinity"
                }
            })
        );
    }

    #[test]
    fn relayed_json_forms_render_like_typed_values() {
        let t = every_type();
        let typed = vec![
            Value::Int64(1),
            Value::Float64(0.1 + 0.2),
            Value::Float32(1.5),
            Value::Numeric(Numeric::PositiveInfinity),
            Value::Numeric(Numeric::Finite("-3.25".into())),
            Value::Null,
            Value::Text("x".into()),
            Value::Bytes(vec![1]),
            Value::Network("::1".into()),
            Value::Network("::/0".into()),
            Value::Json(r#"{"a": {"b": 1}}"#.into()),
            Value::Date(-719_528 - 365 * 44),
            Value::Timestamp(-62_135_596_800_000_000 - 1),
            Value::TimestampTz(TIMESTAMP_INFINITY),
            Value::Array(vec![]),
            Value::Unavailable,
        ];
        let opts = MappingOptions::default();
        let jo = JsonOptions::default();
        // The relay rebuilds values from the JSON the capture wrote.
        let relayed: Vec<Value> = typed
            .iter()
            .map(|v| match json_value(v, &jo) {
                Json::Null => Value::Null,
                Json::Number(n) => n
                    .as_i64()
                    .map(Value::Int64)
                    .unwrap_or(Value::Float64(n.as_f64().unwrap())),
                Json::String(s) if s == walcast_sdk::json::DEFAULT_UNAVAILABLE_PLACEHOLDER => {
                    Value::Unavailable
                }
                Json::String(s) => Value::Text(s),
                Json::Array(_) => Value::Array(vec![]),
                other => panic!("{other}"),
            })
            .collect();
        let a = document(&t, &typed, &opts);
        assert_eq!(a, document(&t, &relayed, &opts));
        assert_eq!(a["f8"].to_string(), "0.30000000000000004");
        assert!(a["d"].as_str().unwrap().starts_with("-004"), "{}", a["d"]);
        assert_eq!(a["ts"], "0000-12-31T23:59:59.999999");
        assert_eq!(a["j"], json!({"a": {"b": 1}}));
        assert_eq!(
            a[SPECIAL_FIELD],
            json!({"n": "Infinity", "tstz": "infinity"})
        );
        assert!(a.get("odd").is_none());
        assert_eq!(iso_year(10_000), "+10000");
    }

    /// A relayed timestamptz (the JSON encoder's text, `-043-03-15...` for
    /// 44 BC) gets the same ISO 8601 expanded year as a captured one: the
    /// date field refuses the encoder's form, and the document went to the
    /// dead letter.
    #[test]
    fn relayed_timestamptz_outside_four_digit_years_render_like_typed_ones() {
        let t = table(&[("id", PgType::Int8), ("tstz", PgType::TimestampTz)]);
        let opts = MappingOptions::default();
        // 44 BC (year -43), 1 BC (year 0), 200000 AD, and an ordinary one.
        for micros in [
            -63_517_910_400_000_000i64,
            -62_167_219_200_000_000,
            6_249_254_716_800_000_000,
            1_700_000_000_123_456,
        ] {
            let typed = document(&t, &[Value::Int64(1), Value::TimestampTz(micros)], &opts);
            let text = walcast_sdk::json::timestamp_utc(micros);
            let relayed = document(&t, &[Value::Int64(1), Value::Text(text.clone())], &opts);
            assert_eq!(typed, relayed, "{text}");
            let s = relayed["tstz"].as_str().unwrap();
            let year = s.split("-").find(|p| !p.is_empty()).unwrap();
            assert!(year.len() >= 4, "{s}");
        }
        let typed = document(
            &t,
            &[Value::Int64(1), Value::TimestampTz(-63_517_910_400_000_000)],
            &opts,
        );
        assert!(
            typed["tstz"].as_str().unwrap().starts_with("-0043-"),
            "{}",
            typed["tstz"]
        );
    }

    #[test]
    fn diff_adds_missing_fields_and_reports_changed_types() {
        let opts = MappingOptions::default();
        let old = properties(&table(&[("id", PgType::Int8), ("v", PgType::Int4)]), &opts);
        let new = properties(
            &table(&[
                ("id", PgType::Int8),
                ("v", PgType::Float8),
                ("w", PgType::Date),
            ]),
            &opts,
        );
        let d = diff(&old, &new);
        let mut missing: Vec<&String> = d.missing.keys().collect();
        missing.sort();
        assert_eq!(missing, [SPECIAL_FIELD, "w"]);
        let mut special: Vec<&String> = d.missing[SPECIAL_FIELD]["properties"]
            .as_object()
            .unwrap()
            .keys()
            .collect();
        special.sort();
        assert_eq!(special, ["v", "w"]);
        assert_eq!(
            d.conflicts,
            vec![Conflict {
                field: "v".into(),
                existing: "integer".into(),
                wanted: "double".into()
            }]
        );
        assert_eq!(diff(&new, &new), MappingDiff::default());
        assert_eq!(
            Flavor::from_root(&json!({"version": {"distribution": "opensearch"}})),
            Flavor::OpenSearch
        );
        assert_eq!(
            Flavor::from_root(&json!({"version": {"number": "8.15.0"}})),
            Flavor::Elasticsearch
        );
    }
}
