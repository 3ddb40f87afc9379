//! What the fused engine covers: a config it cannot train, and why.

use crate::config::{Activation, Config, ExpertKind, Family, Routing};

/// Why the fused engine cannot train `cfg` (the first reason found), or
/// `None` when it can. The engine runs top-k routed SiLU-MLP experts in
/// every layer on the CPU, with L_orth on W_up as its only regulariser.
pub fn unsupported(cfg: &Config) -> Option<&'static str> {
    let (m, r, t) = (&cfg.model, &cfg.reg, &cfg.train);
    let checks: [(bool, &str); 15] = [
        (m.routing != Routing::Topk, "model.routing is not topk"),
        (m.expert != ExpertKind::Mlp, "model.expert is not mlp"),
        (
            m.activation != Activation::Silu,
            "model.activation is not silu",
        ),
        (m.moe_every != 1, "model.moe_every is not 1 (dense layers)"),
        (
            m.router_temperature != 1.0,
            "model.router_temperature is not 1",
        ),
        (m.capacity_factor > 0.0, "model.capacity_factor is set"),
        (m.router_frozen, "model.router_frozen is set"),
        (
            m.balance_bias || r.loss_free_gamma > 0.0,
            "loss-free balancing is on",
        ),
        (t.topk_start > 0, "train.topk_start is set"),
        (m.dropout > 0.0, "model.dropout is set"),
        (t.device != "cpu", "train.device is not cpu"),
        (
            r.orth_lambda != 0.0 && r.orth_family != Family::Up,
            "reg.orth_family is not up",
        ),
        (r.grad_lambda > 0.0, "reg.grad_lambda is set"),
        (
            r.act_lambda != 0.0
                || r.contrastive_lambda != 0.0
                || r.entropy_lambda != 0.0
                || r.token_entropy_lambda != 0.0,
            "an activation or routing regulariser is on",
        ),
        (
            r.aux_lambda != 0.0 || r.z_lambda != 0.0,
            "reg.aux_lambda or reg.z_lambda is set",
        ),
    ];
    checks.iter().find(|(bad, _)| *bad).map(|(_, why)| *why)
}
