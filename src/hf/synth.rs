//! Random checkpoints in exact Hugging Face layout (config.json, tensor
//! names, single or sharded safetensors with an index), for benchmarks and
//! for trying the pipeline without downloading anything.
//!
//! Files are streamed tensor by tensor (header first, then each tensor's
//! bytes), so writing a full-size Mixtral layer needs one tensor in memory.

use super::config::{proj_names, HfConfig, QkNorm};
use crate::{Error, Result};
use rand::{Rng, SeedableRng};
use rayon::prelude::*;
use safetensors::Dtype;
use serde_json::{json, Value};
use std::io::Write;
use std::path::Path;

/// Every tensor of `cfg` with its shape, in file order, as transformers names them.
pub fn tensor_shapes(cfg: &HfConfig) -> Vec<(String, Vec<usize>)> {
    let (d, h, kv, hd) = (cfg.hidden_size, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim);
    let mut v = vec![(
        "model.embed_tokens.weight".to_string(),
        vec![cfg.vocab_size, d],
    )];
    let swiglu = |v: &mut Vec<(String, Vec<usize>)>, names: [String; 3], f: usize| {
        let [g, u, dn] = names;
        v.push((format!("{g}.weight"), vec![f, d]));
        v.push((format!("{u}.weight"), vec![f, d]));
        v.push((format!("{dn}.weight"), vec![d, f]));
    };
    for l in 0..cfg.n_layers {
        let p = format!("model.layers.{l}");
        v.push((format!("{p}.input_layernorm.weight"), vec![d]));
        for (name, out) in [("q", h * hd), ("k", kv * hd), ("v", kv * hd)] {
            v.push((format!("{p}.self_attn.{name}_proj.weight"), vec![out, d]));
            if cfg.qkv_bias {
                v.push((format!("{p}.self_attn.{name}_proj.bias"), vec![out]));
            }
        }
        v.push((format!("{p}.self_attn.o_proj.weight"), vec![d, h * hd]));
        if cfg.o_bias {
            v.push((format!("{p}.self_attn.o_proj.bias"), vec![d]));
        }
        match cfg.qk_norm {
            QkNorm::None => {}
            QkNorm::PerHead => {
                v.push((format!("{p}.self_attn.q_norm.weight"), vec![hd]));
                v.push((format!("{p}.self_attn.k_norm.weight"), vec![hd]));
            }
            QkNorm::Full => {
                v.push((format!("{p}.self_attn.q_norm.weight"), vec![h * hd]));
                v.push((format!("{p}.self_attn.k_norm.weight"), vec![kv * hd]));
            }
        }
        v.push((format!("{p}.post_attention_layernorm.weight"), vec![d]));
        if !cfg.moe_layers[l] {
            swiglu(&mut v, proj_names(&format!("{p}.mlp")), cfg.dense_d_ff);
            continue;
        }
        let block = cfg.moe_block(l);
        v.push((format!("{block}.gate.weight"), vec![cfg.n_experts, d]));
        for e in 0..cfg.n_experts {
            swiglu(&mut v, cfg.expert_names(&block, e), cfg.moe_d_ff);
        }
        if let Some(s) = cfg.shared {
            swiglu(&mut v, proj_names(&cfg.shared_prefix(&block)), s.d_ff);
            if s.gated {
                v.push((format!("{block}.shared_expert_gate.weight"), vec![1, d]));
            }
        }
    }
    v.push(("model.norm.weight".to_string(), vec![d]));
    if !cfg.tie_embeddings {
        v.push(("lm_head.weight".to_string(), vec![cfg.vocab_size, d]));
    }
    v
}

/// A Mixtral config.json: full size (Mixtral-8x7B shapes) or tiny, with `layers` layers.
pub fn mixtral_config(layers: usize, full_size: bool) -> Value {
    let (d, f, heads, kv, vocab) = if full_size {
        (4096, 14336, 32, 8, 32000)
    } else {
        (64, 128, 4, 2, 256)
    };
    json!({
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
        "vocab_size": vocab, "hidden_size": d, "intermediate_size": f,
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv,
        "num_local_experts": 8, "num_experts_per_tok": 2, "hidden_act": "silu",
        "max_position_embeddings": 32768, "rms_norm_eps": 1e-5, "rope_theta": 1e6,
        "sliding_window": null, "tie_word_embeddings": false, "torch_dtype": "bfloat16"
    })
}

/// How to write a random checkpoint.
#[derive(Debug, Clone)]
pub struct SynthSpec {
    pub config: Value,
    /// F32, F16 or BF16.
    pub dtype: Dtype,
    /// 1 = `model.safetensors`; more = shards plus `model.safetensors.index.json`.
    pub shards: usize,
    pub seed: u64,
}

