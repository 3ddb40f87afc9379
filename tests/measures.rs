//! docs/MEASURES.md measures against independent f64 computations written here, the
//! orthogonality loss (value, finite-difference gradient, effect in training),
//! and `moescope analyze` end to end.

mod common;

use candle_core::{DType, Device, Tensor};
use common::reference::{cos2, expert_hidden_ref, expert_ref, router_probs, rows, top_k};
use moescope::config::{ModelConfig, Routing};
use moescope::measures::{self, Family, LayerAccumulator};
use moescope::model::moe::MoeLayer;
use moescope::model::params::ParamStore;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::process::Command;

fn layer(cfg: &ModelConfig, seed: u64) -> (MoeLayer, ParamStore) {
    let mut ps = ParamStore::new(DType::F64, &Device::Cpu, seed);
    let m = MoeLayer::new(&mut ps, "moe", cfg, 0.5, 0.5).unwrap();
    (m, ps)
}

fn cfg(routing: Routing, top_k: usize) -> ModelConfig {
    ModelConfig {
        d_model: 10,
        d_ff: 14,
        n_experts: 5,
        top_k,
        routing,
        ..common::micro_model()
    }
}

fn set_param(ps: &ParamStore, name: &str, v: Vec<f64>) {
    let var = ps.get(name).unwrap();
    var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu).unwrap())
        .unwrap();
}

/// Independent weight MSO: normalise each flattened matrix, average squared cosines.
fn mso_ref(mats: &[Vec<f64>]) -> f64 {
    let unit: Vec<Vec<f64>> = mats
        .iter()
        .map(|m| {
            let n = m.iter().map(|x| x * x).sum::<f64>().sqrt();
            m.iter().map(|x| x / n).collect()
        })
        .collect();
    let e = unit.len();
    let mut s = 0.0;
    let mut pairs = 0;
    for i in 0..e {
        for j in i + 1..e {
            let c: f64 = unit[i].iter().zip(&unit[j]).map(|(a, b)| a * b).sum();
            s += c * c;
            pairs += 1;
        }
    }
    s / pairs as f64
}

#[test]
fn weight_mso_known_vectors_and_random_matrices() {
    let c = cfg(Routing::Topk, 2);
    let (moe, ps) = layer(&c, 1);
    let p = c.d_ff * c.d_model;
    // Orthonormal (disjoint supports) -> 0.
    for e in 0..c.n_experts {
        let v: Vec<f64> = (0..p)
            .map(|i| if i % c.n_experts == e { 1.0 } else { 0.0 })
            .collect();
        set_param(&ps, &format!("moe.experts.{e}.up.weight"), v);
    }
    let w = measures::weight_overlap(&moe, Family::Up).unwrap().unwrap();
    assert!(w.mso.abs() < 1e-15, "{}", w.mso);
    assert!(w.matrix[0][0].is_none() && w.matrix[0][1] == Some(0.0));
    // Identical up to positive or negative scale -> 1.
    let base: Vec<f64> = (0..p).map(|i| (i as f64 * 0.37).sin()).collect();
    for e in 0..c.n_experts {
        let s = if e % 2 == 0 { 1.0 + e as f64 } else { -0.5 };
        set_param(
            &ps,
            &format!("moe.experts.{e}.up.weight"),
            base.iter().map(|x| x * s).collect(),
        );
    }
    let w = measures::weight_overlap(&moe, Family::Up).unwrap().unwrap();
    assert!((w.mso - 1.0).abs() < 1e-12, "{}", w.mso);
    // Random, every family, against the loop above.
    let (moe, _) = layer(&c, 2);
    for fam in [Family::Up, Family::Down, Family::Router] {
        let mats: Vec<Vec<f64>> = match fam {
            Family::Up => moe
                .experts
                .iter()
                .map(|e| rows(&e.up.weight).concat())
                .collect(),
            Family::Down => moe
                .experts
                .iter()
                .map(|e| rows(&e.down.weight).concat())
                .collect(),
            _ => rows(&moe.router.weight),
        };
        let got = measures::weight_overlap(&moe, fam).unwrap().unwrap().mso;
        let want = mso_ref(&mats);
        assert!(
            (got - want).abs() < 1e-6 * want.max(1e-12) + 1e-12,
            "{fam:?}: {got} vs {want}"
        );
    }
    assert!(
        measures::weight_overlap(&moe, Family::Gate)
            .unwrap()
            .is_none(),
        "MLP experts have no gate"
    );
}

