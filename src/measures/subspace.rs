//! Representation space (docs/MEASURES.md "Representation space: expert subspaces"):
//! per-expert PCA subspaces of routed tokens, principal angles, geodesic
//! distances, subspace overlap against the random baseline r/d, and the
//! effective rank of each expert's routed covariance.
//!
//! Rows are accumulated as weighted moments (Σw, Σw·x, Σw·x xᵀ in f64), so any
//! number of batches can be added; eigen- and singular-value decompositions
//! use `faer`.

pub use crate::config::RankRule;

use super::jacobian::effective_rank;
use super::pairs::{NullStats, PairSets};
use crate::Result;
use candle_core::{DType, Device, Tensor};
use serde::Serialize;

/// Weighted first and second moments of one expert's rows.
///
/// While an expert has seen at most d rows they are kept as they are, and
/// its PCA goes through the n×n Gram matrix (cheap when n ≪ d, e.g. ~30
/// routed tokens per expert of a d = 4096 model); past d rows the d×d second
/// moment is accumulated instead. Both give the same spectrum and subspace.
#[derive(Debug, Clone)]
pub struct Moments {
    pub d: usize,
    pub n: usize,
    pub w: f64,
    pub sum: Vec<f64>,
    /// Σ w x xᵀ, row-major d×d, once more than d rows were seen.
    outer: Option<Vec<f64>>,
    /// The rows (n×d, row-major) and their weights, until then.
    rows: Vec<f64>,
    row_w: Vec<f64>,
}

impl Moments {
    pub fn new(d: usize) -> Self {
        Moments {
            d,
            n: 0,
            w: 0.0,
            sum: vec![0.0; d],
            outer: None,
            rows: Vec::new(),
            row_w: Vec::new(),
        }
    }

    /// Add rows x (n×d) with weights (None = 1).
    pub fn add(&mut self, x: &Tensor, weights: Option<&[f64]>) -> Result<()> {
        let x = x.to_dtype(DType::F64)?.to_device(&Device::Cpu)?;
        let n = x.dim(0)?;
        if n == 0 {
            return Ok(());
        }
        let w = match weights {
            Some(w) => Tensor::from_slice(w, (n, 1), &Device::Cpu)?,
            None => Tensor::ones((n, 1), DType::F64, &Device::Cpu)?,
        };
        let xw = x.broadcast_mul(&w)?;
        let sum: Vec<f64> = xw.sum(0)?.to_vec1()?;
        for (a, b) in self.sum.iter_mut().zip(sum) {
            *a += b;
        }
        self.w += w.sum_all()?.to_scalar::<f64>()?;
        self.n += n;
        if self.outer.is_none() && self.n <= self.d {
            self.rows.extend(x.flatten_all()?.to_vec1::<f64>()?);
            self.row_w.extend(w.flatten_all()?.to_vec1::<f64>()?);
            return Ok(());
        }
        if self.outer.is_none() {
            // Switch to the d×d second moment, starting from the kept rows.
            let d = self.d;
            let k = self.row_w.len();
            let mut outer = vec![0.0; d * d];
            if k > 0 {
                let r = Tensor::from_slice(&self.rows, (k, d), &Device::Cpu)?;
                let rw = Tensor::from_slice(&self.row_w, (k, 1), &Device::Cpu)?;
                outer = r
                    .broadcast_mul(&rw)?
                    .t()?
                    .matmul(&r)?
                    .flatten_all()?
                    .to_vec1()?;
            }
            self.outer = Some(outer);
            self.rows = Vec::new();
            self.row_w = Vec::new();
        }
        let outer: Vec<f64> = xw.t()?.matmul(&x)?.flatten_all()?.to_vec1()?;
        for (a, b) in self.outer.as_mut().expect("set").iter_mut().zip(outer) {
            *a += b;
        }
        Ok(())
    }

    fn mean(&self) -> Vec<f64> {
        self.sum.iter().map(|s| s / self.w).collect()
    }

    /// Weighted covariance (d×d, row-major).
    pub fn covariance(&self) -> Vec<f64> {
        let d = self.d;
        let mu = self.mean();
        match &self.outer {
            Some(outer) => (0..d * d)
                .map(|k| outer[k] / self.w - mu[k / d] * mu[k % d])
                .collect(),
            None => {
                let mut c = vec![0.0; d * d];
                for (x, &w) in self.rows.chunks_exact(d).zip(&self.row_w) {
                    for i in 0..d {
                        let a = w / self.w * (x[i] - mu[i]);
                        for j in 0..d {
                            c[i * d + j] += a * (x[j] - mu[j]);
                        }
                    }
                }
                c
            }
        }
    }

