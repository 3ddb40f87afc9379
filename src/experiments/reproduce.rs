//! `moescope reproduce`: the weight–activation study (arXiv 2601.00457) as a
//! preset sweep, at three scales.

use super::sweep::SweepSpec;
use crate::{Error, Result};
use toml::Value;

/// The study's λ values.
pub const PAPER_LAMBDAS: [f64; 7] = [0.0, 0.001, 0.005, 0.01, 0.05, 0.1, 0.2];
/// The study's seeds.
pub const PAPER_SEEDS: [i64; 5] = [42, 123, 456, 789, 1337];
/// TinyStories' training tokens in the study's Table 4 ("2.1M"; whether
/// tokens or bytes is not said: moescope reads tokens).
pub const TINYSTORIES_TOKENS: i64 = 2_100_000;

/// The sweep of a scale:
/// - `quick`: tiny, λ ∈ {0, 0.01, 0.1}, 2 seeds (minutes; a smoke test);
/// - `cpu`: small (d 128, 6 layers), 700 steps (0.6 epoch of PTB), the 7 λ, the study's first
///   3 seeds (about two hours per corpus on 2 cores);
/// - `paper`: the study's model, 10K steps, the 7 λ × its 5 seeds on
///   TinyStories (first 2.1M tokens), WikiText-103 and PTB (GPU / Slurm).
///
/// `data` replaces the corpus (a path) for every scale; without it `quick`
/// and `cpu` use the built-in corpus and `paper` the named datasets.
pub fn spec(scale: &str, data: Option<&str>) -> Result<SweepSpec> {
    let mut grid = toml::Table::new();
    let mut set = toml::Table::new();
    let floats = |v: &[f64]| Value::Array(v.iter().map(|&x| Value::Float(x)).collect());
    let ints = |v: &[i64]| Value::Array(v.iter().map(|&x| Value::Integer(x)).collect());
    let preset = match scale {
        "quick" => {
            grid.insert("reg.orth_lambda".into(), floats(&[0.0, 0.01, 0.1]));
            grid.insert("train.seed".into(), ints(&[0, 1]));
            set.insert("measure.tokens".into(), Value::Integer(2048));
            "tiny"
        }
        "cpu" => {
            grid.insert("reg.orth_lambda".into(), floats(&PAPER_LAMBDAS));
            grid.insert("train.seed".into(), ints(&PAPER_SEEDS[..3]));
            set.insert("train.max_steps".into(), Value::Integer(700));
            set.insert("train.eval_every".into(), Value::Integer(350));
            set.insert("train.checkpoint_every".into(), Value::Integer(350));
            "small"
        }
        "paper" => {
            grid.insert("reg.orth_lambda".into(), floats(&PAPER_LAMBDAS));
            grid.insert("train.seed".into(), ints(&PAPER_SEEDS));
            if data.is_none() {
                grid.insert("data".into(), paper_corpora());
            }
            "paper"
        }
        other => {
            return Err(Error::config(
                "--scale",
                format!("unknown scale `{other}` (quick, cpu or paper)"),
            ))
        }
    };
    // Where the measures start from: an evaluation before the first step.
    set.insert("train.eval_at_start".into(), Value::Boolean(true));
    if let Some(d) = data {
        set.insert("data.path".into(), Value::String(d.to_string()));
    }
    Ok(SweepSpec {
        name: format!("reproduce-{scale}"),
        preset: Some(preset.into()),
        base: None,
        set,
        grid,
        report: Default::default(),
    })
}

/// The study's three corpora, TinyStories capped at its 2.1M tokens.
fn paper_corpora() -> Value {
    let corpus = |name: &str, cap: Option<i64>| {
        let mut t = toml::Table::new();
        t.insert("dataset".into(), Value::String(name.into()));
        if let Some(c) = cap {
            t.insert("max_train_tokens".into(), Value::Integer(c));
        }
        Value::Table(t)
    };
    Value::Array(vec![
        corpus("tinystories", Some(TINYSTORIES_TOKENS)),
        corpus("wikitext-103", None),
        corpus("ptb", None),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_paper_scale_follows_the_study() {
        let cells = spec("paper", None).unwrap().cells().unwrap();
        assert_eq!(cells.len(), 7 * 5 * 3);
        let mut seeds: Vec<u64> = cells
            .iter()
            .map(|c| c.config.as_ref().unwrap().train.seed)
            .collect();
        seeds.sort();
        seeds.dedup();
        assert_eq!(seeds, vec![42, 123, 456, 789, 1337]);
        for c in &cells {
            let cfg = c.config.as_ref().unwrap();
            assert_eq!(cfg.train.max_steps, 10_000);
            assert!(cfg.train.eval_at_start);
            let cap = if cfg.data.dataset == "tinystories" {
                2_100_000
            } else {
                0
            };
            assert_eq!(cfg.data.max_train_tokens, cap, "{}", cfg.data.dataset);
        }
    }
}
