//! The model against independent references: every parameter receives a
//! gradient; dropless dispatch equals a dense computation written here in
//! plain f64 loops; gradients match finite differences (f64).

mod common;

use common::reference::{expert_ref, matvec, rows};

use candle_core::{DType, Device, Tensor, Var};
use moescope::config::{Activation, ExpertKind, ModelConfig, Routing};
use moescope::model::moe::MoeLayer;
use moescope::model::params::ParamStore;
use moescope::model::Gpt;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn rand_tensor(rng: &mut ChaCha8Rng, shape: &[usize], scale: f64) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n)
        .map(|_| (rng.random::<f64>() * 2.0 - 1.0) * scale)
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// The MoE layer as docs/MEASURES.md defines it: every expert evaluated densely,
/// softmax router, top-k with ties to the lower index (on p + balance bias),
/// optional renormalisation; expert choice: each expert takes its
/// ⌈cf·n·k/E⌉ highest-probability tokens.
#[allow(clippy::needless_range_loop)]
fn moe_ref(m: &MoeLayer, x: &[Vec<f64>]) -> Vec<Vec<f64>> {
    let wr = rows(&m.router.weight);
    let probs: Vec<Vec<f64>> = x
        .iter()
        .map(|xt| {
            let logits: Vec<f64> = matvec(&wr, xt).iter().map(|l| l / m.temperature).collect();
            let mx = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = logits.iter().map(|l| (l - mx).exp()).sum();
            logits.iter().map(|l| (l - mx).exp() / z).collect()
        })
        .collect();
    let e_n = m.experts.len();
    let n = x.len();
    let bias: Vec<f64> = match &m.balance_bias {
        Some(b) => b.to_vec1::<f64>().unwrap(),
        None => vec![0.0; e_n],
    };
    let sel: Vec<Vec<usize>> = match m.routing {
        Routing::Topk => probs
            .iter()
            .map(|p| {
                let s: Vec<f64> = p.iter().zip(&bias).map(|(a, b)| a + b).collect();
                let mut idx: Vec<usize> = (0..e_n).collect();
                idx.sort_by(|&a, &b| s[b].partial_cmp(&s[a]).unwrap().then(a.cmp(&b)));
                idx[..m.top_k].to_vec()
            })
            .collect(),
        Routing::Soft => vec![(0..e_n).collect(); n],
        Routing::ExpertChoice => {
            let cf = if m.capacity_factor > 0.0 {
                m.capacity_factor
            } else {
                1.0
            };
            let cap = ((cf * (n * m.top_k) as f64 / e_n as f64).ceil() as usize).clamp(1, n);
            let mut sel = vec![Vec::new(); n];
            for e in 0..e_n {
                let mut ts: Vec<usize> = (0..n).collect();
                ts.sort_by(|&a, &b| {
                    probs[b][e]
                        .partial_cmp(&probs[a][e])
                        .unwrap()
                        .then(a.cmp(&b))
                });
                for &t in &ts[..cap] {
                    sel[t].push(e);
                }
            }
            sel
        }
    };
    x.iter()
        .zip(&probs)
        .zip(&sel)
        .map(|((xt, p), sel)| {
            let denom: f64 = if m.routing == Routing::Topk && m.norm_topk {
                sel.iter().map(|&e| p[e]).sum()
            } else {
                1.0
            };
            let mut y = vec![0.0; xt.len()];
            for &e in sel {
                for (yi, v) in y.iter_mut().zip(expert_ref(&m.experts[e], xt)) {
                    *yi += p[e] / denom * v;
                }
            }
            y
        })
        .collect()
}

fn moe_cfg(
    expert: ExpertKind,
    activation: Activation,
    routing: Routing,
    norm_topk: bool,
    top_k: usize,
) -> ModelConfig {
    // Loss-free balancing bias on the top-2 renormalised SwiGLU variant; a
    // capacity factor of 1.25 for expert choice.
    let balance_bias = routing == Routing::Topk && expert == ExpertKind::Swiglu;
    let capacity_factor = if routing == Routing::ExpertChoice {
        1.25
    } else {
        0.0
    };
    // A non-unit router temperature for the soft variants, so that it is tested too.
    let router_temperature = if routing == Routing::Soft { 0.7 } else { 1.0 };
    ModelConfig {
        d_model: 12,
        d_ff: 20,
        n_experts: 5,
        top_k,
        expert,
        activation,
        routing,
        norm_topk,
        router_temperature,
        balance_bias,
        capacity_factor,
        ..common::micro_model()
    }
}

