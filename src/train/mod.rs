//! The training loop: batches, AdamW, schedule, clipping, accumulation,
//! evaluation, metrics, checkpoints and exact resume.

pub mod engine;
pub mod optim;
pub mod reg;

use crate::checkpoint::{self, TrainState};
use crate::config::{Activation, Config, EngineChoice, ExpertKind, Routing};
use crate::data::{self, cache::TokenFile, Dataset};
use crate::device::parse_device;
use crate::fsutil::write_atomic;
use crate::measures::{self, Family, LayerAccumulator};
use crate::model::layers::{cross_entropy, cross_entropy_rows};
use crate::model::{moe::Dispatch, Gpt};
use crate::{Error, Result};
use candle_core::{DType, Tensor};
use engine::Engine;
use optim::{lr_at, AdamW};
use serde_json::json;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// How a training run is driven.
#[derive(Debug, Clone)]
pub struct TrainOptions {
    /// The run folder.
    pub out: PathBuf,
    /// Continue from the run's latest checkpoint.
    pub resume: bool,
    /// Show a progress bar (off for logs and tests).
    pub progress: bool,
    /// Print nothing but errors.
    pub quiet: bool,
    /// Stop (as if killed) after this many steps, right after any checkpoint
    /// due at that step. For tests of resume.
    pub stop_after: Option<usize>,
}

/// What a finished run reports.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TrainSummary {
    pub run_dir: PathBuf,
    pub steps: usize,
    pub tokens: u64,
    pub val_loss: f64,
    pub val_ppl: f64,
    pub val_tokens: usize,
    pub unigram_entropy: f64,
    pub params_total: usize,
    pub params_active: usize,
    pub wall_s: f64,
}

/// Result of an evaluation pass.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct EvalResult {
    /// Mean next-token cross-entropy (nats).
    pub loss: f64,
    /// exp(loss).
    pub ppl: f64,
    /// Target tokens evaluated, each counted once.
    pub tokens: usize,
}

/// Validation loss over `data`: every target token once (or the first
/// `max_tokens`), in windows of the model's context, `batch` windows at a time.
pub fn evaluate(
    model: &Gpt,
    data: &TokenFile,
    batch: usize,
    max_tokens: usize,
) -> Result<EvalResult> {
    Ok(evaluate_measured(model, data, batch, max_tokens, None)?.0)
}

/// Which evaluation windows also capture expert outputs for the measures.
#[derive(Debug, Clone, Copy)]
pub struct MeasureSpec {
    /// About this many target tokens (whole windows, chosen with `seed`).
    pub tokens: usize,
    pub seed: u64,
}

/// [`evaluate`], and with `measure` also the activation overlap and routing
/// telemetry of every MoE layer on a fixed, seeded subset of the evaluation
/// windows, captured in the same forward passes that compute the loss.
pub fn evaluate_measured(
    model: &Gpt,
    data: &TokenFile,
    batch: usize,
    max_tokens: usize,
    measure: Option<MeasureSpec>,
) -> Result<(EvalResult, Option<Vec<LayerAccumulator>>)> {
    use rand::seq::SliceRandom;
    use rand::SeedableRng;
    let t = model.cfg.seq_len;
    let windows = data::eval_windows(data.len(), t, max_tokens);
    // Measured windows first (captured), then the rest.
    let mut order: Vec<(usize, usize, bool)> =
        windows.iter().map(|&(s, l)| (s, l, false)).collect();
    if let Some(m) = measure.filter(|m| m.tokens > 0) {
        let mut full: Vec<usize> = (0..order.len()).filter(|&i| order[i].1 == t).collect();
        if full.is_empty() {
            full = (0..order.len()).collect();
        }
        full.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(m.seed));
        let take = m.tokens.div_ceil(t).min(full.len());
        for &i in &full[..take] {
            order[i].2 = true;
        }
        order.sort_by_key(|w| (!w.2, w.1 != t, w.0));
    }
    let k = model.cfg.active_experts();
    let mut accs: Option<Vec<LayerAccumulator>> = measure.filter(|m| m.tokens > 0).map(|_| {
        model
            .moe_layers()
            .map(|_| LayerAccumulator::new(model.cfg.n_experts, k))
            .collect()
    });
    let dev = model.params.device().clone();
    let mut sum = 0.0f64;
    let mut count = 0usize;
    for r in data::batch_ranges(&order, batch, |a, b| a.1 == b.1 && a.2 == b.2) {
        // Windows of equal length and equal capture flag.
        let (len, cap) = (order[r.start].1, order[r.start].2);
        let b = r.len();
        let mut inputs = Vec::with_capacity(b * len);
        let mut targets = Vec::with_capacity(b * len);
        for &(s, l, _) in &order[r] {
            data.extend_into(&mut inputs, s, l);
            data.extend_into(&mut targets, s + 1, l);
        }
        let x = Tensor::from_vec(inputs, (b, len), &dev)?;
        let y = Tensor::from_vec(targets, b * len, &dev)?;
        let out = model.forward(&x, cap)?;
        if let (true, Some(accs)) = (cap, accs.as_mut()) {
            for (acc, c) in accs.iter_mut().zip(&out.captures) {
                acc.add(&c.moe)?;
            }
        }
        let ce = cross_entropy_rows(&out.logits, &y)?
            .to_dtype(DType::F64)?
            .sum_all()?
            .to_scalar::<f64>()?;
        sum += ce;
        count += b * len;
    }
    if count == 0 {
        return Err(Error::Data(
            "nothing to evaluate: the validation split has fewer than 2 tokens".into(),
        ));
    }
    let loss = sum / count as f64;
    Ok((
        EvalResult {
            loss,
            ppl: loss.exp(),
            tokens: count,
        },
        accs,
    ))
}

