//! `moescope bench eval`: what logging the measures costs an evaluation pass.

use super::{median, Markov};
use crate::config::ModelConfig;
use crate::model::Gpt;
use crate::train::{eval_measures, evaluate_measured, MeasureSpec};
use crate::Result;
use candle_core::{DType, Device};
use serde::Serialize;
use std::time::Instant;

/// Result of `moescope bench eval`: the cost of logging the measures.
#[derive(Debug, Clone, Serialize)]
pub struct EvalBenchResult {
    pub mode: &'static str,
    pub preset: String,
    pub eval_tokens: usize,
    pub measure_tokens: usize,
    /// Median seconds of an evaluation pass without measures.
    pub plain_s: f64,
    /// Median seconds of the same pass capturing activations on `measure_tokens`
    /// tokens, plus computing all logged measures (weight MSO per family included).
    pub measured_s: f64,
    /// 100 · (measured − plain) / plain.
    pub overhead_pct: f64,
    /// Seconds of the weight measures alone (part of `measured_s`).
    pub weight_measures_s: f64,
    pub reps: usize,
}

/// Time an evaluation pass with and without the measures, alternating.
pub fn bench_eval(
    preset: &str,
    cfg: &ModelConfig,
    eval_tokens: usize,
    measure_tokens: usize,
    batch: usize,
    reps: usize,
) -> Result<EvalBenchResult> {
    let dev = Device::Cpu;
    let model = Gpt::new(cfg, DType::F32, &dev, 0)?;
    let mut data = Markov::new(cfg.vocab_size, 0);
    let (toks, _) = data.batch(1, eval_tokens + 1);
    let dir = std::env::temp_dir().join(format!("moescope-bench-{}", std::process::id()));
    let path = dir.join("eval.tok");
    crate::data::cache::TokenFile::write(&path, &toks, "bench", "bench", "valid")?;
    let file = crate::data::cache::TokenFile::open(&path)?;
    // What a training run logs by default: every family, granularity and space.
    let measure = crate::config::MeasureConfig::default();
    let (mut plain, mut measured) = (Vec::new(), Vec::new());
    for r in 0..reps + 1 {
        let t0 = Instant::now();
        evaluate_measured(&model, &file, batch, eval_tokens, None)?;
        let p = t0.elapsed().as_secs_f64();
        let t0 = Instant::now();
        let (_, accs) = evaluate_measured(
            &model,
            &file,
            batch,
            eval_tokens,
            Some(MeasureSpec {
                tokens: measure_tokens,
                seed: 0,
                spaces: measure.act_space.clone(),
            }),
        )?;
        eval_measures(&model, &measure, accs.as_deref())?;
        let m = t0.elapsed().as_secs_f64();
        if r > 0 {
            plain.push(p);
            measured.push(m);
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    let t0 = Instant::now();
    eval_measures(&model, &measure, None)?;
    let weight_s = t0.elapsed().as_secs_f64();
    let (p, m) = (median(&mut plain), median(&mut measured));
    Ok(EvalBenchResult {
        mode: "eval",
        preset: preset.to_string(),
        eval_tokens,
        measure_tokens,
        plain_s: p,
        measured_s: m,
        overhead_pct: 100.0 * (m - p) / p,
        weight_measures_s: weight_s,
        reps,
    })
}
