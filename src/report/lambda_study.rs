//! The λ study: weight MSO (Table 1 and every family), activation MSO,
//! perplexity (Table 2), the weight vs activation overlap (Tables 3, 3b), the
//! variance across seeds and the per-layer values by λ = `reg.orth_lambda`,
//! per dataset and routing mode, over the runs with no regulariser other than
//! L_orth; then Table 4 across them.

use super::columns::{chance_text, value_cell, WEIGHT_MEASURES};
use super::effect::effect_cells;
use super::runs::{by_lambda, cells, vals, Run};
use super::table::{lam, mean_sd, num, Table, TableCell};
use super::{correlation, figures, study_tables, table4, Section};
use crate::experiments::stats;
use crate::experiments::sweep::SweepDir;

/// One dataset's runs of the λ study, grouped by λ.
pub(super) struct DatasetStudy<'a> {
    /// (λ, runs sorted by seed), λ ascending.
    pub groups: Vec<(f64, Vec<&'a Run>)>,
    /// The λ = 0 runs, the baseline.
    pub base: Option<Vec<&'a Run>>,
    /// ` — <dataset>` in titles when the sweep has several datasets (and
    /// `, <mode>` when several routing modes).
    pub suffix: String,
    /// The dataset, with `, <mode>` when the sweep has several routing modes.
    pub label: String,
}

/// The λ study of each (dataset, routing mode) among the finished runs:
/// runs that differ in anything the λ tables do not show are never pooled.
/// A group whose λ does not vary has no λ study.
pub(super) fn studies<'a>(finished: &[&'a Run]) -> Vec<DatasetStudy<'a>> {
    let done: Vec<&Run> = finished
        .iter()
        .copied()
        .filter(|r| r.in_lambda_study())
        .collect();
    let mut out = Vec::new();
    for cell in cells(&done) {
        let groups = by_lambda(&cell.runs);
        if groups.len() < 2 {
            continue;
        }
        let base = groups
            .iter()
            .find(|(l, _)| *l == 0.0)
            .map(|(_, v)| v.clone());
        let mut parts = Vec::new();
        if cell.n_datasets > 1 {
            parts.push(cell.dataset.clone());
        }
        if cell.n_modes > 1 {
            parts.push(cell.mode.clone());
        }
        out.push(DatasetStudy {
            label: cell.label,
            groups,
            base,
            suffix: if parts.is_empty() {
                String::new()
            } else {
                format!(" — {}", parts.join(", "))
            },
        });
    }
    out
}

/// The λ study's tables and figures of each dataset (and routing mode), then
/// Table 4 across them, comparing λ = 0 with `table4_lambda`.
pub(super) fn section(dir: &SweepDir, finished: &[&Run], table4_lambda: f64) -> Section {
    let mut s = Section::default();
    let all = studies(finished);
    for study in &all {
        // The study's own tables first, then what a referee asks beyond them.
        s.tables.extend([
            table1(study),
            table2(study),
            table3(study),
            correlation::table3b(study),
            study_tables::weight_families(study),
            study_tables::activation_spaces(study),
            study_tables::seed_variance(study),
            study_tables::per_layer(study),
        ]);
        s.figures.extend(figures::lambda_figures(dir, study));
    }
    // No λ tables for runs whose λ does not vary; an empty Table 4 while no
    // run has finished says so.
    if !all.is_empty() || finished.is_empty() {
        s.tables.push(table4::table4(&all, table4_lambda));
    }
    s
}

impl DatasetStudy<'_> {
    /// Each group as (is the baseline, runs), for [`effect_cells`].
    fn flagged_groups(&self) -> Vec<(bool, &[&Run])> {
        self.groups
            .iter()
            .map(|(l, g)| (*l == 0.0, g.as_slice()))
            .collect()
    }

    /// Every run of the study.
    pub fn runs(&self) -> Vec<&Run> {
        self.groups
            .iter()
            .flat_map(|(_, g)| g.iter().copied())
            .collect()
    }
}

