//! The routing section: routing modes side by side in function space
//! (Jacobian alignment) and representation space (expert subspaces), from
//! the runs' analysis.json (`measure.final_analysis`).

use super::runs::Run;
use super::svg::{self, Chart, Series};
use super::table::{mean_sd, sanitize, Table, TableCell};
use super::{Figure, Section};
use crate::experiments::stats;
use crate::experiments::sweep::SweepDir;
use crate::measures::pairs::PairSets;
use serde::Deserialize;

/// The parts of an analysis.json the report reads (FORMAT.md "Analysis").
#[derive(Debug, Deserialize)]
struct Analysis {
    layers: Vec<AnalysisLayer>,
    #[serde(default)]
    summary: AnalysisSummary,
    #[serde(default)]
    options: AnalysisOptions,
}

#[derive(Debug, Default, Deserialize)]
struct AnalysisSummary {
    #[serde(default)]
    geometry: Geometry,
}

#[derive(Debug, Default, Deserialize)]
struct AnalysisOptions {
    #[serde(default)]
    subspace_space: String,
    #[serde(default)]
    subspace_weighted: bool,
}

/// `summary.geometry`: layer means of the pair-set measures and their nulls.
#[derive(Debug, Default, Deserialize)]
struct Geometry {
    #[serde(default)]
    act_mso: Sets,
    #[serde(default)]
    jacobian: Sets,
    #[serde(default)]
    jacobian_null_shuffled: Sets,
    jacobian_null_init: Option<f64>,
    #[serde(default)]
    subspace_overlap: Sets,
    subspace_geodesic_normalised: Option<f64>,
    subspace_null_overlap: Option<f64>,
    subspace_z: Option<f64>,
    subspace_random_overlap: Option<f64>,
    subspace_degenerate: Option<String>,
}

/// A value per pair set (docs/MEASURES.md, "Pair sets").
type Sets = PairSets<f64>;

#[derive(Debug, Deserialize)]
struct AnalysisLayer {
    index: usize,
    jacobian: Option<JacobianSummary>,
    subspace: Option<SubspaceSummary>,
}

#[derive(Debug, Deserialize)]
struct JacobianSummary {
    /// E×E mean alignment A_ij.
    matrix: Vec<Vec<Option<f64>>>,
}

