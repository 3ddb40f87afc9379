//! `moescope report SWEEP_DIR`: the weight–activation study's tables and
//! figures from a sweep's results, as `report.md` (figures in `figures/`)
//! and a self-contained `report.html`. Every aggregated number links to the
//! runs it was computed from.
//!
//! One file per section of the report: [`lambda_study`] (Tables 1–3 and the
//! tables of [`study_tables`] and [`correlation`]) with its [`figures`], then
//! [`table4`], [`routing`], [`methods`], [`hypotheses`], the [`notes`] on
//! the statistics, and the [`runs`] table. [`columns`] lists the measures
//! with their chance levels, [`effect`] the comparisons with the baseline.
//! The sections fill [`table::Table`]s and [`Figure`]s that [`markdown`] and
//! [`html`] render. [`analysis`] draws the figures of one `analyze` report.

pub mod analysis;
mod columns;
mod correlation;
mod effect;
mod figures;
mod html;
mod hypotheses;
mod lambda_study;
mod markdown;
mod methods;
mod notes;
mod routing;
mod runs;
mod study_tables;
pub mod svg;
mod table;
mod table4;

use crate::experiments::results::{self, ResultRow};
use crate::experiments::sweep::{SweepDir, SweepSpec};
use crate::fsutil::write_atomic;
use crate::Result;
use runs::Run;
use serde::{Deserialize, Serialize};
use table::Table;

/// The `[report]` table of a sweep file: choices of the report, not of the runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReportOptions {
    /// The fixed λ that Table 4 compares with λ = 0 (the study's 0.001).
    pub table4_lambda: f64,
}

impl Default for ReportOptions {
    fn default() -> Self {
        ReportOptions {
            table4_lambda: 0.001,
        }
    }
}

/// A figure of the report: written to `figures/<stem>.svg`, inlined in the HTML.
struct Figure {
    stem: String,
    caption: String,
    svg: String,
}

impl Figure {
    /// Its path relative to the sweep folder.
    fn file(&self) -> String {
        format!("figures/{}.svg", self.stem)
    }
}

/// What one section of the report adds.
#[derive(Default)]
struct Section {
    tables: Vec<Table>,
    figures: Vec<Figure>,
}

/// Everything the report shows, computed once and rendered twice.
struct Content {
    title: String,
    tables: Vec<Table>,
    figures: Vec<Figure>,
    runs_table: Table,
}

/// The report's sections, in order, from the sweep's result rows.
fn build(dir: &SweepDir, rows: &[ResultRow], options: &ReportOptions) -> Content {
    let all: Vec<Run> = rows.iter().map(Run::from_row).collect();
    let finished: Vec<&Run> = all.iter().filter(|r| r.status == "done").collect();
    let sections = [
        lambda_study::section(dir, &finished, options.table4_lambda),
        routing::section(dir, &finished),
        methods::section(&finished),
        hypotheses::section(&finished),
        notes::section(!finished.is_empty()),
    ];
    let (mut tables, mut figures) = (Vec::new(), Vec::new());
    for s in sections {
        tables.extend(s.tables);
        figures.extend(s.figures);
    }
    let name = dir
        .0
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    Content {
        title: format!("moescope report: {name}"),
        tables,
        figures,
        runs_table: runs::runs_table(&all),
    }
}

/// Paths of the written report.
#[derive(Debug, Clone)]
pub struct ReportFiles {
    pub markdown: std::path::PathBuf,
    pub html: std::path::PathBuf,
}

