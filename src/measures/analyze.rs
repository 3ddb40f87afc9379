//! `moescope analyze`: every measure of docs/MEASURES.md on a checkpoint, written as
//! the JSON document described in FORMAT.md ("Analysis")
//! (schema `moescope.analysis/1`).

use super::jacobian::{JacobianMode, JacobianReport};
pub use super::layer::LayerAnalyzer;
use super::pairs::{PairSets, SetMean};
use super::subspace::{RankRule, SubspaceReport};
pub use super::summary_table::summary_table;
use super::{gap_ratio, mean_present, Family, Telemetry};
use crate::config::{ActSpace, Granularity};
pub use crate::data::token_ids::read_token_ids;
use crate::model::Gpt;
use crate::{Error, Result};
use candle_core::Tensor;
use serde::Serialize;
use std::collections::BTreeMap;

/// The schema id written into every analysis.
pub const SCHEMA: &str = "moescope.analysis/1";

/// Where the analysed model and tokens came from.
#[derive(Debug, Clone, Serialize)]
pub struct Source {
    pub checkpoint: String,
    pub data: String,
    pub seed: u64,
}

/// Function- and representation-space options (issue: Jacobians, subspaces).
#[derive(Debug, Clone)]
pub struct GeometryOptions {
    pub jacobian: JacobianMode,
    /// f32 products with f64 reductions, or the f64 reference.
    pub jacobian_precision: crate::config::Precision,
    /// Jacobian alignment over all pairs instead of routed pairs.
    pub jacobian_all_pairs: bool,
    /// Tokens (the first ones analysed) used for Jacobian alignment.
    pub jacobian_tokens: usize,
    /// Routed tokens per expert whose Jacobian spectrum is computed (0 = none).
    pub spectra_tokens: usize,
    /// Singular values reported per expert.
    pub top_singular_values: usize,
    pub subspace: RankRule,
    /// PCA of expert outputs h_e instead of inputs.
    pub output_space: bool,
    /// Weight rows by the gate g_e.
    pub weighted: bool,
    pub seed: u64,
    /// Draws of each null (permutation null of subspaces, shuffled routing
    /// of Jacobian alignment); 0 = no nulls.
    pub null_draws: usize,
    /// Tokens kept per layer for the subspace permutation null (its pool).
    pub null_tokens: usize,
    /// Tokens on which independently initialised experts are measured.
    pub null_init_tokens: usize,
    /// Soft routing: the k whose top-k-by-gate pairs are `routed` (the model's `top_k`).
    pub reference_k: Option<usize>,
    /// Activation-overlap spaces besides `output` (`hidden`, `hidden_ln`).
    pub act_spaces: Vec<ActSpace>,
    /// Weight-overlap granularities besides `flat` (`rows`, `cols`).
    pub granularities: Vec<Granularity>,
}

impl Default for GeometryOptions {
    fn default() -> Self {
        GeometryOptions {
            jacobian: JacobianMode::Off,
            jacobian_precision: Default::default(),
            jacobian_all_pairs: true,
            jacobian_tokens: 1024,
            spectra_tokens: 16,
            top_singular_values: 8,
            subspace: RankRule::Off,
            output_space: false,
            weighted: false,
            seed: 0,
            null_draws: 20,
            null_tokens: 4096,
            null_init_tokens: 256,
            reference_k: None,
            act_spaces: Vec::new(),
            granularities: Vec::new(),
        }
    }
}

