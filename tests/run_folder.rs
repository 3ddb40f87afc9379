//! The run folder through the command line: folders that are not runs are
//! refused untouched, one trainer at a time, rerunning a command resumes,
//! impossible sizes are refused before anything is written, and paths need
//! not be UTF-8.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn moescope(args: &[&std::ffi::OsStr]) -> Output {
    Command::new(common::bin()).args(args).output().unwrap()
}

/// `train` with a micro config into `out` (its cache beside it), plus `extra`.
fn train_cmd(out: &Path, extra: &[&str]) -> Output {
    let cache = out.with_extension("cache");
    let mut args: Vec<std::ffi::OsString> =
        vec!["train".into(), "--out".into(), out.into(), "-q".into()];
    let sets = [
        format!("data.cache_dir={:?}", cache.display().to_string()),
        "data.builtin_bytes=40000".into(),
        "model.n_layer=1".into(),
        "model.d_model=32".into(),
        "model.d_ff=32".into(),
        "model.seq_len=32".into(),
        "train.max_steps=4".into(),
        "train.checkpoint_every=2".into(),
        "train.eval_tokens=256".into(),
        "train.batch_size=2".into(),
    ];
    for s in sets {
        args.push("--set".into());
        args.push(s.into());
    }
    args.extend(extra.iter().map(Into::into));
    let refs: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
    moescope(&refs)
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A non-zero exit (1, not a signal) whose message holds every needle, no panic.
fn assert_refused(o: &Output, needles: &[&str]) {
    let e = stderr(o);
    assert_eq!(o.status.code(), Some(1), "expected exit 1: {e}");
    assert!(!e.contains("panicked"), "panic: {e}");
    for n in needles {
        assert!(e.contains(n), "stderr lacks `{n}`: {e}");
    }
}

/// Every file under `dir` with its bytes (the folder's full state).
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(snapshot(&p));
            } else {
                out.insert(p.clone(), std::fs::read(&p).unwrap());
            }
        }
    }
    out
}

/// A folder that looks like a Hugging Face model.
fn hf_like_folder(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("config.json"), br#"{"model_type": "mixtral"}"#).unwrap();
    std::fs::write(dir.join("model.safetensors"), b"their weights").unwrap();
}

#[test]
fn folders_that_are_not_runs_are_refused_untouched() {
    let d = tempfile::tempdir().unwrap();
    let theirs = d.path().join("hf-model");
    hf_like_folder(&theirs);
    let before = snapshot(&theirs);
    let o = train_cmd(&theirs, &[]);
    assert_refused(
        &o,
        &[
            "hf-model",
            "not a moescope run",
            "config.json",
            "model.safetensors",
        ],
    );
    let o = moescope(&[
        "bench".as_ref(),
        "hf".as_ref(),
        "--dir".as_ref(),
        theirs.as_os_str(),
        "--layers".as_ref(),
        "1".as_ref(),
    ]);
    assert_refused(&o, &["hf-model", "config.json"]);
    assert_eq!(snapshot(&theirs), before, "their files changed");
}

#[test]
fn a_second_trainer_on_the_same_folder_fails_at_once() {
    let d = tempfile::tempdir().unwrap();
    let run = d.path().join("run");
    std::fs::create_dir_all(&run).unwrap();
    let lock = std::fs::File::create(run.join(".lock")).unwrap();
    lock.try_lock().unwrap();
    let before = snapshot(&run);
    let t0 = std::time::Instant::now();
    let o = train_cmd(&run, &[]);
    assert_refused(&o, &["run", "another process is training"]);
    assert!(t0.elapsed().as_secs() < 60, "took {:?}", t0.elapsed());
    assert_eq!(snapshot(&run), before);
    // Released (as on a crash, by the OS): training proceeds.
    drop(lock);
    let o = train_cmd(&run, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn rerunning_the_same_command_resumes() {
    let d = tempfile::tempdir().unwrap();
    let run = d.path().join("run");
    let (c3, c4) = (d.path().join("seed3.toml"), d.path().join("seed4.toml"));
    std::fs::write(&c3, "preset = \"tiny\"\n[train]\nseed = 3\n").unwrap();
    std::fs::write(&c4, "preset = \"tiny\"\n[train]\nseed = 4\n").unwrap();
    let same = ["--config", c3.to_str().unwrap()];
    // --resume auto starts a run where there is none...
    let stopped: Vec<&str> = [&same[..], &["--resume", "auto", "--stop-after", "2"]].concat();
    assert!(!train_cmd(&run, &stopped).status.success());
    assert!(run.join("checkpoints/step-0000002").is_dir());
    // ...and the same command with --resume continues it.
    let o = train_cmd(&run, &[&same[..], &["--resume"]].concat());
    assert!(o.status.success(), "{}", stderr(&o));
    let starts = common::metrics(&run)
        .iter()
        .filter(|r| r["kind"] == "start")
        .count();
    assert_eq!(starts, 1);
    // A key whose value differs is named with both values.
    let o = train_cmd(&run, &["--config", c4.to_str().unwrap(), "--resume"]);
    assert_refused(&o, &["train.seed: the run has 3, this command gives 4"]);
    // --resume auto on a finished run resumes it (nothing left to train).
    let o = train_cmd(&run, &[&same[..], &["--resume", "auto"]].concat());
    assert!(o.status.success(), "{}", stderr(&o));
    // Without its config.toml the run says so (not a model mismatch).
    std::fs::remove_file(run.join("config.toml")).unwrap();
    let o = train_cmd(&run, &["--resume"]);
    assert_refused(&o, &["config.toml is missing"]);
}

#[test]
fn impossible_sizes_are_refused_before_anything_is_written() {
    let d = tempfile::tempdir().unwrap();
    let run = d.path().join("run");
    for (set, key) in [
        ("train.batch_size=1000000000000", "train.batch_size"),
        ("model.seq_len=1000000000", "model.seq_len"),
        ("model.d_model=1000000000", "model.d_model"),
        ("model.n_experts=100000000", "model.n_experts"),
        ("train.threads=1000000", "train.threads"),
    ] {
        let o = train_cmd(&run, &["--set", set]);
        assert_refused(&o, &[key]);
        assert!(!run.exists(), "{set}: the run folder was created");
    }
    let o = train_cmd(&run, &["--set", "data.builtin_bytes=0"]);
    assert_refused(&o, &["data.builtin_bytes"]);
}

#[test]
fn paths_need_not_be_utf8() {
    use std::os::unix::ffi::OsStrExt;
    let d = tempfile::tempdir().unwrap();
    let bad = d.path().join(std::ffi::OsStr::from_bytes(b"bad\xff"));
    let o = train_cmd(&bad, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(bad.join("summary.json").is_file());
    let o = moescope(&[
        "eval".as_ref(),
        "--model".as_ref(),
        bad.as_os_str(),
        "--tokens".as_ref(),
        "50".as_ref(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = train_cmd(&bad, &["--resume"]);
    assert!(o.status.success(), "{}", stderr(&o));
    // A corpus at a non-UTF-8 path is named, not reported missing.
    let corpus = d
        .path()
        .join(std::ffi::OsStr::from_bytes(b"corpus\xff.txt"));
    std::fs::write(&corpus, "some text\n".repeat(500)).unwrap();
    let out = d.path().join("run2");
    let mut args: Vec<&std::ffi::OsStr> = vec!["train".as_ref(), "--out".as_ref(), out.as_os_str()];
    args.extend(["--data".as_ref(), corpus.as_os_str()]);
    let o = moescope(&args);
    assert_refused(&o, &["--data", "corpus", "UTF-8"]);
}
