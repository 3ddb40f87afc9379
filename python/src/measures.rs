//! One function per measure. Each checks its arguments, releases the GIL for
//! the work and calls the library (`moescope::measures`), so that Python and
//! the CLI compute the same numbers with the same code.

use crate::arrays::{probabilities, selection, with_slice, Floats};
use crate::{bad, to_py};
use candle_core::{DType, Device, Tensor};
use moescope::config::{Activation, Granularity, JacobianMode, OrthVariant, RankRule, Routing};
use moescope::kernels::Real;
use moescope::measures::jacobian::{layer_jacobian, JacobianInputs, JacobianSettings, Precision};
use moescope::measures::orth::{self, OrthForm};
use moescope::measures::subspace::{self, Moments};
use moescope::measures::{cosine_gram, mso, LayerAccumulator};
use moescope::model::layers::Linear;
use moescope::model::moe::{CapturedRouting, Expert, MoeLayer};
use numpy::ndarray::{Array, IxDyn};
use numpy::{IntoPyArray, PyArrayDyn, PyReadonlyArray2};
use pyo3::prelude::*;
use serde_json::{json, Value};
use std::str::FromStr;

/// Parse a named choice, or a `ValueError` naming the argument.
fn parse<T: FromStr>(name: &str, s: &str) -> PyResult<T>
where
    T::Err: std::fmt::Display,
{
    s.parse().map_err(|e| bad(format!("{name}: {e}")))
}

/// The experts' count, rows and columns from `(E, P)` or `(E, R, C)`,
/// refused when granularity `g` cannot cut that shape into vectors of two or
/// more entries.
fn expert_dims(name: &str, experts: &Floats, g: Granularity) -> PyResult<(usize, usize, usize)> {
    let shape = experts.shape_of(name, &[2, 3], "(E, P) or (E, R, C)")?;
    let (e, rows, cols) = match shape[..] {
        [e, p] => (e, 1, p),
        [e, r, c] => (e, r, c),
        _ => unreachable!("checked above"),
    };
    if g != Granularity::Flat && shape.len() != 3 {
        return Err(bad(format!(
            "{name}: granularity `{g}` cuts matrices; expected shape (E, R, C), got {shape:?}"
        )));
    }
    if orth::slices(g, rows, cols).1 < 2 {
        return Err(bad(format!(
            "{name}: granularity `{g}` cuts a ({rows} × {cols}) matrix into vectors of one entry, \
             whose cos² is always 1; {}",
            if g == Granularity::Flat {
                "give E matrices or vectors of two or more entries"
            } else {
                "use `flat`"
            }
        )));
    }
    Ok((e, rows, cols))
}

/// The E×E overlap matrix (row-major) and the MSO at granularity `g`.
/// `flat`: the cosine matrix; `rows`/`cols`: each pair's mean cos² over slices.
fn overlap_of<T: Real>(data: &[T], e: usize, rows: usize, g: Granularity) -> (Vec<f64>, f64) {
    let w: Vec<&[T]> = data.chunks_exact(data.len() / e).collect();
    if g == Granularity::Flat {
        let gram = cosine_gram(&w);
        return (gram.concat(), mso(&gram));
    }
    let m = orth::pair_overlap(&w, rows, g);
    let pairs = (e * e.saturating_sub(1)).max(1) as f64;
    let off_diagonal: f64 = (0..e * e).filter(|i| i / e != i % e).map(|i| m[i]).sum();
    (m, off_diagonal / pairs)
}

fn array2(py: Python<'_>, v: Vec<f64>, rows: usize, cols: usize) -> Bound<'_, PyArrayDyn<f64>> {
    Array::from_shape_vec(IxDyn(&[rows, cols]), v)
        .expect("the caller sized the vector")
        .into_pyarray(py)
}

/// (E×E matrix, MSO) of the experts' weights at a granularity.
#[pyfunction]
pub fn weight_overlap<'py>(
    py: Python<'py>,
    experts: Floats<'py>,
    granularity: &str,
) -> PyResult<(Bound<'py, PyArrayDyn<f64>>, f64)> {
    let g: Granularity = parse("granularity", granularity)?;
    let (e, rows, _) = expert_dims("experts", &experts, g)?;
    let (m, value) = with_slice!(&experts, |s| py.detach(|| overlap_of(s, e, rows, g)));
    Ok((array2(py, m, e, e), value))
}

