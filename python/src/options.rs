//! `moescope.analyze(model, **options)`: the keyword options, named as
//! `moescope analyze`'s flags with `_` for `-`, parsed into the library's
//! request. An unknown option is an error that lists the known ones.

use crate::bad;
use moescope::analysis::AnalysisRequest;
use moescope::config::{AnalysisSpace, JacobianMode, Precision, RankRule};
use pyo3::PyResult;
use serde_json::{Map, Value};
use std::str::FromStr;

const KNOWN: &[&str] = &[
    "revision",
    "layers",
    "seq_len",
    "in_memory",
    "data",
    "token_ids",
    "tokens",
    "families",
    "batch",
    "device",
    "jacobian",
    "jacobian_pairs",
    "jacobian_tokens",
    "jacobian_precision",
    "spectra_tokens",
    "subspace",
    "space",
    "weighted",
    "null_draws",
    "null_tokens",
    "act_space",
    "granularity",
    "progress",
];

fn text<'a>(key: &str, v: &'a Value) -> PyResult<&'a str> {
    v.as_str()
        .ok_or_else(|| bad(format!("{key}: expected a string, got {v}")))
}

fn count(key: &str, v: &Value) -> PyResult<usize> {
    v.as_u64()
        .map(|n| n as usize)
        .ok_or_else(|| bad(format!("{key}: expected a non-negative integer, got {v}")))
}

fn flag(key: &str, v: &Value) -> PyResult<bool> {
    v.as_bool()
        .ok_or_else(|| bad(format!("{key}: expected True or False, got {v}")))
}

fn choice<T: FromStr>(key: &str, v: &Value) -> PyResult<T>
where
    T::Err: std::fmt::Display,
{
    text(key, v)?
        .parse()
        .map_err(|e| bad(format!("{key}: {e}")))
}

/// A list of choices, given as a list or a comma-separated string.
fn choices<T: FromStr>(key: &str, v: &Value) -> PyResult<Vec<T>>
where
    T::Err: std::fmt::Display,
{
    let items: Vec<String> = match v {
        Value::String(s) => s.split(',').map(str::to_string).collect(),
        Value::Array(a) => a
            .iter()
            .map(|x| text(key, x).map(str::to_string))
            .collect::<PyResult<_>>()?,
        _ => return Err(bad(format!("{key}: expected a list of strings, got {v}"))),
    };
    items
        .iter()
        .map(|s| s.trim().parse().map_err(|e| bad(format!("{key}: {e}"))))
        .collect()
}

/// The request for `model` with `opts` applied over `moescope analyze`'s defaults.
pub fn request(model: String, opts: &Map<String, Value>) -> PyResult<AnalysisRequest> {
    let mut req = AnalysisRequest::cli_defaults(model);
    for (key, v) in opts {
        if v.is_null() {
            continue;
        }
        let geo = &mut req.geometry;
        match key.as_str() {
            "revision" => req.revision = text(key, v)?.into(),
            "layers" => req.layers = Some(choices::<usize>(key, &layer_list(v))?),
            "seq_len" => req.seq_len = Some(count(key, v)?),
            "in_memory" => req.in_memory = flag(key, v)?,
            "data" => req.data = Some(text(key, v)?.into()),
            "token_ids" => req.token_ids = Some(text(key, v)?.into()),
            "tokens" => req.tokens = Some(count(key, v)?),
            "families" => req.families = choices(key, v)?,
            "batch" => req.batch = count(key, v)?,
            "device" => req.device = text(key, v)?.into(),
            "jacobian" => geo.jacobian = choice::<JacobianMode>(key, v)?,
            "jacobian_pairs" => {
                geo.jacobian_all_pairs = match text(key, v)? {
                    "all" => true,
                    "routed" => false,
                    other => {
                        return Err(bad(format!(
                            "jacobian_pairs: unknown `{other}` (routed, all)"
                        )))
                    }
                }
            }
            "jacobian_tokens" => geo.jacobian_tokens = count(key, v)?,
            "jacobian_precision" => geo.jacobian_precision = choice::<Precision>(key, v)?,
            "spectra_tokens" => geo.spectra_tokens = count(key, v)?,
            "subspace" => {
                // A number goes through the flag's parser (which refuses 0).
                let text = match v {
                    Value::Number(n) => Value::String(n.to_string()),
                    other => other.clone(),
                };
                geo.subspace = choice::<RankRule>(key, &text)?
            }
            "space" => geo.output_space = choice::<AnalysisSpace>(key, v)? == AnalysisSpace::Output,
            "weighted" => geo.weighted = flag(key, v)?,
            "null_draws" => geo.null_draws = count(key, v)?,
            "null_tokens" => geo.null_tokens = count(key, v)?,
            "act_space" => geo.act_spaces = choices(key, v)?,
            "granularity" => geo.granularities = choices(key, v)?,
            "progress" => req.progress = flag(key, v)?,
            other => {
                return Err(bad(format!(
                    "unknown option `{other}` (known: {})",
                    KNOWN.join(", ")
                )))
            }
        }
    }
    if req.data.is_some() && req.token_ids.is_some() {
        return Err(bad(
            "data and token_ids: give one (a corpus to tokenise, or tokens already made), as --data and --token-ids",
        ));
    }
    Ok(req)
}

/// Layer indices given as numbers become strings, so that a list of
/// numbers, a list of strings and "0,5,31" parse alike.
fn layer_list(v: &Value) -> Value {
    match v {
        Value::Array(a) => Value::Array(
            a.iter()
                .map(|x| match x {
                    Value::Number(n) => Value::String(n.to_string()),
                    other => other.clone(),
                })
                .collect(),
        ),
        Value::Number(n) => Value::String(n.to_string()),
        other => other.clone(),
    }
}
