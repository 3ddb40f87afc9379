//! End-to-end training: loss falls, resume is bit-exact, divergence keeps the
//! last good checkpoint.

mod common;

use moescope::train::train;

use common::{metrics, quiet_opts as opts};

#[test]
fn loss_falls_below_unigram_entropy_on_builtin_corpus() {
    let d = tempfile::tempdir().unwrap();
    let mut cfg = common::micro_config(&d.path().join("cache"));
    cfg.train.max_steps = 300;
    cfg.train.batch_size = 8;
    cfg.train.lr = 3e-3;
    cfg.train.eval_every = 0;
    cfg.train.checkpoint_every = 0;
    cfg.train.eval_tokens = 2048;
    let s = train(cfg, &opts(&d.path().join("run"))).unwrap();
    let rows = metrics(&d.path().join("run"));
    let first = rows.iter().find(|r| r["kind"] == "train").unwrap()["loss"]
        .as_f64()
        .unwrap();
    assert!(first > 4.0, "initial loss {first} should be near ln(vocab)");
    assert!(
        s.val_loss < s.unigram_entropy - 0.3,
        "val loss {} vs unigram entropy {}",
        s.val_loss,
        s.unigram_entropy
    );
    assert!((s.val_ppl - s.val_loss.exp()).abs() < 1e-9);
    // The final model is exported beside the run's checkpoints.
    assert!(d.path().join("run/model.safetensors").is_file());
    assert!(d.path().join("run/config.json").is_file());
}

/// Trains `cfg` into `dir/a` without a break and into `dir/b` stopped after
/// step 4, then (after `between(b)`) resumed; asserts that both end with the
/// same weights, byte for byte, and returns (a, b).
fn resumed_equals_uninterrupted(
    cfg: &moescope::config::Config,
    dir: &std::path::Path,
    between: impl FnOnce(&std::path::Path),
) -> (std::path::PathBuf, std::path::PathBuf) {
    let (a, b) = (dir.join("a"), dir.join("b"));
    train(cfg.clone(), &opts(&a)).unwrap();
    let mut o = opts(&b);
    o.stop_after = Some(4);
    assert!(train(cfg.clone(), &o).is_err());
    between(&b);
    let mut o = opts(&b);
    o.resume = true;
    train(cfg.clone(), &o).unwrap();
    let wa = std::fs::read(a.join("model.safetensors")).unwrap();
    let wb = std::fs::read(b.join("model.safetensors")).unwrap();
    assert!(wa == wb, "resumed weights differ from an uninterrupted run");
    (a, b)
}

#[test]
fn resume_is_bit_exact() {
    let d = tempfile::tempdir().unwrap();
    let mut cfg = common::micro_config(&d.path().join("cache"));
    cfg.train.grad_accum = 2; // accumulation is part of the state too
                              // Interrupted after step 4 (checkpoint at 3): the work of step 4 is lost.
    let stale = d.path().join("b/checkpoints/.step-0000006.tmp-999999");
    let (a, b) = resumed_equals_uninterrupted(&cfg, d.path(), |b| {
        assert!(!b.join("model.safetensors").exists());
        // A half-written checkpoint folder of a killed process is ignored, then cleaned up.
        std::fs::create_dir_all(&stale).unwrap();
        std::fs::write(stale.join("model.safetensors"), b"garbage").unwrap();
    });
    assert!(
        !stale.exists(),
        "stale temporary checkpoint folder left behind"
    );
    // The metrics log reads as if the run had never stopped.
    let strip = |rows: Vec<serde_json::Value>| -> Vec<(String, u64, String)> {
        rows.iter()
            .map(|r| {
                (
                    r["kind"].to_string(),
                    r["step"].as_u64().unwrap(),
                    format!("{}{}", r["loss"], r["val_loss"]),
                )
            })
            .collect()
    };
    assert_eq!(strip(metrics(&a)), strip(metrics(&b)));
}

