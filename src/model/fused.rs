//! Fused CPU kernels with hand-written backward passes, where composing
//! elementary tensor ops would make many passes over large tensors.
//!
//! - [`cross_entropy_rows`]: per-row `logsumexp(x) − x[target]`; backward
//!   `(softmax(x) − onehot(target)) · grad`, two passes over the logits
//!   instead of about ten.
//!
//! - [`layer_norm`]: LayerNorm over the last dimension with weight and bias;
//!   one op instead of nine, backward in two passes.
//! - [`causal_softmax`]: `softmax(scale · s + causal mask)` over the last
//!   dimension of attention scores (…, t, t); backward `scale · y ⊙ (g − Σ g y)`.
//!
//! The arithmetic is `crate::kernels`' (shared with the training engine);
//! this file only adapts candle's storage to it. Each op is checked against
//! the composed reference (values and gradients, f64) in the tests below.
//! Non-CPU devices use the composed path.

use crate::kernels::{self, Real};
use crate::Result;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

fn contiguous<'a, T>(v: &'a [T], l: &Layout) -> candle_core::Result<&'a [T]> {
    let (a, b) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("fused kernel: non-contiguous input".into()))?;
    Ok(&v[a..b])
}

/// Float storage the kernels run on, or an error naming the op.
trait FloatStorage: Real {
    fn slice<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> candle_core::Result<&'a [Self]>;
    fn storage(v: Vec<Self>) -> CpuStorage;
}

impl FloatStorage for f32 {
    fn slice<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> candle_core::Result<&'a [f32]> {
        match s {
            CpuStorage::F32(v) => contiguous(v, l),
            _ => candle_core::bail!("{op}: all inputs must have one dtype, f32 or f64"),
        }
    }
    fn storage(v: Vec<f32>) -> CpuStorage {
        CpuStorage::F32(v)
    }
}

impl FloatStorage for f64 {
    fn slice<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> candle_core::Result<&'a [f64]> {
        match s {
            CpuStorage::F64(v) => contiguous(v, l),
            _ => candle_core::bail!("{op}: all inputs must have one dtype, f32 or f64"),
        }
    }
    fn storage(v: Vec<f64>) -> CpuStorage {
        CpuStorage::F64(v)
    }
}

/// Runs `$body` with `$t` bound to the float type of `$s` (f32 or f64).
macro_rules! by_dtype {
    ($s:expr, $op:expr, |$t:ident| $body:expr) => {
        match $s {
            CpuStorage::F32(_) => {
                type $t = f32;
                $body
            }
            CpuStorage::F64(_) => {
                type $t = f64;
                $body
            }
            _ => candle_core::bail!("{}: f32 or f64 only", $op),
        }
    };
}

/// Cross-entropy targets as u32 ids, each checked against the vocabulary `v`.
fn targets(s: &CpuStorage, l: &Layout, n: usize, v: usize) -> candle_core::Result<Vec<u32>> {
    let t: Vec<u32> = match s {
        CpuStorage::U32(t) => contiguous(t, l)?.to_vec(),
        CpuStorage::I64(t) => contiguous(t, l)?
            .iter()
            .map(|&t| u32::try_from(t).unwrap_or(u32::MAX))
            .collect(),
        _ => candle_core::bail!("cross-entropy: targets must be u32 or i64"),
    };
    if t.len() != n || t.iter().any(|&t| t as usize >= v) {
        candle_core::bail!(
            "cross-entropy: {} targets for {n} rows, or a target id ≥ vocabulary {v}",
            t.len()
        );
    }
    Ok(t)
}

/// Row-wise cross-entropy (forward).
struct CrossEntropy;

