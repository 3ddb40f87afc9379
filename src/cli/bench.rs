//! `moescope bench ...`: the benchmarks; each prints a summary on stderr and
//! its result as one JSON line on stdout (what the comparison scripts read).

use super::set_threads;
use anyhow::{bail, Result};
use clap::builder::TypedValueParser;
use clap::{Args, Subcommand};
use moescope::bench::{self, BenchOptions};
use moescope::config::{Config, EngineChoice, JacobianMode, Precision, RankRule, PRESETS};
use moescope::measures::analyze::GeometryOptions;
use std::io::IsTerminal;
use std::path::PathBuf;

#[derive(Subcommand)]
pub enum BenchCmd {
    /// Jacobian alignment on a random MoE layer: exact vs Hutchinson vs naive autodiff Jacobians.
    Jacobian(JacobianArgs),
    /// Cost of logging the measures at evaluation (activation capture + weight MSO), in % of an eval pass.
    Eval(EvalArgs),
    /// Streaming analysis of a random Mixtral-shaped HF checkpoint written to disk: time and peak RSS per layer.
    Hf(HfArgs),
    /// Training-step throughput (tokens/s, model GFLOP/s) on synthetic tokens; last line is JSON.
    Train(TrainArgs),
    /// A tiny model's loss and every gradient on --device against the CPU; last line is JSON.
    Device(DeviceArgs),
}

#[derive(Args)]
pub struct JacobianArgs {
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
}

/// The model a benchmark runs: a preset, `--set` overrides and the
/// vocabulary of the synthetic tokens (shared by `bench train` and `bench eval`).
#[derive(Args)]
pub struct Shape {
    /// The preset the shapes start from (`bench train` uses the PyTorch peer's `tiny` and `small`).
    #[arg(long, default_value = "tiny", value_parser = clap::builder::PossibleValuesParser::new(PRESETS))]
    preset: String,
    /// Override model keys, e.g. --set model.d_model=512.
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    sets: Vec<String>,
    /// Vocabulary of the synthetic tokens (the peer's tiny uses 4096).
    #[arg(long, default_value_t = 4096)]
    vocab: usize,
}

impl Shape {
    /// The preset with `before` then the user's `--set`s; synthetic tokens
    /// have `vocab` ids unless the config fixes `model.vocab_size`.
    fn config(&self, before: &[&str]) -> Result<Config> {
        let sets: Vec<String> = before
            .iter()
            .map(|s| s.to_string())
            .chain(self.sets.iter().cloned())
            .collect();
        let mut cfg = Config::resolve(Some(&self.preset), None, &sets)?;
        if cfg.model.vocab_size == 0 {
            cfg.model.vocab_size = self.vocab;
        }
        Ok(cfg)
    }
}

#[derive(Args)]
pub struct EvalArgs {
    #[command(flatten)]
    shape: Shape,
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
}

#[derive(Args)]
pub struct HfArgs {
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
    jacobian: JacobianMode,
    /// Tokens (the first analysed) used for Jacobian alignment, as `analyze --jacobian-tokens`.
    #[arg(long, default_value_t = 1024)]
    jacobian_tokens: usize,
    /// Jacobian arithmetic: f32 (products in f32, sums in f64) or f64 (the reference).
    #[arg(long, default_value = "f32")]
    jacobian_precision: Precision,
    /// Expert subspaces (off or a rank).
    #[arg(long, default_value = "off")]
    subspace: RankRule,
    #[arg(long, default_value_t = 0)]
    threads: usize,
}

#[derive(Args)]
pub struct TrainArgs {
    #[command(flatten)]
    shape: Shape,
    /// Sequences per step (default: the preset's train.batch_size).
    #[arg(long)]
    batch: Option<usize>,
    #[arg(long, default_value_t = 60)]
    steps: usize,
    /// Steps excluded from the median.
    #[arg(long, default_value_t = 10)]
    warmup: usize,
    /// `fused` (the training engine) or `autodiff` (the reference path).
    /// Default: fused on the CPU; elsewhere only autodiff runs.
    #[arg(long, value_parser = bench_engine_parser())]
    engine: Option<EngineChoice>,
    /// CPU threads (0 = all cores).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// cpu, cuda or cuda:N. Off the CPU the autodiff model is timed (the
    /// fused engine is CPU-only), each step ending with a device synchronize.
    #[arg(long, default_value = "cpu")]
    device: String,
}

#[derive(Args)]
pub struct DeviceArgs {
    /// The device to check against the CPU: cuda or cuda:N.
    #[arg(long, default_value = "cuda")]
    device: String,
    /// Fail (exit 1) when any relative difference exceeds this.
    #[arg(long, default_value_t = 1e-4)]
    tolerance: f64,
}

/// `fused` or `autodiff`: a benchmark times one step, so `auto` has no meaning.
fn bench_engine_parser() -> impl TypedValueParser<Value = EngineChoice> {
    clap::builder::PossibleValuesParser::new(["fused", "autodiff"])
        .try_map(|s| s.parse::<EngineChoice>())
}

