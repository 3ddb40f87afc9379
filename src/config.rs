//! Run configuration: `[model]`, `[data]`, `[train]` sections, named presets,
//! TOML files and `--set section.key=value` overrides.
//!
//! Resolution order: preset (default `tiny`) < config file < `--set` overrides.
//! Every key is checked: an unknown key is an error that names it and lists
//! the keys that exist.

use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// How tokens choose experts (SPEC.md "Notation").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Routing {
    /// The `top_k` largest router probabilities (ties: lower index first).
    Topk,
    /// Every expert, weighted by the router softmax.
    Soft,
    /// Expert choice (Zhou et al. 2022): each expert takes the C tokens with
    /// the highest router probability for it, C = ⌈cf · n · top_k / E⌉
    /// (cf = `capacity_factor`, 1 when 0); a token may get 0..E experts.
    #[serde(rename = "expert_choice")]
    ExpertChoice,
}

/// Expert architecture.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExpertKind {
    /// `W_down · φ(W_up x + b_up) + b_down`.
    Mlp,
    /// `W_down · (silu(W_gate x) ⊙ W_up x)`, no biases.
    Swiglu,
}

/// Activation of `mlp` experts (and dense FFNs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Activation {
    Silu,
    /// GELU, tanh approximation.
    Gelu,
}

/// Model architecture. Names follow ../SPEC.md.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// Vocabulary size; 0 = the tokeniser's, rounded up to a multiple of 64.
    pub vocab_size: usize,
    /// Context length (learned position embeddings of this many positions).
    pub seq_len: usize,
    pub n_layer: usize,
    pub n_head: usize,
    pub d_model: usize,
    /// Hidden width of each expert (and of dense FFNs).
    pub d_ff: usize,
    pub n_experts: usize,
    pub top_k: usize,
    pub routing: Routing,
    /// Renormalise the top-k gates to sum to one.
    pub norm_topk: bool,
    /// Router softmax temperature T: p = softmax(W_r x / T) (1 = the plain softmax).
    pub router_temperature: f64,
    pub expert: ExpertKind,
    pub activation: Activation,
    /// Layer `l` has an MoE FFN when `(l + 1) % moe_every == 0`, else a dense FFN.
    pub moe_every: usize,
    /// Biases in attention, LayerNorm, `mlp` experts and dense FFNs (never the router).
    pub bias: bool,
    /// Standard deviation of the normal initialisation (nanoGPT: 0.02).
    pub init_std: f64,
    /// Top-k training dispatch: each expert takes at most ⌈cf · n · k / E⌉ of
    /// a batch's n tokens (in token order); the rest of its assignments are
    /// dropped (the residual carries those tokens) and the rate is logged.
    /// 0 = dropless. Evaluation and analysis stay dropless. For
    /// `expert_choice` it sets the capacity (0 = 1).
    pub capacity_factor: f64,
    /// Keep the router at its random initialisation (SMoE-Dropout; pair with
    /// `train.topk_start` for progressively more experts).
    pub router_frozen: bool,
    /// A per-expert bias added to the router probabilities for top-k
    /// selection only (loss-free balancing); switched on by `reg.loss_free_gamma`.
    pub balance_bias: bool,
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig {
            vocab_size: 0,
            seq_len: 128,
            n_layer: 4,
            n_head: 4,
            d_model: 256,
            d_ff: 1024,
            n_experts: 8,
            top_k: 2,
            routing: Routing::Topk,
            norm_topk: true,
            router_temperature: 1.0,
            expert: ExpertKind::Mlp,
            activation: Activation::Silu,
            moe_every: 1,
            bias: true,
            init_std: 0.02,
            capacity_factor: 0.0,
            router_frozen: false,
            balance_bias: false,
        }
    }
}

impl ModelConfig {
    /// Whether layer `l` carries an MoE FFN.
    pub fn is_moe_layer(&self, l: usize) -> bool {
        (l + 1) % self.moe_every == 0
    }

