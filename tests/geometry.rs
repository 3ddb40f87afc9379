//! Function and representation space against independent references:
//! Jacobians from autodiff and finite differences (f64), the Hutchinson
//! estimator's 1/√m error, principal angles and PCA subspaces.
#![allow(clippy::needless_range_loop)]

mod common;

use candle_core::{DType, Device, Tensor, Var};
use moescope::config::{Activation, ExpertKind, ModelConfig, Routing};
use moescope::measures::jacobian::{
    explicit_jacobian, layer_jacobian, layer_jacobian_uniform, JacobianInputs, JacobianMode,
    JacobianSettings, Precision,
};
use moescope::measures::subspace::{
    grassmann, layer_subspaces, principal_angles, Moments, RankRule,
};
use moescope::model::moe::{Expert, MoeLayer};
use moescope::model::params::ParamStore;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

fn layer(expert: ExpertKind, activation: Activation, seed: u64) -> MoeLayer {
    let cfg = ModelConfig {
        d_model: 6,
        d_ff: 9,
        n_experts: 3,
        top_k: 2,
        expert,
        activation,
        routing: Routing::Topk,
        ..common::micro_model()
    };
    let mut ps = ParamStore::new(DType::F64, &Device::Cpu, seed);
    let m = MoeLayer::new(&mut ps, "moe", &cfg, 0.6, 0.6).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(seed + 9);
    for (name, v) in ps.names().iter().zip(ps.vars()) {
        if name.ends_with("bias") {
            let n = v.elem_count();
            let vals: Vec<f64> = (0..n).map(|_| rng.random::<f64>() - 0.5).collect();
            v.set(&Tensor::from_vec(vals, v.shape(), &Device::Cpu).unwrap())
                .unwrap();
        }
    }
    m
}

fn randn(rng: &mut ChaCha8Rng, n: usize, d: usize) -> Tensor {
    let v: Vec<f64> = (0..n * d).map(|_| StandardNormal.sample(rng)).collect();
    Tensor::from_vec(v, (n, d), &Device::Cpu).unwrap()
}

