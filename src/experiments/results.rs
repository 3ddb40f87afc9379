//! The results store: one row per run of a sweep, as `results.jsonl` and
//! `results.csv` (both readable with pandas).

use super::sweep::{read_status, recorded_cell_matches, Cell, SweepDir};
use crate::config::Routing;
use crate::fsutil::write_atomic;
use crate::metrics::{read_metrics, EvalRow, MetricRow, TrainRow};
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::path::Path;

/// Columns written first, in this order (then swept keys, then per-layer
/// columns): the fields of [`ResultRow`] but its swept values and layers.
pub const FIXED_COLUMNS: &[&str] = &[
    "id",
    "status",
    "error",
    "dataset",
    "method",
    "lambda",
    "seed",
    "routing",
    "top_k",
    "router_temperature",
    "steps",
    "tokens",
    "val_loss",
    "val_ppl",
    "weight_mso",
    "act_mso",
    "gap_ratio",
    "weight_mso_chance",
    "act_mso_chance",
    "weight_mso_gate",
    "weight_mso_down",
    "weight_mso_router",
    "weight_mso_router_chance",
    "weight_mso_rows",
    "weight_mso_rows_chance",
    "weight_mso_cols",
    "weight_mso_cols_chance",
    "act_mso_hidden",
    "act_mso_hidden_chance",
    "act_mso_hidden_ln",
    "act_mso_hidden_ln_chance",
    "val_loss_start",
    "weight_mso_start",
    "act_mso_start",
    "router_entropy",
    "balance",
    "max_violation",
    "dead_experts",
    "dropped_frac",
    "wall_s",
];

/// One run of a sweep: one line of `results.jsonl`, one row of `results.csv`.
/// Every fixed column is written (`null` / empty where unknown).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ResultRow {
    /// The run's id, also its folder under `runs/`.
    pub id: String,
    /// `done`, `failed`, `running` or `pending` (never started).
    pub status: String,
    /// Why the run failed.
    pub error: Option<String>,

    // From the run's config (None when the config could not be resolved).
    /// `data.path`, or `data.dataset` when no path is set.
    pub dataset: Option<String>,
    /// The regularisers and routing options, see [`method_label`].
    pub method: Option<String>,
    /// `reg.orth_lambda`, the λ of the study.
    pub lambda: Option<f64>,
    pub seed: Option<u64>,
    pub routing: Option<Routing>,
    pub top_k: Option<usize>,
    pub router_temperature: Option<f64>,

    // From summary.json (a finished run).
    pub steps: Option<u64>,
    pub tokens: Option<u64>,
    pub val_loss: Option<f64>,
    pub val_ppl: Option<f64>,

    // From the last eval row of metrics.jsonl: model-level measures.
    /// Weight MSO of `up`, mean over layers.
    pub weight_mso: Option<f64>,
    /// Activation MSO, mean over layers.
    pub act_mso: Option<f64>,
    /// The ratio of the two model means.
    pub gap_ratio: Option<f64>,
    /// Mean over layers.
    pub router_entropy: Option<f64>,
    /// Mean over layers.
    pub balance: Option<f64>,
    /// Max over layers.
    pub max_violation: Option<f64>,
    /// Dead experts, summed over layers.
    pub dead_experts: Option<usize>,

    /// From the last train row (capacity factor runs).
    pub dropped_frac: Option<f64>,
    /// From status.json.
    pub wall_s: Option<f64>,

    /// The first study's other measures (every family, granularity and space,
    /// chance levels, step 0).
    #[serde(flatten)]
    pub study: StudyColumns,

    /// The swept values of this run, dotted config key -> value, one column each.
    #[serde(flatten, with = "swept_columns")]
    pub swept: Map<String, Value>,
    /// Per-layer measures of the last evaluation, columns `weight_mso_l0`, ...
    #[serde(flatten, with = "layer_columns")]
    pub layers: LayerColumns,
}

