//! The orthogonality loss and weight overlap at every granularity, on plain
//! slices (generic over f32/f64, f64 accumulation): the fused engine's
//! L_orth and its gradient, and the weight MSO the evaluations log.
//!
//! Each expert's matrix W_i (R × C, row-major) is cut into S vectors of one
//! granularity (docs/MEASURES.md "Granularity"): `flat` (S = 1, the whole
//! matrix), `rows` (S = R rows of length C) or `cols` (S = C columns of
//! length R). With u_i the i-th expert's vector of slice s,
//!
//!   L = (1/S) Σ_s Σ_{i<j} φ(u_i, u_j)
//!
//! where φ is cos² (`normalized`, `detached_norm`) or ⟨u_i, u_j⟩²
//! (`unnormalized`). Its gradient for expert i is, per slice, a combination
//! Σ_j A_ij u_j of the experts' vectors; [`pair_coefficients`] gives A.

use crate::config::{Granularity, OrthVariant};
use crate::kernels::Real;
use rayon::prelude::*;

/// Elements per parallel task of the flat gradient update.
const CHUNK: usize = 1 << 13;

/// How L_orth compares the experts' matrices (`reg.orth_granularity`, `reg.orth_variant`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OrthForm {
    pub granularity: Granularity,
    pub variant: OrthVariant,
}

impl Default for OrthForm {
    /// The loss as docs/MEASURES.md defines it: flat, normalised.
    fn default() -> Self {
        OrthForm {
            granularity: Granularity::Flat,
            variant: OrthVariant::Normalized,
        }
    }
}

impl OrthForm {
    pub fn of(reg: &crate::config::RegConfig) -> Self {
        OrthForm {
            granularity: reg.orth_granularity,
            variant: reg.orth_variant,
        }
    }
}

/// The number of vectors and their length when an R × C matrix is cut at `g`.
pub fn slices(g: Granularity, rows: usize, cols: usize) -> (usize, usize) {
    match g {
        Granularity::Flat => (1, rows * cols),
        Granularity::Rows => (rows, cols),
        Granularity::Cols => (cols, rows),
    }
}

/// The weight MSO two independent isotropic random matrices would have at
/// `g`: E[cos²] = 1/L for L-dimensional vectors.
pub fn chance_level(g: Granularity, rows: usize, cols: usize) -> f64 {
    1.0 / slices(g, rows, cols).1 as f64
}

/// Σ_{i<j} φ_ij of one slice's raw Gram matrix, and A (E × E, row-major)
/// times `lambda` with ∂/∂u_i = Σ_j A_ij u_j:
/// - normalized: c = G_ij/(s_i s_j), A_ij = 2c/(s_i s_j), A_ii = −2 Σ_{j≠i} c²/s_i²;
/// - detached_norm: the same without A_ii (the norms are constants);
/// - unnormalized: φ = G_ij², A_ij = 2 G_ij.
pub fn pair_coefficients(gram: &[Vec<f64>], variant: OrthVariant, lambda: f64) -> (f64, Vec<f64>) {
    let e = gram.len();
    let s: Vec<f64> = (0..e).map(|i| gram[i][i].sqrt().max(1e-30)).collect();
    let (mut total, mut coef) = (0.0, vec![0.0f64; e * e]);
    for i in 0..e {
        for j in (0..e).filter(|&j| j != i) {
            let (value, a_ij, a_ii) = match variant {
                OrthVariant::Unnormalized => (gram[i][j].powi(2), 2.0 * gram[i][j], 0.0),
                OrthVariant::Normalized | OrthVariant::DetachedNorm => {
                    let c = gram[i][j] / (s[i] * s[j]);
                    let self_term = if variant == OrthVariant::Normalized {
                        2.0 * c * c / (s[i] * s[i])
                    } else {
                        0.0
                    };
                    (c * c, 2.0 * c / (s[i] * s[j]), self_term)
                }
            };
            if i < j {
                total += value;
            }
            coef[i * e + j] = lambda * a_ij;
            coef[i * e + i] -= lambda * a_ii;
        }
    }
    (total, coef)
}

