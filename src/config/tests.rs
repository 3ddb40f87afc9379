//! Tests of resolution, overrides and validation.

use super::*;
use std::path::Path;

#[test]
fn presets_validate_and_paper_has_130m_params() {
    for p in PRESETS {
        Config::preset(p).unwrap().validate().unwrap();
    }
    let c = Config::preset("paper").unwrap();
    let (total, _) = c.model.param_counts();
    assert!((120_000_000..140_000_000).contains(&total), "{total}");
}

#[test]
fn overrides_apply_and_unknown_keys_fail() {
    let c = Config::resolve(
        Some("tiny"),
        None,
        &["model.top_k=1".into(), "train.lr=1".into()],
    )
    .unwrap();
    assert_eq!(c.model.top_k, 1);
    assert_eq!(c.train.lr, 1.0);
    let e = Config::resolve(Some("tiny"), None, &["model.topk=1".into()])
        .unwrap_err()
        .to_string();
    assert!(e.contains("model.topk") && e.contains("top_k"), "{e}");
    let e = Config::resolve(Some("tiny"), None, &["model.top_k=9".into()])
        .unwrap_err()
        .to_string();
    assert!(e.contains("model.top_k"), "{e}");
    let e = Config::resolve(Some("tiny"), None, &["model.n_head=3".into()])
        .unwrap_err()
        .to_string();
    assert!(e.contains("model.n_head"), "{e}");
    let e = Config::resolve(Some("tiny"), None, &["model.top_k=two".into()])
        .unwrap_err()
        .to_string();
    assert!(e.contains("expected a integer"), "{e}");
    let e = Config::resolve(Some("tiny"), None, &["train.engine=jit".into()])
        .unwrap_err()
        .to_string();
    assert!(e.contains("train.engine") && e.contains("autodiff"), "{e}");
    // Whether the fused engine covers a config is the engine's to say, at
    // training time (tests/cli.rs: `bad_config_is_refused_with_the_field_named`).
    assert!(Config::resolve(Some("tiny"), None, &["train.engine=fused".into()]).is_ok());
    let e = Config::resolve(Some("tiny"), None, &["model.routing=dense".into()])
        .unwrap_err()
        .to_string();
    assert!(e.contains("dense"), "{e}");
    let e = Config::resolve(Some("tiny"), None, &["reg.orth_family=left".into()])
        .unwrap_err()
        .to_string();
    assert!(e.contains("reg.orth_family"), "{e}");
    let c = Config::resolve(
        Some("tiny"),
        None,
        &[
            "measure.families=[\"down\"]".into(),
            "reg.orth_lambda=0.1".into(),
        ],
    )
    .unwrap();
    assert_eq!(
        (c.measure.families.clone(), c.reg.orth_lambda),
        (vec![Family::Down], 0.1)
    );
}

#[test]
fn regulariser_and_routing_options_are_checked() {
    let err = |sets: &[&str]| {
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        Config::resolve(Some("tiny"), None, &sets)
            .unwrap_err()
            .to_string()
    };
    assert!(err(&["reg.aux_lambda=-1"]).contains("reg.aux_lambda"));
    assert!(err(&["reg.loss_free_gamma=0.01", "model.routing=\"soft\""])
        .contains("reg.loss_free_gamma"));
    assert!(
        err(&["model.capacity_factor=1.5", "model.routing=\"soft\""])
            .contains("model.capacity_factor")
    );
    assert!(err(&["train.topk_start=3"]).contains("train.topk_start"));
    assert!(err(&["reg.contrastive_temperature=0"]).contains("reg.contrastive_temperature"));
    assert!(err(&["reg.grad_lambda=0.1", "reg.grad_family=\"gate\""]).contains("reg.grad_family"));
    // Loss-free balancing switches the bias on; expert choice validates.
    let c = Config::resolve(Some("tiny"), None, &["reg.loss_free_gamma=0.001".into()]).unwrap();
    assert!(c.model.balance_bias);
    let c = Config::resolve(
        Some("tiny"),
        None,
        &["model.routing=\"expert_choice\"".into()],
    )
    .unwrap();
    assert_eq!(c.model.routing, Routing::ExpertChoice);
}