/// Model-level measures beyond `up`'s flat weight MSO and the output
/// activation MSO, from the last eval row (chance levels: the value of
/// independent random directions), and the step-0 evaluation's when
/// `train.eval_at_start` logged one.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StudyColumns {
    /// 1/P of the flattened W_up.
    pub weight_mso_chance: Option<f64>,
    /// 1/d_model.
    pub act_mso_chance: Option<f64>,
    pub weight_mso_gate: Option<f64>,
    pub weight_mso_down: Option<f64>,
    pub weight_mso_router: Option<f64>,
    pub weight_mso_router_chance: Option<f64>,
    /// W_up at granularity `rows`, and its chance level.
    pub weight_mso_rows: Option<f64>,
    pub weight_mso_rows_chance: Option<f64>,
    /// W_up at granularity `cols`, and its chance level.
    pub weight_mso_cols: Option<f64>,
    pub weight_mso_cols_chance: Option<f64>,
    /// Activation MSO of the hidden activations, and its chance level.
    pub act_mso_hidden: Option<f64>,
    pub act_mso_hidden_chance: Option<f64>,
    /// ... of their LayerNorm.
    pub act_mso_hidden_ln: Option<f64>,
    pub act_mso_hidden_ln_chance: Option<f64>,
    /// The step-0 evaluation: validation loss, weight MSO (up) and activation MSO.
    pub val_loss_start: Option<f64>,
    pub weight_mso_start: Option<f64>,
    pub act_mso_start: Option<f64>,
}

impl StudyColumns {
    fn from_eval(ev: &EvalRow) -> Self {
        let m = &ev.measures;
        let mean = |f: &str| m.weight_mso_mean.get(f).copied().flatten();
        let up_at = |w: &Option<crate::metrics::WeightMeasure>| {
            let w = w.as_ref()?;
            Some((
                w.mean.get("up").copied().flatten(),
                w.chance.get("up").copied(),
            ))
        };
        let (rows, rows_chance) = up_at(&m.weight_mso_rows).unwrap_or_default();
        let (cols, cols_chance) = up_at(&m.weight_mso_cols).unwrap_or_default();
        let c = m.captured.as_ref();
        let space =
            |a: Option<&crate::metrics::ActMeasure>| (a.and_then(|a| a.mean), a.map(|a| a.chance));
        let (hidden, hidden_chance) = space(c.and_then(|c| c.act_mso_hidden.as_ref()));
        let (hidden_ln, hidden_ln_chance) = space(c.and_then(|c| c.act_mso_hidden_ln.as_ref()));
        StudyColumns {
            weight_mso_chance: m.weight_mso_chance.get("up").copied(),
            act_mso_chance: c.and_then(|c| c.act_mso_chance),
            weight_mso_gate: mean("gate"),
            weight_mso_down: mean("down"),
            weight_mso_router: mean("router"),
            weight_mso_router_chance: m.weight_mso_chance.get("router").copied(),
            weight_mso_rows: rows,
            weight_mso_rows_chance: rows_chance,
            weight_mso_cols: cols,
            weight_mso_cols_chance: cols_chance,
            act_mso_hidden: hidden,
            act_mso_hidden_chance: hidden_chance,
            act_mso_hidden_ln: hidden_ln,
            act_mso_hidden_ln_chance: hidden_ln_chance,
            ..Default::default()
        }
    }

    fn set_start(&mut self, ev: &EvalRow) {
        self.val_loss_start = Some(ev.val_loss).filter(|v| v.is_finite());
        self.weight_mso_start = ev.measures.weight_mso_mean.get("up").copied().flatten();
        self.act_mso_start = ev.measures.captured.as_ref().and_then(|c| c.act_mso_mean);
    }
}

/// Per MoE layer, from the last eval row (columns `<name>_l<layer>`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LayerColumns {
    /// Weight MSO of `up` (`weight_mso_l*`).
    pub weight_mso: Vec<Option<f64>>,
    /// Activation MSO (`act_mso_l*`).
    pub act_mso: Vec<Option<f64>>,
    /// Gap ratio (`gap_ratio_l*`).
    pub gap_ratio: Vec<Option<f64>>,
}

