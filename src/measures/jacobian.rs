//! Function space (docs/MEASURES.md "Function space: Jacobian alignment"): cross-expert Jacobian
//! alignment A_ij(x) = ⟨J_i, J_j⟩_F / (‖J_i‖_F ‖J_j‖_F), Jacobian spectra and
//! effective rank.
//!
//! Every expert's Jacobian is a sum of terms `W_down · diag(c_t(x)) · M_t`:
//! - MLP: one term, c = φ'(W_up x + b_up), M = W_up;
//! - SwiGLU (f = W_down (silu(W_gate x) ⊙ W_up x)): two terms,
//!   c_1 = silu'(W_gate x) ⊙ (W_up x) with M_1 = W_gate, and c_2 = silu(W_gate x) with M_2 = W_up.
//!
//! Hence ⟨J_i, J_j⟩_F = Σ_{t,t'} c_{i,t}ᵀ K_{ij,tt'} c_{j,t'} with
//! K_{ij,tt'} = (W_down,iᵀ W_down,j) ⊙ (M_{i,t} M_{j,t'}ᵀ), an f×f matrix computed once per
//! pair and layer: **exact mode** never forms a d×d Jacobian.
//! **Estimate mode** (Hutchinson): ⟨J_i, J_j⟩ ≈ (1/m) Σ_t (J_i v_t)·(J_j v_t), v_t ~ N(0, I),
//! with J v = W_down (Σ_t c_t ⊙ (M_t v)); the standard error of A comes from
//! 8 batch means.
//!
//! Two arithmetics give the same numbers (tested to 1e-5): `f32` (the
//! default, [`fast`]: f32 products, f64 reductions, the probes' images
//! shared across tokens and pairs, K built in row blocks) and `f64` (the
//! reference below, on candle tensors).
//!
//! Cost of the f32 path (E experts, d model width, f = d_ff, T terms, N
//! (token, pair) instances over `tokens` tokens, P pairs that occur, m probes,
//! X (token, expert) Jacobians needed: k per token for routed pairs, E for all):
//! - exact: K: (P + E) · (2 + 2T²) · f²·d flops, K_ROWS·f floats at a time;
//!   per instance 2T²f² (norms: X of them);
//! - estimate: per (token, expert) (2T + 2m)·f·d flops, plus E·2T·m·f·d for
//!   the probes' images, and 2·m·d per instance and norm;
//! - `auto` picks whichever costs fewer flops.

mod fast;

pub use crate::config::{JacobianMode, Precision};

use super::pairs::{self, NullStats, PairSets, PairWeights, SetMean};
use crate::config::Activation;
use crate::model::moe::{Expert, MoeLayer};
use crate::Result;
use candle_core::{DType, Device, Tensor, D};
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};
use serde::Serialize;

/// (coefficients c_t (n×f), matrices M_t (f×d)) of an expert's Jacobian terms at inputs x (n×d).
pub fn jacobian_terms(e: &Expert, x: &Tensor) -> Result<Vec<(Tensor, Tensor)>> {
    let sig = |z: &Tensor| -> Result<Tensor> { Ok((z.neg()?.exp()? + 1.0)?.recip()?) };
    let silu_grad = |z: &Tensor| -> Result<Tensor> {
        // σ(z) (1 + z (1 − σ(z)))
        let s = sig(z)?;
        Ok((&s * ((z * (s.neg()? + 1.0)?)? + 1.0)?)?)
    };
    let u = e.up.forward(x)?; // W_up x + b
    match &e.gate {
        Some(g) => {
            let gz = g.forward(x)?;
            let c1 = (silu_grad(&gz)? * &u)?;
            let c2 = gz.silu()?;
            Ok(vec![(c1, g.weight.clone()), (c2, e.up.weight.clone())])
        }
        None => {
            let c = match e.activation {
                Activation::Silu => silu_grad(&u)?,
                Activation::Gelu => {
                    // d/dz GELU_tanh(z) = 0.5(1 + tanh(a)) + 0.5 z (1 − tanh²(a)) · k (1 + 3·0.044715 z²),
                    // a = k (z + 0.044715 z³), k = √(2/π)
                    let k = (2.0 / std::f64::consts::PI).sqrt();
                    let z3 = u.powf(3.0)?;
                    let th = ((&u + (z3 * 0.044715)?)? * k)?.tanh()?;
                    let left = ((&th + 1.0)? * 0.5)?;
                    let sech2 = (th.sqr()?.neg()? + 1.0)?;
                    let inner = ((u.sqr()? * (3.0 * 0.044715))? + 1.0)?;
                    (left + (((&u * 0.5)? * sech2)? * inner)?.affine(k, 0.0)?)?
                }
            };
            Ok(vec![(c, e.up.weight.clone())])
        }
    }
}

/// The explicit Jacobian of expert `e` at one input x (1×d): d×d. For tests and spectra.
pub fn explicit_jacobian(e: &Expert, x: &Tensor) -> Result<Tensor> {
    let terms = jacobian_terms(e, x)?;
    let mut j: Option<Tensor> = None;
    for (c, m) in &terms {
        // W_down diag(c) M: (d×f) scaled by columns, times (f×d)
        let t = e
            .down
            .weight
            .broadcast_mul(&c.reshape((1, c.elem_count()))?)?
            .matmul(m)?;
        j = Some(match j {
            Some(a) => (a + t)?,
            None => t,
        });
    }
    Ok(j.expect("at least one term"))
}

