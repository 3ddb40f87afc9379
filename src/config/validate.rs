//! The checks of a config. Every error names the key at fault (and what
//! would be valid); typed choices were checked while parsing.

use super::{Config, ExpertKind, Family, ModelConfig, RegConfig, Routing, TrainConfig};
use crate::{Error, Result};

impl ModelConfig {
    /// Check shapes; errors name the field.
    pub fn validate(&self) -> Result<()> {
        let pos = |v: usize, f: &str| -> Result<()> {
            if v == 0 {
                Err(Error::config(format!("model.{f}"), "must be at least 1"))
            } else {
                Ok(())
            }
        };
        pos(self.seq_len, "seq_len")?;
        pos(self.n_layer, "n_layer")?;
        pos(self.n_head, "n_head")?;
        pos(self.d_model, "d_model")?;
        pos(self.d_ff, "d_ff")?;
        pos(self.n_experts, "n_experts")?;
        pos(self.moe_every, "moe_every")?;
        if !self.d_model.is_multiple_of(self.n_head) {
            return Err(Error::config(
                "model.n_head",
                format!(
                    "n_head = {} does not divide d_model = {}",
                    self.n_head, self.d_model
                ),
            ));
        }
        if self.routing != Routing::Soft && (self.top_k == 0 || self.top_k > self.n_experts) {
            return Err(Error::config(
                "model.top_k",
                format!(
                    "top_k = {} must be between 1 and n_experts = {}",
                    self.top_k, self.n_experts
                ),
            ));
        }
        if self.moe_every > self.n_layer {
            return Err(Error::config(
                "model.moe_every",
                format!(
                    "moe_every = {} exceeds n_layer = {}: the model would have no MoE layer",
                    self.moe_every, self.n_layer
                ),
            ));
        }
        if !(self.router_temperature > 0.0 && self.router_temperature.is_finite()) {
            return Err(Error::config(
                "model.router_temperature",
                "must be a positive number",
            ));
        }
        if !(self.init_std > 0.0 && self.init_std.is_finite()) {
            return Err(Error::config("model.init_std", "must be a positive number"));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(Error::config("model.dropout", "must lie in [0, 1)"));
        }
        if !(self.capacity_factor >= 0.0 && self.capacity_factor.is_finite()) {
            return Err(Error::config(
                "model.capacity_factor",
                "must be 0 (dropless) or a positive number",
            ));
        }
        Ok(())
    }
}

impl TrainConfig {
    /// Check values; errors name the field.
    pub fn validate(&self) -> Result<()> {
        if self.batch_size == 0 {
            return Err(Error::config("train.batch_size", "must be at least 1"));
        }
        if self.grad_accum == 0 {
            return Err(Error::config("train.grad_accum", "must be at least 1"));
        }
        if self.max_steps == 0 && self.max_tokens == 0 {
            return Err(Error::config(
                "train.max_steps",
                "set max_steps or max_tokens",
            ));
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return Err(Error::config("train.lr", "must be a positive number"));
        }
        if !(self.min_lr >= 0.0 && self.min_lr <= self.lr) {
            return Err(Error::config("train.min_lr", "must lie in [0, lr]"));
        }
        for (v, f) in [(self.beta1, "beta1"), (self.beta2, "beta2")] {
            if !(0.0..1.0).contains(&v) {
                return Err(Error::config(format!("train.{f}"), "must lie in [0, 1)"));
            }
        }
        let wd = self.weight_decay_experts;
        if !((wd >= 0.0 && wd.is_finite()) || wd == -1.0) {
            return Err(Error::config(
                "train.weight_decay_experts",
                "must be a non-negative number, or -1 for the same as weight_decay",
            ));
        }
        if self.log_every == 0 {
            return Err(Error::config("train.log_every", "must be at least 1"));
        }
        if self.keep_checkpoints == 0 {
            return Err(Error::config(
                "train.keep_checkpoints",
                "must be at least 1",
            ));
        }
        Ok(())
    }
}