/// J by autodiff: one backward pass per output coordinate.
fn autodiff_jacobian(e: &Expert, x: &[f64]) -> Vec<Vec<f64>> {
    let d = x.len();
    (0..d)
        .map(|k| {
            let xv =
                Var::from_tensor(&Tensor::from_slice(x, (1, d), &Device::Cpu).unwrap()).unwrap();
            let y = e.forward(xv.as_tensor()).unwrap();
            let g = y
                .narrow(1, k, 1)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            g.get(xv.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        })
        .collect()
}

/// J by central finite differences.
fn fd_jacobian(e: &Expert, x: &[f64]) -> Vec<Vec<f64>> {
    let d = x.len();
    let f = |v: &[f64]| -> Vec<f64> {
        e.forward(&Tensor::from_slice(v, (1, d), &Device::Cpu).unwrap())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    let h = 1e-6;
    let mut j = vec![vec![0.0; d]; d];
    for c in 0..d {
        let mut p = x.to_vec();
        p[c] += h;
        let mut m = x.to_vec();
        m[c] -= h;
        let (fp, fm) = (f(&p), f(&m));
        for r in 0..d {
            j[r][c] = (fp[r] - fm[r]) / (2.0 * h);
        }
    }
    j
}

fn frob(a: &[Vec<f64>], b: &[Vec<f64>]) -> f64 {
    a.iter()
        .flatten()
        .zip(b.iter().flatten())
        .map(|(x, y)| x * y)
        .sum()
}

fn align(a: &[Vec<f64>], b: &[Vec<f64>]) -> f64 {
    frob(a, b) / (frob(a, a) * frob(b, b)).sqrt()
}

#[test]
fn exact_alignment_equals_autodiff_and_finite_difference_jacobians() {
    for (kind, act) in [
        (ExpertKind::Mlp, Activation::Silu),
        (ExpertKind::Mlp, Activation::Gelu),
        (ExpertKind::Swiglu, Activation::Silu),
    ] {
        let moe = layer(kind, act, 3);
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let n = 7;
        let x = randn(&mut rng, n, 6);
        let xs: Vec<Vec<f64>> = x.to_vec2().unwrap();
        // Reference: explicit Jacobians from autodiff, checked against finite differences.
        let mut refm = [[0.0f64; 3]; 3];
        let mut refs = Vec::new();
        for xt in &xs {
            let js: Vec<Vec<Vec<f64>>> = moe
                .experts
                .iter()
                .map(|e| autodiff_jacobian(e, xt))
                .collect();
            for (e, j) in moe.experts.iter().zip(&js) {
                let fd = fd_jacobian(e, xt);
                for (a, b) in j.iter().flatten().zip(fd.iter().flatten()) {
                    assert!(
                        (a - b).abs() < 1e-6 * (1.0 + b.abs()),
                        "{kind:?}/{act:?}: autodiff {a} vs FD {b}"
                    );
                }
                // The analytic J used for spectra equals autodiff too.
                let an: Vec<Vec<f64>> =
                    explicit_jacobian(e, &Tensor::from_slice(xt, (1, 6), &Device::Cpu).unwrap())
                        .unwrap()
                        .to_vec2()
                        .unwrap();
                // candle's GELU backward uses 6-digit constants (0.797885, 0.0356774): 1e-6 there.
                let tol = if act == Activation::Gelu { 1e-6 } else { 1e-10 };
                for (a, b) in an.iter().flatten().zip(j.iter().flatten()) {
                    assert!(
                        (a - b).abs() < tol * (1.0 + b.abs()),
                        "{kind:?}/{act:?}: analytic {a} vs autodiff {b}"
                    );
                }
            }
            for i in 0..3 {
                for k in i + 1..3 {
                    let a = align(&js[i], &js[k]);
                    refm[i][k] += a / n as f64;
                    refs.push(a);
                }
            }
        }
        // All pairs on every token, exact mode, in both arithmetics (the f32
        // path to 1e-5: A is bounded by 1).
        let sel: Vec<u32> = (0..n).flat_map(|_| [0u32, 1]).collect();
        for precision in [Precision::F64, Precision::F32] {
            let r = layer_jacobian_uniform(
                &moe,
                &x,
                &sel,
                2,
                &JacobianSettings {
                    all_pairs: true,
                    top_sv: 4,
                    ..JacobianSettings::new(JacobianMode::Exact, precision)
                },
            )
            .unwrap()
            .unwrap();
            let tol = match (precision, act) {
                (Precision::F32, _) => 1e-5,
                (_, Activation::Gelu) => 1e-6,
                _ => 1e-10,
            };
            assert_eq!(r.mode, "exact");
            assert_eq!(r.instances, 3 * n);
            for i in 0..3 {
                for k in i + 1..3 {
                    let got = r.matrix[i][k].unwrap();
                    assert!(
                        (got - refm[i][k]).abs() < tol,
                        "{kind:?}/{act:?} pair ({i},{k}): {got} vs {}",
                        refm[i][k]
                    );
                }
            }
            let mean = refs.iter().sum::<f64>() / refs.len() as f64;
            let mean_sq = refs.iter().map(|a| a * a).sum::<f64>() / refs.len() as f64;
            assert!(
                (r.mean.unwrap() - mean).abs() < tol && (r.mean_sq.unwrap() - mean_sq).abs() < tol
            );
            assert!(r.matrix[0][0].is_none());
        }
    }
}

#[test]
fn routed_pairs_follow_the_selection() {
    let moe = layer(ExpertKind::Mlp, Activation::Silu, 5);
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let x = randn(&mut rng, 4, 6);
    // Tokens 0,1 route to (0,1); tokens 2,3 to (2,1).
    let sel = vec![0u32, 1, 1, 0, 2, 1, 1, 2];
    let r = layer_jacobian_uniform(
        &moe,
        &x,
        &sel,
        2,
        &JacobianSettings {
            spectra_tokens: 2,
            top_sv: 3,
            ..JacobianSettings::new(JacobianMode::Exact, Precision::F32)
        },
    )
    .unwrap()
    .unwrap();
    assert_eq!(r.instances, 4);
    assert!(r.matrix[0][1].is_some() && r.matrix[1][2].is_some() && r.matrix[0][2].is_none());
    // Spectra: every expert that has tokens gets top singular values in non-increasing order.
    for s in r.spectra.iter().flatten() {
        assert_eq!(s.len(), 3);
        assert!(s.windows(2).all(|w| w[0] >= w[1] - 1e-12));
    }
    assert!(r
        .effective_rank
        .iter()
        .flatten()
        .all(|e| *e >= 1.0 && *e <= 6.0));
}

#[test]
fn estimator_error_falls_as_one_over_sqrt_m() {
    let moe = layer(ExpertKind::Swiglu, Activation::Silu, 8);
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let n = 40;
    let x = randn(&mut rng, n, 6);
    let sel: Vec<u32> = (0..n).flat_map(|_| [0u32, 1]).collect();
    let exact = layer_jacobian_uniform(
        &moe,
        &x,
        &sel,
        2,
        &JacobianSettings {
            all_pairs: true,
            ..JacobianSettings::new(JacobianMode::Exact, Precision::F64)
        },
    )
    .unwrap()
    .unwrap();
    let mut errs = Vec::new();
    for m in [16usize, 64, 256, 1024] {
        // Mean absolute error of the per-pair means, averaged over seeds.
        let mut e = 0.0;
        let mut se = 0.0;
        for seed in 0..6 {
            let r = layer_jacobian_uniform(
                &moe,
                &x,
                &sel,
                2,
                &JacobianSettings {
                    all_pairs: true,
                    seed,
                    ..JacobianSettings::new(JacobianMode::Estimate(m), Precision::F32)
                },
            )
            .unwrap()
            .unwrap();
            assert_eq!(r.mode, "estimate");
            for i in 0..3 {
                for k in i + 1..3 {
                    e += (r.matrix[i][k].unwrap() - exact.matrix[i][k].unwrap()).abs();
                }
            }
            se += r.stderr.unwrap();
        }
        errs.push((m, e, se));
    }
    // Each 4x more probes halves the error (1/sqrt(m)): allow a generous band.
    for w in errs.windows(2) {
        let ratio = w[1].1 / w[0].1;
        assert!(
            (0.3..0.8).contains(&ratio),
            "error ratio {ratio} from m={} to m={}: {errs:?}",
            w[0].0,
            w[1].0
        );
        let sratio = w[1].2 / w[0].2;
        assert!(
            (0.4..0.6).contains(&sratio),
            "stderr ratio {sratio}: {errs:?}"
        );
    }
}

/// Random orthonormal r-frame in R^d (Gram–Schmidt on Gaussians).
fn random_frame(rng: &mut ChaCha8Rng, d: usize, r: usize) -> Vec<Vec<f64>> {
    let mut out: Vec<Vec<f64>> = Vec::new();
    while out.len() < r {
        let mut v: Vec<f64> = (0..d).map(|_| StandardNormal.sample(rng)).collect();
        for u in &out {
            let p: f64 = v.iter().zip(u).map(|(a, b)| a * b).sum();
            v.iter_mut().zip(u).for_each(|(a, b)| *a -= p * b);
        }
        let n = v.iter().map(|a| a * a).sum::<f64>().sqrt();
        out.push(v.iter().map(|a| a / n).collect());
    }
    out
}

#[test]
fn random_subspaces_overlap_r_over_d() {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let (d, r) = (48, 6);
    let trials = 300;
    let mut s = 0.0;
    for _ in 0..trials {
        let a = random_frame(&mut rng, d, r);
        let b = random_frame(&mut rng, d, r);
        s += grassmann(&principal_angles(&a, &b)).2;
    }
    let mean = s / trials as f64;
    assert!(
        (mean - r as f64 / d as f64).abs() < 0.01,
        "{mean} vs {}",
        r as f64 / d as f64
    );
}

#[test]
fn pca_recovers_planted_subspaces() {
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let d = 10;
    let planted = |rng: &mut ChaCha8Rng, dims: &[usize], n: usize| -> Tensor {
        let mut v = vec![0.0; n * d];
        for row in 0..n {
            for &k in dims {
                v[row * d + k] = 3.0 * Distribution::<f64>::sample(&StandardNormal, rng) + 5.0;
            }
            for k in 0..d {
                v[row * d + k] += 1e-3 * Distribution::<f64>::sample(&StandardNormal, rng);
            }
        }
        Tensor::from_vec(v, (n, d), &Device::Cpu).unwrap()
    };
    let mut ms: Vec<Moments> = (0..3).map(|_| Moments::new(d)).collect();
    // Experts 0 and 1 share span{e0, e1}; expert 2 lives in span{e5, e6}; added in two batches each.
    for (e, dims) in [(0, [0usize, 1]), (1, [0, 1]), (2, [5, 6])] {
        for _ in 0..2 {
            ms[e].add(&planted(&mut rng, &dims, 200), None).unwrap();
        }
    }
    let mut small = Moments::new(d);
    small.add(&planted(&mut rng, &[2, 3], 2), None).unwrap();
    ms.push(small);
    let r = layer_subspaces(&ms, RankRule::Fixed(2), "input", false).unwrap();
    assert!(r.overlap[0][1].unwrap() > 0.999, "{:?}", r.overlap[0][1]);
    assert!(
        r.overlap[0][2].unwrap() < 1e-3
            && (r.geodesic_normalised[0][2].unwrap() - 1.0).abs() < 1e-3
    );
    assert!((r.random_overlap - 0.2).abs() < 1e-12);
    assert!(r.effective_rank[0].unwrap() > 1.8 && r.effective_rank[0].unwrap() < 2.05);
    assert_eq!(r.skipped.len(), 1);
    assert_eq!((r.skipped[0].expert, r.skipped[0].n), (3, 2));
    // Variance rule: 95% of the variance needs both planted directions.
    let v = layer_subspaces(&ms[..3], RankRule::Variance(0.95, 8), "input", false).unwrap();
    assert_eq!(v.rank, vec![Some(2), Some(2), Some(2)]);
}

#[test]
fn analyze_reports_jacobian_and_subspace_per_layer() {
    let d = tempfile::tempdir().unwrap();
    let mut c = common::micro_config(&d.path().join("cache"));
    c.train.max_steps = 3;
    let run = d.path().join("run");
    common::train_quiet(c, &run);
    let out = d.path().join("r.json");
    let figs = d.path().join("figs");
    let args = [
        "analyze",
        "--model",
        run.to_str().unwrap(),
        "--tokens",
        "400",
        "--subspace",
        "4",
        "--jacobian",
        "estimate:32",
        "--out",
        out.to_str().unwrap(),
        "--figures",
        figs.to_str().unwrap(),
    ];
    let o = std::process::Command::new(common::bin())
        .args(args)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    // --figures: the measures by layer and each layer's E×E matrices, as SVG.
    let mut names: Vec<String> = std::fs::read_dir(&figs)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    for want in [
        "overlap-by-layer.svg",
        "routing-by-layer.svg",
        "weight-overlap-by-layer.svg",
        "layer1-jacobian.svg",
        "layer1-subspace-overlap.svg",
        "layer0-activation-overlap.svg",
    ] {
        assert!(names.iter().any(|n| n == want), "{want} missing: {names:?}");
    }
    for n in &names {
        let svg = std::fs::read_to_string(figs.join(n)).unwrap();
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>"), "{n}");
    }
    let by_layer = std::fs::read_to_string(figs.join("overlap-by-layer.svg")).unwrap();
    assert!(
        by_layer.contains("Jacobian |A|")
            && by_layer.contains("subspace overlap")
            && by_layer.contains("<polyline")
    );
    for l in v["layers"].as_array().unwrap() {
        let j = &l["jacobian"];
        for k in [
            "mean",
            "mean_abs",
            "mean_sq",
            "matrix",
            "mode",
            "stderr",
            "spectra",
            "effective_rank",
        ] {
            assert!(j.get(k).is_some(), "jacobian lacks {k}");
        }
        assert_eq!(j["mode"], "estimate");
        let s = &l["subspace"];
        for k in [
            "rank",
            "overlap",
            "geodesic",
            "geodesic_normalised",
            "random_overlap",
            "effective_rank",
            "skipped",
        ] {
            assert!(s.get(k).is_some(), "subspace lacks {k}");
        }
        assert!((s["random_overlap"].as_f64().unwrap() - 4.0 / 32.0).abs() < 1e-12);
    }
    let bad = std::process::Command::new(common::bin())
        .args([
            "analyze",
            "--model",
            run.to_str().unwrap(),
            "--jacobian",
            "fast",
        ])
        .output()
        .unwrap();
    assert!(!bad.status.success() && String::from_utf8_lossy(&bad.stderr).contains("--jacobian"));
}

/// The reference path's Hutchinson estimate runs in chunks of 64 tokens: on
/// 150 tokens every per-pair mean equals the token-weighted mean of the same
/// estimate on the chunks' tokens alone (same probes), so no token is lost or
/// misaligned at a chunk boundary. (The f32 path's chunks are tested in its
/// module.)
#[test]
fn estimate_in_chunks_equals_the_estimate_on_each_chunk() {
    let moe = layer(ExpertKind::Mlp, Activation::Silu, 3);
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let n = 150;
    let x = randn(&mut rng, n, 6);
    let sel: Vec<u32> = (0..n).flat_map(|_| [0u32, 2]).collect();
    let est = |x: &Tensor, sel: &[u32]| {
        layer_jacobian_uniform(
            &moe,
            x,
            sel,
            2,
            &JacobianSettings {
                all_pairs: true,
                seed: 7,
                ..JacobianSettings::new(JacobianMode::Estimate(32), Precision::F64)
            },
        )
        .unwrap()
        .unwrap()
    };
    let whole = est(&x, &sel);
    let mut sums = [[0.0f64; 3]; 3];
    for (a, b) in [(0, 64), (64, 128), (128, 150)] {
        let part = est(&x.narrow(0, a, b - a).unwrap(), &sel[2 * a..2 * b]);
        for i in 0..3 {
            for j in 0..3 {
                if let Some(v) = part.matrix[i][j] {
                    sums[i][j] += v * (b - a) as f64;
                }
            }
        }
    }
    for i in 0..3 {
        for j in 0..3 {
            if let Some(v) = whole.matrix[i][j] {
                assert!((v - sums[i][j] / n as f64).abs() < 1e-12, "pair ({i},{j})");
            }
        }
    }
}

/// Every number of a layer's Jacobian report (alignment, pair sets, both
/// nulls, standard errors) from the f32 path equals the f64 reference's:
/// within 1e-5 of max(|value|, 0.01), i.e. 1e-5 relative wherever a number
/// is not close to zero, for MLP (SiLU, GELU) and SwiGLU experts, exact and
/// estimated, all pairs and routed pairs.
#[test]
fn f32_path_reports_the_f64_reference() {
    for (kind, act) in [
        (ExpertKind::Mlp, Activation::Silu),
        (ExpertKind::Mlp, Activation::Gelu),
        (ExpertKind::Swiglu, Activation::Silu),
    ] {
        let moe = layer(kind, act, 21);
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let n = 40;
        let x = randn(&mut rng, n, 6);
        let sel: Vec<u32> = (0..n as u32)
            .flat_map(|t| [t % 3, (t + 1 + t / 3) % 3])
            .collect();
        let probs: Vec<f32> = (0..n)
            .flat_map(|t| {
                let a = 0.2 + 0.6 * ((t * 7) % 10) as f32 / 10.0;
                [a, (1.0 - a) * 0.7, (1.0 - a) * 0.3]
            })
            .collect();
        for mode in [JacobianMode::Exact, JacobianMode::Estimate(64)] {
            for all_pairs in [true, false] {
                let report = |precision| {
                    let input = JacobianInputs {
                        x: &x,
                        selected: &sel,
                        k: 2,
                        probs: &probs,
                    };
                    let s = JacobianSettings {
                        mode,
                        precision,
                        all_pairs,
                        spectra_tokens: 0,
                        top_sv: 2,
                        seed: 5,
                        null_draws: 10,
                        null_init_tokens: 12,
                    };
                    let r = layer_jacobian(&moe, &input, &s).unwrap().unwrap();
                    serde_json::to_value(&r).unwrap()
                };
                let (a, b) = (report(Precision::F32), report(Precision::F64));
                let mut count = 0;
                compare_numbers(
                    &a,
                    &b,
                    &mut count,
                    &format!("{kind:?}/{act:?}/{mode:?}/{all_pairs}"),
                );
                assert!(count > 10, "only {count} numbers compared");
            }
        }
    }
}

fn compare_numbers(a: &serde_json::Value, b: &serde_json::Value, count: &mut usize, at: &str) {
    use serde_json::Value;
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => {
            let (x, y) = (x.as_f64().unwrap(), y.as_f64().unwrap());
            assert!(
                (x - y).abs() <= 1e-5 * y.abs().max(0.01),
                "{at}: f32 {x} vs f64 {y}"
            );
            *count += 1;
        }
        (Value::Array(x), Value::Array(y)) => {
            assert_eq!(x.len(), y.len(), "{at}");
            for (i, (p, q)) in x.iter().zip(y).enumerate() {
                compare_numbers(p, q, count, &format!("{at}[{i}]"));
            }
        }
        (Value::Object(x), Value::Object(y)) => {
            assert_eq!(x.len(), y.len(), "{at}");
            for (k, p) in x {
                compare_numbers(p, &y[k], count, &format!("{at}.{k}"));
            }
        }
        (p, q) => assert_eq!(p, q, "{at}"),
    }
}
