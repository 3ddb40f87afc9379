//! Numeric kernels on slices, each with its hand-written backward: LayerNorm,
//! causal softmax, SiLU, row softmax, cross-entropy, top-k routing, and the
//! strided matrix product ([`gemm`]).
//!
//! One implementation serves both executors: the autodiff model's candle
//! custom ops (`model::fused`, f32 or f64 storage) and the fused training
//! engine (`train::engine`). Generic over the float type so that the tests can
//! check every backward against float64 finite differences of the same forward.

pub mod gemm;

use num_traits::Float;
use rayon::prelude::*;

/// Rows per parallel task for row-wise kernels.
const ROWS: usize = 16;
/// Elements per parallel task for element-wise kernels.
const ELEMS: usize = 1 << 14;

/// Numbers the engine computes in (f32 for training, f64 for the checks).
pub trait Real:
    Float + Default + Into<f64> + Send + Sync + std::iter::Sum + std::fmt::Debug + 'static
{
    fn c(v: f64) -> Self {
        Self::from(v).expect("representable constant")
    }
    /// eˣ for the hot loops: exact for f64 (the checks), a branch-free
    /// polynomial for f32 that the compiler vectorises.
    fn exp_fast(self) -> Self {
        self.exp()
    }
}
impl Real for f32 {
    /// eˣ = 2ⁿ·eʳ with n = round(x/ln 2), |r| ≤ ln2/2, eʳ by its degree-6
    /// Taylor polynomial: relative error below 3e-7 (tested), inputs clamped
    /// to [−87, 88] (results below e⁻⁸⁷ ≈ 1.6e-38 are not flushed to 0), NaN kept.
    #[inline(always)]
    fn exp_fast(self) -> f32 {
        const LOG2E: f32 = std::f32::consts::LOG2_E;
        const LN2_HI: f32 = 0.693_145_75;
        const LN2_LO: f32 = 1.428_606_8e-6;
        let x = self.clamp(-87.0, 88.0);
        let n = (x * LOG2E).round_ties_even();
        let r = x - n * LN2_HI - n * LN2_LO;
        let p = 1.0
            + r * (1.0
                + r * (0.5
                    + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
        p * f32::from_bits(((n as i32 + 127) << 23) as u32)
    }
}
impl Real for f64 {}

#[inline(always)]
fn sigmoid<T: Real>(u: T) -> T {
    T::one() / (T::one() + (-u).exp_fast())
}

/// Lanes of the reductions below: independent partial results that the
/// compiler keeps in one SIMD register (a float sum is not reassociated
/// otherwise, so a plain loop would stay scalar).
const LANES: usize = 16;

/// Σ f(x), in `LANES` independent partial sums.
#[inline(always)]
fn sum_map<T: Real>(x: &[T], f: impl Fn(T) -> T) -> T {
    let mut acc = [T::zero(); LANES];
    let mut it = x.chunks_exact(LANES);
    for c in &mut it {
        for i in 0..LANES {
            acc[i] = acc[i] + f(c[i]);
        }
    }
    it.remainder()
        .iter()
        .fold(acc.iter().copied().sum::<T>(), |s, &v| s + f(v))
}

/// Σ x.
#[inline(always)]
pub fn sum<T: Real>(x: &[T]) -> T {
    sum_map(x, |v| v)
}

/// Σ (x − μ)².
#[inline(always)]
pub fn sum_sq_dev<T: Real>(x: &[T], mu: T) -> T {
    sum_map(x, |v| (v - mu) * (v - mu))
}

/// Σ a·b.
#[inline(always)]
pub fn dot<T: Real>(a: &[T], b: &[T]) -> T {
    let mut acc = [T::zero(); LANES];
    let (mut ia, mut ib) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    for (ca, cb) in (&mut ia).zip(&mut ib) {
        for i in 0..LANES {
            acc[i] = acc[i] + ca[i] * cb[i];
        }
    }
    let tail = ia
        .remainder()
        .iter()
        .zip(ib.remainder())
        .fold(T::zero(), |s, (&x, &y)| s + x * y);
    acc.iter().copied().sum::<T>() + tail
}

/// max x (−∞ for an empty slice; NaN if any is NaN).
#[inline(always)]
pub fn max<T: Real>(x: &[T]) -> T {
    let mut acc = [T::neg_infinity(); LANES];
    let mut it = x.chunks_exact(LANES);
    let mut nan = false;
    for c in &mut it {
        for i in 0..LANES {
            nan |= c[i].is_nan();
            acc[i] = if c[i] > acc[i] { c[i] } else { acc[i] };
        }
    }
    for &v in it.remainder() {
        nan |= v.is_nan();
        acc[0] = if v > acc[0] { v } else { acc[0] };
    }
    if nan {
        return T::nan();
    }
    acc.iter()
        .fold(T::neg_infinity(), |m, &v| if v > m { v } else { m })
}

/// x ← exp(x − m) in place, then Σ of the results.
#[inline(always)]
fn exp_shifted_sum<T: Real>(x: &mut [T], m: T) -> T {
    for v in x.iter_mut() {
        *v = (*v - m).exp_fast();
    }
    sum(x)
}

/// Mean and 1/√(σ² + eps) of one row.
#[inline(always)]
fn row_stats<T: Real>(x: &[T], eps: T) -> (T, T) {
    let inv_d = T::c(1.0 / x.len() as f64);
    let mu = sum(x) * inv_d;
    let var = sum_sq_dev(x, mu) * inv_d;
    (mu, T::one() / (var + eps).sqrt())
}

/// LayerNorm's statistics alone: each row's mean and 1/σ (what
/// [`layer_norm`] keeps for the backward), for callers that did not keep them.
pub fn layer_norm_stats<T: Real>(x: &[T], d: usize, eps: f64, mean: &mut [T], rstd: &mut [T]) {
    let eps = T::c(eps);
    mean.par_iter_mut()
        .zip(rstd.par_iter_mut())
        .zip(x.par_chunks(d))
        .for_each(|((mu, rs), x)| (*mu, *rs) = row_stats(x, eps));
}

/// LayerNorm forward over rows of length `d` = `w.len()` (PyTorch uses eps
/// 1e-5): writes `y`, and each row's mean and 1/σ for the backward.
pub fn layer_norm<T: Real>(
    x: &[T],
    w: &[T],
    b: Option<&[T]>,
    eps: f64,
    y: &mut [T],
    mean: &mut [T],
    rstd: &mut [T],
) {
    let d = w.len();
    let eps = T::c(eps);
    y.par_chunks_mut(ROWS * d)
        .zip(x.par_chunks(ROWS * d))
        .zip(mean.par_chunks_mut(ROWS).zip(rstd.par_chunks_mut(ROWS)))
        .for_each(|((y, x), (mean, rstd))| {
            for (r, (y, x)) in y.chunks_exact_mut(d).zip(x.chunks_exact(d)).enumerate() {
                let (mu, rs) = row_stats(x, eps);
                mean[r] = mu;
                rstd[r] = rs;
                for j in 0..d {
                    let h = (x[j] - mu) * rs * w[j];
                    y[j] = match b {
                        Some(b) => h + b[j],
                        None => h,
                    };
                }
            }
        });
}

/// LayerNorm backward: `dx += ∂L/∂x`; `dw`, `db` are written (or added to
/// with `acc`).
#[allow(clippy::too_many_arguments)]
pub fn layer_norm_backward<T: Real>(
    dy: &[T],
    x: &[T],
    mean: &[T],
    rstd: &[T],
    w: &[T],
    dx: &mut [T],
    dw: &mut [T],
    db: Option<&mut [T]>,
    acc: bool,
) {
    let d = w.len();
    let inv_d = T::c(1.0 / d as f64);
    dx.par_chunks_mut(ROWS * d)
        .zip(dy.par_chunks(ROWS * d).zip(x.par_chunks(ROWS * d)))
        .zip(mean.par_chunks(ROWS).zip(rstd.par_chunks(ROWS)))
        .for_each(|((dx, (dy, x)), (mean, rstd))| {
            for r in 0..mean.len() {
                let (dy, x, dx) = (
                    &dy[r * d..(r + 1) * d],
                    &x[r * d..(r + 1) * d],
                    &mut dx[r * d..(r + 1) * d],
                );
                let (mu, rs) = (mean[r], rstd[r]);
                // dx̂ = dy·w;  dx = rstd·(dx̂ − mean(dx̂) − x̂·mean(dx̂·x̂))
                // with Σ dx̂·x̂ = rstd·(Σ dx̂·x − μ·Σ dx̂).
                let mut s1 = [T::zero(); LANES];
                let mut s2 = [T::zero(); LANES];
                let full = d / LANES * LANES;
                for j0 in (0..full).step_by(LANES) {
                    for i in 0..LANES {
                        let g = dy[j0 + i] * w[j0 + i];
                        s1[i] = s1[i] + g;
                        s2[i] = s2[i] + g * x[j0 + i];
                    }
                }
                let (mut s1, mut s2) =
                    (s1.iter().copied().sum::<T>(), s2.iter().copied().sum::<T>());
                for j in full..d {
                    let g = dy[j] * w[j];
                    s1 = s1 + g;
                    s2 = s2 + g * x[j];
                }
                let s2 = rs * (s2 - mu * s1);
                let (m1, m2) = (s1 * inv_d, s2 * inv_d);
                for j in 0..d {
                    let xh = (x[j] - mu) * rs;
                    dx[j] = dx[j] + rs * (dy[j] * w[j] - m1 - xh * m2);
                }
            }
        });
    // Parameter gradients: columns split over threads, rows read in order.
    let n = mean.len();
    let cols = d.div_ceil(rayon::current_num_threads().max(1)).max(64);
    let db_chunks: Vec<Option<&mut [T]>> = match db {
        Some(db) => db.chunks_mut(cols).map(Some).collect(),
        None => (0..d.div_ceil(cols)).map(|_| None).collect(),
    };
    dw.par_chunks_mut(cols)
        .zip(db_chunks)
        .enumerate()
        .for_each(|(c, (dw, mut db))| {
            let j0 = c * cols;
            if !acc {
                dw.fill(T::zero());
                if let Some(db) = db.as_deref_mut() {
                    db.fill(T::zero());
                }
            }
            for i in 0..n {
                let (mu, rs) = (mean[i], rstd[i]);
                let dy = &dy[i * d + j0..i * d + j0 + dw.len()];
                let x = &x[i * d + j0..i * d + j0 + dw.len()];
                for j in 0..dw.len() {
                    dw[j] = dw[j] + dy[j] * (x[j] - mu) * rs;
                }
                if let Some(db) = db.as_deref_mut() {
                    for j in 0..db.len() {
                        db[j] = db[j] + dy[j];
                    }
                }
            }
        });
}

/// Causal softmax of a (t × t) score block in place: row i keeps columns ≤ i,
/// scaled by `scale`; the masked upper triangle becomes 0.
pub fn causal_softmax<T: Real>(s: &mut [T], t: usize, scale: T) {
    for (i, row) in s.chunks_exact_mut(t).enumerate() {
        let live = &mut row[..=i];
        for v in live.iter_mut() {
            *v = *v * scale;
        }
        let m = max(live);
        let z = exp_shifted_sum(live, m);
        let inv = T::one() / z;
        for v in &mut row[..=i] {
            *v = *v * inv;
        }
        row[i + 1..].fill(T::zero());
    }
}

/// Backward of [`causal_softmax`]: `g` holds ∂L/∂att on entry and ∂L/∂scores
/// on return.
pub fn causal_softmax_backward<T: Real>(att: &[T], g: &mut [T], t: usize, scale: T) {
    for (i, (a, g)) in att.chunks_exact(t).zip(g.chunks_exact_mut(t)).enumerate() {
        let dt = dot(&a[..=i], &g[..=i]);
        for j in 0..=i {
            g[j] = scale * a[j] * (g[j] - dt);
        }
        g[i + 1..].fill(T::zero());
    }
}

/// h = SiLU(u) = u·σ(u), element-wise, on the calling thread (the engine
/// runs it inside each expert's task).
pub fn silu_seq<T: Real>(u: &[T], h: &mut [T]) {
    for (h, &u) in h.iter_mut().zip(u) {
        *h = u * sigmoid(u);
    }
}

/// Backward of [`silu_seq`] in place, in parallel: `g` holds ∂L/∂h on entry and ∂L/∂u on return.
pub fn silu_backward<T: Real>(u: &[T], g: &mut [T]) {
    g.par_chunks_mut(ELEMS)
        .zip(u.par_chunks(ELEMS))
        .for_each(|(g, u)| silu_backward_seq(u, g));
}

/// [`silu_backward`] on the calling thread.
pub fn silu_backward_seq<T: Real>(u: &[T], g: &mut [T]) {
    for (g, &u) in g.iter_mut().zip(u) {
        let s = sigmoid(u);
        *g = *g * s * (T::one() + u * (T::one() - s));
    }
}

/// Softmax over rows of length `e`, in place.
pub fn softmax_rows<T: Real>(x: &mut [T], e: usize) {
    for row in x.chunks_exact_mut(e) {
        let m = max(row);
        let z = exp_shifted_sum(row, m);
        for v in row.iter_mut() {
            *v = *v / z;
        }
    }
}

/// One row of the cross-entropy, fused with its backward: returns
/// logsumexp(row) − row[y] (in f64) and overwrites the row with
/// `scale · (softmax(row) − onehot(y))`.
#[inline(always)]
fn cross_entropy_row<T: Real>(row: &mut [T], y: usize, scale: T) -> f64 {
    let x_y = row[y];
    let m = max(row);
    let z = exp_shifted_sum(row, m);
    let f = scale / z;
    for x in row.iter_mut() {
        *x = *x * f;
    }
    row[y] = row[y] - scale;
    (m - x_y).into() + z.into().ln()
}

/// Cross-entropy over rows of `logits` (n × v), fused with its backward:
/// returns Σ_rows (logsumexp − logit[target]) in f64 and overwrites the
/// logits with `scale · (softmax − onehot(target))`, i.e. ∂(scale·Σ CE)/∂logits.
pub fn cross_entropy<T: Real>(logits: &mut [T], targets: &[u32], v: usize, scale: T) -> f64 {
    logits
        .par_chunks_mut(ROWS * v)
        .zip(targets.par_chunks(ROWS))
        .map(|(rows, targets)| {
            rows.chunks_exact_mut(v)
                .zip(targets)
                .map(|(row, &y)| cross_entropy_row(row, y as usize, scale))
                .sum::<f64>()
        })
        .collect::<Vec<f64>>()
        .iter()
        .sum() // fixed order: the same loss on every run
}

/// Per-row cross-entropy without the backward: `loss[i] = logsumexp(row_i) −
/// row_i[targets[i]]` for logits (n × v), logits untouched.
pub fn cross_entropy_rows<T: Real>(logits: &[T], targets: &[u32], v: usize, loss: &mut [T]) {
    loss.par_iter_mut()
        .zip(logits.par_chunks(v).zip(targets.par_iter()))
        .for_each(|(l, (row, &y))| {
            let m = max(row);
            let z = sum_map(row, |x| (x - m).exp_fast());
            *l = m + z.ln() - row[y as usize];
        });
}

/// Backward of [`cross_entropy_rows`]: `dlogits` row i is written with
/// `g[i] · (softmax(row_i) − onehot(targets[i]))`.
pub fn cross_entropy_rows_backward<T: Real>(
    logits: &[T],
    targets: &[u32],
    g: &[T],
    dlogits: &mut [T],
) {
    let v = logits.len() / g.len().max(1);
    dlogits
        .par_chunks_mut(v)
        .zip(logits.par_chunks(v))
        .zip(targets.par_iter().zip(g.par_iter()))
        .for_each(|((out, row), (&y, &g))| {
            out.copy_from_slice(row);
            cross_entropy_row(out, y as usize, g);
        });
}

/// The `sel.len()` largest entries of `row`, largest first, ties to the lower
/// index (the routing rule of SPEC.md, shared by the model and the engine).
pub fn top_k<T: Real>(row: &[T], sel: &mut [u32]) {
    let k = sel.len();
    debug_assert!(k <= row.len(), "top-{k} of {} entries", row.len());
    let mut len = 0;
    for (x, &v) in row.iter().enumerate() {
        // Insert after every kept entry ≥ v: equal values keep index order.
        let mut pos = len;
        while pos > 0 && row[sel[pos - 1] as usize] < v {
            pos -= 1;
        }
        if pos < k {
            let end = len.min(k - 1);
            sel.copy_within(pos..end, pos + 1);
            sel[pos] = x as u32;
            len = (len + 1).min(k);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn rand_vec(n: usize, seed: u64) -> Vec<f64> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        (0..n).map(|_| rng.random_range(-1.0..1.0)).collect()
    }

    /// Central finite differences of `f` at `x`, step 1e-6.
    fn fd(x: &[f64], f: impl Fn(&[f64]) -> f64) -> Vec<f64> {
        let h = 1e-6;
        (0..x.len())
            .map(|i| {
                let (mut a, mut b) = (x.to_vec(), x.to_vec());
                a[i] += h;
                b[i] -= h;
                (f(&a) - f(&b)) / (2.0 * h)
            })
            .collect()
    }

    fn close(a: &[f64], b: &[f64], tol: f64, what: &str) {
        assert_eq!(a.len(), b.len());
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!(
                (x - y).abs() <= tol * (1.0 + y.abs()),
                "{what}[{i}]: {x} vs {y}"
            );
        }
    }

    /// L = Σ c ⊙ LN(x) for fixed random c: checks dx, dw, db.
    #[test]
    fn layer_norm_backward_matches_finite_differences() {
        let (n, d) = (37, 6); // more rows than one task, a ragged last task
        let x = rand_vec(n * d, 1);
        let w: Vec<f64> = rand_vec(d, 2).iter().map(|v| 1.0 + v).collect();
        let b = rand_vec(d, 3);
        let c = rand_vec(n * d, 4);
        let loss = |x: &[f64], w: &[f64], b: &[f64]| {
            let (mut y, mut m, mut r) = (vec![0.0; n * d], vec![0.0; n], vec![0.0; n]);
            layer_norm(x, w, Some(b), 1e-5, &mut y, &mut m, &mut r);
            y.iter().zip(&c).map(|(y, c)| y * c).sum::<f64>()
        };
        // The forward against its definition.
        let (mut y, mut m, mut r) = (vec![0.0; n * d], vec![0.0; n], vec![0.0; n]);
        layer_norm(&x, &w, Some(&b), 1e-5, &mut y, &mut m, &mut r);
        let (mut m2, mut r2) = (vec![0.0; n], vec![0.0; n]);
        layer_norm_stats(&x, d, 1e-5, &mut m2, &mut r2);
        assert_eq!((&m2, &r2), (&m, &r));
        for i in 0..n {
            let row = &x[i * d..(i + 1) * d];
            let mu = row.iter().sum::<f64>() / d as f64;
            let var = row.iter().map(|v| (v - mu).powi(2)).sum::<f64>() / d as f64;
            for j in 0..d {
                let want = (row[j] - mu) / (var + 1e-5).sqrt() * w[j] + b[j];
                assert!((y[i * d + j] - want).abs() < 1e-12);
            }
        }
        let mut dx = vec![0.25; n * d]; // dx accumulates onto what is there
        let (mut dw, mut db) = (vec![9.0; d], vec![9.0; d]); // written, not added
        layer_norm_backward(&c, &x, &m, &r, &w, &mut dx, &mut dw, Some(&mut db), false);
        let dx: Vec<f64> = dx.iter().map(|v| v - 0.25).collect();
        close(&dx, &fd(&x, |x| loss(x, &w, &b)), 1e-7, "dx");
        close(&dw, &fd(&w, |w| loss(&x, w, &b)), 1e-7, "dw");
        close(&db, &fd(&b, |b| loss(&x, &w, b)), 1e-7, "db");
        // With acc the parameter gradients add up.
        let mut dx2 = vec![0.0; n * d];
        layer_norm_backward(&c, &x, &m, &r, &w, &mut dx2, &mut dw, None, true);
        close(
            &dw,
            &fd(&w, |w| 2.0 * loss(&x, w, &b)),
            1e-7,
            "dw accumulated",
        );
    }

    #[test]
    fn causal_softmax_backward_matches_finite_differences() {
        let t = 5;
        let s = rand_vec(t * t, 5);
        let c = rand_vec(t * t, 6);
        let scale = 0.7;
        let loss = |s: &[f64]| {
            let mut a = s.to_vec();
            causal_softmax(&mut a, t, scale);
            a.iter().zip(&c).map(|(a, c)| a * c).sum::<f64>()
        };
        let mut a = s.clone();
        causal_softmax(&mut a, t, scale);
        for i in 0..t {
            let z: f64 = (0..=i).map(|j| (s[i * t + j] * scale).exp()).sum();
            for j in 0..t {
                let want = if j <= i {
                    (s[i * t + j] * scale).exp() / z
                } else {
                    0.0
                };
                assert!((a[i * t + j] - want).abs() < 1e-12);
            }
        }
        let mut g = c.clone();
        causal_softmax_backward(&a, &mut g, t, scale);
        close(&g, &fd(&s, loss), 1e-7, "dscores");
    }

    #[test]
    fn silu_backward_matches_finite_differences() {
        let u: Vec<f64> = rand_vec(40_000, 7).iter().map(|v| 6.0 * v).collect(); // > one task
        let c = rand_vec(u.len(), 8);
        let mut h = vec![0.0; u.len()];
        silu_seq(&u, &mut h);
        for (h, u) in h.iter().zip(&u) {
            assert!((h - u / (1.0 + (-u).exp())).abs() < 1e-12);
        }
        let mut g = c.clone();
        silu_backward(&u, &mut g);
        let step = 1e-6;
        for i in (0..u.len()).step_by(997) {
            let f = |v: f64| c[i] * v / (1.0 + (-v).exp());
            let want = (f(u[i] + step) - f(u[i] - step)) / (2.0 * step);
            assert!((g[i] - want).abs() < 1e-7, "du[{i}]");
        }
    }

    #[test]
    fn cross_entropy_matches_definition_and_finite_differences() {
        let (n, v) = (19, 7);
        let z: Vec<f64> = rand_vec(n * v, 9).iter().map(|x| 5.0 * x).collect();
        let y: Vec<u32> = (0..n as u32).map(|i| (i * 3) % v as u32).collect();
        let scale = 1.0 / n as f64;
        let loss = |z: &[f64]| -> f64 {
            (0..n)
                .map(|i| {
                    let r = &z[i * v..(i + 1) * v];
                    r.iter().map(|x| x.exp()).sum::<f64>().ln() - r[y[i] as usize]
                })
                .sum::<f64>()
        };
        let mut g = z.clone();
        let total = cross_entropy(&mut g, &y, v, scale);
        assert!((total - loss(&z)).abs() < 1e-10);
        close(&g, &fd(&z, |z| scale * loss(z)), 1e-7, "dlogits");
    }

    #[test]
    fn row_wise_cross_entropy_matches_the_fused_one() {
        let (n, v) = (5, 9);
        let z: Vec<f64> = rand_vec(n * v, 11).iter().map(|x| 5.0 * x).collect();
        let y: Vec<u32> = (0..n as u32).map(|i| (i * 2) % v as u32).collect();
        let g = rand_vec(n, 12);
        let mut loss = vec![0.0; n];
        cross_entropy_rows(&z, &y, v, &mut loss);
        let mut dz = vec![0.0; n * v];
        cross_entropy_rows_backward(&z, &y, &g, &mut dz);
        for i in 0..n {
            let mut row = z[i * v..(i + 1) * v].to_vec();
            let want = cross_entropy(&mut row, &y[i..=i], v, g[i]);
            assert!((loss[i] - want).abs() < 1e-12);
            close(&dz[i * v..(i + 1) * v], &row, 1e-15, "dlogits");
        }
    }

    #[test]
    fn top_k_is_largest_first_with_ties_to_the_lower_index() {
        let mut sel = [0u32; 2];
        top_k(&[0.1, 0.4, 0.4, 0.1], &mut sel);
        assert_eq!(sel, [1, 2]);
        let mut sel = [0u32; 3];
        top_k(&[0.25f32; 4], &mut sel);
        assert_eq!(sel, [0, 1, 2]);
        let mut sel = [0u32; 4];
        top_k(&[0.3, 0.1, 0.5, 0.2], &mut sel);
        assert_eq!(sel, [2, 0, 3, 1]);
        // Against a stable sort, on random rows with repeated values.
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(13);
        for _ in 0..200 {
            let row: Vec<f64> = (0..7).map(|_| rng.random_range(0..4) as f64).collect();
            let mut idx: Vec<u32> = (0..7).collect();
            idx.sort_by(|&a, &b| row[b as usize].total_cmp(&row[a as usize]));
            let mut sel = [0u32; 3];
            top_k(&row, &mut sel);
            assert_eq!(sel[..], idx[..3], "{row:?}");
        }
    }

    #[test]
    fn exp_fast_is_accurate_in_f32() {
        let mut worst = 0.0f64;
        for i in 0..=200_000 {
            let x = -87.0 + 175.0 * i as f64 / 200_000.0;
            let got = (x as f32).exp_fast() as f64;
            let want = (x as f32 as f64).exp();
            worst = worst.max(((got - want) / want).abs());
        }
        assert!(worst < 3e-7, "worst relative error {worst}");
        assert!(f32::NAN.exp_fast().is_nan());
        assert_eq!(0.0f32.exp_fast(), 1.0);
    }

    #[test]
    fn softmax_rows_matches_definition() {
        let x = rand_vec(12, 10);
        let mut p = x.clone();
        softmax_rows(&mut p, 4);
        for r in 0..3 {
            let z: f64 = x[r * 4..r * 4 + 4].iter().map(|v| v.exp()).sum();
            for j in 0..4 {
                assert!((p[r * 4 + j] - x[r * 4 + j].exp() / z).abs() < 1e-12);
            }
        }
    }
}
