//! Expert-geometry measures (definitions: docs/MEASURES.md): weight overlap (MSO),
//! activation overlap, routing telemetry, and the orthogonality loss.
//!
//! Weight measures read the parameters; activation measures and telemetry
//! read a [`CapturedRouting`] of a forward pass (the same pass that computes the
//! loss, so logging them costs no second forward). Accumulation is in f64.

pub mod analyze;
pub mod jacobian;
pub mod layer;
pub mod orth;
pub mod pairs;
pub mod subspace;
pub mod summary_table;

use crate::model::moe::{CapturedRouting, MoeLayer, NO_EXPERT};
use crate::model::Gpt;
use crate::{Error, Result};
use candle_core::{DType, Tensor};
use serde::Serialize;

pub use crate::config::{Family, Granularity};
pub use orth::OrthForm;

/// Where each family's matrices live in an MoE layer.
impl Family {
    /// The per-expert tensors of this family in `moe` (None when the layer has
    /// no such matrices, e.g. `gate` of MLP experts). Router rows are (1, d) views.
    pub fn tensors(self, moe: &MoeLayer) -> Result<Option<Vec<Tensor>>> {
        Ok(match self {
            Family::Up => Some(moe.experts.iter().map(|e| e.up.weight.clone()).collect()),
            Family::Down => Some(moe.experts.iter().map(|e| e.down.weight.clone()).collect()),
            Family::Gate => {
                let g: Option<Vec<Tensor>> = moe
                    .experts
                    .iter()
                    .map(|e| e.gate.as_ref().map(|g| g.weight.clone()))
                    .collect();
                g
            }
            Family::Router => Some(
                (0..moe.n_experts())
                    .map(|e| moe.router.weight.narrow(0, e, 1))
                    .collect::<candle_core::Result<_>>()?,
            ),
        })
    }
}

/// The E×E matrix of raw inner products G_ij = ⟨w_i, w_j⟩ of flattened
/// vectors (f64 accumulation, pairs in parallel).
pub fn raw_gram<T, V>(vecs: &[V]) -> Vec<Vec<f64>>
where
    T: Copy + Into<f64>,
    V: AsRef<[T]> + Sync,
{
    use rayon::prelude::*;
    let e = vecs.len();
    let pairs: Vec<(usize, usize)> = (0..e).flat_map(|i| (i..e).map(move |j| (i, j))).collect();
    let dots: Vec<f64> = pairs
        .par_iter()
        .map(|&(i, j)| {
            vecs[i]
                .as_ref()
                .iter()
                .zip(vecs[j].as_ref())
                .map(|(&a, &b)| a.into() * b.into())
                .sum()
        })
        .collect();
    let mut g = vec![vec![0.0f64; e]; e];
    for (&(i, j), &dot) in pairs.iter().zip(&dots) {
        g[i][j] = dot;
        g[j][i] = dot;
    }
    g
}

/// The E×E matrix G_ij = ⟨w̃_i, w̃_j⟩ of unit-normalised flattened vectors
/// (f64 accumulation, pairs in parallel).
pub fn cosine_gram<T, V>(vecs: &[V]) -> Vec<Vec<f64>>
where
    T: Copy + Into<f64>,
    V: AsRef<[T]> + Sync,
{
    let mut g = raw_gram(vecs);
    let e = g.len();
    let norms: Vec<f64> = (0..e).map(|i| g[i][i].sqrt()).collect();
    for i in 0..e {
        for j in 0..e {
            let d = norms[i] * norms[j];
            g[i][j] = if d > 0.0 { g[i][j] / d } else { 0.0 };
        }
    }
    g
}

