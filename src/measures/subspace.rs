//! Representation space (SPEC.md "Representation space: PCA and Grassmann"):
//! per-expert PCA subspaces of routed tokens, principal angles, geodesic
//! distances, subspace overlap against the random baseline r/d, and the
//! effective rank of each expert's routed covariance.
//!
//! Rows are accumulated as weighted moments (Σw, Σw·x, Σw·x xᵀ in f64), so any
//! number of batches can be added; eigen- and singular-value decompositions
//! use `faer`.

use super::jacobian::effective_rank;
use crate::Result;
use candle_core::{DType, Device, Tensor};
use serde::Serialize;

/// Subspace rank: fixed, or the smallest reaching a fraction τ of the variance (capped).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RankRule {
    Fixed(usize),
    /// (τ, cap)
    Variance(f64, usize),
    Off,
}

impl RankRule {
    /// `16`, `var:0.9` (cap 16, SPEC's default rank), `var:0.9:32`, `off`.
    pub fn parse(s: &str) -> std::result::Result<Self, String> {
        if s == "off" {
            return Ok(RankRule::Off);
        }
        if let Some(rest) = s.strip_prefix("var:") {
            let mut it = rest.split(':');
            let tau: f64 = it
                .next()
                .and_then(|v| v.parse().ok())
                .filter(|t: &f64| *t > 0.0 && *t <= 1.0)
                .ok_or_else(|| format!("bad `{s}`: τ must lie in (0, 1]"))?;
            let cap = match it.next() {
                Some(c) => c.parse().map_err(|_| format!("bad cap in `{s}`"))?,
                None => 16,
            };
            return Ok(RankRule::Variance(tau, cap));
        }
        s.parse::<usize>()
            .ok()
            .filter(|r| *r > 0)
            .map(RankRule::Fixed)
            .ok_or_else(|| format!("bad subspace option `{s}` (RANK, var:τ, var:τ:CAP or off)"))
    }

    /// The rank cap (the number of rows an expert needs is more than this).
    pub fn cap(&self) -> usize {
        match self {
            RankRule::Fixed(r) => *r,
            RankRule::Variance(_, c) => *c,
            RankRule::Off => 0,
        }
    }
}

/// Weighted first and second moments of one expert's rows.
#[derive(Debug, Clone)]
pub struct Moments {
    pub d: usize,
    pub n: usize,
    pub w: f64,
    pub sum: Vec<f64>,
    /// Row-major d×d.
    pub outer: Vec<f64>,
}

impl Moments {
    pub fn new(d: usize) -> Self {
        Moments {
            d,
            n: 0,
            w: 0.0,
            sum: vec![0.0; d],
            outer: vec![0.0; d * d],
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
        let outer: Vec<f64> = xw.t()?.matmul(&x)?.flatten_all()?.to_vec1()?;
        let sum: Vec<f64> = xw.sum(0)?.to_vec1()?;
        for (a, b) in self.outer.iter_mut().zip(outer) {
            *a += b;
        }
        for (a, b) in self.sum.iter_mut().zip(sum) {
            *a += b;
        }
        self.w += w.sum_all()?.to_scalar::<f64>()?;
        self.n += n;
        Ok(())
    }

    /// Weighted covariance (d×d, row-major).
    pub fn covariance(&self) -> Vec<f64> {
        let d = self.d;
        let mu: Vec<f64> = self.sum.iter().map(|s| s / self.w).collect();
        (0..d * d)
            .map(|k| self.outer[k] / self.w - mu[k / d] * mu[k % d])
            .collect()
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
    let e = moments.len();
    let d = moments.first().map_or(0, |m| m.d);
    let mut bases: Vec<Option<Vec<Vec<f64>>>> = vec![None; e];
    let mut eff = vec![None; e];
    let mut skipped = Vec::new();
    let mut ranks = vec![None; e];
    for (i, m) in moments.iter().enumerate() {
        if m.n <= rule.cap() || m.w <= 0.0 {
            skipped.push(Skipped { expert: i, n: m.n });
            continue;
        }
        let (vals, vecs) = eigh_desc(&m.covariance(), d);
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
            RankRule::Off => unreachable!(),
        };
        ranks[i] = Some(r);
        bases[i] = Some(vecs.into_iter().take(r).collect());
    }
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
    Some(SubspaceReport {
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
    })
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

    #[test]
    fn rank_rules_parse() {
        assert_eq!(RankRule::parse("8").unwrap(), RankRule::Fixed(8));
        assert_eq!(
            RankRule::parse("var:0.9").unwrap(),
            RankRule::Variance(0.9, 16)
        );
        assert_eq!(RankRule::parse("off").unwrap(), RankRule::Off);
        assert!(RankRule::parse("var:1.5").is_err() && RankRule::parse("0").is_err());
    }
}
