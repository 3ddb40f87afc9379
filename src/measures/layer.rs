//! One MoE layer's analysis: fed batch by batch with the layer's input and
//! what the layer routed, then finished into a [`LayerReport`]. The same code
//! serves our models (all layers per batch) and Hugging Face checkpoints
//! streamed one layer at a time.

use super::analyze::{GeometryOptions, LayerReport};
use super::jacobian::{layer_jacobian, JacobianInputs, JacobianMode, JacobianSettings};
use super::pairs::{NullStats, PairWeights};
use super::subspace::{
    layer_subspaces, Moments, PermutationNull, RankRule, SubspaceNull, SubspaceReport,
};
use super::{gap_ratio, weight_mso_at, weight_overlap, Family, LayerAccumulator};
use crate::config::{ActSpace, Granularity};
use crate::model::moe::{CapturedRouting, MoeLayer, NO_EXPERT};
use crate::Result;
use candle_core::{DType, Tensor};
use std::collections::BTreeMap;

/// Everything one MoE layer needs to be measured.
pub struct LayerAnalyzer {
    index: usize,
    n_experts: usize,
    /// Gates are renormalised over the selected experts (weighted PCA).
    renorm: bool,
    acc: LayerAccumulator,
    /// Activation overlap in the other spaces asked for (`geo.act_spaces`).
    space_accs: Vec<(ActSpace, LayerAccumulator)>,
    moments: Vec<Moments>,
    /// Per expert, the weight of each row added to its moments (1 unweighted):
    /// the permutation null draws the same number of rows with these weights.
    row_weights: Vec<Vec<f64>>,
    /// Per pair, the three sets' weights summed over tokens (subspace sets).
    totals: PairWeights,
    /// Inputs, selections and probabilities of the first `jacobian_tokens` tokens.
    jac_inputs: Vec<Tensor>,
    jac_sel: Vec<u32>,
    jac_probs: Vec<f32>,
    /// Slots per token in `jac_sel` (k, or the reference k under soft routing).
    slots: usize,
    jac_n: usize,
    /// The permutation null's pool: the first `null_tokens` tokens' inputs
    /// and every expert's outputs on them (n × d each, f32).
    pool_inputs: Vec<f32>,
    pool_outputs: Vec<Vec<f32>>,
    d: usize,
}

impl LayerAnalyzer {
    /// An analyzer for block `index` with `n_experts` experts, k active per
    /// token, model width `d`.
    pub fn new(
        index: usize,
        n_experts: usize,
        k: usize,
        d: usize,
        renorm: bool,
        geo: &GeometryOptions,
    ) -> Self {
        let mut acc = LayerAccumulator::new(n_experts, k);
        if let Some(rk) = geo.reference_k {
            acc = acc.with_reference_k(rk);
        }
        let space_accs = geo
            .act_spaces
            .iter()
            .filter(|&&s| s != ActSpace::Output)
            .map(|&s| (s, acc.clone()))
            .collect();
        LayerAnalyzer {
            index,
            n_experts,
            renorm,
            acc,
            space_accs,
            moments: (0..n_experts).map(|_| Moments::new(d)).collect(),
            row_weights: vec![Vec::new(); n_experts],
            totals: PairWeights::zeros(n_experts),
            jac_inputs: Vec::new(),
            jac_sel: Vec::new(),
            jac_probs: Vec::new(),
            slots: k,
            jac_n: 0,
            pool_inputs: Vec::new(),
            pool_outputs: vec![Vec::new(); n_experts],
            d,
        }
    }

    /// Tokens observed so far.
    pub fn tokens(&self) -> usize {
        self.acc.tokens
    }

    /// Add one batch: `input` (n, d) is the MoE input, `cap` what `moe` did with it.
    pub fn observe(
        &mut self,
        moe: &MoeLayer,
        input: &Tensor,
        cap: &CapturedRouting,
        geo: &GeometryOptions,
    ) -> Result<()> {
        // One routed selection for every pair set of this batch.
        let (sel, k) = self.acc.routed_selection(cap);
        self.acc.add_routed(cap, &sel, k)?;
        if !self.space_accs.is_empty() {
            // Our models capture the hidden rows in the forward pass; a
            // Hugging Face layer's capture lacks them, so compute them here.
            let computed;
            let with_hidden = if cap.expert_hidden.len() == cap.expert_outputs.len() {
                cap
            } else {
                computed = moe.with_hidden(input, cap)?;
                &computed
            };
            for (space, acc) in &mut self.space_accs {
                if let Some(rows) = with_hidden.in_space(*space)? {
                    acc.add_routed(&rows, &sel, k)?;
                }
            }
        }
        let (batch_n, d) = input.dims2()?;
        let e_n = self.n_experts;
        let token_pairs: Vec<PairWeights> = (0..batch_n)
            .map(|t| PairWeights::new(&sel[t * k..(t + 1) * k], &cap.probs[t * e_n..(t + 1) * e_n]))
            .collect();
        token_pairs.iter().for_each(|w| self.totals.add(w));
        self.slots = k;
        let take = geo.jacobian_tokens.saturating_sub(self.jac_n).min(batch_n);
        if geo.jacobian != JacobianMode::Off && take > 0 {
            self.jac_inputs.push(input.narrow(0, 0, take)?);
            self.jac_sel.extend_from_slice(&sel[..take * k]);
            self.jac_probs.extend_from_slice(&cap.probs[..take * e_n]);
        }
        self.jac_n += take;
        if geo.subspace != RankRule::Off {
            self.add_moments(input, cap, geo)?;
        }
        // All pairs: every expert on every token of this layer's input.
        let outs = moe.every_expert_output(input)?;
        self.acc.add_all_pairs(&outs, d, &token_pairs);
        if geo.subspace != RankRule::Off && geo.null_draws > 0 {
            self.add_to_pool(input, &outs, geo)?;
        }
        Ok(())
    }

