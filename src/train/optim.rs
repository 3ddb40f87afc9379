//! AdamW (decoupled weight decay, PyTorch semantics) and the LR schedule.

use crate::config::TrainConfig;
use crate::model::params::ParamStore;
use crate::{Error, Result};
use candle_core::Tensor;
use std::collections::HashMap;

/// Linear warmup to `lr`, then cosine decay to `min_lr` at `total` steps.
/// `step` is 0-based (the step about to be taken).
pub fn lr_at(cfg: &TrainConfig, step: usize, total: usize) -> f64 {
    if step < cfg.warmup_steps {
        return cfg.lr * (step + 1) as f64 / cfg.warmup_steps as f64;
    }
    let span = total.saturating_sub(cfg.warmup_steps).max(1) as f64;
    let ratio = ((step - cfg.warmup_steps) as f64 / span).min(1.0);
    cfg.min_lr + 0.5 * (1.0 + (std::f64::consts::PI * ratio).cos()) * (cfg.lr - cfg.min_lr)
}

/// AdamW's state of one parameter: the first and second moments (each of the
/// parameter's shape).
#[derive(Debug, Clone)]
pub struct Moments {
    pub m: Tensor,
    pub v: Tensor,
}

/// The weight decay of a parameter: none for vectors (biases, norm gains),
/// `weight_decay_experts` (when set) for expert matrices, else `weight_decay`.
pub fn decay_rate(cfg: &TrainConfig, name: &str, rank: usize) -> f64 {
    if rank < 2 {
        0.0
    } else if crate::model::layout::is_expert_matrix(name) {
        cfg.expert_weight_decay()
    } else {
        cfg.weight_decay
    }
}

/// AdamW over every parameter of a [`ParamStore`]. Weight decay applies to
/// tensors of rank ≥ 2 (matrices, embeddings), not to biases or norm gains.
#[derive(Debug)]
pub struct AdamW {
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    /// Weight decay rate of each parameter (0 for vectors).
    decay: Vec<f64>,
    /// Parameters the optimiser leaves alone (frozen router, balancing biases).
    frozen: Vec<bool>,
    /// Steps taken (for bias correction).
    pub t: usize,
    beta1: f64,
    beta2: f64,
    eps: f64,
}

impl AdamW {
    pub fn new(params: &ParamStore, cfg: &TrainConfig) -> Result<Self> {
        let zeros = |v: &candle_core::Var| Tensor::zeros(v.shape(), v.dtype(), v.device());
        Ok(AdamW {
            m: params
                .vars()
                .iter()
                .map(zeros)
                .collect::<candle_core::Result<_>>()?,
            v: params
                .vars()
                .iter()
                .map(zeros)
                .collect::<candle_core::Result<_>>()?,
            decay: params
                .vars()
                .iter()
                .zip(params.names())
                .map(|(v, name)| decay_rate(cfg, name, v.rank()))
                .collect(),
            frozen: vec![false; params.vars().len()],
            t: 0,
            beta1: cfg.beta1,
            beta2: cfg.beta2,
            eps: cfg.eps,
        })
    }

    /// Exclude the parameters whose name satisfies `pred` from every update.
    pub fn freeze(&mut self, params: &ParamStore, pred: impl Fn(&str) -> bool) {
        for (f, name) in self.frozen.iter_mut().zip(params.names()) {
            *f |= pred(name);
        }
    }