impl LayerColumns {
    const NAMES: [&'static str; 3] = ["weight_mso", "act_mso", "gap_ratio"];

    fn column(&self, name: &str) -> &Vec<Option<f64>> {
        match name {
            "weight_mso" => &self.weight_mso,
            "act_mso" => &self.act_mso,
            _ => &self.gap_ratio,
        }
    }

    fn column_mut(&mut self, name: &str) -> &mut Vec<Option<f64>> {
        match name {
            "weight_mso" => &mut self.weight_mso,
            "act_mso" => &mut self.act_mso,
            _ => &mut self.gap_ratio,
        }
    }

    /// (column name, layer) of a per-layer column key such as `act_mso_l3`.
    fn parse_key(key: &str) -> Option<(&'static str, usize)> {
        let (name, layer) = key.rsplit_once("_l")?;
        let name = Self::NAMES.into_iter().find(|n| *n == name)?;
        Some((name, layer.parse().ok()?))
    }
}

/// `ResultRow::layers` as flattened columns: `<name>_l<layer>` -> value.
mod layer_columns {
    use super::LayerColumns;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};
    use serde_json::Map;

    pub fn serialize<S: Serializer>(l: &LayerColumns, s: S) -> Result<S::Ok, S::Error> {
        let mut m = Map::new();
        for name in LayerColumns::NAMES {
            for (i, v) in l.column(name).iter().enumerate() {
                m.insert(format!("{name}_l{i}"), serde_json::json!(v));
            }
        }
        m.serialize(s)
    }

    /// Picks the per-layer keys out of the row's keys not otherwise named.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<LayerColumns, D::Error> {
        let mut l = LayerColumns::default();
        for (k, v) in Map::deserialize(d)? {
            if let Some((name, i)) = LayerColumns::parse_key(&k) {
                let col = l.column_mut(name);
                if col.len() <= i {
                    col.resize(i + 1, None);
                }
                col[i] = v.as_f64();
            }
        }
        Ok(l)
    }
}

/// `ResultRow::swept` as flattened columns: the row's keys that are neither
/// fixed nor per-layer.
mod swept_columns {
    use super::LayerColumns;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};
    use serde_json::{Map, Value};

    pub fn serialize<S: Serializer>(m: &Map<String, Value>, s: S) -> Result<S::Ok, S::Error> {
        m.serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Map<String, Value>, D::Error> {
        let mut m = Map::deserialize(d)?;
        m.retain(|k, _| LayerColumns::parse_key(k).is_none());
        Ok(m)
    }
}

/// A short label of the regularisers and routing options of a run, e.g.
/// `none`, `orth 0.01`, `act 0.1 + aux 0.01`, `loss-free 0.001`,
/// `expert-choice`, `capacity 1.25`, `smoe-dropout 1→2`.
pub fn method_label(cfg: &crate::config::Config) -> String {
    let r = &cfg.reg;
    let mut parts = Vec::new();
    let fam = |f: &str| {
        if f == "up" {
            String::new()
        } else {
            format!(" ({f})")
        }
    };
    let orth_form = {
        let mut f = Vec::new();
        if r.orth_family.name() != "up" {
            f.push(r.orth_family.name());
        }
        if r.orth_granularity != crate::config::Granularity::Flat {
            f.push(r.orth_granularity.name());
        }
        if r.orth_variant != crate::config::OrthVariant::Normalized {
            f.push(r.orth_variant.name());
        }
        if f.is_empty() {
            String::new()
        } else {
            format!(" ({})", f.join(", "))
        }
    };
    for (name, v, extra) in [
        ("orth", r.orth_lambda, orth_form),
        ("act", r.act_lambda, String::new()),
        ("grad", r.grad_lambda, fam(r.grad_family.name())),
        ("contrastive", r.contrastive_lambda, String::new()),
        ("entropy", r.entropy_lambda, String::new()),
        ("token-entropy", r.token_entropy_lambda, String::new()),
        ("aux", r.aux_lambda, String::new()),
        ("z", r.z_lambda, String::new()),
        ("loss-free", r.loss_free_gamma, String::new()),
    ] {
        if v != 0.0 {
            parts.push(format!("{name} {v}{extra}"));
        }
    }
    let m = &cfg.model;
    if m.routing == crate::config::Routing::ExpertChoice {
        parts.push("expert-choice".into());
    } else if m.capacity_factor > 0.0 {
        parts.push(format!("capacity {}", m.capacity_factor));
    }
    if cfg.train.topk_start > 0 || m.router_frozen {
        parts.push(if m.router_frozen && cfg.train.topk_start > 0 {
            format!("smoe-dropout {}→{}", cfg.train.topk_start, m.top_k)
        } else if m.router_frozen {
            "frozen router".into()
        } else {
            format!("top-k {}→{}", cfg.train.topk_start, m.top_k)
        });
    }
    if cfg.train.weight_decay_experts != -1.0 {
        parts.push(format!("expert decay {}", cfg.train.weight_decay_experts));
    }
    if parts.is_empty() {
        "none".into()
    } else {
        parts.join(" + ")
    }
}

