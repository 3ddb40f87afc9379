//! L_orth = Σ_layers Σ_{i<j} cos²(w_i, w_j) over the flattened
//! up-projections of each MoE layer (SPEC eq. 1), its value and gradient.

use super::{moe, split_by_index, Engine};
use crate::kernels::Real;
use rayon::prelude::*;

/// Elements per parallel task of the gradient update.
const CHUNK: usize = 1 << 13;

impl<T: Real> Engine<T> {
    /// Adds λ·∂L_orth/∂W_up to the gradients and returns L_orth.
    pub fn add_orth_grad(&mut self, lambda: f64) -> f64 {
        let w = self.index.map(|r| &self.params[r.clone()]);
        let mut g = split_by_index(&mut self.grads, &self.index);
        let mut total = 0.0;
        for (bw, bg) in w.blocks.iter().zip(g.blocks.iter_mut()) {
            let ups: Vec<&[T]> = moe(&bw.ffn).1.iter().map(|x| x.up.weight).collect();
            let (value, coef) = orth_coefficients(&ups, lambda);
            total += value;
            if lambda == 0.0 {
                continue;
            }
            let grads = super::moe_mut(&mut bg.ffn)
                .1
                .iter_mut()
                .map(|x| &mut *x.up.weight);
            add_combinations(grads.collect(), &ups, &coef);
        }
        self.profile.lap("orth");
        total
    }

    /// L_orth of the current weights, gradients untouched.
    pub fn orth_value(&mut self) -> f64 {
        self.add_orth_grad(0.0)
    }
}

/// Σ_{i<j} cos²(w_i, w_j), and the coefficients A (E × E) of its gradient
/// times λ: ∂P/∂w_i = Σ_j A_ij w_j with A_ij = 2c_ij/(s_i s_j) (j ≠ i) and
/// A_ii = −2 Σ_{j≠i} c_ij² / s_i².
fn orth_coefficients<T: Real>(w: &[&[T]], lambda: f64) -> (f64, Vec<T>) {
    let e = w.len();
    let gram = crate::measures::raw_gram(w);
    let s: Vec<f64> = (0..e).map(|i| gram[i][i].sqrt().max(1e-30)).collect();
    let mut total = 0.0;
    let mut coef = vec![0.0f64; e * e];
    for i in 0..e {
        for j in 0..e {
            if i != j {
                let c = gram[i][j] / (s[i] * s[j]);
                if i < j {
                    total += c * c;
                }
                coef[i * e + j] = lambda * 2.0 * c / (s[i] * s[j]);
                coef[i * e + i] -= lambda * 2.0 * c * c / (s[i] * s[i]);
            }
        }
    }
    (total, coef.iter().map(|&c| T::c(c)).collect())
}

/// g_i += Σ_j coef_ij · w_j for every expert i, in parallel over chunks of
/// the (equal-length) flattened weights.
fn add_combinations<T: Real>(grads: Vec<&mut [T]>, w: &[&[T]], coef: &[T]) {
    let e = w.len();
    let len = w[0].len();
    // Chunk every expert's gradient the same way; chunk c of all experts together.
    let mut per_chunk: Vec<Vec<&mut [T]>> = (0..len.div_ceil(CHUNK))
        .map(|_| Vec::with_capacity(e))
        .collect();
    for gx in grads {
        for (c, piece) in gx.chunks_mut(CHUNK).enumerate() {
            per_chunk[c].push(piece);
        }
    }
    per_chunk
        .into_par_iter()
        .enumerate()
        .for_each(|(c, mut gch)| {
            let o = c * CHUNK;
            for (i, gi) in gch.iter_mut().enumerate() {
                for (q, gv) in gi.iter_mut().enumerate() {
                    let mut acc = T::zero();
                    for j in 0..e {
                        acc = acc + coef[i * e + j] * w[j][o + q];
                    }
                    *gv = *gv + acc;
                }
            }
        });
}
