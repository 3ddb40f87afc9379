//! NanoGPT-MoE: a GPT-2-style decoder whose FFNs are Mixture-of-Experts layers.
//!
//! ```text
//! tokens (b, t) ─ wte + wpe ─▶ x (b·t, d)
//!   for each block:  x = x + attn(ln1(x));  x = x + ffn(ln2(x))   (ffn: MoE or dense)
//! ln_f ─ x · wteᵀ (tied) ─▶ logits (b·t, V)
//! ```
//!
//! Parameter names, shapes and order (also the safetensors tensor names,
//! listed in FORMAT.md) come from [`layout::ModelLayout`].

pub mod attention;
pub mod fused;
pub mod layers;
pub mod layout;
pub mod moe;
pub mod params;
pub mod sample;

use crate::config::{ExpertKind, ModelConfig};
use crate::{Error, Result};
use attention::CausalSelfAttention;
use candle_core::{DType, Device, Tensor};
use layers::{cross_entropy, LayerNorm};
use moe::{CapturedRouting, Expert, ForwardOptions, MoeLayer, RoutingOnGraph};
use params::ParamStore;

/// The feed-forward part of a block.
#[derive(Debug, Clone)]
pub enum Ffn {
    Moe(MoeLayer),
    Dense(Expert),
}

/// One pre-LayerNorm transformer block.
#[derive(Debug, Clone)]
pub struct Block {
    pub ln1: LayerNorm,
    pub attn: CausalSelfAttention,
    pub ln2: LayerNorm,
    pub ffn: Ffn,
}

impl Block {
    fn new(ps: &mut ParamStore, l: usize, cfg: &ModelConfig) -> Result<Self> {
        let (d, std) = (cfg.d_model, cfg.init_std);
        // nanoGPT: residual projections get std / sqrt(2 · n_layer).
        let res_std = std / (2.0 * cfg.n_layer as f64).sqrt();
        let p = format!("layers.{l}");
        let ln1 = LayerNorm::new(ps, &format!("{p}.ln1"), d, cfg.bias)?;
        let attn = CausalSelfAttention::new(
            ps,
            &format!("{p}.attn"),
            d,
            cfg.n_head,
            cfg.bias,
            std,
            res_std,
        )?;
        let ln2 = LayerNorm::new(ps, &format!("{p}.ln2"), d, cfg.bias)?;
        let ffn = if cfg.is_moe_layer(l) {
            Ffn::Moe(MoeLayer::new(ps, &format!("{p}.moe"), cfg, std, res_std)?)
        } else {
            Ffn::Dense(Expert::new(
                ps,
                &format!("{p}.mlp"),
                cfg,
                ExpertKind::Mlp,
                std,
                res_std,
            )?)
        };
        Ok(Block {
            ln1,
            attn,
            ln2,
            ffn,
        })
    }

    /// x: (b·t, d) -> (b·t, d), the MoE capture when asked and present, and
    /// the MoE layer's routing aux (MoE layers only).
    fn forward(
        &self,
        x: &Tensor,
        b: usize,
        t: usize,
        mode: ForwardOptions,
    ) -> Result<(Tensor, Option<LayerCapture>, Option<RoutingOnGraph>)> {
        let x = (x + self.attn.forward(&self.ln1.forward(x)?, b, t)?)?;
        let h = self.ln2.forward(&x)?;
        let (y, cap, aux) = match &self.ffn {
            Ffn::Moe(moe) => {
                let o = moe.forward_with(&h, mode)?;
                (
                    o.y,
                    o.capture.map(|moe| LayerCapture {
                        input: h.detach(),
                        moe,
                    }),
                    Some(o.aux),
                )
            }
            Ffn::Dense(mlp) => (mlp.forward(&h)?, None, None),
        };
        Ok(((x + y)?, cap, aux))
    }
}

/// What a MoE layer saw and did in one forward pass.
#[derive(Debug, Clone)]
pub struct LayerCapture {
    /// The MoE input after the pre-norm (b·t, d), detached.
    pub input: Tensor,
    pub moe: CapturedRouting,
}

/// Output of a forward pass.
#[derive(Debug)]
pub struct ForwardOutput {
    /// (b·t, V).
    pub logits: Tensor,
    /// One entry per MoE layer, when capture was requested.
    pub captures: Vec<LayerCapture>,
    /// One entry per MoE layer: router logits and probabilities on the graph,
    /// the selection, and (when asked) the expert outputs, for the regularisers.
    pub aux: Vec<RoutingOnGraph>,
}