/// L_orth of the matrices `w` (each R × C row-major, `rows` = R) and, with
/// `grads`, adds λ·∂L/∂W_i to each. Returns L (unscaled by λ).
pub fn orth_loss_and_grad<T: Real>(
    grads: Option<Vec<&mut [T]>>,
    w: &[&[T]],
    rows: usize,
    form: OrthForm,
    lambda: f64,
) -> f64 {
    if w.len() < 2 || w[0].is_empty() {
        return 0.0;
    }
    let cols = w[0].len() / rows;
    match form.granularity {
        Granularity::Flat => {
            let gram = super::raw_gram(w);
            let (value, coef) = pair_coefficients(&gram, form.variant, lambda);
            if let Some(g) = grads {
                let coef: Vec<T> = coef.iter().map(|&c| T::c(c)).collect();
                add_combinations(g, w, &coef, CHUNK);
            }
            value
        }
        Granularity::Rows => sliced(grads, w, cols, form.variant, lambda),
        Granularity::Cols => {
            let wt: Vec<Vec<T>> = w.iter().map(|m| transpose(m, rows, cols)).collect();
            let wt_ref: Vec<&[T]> = wt.iter().map(Vec::as_slice).collect();
            let Some(grads) = grads else {
                return sliced(None, &wt_ref, rows, form.variant, lambda);
            };
            let mut gt = vec![vec![T::zero(); rows * cols]; w.len()];
            let value = sliced(
                Some(gt.iter_mut().map(Vec::as_mut_slice).collect()),
                &wt_ref,
                rows,
                form.variant,
                lambda,
            );
            for (g, t) in grads.into_iter().zip(&gt) {
                for (a, row) in g.chunks_mut(cols).enumerate() {
                    for (b, v) in row.iter_mut().enumerate() {
                        *v = *v + t[b * rows + a];
                    }
                }
            }
            value
        }
    }
}

/// The `rows` case on contiguous slices of length `len`: mean over slices
/// of Σ_{i<j} φ, each slice's gradient added in parallel.
fn sliced<T: Real>(
    grads: Option<Vec<&mut [T]>>,
    w: &[&[T]],
    len: usize,
    variant: OrthVariant,
    lambda: f64,
) -> f64 {
    let n = w[0].len() / len;
    let scale = 1.0 / n as f64;
    let slice_gram = |a: usize| -> Vec<Vec<f64>> {
        let rows: Vec<&[T]> = w.iter().map(|m| &m[a * len..(a + 1) * len]).collect();
        gram_seq(&rows)
    };
    let Some(grads) = grads else {
        let sum: f64 = (0..n)
            .into_par_iter()
            .map(|a| pair_coefficients(&slice_gram(a), variant, 0.0).0)
            .sum();
        return sum * scale;
    };
    let mut per_slice: Vec<Vec<&mut [T]>> = (0..n).map(|_| Vec::with_capacity(w.len())).collect();
    for g in grads {
        for (a, piece) in g.chunks_mut(len).enumerate() {
            per_slice[a].push(piece);
        }
    }
    let sum: f64 = per_slice
        .into_par_iter()
        .enumerate()
        .map(|(a, mut gs)| {
            let (value, coef) = pair_coefficients(&slice_gram(a), variant, lambda * scale);
            let rows: Vec<&[T]> = w.iter().map(|m| &m[a * len..(a + 1) * len]).collect();
            let coef: Vec<T> = coef.iter().map(|&c| T::c(c)).collect();
            combine_into(&mut gs, &rows, &coef, 0);
            value
        })
        .sum();
    sum * scale
}

/// The raw Gram matrix of a few short vectors, sequentially (f64 accumulation).
fn gram_seq<T: Real>(v: &[&[T]]) -> Vec<Vec<f64>> {
    let e = v.len();
    let mut g = vec![vec![0.0; e]; e];
    for i in 0..e {
        for j in i..e {
            let d: f64 = v[i]
                .iter()
                .zip(v[j])
                .map(|(&a, &b)| a.into() * b.into())
                .sum();
            g[i][j] = d;
            g[j][i] = d;
        }
    }
    g
}

fn transpose<T: Real>(m: &[T], rows: usize, cols: usize) -> Vec<T> {
    let mut t = vec![T::zero(); rows * cols];
    for (a, row) in m.chunks(cols).enumerate() {
        for (b, &v) in row.iter().enumerate() {
            t[b * rows + a] = v;
        }
    }
    t
}