/// 1/L, the weight MSO of independent isotropic random matrices of `shape`.
#[pyfunction]
pub fn weight_chance(shape: Vec<usize>, granularity: &str) -> PyResult<f64> {
    let g: Granularity = parse("granularity", granularity)?;
    let (rows, cols) = match shape[..] {
        [_, p] => (1, p),
        [_, r, c] => (r, c),
        _ => {
            return Err(bad(format!(
                "shape: expected (E, P) or (E, R, C), got {shape:?}"
            )))
        }
    };
    Ok(orth::chance_level(g, rows, cols))
}

/// L_orth of the experts in `a` (E·R·C values) and its gradient as an
/// array of `shape` and of the input's dtype.
fn orth_loss_array<'py, T: Real + numpy::Element>(
    py: Python<'py>,
    a: &numpy::PyReadonlyArrayDyn<'py, T>,
    shape: &[usize],
    rows: usize,
    form: OrthForm,
) -> PyResult<(f64, Bound<'py, PyAny>)> {
    let data = crate::arrays::contiguous(a)?;
    let per = data.len() / shape[0];
    let (value, grad) = py.detach(|| {
        let w: Vec<&[T]> = data.chunks_exact(per).collect();
        let mut grad = vec![T::zero(); data.len()];
        let value = orth::orth_loss_and_grad(
            Some(grad.chunks_exact_mut(per).collect()),
            &w,
            rows,
            form,
            1.0,
        );
        (value, grad)
    });
    let grad = Array::from_shape_vec(IxDyn(shape), grad).expect("sized as the input");
    Ok((value, grad.into_pyarray(py).into_any()))
}

/// L_orth of the experts and its gradient (same shape and dtype).
#[pyfunction]
pub fn orth_loss<'py>(
    py: Python<'py>,
    experts: Floats<'py>,
    granularity: &str,
    variant: &str,
) -> PyResult<(f64, Bound<'py, PyAny>)> {
    let form = OrthForm {
        granularity: parse("granularity", granularity)?,
        variant: parse::<OrthVariant>("variant", variant)?,
    };
    let (_, rows, _) = expert_dims("experts", &experts, form.granularity)?;
    let shape = experts.shape();
    match &experts {
        Floats::F32(a) => orth_loss_array(py, a, &shape, rows, form),
        Floats::F64(a) => orth_loss_array(py, a, &shape, rows, form),
    }
}

/// The tokens routed to each expert, ascending (the dispatch order).
fn tokens_per_expert(selected: &[u32], k: usize, e_n: usize) -> Vec<Vec<u32>> {
    let mut tokens: Vec<Vec<u32>> = vec![Vec::new(); e_n];
    for (t, row) in selected.chunks_exact(k).enumerate() {
        for &e in row.iter().filter(|&&e| (e as usize) < e_n) {
            tokens[e as usize].push(t as u32);
        }
    }
    tokens
}

/// Per-expert routed rows as given, each checked against the tokens that
/// `selected` routes to it; returns f32 copies and the width d.
fn given_rows(outputs: &[Floats], tokens: &[Vec<u32>]) -> PyResult<(Vec<Vec<f32>>, usize)> {
    // The width: that of the first 2-D array (each is checked against it).
    let d = outputs
        .iter()
        .map(Floats::shape)
        .find(|s| s.len() == 2)
        .map_or(0, |s| s[1]);
    let mut rows = Vec::with_capacity(outputs.len());
    for (e, o) in outputs.iter().enumerate() {
        let want = [tokens[e].len(), d];
        if o.shape() != want || d == 0 {
            return Err(bad(format!(
                "outputs[{e}]: expected shape ({}, {d}) (the rows of the {} tokens `selected` \
                 routes to expert {e}, in token order), got {:?}",
                want[0],
                want[0],
                o.shape()
            )));
        }
        rows.push(o.to_f32()?);
    }
    Ok((rows, d))
}

/// From every expert's output on every token (`all`, n × E × d): each
/// expert's rows on its routed tokens, and each expert's n × d outputs.
fn split_dense(
    all: &[f32],
    tokens: &[Vec<u32>],
    n: usize,
    d: usize,
) -> (Vec<Vec<f32>>, Vec<Vec<f32>>) {
    let e_n = tokens.len();
    let row = |t: usize, e: usize| &all[(t * e_n + e) * d..(t * e_n + e + 1) * d];
    let routed = (0..e_n)
        .map(|e| {
            tokens[e]
                .iter()
                .flat_map(|&t| row(t as usize, e))
                .copied()
                .collect()
        })
        .collect();
    let every = (0..e_n)
        .map(|e| (0..n).flat_map(|t| row(t, e)).copied().collect())
        .collect();
    (routed, every)
}

