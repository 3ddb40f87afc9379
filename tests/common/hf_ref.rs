//! Tiny random Hugging Face checkpoints written from the tests' own
//! description of each architecture (config keys and tensor names as
//! transformers uses them), and an independent float64 forward pass of each
//! architecture that reads the same tensors. Nothing here calls moescope's
//! HF code.

use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::Path;

/// Tensor name -> (shape, values).
pub type Weights = BTreeMap<String, (Vec<usize>, Vec<f64>)>;

/// One tiny config per architecture, each exercising its particular features.
pub fn config(arch: &str) -> Value {
    let base = json!({"vocab_size": 61, "hidden_size": 32, "num_attention_heads": 4,
        "num_key_value_heads": 2, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
        "hidden_act": "silu", "max_position_embeddings": 64, "tie_word_embeddings": false});
    let mut v = base.as_object().unwrap().clone();
    let extra = match arch {
        // Sliding window shorter than the test sequences.
        "mixtral" => {
            json!({"model_type": "mixtral", "num_hidden_layers": 2, "intermediate_size": 24,
            "num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": 5})
        }
        // A dense layer in the middle, gated shared expert, qkv bias, no renormalisation.
        "qwen2_moe" => {
            json!({"model_type": "qwen2_moe", "num_hidden_layers": 3, "intermediate_size": 40,
            "moe_intermediate_size": 16, "shared_expert_intermediate_size": 24, "num_experts": 4,
            "num_experts_per_tok": 2, "norm_topk_prob": false, "decoder_sparse_step": 1,
            "mlp_only_layers": [1], "use_sliding_window": false})
        }
        // head_dim ≠ hidden/heads, per-head q/k norm, dense first layer, renormalised top-k.
        "qwen3_moe" => {
            json!({"model_type": "qwen3_moe", "num_hidden_layers": 3, "intermediate_size": 40,
            "moe_intermediate_size": 16, "num_experts": 6, "num_experts_per_tok": 2, "head_dim": 12,
            "norm_topk_prob": true, "decoder_sparse_step": 1, "mlp_only_layers": [0],
            "attention_bias": false})
        }
        // Whole-projection q/k norm and qkv clipping.
        "olmoe" => json!({"model_type": "olmoe", "num_hidden_layers": 2, "intermediate_size": 16,
            "num_experts": 6, "num_experts_per_tok": 3, "norm_topk_prob": false, "clip_qkv": 0.8,
            "num_key_value_heads": 4}),
        // Dense first layer, two ungated shared experts, tied embeddings.
        "deepseek" => {
            json!({"model_type": "deepseek", "num_hidden_layers": 3, "intermediate_size": 40,
            "moe_intermediate_size": 12, "n_routed_experts": 4, "n_shared_experts": 2,
            "num_experts_per_tok": 2, "first_k_dense_replace": 1, "moe_layer_freq": 1,
            "norm_topk_prob": false, "scoring_func": "softmax", "tie_word_embeddings": true})
        }
        other => panic!("unknown arch {other}"),
    };
    for (k, x) in extra.as_object().unwrap() {
        v.insert(k.clone(), x.clone());
    }
    Value::Object(v)
}

fn u(c: &Value, k: &str) -> usize {
    c[k].as_u64().unwrap_or_else(|| panic!("{k}")) as usize
}

fn arch(c: &Value) -> &str {
    c["model_type"].as_str().unwrap()
}

fn head_dim(c: &Value) -> usize {
    c.get("head_dim")
        .and_then(Value::as_u64)
        .map(|x| x as usize)
        .unwrap_or(u(c, "hidden_size") / u(c, "num_attention_heads"))
}

/// Is layer l a MoE layer (transformers' rules per architecture)?
pub fn is_moe(c: &Value, l: usize) -> bool {
    match arch(c) {
        "mixtral" | "olmoe" => true,
        "qwen2_moe" | "qwen3_moe" => {
            let only: Vec<u64> = c["mlp_only_layers"]
                .as_array()
                .map(|a| a.iter().map(|x| x.as_u64().unwrap()).collect())
                .unwrap_or_default();
            !only.contains(&(l as u64)) && (l + 1).is_multiple_of(u(c, "decoder_sparse_step"))
        }
        "deepseek" => {
            l >= u(c, "first_k_dense_replace") && l.is_multiple_of(u(c, "moe_layer_freq"))
        }
        _ => unreachable!(),
    }
}