#[test]
fn activation_mso_and_telemetry_match_loops() {
    for (routing, k) in [
        (Routing::Topk, 2),
        (Routing::Topk, 3),
        (Routing::Soft, 2),
        (Routing::Topk, 1),
    ] {
        let c = cfg(routing, k);
        let (moe, _) = layer(&c, 3);
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let n = 41;
        let xv: Vec<f64> = (0..n * c.d_model)
            .map(|_| rng.random::<f64>() * 2.0 - 1.0)
            .collect();
        let x = Tensor::from_vec(xv, (n, c.d_model), &Device::Cpu).unwrap();
        let (_, cap) = moe.forward(&x, true).unwrap();
        let mut acc = LayerAccumulator::new(c.n_experts, cap.as_ref().unwrap().k);
        acc.add(cap.as_ref().unwrap()).unwrap();

        // Reference: every expert on every token, selection from the router, loops.
        let wr = rows(&moe.router.weight);
        let xs = rows(&x);
        let kk = if routing == Routing::Soft {
            c.n_experts
        } else {
            k
        };
        let (mut act, mut all, mut ent) = (0.0, 0.0, 0.0);
        let mut load = vec![0u64; c.n_experts];
        for xt in &xs {
            let p = router_probs(&wr, xt);
            ent += -p.iter().map(|q| q * q.ln()).sum::<f64>();
            let sel = top_k(&p, kk);
            let h: Vec<Vec<f64>> = moe.experts.iter().map(|e| expert_ref(e, xt)).collect();
            for &e in &sel {
                load[e] += 1;
            }
            if kk >= 2 {
                let mut s = 0.0;
                let mut m = 0;
                for a in 0..kk {
                    for b in a + 1..kk {
                        s += cos2(&h[sel[a]], &h[sel[b]]);
                        m += 1;
                    }
                }
                act += s / m as f64;
            }
            let mut s = 0.0;
            let mut m = 0;
            for a in 0..c.n_experts {
                for b in a + 1..c.n_experts {
                    s += cos2(&h[a], &h[b]);
                    m += 1;
                }
            }
            all += s / m as f64;
        }
        let tol = 2e-6; // f32 host copies of f64 outputs
        match acc.act_mso() {
            Ok(v) => assert!(
                (v - act / n as f64).abs() < tol,
                "{routing:?} k={k}: {v} vs {}",
                act / n as f64
            ),
            Err(reason) => {
                assert_eq!(kk, 1, "{reason}");
                assert!(reason.contains("k = 1"));
            }
        }
        // All pairs through the public API: expert outputs on every token.
        let outs = moe.every_expert_output(&x).unwrap();
        acc.add_all_pairs(&outs, c.d_model, &[]);
        assert!((acc.act_mso_all().unwrap() - all / n as f64).abs() < tol);

        let tel = acc.telemetry();
        assert_eq!(tel.load, load, "{routing:?} k={k}");
        assert!((tel.router_entropy - ent / n as f64).abs() < 1e-6);
        let total: u64 = load.iter().sum();
        let frac: Vec<f64> = load.iter().map(|&l| l as f64 / total as f64).collect();
        let h: f64 = frac.iter().filter(|&&f| f > 0.0).map(|f| -f * f.ln()).sum();
        assert!((tel.load_entropy - h).abs() < 1e-12);
        assert!((tel.balance - h.exp() / c.n_experts as f64).abs() < 1e-12);
        let mean = total as f64 / c.n_experts as f64;
        assert!(
            (tel.max_violation - (*load.iter().max().unwrap() as f64 / mean - 1.0)).abs() < 1e-12
        );
        assert_eq!(
            tel.dead_experts,
            (0..c.n_experts)
                .filter(|&e| load[e] == 0)
                .collect::<Vec<_>>()
        );
    }
}

