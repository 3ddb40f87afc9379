//! The routing section: routing modes side by side in function space
//! (Jacobian alignment) and representation space (expert subspaces), from
//! the runs' analysis.json (`measure.final_analysis`).

use super::runs::Run;
use super::svg::{self, Chart, Series};
use super::table::{mean_sd, sanitize, Table, TableCell};
use super::{Figure, Section};
use crate::experiments::sweep::SweepDir;
use serde::Deserialize;

/// The parts of an analysis.json the report reads (FORMAT.md "Analysis").
#[derive(Debug, Deserialize)]
struct Analysis {
    layers: Vec<AnalysisLayer>,
}

#[derive(Debug, Deserialize)]
struct AnalysisLayer {
    index: usize,
    act_mso: Option<f64>,
    act_mso_all: Option<f64>,
    jacobian: Option<JacobianSummary>,
    subspace: Option<SubspaceSummary>,
}

#[derive(Debug, Deserialize)]
struct JacobianSummary {
    mean: Option<f64>,
    mean_abs: Option<f64>,
    mean_sq: Option<f64>,
    /// E×E mean alignment A_ij.
    matrix: Vec<Vec<Option<f64>>>,
}

#[derive(Debug, Deserialize)]
struct SubspaceSummary {
    mean_overlap: Option<f64>,
    random_overlap: Option<f64>,
    mean_geodesic_normalised: Option<f64>,
    /// E×E subspace overlap O_ij.
    overlap: Vec<Vec<Option<f64>>>,
}

impl AnalysisLayer {
    fn jacobian_matrix(&self) -> &[Vec<Option<f64>>] {
        self.jacobian.as_ref().map_or(&[], |j| &j.matrix)
    }
    fn subspace_overlap(&self) -> &[Vec<Option<f64>>] {
        self.subspace.as_ref().map_or(&[], |s| &s.overlap)
    }
}

/// The columns of the routing table after the mode, each a layer mean.
const COLUMNS: usize = 8;