fn n_experts(c: &Value) -> usize {
    match arch(c) {
        "mixtral" => u(c, "num_local_experts"),
        "deepseek" => u(c, "n_routed_experts"),
        _ => u(c, "num_experts"),
    }
}

fn expert_ff(c: &Value) -> usize {
    match arch(c) {
        "mixtral" | "olmoe" => u(c, "intermediate_size"),
        _ => u(c, "moe_intermediate_size"),
    }
}

/// Random weights for config `c`, named as in the hub checkpoints.
pub fn random_weights(c: &Value, seed: u64) -> Weights {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut w = Weights::new();
    let mut put =
        |name: String, shape: Vec<usize>, norm: bool, rng: &mut rand_chacha::ChaCha8Rng| {
            let n: usize = shape.iter().product();
            let v = (0..n)
                .map(|_| {
                    let x: f64 = rng.random_range(-0.35..0.35);
                    if norm {
                        1.0 + x
                    } else {
                        x
                    }
                })
                .collect();
            w.insert(name, (shape, v));
        };
    let (d, h, kv, hd, vocab) = (
        u(c, "hidden_size"),
        u(c, "num_attention_heads"),
        u(c, "num_key_value_heads"),
        head_dim(c),
        u(c, "vocab_size"),
    );
    let a = arch(c);
    put(
        "model.embed_tokens.weight".into(),
        vec![vocab, d],
        false,
        &mut rng,
    );
    for l in 0..u(c, "num_hidden_layers") {
        let p = format!("model.layers.{l}");
        put(
            format!("{p}.input_layernorm.weight"),
            vec![d],
            true,
            &mut rng,
        );
        put(
            format!("{p}.post_attention_layernorm.weight"),
            vec![d],
            true,
            &mut rng,
        );
        let qkv_bias = a == "qwen2_moe";
        for (n, out) in [("q", h * hd), ("k", kv * hd), ("v", kv * hd)] {
            put(
                format!("{p}.self_attn.{n}_proj.weight"),
                vec![out, d],
                false,
                &mut rng,
            );
            if qkv_bias {
                put(
                    format!("{p}.self_attn.{n}_proj.bias"),
                    vec![out],
                    false,
                    &mut rng,
                );
            }
        }
        put(
            format!("{p}.self_attn.o_proj.weight"),
            vec![d, h * hd],
            false,
            &mut rng,
        );
        if a == "qwen3_moe" {
            put(
                format!("{p}.self_attn.q_norm.weight"),
                vec![hd],
                true,
                &mut rng,
            );
            put(
                format!("{p}.self_attn.k_norm.weight"),
                vec![hd],
                true,
                &mut rng,
            );
        }
        if a == "olmoe" {
            put(
                format!("{p}.self_attn.q_norm.weight"),
                vec![h * hd],
                true,
                &mut rng,
            );
            put(
                format!("{p}.self_attn.k_norm.weight"),
                vec![kv * hd],
                true,
                &mut rng,
            );
        }
        let mut mlp = |pre: &str, f: usize, names: [&str; 3], rng: &mut rand_chacha::ChaCha8Rng| {
            put(format!("{pre}.{}.weight", names[0]), vec![f, d], false, rng);
            put(format!("{pre}.{}.weight", names[1]), vec![f, d], false, rng);
            put(format!("{pre}.{}.weight", names[2]), vec![d, f], false, rng);
        };
        const PROJ: [&str; 3] = ["gate_proj", "up_proj", "down_proj"];
        if !is_moe(c, l) {
            mlp(
                &format!("{p}.mlp"),
                u(c, "intermediate_size"),
                PROJ,
                &mut rng,
            );
            continue;
        }
        let block = if a == "mixtral" {
            format!("{p}.block_sparse_moe")
        } else {
            format!("{p}.mlp")
        };
        let e_n = n_experts(c);
        let f = expert_ff(c);
        for e in 0..e_n {
            let names = if a == "mixtral" {
                ["w1", "w3", "w2"]
            } else {
                PROJ
            };
            mlp(&format!("{block}.experts.{e}"), f, names, &mut rng);
        }
        if a == "qwen2_moe" {
            mlp(
                &format!("{block}.shared_expert"),
                u(c, "shared_expert_intermediate_size"),
                PROJ,
                &mut rng,
            );
        }
        if a == "deepseek" {
            mlp(
                &format!("{block}.shared_experts"),
                f * u(c, "n_shared_experts"),
                PROJ,
                &mut rng,
            );
        }
        put(
            format!("{block}.gate.weight"),
            vec![e_n, d],
            false,
            &mut rng,
        );
        if a == "qwen2_moe" {
            put(
                format!("{block}.shared_expert_gate.weight"),
                vec![1, d],
                false,
                &mut rng,
            );
        }
    }
    put("model.norm.weight".into(), vec![d], true, &mut rng);
    if !c["tie_word_embeddings"].as_bool().unwrap_or(false) {
        put("lm_head.weight".into(), vec![vocab, d], false, &mut rng);
    }
    w
}

