//! Pretrained Hugging Face checkpoints: tiny random models in exact HF layout
//! (written by the tests), checked against an independent float64 forward
//! pass of each architecture; f32 vs bf16 files, single vs sharded, streaming
//! vs in-memory; bad checkpoints; the hub cache layout offline.

mod common;

use common::hf_ref::{self, Weights};
use moescope::hf::analyze::{analyze, HfOptions};
use moescope::hf::{HfCheckpoint, HfModel};
use moescope::measures::analyze::{GeometryOptions, Source};
use moescope::measures::jacobian::JacobianMode;
use moescope::measures::subspace::RankRule;
use moescope::measures::Family;
use std::path::Path;

const ARCHS: [&str; 5] = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek"];

fn seqs(n: usize, t: usize, vocab: u32, seed: u32) -> Vec<Vec<u32>> {
    (0..n)
        .map(|s| {
            (0..t)
                .map(|i| {
                    ((i as u32 * 7 + s as u32 * 13 + seed).wrapping_mul(2654435761u32) >> 7) % vocab
                })
                .collect()
        })
        .collect()
}

/// max |a − b| / max |b| over all logits.
fn rel_diff(ours: &[f32], reference: &[Vec<f64>]) -> f64 {
    let flat: Vec<f64> = reference.iter().flatten().copied().collect();
    assert_eq!(ours.len(), flat.len());
    let scale = flat.iter().fold(0.0f64, |m, x| m.max(x.abs()));
    ours.iter()
        .zip(&flat)
        .map(|(&a, &b)| (a as f64 - b).abs())
        .fold(0.0, f64::max)
        / scale
}