impl CustomOp2 for CrossEntropy {
    fn name(&self) -> &'static str {
        "fused-cross-entropy"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, v) = l1.shape().dims2()?;
        let t = targets(s2, l2, n, v)?;
        let out = by_dtype!(s1, self.name(), |F| {
            let mut loss = vec![F::default(); n];
            kernels::cross_entropy_rows(F::slice(s1, l1, self.name())?, &t, v, &mut loss);
            F::storage(loss)
        });
        Ok((out, Shape::from(n)))
    }
    fn bwd(
        &self,
        logits: &Tensor,
        tgt: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let g = logits.apply_op3_no_bwd(tgt, &grad.contiguous()?, &CrossEntropyGrad)?;
        Ok((Some(g), None))
    }
}

/// d loss_i / d logits_ij = (softmax_ij − [j = t_i]) · grad_i.
struct CrossEntropyGrad;

impl CustomOp3 for CrossEntropyGrad {
    fn name(&self) -> &'static str {
        "fused-cross-entropy-grad"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, v) = l1.shape().dims2()?;
        let t = targets(s2, l2, n, v)?;
        let out = by_dtype!(s1, self.name(), |F| {
            let (x, g) = (
                F::slice(s1, l1, self.name())?,
                F::slice(s3, l3, self.name())?,
            );
            let mut dx = vec![F::default(); x.len()];
            kernels::cross_entropy_rows_backward(x, &t, g, &mut dx);
            F::storage(dx)
        });
        Ok((out, l1.shape().clone()))
    }
}

/// Per-row cross-entropy, fused on CPU. logits (n, V), targets (n,) -> (n,).
pub fn cross_entropy_rows(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let logits = logits.contiguous()?;
    let targets = targets.contiguous()?;
    Ok(logits.apply_op2(&targets, CrossEntropy)?)
}

/// LayerNorm forward: y = (x − μ)/√(σ² + eps) · w + b, per row.
struct LayerNormOp {
    eps: f64,
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "fused-layer-norm"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let d = *l1.shape().dims().last().unwrap_or(&1);
        let out = by_dtype!(s1, self.name(), |F| {
            let op = self.name();
            let (x, w, b) = (
                F::slice(s1, l1, op)?,
                F::slice(s2, l2, op)?,
                F::slice(s3, l3, op)?,
            );
            let rows = x.len() / d.max(1);
            let mut y = vec![F::default(); x.len()];
            let (mut mean, mut rstd) = (vec![F::default(); rows], vec![F::default(); rows]);
            kernels::layer_norm(x, w, Some(b), self.eps, &mut y, &mut mean, &mut rstd);
            F::storage(y)
        });
        Ok((out, l1.shape().clone()))
    }
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let d = x.dim(candle_core::D::Minus1)?;
        // One op computes dx (rows 0..n), dw (row n) and db (row n+1).
        let all = x.apply_op3_no_bwd(w, &g.contiguous()?, &LayerNormGrad { eps: self.eps })?;
        let n = x.elem_count() / d;
        let dx = all.narrow(0, 0, n)?.reshape(x.shape())?;
        let dw = all.get(n)?;
        let db = all.get(n + 1)?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

struct LayerNormGrad {
    eps: f64,
}

impl CustomOp3 for LayerNormGrad {
    fn name(&self) -> &'static str {
        "fused-layer-norm-grad"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let d = *l1.shape().dims().last().unwrap_or(&1);
        let rows = l1.shape().elem_count() / d.max(1);
        let out = by_dtype!(s1, self.name(), |F| {
            let op = self.name();
            let (x, w, g) = (
                F::slice(s1, l1, op)?,
                F::slice(s2, l2, op)?,
                F::slice(s3, l3, op)?,
            );
            // The forward kept no statistics: recompute them (one pass over x).
            let (mut mean, mut rstd) = (vec![F::default(); rows], vec![F::default(); rows]);
            kernels::layer_norm_stats(x, d, self.eps, &mut mean, &mut rstd);
            let mut out = vec![F::default(); x.len() + 2 * d];
            let (dx, rest) = out.split_at_mut(x.len());
            let (dw, db) = rest.split_at_mut(d);
            kernels::layer_norm_backward(g, x, &mean, &rstd, w, dx, dw, Some(db), false);
            F::storage(out)
        });
        Ok((out, Shape::from((rows + 2, d))))
    }
}

