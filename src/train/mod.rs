//! Training: the loop (schedule → step → log → evaluate → save), and the
//! pieces it drives.
//!
//! - [`step`]: one optimiser step through the [`TrainStep`] trait, executed by
//!   the fused CPU engine ([`engine`]) or the autodiff model;
//! - [`optim`]: AdamW and the learning-rate schedule; [`reg`]: regularisers;
//! - [`eval`]: validation loss and the measures logged with it;
//! - [`run_dir`]: the run folder, its lock and its metrics log;
//! - [`footprint`]: the memory and threads a config asks for, checked first.

pub mod engine;
pub mod eval;
pub mod footprint;
pub mod optim;
pub mod reg;
pub mod run_dir;
pub mod step;

use crate::checkpoint::{self, TrainState};
use crate::config::{Config, Routing};
use crate::data::tokenizer::Tokenizer;
use crate::data::{self, Dataset};
use crate::fsutil::write_atomic;
use crate::measures;
use crate::metrics::{EvalRow, MetricRow, StartRow, TrainRow};
use crate::model::Gpt;
use crate::{Error, Result};
pub use eval::{
    eval_measures, evaluate, evaluate_measured, evaluate_with, final_analysis, EvalForward,
    EvalResult, MeasureSpec,
};
use optim::{lr_at, AdamW};
use run_dir::Metrics;
use std::path::{Path, PathBuf};
use std::time::Instant;
pub use step::{StepPlan, StepStats, TrainStep};

/// How a training run is driven.
#[derive(Debug, Clone)]
pub struct TrainOptions {
    /// The run folder.
    pub out: PathBuf,
    /// Continue the run in `out` from its newest complete checkpoint (from
    /// step 0, saying so, when it has none yet).
    pub resume: bool,
    /// Continue from this checkpoint (`step-N`) instead of the newest one.
    pub resume_from: Option<String>,
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
    #[serde(serialize_with = "lossy_path")]
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

/// A path as text in JSON (not every path is UTF-8).
fn lossy_path<S: serde::Serializer>(p: &Path, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_str(&p.to_string_lossy())
}

impl TrainOptions {
    /// A new run into `out`, quiet, without a progress bar.
    pub fn new(out: &Path) -> Self {
        TrainOptions {
            out: out.to_path_buf(),
            resume: false,
            resume_from: None,
            progress: false,
            quiet: true,
            stop_after: None,
        }
    }

