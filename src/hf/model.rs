//! The decoder of a Hugging Face MoE checkpoint, in f32, following
//! transformers' modeling code (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE,
//! DeepSeek-MoE):
//!
//! ```text
//! tokens ─ embed_tokens ─▶ x (b·t, d)
//!   for each decoder layer:
//!     x = x + o_proj(attn(RoPE(q), RoPE(k), v))      q,k,v from input_layernorm(x)
//!     h = post_attention_layernorm(x)                 ◀ the MoE input that is measured
//!     x = x + Σ_e g_e · expert_e(h) [+ σ(w·h) · shared(h)]
//! norm ─ lm_head ─▶ logits (b·t, V)
//! ```
//!
//! Routed experts are moescope's own [`MoeLayer`] (softmax router in f32,
//! top-k, optional renormalisation, dropless dispatch), so every measure
//! that runs on our models runs unchanged on these.

use super::config::{proj_names, Arch, HfConfig, QkNorm};
use super::weights::WeightStore;
use crate::config::{Activation, Routing};
use crate::model::layers::{softmax_last, Linear};
use crate::model::moe::{CapturedRouting, Expert, MoeLayer};
use crate::Result;
use candle_core::{DType, Device, Tensor, D};

/// RMSNorm: x / sqrt(mean(x²) + eps) · w, over the last dimension.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    pub weight: Tensor,
    pub eps: f64,
}

impl RmsNorm {
    fn load(w: &WeightStore, name: &str, d: usize, eps: f64, why: &str) -> Result<Self> {
        Ok(RmsNorm {
            weight: w.load(&format!("{name}.weight"), &[d], why)?,
            eps,
        })
    }

    /// x: (…, d) -> (…, d).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
        let y = x.broadcast_div(&(ms + self.eps)?.sqrt()?)?;
        Ok(y.broadcast_mul(&self.weight)?)
    }
}

/// Rotary position embedding tables (HF `rotate_half` convention).
#[derive(Debug, Clone)]
pub struct Rope {
    /// (t, head_dim): cos/sin of position · inv_freq, the half-table repeated twice.
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    /// Tables for positions 0..t.
    pub fn new(head_dim: usize, theta: f64, t: usize) -> Result<Self> {
        let half = head_dim / 2;
        // As transformers: inv_freq and the angles in float32.
        let inv: Vec<f32> = (0..half)
            .map(|i| 1.0 / (theta as f32).powf((2 * i) as f32 / head_dim as f32))
            .collect();
        let mut cos = Vec::with_capacity(t * head_dim);
        let mut sin = Vec::with_capacity(t * head_dim);
        for p in 0..t {
            for _ in 0..2 {
                for &f in &inv {
                    let a = p as f32 * f;
                    cos.push(a.cos());
                    sin.push(a.sin());
                }
            }
        }
        Ok(Rope {
            cos: Tensor::from_vec(cos, (t, head_dim), &Device::Cpu)?,
            sin: Tensor::from_vec(sin, (t, head_dim), &Device::Cpu)?,
        })
    }

    /// x: (b, h, t, hd) -> x·cos + rotate_half(x)·sin.
    fn apply(&self, x: &Tensor) -> Result<Tensor> {
        let (_, _, t, hd) = x.dims4()?;
        let cos = self.cos.narrow(0, 0, t)?;
        let sin = self.sin.narrow(0, 0, t)?;
        let x1 = x.narrow(D::Minus1, 0, hd / 2)?;
        let x2 = x.narrow(D::Minus1, hd / 2, hd / 2)?;
        let rot = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
        Ok((x.broadcast_mul(&cos)? + rot.broadcast_mul(&sin)?)?)
    }
}

/// Grouped-query self-attention with RoPE, causal (and sliding-window) mask.
#[derive(Debug, Clone)]
pub struct Attention {
    pub q: Linear,
    pub k: Linear,
    pub v: Linear,
    pub o: Linear,
    pub q_norm: Option<RmsNorm>,
    pub k_norm: Option<RmsNorm>,
    qk_norm: QkNorm,
    clip: Option<f64>,
    window: Option<usize>,
    n_heads: usize,
    n_kv: usize,
    head_dim: usize,
}

fn linear(
    w: &WeightStore,
    name: &str,
    out: usize,
    inp: usize,
    bias: bool,
    why: &str,
) -> Result<Linear> {
    Ok(Linear {
        weight: w.load(&format!("{name}.weight"), &[out, inp], why)?,
        bias: if bias {
            Some(w.load(&format!("{name}.bias"), &[out], why)?)
        } else {
            None
        },
    })
}

