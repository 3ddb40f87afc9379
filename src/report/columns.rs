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

/// A measure with no step-0 value.
const fn measure(
    name: &'static str,
    value: fn(&Run) -> Option<f64>,
    chance: fn(&Run) -> Option<f64>,
) -> Measure {
    Measure {
        name,
        value,
        chance,
        start: None,
    }
}

/// W_up at its three granularities, then the other families. Gate and down
/// have W_up's shape (P = d_ff·d_model), hence its flat chance level 1/P.
pub(super) const WEIGHT_MEASURES: [Measure; 6] = [
    Measure {
        start: Some(|r| r.study.weight_mso_start),
        ..measure("up (flat)", |r| r.wmso, |r| r.study.weight_mso_chance)
    },
    measure(
        "up (rows)",
        |r| r.study.weight_mso_rows,
        |r| r.study.weight_mso_rows_chance,
    ),
    measure(
        "up (cols)",
        |r| r.study.weight_mso_cols,
        |r| r.study.weight_mso_cols_chance,
    ),
    measure(
        "gate (flat)",
        |r| r.study.weight_mso_gate,
        |r| r.study.weight_mso_chance,
    ),
    measure(
        "down (flat)",
        |r| r.study.weight_mso_down,
        |r| r.study.weight_mso_chance,
    ),
    measure(
        "router",
        |r| r.study.weight_mso_router,
        |r| r.study.weight_mso_router_chance,
    ),
];

/// Activation MSO in its three spaces: the expert outputs (d_model), the hidden
/// activations φ(W_up x + b) and their LayerNorm (both d_ff).
pub(super) const ACT_MEASURES: [Measure; 3] = [
    Measure {
        start: Some(|r| r.study.act_mso_start),
        ..measure("output", |r| r.amso, |r| r.study.act_mso_chance)
    },
    measure(
        "hidden",
        |r| r.study.act_mso_hidden,
        |r| r.study.act_mso_hidden_chance,
    ),
    measure(
        "hidden_ln",
        |r| r.study.act_mso_hidden_ln,
        |r| r.study.act_mso_hidden_ln_chance,
    ),
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