/// Per-layer function-space summary.
#[derive(Debug, Clone, Serialize)]
pub struct JacobianReport {
    /// `exact` or `estimate`.
    pub mode: String,
    /// Probe vectors (estimate mode).
    pub samples: Option<usize>,
    /// `routed` or `all`.
    pub pairs: String,
    /// (token, pair) instances pooled.
    pub instances: usize,
    pub mean: Option<f64>,
    pub mean_abs: Option<f64>,
    pub mean_sq: Option<f64>,
    /// Mean standard error of A over instances (estimate mode).
    pub stderr: Option<f64>,
    /// E×E mean A per pair (diagonal and never-occurring pairs null).
    pub matrix: Vec<Vec<Option<f64>>>,
    /// A under the three pair sets (docs/MEASURES.md, "Pair sets"); `all`
    /// and `gate_weighted` need `pairs = all`.
    pub sets: PairSets<SetMean>,
    /// Chance levels: shuffled routing and independently initialised experts.
    pub null: JacobianNull,
    /// Per expert: top singular values of J_e(x), averaged over its routed tokens (spectra sample).
    pub spectra: Vec<Option<Vec<f64>>>,
    /// Per expert: mean over tokens of exp(H(σ²/Σσ²)).
    pub effective_rank: Vec<Option<f64>>,
}

/// Which (token, i, j) instances to measure.
pub struct Instances {
    /// For each pair (i<j): the token rows where it occurs.
    pub by_pair: Vec<((usize, usize), Vec<u32>)>,
}

impl Instances {
    /// Routed pairs from each token's selection (n × k), or all pairs on all tokens.
    pub fn new(selected: &[u32], k: usize, n: usize, e: usize, all: bool) -> Self {
        let mut by_pair: Vec<((usize, usize), Vec<u32>)> =
            pairs::all_pairs(e).map(|p| (p, Vec::new())).collect();
        for t in 0..n {
            if all {
                by_pair.iter_mut().for_each(|p| p.1.push(t as u32));
            } else {
                for (i, j) in pairs::selected_pairs(&selected[t * k..(t + 1) * k]) {
                    by_pair[pairs::pair_index(e, i, j)].1.push(t as u32);
                }
            }
        }
        Instances { by_pair }
    }

    pub fn count(&self) -> usize {
        self.by_pair.iter().map(|p| p.1.len()).sum()
    }

    /// needed[t·E + e]: some instance on token t involves expert e, so J_e(x_t) is needed.
    fn needed(&self, n: usize, e_n: usize) -> Vec<bool> {
        let mut need = vec![false; n * e_n];
        for ((i, j), toks) in &self.by_pair {
            for &t in toks {
                need[t as usize * e_n + i] = true;
                need[t as usize * e_n + j] = true;
            }
        }
        need
    }

    /// The tokens (ascending, once each) on which expert e takes part in an instance.
    fn tokens_of(&self, e: usize) -> Vec<u32> {
        let mut toks: Vec<u32> = self
            .by_pair
            .iter()
            .filter(|((i, j), _)| *i == e || *j == e)
            .flat_map(|(_, t)| t.iter().copied())
            .collect();
        toks.sort_unstable();
        toks.dedup();
        toks
    }
}

fn rows(t: &Tensor, idx: &Tensor) -> Result<Tensor> {
    Ok(t.index_select(idx, 0)?)
}

/// Σ_{t,t'} c_{i,t}ᵀ K_{ij,tt'} c_{j,t'} for each row: exact inner products (n,).
fn exact_inner(
    ei: &Expert,
    ej: &Expert,
    ci: &[(Tensor, Tensor)],
    cj: &[(Tensor, Tensor)],
) -> Result<Tensor> {
    let dd = ei.down.weight.t()?.matmul(&ej.down.weight)?; // (f×f) W_down,iᵀ W_down,j
    let mut total: Option<Tensor> = None;
    for (a, ma) in ci {
        for (b, mb) in cj {
            let k = (&dd * ma.matmul(&mb.t()?)?)?; // (f×f)
            let v = (a.matmul(&k)? * b)?.sum(D::Minus1)?;
            total = Some(match total {
                Some(t) => (t + v)?,
                None => v,
            });
        }
    }
    Ok(total.expect("terms"))
}

/// J v for each row of coefficients and each probe: (n, m, d) flattened as (n·m, d).
fn jv(e: &Expert, c: &[(Tensor, Tensor)], probes: &Tensor) -> Result<Tensor> {
    let n = c[0].0.dim(0)?;
    let m = probes.dim(0)?;
    let f = c[0].0.dim(1)?;
    let mut h: Option<Tensor> = None;
    for (coef, mat) in c {
        let mv = probes.matmul(&mat.t()?)?; // (m, f)
        let prod = coef.unsqueeze(1)?.broadcast_mul(&mv.unsqueeze(0)?)?; // (n, m, f)
        h = Some(match h {
            Some(a) => (a + prod)?,
            None => prod,
        });
    }
    Ok(h.expect("terms")
        .reshape((n * m, f))?
        .matmul(&e.down.weight.t()?)?) // (n·m, d)
}

/// What one layer's Jacobian alignment works on, for the cost model of the
/// module docs.
#[derive(Debug, Clone, Copy)]
pub struct Workload {
    pub d: usize,
    pub f: usize,
    pub experts: usize,
    /// Jacobian terms per expert (1 MLP, 2 SwiGLU).
    pub terms: usize,
    /// (token, pair) instances.
    pub instances: usize,
    /// Pairs with at least one instance.
    pub pairs: usize,
    /// (token, expert) Jacobians the instances need.
    pub jacobians: usize,
}