impl Attention {
    fn load(w: &WeightStore, cfg: &HfConfig, p: &str) -> Result<Self> {
        let (d, h, kv, hd) = (cfg.hidden_size, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim);
        let qwhy = "num_attention_heads × head_dim, hidden_size";
        let kwhy = "num_key_value_heads × head_dim, hidden_size";
        let (q_norm, k_norm) = match cfg.qk_norm {
            QkNorm::None => (None, None),
            QkNorm::PerHead => (
                Some(RmsNorm::load(
                    w,
                    &format!("{p}.q_norm"),
                    hd,
                    cfg.rms_eps,
                    "head_dim",
                )?),
                Some(RmsNorm::load(
                    w,
                    &format!("{p}.k_norm"),
                    hd,
                    cfg.rms_eps,
                    "head_dim",
                )?),
            ),
            QkNorm::Full => (
                Some(RmsNorm::load(
                    w,
                    &format!("{p}.q_norm"),
                    h * hd,
                    cfg.rms_eps,
                    qwhy,
                )?),
                Some(RmsNorm::load(
                    w,
                    &format!("{p}.k_norm"),
                    kv * hd,
                    cfg.rms_eps,
                    kwhy,
                )?),
            ),
        };
        Ok(Attention {
            q: linear(w, &format!("{p}.q_proj"), h * hd, d, cfg.qkv_bias, qwhy)?,
            k: linear(w, &format!("{p}.k_proj"), kv * hd, d, cfg.qkv_bias, kwhy)?,
            v: linear(w, &format!("{p}.v_proj"), kv * hd, d, cfg.qkv_bias, kwhy)?,
            o: linear(w, &format!("{p}.o_proj"), d, h * hd, cfg.o_bias, qwhy)?,
            q_norm,
            k_norm,
            qk_norm: cfg.qk_norm,
            clip: cfg.clip_qkv,
            window: cfg.sliding_window,
            n_heads: h,
            n_kv: kv,
            head_dim: hd,
        })
    }

    /// x: (b·t, d) -> (b·t, d).
    pub fn forward(&self, x: &Tensor, b: usize, t: usize, rope: &Rope) -> Result<Tensor> {
        let (h, kv, hd) = (self.n_heads, self.n_kv, self.head_dim);
        let mut q = self.q.forward(x)?; // (b·t, h·hd)
        let mut k = self.k.forward(x)?; // (b·t, kv·hd)
        let mut v = self.v.forward(x)?;
        if self.qk_norm == QkNorm::Full {
            q = self.q_norm.as_ref().expect("loaded").forward(&q)?;
            k = self.k_norm.as_ref().expect("loaded").forward(&k)?;
        }
        if let Some(c) = self.clip {
            q = q.clamp(-c, c)?;
            k = k.clamp(-c, c)?;
            v = v.clamp(-c, c)?;
        }
        let mut q = q.reshape((b, t, h, hd))?;
        let mut k = k.reshape((b, t, kv, hd))?;
        if self.qk_norm == QkNorm::PerHead {
            q = self.q_norm.as_ref().expect("loaded").forward(&q)?;
            k = self.k_norm.as_ref().expect("loaded").forward(&k)?;
        }
        let q = rope.apply(&q.transpose(1, 2)?.contiguous()?)?; // (b, h, t, hd)
        let k = rope.apply(&k.transpose(1, 2)?.contiguous()?)?; // (b, kv, t, hd)
        let v = v.reshape((b, t, kv, hd))?.transpose(1, 2)?.contiguous()?;
        // Grouped queries: the n_rep query heads of one kv head share its keys,
        // so fold them into the row dimension instead of repeating k and v.
        let rep = h / kv;
        let q = q.reshape((b, kv, rep * t, hd))?;
        let scores = (q.matmul(&k.t()?)? / (hd as f64).sqrt())?; // (b, kv, rep·t, t)
        let scores = scores
            .reshape((b, kv, rep, t, t))?
            .broadcast_add(&self.mask(t)?)?;
        let p = softmax_last(&scores)?.reshape((b, kv, rep * t, t))?;
        let y = p.matmul(&v)?; // (b, kv, rep·t, hd)
        let y = y
            .reshape((b, h, t, hd))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b * t, h * hd))?;
        self.o.forward(&y)
    }

    /// (t, t): 0 where query i may attend key j, −∞ elsewhere.
    fn mask(&self, t: usize) -> Result<Tensor> {
        let m: Vec<f32> = (0..t)
            .flat_map(|i| {
                (0..t).map(move |j| {
                    let outside = self.window.is_some_and(|w| i >= j + w);
                    if j > i || outside {
                        f32::NEG_INFINITY
                    } else {
                        0.0
                    }
                })
            })
            .collect();
        Ok(Tensor::from_vec(m, (t, t), &Device::Cpu)?)
    }
}

