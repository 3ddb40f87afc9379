//! The run folder: refusing to overwrite, the lock, resuming, the record of
//! the token stream, and the metrics log.

use crate::checkpoint;
use crate::config::Config;
use crate::data::Dataset;
use crate::fsutil::write_atomic;
use crate::metrics::MetricRow;
use crate::{Error, Result};
use std::io::Write;
use std::path::{Path, PathBuf};

/// The files and folders a moescope run (or a sweep cell about to become
/// one) may hold; a non-empty folder with none of them belongs to someone else.
const RUN_ENTRIES: [&str; 7] = [
    "config.toml",
    "checkpoints",
    "metrics.jsonl",
    "summary.json",
    "cell.toml",
    "status.json",
    LOCK_FILE,
];

/// The lock file of a run folder (see [`RunDir`]).
pub const LOCK_FILE: &str = ".lock";

/// A run folder held by this process. The exclusive lock on `RUN/.lock` is an
/// OS file lock: it is released when this value is dropped, and by the OS
/// when the process dies, so a crash never leaves the folder locked.
#[derive(Debug)]
pub struct RunDir {
    pub path: PathBuf,
    _lock: std::fs::File,
    /// The folder did not exist before this run opened it.
    created: bool,
}

impl Drop for RunDir {
    /// A folder left holding nothing but the lock (an error before the run's
    /// first file: bad data, a bad checkpoint) loses the lock file, and the
    /// folder too when this run created it: a failed start leaves nothing behind.
    fn drop(&mut self) {
        let only_lock = std::fs::read_dir(&self.path)
            .map(|es| es.flatten().all(|e| e.file_name() == LOCK_FILE))
            .unwrap_or(false);
        if only_lock {
            let _ = std::fs::remove_file(self.path.join(LOCK_FILE));
            if self.created {
                let _ = std::fs::remove_dir(&self.path);
            }
        }
    }
}

/// Whether `out` holds a run: its `config.toml` or its checkpoints.
pub fn holds_run(out: &Path) -> bool {
    out.join("config.toml").is_file() || checkpoint::checkpoints_dir(out).is_dir()
}

/// Open the run folder `out` for training: refuse a folder that is not a
/// moescope run, take its lock, then refuse a run that exists (a fresh run
/// overwrites nothing) or, when `resume`, a folder without one.
pub fn open(out: &Path, resume: bool) -> Result<RunDir> {
    refuse_foreign(out)?;
    let created = !out.exists();
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let lock = lock(out)?;
    let has_run = holds_run(out);
    if resume && !has_run {
        return Err(Error::bad_file(
            out,
            "nothing to resume (no run there); drop --resume to start one, or pass --resume auto (resume when there is a run, else start)",
        ));
    }
    if !resume && has_run {
        return Err(Error::bad_file(
            out,
            "a run already exists there; pass --resume to continue it, or choose another --out",
        ));
    }
    Ok(RunDir {
        path: out.to_path_buf(),
        _lock: lock,
        created,
    })
}

/// Refuse a non-empty folder holding nothing of a moescope run (e.g. a
/// Hugging Face model): training would overwrite its `config.json` and
/// `model.safetensors`.
pub fn refuse_foreign(out: &Path) -> Result<()> {
    if out.exists() && !out.is_dir() {
        return Err(Error::bad_file(
            out,
            "is a file, not a folder; choose another --out",
        ));
    }
    let Ok(entries) = std::fs::read_dir(out) else {
        return Ok(());
    };
    let mut names: Vec<String> = entries
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    if names.is_empty() || names.iter().any(|n| RUN_ENTRIES.contains(&n.as_str())) {
        return Ok(());
    }
    names.sort();
    let more = names.len().saturating_sub(5);
    names.truncate(5);
    let tail = if more > 0 {
        format!(" and {more} more")
    } else {
        String::new()
    };
    Err(Error::bad_file(
        out,
        format!(
            "not a moescope run folder (it holds {}{tail}); nothing there was changed: choose an empty or new --out",
            names.join(", ")
        ),
    ))
}

/// Take the exclusive lock of a run folder, or fail at once when another
/// process holds it.
fn lock(out: &Path) -> Result<std::fs::File> {
    let path = out.join(LOCK_FILE);
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .map_err(|e| Error::io(&path, e))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let holder = std::fs::read_to_string(&path).unwrap_or_default();
            let pid = holder.trim();
            let who = if pid.is_empty() {
                "another process".into()
            } else {
                format!("another process (pid {pid})")
            };
            return Err(Error::bad_file(
                out,
                format!("{who} is training in this folder (it holds {LOCK_FILE}); wait for it to finish, or choose another --out"),
            ));
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(Error::io(&path, e)),
    }
    // The holder's pid, for the message above (the lock itself is the OS's).
    let _ = file
        .set_len(0)
        .and_then(|_| write!(file, "{}", std::process::id()));
    Ok(file)
}

/// The token stream a run trains on, recorded in `RUN/data.json`: a resumed
/// run may read its corpus from another path or its tokenizer from another
/// file as long as this stays the same.
#[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StreamRecord {
    pub tokenizer: String,
    pub train_hash: String,
    pub train_tokens: u64,
    pub valid_hash: String,
    pub valid_tokens: u64,
}

impl StreamRecord {
    const FILE: &'static str = "data.json";

    pub fn of(ds: &Dataset) -> Self {
        StreamRecord {
            tokenizer: ds.tokenizer.id(),
            train_hash: ds.train.header.source_hash.clone(),
            train_tokens: ds.train.len() as u64,
            valid_hash: ds.valid.header.source_hash.clone(),
            valid_tokens: ds.valid.len() as u64,
        }
    }

    pub fn write(&self, out: &Path) -> Result<()> {
        let json = serde_json::to_vec_pretty(self).expect("json");
        write_atomic(&out.join(Self::FILE), &json)
    }

    /// The run's record; `None` for a run that has none (older versions).
    pub fn read(out: &Path) -> Result<Option<Self>> {
        let path = out.join(Self::FILE);
        match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| Error::bad_file(&path, format!("not a token-stream record: {e}"))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(&path, e)),
        }
    }
}

/// On resume, refuse data that gives another token stream than the run's: a
/// different tokenizer, corpus content or split. Without a record, refuse any
/// change to the `[data]` keys of the run's `config.toml`.
pub fn check_same_stream(out: &Path, cfg: &Config, ds: &Dataset) -> Result<()> {
    let now = StreamRecord::of(ds);
    match StreamRecord::read(out)? {
        Some(was) if was == now => Ok(()),
        Some(was) => Err(Error::config(
            "data",
            format!(
                "this data gives another token stream than the run in {} was trained on (tokenizer {} vs {}, train {} tokens hash {} vs {} tokens hash {}); resume with the run's corpus and tokenizer",
                out.display(), now.tokenizer, was.tokenizer, now.train_tokens, short(&now.train_hash), was.train_tokens, short(&was.train_hash)
            ),
        )),
        None => {
            let saved = out.join("config.toml");
            if !saved.is_file() {
                return Ok(());
            }
            let was = Config::from_toml_file(&saved)?.data;
            if was == cfg.data {
                return Ok(());
            }
            Err(Error::config(
                "data",
                format!(
                    "{} has no record of its token stream (data.json), so its [data] keys cannot change on resume; keep them as in {}",
                    out.display(),
                    saved.display()
                ),
            ))
        }
    }
}

fn short(hash: &str) -> &str {
    &hash[..hash.len().min(12)]
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
