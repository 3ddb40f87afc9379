//! Mixture-of-Experts FFN: router, experts, dropless dispatch.
//!
//! Top-k routing gathers the tokens routed to each expert, runs that expert
//! once on exactly those rows, and scatter-adds the gated outputs back. No
//! capacity limit, nothing dropped, and no expert ever sees a token it was not
//! routed to. Soft routing runs every expert on every token (that *is* its
//! definition) and sums with the softmax weights.

use super::layers::{softmax_last, Linear};
use super::params::ParamStore;
use crate::config::{Activation, ExpertKind, ModelConfig, Routing};
use crate::Result;
use candle_core::{DType, Tensor};

/// One expert: `mlp` (up, act, down) or `swiglu` (gate, up, down).
#[derive(Debug, Clone)]
pub struct Expert {
    /// W_up: (d_ff, d).
    pub up: Linear,
    /// W_gate: (d_ff, d), SwiGLU only.
    pub gate: Option<Linear>,
    /// W_down: (d, d_ff).
    pub down: Linear,
    pub activation: Activation,
}

impl Expert {
    /// Build the expert (or a dense FFN) named `name`.
    pub fn new(
        ps: &mut ParamStore,
        name: &str,
        cfg: &ModelConfig,
        kind: ExpertKind,
        std: f64,
        res_std: f64,
    ) -> Result<Self> {
        let (d, f) = (cfg.d_model, cfg.d_ff);
        let bias = cfg.bias && kind == ExpertKind::Mlp;
        let gate = match kind {
            ExpertKind::Swiglu => Some(Linear::new(ps, &format!("{name}.gate"), d, f, false, std)?),
            ExpertKind::Mlp => None,
        };
        let up = Linear::new(ps, &format!("{name}.up"), d, f, bias, std)?;
        let down = Linear::new(ps, &format!("{name}.down"), f, d, bias, res_std)?;
        Ok(Expert {
            up,
            gate,
            down,
            activation: cfg.activation,
        })
    }

    /// x: (n, d) -> (n, d).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let u = self.up.forward(x)?;
        let h = match &self.gate {
            Some(g) => (g.forward(x)?.silu()? * u)?,
            None => match self.activation {
                Activation::Silu => u.silu()?,
                Activation::Gelu => u.gelu()?,
            },
        };
        self.down.forward(&h)
    }
}

/// What one MoE forward pass routed and computed, for the measures.
#[derive(Debug, Clone)]
pub struct MoeCapture {
    /// Router probabilities, row-major (n_tokens × n_experts).
    pub probs: Vec<f32>,
    /// The selected experts of each token, best first (n_tokens × k).
    pub selected: Vec<u32>,
    /// Experts per token (k; E for soft routing).
    pub k: usize,
    /// Per expert: the tokens routed to it and its raw outputs h_e = f_e(x) on
    /// them (n_e × d, detached, before gating).
    pub expert_outputs: Vec<(Vec<u32>, Option<Tensor>)>,
}

/// A MoE FFN layer.
#[derive(Debug, Clone)]
pub struct MoeLayer {
    /// W_r: (E, d), no bias.
    pub router: Linear,
    pub experts: Vec<Expert>,
    pub routing: Routing,
    pub top_k: usize,
    pub norm_topk: bool,
    /// Router softmax temperature.
    pub temperature: f64,
}

