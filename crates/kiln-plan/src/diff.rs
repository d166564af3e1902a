//! Field-level differences between two serialisable values.
//!
//! Used for `kiln diff A B` (two generations) and to name the field that
//! forced a replacement (two instance specs). Both sides are plain data
//! models with canonical serialisations, so comparing their JSON trees
//! compares the models themselves.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// One changed leaf: a dotted path and the values on each side (`None` where
/// the field is absent).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    pub path: String,
    pub old: Option<Value>,
    pub new: Option<Value>,
}

/// Every leaf that differs between `old` and `new`, in path order.
pub fn diff_values<T: Serialize>(old: &T, new: &T) -> Vec<Change> {
    let old = serde_json::to_value(old).expect("serialises");
    let new = serde_json::to_value(new).expect("serialises");
    let mut out = Vec::new();
    walk(String::new(), Some(&old), Some(&new), &mut out);
    out
}

fn join(prefix: &str, key: &str) -> String {
    let plain = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    match (prefix.is_empty(), plain) {
        (true, true) => key.to_owned(),
        (true, false) => format!("{key:?}"),
        (false, true) => format!("{prefix}.{key}"),
        (false, false) => format!("{prefix}.{key:?}"),
    }
}

fn walk(path: String, old: Option<&Value>, new: Option<&Value>, out: &mut Vec<Change>) {
    match (old, new) {
        (Some(Value::Object(a)), Some(Value::Object(b))) => {
            let keys: BTreeSet<&String> = a.keys().chain(b.keys()).collect();
            for key in keys {
                walk(join(&path, key), a.get(key), b.get(key), out);
            }
        }
        (Some(a), Some(b)) if a == b => {}
        (Some(Value::Null), None) | (None, Some(Value::Null)) => {}
        (a, b) => out.push(Change {
            path,
            old: a.filter(|v| !v.is_null()).cloned(),
            new: b.filter(|v| !v.is_null()).cloned(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reports_leaves_with_dotted_paths() {
        let a = json!({"env": {"A": "1", "B": "2"}, "image": "x", "files": {"/etc/a.toml": "d1"}});
        let b = json!({"env": {"A": "1", "C": "3"}, "image": "y", "files": {"/etc/a.toml": "d2"}});
        let paths: Vec<String> = diff_values(&a, &b).into_iter().map(|c| c.path).collect();
        assert_eq!(paths, ["env.B", "env.C", "files.\"/etc/a.toml\"", "image"]);
    }

    #[test]
    fn equal_values_have_no_changes() {
        let a = json!({"x": [1, 2], "y": {"z": null}});
        assert!(diff_values(&a, &a.clone()).is_empty());
    }
}
