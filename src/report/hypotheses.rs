//! The hypothesis sweep's table: when the runs differ in how L_orth (or the
//! training around it) was set up, one row per method with weight MSO of W_up
//! at every granularity and activation MSO in every space (each against its
//! chance level), the perplexity, and the change of weight MSO against the
//! `none` runs of the same dataset and routing mode, paired by seed.

use super::columns::{chance_text, present, value_cell, Measure, ACT_MEASURES, WEIGHT_MEASURES};
use super::effect::{effect, p_text};
use super::runs::{cells, of_method, vals, Run};
use super::table::{mean_sd, Table, TableCell};
use super::Section;

/// The method of the baseline runs.
const BASELINE: &str = "none";

/// Headers of the Δ% columns, one per granularity of W_up (the first three
/// [`WEIGHT_MEASURES`]).
const DELTA_HEADERS: [&str; 3] = [
    "Δ% up (flat) vs none [95% CI]",
    "Δ% up (rows) vs none [95% CI]",
    "Δ% up (cols) vs none [95% CI]",
];

/// Whether the sweep tests hypotheses: a `variant` grid key, or several
/// methods beyond the plain λ study (which its own tables cover).
fn is_hypothesis_sweep(done: &[&Run]) -> bool {
    let mut methods: Vec<&str> = done.iter().map(|r| r.method.as_str()).collect();
    methods.sort_unstable();
    methods.dedup();
    methods.len() >= 2
        && (done.iter().any(|r| r.from_variant) || done.iter().any(|r| !r.in_lambda_study()))
}

/// A "Hypotheses" table per (dataset, routing mode); empty otherwise.
pub(super) fn section(done: &[&Run]) -> Section {
    let mut s = Section::default();
    if !is_hypothesis_sweep(done) {
        return s;
    }
    for cell in cells(done) {
        s.tables.push(hypotheses_table(&cell.label, &cell.runs));
    }
    s
}

/// Both groups cut to the seeds they share, so that they pair by seed.
fn shared_seeds<'a>(base: &[&'a Run], g: &[&'a Run]) -> (Vec<&'a Run>, Vec<&'a Run>) {
    let has = |set: &[&Run], seed: u64| set.iter().any(|r| r.seed == seed);
    (
        base.iter().copied().filter(|r| has(g, r.seed)).collect(),
        g.iter().copied().filter(|r| has(base, r.seed)).collect(),
    )
}

/// Δ% of `m` against the baseline with its CI and p, or why there is none.
fn delta_cell(base: &[&Run], g: &[&Run], m: &Measure) -> TableCell {
    let (b, t) = shared_seeds(base, g);
    TableCell::from(match effect(&b, &t, m.value) {
        None => "n/a (no `none` run with this seed)".into(),
        Some(e) => match e.p() {
            Some(p) if e.n >= 2 => format!("{}, p = {}", e.delta_text(1), p_text(Some(p))),
            _ => e.delta_text(1),
        },
    })
}

fn hypotheses_table(label: &str, runs: &[&Run]) -> Table {
    let weights = present(&WEIGHT_MEASURES[..3], runs);
    let acts = present(&ACT_MEASURES, runs);
    let mut methods: Vec<&str> = runs.iter().map(|r| r.method.as_str()).collect();
    methods.sort_unstable();
    methods.dedup();
    methods.sort_by_key(|m| *m != BASELINE);
    let base = of_method(runs, BASELINE);

    let mut header = vec!["method", "runs"];
    header.extend(weights.iter().chain(&acts).map(|m| m.name));
    header.push("val PPL");
    let deltas: Vec<(&Measure, &str)> = WEIGHT_MEASURES[..3]
        .iter()
        .zip(DELTA_HEADERS)
        .filter(|(m, _)| weights.iter().any(|w| w.name == m.name))
        .collect();
    header.extend(deltas.iter().map(|(_, h)| *h));

    let text = |s: &str| TableCell::from(s.to_string());
    let mut chance_row = vec![text("chance (1/L)"), text("")];
    chance_row.extend(
        weights
            .iter()
            .chain(&acts)
            .map(|m| text(&chance_text(m, runs))),
    );
    chance_row.resize(header.len(), text(""));
    let mut rows = vec![chance_row];
    for m in methods {
        let g = of_method(runs, m);
        let mut row = vec![text(m), TableCell::linked(g.len().to_string(), &g)];
        row.extend(weights.iter().chain(&acts).map(|w| value_cell(w, &g)));
        row.push(TableCell::linked(mean_sd(&vals(&g, |r| r.ppl)), &g));
        row.extend(deltas.iter().map(|(w, _)| {
            if m == BASELINE {
                text("—")
            } else {
                delta_cell(&base, &g, w)
            }
        }));
        rows.push(row);
    }
    Table {
        title: format!("Hypotheses — {label}"),
        header,
        rows,
        note: "One row per method (the regularisers and the form of L_orth: granularity, variant, sign, expert weight decay), mean ± sd over seeds at the final evaluation. Weight MSO of W_up at granularity flat (L = d_ff·d_model), rows (L = d_model) and cols (L = d_ff); activation MSO of the outputs (L = d_model), hidden activations (L = d_ff) and their LayerNorm (L = d_ff − 1, centred); chance 1/L. Δ%: against the `none` runs (λ = 0, nothing else set) of this dataset and routing mode with the same seeds, with the paired 95% CI and paired t-test's p when at least 2 seeds pair; a single seed gives n = 1 and no test. A method that changes more than L_orth (e.g. `+ expert decay 0`) is best read against the row that changes only that (e.g. `expert decay 0`).".into(),
    }
}
