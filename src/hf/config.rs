//! `config.json` of a Hugging Face MoE checkpoint, read into one description
//! of the architecture that the loader and the forward pass share.
//!
//! Keys and defaults follow transformers' `configuration_<model_type>.py`.

use crate::{Error, Result};
use serde_json::Value;
use std::path::{Path, PathBuf};

/// The `model_type`s moescope can load.
pub const SUPPORTED: &[&str] = &["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek"];

/// A supported architecture.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// Mixtral (Mistral attention, `block_sparse_moe` with w1/w2/w3 experts).
    Mixtral,
    /// Qwen1.5/2-MoE: qkv bias, sigmoid-gated shared expert, sparse step.
    Qwen2Moe,
    /// Qwen3-MoE: per-head q/k RMSNorm, no shared expert.
    Qwen3Moe,
    /// OLMoE: q/k RMSNorm over the whole projection, optional qkv clipping.
    Olmoe,
    /// DeepSeek-MoE (v1, `model_type = "deepseek"`): ungated shared experts,
    /// dense first layers.
    Deepseek,
}

impl Arch {
    /// The `model_type` string.
    pub fn name(self) -> &'static str {
        match self {
            Arch::Mixtral => "mixtral",
            Arch::Qwen2Moe => "qwen2_moe",
            Arch::Qwen3Moe => "qwen3_moe",
            Arch::Olmoe => "olmoe",
            Arch::Deepseek => "deepseek",
        }
    }

    fn parse(s: &str) -> Option<Arch> {
        Some(match s {
            "mixtral" => Arch::Mixtral,
            "qwen2_moe" => Arch::Qwen2Moe,
            "qwen3_moe" => Arch::Qwen3Moe,
            "olmoe" => Arch::Olmoe,
            "deepseek" => Arch::Deepseek,
            _ => return None,
        })
    }
}

/// How queries and keys are normalised before RoPE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QkNorm {
    None,
    /// RMSNorm over each head (Qwen3-MoE), weight (head_dim).
    PerHead,
    /// RMSNorm over the whole projection (OLMoE), weight (heads·head_dim).
    Full,
}

/// Shared (always-on) experts of a MoE layer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SharedSpec {
    /// Hidden width of the (fused) shared expert.
    pub d_ff: usize,
    /// Output scaled by sigmoid(w·x) (Qwen2-MoE's `shared_expert_gate`).
    pub gated: bool,
}

/// Everything the loader and the forward pass need from `config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct HfConfig {
    pub arch: Arch,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub rms_eps: f64,
    pub rope_theta: f64,
    /// Bias on q, k and v projections.
    pub qkv_bias: bool,
    /// Bias on the output projection.
    pub o_bias: bool,
    pub qk_norm: QkNorm,
    /// Clamp q, k, v to ±clip (OLMoE `clip_qkv`).
    pub clip_qkv: Option<f64>,
    /// Mistral sliding-window attention width.
    pub sliding_window: Option<usize>,
    pub max_position: usize,
    pub n_experts: usize,
    pub top_k: usize,
    /// Renormalise the top-k probabilities to sum to one.
    pub norm_topk: bool,
    /// Hidden width of each routed expert.
    pub moe_d_ff: usize,
    /// Hidden width of the dense FFN of non-MoE layers.
    pub dense_d_ff: usize,
    pub shared: Option<SharedSpec>,
    /// Per layer: MoE (true) or dense FFN.
    pub moe_layers: Vec<bool>,
    pub tie_embeddings: bool,
}

/// More layers than any model has: `num_hidden_layers` above this is refused.
pub const MAX_LAYERS: usize = 100_000;

/// Reads typed keys of one config.json, naming the file and the key on error.
struct Keys<'a> {
    path: &'a Path,
    v: &'a Value,
}