    /// Number of experts each token uses.
    pub fn active_experts(&self) -> usize {
        match self.routing {
            Routing::Topk | Routing::ExpertChoice => self.top_k,
            Routing::Soft => self.n_experts,
        }
    }

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
        if self.d_model % self.n_head != 0 {
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
        if !(self.capacity_factor >= 0.0 && self.capacity_factor.is_finite()) {
            return Err(Error::config(
                "model.capacity_factor",
                "must be 0 (dropless) or a positive number",
            ));
        }
        Ok(())
    }

    /// Indices of the MoE layers, in order.
    pub fn moe_layers(&self) -> Vec<usize> {
        (0..self.n_layer)
            .filter(|&l| self.is_moe_layer(l))
            .collect()
    }

    /// (total parameters, active parameters per token). Tied embeddings counted
    /// once; position embeddings excluded from the active count (as nanoGPT).
    pub fn param_counts(&self) -> (usize, usize) {
        let (d, f, v, e) = (self.d_model, self.d_ff, self.vocab_size, self.n_experts);
        let b = usize::from(self.bias);
        let attn = 4 * d * d + b * 4 * d;
        let ln = 2 * d + b * 2 * d;
        let expert = match self.expert {
            ExpertKind::Mlp => 2 * d * f + b * (f + d),
            ExpertKind::Swiglu => 3 * d * f,
        };
        let dense = 2 * d * f + b * (f + d);
        let mut total = v * d + self.seq_len * d + d + b * d;
        let mut active = v * d + d + b * d;
        for l in 0..self.n_layer {
            total += attn + ln;
            active += attn + ln;
            if self.is_moe_layer(l) {
                total += d * e + e * expert + usize::from(self.balance_bias) * e;
                active += d * e + self.active_experts() * expert;
            } else {
                total += dense;
                active += dense;
            }
        }
        (total, active)
    }

    /// Model FLOPs per trained token (forward + backward), nanoGPT's estimate:
    /// 6 · active parameters + 12 · layers · d_model · seq_len.
    pub fn flops_per_token(&self) -> f64 {
        let (_, active) = self.param_counts();
        6.0 * active as f64 + 12.0 * (self.n_layer * self.d_model * self.seq_len) as f64
    }
}

/// Where the training text comes from and how it is tokenised.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// A file or folder of text / JSONL / Parquet; empty = use `dataset`.
    pub path: String,
    /// `builtin` (the synthetic topic corpus), `tinystories`, `wikitext-103`,
    /// `wikitext-2` or `ptb`. Ignored when `path` is set.
    pub dataset: String,
    /// `auto` (bytes for `builtin`, else gpt2), `gpt2`, `bytes`, or a path to a `tokenizer.json`.
    pub tokenizer: String,
    /// Fraction held out for validation when the corpus has no split files.
    pub val_fraction: f64,
    /// Token cache folder; empty = `$MOESCOPE_CACHE` or `~/.cache/moescope`.
    pub cache_dir: String,
    /// Size of the built-in corpus in bytes of text.
    pub builtin_bytes: usize,
    /// Number of topics of the built-in corpus.
    pub builtin_topics: usize,
}

impl Default for DataConfig {
    fn default() -> Self {
        DataConfig {
            path: String::new(),
            dataset: "builtin".into(),
            tokenizer: "auto".into(),
            val_fraction: 0.05,
            cache_dir: String::new(),
            builtin_bytes: 2_000_000,
            builtin_topics: 4,
        }
    }
}

