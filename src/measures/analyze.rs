//! `moescope analyze`: every measure of docs/MEASURES.md on a checkpoint, written as
//! the JSON document described in FORMAT.md ("Analysis")
//! (schema `moescope.analysis/1`).

use super::jacobian::{JacobianMode, JacobianReport};
pub use super::layer::LayerAnalyzer;
use super::pairs::{PairSets, SetMean};
use super::subspace::{RankRule, SubspaceReport};
use super::{gap_ratio, mean_present, Family, Telemetry};
use crate::model::Gpt;
use crate::{Error, Result};
use candle_core::Tensor;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::Path;

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
}

impl Default for GeometryOptions {
    fn default() -> Self {
        GeometryOptions {
            jacobian: JacobianMode::Off,
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
    /// `exact`, `estimate:M`, `auto` or `off` (the mode used per layer is in each layer's `jacobian.mode`).
    pub jacobian: String,
    pub jacobian_pairs: &'static str,
    pub jacobian_tokens: usize,
    /// `RANK`, `var:τ:CAP` or `off`.
    pub subspace: String,
    pub subspace_space: &'static str,
    pub subspace_weighted: bool,
    /// Draws of each null (0 = none).
    pub null_draws: usize,
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
        let pick = |p: &PairSets<f64>, s: usize| [p.routed, p.all, p.gate_weighted][s];
        let pick_mean =
            |p: &PairSets<SetMean>, s: usize| [p.routed, p.all, p.gate_weighted][s].map(|m| m.mean);
        GeometrySummary {
            act_mso: sets(&|l, s| pick_mean(&l.act_mso_sets, s)),
            jacobian: sets(&|l, s| l.jacobian.as_ref().and_then(|j| pick_mean(&j.sets, s))),
            jacobian_null_shuffled: sets(&|l, s| {
                l.jacobian.as_ref().and_then(|j| {
                    [
                        j.null.shuffled_routing.routed,
                        None,
                        j.null.shuffled_routing.gate_weighted,
                    ][s]
                        .map(|n| n.mean)
                })
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

/// Read token ids from a JSON array of integers or a 1-D `.npy` of integers.
pub fn read_token_ids(path: &Path) -> Result<Vec<u32>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let bad = |m: String| Error::bad_file(path, m);
    let ids: Vec<i128> = if bytes.starts_with(b"\x93NUMPY") {
        read_npy(&bytes).map_err(bad)?
    } else {
        let v: serde_json::Value = serde_json::from_slice(&bytes)
            .map_err(|e| bad(format!("neither .npy nor JSON: {e}")))?;
        let arr = v
            .as_array()
            .ok_or_else(|| bad("expected a JSON array of integers".into()))?;
        arr.iter()
            .enumerate()
            .map(|(i, x)| {
                x.as_i64()
                    .map(i128::from)
                    .ok_or_else(|| bad(format!("element {i} is not an integer: {x}")))
            })
            .collect::<Result<_>>()?
    };
    ids.iter()
        .enumerate()
        .map(|(i, &x)| {
            u32::try_from(x).map_err(|_| bad(format!("element {i} = {x} is not a valid token id")))
        })
        .collect()
}

fn read_npy(b: &[u8]) -> std::result::Result<Vec<i128>, String> {
    if b.len() < 10 {
        return Err("truncated .npy header".into());
    }
    let (hlen, start) = match b[6] {
        1 => (u16::from_le_bytes([b[8], b[9]]) as usize, 10),
        2 | 3 => {
            if b.len() < 12 {
                return Err("truncated .npy header".into());
            }
            (u32::from_le_bytes([b[8], b[9], b[10], b[11]]) as usize, 12)
        }
        v => return Err(format!("unsupported .npy version {v}")),
    };
    let header = std::str::from_utf8(b.get(start..start + hlen).ok_or("truncated .npy header")?)
        .map_err(|e| e.to_string())?;
    let field = |k: &str| -> Option<String> {
        let i = header.find(&format!("'{k}'"))?;
        let rest = &header[i + k.len() + 2..];
        let rest = rest[rest.find(':')? + 1..].trim_start();
        Some(rest.to_string())
    };
    let descr = field("descr").ok_or("no descr in .npy header")?;
    let descr = descr.trim_start_matches('\'');
    let descr = &descr[..descr.find('\'').ok_or("bad descr")?];
    if field("fortran_order").is_some_and(|f| f.starts_with("True")) {
        return Err("Fortran-ordered arrays are not supported".into());
    }
    let shape = field("shape").ok_or("no shape in .npy header")?;
    let dims: Vec<usize> = shape[1..shape.find(')').ok_or("bad shape")?]
        .split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|s| s.trim().parse().map_err(|_| format!("bad shape {shape}")))
        .collect::<std::result::Result<_, _>>()?;
    if dims.len() != 1 {
        return Err(format!("expected a 1-D array, found shape {dims:?}"));
    }
    let data = &b[start + hlen..];
    let (width, signed, big) = match descr {
        "|u1" | "<u1" => (1, false, false),
        "|i1" | "<i1" => (1, true, false),
        "<u2" => (2, false, false),
        "<i2" => (2, true, false),
        "<u4" => (4, false, false),
        "<i4" => (4, true, false),
        "<u8" => (8, false, false),
        "<i8" => (8, true, false),
        ">i8" | ">i4" | ">u4" | ">u8" => (0, false, true),
        other => {
            return Err(format!(
                "dtype {other} is not an integer type (expected int8..int64 or uint8..uint64)"
            ))
        }
    };
    if big {
        return Err("big-endian arrays are not supported".into());
    }
    if data.len() != dims[0] * width {
        return Err(format!(
            "data holds {} bytes, shape needs {}: truncated file?",
            data.len(),
            dims[0] * width
        ));
    }
    Ok(data
        .chunks_exact(width)
        .map(|c| {
            let mut buf = [0u8; 8];
            buf[..width].copy_from_slice(c);
            let u = u64::from_le_bytes(buf);
            if signed {
                let shift = 64 - 8 * width as u32;
                (((u << shift) as i64) >> shift) as i128
            } else {
                u as i128
            }
        })
        .collect())
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
        return Err(Error::Data(
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
        let out = model.forward(&x, true)?;
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
            jacobian: match geo.jacobian {
                JacobianMode::Exact => "exact".into(),
                JacobianMode::Estimate(m) => format!("estimate:{m}"),
                JacobianMode::Auto => "auto".into(),
                JacobianMode::Off => "off".into(),
            },
            jacobian_pairs: if geo.jacobian_all_pairs {
                "all"
            } else {
                "routed"
            },
            jacobian_tokens: geo.jacobian_tokens.min(n),
            subspace: match geo.subspace {
                RankRule::Fixed(r) => r.to_string(),
                RankRule::Variance(t, c) => format!("var:{t}:{c}"),
                RankRule::Off => "off".into(),
            },
            subspace_space: if geo.output_space { "output" } else { "input" },
            subspace_weighted: geo.weighted,
            null_draws: geo.null_draws,
        }
    }
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

/// A short human-readable table of a report.
pub fn summary_table(r: &Report) -> String {
    let f = |v: Option<f64>| {
        v.map(|x| format!("{x:.4}"))
            .unwrap_or_else(|| "null".into())
    };
    let e = |v: Option<f64>| {
        v.map(|x| format!("{x:.3e}"))
            .unwrap_or_else(|| "null".into())
    };
    let mut s = format!(
        "{:>5} {:>10} {:>10} {:>10} {:>9} {:>9} {:>8} {:>5} {:>8}\n",
        "layer",
        "w_mso(up)",
        "act_mso",
        "act_all",
        "gap",
        "H_router",
        "balance",
        "dead",
        "max_viol"
    );
    for l in &r.layers {
        s += &format!(
            "{:>5} {:>10} {:>10} {:>10} {:>9} {:>9.4} {:>8.4} {:>5} {:>8.3}\n",
            l.index,
            e(l.weight_mso.get("up").copied()),
            f(l.act_mso),
            f(l.act_mso_all),
            l.gap_ratio
                .map(|x| format!("{x:.1}"))
                .unwrap_or_else(|| "null".into()),
            l.telemetry.router_entropy,
            l.telemetry.balance,
            l.telemetry.dead_experts.len(),
            l.telemetry.max_violation
        );
    }
    let m = &r.summary;
    for l in &r.layers {
        if let Some(j) = &l.jacobian {
            s += &jacobian_line(l.index, j);
        }
        if let Some(sp) = &l.subspace {
            s += &subspace_line(l.index, sp);
        }
    }
    s += &format!(
        "pair sets (routed / all / gate_weighted): act MSO {}\n",
        sets_text(&m.geometry.act_mso)
    );
    s += &format!(
        "model weight MSO(up) {} | act MSO {} | act MSO (all pairs) {} | gap ratio {} | over {} tokens\n",
        e(m.weight_mso.get("up").copied()),
        f(m.act_mso),
        f(m.act_mso_all),
        m.gap_ratio.map(|x| format!("{x:.1}")).unwrap_or_else(|| "null".into()),
        r.tokens
    );
    s
}

fn opt4(v: Option<f64>) -> String {
    v.map(|x| format!("{x:.4}"))
        .unwrap_or_else(|| "null".into())
}

fn sets_text(p: &PairSets<f64>) -> String {
    format!(
        "{} / {} / {}",
        opt4(p.routed),
        opt4(p.all),
        opt4(p.gate_weighted)
    )
}

/// One layer's Jacobian line: the instance means, the three pair sets and the nulls.
fn jacobian_line(index: usize, j: &JacobianReport) -> String {
    let mean = |p: &PairSets<SetMean>| PairSets {
        routed: p.routed.map(|m| m.mean),
        all: p.all.map(|m| m.mean),
        gate_weighted: p.gate_weighted.map(|m| m.mean),
    };
    let shuffled = &j.null.shuffled_routing;
    format!(
        "layer {index} Jacobian alignment ({}, {} pairs, {} instances): mean {} | mean |A| {} | mean A² {}{}\n  pair sets (routed / all / gate_weighted): {} | shuffled-routing null: routed {} (z {}), gate_weighted {} (z {}) | random-init experts: {}\n",
        j.mode,
        j.pairs,
        j.instances,
        opt4(j.mean),
        opt4(j.mean_abs),
        opt4(j.mean_sq),
        j.stderr.map(|e| format!(" | stderr {e:.4}")).unwrap_or_default(),
        sets_text(&mean(&j.sets)),
        opt4(shuffled.routed.map(|n| n.mean)),
        opt4(shuffled.routed.and_then(|n| n.z)),
        opt4(shuffled.gate_weighted.map(|n| n.mean)),
        opt4(shuffled.gate_weighted.and_then(|n| n.z)),
        opt4(j.null.random_init.map(|m| m.mean)),
    )
}

/// One layer's subspace line, with the pair sets, the permutation null and
/// the degenerate label.
fn subspace_line(index: usize, sp: &SubspaceReport) -> String {
    let null = match &sp.null {
        Some(n) => format!("null {:.4} ± {:.4}, z {}", n.mean_overlap, n.sd, opt4(n.z)),
        None => "null: none".into(),
    };
    let degenerate = sp
        .degenerate
        .as_ref()
        .map(|d| format!("  DEGENERATE: {d}\n"))
        .unwrap_or_default();
    format!(
        "layer {index} subspaces ({}{}): mean overlap {} (random {:.4}) | {null} | mean normalised geodesic {} | skipped {}\n  pair sets (routed / all / gate_weighted): {}\n{degenerate}",
        sp.space,
        if sp.weighted { ", gate-weighted" } else { "" },
        opt4(sp.mean_overlap),
        sp.random_overlap,
        opt4(sp.mean_geodesic_normalised),
        sp.skipped.len(),
        sets_text(&sp.sets),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn npy(descr: &str, shape: &str, data: &[u8]) -> Vec<u8> {
        let mut h = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}")
            .into_bytes();
        while (10 + h.len() + 1) % 64 != 0 {
            h.push(b' ');
        }
        h.push(b'\n');
        let mut b = b"\x93NUMPY\x01\x00".to_vec();
        b.extend_from_slice(&(h.len() as u16).to_le_bytes());
        b.extend_from_slice(&h);
        b.extend_from_slice(data);
        b
    }

    #[test]
    fn npy_integer_dtypes_and_errors() {
        let u16s: Vec<u8> = [1u16, 65535, 7]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        assert_eq!(
            read_npy(&npy("<u2", "(3,)", &u16s)).unwrap(),
            vec![1, 65535, 7]
        );
        let i32s: Vec<u8> = [5i32, -1].iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(read_npy(&npy("<i4", "(2,)", &i32s)).unwrap(), vec![5, -1]);
        assert_eq!(read_npy(&npy("|u1", "(2,)", &[3, 4])).unwrap(), vec![3, 4]);
        assert!(read_npy(&npy("<f4", "(1,)", &[0, 0, 0, 0]))
            .unwrap_err()
            .contains("not an integer"));
        assert!(read_npy(&npy("<i4", "(1, 2)", &i32s))
            .unwrap_err()
            .contains("1-D"));
        assert!(read_npy(&npy("<i4", "(3,)", &i32s))
            .unwrap_err()
            .contains("truncated"));
        // Negative ids are refused by the caller with the element index.
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("neg.npy");
        std::fs::write(&p, npy("<i4", "(2,)", &i32s)).unwrap();
        let e = read_token_ids(&p).unwrap_err().to_string();
        assert!(e.contains("neg.npy") && e.contains("element 1"), "{e}");
    }
}
