//! The fused CPU training engine: NanoGPT-MoE's forward pass, its
//! hand-written backward and AdamW, on flat parameter, gradient and moment
//! buffers, in the style of llm.c.
//!
//! The autodiff model (`crate::model`) is the reference and stays the home
//! of every variant and regulariser. This engine covers the hot path of the
//! study, top-k routed SiLU-MLP experts with optional L_orth on W_up, and the
//! training loop uses it whenever a config needs nothing else ([`unsupported`]
//! says what stands in the way otherwise; `train.engine = "autodiff"` forces
//! the reference). What makes it fast:
//!
//! - every gradient buffer is *written* by the op that produces it (a GEMM
//!   with β = 0, a column sum), never zero-filled and then added to;
//! - fused kernels with hand-written backward for LayerNorm, causal softmax,
//!   SiLU and the cross-entropy over the vocabulary (`crate::kernels`, each
//!   checked against float64 finite differences);
//! - dropless dispatch: the tokens of each expert are gathered once into one
//!   packed buffer (expert-major), each expert runs two GEMMs on its own rows,
//!   and the gated outputs are combined back per token;
//! - AdamW in one pass per parameter (moments and weights in place), with the
//!   clipping scale folded in;
//! - one thread pool (rayon's, which the GEMMs use too) and AVX-512 GEMM.
//!
//! Where things are: each layer is a forward/backward pair of free functions
//! over slices (`layers.rs`: embedding, linear, LM head; `attention.rs`;
//! `router.rs`; `dispatch.rs`: gather, experts, combine), `forward.rs` and
//! `backward.rs` chain them block by block, `buffers.rs` holds the
//! activations, `eval.rs` evaluates on the forward pass, `adamw.rs`,
//! `orth.rs` and `profile.rs` the rest of a step, and `convert.rs` the
//! hand-off with the autodiff model and its optimiser.
//!
//! Shapes: n = b·t tokens, d = d_model, f = d_ff, E experts, k slots per token,
//! r = n·k routed rows, V = vocabulary.

mod adamw;
mod attention;
mod backward;
mod buffers;
mod convert;
mod coverage;
mod dispatch;
mod eval;
mod forward;
mod layers;
mod orth;
mod profile;
mod router;
#[cfg(test)]
mod tests;

/// The GEMM wrapper lives with the other kernels; re-exported here for the
/// benchmark's GEMM ceiling.
pub use crate::kernels::gemm;
pub use coverage::unsupported;
pub use profile::Profile;

use crate::config::ModelConfig;
use crate::kernels::Real;
use crate::model::layout::{ExpertLayout, FfnLayout, ModelLayout, ParamSpec};
use crate::{Error, Result};
use buffers::Buffers;
use std::ops::Range;

/// AdamW hyper-parameters (PyTorch semantics, as `optim::AdamW`).
#[derive(Debug, Clone, Copy)]
pub struct AdamParams {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Decay of the expert matrices (`train.weight_decay_experts`, else `weight_decay`).
    pub weight_decay_experts: f64,
}

/// Where each parameter lives in the flat buffers.
type Index = ModelLayout<Range<usize>>;

/// The fused engine over one model's parameters.
pub struct Engine<T> {
    cfg: ModelConfig,
    /// Names and shapes of the parameters.
    layout: ModelLayout<ParamSpec>,
    index: Index,
    /// Flat parameters, gradients and AdamW moments, in layout order.
    pub params: Vec<T>,
    pub grads: Vec<T>,
    m: Vec<T>,
    v: Vec<T>,
    /// AdamW steps taken.
    pub t: usize,
    adam: AdamParams,
    /// Activations and scratch, sized for the last batch shape.
    bufs: Buffers<T>,
    /// Per MoE layer, assignments per expert in the last forward pass.
    pub loads: Vec<Vec<u64>>,
    /// Seconds the last forward pass took (the benchmark's phase split).
    pub last_forward_s: f64,
    /// Time per section, summed over steps.
    pub profile: Profile,
}

/// The sizes of one batch through the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Dims {
    b: usize,
    t: usize,
    /// Tokens, b·t.
    n: usize,
    d: usize,
    f: usize,
    e: usize,
    k: usize,
    /// Heads and the head width d / heads.
    nh: usize,
    hd: usize,
    v: usize,
}

impl Dims {
    fn new(cfg: &ModelConfig, b: usize, t: usize) -> Self {
        Dims {
            b,
            t,
            n: b * t,
            d: cfg.d_model,
            f: cfg.d_ff,
            e: cfg.n_experts,
            k: cfg.top_k,
            nh: cfg.n_head,
            hd: cfg.d_model / cfg.n_head,
            v: cfg.vocab_size,
        }
    }
}

/// The router and experts of a block's FFN; [`Engine::new`] admits MoE
/// layers of plain experts only.
fn moe<S>(ffn: &FfnLayout<S>) -> (&S, &[ExpertLayout<S>]) {
    match ffn {
        FfnLayout::Moe {
            router, experts, ..
        } => (router, experts),
        FfnLayout::Dense(_) => unreachable!("Engine::new admits MoE layers only"),
    }
}

/// [`moe`] for a tree of mutable slices.
fn moe_mut<S>(ffn: &mut FfnLayout<S>) -> (&mut S, &mut [ExpertLayout<S>]) {
    match ffn {
        FfnLayout::Moe {
            router, experts, ..
        } => (router, experts),
        FfnLayout::Dense(_) => unreachable!("Engine::new admits MoE layers only"),
    }
}

