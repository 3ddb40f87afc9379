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
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, v) = l1.shape().dims2()?;
        let t = targets(s2, l2)?;
        if t.len() != n || t.iter().any(|&t| t >= v) {
            candle_core::bail!(
                "cross-entropy: {} targets for {n} rows, or a target id ≥ vocabulary {v}",
                t.len()
            );
        }
        let out = match s1 {
            CpuStorage::F32(x) => CpuStorage::F32(ce_rows!(contiguous(x, l1)?, t, v, f32)),
            CpuStorage::F64(x) => CpuStorage::F64(ce_rows!(contiguous(x, l1)?, t, v, f64)),
            _ => candle_core::bail!("cross-entropy: logits must be f32 or f64"),
        };
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

macro_rules! ce_grad {
    ($x:expr, $t:expr, $g:expr, $v:expr, $ty:ty) => {{
        let mut out: Vec<$ty> = vec![0.0; $x.len()];
        out.par_chunks_mut($v)
            .zip($x.par_chunks($v))
            .zip($t.par_iter().zip($g.par_iter()))
            .for_each(|((o, row), (&t, &g))| {
                let m = row.iter().copied().fold(<$ty>::NEG_INFINITY, <$ty>::max);
                let mut s: $ty = 0.0;
                for (o, &x) in o.iter_mut().zip(row) {
                    *o = (x - m).exp();
                    s += *o;
                }
                let k = g / s;
                o.iter_mut().for_each(|o| *o *= k);
                o[t] -= g;
            });
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
            (CpuStorage::F32(x), CpuStorage::F32(g)) => {
                CpuStorage::F32(ce_grad!(contiguous(x, l1)?, t, contiguous(g, l3)?, v, f32))
            }
            (CpuStorage::F64(x), CpuStorage::F64(g)) => {
                CpuStorage::F64(ce_grad!(contiguous(x, l1)?, t, contiguous(g, l3)?, v, f64))
            }
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

fn f_slice<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [f32]> {
    match s {
        CpuStorage::F32(v) => contiguous(v, l),
        _ => candle_core::bail!("fused kernel: expected f32"),
    }
}
fn d_slice<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [f64]> {
    match s {
        CpuStorage::F64(v) => contiguous(v, l),
        _ => candle_core::bail!("fused kernel: expected f64"),
    }
}

/// LayerNorm forward: y = (x − μ)/√(σ² + eps) · w + b, per row.
struct LayerNormOp {
    eps: f64,
}

macro_rules! ln_fwd {
    ($x:expr, $w:expr, $b:expr, $d:expr, $eps:expr, $ty:ty) => {{
        let (x, w, b) = ($x, $w, $b);
        let mut out: Vec<$ty> = vec![0.0; x.len()];
        out.par_chunks_mut($d)
            .zip(x.par_chunks($d))
            .for_each(|(o, row)| {
                let n = $d as $ty;
                let mu = row.iter().sum::<$ty>() / n;
                let var = row.iter().map(|v| (v - mu) * (v - mu)).sum::<$ty>() / n;
                let rstd = 1.0 / (var + $eps as $ty).sqrt();
                for i in 0..$d {
                    o[i] = (row[i] - mu) * rstd * w[i] + b[i];
                }
            });
        out
    }};
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
        let out = match s1 {
            CpuStorage::F32(_) => CpuStorage::F32(ln_fwd!(
                f_slice(s1, l1)?,
                f_slice(s2, l2)?,
                f_slice(s3, l3)?,
                d,
                self.eps,
                f32
            )),
            CpuStorage::F64(_) => CpuStorage::F64(ln_fwd!(
                d_slice(s1, l1)?,
                d_slice(s2, l2)?,
                d_slice(s3, l3)?,
                d,
                self.eps,
                f64
            )),
            _ => candle_core::bail!("layer norm: f32 or f64 only"),
        };
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

macro_rules! ln_bwd {
    ($x:expr, $w:expr, $g:expr, $d:expr, $eps:expr, $ty:ty) => {{
        let (x, w, g) = ($x, $w, $g);
        let rows = x.len() / $d;
        let mut out: Vec<$ty> = vec![0.0; x.len() + 2 * $d];
        let (dx, rest) = out.split_at_mut(x.len());
        // dx = rstd · (ĝ − mean(ĝ) − x̂ · mean(ĝ ⊙ x̂)), ĝ = g ⊙ w; also keep x̂ for dw.
        let stats: Vec<($ty, $ty)> = dx
            .par_chunks_mut($d)
            .zip(x.par_chunks($d).zip(g.par_chunks($d)))
            .map(|(o, (row, gr))| {
                let n = $d as $ty;
                let mu = row.iter().sum::<$ty>() / n;
                let var = row.iter().map(|v| (v - mu) * (v - mu)).sum::<$ty>() / n;
                let rstd = 1.0 / (var + $eps as $ty).sqrt();
                let (mut s1, mut s2): ($ty, $ty) = (0.0, 0.0);
                for i in 0..$d {
                    let gh = gr[i] * w[i];
                    s1 += gh;
                    s2 += gh * (row[i] - mu) * rstd;
                }
                let (m1, m2) = (s1 / n, s2 / n);
                for i in 0..$d {
                    let xh = (row[i] - mu) * rstd;
                    o[i] = rstd * (gr[i] * w[i] - m1 - xh * m2);
                }
                (mu, rstd)
            })
            .collect();
        let (dw, db) = rest.split_at_mut($d);
        for r in 0..rows {
            let (mu, rstd) = stats[r];
            let row = &x[r * $d..(r + 1) * $d];
            let gr = &g[r * $d..(r + 1) * $d];
            for i in 0..$d {
                dw[i] += gr[i] * (row[i] - mu) * rstd;
                db[i] += gr[i];
            }
        }
        (out, rows)
    }};
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
        let (out, rows) = match s1 {
            CpuStorage::F32(_) => {
                let (o, r) = ln_bwd!(
                    f_slice(s1, l1)?,
                    f_slice(s2, l2)?,
                    f_slice(s3, l3)?,
                    d,
                    self.eps,
                    f32
                );
                (CpuStorage::F32(o), r)
            }
            CpuStorage::F64(_) => {
                let (o, r) = ln_bwd!(
                    d_slice(s1, l1)?,
                    d_slice(s2, l2)?,
                    d_slice(s3, l3)?,
                    d,
                    self.eps,
                    f64
                );
                (CpuStorage::F64(o), r)
            }
            _ => candle_core::bail!("layer norm: f32 or f64 only"),
        };
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

macro_rules! csm_fwd {
    ($s:expr, $t:expr, $scale:expr, $ty:ty) => {{
        let s = $s;
        let mut out: Vec<$ty> = vec![0.0; s.len()];
        out.par_chunks_mut($t)
            .zip(s.par_chunks($t))
            .enumerate()
            .for_each(|(r, (o, row))| {
                let q = r % $t; // query position: keys 0..=q are visible
                let sc = $scale as $ty;
                let m = row[..=q]
                    .iter()
                    .map(|v| v * sc)
                    .fold(<$ty>::NEG_INFINITY, <$ty>::max);
                let mut z: $ty = 0.0;
                for k in 0..=q {
                    o[k] = (row[k] * sc - m).exp();
                    z += o[k];
                }
                let iz = 1.0 / z;
                o[..=q].iter_mut().for_each(|v| *v *= iz);
            });
        out
    }};
}

impl candle_core::CustomOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        "fused-causal-softmax"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let t = *l.shape().dims().last().unwrap_or(&1);
        let out = match s {
            CpuStorage::F32(_) => CpuStorage::F32(csm_fwd!(f_slice(s, l)?, t, self.scale, f32)),
            CpuStorage::F64(_) => CpuStorage::F64(csm_fwd!(d_slice(s, l)?, t, self.scale, f64)),
            _ => candle_core::bail!("causal softmax: f32 or f64 only"),
        };
        Ok((out, l.shape().clone()))
    }
    fn bwd(&self, _arg: &Tensor, res: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(res.apply_op2_no_bwd(
            &g.contiguous()?,
            &SoftmaxGrad { scale: self.scale },
        )?))
    }
}

/// ds = scale · y ⊙ (g − Σ g ⊙ y), per row.
struct SoftmaxGrad {
    scale: f64,
}

macro_rules! sm_bwd {
    ($y:expr, $g:expr, $t:expr, $scale:expr, $ty:ty) => {{
        let (y, g) = ($y, $g);
        let mut out: Vec<$ty> = vec![0.0; y.len()];
        out.par_chunks_mut($t)
            .zip(y.par_chunks($t).zip(g.par_chunks($t)))
            .for_each(|(o, (y, g))| {
                let dot: $ty = y.iter().zip(g).map(|(a, b)| a * b).sum();
                let sc = $scale as $ty;
                for i in 0..$t {
                    o[i] = sc * y[i] * (g[i] - dot);
                }
            });
        out
    }};
}

impl CustomOp2 for SoftmaxGrad {
    fn name(&self) -> &'static str {
        "fused-softmax-grad"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let t = *l1.shape().dims().last().unwrap_or(&1);
        let out = match s1 {
            CpuStorage::F32(_) => CpuStorage::F32(sm_bwd!(
                f_slice(s1, l1)?,
                f_slice(s2, l2)?,
                t,
                self.scale,
                f32
            )),
            CpuStorage::F64(_) => CpuStorage::F64(sm_bwd!(
                d_slice(s1, l1)?,
                d_slice(s2, l2)?,
                t,
                self.scale,
                f64
            )),
            _ => candle_core::bail!("softmax grad: f32 or f64 only"),
        };
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
