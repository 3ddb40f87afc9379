//! The runs as the report sees them, grouped and compared.

use super::table::{num, Table, TableCell};
use crate::config::Routing;
use crate::experiments::results::{LayerColumns, ResultRow, StudyColumns};
use crate::experiments::stats;
use crate::experiments::sweep::CROSS_SECTION_KEY;

/// A run of the sweep, with the report's defaults for what is unknown.
#[derive(Debug, Clone)]
pub(super) struct Run {
    pub id: String,
    pub dataset: String,
    pub lambda: f64,
    pub seed: u64,
    pub status: String,
    pub error: Option<String>,
    /// Validation loss (nats) and perplexity of the final evaluation.
    pub loss: Option<f64>,
    pub ppl: Option<f64>,
    /// Weight MSO of `up` (flat) and activation MSO of the outputs, model means.
    pub wmso: Option<f64>,
    pub amso: Option<f64>,
    /// Every family, granularity and space with its chance level, and step 0.
    pub study: StudyColumns,
    /// Weight MSO, activation MSO and gap ratio per MoE layer.
    pub layers: LayerColumns,
    /// Whether the sweep's grid chose this run's settings by a `variant` key.
    pub from_variant: bool,
    /// `top-k`, `soft` or `expert-choice`, with the router temperature when not 1.
    pub mode: String,
    /// Regularisers / balancing (`none`, `orth 0.01`, `aux 0.01`, ...).
    pub method: String,
    pub balance: Option<f64>,
    pub max_violation: Option<f64>,
    pub dead: Option<f64>,
    pub gap: Option<f64>,
}

impl Run {
    pub fn from_row(r: &ResultRow) -> Run {
        Run {
            id: r.id.clone(),
            dataset: r.dataset.clone().unwrap_or_else(|| "?".into()),
            lambda: r.lambda.unwrap_or(f64::NAN),
            seed: r.seed.unwrap_or(0),
            status: r.status.clone(),
            error: r.error.clone(),
            loss: r.val_loss,
            ppl: r.val_ppl,
            wmso: r.weight_mso,
            amso: r.act_mso,
            study: r.study.clone(),
            layers: r.layers.clone(),
            from_variant: r.swept.contains_key(CROSS_SECTION_KEY),
            mode: routing_mode(r),
            method: r.method.clone().unwrap_or_else(|| "none".into()),
            balance: r.balance,
            max_violation: r.max_violation,
            dead: r.dead_experts.map(|d| d as f64),
            gap: r.gap_ratio,
        }
    }

    /// Whether the run belongs to the λ study of Tables 1–4: no regulariser but
    /// L_orth in its default form (`orth 0.1`, not `orth 0.1 (rows)`, whose
    /// runs would otherwise be pooled with it under the same λ).
    pub fn in_lambda_study(&self) -> bool {
        self.method == "none" || self.method == format!("orth {}", self.lambda)
    }
}

/// `top-2`, `soft`, `expert-choice`, with ` (T = t)` for a router temperature t ≠ 1.
fn routing_mode(r: &ResultRow) -> String {
    let base = match r.routing {
        Some(Routing::Soft) => "soft".to_string(),
        Some(Routing::ExpertChoice) => "expert-choice".to_string(),
        _ => format!("top-{}", r.top_k.unwrap_or(0)),
    };
    match r.router_temperature {
        Some(t) if t != 1.0 => format!("{base} (T = {t})"),
        _ => base,
    }
}

/// The datasets of `runs`, sorted, each once.
pub(super) fn datasets(runs: &[&Run]) -> Vec<String> {
    let mut d: Vec<String> = runs.iter().map(|r| r.dataset.clone()).collect();
    d.sort();
    d.dedup();
    d
}

/// The runs of one dataset and routing mode: the unit the report never pools
/// across. `label` names the dataset, and the mode too when the runs have
/// several.
pub(super) struct Cell<'a> {
    pub dataset: String,
    pub mode: String,
    pub label: String,
    pub runs: Vec<&'a Run>,
    /// How many datasets and modes the runs hold in all.
    pub n_datasets: usize,
    pub n_modes: usize,
}

