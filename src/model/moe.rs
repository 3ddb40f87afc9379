//! Mixture-of-Experts FFN: router, experts, dropless dispatch.
//!
//! Top-k routing gathers the tokens routed to each expert, runs that expert
//! once on exactly those rows, and scatter-adds the gated outputs back. No
//! capacity limit, nothing dropped, and no expert ever sees a token it was not
//! routed to. Soft routing runs every expert on every token (that *is* its
//! definition) and sums with the softmax weights.

use std::borrow::Cow;

use super::layers::{softmax_last, Linear};
use super::params::ParamStore;
use crate::config::{ActSpace, Activation, ExpertKind, ModelConfig, Routing};
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
        self.down.forward(&self.hidden(x)?)
    }

    /// The hidden activation φ(W_up x + b) (SwiGLU: silu(W_gate x) ⊙ W_up x): (n, d_ff).
    pub fn hidden(&self, x: &Tensor) -> Result<Tensor> {
        let u = self.up.forward(x)?;
        Ok(match &self.gate {
            Some(g) => (g.forward(x)?.silu()? * u)?,
            None => match self.activation {
                Activation::Silu => u.silu()?,
                Activation::Gelu => u.gelu()?,
            },
        })
    }
}

/// Marks an empty slot in a selection: an assignment dropped by the capacity
/// limit, or (expert choice) fewer experts than slots.
pub const NO_EXPERT: u32 = u32::MAX;

/// What one MoE forward pass routed and computed, captured off the graph as
/// host copies for the measures (see [`RoutingOnGraph`] for what the
/// regularisers get on the graph).
#[derive(Debug, Clone)]
pub struct CapturedRouting {
    /// Router probabilities, row-major (n_tokens × n_experts).
    pub probs: Vec<f32>,
    /// The selected experts of each token, best first (n_tokens × k);
    /// [`NO_EXPERT`] marks an empty slot.
    pub selected: Vec<u32>,
    /// Slots per token (k; E for soft routing and expert choice).
    pub k: usize,
    /// Per expert: the tokens routed to it (ascending) and its raw outputs
    /// h_e = f_e(x) on them (n_e × d, detached, before gating).
    pub expert_outputs: Vec<(Vec<u32>, Option<Tensor>)>,
    /// Per expert, its hidden activations φ(W_up x + b) on the same tokens
    /// (n_e × d_ff, detached); empty unless `capture_hidden` was asked.
    pub expert_hidden: Vec<Option<Tensor>>,
}

impl CapturedRouting {
    /// This capture with the experts' rows taken in `space` (None when the
    /// hidden activations were not captured): what activation overlap in
    /// that space compares.
    /// The output space borrows this capture; the others build a new one.
    pub fn in_space(&self, space: ActSpace) -> Result<Option<Cow<'_, CapturedRouting>>> {
        let rows: Vec<Option<Tensor>> = match space {
            ActSpace::Output => return Ok(Some(Cow::Borrowed(self))),
            _ if self.expert_hidden.len() != self.expert_outputs.len() => return Ok(None),
            ActSpace::Hidden => self.expert_hidden.clone(),
            ActSpace::HiddenLn => self
                .expert_hidden
                .iter()
                .map(|h| h.as_ref().map(layer_norm_plain).transpose())
                .collect::<Result<_>>()?,
        };
        let expert_outputs = self
            .expert_outputs
            .iter()
            .zip(rows)
            .map(|((tokens, _), h)| (tokens.clone(), h))
            .collect();
        Ok(Some(Cow::Owned(CapturedRouting {
            probs: self.probs.clone(),
            selected: self.selected.clone(),
            k: self.k,
            expert_outputs,
            expert_hidden: Vec::new(),
        })))
    }
}

/// LayerNorm of each row without gain or bias: (h − mean) / √(var + 1e-5).
fn layer_norm_plain(h: &Tensor) -> Result<Tensor> {
    let h = h.to_dtype(DType::F32)?;
    let centred = h.broadcast_sub(&h.mean_keepdim(1)?)?;
    let var = centred.sqr()?.mean_keepdim(1)?;
    Ok(centred.broadcast_div(&(var + 1e-5)?.sqrt()?)?)
}