impl Workload {
    /// The workload `tokens` tokens will give, before routing is known:
    /// k experts per token (routed pairs) or all E.
    pub fn planned(
        d: usize,
        f: usize,
        e: usize,
        t: usize,
        tokens: usize,
        k: usize,
        all: bool,
    ) -> Self {
        let per_token = if all {
            e * (e - 1) / 2
        } else {
            k * (k - 1) / 2
        };
        let instances = tokens * per_token;
        Workload {
            d,
            f,
            experts: e,
            terms: t,
            instances,
            pairs: instances.min(e * (e - 1) / 2),
            jacobians: tokens * if all { e } else { k },
        }
    }

    /// The workload of these instances.
    fn of(inst: &Instances, n: usize, d: usize, f: usize, e: usize, t: usize) -> Self {
        let need = inst.needed(n, e);
        Workload {
            d,
            f,
            experts: e,
            terms: t,
            instances: inst.count(),
            pairs: inst.by_pair.iter().filter(|p| !p.1.is_empty()).count(),
            jacobians: need.iter().filter(|b| **b).count(),
        }
    }

    pub fn exact_flops(&self) -> f64 {
        let (d, f, t) = (self.d as f64, self.f as f64, self.terms as f64);
        let k_build = (self.pairs + self.experts) as f64 * (2.0 + 2.0 * t * t) * f * f * d;
        let per_instance = (self.instances + self.jacobians) as f64 * 2.0 * t * t * f * f;
        k_build + per_instance
    }

    pub fn estimate_flops(&self, m: usize) -> f64 {
        let (d, f, t, m) = (self.d as f64, self.f as f64, self.terms as f64, m as f64);
        let per_jacobian = self.jacobians as f64 * (2.0 * t + 2.0 * m) * f * d;
        let images = self.experts as f64 * 2.0 * t * m * f * d;
        let dots = (self.instances + self.jacobians) as f64 * 2.0 * m * d;
        per_jacobian + images + dots
    }

    /// Whether `auto` takes exact mode: it costs fewer flops.
    pub fn picks_exact(&self) -> bool {
        self.exact_flops() <= self.estimate_flops(DEFAULT_PROBES)
    }
}

const DEFAULT_PROBES: usize = JacobianMode::DEFAULT_PROBES;

/// The mode `mode` resolves to for one layer of this shape (`exact` or
/// `estimate`), and its cost in flops (the cost model of the module docs),
/// for `tokens` tokens with k experts each (routed pairs, or all E(E−1)/2).
#[allow(clippy::too_many_arguments)]
pub fn plan(
    mode: JacobianMode,
    d: usize,
    f: usize,
    e: usize,
    t: usize,
    tokens: usize,
    k: usize,
    all_pairs: bool,
) -> Option<(&'static str, f64)> {
    let w = Workload::planned(d, f, e, t, tokens, k, all_pairs);
    match mode {
        JacobianMode::Off => None,
        JacobianMode::Exact => Some(("exact", w.exact_flops())),
        JacobianMode::Estimate(m) => Some(("estimate", w.estimate_flops(m))),
        JacobianMode::Auto if w.picks_exact() => Some(("exact", w.exact_flops())),
        JacobianMode::Auto => Some(("estimate", w.estimate_flops(DEFAULT_PROBES))),
    }
}

/// Tokens per Hutchinson batch (bounds the estimate's memory).
const ESTIMATE_CHUNK: usize = 64;

/// Alignment of one set of (token, pair) instances.
struct AlignTable {
    /// A per token and pair (n × E(E−1)/2, [`pairs::pair_index`] order); NaN
    /// where the instance was not measured.
    values: Vec<f64>,
    /// Mean standard error of A over instances (estimate mode).
    stderr: Option<f64>,
    exact: bool,
    samples: usize,
}

/// How one table is computed.
#[derive(Clone, Copy)]
struct TableSpec {
    mode: JacobianMode,
    precision: Precision,
    /// Independently initialised experts of the same shapes (the random-init
    /// null), from this seed.
    random_init: Option<u64>,
    seed: u64,
}

/// A_ij(x) for every instance of `inst`, exactly or by Hutchinson probes.
fn align_table(
    src: &[Expert],
    x: &Tensor,
    inst: &Instances,
    spec: TableSpec,
) -> Result<AlignTable> {
    let (n, d) = x.dims2()?;
    let e_n = src.len();
    let f = src[0].up.weight.dim(0)?;
    let t = if src[0].gate.is_some() { 2 } else { 1 };
    let exact = match spec.mode {
        JacobianMode::Exact => true,
        JacobianMode::Estimate(_) => false,
        _ => Workload::of(inst, n, d, f, e_n, t).picks_exact(),
    };
    let m = match spec.mode {
        JacobianMode::Estimate(m) => m,
        _ => DEFAULT_PROBES,
    };
    let probes = (!exact).then(|| probes(m, d, spec.seed));
    if spec.precision == Precision::F32 {
        return align_table_f32(src, x, inst, spec, probes.as_deref(), m);
    }
    align_table_f64(src, x, inst, spec.random_init, probes, m)
}

/// m probe vectors v ~ N(0, I_d), row-major, from `seed`.
fn probes(m: usize, d: usize, seed: u64) -> Vec<f64> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    (0..m * d)
        .map(|_| StandardNormal.sample(&mut rng))
        .collect()
}