const VARIANTS: &[(ExpertKind, Activation, Routing, bool, usize)] = &[
    (ExpertKind::Mlp, Activation::Silu, Routing::Topk, true, 2),
    (ExpertKind::Mlp, Activation::Gelu, Routing::Topk, false, 3),
    (ExpertKind::Swiglu, Activation::Silu, Routing::Topk, true, 2),
    (ExpertKind::Mlp, Activation::Silu, Routing::Topk, true, 1),
    (ExpertKind::Mlp, Activation::Silu, Routing::Soft, true, 2),
    (
        ExpertKind::Swiglu,
        Activation::Silu,
        Routing::Soft,
        false,
        2,
    ),
    (
        ExpertKind::Mlp,
        Activation::Silu,
        Routing::ExpertChoice,
        false,
        2,
    ),
];

fn build_moe(cfg: &ModelConfig, seed: u64) -> (MoeLayer, ParamStore) {
    let mut ps = ParamStore::new(DType::F64, &Device::Cpu, seed);
    // Larger-than-default init so that routing and activations are far from trivial.
    let m = MoeLayer::new(&mut ps, "moe", cfg, 0.4, 0.3).unwrap();
    // Non-zero biases, so that they are tested too.
    let mut rng = ChaCha8Rng::seed_from_u64(seed + 100);
    for (name, v) in ps.names().iter().zip(ps.vars()) {
        if name.ends_with("bias") {
            v.set(&rand_tensor(&mut rng, v.dims(), 0.3)).unwrap();
        }
    }
    (m, ps)
}

#[test]
fn dispatch_equals_dense_f64_reference() {
    for (i, &(ek, act, routing, norm, k)) in VARIANTS.iter().enumerate() {
        let cfg = moe_cfg(ek, act, routing, norm, k);
        let (moe, _ps) = build_moe(&cfg, i as u64);
        let mut rng = ChaCha8Rng::seed_from_u64(7 + i as u64);
        let x = rand_tensor(&mut rng, &[37, cfg.d_model], 1.5);
        let (y, _) = moe.forward(&x, false).unwrap();
        let want = moe_ref(&moe, &rows(&x));
        let got = rows(&y);
        for (a, b) in got.iter().flatten().zip(want.iter().flatten()) {
            assert!((a - b).abs() < 1e-10, "variant {i}: {a} vs {b}");
        }
    }
}