impl Keys<'_> {
    fn err(&self, key: &str, msg: impl std::fmt::Display) -> Error {
        Error::bad_file(self.path, format!("field `{key}`: {msg}"))
    }
    fn get(&self, key: &str) -> Option<&Value> {
        self.v.get(key).filter(|v| !v.is_null())
    }
    fn usize(&self, key: &str) -> Result<usize> {
        self.usize_or(key, None)
    }
    fn usize_or(&self, key: &str, default: Option<usize>) -> Result<usize> {
        match self.get(key) {
            None => default.ok_or_else(|| self.err(key, "missing (required for this model_type)")),
            Some(v) => v.as_u64().map(|x| x as usize).ok_or_else(|| {
                self.err(key, format!("expected a non-negative integer, found {v}"))
            }),
        }
    }
    /// The first of `keys` present (transformers renamed some keys across versions).
    fn first_usize(&self, keys: &[&str]) -> Result<usize> {
        match keys.iter().find(|k| self.get(k).is_some()) {
            Some(k) => self.usize(k),
            None => Err(self.err(keys[0], "missing (required for this model_type)")),
        }
    }
    fn f64_or(&self, key: &str, default: f64) -> Result<f64> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v
                .as_f64()
                .ok_or_else(|| self.err(key, format!("expected a number, found {v}"))),
        }
    }
    fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        self.get(key)
            .map(|v| {
                v.as_f64()
                    .ok_or_else(|| self.err(key, format!("expected a number, found {v}")))
            })
            .transpose()
    }
    fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v
                .as_bool()
                .ok_or_else(|| self.err(key, format!("expected true or false, found {v}"))),
        }
    }
    fn usize_list(&self, key: &str) -> Result<Vec<usize>> {
        match self.get(key) {
            None => Ok(Vec::new()),
            Some(Value::Array(a)) => a
                .iter()
                .map(|x| {
                    x.as_u64()
                        .map(|x| x as usize)
                        .ok_or_else(|| self.err(key, format!("expected integers, found {x}")))
                })
                .collect(),
            Some(v) => Err(self.err(key, format!("expected a list of layer indices, found {v}"))),
        }
    }
    fn str_or<'b>(&'b self, key: &str, default: &'b str) -> Result<&'b str> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v
                .as_str()
                .ok_or_else(|| self.err(key, format!("expected a string, found {v}"))),
        }
    }
}

