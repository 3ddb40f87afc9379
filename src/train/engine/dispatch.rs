//! Dropless dispatch of routed rows to the experts, forward and backward:
//! the plan (rows expert-major), the gather of each routed token once, the
//! experts on their own rows, the gated combine; scheduled largest first
//! because expert loads are uneven.

use super::layers::{col_sum_seq, fill_rows_seq};
use super::Dims;
use crate::kernels::gemm::{matmul, Par, View};
use crate::kernels::{self, Real};
use crate::model::layout::ExpertLayout;
use rayon::prelude::*;
use std::ops::Range;

/// The dispatch plan of a selection `sel` (n × k): rows expert-major, tokens
/// ascending within an expert. Writes `offsets` (E + 1), the packed row of
/// each slot (`row_of`) and the slot of each row (`slot_of`), and each
/// expert's row count into `loads`.
pub(super) fn plan(
    sel: &[u32],
    offsets: &mut [usize],
    row_of: &mut [u32],
    slot_of: &mut [u32],
    loads: &mut [u64],
) {
    loads.fill(0);
    for &x in sel {
        loads[x as usize] += 1;
    }
    offsets[0] = 0;
    for (x, &c) in loads.iter().enumerate() {
        offsets[x + 1] = offsets[x] + c as usize;
    }
    let mut cursor = offsets.to_vec();
    for (slot, &x) in sel.iter().enumerate() {
        let row = cursor[x as usize];
        cursor[x as usize] += 1;
        row_of[slot] = row as u32;
        slot_of[row] = slot as u32;
    }
}

/// xe[row] = h[token of row]: each routed token's input, gathered once (r × d).
pub(super) fn gather<T: Real>(xe: &mut [T], h: &[T], slot_of: &[u32], dims: Dims) {
    let (d, k) = (dims.d, dims.k);
    xe.par_chunks_mut(d).enumerate().for_each(|(row, dst)| {
        let tok = slot_of[row] as usize / k;
        dst.copy_from_slice(&h[tok * d..(tok + 1) * d]);
    });
}

/// Backward of [`gather`]: dh[token] = Σ over its slots of dxe[row], written.
pub(super) fn gather_backward<T: Real>(dh: &mut [T], dxe: &[T], row_of: &[u32], dims: Dims) {
    let (d, k) = (dims.d, dims.k);
    dh.par_chunks_mut(d).enumerate().for_each(|(i, dst)| {
        dst.copy_from_slice(&dxe[row_of[i * k] as usize * d..][..d]);
        for sl in 1..k {
            let src = &dxe[row_of[i * k + sl] as usize * d..][..d];
            for j in 0..d {
                dst[j] = dst[j] + src[j];
            }
        }
    });
}

/// Each expert on its own rows: u = xe·W_upᵀ + b; a = SiLU(u); ye = a·W_downᵀ + b.
/// Experts (or row blocks of busy ones) run side by side, one thread each.
#[allow(clippy::too_many_arguments)]
pub(super) fn experts_forward<T: Real>(
    experts: &[ExpertLayout<&[T]>],
    offsets: &[usize],
    xe: &[T],
    u: &mut [T],
    a: &mut [T],
    ye: &mut [T],
    dims: Dims,
) {
    let (d, f) = (dims.d, dims.f);
    let tasks = expert_tasks(offsets, rayon::current_num_threads());
    let rows = |w: usize| -> Vec<Range<usize>> {
        tasks.iter().map(|(_, r)| r.start * w..r.end * w).collect()
    };
    let (us, acts, ys) = (
        split_ranges(u, &rows(f)),
        split_ranges(a, &rows(f)),
        split_ranges(ye, &rows(d)),
    );
    let items = tasks
        .iter()
        .zip(us.into_iter().zip(acts.into_iter().zip(ys)))
        .map(|(task, bufs)| (task.1.len(), (task, bufs)))
        .collect();
    largest_first(items, |((x, r), (u, (act, y)))| {
        let ex = &experts[*x];
        let ne = r.len();
        let xin = View::new(&xe[r.start * d..r.end * d], ne, d);
        fill_rows_seq(u, ex.up.bias);
        let w_up = View::new(ex.up.weight, f, d).t();
        matmul(u, f, xin, w_up, ex.up.bias.is_some(), Par::Seq);
        kernels::silu_seq(u, act);
        fill_rows_seq(y, ex.down.bias);
        let w_down = View::new(ex.down.weight, d, f).t();
        matmul(
            y,
            d,
            View::new(act, ne, f),
            w_down,
            ex.down.bias.is_some(),
            Par::Seq,
        );
    });
}