/// The rows of a run's metrics.jsonl a results row reads.
#[derive(Default)]
struct RunRows {
    last_train: Option<TrainRow>,
    last_eval: Option<EvalRow>,
    /// The evaluation at step 0 (`train.eval_at_start`).
    start_eval: Option<EvalRow>,
}

/// The last train row, the last eval row and any step-0 eval row of a
/// run's metrics.jsonl (none before the run has written any).
fn run_rows(run: &Path) -> Result<RunRows> {
    let path = run.join("metrics.jsonl");
    let mut rows = RunRows::default();
    if !path.is_file() {
        return Ok(rows);
    }
    for row in read_metrics(&path)? {
        match row {
            MetricRow::Train(t) => rows.last_train = Some(t),
            MetricRow::Eval(e) => {
                if e.step == 0 && rows.start_eval.is_none() {
                    rows.start_eval = Some(e.clone());
                }
                rows.last_eval = Some(e);
            }
            MetricRow::Start(_) => {}
        }
    }
    Ok(rows)
}

/// The fields of a run's summary.json that go into its result row.
#[derive(Deserialize)]
struct SummaryColumns {
    steps: u64,
    tokens: u64,
    val_loss: Option<f64>,
    val_ppl: Option<f64>,
}

/// Mean of the finite values (non-finite ones were logged as null); None for none.
fn finite_mean(xs: &[f64]) -> Option<f64> {
    let v: Vec<f64> = xs.iter().copied().filter(|x| x.is_finite()).collect();
    (!v.is_empty()).then(|| super::stats::mean(&v))
}

impl ResultRow {
    /// The config's columns (dataset, method, λ, seed, routing).
    fn set_config(&mut self, cfg: &crate::config::Config) {
        let ds = if cfg.data.path.is_empty() {
            &cfg.data.dataset
        } else {
            &cfg.data.path
        };
        self.dataset = Some(ds.clone());
        self.method = Some(method_label(cfg));
        self.lambda = Some(cfg.reg.orth_lambda);
        self.seed = Some(cfg.train.seed);
        self.routing = Some(cfg.model.routing);
        self.top_k = Some(cfg.model.top_k);
        self.router_temperature = Some(cfg.model.router_temperature);
    }

    /// The measures of the run's last evaluation.
    fn set_eval(&mut self, ev: &EvalRow) {
        let m = &ev.measures;
        self.weight_mso = m.weight_mso_mean.get("up").copied().flatten();
        self.layers.weight_mso = m.weight_mso.get("up").cloned().unwrap_or_default();
        if let Some(c) = &m.captured {
            self.act_mso = c.act_mso_mean;
            self.gap_ratio = c.gap_ratio_model;
            self.router_entropy = finite_mean(&c.router_entropy);
            self.balance = finite_mean(&c.balance);
            self.max_violation = Some(c.max_violation.iter().copied().fold(0.0, f64::max));
            self.dead_experts = Some(c.dead_experts.iter().map(Vec::len).sum());
            self.layers.act_mso = c.act_mso.clone();
            self.layers.gap_ratio = c.gap_ratio.clone();
        }
    }