/// The measures logged with an evaluation: per-layer weight MSO per family,
/// activation MSO, gap ratio and telemetry, plus model-level means.
pub fn measures_json(
    model: &Gpt,
    families: &[Family],
    accs: Option<&[LayerAccumulator]>,
) -> Result<serde_json::Value> {
    let mut m = serde_json::Map::new();
    let mut wmso = serde_json::Map::new();
    let mut wmean = serde_json::Map::new();
    let mut up = None; // weight MSO (up) per layer, for the gap ratios
    for &f in families {
        let per = measures::model_weight_mso(model, f)?;
        if f == Family::Up {
            up = Some(per.clone());
        }
        if per.iter().all(Option::is_none) {
            continue;
        }
        wmean.insert(f.name().into(), json!(measures::mean_present(&per)));
        wmso.insert(f.name().into(), json!(per));
    }
    let up = match up {
        Some(u) => u,
        None => measures::model_weight_mso(model, Family::Up)?,
    };
    m.insert("weight_mso".into(), serde_json::Value::Object(wmso));
    m.insert("weight_mso_mean".into(), serde_json::Value::Object(wmean));
    if let Some(accs) = accs {
        let act: Vec<Option<f64>> = accs.iter().map(|a| a.act_mso().ok()).collect();
        let gap: Vec<Option<f64>> = act
            .iter()
            .zip(&up)
            .map(|(a, w)| measures::gap_ratio(*a, *w))
            .collect();
        let act_mean = measures::mean_present(&act);
        let up_mean = measures::mean_present(&up);
        let tel: Vec<measures::Telemetry> = accs.iter().map(|a| a.telemetry()).collect();
        m.insert(
            "measure_tokens".into(),
            json!(accs.first().map(|a| a.tokens).unwrap_or(0)),
        );
        m.insert("act_mso".into(), json!(act));
        if act_mean.is_none() {
            if let Some(Err(reason)) = accs.first().map(|a| a.act_mso()) {
                m.insert("act_mso_null_reason".into(), json!(reason));
            }
        }
        m.insert("act_mso_mean".into(), json!(act_mean));
        m.insert("gap_ratio".into(), json!(gap));
        m.insert(
            "gap_ratio_model".into(),
            json!(measures::gap_ratio(act_mean, up_mean)),
        );
        m.insert(
            "router_entropy".into(),
            json!(tel.iter().map(|t| t.router_entropy).collect::<Vec<_>>()),
        );
        m.insert(
            "load_entropy".into(),
            json!(tel.iter().map(|t| t.load_entropy).collect::<Vec<_>>()),
        );
        m.insert(
            "balance".into(),
            json!(tel.iter().map(|t| t.balance).collect::<Vec<_>>()),
        );
        m.insert(
            "max_violation".into(),
            json!(tel.iter().map(|t| t.max_violation).collect::<Vec<_>>()),
        );
        m.insert(
            "dead_experts".into(),
            json!(tel
                .iter()
                .map(|t| t.dead_experts.clone())
                .collect::<Vec<_>>()),
        );
        m.insert(
            "load".into(),
            json!(tel.iter().map(|t| t.load.clone()).collect::<Vec<_>>()),
        );
    }
    Ok(serde_json::Value::Object(m))
}