/// Run `f` on the flattened f32 data of `ts`, borrowed in place for
/// contiguous f32 CPU tensors (no copy of multi-GB expert weights) and
/// copied otherwise.
pub fn with_f32_slices<R>(ts: &[Tensor], f: impl FnOnce(&[&[f32]]) -> R) -> Result<R> {
    use candle_core::{CpuStorage, Storage};
    let guards: Vec<_> = ts.iter().map(|t| t.storage_and_layout()).collect();
    let borrowable = |i: usize| -> bool {
        let (st, layout) = &guards[i];
        matches!(&**st, Storage::Cpu(CpuStorage::F32(_))) && layout.contiguous_offsets().is_some()
    };
    let owned: Vec<Option<Vec<f32>>> = (0..ts.len())
        .map(|i| {
            if borrowable(i) {
                Ok(None)
            } else {
                ts[i]
                    .to_dtype(DType::F32)?
                    .to_device(&candle_core::Device::Cpu)?
                    .flatten_all()?
                    .to_vec1::<f32>()
                    .map(Some)
            }
        })
        .collect::<candle_core::Result<_>>()?;
    let slices: Vec<&[f32]> = (0..ts.len())
        .map(|i| match &owned[i] {
            Some(v) => v.as_slice(),
            None => {
                let (st, layout) = &guards[i];
                let (a, b) = layout.contiguous_offsets().expect("checked");
                match &**st {
                    Storage::Cpu(CpuStorage::F32(v)) => &v[a..b],
                    _ => unreachable!("checked"),
                }
            }
        })
        .collect();
    Ok(f(&slices))
}

/// MSO = 2/(E(E−1)) Σ_{i<j} G_ij² (0 for a single expert).
pub fn mso(g: &[Vec<f64>]) -> f64 {
    let e = g.len();
    if e < 2 {
        return 0.0;
    }
    let s: f64 = g
        .iter()
        .enumerate()
        .map(|(i, row)| row[i + 1..].iter().map(|v| v * v).sum::<f64>())
        .sum();
    2.0 * s / (e * (e - 1)) as f64
}

/// An E×E matrix with a null diagonal, for JSON.
pub fn null_diagonal(g: &[Vec<f64>]) -> Vec<Vec<Option<f64>>> {
    g.iter()
        .enumerate()
        .map(|(i, r)| {
            r.iter()
                .enumerate()
                .map(|(j, v)| (i != j).then_some(*v))
                .collect()
        })
        .collect()
}

/// Weight overlap of one layer and family.
#[derive(Debug, Clone, Serialize)]
pub struct WeightOverlap {
    pub family: Family,
    /// G_ij² is what MSO averages; this holds G_ij (cosines), diagonal null.
    pub matrix: Vec<Vec<Option<f64>>>,
    pub mso: f64,
}

/// Weight overlap of `moe` for `family` (None when the layer lacks the family).
pub fn weight_overlap(moe: &MoeLayer, family: Family) -> Result<Option<WeightOverlap>> {
    let Some(ts) = family.tensors(moe)? else {
        return Ok(None);
    };
    let g = with_f32_slices(&ts, |v| cosine_gram(v))?;
    Ok(Some(WeightOverlap {
        family,
        mso: mso(&g),
        matrix: null_diagonal(&g),
    }))
}

/// The differentiable L_orth of one layer (see [`orth`] for the forms).
pub fn orth_penalty(moe: &MoeLayer, family: Family, form: OrthForm) -> Result<Option<Tensor>> {
    let Some(ts) = family.tensors(moe)? else {
        return Ok(None);
    };
    gram_penalty(&ts, form).map(Some)
}

