//! `moescope reproduce`: the weight–activation study as a preset sweep.

use super::sweep::SweepSpec;
use crate::{Error, Result};

/// The paper's λ values.
pub const PAPER_LAMBDAS: [f64; 7] = [0.0, 0.001, 0.005, 0.01, 0.05, 0.1, 0.2];

/// The sweep of a scale: `quick` (tiny, 3 λ, 2 seeds), `cpu` (small, 7 λ,
/// 3 seeds) or `paper` (paper, 7 λ, 5 seeds, three corpora). `data` replaces
/// the corpus (a path) for every scale; without it `quick` and `cpu` use the
/// built-in corpus and `paper` the named datasets.
pub fn spec(scale: &str, data: Option<&str>) -> Result<SweepSpec> {
    let mut grid = toml::Table::new();
    let mut set = toml::Table::new();
    let lambdas =
        |v: &[f64]| toml::Value::Array(v.iter().map(|&x| toml::Value::Float(x)).collect());
    let seeds = |n: i64| toml::Value::Array((0..n).map(toml::Value::Integer).collect());
    let preset = match scale {
        "quick" => {
            grid.insert("reg.orth_lambda".into(), lambdas(&[0.0, 0.01, 0.1]));
            grid.insert("train.seed".into(), seeds(2));
            set.insert("measure.tokens".into(), toml::Value::Integer(2048));
            "tiny"
        }
        "cpu" => {
            grid.insert("reg.orth_lambda".into(), lambdas(&PAPER_LAMBDAS));
            grid.insert("train.seed".into(), seeds(3));
            "small"
        }
        "paper" => {
            grid.insert("reg.orth_lambda".into(), lambdas(&PAPER_LAMBDAS));
            grid.insert("train.seed".into(), seeds(5));
            if data.is_none() {
                grid.insert(
                    "data.dataset".into(),
                    toml::Value::Array(
                        ["tinystories", "wikitext-103", "ptb"]
                            .iter()
                            .map(|s| toml::Value::String(s.to_string()))
                            .collect(),
                    ),
                );
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
    if let Some(d) = data {
        set.insert("data.path".into(), toml::Value::String(d.to_string()));
    }
    Ok(SweepSpec {
        name: format!("reproduce-{scale}"),
        preset: Some(preset.into()),
        base: None,
        set,
        grid,
    })
}