    /// One update. `grads[i]` belongs to parameter `i`; `None` counts as a zero
    /// gradient (an expert that received no token this step still decays).
    pub fn step(&mut self, params: &ParamStore, grads: &[Option<Tensor>], lr: f64) -> Result<()> {
        self.t += 1;
        let bc1 = 1.0 - self.beta1.powi(self.t as i32);
        let bc2 = 1.0 - self.beta2.powi(self.t as i32);
        for (i, var) in params.vars().iter().enumerate() {
            if self.frozen.get(i).copied().unwrap_or(false) {
                continue;
            }
            let wd = 1.0 - lr * self.decay[i];
            if let (Some(g), true) = (&grads[i], var.device().is_cpu()) {
                if g.is_contiguous()
                    && self.m[i].is_contiguous()
                    && self.v[i].is_contiguous()
                    && var.is_contiguous()
                {
                    // Fused CPU path: three passes, no temporaries.
                    let g = g.to_dtype(var.dtype())?;
                    self.m[i].inplace_op2(
                        &g,
                        &fused::Ema {
                            beta: self.beta1,
                            square: false,
                        },
                    )?;
                    self.v[i].inplace_op2(
                        &g,
                        &fused::Ema {
                            beta: self.beta2,
                            square: true,
                        },
                    )?;
                    let op = fused::Update {
                        wd,
                        step: lr / bc1,
                        bc2,
                        eps: self.eps,
                    };
                    var.as_tensor().inplace_op3(&self.m[i], &self.v[i], &op)?;
                    continue;
                }
            }
            let (m, v) = match &grads[i] {
                Some(g) => (
                    ((&self.m[i] * self.beta1)? + (g * (1.0 - self.beta1))?)?,
                    ((&self.v[i] * self.beta2)? + (g.sqr()? * (1.0 - self.beta2))?)?,
                ),
                None => ((&self.m[i] * self.beta1)?, (&self.v[i] * self.beta2)?),
            };
            // p ← p·(1 − lr·wd) − lr · m̂ / (√v̂ + eps)
            let denom = ((&v / bc2)?.sqrt()? + self.eps)?;
            let upd = ((&m / denom)? * (lr / bc1))?;
            let p = var.as_tensor();
            let new_p = if wd != 1.0 {
                ((p * wd)? - upd)?
            } else {
                (p - upd)?
            };
            var.set(&new_p)?;
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(())
    }

    /// The moments of every parameter, by position in the [`ParamStore`].
    pub fn moments(&self) -> Vec<Moments> {
        self.m
            .iter()
            .zip(&self.v)
            .map(|(m, v)| Moments {
                m: m.clone(),
                v: v.clone(),
            })
            .collect()
    }

    /// Replace the moments of every parameter (by position, as
    /// [`AdamW::moments`] gives them) and the count of steps taken.
    pub fn set_moments(&mut self, moments: Vec<Moments>, t: usize) -> Result<()> {
        if moments.len() != self.m.len() {
            return Err(Error::Data(format!(
                "optimizer: {} moments for {} parameters",
                moments.len(),
                self.m.len()
            )));
        }
        for (i, Moments { m, v }) in moments.into_iter().enumerate() {
            if !self.put_moments(i, &m, &v)? {
                return Err(Error::Data(format!(
                    "optimizer: moments of shape {:?} for parameter {i} of shape {:?}",
                    m.dims(),
                    self.m[i].dims()
                )));
            }
        }
        self.t = t;
        Ok(())
    }

    /// Set parameter `i`'s moments (converted to its dtype); `false` when
    /// their shapes differ from the parameter's, which is left as it is.
    fn put_moments(&mut self, i: usize, m: &Tensor, v: &Tensor) -> Result<bool> {
        if m.dims() != self.m[i].dims() || v.dims() != self.v[i].dims() {
            return Ok(false);
        }
        self.m[i] = m.to_dtype(self.m[i].dtype())?;
        self.v[i] = v.to_dtype(self.v[i].dtype())?;
        Ok(true)
    }

    /// Moments as named tensors (`m.NAME`, `v.NAME`) plus the step count.
    pub fn state(&self, params: &ParamStore) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::with_capacity(2 * self.m.len() + 1);
        for (i, name) in params.names().iter().enumerate() {
            out.push((format!("m.{name}"), self.m[i].clone()));
            out.push((format!("v.{name}"), self.v[i].clone()));
        }
        let dev = params.device();
        out.push(("t".into(), Tensor::new(&[self.t as f32], dev)?));
        Ok(out)
    }

