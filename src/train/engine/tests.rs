//! The engine against the autodiff model (float64, to 1e-9), against float64
//! finite differences of its own loss, and its AdamW against `optim::AdamW`.

use super::*;
use crate::config::TrainConfig;
use crate::measures::OrthForm;
use crate::model::Gpt;
use crate::train::optim::AdamW;
use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};

fn small_cfg(bias: bool, norm_topk: bool) -> ModelConfig {
    ModelConfig {
        vocab_size: 40,
        seq_len: 8,
        n_layer: 2,
        n_head: 2,
        d_model: 16,
        d_ff: 24,
        n_experts: 4,
        top_k: 2,
        bias,
        norm_topk,
        ..Default::default()
    }
}

const ADAM: AdamParams = AdamParams {
    beta1: 0.9,
    beta2: 0.95,
    eps: 1e-8,
    weight_decay: 0.1,
    weight_decay_experts: 0.1,
};

fn tokens(n: usize, v: usize, seed: u64) -> Vec<u32> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| rng.random_range(0..v as u32)).collect()
}

/// The autodiff model's parameters in f64, with non-trivial LayerNorm
/// gains and biases (they start at 1 and 0).
fn model_f64(cfg: &ModelConfig) -> Gpt {
    let m = Gpt::new(cfg, DType::F64, &Device::Cpu, 3).unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
    for (name, var) in m.params.names().iter().zip(m.params.vars()) {
        if name.contains("ln") || name.ends_with(".bias") {
            let n = var.elem_count();
            let base = if name.ends_with(".weight") { 1.0 } else { 0.0 };
            let vals: Vec<f64> = (0..n).map(|_| base + rng.random_range(-0.3..0.3)).collect();
            var.set(&Tensor::from_vec(vals, var.shape(), &Device::Cpu).unwrap())
                .unwrap();
        }
    }
    m
}

fn named_f64(m: &Gpt) -> Vec<(String, Vec<usize>, Vec<f64>)> {
    m.params
        .names()
        .iter()
        .zip(m.params.vars())
        .map(|(n, v)| {
            (
                n.clone(),
                v.dims().to_vec(),
                v.flatten_all().unwrap().to_vec1::<f64>().unwrap(),
            )
        })
        .collect()
}

fn engine_f64(cfg: &ModelConfig, m: &Gpt) -> Engine<f64> {
    Engine::new(cfg, named_f64(m), ADAM).unwrap()
}

/// Loss and every gradient equal the autodiff model's (float64), with and
/// without biases and top-k renormalisation, L_orth included.
#[test]
fn gradients_match_the_autodiff_model() {
    use crate::config::{Granularity, OrthVariant};
    // Each combination also trains a different form of L_orth.
    let forms = [
        OrthForm::default(),
        OrthForm {
            granularity: Granularity::Rows,
            variant: OrthVariant::DetachedNorm,
        },
        OrthForm {
            granularity: Granularity::Cols,
            variant: OrthVariant::Unnormalized,
        },
    ];
    for ((bias, norm), form) in [(true, true), (false, false), (true, false)]
        .into_iter()
        .zip(forms)
    {
        let cfg = small_cfg(bias, norm);
        let m = model_f64(&cfg);
        let (b, t) = (3, 7); // t < seq_len: positions past t get no gradient
        let x = tokens(b * t, cfg.vocab_size, 1);
        let y = tokens(b * t, cfg.vocab_size, 2);
        let lam = 0.3;
        let xt = Tensor::from_vec(x.clone(), (b, t), &Device::Cpu).unwrap();
        let yt = Tensor::from_vec(y.clone(), (b, t), &Device::Cpu).unwrap();
        let ce = m.loss(&xt, &yt).unwrap();
        let orth = crate::measures::orth_loss(&m, crate::measures::Family::Up, form).unwrap();
        let total = (&ce + (&orth * lam).unwrap()).unwrap();
        let grads = total.backward().unwrap();

        let mut eng = engine_f64(&cfg, &m);
        let loss = eng.forward_backward(&x, &y, b, t, 1.0, false).unwrap();
        let o = eng.add_orth_grad(lam, form);
        assert!(
            (loss - ce.to_scalar::<f64>().unwrap()).abs() < 1e-12,
            "loss"
        );
        assert!((o - orth.to_scalar::<f64>().unwrap()).abs() < 1e-12, "orth");
        for (name, var) in m.params.names().iter().zip(m.params.vars()) {
            let want: Vec<f64> = match grads.get(var.as_tensor()) {
                Some(g) => g.flatten_all().unwrap().to_vec1().unwrap(),
                None => vec![0.0; var.elem_count()],
            };
            let r = eng.layout().find(|(n, _, _)| n == name).unwrap().2;
            let got = &eng.grads[r];
            let scale = want.iter().fold(1e-8f64, |a, v| a.max(v.abs()));
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (g - w).abs() <= 1e-9 * scale,
                    "bias {bias} norm {norm}: {name}[{i}]: {g} vs {w}"
                );
            }
        }
        // Accumulation: a second pass with acc adds the same again.
        let before = eng.grads.clone();
        eng.forward_backward(&x, &y, b, t, 1.0, true).unwrap();
        eng.add_orth_grad(lam, form);
        for (a, b0) in eng.grads.iter().zip(&before) {
            assert!((a - 2.0 * b0).abs() <= 1e-12 * (1.0 + b0.abs()));
        }
    }
}

