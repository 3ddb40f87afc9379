//! Bad inputs for every command: each must exit non-zero (not by a signal),
//! say which key or file is at fault, never panic, and leave every file that
//! was already in the working folder as it was.

mod common;

use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// One bad invocation and the words its error must contain.
struct Case {
    args: Vec<OsString>,
    needles: Vec<String>,
}

fn case(args: &[&str], needles: &[&str]) -> Case {
    Case {
        args: args.iter().map(OsString::from).collect(),
        needles: needles.iter().map(|s| s.to_string()).collect(),
    }
}

/// Every file under `dir` with the hash of its bytes.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                todo.push(p);
            } else if let Ok(bytes) = std::fs::read(&p) {
                out.insert(p, Sha256::digest(&bytes).to_vec());
            }
        }
    }
    out
}

/// Run every case in `dir` and check its outcome and that no file there changed.
fn check_all(dir: &Path, cases: &[Case]) {
    for c in cases {
        let before = snapshot(dir);
        let o = Command::new(common::bin())
            .args(&c.args)
            .current_dir(dir)
            .output()
            .expect("run moescope");
        let e = String::from_utf8_lossy(&o.stderr);
        let what = format!("{:?}\nstderr: {e}", c.args);
        assert!(!o.status.success(), "succeeded: {what}");
        assert!(o.status.code().is_some(), "killed by a signal: {what}");
        assert!(!e.contains("panicked"), "panicked: {what}");
        for n in &c.needles {
            assert!(e.contains(n.as_str()), "stderr lacks `{n}`: {what}");
        }
        let after = snapshot(dir);
        for (p, h) in &before {
            assert_eq!(after.get(p), Some(h), "{} changed: {what}", p.display());
        }
    }
}

fn write(dir: &Path, name: &str, text: &str) {
    let p = dir.join(name);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, text).unwrap();
}

/// A path whose name is not UTF-8 (Linux allows any bytes but `/` and NUL).
fn non_utf8(name: &str) -> OsString {
    let mut b = name.as_bytes().to_vec();
    b.push(0xff);
    OsString::from_vec(b)
}

#[test]
fn train_refuses_bad_configs_and_data() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    write(p, "corrupt.toml", "[train\n");
    write(p, "unknown.toml", "[train]\nlearning_rate = 0.1\n");
    write(p, "wrongtype.toml", "[train]\nmax_steps = \"ten\"\n");
    write(p, "negative.toml", "[train]\nmax_steps = -1\n");
    write(p, "routing.toml", "[model]\nrouting = \"bogus\"\n");
    write(
        p,
        "both.toml",
        "[train]\nmax_steps = 50\nmax_tokens = 1000\n",
    );
    std::fs::write(p.join("binary.txt"), [0xffu8, 0xfe, 0x00, 0x41]).unwrap();
    // A Parquet file on which the `parquet` crate panics (found by fuzzing).
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join(
            "tests/fuzz-regressions/corpus_parquet/dict-page-missing-decoder-panics-in-parquet",
        ),
        p.join("corrupt.parquet"),
    )
    .unwrap();
    let cache = "data.cache_dir=\"cache\"";
    let mut cases = vec![
        case(
            &["train", "--config", "missing.toml", "--out", "r"],
            &["missing.toml"],
        ),
        case(
            &["train", "--config", "corrupt.toml", "--out", "r"],
            &["corrupt.toml"],
        ),
        case(
            &["train", "--config", "unknown.toml", "--out", "r"],
            &["train.learning_rate"],
        ),
        case(
            &["train", "--config", "wrongtype.toml", "--out", "r"],
            &["train.max_steps"],
        ),
        case(
            &["train", "--config", "negative.toml", "--out", "r"],
            &["train.max_steps"],
        ),
        case(
            &["train", "--config", "routing.toml", "--out", "r"],
            &["model.routing"],
        ),
        case(
            &["train", "--config", "both.toml", "--out", "r"],
            &["train.max_steps", "train.max_tokens"],
        ),
        case(
            &["train", "--set", "train.max_steps=-1", "--out", "r"],
            &["train.max_steps"],
        ),
        case(
            &["train", "--set", "model.routing=bogus", "--out", "r"],
            &["model.routing"],
        ),
        case(
            &[
                "train",
                "--set",
                "train.max_steps=50",
                "--set",
                "train.max_tokens=1000",
                "--out",
                "r",
            ],
            &["train.max_steps", "train.max_tokens"],
        ),
        case(
            &["train", "--set", "train.seed=1\n[model]", "--out", "r"],
            &["train.seed", "line break"],
        ),
        case(
            &["train", "--set", "model.top_k", "--out", "r"],
            &["model.top_k"],
        ),
        case(
            &["train", "--preset", "huge", "--out", "r"],
            &["preset", "huge"],
        ),
        case(
            &[
                "train",
                "--data",
                "missing.txt",
                "--set",
                cache,
                "--out",
                "r",
            ],
            &["missing.txt"],
        ),
        case(
            &[
                "train",
                "--data",
                "binary.txt",
                "--set",
                cache,
                "--out",
                "r",
            ],
            &["binary.txt", "UTF-8"],
        ),
        case(
            &[
                "train",
                "--data",
                "corrupt.parquet",
                "--set",
                cache,
                "--out",
                "r",
            ],
            &["corrupt.parquet", "corrupt Parquet file"],
        ),
        case(&["train", "--bogus-flag"], &["--bogus-flag"]),
    ];
    let mut c = case(&["train", "--out", "r", "--config"], &["missing-"]);
    c.args.push(non_utf8("missing-"));
    cases.push(c);
    check_all(p, &cases);
}