/// Table 1: weight MSO (up, flat) by λ with its chance level, and each λ > 0
/// against λ = 0: Δ% with its CI, d_z, p and Holm's p over the table's tests.
fn table1(st: &DatasetStudy) -> Table {
    let up = &WEIGHT_MEASURES[0];
    let effects = effect_cells(st.base.as_deref(), &st.flagged_groups(), &|r| r.wmso, 1);
    let rows = st
        .groups
        .iter()
        .zip(effects)
        .map(|((l, g), e)| {
            let mut row = vec![
                TableCell::from(lam(*l)),
                value_cell(up, g),
                TableCell::from(chance_text(up, g)),
            ];
            row.extend(e);
            row
        })
        .collect();
    Table {
        title: format!("Table 1: Weight MSO (up) by λ{}", st.suffix),
        header: vec![
            "λ",
            "weight MSO (mean ± sd over seeds)",
            "chance (1/P)",
            "Δ% vs λ = 0 [95% CI]",
            "d_z",
            "p vs λ = 0",
            "p (Holm)",
        ],
        rows,
        note: format!(
            "Weight MSO: mean over MoE layers of 2/(E(E−1)) Σ_{{i<j}} G_ij² of the normalised flattened W_up (docs/MEASURES.md); chance 1/P for P-dimensional random directions. {EFFECT_NOTE}"
        ),
    }
}

/// How every table reads its comparisons with λ = 0.
pub(super) const EFFECT_NOTE: &str = "Δ%: change of the mean against λ = 0, with the 95% CI of the mean paired difference (by seed) scaled by the baseline mean; d_z: paired Cohen's d (mean difference / sd of the differences); p: two-sided paired t-test by seed (Welch's where the seed sets differ); p (Holm): Holm's step-down adjustment over this table's λ > 0 tests.";

/// Table 2: validation perplexity by λ, each λ > 0 against λ = 0.
fn table2(st: &DatasetStudy) -> Table {
    let effects = effect_cells(st.base.as_deref(), &st.flagged_groups(), &|r| r.ppl, 2);
    let rows = st
        .groups
        .iter()
        .zip(effects)
        .map(|((l, g), e)| {
            let mut row = vec![
                TableCell::from(lam(*l)),
                TableCell::linked(mean_sd(&vals(g, |r| r.ppl)), g),
            ];
            row.extend(e);
            row
        })
        .collect();
    let start = vals(&st.runs(), |r| r.study.val_loss_start);
    let start_note = if start.is_empty() {
        String::new()
    } else {
        let m = stats::mean(&start);
        format!(
            " At step 0 (before training) the validation loss was {m:.3} nats (PPL {:.1}).",
            m.exp()
        )
    };
    Table {
        title: format!("Table 2: Validation perplexity by λ{}", st.suffix),
        header: vec![
            "λ",
            "val PPL (mean ± sd)",
            "Δ% vs λ = 0 [95% CI]",
            "d_z",
            "p vs λ = 0",
            "p (Holm)",
        ],
        rows,
        note: format!("{EFFECT_NOTE}{start_note}"),
    }
}

fn table3(st: &DatasetStudy) -> Table {
    let mut rows = Vec::new();
    // Means over seeds per λ, for Pearson r across λ values.
    let (mut px, mut py) = (Vec::new(), Vec::new());
    for (l, g) in &st.groups {
        let a = vals(g, |r| r.amso);
        let (mw, ma) = (stats::mean(&vals(g, |r| r.wmso)), stats::mean(&a));
        if mw.is_finite() && ma.is_finite() {
            px.push(mw);
            py.push(ma);
        }
        rows.push(vec![
            TableCell::from(lam(*l)),
            TableCell::linked(num(mw), g),
            TableCell::linked(
                if a.is_empty() {
                    "null (k = 1)".into()
                } else {
                    num(ma)
                },
                g,
            ),
            TableCell::from(if a.is_empty() || mw == 0.0 {
                "n/a".into()
            } else {
                format!("{:.1}", ma / mw)
            }),
        ]);
    }
    let note = match stats::pearson(&px, &py) {
        Some(p) => format!(
            "Pearson r between weight MSO and activation MSO across the {} λ values (means over seeds): r = {:.3}, p = {:.4}, 95% CI {} (Fisher z).",
            p.n,
            p.r,
            p.p,
            if p.ci_low.is_finite() {
                format!("[{:.3}, {:.3}]", p.ci_low, p.ci_high)
            } else {
                "n/a (needs at least 4 λ values)".into()
            }
        ),
        None => format!(
            "Pearson r needs at least 3 λ values with both measures (have {}).",
            px.len()
        ),
    } + " Spearman ρ, and both over individual runs: the correlation table below.";
    Table {
        title: format!("Table 3: Weight vs activation overlap{}", st.suffix),
        header: vec!["λ", "weight MSO", "activation MSO", "activation / weight"],
        rows,
        note,
    }
}
