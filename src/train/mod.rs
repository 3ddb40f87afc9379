//! The training loop: batches, AdamW, schedule, clipping, accumulation,
//! evaluation, metrics, checkpoints and exact resume.

pub mod optim;

use crate::checkpoint::{self, TrainState};
use crate::config::Config;
use crate::data::{self, cache::TokenFile, Dataset};
use crate::device::parse_device;
use crate::fsutil::write_atomic;
use crate::model::{layers::cross_entropy_rows, Gpt};
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor};
use optim::{lr_at, AdamW};
use serde_json::json;
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
pub fn evaluate(model: &Gpt, data: &TokenFile, batch: usize, max_tokens: usize) -> Result<EvalResult> {
    let t = model.cfg.seq_len;
    let windows = data::eval_windows(data.len(), t, max_tokens);
    let dev = model.params.device().clone();
    let mut sum = 0.0f64;
    let mut count = 0usize;
    let mut i = 0;
    while i < windows.len() {
        // Group windows of equal length (all but possibly the last).
        let len = windows[i].1;
        let mut j = i;
        while j < windows.len() && j - i < batch && windows[j].1 == len {
            j += 1;
        }
        let mut inputs = Vec::with_capacity((j - i) * len);
        let mut targets = Vec::with_capacity((j - i) * len);
        for &(s, l) in &windows[i..j] {
            data.extend_into(&mut inputs, s, l);
            data.extend_into(&mut targets, s + 1, l);
        }
        let b = j - i;
        let x = Tensor::from_vec(inputs, (b, len), &dev)?;
        let y = Tensor::from_vec(targets, b * len, &dev)?;
        let logits = model.forward(&x, false)?.logits;
        let ce = cross_entropy_rows(&logits, &y)?.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()?;
        sum += ce;
        count += b * len;
        i = j;
    }
    if count == 0 {
        return Err(Error::Data("nothing to evaluate: the validation split has fewer than 2 tokens".into()));
    }
    let loss = sum / count as f64;
    Ok(EvalResult { loss, ppl: loss.exp(), tokens: count })
}