    /// The row as JSON: fixed columns, swept keys and per-layer columns.
    pub fn to_json(&self) -> Map<String, Value> {
        match serde_json::to_value(self).expect("a result row is plain JSON") {
            Value::Object(m) => m,
            _ => unreachable!("a struct serialises to an object"),
        }
    }
}

/// One row per cell: swept values, outcome, final metrics and measures.
pub fn collect(dir: &SweepDir, cells: &[Cell]) -> Result<Vec<ResultRow>> {
    cells.iter().map(|c| collect_one(dir, c)).collect()
}

fn collect_one(dir: &SweepDir, cell: &Cell) -> Result<ResultRow> {
    let run = dir.run(&cell.id);
    if let Err(e) = recorded_cell_matches(dir, cell) {
        return Ok(foreign_run_row(cell, e));
    }
    let status = read_status(dir, &cell.id);
    let mut r = ResultRow {
        id: cell.id.clone(),
        status: status
            .as_ref()
            .map_or_else(|| "pending".into(), |s| s.status.clone()),
        error: status.as_ref().and_then(|s| s.error.clone()),
        wall_s: status.as_ref().map(|s| s.wall_s),
        swept: cell.values.clone(),
        ..ResultRow::default()
    };
    if let Ok(cfg) = &cell.config {
        r.set_config(cfg);
    }
    let summary_path = run.join("summary.json");
    if let Ok(text) = std::fs::read_to_string(&summary_path) {
        let s: SummaryColumns = serde_json::from_str(&text)
            .map_err(|e| Error::bad_file(&summary_path, e.to_string()))?;
        r.steps = Some(s.steps);
        r.tokens = Some(s.tokens);
        r.val_loss = s.val_loss;
        r.val_ppl = s.val_ppl;
    }
    let rows = run_rows(&run)?;
    r.dropped_frac = rows.last_train.and_then(|t| t.dropped_frac);
    if let Some(ev) = &rows.last_eval {
        r.set_eval(ev);
        r.study = StudyColumns::from_eval(ev);
    }
    if let Some(ev) = &rows.start_eval {
        r.study.set_start(ev);
    }
    Ok(r)
}

/// The row of a cell whose folder holds another cell's run: the error, and
/// none of that run's numbers.
fn foreign_run_row(cell: &Cell, e: Error) -> ResultRow {
    let mut r = ResultRow {
        id: cell.id.clone(),
        status: "failed".into(),
        error: Some(e.to_string()),
        swept: cell.values.clone(),
        ..ResultRow::default()
    };
    if let Ok(cfg) = &cell.config {
        r.set_config(cfg);
    }
    r
}

/// Column order: fixed columns, swept keys, then the rest sorted.
pub fn columns(rows: &[Map<String, Value>], swept: &[String]) -> Vec<String> {
    let mut cols: Vec<String> = FIXED_COLUMNS.iter().map(|s| s.to_string()).collect();
    for k in swept {
        if !cols.contains(k) {
            cols.push(k.clone());
        }
    }
    let mut rest: Vec<String> = rows
        .iter()
        .flat_map(|r| r.keys().cloned())
        .filter(|k| !cols.contains(k))
        .collect();
    rest.sort_by_key(|a| natural_key(a));
    rest.dedup();
    cols.extend(rest);
    cols
}

fn natural_key(s: &str) -> (String, usize) {
    let digits: String = s
        .chars()
        .rev()
        .take_while(char::is_ascii_digit)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    (
        s[..s.len() - digits.len()].to_string(),
        digits.parse().unwrap_or(0),
    )
}

