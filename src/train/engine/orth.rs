//! L_orth = Σ_layers L over the experts' up-projections of each MoE layer
//! (docs/MEASURES.md "Orthogonality loss"), its value and gradient, at the
//! configured granularity and variant (`measures::orth` does the math).

use super::{moe, split_by_index, Engine};
use crate::kernels::Real;
use crate::measures::orth::{orth_loss_and_grad, OrthForm};

impl<T: Real> Engine<T> {
    /// Adds λ·∂L_orth/∂W_up to the gradients and returns L_orth.
    pub fn add_orth_grad(&mut self, lambda: f64, form: OrthForm) -> f64 {
        let rows = self.cfg.d_ff;
        let w = self.index.map(|r| &self.params[r.clone()]);
        let mut g = split_by_index(&mut self.grads, &self.index);
        let mut total = 0.0;
        for (bw, bg) in w.blocks.iter().zip(g.blocks.iter_mut()) {
            let ups: Vec<&[T]> = moe(&bw.ffn).1.iter().map(|x| x.up.weight).collect();
            let grads = (lambda != 0.0).then(|| {
                super::moe_mut(&mut bg.ffn)
                    .1
                    .iter_mut()
                    .map(|x| &mut *x.up.weight)
                    .collect()
            });
            total += orth_loss_and_grad(grads, &ups, rows, form, lambda);
        }
        self.profile.lap("orth");
        total
    }

    /// L_orth of the current weights, gradients untouched.
    pub fn orth_value(&mut self, form: OrthForm) -> f64 {
        self.add_orth_grad(0.0, form)
    }
}
