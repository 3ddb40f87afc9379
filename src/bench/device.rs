//! `moescope bench device`: the same tiny model's loss and every parameter
//! gradient on a device and on the CPU (what a CUDA build must reproduce
//! before its numbers are trusted).

use crate::config::ModelConfig;
use crate::model::layers::cross_entropy;
use crate::model::Gpt;
use crate::Result;
use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use serde::Serialize;

/// The comparison: relative differences of the loss and of each gradient.
#[derive(Debug, Serialize)]
pub struct DeviceCheck {
    pub device: String,
    pub loss_cpu: f64,
    pub loss_device: f64,
    /// |loss_device − loss_cpu| / |loss_cpu|.
    pub loss_rel: f64,
    /// Per parameter: max |g_device − g_cpu| / max |g_cpu|.
    pub grad_rel: Vec<(String, f64)>,
    /// The largest of `loss_rel` and every `grad_rel`.
    pub worst_rel: f64,
}

/// Loss and gradients of a seeded tiny model on one batch of random tokens,
/// on the CPU and on `device` (same weights, copied from the CPU model).
pub fn device_check(device: &Device, device_name: &str) -> Result<DeviceCheck> {
    let cfg = ModelConfig {
        vocab_size: 512,
        seq_len: 32,
        n_layer: 2,
        n_head: 4,
        d_model: 64,
        d_ff: 128,
        ..Default::default()
    };
    let cpu = Gpt::new(&cfg, DType::F32, &Device::Cpu, 7)?;
    let dev = Gpt::new(&cfg, DType::F32, device, 7)?;
    for (src, dst) in cpu.params.vars().iter().zip(dev.params.vars()) {
        dst.set(&src.as_tensor().to_device(device)?)?;
    }
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
    let (b, t) = (4, cfg.seq_len);
    let tokens: Vec<u32> = (0..b * (t + 1))
        .map(|_| rng.random_range(0..cfg.vocab_size as u32))
        .collect();
    let (x, y): (Vec<u32>, Vec<u32>) = (0..b)
        .flat_map(|i| (0..t).map(move |j| i * (t + 1) + j))
        .map(|p| (tokens[p], tokens[p + 1]))
        .unzip();
    let (loss_cpu, g_cpu) = loss_and_grads(&cpu, &x, &y, (b, t))?;
    let (loss_device, g_dev) = loss_and_grads(&dev, &x, &y, (b, t))?;
    let loss_rel = (loss_device - loss_cpu).abs() / loss_cpu.abs().max(1e-30);
    let grad_rel: Vec<(String, f64)> = cpu
        .params
        .names()
        .iter()
        .zip(g_cpu.iter().zip(&g_dev))
        .map(|(n, (a, b))| {
            let scale = a.iter().fold(0f64, |m, v| m.max(v.abs()));
            let diff = a.iter().zip(b).fold(0f64, |m, (u, v)| m.max((u - v).abs()));
            (n.clone(), diff / scale.max(1e-30))
        })
        .collect();
    let worst_rel = grad_rel.iter().map(|g| g.1).fold(loss_rel, f64::max);
    Ok(DeviceCheck {
        device: device_name.to_string(),
        loss_cpu,
        loss_device,
        loss_rel,
        grad_rel,
        worst_rel,
    })
}

/// Mean cross-entropy of `model` on (x, y) and every parameter's gradient (host f64).
fn loss_and_grads(
    model: &Gpt,
    x: &[u32],
    y: &[u32],
    (b, t): (usize, usize),
) -> Result<(f64, Vec<Vec<f64>>)> {
    let dev = model.params.device();
    let xt = Tensor::from_slice(x, (b, t), dev)?;
    let yt = Tensor::from_slice(y, b * t, dev)?;
    let loss = cross_entropy(&model.forward(&xt, false)?.logits, &yt)?;
    let grads = loss.backward()?;
    let per_param = model
        .params
        .vars()
        .iter()
        .map(|v| match grads.get(v.as_tensor()) {
            Some(g) => Ok(g.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?),
            None => Ok(vec![0.0; v.elem_count()]),
        })
        .collect::<Result<_>>()?;
    Ok((loss.to_dtype(DType::F64)?.to_scalar::<f64>()?, per_param))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On the CPU against itself every difference is zero; the check runs
    /// the whole path a device run takes.
    #[test]
    fn the_cpu_against_itself_is_exact() {
        let c = device_check(&Device::Cpu, "cpu").unwrap();
        assert!(c.loss_cpu > 5.0 && c.loss_cpu < 7.5, "{}", c.loss_cpu); // ≈ ln 512
        assert_eq!(c.worst_rel, 0.0);
        assert!(c.grad_rel.len() > 10);
    }
}