fn logits(dir: &Path, s: &[Vec<u32>]) -> Vec<f32> {
    let ck = HfCheckpoint::open(dir).unwrap();
    let m = HfModel::load(&ck).unwrap();
    let flat: Vec<u32> = s.iter().flatten().copied().collect();
    m.logits(&flat, s.len(), s[0].len())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn write(
    dir: &Path,
    arch: &str,
    dtype: &str,
    shards: usize,
    seed: u64,
) -> (serde_json::Value, Weights) {
    let c = hf_ref::config(arch);
    let w = hf_ref::random_weights(&c, seed);
    hf_ref::write_checkpoint(dir, &c, &w, dtype, shards);
    (c, w)
}

#[test]
fn every_architecture_matches_the_f64_reference() {
    let tmp = tempfile::tempdir().unwrap();
    for (i, arch) in ARCHS.iter().enumerate() {
        let dir = tmp.path().join(arch);
        let (c, w) = write(&dir, arch, "F32", 1, 10 + i as u64);
        let s = seqs(2, 9, 61, i as u32);
        let r = hf_ref::forward(&c, &hf_ref::rounded(&w, "F32"), &s);
        let diff = rel_diff(&logits(&dir, &s), &r.logits);
        eprintln!("{arch}: max relative logit difference {diff:.2e}");
        assert!(
            diff < 1e-5,
            "{arch}: max relative logit difference {diff:.2e}"
        );
        // The reference's routing must be non-trivial (several experts used).
        let used = r.loads.iter().flatten().filter(|&&x| x > 0).count();
        assert!(
            used >= 4,
            "{arch}: routing too degenerate for a test ({used} experts used)"
        );
    }
}

#[test]
fn bf16_files_load_exactly_and_stay_within_bf16_of_f32() {
    let tmp = tempfile::tempdir().unwrap();
    for arch in ["mixtral", "qwen2_moe"] {
        let c = hf_ref::config(arch);
        let w = hf_ref::random_weights(&c, 3);
        let (d32, d16) = (
            tmp.path().join(format!("{arch}-f32")),
            tmp.path().join(format!("{arch}-bf16")),
        );
        hf_ref::write_checkpoint(&d32, &c, &w, "F32", 1);
        hf_ref::write_checkpoint(&d16, &c, &w, "BF16", 2);
        let s = seqs(2, 8, 61, 5);
        let l16 = logits(&d16, &s);
        // Exact: bf16 values widen to f32 without loss, so the reference on the
        // rounded weights is matched to f32 precision.
        let exact = rel_diff(
            &l16,
            &hf_ref::forward(&c, &hf_ref::rounded(&w, "BF16"), &s).logits,
        );
        assert!(
            exact < 2e-5,
            "{arch}: bf16 file vs reference on bf16 weights {exact:.2e}"
        );
        // Against the f32 file: within what bf16 rounding (8 bits of mantissa) explains.
        let r32 = hf_ref::forward(&c, &hf_ref::rounded(&w, "F32"), &s).logits;
        let loose = rel_diff(&l16, &r32);
        assert!(
            loose < 5e-2 && loose > 1e-5,
            "{arch}: bf16 vs f32 {loose:.2e}"
        );
    }
}

fn geo() -> GeometryOptions {
    GeometryOptions {
        jacobian: JacobianMode::Exact,
        jacobian_tokens: 12,
        spectra_tokens: 2,
        subspace: RankRule::Fixed(3),
        ..Default::default()
    }
}

fn run(
    dir: &Path,
    tokens: &[u32],
    in_memory: bool,
    layers: Option<Vec<usize>>,
) -> moescope::measures::analyze::Report {
    let ck = HfCheckpoint::open(dir).unwrap();
    let opts = HfOptions {
        tokens: tokens.len() - 1,
        seq_len: 10,
        batch: 2,
        layers,
        in_memory,
        progress: false,
    };
    let src = Source {
        checkpoint: "x".into(),
        data: "y".into(),
        seed: 0,
    };
    analyze(
        &ck,
        tokens,
        &opts,
        &[Family::Up, Family::Gate, Family::Down, Family::Router],
        &geo(),
        src,
    )
    .unwrap()
    .0
}

#[test]
fn sharded_single_streaming_and_in_memory_give_identical_reports() {
    let tmp = tempfile::tempdir().unwrap();
    let c = hf_ref::config("qwen2_moe");
    let w = hf_ref::random_weights(&c, 7);
    let (single, sharded) = (tmp.path().join("single"), tmp.path().join("sharded"));
    hf_ref::write_checkpoint(&single, &c, &w, "F32", 1);
    hf_ref::write_checkpoint(&sharded, &c, &w, "F32", 4);
    assert!(sharded.join("model-00004-of-00004.safetensors").is_file());
    let tokens: Vec<u32> = seqs(1, 41, 61, 9).remove(0);
    let a = run(&single, &tokens, false, None);
    let b = run(&sharded, &tokens, false, None);
    let m = run(&single, &tokens, true, None);
    let js = |r: &moescope::measures::analyze::Report| serde_json::to_value(r).unwrap();
    assert_eq!(js(&a), js(&b), "single vs sharded");
    assert_eq!(js(&a), js(&m), "streaming vs in-memory");

    // The report's routing and loss agree with the f64 reference on the same windows.
    let windows: Vec<Vec<u32>> = tokens[..40].chunks(10).map(|c| c.to_vec()).collect();
    let r = hf_ref::forward(&c, &hf_ref::rounded(&w, "F32"), &windows);
    let moe_layers: Vec<usize> = (0..3).filter(|&l| hf_ref::is_moe(&c, l)).collect();
    assert_eq!(
        a.layers.iter().map(|l| l.index).collect::<Vec<_>>(),
        moe_layers
    );
    for l in &a.layers {
        assert_eq!(
            l.telemetry.load, r.loads[l.index],
            "layer {} loads",
            l.index
        );
        let s = l
            .shared_expert
            .as_ref()
            .expect("qwen2_moe has a shared expert");
        assert!(s.gate_mean.unwrap() > 0.0 && s.gate_mean.unwrap() < 1.0);
        assert!(s.act_cos2_routed > 0.0 && s.act_cos2_routed < 1.0);
        assert!(l.jacobian.is_some() && l.subspace.is_some());
        // Pretrained models get the same pair sets and nulls as ours.
        let sets = &l.act_mso_sets;
        let (routed, act) = (sets.routed.unwrap().mean, l.act_mso.unwrap());
        assert!(
            (routed - act).abs() < 1e-7,
            "layer {}: {routed} vs {act}",
            l.index
        );
        assert!(sets.all.is_some() && sets.gate_weighted.is_some());
        let j = l.jacobian.as_ref().unwrap();
        assert!(j.sets.routed.is_some() && j.sets.all.is_some() && j.sets.gate_weighted.is_some());
        assert!(j.null.shuffled_routing.routed.is_some() && j.null.random_init.is_some());
        let sub = l.subspace.as_ref().unwrap();
        assert!(sub.sets.all.is_some() && sub.degenerate.is_none());
    }
    let mut nll = 0.0;
    for (i, row) in r.logits.iter().enumerate() {
        let target = tokens[i + 1] as usize;
        let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let lse = m + row.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
        nll += lse - row[target];
    }
    let p = a.perplexity.expect("whole model run");
    assert_eq!(p.tokens, 40);
    assert!(
        (p.loss - nll / 40.0).abs() < 1e-5,
        "{} vs {}",
        p.loss,
        nll / 40.0
    );

    // --layers: only layer 2 is measured, no loss (the model is not run to the end).
    let only = run(&single, &tokens, false, Some(vec![2]));
    assert_eq!(only.layers.len(), 1);
    assert_eq!(js(&only)["layers"][0], js(&a)["layers"][1]);
    assert!(only.perplexity.is_none());
}

#[test]
fn dense_or_missing_layers_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    write(tmp.path(), "qwen2_moe", "F32", 1, 1);
    let ck = HfCheckpoint::open(tmp.path()).unwrap();
    for (layers, want) in [(vec![1], "dense layer"), (vec![7], "does not exist")] {
        let opts = HfOptions {
            tokens: 8,
            seq_len: 8,
            batch: 1,
            layers: Some(layers),
            in_memory: false,
            progress: false,
        };
        let e = analyze(
            &ck,
            &[1; 9],
            &opts,
            &[Family::Up],
            &GeometryOptions::default(),
            Source {
                checkpoint: String::new(),
                data: String::new(),
                seed: 0,
            },
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains(want) && e.contains("--layers"), "{e}");
    }
}