/// Options that produced the numbers.
#[derive(Debug, Clone, Serialize)]
pub struct Options {
    /// Tokens requested.
    pub tokens: usize,
    pub families: Vec<Family>,
    /// Activation overlap pairs reported: `routed` (act_mso) and `all` (act_mso_all).
    pub pairs: Vec<&'static str>,
    pub seq_len: usize,
    pub batch: usize,
    pub routing: crate::config::Routing,
    pub top_k: usize,
    pub norm_topk: bool,
    /// As the CLI and config spell it: `exact`, `estimate` (64 probes),
    /// `estimate:M`, `auto` or `off` (the mode used per layer is in each
    /// layer's `jacobian.mode`).
    pub jacobian: String,
    pub jacobian_pairs: &'static str,
    pub jacobian_tokens: usize,
    /// As the CLI and config spell it: `RANK`, `var:τ` (cap 16), `var:τ:CAP` or `off`.
    pub subspace: String,
    pub subspace_space: &'static str,
    pub subspace_weighted: bool,
    /// Draws of each null (0 = none).
    pub null_draws: usize,
    /// Activation-overlap spaces measured (`output` always).
    pub act_spaces: Vec<ActSpace>,
    /// Weight-overlap granularities measured (`flat` always).
    pub granularities: Vec<Granularity>,
}

/// One MoE layer's measures.
#[derive(Debug, Clone, Serialize)]
pub struct LayerReport {
    /// Block index of this MoE layer in the model.
    pub index: usize,
    pub weight_mso: BTreeMap<&'static str, f64>,
    /// E×E cosines G_ij per family, diagonal null.
    pub weight_overlap: BTreeMap<&'static str, Vec<Vec<Option<f64>>>>,
    /// Activation MSO over routed pairs; null for k = 1 (see `act_mso_null_reason`).
    pub act_mso: Option<f64>,
    pub act_mso_null_reason: Option<String>,
    /// Activation MSO over all E(E−1)/2 pairs.
    pub act_mso_all: Option<f64>,
    /// Activation MSO under the three pair sets (docs/MEASURES.md, "Pair sets").
    pub act_mso_sets: PairSets<SetMean>,
    /// E×E mean cos² of co-routed pairs (null diagonal / never co-routed).
    pub act_overlap: Vec<Vec<Option<f64>>>,
    /// act_mso / weight_mso(up).
    pub gap_ratio: Option<f64>,
    /// Routed activation MSO in the other spaces asked for, as
    /// `act_mso_hidden` / `act_mso_hidden_ln`.
    #[serde(flatten)]
    pub act_mso_spaces: BTreeMap<String, Option<f64>>,
    /// Weight MSO per family at the other granularities asked for, as
    /// `weight_mso_rows` / `weight_mso_cols`.
    #[serde(flatten)]
    pub weight_mso_granular: BTreeMap<String, BTreeMap<&'static str, f64>>,
    /// Chance level of each reported weight MSO (`up`, `up_rows`, ...): 1/L
    /// for L-dimensional vectors.
    pub weight_mso_chance: BTreeMap<String, f64>,
    /// Weight MSO of the up family (kept for the summary's gap ratio).
    #[serde(skip)]
    pub weight_mso_up: Option<f64>,
    /// Routing telemetry (`load`, `fraction`, `router_entropy`, `load_entropy`,
    /// `balance`, `dead_experts`, `max_violation`), written at this level.
    #[serde(flatten)]
    pub telemetry: Telemetry,
    /// Function space (null when off).
    pub jacobian: Option<JacobianReport>,
    /// Representation space (null when off).
    pub subspace: Option<SubspaceReport>,
    /// Shared (always-on) experts of pretrained models, measured apart from
    /// the routed ones; absent for models without them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shared_expert: Option<SharedExpertReport>,
}

/// The shared expert(s) of a layer (Qwen2-MoE, DeepSeek-MoE), kept out of
/// every pairwise measure and summarised here.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SharedExpertReport {
    /// Hidden width of the shared expert (all shared experts fused).
    pub d_ff: usize,
    /// Mean over routed (token, expert) pairs of cos²(h_shared(x), h_e(x)).
    pub act_cos2_routed: f64,
    /// Mean ‖g_s·h_shared(x)‖ / ‖Σ_e g_e h_e(x)‖ over tokens: the shared share of the update.
    pub norm_ratio: f64,
    /// Mean sigmoid gate of the shared expert (Qwen2-MoE); null when ungated.
    pub gate_mean: Option<f64>,
}

