//! Evaluation: validation loss over every target token once, and the
//! measures logged with it (weight and activation overlap, telemetry), plus
//! the end-of-run analysis.

use crate::config::{
    ActSpace, AnalysisSpace, Config, Granularity, MeasureConfig, ModelConfig, Routing,
};
use crate::data::{self, cache::TokenFile, Dataset};
use crate::fsutil::write_atomic;
use crate::measures::{self, Family, LayerAccumulator};
use crate::metrics::{ActMeasure, CapturedMeasures, EvalMeasures, WeightMeasure};
use crate::model::layers::cross_entropy_rows;
use crate::model::moe::{CapturedRouting, ForwardOptions};
use crate::model::Gpt;
use crate::{Error, Result};
use candle_core::{DType, Tensor};
use std::collections::BTreeMap;
use std::path::Path;

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
#[derive(Debug, Clone)]
pub struct MeasureSpec {
    /// About this many target tokens (whole windows, chosen with `seed`).
    pub tokens: usize,
    pub seed: u64,
    /// The spaces of activation overlap (`output` is always measured: the
    /// telemetry comes with it).
    pub spaces: Vec<ActSpace>,
}

/// One space's activation overlap and telemetry, one accumulator per MoE layer.
#[derive(Debug, Clone)]
pub struct SpaceAccumulators {
    pub space: ActSpace,
    pub layers: Vec<LayerAccumulator>,
}

/// One forward pass of an evaluation batch, by whichever executor holds the
/// current weights: the autodiff model ([`Gpt`]) or the fused training
/// engine (`engine::Engine`, which then needs no copy of the model).
pub trait EvalForward {
    /// Σ over the `shape = (b, t)` targets of the next-token cross-entropy (nats, f64),
    /// and with `capture` what each MoE layer routed and computed (with
    /// `capture_hidden` also the experts' hidden activations).
    fn eval_batch(
        &mut self,
        inputs: Vec<u32>,
        targets: Vec<u32>,
        shape: (usize, usize),
        capture: bool,
        capture_hidden: bool,
    ) -> Result<(f64, Vec<CapturedRouting>)>;
}

impl<F: EvalForward + ?Sized> EvalForward for &mut F {
    fn eval_batch(
        &mut self,
        inputs: Vec<u32>,
        targets: Vec<u32>,
        shape: (usize, usize),
        capture: bool,
        capture_hidden: bool,
    ) -> Result<(f64, Vec<CapturedRouting>)> {
        (**self).eval_batch(inputs, targets, shape, capture, capture_hidden)
    }
}

impl EvalForward for &Gpt {
    fn eval_batch(
        &mut self,
        inputs: Vec<u32>,
        targets: Vec<u32>,
        (b, t): (usize, usize),
        capture: bool,
        capture_hidden: bool,
    ) -> Result<(f64, Vec<CapturedRouting>)> {
        let dev = self.params.device().clone();
        let x = Tensor::from_vec(inputs, (b, t), &dev)?;
        let y = Tensor::from_vec(targets, b * t, &dev)?;
        let out = self.forward_with(
            &x,
            ForwardOptions {
                capture,
                capture_hidden,
                ..Default::default()
            },
        )?;
        let ce = cross_entropy_rows(&out.logits, &y)?
            .to_dtype(DType::F64)?
            .sum_all()?
            .to_scalar::<f64>()?;
        Ok((ce, out.captures.into_iter().map(|c| c.moe).collect()))
    }
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
) -> Result<(EvalResult, Option<Vec<SpaceAccumulators>>)> {
    evaluate_with(&mut &*model, &model.cfg, data, batch, max_tokens, measure)
}

