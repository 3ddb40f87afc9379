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
    /// the MoE layer's routing aux (MoE layers only). `drop` applies dropout
    /// to each residual branch (attention, FFN) of a training pass.
    fn forward(
        &self,
        x: &Tensor,
        b: usize,
        t: usize,
        mode: ForwardOptions,
        drop: Option<Dropout>,
    ) -> Result<(Tensor, Option<LayerCapture>, Option<RoutingOnGraph>)> {
        let a = self.attn.forward(&self.ln1.forward(x)?, b, t)?;
        let x = (x + Dropout::apply(drop, a, 1)?)?;
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
        Ok(((x + Dropout::apply(drop, y, 2)?)?, cap, aux))
    }
}

/// Dropout of one training pass (nanoGPT's embedding and residual
/// dropout; attention probabilities are not dropped): each mask is drawn from
/// a ChaCha stream named by the pass's seed, the block and the site, so a
/// resumed run draws the same masks.
#[derive(Debug, Clone, Copy)]
struct Dropout {
    p: f64,
    seed: u64,
}

impl Dropout {
    /// The dropout of block `l` (its own seed).
    fn for_block(self, l: usize) -> Dropout {
        Dropout {
            seed: self.seed ^ (l as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15),
            ..self
        }
    }

    /// `x` with each element zeroed with probability p and the rest scaled
    /// by 1/(1 − p); `x` itself when there is no dropout.
    fn apply(d: Option<Dropout>, x: Tensor, site: u64) -> Result<Tensor> {
        use rand::{Rng, SeedableRng};
        let Some(d) = d else { return Ok(x) };
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(d.seed);
        rng.set_stream(site);
        let scale = (1.0 / (1.0 - d.p)) as f32;
        let mask: Vec<f32> = (0..x.elem_count())
            .map(|_| {
                if rng.random::<f64>() < d.p {
                    0.0
                } else {
                    scale
                }
            })
            .collect();
        let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
        Ok((x * mask)?)
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
        let ps = ParamStore::for_layout(&layout::ModelLayout::new(cfg), dtype, device, seed);
        Self::build(cfg, ps)
    }

    /// The model with its parameters set to `values` (in `model::layout`
    /// order, on their device and dtype) rather than initialised.
    pub fn from_values(cfg: &ModelConfig, values: Vec<Tensor>) -> Result<Self> {
        cfg.validate()?;
        let ps = ParamStore::with_values(&layout::ModelLayout::new(cfg), values)?;
        Self::build(cfg, ps)
    }

    /// The modules of `cfg`, their parameters created by `ps`.
    fn build(cfg: &ModelConfig, mut ps: ParamStore) -> Result<Self> {
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
        let drop = match mode.dropout_seed {
            Some(seed) if mode.train && self.cfg.dropout > 0.0 => Some(Dropout {
                p: self.cfg.dropout,
                seed,
            }),
            _ => None,
        };
        let x = tok
            .broadcast_add(&self.wpe.narrow(0, 0, t)?)?
            .reshape((b * t, d))?;
        let mut x = Dropout::apply(drop, x, 0)?;
        let mut captures = Vec::new();
        let mut aux = Vec::new();
        for (l, block) in self.blocks.iter().enumerate() {
            let drop = drop.map(|d| d.for_block(l));
            let (y, cap, a) = block.forward(&x, b, t, mode, drop)?;
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
    fn dropout_drops_p_and_keeps_the_mean_and_only_in_training() {
        let x = Tensor::ones((200, 50), DType::F32, &Device::Cpu).unwrap();
        let d = Some(Dropout { p: 0.3, seed: 7 });
        let y: Vec<f32> = Dropout::apply(d, x.clone(), 1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let zeros = y.iter().filter(|&&v| v == 0.0).count() as f64 / y.len() as f64;
        let mean = y.iter().map(|&v| v as f64).sum::<f64>() / y.len() as f64;
        // 10,000 Bernoulli(0.3) draws: sd of the fraction ≈ 0.0046.
        assert!(
            (zeros - 0.3).abs() < 0.02 && (mean - 1.0).abs() < 0.03,
            "{zeros} {mean}"
        );
        let again = Dropout::apply(d, x.clone(), 1).unwrap();
        let other_site = Dropout::apply(d, x, 2).unwrap();
        let v = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(v(&again), y, "the same seed and site draw the same mask");
        assert_ne!(v(&other_site), y);

        let cfg = ModelConfig {
            vocab_size: 32,
            seq_len: 8,
            n_layer: 2,
            n_head: 2,
            d_model: 16,
            d_ff: 32,
            dropout: 0.2,
            ..Default::default()
        };
        let m = Gpt::new(&cfg, DType::F32, &Device::Cpu, 0).unwrap();
        let toks = Tensor::from_vec((0..16u32).collect(), (2, 8), &Device::Cpu).unwrap();
        let logits = |mode: ForwardOptions| v(&m.forward_with(&toks, mode).unwrap().logits);
        let plain = logits(ForwardOptions::default());
        let seeded = ForwardOptions {
            train: true,
            dropout_seed: Some(3),
            ..Default::default()
        };
        assert_ne!(logits(seeded), plain, "a training pass drops");
        assert_eq!(
            logits(seeded),
            logits(seeded),
            "deterministic given the seed"
        );
        let eval = ForwardOptions {
            dropout_seed: Some(3),
            ..Default::default()
        };
        assert_eq!(logits(eval), plain, "evaluation never drops");
    }

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