/// Options of one forward pass: whether it trains (the capacity limit
/// applies), and what it keeps for the measures and the regularisers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ForwardOptions {
    /// Capture what was routed, detached (for the measures).
    pub capture: bool,
    /// A training pass: the capacity limit applies.
    pub train: bool,
    /// Keep the expert outputs on the graph (activation-space regularisers).
    pub keep_outputs: bool,
    /// With `capture`, also capture the experts' hidden activations.
    pub capture_hidden: bool,
    /// A training pass with `model.dropout` > 0: the seed of its dropout masks.
    pub dropout_seed: Option<u64>,
}

/// What the regularisers and load balancing need from one MoE forward pass,
/// as tensors on the autodiff graph (see [`CapturedRouting`] for the
/// measures' detached copies).
#[derive(Debug, Clone)]
pub struct RoutingOnGraph {
    /// Router logits W_r x (n, E), on the graph.
    pub logits: Tensor,
    /// Router probabilities softmax(logits / T) (n, E), on the graph.
    pub probs: Tensor,
    /// Per token, `k` slots of expert ids ([`NO_EXPERT`] = empty), after any drop.
    pub selected: Vec<u32>,
    pub k: usize,
    /// Expert outputs h_e(x) on the graph (rows, d), with each row's token and
    /// expert, when `keep_outputs` was asked (empty for soft routing's dense rows: all).
    pub outputs: Option<(Tensor, Vec<u32>, Vec<u32>)>,
    /// Assignments the router made but the capacity limit dropped.
    pub dropped: usize,
    /// Assignments the router made (n · k for top-k).
    pub assigned: usize,
    /// Per expert: assignments the router made to it, before any drop (the
    /// load that the aux loss and loss-free balancing see).
    pub routed_load: Vec<u64>,
}