/// Round every value to what `dtype` ("F32" or "BF16") stores.
pub fn rounded(w: &Weights, dtype: &str) -> Weights {
    w.iter()
        .map(|(k, (s, v))| {
            let v = v
                .iter()
                .map(|&x| match dtype {
                    "F32" => x as f32 as f64,
                    "BF16" => half::bf16::from_f64(x).to_f64(),
                    _ => panic!("{dtype}"),
                })
                .collect();
            (k.clone(), (s.clone(), v))
        })
        .collect()
}

/// Write config.json and the weights: `shards` files (1 = model.safetensors)
/// with an index, each tensor stored as `dtype` ("F32" or "BF16").
pub fn write_checkpoint(dir: &Path, c: &Value, w: &Weights, dtype: &str, shards: usize) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(c).unwrap(),
    )
    .unwrap();
    let names: Vec<&String> = w.keys().collect();
    let per = names.len().div_ceil(shards);
    let mut map = serde_json::Map::new();
    let count = names.len().div_ceil(per);
    for (i, chunk) in names.chunks(per).enumerate() {
        let file = if shards == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", i + 1, count)
        };
        let mut bufs: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
        for &name in chunk {
            let (shape, v) = &w[name];
            let bytes: Vec<u8> = match dtype {
                "F32" => v.iter().flat_map(|&x| (x as f32).to_le_bytes()).collect(),
                "BF16" => v
                    .iter()
                    .flat_map(|&x| half::bf16::from_f64(x).to_le_bytes())
                    .collect(),
                _ => panic!("{dtype}"),
            };
            bufs.push((name.clone(), shape.clone(), bytes));
            map.insert(name.clone(), json!(file));
        }
        let dt = if dtype == "F32" {
            safetensors::Dtype::F32
        } else {
            safetensors::Dtype::BF16
        };
        let views: Vec<(String, safetensors::tensor::TensorView)> = bufs
            .iter()
            .map(|(n, s, b)| {
                (
                    n.clone(),
                    safetensors::tensor::TensorView::new(dt, s.clone(), b).unwrap(),
                )
            })
            .collect();
        safetensors::serialize_to_file(views, None, &dir.join(&file)).unwrap();
    }
    if shards > 1 {
        let idx = json!({"metadata": {"total_size": 0}, "weight_map": map});
        std::fs::write(dir.join("model.safetensors.index.json"), idx.to_string()).unwrap();
    }
}

/// What the reference computed.
pub struct RefOut {
    /// Per position (all sequences, row-major): logits over the vocabulary.
    pub logits: Vec<Vec<f64>>,
    /// Per layer: how many tokens selected each expert (empty for dense layers).
    pub loads: Vec<Vec<u64>>,
}

fn rms(x: &[f64], w: &[f64], eps: f64) -> Vec<f64> {
    let ms = x.iter().map(|a| a * a).sum::<f64>() / x.len() as f64;
    let r = 1.0 / (ms + eps).sqrt();
    x.iter().zip(w).map(|(a, b)| a * r * b).collect()
}

/// y = W x (+ b), W: (out, in) row-major.
fn matvec(w: &(Vec<usize>, Vec<f64>), x: &[f64]) -> Vec<f64> {
    let (o, i) = (w.0[0], w.0[1]);
    assert_eq!(i, x.len());
    (0..o)
        .map(|r| {
            w.1[r * i..(r + 1) * i]
                .iter()
                .zip(x)
                .map(|(a, b)| a * b)
                .sum()
        })
        .collect()
}

fn silu(x: f64) -> f64 {
    x / (1.0 + (-x).exp())
}