/// The library's accumulator over one layer's routed rows (and, with
/// `every`, each expert's output on every token), as JSON.
fn activation_report(
    rows: Vec<Vec<f32>>,
    tokens: Vec<Vec<u32>>,
    every: Option<Vec<Vec<f32>>>,
    selected: Vec<u32>,
    k: usize,
    d: usize,
) -> moescope::Result<Value> {
    let e_n = tokens.len();
    let n = selected.len() / k;
    let expert_outputs = rows
        .into_iter()
        .zip(tokens)
        .map(|(r, ts)| {
            let h = (!ts.is_empty())
                .then(|| Tensor::from_vec(r, (ts.len(), d), &Device::Cpu))
                .transpose()?;
            Ok((ts, h))
        })
        .collect::<moescope::Result<Vec<_>>>()?;
    let cap = CapturedRouting {
        probs: vec![1.0 / e_n as f32; n * e_n],
        selected,
        k,
        expert_outputs,
        expert_hidden: Vec::new(),
    };
    let mut acc = LayerAccumulator::new(e_n, k);
    acc.add(&cap)?;
    if let Some(every) = &every {
        acc.add_all_pairs(every, d, &[]);
    }
    let (act, reason) = match acc.act_mso() {
        Ok(v) => (Some(v), None),
        Err(r) => (None, Some(r)),
    };
    Ok(json!({
        "act_mso": act,
        "act_mso_null_reason": reason,
        "act_mso_all": acc.act_mso_all(),
        "act_overlap": acc.act_overlap(),
        "tokens": n,
        "chance": 1.0 / d as f64,
    }))
}

/// Activation overlap (routed pairs, and all pairs when every expert's
/// output on every token is given: `dense`, one (n, E, d) array) as the
/// library's JSON.
#[pyfunction]
pub fn activation_overlap(
    py: Python<'_>,
    outputs: Vec<Floats<'_>>,
    dense: bool,
    selected: PyReadonlyArray2<'_, i64>,
) -> PyResult<String> {
    if outputs.is_empty() {
        return Err(bad("outputs: no experts given"));
    }
    let dense_shape = if dense {
        Some(outputs[0].shape_of("outputs", &[3], "(n, E, d)")?)
    } else {
        None
    };
    let e_n = dense_shape.as_ref().map_or(outputs.len(), |s| s[1]);
    let (sel, n, k) = selection("selected", &selected, e_n)?;
    let tokens = tokens_per_expert(&sel, k, e_n);
    let json = match dense_shape {
        Some(shape) => {
            if shape[0] != n {
                return Err(bad(format!(
                    "outputs: expected shape (n, E, d) with n = {n} (the rows of selected), got {shape:?}"
                )));
            }
            let all = outputs[0].to_f32()?;
            py.detach(move || {
                let (rows, every) = split_dense(&all, &tokens, n, shape[2]);
                activation_report(rows, tokens, Some(every), sel, k, shape[2])
            })
        }
        None => {
            let (rows, d) = given_rows(&outputs, &tokens)?;
            py.detach(move || activation_report(rows, tokens, None, sel, k, d))
        }
    };
    Ok(json.map_err(to_py)?.to_string())
}

/// Routing telemetry of a selection (and router probabilities, when given).
#[pyfunction]
#[pyo3(signature = (selected, n_experts, probs=None))]
pub fn routing_telemetry(
    selected: PyReadonlyArray2<'_, i64>,
    n_experts: usize,
    probs: Option<PyReadonlyArray2<'_, f32>>,
) -> PyResult<String> {
    let (sel, n, k) = selection("selected", &selected, n_experts)?;
    let given = probs.is_some();
    let p = match &probs {
        Some(p) => crate::arrays::given_probabilities(p, n, n_experts)?,
        None => Vec::new(),
    };
    let mut acc = LayerAccumulator::new(n_experts, k);
    acc.add_routing(&p, &sel, k);
    let mut v = serde_json::to_value(acc.telemetry()).map_err(|e| bad(e.to_string()))?;
    if !given {
        v["router_entropy"] = Value::Null;
    }
    v["tokens"] = json!(n);
    v["chance"] = json!({
        "router_entropy": (n_experts as f64).ln(),
        "balance": 1.0,
        "max_violation": 0.0,
    });
    Ok(v.to_string())
}

