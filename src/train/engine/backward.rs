//! The backward pass, the forward's layers in reverse; every gradient
//! buffer is written by the op that produces it (added to with `acc`).

use super::attention::attention_backward;
use super::buffers::{BlockActs, Scratch};
use super::dispatch::{combine_backward, experts_backward, gather_backward, ExpertActs};
use super::layers::{
    affine_backward, embed_backward, linear_backward, lm_head_backward, norm_backward,
};
use super::router::router_backward;
use super::{moe, moe_mut, split_by_index, Dims, Engine, Profile};
use crate::kernels::Real;
use crate::model::layout::BlockLayout;

impl<T: Real> Engine<T> {
    /// Gradients from ∂L/∂logits (in `bufs.logits`) back to the embeddings.
    pub(super) fn backward(&mut self, tokens: &[u32], dims: Dims, acc: bool) {
        let w = self.index.map(|r| &self.params[r.clone()]);
        let mut g = split_by_index(&mut self.grads, &self.index);
        let (bufs, prof) = (&mut self.bufs, &mut self.profile);
        let s = &mut bufs.scratch;
        lm_head_backward(
            &bufs.logits,
            &bufs.lnf_out,
            w.wte,
            g.wte,
            &mut s.dh,
            dims,
            acc,
        );
        s.dx.fill(T::zero()); // ln_f's backward adds into it
        prof.lap("lm_head_bwd");
        let lnf_stats = (&bufs.lnf_mean[..], &bufs.lnf_rstd[..]);
        norm_backward(
            &s.dh,
            &bufs.xf,
            lnf_stats,
            &w.ln_f,
            &mut g.ln_f,
            &mut s.dx,
            acc,
        );
        prof.lap("ln_bwd");
        let blocks = w.blocks.iter().zip(g.blocks.iter_mut()).zip(&bufs.blocks);
        for ((bw, bg), a) in blocks.rev() {
            block_backward(bw, bg, a, s, dims, self.cfg.norm_topk, acc, prof);
        }
        embed_backward(g.wte, g.wpe, &s.dx, tokens, dims, acc);
        prof.lap("embed_bwd");
    }
}

/// One block, from s.dx = ∂L/∂x_next to s.dx = ∂L/∂x.
#[allow(clippy::too_many_arguments)]
fn block_backward<T: Real>(
    w: &BlockLayout<&[T]>,
    g: &mut BlockLayout<&mut [T]>,
    a: &BlockActs<T>,
    s: &mut Scratch<T>,
    dims: Dims,
    norm_topk: bool,
    acc: bool,
    prof: &mut Profile,
) {
    let (n, d, e) = (dims.n, dims.d, dims.e);
    // MoE. s.dx = ∂L/∂x_next, which is also ∂L/∂xm through the residual.
    let (dye, dgate) = (&mut s.dye, &mut s.dgate_row);
    combine_backward(dye, dgate, &s.dx, &a.ye, &a.gates, &a.slot_of, dims);
    prof.lap("combine_bwd");
    let ((router_w, experts_w), (router_g, experts_g)) = (moe(&w.ffn), moe_mut(&mut g.ffn));
    let fwd = ExpertActs {
        offsets: &a.offsets,
        xe: &a.xe,
        u: &a.u,
        a: &a.a,
    };
    let (da, dxe) = (&mut s.da, &mut s.dxe);
    experts_backward(experts_w, experts_g, fwd, &s.dye, da, dxe, dims, acc);
    prof.lap("experts_bwd");
    let dl = &mut s.dlogit_r;
    router_backward(
        dl,
        &a.probs,
        &a.sel,
        &a.row_of,
        &s.dgate_row,
        dims,
        norm_topk,
    );
    // dh2 = Σ_slots dxe[row] + dlogit·W_r;  dW_r = dlogitᵀ·h2
    gather_backward(&mut s.dh, &s.dxe, &a.row_of, dims);
    let dh = Some(&mut s.dh[..]);
    linear_backward(
        dl,
        &a.h2,
        router_w,
        router_g,
        None,
        dh,
        (n, d, e),
        acc,
        true,
    );
    let ln2_stats = (&a.ln2_mean[..], &a.ln2_rstd[..]);
    norm_backward(&s.dh, &a.xm, ln2_stats, &w.ln2, &mut g.ln2, &mut s.dx, acc);
    prof.lap("router_ln_bwd");
    // Attention. s.dx = ∂L/∂xm = ∂L/∂x through the residual.
    let dy = &mut s.dy;
    affine_backward(
        &s.dx,
        &a.ya,
        &w.proj,
        &mut g.proj,
        dy,
        (n, d, d),
        acc,
        false,
    );
    prof.lap("proj_bwd");
    let (dhead, datt, dqkv) = (&mut s.dhead, &mut s.datt, &mut s.dqkv);
    attention_backward(&a.qkv, &a.att, &s.dy, dhead, datt, dqkv, dims);
    prof.lap("attention_bwd");
    let dh = &mut s.dh;
    affine_backward(
        &s.dqkv,
        &a.h1,
        &w.qkv,
        &mut g.qkv,
        dh,
        (n, d, 3 * d),
        acc,
        false,
    );
    let ln1_stats = (&a.ln1_mean[..], &a.ln1_rstd[..]);
    norm_backward(&s.dh, &a.x, ln1_stats, &w.ln1, &mut g.ln1, &mut s.dx, acc);
    prof.lap("qkv_ln_bwd");
}