/// (1/S) Σ_s Σ_{i<j} φ(u_i, u_j) over the S vectors of `form.granularity` of
/// each (R × C) tensor, differentiable; with a normalised variant every
/// vector must be non-zero.
pub fn gram_penalty(ts: &[Tensor], form: OrthForm) -> Result<Tensor> {
    use crate::config::OrthVariant;
    let e = ts.len();
    let w = Tensor::stack(ts, 0)?; // (E, R, C)
    let w = match form.granularity {
        Granularity::Flat => w.flatten_from(1)?.unsqueeze(0)?, // (1, E, R·C)
        Granularity::Rows => w.permute((1, 0, 2))?.contiguous()?, // (R, E, C)
        Granularity::Cols => w.permute((2, 0, 1))?.contiguous()?, // (C, E, R)
    };
    let g = w.matmul(&w.transpose(1, 2)?.contiguous()?)?; // (S, E, E) raw Grams
    let phi = match form.variant {
        OrthVariant::Unnormalized => g,
        variant => {
            let mut norms = w.sqr()?.sum_keepdim(2)?.sqrt()?; // (S, E, 1)
            if variant == OrthVariant::DetachedNorm {
                norms = norms.detach();
            }
            let inv = norms.recip()?;
            g.broadcast_mul(&inv)?
                .broadcast_mul(&inv.transpose(1, 2)?)?
        }
    };
    let mask: Vec<f32> = (0..e * e)
        .map(|k| if k % e > k / e { 1.0 } else { 0.0 })
        .collect();
    let mask = Tensor::from_vec(mask, (e, e), w.device())?.to_dtype(w.dtype())?;
    let per_slice = phi.sqr()?.broadcast_mul(&mask)?.sum((1, 2))?; // (S)
    Ok(per_slice.mean_all()?)
}

/// L_orth of the whole model: Σ over MoE layers (SPEC eq. 1). Errors when the
/// family does not exist in the model (e.g. `gate` with MLP experts).
pub fn orth_loss(model: &Gpt, family: Family, form: OrthForm) -> Result<Tensor> {
    let mut total: Option<Tensor> = None;
    for (_, moe) in model.moe_layers() {
        let p = orth_penalty(moe, family, form)?.ok_or_else(|| {
            Error::config(
                "reg.orth_family",
                format!(
                    "the experts have no `{}` matrices (MLP experts have no gate)",
                    family.name()
                ),
            )
        })?;
        total = Some(match total {
            Some(t) => (t + p)?,
            None => p,
        });
    }
    total.ok_or_else(|| Error::Other("the model has no MoE layer".into()))
}

/// cos²(a, b) in f64; 0 when either vector is zero (as the activation MSO counts it).
pub fn cos2(a: &[f32], b: &[f32]) -> f64 {
    let (mut ab, mut aa, mut bb) = (0.0f64, 0.0f64, 0.0f64);
    for (x, y) in a.iter().zip(b) {
        let (x, y) = (*x as f64, *y as f64);
        ab += x * y;
        aa += x * x;
        bb += y * y;
    }
    if aa == 0.0 || bb == 0.0 {
        0.0
    } else {
        ab * ab / (aa * bb)
    }
}

fn entropy(p: impl Iterator<Item = f64>) -> f64 {
    p.filter(|&x| x > 0.0).map(|x| -x * x.ln()).sum()
}

/// Accumulates one MoE layer's activation overlap and routing telemetry over
/// any number of captured forward passes.
#[derive(Debug, Clone)]
pub struct LayerAccumulator {
    pub n_experts: usize,
    /// Experts per token (k; E for soft routing).
    pub k: usize,
    pub tokens: usize,
    /// Σ over tokens of the token's MSO_act over its routed pairs.
    act_sum: f64,
    /// Tokens with at least two experts (the denominator of act_sum).
    act_tokens: usize,
    /// Σ over tokens of the token's MSO_act over all pairs (when added).
    act_all_sum: f64,
    act_all_tokens: usize,
    /// Σ cos² and counts per co-routed pair.
    pair_sum: Vec<f64>,
    pair_count: Vec<u64>,
    load: Vec<u64>,
    router_entropy_sum: f64,
    /// Soft routing: the top-k by gate whose pairs count as `routed`.
    reference_k: Option<usize>,
    /// Activation cos² under the three pair sets (all-pairs outputs only).
    act_sets: pairs::PairMeans,
}

impl LayerAccumulator {
    pub fn new(n_experts: usize, k: usize) -> Self {
        LayerAccumulator {
            n_experts,
            k,
            tokens: 0,
            act_sum: 0.0,
            act_tokens: 0,
            act_all_sum: 0.0,
            act_all_tokens: 0,
            pair_sum: vec![0.0; n_experts * n_experts],
            pair_count: vec![0; n_experts * n_experts],
            load: vec![0; n_experts],
            router_entropy_sum: 0.0,
            reference_k: None,
            act_sets: pairs::PairMeans::default(),
        }
    }

