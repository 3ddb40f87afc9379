//! The second study's like-for-like comparison (docs/MEASURES.md, "Pair sets"
//! and "Nulls"): pair sets against float64 loops written here, the subspace
//! permutation null on planted subspaces, and gate-weighted PCA against a
//! float64 weighted covariance.

mod common;

use candle_core::{DType, Device, Tensor};
use common::reference::{cos2, expert_ref, router_probs, rows, top_k};
use moescope::config::{ModelConfig, RankRule, Routing};
use moescope::measures::analyze::{GeometryOptions, LayerAnalyzer};
use moescope::measures::jacobian::{
    layer_jacobian, JacobianInputs, JacobianMode, JacobianSettings,
};
use moescope::measures::pairs::PairWeights;
use moescope::measures::subspace::{layer_subspaces, Moments, PermutationNull};
use moescope::measures::LayerAccumulator;
use moescope::model::moe::top_k_rows;
use moescope::model::moe::{Expert, MoeLayer};
use moescope::model::params::ParamStore;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn layer(routing: Routing, k: usize) -> (MoeLayer, ModelConfig) {
    let cfg = ModelConfig {
        d_model: 6,
        d_ff: 9,
        n_experts: 4,
        top_k: k,
        routing,
        ..common::micro_model()
    };
    let mut ps = ParamStore::new(DType::F64, &Device::Cpu, 11);
    (MoeLayer::new(&mut ps, "moe", &cfg, 0.6, 0.6).unwrap(), cfg)
}

/// Central finite-difference Jacobian of f_e at x (d × d), from expert_ref.
fn fd_jacobian(e: &Expert, x: &[f64]) -> Vec<f64> {
    let d = x.len();
    let h = 1e-5;
    let mut j = vec![0.0; d * d];
    for c in 0..d {
        let (mut a, mut b) = (x.to_vec(), x.to_vec());
        a[c] += h;
        b[c] -= h;
        let (ya, yb) = (expert_ref(e, &a), expert_ref(e, &b));
        for r in 0..d {
            j[r * d + c] = (ya[r] - yb[r]) / (2.0 * h);
        }
    }
    j
}

fn align(a: &[f64], b: &[f64]) -> f64 {
    let dot = |p: &[f64], q: &[f64]| p.iter().zip(q).map(|(x, y)| x * y).sum::<f64>();
    dot(a, b) / (dot(a, a) * dot(b, b)).sqrt()
}

/// The three pair-set means of a per-(token, pair) value, by the definitions.
fn sets_ref(
    value: &dyn Fn(usize, usize, usize) -> f64,
    probs: &[Vec<f64>],
    routed: &[Vec<usize>],
) -> [Option<f64>; 3] {
    let e = probs[0].len();
    let n = probs.len();
    let mut out = [(0.0, 0usize); 3];
    for t in 0..n {
        let (mut r, mut rn) = (0.0, 0.0);
        let (mut a, mut an) = (0.0, 0.0);
        let (mut g, mut gn) = (0.0, 0.0);
        for i in 0..e {
            for j in i + 1..e {
                let v = value(t, i, j);
                if routed[t].contains(&i) && routed[t].contains(&j) {
                    r += v;
                    rn += 1.0;
                }
                a += v;
                an += 1.0;
                let w = probs[t][i] * probs[t][j];
                g += w * v;
                gn += w;
            }
        }
        for (s, (sum, den)) in [(r, rn), (a, an), (g, gn)].into_iter().enumerate() {
            if den > 0.0 {
                out[s].0 += sum / den;
                out[s].1 += 1;
            }
        }
    }
    out.map(|(s, c)| (c > 0).then(|| s / c as f64))
}

fn close(got: Option<f64>, want: Option<f64>, tol: f64, what: &str) {
    match (got, want) {
        (Some(g), Some(w)) => assert!((g - w).abs() < tol, "{what}: {g} vs {w}"),
        (None, None) => {}
        _ => panic!("{what}: {got:?} vs {want:?}"),
    }
}

