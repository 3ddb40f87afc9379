//! The results store: one row per run of a sweep, as `results.jsonl` and
//! `results.csv` (both readable with pandas).

use super::sweep::{read_status, Cell, SweepDir};
use crate::fsutil::write_atomic;
use crate::{Error, Result};
use serde_json::{json, Map, Value};

/// Columns written first, in this order (then swept keys, then per-layer columns).
pub const FIXED_COLUMNS: &[&str] = &[
    "id",
    "status",
    "error",
    "dataset",
    "method",
    "lambda",
    "seed",
    "routing",
    "top_k",
    "router_temperature",
    "steps",
    "tokens",
    "val_loss",
    "val_ppl",
    "weight_mso",
    "act_mso",
    "gap_ratio",
    "router_entropy",
    "balance",
    "max_violation",
    "dead_experts",
    "dropped_frac",
    "wall_s",
];

/// A short label of the regularisers and routing options of a run, e.g.
/// `none`, `orth 0.01`, `act 0.1 + aux 0.01`, `loss-free 0.001`,
/// `expert-choice`, `capacity 1.25`, `smoe-dropout 1→2`.
pub fn method_label(cfg: &crate::config::Config) -> String {
    let r = &cfg.reg;
    let mut parts = Vec::new();
    let fam = |f: &str| {
        if f == "up" {
            String::new()
        } else {
            format!(" ({f})")
        }
    };
    for (name, v, extra) in [
        ("orth", r.orth_lambda, fam(r.orth_family.name())),
        ("act", r.act_lambda, String::new()),
        ("grad", r.grad_lambda, fam(r.grad_family.name())),
        ("contrastive", r.contrastive_lambda, String::new()),
        ("entropy", r.entropy_lambda, String::new()),
        ("token-entropy", r.token_entropy_lambda, String::new()),
        ("aux", r.aux_lambda, String::new()),
        ("z", r.z_lambda, String::new()),
        ("loss-free", r.loss_free_gamma, String::new()),
    ] {
        if v != 0.0 {
            parts.push(format!("{name} {v}{extra}"));
        }
    }
    let m = &cfg.model;
    if m.routing == crate::config::Routing::ExpertChoice {
        parts.push("expert-choice".into());
    } else if m.capacity_factor > 0.0 {
        parts.push(format!("capacity {}", m.capacity_factor));
    }
    if cfg.train.topk_start > 0 || m.router_frozen {
        parts.push(if m.router_frozen && cfg.train.topk_start > 0 {
            format!("smoe-dropout {}→{}", cfg.train.topk_start, m.top_k)
        } else if m.router_frozen {
            "frozen router".into()
        } else {
            format!("top-k {}→{}", cfg.train.topk_start, m.top_k)
        });
    }
    if parts.is_empty() {
        "none".into()
    } else {
        parts.join(" + ")
    }
}

/// The last row of each `kind` in a run's metrics.jsonl (one read of the file).
fn last_rows(run: &std::path::Path) -> std::collections::HashMap<String, Value> {
    let mut last = std::collections::HashMap::new();
    if let Ok(text) = std::fs::read_to_string(run.join("metrics.jsonl")) {
        for v in text
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        {
            if let Some(k) = v["kind"].as_str() {
                last.insert(k.to_string(), v);
            }
        }
    }
    last
}

fn mean_of(v: &Value) -> Value {
    let xs: Vec<f64> = v
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_f64).collect())
        .unwrap_or_default();
    if xs.is_empty() {
        Value::Null
    } else {
        json!(xs.iter().sum::<f64>() / xs.len() as f64)
    }
}