/// Prepare the run folder. A fresh run refuses a folder that already holds a
/// run (nothing is overwritten); `--resume` needs one.
fn prepare_run_dir(out: &Path, resume: bool) -> Result<()> {
    let has_run = out.join("config.toml").is_file() || checkpoint::checkpoints_dir(out).is_dir();
    if resume && !has_run {
        return Err(Error::Data(format!("{}: nothing to resume (no run there); drop --resume to start one", out.display())));
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
            if v.get("step").and_then(|s| s.as_u64()).map(|s| s as usize <= step).unwrap_or(false) {
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
        let file = std::fs::OpenOptions::new().create(true).append(true).open(path).map_err(|e| Error::io(path, e))?;
        Ok(Metrics { file, path: path.to_path_buf() })
    }
    fn log(&mut self, row: serde_json::Value) -> Result<()> {
        let mut line = serde_json::to_vec(&row).expect("json");
        line.push(b'\n');
        self.file.write_all(&line).map_err(|e| Error::io(&self.path, e))
    }
}

/// Sum gradients across micro-batches.
fn accumulate(acc: &mut [Option<Tensor>], model: &Gpt, grads: &candle_core::backprop::GradStore) -> Result<()> {
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

/// Train a model as `cfg` says, into `opts.out`.
pub fn train(cfg: Config, opts: &TrainOptions) -> Result<TrainSummary> {
    let mut cfg = cfg;
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
    let model = Gpt::new(&cfg.model, DType::F32, &device, cfg.train.seed)?;
    let mut opt = AdamW::new(&model.params, &cfg.train)?;
    let (p_total, p_active) = cfg.model.param_counts();
    let total_steps = cfg.train.total_steps(cfg.model.seq_len);
    let tokens_per_step = (cfg.train.batch_size * cfg.train.grad_accum * cfg.model.seq_len) as u64;

    let metrics_path = out.join("metrics.jsonl");
    let mut state = TrainState { step: 0, tokens: 0, elapsed_s: 0.0, seed: cfg.train.seed };
    if opts.resume {
        if let Some(ckpt) = checkpoint::latest_checkpoint(out)? {
            checkpoint::load_weights(&model, &ckpt.join("model.safetensors"))?;
            let (st, opt_state) = checkpoint::load_checkpoint_state(&ckpt, &device)?;
            opt.load_state(&model.params, &opt_state, &ckpt.join("optimizer.safetensors"))?;
            state = st;
            say(&format!("resuming {} from step {}", out.display(), state.step));
        }
        truncate_metrics(&metrics_path, state.step)?;
    } else {
        let _ = std::fs::remove_file(&metrics_path);
    }
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
        if cfg.model.routing == crate::config::Routing::Topk { format!(" top-{}", cfg.model.top_k) } else { String::new() },
    ));
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
            indicatif::ProgressStyle::with_template("{bar:30} step {pos}/{len} {msg} [{elapsed_precise} < {eta_precise}]")
                .expect("template"),
        );
        b.set_position(state.step as u64);
        b
    } else {
        indicatif::ProgressBar::hidden()
    };

    let (b, t) = (cfg.train.batch_size, cfg.model.seq_len);
    let mut last_eval: Option<EvalResult> = None;
    let run_start = Instant::now();
    let elapsed0 = state.elapsed_s;
    let mut window_start = Instant::now();
    let mut window_tokens = 0u64;
    while state.step < total_steps {
        let step = state.step;
        let lr = lr_at(&cfg.train, step, total_steps);
        let mut grads: Vec<Option<Tensor>> = vec![None; model.params.vars().len()];
        let mut loss_sum = 0.0;
        for micro in 0..cfg.train.grad_accum {
            let batch = data::train_batch(&ds.train, cfg.train.seed, step, micro, b, t)?;
            let x = Tensor::from_vec(batch.inputs, (b, t), &device)?;
            let y = Tensor::from_vec(batch.targets, (b, t), &device)?;
            let loss = model.loss(&x, &y)?;
            let lv = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            if !lv.is_finite() {
                return Err(diverged(out, step + 1, "loss", lv));
            }
            loss_sum += lv;
            let scaled = if cfg.train.grad_accum > 1 { (loss / cfg.train.grad_accum as f64)? } else { loss };
            accumulate(&mut grads, &model, &scaled.backward()?)?;
        }
        let train_loss = loss_sum / cfg.train.grad_accum as f64;
        // Global gradient norm, then clipping.
        let mut sq = 0.0f64;
        for g in grads.iter().flatten() {
            sq += g.sqr()?.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        }
        let gnorm = sq.sqrt();
        if !gnorm.is_finite() {
            return Err(diverged(out, step + 1, "gradient norm", gnorm));
        }
        if cfg.train.grad_clip > 0.0 && gnorm > cfg.train.grad_clip {
            let s = cfg.train.grad_clip / (gnorm + 1e-6);
            for g in grads.iter_mut().flatten() {
                *g = (&*g * s)?;
            }
        }
        opt.step(&model.params, &grads, lr)?;
        state.step += 1;
        state.tokens += tokens_per_step;
        window_tokens += tokens_per_step;
        state.elapsed_s = elapsed0 + run_start.elapsed().as_secs_f64();

        let s = state.step;
        let last = s == total_steps;
        if s % cfg.train.log_every == 0 || last {
            let dt = window_start.elapsed().as_secs_f64();
            let tps = window_tokens as f64 / dt.max(1e-9);
            metrics.log(json!({"kind": "train", "step": s, "tokens": state.tokens, "loss": train_loss, "lr": lr,
                "grad_norm": gnorm, "tokens_per_s": tps, "elapsed_s": state.elapsed_s}))?;
            bar.set_message(format!("loss {train_loss:.4} | {tps:.0} tok/s"));
            window_start = Instant::now();
            window_tokens = 0;
        }
        if (cfg.train.eval_every > 0 && s % cfg.train.eval_every == 0) || last {
            let ev = evaluate(&model, &ds.valid, b, cfg.train.eval_tokens)?;
            metrics.log(json!({"kind": "eval", "step": s, "tokens": state.tokens, "val_loss": ev.loss,
                "val_ppl": ev.ppl, "eval_tokens": ev.tokens}))?;
            bar.println(format!("step {s}: val loss {:.4}, ppl {:.2} ({} tokens)", ev.loss, ev.ppl, ev.tokens));
            last_eval = Some(ev);
        }
        if (cfg.train.checkpoint_every > 0 && s % cfg.train.checkpoint_every == 0) || last {
            let opt_state = opt.state(&model.params)?;
            checkpoint::save_checkpoint(out, &model, &opt_state, &state, cfg.train.keep_checkpoints)?;
        }
        bar.set_position(s as u64);
        if opts.stop_after == Some(s) {
            bar.finish_and_clear();
            return Err(Error::Data(format!("stopped after step {s} (--stop-after)")));
        }
    }
    bar.finish_and_clear();
    let ev = match last_eval {
        Some(e) => e,
        None => evaluate(&model, &ds.valid, b, cfg.train.eval_tokens)?,
    };
    checkpoint::save_model(out, &model)?;
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
    write_atomic(&out.join("summary.json"), &serde_json::to_vec_pretty(&summary).expect("json"))?;
    Ok(summary)
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

/// Load a dataset and model device for evaluation of a saved model.
pub fn eval_device(name: &str) -> Result<Device> {
    parse_device(name)
}
