//! One optimiser step, executed two ways: by the fused CPU engine
//! ([`FusedStep`]) or by the autodiff model ([`AutodiffStep`]). The training
//! loop and `bench train` drive either through [`TrainStep`].

use super::engine::{self, AdamParams, Engine, Profile};
use super::eval::EvalForward;
use super::optim::AdamW;
use super::reg;
use crate::config::{Config, EngineChoice, RegConfig};
use crate::data::Batch;
use crate::device::parse_device;
use crate::measures;
use crate::measures::OrthForm;
use crate::model::layers::cross_entropy;
use crate::model::{moe::ForwardOptions, Gpt};
use crate::{Error, Result};
use candle_core::{DType, Tensor};
use std::collections::BTreeMap;
use std::time::Instant;

/// What one step needs besides its batches.
#[derive(Debug, Clone, Copy)]
pub struct StepPlan {
    /// Learning rate of this step.
    pub lr: f64,
    /// Experts per token (progressive top-k; `model.top_k` otherwise).
    pub top_k: usize,
    /// Clip the global gradient norm to this (0 = off).
    pub grad_clip: f64,
    /// Compute the gradient norm (training always does; the benchmark, like
    /// the PyTorch peer, skips the pass when it does not clip).
    pub grad_norm: bool,
}

impl StepPlan {
    /// Whether the step needs the global gradient norm: asked for, or for clipping.
    pub fn needs_norm(&self) -> bool {
        self.grad_norm || self.grad_clip > 0.0
    }
}

/// Forward, backward and optimiser seconds of one step.
#[derive(Debug, Clone, Copy, Default)]
pub struct PhaseTimes {
    pub forward_s: f64,
    pub backward_s: f64,
    pub optimizer_s: f64,
}

/// The numbers one step reports.
#[derive(Debug, Clone, Default)]
pub struct StepStats {
    /// Mean LM cross-entropy over the micro-batches.
    pub lm_loss: f64,
    /// The loss optimised: LM loss plus every weighted regulariser.
    pub loss: f64,
    /// L_orth when its λ > 0 (the step computed it anyway).
    pub orth_loss: Option<f64>,
    /// Unweighted regulariser terms (reg.rs), mean over micro-batches.
    pub reg_terms: BTreeMap<&'static str, f64>,
    /// Gradient-space orthogonality value, when on.
    pub grad_loss: Option<f64>,
    /// Global gradient norm before clipping (NaN when not computed).
    pub grad_norm: f64,
    /// Per MoE layer, routed assignments per expert, summed over micro-batches.
    pub loads: Vec<Vec<u64>>,
    /// Assignments dropped by the capacity limit, and all assignments.
    pub dropped: usize,
    pub assigned: usize,
    pub phases: PhaseTimes,
}

/// One optimiser step over a list of micro-batches, whichever executor runs it.
pub trait TrainStep {
    /// `fused` or `autodiff`.
    fn name(&self) -> &'static str;
    /// Forward, backward and AdamW over `batches` (gradients averaged).
    /// A non-finite loss or gradient is [`Error::NonFinite`].
    fn step(&mut self, batches: &[Batch], plan: &StepPlan) -> Result<StepStats>;
    /// L_orth of the current weights (logged even when λ = 0); `None` when
    /// the family does not exist in this model.
    fn orth_value(&mut self) -> Result<Option<f64>>;
    /// The forward pass evaluation runs on (the executor's own: no copy).
    fn evaluator(&mut self) -> Box<dyn EvalForward + '_>;
    /// The model as of now and, with `optimizer`, its AdamW state (for
    /// checkpoints, the measures and the end of the run).
    fn snapshot(&mut self, optimizer: bool) -> Result<Snapshot<'_>>;
    /// Wait for the work queued on the device (a no-op on the CPU).
    fn synchronize(&mut self) -> Result<()> {
        Ok(())
    }
    /// Time per section of the step, when the executor keeps one.
    fn profile(&mut self) -> Option<&mut Profile> {
        None
    }
}

/// A step executor's model and, when asked for, its optimiser: the autodiff
/// executor's own; the fused engine's made from its state after a step and
/// kept until the next (the engine holds no second copy while it trains).
pub struct Snapshot<'a> {
    model: &'a Gpt,
    optimizer: Option<&'a AdamW>,
}