    /// Under soft routing (every expert takes every token), count as routed
    /// the pairs among each token's top-`k` experts by gate: the pairs a
    /// top-k router would have selected (see [`pairs`]).
    pub fn with_reference_k(mut self, k: usize) -> Self {
        self.reference_k = Some(k);
        self
    }

    /// Each token's routed experts for the pair sets, (n × k, k): what the
    /// router selected, or under soft routing with a reference k (every
    /// expert selected) the top-k by gate.
    pub fn routed_selection(&self, cap: &CapturedRouting) -> (Vec<u32>, usize) {
        match self.reference_k {
            Some(k) if cap.k == self.n_experts && k < cap.k => (
                crate::model::moe::top_k_rows(&cap.probs, self.n_experts, k),
                k,
            ),
            _ => (cap.selected.clone(), cap.k),
        }
    }

    /// Add the tokens of one captured forward pass.
    pub fn add(&mut self, cap: &CapturedRouting) -> Result<()> {
        let (routed, k) = self.routed_selection(cap);
        self.add_routed(cap, &routed, k)
    }

    /// [`Self::add`] with the pass's routed selection already made
    /// (`routed`, n × `rk`, from [`Self::routed_selection`]).
    pub fn add_routed(&mut self, cap: &CapturedRouting, routed: &[u32], rk: usize) -> Result<()> {
        let e_n = self.n_experts;
        let k = cap.k;
        let n = cap.probs.len() / e_n;
        // Host copies of each expert's outputs, and where each (token, slot) row lives.
        let outs: Vec<Option<(Vec<f32>, usize)>> = cap
            .expert_outputs
            .iter()
            .map(|(_, h)| match h {
                Some(h) => {
                    let d = h.dim(1)?;
                    Ok(Some((
                        h.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?,
                        d,
                    )))
                }
                None => Ok(None),
            })
            .collect::<candle_core::Result<_>>()?;
        let mut cursor = vec![0usize; e_n];
        // (expert, row in its outputs) per (token, slot); None for an empty slot.
        let mut rows: Vec<Option<(usize, usize)>> = vec![None; n * k];
        // The dispatch lists tokens in ascending order per expert; replay that order.
        for t in 0..n {
            for s in 0..k {
                let e = cap.selected[t * k + s];
                if e != NO_EXPERT {
                    let e = e as usize;
                    rows[t * k + s] = Some((e, cursor[e]));
                    cursor[e] += 1;
                }
            }
        }
        let row = |e: usize, i: usize| -> &[f32] {
            let (v, d) = outs[e].as_ref().expect("expert with tokens has outputs");
            &v[i * d..(i + 1) * d]
        };
        self.add_routing(&cap.probs, &cap.selected, k);
        for t in 0..n {
            let chosen = &routed[t * rk..(t + 1) * rk];
            let present: Vec<(usize, usize)> = rows[t * k..(t + 1) * k]
                .iter()
                .flatten()
                .copied()
                .filter(|(e, _)| chosen.contains(&(*e as u32)))
                .collect();
            let m = present.len();
            if m >= 2 {
                let mut sum = 0.0;
                for a in 0..m {
                    for b in a + 1..m {
                        let (ea, ia) = present[a];
                        let (eb, ib) = present[b];
                        let c = cos2(row(ea, ia), row(eb, ib));
                        sum += c;
                        let (lo, hi) = (ea.min(eb), ea.max(eb));
                        self.pair_sum[lo * e_n + hi] += c;
                        self.pair_count[lo * e_n + hi] += 1;
                    }
                }
                self.act_sum += sum * 2.0 / (m * (m - 1)) as f64;
                self.act_tokens += 1;
            }
        }
        Ok(())
    }

