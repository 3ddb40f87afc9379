//! The command line: the main job, eval/generate, and every bad input the
//! trainer must refuse with a clear message, a non-zero exit and no panic.

mod common;

use std::path::Path;
use std::process::{Command, Output};

fn run(args: &[&str]) -> Output {
    Command::new(common::bin())
        .args(args)
        .output()
        .expect("run moescope")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Fails unless the command exited non-zero with a message containing every `needle`, without a panic.
fn assert_fails(o: &Output, needles: &[&str]) {
    let e = stderr(o);
    assert!(
        !o.status.success(),
        "expected failure, got success; stderr: {e}"
    );
    assert!(!e.contains("panicked"), "panic: {e}");
    for n in needles {
        assert!(e.contains(n), "stderr lacks `{n}`: {e}");
    }
}

#[test]
fn train_eval_generate_round_trip() {
    let d = tempfile::tempdir().unwrap();
    let run_dir = common::train_micro_cli(d.path());
    let r = run_dir.display().to_string();
    let o = run(&["eval", "--model", &r, "--tokens", "200"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["tokens"], 200);
    assert!(v["ppl"].as_f64().unwrap() > 1.0);
    let o = run(&[
        "generate", "--model", &r, "--prompt", "The ", "--tokens", "20",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).starts_with("The "));
    // A checkpoint folder works as a model reference too.
    let o = run(&[
        "eval",
        "--model",
        &format!("{r}/checkpoints/step-0000003"),
        "--tokens",
        "100",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn bad_config_is_refused_with_the_field_named() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("run").display().to_string();
    let o = run(&["train", "--out", &out, "--set", "model.top_k=9"]);
    assert_fails(&o, &["model.top_k", "n_experts"]);
    let o = run(&["train", "--out", &out, "--set", "model.n_head=3"]);
    assert_fails(&o, &["model.n_head", "d_model"]);
    let o = run(&["train", "--out", &out, "--set", "model.topk=1"]);
    assert_fails(&o, &["model.topk", "unknown key"]);
    let cfg = d.path().join("c.toml");
    std::fs::write(&cfg, "[train]\nlearning_rate = 0.1\n").unwrap();
    let o = run(&[
        "train",
        "--out",
        &out,
        "--config",
        &cfg.display().to_string(),
    ]);
    assert_fails(&o, &["train.learning_rate", "c.toml"]);
    std::fs::write(&cfg, "[train\n").unwrap();
    let o = run(&[
        "train",
        "--out",
        &out,
        "--config",
        &cfg.display().to_string(),
    ]);
    assert_fails(&o, &["c.toml", "TOML"]);
    // A typed value names its key and the known values.
    let o = run(&["train", "--out", &out, "--set", "train.engine=jit"]);
    assert_fails(&o, &["train.engine", "autodiff"]);
    // `fused` on a config the fused engine does not cover is refused before
    // anything is written (moved from config.rs: the engine says what it covers).
    let o = run(&[
        "train",
        "--out",
        &out,
        "--set",
        "train.engine=fused",
        "--set",
        "reg.aux_lambda=0.01",
    ]);
    assert_fails(&o, &["train.engine", "aux_lambda"]);
    assert!(
        !Path::new(&out).exists(),
        "a refused config must not create the run"
    );
}

#[test]
fn bad_data_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("run").display().to_string();
    let cache = format!(
        "data.cache_dir={:?}",
        d.path().join("cache").display().to_string()
    );
    let empty = d.path().join("empty.txt");
    std::fs::write(&empty, "").unwrap();
    let o = run(&[
        "train",
        "--out",
        &out,
        "--data",
        &empty.display().to_string(),
        "--set",
        &cache,
    ]);
    assert_fails(&o, &["empty"]);
    let o = run(&[
        "train",
        "--out",
        &out,
        "--data",
        "/no/such/corpus.txt",
        "--set",
        &cache,
    ]);
    assert_fails(&o, &["/no/such/corpus.txt"]);
    let bin = d.path().join("bin.txt");
    std::fs::write(&bin, [0xffu8, 0xfe, 0x00, 0x41]).unwrap();
    let o = run(&[
        "train",
        "--out",
        &out,
        "--data",
        &bin.display().to_string(),
        "--set",
        &cache,
    ]);
    assert_fails(&o, &["bin.txt", "UTF-8"]);
    let folder = d.path().join("only-valid");
    std::fs::create_dir_all(&folder).unwrap();
    std::fs::write(folder.join("x.valid.txt"), "hello").unwrap();
    let o = run(&[
        "train",
        "--out",
        &out,
        "--data",
        &folder.display().to_string(),
        "--set",
        &cache,
    ]);
    assert_fails(&o, &["no training file"]);
    let o = run(&[
        "train",
        "--out",
        &out,
        "--set",
        "data.tokenizer=/no/tokenizer.json",
        "--set",
        &cache,
    ]);
    assert_fails(&o, &["/no/tokenizer.json"]);
}

#[test]
fn bad_checkpoints_are_refused_and_nothing_is_overwritten() {
    let d = tempfile::tempdir().unwrap();
    let run_dir = common::train_micro_cli(d.path());
    let r = run_dir.display().to_string();

    // Truncated weights.
    let w = run_dir.join("model.safetensors");
    let good = std::fs::read(&w).unwrap();
    std::fs::write(&w, &good[..good.len() / 2]).unwrap();
    let o = run(&["eval", "--model", &r, "--tokens", "10"]);
    assert_fails(&o, &["model.safetensors", "corrupt or truncated"]);
    std::fs::write(&w, &good).unwrap();

    // A config.json of another model.
    let cj = run_dir.join("config.json");
    let orig = std::fs::read_to_string(&cj).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&orig).unwrap();
    v["moescope"]["d_model"] = serde_json::json!(64);
    std::fs::write(&cj, serde_json::to_string(&v).unwrap()).unwrap();
    let o = run(&["eval", "--model", &r, "--tokens", "10"]);
    assert_fails(&o, &["model.safetensors", "shape", "another model config"]);
    // Unknown keys in our config.json are refused too.
    v["moescope"]["d_model"] = serde_json::json!(32);
    v["moescope"]["n_expert"] = serde_json::json!(4);
    std::fs::write(&cj, serde_json::to_string(&v).unwrap()).unwrap();
    let o = run(&["eval", "--model", &r, "--tokens", "10"]);
    assert_fails(&o, &["config.json", "n_expert"]);
    std::fs::write(&cj, &orig).unwrap();

    // A truncated optimiser state: resume refuses, the run is left as it was.
    let ckpt = run_dir.join("checkpoints/step-0000003");
    let opt = ckpt.join("optimizer.safetensors");
    let bytes = std::fs::read(&opt).unwrap();
    std::fs::write(&opt, &bytes[..100]).unwrap();
    // Resume takes the run's own config; only [train] keys may change.
    let args: Vec<String> = vec![
        "train".into(),
        "--out".into(),
        r.clone(),
        "--resume".into(),
        "-q".into(),
        "--set".into(),
        "train.max_steps=6".into(),
    ];
    let o = Command::new(common::bin()).args(&args).output().unwrap();
    assert_fails(&o, &["optimizer.safetensors", "corrupt or truncated"]);
    assert_eq!(
        std::fs::read(&w).unwrap(),
        good,
        "final weights were overwritten"
    );

    // Resume cannot change the model.
    std::fs::write(&opt, &bytes).unwrap();
    let o = run(&[
        "train",
        "--out",
        &r,
        "--resume",
        "--set",
        "model.d_model=64",
    ]);
    assert_fails(&o, &["--resume", "[model]"]);
    // A fresh run into an existing run folder is refused.
    let o = run(&["train", "--out", &r]);
    assert_fails(&o, &["already exists", "--resume"]);
    // Not a model at all.
    let o = run(&["eval", "--model", &d.path().display().to_string()]);
    assert_fails(&o, &["no model.safetensors"]);
}

#[test]
fn help_lists_every_command() {
    let o = run(&["--help"]);
    let s = String::from_utf8_lossy(&o.stdout);
    for c in ["train", "eval", "generate", "bench"] {
        assert!(s.contains(c), "{s}");
    }
    let o = run(&["train", "--help"]);
    let s = String::from_utf8_lossy(&o.stdout);
    for f in [
        "--config", "--preset", "--data", "--set", "--resume", "--out",
    ] {
        assert!(s.contains(f), "{s}");
    }
}

/// `bench train` on both engines: the JSON line the comparison script reads,
/// the peer's `small` shapes under the user's `--set`s, the per-section profile.
#[test]
fn bench_train_reports_both_engines() {
    for engine in ["fused", "autodiff"] {
        let o = run(&[
            "bench",
            "train",
            "--preset",
            "small",
            "--engine",
            engine,
            "--steps",
            "3",
            "--warmup",
            "1",
            "--batch",
            "2",
            "--threads",
            "2",
            "--set",
            "model.d_model=32",
            "--set",
            "model.n_layer=1",
            "--set",
            "model.d_ff=64",
            "--set",
            "model.seq_len=16",
            "--set",
            "model.vocab_size=64",
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        let last = String::from_utf8_lossy(&o.stdout)
            .lines()
            .last()
            .unwrap()
            .to_string();
        let r: serde_json::Value = serde_json::from_str(&last).unwrap();
        assert_eq!(r["engine"], engine);
        assert_eq!(r["cfg"]["n_head"], 8, "the peer's small has 8 heads");
        assert_eq!(
            r["cfg"]["d_model"], 32,
            "--set comes after the peer's shapes"
        );
        assert!(r["tokens_per_s"].as_f64().unwrap() > 0.0);
        assert!(r["gemm_ceiling_gflops"].as_f64().unwrap() > 0.0);
        assert!(r["final_ce"].as_f64().unwrap().is_finite());
        let cmd = r["peer_command"].as_str().unwrap();
        assert!(
            cmd.contains("--d_model 32") && cmd.contains("--n_head 8"),
            "{cmd}"
        );
        let sections = r["sections_ms"].as_array().unwrap();
        assert_eq!(sections.is_empty(), engine == "autodiff", "{sections:?}");
        assert!(stderr(&o).contains("GEMM ceiling"), "{}", stderr(&o));
    }
}