    /// Eigenvalues of the covariance (descending, all d of them) and the
    /// eigenvectors of its non-zero ones (same order).
    pub fn spectrum(&self) -> (Vec<f64>, Vec<Vec<f64>>) {
        self.top_spectrum(usize::MAX)
    }

    /// [`Moments::spectrum`] with at most `vectors` eigenvectors (the
    /// leading ones): a subspace of rank r needs r of them, and on the Gram
    /// path each costs n·d.
    pub fn top_spectrum(&self, vectors: usize) -> (Vec<f64>, Vec<Vec<f64>>) {
        let d = self.d;
        if self.outer.is_some() {
            let (vals, mut vecs) = eigh_desc(&self.covariance(), d);
            vecs.truncate(vectors);
            return (vals, vecs);
        }
        // C = YᵀY with rows y_i = √(w_i/W)(x_i − μ); its non-zero spectrum is
        // that of the n×n Gram matrix K = YYᵀ, with u_k = Yᵀv_k / √λ_k.
        let mu = self.mean();
        let n = self.row_w.len();
        let y: Vec<f64> = self
            .rows
            .chunks_exact(d)
            .zip(&self.row_w)
            .flat_map(|(x, &w)| {
                let s = (w / self.w).max(0.0).sqrt();
                x.iter()
                    .zip(&mu)
                    .map(move |(a, m)| s * (a - m))
                    .collect::<Vec<_>>()
            })
            .collect();
        let ym = faer::Mat::<f64>::from_fn(n, d, |i, j| y[i * d + j]);
        let k = &ym * ym.transpose();
        let kv: Vec<f64> = (0..n * n).map(|t| k[(t / n, t % n)]).collect();
        let (vals, vecs) = eigh_desc(&kv, n);
        let top = vals.first().copied().unwrap_or(0.0).max(0.0);
        let mut eig = vec![0.0; d];
        let mut basis = Vec::new();
        for (i, (&l, v)) in vals.iter().zip(&vecs).enumerate() {
            if i < d {
                eig[i] = l;
            }
            if l > 1e-12 * top && l > 0.0 && basis.len() < vectors {
                let inv = 1.0 / l.sqrt();
                basis.push(
                    (0..d)
                        .map(|j| (0..n).map(|r| y[r * d + j] * v[r]).sum::<f64>() * inv)
                        .collect(),
                );
            }
        }
        (eig, basis)
    }
}

/// Eigenvalues (descending) and eigenvectors (columns, same order) of a symmetric row-major matrix.
pub fn eigh_desc(a: &[f64], d: usize) -> (Vec<f64>, Vec<Vec<f64>>) {
    let m = faer::Mat::<f64>::from_fn(d, d, |i, j| 0.5 * (a[i * d + j] + a[j * d + i]));
    let Ok(evd) = m.self_adjoint_eigen(faer::Side::Lower) else {
        return (vec![], vec![]);
    };
    let s: Vec<f64> = evd.S().column_vector().iter().copied().collect();
    let u = evd.U();
    let mut order: Vec<usize> = (0..d).collect();
    order.sort_by(|&i, &j| s[j].total_cmp(&s[i]));
    (
        order.iter().map(|&i| s[i]).collect(),
        order
            .iter()
            .map(|&i| (0..d).map(|r| u[(r, i)]).collect())
            .collect(),
    )
}

/// Principal angles (radians, ascending) between span(A) and span(B), given
/// orthonormal bases as lists of d-vectors: cos θ_k = σ_k(Aᵀ B), clamped to [0, 1].
pub fn principal_angles(a: &[Vec<f64>], b: &[Vec<f64>]) -> Vec<f64> {
    let m = faer::Mat::<f64>::from_fn(a.len(), b.len(), |i, j| {
        a[i].iter().zip(&b[j]).map(|(x, y)| x * y).sum()
    });
    let sv = m.singular_values().unwrap_or_default();
    sv.iter().map(|s| s.clamp(0.0, 1.0).acos()).collect()
}