#[test]
fn divergence_stops_and_keeps_last_good_checkpoint() {
    let d = tempfile::tempdir().unwrap();
    let cfg = common::micro_config(&d.path().join("cache"));
    let run = d.path().join("run");
    let mut o = opts(&run);
    o.stop_after = Some(3);
    let _ = train(cfg.clone(), &o);
    let ckpt = run.join("checkpoints/step-0000003/model.safetensors");
    let before = std::fs::read(&ckpt).unwrap();

    let mut bad = cfg;
    bad.train.lr = 1e30;
    bad.train.min_lr = 1e29;
    bad.train.grad_clip = 0.0;
    let mut o = opts(&run);
    o.resume = true;
    let err = train(bad, &o).unwrap_err().to_string();
    assert!(
        err.contains("diverged") && err.contains("step-0000003"),
        "{err}"
    );
    assert_eq!(
        std::fs::read(&ckpt).unwrap(),
        before,
        "the good checkpoint was modified"
    );
    assert_eq!(
        std::fs::read_to_string(run.join("checkpoints/latest")).unwrap(),
        "step-0000003"
    );
}

#[test]
fn existing_run_is_not_overwritten_without_resume() {
    let d = tempfile::tempdir().unwrap();
    let mut cfg = common::micro_config(&d.path().join("cache"));
    cfg.train.max_steps = 2;
    let run = d.path().join("run");
    train(cfg.clone(), &opts(&run)).unwrap();
    let before = std::fs::read(run.join("model.safetensors")).unwrap();
    let err = train(cfg, &opts(&run)).unwrap_err().to_string();
    assert!(err.contains("--resume"), "{err}");
    assert_eq!(
        std::fs::read(run.join("model.safetensors")).unwrap(),
        before
    );
}

/// Resume stays exact with the stateful training options: loss-free
/// balancing biases, progressive top-k, a capacity limit, and batch
/// regularisers with gradient-space orthogonality.
#[test]
fn resume_is_bit_exact_with_balancing_and_regularisers() {
    let d = tempfile::tempdir().unwrap();
    let mut cfg = common::micro_config(&d.path().join("cache"));
    cfg.model.balance_bias = true;
    cfg.model.capacity_factor = 1.25;
    cfg.model.top_k = 3;
    cfg.train.topk_start = 1;
    cfg.reg.loss_free_gamma = 0.01;
    cfg.reg.act_lambda = 0.1;
    cfg.reg.aux_lambda = 0.01;
    cfg.reg.grad_lambda = 0.1;
    cfg.model.dropout = 0.1; // its masks are drawn again, the same, on resume
    cfg.validate().unwrap();
    let (a, b) = resumed_equals_uninterrupted(&cfg, d.path(), |_| {});
    let rows = |p: &std::path::Path| -> Vec<String> {
        metrics(p)
            .iter()
            .filter(|r| r["kind"] == "train")
            .map(|r| {
                format!(
                    "{} {} {} {}",
                    r["loss"], r["act_loss"], r["dropped_frac"], r["top_k"]
                )
            })
            .collect()
    };
    assert_eq!(rows(&a), rows(&b));
}

