//! From presets, files and overrides to a checked [`Config`], and back to TOML.
//!
//! Every way in goes through one table: a preset (or a run's saved config)
//! serialised to TOML, the config file merged into it, then the `--set`
//! overrides, then typed and validated.

use super::overrides::{apply_set, merge_checked};
use super::Config;
use crate::{Error, Result};
use std::path::Path;

impl Config {
    /// Resolve preset < file < overrides. `preset` = None uses the file's
    /// `preset` key, else `tiny`.
    pub fn resolve(preset: Option<&str>, file: Option<&Path>, sets: &[String]) -> Result<Config> {
        let file_table = file.map(read_table).transpose()?;
        Self::resolve_table(preset, file_table.zip(file), sets)
    }

    /// [`Config::resolve`] with the config file given as its text; `path`
    /// only names the file in errors.
    pub fn resolve_text(
        preset: Option<&str>,
        text: &str,
        path: &Path,
        sets: &[String],
    ) -> Result<Config> {
        let table = parse_table(text, path)?;
        Self::resolve_table(preset, Some((table, path)), sets)
    }

    /// [`Config::resolve`] on the parsed file (and its path, for errors).
    fn resolve_table(
        preset: Option<&str>,
        file: Option<(toml::Table, &Path)>,
        sets: &[String],
    ) -> Result<Config> {
        let file_preset = file
            .as_ref()
            .and_then(|(t, _)| t.get("preset"))
            .and_then(|v| v.as_str())
            .map(str::to_string);
        let name = preset
            .map(str::to_string)
            .or(file_preset)
            .unwrap_or_else(|| "tiny".into());
        let mut table = Config::preset(&name)?.to_table();
        if let Some((t, p)) = &file {
            merge_checked(&mut table, t, "", &p.display().to_string())?;
        }
        table.insert("preset".into(), toml::Value::String(name));
        Config::with_overrides(table, sets)
    }

    /// The config of a resumed run: the run's saved `config.toml` with `sets`
    /// applied. A change to `[model]` is refused (the checkpoint depends on
    /// it), naming each key; `[data]` may change when the token stream stays
    /// the same, which training checks.
    pub fn resume(saved_path: &Path, sets: &[String]) -> Result<Config> {
        let saved = Config::from_toml_file(saved_path)?;
        let cfg = Config::with_overrides(saved.to_table(), sets)?;
        let changed: Vec<String> = saved
            .differences(&cfg)
            .into_iter()
            .filter(|(k, _, _)| k.starts_with("model."))
            .map(|(k, was, now)| format!("{k} ({was} in the run, {now} asked)"))
            .collect();
        if !changed.is_empty() {
            return Err(Error::config(
                "--resume",
                format!(
                    "cannot change [model] keys of {}: {}; only [train] keys (and [data] keys that give the same tokens) may change",
                    saved_path.display(),
                    changed.join(", ")
                ),
            ));
        }
        Ok(cfg)
    }

    /// The keys whose values differ between `self` and `other`, as
    /// (`section.key`, value in `self`, value in `other`).
    pub fn differences(&self, other: &Config) -> Vec<(String, String, String)> {
        let (a, b) = (flatten(&self.to_table()), flatten(&other.to_table()));
        let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
        keys.sort();
        keys.dedup();
        let show = |v: Option<&toml::Value>| v.map_or("(unset)".into(), |v| v.to_string());
        keys.into_iter()
            .filter(|k| a.get(*k) != b.get(*k))
            .map(|k| (k.clone(), show(a.get(k)), show(b.get(k))))
            .collect()
    }

    /// The config as TOML text.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("config serialises")
    }

    /// Parse a resolved config written by [`Config::to_toml`].
    pub fn from_toml_file(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_toml_text(&text, path)
    }

    /// [`Config::from_toml_file`] on the file's text; `path` only names the
    /// file in errors.
    pub fn from_toml_text(text: &str, path: &Path) -> Result<Config> {
        let table: toml::Table =
            toml::from_str(text).map_err(|e| Error::bad_file(path, e.to_string()))?;
        // Through the table, so that a bad value names its key (and the file).
        let c = from_table(table).map_err(|e| Error::bad_file(path, e.to_string()))?;
        c.validate()
            .map_err(|e| Error::bad_file(path, e.to_string()))?;
        Ok(c)
    }

    fn to_table(&self) -> toml::Table {
        toml::Table::try_from(self).expect("config serialises")
    }

    /// `table` with `sets` applied, typed, completed and validated.
    fn with_overrides(mut table: toml::Table, sets: &[String]) -> Result<Config> {
        for s in sets {
            apply_set(&mut table, s)?;
        }
        let mut cfg = from_table(table)?;
        // Loss-free balancing needs the per-expert bias; asking for it switches it on.
        cfg.model.balance_bias |= cfg.reg.loss_free_gamma > 0.0;
        cfg.validate()?;
        Ok(cfg)
    }
}

/// A table's values by dotted key (`model.d_model`).
fn flatten(table: &toml::Table) -> std::collections::BTreeMap<String, toml::Value> {
    let mut out = std::collections::BTreeMap::new();
    for (k, v) in table {
        match v {
            toml::Value::Table(t) => {
                for (sub, v) in flatten(t) {
                    out.insert(format!("{k}.{sub}"), v);
                }
            }
            v => {
                out.insert(k.clone(), v.clone());
            }
        }
    }
    out
}

/// A TOML file as a table; errors name the file.
fn read_table(path: &Path) -> Result<toml::Table> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    parse_table(&text, path)
}

/// A TOML file's text as a table; errors name the file.
fn parse_table(text: &str, path: &Path) -> Result<toml::Table> {
    toml::from_str(text).map_err(|e| Error::bad_file(path, format!("not valid TOML: {e}")))
}

/// Type a merged table. The keys are all known by now (the merge checked
/// them), so what can fail is a value, e.g. `train.engine = "jit"`: toml ends
/// such an error with a line ``in `train.engine` ``, which becomes the error's field.
fn from_table(table: toml::Table) -> Result<Config> {
    toml::Value::Table(table)
        .try_into()
        .map_err(|e: toml::de::Error| {
            let text = e.to_string();
            match text.trim_end().rsplit_once("\nin `") {
                Some((msg, key)) => Error::config(key.trim_end_matches('`'), msg),
                None => Error::config("config", text.trim_end()),
            }
        })
}