/// Optimiser, schedule, evaluation and checkpointing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    pub seed: u64,
    /// Sequences per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimiser step.
    pub grad_accum: usize,
    /// Optimiser steps.
    pub max_steps: usize,
    /// Stop after this many training tokens instead (0 = use `max_steps`).
    pub max_tokens: u64,
    /// Peak learning rate.
    pub lr: f64,
    /// Final learning rate of the cosine decay.
    pub min_lr: f64,
    pub warmup_steps: usize,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// AdamW decoupled weight decay, applied to matrices only (not biases, norms).
    pub weight_decay: f64,
    /// Clip the global gradient norm to this value (0 = off).
    pub grad_clip: f64,
    /// Evaluate every this many steps (0 = only at the end).
    pub eval_every: usize,
    /// Validation tokens per evaluation (0 = the whole validation split).
    pub eval_tokens: usize,
    /// Log a metrics row every this many steps.
    pub log_every: usize,
    /// Save a checkpoint every this many steps (0 = only at the end).
    pub checkpoint_every: usize,
    /// Checkpoints kept on disk (the newest ones).
    pub keep_checkpoints: usize,
    /// `cpu`, `cuda` or `cuda:N`.
    pub device: String,
    /// CPU threads (0 = all cores).
    pub threads: usize,
    /// Progressive top-k (SMoE-Dropout): the number of experts per token grows
    /// linearly from this to `model.top_k` over training; 0 = off. Evaluation
    /// uses `model.top_k`.
    pub topk_start: usize,
    /// Training engine: `auto` (the fused CPU engine when it covers the
    /// config, else autodiff), `fused` (that engine, or an error saying what
    /// it lacks) or `autodiff` (the reference path, every feature).
    pub engine: String,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            seed: 0,
            batch_size: 8,
            grad_accum: 1,
            max_steps: 200,
            max_tokens: 0,
            lr: 5e-4,
            min_lr: 5e-5,
            warmup_steps: 20,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
            grad_clip: 1.0,
            eval_every: 100,
            eval_tokens: 0,
            log_every: 10,
            checkpoint_every: 100,
            keep_checkpoints: 2,
            device: "cpu".into(),
            threads: 0,
            topk_start: 0,
            engine: "auto".into(),
        }
    }
}

impl TrainConfig {
    /// Check values; errors name the field.
    pub fn validate(&self) -> Result<()> {
        if !["auto", "fused", "autodiff"].contains(&self.engine.as_str()) {
            return Err(Error::config(
                "train.engine",
                format!(
                    "unknown engine `{}` (known: auto, fused, autodiff)",
                    self.engine
                ),
            ));
        }
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

    /// The number of optimiser steps this config trains for.
    pub fn total_steps(&self, seq_len: usize) -> usize {
        if self.max_tokens > 0 {
            let per_step = (self.batch_size * self.grad_accum * seq_len) as u64;
            self.max_tokens.div_ceil(per_step) as usize
        } else {
            self.max_steps
        }
    }
}

/// Regularisers added to the LM loss.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RegConfig {
    /// λ of the orthogonality loss λ · L_orth (SPEC eq. 1); 0 = off (and free).
    pub orth_lambda: f64,
    /// Matrix family L_orth acts on: `up`, `gate` (SwiGLU), `down` or `router`.
    pub orth_family: String,
    /// λ of the activation-space regulariser: SPEC's activation MSO of the
    /// routed expert outputs on the training batch, mean over MoE layers.
    pub act_lambda: f64,
    /// λ of gradient-space orthogonality: Σ_{i<j} cos²(g_i, g_j) of the
    /// experts' gradients of `grad_family`, applied to the update (see README).
    pub grad_lambda: f64,
    pub grad_family: String,
    /// λ of the contrastive expert-output loss (InfoNCE against expert centroids).
    pub contrastive_lambda: f64,
    /// Temperature τ of that loss.
    pub contrastive_temperature: f64,
    /// λ on −H(p̄): maximise the batch-level expert-selection entropy.
    pub entropy_lambda: f64,
    /// λ on the mean per-token router entropy (positive: sharper routing;
    /// negative: softer).
    pub token_entropy_lambda: f64,
    /// λ of the Switch-Transformer load-balancing loss E · Σ_e f_e P_e.
    pub aux_lambda: f64,
    /// λ of the router z-loss mean_t (logsumexp z_t)².
    pub z_lambda: f64,
    /// Loss-free balancing: after each step b_e += γ · sign(mean load − load_e); 0 = off.
    pub loss_free_gamma: f64,
}

impl Default for RegConfig {
    fn default() -> Self {
        RegConfig {
            orth_lambda: 0.0,
            orth_family: "up".into(),
            act_lambda: 0.0,
            grad_lambda: 0.0,
            grad_family: "up".into(),
            contrastive_lambda: 0.0,
            contrastive_temperature: 0.1,
            entropy_lambda: 0.0,
            token_entropy_lambda: 0.0,
            aux_lambda: 0.0,
            z_lambda: 0.0,
            loss_free_gamma: 0.0,
        }
    }
}

