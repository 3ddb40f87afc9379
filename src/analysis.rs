//! `analyze` as one library call: resolve a model (a moescope run, a Hugging
//! Face folder or a hub id), read the tokens it is measured on, and take every
//! measure. The CLI (`moescope analyze`) and the Python package (`moescope.analyze`)
//! both call [`run`], so that they write the same report.

use crate::checkpoint::load_model;
use crate::config::{Config, DataConfig, Family};
use crate::data::token_ids::read_token_ids;
use crate::data::{analysis_tokens, Dataset};
use crate::hf::{self, analyze::HfOptions, analyze::LayerTiming, HfCheckpoint, ModelSource};
use crate::measures::analyze::{self as measures, GeometryOptions, Report};
use crate::{Error, Result};
use std::path::{Path, PathBuf};

/// Tokens analysed when `tokens` is not given (fewer when the input is shorter).
pub const DEFAULT_TOKENS: usize = 8192;

/// What to analyse and how; each field is one flag of `moescope analyze`,
/// and errors name the flag (the Python keyword is its name with `_`).
#[derive(Debug, Clone)]
pub struct AnalysisRequest {
    /// A moescope run/checkpoint folder or model.safetensors, a Hugging Face
    /// model folder, or a hub id `org/name`.
    pub model: String,
    /// Hub revision of a hub id.
    pub revision: String,
    /// Hugging Face models: only these decoder layers.
    pub layers: Option<Vec<usize>>,
    /// Hugging Face models: tokens per window (default min(512, max positions)).
    pub seq_len: Option<usize>,
    /// Hugging Face models: load every layer first instead of streaming.
    pub in_memory: bool,
    /// A text corpus tokenised with the model's tokenizer.
    pub data: Option<PathBuf>,
    /// Already tokenised input (JSON array or 1-D .npy).
    pub token_ids: Option<PathBuf>,
    /// Tokens to analyse (default [`DEFAULT_TOKENS`], or all of a shorter input).
    pub tokens: Option<usize>,
    pub families: Vec<Family>,
    /// Sequences per forward pass.
    pub batch: usize,
    /// `cpu`, `cuda` or `cuda:N` (moescope models only).
    pub device: String,
    pub geometry: GeometryOptions,
    /// Progress bars (downloads, tokenising, layers).
    pub progress: bool,
    /// Notes on stderr: the model's shape, the planned cost, a short input.
    pub verbose: bool,
}

impl Default for AnalysisRequest {
    fn default() -> Self {
        AnalysisRequest {
            model: String::new(),
            revision: "main".into(),
            layers: None,
            seq_len: None,
            in_memory: false,
            data: None,
            token_ids: None,
            tokens: None,
            families: vec![Family::Up, Family::Gate, Family::Down, Family::Router],
            batch: 8,
            device: "cpu".into(),
            geometry: GeometryOptions::default(),
            progress: false,
            verbose: false,
        }
    }
}

impl AnalysisRequest {
    /// `moescope analyze --model MODEL` with every other flag at its default
    /// (the Python package starts from these; a CLI test keeps them equal).
    pub fn cli_defaults(model: String) -> Self {
        use crate::config::{ActSpace, Granularity, JacobianMode, RankRule};
        AnalysisRequest {
            model,
            geometry: GeometryOptions {
                jacobian: JacobianMode::Auto,
                subspace: RankRule::Fixed(16),
                act_spaces: vec![ActSpace::Output],
                granularities: vec![Granularity::Flat],
                ..Default::default()
            },
            ..Default::default()
        }
    }
}

/// An analysis and, for Hugging Face models, the time and memory per layer.
#[derive(Debug, Clone)]
pub struct Analysis {
    pub report: Report,
    pub timings: Vec<LayerTiming>,
}

/// `e` with `what` in front of its message where the message names no file
/// or key of its own; the kind of error (bad data, bad file, ...) is kept.
fn within(what: &str, e: Error) -> Error {
    match e {
        Error::Data(m) => Error::Data(format!("{what}: {m}")),
        Error::Other(m) => Error::Other(format!("{what}: {m}")),
        other => other,
    }
}

/// Analyse the model `req` names.
pub fn run(req: &AnalysisRequest) -> Result<Analysis> {
    let source = ModelSource::detect(&req.model, &req.revision, req.progress)
        .map_err(|e| within(&format!("model {}", req.model), e))?;
    match source {
        ModelSource::HuggingFace(dir) => analyze_hf(req, &dir),
        ModelSource::Moescope(path) => analyze_moescope(req, &path),
    }
}

