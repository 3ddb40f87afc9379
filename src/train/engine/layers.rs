//! The dense layers as forward/backward pairs over slices: token and
//! position embedding, linear maps (with or without a residual), the tied
//! LM head; and the row/column helpers they share with the experts.

use super::Dims;
use crate::kernels::gemm::{matmul, Par, View};
use crate::kernels::{layer_norm, layer_norm_backward, Real};
use crate::model::layout::Affine;
use rayon::prelude::*;

/// LayerNorm's eps (PyTorch's default; FORMAT.md).
const LN_EPS: f64 = 1e-5;

/// x = wte[token] + wpe[position], rows of `d`; position = row mod `t`.
pub(super) fn embed_forward<T: Real>(
    x: &mut [T],
    wte: &[T],
    wpe: &[T],
    tokens: &[u32],
    dims: Dims,
) {
    let (d, t) = (dims.d, dims.t);
    x.par_chunks_mut(d).enumerate().for_each(|(i, row)| {
        let (tok, pos) = (tokens[i] as usize, i % t);
        let (a, p) = (&wte[tok * d..(tok + 1) * d], &wpe[pos * d..(pos + 1) * d]);
        for j in 0..d {
            row[j] = a[j] + p[j];
        }
    });
}

/// Backward of [`embed_forward`]: dwte[token] += dx (dwte already holds the
/// LM head's gradient); dwpe[pos] = Σ_batch dx, written (added with `acc`).
pub(super) fn embed_backward<T: Real>(
    dwte: &mut [T],
    dwpe: &mut [T],
    dx: &[T],
    tokens: &[u32],
    dims: Dims,
    acc: bool,
) {
    let (b, t, d) = (dims.b, dims.t, dims.d);
    for (i, &tok) in tokens.iter().enumerate() {
        let (dst, src) = (&mut dwte[tok as usize * d..][..d], &dx[i * d..][..d]);
        for j in 0..d {
            dst[j] = dst[j] + src[j];
        }
    }
    dwpe.par_chunks_mut(d).enumerate().for_each(|(pos, dst)| {
        if !acc {
            dst.fill(T::zero());
        }
        if pos < t {
            for bi in 0..b {
                let src = &dx[(bi * t + pos) * d..][..d];
                for j in 0..d {
                    dst[j] = dst[j] + src[j];
                }
            }
        }
    });
}

/// logits = h · wteᵀ (the output projection is tied to the token embedding).
pub(super) fn lm_head_forward<T: Real>(logits: &mut [T], h: &[T], wte: &[T], dims: Dims) {
    let (n, d, v) = (dims.n, dims.d, dims.v);
    matmul(
        logits,
        v,
        View::new(h, n, d),
        View::new(wte, v, d).t(),
        false,
        Par::Pool,
    );
}

/// Backward of [`lm_head_forward`]: dwte = dlogitsᵀ·h (written, added with
/// `acc`), dh = dlogits·wte (written).
pub(super) fn lm_head_backward<T: Real>(
    dlogits: &[T],
    h: &[T],
    wte: &[T],
    dwte: &mut [T],
    dh: &mut [T],
    dims: Dims,
    acc: bool,
) {
    let (n, d, v) = (dims.n, dims.d, dims.v);
    let dl = View::new(dlogits, n, v);
    matmul(dwte, d, dl.t(), View::new(h, n, d), acc, Par::Pool);
    matmul(dh, d, dl, View::new(wte, v, d), false, Par::Pool);
}

/// `y = x·Wᵀ + b` for x (n × i), W (o × i): y (n × o), written.
pub(super) fn linear<T: Real>(
    y: &mut [T],
    x: &[T],
    w: &[T],
    b: Option<&[T]>,
    n: usize,
    i: usize,
    o: usize,
) {
    if let Some(b) = b {
        fill_rows(&mut y[..n * o], b);
    }
    let (x, w) = (View::new(x, n, i), View::new(w, o, i).t());
    matmul(y, o, x, w, b.is_some(), Par::Pool);
}

/// `out = res + x·Wᵀ + b` for square W (d × d): a linear map onto the residual stream.
pub(super) fn residual_linear<T: Real>(
    out: &mut [T],
    res: &[T],
    x: &[T],
    w: &[T],
    b: Option<&[T]>,
    dims: Dims,
) {
    let (n, d) = (dims.n, dims.d);
    match b {
        Some(bias) => out
            .par_chunks_mut(d)
            .zip(res.par_chunks(d))
            .for_each(|(o, r)| {
                for j in 0..d {
                    o[j] = r[j] + bias[j];
                }
            }),
        None => out.copy_from_slice(res),
    }
    let (x, w) = (View::new(x, n, d), View::new(w, d, d).t());
    matmul(out, d, x, w, true, Par::Pool);
}

