//! The rows of a run's `metrics.jsonl` as types: what the trainer writes and
//! what the results store and the report read back (FORMAT.md "metrics.jsonl").
//!
//! One JSON object per line, tagged by `kind`: a [`StartRow`] once, a
//! [`TrainRow`] every `train.log_every` steps, an [`EvalRow`] at every
//! evaluation. [`MetricRow::to_line`] writes a row exactly as the trainer
//! always has (keys sorted, non-finite numbers as `null`), so run folders
//! written before these types existed read back unchanged.
//!
//! A leaf module: it depends on serde and the crate's error type only.

use crate::{Error, Result};
use serde::{Deserialize, Deserializer, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
#[allow(clippy::large_enum_variant)] // rows are read and written one at a time
pub enum MetricRow {
    Start(StartRow),
    Train(TrainRow),
    Eval(EvalRow),
}

/// Written once, before the first step: the model's size and the data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StartRow {
    /// Always 0.
    pub step: u64,
    pub params_total: u64,
    /// Parameters a token passes through (top-k of the experts).
    pub params_active: u64,
    /// Unigram entropy of the training tokens, nats.
    #[serde(deserialize_with = "nan_if_null")]
    pub unigram_entropy: f64,
    /// Tokens of the training split used (after `data.max_train_tokens`).
    pub train_tokens: u64,
    /// `data.max_train_tokens` when it capped the split.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_train_tokens: Option<u64>,
    pub valid_tokens: u64,
    /// The tokeniser's id (`bytes`, `gpt2`, a tokenizer.json hash, ...).
    pub tokenizer: String,
    pub vocab_size: u64,
    /// Where the data came from, in words.
    pub source: String,
}

/// A training step's losses and speed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainRow {
    /// Steps done (the row is written after step `step`).
    pub step: u64,
    /// Training tokens seen so far.
    pub tokens: u64,
    /// `lm_loss` + `orth_lambda` · `orth_loss` + Σ λ · each regulariser term.
    #[serde(deserialize_with = "nan_if_null")]
    pub loss: f64,
    /// Next-token cross-entropy, mean over the step's micro-batches (nats).
    #[serde(deserialize_with = "nan_if_null")]
    pub lm_loss: f64,
    /// L_orth of `reg.orth_family`, unscaled; logged even when λ = 0. None
    /// (`null`) when the family does not exist in the model.
    pub orth_loss: Option<f64>,
    #[serde(deserialize_with = "nan_if_null")]
    pub orth_lambda: f64,
    #[serde(deserialize_with = "nan_if_null")]
    pub lr: f64,
    /// Global gradient norm before clipping.
    #[serde(deserialize_with = "nan_if_null")]
    pub grad_norm: f64,
    /// Training tokens per second since the previous train row.
    #[serde(deserialize_with = "nan_if_null")]
    pub tokens_per_s: f64,
    /// Training time of the run so far, across resumes.
    #[serde(deserialize_with = "nan_if_null")]
    pub elapsed_s: f64,
    /// Gradient-space orthogonality P before the step (mean over layers), when on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grad_loss: Option<f64>,
    /// Fraction of routed assignments dropped by the capacity factor, when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dropped_frac: Option<f64>,
    /// Experts per token at this step, with progressive top-k.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_k: Option<u64>,
    /// Per MoE layer, max load / mean load − 1 over the step's tokens (with
    /// the aux loss or loss-free balancing).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub train_max_violation: Option<Vec<f64>>,
    /// The regulariser terms that are on, unscaled, keyed by the names of
    /// `train::reg::batch_terms` (`act_loss`, `aux_loss`, `z_loss`, ...).
    /// Any key not named above lands here.
    #[serde(flatten)]
    pub reg_terms: BTreeMap<String, f64>,
}

/// An evaluation: validation loss and the measures.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalRow {
    pub step: u64,
    /// Training tokens seen so far.
    pub tokens: u64,
    /// Mean next-token cross-entropy over the validation tokens (nats).
    #[serde(deserialize_with = "nan_if_null")]
    pub val_loss: f64,
    /// exp(val_loss).
    #[serde(deserialize_with = "nan_if_null")]
    pub val_ppl: f64,
    /// Target tokens evaluated, each counted once.
    pub eval_tokens: u64,
    #[serde(deserialize_with = "nan_if_null")]
    pub eval_s: f64,
    #[serde(flatten)]
    pub measures: EvalMeasures,
}