impl HfConfig {
    /// Read and check `config.json`.
    pub fn from_file(path: &Path) -> Result<HfConfig> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        HfConfig::from_text(&text, path)
    }

    /// [`HfConfig::from_file`] on the file's text (`path` is only used in messages).
    pub fn from_text(text: &str, path: &Path) -> Result<HfConfig> {
        let v: Value = serde_json::from_str(text)
            .map_err(|e| Error::bad_file(path, format!("not valid JSON: {e}")))?;
        HfConfig::from_value(&v, path)
    }

    /// Parse a config.json value (`path` is only used in messages).
    ///
    /// Keys are read in a fixed order (common keys, then the family's, then
    /// the rest), so a file with several faults always names the same one.
    pub fn from_value(v: &Value, path: &Path) -> Result<HfConfig> {
        let k = Keys { path, v };
        if v.get("moescope").is_some() {
            return Err(Error::bad_file(
                path,
                "this is a moescope checkpoint, not a Hugging Face one; load it as a moescope model",
            ));
        }
        let arch = read_arch(&k)?;
        check_activation(&k)?;
        let rope_theta = read_rope_theta(&k, arch)?;
        let hidden_size = k.usize("hidden_size")?;
        let n_layers = k.usize("num_hidden_layers")?;
        // The per-layer plan is allocated from this count; a corrupt file
        // claiming 10^18 layers aborted allocating it.
        if n_layers > MAX_LAYERS {
            return Err(k.err(
                "num_hidden_layers",
                format!("{n_layers} is more than {MAX_LAYERS}; is the file corrupt?"),
            ));
        }
        let n_heads = k.usize("num_attention_heads")?;
        let n_kv_heads = k.usize_or("num_key_value_heads", Some(n_heads))?;
        let head_dim = k.usize_or("head_dim", Some(hidden_size / n_heads.max(1)))?;
        let max_position = k.usize_or("max_position_embeddings", Some(4096))?;
        let attention_bias = k.bool_or("attention_bias", false)?;
        let dense_d_ff = k.usize_or("intermediate_size", Some(0))?;
        let family = match arch {
            Arch::Mixtral => mixtral_fields(&k, n_layers)?,
            Arch::Qwen2Moe | Arch::Qwen3Moe => qwen_fields(&k, arch, n_layers, attention_bias)?,
            Arch::Olmoe => olmoe_fields(&k, n_layers, attention_bias)?,
            Arch::Deepseek => deepseek_fields(&k, n_layers, attention_bias)?,
        };
        let cfg = HfConfig {
            arch,
            vocab_size: k.usize("vocab_size")?,
            hidden_size,
            n_layers,
            n_heads,
            n_kv_heads,
            head_dim,
            rms_eps: k.f64_or("rms_norm_eps", 1e-6)?,
            rope_theta,
            qkv_bias: family.qkv_bias,
            o_bias: matches!(arch, Arch::Olmoe | Arch::Qwen3Moe | Arch::Deepseek) && attention_bias,
            qk_norm: family.qk_norm,
            clip_qkv: if arch == Arch::Olmoe {
                k.opt_f64("clip_qkv")?
            } else {
                None
            },
            sliding_window: if arch == Arch::Mixtral {
                read_sliding_window(&k)?
            } else {
                None
            },
            max_position,
            n_experts: family.n_experts,
            top_k: k.usize("num_experts_per_tok")?,
            norm_topk: if arch == Arch::Mixtral {
                true
            } else {
                k.bool_or("norm_topk_prob", family.norm_topk_default)?
            },
            moe_d_ff: family.moe_d_ff,
            dense_d_ff,
            shared: family.shared,
            moe_layers: family.moe_layers,
            tie_embeddings: k.bool_or("tie_word_embeddings", false)?,
        };
        cfg.check(path)?;
        Ok(cfg)
    }

    fn check(&self, path: &Path) -> Result<()> {
        let err = |key: &str, msg: String| Error::bad_file(path, format!("field `{key}`: {msg}"));
        for (key, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.n_layers),
            ("num_attention_heads", self.n_heads),
            ("num_key_value_heads", self.n_kv_heads),
            ("head_dim", self.head_dim),
        ] {
            if v == 0 {
                return Err(err(key, "must be at least 1".into()));
            }
        }
        if !self.n_heads.is_multiple_of(self.n_kv_heads) {
            return Err(err(
                "num_key_value_heads",
                format!(
                    "{} does not divide num_attention_heads = {}",
                    self.n_kv_heads, self.n_heads
                ),
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(err(
                "head_dim",
                format!("{} is odd; RoPE needs an even head size", self.head_dim),
            ));
        }
        if self.moe_layers.iter().any(|&m| m) {
            if self.top_k == 0 || self.top_k > self.n_experts {
                return Err(err(
                    "num_experts_per_tok",
                    format!(
                        "{} is not between 1 and the {} experts",
                        self.top_k, self.n_experts
                    ),
                ));
            }
            if self.moe_d_ff == 0 {
                return Err(err("moe_intermediate_size", "must be at least 1".into()));
            }
        }
        if self.moe_layers.iter().any(|&m| !m) && self.dense_d_ff == 0 {
            return Err(err(
                "intermediate_size",
                "needed for the dense (non-MoE) layers".into(),
            ));
        }
        Ok(())
    }

    /// Number of MoE layers.
    pub fn n_moe_layers(&self) -> usize {
        self.moe_layers.iter().filter(|&&m| m).count()
    }

    /// Tensor-name prefix of layer `l`'s MoE block (Mixtral's
    /// `block_sparse_moe`, everyone else's `mlp`).
    pub fn moe_block(&self, l: usize) -> String {
        if self.arch == Arch::Mixtral {
            format!("model.layers.{l}.block_sparse_moe")
        } else {
            format!("model.layers.{l}.mlp")
        }
    }

    /// [gate, up, down] projection names (before `.weight`) of routed expert `e` of `block`.
    pub fn expert_names(&self, block: &str, e: usize) -> [String; 3] {
        let ep = format!("{block}.experts.{e}");
        if self.arch == Arch::Mixtral {
            [format!("{ep}.w1"), format!("{ep}.w3"), format!("{ep}.w2")]
        } else {
            proj_names(&ep)
        }
    }

    /// Name prefix of the shared expert(s) of `block`.
    pub fn shared_prefix(&self, block: &str) -> String {
        if self.arch == Arch::Qwen2Moe {
            format!("{block}.shared_expert")
        } else {
            format!("{block}.shared_experts")
        }
    }
}

