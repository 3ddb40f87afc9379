//! `moescope bench jacobian`: Jacobian alignment on a random MoE layer,
//! exact vs estimate vs the naive way (autodiff Jacobians, Frobenius products).

use crate::config::{ExpertKind, ModelConfig};
use crate::measures::jacobian::{
    layer_jacobian_uniform, JacobianMode, JacobianSettings, Precision, Workload,
};
use crate::model::moe::MoeLayer;
use crate::model::params::ParamStore;
use crate::Result;
use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use std::time::Instant;

/// Result of `moescope bench jacobian`.
#[derive(Debug, Clone, Serialize)]
pub struct JacobianBenchResult {
    pub mode: &'static str,
    pub d_model: usize,
    pub d_ff: usize,
    pub experts: usize,
    pub expert: String,
    pub tokens: usize,
    pub instances: usize,
    /// Seconds of exact alignment over every instance.
    pub exact_s: Option<f64>,
    /// Seconds of the estimator (64 probes) over every instance.
    pub estimate_s: f64,
    /// Naive: autodiff Jacobians (d backward passes), full d×d, Frobenius products;
    /// timed on `naive_tokens` tokens and scaled to all instances.
    pub naive_s_extrapolated: Option<f64>,
    pub naive_tokens: usize,
    pub speedup_exact_vs_naive: Option<f64>,
    /// max |A_exact − A_naive| on the naive tokens.
    pub max_abs_diff: Option<f64>,
    /// Which mode `auto` picks for this layer.
    pub auto_picks: String,
}

/// Time Jacobian alignment on a random MoE layer: exact vs estimate vs the naive way.
pub fn bench_jacobian(
    d: usize,
    f: usize,
    e: usize,
    swiglu: bool,
    tokens: usize,
    naive_tokens: usize,
    skip_exact: bool,
) -> Result<JacobianBenchResult> {
    let moe = random_moe_layer(d, f, e, swiglu)?;
    let (x, sel) = random_tokens_and_routes(tokens, d, e)?;
    let t0 = Instant::now();
    let est = layer_jacobian_uniform(
        &moe,
        &x,
        &sel,
        2,
        &JacobianSettings::new(JacobianMode::Estimate(64), Precision::F32),
    )?
    .expect("on");
    let estimate_s = t0.elapsed().as_secs_f64();
    let t_terms = if swiglu { 2 } else { 1 };
    let auto = if Workload::planned(d, f, e, t_terms, tokens, 2, false).picks_exact() {
        "exact"
    } else {
        "estimate"
    }
    .to_string();
    let (mut exact_s, mut naive, mut diff) = (None, None, None);
    if !skip_exact {
        let t0 = Instant::now();
        layer_jacobian_uniform(
            &moe,
            &x,
            &sel,
            2,
            &JacobianSettings::new(JacobianMode::Exact, Precision::F32),
        )?;
        exact_s = Some(t0.elapsed().as_secs_f64());
        let (per_token_s, max_diff) = time_naive(&moe, &x, &sel, naive_tokens.min(tokens))?;
        naive = Some(per_token_s * tokens as f64);
        diff = Some(max_diff);
    }
    Ok(JacobianBenchResult {
        mode: "jacobian",
        d_model: d,
        d_ff: f,
        experts: e,
        expert: if swiglu { "swiglu" } else { "mlp" }.into(),
        tokens,
        instances: est.instances,
        exact_s,
        estimate_s,
        naive_s_extrapolated: naive,
        naive_tokens,
        speedup_exact_vs_naive: match (naive, exact_s) {
            (Some(n), Some(e)) => Some(n / e),
            _ => None,
        },
        max_abs_diff: diff,
        auto_picks: auto,
    })
}

/// A top-2 MoE layer of `e` random experts (d → f → d), in f64.
fn random_moe_layer(d: usize, f: usize, e: usize, swiglu: bool) -> Result<MoeLayer> {
    let cfg = ModelConfig {
        d_model: d,
        d_ff: f,
        n_experts: e,
        top_k: 2,
        expert: if swiglu {
            ExpertKind::Swiglu
        } else {
            ExpertKind::Mlp
        },
        ..Default::default()
    };
    let mut ps = ParamStore::new(DType::F64, &Device::Cpu, 0);
    MoeLayer::new(
        &mut ps,
        "moe",
        &cfg,
        1.0 / (d as f64).sqrt(),
        1.0 / (f as f64).sqrt(),
    )
}

/// Standard normal inputs (tokens, d), each token routed to two distinct
/// random experts.
fn random_tokens_and_routes(tokens: usize, d: usize, e: usize) -> Result<(Tensor, Vec<u32>)> {
    use rand_distr::{Distribution, StandardNormal};
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let xv: Vec<f64> = (0..tokens * d)
        .map(|_| StandardNormal.sample(&mut rng))
        .collect();
    let x = Tensor::from_vec(xv, (tokens, d), &Device::Cpu)?;
    let sel: Vec<u32> = (0..tokens)
        .flat_map(|_| {
            let a = rng.random_range(0..e as u32);
            let b = (a + 1 + rng.random_range(0..e as u32 - 1)) % e as u32;
            [a, b]
        })
        .collect();
    Ok((x, sel))
}

/// The naive way on the first `n` tokens: autodiff Jacobians row by row,
/// then Frobenius products. Returns seconds per token and the largest
/// |exact − naive| alignment.
fn time_naive(moe: &MoeLayer, x: &Tensor, sel: &[u32], n: usize) -> Result<(f64, f64)> {
    let t0 = Instant::now();
    let mut max_diff: f64 = 0.0;
    for t in 0..n {
        let xt = x.narrow(0, t, 1)?;
        let (a, b) = (sel[2 * t] as usize, sel[2 * t + 1] as usize);
        let (ja, jb) = (
            autodiff_jacobian(moe, a, &xt)?,
            autodiff_jacobian(moe, b, &xt)?,
        );
        let dot = |p: &[f64], q: &[f64]| p.iter().zip(q).map(|(x, y)| x * y).sum::<f64>();
        let naive_a = dot(&ja, &jb) / (dot(&ja, &ja) * dot(&jb, &jb)).sqrt();
        let one = layer_jacobian_uniform(
            moe,
            &xt,
            &sel[2 * t..2 * t + 2],
            2,
            &JacobianSettings::new(JacobianMode::Exact, Precision::F32),
        )?
        .expect("on");
        max_diff = max_diff.max((one.mean.unwrap_or(0.0) - naive_a).abs());
    }
    Ok((t0.elapsed().as_secs_f64() / n.max(1) as f64, max_diff))
}

/// The d × d Jacobian of expert `e` at the one-token input `xt`, row-major,
/// one backward pass per output coordinate.
fn autodiff_jacobian(moe: &MoeLayer, e: usize, xt: &Tensor) -> Result<Vec<f64>> {
    let d = xt.dim(1)?;
    let mut rows = Vec::with_capacity(d * d);
    for k in 0..d {
        let xv = candle_core::Var::from_tensor(xt)?;
        let y = moe.experts[e].forward(xv.as_tensor())?;
        let g = y.narrow(1, k, 1)?.sum_all()?.backward()?;
        rows.extend(
            g.get(xv.as_tensor())
                .expect("grad")
                .flatten_all()?
                .to_vec1::<f64>()?,
        );
    }
    Ok(rows)
}
