//! The λ study's tables beyond the study's own: weight MSO of every family and
//! granularity, activation MSO in every space (each with its chance level and
//! step-0 value), the variance across seeds, and the values per MoE layer.

use super::columns::{
    chance_text, present, start_cell, value_cell, Measure, ACT_MEASURES, WEIGHT_MEASURES,
};
use super::lambda_study::DatasetStudy;
use super::runs::{vals, Run};
use super::table::{lam, mean_sd, num, Table, TableCell};
use crate::experiments::stats;

/// Rows "chance", "step 0" (when any measure was logged there) and one per λ,
/// a column per measure any run has.
fn measure_rows(st: &DatasetStudy, measures: &[&Measure]) -> Vec<Vec<TableCell>> {
    let all = st.runs();
    let label = |s: &str| TableCell::from(s.to_string());
    let mut rows = vec![std::iter::once(label("chance (1/L)"))
        .chain(
            measures
                .iter()
                .map(|m| TableCell::from(chance_text(m, &all))),
        )
        .collect::<Vec<_>>()];
    let has_start = measures
        .iter()
        .any(|m| m.start.is_some_and(|s| all.iter().any(|r| s(r).is_some())));
    if has_start {
        rows.push(
            std::iter::once(label("step 0 (all λ)"))
                .chain(measures.iter().map(|m| start_cell(m, &all)))
                .collect(),
        );
    }
    for (l, g) in &st.groups {
        rows.push(
            std::iter::once(TableCell::from(lam(*l)))
                .chain(measures.iter().map(|m| value_cell(m, g)))
                .collect(),
        );
    }
    rows
}

/// A header: "λ" then the measures' names.
fn header(measures: &[&Measure]) -> Vec<&'static str> {
    std::iter::once("λ")
        .chain(measures.iter().map(|m| m.name))
        .collect()
}

/// Weight MSO of every family (W_up at flat, rows and cols granularity).
pub(super) fn weight_families(st: &DatasetStudy) -> Table {
    let measures = present(&WEIGHT_MEASURES, &st.runs());
    Table {
        title: format!("Weight MSO of every family and granularity by λ{}", st.suffix),
        header: header(&measures),
        rows: measure_rows(st, &measures),
        note: "Mean ± sd over seeds; mean over MoE layers. flat: the whole matrix as one vector (L = P = d_ff·d_model for up, gate and down); rows: mean over aligned rows a of cos²(W_i[a,:], W_j[a,:]) (L = d_model); cols: the same over columns (L = d_ff); router: the experts' router rows (L = d_model). Chance (1/L): E[cos²] of two independent random directions in L dimensions. Step 0: before the first training step (train.eval_at_start), where logged.".into(),
    }
}

/// Activation MSO of the outputs, hidden activations and their LayerNorm.
pub(super) fn activation_spaces(st: &DatasetStudy) -> Table {
    let measures = present(&ACT_MEASURES, &st.runs());
    Table {
        title: format!("Activation MSO by space and λ{}", st.suffix),
        header: header(&measures),
        rows: measure_rows(st, &measures),
        note: "Mean ± sd over seeds; mean over MoE layers of the mean cos² of co-routed expert pairs. output: the experts' outputs (L = d_model); hidden: φ(W_up x + b) (L = d_ff); hidden_ln: LayerNorm of it, as the study's eq. 4 writes h_i (L = d_ff − 1: the centring removes one dimension). Chance (1/L): independent random directions. Step 0: before training, where logged.".into(),
    }
}

/// Brown–Forsythe's test of equal variances across the λ groups, as text.
fn brown_forsythe_text(st: &DatasetStudy, f: fn(&Run) -> Option<f64>) -> String {
    let groups: Vec<Vec<f64>> = st.groups.iter().map(|(_, g)| vals(g, f)).collect();
    match stats::brown_forsythe(&groups) {
        Some(t) => format!(
            "F({:.0}, {:.0}) = {:.2}, p = {}",
            t.df1,
            t.df2,
            t.f,
            super::effect::p_text(Some(t.p))
        ),
        None => "n/a (needs ≥ 2 λ with spread)".into(),
    }
}

/// The spread over seeds per λ, and whether it differs across λ.
pub(super) fn seed_variance(st: &DatasetStudy) -> Table {
    let sd_cell =
        |g: &[&Run], f: fn(&Run) -> Option<f64>| TableCell::linked(num(stats::sd(&vals(g, f))), g);
    let rows = st
        .groups
        .iter()
        .map(|(l, g)| {
            vec![
                TableCell::from(lam(*l)),
                TableCell::from(g.len().to_string()),
                sd_cell(g, |r| r.ppl),
                sd_cell(g, |r| r.loss),
                sd_cell(g, |r| r.amso),
                sd_cell(g, |r| r.wmso),
            ]
        })
        .collect();
    Table {
        title: format!("Variance across seeds by λ{}", st.suffix),
        header: vec![
            "λ",
            "seeds",
            "sd val PPL",
            "sd val loss (nats)",
            "sd activation MSO",
            "sd weight MSO (up)",
        ],
        rows,
        note: format!(
            "Sample sd over seeds. Brown–Forsythe test of equal variance across the λ groups (Levene's test on deviations from the group medians): val PPL {}; activation MSO {}.",
            brown_forsythe_text(st, |r| r.ppl),
            brown_forsythe_text(st, |r| r.amso)
        ),
    }
}

/// The number of MoE layers any run of the study logged.
fn layer_count(st: &DatasetStudy) -> usize {
    st.runs()
        .iter()
        .map(|r| {
            let l = &r.layers;
            l.weight_mso
                .len()
                .max(l.act_mso.len())
                .max(l.gap_ratio.len())
        })
        .max()
        .unwrap_or(0)
}

/// One row per (λ, MoE layer): weight MSO, activation MSO and gap ratio.
pub(super) fn per_layer(st: &DatasetStudy) -> Table {
    let at = |col: &[Option<f64>], i: usize| col.get(i).copied().flatten();
    let mut rows = Vec::new();
    for (l, g) in &st.groups {
        for i in 0..layer_count(st) {
            let cell = |f: &dyn Fn(&Run) -> Option<f64>| TableCell::linked(mean_sd(&vals(g, f)), g);
            rows.push(vec![
                TableCell::from(lam(*l)),
                TableCell::from(i.to_string()),
                cell(&|r| at(&r.layers.weight_mso, i)),
                cell(&|r| at(&r.layers.act_mso, i)),
                cell(&|r| at(&r.layers.gap_ratio, i)),
            ]);
        }
    }
    Table {
        title: format!("Per-layer overlap by λ{}", st.suffix),
        header: vec![
            "λ",
            "MoE layer",
            "weight MSO (up)",
            "activation MSO",
            "gap ratio",
        ],
        rows,
        note: "Mean ± sd over seeds at the final evaluation. Gap ratio: activation MSO / weight MSO of the layer (the study reports 3000–5600× in early layers and 300–450× in late ones).".into(),
    }
}
