//! Tests of the study's tables and figures: Table 4 at the fixed λ, the
//! per-layer table, chance levels, Figure 1's axes and the hypotheses table.

use super::lambda_study::studies;
use super::runs::Run;
use super::table::Table;
use super::*;
use crate::experiments::results::{LayerColumns, StudyColumns};

/// A finished run of `tiny` at λ with the measures the study tables read:
/// weight MSO falling with λ, chance levels of the tiny model, two MoE layers.
fn run_row(method: &str, lambda: f64, seed: u64, ppl: f64) -> ResultRow {
    let w = 4e-6 / (1.0 + 1e3 * lambda) + 1e-7 * seed as f64;
    ResultRow {
        id: format!("{method}-{lambda}-s{seed}").replace(' ', "_"),
        status: "done".into(),
        dataset: Some("tiny".into()),
        method: Some(method.into()),
        lambda: Some(lambda),
        seed: Some(seed),
        routing: Some(crate::config::Routing::Topk),
        top_k: Some(2),
        router_temperature: Some(1.0),
        val_loss: Some(ppl.ln()),
        val_ppl: Some(ppl),
        weight_mso: Some(w),
        act_mso: Some(0.3 + 0.01 * seed as f64 - lambda),
        study: StudyColumns {
            weight_mso_chance: Some(1.0 / 262_144.0),
            act_mso_chance: Some(1.0 / 128.0),
            weight_mso_rows: Some(2e-3 + w),
            weight_mso_rows_chance: Some(1.0 / 128.0),
            act_mso_start: Some(0.5),
            weight_mso_start: Some(4e-6),
            ..Default::default()
        },
        layers: LayerColumns {
            weight_mso: vec![Some(w), Some(2.0 * w)],
            act_mso: vec![Some(0.3), Some(0.2)],
            gap_ratio: vec![Some(0.3 / w), Some(0.1 / w)],
        },
        ..Default::default()
    }
}

/// λ ∈ {0, 0.001, 0.01} × 3 seeds, λ = 0.01 with the lowest PPL.
fn lambda_rows() -> Vec<ResultRow> {
    let mut rows = Vec::new();
    for (lambda, ppl) in [(0.0, 50.0), (0.001, 49.5), (0.01, 48.0)] {
        for seed in 0..3 {
            let m = if lambda == 0.0 {
                "none".to_string()
            } else {
                format!("orth {lambda}")
            };
            rows.push(run_row(
                &m,
                lambda,
                seed,
                ppl + 0.1 * seed as f64 + lambda * seed as f64,
            ));
        }
    }
    rows
}

fn report(rows: &[ResultRow], table4_lambda: f64) -> Content {
    let d = tempfile::tempdir().unwrap();
    build(
        &SweepDir(d.path().to_path_buf()),
        rows,
        &ReportOptions { table4_lambda },
    )
}

fn table<'c>(c: &'c Content, title: &str) -> &'c Table {
    c.tables
        .iter()
        .find(|t| t.title.starts_with(title))
        .unwrap_or_else(|| panic!("no table {title}"))
}

#[test]
fn table4_compares_the_fixed_lambda_not_the_best() {
    let c = report(&lambda_rows(), 0.001);
    let t4 = table(&c, "Table 4");
    assert_eq!(t4.rows.len(), 2);
    let fixed: Vec<&str> = t4.rows[0].iter().map(|c| c.text.as_str()).collect();
    assert_eq!(&fixed[..4], ["tiny", "fixed λ", "0.001", "3"]);
    // Loss in nats beside PPL: ln 50 = 3.912.
    assert!(
        fixed[4].starts_with("3.9") && fixed[9].starts_with("50.1"),
        "{fixed:?}"
    );
    assert_ne!(fixed[7], "—", "paired p of the loss");
    assert_eq!(t4.rows[1][1].text, table4::BEST_LABEL);
    assert_eq!(t4.rows[1][2].text, "0.01");
    assert!(!t4.note.contains("not in the sweep"));

    let c = report(&lambda_rows(), 0.5);
    let t4 = table(&c, "Table 4");
    assert_eq!(t4.rows.len(), 1, "only the labelled best-λ row");
    assert!(
        t4.note.contains("λ = 0.5 is not in the sweep for: tiny"),
        "{}",
        t4.note
    );
}

#[test]
fn per_layer_table_has_one_row_per_lambda_and_layer() {
    let c = report(&lambda_rows(), 0.001);
    let t = table(&c, "Per-layer overlap");
    let keys: Vec<(&str, &str)> = t
        .rows
        .iter()
        .map(|r| (r[0].text.as_str(), r[1].text.as_str()))
        .collect();
    assert_eq!(
        keys,
        [
            ("0", "0"),
            ("0", "1"),
            ("0.001", "0"),
            ("0.001", "1"),
            ("0.01", "0"),
            ("0.01", "1")
        ]
    );
    // Layer 1 of λ = 0: activation MSO 0.2 in every seed.
    assert!(
        t.rows[1][3].text.starts_with("0.2000 ±"),
        "{}",
        t.rows[1][3].text
    );
}

