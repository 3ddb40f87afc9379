//! Basic layers composed from differentiable tensor ops.
//!
//! candle's fused `softmax_last_dim`, `layer_norm` and `rms_norm` have no
//! backward pass and silently stop gradients, so everything here is built
//! from ops that do (gradients tested in `tests/model_gradients.rs`).

use super::params::ParamStore;
use crate::Result;
use candle_core::{Tensor, D};

/// `y = x Wᵀ + b`, W: (out, in).
#[derive(Debug, Clone)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

impl Linear {
    /// A linear layer with N(0, std²) weights and zero bias.
    pub fn new(
        ps: &mut ParamStore,
        name: &str,
        d_in: usize,
        d_out: usize,
        bias: bool,
        std: f64,
    ) -> Result<Self> {
        let weight = ps.normal(&format!("{name}.weight"), &[d_out, d_in], std)?;
        let bias = if bias {
            Some(ps.constant(&format!("{name}.bias"), &[d_out], 0.0)?)
        } else {
            None
        };
        Ok(Linear { weight, bias })
    }

    /// x: (n, in) -> (n, out).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = x.matmul(&self.weight.t()?)?;
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }
}

/// LayerNorm over the last dimension (eps 1e-5, as PyTorch).
#[derive(Debug, Clone)]
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

impl LayerNorm {
    pub fn new(ps: &mut ParamStore, name: &str, d: usize, bias: bool) -> Result<Self> {
        let weight = ps.constant(&format!("{name}.weight"), &[d], 1.0)?;
        let bias = if bias {
            Some(ps.constant(&format!("{name}.bias"), &[d], 0.0)?)
        } else {
            None
        };
        Ok(LayerNorm { weight, bias })
    }

    /// x: (…, d). Fused kernel on CPU.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if x.device().is_cpu() {
            let b = match &self.bias {
                Some(b) => b.clone(),
                None => self.weight.zeros_like()?,
            };
            return super::fused::layer_norm(x, &self.weight, &b, 1e-5);
        }
        self.forward_composed(x)
    }

    /// The same from elementary ops (any device).
    pub fn forward_composed(&self, x: &Tensor) -> Result<Tensor> {
        let mean = x.mean_keepdim(D::Minus1)?;
        let xc = x.broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
        let y = xc
            .broadcast_div(&(var + 1e-5)?.sqrt()?)?
            .broadcast_mul(&self.weight)?;
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }
}

/// Softmax over the last dimension. The max is subtracted for stability and
/// detached (softmax is shift-invariant, so the gradient is unchanged).
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    let m = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&m)?.exp()?;
    Ok(e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?)
}

/// Per-row cross-entropy `logsumexp(logits) - logits[target]`, natural log.
/// logits: (n, V), targets: (n,) u32 -> (n,). Fused kernel on CPU.
pub fn cross_entropy_rows(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    if logits.device().is_cpu() {
        super::fused::cross_entropy_rows(logits, targets)
    } else {
        cross_entropy_rows_composed(logits, targets)
    }
}

/// [`cross_entropy_rows`] composed from elementary ops (any device).
pub fn cross_entropy_rows_composed(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let m = logits.max_keepdim(D::Minus1)?.detach();
    let lse = logits
        .broadcast_sub(&m)?
        .exp()?
        .sum_keepdim(D::Minus1)?
        .log()?
        .add(&m)?;
    let picked = logits.gather(&targets.unsqueeze(1)?, 1)?;
    Ok((lse - picked)?.squeeze(1)?)
}

/// Mean cross-entropy over all rows.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    Ok(cross_entropy_rows(logits, targets)?.mean_all()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn softmax_and_cross_entropy_match_f64_reference() {
        let dev = Device::Cpu;
        let rows: Vec<Vec<f64>> = vec![vec![0.3, -1.2, 2.5, 0.0], vec![100.0, 99.0, -50.0, 3.0]];
        let x = Tensor::new(rows.clone(), &dev).unwrap();
        let sm = softmax_last(&x).unwrap().to_vec2::<f64>().unwrap();
        let ce = cross_entropy_rows(&x, &Tensor::new(&[2u32, 1], &dev).unwrap())
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        for (r, row) in rows.iter().enumerate() {
            let z: f64 = row.iter().map(|v| v.exp()).sum();
            for (c, v) in row.iter().enumerate() {
                assert!((sm[r][c] - v.exp() / z).abs() < 1e-12);
            }
            let t = [2, 1][r];
            assert!(
                (ce[r] - (z.ln() - row[t])).abs() < 1e-9,
                "{} vs {}",
                ce[r],
                z.ln() - row[t]
            );
        }
    }

    #[test]
    fn layer_norm_matches_definition() {
        let dev = Device::Cpu;
        let mut ps = ParamStore::new(DType::F64, &dev, 0);
        let ln = LayerNorm::new(&mut ps, "ln", 5, true).unwrap();
        let v = [1.0, 2.0, -3.0, 0.5, 4.0];
        let y = ln
            .forward(&Tensor::new(&[v], &dev).unwrap())
            .unwrap()
            .to_vec2::<f64>()
            .unwrap();
        let mean = v.iter().sum::<f64>() / 5.0;
        let var = v.iter().map(|a| (a - mean).powi(2)).sum::<f64>() / 5.0;
        for i in 0..5 {
            assert!((y[0][i] - (v[i] - mean) / (var + 1e-5).sqrt()).abs() < 1e-12);
        }
    }
}