/// Prepare the run folder. A fresh run refuses a folder that already holds a
/// run (nothing is overwritten); `--resume` needs one.
fn prepare_run_dir(out: &Path, resume: bool) -> Result<()> {
    let has_run = out.join("config.toml").is_file() || checkpoint::checkpoints_dir(out).is_dir();
    if resume && !has_run {
        return Err(Error::Data(format!(
            "{}: nothing to resume (no run there); drop --resume to start one",
            out.display()
        )));
    }
    if !resume && has_run {
        return Err(Error::Data(format!(
            "{}: a run already exists there; pass --resume to continue it, or choose another --out",
            out.display()
        )));
    }
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))
}

/// Keep only well-formed metrics rows up to `step` (used on resume, so that a
/// resumed run's log reads as if it had never stopped).
fn truncate_metrics(path: &Path, step: usize) -> Result<()> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io(path, e)),
    };
    let mut keep = String::new();
    for line in text.lines() {
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(line) {
            if v.get("step")
                .and_then(|s| s.as_u64())
                .map(|s| s as usize <= step)
                .unwrap_or(false)
            {
                keep.push_str(line);
                keep.push('\n');
            }
        }
    }
    write_atomic(path, keep.as_bytes())
}

/// A metrics log: one JSON object per line, appended and flushed.
struct Metrics {
    file: std::fs::File,
    path: PathBuf,
}

impl Metrics {
    fn open(path: &Path) -> Result<Self> {
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
    fn log(&mut self, row: serde_json::Value) -> Result<()> {
        let mut line = serde_json::to_vec(&row).expect("json");
        line.push(b'\n');
        self.file
            .write_all(&line)
            .map_err(|e| Error::io(&self.path, e))
    }
}

/// Sum gradients across micro-batches.
fn accumulate(
    acc: &mut [Option<Tensor>],
    model: &Gpt,
    grads: &candle_core::backprop::GradStore,
) -> Result<()> {
    for (slot, var) in acc.iter_mut().zip(model.params.vars()) {
        if let Some(g) = grads.get(var.as_tensor()) {
            *slot = Some(match slot.take() {
                Some(a) => (a + g)?,
                None => g.clone(),
            });
        }
    }
    Ok(())
}

/// Experts per token at `step` (progressive top-k, SMoE-Dropout): linear
/// from `train.topk_start` to `model.top_k`.
fn topk_at(cfg: &Config, step: usize, total: usize) -> usize {
    let (k0, k1) = (cfg.train.topk_start, cfg.model.top_k);
    if k0 == 0 || k0 >= k1 || total <= 1 {
        return k1;
    }
    let frac = step as f64 / (total - 1) as f64;
    (k0 as f64 + frac * (k1 - k0) as f64).round() as usize
}

/// Gradient-space orthogonality (reg.rs): replace each MoE layer's expert
/// gradients of `family` by their turned versions; returns the mean P over layers.
fn apply_grad_orth(
    model: &Gpt,
    grads: &mut [Option<Tensor>],
    family: Family,
    lambda: f64,
) -> Result<f64> {
    let mut total = 0.0;
    let mut layers = 0usize;
    for (l, moe) in model.moe_layers() {
        let e_n = moe.n_experts();
        let p = format!("layers.{l}.moe");
        if family == Family::Router {
            // The experts' directions are the router's rows.
            let Some(i) = model.params.position(&format!("{p}.router.weight")) else {
                continue;
            };
            let Some(g) = grads[i].clone() else { continue };
            let rows: Vec<Tensor> = (0..e_n)
                .map(|e| g.narrow(0, e, 1))
                .collect::<candle_core::Result<_>>()?;
            let (v, turned) = reg::grad_orth_step(&rows, lambda)?;
            grads[i] = Some(Tensor::cat(&turned, 0)?);
            total += v;
            layers += 1;
            continue;
        }
        let which = family.name();
        let ids: Option<Vec<usize>> = (0..e_n)
            .map(|e| {
                model
                    .params
                    .position(&format!("{p}.experts.{e}.{which}.weight"))
            })
            .collect();
        let Some(ids) = ids else { continue };
        // Experts without gradient this step count as zero and are left out.
        let gs: Vec<Tensor> = ids
            .iter()
            .map(|&i| match &grads[i] {
                Some(g) => Ok(g.clone()),
                None => model.params.vars()[i].as_tensor().zeros_like(),
            })
            .collect::<candle_core::Result<_>>()?;
        let (v, turned) = reg::grad_orth_step(&gs, lambda)?;
        for (&i, g) in ids.iter().zip(turned) {
            if grads[i].is_some() {
                grads[i] = Some(g);
            }
        }
        total += v;
        layers += 1;
    }
    Ok(total / layers.max(1) as f64)
}

/// What in `cfg` the fused CPU training engine ([`engine`]) does not cover,
/// or `None` when it covers it all. (Moved here from `Config`: the engine's
/// coverage is the engine's to say.)
pub fn fused_engine_gap(cfg: &Config) -> Option<&'static str> {
    let (m, r, t) = (&cfg.model, &cfg.reg, &cfg.train);
    let checks: [(bool, &str); 14] = [
        (m.routing != Routing::Topk, "model.routing is not topk"),
        (m.expert != ExpertKind::Mlp, "model.expert is not mlp"),
        (
            m.activation != Activation::Silu,
            "model.activation is not silu",
        ),
        (m.moe_every != 1, "model.moe_every is not 1 (dense layers)"),
        (
            m.router_temperature != 1.0,
            "model.router_temperature is not 1",
        ),
        (m.capacity_factor > 0.0, "model.capacity_factor is set"),
        (m.router_frozen, "model.router_frozen is set"),
        (
            m.balance_bias || r.loss_free_gamma > 0.0,
            "loss-free balancing is on",
        ),
        (t.topk_start > 0, "train.topk_start is set"),
        (t.device != "cpu", "train.device is not cpu"),
        (
            r.orth_lambda > 0.0 && r.orth_family != Family::Up,
            "reg.orth_family is not up",
        ),
        (r.grad_lambda > 0.0, "reg.grad_lambda is set"),
        (
            r.act_lambda != 0.0
                || r.contrastive_lambda != 0.0
                || r.entropy_lambda != 0.0
                || r.token_entropy_lambda != 0.0,
            "an activation or routing regulariser is on",
        ),
        (
            r.aux_lambda != 0.0 || r.z_lambda != 0.0,
            "reg.aux_lambda or reg.z_lambda is set",
        ),
    ];
    checks.iter().find(|(bad, _)| *bad).map(|(_, why)| *why)
}