/// The fused engine and the autodiff reference train the same model along the
/// same loss curve for 200 steps (float32 noise only: observed 3e-6
/// relative at worst), L_orth included, and the default config takes the
/// fused engine.
#[test]
fn fused_engine_follows_the_autodiff_training_curve() {
    let d = tempfile::tempdir().unwrap();
    let mut cfg = common::micro_config(&d.path().join("cache"));
    cfg.train.max_steps = 200;
    cfg.train.lr = 2e-3;
    cfg.train.eval_every = 0;
    cfg.train.checkpoint_every = 0;
    cfg.reg.orth_lambda = 0.05;
    assert!(moescope::train::engine::unsupported(&cfg).is_none());
    let run = |engine: &str| {
        let mut c = cfg.clone();
        c.train.engine = engine.parse().unwrap();
        let out = d.path().join(engine);
        let s = train(c, &opts(&out)).unwrap();
        let rows = metrics(&out);
        let curve: Vec<(f64, f64)> = rows
            .iter()
            .filter(|r| r["kind"] == "train")
            .map(|r| {
                (
                    r["loss"].as_f64().unwrap(),
                    r["orth_loss"].as_f64().unwrap(),
                )
            })
            .collect();
        (curve, s.val_loss)
    };
    let (fused, fused_val) = run("fused");
    let (reference, reference_val) = run("autodiff");
    assert_eq!(fused.len(), 200);
    assert_eq!(reference.len(), 200);
    let mut worst = 0.0f64;
    for (step, (a, b)) in fused.iter().zip(&reference).enumerate() {
        let rel = (a.0 - b.0).abs() / b.0;
        worst = worst.max(rel);
        assert!(
            rel < 1e-4,
            "step {}: loss {} (fused) vs {} (autodiff)",
            step + 1,
            a.0,
            b.0
        );
        assert!(
            (a.1 - b.1).abs() <= 1e-3 * b.1.abs() + 1e-9,
            "step {}: orth {} vs {}",
            step + 1,
            a.1,
            b.1
        );
    }
    // The first steps agree to float32 rounding; the loss fell along the way.
    assert!((fused[0].0 - reference[0].0).abs() < 1e-5 * reference[0].0);
    assert!(
        fused[199].0 < fused[0].0 - 1.0,
        "{:?} -> {:?}",
        fused[0],
        fused[199]
    );
    assert!(
        (fused_val - reference_val).abs() < 1e-4 * reference_val,
        "{fused_val} vs {reference_val}"
    );
    eprintln!("worst relative loss difference over 200 steps: {worst:.2e}");
}

/// The state a kill between a checkpoint's rename and its `latest` pointer
/// write leaves (here the first checkpoint, so no pointer at all): resume
/// finds the newest complete checkpoint itself and never starts over.
#[test]
fn resume_finds_the_newest_checkpoint_without_the_latest_pointer() {
    let d = tempfile::tempdir().unwrap();
    let cfg = common::micro_config(&d.path().join("cache"));
    let (a, b) = resumed_equals_uninterrupted(&cfg, d.path(), |b| {
        std::fs::remove_file(b.join("checkpoints/latest")).unwrap();
    });
    let kinds = |p: &std::path::Path| -> Vec<(String, u64)> {
        metrics(p)
            .iter()
            .map(|r| (r["kind"].to_string(), r["step"].as_u64().unwrap()))
            .collect()
    };
    // One `start` row: the run went on from step 3 rather than from 0.
    assert_eq!(kinds(&a), kinds(&b));
    assert_eq!(
        std::fs::read_to_string(b.join("checkpoints/latest")).unwrap(),
        "step-0000006"
    );
}

/// A kill before the first checkpoint, then a rerun with resume (what a
/// sweep worker does): the run starts over once, with one `start` row.
#[test]
fn rerun_after_a_kill_before_the_first_checkpoint_logs_one_start_row() {
    let d = tempfile::tempdir().unwrap();
    let cfg = common::micro_config(&d.path().join("cache"));
    let run = d.path().join("run");
    let mut o = opts(&run);
    o.stop_after = Some(2);
    assert!(train(cfg.clone(), &o).is_err());
    assert!(!run.join("checkpoints").exists());
    let mut o = opts(&run);
    o.resume = true;
    train(cfg, &o).unwrap();
    let starts = metrics(&run)
        .iter()
        .filter(|r| r["kind"] == "start")
        .count();
    assert_eq!(starts, 1);
}

/// Writes `tensors` of `file` back with the first tensor set to NaN.
fn poison(file: &std::path::Path) {
    let mut t = moescope::checkpoint::read_safetensors(file, &candle_core::Device::Cpu).unwrap();
    let mut names: Vec<String> = t.keys().cloned().collect();
    names.sort();
    let first = t[&names[0]].clone();
    t.insert(names[0].clone(), (first * f64::NAN).unwrap());
    let named: Vec<(String, candle_core::Tensor)> = t.into_iter().collect();
    let bytes = moescope::checkpoint::safetensors_bytes(&named, None).unwrap();
    std::fs::write(file, bytes).unwrap();
}

