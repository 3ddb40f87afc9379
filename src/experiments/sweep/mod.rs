//! Sweeps: the cartesian product of listed values over any config key, run as
//! worker processes (locally or as a Slurm job array), resumable, with every
//! run's outcome recorded.
//!
//! A sweep file:
//!
//! ```toml
//! name = "lambda"
//! preset = "tiny"                 # base preset (optional)
//! base = "configs/small-ptb.toml" # base config file, relative to this file (optional)
//!
//! [set]                           # overrides shared by every run
//! "train.max_steps" = 200
//!
//! [report]                        # choices of the report (optional)
//! table4_lambda = 0.001           # the fixed λ Table 4 compares with λ = 0
//!
//! [grid]                          # the product of these lists, one run per combination
//! "reg.orth_lambda" = [0.0, 0.01, 0.1]
//! "train.seed" = [0, 1, 2]
//! # A list of tables is a list of variants, each setting several keys together:
//! "model" = [{ routing = "topk", top_k = 1 }, { routing = "soft" }]
//! # ... and under the key `variant`, keys of any section:
//! variant = [{ reg = { orth_lambda = 0.1 } }, { train = { weight_decay_experts = 0.0 } }]
//! ```
//!
//! Layout of the sweep folder: `sweep.toml` (the spec, with `base` made
//! absolute), `plan.json` (every run: index, id, swept values),
//! `runs/<id>/` (a normal run folder plus `cell.toml`, the swept values it
//! holds, and `status.json`),
//! `results.csv` / `results.jsonl` (one row per run).

pub mod estimate;
mod folder;
mod grid;
mod local;
mod slurm;

pub use folder::{plan, read_status, recorded_cell_matches, run_one, SweepDir};
pub use grid::same_value;
pub use local::{default_jobs, run_local, worker_command, SweepCounts};
pub use slurm::write_slurm;

use crate::config::Config;
use crate::{Error, Result};
use grid::{value_label, Axis};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// A sweep specification.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SweepSpec {
    #[serde(default = "default_name")]
    pub name: String,
    #[serde(default)]
    pub preset: Option<String>,
    /// A base config file (relative paths are relative to the sweep file).
    #[serde(default)]
    pub base: Option<String>,
    /// Dotted key -> value, shared by every run.
    #[serde(default)]
    pub set: toml::Table,
    /// Dotted key -> list of values.
    #[serde(default)]
    pub grid: toml::Table,
    /// The report's choices (`[report]`, e.g. `table4_lambda = 0.001`).
    #[serde(default)]
    pub report: crate::report::ReportOptions,
}

fn default_name() -> String {
    "sweep".into()
}

/// Whether any run of `cells` trains on a GPU (`train.device` cuda or cuda:N).
pub fn uses_gpu(cells: &[Cell]) -> bool {
    cells.iter().any(|c| {
        c.config
            .as_ref()
            .is_ok_and(|cfg| cfg.train.device.starts_with("cuda"))
    })
}

/// One run of a sweep.
#[derive(Debug, Clone, Serialize)]
pub struct Cell {
    pub index: usize,
    /// Readable id, also the folder name under `runs/`.
    pub id: String,
    /// The swept values of this run (dotted key -> value).
    pub values: serde_json::Map<String, serde_json::Value>,
    /// The resolved config, or why it could not be resolved.
    #[serde(skip)]
    pub config: std::result::Result<Config, String>,
}

/// Outcome of one run (`runs/<id>/status.json`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RunStatus {
    /// `done`, `failed` or `running`.
    pub status: String,
    pub error: Option<String>,
    pub wall_s: f64,
    pub pid: Option<u32>,
}

/// The most runs a sweep may have. A grid of 64 two-value lists overflowed
/// the count (a panic) and one of 40 aborted allocating the plan; long before
/// that, a grid this large is a mistake (every run trains a model).
pub const MAX_RUNS: usize = 100_000;