/// LayerNorm over the last dimension (fused, CPU). x: (…, d), w, b: (d).
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    Ok(x.contiguous()?
        .apply_op3(&w.contiguous()?, &b.contiguous()?, LayerNormOp { eps })?)
}

/// softmax(scale · s + causal mask) over the last dimension of (…, t, t) scores.
struct CausalSoftmax {
    scale: f64,
}

impl CustomOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        "fused-causal-softmax"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let t = *l.shape().dims().last().unwrap_or(&1);
        let out = by_dtype!(s, self.name(), |F| {
            let mut att = F::slice(s, l, self.name())?.to_vec();
            let scale = F::c(self.scale);
            att.par_chunks_mut(t * t)
                .for_each(|blk| kernels::causal_softmax(blk, t, scale));
            F::storage(att)
        });
        Ok((out, l.shape().clone()))
    }
    fn bwd(&self, _arg: &Tensor, res: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(res.apply_op2_no_bwd(
            &g.contiguous()?,
            &CausalSoftmaxGrad { scale: self.scale },
        )?))
    }
}

/// ds = scale · y ⊙ (g − Σ g ⊙ y), per row.
struct CausalSoftmaxGrad {
    scale: f64,
}

impl CustomOp2 for CausalSoftmaxGrad {
    fn name(&self) -> &'static str {
        "fused-causal-softmax-grad"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let t = *l1.shape().dims().last().unwrap_or(&1);
        let out = by_dtype!(s1, self.name(), |F| {
            let att = F::slice(s1, l1, self.name())?;
            let mut ds = F::slice(s2, l2, self.name())?.to_vec();
            let scale = F::c(self.scale);
            ds.par_chunks_mut(t * t)
                .zip(att.par_chunks(t * t))
                .for_each(|(ds, att)| kernels::causal_softmax_backward(att, ds, t, scale));
            F::storage(ds)
        });
        Ok((out, l1.shape().clone()))
    }
}