#[derive(Debug, Deserialize)]
struct SubspaceSummary {
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

/// The routing tables and figures; empty unless two modes have analyses.
/// One row per routing mode (never pooled), every mode with the same
/// columns: each pair set, the nulls, and a paired test against top-2.
pub(super) fn section(dir: &SweepDir, done: &[&Run]) -> Section {
    let by_mode = runs_by_mode(dir, done);
    let mut s = Section::default();
    if by_mode.len() < 2 {
        return s;
    }
    let base = by_mode
        .iter()
        .find(|(m, _)| m == "top-2")
        .map(|(_, r)| r.as_slice());
    let mut act_rows = Vec::new();
    let mut jac_rows = Vec::new();
    let mut sub_rows = Vec::new();
    for (mode, runs) in &by_mode {
        let g = |f: &dyn Fn(&Geometry) -> Option<f64>| -> Vec<(u64, f64)> {
            runs.iter()
                .filter_map(|(r, a)| f(&a.summary.geometry).map(|v| (r.seed, v)))
                .collect()
        };
        let cmp =
            |f: &dyn Fn(&Geometry) -> Option<f64>| compared(&g(f), base.map(|b| seeds_of(b, f)));
        let mut act = vec![
            mode_cell(mode, runs),
            plain(&runs.iter().filter_map(|(r, _)| r.ppl).collect::<Vec<_>>()),
        ];
        let mut jac = vec![mode_cell(mode, runs)];
        let mut sub = vec![mode_cell(mode, runs), TableCell::from(space_of(runs))];
        for set in 0..3 {
            act.push(cmp(&|x| x.act_mso.get(set).copied()));
            jac.push(cmp(&|x| x.jacobian.get(set).copied()));
            sub.push(cmp(&|x| x.subspace_overlap.get(set).copied()));
        }
        jac.push(plain_of(&g(&|x| x.jacobian_null_shuffled.routed)));
        jac.push(plain_of(&g(&|x| x.jacobian_null_shuffled.gate_weighted)));
        jac.push(plain_of(&g(&|x| x.jacobian_null_init)));
        sub.push(plain_of(&g(&|x| x.subspace_null_overlap)));
        sub.push(plain_of(&g(&|x| x.subspace_z)));
        sub.push(plain_of(&g(&|x| x.subspace_random_overlap)));
        sub.push(plain_of(&g(&|x| x.subspace_geodesic_normalised)));
        let degenerate = runs
            .iter()
            .find_map(|(_, a)| a.summary.geometry.subspace_degenerate.clone());
        sub.push(TableCell::from(degenerate.map_or(String::new(), |_| {
            "DEGENERATE (soft routing, unweighted input PCA)".into()
        })));
        act_rows.push(act);
        jac_rows.push(jac);
        sub_rows.push(sub);
        s.figures.extend(heatmaps(mode, runs));
    }
    let test_note = "Each cell: mean ± sd over seeds of the layer means; (p) a paired t-test against top-2 over the seeds both modes have (— for top-2 itself). Pair sets (docs/MEASURES.md): routed = the pairs the router selected (soft routing: the top-k by gate), all = every pair, gate_weighted = every pair weighted by g_i·g_j; top-1 has no routed pair (null).";
    s.tables.push(Table {
        title: "Routing: perplexity and activation MSO by pair set".into(),
        header: vec![
            "mode",
            "val PPL",
            "act MSO routed",
            "act MSO all",
            "act MSO gate_weighted",
        ],
        rows: act_rows,
        note: test_note.into(),
    });
    s.tables.push(Table {
        title: "Routing: Jacobian alignment (function space) by pair set, with nulls".into(),
        header: vec!["mode", "A routed", "A all", "A gate_weighted", "null: shuffled routing (routed)", "null: shuffled routing (gate_weighted)", "null: independent init (all)"],
        rows: jac_rows,
        note: format!("{test_note} Nulls: the same experts with each token's routing taken from another token; experts of the same shapes initialised independently."),
    });
    s.tables.push(Table {
        title: "Routing: expert subspaces (representation space) by pair set, with nulls".into(),
        header: vec!["mode", "space", "overlap routed", "overlap all", "overlap gate_weighted", "permutation null", "z", "random r/d", "norm. geodesic", "note"],
        rows: sub_rows,
        note: format!("{test_note} Permutation null: each expert's rows from random token sets of its size and weights; z = (null − overlap)/sd, > 0 when experts are more separated than chance."),
    });
    s.figures.push(scatter(&by_mode));
    s
}

/// The mode's name, linking each seed's analysis.json.
fn mode_cell(mode: &str, runs: &[(&Run, Analysis)]) -> TableCell {
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
    first
}

/// `output, weighted` etc. for the mode's subspace analyses.
fn space_of(runs: &[(&Run, Analysis)]) -> String {
    runs.first()
        .map(|(_, a)| {
            let o = &a.options;
            format!(
                "{}{}",
                o.subspace_space,
                if o.subspace_weighted {
                    ", weighted"
                } else {
                    ""
                }
            )
        })
        .unwrap_or_default()
}

/// (seed, value) of a mode's runs.
fn seeds_of(runs: &[(&Run, Analysis)], f: &dyn Fn(&Geometry) -> Option<f64>) -> Vec<(u64, f64)> {
    runs.iter()
        .filter_map(|(r, a)| f(&a.summary.geometry).map(|v| (r.seed, v)))
        .collect()
}

fn plain(v: &[f64]) -> TableCell {
    TableCell::from(if v.is_empty() {
        "null".into()
    } else {
        mean_sd(v)
    })
}

fn plain_of(v: &[(u64, f64)]) -> TableCell {
    plain(&v.iter().map(|x| x.1).collect::<Vec<_>>())
}

/// mean ± sd, and the paired t-test's p against the base mode over shared seeds.
fn compared(v: &[(u64, f64)], base: Option<Vec<(u64, f64)>>) -> TableCell {
    let mut cell = plain_of(v);
    let Some(base) = base else { return cell };
    let pairs: Vec<(f64, f64)> = v
        .iter()
        .filter_map(|(s, x)| base.iter().find(|(bs, _)| bs == s).map(|(_, b)| (*b, *x)))
        .collect();
    if pairs.is_empty() {
        return cell;
    }
    if pairs.iter().all(|(b, x)| b == x) {
        cell.text += " (—)";
    } else if let Some(t) = stats::paired_t(
        &pairs.iter().map(|p| p.0).collect::<Vec<_>>(),
        &pairs.iter().map(|p| p.1).collect::<Vec<_>>(),
    ) {
        cell.text += &format!(" (p {:.3})", t.p);
    }
    cell
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