/// Geodesic distance, its normalisation by (π/2)·√r, and the overlap ‖AᵀB‖²/r (mean cos²θ).
pub fn grassmann(angles: &[f64]) -> (f64, f64, f64) {
    let r = angles.len() as f64;
    let g = angles.iter().map(|t| t * t).sum::<f64>().sqrt();
    let o = angles.iter().map(|t| t.cos().powi(2)).sum::<f64>() / r;
    (g, g / (std::f64::consts::FRAC_PI_2 * r.sqrt()), o)
}

/// A skipped expert.
#[derive(Debug, Clone, Serialize)]
pub struct Skipped {
    pub expert: usize,
    pub n: usize,
}

/// Per-layer representation-space summary.
#[derive(Debug, Clone, Serialize)]
pub struct SubspaceReport {
    /// `input` or `output`.
    pub space: String,
    pub weighted: bool,
    /// Rank per expert (variance mode may differ per expert; null when skipped).
    pub rank: Vec<Option<usize>>,
    /// E×E mean cos²θ (null diagonal and skipped).
    pub overlap: Vec<Vec<Option<f64>>>,
    pub geodesic: Vec<Vec<Option<f64>>>,
    pub geodesic_normalised: Vec<Vec<Option<f64>>>,
    /// r/d for the layer's (largest) rank: the expected overlap of random subspaces.
    pub random_overlap: f64,
    pub mean_overlap: Option<f64>,
    pub mean_geodesic_normalised: Option<f64>,
    /// exp(H(λ/Σλ)) of each expert's covariance spectrum.
    pub effective_rank: Vec<Option<f64>>,
    pub skipped: Vec<Skipped>,
    /// Mean overlap under the three pair sets (docs/MEASURES.md, "Pair
    /// sets"): expert pairs weighted by co-selection counts (`routed`), 1
    /// (`all`, = `mean_overlap`) or Σ_x g_i(x)·g_j(x) (`gate_weighted`).
    pub sets: PairSets<f64>,
    /// Why the numbers say nothing about the experts, when they cannot
    /// (unweighted input-space PCA under soft routing).
    pub degenerate: Option<String>,
    /// Permutation null of `mean_overlap`: experts given random token sets of
    /// the same sizes and weights.
    pub null: Option<SubspaceNull>,
}

/// The permutation null of a layer's mean subspace overlap; z > 0 when the
/// experts overlap less than random token sets of the same sizes would.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct SubspaceNull {
    pub mean_overlap: f64,
    pub sd: f64,
    pub z: Option<f64>,
    pub draws: usize,
}

impl From<NullStats> for SubspaceNull {
    fn from(n: NullStats) -> Self {
        SubspaceNull {
            mean_overlap: n.mean,
            sd: n.sd,
            z: n.z,
            draws: n.draws,
        }
    }
}

/// Each expert's PCA basis under a rank rule (None for an expert skipped
/// because it has at most `rule.cap()` rows or no weight).
#[derive(Debug, Clone)]
pub struct ExpertBases {
    /// Orthonormal basis vectors (d each), leading first.
    pub bases: Vec<Option<Vec<Vec<f64>>>>,
    pub ranks: Vec<Option<usize>>,
    /// exp(H(λ/Σλ)) of each expert's covariance spectrum.
    pub effective_rank: Vec<Option<f64>>,
    pub skipped: Vec<Skipped>,
}

/// The experts' subspaces: the leading eigenvectors of each expert's
/// covariance, as many as `rule` picks.
pub fn expert_bases(moments: &[Moments], rule: RankRule) -> ExpertBases {
    let e = moments.len();
    let d = moments.first().map_or(0, |m| m.d);
    let mut bases: Vec<Option<Vec<Vec<f64>>>> = vec![None; e];
    let mut eff = vec![None; e];
    let mut skipped = Vec::new();
    let mut ranks = vec![None; e];
    if rule == RankRule::Off {
        return ExpertBases {
            bases,
            ranks,
            effective_rank: eff,
            skipped,
        };
    }
    for (i, m) in moments.iter().enumerate() {
        if m.n <= rule.cap() || m.w <= 0.0 {
            skipped.push(Skipped { expert: i, n: m.n });
            continue;
        }
        let (vals, vecs) = m.top_spectrum(rule.cap());
        let pos: Vec<f64> = vals.iter().map(|v| v.max(0.0)).collect();
        eff[i] = Some(effective_rank(&pos));
        let r = match rule {
            RankRule::Fixed(r) => r.min(d),
            RankRule::Variance(tau, cap) => {
                let total: f64 = pos.iter().sum();
                let mut acc = 0.0;
                let mut r = pos.len();
                for (k, v) in pos.iter().enumerate() {
                    acc += v;
                    if acc >= tau * total {
                        r = k + 1;
                        break;
                    }
                }
                r.min(cap).max(1)
            }
            RankRule::Off => 0, // returned above
        };
        let r = r.min(vecs.len());
        ranks[i] = Some(r);
        bases[i] = Some(vecs.into_iter().take(r).collect());
    }
    ExpertBases {
        bases,
        ranks,
        effective_rank: eff,
        skipped,
    }
}

