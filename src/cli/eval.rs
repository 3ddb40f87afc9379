//! `moescope eval`: loss and perplexity of a saved model on a split.

use super::train::utf8_path;
use super::{progress, run_data_config};
use anyhow::{bail, Result};
use clap::builder::TypedValueParser;
use clap::Args;
use moescope::checkpoint::load_model;
use moescope::data::{corpus::Split, tokenizer::Tokenizer, Dataset};
use std::path::PathBuf;

#[derive(Args)]
pub struct EvalArgs {
    /// A run folder, checkpoint folder or model.safetensors (with config.json beside it).
    #[arg(long)]
    model: PathBuf,
    /// Corpus to evaluate on (default: the run's own data).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Split: valid or test.
    #[arg(long, default_value = "valid", value_parser = split_parser())]
    split: Split,
    /// Evaluate only the first N target tokens (0 = the whole split).
    #[arg(long, default_value_t = 0)]
    tokens: usize,
    /// Sequences per forward pass.
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
}

/// `valid` or `test` (training data is not evaluated).
fn split_parser() -> impl TypedValueParser<Value = Split> {
    clap::builder::PossibleValuesParser::new(["valid", "test"]).map(|s| match s.as_str() {
        "test" => Split::Test,
        _ => Split::Valid,
    })
}

pub fn run(a: EvalArgs) -> Result<()> {
    let device = moescope::device::parse_device(&a.device)?;
    let (model, run_cfg) = load_model(&a.model, &device)?;
    let data = a.data.as_deref();
    if let Some(d) = data {
        utf8_path("--data", d)?;
    }
    let data_cfg = run_data_config(&a.model, run_cfg, data);
    // The run's own tokenizer.json, read by path (not every path is text).
    let own = a.model.join("tokenizer.json");
    let ds = if own.is_file() {
        Dataset::load_with(&data_cfg, Tokenizer::from_file(&own)?, progress())?
    } else {
        Dataset::load(&data_cfg, progress())?
    };
    if ds.tokenizer.vocab_size() > model.cfg.vocab_size {
        bail!(
            "the data's tokenizer has {} ids but the model only {}",
            ds.tokenizer.vocab_size(),
            model.cfg.vocab_size
        );
    }
    let r = moescope::train::evaluate(&model, ds.split(a.split)?, a.batch.max(1), a.tokens)?;
    let split = a.split.name();
    eprintln!(
        "{} {split}: loss {:.4}, ppl {:.3} over {} tokens",
        ds.source, r.loss, r.ppl, r.tokens
    );
    println!(
        "{}",
        serde_json::json!({"model": a.model.to_string_lossy(), "data": ds.source, "split": split, "loss": r.loss, "ppl": r.ppl, "tokens": r.tokens})
    );
    Ok(())
}