/// [`align_table`] on the f32 path ([`fast`]), the experts read in place.
fn align_table_f32(
    src: &[Expert],
    x: &Tensor,
    inst: &Instances,
    spec: TableSpec,
    probes: Option<&[f64]>,
    m: usize,
) -> Result<AlignTable> {
    let (n, d) = x.dims2()?;
    let f = src[0].up.weight.dim(0)?;
    let xs: Vec<f32> = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let (tensors, layout) = expert_tensors(src);
    super::with_f32_slices(&tensors, |slices| {
        let mats = layout.mats(slices);
        let source = match spec.random_init {
            Some(seed) => fast::Source::Random { like: mats, seed },
            None => fast::Source::Model(mats),
        };
        let dims = fast::Dims { n, d, f };
        let source_len = src.len();
        match probes {
            None => AlignTable {
                values: fast::exact_table(&source, &xs, dims, inst),
                stderr: None,
                exact: true,
                samples: m,
            },
            Some(v) => {
                let v: Vec<f32> = v.iter().map(|&a| a as f32).collect();
                let chunk = fast::chunk_tokens(source_len, m, d);
                let (values, se_sum, count) =
                    fast::estimate_table(&source, &xs, dims, inst, (&v, m), chunk);
                AlignTable {
                    values,
                    stderr: (count > 0).then(|| se_sum / count as f64),
                    exact: false,
                    samples: m,
                }
            }
        }
    })
}

/// The experts' weight tensors in one list, and where each expert's are.
fn expert_tensors(src: &[Expert]) -> (Vec<Tensor>, ExpertLayouts) {
    let mut tensors = Vec::new();
    let mut layouts = Vec::new();
    for e in src {
        let mut push = |t: Option<&Tensor>| {
            t.map(|t| {
                tensors.push(t.clone());
                tensors.len() - 1
            })
        };
        layouts.push(ExpertSlots {
            up: push(Some(&e.up.weight)).expect("some"),
            b_up: push(e.up.bias.as_ref()),
            gate: push(e.gate.as_ref().map(|g| &g.weight)),
            b_gate: push(e.gate.as_ref().and_then(|g| g.bias.as_ref())),
            down: push(Some(&e.down.weight)).expect("some"),
            act: e.activation,
        });
    }
    (tensors, ExpertLayouts(layouts))
}

/// Indices of one expert's tensors in [`expert_tensors`]' list.
struct ExpertSlots {
    up: usize,
    b_up: Option<usize>,
    gate: Option<usize>,
    b_gate: Option<usize>,
    down: usize,
    act: crate::config::Activation,
}

struct ExpertLayouts(Vec<ExpertSlots>);

impl ExpertLayouts {
    fn mats<'a>(&self, s: &[&'a [f32]]) -> Vec<fast::ExpertMats<'a>> {
        self.0
            .iter()
            .map(|l| fast::ExpertMats {
                up: s[l.up],
                b_up: l.b_up.map(|i| s[i]),
                gate: l.gate.map(|i| s[i]),
                b_gate: l.b_gate.map(|i| s[i]),
                down: s[l.down],
                act: l.act,
            })
            .collect()
    }
}

/// [`align_table`] on the f64 reference path (candle tensors).
fn align_table_f64(
    src: &[Expert],
    x: &Tensor,
    inst: &Instances,
    random_init: Option<u64>,
    probes: Option<Vec<f64>>,
    m: usize,
) -> Result<AlignTable> {
    let (n, d) = x.dims2()?;
    let x = &x.to_dtype(DType::F64)?;
    let e_n = src.len();
    let exact = probes.is_none();
    // f64 copies of the experts (exactness of the measure does not depend on
    // the model dtype), at most two at a time: pairs come in (i, j) order, so
    // expert i stays while j changes, and a Mixtral-sized layer needs 2.8 GB
    // of f64 weights instead of 11 GB.
    let mut experts = match random_init {
        Some(seed) => F64Experts::random_like(src, seed),
        None => F64Experts::new(src),
    };
    let np = pairs::n_pairs(e_n);
    let mut values = vec![f64::NAN; n * np];
    let (mut se_sum, mut count) = (0.0, 0usize);
    let probes = probes
        .map(|v| Tensor::from_vec(v, (m, d), &Device::Cpu))
        .transpose()?;
    let norms = if exact {
        exact_norms(&mut experts, x, inst)?
    } else {
        Vec::new()
    };
    for ((i, j), toks) in &inst.by_pair {
        if toks.is_empty() {
            continue;
        }
        let xs = rows(x, &Tensor::new(toks.as_slice(), &Device::Cpu)?)?;
        let (ei, ej) = experts.pair(*i, *j)?;
        let ci = jacobian_terms(ei, &xs)?;
        let cj = jacobian_terms(ej, &xs)?;
        let a: Vec<f64> = if exact {
            let ij = exact_inner(ei, ej, &ci, &cj)?.to_vec1::<f64>()?;
            ij.iter()
                .zip(toks)
                .map(|(p, t)| align(*p, norms[*i][t], norms[*j][t]))
                .collect()
        } else {
            // In chunks of tokens: J·v for all probes of a chunk is
            // (chunk·m × f), 0.5 GB per chunk at Mixtral's f = 14336.
            let v = probes.as_ref().expect("probes");
            let mut av = Vec::with_capacity(toks.len());
            for start in (0..toks.len()).step_by(ESTIMATE_CHUNK) {
                let len = ESTIMATE_CHUNK.min(toks.len() - start);
                let part = |c: &[(Tensor, Tensor)]| -> Result<Vec<(Tensor, Tensor)>> {
                    c.iter()
                        .map(|(coef, mat)| Ok((coef.narrow(0, start, len)?, mat.clone())))
                        .collect()
                };
                let (a, se) = estimate_pair(ei, ej, &part(&ci)?, &part(&cj)?, v, len, m, d)?;
                se_sum += se.iter().sum::<f64>();
                av.extend(a);
            }
            av
        };
        let p = pairs::pair_index(e_n, *i, *j);
        for (&tok, v) in toks.iter().zip(&a) {
            values[tok as usize * np + p] = *v;
        }
        count += a.len();
    }
    Ok(AlignTable {
        values,
        stderr: (!exact && count > 0).then(|| se_sum / count as f64),
        exact,
        samples: m,
    })
}

