//! `moescope report SWEEP_DIR`: the weight–activation study's tables and
//! figures from a sweep's results, as `report.md` (figures in `figures/`)
//! and a self-contained `report.html`. Every aggregated number links to the
//! runs it was computed from.

pub mod analysis;
pub mod svg;

use crate::experiments::results;
use crate::experiments::stats;
use crate::experiments::sweep::SweepDir;
use crate::fsutil::write_atomic;
use crate::Result;
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::fmt::Write;
use svg::{esc, Chart, Series};

/// A run as the report sees it.
#[derive(Debug, Clone)]
struct Run {
    id: String,
    dataset: String,
    lambda: f64,
    seed: i64,
    status: String,
    error: Option<String>,
    ppl: Option<f64>,
    wmso: Option<f64>,
    amso: Option<f64>,
    gap_layers: Vec<Option<f64>>,
    /// `top-k` or `soft`.
    mode: String,
    /// Regularisers / balancing (`none`, `orth 0.01`, `aux 0.01`, ...).
    method: String,
    balance: Option<f64>,
    max_violation: Option<f64>,
    dead: Option<f64>,
    gap: Option<f64>,
}

fn run_from_row(r: &Map<String, Value>) -> Run {
    let f = |k: &str| r.get(k).and_then(Value::as_f64);
    let mut gap_layers = Vec::new();
    while let Some(v) = r.get(&format!("gap_ratio_l{}", gap_layers.len())) {
        gap_layers.push(v.as_f64());
    }
    Run {
        id: r
            .get("id")
            .and_then(Value::as_str)
            .unwrap_or("?")
            .to_string(),
        dataset: r
            .get("dataset")
            .and_then(Value::as_str)
            .unwrap_or("?")
            .to_string(),
        lambda: f("lambda").unwrap_or(f64::NAN),
        seed: r.get("seed").and_then(Value::as_i64).unwrap_or(0),
        status: r
            .get("status")
            .and_then(Value::as_str)
            .unwrap_or("?")
            .to_string(),
        error: r.get("error").and_then(Value::as_str).map(str::to_string),
        ppl: f("val_ppl"),
        wmso: f("weight_mso"),
        amso: f("act_mso"),
        gap_layers,
        method: r
            .get("method")
            .and_then(Value::as_str)
            .unwrap_or("none")
            .to_string(),
        balance: f("balance"),
        max_violation: f("max_violation"),
        dead: f("dead_experts"),
        gap: f("gap_ratio"),
        mode: {
            let base = match r.get("routing").and_then(Value::as_str) {
                Some("soft") => "soft".to_string(),
                Some("expert_choice") => "expert-choice".to_string(),
                _ => format!(
                    "top-{}",
                    r.get("top_k").and_then(Value::as_u64).unwrap_or(0)
                ),
            };
            match r.get("router_temperature").and_then(Value::as_f64) {
                Some(t) if t != 1.0 => format!("{base} (T = {t})"),
                _ => base,
            }
        },
    }
}

