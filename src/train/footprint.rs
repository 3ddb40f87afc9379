//! What a config asks of the machine, checked before anything is allocated
//! or written: threads, and the memory of the parameters, the optimiser
//! state and the activations. An allocation that fails aborts the process
//! with no word of the key at fault, so sizes are refused here instead.

use crate::config::{Config, ExpertKind, ModelConfig, TrainConfig};
use crate::{Error, Result};

/// Refuse more threads than 4 × this machine's cores (creating a million
/// threads hangs the machine rather than failing).
pub fn check_threads(train: &TrainConfig) -> Result<()> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    if train.threads > 4 * cores {
        return Err(Error::config(
            "train.threads",
            format!(
                "{} is more than 4 × the {cores} cores of this machine; use 0 (all cores) or at most {}",
                train.threads,
                4 * cores
            ),
        ));
    }
    Ok(())
}

/// Estimated bytes a training run holds: (parameters with their gradients and
/// AdamW moments, activations of one micro-batch). Floating point, so that
/// absurd sizes cannot overflow.
pub fn training_bytes(cfg: &Config) -> (f64, f64) {
    let m = &cfg.model;
    let state = 16.0 * param_count(m);
    let (d, f, t) = (m.d_model as f64, m.d_ff as f64, m.seq_len as f64);
    let ffn_moe = m.active_experts() as f64 * 3.0 * f + m.n_experts as f64;
    let moe_layers = m.moe_layers().len() as f64;
    let dense_layers = m.n_layer as f64 - moe_layers;
    let per_token = m.n_layer as f64 * (12.0 * d + 2.0 * m.n_head as f64 * t)
        + moe_layers * ffn_moe
        + dense_layers * 3.0 * f
        + 3.0 * m.vocab_size as f64;
    // The backward pass holds about as much again.
    let acts = 2.0 * 4.0 * per_token * cfg.train.batch_size as f64 * t;
    (state, acts)
}

/// Total parameters (as [`ModelConfig::param_counts`], in f64).
fn param_count(m: &ModelConfig) -> f64 {
    let (d, f, v, e) = (
        m.d_model as f64,
        m.d_ff as f64,
        m.vocab_size as f64,
        m.n_experts as f64,
    );
    let b = f64::from(u8::from(m.bias));
    let expert = match m.expert {
        ExpertKind::Mlp => 2.0 * d * f + b * (f + d),
        ExpertKind::Swiglu => 3.0 * d * f,
    };
    let per_layer = 4.0 * d * d + 2.0 * d + b * 6.0 * d;
    let moe = m.moe_layers().len() as f64;
    let dense = m.n_layer as f64 - moe;
    (v + m.seq_len as f64 + 1.0 + b) * d
        + m.n_layer as f64 * per_layer
        + moe * (d * e + e * expert + e)
        + dense * (2.0 * d * f + b * (f + d))
}

/// Refuse a config whose estimated training memory exceeds this machine's
/// (for CPU training; on an accelerator only sizes beyond any device, 1 PiB,
/// are refused). The error names the key whose reduction helps most.
pub fn check_memory(cfg: &Config) -> Result<()> {
    let (state, acts) = training_bytes(cfg);
    let on_cpu = cfg.train.device == "cpu";
    let limit = match (on_cpu, physical_memory()) {
        (true, Some(b)) => b as f64,
        _ => (1u64 << 50) as f64,
    };
    if state + acts <= limit {
        return Ok(());
    }
    let (key, now) = most_responsible(cfg);
    Err(Error::config(
        key,
        format!(
            "training needs ~{} for parameters and optimizer state and ~{} for activations; this machine has {}: lower {key} (now {now})",
            bytes(state),
            bytes(acts),
            bytes(limit)
        ),
    ))
}

/// The size key whose return to its default lowers the estimate most, and
/// its current value.
fn most_responsible(cfg: &Config) -> (&'static str, usize) {
    let (md, td) = (ModelConfig::default(), TrainConfig::default());
    type Key = (&'static str, fn(&mut Config) -> &mut usize, usize);
    let keys: [Key; 7] = [
        ("model.d_model", |c| &mut c.model.d_model, md.d_model),
        ("model.d_ff", |c| &mut c.model.d_ff, md.d_ff),
        ("model.n_experts", |c| &mut c.model.n_experts, md.n_experts),
        ("model.n_layer", |c| &mut c.model.n_layer, md.n_layer),
        ("model.seq_len", |c| &mut c.model.seq_len, md.seq_len),
        ("model.vocab_size", |c| &mut c.model.vocab_size, 50304),
        (
            "train.batch_size",
            |c| &mut c.train.batch_size,
            td.batch_size,
        ),
    ];
    let mut best = ("model.d_model", f64::INFINITY, cfg.model.d_model);
    for (key, field, default) in keys {
        let mut c = cfg.clone();
        let now = *field(&mut c);
        *field(&mut c) = now.min(default);
        let (s, a) = training_bytes(&c);
        if s + a < best.1 {
            best = (key, s + a, now);
        }
    }
    (best.0, best.2)
}

/// Physical memory of this machine (Linux `/proc/meminfo`), if known.
fn physical_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kb: u64 = line["MemTotal:".len()..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024)
}

/// 3.7e12 -> "3.4 TiB".
fn bytes(b: f64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut v = b;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < units.len() {
        v /= 1024.0;
        i += 1;
    }
    if i + 1 == units.len() && v >= 1024.0 {
        return format!("{b:.1e} B");
    }
    format!("{v:.1} {}", units[i])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn estimate_names_the_key_that_is_too_large() {
        let mut cfg = Config::preset("tiny").unwrap();
        assert!(check_memory(&cfg).is_ok());
        cfg.model.n_experts = 100_000_000;
        let e = check_memory(&cfg).unwrap_err().to_string();
        assert!(e.contains("model.n_experts") && e.contains("TiB"), "{e}");
        let mut cfg = Config::preset("tiny").unwrap();
        cfg.train.batch_size = 1_000_000_000_000;
        let e = check_memory(&cfg).unwrap_err().to_string();
        assert!(e.contains("train.batch_size"), "{e}");
        assert_eq!(bytes(1536.0), "1.5 KiB");
    }
}
