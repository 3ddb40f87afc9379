//! `moescope train`: resolve the config (or the resumed run's), then train.

use super::{progress, set_threads};
use anyhow::{bail, Context, Result};
use clap::Args;
use moescope::config::{Config, PRESETS};
use moescope::train::{self, TrainOptions};
use std::path::PathBuf;

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
    #[arg(long)]
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
    fn all_sets(&self) -> Vec<String> {
        let mut sets = Vec::new();
        if let Some(d) = &self.data {
            sets.push(format!("data.path={}", toml_str(&d.display().to_string())));
        }
        if let Some(d) = &self.dataset {
            sets.push(format!("data.dataset={}", toml_str(d)));
        }
        if let Some(t) = self.threads {
            sets.push(format!("train.threads={t}"));
        }
        sets.extend(self.sets.iter().cloned());
        sets
    }
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
    /// Continue the run in --out from its latest checkpoint (its config.toml is the base; --set may change train keys).
    #[arg(long)]
    resume: bool,
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

pub fn run(a: TrainArgs) -> Result<()> {
    let cfg = resolve_config(&a)?;
    if a.print_config {
        print!("{}", cfg.to_toml());
        return Ok(());
    }
    set_threads(cfg.train.threads);
    let opts = TrainOptions {
        out: a.out.clone(),
        resume: a.resume,
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

/// The resumed run's saved config with the overrides, or preset < file < overrides.
fn resolve_config(a: &TrainArgs) -> Result<Config> {
    let sets = a.cfg.all_sets();
    let saved = a.out.join("config.toml");
    if a.resume && saved.is_file() {
        if a.cfg.config.is_some() || a.cfg.preset.is_some() {
            bail!(
                "--resume takes its config from {}; drop --config/--preset (use --set for train keys)",
                saved.display()
            );
        }
        return Ok(Config::resume(&saved, &sets)?);
    }
    Ok(Config::resolve(
        a.cfg.preset.as_deref(),
        a.cfg.config.as_deref(),
        &sets,
    )?)
}
