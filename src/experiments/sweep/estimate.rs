//! The wall time a sweep's remaining runs are expected to take, printed
//! before it starts so that nobody launches a week of work by accident.

use super::{read_status, Cell, SweepDir};
use crate::config::Config;

/// Model FLOP/s one core of the reference machine (2-core AVX-512, the one
/// DESIGN.md's speed section was measured on) sustains in `train` on the
/// `small` preset with GPT-2 tokens, one single-threaded run per core (as
/// `sweep` runs them there): about 60 GFLOP/s each.
pub const FLOPS_PER_CORE: f64 = 60e9;

/// Seconds one run of `cfg` is expected to take on `cores` cores: training
/// (6·N FLOPs per token) plus every evaluation (a forward pass, 2·N).
pub fn run_seconds(cfg: &Config, cores: usize) -> f64 {
    let mut m = cfg.model.clone();
    if m.vocab_size == 0 {
        // Set from the tokeniser at train time: bytes for the built-in corpus, else GPT-2's.
        let bytes = cfg.data.tokenizer == "bytes"
            || (cfg.data.tokenizer == "auto"
                && cfg.data.path.is_empty()
                && cfg.data.dataset == "builtin");
        m.vocab_size = if bytes { 256 } else { 50_304 };
    }
    let t = &cfg.train;
    let per_token = m.flops_per_token();
    let steps = t.total_steps(m.seq_len);
    let train = (steps * t.batch_size * t.grad_accum * m.seq_len) as f64 * per_token;
    let periodic = steps.checked_div(t.eval_every).unwrap_or(0); // eval_every 0: none
    let evals = periodic + 1 + usize::from(t.eval_at_start);
    let eval_tokens = if t.eval_tokens > 0 {
        t.eval_tokens
    } else {
        100_000
    };
    let eval = (evals * eval_tokens) as f64 * per_token / 3.0;
    (train + eval) / (FLOPS_PER_CORE * cores.max(1) as f64)
}

/// (runs still to do, expected seconds for them) with `cores` cores in all.
pub fn remaining(dir: &SweepDir, cells: &[Cell], cores: usize) -> (usize, f64) {
    let todo: Vec<&Config> = cells
        .iter()
        .filter(|c| read_status(dir, &c.id).is_none_or(|s| s.status != "done"))
        .filter_map(|c| c.config.as_ref().ok())
        .collect();
    // Runs share the cores: the total work over all of them.
    let secs = todo.iter().map(|c| run_seconds(c, cores)).sum();
    (todo.len(), secs)
}

/// "2 h 05 min", "14 min", "40 s".
pub fn human(secs: f64) -> String {
    let s = secs.round() as u64;
    if s >= 3600 {
        format!("{} h {:02} min", s / 3600, (s % 3600) / 60)
    } else if s >= 60 {
        format!("{} min", s.div_ceil(60))
    } else {
        format!("{s} s")
    }
}