/// Exact mode: ‖J_e(x)‖² once per expert for all the tokens it takes part in (K_ee once).
fn exact_norms(
    experts: &mut F64Experts,
    x: &Tensor,
    inst: &Instances,
) -> Result<Vec<std::collections::HashMap<u32, f64>>> {
    let e_n = experts.len();
    let mut norms: Vec<std::collections::HashMap<u32, f64>> = vec![Default::default(); e_n];
    for (ei, norm) in norms.iter_mut().enumerate() {
        let toks = inst.tokens_of(ei);
        if toks.is_empty() {
            continue;
        }
        let xs = rows(x, &Tensor::new(toks.as_slice(), &Device::Cpu)?)?;
        let ex = experts.get(ei)?;
        let c = jacobian_terms(ex, &xs)?;
        let v = exact_inner(ex, ex, &c, &c)?.to_vec1::<f64>()?;
        *norm = toks.into_iter().zip(v).collect();
    }
    Ok(norms)
}

/// Hutchinson estimate of A for one pair on `nt` tokens, with the standard
/// error of each from 8 batch means of the probes.
#[allow(clippy::too_many_arguments)]
fn estimate_pair(
    ei: &Expert,
    ej: &Expert,
    ci: &[(Tensor, Tensor)],
    cj: &[(Tensor, Tensor)],
    v: &Tensor,
    nt: usize,
    m: usize,
    d: usize,
) -> Result<(Vec<f64>, Vec<f64>)> {
    let yi = jv(ei, ci, v)?.reshape((nt, m, d))?;
    let yj = jv(ej, cj, v)?.reshape((nt, m, d))?;
    let pij: Vec<Vec<f64>> = (&yi * &yj)?.sum(D::Minus1)?.to_vec2()?; // (n, m)
    let pii: Vec<Vec<f64>> = yi.sqr()?.sum(D::Minus1)?.to_vec2()?;
    let pjj: Vec<Vec<f64>> = yj.sqr()?.sum(D::Minus1)?.to_vec2()?;
    let (mut av, mut sev) = (Vec::with_capacity(nt), Vec::with_capacity(nt));
    for r in 0..nt {
        let (a, se) = align_from_probes(&pij[r], &pii[r], &pjj[r]);
        av.push(a);
        sev.push(se);
    }
    Ok((av, sev))
}

/// A from the per-probe products ⟨J_i v, J_j v⟩, ‖J_i v‖², ‖J_j v‖², and its
/// standard error from 8 batch means of the probes.
fn align_from_probes(pij: &[f64], pii: &[f64], pjj: &[f64]) -> (f64, f64) {
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let a = align(mean(pij), mean(pii), mean(pjj));
    let b = 8;
    let per = pij.len() / b;
    let est: Vec<f64> = (0..b)
        .map(|q| {
            let s = q * per..(q + 1) * per;
            align(mean(&pij[s.clone()]), mean(&pii[s.clone()]), mean(&pjj[s]))
        })
        .collect();
    let mu = mean(&est);
    let sd = (est.iter().map(|x| (x - mu).powi(2)).sum::<f64>() / (b - 1) as f64).sqrt();
    (a, sd / (b as f64).sqrt())
}

/// What a layer's Jacobian measures are taken over: the tokens' inputs, their
/// selections (n × k; for soft routing the top-k by gate) and router
/// probabilities over all experts (n × E).
pub struct JacobianInputs<'a> {
    pub x: &'a Tensor,
    pub selected: &'a [u32],
    pub k: usize,
    pub probs: &'a [f32],
}

/// How the Jacobian measures of a layer are taken.
#[derive(Debug, Clone, Copy)]
pub struct JacobianSettings {
    pub mode: JacobianMode,
    pub precision: Precision,
    /// Measure every pair on every token (all three pair sets and the
    /// shuffled-routing null), not only the routed pairs.
    pub all_pairs: bool,
    pub spectra_tokens: usize,
    pub top_sv: usize,
    pub seed: u64,
    /// Draws of the shuffled-routing null (0 = off).
    pub null_draws: usize,
    /// Tokens on which independently initialised experts are measured (0 = off).
    pub null_init_tokens: usize,
}

impl JacobianSettings {
    /// `mode` in `precision` on the routed pairs only: no spectra (one
    /// singular value kept), seed 0, the nulls off.
    pub fn new(mode: JacobianMode, precision: Precision) -> Self {
        JacobianSettings {
            mode,
            precision,
            all_pairs: false,
            spectra_tokens: 0,
            top_sv: 1,
            seed: 0,
            null_draws: 0,
            null_init_tokens: 0,
        }
    }
}