impl RegConfig {
    /// Check the λs and the temperature.
    pub fn validate(&self) -> Result<()> {
        let orth_ok =
            self.orth_lambda.is_finite() && (self.orth_lambda >= 0.0 || self.orth_allow_negative);
        if !orth_ok {
            return Err(Error::config(
                "reg.orth_lambda",
                "must be a non-negative number (a negative λ rewards overlap; set reg.orth_allow_negative = true to allow it)",
            ));
        }
        for (key, v) in [
            ("act_lambda", self.act_lambda),
            ("grad_lambda", self.grad_lambda),
            ("contrastive_lambda", self.contrastive_lambda),
            ("entropy_lambda", self.entropy_lambda),
            ("aux_lambda", self.aux_lambda),
            ("z_lambda", self.z_lambda),
            ("loss_free_gamma", self.loss_free_gamma),
        ] {
            if !(v >= 0.0 && v.is_finite()) {
                return Err(Error::config(
                    format!("reg.{key}"),
                    "must be a non-negative number",
                ));
            }
        }
        if !self.token_entropy_lambda.is_finite() {
            return Err(Error::config(
                "reg.token_entropy_lambda",
                "must be a number",
            ));
        }
        if !(self.contrastive_temperature > 0.0 && self.contrastive_temperature.is_finite()) {
            return Err(Error::config(
                "reg.contrastive_temperature",
                "must be a positive number",
            ));
        }
        Ok(())
    }
}

impl Config {
    /// Check every section, then the keys that depend on one another.
    pub fn validate(&self) -> Result<()> {
        self.model.validate()?;
        self.train.validate()?;
        if !(self.data.val_fraction > 0.0 && self.data.val_fraction < 1.0) {
            return Err(Error::config(
                "data.val_fraction",
                "must lie strictly between 0 and 1",
            ));
        }
        self.reg.validate()?;
        self.check_families()?;
        self.check_routing_options()
    }

    /// A regularised `gate` family needs SwiGLU experts.
    fn check_families(&self) -> Result<()> {
        let r = &self.reg;
        for (key, family, lambda) in [
            ("reg.orth_family", r.orth_family, r.orth_lambda),
            ("reg.grad_family", r.grad_family, r.grad_lambda),
        ] {
            if family == Family::Gate && self.model.expert != ExpertKind::Swiglu && lambda != 0.0 {
                return Err(Error::config(
                    key,
                    "`gate` needs model.expert = \"swiglu\" (MLP experts have no gate)",
                ));
            }
        }
        Ok(())
    }

    /// Loss-free balancing, capacity and progressive top-k each need a routing.
    fn check_routing_options(&self) -> Result<()> {
        let r = &self.reg;
        let routing = self.model.routing;
        if r.loss_free_gamma > 0.0 && routing != Routing::Topk {
            return Err(Error::config(
                "reg.loss_free_gamma",
                "loss-free balancing biases top-k selection; it needs model.routing = \"topk\"",
            ));
        }
        if r.loss_free_gamma > 0.0 && !self.model.balance_bias {
            return Err(Error::config(
                "model.balance_bias",
                "must be true when reg.loss_free_gamma > 0",
            ));
        }
        if self.model.capacity_factor > 0.0 && routing == Routing::Soft {
            return Err(Error::config(
                "model.capacity_factor",
                "soft routing sends every token to every expert; capacity applies to topk and expert_choice",
            ));
        }
        if self.train.topk_start > 0
            && (routing != Routing::Topk || self.train.topk_start > self.model.top_k)
        {
            return Err(Error::config(
                "train.topk_start",
                format!(
                    "progressive top-k needs model.routing = \"topk\" and 1 ≤ topk_start ≤ top_k = {}",
                    self.model.top_k
                ),
            ));
        }
        Ok(())
    }
}
