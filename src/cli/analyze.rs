//! `moescope analyze`: every measure on a moescope model or a Hugging Face
//! checkpoint, written as JSON (and optionally SVG figures).

use super::{progress, run_data_config};
use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use moescope::checkpoint::load_model;
use moescope::config::{
    ActSpace, AnalysisSpace, DataConfig, Family, Granularity, JacobianMode, RankRule,
};
use moescope::data::{analysis_tokens, Dataset};
use moescope::hf::{self, analyze::HfOptions, HfCheckpoint, ModelSource};
use moescope::measures::analyze::{self, GeometryOptions, Report};
use std::path::{Path, PathBuf};

#[derive(Args)]
pub struct AnalyzeArgs {
    /// A moescope run/checkpoint folder or model.safetensors; a Hugging Face model folder
    /// (config.json + *.safetensors); or a hub id `org/name` (HF cache, downloaded when online).
    #[arg(long)]
    model: String,
    /// Hugging Face models: only these decoder layers (MoE layers, comma-separated); earlier
    /// layers still run to produce their inputs.
    #[arg(long, value_delimiter = ',')]
    layers: Option<Vec<usize>>,
    /// Hugging Face models: tokens per window (default: min(512, max_position_embeddings)).
    #[arg(long)]
    seq_len: Option<usize>,
    /// Hugging Face models: load every layer first instead of streaming one layer at a time.
    #[arg(long)]
    in_memory: bool,
    /// Hugging Face hub revision (branch, tag or commit) for `org/name`.
    #[arg(long, default_value = "main")]
    revision: String,
    /// Text corpus (file or folder) tokenised with the model's tokenizer; default: a moescope run's own
    /// validation split, or the built-in corpus for Hugging Face models.
    #[arg(long, conflicts_with = "token_ids")]
    data: Option<PathBuf>,
    /// Already tokenised input: a JSON array of integers or a 1-D .npy of integer ids.
    #[arg(long)]
    token_ids: Option<PathBuf>,
    /// Tokens to analyse (the first N of the input) [default: 8192, or all of a shorter input].
    #[arg(long)]
    tokens: Option<usize>,
    /// Weight-overlap families, comma-separated: up, gate, down, router.
    #[arg(long, default_value = "up,gate,down,router", value_delimiter = ',')]
    families: Vec<Family>,
    /// Sequences per forward pass.
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Cross-expert Jacobian alignment: exact, estimate (Hutchinson, 64 probes), estimate:M, auto, off.
    #[arg(long, default_value = "auto")]
    jacobian: JacobianMode,
    /// Jacobian alignment over `all` pairs on every token (gives all three pair
    /// sets, routed, all and gate_weighted, and the shuffled-routing null) or
    /// only the `routed` pairs (cheaper: E(E−1)/2 / (k(k−1)/2) times fewer instances).
    #[arg(long, default_value = "all")]
    jacobian_pairs: JacobianPairs,
    /// Tokens (the first analysed) used for Jacobian alignment.
    #[arg(long, default_value_t = 1024)]
    jacobian_tokens: usize,
    /// Routed tokens per expert whose Jacobian spectrum is computed (0 = none).
    #[arg(long, default_value_t = 16)]
    spectra_tokens: usize,
    /// Expert subspaces: RANK (PCA rank), var:τ (smallest rank reaching τ of the variance, cap 16), var:τ:CAP, or off.
    #[arg(long, default_value = "16")]
    subspace: RankRule,
    /// PCA of the experts' routed `input`s or their `output`s h_e.
    #[arg(long, default_value = "input")]
    space: AnalysisSpace,
    /// Weight each routed row by its gate g_e.
    #[arg(long)]
    weighted: bool,
    /// Draws of each null: the subspace permutation null (experts given random
    /// token sets of their sizes) and the shuffled-routing Jacobian null; 0 = none.
    #[arg(long, default_value_t = 20)]
    null_draws: usize,
    /// Tokens per layer kept as the subspace null's pool (memory: tokens × d × (E+1) floats).
    #[arg(long, default_value_t = 4096)]
    null_tokens: usize,
    /// Spaces of activation overlap, comma-separated: output (the experts'
    /// outputs), hidden (φ(W_up x + b)), hidden_ln (its LayerNorm).
    #[arg(long, value_delimiter = ',', default_value = "output")]
    act_space: Vec<ActSpace>,
    /// Weight-overlap granularities, comma-separated: flat (the whole matrix),
    /// rows, cols.
    #[arg(long, value_delimiter = ',', default_value = "flat")]
    granularity: Vec<Granularity>,
    /// Where to write the JSON report.
    #[arg(long, default_value = "report.json")]
    out: PathBuf,
    /// Also draw the report as SVG figures into this folder (measures by layer, E×E matrices).
    #[arg(long)]
    figures: Option<PathBuf>,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
}