/// Function-space measures of one MoE layer.
pub fn layer_jacobian(
    moe: &MoeLayer,
    input: &JacobianInputs,
    s: &JacobianSettings,
) -> Result<Option<JacobianReport>> {
    if s.mode == JacobianMode::Off {
        return Ok(None);
    }
    // Each table converts the inputs to its own arithmetic; spectra use f64.
    let x = input.x.to_dtype(DType::F64)?;
    let n = x.dim(0)?;
    let e_n = moe.n_experts();
    let inst = Instances::new(input.selected, input.k, n, e_n, s.all_pairs);
    let spec = TableSpec {
        mode: s.mode,
        precision: s.precision,
        random_init: None,
        seed: s.seed,
    };
    let table = align_table(&moe.experts, input.x, &inst, spec)?;
    let token_pairs: Vec<PairWeights> = (0..n)
        .map(|t| {
            PairWeights::new(
                &input.selected[t * input.k..(t + 1) * input.k],
                &input.probs[t * e_n..(t + 1) * e_n],
            )
        })
        .collect();
    let np = pairs::n_pairs(e_n);
    let mut sets = pairs::PairMeans::default();
    for (t, w) in token_pairs.iter().enumerate() {
        sets.add(&table.values[t * np..(t + 1) * np], w);
    }
    let mut set_means = sets.finish();
    if !s.all_pairs {
        // Only the routed instances were measured.
        set_means.all = None;
        set_means.gate_weighted = None;
    }
    let (stats, matrix) = instance_stats(&table.values, e_n);
    let (spectra, effective_rank) = spectra(moe, &x, input, s)?;
    let null = JacobianNull {
        shuffled_routing: shuffled_routing_null(&table.values, &token_pairs, &set_means, s),
        random_init: random_init_null(moe, input.x, s)?,
    };
    Ok(Some(JacobianReport {
        mode: if table.exact { "exact" } else { "estimate" }.into(),
        samples: (!table.exact).then_some(table.samples),
        pairs: if s.all_pairs { "all" } else { "routed" }.into(),
        instances: stats.3,
        mean: stats.0,
        mean_abs: stats.1,
        mean_sq: stats.2,
        stderr: table.stderr,
        matrix,
        sets: set_means,
        null,
        spectra,
        effective_rank,
    }))
}

/// [`layer_jacobian`] with uniform gates and the nulls off: for benchmarks
/// and tests that give a selection but no router.
pub fn layer_jacobian_uniform(
    moe: &MoeLayer,
    x: &Tensor,
    selected: &[u32],
    k: usize,
    settings: &JacobianSettings,
) -> Result<Option<JacobianReport>> {
    let (n, e) = (x.dim(0)?, moe.n_experts());
    let probs = vec![1.0 / e as f32; n * e];
    let input = JacobianInputs {
        x,
        selected,
        k,
        probs: &probs,
    };
    let settings = JacobianSettings {
        null_draws: 0,
        null_init_tokens: 0,
        ..*settings
    };
    layer_jacobian(moe, &input, &settings)
}

/// Mean, mean |A|, mean A² and count over every measured instance, and the
/// E×E mean A per pair.
#[allow(clippy::type_complexity)]
fn instance_stats(
    values: &[f64],
    e_n: usize,
) -> (
    (Option<f64>, Option<f64>, Option<f64>, usize),
    Vec<Vec<Option<f64>>>,
) {
    let np = pairs::n_pairs(e_n).max(1);
    let (mut sum, mut sum_abs, mut sum_sq, mut count) = (0.0, 0.0, 0.0, 0usize);
    let mut pair_sum = vec![(0.0, 0usize); np];
    for (q, v) in values.iter().enumerate() {
        if v.is_nan() {
            continue;
        }
        sum += v;
        sum_abs += v.abs();
        sum_sq += v * v;
        count += 1;
        pair_sum[q % np].0 += v;
        pair_sum[q % np].1 += 1;
    }
    let mut matrix = vec![vec![None; e_n]; e_n];
    for (p, (i, j)) in pairs::all_pairs(e_n).enumerate() {
        let (s, c) = pair_sum[p];
        if c > 0 {
            matrix[i][j] = Some(s / c as f64);
            matrix[j][i] = Some(s / c as f64);
        }
    }
    let c = count as f64;
    let some = |v: f64| (count > 0).then(|| v / c);
    ((some(sum), some(sum_abs), some(sum_sq), count), matrix)
}

/// Spectra: per expert, over up to `spectra_tokens` of its routed tokens.
#[allow(clippy::type_complexity)]
fn spectra(
    moe: &MoeLayer,
    x: &Tensor,
    input: &JacobianInputs,
    s: &JacobianSettings,
) -> Result<(Vec<Option<Vec<f64>>>, Vec<Option<f64>>)> {
    let (n, d) = x.dims2()?;
    let (e_n, k) = (moe.n_experts(), input.k);
    let mut spectra = vec![None; e_n];
    let mut eff = vec![None; e_n];
    if s.spectra_tokens == 0 {
        return Ok((spectra, eff));
    }
    let mut experts = F64Experts::new(&moe.experts);
    for ei in 0..e_n {
        let toks: Vec<usize> = (0..n)
            .filter(|&r| input.selected[r * k..(r + 1) * k].contains(&(ei as u32)))
            .take(s.spectra_tokens)
            .collect();
        if toks.is_empty() {
            continue;
        }
        let ex = experts.get(ei)?;
        let mut top = vec![0.0; s.top_sv.min(d)];
        let mut er = 0.0;
        for &r in &toks {
            let j = explicit_jacobian(ex, &x.narrow(0, r, 1)?)?;
            let sv = singular_values(&j.to_vec2::<f64>()?);
            for (q, s) in top.iter_mut().zip(&sv) {
                *q += s;
            }
            er += effective_rank(&sv.iter().map(|s| s * s).collect::<Vec<_>>());
        }
        let nt = toks.len() as f64;
        spectra[ei] = Some(top.iter().map(|v| v / nt).collect());
        eff[ei] = Some(er / nt);
    }
    Ok((spectra, eff))
}