#[test]
fn file_then_overrides_and_roundtrip() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("c.toml");
    std::fs::write(
        &p,
        "preset = \"small\"\n[model]\ntop_k = 1\n[train]\nlr = 0.002\n",
    )
    .unwrap();
    let c = Config::resolve(None, Some(&p), &["train.seed=7".into()]).unwrap();
    assert_eq!(
        (c.preset.as_str(), c.model.top_k, c.train.lr, c.train.seed),
        ("small", 1, 0.002, 7)
    );
    let back: Config = toml::from_str(&c.to_toml()).unwrap();
    assert_eq!(back, c);
    std::fs::write(&p, "[modle]\ntop_k = 1\n").unwrap();
    let e = Config::resolve(None, Some(&p), &[])
        .unwrap_err()
        .to_string();
    assert!(e.contains("modle") && e.contains("c.toml"), "{e}");
}

/// Every config file shipped in `configs/` resolves.
#[test]
fn shipped_configs_resolve() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "toml") {
            Config::resolve(None, Some(&p), &[]).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            n += 1;
        }
    }
    assert!(n >= 2);
}

/// A typed value that does not parse is refused with its key named and the
/// known values listed; a run's saved config.toml loads back unchanged.
#[test]
fn typed_values_name_their_key() {
    let err = |set: &str| {
        Config::resolve(Some("tiny"), None, &[set.to_string()])
            .unwrap_err()
            .to_string()
    };
    let e = err("measure.jacobian=fast");
    assert!(
        e.contains("measure.jacobian") && e.contains("estimate:M"),
        "{e}"
    );
    let e = err("measure.subspace=var:2");
    assert!(e.contains("measure.subspace") && e.contains("var:2"), "{e}");
    let e = err("measure.families=[\"up\", \"left\"]");
    assert!(
        e.contains("measure.families") && e.contains("router"),
        "{e}"
    );
    let e = err("model.expert=moe");
    assert!(e.contains("model.expert") && e.contains("swiglu"), "{e}");
    let c = Config::resolve(
        Some("tiny"),
        None,
        &[
            "measure.jacobian=estimate:16".into(),
            "measure.subspace=var:0.9".into(),
            "train.engine=autodiff".into(),
        ],
    )
    .unwrap();
    assert_eq!(c.measure.jacobian, JacobianMode::Estimate(16));
    assert_eq!(c.measure.subspace, RankRule::Variance(0.9, 16));
    assert_eq!(c.train.engine, EngineChoice::Autodiff);
    let text = c.to_toml();
    for line in [
        "engine = \"autodiff\"",
        "jacobian = \"estimate:16\"",
        "subspace = \"var:0.9\"",
        "families = [\n    \"up\",\n    \"gate\",\n    \"down\",\n    \"router\",\n]",
        "routing = \"topk\"",
        "orth_family = \"up\"",
    ] {
        assert!(text.contains(line), "{line} not in {text}");
    }
    assert_eq!(toml::from_str::<Config>(&text).unwrap(), c);
}

/// Resume starts from the saved config: `[train]` keys may change, `[model]`
/// and `[data]` keys may not, and a preset's defaults do not come back.
#[test]
fn resume_applies_sets_to_the_saved_config() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("config.toml");
    let saved = Config::resolve(Some("small"), None, &["model.top_k=1".into()]).unwrap();
    std::fs::write(&p, saved.to_toml()).unwrap();
    let c = Config::resume(&p, &["train.max_steps=7".into()]).unwrap();
    assert_eq!((c.train.max_steps, c.model.top_k), (7, 1));
    assert_eq!(c.model, saved.model);
    let e = Config::resume(&p, &["model.d_model=64".into()])
        .unwrap_err()
        .to_string();
    assert!(e.contains("--resume") && e.contains("[model]"), "{e}");
    let e = Config::resume(&p, &["train.engine=jit".into()])
        .unwrap_err()
        .to_string();
    assert!(e.contains("train.engine") && e.contains("autodiff"), "{e}");
    let e = Config::resume(&p, &["train.max_step=7".into()])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("train.max_step") && e.contains("max_steps"),
        "{e}"
    );
}
