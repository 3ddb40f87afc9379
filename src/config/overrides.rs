//! Merging TOML into a config's table: a config file's sections, or one
//! `--set section.key=value`. A key the config does not have, or a value of
//! the wrong TOML type, is refused with the key named.

use crate::{Error, Result};

fn known_keys(t: &toml::Table) -> String {
    let mut k: Vec<&str> = t.keys().map(String::as_str).collect();
    k.sort();
    k.join(", ")
}

/// Merge `src` into `dst`, refusing keys that `dst` does not have.
pub(super) fn merge_checked(
    dst: &mut toml::Table,
    src: &toml::Table,
    prefix: &str,
    origin: &str,
) -> Result<()> {
    for (k, v) in src {
        let path = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        if prefix.is_empty() && k == "preset" {
            continue;
        }
        let Some(slot) = dst.get_mut(k) else {
            return Err(Error::config(
                path,
                format!(
                    "unknown key in {origin} (known keys here: {})",
                    known_keys(dst)
                ),
            ));
        };
        match (slot, v) {
            (toml::Value::Table(d), toml::Value::Table(s)) => merge_checked(d, s, &path, origin)?,
            (toml::Value::Table(_), _) => {
                return Err(Error::config(
                    path,
                    format!("in {origin}: expected a [section], found a value"),
                ))
            }
            (slot, v) => {
                check_type(slot, v, &path, origin)?;
                *slot = coerce(slot, v.clone());
            }
        }
    }
    Ok(())
}

fn coerce(slot: &toml::Value, v: toml::Value) -> toml::Value {
    // `lr = 1` means 1.0 where a float is expected.
    match (slot, &v) {
        (toml::Value::Float(_), toml::Value::Integer(i)) => toml::Value::Float(*i as f64),
        _ => v,
    }
}

fn check_type(slot: &toml::Value, v: &toml::Value, path: &str, origin: &str) -> Result<()> {
    let ok = matches!(
        (slot, v),
        (toml::Value::Float(_), toml::Value::Integer(_))
            | (toml::Value::Float(_), toml::Value::Float(_))
    ) || std::mem::discriminant(slot) == std::mem::discriminant(v);
    if ok {
        Ok(())
    } else {
        Err(Error::config(
            path,
            format!(
                "in {origin}: expected a {}, found {} `{v}`",
                slot.type_str(),
                v.type_str()
            ),
        ))
    }
}

/// Apply one `section.key=value` override. The value is parsed as TOML
/// (`2`, `0.1`, `true`, `"x"`), falling back to a bare string.
pub fn apply_set(table: &mut toml::Table, set: &str) -> Result<()> {
    let origin = format!("--set {set}");
    let Some((key, raw)) = set.split_once('=') else {
        return Err(Error::config(set, "expected --set section.key=value"));
    };
    let key = key.trim();
    let raw = raw.trim();
    let value: toml::Value = toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()));
    let parts: Vec<&str> = key.split('.').collect();
    let mut src = toml::Table::new();
    let mut cur = &mut src;
    for (i, p) in parts.iter().enumerate() {
        if i + 1 == parts.len() {
            cur.insert(p.to_string(), value.clone());
        } else {
            cur = cur
                .entry(p.to_string())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()))
                .as_table_mut()
                .expect("fresh table");
        }
    }
    merge_checked(table, &src, "", &origin)
}