/// An MoE layer holding only the given experts (its router is never used).
#[allow(clippy::too_many_arguments)]
fn moe_of(
    w_up: &Floats,
    w_down: &Floats,
    w_gate: Option<&Floats>,
    b_up: Option<&Floats>,
    b_down: Option<&Floats>,
    activation: Activation,
    k: usize,
) -> PyResult<MoeLayer> {
    let up = w_up.shape_of("w_up", &[3], "(E, d_ff, d)")?;
    let (e_n, f, d) = (up[0], up[1], up[2]);
    let check = |name: &str, a: &Floats, want: &[usize], desc: &str| -> PyResult<Tensor> {
        if a.shape() != want {
            return Err(bad(format!(
                "{name}: expected shape {desc} = {want:?} (from w_up {up:?}), got {:?}",
                a.shape()
            )));
        }
        a.tensor_f64(want)
    };
    let down = check("w_down", w_down, &[e_n, d, f], "(E, d, d_ff)")?;
    let gate = w_gate
        .map(|g| check("w_gate", g, &[e_n, f, d], "(E, d_ff, d)"))
        .transpose()?;
    let bu = b_up
        .map(|b| check("b_up", b, &[e_n, f], "(E, d_ff)"))
        .transpose()?;
    let bd = b_down
        .map(|b| check("b_down", b, &[e_n, d], "(E, d)"))
        .transpose()?;
    let upt = w_up.tensor_f64(&up)?;
    let pick = |t: &Tensor, e: usize| t.get(e).map_err(|err| bad(err.to_string()));
    let experts = (0..e_n)
        .map(|e| {
            Ok(Expert {
                up: Linear {
                    weight: pick(&upt, e)?,
                    bias: bu.as_ref().map(|b| pick(b, e)).transpose()?,
                },
                gate: gate
                    .as_ref()
                    .map(|g| {
                        Ok::<_, PyErr>(Linear {
                            weight: pick(g, e)?,
                            bias: None,
                        })
                    })
                    .transpose()?,
                down: Linear {
                    weight: pick(&down, e)?,
                    bias: bd.as_ref().map(|b| pick(b, e)).transpose()?,
                },
                activation,
            })
        })
        .collect::<PyResult<Vec<_>>>()?;
    let router =
        Tensor::zeros((e_n, d), DType::F64, &Device::Cpu).map_err(|e| bad(e.to_string()))?;
    Ok(MoeLayer {
        router: Linear {
            weight: router,
            bias: None,
        },
        experts,
        routing: Routing::Topk,
        top_k: k,
        norm_topk: false,
        temperature: 1.0,
        capacity_factor: 0.0,
        balance_bias: None,
    })
}

/// Cross-expert Jacobian alignment of one layer's experts on tokens `x`.
#[pyfunction]
#[pyo3(signature = (w_up, w_down, x, selected, w_gate=None, b_up=None, b_down=None,
    activation="silu", mode="exact", pairs="routed", probs=None, seed=0,
    spectra_tokens=0, null_draws=20, null_init_tokens=0, precision="f32"))]