/// Measures logged at every evaluation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MeasureConfig {
    /// Validation tokens (a fixed, seeded set of eval windows) on which activation
    /// overlap and routing telemetry are captured during evaluation; 0 = off.
    pub tokens: usize,
    /// Seed choosing those windows.
    pub seed: u64,
    /// Weight-overlap families logged (`up`, `gate`, `down`, `router`).
    pub families: Vec<String>,
    /// At the end of training, run every measure (as `moescope analyze`) on the
    /// validation split and write `analysis.json` into the run folder.
    pub final_analysis: bool,
    /// Validation tokens for that analysis.
    pub analysis_tokens: usize,
    /// Jacobian mode of that analysis: exact, estimate, estimate:M, auto, off.
    pub jacobian: String,
    /// Subspace option of that analysis: RANK, var:τ, var:τ:CAP, off.
    pub subspace: String,
}

impl Default for MeasureConfig {
    fn default() -> Self {
        MeasureConfig {
            tokens: 4096,
            seed: 0,
            families: vec!["up".into(), "router".into()],
            final_analysis: false,
            analysis_tokens: 2048,
            jacobian: "auto".into(),
            subspace: "16".into(),
        }
    }
}

/// A whole run's configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The preset this config started from (informational).
    pub preset: String,
    pub model: ModelConfig,
    pub data: DataConfig,
    pub train: TrainConfig,
    pub reg: RegConfig,
    pub measure: MeasureConfig,
}

/// Names of the built-in presets.
pub const PRESETS: &[&str] = &["tiny", "small", "paper"];

impl Config {
    /// A named preset: `tiny` (tests, seconds to a minute), `small` (about a
    /// quarter of the paper's width; thousands of steps in under an hour on 2
    /// cores) or `paper` (the study's NanoGPT-MoE, ~130M parameters).
    pub fn preset(name: &str) -> Result<Config> {
        let mut c = Config {
            preset: name.to_string(),
            ..Default::default()
        };
        match name {
            "tiny" => {
                // Same shapes as the PyTorch peer's `tiny`.
                c.model = ModelConfig::default();
                c.train.max_steps = 80;
                c.train.lr = 1e-3;
                c.train.min_lr = 1e-4;
                c.train.warmup_steps = 10;
                c.train.eval_every = 40;
                c.train.checkpoint_every = 40;
                c.train.eval_tokens = 16_384;
            }
            "small" => {
                c.model = ModelConfig {
                    seq_len: 128,
                    n_layer: 6,
                    n_head: 4,
                    d_model: 128,
                    d_ff: 512,
                    ..Default::default()
                };
                c.train.max_steps = 3000;
                c.train.batch_size = 8;
                c.train.warmup_steps = 100;
                c.train.lr = 1e-3;
                c.train.min_lr = 1e-4;
                c.train.eval_every = 500;
                c.train.checkpoint_every = 500;
                c.train.eval_tokens = 65_536;
            }
            "paper" => {
                c.model = ModelConfig {
                    vocab_size: 50257,
                    seq_len: 512,
                    n_layer: 6,
                    n_head: 8,
                    d_model: 512,
                    d_ff: 2048,
                    ..Default::default()
                };
                c.data.tokenizer = "gpt2".into();
                c.train.batch_size = 16;
                c.train.max_steps = 20_000;
                c.train.warmup_steps = 500;
                c.train.eval_every = 1000;
                c.train.checkpoint_every = 1000;
            }
            other => {
                return Err(Error::config(
                    "preset",
                    format!("unknown preset `{other}` (known: {})", PRESETS.join(", ")),
                ))
            }
        }
        Ok(c)
    }