/// The product of the axes' lengths, refused above [`MAX_RUNS`].
fn count_runs(axes: &[Axis]) -> Result<usize> {
    axes.iter()
        .try_fold(1usize, |n, a| {
            n.checked_mul(a.values.len()).filter(|&n| n <= MAX_RUNS)
        })
        .ok_or_else(|| {
            Error::config(
                "grid",
                format!("its lists multiply to more than {MAX_RUNS} runs; split the sweep"),
            )
        })
}

/// Flatten nested tables into dotted keys.
fn flatten(prefix: &str, t: &toml::Table, out: &mut Vec<(String, toml::Value)>) {
    for (k, v) in t {
        let key = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        match v {
            toml::Value::Table(sub) => flatten(&key, sub, out),
            v => out.push((key, v.clone())),
        }
    }
}

/// The grid key whose variants set keys of any section: `variant = [{ reg =
/// { orth_lambda = 0.1 }, train = { weight_decay_experts = 0.0 } }, ...]`.
pub const CROSS_SECTION_KEY: &str = "variant";

/// The prefix of a variant table's keys: its grid key, or none for [`CROSS_SECTION_KEY`].
fn variant_prefix(grid_key: &str) -> &str {
    if grid_key == CROSS_SECTION_KEY {
        ""
    } else {
        grid_key
    }
}

/// A variant's label: its values ("topk-1"), or key-value pairs
/// ("act_lambda-0.1") `with_keys`; an empty variant is "none".
fn variant_label(grid_key: &str, t: &toml::Table, with_keys: bool) -> String {
    let mut inner = Vec::new();
    flatten(variant_prefix(grid_key), t, &mut inner);
    if inner.is_empty() {
        return "none".into();
    }
    inner
        .iter()
        .map(|(ik, v)| match with_keys {
            true => format!("{}-{}", ik.rsplit('.').next().unwrap_or(ik), value_label(v)),
            false => value_label(v),
        })
        .collect::<Vec<_>>()
        .join("-")
}

/// The labels of one axis's values in run ids, unique within the axis. Variant
/// labels carry their keys where values alone would not tell variants apart.
fn axis_labels(key: &str, values: &[toml::Value]) -> Result<Vec<String>> {
    let label = |v: &toml::Value, with_keys: bool| match v {
        toml::Value::Table(t) => variant_label(key, t, with_keys),
        v => value_label(v),
    };
    let variants: Vec<String> = values
        .iter()
        .filter_map(|v| v.as_table().map(|t| variant_label(key, t, false)))
        .collect();
    let mut uniq = variants.clone();
    uniq.sort();
    uniq.dedup();
    let with_keys = uniq.len() < variants.len();
    let mut labels: Vec<String> = values.iter().map(|v| label(v, with_keys)).collect();
    grid::disambiguate(key, values, &mut labels)?;
    Ok(labels)
}

/// Each axis's short name in run ids: the key's last part, or the whole key
/// (dots as dashes) where two axes share a last part.
fn short_names(axes: &[Axis]) -> Vec<String> {
    let last = |k: &str| k.rsplit('.').next().unwrap_or(k).to_string();
    axes.iter()
        .map(|a| {
            let shared = axes.iter().filter(|o| last(&o.key) == last(&a.key)).count() > 1;
            match shared {
                true => a.key.replace('.', "-"),
                false => last(&a.key),
            }
        })
        .collect()
}