/// Activation MSO of the hidden activations and of their LayerNorm (the
/// first study's eq. 4) against loops over a float64 reference expert.
#[test]
fn activation_mso_in_hidden_spaces_matches_loops() {
    use moescope::config::ActSpace;
    for (routing, k) in [(Routing::Topk, 2), (Routing::Topk, 3), (Routing::Soft, 2)] {
        let c = cfg(routing, k);
        let (moe, _) = layer(&c, 4);
        let mut rng = ChaCha8Rng::seed_from_u64(6);
        let n = 37;
        let xv: Vec<f64> = (0..n * c.d_model)
            .map(|_| rng.random::<f64>() * 2.0 - 1.0)
            .collect();
        let x = Tensor::from_vec(xv, (n, c.d_model), &Device::Cpu).unwrap();
        let (_, cap) = moe.forward(&x, true).unwrap();
        let cap = moe.with_hidden(&x, cap.as_ref().unwrap()).unwrap();
        let wr = rows(&moe.router.weight);
        let ln = |h: &[f64]| -> Vec<f64> {
            let m = h.iter().sum::<f64>() / h.len() as f64;
            let v = h.iter().map(|a| (a - m).powi(2)).sum::<f64>() / h.len() as f64;
            h.iter().map(|a| (a - m) / (v + 1e-5).sqrt()).collect()
        };
        for space in [ActSpace::Hidden, ActSpace::HiddenLn] {
            let mut acc = LayerAccumulator::new(c.n_experts, cap.k);
            if routing == Routing::Soft {
                acc = acc.with_reference_k(k); // routed = the top-k by gate
            }
            acc.add(&cap.in_space(space).unwrap().unwrap()).unwrap();
            let mut want = 0.0;
            for xt in &rows(&x) {
                let sel = top_k(&router_probs(&wr, xt), k);
                let h: Vec<Vec<f64>> = sel
                    .iter()
                    .map(|&e| {
                        let h = expert_hidden_ref(&moe.experts[e], xt);
                        if space == ActSpace::HiddenLn {
                            ln(&h)
                        } else {
                            h
                        }
                    })
                    .collect();
                let mut s = 0.0;
                for a in 0..k {
                    for b in a + 1..k {
                        s += cos2(&h[a], &h[b]);
                    }
                }
                want += s / (k * (k - 1) / 2) as f64;
            }
            let got = acc.act_mso().unwrap();
            assert!(
                (got - want / n as f64).abs() < 2e-6,
                "{routing:?} k={k} {space}: {got} vs {}",
                want / n as f64
            );
        }
    }
}

