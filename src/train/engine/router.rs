//! The top-k router after its linear map: softmax over the experts, the k
//! best (shared rule: `kernels::top_k`), their gates; and the backward from
//! the gates' gradients to the router logits.

use super::Dims;
use crate::kernels::{self, Real};
use rayon::prelude::*;

/// `probs` holds the router logits (n × E) on entry and their softmax on
/// return; `sel` (n × k) the chosen experts, best first, and `gates` their
/// probabilities, renormalised over the k with `norm_topk`.
pub(super) fn router_forward<T: Real>(
    probs: &mut [T],
    sel: &mut [u32],
    gates: &mut [T],
    dims: Dims,
    norm_topk: bool,
) {
    let (e, k) = (dims.e, dims.k);
    probs
        .par_chunks_mut(e)
        .zip(sel.par_chunks_mut(k).zip(gates.par_chunks_mut(k)))
        .for_each(|(p, (sel, g))| {
            kernels::softmax_rows(p, e);
            kernels::top_k(p, sel);
            for (g, &x) in g.iter_mut().zip(&*sel) {
                *g = p[x as usize];
            }
            if norm_topk {
                let z: T = g.iter().copied().sum();
                g.iter_mut().for_each(|g| *g = *g / z);
            }
        });
}

/// Backward of [`router_forward`]: from ∂L/∂gate of each packed row
/// (`dgate_row`, row of each slot in `row_of`), writes ∂L/∂logits (n × E).
pub(super) fn router_backward<T: Real>(
    dlogits: &mut [T],
    probs: &[T],
    sel: &[u32],
    row_of: &[u32],
    dgate_row: &[T],
    dims: Dims,
    norm_topk: bool,
) {
    let (e, k) = (dims.e, dims.k);
    dlogits.par_chunks_mut(e).enumerate().for_each(|(i, dz)| {
        let pr = &probs[i * e..][..e];
        dz.fill(T::zero());
        let slots = i * k..(i + 1) * k;
        let dg = |s: usize| dgate_row[row_of[s] as usize];
        if norm_topk {
            // g_s = p_s / Σ p: dp_s = (dg_s − Σ_j dg_j g_j) / Σ p
            let z: T = slots.clone().map(|s| pr[sel[s] as usize]).sum();
            let dot: T = slots.clone().map(|s| dg(s) * pr[sel[s] as usize] / z).sum();
            for s in slots {
                dz[sel[s] as usize] = (dg(s) - dot) / z;
            }
        } else {
            for s in slots {
                dz[sel[s] as usize] = dg(s);
            }
        }
        // softmax: dlogit = p ⊙ (dp − ⟨dp, p⟩)
        let dot: T = dz.iter().zip(pr).map(|(&a, &b)| a * b).sum();
        for j in 0..e {
            dz[j] = pr[j] * (dz[j] - dot);
        }
    });
}