/// A broken newest checkpoint (NaN weights, or a truncated file) with an
/// older sound one: resume refuses and names the older one; `resume_from`
/// continues from it exactly; a divergence then never calls the NaN
/// checkpoint good.
#[test]
fn broken_newest_checkpoint_offers_the_older_one() {
    let d = tempfile::tempdir().unwrap();
    let mut cfg = common::micro_config(&d.path().join("cache"));
    cfg.train.max_steps = 9;
    let (a, b) = (d.path().join("a"), d.path().join("b"));
    train(cfg.clone(), &opts(&a)).unwrap();
    let mut o = opts(&b);
    o.stop_after = Some(6);
    assert!(train(cfg.clone(), &o).is_err());
    let newest = b.join("checkpoints/step-0000006/model.safetensors");
    let good = std::fs::read(&newest).unwrap();
    let mut resume = opts(&b);
    resume.resume = true;
    for corrupt in ["nan", "truncated"] {
        match corrupt {
            "nan" => poison(&newest),
            _ => std::fs::write(&newest, &good[..good.len() / 3]).unwrap(),
        }
        let err = train(cfg.clone(), &resume).unwrap_err().to_string();
        assert!(
            err.contains("step-0000006")
                && err.contains("--resume-from step-0000003")
                && !err.contains("last good"),
            "{corrupt}: {err}"
        );
    }
    std::fs::write(&newest, &good).unwrap();
    poison(&newest);
    // Diverging from step 3 with the NaN checkpoint still there.
    let mut bad = cfg.clone();
    (bad.train.lr, bad.train.min_lr, bad.train.grad_clip) = (1e30, 1e29, 0.0);
    let mut from = opts(&b);
    from.resume_from = Some("step-0000003".into());
    let err = train(bad, &from).unwrap_err().to_string();
    assert!(
        err.contains("diverged") && err.contains("step-0000003") && !err.contains("step-0000006"),
        "{err}"
    );
    train(cfg, &from).unwrap();
    assert!(
        std::fs::read(a.join("model.safetensors")).unwrap()
            == std::fs::read(b.join("model.safetensors")).unwrap(),
        "resumed weights differ from an uninterrupted run"
    );
}

/// A corpus moved to another folder resumes (same token stream); a corpus
/// whose text changed does not.
#[test]
fn resume_follows_a_moved_corpus_but_not_other_text() {
    let d = tempfile::tempdir().unwrap();
    let text: String = (0..400)
        .map(|i| format!("line {i} of a corpus that moves around.\n"))
        .collect();
    let (old, new) = (d.path().join("old"), d.path().join("new"));
    std::fs::create_dir_all(&old).unwrap();
    std::fs::write(old.join("corpus.txt"), &text).unwrap();
    let mut cfg = common::micro_config(&d.path().join("cache"));
    cfg.data.path = old.join("corpus.txt").display().to_string();
    cfg.data.tokenizer = "bytes".into();
    let mut moved = cfg.clone();
    moved.data.path = new.join("corpus.txt").display().to_string();
    let (a, b) = (d.path().join("a"), d.path().join("b"));
    train(cfg.clone(), &opts(&a)).unwrap();
    let mut o = opts(&b);
    o.stop_after = Some(4);
    assert!(train(cfg.clone(), &o).is_err());
    std::fs::rename(&old, &new).unwrap();
    let mut o = opts(&b);
    o.resume = true;
    std::fs::write(new.join("corpus.txt"), text.replace("line", "LINE")).unwrap();
    let err = train(moved.clone(), &o).unwrap_err().to_string();
    assert!(
        err.contains("data") && err.contains("token stream"),
        "{err}"
    );
    std::fs::write(new.join("corpus.txt"), &text).unwrap();
    train(moved, &o).unwrap();
    assert!(
        std::fs::read(a.join("model.safetensors")).unwrap()
            == std::fs::read(b.join("model.safetensors")).unwrap(),
        "resumed weights differ from an uninterrupted run"
    );
}
