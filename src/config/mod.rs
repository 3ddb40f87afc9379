//! Run configuration: `[model]`, `[data]`, `[train]`, `[reg]` and `[measure]`
//! sections.
//!
//! - [`values`]: the typed choices (`Routing`, `Family`, `JacobianMode`, ...).
//! - `presets`: the named presets (`tiny`, `small`, `paper`).
//! - `resolve`: preset < config file < `--set` overrides, resume, TOML in and out.
//! - `overrides`: merging a TOML table or a `--set section.key=value` into a config.
//! - `validate`: the checks; every error names the key at fault.
//!
//! Every key is checked: an unknown key is an error that names it and lists
//! the keys that exist.

mod overrides;
mod presets;
mod resolve;
mod validate;
pub mod values;

pub use overrides::apply_set;
pub use presets::PRESETS;
pub use values::{
    ActSpace, Activation, AnalysisSpace, BadValue, EngineChoice, ExpertKind, Family, Granularity,
    JacobianMode, OrthVariant, Precision, RankRule, Routing,
};

use serde::{Deserialize, Serialize};

/// Model architecture. Names follow docs/MEASURES.md ("Notation").
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
    /// Dropout probability on the embeddings and on each residual branch
    /// (attention and FFN outputs) during training, as nanoGPT's `dropout`.
    /// The first study states none; moescope assumes 0.
    pub dropout: f64,
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
            dropout: 0.0,
        }
    }
}

impl ModelConfig {
    /// Whether layer `l` carries an MoE FFN.
    pub fn is_moe_layer(&self, l: usize) -> bool {
        (l + 1).is_multiple_of(self.moe_every)
    }

    /// Number of experts each token uses.
    pub fn active_experts(&self) -> usize {
        match self.routing {
            Routing::Topk | Routing::ExpertChoice => self.top_k,
            Routing::Soft => self.n_experts,
        }
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
    /// Train on only the first this many tokens of the training split (0 = all).
    pub max_train_tokens: u64,
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
            max_train_tokens: 0,
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
    /// Weight decay of the expert matrices (W_up, W_gate, W_down) alone;
    /// −1 = the same as `weight_decay`.
    pub weight_decay_experts: f64,
    /// Clip the global gradient norm to this value (0 = off).
    pub grad_clip: f64,
    /// Evaluate every this many steps (0 = only at the end).
    pub eval_every: usize,
    /// Also evaluate (and log every measure) at step 0, before training.
    pub eval_at_start: bool,
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
    pub engine: EngineChoice,
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
            weight_decay_experts: -1.0,
            grad_clip: 1.0,
            eval_every: 100,
            eval_at_start: false,
            eval_tokens: 0,
            log_every: 10,
            checkpoint_every: 100,
            keep_checkpoints: 2,
            device: "cpu".into(),
            threads: 0,
            topk_start: 0,
            engine: EngineChoice::Auto,
        }
    }
}

impl TrainConfig {
    /// The weight decay of the expert matrices (`weight_decay_experts`, or
    /// `weight_decay` when that is −1).
    pub fn expert_weight_decay(&self) -> f64 {
        if self.weight_decay_experts == -1.0 {
            self.weight_decay
        } else {
            self.weight_decay_experts
        }
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
    pub orth_family: Family,
    /// The vectors L_orth compares: `flat` (the whole matrix), `rows` or `cols`.
    pub orth_granularity: Granularity,
    /// `normalized` (cos², gradient through the norms), `unnormalized`
    /// (raw inner products) or `detached_norm` (cos², norms held constant).
    pub orth_variant: OrthVariant,
    /// Allow a negative `orth_lambda` (which rewards overlap: what a sign error would do).
    pub orth_allow_negative: bool,
    /// λ of the activation-space regulariser: SPEC's activation MSO of the
    /// routed expert outputs on the training batch, mean over MoE layers.
    pub act_lambda: f64,
    /// λ of gradient-space orthogonality: Σ_{i<j} cos²(g_i, g_j) of the
    /// experts' gradients of `grad_family`, applied to the update (see README).
    pub grad_lambda: f64,
    pub grad_family: Family,
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
            orth_family: Family::Up,
            orth_granularity: Granularity::Flat,
            orth_variant: OrthVariant::Normalized,
            orth_allow_negative: false,
            act_lambda: 0.0,
            grad_lambda: 0.0,
            grad_family: Family::Up,
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
    pub families: Vec<Family>,
    /// Weight-overlap granularities logged (`flat`, `rows`, `cols`), each
    /// under its own key (`weight_mso`, `weight_mso_rows`, `weight_mso_cols`).
    pub granularity: Vec<Granularity>,
    /// Spaces of activation overlap logged (`output`, `hidden`, `hidden_ln`),
    /// each under its own key (`act_mso`, `act_mso_hidden`, `act_mso_hidden_ln`).
    pub act_space: Vec<ActSpace>,
    /// At the end of training, run every measure (as `moescope analyze`) on the
    /// validation split and write `analysis.json` into the run folder.
    pub final_analysis: bool,
    /// Validation tokens for that analysis.
    pub analysis_tokens: usize,
    /// Jacobian mode of that analysis: exact, estimate, estimate:M, auto, off.
    pub jacobian: JacobianMode,
    /// Subspace option of that analysis: RANK, var:τ, var:τ:CAP, off.
    pub subspace: RankRule,
    /// PCA of the experts' routed `input`s or of their `output`s h_e(x)
    /// (soft routing sends every token to every expert, so unweighted input
    /// PCA cannot tell its experts apart).
    pub subspace_space: AnalysisSpace,
    /// Weight each routed row by its gate g_e(x) in that PCA.
    pub subspace_weighted: bool,
    /// Draws of each null of that analysis (subspace permutation null,
    /// shuffled-routing Jacobian null); 0 = none.
    pub null_draws: usize,
}

impl Default for MeasureConfig {
    fn default() -> Self {
        MeasureConfig {
            tokens: 4096,
            seed: 0,
            families: Family::ALL.to_vec(),
            granularity: Granularity::ALL.to_vec(),
            act_space: ActSpace::ALL.to_vec(),
            final_analysis: false,
            analysis_tokens: 2048,
            jacobian: JacobianMode::Auto,
            subspace: RankRule::Fixed(16),
            subspace_space: AnalysisSpace::Input,
            subspace_weighted: false,
            null_draws: 20,
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

#[cfg(test)]
mod tests;