/// Subspaces and pairwise distances from per-expert moments.
pub fn layer_subspaces(
    moments: &[Moments],
    rule: RankRule,
    space: &str,
    weighted: bool,
) -> Option<SubspaceReport> {
    if rule == RankRule::Off {
        return None;
    }
    let d = moments.first().map_or(0, |m| m.d);
    Some(subspaces_of(
        expert_bases(moments, rule),
        d,
        rule,
        space,
        weighted,
    ))
}

/// [`layer_subspaces`] from bases already computed (`d` the dimension).
pub fn subspaces_of(
    bases: ExpertBases,
    d: usize,
    rule: RankRule,
    space: &str,
    weighted: bool,
) -> SubspaceReport {
    let e = bases.bases.len();
    let ExpertBases {
        bases,
        ranks,
        effective_rank: eff,
        skipped,
    } = bases;
    let mut overlap = vec![vec![None; e]; e];
    let mut geo = vec![vec![None; e]; e];
    let mut geon = vec![vec![None; e]; e];
    let (mut so, mut sg, mut np) = (0.0, 0.0, 0usize);
    for i in 0..e {
        for j in i + 1..e {
            let (Some(a), Some(b)) = (&bases[i], &bases[j]) else {
                continue;
            };
            let r = a.len().min(b.len());
            let ang = principal_angles(&a[..r], &b[..r]);
            let (g, gn, o) = grassmann(&ang);
            for (m, v) in [(&mut overlap, o), (&mut geo, g), (&mut geon, gn)] {
                m[i][j] = Some(v);
                m[j][i] = Some(v);
            }
            so += o;
            sg += gn;
            np += 1;
        }
    }
    let rmax = ranks.iter().flatten().copied().max().unwrap_or(rule.cap());
    SubspaceReport {
        space: space.into(),
        weighted,
        rank: ranks,
        overlap,
        geodesic: geo,
        geodesic_normalised: geon,
        random_overlap: rmax as f64 / d.max(1) as f64,
        mean_overlap: (np > 0).then(|| so / np as f64),
        mean_geodesic_normalised: (np > 0).then(|| sg / np as f64),
        effective_rank: eff,
        skipped,
        sets: PairSets::default(),
        degenerate: None,
        null: None,
    }
}

/// The permutation null of subspace overlap: each expert keeps its number of
/// rows and its row weights, but its rows come from tokens drawn at random
/// (without replacement) from a shared pool; the measure is recomputed.
#[derive(Debug, Clone, Copy)]
pub struct PermutationNull {
    pub d: usize,
    pub rule: RankRule,
    pub weighted: bool,
    pub draws: usize,
    pub seed: u64,
}