/// Write `results.jsonl` and `results.csv` into the sweep folder.
pub fn write(dir: &SweepDir, rows: &[ResultRow], swept: &[String]) -> Result<()> {
    let maps: Vec<Map<String, Value>> = rows.iter().map(ResultRow::to_json).collect();
    let mut jl = Vec::new();
    for m in &maps {
        serde_json::to_writer(&mut jl, m).expect("json");
        jl.push(b'\n');
    }
    write_atomic(&dir.0.join("results.jsonl"), &jl)?;
    let cols = columns(&maps, swept);
    let mut w = csv::Writer::from_writer(Vec::new());
    w.write_record(&cols)
        .map_err(|e| Error::Other(format!("cannot write results.csv: {e}")))?;
    for m in &maps {
        let rec: Vec<String> = cols
            .iter()
            .map(|c| match m.get(c) {
                None | Some(Value::Null) => String::new(),
                Some(Value::String(s)) => s.clone(),
                Some(v) => v.to_string(),
            })
            .collect();
        w.write_record(&rec)
            .map_err(|e| Error::Other(format!("cannot write results.csv: {e}")))?;
    }
    let bytes = w
        .into_inner()
        .map_err(|e| Error::Other(format!("cannot write results.csv: {e}")))?;
    write_atomic(&dir.0.join("results.csv"), &bytes)
}