    fn resuming(&self) -> bool {
        self.resume || self.resume_from.is_some()
    }
}

/// Train a model as `cfg` says, into `opts.out`. The threads and memory the
/// config asks for are checked before the run folder is touched; the folder
/// stays locked for the whole run.
pub fn train(mut cfg: Config, opts: &TrainOptions) -> Result<TrainSummary> {
    let out = opts.out.clone();
    step::engine_choice(&cfg)?;
    footprint::check_threads(&cfg.train)?;
    let tok = run_tokenizer(&cfg, &out, opts.resuming())?;
    fit_vocab(&mut cfg, tok.vocab_size())?;
    footprint::check_memory(&cfg)?;
    let _held = run_dir::open(&out, opts.resuming())?;
    let ds = Dataset::load_with(&cfg.data, tok, opts.progress && !opts.quiet)?;
    if opts.resuming() {
        run_dir::check_same_stream(&out, &cfg, &ds)?;
    }
    let (model, opt, state) = init_or_resume(&cfg, &out, opts)?;
    let (exec, engine_note) = step::executor(&cfg, model, opt)?;
    write_run_files(&cfg, &ds, &out)?;
    let mut run = Run::start(cfg, ds, out, opts, exec, state)?;
    run.announce(&engine_note)?;
    let total = run.cfg.train.total_steps(run.cfg.model.seq_len);
    if run.cfg.train.eval_at_start && run.state.step == 0 {
        run.evaluate()?;
    }
    while run.state.step < total {
        run.train_step(total)?;
        let (s, last) = (run.state.step, run.state.step == total);
        let every = |n: usize| n > 0 && s % n == 0;
        let evaluating = every(run.cfg.train.eval_every) || last;
        let saving = every(run.cfg.train.checkpoint_every) || last;
        if evaluating {
            run.evaluate()?;
        }
        if saving {
            run.save_checkpoint()?;
        }
        run.bar.set_position(s as u64);
        if opts.stop_after == Some(s) {
            run.bar.finish_and_clear();
            return Err(Error::Other(format!(
                "stopped after step {s} (--stop-after)"
            )));
        }
    }
    run.finish()
}

/// The tokeniser of `cfg`; a resumed run's own copy of its `tokenizer.json`
/// when it has one (the original may have moved).
fn run_tokenizer(cfg: &Config, out: &Path, resume: bool) -> Result<Tokenizer> {
    let spec = data::tokenizer_spec(&cfg.data);
    let own = out.join("tokenizer.json");
    if resume && !matches!(spec.as_str(), "bytes" | "gpt2") && own.is_file() {
        return Tokenizer::from_file(&own);
    }
    Tokenizer::from_spec(&spec)
}

/// Set `model.vocab_size` from the tokeniser when it is 0; refuse one too small.
fn fit_vocab(cfg: &mut Config, vocab: usize) -> Result<()> {
    if cfg.model.vocab_size == 0 {
        cfg.model.vocab_size = vocab.div_ceil(64) * 64;
    } else if cfg.model.vocab_size < vocab {
        return Err(Error::config(
            "model.vocab_size",
            format!("{} is smaller than the tokeniser's vocabulary ({vocab}); set 0 to use the tokeniser's", cfg.model.vocab_size),
        ));
    }
    Ok(())
}

/// A fresh model and optimiser, or those of the checkpoint the run resumes from.
fn init_or_resume(
    cfg: &Config,
    out: &Path,
    opts: &TrainOptions,
) -> Result<(Gpt, AdamW, TrainState)> {
    let model = step::fresh_model(cfg)?;
    // The checkpoint's tensors go onto the model's own device: each opening
    // of a CUDA device is a new device to candle.
    let device = model.params.device().clone();
    let mut opt = step::fresh_optimizer(cfg, &model)?;
    let mut state = TrainState {
        step: 0,
        tokens: 0,
        elapsed_s: 0.0,
        seed: cfg.train.seed,
    };
    if opts.resuming() {
        if let Some(ckpt) = resume_point(out, opts)? {
            state = load_resume_point(&ckpt, &model, &mut opt, &device, out)?;
            if !opts.quiet {
                eprintln!("resuming {} from step {}", out.display(), state.step);
            }
        }
    }
    Ok((model, opt, state))
}

/// The checkpoint a resumed run continues from: `--resume-from`'s, else the
/// newest complete one. `None` (a kill before the first checkpoint) starts
/// from step 0, saying so, unless the run has finished: its final model is
/// never overwritten from scratch.
fn resume_point(out: &Path, opts: &TrainOptions) -> Result<Option<PathBuf>> {
    if let Some(name) = &opts.resume_from {
        return checkpoint::checkpoint_named(out, name).map(Some);
    }
    if let Some(c) = checkpoint::latest_checkpoint(out)? {
        return Ok(Some(c));
    }
    if out.join("model.safetensors").is_file() {
        return Err(Error::bad_file(
            out,
            "holds a final model.safetensors but no checkpoint to resume from; choose another --out for a new run",
        ));
    }
    if !opts.quiet {
        eprintln!(
            "{} has no complete checkpoint yet: starting from step 0",
            out.display()
        );
    }
    Ok(None)
}

/// Load checkpoint `ckpt` into `model` and `opt`; a broken one (unreadable,
/// or NaN weights) is refused, naming the newest sound one before it.
fn load_resume_point(
    ckpt: &Path,
    model: &Gpt,
    opt: &mut AdamW,
    device: &candle_core::Device,
    out: &Path,
) -> Result<TrainState> {
    let mut load = || -> Result<TrainState> {
        checkpoint::load_weights(model, &ckpt.join("model.safetensors"))?;
        if let Some(name) = checkpoint::first_non_finite(&model.params.tensors())? {
            return Err(checkpoint::non_finite_in(ckpt, "model.safetensors", &name));
        }
        let (st, opt_state) = checkpoint::load_checkpoint_state(ckpt, device)?;
        opt.load_state(
            &model.params,
            &opt_state,
            &ckpt.join("optimizer.safetensors"),
        )?;
        Ok(st)
    };
    load().map_err(|e| broken_checkpoint(out, ckpt, e))
}

/// The error for a checkpoint that cannot be resumed from: why, and the
/// newest sound checkpoint before it, to pass to `--resume-from`.
fn broken_checkpoint(out: &Path, ckpt: &Path, e: Error) -> Error {
    let step = checkpoint::checkpoint_step(ckpt);
    let offer = match checkpoint::newest_sound_checkpoint(out, step) {
        Ok(Some(c)) => {
            let name = c
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            format!("the newest sound checkpoint before it is {}: resume from it with --resume-from {name}", c.display())
        }
        _ => "no older checkpoint is sound; start a new run in another --out".into(),
    };
    Error::Checkpoint {
        path: ckpt.to_path_buf(),
        msg: format!("cannot resume from it: {e}; {offer}"),
    }
}

/// The run's own copies of its config and tokeniser, and the record of its
/// token stream.
fn write_run_files(cfg: &Config, ds: &Dataset, out: &Path) -> Result<()> {
    write_atomic(&out.join("config.toml"), cfg.to_toml().as_bytes())?;
    run_dir::StreamRecord::of(ds).write(out)?;
    if let data::tokenizer::Tokenizer::Hf { path, .. } = &ds.tokenizer {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        write_atomic(&out.join("tokenizer.json"), &bytes)?;
    }
    Ok(())
}

/// A training run in progress: what the loop reads and writes between steps.
struct Run<'o> {
    cfg: Config,
    ds: Dataset,
    out: PathBuf,
    opts: &'o TrainOptions,
    exec: Box<dyn TrainStep>,
    state: TrainState,
    metrics: Metrics,
    bar: indicatif::ProgressBar,
    /// Entropy of the training split's unigram distribution (nats).
    unigram: f64,
    last_eval: Option<EvalResult>,
    /// Wall time and tokens since the last logged row (tokens/s).
    window: (Instant, u64),
    /// Process start and the elapsed time of the resumed run before it.
    clock: (Instant, f64),
}