fn analyze_moescope(req: &AnalysisRequest, model_path: &Path) -> Result<Analysis> {
    if req.layers.is_some() || req.seq_len.is_some() || req.in_memory {
        return Err(Error::Other(format!(
            "--layers, --seq-len and --in-memory apply to Hugging Face checkpoints; {} is a \
             moescope model",
            req.model
        )));
    }
    let device = crate::device::parse_device(&req.device)?;
    let (model, run_cfg) = load_model(model_path, &device)?;
    // The measures check the tokens (empty, out of vocabulary, fewer than asked).
    let (tokens, data_desc) = load_tokens(req, || {
        Ok(run_data_config(model_path, run_cfg, req.data.as_deref()))
    })?;
    let source = measures::Source {
        checkpoint: req.model.clone(),
        data: data_desc.clone(),
        seed: 0,
    };
    let n = tokens_to_analyse(req, tokens.len(), &data_desc)?;
    let report = measures::analyze_with(
        &model,
        &tokens,
        n,
        req.batch.max(1),
        &req.families,
        &req.geometry,
        source,
    )
    .map_err(|e| within(&format!("analysing {data_desc}"), e))?;
    Ok(Analysis {
        report,
        timings: Vec::new(),
    })
}

fn analyze_hf(req: &AnalysisRequest, dir: &Path) -> Result<Analysis> {
    if req.device != "cpu" {
        return Err(Error::Other(format!(
            "--device {}: Hugging Face checkpoints are analysed on the CPU",
            req.device
        )));
    }
    let ck = HfCheckpoint::open(dir)?;
    let cfg = &ck.cfg;
    if req.verbose {
        describe_hf(req, &ck);
    }
    let (tokens, data_desc) = load_tokens(req, || {
        let Some(tok) = &ck.files.tokenizer else {
            return Err(Error::Other(format!(
                "{} has no tokenizer.json; pass already tokenised input with --token-ids",
                dir.display()
            )));
        };
        Ok(DataConfig {
            tokenizer: tok.display().to_string(),
            path: req
                .data
                .as_ref()
                .map(|d| d.display().to_string())
                .unwrap_or_default(),
            ..Default::default()
        })
    })?;
    let opts = HfOptions {
        tokens: tokens_to_analyse(req, tokens.len(), &data_desc)?,
        seq_len: req.seq_len.unwrap_or(cfg.max_position.min(512)),
        batch: req.batch.max(1),
        layers: req.layers.clone(),
        in_memory: req.in_memory,
        progress: req.progress,
    };
    let source = measures::Source {
        checkpoint: format!("{} ({}, {})", req.model, cfg.arch.name(), ck.dtype()),
        data: data_desc.clone(),
        seed: 0,
    };
    let (report, timings) =
        hf::analyze::analyze(&ck, &tokens, &opts, &req.families, &req.geometry, source)
            .map_err(|e| within(&format!("analysing {} on {data_desc}", req.model), e))?;
    Ok(Analysis { report, timings })
}

/// The checkpoint's shape, and what Jacobian alignment will cost on it (stderr).
fn describe_hf(req: &AnalysisRequest, ck: &HfCheckpoint) {
    let cfg = &ck.cfg;
    let geo = &req.geometry;
    eprintln!(
        "{}: {} ({}), {} layers ({} MoE), {} experts, top-{}, d {}, expert d_ff {}{}",
        req.model,
        cfg.arch.name(),
        ck.dtype(),
        cfg.n_layers,
        cfg.n_moe_layers(),
        cfg.n_experts,
        cfg.top_k,
        cfg.hidden_size,
        cfg.moe_d_ff,
        cfg.shared
            .map(|s| format!(", shared expert d_ff {}", s.d_ff))
            .unwrap_or_default()
    );
    let tokens = req.tokens.unwrap_or(DEFAULT_TOKENS);
    let seq = req.seq_len.unwrap_or(cfg.max_position.min(512));
    let forward = tokens as f64 * forward_flops_per_token(cfg, seq);
    let jac_tokens = geo.jacobian_tokens.min(tokens);
    let jacobian = jacobian_plan(geo, cfg, jac_tokens);
    let rate = crate::kernels::gemm::ceiling_gflops() * 1e9 * PLAN_EFFICIENCY;
    let total = forward + jacobian.map_or(0.0, |j| j.1);
    let what = match jacobian {
        Some((mode, flops)) => format!(
            "; Jacobian alignment in {mode} mode on {jac_tokens} tokens (with its random-init null) {:.1} TFLOP \
             (--jacobian-tokens N or --jacobian off for a quicker run)",
            flops / 1e12
        ),
        None => String::new(),
    };
    eprintln!(
        "plan per MoE layer: forward and every expert on every token {:.1} TFLOP{what}; about {:.0} s of compute at {:.0} GFLOP/s \
         ({:.0}% of this machine's measured f32 GEMM rate), plus loading",
        forward / 1e12,
        total / rate,
        rate / 1e9,
        PLAN_EFFICIENCY * 100.0
    );
}

