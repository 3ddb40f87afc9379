//! The regulariser and load-balancing zoo. Every term is computed from the
//! training forward pass's [`RoutingOnGraph`] (router logits and probabilities on the
//! graph, the selection, the routed expert outputs), averaged over the MoE
//! layers, weighted by its own λ and logged under its own name.
//!
//! | term | formula (one layer; n tokens, E experts) |
//! |---|---|
//! | `act` | SPEC's activation MSO on the batch: mean over tokens with ≥ 2 experts of the mean over their expert pairs of cos²(h_i(x), h_j(x)) |
//! | `contrastive` | InfoNCE against expert centroids: c_e = normalise(Σ_{rows of e} ĥ), −mean_rows log softmax_e'(ĥ·c_e' / τ)[e] over the experts present |
//! | `entropy` | −H(p̄), p̄ = mean_t p(x_t): minimising it maximises batch-level selection entropy |
//! | `token_entropy` | mean_t H(p(x_t)) = mean_t [logsumexp(z_t) − Σ_e p_te z_te] (z = logits / T) |
//! | `aux` | Switch Transformer: E · Σ_e f_e · P_e, f_e = router assignments to e / all assignments (top-k aware, before drops), P_e = p̄_e |
//! | `z` | ST-MoE router z-loss: mean_t (logsumexp_e W_r x_t)² |
//! | `grad` | Σ_{i<j} cos²(g_i, g_j) of the experts' gradients g_e of one family; applied to the update (below) |
//!
//! Gradient-space orthogonality needs the gradient of a function of
//! gradients (second order), which candle's autodiff does not provide. It is
//! applied as a first-order step on the update instead: with the experts'
//! gradients g fixed for the step, ĝ_e = g_e − λ ‖g_e‖² ∂P/∂g_e where
//! P = Σ_{i<j} cos²(g_i, g_j), which turns each expert's update direction
//! away from the others' by an angle of order λ (P is scale-free, so
//! ∂P/∂g_e ⊥ g_e has size ~1/‖g_e‖; without the ‖g_e‖² factor small
//! gradients would be swamped). Experts without gradient this step are left out.
//!
//! Loss-free balancing (Wang et al. 2024) has no loss: a per-expert bias is
//! added to the router probabilities for top-k selection only, and after
//! every step b_e ← b_e + γ · sign(mean load − load_e).

use crate::config::RegConfig;
use crate::measures::{gram_penalty, Family};
use crate::model::layers::cross_entropy_rows_composed;
use crate::model::moe::RoutingOnGraph;
use crate::model::Gpt;
use crate::Result;
use candle_core::{DType, Tensor, Var, D};
use std::collections::BTreeMap;

/// Whether the training forward pass must keep the expert outputs on the graph.
pub fn needs_outputs(r: &RegConfig) -> bool {
    r.act_lambda > 0.0 || r.contrastive_lambda > 0.0
}

/// Rows normalised to unit length (eps keeps zero rows at zero).
fn unit_rows(h: &Tensor) -> Result<Tensor> {
    let n = (h.sqr()?.sum_keepdim(D::Minus1)? + 1e-12)?.sqrt()?;
    Ok(h.broadcast_div(&n)?)
}

/// Activation-space overlap of one layer (differentiable), or None when no
/// token has two experts.
pub fn act_overlap(aux: &RoutingOnGraph) -> Result<Option<Tensor>> {
    let (h, token, _) = aux.outputs.as_ref().expect("keep_outputs was asked");
    let n = aux.selected.len() / aux.k;
    let mut rows_of: Vec<Vec<u32>> = vec![Vec::new(); n];
    for (r, &t) in token.iter().enumerate() {
        rows_of[t as usize].push(r as u32);
    }
    let (mut ia, mut ib, mut w) = (Vec::new(), Vec::new(), Vec::new());
    let with_pairs = rows_of.iter().filter(|r| r.len() >= 2).count();
    if with_pairs == 0 {
        return Ok(None);
    }
    for rs in &rows_of {
        let m = rs.len();
        if m < 2 {
            continue;
        }
        let wt = 2.0 / (m * (m - 1)) as f64 / with_pairs as f64;
        for a in 0..m {
            for b in a + 1..m {
                ia.push(rs[a]);
                ib.push(rs[b]);
                w.push(wt);
            }
        }
    }
    let hn = unit_rows(h)?;
    let dev = h.device();
    let a = hn.index_select(&Tensor::new(ia.as_slice(), dev)?, 0)?;
    let b = hn.index_select(&Tensor::new(ib.as_slice(), dev)?, 0)?;
    let cos = (a * b)?.sum(D::Minus1)?;
    let w = Tensor::new(w.as_slice(), dev)?.to_dtype(h.dtype())?;
    Ok(Some((cos.sqr()? * w)?.sum_all()?))
}

