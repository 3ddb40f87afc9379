//! `moescope generate`: continue a prompt with a saved model.

use super::run_data_config;
use anyhow::{bail, Result};
use clap::Args;
use moescope::checkpoint::load_model;
use moescope::data::{tokenizer::Tokenizer, tokenizer_spec};
use moescope::model::sample::{sample, SampleOptions};
use std::path::PathBuf;

#[derive(Args)]
pub struct GenerateArgs {
    /// A run folder, checkpoint folder or model.safetensors.
    #[arg(long)]
    model: PathBuf,
    /// Text to continue.
    #[arg(long, default_value = "")]
    prompt: String,
    /// Tokens to generate.
    #[arg(long, default_value_t = 200)]
    tokens: usize,
    /// Sampling temperature, a finite number ≥ 0 (0 = greedy).
    #[arg(long, default_value_t = 0.8, value_parser = temperature, allow_negative_numbers = true)]
    temperature: f64,
    /// Sample among the k most likely tokens (0 = all).
    #[arg(long, default_value_t = 40)]
    top_k: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
}

/// A sampling temperature: finite and not negative (NaN or ∞ would sample garbage).
fn temperature(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(t) if t.is_finite() && t >= 0.0 => Ok(t),
        Ok(_) => Err(format!(
            "`{s}` is not a finite number ≥ 0 (0 = greedy, 0.8 = the default)"
        )),
        Err(e) => Err(format!("`{s}` is not a number: {e}")),
    }
}

pub fn run(a: GenerateArgs) -> Result<()> {
    let device = moescope::device::parse_device(&a.device)?;
    let (model, run_cfg) = load_model(&a.model, &device)?;
    let data_cfg = run_data_config(&a.model, run_cfg, None);
    let tok = Tokenizer::from_spec(&tokenizer_spec(&data_cfg))?;
    let mut prompt = tok.encode_with_eot(&a.prompt)?;
    if prompt.is_empty() {
        prompt.extend(tok.eot());
    }
    if prompt.is_empty() {
        bail!("empty prompt and the tokenizer has no end-of-text token: give --prompt");
    }
    let opts = SampleOptions {
        temperature: a.temperature,
        top_k: a.top_k,
        seed: a.seed,
    };
    let ids = sample(&model, &prompt, a.tokens, tok.vocab_size(), &opts)?;
    println!("{}{}", a.prompt, tok.decode(&ids));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: GenerateArgs,
    }

    #[test]
    fn temperature_must_be_finite_and_not_negative() {
        for bad in ["nan", "inf", "-1", "x"] {
            let e = Cli::try_parse_from(["g", "--model", "m", "--temperature", bad]);
            let e = e.err().unwrap().to_string();
            assert!(e.contains("--temperature") && e.contains(bad), "{e}");
        }
        for good in ["0", "0.8", "2"] {
            assert!(Cli::try_parse_from(["g", "--model", "m", "--temperature", good]).is_ok());
        }
    }
}
