//! The λ study, Tables 1–4: weight MSO, perplexity and the weight vs
//! activation overlap by λ = `reg.orth_lambda`, per dataset, over the runs
//! with no regulariser other than L_orth.

use super::figures;
use super::runs::{by_lambda, compare, datasets, vals, Run};
use super::table::{lam, mean_sd, num, Table, TableCell};
use super::Section;
use crate::experiments::stats;
use crate::experiments::sweep::SweepDir;

/// One dataset's runs of the λ study, grouped by λ.
pub(super) struct DatasetStudy<'a> {
    pub dataset: String,
    /// (λ, runs sorted by seed), λ ascending.
    pub groups: Vec<(f64, Vec<&'a Run>)>,
    /// The λ = 0 runs, the baseline.
    pub base: Option<Vec<&'a Run>>,
    /// ` — <dataset>` in titles when the sweep has several datasets.
    pub suffix: String,
}

/// The λ study of each (dataset, routing mode) among the finished runs:
/// runs that differ in anything the λ tables do not show are never pooled.
/// A group whose λ does not vary has no λ study.
fn studies<'a>(finished: &[&'a Run]) -> Vec<DatasetStudy<'a>> {
    let done: Vec<&Run> = finished
        .iter()
        .copied()
        .filter(|r| r.in_lambda_study())
        .collect();
    let names = datasets(&done);
    let mut modes: Vec<&str> = done.iter().map(|r| r.mode.as_str()).collect();
    modes.sort_unstable();
    modes.dedup();
    let mut out = Vec::new();
    for ds in &names {
        for mode in &modes {
            let runs: Vec<&Run> = done
                .iter()
                .copied()
                .filter(|r| &r.dataset == ds && r.mode == *mode)
                .collect();
            let groups = by_lambda(&runs);
            if groups.len() < 2 {
                continue;
            }
            let base = groups
                .iter()
                .find(|(l, _)| *l == 0.0)
                .map(|(_, v)| v.clone());
            let mut parts = Vec::new();
            if names.len() > 1 {
                parts.push(ds.clone());
            }
            if modes.len() > 1 {
                parts.push(mode.to_string());
            }
            out.push(DatasetStudy {
                dataset: ds.clone(),
                groups,
                base,
                suffix: if parts.is_empty() {
                    String::new()
                } else {
                    format!(" — {}", parts.join(", "))
                },
            });
        }
    }
    out
}

/// Tables 1–3 and the figures of each dataset, then Table 4 across datasets.
pub(super) fn section(dir: &SweepDir, finished: &[&Run]) -> Section {
    let mut s = Section::default();
    let mut table4_rows = Vec::new();
    for study in &studies(finished) {
        s.tables.push(table1(study));
        s.tables.push(table2(study));
        s.tables.push(table3(study));
        table4_rows.extend(table4_row(study));
        s.figures.extend(figures::lambda_figures(dir, study));
    }
    // No λ tables for runs whose λ does not vary; an empty Table 4 while no
    // run has finished says so.
    if !table4_rows.is_empty() || finished.is_empty() {
        s.tables.push(table4(table4_rows));
    }
    s
}

/// "—" at λ = 0, else the change of the group mean against the baseline mean.
fn delta_cell(l: f64, base: Option<f64>, group: &[f64], decimals: usize) -> TableCell {
    TableCell::from(if l == 0.0 {
        "—".into()
    } else {
        base.map(|b| format!("{:+.*}%", decimals, stats::delta_pct(b, stats::mean(group))))
            .unwrap_or("n/a".into())
    })
}

fn table1(st: &DatasetStudy) -> Table {
    let base_w = st.base.as_ref().map(|b| stats::mean(&vals(b, |r| r.wmso)));
    let rows = st
        .groups
        .iter()
        .map(|(l, g)| {
            let w = vals(g, |r| r.wmso);
            vec![
                TableCell::from(lam(*l)),
                TableCell::linked(mean_sd(&w), g),
                delta_cell(*l, base_w, &w, 1),
            ]
        })
        .collect();
    Table {
        title: format!("Table 1: Weight MSO (up) by λ{}", st.suffix),
        header: vec!["λ", "weight MSO (mean ± sd over seeds)", "Δ% vs λ = 0"],
        rows,
        note: "Weight MSO: mean over MoE layers of 2/(E(E−1)) Σ_{i<j} G_ij² of the normalised flattened W_up (docs/MEASURES.md).".into(),
    }
}

fn table2(st: &DatasetStudy) -> Table {
    let base_p = st.base.as_ref().map(|b| stats::mean(&vals(b, |r| r.ppl)));
    let rows = st
        .groups
        .iter()
        .map(|(l, g)| {
            let p = vals(g, |r| r.ppl);
            let test = match (&st.base, *l == 0.0) {
                (Some(b), false) => compare(b, g, |r| r.ppl),
                _ => None,
            };
            vec![
                TableCell::from(lam(*l)),
                TableCell::linked(mean_sd(&p), g),
                delta_cell(*l, base_p, &p, 2),
                TableCell::from(
                    test.map(|(t, name)| {
                        format!("{:.4} ({name}, t = {:.2}, df = {:.1})", t.p, t.t, t.df)
                    })
                    .unwrap_or_else(|| "—".into()),
                ),
            ]
        })
        .collect();
    Table {
        title: format!("Table 2: Validation perplexity by λ{}", st.suffix),
        header: vec!["λ", "val PPL (mean ± sd)", "Δ% vs λ = 0", "p vs λ = 0"],
        rows,
        note: "Two-sided paired t-test over seeds (pairing by seed); Welch's t-test where the seed sets differ.".into(),
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
    };
    Table {
        title: format!("Table 3: Weight vs activation overlap{}", st.suffix),
        header: vec!["λ", "weight MSO", "activation MSO", "activation / weight"],
        rows,
        note,
    }
}

/// Table 4's row of a dataset: the baseline vs the λ > 0 with the lowest mean PPL.
fn table4_row(st: &DatasetStudy) -> Option<Vec<TableCell>> {
    let b = st.base.as_ref()?;
    let (l, g, m) = st
        .groups
        .iter()
        .filter(|(l, _)| *l > 0.0)
        .map(|(l, g)| (*l, g, stats::mean(&vals(g, |r| r.ppl))))
        .filter(|x| x.2.is_finite())
        .min_by(|a, c| a.2.total_cmp(&c.2))?;
    let bp = stats::mean(&vals(b, |r| r.ppl));
    let test = compare(b, g, |r| r.ppl);
    Some(vec![
        TableCell::from(st.dataset.clone()),
        TableCell::linked(mean_sd(&vals(b, |r| r.ppl)), b),
        TableCell::from(lam(l)),
        TableCell::linked(mean_sd(&vals(g, |r| r.ppl)), g),
        TableCell::from(format!("{:+.2}%", stats::delta_pct(bp, m))),
        TableCell::from(
            test.map(|(t, _)| format!("{:.4}", t.p))
                .unwrap_or_else(|| "—".into()),
        ),
    ])
}

fn table4(rows: Vec<Vec<TableCell>>) -> Table {
    Table {
        title: "Table 4: Baseline vs chosen λ per dataset".into(),
        header: vec![
            "dataset",
            "PPL at λ = 0",
            "chosen λ",
            "PPL at chosen λ",
            "Δ%",
            "p",
        ],
        rows,
        note: "Chosen λ: the λ > 0 with the lowest mean validation perplexity on that dataset."
            .into(),
    }
}
