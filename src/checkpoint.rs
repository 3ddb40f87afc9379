//! Checkpoints: safetensors weights, a Hugging Face-style `config.json`, and
//! the trainer state. Every file is written atomically; a checkpoint folder
//! is written under a temporary name and renamed into place.
//!
//! ```text
//! RUN/
//!   config.toml                 resolved run config
//!   config.json                 model config (HF style; `moescope` holds ours)
//!   model.safetensors           final weights (f32)
//!   metrics.jsonl, summary.json
//!   checkpoints/latest          name of the newest complete checkpoint
//!   checkpoints/step-0000100/   model.safetensors, optimizer.safetensors, state.json
//! ```

use crate::config::{Config, ModelConfig};
use crate::fsutil::write_atomic;
use crate::model::Gpt;
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Trainer state saved beside the weights.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TrainState {
    /// Optimiser steps completed.
    pub step: usize,
    /// Training tokens consumed.
    pub tokens: u64,
    /// Wall-clock seconds spent training so far.
    pub elapsed_s: f64,
    /// The run's seed (batches are a pure function of seed and step).
    pub seed: u64,
}

/// Serialise named tensors to safetensors bytes (f32 unless the tensor is f64).
pub fn safetensors_bytes(
    tensors: &[(String, Tensor)],
    metadata: Option<HashMap<String, String>>,
) -> Result<Vec<u8>> {
    let mut raw: Vec<(String, Vec<u8>, Vec<usize>, safetensors::Dtype)> =
        Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let shape = t.dims().to_vec();
        let (bytes, dt) = if t.dtype() == DType::F64 {
            let v: Vec<f64> = t.flatten_all()?.to_vec1()?;
            (
                v.iter().flat_map(|x| x.to_le_bytes()).collect(),
                safetensors::Dtype::F64,
            )
        } else {
            let v: Vec<f32> = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
            (
                v.iter().flat_map(|x| x.to_le_bytes()).collect(),
                safetensors::Dtype::F32,
            )
        };
        raw.push((name.clone(), bytes, shape, dt));
    }
    let views: Vec<(String, safetensors::tensor::TensorView)> = raw
        .iter()
        .map(|(n, b, s, dt)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*dt, s.clone(), b).expect("valid view"),
            )
        })
        .collect();
    safetensors::serialize(views, metadata).map_err(|e| Error::Data(format!("safetensors: {e}")))
}

/// Read every tensor of a safetensors file.
pub fn read_safetensors(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    read_safetensors_bytes(&bytes, path, device)
}

/// [`read_safetensors`] on the file's bytes; `path` only names the file in errors.
pub fn read_safetensors_bytes(
    bytes: &[u8],
    path: &Path,
    device: &Device,
) -> Result<HashMap<String, Tensor>> {
    let tensors =
        candle_core::safetensors::load_buffer(bytes, device).map_err(|e| Error::Checkpoint {
            path: path.into(),
            msg: format!("not a readable safetensors file ({e}); it may be corrupt or truncated"),
        })?;
    // Weights and optimizer moments are floats; an integer tensor would be
    // converted silently by the loaders.
    if let Some((name, t)) = tensors.iter().find(|(_, t)| !t.dtype().is_float()) {
        return Err(Error::Checkpoint {
            path: path.into(),
            msg: format!("tensor `{name}` is {:?}, not a float type", t.dtype()),
        });
    }
    Ok(tensors)
}

/// The Hugging Face-style `config.json` of a model.
pub fn hf_config_json(m: &ModelConfig) -> serde_json::Value {
    serde_json::json!({
        "model_type": "moescope_nanogpt_moe",
        "architectures": ["NanoGptMoeForCausalLM"],
        "moescope_version": env!("CARGO_PKG_VERSION"),
        "vocab_size": m.vocab_size,
        "max_position_embeddings": m.seq_len,
        "num_hidden_layers": m.n_layer,
        "num_attention_heads": m.n_head,
        "hidden_size": m.d_model,
        "intermediate_size": m.d_ff,
        "num_local_experts": m.n_experts,
        "num_experts_per_tok": m.top_k,
        "norm_topk_prob": m.norm_topk,
        "routing": m.routing,
        "expert_type": m.expert,
        "hidden_act": m.activation,
        "moe_every": m.moe_every,
        "bias": m.bias,
        "layer_norm_epsilon": 1e-5,
        "tie_word_embeddings": true,
        "initializer_range": m.init_std,
        "torch_dtype": "float32",
        "moescope": m,
    })
}

/// Parse our model config out of a `config.json`.
pub fn read_config_json(path: &Path) -> Result<ModelConfig> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    parse_config_json(&text, path)
}

/// [`read_config_json`] on the file's text; `path` only names the file in errors.
pub fn parse_config_json(text: &str, path: &Path) -> Result<ModelConfig> {
    let v: serde_json::Value =
        serde_json::from_str(text).map_err(|e| Error::bad_file(path, format!("not JSON: {e}")))?;
    let m = v.get("moescope").ok_or_else(|| {
        Error::bad_file(path, "no `moescope` field: not a moescope checkpoint (a Hugging Face MoE model is read by `moescope analyze`, not by eval or generate)")
    })?;
    let cfg: ModelConfig = serde_json::from_value(m.clone())
        .map_err(|e| Error::bad_file(path, format!("field `moescope`: {e}")))?;
    cfg.validate()
        .map_err(|e| Error::bad_file(path, e.to_string()))?;
    Ok(cfg)
}

