//! The optimiser step on the flat buffers: the gradient norm and AdamW.

use super::Engine;
use crate::kernels::{self, Real};
use rayon::prelude::*;

/// Elements per parallel task.
const CHUNK: usize = 1 << 14;

impl<T: Real> Engine<T> {
    /// ‖∇‖₂ over every gradient (f64 accumulation, fixed order).
    pub fn grad_norm(&self) -> f64 {
        let parts: Vec<f64> = self
            .grads
            .par_chunks(1 << 12)
            .map(|c| kernels::dot(c, c).into())
            .collect();
        parts.iter().sum::<f64>().sqrt()
    }

    /// One AdamW step on every parameter, the gradients multiplied by
    /// `grad_scale` (clipping) first. Matrices decay, vectors do not.
    pub fn adamw_step(&mut self, lr: f64, grad_scale: f64) {
        self.t += 1;
        let ad = self.adam;
        let bc1 = 1.0 - ad.beta1.powi(self.t as i32);
        let bc2 = 1.0 - ad.beta2.powi(self.t as i32);
        let (b1, b2) = (T::c(ad.beta1), T::c(ad.beta2));
        let (c1, c2) = (T::c(1.0 - ad.beta1), T::c(1.0 - ad.beta2));
        let (step, inv_bc2, eps, gs) = (
            T::c(lr / bc1),
            T::c(1.0 / bc2),
            T::c(ad.eps),
            T::c(grad_scale),
        );
        let specs = self.layout.params();
        for (spec, r) in specs.iter().zip(self.index.params()) {
            let decay = lr * ad.decay_rate(spec);
            let wd = T::c(1.0 - decay);
            let (p, g) = (&mut self.params[r.clone()], &self.grads[r.clone()]);
            let (m, v) = (&mut self.m[r.clone()], &mut self.v[r.clone()]);
            p.par_chunks_mut(CHUNK)
                .zip(g.par_chunks(CHUNK))
                .zip(m.par_chunks_mut(CHUNK).zip(v.par_chunks_mut(CHUNK)))
                .for_each(|((p, g), (m, v))| {
                    for i in 0..p.len() {
                        let g = g[i] * gs;
                        m[i] = b1 * m[i] + c1 * g;
                        v[i] = b2 * v[i] + c2 * g * g;
                        p[i] = wd * p[i] - step * m[i] / ((v[i] * inv_bc2).sqrt() + eps);
                    }
                });
        }
        self.profile.lap("grad_norm_adamw");
    }
}

impl super::AdamParams {
    /// As `optim::decay_rate`: vectors never decay, expert matrices at
    /// `weight_decay_experts`, other matrices at `weight_decay`.
    fn decay_rate(&self, spec: &crate::model::layout::ParamSpec) -> f64 {
        if spec.shape.len() < 2 {
            0.0
        } else if crate::model::layout::is_expert_matrix(&spec.name) {
            self.weight_decay_experts
        } else {
            self.weight_decay
        }
    }
}