    /// Resolve preset < file < overrides. `preset` = None uses the file's
    /// `preset` key, else `tiny`.
    pub fn resolve(preset: Option<&str>, file: Option<&Path>, sets: &[String]) -> Result<Config> {
        let file_table = match file {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|e| Error::io(p, e))?;
                let t: toml::Table = toml::from_str(&text)
                    .map_err(|e| Error::bad_file(p, format!("not valid TOML: {e}")))?;
                Some((p.display().to_string(), t))
            }
            None => None,
        };
        let file_preset = file_table
            .as_ref()
            .and_then(|(_, t)| t.get("preset"))
            .and_then(|v| v.as_str())
            .map(str::to_string);
        let name = preset
            .map(str::to_string)
            .or(file_preset)
            .unwrap_or_else(|| "tiny".into());
        let base = Config::preset(&name)?;
        let mut table = toml::Table::try_from(&base).expect("config serialises");
        if let Some((origin, t)) = file_table {
            merge_checked(&mut table, &t, "", &origin)?;
        }
        for s in sets {
            apply_set(&mut table, s)?;
        }
        table.insert("preset".into(), toml::Value::String(name));
        let mut cfg: Config = toml::Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| Error::config("config", e.message().to_string()))?;
        cfg.model.balance_bias |= cfg.reg.loss_free_gamma > 0.0;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Check every section.
    /// What in this config the fused CPU training engine
    /// (`train::engine`) does not cover, or `None` when it covers it all.
    pub fn fused_engine_gap(&self) -> Option<&'static str> {
        let (m, r, t) = (&self.model, &self.reg, &self.train);
        let checks: [(bool, &str); 14] = [
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
            (t.device != "cpu", "train.device is not cpu"),
            (
                r.orth_lambda > 0.0 && r.orth_family != "up",
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

    pub fn validate(&self) -> Result<()> {
        self.model.validate()?;
        self.train.validate()?;
        if self.train.engine == "fused" {
            if let Some(why) = self.fused_engine_gap() {
                return Err(Error::config(
                    "train.engine",
                    format!("the fused engine cannot train this config: {why}; use \"auto\" or \"autodiff\""),
                ));
            }
        }
        if !(self.data.val_fraction > 0.0 && self.data.val_fraction < 1.0) {
            return Err(Error::config(
                "data.val_fraction",
                "must lie strictly between 0 and 1",
            ));
        }
        let r = &self.reg;
        for (key, v) in [
            ("orth_lambda", r.orth_lambda),
            ("act_lambda", r.act_lambda),
            ("grad_lambda", r.grad_lambda),
            ("contrastive_lambda", r.contrastive_lambda),
            ("entropy_lambda", r.entropy_lambda),
            ("aux_lambda", r.aux_lambda),
            ("z_lambda", r.z_lambda),
            ("loss_free_gamma", r.loss_free_gamma),
        ] {
            if !(v >= 0.0 && v.is_finite()) {
                return Err(Error::config(
                    format!("reg.{key}"),
                    "must be a non-negative number",
                ));
            }
        }
        if !r.token_entropy_lambda.is_finite() {
            return Err(Error::config(
                "reg.token_entropy_lambda",
                "must be a number",
            ));
        }
        if !(r.contrastive_temperature > 0.0 && r.contrastive_temperature.is_finite()) {
            return Err(Error::config(
                "reg.contrastive_temperature",
                "must be a positive number",
            ));
        }
        for (key, fam, lambda) in [
            ("reg.orth_family", &r.orth_family, r.orth_lambda),
            ("reg.grad_family", &r.grad_family, r.grad_lambda),
        ] {
            let f = crate::measures::Family::parse(fam, key)?;
            if f == crate::measures::Family::Gate
                && self.model.expert != ExpertKind::Swiglu
                && lambda > 0.0
            {
                return Err(Error::config(
                    key,
                    "`gate` needs model.expert = \"swiglu\" (MLP experts have no gate)",
                ));
            }
        }
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
        for f in &self.measure.families {
            crate::measures::Family::parse(f, "measure.families")?;
        }
        crate::measures::jacobian::JacobianMode::parse(&self.measure.jacobian)
            .map_err(|e| Error::config("measure.jacobian", e))?;
        crate::measures::subspace::RankRule::parse(&self.measure.subspace)
            .map_err(|e| Error::config("measure.subspace", e))?;
        Ok(())
    }

    /// The config as TOML text.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("config serialises")
    }

    /// Parse a resolved config written by [`Config::to_toml`].
    pub fn from_toml_file(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let c: Config = toml::from_str(&text).map_err(|e| Error::bad_file(path, e.to_string()))?;
        c.validate()?;
        Ok(c)
    }
}