/// Which expert pairs Jacobian alignment covers.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum JacobianPairs {
    Routed,
    All,
}

/// Tokens analysed when `--tokens` is not given (fewer when the input is shorter).
const DEFAULT_TOKENS: usize = 8192;

pub fn run(a: AnalyzeArgs) -> Result<()> {
    // Options (checked by clap) and output paths are checked before any heavy work.
    check_output(&a.out, "--out", false)?;
    if let Some(dir) = &a.figures {
        check_output(dir, "--figures", true)?;
    }
    let geo = GeometryOptions {
        jacobian: a.jacobian,
        jacobian_all_pairs: a.jacobian_pairs == JacobianPairs::All,
        jacobian_tokens: a.jacobian_tokens,
        spectra_tokens: a.spectra_tokens,
        subspace: a.subspace,
        output_space: a.space == AnalysisSpace::Output,
        weighted: a.weighted,
        null_draws: a.null_draws,
        null_tokens: a.null_tokens,
        act_spaces: a.act_space.clone(),
        granularities: a.granularity.clone(),
        ..Default::default()
    };
    let source = ModelSource::detect(&a.model, &a.revision, progress())
        .with_context(|| format!("--model {}", a.model))?;
    match source {
        ModelSource::HuggingFace(dir) => analyze_hf(&a, &dir, &geo),
        ModelSource::Moescope(path) => analyze_moescope(&a, &path, &geo),
    }
}

fn analyze_moescope(a: &AnalyzeArgs, model_path: &Path, geo: &GeometryOptions) -> Result<()> {
    if a.layers.is_some() || a.seq_len.is_some() || a.in_memory {
        bail!("--layers, --seq-len and --in-memory apply to Hugging Face checkpoints; {} is a moescope model", a.model);
    }
    let device = moescope::device::parse_device(&a.device)?;
    let (model, run_cfg) = load_model(model_path, &device)?;
    // The library checks the tokens (empty, out of vocabulary, fewer than --tokens).
    let (tokens, data_desc) = load_tokens(a, || {
        Ok(run_data_config(model_path, run_cfg, a.data.as_deref()))
    })?;
    let source = analyze::Source {
        checkpoint: a.model.clone(),
        data: data_desc.clone(),
        seed: 0,
    };
    let n = tokens_to_analyse(a, tokens.len(), &data_desc)?;
    let report =
        analyze::analyze_with(&model, &tokens, n, a.batch.max(1), &a.families, geo, source)
            .with_context(|| format!("analysing {data_desc}"))?;
    write_analysis(a, &report)
}

fn analyze_hf(a: &AnalyzeArgs, dir: &Path, geo: &GeometryOptions) -> Result<()> {
    if a.device != "cpu" {
        bail!(
            "--device {}: Hugging Face checkpoints are analysed on the CPU",
            a.device
        );
    }
    let ck = HfCheckpoint::open(dir)?;
    let cfg = &ck.cfg;
    describe_hf(a, &ck, geo);
    let (tokens, data_desc) = load_tokens(a, || {
        let Some(tok) = &ck.files.tokenizer else {
            bail!(
                "{} has no tokenizer.json; pass already tokenised input with --token-ids",
                dir.display()
            );
        };
        Ok(DataConfig {
            tokenizer: tok.display().to_string(),
            path: a
                .data
                .as_ref()
                .map(|d| d.display().to_string())
                .unwrap_or_default(),
            ..Default::default()
        })
    })?;
    let opts = HfOptions {
        tokens: tokens_to_analyse(a, tokens.len(), &data_desc)?,
        seq_len: a.seq_len.unwrap_or(cfg.max_position.min(512)),
        batch: a.batch.max(1),
        layers: a.layers.clone(),
        in_memory: a.in_memory,
        progress: progress(),
    };
    let source = analyze::Source {
        checkpoint: format!("{} ({}, {})", a.model, cfg.arch.name(), ck.dtype()),
        data: data_desc.clone(),
        seed: 0,
    };
    let (report, timings) = hf::analyze::analyze(&ck, &tokens, &opts, &a.families, geo, source)
        .with_context(|| format!("analysing {} on {data_desc}", a.model))?;
    for t in &timings {
        eprintln!(
            "layer {:>3}: load {:>7.2} s, compute {:>7.2} s{}",
            t.index,
            t.load_s,
            t.compute_s,
            t.peak_rss_mb
                .map(|m| format!(", peak RSS {m:.0} MiB"))
                .unwrap_or_default()
        );
    }
    if let Some(p) = &report.perplexity {
        eprintln!(
            "next-token loss {:.4}, perplexity {:.2} over {} tokens",
            p.loss, p.ppl, p.tokens
        );
    }
    write_analysis(a, &report)
}