#[test]
fn orth_loss_value_and_gradient_match_finite_differences() {
    let c = cfg(Routing::Topk, 2);
    let (moe, ps) = layer(&c, 4);
    let pen = measures::orth_penalty(&moe, Family::Up, Default::default())
        .unwrap()
        .unwrap();
    let mats: Vec<Vec<f64>> = moe
        .experts
        .iter()
        .map(|e| rows(&e.up.weight).concat())
        .collect();
    let e = c.n_experts as f64;
    let want = mso_ref(&mats) * e * (e - 1.0) / 2.0; // Σ_{i<j} G²
    let got = pen.to_scalar::<f64>().unwrap();
    assert!(
        (got - want).abs() < 1e-12 * want.max(1.0),
        "{got} vs {want}"
    );
    let grads = pen.backward().unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(8);
    for name in ["moe.experts.0.up.weight", "moe.experts.3.up.weight"] {
        let var = ps.get(name).unwrap();
        let g: Vec<f64> = grads
            .get(var.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let base: Vec<f64> = var.flatten_all().unwrap().to_vec1().unwrap();
        for _ in 0..5 {
            let j = rng.random_range(0..base.len());
            let eps = 1e-6;
            let f = |delta: f64| {
                let mut v = base.clone();
                v[j] += delta;
                set_param(&ps, name, v);
                let l = measures::orth_penalty(&moe, Family::Up, Default::default())
                    .unwrap()
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap();
                set_param(&ps, name, base.clone());
                l
            };
            let fd = (f(eps) - f(-eps)) / (2.0 * eps);
            assert!(
                (fd - g[j]).abs() < 1e-7 * (1.0 + fd.abs()),
                "{name}[{j}]: {} vs {fd}",
                g[j]
            );
        }
    }
}

#[test]
fn orthogonality_loss_lowers_l_orth_in_training_and_measures_are_logged() {
    let d = tempfile::tempdir().unwrap();
    let mut base = common::micro_config(&d.path().join("cache"));
    base.train.max_steps = 30;
    base.train.eval_every = 0;
    base.train.checkpoint_every = 0;
    base.train.log_every = 5;
    base.measure.tokens = 256;
    let mut last_orth = vec![];
    for lambda in [0.0, 0.1] {
        let mut c = base.clone();
        c.reg.orth_lambda = lambda;
        let run = d.path().join(format!("run-{lambda}"));
        common::train_quiet(c, &run);
        let rows = common::metrics(&run);
        let last = rows.iter().rev().find(|r| r["kind"] == "train").unwrap();
        last_orth.push(last["orth_loss"].as_f64().unwrap());
        assert!(last["lm_loss"].as_f64().is_some());
        let ev = rows.iter().rev().find(|r| r["kind"] == "eval").unwrap();
        for key in [
            "weight_mso",
            "weight_mso_mean",
            "act_mso",
            "act_mso_mean",
            "gap_ratio",
            "gap_ratio_model",
            "router_entropy",
            "load_entropy",
            "balance",
            "max_violation",
            "dead_experts",
            "load",
            "measure_tokens",
            "weight_mso_chance",
            "weight_mso_rows",
            "weight_mso_cols",
            "act_mso_chance",
            "act_mso_hidden",
            "act_mso_hidden_ln",
        ] {
            assert!(ev.get(key).is_some(), "eval row lacks {key}: {ev}");
        }
        // Chance levels of micro_config's shapes: 1/(d_ff·d) flat, 1/d rows, 1/d_ff cols.
        let (d, f) = (32.0, 64.0);
        let chance = |v: &serde_json::Value| v.as_f64().unwrap();
        assert!((chance(&ev["weight_mso_chance"]["up"]) - 1.0 / (d * f)).abs() < 1e-15);
        assert!((chance(&ev["weight_mso_rows"]["chance"]["up"]) - 1.0 / d).abs() < 1e-15);
        assert!((chance(&ev["weight_mso_cols"]["chance"]["up"]) - 1.0 / f).abs() < 1e-15);
        assert!((chance(&ev["act_mso_hidden"]["chance"]) - 1.0 / f).abs() < 1e-15);
        assert_eq!(ev["act_mso"].as_array().unwrap().len(), 2);
        assert!(ev["measure_tokens"].as_u64().unwrap() >= 256);
    }
    assert!(
        last_orth[1] < last_orth[0],
        "L_orth with λ=0.1 ({}) is not below λ=0 ({})",
        last_orth[1],
        last_orth[0]
    );
}

#[test]
fn top1_eval_reports_null_activation_mso_with_reason() {
    let d = tempfile::tempdir().unwrap();
    let mut c = common::micro_config(&d.path().join("cache"));
    c.model.top_k = 1;
    c.train.max_steps = 2;
    c.measure.tokens = 64;
    let run = d.path().join("run");
    common::train_quiet(c, &run);
    let ev = common::metrics(&run)
        .into_iter()
        .rev()
        .find(|r| r["kind"] == "eval")
        .unwrap();
    assert!(ev["act_mso"]
        .as_array()
        .unwrap()
        .iter()
        .all(|v| v.is_null()));
    assert!(ev["act_mso_mean"].is_null());
    assert!(ev["act_mso_null_reason"]
        .as_str()
        .unwrap()
        .contains("k = 1"));
}

fn train_micro_run(dir: &std::path::Path) -> std::path::PathBuf {
    let mut c = common::micro_config(&dir.join("cache"));
    c.train.max_steps = 3;
    let run = dir.join("run");
    common::train_quiet(c, &run);
    run
}

fn analyze(args: &[&str]) -> std::process::Output {
    Command::new(common::bin())
        .arg("analyze")
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn analyze_writes_every_key_and_refuses_bad_input() {
    let d = tempfile::tempdir().unwrap();
    let run = train_micro_run(d.path());
    let r = run.display().to_string();
    let out = d.path().join("report.json");
    let o = analyze(&[
        "--model",
        &r,
        "--tokens",
        "300",
        "--out",
        &out.display().to_string(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    assert_eq!(v["schema"], "moescope.analysis/1");
    for key in ["source", "options", "tokens", "layers", "summary"] {
        assert!(v.get(key).is_some(), "missing {key}");
    }
    assert_eq!(v["tokens"], 300);
    let layers = v["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 2);
    for l in layers {
        for key in [
            "index",
            "weight_mso",
            "weight_overlap",
            "act_mso",
            "act_mso_all",
            "gap_ratio",
            "load",
            "router_entropy",
            "load_entropy",
            "dead_experts",
            "max_violation",
        ] {
            assert!(l.get(key).is_some(), "layer lacks {key}");
        }
        let m = l["weight_overlap"]["up"].as_array().unwrap();
        assert_eq!(m.len(), 4);
        assert!(m[1][1].is_null() && m[0][1].is_f64());
        assert_eq!(
            l["load"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap())
                .sum::<u64>(),
            600
        );
    }
    assert!(String::from_utf8_lossy(&o.stderr).contains("gap ratio"));

    // Every activation space and granularity, on request.
    let o = analyze(&[
        "--model",
        &r,
        "--tokens",
        "300",
        "--act-space",
        "output,hidden,hidden_ln",
        "--granularity",
        "flat,rows,cols",
        "--out",
        &out.display().to_string(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    for l in v["layers"].as_array().unwrap() {
        for key in ["act_mso_hidden", "act_mso_hidden_ln"] {
            let x = l[key]
                .as_f64()
                .unwrap_or_else(|| panic!("layer lacks {key}: {l}"));
            assert!((0.0..=1.0).contains(&x));
        }
        for key in ["weight_mso_rows", "weight_mso_cols"] {
            assert!(l[key]["up"].is_f64(), "layer lacks {key}: {l}");
        }
        assert!(l["weight_mso_chance"]["up_cols"].is_f64());
    }

    // Token ids as JSON and as .npy (int64), the same numbers either way.
    let ids: Vec<i64> = (0..200).map(|i| (i * 7) % 200).collect();
    let js = d.path().join("ids.json");
    std::fs::write(&js, serde_json::to_string(&ids).unwrap()).unwrap();
    let npy = d.path().join("ids.npy");
    let header = format!(
        "{{'descr': '<i8', 'fortran_order': False, 'shape': ({},), }}",
        ids.len()
    );
    let mut h = header.into_bytes();
    while (10 + h.len() + 1) % 64 != 0 {
        h.push(b' ');
    }
    h.push(b'\n');
    let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
    bytes.extend_from_slice(&(h.len() as u16).to_le_bytes());
    bytes.extend_from_slice(&h);
    for i in &ids {
        bytes.extend_from_slice(&i.to_le_bytes());
    }
    std::fs::write(&npy, bytes).unwrap();
    let (oj, on) = (d.path().join("j.json"), d.path().join("n.json"));
    for (src, dst) in [(&js, &oj), (&npy, &on)] {
        let o = analyze(&[
            "--model",
            &r,
            "--token-ids",
            &src.display().to_string(),
            "--tokens",
            "150",
            "--out",
            &dst.display().to_string(),
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let a: serde_json::Value = serde_json::from_slice(&std::fs::read(&oj).unwrap()).unwrap();
    let b: serde_json::Value = serde_json::from_slice(&std::fs::read(&on).unwrap()).unwrap();
    assert_eq!(a["layers"], b["layers"]);

    // Bad input: clear errors, no panic, no report written.
    let bad = |args: &[&str], needles: &[&str]| {
        let o = analyze(args);
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && !e.contains("panicked"), "{e}");
        for n in needles {
            assert!(e.contains(n), "lacks `{n}`: {e}");
        }
    };
    let never = d.path().join("never.json").display().to_string();
    let jsp = js.display().to_string();
    // (file contents, extra arguments, what the error must name)
    let cases: [(&str, &[&str], &[&str]); 4] = [
        (
            "[1, 2, 99999]",
            &["--tokens", "3"],
            &["ids.json", "99999", "vocabulary"],
        ),
        ("[]", &[], &["ids.json", "empty"]),
        (
            "[1, 2, 3]",
            &["--tokens", "10"],
            &["--tokens 10", "3 tokens"],
        ),
        ("{\"ids\": [1]}", &[], &["ids.json", "array"]),
    ];
    for (contents, extra, needles) in cases {
        std::fs::write(&js, contents).unwrap();
        let mut args = vec!["--model", r.as_str(), "--token-ids", jsp.as_str()];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["--out", never.as_str()]);
        bad(&args, needles);
    }
    bad(
        &["--model", &r, "--tokens", "100000000", "--out", &never],
        &["--tokens 100000000"],
    );
    bad(
        &["--model", &r, "--families", "left", "--out", &never],
        &["left"],
    );
    assert!(!std::path::Path::new(&never).exists());

    // A checkpoint whose config has no MoE layer is refused by the config check.
    let cj = run.join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cj).unwrap()).unwrap();
    v["moescope"]["moe_every"] = serde_json::json!(3);
    std::fs::write(&cj, serde_json::to_string(&v).unwrap()).unwrap();
    bad(
        &["--model", &r, "--out", &never],
        &["config.json", "no MoE layer"],
    );
}