/// The result of [`MoeLayer::forward_with`].
#[derive(Debug)]
pub struct MoeOutput {
    /// (n, d).
    pub y: Tensor,
    pub capture: Option<CapturedRouting>,
    pub aux: RoutingOnGraph,
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
    /// Training capacity factor (0 = dropless); expert choice's capacity.
    pub capacity_factor: f64,
    /// Loss-free balancing bias (E), added to the probabilities for selection only.
    pub balance_bias: Option<Tensor>,
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
        let balance_bias = if cfg.balance_bias {
            Some(ps.constant(&format!("{name}.balance_bias"), &[cfg.n_experts], 0.0)?)
        } else {
            None
        };
        Ok(MoeLayer {
            router,
            experts,
            routing: cfg.routing,
            top_k: cfg.top_k,
            norm_topk: cfg.norm_topk,
            temperature: cfg.router_temperature,
            capacity_factor: cfg.capacity_factor,
            balance_bias,
        })
    }

    pub fn n_experts(&self) -> usize {
        self.experts.len()
    }

    /// Every expert on every row of `x` (n, d), as host f32 copies (one
    /// n×d row-major vector per expert): what all-pairs measures compare.
    pub fn every_expert_output(&self, x: &Tensor) -> Result<Vec<Vec<f32>>> {
        self.experts
            .iter()
            .map(|e| {
                Ok(e.forward(x)?
                    .to_dtype(DType::F32)?
                    .flatten_all()?
                    .to_vec1::<f32>()?)
            })
            .collect()
    }

    /// `cap` with each expert's hidden activations on its routed rows of
    /// `input` (n, d) filled in (computed again: the analysis asks for them
    /// after the forward pass).
    pub fn with_hidden(&self, input: &Tensor, cap: &CapturedRouting) -> Result<CapturedRouting> {
        let expert_hidden = cap
            .expert_outputs
            .iter()
            .zip(&self.experts)
            .map(|((tokens, h), expert)| match h {
                Some(_) => {
                    let idx = Tensor::new(tokens.as_slice(), input.device())?;
                    Ok(Some(expert.hidden(&input.index_select(&idx, 0)?)?))
                }
                None => Ok(None),
            })
            .collect::<Result<_>>()?;
        Ok(CapturedRouting {
            expert_hidden,
            ..cap.clone()
        })
    }

    /// Router probabilities p = softmax(W_r x / T): (n, E).
    pub fn router_probs(&self, x: &Tensor) -> Result<Tensor> {
        self.router_logits_probs(x).map(|(_, p)| p)
    }

    fn router_logits_probs(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let logits = self.router.forward(x)?;
        let p = if self.temperature == 1.0 {
            softmax_last(&logits)?
        } else {
            softmax_last(&(&logits / self.temperature)?)?
        };
        Ok((logits, p))
    }

    /// x: (n, d) -> (n, d). With `capture`, also returns what was routed.
    pub fn forward(&self, x: &Tensor, capture: bool) -> Result<(Tensor, Option<CapturedRouting>)> {
        let o = self.forward_with(
            x,
            ForwardOptions {
                capture,
                ..Default::default()
            },
        )?;
        Ok((o.y, o.capture))
    }

    /// The forward pass with everything the measures and regularisers may need:
    /// route on the host, gate, run each expert on its tokens, scatter-add back.
    pub fn forward_with(&self, x: &Tensor, mode: ForwardOptions) -> Result<MoeOutput> {
        let (logits, probs) = self.router_logits_probs(x)?; // (n, E)
        let p_host: Vec<f32> = probs
            .detach()
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1()?;
        let (n, _) = x.dims2()?;
        let route = self.route(&p_host, n, mode.train)?;
        let gates = self.gates(&probs, &route, n)?;
        let rows = self.run_experts(x, &route, mode)?;
        let y = combine(x, &rows, &gates)?;
        let routed_load = route.routed_load(self.n_experts());
        let capture = mode.capture.then(|| CapturedRouting {
            probs: p_host,
            selected: route.selected.clone(),
            k: route.k,
            expert_outputs: rows.captured,
            expert_hidden: rows.captured_hidden,
        });
        let outputs = mode
            .keep_outputs
            .then_some((rows.h, rows.order, rows.row_expert));
        Ok(MoeOutput {
            y,
            capture,
            aux: RoutingOnGraph {
                logits,
                probs,
                selected: route.selected,
                k: route.k,
                outputs,
                dropped: route.dropped,
                assigned: route.assigned,
                routed_load,
            },
        })
    }

    /// The routing decision on the host (`p` row-major n × E): per token its
    /// slots. Only a training pass applies the top-k capacity limit.
    fn route(&self, p: &[f32], n: usize, train: bool) -> Result<RouteDecision> {
        let e_count = self.n_experts();
        Ok(match self.routing {
            Routing::Topk => {
                let routed = top_k_rows(&self.selection_scores(p)?, e_count, self.top_k);
                let (selected, dropped) = if train && self.capacity_factor > 0.0 {
                    let cap = capacity(self.capacity_factor, n, self.top_k, e_count);
                    drop_over_capacity(&routed, n, self.top_k, e_count, cap)
                } else {
                    (routed.clone(), 0)
                };
                RouteDecision {
                    selected,
                    k: self.top_k,
                    routed: Some(routed),
                    dropped,
                    assigned: n * self.top_k,
                }
            }
            Routing::Soft => RouteDecision {
                selected: top_k_rows(p, e_count, e_count),
                k: e_count,
                routed: None,
                dropped: 0,
                assigned: n * e_count,
            },
            Routing::ExpertChoice => self.route_expert_choice(p, n),
        })
    }

    /// What top-k selects on: the probabilities plus the loss-free balancing
    /// bias when there is one (the gates stay the plain probabilities).
    fn selection_scores(&self, p: &[f32]) -> Result<Vec<f32>> {
        Ok(match &self.balance_bias {
            Some(b) => {
                let b: Vec<f32> = b.to_dtype(DType::F32)?.to_vec1()?;
                p.chunks_exact(self.n_experts())
                    .flat_map(|r| r.iter().zip(&b).map(|(p, b)| p + b))
                    .collect()
            }
            None => p.to_vec(),
        })
    }

    /// Expert choice: each expert takes its `capacity` most probable tokens;
    /// a token's slots are the experts that chose it, ascending, then empty.
    fn route_expert_choice(&self, p: &[f32], n: usize) -> RouteDecision {
        let e_count = self.n_experts();
        let cf = if self.capacity_factor > 0.0 {
            self.capacity_factor
        } else {
            1.0
        };
        let cap = capacity(cf, n, self.top_k, e_count).min(n);
        let mut chosen = vec![vec![NO_EXPERT; e_count]; n];
        let mut col: Vec<u32> = Vec::with_capacity(n);
        for e in 0..e_count {
            col.clear();
            col.extend(0..n as u32);
            // Highest probability first; ties to the lower token index.
            col.sort_by(|&a, &b| {
                p[b as usize * e_count + e].total_cmp(&p[a as usize * e_count + e])
            });
            for &t in &col[..cap] {
                chosen[t as usize][e] = e as u32;
            }
        }
        let selected: Vec<u32> = chosen
            .into_iter()
            .flat_map(|row| {
                let mut r: Vec<u32> = row.into_iter().filter(|&e| e != NO_EXPERT).collect();
                r.resize(e_count, NO_EXPERT);
                r
            })
            .collect();
        RouteDecision {
            selected,
            k: e_count,
            routed: None,
            dropped: 0,
            assigned: cap * e_count,
        }
    }

    /// Gate of each (token, slot), flat with slot s of token t at t·k + s: the
    /// probability, renormalised over the router's top-k when asked (before
    /// any drop, as GShard).
    fn gates(&self, probs: &Tensor, route: &RouteDecision, n: usize) -> Result<Tensor> {
        let (k, e_count) = (route.k, self.n_experts());
        match (&route.routed, self.routing) {
            (Some(routed), Routing::Topk) => {
                let sel = Tensor::from_vec(routed.clone(), (n, k), probs.device())?;
                let mut g = probs.gather(&sel, 1)?;
                if self.norm_topk {
                    g = g.broadcast_div(&g.sum_keepdim(1)?)?;
                }
                Ok(g.flatten_all()?)
            }
            _ => {
                // Soft and expert choice: the plain probability p_e(x) of slot (t, e).
                let idx: Vec<u32> = (0..n * k)
                    .map(|i| {
                        let e = route.selected[i];
                        let t = i / k;
                        (t * e_count) as u32 + if e == NO_EXPERT { 0 } else { e }
                    })
                    .collect();
                Ok(probs
                    .flatten_all()?
                    .index_select(&Tensor::new(idx.as_slice(), probs.device())?, 0)?)
            }
        }
    }

    /// Run each expert once on exactly the tokens routed to it; the rows come
    /// back expert-major with their tokens and gate slots.
    fn run_experts(
        &self,
        x: &Tensor,
        route: &RouteDecision,
        mode: ForwardOptions,
    ) -> Result<ExpertRows> {
        let n = x.dims2()?.0;
        let (tokens, slots) = group_by_expert(&route.selected, n, route.k, self.n_experts());
        let mut outs = Vec::with_capacity(self.n_experts());
        let (mut order, mut slot_order) = (
            Vec::with_capacity(n * route.k),
            Vec::with_capacity(n * route.k),
        );
        let (mut row_expert, mut captured) = (Vec::new(), Vec::new());
        let mut captured_hidden = Vec::new();
        let keep_hidden = mode.capture && mode.capture_hidden;
        for (e, expert) in self.experts.iter().enumerate() {
            if tokens[e].is_empty() {
                if mode.capture {
                    captured.push((Vec::new(), None));
                }
                if keep_hidden {
                    captured_hidden.push(None);
                }
                continue;
            }
            let hidden = if tokens[e].len() == n {
                expert.hidden(x)? // every token (soft routing): no gather
            } else {
                let idx = Tensor::new(tokens[e].as_slice(), x.device())?;
                expert.hidden(&x.index_select(&idx, 0)?)? // (n_e, d_ff)
            };
            let h = expert.down.forward(&hidden)?; // (n_e, d)
            if mode.capture {
                captured.push((tokens[e].clone(), Some(h.detach())));
            }
            if keep_hidden {
                captured_hidden.push(Some(hidden.detach()));
            }
            if mode.keep_outputs {
                row_expert.extend(std::iter::repeat_n(e as u32, tokens[e].len()));
            }
            outs.push(h);
            order.extend_from_slice(&tokens[e]);
            slot_order.extend_from_slice(&slots[e]);
        }
        Ok(ExpertRows {
            h: Tensor::cat(&outs, 0)?, // (rows, d), expert-major
            order,
            slot_order,
            row_expert,
            captured,
            captured_hidden,
        })
    }
}