impl Snapshot<'_> {
    pub fn model(&self) -> &Gpt {
        self.model
    }

    /// The optimiser (present when [`TrainStep::snapshot`] was asked for it).
    pub fn optimizer(&self) -> Result<&AdamW> {
        self.optimizer
            .ok_or_else(|| Error::Other("internal: the optimiser state was not asked for".into()))
    }
}

/// A freshly initialised model for `cfg` (seeded as `train.seed`).
pub fn fresh_model(cfg: &Config) -> Result<Gpt> {
    let device = parse_device(&cfg.train.device)?;
    Gpt::new(&cfg.model, DType::F32, &device, cfg.train.seed)
}

/// A fresh AdamW over `model`'s parameters, with the parameters that are not
/// trained by gradient frozen: the balancing biases (their own update rule)
/// and a frozen router.
pub fn fresh_optimizer(cfg: &Config, model: &Gpt) -> Result<AdamW> {
    let mut opt = AdamW::new(&model.params, &cfg.train)?;
    let router_frozen = cfg.model.router_frozen;
    opt.freeze(&model.params, |n| {
        n.ends_with(".balance_bias") || (router_frozen && n.ends_with(".router.weight"))
    });
    Ok(opt)
}

/// Why `cfg` runs on autodiff (`None`: the fused engine), or an error for
/// `train.engine = "fused"` on a config the engine does not cover. Checked
/// before anything is written.
pub fn engine_choice(cfg: &Config) -> Result<Option<&'static str>> {
    match (cfg.train.engine, engine::unsupported(cfg)) {
        (EngineChoice::Fused, Some(why)) => Err(Error::config(
            "train.engine",
            format!(
                "the fused engine cannot train this config: {why}; use \"auto\" or \"autodiff\""
            ),
        )),
        (EngineChoice::Autodiff, _) => Ok(Some("train.engine = \"autodiff\"")),
        (_, gap) => Ok(gap),
    }
}

/// The executor for `cfg` (see [`engine_choice`]) and a line saying which and why.
pub fn executor(cfg: &Config, model: Gpt, opt: AdamW) -> Result<(Box<dyn TrainStep>, String)> {
    let why_not = engine_choice(cfg)?;
    if let Some(why) = why_not {
        return Ok((
            Box::new(AutodiffStep::new(cfg, model, opt)),
            format!("autodiff ({why})"),
        ));
    }
    let engine = Engine::from_model(&cfg.model, &model.params, Some(&opt), adam_params(cfg))?;
    drop((model, opt)); // the engine holds the state from here on
    let step = FusedStep::new(engine, Some(cfg.clone()))
        .with_orth(cfg.reg.orth_lambda, OrthForm::of(&cfg.reg));
    Ok((Box::new(step), "fused CPU engine".into()))
}

/// The engine's AdamW hyper-parameters from `train.*`.
pub fn adam_params(cfg: &Config) -> AdamParams {
    AdamParams {
        beta1: cfg.train.beta1,
        beta2: cfg.train.beta2,
        eps: cfg.train.eps,
        weight_decay: cfg.train.weight_decay,
        weight_decay_experts: cfg.train.expert_weight_decay(),
    }
}

/// The seed of the dropout masks of micro-batch `micro` of the step after
/// `steps_done` steps: a function of the three alone, so a resumed run
/// draws the same masks.
fn dropout_seed(seed: u64, steps_done: usize, micro: usize) -> u64 {
    use rand::{RngCore, SeedableRng};
    let mix = seed ^ (steps_done as u64).rotate_left(32) ^ (micro as u64).rotate_left(16);
    rand_chacha::ChaCha8Rng::seed_from_u64(mix ^ 0xD50F_D50F).next_u64()
}

/// `Err(NonFinite)` unless `v` is finite.
pub fn finite(what: &str, v: f64) -> Result<()> {
    if v.is_finite() {
        Ok(())
    } else {
        Err(Error::NonFinite {
            what: what.to_string(),
            value: v,
        })
    }
}