/// Always-on expert(s) beside the routed ones.
#[derive(Debug, Clone)]
pub struct SharedExpert {
    pub mlp: Expert,
    /// Qwen2-MoE `shared_expert_gate`: (1, d).
    pub gate: Option<Linear>,
}

/// The feed-forward part of a decoder layer.
#[derive(Debug, Clone)]
pub enum HfFfn {
    Moe {
        moe: MoeLayer,
        shared: Option<SharedExpert>,
    },
    Dense(Expert),
}

/// What the shared expert did on one batch (for its separate report).
#[derive(Debug, Clone)]
pub struct SharedCapture {
    /// h_shared(x), before gating: (n, d).
    pub output: Tensor,
    /// sigmoid gate per token (n,), when gated.
    pub gate: Option<Vec<f32>>,
    /// The routed part Σ_e g_e h_e(x): (n, d).
    pub routed: Tensor,
}

/// What a MoE layer saw and did on one batch.
#[derive(Debug, Clone)]
pub struct FfnCapture {
    pub moe: CapturedRouting,
    pub shared: Option<SharedCapture>,
}

fn swiglu(w: &WeightStore, names: [String; 3], d: usize, f: usize, why: &str) -> Result<Expert> {
    let [gate, up, down] = names;
    Ok(Expert {
        gate: Some(linear(w, &gate, f, d, false, why)?),
        up: linear(w, &up, f, d, false, why)?,
        down: linear(w, &down, d, f, false, why)?,
        activation: Activation::Silu,
    })
}

impl HfFfn {
    fn load(w: &WeightStore, cfg: &HfConfig, l: usize) -> Result<Self> {
        let d = cfg.hidden_size;
        let p = format!("model.layers.{l}");
        if !cfg.moe_layers[l] {
            return Ok(HfFfn::Dense(swiglu(
                w,
                proj_names(&format!("{p}.mlp")),
                d,
                cfg.dense_d_ff,
                "intermediate_size, hidden_size",
            )?));
        }
        let block = cfg.moe_block(l);
        let (e_n, f) = (cfg.n_experts, cfg.moe_d_ff);
        let fwhy = match cfg.arch {
            Arch::Mixtral | Arch::Olmoe => "intermediate_size, hidden_size",
            _ => "moe_intermediate_size, hidden_size",
        };
        let router = linear(
            w,
            &format!("{block}.gate"),
            e_n,
            d,
            false,
            "num_experts, hidden_size",
        )?;
        let experts = (0..e_n)
            .map(|e| swiglu(w, cfg.expert_names(&block, e), d, f, fwhy))
            .collect::<Result<Vec<_>>>()?;
        let shared = match cfg.shared {
            None => None,
            Some(s) => {
                let why = if cfg.arch == Arch::Qwen2Moe {
                    "shared_expert_intermediate_size, hidden_size"
                } else {
                    "moe_intermediate_size × n_shared_experts, hidden_size"
                };
                Some(SharedExpert {
                    mlp: swiglu(w, proj_names(&cfg.shared_prefix(&block)), d, s.d_ff, why)?,
                    gate: if s.gated {
                        Some(linear(
                            w,
                            &format!("{block}.shared_expert_gate"),
                            1,
                            d,
                            false,
                            "1, hidden_size",
                        )?)
                    } else {
                        None
                    },
                })
            }
        };
        Ok(HfFfn::Moe {
            moe: MoeLayer {
                router,
                experts,
                routing: Routing::Topk,
                top_k: cfg.top_k,
                norm_topk: cfg.norm_topk,
                temperature: 1.0,
                capacity_factor: 0.0,
                balance_bias: None,
            },
            shared,
        })
    }

    /// h: (n, d) -> (n, d), with the capture of a MoE layer when asked.
    pub fn forward(&self, h: &Tensor, capture: bool) -> Result<(Tensor, Option<FfnCapture>)> {
        match self {
            HfFfn::Dense(mlp) => Ok((mlp.forward(h)?, None)),
            HfFfn::Moe { moe, shared } => {
                let (y, cap) = moe.forward(h, capture)?;
                let Some(s) = shared else {
                    return Ok((y, cap.map(|moe| FfnCapture { moe, shared: None })));
                };
                let out = s.mlp.forward(h)?;
                let (scaled, gate) = match &s.gate {
                    Some(g) => {
                        let gv = sigmoid(&g.forward(h)?)?; // (n, 1)
                        let host = capture
                            .then(|| gv.flatten_all()?.to_vec1::<f32>())
                            .transpose()?;
                        (out.broadcast_mul(&gv)?, host)
                    }
                    None => (out.clone(), None),
                };
                let total = (&y + scaled)?;
                Ok((
                    total,
                    cap.map(|moe| FfnCapture {
                        moe,
                        shared: Some(SharedCapture {
                            output: out,
                            gate,
                            routed: y,
                        }),
                    }),
                ))
            }
        }
    }

