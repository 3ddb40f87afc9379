//! `moescope bench train`: the training-step benchmark, measured the way the
//! PyTorch peer (`nanogpt_moe.py`, kept outside this repository; docs/SPEED.md) measures itself: synthetic
//! Markov-chain tokens, full training steps (forward, backward, AdamW), the
//! median step time after warm-up, model FLOPs = 6·active params + 12·L·d·T.

use super::{cpu_seconds, gemm_ceiling_gflops, median, Markov};
use crate::config::{Config, ModelConfig, RegConfig, TrainConfig};
use crate::data::Batch;
use crate::device::parse_device;
use crate::model::Gpt;
use crate::train::engine::Engine;
use crate::train::optim::AdamW;
use crate::train::step::{adam_params, AutodiffStep, FusedStep, StepPlan, TrainStep};
use crate::Result;
use candle_core::DType;
use serde::Serialize;
use std::time::Instant;

/// Benchmark settings.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub preset: String,
    pub model: ModelConfig,
    pub batch: usize,
    pub steps: usize,
    pub warmup: usize,
    pub seed: u64,
    pub lr: f64,
    /// λ of the orthogonality loss on W_up (the peer's `--lam`).
    pub orth_lambda: f64,
    /// Time the autodiff reference instead of the fused engine (always on
    /// a device other than the CPU: the engine is CPU-only).
    pub autodiff: bool,
    /// `cpu`, `cuda` or `cuda:N`.
    pub device: String,
}

/// Benchmark result (printed as the last line, one JSON object).
#[derive(Debug, Clone, Serialize)]
pub struct BenchResult {
    pub mode: &'static str,
    pub preset: String,
    pub cfg: ModelConfig,
    pub batch: usize,
    pub threads: usize,
    pub params_total: usize,
    pub params_active: usize,
    pub flops_per_token: f64,
    pub median_step_s: f64,
    pub step_s_q1_q3: [f64; 2],
    pub tokens_per_s: f64,
    pub gflops: f64,
    pub timed_steps: usize,
    pub cpu_util: f64,
    pub final_ce: f64,
    /// Median seconds of forward, backward and optimiser per step.
    pub phase_s: [f64; 3],
    /// Fused engine only: milliseconds per step of each section.
    pub sections_ms: Vec<(String, f64)>,
    /// Fused engine only: for the sections that are mostly matrix products,
    /// their GEMM rate as a share of `gemm_ceiling_gflops`.
    pub sections_ceiling_share: Vec<(String, f64)>,
    /// `fused` (the training engine) or `autodiff` (the reference).
    pub engine: &'static str,
    /// This machine's measured fp32 GEMM rate (2048×512×2048, same threads).
    pub gemm_ceiling_gflops: f64,
    /// `gflops` / `gemm_ceiling_gflops`.
    pub ceiling_share: f64,
    /// Peak resident memory of the whole process (MB), as the peer's `ru_maxrss`.
    pub peak_rss_mb: f64,
    /// The peer's command for the same shapes.
    pub peer_command: String,
}

/// The step under test: the fused engine (with no model to make snapshots
/// from: the peak memory is the step's) or the autodiff reference, which
/// also times every device other than the CPU.
fn bench_step(o: &BenchOptions, tc: &TrainConfig) -> Result<Box<dyn TrainStep>> {
    let device = parse_device(&o.device)?;
    let model = Gpt::new(&o.model, DType::F32, &device, o.seed)?;
    let cfg = Config {
        model: o.model.clone(),
        train: tc.clone(),
        reg: RegConfig {
            orth_lambda: o.orth_lambda,
            ..Default::default()
        },
        ..Default::default()
    };
    if o.autodiff || !device.is_cpu() {
        let opt = AdamW::new(&model.params, tc)?;
        return Ok(Box::new(AutodiffStep::new(&cfg, model, opt)));
    }
    let eng = Engine::from_model(&o.model, &model.params, None, adam_params(&cfg))?;
    drop(model);
    Ok(Box::new(FusedStep::new(eng, None).with_orth(
        o.orth_lambda,
        crate::measures::OrthForm::default(),
    )))
}

/// Run the benchmark on the CPU.
pub fn bench_train(o: &BenchOptions, progress: bool) -> Result<BenchResult> {
    let cfg = &o.model;
    // The peer has no clipping: the benchmark step skips the gradient norm.
    let tc = TrainConfig {
        lr: o.lr,
        grad_clip: 0.0,
        ..Default::default()
    };
    let mut stepper = bench_step(o, &tc)?;
    // The ceiling is measured before and after the steps and the higher
    // kept: one 0.1 s measurement on a shared machine can land on a slow
    // moment and overstate every share.
    let ceiling_before = gemm_ceiling_gflops();
    let StepTimes {
        mut times,
        mut utils,
        mut phases,
        final_ce,
    } = time_steps(o, stepper.as_mut(), progress)?;
    let peak_rss_mb = crate::memory::peak_rss_bytes().unwrap_or(0) as f64 / 1e6;
    let ceiling = gemm_ceiling_gflops().max(ceiling_before);
    let timed = times.len();
    let med = median(&mut times); // sorts `times`
    let q = |p: f64| times[((times.len() - 1) as f64 * p).round() as usize];
    let (p_total, p_active) = cfg.param_counts();
    let fpt = cfg.flops_per_token();
    let tps = (o.batch * cfg.seq_len) as f64 / med;
    let sections_ms: Vec<(String, f64)> = match stepper.profile() {
        Some(p) => p
            .sections
            .iter()
            .map(|(n, s)| (n.to_string(), s * 1e3 / timed as f64))
            .collect(),
        None => Vec::new(),
    };
    Ok(BenchResult {
        mode: "train",
        preset: o.preset.clone(),
        cfg: cfg.clone(),
        batch: o.batch,
        threads: candle_core::utils::get_num_threads(),
        params_total: p_total,
        params_active: p_active,
        flops_per_token: fpt,
        median_step_s: med,
        step_s_q1_q3: [q(0.25), q(0.75)],
        tokens_per_s: tps,
        gflops: fpt * tps / 1e9,
        timed_steps: timed,
        cpu_util: median(&mut utils),
        final_ce,
        phase_s: [
            median(&mut phases[0]),
            median(&mut phases[1]),
            median(&mut phases[2]),
        ],
        sections_ceiling_share: section_shares(cfg, o.batch, &sections_ms, ceiling),
        sections_ms,
        engine: stepper.name(),
        gemm_ceiling_gflops: ceiling,
        ceiling_share: fpt * tps / 1e9 / ceiling,
        peak_rss_mb,
        peer_command: peer_command(o),
    })
}

