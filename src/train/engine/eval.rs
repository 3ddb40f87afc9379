//! Evaluation on the engine's forward pass: the validation loss and, for
//! the measured windows, what each MoE layer routed and computed, read from
//! the activations the forward keeps anyway. Training then evaluates
//! without a copy of the model (and at the engine's speed).

use super::{Dims, Engine};
use crate::kernels;
use crate::model::moe::CapturedRouting;
use crate::train::eval::EvalForward;
use crate::Result;
use candle_core::{Device, Tensor};

impl EvalForward for Engine<f32> {
    fn eval_batch(
        &mut self,
        inputs: Vec<u32>,
        targets: Vec<u32>,
        (b, t): (usize, usize),
        capture: bool,
        capture_hidden: bool,
    ) -> Result<(f64, Vec<CapturedRouting>)> {
        self.check_batch(&inputs, &targets, b, t)?;
        let dims = Dims::new(&self.cfg, b, t);
        self.bufs.size_for(dims, self.cfg.n_layer);
        // The forward's laps add to the step profile, which only `bench
        // train` reads (and it does not evaluate).
        self.profile.start();
        self.forward(&inputs, dims);
        let mut loss = vec![0f32; dims.n];
        kernels::cross_entropy_rows(&self.bufs.logits, &targets, dims.v, &mut loss);
        let ce = loss.iter().map(|&l| l as f64).sum();
        let captures = if capture {
            (0..self.cfg.n_layer)
                .map(|l| self.captured(l, dims, capture_hidden))
                .collect::<Result<_>>()?
        } else {
            Vec::new()
        };
        Ok((ce, captures))
    }
}

impl Engine<f32> {
    /// Layer `l`'s routing and expert rows of the last forward pass, as the
    /// autodiff model captures them: per expert its tokens (ascending) and
    /// raw outputs before gating (and hidden activations with `hidden`).
    fn captured(&self, l: usize, dims: Dims, hidden: bool) -> Result<CapturedRouting> {
        let a = &self.bufs.blocks[l];
        let (n, d, f, k) = (dims.n, dims.d, dims.f, dims.k);
        let rows_of = |x: usize| a.offsets[x]..a.offsets[x + 1];
        let block = |buf: &[f32], x: usize, w: usize| -> Result<Option<Tensor>> {
            let r = rows_of(x);
            if r.is_empty() {
                return Ok(None);
            }
            let data = &buf[r.start * w..r.end * w];
            Ok(Some(Tensor::from_slice(data, (r.len(), w), &Device::Cpu)?))
        };
        let mut expert_outputs = Vec::with_capacity(dims.e);
        let mut expert_hidden = Vec::new();
        for x in 0..dims.e {
            // Rows are expert-major with tokens ascending (`dispatch::plan`).
            let tokens = rows_of(x).map(|row| a.slot_of[row] / k as u32).collect();
            expert_outputs.push((tokens, block(&a.ye, x, d)?));
            if hidden {
                expert_hidden.push(block(&a.a, x, f)?);
            }
        }
        Ok(CapturedRouting {
            probs: a.probs[..n * dims.e].to_vec(),
            selected: a.sel[..n * k].to_vec(),
            k,
            expert_outputs,
            expert_hidden,
        })
    }
}
