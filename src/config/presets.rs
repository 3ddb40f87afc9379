//! The named presets a config starts from.

use super::{Config, ModelConfig};
use crate::{Error, Result};
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
                c.train.max_steps = 10_000; // the study: "10K iterations"
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
}