/// Backward of [`linear`]: dW (o × i) and db written (added with `acc`);
/// dx = dy·W written (added with `dx_acc`).
#[allow(clippy::too_many_arguments)]
pub(super) fn linear_backward<T: Real>(
    dy: &[T],
    x: &[T],
    w: &[T],
    dw: &mut [T],
    db: Option<&mut [T]>,
    dx: Option<&mut [T]>,
    (n, i, o): (usize, usize, usize),
    acc: bool,
    dx_acc: bool,
) {
    let dyv = View::new(dy, n, o);
    matmul(dw, i, dyv.t(), View::new(x, n, i), acc, Par::Pool);
    if let Some(db) = db {
        col_sum(db, dy, n, acc);
    }
    if let Some(dx) = dx {
        matmul(dx, i, dyv, View::new(w, o, i), dx_acc, Par::Pool);
    }
}

/// [`linear_backward`] of a layout layer into its gradients `g`, dx written
/// (added with `dx_acc`); `dims` = (n, in, out).
#[allow(clippy::too_many_arguments)]
pub(super) fn affine_backward<T: Real>(
    dy: &[T],
    x: &[T],
    w: &Affine<&[T]>,
    g: &mut Affine<&mut [T]>,
    dx: &mut [T],
    dims: (usize, usize, usize),
    acc: bool,
    dx_acc: bool,
) {
    let db = g.bias.as_deref_mut();
    linear_backward(dy, x, w.weight, g.weight, db, Some(dx), dims, acc, dx_acc);
}

/// LayerNorm of the rows of `x` with a layout layer's gain and shift; each
/// row's mean and 1/σ kept in `stats` for [`norm_backward`].
pub(super) fn norm_forward<T: Real>(
    x: &[T],
    w: &Affine<&[T]>,
    y: &mut [T],
    stats: (&mut [T], &mut [T]),
) {
    layer_norm(x, w.weight, w.bias, LN_EPS, y, stats.0, stats.1);
}

/// Backward of [`norm_forward`]: dx += ∂L/∂x; gain and shift gradients
/// written (added with `acc`).
pub(super) fn norm_backward<T: Real>(
    dy: &[T],
    x: &[T],
    stats: (&[T], &[T]),
    w: &Affine<&[T]>,
    g: &mut Affine<&mut [T]>,
    dx: &mut [T],
    acc: bool,
) {
    let db = g.bias.as_deref_mut();
    layer_norm_backward(dy, x, stats.0, stats.1, w.weight, dx, g.weight, db, acc);
}

/// Rows of `src` (rows × cols) summed into `dst` (cols): written, or added with `acc`.
fn col_sum<T: Real>(dst: &mut [T], src: &[T], rows: usize, acc: bool) {
    let cols = dst.len();
    let chunk = cols.div_ceil(rayon::current_num_threads().max(1)).max(64);
    dst.par_chunks_mut(chunk).enumerate().for_each(|(c, dst)| {
        let j0 = c * chunk;
        if !acc {
            dst.fill(T::zero());
        }
        for i in 0..rows {
            let s = &src[i * cols + j0..i * cols + j0 + dst.len()];
            for (d, &s) in dst.iter_mut().zip(s) {
                *d = *d + s;
            }
        }
    });
}

/// [`col_sum`] on the calling thread.
pub(super) fn col_sum_seq<T: Real>(dst: &mut [T], src: &[T], rows: usize, acc: bool) {
    if !acc {
        dst.fill(T::zero());
    }
    let cols = dst.len();
    for i in 0..rows {
        for (d, &s) in dst.iter_mut().zip(&src[i * cols..(i + 1) * cols]) {
            *d = *d + s;
        }
    }
}

/// Each row of `dst` (rows × bias.len()) set to `bias`, in parallel.
fn fill_rows<T: Real>(dst: &mut [T], bias: &[T]) {
    dst.par_chunks_mut(bias.len() * 64)
        .for_each(|c| fill_rows_seq(c, Some(bias)));
}

/// [`fill_rows`] on the calling thread (nothing without a bias).
pub(super) fn fill_rows_seq<T: Real>(dst: &mut [T], bias: Option<&[T]>) {
    if let Some(b) = bias {
        dst.chunks_exact_mut(b.len())
            .for_each(|r| r.copy_from_slice(b));
    }
}