fn open_err(dir: &Path) -> String {
    match HfCheckpoint::open(dir).and_then(|ck| HfModel::load(&ck)) {
        Ok(_) => panic!("{} opened", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn bad_checkpoints_are_named_precisely() {
    let tmp = tempfile::tempdir().unwrap();
    let base = |name: &str, shards: usize| {
        let d = tmp.path().join(name);
        write(&d, "mixtral", "F32", shards, 2);
        d
    };
    // A missing shard.
    let d = base("missing-shard", 3);
    std::fs::remove_file(d.join("model-00002-of-00003.safetensors")).unwrap();
    let e = open_err(&d);
    assert!(
        e.contains("model.safetensors.index.json")
            && e.contains("model-00002-of-00003.safetensors")
            && e.contains("missing"),
        "{e}"
    );

    // The index names a tensor no shard has.
    let d = base("index-extra", 2);
    let p = d.join("model.safetensors.index.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    v["weight_map"]["model.layers.9.mlp.bogus.weight"] = "model-00001-of-00002.safetensors".into();
    std::fs::write(&p, v.to_string()).unwrap();
    let e = open_err(&d);
    assert!(
        e.contains("model.layers.9.mlp.bogus.weight")
            && e.contains("model-00001-of-00002.safetensors"),
        "{e}"
    );

    // A shape that contradicts config.json.
    let d = base("shape", 1);
    let p = d.join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    v["intermediate_size"] = 20.into();
    std::fs::write(&p, v.to_string()).unwrap();
    let e = open_err(&d);
    assert!(
        e.contains("model.safetensors")
            && e.contains("experts.0.w1.weight")
            && e.contains("[24, 32]")
            && e.contains("[20, 32]")
            && e.contains("intermediate_size"),
        "{e}"
    );

    // A truncated file.
    let d = base("truncated", 1);
    let p = d.join("model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() - 100]).unwrap();
    let e = open_err(&d);
    assert!(
        e.contains("model.safetensors") && e.contains("truncated"),
        "{e}"
    );

    // A tensor missing from a single file.
    let c = hf_ref::config("mixtral");
    let mut w = hf_ref::random_weights(&c, 2);
    w.remove("model.layers.1.block_sparse_moe.experts.3.w2.weight");
    let d = tmp.path().join("missing-tensor");
    hf_ref::write_checkpoint(&d, &c, &w, "F32", 1);
    let e = open_err(&d);
    assert!(
        e.contains("model.layers.1.block_sparse_moe.experts.3.w2.weight") && e.contains("missing"),
        "{e}"
    );

    // A dtype safetensors knows but moescope does not load, and one nobody knows.
    for (dtype, want) in [
        ("I8", "stored as I8"),
        ("Q4_K", "not a valid safetensors file"),
    ] {
        let d = tmp.path().join(format!("dtype-{dtype}"));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("config.json"), hf_ref::config("mixtral").to_string()).unwrap();
        let header = format!(
            r#"{{"model.embed_tokens.weight":{{"dtype":"{dtype}","shape":[61,32],"data_offsets":[0,1952]}}}}"#
        );
        let mut f = (header.len() as u64).to_le_bytes().to_vec();
        f.extend_from_slice(header.as_bytes());
        f.extend(std::iter::repeat_n(0u8, 1952));
        std::fs::write(d.join("model.safetensors"), f).unwrap();
        let e = open_err(&d);
        assert!(
            e.contains("model.safetensors") && e.contains(want),
            "{dtype}: {e}"
        );
        if dtype == "I8" {
            assert!(e.contains("model.embed_tokens.weight"), "{e}");
        }
    }

    // Pickle only.
    let d = tmp.path().join("pickle");
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join("config.json"), hf_ref::config("olmoe").to_string()).unwrap();
    std::fs::write(d.join("pytorch_model.bin"), b"\x80\x02}q\x00.").unwrap();
    let e = open_err(&d);
    assert!(
        e.contains("pytorch_model.bin")
            && e.contains("arbitrary code")
            && e.contains("safe_serialization"),
        "{e}"
    );

    // An unsupported architecture.
    let d = base("llama", 1);
    let p = d.join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    v["model_type"] = "llama".into();
    std::fs::write(&p, v.to_string()).unwrap();
    let e = open_err(&d);
    assert!(
        e.contains("config.json")
            && e.contains("`llama`")
            && e.contains("mixtral, qwen2_moe, qwen3_moe, olmoe, deepseek"),
        "{e}"
    );
}

/// A character-level tokenizer.json (BPE without merges) whose ids fit the tiny vocabulary.
fn write_tokenizer(dir: &Path) {
    let mut vocab = serde_json::Map::new();
    vocab.insert("[UNK]".into(), 0.into());
    for (i, ch) in "abcdefghijklmnopqrstuvwxyz0123456789.,!?'-"
        .chars()
        .enumerate()
    {
        vocab.insert(ch.to_string(), (i + 1).into());
    }
    let t = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [{"id": 0, "content": "[UNK]", "single_word": false, "lstrip": false,
                          "rstrip": false, "normalized": false, "special": true}],
        "normalizer": {"type": "Lowercase"}, "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": null, "decoder": null,
        "model": {"type": "BPE", "dropout": null, "unk_token": "[UNK]", "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                  "vocab": vocab, "merges": []}
    });
    std::fs::write(dir.join("tokenizer.json"), t.to_string()).unwrap();
}

/// `--model org/name` resolves from a Hugging Face cache laid out as
/// transformers lays it out, offline; text is tokenised with the model's
/// tokenizer.json (the built-in corpus by default, or --data).
#[test]
fn cli_analyzes_a_hub_id_from_the_hf_cache_offline() {
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("hf");
    let repo = home.join("hub/models--tiny-org--tiny-olmoe");
    let commit = "0123456789abcdef0123456789abcdef01234567";
    let snap = repo.join("snapshots").join(commit);
    write(&snap, "olmoe", "BF16", 2, 4);
    write_tokenizer(&snap);
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), commit).unwrap();
    let out = tmp.path().join("report.json");
    let cache = tmp.path().join("cache");
    let cmd = |extra: &[&str]| {
        std::process::Command::new(common::bin())
            .args([
                "analyze",
                "--model",
                "tiny-org/tiny-olmoe",
                "--tokens",
                "200",
                "--seq-len",
                "32",
                "--jacobian",
                "estimate:8",
                "--jacobian-tokens",
                "16",
                "--subspace",
                "4",
            ])
            .args(["--out", out.to_str().unwrap()])
            .args(extra)
            .env("HF_HOME", &home)
            .env_remove("HF_HUB_CACHE")
            .env("MOESCOPE_OFFLINE", "1")
            .env("MOESCOPE_CACHE", &cache)
            .output()
            .unwrap()
    };
    let o = cmd(&[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("olmoe (BF16), 2 layers (2 MoE), 6 experts, top-3"),
        "{err}"
    );
    assert!(
        err.contains("layer   1: load") && err.contains("perplexity"),
        "{err}"
    );
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert_eq!(r["schema"], "moescope.analysis/1");
    assert_eq!(r["tokens"], 200);
    assert_eq!(r["layers"].as_array().unwrap().len(), 2);
    assert!(r["layers"][0]["act_mso"].as_f64().unwrap() > 0.0);
    assert!(
        r["layers"][0]["jacobian"]["mean"].is_number() || r["layers"][0]["jacobian"].is_object()
    );
    assert!(r["perplexity"]["ppl"].as_f64().unwrap() > 1.0);
    assert!(r["source"]["checkpoint"]
        .as_str()
        .unwrap()
        .contains("tiny-org/tiny-olmoe (olmoe, BF16)"));

    // --data: the model's tokenizer on the user's text; --layers restricts the work.
    let text = tmp.path().join("text.txt");
    std::fs::write(
        &text,
        "the quick brown fox jumps over the lazy dog. ".repeat(400),
    )
    .unwrap();
    let o = cmd(&["--data", text.to_str().unwrap(), "--layers", "1"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert_eq!(r["layers"].as_array().unwrap().len(), 1);
    assert_eq!(r["layers"][0]["index"], 1);

    // Not in the cache and offline: a clear error, no report.
    std::fs::remove_file(&out).unwrap();
    let o = std::process::Command::new(common::bin())
        .args([
            "analyze",
            "--model",
            "tiny-org/absent",
            "--out",
            out.to_str().unwrap(),
        ])
        .env("HF_HOME", &home)
        .env("MOESCOPE_OFFLINE", "1")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success()
            && err.contains("tiny-org/absent")
            && err.contains("not in the Hugging Face cache"),
        "{err}"
    );
    assert!(!out.exists());
}
