//! moescope: train Mixture-of-Experts language models and measure the geometry
//! of their experts.
//!
//! Layout (dependencies point down the list):
//! - [`config`]: one config struct per concern (`model`, `data`, `train`), presets, TOML, `--set` overrides.
//! - [`kernels`]: numeric kernels on slices (f32/f64) shared by the model's fused ops and the training engine.
//! - [`model`]: the NanoGPT-MoE decoder (attention, router, experts, dropless dispatch).
//! - [`data`]: corpora, tokenisers, token cache, the built-in synthetic corpus, batches.
//! - [`measures`]: weight/activation overlap, telemetry, the orthogonality loss, `analyze` (docs/MEASURES.md).
//! - [`checkpoint`]: safetensors + `config.json` in and out, atomic writes.
//! - [`train`]: AdamW, LR schedule, the training loop, evaluation, resume.
//! - [`experiments`]: sweeps (local workers or Slurm), the results store, statistics, `reproduce` presets.
//! - [`analysis`]: `analyze` as one call (model source, tokens, measures), shared by the CLI and Python.
//! - [`report`]: the study's tables and SVG figures as Markdown and self-contained HTML.
//! - [`bench`]: the training-step benchmark compared with the PyTorch peer.
//!
//! The `moescope` binary (`src/main.rs`) is a thin CLI over these modules.

pub mod analysis;
pub mod bench;
pub mod checkpoint;
pub mod config;
pub mod data;
pub mod device;
pub mod error;
pub mod experiments;
pub mod fsutil;
#[doc(hidden)]
pub mod fuzz;
pub mod hf;
pub mod kernels;
pub mod measures;
pub mod memory;
pub mod metrics;
pub mod model;
pub mod report;
pub mod train;

pub use error::{Error, Result};