/// One forward pass's routing decision, made on the host.
struct RouteDecision {
    /// Per token, `k` slots of expert ids ([`NO_EXPERT`] = empty), after any drop.
    selected: Vec<u32>,
    k: usize,
    /// Top-k only: the router's choice before any drop (the gates and the
    /// routed load come from it).
    routed: Option<Vec<u32>>,
    dropped: usize,
    assigned: usize,
}

impl RouteDecision {
    /// Per expert: assignments the router made to it, before any drop.
    fn routed_load(&self, e_count: usize) -> Vec<u64> {
        let mut load = vec![0u64; e_count];
        for &e in self.routed.as_ref().unwrap_or(&self.selected) {
            if e != NO_EXPERT {
                load[e as usize] += 1;
            }
        }
        load
    }
}

/// The experts' outputs of one forward pass, expert-major.
struct ExpertRows {
    /// h_e(x) of every kept assignment (rows, d), on the graph.
    h: Tensor,
    /// Token of each row.
    order: Vec<u32>,
    /// Gate slot (t·k + s) of each row.
    slot_order: Vec<u32>,
    /// Expert of each row, only filled when `keep_outputs` was asked.
    row_expert: Vec<u32>,
    /// Per expert its tokens and detached outputs, only filled when `capture` was asked.
    captured: Vec<(Vec<u32>, Option<Tensor>)>,
    /// Per expert its detached hidden activations, when `capture_hidden` was asked.
    captured_hidden: Vec<Option<Tensor>>,
}

