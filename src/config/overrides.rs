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
    if prefix.is_empty() {
        refuse_steps_with_tokens(dst, origin)?;
    }
    Ok(())
}

/// Refuse `train.max_steps` together with `train.max_tokens`: the token
/// budget decides the length, so the steps would be silently ignored.
/// `max_steps` at 0 or at the preset's default counts as not given.
fn refuse_steps_with_tokens(table: &toml::Table, origin: &str) -> Result<()> {
    let train = table.get("train").and_then(toml::Value::as_table);
    let get = |k: &str| {
        train
            .and_then(|t| t.get(k))
            .and_then(toml::Value::as_integer)
    };
    let (Some(steps), Some(tokens)) = (get("max_steps"), get("max_tokens")) else {
        return Ok(());
    };
    let preset = table
        .get("preset")
        .and_then(toml::Value::as_str)
        .unwrap_or("tiny");
    let default = super::Config::preset(preset).map_or(0, |c| c.train.max_steps as i64);
    if tokens > 0 && steps != 0 && steps != default {
        return Err(Error::config(
            "train.max_steps",
            format!(
                "in {origin}: given with train.max_tokens = {tokens}, which decides the run's \
                 length; set only one of them (train.max_steps = 0, or the preset's {default}, \
                 leaves the length to max_tokens)"
            ),
        ));
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
    if set.contains(['\n', '\r']) {
        return Err(Error::config(
            key,
            format!("{origin:?}: a line break in --set; give the value on one line"),
        ));
    }
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

#[cfg(test)]
mod tests {
    use crate::config::Config;

    fn resolve(sets: &[&str]) -> crate::Result<Config> {
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        Config::resolve(Some("small"), None, &sets)
    }

    #[test]
    fn max_steps_with_max_tokens_is_refused_naming_both() {
        let e = resolve(&["train.max_steps=500", "train.max_tokens=100000"]).unwrap_err();
        let e = e.to_string();
        assert!(
            e.contains("train.max_steps") && e.contains("train.max_tokens"),
            "{e}"
        );
        let e = resolve(&["train.max_tokens=100000", "train.max_steps=500"]).unwrap_err();
        assert!(e.to_string().contains("train.max_tokens = 100000"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(&p, "[train]\nmax_steps = 7\nmax_tokens = 9000\n").unwrap();
        let e = Config::resolve(None, Some(&p), &[])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("c.toml") && e.contains("train.max_tokens"),
            "{e}"
        );
        // max_tokens alone (the preset's max_steps), or with max_steps = 0, is fine.
        assert!(resolve(&["train.max_tokens=100000"]).is_ok());
        assert!(resolve(&["train.max_tokens=100000", "train.max_steps=0"]).is_ok());
        assert!(resolve(&["train.max_steps=500", "train.max_tokens=0"]).is_ok());
    }

    #[test]
    fn a_line_break_in_set_is_refused() {
        for set in ["train.max_steps=5\n[model]", "train.seed=1\r\n"] {
            let e = resolve(&[set]).unwrap_err().to_string();
            assert!(e.contains("line break") && e.contains("train."), "{e}");
        }
    }
}