impl MoeLayer {
    pub fn new(
        ps: &mut ParamStore,
        name: &str,
        cfg: &ModelConfig,
        std: f64,
        res_std: f64,
    ) -> Result<Self> {
        let router = Linear::new(
            ps,
            &format!("{name}.router"),
            cfg.d_model,
            cfg.n_experts,
            false,
            std,
        )?;
        let experts = (0..cfg.n_experts)
            .map(|e| {
                Expert::new(
                    ps,
                    &format!("{name}.experts.{e}"),
                    cfg,
                    cfg.expert,
                    std,
                    res_std,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(MoeLayer {
            router,
            experts,
            routing: cfg.routing,
            top_k: cfg.top_k,
            norm_topk: cfg.norm_topk,
            temperature: cfg.router_temperature,
        })
    }

    pub fn n_experts(&self) -> usize {
        self.experts.len()
    }

    /// Router probabilities p = softmax(W_r x / T): (n, E).
    pub fn router_probs(&self, x: &Tensor) -> Result<Tensor> {
        let logits = self.router.forward(x)?;
        if self.temperature == 1.0 {
            softmax_last(&logits)
        } else {
            softmax_last(&(logits / self.temperature)?)
        }
    }

    /// x: (n, d) -> (n, d). With `capture`, also returns what was routed.
    pub fn forward(&self, x: &Tensor, capture: bool) -> Result<(Tensor, Option<MoeCapture>)> {
        let probs = self.router_probs(x)?; // (n, E)
        match self.routing {
            Routing::Topk => self.forward_topk(x, &probs, capture),
            Routing::Soft => self.forward_soft(x, &probs, capture),
        }
    }

    fn forward_topk(
        &self,
        x: &Tensor,
        probs: &Tensor,
        capture: bool,
    ) -> Result<(Tensor, Option<MoeCapture>)> {
        let (n, d) = x.dims2()?;
        let (e_count, k) = (self.n_experts(), self.top_k);
        let p_host: Vec<f32> = probs
            .detach()
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1()?;
        let selected = top_k_rows(&p_host, e_count, k);

        // Gates g (n, k): the selected probabilities, renormalised if asked.
        let sel = Tensor::from_vec(selected.clone(), (n, k), x.device())?;
        let mut gates = probs.gather(&sel, 1)?;
        if self.norm_topk {
            gates = gates.broadcast_div(&gates.sum_keepdim(1)?)?;
        }
        let gates = gates.flatten_all()?; // (n·k,), slot s of token t at t·k + s

        // Group assignments by expert: token ids and gate slots, expert-major.
        let mut tokens: Vec<Vec<u32>> = vec![Vec::new(); e_count];
        let mut slots: Vec<Vec<u32>> = vec![Vec::new(); e_count];
        for t in 0..n {
            for s in 0..k {
                let e = selected[t * k + s] as usize;
                tokens[e].push(t as u32);
                slots[e].push((t * k + s) as u32);
            }
        }

        let mut outs = Vec::with_capacity(e_count);
        let mut order: Vec<u32> = Vec::with_capacity(n * k);
        let mut slot_order: Vec<u32> = Vec::with_capacity(n * k);
        let mut captured = Vec::new();
        for (e, expert) in self.experts.iter().enumerate() {
            if tokens[e].is_empty() {
                if capture {
                    captured.push((Vec::new(), None));
                }
                continue;
            }
            let idx = Tensor::new(tokens[e].as_slice(), x.device())?;
            let h = expert.forward(&x.index_select(&idx, 0)?)?; // (n_e, d)
            if capture {
                captured.push((tokens[e].clone(), Some(h.detach())));
            }
            outs.push(h);
            order.extend_from_slice(&tokens[e]);
            slot_order.extend_from_slice(&slots[e]);
        }
        let h = Tensor::cat(&outs, 0)?; // (n·k, d), expert-major
        let g = gates
            .index_select(&Tensor::new(slot_order.as_slice(), x.device())?, 0)?
            .unsqueeze(1)?;
        let y = h.broadcast_mul(&g)?;
        let out = Tensor::zeros((n, d), x.dtype(), x.device())?.index_add(
            &Tensor::new(order.as_slice(), x.device())?,
            &y,
            0,
        )?;
        let cap = capture.then(|| MoeCapture {
            probs: p_host,
            selected,
            k,
            expert_outputs: captured,
        });
        Ok((out, cap))
    }

    fn forward_soft(
        &self,
        x: &Tensor,
        probs: &Tensor,
        capture: bool,
    ) -> Result<(Tensor, Option<MoeCapture>)> {
        let (n, _) = x.dims2()?;
        let e_count = self.n_experts();
        let mut out: Option<Tensor> = None;
        let mut captured = Vec::new();
        let all: Vec<u32> = (0..n as u32).collect();
        for (e, expert) in self.experts.iter().enumerate() {
            let h = expert.forward(x)?;
            let y = h.broadcast_mul(&probs.narrow(1, e, 1)?)?;
            out = Some(match out {
                Some(o) => (o + y)?,
                None => y,
            });
            if capture {
                captured.push((all.clone(), Some(h.detach())));
            }
        }
        let cap = if capture {
            let p_host: Vec<f32> = probs
                .detach()
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1()?;
            let selected = top_k_rows(&p_host, e_count, e_count);
            Some(MoeCapture {
                probs: p_host,
                selected,
                k: e_count,
                expert_outputs: captured,
            })
        } else {
            None
        };
        Ok((out.expect("at least one expert"), cap))
    }
}

/// Per row of a row-major (n × e) matrix, the indices of the `k` largest
/// values, largest first; ties go to the lower index (SPEC.md).
pub fn top_k_rows(p: &[f32], e: usize, k: usize) -> Vec<u32> {
    let n = p.len() / e;
    let mut out = Vec::with_capacity(n * k);
    let mut idx: Vec<u32> = Vec::with_capacity(e);
    for row in p.chunks_exact(e) {
        idx.clear();
        idx.extend(0..e as u32);
        // Stable sort by descending value keeps lower indices first on ties.
        idx.sort_by(|&a, &b| row[b as usize].total_cmp(&row[a as usize]));
        out.extend_from_slice(&idx[..k]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_breaks_ties_by_lower_index() {
        let p = [0.1, 0.4, 0.4, 0.1, 0.25, 0.25, 0.25, 0.25];
        assert_eq!(top_k_rows(&p, 4, 2), vec![1, 2, 0, 1]);
        assert_eq!(top_k_rows(&p, 4, 3), vec![1, 2, 0, 0, 1, 2]);
    }
}