/// The factor that brings the gradient norm down to `clip` (1 when off or not needed).
pub fn clip_scale(clip: f64, gnorm: f64) -> f64 {
    if clip > 0.0 && gnorm > clip {
        clip / (gnorm + 1e-6)
    } else {
        1.0
    }
}

/// The fused CPU engine, and the config of the model and optimiser it makes
/// from its state for checkpoints and the measures (training sets it; the
/// benchmark has none).
pub struct FusedStep {
    engine: Engine<f32>,
    snapshot_cfg: Option<Config>,
    /// The model (and optimiser) made since the last step: an evaluation,
    /// a checkpoint and the end of the run at one step share it.
    snapshot: Option<(Gpt, Option<AdamW>)>,
    orth_lambda: f64,
    orth_form: OrthForm,
}

impl FusedStep {
    pub fn new(engine: Engine<f32>, snapshot_cfg: Option<Config>) -> Self {
        FusedStep {
            engine,
            snapshot_cfg,
            snapshot: None,
            orth_lambda: 0.0,
            orth_form: OrthForm::default(),
        }
    }

    /// λ and form of L_orth on W_up (the engine covers no other regulariser).
    pub fn with_orth(mut self, lambda: f64, form: OrthForm) -> Self {
        self.orth_lambda = lambda;
        self.orth_form = form;
        self
    }
}

impl TrainStep for FusedStep {
    fn name(&self) -> &'static str {
        "fused"
    }

    fn step(&mut self, batches: &[Batch], plan: &StepPlan) -> Result<StepStats> {
        self.snapshot = None; // out of date from here on
        let e = &mut self.engine;
        let t0 = Instant::now();
        let (mut loss_sum, mut forward_s) = (0.0, 0.0);
        let mut loads: Vec<Vec<u64>> = Vec::new();
        for (micro, batch) in batches.iter().enumerate() {
            let scale = 1.0 / batches.len() as f64;
            let lv = e.forward_backward(
                &batch.inputs,
                &batch.targets,
                batch.b,
                batch.t,
                scale,
                micro > 0,
            )?;
            finite("loss", lv)?;
            loss_sum += lv;
            forward_s += e.last_forward_s;
            add_loads(&mut loads, e.loads.iter().map(Vec::as_slice));
        }
        let lm_loss = loss_sum / batches.len() as f64;
        let orth_loss = if self.orth_lambda != 0.0 {
            let v = e.add_orth_grad(self.orth_lambda, self.orth_form);
            finite("orthogonality loss", v)?;
            Some(v)
        } else {
            None
        };
        let grad_norm = if plan.needs_norm() {
            let g = e.grad_norm();
            finite("gradient norm", g)?;
            g
        } else {
            f64::NAN
        };
        let t_opt = Instant::now();
        e.adamw_step(plan.lr, clip_scale(plan.grad_clip, grad_norm));
        let phases = PhaseTimes {
            forward_s,
            backward_s: (t_opt - t0).as_secs_f64() - forward_s,
            optimizer_s: t_opt.elapsed().as_secs_f64(),
        };
        Ok(StepStats {
            lm_loss,
            loss: lm_loss + self.orth_lambda * orth_loss.unwrap_or(0.0),
            orth_loss,
            grad_norm,
            loads,
            phases,
            ..Default::default()
        })
    }

    fn orth_value(&mut self) -> Result<Option<f64>> {
        Ok(Some(self.engine.orth_value(self.orth_form)))
    }

    fn evaluator(&mut self) -> Box<dyn EvalForward + '_> {
        Box::new(&mut self.engine)
    }

    fn snapshot(&mut self, optimizer: bool) -> Result<Snapshot<'_>> {
        let Some(cfg) = self.snapshot_cfg.as_ref() else {
            return Err(Error::Other(
                "internal: this engine has no model config to hand its state to".into(),
            ));
        };
        let (model, opt) = match &mut self.snapshot {
            Some(made) => made,
            none => none.insert((self.engine.to_model()?, None)),
        };
        if optimizer && opt.is_none() {
            let mut o = fresh_optimizer(cfg, model)?;
            self.engine.store_optimizer(&model.params, &mut o)?;
            *opt = Some(o);
        }
        Ok(Snapshot {
            model,
            optimizer: opt.as_ref(),
        })
    }

    fn profile(&mut self) -> Option<&mut Profile> {
        Some(&mut self.engine.profile)
    }
}