#[allow(clippy::too_many_arguments)]
pub fn jacobian_alignment(
    py: Python<'_>,
    w_up: Floats<'_>,
    w_down: Floats<'_>,
    x: Floats<'_>,
    selected: PyReadonlyArray2<'_, i64>,
    w_gate: Option<Floats<'_>>,
    b_up: Option<Floats<'_>>,
    b_down: Option<Floats<'_>>,
    activation: &str,
    mode: &str,
    pairs: &str,
    probs: Option<PyReadonlyArray2<'_, f32>>,
    seed: u64,
    spectra_tokens: usize,
    null_draws: usize,
    null_init_tokens: usize,
    precision: &str,
) -> PyResult<String> {
    let activation: Activation = parse("activation", activation)?;
    let precision: Precision = parse("precision", precision)?;
    if w_gate.is_some() && activation != Activation::Silu {
        return Err(bad(format!(
            "activation: gated (SwiGLU) experts use silu; `{activation}` applies to experts without w_gate"
        )));
    }
    let mode: JacobianMode = parse("mode", mode)?;
    if mode == JacobianMode::Off {
        return Err(bad(
            "mode: `off` measures nothing; use exact, estimate, estimate:M or auto",
        ));
    }
    let all_pairs = match pairs {
        "routed" => false,
        "all" => true,
        other => return Err(bad(format!("pairs: unknown `{other}` (routed, all)"))),
    };
    let (sel, n, k) = selection(
        "selected",
        &selected,
        w_up.shape().first().copied().unwrap_or(0),
    )?;
    let moe = moe_of(
        &w_up,
        &w_down,
        w_gate.as_ref(),
        b_up.as_ref(),
        b_down.as_ref(),
        activation,
        k,
    )?;
    let d = moe.experts[0]
        .up
        .weight
        .dim(1)
        .map_err(|e| bad(e.to_string()))?;
    let xs = x.shape_of("x", &[2], "(n, d)")?;
    if xs != [n, d] {
        return Err(bad(format!(
            "x: expected shape (n, d) = ({n}, {d}), got {xs:?}"
        )));
    }
    let x = x.tensor_f64(&xs)?;
    let probs = probabilities(probs.as_ref(), n, moe.n_experts())?;
    let settings = JacobianSettings {
        mode,
        precision,
        all_pairs,
        spectra_tokens,
        top_sv: 8,
        seed,
        null_draws: if all_pairs { null_draws } else { 0 },
        null_init_tokens,
    };
    let report = py.detach(|| {
        let input = JacobianInputs {
            x: &x,
            selected: &sel,
            k,
            probs: &probs,
        };
        layer_jacobian(&moe, &input, &settings)
    });
    let report = report
        .map_err(to_py)?
        .ok_or_else(|| bad("mode: nothing was measured"))?;
    serde_json::to_string(&report).map_err(|e| bad(e.to_string()))
}

/// Each expert's rows (f64, n_e × d) and row weights, checked: every array
/// (n_e, d) with the same d (n_e may be 0), weights (n_e,).
#[allow(clippy::type_complexity)]
fn expert_rows(
    rows: &[Floats],
    weights: Option<&[Floats]>,
) -> PyResult<(Vec<(Vec<f64>, Option<Vec<f64>>)>, usize)> {
    if rows.len() < 2 {
        return Err(bad(format!(
            "rows_per_expert: expected a list of E ≥ 2 arrays (n_e, d), got {}",
            rows.len()
        )));
    }
    if weights.is_some_and(|w| w.len() != rows.len()) {
        return Err(bad(format!(
            "weights: {} arrays for {} experts",
            weights.map_or(0, <[Floats]>::len),
            rows.len()
        )));
    }
    let d = rows[0].shape().get(1).copied().unwrap_or(0);
    let mut out = Vec::with_capacity(rows.len());
    for (e, r) in rows.iter().enumerate() {
        let shape = r.shape();
        if shape.len() != 2 || shape[1] != d || d == 0 {
            return Err(bad(format!(
                "rows_per_expert[{e}]: expected shape (n_e, d) with the d of rows_per_expert[0] ({d} ≥ 1), got {shape:?}"
            )));
        }
        let w = match weights {
            Some(ws) if ws[e].shape() != [shape[0]] => {
                return Err(bad(format!(
                    "weights[{e}]: expected shape ({},) (one weight per row of rows_per_expert[{e}]), got {:?}",
                    shape[0],
                    ws[e].shape()
                )))
            }
            Some(ws) => Some(ws[e].to_f64()?),
            None => None,
        };
        out.push((r.to_f64()?, w));
    }
    Ok((out, d))
}

/// Principal angles of every pair of bases (None on the diagonal and for skipped experts).
fn pair_angles(bases: &[Option<Vec<Vec<f64>>>]) -> Vec<Vec<Option<Vec<f64>>>> {
    let e = bases.len();
    (0..e)
        .map(|i| {
            (0..e)
                .map(|j| match (&bases[i], &bases[j]) {
                    (Some(a), Some(b)) if i != j => {
                        let r = a.len().min(b.len());
                        Some(subspace::principal_angles(&a[..r], &b[..r]))
                    }
                    _ => None,
                })
                .collect()
        })
        .collect()
}