    /// Count the routing telemetry of tokens alone (no outputs): `selected`
    /// (n × `k`, [`NO_EXPERT`] for an empty slot) and `probs` (n × E, or
    /// empty when there are none: the router entropy then stays 0).
    pub fn add_routing(&mut self, probs: &[f32], selected: &[u32], k: usize) {
        let e_n = self.n_experts;
        let n = selected.len() / k.max(1);
        for (t, row) in selected.chunks_exact(k.max(1)).enumerate() {
            if let Some(p) = probs.get(t * e_n..(t + 1) * e_n) {
                self.router_entropy_sum += entropy(p.iter().map(|&x| x as f64));
            }
            for &e in row.iter().filter(|&&e| e != NO_EXPERT) {
                self.load[e as usize] += 1;
            }
        }
        self.tokens += n;
    }

    /// Add all-pairs activation overlap: `outputs[e]` is expert e's output on
    /// every token (n × d), row-major; `token_pairs` the tokens' pair weights
    /// (for the three pair sets).
    pub fn add_all_pairs(
        &mut self,
        outputs: &[Vec<f32>],
        d: usize,
        token_pairs: &[pairs::PairWeights],
    ) {
        let e_n = outputs.len();
        if e_n < 2 {
            return;
        }
        let n = outputs[0].len() / d;
        let mut values = vec![0.0; pairs::n_pairs(e_n)];
        for t in 0..n {
            let row = |e: usize| &outputs[e][t * d..(t + 1) * d];
            for (v, (a, b)) in values.iter_mut().zip(pairs::all_pairs(e_n)) {
                *v = cos2(row(a), row(b));
            }
            self.act_all_sum += values.iter().sum::<f64>() / values.len() as f64;
            if let Some(w) = token_pairs.get(t) {
                self.act_sets.add(&values, w);
            }
        }
        self.act_all_tokens += n;
    }

    /// Activation MSO under the three pair sets (from [`Self::add_all_pairs`]).
    pub fn act_sets(&self) -> pairs::PairSets<pairs::SetMean> {
        self.act_sets.finish()
    }

    /// Activation MSO over routed pairs, or the reason it is undefined.
    pub fn act_mso(&self) -> std::result::Result<f64, String> {
        // Under soft routing the routed pairs are those of the top-k by gate.
        let k = self.reference_k.unwrap_or(self.k).min(self.k);
        if k < 2 {
            Err(format!("k = {k}: each token is routed to a single expert, so there are no routed pairs (see act_mso_all)"))
        } else if self.tokens == 0 {
            Err("no tokens were evaluated".into())
        } else if self.act_tokens == 0 {
            Err("no token was routed to two or more experts".into())
        } else {
            Ok(self.act_sum / self.act_tokens as f64)
        }
    }

    /// Activation MSO over all pairs, if all-pairs outputs were added.
    pub fn act_mso_all(&self) -> Option<f64> {
        (self.act_all_tokens > 0).then(|| self.act_all_sum / self.act_all_tokens as f64)
    }

    /// E×E mean cos² per co-routed pair (null diagonal, null where a pair never co-occurred).
    pub fn act_overlap(&self) -> Vec<Vec<Option<f64>>> {
        let e_n = self.n_experts;
        (0..e_n)
            .map(|i| {
                (0..e_n)
                    .map(|j| {
                        let (lo, hi) = (i.min(j), i.max(j));
                        let c = self.pair_count[lo * e_n + hi];
                        (i != j && c > 0).then(|| self.pair_sum[lo * e_n + hi] / c as f64)
                    })
                    .collect()
            })
            .collect()
    }

    /// Routing telemetry over the accumulated tokens.
    pub fn telemetry(&self) -> Telemetry {
        let total: u64 = self.load.iter().sum();
        let fraction: Vec<f64> = self
            .load
            .iter()
            .map(|&l| {
                if total > 0 {
                    l as f64 / total as f64
                } else {
                    0.0
                }
            })
            .collect();
        let load_entropy = entropy(fraction.iter().copied());
        Telemetry {
            load: self.load.clone(),
            fraction,
            router_entropy: if self.tokens > 0 {
                self.router_entropy_sum / self.tokens as f64
            } else {
                0.0
            },
            load_entropy,
            balance: load_entropy.exp() / self.n_experts as f64,
            dead_experts: self
                .load
                .iter()
                .enumerate()
                .filter(|(_, &l)| l == 0)
                .map(|(e, _)| e)
                .collect(),
            max_violation: max_violation(&self.load),
        }
    }
}