/// Add per-layer expert loads to `total` (sized on first use).
fn add_loads<'a>(total: &mut Vec<Vec<u64>>, layers: impl IntoIterator<Item = &'a [u64]>) {
    for (l, load) in layers.into_iter().enumerate() {
        if total.len() <= l {
            total.push(vec![0; load.len()]);
        }
        for (a, x) in total[l].iter_mut().zip(load) {
            *a += x;
        }
    }
}

/// The autodiff model (candle's backprop): every variant and regulariser.
pub struct AutodiffStep {
    model: Gpt,
    opt: AdamW,
    reg: RegConfig,
    router_temperature: f64,
    top_k: usize,
    forward: ForwardOptions,
    /// `train.seed`: with the step and micro-batch, the seed of the dropout masks.
    seed: u64,
}

impl AutodiffStep {
    pub fn new(cfg: &Config, model: Gpt, opt: AdamW) -> Self {
        AutodiffStep {
            model,
            opt,
            reg: cfg.reg.clone(),
            router_temperature: cfg.model.router_temperature,
            top_k: cfg.model.top_k,
            forward: ForwardOptions {
                capture: false,
                train: true,
                keep_outputs: reg::needs_outputs(&cfg.reg),
                capture_hidden: false,
                dropout_seed: None,
            },
            seed: cfg.train.seed,
        }
    }

    /// Forward and backward of one micro-batch of `accum`, gradients (divided
    /// by `accum`) added to `grads`; returns the LM loss and the weighted
    /// regularisers.
    fn micro_batch(
        &self,
        batch: &Batch,
        micro: usize,
        accum: usize,
        grads: &mut [Option<Tensor>],
        stats: &mut StepStats,
    ) -> Result<(f64, f64)> {
        let dev = self.model.params.device();
        let x = Tensor::from_vec(batch.inputs.clone(), (batch.b, batch.t), dev)?;
        let y = Tensor::from_vec(batch.targets.clone(), batch.b * batch.t, dev)?;
        let t0 = Instant::now();
        let forward = ForwardOptions {
            dropout_seed: Some(dropout_seed(self.seed, self.opt.t, micro)),
            ..self.forward
        };
        let fwd = self.model.forward_with(&x, forward)?;
        let lm = cross_entropy(&fwd.logits, &y)?;
        let lv = lm.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        finite("loss", lv)?;
        add_loads(
            &mut stats.loads,
            fwd.aux.iter().map(|a| a.routed_load.as_slice()),
        );
        for a in &fwd.aux {
            stats.dropped += a.dropped;
            stats.assigned += a.assigned;
        }
        let terms = reg::batch_terms(&self.reg, &fwd.aux, self.router_temperature)?;
        for (name, v) in &terms.values {
            finite(name, *v)?;
            *stats.reg_terms.entry(name).or_default() += v;
        }
        let loss = match terms.loss {
            Some(r) => (lm + r)?,
            None => lm,
        };
        let loss = if accum > 1 {
            (loss / accum as f64)?
        } else {
            loss
        };
        stats.phases.forward_s += t0.elapsed().as_secs_f64();
        let t1 = Instant::now();
        accumulate(grads, &self.model, &loss.backward()?)?;
        stats.phases.backward_s += t1.elapsed().as_secs_f64();
        Ok((lv, terms.weighted))
    }

    /// λ · L_orth, once per step: its gradient joins the accumulated ones.
    fn orth_gradient(&self, grads: &mut [Option<Tensor>]) -> Result<Option<f64>> {
        if self.reg.orth_lambda == 0.0 {
            return Ok(None);
        }
        let orth = measures::orth_loss(&self.model, self.reg.orth_family, OrthForm::of(&self.reg))?;
        let v = orth.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        finite("orthogonality loss", v)?;
        accumulate(
            grads,
            &self.model,
            &(orth * self.reg.orth_lambda)?.backward()?,
        )?;
        Ok(Some(v))
    }

