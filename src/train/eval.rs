//! Evaluation: validation loss over every target token once, and the
//! measures logged with it (weight and activation overlap, telemetry), plus
//! the end-of-run analysis.

use crate::config::{AnalysisSpace, Config, Routing};
use crate::data::{self, cache::TokenFile, Dataset};
use crate::fsutil::write_atomic;
use crate::measures::{self, Family, LayerAccumulator};
use crate::metrics::{CapturedMeasures, EvalMeasures};
use crate::model::layers::cross_entropy_rows;
use crate::model::Gpt;
use crate::{Error, Result};
use candle_core::{DType, Tensor};
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
            .map(|_| {
                let acc = LayerAccumulator::new(model.cfg.n_experts, k);
                // Soft routing: `routed` = the top-k by gate (docs/MEASURES.md, "Pair sets").
                match model.cfg.routing {
                    Routing::Soft => acc.with_reference_k(model.cfg.top_k),
                    _ => acc,
                }
            })
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
/// and with captured evaluation windows the activation MSO, gap ratio and
/// telemetry, plus model-level means.
pub fn eval_measures(
    model: &Gpt,
    families: &[Family],
    accs: Option<&[LayerAccumulator]>,
) -> Result<EvalMeasures> {
    let mut m = EvalMeasures::default();
    let mut up = None; // weight MSO (up) per layer, for the gap ratios
    for &f in families {
        let per = measures::model_weight_mso(model, f)?;
        if f == Family::Up {
            up = Some(per.clone());
        }
        if per.iter().all(Option::is_none) {
            continue;
        }
        m.weight_mso_mean
            .insert(f.name().into(), measures::mean_present(&per));
        m.weight_mso.insert(f.name().into(), per);
    }
    let up = match up {
        Some(u) => u,
        None => measures::model_weight_mso(model, Family::Up)?,
    };
    m.captured = accs.map(|accs| captured_measures(accs, &up));
    Ok(m)
}

/// Activation MSO, gap ratios and telemetry of the captured windows.
fn captured_measures(accs: &[LayerAccumulator], up: &[Option<f64>]) -> CapturedMeasures {
    let act: Vec<Option<f64>> = accs.iter().map(|a| a.act_mso().ok()).collect();
    let gap = act
        .iter()
        .zip(up)
        .map(|(a, w)| measures::gap_ratio(*a, *w))
        .collect();
    let act_mean = measures::mean_present(&act);
    let tel: Vec<measures::Telemetry> = accs.iter().map(|a| a.telemetry()).collect();
    CapturedMeasures {
        measure_tokens: accs.first().map_or(0, |a| a.tokens) as u64,
        act_mso_null_reason: act_mean
            .is_none()
            .then(|| accs.first().and_then(|a| a.act_mso().err()))
            .flatten(),
        act_mso: act,
        act_mso_mean: act_mean,
        gap_ratio: gap,
        gap_ratio_model: measures::gap_ratio(act_mean, measures::mean_present(up)),
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