/// Layer means of one analysis: act, act (all pairs), Jacobian mean, |A|, A²,
/// subspace overlap, random overlap, normalised geodesic.
fn layer_means(a: &Analysis) -> [Option<f64>; COLUMNS] {
    let avg = |f: &dyn Fn(&AnalysisLayer) -> Option<f64>| -> Option<f64> {
        let v: Vec<f64> = a.layers.iter().filter_map(f).collect();
        (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
    };
    let jac = |f: fn(&JacobianSummary) -> Option<f64>| avg(&|l| l.jacobian.as_ref().and_then(f));
    let sub = |f: fn(&SubspaceSummary) -> Option<f64>| avg(&|l| l.subspace.as_ref().and_then(f));
    [
        avg(&|l| l.act_mso),
        avg(&|l| l.act_mso_all),
        jac(|j| j.mean),
        jac(|j| j.mean_abs),
        jac(|j| j.mean_sq),
        sub(|s| s.mean_overlap),
        sub(|s| s.random_overlap),
        sub(|s| s.mean_geodesic_normalised),
    ]
}

/// The finished runs that have an analysis.json, grouped by routing mode (sorted).
fn runs_by_mode<'a>(dir: &SweepDir, done: &[&'a Run]) -> Vec<(String, Vec<(&'a Run, Analysis)>)> {
    let mut by_mode: Vec<(String, Vec<(&Run, Analysis)>)> = Vec::new();
    for r in done {
        let Ok(text) = std::fs::read_to_string(dir.run(&r.id).join("analysis.json")) else {
            continue;
        };
        let Ok(a) = serde_json::from_str::<Analysis>(&text) else {
            continue;
        };
        match by_mode.iter_mut().find(|(m, _)| *m == r.mode) {
            Some((_, v)) => v.push((r, a)),
            None => by_mode.push((r.mode.clone(), vec![(r, a)])),
        }
    }
    by_mode.sort_by(|a, b| a.0.cmp(&b.0));
    by_mode
}

/// The routing table and figures; empty unless two modes have analyses.
pub(super) fn section(dir: &SweepDir, done: &[&Run]) -> Section {
    let by_mode = runs_by_mode(dir, done);
    let mut s = Section::default();
    if by_mode.len() < 2 {
        return s;
    }
    let mut rows = Vec::new();
    for (mode, runs) in &by_mode {
        rows.push(mode_row(mode, runs));
        s.figures.extend(heatmaps(mode, runs));
    }
    s.tables.push(Table {
        title: "Routing: function vs representation space per routing mode".into(),
        header: vec!["mode", "act MSO", "act MSO (all pairs)", "Jacobian mean A", "mean |A|", "mean A²", "subspace overlap", "random r/d", "norm. geodesic"],
        rows,
        note: "Layer means of each run's analysis.json (mean ± sd over seeds). Jacobian alignment over routed pairs (all pairs for top-1 have none: null); subspaces of routed inputs; random r/d is the expected overlap of random subspaces.".into(),
    });
    s.figures.push(scatter(&by_mode));
    s
}

/// A mode's row: each column's mean ± sd over the mode's runs.
fn mode_row(mode: &str, runs: &[(&Run, Analysis)]) -> Vec<TableCell> {
    let means: Vec<[Option<f64>; COLUMNS]> = runs.iter().map(|(_, a)| layer_means(a)).collect();
    let mut first = TableCell::from(mode.to_string());
    first.links = runs
        .iter()
        .map(|(r, _)| {
            (
                format!("s{}", r.seed),
                format!("runs/{}/analysis.json", r.id),
            )
        })
        .collect();
    let mut row = vec![first];
    row.extend((0..COLUMNS).map(|k| {
        let v: Vec<f64> = means.iter().filter_map(|m| m[k]).collect();
        TableCell::from(if v.is_empty() {
            "null".into()
        } else {
            mean_sd(&v)
        })
    }));
    row
}

/// Jacobian and subspace heatmaps of the mode's lowest-seed run, per layer.
fn heatmaps(mode: &str, runs: &[(&Run, Analysis)]) -> Vec<Figure> {
    let mut figures = Vec::new();
    let (r0, a0) = runs.iter().min_by_key(|(r, _)| r.seed).expect("non-empty");
    let stem = sanitize(mode);
    for l in &a0.layers {
        let idx = l.index;
        let jm = l.jacobian_matrix();
        if !jm.is_empty() {
            figures.push(Figure {
                stem: format!("routing-{stem}-jacobian-l{idx}"),
                caption: format!("Jacobian alignment, {mode}, layer {idx} ({})", r0.id),
                svg: svg::heatmap(&format!("A_ij {mode} L{idx}"), jm, 0.0, 1.0),
            });
        }
        let om = l.subspace_overlap();
        if !om.is_empty() {
            figures.push(Figure {
                stem: format!("routing-{stem}-subspace-l{idx}"),
                caption: format!("Subspace overlap, {mode}, layer {idx} ({})", r0.id),
                svg: svg::heatmap(&format!("O_ij {mode} L{idx}"), om, 0.0, 1.0),
            });
        }
    }
    figures
}

/// Functional vs representational overlap per expert pair (all layers, all runs).
fn scatter(by_mode: &[(String, Vec<(&Run, Analysis)>)]) -> Figure {
    let mut sc = Chart::new(
        "Functional vs representational overlap per expert pair",
        "Jacobian alignment A_ij",
        "subspace overlap O_ij",
    );
    for (mode, runs) in by_mode {
        let mut pts = Vec::new();
        for l in runs.iter().flat_map(|(_, a)| &a.layers) {
            let (jm, om) = (l.jacobian_matrix(), l.subspace_overlap());
            for i in 0..jm.len().min(om.len()) {
                for j in i + 1..jm[i].len().min(om[i].len()) {
                    if let (Some(x), Some(y)) = (jm[i][j], om[i][j]) {
                        pts.push((x, y, None));
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
    Figure {
        stem: "routing-scatter".into(),
        caption: "Functional (Jacobian) vs representational (subspace) overlap per expert pair, by routing mode".into(),
        svg: sc.svg(),
    }
}