/// Activation MSO and Jacobian alignment under routed / all / gate_weighted,
/// for top-1, top-2 and soft routing (routed = top-2 by gate), against loops.
#[test]
fn pair_sets_match_float64_loops() {
    for (routing, k) in [(Routing::Topk, 1), (Routing::Topk, 2), (Routing::Soft, 2)] {
        let (moe, c) = layer(routing, k);
        let e = c.n_experts;
        let n = 23;
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let xv: Vec<f64> = (0..n * c.d_model)
            .map(|_| rng.random::<f64>() * 2.0 - 1.0)
            .collect();
        let x = Tensor::from_vec(xv, (n, c.d_model), &Device::Cpu).unwrap();
        let (_, cap) = moe.forward(&x, true).unwrap();
        let cap = cap.unwrap();

        // Reference: probabilities, routed experts (top-k; soft: top-k by gate), outputs, Jacobians.
        let xs = rows(&x);
        let wr = rows(&moe.router.weight);
        let probs: Vec<Vec<f64>> = xs.iter().map(|xt| router_probs(&wr, xt)).collect();
        let routed: Vec<Vec<usize>> = probs.iter().map(|p| top_k(p, k)).collect();
        let h: Vec<Vec<Vec<f64>>> = xs
            .iter()
            .map(|xt| moe.experts.iter().map(|ex| expert_ref(ex, xt)).collect())
            .collect();
        let jac: Vec<Vec<Vec<f64>>> = xs
            .iter()
            .map(|xt| moe.experts.iter().map(|ex| fd_jacobian(ex, xt)).collect())
            .collect();
        let act_want = sets_ref(&|t, i, j| cos2(&h[t][i], &h[t][j]), &probs, &routed);
        let jac_want = sets_ref(&|t, i, j| align(&jac[t][i], &jac[t][j]), &probs, &routed);

        // moescope: the analyzer's selection (reference top-k under soft routing) and pair weights.
        let reference_k = (routing == Routing::Soft).then_some(k);
        let (sel, slots) = match reference_k {
            Some(rk) => (top_k_rows(&cap.probs, e, rk), rk),
            None => (cap.selected.clone(), cap.k),
        };
        let pairs: Vec<PairWeights> = (0..n)
            .map(|t| {
                PairWeights::new(
                    &sel[t * slots..(t + 1) * slots],
                    &cap.probs[t * e..(t + 1) * e],
                )
            })
            .collect();
        let mut acc = LayerAccumulator::new(e, cap.k);
        if let Some(rk) = reference_k {
            acc = acc.with_reference_k(rk);
        }
        acc.add(&cap).unwrap();
        let outs = moe.every_expert_output(&x).unwrap();
        acc.add_all_pairs(&outs, c.d_model, &pairs);
        let act = acc.act_sets();
        let what = format!("{routing:?} k={k}");
        let tol = 2e-6; // f32 host copies of the outputs
        close(
            act.routed.map(|m| m.mean),
            act_want[0],
            tol,
            &format!("{what} act routed"),
        );
        close(
            act.all.map(|m| m.mean),
            act_want[1],
            tol,
            &format!("{what} act all"),
        );
        close(
            act.gate_weighted.map(|m| m.mean),
            act_want[2],
            tol,
            &format!("{what} act gate_weighted"),
        );
        // The routed activation MSO logged in training is the same number.
        close(
            acc.act_mso().ok(),
            act_want[0],
            tol,
            &format!("{what} act_mso"),
        );

        let input = JacobianInputs {
            x: &x,
            selected: &sel,
            k: slots,
            probs: &cap.probs,
        };
        let settings = JacobianSettings {
            mode: JacobianMode::Exact,
            precision: moescope::measures::jacobian::Precision::F64,
            all_pairs: true,
            spectra_tokens: 0,
            top_sv: 1,
            seed: 0,
            null_draws: 5,
            null_init_tokens: 4,
        };
        let r = layer_jacobian(&moe, &input, &settings).unwrap().unwrap();
        let tol = 1e-6; // finite differences
        close(
            r.sets.routed.map(|m| m.mean),
            jac_want[0],
            tol,
            &format!("{what} jac routed"),
        );
        close(
            r.sets.all.map(|m| m.mean),
            jac_want[1],
            tol,
            &format!("{what} jac all"),
        );
        close(
            r.sets.gate_weighted.map(|m| m.mean),
            jac_want[2],
            tol,
            &format!("{what} jac gate_weighted"),
        );
        assert_eq!(r.null.shuffled_routing.routed.is_some(), k >= 2, "{what}");
        assert!(r.null.shuffled_routing.all.is_none());
        assert_eq!(r.null.shuffled_routing.gate_weighted.unwrap().draws, 5);
        // The shuffled null re-pairs each token's values with another token's
        // routing: its mean is not the observed one.
        if let (Some(obs), Some(null)) = (r.sets.routed, r.null.shuffled_routing.routed) {
            assert!(
                (null.mean - obs.mean).abs() > 1e-9,
                "{what}: the null did not shuffle"
            );
        }
        assert_eq!(r.null.random_init.unwrap().tokens, 4, "{what}");

        // The same numbers through `analyze`'s per-layer analyzer, which picks
        // the selection (soft routing: top-k by gate) and the gates itself.
        let geo = GeometryOptions {
            jacobian: JacobianMode::Exact,
            jacobian_tokens: n,
            spectra_tokens: 0,
            null_draws: 0,
            reference_k,
            ..Default::default()
        };
        let mut an = LayerAnalyzer::new(0, e, cap.k, c.d_model, c.norm_topk, &geo);
        an.observe(&moe, &x, &cap, &geo).unwrap();
        let rep = an.finish(&moe, &[], &geo).unwrap();
        let js = rep.jacobian.unwrap().sets;
        for (s, (got_act, got_jac)) in [
            (rep.act_mso_sets.routed, js.routed),
            (rep.act_mso_sets.all, js.all),
            (rep.act_mso_sets.gate_weighted, js.gate_weighted),
        ]
        .into_iter()
        .enumerate()
        {
            close(
                got_act.map(|m| m.mean),
                act_want[s],
                2e-6,
                &format!("{what} analyzer act set {s}"),
            );
            close(
                got_jac.map(|m| m.mean),
                jac_want[s],
                1e-6,
                &format!("{what} analyzer jac set {s}"),
            );
        }
    }
}