/// Collect the sweep's results (`results.csv`, `results.jsonl`) and write
/// `report.md`, `figures/*.svg` and `report.html`. `table4_lambda` overrides
/// the `[report]` table of the sweep folder's `sweep.toml`.
pub fn write_sweep_report(dir: &SweepDir, table4_lambda: Option<f64>) -> Result<ReportFiles> {
    let spec = SweepSpec::from_file(&dir.spec())?;
    let mut options = spec.report.clone();
    if let Some(l) = table4_lambda {
        options.table4_lambda = l;
    }
    let cells = spec.cells()?;
    let rows = results::collect(dir, &cells)?;
    let swept: Vec<String> = cells
        .first()
        .map(|c| c.values.keys().cloned().collect())
        .unwrap_or_default();
    results::write(dir, &rows, &swept)?;
    let c = build(dir, &rows, &options);
    let fig_dir = dir.0.join("figures");
    std::fs::create_dir_all(&fig_dir).map_err(|e| crate::Error::io(&fig_dir, e))?;
    for f in &c.figures {
        write_atomic(&dir.0.join(f.file()), f.svg.as_bytes())?;
    }
    let files = ReportFiles {
        markdown: dir.0.join("report.md"),
        html: dir.0.join("report.html"),
    };
    let md = markdown::document(&c, &spec.name, rows.len());
    write_atomic(&files.markdown, md.as_bytes())?;
    let html = html::document(&c, &spec.name, rows.len());
    write_atomic(&files.html, html.as_bytes())?;
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: &str, method: &str, lambda: f64, seed: u64, ppl: f64) -> ResultRow {
        ResultRow {
            id: id.into(),
            status: "done".into(),
            dataset: Some("tiny".into()),
            method: Some(method.into()),
            lambda: Some(lambda),
            seed: Some(seed),
            routing: Some(crate::config::Routing::Topk),
            top_k: Some(2),
            router_temperature: Some(1.0),
            val_ppl: Some(ppl),
            weight_mso: Some(0.1 / (1.0 + 10.0 * lambda) + 0.001 * seed as f64),
            act_mso: Some(0.3 / (1.0 + lambda) + 0.002 * seed as f64),
            gap_ratio: Some(3.0),
            layers: results::LayerColumns {
                gap_ratio: vec![Some(2.0), Some(4.0)],
                ..Default::default()
            },
            ..Default::default()
        }
    }

    /// A λ study of 3 λ × 3 seeds, one other method, one failed run.
    fn sweep_rows() -> Vec<ResultRow> {
        let mut rows = Vec::new();
        for (i, lambda) in [0.0, 0.01, 0.1].into_iter().enumerate() {
            for seed in 0..3 {
                let method = if lambda == 0.0 {
                    "none".to_string()
                } else {
                    format!("orth {lambda}")
                };
                let ppl = 50.0 + i as f64 + 0.1 * seed as f64;
                rows.push(row(&format!("l{i}-s{seed}"), &method, lambda, seed, ppl));
            }
        }
        for seed in 0..3 {
            rows.push(row(&format!("aux-s{seed}"), "aux 0.01", 0.0, seed, 49.0));
        }
        rows.push(ResultRow {
            id: "bad".into(),
            status: "failed".into(),
            error: Some("train.lr: must be positive".into()),
            ..Default::default()
        });
        rows
    }

    #[test]
    fn sections_come_in_order_and_render_to_markdown_and_html() {
        let d = tempfile::tempdir().unwrap();
        let dir = SweepDir(d.path().join("my-sweep"));
        // One run's training curve, in today's metrics.jsonl format.
        let run = dir.run("l0-s0");
        std::fs::create_dir_all(&run).unwrap();
        std::fs::write(
            run.join("metrics.jsonl"),
            r#"{"elapsed_s":1.0,"grad_norm":1.0,"kind":"train","lm_loss":5.0,"loss":5.0,"lr":0.001,"orth_lambda":0.0,"orth_loss":null,"step":10,"tokens":640,"tokens_per_s":100.0}
"#,
        )
        .unwrap();
        assert_eq!(figures::train_curve(&dir, "l0-s0"), vec![(10, 5.0)]);
        let c = build(&dir, &sweep_rows(), &ReportOptions::default());
        assert_eq!(c.title, "moescope report: my-sweep");
        let titles: Vec<&str> = c.tables.iter().map(|t| t.title.as_str()).collect();
        assert_eq!(
            titles,
            [
                "Table 1: Weight MSO (up) by λ",
                "Table 2: Validation perplexity by λ",
                "Table 3: Weight vs activation overlap",
                "Table 3b: Correlation of weight and activation MSO",
                "Weight MSO of every family and granularity by λ",
                "Activation MSO by space and λ",
                "Variance across seeds by λ",
                "Per-layer overlap by λ",
                "Table 4: λ = 0 vs a fixed λ per dataset",
                "Regularisers and load balancing — tiny",
                "Hypotheses — tiny",
                "Notes: chance levels, effect sizes and corrections",
            ]
        );
        // Tables 1–3 hold the λ study only: one row per λ.
        let study: Vec<&Table> = c
            .tables
            .iter()
            .filter(|t| {
                ["Table 1:", "Table 2:", "Table 3:"]
                    .iter()
                    .any(|p| t.title.starts_with(p))
            })
            .collect();
        assert!(study.len() == 3 && study.iter().all(|t| t.rows.len() == 3));
        // The fixed λ = 0.001 is not in this sweep: only the best-λ row, labelled.
        let t4 = &c.tables[8];
        assert_eq!(
            (
                t4.rows.len(),
                t4.rows[0][1].text.as_str(),
                t4.rows[0][2].text.as_str()
            ),
            (1, table4::BEST_LABEL, "0.01"),
            "the λ with the lowest PPL"
        );
        assert!(
            t4.note.contains("not in the sweep for: tiny"),
            "{}",
            t4.note
        );
        assert!(
            c.tables[2].note.contains("Pearson r"),
            "{}",
            c.tables[2].note
        );
        let stems: Vec<&str> = c.figures.iter().map(|f| f.stem.as_str()).collect();
        assert_eq!(
            stems,
            [
                "figure1-tiny",
                "weight-by-lambda-tiny",
                "activation-by-lambda-tiny",
                "gap-ratio-tiny",
                "training-tiny",
                "methods-tiny"
            ]
        );
        assert_eq!(c.runs_table.rows.len(), 13);
        assert!(c
            .runs_table
            .note
            .contains("13 runs: 12 done, 1 failed, 0 not finished"));

        let md = markdown::document(&c, "lambda", 13);
        assert!(md.starts_with("# moescope report: my-sweep\n\nSweep `lambda`: 13 runs."));
        assert!(md.contains("| 0.01 | 0.0"), "{md}");
        assert!(md.contains("![Figure 1a: weight MSO against λ (mean ± sd over seeds)](figures/weight-by-lambda-tiny.svg)"));
        assert!(md.contains("[s0](runs/l1-s0/summary.json)"));
        assert!(md.contains("![Figure 1: activation MSO against weight MSO, one point per λ (mean, error bars ± sd over seeds; dashed: chance levels)](figures/figure1-tiny.svg)"), "{md}");
        assert!(md.contains("| bad ([metrics](runs/bad/metrics.jsonl)) | failed |"));
        assert!(md.contains("paired t"));
        let html = html::document(&c, "lambda", 13);
        assert!(html.starts_with("<!DOCTYPE html>") && html.ends_with("</body></html>\n"));
        assert!(html.contains("<h2>Table 4: λ = 0 vs a fixed λ per dataset</h2>"));
        assert!(
            html.contains("<figure><svg")
                && html.contains(r#"<a href="runs/l1-s0/summary.json">s0</a>"#)
        );
    }

    /// A routing sweep at λ = 0: no λ table pools its modes; with λ varying
    /// under two modes, each mode gets its own λ tables.
    #[test]
    fn lambda_tables_only_when_lambda_varies_and_never_across_modes() {
        let d = tempfile::tempdir().unwrap();
        let dir = SweepDir(d.path().to_path_buf());
        let mode = |mut r: ResultRow, k: usize| {
            r.top_k = Some(k);
            r
        };
        let routing: Vec<ResultRow> = (0..3)
            .flat_map(|s| {
                [
                    mode(row(&format!("k1-s{s}"), "none", 0.0, s, 9.0), 1),
                    mode(row(&format!("k2-s{s}"), "none", 0.0, s, 8.0), 2),
                ]
            })
            .collect();
        let c = build(&dir, &routing, &ReportOptions::default());
        assert!(
            c.tables.iter().all(|t| !t.title.starts_with("Table")),
            "{:?}",
            c.tables.iter().map(|t| &t.title).collect::<Vec<_>>()
        );

        let mut both = Vec::new();
        for k in [1, 2] {
            for (i, l) in [0.0, 0.1].into_iter().enumerate() {
                for s in 0..2 {
                    let m = if l == 0.0 {
                        "none".to_string()
                    } else {
                        format!("orth {l}")
                    };
                    both.push(mode(row(&format!("k{k}-l{i}-s{s}"), &m, l, s, 8.0 + l), k));
                }
            }
        }
        let c = build(&dir, &both, &ReportOptions::default());
        let t1: Vec<&Table> = c
            .tables
            .iter()
            .filter(|t| t.title.starts_with("Table 1"))
            .collect();
        assert_eq!(t1.len(), 2, "one Table 1 per routing mode");
        assert!(
            t1[0].title.ends_with("top-1") && t1[1].title.ends_with("top-2"),
            "{} / {}",
            t1[0].title,
            t1[1].title
        );
        assert!(t1.iter().all(|t| t.rows.len() == 2));
    }

    #[test]
    fn a_sweep_without_finished_runs_still_reports_its_runs() {
        let d = tempfile::tempdir().unwrap();
        let dir = SweepDir(d.path().to_path_buf());
        let rows = vec![ResultRow {
            id: "r".into(),
            status: "pending".into(),
            ..Default::default()
        }];
        let c = build(&dir, &rows, &ReportOptions::default());
        assert_eq!(c.tables.len(), 1, "Table 4, empty");
        assert!(c.tables[0].rows.is_empty() && c.figures.is_empty());
        assert!(markdown::document(&c, "s", 1).contains("(no finished runs for this table)"));
    }
}

#[cfg(test)]
mod study_tests;
