//! Every granularity and variant against plain float64 loops written here,
//! gradients against central finite differences, chance levels against Monte Carlo.

use super::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const ALL_FORMS: [(Granularity, OrthVariant); 9] = [
    (Granularity::Flat, OrthVariant::Normalized),
    (Granularity::Flat, OrthVariant::Unnormalized),
    (Granularity::Flat, OrthVariant::DetachedNorm),
    (Granularity::Rows, OrthVariant::Normalized),
    (Granularity::Rows, OrthVariant::Unnormalized),
    (Granularity::Rows, OrthVariant::DetachedNorm),
    (Granularity::Cols, OrthVariant::Normalized),
    (Granularity::Cols, OrthVariant::Unnormalized),
    (Granularity::Cols, OrthVariant::DetachedNorm),
];

/// `e` random R × C matrices sharing a common component (so overlaps are far from 0).
fn matrices(e: usize, r: usize, c: usize, seed: u64) -> Vec<Vec<f64>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let common: Vec<f64> = (0..r * c).map(|_| rng.random_range(-1.0..1.0)).collect();
    (0..e)
        .map(|_| {
            common
                .iter()
                .map(|x| 0.7 * x + rng.random_range(-1.0..1.0))
                .collect()
        })
        .collect()
}

/// Element (a, b) of the k-th vector of granularity g, by the definition.
fn vector(m: &[f64], r: usize, c: usize, g: Granularity, k: usize) -> Vec<f64> {
    match g {
        Granularity::Flat => m.to_vec(),
        Granularity::Rows => (0..c).map(|b| m[k * c + b]).collect(),
        Granularity::Cols => (0..r).map(|a| m[a * c + k]).collect(),
    }
}

/// L by the definition, one slice and one pair at a time.
fn loss_by_loop(w: &[Vec<f64>], r: usize, c: usize, g: Granularity, v: OrthVariant) -> f64 {
    loss_with_norms_of(w, w, r, c, g, v)
}

/// L of `w` with the norms taken from `norms_of` (`w` itself, or a fixed
/// point: the detached variant's gradient is the derivative with the norms frozen).
fn loss_with_norms_of(
    w: &[Vec<f64>],
    norms_of: &[Vec<f64>],
    r: usize,
    c: usize,
    g: Granularity,
    v: OrthVariant,
) -> f64 {
    let (n, _) = slices(g, r, c);
    let sq = |m: &[f64], k| vector(m, r, c, g, k).iter().map(|x| x * x).sum::<f64>();
    let mut total = 0.0;
    for k in 0..n {
        for i in 0..w.len() {
            for j in i + 1..w.len() {
                let (a, b) = (vector(&w[i], r, c, g, k), vector(&w[j], r, c, g, k));
                let dot: f64 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
                total += match v {
                    OrthVariant::Unnormalized => dot * dot,
                    _ => dot * dot / (sq(&norms_of[i], k) * sq(&norms_of[j], k)),
                };
            }
        }
    }
    total / n as f64
}

#[test]
fn every_granularity_matches_a_float64_loop() {
    let (e, r, c) = (5, 6, 4);
    let w = matrices(e, r, c, 1);
    let refs: Vec<&[f64]> = w.iter().map(Vec::as_slice).collect();
    for (g, v) in ALL_FORMS {
        let form = OrthForm {
            granularity: g,
            variant: v,
        };
        let got = orth_loss_and_grad(None, &refs, r, form, 0.0);
        let want = loss_by_loop(&w, r, c, g, v);
        assert!(
            (got - want).abs() <= 1e-12 * want.abs().max(1.0),
            "{g} {v}: {got} vs {want}"
        );
        if v == OrthVariant::Normalized {
            let mso = weight_mso(&refs, r, g).unwrap();
            let pairs = (e * (e - 1) / 2) as f64;
            assert!((mso - want / pairs).abs() < 1e-12, "{g} mso");
        }
    }
    // f32 storage, f64 accumulation: the same numbers to f32 precision.
    let w32: Vec<Vec<f32>> = w
        .iter()
        .map(|m| m.iter().map(|&x| x as f32).collect())
        .collect();
    let r32: Vec<&[f32]> = w32.iter().map(Vec::as_slice).collect();
    for g in Granularity::ALL {
        let (a, b) = (
            weight_mso(&r32, r, *g).unwrap(),
            weight_mso(&refs, r, *g).unwrap(),
        );
        assert!((a - b).abs() < 1e-6, "{g}");
    }
}