/// Directional finite differences of the engine's own float64 loss, one
/// random direction per parameter tensor.
#[test]
fn gradient_matches_finite_differences() {
    let cfg = small_cfg(true, true);
    let m = model_f64(&cfg);
    let mut eng = engine_f64(&cfg, &m);
    let (b, t) = (2, 8);
    let x = tokens(b * t, cfg.vocab_size, 4);
    let y = tokens(b * t, cfg.vocab_size, 5);
    let lam = 0.5;
    let loss_at = |e: &mut Engine<f64>| {
        let ce = e.forward_backward(&x, &y, b, t, 1.0, false).unwrap();
        ce + lam * e.add_orth_grad(lam, OrthForm::default())
    };
    loss_at(&mut eng);
    let g = eng.grads.clone();
    let p0 = eng.params.clone();
    let layout: Vec<(String, Range<usize>)> =
        eng.layout().map(|(n, _, r)| (n.to_string(), r)).collect();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(6);
    for (name, r) in layout {
        let u: Vec<f64> = r.clone().map(|_| rng.random_range(-1.0..1.0)).collect();
        let h = 1e-6;
        let mut at = |s: f64| {
            eng.params = p0.clone();
            for (p, u) in eng.params[r.clone()].iter_mut().zip(&u) {
                *p += s * u;
            }
            loss_at(&mut eng)
        };
        let fd = (at(h) - at(-h)) / (2.0 * h);
        let an: f64 = g[r.clone()].iter().zip(&u).map(|(g, u)| g * u).sum();
        assert!(
            (fd - an).abs() < 1e-7 * (1.0 + an.abs()),
            "{name}: {fd} vs {an}"
        );
    }
}

/// The engine's AdamW step equals `optim::AdamW`'s on the same gradients,
/// and `from_model` / `store_weights` / `store_optimizer` carry parameters
/// and moments both ways.
#[test]
fn adamw_matches_the_reference_optimizer() {
    let cfg = small_cfg(true, true);
    let m = Gpt::new(&cfg, DType::F32, &Device::Cpu, 1).unwrap();
    // Expert matrices in their own decay group, as `train.weight_decay_experts` sets.
    let tc = TrainConfig {
        weight_decay_experts: 0.03,
        ..Default::default()
    };
    let adam = AdamParams {
        beta1: tc.beta1,
        beta2: tc.beta2,
        eps: tc.eps,
        weight_decay: tc.weight_decay,
        weight_decay_experts: 0.03,
    };
    let mut opt = AdamW::new(&m.params, &tc).unwrap();
    let mut eng = Engine::from_model(&cfg, &m.params, Some(&opt), adam).unwrap();
    let (b, t) = (2, 8);
    let x = tokens(b * t, cfg.vocab_size, 7);
    let y = tokens(b * t, cfg.vocab_size, 8);
    for step in 0..3 {
        eng.forward_backward(&x, &y, b, t, 1.0, false).unwrap();
        let grads: Vec<Option<Tensor>> = eng
            .layout()
            .map(|(_, s, r)| Some(Tensor::from_slice(&eng.grads[r], s, &Device::Cpu).unwrap()))
            .collect();
        let lr = 1e-2 * (step + 1) as f64;
        opt.step(&m.params, &grads, lr).unwrap();
        eng.adamw_step(lr, 1.0);
        // Reference parameters now, and the engine's after a round trip.
        let want: Vec<f32> = m
            .params
            .vars()
            .iter()
            .flat_map(|v| v.flatten_all().unwrap().to_vec1::<f32>().unwrap())
            .collect();
        for (i, (a, w)) in eng.params.iter().zip(&want).enumerate() {
            assert!(
                (a - w).abs() <= 1e-6 * (1.0 + w.abs()),
                "step {step} param {i}: {a} vs {w}"
            );
        }
    }
    // store_weights/store_optimizer then from_model() reproduce the engine exactly.
    let mut opt2 = AdamW::new(&m.params, &tc).unwrap();
    eng.store_weights(&m.params).unwrap();
    eng.store_optimizer(&m.params, &mut opt2).unwrap();
    let back = Engine::from_model(&cfg, &m.params, Some(&opt2), adam).unwrap();
    assert_eq!(back.params, eng.params);
    assert_eq!(back.m, eng.m);
    assert_eq!(back.v, eng.v);
    assert_eq!(back.t, 3);
}

