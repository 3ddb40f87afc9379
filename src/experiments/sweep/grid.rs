//! The axes of a sweep's grid: their values, checked to be distinct, and the
//! labels that make up run ids, unique within each axis.

use crate::{Error, Result};
use sha2::{Digest, Sha256};
use toml::de::{DeTable, DeValue};

/// One grid key and its listed values, with each value's label in run ids.
pub(super) struct Axis {
    pub key: String,
    pub values: Vec<toml::Value>,
    pub labels: Vec<String>,
}

/// Whether two values are the same value: numbers compare as numbers (`0.1`
/// and `0.10`, `0.001` and `1e-3`, `1` and `1.0`), tables key by key.
pub fn same_value(a: &serde_json::Value, b: &serde_json::Value) -> bool {
    use serde_json::Value::*;
    match (a, b) {
        (Number(x), Number(y)) => match (x.as_f64(), y.as_f64()) {
            (Some(x), Some(y)) => x == y || (x.is_nan() && y.is_nan()),
            _ => x == y,
        },
        (Array(x), Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(x, y)| same_value(x, y))
        }
        (Object(x), Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| same_value(v, w)))
        }
        _ => a == b,
    }
}

pub(super) fn to_json(v: &toml::Value) -> serde_json::Value {
    serde_json::to_value(v).unwrap_or(serde_json::Value::Null)
}

/// Refuse a grid list that holds one value twice (two runs would be one).
/// `spellings` are the values as the sweep file writes them, when known.
pub(super) fn refuse_equal_values(
    key: &str,
    values: &[toml::Value],
    spellings: Option<Vec<String>>,
) -> Result<()> {
    let json: Vec<serde_json::Value> = values.iter().map(to_json).collect();
    for j in 1..json.len() {
        if let Some(i) = (0..j).find(|&i| same_value(&json[i], &json[j])) {
            let spell = |n: usize| {
                spellings
                    .as_ref()
                    .and_then(|s| s.get(n).cloned())
                    .unwrap_or_else(|| values[n].to_string())
            };
            return Err(Error::config(
                format!("grid.{key}"),
                format!(
                    "values {} and {} (entries {} and {}) are the same value, so their runs \
                     would be one; list each value once",
                    spell(i),
                    spell(j),
                    i + 1,
                    j + 1
                ),
            ));
        }
    }
    Ok(())
}

/// The values listed under grid key `key` as `text` (a sweep file) spells
/// them, or None when the file does not list them plainly.
pub(super) fn grid_spellings(text: &str, key: &str) -> Option<Vec<String>> {
    let doc = DeTable::parse(text).ok()?;
    let grid = lookup(doc.get_ref(), "grid")?;
    let list = lookup(grid.get_ref().as_table()?, key)?;
    let items = list.get_ref().as_array()?;
    Some(
        items
            .iter()
            .map(|v| text.get(v.span()).unwrap_or_default().to_string())
            .collect(),
    )
}

/// The value at dotted `path` in `table` (`a.b` is a key `"a.b"` or `b` in table `a`).
fn lookup<'a, 'i>(table: &'a DeTable<'i>, path: &str) -> Option<&'a toml::Spanned<DeValue<'i>>> {
    table.iter().find_map(|(k, v)| {
        let k = k.get_ref().as_ref();
        if k == path {
            return Some(v);
        }
        let rest = path.strip_prefix(k)?.strip_prefix('.')?;
        lookup(v.get_ref().as_table()?, rest)
    })
}

/// A value as it may appear in a run id: letters, digits, `.` and `-`, at
/// most the last 40 characters.
pub(super) fn value_label(v: &toml::Value) -> String {
    let s = match v {
        toml::Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let s: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect();
    let s = s.trim_matches('-').to_string();
    if s.len() > 40 {
        s[s.len() - 40..].to_string()
    } else {
        s
    }
}

/// Append a short hash of its value to every label that another value's label
/// equals (ignoring case, for case-insensitive file systems): `d/x.txt` and
/// `d_x.txt` both read `d-x.txt`. Labels that differ stay as they are, so the
/// ids of existing sweeps do not change.
pub(super) fn disambiguate(key: &str, values: &[toml::Value], labels: &mut [String]) -> Result<()> {
    let lower: Vec<String> = labels.iter().map(|l| l.to_lowercase()).collect();
    for (i, label) in labels.iter_mut().enumerate() {
        if lower.iter().filter(|l| **l == lower[i]).count() > 1 {
            let hash = Sha256::digest(values[i].to_string().as_bytes());
            let hex: String = hash[..4].iter().map(|b| format!("{b:02x}")).collect();
            *label = format!("{label}-{hex}");
        }
    }
    let mut seen = std::collections::HashSet::new();
    match labels.iter().find(|l| !seen.insert(l.to_lowercase())) {
        Some(l) => Err(Error::config(
            format!("grid.{key}"),
            format!("two values give the same run id part `{l}`; change one of them"),
        )),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toml_list(s: &str) -> Vec<toml::Value> {
        let t: toml::Table = toml::from_str(&format!("v = {s}")).unwrap();
        t["v"].as_array().unwrap().clone()
    }

    #[test]
    fn equal_numbers_are_one_value() {
        for list in ["[0.1, 0.10]", "[0.001, 1e-3]", "[1, 1.0]", "[\"a\", \"a\"]"] {
            let e = refuse_equal_values("reg.orth_lambda", &toml_list(list), None);
            let e = e.unwrap_err().to_string();
            assert!(e.contains("grid.reg.orth_lambda"), "{e}");
        }
        assert!(refuse_equal_values("k", &toml_list("[0.1, 0.01, \"0.1\"]"), None).is_ok());
    }

    #[test]
    fn the_error_quotes_the_file_spellings() {
        let text = "[grid]\n\"train.seed\" = [0]\n[grid.reg]\north_lambda = [0.001, 0.1, 1e-3]\n";
        let s = grid_spellings(text, "reg.orth_lambda").unwrap();
        assert_eq!(s, ["0.001", "0.1", "1e-3"]);
        let e = refuse_equal_values("reg.orth_lambda", &toml_list("[0.001, 0.1, 1e-3]"), Some(s));
        let e = e.unwrap_err().to_string();
        assert!(
            e.contains("0.001 and 1e-3") && e.contains("entries 1 and 3"),
            "{e}"
        );
        assert_eq!(grid_spellings(text, "train.seed").unwrap(), ["0"]);
    }

    #[test]
    fn colliding_labels_get_a_hash_and_others_keep_theirs() {
        let values = toml_list("[\"d/x.txt\", \"d_x.txt\", \"y.txt\", \"D-X.txt\"]");
        let mut labels: Vec<String> = values.iter().map(value_label).collect();
        disambiguate("data.path", &values, &mut labels).unwrap();
        assert_eq!(labels[2], "y.txt");
        assert!(labels[0].starts_with("d-x.txt-") && labels[0].len() == 16);
        let unique: std::collections::HashSet<_> =
            labels.iter().map(|l| l.to_lowercase()).collect();
        assert_eq!(unique.len(), 4);
        let mut again: Vec<String> = values.iter().map(value_label).collect();
        disambiguate("data.path", &values, &mut again).unwrap();
        assert_eq!(labels, again, "stable");
    }
}