/// Read `results.jsonl` back.
pub fn read(dir: &SweepDir) -> Result<Vec<ResultRow>> {
    let p = dir.0.join("results.jsonl");
    let text = std::fs::read_to_string(&p).map_err(|e| Error::io(&p, e))?;
    text.lines()
        .enumerate()
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|e| Error::bad_file(&p, format!("line {}: {e}", i + 1)))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn study_columns_read_every_family_granularity_space_and_step_zero() {
        let line = |step: u64, up: f64| {
            format!(
                r#"{{"kind":"eval","step":{step},"tokens":0,"val_loss":5.0,"val_ppl":148.4,"eval_tokens":10,"eval_s":1.0,
                "weight_mso":{{"up":[{up}],"down":[0.2],"router":[0.3]}},"weight_mso_mean":{{"up":{up},"down":0.2,"router":0.3}},
                "weight_mso_chance":{{"up":0.001,"router":0.01}},
                "weight_mso_rows":{{"per_layer":{{"up":[0.4]}},"mean":{{"up":0.4}},"chance":{{"up":0.03}}}},
                "weight_mso_cols":{{"per_layer":{{"up":[0.5]}},"mean":{{"up":0.5}},"chance":{{"up":0.02}}}},
                "measure_tokens":8,"act_mso":[0.6],"act_mso_mean":0.6,"act_mso_chance":0.05,
                "act_mso_hidden":{{"per_layer":[0.7],"mean":0.7,"chance":0.02}},
                "gap_ratio":[1.0],"gap_ratio_model":1.0,"router_entropy":[1.0],"load_entropy":[1.0],
                "balance":[1.0],"max_violation":[0.0],"dead_experts":[[]],"load":[[4,4]]}}"#
            )
            .replace('\n', "")
        };
        let parse = |l: String| match MetricRow::from_line(&l).unwrap() {
            MetricRow::Eval(e) => e,
            _ => panic!("an eval row"),
        };
        let mut c = StudyColumns::from_eval(&parse(line(600, 0.1)));
        c.set_start(&parse(line(0, 0.9)));
        assert_eq!(
            (c.weight_mso_down, c.weight_mso_router, c.weight_mso_gate),
            (Some(0.2), Some(0.3), None)
        );
        assert_eq!(
            (c.weight_mso_rows, c.weight_mso_rows_chance),
            (Some(0.4), Some(0.03))
        );
        assert_eq!(
            (c.weight_mso_cols, c.weight_mso_cols_chance),
            (Some(0.5), Some(0.02))
        );
        assert_eq!(
            (c.weight_mso_chance, c.act_mso_chance),
            (Some(0.001), Some(0.05))
        );
        assert_eq!((c.act_mso_hidden, c.act_mso_hidden_ln), (Some(0.7), None));
        assert_eq!(
            (c.weight_mso_start, c.val_loss_start),
            (Some(0.9), Some(5.0))
        );
    }

    /// A sweep folder with one finished run whose files are in today's formats.
    fn finished_run(dir: &Path) -> (SweepDir, Cell) {
        let sweep = SweepDir(dir.to_path_buf());
        let run = sweep.run("lam0.1-s3");
        std::fs::create_dir_all(&run).unwrap();
        std::fs::write(
            sweep.status("lam0.1-s3"),
            r#"{"status":"done","error":null,"wall_s":12.5,"pid":null}"#,
        )
        .unwrap();
        std::fs::write(
            run.join("summary.json"),
            r#"{"run_dir":"x","steps":40,"tokens":5120,"val_loss":4.5,"val_ppl":90.0,"val_tokens":512,"unigram_entropy":3.9,"params_total":1,"params_active":1,"wall_s":12.0}"#,
        )
        .unwrap();
        let metrics = [
            r#"{"kind":"start","params_active":8,"params_total":9,"source":"s","step":0,"tokenizer":"bytes","train_tokens":10,"unigram_entropy":3.9,"valid_tokens":5,"vocab_size":320}"#,
            r#"{"dropped_frac":0.25,"elapsed_s":1.0,"grad_norm":1.0,"kind":"train","lm_loss":5.0,"loss":5.0,"lr":0.001,"orth_lambda":0.1,"orth_loss":null,"step":40,"tokens":5120,"tokens_per_s":100.0}"#,
            r#"{"act_mso":[null,0.5],"act_mso_mean":0.5,"balance":[0.5,1.0],"dead_experts":[[1,2],[3]],"eval_s":0.5,"eval_tokens":512,"gap_ratio":[null,4.0],"gap_ratio_model":5.0,"kind":"eval","load":[[1,0,0,3],[1,1,1,0]],"load_entropy":[1.0,1.0],"max_violation":[2.0,null],"measure_tokens":4,"router_entropy":[1.0,null],"step":40,"tokens":5120,"val_loss":4.5,"val_ppl":90.0,"weight_mso":{"up":[0.125,0.1]},"weight_mso_mean":{"up":0.1125}}"#,
        ];
        // The last line torn by a kill, as a running sweep can leave it.
        std::fs::write(
            run.join("metrics.jsonl"),
            format!("{}\n{{\"kind\":\"tra", metrics.join("\n")),
        )
        .unwrap();
        let cell = Cell {
            index: 0,
            id: "lam0.1-s3".into(),
            values: json!({"reg.orth_lambda": 0.1}).as_object().unwrap().clone(),
            config: Err("not resolved in this test".into()),
        };
        (sweep, cell)
    }

    #[test]
    fn collect_reads_status_summary_and_typed_metrics() {
        let d = tempfile::tempdir().unwrap();
        let (sweep, cell) = finished_run(d.path());
        let pending = Cell {
            index: 1,
            id: "never-started".into(),
            ..cell.clone()
        };
        let rows = collect(&sweep, &[cell, pending]).unwrap();
        let r = &rows[0];
        assert_eq!((r.status.as_str(), r.wall_s), ("done", Some(12.5)));
        assert_eq!(
            (r.steps, r.tokens, r.val_ppl),
            (Some(40), Some(5120), Some(90.0))
        );
        assert_eq!(
            (r.weight_mso, r.act_mso, r.gap_ratio),
            (Some(0.1125), Some(0.5), Some(5.0))
        );
        // Nulls (non-finite values) are left out of means and maxima.
        assert_eq!((r.router_entropy, r.balance), (Some(1.0), Some(0.75)));
        assert_eq!((r.max_violation, r.dead_experts), (Some(2.0), Some(3)));
        assert_eq!(r.dropped_frac, Some(0.25));
        assert_eq!(r.layers.weight_mso, vec![Some(0.125), Some(0.1)]);
        assert_eq!(r.layers.act_mso, vec![None, Some(0.5)]);
        assert_eq!(r.swept["reg.orth_lambda"], json!(0.1));
        assert_eq!(r.dataset, None, "the config did not resolve");
        let p = &rows[1];
        assert_eq!(
            (p.status.as_str(), p.steps, p.weight_mso),
            ("pending", None, None)
        );
    }

    #[test]
    fn a_folder_recording_another_cell_gives_an_error_row_not_its_numbers() {
        let d = tempfile::tempdir().unwrap();
        let (sweep, cell) = finished_run(d.path());
        let record = sweep.run(&cell.id).join("cell.toml");
        std::fs::write(
            &record,
            "index = 0\nid = \"lam0.1-s3\"\n[values]\n\"reg.orth_lambda\" = 0.10\n",
        )
        .unwrap();
        let row = collect(&sweep, std::slice::from_ref(&cell))
            .unwrap()
            .remove(0);
        assert_eq!(
            (row.status.as_str(), row.val_ppl),
            ("done", Some(90.0)),
            "0.10 is 0.1"
        );
        std::fs::write(
            &record,
            "index = 1\nid = \"lam0.1-s3\"\n[values]\n\"reg.orth_lambda\" = 0.2\n",
        )
        .unwrap();
        let row = collect(&sweep, std::slice::from_ref(&cell))
            .unwrap()
            .remove(0);
        assert_eq!(
            (row.status.as_str(), row.val_ppl, row.steps),
            ("failed", None, None)
        );
        assert!(
            row.error.as_deref().unwrap().contains("cell.toml"),
            "{:?}",
            row.error
        );
        // A folder of an earlier version recorded the resolved config.
        std::fs::write(&record, "[reg]\north_lambda = 0.2\n[train]\nseed = 3\n").unwrap();
        let row = collect(&sweep, std::slice::from_ref(&cell))
            .unwrap()
            .remove(0);
        assert_eq!(row.status, "failed");
        std::fs::write(&record, "[reg]\north_lambda = 0.1\n").unwrap();
        let row = collect(&sweep, &[cell]).unwrap().remove(0);
        assert_eq!(row.status, "done");
    }

    #[test]
    fn a_metrics_line_that_does_not_parse_names_the_file_and_line() {
        let d = tempfile::tempdir().unwrap();
        let (sweep, cell) = finished_run(d.path());
        let path = sweep.run(&cell.id).join("metrics.jsonl");
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(
            &path,
            text.replacen("\"lm_loss\":5.0", "\"lm_loss\":\"x\"", 1),
        )
        .unwrap();
        let e = collect(&sweep, &[cell]).unwrap_err().to_string();
        assert!(e.contains("metrics.jsonl") && e.contains("line 2"), "{e}");
    }

    #[test]
    fn rows_write_as_csv_and_jsonl_and_read_back() {
        let d = tempfile::tempdir().unwrap();
        let (sweep, cell) = finished_run(d.path());
        let rows = collect(&sweep, &[cell]).unwrap();
        write(&sweep, &rows, &["reg.orth_lambda".to_string()]).unwrap();
        assert_eq!(read(&sweep).unwrap(), rows);

        let jl = std::fs::read_to_string(d.path().join("results.jsonl")).unwrap();
        let v: Value = serde_json::from_str(jl.lines().next().unwrap()).unwrap();
        assert_eq!(v["reg.orth_lambda"], json!(0.1));
        assert_eq!(
            (v["act_mso_l0"].clone(), v["act_mso_l1"].clone()),
            (Value::Null, json!(0.5))
        );
        assert_eq!(v["gap_ratio_l1"], json!(4.0));

        let csv = std::fs::read_to_string(d.path().join("results.csv")).unwrap();
        let header: Vec<&str> = csv.lines().next().unwrap().split(',').collect();
        assert_eq!(&header[..FIXED_COLUMNS.len()], FIXED_COLUMNS);
        assert_eq!(
            &header[FIXED_COLUMNS.len()..],
            [
                "reg.orth_lambda",
                "act_mso_l0",
                "act_mso_l1",
                "gap_ratio_l0",
                "gap_ratio_l1",
                "weight_mso_l0",
                "weight_mso_l1"
            ]
        );
    }

    #[test]
    fn fixed_columns_are_the_row_fields() {
        let mut keys: Vec<String> = ResultRow::default().to_json().keys().cloned().collect();
        let mut fixed: Vec<String> = FIXED_COLUMNS.iter().map(|s| s.to_string()).collect();
        keys.sort();
        fixed.sort();
        assert_eq!(keys, fixed);
    }
}