/// One row per cell: swept values, outcome, final metrics and measures.
pub fn collect(dir: &SweepDir, cells: &[Cell]) -> Result<Vec<Map<String, Value>>> {
    let mut rows = Vec::with_capacity(cells.len());
    for c in cells {
        let run = dir.run(&c.id);
        let mut r = Map::new();
        r.insert("id".into(), json!(c.id));
        let status = read_status(dir, &c.id);
        r.insert(
            "status".into(),
            json!(status
                .as_ref()
                .map(|s| s.status.clone())
                .unwrap_or_else(|| "pending".into())),
        );
        r.insert(
            "error".into(),
            json!(status.as_ref().and_then(|s| s.error.clone())),
        );
        r.insert("wall_s".into(), json!(status.as_ref().map(|s| s.wall_s)));
        if let Ok(cfg) = &c.config {
            let ds = if cfg.data.path.is_empty() {
                cfg.data.dataset.clone()
            } else {
                cfg.data.path.clone()
            };
            r.insert("dataset".into(), json!(ds));
            r.insert("method".into(), json!(method_label(cfg)));
            r.insert("lambda".into(), json!(cfg.reg.orth_lambda));
            r.insert("seed".into(), json!(cfg.train.seed));
            r.insert("routing".into(), json!(cfg.model.routing));
            r.insert("top_k".into(), json!(cfg.model.top_k));
            r.insert(
                "router_temperature".into(),
                json!(cfg.model.router_temperature),
            );
        }
        for (k, v) in &c.values {
            r.insert(k.clone(), v.clone());
        }
        if let Ok(s) = std::fs::read_to_string(run.join("summary.json")) {
            let s: Value = serde_json::from_str(&s)
                .map_err(|e| Error::bad_file(run.join("summary.json"), e.to_string()))?;
            for k in ["steps", "tokens", "val_loss", "val_ppl"] {
                r.insert(k.into(), s[k].clone());
            }
        }
        let last = last_rows(&run);
        r.insert(
            "dropped_frac".into(),
            last.get("train")
                .and_then(|t| t.get("dropped_frac").cloned())
                .unwrap_or(Value::Null),
        );
        if let Some(ev) = last.get("eval") {
            r.insert("weight_mso".into(), ev["weight_mso_mean"]["up"].clone());
            r.insert("act_mso".into(), ev["act_mso_mean"].clone());
            r.insert("gap_ratio".into(), ev["gap_ratio_model"].clone());
            r.insert("router_entropy".into(), mean_of(&ev["router_entropy"]));
            r.insert("balance".into(), mean_of(&ev["balance"]));
            r.insert(
                "max_violation".into(),
                json!(ev["max_violation"]
                    .as_array()
                    .map(|a| a.iter().filter_map(Value::as_f64).fold(0.0, f64::max))),
            );
            r.insert(
                "dead_experts".into(),
                json!(ev["dead_experts"].as_array().map(|a| a
                    .iter()
                    .map(|l| l.as_array().map_or(0, Vec::len))
                    .sum::<usize>())),
            );
            for (name, key) in [
                ("weight_mso_l", &ev["weight_mso"]["up"]),
                ("act_mso_l", &ev["act_mso"]),
                ("gap_ratio_l", &ev["gap_ratio"]),
            ] {
                if let Some(a) = key.as_array() {
                    for (l, v) in a.iter().enumerate() {
                        r.insert(format!("{name}{l}"), v.clone());
                    }
                }
            }
        }
        rows.push(r);
    }
    Ok(rows)
}

/// Column order: fixed columns, swept keys, then the rest sorted.
pub fn columns(rows: &[Map<String, Value>], swept: &[String]) -> Vec<String> {
    let mut cols: Vec<String> = FIXED_COLUMNS.iter().map(|s| s.to_string()).collect();
    for k in swept {
        if !cols.contains(k) {
            cols.push(k.clone());
        }
    }
    let mut rest: Vec<String> = rows
        .iter()
        .flat_map(|r| r.keys().cloned())
        .filter(|k| !cols.contains(k))
        .collect();
    rest.sort_by_key(|a| natural_key(a));
    rest.dedup();
    cols.extend(rest);
    cols
}

fn natural_key(s: &str) -> (String, usize) {
    let digits: String = s
        .chars()
        .rev()
        .take_while(char::is_ascii_digit)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    (
        s[..s.len() - digits.len()].to_string(),
        digits.parse().unwrap_or(0),
    )
}

/// Write `results.jsonl` and `results.csv` into the sweep folder.
pub fn write(dir: &SweepDir, rows: &[Map<String, Value>], swept: &[String]) -> Result<()> {
    let mut jl = Vec::new();
    for r in rows {
        serde_json::to_writer(&mut jl, r).expect("json");
        jl.push(b'\n');
    }
    write_atomic(&dir.0.join("results.jsonl"), &jl)?;
    let cols = columns(rows, swept);
    let mut w = csv::Writer::from_writer(Vec::new());
    w.write_record(&cols)
        .map_err(|e| Error::Data(e.to_string()))?;
    for r in rows {
        let rec: Vec<String> = cols
            .iter()
            .map(|c| match r.get(c) {
                None | Some(Value::Null) => String::new(),
                Some(Value::String(s)) => s.clone(),
                Some(v) => v.to_string(),
            })
            .collect();
        w.write_record(&rec)
            .map_err(|e| Error::Data(e.to_string()))?;
    }
    let bytes = w.into_inner().map_err(|e| Error::Data(e.to_string()))?;
    write_atomic(&dir.0.join("results.csv"), &bytes)
}

/// Read `results.jsonl` back.
pub fn read(dir: &SweepDir) -> Result<Vec<Map<String, Value>>> {
    let p = dir.0.join("results.jsonl");
    let text = std::fs::read_to_string(&p).map_err(|e| Error::io(&p, e))?;
    text.lines()
        .enumerate()
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|e| Error::bad_file(&p, format!("line {}: {e}", i + 1)))
        })
        .collect()
}
