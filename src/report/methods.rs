//! The regulariser and load-balancing comparison: every method against
//! `none`, per dataset, when the sweep has methods beyond the λ study.

use super::runs::{compare, datasets, of_method, vals, Run};
use super::svg::{Chart, Series};
use super::table::{mean_sd, sanitize, Table, TableCell};
use super::{Figure, Section};

/// A table and a scatter figure per dataset; empty for a pure λ study.
pub(super) fn section(done: &[&Run]) -> Section {
    let mut s = Section::default();
    let mut methods: Vec<String> = done.iter().map(|r| r.method.clone()).collect();
    methods.sort();
    methods.dedup();
    if methods.len() < 2 || done.iter().all(|r| r.in_lambda_study()) {
        return s;
    }
    // "none" first, then as listed.
    methods.sort_by_key(|m| (m != "none", m.clone()));
    for ds in &datasets(done) {
        let runs: Vec<&Run> = done.iter().copied().filter(|r| &r.dataset == ds).collect();
        let (table, figure) = dataset_comparison(ds, &runs, &methods);
        s.tables.push(table);
        s.figures.push(figure);
    }
    s
}

fn dataset_comparison(ds: &str, runs: &[&Run], methods: &[String]) -> (Table, Figure) {
    let base = of_method(runs, "none");
    let mut rows = Vec::new();
    let mut chart = Chart::new(
        &format!("Activation vs weight overlap by method — {ds}"),
        "weight MSO (up)",
        "activation MSO",
    );
    for m in methods {
        let g = of_method(runs, m);
        if g.is_empty() {
            continue;
        }
        rows.push(method_row(m, &base, &g));
        let pts: Vec<(f64, f64, Option<f64>)> = g
            .iter()
            .filter_map(|r| Some((r.wmso?, r.amso?, None)))
            .collect();
        chart.series.push(Series {
            name: m.clone(),
            points: pts,
            line: false,
        });
    }
    let xs = chart
        .series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.0));
    chart.x_log = super::figures::needs_log(xs.collect::<Vec<_>>());
    let table = Table {
        title: format!("Regularisers and load balancing — {ds}"),
        header: vec![
            "method",
            "runs",
            "val PPL",
            "p (PPL vs none)",
            "weight MSO (up)",
            "act MSO",
            "p (act vs none)",
            "gap ratio",
            "balance",
            "max violation",
            "p (violation vs none)",
            "dead experts",
        ],
        rows,
        note: "Mean ± sd over seeds at the final evaluation. p: paired t-test by seed against `none` (Welch when the seeds differ). Balance = exp(H(load))/E; max violation = max load / mean load − 1 (docs/MEASURES.md, routing telemetry).".into(),
    };
    let figure = Figure {
        stem: format!("methods-{}", sanitize(ds)),
        caption: format!("Weight vs activation overlap of every run, by regulariser — {ds}"),
        svg: chart.svg(),
    };
    (table, figure)
}

/// One method's row: means over its runs, p-values against `none`.
fn method_row(m: &str, base: &[&Run], g: &[&Run]) -> Vec<TableCell> {
    let test = |f: &dyn Fn(&Run) -> Option<f64>| -> TableCell {
        TableCell::from(if m == "none" || base.is_empty() {
            "—".into()
        } else {
            compare(base, g, f)
                .map(|(t, name)| format!("{:.4} ({name})", t.p))
                .unwrap_or_else(|| "—".into())
        })
    };
    let mean = |f: &dyn Fn(&Run) -> Option<f64>| TableCell::from(mean_sd(&vals(g, f)));
    vec![
        TableCell::from(m.to_string()),
        TableCell::linked(g.len().to_string(), g),
        mean(&|r| r.ppl),
        test(&|r| r.ppl),
        mean(&|r| r.wmso),
        mean(&|r| r.amso),
        test(&|r| r.amso),
        mean(&|r| r.gap),
        mean(&|r| r.balance),
        mean(&|r| r.max_violation),
        test(&|r| r.max_violation),
        mean(&|r| r.dead),
    ]
}