/// Write a random checkpoint into `dir` (created). Weights ~ U(±√3·0.02)
/// (std 0.02), norm weights around 1.
pub fn write(dir: &Path, spec: &SynthSpec) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let cfg_path = dir.join("config.json");
    let cfg = HfConfig::from_value(&spec.config, &cfg_path)?;
    let width = match spec.dtype {
        Dtype::F32 => 4,
        Dtype::F16 | Dtype::BF16 => 2,
        other => {
            return Err(Error::config(
                "dtype",
                format!("{other:?}: use F32, F16 or BF16"),
            ));
        }
    };
    crate::fsutil::write_atomic(
        &cfg_path,
        serde_json::to_string_pretty(&spec.config)
            .expect("json")
            .as_bytes(),
    )?;
    let all = tensor_shapes(&cfg);
    let shards = spec.shards.max(1).min(all.len());
    let per = all.len().div_ceil(shards);
    let mut index = serde_json::Map::new();
    for (s, chunk) in all.chunks(per).enumerate() {
        let name = if shards == 1 {
            "model.safetensors".to_string()
        } else {
            format!(
                "model-{:05}-of-{:05}.safetensors",
                s + 1,
                all.len().div_ceil(per)
            )
        };
        for (t, _) in chunk {
            index.insert(t.clone(), json!(name));
        }
        write_shard(&dir.join(&name), chunk, spec, width)?;
    }
    if shards > 1 {
        let v = json!({"metadata": {}, "weight_map": index});
        crate::fsutil::write_atomic(
            &dir.join("model.safetensors.index.json"),
            serde_json::to_string_pretty(&v).expect("json").as_bytes(),
        )?;
    }
    Ok(())
}

fn write_shard(
    path: &Path,
    tensors: &[(String, Vec<usize>)],
    spec: &SynthSpec,
    width: usize,
) -> Result<()> {
    let mut header = serde_json::Map::new();
    let mut off = 0usize;
    for (name, shape) in tensors {
        let n: usize = shape.iter().product::<usize>() * width;
        header.insert(
            name.clone(),
            json!({"dtype": format!("{:?}", spec.dtype), "shape": shape, "data_offsets": [off, off + n]}),
        );
        off += n;
    }
    header.insert("__metadata__".into(), json!({"format": "pt"}));
    let mut h = serde_json::to_vec(&header).expect("json");
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let tmp = path.with_extension("safetensors.tmp");
    let f = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
    let mut w = std::io::BufWriter::with_capacity(1 << 22, f);
    let io = |e| Error::io(&tmp, e);
    w.write_all(&(h.len() as u64).to_le_bytes()).map_err(io)?;
    w.write_all(&h).map_err(io)?;
    for (i, (name, shape)) in tensors.iter().enumerate() {
        let n: usize = shape.iter().product();
        let is_norm = name.ends_with("norm.weight");
        let seed = spec.seed ^ fxhash(name) ^ (i as u64) << 48;
        let bytes = random_bytes(n, is_norm, seed, spec.dtype);
        w.write_all(&bytes).map_err(io)?;
    }
    let f = w
        .into_inner()
        .map_err(|e| Error::io(&tmp, e.into_error()))?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

fn fxhash(s: &str) -> u64 {
    s.bytes().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100000001b3)
    })
}

fn random_bytes(n: usize, norm: bool, seed: u64, dtype: Dtype) -> Vec<u8> {
    const CHUNK: usize = 1 << 16;
    let width = if dtype == Dtype::F32 { 4 } else { 2 };
    let mut out = vec![0u8; n * width];
    let a = 0.02f32 * 3f32.sqrt();
    out.par_chunks_mut(CHUNK * width)
        .enumerate()
        .for_each(|(c, buf)| {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed.wrapping_add(c as u64));
            for b in buf.chunks_exact_mut(width) {
                let u: f32 = rng.random_range(-a..a);
                let x = if norm { 1.0 + u } else { u };
                match dtype {
                    Dtype::F32 => b.copy_from_slice(&x.to_le_bytes()),
                    Dtype::F16 => b.copy_from_slice(&half::f16::from_f32(x).to_le_bytes()),
                    _ => b.copy_from_slice(&half::bf16::from_f32(x).to_le_bytes()),
                }
            }
        });
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hf::HfCheckpoint;

    #[test]
    fn written_checkpoint_opens_with_every_tensor() {
        let dir = tempfile::tempdir().unwrap();
        for shards in [1, 3] {
            let d = dir.path().join(format!("s{shards}"));
            write(
                &d,
                &SynthSpec {
                    config: mixtral_config(2, false),
                    dtype: Dtype::BF16,
                    shards,
                    seed: 1,
                },
            )
            .unwrap();
            let ck = HfCheckpoint::open(&d).unwrap();
            assert_eq!(ck.dtype(), "BF16");
            let names = tensor_shapes(&ck.cfg);
            assert_eq!(ck.weights.names().count(), names.len());
            assert_eq!(d.join("model.safetensors.index.json").is_file(), shards > 1);
        }
    }
}
