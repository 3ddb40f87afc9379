//! The overlap measures the report's tables show, each with its chance level:
//! the value E[cos²] = 1/L that L-dimensional independent random directions
//! would give, so that a reader sees how far from chance a value sits.

use super::runs::{vals, Run};
use super::table::{mean_sd, num, TableCell};
use crate::experiments::stats;

/// One MSO column of a table: its value, its chance level and, where logged,
/// its value at step 0 (before training).
pub(super) struct Measure {
    pub name: &'static str,
    pub value: fn(&Run) -> Option<f64>,
    pub chance: fn(&Run) -> Option<f64>,
    pub start: Option<fn(&Run) -> Option<f64>>,
}

/// W_up at its three granularities, then the other families. Gate and down
/// have W_up's shape (P = d_ff·d_model), hence its flat chance level 1/P.
pub(super) const WEIGHT_MEASURES: [Measure; 6] = [
    Measure {
        name: "up (flat)",
        value: |r| r.wmso,
        chance: |r| r.study.weight_mso_chance,
        start: Some(|r| r.study.weight_mso_start),
    },
    Measure {
        name: "up (rows)",
        value: |r| r.study.weight_mso_rows,
        chance: |r| r.study.weight_mso_rows_chance,
        start: None,
    },
    Measure {
        name: "up (cols)",
        value: |r| r.study.weight_mso_cols,
        chance: |r| r.study.weight_mso_cols_chance,
        start: None,
    },
    Measure {
        name: "gate (flat)",
        value: |r| r.study.weight_mso_gate,
        chance: |r| r.study.weight_mso_chance,
        start: None,
    },
    Measure {
        name: "down (flat)",
        value: |r| r.study.weight_mso_down,
        chance: |r| r.study.weight_mso_chance,
        start: None,
    },
    Measure {
        name: "router",
        value: |r| r.study.weight_mso_router,
        chance: |r| r.study.weight_mso_router_chance,
        start: None,
    },
];

/// Activation MSO in its three spaces: the expert outputs (d_model), the hidden
/// activations φ(W_up x + b) and their LayerNorm (both d_ff).
pub(super) const ACT_MEASURES: [Measure; 3] = [
    Measure {
        name: "output",
        value: |r| r.amso,
        chance: |r| r.study.act_mso_chance,
        start: Some(|r| r.study.act_mso_start),
    },
    Measure {
        name: "hidden",
        value: |r| r.study.act_mso_hidden,
        chance: |r| r.study.act_mso_hidden_chance,
        start: None,
    },
    Measure {
        name: "hidden_ln",
        value: |r| r.study.act_mso_hidden_ln,
        chance: |r| r.study.act_mso_hidden_ln_chance,
        start: None,
    },
];

/// The measures any of `runs` has a value of (a table shows no empty column).
pub(super) fn present<'m>(measures: &'m [Measure], runs: &[&Run]) -> Vec<&'m Measure> {
    measures
        .iter()
        .filter(|m| runs.iter().any(|r| (m.value)(r).is_some()))
        .collect()
}

/// The chance level of `m` over `runs` (one model shape: one value; the mean
/// should shapes differ), "n/a" where none was logged.
pub(super) fn chance_text(m: &Measure, runs: &[&Run]) -> String {
    let c = vals(runs, m.chance);
    if c.is_empty() {
        "n/a".into()
    } else {
        num(stats::mean(&c))
    }
}

/// `mean ± sd` of `m` over `runs`, linked to them.
pub(super) fn value_cell(m: &Measure, runs: &[&Run]) -> TableCell {
    TableCell::linked(mean_sd(&vals(runs, m.value)), runs)
}

/// `mean ± sd` of `m` at step 0, "—" where it was not logged.
pub(super) fn start_cell(m: &Measure, runs: &[&Run]) -> TableCell {
    let v = m.start.map(|s| vals(runs, s)).unwrap_or_default();
    if v.is_empty() {
        TableCell::from("—".to_string())
    } else {
        TableCell::linked(mean_sd(&v), runs)
    }
}