/// Points around a rank-3 subspace of cluster c (d = 24), plus small noise.
fn planted(rng: &mut ChaCha8Rng, bases: &[Vec<Vec<f64>>], c: usize) -> Vec<f32> {
    let d = bases[0][0].len();
    let mut x = vec![0.0; d];
    for b in &bases[c] {
        let z: f64 = rng.random::<f64>() * 4.0 - 2.0;
        for (xi, bi) in x.iter_mut().zip(b) {
            *xi += z * bi;
        }
    }
    x.iter()
        .map(|v| (v + 0.01 * (rng.random::<f64>() - 0.5)) as f32)
        .collect()
}

/// Specialised experts (each fed one cluster's tokens) overlap far less than
/// random token sets of their sizes would: z ≫ 0. Experts fed the same
/// distribution sit at the null: z ≈ 0.
#[test]
fn permutation_null_separates_specialised_from_shared_experts() {
    let (d, e, per) = (24, 4, 60);
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let bases: Vec<Vec<Vec<f64>>> = (0..e)
        .map(|_| {
            (0..3)
                .map(|_| (0..d).map(|_| rng.random::<f64>() - 0.5).collect())
                .collect()
        })
        .collect();
    // Pool: `per` tokens of each cluster, cluster-major.
    let pool: Vec<f32> = (0..e)
        .flat_map(|c| {
            (0..per)
                .flat_map(|_| planted(&mut rng, &bases, c))
                .collect::<Vec<_>>()
        })
        .collect();
    let n = e * per;
    let rule = RankRule::Fixed(3);
    let null = PermutationNull {
        d,
        rule,
        weighted: false,
        draws: 30,
        seed: 1,
    };
    let observed = |assign: &dyn Fn(usize) -> usize| {
        let mut ms: Vec<Moments> = (0..e).map(|_| Moments::new(d)).collect();
        let mut counts = vec![Vec::new(); e];
        for t in 0..n {
            let x = Tensor::from_slice(&pool[t * d..(t + 1) * d], (1, d), &Device::Cpu).unwrap();
            ms[assign(t)].add(&x, None).unwrap();
            counts[assign(t)].push(1.0);
        }
        let o = layer_subspaces(&ms, rule, "input", false)
            .unwrap()
            .mean_overlap
            .unwrap();
        let pools = vec![pool.as_slice(); e];
        let draws = null.draw(&pools, &counts).unwrap();
        moescope::measures::pairs::NullStats::new(o, &draws).unwrap()
    };
    let specialised = observed(&|t| t / per);
    assert!(specialised.z.unwrap() > 5.0, "{specialised:?}");
    let shuffled: Vec<usize> = {
        let mut v: Vec<usize> = (0..n).map(|t| t % e).collect();
        use rand::seq::SliceRandom;
        v.shuffle(&mut rng);
        v
    };
    let shared = observed(&|t| shuffled[t]);
    assert!(shared.z.unwrap().abs() < 3.0, "{shared:?}");
}