/// Per-expert PCA subspaces, their principal angles and Grassmann distances.
#[pyfunction]
#[pyo3(signature = (rows, rank="16", weights=None))]
pub fn subspaces(
    py: Python<'_>,
    rows: Vec<Floats<'_>>,
    rank: &str,
    weights: Option<Vec<Floats<'_>>>,
) -> PyResult<String> {
    let rule: RankRule = parse("rank", rank)?;
    if rule == RankRule::Off {
        return Err(bad(
            "rank: `off` measures nothing; give a rank (16) or var:τ",
        ));
    }
    let (data, d) = expert_rows(&rows, weights.as_deref())?;
    let weighted = weights.is_some();
    let json = py.detach(move || -> moescope::Result<Value> {
        let mut moments = Vec::with_capacity(data.len());
        for (x, w) in data {
            let mut m = Moments::new(d);
            let n = x.len() / d;
            if n > 0 {
                m.add(&Tensor::from_vec(x, (n, d), &Device::Cpu)?, w.as_deref())?;
            }
            moments.push(m);
        }
        let bases = subspace::expert_bases(&moments, rule);
        let angles = pair_angles(&bases.bases);
        let report = subspace::subspaces_of(bases, d, rule, "input", weighted);
        let mut v =
            serde_json::to_value(report).map_err(|e| moescope::Error::Other(e.to_string()))?;
        v["principal_angles"] = json!(angles);
        Ok(v)
    });
    Ok(json.map_err(to_py)?.to_string())
}

/// `moescope analyze` as a call: the same report, as JSON.
#[pyfunction]
pub fn analyze(py: Python<'_>, model: String, options: &str) -> PyResult<String> {
    let opts: serde_json::Map<String, Value> =
        serde_json::from_str(options).map_err(|e| bad(format!("options: {e}")))?;
    let req = crate::options::request(model, &opts)?;
    let analysis = py.detach(|| moescope::analysis::run(&req)).map_err(to_py)?;
    serde_json::to_string(&analysis.report).map_err(|e| bad(e.to_string()))
}

/// A run's metrics.jsonl as a JSON array of its rows: checked by the
/// library's reader (a bad line is an error naming the file and the line),
/// then handed over as written, so that every number keeps its exact digits.
/// A torn last line (a killed writer) is left out, as the reader does.
#[pyfunction]
pub fn read_metrics(path: std::path::PathBuf) -> PyResult<String> {
    use moescope::metrics::{parse_metrics, MetricRow};
    use moescope::Error;
    let text = std::fs::read_to_string(&path).map_err(|e| to_py(Error::io(&path, e)))?;
    parse_metrics(&text)
        .map_err(|(line, e)| to_py(Error::bad_file(&path, format!("line {line}: {e}"))))?;
    let mut lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    if !text.ends_with('\n')
        && lines
            .last()
            .is_some_and(|l| MetricRow::from_line(l).is_err())
    {
        lines.pop();
    }
    Ok(format!("[{}]", lines.join(",")))
}

/// Random experts (E × R × C, f32) from a fixed seed, for the benchmarks.
fn random_experts(e: usize, r: usize, c: usize) -> Vec<f32> {
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    (0..e * r * c)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        })
        .collect()
}

/// Seconds per call of the weight-overlap computation from Rust (no Python
/// in the loop), on random f32 experts of shape (E, R, C): what the Python
/// call is compared with.
#[pyfunction]
pub fn bench_weight_overlap(
    py: Python<'_>,
    e: usize,
    r: usize,
    c: usize,
    granularity: &str,
    reps: usize,
) -> PyResult<f64> {
    let g: Granularity = parse("granularity", granularity)?;
    let w = random_experts(e, r, c);
    Ok(py.detach(|| {
        std::hint::black_box(overlap_of(&w, e, r, g)); // warm-up, as the Python side has
        let t = std::time::Instant::now();
        for _ in 0..reps.max(1) {
            std::hint::black_box(overlap_of(&w, e, r, g));
        }
        t.elapsed().as_secs_f64() / reps.max(1) as f64
    }))
}

/// Seconds per call of L_orth and its gradient from Rust, as [`bench_weight_overlap`].
#[pyfunction]
pub fn bench_orth_loss(py: Python<'_>, e: usize, r: usize, c: usize, reps: usize) -> PyResult<f64> {
    let w = random_experts(e, r, c);
    let call = || {
        let experts: Vec<&[f32]> = w.chunks_exact(r * c).collect();
        let mut grad = vec![0.0f32; w.len()];
        let grads = grad.chunks_exact_mut(r * c).collect();
        let value = orth::orth_loss_and_grad(Some(grads), &experts, r, OrthForm::default(), 1.0);
        std::hint::black_box((value, grad));
    };
    Ok(py.detach(|| {
        call(); // warm-up, as the Python side has
        let t = std::time::Instant::now();
        for _ in 0..reps.max(1) {
            call();
        }
        t.elapsed().as_secs_f64() / reps.max(1) as f64
    }))
}
