//! The `moescope` command line: a thin layer over the library.

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use moescope::checkpoint::load_model;
use moescope::config::{Config, DataConfig, PRESETS};
use moescope::data::{corpus::Split, Dataset};
use moescope::experiments::sweep::{self, SweepDir, SweepSpec};
use moescope::train::{self, TrainOptions};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};

#[derive(Parser)]
#[command(
    name = "moescope",
    version,
    about = "Train Mixture-of-Experts language models and measure the geometry of their experts.",
    long_about = "Train Mixture-of-Experts language models and measure the geometry of their experts.\n\n\
Quick start (built-in synthetic corpus, about a minute on 2 cores):\n  moescope train --preset tiny --out runs/tiny"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Train a NanoGPT-MoE language model.
    Train(TrainArgs),
    /// Evaluate a trained model: loss and perplexity on a split.
    Eval(EvalArgs),
    /// Sample text from a trained model.
    Generate(GenerateArgs),
    /// Every expert-geometry measure of SPEC.md on a checkpoint, as JSON (schema moescope.analysis/1).
    Analyze(AnalyzeArgs),
    /// Run a sweep: the product of listed values over config keys, in parallel worker processes; resumable.
    Sweep(SweepArgs),
    /// Write report.md and report.html (tables, SVG figures) for a sweep folder.
    Report {
        /// The sweep folder (holding sweep.toml and runs/).
        dir: PathBuf,
    },
    /// The weight-vs-activation study as a preset sweep, then its report.
    Reproduce(ReproduceArgs),
    /// Benchmarks (compare with the PyTorch peer in ../shared/bench).
    Bench {
        #[command(subcommand)]
        what: BenchCmd,
    },
}

