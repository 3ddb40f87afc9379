//! The activations the backward pass needs and the scratch it works in,
//! sized once per batch shape and reused across steps.

use super::Dims;
use crate::kernels::Real;

/// Activations of one block, kept from the forward pass for the backward.
#[derive(Debug, Default)]
pub(super) struct BlockActs<T> {
    /// Block input, the residual stream (n × d).
    pub x: Vec<T>,
    pub ln1_mean: Vec<T>,
    pub ln1_rstd: Vec<T>,
    pub h1: Vec<T>,
    /// (n × 3d): q | k | v, heads side by side within each.
    pub qkv: Vec<T>,
    /// Attention probabilities (b · heads × t × t).
    pub att: Vec<T>,
    /// Attention output before the projection (n × d).
    pub ya: Vec<T>,
    /// Residual stream after attention (n × d).
    pub xm: Vec<T>,
    pub ln2_mean: Vec<T>,
    pub ln2_rstd: Vec<T>,
    pub h2: Vec<T>,
    /// Router probabilities (n × E).
    pub probs: Vec<T>,
    /// Experts of each (token, slot), best first (n × k), and their gates.
    pub sel: Vec<u32>,
    pub gates: Vec<T>,
    /// Packed row of each (token, slot), and the (token, slot) of each row.
    pub row_of: Vec<u32>,
    pub slot_of: Vec<u32>,
    /// Rows of expert e: offsets[e]..offsets[e + 1].
    pub offsets: Vec<usize>,
    /// Gathered expert inputs (r × d), pre-activations (r × f), activations
    /// (r × f) and expert outputs before gating (r × d).
    pub xe: Vec<T>,
    pub u: Vec<T>,
    pub a: Vec<T>,
    pub ye: Vec<T>,
}

/// Scratch buffers of the backward pass, reused by every block.
#[derive(Debug, Default)]
pub(super) struct Scratch<T> {
    /// ∂L/∂(residual stream) at the current point of the backward (n × d).
    pub dx: Vec<T>,
    pub dh: Vec<T>,
    pub dy: Vec<T>,
    pub dqkv: Vec<T>,
    /// Per (batch, head): dq | dk | dv (3 × t × hd), and ∂L/∂att (t × t).
    pub dhead: Vec<T>,
    pub datt: Vec<T>,
    /// Per (batch, head) attention output (t × hd), before interleaving heads.
    pub yhead: Vec<T>,
    pub dye: Vec<T>,
    pub da: Vec<T>,
    pub dxe: Vec<T>,
    pub dgate_row: Vec<T>,
    pub dlogit_r: Vec<T>,
}

/// Every activation and scratch buffer of a step.
#[derive(Debug, Default)]
pub(super) struct Buffers<T> {
    pub blocks: Vec<BlockActs<T>>,
    /// Final residual stream (n × d), ln_f's statistics and output (n × d).
    pub xf: Vec<T>,
    pub lnf_mean: Vec<T>,
    pub lnf_rstd: Vec<T>,
    pub lnf_out: Vec<T>,
    /// Logits (n × V); ∂L/∂logits after the cross-entropy.
    pub logits: Vec<T>,
    pub scratch: Scratch<T>,
    /// The batch shape the buffers are sized for.
    dims: Dims,
}

fn resize_all<T: Real>(bufs: &mut [(&mut Vec<T>, usize)]) {
    for (buf, len) in bufs {
        buf.resize(*len, T::zero());
    }
}

impl<T: Real> Buffers<T> {
    /// Size every buffer for a batch of shape `dims` (nothing to do when the
    /// shape is the last one).
    pub fn size_for(&mut self, dims: Dims, n_layer: usize) {
        if self.dims == dims && self.blocks.len() == n_layer {
            return;
        }
        self.dims = dims;
        let Dims {
            b,
            t,
            n,
            d,
            f,
            e,
            k,
            nh,
            v,
            ..
        } = dims;
        let r = n * k;
        self.blocks.resize_with(n_layer, Default::default);
        for a in &mut self.blocks {
            resize_all(&mut [
                (&mut a.x, n * d),
                (&mut a.ln1_mean, n),
                (&mut a.ln1_rstd, n),
                (&mut a.h1, n * d),
                (&mut a.qkv, n * 3 * d),
                (&mut a.att, b * nh * t * t),
                (&mut a.ya, n * d),
                (&mut a.xm, n * d),
                (&mut a.ln2_mean, n),
                (&mut a.ln2_rstd, n),
                (&mut a.h2, n * d),
                (&mut a.probs, n * e),
                (&mut a.gates, r),
                (&mut a.xe, r * d),
                (&mut a.u, r * f),
                (&mut a.a, r * f),
                (&mut a.ye, r * d),
            ]);
            a.sel.resize(r, 0);
            a.row_of.resize(r, 0);
            a.slot_of.resize(r, 0);
            a.offsets.resize(e + 1, 0);
        }
        resize_all(&mut [
            (&mut self.xf, n * d),
            (&mut self.lnf_mean, n),
            (&mut self.lnf_rstd, n),
            (&mut self.lnf_out, n * d),
            (&mut self.logits, n * v),
        ]);
        let s = &mut self.scratch;
        resize_all(&mut [
            (&mut s.dx, n * d),
            (&mut s.dh, n * d),
            (&mut s.dy, n * d),
            (&mut s.dqkv, n * 3 * d),
            (&mut s.dhead, n * 3 * d),
            (&mut s.datt, b * nh * t * t),
            (&mut s.yhead, n * d),
            (&mut s.dye, r * d),
            (&mut s.da, r * f),
            (&mut s.dxe, r * d),
            (&mut s.dgate_row, r),
            (&mut s.dlogit_r, n * e),
        ]);
    }
}