pub fn run(what: BenchCmd) -> Result<()> {
    match what {
        BenchCmd::Jacobian(a) => jacobian(a),
        BenchCmd::Eval(a) => eval(a),
        BenchCmd::Hf(a) => hf(a),
        BenchCmd::Train(a) => train(a),
        BenchCmd::Device(a) => device(a),
    }
}

fn device(a: DeviceArgs) -> Result<()> {
    let dev = moescope::device::parse_device(&a.device)?;
    let c = bench::device_check(&dev, &a.device)?;
    eprintln!(
        "loss: cpu {:.6}, {} {:.6} (relative difference {:.2e})",
        c.loss_cpu, c.device, c.loss_device, c.loss_rel
    );
    for (name, rel) in &c.grad_rel {
        eprintln!("  ∂/∂{name}: {rel:.2e}");
    }
    println!("{}", serde_json::to_string(&c)?);
    if c.worst_rel > a.tolerance {
        bail!(
            "the largest relative difference, {:.2e}, exceeds --tolerance {:.0e}",
            c.worst_rel,
            a.tolerance
        );
    }
    eprintln!("ok: every relative difference ≤ {:.0e}", a.tolerance);
    Ok(())
}

fn jacobian(a: JacobianArgs) -> Result<()> {
    set_threads(a.threads);
    if a.experts < 2 || a.tokens == 0 {
        bail!("need at least 2 experts and 1 token");
    }
    let r = bench::bench_jacobian(
        a.d_model,
        a.d_ff,
        a.experts,
        a.swiglu,
        a.tokens,
        a.naive_tokens,
        a.estimate_only,
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

fn eval(a: EvalArgs) -> Result<()> {
    set_threads(a.threads);
    let cfg = a.shape.config(&[])?;
    let mt = a.measure_tokens.unwrap_or(cfg.measure.tokens);
    let r = bench::bench_eval(
        &a.shape.preset,
        &cfg.model,
        a.eval_tokens,
        mt,
        cfg.train.batch_size,
        a.reps.max(1),
    )?;
    eprintln!(
        "bench eval {}: {:.3} s plain, {:.3} s with measures on {} of {} tokens: +{:.1}%",
        r.preset, r.plain_s, r.measured_s, r.measure_tokens, r.eval_tokens, r.overhead_pct
    );
    println!("{}", serde_json::to_string(&r)?);
    Ok(())
}

fn hf(a: HfArgs) -> Result<()> {
    set_threads(a.threads);
    let geo = GeometryOptions {
        jacobian: a.jacobian,
        jacobian_tokens: a.jacobian_tokens,
        jacobian_precision: a.jacobian_precision,
        spectra_tokens: 0,
        subspace: a.subspace,
        ..Default::default()
    };
    if a.layers == 0 || a.tokens == 0 {
        bail!("need at least 1 layer and 1 token");
    }
    let r = bench::bench_hf(
        &a.dir,
        a.layers,
        !a.tiny,
        a.tokens,
        a.seq_len,
        a.in_memory,
        &geo,
    )?;
    print_hf(&r)
}

fn train(a: TrainArgs) -> Result<()> {
    set_threads(a.threads);
    if a.steps <= a.warmup {
        bail!("--steps ({}) must exceed --warmup ({})", a.steps, a.warmup);
    }
    if a.engine == Some(EngineChoice::Fused) && a.device != "cpu" {
        bail!(
            "--engine fused runs on the CPU only; on --device {} the autodiff model is timed (drop --engine)",
            a.device
        );
    }
    // `tiny` and `small` are the peer's configs of the same names.
    let cfg = a.shape.config(bench::peer_sets(&a.shape.preset))?;
    let o = BenchOptions {
        preset: a.shape.preset,
        batch: a.batch.unwrap_or(cfg.train.batch_size),
        model: cfg.model,
        steps: a.steps,
        warmup: a.warmup,
        seed: 0,
        lr: 5e-4,
        orth_lambda: cfg.reg.orth_lambda,
        autodiff: a.engine == Some(EngineChoice::Autodiff),
        device: a.device,
    };
    let r = bench::bench_train(&o, std::io::stderr().is_terminal())?;
    print_train(&r)
}

fn print_hf(r: &bench::HfBenchResult) -> Result<()> {
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
    println!("{}", serde_json::to_string(r)?);
    Ok(())
}

fn print_train(r: &bench::BenchResult) -> Result<()> {
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
        let shares: Vec<String> = r
            .sections_ceiling_share
            .iter()
            .map(|(n, x)| format!("{n} {:.0}%", 100.0 * x))
            .collect();
        eprintln!("GEMM sections, share of the ceiling: {}", shares.join(", "));
    }
    eprintln!("peer (same shapes): {}", r.peer_command);
    println!("{}", serde_json::to_string(r)?);
    Ok(())
}