#[test]
fn sweep_report_and_reproduce_refuse_bad_files_and_fail_with_failed_runs() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    write(p, "corrupt.toml", "[grid\n");
    write(p, "unknown.toml", "[grids]\n\"train.seed\" = [0]\n");
    write(p, "empty-axis.toml", "[grid]\n\"train.seed\" = []\n");
    write(
        p,
        "dup.toml",
        "preset = \"tiny\"\n[grid]\n\"reg.orth_lambda\" = [0.1, 0.10]\n",
    );
    write(
        p,
        "dup-exp.toml",
        "preset = \"tiny\"\n[grid]\n\"reg.orth_lambda\" = [0.001, 1e-3]\n",
    );
    // The only run cannot resolve its config: it fails, and so must the sweep.
    write(
        p,
        "failing.toml",
        "preset = \"tiny\"\n[grid]\n\"model.top_k\" = [99]\n",
    );
    write(p, "not-a-sweep/notes.txt", "hello");
    write(p, "a-file", "x");
    let cases = vec![
        case(&["sweep", "missing.toml"], &["missing.toml"]),
        case(&["sweep", "corrupt.toml"], &["corrupt.toml"]),
        case(&["sweep", "unknown.toml"], &["unknown.toml", "grids"]),
        case(&["sweep", "empty-axis.toml"], &["grid.train.seed"]),
        case(
            &["sweep", "dup.toml"],
            &["dup.toml", "grid.reg.orth_lambda", "0.1 and 0.10"],
        ),
        case(
            &["sweep", "dup-exp.toml"],
            &["grid.reg.orth_lambda", "0.001 and 1e-3"],
        ),
        case(
            &["sweep", "failing.toml", "--set", "train.seed"],
            &["train.seed"],
        ),
        case(
            &[
                "sweep",
                "failing.toml",
                "--out",
                "sw",
                "--jobs",
                "1",
                "--threads",
                "1",
            ],
            &["1 of 1 runs failed", "results.csv"],
        ),
        case(&["report", "missing-folder"], &["missing-folder"]),
        case(&["report", "not-a-sweep"], &["not-a-sweep"]),
        case(&["reproduce", "--scale", "huge"], &["--scale", "huge"]),
        case(
            &["reproduce", "--scale", "quick", "--out", "a-file"],
            &["a-file"],
        ),
    ];
    check_all(p, &cases);
    let status = std::fs::read_to_string(p.join("sw/runs/top_k=99/status.json")).unwrap();
    assert!(
        status.contains("failed") && status.contains("model.top_k"),
        "{status}"
    );
}

