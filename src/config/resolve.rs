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
        let file_preset = file_table
            .as_ref()
            .and_then(|t| t.get("preset"))
            .and_then(|v| v.as_str())
            .map(str::to_string);
        let name = preset
            .map(str::to_string)
            .or(file_preset)
            .unwrap_or_else(|| "tiny".into());
        let mut table = Config::preset(&name)?.to_table();
        if let (Some(t), Some(p)) = (&file_table, file) {
            merge_checked(&mut table, t, "", &p.display().to_string())?;
        }
        table.insert("preset".into(), toml::Value::String(name));
        Config::with_overrides(table, sets)
    }

    /// The config of a resumed run: the run's saved `config.toml` with `sets`
    /// applied. Only `[train]`-side keys may change; a change to `[model]` or
    /// `[data]` is refused (the checkpoint and the token cache depend on them).
    pub fn resume(saved_path: &Path, sets: &[String]) -> Result<Config> {
        let saved = Config::from_toml_file(saved_path)?;
        let cfg = Config::with_overrides(saved.to_table(), sets)?;
        if cfg.model != saved.model || cfg.data != saved.data {
            return Err(Error::config(
                "--resume",
                format!(
                    "cannot change [model] or [data] keys of {} (only [train] keys)",
                    saved_path.display()
                ),
            ));
        }
        Ok(cfg)
    }

    /// The config as TOML text.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("config serialises")
    }

    /// Parse a resolved config written by [`Config::to_toml`].
    pub fn from_toml_file(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let c: Config = toml::from_str(&text).map_err(|e| Error::bad_file(path, e.to_string()))?;
        c.validate()?;
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

/// A TOML file as a table; errors name the file.
fn read_table(path: &Path) -> Result<toml::Table> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    toml::from_str(&text).map_err(|e| Error::bad_file(path, format!("not valid TOML: {e}")))
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
