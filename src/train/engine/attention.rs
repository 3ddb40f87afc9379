//! Causal multi-head self-attention on a packed q | k | v buffer, forward
//! and backward. Each (batch, head) is one task: two small GEMMs around the
//! causal softmax, on strided views of the heads.

use super::Dims;
use crate::kernels::gemm::{matmul, Par, View};
use crate::kernels::{self, Real};
use rayon::prelude::*;

/// The q, k and v of head `hi` of sequence `bi`: strided (t × hd) views of
/// `qkv` (n × 3d).
fn head_views<T>(qkv: &[T], bi: usize, hi: usize, dims: Dims) -> [View<'_, T>; 3] {
    let (t, d, hd) = (dims.t, dims.d, dims.hd);
    let base = bi * t * 3 * d + hi * hd;
    [0, d, 2 * d].map(|o| View::strided(&qkv[base + o..], t, hd, 3 * d))
}

fn scale<T: Real>(dims: Dims) -> T {
    T::c(1.0 / (dims.hd as f64).sqrt())
}

/// Per (batch, head): att = causal_softmax(q·kᵀ / √hd), y = att·v (t × hd),
/// kept in `yhead`; then the heads side by side into `ya` (n × d).
pub(super) fn attention_forward<T: Real>(
    qkv: &[T],
    att: &mut [T],
    yhead: &mut [T],
    ya: &mut [T],
    dims: Dims,
) {
    let (t, d, nh, hd) = (dims.t, dims.d, dims.nh, dims.hd);
    let scale = scale::<T>(dims);
    att.par_chunks_mut(t * t)
        .zip(yhead.par_chunks_mut(t * hd))
        .enumerate()
        .for_each(|(bh, (att, y))| {
            let [q, k, v] = head_views(qkv, bh / nh, bh % nh, dims);
            matmul(att, t, q, k.t(), false, Par::Seq);
            kernels::causal_softmax(att, t, scale);
            matmul(y, hd, View::new(att, t, t), v, false, Par::Seq);
        });
    // ya[(bi, ti), hi·hd + j] = y[bi, hi][ti, j]
    let yhead = &*yhead;
    ya.par_chunks_mut(d).enumerate().for_each(|(i, row)| {
        let (bi, ti) = (i / t, i % t);
        for hi in 0..nh {
            let src = &yhead[((bi * nh + hi) * t + ti) * hd..][..hd];
            row[hi * hd..(hi + 1) * hd].copy_from_slice(src);
        }
    });
}

/// Backward of [`attention_forward`]: from dy = ∂L/∂ya (n × d), writes
/// dqkv (n × 3d); `dhead` and `datt` are scratch.
pub(super) fn attention_backward<T: Real>(
    qkv: &[T],
    att: &[T],
    dy: &[T],
    dhead: &mut [T],
    datt: &mut [T],
    dqkv: &mut [T],
    dims: Dims,
) {
    let (t, d, nh, hd) = (dims.t, dims.d, dims.nh, dims.hd);
    let scale = scale::<T>(dims);
    dhead
        .par_chunks_mut(3 * t * hd)
        .zip(datt.par_chunks_mut(t * t))
        .zip(att.par_chunks(t * t))
        .enumerate()
        .for_each(|(bh, ((dh, datt), att))| {
            let (bi, hi) = (bh / nh, bh % nh);
            let [q, k, v] = head_views(qkv, bi, hi, dims);
            let dyh = View::strided(&dy[bi * t * d + hi * hd..], t, hd, d);
            let att = View::new(att, t, t);
            let (dq, rest) = dh.split_at_mut(t * hd);
            let (dk, dv) = rest.split_at_mut(t * hd);
            matmul(dv, hd, att.t(), dyh, false, Par::Seq); // dv = attᵀ·dy
            matmul(datt, t, dyh, v.t(), false, Par::Seq); // datt = dy·vᵀ
            kernels::causal_softmax_backward(att.data, datt, t, scale);
            let ds = View::new(&*datt, t, t);
            matmul(dq, hd, ds, k, false, Par::Seq); // dq = ds·k
            matmul(dk, hd, ds.t(), q, false, Par::Seq); // dk = dsᵀ·q
        });
    // Interleave the heads back into (n × 3d).
    let dhead = &*dhead;
    dqkv.par_chunks_mut(3 * d).enumerate().for_each(|(i, row)| {
        let (bi, ti) = (i / t, i % t);
        for hi in 0..nh {
            let blk = &dhead[(bi * nh + hi) * 3 * t * hd..][..3 * t * hd];
            for part in 0..3 {
                let src = &blk[(part * t + ti) * hd..][..hd];
                row[part * d + hi * hd..][..hd].copy_from_slice(src);
            }
        }
    });
}
