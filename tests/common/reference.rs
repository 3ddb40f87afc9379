//! Independent f64 reference computations (plain loops over host vectors).
#![allow(dead_code)]

use candle_core::{DType, Tensor};
use moescope::config::Activation;
use moescope::model::moe::Expert;

pub fn rows(t: &Tensor) -> Vec<Vec<f64>> {
    t.to_dtype(DType::F64).unwrap().to_vec2().unwrap()
}
pub fn vec1(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64).unwrap().to_vec1().unwrap()
}

pub fn silu(x: f64) -> f64 {
    x / (1.0 + (-x).exp())
}
pub fn gelu(x: f64) -> f64 {
    0.5 * x * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x)).tanh())
}
pub fn matvec(w: &[Vec<f64>], x: &[f64]) -> Vec<f64> {
    w.iter()
        .map(|r| r.iter().zip(x).map(|(a, b)| a * b).sum())
        .collect()
}
pub fn add(a: &mut [f64], b: &[f64]) {
    a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
}

/// f_e(x) computed with loops from the expert's weights.
pub fn expert_ref(e: &Expert, x: &[f64]) -> Vec<f64> {
    let h = expert_hidden_ref(e, x);
    let mut y = matvec(&rows(&e.down.weight), &h);
    if let Some(b) = &e.down.bias {
        add(&mut y, &vec1(b));
    }
    y
}

/// The expert's hidden activation φ(W_up x + b) (SwiGLU: silu(W_gate x) ⊙ W_up x).
pub fn expert_hidden_ref(e: &Expert, x: &[f64]) -> Vec<f64> {
    let mut u = matvec(&rows(&e.up.weight), x);
    if let Some(b) = &e.up.bias {
        add(&mut u, &vec1(b));
    }
    let h: Vec<f64> = match &e.gate {
        Some(g) => matvec(&rows(&g.weight), x)
            .iter()
            .zip(&u)
            .map(|(gv, uv)| silu(*gv) * uv)
            .collect(),
        None => u
            .iter()
            .map(|&v| {
                if e.activation == Activation::Silu {
                    silu(v)
                } else {
                    gelu(v)
                }
            })
            .collect(),
    };
    h
}

/// Softmax of W_r x.
pub fn router_probs(wr: &[Vec<f64>], x: &[f64]) -> Vec<f64> {
    let logits = matvec(wr, x);
    let mx = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let z: f64 = logits.iter().map(|l| (l - mx).exp()).sum();
    logits.iter().map(|l| (l - mx).exp() / z).collect()
}

/// Indices of the k largest probabilities, ties to the lower index.
pub fn top_k(p: &[f64], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..p.len()).collect();
    idx.sort_by(|&a, &b| p[b].partial_cmp(&p[a]).unwrap().then(a.cmp(&b)));
    idx.truncate(k);
    idx
}

/// cos²(a, b), 0 when either is the zero vector.
pub fn cos2(a: &[f64], b: &[f64]) -> f64 {
    let ab: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let aa: f64 = a.iter().map(|x| x * x).sum();
    let bb: f64 = b.iter().map(|x| x * x).sum();
    if aa == 0.0 || bb == 0.0 {
        0.0
    } else {
        ab * ab / (aa * bb)
    }
}