/// InfoNCE of routed expert outputs against the experts' centroids, or None
/// when fewer than two experts received tokens.
pub fn contrastive(aux: &RoutingOnGraph, tau: f64) -> Result<Option<Tensor>> {
    let (h, _, expert) = aux.outputs.as_ref().expect("keep_outputs was asked");
    let e_n = aux.routed_load.len();
    let mut present = vec![false; e_n];
    for &e in expert {
        present[e as usize] = true;
    }
    if present.iter().filter(|&&p| p).count() < 2 {
        return Ok(None);
    }
    let dev = h.device();
    let z = unit_rows(h)?; // (rows, d)
    let idx = Tensor::new(expert.as_slice(), dev)?;
    let sums = Tensor::zeros((e_n, z.dim(1)?), z.dtype(), dev)?.index_add(&idx, &z, 0)?;
    let c = unit_rows(&sums)?; // (E, d); absent experts stay 0 and are masked
    let mask: Vec<f64> = present
        .iter()
        .map(|&p| if p { 0.0 } else { -1e9 })
        .collect();
    let mask = Tensor::new(mask.as_slice(), dev)?.to_dtype(z.dtype())?;
    let logits = (z.matmul(&c.t()?)? / tau)?.broadcast_add(&mask)?;
    Ok(Some(
        cross_entropy_rows_composed(&logits, &idx)?.mean_all()?,
    ))
}

/// H(p̄) of the batch's mean router distribution (nats).
pub fn batch_entropy(aux: &RoutingOnGraph) -> Result<Tensor> {
    let pbar = aux.probs.mean(0)?;
    Ok((pbar.clone() * pbar.log()?)?.sum_all()?.neg()?)
}

/// Mean per-token router entropy, from the logits (stable when p underflows).
pub fn token_entropy(aux: &RoutingOnGraph, temperature: f64) -> Result<Tensor> {
    let z = (&aux.logits / temperature)?;
    let m = z.max_keepdim(D::Minus1)?.detach();
    let lse = (z.broadcast_sub(&m)?.exp()?.sum_keepdim(D::Minus1)?.log()? + &m)?;
    let pz = (&aux.probs * &z)?.sum_keepdim(D::Minus1)?;
    Ok((lse - pz)?.mean_all()?)
}

/// Switch-Transformer load-balancing loss E · Σ_e f_e P_e.
pub fn switch_aux(aux: &RoutingOnGraph) -> Result<Tensor> {
    let e_n = aux.routed_load.len();
    let total: u64 = aux.routed_load.iter().sum();
    let f: Vec<f64> = aux
        .routed_load
        .iter()
        .map(|&l| l as f64 / total.max(1) as f64)
        .collect();
    let f = Tensor::new(f.as_slice(), aux.probs.device())?.to_dtype(aux.probs.dtype())?;
    Ok(((aux.probs.mean(0)? * f)?.sum_all()? * e_n as f64)?)
}

/// Router z-loss mean_t (logsumexp_e logits_te)².
pub fn z_loss(aux: &RoutingOnGraph) -> Result<Tensor> {
    let z = &aux.logits;
    let m = z.max_keepdim(D::Minus1)?.detach();
    let lse = (z.broadcast_sub(&m)?.exp()?.sum_keepdim(D::Minus1)?.log()? + m)?;
    Ok(lse.sqr()?.mean_all()?)
}

/// The weighted sum of the batch terms (mean over MoE layers) and each
/// term's value, for one training forward pass.
pub struct BatchTerms {
    /// Σ λ_term · term, on the graph; None when every λ is 0.
    pub loss: Option<Tensor>,
    /// term name -> value (mean over layers), only the terms that are on.
    pub values: BTreeMap<&'static str, f64>,
    /// The value of `loss`: Σ λ_term · value.
    pub weighted: f64,
}

