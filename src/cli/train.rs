//! `moescope train`: resolve the config (or the resumed run's), then train.

use super::{progress, set_threads};
use anyhow::{bail, Context, Result};
use clap::Args;
use moescope::config::{Config, PRESETS};
use moescope::train::{self, footprint, run_dir, TrainOptions};
use std::path::{Path, PathBuf};

/// Where a run's config comes from: preset, file, and overrides.
#[derive(Args)]
pub struct ConfigArgs {
    /// TOML config file with [model], [data] and [train] sections (and optionally `preset = "..."`).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Start from a preset: tiny (seconds to a minute), small (~1/4 of the paper's width), paper (~130M params).
    #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(PRESETS))]
    preset: Option<String>,
    /// Corpus: a text/JSONL/Parquet file or a folder with *train*/*valid*/*test* files. Same as --set data.path=PATH.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Named dataset: builtin, tinystories, wikitext-103, wikitext-2, ptb (downloaded into the cache when online).
    #[arg(long, conflicts_with = "data")]
    dataset: Option<String>,
    /// Override any config key, e.g. --set model.top_k=1 --set train.max_steps=500. Repeatable.
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    sets: Vec<String>,
    /// CPU threads (0 = all cores). Same as --set train.threads=N.
    #[arg(long)]
    threads: Option<usize>,
}

impl ConfigArgs {
    /// Every override: the shorthand flags as `--set`s, then the `--set`s.
    fn all_sets(&self) -> Result<Vec<String>> {
        let mut sets = Vec::new();
        if let Some(d) = &self.data {
            sets.push(format!("data.path={}", toml_str(utf8_path("--data", d)?)));
        }
        if let Some(d) = &self.dataset {
            sets.push(format!("data.dataset={}", toml_str(d)));
        }
        if let Some(t) = self.threads {
            sets.push(format!("train.threads={t}"));
        }
        sets.extend(self.sets.iter().cloned());
        Ok(sets)
    }
}

/// A path given to `flag` that the run's config.toml must store as text.
pub fn utf8_path<'p>(flag: &str, p: &'p Path) -> Result<&'p str> {
    p.to_str().with_context(|| {
        format!(
            "{flag} {}: the path is not valid UTF-8, and config files keep paths as text; rename it, or pass a link to it with a UTF-8 name",
            p.display()
        )
    })
}

/// `s` as a quoted TOML string (paths may hold backslashes and quotes).
fn toml_str(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

#[derive(Args)]
pub struct TrainArgs {
    #[command(flatten)]
    cfg: ConfigArgs,
    /// Run folder (config, metrics.jsonl, checkpoints, final model).
    #[arg(long, default_value = "runs/latest")]
    out: PathBuf,
    /// Continue the run in --out from its newest complete checkpoint (its config.toml is the base; --set may change train keys; --config/--preset must agree with it). `--resume auto`: continue when --out holds a run, else start one (for requeued jobs).
    #[arg(long, num_args = 0..=1, default_missing_value = "latest", value_name = "auto")]
    resume: Option<ResumeMode>,
    /// Continue from this checkpoint of --out (e.g. step-0000300) instead of the newest one.
    #[arg(long, value_name = "step-N", conflicts_with = "resume")]
    resume_from: Option<String>,
    /// No progress bar and no messages (errors still go to stderr).
    #[arg(long, short)]
    quiet: bool,
    /// Print the resolved config and exit.
    #[arg(long)]
    print_config: bool,
    /// Stop after N steps as if killed (for testing resume).
    #[arg(long, hide = true)]
    stop_after: Option<usize>,
}

/// What `--resume` asks.
#[derive(Clone, Copy, PartialEq, clap::ValueEnum)]
enum ResumeMode {
    /// From the newest checkpoint (plain `--resume`).
    #[value(hide = true)]
    Latest,
    /// Resume when --out holds a run, else start one.
    Auto,
}

impl TrainArgs {
    /// Whether this command continues the run in --out.
    fn resuming(&self) -> bool {
        match self.resume {
            Some(ResumeMode::Latest) => true,
            Some(ResumeMode::Auto) => run_dir::holds_run(&self.out),
            None => self.resume_from.is_some(),
        }
    }
}

pub fn run(a: TrainArgs) -> Result<()> {
    let resume = a.resuming();
    let cfg = resolve_config(&a, resume)?;
    if a.print_config {
        print!("{}", cfg.to_toml());
        return Ok(());
    }
    footprint::check_threads(&cfg.train)?;
    set_threads(cfg.train.threads);
    let opts = TrainOptions {
        out: a.out.clone(),
        resume,
        resume_from: a.resume_from.clone(),
        progress: progress(),
        quiet: a.quiet,
        stop_after: a.stop_after,
    };
    let s =
        train::train(cfg, &opts).with_context(|| format!("training into {}", a.out.display()))?;
    if !a.quiet {
        eprintln!(
            "done: {} steps, {} tokens, {:.0} s | val loss {:.4} (unigram entropy {:.3}), ppl {:.2} over {} tokens",
            s.steps, s.tokens, s.wall_s, s.val_loss, s.unigram_entropy, s.val_ppl, s.val_tokens
        );
        eprintln!("results in {}:", a.out.display());
        eprintln!("  metrics.jsonl  per-step training and evaluation metrics (pandas.read_json(..., lines=True))");
        eprintln!("  summary.json   final numbers");
        eprintln!("  model.safetensors + config.json  final weights (FORMAT.md); checkpoints/  resumable state");
    }
    println!("{}", a.out.display());
    Ok(())
}

/// The resumed run's saved config with the overrides (and --config/--preset,
/// when given, must agree with it), or preset < file < overrides.
fn resolve_config(a: &TrainArgs, resume: bool) -> Result<Config> {
    let sets = a.cfg.all_sets()?;
    let saved = a.out.join("config.toml");
    let given = a.cfg.config.is_some() || a.cfg.preset.is_some();
    let fresh = || Config::resolve(a.cfg.preset.as_deref(), a.cfg.config.as_deref(), &sets);
    if resume && saved.is_file() {
        let cfg = Config::resume(&saved, &sets)?;
        if given {
            refuse_differences(&cfg, fresh()?, &saved)?;
        }
        return Ok(cfg);
    }
    if resume && !given && run_dir::holds_run(&a.out) {
        bail!(
            "{} is missing, and resuming needs the run's config: restore it, or pass the run's --config/--preset (and --set keys)",
            saved.display()
        );
    }
    Ok(fresh()?)
}

/// Refuse a --config/--preset on resume that gives other values than the
/// run's: every such key is named with both values.
fn refuse_differences(run: &Config, mut asked: Config, saved: &Path) -> Result<()> {
    // vocab_size 0 means "the tokenizer's", which the run has fixed.
    if asked.model.vocab_size == 0 {
        asked.model.vocab_size = run.model.vocab_size;
    }
    let diffs = run.differences(&asked);
    if diffs.is_empty() {
        return Ok(());
    }
    let list: Vec<String> = diffs
        .iter()
        .map(|(k, was, now)| format!("{k}: the run has {was}, this command gives {now}"))
        .collect();
    bail!(
        "--resume: this command's config differs from the run's {} in {}; drop --config/--preset, or make them agree (use --set for train keys)",
        saved.display(),
        list.join("; ")
    )
}