fn known_keys(t: &toml::Table) -> String {
    let mut k: Vec<&str> = t.keys().map(String::as_str).collect();
    k.sort();
    k.join(", ")
}

/// Merge `src` into `dst`, refusing keys that `dst` does not have.
fn merge_checked(
    dst: &mut toml::Table,
    src: &toml::Table,
    prefix: &str,
    origin: &str,
) -> Result<()> {
    for (k, v) in src {
        let path = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        if prefix.is_empty() && k == "preset" {
            continue;
        }
        let Some(slot) = dst.get_mut(k) else {
            return Err(Error::config(
                path,
                format!(
                    "unknown key in {origin} (known keys here: {})",
                    known_keys(dst)
                ),
            ));
        };
        match (slot, v) {
            (toml::Value::Table(d), toml::Value::Table(s)) => merge_checked(d, s, &path, origin)?,
            (toml::Value::Table(_), _) => {
                return Err(Error::config(
                    path,
                    format!("in {origin}: expected a [section], found a value"),
                ))
            }
            (slot, v) => {
                check_type(slot, v, &path, origin)?;
                *slot = coerce(slot, v.clone());
            }
        }
    }
    Ok(())
}

fn coerce(slot: &toml::Value, v: toml::Value) -> toml::Value {
    // `lr = 1` means 1.0 where a float is expected.
    match (slot, &v) {
        (toml::Value::Float(_), toml::Value::Integer(i)) => toml::Value::Float(*i as f64),
        _ => v,
    }
}

fn check_type(slot: &toml::Value, v: &toml::Value, path: &str, origin: &str) -> Result<()> {
    let ok = matches!(
        (slot, v),
        (toml::Value::Float(_), toml::Value::Integer(_))
            | (toml::Value::Float(_), toml::Value::Float(_))
    ) || std::mem::discriminant(slot) == std::mem::discriminant(v);
    if ok {
        Ok(())
    } else {
        Err(Error::config(
            path,
            format!(
                "in {origin}: expected a {}, found {} `{v}`",
                slot.type_str(),
                v.type_str()
            ),
        ))
    }
}