/// The measures of an evaluation row. Lists are indexed by MoE layer.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct EvalMeasures {
    /// Family name (`up`, `gate`, `down`, `router`) -> weight MSO per layer
    /// (None for a layer lacking the family). Families present in no layer are left out.
    pub weight_mso: BTreeMap<String, Vec<Option<f64>>>,
    /// Family name -> mean of the present layers' weight MSO.
    pub weight_mso_mean: BTreeMap<String, Option<f64>>,
    /// Family name -> the weight MSO of random directions of its dimension (1/L).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub weight_mso_chance: BTreeMap<String, f64>,
    /// The same at granularity `rows` (`measure.granularity`), when logged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight_mso_rows: Option<WeightMeasure>,
    /// The same at granularity `cols`, when logged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight_mso_cols: Option<WeightMeasure>,
    /// The measures of the captured evaluation windows; None (the keys are
    /// absent) when `measure.tokens` is 0.
    #[serde(flatten)]
    pub captured: Option<CapturedMeasures>,
}

/// Weight MSO of every family at one granularity.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct WeightMeasure {
    /// Family name -> per layer (None where the layer lacks the family).
    pub per_layer: BTreeMap<String, Vec<Option<f64>>>,
    /// Family name -> mean of the present layers.
    pub mean: BTreeMap<String, Option<f64>>,
    /// Family name -> chance level 1/L.
    pub chance: BTreeMap<String, f64>,
}

/// Activation MSO in one space (`measure.act_space`).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct ActMeasure {
    /// Per MoE layer (None where no pair was co-routed).
    pub per_layer: Vec<Option<f64>>,
    /// Mean of the present layers.
    pub mean: Option<f64>,
    /// The level of independent random directions of the space's dimension.
    pub chance: f64,
}

/// Activation overlap and routing telemetry on the captured evaluation windows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CapturedMeasures {
    /// Tokens the measures were taken on.
    pub measure_tokens: u64,
    /// Activation MSO per layer (None where no pair of experts was co-routed, e.g. k = 1).
    pub act_mso: Vec<Option<f64>>,
    /// Why the activation MSO is null, when it is null in every layer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub act_mso_null_reason: Option<String>,
    /// Mean of the present layers' activation MSO.
    pub act_mso_mean: Option<f64>,
    /// 1/d_model: the activation MSO of random output directions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub act_mso_chance: Option<f64>,
    /// Activation MSO of the hidden activations φ(W_up x + b), when logged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub act_mso_hidden: Option<ActMeasure>,
    /// Activation MSO of LayerNorm of the hidden activations, when logged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub act_mso_hidden_ln: Option<ActMeasure>,
    /// Activation MSO / weight MSO (up) per layer.
    pub gap_ratio: Vec<Option<f64>>,
    /// The ratio of the model means act_mso_mean / weight_mso_mean.up.
    pub gap_ratio_model: Option<f64>,
    /// Mean router entropy per layer (nats).
    #[serde(deserialize_with = "nan_if_null_each")]
    pub router_entropy: Vec<f64>,
    /// Entropy of the expert load per layer (nats).
    #[serde(deserialize_with = "nan_if_null_each")]
    pub load_entropy: Vec<f64>,
    /// exp(load_entropy) / E per layer.
    #[serde(deserialize_with = "nan_if_null_each")]
    pub balance: Vec<f64>,
    /// max load / mean load − 1 per layer.
    #[serde(deserialize_with = "nan_if_null_each")]
    pub max_violation: Vec<f64>,
    /// Indices of the experts that got no token, per layer.
    pub dead_experts: Vec<Vec<usize>>,
    /// Tokens routed to each expert, per layer.
    pub load: Vec<Vec<u64>>,
}

impl MetricRow {
    /// The step the row was written at.
    pub fn step(&self) -> u64 {
        match self {
            MetricRow::Start(r) => r.step,
            MetricRow::Train(r) => r.step,
            MetricRow::Eval(r) => r.step,
        }
    }

    /// The row as one line of `metrics.jsonl`, newline included. Keys come
    /// out sorted and non-finite numbers as `null`, as the trainer has always
    /// written them.
    pub fn to_line(&self) -> String {
        // Through a `Value`, whose map sorts its keys.
        let value = serde_json::to_value(self).expect("a metrics row is plain JSON");
        let mut line = value.to_string();
        line.push('\n');
        line
    }

    /// Parse one line of `metrics.jsonl`.
    pub fn from_line(line: &str) -> std::result::Result<MetricRow, serde_json::Error> {
        let row: MetricRow = serde_json::from_str(line)?;
        // A flattened `Option` reads as None when its fields do not parse;
        // tell a malformed measure block from an absent one.
        if let MetricRow::Eval(e) = &row {
            if e.measures.captured.is_none() && line.contains("\"measure_tokens\"") {
                serde_json::from_str::<CapturedMeasures>(line)?;
            }
        }
        Ok(row)
    }
}

/// Every row of a `metrics.jsonl`. A last line without its newline that does
/// not parse is a write cut short by a kill and is skipped (a resumed run
/// drops it too); any other line that does not parse is an error naming the
/// file and the line.
pub fn read_metrics(path: &Path) -> Result<Vec<MetricRow>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    parse_metrics(&text).map_err(|(line, e)| Error::bad_file(path, format!("line {line}: {e}")))
}