/// Write `model.safetensors` and `config.json` into `dir` atomically.
pub fn save_model(dir: &Path, model: &Gpt) -> Result<()> {
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    let bytes = safetensors_bytes(&model.params.tensors(), Some(meta))?;
    write_atomic(&dir.join("model.safetensors"), &bytes)?;
    let cfg = serde_json::to_vec_pretty(&hf_config_json(&model.cfg)).expect("json");
    write_atomic(&dir.join("config.json"), &cfg)
}

/// Load weights from `path` (a safetensors file) into `model`, checking names and shapes.
pub fn load_weights(model: &Gpt, path: &Path) -> Result<()> {
    let tensors = read_safetensors(path, model.params.device())?;
    model.params.load(&tensors, path)
}

/// The checkpoints folder of a run.
pub fn checkpoints_dir(run: &Path) -> PathBuf {
    run.join("checkpoints")
}

/// The step of a checkpoint folder named `step-N` (any zero padding).
pub fn checkpoint_step(dir: &Path) -> Option<usize> {
    dir.file_name()?
        .to_str()?
        .strip_prefix("step-")?
        .parse()
        .ok()
}

/// The complete checkpoints of a run, oldest first. A `step-N` folder is
/// complete once it exists with its `state.json`: it is written under a
/// temporary name and renamed into place, so the `latest` pointer (written
/// after the rename) is not needed to find it.
pub fn complete_checkpoints(run: &Path) -> Result<Vec<PathBuf>> {
    let dir = checkpoints_dir(run);
    let entries = match std::fs::read_dir(&dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(&dir, e)),
    };
    let mut all: Vec<(usize, PathBuf)> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("state.json").is_file())
        .filter_map(|p| Some((checkpoint_step(&p)?, p)))
        .collect();
    all.sort();
    Ok(all.into_iter().map(|(_, p)| p).collect())
}

/// The newest complete checkpoint of a run, if any.
pub fn latest_checkpoint(run: &Path) -> Result<Option<PathBuf>> {
    Ok(complete_checkpoints(run)?.pop())
}

/// The complete checkpoint of `run` at `step`, named as `step-N` or `N`.
pub fn checkpoint_named(run: &Path, name: &str) -> Result<PathBuf> {
    let all = complete_checkpoints(run)?;
    let want: Option<usize> = name.trim_start_matches("step-").parse().ok();
    if let Some(c) = all
        .iter()
        .find(|c| want.is_some() && checkpoint_step(c) == want)
    {
        return Ok(c.clone());
    }
    let names: Vec<String> = all
        .iter()
        .filter_map(|c| Some(c.file_name()?.to_string_lossy().into_owned()))
        .collect();
    Err(Error::bad_file(
        checkpoints_dir(run),
        format!(
            "no complete checkpoint `{name}` (complete ones: {})",
            if names.is_empty() {
                "none".into()
            } else {
                names.join(", ")
            }
        ),
    ))
}

/// Why resuming from `ckpt` would fail or continue from broken weights: an
/// unreadable file, or a weight or optimiser moment that is not finite.
/// `None` for a sound checkpoint.
pub fn checkpoint_fault(ckpt: &Path) -> Option<String> {
    let check = || -> Result<()> {
        for file in ["model.safetensors", "optimizer.safetensors"] {
            let tensors = read_safetensors(&ckpt.join(file), &Device::Cpu)?;
            let named: Vec<(String, Tensor)> = tensors.into_iter().collect();
            if let Some(name) = first_non_finite(&named)? {
                return Err(non_finite_in(ckpt, file, &name));
            }
        }
        let sp = ckpt.join("state.json");
        let text = std::fs::read_to_string(&sp).map_err(|e| Error::io(&sp, e))?;
        serde_json::from_str::<TrainState>(&text)
            .map_err(|e| Error::bad_file(&sp, format!("corrupt state file: {e}")))?;
        Ok(())
    };
    check().err().map(|e| e.to_string())
}

/// The newest sound checkpoint (see [`checkpoint_fault`]) older than step
/// `before` (any step when `None`).
pub fn newest_sound_checkpoint(run: &Path, before: Option<usize>) -> Result<Option<PathBuf>> {
    let all = complete_checkpoints(run)?;
    Ok(all
        .into_iter()
        .rev()
        .filter(|c| before.is_none_or(|b| checkpoint_step(c).is_some_and(|s| s < b)))
        .find(|c| checkpoint_fault(c).is_none()))
}

/// The name of the first tensor holding a NaN or an infinity.
pub fn first_non_finite(tensors: &[(String, Tensor)]) -> Result<Option<String>> {
    for (name, t) in tensors {
        let v: Vec<f64> = t.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
        if v.iter().any(|x| !x.is_finite()) {
            return Ok(Some(name.clone()));
        }
    }
    Ok(None)
}