    /// The routed MoE layer, if this is one.
    pub fn moe(&self) -> Option<&MoeLayer> {
        match self {
            HfFfn::Moe { moe, .. } => Some(moe),
            HfFfn::Dense(_) => None,
        }
    }
}

/// sigmoid(x) = 1 / (1 + e^{−x}).
fn sigmoid(x: &Tensor) -> Result<Tensor> {
    Ok((x.neg()?.exp()? + 1.0)?.recip()?)
}

/// One decoder layer.
#[derive(Debug, Clone)]
pub struct DecoderLayer {
    pub index: usize,
    pub input_norm: RmsNorm,
    pub attn: Attention,
    pub post_norm: RmsNorm,
    pub ffn: HfFfn,
}

impl DecoderLayer {
    /// Load layer `l`'s weights (f32).
    pub fn load(w: &WeightStore, cfg: &HfConfig, l: usize) -> Result<Self> {
        let p = format!("model.layers.{l}");
        let d = cfg.hidden_size;
        Ok(DecoderLayer {
            index: l,
            input_norm: RmsNorm::load(
                w,
                &format!("{p}.input_layernorm"),
                d,
                cfg.rms_eps,
                "hidden_size",
            )?,
            attn: Attention::load(w, cfg, &format!("{p}.self_attn"))?,
            post_norm: RmsNorm::load(
                w,
                &format!("{p}.post_attention_layernorm"),
                d,
                cfg.rms_eps,
                "hidden_size",
            )?,
            ffn: HfFfn::load(w, cfg, l)?,
        })
    }

    /// The attention half: x: (b·t, d) -> (x + attn, its post-attention norm h).
    pub fn attend(&self, x: &Tensor, b: usize, t: usize, rope: &Rope) -> Result<(Tensor, Tensor)> {
        let x = (x + self
            .attn
            .forward(&self.input_norm.forward(x)?, b, t, rope)?)?;
        let h = self.post_norm.forward(&x)?;
        Ok((x, h))
    }

    /// The whole layer; with `capture`, also the MoE input h and what the MoE did.
    pub fn forward(
        &self,
        x: &Tensor,
        b: usize,
        t: usize,
        rope: &Rope,
        capture: bool,
    ) -> Result<(Tensor, Option<(Tensor, FfnCapture)>)> {
        let (x, h) = self.attend(x, b, t, rope)?;
        let (y, cap) = self.ffn.forward(&h, capture)?;
        Ok(((x + y)?, cap.map(|c| (h, c))))
    }
}

/// Embeddings, final norm and output projection.
#[derive(Debug, Clone)]
pub struct Head {
    pub norm: RmsNorm,
    /// (V, d).
    pub lm_head: Tensor,
}

/// Token embeddings (V, d).
pub fn load_embeddings(w: &WeightStore, cfg: &HfConfig) -> Result<Tensor> {
    w.load(
        "model.embed_tokens.weight",
        &[cfg.vocab_size, cfg.hidden_size],
        "vocab_size, hidden_size",
    )
}

impl Head {
    /// The final norm and lm_head (the embeddings when tied).
    pub fn load(w: &WeightStore, cfg: &HfConfig) -> Result<Self> {
        let lm_head = if cfg.tie_embeddings && !w.contains("lm_head.weight") {
            load_embeddings(w, cfg)?
        } else {
            w.load(
                "lm_head.weight",
                &[cfg.vocab_size, cfg.hidden_size],
                "vocab_size, hidden_size",
            )?
        };
        Ok(Head {
            norm: RmsNorm::load(w, "model.norm", cfg.hidden_size, cfg.rms_eps, "hidden_size")?,
            lm_head,
        })
    }

    /// x: (n, d) -> logits (n, V).
    pub fn logits(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.norm.forward(x)?.matmul(&self.lm_head.t()?)?)
    }
}

/// tokens (b·t ids) -> (b·t, d) embeddings.
pub fn embed(embeddings: &Tensor, tokens: &[u32]) -> Result<Tensor> {
    let idx = Tensor::new(tokens, &Device::Cpu)?;
    Ok(embeddings.index_select(&idx, 0)?.to_dtype(DType::F32)?)
}