/// The gradient of every variant at every granularity against central
/// differences of the loop above (the detached variant's gradient is, by its
/// definition, not the derivative of its value: checked against the
/// derivative with the norms frozen at the current point).
#[test]
fn gradients_match_finite_differences() {
    let (e, r, c) = (4, 5, 3);
    let w = matrices(e, r, c, 2);
    let lambda = 0.7;
    for (g, v) in ALL_FORMS {
        let form = OrthForm {
            granularity: g,
            variant: v,
        };
        let mut grads = vec![vec![0.0f64; r * c]; e];
        let refs: Vec<&[f64]> = w.iter().map(Vec::as_slice).collect();
        orth_loss_and_grad(
            Some(grads.iter_mut().map(Vec::as_mut_slice).collect()),
            &refs,
            r,
            form,
            lambda,
        );
        let h = 1e-6;
        for i in 0..e {
            for q in [0, r * c / 2, r * c - 1] {
                let at = |delta: f64| {
                    let mut p = w.clone();
                    p[i][q] += delta;
                    match v {
                        OrthVariant::DetachedNorm => loss_with_norms_of(&p, &w, r, c, g, v),
                        _ => loss_by_loop(&p, r, c, g, v),
                    }
                };
                let fd = lambda * (at(h) - at(-h)) / (2.0 * h);
                let got = grads[i][q];
                assert!(
                    (got - fd).abs() <= 1e-6 * fd.abs().max(1e-3),
                    "{g} {v} [{i}][{q}]: {got} vs {fd}"
                );
            }
        }
    }
}

/// E[MSO] of independent Gaussian matrices is 1/L at every granularity.
#[test]
fn chance_levels_match_monte_carlo() {
    let (e, r, c) = (6, 12, 20);
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let normal = |rng: &mut ChaCha8Rng| -> f64 {
        // Box–Muller.
        let (u1, u2): (f64, f64) = (rng.random_range(1e-12..1.0), rng.random_range(0.0..1.0));
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    };
    for g in Granularity::ALL {
        let draws = 300;
        let mut sum = 0.0;
        for _ in 0..draws {
            let w: Vec<Vec<f64>> = (0..e)
                .map(|_| (0..r * c).map(|_| normal(&mut rng)).collect())
                .collect();
            let refs: Vec<&[f64]> = w.iter().map(Vec::as_slice).collect();
            sum += weight_mso(&refs, r, *g).unwrap();
        }
        let (mc, chance) = (sum / draws as f64, chance_level(*g, r, c));
        assert!(
            (mc / chance - 1.0).abs() < 0.06,
            "{g}: Monte Carlo {mc} vs chance {chance}"
        );
    }
}

#[test]
fn a_router_row_has_no_columns() {
    let w = [vec![1.0f64, 2.0, 3.0], vec![3.0, 1.0, 0.5]];
    let refs: Vec<&[f64]> = w.iter().map(Vec::as_slice).collect();
    assert!(weight_mso(&refs, 1, Granularity::Cols).is_none());
    assert_eq!(
        weight_mso(&refs, 1, Granularity::Rows),
        weight_mso(&refs, 1, Granularity::Flat)
    );
}

#[test]
fn pair_overlap_matches_a_loop_per_pair_and_averages_to_the_mso() {
    let (e, r, c) = (4, 5, 3);
    let w = matrices(e, r, c, 11);
    let refs: Vec<&[f64]> = w.iter().map(Vec::as_slice).collect();
    for g in [Granularity::Flat, Granularity::Rows, Granularity::Cols] {
        let m = pair_overlap(&refs, r, g);
        let mut off_diagonal = 0.0;
        for i in 0..e {
            assert_eq!(m[i * e + i], 1.0);
            for j in (0..e).filter(|&j| j != i) {
                let pair = [w[i].clone(), w[j].clone()];
                let want = loss_by_loop(&pair, r, c, g, OrthVariant::Normalized);
                assert!((m[i * e + j] - want).abs() < 1e-12, "{g:?} ({i}, {j})");
                off_diagonal += m[i * e + j];
            }
        }
        let mso = weight_mso(&refs, r, g).unwrap();
        assert!(
            (off_diagonal / (e * (e - 1)) as f64 - mso).abs() < 1e-12,
            "{g:?}"
        );
    }
}
