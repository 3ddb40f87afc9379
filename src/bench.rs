//! `moescope bench train`: the training-step benchmark, measured the way the
//! PyTorch peer (`../shared/bench/nanogpt_moe.py`) measures itself: synthetic
//! Markov-chain tokens, full training steps (forward, backward, AdamW), the
//! median step time after warm-up, model FLOPs = 6·active params + 12·L·d·T.

use crate::config::{Config, ModelConfig, RegConfig, TrainConfig};
use crate::data::Batch;
use crate::model::Gpt;
use crate::train::engine::Engine;
use crate::train::optim::AdamW;
use crate::train::step::{adam_params, AutodiffStep, FusedStep, StepPlan, TrainStep};
use crate::Result;
use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
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
    /// Time the autodiff reference instead of the fused engine.
    pub autodiff: bool,
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

/// Tokens from a random sparse Markov chain (each token has 4 successors), as the peer uses.
struct Markov {
    next: Vec<[u32; 4]>,
    rng: ChaCha8Rng,
}

impl Markov {
    fn new(vocab: usize, seed: u64) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed + 1);
        let next = (0..vocab)
            .map(|_| std::array::from_fn(|_| rng.random_range(0..vocab as u32)))
            .collect();
        Markov { next, rng }
    }
    fn batch(&mut self, b: usize, t: usize) -> (Vec<u32>, Vec<u32>) {
        let (mut x, mut y) = (Vec::with_capacity(b * t), Vec::with_capacity(b * t));
        for _ in 0..b {
            let mut cur = self.rng.random_range(0..self.next.len() as u32);
            for _ in 0..t {
                let nxt = self.next[cur as usize][self.rng.random_range(0..4)];
                x.push(cur);
                y.push(nxt);
                cur = nxt;
            }
        }
        (x, y)
    }
}

/// CPU seconds used by this process so far (Linux; 0 elsewhere).
fn cpu_seconds() -> f64 {
    let Ok(s) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    let after = s.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        0.5 * (v[n / 2 - 1] + v[n / 2])
    }
}

/// `--set`s that turn a preset into the PyTorch peer's config of the same
/// name (`tiny` is already the same; `small` is the peer's, not the training
/// preset's): applied before the user's own.
pub fn peer_sets(preset: &str) -> &'static [&'static str] {
    match preset {
        "small" => &[
            "model.vocab_size=8192",
            "model.d_model=512",
            "model.n_layer=6",
            "model.n_head=8",
            "model.n_experts=8",
            "model.top_k=2",
            "model.d_ff=2048",
            "model.seq_len=256",
            "train.batch_size=4",
        ],
        _ => &[],
    }
}

