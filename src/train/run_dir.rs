//! The run folder: refusing to overwrite, resuming, and the metrics log.

use crate::checkpoint;
use crate::fsutil::write_atomic;
use crate::metrics::MetricRow;
use crate::{Error, Result};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Prepare the run folder. A fresh run refuses a folder that already holds a
/// run (nothing is overwritten); `--resume` needs one.
pub fn prepare_run_dir(out: &Path, resume: bool) -> Result<()> {
    let has_run = out.join("config.toml").is_file() || checkpoint::checkpoints_dir(out).is_dir();
    if resume && !has_run {
        return Err(Error::Data(format!(
            "{}: nothing to resume (no run there); drop --resume to start one",
            out.display()
        )));
    }
    if !resume && has_run {
        return Err(Error::Data(format!(
            "{}: a run already exists there; pass --resume to continue it, or choose another --out",
            out.display()
        )));
    }
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))
}

/// Keep only well-formed metrics rows up to `step` (used on resume, so that a
/// resumed run's log reads as if it had never stopped).
pub fn truncate_metrics(path: &Path, step: usize) -> Result<()> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io(path, e)),
    };
    let mut keep = String::new();
    for line in text.lines() {
        if MetricRow::from_line(line).is_ok_and(|r| r.step() <= step as u64) {
            keep.push_str(line);
            keep.push('\n');
        }
    }
    write_atomic(path, keep.as_bytes())
}

/// A metrics log: one JSON object per line, appended and flushed.
pub struct Metrics {
    file: std::fs::File,
    path: PathBuf,
}

impl Metrics {
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| Error::io(path, e))?;
        Ok(Metrics {
            file,
            path: path.to_path_buf(),
        })
    }
    pub fn log(&mut self, row: &MetricRow) -> Result<()> {
        self.file
            .write_all(row.to_line().as_bytes())
            .map_err(|e| Error::io(&self.path, e))
    }
}
