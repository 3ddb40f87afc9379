//! The λ study's figures, per dataset: the study's Figure 1 (activation
//! against weight MSO, one point per λ), both measures against λ, the
//! per-layer gap ratio, and the training curves.

use super::lambda_study::DatasetStudy;
use super::runs::{vals, Run};
use super::svg::{Chart, Series, XyPoint, XySeries};
use super::table::{lam, sanitize};
use super::Figure;
use crate::experiments::stats;
use crate::experiments::sweep::SweepDir;
use crate::metrics::{read_metrics, MetricRow};
use std::collections::BTreeMap;

/// Figure 1, the measures against λ, the gap ratio per layer and the training
/// curves of one dataset.
pub(super) fn lambda_figures(dir: &SweepDir, st: &DatasetStudy) -> Vec<Figure> {
    let stem = sanitize(&st.label);
    let suffix = &st.suffix;
    let (weight, activation) = by_lambda(st);
    vec![
        Figure {
            stem: format!("figure1-{stem}"),
            caption: format!("Figure 1: activation MSO against weight MSO{suffix}, one point per λ (mean, error bars ± sd over seeds; dashed: chance levels)"),
            svg: figure1(st).svg(),
        },
        Figure {
            stem: format!("weight-by-lambda-{stem}"),
            caption: format!("Figure 1a: weight MSO against λ{suffix} (mean ± sd over seeds)"),
            svg: weight.svg(),
        },
        Figure {
            stem: format!("activation-by-lambda-{stem}"),
            caption: format!(
                "Figure 1b: activation MSO against λ{suffix} (mean ± sd over seeds)"
            ),
            svg: activation.svg(),
        },
        Figure {
            stem: format!("gap-ratio-{stem}"),
            caption: format!("Per-layer gap ratio{suffix} (mean over seeds, log axis)"),
            svg: gap_ratio_by_layer(st).svg(),
        },
        Figure {
            stem: format!("training-{stem}"),
            caption: format!("Training curves{suffix} (mean over seeds)"),
            svg: training_curves(dir, st).svg(),
        },
    ]
}

/// Whether the positive values span more than two decades: such an axis is
/// unreadable on a linear scale (all but the largest values sit at zero).
pub(super) fn needs_log(values: impl IntoIterator<Item = f64>) -> bool {
    let (lo, hi) = values
        .into_iter()
        .filter(|v| v.is_finite() && *v > 0.0)
        .fold((f64::INFINITY, 0.0f64), |(a, b), v| (a.min(v), b.max(v)));
    hi / lo > 100.0
}

/// The mean over the runs of a chance level, when any run logged it.
fn chance(runs: &[&Run], f: fn(&Run) -> Option<f64>) -> Option<f64> {
    let v = vals(runs, f);
    (!v.is_empty()).then(|| stats::mean(&v))
}

/// mean and sd (None for a single value) of `f` over `g`; None for no value.
fn mean_sd_of(g: &[&Run], f: fn(&Run) -> Option<f64>) -> Option<(f64, Option<f64>)> {
    let v = vals(g, f);
    (!v.is_empty()).then(|| {
        (
            stats::mean(&v),
            Some(stats::sd(&v)).filter(|s| s.is_finite()),
        )
    })
}

