//! `moescope analyze`: every measure on a moescope model or a Hugging Face
//! checkpoint, written as JSON (and optionally SVG figures).

use super::progress;
use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use moescope::analysis::{self, Analysis, AnalysisRequest};
use moescope::config::{
    ActSpace, AnalysisSpace, Family, Granularity, JacobianMode, Precision, RankRule,
};
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
    /// Jacobian arithmetic: f32 (products in f32, sums in f64; within 1e-5 of
    /// f64) or f64 (the reference, several times slower).
    #[arg(long, default_value = "f32")]
    jacobian_precision: Precision,
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

pub fn run(a: AnalyzeArgs) -> Result<()> {
    // Options (checked by clap) and output paths are checked before any heavy work.
    check_output(&a.out, "--out", false)?;
    if let Some(dir) = &a.figures {
        check_output(dir, "--figures", true)?;
    }
    let req = request(&a);
    let Analysis { report, timings } =
        analysis::run(&req).with_context(|| format!("--model {}", a.model))?;
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
    write_analysis(&a, &report)
}

/// The library's request for these flags.
fn request(a: &AnalyzeArgs) -> AnalysisRequest {
    AnalysisRequest {
        model: a.model.clone(),
        revision: a.revision.clone(),
        layers: a.layers.clone(),
        seq_len: a.seq_len,
        in_memory: a.in_memory,
        data: a.data.clone(),
        token_ids: a.token_ids.clone(),
        tokens: a.tokens,
        families: a.families.clone(),
        batch: a.batch,
        device: a.device.clone(),
        geometry: GeometryOptions {
            jacobian: a.jacobian,
            jacobian_all_pairs: a.jacobian_pairs == JacobianPairs::All,
            jacobian_tokens: a.jacobian_tokens,
            jacobian_precision: a.jacobian_precision,
            spectra_tokens: a.spectra_tokens,
            subspace: a.subspace,
            output_space: a.space == AnalysisSpace::Output,
            weighted: a.weighted,
            null_draws: a.null_draws,
            null_tokens: a.null_tokens,
            act_spaces: a.act_space.clone(),
            granularities: a.granularity.clone(),
            ..Default::default()
        },
        progress: progress(),
        verbose: true,
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

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: AnalyzeArgs,
    }

    /// The Python package starts from `AnalysisRequest::cli_defaults`: it
    /// must be what the flags' defaults give.
    #[test]
    fn the_library_defaults_are_the_flags_defaults() {
        let cli = Cli::parse_from(["analyze", "--model", "m"]);
        let mut from_flags = request(&cli.args);
        from_flags.progress = false;
        from_flags.verbose = false;
        let defaults = AnalysisRequest::cli_defaults("m".into());
        assert_eq!(format!("{from_flags:?}"), format!("{defaults:?}"));
    }
}