    /// Add each expert's routed rows (inputs, or outputs with `output_space`)
    /// to its moments, weighted by the gate with `weighted`.
    fn add_moments(
        &mut self,
        input: &Tensor,
        cap: &CapturedRouting,
        geo: &GeometryOptions,
    ) -> Result<()> {
        for (e, (toks, h)) in cap.expert_outputs.iter().enumerate() {
            if toks.is_empty() {
                continue;
            }
            let rows = if geo.output_space {
                match h {
                    Some(h) => h.clone(),
                    None => continue,
                }
            } else {
                input.index_select(&Tensor::new(toks.as_slice(), input.device())?, 0)?
            };
            let w: Option<Vec<f64>> = geo.weighted.then(|| {
                toks.iter()
                    .map(|&t| gate_of(cap, self.n_experts, t as usize, e, self.renorm))
                    .collect()
            });
            self.moments[e].add(&rows, w.as_deref())?;
            match &w {
                Some(w) => self.row_weights[e].extend_from_slice(w),
                None => self.row_weights[e].extend(std::iter::repeat_n(1.0, toks.len())),
            }
        }
        Ok(())
    }

    /// Keep the batch's inputs and expert outputs while the pool has room.
    fn add_to_pool(
        &mut self,
        input: &Tensor,
        outs: &[Vec<f32>],
        geo: &GeometryOptions,
    ) -> Result<()> {
        let d = self.d;
        let have = self.pool_inputs.len() / d;
        let n = input.dim(0)?;
        let take = geo.null_tokens.saturating_sub(have).min(n);
        if take == 0 {
            return Ok(());
        }
        let x = input
            .narrow(0, 0, take)?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        self.pool_inputs.extend_from_slice(&x);
        if geo.output_space {
            for (pool, out) in self.pool_outputs.iter_mut().zip(outs) {
                pool.extend_from_slice(&out[..take * d]);
            }
        }
        Ok(())
    }

    /// The layer's measures (weights from `moe`, the rest from what was observed).
    pub fn finish(
        self,
        moe: &MoeLayer,
        families: &[Family],
        geo: &GeometryOptions,
    ) -> Result<LayerReport> {
        let mut wm = BTreeMap::new();
        let mut wo = BTreeMap::new();
        for &f in families {
            if let Some(w) = weight_overlap(moe, f)? {
                wm.insert(f.name(), w.mso);
                wo.insert(f.name(), w.matrix);
            }
        }
        let up = match wm.get(Family::Up.name()) {
            Some(&v) => Some(v),
            None => weight_overlap(moe, Family::Up)?.map(|w| w.mso),
        };
        let jacobian = self.jacobian(moe, geo)?;
        let subspace = self.subspace(geo)?;
        let (act, reason) = match self.acc.act_mso() {
            Ok(v) => (Some(v), None),
            Err(r) => (None, Some(r)),
        };
        let act_mso_spaces = self
            .space_accs
            .iter()
            .map(|(s, a)| (format!("act_mso{}", s.suffix()), a.act_mso().ok()))
            .collect();
        let (weight_mso_granular, weight_mso_chance) = granular_weights(moe, families, geo)?;
        Ok(LayerReport {
            index: self.index,
            weight_mso: wm,
            weight_overlap: wo,
            weight_mso_up: up,
            act_mso: act,
            act_mso_null_reason: reason,
            act_mso_all: self.acc.act_mso_all(),
            act_mso_sets: self.acc.act_sets(),
            act_overlap: self.acc.act_overlap(),
            gap_ratio: gap_ratio(act, up),
            act_mso_spaces,
            weight_mso_granular,
            weight_mso_chance,
            telemetry: self.acc.telemetry(),
            jacobian,
            subspace,
            shared_expert: None,
        })
    }