/// Apply one `section.key=value` override. The value is parsed as TOML
/// (`2`, `0.1`, `true`, `"x"`), falling back to a bare string.
pub fn apply_set(table: &mut toml::Table, set: &str) -> Result<()> {
    let origin = format!("--set {set}");
    let Some((key, raw)) = set.split_once('=') else {
        return Err(Error::config(set, "expected --set section.key=value"));
    };
    let key = key.trim();
    let raw = raw.trim();
    let value: toml::Value = toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()));
    let parts: Vec<&str> = key.split('.').collect();
    let mut src = toml::Table::new();
    let mut cur = &mut src;
    for (i, p) in parts.iter().enumerate() {
        if i + 1 == parts.len() {
            cur.insert(p.to_string(), value.clone());
        } else {
            cur = cur
                .entry(p.to_string())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()))
                .as_table_mut()
                .expect("fresh table");
        }
    }
    merge_checked(table, &src, "", &origin)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_validate_and_paper_has_130m_params() {
        for p in PRESETS {
            Config::preset(p).unwrap().validate().unwrap();
        }
        let c = Config::preset("paper").unwrap();
        let (total, _) = c.model.param_counts();
        assert!((120_000_000..140_000_000).contains(&total), "{total}");
    }

    #[test]
    fn overrides_apply_and_unknown_keys_fail() {
        let c = Config::resolve(
            Some("tiny"),
            None,
            &["model.top_k=1".into(), "train.lr=1".into()],
        )
        .unwrap();
        assert_eq!(c.model.top_k, 1);
        assert_eq!(c.train.lr, 1.0);
        let e = Config::resolve(Some("tiny"), None, &["model.topk=1".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("model.topk") && e.contains("top_k"), "{e}");
        let e = Config::resolve(Some("tiny"), None, &["model.top_k=9".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("model.top_k"), "{e}");
        let e = Config::resolve(Some("tiny"), None, &["model.n_head=3".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("model.n_head"), "{e}");
        let e = Config::resolve(Some("tiny"), None, &["model.top_k=two".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("expected a integer"), "{e}");
        let e = Config::resolve(Some("tiny"), None, &["train.engine=jit".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("train.engine") && e.contains("autodiff"), "{e}");
        let e = Config::resolve(
            Some("tiny"),
            None,
            &["train.engine=fused".into(), "reg.aux_lambda=0.01".into()],
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("train.engine") && e.contains("aux_lambda"),
            "{e}"
        );
        assert!(Config::resolve(Some("tiny"), None, &["train.engine=fused".into()]).is_ok());
        let e = Config::resolve(Some("tiny"), None, &["model.routing=dense".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("dense"), "{e}");
        let e = Config::resolve(Some("tiny"), None, &["reg.orth_family=left".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("reg.orth_family"), "{e}");
        let c = Config::resolve(
            Some("tiny"),
            None,
            &[
                "measure.families=[\"down\"]".into(),
                "reg.orth_lambda=0.1".into(),
            ],
        )
        .unwrap();
        assert_eq!(
            (c.measure.families.clone(), c.reg.orth_lambda),
            (vec!["down".to_string()], 0.1)
        );
    }

    #[test]
    fn regulariser_and_routing_options_are_checked() {
        let err = |sets: &[&str]| {
            let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
            Config::resolve(Some("tiny"), None, &sets)
                .unwrap_err()
                .to_string()
        };
        assert!(err(&["reg.aux_lambda=-1"]).contains("reg.aux_lambda"));
        assert!(err(&["reg.loss_free_gamma=0.01", "model.routing=\"soft\""])
            .contains("reg.loss_free_gamma"));
        assert!(
            err(&["model.capacity_factor=1.5", "model.routing=\"soft\""])
                .contains("model.capacity_factor")
        );
        assert!(err(&["train.topk_start=3"]).contains("train.topk_start"));
        assert!(err(&["reg.contrastive_temperature=0"]).contains("reg.contrastive_temperature"));
        assert!(
            err(&["reg.grad_lambda=0.1", "reg.grad_family=\"gate\""]).contains("reg.grad_family")
        );
        // Loss-free balancing switches the bias on; expert choice validates.
        let c = Config::resolve(Some("tiny"), None, &["reg.loss_free_gamma=0.001".into()]).unwrap();
        assert!(c.model.balance_bias);
        let c = Config::resolve(
            Some("tiny"),
            None,
            &["model.routing=\"expert_choice\"".into()],
        )
        .unwrap();
        assert_eq!(c.model.routing, Routing::ExpertChoice);
    }

    #[test]
    fn file_then_overrides_and_roundtrip() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(
            &p,
            "preset = \"small\"\n[model]\ntop_k = 1\n[train]\nlr = 0.002\n",
        )
        .unwrap();
        let c = Config::resolve(None, Some(&p), &["train.seed=7".into()]).unwrap();
        assert_eq!(
            (c.preset.as_str(), c.model.top_k, c.train.lr, c.train.seed),
            ("small", 1, 0.002, 7)
        );
        let back: Config = toml::from_str(&c.to_toml()).unwrap();
        assert_eq!(back, c);
        std::fs::write(&p, "[modle]\ntop_k = 1\n").unwrap();
        let e = Config::resolve(None, Some(&p), &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("modle") && e.contains("c.toml"), "{e}");
    }
}

#[cfg(test)]
mod shipped_configs {
    use super::*;

    /// Every config file shipped in `configs/` resolves.
    #[test]
    fn shipped_configs_resolve() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
        let mut n = 0;
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "toml") {
                Config::resolve(None, Some(&p), &[])
                    .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
                n += 1;
            }
        }
        assert!(n >= 2);
    }
}