#[derive(Args)]
struct ConfigArgs {
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

fn toml_str(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

#[derive(Args)]
struct TrainArgs {
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

#[derive(Args)]
struct EvalArgs {
    /// A run folder, checkpoint folder or model.safetensors (with config.json beside it).
    #[arg(long)]
    model: PathBuf,
    /// Corpus to evaluate on (default: the run's own data).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Split: valid or test.
    #[arg(long, default_value = "valid", value_parser = ["valid", "test"])]
    split: String,
    /// Evaluate only the first N target tokens (0 = the whole split).
    #[arg(long, default_value_t = 0)]
    tokens: usize,
    /// Sequences per forward pass.
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
}

#[derive(Args)]
struct AnalyzeArgs {
    /// A moescope run/checkpoint folder or model.safetensors; a Hugging Face model folder
    /// (config.json + *.safetensors); or a hub id `org/name` (HF cache, downloaded when online).
    #[arg(long)]
    model: String,
    /// Hugging Face models: only these decoder layers (MoE layers, comma-separated); earlier
    /// layers still run to produce their inputs.
    #[arg(long, value_delimiter = ',')]
    layers: Option<Vec<usize>>,
    /// Hugging Face models: tokens per window (default: min(512, max_position_embeddings)).
    #[arg(long)]
    seq_len: Option<usize>,
    /// Hugging Face models: load every layer first instead of streaming one layer at a time.
    #[arg(long)]
    in_memory: bool,
    /// Hugging Face hub revision (branch, tag or commit) for `org/name`.
    #[arg(long, default_value = "main")]
    revision: String,
    /// Text corpus (file or folder) tokenised with the model's tokenizer; default: a moescope run's own
    /// validation split, or the built-in corpus for Hugging Face models.
    #[arg(long, conflicts_with = "token_ids")]
    data: Option<PathBuf>,
    /// Already tokenised input: a JSON array of integers or a 1-D .npy of integer ids.
    #[arg(long)]
    token_ids: Option<PathBuf>,
    /// Tokens to analyse (the first N of the input).
    #[arg(long, default_value_t = 8192)]
    tokens: usize,
    /// Weight-overlap families, comma-separated: up, gate, down, router.
    #[arg(long, default_value = "up,gate,down,router", value_delimiter = ',')]
    families: Vec<String>,
    /// Sequences per forward pass.
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Cross-expert Jacobian alignment: exact, estimate (Hutchinson, 64 probes), estimate:M, auto, off.
    #[arg(long, default_value = "auto")]
    jacobian: String,
    /// Jacobian alignment over `routed` pairs (i<j both selected) or `all` pairs.
    #[arg(long, default_value = "routed", value_parser = ["routed", "all"])]
    jacobian_pairs: String,
    /// Tokens (the first analysed) used for Jacobian alignment.
    #[arg(long, default_value_t = 1024)]
    jacobian_tokens: usize,
    /// Routed tokens per expert whose Jacobian spectrum is computed (0 = none).
    #[arg(long, default_value_t = 16)]
    spectra_tokens: usize,
    /// Expert subspaces: RANK (PCA rank), var:τ (smallest rank reaching τ of the variance, cap 16), var:τ:CAP, or off.
    #[arg(long, default_value = "16")]
    subspace: String,
    /// PCA of the experts' routed `input`s or their `output`s h_e.
    #[arg(long, default_value = "input", value_parser = ["input", "output"])]
    space: String,
    /// Weight each routed row by its gate g_e.
    #[arg(long)]
    weighted: bool,
    /// Where to write the JSON report.
    #[arg(long, default_value = "report.json")]
    out: PathBuf,
    /// Also draw the report as SVG figures into this folder (measures by layer, E×E matrices).
    #[arg(long)]
    figures: Option<PathBuf>,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
}

#[derive(Args)]
struct SweepArgs {
    /// Sweep file: name, preset, base, [set] and [grid] (see README).
    spec: PathBuf,
    /// Sweep folder (default: sweeps/<name>).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Parallel worker processes (default: from cores and memory).
    #[arg(long)]
    jobs: Option<usize>,
    /// CPU threads per worker (default: cores / jobs).
    #[arg(long)]
    threads: Option<usize>,
    /// Write a Slurm job-array script (one task per run) instead of running locally.
    #[arg(long)]
    slurm: bool,
    /// Gather the runs' results into results.csv / results.jsonl and the report.
    #[arg(long)]
    collect: bool,
    /// Run only the run with this index, in this process (what each worker runs).
    #[arg(long, hide = true)]
    run_one: Option<usize>,
}

#[derive(Args)]
struct ReproduceArgs {
    /// quick (tiny, 3 λ, 2 seeds: minutes), cpu (small, 7 λ, 3 seeds: hours), paper (7 λ, 5 seeds, 3 corpora: GPU/Slurm).
    #[arg(long, default_value = "cpu", value_parser = ["quick", "cpu", "paper"])]
    scale: String,
    /// Corpus for every run (default: built-in corpus; the paper scale uses TinyStories, WikiText-103, PTB).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Sweep folder (default: reproduce-<scale>).
    #[arg(long)]
    out: Option<PathBuf>,
    #[arg(long)]
    jobs: Option<usize>,
    #[arg(long)]
    threads: Option<usize>,
    /// Write a Slurm job-array script instead of running locally.
    #[arg(long)]
    slurm: bool,
}

#[derive(Args)]
struct GenerateArgs {
    /// A run folder, checkpoint folder or model.safetensors.
    #[arg(long)]
    model: PathBuf,
    /// Text to continue.
    #[arg(long, default_value = "")]
    prompt: String,
    /// Tokens to generate.
    #[arg(long, default_value_t = 200)]
    tokens: usize,
    /// Sampling temperature (0 = greedy).
    #[arg(long, default_value_t = 0.8)]
    temperature: f64,
    /// Sample among the k most likely tokens (0 = all).
    #[arg(long, default_value_t = 40)]
    top_k: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
}

#[derive(Subcommand)]
enum BenchCmd {
    /// Jacobian alignment on a random MoE layer: exact vs Hutchinson vs naive autodiff Jacobians.
    Jacobian {
        #[arg(long, default_value_t = 512)]
        d_model: usize,
        #[arg(long, default_value_t = 2048)]
        d_ff: usize,
        #[arg(long, default_value_t = 8)]
        experts: usize,
        /// SwiGLU experts (default MLP/SiLU).
        #[arg(long)]
        swiglu: bool,
        #[arg(long, default_value_t = 4096)]
        tokens: usize,
        /// Tokens on which the naive way is timed (then scaled to all).
        #[arg(long, default_value_t = 2)]
        naive_tokens: usize,
        /// Skip exact mode and the naive way (e.g. Mixtral-sized layers).
        #[arg(long)]
        estimate_only: bool,
        #[arg(long, default_value_t = 0)]
        threads: usize,
    },
    /// Cost of logging the measures at evaluation (activation capture + weight MSO), in % of an eval pass.
    Eval {
        #[arg(long, default_value = "tiny", value_parser = clap::builder::PossibleValuesParser::new(PRESETS))]
        preset: String,
        #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
        sets: Vec<String>,
        #[arg(long, default_value_t = 4096)]
        vocab: usize,
        /// Validation tokens per eval pass.
        #[arg(long, default_value_t = 32768)]
        eval_tokens: usize,
        /// Tokens on which activations are captured (default: the preset's measure.tokens).
        #[arg(long)]
        measure_tokens: Option<usize>,
        #[arg(long, default_value_t = 5)]
        reps: usize,
        #[arg(long, default_value_t = 0)]
        threads: usize,
    },
    /// Streaming analysis of a random Mixtral-shaped HF checkpoint written to disk: time and peak RSS per layer.
    Hf {
        /// Where the random checkpoint is written (reused when it matches).
        #[arg(long, default_value = "target/bench-mixtral")]
        dir: PathBuf,
        /// Decoder layers of the checkpoint (each is ~2.8 GB in bf16 at full size).
        #[arg(long, default_value_t = 2)]
        layers: usize,
        /// Tiny shapes instead of Mixtral-8x7B's (d 4096, f 14336, 8 experts, vocab 32000).
        #[arg(long)]
        tiny: bool,
        #[arg(long, default_value_t = 256)]
        tokens: usize,
        #[arg(long, default_value_t = 128)]
        seq_len: usize,
        /// Load both layers first (compare peak memory with streaming).
        #[arg(long)]
        in_memory: bool,
        /// Jacobian alignment mode (off, exact, estimate:M, auto).
        #[arg(long, default_value = "off")]
        jacobian: String,
        /// Expert subspaces (off or a rank).
        #[arg(long, default_value = "off")]
        subspace: String,
        #[arg(long, default_value_t = 0)]
        threads: usize,
    },
    /// Training-step throughput (tokens/s, model GFLOP/s) on synthetic tokens; last line is JSON.
    Train {
        /// Shapes: `tiny` and `small` are the PyTorch peer's configs of those names, `paper` the paper's.
        #[arg(long, default_value = "tiny", value_parser = clap::builder::PossibleValuesParser::new(PRESETS))]
        preset: String,
        /// Override model keys, e.g. --set model.d_model=512.
        #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
        sets: Vec<String>,
        /// Vocabulary of the synthetic tokens (the peer's tiny uses 4096).
        #[arg(long, default_value_t = 4096)]
        vocab: usize,
        /// Sequences per step (default: the preset's train.batch_size).
        #[arg(long)]
        batch: Option<usize>,
        #[arg(long, default_value_t = 60)]
        steps: usize,
        /// Steps excluded from the median.
        #[arg(long, default_value_t = 10)]
        warmup: usize,
        /// `fused` (the training engine) or `autodiff` (the reference path).
        #[arg(long, default_value = "fused", value_parser = ["fused", "autodiff"])]
        engine: String,
        /// CPU threads (0 = all cores).
        #[arg(long, default_value_t = 0)]
        threads: usize,
    },
}

/// A benchmark's config: the preset with `--set`s; synthetic tokens have `vocab` ids
/// unless the config fixes `model.vocab_size`.
fn bench_config(preset: &str, sets: &[String], vocab: usize) -> Result<Config> {
    let mut cfg = Config::resolve(Some(preset), None, sets)?;
    if cfg.model.vocab_size == 0 {
        cfg.model.vocab_size = vocab;
    }
    Ok(cfg)
}

fn set_threads(n: usize) {
    if n > 0 {
        // candle and gemm read RAYON_NUM_THREADS; rayon's global pool is built from it.
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
        let _ = rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global();
    }
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        eprintln!("error: {e}");
        for cause in e.chain().skip(1) {
            eprintln!("  caused by: {cause}");
        }
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Train(a) => cmd_train(a),
        Cmd::Eval(a) => cmd_eval(a),
        Cmd::Generate(a) => cmd_generate(a),
        Cmd::Analyze(a) => cmd_analyze(a),
        Cmd::Sweep(a) => cmd_sweep(a),
        Cmd::Report { dir } => {
            let f = moescope::report::write_sweep_report(&SweepDir(dir))?;
            eprintln!("report: {}", f.markdown.display());
            println!("{}", f.html.display());
            Ok(())
        }
        Cmd::Reproduce(a) => {
            let data = a.data.as_ref().map(|d| {
                std::fs::canonicalize(d)
                    .unwrap_or(d.clone())
                    .display()
                    .to_string()
            });
            let spec = moescope::experiments::reproduce::spec(&a.scale, data.as_deref())?;
            let dir = a
                .out
                .unwrap_or_else(|| PathBuf::from(format!("reproduce-{}", a.scale)));
            run_sweep(spec, dir, a.jobs, a.threads, a.slurm, false)
        }
        Cmd::Bench { what } => match what {
            BenchCmd::Jacobian {
                d_model,
                d_ff,
                experts,
                swiglu,
                tokens,
                naive_tokens,
                estimate_only,
                threads,
            } => {
                set_threads(threads);
                if experts < 2 || tokens == 0 {
                    bail!("need at least 2 experts and 1 token");
                }
                let r = moescope::bench::bench_jacobian(
                    d_model,
                    d_ff,
                    experts,
                    swiglu,
                    tokens,
                    naive_tokens,
                    estimate_only,
                )?;
                eprintln!(
                    "bench jacobian d={} f={} E={} {}: {} instances | exact {} | estimate(64) {:.2} s | naive {} | speedup {} | max |ΔA| {} | auto picks {}",
                    r.d_model, r.d_ff, r.experts, r.expert, r.instances,
                    r.exact_s.map(|s| format!("{s:.2} s")).unwrap_or("-".into()),
                    r.estimate_s,
                    r.naive_s_extrapolated.map(|s| format!("{s:.0} s (extrapolated from {} tokens)", r.naive_tokens)).unwrap_or("-".into()),
                    r.speedup_exact_vs_naive.map(|s| format!("{s:.0}x")).unwrap_or("-".into()),
                    r.max_abs_diff.map(|s| format!("{s:.1e}")).unwrap_or("-".into()),
                    r.auto_picks
                );
                println!("{}", serde_json::to_string(&r)?);
                Ok(())
            }
            BenchCmd::Hf {
                dir,
                layers,
                tiny,
                tokens,
                seq_len,
                in_memory,
                jacobian,
                subspace,
                threads,
            } => {
                set_threads(threads);
                let geo = moescope::measures::analyze::GeometryOptions {
                    jacobian: moescope::measures::jacobian::JacobianMode::parse(&jacobian)
                        .map_err(|e| anyhow::anyhow!("--jacobian: {e}"))?,
                    jacobian_tokens: tokens,
                    spectra_tokens: 0,
                    subspace: moescope::measures::subspace::RankRule::parse(&subspace)
                        .map_err(|e| anyhow::anyhow!("--subspace: {e}"))?,
                    ..Default::default()
                };
                if layers == 0 || tokens == 0 {
                    bail!("need at least 1 layer and 1 token");
                }
                let r = moescope::bench::bench_hf(
                    &dir, layers, !tiny, tokens, seq_len, in_memory, &geo,
                )?;
                eprintln!(
                    "checkpoint {:.2} GB on disk, one layer {:.2} GB in f32, {} tokens ({}):",
                    r.disk_gb,
                    r.layer_f32_gb,
                    r.tokens,
                    if r.in_memory {
                        "in memory"
                    } else {
                        "streaming"
                    }
                );
                for t in &r.per_layer {
                    eprintln!(
                        "  layer {}: load {:.1} s, compute {:.1} s{}",
                        t.index,
                        t.load_s,
                        t.compute_s,
                        t.peak_rss_mb
                            .map(|m| format!(", peak RSS {:.2} GB", m * (1 << 20) as f64 / 1e9))
                            .unwrap_or_default()
                    );
                }
                eprintln!("total {:.1} s", r.total_s);
                println!("{}", serde_json::to_string(&r)?);
                Ok(())
            }
            BenchCmd::Eval {
                preset,
                sets,
                vocab,
                eval_tokens,
                measure_tokens,
                reps,
                threads,
            } => {
                set_threads(threads);
                let cfg = bench_config(&preset, &sets, vocab)?;
                let mt = measure_tokens.unwrap_or(cfg.measure.tokens);
                let r = moescope::bench::bench_eval(
                    &preset,
                    &cfg.model,
                    eval_tokens,
                    mt,
                    cfg.train.batch_size,
                    reps.max(1),
                )?;
                eprintln!(
                    "bench eval {}: {:.3} s plain, {:.3} s with measures on {} of {} tokens: +{:.1}%",
                    r.preset, r.plain_s, r.measured_s, r.measure_tokens, r.eval_tokens, r.overhead_pct
                );
                println!("{}", serde_json::to_string(&r)?);
                Ok(())
            }
            BenchCmd::Train {
                preset,
                sets,
                vocab,
                batch,
                steps,
                warmup,
                engine,
                threads,
            } => {
                set_threads(threads);
                if steps <= warmup {
                    bail!("--steps ({steps}) must exceed --warmup ({warmup})");
                }
                // `tiny` and `small` are the peer's configs of the same names.
                let sets: Vec<String> = moescope::bench::peer_sets(&preset)
                    .iter()
                    .map(|s| s.to_string())
                    .chain(sets)
                    .collect();
                let cfg = bench_config(&preset, &sets, vocab)?;
                let o = moescope::bench::BenchOptions {
                    preset,
                    batch: batch.unwrap_or(cfg.train.batch_size),
                    model: cfg.model,
                    steps,
                    warmup,
                    seed: 0,
                    lr: 5e-4,
                    orth_lambda: cfg.reg.orth_lambda,
                    autodiff: engine == "autodiff",
                };
                let r = moescope::bench::bench_train(&o, std::io::stderr().is_terminal())?;
                eprintln!(
                    "bench train {} ({} engine): {:.0} tokens/s, {:.1} model GFLOP/s = {:.0}% of the measured GEMM ceiling ({:.0} GFLOP/s), median step {:.1} ms, cpu util {:.2}, peak RSS {:.0} MB",
                    r.preset, r.engine, r.tokens_per_s, r.gflops, 100.0 * r.ceiling_share, r.gemm_ceiling_gflops,
                    r.median_step_s * 1e3, r.cpu_util, r.peak_rss_mb
                );
                if !r.sections_ms.is_empty() {
                    let parts: Vec<String> = r
                        .sections_ms
                        .iter()
                        .map(|(n, ms)| format!("{n} {ms:.1}"))
                        .collect();
                    eprintln!("ms per step: {}", parts.join(", "));
                }
                eprintln!("peer (same shapes): {}", r.peer_command);
                println!("{}", serde_json::to_string(&r)?);
                Ok(())
            }
        },
    }
}

fn cmd_train(a: TrainArgs) -> Result<()> {
    let sets = a.cfg.all_sets();
    let cfg = if a.resume && a.out.join("config.toml").is_file() {
        let saved_path = a.out.join("config.toml");
        if a.cfg.config.is_some() || a.cfg.preset.is_some() {
            bail!("--resume takes its config from {}; drop --config/--preset (use --set for train keys)", saved_path.display());
        }
        let saved = Config::from_toml_file(&saved_path)?;
        let mut table = toml::Table::try_from(&saved)?;
        for s in &sets {
            moescope::config::apply_set(&mut table, s)?;
        }
        let cfg: Config = toml::Value::Table(table)
            .try_into()
            .context("resolving the resumed config")?;
        cfg.validate()?;
        if cfg.model != saved.model || cfg.data != saved.data {
            bail!(
                "--resume cannot change [model] or [data] keys of {} (only [train] keys)",
                saved_path.display()
            );
        }
        cfg
    } else {
        Config::resolve(a.cfg.preset.as_deref(), a.cfg.config.as_deref(), &sets)?
    };
    if a.print_config {
        print!("{}", cfg.to_toml());
        return Ok(());
    }
    set_threads(cfg.train.threads);
    let opts = TrainOptions {
        out: a.out.clone(),
        resume: a.resume,
        progress: std::io::stderr().is_terminal(),
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

/// The data config of a saved model's run (defaults when it has none), with the
/// run's own copy of its tokenizer.json and `data` (a corpus path) applied.
fn run_data_config(model: &Path, run_cfg: Option<Config>, data: Option<&Path>) -> DataConfig {
    let mut cfg = run_cfg.map(|c| c.data).unwrap_or_default();
    let run_tok = model.join("tokenizer.json");
    if run_tok.is_file() {
        cfg.tokenizer = run_tok.display().to_string();
    }
    if let Some(d) = data {
        cfg.path = d.display().to_string();
    }
    cfg
}

fn cmd_eval(a: EvalArgs) -> Result<()> {
    let device = moescope::device::parse_device(&a.device)?;
    let (model, run_cfg) = load_model(&a.model, &device)?;
    let data_cfg = run_data_config(&a.model, run_cfg, a.data.as_deref());
    let ds = Dataset::load(&data_cfg, std::io::stderr().is_terminal())?;
    if ds.tokenizer.vocab_size() > model.cfg.vocab_size {
        bail!(
            "the data's tokenizer has {} ids but the model only {}",
            ds.tokenizer.vocab_size(),
            model.cfg.vocab_size
        );
    }
    let split = if a.split == "test" {
        Split::Test
    } else {
        Split::Valid
    };
    let r = train::evaluate(&model, ds.split(split)?, a.batch.max(1), a.tokens)?;
    eprintln!(
        "{} {}: loss {:.4}, ppl {:.3} over {} tokens",
        ds.source, a.split, r.loss, r.ppl, r.tokens
    );
    println!(
        "{}",
        serde_json::json!({"model": a.model, "data": ds.source, "split": a.split, "loss": r.loss, "ppl": r.ppl, "tokens": r.tokens})
    );
    Ok(())
}

fn cmd_analyze(a: AnalyzeArgs) -> Result<()> {
    use moescope::measures::{analyze, Family};
    // Check the options before any heavy work.
    let geo = analyze::GeometryOptions {
        jacobian: moescope::measures::jacobian::JacobianMode::parse(&a.jacobian)
            .map_err(|e| anyhow::anyhow!("--jacobian: {e}"))?,
        jacobian_all_pairs: a.jacobian_pairs == "all",
        jacobian_tokens: a.jacobian_tokens,
        spectra_tokens: a.spectra_tokens,
        subspace: moescope::measures::subspace::RankRule::parse(&a.subspace)
            .map_err(|e| anyhow::anyhow!("--subspace: {e}"))?,
        output_space: a.space == "output",
        weighted: a.weighted,
        ..Default::default()
    };
    let families: Vec<Family> = a
        .families
        .iter()
        .map(|f| Family::parse(f, "--families"))
        .collect::<Result<_, _>>()?;
    if let Some(dir) = hf_model_dir(&a.model, &a.revision)? {
        return analyze_hf(&a, &dir, &families, &geo);
    }
    if a.layers.is_some() || a.seq_len.is_some() || a.in_memory {
        bail!("--layers, --seq-len and --in-memory apply to Hugging Face checkpoints; {} is a moescope model", a.model);
    }
    let model_path = PathBuf::from(&a.model);
    let device = moescope::device::parse_device(&a.device)?;
    let (model, run_cfg) = load_model(&model_path, &device)?;
    // The library checks the tokens (empty, out of vocabulary, fewer than --tokens).
    let (tokens, data_desc) = if let Some(p) = &a.token_ids {
        (analyze::read_token_ids(p)?, p.display().to_string())
    } else {
        let data_cfg = run_data_config(&model_path, run_cfg, a.data.as_deref());
        let ds = Dataset::load(&data_cfg, std::io::stderr().is_terminal())?;
        let mut v = Vec::new();
        ds.valid
            .extend_into(&mut v, 0, a.tokens.min(ds.valid.len()));
        (v, format!("{} (validation split)", ds.source))
    };
    let source = analyze::Source {
        checkpoint: a.model.clone(),
        data: data_desc.clone(),
        seed: 0,
    };
    let report = analyze::analyze_with(
        &model,
        &tokens,
        a.tokens,
        a.batch.max(1),
        &families,
        &geo,
        source,
    )
    .with_context(|| format!("analysing {data_desc}"))?;
    write_report(&a, &report)
}

fn write_report(a: &AnalyzeArgs, report: &moescope::measures::analyze::Report) -> Result<()> {
    let json = serde_json::to_vec_pretty(report)?;
    moescope::fsutil::write_atomic(&a.out, &json)?;
    eprint!("{}", moescope::measures::analyze::summary_table(report));
    eprintln!("report: {}", a.out.display());
    if let Some(dir) = &a.figures {
        let files = moescope::report::analysis::analysis_figures(report, dir)?;
        eprintln!("figures: {} SVG files in {}", files.len(), dir.display());
    }
    Ok(())
}

/// The folder of a Hugging Face checkpoint named by `--model`, or None for a moescope model.
fn hf_model_dir(model: &str, revision: &str) -> Result<Option<PathBuf>> {
    use moescope::hf;
    let p = Path::new(model);
    if p.exists() {
        let dir = if p.is_dir() {
            p
        } else {
            p.parent().unwrap_or(Path::new("."))
        };
        let cfg = dir.join("config.json");
        if hf::config::is_hf_config(&cfg) {
            return Ok(Some(dir.to_path_buf()));
        }
        return Ok(None);
    }
    if hf::hub::is_repo_id(model) {
        let dir = hf::hub::resolve(model, revision, std::io::stderr().is_terminal())?;
        return Ok(Some(dir));
    }
    bail!("--model {model}: no such file or folder (and not a Hugging Face hub id `org/name`)")
}

fn analyze_hf(
    a: &AnalyzeArgs,
    dir: &Path,
    families: &[moescope::measures::Family],
    geo: &moescope::measures::analyze::GeometryOptions,
) -> Result<()> {
    use moescope::hf::{self, analyze::HfOptions};
    use moescope::measures::analyze;
    if a.device != "cpu" {
        bail!(
            "--device {}: Hugging Face checkpoints are analysed on the CPU",
            a.device
        );
    }
    let ck = hf::HfCheckpoint::open(dir)?;
    let cfg = &ck.cfg;
    eprintln!(
        "{}: {} ({}), {} layers ({} MoE), {} experts, top-{}, d {}, expert d_ff {}{}",
        a.model,
        cfg.arch.name(),
        ck.dtype(),
        cfg.n_layers,
        cfg.n_moe_layers(),
        cfg.n_experts,
        cfg.top_k,
        cfg.hidden_size,
        cfg.moe_d_ff,
        cfg.shared
            .map(|s| format!(", shared expert d_ff {}", s.d_ff))
            .unwrap_or_default()
    );
    let jac_tokens = geo.jacobian_tokens.min(a.tokens);
    if let Some((mode, flops)) = moescope::measures::jacobian::plan(
        geo.jacobian,
        cfg.hidden_size,
        cfg.moe_d_ff,
        cfg.n_experts,
        2,
        jac_tokens,
        cfg.top_k,
        geo.jacobian_all_pairs,
    ) {
        eprintln!(
            "Jacobian alignment: {mode} mode on {jac_tokens} tokens, about {:.2} TFLOP (f64) per MoE layer; \
             --jacobian-tokens N or --jacobian off for a quicker run",
            flops / 1e12
        );
    }
    let (tokens, data_desc) = if let Some(p) = &a.token_ids {
        (analyze::read_token_ids(p)?, p.display().to_string())
    } else {
        let Some(tok) = &ck.files.tokenizer else {
            bail!(
                "{} has no tokenizer.json; pass already tokenised input with --token-ids",
                dir.display()
            );
        };
        let data_cfg = DataConfig {
            tokenizer: tok.display().to_string(),
            path: a
                .data
                .as_ref()
                .map(|d| d.display().to_string())
                .unwrap_or_default(),
            ..Default::default()
        };
        let ds = Dataset::load(&data_cfg, std::io::stderr().is_terminal())?;
        let mut v = Vec::new();
        ds.valid
            .extend_into(&mut v, 0, (a.tokens + 1).min(ds.valid.len()));
        (v, format!("{} (validation split)", ds.source))
    };
    let opts = HfOptions {
        tokens: a.tokens,
        seq_len: a.seq_len.unwrap_or(cfg.max_position.min(512)),
        batch: a.batch.max(1),
        layers: a.layers.clone(),
        in_memory: a.in_memory,
        progress: std::io::stderr().is_terminal(),
    };
    let source = analyze::Source {
        checkpoint: format!("{} ({}, {})", a.model, cfg.arch.name(), ck.dtype()),
        data: data_desc.clone(),
        seed: 0,
    };
    let (report, timings) = hf::analyze::analyze(&ck, &tokens, &opts, families, geo, source)
        .with_context(|| format!("analysing {} on {data_desc}", a.model))?;
    for t in &timings {
        eprintln!(
            "layer {:>3}: load {:>7.2} s, compute {:>7.2} s{}",
            t.index,
            t.load_s,
            t.compute_s,
            t.peak_rss_mb
                .map(|m| format!(", peak RSS {m:.0} MiB"))
                .unwrap_or_default()
        );
    }
    if let Some(p) = &report.perplexity {
        eprintln!(
            "next-token loss {:.4}, perplexity {:.2} over {} tokens",
            p.loss, p.ppl, p.tokens
        );
    }
    write_report(a, &report)
}

fn cmd_sweep(a: SweepArgs) -> Result<()> {
    let spec = SweepSpec::from_file(&a.spec)?;
    let dir = a
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from("sweeps").join(&spec.name));
    if let Some(i) = a.run_one {
        let dir = SweepDir(dir);
        let cells = spec.cells()?;
        let cell = cells
            .get(i)
            .with_context(|| format!("--run-one {i}: the sweep has {} runs", cells.len()))?;
        set_threads(a.threads.unwrap_or(0));
        let s = sweep::run_one(&dir, cell, a.threads)?;
        if s.status != "done" {
            bail!("run {} failed: {}", cell.id, s.error.unwrap_or_default());
        }
        return Ok(());
    }
    run_sweep(spec, dir, a.jobs, a.threads, a.slurm, a.collect)
}

fn run_sweep(
    spec: SweepSpec,
    dir: PathBuf,
    jobs: Option<usize>,
    threads: Option<usize>,
    slurm: bool,
    collect_only: bool,
) -> Result<()> {
    let dir = SweepDir(dir);
    let cells = sweep::plan(&spec, &dir)?;
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let jobs = jobs.unwrap_or_else(|| sweep::default_jobs(&cells)).max(1);
    let threads = threads.unwrap_or((cores / jobs).max(1));
    if slurm {
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
    if !collect_only {
        eprintln!(
            "sweep `{}`: {} runs in {} ({jobs} jobs × {threads} threads)",
            spec.name,
            cells.len(),
            dir.0.display()
        );
        let c = sweep::run_local(&dir, &cells, jobs, threads, std::io::stderr().is_terminal())?;
        eprintln!(
            "runs: {} done ({} already finished), {} failed",
            c.done, c.skipped, c.failed
        );
    }
    let f = moescope::report::write_sweep_report(&dir)?;
    eprintln!(
        "results: {} and {}",
        dir.0.join("results.csv").display(),
        dir.0.join("results.jsonl").display()
    );
    eprintln!("report:  {}", f.markdown.display());
    println!("{}", f.html.display());
    Ok(())
}

fn cmd_generate(a: GenerateArgs) -> Result<()> {
    use rand::{Rng, SeedableRng};
    let device = moescope::device::parse_device(&a.device)?;
    let (model, run_cfg) = load_model(&a.model, &device)?;
    let data_cfg = run_data_config(&a.model, run_cfg, None);
    let tok = moescope::data::tokenizer::Tokenizer::from_spec(&moescope::data::tokenizer_spec(
        &data_cfg,
    ))?;
    let mut ids = tok.encode_with_eot(&a.prompt)?;
    if ids.is_empty() {
        ids.extend(tok.eot());
    }
    if ids.is_empty() {
        bail!("empty prompt and the tokenizer has no end-of-text token: give --prompt");
    }
    let prompt_len = ids.len();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(a.seed);
    let t = model.cfg.seq_len;
    for _ in 0..a.tokens {
        let ctx = &ids[ids.len().saturating_sub(t)..];
        let x = candle_core::Tensor::new(ctx, &device)?.unsqueeze(0)?;
        let logits = model.forward(&x, false)?.logits;
        let last: Vec<f32> = logits.get(ctx.len() - 1)?.to_vec1()?;
        let vocab = tok.vocab_size().min(last.len());
        let last = &last[..vocab];
        let next = if a.temperature <= 0.0 {
            (0..vocab)
                .max_by(|&i, &j| last[i].total_cmp(&last[j]))
                .unwrap_or(0)
        } else {
            let mut idx: Vec<usize> = (0..vocab).collect();
            idx.sort_by(|&i, &j| last[j].total_cmp(&last[i]));
            if a.top_k > 0 {
                idx.truncate(a.top_k);
            }
            let m = last[idx[0]] as f64;
            let w: Vec<f64> = idx
                .iter()
                .map(|&i| ((last[i] as f64 - m) / a.temperature).exp())
                .collect();
            let z: f64 = w.iter().sum();
            let mut u = rng.random::<f64>() * z;
            let mut pick = idx[idx.len() - 1];
            for (k, &i) in idx.iter().enumerate() {
                u -= w[k];
                if u <= 0.0 {
                    pick = i;
                    break;
                }
            }
            pick
        };
        ids.push(next as u32);
    }
    println!("{}{}", a.prompt, tok.decode(&ids[prompt_len..]));
    Ok(())
}