/// `model_type`, which must be one of [`SUPPORTED`].
fn read_arch(k: &Keys) -> Result<Arch> {
    let mt = k.str_or("model_type", "")?;
    Arch::parse(mt).ok_or_else(|| {
        let why = if mt.is_empty() {
            "missing".to_string()
        } else {
            format!("`{mt}` is not supported")
        };
        k.err(
            "model_type",
            format!(
                "{why}; supported: {} (DeepSeek-V2/V3 with multi-head latent attention are not)",
                SUPPORTED.join(", ")
            ),
        )
    })
}

/// `hidden_act`: the experts must be SwiGLU with silu.
fn check_activation(k: &Keys) -> Result<()> {
    let act = k.str_or("hidden_act", "silu")?;
    if act != "silu" {
        return Err(k.err(
            "hidden_act",
            format!("`{act}` is not supported (the experts must be SwiGLU with silu)"),
        ));
    }
    Ok(())
}

/// RoPE base, from `rope_theta` / `rope_scaling` (transformers 4) or
/// `rope_parameters = {rope_theta, rope_type}` (transformers 5); only
/// unscaled RoPE is accepted.
fn read_rope_theta(k: &Keys, arch: Arch) -> Result<f64> {
    let params = k.get("rope_parameters");
    for (key, rs) in [
        ("rope_scaling", k.get("rope_scaling")),
        ("rope_parameters", params),
    ] {
        let Some(rs) = rs else { continue };
        let ty = rs
            .get("rope_type")
            .or_else(|| rs.get("type"))
            .and_then(Value::as_str)
            .unwrap_or("default");
        if ty != "default" {
            return Err(k.err(
                key,
                format!("RoPE type `{ty}` is not supported; only unscaled (`default`) RoPE is"),
            ));
        }
    }
    let theta_default = if arch == Arch::Mixtral { 1e6 } else { 10000.0 };
    Ok(
        match (
            k.get("rope_theta"),
            params.and_then(|p| p.get("rope_theta")),
        ) {
            (Some(_), _) => k.f64_or("rope_theta", theta_default)?,
            (None, Some(v)) => v.as_f64().ok_or_else(|| {
                k.err(
                    "rope_parameters.rope_theta",
                    format!("expected a number, found {v}"),
                )
            })?,
            (None, None) => theta_default,
        },
    )
}

/// Mistral's `sliding_window`, when set.
fn read_sliding_window(k: &Keys) -> Result<Option<usize>> {
    k.get("sliding_window")
        .map(|v| {
            v.as_u64()
                .map(|x| x as usize)
                .ok_or_else(|| k.err("sliding_window", format!("expected an integer, found {v}")))
        })
        .transpose()
}

/// What the model families spell differently: the MoE layout and a few
/// attention details.
struct FamilyFields {
    n_experts: usize,
    moe_d_ff: usize,
    shared: Option<SharedSpec>,
    moe_layers: Vec<bool>,
    /// `norm_topk_prob` when the file does not say.
    norm_topk_default: bool,
    qk_norm: QkNorm,
    qkv_bias: bool,
}

/// Mixtral: every layer MoE, experts as wide as `intermediate_size`.
fn mixtral_fields(k: &Keys, n_layers: usize) -> Result<FamilyFields> {
    Ok(FamilyFields {
        n_experts: k.first_usize(&["num_local_experts", "num_experts"])?,
        moe_d_ff: k.usize("intermediate_size")?,
        shared: None,
        moe_layers: vec![true; n_layers],
        norm_topk_default: true,
        qk_norm: QkNorm::None,
        qkv_bias: false,
    })
}