/// Finite-difference check of d(sum(y ⊙ R))/dθ on the dispatch path, f64.
#[test]
fn moe_gradients_match_finite_differences() {
    for (i, &(ek, act, routing, norm, k)) in VARIANTS.iter().enumerate() {
        let cfg = moe_cfg(ek, act, routing, norm, k);
        let (moe, ps) = build_moe(&cfg, 50 + i as u64);
        let mut rng = ChaCha8Rng::seed_from_u64(9 + i as u64);
        let x = Var::from_tensor(&rand_tensor(&mut rng, &[9, cfg.d_model], 1.5)).unwrap();
        let r = rand_tensor(&mut rng, &[9, cfg.d_model], 1.0);
        let loss = |moe: &MoeLayer| -> f64 {
            let (y, _) = moe.forward(x.as_tensor(), false).unwrap();
            (y * &r)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        let (y, _) = moe.forward(x.as_tensor(), false).unwrap();
        let grads = (y * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let mut checked = 0;
        let mut targets: Vec<(String, Var)> = ps
            .names()
            .iter()
            .cloned()
            .zip(ps.vars().iter().cloned())
            .collect();
        targets.push(("x".into(), x.clone()));
        for (name, var) in &targets {
            let Some(g) = grads.get(var.as_tensor()) else {
                // Only an expert that received no token may lack a gradient;
                // the balancing bias only selects (no gradient by design).
                assert!(
                    name.contains("experts") || name.ends_with("balance_bias"),
                    "variant {i}: no gradient for {name}"
                );
                continue;
            };
            let g: Vec<f64> = g.flatten_all().unwrap().to_vec1().unwrap();
            let base: Vec<f64> = var.flatten_all().unwrap().to_vec1().unwrap();
            for _ in 0..4 {
                let j = rng.random_range(0..base.len());
                let eps = 1e-6;
                let mut plus = base.clone();
                plus[j] += eps;
                var.set(&Tensor::from_vec(plus, var.shape(), &Device::Cpu).unwrap())
                    .unwrap();
                let lp = loss(&moe);
                let mut minus = base.clone();
                minus[j] -= eps;
                var.set(&Tensor::from_vec(minus, var.shape(), &Device::Cpu).unwrap())
                    .unwrap();
                let lm = loss(&moe);
                var.set(&Tensor::from_vec(base.clone(), var.shape(), &Device::Cpu).unwrap())
                    .unwrap();
                let fd = (lp - lm) / (2.0 * eps);
                let tol = 1e-6 * (1.0 + fd.abs().max(g[j].abs()));
                assert!(
                    (fd - g[j]).abs() < tol,
                    "variant {i} {name}[{j}]: autodiff {} vs finite difference {fd}",
                    g[j]
                );
                checked += 1;
            }
        }
        assert!(checked > 20);
    }
}

#[test]
fn every_parameter_receives_a_nonzero_gradient() {
    let variants = [
        (ExpertKind::Mlp, Activation::Silu, Routing::Topk, 1usize),
        (ExpertKind::Swiglu, Activation::Silu, Routing::Topk, 1),
        (ExpertKind::Mlp, Activation::Gelu, Routing::Soft, 2),
    ];
    for (ek, act, routing, moe_every) in variants {
        let cfg = ModelConfig {
            expert: ek,
            activation: act,
            routing,
            moe_every,
            ..common::micro_model()
        };
        let model = Gpt::new(&cfg, DType::F32, &Device::Cpu, 1).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let toks: Vec<u32> = (0..4 * cfg.seq_len)
            .map(|_| rng.random_range(0..cfg.vocab_size as u32))
            .collect();
        let x = Tensor::from_vec(toks.clone(), (4, cfg.seq_len), &Device::Cpu).unwrap();
        let y = Tensor::from_vec(
            toks.iter()
                .map(|t| (t * 7 + 1) % cfg.vocab_size as u32)
                .collect::<Vec<_>>(),
            (4, cfg.seq_len),
            &Device::Cpu,
        )
        .unwrap();
        let grads = model.loss(&x, &y).unwrap().backward().unwrap();
        for (name, var) in model.params.names().iter().zip(model.params.vars()) {
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{name}: no gradient ({ek:?}, {routing:?})"));
            let s = g
                .abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(
                s > 0.0 && s.is_finite(),
                "{name}: gradient sum {s} ({ek:?}, {routing:?})"
            );
        }
    }
}

#[test]
fn attention_is_causal_and_initial_loss_is_ln_vocab() {
    let cfg = common::micro_model();
    let model = Gpt::new(&cfg, DType::F64, &Device::Cpu, 5).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let a: Vec<u32> = (0..cfg.seq_len)
        .map(|_| rng.random_range(0..cfg.vocab_size as u32))
        .collect();
    let mut b = a.clone();
    for t in b.iter_mut().skip(10) {
        *t = (*t + 1) % cfg.vocab_size as u32;
    }
    let logits = |toks: &[u32]| {
        let x = Tensor::new(toks, &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        rows(&model.forward(&x, false).unwrap().logits)
    };
    let (la, lb) = (logits(&a), logits(&b));
    for t in 0..cfg.seq_len {
        let same = la[t].iter().zip(&lb[t]).all(|(x, y)| (x - y).abs() < 1e-12);
        assert_eq!(same, t < 10, "position {t}");
    }
    let x = Tensor::new(a.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let targets: Vec<u32> = (0..cfg.seq_len)
        .map(|_| rng.random_range(0..cfg.vocab_size as u32))
        .collect();
    let y = Tensor::new(targets.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let loss = model.loss(&x, &y).unwrap().to_scalar::<f64>().unwrap();
    assert!((loss - (cfg.vocab_size as f64).ln()).abs() < 0.1, "{loss}");
}