/// Train a model as `cfg` says, into `opts.out`.
pub fn train(cfg: Config, opts: &TrainOptions) -> Result<TrainSummary> {
    let mut cfg = cfg;
    if cfg.train.engine == EngineChoice::Fused {
        if let Some(why) = fused_engine_gap(&cfg) {
            return Err(Error::config(
                "train.engine",
                format!("the fused engine cannot train this config: {why}; use \"auto\" or \"autodiff\""),
            ));
        }
    }
    let out = &opts.out;
    prepare_run_dir(out, opts.resume)?;
    let say = |s: &str| {
        if !opts.quiet {
            eprintln!("{s}");
        }
    };
    let device = parse_device(&cfg.train.device)?;
    let ds = Dataset::load(&cfg.data, opts.progress && !opts.quiet)?;
    let vocab = ds.tokenizer.vocab_size();
    if cfg.model.vocab_size == 0 {
        cfg.model.vocab_size = vocab.div_ceil(64) * 64;
    } else if cfg.model.vocab_size < vocab {
        return Err(Error::config(
            "model.vocab_size",
            format!("{} is smaller than the tokeniser's vocabulary ({vocab}); set 0 to use the tokeniser's", cfg.model.vocab_size),
        ));
    }
    let unigram = data::unigram_entropy(&ds.train);
    let mut model = Gpt::new(&cfg.model, DType::F32, &device, cfg.train.seed)?;
    let mut opt = AdamW::new(&model.params, &cfg.train)?;
    // The balancing biases are updated by their own rule, a frozen router not at all.
    let router_frozen = cfg.model.router_frozen;
    opt.freeze(&model.params, |n| {
        n.ends_with(".balance_bias") || (router_frozen && n.ends_with(".router.weight"))
    });
    let (p_total, p_active) = cfg.model.param_counts();
    // Why the fused engine cannot take this config (None: it can).
    let engine_gap = fused_engine_gap(&cfg);
    let use_engine = cfg.train.engine != EngineChoice::Autodiff && engine_gap.is_none();
    let total_steps = cfg.train.total_steps(cfg.model.seq_len);
    let tokens_per_step = (cfg.train.batch_size * cfg.train.grad_accum * cfg.model.seq_len) as u64;

    let metrics_path = out.join("metrics.jsonl");
    let mut state = TrainState {
        step: 0,
        tokens: 0,
        elapsed_s: 0.0,
        seed: cfg.train.seed,
    };
    if opts.resume {
        if let Some(ckpt) = checkpoint::latest_checkpoint(out)? {
            checkpoint::load_weights(&model, &ckpt.join("model.safetensors"))?;
            let (st, opt_state) = checkpoint::load_checkpoint_state(&ckpt, &device)?;
            opt.load_state(
                &model.params,
                &opt_state,
                &ckpt.join("optimizer.safetensors"),
            )?;
            state = st;
            say(&format!(
                "resuming {} from step {}",
                out.display(),
                state.step
            ));
        }
        truncate_metrics(&metrics_path, state.step)?;
    } else {
        let _ = std::fs::remove_file(&metrics_path);
    }
    // The fused engine takes a copy of the weights and the optimiser state and
    // hands them back before every evaluation and checkpoint.
    let mut eng = if use_engine {
        let adam = engine::AdamParams {
            beta1: cfg.train.beta1,
            beta2: cfg.train.beta2,
            eps: cfg.train.eps,
            weight_decay: cfg.train.weight_decay,
        };
        Some(Engine::from_model(
            &cfg.model,
            &model.params,
            Some(&opt),
            adam,
        )?)
    } else {
        None
    };
    write_atomic(&out.join("config.toml"), cfg.to_toml().as_bytes())?;
    if let data::tokenizer::Tokenizer::Hf { path, .. } = &ds.tokenizer {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        write_atomic(&out.join("tokenizer.json"), &bytes)?;
    }
    say(&format!(
        "moescope: {} params ({} active per token), {} layers, {} experts, routing {:?}{}",
        human(p_total),
        human(p_active),
        cfg.model.n_layer,
        cfg.model.n_experts,
        cfg.model.routing,
        if cfg.model.routing == crate::config::Routing::Topk {
            format!(" top-{}", cfg.model.top_k)
        } else {
            String::new()
        },
    ));
    say(&match (use_engine, engine_gap) {
        (true, _) => "engine: fused CPU engine".to_string(),
        (false, Some(why)) => format!("engine: autodiff ({why})"),
        (false, None) => "engine: autodiff (train.engine = \"autodiff\")".to_string(),
    });
    say(&format!(
        "data: {} | tokenizer {} | train {} tokens, valid {} tokens | unigram entropy {:.3} nats",
        ds.source,
        ds.tokenizer.id(),
        ds.train.len(),
        ds.valid.len(),
        unigram
    ));

    let mut metrics = Metrics::open(&metrics_path)?;
    if state.step == 0 {
        metrics.log(json!({"kind": "start", "step": 0, "params_total": p_total, "params_active": p_active,
            "unigram_entropy": unigram, "train_tokens": ds.train.len(), "valid_tokens": ds.valid.len(),
            "tokenizer": ds.tokenizer.id(), "vocab_size": cfg.model.vocab_size, "source": ds.source}))?;
    }
    let bar = if opts.progress && !opts.quiet {
        let b = indicatif::ProgressBar::new(total_steps as u64);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:30} step {pos}/{len} {msg} [{elapsed_precise} < {eta_precise}]",
            )
            .expect("template"),
        );
        b.set_position(state.step as u64);
        b
    } else {
        indicatif::ProgressBar::hidden()
    };

    let (b, t) = (cfg.train.batch_size, cfg.model.seq_len);
    let orth_family = cfg.reg.orth_family;
    let measure_families: Vec<Family> = cfg.measure.families.clone();
    let measure_spec = Some(MeasureSpec {
        tokens: cfg.measure.tokens,
        seed: cfg.measure.seed,
    });
    let mut last_eval: Option<EvalResult> = None;
    let run_start = Instant::now();
    let elapsed0 = state.elapsed_s;
    let mut window_start = Instant::now();
    let mut window_tokens = 0u64;
    let grad_family = cfg.reg.grad_family;
    let dispatch = Dispatch {
        capture: false,
        train: true,
        keep_outputs: reg::needs_outputs(&cfg.reg),
    };
    let n_moe = model.moe_layers().count();
    while state.step < total_steps {
        let step = state.step;
        let lr = lr_at(&cfg.train, step, total_steps);
        let k_step = topk_at(&cfg, step, total_steps);
        if cfg.train.topk_start > 0 {
            model.set_top_k(k_step);
        }
        let mut loads = vec![vec![0u64; cfg.model.n_experts]; n_moe];
        let (mut dropped, mut assigned) = (0usize, 0usize);
        let (lm_loss, term_means, train_loss, orth_value, grad_value, gnorm) = if let Some(e) =
            eng.as_mut()
        {
            // The fused engine: written gradients, one AdamW pass.
            let accum = cfg.train.grad_accum;
            let mut loss_sum = 0.0;
            for micro in 0..accum {
                let batch = data::train_batch(&ds.train, cfg.train.seed, step, micro, b, t)?;
                let lv = e.forward_backward(
                    &batch.inputs,
                    &batch.targets,
                    b,
                    t,
                    1.0 / accum as f64,
                    micro > 0,
                )?;
                finite(out, step + 1, "loss", lv)?;
                loss_sum += lv;
                for (acc, l) in loads.iter_mut().zip(&e.loads) {
                    for (a, x) in acc.iter_mut().zip(l) {
                        *a += x;
                    }
                }
            }
            let lm_loss = loss_sum / accum as f64;
            let orth_value = if cfg.reg.orth_lambda > 0.0 {
                let v = e.add_orth_grad(cfg.reg.orth_lambda);
                finite(out, step + 1, "orthogonality loss", v)?;
                Some(v)
            } else {
                None
            };
            let gnorm = e.grad_norm();
            finite(out, step + 1, "gradient norm", gnorm)?;
            e.adamw_step(lr, clip_scale(cfg.train.grad_clip, gnorm));
            let train_loss = lm_loss + cfg.reg.orth_lambda * orth_value.unwrap_or(0.0);
            (
                lm_loss,
                BTreeMap::new(),
                train_loss,
                orth_value,
                None,
                gnorm,
            )
        } else {
            let mut grads: Vec<Option<Tensor>> = vec![None; model.params.vars().len()];
            let mut loss_sum = 0.0;
            let mut term_sums: BTreeMap<&'static str, f64> = BTreeMap::new();
            let mut reg_sum = 0.0; // Σ λ·term, summed over micro-batches
            for micro in 0..cfg.train.grad_accum {
                let batch = data::train_batch(&ds.train, cfg.train.seed, step, micro, b, t)?;
                let x = Tensor::from_vec(batch.inputs, (b, t), &device)?;
                let y = Tensor::from_vec(batch.targets, (b, t), &device)?;
                let fwd = model.forward_with(&x, dispatch)?;
                let lm = cross_entropy(&fwd.logits, &y.flatten_all()?)?;
                let lv = lm.to_dtype(DType::F64)?.to_scalar::<f64>()?;
                finite(out, step + 1, "loss", lv)?;
                loss_sum += lv;
                for (l, a) in fwd.aux.iter().enumerate() {
                    for (acc, &x) in loads[l].iter_mut().zip(&a.routed_load) {
                        *acc += x;
                    }
                    dropped += a.dropped;
                    assigned += a.assigned;
                }
                let terms = reg::batch_terms(&cfg.reg, &fwd.aux, cfg.model.router_temperature)?;
                for (name, v) in &terms.values {
                    finite(out, step + 1, name, *v)?;
                    *term_sums.entry(name).or_default() += v;
                }
                reg_sum += terms.weighted;
                let loss = match terms.loss {
                    Some(r) => (lm + r)?,
                    None => lm,
                };
                let scaled = if cfg.train.grad_accum > 1 {
                    (loss / cfg.train.grad_accum as f64)?
                } else {
                    loss
                };
                accumulate(&mut grads, &model, &scaled.backward()?)?;
            }
            let lm_loss = loss_sum / cfg.train.grad_accum as f64;
            let term_means: BTreeMap<&'static str, f64> = term_sums
                .into_iter()
                .map(|(k, v)| (k, v / cfg.train.grad_accum as f64))
                .collect();
            let reg_total = reg_sum / cfg.train.grad_accum as f64;
            // λ · L_orth, once per step (its gradient joins the accumulated ones).
            let orth_value = if cfg.reg.orth_lambda > 0.0 {
                let orth = measures::orth_loss(&model, orth_family)?;
                let v = orth.to_dtype(DType::F64)?.to_scalar::<f64>()?;
                finite(out, step + 1, "orthogonality loss", v)?;
                accumulate(
                    &mut grads,
                    &model,
                    &(orth * cfg.reg.orth_lambda)?.backward()?,
                )?;
                Some(v)
            } else {
                None
            };
            let train_loss = lm_loss + cfg.reg.orth_lambda * orth_value.unwrap_or(0.0) + reg_total;
            // Gradient-space orthogonality: a first-order step on the update (reg.rs).
            let grad_value = if cfg.reg.grad_lambda > 0.0 {
                Some(apply_grad_orth(
                    &model,
                    &mut grads,
                    grad_family,
                    cfg.reg.grad_lambda,
                )?)
            } else {
                None
            };
            // Global gradient norm, then clipping.
            let mut sq = 0.0f64;
            for g in grads.iter().flatten() {
                sq += g
                    .sqr()?
                    .sum_all()?
                    .to_dtype(DType::F64)?
                    .to_scalar::<f64>()?;
            }
            let gnorm = sq.sqrt();
            finite(out, step + 1, "gradient norm", gnorm)?;
            let s = clip_scale(cfg.train.grad_clip, gnorm);
            if s != 1.0 {
                for g in grads.iter_mut().flatten() {
                    *g = (&*g * s)?;
                }
            }
            opt.step(&model.params, &grads, lr)?;
            (
                lm_loss, term_means, train_loss, orth_value, grad_value, gnorm,
            )
        };
        if cfg.reg.loss_free_gamma > 0.0 {
            for ((l, _), load) in model.moe_layers().zip(&loads) {
                let name = format!("layers.{l}.moe.balance_bias");
                let var = model.params.get(&name).ok_or_else(|| {
                    Error::config("model.balance_bias", "loss-free balancing needs the bias")
                })?;
                reg::loss_free_update(var, load, cfg.reg.loss_free_gamma)?;
            }
        }
        if cfg.train.topk_start > 0 {
            model.set_top_k(cfg.model.top_k); // evaluation and checkpoints use the full k
        }
        state.step += 1;
        state.tokens += tokens_per_step;
        window_tokens += tokens_per_step;
        state.elapsed_s = elapsed0 + run_start.elapsed().as_secs_f64();

        let s = state.step;
        let last = s == total_steps;
        if s % cfg.train.log_every == 0 || last {
            let dt = window_start.elapsed().as_secs_f64();
            let tps = window_tokens as f64 / dt.max(1e-9);
            // L_orth is logged even when λ = 0 (computed here, off the graph, only at log steps).
            let orth_logged = match orth_value {
                Some(v) => Some(v),
                // None when the family does not exist in this model (gate of MLP experts).
                None if eng.is_some() => eng.as_mut().map(|e| e.orth_value()),
                None => match measures::orth_loss(&model, orth_family) {
                    Ok(o) => Some(o.detach().to_dtype(DType::F64)?.to_scalar::<f64>()?),
                    Err(_) => None,
                },
            };
            let mut row = json!({"kind": "train", "step": s, "tokens": state.tokens, "loss": train_loss, "lm_loss": lm_loss,
                "orth_loss": orth_logged, "orth_lambda": cfg.reg.orth_lambda, "lr": lr,
                "grad_norm": gnorm, "tokens_per_s": tps, "elapsed_s": state.elapsed_s});
            let r = row.as_object_mut().expect("object");
            for (name, v) in &term_means {
                r.insert((*name).into(), json!(v));
            }
            if let Some(v) = grad_value {
                r.insert("grad_loss".into(), json!(v));
            }
            if cfg.model.capacity_factor > 0.0 && cfg.model.routing == Routing::Topk {
                r.insert(
                    "dropped_frac".into(),
                    json!(dropped as f64 / assigned.max(1) as f64),
                );
            }
            if cfg.train.topk_start > 0 {
                r.insert("top_k".into(), json!(k_step));
            }
            if cfg.reg.loss_free_gamma > 0.0 || cfg.reg.aux_lambda > 0.0 {
                let viol: Vec<f64> = loads.iter().map(|l| measures::max_violation(l)).collect();
                r.insert("train_max_violation".into(), json!(viol));
            }
            metrics.log(row)?;
            bar.set_message(format!("loss {train_loss:.4} | {tps:.0} tok/s"));
            window_start = Instant::now();
            window_tokens = 0;
        }
        let evaluating = (cfg.train.eval_every > 0 && s % cfg.train.eval_every == 0) || last;
        let saving =
            (cfg.train.checkpoint_every > 0 && s % cfg.train.checkpoint_every == 0) || last;
        if let Some(e) = &eng {
            // The model evaluates and saves; the moments matter only to a checkpoint.
            if evaluating || saving {
                e.store_weights(&model.params)?;
            }
            if saving {
                e.store_optimizer(&model.params, &mut opt)?;
            }
        }
        if evaluating {
            let t0 = Instant::now();
            let (ev, accs) =
                evaluate_measured(&model, &ds.valid, b, cfg.train.eval_tokens, measure_spec)?;
            let eval_s = t0.elapsed().as_secs_f64();
            let mut row = json!({"kind": "eval", "step": s, "tokens": state.tokens, "val_loss": ev.loss,
                "val_ppl": ev.ppl, "eval_tokens": ev.tokens, "eval_s": eval_s});
            if let serde_json::Value::Object(m) =
                measures_json(&model, &measure_families, accs.as_deref())?
            {
                row.as_object_mut().expect("object").extend(m);
            }
            metrics.log(row)?;
            bar.println(format!(
                "step {s}: val loss {:.4}, ppl {:.2} ({} tokens)",
                ev.loss, ev.ppl, ev.tokens
            ));
            last_eval = Some(ev);
        }
        if saving {
            let opt_state = opt.state(&model.params)?;
            checkpoint::save_checkpoint(
                out,
                &model,
                &opt_state,
                &state,
                cfg.train.keep_checkpoints,
            )?;
        }
        bar.set_position(s as u64);
        if opts.stop_after == Some(s) {
            bar.finish_and_clear();
            return Err(Error::Data(format!(
                "stopped after step {s} (--stop-after)"
            )));
        }
    }
    bar.finish_and_clear();
    let ev = match last_eval {
        Some(e) => e,
        None => evaluate(&model, &ds.valid, b, cfg.train.eval_tokens)?,
    };
    checkpoint::save_model(out, &model)?;
    if cfg.measure.final_analysis {
        final_analysis(&model, &cfg, &ds, out)?;
    }
    let summary = TrainSummary {
        run_dir: out.clone(),
        steps: state.step,
        tokens: state.tokens,
        val_loss: ev.loss,
        val_ppl: ev.ppl,
        val_tokens: ev.tokens,
        unigram_entropy: unigram,
        params_total: p_total,
        params_active: p_active,
        wall_s: state.elapsed_s,
    };
    write_atomic(
        &out.join("summary.json"),
        &serde_json::to_vec_pretty(&summary).expect("json"),
    )?;
    Ok(summary)
}