/// Gate-weighted PCA: the weighted covariance Σ w (x−μ_w)(x−μ_w)ᵀ / Σ w, and
/// eigenvectors of it, on both of Moments' paths (n ≤ d rows kept; n > d
/// second moments), against float64 loops.
#[test]
fn gate_weighted_pca_matches_a_float64_weighted_covariance() {
    let d = 7;
    for n in [5, 10, 30] {
        let mut rng = ChaCha8Rng::seed_from_u64(n as u64);
        let x: Vec<f64> = (0..n * d)
            .map(|_| rng.random::<f64>() * 2.0 - 1.0)
            .collect();
        let w: Vec<f64> = (0..n).map(|_| rng.random::<f64>()).collect();
        let mut m = Moments::new(d);
        // Two batches: n = 10 switches paths midway (5 kept rows, then 5
        // more); n = 30 has more than d rows from the first batch.
        let half = n / 2;
        for (a, b) in [(0, half), (half, n)] {
            let t = Tensor::from_slice(&x[a * d..b * d], (b - a, d), &Device::Cpu).unwrap();
            m.add(&t, Some(&w[a..b])).unwrap();
        }
        let ws: f64 = w.iter().sum();
        let mu: Vec<f64> = (0..d)
            .map(|j| (0..n).map(|i| w[i] * x[i * d + j]).sum::<f64>() / ws)
            .collect();
        let mut cov = vec![0.0; d * d];
        for i in 0..n {
            for a in 0..d {
                for b in 0..d {
                    cov[a * d + b] += w[i] * (x[i * d + a] - mu[a]) * (x[i * d + b] - mu[b]) / ws;
                }
            }
        }
        let got = m.covariance();
        for (g, r) in got.iter().zip(&cov) {
            assert!((g - r).abs() < 1e-12, "n={n}: {g} vs {r}");
        }
        let (vals, vecs) = m.spectrum();
        for (l, u) in vals.iter().zip(&vecs).take(3) {
            for a in 0..d {
                let cu: f64 = (0..d).map(|b| cov[a * d + b] * u[b]).sum();
                assert!((cu - l * u[a]).abs() < 1e-9, "n={n}: not an eigenvector");
            }
        }
    }
}

/// A soft-routed model: unweighted input PCA is labelled degenerate (every
/// expert sees every token: overlap 1); output-space PCA gives an overlap
/// clearly below 1 and gate-weighted PCA one that is not 1, each with its
/// permutation null; the summary and the printed table carry the same.
#[test]
fn soft_routing_subspaces_are_measured_in_output_or_weighted_space() {
    use moescope::measures::analyze::{analyze_with, summary_table, GeometryOptions, Source};
    let cfg = ModelConfig {
        routing: Routing::Soft,
        ..common::micro_model()
    };
    let model = moescope::model::Gpt::new(&cfg, DType::F32, &Device::Cpu, 5).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let tokens: Vec<u32> = (0..257).map(|_| rng.random_range(0..64)).collect();
    let run = |output_space: bool, weighted: bool| {
        let geo = GeometryOptions {
            subspace: RankRule::Fixed(3),
            output_space,
            weighted,
            null_draws: 8,
            ..Default::default()
        };
        let src = Source {
            checkpoint: "test".into(),
            data: "random".into(),
            seed: 0,
        };
        analyze_with(&model, &tokens, 256, 4, &[], &geo, src).unwrap()
    };
    let plain = run(false, false);
    let s = plain.layers[0].subspace.as_ref().unwrap();
    assert!((s.mean_overlap.unwrap() - 1.0).abs() < 1e-9 && s.degenerate.is_some());
    assert!(plain.summary.geometry.subspace_degenerate.is_some());
    assert!(summary_table(&plain).contains("DEGENERATE"));
    for (output, weighted) in [(true, false), (false, true)] {
        let r = run(output, weighted);
        for l in &r.layers {
            let s = l.subspace.as_ref().unwrap();
            let o = s.mean_overlap.unwrap();
            assert!(
                o < 0.999,
                "output {output} weighted {weighted}: overlap {o}"
            );
            assert!(s.degenerate.is_none() && s.null.unwrap().draws == 8);
        }
        assert!(!summary_table(&r).contains("DEGENERATE"));
    }
}

/// Soft routing with top_k = 1 as the reference has no routed pair: the
/// routed activation MSO is null with the top-1 reason, not a missing-data one.
#[test]
fn soft_routing_with_a_top1_reference_has_no_routed_pairs() {
    let (moe, c) = layer(Routing::Soft, 1);
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let xv: Vec<f64> = (0..7 * c.d_model)
        .map(|_| rng.random::<f64>() - 0.5)
        .collect();
    let x = Tensor::from_vec(xv, (7, c.d_model), &Device::Cpu).unwrap();
    let (_, cap) = moe.forward(&x, true).unwrap();
    let cap = cap.unwrap();
    let mut acc = LayerAccumulator::new(c.n_experts, cap.k).with_reference_k(1);
    acc.add(&cap).unwrap();
    let reason = acc.act_mso().unwrap_err();
    assert!(reason.contains("k = 1"), "{reason}");
}