/// The study's Figure 1: activation MSO (y) against weight MSO (x, log axis),
/// one point per λ labelled in the legend, error bars ± sd over seeds on both
/// axes, the chance levels as dashed lines.
pub(super) fn figure1(st: &DatasetStudy) -> Chart {
    let mut c = Chart::new(
        &format!("Activation vs weight MSO{}", st.suffix),
        "weight MSO (up, flat; log)",
        "activation MSO (outputs)",
    );
    c.x_log = true;
    for (l, g) in &st.groups {
        let (Some((x, x_err)), Some((y, y_err))) =
            (mean_sd_of(g, |r| r.wmso), mean_sd_of(g, |r| r.amso))
        else {
            continue;
        };
        c.xy_series.push(XySeries {
            name: format!("λ = {}", lam(*l)),
            points: vec![XyPoint { x, y, x_err, y_err }],
            line: false,
        });
    }
    let runs = st.runs();
    if let Some(w) = chance(&runs, |r| r.study.weight_mso_chance) {
        c.vlines.push((w, "chance 1/P".into()));
    }
    if let Some(a) = chance(&runs, |r| r.study.act_mso_chance) {
        c.hlines.push((a, "chance 1/d_model".into()));
    }
    let ys = c
        .xy_series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.y));
    c.y_log = needs_log(ys.chain(c.hlines.iter().map(|h| h.0)));
    c
}

/// Weight and activation MSO against λ (categorical axis), error bars over
/// seeds, on a log y axis where the values span decades.
fn by_lambda(st: &DatasetStudy) -> (Chart, Chart) {
    let suffix = &st.suffix;
    let ticks: Vec<(f64, String)> = st
        .groups
        .iter()
        .enumerate()
        .map(|(i, (l, _))| (i as f64, lam(*l)))
        .collect();
    let chart = |title: &str, y: &str, name: &str, f: fn(&Run) -> Option<f64>| {
        let mut c = Chart::new(&format!("{title}{suffix}"), "λ", y);
        c.x_ticks = Some(ticks.clone());
        let points: Vec<(f64, f64, Option<f64>)> = st
            .groups
            .iter()
            .enumerate()
            .filter_map(|(i, (_, g))| mean_sd_of(g, f).map(|(m, s)| (i as f64, m, s)))
            .collect();
        c.y_log = needs_log(points.iter().map(|p| p.1));
        c.series.push(Series {
            name: name.into(),
            points,
            line: true,
        });
        c
    };
    (
        chart("Weight MSO vs λ", "weight MSO (up)", "weight MSO", |r| {
            r.wmso
        }),
        chart(
            "Activation MSO vs λ",
            "activation MSO (routed pairs)",
            "activation MSO",
            |r| r.amso,
        ),
    )
}

/// One line per λ: the gap ratio of each MoE layer, mean over seeds, on a log
/// y axis (the ratios span orders of magnitude across layers and λ).
fn gap_ratio_by_layer(st: &DatasetStudy) -> Chart {
    let mut fg = Chart::new(
        &format!("Gap ratio per layer{}", st.suffix),
        "MoE layer",
        "activation MSO / weight MSO (log)",
    );
    fg.y_log = true;
    let layers = st
        .runs()
        .iter()
        .map(|r| r.layers.gap_ratio.len())
        .max()
        .unwrap_or(0);
    for (l, g) in &st.groups {
        let points = (0..layers)
            .filter_map(|i| {
                let v: Vec<f64> = g
                    .iter()
                    .filter_map(|r| r.layers.gap_ratio.get(i).copied().flatten())
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
    fg.x_ticks = Some((0..layers).map(|i| (i as f64, i.to_string())).collect());
    fg
}

/// LM loss against step, mean over seeds per λ.
fn training_curves(dir: &SweepDir, st: &DatasetStudy) -> Chart {
    let mut fc = Chart::new(
        &format!("Training loss{}", st.suffix),
        "step",
        "LM loss (nats)",
    );
    for (l, g) in &st.groups {
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
    fc
}

/// (step, LM loss) of a run's train rows; none when its metrics cannot be read
/// (the figure shows what there is; results.csv already read the same file).
pub(super) fn train_curve(dir: &SweepDir, id: &str) -> Vec<(u64, f64)> {
    let Ok(rows) = read_metrics(&dir.run(id).join("metrics.jsonl")) else {
        return vec![];
    };
    rows.into_iter()
        .filter_map(|row| match row {
            MetricRow::Train(t) => Some((t.step, t.lm_loss)),
            _ => None,
        })
        .collect()
}
