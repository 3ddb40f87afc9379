#![allow(dead_code)]
//! Shared helpers for the end-to-end tests.

pub mod hf_ref;
pub mod reference;

use moescope::config::{Config, ModelConfig};
use std::path::{Path, PathBuf};

/// A model small enough for tests to train in seconds.
pub fn micro_model() -> ModelConfig {
    ModelConfig {
        vocab_size: 64,
        seq_len: 16,
        n_layer: 2,
        n_head: 2,
        d_model: 16,
        d_ff: 24,
        n_experts: 4,
        top_k: 2,
        ..Default::default()
    }
}

/// A whole run config on a small built-in corpus, cached under `cache`.
pub fn micro_config(cache: &Path) -> Config {
    let mut c = Config::preset("tiny").unwrap();
    c.model = ModelConfig {
        vocab_size: 0,
        n_layer: 2,
        d_model: 32,
        n_head: 2,
        d_ff: 64,
        n_experts: 4,
        seq_len: 32,
        ..Default::default()
    };
    c.data.builtin_bytes = 60_000;
    c.data.cache_dir = cache.display().to_string();
    c.train.batch_size = 4;
    c.train.max_steps = 6;
    c.train.warmup_steps = 2;
    c.train.eval_every = 3;
    c.train.checkpoint_every = 3;
    c.train.log_every = 1;
    c.train.eval_tokens = 512;
    c
}

/// The `moescope` binary built for these tests.
pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_moescope"))
}

/// The arguments of `moescope train` for a three-step run of a one-layer
/// model into `out`, tokens cached in `cache`.
pub fn micro_train_args(cache: &Path, out: &Path) -> Vec<String> {
    let mut a: Vec<String> = ["train", "--preset", "tiny", "--out"]
        .map(String::from)
        .to_vec();
    a.push(out.display().to_string());
    a.push("-q".into());
    let sets = [
        "data.builtin_bytes=40000".to_string(),
        format!("data.cache_dir={:?}", cache.display().to_string()),
        "model.n_layer=1".into(),
        "model.d_model=32".into(),
        "model.d_ff=32".into(),
        "model.seq_len=32".into(),
        "train.max_steps=3".into(),
        "train.eval_tokens=256".into(),
        "train.batch_size=2".into(),
    ];
    for s in sets {
        a.push("--set".into());
        a.push(s);
    }
    a
}

/// Trains the run of [`micro_train_args`] into `dir/run` through the CLI.
pub fn train_micro_cli(dir: &Path) -> PathBuf {
    let out = dir.join("run");
    let o = std::process::Command::new(bin())
        .args(micro_train_args(&dir.join("cache"), &out))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    out
}

/// Optional real corpora beside the checkout (../shared/data on the project's machines), if present.
pub fn shared_data() -> Option<PathBuf> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data");
    p.is_dir().then_some(p)
}

/// Options for a fresh, silent training run into `out`.
pub fn quiet_opts(out: &Path) -> moescope::train::TrainOptions {
    moescope::train::TrainOptions::new(out)
}

/// Train `cfg` silently into `out`.
pub fn train_quiet(cfg: Config, out: &Path) {
    moescope::train::train(cfg, &quiet_opts(out)).unwrap();
}

/// The rows of a run's metrics.jsonl.
pub fn metrics(run: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Column `key` of a run's `train` rows in metrics.jsonl.
pub fn train_column(run: &Path, key: &str) -> Vec<serde_json::Value> {
    metrics(run)
        .into_iter()
        .filter(|r| r["kind"] == "train")
        .map(|r| r[key].clone())
        .collect()
}

/// `moescope sweep SPEC --out OUT EXTRA...`, asserted to succeed.
pub fn sweep(spec: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    let o = std::process::Command::new(bin())
        .args([
            "sweep",
            spec.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ])
        .args(extra)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    o
}