/// GShard priority: every token's first choice, then second, ..., each expert
/// taking at most `cap`; the rest become [`NO_EXPERT`]. Returns the kept
/// slots and how many were dropped.
fn drop_over_capacity(
    routed: &[u32],
    n: usize,
    k: usize,
    e_count: usize,
    cap: usize,
) -> (Vec<u32>, usize) {
    let mut kept = routed.to_vec();
    let mut count = vec![0usize; e_count];
    let mut dropped = 0;
    for s in 0..k {
        for t in 0..n {
            let e = routed[t * k + s] as usize;
            if count[e] < cap {
                count[e] += 1;
            } else {
                kept[t * k + s] = NO_EXPERT;
                dropped += 1;
            }
        }
    }
    (kept, dropped)
}

/// Group the kept assignments by expert: per expert its token ids and gate
/// slots (t·k + s), tokens ascending.
fn group_by_expert(
    selected: &[u32],
    n: usize,
    k: usize,
    e_count: usize,
) -> (Vec<Vec<u32>>, Vec<Vec<u32>>) {
    let mut tokens: Vec<Vec<u32>> = vec![Vec::new(); e_count];
    let mut slots: Vec<Vec<u32>> = vec![Vec::new(); e_count];
    for t in 0..n {
        for s in 0..k {
            let e = selected[t * k + s];
            if e != NO_EXPERT {
                tokens[e as usize].push(t as u32);
                slots[e as usize].push((t * k + s) as u32);
            }
        }
    }
    (tokens, slots)
}

/// y = Σ_rows gate · h_e(x), scatter-added onto each row's token: (n, d).
fn combine(x: &Tensor, rows: &ExpertRows, gates: &Tensor) -> Result<Tensor> {
    let g = gates
        .index_select(&Tensor::new(rows.slot_order.as_slice(), x.device())?, 0)?
        .unsqueeze(1)?;
    let order_t = Tensor::new(rows.order.as_slice(), x.device())?;
    Ok(Tensor::zeros(x.dims(), x.dtype(), x.device())?.index_add(
        &order_t,
        &rows.h.broadcast_mul(&g)?,
        0,
    )?)
}

