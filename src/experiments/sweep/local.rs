//! Running a sweep's cells as local worker processes.

use super::folder::{read_status, write_status, SweepDir};
use super::{Cell, RunStatus};
use crate::{Error, Result};
use serde::Serialize;
use std::path::Path;

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
    let exe = std::env::current_exe()
        .map_err(|e| Error::Other(format!("cannot find the moescope executable: {e}")))?;
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
    let bar = progress_bar(progress, cells.len(), counts.done);
    let mut running: Vec<(&Cell, std::process::Child)> = Vec::new();
    loop {
        while running.len() < jobs.max(1) {
            let Some(c) = queue.pop_front() else { break };
            running.push((c, spawn_worker(&exe, dir, c, threads)?));
        }
        if running.is_empty() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
        let mut i = 0;
        while i < running.len() {
            let exit = running[i]
                .1
                .try_wait()
                .map_err(|e| Error::Other(format!("cannot wait for a worker: {e}")))?;
            let Some(exit) = exit else {
                i += 1;
                continue;
            };
            let (c, _) = running.remove(i);
            let s = finished_worker(dir, c, exit)?;
            if !progress {
                // Without a terminal, one line per finished run (for logs).
                let outcome = match &s.error {
                    Some(e) => format!("{} ({e})", s.status),
                    None => format!("{} in {:.0} s", s.status, s.wall_s),
                };
                let n = counts.done + counts.failed + 1;
                eprintln!("[{n}/{}] {}: {outcome}", counts.total, c.id);
            }
            match s.status.as_str() {
                "done" => counts.done += 1,
                _ => counts.failed += 1,
            }
            bar.inc(1);
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

fn progress_bar(shown: bool, total: usize, done: usize) -> indicatif::ProgressBar {
    if !shown {
        return indicatif::ProgressBar::hidden();
    }
    let b = indicatif::ProgressBar::new(total as u64);
    b.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:30} {pos}/{len} runs {msg} [{elapsed_precise} < {eta_precise}]",
        )
        .expect("template"),
    );
    b.set_position(done as u64);
    b
}

/// Start the worker of cell `c`, its output going to `runs/<id>/worker.log`.
fn spawn_worker(
    exe: &Path,
    dir: &SweepDir,
    c: &Cell,
    threads: usize,
) -> Result<std::process::Child> {
    use std::os::unix::process::CommandExt;
    let run = dir.run(&c.id);
    let cmd = worker_command(exe, dir, &c.index.to_string(), threads);
    std::fs::create_dir_all(&run).map_err(|e| Error::io(&run, e))?;
    let log_path = run.join("worker.log");
    let log = std::fs::File::create(&log_path).map_err(|e| Error::io(&log_path, e))?;
    let mut command = std::process::Command::new(&cmd[0]);
    command
        .args(&cmd[1..])
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone().map_err(|e| Error::io(&log_path, e))?)
        .stderr(log);
    // SAFETY: prctl is async-signal-safe; the child is killed when this process dies.
    unsafe {
        command.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    command
        .spawn()
        .map_err(|e| Error::Other(format!("cannot start a worker ({}): {e}", cmd[0])))
}

/// The outcome of a worker that exited: the `done` or `failed` it recorded,
/// else (killed by a signal, or dead before it could record one) `failed`
/// with how it ended and the end of its log, recorded in `status.json`.
fn finished_worker(dir: &SweepDir, c: &Cell, exit: std::process::ExitStatus) -> Result<RunStatus> {
    use std::os::unix::process::ExitStatusExt;
    let recorded = read_status(dir, &c.id);
    if let Some(s) = recorded
        .as_ref()
        .filter(|s| s.status == "done" || s.status == "failed")
    {
        return Ok(s.clone());
    }
    let how = match (exit.signal(), exit.code()) {
        (Some(sig), _) => format!("worker killed by signal {sig} ({})", signal_name(sig)),
        (None, Some(code)) => format!("worker exited with code {code} without a result"),
        (None, None) => "worker exited without a result".to_string(),
    };
    let tail = log_tail(&dir.run(&c.id).join("worker.log"), 5);
    let s = RunStatus {
        status: "failed".into(),
        error: Some(match tail.is_empty() {
            true => how,
            false => format!("{how}; the end of worker.log:\n{tail}"),
        }),
        wall_s: recorded.map_or(0.0, |s| s.wall_s),
        pid: None,
    };
    write_status(dir, &c.id, &s)?;
    Ok(s)
}

/// The usual name of signal `sig` (`SIGKILL`: killed, often for memory).
fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGKILL => "SIGKILL: killed, often by the out-of-memory killer",
        libc::SIGTERM => "SIGTERM",
        libc::SIGINT => "SIGINT",
        libc::SIGHUP => "SIGHUP",
        libc::SIGABRT => "SIGABRT: aborted, e.g. a failed memory allocation",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGILL => "SIGILL",
        libc::SIGPIPE => "SIGPIPE",
        _ => "signal",
    }
}

/// The last `n` lines of a log file (empty when it cannot be read).
fn log_tail(path: &Path, n: usize) -> String {
    let log = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;

    fn cell() -> Cell {
        Cell {
            index: 0,
            id: "seed=0".into(),
            values: Default::default(),
            config: Err("not needed".into()),
        }
    }

    #[test]
    fn a_worker_killed_by_a_signal_is_recorded_as_failed_with_the_signal() {
        let d = tempfile::tempdir().unwrap();
        let dir = SweepDir(d.path().to_path_buf());
        let c = cell();
        std::fs::create_dir_all(dir.run(&c.id)).unwrap();
        std::fs::write(dir.run(&c.id).join("worker.log"), "step 1\nstep 2\n").unwrap();
        let running = RunStatus {
            status: "running".into(),
            error: None,
            wall_s: 0.0,
            pid: Some(1),
        };
        write_status(&dir, &c.id, &running).unwrap();
        let s =
            finished_worker(&dir, &c, std::process::ExitStatus::from_raw(libc::SIGKILL)).unwrap();
        assert_eq!(s.status, "failed");
        let e = s.error.unwrap();
        assert!(
            e.contains("signal 9 (SIGKILL") && e.contains("step 2"),
            "{e}"
        );
        assert_eq!(read_status(&dir, &c.id).unwrap().status, "failed");
    }

    #[test]
    fn a_recorded_outcome_is_kept() {
        let d = tempfile::tempdir().unwrap();
        let dir = SweepDir(d.path().to_path_buf());
        let c = cell();
        std::fs::create_dir_all(dir.run(&c.id)).unwrap();
        let done = RunStatus {
            status: "done".into(),
            error: None,
            wall_s: 3.0,
            pid: None,
        };
        write_status(&dir, &c.id, &done).unwrap();
        let s = finished_worker(&dir, &c, std::process::ExitStatus::from_raw(0)).unwrap();
        assert_eq!(s, done);
    }
}