    fn jacobian(
        &self,
        moe: &MoeLayer,
        geo: &GeometryOptions,
    ) -> Result<Option<super::jacobian::JacobianReport>> {
        if geo.jacobian == JacobianMode::Off || self.jac_inputs.is_empty() {
            return Ok(None);
        }
        let x = Tensor::cat(&self.jac_inputs, 0)?;
        let input = JacobianInputs {
            x: &x,
            selected: &self.jac_sel,
            k: self.slots,
            probs: &self.jac_probs,
        };
        let settings = JacobianSettings {
            mode: geo.jacobian,
            precision: geo.jacobian_precision,
            all_pairs: geo.jacobian_all_pairs,
            spectra_tokens: geo.spectra_tokens,
            top_sv: geo.top_singular_values,
            seed: geo.seed + self.index as u64,
            null_draws: geo.null_draws,
            null_init_tokens: if geo.null_draws > 0 {
                geo.null_init_tokens
            } else {
                0
            },
        };
        layer_jacobian(moe, &input, &settings)
    }

    fn subspace(&self, geo: &GeometryOptions) -> Result<Option<SubspaceReport>> {
        let space = if geo.output_space { "output" } else { "input" };
        let Some(mut r) = layer_subspaces(&self.moments, geo.subspace, space, geo.weighted) else {
            return Ok(None);
        };
        r.sets = self.totals.mean_of(&r.overlap);
        if geo.reference_k.is_some() && !geo.output_space && !geo.weighted {
            r.degenerate = Some(
                "soft routing sends every token to every expert: unweighted input-space PCA gives every expert the same covariance (overlap 1 by construction); use --weighted or --space output".into(),
            );
        }
        r.null = self.permutation_null(&r, geo)?;
        Ok(Some(r))
    }

    /// The permutation null of the layer's mean subspace overlap, from the pool.
    fn permutation_null(
        &self,
        observed: &SubspaceReport,
        geo: &GeometryOptions,
    ) -> Result<Option<SubspaceNull>> {
        let Some(obs) = observed.mean_overlap else {
            return Ok(None);
        };
        let pools: Vec<&[f32]> = (0..self.n_experts)
            .map(|e| {
                if geo.output_space {
                    self.pool_outputs[e].as_slice()
                } else {
                    self.pool_inputs.as_slice()
                }
            })
            .collect();
        let null = PermutationNull {
            d: self.d,
            rule: geo.subspace,
            weighted: geo.weighted,
            draws: geo.null_draws,
            seed: geo.seed ^ (0x5eed_0100 + self.index as u64),
        };
        let draws = null.draw(&pools, &self.row_weights)?;
        Ok(NullStats::new(obs, &draws).map(SubspaceNull::from))
    }
}

/// Weight MSO per family at `geo.granularities` (besides flat), keyed
/// `weight_mso_rows` / `weight_mso_cols`, and the chance level of every
/// granularity reported (`up`, `up_rows`, ...).
#[allow(clippy::type_complexity)]
fn granular_weights(
    moe: &MoeLayer,
    families: &[Family],
    geo: &GeometryOptions,
) -> Result<(
    BTreeMap<String, BTreeMap<&'static str, f64>>,
    BTreeMap<String, f64>,
)> {
    let mut grans = vec![Granularity::Flat];
    grans.extend(
        geo.granularities
            .iter()
            .filter(|&&g| g != Granularity::Flat),
    );
    let (mut values, mut chance) = (BTreeMap::new(), BTreeMap::new());
    for g in grans {
        let mut per_family = BTreeMap::new();
        for &f in families {
            let Some(ts) = f.tensors(moe)? else { continue };
            let (rows, cols) = ts[0].dims2()?;
            if let Some(v) = weight_mso_at(moe, f, g)? {
                per_family.insert(f.name(), v);
                chance.insert(
                    format!("{}{}", f.name(), g.suffix()),
                    super::orth::chance_level(g, rows, cols),
                );
            }
        }
        if g != Granularity::Flat {
            values.insert(format!("weight_mso{}", g.suffix()), per_family);
        }
    }
    Ok((values, chance))
}

/// g_e(x) of token `t` for expert `e`, renormalised over the token's selected
/// experts when the model renormalises its top-k gates.
fn gate_of(cap: &CapturedRouting, e_n: usize, t: usize, e: usize, renorm: bool) -> f64 {
    let p = &cap.probs[t * e_n..(t + 1) * e_n];
    let denom: f64 = if renorm {
        cap.selected[t * cap.k..(t + 1) * cap.k]
            .iter()
            .filter(|&&s| s != NO_EXPERT)
            .map(|&s| p[s as usize] as f64)
            .sum()
    } else {
        1.0
    };
    p[e] as f64 / denom
}