/// Model-level summary.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// Unweighted mean over MoE layers, per family.
    pub weight_mso: BTreeMap<&'static str, f64>,
    pub act_mso: Option<f64>,
    pub act_mso_all: Option<f64>,
    /// mean act_mso / mean weight_mso(up) (ratio of the model means).
    pub gap_ratio: Option<f64>,
    pub router_entropy: f64,
    pub load_entropy: f64,
    pub balance: f64,
    pub dead_experts: usize,
    pub max_violation: f64,
    /// The pairwise measures under the three pair sets, and their nulls,
    /// averaged over layers (docs/MEASURES.md, "Pair sets" and "Nulls").
    pub geometry: GeometrySummary,
}

/// Model-level means (over MoE layers) of the pair-set measures and nulls.
#[derive(Debug, Clone, Default, Serialize)]
pub struct GeometrySummary {
    pub act_mso: PairSets<f64>,
    /// Mean Jacobian alignment A.
    pub jacobian: PairSets<f64>,
    /// Mean A with routing shuffled across tokens (`routed`, `gate_weighted`).
    pub jacobian_null_shuffled: PairSets<f64>,
    /// Mean all-pairs A of independently initialised experts.
    pub jacobian_null_init: Option<f64>,
    /// Mean subspace overlap.
    pub subspace_overlap: PairSets<f64>,
    pub subspace_geodesic_normalised: Option<f64>,
    /// Permutation null of the overlap (mean) and the layers' mean z.
    pub subspace_null_overlap: Option<f64>,
    pub subspace_z: Option<f64>,
    /// Random-subspace overlap r/d.
    pub subspace_random_overlap: Option<f64>,
    /// Why the subspace numbers are degenerate, when they are.
    pub subspace_degenerate: Option<String>,
}

impl GeometrySummary {
    /// Means over `layers` of each present value.
    #[allow(clippy::type_complexity)]
    pub fn of(layers: &[LayerReport]) -> Self {
        let mean = |f: &dyn Fn(&LayerReport) -> Option<f64>| {
            mean_present(&layers.iter().map(f).collect::<Vec<_>>())
        };
        let sets = |f: &dyn Fn(&LayerReport, usize) -> Option<f64>| {
            PairSets::from_fn(|s| mean(&|l| f(l, s)))
        };
        let pick = |p: &PairSets<f64>, s: usize| p.get(s).copied();
        let pick_mean = |p: &PairSets<SetMean>, s: usize| p.get(s).map(|m| m.mean);
        GeometrySummary {
            act_mso: sets(&|l, s| pick_mean(&l.act_mso_sets, s)),
            jacobian: sets(&|l, s| l.jacobian.as_ref().and_then(|j| pick_mean(&j.sets, s))),
            jacobian_null_shuffled: sets(&|l, s| {
                let j = l.jacobian.as_ref()?;
                j.null.shuffled_routing.get(s).map(|n| n.mean)
            }),
            jacobian_null_init: mean(&|l| {
                l.jacobian
                    .as_ref()
                    .and_then(|j| j.null.random_init.map(|m| m.mean))
            }),
            subspace_overlap: sets(&|l, s| l.subspace.as_ref().and_then(|r| pick(&r.sets, s))),
            subspace_geodesic_normalised: mean(&|l| {
                l.subspace.as_ref().and_then(|r| r.mean_geodesic_normalised)
            }),
            subspace_null_overlap: mean(&|l| {
                l.subspace
                    .as_ref()
                    .and_then(|r| r.null.map(|n| n.mean_overlap))
            }),
            subspace_z: mean(&|l| l.subspace.as_ref().and_then(|r| r.null.and_then(|n| n.z))),
            subspace_random_overlap: mean(&|l| l.subspace.as_ref().map(|r| r.random_overlap)),
            subspace_degenerate: layers
                .iter()
                .find_map(|l| l.subspace.as_ref().and_then(|r| r.degenerate.clone())),
        }
    }
}

