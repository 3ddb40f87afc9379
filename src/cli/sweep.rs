//! `moescope sweep`, `reproduce` and `report`: many runs, then their report.

use super::{progress, set_threads};
use anyhow::{bail, Context, Result};
use clap::Args;
use moescope::experiments::sweep::{self, SweepDir, SweepSpec};
use std::path::PathBuf;

#[derive(Args)]
pub struct SweepArgs {
    /// Sweep file: name, preset, base, [set], [grid] (a `variant` key sets keys of
    /// any section together) and [report] (docs/CONFIG.md, "Sweep files").
    spec: PathBuf,
    /// Sweep folder (default: sweeps/<name>).
    #[arg(long)]
    out: Option<PathBuf>,
    #[command(flatten)]
    exec: Execution,
    /// Gather the runs' results into results.csv / results.jsonl and the report.
    #[arg(long)]
    collect: bool,
    /// Set KEY=VALUE for every run (added to the sweep file's [set]; kept in
    /// the sweep folder's sweep.toml), e.g. --set data.path=/data/ptb.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
    /// Run only the run with this index, in this process (what each worker runs).
    #[arg(long, hide = true)]
    run_one: Option<usize>,
}

#[derive(Args)]
pub struct ReproduceArgs {
    /// quick (tiny, 3 λ, 2 seeds: minutes), cpu (small, 7 λ, 3 seeds: hours), paper (7 λ, 5 seeds, 3 corpora: GPU/Slurm).
    #[arg(long, default_value = "cpu", value_parser = ["quick", "cpu", "paper"])]
    scale: String,
    /// Corpus for every run (default: built-in corpus; the paper scale uses TinyStories, WikiText-103, PTB).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Sweep folder (default: reproduce-<scale>).
    #[arg(long)]
    out: Option<PathBuf>,
    #[command(flatten)]
    exec: Execution,
}

/// How a sweep's runs are carried out (the flags `sweep` and `reproduce` share).
#[derive(Args)]
struct Execution {
    /// Parallel worker processes (default: from cores and memory).
    #[arg(long)]
    jobs: Option<usize>,
    /// CPU threads per worker (default: cores / jobs).
    #[arg(long)]
    threads: Option<usize>,
    /// Write a Slurm job-array script (one task per run) instead of running locally.
    #[arg(long)]
    slurm: bool,
    /// Train every run on this device: cpu, cuda or cuda:N (sets
    /// train.device; on CUDA, local sweeps run one worker at a time unless
    /// --jobs says otherwise, and the Slurm script asks for a GPU per task).
    #[arg(long)]
    device: Option<String>,
}

impl Execution {
    /// `--device` as a `train.device` override of `spec`.
    fn apply_device(&self, spec: &mut SweepSpec) -> Result<()> {
        if let Some(d) = &self.device {
            let set = format!("train.device={d}");
            spec.set_override(&set)
                .with_context(|| format!("--device {d}"))?;
        }
        Ok(())
    }
}

pub fn run(a: SweepArgs) -> Result<()> {
    let mut spec = SweepSpec::from_file(&a.spec)?;
    for s in &a.sets {
        spec.set_override(s).with_context(|| format!("--set {s}"))?;
    }
    a.exec.apply_device(&mut spec)?;
    let dir = a
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from("sweeps").join(&spec.name));
    if let Some(i) = a.run_one {
        return run_one(&spec, SweepDir(dir), i, a.exec.threads);
    }
    run_sweep(spec, SweepDir(dir), &a.exec, a.collect)
}

pub fn reproduce(a: ReproduceArgs) -> Result<()> {
    let data = a.data.as_ref().map(|d| {
        std::fs::canonicalize(d)
            .unwrap_or(d.clone())
            .display()
            .to_string()
    });
    let mut spec = moescope::experiments::reproduce::spec(&a.scale, data.as_deref())?;
    a.exec.apply_device(&mut spec)?;
    let dir = a
        .out
        .unwrap_or_else(|| PathBuf::from(format!("reproduce-{}", a.scale)));
    run_sweep(spec, SweepDir(dir), &a.exec, false)
}