impl<'o> Run<'o> {
    fn start(
        cfg: Config,
        ds: Dataset,
        out: PathBuf,
        opts: &'o TrainOptions,
        exec: Box<dyn TrainStep>,
        state: TrainState,
    ) -> Result<Self> {
        let metrics_path = out.join("metrics.jsonl");
        // From step 0 the log starts over (a rerun after a kill before the
        // first checkpoint must not add a second `start` row).
        if state.step > 0 {
            run_dir::truncate_metrics(&metrics_path, state.step)?;
        } else {
            let _ = std::fs::remove_file(&metrics_path);
        }
        let unigram = data::unigram_entropy(&ds.train);
        let total = cfg.train.total_steps(cfg.model.seq_len);
        let run = Run {
            unigram,
            metrics: Metrics::open(&metrics_path)?,
            bar: progress_bar(opts.progress && !opts.quiet, total, state.step),
            clock: (Instant::now(), state.elapsed_s),
            window: (Instant::now(), 0),
            last_eval: None,
            cfg,
            ds,
            out,
            opts,
            exec,
            state,
        };
        Ok(run)
    }

    fn say(&self, s: &str) {
        if !self.opts.quiet {
            eprintln!("{s}");
        }
    }

    /// The opening lines on stderr and, for a new run, the `start` row.
    fn announce(&mut self, engine_note: &str) -> Result<()> {
        let (cfg, ds) = (&self.cfg, &self.ds);
        let (p_total, p_active) = cfg.model.param_counts();
        let unigram = self.unigram;
        let k = if cfg.model.routing == Routing::Topk {
            format!(" top-{}", cfg.model.top_k)
        } else {
            String::new()
        };
        self.say(&format!(
            "moescope: {} params ({} active per token), {} layers, {} experts, routing {:?}{k}",
            human(p_total),
            human(p_active),
            cfg.model.n_layer,
            cfg.model.n_experts,
            cfg.model.routing,
        ));
        self.say(&format!("engine: {engine_note}"));
        self.say(&format!(
            "data: {} | tokenizer {} | train {} tokens, valid {} tokens | unigram entropy {unigram:.3} nats",
            ds.source,
            ds.tokenizer.id(),
            ds.train.len(),
            ds.valid.len(),
        ));
        if self.state.step == 0 {
            self.metrics.log(&MetricRow::Start(StartRow {
                step: 0,
                params_total: p_total as u64,
                params_active: p_active as u64,
                unigram_entropy: unigram,
                train_tokens: ds.train.len() as u64,
                max_train_tokens: (cfg.data.max_train_tokens > 0)
                    .then_some(cfg.data.max_train_tokens),
                valid_tokens: ds.valid.len() as u64,
                tokenizer: ds.tokenizer.id().to_string(),
                vocab_size: cfg.model.vocab_size as u64,
                source: ds.source.clone(),
            }))?;
        }
        Ok(())
    }