/// `runs` split by (dataset, routing mode), sorted; empty cells left out.
pub(super) fn cells<'a>(runs: &[&'a Run]) -> Vec<Cell<'a>> {
    let names = datasets(runs);
    let mut modes: Vec<&str> = runs.iter().map(|r| r.mode.as_str()).collect();
    modes.sort_unstable();
    modes.dedup();
    let mut out = Vec::new();
    for ds in &names {
        for mode in &modes {
            let these: Vec<&Run> = runs
                .iter()
                .copied()
                .filter(|r| &r.dataset == ds && r.mode == *mode)
                .collect();
            if these.is_empty() {
                continue;
            }
            out.push(Cell {
                dataset: ds.clone(),
                mode: mode.to_string(),
                label: if modes.len() > 1 {
                    format!("{ds}, {mode}")
                } else {
                    ds.clone()
                },
                runs: these,
                n_datasets: names.len(),
                n_modes: modes.len(),
            });
        }
    }
    out
}

/// The runs of `method`, by seed.
pub(super) fn of_method<'a>(runs: &[&'a Run], method: &str) -> Vec<&'a Run> {
    let mut g: Vec<&Run> = runs
        .iter()
        .copied()
        .filter(|r| r.method == method)
        .collect();
    g.sort_by_key(|r| r.seed);
    g
}

/// Runs grouped by λ (sorted), each group by seed.
pub(super) fn by_lambda<'a>(runs: &[&'a Run]) -> Vec<(f64, Vec<&'a Run>)> {
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

/// The values of `f` of the two groups (each sorted by seed) paired by seed:
/// only when both hold the same seeds and every run has the value.
pub(super) fn paired_by_seed(
    base: &[&Run],
    treated: &[&Run],
    f: impl Fn(&Run) -> Option<f64>,
) -> Option<(Vec<f64>, Vec<f64>)> {
    let bs: Vec<u64> = base.iter().map(|r| r.seed).collect();
    let ts: Vec<u64> = treated.iter().map(|r| r.seed).collect();
    let bv: Vec<f64> = base.iter().filter_map(|r| f(r)).collect();
    let tv: Vec<f64> = treated.iter().filter_map(|r| f(r)).collect();
    (bs == ts && bv.len() == base.len() && tv.len() == treated.len()).then_some((bv, tv))
}

/// Paired t by seed when both groups have the same seeds, else Welch.
pub(super) fn compare(
    base: &[&Run],
    treated: &[&Run],
    f: impl Fn(&Run) -> Option<f64>,
) -> Option<(stats::TTest, &'static str)> {
    match paired_by_seed(base, treated, &f) {
        Some((bv, tv)) => stats::paired_t(&bv, &tv).map(|t| (t, "paired t")),
        None => stats::welch_t(&vals(base, &f), &vals(treated, &f)).map(|t| (t, "Welch t")),
    }
}

/// The known values of `f` over `runs`.
pub(super) fn vals(runs: &[&Run], f: impl Fn(&Run) -> Option<f64>) -> Vec<f64> {
    runs.iter().filter_map(|r| f(r)).collect()
}

/// Every run with its outcome, linked to its metrics.
pub(super) fn runs_table(all: &[Run]) -> Table {
    let count = |f: &dyn Fn(&Run) -> bool| all.iter().filter(|r| f(r)).count();
    Table {
        title: "Runs".into(),
        header: vec![
            "run", "status", "dataset", "method", "seed", "val PPL", "error",
        ],
        rows: all
            .iter()
            .map(|r| {
                vec![
                    TableCell {
                        text: r.id.clone(),
                        links: vec![("metrics".into(), format!("runs/{}/metrics.jsonl", r.id))],
                    },
                    TableCell::from(r.status.clone()),
                    TableCell::from(r.dataset.clone()),
                    TableCell::from(r.method.clone()),
                    TableCell::from(r.seed.to_string()),
                    TableCell::from(r.ppl.map(num).unwrap_or_default()),
                    TableCell::from(r.error.clone().unwrap_or_default()),
                ]
            })
            .collect(),
        note: format!(
            "{} runs: {} done, {} failed, {} not finished.",
            all.len(),
            count(&|r| r.status == "done"),
            count(&|r| r.status == "failed"),
            count(&|r| r.status != "done" && r.status != "failed"),
        ),
    }
}