/// [`read_metrics`] on text; the error is (1-based line, why).
pub fn parse_metrics(
    text: &str,
) -> std::result::Result<Vec<MetricRow>, (usize, serde_json::Error)> {
    let torn_tail = !text.is_empty() && !text.ends_with('\n');
    let n_lines = text.lines().count();
    let mut rows = Vec::with_capacity(n_lines);
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match MetricRow::from_line(line) {
            Ok(row) => rows.push(row),
            Err(_) if torn_tail && i + 1 == n_lines => {}
            Err(e) => return Err((i + 1, e)),
        }
    }
    Ok(rows)
}

/// `null` (how a non-finite number is written) reads back as NaN.
fn nan_if_null<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

/// [`nan_if_null`] for each element of a list.
fn nan_if_null_each<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Vec<f64>, D::Error> {
    let v = Vec::<Option<f64>>::deserialize(d)?;
    Ok(v.into_iter().map(|x| x.unwrap_or(f64::NAN)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    // Lines exactly as the trainer wrote them before these types (serde_json's
    // `json!`: keys sorted), including nulls and every optional key.
    const START: &str = r#"{"kind":"start","params_active":81312,"params_total":139680,"source":"built-in synthetic corpus (60000 bytes)","step":0,"tokenizer":"bytes","train_tokens":54000,"unigram_entropy":3.912345678,"valid_tokens":6000,"vocab_size":320}"#;
    const TRAIN_PLAIN: &str = r#"{"elapsed_s":1.25,"grad_norm":0.8125,"kind":"train","lm_loss":5.5,"loss":5.5,"lr":0.0006,"orth_lambda":0.0,"orth_loss":null,"step":10,"tokens":1280,"tokens_per_s":1024.0}"#;
    const TRAIN_ALL: &str = r#"{"act_loss":0.25,"aux_loss":1.0625,"dropped_frac":0.125,"elapsed_s":3.5,"grad_loss":0.015625,"grad_norm":1.5,"kind":"train","lm_loss":4.75,"loss":4.8125,"lr":0.0003,"orth_lambda":0.01,"orth_loss":0.5,"step":20,"tokens":2560,"tokens_per_s":900.5,"top_k":2,"train_max_violation":[0.5,0.25],"z_loss":2.0}"#;
    const EVAL_FULL: &str = r#"{"act_mso":[null,0.125],"act_mso_mean":0.125,"balance":[0.875,0.9375],"dead_experts":[[3],[]],"eval_s":0.5,"eval_tokens":512,"gap_ratio":[null,2.5],"gap_ratio_model":2.0,"kind":"eval","load":[[10,20,34,0],[16,16,16,16]],"load_entropy":[1.0,1.3862943611198906],"max_violation":[1.125,0.0],"measure_tokens":64,"router_entropy":[1.25,null],"step":40,"tokens":5120,"val_loss":4.5,"val_ppl":90.01713130052181,"weight_mso":{"down":[0.0625,0.05],"up":[0.0625,0.05]},"weight_mso_mean":{"down":0.05625,"up":0.05625}}"#;
    const EVAL_K1: &str = r#"{"act_mso":[null,null],"act_mso_mean":null,"act_mso_null_reason":"top-1 routing: no pair of experts is ever co-routed","balance":[1.0,1.0],"dead_experts":[[],[]],"eval_s":0.5,"eval_tokens":512,"gap_ratio":[null,null],"gap_ratio_model":null,"kind":"eval","load":[[1,1],[1,1]],"load_entropy":[0.5,0.5],"max_violation":[0.0,0.0],"measure_tokens":2,"router_entropy":[0.5,0.5],"step":40,"tokens":5120,"val_loss":4.5,"val_ppl":null,"weight_mso":{},"weight_mso_mean":{}}"#;
    const EVAL_NO_CAPTURE: &str = r#"{"eval_s":0.5,"eval_tokens":512,"kind":"eval","step":40,"tokens":5120,"val_loss":4.5,"val_ppl":90.0,"weight_mso":{"up":[0.0625,null]},"weight_mso_mean":{"up":0.0625}}"#;

    #[test]
    fn todays_rows_parse_and_write_back_byte_for_byte() {
        for line in [
            START,
            TRAIN_PLAIN,
            TRAIN_ALL,
            EVAL_FULL,
            EVAL_K1,
            EVAL_NO_CAPTURE,
        ] {
            let row = MetricRow::from_line(line).unwrap_or_else(|e| panic!("{e}: {line}"));
            assert_eq!(row.to_line(), format!("{line}\n"));
        }
    }

    #[test]
    fn fields_read_back_typed() {
        let MetricRow::Start(s) = MetricRow::from_line(START).unwrap() else {
            panic!("not a start row")
        };
        assert_eq!((s.params_total, s.vocab_size), (139680, 320));
        assert_eq!(s.tokenizer, "bytes");

        let MetricRow::Train(t) = MetricRow::from_line(TRAIN_PLAIN).unwrap() else {
            panic!("not a train row")
        };
        assert_eq!((t.step, t.tokens, t.orth_loss), (10, 1280, None));
        assert!(t.reg_terms.is_empty() && t.top_k.is_none() && t.grad_loss.is_none());

        let MetricRow::Train(t) = MetricRow::from_line(TRAIN_ALL).unwrap() else {
            panic!("not a train row")
        };
        assert_eq!(t.orth_loss, Some(0.5));
        assert_eq!(
            t.reg_terms,
            BTreeMap::from([
                ("act_loss".to_string(), 0.25),
                ("aux_loss".to_string(), 1.0625),
                ("z_loss".to_string(), 2.0),
            ])
        );
        assert_eq!(
            (t.grad_loss, t.dropped_frac, t.top_k),
            (Some(0.015625), Some(0.125), Some(2))
        );
        assert_eq!(t.train_max_violation, Some(vec![0.5, 0.25]));

        let MetricRow::Eval(e) = MetricRow::from_line(EVAL_FULL).unwrap() else {
            panic!("not an eval row")
        };
        assert_eq!(e.measures.weight_mso["up"], vec![Some(0.0625), Some(0.05)]);
        assert_eq!(e.measures.weight_mso_mean["down"], Some(0.05625));
        let c = e.measures.captured.unwrap();
        assert_eq!(c.act_mso, vec![None, Some(0.125)]);
        assert_eq!(
            (c.act_mso_mean, c.gap_ratio_model),
            (Some(0.125), Some(2.0))
        );
        assert!(c.router_entropy[0] == 1.25 && c.router_entropy[1].is_nan());
        assert_eq!(c.dead_experts, vec![vec![3], vec![]]);
        assert_eq!(c.load[0], vec![10, 20, 34, 0]);
        assert_eq!(c.act_mso_null_reason, None);

        let MetricRow::Eval(e) = MetricRow::from_line(EVAL_K1).unwrap() else {
            panic!("not an eval row")
        };
        assert!(e.val_ppl.is_nan(), "null reads back as NaN");
        let c = e.measures.captured.unwrap();
        assert_eq!((c.act_mso_mean, c.gap_ratio_model), (None, None));
        assert!(c.act_mso_null_reason.unwrap().contains("top-1"));

        let MetricRow::Eval(e) = MetricRow::from_line(EVAL_NO_CAPTURE).unwrap() else {
            panic!("not an eval row")
        };
        assert!(e.measures.captured.is_none());
        assert_eq!(e.measures.weight_mso["up"], vec![Some(0.0625), None]);
    }

    #[test]
    fn a_malformed_measure_block_is_an_error_not_absent() {
        let bad = EVAL_FULL.replace(r#""balance":[0.875,0.9375]"#, r#""balance":"high""#);
        let e = MetricRow::from_line(&bad).unwrap_err().to_string();
        assert!(e.contains("invalid type"), "{e}");
        let missing = EVAL_FULL.replace(r#""balance":[0.875,0.9375],"#, "");
        let e = MetricRow::from_line(&missing).unwrap_err().to_string();
        assert!(e.contains("balance"), "{e}");
    }

    #[test]
    fn non_finite_numbers_are_written_as_null() {
        let MetricRow::Eval(mut e) = MetricRow::from_line(EVAL_FULL).unwrap() else {
            panic!("not an eval row")
        };
        e.val_ppl = f64::INFINITY;
        let line = MetricRow::Eval(e).to_line();
        assert!(line.contains(r#""val_ppl":null"#), "{line}");
        assert!(MetricRow::from_line(&line).is_ok());
    }

    #[test]
    fn torn_last_line_is_skipped_and_other_bad_lines_are_errors() {
        let torn = format!("{START}\n{TRAIN_PLAIN}\n{}", &TRAIN_ALL[..40]);
        let rows = parse_metrics(&torn).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[1].step(), 10);

        // A bad line followed by a newline was written whole: an error.
        let whole = format!("{START}\n{}\n", &TRAIN_ALL[..40]);
        assert_eq!(parse_metrics(&whole).unwrap_err().0, 2);
        let middle = format!("{START}\nnot json\n{TRAIN_PLAIN}");
        assert_eq!(parse_metrics(&middle).unwrap_err().0, 2);

        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("metrics.jsonl");
        std::fs::write(&p, &middle).unwrap();
        let e = read_metrics(&p).unwrap_err().to_string();
        assert!(e.contains("metrics.jsonl") && e.contains("line 2"), "{e}");
        assert_eq!(parse_metrics("").unwrap(), vec![]);
    }
}
