//! Pretrained Hugging Face MoE checkpoints: load, run, measure.
//!
//! - [`config`]: `config.json` of each supported `model_type`.
//! - [`weights`]: single or sharded safetensors, read tensor by tensor into f32.
//! - [`model`]: the decoder (RMSNorm, RoPE, grouped-query attention, routed
//!   and shared SwiGLU experts) as transformers defines it.
//! - [`hub`]: `org/name` from the HF cache or the hub.
//! - [`source`]: whether a `--model` argument names a moescope or a Hugging Face model.
//! - [`analyze`]: every measure of `moescope analyze`, layer by layer, so a
//!   model larger than memory is analysed with about one layer resident.
//! - [`synth`]: random checkpoints in exact HF layout (benchmarks, demos).

pub mod analyze;
pub mod config;
pub mod hub;
pub mod model;
pub mod source;
pub mod synth;
pub mod weights;

pub use config::{Arch, HfConfig, ModelFiles};
pub use source::ModelSource;

use crate::{Error, Result};
use candle_core::Tensor;
use model::{DecoderLayer, Head, Rope};
use std::path::Path;
use weights::WeightStore;

/// An opened checkpoint folder: config checked, shard headers read, no
/// weights loaded yet.
#[derive(Debug)]
pub struct HfCheckpoint {
    pub files: ModelFiles,
    pub cfg: HfConfig,
    pub weights: WeightStore,
}

impl HfCheckpoint {
    /// Open a local folder holding config.json and safetensors weights.
    pub fn open(dir: &Path) -> Result<HfCheckpoint> {
        if !dir.is_dir() {
            return Err(Error::bad_file(
                dir,
                "not a folder (expected a Hugging Face model folder with config.json and *.safetensors)",
            ));
        }
        let files = ModelFiles::in_dir(dir);
        if !files.config.is_file() {
            return Err(Error::bad_file(dir, "no config.json in this model folder"));
        }
        let cfg = HfConfig::from_file(&files.config)?;
        let weights = WeightStore::open(dir)?;
        Ok(HfCheckpoint {
            files,
            cfg,
            weights,
        })
    }

    /// Storage dtype of the weights (of the embeddings), e.g. `BF16`.
    pub fn dtype(&self) -> String {
        self.weights
            .dtype_of("model.embed_tokens.weight")
            .map(|d| format!("{d:?}"))
            .unwrap_or_else(|| "?".into())
    }
}

/// A whole checkpoint in memory (small models, tests, `--in-memory`).
#[derive(Debug)]
pub struct HfModel {
    pub cfg: HfConfig,
    /// (V, d).
    pub embed: Tensor,
    pub layers: Vec<DecoderLayer>,
    pub head: Head,
}

impl HfModel {
    /// Load every layer (f32).
    pub fn load(ck: &HfCheckpoint) -> Result<HfModel> {
        Ok(HfModel {
            cfg: ck.cfg.clone(),
            embed: model::load_embeddings(&ck.weights, &ck.cfg)?,
            layers: (0..ck.cfg.n_layers)
                .map(|l| DecoderLayer::load(&ck.weights, &ck.cfg, l))
                .collect::<Result<_>>()?,
            head: Head::load(&ck.weights, &ck.cfg)?,
        })
    }

    /// tokens: b sequences of t ids, row-major -> logits (b·t, V).
    pub fn logits(&self, tokens: &[u32], b: usize, t: usize) -> Result<Tensor> {
        if tokens.len() != b * t {
            return Err(Error::Data(format!(
                "{} token ids given for {b} sequences of {t}",
                tokens.len()
            )));
        }
        if let Some(&bad) = tokens.iter().find(|&&x| x as usize >= self.cfg.vocab_size) {
            return Err(Error::Data(format!(
                "token id {bad} is outside the model's vocabulary of {}",
                self.cfg.vocab_size
            )));
        }
        let rope = Rope::new(self.cfg.head_dim, self.cfg.rope_theta, t)?;
        let mut x = model::embed(&self.embed, tokens)?;
        for layer in &self.layers {
            x = layer.forward(&x, b, t, &rope, false)?.0;
        }
        self.head.logits(&x)
    }
}
