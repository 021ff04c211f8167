//! Comparing what Debezium and walcast published, for the Debezium
//! compatibility tests (tests/debezium.rs, tests/debezium_avro.rs on a
//! fixed workload; tests/debezium_generated.rs on the oracle's generated
//! ones): values and Avro schemas compared recursively, both ways, each
//! difference named by its path; lists of deliberate differences that
//! remember which entries were used.

use std::collections::BTreeSet;

use serde_json::Value;

/// Compares two values (decoded events, JSON or Avro schemas) recursively;
/// pushes one line per difference, naming its path. A field present on
/// one side and absent on the other is a difference (an absent field is
/// not read as null), in both directions.
pub fn compare_values(path: &str, d: Option<&Value>, w: Option<&Value>, out: &mut Vec<String>) {
    match (d, w) {
        (None, None) => {}
        (Some(d), None) => out.push(format!(
            "{path}: only in debezium (= {d}), missing from walcast"
        )),
        (None, Some(w)) => out.push(format!(
            "{path}: only in walcast (= {w}), missing from debezium"
        )),
        (Some(Value::Object(d)), Some(Value::Object(w))) => {
            let mut keys: Vec<&String> = d.keys().chain(w.keys()).collect();
            keys.sort();
            keys.dedup();
            for k in keys {
                compare_values(&format!("{path}.{k}"), d.get(k), w.get(k), out);
            }
        }
        (Some(d), Some(w)) => {
            if d != w {
                out.push(format!("{path}: debezium={d} walcast={w}"));
            }
        }
    }
}

/// Compares two Avro schemas: attributes other than walcast's own
/// (`walcast.*`), union branches, array items, and record fields by name
/// (their order apart, as `PATH.fields: order`).
pub fn compare_schema(path: &str, d: &Value, w: &Value, out: &mut Vec<String>) {
    match (d, w) {
        (Value::Array(d), Value::Array(w)) if d.len() == w.len() => {
            for (i, (d, w)) in d.iter().zip(w).enumerate() {
                // A union's non-null branch keeps the field's path.
                let p = if d == "null" && w == "null" {
                    format!("{path}[{i}]")
                } else {
                    path.to_string()
                };
                compare_schema(&p, d, w, out);
            }
        }
        (Value::Object(d), Value::Object(w)) => {
            let mut keys: Vec<&String> = d
                .keys()
                .chain(w.keys())
                .filter(|k| !k.starts_with("walcast."))
                .collect();
            keys.sort();
            keys.dedup();
            for k in keys {
                let p = format!("{path}.{k}");
                match (k.as_str(), d.get(k), w.get(k)) {
                    ("fields", Some(Value::Array(df)), Some(Value::Array(wf))) => {
                        compare_fields(path, df, wf, out)
                    }
                    // A field's type keeps the field's path.
                    ("type" | "items", Some(d), Some(w)) => compare_schema(path, d, w, out),
                    (_, d, w) => compare_values(&p, d, w, out),
                }
            }
        }
        _ => {
            if d != w {
                out.push(format!("{path}: debezium={d} walcast={w}"));
            }
        }
    }
}

fn compare_fields(path: &str, df: &[Value], wf: &[Value], out: &mut Vec<String>) {
    let names = |f: &[Value]| -> Vec<String> {
        f.iter()
            .map(|f| f["name"].as_str().unwrap_or("?").to_string())
            .collect()
    };
    let (dn, wn) = (names(df), names(wf));
    let (mut ds, mut ws) = (dn.clone(), wn.clone());
    ds.sort();
    ws.sort();
    if ds == ws && dn != wn {
        out.push(format!(
            "{path}.fields: order debezium={dn:?} walcast={wn:?}"
        ));
    }
    let mut all = dn.clone();
    all.extend(wn.iter().filter(|n| !dn.contains(n)).cloned());
    for n in all {
        let d = df.iter().find(|f| f["name"] == n.as_str());
        let w = wf.iter().find(|f| f["name"] == n.as_str());
        match (d, w) {
            (Some(d), Some(w)) => compare_schema(&format!("{path}.{n}"), d, w, out),
            (Some(_), None) => out.push(format!("{path}.{n}: field only in debezium")),
            (None, Some(_)) => out.push(format!("{path}.{n}: field only in walcast")),
            (None, None) => {}
        }
    }
}

/// A list of deliberate differences: (path fragment, why). A difference
/// is forgiven when its path contains a fragment; the entries used are
/// remembered, so that a test can fail on an entry nothing matched (the
/// difference is gone: remove it from the list and from the docs).
pub struct Known {
    list: &'static [(&'static str, &'static str)],
    seen: BTreeSet<&'static str>,
}

impl Known {
    pub fn new(list: &'static [(&'static str, &'static str)]) -> Self {
        Known {
            list,
            seen: BTreeSet::new(),
        }
    }

    /// Whether `path` is a listed difference.
    pub fn forgives(&mut self, path: &str) -> bool {
        match self.list.iter().find(|(p, _)| path.contains(p)) {
            Some((p, _)) => {
                self.seen.insert(p);
                true
            }
            None => false,
        }
    }

    /// The entries no difference matched, with their reasons.
    pub fn unused(&self) -> Vec<(&'static str, &'static str)> {
        self.list
            .iter()
            .filter(|(p, _)| !self.seen.contains(p))
            .copied()
            .collect()
    }
}