/// Qwen2-MoE and Qwen3-MoE: MoE every `decoder_sparse_step`-th layer except
/// `mlp_only_layers`; Qwen2 adds a gated shared expert and qkv bias, Qwen3
/// per-head q/k norms.
fn qwen_fields(
    k: &Keys,
    arch: Arch,
    n_layers: usize,
    attention_bias: bool,
) -> Result<FamilyFields> {
    let n = k.first_usize(&["num_experts", "num_local_experts"])?;
    let step = k.usize_or("decoder_sparse_step", Some(1))?.max(1);
    let only = k.usize_list("mlp_only_layers")?;
    let moe_layers = (0..n_layers)
        .map(|l| !only.contains(&l) && n > 0 && (l + 1) % step == 0)
        .collect();
    let shared = if arch == Arch::Qwen2Moe {
        let f = k.usize_or("shared_expert_intermediate_size", Some(0))?;
        (f > 0).then_some(SharedSpec {
            d_ff: f,
            gated: true,
        })
    } else {
        None
    };
    Ok(FamilyFields {
        n_experts: n,
        moe_d_ff: k.usize("moe_intermediate_size")?,
        shared,
        moe_layers,
        norm_topk_default: false,
        qk_norm: if arch == Arch::Qwen3Moe {
            QkNorm::PerHead
        } else {
            QkNorm::None
        },
        qkv_bias: arch == Arch::Qwen2Moe || attention_bias,
    })
}

/// OLMoE: every layer MoE, q/k norms over the whole projection.
fn olmoe_fields(k: &Keys, n_layers: usize, attention_bias: bool) -> Result<FamilyFields> {
    Ok(FamilyFields {
        n_experts: k.first_usize(&["num_experts", "num_local_experts"])?,
        moe_d_ff: k.usize("intermediate_size")?,
        shared: None,
        moe_layers: vec![true; n_layers],
        norm_topk_default: false,
        qk_norm: QkNorm::Full,
        qkv_bias: attention_bias,
    })
}

/// DeepSeek-MoE: softmax scoring only; dense first `first_k_dense_replace`
/// layers, then MoE every `moe_layer_freq`-th; ungated shared experts fused
/// into one of width `n_shared_experts · moe_intermediate_size`.
fn deepseek_fields(k: &Keys, n_layers: usize, attention_bias: bool) -> Result<FamilyFields> {
    let scoring = k.str_or("scoring_func", "softmax")?;
    if scoring != "softmax" {
        return Err(k.err(
            "scoring_func",
            format!("`{scoring}` is not supported (softmax is)"),
        ));
    }
    let n = k.usize("n_routed_experts")?;
    let f = k.usize("moe_intermediate_size")?;
    let first_dense = k.usize_or("first_k_dense_replace", Some(0))?;
    let freq = k.usize_or("moe_layer_freq", Some(1))?.max(1);
    let moe_layers = (0..n_layers)
        .map(|l| n > 0 && l >= first_dense && l % freq == 0)
        .collect();
    let n_shared = k.usize_or("n_shared_experts", Some(0))?;
    let shared_d_ff = f.checked_mul(n_shared).ok_or_else(|| {
        k.err(
            "n_shared_experts",
            format!("{n_shared} shared experts of width {f} overflow the fused width"),
        )
    })?;
    Ok(FamilyFields {
        n_experts: n,
        moe_d_ff: f,
        shared: (n_shared > 0).then_some(SharedSpec {
            d_ff: shared_d_ff,
            gated: false,
        }),
        moe_layers,
        norm_topk_default: false,
        qk_norm: QkNorm::None,
        qkv_bias: attention_bias,
    })
}

/// [gate, up, down] names of a SwiGLU MLP with `gate_proj`/`up_proj`/`down_proj`.
pub fn proj_names(p: &str) -> [String; 3] {
    [
        format!("{p}.gate_proj"),
        format!("{p}.up_proj"),
        format!("{p}.down_proj"),
    ]
}

/// A Hugging Face model folder: config, weights, tokenizer.
#[derive(Debug, Clone)]
pub struct ModelFiles {
    pub dir: PathBuf,
    pub config: PathBuf,
    /// `tokenizer.json`, when the folder has one.
    pub tokenizer: Option<PathBuf>,
}

impl ModelFiles {
    /// The files of a local folder.
    pub fn in_dir(dir: &Path) -> ModelFiles {
        let tok = dir.join("tokenizer.json");
        ModelFiles {
            dir: dir.to_path_buf(),
            config: dir.join("config.json"),
            tokenizer: tok.is_file().then_some(tok),
        }
    }
}