/// g_i += Σ_j coef_ij · w_j for every expert i, in parallel over chunks of
/// the (equal-length) flattened weights.
fn add_combinations<T: Real>(grads: Vec<&mut [T]>, w: &[&[T]], coef: &[T], chunk: usize) {
    let mut per_chunk: Vec<Vec<&mut [T]>> = (0..w[0].len().div_ceil(chunk))
        .map(|_| Vec::with_capacity(w.len()))
        .collect();
    for g in grads {
        for (c, piece) in g.chunks_mut(chunk).enumerate() {
            per_chunk[c].push(piece);
        }
    }
    per_chunk
        .into_par_iter()
        .enumerate()
        .for_each(|(c, mut gs)| combine_into(&mut gs, w, coef, c * chunk));
}

/// gs[i][q] += Σ_j coef_ij · w_j[offset + q].
fn combine_into<T: Real>(gs: &mut [&mut [T]], w: &[&[T]], coef: &[T], offset: usize) {
    let e = w.len();
    for (i, gi) in gs.iter_mut().enumerate() {
        for (q, gv) in gi.iter_mut().enumerate() {
            let mut acc = T::zero();
            for j in 0..e {
                acc = acc + coef[i * e + j] * w[j][offset + q];
            }
            *gv = *gv + acc;
        }
    }
}

/// Weight MSO of the matrices `w` (R × C, `rows` = R) at granularity `g`:
/// the mean over pairs i < j of the mean over slices of cos². None when a
/// slice has fewer than two entries (e.g. the columns of a router row).
pub fn weight_mso<T: Real>(w: &[&[T]], rows: usize, g: Granularity) -> Option<f64> {
    let e = w.len();
    let cols = w.first()?.len() / rows.max(1);
    if e < 2 || slices(g, rows, cols).1 < 2 {
        return (e < 2 && slices(g, rows, cols).1 >= 2).then_some(0.0);
    }
    let form = OrthForm {
        granularity: g,
        variant: OrthVariant::Normalized,
    };
    let sum = orth_loss_and_grad(None, w, rows, form, 0.0);
    Some(2.0 * sum / (e * (e - 1)) as f64)
}

/// Each pair's mean over slices of cos² at granularity `g`: the E×E matrix
/// (row-major, ones on the diagonal) whose off-diagonal mean is
/// [`weight_mso`]. One pass over the slices, in parallel.
pub fn pair_overlap<T: Real>(w: &[&[T]], rows: usize, g: Granularity) -> Vec<f64> {
    let e = w.len();
    let cols = w.first().map_or(0, |m| m.len() / rows.max(1));
    let transposed: Vec<Vec<T>>;
    let (vecs, len): (Vec<&[T]>, usize) = match g {
        Granularity::Flat => (w.to_vec(), rows * cols),
        Granularity::Rows => (w.to_vec(), cols),
        Granularity::Cols => {
            transposed = w.iter().map(|m| transpose(m, rows, cols)).collect();
            (transposed.iter().map(Vec::as_slice).collect(), rows)
        }
    };
    let n = (rows * cols).checked_div(len).unwrap_or(0);
    let per_slice = |a: usize| -> Vec<f64> {
        let slice: Vec<&[T]> = vecs.iter().map(|m| &m[a * len..(a + 1) * len]).collect();
        let gram = gram_seq(&slice);
        let mut c = vec![0.0; e * e];
        for i in 0..e {
            for j in 0..e {
                let norms = gram[i][i] * gram[j][j];
                c[i * e + j] = match (i == j, norms > 0.0) {
                    (true, _) => 1.0,
                    (false, true) => gram[i][j] * gram[i][j] / norms,
                    (false, false) => 0.0,
                };
            }
        }
        c
    };
    let sum = (0..n).into_par_iter().map(per_slice).reduce(
        || vec![0.0; e * e],
        |mut acc, c| {
            acc.iter_mut().zip(c).for_each(|(a, v)| *a += v);
            acc
        },
    );
    sum.into_iter().map(|v| v / n.max(1) as f64).collect()
}

#[cfg(test)]
mod tests;
