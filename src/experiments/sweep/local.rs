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