#[test]
fn chance_levels_sit_next_to_every_mso() {
    let c = report(&lambda_rows(), 0.001);
    let t1 = table(&c, "Table 1");
    assert_eq!(t1.header[2], "chance (1/P)");
    assert!(t1.rows.iter().all(|r| r[2].text == "3.815e-6"));
    let fam = table(&c, "Weight MSO of every family");
    assert_eq!(
        fam.header,
        ["λ", "up (flat)", "up (rows)"],
        "no empty family columns"
    );
    let chance: Vec<&str> = fam.rows[0].iter().map(|c| c.text.as_str()).collect();
    assert_eq!(chance, ["chance (1/L)", "3.815e-6", "0.0078"]);
    assert_eq!(fam.rows[1][0].text, "step 0 (all λ)");
    let act = table(&c, "Activation MSO by space");
    assert_eq!(act.rows[0][1].text, "0.0078");
    assert!(act.rows[1][1].text.starts_with("0.5000"), "step 0");
    // Holm and d_z beside the raw p; Spearman beside Pearson; Brown–Forsythe.
    assert_eq!(t1.header[4..], ["d_z", "p vs λ = 0", "p (Holm)"]);
    assert_eq!(t1.rows[0][4].text, "—", "no test of λ = 0 against itself");
    assert_ne!(t1.rows[2][6].text, "—");
    let t3b = table(&c, "Table 3b");
    assert_eq!(t3b.rows.len(), 4);
    assert_eq!(
        (t3b.rows[3][0].text.as_str(), t3b.rows[3][2].text.as_str()),
        ("Spearman ρ", "9")
    );
    assert!(table(&c, "Variance across seeds")
        .note
        .contains("Brown–Forsythe"));
    assert!(table(&c, "Notes").rows[0][1].text.contains("1/L"));
}

#[test]
fn figure1_is_one_scatter_with_log_x_axis_error_bars_and_chance_lines() {
    let rows = lambda_rows();
    let runs: Vec<Run> = rows.iter().map(Run::from_row).collect();
    let finished: Vec<&Run> = runs.iter().collect();
    let st = &studies(&finished)[0];
    let chart = figures::figure1(st);
    assert!(chart.x_log);
    let names: Vec<&str> = chart.xy_series.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(
        names,
        ["λ = 0", "λ = 0.001", "λ = 0.01"],
        "one point per λ, labelled"
    );
    assert!(chart.xy_series.iter().all(|s| s.points.len() == 1
        && s.points[0].x_err.is_some()
        && s.points[0].y_err.is_some()));
    let svg = chart.svg();
    assert!(
        svg.contains(">1e-6<") || svg.contains(">2e-6<"),
        "log x ticks: {svg}"
    );
    assert!(svg.contains("chance 1/P") && svg.contains("chance 1/d_model"));
    // The gap ratio spans decades: a log y axis.
    let c = report(&rows, 0.001);
    let gap = c
        .figures
        .iter()
        .find(|f| f.stem == "gap-ratio-tiny")
        .unwrap();
    assert!(
        gap.svg.contains(">1e5<") || gap.svg.contains(">1e6<"),
        "{}",
        gap.svg
    );
}

/// One seed per method, as `configs/sweeps/p1-hypotheses.toml` runs it.
fn hypothesis_rows(seeds: &[u64]) -> Vec<ResultRow> {
    let mut rows = Vec::new();
    for &seed in seeds {
        for (method, lambda, factor) in [
            ("none", 0.0, 1.0),
            ("orth 0.1 (rows)", 0.1, 2.0),
            ("orth -0.1", -0.1, 3.0),
            ("orth 0.1 + expert decay 0", 0.1, 0.5),
        ] {
            let mut r = run_row(method, lambda, seed, 50.0);
            r.weight_mso = Some(4e-6 * factor * (1.0 + 0.01 * seed as f64));
            r.swept
                .insert("variant".into(), serde_json::json!({"reg": {}}));
            rows.push(r);
        }
    }
    rows
}

#[test]
fn hypotheses_table_shows_delta_against_the_none_runs() {
    let c = report(&hypothesis_rows(&[42]), 0.001);
    let t = table(&c, "Hypotheses — tiny");
    let methods: Vec<&str> = t.rows.iter().map(|r| r[0].text.as_str()).collect();
    assert_eq!(
        methods,
        [
            "chance (1/L)",
            "none",
            "orth -0.1",
            "orth 0.1 (rows)",
            "orth 0.1 + expert decay 0"
        ]
    );
    let delta_flat = t
        .header
        .iter()
        .position(|h| h.starts_with("Δ% up (flat)"))
        .unwrap();
    assert_eq!(t.rows[1][delta_flat].text, "—");
    assert_eq!(t.rows[3][delta_flat].text, "+100.0% (n = 1, no test)");
    assert_eq!(t.rows[0][2].text, "3.815e-6", "chance of the flat W_up");
    // `orth 0.1 (rows)` is not pooled into the λ study's λ = 0.1.
    let lambdas: Vec<&str> = table(&c, "Table 1")
        .rows
        .iter()
        .map(|r| r[0].text.as_str())
        .collect();
    assert_eq!(lambdas, ["-0.1", "0"]);

    // Several seeds: paired by seed, with a CI and a p-value.
    let c = report(&hypothesis_rows(&[1, 2, 3]), 0.001);
    let t = table(&c, "Hypotheses — tiny");
    let cell = &t.rows[3][delta_flat].text;
    assert!(
        cell.starts_with("+100.0% [") && cell.contains("p = "),
        "{cell}"
    );
}

#[test]
fn a_sweep_file_report_table_sets_table4_lambda() {
    let spec: crate::experiments::sweep::SweepSpec =
        toml::from_str("[report]\ntable4_lambda = 0.01\n").unwrap();
    assert_eq!(spec.report.table4_lambda, 0.01);
    let spec: crate::experiments::sweep::SweepSpec = toml::from_str("").unwrap();
    assert_eq!(spec.report, ReportOptions::default());
    assert_eq!(spec.report.table4_lambda, 0.001);
    let bad: std::result::Result<crate::experiments::sweep::SweepSpec, _> =
        toml::from_str("[report]\ntable4_lamda = 0.01\n");
    assert!(bad.is_err(), "unknown keys are refused");
}