#[test]
fn bad_batches_are_errors() {
    let cfg = small_cfg(true, true);
    let m = model_f64(&cfg);
    let mut eng = engine_f64(&cfg, &m);
    let x = tokens(16, cfg.vocab_size, 1);
    let mut bad = x.clone();
    bad[3] = 40;
    let e = eng
        .forward_backward(&bad, &x, 2, 8, 1.0, false)
        .unwrap_err();
    assert!(e.to_string().contains("token id 40"), "{e}");
    let e = eng.forward_backward(&x, &x, 1, 16, 1.0, false).unwrap_err();
    assert!(e.to_string().contains("seq_len"), "{e}");
    let e = eng
        .forward_backward(&x[..15], &x, 2, 8, 1.0, false)
        .unwrap_err();
    assert!(e.to_string().contains("15 inputs"), "{e}");
}

#[test]
fn coverage_names_the_first_gap() {
    let mut cfg = crate::config::Config::preset("tiny").unwrap();
    assert_eq!(unsupported(&cfg), None);
    cfg.model.routing = crate::config::Routing::Soft;
    assert_eq!(unsupported(&cfg), Some("model.routing is not topk"));
}

#[test]
fn models_outside_the_coverage_are_errors() {
    let mut cfg = small_cfg(true, true);
    cfg.moe_every = 2;
    let m = Gpt::new(&cfg, DType::F64, &Device::Cpu, 3).unwrap();
    let e = Engine::new(&cfg, named_f64(&m), ADAM).err().unwrap();
    assert!(e.to_string().contains("dense FFN layers"), "{e}");
}

/// Evaluation on the engine's forward pass gives the autodiff model's loss
/// and, on the measured windows, its activation overlap in every space and
/// its routing telemetry (float32 both, to 1e-5).
#[test]
fn evaluation_on_the_engine_matches_the_model() {
    use crate::config::ActSpace;
    use crate::data::cache::TokenFile;
    use crate::train::eval::{evaluate_with, MeasureSpec};
    let cfg = small_cfg(true, true);
    let model = Gpt::new(&cfg, DType::F32, &Device::Cpu, 5).unwrap();
    let adam = ADAM;
    let mut eng = Engine::from_model(&cfg, &model.params, None, adam).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("valid.bin");
    // 61 tokens: 7 full windows of 8 and a short one, batched 3 at a time.
    TokenFile::write(&path, &tokens(61, cfg.vocab_size, 4), "t", "h", "valid").unwrap();
    let data = TokenFile::open(&path).unwrap();
    let spec = MeasureSpec {
        tokens: 32,
        seed: 1,
        spaces: vec![ActSpace::Output, ActSpace::Hidden, ActSpace::HiddenLn],
    };
    let run = |fwd: &mut dyn crate::train::eval::EvalForward| {
        evaluate_with(fwd, &cfg, &data, 3, 0, Some(spec.clone())).unwrap()
    };
    let (ev_m, acc_m) = run(&mut &model);
    let (ev_e, acc_e) = run(&mut eng);
    assert_eq!(ev_m.tokens, 60);
    assert_eq!(ev_e.tokens, ev_m.tokens);
    assert!(
        (ev_e.loss - ev_m.loss).abs() < 1e-5 * ev_m.loss,
        "{ev_e:?} vs {ev_m:?}"
    );
    let (acc_m, acc_e) = (acc_m.unwrap(), acc_e.unwrap());
    assert_eq!(acc_m.len(), 3);
    for (sm, se) in acc_m.iter().zip(&acc_e) {
        assert_eq!(sm.space, se.space);
        for (lm, le) in sm.layers.iter().zip(&se.layers) {
            assert_eq!(lm.tokens, le.tokens);
            let (am, ae) = (lm.act_mso().unwrap(), le.act_mso().unwrap());
            assert!((am - ae).abs() < 1e-5, "{:?}: {am} vs {ae}", sm.space);
            let (tm, te) = (lm.telemetry(), le.telemetry());
            assert_eq!(tm.load, te.load);
            assert!((tm.router_entropy - te.router_entropy).abs() < 1e-5);
        }
    }
}

/// The model made from the engine's state (no initialisation drawn) holds
/// exactly the engine's weights, in every parameter.
#[test]
fn the_model_made_from_the_engine_holds_its_weights() {
    let cfg = small_cfg(true, false);
    let model = Gpt::new(&cfg, DType::F32, &Device::Cpu, 8).unwrap();
    let mut eng = Engine::from_model(&cfg, &model.params, None, ADAM).unwrap();
    // Move the engine away from the model's values first.
    eng.params.iter_mut().for_each(|p| *p = *p * 1.5 + 0.25);
    let made = eng.to_model().unwrap();
    assert_eq!(made.params.names(), model.params.names());
    for ((_, _, r), var) in eng.layout().zip(made.params.vars()) {
        let got = var.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(got, eng.params[r].to_vec());
    }
}