/// x_next = xm + Σ_s gate_s · ye[row(t, s)], written.
pub(super) fn combine<T: Real>(
    next: &mut [T],
    xm: &[T],
    ye: &[T],
    gates: &[T],
    row_of: &[u32],
    dims: Dims,
) {
    let (d, k) = (dims.d, dims.k);
    next.par_chunks_mut(d).enumerate().for_each(|(i, o)| {
        o.copy_from_slice(&xm[i * d..(i + 1) * d]);
        for s in 0..k {
            let g = gates[i * k + s];
            let y = &ye[row_of[i * k + s] as usize * d..][..d];
            for j in 0..d {
                o[j] = o[j] + g * y[j];
            }
        }
    });
}

/// Backward of [`combine`] from dx = ∂L/∂x_next: dye[row] = gate · dx[token]
/// and dgate_row[row] = ⟨dx[token], ye[row]⟩, written. (∂L/∂xm is dx itself.)
pub(super) fn combine_backward<T: Real>(
    dye: &mut [T],
    dgate_row: &mut [T],
    dx: &[T],
    ye: &[T],
    gates: &[T],
    slot_of: &[u32],
    dims: Dims,
) {
    let (d, k) = (dims.d, dims.k);
    dye.par_chunks_mut(d)
        .zip(dgate_row.par_iter_mut())
        .zip(ye.par_chunks(d))
        .enumerate()
        .for_each(|(row, ((dst, dg), ye))| {
            let slot = slot_of[row] as usize;
            let src = &dx[slot / k * d..][..d];
            let gate = gates[slot];
            let mut dot = T::zero();
            for j in 0..d {
                dst[j] = gate * src[j];
                dot = dot + src[j] * ye[j];
            }
            *dg = dot;
        });
}

/// What the experts' backward reads: the forward's packed rows.
pub(super) struct ExpertActs<'a, T> {
    pub offsets: &'a [usize],
    /// Inputs (r × d), pre-activations and activations (r × f).
    pub xe: &'a [T],
    pub u: &'a [T],
    pub a: &'a [T],
}

