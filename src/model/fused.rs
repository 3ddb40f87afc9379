//! Fused CPU kernels with hand-written backward passes, where composing
//! elementary tensor ops would make many passes over large tensors.
//!
//! - [`cross_entropy_rows`]: per-row `logsumexp(x) − x[target]`; backward
//!   `(softmax(x) − onehot(target)) · grad`, two passes over the logits
//!   instead of about ten.
//!
//! Each kernel is checked against the composed reference (values and
//! gradients, f64) in the tests below. Non-CPU devices use the composed path.

use crate::Result;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

fn contiguous<'a, T>(v: &'a [T], l: &Layout) -> candle_core::Result<&'a [T]> {
    let (a, b) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("fused kernel: non-contiguous input".into()))?;
    Ok(&v[a..b])
}

fn targets(s: &CpuStorage, l: &Layout) -> candle_core::Result<Vec<usize>> {
    Ok(match s {
        CpuStorage::U32(v) => contiguous(v, l)?.iter().map(|&t| t as usize).collect(),
        CpuStorage::I64(v) => contiguous(v, l)?.iter().map(|&t| t as usize).collect(),
        _ => candle_core::bail!("cross-entropy: targets must be u32 or i64"),
    })
}

/// Row-wise cross-entropy (forward).
struct CrossEntropy;

macro_rules! ce_rows {
    ($x:expr, $t:expr, $v:expr, $ty:ty) => {{
        let out: Vec<$ty> = $x
            .par_chunks($v)
            .zip($t.par_iter())
            .map(|(row, &t)| {
                let m = row.iter().copied().fold(<$ty>::NEG_INFINITY, <$ty>::max);
                let s: $ty = row.iter().map(|&v| (v - m).exp()).sum();
                m + s.ln() - row[t]
            })
            .collect();
        out
    }};
}

impl CustomOp2 for CrossEntropy {
    fn name(&self) -> &'static str {
        "fused-cross-entropy"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, v) = l1.shape().dims2()?;
        let t = targets(s2, l2)?;
        if t.len() != n || t.iter().any(|&t| t >= v) {
            candle_core::bail!("cross-entropy: {} targets for {n} rows, or a target id ≥ vocabulary {v}", t.len());
        }
        let out = match s1 {
            CpuStorage::F32(x) => CpuStorage::F32(ce_rows!(contiguous(x, l1)?, t, v, f32)),
            CpuStorage::F64(x) => CpuStorage::F64(ce_rows!(contiguous(x, l1)?, t, v, f64)),
            _ => candle_core::bail!("cross-entropy: logits must be f32 or f64"),
        };
        Ok((out, Shape::from(n)))
    }
    fn bwd(&self, logits: &Tensor, tgt: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let g = logits.apply_op3_no_bwd(tgt, &grad.contiguous()?, &CrossEntropyGrad)?;
        Ok((Some(g), None))
    }
}

/// d loss_i / d logits_ij = (softmax_ij − [j = t_i]) · grad_i.
struct CrossEntropyGrad;

macro_rules! ce_grad {
    ($x:expr, $t:expr, $g:expr, $v:expr, $ty:ty) => {{
        let mut out: Vec<$ty> = vec![0.0; $x.len()];
        out.par_chunks_mut($v).zip($x.par_chunks($v)).zip($t.par_iter().zip($g.par_iter())).for_each(
            |((o, row), (&t, &g))| {
                let m = row.iter().copied().fold(<$ty>::NEG_INFINITY, <$ty>::max);
                let mut s: $ty = 0.0;
                for (o, &x) in o.iter_mut().zip(row) {
                    *o = (x - m).exp();
                    s += *o;
                }
                let k = g / s;
                o.iter_mut().for_each(|o| *o *= k);
                o[t] -= g;
            },
        );
        out
    }};
}

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
        let (_, v) = l1.shape().dims2()?;
        let t = targets(s2, l2)?;
        let out = match (s1, s3) {
            (CpuStorage::F32(x), CpuStorage::F32(g)) => CpuStorage::F32(ce_grad!(contiguous(x, l1)?, t, contiguous(g, l3)?, v, f32)),
            (CpuStorage::F64(x), CpuStorage::F64(g)) => CpuStorage::F64(ce_grad!(contiguous(x, l1)?, t, contiguous(g, l3)?, v, f64)),
            _ => candle_core::bail!("cross-entropy grad: dtype mismatch"),
        };
        Ok((out, l1.shape().clone()))
    }
}

/// Per-row cross-entropy, fused on CPU. logits (n, V), targets (n,) -> (n,).
pub fn cross_entropy_rows(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let logits = logits.contiguous()?;
    let targets = targets.contiguous()?;
    Ok(logits.apply_op2(&targets, CrossEntropy)?)
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
        let x: Vec<f64> = (0..n * v).map(|_| rng.random::<f64>() * 8.0 - 4.0).collect();
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
        let ga: Vec<f64> = ga.get(xv.as_tensor()).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let gb: Vec<f64> = gb.get(xv.as_tensor()).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        for (p, q) in ga.iter().zip(&gb) {
            assert!((p - q).abs() < 1e-12, "{p} vs {q}");
        }
    }

    #[test]
    fn out_of_range_target_is_an_error() {
        let dev = Device::Cpu;
        let x = Tensor::zeros((2, 3), candle_core::DType::F32, &dev).unwrap();
        let t = Tensor::new(&[0u32, 3], &dev).unwrap();
        assert!(cross_entropy_rows(&x, &t).is_err());
    }
}