/// Max load violation: max load / mean load − 1 (0 when nothing was routed).
pub fn max_violation(load: &[u64]) -> f64 {
    let mean = load.iter().sum::<u64>() as f64 / load.len().max(1) as f64;
    let max = load.iter().copied().max().unwrap_or(0) as f64;
    if mean > 0.0 {
        max / mean - 1.0
    } else {
        0.0
    }
}

/// Routing telemetry of one layer (SPEC "Routing telemetry").
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Telemetry {
    /// Tokens whose selection contains each expert.
    pub load: Vec<u64>,
    /// load / Σ load.
    pub fraction: Vec<f64>,
    /// Mean over tokens of H(p(x)), nats.
    pub router_entropy: f64,
    /// H(fraction), nats.
    pub load_entropy: f64,
    /// exp(load_entropy) / E.
    pub balance: f64,
    /// Experts with no token.
    pub dead_experts: Vec<usize>,
    /// max load / mean load − 1.
    pub max_violation: f64,
}

/// Gap ratio activation MSO / weight MSO (None when either is missing or the weight MSO is 0).
pub fn gap_ratio(act: Option<f64>, weight: Option<f64>) -> Option<f64> {
    match (act, weight) {
        (Some(a), Some(w)) if w > 0.0 => Some(a / w),
        _ => None,
    }
}

/// Per-layer weight MSO of the model for `family` at granularity `g` (None
/// for layers lacking the family, or where `g` does not cut it into vectors).
pub fn model_weight_mso(model: &Gpt, family: Family, g: Granularity) -> Result<Vec<Option<f64>>> {
    model
        .moe_layers()
        .map(|(_, m)| weight_mso_at(m, family, g))
        .collect()
}

/// Weight MSO of one layer's `family` at granularity `g`.
pub fn weight_mso_at(moe: &MoeLayer, family: Family, g: Granularity) -> Result<Option<f64>> {
    let Some(ts) = family.tensors(moe)? else {
        return Ok(None);
    };
    let rows = ts[0].dims2()?.0;
    with_f32_slices(&ts, |v| orth::weight_mso(v, rows, g))
}

/// The chance level of `family`'s weight MSO at `g` in this model (1/L for
/// L-dimensional vectors), None where the family or granularity does not apply.
pub fn weight_chance(model: &Gpt, family: Family, g: Granularity) -> Result<Option<f64>> {
    let Some((_, moe)) = model.moe_layers().next() else {
        return Ok(None);
    };
    let Some(ts) = family.tensors(moe)? else {
        return Ok(None);
    };
    let (rows, cols) = ts[0].dims2()?;
    Ok((orth::slices(g, rows, cols).1 >= 2).then(|| orth::chance_level(g, rows, cols)))
}

/// Mean of the present values (None when none is present).
pub fn mean_present(v: &[Option<f64>]) -> Option<f64> {
    let xs: Vec<f64> = v.iter().flatten().copied().collect();
    (!xs.is_empty()).then(|| xs.iter().sum::<f64>() / xs.len() as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mso_of_orthonormal_is_zero_and_identical_is_one() {
        let ortho = vec![
            vec![1.0, 0.0, 0.0],
            vec![0.0, 2.0, 0.0],
            vec![0.0, 0.0, -3.0],
        ];
        assert!(mso(&cosine_gram(&ortho)).abs() < 1e-15);
        let same = vec![
            vec![1.0, 2.0, 3.0],
            vec![2.0, 4.0, 6.0],
            vec![-1.0, -2.0, -3.0],
        ];
        assert!((mso(&cosine_gram(&same)) - 1.0).abs() < 1e-12);
    }
}