/// Backward of [`experts_forward`] from dye (r × d): per expert dW_down =
/// dyeᵀ·a, da = dye·W_down, du = da ⊙ SiLU'(u), dW_up = duᵀ·xe, dxe =
/// du·W_up. Parameter gradients written (added with `acc`); `da` is scratch,
/// dxe (r × d) written. Experts side by side, one thread each, unless one
/// expert holds more than a thread's share of the rows.
#[allow(clippy::too_many_arguments)]
pub(super) fn experts_backward<'a, 'g, 'h, T: Real>(
    experts: &[ExpertLayout<&[T]>],
    grads: &'g mut [ExpertLayout<&'h mut [T]>],
    fwd: ExpertActs<'_, T>,
    dye: &[T],
    da: &'a mut [T],
    dxe: &'a mut [T],
    dims: Dims,
    acc: bool,
) {
    let (d, f) = (dims.d, dims.f);
    let spans: Vec<Range<usize>> = fwd.offsets.windows(2).map(|w| w[0]..w[1]).collect();
    let threads = rayon::current_num_threads();
    let max_rows = spans.iter().map(|r| r.len()).max().unwrap_or(0);
    let side_by_side = threads > 1 && max_rows * threads <= dims.n * dims.k;
    let par = if side_by_side { Par::Seq } else { Par::Pool };
    let scaled = |w: usize| {
        spans
            .iter()
            .map(|r| r.start * w..r.end * w)
            .collect::<Vec<_>>()
    };
    let das = split_ranges(da, &scaled(f));
    let dxes = split_ranges(dxe, &scaled(d));
    type Item<'a, 'g, 'h, T> = (
        usize,
        (
            &'a mut [T],
            (&'a mut [T], &'g mut ExpertLayout<&'h mut [T]>),
        ),
    );
    let one = |(x, (da, (dxe, g))): Item<'a, 'g, 'h, T>| {
        let (ex, r) = (&experts[x], &spans[x]);
        let ne = r.len();
        let dy = View::new(&dye[r.start * d..r.end * d], ne, d);
        let act = View::new(&fwd.a[r.start * f..r.end * f], ne, f);
        let xin = View::new(&fwd.xe[r.start * d..r.end * d], ne, d);
        matmul(g.down.weight, f, dy.t(), act, acc, par);
        if let Some(db) = g.down.bias.as_deref_mut() {
            col_sum_seq(db, dy.data, ne, acc);
        }
        matmul(da, f, dy, View::new(ex.down.weight, d, f), false, par);
        if side_by_side {
            kernels::silu_backward_seq(&fwd.u[r.start * f..r.end * f], da);
        } else {
            kernels::silu_backward(&fwd.u[r.start * f..r.end * f], da);
        }
        let du = View::new(&*da, ne, f);
        matmul(g.up.weight, d, du.t(), xin, acc, par);
        if let Some(db) = g.up.bias.as_deref_mut() {
            col_sum_seq(db, du.data, ne, acc);
        }
        matmul(dxe, d, du, View::new(ex.up.weight, f, d), false, par);
    };
    let items = das.into_iter().zip(dxes.into_iter().zip(grads.iter_mut()));
    if side_by_side {
        let sized = items
            .enumerate()
            .map(|it| (spans[it.0].len(), it))
            .collect();
        largest_first(sized, one);
    } else {
        items.enumerate().for_each(one);
    }
}

/// The forward pass's expert tasks: (expert, rows), each expert's rows cut
/// into near-equal blocks of at most max(256, rows / (2·threads)) so that
/// the threads stay busy when routing is uneven.
fn expert_tasks(offsets: &[usize], threads: usize) -> Vec<(usize, Range<usize>)> {
    let total = offsets[offsets.len() - 1];
    let cap = (total / (2 * threads.max(1))).max(256);
    let mut tasks = Vec::new();
    for x in 0..offsets.len() - 1 {
        let (a, b) = (offsets[x], offsets[x + 1]);
        let pieces = (b - a).div_ceil(cap);
        for p in 0..pieces {
            tasks.push((x, a + (b - a) * p / pieces..a + (b - a) * (p + 1) / pieces));
        }
    }
    tasks
}

/// Runs `f` on every item on all of rayon's threads, each thread taking the
/// largest item left (longest-processing-time-first: expert loads are uneven,
/// and a plain parallel iterator splits by count, not by work).
fn largest_first<I: Send>(mut items: Vec<(usize, I)>, f: impl Fn(I) + Sync) {
    items.sort_by_key(|(size, _)| std::cmp::Reverse(*size));
    let queue = std::sync::Mutex::new(items.into_iter());
    let next = || queue.lock().unwrap_or_else(|e| e.into_inner()).next();
    rayon::scope(|s| {
        for _ in 0..rayon::current_num_threads() {
            s.spawn(|_| {
                while let Some((_, item)) = next() {
                    f(item);
                }
            });
        }
    });
}

/// Disjoint mutable slices of `buf` at sorted, non-overlapping `ranges`.
pub(super) fn split_ranges<'a, T>(
    mut buf: &'a mut [T],
    ranges: &[Range<usize>],
) -> Vec<&'a mut [T]> {
    let mut out = Vec::with_capacity(ranges.len());
    let mut base = 0;
    for r in ranges {
        let (_, rest) = std::mem::take(&mut buf).split_at_mut(r.start - base);
        let (mid, rest) = rest.split_at_mut(r.len());
        out.push(mid);
        buf = rest;
        base = r.end;
    }
    out
}