/// GEMM flops per step of the engine's sections that are mostly matrix
/// products (the names of `engine::Profile`): the linear maps and the
/// experts, forward and backward (two products per forward one).
fn section_gemm_flops(cfg: &ModelConfig, batch: usize) -> [(&'static str, f64); 8] {
    let n = (batch * cfg.seq_len) as f64;
    let (d, f, v) = (cfg.d_model as f64, cfg.d_ff as f64, cfg.vocab_size as f64);
    let (layers, rows) = (cfg.n_layer as f64, n * cfg.top_k as f64);
    let qkv = layers * 2.0 * n * d * 3.0 * d;
    let proj = layers * 2.0 * n * d * d;
    let experts = layers * 2.0 * 2.0 * rows * d * f;
    let head = 2.0 * n * d * v;
    [
        ("ln_qkv", qkv),
        ("proj", proj),
        ("experts", experts),
        ("lm_head", head),
        ("qkv_ln_bwd", 2.0 * qkv),
        ("proj_bwd", 2.0 * proj),
        ("experts_bwd", 2.0 * experts),
        ("lm_head_bwd", 2.0 * head),
    ]
}

/// Each GEMM section's rate as a share of the measured ceiling.
fn section_shares(
    cfg: &ModelConfig,
    batch: usize,
    sections_ms: &[(String, f64)],
    ceiling: f64,
) -> Vec<(String, f64)> {
    section_gemm_flops(cfg, batch)
        .iter()
        .filter_map(|&(name, flops)| {
            let ms = sections_ms.iter().find(|(n, _)| n == name)?.1;
            let gflops = flops / (ms * 1e-3) / 1e9;
            Some((name.to_string(), gflops / ceiling))
        })
        .collect()
}

/// Per timed step (after warm-up): wall seconds, CPU utilisation, and the
/// forward / backward / optimiser seconds.
struct StepTimes {
    times: Vec<f64>,
    utils: Vec<f64>,
    phases: [Vec<f64>; 3],
    /// Cross-entropy of the last step.
    final_ce: f64,
}

/// Run `o.steps` steps on Markov tokens; the engine's section profile restarts
/// at the end of warm-up.
fn time_steps(o: &BenchOptions, stepper: &mut dyn TrainStep, progress: bool) -> Result<StepTimes> {
    let mut data = Markov::new(o.model.vocab_size, o.seed);
    let t = o.model.seq_len;
    let plan = StepPlan {
        lr: o.lr,
        top_k: o.model.top_k,
        grad_clip: 0.0,
        grad_norm: false,
    };
    let bar = if progress {
        indicatif::ProgressBar::new(o.steps as u64)
    } else {
        indicatif::ProgressBar::hidden()
    };
    let mut r = StepTimes {
        times: Vec::new(),
        utils: Vec::new(),
        phases: Default::default(),
        final_ce: f64::NAN,
    };
    for step in 0..o.steps {
        let (inputs, targets) = data.batch(o.batch, t);
        let batch = Batch {
            inputs,
            targets,
            b: o.batch,
            t,
        };
        if step == o.warmup {
            if let Some(p) = stepper.profile() {
                p.sections.clear();
            }
        }
        let t0 = Instant::now();
        let c0 = cpu_seconds();
        let stats = stepper.step(std::slice::from_ref(&batch), &plan)?;
        // A device step ends when its queued work has run (the peer, too,
        // synchronises before it stops each step's clock).
        stepper.synchronize()?;
        r.final_ce = stats.lm_loss;
        let dt = t0.elapsed().as_secs_f64();
        if step >= o.warmup {
            r.phases[0].push(stats.phases.forward_s);
            r.phases[1].push(stats.phases.backward_s);
            r.phases[2].push(stats.phases.optimizer_s);
            r.times.push(dt);
            r.utils.push((cpu_seconds() - c0) / dt);
        }
        bar.inc(1);
        bar.set_message(format!("ce {:.3} {:.0} ms", r.final_ce, dt * 1e3));
    }
    bar.finish_and_clear();
    Ok(r)
}

/// The PyTorch peer's command line for the same shapes and threads.
fn peer_command(o: &BenchOptions) -> String {
    let cfg = &o.model;
    format!(
        "python nanogpt_moe.py --config tiny --vocab {} --d_model {} --n_layer {} --n_head {} --n_expert {} --top_k {} --d_ff {} --seq_len {} --batch {} --bias {} --lam {} --steps {} --warmup {} --threads {}",
        cfg.vocab_size, cfg.d_model, cfg.n_layer, cfg.n_head, cfg.n_experts, cfg.top_k, cfg.d_ff, cfg.seq_len, o.batch,
        u8::from(cfg.bias), o.orth_lambda, o.steps, o.warmup, candle_core::utils::get_num_threads()
    ) + &match o.device.as_str() {
        "cpu" => String::new(),
        d => format!(" --device {d}"),
    }
}