/// The analysis document.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub schema: &'static str,
    pub source: Source,
    pub options: Options,
    /// Tokens evaluated.
    pub tokens: usize,
    /// Next-token loss and perplexity over the analysed tokens (pretrained
    /// models; absent when not computed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub perplexity: Option<Perplexity>,
    pub layers: Vec<LayerReport>,
    pub summary: Summary,
}

/// Mean next-token cross-entropy (nats) and its exponential.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Perplexity {
    pub loss: f64,
    pub ppl: f64,
    pub tokens: usize,
}

/// Run every measure on `tokens` (the first `n` are used, in windows of the
/// model's context, `batch` windows per forward pass).
pub fn analyze(
    model: &Gpt,
    tokens: &[u32],
    n: usize,
    batch: usize,
    families: &[Family],
    source: Source,
) -> Result<Report> {
    analyze_with(
        model,
        tokens,
        n,
        batch,
        families,
        &GeometryOptions::default(),
        source,
    )
}

/// [`analyze`] with function- and representation-space measures.
pub fn analyze_with(
    model: &Gpt,
    tokens: &[u32],
    n: usize,
    batch: usize,
    families: &[Family],
    geo: &GeometryOptions,
    source: Source,
) -> Result<Report> {
    let moe_layers: Vec<usize> = model.moe_layers().map(|(l, _)| l).collect();
    if moe_layers.is_empty() {
        return Err(Error::Other(
            "the model has no MoE layer: nothing to analyse".into(),
        ));
    }
    check_tokens(tokens, n, model.cfg.vocab_size)?;
    let dev = model.params.device().clone();
    let t = model.cfg.seq_len;
    let k = model.cfg.active_experts();
    let renorm = model.cfg.norm_topk && model.cfg.routing == crate::config::Routing::Topk;
    let mut geo = geo.clone();
    if model.cfg.routing == crate::config::Routing::Soft {
        geo.reference_k = Some(model.cfg.top_k.min(model.cfg.n_experts));
    }
    let geo = &geo;
    let mut analyzers: Vec<LayerAnalyzer> = moe_layers
        .iter()
        .map(|&l| LayerAnalyzer::new(l, model.cfg.n_experts, k, model.cfg.d_model, renorm, geo))
        .collect();
    let windows = crate::data::eval_windows(n + 1, t, 0); // inputs cover tokens[0..n]
    for r in crate::data::batch_ranges(&windows, batch, |a, b| a.1 == b.1) {
        let (b, len) = (r.len(), windows[r.start].1);
        let mut inputs = Vec::with_capacity(b * len);
        for &(s, l) in &windows[r] {
            inputs.extend_from_slice(&tokens[s..s + l]);
        }
        let x = Tensor::from_vec(inputs, (b, len), &dev)?;
        let out = model.forward_with(
            &x,
            crate::model::moe::ForwardOptions {
                capture: true,
                capture_hidden: geo.act_spaces.iter().any(|&s| s != ActSpace::Output),
                ..Default::default()
            },
        )?;
        for ((an, cap), (_, moe)) in analyzers
            .iter_mut()
            .zip(&out.captures)
            .zip(model.moe_layers())
        {
            an.observe(moe, &cap.input, &cap.moe, geo)?;
        }
    }
    let tokens_seen = analyzers[0].tokens();
    let layers = analyzers
        .into_iter()
        .zip(model.moe_layers())
        .map(|(an, (_, moe))| an.finish(moe, families, geo))
        .collect::<Result<Vec<_>>>()?;
    let summary = summarize(&layers, families);
    Ok(Report {
        schema: SCHEMA,
        source,
        options: Options::new(
            n,
            families,
            t,
            batch,
            (model.cfg.routing, model.cfg.top_k, model.cfg.norm_topk),
            geo,
        ),
        tokens: tokens_seen,
        perplexity: None,
        layers,
        summary,
    })
}