/// Layer means of one run's analysis.json: (act, act_all, jac mean, |A|, A², overlap, random, geodesic_n).
fn analysis_means(a: &Value) -> [Option<f64>; 8] {
    let layers = a["layers"].as_array().cloned().unwrap_or_default();
    let avg = |f: &dyn Fn(&Value) -> Option<f64>| -> Option<f64> {
        let v: Vec<f64> = layers.iter().filter_map(f).collect();
        (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
    };
    [
        avg(&|l| l["act_mso"].as_f64()),
        avg(&|l| l["act_mso_all"].as_f64()),
        avg(&|l| l["jacobian"]["mean"].as_f64()),
        avg(&|l| l["jacobian"]["mean_abs"].as_f64()),
        avg(&|l| l["jacobian"]["mean_sq"].as_f64()),
        avg(&|l| l["subspace"]["mean_overlap"].as_f64()),
        avg(&|l| l["subspace"]["random_overlap"].as_f64()),
        avg(&|l| l["subspace"]["mean_geodesic_normalised"].as_f64()),
    ]
}

fn matrix(v: &Value) -> Vec<Vec<Option<f64>>> {
    v.as_array()
        .map(|rows| {
            rows.iter()
                .map(|r| {
                    r.as_array()
                        .map(|c| c.iter().map(Value::as_f64).collect())
                        .unwrap_or_default()
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The routing section: modes side by side (needs runs with analysis.json).
fn routing_section(
    dir: &SweepDir,
    done: &[&Run],
    tables: &mut Vec<Table>,
    figures: &mut Vec<(String, String, String)>,
) {
    let mut by_mode: Vec<(String, Vec<(&Run, Value)>)> = Vec::new();
    for r in done {
        let Ok(text) = std::fs::read_to_string(dir.run(&r.id).join("analysis.json")) else {
            continue;
        };
        let Ok(a) = serde_json::from_str::<Value>(&text) else {
            continue;
        };
        match by_mode.iter_mut().find(|(m, _)| *m == r.mode) {
            Some((_, v)) => v.push((r, a)),
            None => by_mode.push((r.mode.clone(), vec![(r, a)])),
        }
    }
    if by_mode.len() < 2 {
        return;
    }
    by_mode.sort_by(|a, b| a.0.cmp(&b.0));
    let mut rows = Vec::new();
    for (mode, runs) in &by_mode {
        let means: Vec<[Option<f64>; 8]> = runs.iter().map(|(_, a)| analysis_means(a)).collect();
        let refs: Vec<&Run> = runs.iter().map(|(r, _)| *r).collect();
        let col = |k: usize| -> Cell {
            let v: Vec<f64> = means.iter().filter_map(|m| m[k]).collect();
            Cell {
                text: if v.is_empty() {
                    "null".into()
                } else {
                    mean_sd(&v)
                },
                links: vec![],
            }
        };
        let mut first = Cell::from(mode.clone());
        first.links = refs
            .iter()
            .map(|r| {
                (
                    format!("s{}", r.seed),
                    format!("runs/{}/analysis.json", r.id),
                )
            })
            .collect();
        rows.push(vec![
            first,
            col(0),
            col(1),
            col(2),
            col(3),
            col(4),
            col(5),
            col(6),
            col(7),
        ]);
        // Heatmaps of the lowest-seed run of this mode, per layer.
        let (r0, a0) = runs.iter().min_by_key(|(r, _)| r.seed).expect("non-empty");
        for l in a0["layers"].as_array().cloned().unwrap_or_default() {
            let idx = l["index"].as_u64().unwrap_or(0);
            let jm = matrix(&l["jacobian"]["matrix"]);
            if !jm.is_empty() {
                figures.push((
                    format!("routing-{}-jacobian-l{idx}", sanitize(mode)),
                    format!("Jacobian alignment, {mode}, layer {idx} ({})", r0.id),
                    svg::heatmap(&format!("A_ij {mode} L{idx}"), &jm, 0.0, 1.0),
                ));
            }
            let om = matrix(&l["subspace"]["overlap"]);
            if !om.is_empty() {
                figures.push((
                    format!("routing-{}-subspace-l{idx}", sanitize(mode)),
                    format!("Subspace overlap, {mode}, layer {idx} ({})", r0.id),
                    svg::heatmap(&format!("O_ij {mode} L{idx}"), &om, 0.0, 1.0),
                ));
            }
        }
    }
    tables.push(Table {
        title: "Routing: function vs representation space per routing mode".into(),
        header: vec!["mode", "act MSO", "act MSO (all pairs)", "Jacobian mean A", "mean |A|", "mean A²", "subspace overlap", "random r/d", "norm. geodesic"],
        rows,
        note: "Layer means of each run's analysis.json (mean ± sd over seeds). Jacobian alignment over routed pairs (all pairs for top-1 have none: null); subspaces of routed inputs; random r/d is the expected overlap of random subspaces.".into(),
    });
    // Scatter: functional vs representational overlap per expert pair (all layers, all runs).
    let mut sc = Chart::new(
        "Functional vs representational overlap per expert pair",
        "Jacobian alignment A_ij",
        "subspace overlap O_ij",
    );
    for (mode, runs) in &by_mode {
        let mut pts = Vec::new();
        for (_, a) in runs {
            for l in a["layers"].as_array().cloned().unwrap_or_default() {
                let (jm, om) = (
                    matrix(&l["jacobian"]["matrix"]),
                    matrix(&l["subspace"]["overlap"]),
                );
                for i in 0..jm.len().min(om.len()) {
                    for j in i + 1..jm[i].len().min(om[i].len()) {
                        if let (Some(x), Some(y)) = (jm[i][j], om[i][j]) {
                            pts.push((x, y, None));
                        }
                    }
                }
            }
        }
        sc.series.push(Series {
            name: mode.clone(),
            points: pts,
            line: false,
        });
    }
    figures.push(("routing-scatter".into(), "Functional (Jacobian) vs representational (subspace) overlap per expert pair, by routing mode".into(), sc.svg()));
}

/// A table cell: text plus links to the runs behind it.
#[derive(Debug, Clone, Default)]
struct Cell {
    text: String,
    links: Vec<(String, String)>,
}

impl From<String> for Cell {
    fn from(text: String) -> Self {
        Cell {
            text,
            links: vec![],
        }
    }
}

struct Table {
    title: String,
    header: Vec<&'static str>,
    rows: Vec<Vec<Cell>>,
    note: String,
}

fn links(runs: &[&Run]) -> Vec<(String, String)> {
    runs.iter()
        .map(|r| {
            (
                format!("s{}", r.seed),
                format!("runs/{}/summary.json", r.id),
            )
        })
        .collect()
}

fn num(v: f64) -> String {
    if !v.is_finite() {
        "n/a".into()
    } else if v != 0.0 && (v.abs() < 1e-3 || v.abs() >= 1e5) {
        format!("{v:.3e}")
    } else {
        format!("{v:.4}")
    }
}

fn mean_sd(xs: &[f64]) -> String {
    if xs.is_empty() {
        return "n/a".into();
    }
    if xs.len() < 2 {
        return num(stats::mean(xs));
    }
    format!("{} ± {}", num(stats::mean(xs)), num(stats::sd(xs)))
}

fn lam(v: f64) -> String {
    format!("{v}")
}

/// Runs of one dataset grouped by λ (sorted).
fn by_lambda<'a>(runs: &[&'a Run]) -> Vec<(f64, Vec<&'a Run>)> {
    let mut g: Vec<(f64, Vec<&Run>)> = Vec::new();
    for r in runs {
        match g.iter_mut().find(|(l, _)| *l == r.lambda) {
            Some((_, v)) => v.push(r),
            None => g.push((r.lambda, vec![r])),
        }
    }
    g.sort_by(|a, b| a.0.total_cmp(&b.0));
    for (_, v) in &mut g {
        v.sort_by_key(|r| r.seed);
    }
    g
}

/// Paired t by seed when both groups have the same seeds, else Welch.
fn compare(
    base: &[&Run],
    treated: &[&Run],
    f: impl Fn(&Run) -> Option<f64>,
) -> Option<(stats::TTest, &'static str)> {
    let bs: Vec<i64> = base.iter().map(|r| r.seed).collect();
    let ts: Vec<i64> = treated.iter().map(|r| r.seed).collect();
    let bv: Vec<f64> = base.iter().filter_map(|r| f(r)).collect();
    let tv: Vec<f64> = treated.iter().filter_map(|r| f(r)).collect();
    if bs == ts && bv.len() == base.len() && tv.len() == treated.len() {
        stats::paired_t(&bv, &tv).map(|t| (t, "paired t"))
    } else {
        stats::welch_t(&bv, &tv).map(|t| (t, "Welch t"))
    }
}

fn vals(runs: &[&Run], f: impl Fn(&Run) -> Option<f64>) -> Vec<f64> {
    runs.iter().filter_map(|r| f(r)).collect()
}

/// Everything the report shows, computed once and rendered twice.
struct Content {
    title: String,
    tables: Vec<Table>,
    figures: Vec<(String, String, String)>, // (file stem, caption, svg)
    runs_table: Table,
}

/// Whether a run belongs to the λ study of Tables 1–4 (no regulariser but L_orth).
fn lambda_study(r: &Run) -> bool {
    r.method == "none" || (r.method.starts_with("orth ") && !r.method.contains(" + "))
}

/// The regulariser / balancing comparison, when the sweep has such methods.
fn methods_section(
    done: &[&Run],
    tables: &mut Vec<Table>,
    figures: &mut Vec<(String, String, String)>,
) {
    let mut methods: Vec<String> = done.iter().map(|r| r.method.clone()).collect();
    methods.sort();
    methods.dedup();
    if methods.len() < 2 || done.iter().all(|r| lambda_study(r)) {
        return;
    }
    // "none" first, then as listed.
    methods.sort_by_key(|m| (m != "none", m.clone()));
    let mut datasets: Vec<String> = done.iter().map(|r| r.dataset.clone()).collect();
    datasets.sort();
    datasets.dedup();
    for ds in &datasets {
        let runs: Vec<&Run> = done.iter().copied().filter(|r| &r.dataset == ds).collect();
        let group = |m: &str| -> Vec<&Run> {
            let mut g: Vec<&Run> = runs.iter().copied().filter(|r| r.method == m).collect();
            g.sort_by_key(|r| r.seed);
            g
        };
        let base = group("none");
        let mut rows = Vec::new();
        let mut chart = Chart::new(
            &format!("Activation vs weight overlap by method — {ds}"),
            "weight MSO (up)",
            "activation MSO",
        );
        for m in &methods {
            let g = group(m);
            if g.is_empty() {
                continue;
            }
            let test = |f: &dyn Fn(&Run) -> Option<f64>| -> String {
                if m == "none" || base.is_empty() {
                    return "—".into();
                }
                compare(&base, &g, f)
                    .map(|(t, name)| format!("{:.4} ({name})", t.p))
                    .unwrap_or_else(|| "—".into())
            };
            let w = vals(&g, |r| r.wmso);
            let a = vals(&g, |r| r.amso);
            rows.push(vec![
                Cell::from(m.clone()),
                Cell {
                    text: g.len().to_string(),
                    links: links(&g),
                },
                Cell::from(mean_sd(&vals(&g, |r| r.ppl))),
                Cell::from(test(&|r| r.ppl)),
                Cell::from(mean_sd(&w)),
                Cell::from(mean_sd(&a)),
                Cell::from(test(&|r| r.amso)),
                Cell::from(mean_sd(&vals(&g, |r| r.gap))),
                Cell::from(mean_sd(&vals(&g, |r| r.balance))),
                Cell::from(mean_sd(&vals(&g, |r| r.max_violation))),
                Cell::from(test(&|r| r.max_violation)),
                Cell::from(mean_sd(&vals(&g, |r| r.dead))),
            ]);
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
        tables.push(Table {
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
            note: "Mean ± sd over seeds at the final evaluation. p: paired t-test by seed against `none` (Welch when the seeds differ). Balance = exp(H(load))/E; max violation = max load / mean load − 1 (SPEC telemetry).".into(),
        });
        figures.push((
            format!("methods-{}", sanitize(ds)),
            format!("Weight vs activation overlap of every run, by regulariser — {ds}"),
            chart.svg(),
        ));
    }
}

fn build(dir: &SweepDir, rows: &[Map<String, Value>]) -> Content {
    let all: Vec<Run> = rows.iter().map(run_from_row).collect();
    let finished: Vec<&Run> = all.iter().filter(|r| r.status == "done").collect();
    // Tables 1–4 are the λ study: runs with no regulariser other than L_orth.
    let done: Vec<&Run> = finished
        .iter()
        .copied()
        .filter(|r| lambda_study(r))
        .collect();
    let mut datasets: Vec<String> = done.iter().map(|r| r.dataset.clone()).collect();
    datasets.dedup();
    datasets.sort();
    datasets.dedup();
    let mut tables = Vec::new();
    let mut figures = Vec::new();
    let mut t4_rows = Vec::new();
    for ds in &datasets {
        let runs: Vec<&Run> = done.iter().copied().filter(|r| &r.dataset == ds).collect();
        let groups = by_lambda(&runs);
        let base = groups
            .iter()
            .find(|(l, _)| *l == 0.0)
            .map(|(_, v)| v.clone());
        let suffix = if datasets.len() > 1 {
            format!(" — {ds}")
        } else {
            String::new()
        };
        let base_w = base.as_ref().map(|b| stats::mean(&vals(b, |r| r.wmso)));
        let base_p = base.as_ref().map(|b| stats::mean(&vals(b, |r| r.ppl)));

        // Table 1: weight MSO per λ.
        let mut t1 = Vec::new();
        // Table 2: PPL per λ.
        let mut t2 = Vec::new();
        // Table 3: weight vs activation MSO.
        let mut t3 = Vec::new();
        let (mut px, mut py) = (Vec::new(), Vec::new());
        for (l, g) in &groups {
            let w = vals(g, |r| r.wmso);
            let p = vals(g, |r| r.ppl);
            let a = vals(g, |r| r.amso);
            let dw = base_w.map(|b| stats::delta_pct(b, stats::mean(&w)));
            let dp = base_p.map(|b| stats::delta_pct(b, stats::mean(&p)));
            t1.push(vec![
                Cell::from(lam(*l)),
                Cell {
                    text: mean_sd(&w),
                    links: links(g),
                },
                Cell::from(if *l == 0.0 {
                    "—".into()
                } else {
                    dw.map(|d| format!("{d:+.1}%")).unwrap_or("n/a".into())
                }),
            ]);
            let test = match (&base, *l == 0.0) {
                (Some(b), false) => compare(b, g, |r| r.ppl),
                _ => None,
            };
            t2.push(vec![
                Cell::from(lam(*l)),
                Cell {
                    text: mean_sd(&p),
                    links: links(g),
                },
                Cell::from(if *l == 0.0 {
                    "—".into()
                } else {
                    dp.map(|d| format!("{d:+.2}%")).unwrap_or("n/a".into())
                }),
                Cell::from(
                    test.map(|(t, name)| {
                        format!("{:.4} ({name}, t = {:.2}, df = {:.1})", t.p, t.t, t.df)
                    })
                    .unwrap_or_else(|| "—".into()),
                ),
            ]);
            let (mw, ma) = (stats::mean(&w), stats::mean(&a));
            if mw.is_finite() && ma.is_finite() {
                px.push(mw);
                py.push(ma);
            }
            t3.push(vec![
                Cell::from(lam(*l)),
                Cell {
                    text: num(mw),
                    links: links(g),
                },
                Cell {
                    text: if a.is_empty() {
                        "null (k = 1)".into()
                    } else {
                        num(ma)
                    },
                    links: links(g),
                },
                Cell::from(if a.is_empty() || mw == 0.0 {
                    "n/a".into()
                } else {
                    format!("{:.1}", ma / mw)
                }),
            ]);
        }
        let pear = stats::pearson(&px, &py);
        tables.push(Table {
            title: format!("Table 1: Weight MSO (up) by λ{suffix}"),
            header: vec!["λ", "weight MSO (mean ± sd over seeds)", "Δ% vs λ = 0"],
            rows: t1,
            note: "Weight MSO: mean over MoE layers of 2/(E(E−1)) Σ_{i<j} G_ij² of the normalised flattened W_up (SPEC.md).".into(),
        });
        tables.push(Table {
            title: format!("Table 2: Validation perplexity by λ{suffix}"),
            header: vec!["λ", "val PPL (mean ± sd)", "Δ% vs λ = 0", "p vs λ = 0"],
            rows: t2,
            note: "Two-sided paired t-test over seeds (pairing by seed); Welch's t-test where the seed sets differ.".into(),
        });
        tables.push(Table {
            title: format!("Table 3: Weight vs activation overlap{suffix}"),
            header: vec!["λ", "weight MSO", "activation MSO", "activation / weight"],
            rows: t3,
            note: match pear {
                Some(p) => format!(
                    "Pearson r between weight MSO and activation MSO across the {} λ values (means over seeds): r = {:.3}, p = {:.4}, 95% CI {} (Fisher z).",
                    p.n,
                    p.r,
                    p.p,
                    if p.ci_low.is_finite() { format!("[{:.3}, {:.3}]", p.ci_low, p.ci_high) } else { "n/a (needs at least 4 λ values)".into() }
                ),
                None => format!("Pearson r needs at least 3 λ values with both measures (have {}).", px.len()),
            },
        });
        // Table 4 row: baseline vs the λ > 0 with the lowest mean PPL.
        if let Some(b) = &base {
            let best = groups
                .iter()
                .filter(|(l, _)| *l > 0.0)
                .map(|(l, g)| (*l, g, stats::mean(&vals(g, |r| r.ppl))))
                .filter(|x| x.2.is_finite())
                .min_by(|a, c| a.2.total_cmp(&c.2));
            if let Some((l, g, m)) = best {
                let bp = stats::mean(&vals(b, |r| r.ppl));
                let test = compare(b, g, |r| r.ppl);
                t4_rows.push(vec![
                    Cell::from(ds.clone()),
                    Cell {
                        text: mean_sd(&vals(b, |r| r.ppl)),
                        links: links(b),
                    },
                    Cell::from(lam(l)),
                    Cell {
                        text: mean_sd(&vals(g, |r| r.ppl)),
                        links: links(g),
                    },
                    Cell::from(format!("{:+.2}%", stats::delta_pct(bp, m))),
                    Cell::from(
                        test.map(|(t, _)| format!("{:.4}", t.p))
                            .unwrap_or_else(|| "—".into()),
                    ),
                ]);
            }
        }

        // Figure 1: weight and activation MSO against λ (categorical axis), error bars over seeds.
        let ticks: Vec<(f64, String)> = groups
            .iter()
            .enumerate()
            .map(|(i, (l, _))| (i as f64, lam(*l)))
            .collect();
        let mut fw = Chart::new(&format!("Weight MSO vs λ{suffix}"), "λ", "weight MSO (up)");
        let mut fa = Chart::new(
            &format!("Activation MSO vs λ{suffix}"),
            "λ",
            "activation MSO (routed pairs)",
        );
        fw.x_ticks = Some(ticks.clone());
        fa.x_ticks = Some(ticks);
        let pts = |f: &dyn Fn(&Run) -> Option<f64>| -> Vec<(f64, f64, Option<f64>)> {
            groups
                .iter()
                .enumerate()
                .filter_map(|(i, (_, g))| {
                    let v = vals(g, f);
                    (!v.is_empty()).then(|| {
                        (
                            i as f64,
                            stats::mean(&v),
                            Some(stats::sd(&v)).filter(|s| s.is_finite()),
                        )
                    })
                })
                .collect()
        };
        fw.series.push(Series {
            name: "weight MSO".into(),
            points: pts(&|r| r.wmso),
            line: true,
        });
        fa.series.push(Series {
            name: "activation MSO".into(),
            points: pts(&|r| r.amso),
            line: true,
        });
        let stem = sanitize(ds);
        figures.push((
            format!("figure1-weight-{stem}"),
            format!("Figure 1a: weight MSO against λ{suffix} (mean ± sd over seeds)"),
            fw.svg(),
        ));
        figures.push((
            format!("figure1-activation-{stem}"),
            format!("Figure 1b: activation MSO against λ{suffix} (mean ± sd over seeds)"),
            fa.svg(),
        ));

        // Per-layer gap ratio.
        let mut fg = Chart::new(
            &format!("Gap ratio per layer{suffix}"),
            "MoE layer",
            "activation MSO / weight MSO",
        );
        for (l, g) in &groups {
            let layers = g.iter().map(|r| r.gap_layers.len()).max().unwrap_or(0);
            let points = (0..layers)
                .filter_map(|i| {
                    let v: Vec<f64> = g
                        .iter()
                        .filter_map(|r| r.gap_layers.get(i).copied().flatten())
                        .collect();
                    (!v.is_empty()).then(|| (i as f64, stats::mean(&v), None))
                })
                .collect();
            fg.series.push(Series {
                name: format!("λ = {}", lam(*l)),
                points,
                line: true,
            });
        }
        fg.x_ticks = Some(
            (0..groups
                .iter()
                .flat_map(|(_, g)| g.iter().map(|r| r.gap_layers.len()))
                .max()
                .unwrap_or(0))
                .map(|i| (i as f64, i.to_string()))
                .collect(),
        );
        figures.push((
            format!("gap-ratio-{stem}"),
            format!("Per-layer gap ratio{suffix} (mean over seeds)"),
            fg.svg(),
        ));

        // Training curves: LM loss against step, mean over seeds per λ.
        let mut fc = Chart::new(&format!("Training loss{suffix}"), "step", "LM loss (nats)");
        for (l, g) in &groups {
            let mut acc: BTreeMap<u64, Vec<f64>> = BTreeMap::new();
            for r in g {
                for (s, v) in train_curve(dir, &r.id) {
                    acc.entry(s).or_default().push(v);
                }
            }
            let points = acc
                .iter()
                .map(|(s, v)| (*s as f64, stats::mean(v), None))
                .collect();
            fc.series.push(Series {
                name: format!("λ = {}", lam(*l)),
                points,
                line: true,
            });
        }
        figures.push((
            format!("training-{stem}"),
            format!("Training curves{suffix} (mean over seeds)"),
            fc.svg(),
        ));
    }
    tables.push(Table {
        title: "Table 4: Baseline vs chosen λ per dataset".into(),
        header: vec![
            "dataset",
            "PPL at λ = 0",
            "chosen λ",
            "PPL at chosen λ",
            "Δ%",
            "p",
        ],
        rows: t4_rows,
        note: "Chosen λ: the λ > 0 with the lowest mean validation perplexity on that dataset."
            .into(),
    });
    routing_section(dir, &finished, &mut tables, &mut figures);
    methods_section(&finished, &mut tables, &mut figures);
    let runs_table = Table {
        title: "Runs".into(),
        header: vec![
            "run", "status", "dataset", "method", "seed", "val PPL", "error",
        ],
        rows: all
            .iter()
            .map(|r| {
                vec![
                    Cell {
                        text: r.id.clone(),
                        links: vec![("metrics".into(), format!("runs/{}/metrics.jsonl", r.id))],
                    },
                    Cell::from(r.status.clone()),
                    Cell::from(r.dataset.clone()),
                    Cell::from(r.method.clone()),
                    Cell::from(r.seed.to_string()),
                    Cell::from(r.ppl.map(num).unwrap_or_default()),
                    Cell::from(r.error.clone().unwrap_or_default()),
                ]
            })
            .collect(),
        note: format!(
            "{} runs: {} done, {} failed, {} not finished.",
            all.len(),
            all.iter().filter(|r| r.status == "done").count(),
            all.iter().filter(|r| r.status == "failed").count(),
            all.iter()
                .filter(|r| r.status != "done" && r.status != "failed")
                .count()
        ),
    };
    let title = format!(
        "moescope report: {}",
        dir.0
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    );
    Content {
        title,
        tables,
        figures,
        runs_table,
    }
}

fn sanitize(s: &str) -> String {
    let s: String = s
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    s.trim_matches('-')
        .chars()
        .rev()
        .take(40)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect()
}

fn train_curve(dir: &SweepDir, id: &str) -> Vec<(u64, f64)> {
    let Ok(text) = std::fs::read_to_string(dir.run(id).join("metrics.jsonl")) else {
        return vec![];
    };
    text.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["kind"] == "train")
        .filter_map(|v| {
            Some((
                v["step"].as_u64()?,
                v.get("lm_loss")
                    .and_then(Value::as_f64)
                    .or_else(|| v["loss"].as_f64())?,
            ))
        })
        .collect()
}

fn md_cell(c: &Cell) -> String {
    let mut s = c.text.replace('|', "\\|");
    if !c.links.is_empty() {
        let l: Vec<String> = c.links.iter().map(|(t, h)| format!("[{t}]({h})")).collect();
        s += &format!(" ({})", l.join(" "));
    }
    s
}

fn html_cell(c: &Cell) -> String {
    let mut s = esc(&c.text);
    if !c.links.is_empty() {
        let l: Vec<String> = c
            .links
            .iter()
            .map(|(t, h)| format!(r#"<a href="{}">{}</a>"#, esc(h), esc(t)))
            .collect();
        s += &format!(" <sup>{}</sup>", l.join(" "));
    }
    s
}

fn md_table(t: &Table) -> String {
    let mut s = format!(
        "## {}\n\n| {} |\n|{}|\n",
        t.title,
        t.header.join(" | "),
        t.header.iter().map(|_| "---").collect::<Vec<_>>().join("|")
    );
    for r in &t.rows {
        s += &format!(
            "| {} |\n",
            r.iter().map(md_cell).collect::<Vec<_>>().join(" | ")
        );
    }
    if t.rows.is_empty() {
        s += "\n(no finished runs for this table)\n";
    }
    s += &format!("\n{}\n\n", t.note);
    s
}

fn html_table(t: &Table) -> String {
    let mut s = format!(
        "<h2>{}</h2>\n<table><tr>{}</tr>\n",
        esc(&t.title),
        t.header
            .iter()
            .map(|h| format!("<th>{}</th>", esc(h)))
            .collect::<String>()
    );
    for r in &t.rows {
        s += &format!(
            "<tr>{}</tr>\n",
            r.iter()
                .map(|c| format!("<td>{}</td>", html_cell(c)))
                .collect::<String>()
        );
    }
    s += "</table>\n";
    if t.rows.is_empty() {
        s += "<p>(no finished runs for this table)</p>\n";
    }
    s += &format!("<p class=\"note\">{}</p>\n", esc(&t.note));
    s
}

/// Paths of the written report.
#[derive(Debug, Clone)]
pub struct ReportFiles {
    pub markdown: std::path::PathBuf,
    pub html: std::path::PathBuf,
}

/// Collect the sweep's results and write `report.md`, `figures/*.svg` and `report.html`.
pub fn write_report(dir: &SweepDir) -> Result<ReportFiles> {
    let spec = crate::experiments::sweep::SweepSpec::from_file(&dir.spec())?;
    let cells = spec.cells()?;
    let rows = results::collect(dir, &cells)?;
    let swept: Vec<String> = cells
        .first()
        .map(|c| c.values.keys().cloned().collect())
        .unwrap_or_default();
    results::write(dir, &rows, &swept)?;
    let c = build(dir, &rows);
    let mut md = format!("# {}\n\nSweep `{}`: {} runs. Results table: `results.csv` / `results.jsonl`. Definitions: SPEC.md.\n\n", c.title, spec.name, rows.len());
    let mut html = format!(
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{}</title><style>\
         body{{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}}\
         table{{border-collapse:collapse;margin:0.5em 0}}td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}\
         th{{background:#f3f3f3}}sup a{{color:#667;font-size:0.8em}}.note{{color:#555;font-size:0.9em}}figure{{display:inline-block;margin:0.5em}}\
         </style></head><body>\n<h1>{}</h1>\n<p>Sweep <code>{}</code>: {} runs. Results table: <a href=\"results.csv\">results.csv</a> / <a href=\"results.jsonl\">results.jsonl</a>. Numbers link to the runs (s = seed) that produced them.</p>\n",
        esc(&c.title),
        esc(&c.title),
        esc(&spec.name),
        rows.len()
    );
    for t in &c.tables {
        md += &md_table(t);
        html += &html_table(t);
    }
    let fig_dir = dir.0.join("figures");
    std::fs::create_dir_all(&fig_dir).map_err(|e| crate::Error::io(&fig_dir, e))?;
    md += "## Figures\n\n";
    html += "<h2>Figures</h2>\n";
    for (stem, caption, svg) in &c.figures {
        let file = format!("figures/{stem}.svg");
        write_atomic(&dir.0.join(&file), svg.as_bytes())?;
        let _ = write!(md, "![{caption}]({file})\n\n*{caption}*\n\n");
        let _ = writeln!(
            html,
            "<figure>{svg}<figcaption>{}</figcaption></figure>",
            esc(caption)
        );
    }
    md += &md_table(&c.runs_table);
    html += &html_table(&c.runs_table);
    html += "</body></html>\n";
    let files = ReportFiles {
        markdown: dir.0.join("report.md"),
        html: dir.0.join("report.html"),
    };
    write_atomic(&files.markdown, md.as_bytes())?;
    write_atomic(&files.html, html.as_bytes())?;
    Ok(files)
}