/// Every parameter's piece of the flat buffer `buf`, as a layout tree.
fn split_by_index<'a, T>(buf: &'a mut [T], index: &Index) -> ModelLayout<&'a mut [T]> {
    let mut rest = buf;
    // `map` visits the parameters in creation order, in which the ranges are consecutive.
    index.map(|r| {
        let (piece, tail) = std::mem::take(&mut rest).split_at_mut(r.len());
        rest = tail;
        piece
    })
}

/// Why the engine cannot lay out a model with this parameter layout.
fn layout_gap(layout: &ModelLayout) -> Option<&'static str> {
    for b in &layout.blocks {
        match &b.ffn {
            FfnLayout::Dense(_) => return Some("dense FFN layers"),
            FfnLayout::Moe { balance_bias, .. } if balance_bias.is_some() => {
                return Some("a loss-free balancing bias")
            }
            FfnLayout::Moe { experts, .. } if experts.iter().any(|x| x.gate.is_some()) => {
                return Some("SwiGLU experts")
            }
            FfnLayout::Moe { .. } => {}
        }
    }
    None
}

impl<T: Real> Engine<T> {
    /// An engine over named parameters, in [`ModelLayout`] order with its
    /// names and shapes (what `ParamStore` holds).
    pub fn new(
        cfg: &ModelConfig,
        tensors: Vec<(String, Vec<usize>, Vec<T>)>,
        adam: AdamParams,
    ) -> Result<Self> {
        let layout = ModelLayout::new(cfg);
        if let Some(gap) = layout_gap(&layout) {
            return Err(Error::Data(format!("engine: the model has {gap}")));
        }
        let specs = layout.params();
        if tensors.len() != specs.len() {
            return Err(Error::Data(format!(
                "engine: {} parameters given, the model has {}",
                tensors.len(),
                specs.len()
            )));
        }
        let mut params = Vec::with_capacity(specs.iter().map(|s| s.numel()).sum());
        for ((name, shape, data), spec) in tensors.into_iter().zip(&specs) {
            if name != spec.name || shape != spec.shape || data.len() != spec.numel() {
                return Err(Error::Data(format!(
                    "engine: parameter `{name}` {shape:?} with {} values where the model has `{}` {:?}",
                    data.len(),
                    spec.name,
                    spec.shape
                )));
            }
            params.extend_from_slice(&data);
        }
        let mut offset = 0;
        let index = layout.map(|s| {
            offset += s.numel();
            offset - s.numel()..offset
        });
        let total = params.len();
        Ok(Engine {
            cfg: cfg.clone(),
            layout,
            index,
            params,
            grads: vec![T::zero(); total],
            m: vec![T::zero(); total],
            v: vec![T::zero(); total],
            t: 0,
            adam,
            bufs: Buffers::default(),
            loads: vec![vec![0; cfg.n_experts]; cfg.n_layer],
            last_forward_s: 0.0,
            profile: Profile::new(),
        })
    }

    /// Parameter names, shapes and flat ranges, in layout order.
    pub fn layout(&self) -> impl Iterator<Item = (&str, &[usize], Range<usize>)> {
        self.layout
            .params()
            .into_iter()
            .zip(self.index.params())
            .map(|(s, r)| (s.name.as_str(), s.shape.as_slice(), r.clone()))
    }

    /// Forward and backward of one batch: returns the mean cross-entropy and
    /// leaves `scale ·` ∂(mean CE)/∂θ in [`Engine::grads`] (written, or added
    /// to what is there with `acc`, for gradient accumulation).
    pub fn forward_backward(
        &mut self,
        inputs: &[u32],
        targets: &[u32],
        b: usize,
        t: usize,
        scale: f64,
        acc: bool,
    ) -> Result<f64> {
        self.check_batch(inputs, targets, b, t)?;
        let dims = Dims::new(&self.cfg, b, t);
        self.bufs.size_for(dims, self.cfg.n_layer);
        let t0 = std::time::Instant::now();
        self.profile.start();
        self.forward(inputs, dims);
        self.last_forward_s = t0.elapsed().as_secs_f64();
        let ce = crate::kernels::cross_entropy(
            &mut self.bufs.logits,
            targets,
            dims.v,
            T::c(scale / dims.n as f64),
        );
        self.profile.lap("cross_entropy");
        self.backward(inputs, dims, acc);
        Ok(ce / dims.n as f64)
    }

    fn check_batch(&self, inputs: &[u32], targets: &[u32], b: usize, t: usize) -> Result<()> {
        let v = self.cfg.vocab_size;
        if t == 0 || b == 0 || t > self.cfg.seq_len {
            return Err(Error::Data(format!(
                "engine: batch of {b} × {t} tokens (seq_len is {})",
                self.cfg.seq_len
            )));
        }
        if inputs.len() != b * t || targets.len() != b * t {
            return Err(Error::Data(format!(
                "engine: {} inputs and {} targets for a {b} × {t} batch",
                inputs.len(),
                targets.len()
            )));
        }
        if let Some(&bad) = inputs.iter().chain(targets).find(|&&x| x as usize >= v) {
            return Err(Error::Data(format!(
                "token id {bad} is outside the model's vocabulary of {v}"
            )));
        }
        Ok(())
    }
}