/// The checkpoint's shape, and what Jacobian alignment will cost on it.
fn describe_hf(a: &AnalyzeArgs, ck: &HfCheckpoint, geo: &GeometryOptions) {
    let cfg = &ck.cfg;
    eprintln!(
        "{}: {} ({}), {} layers ({} MoE), {} experts, top-{}, d {}, expert d_ff {}{}",
        a.model,
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
    let jac_tokens = geo.jacobian_tokens.min(a.tokens.unwrap_or(DEFAULT_TOKENS));
    if let Some((mode, flops)) = moescope::measures::jacobian::plan(
        geo.jacobian,
        cfg.hidden_size,
        cfg.moe_d_ff,
        cfg.n_experts,
        2,
        jac_tokens,
        cfg.top_k,
        geo.jacobian_all_pairs,
    ) {
        eprintln!(
            "Jacobian alignment: {mode} mode on {jac_tokens} tokens, about {:.2} TFLOP (f64) per MoE layer; \
             --jacobian-tokens N or --jacobian off for a quicker run",
            flops / 1e12
        );
    }
}

/// The tokens to analyse and where they come from: `--token-ids` as given,
/// else the start of the validation split of the corpus `data_cfg` names
/// (asked for only then). Both kinds of model read the same count.
fn load_tokens(
    a: &AnalyzeArgs,
    data_cfg: impl FnOnce() -> Result<DataConfig>,
) -> Result<(Vec<u32>, String)> {
    if let Some(p) = &a.token_ids {
        return Ok((analyze::read_token_ids(p)?, p.display().to_string()));
    }
    let ds = Dataset::load(&data_cfg()?, progress())?;
    Ok((
        analysis_tokens(&ds.valid, a.tokens.unwrap_or(DEFAULT_TOKENS)),
        format!("{} (validation split)", ds.source),
    ))
}

/// How many of the `available` tokens of `input` to analyse: `--tokens`, or
/// by default 8192, or all of a shorter input (said on stderr). An explicit
/// `--tokens` beyond a `--token-ids` file is refused.
fn tokens_to_analyse(a: &AnalyzeArgs, available: usize, input: &str) -> Result<usize> {
    match a.tokens {
        Some(n) if n > available && a.token_ids.is_some() => bail!(
            "--tokens {n}: {input} holds only {available} tokens; pass --tokens {available} \
             or fewer, or leave --tokens out to analyse the whole file"
        ),
        Some(n) => Ok(n),
        None if available < DEFAULT_TOKENS => {
            eprintln!(
                "{input} holds {available} tokens, fewer than the default --tokens \
                 {DEFAULT_TOKENS}: analysing all of them"
            );
            Ok(available)
        }
        None => Ok(DEFAULT_TOKENS),
    }
}

/// Refuse an output path that cannot be written, before any work: a file
/// path (`folder` false) that is a folder, or a path whose nearest existing
/// ancestor is not a writable folder (missing folders are created later).
fn check_output(path: &Path, flag: &str, folder: bool) -> Result<()> {
    if path.is_dir() != folder && path.exists() {
        match folder {
            true => bail!("{flag} {}: is a file, not a folder", path.display()),
            false => bail!(
                "{flag} {}: is a folder; give a file path, e.g. {}",
                path.display(),
                path.join("report.json").display()
            ),
        }
    }
    let mut dir = if folder {
        path
    } else {
        path.parent().unwrap_or(Path::new(""))
    };
    while !dir.as_os_str().is_empty() && !dir.exists() {
        dir = dir.parent().unwrap_or(Path::new(""));
    }
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    if !dir.is_dir() {
        bail!(
            "{flag} {}: cannot be created, {} is not a folder",
            path.display(),
            dir.display()
        );
    }
    let probe = dir.join(format!(".moescope-write-check-{}", std::process::id()));
    std::fs::File::create(&probe)
        .and_then(|_| std::fs::remove_file(&probe))
        .with_context(|| {
            format!(
                "{flag} {}: cannot write in {}",
                path.display(),
                dir.display()
            )
        })
}

/// The report as JSON at `--out`, its summary table on stderr, and the figures.
fn write_analysis(a: &AnalyzeArgs, report: &Report) -> Result<()> {
    let json = serde_json::to_vec_pretty(report)?;
    moescope::fsutil::write_atomic(&a.out, &json)?;
    eprint!("{}", analyze::summary_table(report));
    eprintln!("report: {}", a.out.display());
    if let Some(dir) = &a.figures {
        let files = moescope::report::analysis::analysis_figures(report, dir)?;
        eprintln!("figures: {} SVG files in {}", files.len(), dir.display());
    }
    Ok(())
}
