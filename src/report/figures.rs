//! The λ study's figures, per dataset: weight and activation MSO against λ
//! (Figure 1), the per-layer gap ratio, and the training curves.

use super::lambda_study::DatasetStudy;
use super::runs::{vals, Run};
use super::svg::{Chart, Series};
use super::table::{lam, sanitize};
use super::Figure;
use crate::experiments::stats;
use crate::experiments::sweep::SweepDir;
use crate::metrics::{read_metrics, MetricRow};
use std::collections::BTreeMap;

/// Figure 1a/1b, the gap ratio per layer and the training curves of one dataset.
pub(super) fn lambda_figures(dir: &SweepDir, st: &DatasetStudy) -> Vec<Figure> {
    let stem = sanitize(&st.dataset);
    let suffix = &st.suffix;
    let (weight, activation) = figure1(st);
    vec![
        Figure {
            stem: format!("figure1-weight-{stem}"),
            caption: format!("Figure 1a: weight MSO against λ{suffix} (mean ± sd over seeds)"),
            svg: weight.svg(),
        },
        Figure {
            stem: format!("figure1-activation-{stem}"),
            caption: format!("Figure 1b: activation MSO against λ{suffix} (mean ± sd over seeds)"),
            svg: activation.svg(),
        },
        Figure {
            stem: format!("gap-ratio-{stem}"),
            caption: format!("Per-layer gap ratio{suffix} (mean over seeds)"),
            svg: gap_ratio_by_layer(st).svg(),
        },
        Figure {
            stem: format!("training-{stem}"),
            caption: format!("Training curves{suffix} (mean over seeds)"),
            svg: training_curves(dir, st).svg(),
        },
    ]
}

/// Weight and activation MSO against λ (categorical axis), error bars over seeds.
fn figure1(st: &DatasetStudy) -> (Chart, Chart) {
    let suffix = &st.suffix;
    let ticks: Vec<(f64, String)> = st
        .groups
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
        st.groups
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
    (fw, fa)
}

/// One line per λ: the gap ratio of each MoE layer, mean over seeds.
fn gap_ratio_by_layer(st: &DatasetStudy) -> Chart {
    let mut fg = Chart::new(
        &format!("Gap ratio per layer{}", st.suffix),
        "MoE layer",
        "activation MSO / weight MSO",
    );
    for (l, g) in &st.groups {
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
    let layers = st
        .groups
        .iter()
        .flat_map(|(_, g)| g.iter().map(|r| r.gap_layers.len()))
        .max()
        .unwrap_or(0);
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