fn swiglu(w: &Weights, pre: &str, names: [&str; 3], x: &[f64]) -> Vec<f64> {
    let g = matvec(&w[&format!("{pre}.{}.weight", names[0])], x);
    let up = matvec(&w[&format!("{pre}.{}.weight", names[1])], x);
    let hmid: Vec<f64> = g.iter().zip(&up).map(|(a, b)| silu(*a) * b).collect();
    matvec(&w[&format!("{pre}.{}.weight", names[2])], &hmid)
}

fn add(a: &mut [f64], b: &[f64]) {
    for (x, y) in a.iter_mut().zip(b) {
        *x += y;
    }
}

/// The float64 forward pass of `c` on `seqs` (each a sequence of ids).
#[allow(clippy::needless_range_loop)]
pub fn forward(c: &Value, w: &Weights, seqs: &[Vec<u32>]) -> RefOut {
    let a = arch(c);
    let (d, h, kv, hd) = (
        u(c, "hidden_size"),
        u(c, "num_attention_heads"),
        u(c, "num_key_value_heads"),
        head_dim(c),
    );
    let eps = c["rms_norm_eps"].as_f64().unwrap();
    let theta = c["rope_theta"].as_f64().unwrap();
    let n_layers = u(c, "num_hidden_layers");
    let window = if a == "mixtral" {
        c["sliding_window"].as_u64().map(|x| x as usize)
    } else {
        None
    };
    let clip = if a == "olmoe" {
        c["clip_qkv"].as_f64()
    } else {
        None
    };
    let e_n = n_experts(c);
    let k_top = u(c, "num_experts_per_tok");
    let norm_topk = a == "mixtral" || c["norm_topk_prob"].as_bool().unwrap_or(false);
    let mut loads = vec![vec![0u64; e_n]; n_layers];
    let mut logits = Vec::new();
    let rope = |v: &mut [f64], pos: usize| {
        let half = hd / 2;
        for i in 0..half {
            let ang = pos as f64 * theta.powf(-(2.0 * i as f64) / hd as f64);
            let (c0, s0) = (ang.cos(), ang.sin());
            let (x1, x2) = (v[i], v[i + half]);
            v[i] = x1 * c0 - x2 * s0;
            v[i + half] = x2 * c0 + x1 * s0;
        }
    };
    for seq in seqs {
        let t = seq.len();
        let emb = &w["model.embed_tokens.weight"].1;
        let mut xs: Vec<Vec<f64>> = seq
            .iter()
            .map(|&id| emb[id as usize * d..(id as usize + 1) * d].to_vec())
            .collect();
        for l in 0..n_layers {
            let p = format!("model.layers.{l}");
            let at = |n: &str| format!("{p}.self_attn.{n}");
            let mut qs = Vec::new();
            let mut ks = Vec::new();
            let mut vs = Vec::new();
            for x in &xs {
                let a_in = rms(x, &w[&format!("{p}.input_layernorm.weight")].1, eps);
                let proj = |n: &str| {
                    let mut y = matvec(&w[&at(&format!("{n}_proj.weight"))], &a_in);
                    if let Some((_, b)) = w.get(&at(&format!("{n}_proj.bias"))) {
                        add(&mut y, b);
                    }
                    y
                };
                let (mut q, mut k, mut v) = (proj("q"), proj("k"), proj("v"));
                if a == "olmoe" {
                    q = rms(&q, &w[&at("q_norm.weight")].1, eps);
                    k = rms(&k, &w[&at("k_norm.weight")].1, eps);
                }
                if let Some(cl) = clip {
                    for z in q.iter_mut().chain(k.iter_mut()).chain(v.iter_mut()) {
                        *z = z.clamp(-cl, cl);
                    }
                }
                if a == "qwen3_moe" {
                    for hh in 0..h {
                        let r = rms(&q[hh * hd..(hh + 1) * hd], &w[&at("q_norm.weight")].1, eps);
                        q[hh * hd..(hh + 1) * hd].copy_from_slice(&r);
                    }
                    for hh in 0..kv {
                        let r = rms(&k[hh * hd..(hh + 1) * hd], &w[&at("k_norm.weight")].1, eps);
                        k[hh * hd..(hh + 1) * hd].copy_from_slice(&r);
                    }
                }
                qs.push(q);
                ks.push(k);
                vs.push(v);
            }
            for (pos, (q, k)) in qs.iter_mut().zip(ks.iter_mut()).enumerate() {
                for hh in 0..h {
                    rope(&mut q[hh * hd..(hh + 1) * hd], pos);
                }
                for hh in 0..kv {
                    rope(&mut k[hh * hd..(hh + 1) * hd], pos);
                }
            }
            for i in 0..t {
                let mut cat = vec![0.0; h * hd];
                for hh in 0..h {
                    let g = hh / (h / kv);
                    let qi = &qs[i][hh * hd..(hh + 1) * hd];
                    let allowed: Vec<usize> = (0..=i)
                        .filter(|&j| window.is_none_or(|wd| i - j < wd))
                        .collect();
                    let sc: Vec<f64> = allowed
                        .iter()
                        .map(|&j| {
                            qi.iter()
                                .zip(&ks[j][g * hd..(g + 1) * hd])
                                .map(|(a, b)| a * b)
                                .sum::<f64>()
                                / (hd as f64).sqrt()
                        })
                        .collect();
                    let m = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let z: f64 = sc.iter().map(|s| (s - m).exp()).sum();
                    for (&j, s) in allowed.iter().zip(&sc) {
                        let pj = (s - m).exp() / z;
                        for e in 0..hd {
                            cat[hh * hd + e] += pj * vs[j][g * hd + e];
                        }
                    }
                }
                let mut o = matvec(&w[&at("o_proj.weight")], &cat);
                if let Some((_, b)) = w.get(&at("o_proj.bias")) {
                    add(&mut o, b);
                }
                // x is updated after all positions computed their attention (uses qs/ks/vs only).
                add(&mut xs[i], &o);
            }
            for x in xs.iter_mut() {
                let hn = rms(
                    x,
                    &w[&format!("{p}.post_attention_layernorm.weight")].1,
                    eps,
                );
                const PROJ: [&str; 3] = ["gate_proj", "up_proj", "down_proj"];
                let y = if !is_moe(c, l) {
                    swiglu(w, &format!("{p}.mlp"), PROJ, &hn)
                } else {
                    let block = if a == "mixtral" {
                        format!("{p}.block_sparse_moe")
                    } else {
                        format!("{p}.mlp")
                    };
                    let logit = matvec(&w[&format!("{block}.gate.weight")], &hn);
                    let m = logit.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let z: f64 = logit.iter().map(|s| (s - m).exp()).sum();
                    let probs: Vec<f64> = logit.iter().map(|s| (s - m).exp() / z).collect();
                    let mut order: Vec<usize> = (0..e_n).collect();
                    order
                        .sort_by(|&i, &j| probs[j].partial_cmp(&probs[i]).unwrap().then(i.cmp(&j)));
                    let sel = &order[..k_top];
                    let denom: f64 = if norm_topk {
                        sel.iter().map(|&e| probs[e]).sum()
                    } else {
                        1.0
                    };
                    let mut y = vec![0.0; d];
                    for &e in sel {
                        loads[l][e] += 1;
                        let names = if a == "mixtral" {
                            ["w1", "w3", "w2"]
                        } else {
                            PROJ
                        };
                        let out = swiglu(w, &format!("{block}.experts.{e}"), names, &hn);
                        for (yy, o) in y.iter_mut().zip(out) {
                            *yy += probs[e] / denom * o;
                        }
                    }
                    if a == "qwen2_moe" {
                        let s = swiglu(w, &format!("{block}.shared_expert"), PROJ, &hn);
                        let gl = matvec(&w[&format!("{block}.shared_expert_gate.weight")], &hn)[0];
                        let g = 1.0 / (1.0 + (-gl).exp());
                        for (yy, o) in y.iter_mut().zip(s) {
                            *yy += g * o;
                        }
                    }
                    if a == "deepseek" {
                        add(
                            &mut y,
                            &swiglu(w, &format!("{block}.shared_experts"), PROJ, &hn),
                        );
                    }
                    y
                };
                add(x, &y);
            }
        }
        let head = if w.contains_key("lm_head.weight") {
            "lm_head.weight"
        } else {
            "model.embed_tokens.weight"
        };
        for x in &xs {
            let xn = rms(x, &w["model.norm.weight"].1, eps);
            logits.push(matvec(&w[head], &xn));
        }
    }
    RefOut { logits, loads }
}