/// The chance levels of Jacobian alignment (docs/MEASURES.md, "Nulls").
#[derive(Debug, Clone, Default, Serialize)]
pub struct JacobianNull {
    /// The same experts with each token's routing (selection and gates)
    /// taken from another token at random: what a random router gives.
    /// `routed` and `gate_weighted` sets (`all` does not depend on routing).
    pub shuffled_routing: PairSets<NullStats>,
    /// All-pairs alignment of independently initialised experts of the same
    /// shapes (normal weights with each matrix's standard deviation, zero
    /// biases), on the first tokens.
    pub random_init: Option<SetMean>,
}

/// Routing shuffled across tokens, `null_draws` times; needs every pair measured.
fn shuffled_routing_null(
    values: &[f64],
    token_pairs: &[PairWeights],
    observed: &PairSets<SetMean>,
    s: &JacobianSettings,
) -> PairSets<NullStats> {
    use rand::seq::SliceRandom;
    let n = token_pairs.len();
    if s.null_draws == 0 || n == 0 || values.iter().any(|v| v.is_nan()) {
        return PairSets::default();
    }
    let np = values.len() / n;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(s.seed ^ 0x5eed_0001);
    let mut perm: Vec<usize> = (0..n).collect();
    let mut draws: [Vec<f64>; 3] = Default::default();
    for _ in 0..s.null_draws {
        perm.shuffle(&mut rng);
        let mut pm = pairs::PairMeans::default();
        for (t, &u) in perm.iter().enumerate() {
            pm.add(&values[t * np..(t + 1) * np], &token_pairs[u]);
        }
        let r = pm.finish();
        for (set, v) in [(0, r.routed), (2, r.gate_weighted)] {
            if let Some(v) = v {
                draws[set].push(v.mean);
            }
        }
    }
    PairSets::from_fn(|set| {
        let o = observed.get(set)?;
        (set != 1)
            .then(|| NullStats::new(o.mean, &draws[set]))
            .flatten()
    })
}

/// All-pairs alignment of independently initialised experts on the first
/// `null_init_tokens` tokens.
fn random_init_null(moe: &MoeLayer, x: &Tensor, s: &JacobianSettings) -> Result<Option<SetMean>> {
    let n = x.dim(0)?.min(s.null_init_tokens);
    if n == 0 || moe.n_experts() < 2 {
        return Ok(None);
    }
    let e_n = moe.n_experts();
    let x = x.narrow(0, 0, n)?;
    let inst = Instances::new(&[], 0, n, e_n, true);
    let spec = TableSpec {
        mode: s.mode,
        precision: s.precision,
        random_init: Some(s.seed ^ 0x5eed_0002),
        seed: s.seed,
    };
    let table = align_table(&moe.experts, &x, &inst, spec)?;
    let mut pm = pairs::PairMeans::default();
    let ones = vec![1.0f32 / e_n as f32; e_n];
    let w = PairWeights::new(&[], &ones);
    let np = pairs::n_pairs(e_n);
    for t in 0..n {
        pm.add(&table.values[t * np..(t + 1) * np], &w);
    }
    Ok(pm.finish().all)
}

/// The seed of expert e of the random-init null.
fn random_expert_seed(seed: u64, e: usize) -> u64 {
    seed ^ (e as u64).wrapping_mul(0x9e37_79b9)
}

/// The sample standard deviation (n − 1) of `w`, accumulated in f64.
fn std_unbiased<T: num_traits::Float>(w: &[T]) -> f64 {
    let n = w.len() as f64;
    let mean = w.iter().map(|v| v.to_f64().unwrap_or(0.0)).sum::<f64>() / n;
    let ss: f64 = w
        .iter()
        .map(|v| (v.to_f64().unwrap_or(0.0) - mean).powi(2))
        .sum();
    (ss / (n - 1.0).max(1.0)).sqrt()
}

/// Expert e of the random-init null for `src` (f64): independent N(0, σ²)
/// weights, σ each source matrix's standard deviation, zero biases; the same
/// draws as the f32 path makes ([`fast::fill_normal`]).
pub fn random_expert(src: &Expert, seed: u64, e: usize) -> Result<Expert> {
    use crate::model::layers::Linear;
    let seed = random_expert_seed(seed, e);
    let like = |l: &Linear, matrix: u64| -> Result<Linear> {
        let w: Vec<f64> = l.weight.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
        let mut v = vec![0f64; w.len()];
        fast::fill_normal(&mut v, std_unbiased(&w), seed, matrix);
        let bias = match &l.bias {
            Some(b) => Some(Tensor::zeros(b.dims(), DType::F64, &Device::Cpu)?),
            None => None,
        };
        Ok(Linear {
            weight: Tensor::from_vec(v, l.weight.dims(), &Device::Cpu)?,
            bias,
        })
    };
    Ok(Expert {
        up: like(&src.up, 0)?,
        gate: src.gate.as_ref().map(|g| like(g, 1)).transpose()?,
        down: like(&src.down, 2)?,
        activation: src.activation,
    })
}