/// The step under test: the fused engine (without the model it would hand
/// back to, so that the peak memory is the step's) or the autodiff reference.
fn bench_step(o: &BenchOptions, tc: &TrainConfig) -> Result<Box<dyn TrainStep>> {
    let model = Gpt::new(&o.model, DType::F32, &Device::Cpu, o.seed)?;
    let cfg = Config {
        model: o.model.clone(),
        train: tc.clone(),
        reg: RegConfig {
            orth_lambda: o.orth_lambda,
            ..Default::default()
        },
        ..Default::default()
    };
    if o.autodiff {
        let opt = AdamW::new(&model.params, tc)?;
        return Ok(Box::new(AutodiffStep::new(&cfg, model, opt)));
    }
    let eng = Engine::from_model(&o.model, &model.params, None, adam_params(&cfg))?;
    drop(model);
    Ok(Box::new(
        FusedStep::new(eng, None).with_orth_lambda(o.orth_lambda),
    ))
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
    let mut data = Markov::new(cfg.vocab_size, o.seed);
    let t = cfg.seq_len;
    let mut times = Vec::new();
    let mut utils = Vec::new();
    let mut ce = f64::NAN;
    let mut phases: [Vec<f64>; 3] = Default::default();
    let bar = if progress {
        indicatif::ProgressBar::new(o.steps as u64)
    } else {
        indicatif::ProgressBar::hidden()
    };
    let mut stepper = bench_step(o, &tc)?;
    let plan = StepPlan {
        lr: o.lr,
        top_k: cfg.top_k,
        grad_clip: 0.0,
        grad_norm: false,
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
        ce = stats.lm_loss;
        let dt = t0.elapsed().as_secs_f64();
        if step >= o.warmup {
            phases[0].push(stats.phases.forward_s);
            phases[1].push(stats.phases.backward_s);
            phases[2].push(stats.phases.optimizer_s);
            times.push(dt);
            utils.push((cpu_seconds() - c0) / dt);
        }
        bar.inc(1);
        bar.set_message(format!("ce {ce:.3} {:.0} ms", dt * 1e3));
    }
    bar.finish_and_clear();
    let peak_rss_mb = crate::memory::peak_rss_bytes().unwrap_or(0) as f64 / 1e6;
    let ceiling = gemm_ceiling_gflops();
    let timed = times.len();
    let mut sorted = times.clone();
    let med = median(&mut times);
    sorted.sort_by(f64::total_cmp);
    let q = |p: f64| sorted[((sorted.len() - 1) as f64 * p).round() as usize];
    let (p_total, p_active) = cfg.param_counts();
    let fpt = cfg.flops_per_token();
    let tps = (o.batch * t) as f64 / med;
    let peer_command = format!(
        "python nanogpt_moe.py --config tiny --vocab {} --d_model {} --n_layer {} --n_head {} --n_expert {} --top_k {} --d_ff {} --seq_len {} --batch {} --bias {} --lam {} --steps {} --warmup {} --threads {}",
        cfg.vocab_size, cfg.d_model, cfg.n_layer, cfg.n_head, cfg.n_experts, cfg.top_k, cfg.d_ff, cfg.seq_len, o.batch,
        u8::from(cfg.bias), o.orth_lambda, o.steps, o.warmup, candle_core::utils::get_num_threads()
    );
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
        final_ce: ce,
        phase_s: [
            median(&mut phases[0]),
            median(&mut phases[1]),
            median(&mut phases[2]),
        ],
        sections_ms: match stepper.profile() {
            Some(p) => p
                .sections
                .iter()
                .map(|(n, s)| (n.to_string(), s * 1e3 / timed as f64))
                .collect(),
            None => Vec::new(),
        },
        engine: stepper.name(),
        gemm_ceiling_gflops: ceiling,
        ceiling_share: fpt * tps / 1e9 / ceiling,
        peak_rss_mb,
        peer_command,
    })
}

/// The fp32 GEMM rate this machine sustains with the engine's GEMM and the
/// current threads: best of several 2048×512×2048 products (GFLOP/s).
pub fn gemm_ceiling_gflops() -> f64 {
    use crate::train::engine::gemm::{matmul, Par, View};
    let (m, k, n) = (2048, 512, 2048);
    let a = vec![0.5f32; m * k];
    let b = vec![0.25f32; k * n];
    let mut c = vec![0.0f32; m * n];
    let mut best = f64::INFINITY;
    for _ in 0..8 {
        let t0 = Instant::now();
        matmul(
            &mut c,
            n,
            View::new(&a, m, k),
            View::new(&b, k, n),
            false,
            Par::Pool,
        );
        best = best.min(t0.elapsed().as_secs_f64());
    }
    2.0 * (m * k * n) as f64 / best / 1e9
}

/// Result of `moescope bench eval`: the cost of logging the measures.
#[derive(Debug, Clone, Serialize)]
pub struct EvalBenchResult {
    pub mode: &'static str,
    pub preset: String,
    pub eval_tokens: usize,
    pub measure_tokens: usize,
    /// Median seconds of an evaluation pass without measures.
    pub plain_s: f64,
    /// Median seconds of the same pass capturing activations on `measure_tokens`
    /// tokens, plus computing all logged measures (weight MSO per family included).
    pub measured_s: f64,
    /// 100 · (measured − plain) / plain.
    pub overhead_pct: f64,
    /// Seconds of the weight measures alone (part of `measured_s`).
    pub weight_measures_s: f64,
    pub reps: usize,
}

