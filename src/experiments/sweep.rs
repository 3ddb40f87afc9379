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
//! [grid]                          # the product of these lists, one run per combination
//! "reg.orth_lambda" = [0.0, 0.01, 0.1]
//! "train.seed" = [0, 1, 2]
//! # A list of tables is a list of variants, each setting several keys together:
//! "model" = [{ routing = "topk", top_k = 1 }, { routing = "soft" }]
//! ```
//!
//! Layout of the sweep folder: `sweep.toml` (the spec, with `base` made
//! absolute), `plan.json` (every run: index, id, swept values),
//! `runs/<id>/` (a normal run folder plus `cell.toml` and `status.json`),
//! `results.csv` / `results.jsonl` (one row per run).

use crate::config::Config;
use crate::fsutil::write_atomic;
use crate::train::{train, TrainOptions};
use crate::{Error, Result};
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
}

fn default_name() -> String {
    "sweep".into()
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

fn value_label(v: &toml::Value) -> String {
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

fn to_json(v: &toml::Value) -> serde_json::Value {
    serde_json::to_value(v).unwrap_or(serde_json::Value::Null)
}

impl SweepSpec {
    /// Read a sweep file; `base` is made absolute.
    pub fn from_file(path: &Path) -> Result<SweepSpec> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let mut spec: SweepSpec = toml::from_str(&text)
            .map_err(|e| Error::bad_file(path, format!("not a valid sweep file: {e}")))?;
        if let Some(b) = &spec.base {
            let p = Path::new(b);
            if p.is_relative() {
                let dir = path.parent().unwrap_or(Path::new("."));
                spec.base = Some(dir.join(p).display().to_string());
            }
        }
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

    /// The runs of this sweep, in a fixed order (keys sorted, values as listed).
    pub fn cells(&self) -> Result<Vec<Cell>> {
        let mut sets = Vec::new();
        flatten("", &self.set, &mut sets);
        let mut grid = Vec::new();
        flatten("", &self.grid, &mut grid);
        let mut axes: Vec<(String, Vec<toml::Value>)> = Vec::new();
        for (k, v) in grid {
            match v {
                toml::Value::Array(a) if !a.is_empty() => axes.push((k, a)),
                _ => {
                    return Err(Error::config(
                        format!("grid.{k}"),
                        "must be a non-empty list of values",
                    ))
                }
            }
        }
        let shorts: Vec<String> = axes
            .iter()
            .map(|(k, _)| {
                let last = k.rsplit('.').next().unwrap_or(k).to_string();
                if axes
                    .iter()
                    .filter(|(o, _)| o.rsplit('.').next() == Some(&last))
                    .count()
                    > 1
                {
                    k.replace('.', "-")
                } else {
                    last
                }
            })
            .collect();
        // Variant labels: the values ("topk-1"), or key-value pairs
        // ("act_lambda-0.1") where values alone would not tell variants apart;
        // an empty variant is "none".
        let variant_label = |k: &str, t: &toml::Table, with_keys: bool| -> String {
            let mut inner = Vec::new();
            flatten(k, t, &mut inner);
            if inner.is_empty() {
                return "none".into();
            }
            inner
                .iter()
                .map(|(ik, v)| {
                    if with_keys {
                        format!("{}-{}", ik.rsplit('.').next().unwrap_or(ik), value_label(v))
                    } else {
                        value_label(v)
                    }
                })
                .collect::<Vec<_>>()
                .join("-")
        };
        let keyed: Vec<bool> = axes
            .iter()
            .map(|(k, vals)| {
                let labels: Vec<String> = vals
                    .iter()
                    .filter_map(|v| v.as_table().map(|t| variant_label(k, t, false)))
                    .collect();
                let mut uniq = labels.clone();
                uniq.sort();
                uniq.dedup();
                uniq.len() < labels.len()
            })
            .collect();
        let total: usize = axes.iter().map(|(_, v)| v.len()).product();
        let base = self.base.as_ref().map(PathBuf::from);
        let mut cells = Vec::with_capacity(total);
        for index in 0..total {
            let mut rem = index;
            let mut picks = vec![0; axes.len()];
            for a in (0..axes.len()).rev() {
                picks[a] = rem % axes[a].1.len();
                rem /= axes[a].1.len();
            }
            let mut values = serde_json::Map::new();
            let mut labels = Vec::new();
            let mut all_sets: Vec<String> = sets.iter().map(|(k, v)| format!("{k}={v}")).collect();
            for (a, (k, vals)) in axes.iter().enumerate() {
                let v = &vals[picks[a]];
                values.insert(k.clone(), to_json(v));
                match v {
                    // A table is a variant: several keys under `k` set together.
                    toml::Value::Table(t) => {
                        let mut inner = Vec::new();
                        flatten(k, t, &mut inner);
                        labels.push(format!("{}={}", shorts[a], variant_label(k, t, keyed[a])));
                        all_sets.extend(inner.iter().map(|(ik, iv)| format!("{ik}={iv}")));
                    }
                    v => {
                        labels.push(format!("{}={}", shorts[a], value_label(v)));
                        all_sets.push(format!("{k}={v}"));
                    }
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

/// Paths of a sweep folder.
#[derive(Debug, Clone)]
pub struct SweepDir(pub PathBuf);

impl SweepDir {
    pub fn spec(&self) -> PathBuf {
        self.0.join("sweep.toml")
    }
    pub fn run(&self, id: &str) -> PathBuf {
        self.0.join("runs").join(id)
    }
    pub fn status(&self, id: &str) -> PathBuf {
        self.run(id).join("status.json")
    }
}

/// Read a run's status (None when it never started).
pub fn read_status(dir: &SweepDir, id: &str) -> Option<RunStatus> {
    let text = std::fs::read_to_string(dir.status(id)).ok()?;
    serde_json::from_str(&text).ok()
}

fn write_status(dir: &SweepDir, id: &str, s: &RunStatus) -> Result<()> {
    write_atomic(
        &dir.status(id),
        &serde_json::to_vec_pretty(s).expect("json"),
    )
}

fn pid_alive(pid: u32) -> bool {
    // SAFETY: kill with signal 0 only checks that the process exists.
    unsafe { libc::kill(pid as libc::pid_t, 0) == 0 }
}

/// Prepare a sweep folder: copy the spec in (refusing a different spec in an
/// existing folder), write `plan.json`. Returns the cells.
pub fn plan(spec: &SweepSpec, dir: &SweepDir) -> Result<Vec<Cell>> {
    let cells = spec.cells()?;
    std::fs::create_dir_all(dir.0.join("runs")).map_err(|e| Error::io(&dir.0, e))?;
    let text = toml::to_string_pretty(spec).expect("spec serialises");
    if let Ok(old) = std::fs::read_to_string(dir.spec()) {
        let old_spec: Option<SweepSpec> = toml::from_str(&old).ok();
        let same = old_spec
            .map(|o| toml::to_string_pretty(&o).ok() == Some(text.clone()))
            .unwrap_or(false);
        if !same {
            return Err(Error::Data(format!(
                "{} holds a different sweep; use another --out, or delete that folder to start over",
                dir.0.display()
            )));
        }
    } else {
        write_atomic(&dir.spec(), text.as_bytes())?;
    }
    let plan: Vec<serde_json::Value> = cells
        .iter()
        .map(|c| serde_json::json!({"index": c.index, "id": c.id, "values": c.values}))
        .collect();
    write_atomic(
        &dir.0.join("plan.json"),
        &serde_json::to_vec_pretty(&plan).expect("json"),
    )?;
    Ok(cells)
}

/// Run one cell in this process: skip it when done, resume it when
/// interrupted, record `done` or `failed` (with the error) in `status.json`.
/// This is what every worker (local or Slurm array task) runs.
pub fn run_one(dir: &SweepDir, cell: &Cell, threads: Option<usize>) -> Result<RunStatus> {
    let run = dir.run(&cell.id);
    std::fs::create_dir_all(&run).map_err(|e| Error::io(&run, e))?;
    if let Some(s) = read_status(dir, &cell.id) {
        if s.status == "done" {
            return Ok(s);
        }
        if s.status == "running"
            && s.pid
                .is_some_and(|p| p != std::process::id() && pid_alive(p))
        {
            return Err(Error::Data(format!(
                "run {} is being run by process {}",
                cell.id,
                s.pid.unwrap_or(0)
            )));
        }
    }
    let start = std::time::Instant::now();
    let mut cfg = match &cell.config {
        Ok(c) => c.clone(),
        Err(e) => {
            let s = RunStatus {
                status: "failed".into(),
                error: Some(format!("config: {e}")),
                wall_s: 0.0,
                pid: None,
            };
            write_status(dir, &cell.id, &s)?;
            return Ok(s);
        }
    };
    if let Some(t) = threads {
        cfg.train.threads = t;
    }
    write_atomic(&run.join("cell.toml"), cfg.to_toml().as_bytes())?;
    write_status(
        dir,
        &cell.id,
        &RunStatus {
            status: "running".into(),
            error: None,
            wall_s: 0.0,
            pid: Some(std::process::id()),
        },
    )?;
    let resume = run.join("config.toml").is_file();
    let opts = TrainOptions {
        out: run.clone(),
        resume,
        progress: false,
        quiet: true,
        stop_after: None,
    };
    let s = match train(cfg, &opts) {
        Ok(_) => RunStatus {
            status: "done".into(),
            error: None,
            wall_s: start.elapsed().as_secs_f64(),
            pid: None,
        },
        Err(e) => RunStatus {
            status: "failed".into(),
            error: Some(e.to_string()),
            wall_s: start.elapsed().as_secs_f64(),
            pid: None,
        },
    };
    write_status(dir, &cell.id, &s)?;
    Ok(s)
}

/// Default number of parallel jobs: cores, limited by memory (a run's
/// footprint estimated from its parameter count), at least 1.
pub fn default_jobs(cells: &[Cell]) -> usize {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let need = cells
        .iter()
        .filter_map(|c| c.config.as_ref().ok())
        .map(|c| {
            let mut m = c.model.clone();
            if m.vocab_size == 0 {
                m.vocab_size = 50304;
            }
            // weights + grads + 2 moments, plus activations; 2x margin.
            (m.param_counts().0 * 4 * 4 * 2
                + (c.train.batch_size * m.seq_len * m.d_model * m.n_layer * 64)) as u64
        })
        .max()
        .unwrap_or(1 << 30);
    let avail = mem_available().unwrap_or(8 << 30);
    cores.min((avail / need.max(1)) as usize).max(1)
}

fn mem_available() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = s.lines().find(|l| l.starts_with("MemAvailable:"))?;
    Some(line.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024)
}

/// The command a worker runs for cell `index` (locally and in Slurm).
pub fn worker_command(exe: &Path, dir: &SweepDir, index: &str, threads: usize) -> Vec<String> {
    vec![
        exe.display().to_string(),
        "sweep".into(),
        dir.spec().display().to_string(),
        "--out".into(),
        dir.0.display().to_string(),
        "--run-one".into(),
        index.to_string(),
        "--threads".into(),
        threads.to_string(),
    ]
}

/// Counts shown by the progress view and returned at the end.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SweepCounts {
    pub total: usize,
    pub done: usize,
    pub failed: usize,
    pub skipped: usize,
}

/// Run every unfinished cell in worker processes, `jobs` at a time, each
/// with `threads` CPU threads. Workers die with this process.
pub fn run_local(
    dir: &SweepDir,
    cells: &[Cell],
    jobs: usize,
    threads: usize,
    progress: bool,
) -> Result<SweepCounts> {
    use std::os::unix::process::CommandExt;
    let exe = std::env::current_exe()
        .map_err(|e| Error::Data(format!("cannot find the moescope executable: {e}")))?;
    let mut counts = SweepCounts {
        total: cells.len(),
        ..Default::default()
    };
    let mut queue: std::collections::VecDeque<&Cell> = std::collections::VecDeque::new();
    for c in cells {
        match read_status(dir, &c.id) {
            Some(s) if s.status == "done" => {
                counts.done += 1;
                counts.skipped += 1;
            }
            _ => queue.push_back(c),
        }
    }
    let bar = if progress {
        let b = indicatif::ProgressBar::new(cells.len() as u64);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:30} {pos}/{len} runs {msg} [{elapsed_precise} < {eta_precise}]",
            )
            .expect("template"),
        );
        b
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_position(counts.done as u64);
    let mut running: Vec<(&Cell, std::process::Child)> = Vec::new();
    loop {
        while running.len() < jobs.max(1) {
            let Some(c) = queue.pop_front() else { break };
            let cmd = worker_command(&exe, dir, &c.index.to_string(), threads);
            std::fs::create_dir_all(dir.run(&c.id)).map_err(|e| Error::io(dir.run(&c.id), e))?;
            let log = std::fs::File::create(dir.run(&c.id).join("worker.log"))
                .map_err(|e| Error::io(dir.run(&c.id), e))?;
            let mut command = std::process::Command::new(&cmd[0]);
            command
                .args(&cmd[1..])
                .stdin(std::process::Stdio::null())
                .stdout(log.try_clone().map_err(|e| Error::io(dir.run(&c.id), e))?)
                .stderr(log);
            // SAFETY: prctl is async-signal-safe; the child is killed when this process dies.
            unsafe {
                command.pre_exec(|| {
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                    Ok(())
                });
            }
            let child = command
                .spawn()
                .map_err(|e| Error::Data(format!("cannot start a worker: {e}")))?;
            running.push((c, child));
        }
        if running.is_empty() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
        let mut i = 0;
        while i < running.len() {
            match running[i]
                .1
                .try_wait()
                .map_err(|e| Error::Data(e.to_string()))?
            {
                Some(_) => {
                    let (c, _) = running.remove(i);
                    let st = read_status(dir, &c.id);
                    if !progress {
                        // Without a terminal, one line per finished run (for logs).
                        eprintln!(
                            "[{}/{}] {}: {}",
                            counts.done + counts.failed + 1,
                            counts.total,
                            c.id,
                            st.as_ref()
                                .map(|s| match &s.error {
                                    Some(e) => format!("{} ({e})", s.status),
                                    None => format!("{} in {:.0} s", s.status, s.wall_s),
                                })
                                .unwrap_or_else(|| "no result".into())
                        );
                    }
                    match st {
                        Some(s) if s.status == "done" => counts.done += 1,
                        Some(s) if s.status == "failed" => counts.failed += 1,
                        _ => {
                            // The worker died without recording an outcome.
                            let log = std::fs::read_to_string(dir.run(&c.id).join("worker.log"))
                                .unwrap_or_default();
                            let tail: String = log
                                .lines()
                                .rev()
                                .take(5)
                                .collect::<Vec<_>>()
                                .into_iter()
                                .rev()
                                .collect::<Vec<_>>()
                                .join("\n");
                            let s = RunStatus {
                                status: "failed".into(),
                                error: Some(format!("worker exited without a result: {tail}")),
                                wall_s: 0.0,
                                pid: None,
                            };
                            write_status(dir, &c.id, &s)?;
                            counts.failed += 1;
                        }
                    }
                    bar.inc(1);
                }
                None => i += 1,
            }
        }
        bar.set_message(format!(
            "done {} · running {} · failed {}",
            counts.done,
            running.len(),
            counts.failed
        ));
    }
    bar.finish_and_clear();
    Ok(counts)
}

/// Write a Slurm job-array script running the same worker command per cell.
pub fn write_slurm(
    dir: &SweepDir,
    spec: &SweepSpec,
    cells: &[Cell],
    threads: usize,
) -> Result<PathBuf> {
    let exe = std::env::current_exe()
        .map_err(|e| Error::Data(format!("cannot find the moescope executable: {e}")))?;
    let dir_abs = SweepDir(std::fs::canonicalize(&dir.0).map_err(|e| Error::io(&dir.0, e))?);
    let cmd = worker_command(&exe, &dir_abs, "$SLURM_ARRAY_TASK_ID", threads);
    let slurm = dir_abs.0.join("slurm");
    std::fs::create_dir_all(&slurm).map_err(|e| Error::io(&slurm, e))?;
    let script = format!(
        "#!/bin/bash\n\
         # moescope sweep `{name}`: one array task per run ({n} runs).\n\
         # Submit: sbatch {path}\n\
         # Then:   moescope sweep {spec} --out {dir} --collect\n\
         #SBATCH --job-name=moescope-{name}\n\
         #SBATCH --array=0-{last}\n\
         #SBATCH --cpus-per-task={threads}\n\
         #SBATCH --output={slurm}/%A_%a.out\n\
         set -euo pipefail\n\
         exec {cmd}\n",
        name = spec.name,
        n = cells.len(),
        path = slurm.join("sweep.sbatch").display(),
        spec = dir_abs.spec().display(),
        dir = dir_abs.0.display(),
        last = cells.len().saturating_sub(1),
        slurm = slurm.display(),
        cmd = cmd.join(" "),
    );
    let path = slurm.join("sweep.sbatch");
    write_atomic(&path, script.as_bytes())?;
    Ok(path)
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