    /// One optimiser step, then its row in the log when due.
    fn train_step(&mut self, total: usize) -> Result<()> {
        let (cfg, step) = (&self.cfg, self.state.step);
        let (b, t) = (cfg.train.batch_size, cfg.model.seq_len);
        let batches = (0..cfg.train.grad_accum)
            .map(|micro| data::train_batch(&self.ds.train, cfg.train.seed, step, micro, b, t))
            .collect::<Result<Vec<_>>>()?;
        let plan = StepPlan {
            lr: lr_at(&cfg.train, step, total),
            top_k: topk_at(cfg, step, total),
            grad_clip: cfg.train.grad_clip,
            grad_norm: true,
        };
        let stats = self
            .exec
            .step(&batches, &plan)
            .map_err(|e| at_step(e, &self.out, step + 1))?;
        let tokens = (b * cfg.train.grad_accum * t) as u64;
        self.state.step += 1;
        self.state.tokens += tokens;
        self.window.1 += tokens;
        self.state.elapsed_s = self.clock.1 + self.clock.0.elapsed().as_secs_f64();
        if self.state.step.is_multiple_of(self.cfg.train.log_every) || self.state.step == total {
            self.log_train(&stats, &plan)?;
        }
        Ok(())
    }

    /// The `train` row of a step.
    fn log_train(&mut self, stats: &StepStats, plan: &StepPlan) -> Result<()> {
        let tps = self.window.1 as f64 / self.window.0.elapsed().as_secs_f64().max(1e-9);
        // L_orth is logged even when λ = 0 (computed here, off the graph, only at log steps).
        let orth = match stats.orth_loss {
            Some(v) => Some(v),
            None => self.exec.orth_value()?,
        };
        let (cfg, s) = (&self.cfg, &self.state);
        let capacity = cfg.model.capacity_factor > 0.0 && cfg.model.routing == Routing::Topk;
        let balancing = cfg.reg.loss_free_gamma > 0.0 || cfg.reg.aux_lambda > 0.0;
        let row = TrainRow {
            step: s.step as u64,
            tokens: s.tokens,
            loss: stats.loss,
            lm_loss: stats.lm_loss,
            orth_loss: orth,
            orth_lambda: cfg.reg.orth_lambda,
            lr: plan.lr,
            grad_norm: stats.grad_norm,
            tokens_per_s: tps,
            elapsed_s: s.elapsed_s,
            grad_loss: stats.grad_loss,
            dropped_frac: capacity.then(|| stats.dropped as f64 / stats.assigned.max(1) as f64),
            top_k: (cfg.train.topk_start > 0).then_some(plan.top_k as u64),
            train_max_violation: balancing.then(|| {
                stats
                    .loads
                    .iter()
                    .map(|l| measures::max_violation(l))
                    .collect()
            }),
            reg_terms: stats
                .reg_terms
                .iter()
                .map(|(k, v)| (k.to_string(), *v))
                .collect(),
        };
        self.metrics.log(&MetricRow::Train(row))?;
        self.bar
            .set_message(format!("loss {:.4} | {tps:.0} tok/s", stats.loss));
        self.window = (Instant::now(), 0);
        Ok(())
    }