#[derive(Args)]
pub struct ReportArgs {
    /// The sweep folder (holding sweep.toml and runs/).
    dir: PathBuf,
    /// The fixed λ Table 4 compares with λ = 0 (default: `[report]
    /// table4_lambda` of the folder's sweep.toml, else 0.001, the study's).
    #[arg(long)]
    table4_lambda: Option<f64>,
}

pub fn report(a: ReportArgs) -> Result<()> {
    let f = moescope::report::write_sweep_report(&SweepDir(a.dir), a.table4_lambda)?;
    eprintln!("report: {}", f.markdown.display());
    println!("{}", f.html.display());
    Ok(())
}

/// One run of the sweep in this process (what each worker runs).
fn run_one(spec: &SweepSpec, dir: SweepDir, i: usize, threads: Option<usize>) -> Result<()> {
    let cells = spec.cells()?;
    let cell = cells
        .get(i)
        .with_context(|| format!("--run-one {i}: the sweep has {} runs", cells.len()))?;
    set_threads(threads.unwrap_or(0));
    let s = sweep::run_one(&dir, cell, threads)?;
    if s.status != "done" {
        bail!("run {} failed: {}", cell.id, s.error.unwrap_or_default());
    }
    Ok(())
}

fn run_sweep(spec: SweepSpec, dir: SweepDir, exec: &Execution, collect_only: bool) -> Result<()> {
    let cells = sweep::plan(&spec, &dir)?;
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let on_gpu = sweep::uses_gpu(&cells);
    let jobs = match exec.jobs {
        Some(j) => j,
        None if on_gpu => 1, // one GPU assumed: runs queue on it rather than share it
        None => sweep::default_jobs(&cells),
    }
    .max(1);
    // A GPU task needs a few cores, not the login node's count.
    let threads = match exec.threads {
        Some(t) => t,
        None if on_gpu && exec.slurm => cores.min(8),
        None => (cores / jobs).max(1),
    };
    if exec.slurm {
        let p = sweep::write_slurm(&dir, &spec, &cells, threads)?;
        eprintln!(
            "wrote {} ({} array tasks, {threads} CPUs each)",
            p.display(),
            cells.len()
        );
        eprintln!("submit: sbatch {}", p.display());
        eprintln!(
            "then:   moescope sweep {} --out {} --collect",
            dir.spec().display(),
            dir.0.display()
        );
        println!("{}", p.display());
        return Ok(());
    }
    let mut failed = 0;
    if !collect_only {
        eprintln!(
            "sweep `{}`: {} runs in {} ({jobs} jobs × {threads} threads)",
            spec.name,
            cells.len(),
            dir.0.display()
        );
        let (todo, secs) = sweep::estimate::remaining(&dir, &cells, cores);
        if todo > 0 {
            eprintln!(
                "expected wall time for the {todo} runs to do: about {} (at {:.0} GFLOP/s per core, \
                 measured on a 2-core AVX-512 machine; yours may differ)",
                sweep::estimate::human(secs),
                sweep::estimate::FLOPS_PER_CORE / 1e9
            );
        }
        let c = sweep::run_local(&dir, &cells, jobs, threads, progress())?;
        eprintln!(
            "runs: {} done ({} already finished), {} failed",
            c.done, c.skipped, c.failed
        );
        failed = c.failed;
    }
    let f = moescope::report::write_sweep_report(&dir, None)?;
    eprintln!(
        "results: {} and {}",
        dir.0.join("results.csv").display(),
        dir.0.join("results.jsonl").display()
    );
    eprintln!("report:  {}", f.markdown.display());
    println!("{}", f.html.display());
    if failed > 0 {
        bail!(
            "{failed} of {} runs failed: see the error column of {} and runs/<id>/worker.log; \
             run the same command again to retry them (finished runs are kept)",
            cells.len(),
            dir.0.join("results.csv").display()
        );
    }
    Ok(())
}