/// ⌈cf · n · k / E⌉, at least 1.
pub fn capacity(cf: f64, n: usize, k: usize, e: usize) -> usize {
    ((cf * (n * k) as f64 / e as f64).ceil() as usize).max(1)
}

/// Per row of a row-major (n × e) matrix, the indices of the `k` largest
/// values, largest first; ties go to the lower index ([`crate::kernels::top_k`]).
pub fn top_k_rows(p: &[f32], e: usize, k: usize) -> Vec<u32> {
    if k == 0 {
        return Vec::new();
    }
    let mut out = vec![0; p.len() / e * k];
    for (row, sel) in p.chunks_exact(e).zip(out.chunks_exact_mut(k)) {
        crate::kernels::top_k(row, sel);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ModelConfig;
    use candle_core::Device;

    #[test]
    fn capacity_drops_in_gshard_order_when_training_only() {
        let cfg = ModelConfig {
            d_model: 6,
            d_ff: 8,
            n_experts: 3,
            top_k: 2,
            capacity_factor: 0.5,
            ..Default::default()
        };
        let mut ps = ParamStore::new(DType::F64, &Device::Cpu, 3);
        let m = MoeLayer::new(&mut ps, "moe", &cfg, 0.5, 0.5).unwrap();
        let x = Tensor::randn(0.0, 1.0, (10, 6), &Device::Cpu).unwrap();
        let train = ForwardOptions {
            train: true,
            ..Default::default()
        };
        let o = m.forward_with(&x, train).unwrap();
        let p: Vec<f32> = m
            .router_probs(&x)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let routed = top_k_rows(&p, 3, 2);
        // Independent replay: capacity ⌈0.5·10·2/3⌉ = 4, first choices of all tokens first.
        let mut count = [0usize; 3];
        let mut want = routed.clone();
        for s in 0..2 {
            for t in 0..10 {
                let e = routed[t * 2 + s] as usize;
                if count[e] < 4 {
                    count[e] += 1;
                } else {
                    want[t * 2 + s] = NO_EXPERT;
                }
            }
        }
        assert_eq!(o.aux.selected, want);
        assert_eq!(
            o.aux.dropped,
            want.iter().filter(|&&e| e == NO_EXPERT).count()
        );
        assert!(o.aux.dropped > 0, "the test should drop something");
        assert_eq!(o.aux.routed_load.iter().sum::<u64>(), 20);
        // Evaluation is dropless.
        let e = m.forward_with(&x, ForwardOptions::default()).unwrap();
        assert_eq!((e.aux.dropped, e.aux.selected.clone()), (0, routed.clone()));
        // A dropped token-slot contributes nothing: the output equals the
        // dense sum over the kept assignments only.
        let g = m.router_probs(&x).unwrap().to_vec2::<f64>().unwrap();
        let y = o.y.to_vec2::<f64>().unwrap();
        for t in 0..10 {
            let sel = &routed[t * 2..t * 2 + 2];
            let denom: f64 = sel.iter().map(|&e| g[t][e as usize]).sum();
            let mut acc = [0.0; 6];
            for s in 0..2 {
                if want[t * 2 + s] == NO_EXPERT {
                    continue;
                }
                let e = sel[s] as usize;
                let h = m.experts[e]
                    .forward(&x.narrow(0, t, 1).unwrap())
                    .unwrap()
                    .to_vec2::<f64>()
                    .unwrap();
                for (a, v) in acc.iter_mut().zip(&h[0]) {
                    *a += g[t][e] / denom * v;
                }
            }
            for (a, b) in acc.iter().zip(&y[t]) {
                assert!((a - b).abs() < 1e-12);
            }
        }
    }

    #[test]
    fn top_k_breaks_ties_by_lower_index() {
        let p = [0.1, 0.4, 0.4, 0.1, 0.25, 0.25, 0.25, 0.25];
        assert_eq!(top_k_rows(&p, 4, 2), vec![1, 2, 0, 1]);
        assert_eq!(top_k_rows(&p, 4, 3), vec![1, 2, 0, 0, 1, 2]);
    }
}
