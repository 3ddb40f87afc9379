//! `moescope bench hf`: streaming analysis of a random checkpoint in exact
//! Hugging Face layout, timed layer by layer.

use crate::hf::{self, synth};
use crate::Result;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use std::path::Path;
use std::time::Instant;

/// `moescope bench hf`: streaming analysis of a random checkpoint in exact
/// Hugging Face layout (Mixtral-8x7B shapes by default), per layer.
#[derive(Debug, Clone, Serialize)]
pub struct HfBenchResult {
    pub checkpoint: String,
    pub layers: usize,
    /// Size of the checkpoint files on disk (bf16).
    pub disk_gb: f64,
    /// One decoder layer's weights once converted to f32.
    pub layer_f32_gb: f64,
    pub tokens: usize,
    pub seq_len: usize,
    pub in_memory: bool,
    pub per_layer: Vec<crate::hf::analyze::LayerTiming>,
    /// Peak RSS over the layers and the output head.
    pub peak_rss_gb: Option<f64>,
    pub total_s: f64,
}

/// Write (unless present) a random Mixtral-shaped checkpoint of `layers`
/// layers into `dir`, then analyse it layer by layer on random tokens.
pub fn bench_hf(
    dir: &Path,
    layers: usize,
    full_size: bool,
    tokens: usize,
    seq_len: usize,
    in_memory: bool,
    geo: &crate::measures::analyze::GeometryOptions,
) -> Result<HfBenchResult> {
    write_checkpoint_unless_present(dir, layers, full_size)?;
    let ck = hf::HfCheckpoint::open(dir)?;
    let disk = dir_bytes(dir)?;
    let layer_params: usize = synth::tensor_shapes(&ck.cfg)
        .iter()
        .filter(|(n, _)| n.starts_with("model.layers.0."))
        .map(|(_, s)| s.iter().product::<usize>())
        .sum();
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let ids: Vec<u32> = (0..tokens + 1)
        .map(|_| rng.random_range(0..ck.cfg.vocab_size as u32))
        .collect();
    let opts = hf::analyze::HfOptions {
        tokens,
        seq_len,
        batch: 4,
        layers: None,
        in_memory,
        progress: std::io::IsTerminal::is_terminal(&std::io::stderr()),
    };
    let t0 = Instant::now();
    let source = crate::measures::analyze::Source {
        checkpoint: dir.display().to_string(),
        data: "random tokens".into(),
        seed: 1,
    };
    let families = [crate::measures::Family::Up, crate::measures::Family::Router];
    let (_, per_layer) = hf::analyze::analyze(&ck, &ids, &opts, &families, geo, source)?;
    // Streaming resets the peak counter per layer; the last reading covers the output head.
    let layer_peak = per_layer
        .iter()
        .filter_map(|t| t.peak_rss_mb)
        .fold(0.0, f64::max)
        * (1 << 20) as f64
        / 1e9;
    let peak_rss_gb = crate::memory::peak_rss_bytes().map(|b| (b as f64 / 1e9).max(layer_peak));
    Ok(HfBenchResult {
        checkpoint: dir.display().to_string(),
        layers,
        disk_gb: disk as f64 / 1e9,
        layer_f32_gb: layer_params as f64 * 4.0 / 1e9,
        tokens,
        seq_len,
        in_memory,
        per_layer,
        peak_rss_gb,
        total_s: t0.elapsed().as_secs_f64(),
    })
}

/// The file that marks a folder as this benchmark's random checkpoint, which
/// it may overwrite.
const BENCH_MARK: &str = ".moescope-bench";

/// Write the random Mixtral-shaped checkpoint into `dir` unless an openable
/// one with the same config.json is already there. A non-empty folder that
/// holds no benchmark checkpoint (a real model, say) is refused untouched.
fn write_checkpoint_unless_present(dir: &Path, layers: usize, full_size: bool) -> Result<()> {
    let config = synth::mixtral_config(layers, full_size);
    let want = serde_json::to_string_pretty(&config).expect("json");
    let have = std::fs::read_to_string(dir.join("config.json")).ok();
    let same = have.as_deref() == Some(want.as_str());
    if !same && !dir.join(BENCH_MARK).is_file() {
        refuse_non_empty(dir)?;
    }
    if !same || hf::HfCheckpoint::open(dir).is_err() {
        eprintln!(
            "writing a random Mixtral-shaped checkpoint ({layers} layers) to {}",
            dir.display()
        );
        let t0 = Instant::now();
        synth::write(
            dir,
            &synth::SynthSpec {
                config,
                dtype: safetensors::Dtype::BF16,
                shards: layers + 1,
                seed: 0,
            },
        )?;
        crate::fsutil::write_atomic(&dir.join(BENCH_MARK), b"moescope bench hf\n")?;
        eprintln!("written in {:.0} s", t0.elapsed().as_secs_f64());
    }
    Ok(())
}

/// Refuse a folder with anything in it.
fn refuse_non_empty(dir: &Path) -> Result<()> {
    let mut names: Vec<String> = match std::fs::read_dir(dir) {
        Ok(rd) => rd
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect(),
        Err(_) => return Ok(()),
    };
    if names.is_empty() {
        return Ok(());
    }
    names.sort();
    names.truncate(5);
    Err(crate::Error::bad_file(
        dir,
        format!(
            "not a folder written by `bench hf` (it holds {}); nothing there was changed: pass an empty or new --dir",
            names.join(", ")
        ),
    ))
}

/// Total size of the files directly in `dir`.
fn dir_bytes(dir: &Path) -> Result<u64> {
    Ok(std::fs::read_dir(dir)
        .map_err(|e| crate::Error::io(dir, e))?
        .filter_map(|e| e.ok()?.metadata().ok())
        .map(|m| m.len())
        .sum())
}