/// Refuse empty input, `n` outside 1..=len, and ids outside the vocabulary.
pub fn check_tokens(tokens: &[u32], n: usize, vocab: usize) -> Result<()> {
    if tokens.is_empty() {
        return Err(Error::Data(
            "no tokens to analyse (the token input is empty)".into(),
        ));
    }
    if n == 0 || n > tokens.len() {
        return Err(Error::Data(format!(
            "--tokens {n} is not between 1 and the {} tokens available",
            tokens.len()
        )));
    }
    if let Some((i, &t)) = tokens[..n]
        .iter()
        .enumerate()
        .find(|(_, &t)| t as usize >= vocab)
    {
        return Err(Error::Data(format!(
            "token {i} has id {t}, outside the model's vocabulary of {vocab}"
        )));
    }
    Ok(())
}

impl Options {
    /// The options block of a report.
    pub fn new(
        n: usize,
        families: &[Family],
        seq_len: usize,
        batch: usize,
        (routing, top_k, norm_topk): (crate::config::Routing, usize, bool),
        geo: &GeometryOptions,
    ) -> Self {
        Options {
            tokens: n,
            families: families.to_vec(),
            pairs: vec!["routed", "all"],
            seq_len,
            batch,
            routing,
            top_k,
            norm_topk,
            jacobian: geo.jacobian.to_string(),
            jacobian_pairs: if geo.jacobian_all_pairs {
                "all"
            } else {
                "routed"
            },
            jacobian_tokens: geo.jacobian_tokens.min(n),
            subspace: geo.subspace.to_string(),
            subspace_space: if geo.output_space { "output" } else { "input" },
            subspace_weighted: geo.weighted,
            null_draws: geo.null_draws,
            act_spaces: with_first(ActSpace::Output, &geo.act_spaces),
            granularities: with_first(Granularity::Flat, &geo.granularities),
        }
    }
}

/// `first`, then the rest of `more` in order, without repeats.
fn with_first<T: Copy + PartialEq>(first: T, more: &[T]) -> Vec<T> {
    let mut v = vec![first];
    for &m in more {
        if !v.contains(&m) {
            v.push(m);
        }
    }
    v
}

/// The model-level summary of per-layer reports.
pub fn summarize(layers: &[LayerReport], families: &[Family]) -> Summary {
    let mean = |f: &dyn Fn(&LayerReport) -> f64| {
        layers.iter().map(f).sum::<f64>() / layers.len().max(1) as f64
    };
    let mut weight_mso = BTreeMap::new();
    for &f in families {
        let per: Vec<Option<f64>> = layers
            .iter()
            .map(|l| l.weight_mso.get(f.name()).copied())
            .collect();
        if let Some(m) = mean_present(&per) {
            weight_mso.insert(f.name(), m);
        }
    }
    let ups: Vec<Option<f64>> = layers.iter().map(|l| l.weight_mso_up).collect();
    let up_mean = mean_present(&ups);
    let act_mean = mean_present(&layers.iter().map(|l| l.act_mso).collect::<Vec<_>>());
    Summary {
        weight_mso,
        act_mso: act_mean,
        act_mso_all: mean_present(&layers.iter().map(|l| l.act_mso_all).collect::<Vec<_>>()),
        gap_ratio: gap_ratio(act_mean, up_mean),
        router_entropy: mean(&|l| l.telemetry.router_entropy),
        load_entropy: mean(&|l| l.telemetry.load_entropy),
        balance: mean(&|l| l.telemetry.balance),
        dead_experts: layers.iter().map(|l| l.telemetry.dead_experts.len()).sum(),
        max_violation: layers
            .iter()
            .map(|l| l.telemetry.max_violation)
            .fold(0.0, f64::max),
        geometry: GeometrySummary::of(layers),
    }
}