/// True when `config.json` at `path` describes a Hugging Face model rather
/// than a moescope one: a JSON object without the `moescope` key every
/// moescope `config.json` has. One without `model_type` is a Hugging Face
/// config too, so that reading it says `model_type` is missing.
pub fn is_hf_config(path: &Path) -> bool {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|t| serde_json::from_str::<Value>(&t).ok())
        .is_some_and(|v| v.is_object() && v.get("moescope").is_none())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn base() -> Value {
        json!({"model_type": "qwen2_moe", "vocab_size": 100, "hidden_size": 16,
               "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
               "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 8,
               "shared_expert_intermediate_size": 12, "intermediate_size": 20,
               "decoder_sparse_step": 2, "mlp_only_layers": [3]})
    }

    #[test]
    fn qwen2_sparse_layers_follow_step_and_mlp_only() {
        let c = HfConfig::from_value(&base(), Path::new("config.json")).unwrap();
        assert_eq!(c.moe_layers, vec![false, true, false, false]);
        assert_eq!(
            c.shared,
            Some(SharedSpec {
                d_ff: 12,
                gated: true
            })
        );
        assert!(c.qkv_bias && !c.norm_topk);
        assert_eq!(c.head_dim, 4);
    }

    #[test]
    fn transformers_5_keys_are_read() {
        let mut v = base();
        v["model_type"] = json!("qwen3_moe");
        let o = v.as_object_mut().unwrap();
        o.remove("num_experts");
        o.insert("num_local_experts".into(), json!(4));
        o.insert(
            "rope_parameters".into(),
            json!({"rope_theta": 1e6, "rope_type": "default"}),
        );
        let c = HfConfig::from_value(&v, Path::new("c.json")).unwrap();
        assert_eq!((c.n_experts, c.rope_theta), (4, 1e6));
        v["rope_parameters"] = json!({"rope_theta": 1e6, "rope_type": "yarn", "factor": 4.0});
        let e = HfConfig::from_value(&v, Path::new("c.json"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("`rope_parameters`") && e.contains("yarn"), "{e}");
        // Mixtral's default base is 1e6 (configuration_mixtral.py).
        let m = json!({"model_type": "mixtral", "vocab_size": 10, "hidden_size": 8, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "intermediate_size": 4, "num_local_experts": 2,
                       "num_experts_per_tok": 1});
        assert_eq!(
            HfConfig::from_value(&m, Path::new("c.json"))
                .unwrap()
                .rope_theta,
            1e6
        );
    }

    #[test]
    fn unsupported_type_lists_supported_ones() {
        let mut v = base();
        v["model_type"] = json!("llama");
        let e = HfConfig::from_value(&v, Path::new("m/config.json"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("m/config.json")
                && e.contains("`llama`")
                && e.contains("mixtral, qwen2_moe"),
            "{e}"
        );
    }

    #[test]
    fn a_config_without_model_type_is_read_as_hf_and_says_it_is_missing() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("config.json");
        let mut v = base();
        v.as_object_mut().unwrap().remove("model_type");
        std::fs::write(&p, v.to_string()).unwrap();
        assert!(is_hf_config(&p));
        let e = HfConfig::from_file(&p).unwrap_err().to_string();
        assert!(e.contains("`model_type`") && e.contains("missing"), "{e}");
        std::fs::write(&p, r#"{"model_type": "moescope", "moescope": {}}"#).unwrap();
        assert!(!is_hf_config(&p));
    }

    #[test]
    fn wrong_types_and_missing_keys_name_the_field() {
        let mut v = base();
        v["hidden_size"] = json!("16");
        let e = HfConfig::from_value(&v, Path::new("c.json"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("`hidden_size`"), "{e}");
        let mut v = base();
        v.as_object_mut().unwrap().remove("num_experts");
        let e = HfConfig::from_value(&v, Path::new("c.json"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("`num_experts`") && e.contains("missing"), "{e}");
        let mut v = base();
        v["num_key_value_heads"] = json!(3);
        let e = HfConfig::from_value(&v, Path::new("c.json"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("does not divide"), "{e}");
    }
}
