//! Causal multi-head self-attention.

use super::layers::{softmax_last, Linear};
use super::params::ParamStore;
use crate::Result;
use candle_core::{Device, Tensor};

#[derive(Debug, Clone)]
pub struct CausalSelfAttention {
    /// Fused q, k, v projection: d -> 3d.
    pub qkv: Linear,
    /// Output projection (a residual projection: scaled init).
    pub proj: Linear,
    pub n_head: usize,
}

impl CausalSelfAttention {
    pub fn new(
        ps: &mut ParamStore,
        name: &str,
        d: usize,
        n_head: usize,
        bias: bool,
        std: f64,
        res_std: f64,
    ) -> Result<Self> {
        Ok(CausalSelfAttention {
            qkv: Linear::new(ps, &format!("{name}.qkv"), d, 3 * d, bias, std)?,
            proj: Linear::new(ps, &format!("{name}.proj"), d, d, bias, res_std)?,
            n_head,
        })
    }

    /// x: (b·t, d) rows in sequence order -> (b·t, d).
    pub fn forward(&self, x: &Tensor, b: usize, t: usize) -> Result<Tensor> {
        let d = x.dim(1)?;
        let (h, hd) = (self.n_head, d / self.n_head);
        // (b·t, 3d) -> (3, b, h, t, hd)
        let qkv = self
            .qkv
            .forward(x)?
            .reshape((b, t, 3, h, hd))?
            .permute((2, 0, 3, 1, 4))?;
        let q = qkv.get(0)?.contiguous()?;
        let k = qkv.get(1)?.contiguous()?;
        let v = qkv.get(2)?.contiguous()?;
        let scale = 1.0 / (hd as f64).sqrt();
        // (b, h, t, t)
        let scores = q.matmul(&k.t()?)?;
        let att = if x.device().is_cpu() {
            super::fused::causal_softmax(&scores, scale)?
        } else {
            softmax_last(&(scores * scale)?.broadcast_add(&causal_mask(
                t,
                x.dtype(),
                x.device(),
            )?)?)?
        };
        // (b, h, t, hd) -> (b, t, h, hd) -> (b·t, d)
        let y = att.matmul(&v)?.transpose(1, 2)?.reshape((b * t, d))?;
        self.proj.forward(&y)
    }
}

/// (t, t) additive mask: 0 on and below the diagonal, -inf above.
fn causal_mask(t: usize, dtype: candle_core::DType, dev: &Device) -> Result<Tensor> {
    let m: Vec<f32> = (0..t * t)
        .map(|i| {
            if i % t > i / t {
                f32::NEG_INFINITY
            } else {
                0.0
            }
        })
        .collect();
    Ok(Tensor::from_vec(m, (t, t), dev)?.to_dtype(dtype)?)
}