/// softmax(scale · s + causal mask) over the last dim of attention scores (…, t, t) (fused, CPU).
pub fn causal_softmax(s: &Tensor, scale: f64) -> Result<Tensor> {
    Ok(s.contiguous()?.apply_op1(CausalSoftmax { scale })?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::layers::cross_entropy_rows_composed;
    use candle_core::{Device, Var};
    use rand::{Rng, SeedableRng};

    #[test]
    fn fused_cross_entropy_matches_composed_values_and_gradients() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
        let (n, v) = (13, 37);
        let x: Vec<f64> = (0..n * v)
            .map(|_| rng.random::<f64>() * 8.0 - 4.0)
            .collect();
        let t: Vec<u32> = (0..n).map(|_| rng.random_range(0..v as u32)).collect();
        let w: Vec<f64> = (0..n).map(|_| rng.random::<f64>()).collect();
        let dev = Device::Cpu;
        let xv = Var::from_tensor(&Tensor::from_vec(x, (n, v), &dev).unwrap()).unwrap();
        let tt = Tensor::new(t.as_slice(), &dev).unwrap();
        let wt = Tensor::new(w.as_slice(), &dev).unwrap();
        let a = cross_entropy_rows(xv.as_tensor(), &tt).unwrap();
        let b = cross_entropy_rows_composed(xv.as_tensor(), &tt).unwrap();
        let av: Vec<f64> = a.to_vec1().unwrap();
        let bv: Vec<f64> = b.to_vec1().unwrap();
        for (p, q) in av.iter().zip(&bv) {
            assert!((p - q).abs() < 1e-12);
        }
        let ga = (a * &wt).unwrap().sum_all().unwrap().backward().unwrap();
        let gb = (b * &wt).unwrap().sum_all().unwrap().backward().unwrap();
        let ga: Vec<f64> = ga
            .get(xv.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let gb: Vec<f64> = gb
            .get(xv.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        for (p, q) in ga.iter().zip(&gb) {
            assert!((p - q).abs() < 1e-12, "{p} vs {q}");
        }
    }

    fn rand_var(rng: &mut rand_chacha::ChaCha8Rng, shape: &[usize], scale: f64) -> Var {
        let n: usize = shape.iter().product();
        let v: Vec<f64> = (0..n)
            .map(|_| (rng.random::<f64>() * 2.0 - 1.0) * scale)
            .collect();
        Var::from_tensor(&Tensor::from_vec(v, shape, &Device::Cpu).unwrap()).unwrap()
    }

    /// Gradients of sum(y ⊙ r): the vector-Jacobian product with r.
    fn vjp(y: &Tensor, r: &Var) -> candle_core::backprop::GradStore {
        (y * r.as_tensor())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap()
    }

    fn assert_close(a: &Tensor, b: &Tensor, what: &str) {
        let a: Vec<f64> = a.flatten_all().unwrap().to_vec1().unwrap();
        let b: Vec<f64> = b.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(a.len(), b.len());
        for (p, q) in a.iter().zip(&b) {
            assert!(
                (p - q).abs() < 1e-10 * (1.0 + q.abs()),
                "{what}: {p} vs {q}"
            );
        }
    }

    #[test]
    fn fused_layer_norm_matches_composed_values_and_gradients() {
        use crate::model::layers::LayerNorm;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let x = rand_var(&mut rng, &[3, 5, 7], 2.0);
        let w = rand_var(&mut rng, &[7], 1.0);
        let b = rand_var(&mut rng, &[7], 1.0);
        let r = rand_var(&mut rng, &[3, 5, 7], 1.0);
        let ln = LayerNorm {
            weight: w.as_tensor().clone(),
            bias: Some(b.as_tensor().clone()),
        };
        let a = layer_norm(x.as_tensor(), w.as_tensor(), b.as_tensor(), 1e-5).unwrap();
        let c = ln.forward_composed(x.as_tensor()).unwrap();
        assert_close(&a, &c, "values");
        let ga = vjp(&a, &r);
        let gc = vjp(&c, &r);
        for (v, name) in [(&x, "dx"), (&w, "dw"), (&b, "db")] {
            assert_close(
                ga.get(v.as_tensor()).unwrap(),
                gc.get(v.as_tensor()).unwrap(),
                name,
            );
        }
    }

    #[test]
    fn fused_causal_softmax_matches_composed_values_and_gradients() {
        use crate::model::layers::softmax_last;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(2);
        let t = 6;
        let s = rand_var(&mut rng, &[2, 3, t, t], 3.0);
        let r = rand_var(&mut rng, &[2, 3, t, t], 1.0);
        let mask: Vec<f64> = (0..t * t)
            .map(|i| {
                if i % t > i / t {
                    f64::NEG_INFINITY
                } else {
                    0.0
                }
            })
            .collect();
        let mask = Tensor::from_vec(mask, (t, t), &Device::Cpu).unwrap();
        let a = causal_softmax(s.as_tensor(), 0.7).unwrap();
        let c =
            softmax_last(&(s.as_tensor() * 0.7).unwrap().broadcast_add(&mask).unwrap()).unwrap();
        assert_close(&a, &c, "values");
        let ga = vjp(&a, &r);
        let gc = vjp(&c, &r);
        assert_close(
            ga.get(s.as_tensor()).unwrap(),
            gc.get(s.as_tensor()).unwrap(),
            "ds",
        );
    }

    #[test]
    fn out_of_range_target_is_an_error() {
        let dev = Device::Cpu;
        let x = Tensor::zeros((2, 3), candle_core::DType::F32, &dev).unwrap();
        let t = Tensor::new(&[0u32, 3], &dev).unwrap();
        assert!(cross_entropy_rows(&x, &t).is_err());
    }
}