/// [`evaluate_measured`] on any executor of the model `cfg` describes.
pub fn evaluate_with(
    fwd: &mut dyn EvalForward,
    cfg: &ModelConfig,
    data: &TokenFile,
    batch: usize,
    max_tokens: usize,
    measure: Option<MeasureSpec>,
) -> Result<(EvalResult, Option<Vec<SpaceAccumulators>>)> {
    let t = cfg.seq_len;
    let measure = measure.filter(|m| m.tokens > 0);
    let order = window_order(data.len(), t, max_tokens, measure.as_ref());
    let mut accs = measure.as_ref().map(|m| space_accumulators(cfg, &m.spaces));
    let capture_hidden = accs
        .as_ref()
        .is_some_and(|a| a.iter().any(|s| s.space != ActSpace::Output));
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
        let (ce, captures) =
            fwd.eval_batch(inputs, targets, (b, len), cap, cap && capture_hidden)?;
        if let (true, Some(accs)) = (cap, accs.as_mut()) {
            for space in accs.iter_mut() {
                for (acc, c) in space.layers.iter_mut().zip(&captures) {
                    if let Some(rows) = c.in_space(space.space)? {
                        acc.add(&rows)?;
                    }
                }
            }
        }
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

/// The evaluation windows (start, length, captured): with `measure`, a
/// seeded choice of whole windows is captured, and those come first.
fn window_order(
    n_tokens: usize,
    t: usize,
    max_tokens: usize,
    measure: Option<&MeasureSpec>,
) -> Vec<(usize, usize, bool)> {
    use rand::seq::SliceRandom;
    use rand::SeedableRng;
    let windows = data::eval_windows(n_tokens, t, max_tokens);
    let mut order: Vec<(usize, usize, bool)> =
        windows.iter().map(|&(s, l)| (s, l, false)).collect();
    if let Some(m) = measure {
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
    order
}

/// One accumulator per MoE layer for each space (output first).
fn space_accumulators(cfg: &ModelConfig, spaces: &[ActSpace]) -> Vec<SpaceAccumulators> {
    let k = cfg.active_experts();
    let mut spaces: Vec<ActSpace> = spaces.to_vec();
    spaces.retain(|&s| s != ActSpace::Output);
    spaces.insert(0, ActSpace::Output);
    spaces.dedup();
    spaces
        .into_iter()
        .map(|space| SpaceAccumulators {
            space,
            layers: cfg
                .moe_layers()
                .iter()
                .map(|_| {
                    let acc = LayerAccumulator::new(cfg.n_experts, k);
                    // Soft routing: `routed` = the top-k by gate (docs/MEASURES.md, "Pair sets").
                    match cfg.routing {
                        Routing::Soft => acc.with_reference_k(cfg.top_k),
                        _ => acc,
                    }
                })
                .collect(),
        })
        .collect()
}

/// The measures logged with an evaluation: per-layer weight MSO per family
/// and granularity with its chance level, and with captured evaluation
/// windows the activation MSO of each space, gap ratio and telemetry.
pub fn eval_measures(
    model: &Gpt,
    measure: &MeasureConfig,
    accs: Option<&[SpaceAccumulators]>,
) -> Result<EvalMeasures> {
    let mut m = EvalMeasures::default();
    let mut grans = measure.granularity.clone();
    if !grans.contains(&Granularity::Flat) {
        grans.insert(0, Granularity::Flat); // the gap ratio needs it
    }
    for &g in &grans {
        let w = weight_measure(model, &measure.families, g)?;
        match g {
            Granularity::Flat => {
                (m.weight_mso, m.weight_mso_mean) = (w.per_layer, w.mean);
                m.weight_mso_chance = w.chance;
            }
            Granularity::Rows => m.weight_mso_rows = Some(w),
            Granularity::Cols => m.weight_mso_cols = Some(w),
        }
    }
    let up = match m.weight_mso.get("up") {
        Some(u) => u.clone(),
        None => measures::model_weight_mso(model, Family::Up, Granularity::Flat)?,
    };
    m.captured = accs.map(|accs| captured_measures(model, accs, &up));
    Ok(m)
}

/// Weight MSO of every family at granularity `g`, per layer and mean, with chance levels.
fn weight_measure(model: &Gpt, families: &[Family], g: Granularity) -> Result<WeightMeasure> {
    let mut w = WeightMeasure::default();
    for &f in families {
        let per = measures::model_weight_mso(model, f, g)?;
        if per.iter().all(Option::is_none) {
            continue;
        }
        w.mean.insert(f.name().into(), measures::mean_present(&per));
        w.per_layer.insert(f.name().into(), per);
        if let Some(c) = measures::weight_chance(model, f, g)? {
            w.chance.insert(f.name().into(), c);
        }
    }
    Ok(w)
}

/// The level activation MSO has for independent isotropic random vectors of
/// a space's dimension: 1/d, 1/d_ff, and 1/(d_ff − 1) after LayerNorm (its
/// centring removes one dimension).
fn act_chance(model: &Gpt, space: ActSpace) -> f64 {
    let (d, f) = (model.cfg.d_model as f64, model.cfg.d_ff as f64);
    match space {
        ActSpace::Output => 1.0 / d,
        ActSpace::Hidden => 1.0 / f,
        ActSpace::HiddenLn => 1.0 / (f - 1.0).max(1.0),
    }
}

/// Activation MSO of each space, gap ratios and telemetry of the captured windows.
fn captured_measures(
    model: &Gpt,
    accs: &[SpaceAccumulators],
    up: &[Option<f64>],
) -> CapturedMeasures {
    let output = &accs[0].layers; // `space_accumulators` puts output first
    let act_of = |layers: &[LayerAccumulator], space: ActSpace| {
        let per: Vec<Option<f64>> = layers.iter().map(|a| a.act_mso().ok()).collect();
        ActMeasure {
            mean: measures::mean_present(&per),
            per_layer: per,
            chance: act_chance(model, space),
        }
    };
    let act = act_of(output, ActSpace::Output);
    let gap = act
        .per_layer
        .iter()
        .zip(up)
        .map(|(a, w)| measures::gap_ratio(*a, *w))
        .collect();
    let other_spaces: BTreeMap<String, ActMeasure> = accs[1..]
        .iter()
        .map(|s| (s.space.name().to_string(), act_of(&s.layers, s.space)))
        .collect();
    let tel: Vec<measures::Telemetry> = output.iter().map(|a| a.telemetry()).collect();
    CapturedMeasures {
        measure_tokens: output.first().map_or(0, |a| a.tokens) as u64,
        act_mso_null_reason: act
            .mean
            .is_none()
            .then(|| output.first().and_then(|a| a.act_mso().err()))
            .flatten(),
        gap_ratio_model: measures::gap_ratio(act.mean, measures::mean_present(up)),
        act_mso_hidden: other_spaces.get("hidden").cloned(),
        act_mso_hidden_ln: other_spaces.get("hidden_ln").cloned(),
        act_mso: act.per_layer,
        act_mso_mean: act.mean,
        act_mso_chance: Some(act.chance),
        gap_ratio: gap,
        router_entropy: tel.iter().map(|t| t.router_entropy).collect(),
        load_entropy: tel.iter().map(|t| t.load_entropy).collect(),
        balance: tel.iter().map(|t| t.balance).collect(),
        max_violation: tel.iter().map(|t| t.max_violation).collect(),
        dead_experts: tel.iter().map(|t| t.dead_experts.clone()).collect(),
        load: tel.iter().map(|t| t.load.clone()).collect(),
    }
}

/// Every measure of `moescope analyze` on the start of the validation split,
/// written to `RUN/analysis.json`.
pub fn final_analysis(model: &Gpt, cfg: &Config, ds: &Dataset, out: &Path) -> Result<()> {
    use crate::measures::analyze::{analyze_with, GeometryOptions, Source};
    let n = cfg.measure.analysis_tokens.min(ds.valid.len());
    let toks = data::analysis_tokens(&ds.valid, n);
    let geo = GeometryOptions {
        jacobian: cfg.measure.jacobian,
        subspace: cfg.measure.subspace,
        output_space: cfg.measure.subspace_space == AnalysisSpace::Output,
        weighted: cfg.measure.subspace_weighted,
        null_draws: cfg.measure.null_draws,
        seed: cfg.measure.seed,
        act_spaces: cfg.measure.act_space.clone(),
        granularities: cfg.measure.granularity.clone(),
        ..Default::default()
    };
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
        Family::ALL,
        &geo,
        source,
    )?;
    write_atomic(
        &out.join("analysis.json"),
        &serde_json::to_vec_pretty(&report).expect("json"),
    )
}