impl PermutationNull {
    /// `pools[e]`: the rows expert e would have on each pool token (n × d;
    /// the same slice for every expert in input space, the expert's own
    /// outputs in output space). `row_weights[e]`: expert e's observed row
    /// weights (their count is its row count, capped at the pool's size).
    /// Returns the mean overlap of each draw.
    pub fn draw(&self, pools: &[&[f32]], row_weights: &[Vec<f64>]) -> Result<Vec<f64>> {
        use rand::seq::{index::sample, SliceRandom};
        use rand::SeedableRng;
        let d = self.d;
        let pool_n = pools.first().map_or(0, |p| p.len() / d.max(1));
        if self.draws == 0 || pool_n == 0 {
            return Ok(Vec::new());
        }
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(self.seed);
        let mut out = Vec::with_capacity(self.draws);
        for _ in 0..self.draws {
            let mut moments: Vec<Moments> = (0..pools.len()).map(|_| Moments::new(d)).collect();
            for (e, m) in moments.iter_mut().enumerate() {
                let n_e = row_weights[e].len().min(pool_n);
                if n_e == 0 {
                    continue;
                }
                let toks = sample(&mut rng, pool_n, n_e).into_vec();
                let rows: Vec<f32> = toks
                    .iter()
                    .flat_map(|&t| pools[e][t * d..(t + 1) * d].iter().copied())
                    .collect();
                let mut w = row_weights[e].clone();
                w.shuffle(&mut rng);
                w.truncate(n_e);
                let x = Tensor::from_vec(rows, (n_e, d), &Device::Cpu)?;
                m.add(&x, self.weighted.then_some(w.as_slice()))?;
            }
            if let Some(v) =
                layer_subspaces(&moments, self.rule, "", self.weighted).and_then(|r| r.mean_overlap)
            {
                out.push(v);
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unit(d: usize, i: usize) -> Vec<f64> {
        (0..d).map(|k| if k == i { 1.0 } else { 0.0 }).collect()
    }

    #[test]
    fn principal_angles_known_cases() {
        let d = 6;
        let a = vec![unit(d, 0), unit(d, 1)];
        assert!(principal_angles(&a, &a).iter().all(|t| t.abs() < 1e-7));
        let b = vec![unit(d, 2), unit(d, 3)];
        assert!(principal_angles(&a, &b)
            .iter()
            .all(|t| (t - std::f64::consts::FRAC_PI_2).abs() < 1e-7));
        // Rotate e1 by 0.3 rad towards e3 inside span{e1, e3}: angles {0, 0.3}.
        let th: f64 = 0.3;
        let mut r = unit(d, 1);
        r[1] = th.cos();
        r[2] = th.sin();
        let c = vec![unit(d, 0), r];
        let mut ang = principal_angles(&a, &c);
        ang.sort_by(f64::total_cmp);
        assert!(ang[0].abs() < 1e-7 && (ang[1] - th).abs() < 1e-7, "{ang:?}");
        let (g, gn, o) = grassmann(&ang);
        assert!(
            (g - th).abs() < 1e-7
                && (gn - th / (std::f64::consts::FRAC_PI_2 * 2f64.sqrt())).abs() < 1e-7
        );
        assert!((o - (1.0 + th.cos().powi(2)) / 2.0).abs() < 1e-7);
    }

    /// The Gram path (n ≤ d rows kept) and the d×d path give the same
    /// spectrum and the same subspaces, weighted or not.
    #[test]
    fn gram_and_covariance_paths_agree() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(4);
        let (d, n) = (40, 25);
        // Rows near a planted 3-dimensional subspace, plus noise.
        let basis: Vec<Vec<f64>> = (0..3)
            .map(|_| (0..d).map(|_| rng.random_range(-1.0..1.0)).collect())
            .collect();
        let x: Vec<f64> = (0..n)
            .flat_map(|_| {
                let c: Vec<f64> = (0..3).map(|_| rng.random_range(-3.0..3.0)).collect();
                (0..d)
                    .map(|j| {
                        (0..3).map(|k| c[k] * basis[k][j]).sum::<f64>()
                            + rng.random_range(-0.1..0.1)
                            + 0.5
                    })
                    .collect::<Vec<_>>()
            })
            .collect();
        let w: Vec<f64> = (0..n).map(|_| rng.random_range(0.2..1.0)).collect();
        let t = Tensor::from_slice(&x, (n, d), &Device::Cpu).unwrap();
        for weights in [None, Some(w.as_slice())] {
            let mut gram = Moments::new(d);
            gram.add(&t, weights).unwrap();
            assert!(gram.outer.is_none());
            let mut dense = Moments::new(d);
            dense.outer = Some(vec![0.0; d * d]); // force the d×d path
            dense.add(&t, weights).unwrap();
            let (eg, ug) = gram.spectrum();
            let (ed, ud) = dense.spectrum();
            for (a, b) in eg.iter().zip(&ed) {
                assert!((a - b).abs() < 1e-9 * (1.0 + ed[0].abs()), "{a} vs {b}");
            }
            let ang = principal_angles(&ug[..5], &ud[..5]);
            assert!(ang.iter().all(|a| a.abs() < 1e-6), "{ang:?}");
            let cov = gram.covariance();
            let cd = dense.covariance();
            assert!(cov.iter().zip(&cd).all(|(a, b)| (a - b).abs() < 1e-9));
        }
        // Adding rows past d switches to the d×d path with the same result.
        let mut m = Moments::new(d);
        for _ in 0..2 {
            m.add(&t, None).unwrap();
        }
        assert!(m.outer.is_some() && m.rows.is_empty() && m.n == 2 * n);
    }
}