#[test]
fn bench_refuses_bad_flags() {
    let d = tempfile::tempdir().unwrap();
    let cases = vec![
        case(
            &["bench", "train", "--set", "model.bogus=1"],
            &["model.bogus"],
        ),
        case(
            &["bench", "train", "--engine", "bogus"],
            &["--engine", "bogus"],
        ),
        case(&["bench", "train", "--preset", "huge"], &["huge"]),
        case(&["bench", "hf", "--jacobian", "bogus"], &["--jacobian"]),
        case(&["bench", "nothing"], &["nothing"]),
    ];
    check_all(d.path(), &cases);
}

#[test]
fn eval_generate_and_analyze_refuse_bad_models_inputs_and_outputs() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    common::train_micro_cli(p);
    let ids: Vec<u32> = (0..100).map(|i| i % 50).collect();
    write(p, "short.json", &serde_json::to_string(&ids).unwrap());
    write(p, "corrupt.json", "[1, 2,");
    write(p, "a-file.txt", "x");
    std::fs::create_dir_all(p.join("a-folder")).unwrap();
    // A Hugging Face config.json without model_type.
    write(
        p,
        "hf/config.json",
        r#"{"hidden_size": 16, "num_hidden_layers": 1}"#,
    );
    write(p, "hf/model.safetensors", "");
    let mut cases = vec![
        case(&["eval", "--model", "missing-run"], &["missing-run"]),
        case(
            &["eval", "--model", "run", "--split", "bogus"],
            &["--split", "bogus"],
        ),
        case(
            &["eval", "--model", "run", "--data", "missing.txt"],
            &["missing.txt"],
        ),
        case(&["generate", "--model", "missing-run"], &["missing-run"]),
        case(
            &["generate", "--model", "run", "--tokens", "x"],
            &["--tokens"],
        ),
        case(
            &["analyze", "--model", "missing-run", "--out", "a-folder"],
            &["--out", "a-folder", "is a folder"],
        ),
        case(
            &[
                "analyze",
                "--model",
                "missing-run",
                "--out",
                "a-file.txt/r.json",
            ],
            &["--out", "a-file.txt", "not a folder"],
        ),
        case(
            &[
                "analyze",
                "--model",
                "missing-run",
                "--figures",
                "a-file.txt",
            ],
            &["--figures", "a-file.txt"],
        ),
        case(
            &[
                "analyze",
                "--model",
                "run",
                "--token-ids",
                "short.json",
                "--tokens",
                "500",
            ],
            &["short.json", "500", "100"],
        ),
        case(
            &["analyze", "--model", "run", "--token-ids", "corrupt.json"],
            &["corrupt.json"],
        ),
        case(
            &["analyze", "--model", "run", "--jacobian", "bogus"],
            &["--jacobian"],
        ),
        case(&["analyze", "--model", "hf"], &["model_type", "missing"]),
        case(&["analyze", "--model", "missing-run"], &["missing-run"]),
    ];
    for t in ["nan", "inf", "-1"] {
        cases.push(case(
            &["generate", "--model", "run", "--temperature", t],
            &["--temperature", t],
        ));
    }
    let mut c = case(&["eval", "--model"], &["missing-"]);
    c.args.push(non_utf8("missing-"));
    cases.push(c);
    check_all(p, &cases);
}

#[test]
fn analyze_uses_a_token_file_shorter_than_the_default_whole() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    common::train_micro_cli(p);
    let ids: Vec<u32> = (0..100).map(|i| i % 50).collect();
    write(p, "short.json", &serde_json::to_string(&ids).unwrap());
    let o = Command::new(common::bin())
        .args(["analyze", "--model", "run", "--token-ids", "short.json"])
        .args(["--jacobian", "off", "--null-draws", "0", "--out", "r.json"])
        .current_dir(p)
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{e}");
    assert!(
        e.contains("short.json holds 100 tokens") && e.contains("all of them"),
        "{e}"
    );
    let r: serde_json::Value =
        serde_json::from_slice(&std::fs::read(p.join("r.json")).unwrap()).unwrap();
    assert!(r.to_string().contains("100"), "{r}");
}