/// The NanoGPT-MoE language model.
#[derive(Debug)]
pub struct Gpt {
    pub cfg: ModelConfig,
    /// Token embeddings (V, d), tied with the output projection.
    pub wte: Tensor,
    /// Position embeddings (seq_len, d).
    pub wpe: Tensor,
    pub blocks: Vec<Block>,
    pub ln_f: LayerNorm,
    pub params: ParamStore,
}

impl Gpt {
    /// A freshly initialised model (nanoGPT init, seeded). `cfg.vocab_size` must be set.
    pub fn new(cfg: &ModelConfig, dtype: DType, device: &Device, seed: u64) -> Result<Self> {
        cfg.validate()?;
        if cfg.vocab_size == 0 {
            return Err(Error::config(
                "model.vocab_size",
                "must be resolved from the tokeniser before building the model",
            ));
        }
        let mut ps = ParamStore::for_layout(&layout::ModelLayout::new(cfg), dtype, device, seed);
        let d = cfg.d_model;
        let wte = ps.normal("wte.weight", &[cfg.vocab_size, d], cfg.init_std)?;
        let wpe = ps.normal("wpe.weight", &[cfg.seq_len, d], cfg.init_std)?;
        let blocks = (0..cfg.n_layer)
            .map(|l| Block::new(&mut ps, l, cfg))
            .collect::<Result<Vec<_>>>()?;
        let ln_f = LayerNorm::new(&mut ps, "ln_f", d, cfg.bias)?;
        ps.assert_complete();
        Ok(Gpt {
            cfg: cfg.clone(),
            wte,
            wpe,
            blocks,
            ln_f,
            params: ps,
        })
    }

    /// Set the number of experts per token of every top-k MoE layer.
    pub fn set_top_k(&mut self, k: usize) {
        for b in &mut self.blocks {
            if let Ffn::Moe(m) = &mut b.ffn {
                m.top_k = k;
            }
        }
    }

    /// The MoE layers, in order, with their block index.
    pub fn moe_layers(&self) -> impl Iterator<Item = (usize, &MoeLayer)> {
        self.blocks
            .iter()
            .enumerate()
            .filter_map(|(l, b)| match &b.ffn {
                Ffn::Moe(m) => Some((l, m)),
                Ffn::Dense(_) => None,
            })
    }

    /// tokens: (b, t) u32, t ≤ seq_len -> logits (b·t, V).
    pub fn forward(&self, tokens: &Tensor, capture: bool) -> Result<ForwardOutput> {
        self.forward_with(
            tokens,
            ForwardOptions {
                capture,
                ..Default::default()
            },
        )
    }

    /// [`Gpt::forward`] with full control of the MoE dispatch (training passes).
    pub fn forward_with(&self, tokens: &Tensor, mode: ForwardOptions) -> Result<ForwardOutput> {
        let (b, t) = tokens.dims2()?;
        if t > self.cfg.seq_len {
            return Err(Error::Data(format!(
                "sequence of {t} tokens exceeds model.seq_len = {}",
                self.cfg.seq_len
            )));
        }
        let d = self.cfg.d_model;
        let tok = self
            .wte
            .index_select(&tokens.flatten_all()?, 0)?
            .reshape((b, t, d))?;
        let mut x = tok
            .broadcast_add(&self.wpe.narrow(0, 0, t)?)?
            .reshape((b * t, d))?;
        let mut captures = Vec::new();
        let mut aux = Vec::new();
        for block in &self.blocks {
            let (y, cap, a) = block.forward(&x, b, t, mode)?;
            x = y;
            captures.extend(cap);
            aux.extend(a);
        }
        let x = self.ln_f.forward(&x)?;
        let logits = x.matmul(&self.wte.t()?)?;
        Ok(ForwardOutput {
            logits,
            captures,
            aux,
        })
    }

    /// Mean next-token cross-entropy (nats). inputs, targets: (b, t) u32.
    pub fn loss(&self, inputs: &Tensor, targets: &Tensor) -> Result<Tensor> {
        let out = self.forward(inputs, false)?;
        cross_entropy(&out.logits, &targets.flatten_all()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn param_count_formula_matches_model() {
        for preset in ["tiny", "small"] {
            for expert in [ExpertKind::Mlp, ExpertKind::Swiglu] {
                let mut cfg = Config::preset(preset).unwrap().model;
                cfg.vocab_size = 320;
                cfg.expert = expert;
                cfg.moe_every = 2;
                let m = Gpt::new(&cfg, DType::F32, &Device::Cpu, 0).unwrap();
                assert_eq!(m.params.num_params(), cfg.param_counts().0);
            }
        }
    }
}
