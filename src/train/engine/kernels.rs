//! The engine's element-wise and row-wise kernels, each with its hand-written
//! backward. Generic over the float type so that the tests can check every
//! backward against float64 finite differences of the same forward.

use num_traits::Float;
use rayon::prelude::*;

/// Rows per parallel task for row-wise kernels.
const ROWS: usize = 16;
/// Elements per parallel task for element-wise kernels.
const ELEMS: usize = 1 << 14;

/// Numbers the engine computes in (f32 for training, f64 for the checks).
pub trait Real:
    Float + Default + Send + Sync + std::iter::Sum + std::fmt::Debug + 'static
{
    fn c(v: f64) -> Self {
        Self::from(v).expect("representable constant")
    }
}
impl Real for f32 {}
impl Real for f64 {}

fn sigmoid<T: Real>(u: T) -> T {
    T::one() / (T::one() + (-u).exp())
}

/// LayerNorm forward over rows of length `d` (eps 1e-5, as PyTorch): writes
/// `y`, and each row's mean and 1/σ for the backward.
pub fn layer_norm<T: Real>(
    x: &[T],
    w: &[T],
    b: Option<&[T]>,
    y: &mut [T],
    mean: &mut [T],
    rstd: &mut [T],
) {
    let d = w.len();
    let inv_d = T::c(1.0 / d as f64);
    y.par_chunks_mut(ROWS * d)
        .zip(x.par_chunks(ROWS * d))
        .zip(mean.par_chunks_mut(ROWS).zip(rstd.par_chunks_mut(ROWS)))
        .for_each(|((y, x), (mean, rstd))| {
            for (r, (y, x)) in y.chunks_exact_mut(d).zip(x.chunks_exact(d)).enumerate() {
                let mu = x.iter().copied().sum::<T>() * inv_d;
                let var = x.iter().map(|&v| (v - mu) * (v - mu)).sum::<T>() * inv_d;
                let rs = T::one() / (var + T::c(1e-5)).sqrt();
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
                let (mut s1, mut s2) = (T::zero(), T::zero());
                for j in 0..d {
                    let g = dy[j] * w[j];
                    s1 = s1 + g;
                    s2 = s2 + g * (x[j] - mu) * rs;
                }
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
    let mut db = db;
    let db_chunks: Vec<Option<&mut [T]>> = match db.as_deref_mut() {
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
        let mut m = T::neg_infinity();
        for &v in &row[..=i] {
            m = m.max(v * scale);
        }
        let mut z = T::zero();
        for v in &mut row[..=i] {
            *v = (*v * scale - m).exp();
            z = z + *v;
        }
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
        let dot: T = a[..=i].iter().zip(&g[..=i]).map(|(&a, &g)| a * g).sum();
        for j in 0..=i {
            g[j] = scale * a[j] * (g[j] - dot);
        }
        g[i + 1..].fill(T::zero());
    }
}

/// h = SiLU(u) = u·σ(u), element-wise.
pub fn silu<T: Real>(u: &[T], h: &mut [T]) {
    h.par_chunks_mut(ELEMS)
        .zip(u.par_chunks(ELEMS))
        .for_each(|(h, u)| {
            for (h, &u) in h.iter_mut().zip(u) {
                *h = u * sigmoid(u);
            }
        });
}

/// Backward of [`silu`] in place: `g` holds ∂L/∂h on entry and ∂L/∂u on return.
pub fn silu_backward<T: Real>(u: &[T], g: &mut [T]) {
    g.par_chunks_mut(ELEMS)
        .zip(u.par_chunks(ELEMS))
        .for_each(|(g, u)| {
            for (g, &u) in g.iter_mut().zip(u) {
                let s = sigmoid(u);
                *g = *g * s * (T::one() + u * (T::one() - s));
            }
        });
}

/// Softmax over rows of length `e`, in place.
pub fn softmax_rows<T: Real>(x: &mut [T], e: usize) {
    for row in x.chunks_exact_mut(e) {
        let m = row.iter().fold(T::neg_infinity(), |m, &v| m.max(v));
        let mut z = T::zero();
        for v in row.iter_mut() {
            *v = (*v - m).exp();
            z = z + *v;
        }
        for v in row.iter_mut() {
            *v = *v / z;
        }
    }
}

/// Cross-entropy over rows of `logits` (n × v), fused with its backward:
/// returns Σ_rows (logsumexp − logit[target]) in f64 and overwrites the
/// logits with `scale · (softmax − onehot(target))`, i.e. ∂(scale·Σ CE)/∂logits.
pub fn cross_entropy<T: Real>(logits: &mut [T], targets: &[u32], v: usize, scale: T) -> f64 {
    logits
        .par_chunks_mut(ROWS * v)
        .zip(targets.par_chunks(ROWS))
        .map(|(rows, targets)| {
            let mut sum = 0.0f64;
            for (row, &y) in rows.chunks_exact_mut(v).zip(targets) {
                let m = row.iter().fold(T::neg_infinity(), |m, &x| m.max(x));
                let mut z = T::zero();
                for x in row.iter_mut() {
                    *x = (*x - m).exp();
                    z = z + *x;
                }
                let p_y = row[y as usize] / z;
                sum += -(p_y.to_f64().unwrap_or(f64::NAN)).ln();
                let f = scale / z;
                for x in row.iter_mut() {
                    *x = *x * f;
                }
                row[y as usize] = row[y as usize] - scale;
            }
            sum
        })
        .sum()
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
            assert!((x - y).abs() <= tol * (1.0 + y.abs()), "{what}[{i}]: {x} vs {y}");
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
            layer_norm(x, w, Some(b), &mut y, &mut m, &mut r);
            y.iter().zip(&c).map(|(y, c)| y * c).sum::<f64>()
        };
        // The forward against its definition.
        let (mut y, mut m, mut r) = (vec![0.0; n * d], vec![0.0; n], vec![0.0; n]);
        layer_norm(&x, &w, Some(&b), &mut y, &mut m, &mut r);
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
                let want = if j <= i { (s[i * t + j] * scale).exp() / z } else { 0.0 };
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
        silu(&u, &mut h);
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