fn align(ij: f64, ii: f64, jj: f64) -> f64 {
    let d = (ii * jj).sqrt();
    if d > 0.0 {
        (ij / d).clamp(-1.0, 1.0)
    } else {
        0.0
    }
}

/// exp(H(p)) of the normalised non-negative weights (natural log).
pub fn effective_rank(w: &[f64]) -> f64 {
    let s: f64 = w.iter().filter(|v| **v > 0.0).sum();
    if s <= 0.0 {
        return 0.0;
    }
    let h: f64 = w
        .iter()
        .filter(|v| **v > 0.0)
        .map(|v| v / s)
        .map(|p| -p * p.ln())
        .sum();
    h.exp()
}

/// Singular values (non-increasing) of a row-major matrix.
pub fn singular_values(a: &[Vec<f64>]) -> Vec<f64> {
    let (r, c) = (a.len(), a.first().map_or(0, Vec::len));
    let m = faer::Mat::<f64>::from_fn(r, c, |i, j| a[i][j]);
    m.singular_values().unwrap_or_default()
}

/// f64 copies of a layer's experts, made on demand, at most two held.
struct F64Experts<'a> {
    /// Builds expert e in f64 (a copy, or an independently initialised one).
    make: Box<dyn Fn(usize) -> Result<Expert> + 'a>,
    held: Vec<Option<Expert>>,
}

impl<'a> F64Experts<'a> {
    fn new(src: &'a [Expert]) -> Self {
        F64Experts {
            make: Box::new(|e| to_f64(&src[e])),
            held: vec![None; src.len()],
        }
    }

    /// Experts of `src`'s shapes with independent weights (see
    /// [`random_expert`]), built two at a time like the copies.
    fn random_like(src: &'a [Expert], seed: u64) -> Self {
        F64Experts {
            make: Box::new(move |e| random_expert(&src[e], seed, e)),
            held: vec![None; src.len()],
        }
    }

    fn len(&self) -> usize {
        self.held.len()
    }

    /// Hold exactly the experts in `keep` (converting the missing ones).
    fn hold(&mut self, keep: &[usize]) -> Result<()> {
        for (e, h) in self.held.iter_mut().enumerate() {
            if !keep.contains(&e) {
                *h = None;
            } else if h.is_none() {
                *h = Some((self.make)(e)?);
            }
        }
        Ok(())
    }

    fn get(&mut self, e: usize) -> Result<&Expert> {
        self.hold(&[e])?;
        Ok(self.held[e].as_ref().expect("held"))
    }

    fn pair(&mut self, i: usize, j: usize) -> Result<(&Expert, &Expert)> {
        self.hold(&[i, j])?;
        Ok((
            self.held[i].as_ref().expect("held"),
            self.held[j].as_ref().expect("held"),
        ))
    }
}

/// An f64 copy of an expert.
pub fn to_f64(e: &Expert) -> Result<Expert> {
    let lin = |l: &crate::model::layers::Linear| -> Result<crate::model::layers::Linear> {
        Ok(crate::model::layers::Linear {
            weight: l.weight.to_dtype(DType::F64)?.to_device(&Device::Cpu)?,
            bias: l
                .bias
                .as_ref()
                .map(|b| b.to_dtype(DType::F64)?.to_device(&Device::Cpu))
                .transpose()?,
        })
    };
    Ok(Expert {
        up: lin(&e.up)?,
        gate: e.gate.as_ref().map(lin).transpose()?,
        down: lin(&e.down)?,
        activation: e.activation,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_follows_auto_and_scales_with_tokens() {
        // Small layer: auto is exact; Mixtral-sized: K costs far more than the estimate.
        assert_eq!(
            plan(JacobianMode::Auto, 64, 128, 8, 1, 100, 2, false)
                .unwrap()
                .0,
            "exact"
        );
        let (mode, f1) = plan(JacobianMode::Auto, 4096, 14336, 8, 2, 128, 2, false).unwrap();
        assert_eq!(mode, "estimate");
        let (_, f2) = plan(JacobianMode::Auto, 4096, 14336, 8, 2, 256, 2, false).unwrap();
        // The probes' images are paid once per layer, the rest per token.
        assert!(f2 / f1 > 1.9 && f2 / f1 < 2.0);
        // 128 tokens routed to 2 experts, 16 probes: 256 Jacobians at (2·2 + 2·16)·f·d,
        // 8 experts' images at 2·2·16·f·d, 2·16·d per instance (128) and norm (256).
        let (_, f) = plan(JacobianMode::Estimate(16), 4096, 14336, 8, 2, 128, 2, false).unwrap();
        let fd = 14336.0 * 4096.0;
        let want = 256.0 * 36.0 * fd + 8.0 * 64.0 * fd + 384.0 * 32.0 * 4096.0;
        assert!((f - want).abs() < 1e-9 * want, "{f} vs {want}");
        assert!(plan(JacobianMode::Off, 8, 8, 2, 1, 1, 1, false).is_none());
    }

    #[test]
    fn effective_rank_of_flat_and_peaked() {
        assert!((effective_rank(&[1.0, 1.0, 1.0, 1.0]) - 4.0).abs() < 1e-12);
        assert!((effective_rank(&[1.0, 0.0, 0.0]) - 1.0).abs() < 1e-12);
    }
}