impl SweepSpec {
    /// Read a sweep file; `base` is made absolute.
    pub fn from_file(path: &Path) -> Result<SweepSpec> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        SweepSpec::from_text(&text, path)
    }

    /// [`SweepSpec::from_file`] on the file's text: `path` names the file in
    /// errors, and a relative `base` is taken relative to its folder.
    pub fn from_text(text: &str, path: &Path) -> Result<SweepSpec> {
        let mut spec: SweepSpec = toml::from_str(text)
            .map_err(|e| Error::bad_file(path, format!("not a valid sweep file: {e}")))?;
        if let Some(b) = &spec.base {
            let p = Path::new(b);
            if p.is_relative() {
                let dir = path.parent().unwrap_or(Path::new("."));
                spec.base = Some(dir.join(p).display().to_string());
            }
        }
        spec.axes(Some(text))
            .map_err(|e| Error::bad_file(path, e.to_string()))?;
        Ok(spec)
    }

    /// Add `key=value` to `[set]` (the value read as TOML, else as a string).
    pub fn set_override(&mut self, kv: &str) -> Result<()> {
        let (key, value) = kv
            .split_once('=')
            .ok_or_else(|| Error::config(kv, "expected KEY=VALUE"))?;
        let key = key.trim();
        if key.is_empty() || key.contains('\n') || value.contains('\n') {
            return Err(Error::config(kv, "expected KEY=VALUE on one line"));
        }
        let value = toml::from_str::<toml::Table>(&format!("v = {value}"))
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or_else(|| toml::Value::String(value.to_string()));
        self.set.insert(key.to_string(), value);
        Ok(())
    }

    /// The grid's axes, keys sorted, values as listed; each a non-empty list
    /// of distinct values. `text`, the sweep file, lets errors quote its spellings.
    fn axes(&self, text: Option<&str>) -> Result<Vec<Axis>> {
        let mut grid = Vec::new();
        flatten("", &self.grid, &mut grid);
        grid.into_iter()
            .map(|(key, v)| match v {
                toml::Value::Array(values) if !values.is_empty() => {
                    let spellings = text.and_then(|t| grid::grid_spellings(t, &key));
                    grid::refuse_equal_values(&key, &values, spellings)?;
                    let labels = axis_labels(&key, &values)?;
                    Ok(Axis {
                        key,
                        values,
                        labels,
                    })
                }
                _ => Err(Error::config(
                    format!("grid.{key}"),
                    "must be a non-empty list of values",
                )),
            })
            .collect()
    }

    /// The number of runs: the product of the grid's list lengths, at most [`MAX_RUNS`].
    pub fn run_count(&self) -> Result<usize> {
        count_runs(&self.axes(None)?)
    }

    /// The runs of this sweep, in a fixed order (keys sorted, values as listed).
    pub fn cells(&self) -> Result<Vec<Cell>> {
        let mut sets = Vec::new();
        flatten("", &self.set, &mut sets);
        let axes = self.axes(None)?;
        let shorts = short_names(&axes);
        let total = count_runs(&axes)?;
        let base = self.base.as_ref().map(PathBuf::from);
        let mut cells = Vec::with_capacity(total);
        for index in 0..total {
            let mut rem = index;
            let mut picks = vec![0; axes.len()];
            for a in (0..axes.len()).rev() {
                picks[a] = rem % axes[a].values.len();
                rem /= axes[a].values.len();
            }
            let mut values = serde_json::Map::new();
            let mut labels = Vec::new();
            let mut all_sets: Vec<String> = sets.iter().map(|(k, v)| format!("{k}={v}")).collect();
            for (a, axis) in axes.iter().enumerate() {
                let v = &axis.values[picks[a]];
                values.insert(axis.key.clone(), grid::to_json(v));
                labels.push(format!("{}={}", shorts[a], axis.labels[picks[a]]));
                match v {
                    // A table is a variant: several keys under `key` set together.
                    toml::Value::Table(t) => {
                        let mut inner = Vec::new();
                        flatten(variant_prefix(&axis.key), t, &mut inner);
                        all_sets.extend(inner.iter().map(|(ik, iv)| format!("{ik}={iv}")));
                    }
                    v => all_sets.push(format!("{}={v}", axis.key)),
                }
            }
            let id = if labels.is_empty() {
                "run".to_string()
            } else {
                labels.join("_")
            };
            let config = Config::resolve(self.preset.as_deref(), base.as_deref(), &all_sets)
                .map_err(|e| e.to_string());
            cells.push(Cell {
                index,
                id,
                values,
                config,
            });
        }
        Ok(cells)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grid_product_ids_and_config_errors() {
        let spec: SweepSpec = toml::from_str(
            "preset = \"tiny\"\n[set]\n\"train.max_steps\" = 3\n[grid]\n\"reg.orth_lambda\" = [0.0, 0.1]\n\"train.seed\" = [0, 1, 2]\n\"model.top_k\" = [2, 99]\n",
        )
        .unwrap();
        let cells = spec.cells().unwrap();
        assert_eq!(cells.len(), 12);
        let ids: std::collections::HashSet<_> = cells.iter().map(|c| c.id.clone()).collect();
        assert_eq!(ids.len(), 12);
        assert_eq!(cells[0].id, "top_k=2_orth_lambda=0.0_seed=0");
        assert!(cells
            .iter()
            .filter(|c| c.config.is_err())
            .all(|c| c.values["model.top_k"] == 99));
        assert_eq!(cells.iter().filter(|c| c.config.is_err()).count(), 6);
        let ok = cells.iter().find(|c| c.config.is_ok()).unwrap();
        assert_eq!(ok.config.as_ref().unwrap().train.max_steps, 3);
        let bad: Result<SweepSpec, _> = toml::from_str("[grids]\n\"a\" = [1]\n");
        assert!(bad.is_err());
    }

    fn spec(text: &str) -> SweepSpec {
        toml::from_str(text).unwrap()
    }

    #[test]
    fn equal_grid_values_are_refused_naming_the_key_and_spellings() {
        for list in ["[0.1, 0.10]", "[0.001, 1e-3]"] {
            let text = format!("preset = \"tiny\"\n[grid]\n\"reg.orth_lambda\" = {list}\n");
            let d = tempfile::tempdir().unwrap();
            let p = d.path().join("s.toml");
            std::fs::write(&p, &text).unwrap();
            let e = SweepSpec::from_file(&p).unwrap_err().to_string();
            let (a, b) = list[1..list.len() - 1].split_once(", ").unwrap();
            assert!(
                e.contains("grid.reg.orth_lambda") && e.contains(&format!("{a} and {b}")),
                "{e}"
            );
            assert!(e.contains("s.toml"), "{e}");
            assert!(spec(&text).cells().is_err());
        }
    }

    #[test]
    fn distinct_values_with_one_label_get_distinct_stable_ids() {
        let s = spec("preset = \"tiny\"\n[grid]\n\"data.path\" = [\"d/x.txt\", \"d_x.txt\", \"y.txt\"]\n\"train.seed\" = [0, 1]\n");
        let cells = s.cells().unwrap();
        let ids: std::collections::HashSet<_> = cells.iter().map(|c| c.id.clone()).collect();
        assert_eq!(ids.len(), 6, "{ids:?}");
        assert!(
            ids.contains("path=y.txt_seed=0"),
            "unneeded hashes: {ids:?}"
        );
        let again: Vec<String> = s.cells().unwrap().into_iter().map(|c| c.id).collect();
        assert_eq!(
            cells.iter().map(|c| c.id.clone()).collect::<Vec<_>>(),
            again
        );
    }

    /// Every sweep file shipped in configs/sweeps resolves, every cell valid.
    #[test]
    fn shipped_sweeps_resolve() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/sweeps");
        let mut n = 0;
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            let spec = SweepSpec::from_file(&p).unwrap();
            for c in spec.cells().unwrap() {
                c.config
                    .as_ref()
                    .unwrap_or_else(|e| panic!("{} {}: {e}", p.display(), c.id));
            }
            n += 1;
        }
        assert!(n >= 2);
    }

    #[test]
    fn reproduce_scales() {
        use crate::experiments::reproduce::spec;
        assert_eq!(spec("quick", None).unwrap().cells().unwrap().len(), 6);
        assert_eq!(spec("cpu", None).unwrap().cells().unwrap().len(), 21);
        assert_eq!(spec("paper", None).unwrap().cells().unwrap().len(), 105);
        let c = spec("quick", Some("/data/x")).unwrap().cells().unwrap();
        assert_eq!(c[0].config.as_ref().unwrap().data.path, "/data/x");
        assert!(spec("huge", None).is_err());
    }
}
