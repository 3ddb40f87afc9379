//! Table 4: λ = 0 against one fixed λ (`[report] table4_lambda`, the study's
//! 0.001) per dataset, in loss (nats) and perplexity; and, labelled as biased,
//! against the λ > 0 with the lowest mean perplexity on the same runs.

use super::effect::{effect, p_text};
use super::lambda_study::DatasetStudy;
use super::runs::{vals, Run};
use super::table::{lam, mean_sd, Table, TableCell};
use crate::experiments::stats;

/// Whether `l` is the fixed λ (as written in the sweep, up to rounding).
fn same_lambda(l: f64, fixed: f64) -> bool {
    (l - fixed).abs() <= 1e-9 * fixed.abs().max(1e-12)
}

/// The λ > 0 group with the lowest mean validation perplexity.
fn best_lambda<'s, 'a>(st: &'s DatasetStudy<'a>) -> Option<(f64, &'s [&'a Run])> {
    st.groups
        .iter()
        .filter(|(l, _)| *l > 0.0)
        .map(|(l, g)| (*l, g.as_slice(), stats::mean(&vals(g, |r| r.ppl))))
        .filter(|x| x.2.is_finite())
        .min_by(|a, c| a.2.total_cmp(&c.2))
        .map(|(l, g, _)| (l, g))
}

/// One row: the baseline against the runs `g` of λ = `l`.
fn row(st: &DatasetStudy, which: &str, base: &[&Run], l: f64, g: &[&Run]) -> Vec<TableCell> {
    let loss = effect(base, g, |r| r.loss);
    let ppl = effect(base, g, |r| r.ppl);
    let mean = |f: fn(&Run) -> Option<f64>| stats::mean(&vals(g, f)) - stats::mean(&vals(base, f));
    let cell = |s: String| TableCell::from(s);
    vec![
        cell(st.label.clone()),
        cell(which.into()),
        cell(lam(l)),
        cell(
            loss.as_ref()
                .or(ppl.as_ref())
                .map_or(0, |e| e.n)
                .to_string(),
        ),
        TableCell::linked(mean_sd(&vals(base, |r| r.loss)), base),
        TableCell::linked(mean_sd(&vals(g, |r| r.loss)), g),
        cell(format!("{:+.4}", mean(|r| r.loss))),
        cell(p_text(loss.as_ref().and_then(|e| e.p()))),
        cell(loss.as_ref().map_or("—".into(), |e| e.d_z_text())),
        TableCell::linked(mean_sd(&vals(base, |r| r.ppl)), base),
        TableCell::linked(mean_sd(&vals(g, |r| r.ppl)), g),
        cell(ppl.as_ref().map_or("n/a".into(), |e| e.delta_text(2))),
        cell(p_text(ppl.as_ref().and_then(|e| e.p()))),
    ]
}

pub(super) const BEST_LABEL: &str = "best λ (selected on the same data it is tested on: biased)";

/// Table 4 over the studies; its note names the studies without the fixed λ.
pub(super) fn table4(studies: &[DatasetStudy], fixed: f64) -> Table {
    let (mut rows, mut missing) = (Vec::new(), Vec::new());
    for st in studies {
        let Some(base) = st.base.as_deref() else {
            continue;
        };
        match st.groups.iter().find(|(l, _)| same_lambda(*l, fixed)) {
            Some((l, g)) if fixed != 0.0 => rows.push(row(st, "fixed λ", base, *l, g)),
            _ => missing.push(st.label.clone()),
        }
        if let Some((l, g)) = best_lambda(st) {
            rows.push(row(st, BEST_LABEL, base, l, g));
        }
    }
    let mut note = format!(
        "λ = 0 against the fixed λ = {} (`[report] table4_lambda` of the sweep file, or `moescope report --table4-lambda`), as the study's Table 4 (λ = 0.001). Loss: mean validation cross-entropy in nats; PPL = exp(loss). n: seed pairs (paired t-test by seed; Welch's where the seeds differ). d_z: paired Cohen's d of the loss. The best-λ row picks the λ > 0 with the lowest mean PPL on the very runs it then tests, so its p is biased low.",
        lam(fixed)
    );
    if !missing.is_empty() {
        note += &format!(
            " The fixed λ = {} is not in the sweep for: {}.",
            lam(fixed),
            missing.join(", ")
        );
    }
    Table {
        title: "Table 4: λ = 0 vs a fixed λ per dataset".into(),
        header: vec![
            "dataset",
            "comparison",
            "λ",
            "n",
            "loss at λ = 0",
            "loss at λ",
            "Δ loss",
            "p (loss)",
            "d_z (loss)",
            "PPL at λ = 0",
            "PPL at λ",
            "Δ% PPL [95% CI]",
            "p (PPL)",
        ],
        rows,
        note,
    }
}