/// The error for a non-finite tensor `name` in `file` of checkpoint `ckpt`.
pub fn non_finite_in(ckpt: &Path, file: &str, name: &str) -> Error {
    Error::Checkpoint {
        path: ckpt.join(file),
        msg: format!("`{name}` holds NaN or infinite values"),
    }
}

/// Save a training checkpoint (weights, optimiser moments, state), then
/// point `latest` at it and prune old ones beyond `keep`.
pub fn save_checkpoint(
    run: &Path,
    model: &Gpt,
    optimizer: &[(String, Tensor)],
    state: &TrainState,
    keep: usize,
) -> Result<PathBuf> {
    let dir = checkpoints_dir(run);
    let name = format!("step-{:07}", state.step);
    let final_dir = dir.join(&name);
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    // Temporary folders of a process that was killed mid-write are garbage.
    if let Ok(rd) = std::fs::read_dir(&dir) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(".step-") && e.path() != tmp {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    save_model(&tmp, model)?;
    write_atomic(
        &tmp.join("optimizer.safetensors"),
        &safetensors_bytes(optimizer, None)?,
    )?;
    write_atomic(
        &tmp.join("state.json"),
        &serde_json::to_vec_pretty(state).expect("json"),
    )?;
    if final_dir.exists() {
        std::fs::remove_dir_all(&final_dir).map_err(|e| Error::io(&final_dir, e))?;
    }
    std::fs::rename(&tmp, &final_dir).map_err(|e| Error::io(&final_dir, e))?;
    write_atomic(&dir.join("latest"), name.as_bytes())?;
    prune_checkpoints(run, state.step, keep)?;
    Ok(final_dir)
}

/// Remove the checkpoints beyond the newest `keep` up to `step` (the one
/// just written is always kept), and those after `step`: they belong to a
/// timeline abandoned by `--resume-from` and would be resumed from otherwise.
fn prune_checkpoints(run: &Path, step: usize, keep: usize) -> Result<()> {
    let (mut upto, later): (Vec<PathBuf>, Vec<PathBuf>) = complete_checkpoints(run)?
        .into_iter()
        .partition(|c| checkpoint_step(c).is_some_and(|s| s <= step));
    for c in later {
        let _ = std::fs::remove_dir_all(c);
    }
    while upto.len() > keep.max(1) {
        let _ = std::fs::remove_dir_all(upto.remove(0));
    }
    Ok(())
}

/// Read a checkpoint's trainer state and optimiser tensors.
pub fn load_checkpoint_state(
    ckpt: &Path,
    device: &Device,
) -> Result<(TrainState, HashMap<String, Tensor>)> {
    let sp = ckpt.join("state.json");
    let text = std::fs::read_to_string(&sp).map_err(|e| Error::io(&sp, e))?;
    let state: TrainState = serde_json::from_str(&text).map_err(|e| Error::Checkpoint {
        path: sp.clone(),
        msg: format!("corrupt state file: {e}"),
    })?;
    let opt = read_safetensors(&ckpt.join("optimizer.safetensors"), device)?;
    Ok((state, opt))
}

/// Where the weights of a model reference live: a run folder (final
/// `model.safetensors`, else its latest checkpoint), a checkpoint folder, or a
/// `.safetensors` file with `config.json` beside it. Returns (config.json, weights).
pub fn resolve_model_files(path: &Path) -> Result<(PathBuf, PathBuf)> {
    if path.is_file() {
        let dir = path.parent().unwrap_or(Path::new("."));
        return Ok((dir.join("config.json"), path.to_path_buf()));
    }
    if !path.is_dir() {
        return Err(Error::Other(format!(
            "{}: no such run, checkpoint folder or .safetensors file",
            path.display()
        )));
    }
    if path.join("model.safetensors").is_file() {
        return Ok((path.join("config.json"), path.join("model.safetensors")));
    }
    if let Some(c) = latest_checkpoint(path)? {
        return Ok((c.join("config.json"), c.join("model.safetensors")));
    }
    Err(Error::Other(format!(
        "{}: no model.safetensors and no checkpoint inside; is this a moescope run folder?",
        path.display()
    )))
}

/// Load a model from a run folder, checkpoint folder or safetensors file.
/// Also returns the run's `config.toml` when there is one.
pub fn load_model(path: &Path, device: &Device) -> Result<(Gpt, Option<Config>)> {
    let (cfg_path, weights) = resolve_model_files(path)?;
    let mcfg = read_config_json(&cfg_path)?;
    let model = Gpt::new(&mcfg, DType::F32, device, 0)?;
    load_weights(&model, &weights)?;
    // The run config lives in the run folder (one or two levels up for checkpoints).
    let run_cfg = [
        Some(path),
        path.parent(),
        path.parent().and_then(Path::parent),
        path.parent().and_then(Path::parent).and_then(Path::parent),
    ]
    .into_iter()
    .flatten()
    .map(|p| p.join("config.toml"))
    .find(|p| p.is_file())
    .map(|p| Config::from_toml_file(&p))
    .transpose()?;
    Ok((model, run_cfg))
}
