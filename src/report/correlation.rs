//! Table 3b: the correlation of weight MSO with activation MSO, Pearson and
//! Spearman, over the per-λ means (n = number of λ, the study's) and over the
//! individual runs (n = λ × seeds).

use super::lambda_study::DatasetStudy;
use super::runs::{vals, Run};
use super::table::{Table, TableCell};
use crate::experiments::stats;

/// (weight MSO, activation MSO) of each λ's means over seeds, λ with both only.
fn per_lambda_means(st: &DatasetStudy) -> (Vec<f64>, Vec<f64>) {
    st.groups
        .iter()
        .map(|(_, g)| {
            (
                stats::mean(&vals(g, |r| r.wmso)),
                stats::mean(&vals(g, |r| r.amso)),
            )
        })
        .filter(|(w, a)| w.is_finite() && a.is_finite())
        .unzip()
}

/// (weight MSO, activation MSO) of every run that has both.
fn per_run(runs: &[&Run]) -> (Vec<f64>, Vec<f64>) {
    runs.iter().filter_map(|r| Some((r.wmso?, r.amso?))).unzip()
}

/// One row: the statistic over one set of points, or why there is none.
fn row(
    statistic: &str,
    over: &str,
    (x, y): &(Vec<f64>, Vec<f64>),
    f: fn(&[f64], &[f64]) -> Option<stats::Pearson>,
) -> Vec<TableCell> {
    let cell = |s: String| TableCell::from(s);
    let mut out = vec![
        cell(statistic.into()),
        cell(over.into()),
        cell(x.len().to_string()),
    ];
    match f(x, y) {
        Some(p) => out.extend([
            cell(format!("{:.3}", p.r)),
            cell(super::effect::p_text(Some(p.p))),
            cell(if p.ci_low.is_finite() {
                format!("[{:.3}, {:.3}]", p.ci_low, p.ci_high)
            } else {
                "n/a (n < 4)".into()
            }),
        ]),
        None => out.extend(["n/a (n < 3 or no spread)", "—", "—"].map(|s| cell(s.into()))),
    }
    out
}

pub(super) fn table3b(st: &DatasetStudy) -> Table {
    let means = per_lambda_means(st);
    let runs = per_run(&st.runs());
    Table {
        title: format!(
            "Table 3b: Correlation of weight and activation MSO{}",
            st.suffix
        ),
        header: vec!["statistic", "over", "n", "r / ρ", "p", "95% CI"],
        rows: vec![
            row("Pearson r", "per-λ means", &means, stats::pearson),
            row("Spearman ρ", "per-λ means", &means, stats::spearman),
            row("Pearson r", "individual runs", &runs, stats::pearson),
            row("Spearman ρ", "individual runs", &runs, stats::spearman),
        ],
        note: "Weight MSO of W_up (flat) against activation MSO of the expert outputs. Over per-λ means (the study's n = number of λ) and over individual runs (n = λ × seeds; runs of one λ share their setting and seeds pair across λ, so the points are not independent: read that p as descriptive). p: t-test of r with n − 2 df (Spearman: on the mid-ranks); CI: Fisher z (approximate for Spearman).".into(),
    }
}