/// Every measure of `moescope analyze` on the start of the validation split,
/// written to `RUN/analysis.json`.
fn final_analysis(model: &Gpt, cfg: &Config, ds: &Dataset, out: &Path) -> Result<()> {
    use crate::measures::analyze::{analyze_with, GeometryOptions, Source};
    let n = cfg.measure.analysis_tokens.min(ds.valid.len());
    let mut toks = Vec::with_capacity(n);
    ds.valid.extend_into(&mut toks, 0, n);
    let geo = GeometryOptions {
        jacobian: cfg.measure.jacobian,
        subspace: cfg.measure.subspace,
        seed: cfg.measure.seed,
        ..Default::default()
    };
    let families: Vec<Family> = Family::ALL.to_vec();
    let source = Source {
        checkpoint: out.display().to_string(),
        data: format!("{} (validation split)", ds.source),
        seed: cfg.train.seed,
    };
    let report = analyze_with(
        model,
        &toks,
        n,
        cfg.train.batch_size,
        &families,
        &geo,
        source,
    )?;
    write_atomic(
        &out.join("analysis.json"),
        &serde_json::to_vec_pretty(&report).expect("json"),
    )
}

/// The divergence error (what, where, and which checkpoint is kept) unless
/// `v` is finite.
fn finite(out: &Path, step: usize, what: &str, v: f64) -> Result<()> {
    if v.is_finite() {
        Ok(())
    } else {
        Err(diverged(out, step, what, v))
    }
}

/// The factor that brings the gradient norm down to `clip` (1 when off or not needed).
fn clip_scale(clip: f64, gnorm: f64) -> f64 {
    if clip > 0.0 && gnorm > clip {
        clip / (gnorm + 1e-6)
    } else {
        1.0
    }
}

fn diverged(out: &Path, step: usize, what: &str, v: f64) -> Error {
    let keep = match checkpoint::latest_checkpoint(out) {
        Ok(Some(c)) => format!("the last good checkpoint is kept at {}", c.display()),
        _ => "no checkpoint had been written yet".into(),
    };
    Error::Diverged(format!(
        "training diverged at step {step}: {what} is {v}; {keep}. Lower train.lr, raise train.warmup_steps or set train.grad_clip"
    ))
}

/// 1234567 -> "1.23M".
pub fn human(n: usize) -> String {
    match n {
        n if n >= 1_000_000_000 => format!("{:.2}B", n as f64 / 1e9),
        n if n >= 1_000_000 => format!("{:.2}M", n as f64 / 1e6),
        n if n >= 1_000 => format!("{:.1}K", n as f64 / 1e3),
        n => n.to_string(),
    }
}