    /// Global gradient norm, then clipping in place; returns the norm.
    fn clip(grads: &mut [Option<Tensor>], clip: f64) -> Result<f64> {
        let mut sq = 0.0f64;
        for g in grads.iter().flatten() {
            sq += g
                .sqr()?
                .sum_all()?
                .to_dtype(DType::F64)?
                .to_scalar::<f64>()?;
        }
        let gnorm = sq.sqrt();
        finite("gradient norm", gnorm)?;
        let s = clip_scale(clip, gnorm);
        if s != 1.0 {
            for g in grads.iter_mut().flatten() {
                *g = (&*g * s)?;
            }
        }
        Ok(gnorm)
    }

    /// Loss-free balancing: move each layer's selection bias against its load.
    fn balance(&self, loads: &[Vec<u64>]) -> Result<()> {
        for ((l, _), load) in self.model.moe_layers().zip(loads) {
            let name = format!("layers.{l}.moe.balance_bias");
            let var = self.model.params.get(&name).ok_or_else(|| {
                Error::config("model.balance_bias", "loss-free balancing needs the bias")
            })?;
            reg::loss_free_update(var, load, self.reg.loss_free_gamma)?;
        }
        Ok(())
    }
}

impl TrainStep for AutodiffStep {
    fn name(&self) -> &'static str {
        "autodiff"
    }

    fn step(&mut self, batches: &[Batch], plan: &StepPlan) -> Result<StepStats> {
        if plan.top_k != self.top_k {
            self.model.set_top_k(plan.top_k);
        }
        let mut stats = StepStats::default();
        let mut grads: Vec<Option<Tensor>> = vec![None; self.model.params.vars().len()];
        let (mut lm_sum, mut reg_sum) = (0.0, 0.0);
        for (micro, batch) in batches.iter().enumerate() {
            let (lm, reg) =
                self.micro_batch(batch, micro, batches.len(), &mut grads, &mut stats)?;
            lm_sum += lm;
            reg_sum += reg;
        }
        let n = batches.len() as f64;
        stats.lm_loss = lm_sum / n;
        stats.reg_terms.values_mut().for_each(|v| *v /= n);
        stats.orth_loss = self.orth_gradient(&mut grads)?;
        stats.loss =
            stats.lm_loss + self.reg.orth_lambda * stats.orth_loss.unwrap_or(0.0) + reg_sum / n;
        if self.reg.grad_lambda > 0.0 {
            // Gradient-space orthogonality: a first-order step on the update (reg.rs).
            let v = reg::apply_grad_orth(
                &self.model,
                &mut grads,
                self.reg.grad_family,
                self.reg.grad_lambda,
            )?;
            stats.grad_loss = Some(v);
        }
        let t_opt = Instant::now();
        stats.grad_norm = if plan.needs_norm() {
            Self::clip(&mut grads, plan.grad_clip)?
        } else {
            f64::NAN
        };
        self.opt.step(&self.model.params, &grads, plan.lr)?;
        if self.reg.loss_free_gamma > 0.0 {
            self.balance(&stats.loads)?;
        }
        if plan.top_k != self.top_k {
            self.model.set_top_k(self.top_k); // evaluation and checkpoints use the full k
        }
        stats.phases.optimizer_s = t_opt.elapsed().as_secs_f64();
        Ok(stats)
    }

    fn orth_value(&mut self) -> Result<Option<f64>> {
        // None when the family does not exist in this model (gate of MLP experts).
        match measures::orth_loss(&self.model, self.reg.orth_family, OrthForm::of(&self.reg)) {
            Ok(o) => Ok(Some(o.detach().to_dtype(DType::F64)?.to_scalar::<f64>()?)),
            Err(_) => Ok(None),
        }
    }

    fn evaluator(&mut self) -> Box<dyn EvalForward + '_> {
        Box::new(&self.model)
    }

    fn snapshot(&mut self, _optimizer: bool) -> Result<Snapshot<'_>> {
        Ok(Snapshot {
            model: &self.model,
            optimizer: Some(&self.opt),
        })
    }

    fn synchronize(&mut self) -> Result<()> {
        Ok(self.model.params.device().synchronize()?)
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