/// Compute every batch term whose λ is not zero.
pub fn batch_terms(r: &RegConfig, aux: &[RoutingOnGraph], temperature: f64) -> Result<BatchTerms> {
    type TermFn<'a> = Box<dyn Fn(&RoutingOnGraph) -> Result<Option<Tensor>> + 'a>;
    let terms: Vec<(&'static str, f64, TermFn)> = vec![
        ("act_loss", r.act_lambda, Box::new(act_overlap)),
        (
            "contrastive_loss",
            r.contrastive_lambda,
            Box::new(|a| contrastive(a, r.contrastive_temperature)),
        ),
        (
            "entropy_loss",
            r.entropy_lambda,
            Box::new(|a| Ok(Some(batch_entropy(a)?.neg()?))),
        ),
        (
            "token_entropy_loss",
            r.token_entropy_lambda,
            Box::new(|a| token_entropy(a, temperature).map(Some)),
        ),
        (
            "aux_loss",
            r.aux_lambda,
            Box::new(|a| switch_aux(a).map(Some)),
        ),
        ("z_loss", r.z_lambda, Box::new(|a| z_loss(a).map(Some))),
    ];
    let mut loss: Option<Tensor> = None;
    let mut values = BTreeMap::new();
    let mut weighted = 0.0;
    for (name, lambda, f) in terms {
        if lambda == 0.0 {
            continue;
        }
        let per: Vec<Tensor> = aux
            .iter()
            .map(&f)
            .collect::<Result<Vec<_>>>()?
            .into_iter()
            .flatten()
            .collect();
        if per.is_empty() {
            continue;
        }
        let mean = (Tensor::stack(&per, 0)?.sum_all()? / per.len() as f64)?;
        let v = mean.detach().to_dtype(DType::F64)?.to_scalar::<f64>()?;
        values.insert(name, v);
        weighted += lambda * v;
        let w = (mean * lambda)?;
        loss = Some(match loss {
            Some(l) => (l + w)?,
            None => w,
        });
    }
    Ok(BatchTerms {
        loss,
        values,
        weighted,
    })
}

/// P = Σ_{i<j} cos²(g_i, g_j) of the non-zero gradients `gs`, and ∂P/∂g_e
/// for each (None for zero gradients, which are left out).
pub fn grad_orth(gs: &[Tensor]) -> Result<(f64, Vec<Option<Tensor>>)> {
    let live: Vec<usize> = (0..gs.len())
        .filter(|&i| {
            gs[i]
                .sqr()
                .and_then(|s| s.sum_all())
                .and_then(|s| s.to_dtype(DType::F64))
                .and_then(|s| s.to_scalar::<f64>())
                .is_ok_and(|v| v > 0.0)
        })
        .collect();
    let mut out = vec![None; gs.len()];
    if live.len() < 2 {
        return Ok((0.0, out));
    }
    let vars: Vec<Var> = live
        .iter()
        .map(|&i| Var::from_tensor(&gs[i].detach()))
        .collect::<candle_core::Result<_>>()?;
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let p = gram_penalty(&ts, crate::measures::OrthForm::default())?;
    let value = p.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    let grads = p.backward()?;
    for (&i, v) in live.iter().zip(&vars) {
        out[i] = grads.get(v.as_tensor()).cloned();
    }
    Ok((value, out))
}

/// The gradient-space orthogonality step on one layer: P and
/// ĝ_e = g_e − λ ‖g_e‖² ∂P/∂g_e (zero gradients unchanged).
pub fn grad_orth_step(gs: &[Tensor], lambda: f64) -> Result<(f64, Vec<Tensor>)> {
    let (value, d) = grad_orth(gs)?;
    let turned = gs
        .iter()
        .zip(d)
        .map(|(g, d)| -> Result<Tensor> {
            Ok(match d {
                Some(d) => {
                    let sq = g
                        .sqr()?
                        .sum_all()?
                        .to_dtype(DType::F64)?
                        .to_scalar::<f64>()?;
                    (g - (d * (lambda * sq))?)?
                }
                None => g.clone(),
            })
        })
        .collect::<Result<_>>()?;
    Ok((value, turned))
}

/// Loss-free balancing update of one layer's bias: b_e += γ · sign(mean − load_e).
pub fn loss_free_update(bias: &Var, load: &[u64], gamma: f64) -> Result<()> {
    let mean = load.iter().sum::<u64>() as f64 / load.len() as f64;
    let delta: Vec<f64> = load
        .iter()
        .map(|&l| {
            let d = mean - l as f64;
            gamma
                * if d > 0.0 {
                    1.0
                } else if d < 0.0 {
                    -1.0
                } else {
                    0.0
                }
        })
        .collect();
    let delta = Tensor::new(delta.as_slice(), bias.device())?.to_dtype(bias.dtype())?;
    bias.set(&(bias.as_tensor() + delta)?)?;
    Ok(())
}