/// Time an evaluation pass with and without the measures, alternating.
pub fn bench_eval(
    preset: &str,
    cfg: &ModelConfig,
    eval_tokens: usize,
    measure_tokens: usize,
    batch: usize,
    reps: usize,
) -> Result<EvalBenchResult> {
    use crate::measures::Family;
    use crate::train::{eval_measures, evaluate_measured, MeasureSpec};
    let dev = Device::Cpu;
    let model = Gpt::new(cfg, DType::F32, &dev, 0)?;
    let mut data = Markov::new(cfg.vocab_size, 0);
    let (toks, _) = data.batch(1, eval_tokens + 1);
    let dir = std::env::temp_dir().join(format!("moescope-bench-{}", std::process::id()));
    let path = dir.join("eval.tok");
    crate::data::cache::TokenFile::write(&path, &toks, "bench", "bench", "valid")?;
    let file = crate::data::cache::TokenFile::open(&path)?;
    let families = [Family::Up, Family::Router];
    let (mut plain, mut measured) = (Vec::new(), Vec::new());
    for r in 0..reps + 1 {
        let t0 = Instant::now();
        evaluate_measured(&model, &file, batch, eval_tokens, None)?;
        let p = t0.elapsed().as_secs_f64();
        let t0 = Instant::now();
        let (_, accs) = evaluate_measured(
            &model,
            &file,
            batch,
            eval_tokens,
            Some(MeasureSpec {
                tokens: measure_tokens,
                seed: 0,
            }),
        )?;
        eval_measures(&model, &families, accs.as_deref())?;
        let m = t0.elapsed().as_secs_f64();
        if r > 0 {
            plain.push(p);
            measured.push(m);
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    let t0 = Instant::now();
    eval_measures(&model, &families, None)?;
    let weight_s = t0.elapsed().as_secs_f64();
    let (p, m) = (median(&mut plain), median(&mut measured));
    Ok(EvalBenchResult {
        mode: "eval",
        preset: preset.to_string(),
        eval_tokens,
        measure_tokens,
        plain_s: p,
        measured_s: m,
        overhead_pct: 100.0 * (m - p) / p,
        weight_measures_s: weight_s,
        reps,
    })
}

/// Result of `moescope bench jacobian`.
#[derive(Debug, Clone, Serialize)]
pub struct JacobianBenchResult {
    pub mode: &'static str,
    pub d_model: usize,
    pub d_ff: usize,
    pub experts: usize,
    pub expert: String,
    pub tokens: usize,
    pub instances: usize,
    /// Seconds of exact alignment over every instance.
    pub exact_s: Option<f64>,
    /// Seconds of the estimator (64 probes) over every instance.
    pub estimate_s: f64,
    /// Naive: autodiff Jacobians (d backward passes), full d×d, Frobenius products;
    /// timed on `naive_tokens` tokens and scaled to all instances.
    pub naive_s_extrapolated: Option<f64>,
    pub naive_tokens: usize,
    pub speedup_exact_vs_naive: Option<f64>,
    /// max |A_exact − A_naive| on the naive tokens.
    pub max_abs_diff: Option<f64>,
    /// Which mode `auto` picks for this layer.
    pub auto_picks: String,
}

/// Time Jacobian alignment on a random MoE layer: exact vs estimate vs the naive way.
pub fn bench_jacobian(
    d: usize,
    f: usize,
    e: usize,
    swiglu: bool,
    tokens: usize,
    naive_tokens: usize,
    skip_exact: bool,
) -> Result<JacobianBenchResult> {
    use crate::config::{ExpertKind, ModelConfig};
    use crate::measures::jacobian::{layer_jacobian_uniform, JacobianMode};
    use crate::model::moe::MoeLayer;
    use crate::model::params::ParamStore;
    use rand_distr::{Distribution, StandardNormal};
    let cfg = ModelConfig {
        d_model: d,
        d_ff: f,
        n_experts: e,
        top_k: 2,
        expert: if swiglu {
            ExpertKind::Swiglu
        } else {
            ExpertKind::Mlp
        },
        ..Default::default()
    };
    let dev = Device::Cpu;
    let mut ps = ParamStore::new(DType::F64, &dev, 0);
    let moe = MoeLayer::new(
        &mut ps,
        "moe",
        &cfg,
        1.0 / (d as f64).sqrt(),
        1.0 / (f as f64).sqrt(),
    )?;
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let xv: Vec<f64> = (0..tokens * d)
        .map(|_| StandardNormal.sample(&mut rng))
        .collect();
    let x = Tensor::from_vec(xv, (tokens, d), &dev)?;
    // Each token routed to two distinct random experts.
    let sel: Vec<u32> = (0..tokens)
        .flat_map(|_| {
            let a = rng.random_range(0..e as u32);
            let b = (a + 1 + rng.random_range(0..e as u32 - 1)) % e as u32;
            [a, b]
        })
        .collect();
    let t0 = Instant::now();
    let est = layer_jacobian_uniform(
        &moe,
        &x,
        &sel,
        2,
        JacobianMode::Estimate(64),
        false,
        0,
        1,
        0,
    )?
    .expect("on");
    let estimate_s = t0.elapsed().as_secs_f64();
    let t_terms = if swiglu { 2 } else { 1 };
    let auto = if crate::measures::jacobian::auto_picks_exact(
        d,
        f,
        e,
        t_terms,
        est.instances,
        tokens,
        2,
    ) {
        "exact"
    } else {
        "estimate"
    }
    .to_string();
    let (mut exact_s, mut naive, mut diff) = (None, None, None);
    if !skip_exact {
        let t0 = Instant::now();
        layer_jacobian_uniform(&moe, &x, &sel, 2, JacobianMode::Exact, false, 0, 1, 0)?;
        exact_s = Some(t0.elapsed().as_secs_f64());
        // Naive on a few tokens: autodiff Jacobians row by row, then Frobenius products.
        let t0 = Instant::now();
        let mut max_diff: f64 = 0.0;
        for t in 0..naive_tokens.min(tokens) {
            let xt = x.narrow(0, t, 1)?;
            let jac = |ei: usize| -> Result<Vec<f64>> {
                let mut rows = Vec::with_capacity(d * d);
                for k in 0..d {
                    let xv = candle_core::Var::from_tensor(&xt)?;
                    let y = moe.experts[ei].forward(xv.as_tensor())?;
                    let g = y.narrow(1, k, 1)?.sum_all()?.backward()?;
                    rows.extend(
                        g.get(xv.as_tensor())
                            .expect("grad")
                            .flatten_all()?
                            .to_vec1::<f64>()?,
                    );
                }
                Ok(rows)
            };
            let (a, b) = (sel[2 * t] as usize, sel[2 * t + 1] as usize);
            let (ja, jb) = (jac(a)?, jac(b)?);
            let dot = |p: &[f64], q: &[f64]| p.iter().zip(q).map(|(x, y)| x * y).sum::<f64>();
            let naive_a = dot(&ja, &jb) / (dot(&ja, &ja) * dot(&jb, &jb)).sqrt();
            let one = layer_jacobian_uniform(
                &moe,
                &xt,
                &sel[2 * t..2 * t + 2],
                2,
                JacobianMode::Exact,
                false,
                0,
                1,
                0,
            )?
            .expect("on");
            max_diff = max_diff.max((one.mean.unwrap_or(0.0) - naive_a).abs());
        }
        let per = t0.elapsed().as_secs_f64() / naive_tokens.min(tokens).max(1) as f64;
        naive = Some(per * tokens as f64);
        diff = Some(max_diff);
    }
    Ok(JacobianBenchResult {
        mode: "jacobian",
        d_model: d,
        d_ff: f,
        experts: e,
        expert: if swiglu { "swiglu" } else { "mlp" }.into(),
        tokens,
        instances: est.instances,
        exact_s,
        estimate_s,
        naive_s_extrapolated: naive,
        naive_tokens,
        speedup_exact_vs_naive: match (naive, exact_s) {
            (Some(n), Some(e)) => Some(n / e),
            _ => None,
        },
        max_abs_diff: diff,
        auto_picks: auto,
    })
}

/// `moescope bench hf`: streaming analysis of a random checkpoint in exact
/// Hugging Face layout (Mixtral-8x7B shapes by default), per layer.
#[derive(Debug, Clone, Serialize)]
pub struct HfBenchResult {
    pub checkpoint: String,
    pub layers: usize,
    /// Size of the checkpoint files on disk (bf16).
    pub disk_gb: f64,
    /// One decoder layer's weights once converted to f32.
    pub layer_f32_gb: f64,
    pub tokens: usize,
    pub seq_len: usize,
    pub in_memory: bool,
    pub per_layer: Vec<crate::hf::analyze::LayerTiming>,
    /// Peak RSS over the layers and the output head.
    pub peak_rss_gb: Option<f64>,
    pub total_s: f64,
}

/// Write (unless present) a random Mixtral-shaped checkpoint of `layers`
/// layers into `dir`, then analyse it layer by layer on random tokens.
pub fn bench_hf(
    dir: &std::path::Path,
    layers: usize,
    full_size: bool,
    tokens: usize,
    seq_len: usize,
    in_memory: bool,
    geo: &crate::measures::analyze::GeometryOptions,
) -> Result<HfBenchResult> {
    use crate::hf::{self, synth};
    let config = synth::mixtral_config(layers, full_size);
    let want = serde_json::to_string_pretty(&config).expect("json");
    let have = std::fs::read_to_string(dir.join("config.json")).ok();
    if have.as_deref() != Some(want.as_str()) || hf::HfCheckpoint::open(dir).is_err() {
        eprintln!(
            "writing a random Mixtral-shaped checkpoint ({layers} layers) to {}",
            dir.display()
        );
        let t0 = Instant::now();
        synth::write(
            dir,
            &synth::SynthSpec {
                config,
                dtype: safetensors::Dtype::BF16,
                shards: layers + 1,
                seed: 0,
            },
        )?;
        eprintln!("written in {:.0} s", t0.elapsed().as_secs_f64());
    }
    let ck = hf::HfCheckpoint::open(dir)?;
    let disk: u64 = std::fs::read_dir(dir)
        .map_err(|e| crate::Error::io(dir, e))?
        .filter_map(|e| e.ok()?.metadata().ok())
        .map(|m| m.len())
        .sum();
    let layer_params: usize = synth::tensor_shapes(&ck.cfg)
        .iter()
        .filter(|(n, _)| n.starts_with("model.layers.0."))
        .map(|(_, s)| s.iter().product::<usize>())
        .sum();
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let ids: Vec<u32> = (0..tokens + 1)
        .map(|_| rng.random_range(0..ck.cfg.vocab_size as u32))
        .collect();
    let opts = hf::analyze::HfOptions {
        tokens,
        seq_len,
        batch: 4,
        layers: None,
        in_memory,
        progress: std::io::IsTerminal::is_terminal(&std::io::stderr()),
    };
    let t0 = Instant::now();
    let source = crate::measures::analyze::Source {
        checkpoint: dir.display().to_string(),
        data: "random tokens".into(),
        seed: 1,
    };
    let families = [crate::measures::Family::Up, crate::measures::Family::Router];
    let (_, per_layer) = hf::analyze::analyze(&ck, &ids, &opts, &families, geo, source)?;
    // Streaming resets the peak counter per layer; the last reading covers the output head.
    let layer_peak = per_layer
        .iter()
        .filter_map(|t| t.peak_rss_mb)
        .fold(0.0, f64::max)
        * (1 << 20) as f64
        / 1e9;
    let peak_rss_gb = crate::memory::peak_rss_bytes().map(|b| (b as f64 / 1e9).max(layer_peak));
    Ok(HfBenchResult {
        checkpoint: dir.display().to_string(),
        layers,
        disk_gb: disk as f64 / 1e9,
        layer_f32_gb: layer_params as f64 * 4.0 / 1e9,
        tokens,
        seq_len,
        in_memory,
        per_layer,
        peak_rss_gb,
        total_s: t0.elapsed().as_secs_f64(),
    })
}