    /// Restore from [`AdamW::state`] output.
    pub fn load_state(
        &mut self,
        params: &ParamStore,
        state: &HashMap<String, Tensor>,
        origin: &std::path::Path,
    ) -> Result<()> {
        let get = |k: &str| {
            state.get(k).ok_or_else(|| Error::Checkpoint {
                path: origin.into(),
                msg: format!("optimizer state lacks `{k}`"),
            })
        };
        for (i, name) in params.names().iter().enumerate() {
            let (m, v) = (get(&format!("m.{name}"))?, get(&format!("v.{name}"))?);
            if !self.put_moments(i, m, v)? {
                return Err(Error::Checkpoint {
                    path: origin.into(),
                    msg: format!("optimizer state for `{name}` has the wrong shape"),
                });
            }
        }
        self.t = get("t")?
            .to_dtype(candle_core::DType::F32)?
            .to_vec1::<f32>()?[0] as usize;
        Ok(())
    }
}

/// Fused in-place CPU kernels of the AdamW update.
mod fused {
    use candle_core::{CpuStorage, InplaceOp2, InplaceOp3, Layout, Result};
    use rayon::prelude::*;

    /// Elements per parallel task.
    const CHUNK: usize = 1 << 15;

    fn range(l: &Layout) -> Result<(usize, usize)> {
        l.contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("adamw: non-contiguous tensor".into()))
    }

    /// m ← β·m + (1−β)·g   (or g² when `square`).
    pub struct Ema {
        pub beta: f64,
        pub square: bool,
    }
    impl InplaceOp2 for Ema {
        fn name(&self) -> &'static str {
            "adamw-ema"
        }
        fn cpu_fwd(
            &self,
            dst: &mut CpuStorage,
            dl: &Layout,
            s: &CpuStorage,
            sl: &Layout,
        ) -> Result<()> {
            let srcs = [(s, sl)];
            let (a, b_) = range(dl)?;
            let (ga, gb) = range(srcs[0].1)?;
            macro_rules! run {
                ($t:ty, $m:expr, $g:expr) => {{
                    let m = &mut $m[a..b_];
                    let g = &$g[ga..gb];
                    let (b, c) = (self.beta as $t, (1.0 - self.beta) as $t);
                    let sq = self.square;
                    m.par_chunks_mut(CHUNK)
                        .zip(g.par_chunks(CHUNK))
                        .for_each(|(m, g)| {
                            if sq {
                                m.iter_mut()
                                    .zip(g)
                                    .for_each(|(m, g)| *m = b * *m + c * g * g);
                            } else {
                                m.iter_mut().zip(g).for_each(|(m, g)| *m = b * *m + c * g);
                            }
                        });
                }};
            }
            match (dst, srcs[0].0) {
                (CpuStorage::F32(m), CpuStorage::F32(g)) => run!(f32, m, g),
                (CpuStorage::F64(m), CpuStorage::F64(g)) => run!(f64, m, g),
                _ => candle_core::bail!("adamw: only f32/f64 parameters of one dtype"),
            }
            Ok(())
        }
    }

    /// p ← wd·p − step · m / (√(v / bc2) + eps).
    pub struct Update {
        pub wd: f64,
        pub step: f64,
        pub bc2: f64,
        pub eps: f64,
    }
    impl InplaceOp3 for Update {
        fn name(&self) -> &'static str {
            "adamw-update"
        }
        fn cpu_fwd(
            &self,
            dst: &mut CpuStorage,
            dl: &Layout,
            s1: &CpuStorage,
            l1: &Layout,
            s2: &CpuStorage,
            l2: &Layout,
        ) -> Result<()> {
            let srcs = [(s1, l1), (s2, l2)];
            let (pa, pb) = range(dl)?;
            let (ma, mb) = range(srcs[0].1)?;
            let (va, vb) = range(srcs[1].1)?;
            macro_rules! run {
                ($t:ty, $p:expr, $m:expr, $v:expr) => {{
                    let p = &mut $p[pa..pb];
                    let m = &$m[ma..mb];
                    let v = &$v[va..vb];
                    let (wd, step, inv_bc2, eps) = (
                        self.wd as $t,
                        self.step as $t,
                        (1.0 / self.bc2) as $t,
                        self.eps as $t,
                    );
                    p.par_chunks_mut(CHUNK)
                        .zip(m.par_chunks(CHUNK).zip(v.par_chunks(CHUNK)))
                        .for_each(|(p, (m, v))| {
                            for ((p, m), v) in p.iter_mut().zip(m).zip(v) {
                                *p = wd * *p - step * m / ((v * inv_bc2).sqrt() + eps);
                            }
                        });
                }};
            }
            match (dst, srcs[0].0, srcs[1].0) {
                (CpuStorage::F32(p), CpuStorage::F32(m), CpuStorage::F32(v)) => run!(f32, p, m, v),
                (CpuStorage::F64(p), CpuStorage::F64(m), CpuStorage::F64(v)) => run!(f64, p, m, v),
                _ => candle_core::bail!("adamw: only f32/f64 parameters of one dtype"),
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn schedule_warms_up_then_decays_to_min() {
        let c = TrainConfig {
            lr: 1.0,
            min_lr: 0.1,
            warmup_steps: 10,
            ..Default::default()
        };
        assert!((lr_at(&c, 0, 100) - 0.1).abs() < 1e-12);
        assert!((lr_at(&c, 9, 100) - 1.0).abs() < 1e-12);
        assert!((lr_at(&c, 10, 100) - 1.0).abs() < 1e-12);
        assert!((lr_at(&c, 100, 100) - 0.1).abs() < 1e-12);
        assert!(lr_at(&c, 50, 100) < 1.0 && lr_at(&c, 50, 100) > 0.1);
    }

    #[test]
    fn adamw_matches_scalar_reference() {
        // Independent scalar AdamW (PyTorch's formula) in f64.
        let dev = Device::Cpu;
        let mut ps = ParamStore::new(DType::F64, &dev, 3);
        let w = ps.normal("w", &[2, 2], 1.0).unwrap();
        let b = ps.constant("b", &[2], 0.5).unwrap();
        let cfg = TrainConfig {
            weight_decay: 0.1,
            ..Default::default()
        };
        let mut opt = AdamW::new(&ps, &cfg).unwrap();
        let mut ref_p: Vec<Vec<f64>> = vec![
            w.flatten_all().unwrap().to_vec1().unwrap(),
            b.to_vec1().unwrap(),
        ];
        let mut ref_m = vec![vec![0.0; 4], vec![0.0; 2]];
        let mut ref_v = ref_m.clone();
        let grads_seq = [[0.3, -0.2, 0.1, 0.05], [-0.1, 0.4, 0.0, 0.2]];
        for (t, g) in grads_seq.iter().enumerate() {
            let gw = Tensor::new(&g[..], &dev).unwrap().reshape((2, 2)).unwrap();
            let gb = Tensor::new(&g[..2], &dev).unwrap();
            opt.step(&ps, &[Some(gw), Some(gb)], 0.01).unwrap();
            let t1 = (t + 1) as i32;
            for (pi, gs) in [&g[..], &g[..2]].iter().enumerate() {
                for j in 0..gs.len() {
                    let gj = gs[j];
                    ref_m[pi][j] = 0.9 * ref_m[pi][j] + 0.1 * gj;
                    ref_v[pi][j] = 0.95 * ref_v[pi][j] + 0.05 * gj * gj;
                    let wd = if pi == 0 { 0.1 } else { 0.0 };
                    ref_p[pi][j] *= 1.0 - 0.01 * wd;
                    let mh = ref_m[pi][j] / (1.0 - 0.9f64.powi(t1));
                    let vh = ref_v[pi][j] / (1.0 - 0.95f64.powi(t1));
                    ref_p[pi][j] -= 0.01 * mh / (vh.sqrt() + 1e-8);
                }
            }
        }
        let got_w: Vec<f64> = ps.vars()[0].flatten_all().unwrap().to_vec1().unwrap();
        let got_b: Vec<f64> = ps.vars()[1].to_vec1().unwrap();
        for (a, b) in got_w.iter().chain(&got_b).zip(ref_p.concat()) {
            assert!((a - b).abs() < 1e-12, "{a} vs {b}");
        }
    }
}