/// Gradient-space orthogonality: replace each MoE layer's expert
/// gradients of `family` by their turned versions; returns the mean P over layers.
pub fn apply_grad_orth(
    model: &Gpt,
    grads: &mut [Option<Tensor>],
    family: Family,
    lambda: f64,
) -> Result<f64> {
    let mut total = 0.0;
    let mut layers = 0usize;
    for (l, moe) in model.moe_layers() {
        let e_n = moe.n_experts();
        let p = format!("layers.{l}.moe");
        if family == Family::Router {
            // The experts' directions are the router's rows.
            let Some(i) = model.params.position(&format!("{p}.router.weight")) else {
                continue;
            };
            let Some(g) = grads[i].clone() else { continue };
            let rows: Vec<Tensor> = (0..e_n)
                .map(|e| g.narrow(0, e, 1))
                .collect::<candle_core::Result<_>>()?;
            let (v, turned) = grad_orth_step(&rows, lambda)?;
            grads[i] = Some(Tensor::cat(&turned, 0)?);
            total += v;
            layers += 1;
            continue;
        }
        let which = family.name();
        let ids: Option<Vec<usize>> = (0..e_n)
            .map(|e| {
                model
                    .params
                    .position(&format!("{p}.experts.{e}.{which}.weight"))
            })
            .collect();
        let Some(ids) = ids else { continue };
        // Experts without gradient this step count as zero and are left out.
        let gs: Vec<Tensor> = ids
            .iter()
            .map(|&i| match &grads[i] {
                Some(g) => Ok(g.clone()),
                None => model.params.vars()[i].as_tensor().zeros_like(),
            })
            .collect::<candle_core::Result<_>>()?;
        let (v, turned) = grad_orth_step(&gs, lambda)?;
        for (&i, g) in ids.iter().zip(turned) {
            if grads[i].is_some() {
                grads[i] = Some(g);
            }
        }
        total += v;
        layers += 1;
    }
    Ok(total / layers.max(1) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::moe::NO_EXPERT;
    use candle_core::Device;
    use rand::{Rng, SeedableRng};

    const E: usize = 4;

    fn rng() -> rand_chacha::ChaCha8Rng {
        rand_chacha::ChaCha8Rng::seed_from_u64(5)
    }

    fn randv(r: &mut rand_chacha::ChaCha8Rng, n: usize) -> Vec<f64> {
        (0..n).map(|_| r.random_range(-1.0..1.0)).collect()
    }

    fn softmax(z: &[f64]) -> Vec<f64> {
        let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let s: f64 = z.iter().map(|v| (v - m).exp()).sum();
        z.iter().map(|v| (v - m).exp() / s).collect()
    }

    /// A layer's aux from logits (n×E) and expert-output rows, f64, on the graph.
    struct Fixture {
        logits: Var,
        h: Var,
        selected: Vec<u32>,
        token: Vec<u32>,
        expert: Vec<u32>,
        n: usize,
        d: usize,
    }

    /// 5 tokens, top-2, token 3 lost its second slot (dropped).
    fn fixture() -> Fixture {
        let mut r = rng();
        let (n, d, k) = (5, 3, 2);
        let selected: Vec<u32> = vec![0, 1, 2, 0, 1, 3, 2, NO_EXPERT, 3, 1];
        let mut token = Vec::new();
        let mut expert = Vec::new();
        for e in 0..E as u32 {
            for t in 0..n {
                if selected[t * k..(t + 1) * k].contains(&e) {
                    token.push(t as u32);
                    expert.push(e);
                }
            }
        }
        let rows = token.len();
        Fixture {
            logits: Var::from_vec(randv(&mut r, n * E), (n, E), &Device::Cpu).unwrap(),
            h: Var::from_vec(randv(&mut r, rows * d), (rows, d), &Device::Cpu).unwrap(),
            selected,
            token,
            expert,
            n,
            d,
        }
    }

    fn aux_of(f: &Fixture, logits: &Tensor, h: &Tensor) -> RoutingOnGraph {
        let probs = crate::model::layers::softmax_last(logits).unwrap();
        let mut routed_load = vec![0u64; E];
        for &e in &f.selected {
            if e != NO_EXPERT {
                routed_load[e as usize] += 1;
            }
        }
        routed_load[3] += 1; // the dropped assignment still counts as routed
        RoutingOnGraph {
            logits: logits.clone(),
            probs,
            selected: f.selected.clone(),
            k: 2,
            outputs: Some((h.clone(), f.token.clone(), f.expert.clone())),
            dropped: 1,
            assigned: 10,
            routed_load,
        }
    }

    fn host(t: &Tensor) -> Vec<f64> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    fn scalar(t: &Tensor) -> f64 {
        t.to_scalar::<f64>().unwrap()
    }

    /// Independent f64 values of every term on the fixture.
    fn reference(f: &Fixture, tau: f64) -> BTreeMap<&'static str, f64> {
        let z = host(f.logits.as_tensor());
        let h = host(f.h.as_tensor());
        let (n, d) = (f.n, f.d);
        let p: Vec<Vec<f64>> = (0..n).map(|t| softmax(&z[t * E..(t + 1) * E])).collect();
        let unit = |r: usize| -> Vec<f64> {
            let v = &h[r * d..(r + 1) * d];
            let norm = (v.iter().map(|x| x * x).sum::<f64>() + 1e-12).sqrt();
            v.iter().map(|x| x / norm).collect()
        };
        let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
        let mut out = BTreeMap::new();
        // act: tokens with two experts; token 3 has one.
        let mut act = 0.0;
        let mut cnt = 0;
        for t in 0..n {
            let rs: Vec<usize> = (0..f.token.len())
                .filter(|&r| f.token[r] == t as u32)
                .collect();
            if rs.len() == 2 {
                act += dot(&unit(rs[0]), &unit(rs[1])).powi(2);
                cnt += 1;
            }
        }
        out.insert("act", act / cnt as f64);
        // contrastive
        let mut cent = vec![vec![0.0; d]; E];
        for r in 0..f.token.len() {
            for (c, u) in cent[f.expert[r] as usize].iter_mut().zip(unit(r)) {
                *c += u;
            }
        }
        let cent: Vec<Vec<f64>> = cent
            .iter()
            .map(|c| {
                let nn = (c.iter().map(|x| x * x).sum::<f64>() + 1e-12).sqrt();
                c.iter().map(|x| x / nn).collect()
            })
            .collect();
        let mut nce = 0.0;
        for r in 0..f.token.len() {
            let s: Vec<f64> = (0..E).map(|e| dot(&unit(r), &cent[e]) / tau).collect();
            let lse = s.iter().map(|v| v.exp()).sum::<f64>().ln();
            nce += lse - s[f.expert[r] as usize];
        }
        out.insert("contrastive", nce / f.token.len() as f64);
        let pbar: Vec<f64> = (0..E)
            .map(|e| p.iter().map(|pt| pt[e]).sum::<f64>() / n as f64)
            .collect();
        out.insert("entropy", -pbar.iter().map(|q| q * q.ln()).sum::<f64>());
        out.insert(
            "token_entropy",
            p.iter()
                .map(|pt| -pt.iter().map(|q| q * q.ln()).sum::<f64>())
                .sum::<f64>()
                / n as f64,
        );
        // f: router assignments incl. the dropped one (expert 3 of token 3), / 10.
        let counts = [2.0, 3.0, 2.0, 3.0];
        out.insert(
            "aux",
            E as f64 * (0..E).map(|e| counts[e] / 10.0 * pbar[e]).sum::<f64>(),
        );
        out.insert(
            "z",
            (0..n)
                .map(|t| {
                    z[t * E..(t + 1) * E]
                        .iter()
                        .map(|v| v.exp())
                        .sum::<f64>()
                        .ln()
                        .powi(2)
                })
                .sum::<f64>()
                / n as f64,
        );
        out
    }

    fn terms(f: &Fixture, logits: &Tensor, h: &Tensor, tau: f64) -> BTreeMap<&'static str, Tensor> {
        let a = aux_of(f, logits, h);
        let mut m = BTreeMap::new();
        m.insert("act", act_overlap(&a).unwrap().unwrap());
        m.insert("contrastive", contrastive(&a, tau).unwrap().unwrap());
        m.insert("entropy", batch_entropy(&a).unwrap());
        m.insert("token_entropy", token_entropy(&a, 1.0).unwrap());
        m.insert("aux", switch_aux(&a).unwrap());
        m.insert("z", z_loss(&a).unwrap());
        m
    }

    #[test]
    fn every_term_matches_an_independent_f64_computation() {
        let f = fixture();
        let want = reference(&f, 0.3);
        for (name, t) in terms(&f, f.logits.as_tensor(), f.h.as_tensor(), 0.3) {
            let (got, w) = (scalar(&t), want[name]);
            assert!(
                (got - w).abs() < 1e-12 * (1.0 + w.abs()),
                "{name}: {got} vs {w}"
            );
        }
    }

    #[test]
    fn every_term_has_finite_difference_gradients() {
        let f = fixture();
        let base = terms(&f, f.logits.as_tensor(), f.h.as_tensor(), 0.3);
        let eps = 1e-6;
        for (name, t) in &base {
            let g = t.backward().unwrap();
            for (which, var) in [("logits", &f.logits), ("h", &f.h)] {
                let analytic = g.get(var.as_tensor()).map(host);
                let x0 = host(var.as_tensor());
                for i in 0..x0.len() {
                    let mut fd = [0.0; 2];
                    for (j, sgn) in [1.0, -1.0].iter().enumerate() {
                        let mut x = x0.clone();
                        x[i] += sgn * eps;
                        let xt = Tensor::from_vec(x, var.dims(), &Device::Cpu).unwrap();
                        let m = if which == "logits" {
                            terms(&f, &xt, f.h.as_tensor(), 0.3)
                        } else {
                            terms(&f, f.logits.as_tensor(), &xt, 0.3)
                        };
                        fd[j] = scalar(&m[name]);
                    }
                    let num = (fd[0] - fd[1]) / (2.0 * eps);
                    let an = analytic.as_ref().map_or(0.0, |a| a[i]);
                    assert!(
                        (num - an).abs() < 1e-6,
                        "{name} d/d{which}[{i}]: analytic {an} vs numeric {num}"
                    );
                }
            }
        }
    }

    #[test]
    fn grad_orth_value_and_gradient() {
        let mut r = rng();
        let gs: Vec<Tensor> = (0..3)
            .map(|_| Tensor::from_vec(randv(&mut r, 6), (2, 3), &Device::Cpu).unwrap())
            .collect();
        let zero = Tensor::zeros((2, 3), DType::F64, &Device::Cpu).unwrap();
        let mut with_zero = gs.clone();
        with_zero.push(zero);
        let p = |gs: &[Vec<f64>]| -> f64 {
            let mut s = 0.0;
            for i in 0..gs.len() {
                for j in i + 1..gs.len() {
                    let dot: f64 = gs[i].iter().zip(&gs[j]).map(|(a, b)| a * b).sum();
                    let ni: f64 = gs[i].iter().map(|a| a * a).sum::<f64>().sqrt();
                    let nj: f64 = gs[j].iter().map(|a| a * a).sum::<f64>().sqrt();
                    s += (dot / (ni * nj)).powi(2);
                }
            }
            s
        };
        let hv: Vec<Vec<f64>> = gs.iter().map(host).collect();
        let (v, d) = grad_orth(&with_zero).unwrap();
        assert!((v - p(&hv)).abs() < 1e-12, "{v} vs {}", p(&hv));
        assert!(d[3].is_none(), "a zero gradient is left out");
        for e in 0..3 {
            let an = host(d[e].as_ref().unwrap());
            for i in 0..6 {
                let mut up = hv.clone();
                let mut dn = hv.clone();
                up[e][i] += 1e-6;
                dn[e][i] -= 1e-6;
                let num = (p(&up) - p(&dn)) / 2e-6;
                assert!(
                    (num - an[i]).abs() < 1e-6,
                    "∂P/∂g_{e}[{i}]: {} vs {num}",
                    an[i]
                );
            }
        }
    }

    #[test]
    fn loss_free_bias_moves_by_sign_of_load_error() {
        let b = Var::from_vec(vec![0.0f64, 0.1, -0.1, 0.0], 4, &Device::Cpu).unwrap();
        loss_free_update(&b, &[10, 2, 4, 4], 0.01).unwrap(); // mean 5
        let v = host(b.as_tensor());
        let want = [-0.01, 0.11, -0.09, 0.01];
        for (a, w) in v.iter().zip(want) {
            assert!((a - w).abs() < 1e-15, "{v:?}");
        }
    }
}