/// The share of the measured GEMM rate the plan assumes a layer's work
/// reaches: on Mixtral-8x7B's shapes the Jacobian ran at 0.9 of it and the
/// candle forward passes at about 0.4 (docs/SPEED.md).
const PLAN_EFFICIENCY: f64 = 0.7;

/// Flops of one token through one decoder layer and its measures outside
/// Jacobian alignment: the attention projections, the causal scores over on
/// average half the window, the router, the top-k experts and every expert
/// once more (the all-pairs activation overlap).
fn forward_flops_per_token(cfg: &crate::hf::HfConfig, seq: usize) -> f64 {
    let (d, hd) = (cfg.hidden_size as f64, cfg.head_dim as f64);
    let (q, kv) = (cfg.n_heads as f64 * hd, cfg.n_kv_heads as f64 * hd);
    let attention = 2.0 * d * (2.0 * q + 2.0 * kv) + 2.0 * q * seq as f64;
    // The routed experts, then every expert again for the all-pairs
    // activation overlap (three matrices each: gated experts).
    let experts = 2.0 * (cfg.top_k + cfg.n_experts) as f64 * 3.0 * d * cfg.moe_d_ff as f64;
    let shared = cfg.shared.map_or(0.0, |s| 6.0 * d * s.d_ff as f64);
    attention + experts + shared + 2.0 * d * cfg.n_experts as f64
}

/// The mode and flops of a layer's Jacobian alignment, its random-init null
/// (all pairs on the first `null_init_tokens` tokens) included.
fn jacobian_plan(
    geo: &crate::measures::analyze::GeometryOptions,
    cfg: &crate::hf::HfConfig,
    tokens: usize,
) -> Option<(&'static str, f64)> {
    let plan = |tokens, all| {
        crate::measures::jacobian::plan(
            geo.jacobian,
            cfg.hidden_size,
            cfg.moe_d_ff,
            cfg.n_experts,
            2,
            tokens,
            cfg.top_k,
            all,
        )
    };
    let (mode, flops) = plan(tokens, geo.jacobian_all_pairs)?;
    let null_tokens = if geo.null_draws > 0 {
        geo.null_init_tokens.min(tokens)
    } else {
        0
    };
    let null = if null_tokens > 0 {
        plan(null_tokens, true).map_or(0.0, |p| p.1)
    } else {
        0.0
    };
    Some((mode, flops + null))
}

/// The tokens to analyse and where they come from: `token_ids` as given,
/// else the start of the validation split of the corpus `data_cfg` names
/// (asked for only then). Both kinds of model read the same count.
fn load_tokens(
    req: &AnalysisRequest,
    data_cfg: impl FnOnce() -> Result<DataConfig>,
) -> Result<(Vec<u32>, String)> {
    if let Some(p) = &req.token_ids {
        return Ok((read_token_ids(p)?, p.display().to_string()));
    }
    let ds = Dataset::load(&data_cfg()?, req.progress)?;
    Ok((
        analysis_tokens(&ds.valid, req.tokens.unwrap_or(DEFAULT_TOKENS)),
        format!("{} (validation split)", ds.source),
    ))
}

/// How many of the `available` tokens of `input` to analyse: `tokens`, or
/// by default [`DEFAULT_TOKENS`], or all of a shorter input. An explicit
/// count beyond a token-ids file is refused.
fn tokens_to_analyse(req: &AnalysisRequest, available: usize, input: &str) -> Result<usize> {
    match req.tokens {
        Some(n) if n > available && req.token_ids.is_some() => Err(Error::Other(format!(
            "--tokens {n}: {input} holds only {available} tokens; pass --tokens {available} \
             or fewer, or leave --tokens out to analyse the whole file"
        ))),
        Some(n) => Ok(n),
        None if available < DEFAULT_TOKENS => {
            if req.verbose {
                eprintln!(
                    "{input} holds {available} tokens, fewer than the default \
                     {DEFAULT_TOKENS}: analysing all of them"
                );
            }
            Ok(available)
        }
        None => Ok(DEFAULT_TOKENS),
    }
}

/// The data config of a saved model's run (defaults when it has none), with the
/// run's own copy of its tokenizer.json and `data` (a corpus path) applied.
pub fn run_data_config(model: &Path, run_cfg: Option<Config>, data: Option<&Path>) -> DataConfig {
    let mut cfg = run_cfg.map(|c| c.data).unwrap_or_default();
    let run_tok = model.join("tokenizer.json");
    if run_tok.is_file() {
        cfg.tokenizer = run_tok.display().to_string();
    }
    if let Some(d) = data {
        cfg.path = d.display().to_string();
    }
    cfg
}
