//! The forward pass: embedding, the blocks, the final LayerNorm and the LM
//! head, each block a sequence of the layers' forward functions.

use super::attention::attention_forward;
use super::buffers::{BlockActs, Scratch};
use super::dispatch::{combine, experts_forward, gather, plan};
use super::layers::{embed_forward, linear, lm_head_forward, norm_forward, residual_linear};
use super::router::router_forward;
use super::{moe, Dims, Engine, Profile};
use crate::kernels::Real;
use crate::model::layout::BlockLayout;

impl<T: Real> Engine<T> {
    /// Logits of `tokens` into `bufs.logits`, every activation kept.
    pub(super) fn forward(&mut self, tokens: &[u32], dims: Dims) {
        let w = self.index.map(|r| &self.params[r.clone()]);
        let (bufs, prof) = (&mut self.bufs, &mut self.profile);
        let x0 = match bufs.blocks.first_mut() {
            Some(a) => &mut a.x,
            None => &mut bufs.xf,
        };
        embed_forward(x0, w.wte, w.wpe, tokens, dims);
        prof.lap("embed");
        for (l, bw) in w.blocks.iter().enumerate() {
            let (acts, rest) = bufs.blocks.split_at_mut(l + 1);
            let next = match rest.first_mut() {
                Some(nb) => &mut nb.x,
                None => &mut bufs.xf,
            };
            let a = &mut acts[l];
            let s = &mut bufs.scratch;
            block_forward(
                bw,
                a,
                next,
                s,
                &mut self.loads[l],
                dims,
                self.cfg.norm_topk,
                prof,
            );
        }
        let b = &mut *bufs;
        let lnf_stats = (&mut b.lnf_mean[..], &mut b.lnf_rstd[..]);
        norm_forward(&b.xf, &w.ln_f, &mut b.lnf_out, lnf_stats);
        prof.lap("ln");
        lm_head_forward(&mut b.logits, &b.lnf_out, w.wte, dims);
        prof.lap("lm_head");
    }
}

/// One block: x_next = xm + MoE(ln2(xm)), xm = x + attn(ln1(x)).
#[allow(clippy::too_many_arguments)]
fn block_forward<T: Real>(
    w: &BlockLayout<&[T]>,
    a: &mut BlockActs<T>,
    x_next: &mut [T],
    s: &mut Scratch<T>,
    loads: &mut [u64],
    dims: Dims,
    norm_topk: bool,
    prof: &mut Profile,
) {
    let (n, d, e) = (dims.n, dims.d, dims.e);
    // Attention: h1 = ln1(x); qkv = h1·W_qkvᵀ + b; xm = x + attn·W_projᵀ + b
    let ln1_stats = (&mut a.ln1_mean[..], &mut a.ln1_rstd[..]);
    norm_forward(&a.x, &w.ln1, &mut a.h1, ln1_stats);
    let qkv = &w.qkv;
    linear(&mut a.qkv, &a.h1, qkv.weight, qkv.bias, n, d, 3 * d);
    prof.lap("ln_qkv");
    attention_forward(&a.qkv, &mut a.att, &mut s.yhead, &mut a.ya, dims);
    prof.lap("attention");
    residual_linear(&mut a.xm, &a.x, &a.ya, w.proj.weight, w.proj.bias, dims);
    prof.lap("proj");
    // MoE: h2 = ln2(xm); p = softmax(h2·W_rᵀ); top-k; gates
    let (router, experts) = moe(&w.ffn);
    let ln2_stats = (&mut a.ln2_mean[..], &mut a.ln2_rstd[..]);
    norm_forward(&a.xm, &w.ln2, &mut a.h2, ln2_stats);
    linear(&mut a.probs, &a.h2, router, None, n, d, e);
    router_forward(&mut a.probs, &mut a.sel, &mut a.gates, dims, norm_topk);
    prof.lap("ln_router");
    plan(&a.sel, &mut a.offsets, &mut a.row_of, &mut a.slot_of, loads);
    gather(&mut a.xe, &a.h2, &a.slot_of, dims);
    prof.lap("dispatch");
    let (u, act, ye) = (&mut a.u, &mut a.a, &mut a.ye);
    experts_forward(experts, &a.offsets, &a.xe, u, act, ye, dims);
    prof.lap("experts");
    combine(x_next, &a.xm, &a.ye, &a.gates, &a.row_of, dims);
    prof.lap("combine");
}