    /// Validation loss and the measures, as an `eval` row.
    fn evaluate(&mut self) -> Result<()> {
        let spec = MeasureSpec {
            tokens: self.cfg.measure.tokens,
            seed: self.cfg.measure.seed,
            spaces: self.cfg.measure.act_space.clone(),
        };
        let t0 = Instant::now();
        let (ev, accs) = evaluate_with(
            &mut *self.exec.evaluator(),
            &self.cfg.model,
            &self.ds.valid,
            self.cfg.train.batch_size,
            self.cfg.train.eval_tokens,
            Some(spec),
        )?;
        let snap = self.exec.snapshot(false)?;
        let s = &self.state;
        let row = EvalRow {
            step: s.step as u64,
            tokens: s.tokens,
            val_loss: ev.loss,
            val_ppl: ev.ppl,
            eval_tokens: ev.tokens as u64,
            eval_s: t0.elapsed().as_secs_f64(),
            measures: eval_measures(snap.model(), &self.cfg.measure, accs.as_deref())?,
        };
        self.metrics.log(&MetricRow::Eval(row))?;
        self.bar.println(format!(
            "step {}: val loss {:.4}, ppl {:.2} ({} tokens)",
            s.step, ev.loss, ev.ppl, ev.tokens
        ));
        self.last_eval = Some(ev);
        Ok(())
    }

    fn save_checkpoint(&mut self) -> Result<()> {
        let snap = self.exec.snapshot(true)?;
        let model = snap.model();
        let opt_state = snap.optimizer()?.state(&model.params)?;
        checkpoint::save_checkpoint(
            &self.out,
            model,
            &opt_state,
            &self.state,
            self.cfg.train.keep_checkpoints,
        )?;
        Ok(())
    }

    /// The final model, the end-of-run analysis and `summary.json`.
    fn finish(mut self) -> Result<TrainSummary> {
        self.bar.finish_and_clear();
        let (b, eval_tokens) = (self.cfg.train.batch_size, self.cfg.train.eval_tokens);
        let ev = match self.last_eval {
            Some(e) => e,
            None => {
                let fwd = &mut *self.exec.evaluator();
                evaluate_with(fwd, &self.cfg.model, &self.ds.valid, b, eval_tokens, None)?.0
            }
        };
        let snap = self.exec.snapshot(false)?;
        let model = snap.model();
        checkpoint::save_model(&self.out, model)?;
        if self.cfg.measure.final_analysis {
            final_analysis(model, &self.cfg, &self.ds, &self.out)?;
        }
        let (params_total, params_active) = self.cfg.model.param_counts();
        let summary = TrainSummary {
            run_dir: self.out.clone(),
            steps: self.state.step,
            tokens: self.state.tokens,
            val_loss: ev.loss,
            val_ppl: ev.ppl,
            val_tokens: ev.tokens,
            unigram_entropy: self.unigram,
            params_total,
            params_active,
            wall_s: self.state.elapsed_s,
        };
        let json = serde_json::to_vec_pretty(&summary).expect("json");
        write_atomic(&self.out.join("summary.json"), &json)?;
        Ok(summary)
    }
}

fn progress_bar(show: bool, total: usize, at: usize) -> indicatif::ProgressBar {
    if !show {
        return indicatif::ProgressBar::hidden();
    }
    let b = indicatif::ProgressBar::new(total as u64);
    b.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:30} step {pos}/{len} {msg} [{elapsed_precise} < {eta_precise}]",
        )
        .expect("template"),
    );
    b.set_position(at as u64);
    b
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

/// A step's non-finite value as the divergence error: where, and which
/// checkpoint is kept.
fn at_step(e: Error, out: &Path, step: usize) -> Error {
    match e {
        Error::NonFinite { what, value } => diverged(out, step, &what, value),
        e => e,
    }
}

fn diverged(out: &Path, step: usize, what: &str, v: f64) -> Error {
    // Only a checkpoint checked finite is called good.
    let keep = match checkpoint::newest_sound_checkpoint(out, None) {
        Ok(Some(c)) => format!("the last good checkpoint is kept at {}", c.display()),
        _ => "no sound checkpoint had been written yet".into(),
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
