//! The sweep folder: its layout, each run's status, the plan, and one run.

use super::{same_value, Cell, RunStatus, SweepSpec};
use crate::fsutil::write_atomic;
use crate::train::{train, TrainOptions};
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

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
    /// The record of which cell a run folder holds.
    pub fn cell_record(&self, id: &str) -> PathBuf {
        self.run(id).join("cell.toml")
    }
}

/// `runs/<id>/cell.toml`: the cell a run folder holds, written before its
/// training starts, so results are never read from another cell's run.
#[derive(Serialize, Deserialize)]
struct CellRecord {
    index: usize,
    id: String,
    /// The swept values (dotted key -> value).
    values: toml::Table,
}

fn write_cell_record(dir: &SweepDir, cell: &Cell) -> Result<()> {
    let values = toml::Table::try_from(&cell.values)
        .map_err(|e| Error::config(&cell.id, format!("swept values are not TOML: {e}")))?;
    let record = CellRecord {
        index: cell.index,
        id: cell.id.clone(),
        values,
    };
    let text = toml::to_string_pretty(&record).expect("a cell record serialises");
    write_atomic(&dir.cell_record(&cell.id), text.as_bytes())
}

/// Whether the run folder of `cell` holds this cell's run: an error that says
/// why not when its `cell.toml` records other swept values (or cannot be
/// read). A folder without `cell.toml` has not started a run. Folders of
/// earlier versions recorded the resolved config there; their swept keys are
/// compared with it.
pub fn recorded_cell_matches(dir: &SweepDir, cell: &Cell) -> Result<()> {
    let path = dir.cell_record(&cell.id);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io(&path, e)),
    };
    let table: toml::Table = toml::from_str(&text)
        .map_err(|e| Error::bad_file(&path, format!("not a cell record: {e}")))?;
    let recorded = serde_json::to_value(&table).unwrap_or_default();
    let same = match recorded.get("values") {
        Some(values) => same_value(values, &serde_json::Value::Object(cell.values.clone())),
        None => cell.values.iter().all(|(k, v)| holds(&recorded, k, v)),
    };
    if same {
        return Ok(());
    }
    Err(Error::bad_file(
        &path,
        format!(
            "this folder holds another run than {} ({}); its results are not this run's. \
             Move the folder away and run the sweep again to redo the run",
            cell.id,
            serde_json::Value::Object(cell.values.clone())
        ),
    ))
}

/// Whether `config` (a resolved config as JSON) has `value` at dotted `key`;
/// a table value is a variant whose keys it must all have. Keys the config
/// does not have are not held against it.
fn holds(config: &serde_json::Value, key: &str, value: &serde_json::Value) -> bool {
    let prefix = super::variant_prefix(key);
    let at = prefix
        .split('.')
        .filter(|p| !p.is_empty())
        .try_fold(config, |c, p| c.get(p));
    let Some(at) = at else { return true };
    match value {
        serde_json::Value::Object(t) => t.iter().all(|(k, v)| holds(at, k, v)),
        v => same_value(at, v),
    }
}

/// Read a run's status (None when it never started).
pub fn read_status(dir: &SweepDir, id: &str) -> Option<RunStatus> {
    let text = std::fs::read_to_string(dir.status(id)).ok()?;
    serde_json::from_str(&text).ok()
}

pub(super) fn write_status(dir: &SweepDir, id: &str, s: &RunStatus) -> Result<()> {
    write_atomic(
        &dir.status(id),
        &serde_json::to_vec_pretty(s).expect("json"),
    )
}

/// Whether process `pid` is still alive after waiting up to `secs` for it to exit.
fn still_alive_after(pid: u32, secs: f64) -> bool {
    let t0 = std::time::Instant::now();
    while pid_alive(pid) {
        if t0.elapsed().as_secs_f64() > secs {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    false
}

/// Whether process `pid` exists and is not a zombie (a dead worker whose
/// exit nobody has collected yet).
fn pid_alive(pid: u32) -> bool {
    // SAFETY: kill with signal 0 only checks that the process exists.
    let exists = unsafe { libc::kill(pid as libc::pid_t, 0) == 0 };
    let zombie = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit(')')
                .next()
                .map(|rest| rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(false);
    exists && !zombie
}

/// Prepare a sweep folder: copy the spec in (refusing a different spec in an
/// existing folder), write `plan.json`. Returns the cells.
pub fn plan(spec: &SweepSpec, dir: &SweepDir) -> Result<Vec<Cell>> {
    let cells = spec.cells()?;
    std::fs::create_dir_all(dir.0.join("runs")).map_err(|e| Error::io(&dir.0, e))?;
    let text = toml::to_string_pretty(spec).expect("spec serialises");
    // The same runs: the spec but its [report] options, which may change
    // between a sweep's start and its report.
    let runs_of = |s: &SweepSpec| {
        let mut s = s.clone();
        s.report = Default::default();
        toml::to_string_pretty(&s).ok()
    };
    if let Ok(old) = std::fs::read_to_string(dir.spec()) {
        let old_spec: Option<SweepSpec> = toml::from_str(&old).ok();
        let same = old_spec.is_some_and(|o| runs_of(&o) == runs_of(spec));
        if !same {
            return Err(Error::Other(format!(
                "{} holds a different sweep; use another --out, or delete that folder to start over",
                dir.0.display()
            )));
        }
        if old != text {
            write_atomic(&dir.spec(), text.as_bytes())?; // new [report] options
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
    recorded_cell_matches(dir, cell)?;
    if let Some(s) = read_status(dir, &cell.id) {
        if s.status == "done" {
            return Ok(s);
        }
        // A worker of a sweep that was just killed dies a moment after its
        // parent (PR_SET_PDEATHSIG): give it that moment before calling the
        // run taken.
        if s.status == "running"
            && s.pid
                .is_some_and(|p| p != std::process::id() && still_alive_after(p, 5.0))
        {
            return Err(Error::Other(format!(
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
    write_cell_record(dir, cell)?;
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
        resume_from: None,
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
